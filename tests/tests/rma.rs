//! MPI RMA over `--mca btl ivcom,self`: tests/c/ivcom-rma.c (Put, Get,
//! Accumulate, Fetch_and_op; fence and lock/unlock; every value checked)
//! built with this Open MPI's mpicc and run on 2 to 4 ranks.
//!
//! Open MPI 5.0 (no osc/pt2pt): osc/rdma wraps ivcom, which has no put/get,
//! in the BTL base's active-message RDMA emulation, whose requests and
//! replies travel on tags of the base trigger table through ivcom; the test
//! checks that osc/rdma was selected and took ivcom as its BTL, also with
//! the default osc selection. Open MPI 4.1: osc/pt2pt over ob1 over ivcom
//! (`--mca osc pt2pt`: when no BTL offers RDMA, Debian's 4.1 otherwise
//! selects osc/ucx, which fails in MPI_Win_create here; tcp,self fails the
//! same way, vader,self works through osc/rdma).
//! In both, ivcom's counters must show the traffic.

use ivcom_tests::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

/// The RMA program, built once per run with this Open MPI's mpicc.
fn rma_program() -> PathBuf {
    static PROG: OnceLock<PathBuf> = OnceLock::new();
    PROG.get_or_init(|| mpicc_program("ivcom-rma")).clone()
}

/// osc component arguments for this series (see the module comment).
fn osc_args(default_selection: bool) -> Vec<&'static str> {
    let mut a = vec!["--mca", "osc_base_verbose", "100"];
    if ompi_major() >= 5 {
        if !default_selection {
            a.extend(["--mca", "osc", "rdma"]);
        }
    } else {
        a.extend(["--mca", "osc", "pt2pt"]);
    }
    a
}

fn rma(np: usize, default_selection: bool, extra: &[&str]) -> Run {
    require_component();
    let prog = rma_program();
    let mut c = mpirun(np, "ivcom,self");
    c.args(["--mca", "btl_ivcom_verbose", "1"])
        .args(osc_args(default_selection))
        .args(extra)
        .arg(prog);
    run(&mut c, LIMIT)
}

/// The job passed, every ordered pair used `path`, ivcom carried the RMA
/// traffic, and (5.0) osc/rdma ran over ivcom.
fn assert_rma(r: &Run, np: usize, path: &str) {
    assert!(
        r.ok() && r.stdout.contains(&format!("RMA PASS ranks={np}")),
        "{}",
        r.text()
    );
    for phase in ["active target (fence)", "passive target"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.contains(phase) && l.contains("put get accumulate fetch_and_op ok")),
            "{phase} missing:\n{}",
            r.text()
        );
    }
    let lines = path_lines(&r.stderr);
    for a in 0..np as u32 {
        for b in 0..np as u32 {
            if a != b {
                let l = lines
                    .iter()
                    .find(|l| l.rank == a && l.peer == b)
                    .unwrap_or_else(|| panic!("no path line {a} -> {b}:\n{}", r.text()));
                assert_eq!(l.path, path, "{l:?}");
            }
        }
    }
    // The large Put/Get blocks alone are 300001 bytes per rank and phase.
    assert!(
        stats_sum(&r.stderr, "tx_bytes") > (np as u64) * 4 * 300_001,
        "ivcom moved too little:\n{}",
        r.text()
    );
    assert_eq!(
        stats_sum(&r.stderr, "tx_bytes"),
        stats_sum(&r.stderr, "rx_bytes")
    );
    if ompi_major() >= 5 {
        for rank_pid in r
            .stderr
            .lines()
            .filter(|l| l.contains("select: component rdma selected"))
            .map(|l| l.split(']').next().unwrap_or("").to_string())
        {
            assert!(
                r.stderr
                    .lines()
                    .any(|l| l.starts_with(&rank_pid) && l.contains("found alternate btl ivcom")),
                "{rank_pid}: osc/rdma did not take ivcom:\n{}",
                r.text()
            );
        }
        let selected = r.stderr.matches("select: component rdma selected").count();
        assert!(selected >= np, "osc/rdma not selected:\n{}", r.text());
    }
}

#[test]
fn rma_2_ranks_on_the_ring() {
    let r = rma(2, false, &[]);
    assert_rma(&r, 2, "ring");
}

#[test]
fn rma_4_ranks_on_the_ring() {
    let r = rma(4, false, &[]);
    assert_rma(&r, 4, "ring");
}

#[test]
fn rma_2_ranks_over_ivcom_tcp() {
    let r = rma(2, false, &["--mca", "btl_ivcom_backend", "none"]);
    assert_rma(&r, 2, "tcp");
}

#[test]
fn rma_with_a_small_ring_and_fragments() {
    // Large operations in 16000-byte pieces through a 64 KiB ring that
    // fills constantly (descriptors wait for room, then go).
    let r = rma(
        3,
        false,
        &[
            "--mca",
            "btl_ivcom_ring_size",
            "65536",
            "--mca",
            "btl_ivcom_max_send_size",
            "16000",
            "--mca",
            "btl_ivcom_eager_limit",
            "4096",
        ],
    );
    assert_rma(&r, 3, "ring");
}

#[test]
fn rma_with_the_default_osc_selection() {
    // Open MPI 5.0 picks osc/rdma over ivcom by itself; 4.1 still needs
    // `--mca osc pt2pt` (module comment).
    let r = rma(2, true, &[]);
    assert_rma(&r, 2, "ring");
}

/// RMA on 2 ranks under a share limit of 100 KiB: the pair gets 32 KiB
/// rings whose records (16 KiB - 8) hold less than the default
/// btl_max_send_size (64 KiB); `extra` arguments added.
fn rma_on_32_kib_rings(extra: &[&str]) {
    let mut args = vec!["--mca", "btl_ivcom_shm_limit", "102400"];
    args.extend_from_slice(extra);
    let r = rma(2, false, &args);
    assert_rma(&r, 2, "ring");
    assert!(
        path_lines(&r.stderr)
            .iter()
            .all(|l| l.reason.contains("rings of 32 KiB, records of 15 KiB")),
        "{}",
        r.text()
    );
}

#[test]
fn rma_on_rings_shrunk_below_the_max_send_size() {
    // Open MPI 5's active-message RDMA allocates sends of
    // btl_max_send_size; each goes as a run of records and the peer takes
    // it whole. (Before, the component refused such a send and RMA could
    // not proceed.) Open MPI 4.1's osc/pt2pt sends through ob1, which cuts
    // to the records.
    rma_on_32_kib_rings(&[]);
}

#[test]
fn rma_on_rings_shrunk_to_fit_with_a_matching_max_send_size() {
    // btl_ivcom_max_send_size within the records: every send is one record.
    rma_on_32_kib_rings(&["--mca", "btl_ivcom_max_send_size", "15360"]);
}
