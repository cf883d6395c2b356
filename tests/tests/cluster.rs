//! The emulated cluster of docs/design.md: 2 physical hosts x 2 VMs, each VM a
//! network namespace started through a launch agent, 4 ranks. Same-host
//! pairs must take the ring, cross-host pairs TCP, and the integrity suite
//! must pass over that mix.

use ivcom_tests::*;
use std::process::Command;
use std::time::Duration;

/// Two emulated hosts of two VMs each: ranks 0,1 run in vm1,vm2 (hostA),
/// ranks 2,3 in vm3,vm4 (hostB).
const TWO_HOSTS: &str = "hostA:vm1,vm2 hostB:vm3,vm4";

/// The integrity job (every message between every pair checked) on the
/// four ranks of [`TWO_HOSTS`] (cluster `c`) over the BTLs `btl`, with
/// mpirun options `extra`; the test fails unless it passed.
fn integrity_on_two_hosts(c: &Cluster, btl: &str, extra: &[&str]) -> Run {
    let mut cmd = c.mpirun_btl(4, btl);
    cmd.args(extra).arg(bin("ivcom-integrity"));
    let r = run(&mut cmd, Duration::from_secs(240));
    assert!(
        r.ok() && r.stdout.contains("INTEGRITY PASS ranks=4"),
        "{}",
        r.text()
    );
    r
}

/// Each ordered pair of distinct ranks of [`TWO_HOSTS`] has the path
/// `want(same host)` in its verbose path line, or, for `None`, no line
/// (ivcom opened no link).
fn assert_pair_paths(r: &Run, want: impl Fn(bool) -> Option<&'static str>) {
    let lines = path_lines(&r.stderr);
    for a in 0..4u32 {
        for b in (0..4u32).filter(|&b| b != a) {
            let l = lines.iter().find(|l| l.rank == a && l.peer == b);
            match want(a / 2 == b / 2) {
                Some(path) => {
                    let l =
                        l.unwrap_or_else(|| panic!("no path line for {a} -> {b}:\n{}", r.text()));
                    assert_eq!(l.path, path, "{a} -> {b}: {l:?}");
                }
                None => assert!(l.is_none(), "ivcom linked {a} -> {b}: {l:?}"),
            }
        }
    }
}

#[test]
fn two_hosts_two_vms_each_ring_inside_tcp_across() {
    require_component();
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root (docs/design.md: plain processes otherwise, covered by tests/mpi.rs)");
        return;
    }
    let c = Cluster::up(TWO_HOSTS);
    let r = integrity_on_two_hosts(&c, "ivcom,self", &[]);
    assert_pair_paths(&r, |same_host| Some(if same_host { "ring" } else { "tcp" }));
    for l in path_lines(&r.stderr).iter().filter(|l| l.path == "tcp") {
        assert!(l.reason.contains("another host"), "{l:?}");
    }
    // Each VM really is a separate node to Open MPI (own hostname).
    for vm in ["vm1", "vm2", "vm3", "vm4"] {
        assert!(
            r.stderr.contains(&format!("[{vm}:")),
            "no output from {vm}:\n{}",
            r.stderr
        );
    }
    // Both kinds of traffic moved data.
    assert!(stats_sum(&r.stderr, "tx_bytes") > 16 << 20, "{}", r.text());
    assert_eq!(
        stats_sum(&r.stderr, "tx_bytes"),
        stats_sum(&r.stderr, "rx_bytes")
    );
    // The VMs' mount points live in this machine's /dev/shm (the namespaces
    // share it): what they leave must be a directory this machine's own
    // jobs still accept as their default (private), not one they refuse.
    use std::os::unix::fs::PermissionsExt;
    let d = format!("/dev/shm/ivcom-{}", unsafe { libc::getuid() });
    if let Ok(m) = std::fs::metadata(&d) {
        assert_eq!(
            m.permissions().mode() & 0o077,
            0,
            "{d} is reachable by others"
        );
    }
}

/// The queue path across emulated VMs: each VM is a network namespace, so
/// a domain of its own; the co-resident pairs (vm1-vm2, vm3-vm4) talk
/// through each other's receive queue for their VM, the pairs across the
/// hosts over TCP, and every message arrives checked.
#[test]
fn queues_between_the_vms_of_a_host_tcp_across() {
    require_component();
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let c = Cluster::up(TWO_HOSTS);
    let r = integrity_on_two_hosts(
        &c,
        "ivcom,self",
        &["--mca", "btl_ivcom_queue_size", "65536"],
    );
    assert_pair_paths(&r, |same_host| {
        Some(if same_host { "queue" } else { "tcp" })
    });
    for l in path_lines(&r.stderr).iter().filter(|l| l.path == "queue") {
        // one peer in each domain: slot 0 of each queue
        assert!(l.reason.contains("slot 0 of ours, 0 of theirs"), "{l:?}");
    }
    assert_eq!(
        stats_sum(&r.stderr, "tx_bytes"),
        stats_sum(&r.stderr, "rx_bytes")
    );
}

/// With `btl_ivcom_tcp 0` ivcom takes only the peers it may share memory
/// with and leaves the others to Open MPI's btl/tcp: across the two hosts
/// ivcom opens no link at all, inside each host the pairs are on rings,
/// and every byte still arrives (the integrity job checks each message
/// between every pair, so btl/tcp carried the pairs across).
#[test]
fn without_its_tcp_path_ivcom_leaves_other_hosts_to_btl_tcp() {
    require_component();
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let c = Cluster::up(TWO_HOSTS);
    let r = integrity_on_two_hosts(&c, "ivcom,tcp,self", &["--mca", "btl_ivcom_tcp", "0"]);
    // (None: ivcom opened no link, so it printed no path line)
    assert_pair_paths(&r, |same_host| same_host.then_some("ring"));
    // ivcom's links carried only what stayed on each host: the 16 MiB
    // messages of the two pairs inside the hosts, each way, and no more
    // than the job's traffic between those pairs.
    let tx = stats_sum(&r.stderr, "tx_bytes");
    assert!(tx > 2 * (16 << 20), "{}", r.text());
    assert_eq!(tx, stats_sum(&r.stderr, "rx_bytes"));
    assert_eq!(
        stats_values(&r.stderr, "tx_bytes").len(),
        4,
        "one stats line per ring end:\n{}",
        r.text()
    );
}

/// The pid of the `ivcom-integrity` rank running in VM `vm` (network
/// namespace `ivc-<vm>`), once it runs.
fn rank_pid_in(vm: &str) -> Option<i32> {
    let ps = Command::new("pgrep")
        .args(["-f", "ivcom-integrity"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .find(|pid| {
            Command::new("ip")
                .args(["netns", "identify", &pid.to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == format!("ivc-{vm}"))
                .unwrap_or(false)
        })
}

/// A 2-rank job, one rank per VM of one host (a ring), until `act` has
/// done its worst to vm2's rank; returns the job's outcome and the moment
/// `act` struck.
fn job_under(args: &[&str], act: impl FnOnce(i32) + Send + 'static) -> (Run, std::time::Instant) {
    let c = Cluster::up("hostA:vm1,vm2");
    let mut cmd = c.mpirun(2);
    // The runtime must notice the dead VM's daemon too: its idle
    // connections by keepalive (every 2 s here), the others when TCP gives
    // up (the vcluster head node's setting).
    cmd.args(["--mca", "oob_tcp_keepalive_time", "2"])
        .args(["--mca", "oob_tcp_keepalive_intvl", "1"])
        .args(["--mca", "oob_tcp_keepalive_probes", "3"])
        .arg(bin("ivcom-integrity"))
        .args(args);
    let actor = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let pid = loop {
            if let Some(p) = rank_pid_in("vm2") {
                break p;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no rank in vm2");
            std::thread::sleep(Duration::from_millis(100));
        };
        // Let the job run first.
        std::thread::sleep(Duration::from_secs(3));
        let at = std::time::Instant::now();
        act(pid);
        at
    });
    let r = run(&mut cmd, Duration::from_secs(180));
    let at = actor.join().unwrap();
    (r, at)
}

#[test]
fn a_vm_that_freezes_and_drops_off_the_network_ends_the_job_quickly() {
    require_component();
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    // vm2's rank stops and vm2's link goes down: no FIN, no RST, nothing.
    let (r, at) = job_under(&["--forever"], |pid| {
        // SAFETY: kill(2) on a process of this test's job.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let s = Command::new("ip")
            .args(["link", "set", "ivv-vm2", "down"])
            .status()
            .unwrap();
        assert!(s.success());
    });
    let took = at.elapsed();
    assert!(!r.timed_out && r.status != Some(0), "{}", r.text());
    // The surviving rank names the silent peer; mpirun ends well within 30 s.
    assert!(
        r.stderr.contains("no sign of life") && r.stderr.contains("rank 1 on vm2"),
        "{}",
        r.text()
    );
    assert!(
        took < Duration::from_secs(30),
        "mpirun took {took:?}:\n{}",
        r.text()
    );
    eprintln!("job ended {took:?} after the freeze");
}

#[test]
fn a_vm_paused_for_two_seconds_loses_nothing() {
    require_component();
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let (r, _) = job_under(&["--seconds", "10"], |pid| {
        // SAFETY: kill(2) on a process of this test's job.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    assert!(
        r.ok() && r.stdout.contains("INTEGRITY PASS ranks=2"),
        "{}",
        r.text()
    );
}
