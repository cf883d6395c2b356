//! The emulated cluster of DESIGN.md: 2 physical hosts x 2 VMs, each VM a
//! network namespace started through a launch agent, 4 ranks. Same-host
//! pairs must take the ring, cross-host pairs TCP, and the integrity suite
//! must pass over that mix.

use ivcom_tests::*;
use std::process::Command;
use std::time::Duration;

struct Cluster;
impl Cluster {
    fn up(spec: &str) -> Cluster {
        let r = run(
            Command::new(repo().join("scripts/vcluster")).args(["up", spec]),
            // `up` waits while another live process owns the cluster.
            Duration::from_secs(600),
        );
        assert!(r.ok(), "vcluster up failed:\n{}", r.text());
        Cluster
    }
}
impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/vcluster"))
            .arg("down")
            .status();
    }
}

#[test]
fn two_hosts_two_vms_each_ring_inside_tcp_across() {
    require_component();
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root (DESIGN.md: plain processes otherwise, covered by tests/mpi.rs)");
        return;
    }
    let _c = Cluster::up("hostA:vm1,vm2 hostB:vm3,vm4");
    let mut cmd = Command::new(repo().join("scripts/vcluster"));
    mpi_env(&mut cmd)
        .args([
            "mpirun",
            "-np",
            "4",
            "--mca",
            "pml",
            "ob1",
            "--mca",
            "btl",
            "ivcom,self",
        ])
        .args(["--mca", "btl_ivcom_verbose", "1"])
        .arg(bin("ivcom-integrity"));
    let r = run(&mut cmd, Duration::from_secs(240));
    assert!(
        r.ok() && r.stdout.contains("INTEGRITY PASS ranks=4"),
        "{}",
        r.text()
    );
    // Ranks 0,1 run in vm1,vm2 (hostA); ranks 2,3 in vm3,vm4 (hostB).
    let host = |rank: u32| rank / 2;
    let lines = path_lines(&r.stderr);
    for a in 0..4u32 {
        for b in 0..4u32 {
            if a == b {
                continue;
            }
            let l = lines
                .iter()
                .find(|l| l.rank == a && l.peer == b)
                .unwrap_or_else(|| panic!("no path line for {a} -> {b}:\n{}", r.text()));
            let want = if host(a) == host(b) { "ring" } else { "tcp" };
            assert_eq!(l.path, want, "{a} -> {b}: {l:?}");
            if want == "tcp" {
                assert!(l.reason.contains("another host"), "{l:?}");
            }
        }
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
}
