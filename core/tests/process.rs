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
        // Private: the host backend refuses a directory others can enter.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&p)
            .unwrap();
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
    stream_100k_with(tag, backend, path, seed, &[]);
}

fn stream_100k_with(tag: &str, backend: &str, path: &str, seed: &str, extra: &[&str]) {
    let t = TempDir::new(tag);
    let d = t.path().to_str().unwrap();
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    let (a, b) = pair(tag, d, d, &args);
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
fn queue_100k_random_messages_up_to_4mib() {
    stream_100k_with(
        "queue100k",
        "host",
        "queue",
        "9",
        &["--queue-size", "65536"],
    );
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
    // The offering side cannot size the ring's memory (a file size limit
    // below it: ftruncate fails); the pair stays on TCP and says why.
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
    kill_mid_stream_with(kill_listener, backend, &[]);
}

fn kill_mid_stream_with(kill_listener: bool, backend: &str, extra: &[&str]) {
    let t = TempDir::new(&format!("kill-{kill_listener}-{backend}-{}", extra.len()));
    let d = t.sub("hv");
    let card = t.sub("card");
    let mut la = vec![
        "listen",
        "--card-file",
        &card,
        "--host-dir",
        &d,
        "--backend",
        backend,
    ];
    la.extend_from_slice(extra);
    let mut b = spawn(&la);
    let mut ca = vec![
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
    ];
    ca.extend_from_slice(extra);
    let mut a = spawn(&ca);
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
fn sigkill_listener_queue() {
    kill_mid_stream_with(true, "host", &["--queue-size", "65536"]);
}

#[test]
fn sigkill_connector_queue() {
    kill_mid_stream_with(false, "host", &["--queue-size", "65536"]);
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
fn stale_socket_of_a_killed_sharer_is_swept() {
    use ivcom_core::hypervisor::{host::HostBackend, Hypervisor};
    let t = TempDir::new("sweep");
    let hv = HostBackend::open_dir(t.path()).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    let age = |p: &Path| {
        // The socket's own time, not its target's: set through utimensat
        // without following (a socket cannot be opened for writing).
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let secs = old.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as libc::time_t;
        let ts = [
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
        ];
        // SAFETY: a NUL-terminated path and two timespecs.
        let r = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    };
    // A live sharer's hand-over socket is never swept, however old.
    let (region, desc) = hv.share(0, 8192).unwrap();
    let desc = String::from_utf8(desc).unwrap();
    let live = t.path().join(desc.split_once(':').unwrap().0);
    assert!(live.exists());
    age(&live);
    // A socket nobody serves (its sharer died before the peer fetched the
    // region), old enough to be swept.
    let stale = t.path().join(format!("ivcom-{}.sock", "ab".repeat(16)));
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    age(&stale);
    assert_eq!(hv.sweep(), 1);
    assert!(!stale.exists() && live.exists());
    drop(region);
    assert!(leftovers(t.path().to_str().unwrap()).is_empty());
}

/// An emulated VM for the silent-peer tests: a network namespace joined to
/// this one by a veth pair, which can be cut. `None` without root.
struct Vm {
    ns: String,
    outer: String,
    ip_in: String,
    ip_out: String,
}

impl Vm {
    fn new(tag: &str) -> Option<Vm> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: network namespaces need root");
            return None;
        }
        // The tests of this file run at once, in one process: each VM gets
        // its own subnet and interface (shared ones made the emulated VMs
        // take each other's routes and links).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4;
        let k = 20 + (std::process::id() % 58) * 4 + n;
        let vm = Vm {
            ns: format!("ivt-{tag}-{}", std::process::id()),
            outer: format!("ivt{k}{}", &tag[..1]),
            ip_in: format!("10.251.{k}.2"),
            ip_out: format!("10.251.{k}.1"),
        };
        let sh = |c: &str| {
            let s = Command::new("sh").arg("-c").arg(c).status().unwrap();
            assert!(s.success(), "{c}");
        };
        let _ = Command::new("ip").args(["link", "del", &vm.outer]).output();
        let _ = Command::new("ip").args(["netns", "del", &vm.ns]).output();
        sh(&format!("ip netns add {}", vm.ns));
        sh(&format!(
            "ip link add {o} type veth peer name {o}i && ip link set {o}i netns {ns} \
             && ip -n {ns} link set {o}i name eth0 && ip -n {ns} addr add {ipi}/24 dev eth0 \
             && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up \
             && ip addr add {ipo}/24 dev {o} && ip link set {o} up",
            o = vm.outer,
            ns = vm.ns,
            ipi = vm.ip_in,
            ipo = vm.ip_out
        ));
        // Until the path works (a connect to a closed port is refused).
        for _ in 0..50 {
            if std::net::TcpStream::connect_timeout(
                &format!("{}:9", vm.ip_in).parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(vm)
    }

    fn cut(&self) {
        let s = Command::new("ip")
            .args(["link", "set", &self.outer, "down"])
            .status()
            .unwrap();
        assert!(s.success());
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A listener in an emulated VM and a connector here, streaming; returns
/// them once the stream runs.
fn stream_to_vm(vm: &Vm, t: &TempDir, backend: &str, count: &str) -> (Child, Child) {
    let d = t.sub("hv");
    let card = t.sub("card");
    let b = spawn_with(
        &["ip", "netns", "exec", &vm.ns],
        &[
            "listen",
            "--card-file",
            &card,
            "--host-dir",
            &d,
            "--backend",
            backend,
            "--listen-ip",
            &vm.ip_in,
            "--timeout",
            "120",
        ],
    );
    let mut a = spawn(&[
        "connect",
        "--card-file",
        &card,
        "--host-dir",
        &d,
        "--backend",
        backend,
        "--listen-ip",
        &vm.ip_out,
        "--count",
        count,
        "--echo",
        "10",
        "--max-size",
        "65536",
        "--timeout",
        "120",
    ]);
    let mut out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let want = if backend == "none" {
        "PATH tcp"
    } else {
        "PATH ring"
    };
    assert!(line.starts_with(want), "connector said: {line}");
    // Keep reading the connector's output (its pipe must not fill).
    std::thread::spawn(move || for _ in out.lines() {});
    (a, b)
}

/// The peer's VM freezes and is cut off (its process stopped, its link
/// down): no FIN, no RST, nothing. The sender must say so within seconds.
fn silent_peer_is_detected(backend: &str) {
    let Some(vm) = Vm::new(if backend == "none" { "tcp" } else { "ring" }) else {
        return;
    };
    let t = TempDir::new(&format!("silent-{backend}"));
    let (a, mut b) = stream_to_vm(&vm, &t, backend, "0");
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(b.id() as i32, libc::SIGSTOP) };
    vm.cut();
    let t0 = Instant::now();
    let o = wait_output(a, Duration::from_secs(30));
    let took = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(b.id() as i32, libc::SIGKILL) };
    let _ = b.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(err.contains("no sign of life"), "{}", text(&o));
    // The timeout is 4 s; allow for the last acknowledgement before the cut
    // and a loaded machine.
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    eprintln!("{backend}: detected after {took:?}: {}", err.trim());
}

#[test]
fn a_frozen_cut_off_peer_is_detected_on_the_ring() {
    silent_peer_is_detected("host");
}

#[test]
fn a_frozen_cut_off_peer_is_detected_over_tcp() {
    silent_peer_is_detected("none");
}

/// A peer paused for 2 s (less than the timeout), its network up: the
/// stream goes on with every byte intact.
fn brief_pause_is_not_death(backend: &str) {
    let Some(vm) = Vm::new(if backend == "none" { "ptcp" } else { "pring" }) else {
        return;
    };
    let t = TempDir::new(&format!("pause-{backend}"));
    let (a, b) = stream_to_vm(&vm, &t, backend, "200000");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(b.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: as above.
    unsafe { libc::kill(b.id() as i32, libc::SIGCONT) };
    let oa = wait_output(a, Duration::from_secs(120));
    // The sender was still streaming when the peer stopped: the pause held
    // it up (its ring or socket filled), and it went on afterwards.
    assert!(
        stopped.elapsed() >= Duration::from_millis(1900),
        "the stream ended before the pause"
    );
    let ob = wait_output(b, Duration::from_secs(60));
    assert!(oa.status.success(), "connector:\n{}", text(&oa));
    assert!(ob.status.success(), "listener:\n{}", text(&ob));
    let b_out = String::from_utf8_lossy(&ob.stdout).into_owned();
    assert!(
        b_out.contains("RESULT PASS received msgs=200000"),
        "{b_out}"
    );
}

#[test]
fn a_peer_paused_for_less_than_the_timeout_loses_nothing_on_the_ring() {
    brief_pause_is_not_death("host");
}

#[test]
fn a_peer_paused_for_less_than_the_timeout_loses_nothing_over_tcp() {
    brief_pause_is_not_death("none");
}
