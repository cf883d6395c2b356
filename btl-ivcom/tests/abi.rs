//! The C ABI end to end, as a C program would use it: two nodes that share
//! a hypervisor directory, a link over the ring, gathered non-blocking sends
//! of one and of many pieces, zero-copy reserve/commit, and a polling
//! receiver that checks every byte.

use ivcom::*;
use std::cell::Cell;
use std::ffi::c_void;
use std::time::{Duration, Instant};

struct Node(*mut ivcom_node);

impl Node {
    /// A node of the host backend in hypervisor directory `dir`.
    fn new(dir: &std::ffi::CString) -> Node {
        Node::with(IVCOM_BACKEND_HOST, Some(dir))
    }

    /// A node of the host backend in `dir` on the queue path, with
    /// receive queues of `queue` bytes.
    fn queued(dir: &std::ffi::CString, queue: usize) -> Node {
        Node::make(IVCOM_BACKEND_HOST, Some(dir), queue)
    }

    /// A polling node of `backend` (`IVCOM_BACKEND_*`), in hypervisor
    /// directory `dir` when given.
    fn with(backend: std::ffi::c_int, dir: Option<&std::ffi::CString>) -> Node {
        Node::make(backend, dir, 0)
    }

    /// As `with`, with receive queues of `queue` bytes (0: rings).
    fn make(backend: std::ffi::c_int, dir: Option<&std::ffi::CString>, queue: usize) -> Node {
        let mut cfg = std::mem::MaybeUninit::<ivcom_config>::uninit();
        // SAFETY: writable config; defaults, then our directory and backend.
        let mut cfg = unsafe {
            ivcom_config_default(cfg.as_mut_ptr());
            cfg.assume_init()
        };
        cfg.backend = backend;
        if let Some(dir) = dir {
            cfg.host_dir = dir.as_ptr();
        }
        cfg.poll_only = 1;
        cfg.queue_size = queue;
        let mut n = std::ptr::null_mut();
        // SAFETY: valid config and out pointer.
        assert_eq!(
            unsafe { ivcom_node_new(&cfg, &mut n) },
            IVCOM_OK,
            "{}",
            last_error()
        );
        Node(n)
    }

    fn card(&self) -> Vec<u8> {
        // SAFETY: valid node; first call learns the length.
        let len = unsafe { ivcom_node_card(self.0, std::ptr::null_mut(), 0) };
        let mut b = vec![0u8; len];
        // SAFETY: b has len writable bytes.
        assert_eq!(unsafe { ivcom_node_card(self.0, b.as_mut_ptr(), len) }, len);
        b
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SAFETY: from ivcom_node_new, not used afterwards.
        unsafe { ivcom_node_free(self.0) }
    }
}

fn last_error() -> String {
    let mut b = vec![0u8; 512];
    // SAFETY: b has 512 writable bytes.
    let n = unsafe { ivcom_last_error(b.as_mut_ptr().cast(), b.len()) };
    b.truncate(n.min(511));
    String::from_utf8_lossy(&b).into_owned()
}

/// Everything received: (tag, bytes).
unsafe extern "C" fn collect(ctx: *mut c_void, tag: u8, data: *const u8, len: usize) {
    // SAFETY: ctx is the Vec passed to ivcom_link_poll; data/len valid now.
    let v = unsafe { &mut *(ctx as *mut Vec<(u8, Vec<u8>)>) };
    // SAFETY: len readable bytes during the call.
    v.push((tag, unsafe { bytes(data, len) }.to_vec()));
}

/// The `len` bytes at `data` that a receive callback got (`data` may be
/// anything when `len` is 0).
///
/// # Safety
/// `data` readable for `len` bytes for `'a` when `len` is not 0.
unsafe fn bytes<'a>(data: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: forwarded contract.
        unsafe { std::slice::from_raw_parts(data, len) }
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(7)) as u8)
        .collect()
}

/// Two nodes of one hypervisor directory (a private one, named after
/// `name` and this process) and the ring link between them: a opened it,
/// b accepted it. Returns the directory to remove at the end.
fn linked_pair(
    name: &str,
) -> (
    std::path::PathBuf,
    Node,
    Node,
    *mut ivcom_link,
    *mut ivcom_link,
) {
    linked_pair_with(name, 0)
}

/// [`linked_pair`] on rings (`queue` 0) or on the queue path with receive
/// queues of `queue` bytes.
fn linked_pair_with(
    name: &str,
    queue: usize,
) -> (
    std::path::PathBuf,
    Node,
    Node,
    *mut ivcom_link,
    *mut ivcom_link,
) {
    let dir = std::env::temp_dir().join(format!("ivcom-{name}-{}", std::process::id()));
    // Private, as the host backend demands.
    let _ = std::fs::remove_dir_all(&dir);
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&dir)
        .unwrap();
    let cdir = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    let (a, b) = (Node::queued(&cdir, queue), Node::queued(&cdir, queue));
    let card_b = b.card();
    // b accepts only peers whose full card it was given.
    let card_a = a.card();
    // SAFETY: valid node and card.
    let rc = unsafe { ivcom_node_admit(b.0, card_a.as_ptr(), card_a.len()) };
    assert_eq!(rc, IVCOM_OK, "{}", last_error());

    // a opens (and offers the ring); b takes the link from its acceptor.
    let mut la = std::ptr::null_mut();
    // SAFETY: valid node, card and out pointer.
    let rc = unsafe { ivcom_link_open(a.0, card_b.as_ptr(), card_b.len(), &mut la) };
    assert_eq!(rc, IVCOM_OK, "{}", last_error());
    let mut lb = std::ptr::null_mut();
    let until = Instant::now() + Duration::from_secs(10);
    // SAFETY: valid node and out pointer.
    while unsafe { ivcom_node_accept(b.0, &mut lb) } != 1 {
        assert!(Instant::now() < until, "b never got the link");
        std::thread::sleep(Duration::from_millis(1));
    }
    let path = if queue == 0 {
        IVCOM_PATH_RING
    } else {
        IVCOM_PATH_QUEUE
    };
    // SAFETY: valid links.
    unsafe {
        assert_eq!(ivcom_link_path(la), path);
        assert_eq!(ivcom_link_path(lb), path);
    }
    (dir, a, b, la, lb)
}

#[test]
fn gathered_and_in_place_sends_arrive_intact_over_the_ring() {
    let (dir, a, b, la, lb) = linked_pair("abi");
    let until = Instant::now() + Duration::from_secs(10);
    // SAFETY: valid link.
    let max = unsafe { ivcom_link_max_inline(la) };

    // What a sends: gathered from 1 piece, from 6 pieces (more than fit
    // the C ABI's stack array), in two pieces (try_send2: a head of up to
    // 40 bytes, the rest; an empty piece passed as NULL), and written in
    // place with reserve/commit.
    let mut want: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
    let poll = |got: &mut Vec<(u8, Vec<u8>)>| {
        // SAFETY: valid link; the callback only touches `got`.
        let n = unsafe { ivcom_link_poll(lb, 16, Some(collect), got as *mut _ as *mut c_void) };
        assert!(n >= 0, "poll: {}", last_error());
    };
    let mut k = 0usize;
    for len in [0usize, 1, 7, 64, 4095, 4096, 65_537, max] {
        for pieces in [1usize, 6] {
            k += 1;
            let msg = pattern(k, len);
            let cuts: Vec<usize> = (0..=pieces).map(|i| i * len / pieces).collect();
            let iov: Vec<ivcom_iov> = cuts
                .windows(2)
                .map(|w| ivcom_iov {
                    base: msg[w[0]..].as_ptr(),
                    len: w[1] - w[0],
                })
                .collect();
            let tag = (k % 200) as u8;
            // Ring full: let the receiver drain, as a progress loop would.
            // SAFETY: iov describes readable memory of msg.
            while unsafe { ivcom_link_try_send(la, tag, iov.as_ptr(), iov.len()) } == 0 {
                poll(&mut got);
            }
            want.push((tag, msg));
        }
        k += 1;
        let msg = pattern(k, len);
        let cut = len.min(k % 41);
        let piece = |from: usize, to: usize| {
            if to == from {
                std::ptr::null()
            } else {
                msg[from..].as_ptr()
            }
        };
        let (head, body) = (piece(0, cut), piece(cut, len));
        // SAFETY: the pieces are readable parts of msg (NULL when empty).
        while unsafe { ivcom_link_try_send2(la, 202, head, cut, body, len - cut) } == 0 {
            poll(&mut got);
        }
        want.push((202, msg));
        k += 1;
        let msg = pattern(k, len);
        let mut p = std::ptr::null_mut();
        // SAFETY: valid link and out pointer.
        while unsafe { ivcom_link_reserve(la, len, &mut p) } == 0 {
            poll(&mut got);
        }
        // SAFETY: p has len reserved bytes.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), p, len) };
        // SAFETY: outstanding reservation of len bytes.
        assert_eq!(unsafe { ivcom_link_commit(la, len, 201) }, IVCOM_OK);
        want.push((201, msg));
    }
    while got.len() < want.len() {
        assert!(
            Instant::now() < until,
            "{} of {} arrived",
            got.len(),
            want.len()
        );
        poll(&mut got);
    }
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g == w,
            "message {i}: tag {} len {} != tag {} len {}",
            g.0,
            g.1.len(),
            w.0,
            w.1.len()
        );
    }
    let mut s = ivcom_stats::default();
    // SAFETY: valid link and out pointer.
    unsafe { ivcom_link_stats(la, &mut s) };
    assert_eq!(s.tx_msgs, want.len() as u64);
    // Both sides poll: no doorbell either way.
    assert_eq!((s.tx_doorbells, s.rx_doorbells), (0, 0));
    // SAFETY: valid links, not used afterwards.
    unsafe {
        ivcom_link_free(la);
        ivcom_link_free(lb);
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// FNV-1a over `b`.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// b's side of the echo: what arrived, and the echoes it owes.
struct Echo {
    link: *mut ivcom_link,
    got: Vec<(u8, usize, u64)>,
    owed: std::collections::VecDeque<(u8, [u8; 16])>,
}

impl Echo {
    /// Sends the echoes owed, oldest first, while the ring takes them.
    fn pay(&mut self) {
        while let Some((tag, e)) = self.owed.front() {
            let iov = ivcom_iov {
                base: e.as_ptr(),
                len: e.len(),
            };
            // SAFETY: valid link; iov describes e.
            match unsafe { ivcom_link_try_send(self.link, *tag, &iov, 1) } {
                1 => {
                    self.owed.pop_front();
                }
                0 => return,
                rc => panic!("echo: {rc}: {}", last_error()),
            }
        }
    }
}

/// Checks a message and answers it on the same link from inside the
/// callback, as Open MPI's upcall does (ob1 acknowledges, or sends the next
/// fragment, from there): while a batch of messages is outstanding.
unsafe extern "C" fn echo(ctx: *mut c_void, tag: u8, data: *const u8, len: usize) {
    // SAFETY: ctx is the Echo passed to ivcom_link_poll.
    let e = unsafe { &mut *(ctx as *mut Echo) };
    // SAFETY: len readable bytes during the call.
    let sum = checksum(unsafe { bytes(data, len) });
    e.got.push((tag, len, sum));
    let mut answer = [0u8; 16];
    answer[..8].copy_from_slice(&(len as u64).to_le_bytes());
    answer[8..].copy_from_slice(&sum.to_le_bytes());
    e.owed.push_back((tag, answer));
    e.pay();
}

/// Streams of messages that a receiver takes in batches and answers from
/// inside its callback on the same link: every message arrives once, in
/// order, intact (checksums over every byte), every answer comes back, and
/// no poll delivers more than it was asked for.
#[test]
fn a_receiver_that_answers_from_its_callback_gets_every_message_in_order() {
    let (dir, a, b, la, lb) = linked_pair("abi-echo");
    // SAFETY: valid link.
    let max = unsafe { ivcom_link_max_inline(la) };
    let len_of = |k: usize| match k % 53 {
        0 => max,
        7 => 4096 + k % 1000,
        _ => k % 200,
    };
    const N: usize = 20_000;
    let mut e = Echo {
        link: lb,
        got: Vec::new(),
        owed: Default::default(),
    };
    let mut answers: Vec<(u8, Vec<u8>)> = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    let (mut polls, mut most) = (0usize, 0);
    let mut poll_b = |e: &mut Echo| {
        polls += 1;
        let ask = if polls % 3 == 0 { 5 } else { 16 };
        e.pay();
        // SAFETY: valid link; the callback sends on it but never polls it.
        let n = unsafe { ivcom_link_poll(lb, ask, Some(echo), e as *mut Echo as *mut c_void) };
        assert!(n >= 0, "poll b: {}", last_error());
        assert!(n as usize <= ask, "asked for {ask}, got {n}");
        most = most.max(n);
    };
    let poll_a = |answers: &mut Vec<(u8, Vec<u8>)>| {
        // SAFETY: valid link; the callback only touches `answers`.
        let n = unsafe { ivcom_link_poll(la, 16, Some(collect), answers as *mut _ as *mut c_void) };
        assert!(n >= 0, "poll a: {}", last_error());
    };
    for k in 0..N {
        let msg = pattern(k, len_of(k));
        let iov = ivcom_iov {
            base: msg.as_ptr(),
            len: msg.len(),
        };
        // Several messages wait in the ring before b polls (a batch).
        // SAFETY: iov describes msg.
        while unsafe { ivcom_link_try_send(la, (k % 251) as u8, &iov, 1) } == 0 {
            assert!(Instant::now() < until, "stuck at message {k}");
            poll_b(&mut e);
            poll_a(&mut answers);
        }
        if k % 23 == 0 {
            poll_b(&mut e);
            poll_a(&mut answers);
        }
    }
    while e.got.len() < N || !e.owed.is_empty() || answers.len() < N {
        assert!(
            Instant::now() < until,
            "{} arrived, {} answered",
            e.got.len(),
            answers.len()
        );
        poll_b(&mut e);
        poll_a(&mut answers);
    }
    assert_eq!((e.got.len(), answers.len()), (N, N));
    // (b found many messages waiting at once: the batches ran)
    assert!(most > 5, "at most {most} messages a poll");
    for (k, (got, answer)) in e.got.iter().zip(&answers).enumerate() {
        let msg = pattern(k, len_of(k));
        let want = ((k % 251) as u8, msg.len(), checksum(&msg));
        assert_eq!(*got, want, "message {k}");
        let mut echo = msg.len().to_le_bytes().to_vec();
        echo.extend_from_slice(&want.2.to_le_bytes());
        assert_eq!(*answer, (want.0, echo), "answer {k}");
    }
    // SAFETY: valid links, not used afterwards.
    unsafe {
        ivcom_link_free(la);
        ivcom_link_free(lb);
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// What b's receiving thread took: (tag, length, checksum) of each.
#[derive(Default)]
struct Taken(Vec<(u8, usize, u64)>);

unsafe extern "C" fn take(ctx: *mut c_void, tag: u8, data: *const u8, len: usize) {
    // SAFETY: ctx is the Taken passed to the poll; data/len valid now.
    let t = unsafe { &mut *(ctx as *mut Taken) };
    // SAFETY: len readable bytes during the call.
    t.0.push((tag, len, checksum(unsafe { bytes(data, len) })));
}

/// One poll of a ring link's receiving side alone, the messages recorded
/// in `ctx` (a `Taken`): by `ivcom_rx_poll` with a callback, or (`by_take`)
/// as btl/ivcom polls, `ivcom_rx_take` into an array, each message
/// recorded, `ivcom_rx_done`, again while more waits, up to 16 messages.
/// Returns what `ivcom_rx_poll` returns.
///
/// # Safety
/// The caller is the link's one receiver now.
unsafe fn rx_step(rx: *const ivcom_rx, ctx: *mut c_void, by_take: bool) -> i32 {
    if !by_take {
        // SAFETY: forwarded contract.
        return unsafe { ivcom_rx_poll(rx, 16, Some(take), ctx) };
    }
    let mut m = [ivcom_msg {
        data: std::ptr::null(),
        len: 0,
        tag: 0,
    }; IVCOM_RX_BATCH];
    let mut n = 0;
    loop {
        // SAFETY: forwarded contract; `m` has room for what is asked.
        let rc = unsafe { ivcom_rx_take(rx, m.as_mut_ptr(), IVCOM_RX_BATCH - n) };
        if rc <= 0 {
            return if n > 0 { n as i32 } else { rc };
        }
        assert!(rc as usize <= IVCOM_RX_BATCH - n, "took {rc}");
        for x in &m[..rc as usize] {
            // SAFETY: taken and not done: valid.
            unsafe { take(ctx, x.tag, x.data, x.len) };
        }
        n += rc as usize;
        // SAFETY: after a take that took messages.
        if unsafe { ivcom_rx_done(rx) } == 0 || n >= IVCOM_RX_BATCH {
            return n as i32;
        }
    }
}

/// A raw handle moved to another thread (its use is under the C ABI's
/// contract, which the test keeps).
#[derive(Clone, Copy)]
struct Raw<T>(T);
// SAFETY: see above.
unsafe impl<T> Send for Raw<T> {}
// SAFETY: see above.
unsafe impl<T> Sync for Raw<T> {}

/// The Open MPI component's threaded receive, through the C ABI: one
/// thread polls a ring link's receiving side alone (`ivcom_rx_poll`, no
/// lock) while another sends on the same link under a lock; what the
/// half leaves (`IVCOM_RX_FULL`: the padding of each lap, records larger
/// than a batch takes) and its idle checks go to the whole link under
/// that lock. Both directions arrive once, in order, checksums over every
/// byte; both ways of receiving ran.
#[test]
fn a_ring_link_polled_on_its_receiving_side_while_another_thread_sends() {
    polled_on_its_receiving_side_while_another_thread_sends(false);
}

/// The same, the receiving side polled as btl/ivcom polls it
/// (`ivcom_rx_take`, the messages handed up by the caller, `ivcom_rx_done`).
#[test]
fn a_ring_link_taken_from_on_its_receiving_side_while_another_thread_sends() {
    polled_on_its_receiving_side_while_another_thread_sends(true);
}

fn polled_on_its_receiving_side_while_another_thread_sends(by_take: bool) {
    let (dir, a, b, la, lb) = linked_pair(if by_take { "abi-rx-take" } else { "abi-rx" });
    // SAFETY: valid link, no other call on it now.
    let rx = unsafe { ivcom_link_rx(lb) };
    assert!(!rx.is_null(), "both sides poll: the half is given");
    // SAFETY: as above; asking again gives the same handle.
    assert_eq!(unsafe { ivcom_link_rx(lb) }, rx);
    // SAFETY: valid link.
    let max = unsafe { ivcom_link_max_inline(la) };
    let len_of = move |k: usize| match k % 97 {
        0 => max,
        5 => 3000 + k % 700,
        _ => k % 300,
    };
    const N: usize = 20_000;
    let lock = std::sync::Mutex::new(());
    let until = Instant::now() + Duration::from_secs(120);
    let (lbr, rxr) = (Raw(lb), Raw(rx));
    let (taken, full, checks) = std::thread::scope(|s| {
        // b's sender: under the lock, as btl/ivcom's senders.
        s.spawn(|| {
            let lb = lbr;
            for k in 0..N {
                let msg = pattern(k + 7, len_of(k));
                let iov = ivcom_iov {
                    base: msg.as_ptr(),
                    len: msg.len(),
                };
                loop {
                    let g = lock.lock().unwrap();
                    // SAFETY: valid link; a send runs beside the half's poll.
                    let rc = unsafe { ivcom_link_try_send(lb.0, (k % 200) as u8, &iov, 1) };
                    drop(g);
                    assert!(rc >= 0, "b send: {}", last_error());
                    if rc == 1 {
                        break;
                    }
                    assert!(Instant::now() < until, "b stuck at {k}");
                    std::thread::yield_now();
                }
            }
        });
        // b's receiver: the half without the lock, the link with it.
        let recv = s.spawn(|| {
            let (lb, rx) = (lbr, rxr);
            let mut t = Taken::default();
            let (mut full, mut checks) = (0, 0);
            while t.0.len() < N {
                assert!(Instant::now() < until, "b took {}", t.0.len());
                let ctx = &mut t as *mut Taken as *mut c_void;
                // SAFETY: this thread is the link's one receiver.
                let n = unsafe { rx_step(rx.0, ctx, by_take) };
                match n {
                    IVCOM_RX_FULL => {
                        full += 1;
                        let _g = lock.lock().unwrap();
                        // SAFETY: valid link, under the senders' lock.
                        let n = unsafe { ivcom_link_poll(lb.0, 16, Some(take), ctx) };
                        assert!(n >= 0, "b poll: {}", last_error());
                    }
                    IVCOM_RX_CHECK => {
                        checks += 1;
                        let _g = lock.lock().unwrap();
                        // SAFETY: as above.
                        assert_eq!(unsafe { ivcom_link_idle_check(lb.0) }, IVCOM_OK);
                    }
                    0 => std::thread::yield_now(),
                    n => assert!((1..=16).contains(&n), "rx poll: {n}: {}", last_error()),
                }
            }
            (t, full, checks)
        });
        // a: sends N to b, takes b's N.
        let mut answers: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut k = 0;
        while k < N || answers.len() < N {
            assert!(Instant::now() < until, "a sent {k}, took {}", answers.len());
            if k < N {
                let msg = pattern(k, len_of(k));
                let iov = ivcom_iov {
                    base: msg.as_ptr(),
                    len: msg.len(),
                };
                // SAFETY: a's link, used by this thread alone.
                match unsafe { ivcom_link_try_send(la, (k % 251) as u8, &iov, 1) } {
                    1 => k += 1,
                    0 => {}
                    rc => panic!("a send: {rc}: {}", last_error()),
                }
            }
            // SAFETY: as above; the callback only touches `answers`.
            let n = unsafe {
                ivcom_link_poll(la, 16, Some(collect), &mut answers as *mut _ as *mut c_void)
            };
            assert!(n >= 0, "a poll: {}", last_error());
        }
        for (i, (tag, m)) in answers.iter().enumerate() {
            assert_eq!(
                (*tag, &m[..]),
                ((i % 200) as u8, &pattern(i + 7, len_of(i))[..]),
                "to a {i}"
            );
        }
        let (t, full, checks) = recv.join().unwrap();
        (t.0, full, checks)
    });
    assert_eq!(taken.len(), N);
    for (k, got) in taken.iter().enumerate() {
        let msg = pattern(k, len_of(k));
        assert_eq!(
            *got,
            ((k % 251) as u8, msg.len(), checksum(&msg)),
            "to b {k}"
        );
    }
    assert!(full > 0, "the whole link took what the half left");
    eprintln!("rx half: {N} messages, {full} polls went the full way, {checks} idle checks");
    // SAFETY: valid links, not used afterwards.
    unsafe {
        ivcom_link_free(la);
        ivcom_link_free(lb);
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer that sends and then closes its end cleanly (it finalized),
/// while this side polls only the link's receiving side: every message
/// arrives, and the end is reported as the peer's close
/// (`IVCOM_E_CLOSED`), by `ivcom_link_poll` or by the idle check the half
/// asks for, never as a lost peer, however long after the close the
/// check comes.
#[test]
fn a_peer_that_closes_is_seen_closed_through_the_receiving_side() {
    closes_seen_through_the_receiving_side(false);
}

/// The same through `ivcom_rx_take` and `ivcom_rx_done`.
#[test]
fn a_peer_that_closes_is_seen_closed_through_the_receiving_side_taken_from() {
    closes_seen_through_the_receiving_side(true);
}

fn closes_seen_through_the_receiving_side(by_take: bool) {
    let (dir, a, b, la, lb) = linked_pair(if by_take {
        "abi-rx-close-take"
    } else {
        "abi-rx-close"
    });
    // SAFETY: valid link, no other call on it now.
    let rx = unsafe { ivcom_link_rx(lb) };
    assert!(!rx.is_null());
    const N: usize = 50;
    for k in 0..N {
        let msg = pattern(k, 100 + k);
        let iov = ivcom_iov {
            base: msg.as_ptr(),
            len: msg.len(),
        };
        // SAFETY: a's link; the ring holds them all.
        assert_eq!(unsafe { ivcom_link_try_send(la, 9, &iov, 1) }, 1);
    }
    // a finalizes: its end closes (ring and control connection).
    // SAFETY: valid link, not used afterwards.
    unsafe { ivcom_link_free(la) };
    // Past the link's rate limit on looks at the peer.
    std::thread::sleep(Duration::from_millis(300));
    let mut t = Taken::default();
    let until = Instant::now() + Duration::from_secs(30);
    let end = loop {
        assert!(Instant::now() < until, "no end seen");
        let ctx = &mut t as *mut Taken as *mut c_void;
        // SAFETY: this thread is the link's one receiver.
        let rc = match unsafe { rx_step(rx, ctx, by_take) } {
            // SAFETY: valid link, no other call on it.
            IVCOM_RX_FULL => unsafe { ivcom_link_poll(lb, 16, Some(take), ctx) },
            // SAFETY: as above.
            IVCOM_RX_CHECK => unsafe { ivcom_link_idle_check(lb) },
            n => n,
        };
        if rc < 0 {
            break (rc, last_error());
        }
    };
    assert_eq!(end.0, IVCOM_E_CLOSED, "the end: {}", end.1);
    assert_eq!(t.0.len(), N);
    for (k, got) in t.0.iter().enumerate() {
        let msg = pattern(k, 100 + k);
        assert_eq!(*got, (9, msg.len(), checksum(&msg)), "message {k}");
    }
    // SAFETY: valid link, not used afterwards.
    unsafe { ivcom_link_free(lb) };
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ivcom_link_peer_draining`, as btl/ivcom asks it when a progress call
/// found nothing and Open MPI would give the core away: 1 only while the
/// peer takes what was sent since the last call that said 0 (or the last
/// call but one), then for a grace of further calls; 0 when the peer took
/// nothing of it, and always with nothing outstanding. Every message is
/// checked at the receiver.
#[test]
fn a_sender_sees_its_peer_draining_only_while_it_takes_the_last_burst() {
    let (dir, a, b, la, lb) = linked_pair("abi-draining");
    let mut t = Taken::default();
    let ctx = &mut t as *mut Taken as *mut c_void;
    let mut sent = 0usize;
    let mut send = |n: usize| {
        for _ in 0..n {
            let msg = pattern(sent, 64 + sent % 200);
            let iov = ivcom_iov {
                base: msg.as_ptr(),
                len: msg.len(),
            };
            // SAFETY: a's link; the ring holds them all.
            assert_eq!(unsafe { ivcom_link_try_send(la, 3, &iov, 1) }, 1);
            sent += 1;
        }
    };
    // SAFETY (all calls below): valid links, each used by this thread only.
    let poll = |n: usize| assert_eq!(unsafe { ivcom_link_poll(lb, n, Some(take), ctx) }, n as i32);
    assert_eq!(unsafe { ivcom_link_peer_draining(la) }, 0, "nothing sent");
    send(20);
    assert_eq!(unsafe { ivcom_link_peer_draining(la) }, 0, "not reached");
    poll(16);
    poll(4);
    assert_eq!(
        unsafe { ivcom_link_peer_draining(la) },
        0,
        "taken after a 0"
    );
    send(20);
    poll(10);
    assert_eq!(unsafe { ivcom_link_peer_draining(la) }, 1, "taking it now");
    poll(10);
    let mut graced = 0;
    while unsafe { ivcom_link_peer_draining(la) } == 1 {
        graced += 1;
        assert!(graced < 1000, "never gives the core away");
    }
    assert!(graced > 0, "no grace after the last record");
    assert_eq!(unsafe { ivcom_link_peer_draining(la) }, 0);
    // The other way, with nothing sent: never.
    assert_eq!(unsafe { ivcom_link_peer_draining(lb) }, 0);
    assert_eq!(t.0.len(), 40);
    for (k, got) in t.0.iter().enumerate() {
        let msg = pattern(k, 64 + k % 200);
        assert_eq!(*got, (3, msg.len(), checksum(&msg)), "message {k}");
    }
    // SAFETY: valid links, not used afterwards.
    unsafe {
        ivcom_link_free(la);
        ivcom_link_free(lb);
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ivcom_node_ring_candidate`: a peer that shares the node's hypervisor
/// directory may share memory with it; one that shares another directory,
/// or that runs without a ring backend, may not; a card that is not one is
/// refused by name.
#[test]
fn a_node_tells_which_peers_may_share_its_memory_from_their_cards() {
    let dirs: Vec<_> = ["a", "b"]
        .iter()
        .map(|x| {
            let d = std::env::temp_dir().join(format!("ivcom-cand-{x}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
            d
        })
        .collect();
    let c = |d: &std::path::PathBuf| std::ffi::CString::new(d.to_str().unwrap()).unwrap();
    let (a, b) = (c(&dirs[0]), c(&dirs[1]));
    let me = Node::new(&a);
    let same = Node::new(&a);
    let other = Node::new(&b);
    let tcp_only = Node::with(IVCOM_BACKEND_NONE, None);
    let candidate = |card: &[u8]| {
        // SAFETY: valid node; card has card.len() readable bytes.
        unsafe { ivcom_node_ring_candidate(me.0, card.as_ptr(), card.len()) }
    };
    assert_eq!(candidate(&same.card()), 1);
    assert_eq!(candidate(&other.card()), 0);
    assert_eq!(candidate(&tcp_only.card()), 0);
    assert_eq!(candidate(b"not a card"), IVCOM_E_INVALID);
    let mut cut = same.card();
    cut.truncate(cut.len() / 2);
    assert_eq!(candidate(&cut), IVCOM_E_INVALID);
    drop((me, same, other, tcp_only));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// btl/ivcom's receive on the queue path through the C ABI: the link's
/// own whole messages in batches (`ivcom_link_take`, handed up by the
/// caller, `ivcom_link_done`), the link's poll for what a batch leaves
/// (`IVCOM_RX_FULL`: messages larger than a record, in fragments) and for
/// its look at the peer now and then. Every message arrives once, in
/// order, checksums over every byte; the batches carried most of them;
/// then the sender closes and the receiver learns it.
#[test]
fn a_queue_link_taken_from_as_btl_ivcom_does_gets_every_message_in_order() {
    let (dir, a, b, la, lb) = linked_pair_with("abi-queue-take", 64 << 10);
    // (records of 31 KiB: messages of 40,000 bytes go in fragments)
    let len_of = |k: usize| match k % 61 {
        0 => 40_000,
        9 => 4096 + k % 1000,
        _ => k % 200,
    };
    const N: usize = 20_000;
    let mut t = Taken::default();
    let (batched, polled, most) = (Cell::new(0usize), Cell::new(0usize), Cell::new(0usize));
    let until = Instant::now() + Duration::from_secs(60);
    let mut m = [ivcom_msg {
        data: std::ptr::null(),
        len: 0,
        tag: 0,
    }; IVCOM_RX_BATCH];
    // One poll of b as btl/ivcom's poll_single does it; the result of
    // the link's poll when the batches left it something, else theirs.
    let mut poll_b = |t: &mut Taken| -> i32 {
        let mut n = 0;
        loop {
            // SAFETY: valid link, this thread its one receiver; `m` has
            // room for what is asked.
            let rc = unsafe { ivcom_link_take(lb, m.as_mut_ptr(), IVCOM_RX_BATCH - n) };
            if rc == IVCOM_RX_FULL && n == 0 {
                let ctx = t as *mut Taken as *mut c_void;
                // SAFETY: valid link; the callback only records.
                let p = unsafe { ivcom_link_poll(lb, 16, Some(take), ctx) };
                polled.set(polled.get() + p.max(0) as usize);
                return p;
            }
            if rc <= 0 {
                return n as i32;
            }
            assert!(rc as usize <= IVCOM_RX_BATCH - n, "took {rc}");
            for x in &m[..rc as usize] {
                // SAFETY: taken and not done: valid.
                unsafe { take(t as *mut Taken as *mut c_void, x.tag, x.data, x.len) };
            }
            n += rc as usize;
            batched.set(batched.get() + rc as usize);
            most.set(most.get().max(n));
            // SAFETY: after a take that took messages.
            let more = unsafe { ivcom_link_done(lb) };
            assert!(more >= 0, "done: {}", last_error());
            if more == 0 || n >= IVCOM_RX_BATCH {
                return n as i32;
            }
        }
    };
    for k in 0..N {
        let msg = pattern(k, len_of(k));
        let iov = ivcom_iov {
            base: msg.as_ptr(),
            len: msg.len(),
        };
        let mut sent = 0usize;
        // SAFETY: a's link; the message is sent whole before the next.
        while unsafe { ivcom_link_try_send_more(la, (k % 251) as u8, iov.base, iov.len, &mut sent) }
            == 0
        {
            assert!(Instant::now() < until, "stuck at message {k}");
            assert!(poll_b(&mut t) >= 0, "poll b: {}", last_error());
        }
        if k % 29 == 0 {
            assert!(poll_b(&mut t) >= 0, "poll b: {}", last_error());
        }
    }
    while t.0.len() < N {
        assert!(Instant::now() < until, "{} arrived", t.0.len());
        assert!(poll_b(&mut t) >= 0, "poll b: {}", last_error());
    }
    assert_eq!(t.0.len(), N);
    for (k, got) in t.0.iter().enumerate() {
        let msg = pattern(k, len_of(k));
        assert_eq!(
            *got,
            ((k % 251) as u8, msg.len(), checksum(&msg)),
            "message {k}"
        );
    }
    let (batched, polled, most) = (batched.get(), polled.get(), most.get());
    assert!(
        batched > N / 2 && polled > 0,
        "{batched} in batches, {polled} polled"
    );
    assert!(most > 5, "at most {most} messages a poll");
    // a finalizes: b's take leaves the end to the link's poll, which says so.
    // SAFETY: valid link, not used afterwards.
    unsafe { ivcom_link_free(la) };
    let end = loop {
        assert!(Instant::now() < until, "no end seen");
        let rc = poll_b(&mut t);
        if rc < 0 {
            break rc;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(end, IVCOM_E_CLOSED, "{}", last_error());
    assert_eq!(t.0.len(), N, "nothing after the last message");
    // SAFETY: valid link, not used afterwards.
    unsafe { ivcom_link_free(lb) };
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}
