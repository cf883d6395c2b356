//! Exhaustive interleaving models of the ring's index/notify protocol.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release -p ivcom-core --test loom`
//!
//! and the two ignored models (see below) on demand with the same command
//! followed by `-- --ignored` (or `-- --include-ignored` for all).
//!
//! The functions under test are the production ones in
//! `ivcom_core::protocol` (`publish`, `prepare_sleep`,
//! `prepare_sleep_unless_closed`, `close`, `finish_sleep`), instantiated
//! over loom's atomics through the `Word` trait. Models:
//!
//! - no lost wake-up, both directions: a side that decided to sleep is
//!   always rung (or saw the index move and did not sleep), in every
//!   interleaving;
//! - no lost close: a consumer that decides to sleep as its producer closes
//!   the ring is always rung (or saw the close and did not sleep), and a
//!   consumer that sleeps on a doorbell token always wakes up to the close;
//! - format version 2: a record published by its header (payload, the
//!   next slot cleared, then the header with release ordering) is seen
//!   whole, never after a stale word, and a consumer that sleeps on the
//!   header slot is always rung;
//! - no overwrite of unread data: a two-slot ring of `loom::cell::UnsafeCell`
//!   slots through which three items pass; loom's race detector proves the
//!   producer never writes a slot the consumer is reading or has not read;
//! - the receive queue (`core/src/queue.rs`): producers that announce
//!   their sleeps with a bit each (`prepare_sleep_bit`) are always rung by
//!   the consumer's `publish_collect`; and a model of two producers
//!   sharing one cell through the reservation word, where every record
//!   taken was sent, once, with its own payload, and no payload is written
//!   while the consumer may read it, because the consumer clears what it
//!   releases;
//! - negative controls: the same models with the fences or the
//!   release/acquire orderings taken away, or with the consumer reading the
//!   closed flag before its fence (the ordering before issue 13), fail, so
//!   the models have teeth.
//!
//! Ignored, and why: `sleeping_consumer_always_wakes` and
//! `both_sides_sleeping_ring`, where one side goes through several
//! sleep/wake rounds, fail under loom 0.7.3 (the newest release) with an
//! outcome the C++20/Rust memory model forbids. That is loom's bug
//! tokio-rs/loom#254: loom can order a plain store between the read and the
//! write of a `swap`, whereas an atomic read-modify-write reads the last
//! value in modification order before its own write ([atomics.order]/10).
//! Here the publisher's relaxed `swap(0)` of the waiting flag may read an
//! older store and still not be ordered before the waiter's next store of
//! 1; a later load then returns the swap's 0 although seq_cst fences on
//! both sides forbid it. The fix proposed upstream, tokio-rs/loom PR #391
//! (not in any release yet), was found to make both models pass (at
//! preemption bounds 4 to 6, and exhaustively for the single-waiter one),
//! and with it they still fail when a fence is removed. `loom_rmw_false_positive` shows the
//! bug on a ten-line litmus test; it is expected to "fail", i.e. to panic.
//! When a loom release carries the fix, that test stops panicking (and so
//! fails): upgrade loom, un-ignore the two models and drop it. A preemption
//! bound for the ignored models: `LOOM_MAX_PREEMPTIONS=4`.
#![cfg(loom)]

use ivcom_core::protocol::{self, Word};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicU64};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

/// The protocol's word on loom's memory model.
struct W(AtomicU64);

impl W {
    fn new(v: u64) -> Self {
        W(AtomicU64::new(v))
    }
}

impl Word for W {
    fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: Ordering) {
        self.0.store(value, order)
    }
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        self.0.swap(value, order)
    }
    fn fetch_or(&self, value: u64, order: Ordering) -> u64 {
        self.0.fetch_or(value, order)
    }
    fn fetch_and(&self, value: u64, order: Ordering) -> u64 {
        self.0.fetch_and(value, order)
    }
    fn fence() {
        fence(Ordering::SeqCst)
    }
}

/// A deliberately broken word for the negative controls: no fence.
struct NoFence(AtomicU64);

impl Word for NoFence {
    fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: Ordering) {
        self.0.store(value, order)
    }
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        self.0.swap(value, order)
    }
    fn fetch_or(&self, value: u64, order: Ordering) -> u64 {
        self.0.fetch_or(value, order)
    }
    fn fetch_and(&self, value: u64, order: Ordering) -> u64 {
        self.0.fetch_and(value, order)
    }
    fn fence() {}
}

/// A deliberately broken word for the negative controls: everything relaxed.
struct Relaxed(AtomicU64);

impl Word for Relaxed {
    fn load(&self, _: Ordering) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn store(&self, value: u64, _: Ordering) {
        self.0.store(value, Ordering::Relaxed)
    }
    fn swap(&self, value: u64, _: Ordering) -> u64 {
        self.0.swap(value, Ordering::Relaxed)
    }
    fn fetch_or(&self, value: u64, _: Ordering) -> u64 {
        self.0.fetch_or(value, Ordering::Relaxed)
    }
    fn fetch_and(&self, value: u64, _: Ordering) -> u64 {
        self.0.fetch_and(value, Ordering::Relaxed)
    }
    fn fence() {
        fence(Ordering::SeqCst)
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    // Exhaustive: no preemption bound. Each model here explores in well
    // under a second; LOOM_MAX_PREEMPTIONS still bounds it if set.
    let mut b = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        b.preemption_bound = None;
    }
    b.check(f);
}

// ---------------------------------------------------------------------------
// (a) No lost wake-up

/// The shared words of one direction: the publisher's index and the
/// waiter's "I am about to sleep" flag.
struct Pair<T> {
    index: T,
    waiting: T,
}

/// One publish against one sleep decision. The waiter saw the index at 0
/// (the ring empty, or full, depending on the direction); the publisher
/// moves it to `to`. Whenever the waiter decided to sleep, the publisher
/// must have been told to ring.
fn one_publish_one_sleep<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T, to: u64) {
    let p = Arc::new(Pair {
        index: mk(0),
        waiting: mk(0),
    });
    let q = p.clone();
    let publisher = thread::spawn(move || protocol::publish(&q.index, to, &q.waiting));
    let sleeps = protocol::prepare_sleep(&p.waiting, &p.index, 0);
    let rang = publisher.join().unwrap();
    assert!(
        !sleeps || rang,
        "lost wake-up: the waiter sleeps, nobody rings"
    );
    if !sleeps {
        // It did not sleep because it saw the index move: the flag is down.
        assert_eq!(p.index.load(Ordering::Acquire), to);
    }
}

/// Consumer waits for data: the producer publishes its index (commit), the
/// consumer found the ring empty and prepares to sleep.
#[test]
fn no_lost_wakeup_consumer_waits_for_data() {
    model(|| one_publish_one_sleep(W::new, 8));
}

/// Producer waits for space, on a full two-slot ring: the consumer reads
/// slot 0 and publishes its index (flush); the producer found the ring full
/// and prepares to sleep. Whenever it sleeps it is rung; when it does not
/// sleep (it saw the index move) it reuses slot 0 at once, and loom checks
/// that this write cannot race with the consumer's read.
#[test]
fn no_lost_wakeup_producer_waits_for_space() {
    model(|| {
        let r = Arc::new(Ring {
            slots: [UnsafeCell::new(1), UnsafeCell::new(2)],
            prod: W::new(2),
            cons: W::new(0),
            prod_waiting: W::new(0),
            cons_waiting: W::new(0),
        });
        let rc = r.clone();
        let consumer = thread::spawn(move || {
            // SAFETY (model): loom checks that no write of this slot races.
            let v = rc.slots[0].with(|x| unsafe { *x });
            assert_eq!(v, 1);
            protocol::publish(&rc.cons, 1, &rc.prod_waiting)
        });
        let sleeps = protocol::prepare_sleep(&r.prod_waiting, &r.cons, 0);
        if !sleeps {
            // SAFETY (model): loom checks that no read of this slot races.
            r.slots[0].with_mut(|x| unsafe { *x = 3 });
        }
        let rang = consumer.join().unwrap();
        assert!(
            !sleeps || rang,
            "lost wake-up: the producer sleeps, nobody rings"
        );
        assert_eq!(r.prod_waiting.load(Ordering::Relaxed), 0, "flag left up");
    });
}

/// A waiter that really sleeps: a doorbell is a counter the waiter takes a
/// token of before its last check and sleeps on until it changes (as the
/// host backend's futex does). The publisher moves its index `steps` times
/// and rings when told to. The waiter follows the index to the end; with a
/// lost wake-up it would spin forever and loom would report it.
fn waiter_always_wakes<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T, steps: u64) {
    struct S<T> {
        pair: Pair<T>,
        bell: AtomicU64,
    }
    let s = Arc::new(S {
        pair: Pair {
            index: mk(0),
            waiting: mk(0),
        },
        bell: AtomicU64::new(0),
    });
    let t = s.clone();
    let publisher = thread::spawn(move || {
        let mut rings = 0;
        for i in 1..=steps {
            if protocol::publish(&t.pair.index, i * 8, &t.pair.waiting) {
                t.bell.fetch_add(1, Ordering::Release);
                rings += 1;
            }
        }
        rings
    });
    let mut seen = 0;
    let mut sleeps = 0;
    while seen != steps * 8 {
        let now = s.pair.index.load(Ordering::Acquire);
        if now != seen {
            seen = now;
            continue;
        }
        let token = s.bell.load(Ordering::Acquire);
        if protocol::prepare_sleep(&s.pair.waiting, &s.pair.index, seen) {
            sleeps += 1;
            while s.bell.load(Ordering::Acquire) == token {
                thread::yield_now();
            }
            protocol::finish_sleep(&s.pair.waiting);
        }
    }
    let rings = publisher.join().unwrap();
    assert!(rings >= sleeps, "{sleeps} sleeps but {rings} doorbells");
}

#[test]
#[ignore = "loom 0.7.3 false positive, tokio-rs/loom#254 (store ordered inside a swap); passes with tokio-rs/loom PR #391; run with -- --ignored"]
fn sleeping_consumer_always_wakes() {
    model(|| waiter_always_wakes(W::new, 2));
}

// ---------------------------------------------------------------------------
// (b) No overwrite of unread data

struct Ring<T> {
    slots: [UnsafeCell<u64>; 2],
    prod: T,
    cons: T,
    prod_waiting: T,
    cons_waiting: T,
}

/// Three items through a two-slot ring. The producer checks for space
/// against the consumer index (acquire, reloaded only when the ring looks
/// full), writes a slot, publishes its index; the consumer reads a slot,
/// then publishes its index. Any write of a slot not ordered after the read
/// of the item it held is a data race that loom reports.
fn two_slot_ring<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T) {
    const ITEMS: u64 = 3;
    let r = Arc::new(Ring {
        slots: [UnsafeCell::new(0), UnsafeCell::new(0)],
        prod: mk(0),
        cons: mk(0),
        prod_waiting: mk(0),
        cons_waiting: mk(0),
    });
    let rp = r.clone();
    let producer = thread::spawn(move || {
        let (mut p, mut cons) = (0u64, 0u64);
        for item in 1..=ITEMS {
            while p - cons == 2 {
                cons = rp.cons.load(Ordering::Acquire);
                if p - cons == 2 {
                    thread::yield_now();
                }
            }
            // SAFETY (model): loom checks that no read of this slot races.
            rp.slots[(p % 2) as usize].with_mut(|s| unsafe { *s = item });
            p += 1;
            protocol::publish(&rp.prod, p, &rp.cons_waiting);
        }
    });
    let (mut c, mut prod) = (0u64, 0u64);
    for item in 1..=ITEMS {
        while prod == c {
            prod = r.prod.load(Ordering::Acquire);
            if prod == c {
                thread::yield_now();
            }
        }
        // SAFETY (model): loom checks that no write of this slot races.
        let v = r.slots[(c % 2) as usize].with(|s| unsafe { *s });
        assert_eq!(v, item, "read a slot that was overwritten or not written");
        c += 1;
        protocol::publish(&r.cons, c, &r.prod_waiting);
    }
    producer.join().unwrap();
}

#[test]
fn no_overwrite_of_unread_slots() {
    model(|| two_slot_ring(W::new));
}

/// Both directions at once, as the channel runs them: a two-slot ring
/// through which three items pass, where a side that finds the ring full
/// (producer) or empty (consumer) does not spin but announces sleep and
/// sleeps on its doorbell. Every interleaving ends (no side sleeps
/// forever) and no slot is overwritten before it was read.
fn sleeping_ring<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T) {
    const ITEMS: u64 = 3;
    struct S<T> {
        ring: Ring<T>,
        /// Wakes the producer.
        prod_bell: AtomicU64,
        /// Wakes the consumer.
        cons_bell: AtomicU64,
    }
    fn sleep<T: Word>(bell: &AtomicU64, waiting: &T, index: &T, seen: u64) {
        let token = bell.load(Ordering::Acquire);
        if protocol::prepare_sleep(waiting, index, seen) {
            while bell.load(Ordering::Acquire) == token {
                thread::yield_now();
            }
            protocol::finish_sleep(waiting);
        }
    }
    let s = Arc::new(S {
        ring: Ring {
            slots: [UnsafeCell::new(0), UnsafeCell::new(0)],
            prod: mk(0),
            cons: mk(0),
            prod_waiting: mk(0),
            cons_waiting: mk(0),
        },
        prod_bell: AtomicU64::new(0),
        cons_bell: AtomicU64::new(0),
    });
    let sp = s.clone();
    let producer = thread::spawn(move || {
        let r = &sp.ring;
        let (mut p, mut cons) = (0u64, 0u64);
        for item in 1..=ITEMS {
            while p - cons == 2 {
                cons = r.cons.load(Ordering::Acquire);
                if p - cons == 2 {
                    sleep(&sp.prod_bell, &r.prod_waiting, &r.cons, cons);
                }
            }
            // SAFETY (model): loom checks that no read of this slot races.
            r.slots[(p % 2) as usize].with_mut(|x| unsafe { *x = item });
            p += 1;
            if protocol::publish(&r.prod, p, &r.cons_waiting) {
                sp.cons_bell.fetch_add(1, Ordering::Release);
            }
        }
    });
    let r = &s.ring;
    let (mut c, mut prod) = (0u64, 0u64);
    for item in 1..=ITEMS {
        while prod == c {
            prod = r.prod.load(Ordering::Acquire);
            if prod == c {
                sleep(&s.cons_bell, &r.cons_waiting, &r.prod, prod);
            }
        }
        // SAFETY (model): loom checks that no write of this slot races.
        let v = r.slots[(c % 2) as usize].with(|x| unsafe { *x });
        assert_eq!(v, item);
        c += 1;
        if protocol::publish(&r.cons, c, &r.prod_waiting) {
            s.prod_bell.fetch_add(1, Ordering::Release);
        }
    }
    producer.join().unwrap();
}

#[test]
#[ignore = "loom 0.7.3 false positive, tokio-rs/loom#254 (store ordered inside a swap); passes with tokio-rs/loom PR #391; run with -- --ignored"]
fn both_sides_sleeping_ring() {
    model(|| sleeping_ring(W::new));
}

// ---------------------------------------------------------------------------
// (c) No lost close

/// The shared words of one ring as its close concerns them: the producer
/// index, the consumer's waiting flag and the closed flag.
struct Closing<T> {
    index: T,
    waiting: T,
    closed: T,
}

/// A consumer's sleep decision: `(waiting, index, seen, closed)`, `true` to
/// sleep.
type Prepare<T> = fn(&T, &T, u64, &T) -> bool;

/// The consumer's sleep decision as it was before issue 13: the closed flag
/// read first, before the waiting flag is raised and the fence, then the
/// plain protocol. Kept for the negative controls only.
fn prepare_sleep_closed_first<T: Word>(waiting: &T, index: &T, seen: u64, closed: &T) -> bool {
    closed.load(Ordering::Acquire) == 0 && protocol::prepare_sleep(waiting, index, seen)
}

/// The close against one sleep decision. The consumer consumed everything
/// (it saw the index at 8) and prepares to sleep; the producer closes the
/// ring, which publishes the same index 8 again. The index never moves, so
/// only the closed flag can stop the consumer's sleep: whenever the
/// consumer decided to sleep, the producer must have been told to ring.
fn one_close_one_sleep<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T, prepare: Prepare<T>) {
    let p = Arc::new(Closing {
        index: mk(8),
        waiting: mk(0),
        closed: mk(0),
    });
    let q = p.clone();
    let producer = thread::spawn(move || protocol::close(&q.closed, &q.index, 8, &q.waiting));
    let sleeps = prepare(&p.waiting, &p.index, 8, &p.closed);
    let rang = producer.join().unwrap();
    assert!(
        !sleeps || rang,
        "lost wake-up: the consumer sleeps through the close, nobody rings"
    );
    if !sleeps {
        // It did not sleep because it saw the close (the index is the same).
        assert_ne!(p.closed.load(Ordering::Relaxed), 0);
    }
    // Lowered by the consumer that did not sleep, or by the ringing close.
    assert_eq!(p.waiting.load(Ordering::Relaxed), 0, "flag left up");
}

/// The interleaving of issue 13, in every order: the consumer's sleep
/// decision against the producer's close.
#[test]
fn no_lost_wakeup_on_close() {
    model(|| one_close_one_sleep(W::new, protocol::prepare_sleep_unless_closed));
}

/// A consumer that really sleeps, as the channel's blocking receive does:
/// it returns once it saw the close (and the index did not move past what
/// it consumed), otherwise takes a doorbell token, prepares to sleep and
/// sleeps on the doorbell until it changes. The producer closes the ring
/// and rings when told to. With a lost wake-up the consumer would wait on
/// the doorbell forever and loom would report it.
fn consumer_sees_the_close<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T, prepare: Prepare<T>) {
    struct S<T> {
        ring: Closing<T>,
        bell: AtomicU64,
    }
    let s = Arc::new(S {
        ring: Closing {
            index: mk(8),
            waiting: mk(0),
            closed: mk(0),
        },
        bell: AtomicU64::new(0),
    });
    let t = s.clone();
    let producer = thread::spawn(move || {
        let r = &t.ring;
        if protocol::close(&r.closed, &r.index, 8, &r.waiting) {
            t.bell.fetch_add(1, Ordering::Release);
        }
    });
    let r = &s.ring;
    while r.closed.load(Ordering::Acquire) == 0 {
        let token = s.bell.load(Ordering::Acquire);
        if prepare(&r.waiting, &r.index, 8, &r.closed) {
            while s.bell.load(Ordering::Acquire) == token {
                thread::yield_now();
            }
            protocol::finish_sleep(&r.waiting);
        }
    }
    assert_eq!(r.index.load(Ordering::Acquire), 8);
    producer.join().unwrap();
}

#[test]
fn a_sleeping_consumer_always_sees_the_close() {
    model(|| consumer_sees_the_close(W::new, protocol::prepare_sleep_unless_closed));
}

// ---------------------------------------------------------------------------
// (d) Format version 2: a record is published by its header

/// One record through a version 2 ring (`Producer::commit`,
/// `Consumer::peek`, `Consumer::prepare_sleep`): the producer writes the
/// payload (a plain cell), clears the next header slot (which still holds
/// a word an earlier lap left there), stores the header with release
/// ordering and publishes its index with the protocol. The consumer found
/// the header slot at its index empty; it looks at the slot once more
/// (`poll_first`) or goes straight to announcing sleep against the slot
/// (seen 0), as `Consumer::prepare_sleep` does. Whenever it sleeps, the
/// producer rings; whenever it sees the header, the payload is complete
/// (loom's race detector checks the read) and the next slot reads empty,
/// never the stale word.
fn v2_one_record<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T, poll_first: bool) {
    struct R<T> {
        payload: UnsafeCell<u64>,
        slot: T,
        next: T,
        index: T,
        waiting: T,
        closed: T,
    }
    const HEADER: u64 = 8 | 1 << 32; // 8 bytes, MSG
    const STALE: u64 = 16 | 1 << 32; // a header of an earlier lap
    let r = Arc::new(R {
        payload: UnsafeCell::new(0),
        slot: mk(0),
        next: mk(STALE),
        index: mk(0),
        waiting: mk(0),
        closed: mk(0),
    });
    let p = r.clone();
    let producer = thread::spawn(move || {
        // SAFETY (model): loom checks that no read of this cell races.
        p.payload.with_mut(|x| unsafe { *x = 42 });
        p.next.store(0, Ordering::Relaxed);
        p.slot.store(HEADER, Ordering::Release);
        protocol::publish(&p.index, 16, &p.waiting)
    });
    let mut header = if poll_first {
        r.slot.load(Ordering::Acquire)
    } else {
        0
    };
    let mut sleeps = false;
    if header == 0 {
        sleeps = protocol::prepare_sleep_unless_closed(&r.waiting, &r.slot, 0, &r.closed);
        if !sleeps {
            header = r.slot.load(Ordering::Acquire);
            assert_ne!(header, 0, "no sleep, but no record either");
        }
    }
    if header != 0 {
        assert_eq!(header, HEADER);
        // SAFETY (model): loom checks that no write of this cell races.
        let v = r.payload.with(|x| unsafe { *x });
        assert_eq!(v, 42, "a record without its payload");
        assert_eq!(
            r.next.load(Ordering::Acquire),
            0,
            "a stale word after the record"
        );
    }
    let rang = producer.join().unwrap();
    assert!(
        !sleeps || rang,
        "lost wake-up: the consumer sleeps, nobody rings"
    );
}

#[test]
fn v2_header_publishes_the_record() {
    model(|| v2_one_record(W::new, true));
}

#[test]
fn v2_sleep_on_the_header_slot_loses_no_wakeup() {
    model(|| v2_one_record(W::new, false));
}

// ---------------------------------------------------------------------------
// Negative controls: the models catch the bugs they are about.

/// The ordering before issue 13 (the closed flag read before the fence)
/// loses the close's wake-up.
#[test]
#[should_panic(expected = "lost wake-up: the consumer sleeps through the close")]
fn control_closed_read_before_fence_loses_the_close() {
    model(|| one_close_one_sleep(W::new, prepare_sleep_closed_first));
}

/// The same, for a consumer that really sleeps: it sleeps on the doorbell
/// forever, which loom reports as a model that never ends.
#[test]
#[should_panic(expected = "maximum number of branches")]
fn control_closed_read_before_fence_sleeps_forever() {
    model(|| consumer_sees_the_close(W::new, prepare_sleep_closed_first));
}

/// The new ordering needs its fence too.
#[test]
#[should_panic(expected = "lost wake-up: the consumer sleeps through the close")]
fn control_close_without_fence_loses_the_close() {
    model(|| {
        one_close_one_sleep(
            |v| NoFence(AtomicU64::new(v)),
            protocol::prepare_sleep_unless_closed,
        )
    });
}

#[test]
#[should_panic]
fn control_without_fence_loses_wakeups() {
    model(|| one_publish_one_sleep(|v| NoFence(AtomicU64::new(v)), 8));
}

#[test]
#[should_panic]
fn control_relaxed_indices_race_on_slots() {
    model(|| two_slot_ring(|v| Relaxed(AtomicU64::new(v))));
}

/// Version 2 with a relaxed header store: the consumer may see the header
/// before the payload or the cleared slot.
#[test]
#[should_panic(expected = "Causality violation")]
fn control_v2_relaxed_header_races_on_the_payload() {
    model(|| v2_one_record(|v| Relaxed(AtomicU64::new(v)), true));
}

/// Version 2 without the fences: the sleep on the header slot loses the
/// wake-up.
#[test]
#[should_panic(expected = "lost wake-up: the consumer sleeps, nobody rings")]
fn control_v2_without_fence_loses_wakeups() {
    model(|| v2_one_record(|v| NoFence(AtomicU64::new(v)), false));
}

// ---------------------------------------------------------------------------
// (e) The receive queue: many producers, one consumer (core/src/queue.rs)

/// Two producers that found the queue full announce their sleeps, each
/// with its own bit of one word (`protocol::prepare_sleep_bit`), while the
/// consumer hands space back and collects the bits it finds
/// (`protocol::publish_collect`). A producer that decided to sleep is
/// always among those the consumer rings.
fn queue_two_sleepers<T: Word + Send + Sync + 'static>(mk: fn(u64) -> T) {
    struct S<T> {
        cons: T,
        bits: T,
        closed: T,
    }
    let s = Arc::new(S {
        cons: mk(0),
        bits: mk(0),
        closed: mk(0),
    });
    let producers: Vec<_> = (0..2)
        .map(|i| {
            let s = s.clone();
            thread::spawn(move || {
                protocol::prepare_sleep_bit(&s.bits, 1 << i, &s.cons, 0, &s.closed)
            })
        })
        .collect();
    let rung = protocol::publish_collect(&s.cons, 16, [&s.bits])[0];
    for (i, p) in producers.into_iter().enumerate() {
        let sleeps = p.join().unwrap();
        assert!(
            !sleeps || rung >> i & 1 == 1,
            "lost wake-up: producer {i} sleeps, nobody rings"
        );
    }
}

#[test]
fn queue_no_lost_wakeup_among_producers() {
    model(|| queue_two_sleepers(W::new));
}

#[test]
#[should_panic(expected = "lost wake-up: producer")]
fn control_queue_without_fence_loses_wakeups() {
    model(|| queue_two_sleepers(|v| NoFence(AtomicU64::new(v))));
}

/// A queue of one one-record cell shared by two producers, as `queue.rs`
/// runs it: a producer takes the cell with a compare-and-swap of the shared
/// reservation word, after checking it against the consumer index (read
/// again with acquire when the queue looks full; here a producer that
/// still finds no room gives up instead of waiting), writes the payload,
/// then publishes the header (release); the consumer polls the header at
/// its index (acquire), reads the payload, clears the header when `clear`
/// (the queue's rule: zero the released space before the index that hands
/// it back), publishes its index (release) and polls once more, at the
/// next lap of the same cell. No thread spins, so loom explores every
/// interleaving. Every record taken was sent, once, with its own payload,
/// and loom's race detector proves that the second producer never writes
/// the payload while the consumer may still read the first. Without the
/// clearing, the consumer's second poll takes the first record again.
fn one_cell_queue(clear: bool) {
    struct Q {
        reserve: AtomicU64,
        cons: W,
        header: W,
        payload: UnsafeCell<u64>,
    }
    let q = Arc::new(Q {
        reserve: AtomicU64::new(0),
        cons: W::new(0),
        header: W::new(0),
        payload: UnsafeCell::new(0),
    });
    let producers: Vec<_> = (1..=2u64)
        .map(|slot| {
            let q = q.clone();
            thread::spawn(move || {
                let mut r = q.reserve.load(Ordering::Relaxed);
                let mut cons = 0u64;
                loop {
                    if r - cons >= 1 {
                        cons = q.cons.load(Ordering::Acquire);
                        r = q.reserve.load(Ordering::Relaxed);
                        if r - cons >= 1 {
                            return;
                        }
                    }
                    // A failed exchange means the other producer took it:
                    // at most one retry.
                    match q
                        .reserve
                        .compare_exchange(r, r + 1, Ordering::Relaxed, Ordering::Relaxed)
                    {
                        Ok(_) => break,
                        Err(now) => r = now,
                    }
                }
                // SAFETY (model): loom checks that no read of the payload
                // races with this write.
                q.payload.with_mut(|p| unsafe { *p = 100 * slot });
                q.header.store(slot, Ordering::Release);
            })
        })
        .collect();
    let mut seen = [false; 3];
    for idx in 0..2u64 {
        let h = q.header.load(Ordering::Acquire);
        if h == 0 {
            break;
        }
        assert!(h <= 2, "a header nobody wrote");
        assert!(!seen[h as usize], "a stale header taken again");
        seen[h as usize] = true;
        // SAFETY (model): loom checks that no write of the payload races.
        let v = q.payload.with(|p| unsafe { *p });
        assert_eq!(v, 100 * h, "a payload not the record's");
        if clear {
            q.header.store(0, Ordering::Relaxed);
        }
        q.cons.store(idx + 1, Ordering::Release);
    }
    for p in producers {
        p.join().unwrap();
    }
}

#[test]
fn queue_records_arrive_once_with_their_payload() {
    model(|| one_cell_queue(true));
}

#[test]
#[should_panic(expected = "a stale header taken again")]
fn control_queue_without_clearing_takes_a_stale_header() {
    model(|| one_cell_queue(false));
}

// ---------------------------------------------------------------------------
// The loom limitation behind the ignored models: tokio-rs/loom#254.

/// Thread W (waiter) raises, lowers and raises a flag around two
/// `fence(SeqCst)`s, then reads an index; thread P (publisher) publishes the
/// index twice, each time fence + read of the flag, and clears the flag with
/// a `swap` in between (as `protocol::publish` does). C++20
/// [atomics.order]/4.4 forbids `r2 == 8 && sw == 0 && r3 == 0`: `sw == 0`
/// places the swap right after the lowering store, hence before the second
/// raise in the modification order; `r3 == 0` then makes `r3` coherence-
/// ordered before the raise, so P's second fence precedes W's second fence
/// in S, while `r2 == 8` requires the opposite. Loom 0.7.3 reports it
/// anyway (tokio-rs/loom#254; fixed by tokio-rs/loom PR #391, unreleased).
#[test]
#[should_panic(expected = "forbidden outcome")]
fn loom_rmw_false_positive() {
    loom::model(|| {
        // (index, flag)
        let a = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let b = a.clone();
        let p = thread::spawn(move || {
            b.0.store(8, Ordering::Release);
            fence(Ordering::SeqCst);
            let sw = if b.1.load(Ordering::Relaxed) != 0 {
                b.1.swap(0, Ordering::Relaxed)
            } else {
                9
            };
            b.0.store(16, Ordering::Release);
            fence(Ordering::SeqCst);
            (sw, b.1.load(Ordering::Relaxed))
        });
        a.1.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let _ = a.0.load(Ordering::Acquire);
        a.1.store(0, Ordering::Relaxed);
        a.1.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let r2 = a.0.load(Ordering::Acquire);
        let (sw, r3) = p.join().unwrap();
        assert!(
            r2 == 16 || r3 == 1 || sw == 1,
            "forbidden outcome r2={r2} sw={sw} r3={r3}"
        );
    });
}
