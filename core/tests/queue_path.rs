//! Links on the queue path between nodes of this process (the host
//! backend's domain is the network namespace: every node here is in one
//! domain, so a node's queue for it carries all the others' slots).

use ivcom_core::ring::Batch;
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

/// Sends node `from`'s first `n` messages on `l` from a thread of its own,
/// which gives the link back.
fn stream(mut l: Link, from: usize, n: usize) -> std::thread::JoinHandle<Link> {
    std::thread::spawn(move || {
        for k in 0..n {
            let (tag, b) = message(from, k);
            l.send(tag, &b).unwrap();
        }
        l
    })
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
    // A blocking receive spins and yields before it sleeps (the wait
    // policy): in a ping-pong the answer comes within that time, so the
    // sender seldom finds its consumer asleep. One that slept at once
    // was rung for nearly every message (a futex round trip each: a 40 us
    // echo where the ring's takes 0.4).
    assert!(
        s.tx_doorbells < N as u64 / 2,
        "{} doorbells for {N} messages",
        s.tx_doorbells
    );
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
    let (t1, t2) = (stream(l1, 1, N), stream(l2, 2, N));
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
fn a_batch_taken_in_place_stops_at_another_links_record_and_holds_the_queue() {
    let d = dir("batch");
    let built = nodes(&d, 3, 16 << 10);
    let mut links = mesh(&built);
    let (mut from1, mut l1) = ends(&mut links, 0, 1);
    let (mut from2, mut l2) = ends(&mut links, 0, 2);
    let mut batch = Batch::new();
    // What a batch holds, copied out, then released; waits up to 10 s for
    // the first message.
    let take = |l: &mut Link, b: &mut Batch, max: usize, wait: bool| -> Vec<(u8, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = l.peek_msgs(b, max);
            if n > 0 || !wait {
                assert_eq!(n, b.records().len());
                let got = b
                    .records()
                    .iter()
                    // SAFETY: valid until release_msg.
                    .map(|r| {
                        (
                            r.tag,
                            unsafe { std::slice::from_raw_parts(r.ptr, r.len) }.to_vec(),
                        )
                    })
                    .collect();
                if n > 0 {
                    l.release_msg().unwrap();
                }
                return got;
            }
            assert!(Instant::now() < deadline, "no message");
        }
    };
    for k in 0..5 {
        l1.send(k, &[k; 40]).unwrap();
    }
    l2.send(9, b"two").unwrap();
    l1.send(5, b"after").unwrap();
    // At most what is asked, in order.
    let got = take(&mut from1, &mut batch, 3, true);
    assert_eq!(got, (0..3).map(|k| (k, vec![k; 40])).collect::<Vec<_>>());
    // Held: node 2's link gets nothing until the batch is released.
    assert_eq!(from1.peek_msgs(&mut batch, 16), 2);
    assert!(from2.peek_msg().unwrap().is_none());
    from1.release_msg().unwrap();
    // Node 1's next record is behind node 2's: no batch for it.
    assert!(take(&mut from1, &mut batch, 16, false).is_empty());
    assert_eq!(
        take(&mut from2, &mut batch, 16, true),
        vec![(9, b"two".to_vec())]
    );
    assert_eq!(
        take(&mut from1, &mut batch, 16, true),
        vec![(5, b"after".to_vec())]
    );
    // Two streams read in batches in turns (with peek_msg for what a batch
    // leaves: fragments, and records behind the other's), every message
    // checked in order.
    const N: usize = 3_000;
    let (t1, t2) = (stream(l1, 1, N), stream(l2, 2, N));
    let (mut k1, mut k2, mut batched) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while k1 < N || k2 < N {
        assert!(Instant::now() < deadline, "stuck at {k1} and {k2}");
        for (from, k, who) in [(&mut from1, &mut k1, 1), (&mut from2, &mut k2, 2)] {
            let mut got = take(from, &mut batch, 16, false);
            batched += got.len();
            if got.is_empty() {
                if let Some((t, p, len)) = from.peek_msg().unwrap() {
                    // SAFETY: valid until release_msg.
                    got.push((t, unsafe { std::slice::from_raw_parts(p, len) }.to_vec()));
                    from.release_msg().unwrap();
                }
            }
            for m in got {
                assert_eq!(m, message(who, *k), "node {who}, message {}", *k);
                *k += 1;
            }
        }
    }
    // Interleaved senders leave few runs of one link's records, and a
    // poll that sets the other link's records aside leaves that link to
    // take them from there: most go through peek_msg here, and in some
    // runs all of them (seen once in about 100). A run of one link's
    // messages alone comes in whole batches.
    let (mut l1, _l2) = (t1.join().unwrap(), t2.join().unwrap());
    for k in 0..40u8 {
        l1.send(k, &[k; 8]).unwrap();
    }
    let mut alone = Vec::new();
    while alone.len() < 40 {
        let got = take(&mut from1, &mut batch, 16, true);
        assert!(
            got.len() == 16 || alone.len() + got.len() == 40,
            "a batch of {}",
            got.len()
        );
        alone.extend(got);
    }
    assert_eq!(
        alone,
        (0..40u8).map(|k| (k, vec![k; 8])).collect::<Vec<_>>()
    );
    eprintln!(
        "{batched} of {} interleaved messages came in batches",
        2 * N
    );
}

#[test]
fn a_tag_at_the_limit_breaks_its_link_by_name_and_leaves_its_domains_others() {
    // The layer above indexes a table by the tag: a peer that sends a tag
    // at the limit breaks its link, whether the record would be taken in
    // place (peek_msg, peek_msgs) or set aside by another link's poll.
    for how in ["peek_msg", "peek_msgs", "aside"] {
        let d = dir(&format!("tag-{how}"));
        let built: Vec<Node> = (0..3)
            .map(|_| {
                Node::new(Config {
                    tag_limit: 255,
                    ..cfg(&d, 16 << 10)
                })
                .unwrap()
            })
            .collect();
        for a in &built {
            for b in &built {
                if a.card().id != b.card().id {
                    a.admit(b.card()).unwrap();
                }
            }
        }
        let mut links = mesh(&built);
        let (mut from1, mut l1) = ends(&mut links, 0, 1);
        let (mut from2, mut l2) = ends(&mut links, 0, 2);
        l1.send(254, b"fine").unwrap();
        l1.send(255, b"past the table").unwrap();
        l2.send(7, b"other").unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            assert!(
                Instant::now() < deadline,
                "{how}: the bad tag was never seen"
            );
            if how == "aside" {
                // node 2's link polls first: node 1's records go aside
                let _ = from2.poll(1, &mut |t, p| got.push((2, t, p.to_vec())));
            }
            let r = match how {
                "peek_msgs" => {
                    let mut b = Batch::new();
                    let n = from1.peek_msgs(&mut b, 16);
                    for r in b.records() {
                        // SAFETY: valid until release_msg.
                        got.push((
                            1,
                            r.tag,
                            unsafe { std::slice::from_raw_parts(r.ptr, r.len) }.to_vec(),
                        ));
                    }
                    if n > 0 {
                        from1.release_msg().unwrap();
                    }
                    from1.peek_msg().map(|m| {
                        if let Some((t, p, len)) = m {
                            // SAFETY: valid until release_msg.
                            got.push((
                                1,
                                t,
                                unsafe { std::slice::from_raw_parts(p, len) }.to_vec(),
                            ));
                        }
                    })
                }
                _ => from1.peek_msg().map(|m| {
                    if let Some((t, p, len)) = m {
                        // SAFETY: valid until release_msg.
                        got.push((1, t, unsafe { std::slice::from_raw_parts(p, len) }.to_vec()));
                    }
                }),
            };
            match r {
                Ok(()) => {
                    let _ = from1.release_msg();
                }
                Err(e) => break e.to_string(),
            }
        };
        assert!(err.contains("tag out of range"), "{how}: {err}");
        assert!(
            !got.iter().any(|&(_, t, _)| t == 255),
            "{how}: a tag at the limit was handed up: {got:?}"
        );
        assert!(got.contains(&(1, 254, b"fine".to_vec())), "{how}: {got:?}");
        // The domain's other link goes on.
        let mut m = Vec::new();
        let other = got.iter().any(|g| g.0 == 2) || {
            from2
                .recv(&mut m, Some(Instant::now() + Duration::from_secs(10)))
                .unwrap()
                == 7
                && m == b"other"
        };
        assert!(other, "{how}: node 2's message lost");
        l2.send(8, b"still").unwrap();
        from2
            .recv(&mut m, Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        assert_eq!(m, b"still", "{how}");
        drop(l1);
    }
}

#[test]
fn an_idle_queue_hands_its_space_back_at_the_second_look() {
    // A 4 KiB queue of 1 KiB records: four messages fill it. The receiver
    // takes them in a batch and releases them; the space is handed back
    // (cleared, the index published) not at once but at the second look
    // at the idle queue, after whatever the receiver sent in between.
    let d = dir("look");
    let built: Vec<Node> = (0..2)
        .map(|_| {
            Node::new(Config {
                min_record: Some(1000),
                ..cfg(&d, 4096)
            })
            .unwrap()
        })
        .collect();
    built[0].admit(built[1].card()).unwrap();
    built[1].admit(built[0].card()).unwrap();
    let mut links = mesh(&built);
    let (mut from1, mut l1) = ends(&mut links, 0, 1);
    let msg = [7u8; 1000];
    let mut sent = 0;
    while l1.try_send(1, &[&msg]).unwrap() {
        sent += 1;
        assert!(sent < 10, "a 4 KiB queue took {sent} records of 1 KiB");
    }
    assert_eq!(sent, 4);
    let mut batch = Batch::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut taken = 0;
    while taken < sent {
        assert!(Instant::now() < deadline, "took {taken}");
        let n = from1.peek_msgs(&mut batch, 16);
        for r in batch.records() {
            // SAFETY: valid until release_msg.
            assert_eq!(
                unsafe { std::slice::from_raw_parts(r.ptr, r.len) },
                &msg[..]
            );
        }
        if n > 0 {
            from1.release_msg().unwrap();
        }
        taken += n;
    }
    // Released, not handed back yet: no room.
    assert!(!l1.try_send(1, &[&msg]).unwrap());
    assert!(
        !from1.worth_polling(),
        "the first look finds the queue idle"
    );
    assert!(
        !l1.try_send(1, &[&msg]).unwrap(),
        "handed back at the first look"
    );
    assert!(!from1.worth_polling(), "the second look finds it idle too");
    assert!(
        l1.try_send(1, &[&msg]).unwrap(),
        "not handed back at the second look"
    );
    // and the next message arrives
    let mut m = Vec::new();
    assert_eq!(from1.recv(&mut m, Some(deadline)).unwrap(), 1);
    assert_eq!(m, msg);
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
    l1.drop_as_crashed();
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

#[test]
fn a_blocking_receive_sleeps_while_another_link_of_its_queue_polls() {
    // Node 0 receives from nodes 1 and 2 through its one queue for this
    // domain. Its link from node 1 takes each message with a blocking
    // `recv`, which sleeps on the queue's doorbell without the queue's
    // lock once it has waited a while (node 1 sends in bursts with pauses
    // longer than that); meanwhile, on another thread, its link from node
    // 2 polls without blocking, takes whatever the queue holds and sets
    // node 1's records aside. Every message of both streams arrives, in
    // order, every byte checked; node 1 rang the sleeping receiver.
    let d = dir("sleeppoll");
    let nodes = nodes(&d, 3, 16 << 10);
    let mut links = mesh(&nodes);
    const BURSTS: usize = 150;
    const BURST: usize = 20;
    const N2: usize = 6_000;
    let (mut from1, mut to0_1) = ends(&mut links, 0, 1);
    let (mut from2, to0_2) = ends(&mut links, 0, 2);
    assert_eq!(from1.path(), PathKind::Queue, "{}", from1.reason());
    let bursty = std::thread::spawn(move || {
        let mut sum = 0xcbf2_9ce4_8422_2325u64;
        for b in 0..BURSTS {
            for k in b * BURST..(b + 1) * BURST {
                let (tag, m) = message(1, k);
                sum = fnv(sum, &m);
                to0_1.send(tag, &m).unwrap();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (sum, to0_1)
    });
    let steady = stream(to0_2, 2, N2);
    let deadline = Instant::now() + Duration::from_secs(120);
    let poller = std::thread::spawn(move || {
        let mut got = 0;
        let mut sum = 0xcbf2_9ce4_8422_2325u64;
        while got < N2 {
            assert!(
                Instant::now() < deadline,
                "the polling link stalled at {got}"
            );
            from2
                .poll(8, &mut |tag, p| {
                    let mut m = vec![0u8; p.len()];
                    p.read_at(0, &mut m);
                    let (t2, want) = message(2, got);
                    assert_eq!((tag, &m), (t2, &want), "node 2's message {got}");
                    sum = fnv(sum, &m);
                    got += 1;
                })
                .unwrap();
        }
        (sum, from2)
    });
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    let mut m = Vec::new();
    for k in 0..BURSTS * BURST {
        let tag = from1
            .recv(&mut m, Some(deadline))
            .unwrap_or_else(|e| panic!("node 1's message {k}: {e}"));
        let (t2, want) = message(1, k);
        assert_eq!((tag, &m), (t2, &want), "node 1's message {k}");
        sum = fnv(sum, &m);
    }
    let (sent1, to0_1) = bursty.join().unwrap();
    assert_eq!(sum, sent1, "node 1's checksum");
    let (sum2, _from2) = poller.join().unwrap();
    let to0_2 = steady.join().unwrap();
    let mut sent2 = 0xcbf2_9ce4_8422_2325u64;
    for k in 0..N2 {
        sent2 = fnv(sent2, &message(2, k).1);
    }
    assert_eq!(sum2, sent2, "node 2's checksum");
    assert!(
        to0_1.stats().tx_doorbells > 0,
        "the receive never slept: {:?}",
        to0_1.stats()
    );
    drop(to0_2);
}

#[test]
fn messages_written_in_place_in_a_queue_arrive_and_space_given_back_never_surfaces() {
    // Node 1 writes its messages in place in node 0's queue (reserve,
    // fill, commit), reserving more than a message needs now and then and
    // giving every fifth reservation back unsent (its space filled with
    // garbage first); node 2 sends through the same queue meanwhile. Node
    // 0 gets every message of both, in order, every byte checked, and
    // nothing of the space given back. Last, node 1's link is dropped
    // holding a reservation: node 2's next message still arrives (the
    // reservation was given back, not left to hold the queue).
    let d = dir("reserve");
    let nodes = nodes(&d, 3, 16 << 10);
    let mut links = mesh(&nodes);
    const N: usize = 4_000;
    let (mut from1, mut to0_1) = ends(&mut links, 0, 1);
    let (mut from2, to0_2) = ends(&mut links, 0, 2);
    assert_eq!(to0_1.path(), PathKind::Queue, "{}", to0_1.reason());
    let max = to0_1.max_inline();
    let fit = move |k: usize| {
        let (tag, mut m) = message(1, k);
        m.truncate(max);
        (tag, m)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let writer = std::thread::spawn(move || {
        let (mut cancelled, mut waits) = (0, 0u64);
        for k in 0..N {
            let (tag, m) = fit(k);
            let cap = (m.len() + 16 * (k % 9)).min(max);
            let mut give_back = k % 5 == 0;
            let dst = loop {
                assert!(Instant::now() < deadline, "no room for message {k}");
                match to0_1.reserve(cap).unwrap() {
                    Some(p) if give_back => {
                        // SAFETY: the reservation holds `cap` bytes.
                        unsafe { std::ptr::write_bytes(p, 0xee, cap) };
                        to0_1.cancel();
                        give_back = false;
                        cancelled += 1;
                    }
                    Some(p) => break p,
                    None => {
                        waits += 1;
                        std::thread::yield_now();
                    }
                }
            };
            // SAFETY: the reservation holds `cap` >= len bytes.
            unsafe {
                std::ptr::write_bytes(dst, 0xdd, cap);
                std::ptr::copy_nonoverlapping(m.as_ptr(), dst, m.len());
            }
            to0_1.commit(m.len(), tag).unwrap();
        }
        (to0_1, cancelled, waits)
    });
    let steady = stream(to0_2, 2, N);
    let (mut k1, mut k2) = (0, 0);
    while k1 < N || k2 < N {
        assert!(Instant::now() < deadline, "stalled at {k1} and {k2}");
        from1
            .poll(64, &mut |t, p| {
                let mut got = vec![0u8; p.len()];
                p.read_at(0, &mut got);
                assert_eq!((t, got), fit(k1), "node 1's message {k1}");
                k1 += 1;
            })
            .unwrap();
        from2
            .poll(64, &mut |t, p| {
                let mut got = vec![0u8; p.len()];
                p.read_at(0, &mut got);
                assert_eq!((t, got), message(2, k2), "node 2's message {k2}");
                k2 += 1;
            })
            .unwrap();
    }
    let (mut to0_1, cancelled, waits) = writer.join().unwrap();
    let mut to0_2 = steady.join().unwrap();
    assert_eq!(cancelled, N.div_ceil(5));
    eprintln!("{cancelled} reservations given back; {waits} tries found the queue full");
    assert!(to0_1.reserve(100).unwrap().is_some());
    drop(to0_1);
    to0_2.send(9, b"after the dropped reservation").unwrap();
    let mut last = None;
    while last.is_none() {
        assert!(
            Instant::now() < deadline,
            "the queue is held at the dropped reservation"
        );
        from2
            .poll(1, &mut |t, p| {
                let mut got = vec![0u8; p.len()];
                p.read_at(0, &mut got);
                last = Some((t, got));
            })
            .unwrap();
    }
    assert_eq!(
        last.unwrap(),
        (9, b"after the dropped reservation".to_vec())
    );
    // Node 1's link closed: its peer reads that, not a lost peer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match from1.poll(1, &mut |_, _| panic!("nothing more from node 1")) {
            Err(Error::AtPeer(_, e)) if matches!(*e, Error::Closed) => break,
            r => {
                r.unwrap();
            }
        }
        assert!(Instant::now() < deadline, "node 1's close never seen");
    }
}

#[test]
fn a_large_record_taken_alone_is_handed_back_at_the_idle_look_and_in_a_stream_at_once() {
    // A 32 KiB queue of 5,000-byte messages (5,008 bytes a record: six fit).
    // A record of a batch's size or more is handed back at once when more
    // records follow it (a stream: the producers want the room), but when
    // nothing follows (a ping-pong, whose answer goes out next) only at
    // the idle look, up to a quarter of the queue.
    let d = dir("large");
    let built = nodes(&d, 2, 32 << 10);
    let mut links = mesh(&built);
    let (mut from1, mut l1) = ends(&mut links, 0, 1);
    let msg = |k: u8| [k; 5000];
    let mut batch = Batch::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut take_one = |from: &mut Link, k: u8| {
        loop {
            assert!(Instant::now() < deadline, "message {k} not taken");
            if from.peek_msgs(&mut batch, 16) > 0 {
                break;
            }
        }
        assert_eq!(
            batch.records().len(),
            1,
            "one record of 5,000 bytes a batch"
        );
        let r = batch.records()[0];
        // SAFETY: valid until release_msg.
        assert_eq!(
            unsafe { std::slice::from_raw_parts(r.ptr, r.len) },
            &msg(k)[..]
        );
        from.release_msg().unwrap();
    };
    // Room the queue has for more: how many messages go before it is full.
    let mut next = 0u8;
    let mut fill = |l: &mut Link| {
        let mut sent = 0;
        while l.try_send(1, &[&msg(next)]).unwrap() {
            next += 1;
            sent += 1;
            assert!(sent < 10);
        }
        sent
    };
    assert_eq!(fill(&mut l1), 6);
    // A record with another after it: handed back as it is released.
    take_one(&mut from1, 0);
    assert_eq!(
        fill(&mut l1),
        1,
        "a record released in a stream was not handed back"
    );
    for k in 1..6 {
        take_one(&mut from1, k);
    }
    // The last one, with nothing after it: not handed back yet, so the
    // queue takes five more, not six.
    take_one(&mut from1, 6);
    assert_eq!(
        fill(&mut l1),
        5,
        "the lone record's space was handed back at once"
    );
    for k in 7..12 {
        take_one(&mut from1, k);
    }
}
