//! Helpers shared by the end-to-end tests: locating the built component,
//! running `mpirun` with a hard time limit, and reading the component's
//! verbose report.

pub mod hostile;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Builds the C MPI program `tests/c/<name>.c` with this Open MPI's
/// `mpicc` (warnings are errors) into `target/<name>-<series>/` and returns
/// its path.
pub fn mpicc_program(name: &str) -> PathBuf {
    let dir = repo().join(format!("target/{name}-{}", ompi_major()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    let r = run(
        Command::new("mpicc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&out)
            .arg(repo().join(format!("tests/c/{name}.c"))),
        Duration::from_secs(120),
    );
    assert!(r.ok(), "mpicc {name}.c:\n{}", r.text());
    out
}

/// Major version of the Open MPI on this machine (or in this root): 4 or 5.
pub fn ompi_major() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new("ompi_info")
            .args(["--parsable", "--version"])
            .output()
            .expect("ompi_info (apt-get install openmpi-bin)");
        let text = String::from_utf8_lossy(&out.stdout);
        // "ompi:version:full:4.1.4" (4.1) or "Open MPI v5.0.7" (5.0)
        text.split(|c: char| c == ':' || c == 'v' || c.is_whitespace())
            .find_map(|w| w.split('.').next()?.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no Open MPI version in ompi_info's output: {text}"))
    })
}

/// Open MPI's shared-memory BTL: vader in 4.1, sm in 5.0.
pub fn shm_btl() -> &'static str {
    if ompi_major() >= 5 {
        "sm"
    } else {
        "vader"
    }
}

/// Directory holding `mca_btl_ivcom.so` (built by `scripts/build`):
/// target/ompi for Open MPI 4.1, target/ompi5 for 5.0, or
/// `$IVCOM_COMPONENT_DIR`.
pub fn component_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IVCOM_COMPONENT_DIR") {
        return PathBuf::from(d);
    }
    repo().join(if ompi_major() >= 5 {
        "target/ompi5"
    } else {
        "target/ompi"
    })
}

/// Open MPI's own component directory.
pub fn ompi_component_dir() -> String {
    let out = Command::new("ompi_info")
        .args(["--parsable", "--path", "pkglibdir"])
        .output()
        .expect("ompi_info (apt-get install openmpi-bin)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("path:pkglibdir:"))
        .unwrap_or("/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3")
        .to_string()
}

/// Panics with a clear message unless the component was built.
pub fn require_component() {
    let so = component_dir().join("mca_btl_ivcom.so");
    assert!(
        so.exists(),
        "{} is missing: run scripts/build first",
        so.display()
    );
}

/// A release binary of this workspace.
pub fn bin(name: &str) -> PathBuf {
    let p = repo().join("target/release").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/build first",
        p.display()
    );
    p
}

/// True when running as root (namespaces, tmpfs mounts).
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Environment every mpirun of the tests gets.
pub fn mpi_env(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env(
            "OMPI_MCA_mca_base_component_path",
            format!("{}:{}", component_dir().display(), ompi_component_dir()),
        )
        // PMIx (Open MPI 5) reads the path above too and complains about
        // every file there that is not a PMIx component.
        .env("PMIX_MCA_mca_base_component_show_load_errors", "0");
    if ompi_major() >= 5 {
        // Open MPI 5.0.7's btl/tcp gives a dual-stack interface (this
        // machine's eth0) only its IPv6 address, which its reachability
        // check then rejects between ranks of one host ("Unable to find
        // reachable pairing"): tcp over IPv4 only, for the tcp baselines.
        cmd.env("OMPI_MCA_btl_tcp_disable_family", "6");
    }
    cmd
}

/// Result of a command run with a time limit.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Run {
    /// stdout and stderr, for assertion messages.
    pub fn text(&self) -> String {
        format!(
            "exit {:?} after {:?}{}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.elapsed,
            if self.timed_out { " (TIMED OUT)" } else { "" },
            self.stdout,
            self.stderr
        )
    }
    /// Exited with status 0 in time.
    pub fn ok(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }
}

/// Runs `cmd`, killing its whole process group after `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Run {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let t0 = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel::<Output>();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().expect("wait"));
    });
    let (out, timed_out) = match rx.recv_timeout(limit) {
        Ok(o) => (o, false),
        Err(_) => {
            // SAFETY: signals our own child's process group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            (rx.recv().expect("output after kill"), true)
        }
    };
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: t0.elapsed(),
        timed_out,
    }
}

/// An `mpirun` command over the given BTL list with `np` ranks on this node.
pub fn mpirun(np: usize, btl: &str) -> Command {
    let mut c = Command::new("mpirun");
    mpi_env(&mut c);
    c.args([
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        &np.to_string(),
    ])
    .args(["--mca", "pml", "ob1", "--mca", "btl", btl]);
    c
}

/// The emulated cluster (`scripts/vcluster`), up for as long as this
/// guard lives.
pub struct Cluster;
impl Cluster {
    /// `scripts/vcluster up SPEC`, e.g. `"hostA:vm1,vm2 hostB:vm3,vm4"`.
    pub fn up(spec: &str) -> Cluster {
        let r = run(
            Command::new(repo().join("scripts/vcluster")).args(["up", spec]),
            // `up` waits while another live process owns the cluster.
            Duration::from_secs(600),
        );
        assert!(r.ok(), "vcluster up failed:\n{}", r.text());
        Cluster
    }

    /// `mpirun` on the cluster's head node, `np` ranks over
    /// `--mca btl ivcom,self` with the verbose path report.
    pub fn mpirun(&self, np: usize) -> Command {
        self.mpirun_btl(np, "ivcom,self")
    }

    /// [`Cluster::mpirun`] over the BTLs `btl` (a list with ivcom).
    pub fn mpirun_btl(&self, np: usize, btl: &str) -> Command {
        let mut c = Command::new(repo().join("scripts/vcluster"));
        mpi_env(&mut c)
            .args(["mpirun", "-np", &np.to_string()])
            .args(["--mca", "pml", "ob1", "--mca", "btl", btl])
            .args(["--mca", "btl_ivcom_verbose", "1"]);
        c
    }
}
impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/vcluster"))
            .arg("down")
            .status();
    }
}

/// Kills (SIGKILL) the newest process whose command line matches
/// `pattern` (`pgrep -n -f`), 2 s after it first shows up, from a thread;
/// the thread returns when it struck, or `None` when no such process
/// appeared within 30 s.
pub fn kill_newest(pattern: &'static str) -> std::thread::JoinHandle<Option<Instant>> {
    std::thread::spawn(move || {
        for _ in 0..300 {
            std::thread::sleep(Duration::from_millis(100));
            let out = Command::new("pgrep").args(["-n", "-f", pattern]).output();
            if let Ok(o) = out {
                let pid = String::from_utf8_lossy(&o.stdout).trim().to_string();
                if !pid.is_empty() {
                    std::thread::sleep(Duration::from_secs(2));
                    let _ = Command::new("kill").args(["-9", &pid]).status();
                    return Some(Instant::now());
                }
            }
        }
        None
    })
}

/// `len` deterministic bytes from `seed` (xorshift64, little-endian words):
/// what the MPI test programs send, so that the receiver can recompute and
/// compare every byte.
pub fn xorshift_bytes(mut s: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let take = (len - v.len()).min(8);
        v.extend_from_slice(&s.to_le_bytes()[..take]);
    }
    v
}

/// One `[ivcom] path rank=R peer=P path=X reason="..."` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathLine {
    pub rank: u32,
    pub peer: u32,
    pub path: String,
    pub reason: String,
}

/// The path lines of a verbose run (`--mca btl_ivcom_verbose 1`).
pub fn path_lines(stderr: &str) -> Vec<PathLine> {
    stderr
        .lines()
        .filter_map(|l| {
            let i = l.find("[ivcom] path ")?;
            let rest = &l[i + 13..];
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(str::to_string)
            };
            Some(PathLine {
                rank: field("rank=")?.parse().ok()?,
                peer: field("peer=")?.parse().ok()?,
                path: field("path=")?,
                reason: rest
                    .split_once("reason=")
                    .map(|x| x.1.trim_matches('"').to_string())?,
            })
        })
        .collect()
}

/// Sum of a counter over the `[ivcom] stats` lines.
pub fn stats_sum(stderr: &str, key: &str) -> u64 {
    stats_values(stderr, key).iter().sum()
}

/// A counter's value on each `[ivcom] stats` line (one per link end).
pub fn stats_values(stderr: &str, key: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("[ivcom] stats "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .filter_map(|v| v.parse::<u64>().ok())
        .collect()
}
