//! The ring under a hostile peer: proptest drives a real `Producer` and
//! `Consumer` on one ring while writing arbitrary bytes into the data area
//! and arbitrary values into the control page (torn headers, garbage
//! indices, lengths past the end, padding in the wrong place, a version,
//! magic or geometry changed mid-stream).
//!
//! The script interpreter and its checks live in `core/fuzz/src/script.rs`,
//! shared with the `ring_consumer` fuzz target; see that file for the list
//! of properties. This file adds the strategies, a round-trip property for
//! well-formed streams (including the notify protocol as seen from one
//! thread) and the mid-stream header change.

#[path = "../fuzz/src/script.rs"]
mod script;

use ivcom_core::ring::{self, kind, Consumer, Geometry, Producer, RECORD_HEADER};
use ivcom_core::{Error, Violation};
use proptest::prelude::*;
use script::{Anchor, Harness, Op, Word, DATA};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::VecDeque;

// ---------------------------------------------------------------------------
// Strategies

/// Mostly the indices: header words get their own ops.
fn word() -> impl Strategy<Value = Word> {
    prop_oneof![
        6 => Just(Word::Prod),
        4 => Just(Word::Cons),
        1 => Just(Word::Closed),
        1 => Just(Word::ProdWaiting),
        1 => Just(Word::ConsWaiting),
        1 => Just(Word::Nonce),
        1 => Just(Word::ProdWant),
        1 => prop::sample::select(vec![Word::Magic, Word::Geometry]),
    ]
}

fn index_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0u64..(3 * DATA as u64 / 8)).prop_map(|x| x * 8),
        0u64..(2 * DATA as u64),
        (0u64..64).prop_map(|x| u64::MAX - x),
        (0u64..64).prop_map(|x| (1u64 << 32) + 8 * x),
    ]
}

fn record_kind() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(vec![kind::MSG, kind::FIRST, kind::MORE, kind::CTRL]),
        2 => Just(kind::PAD),
        1 => any::<u8>(),
    ]
}

fn header_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..64,
        0u32..(DATA as u32),
        (0u32..16).prop_map(|x| DATA as u32 - RECORD_HEADER as u32 - 8 * x),
        (0u32..16).prop_map(|x| u32::MAX - x),
        any::<u32>(),
    ]
}

fn anchor() -> impl Strategy<Value = Anchor> {
    prop_oneof![
        (0u32..DATA as u32).prop_map(Anchor::At),
        Just(Anchor::ConsumerNext),
        Just(Anchor::ProdWord),
        Just(Anchor::ConsWord),
    ]
}

fn hostile_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u32..DATA as u32, prop::collection::vec(any::<u8>(), 1..24))
            .prop_map(|(off, data)| Op::Bytes { off, data }),
        8 => (anchor(), -4i8..4, header_len(), record_kind(), any::<u8>()).prop_map(
            |(at, delta, len, kind, tag)| Op::Header { at, delta, len, kind, tag }
        ),
        4 => (word(), index_value()).prop_map(|(word, value)| Op::Set { word, value }),
        6 => (word(), prop_oneof![(-64i64..64).prop_map(|d| d * 8), -100i64..100])
            .prop_map(|(word, delta)| Op::Nudge { word, delta }),
        1 => (0u16..3, 0u16..3).prop_map(|(version, ctrl_pages)| Op::Version { version, ctrl_pages }),
        1 => (prop_oneof![Just(DATA as u32), any::<u32>()], 0u32..4096)
            .prop_map(|(data_size, max_record)| Op::Geometry { data_size, max_record }),
    ]
}

fn api_op() -> impl Strategy<Value = Op> {
    let len = || prop_oneof![0u32..64, 0u32..(DATA as u32 / 2 + 16)];
    prop_oneof![
        6 => Just(Op::Peek),
        4 => (0u8..20, prop_oneof![Just(256u16), 0u16..=256])
            .prop_map(|(max, tag_limit)| Op::PeekMsgs { max, tag_limit }),
        3 => Just(Op::Release),
        2 => Just(Op::Flush),
        3 => Just(Op::ReleaseFlush),
        1 => Just(Op::HasData),
        1 => Just(Op::LooksEmpty),
        1 => Just(Op::PreparePage),
        1 => Just(Op::ConsumerSleep),
        1 => Just(Op::ConsumerWake),
        4 => len().prop_map(|len| Op::Reserve { len }),
        4 => (len(), any::<u8>(), any::<u8>()).prop_map(|(len, k, tag)| Op::Commit {
            len,
            kind: [kind::MSG, kind::FIRST, kind::MORE, kind::CTRL][k as usize % 4],
            tag
        }),
        1 => Just(Op::Cancel),
        3 => (len(), record_kind(), any::<u8>()).prop_map(|(len, kind, tag)| Op::Push { len, kind, tag }),
        1 => len().prop_map(|len| Op::Fits { len }),
        1 => Just(Op::ProducerSleep),
        1 => Just(Op::ProducerWake),
        1 => Just(Op::Close),
    ]
}

fn max_record() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(DATA / 4),
        Just(0usize),
        Just(DATA / 2 - RECORD_HEADER),
        0usize..=(DATA / 2 - RECORD_HEADER),
    ]
}

// ---------------------------------------------------------------------------
// Hostile pages

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Heavy corruption: about a third of the steps are hostile writes.
    #[test]
    fn hostile_pages_never_break_the_contract(
        max in max_record(),
        ops in prop::collection::vec(prop_oneof![1 => hostile_op(), 2 => api_op()], 1..300),
    ) {
        Harness::new(max).run(&ops);
    }

    /// Rare corruption in an otherwise busy stream, so that the corruption
    /// lands in the middle of live records and indices.
    #[test]
    fn rare_corruption_in_a_live_stream(
        max in max_record(),
        ops in prop::collection::vec(prop_oneof![1 => hostile_op(), 30 => api_op()], 1..600),
    ) {
        Harness::new(max).run(&ops);
    }

    /// Only the consumer's view: an arbitrary data area with a chain of
    /// mostly plausible headers from offset 0, and a producer index that is
    /// either the end of the chain or arbitrary, read with peek/release
    /// until it breaks or runs dry.
    #[test]
    fn arbitrary_data_area_and_index(
        max in max_record(),
        data in prop::collection::vec(any::<u8>(), DATA),
        chain in prop::collection::vec(
            (prop_oneof![4 => 0u32..1100, 1 => header_len()], record_kind()), 0..24),
        prod in prop_oneof![3 => Just(None), 1 => index_value().prop_map(Some)],
    ) {
        let mut h = Harness::new(max);
        h.write_data(0, &data);
        let mut pos: u64 = 0;
        for &(len, k) in &chain {
            // A padding record is made to fit the end of the ring (or not).
            let len = if k == kind::PAD && len % 2 == 0 {
                (DATA as u64 - pos % DATA as u64 - 8) as u32
            } else {
                len
            };
            if pos >= DATA as u64 {
                break;
            }
            h.step(&Op::Header { at: Anchor::At(pos as u32), delta: 0, len, kind: k, tag: 0 });
            pos = (pos + 8 + (len as u64).min(DATA as u64).div_ceil(8) * 8).min(DATA as u64);
        }
        h.write_word(Word::Prod, prod.unwrap_or(pos));
        for _ in 0..DATA / 8 + 2 {
            h.step(&Op::Peek);
            h.step(&Op::ReleaseFlush);
        }
        // A ring read to its end either broke or ran dry.
        h.step(&Op::HasData);
    }
}

/// The fuzz decoder is exercised too (and a few fixed scripts stay as
/// regression inputs).
#[test]
fn fuzz_decoder_smoke() {
    script::run_bytes(&[]);
    script::run_bytes(&[0xff; 64]);
    script::run_bytes(&(0u8..=255).collect::<Vec<_>>());
    let mut x: u32 = 1;
    for _ in 0..200 {
        let v: Vec<u8> = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        script::run_bytes(&v);
    }
}

// ---------------------------------------------------------------------------
// Well-formed streams

/// One ring in private aligned memory, for the tests below.
struct Mem {
    base: *mut u8,
    layout: Layout,
}

impl Mem {
    fn new(geo: Geometry) -> Mem {
        let layout = Layout::from_size_align(geo.ring_bytes(), 4096).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null());
        // SAFETY: fresh private memory of ring_bytes(), 4096-aligned.
        unsafe { ring::init(base, geo, 7) };
        Mem { base, layout }
    }

    fn ends(&self, geo: Geometry) -> (Producer, Consumer) {
        // SAFETY: the mapping outlives both ends (they are dropped first in
        // every test); one producer and one consumer.
        unsafe {
            (
                Producer::new(self.base, geo).unwrap(),
                Consumer::new(self.base, geo).unwrap(),
            )
        }
    }

    fn set_word(&self, off: usize, v: u64) {
        // SAFETY: an 8-aligned word of the control page.
        unsafe { std::ptr::write_volatile(self.base.add(off) as *mut u64, v) }
    }

    fn word(&self, off: usize) -> u64 {
        // SAFETY: an 8-aligned word of the control page.
        unsafe { std::ptr::read_volatile(self.base.add(off) as *const u64) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

/// `CLOCK_MONOTONIC_COARSE` now, the clock the producer's early wrap reads.
fn coarse_now() -> (libc::time_t, libc::c_long) {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec to write.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) },
        0
    );
    (t.tv_sec, t.tv_nsec)
}

/// A xorshift64 generator from `seed` (not zero): random enough to vary
/// bursts and sizes, and the same every run.
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as u8).wrapping_mul(31) ^ (i as u8) ^ ((i >> 8) as u8).wrapping_mul(7))
        .collect()
}

#[derive(Debug, Clone)]
enum Step {
    /// Produce one record: reserve `cap >= len` bytes, commit `len`.
    Produce {
        len: u32,
        extra: u32,
        kind: u8,
        tag: u8,
    },
    /// Produce one record with `push`.
    Push {
        len: u32,
        kind: u8,
        tag: u8,
    },
    /// Consume up to `n` records (peeking each twice).
    Consume {
        n: u8,
        flush_each: bool,
    },
    Flush,
    /// Consumer finds the ring empty and goes to sleep (if it is empty).
    ConsumerSleep,
    /// Consumer wakes up on its own (time-out).
    ConsumerWake,
}

fn step() -> impl Strategy<Value = Step> {
    let len = || prop_oneof![0u32..16, 0u32..=(DATA as u32 / 2)];
    let k = || prop::sample::select(vec![kind::MSG, kind::FIRST, kind::MORE, kind::CTRL]);
    prop_oneof![
        4 => (len(), 0u32..64, k(), any::<u8>())
            .prop_map(|(len, extra, kind, tag)| Step::Produce { len, extra, kind, tag }),
        2 => (len(), k(), any::<u8>()).prop_map(|(len, kind, tag)| Step::Push { len, kind, tag }),
        4 => (1u8..8, any::<bool>()).prop_map(|(n, flush_each)| Step::Consume { n, flush_each }),
        1 => Just(Step::Flush),
        1 => Just(Step::ConsumerSleep),
        1 => Just(Step::ConsumerWake),
    ]
}

struct Stream {
    tx: Producer,
    rx: Consumer,
    max: usize,
    seq: u64,
    expected: VecDeque<(u8, u8, Vec<u8>)>,
    consumer_sleeps: bool,
    producer_sleeps: bool,
    unflushed: bool,
    delivered: u64,
}

impl Stream {
    fn new(tx: Producer, rx: Consumer) -> Stream {
        let max = tx.max_record();
        Stream {
            tx,
            rx,
            max,
            seq: 0,
            expected: VecDeque::new(),
            consumer_sleeps: false,
            producer_sleeps: false,
            unflushed: false,
            delivered: 0,
        }
    }

    fn committed(&mut self, notify: bool) {
        assert_eq!(
            notify, self.consumer_sleeps,
            "commit must ring exactly when the consumer announced sleep"
        );
        self.consumer_sleeps = false;
    }

    /// A smaller record fitted while the producer had announced sleep: it
    /// carries on without waiting and withdraws the announcement.
    fn woke(&mut self) {
        if self.producer_sleeps {
            self.tx.finish_sleep();
            self.producer_sleeps = false;
        }
    }

    fn full(&mut self) {
        // The producer found the ring full: it announces sleep. Nothing
        // moved since reserve reloaded the consumer index, so it may sleep.
        assert!(self.tx.prepare_sleep().unwrap(), "full ring, but no sleep");
        self.producer_sleeps = true;
    }

    fn produce(&mut self, len: usize, cap: usize, k: u8, tag: u8) {
        let cap = cap.min(self.max);
        let len = len.min(cap);
        match self.tx.reserve(cap).unwrap() {
            Some(p) => {
                self.woke();
                let data = payload(self.seq, len);
                // SAFETY: reserve returned room for cap >= len bytes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, len) };
                let notify = self.tx.commit(len, k, tag);
                self.committed(notify);
                self.expected.push_back((k, tag, data));
                self.seq += 1;
            }
            None => self.full(),
        }
    }

    fn push(&mut self, len: usize, k: u8, tag: u8) {
        let len = len.min(self.max);
        let data = payload(self.seq, len);
        let (a, b) = data.split_at(len / 2);
        match self.tx.push(k, tag, &[a, &[], b]).unwrap() {
            Some(notify) => {
                self.woke();
                self.committed(notify);
                self.expected.push_back((k, tag, data));
                self.seq += 1;
            }
            None => self.full(),
        }
    }

    fn flush(&mut self) {
        let notify = self.rx.flush();
        assert_eq!(
            notify,
            self.producer_sleeps && self.unflushed,
            "flush must ring exactly when it frees space for a sleeping producer"
        );
        if notify {
            // The producer wakes up; the flag was cleared by the flush.
            self.tx.finish_sleep();
            self.producer_sleeps = false;
        }
        self.unflushed = false;
    }

    /// Consumes one record; false when the ring is empty.
    fn consume(&mut self, flush: bool) -> bool {
        let first = self.rx.peek().unwrap();
        let Some(rec) = first else {
            assert!(
                self.expected.is_empty(),
                "peek saw nothing, but records are committed"
            );
            return false;
        };
        // A second peek without release returns the same record.
        let again = self.rx.peek().unwrap().unwrap();
        assert_eq!((again.ptr, again.len), (rec.ptr, rec.len));
        let (k, tag, data) = self
            .expected
            .pop_front()
            .expect("record that was never sent");
        assert_eq!((rec.kind, rec.tag, rec.len), (k, tag, data.len()));
        // SAFETY: valid until release.
        assert_eq!(
            unsafe { rec.payload() }.to_vec(),
            &data[..],
            "payload differs"
        );
        self.rx.release();
        self.unflushed = true;
        self.delivered += 1;
        if flush {
            self.flush();
        }
        true
    }

    fn run(&mut self, s: &Step) {
        match *s {
            Step::Produce {
                len,
                extra,
                kind,
                tag,
            } => self.produce(len as usize, len as usize + extra as usize, kind, tag),
            Step::Push { len, kind, tag } => self.push(len as usize, kind, tag),
            Step::Consume { n, flush_each } => {
                for _ in 0..n {
                    if !self.consume(flush_each) {
                        break;
                    }
                }
            }
            Step::Flush => self.flush(),
            Step::ConsumerSleep => {
                if self.expected.is_empty() && !self.consumer_sleeps {
                    assert!(self.rx.peek().unwrap().is_none());
                    assert!(self.rx.prepare_sleep().unwrap(), "empty ring, but no sleep");
                    self.consumer_sleeps = true;
                }
            }
            Step::ConsumerWake => {
                self.rx.finish_sleep();
                self.consumer_sleeps = false;
            }
        }
    }

    /// Drains everything, closes and checks the close is seen.
    fn finish(mut self) -> u64 {
        while self.consume(false) {}
        self.flush();
        assert!(self.expected.is_empty());
        let notify = self.tx.close();
        self.committed(notify);
        assert!(matches!(self.rx.peek(), Err(Error::Closed)));
        self.delivered
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Records of random sizes 0..=max_record written by a real producer,
    /// with a random interleaving of produce and consume steps, are read back
    /// exactly, in order; the doorbell is asked for exactly when the other
    /// side announced sleep.
    #[test]
    fn well_formed_stream_round_trips(
        max in max_record(),
        steps in prop::collection::vec(step(), 1..400),
    ) {
        let geo = Geometry::with_max_record(DATA, max).unwrap();
        let mem = Mem::new(geo);
        let (tx, rx) = mem.ends(geo);
        let mut s = Stream::new(tx, rx);
        for st in &steps {
            s.run(st);
        }
        s.finish();
        drop(mem);
    }

    /// A header word changed mid-stream (version, magic or geometry) breaks
    /// both ends with the matching violation: the consumer once it has used
    /// up the producer index it already saw, the producer once it needs to
    /// reload the consumer index. Records delivered before are intact.
    #[test]
    fn header_change_mid_stream_breaks_the_ring(
        steps in prop::collection::vec(step(), 0..100),
        which in 0u8..3,
    ) {
        let geo = Geometry::new(DATA).unwrap();
        let mem = Mem::new(geo);
        let (tx, rx) = mem.ends(geo);
        let mut s = Stream::new(tx, rx);
        for st in &steps {
            s.run(st);
        }
        let header = ring::MAGIC as u64 | (ring::VERSION as u64) << 32 | 1u64 << 48;
        let geometry = geo.data_size as u64 | (geo.max_record as u64) << 32;
        let want = match which {
            0 => {
                mem.set_word(ring::OFF_MAGIC, header + (1 << 32));
                Violation::BadVersion
            }
            1 => {
                mem.set_word(ring::OFF_MAGIC, header ^ 0x20);
                Violation::BadMagic
            }
            _ => {
                mem.set_word(ring::OFF_GEOMETRY, geometry * 2);
                Violation::BadGeometry
            }
        };
        // Consumer: at most the already-committed records, then the error.
        let mut seen = 0;
        let limit = s.expected.len() + 1;
        let err = loop {
            match s.rx.peek() {
                Ok(Some(rec)) => {
                    let (k, tag, data) = s.expected.pop_front().expect("never sent");
                    prop_assert_eq!((rec.kind, rec.tag), (k, tag));
                    // SAFETY: valid until release.
                    prop_assert_eq!(unsafe { rec.payload() }.to_vec(), &data[..]);
                    s.rx.release();
                    seen += 1;
                    prop_assert!(seen <= limit);
                }
                Ok(None) => prop_assert!(false, "changed header not noticed"),
                Err(e) => break e,
            }
        };
        prop_assert!(matches!(err, Error::Broken(v) if v == want), "{:?}", err);
        prop_assert!(matches!(s.rx.peek(), Err(Error::Broken(v)) if v == want));
        prop_assert!(matches!(s.rx.has_data(), Err(Error::Broken(v)) if v == want));
        s.rx.flush();
        // Producer: fill the ring with empty records until it must reload.
        let mut n = 0;
        let perr = loop {
            match s.tx.reserve(0) {
                Ok(Some(_)) => {
                    s.tx.commit(0, kind::MSG, 0);
                }
                Ok(None) => prop_assert!(false, "full ring without noticing"),
                Err(e) => break e,
            }
            n += 1;
            prop_assert!(n <= DATA / 8 + 1);
        };
        prop_assert!(matches!(perr, Error::Broken(v) if v == want), "{:?}", perr);
        prop_assert!(matches!(s.tx.reserve(0), Err(Error::Broken(v)) if v == want));
        prop_assert!(matches!(s.tx.push(kind::MSG, 0, &[]), Err(Error::Broken(v)) if v == want));
    }
}

/// The plain case: a version word changed between two records.
#[test]
fn changed_version_mid_stream_is_bad_version() {
    let geo = Geometry::new(DATA).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    tx.push(kind::MSG, 1, &[b"first"]).unwrap().unwrap();
    let r = rx.peek().unwrap().unwrap();
    // SAFETY: valid until release.
    assert_eq!(unsafe { r.payload() }.to_vec(), b"first");
    rx.release_flush();
    // The peer now speaks another version.
    let other = ring::MAGIC as u64 | ((ring::VERSION as u64 + 1) << 32) | 1u64 << 48;
    mem.set_word(ring::OFF_MAGIC, other);
    tx.push(kind::MSG, 2, &[b"second"]).unwrap().unwrap();
    // A record published by its header is taken as it is (the consumer
    // reads no control word on the way); the change is noticed as soon as
    // the ring runs empty.
    let r = rx.peek().unwrap().unwrap();
    // SAFETY: valid until release.
    assert_eq!(unsafe { r.payload() }.to_vec(), b"second");
    rx.release_flush();
    assert!(matches!(
        rx.peek(),
        Err(Error::Broken(Violation::BadVersion))
    ));
    assert!(matches!(
        rx.peek(),
        Err(Error::Broken(Violation::BadVersion))
    ));
    assert!(matches!(
        rx.has_data(),
        Err(Error::Broken(Violation::BadVersion))
    ));
}

/// A broken ring keeps reporting its first violation, even when a later
/// call (here `prepare_sleep`, which reloads the producer index) meets
/// another one.
#[test]
fn first_violation_sticks() {
    let geo = Geometry::new(DATA).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    // A record of an unknown type.
    let p = tx.reserve(8).unwrap().unwrap();
    // SAFETY: 8 reserved bytes.
    unsafe { std::ptr::write_bytes(p, 0, 8) };
    tx.commit(8, 0x55, 0);
    assert!(matches!(rx.peek(), Err(Error::Broken(Violation::BadType))));
    // Then the magic goes and the index moves.
    mem.set_word(ring::OFF_MAGIC, 0);
    tx.push(kind::MSG, 0, &[b"x"]).unwrap().unwrap();
    assert!(matches!(
        rx.prepare_sleep(),
        Err(Error::Broken(Violation::BadType))
    ));
    assert!(matches!(rx.peek(), Err(Error::Broken(Violation::BadType))));
    assert!(matches!(
        rx.has_data(),
        Err(Error::Broken(Violation::BadType))
    ));
}

/// Long well-formed streams through every record size, wrapping the ring
/// many times.
#[test]
fn every_size_round_trips() {
    for max in [0, 8, 100, DATA / 4, DATA / 2 - RECORD_HEADER] {
        let geo = Geometry::with_max_record(DATA, max).unwrap();
        let mem = Mem::new(geo);
        let (tx, rx) = mem.ends(geo);
        let mut s = Stream::new(tx, rx);
        for len in 0..=max.min(1500) {
            s.produce(len, len, kind::MSG, len as u8);
            if len % 3 == 0 {
                s.run(&Step::Consume {
                    n: 3,
                    flush_each: len % 2 == 0,
                });
            }
            if s.producer_sleeps {
                s.run(&Step::Consume {
                    n: 8,
                    flush_each: false,
                });
                s.flush();
            }
        }
        let n = s.finish();
        assert!(n > 0);
    }
}

/// Offset of a record's payload in the data area of the ring at `mem`.
fn offset(mem: &Mem, r: &ring::Record) -> usize {
    r.ptr as usize - (mem.base as usize + ring::CTRL_BYTES)
}

/// Pushes record `seq` (`len` bytes of [`payload`], `tag`) after `heard`
/// and takes it at once, checking its length, tag and every byte; returns
/// its payload's offset in the data area.
fn push_and_take(
    mem: &Mem,
    tx: &mut Producer,
    rx: &mut Consumer,
    (seq, len, tag): (u64, usize, u8),
    heard: u64,
) -> usize {
    let data = payload(seq, len);
    tx.push_heard(kind::MSG, tag, &[&data], heard)
        .unwrap()
        .expect("room");
    let r = rx.peek().unwrap().unwrap();
    assert_eq!((r.len, r.tag), (len, tag));
    // SAFETY: valid until release.
    assert_eq!(unsafe { r.payload() }.to_vec(), data, "record {seq}");
    let at = offset(mem, &r);
    rx.release_flush();
    at
}

/// Takes the next record, which must hold `payload(*next, len)`, counts it
/// and releases it; returns its payload's offset, `None` when the ring is
/// empty.
fn take_expected(mem: &Mem, rx: &mut Consumer, next: &mut u64, len: usize) -> Option<usize> {
    let r = rx.peek().unwrap()?;
    // SAFETY: valid until release.
    assert_eq!(
        unsafe { r.payload() }.to_vec(),
        payload(*next, len),
        "record {next}"
    );
    let at = offset(mem, &r);
    *next += 1;
    rx.release_flush();
    Some(at)
}

/// A consumer that keeps up: the producer wraps early (when its next
/// record would end past REWIND_AT, fits before the producer's offset, and
/// the ring is empty), so 4 MiB through a 256 KiB ring (below
/// `ring::LONG_LAP_MIN`, where large records wrap early too) never reach
/// past its first REWIND_AT bytes, nor past two records when records are
/// larger than half of it; every byte and the order intact.
#[test]
fn a_ring_that_is_kept_empty_is_used_from_its_start() {
    for (base, step, bound) in [
        (1000, 8, ring::REWIND_AT as usize),
        // records of 6-12 KiB: two at most below REWIND_AT
        (6 << 10, 1000, 2 * ((6 << 10) + 6 * 1000 + RECORD_HEADER)),
        // records larger than REWIND_AT: at offset 0 or after one record
        (20 << 10, 1000, 2 * ((20 << 10) + 6 * 1000 + RECORD_HEADER)),
    ] {
        let geo = Geometry::new(256 << 10).unwrap();
        let mem = Mem::new(geo);
        let (mut tx, mut rx) = mem.ends(geo);
        let mut highest = 0;
        let mut wraps = 0;
        let mut last = 0;
        let n = 4096u64.min((4 << 20) / base as u64);
        for seq in 0..n {
            let len = base + (seq as usize % 7) * step;
            let data = payload(seq, len);
            tx.push(kind::MSG, (seq % 200) as u8, &[&data])
                .unwrap()
                .unwrap_or_else(|| panic!("{base}: record {seq} did not fit"));
            let r = rx.peek().unwrap().unwrap();
            assert_eq!((r.len, r.tag), (len, (seq % 200) as u8));
            // SAFETY: valid until release.
            assert_eq!(unsafe { r.payload() }.to_vec(), data, "record {seq}");
            let at = offset(&mem, &r);
            if at < last {
                wraps += 1;
            }
            last = at;
            highest = highest.max(at + len);
            rx.release_flush();
        }
        assert!(
            highest <= bound,
            "{base}: reached offset {highest}, bound {bound}"
        );
        assert!(wraps as u64 >= n / 20, "{base}: {wraps} early wraps of {n}");
        assert!(rx.peek().unwrap().is_none());
    }
}

/// A ring whose wrap offset reaches `ring::LONG_LAP_MIN` (few peers):
/// a lap that holds records larger than `ring::WRAP_BEHIND_MAX` runs on
/// to `ring::LONG_LAP` even with the consumer keeping the ring empty (a
/// ping-pong's ring, empty at every message), so that a line is written
/// again only after the receiving core's caches let it go, and wraps
/// there (a 2 MiB ring's second MiB stays untouched); smaller records
/// still wrap early within REWIND_AT, also after large ones; every byte
/// and the order intact.
#[test]
fn large_records_on_a_ring_with_few_peers_run_long_laps() {
    let geo = Geometry::new(2 << 20).unwrap();
    assert!(geo.data_size as u64 >= ring::LONG_LAP_MIN);
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    let mut seq = 0u64;
    // `hears`: the producer heard from its peer before this record (an
    // exchange: as many bytes as it sends, the channel's count), else a
    // stream.
    let mut send = |tx: &mut Producer, rx: &mut Consumer, len: usize, hears: bool| -> usize {
        let heard = if hears { (seq + 1) * len as u64 } else { 0 };
        let at = push_and_take(&mem, tx, rx, (seq, len, 7), heard);
        seq += 1;
        at
    };
    // Three laps of 20 KiB records: each wraps right past LONG_LAP.
    let len = 20 << 10;
    let rec = len + RECORD_HEADER;
    let lap = ring::LONG_LAP as usize;
    let (mut highest, mut last, mut wraps) = (0, 0, 0);
    for _ in 0..3 * (lap / rec) + 2 {
        let at = send(&mut tx, &mut rx, len, false);
        if at < last {
            assert!(last + len + rec > lap, "an early wrap at {last}");
            wraps += 1;
        }
        last = at;
        highest = highest.max(at + len);
    }
    assert!(wraps >= 2, "{wraps} wraps");
    assert!(
        highest > lap - rec && highest <= lap + rec,
        "reached {highest}"
    );
    // Small records streamed after them stay in the long lap up to
    // LONG_LAP, then wrap early again: within REWIND_AT of the start once
    // they have wrapped (4 MiB of them; small: not medium records, which
    // a stream takes on long laps, see the next test).
    let small = 500;
    assert!((RECORD_HEADER + small) as u64 <= ring::MEDIUM_MIN);
    let mut wrapped = false;
    for _ in 0..(4 << 20) / small {
        let at = send(&mut tx, &mut rx, small, false);
        if at < last && !wrapped {
            assert!(
                last + 2 * (small + RECORD_HEADER) > lap,
                "an early wrap at {last}"
            );
            wrapped = true;
        }
        last = at;
        if wrapped {
            assert!(
                at + small <= ring::REWIND_AT as usize + small + RECORD_HEADER,
                "at {at}"
            );
        }
    }
    assert!(wrapped);
    // Large records again, the lap long at its third (at 40 KiB); then an
    // exchange of small records (each after news from the peer) ends it
    // after LONG_LAP_SMALL_LOOKS looks and wraps early: a pair that went
    // small after a burst does not hold the lap open.
    loop {
        let at = send(&mut tx, &mut rx, len, false);
        let wrapped = at < last;
        last = at;
        if wrapped {
            break;
        }
    }
    for _ in 0..2 {
        last = send(&mut tx, &mut rx, len, false);
    }
    let mut n = 0;
    loop {
        let at = send(&mut tx, &mut rx, 1000, true);
        n += 1;
        if at < last {
            break;
        }
        last = at;
        // (LONG_LAP_SMALL_LOOKS looks, and the one that wraps)
        assert!(
            n <= 9,
            "no early wrap after {n} small records in an exchange, at {at}"
        );
    }
    assert!(rx.peek().unwrap().is_none());
}

/// The ring and records of the medium-stream tests: a 2 MiB ring (few
/// peers: its wrap offset lies past `ring::LONG_LAP_MIN`), its two ends,
/// and records of 1,000 bytes of payload (`len`), `rec` with their header:
/// medium, more than `ring::MEDIUM_MIN` and at most
/// `ring::WRAP_BEHIND_MAX`. (The ends go before the memory: declared
/// after it, they are dropped first.)
fn medium_ring() -> (Mem, Producer, Consumer, usize, usize) {
    let geo = Geometry::new(2 << 20).unwrap();
    let mem = Mem::new(geo);
    let (tx, rx) = mem.ends(geo);
    let len = 1000usize;
    let rec = RECORD_HEADER + len.next_multiple_of(8);
    assert!(rec as u64 > ring::MEDIUM_MIN && rec as u64 <= ring::WRAP_BEHIND_MAX);
    (mem, tx, rx, len, rec)
}

/// Medium records (1,000 bytes: more than `ring::MEDIUM_MIN` with their
/// header, at most `ring::WRAP_BEHIND_MAX`) on a ring with few peers: a
/// one-way stream of them over fresh pages wraps early (within
/// `REWIND_AT`) until it has run `ring::MEDIUM_STREAM_COLD` bytes, then
/// runs laps to `ring::LONG_LAP`, never the second MiB; the same records
/// in an exchange (the producer hears as much as it sends) end such a lap
/// within `LONG_LAP_SMALL_LOOKS` looks and keep short laps; a one-way
/// stream again, now over pages that the long laps left, goes long after
/// `ring::MEDIUM_STREAM` bytes. Every byte and the order checked.
#[test]
fn a_one_way_stream_of_medium_records_runs_long_laps_once_it_has_run_a_while() {
    let (mem, mut tx, mut rx, len, rec) = medium_ring();
    let short = ring::REWIND_AT as usize + rec;
    let (mut seq, mut heard, mut last) = (0u64, 0u64, 0usize);
    // One record, taken at once (the consumer keeps the ring empty);
    // `hears`: the peer sent as much before it.
    let mut send = |hears: bool| -> (usize, u64) {
        if hears {
            heard += rec as u64;
        }
        let at = push_and_take(&mem, &mut tx, &mut rx, (seq, len, 3), heard);
        seq += 1;
        (at, seq)
    };
    // Over fresh pages.
    let cold = ring::MEDIUM_STREAM_COLD as usize;
    one_way(&mut send, &mut last, rec, cold + (3 << 20), cold);
    // Into a long lap again, then an exchange of the same records.
    while last < 64 << 10 {
        last = send(false).0;
    }
    let mut n = 0;
    loop {
        let at = send(true).0;
        n += 1;
        let wrapped = at < last;
        last = at;
        if wrapped {
            break;
        }
        assert!(
            n <= 9,
            "no early wrap after {n} records of an exchange, at {at}"
        );
    }
    for _ in 0..(2 << 20) / rec {
        let at = send(true).0;
        assert!(at + rec <= short, "an exchange's record at {at}");
    }
    // A stream again: the first MiB's pages are there.
    let warm = ring::MEDIUM_STREAM as usize;
    one_way(&mut send, &mut last, rec, warm + (3 << 20), warm);
    assert!(rx.peek().unwrap().is_none());
    drop((tx, rx));
    // (a producer that gives nothing back asks its consumer for nothing)
    assert_eq!(mem.word(ring::OFF_PROD_WANT), 0);
}

/// A one-way stream of `bytes` in records of `rec` bytes (header
/// included), each sent by `send(false)` (which answers where it went and
/// its number), `last` where the one before went: short laps while the
/// stream has run at most `short_for`, then at least two long ones, none
/// past `ring::LONG_LAP`.
fn one_way(
    send: &mut dyn FnMut(bool) -> (usize, u64),
    last: &mut usize,
    rec: usize,
    bytes: usize,
    short_for: usize,
) {
    let (lap, short) = (ring::LONG_LAP as usize, ring::REWIND_AT as usize + rec);
    let (mut written, mut long_wraps, mut highest) = (0, 0, 0);
    for _ in 0..bytes / rec {
        let (at, seq) = send(false);
        written += rec;
        if at < *last {
            if written <= short_for {
                assert!(
                    *last + rec <= short,
                    "record {seq}: a short lap reached {last}"
                );
            } else if *last + rec > short {
                assert!(
                    *last + 2 * rec > lap,
                    "record {seq}: a long lap wrapped at {last}"
                );
                long_wraps += 1;
            }
        }
        *last = at;
        highest = highest.max(at + rec);
    }
    assert!(long_wraps >= 2, "{long_wraps} long laps after {short_for}");
    assert!(
        highest > lap - rec && highest <= lap + rec,
        "reached {highest}"
    );
}

/// A consumer asked to prepare pages that the kernel will not give (here
/// pages past the end of the file the ring lies in, which a read would
/// meet with SIGBUS; in a real job, a memory cgroup at its limit) leaves
/// them: the call prepares nothing, reads none of them and does not say
/// they are there, and the next calls of that epoch do nothing either.
/// The pages before the end are prepared by a request that stops there.
#[test]
fn a_consumer_leaves_pages_that_the_kernel_refuses_and_does_not_claim_them() {
    let geo = Geometry::new(2 << 20).unwrap();
    let ctrl = geo.ring_bytes() - (2 << 20);
    // SAFETY: a fresh memfd mapped shared for ring_bytes(); unmapped at
    // the end of the test, after the consumer's last use.
    let (fd, base) = unsafe {
        let fd = libc::memfd_create(c"ring".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, geo.ring_bytes() as libc::off_t), 0);
        let p = libc::mmap(
            std::ptr::null_mut(),
            geo.ring_bytes(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        ring::init(p.cast(), geo, 7);
        (fd, p.cast::<u8>())
    };
    // SAFETY: the mapping outlives the consumer's uses.
    let mut rx = unsafe { Consumer::new(base, geo) }.unwrap();
    let word = |off: usize| {
        // SAFETY: an 8-aligned word of the control page.
        unsafe { &*base.add(off).cast::<std::sync::atomic::AtomicU64>() }
    };
    // The file ends 128 KiB into the data area: pages from there on are
    // beyond it.
    let file_end = ring::KEEP_BYTES + (64 << 10);
    // SAFETY: fd is ours.
    assert_eq!(
        unsafe { libc::ftruncate(fd, (ctrl as u64 + file_end) as libc::off_t) },
        0
    );
    use std::sync::atomic::Ordering::Relaxed;
    word(ring::OFF_PROD_WANT).store(3 << 32 | ring::LONG_LAP, Relaxed);
    assert_eq!(rx.prepare_pages(), 0, "pages past the end of the file");
    assert_eq!(word(ring::OFF_CONS_READY).load(Relaxed), 0, "claimed");
    assert_eq!(rx.prepare_pages(), 0, "the same epoch again");
    assert_eq!(word(ring::OFF_CONS_READY).load(Relaxed), 0);
    // A request that ends where the file does is prepared and answered.
    word(ring::OFF_PROD_WANT).store(4 << 32 | file_end, Relaxed);
    assert_eq!(rx.prepare_pages(), (file_end - ring::KEEP_BYTES) / 4096);
    assert_eq!(word(ring::OFF_CONS_READY).load(Relaxed), 4 << 32 | file_end);
    // SAFETY: ours; the consumer (no destructor) is not used after this.
    unsafe {
        libc::munmap(base.cast(), geo.ring_bytes());
        libc::close(fd);
    }
}

/// A producer whose pages come with their first write and go back with
/// the give-back (the host backend's) asks its consumer, once a one-way
/// medium stream has run `ring::MEDIUM_PREPARE`, to prepare the pages of a
/// long lap; a consumer that prepares at each record it takes (a receiver
/// whose polls find nothing between records) has them all (in one call,
/// or one page a call where the memory cannot be populated as a range),
/// says so, and the stream runs long laps from there, after
/// `ring::MEDIUM_STREAM`, not `ring::MEDIUM_STREAM_COLD`. The consumer
/// touches exactly the pages from `ring::KEEP_BYTES` to `ring::LONG_LAP`.
/// A forged request is bounded by the data area and touches each page
/// once, in one call or (where the memory cannot be populated as a range)
/// a page a call; one of epoch 0 touches none; the producer, of another epoch,
/// takes no answer to it for its own. Every byte and the order checked.
#[test]
fn a_medium_stream_has_its_consumer_prepare_the_long_laps_pages_and_runs_them_once_they_are_there()
{
    let (mem, mut tx, mut rx, len, rec) = medium_ring();
    tx.give_back_idle_pages(std::time::Duration::from_secs(3600));
    let (mut seq, mut last, mut touched) = (0u64, 0usize, 0usize);
    let mut asked_at = None;
    let mut send = |_: bool| -> (usize, u64) {
        let at = push_and_take(&mem, &mut tx, &mut rx, (seq, len, 3), 0);
        seq += 1;
        if asked_at.is_none() && mem.word(ring::OFF_PROD_WANT) != 0 {
            asked_at = Some(seq as usize * rec);
        }
        touched += rx.prepare_pages() as usize;
        (at, seq)
    };
    let warm = ring::MEDIUM_STREAM as usize;
    one_way(&mut send, &mut last, rec, warm + (3 << 20), warm);
    let asked_at = asked_at.expect("the producer never asked");
    assert!(
        asked_at >= ring::MEDIUM_PREPARE as usize
            && asked_at <= ring::MEDIUM_PREPARE as usize + ring::REWIND_AT as usize + rec,
        "asked after {asked_at} bytes"
    );
    let (keep, lap) = (ring::KEEP_BYTES, ring::LONG_LAP);
    assert_eq!(mem.word(ring::OFF_PROD_WANT), 1 << 32 | lap);
    assert_eq!(mem.word(ring::OFF_CONS_READY), 1 << 32 | lap);
    assert_eq!(touched as u64, (lap - keep) / 4096);
    // A forged request: up to the end of the data area, each page once.
    mem.set_word(ring::OFF_PROD_WANT, 9 << 32 | 0xFFFF_F000);
    let mut n = 0u64;
    loop {
        let pages = rx.prepare_pages();
        if pages == 0 {
            break;
        }
        n += pages;
        assert!(n <= (2 << 20) / 4096, "past the data area");
    }
    assert_eq!(n, ((2 << 20) - keep) / 4096);
    assert_eq!(mem.word(ring::OFF_CONS_READY), 9 << 32 | 2 << 20);
    assert_eq!(rx.prepare_pages(), 0);
    // Where the memory cannot be populated as a range: a page a call, the
    // answer once all are read.
    rx.prepare_a_page_a_call();
    mem.set_word(ring::OFF_PROD_WANT, 10 << 32 | 0xFFFF_F000);
    let mut calls = 0u64;
    while rx.prepare_pages() == 1 {
        calls += 1;
        let ready = mem.word(ring::OFF_CONS_READY);
        assert!(
            calls == ((2 << 20) - keep) / 4096 || ready == 9 << 32 | 2 << 20,
            "answered after {calls} pages"
        );
    }
    assert_eq!(calls, ((2 << 20) - keep) / 4096);
    assert_eq!(mem.word(ring::OFF_CONS_READY), 10 << 32 | 2 << 20);
    assert_eq!(rx.prepare_pages(), 0);
    mem.set_word(ring::OFF_PROD_WANT, 0xFFFF_FFFF);
    assert_eq!(rx.prepare_pages(), 0, "a request of epoch 0");
    // The stream goes on as it was, every byte checked.
    for _ in 0..(2 << 20) / rec {
        let at = push_and_take(&mem, &mut tx, &mut rx, (seq, len, 3), 0);
        assert!(at + rec <= lap as usize + rec, "record {seq} at {at}");
        seq += 1;
    }
    assert!(rx.peek().unwrap().is_none());
}

/// Where the backend allocates a ring's pages up front (Xen's granted
/// pages: `Producer::pages_up_front`), no lap pays for fresh pages: a
/// one-way stream of medium records goes long after
/// `ring::MEDIUM_STREAM`, the first time too, not after
/// `ring::MEDIUM_STREAM_COLD`. Every byte and the order checked.
#[test]
fn a_medium_stream_over_pages_allocated_up_front_runs_long_laps_from_its_first_mib() {
    let (mem, mut tx, mut rx, len, rec) = medium_ring();
    tx.pages_up_front();
    let (mut seq, mut last) = (0u64, 0usize);
    let mut send = |_: bool| -> (usize, u64) {
        let at = push_and_take(&mem, &mut tx, &mut rx, (seq, len, 3), 0);
        seq += 1;
        (at, seq)
    };
    let warm = ring::MEDIUM_STREAM as usize;
    one_way(&mut send, &mut last, rec, warm + (3 << 20), warm);
    assert!(rx.peek().unwrap().is_none());
}

/// Waits until the coarse clock moved (a sleep of a tick is not always
/// enough on a loaded virtual machine, whose ticks come late).
fn wait_for_tick() {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec to write.
    assert_eq!(
        unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) },
        0
    );
    let tick = std::time::Duration::new(res.tv_sec as u64, res.tv_nsec as u32);
    let t0 = coarse_now();
    while coarse_now() == t0 {
        std::thread::sleep(tick / 4);
    }
}

/// `rounds` records of `len` bytes on a fresh 256 KiB ring (below
/// `ring::LONG_LAP_MIN`: large records wrap early there), a tick of the
/// coarse clock before each from round `slow_from` on. The consumer is
/// behind by one record most of the time and catches up at every third;
/// the producer passes the count of records taken when `hears` (as if it
/// heard from its peer), 0 otherwise. Returns the highest offset a record
/// reached; every byte and the order are checked.
fn exchange(len: usize, rounds: usize, slow_from: usize, hears: bool) -> usize {
    let geo = Geometry::new(256 << 10).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    let (mut sent, mut next, mut heard, mut highest) = (0u64, 0u64, 0u64, 0usize);
    for round in 0..rounds {
        if round >= slow_from {
            wait_for_tick();
        }
        let data = payload(sent, len);
        let h = if hears { heard } else { 0 };
        tx.push_heard(kind::MSG, 1, &[&data], h)
            .unwrap()
            .expect("room");
        sent += 1;
        // Take all but the newest record, or everything at every third.
        let keep = u64::from(round % 3 != 2);
        while sent - next > keep {
            let at = take_expected(&mem, &mut rx, &mut next, len).expect("a record");
            highest = highest.max(at + len);
            heard += 1;
        }
    }
    while take_expected(&mem, &mut rx, &mut next, len).is_some() {}
    assert_eq!(next, sent);
    highest
}

/// A producer that hears from its peer between its records (the count it
/// passes grows), with records further apart than a tick of the coarse
/// clock, looks at every record once past REWIND_AT, so it wraps at the
/// first chance. One that hears nothing (streaming), or whose records
/// come faster than the clock ticks, looks once per 16 KiB and goes
/// further. (Records larger than `ring::WRAP_BEHIND_MAX`: smaller ones
/// wrap behind the consumer at the first look.)
#[test]
fn a_producer_that_hears_from_its_peer_wraps_at_the_first_chance() {
    let len = 3000usize;
    let rec = ring::RECORD_HEADER + len.next_multiple_of(8);
    assert!(rec as u64 > ring::WRAP_BEHIND_MAX);
    let bound = ring::REWIND_AT as usize + 3 * rec;
    // a tick between records from 2 KiB before the early-wrap point
    let slow_from = (ring::REWIND_AT as usize - 2048) / rec;
    let hearing_slow = exchange(len, 120, slow_from, true);
    assert!(
        hearing_slow <= bound,
        "hearing, slow: reached {hearing_slow}"
    );
    let streaming = exchange(len, 120, slow_from, false);
    assert!(streaming > bound, "streaming: reached {streaming}");
    let hearing_fast = exchange(len, 120, usize::MAX, true);
    assert!(
        hearing_fast > bound,
        "hearing, fast: reached {hearing_fast}"
    );
}

/// The same with records of 100 bytes: the producer reads the coarse
/// clock only when it heard from its peer since its last read (not at
/// every record until the clock moves), so one that hears between its
/// records still wraps at the first chance.
#[test]
fn a_producer_of_small_records_that_hears_from_its_peer_wraps_at_the_first_chance() {
    let len = 100usize;
    let rec = ring::RECORD_HEADER + len.next_multiple_of(8);
    // From 2 KiB before the early-wrap point, a tick between records.
    let highest = exchange(
        len,
        (ring::REWIND_AT as usize + 8192) / rec,
        (ring::REWIND_AT as usize - 2048) / rec,
        true,
    );
    let bound = ring::REWIND_AT as usize + 3 * rec;
    assert!(highest <= bound, "reached {highest}, bound {bound}");
    // (it did reach the early-wrap point before it wrapped)
    assert!(
        highest > ring::REWIND_AT as usize - rec,
        "reached {highest}"
    );
}

/// A consumer that lags: no early wrap while records wait, so a full
/// ring's worth of records goes in, then comes out in order, intact.
#[test]
fn a_ring_that_is_not_empty_is_not_wrapped_early() {
    let geo = Geometry::new(1 << 20).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    // Keep one record waiting in the ring at all times.
    let mut sent = 0u64;
    let mut next = 0u64;
    let mut highest = 0;
    for _ in 0..3000 {
        for _ in 0..2 {
            let data = payload(sent, 1000);
            if tx.push(kind::MSG, 1, &[&data]).unwrap().is_some() {
                sent += 1;
            }
        }
        let at = take_expected(&mem, &mut rx, &mut next, 1000).expect("a record");
        highest = highest.max(at);
    }
    while take_expected(&mem, &mut rx, &mut next, 1000).is_some() {}
    assert_eq!(next, sent);
    // Never empty: the records went on past the early-wrap point.
    assert!(highest > 2 * ring::REWIND_AT as usize, "{highest}");
}

/// Under a budget, a producer keeps its records within its share of the
/// budget, however full the ring gets; every record intact and in order.
#[test]
fn a_budget_keeps_records_within_its_share() {
    let geo = Geometry::with_max_record(1 << 20, 16 << 10).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    let budget = ring::Budget::new(256 << 10);
    tx.set_budget(budget.clone());
    assert_eq!((tx.limit(), budget.producers()), (256 << 10, 1));
    let (mut sent, mut next, mut highest) = (0u64, 0u64, 0usize);
    for round in 0..200 {
        // Fill until full (the consumer lags), then take some back.
        loop {
            let len = 1000 + (sent as usize % 13) * 8;
            let data = payload(sent, len);
            match tx.push(kind::MSG, 2, &[&data]).unwrap() {
                Some(_) => sent += 1,
                None => break,
            }
        }
        for _ in 0..(50 + round % 100) {
            let Some(r) = rx.peek().unwrap() else { break };
            let len = 1000 + (next as usize % 13) * 8;
            // SAFETY: valid until release.
            assert_eq!(
                unsafe { r.payload() }.to_vec(),
                payload(next, len),
                "record {next}"
            );
            highest = highest.max(offset(&mem, &r) + r.len);
            next += 1;
            rx.release_flush();
        }
    }
    assert!(sent > 15_000, "{sent} records");
    assert!(highest <= 256 << 10, "a record reached offset {highest}");
    // (nor did the header slot after the last record: nothing written
    // past the share)
    assert!(tx.reach() <= 256 << 10, "reach {}", tx.reach());
}

/// A share smaller than two of the ring's largest records: the producer
/// asks for pieces that fit twice in it (`piece`), and a stream of records
/// up to that size stays within the share, every byte intact, however far
/// the consumer lags; records larger than that still go whole (a sender
/// that does not cut: they wrap at twice their size), and the records
/// after them are back within the share.
#[test]
fn a_small_share_asks_for_pieces_and_still_takes_a_whole_record() {
    let geo = Geometry::with_max_record(1 << 20, 256 << 10).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    assert_eq!(
        tx.piece(),
        256 << 10,
        "a ring used whole: the largest record"
    );
    // Half of the budget each with a second producer: 24 KiB, the floor.
    let budget = ring::Budget::new(48 << 10);
    tx.set_budget(budget.clone());
    let other = Mem::new(geo);
    let (mut b, _brx) = other.ends(geo);
    b.set_budget(budget.clone());
    // (the share changes at tx's next wrap)
    tx.push(kind::MSG, 1, &[&[1u8; 8]]).unwrap().unwrap();
    rx.peek().unwrap().unwrap();
    rx.release_flush();
    let mut next = 1u64;
    tx.push(kind::MSG, 1, &[&payload(next, 40 << 10)])
        .unwrap()
        .unwrap();
    take_expected(&mem, &mut rx, &mut next, 40 << 10).unwrap();
    tx.push(kind::MSG, 1, &[&payload(next, 40 << 10)])
        .unwrap()
        .unwrap();
    take_expected(&mem, &mut rx, &mut next, 40 << 10).unwrap();
    assert_eq!(tx.limit(), 24 << 10);
    let piece = tx.piece();
    assert_eq!(piece, (24 << 10) / 2 - 2 * RECORD_HEADER);
    assert_eq!(piece, ring::MIN_PIECE);
    let reach_before = tx.reach();
    // A lagging consumer, records of 1 byte to a whole piece.
    let mut rnd = xorshift(0x5851_f42d_4c95_7f2d);
    let size_of = |seq: u64| 1 + (seq.wrapping_mul(2654435761) % piece as u64) as usize;
    let (mut sent, mut got) = (next, next);
    while got < next + 20_000 {
        for _ in 0..(rnd() % 4) {
            let data = payload(sent, size_of(sent));
            match tx.push(kind::MSG, 3, &[&data]).unwrap() {
                Some(_) => sent += 1,
                None => break,
            }
        }
        for _ in 0..(rnd() % 4) {
            let want = size_of(got);
            let Some(at) = take_expected(&mem, &mut rx, &mut got, want) else {
                break;
            };
            assert!(
                at + want <= 24 << 10,
                "record {} ends at {}",
                got - 1,
                at + want
            );
        }
    }
    loop {
        let want = size_of(got);
        let Some(at) = take_expected(&mem, &mut rx, &mut got, want) else {
            break;
        };
        assert!(at + want <= 24 << 10);
    }
    assert_eq!(got, sent);
    // (the 40 KiB records before the share shrank reached past it)
    assert_eq!(tx.reach(), reach_before);
    // Records of 100 KiB still go, whole, wrapping at twice their size,
    // with the consumer lagging by up to 3 of them.
    let big = 100 << 10;
    let end = 2 * (big + RECORD_HEADER) + RECORD_HEADER;
    let mut lag = 0;
    for _ in 0..2000 {
        while tx
            .push(kind::MSG, 4, &[&payload(sent, big)])
            .unwrap()
            .is_none()
        {
            take_expected(&mem, &mut rx, &mut got, big).unwrap();
            lag -= 1;
        }
        sent += 1;
        lag += 1;
        if lag > (rnd() % 4) as i32 {
            let at = take_expected(&mem, &mut rx, &mut got, big).unwrap();
            assert!(at + big <= end, "ends at {}", at + big);
            lag -= 1;
        }
    }
    while take_expected(&mem, &mut rx, &mut got, big).is_some() {}
    assert_eq!(got, sent);
    assert!(
        tx.reach() > 200 << 10 && tx.reach() <= end as u64,
        "{}",
        tx.reach()
    );
    for _ in 0..100 {
        tx.push(kind::MSG, 5, &[&payload(sent, piece)])
            .unwrap()
            .unwrap();
        sent += 1;
        let at = take_expected(&mem, &mut rx, &mut got, piece).unwrap();
        assert!(at + piece <= 24 << 10, "ends at {}", at + piece);
    }
    drop(b);
}

/// The rings a process may come to send on count before they exist: a
/// lone producer under a budget that expects four peers takes a quarter,
/// and the producers there are count when they outnumber the expected.
#[test]
fn a_budget_divides_among_the_peers_expected() {
    let geo = Geometry::with_max_record(1 << 20, 16 << 10).unwrap();
    let mems: Vec<Mem> = (0..6).map(|_| Mem::new(geo)).collect();
    let budget = ring::Budget::new(768 << 10);
    for _ in 0..4 {
        budget.expect_one();
    }
    let mut ends: Vec<(Producer, Consumer)> = Vec::new();
    for (i, m) in mems.iter().enumerate() {
        let (mut tx, rx) = m.ends(geo);
        tx.set_budget(budget.clone());
        let want = ((768 << 10) / (i + 1).max(4) as u64) & !4095;
        assert_eq!(tx.limit(), want, "producer {}", i + 1);
        ends.push((tx, rx));
    }
}

/// Producers share a budget: two get half each; when one goes, the other
/// takes the whole budget at its next wrap.
#[test]
fn producers_share_a_budget_and_take_it_back() {
    let geo = Geometry::with_max_record(1 << 20, 16 << 10).unwrap();
    let (m1, m2) = (Mem::new(geo), Mem::new(geo));
    let (mut a, mut rx) = m1.ends(geo);
    let (mut b, _rx2) = m2.ends(geo);
    let budget = ring::Budget::new(512 << 10);
    a.set_budget(budget.clone());
    b.set_budget(budget.clone());
    assert_eq!(budget.producers(), 2);
    // a wraps at its share after the other joined
    let data = [7u8; 4000];
    let mut wrapped_at = None;
    for _ in 0..400 {
        a.push(kind::MSG, 1, &[&data]).unwrap().unwrap();
        let r = rx.peek().unwrap().unwrap();
        let at = offset(&m1, &r);
        if at == 8 && wrapped_at.is_none() {
            wrapped_at = Some(a.limit());
        }
        rx.release_flush();
    }
    assert_eq!(a.limit(), 256 << 10);
    drop(b);
    assert_eq!(budget.producers(), 1);
    // (the early wrap keeps this kept-up ring near its start; the limit is
    // recomputed at every wrap)
    for _ in 0..100 {
        a.push(kind::MSG, 1, &[&data]).unwrap().unwrap();
        rx.peek().unwrap().unwrap();
        rx.release_flush();
    }
    assert_eq!(a.limit(), 512 << 10);
}

/// The one ring of a process with a single peer grows to the whole ring
/// once it carries a record of the largest size (a stream of large
/// messages), at its next wrap; small records never grow it. When a
/// second producer joins the budget, the ring goes back to its share at
/// the next wrap. Every record of the stream arrives intact and in order,
/// however far the consumer lags.
#[test]
fn a_sole_ring_that_streams_large_records_grows_to_the_whole_ring() {
    let max = 16 << 10;
    let geo = Geometry::with_max_record(1 << 20, max).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    let budget = ring::Budget::new(256 << 10);
    budget.expect_one();
    tx.set_budget(budget.clone());
    let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
    let (mut sent, mut got, mut highest) = (0u64, 0u64, 0usize);
    // A lagging consumer: bursts of up to 40 records, then up to 40 taken.
    // (each phase ends with the ring drained: its sizes are its own)
    let mut stream = |tx: &mut Producer,
                      rx: &mut Consumer,
                      rounds: usize,
                      size_of: &dyn Fn(u64) -> usize,
                      highest: &mut usize| {
        for round in 0..=rounds {
            for _ in 0..(rnd() % 40) {
                match tx
                    .push(kind::MSG, 6, &[&payload(sent, size_of(sent))])
                    .unwrap()
                {
                    Some(_) => sent += 1,
                    None => break,
                }
            }
            let take = if round == rounds {
                u64::MAX
            } else {
                rnd() % 40
            };
            for _ in 0..take {
                let want = size_of(got);
                let Some(at) = take_expected(&mem, rx, &mut got, want) else {
                    break;
                };
                *highest = (*highest).max(at + want);
            }
        }
        assert_eq!(got, sent);
    };
    // Records below the largest: the share, however full the ring.
    let small = |seq: u64| 1 + (seq.wrapping_mul(2654435761) % (max as u64 - 1)) as usize;
    stream(&mut tx, &mut rx, 2000, &small, &mut highest);
    assert_eq!(tx.limit(), 256 << 10);
    assert!(highest <= 256 << 10, "{highest}");
    // Records of the largest size among them: the whole ring from the
    // next wrap on, and the stream uses it.
    let large = |seq: u64| {
        if seq.is_multiple_of(3) {
            max
        } else {
            small(seq)
        }
    };
    stream(&mut tx, &mut rx, 2000, &large, &mut highest);
    assert_eq!(tx.limit(), 1 << 20);
    assert!(highest > 512 << 10, "the ring did not grow: {highest}");
    // A second producer: back to half the budget at the next wrap.
    let other = Mem::new(geo);
    let (mut b, _brx) = other.ends(geo);
    b.set_budget(budget.clone());
    stream(&mut tx, &mut rx, 2000, &large, &mut highest);
    assert_eq!(tx.limit(), 128 << 10);
    assert!(rx.peek().unwrap().is_none());
    assert!(sent > 20_000, "{sent} records");
    drop(b);
}

/// A ring whose share of the budget changes again and again in the middle
/// of a 100,000-message stream (other producers join and leave): every
/// message arrives once, in order, intact, and the ring grows back to its
/// whole share when the others are gone.
#[test]
fn a_stream_survives_its_ring_changing_size() {
    let geo = Geometry::with_max_record(1 << 20, 16 << 10).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    let budget = ring::Budget::new(512 << 10);
    tx.set_budget(budget.clone());
    let others: Vec<Mem> = (0..3).map(|_| Mem::new(geo)).collect();
    let mut joined: Vec<(Producer, Consumer)> = Vec::new();
    let mut limits = std::collections::BTreeSet::new();
    let (mut sent, mut next, mut change) = (0u64, 0u64, 5000u64);
    let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15);
    let size_of = |seq: u64| (seq.wrapping_mul(2654435761) % 4001) as usize;
    while next < 100_000 {
        // Every 5,000 messages another producer joins, or all leave.
        if sent >= change && sent < 100_000 {
            change += 5000;
            if joined.len() == others.len() {
                joined.clear();
            } else {
                let (mut p, c) = others[joined.len()].ends(geo);
                p.set_budget(budget.clone());
                joined.push((p, c));
            }
        }
        // Send a burst, then take a random number back.
        for _ in 0..(rnd() % 64) {
            if sent == 100_000 {
                break;
            }
            let data = payload(sent, size_of(sent));
            match tx.push(kind::MSG, (sent % 250) as u8, &[&data]).unwrap() {
                Some(_) => sent += 1,
                None => break,
            }
        }
        limits.insert(tx.limit());
        for _ in 0..(rnd() % 64) {
            let Some(r) = rx.peek().unwrap() else { break };
            assert_eq!(
                (r.len, r.tag),
                (size_of(next), (next % 250) as u8),
                "message {next}"
            );
            // SAFETY: valid until release.
            assert_eq!(
                unsafe { r.payload() }.to_vec(),
                payload(next, size_of(next)),
                "message {next}"
            );
            assert!(
                offset(&mem, &r) + r.len <= 512 << 10,
                "message {next} past the budget"
            );
            next += 1;
            rx.release_flush();
        }
    }
    assert!(rx.peek().unwrap().is_none());
    // Shares of 1, 2, 3 and 4 producers were all in force at some point.
    for want in [512 << 10, 256 << 10, 172032, 128 << 10] {
        assert!(
            limits.contains(&want),
            "limit {want} never seen: {limits:?}"
        );
    }
}

/// Version 2: the consumer finds records by their header slot alone.
/// Payloads made of words that are valid record headers, in bursts of
/// records whose sizes move the boundaries from lap to lap, never surface
/// as records: wherever the consumer stands, the slot reads empty until
/// the producer commits a record there.
#[test]
fn stale_words_never_pass_for_records() {
    let geo = Geometry::with_max_record(DATA, 600).unwrap();
    let mem = Mem::new(geo);
    let (mut tx, mut rx) = mem.ends(geo);
    let fake = ivcom_core::record::encode(8, kind::MSG, 1).to_le_bytes();
    let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
    let (mut sent, mut got) = (0u64, 0u64);
    let body = |seq: u64, len: usize| -> Vec<u8> {
        // the sequence number, then header look-alikes
        let mut v: Vec<u8> = seq
            .to_le_bytes()
            .iter()
            .chain(fake.iter().cycle())
            .take(len)
            .copied()
            .collect();
        v.resize(len, 0);
        v
    };
    let len_of = |seq: u64| 8 + (seq.wrapping_mul(0x9e37_79b9) % 593) as usize;
    while got < 50_000 {
        for _ in 0..rnd() % 5 {
            let len = len_of(sent);
            match tx.push(kind::MSG, 2, &[&body(sent, len)]).unwrap() {
                Some(_) => sent += 1,
                None => break,
            }
        }
        while got < sent {
            let r = rx.peek().unwrap().expect("a committed record");
            assert_eq!(
                (r.len, r.kind, r.tag),
                (len_of(got), kind::MSG, 2),
                "record {got}"
            );
            // SAFETY: valid until release.
            assert_eq!(
                unsafe { r.payload() }.to_vec(),
                body(got, len_of(got)),
                "record {got}"
            );
            rx.release();
            got += 1;
            if rnd().is_multiple_of(3) {
                rx.flush();
            }
        }
        rx.flush();
        assert!(rx.looks_empty(), "after record {got}");
        assert!(
            rx.peek().unwrap().is_none(),
            "a record out of nothing after {got}"
        );
    }
}

/// The producer and two consumers of `mem`'s ring (the second a reader
/// that only ever reads), both moved to byte `target` (a multiple of 8)
/// of the data area over a chain of whole messages of at most `max` bytes
/// written there.
fn readers_at(
    mem: &Mem,
    geo: Geometry,
    max: usize,
    target: usize,
) -> (Producer, Consumer, Consumer) {
    let (tx, mut short) = mem.ends(geo);
    // SAFETY: as in Mem::ends; a second reader of the same ring that only
    // ever reads.
    let mut full = unsafe { Consumer::new(mem.base, geo).unwrap() };
    let mut pos = 0;
    while pos < target {
        let len = max.min(target - pos - RECORD_HEADER);
        mem.set_word(
            ring::CTRL_BYTES + pos,
            ivcom_core::record::encode(len as u32, kind::MSG, 1),
        );
        // Both read the record before either releases it: a consumer
        // claims the lines of a record it releases (`ring::CLAIM_MIN`),
        // which clears its header.
        for rx in [&mut short, &mut full] {
            assert_eq!(rx.peek().unwrap().map(|r| r.len), Some(len));
        }
        short.release();
        full.release();
        pos += RECORD_HEADER + len.div_ceil(8) * 8;
    }
    assert_eq!(pos, target);
    (tx, short, full)
}

/// A header word for the short receive path: mostly plausible records
/// (every kind, lengths around the limits), some with reserved bits set,
/// some arbitrary.
fn header_word() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (header_len(), record_kind(), any::<u8>())
            .prop_map(|(len, k, tag)| ivcom_core::record::encode(len, k, tag)),
        1 => (header_len(), any::<u8>(), 1u64..0x1_0000)
            .prop_map(|(len, tag, r)| ivcom_core::record::encode(len, kind::MSG, tag) | r << 48),
        1 => any::<u64>(),
        1 => Just(0u64),
    ]
}

/// What `peek` makes of the record at the consumer, as plain values.
fn seen(r: ivcom_core::Result<Option<ring::Record>>) -> String {
    match r {
        Ok(Some(r)) => format!("record {:?} {} {} {}", r.ptr, r.len, r.kind, r.tag),
        Ok(None) => "empty".into(),
        Err(e) => format!("{e:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

    /// `Consumer::peek_msg_fast`, the receive path's short way, takes a
    /// record exactly when the full path (`peek`, then the channel's kind
    /// and tag checks) would hand it up whole, with the same pointer,
    /// length and tag; otherwise it leaves the consumer as it was: the full
    /// path then sees what a consumer that never took the short way sees
    /// (the same record, the same named violation).
    #[test]
    fn the_short_receive_path_agrees_with_the_full_one(
        max in max_record(),
        at in prop_oneof![0usize..DATA / 8, (1usize..64).prop_map(|x| DATA / 8 - x)],
        word in header_word(),
        tag_limit in prop_oneof![Just(256u16), 0u16..=256],
    ) {
        let geo = Geometry::with_max_record(DATA, max).unwrap();
        let mem = Mem::new(geo);
        // Both readers walk a chain of records to the word's place,
        // anywhere in the data area (near its end too, where a record may
        // not fit before it).
        let pos = at * 8;
        let (_tx, mut short, mut full) = readers_at(&mem, geo, max, pos);
        mem.set_word(ring::CTRL_BYTES + pos, word);
        let fast = short.peek_msg_fast(tag_limit);
        let r = full.peek();
        // (a padding record there leads the full path to offset 0, whose
        // record the short path leaves to it)
        // SAFETY: inside the mapping.
        let here = unsafe { mem.base.add(ring::CTRL_BYTES + pos + RECORD_HEADER) } as *const u8;
        let expected = match &r {
            Ok(Some(r)) if r.kind == kind::MSG && (r.tag as u16) < tag_limit && r.ptr == here => {
                Some((r.tag, r.ptr, r.len))
            }
            _ => None,
        };
        prop_assert_eq!(fast, expected);
        if fast.is_some() {
            // not twice before the release
            prop_assert_eq!(short.peek_msg_fast(tag_limit), None);
            short.release();
            full.release();
            prop_assert_eq!(short.taken(), full.taken());
        } else {
            let broke = r.is_err();
            prop_assert_eq!(seen(short.peek()), seen(r));
            if broke {
                // a broken ring stays broken, whatever the peer writes next
                mem.set_word(ring::CTRL_BYTES + pos, ivcom_core::record::encode(0, kind::MSG, 1));
                prop_assert_eq!(short.peek_msg_fast(256), None);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    /// `Consumer::peek_msgs`, the receive path's batch, takes the records
    /// that follow one another exactly as far as the full path (`peek` and
    /// `release`, one by one, with the channel's kind and tag checks) would
    /// hand them up whole, with the same pointers, lengths and tags, up to
    /// the count asked for (at most `Batch::CAP`) and `BATCH_BYTES` of ring
    /// space; one `release` then puts it where the full path stands,
    /// and what comes next reads the same either way (the same record, the
    /// same named violation).
    #[test]
    fn a_batch_takes_what_the_full_path_hands_up_one_by_one(
        max in max_record(),
        at in prop_oneof![0usize..DATA / 8, (1usize..64).prop_map(|x| DATA / 8 - x)],
        words in proptest::collection::vec(header_word(), 0..24),
        tag_limit in prop_oneof![Just(256u16), 0u16..=256],
        cap in 1usize..20,
    ) {
        let geo = Geometry::with_max_record(DATA, max).unwrap();
        let mem = Mem::new(geo);
        let mut pos = at * 8;
        let (_tx, mut short, mut full) = readers_at(&mem, geo, max, pos);
        // The chain: each word at the place the record before it leads
        // to, as long as that record is a whole message that fits.
        let start = pos;
        for &w in &words {
            mem.set_word(ring::CTRL_BYTES + pos, w);
            let (len, k, _, r) = ivcom_core::record::decode(w);
            let total = RECORD_HEADER + len.div_ceil(8) * 8;
            if k != kind::MSG || r != 0 || len > max || total > DATA - pos {
                break;
            }
            pos = (pos + total) % DATA;
        }
        let mut out = ring::Batch::new();
        let (n, bytes) = short.peek_msgs(tag_limit, &mut out, cap);
        prop_assert_eq!(out.records().len(), n);
        let (mut p, mut expect, mut sum) = (start, 0, 0);
        let (mut room, cap) = (ring::BATCH_BYTES, cap.min(ring::Batch::CAP));
        while expect < cap && room > 0 {
            // SAFETY: inside the mapping.
            let here = unsafe { mem.base.add(ring::CTRL_BYTES + p + RECORD_HEADER) } as *const u8;
            match full.peek() {
                Ok(Some(r)) if r.kind == kind::MSG && (r.tag as u16) < tag_limit && r.ptr == here => {
                    prop_assert!(expect < n, "the batch stopped at {} of a run of more", n);
                    let b = out.records()[expect];
                    prop_assert_eq!((b.tag, b.ptr, b.len, b.kind), (r.tag, r.ptr, r.len, kind::MSG));
                    sum += r.len;
                    full.release();
                    let total = RECORD_HEADER + r.len.div_ceil(8) * 8;
                    p = (p + total) % DATA;
                    room = room.saturating_sub(total as u64);
                    expect += 1;
                }
                _ => break,
            }
        }
        prop_assert_eq!((n, bytes), (expect, sum));
        if n > 0 {
            // nothing more before the release
            prop_assert_eq!(short.peek_msgs(256, &mut out, 16), (0, 0));
            short.release();
        }
        prop_assert_eq!(seen(short.peek()), seen(full.peek()));
        // (after the full path's look on both sides: a padding record,
        // which a batch leaves to the full path, is behind both now)
        prop_assert_eq!(short.taken(), full.taken());
    }
}

/// The batch's check of kind and tag, one compare of `kind * 256 + tag`,
/// at its edges: every kind the format knows and some it does not, tags at
/// and beside the limit, limits from none valid to all. A record is taken
/// exactly when it is a whole message with a tag below the limit; a zero
/// length, the longest record and reserved bits as the full path does.
#[test]
fn a_batch_takes_a_message_exactly_when_its_kind_and_tag_pass() {
    let max = 1024;
    let geo = Geometry::with_max_record(DATA, max).unwrap();
    for limit in [0u16, 1, 2, 128, 255, 256] {
        for k in [
            0u8,
            kind::MSG,
            kind::FIRST,
            kind::MORE,
            kind::CTRL,
            5,
            kind::PAD,
            0x80,
            0xff,
        ] {
            for tag in [0u8, 1, 127, 128, 254, 255] {
                for (len, reserved) in [(0u32, 0u64), (8, 0), (max as u32, 0), (8, 0xbeef)] {
                    let mem = Mem::new(geo);
                    let (_tx, mut short, _full) = readers_at(&mem, geo, max, 0);
                    let word = ivcom_core::record::encode(len, k, tag) | reserved << 48;
                    mem.set_word(ring::CTRL_BYTES, word);
                    let mut out = ring::Batch::new();
                    let (n, bytes) = short.peek_msgs(limit, &mut out, 4);
                    let whole = k == kind::MSG && u16::from(tag) < limit;
                    assert_eq!(
                        (n, bytes),
                        if whole { (1, len as usize) } else { (0, 0) },
                        "kind {k:#x} tag {tag} limit {limit} len {len} reserved {reserved:#x}"
                    );
                    if whole {
                        let r = out.records()[0];
                        assert_eq!((r.tag, r.len, r.kind), (tag, len as usize, kind::MSG));
                    }
                }
            }
        }
    }
}

/// A padding record where a batch would start: the batch takes nothing and
/// leaves it to the full path, which then stands where the other reader's
/// full path stands, at offset 0 of the next lap (the case a random run of
/// the property above found: padding from offset 104 to the end).
#[test]
fn a_batch_leaves_padding_to_the_full_path() {
    let max = 1024;
    let geo = Geometry::with_max_record(DATA, max).unwrap();
    let mem = Mem::new(geo);
    let pos = 104;
    let (_tx, mut short, mut full) = readers_at(&mem, geo, max, pos);
    let pad = (DATA - pos - RECORD_HEADER) as u32;
    mem.set_word(
        ring::CTRL_BYTES + pos,
        ivcom_core::record::encode(pad, kind::PAD, 0),
    );
    let mut out = ring::Batch::new();
    assert_eq!(short.peek_msgs(256, &mut out, 1), (0, 0));
    assert_eq!(short.taken(), pos as u64);
    assert_eq!(seen(short.peek()), seen(full.peek()));
    assert_eq!(short.taken(), full.taken());
    assert_eq!(full.taken(), DATA as u64);
}

/// A batch ends at the record that reaches `BATCH_BYTES` of ring space (its
/// records go back to the producer only when all of it is released), or
/// at the count asked for: 1 KiB messages four at a time, 8-byte ones 16,
/// a message larger than the bound alone; every message once, in order.
#[test]
fn a_batch_holds_at_most_its_bound_of_ring_space() {
    let geo = Geometry::new(64 << 10).unwrap();
    let mut b = ring::Batch::new();
    // (message length, messages, count asked for, messages a batch takes)
    for (len, count, ask, per_batch) in [
        (1024usize, 12usize, 16usize, 4usize),
        (8, 40, 16, 16),
        (5000, 3, 16, 1),
        (8, 10, 3, 3),
    ] {
        // a fresh ring each time: all of them fit before the first lap ends
        let mem = Mem::new(geo);
        let (mut tx, mut rx) = mem.ends(geo);
        let msgs: Vec<Vec<u8>> = (0..count).map(|i| vec![(i * 7 + len) as u8; len]).collect();
        for m in &msgs {
            assert!(tx.push(kind::MSG, 9, &[m]).unwrap().is_some(), "ring full");
        }
        let mut got = 0;
        while got < count {
            let (n, bytes) = rx.peek_msgs(256, &mut b, ask);
            assert_eq!(
                n,
                per_batch.min(count - got),
                "{len} B messages, from {got}"
            );
            assert_eq!(bytes, n * len);
            for r in b.records() {
                // SAFETY: valid until the release below.
                assert_eq!(unsafe { r.payload() }.to_vec(), msgs[got], "message {got}");
                assert_eq!((r.kind, r.tag), (kind::MSG, 9));
                got += 1;
            }
            rx.release();
            rx.flush();
        }
        assert_eq!(rx.peek_msgs(256, &mut b, 16), (0, 0));
        assert!(b.records().is_empty());
    }
}

/// A padding record at offset 0 would lead the consumer back to where it
/// stands, for ever: it is refused.
#[test]
fn padding_at_offset_zero_is_refused() {
    let geo = Geometry::new(DATA).unwrap();
    let mem = Mem::new(geo);
    let (_tx, mut rx) = mem.ends(geo);
    let pad = ivcom_core::record::encode(DATA as u32 - 8, kind::PAD, 0);
    mem.set_word(ring::CTRL_BYTES, pad);
    assert!(matches!(
        rx.peek(),
        Err(Error::Broken(Violation::BadPadding))
    ));
}

/// A consumer claims the cache lines of what it releases (records or runs
/// of records of `ring::CLAIM_MIN` bytes and more): it writes a zero word
/// at the start of each line they occupy, and nothing else. Not the bytes
/// of a smaller record, not the header of the record that follows, not a
/// byte outside the data area when a run of records continues at offset 0
/// after one that ends exactly at the end (a guard page after the ring
/// must read as it was written).
#[test]
fn a_consumer_claims_the_lines_of_what_it_releases_and_nothing_else() {
    const D: usize = 4096;
    let geo = Geometry::with_max_record(D, 2040).unwrap();
    let layout = Layout::from_size_align(geo.ring_bytes() + 4096, 4096).unwrap();
    // SAFETY: non-zero size; freed at the end.
    let base = unsafe { alloc_zeroed(layout) };
    assert!(!base.is_null());
    let data = |off: usize| ring::CTRL_BYTES + off;
    let read = |off: usize| {
        // SAFETY: inside the allocation.
        unsafe { std::ptr::read_volatile(base.add(off)) }
    };
    // SAFETY: fresh zeroed memory; then the data area and the guard page
    // filled with marks that the claim must not leave except where it may.
    unsafe {
        ring::init(base, geo, 7);
        std::ptr::write_bytes(base.add(data(0)), 0xEE, D);
        std::ptr::write_bytes(base.add(geo.ring_bytes()), 0xAA, 4096);
    }
    let set = |off: usize, w: u64| {
        // SAFETY: an 8-aligned word inside the allocation.
        unsafe { std::ptr::write_volatile(base.add(off) as *mut u64, w) }
    };
    let msg = |len: u32| ivcom_core::record::encode(len, kind::MSG, 1);
    // SAFETY: the allocation outlives the consumer; one consumer.
    let mut rx = unsafe { Consumer::new(base, geo).unwrap() };
    // A small record (64 B in all) at 0, then one of 2,040 (2,048 in all)
    // at 64, then one of 1,976 that ends exactly at the end of the area.
    set(data(0), msg(56));
    set(data(64), msg(2040));
    set(data(2112), msg(1976));
    let r = rx.peek().unwrap().unwrap();
    assert_eq!(r.len, 56);
    rx.release();
    rx.flush();
    assert_eq!(read(data(0)), 56, "a small record's header was cleared");
    for off in 8..64 {
        assert_eq!(
            read(data(off)),
            0xEE,
            "a small record's byte {off} was written"
        );
    }
    let r = rx.peek().unwrap().unwrap();
    assert_eq!(r.len, 2040);
    rx.release();
    rx.flush();
    for off in 64..2112 {
        let want = if off % 64 < 8 { 0 } else { 0xEE };
        assert_eq!(read(data(off)), want, "byte {off} of a released record");
    }
    assert_eq!(
        ivcom_core::record::decode(u64::from_le_bytes(std::array::from_fn(|i| read(
            data(2112) + i
        ))))
        .0,
        1976,
        "the next record's header is left alone"
    );
    // The next lap's first record (as its producer would write it: the
    // whole record, payload and header), then one batch takes the record
    // that ends at the end and this one at offset 0.
    // SAFETY: inside the data area.
    unsafe { std::ptr::write_bytes(base.add(data(0)), 0x55, 1024) };
    set(data(0), msg(1016));
    let mut out = ring::Batch::new();
    let (n, _) = rx.peek_msgs(256, &mut out, 8);
    assert_eq!(n, 2, "the run continues at offset 0");
    rx.release();
    rx.flush();
    for off in 2112..D {
        let want = if off % 64 < 8 { 0 } else { 0xEE };
        assert_eq!(read(data(off)), want, "byte {off} before the end");
    }
    for off in 0..1024 {
        let want = if off % 64 < 8 { 0 } else { 0x55 };
        assert_eq!(read(data(off)), want, "byte {off} after the wrap");
    }
    for off in 1024..2112 {
        assert_eq!(
            read(data(off)),
            if off % 64 < 8 && off >= 64 { 0 } else { 0xEE },
            "byte {off} past the run"
        );
    }
    for off in geo.ring_bytes()..geo.ring_bytes() + 4096 {
        assert_eq!(read(off), 0xAA, "byte {off} past the data area");
    }
    // SAFETY: allocated above with this layout; the consumer is not used
    // again.
    unsafe { dealloc(base, layout) };
}

/// ... and only while the ring's laps are at most `ring::CLAIM_LAP`: after
/// a lap that ran to 3 MiB of a 4 MiB ring the next record is not
/// claimed; after one of 1 MiB it is.
#[test]
fn a_consumer_claims_nothing_after_a_lap_longer_than_the_claim_lap() {
    const D: usize = 4 << 20;
    const BIG: usize = (3 << 19) - 8; // 1.5 MiB records, header included
    for (lap, claimed) in [(3usize << 20, false), (1 << 20, true)] {
        let geo = Geometry::with_max_record(D, BIG).unwrap();
        let mem = Mem::new(geo);
        let msg = |len: usize| ivcom_core::record::encode(len as u32, kind::MSG, 1);
        let (_tx, mut rx) = mem.ends(geo);
        // Records to `lap`, then padding to the end.
        let mut pos = 0;
        while pos < lap {
            let len = BIG.min(lap - pos - RECORD_HEADER);
            mem.set_word(ring::CTRL_BYTES + pos, msg(len));
            assert_eq!(rx.peek().unwrap().map(|r| r.len), Some(len));
            rx.release();
            rx.flush();
            pos += RECORD_HEADER + len.div_ceil(8) * 8;
        }
        mem.set_word(
            ring::CTRL_BYTES + lap,
            ivcom_core::record::encode((D - lap - RECORD_HEADER) as u32, kind::PAD, 0),
        );
        // The next lap's first record, at offset 0.
        mem.set_word(ring::CTRL_BYTES, msg(2040));
        mem.set_word(ring::CTRL_BYTES + 64, 0xEEEE);
        assert_eq!(rx.peek().unwrap().map(|r| r.len), Some(2040));
        rx.release();
        rx.flush();
        assert_eq!(
            (
                mem.word(ring::CTRL_BYTES) == 0,
                mem.word(ring::CTRL_BYTES + 64) == 0
            ),
            (claimed, claimed),
            "after a lap of {lap}"
        );
    }
}
