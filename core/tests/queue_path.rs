//! Links on the queue path between nodes of this process (the host
//! backend's domain is the network namespace: every node here is in one
//! domain, so a node's queue for it carries all the others' slots).

use ivcom_core::{Card, Config, Error, Link, Node, PathKind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    Dir(std::env::temp_dir().join(format!("ivcom-qp-{tag}-{}", std::process::id())))
}

fn cfg(d: &Dir, queue: usize) -> Config {
    Config {
        host_dir: Some(d.0.clone()),
        queue_size: Some(queue),
        listen: Some("127.0.0.1".parse().unwrap()),
        ..Config::default()
    }
}

/// `n` nodes with queues of `queue` bytes, each admitting all the others.
fn nodes(d: &Dir, n: usize, queue: usize) -> Vec<Node> {
    let nodes: Vec<Node> = (0..n).map(|_| Node::new(cfg(d, queue)).unwrap()).collect();
    for a in &nodes {
        for b in &nodes {
            if a.card().id != b.card().id {
                a.admit(b.card()).unwrap();
            }
        }
    }
    nodes
}

/// Links every node to every other one: `links[i][j]` is i's link to j.
fn mesh(nodes: &[Node]) -> Vec<Vec<Option<Link>>> {
    let cards: Vec<Card> = nodes.iter().map(|n| n.card().clone()).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let cards = &cards;
                s.spawn(move || {
                    cards
                        .iter()
                        .enumerate()
                        .map(|(j, c)| (i != j).then(|| n.link(c).unwrap()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Takes both ends of the pair `i`, `j` out of a mesh: i's link to j, and
/// j's to i.
fn ends(links: &mut [Vec<Option<Link>>], i: usize, j: usize) -> (Link, Link) {
    (links[i][j].take().unwrap(), links[j][i].take().unwrap())
}

/// The `k`-th message from `from`: its length (0 to about 20 KiB, some
/// above a record) and bytes.
fn message(from: usize, k: usize) -> (u8, Vec<u8>) {
    let len = match k % 7 {
        0 => 0,
        1 => 8,
        2 => 100 + k % 900,
        3 => 4096,
        4 => 8 << 10,
        5 => 9000 + k % 11_000,
        _ => 1 + k % 64,
    };
    let seed = (from as u64) << 40 ^ k as u64;
    let bytes = (0..len)
        .map(|i| (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 57)) as u8 ^ i as u8)
        .collect();
    ((k % 250) as u8, bytes)
}

fn fnv(acc: u64, b: &[u8]) -> u64 {
    b.iter()
        .fold(acc, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

#[test]
fn two_nodes_talk_over_queues_both_ways() {
    let d = dir("two");
    let nodes = nodes(&d, 2, 64 << 10);
    let mut links = mesh(&nodes);
    let (mut l0, mut l1) = ends(&mut links, 0, 1);
    for l in [&l0, &l1] {
        assert_eq!(l.path(), PathKind::Queue, "{}", l.reason());
        assert!(
            l.reason().starts_with("queue: co-resident"),
            "{}",
            l.reason()
        );
    }
    const N: usize = 20_000;
    let t = std::thread::spawn(move || {
        let mut sum = 0xcbf2_9ce4_8422_2325u64;
        let mut m = Vec::new();
        for k in 0..N {
            let tag = l1.recv(&mut m, None).unwrap();
            let (t2, want) = message(0, k);
            assert_eq!((tag, m.len()), (t2, want.len()), "message {k}");
            assert!(m == want, "message {k}: bytes differ");
            sum = fnv(sum, &m);
            let (tag, b) = message(1, k);
            l1.send(tag, &b).unwrap();
        }
        sum
    });
    let mut sent = 0xcbf2_9ce4_8422_2325u64;
    let mut back = Vec::new();
    for k in 0..N {
        let (tag, b) = message(0, k);
        sent = fnv(sent, &b);
        l0.send(tag, &b).unwrap();
        let tag = l0.recv(&mut back, None).unwrap();
        let (t2, want) = message(1, k);
        assert_eq!(tag, t2);
        assert!(back == want, "reply {k}: bytes differ");
    }
    assert_eq!(t.join().unwrap(), sent, "checksum over every byte");
    let s = l0.stats();
    assert_eq!((s.tx_msgs, s.rx_msgs), (N as u64, N as u64));
}

#[test]
fn four_senders_share_one_queue_and_each_keeps_its_order() {
    // Node 0 receives from nodes 1-3 through its one queue for this
    // domain; it polls each link in turn, so each poll sets the others'
    // records aside. Streams, not exchanges: the queue fills and the
    // senders wait for room.
    let d = dir("four");
    let nodes = nodes(&d, 4, 16 << 10);
    let mut links = mesh(&nodes);
    const N: usize = 5_000;
    let senders: Vec<_> = (1..4)
        .map(|i| {
            let mut l = links[i][0].take().unwrap();
            assert_eq!(l.path(), PathKind::Queue, "{}", l.reason());
            std::thread::spawn(move || {
                let mut sum = 0xcbf2_9ce4_8422_2325u64;
                for k in 0..N {
                    let (tag, b) = message(i, k);
                    sum = fnv(sum, &b);
                    l.send(tag, &b).unwrap();
                }
                (sum, l)
            })
        })
        .collect();
    let mut rx: Vec<Link> = (1..4).map(|j| links[0][j].take().unwrap()).collect();
    let mut got = [0usize; 3];
    let mut sums = [0xcbf2_9ce4_8422_2325u64; 3];
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.iter().any(|&g| g < N) {
        assert!(Instant::now() < deadline, "stalled at {got:?}");
        for (j, l) in rx.iter_mut().enumerate() {
            let (g, sum) = (&mut got[j], &mut sums[j]);
            l.poll(8, &mut |tag, p| {
                let mut m = vec![0u8; p.len()];
                p.read_at(0, &mut m);
                let (t2, want) = message(j + 1, *g);
                assert_eq!(
                    (tag, m.len()),
                    (t2, want.len()),
                    "sender {} message {g}",
                    j + 1
                );
                assert!(m == want, "sender {} message {g}: bytes differ", j + 1);
                *sum = fnv(*sum, &m);
                *g += 1;
            })
            .unwrap();
        }
    }
    for (j, h) in senders.into_iter().enumerate() {
        let (sum, _l) = h.join().unwrap();
        assert_eq!(sums[j], sum, "sender {}'s checksum", j + 1);
    }
}

#[test]
fn a_peer_that_closes_is_read_to_its_end_then_closed() {
    let d = dir("close");
    let nodes = nodes(&d, 2, 16 << 10);
    let mut links = mesh(&nodes);
    let (mut l0, mut l1) = ends(&mut links, 0, 1);
    // More than the queue holds: the sender waits for room meanwhile.
    let t = std::thread::spawn(move || {
        for k in 0..100 {
            let (tag, b) = message(0, k);
            l0.send(tag, &b).unwrap();
        }
        l0.close();
        l0
    });
    let mut m = Vec::new();
    for k in 0..100 {
        let tag = l1.recv(&mut m, None).unwrap();
        assert_eq!((tag, &m), (message(0, k).0, &message(0, k).1));
    }
    let deadline = Some(Instant::now() + Duration::from_secs(10));
    match l1.recv(&mut m, deadline) {
        Err(Error::Closed) => {}
        Err(e) if e.to_string().contains("closed") => {}
        r => panic!("after the last message: {r:?}"),
    }
    drop(t.join().unwrap());
}

/// A queue whose last link went is given back: the domain's next peer
/// gets a new queue (slot 0 again), not slot 1 of the old one.
#[test]
fn a_queue_whose_links_all_went_is_given_back() {
    let d = dir("back");
    let nodes = nodes(&d, 4, 16 << 10);
    let pair = |i: usize, j: usize| {
        let (a, b) = (&nodes[i], &nodes[j]);
        std::thread::scope(|s| {
            let t = s.spawn(|| b.link(a.card()).unwrap());
            (a.link(b.card()).unwrap(), t.join().unwrap())
        })
    };
    let slot_of_ours = |l: &Link| {
        assert_eq!(l.path(), PathKind::Queue, "{}", l.reason());
        let r = l.reason();
        let at = r.find("slot ").expect("a slot in the reason") + 5;
        r[at..].split(' ').next().unwrap().parse::<usize>().unwrap()
    };
    let (mut l01, mut l10) = pair(0, 1);
    assert_eq!(slot_of_ours(&l01), 0);
    l01.send(7, b"first").unwrap();
    let mut m = Vec::new();
    assert_eq!(l10.recv(&mut m, None).unwrap(), 7);
    assert_eq!(m, b"first");
    drop((l01, l10));
    // Node 0's queue for this domain had one link, now none.
    let (mut l02, mut l20) = pair(0, 2);
    assert_eq!(slot_of_ours(&l02), 0, "{}", l02.reason());
    l20.send(9, b"second").unwrap();
    assert_eq!(l02.recv(&mut m, None).unwrap(), 9);
    assert_eq!(m, b"second");
    // While a link holds it, the queue stays: node 1's next peer gets the
    // next slot of node 1's queue, which its link to node 2 holds.
    let (l12, _l21) = pair(1, 2);
    let first = slot_of_ours(&l12);
    let (l13, _l31) = pair(1, 3);
    assert_eq!(slot_of_ours(&l13), first + 1, "{}", l13.reason());
    drop(l12);
}

/// `peek_msg` hands the queue's next record up in place when it is the
/// link's own whole message: the queue's other links take nothing until
/// it is released, then everything comes in order.
#[test]
fn a_message_taken_in_place_holds_the_queue_until_released() {
    let d = dir("inplace");
    let built = nodes(&d, 3, 16 << 10);
    let mut links = mesh(&built);
    let (mut from1, mut l1) = ends(&mut links, 0, 1);
    let (mut from2, mut l2) = ends(&mut links, 0, 2);
    let peek = |l: &mut Link| -> (u8, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((t, p, len)) = l.peek_msg().unwrap() {
                // SAFETY: valid until release_msg.
                return (t, unsafe { std::slice::from_raw_parts(p, len) }.to_vec());
            }
            assert!(Instant::now() < deadline, "no message");
        }
    };
    l1.send(1, b"one").unwrap();
    l2.send(2, b"two").unwrap();
    assert_eq!(peek(&mut from1), (1, b"one".to_vec()));
    // Held in place at the head: node 2's link waits behind it.
    assert!(from2.peek_msg().unwrap().is_none());
    from1.release_msg().unwrap();
    assert_eq!(peek(&mut from2), (2, b"two".to_vec()));
    from2.release_msg().unwrap();
    // Streams from both, read through peek_msg in turns, every message
    // checked in order (the other's records ahead are set aside by a poll
    // and come from there).
    const N: usize = 2_000;
    let t1 = std::thread::spawn(move || {
        for k in 0..N {
            let (tag, b) = message(1, k);
            l1.send(tag, &b).unwrap();
        }
        l1
    });
    let t2 = std::thread::spawn(move || {
        for k in 0..N {
            let (tag, b) = message(2, k);
            l2.send(tag, &b).unwrap();
        }
        l2
    });
    let (mut k1, mut k2) = (0, 0);
    while k1 < N || k2 < N {
        for (from, k, who) in [(&mut from1, &mut k1, 1), (&mut from2, &mut k2, 2)] {
            if *k < N {
                if let Some((t, p, len)) = from.peek_msg().unwrap() {
                    // SAFETY: valid until release_msg.
                    let got = unsafe { std::slice::from_raw_parts(p, len) };
                    assert_eq!((t, got), (message(who, *k).0, &message(who, *k).1[..]));
                    from.release_msg().unwrap();
                    *k += 1;
                }
            }
        }
    }
    drop((t1.join().unwrap(), t2.join().unwrap()));
}

#[test]
fn a_queue_too_small_for_the_smallest_record_is_refused() {
    let d = dir("cfg");
    let c = Config {
        min_record: Some(8 << 10),
        ..cfg(&d, 8 << 10)
    };
    let e = Node::new(c).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("below the smallest record"), "{e}");
    let e = Node::new(cfg(&d, 5000)).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("power of two"), "{e}");
}

#[test]
fn a_peer_that_dies_mid_record_breaks_its_domains_queue_by_name() {
    // Node 0 receives from 1 and 2 through one queue. Node 1 reserves a
    // record and vanishes without publishing it (its connection closes
    // with no close byte: a crash); node 2's messages wait behind the
    // hole. Node 0 learns of the death from its link to 1, and its link to
    // 2 then fails with the named cause instead of waiting for ever.
    let d = dir("hole");
    let built = nodes(&d, 3, 16 << 10);
    let mut links = mesh(&built);
    let mut built = built.into_iter();
    let n0 = built.next().unwrap();
    let n1 = built.next().unwrap();
    let _n2 = built.next().unwrap();
    let (mut from1, mut l1) = ends(&mut links, 0, 1);
    let (mut from2, mut l2) = ends(&mut links, 0, 2);
    // a message each first, taken: the queue works
    l1.send(1, b"one").unwrap();
    l2.send(2, b"two").unwrap();
    let mut m = Vec::new();
    let deadline = Some(Instant::now() + Duration::from_secs(10));
    assert_eq!(from1.recv(&mut m, deadline).unwrap(), 1);
    assert_eq!(from2.recv(&mut m, deadline).unwrap(), 2);
    assert!(l1.leave_a_hole_in_the_queue(100).unwrap());
    l2.send(3, b"behind the hole").unwrap();
    drop(l1);
    drop(n1);
    // A blocking receive looks at the peer between its waits.
    let t0 = Instant::now();
    let dead1 = from1
        .recv(&mut m, Some(t0 + Duration::from_secs(10)))
        .unwrap_err()
        .to_string();
    assert!(dead1.contains("peer gone"), "{dead1}");
    let err2 = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "link to 2 never failed"
        );
        match from2.poll(4, &mut |_, _| panic!("a message from behind the hole")) {
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break e.to_string(),
        }
    };
    assert!(err2.contains("died while writing a record"), "{err2}");
    // it took the queue's time-out, not the test's
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    drop(n0);
}
