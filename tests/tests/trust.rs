//! Only the job's own nodes become peers: outsiders against real nodes of
//! the core, and against the ranks of a real `mpirun` job over
//! `--mca btl ivcom,self` while it moves checksummed data.

use ivcom_core::{BackendChoice, Config, Error, Key, Node, PathKind};
use ivcom_tests::hostile::{self, Outcome};
use ivcom_tests::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn cfg(log: &Arc<Mutex<Vec<String>>>) -> Config {
    let l = Arc::clone(log);
    Config {
        backend: BackendChoice::None,
        listen: Some("127.0.0.1".parse().unwrap()),
        log: Some(Arc::new(move |m: &str| {
            l.lock().unwrap().push(m.to_string())
        })),
        ..Config::default()
    }
}

#[test]
fn outsiders_get_nowhere_and_leave_nothing_behind() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let b = Node::new(cfg(&log)).unwrap();
    let recorded = hostile::record_handshake();
    for r in hostile::attack_all(b.card().addr, &recorded) {
        assert!(r.outcome.refused(), "{r}");
        eprintln!("{r}");
    }
    // Nothing became a link, a pending link or an entry.
    assert_eq!(b.pending(), 0);
    assert!(b.accept(Duration::ZERO).unwrap().is_none());
    let refused = log
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.starts_with("refused a connection"))
        .count();
    assert!(refused >= 5, "{:?}", log.lock().unwrap());
}

#[test]
fn a_recorded_handshake_does_not_replay_even_to_its_own_peer() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let psk = Key::random();
    let job = Config {
        psk: Some(psk),
        ..cfg(&log)
    };
    let a = Node::new(job.clone()).unwrap();
    let b = Node::new(job).unwrap();
    let recorded = hostile::record_handshake_to(&a, &b);
    // The same bytes again, to the node they once convinced.
    let o = hostile::replay(b.card().addr, &recorded);
    match &o {
        Outcome::Refused(why) => assert!(why.contains("authentication failed"), "{why}"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn only_admitted_cards_become_peers() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = Node::new(cfg(&log)).unwrap();
    let b = Node::new(cfg(&log)).unwrap();
    let c = Node::new(cfg(&log)).unwrap();
    // b knows a, not c: a links, c is refused (and says why).
    b.admit(a.card()).unwrap();
    let la = a.link(b.card()).unwrap();
    assert_eq!(la.path(), PathKind::Tcp);
    let e = c.link(b.card()).unwrap_err();
    assert!(
        matches!(e.inner(), Error::Auth(_)) && e.to_string().contains("not a peer"),
        "{e}"
    );
    // A node that has b's card but b does not know cannot be told apart
    // from an outsider by its address: its card must be admitted.
    let lb = b.accept(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(lb.peer().id, a.card().id);
    assert!(b.accept(Duration::ZERO).unwrap().is_none());
}

#[test]
fn a_flood_of_idle_connections_does_not_keep_peers_out() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = Node::new(cfg(&log)).unwrap();
    let b = Node::new(cfg(&log)).unwrap();
    b.admit(a.card()).unwrap();
    let addr = b.card().addr;
    // 1000 idle connections held for 4 s; a links to b in the middle.
    let flood = std::thread::spawn(move || hostile::idle_flood(addr, 1000, Duration::from_secs(4)));
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let mut la = a.link(b.card()).expect("a legitimate peer gets in");
    let took = t0.elapsed();
    let mut lb = b.accept(Duration::from_secs(10)).unwrap().unwrap();
    la.send(3, b"through the flood").unwrap();
    let mut m = Vec::new();
    assert_eq!(lb.recv(&mut m, None).unwrap(), 3);
    assert_eq!(m, b"through the flood");
    let f = flood.join().unwrap();
    eprintln!("flood {f:?}; link took {took:?}");
    assert!(f.opened >= 900, "{f:?}");
    // b keeps at most 64 waiting: the rest it closed.
    assert!(f.closed + 64 >= f.opened, "{f:?}");
}

/// The ranks' `[ivcom] rank=R card ...` lines: their listening addresses.
fn rank_addrs(lines: &[String]) -> Vec<std::net::SocketAddr> {
    let mut v: Vec<(u32, std::net::SocketAddr)> = lines
        .iter()
        .filter_map(|l| {
            let i = l.find("[ivcom] rank=")?;
            let rest = &l[i + 13..];
            let (rank, card) = rest.split_once(" card ")?;
            let addr = card.trim().rsplit_once(':').map(|_| card.trim())?;
            // ivcom2:<backend>:<host>:<domain>:<id>:<name>:<addr>
            let addr = addr.splitn(7, ':').nth(6)?;
            Some((rank.parse().ok()?, addr.parse().ok()?))
        })
        .collect();
    v.sort();
    v.dedup();
    v.into_iter().map(|(_, a)| a).collect()
}

#[test]
fn a_hostile_client_during_a_real_job_is_refused_and_the_data_is_intact() {
    require_component();
    // The job runs its suite again and again until the attacks are over
    // (the stop file), for at most 120 s.
    let stop = std::env::temp_dir().join(format!("ivcom-trust-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let mut c = mpirun(2, "ivcom,self");
    c.args(["--mca", "btl_ivcom_verbose", "2"])
        .arg(bin("ivcom-integrity"))
        .args(["--seconds", "120", "--stop-file"])
        .arg(&stop)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("mpirun");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let err = child.stderr.take().unwrap();
    let l2 = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            l2.lock().unwrap().push(l);
        }
    });
    let out = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    // Wait for both ranks' cards.
    let t0 = Instant::now();
    let addrs = loop {
        let a = rank_addrs(&lines.lock().unwrap());
        if a.len() == 2 {
            break a;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no card lines: {:?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let recorded = hostile::record_handshake();
    let mut reports = Vec::new();
    for &a in &addrs {
        reports.extend(hostile::attack_all(a, &recorded));
        let f = hostile::idle_flood(a, 1000, Duration::from_secs(3));
        eprintln!("FLOOD {a}: {f:?}");
        assert!(f.opened >= 900 && f.closed + 64 >= f.opened, "{f:?}");
    }
    for r in &reports {
        eprintln!("{r}");
    }
    // Every attack met the running job; now it may finish.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job ended before the attacks did"
    );
    std::fs::write(&stop, b"").unwrap();
    // The job finishes, with every byte checked.
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_file(&stop);
    reader.join().unwrap();
    let stdout = stdout.join().unwrap();
    let stderr = lines.lock().unwrap().join("\n");
    let text = format!("status {status:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(status.is_some_and(|s| s.success()), "{text}");
    assert!(stdout.contains("INTEGRITY PASS ranks=2"), "{text}");
    assert!(stdout.contains("INTEGRITY ROUNDS"), "{text}");
    for r in &reports {
        assert!(r.outcome.refused(), "{r}\n{text}");
    }
    // The ranks logged their refusals (at least one per attack and rank),
    // and nothing reached ob1 from outside: what the ranks received is what
    // they sent each other.
    let n = stderr
        .lines()
        .filter(|l| l.contains("refused a connection from"))
        .count();
    assert!(n >= reports.len(), "{n} refusals logged\n{text}");
    assert_eq!(
        stats_sum(&stderr, "tx_msgs"),
        stats_sum(&stderr, "rx_msgs"),
        "{text}"
    );
    assert_eq!(
        stats_sum(&stderr, "tx_bytes"),
        stats_sum(&stderr, "rx_bytes"),
        "{text}"
    );
    let paths = path_lines(&stderr);
    assert_eq!(
        paths.len(),
        2,
        "one path per rank and peer, no stranger: {text}"
    );
}

/// `ivcom-xfer listen` against `ivcom-ringpeer --attack A` on one host
/// ring; returns the victim's output.
fn ring_attack(attack: &str) -> Run {
    let dir = std::env::temp_dir().join(format!("ivcom-ringpeer-{attack}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hv = dir.join("hv");
    let card = dir.join("card");
    let mut victim = std::process::Command::new(bin("ivcom-xfer"));
    victim
        .args([
            "listen",
            "--tag-limit",
            "255",
            "--timeout",
            "60",
            "--card-file",
        ])
        .arg(&card)
        .arg("--host-dir")
        .arg(&hv);
    let v = std::thread::spawn(move || run(&mut victim, Duration::from_secs(90)));
    let mut peer = std::process::Command::new(bin("ivcom-ringpeer"));
    peer.args(["--attack", attack, "--card-file"])
        .arg(&card)
        .arg("--host-dir")
        .arg(&hv);
    let p = run(&mut peer, Duration::from_secs(90));
    let v = v.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        p.ok() && p.stdout.contains("RINGPEER"),
        "the hostile peer itself failed:\n{}",
        p.text()
    );
    v
}

/// `ivcom-ringpeer` writes this many well-formed data messages before its
/// attack.
const RINGPEER_GOOD_MESSAGES: u64 = 20;

#[test]
fn a_hostile_ring_peer_breaks_the_link_with_a_named_violation() {
    for (attack, violation) in [
        ("tag255", "tag out of range"),
        ("short", "record length out of range"),
        ("overlen", "record length out of range"),
        ("pastend", "record length out of range"),
        ("padloop", "malformed padding record"),
        ("badkind", "unknown record type"),
        // Rewritten records are read once: the victim sees either a valid
        // record (with whatever the peer last wrote: the application then
        // refuses it), a length past the record, or, had it read every
        // rewritten header in a valid state, the closing tag-255 record.
        ("rewrite", ""),
    ] {
        let v = ring_attack(attack);
        // A clean error exit (3), never a signal; the message names the
        // peer and the violation.
        assert_eq!(v.status, Some(3), "{attack}:\n{}", v.text());
        let fail = v
            .stdout
            .lines()
            .find(|l| l.starts_with("RESULT FAIL"))
            .unwrap_or_else(|| panic!("{attack}: no RESULT line:\n{}", v.text()));
        if violation.is_empty() {
            assert!(
                fail.contains("link broken: record length out of range")
                    || fail.contains("link broken: tag out of range")
                    || fail.contains("protocol: "),
                "{attack}: {fail}"
            );
        } else {
            assert!(
                fail.contains("peer ") && fail.contains(" at ") && fail.contains(violation),
                "{attack}: {fail}"
            );
        }
        // What was delivered before the attack was delivered intact: the
        // victim checks each data message's index and length (a corrupt one
        // fails with "arrived as number N", N messages having passed). Only
        // `rewrite` may end that way, and only inside its rewritten records:
        // the peer overwrites a published payload before the victim copies
        // it out, and the copy (taken once) is what the application refuses.
        match v.stdout.split("arrived as number ").nth(1) {
            None => {}
            Some(rest) if attack == "rewrite" => {
                let n: u64 = rest
                    .split_whitespace()
                    .next()
                    .and_then(|w| w.parse().ok())
                    .unwrap_or_else(|| panic!("{attack}: unreadable count:\n{}", v.text()));
                assert!(
                    n >= RINGPEER_GOOD_MESSAGES,
                    "{attack}: a well-formed message arrived damaged:\n{}",
                    v.text()
                );
            }
            Some(_) => panic!("{attack}: a message arrived damaged:\n{}", v.text()),
        }
        eprintln!("{attack}: {fail}");
    }
}
