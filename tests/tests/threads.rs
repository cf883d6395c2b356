//! MPI_THREAD_MULTIPLE over btl/ivcom: the threaded integrity program
//! (`ivcom-threads`: 4 to 8 threads per rank, each with its own
//! communicator and tags, every size to 16 MiB, blocking and non-blocking,
//! any-source receives, probe, every byte checked) on the ring, on the
//! emulated cluster (ring and TCP at once), many times over (races are
//! rare); mpi4py with its default start (MPI_THREAD_MULTIPLE); and jobs
//! over `--mca btl ivcom` alone (ivcom reaches the process itself).

use ivcom_tests::*;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

fn threads_job(np: usize, btls: &str, threads: u32) -> Run {
    require_component();
    let mut c = mpirun(np, btls);
    c.args(["--mca", "btl_ivcom_verbose", "1"])
        .arg(bin("ivcom-threads"))
        .args(["--threads", &threads.to_string()]);
    run(&mut c, LIMIT)
}

fn assert_pass(r: &Run, np: usize, threads: u32) {
    assert!(
        r.ok()
            && r.stdout
                .contains(&format!("THREADS PASS ranks={np} threads={threads}")),
        "{}",
        r.text()
    );
    // Every message went through ivcom and arrived.
    assert!(stats_sum(&r.stderr, "tx_msgs") > 0, "{}", r.text());
    assert_eq!(
        stats_sum(&r.stderr, "tx_bytes"),
        stats_sum(&r.stderr, "rx_bytes"),
        "{}",
        r.text()
    );
}

#[test]
fn threads_on_the_ring_again_and_again() {
    // 24 runs: 2 and 4 ranks, 4 and 8 threads each.
    for i in 0..24 {
        let np = if i % 2 == 0 { 2 } else { 4 };
        let threads = if i % 4 < 2 { 4 } else { 8 };
        let r = threads_job(np, "ivcom,self", threads);
        assert_pass(&r, np, threads);
        let lines = path_lines(&r.stderr);
        assert!(
            lines.iter().all(|l| l.path == "ring"),
            "run {i}: {}",
            r.text()
        );
    }
}

#[test]
fn threads_over_ivcom_tcp() {
    for np in [2, 4] {
        let mut c = mpirun(np, "ivcom,self");
        c.args(["--mca", "btl_ivcom_backend", "none"])
            .args(["--mca", "btl_ivcom_verbose", "1"])
            .arg(bin("ivcom-threads"))
            .args(["--threads", "4"]);
        let r = run(&mut c, LIMIT);
        assert_pass(&r, np, 4);
        assert!(
            path_lines(&r.stderr).iter().all(|l| l.path == "tcp"),
            "{}",
            r.text()
        );
    }
}

/// `MPI_THREAD_MULTIPLE` on the queue path: threads of a rank poll the
/// links that share its one receive queue; one that finds another thread
/// at the queue returns, and the other sets its messages aside for it.
#[test]
fn threads_on_receive_queues() {
    for (np, threads) in [(2, 4), (4, 4), (4, 8)] {
        let mut c = mpirun(np, "ivcom,self");
        c.args(["--mca", "btl_ivcom_queue_size", "65536"])
            .args(["--mca", "btl_ivcom_verbose", "1"])
            .arg(bin("ivcom-threads"))
            .args(["--threads", &threads.to_string()]);
        let r = run(&mut c, LIMIT);
        assert_pass(&r, np, threads);
        assert!(
            path_lines(&r.stderr).iter().all(|l| l.path == "queue"),
            "{}",
            r.text()
        );
    }
}

#[test]
fn threads_over_ivcom_alone_without_self() {
    // `--mca btl ivcom`: messages of a rank to itself (collectives) go
    // through ivcom's own loopback.
    let r = threads_job(2, "ivcom", 4);
    assert_pass(&r, 2, 4);
    let mut c = mpirun(3, "ivcom");
    c.arg(bin("ivcom-integrity"));
    let r = run(&mut c, LIMIT);
    assert!(
        r.ok() && r.stdout.contains("INTEGRITY PASS ranks=3"),
        "{}",
        r.text()
    );
}

/// A Python with mpi4py from PyPI, in a virtual environment under
/// target/ (made once per Python version: the Debian 13 root's Python
/// differs from the host's).
fn mpi4py() -> std::path::PathBuf {
    let version = Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| {
            panic!("python3 is not installed: apt-get install python3 python3-venv (scripts/deps test)")
        });
    let venv = repo().join(format!("target/py-mpi4py-{version}"));
    let py = venv.join("bin/python");
    let ok = |py: &std::path::Path| {
        Command::new(py)
            .args(["-c", "import mpi4py"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok(&py) {
        let r = run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            Duration::from_secs(120),
        );
        assert!(r.ok(), "python3 -m venv:\n{}", r.text());
        let r = run(
            Command::new(venv.join("bin/pip")).args(["install", "-q", "mpi4py"]),
            Duration::from_secs(900),
        );
        assert!(r.ok(), "pip install mpi4py:\n{}", r.text());
    }
    assert!(ok(&py), "mpi4py does not import");
    py
}

#[test]
fn mpi4py_with_its_default_start() {
    require_component();
    let py = mpi4py();
    // As a new user would type it: mpi4py initializes MPI with
    // MPI_THREAD_MULTIPLE, and `--mca btl ivcom` carries everything.
    let mut c = mpirun(2, "ivcom");
    c.arg(&py).args([
        "-c",
        // One write per line: with PYTHONUNBUFFERED set (as CI machines
        // often have it), print() writes its pieces separately and the
        // two ranks' output interleaves mid-line.
        "import sys; from mpi4py import MPI; \
         assert MPI.Query_thread() == MPI.THREAD_MULTIPLE; \
         sys.stdout.write('ALLREDUCE %d\\n' % MPI.COMM_WORLD.allreduce(1))",
    ]);
    let r = run(&mut c, LIMIT);
    assert!(r.ok(), "{}", r.text());
    assert_eq!(r.stdout.matches("ALLREDUCE 2").count(), 2, "{}", r.text());
    // 4 threads per rank exchanging checked messages at once.
    let script = repo().join("tests/py/threads.py");
    let mut c = mpirun(2, "ivcom,self");
    c.args(["--mca", "btl_ivcom_verbose", "1"])
        .arg(&py)
        .arg(&script);
    let r = run(&mut c, LIMIT);
    assert!(
        r.ok() && r.stdout.contains("PY THREADS PASS"),
        "{}",
        r.text()
    );
    assert!(
        path_lines(&r.stderr).iter().all(|l| l.path == "ring"),
        "{}",
        r.text()
    );
}

#[test]
fn threads_on_the_emulated_cluster_ring_and_tcp_at_once() {
    require_component();
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let c = Cluster::up("hostA:vm1,vm2 hostB:vm3,vm4");
    for round in 0..4 {
        let threads = if round % 2 == 0 { 4 } else { 8 };
        let mut cmd = c.mpirun(4);
        cmd.arg(bin("ivcom-threads"))
            .args(["--threads", &threads.to_string()]);
        let r = run(&mut cmd, Duration::from_secs(300));
        assert_pass(&r, 4, threads);
        let lines = path_lines(&r.stderr);
        // ranks 0,1 on hostA, 2,3 on hostB: both kinds of path carried
        // the threads' traffic
        assert!(lines.iter().any(|l| l.path == "ring"), "{}", r.text());
        assert!(lines.iter().any(|l| l.path == "tcp"), "{}", r.text());
    }
}

#[test]
fn a_peer_lost_while_threads_send_ends_the_job_without_a_crash() {
    require_component();
    // 3 ranks, 4 threads each, many rounds; one rank is killed mid-run.
    let mut c = mpirun(3, "ivcom,self");
    c.arg(bin("ivcom-threads"))
        .args(["--threads", "4", "--rounds", "100000"]);
    let killer = kill_newest("ivcom-threads --threads 4 --rounds 100000");
    let r = run(&mut c, Duration::from_secs(120));
    let at = killer.join().unwrap().expect("no rank to kill");
    assert!(!r.timed_out, "the job hung:\n{}", r.text());
    assert_ne!(r.status, Some(0), "{}", r.text());
    assert!(at.elapsed() < Duration::from_secs(30), "{:?}", at.elapsed());
    // The survivors ended by the job's abort, not by a crash of their own.
    assert!(!r.stderr.contains("Segmentation fault"), "{}", r.text());
    assert!(!r.stderr.contains("signal 11"), "{}", r.text());
}
