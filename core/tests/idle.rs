//! An idle node's acceptor thread sleeps until something happens (a rank
//! that waits for nothing is not woken ten times a second: noise on its
//! core), and a node stops at once. Its own test binary, so that this
//! process holds exactly one node.

use ivcom_core::{BackendChoice, Config, Node};
use std::time::{Duration, Instant};

/// Voluntary context switches of each thread of this process named
/// `name`.
fn switches(name: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        out.push(n);
    }
    out
}

// One test, so that one node lives at a time in this process.
#[test]
fn an_idle_node_sleeps_stops_at_once_and_still_refuses_the_silent() {
    an_idle_node_sleeps_and_stops_at_once();
    a_silent_connection_is_refused_at_its_deadline();
}

fn an_idle_node_sleeps_and_stops_at_once() {
    let node = Node::new(Config {
        backend: BackendChoice::None,
        listen: Some("127.0.0.1".parse().unwrap()),
        ..Config::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before = switches("ivcom-accept");
    assert_eq!(before.len(), 1, "one acceptor thread: {before:?}");
    std::thread::sleep(Duration::from_millis(1000));
    let after = switches("ivcom-accept");
    // (a poll with a 100 ms timeout woke 10 times in this second)
    assert!(
        after[0] - before[0] <= 1,
        "the idle acceptor woke {} times in a second",
        after[0] - before[0]
    );
    let t = Instant::now();
    drop(node);
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "stopping took {:?}",
        t.elapsed()
    );
    assert!(switches("ivcom-accept").is_empty());
}

/// The acceptor that sleeps until the oldest waiting connection's deadline
/// still refuses a connection that says nothing, at that deadline.
fn a_silent_connection_is_refused_at_its_deadline() {
    use std::io::Read;
    let node = Node::new(Config {
        backend: BackendChoice::None,
        listen: Some("127.0.0.1".parse().unwrap()),
        connect_timeout: Duration::from_millis(400),
        ..Config::default()
    })
    .unwrap();
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(node.card().addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    // the refusal, then the close
    let _ = s.read_to_end(&mut got);
    let took = t0.elapsed();
    assert!(
        String::from_utf8_lossy(&got).contains("too slow to authenticate"),
        "{got:?}"
    );
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(1500),
        "refused after {took:?}"
    );
}
