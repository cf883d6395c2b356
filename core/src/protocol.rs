//! The index and notify protocol of a ring, written once over an abstract
//! atomic word so that the production ring (atomics in shared pages) and the
//! loom model (`core/tests/loom.rs`) run the very same functions.
//!
//! The protocol is a Dekker-style handshake: a side that wants to sleep first
//! announces it (sets its *waiting* flag), then re-reads the other side's
//! index; the other side first publishes its index, then reads the flag. A
//! full fence sits between the store and the load on both sides, so at least
//! one of the two sees the other's store: either the sleeper sees the new
//! index and does not sleep, or the publisher sees the flag and rings the
//! doorbell. That is the no-lost-wake-up argument; `tests/loom.rs` checks it
//! exhaustively.
//!
//! Closing is a publish like any other: the producer stores the closed flag,
//! then publishes its index (unchanged or not) with the same store, fence,
//! flag read ([`close`]). The consumer's sleep therefore counts the closed
//! flag among the things it re-reads after its fence
//! ([`prepare_sleep_unless_closed`]): either it sees the close, or the
//! closing producer sees its flag and rings. A closed flag read *before* the
//! fence proves nothing (the close may land just after that read, and its
//! publish, which moves no index, may miss a flag not yet raised): that
//! ordering lost the wake-up until the consumer slept out its slice.

use std::sync::atomic::Ordering;

/// An atomic 64-bit word, as the protocol needs it.
#[doc(hidden)]
pub trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn swap(&self, value: u64, order: Ordering) -> u64;
    fn fetch_or(&self, value: u64, order: Ordering) -> u64;
    fn fetch_and(&self, value: u64, order: Ordering) -> u64;
    /// A sequentially consistent fence of the same memory model as the word.
    fn fence();
}

impl Word for std::sync::atomic::AtomicU64 {
    #[inline(always)]
    fn load(&self, order: Ordering) -> u64 {
        std::sync::atomic::AtomicU64::load(self, order)
    }
    #[inline(always)]
    fn store(&self, value: u64, order: Ordering) {
        std::sync::atomic::AtomicU64::store(self, value, order)
    }
    #[inline(always)]
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        std::sync::atomic::AtomicU64::swap(self, value, order)
    }
    #[inline(always)]
    fn fetch_or(&self, value: u64, order: Ordering) -> u64 {
        std::sync::atomic::AtomicU64::fetch_or(self, value, order)
    }
    #[inline(always)]
    fn fetch_and(&self, value: u64, order: Ordering) -> u64 {
        std::sync::atomic::AtomicU64::fetch_and(self, value, order)
    }
    #[inline(always)]
    fn fence() {
        std::sync::atomic::fence(Ordering::SeqCst)
    }
}

/// Publishes `index` (the producer's after a commit, or the consumer's after
/// a release) and reports whether the other side announced that it sleeps;
/// if so the flag is cleared and the caller must ring the doorbell once.
#[doc(hidden)]
#[inline(always)]
pub fn publish<W: Word>(own_index: &W, index: u64, peer_waiting: &W) -> bool {
    publish_collect(own_index, index, [peer_waiting])[0] != 0
}

/// Announces that this side is about to sleep until the other side's index
/// moves past `seen`. Returns `true` when the caller may sleep (the flag stays
/// set; the other side will ring), `false` when the index already moved (the
/// flag is cleared again and the caller must not sleep).
///
/// A producer waiting for space uses it as is: no close ends that wait (the
/// closed flag of its ring is its own, and the peer closing the other ring
/// of the channel closes only the peer's sending direction). A consumer
/// uses [`prepare_sleep_unless_closed`].
#[doc(hidden)]
#[inline(always)]
pub fn prepare_sleep<W: Word>(own_waiting: &W, peer_index: &W, seen: u64) -> bool {
    announce::<W>(
        || own_waiting.store(1, Ordering::Relaxed),
        || finish_sleep(own_waiting),
        || peer_index.load(Ordering::Acquire) == seen,
    )
}

/// Raises the waiting flag (`raise`), fences, and keeps it raised only
/// while `still_idle` (read after the fence) says there is nothing to wake
/// for; `lower` takes it down otherwise.
#[inline(always)]
fn announce<W: Word>(
    raise: impl FnOnce(),
    lower: impl FnOnce(),
    still_idle: impl FnOnce() -> bool,
) -> bool {
    raise();
    W::fence();
    if still_idle() {
        true
    } else {
        lower();
        false
    }
}

/// What a sleeper that also wakes for a close reads after its fence: the
/// index still at `seen` and the closed flag still down (acquire, so that
/// what was published before the close is seen by the next index load).
#[inline(always)]
fn unmoved_and_open<W: Word>(peer_index: &W, seen: u64, closed: &W) -> bool {
    peer_index.load(Ordering::Acquire) == seen && closed.load(Ordering::Acquire) == 0
}

/// [`prepare_sleep`] for a consumer, which also wakes for the close of its
/// ring: after the fence it re-reads the producer index *and* the closed
/// flag (acquire, so that the records published before the close are seen
/// by the next index load). Returns `true` when the caller may sleep (the
/// producer will ring for a new record or for the close), `false` when the
/// index moved or the ring is closed (the flag is cleared again and the
/// caller must not sleep).
///
/// The closed flag that counts is the one read after the fence: the
/// producer's [`close`] stores it before its own fence, so if the producer's
/// fence comes first in the single total order of seq_cst fences, this load
/// sees the flag; if the consumer's fence comes first, the producer's load
/// of the waiting flag sees it raised and the producer rings. The first
/// load, before the flag is raised, is a shortcut only (a ring closed long
/// ago costs no fence); on its own it would lose the wake-up of a close
/// that lands just after it.
#[doc(hidden)]
#[inline(always)]
pub fn prepare_sleep_unless_closed<W: Word>(
    own_waiting: &W,
    peer_index: &W,
    seen: u64,
    closed: &W,
) -> bool {
    if closed.load(Ordering::Acquire) != 0 {
        return false;
    }
    announce::<W>(
        || own_waiting.store(1, Ordering::Relaxed),
        || finish_sleep(own_waiting),
        || unmoved_and_open(peer_index, seen, closed),
    )
}

/// Closes a ring (producer): stores the closed flag, then publishes `index`
/// (the last published producer index) as [`publish`] does, so that a
/// consumer that announced sleep is rung. Returns whether the caller must
/// ring the doorbell once.
#[doc(hidden)]
#[inline(always)]
pub fn close<W: Word>(closed: &W, own_index: &W, index: u64, peer_waiting: &W) -> bool {
    closed.store(1, Ordering::Release);
    publish(own_index, index, peer_waiting)
}

/// Withdraws a sleep announcement after waking (by doorbell or time-out).
#[doc(hidden)]
#[inline(always)]
pub fn finish_sleep<W: Word>(own_waiting: &W) {
    own_waiting.store(0, Ordering::Relaxed);
}

/// [`publish`] with many waiters, the receive queue's consumer
/// (docs/queue-format.md): publishes the index, then collects every waiter
/// that announced it sleeps, clearing their flags or bits (`bits`: words of
/// one bit per producer slot; a ring's one flag for [`publish`]). Returns
/// what it cleared: ring each of those waiters once. Each queue producer
/// announces with its own bit ([`prepare_sleep_bit`]), and either it sees
/// this index or this fence's loads see its bit.
#[doc(hidden)]
#[inline(always)]
pub fn publish_collect<W: Word, const N: usize>(
    own_index: &W,
    index: u64,
    bits: [&W; N],
) -> [u64; N] {
    own_index.store(index, Ordering::Release);
    W::fence();
    let mut out = [0u64; N];
    for (o, w) in out.iter_mut().zip(bits) {
        if w.load(Ordering::Relaxed) != 0 {
            *o = w.swap(0, Ordering::Relaxed);
        }
    }
    out
}

/// A queue producer that found no room announces that it sleeps until the
/// consumer index moves past `seen`: raises its `bit` in `bits`, fences,
/// and re-reads the index and the queue's closed flag. `true`: sleep (the
/// consumer will ring, [`publish_collect`]); `false`: the index moved or the
/// queue is closed (the bit is lowered again; do not sleep).
#[doc(hidden)]
#[inline(always)]
pub fn prepare_sleep_bit<W: Word>(
    bits: &W,
    bit: u64,
    peer_index: &W,
    seen: u64,
    closed: &W,
) -> bool {
    announce::<W>(
        || {
            bits.fetch_or(bit, Ordering::Relaxed);
        },
        || finish_sleep_bit(bits, bit),
        || unmoved_and_open(peer_index, seen, closed),
    )
}

/// Lowers a queue producer's waiting bit after it woke (doorbell or
/// time-out).
#[doc(hidden)]
#[inline(always)]
pub fn finish_sleep_bit<W: Word>(bits: &W, bit: u64) {
    bits.fetch_and(!bit, Ordering::Relaxed);
}
