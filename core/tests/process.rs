//! Two spawned processes exchange checksummed messages over real links
//! (the `ivcom-xfer` binary), over the host ring and over TCP; the probe's
//! choice, peer death and clean-up are checked from the outside.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const XFER: &str = env!("CARGO_BIN_EXE_ivcom-xfer");

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ivcom-proc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn sub(&self, s: &str) -> String {
        self.0.join(s).to_string_lossy().into_owned()
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Shared objects left in a hypervisor directory.
fn leftovers(dir: &str) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn spawn_with(prefix: &[&str], args: &[&str]) -> Child {
    let mut c = if prefix.is_empty() {
        Command::new(XFER)
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(XFER);
        c
    };
    c.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ivcom-xfer")
}

fn spawn(args: &[&str]) -> Child {
    spawn_with(&[], args)
}

fn wait_output(mut c: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if c.try_wait().unwrap().is_some() {
            return c.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let o = c.wait_with_output().unwrap();
            panic!(
                "ivcom-xfer did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs listener (directory `dir_b`) and connector (directory `dir_a`,
/// started through `prefix`) with extra options; asserts success and returns
/// both outputs.
fn pair_with(
    tag: &str,
    prefix: &[&str],
    dir_a: &str,
    dir_b: &str,
    extra: &[&str],
) -> (String, String) {
    let t = TempDir::new(tag);
    let card = t.sub("card");
    let mut la = vec!["listen", "--card-file", &card, "--host-dir", dir_b];
    la.extend_from_slice(extra);
    let b = spawn(&la);
    let mut ca = vec!["connect", "--card-file", &card, "--host-dir", dir_a];
    ca.extend_from_slice(extra);
    let a = spawn_with(prefix, &ca);
    let oa = wait_output(a, Duration::from_secs(300));
    let ob = wait_output(b, Duration::from_secs(60));
    assert!(oa.status.success(), "connector failed:\n{}", text(&oa));
    assert!(ob.status.success(), "listener failed:\n{}", text(&ob));
    (
        String::from_utf8_lossy(&oa.stdout).into(),
        String::from_utf8_lossy(&ob.stdout).into(),
    )
}

fn pair(tag: &str, dir_a: &str, dir_b: &str, extra: &[&str]) -> (String, String) {
    pair_with(tag, &[], dir_a, dir_b, extra)
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with("RESULT PASS"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
        .unwrap_or_else(|| panic!("no RESULT PASS with {key} in:\n{out}"))
}

/// Both sides hashed the same bytes, and enough messages moved.
fn check_stream(a: &str, b: &str, min_msgs: u64) {
    assert_eq!(
        field(a, "digest="),
        field(b, "digest="),
        "digests differ:\n{a}\n{b}"
    );
    assert_eq!(field(a, "bytes="), field(b, "bytes="));
    let msgs: u64 = field(a, "msgs=").parse().unwrap();
    assert!(msgs >= min_msgs, "only {msgs} messages");
}

/// 100,000 messages of random sizes up to 4 MiB (plus 1,000 echoes) between
/// two processes on the given backend; both sides' digests must agree.
fn stream_100k(tag: &str, backend: &str, path: &str, seed: &str) {
    let t = TempDir::new(tag);
    let d = t.path().to_str().unwrap();
    let (a, b) = pair(
        tag,
        d,
        d,
        &[
            "--backend",
            backend,
            "--count",
            "100000",
            "--max-size",
            "4194304",
            "--echo",
            "1000",
            "--expect-path",
            path,
            "--seed",
            seed,
        ],
    );
    check_stream(&a, &b, 100_000);
    let want = format!("PATH {path}");
    assert!(a.contains(&want) && b.contains(&want), "{a}\n{b}");
    assert_eq!(leftovers(d), Vec::<String>::new());
}

#[test]
fn ring_100k_random_messages_up_to_4mib() {
    stream_100k("ring100k", "host", "ring", "7");
}

#[test]
fn tcp_100k_random_messages_up_to_4mib() {
    stream_100k("tcp100k", "none", "tcp", "8");
}

#[test]
fn probe_picks_ring_for_shared_directory_and_tcp_otherwise() {
    let t = TempDir::new("probe");
    let (h1, h2) = (t.sub("host1"), t.sub("host2"));
    let (a, b) = pair(
        "probe-same",
        &h1,
        &h1,
        &["--count", "100", "--expect-path", "ring"],
    );
    check_stream(&a, &b, 100);
    let (a, b) = pair(
        "probe-diff",
        &h1,
        &h2,
        &["--count", "100", "--expect-path", "tcp"],
    );
    check_stream(&a, &b, 100);
    assert!(a.contains("another host"), "reason should say why:\n{a}");
    assert!(leftovers(&h1).is_empty() && leftovers(&h2).is_empty());
}

#[test]
fn no_space_for_the_ring_falls_back_to_tcp() {
    // The offering side cannot reserve the ring's pages (file size limit:
    // fallocate fails like on a full /dev/shm); the pair stays on TCP and
    // says why.
    let t = TempDir::new("nospace");
    let d = t.path().to_str().unwrap();
    let (a, b) = pair_with(
        "nospace",
        &["sh", "-c", "trap '' XFSZ; ulimit -f 8; exec \"$0\" \"$@\""],
        d,
        d,
        &["--count", "50", "--expect-path", "tcp"],
    );
    check_stream(&a, &b, 50);
    assert!(a.contains("could not share a ring"), "{a}");
    assert!(b.contains("PATH tcp"), "{b}");
    assert_eq!(leftovers(d), Vec::<String>::new());
}

/// Starts an endless stream, SIGKILLs one side, and checks that the other
/// side's next call fails within 5 s and that nothing is left behind.
fn kill_mid_stream(kill_listener: bool, backend: &str) {
    let t = TempDir::new(&format!("kill-{kill_listener}-{backend}"));
    let d = t.sub("hv");
    std::fs::create_dir_all(&d).unwrap();
    let card = t.sub("card");
    let mut b = spawn(&[
        "listen",
        "--card-file",
        &card,
        "--host-dir",
        &d,
        "--backend",
        backend,
    ]);
    let mut a = spawn(&[
        "connect",
        "--card-file",
        &card,
        "--host-dir",
        &d,
        "--backend",
        backend,
        "--count",
        "0",
        "--echo",
        "10",
        "--max-size",
        "65536",
    ]);
    // Wait until the stream runs (the connector prints its path first).
    let mut out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("PATH"), "connector said: {line}");
    std::thread::sleep(Duration::from_millis(500));
    let (victim, survivor) = if kill_listener {
        (&mut b, a)
    } else {
        (&mut a, b)
    };
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(victim.id() as i32, libc::SIGKILL) };
    victim.wait().unwrap();
    let t0 = Instant::now();
    let o = wait_output(survivor, Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(!o.status.success(), "survivor should fail:\n{}", text(&o));
    assert!(
        took < Duration::from_secs(5),
        "survivor took {took:?} to notice:\n{}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("peer gone") || err.contains("closed"),
        "error should name the cause: {err}"
    );
    assert_eq!(
        leftovers(&d),
        Vec::<String>::new(),
        "shared objects left behind"
    );
}

#[test]
fn sigkill_listener_ring() {
    kill_mid_stream(true, "host");
}

#[test]
fn sigkill_connector_ring() {
    kill_mid_stream(false, "host");
}

#[test]
fn sigkill_listener_tcp() {
    kill_mid_stream(true, "none");
}

#[test]
fn sigkill_connector_tcp() {
    kill_mid_stream(false, "none");
}

#[test]
fn no_leftovers_after_error_exit() {
    // The connector demands TCP, gets the ring, and exits with an error
    // right after the link is up.
    let t = TempDir::new("errexit");
    let d = t.sub("hv");
    std::fs::create_dir_all(&d).unwrap();
    let card = t.sub("card");
    let b = spawn(&[
        "listen",
        "--card-file",
        &card,
        "--host-dir",
        &d,
        "--timeout",
        "20",
    ]);
    let a = spawn(&[
        "connect",
        "--card-file",
        &card,
        "--host-dir",
        &d,
        "--expect-path",
        "tcp",
    ]);
    let oa = wait_output(a, Duration::from_secs(30));
    assert_eq!(oa.status.code(), Some(4), "{}", text(&oa));
    let ob = wait_output(b, Duration::from_secs(30));
    assert!(
        !ob.status.success(),
        "listener should see the peer go: {}",
        text(&ob)
    );
    assert_eq!(leftovers(&d), Vec::<String>::new());
}

#[test]
fn stale_object_of_a_killed_creator_is_swept() {
    use ivcom_core::hypervisor::{host::HostBackend, Hypervisor};
    let t = TempDir::new("sweep");
    let hv = HostBackend::open_dir(t.path()).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    // A live creator's object is never swept, however old.
    let (region, name) = hv.share(0, 8192).unwrap();
    let live = t.path().join(String::from_utf8(name).unwrap());
    std::fs::File::options()
        .write(true)
        .open(&live)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // An object nobody holds (its creator died before the peer mapped it),
    // old enough to be swept.
    let stale = t.path().join(format!("ivcom-{}", "ab".repeat(16)));
    std::fs::write(&stale, b"x").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(hv.sweep(), 1);
    assert!(!stale.exists() && live.exists());
    drop(region);
    assert!(leftovers(t.path().to_str().unwrap()).is_empty());
}
