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

use std::sync::atomic::Ordering;

/// An atomic 64-bit word, as the protocol needs it.
#[doc(hidden)]
pub trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn swap(&self, value: u64, order: Ordering) -> u64;
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
    own_index.store(index, Ordering::Release);
    W::fence();
    peer_waiting.load(Ordering::Relaxed) != 0 && peer_waiting.swap(0, Ordering::Relaxed) != 0
}

/// Announces that this side is about to sleep until the other side's index
/// moves past `seen`. Returns `true` when the caller may sleep (the flag stays
/// set; the other side will ring), `false` when the index already moved (the
/// flag is cleared again and the caller must not sleep).
#[doc(hidden)]
#[inline(always)]
pub fn prepare_sleep<W: Word>(own_waiting: &W, peer_index: &W, seen: u64) -> bool {
    own_waiting.store(1, Ordering::Relaxed);
    W::fence();
    if peer_index.load(Ordering::Acquire) != seen {
        own_waiting.store(0, Ordering::Relaxed);
        false
    } else {
        true
    }
}

/// Withdraws a sleep announcement after waking (by doorbell or time-out).
#[doc(hidden)]
#[inline(always)]
pub fn finish_sleep<W: Word>(own_waiting: &W) {
    own_waiting.store(0, Ordering::Relaxed);
}
