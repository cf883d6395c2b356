//! Helpers shared by the end-to-end tests: locating the built component,
//! running `mpirun` with a hard time limit, and reading the component's
//! verbose report.

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

/// Directory holding `mca_btl_ivcom.so` (built by `scripts/build`).
pub fn component_dir() -> PathBuf {
    repo().join("target/ompi")
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
    stderr
        .lines()
        .filter(|l| l.contains("[ivcom] stats "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}
