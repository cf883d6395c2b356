//! Single-producer/single-consumer record ring laid out in shared pages.
//!
//! The wire format is documented in `docs/ring-format.md`. In short: one
//! 4 KiB control page (header, producer index, consumer index, doorbell,
//! the two sleep flags and the close flag, each on its own 64-byte cache
//! line) followed by a power-of-two data area of
//! 8-byte aligned records `{len: u32, type: u8, tag: u8, reserved: u16}` plus
//! payload padded to 8 bytes. Records never wrap: a padding record fills the
//! end of the data area when the next record does not fit before it.
//!
//! A producer whose next record would end past the first [`REWIND_AT`]
//! bytes, and that finds the ring empty (for a record of at most
//! [`WRAP_BEHIND_MAX`] bytes: finds that what the consumer passed in this
//! lap holds it), pads to the end and starts over at
//! offset 0 (an early wrap, in the format's own padding record): traffic
//! that the consumer keeps up with stays in the first pages of the ring
//! (or in its largest record), so the pages behind
//! them are never touched (the host backend does not populate them up
//! front) and the working set stays in the caches.
//!
//! Under a [`Budget`] (ring space a process's producers share), a producer
//! also wraps before the end of the data area, at its share of the budget:
//! with many peers, each ring's records stay in its first pages, however
//! much is in flight. Both are the producer's choice alone; the format and
//! the consumer are the same.
//!
//! A record is published by its header (format version 2): the producer
//! writes the payload, clears the header slot where the next record will
//! start, then stores the header with release ordering; the consumer polls
//! the slot at its own index, so a small message costs it the transfer of
//! the record's own cache line and nothing else. The slot after the last
//! record is always free (the ring holds at most `data_size - 8` bytes).
//!
//! Indices are free-running 64-bit byte counts (`index % size` is the
//! offset). Each side keeps its own index locally (the shared copy is only
//! published, never read back). The producer caches the consumer's,
//! reloading it only when the ring looks full; the consumer does not need
//! the producer's.
//!
//! Everything in the shared pages is hostile input: every value read from
//! them is read once into a local and checked before use; a violation breaks
//! the ring for good and is reported as [`Error::Broken`].

use crate::error::{Error, Result, Violation};
use crate::payload::Payload;
use crate::protocol;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// `"IVCR"` little-endian.
pub const MAGIC: u32 = 0x5243_5649;
/// Wire-format version of this implementation.
pub const VERSION: u16 = 2;
/// Size of the control page that precedes each ring's data area.
pub const CTRL_BYTES: usize = 4096;
/// Size of a record header.
pub const RECORD_HEADER: usize = crate::record::HEADER;
/// Records (or runs of records released together) of at least this many
/// bytes are claimed by the consumer as it releases them
/// ([`Consumer::release`]).
pub const CLAIM_MIN: u64 = 1024;
/// ... while the ring's laps are at most this long. A claimed line is
/// written again by the producer one lap later. Laps of a full 4 MiB ring
/// (a window of large messages that keeps it full) gained nothing from
/// the claim and lost where the placement had favoured them (osu_mbw_mr
/// between two ranks at 1 MiB: 10-12 GB/s in every run of one comparison,
/// where the build before read 28-31 in five of eight); laps of large
/// messages one at a time (past [`LONG_LAP`] and a record) gained the
/// most (osu_latency from 16 KiB to 1 MiB with the two CPUs far apart:
/// 1.7-5.9 times vader's time before, 1.1-1.4 with the claim).
pub const CLAIM_LAP: u64 = 2 * LONG_LAP;
/// Smallest data area.
pub const MIN_DATA: usize = 4096;
/// Largest data area (1 GiB).
pub const MAX_DATA: usize = 1 << 30;
/// Offset that a producer's records do not cross while it finds the ring
/// empty: it wraps early instead (rings of at least four times this size).
pub const REWIND_AT: u64 = 16 << 10;
/// Smallest piece a producer under a [`Budget`] asks large messages to be
/// cut into ([`Producer::piece`]): two of them, with their headers and the
/// free header slot after them, fill 24 KiB, the least ring a share of the
/// budget holds (less when the largest record is smaller).
pub const MIN_PIECE: usize = (24 << 10) / 2 - 2 * RECORD_HEADER;
/// Producer progress between two looks at the consumer index for an early
/// wrap while the ring is not empty.
const REWIND_STRIDE: u64 = 16 << 10;
/// A ring that gives idle pages back ([`Producer::give_back_idle_pages`])
/// keeps the first this many bytes of its data area: the records of a
/// producer whose consumer keeps up stay below [`REWIND_AT`].
pub const KEEP_BYTES: u64 = 64 << 10;

/// A producer that ran out of room in a lap cut short by an early wrap
/// keeps its longer laps (see `Producer::min_lap`) until it has gone this
/// long without running out, in nanoseconds (less if it gives idle pages
/// back sooner: [`Producer::give_back_idle_pages`]): the give-back delay
/// of the host backend's rings. A tenth of a second was tried too; on
/// this noisy host the two could not be told apart (docs/PERFORMANCE.md).
pub const LONG_LAPS_FOR: u64 = 1_000_000_000;

/// Ring space a batch of [`Consumer::peek_msgs`] takes at most (the
/// record that reaches it is its last). A batch's records go back to the
/// producer only when all of it is released: bounded so, a stream of
/// larger messages holds back at most a page more than one message at a
/// time did, where batches of 16 would hold 128 KiB of 8 KiB messages (one
/// comparison with such batches read osu_bw with fresh data a third lower
/// from 512 B up; interleaved runs did not reproduce it). Small messages
/// still go 16 at a time (16 records of 8 bytes are 512 bytes of ring).
pub const BATCH_BYTES: u64 = 4096;

/// Records of at most this many bytes (header included: a 2 KiB message
/// with its upper layer's header) wrap early while the consumer is still
/// behind; larger ones only with the ring empty (see `Producer::rewind`).
pub const WRAP_BEHIND_MAX: u64 = 2048 + 64;

/// A producer whose wrap offset lies at least this far into the data
/// area (a ring with few peers under its budget) gives a lap that holds a
/// record larger than [`WRAP_BEHIND_MAX`] no early wrap before
/// [`LONG_LAP`] (or the wrap offset, when nearer): its lines have left the
/// receiving core's private caches (1 MiB of L2 on the machine
/// measured) before they are written again (see `Producer::rewind`).
pub const LONG_LAP_MIN: u64 = 512 << 10;

/// The offset to which such a lap runs before the usual rules apply
/// again (a wrap once the ring is empty): the pages that a ping-pong of
/// large messages touches, whatever the ring's size.
pub const LONG_LAP: u64 = 1 << 20;

/// Looks in a row that only small records come to (each after news from
/// the peer: an exchange) that end a long lap before [`LONG_LAP`]: in a
/// ping-pong of large messages a small one (ob1's acknowledgement) comes
/// between large ones; a pair whose exchange went small after a burst
/// wraps early again, and gives its pages back a second later.
pub const LONG_LAP_SMALL_LOOKS: u8 = 8;

/// Records larger than this (header included: messages of more than 512
/// bytes with their upper layer's header) and of at most
/// [`WRAP_BEHIND_MAX`] are medium: a one-way stream of them that has run
/// [`MEDIUM_STREAM`] bytes (over warm pages) or [`MEDIUM_STREAM_COLD`]
/// gets long laps as large records do.
pub const MEDIUM_MIN: u64 = 512 + 64;

/// Bytes that a one-way stream of medium records runs on short laps
/// before its laps go long (where the wrap offset lies at least
/// [`LONG_LAP_MIN`] in) when the pages of a long lap are there already
/// (a lap ended within 64 KiB of [`LONG_LAP`] since they were last given
/// back).
pub const MEDIUM_STREAM: u64 = 256 << 10;

/// The same over fresh pages: the first lap over them (about 250 pages
/// at 2.0-2.7 us each here) costs what the long laps gain over some 16 MB
/// of a 1 KiB stream (1.26x between pinned ranks), so a stream keeps its
/// short laps until it has run that long (a rent-or-buy rule: a stream
/// that ends sooner paid at most twice the best choice), and short runs
/// of such messages (OSU's phases of 1.4-14 MB) do not pay it at all.
pub const MEDIUM_STREAM_COLD: u64 = 16 << 20;

/// A one-way stream of medium records that has run this far over fresh
/// pages (the host backend's) asks its consumer to prepare the pages of a
/// long lap ([`OFF_PROD_WANT`]): the consumer, whose polls find nothing
/// between the sender's records at these sizes, prepares them at one of
/// every [`PREPARE_EVERY`] such polls ([`Consumer::prepare_pages`]: all at
/// once, or a page a call where the host's ranks outnumber its CPUs), and
/// once all are there ([`OFF_CONS_READY`]) the producer maps them in one
/// call and counts the ring as warm: long laps after [`MEDIUM_STREAM`], not
/// [`MEDIUM_STREAM_COLD`], with the first lap's page allocations moved off
/// the sender.
pub const MEDIUM_PREPARE: u64 = 64 << 10;

/// Polls that found nothing per preparation a consumer makes (see
/// [`MEDIUM_PREPARE`]).
pub const PREPARE_EVERY: u32 = 16;

/// The producer streams one way while what it heard from its peer
/// between two looks is at most this fraction of what it wrote in the
/// meantime in this lap (at least [`REWIND_STRIDE`]): 1/32, half a KiB a
/// look at least (osu_bw's reply to a window of 64 messages is some 64
/// bytes; a ping-pong hears as much as it sends).
const ONE_WAY: u64 = 32;

/// Whether consumers of this process tell their CPU ([`OFF_CONS_CPU`]):
/// on once a caller asks whether its consumers are at work
/// ([`tell_cpu`]), so that a process whose ranks have cores of their own
/// pays nothing for it.
static TELL_CPU: AtomicBool = AtomicBool::new(false);

/// From now on the consumers of this process whose rings share the CPUs
/// of one kernel tell their producer the CPU they run on as they release
/// space (for [`Producer::consumer_draining`] on the other side).
pub fn tell_cpu() {
    TELL_CPU.store(true, Ordering::Relaxed);
}

/// The CPU this thread runs on, plus one (0: unknown).
fn cpu_plus_one() -> u64 {
    // SAFETY: no arguments; reads the calling thread's CPU.
    let c = unsafe { libc::sched_getcpu() };
    if c < 0 {
        0
    } else {
        c as u64 + 1
    }
}

/// Calls of [`Producer::consumer_draining`] that still answer `true` after
/// one that saw the consumer at work: it releases its space a batch at a
/// time (16 records or 4 KiB, [`BATCH_BYTES`]), a waiting sender polls
/// several times per batch, and a consumer that took the last record
/// answers a moment later.
pub const DRAINING_GRACE: u32 = 64;

/// The coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: a few nanoseconds
/// to read, no system call; it advances once per kernel tick, 1 to 10 ms),
/// in nanoseconds.
#[inline]
fn coarse_ticks() -> u64 {
    #[cfg(test)]
    if let Some(t) = tests::FROZEN_CLOCK.with(|c| c.get()) {
        return t;
    }
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; the call cannot fail for
    // this clock on Linux (if it did, `t` stays zero: no look, as before).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}

pub const OFF_MAGIC: usize = 0x00; // magic u32, version u16, ctrl_pages u16
pub const OFF_GEOMETRY: usize = 0x08; // data_size u32, max_record u32
pub const OFF_NONCE: usize = 0x10; // u64, written by the creator for the probe
/// Producer index: written by the producer on every commit.
pub const OFF_PROD: usize = 0x40;
/// Consumer index: written by the consumer on every release batch.
pub const OFF_CONS: usize = 0x80;
/// The consumer's CPU plus one when it last published its index (0: not
/// told), on the consumer index's line: a hint for a waiting producer on
/// the same kernel ([`Producer::consumer_draining`]), never trusted for
/// anything else.
pub const OFF_CONS_CPU: usize = 0x88;
/// Offset of the 32-bit doorbell word (host backend futex) that wakes the
/// consumer of this ring.
pub const OFF_BELL: usize = 0xC0;
/// "Producer sleeps waiting for space": its own line, so that reading it on
/// every release costs no transfer of a line the producer keeps writing.
pub const OFF_PROD_WAITING: usize = 0x100;
/// "Consumer sleeps waiting for data": its own line, likewise.
pub const OFF_CONS_WAITING: usize = 0x140;
/// Set by the producer when it closes the ring.
pub const OFF_CLOSED: usize = 0x180;
/// Non-zero: the producer never sleeps waiting for space (it polls), so the
/// consumer may publish its index without the notify protocol's fence.
/// Written once by the producer before the rings are used.
pub const OFF_PROD_POLLS: usize = 0x1C0;
/// Non-zero: the consumer never sleeps waiting for data (it polls), so the
/// producer may publish without the fence. Written once by the consumer
/// before the rings are used.
pub const OFF_CONS_POLLS: usize = 0x200;
/// The pages the producer asks its consumer to prepare, `epoch << 32 |
/// end` (0: none): a hint, see [`Consumer::prepare_pages`]. Written by the
/// producer when a medium stream begins and at each give-back.
pub const OFF_PROD_WANT: usize = 0x240;
/// What the consumer prepared, `epoch << 32 | end`, once it is done: a
/// hint, see [`Producer::streams`](Producer). Written by the consumer.
pub const OFF_CONS_READY: usize = 0x280;

/// The word of [`OFF_PROD_WANT`] and [`OFF_CONS_READY`]: `epoch << 32 |
/// end` (`end` below 4 GiB, as every data area is).
fn pages_word(epoch: u64, end: u64) -> u64 {
    epoch << 32 | end
}

/// `(epoch, end)` of such a word, as read (the reader bounds `end`).
fn pages_word_parts(w: u64) -> (u64, u64) {
    (w >> 32, w & 0xFFFF_FFFF)
}

/// Record kinds (one home: [`crate::record`]).
pub use crate::record::kind;

/// `n` rounded up to a multiple of 8, for lengths already bounded by the
/// ring (at most [`MAX_DATA`]).
#[inline]
const fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// `n` rounded up to a multiple of 8, `None` where that overflows (sizes
/// from a configuration may be anything).
#[inline]
const fn checked_align8(n: usize) -> Option<usize> {
    match n.checked_add(7) {
        Some(m) => Some(m & !7),
        None => None,
    }
}

/// Geometry of one ring, agreed by both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes in the data area (power of two).
    pub data_size: u32,
    /// Largest record payload.
    pub max_record: u32,
}

impl Geometry {
    /// A geometry with `data_size` bytes of data and the largest record a
    /// quarter of it (so that a streaming producer keeps several records in
    /// flight).
    pub fn new(data_size: usize) -> Result<Self> {
        Self::with_max_record(data_size, data_size / 4)
    }

    /// A geometry with an explicit largest record.
    pub fn with_max_record(data_size: usize, max_record: usize) -> Result<Self> {
        if !data_size.is_power_of_two() || !(MIN_DATA..=MAX_DATA).contains(&data_size) {
            return Err(Error::Invalid(format!(
                "ring size {data_size} must be a power of two in [{MIN_DATA}, {MAX_DATA}]"
            )));
        }
        let fits = checked_align8(max_record)
            .and_then(|n| n.checked_add(RECORD_HEADER))
            .is_some_and(|n| n <= data_size / 2);
        if !fits {
            return Err(Error::Invalid(format!(
                "largest record {max_record} must fit in half the ring ({data_size})"
            )));
        }
        Ok(Geometry {
            data_size: data_size as u32,
            max_record: max_record as u32,
        })
    }

    /// The same geometry with half the data, if that is still a valid
    /// geometry: the largest record stays, or, where it no longer fits in
    /// half the smaller ring, becomes the largest that does, as long as
    /// that is at least `min_record` bytes. With `min_record` equal to the
    /// largest record, the record never shrinks.
    pub fn halved(&self, min_record: usize) -> Option<Geometry> {
        let data = self.data_size as usize / 2;
        let fit = (data / 2).saturating_sub(RECORD_HEADER) & !7;
        let rec = (self.max_record as usize).min(fit);
        if rec < min_record.min(self.max_record as usize) {
            return None;
        }
        Geometry::with_max_record(data, rec).ok()
    }

    /// Bytes of shared memory one ring occupies (control page + data).
    pub fn ring_bytes(&self) -> usize {
        CTRL_BYTES + self.data_size as usize
    }

    fn header_word(&self) -> u64 {
        MAGIC as u64 | (VERSION as u64) << 32 | ((CTRL_BYTES / 4096) as u64) << 48
    }

    fn geometry_word(&self) -> u64 {
        self.data_size as u64 | (self.max_record as u64) << 32
    }
}

/// Writes a fresh control page at `base` (the side that created the pages).
///
/// # Safety
/// `base` must point to `geo.ring_bytes()` writable bytes, 64-byte aligned,
/// that no one else uses yet.
pub unsafe fn init(base: *mut u8, geo: Geometry, nonce: u64) {
    // SAFETY: the caller guarantees a private, aligned control page.
    unsafe {
        ptr::write_bytes(base, 0, CTRL_BYTES);
        ptr::write_volatile(base.add(OFF_MAGIC) as *mut u64, geo.header_word());
        ptr::write_volatile(base.add(OFF_GEOMETRY) as *mut u64, geo.geometry_word());
        ptr::write_volatile(base.add(OFF_NONCE) as *mut u64, nonce);
    }
}

/// Reads the probe nonce from a ring's control page.
///
/// # Safety
/// `base` must point to a mapped control page.
pub unsafe fn read_nonce(base: *const u8) -> u64 {
    // SAFETY: in bounds of the control page; any bit pattern is a valid u64.
    unsafe { ptr::read_volatile(base.add(OFF_NONCE) as *const u64) }
}

/// Checks a control page written by the peer against the agreed geometry.
///
/// # Safety
/// `base` must point to a mapped control page.
pub unsafe fn check(base: *const u8, geo: Geometry) -> Result<()> {
    // SAFETY: in bounds of the control page.
    let (h, g) = unsafe {
        (
            ptr::read_volatile(base.add(OFF_MAGIC) as *const u64),
            ptr::read_volatile(base.add(OFF_GEOMETRY) as *const u64),
        )
    };
    check_words(h, g, geo)
}

fn check_words(h: u64, g: u64, geo: Geometry) -> Result<()> {
    if h as u32 != MAGIC {
        return Err(Violation::BadMagic.into());
    }
    if h != geo.header_word() {
        return Err(Violation::BadVersion.into());
    }
    if g != geo.geometry_word() {
        return Err(Violation::BadGeometry.into());
    }
    Ok(())
}

/// Raw view of one ring in mapped memory. Holds no ownership: whoever
/// creates a `Producer` or `Consumer` keeps the mapping alive.
#[derive(Clone, Copy)]
struct View {
    base: *mut u8,
    geo: Geometry,
}

impl View {
    #[inline(always)]
    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the 8-aligned offsets inside the control
        // page, which is mapped for as long as the view is used; AtomicU64 has
        // the layout of u64 and atomics are valid on shared memory.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    #[inline(always)]
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area follows the control page inside the mapping.
        unsafe { self.base.add(CTRL_BYTES) }
    }

    #[inline(always)]
    fn size(&self) -> u64 {
        self.geo.data_size as u64
    }

    /// Re-checks the header words: a peer that rewrites them mid-stream (a
    /// changed version, say) breaks the ring.
    #[inline]
    fn recheck(&self) -> Result<()> {
        let h = self.word(OFF_MAGIC).load(Ordering::Relaxed);
        let g = self.word(OFF_GEOMETRY).load(Ordering::Relaxed);
        check_words(h, g, self.geo)
    }

    fn bell(&self) -> *const AtomicU32 {
        // SAFETY: in bounds of the control page, 4-aligned.
        unsafe { self.base.add(OFF_BELL) as *const AtomicU32 }
    }

    /// The header slot at offset `pos` of the data area: the word a
    /// version 2 consumer polls, and the one the producer publishes a
    /// record with.
    #[inline(always)]
    fn slot(&self, pos: u64) -> &AtomicU64 {
        debug_assert!(pos < self.size() && pos & 7 == 0);
        // SAFETY: `pos` is an 8-aligned offset inside the data area (callers
        // take it modulo the data size), which is mapped while the view is
        // used; an atomic may be written concurrently by the peer.
        unsafe { &*(self.data().add(pos as usize) as *const AtomicU64) }
    }

    /// The payload of the record whose header is at offset `pos` of the
    /// data area.
    ///
    /// # Safety
    /// The record lies in the data area: `pos` + its header and payload
    /// is at most the data size.
    #[inline(always)]
    unsafe fn payload(&self, pos: u64) -> *mut u8 {
        // SAFETY: forwarded contract: inside the mapping.
        unsafe { self.data().add(pos as usize + RECORD_HEADER) }
    }
}

/// Ring space that the producers of one process share: each producer under
/// the budget keeps its records within the first `bytes / producers` of its
/// data area (rounded down to 4 KiB, at least two pieces of
/// [`MIN_PIECE`] or two of its largest records if those are smaller, at
/// most the whole area), recomputed each time it wraps. A process with
/// few peers gives each the whole ring; one with many bounds the pages its
/// rings touch, however full they get. Senders cut large messages into
/// [`Producer::piece`]s, which fit twice in the share; a record larger
/// than that still goes, and wraps at twice its size.
///
/// The division counts the rings the process may come to have, too
/// ([`Budget::expect_one`]: the co-resident peers it admitted): a process
/// of a large job that talks to a few of its peers (a collective's
/// neighbours) gives those few their share of the job, not the whole
/// budget.
#[derive(Debug)]
pub struct Budget {
    bytes: usize,
    producers: AtomicUsize,
    expected: AtomicUsize,
}

impl Budget {
    /// A budget of `bytes` of ring data.
    pub fn new(bytes: usize) -> Arc<Budget> {
        Arc::new(Budget {
            bytes,
            producers: AtomicUsize::new(0),
            expected: AtomicUsize::new(0),
        })
    }

    /// Producers under the budget now.
    pub fn producers(&self) -> usize {
        self.producers.load(Ordering::Relaxed)
    }

    /// Counts one more ring the process may come to send on (a peer that
    /// may share its memory): shares divide the budget by this count when
    /// it exceeds the producers there are.
    pub fn expect_one(&self) {
        self.expected.fetch_add(1, Ordering::Relaxed);
    }

    fn share(&self) -> u64 {
        let n = self.producers().max(self.expected.load(Ordering::Relaxed));
        (self.bytes / n.max(1)) as u64
    }

    /// One ring at most under the budget, now and expected: the process
    /// has a single co-resident peer.
    fn sole(&self) -> bool {
        self.producers() <= 1 && self.expected.load(Ordering::Relaxed) <= 1
    }
}

/// A producer's place under a budget: counted while it lives.
struct Share(Arc<Budget>);

impl Drop for Share {
    fn drop(&mut self) {
        self.0.producers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where [`Producer::place`] put a record: its offset in the data area
/// and its size with header and alignment.
struct Place {
    pos: u64,
    total: u64,
}

/// A record begun ([`Producer::begin_record`]) and not yet published
/// ([`Producer::publish_record`]): what the publication needs, read before
/// the payload is written.
struct Publication {
    /// The record's header slot.
    header: *const AtomicU64,
    /// The next record's header slot.
    next: *const AtomicU64,
    /// Where its payload goes.
    payload: *mut u8,
    /// The producer index's word in the control page.
    index: *const AtomicU64,
    /// The producer index past it.
    prod: u64,
    /// Whether the consumer polls (no doorbell).
    polls: bool,
    /// Its payload length.
    len: usize,
}

/// Copies `n` bytes from `src` to `dst`: up to 16 inline, as two moves
/// that may overlap (an upper layer's header, a small payload: a call to
/// `memcpy` and its size dispatch cost more than the copy), longer ones
/// with `memcpy`.
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes, not overlapping.
#[inline(always)]
unsafe fn copy_short(src: *const u8, dst: *mut u8, n: usize) {
    use std::ptr::{read_unaligned as rd, write_unaligned as wr};
    // SAFETY (all arms): every access lies within the first `n` bytes of
    // `src` and `dst` (contract).
    unsafe {
        if n > 16 {
            std::ptr::copy_nonoverlapping(src, dst, n);
        } else if n >= 8 {
            let (a, b) = (rd(src.cast::<u64>()), rd(src.add(n - 8).cast::<u64>()));
            wr(dst.cast::<u64>(), a);
            wr(dst.add(n - 8).cast::<u64>(), b);
        } else if n >= 4 {
            let (a, b) = (rd(src.cast::<u32>()), rd(src.add(n - 4).cast::<u32>()));
            wr(dst.cast::<u32>(), a);
            wr(dst.add(n - 4).cast::<u32>(), b);
        } else if n > 0 {
            let (a, m, b) = (*src, *src.add(n / 2), *src.add(n - 1));
            *dst = a;
            *dst.add(n / 2) = m;
            *dst.add(n - 1) = b;
        }
    }
}

/// Copies `n` bytes, at most [`SMALL_PIECE`], from `src` to `dst` with no
/// call: at most four moves of 16 bytes (or two of 8, 4 or three of 1)
/// that may overlap, each byte of `dst` written from one read of `src`.
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes, not overlapping;
/// `n <= SMALL_PIECE`.
#[inline(always)]
unsafe fn copy_small(src: *const u8, dst: *mut u8, n: usize) {
    use std::ptr::{read_unaligned as rd, write_unaligned as wr};
    debug_assert!(n <= SMALL_PIECE);
    // SAFETY (all arms): every access lies within the first `n` bytes of
    // `src` and `dst` (contract).
    unsafe {
        if n > 32 {
            let (a, b) = (rd(src.cast::<u128>()), rd(src.add(16).cast::<u128>()));
            let (c, d) = (
                rd(src.add(n - 32).cast::<u128>()),
                rd(src.add(n - 16).cast::<u128>()),
            );
            wr(dst.cast::<u128>(), a);
            wr(dst.add(16).cast::<u128>(), b);
            wr(dst.add(n - 32).cast::<u128>(), c);
            wr(dst.add(n - 16).cast::<u128>(), d);
        } else if n > 16 {
            let (a, b) = (rd(src.cast::<u128>()), rd(src.add(n - 16).cast::<u128>()));
            wr(dst.cast::<u128>(), a);
            wr(dst.add(n - 16).cast::<u128>(), b);
        } else {
            copy_short(src, dst, n);
        }
    }
}

/// Copies `head` then `body` to `dst`, inline: with `copy_small` when
/// `SMALL` (both at most [`SMALL_PIECE`] bytes), else `copy_short`.
///
/// # Safety
/// `dst` writable for both pieces' lengths, not overlapping them; with
/// `SMALL`, each piece at most [`SMALL_PIECE`] bytes.
#[inline(always)]
pub(crate) unsafe fn copy_pieces<const SMALL: bool>(head: &[u8], body: &[u8], dst: *mut u8) {
    // SAFETY (all four): forwarded contract; body goes right after head.
    unsafe {
        if SMALL {
            copy_small(head.as_ptr(), dst, head.len());
            copy_small(body.as_ptr(), dst.add(head.len()), body.len());
        } else {
            copy_short(head.as_ptr(), dst, head.len());
            copy_short(body.as_ptr(), dst.add(head.len()), body.len());
        }
    }
}

/// The largest piece that `copy_small` copies, and so
/// [`Producer::push2_fast`] with no call.
pub const SMALL_PIECE: usize = 64;

/// The writing end of a ring.
pub struct Producer {
    v: View,
    /// Local, authoritative producer index (may include an unpublished pad).
    prod: u64,
    /// Last producer index made visible to the consumer.
    published: u64,
    /// Cached consumer index.
    cons: u64,
    /// Outstanding reservation: payload capacity.
    reserved: Option<usize>,
    /// The consumer declared that it never sleeps: publish without the
    /// notify protocol (no fence, no flag to read).
    peer_polls: bool,
    /// Offset from which an empty ring is wrapped early (`u64::MAX`: never,
    /// small rings).
    rewind_at: u64,
    /// Offset in this lap at which to look at the consumer index next for
    /// an early wrap: `rewind_at` at first, 16 KiB further on after each
    /// look that found the ring not empty. A lap that begins after a
    /// padding record keeps it (only one whose last record ended exactly
    /// at the end of the data area starts over at `rewind_at`), so a
    /// one-way stream of records larger than [`WRAP_BEHIND_MAX`] that once
    /// ran on past 16 KiB keeps its larger laps until a look finds the
    /// ring empty: measured faster than starting each lap over (0.65-0.88
    /// of this for streams of 512 B to 64 KiB, when all of them kept the
    /// rule; docs/PERFORMANCE.md). Looks prompted by the peer's traffic
    /// (`heard`) still come anywhere past `rewind_at`.
    look_at: u64,
    /// This lap holds a record larger than [`WRAP_BEHIND_MAX`] that came
    /// to a look with the wrap offset at least [`LONG_LAP_MIN`]: it does
    /// not wrap early before [`LONG_LAP`], and the next one starts over at
    /// `min_lap` (see `rewind`).
    long_lap: bool,
    /// Looks that records of at most [`WRAP_BEHIND_MAX`] came to in a row
    /// in a long lap (medium ones of a stream aside); more than
    /// [`LONG_LAP_SMALL_LOOKS`] end it.
    small_looks: u8,
    /// Bytes of records (padding aside) written since every look found a
    /// medium record, and the peer quiet since the look before: a one-way
    /// stream of them ([`MEDIUM_STREAM`]).
    stream_run: u64,
    /// Producer index and the caller's `heard` count at the last look
    /// that asked whether the producer streams (`streams`).
    look_prod: u64,
    look_heard: u64,
    /// Furthest offset a padding record began at since the pages past
    /// [`KEEP_BYTES`] were last given back: the pages before it are there.
    /// (A lap that ended exactly at the end of the data area, with no
    /// padding record, is not counted: `warm` errs on the cold side.) The
    /// whole data area where the backend allocates pages up front
    /// ([`Producer::pages_up_front`]).
    touched: u64,
    /// The epoch of the pages asked of the consumer ([`OFF_PROD_WANT`]):
    /// a give-back starts the next, so that what the consumer prepared
    /// before it is never taken for pages that are there. And whether this
    /// epoch asked.
    prep_epoch: u32,
    prep_asked: bool,
    /// Offset below which this producer does not wrap early: `rewind_at`
    /// at first. An early wrap at offset `p` leaves the next lap `p` bytes
    /// until the consumer passes the padding record, so a producer that
    /// writes more than that before its consumer runs again (ranks that
    /// share a core: a window of messages written in one go, read in the
    /// next time slice) runs out of room in mid-window, and without this
    /// its laps stayed that short (47-135 KiB for osu_mbw_mr's windows of
    /// 32-130 KiB on one core, every window split in two).
    /// So running out of room at offset `p` raises it to `2 p` (at most
    /// the wrap offset); it goes back to `rewind_at` once the producer
    /// has not run out for [`LONG_LAPS_FOR`] (or its give-back delay if
    /// shorter). A producer whose consumer keeps up never runs out: its
    /// laps stay short.
    min_lap: u64,
    /// Ran out of room since the last look; [`coarse_ticks`] at the last
    /// look that followed running out.
    ran_out: bool,
    ran_out_at: u64,
    /// Set when `min_lap` went back to `rewind_at`: the lap that ends next
    /// was long for the rule's sake only, so for the give-back it counts
    /// as ended when the producer last ran out (its pages go back a
    /// give-back delay after the stream that needed them, as before).
    long_since: Option<u64>,
    /// The caller's `heard` count when `rewind` last read the clock (every
    /// look reads it).
    heard: u64,
    /// [`coarse_ticks`] at the last look.
    looked: u64,
    /// Offset that records end at or before: the end of the data area,
    /// or under a budget the ring's share of it ([`Producer::limit`]) less
    /// the header slot that follows the last record (the commit clears
    /// it), so that no byte past the share is ever written.
    wrap_at: u64,
    budget: Option<Share>,
    /// A record of the largest size was committed: this producer streams
    /// large messages (see `relimit`).
    large: bool,
    /// Furthest offset written in a lap that has ended (see `reach`).
    reach: u64,
    /// Gives the pages past [`KEEP_BYTES`] back to the backend once no lap
    /// has written there for this many nanoseconds (see
    /// [`Producer::give_back_idle_pages`]); `None`: never.
    give_back: Option<u64>,
    /// [`coarse_ticks`] when a lap last ended past [`KEEP_BYTES`] (0: no
    /// lap has written there since the pages were last given back).
    far_at: u64,
    /// Producer index at the start of the last lap that ended exactly at
    /// the end of the data area (seen once per lap).
    end_lap: u64,
    /// How many times pages were given back.
    given_back: u64,
    /// Producer index at the last [`Producer::idle_look`] that saw it
    /// move, and [`coarse_ticks`] then (0: not looked yet): the producer
    /// has been silent since.
    silent_prod: u64,
    silent_since: u64,
    /// [`Producer::consumer_draining`]: the published index at its last
    /// call, the one before the records published since an earlier call
    /// (the burst the caller now waits on), and calls left that answer
    /// `true` without seeing the consumer move.
    idle_published: u64,
    burst_from: u64,
    draining_grace: u32,
    /// Both ends run on the CPUs of one kernel: the consumer's CPU hint
    /// ([`OFF_CONS_CPU`]) means what it says.
    cpus_shared: bool,
    broken: Option<Violation>,
}

// SAFETY: the producer is the only writer of its side of the ring; the raw
// pointer refers to a shared mapping that is valid from any thread.
unsafe impl Send for Producer {}

impl Producer {
    /// The producing end of the ring at `base`.
    ///
    /// # Safety
    /// `base` must point to `geo.ring_bytes()` mapped bytes, 64-byte aligned,
    /// valid for the lifetime of the producer, with exactly one producer.
    pub unsafe fn new(base: *mut u8, geo: Geometry) -> Result<Self> {
        // SAFETY: forwarded contract.
        unsafe { check(base, geo)? };
        let v = View { base, geo };
        let rewind_at = if geo.data_size as u64 >= 4 * REWIND_AT {
            REWIND_AT
        } else {
            u64::MAX
        };
        // The consumer side starts at zero on a fresh ring.
        Ok(Producer {
            v,
            prod: 0,
            published: 0,
            cons: 0,
            reserved: None,
            peer_polls: false,
            rewind_at,
            look_at: rewind_at,
            long_lap: false,
            small_looks: 0,
            stream_run: 0,
            look_prod: 0,
            look_heard: 0,
            touched: 0,
            prep_epoch: 1,
            prep_asked: false,
            min_lap: rewind_at,
            ran_out: false,
            ran_out_at: 0,
            long_since: None,
            heard: 0,
            looked: 0,
            wrap_at: geo.data_size as u64,
            budget: None,
            large: false,
            reach: 0,
            give_back: None,
            far_at: 0,
            end_lap: 0,
            given_back: 0,
            silent_prod: 0,
            silent_since: 0,
            idle_published: 0,
            burst_from: 0,
            draining_grace: 0,
            cpus_shared: false,
            broken: None,
        })
    }

    /// Tells this producer that every page of its data area exists already
    /// (a backend that allocates them up front: Xen's granted pages), so
    /// that no lap pays for fresh pages: a one-way stream of medium
    /// records takes the long laps after [`MEDIUM_STREAM`], as over pages
    /// that an earlier lap touched, not after [`MEDIUM_STREAM_COLD`].
    /// (Such memory is never given back: nothing makes the ring cold
    /// again.)
    pub fn pages_up_front(&mut self) {
        self.touched = self.v.size();
    }

    /// Lets this producer give the pages of its data area past
    /// [`KEEP_BYTES`] back to the backend (`MADV_REMOVE`: they read as
    /// zeros, which is "no record", and come back, zeroed, with their next
    /// write) at an early wrap below `KEEP_BYTES` (what the consumer has
    /// not taken then lies below it too) when no lap has written past it
    /// for `after`. A stream
    /// of large messages grows a ring to megabytes; this hands them back
    /// after the stream, at the first early wrap `after` it ended. Only
    /// for memory that the backend lets either side free (the host
    /// backend's memfds; not Xen's granted pages), and only for rings
    /// larger than `KEEP_BYTES`. Neither side reads or writes there at
    /// that moment: what the consumer has not taken yet, and the next
    /// record of either side, lie below it. (Such rings are larger than 64 KiB, so
    /// they also wrap early: `rewind_at` is set.)
    pub fn give_back_idle_pages(&mut self, after: std::time::Duration) {
        if self.v.size() > KEEP_BYTES {
            self.give_back = Some(after.as_nanos().min(u64::MAX as u128) as u64);
        }
    }

    /// The producer's indexes and give-back state, for test messages.
    #[cfg(test)]
    pub(crate) fn dbg(&self) -> String {
        format!(
            "prod={} cons={} look_at={} min_lap={} wrap_at={} far_at={} given_back={}",
            self.prod,
            self.cons,
            self.look_at,
            self.min_lap,
            self.wrap_at,
            self.far_at,
            self.given_back
        )
    }

    /// The offset below which this producer does not wrap early.
    #[cfg(test)]
    pub(crate) fn min_lap(&self) -> u64 {
        self.min_lap
    }

    /// The producer's offset in the data area.
    #[cfg(test)]
    pub(crate) fn offset(&self) -> u64 {
        self.prod & (self.v.size() - 1)
    }

    /// How many times this producer gave pages back.
    pub fn pages_given_back(&self) -> u64 {
        self.given_back
    }

    /// Whether the producer, at offset `pos`, stands at the start of a lap
    /// whose last one ended exactly at the end of the data area and was
    /// not noted yet (`end_lap`): such a lap has no padding record to note
    /// it by.
    fn ended_at_the_end(&self, pos: u64) -> bool {
        pos == 0 && self.prod != 0 && self.prod != self.end_lap
    }

    /// Notes a lap that ended past [`KEEP_BYTES`], for the give-back.
    #[cold]
    fn went_far(&mut self) {
        self.far_at = self.long_since.take().unwrap_or_else(coarse_ticks).max(1);
    }

    /// Gives the data area past [`KEEP_BYTES`] back (the caller found
    /// nothing the consumer has yet to take past it, and its next records
    /// below it).
    #[cold]
    fn give_pages_back(&mut self) {
        let keep = KEEP_BYTES as usize;
        // SAFETY: KEEP_BYTES < size: the range lies inside the data area,
        // which starts page aligned (the mapping is, and CTRL_BYTES is a
        // page); nothing reads it as Rust memory.
        let p = unsafe { self.v.data().add(keep) };
        let len = self.v.size() as usize - keep;
        // SAFETY: a page-aligned range of this producer's shared mapping.
        let rc = unsafe { libc::madvise(p.cast(), len, libc::MADV_REMOVE) };
        if rc != 0 {
            // The backend's memory cannot be freed this way: keep it.
            self.give_back = None;
            return;
        }
        self.far_at = 0;
        // (a stream after this one is a new one, and over fresh pages)
        self.touched = KEEP_BYTES;
        self.stream_run = 0;
        self.given_back += 1;
        // (what the consumer prepared went back too: a new epoch, nothing
        // asked)
        self.prep_epoch = self.prep_epoch.wrapping_add(1).max(1);
        self.prep_asked = false;
        self.v
            .word(OFF_PROD_WANT)
            .store(pages_word(u64::from(self.prep_epoch), 0), Ordering::Relaxed);
    }

    /// The give-back of a producer that fell silent, for the caller's
    /// idle moments (the channel's, when a poll found nothing now and
    /// then; not per message). The give-back at an early wrap needs a
    /// next record; a pair whose stream ended and that sends nothing more
    /// would keep its pages. So once this producer has sent nothing since
    /// a look `after` ago (the delay of [`Producer::give_back_idle_pages`])
    /// and the consumer has taken everything, a look:
    /// - standing past [`KEEP_BYTES`], wraps (the padding record of an
    ///   early wrap; the consumer passes it at its next poll);
    /// - standing below it after a lap that ended past it, gives the pages
    ///   back, as the early wrap would have.
    ///
    /// So a silent pair gives its pages back at about twice the delay, as
    /// long as its processes poll. Does nothing during a reservation, nor
    /// for a producer that does not give back.
    #[cold]
    pub fn idle_look(&mut self) -> Result<()> {
        let Some(after) = self.give_back else {
            return Ok(());
        };
        if self.reserved.is_some() {
            return Ok(());
        }
        let now = coarse_ticks().max(1);
        if self.silent_since == 0 || self.prod != self.silent_prod {
            self.silent_prod = self.prod;
            self.silent_since = now;
            return Ok(());
        }
        if now.wrapping_sub(self.silent_since) < after {
            return Ok(());
        }
        let pos = self.prod & (self.v.size() - 1);
        // (the next record's `rewind` would note it)
        let end_lap = self.ended_at_the_end(pos);
        let far = pos + RECORD_HEADER as u64 > KEEP_BYTES;
        if self.far_at == 0 && !far && !end_lap {
            return Ok(());
        }
        if self.prod != self.cons {
            self.reload_cons()?;
            if self.prod != self.cons {
                return Ok(());
            }
        }
        if end_lap {
            self.end_lap = self.prod;
            self.far_at = self.silent_since;
        }
        if far {
            // The ring is empty, so the space to the end is free. The lap
            // ended with the last record, when the silence began.
            self.pad_to_end(pos);
            self.far_at = self.silent_since;
            self.silent_prod = self.prod;
            return Ok(());
        }
        if now.wrapping_sub(self.far_at) >= after {
            self.give_pages_back();
        }
        Ok(())
    }

    /// Puts this producer under `budget` (see [`Budget`]).
    pub fn set_budget(&mut self, budget: Arc<Budget>) {
        budget.producers.fetch_add(1, Ordering::Relaxed);
        self.budget = Some(Share(budget));
        self.relimit();
    }

    /// The ring's share of its budget now: the offset past which it
    /// writes nothing (the end of the data area when used whole).
    pub fn limit(&self) -> u64 {
        if self.wrap_at < self.v.size() {
            self.wrap_at + RECORD_HEADER as u64
        } else {
            self.wrap_at
        }
    }

    /// How far into the data area this producer has written so far: the
    /// end of the furthest record or padding header, plus the header slot
    /// after it that a commit clears (the pages past it were never
    /// touched by this side).
    pub fn reach(&self) -> u64 {
        let pos = self.prod & (self.v.size() - 1);
        let now = if self.prod == 0 {
            0
        } else {
            pos + RECORD_HEADER as u64
        };
        self.reach.max(now)
    }

    /// Recomputes the wrap offset from the budget (at a wrap, and when the
    /// budget is set).
    ///
    /// The one ring of a process with a single co-resident peer, once it
    /// has carried a record of the largest size (a stream of large
    /// messages), is used whole: a budget bounds the memory of a process
    /// with many peers, and with one the ring size bounds it. Streams of
    /// 128 KiB to 1 MiB messages between two pinned processes moved 3-23 %
    /// more with 4 MiB of ring than with the 1.75 MiB of the budget
    /// (docs/PERFORMANCE.md). Only a large stream grows the ring: a stream
    /// of small messages would touch every page of it, each a page fault
    /// that a short run feels.
    fn relimit(&mut self) {
        let size = self.v.size();
        let limit = match &self.budget {
            None => size,
            Some(Share(b)) if self.large && b.sole() => size,
            Some(Share(b)) => {
                let piece = self.max_record().min(MIN_PIECE) as u64;
                let floor =
                    (2 * (piece + RECORD_HEADER as u64) + RECORD_HEADER as u64 + 4095) & !4095;
                (b.share() & !4095).clamp(floor.min(size), size)
            }
        };
        self.wrap_at = if limit < size {
            limit - RECORD_HEADER as u64
        } else {
            size
        };
    }

    /// Free ring bytes a record of `total` bytes (header included) needs
    /// at offset `pos`: itself, plus a padding record to the end of the
    /// data area when it does not fit before the wrap offset, plus the next
    /// record's header slot (the commit clears it, so it must be free too).
    ///
    /// A record larger than half the wrap offset (under a small share of a
    /// budget, from a sender that does not cut its messages into
    /// [`Producer::piece`]s) wraps at twice its size instead, as under a
    /// share of two of the largest records: a wrap needs the record to fit
    /// before `pos`, so a wrap offset below that could leave it waiting for
    /// ever.
    #[inline(always)]
    fn need(&self, pos: u64, total: u64) -> (u64, bool) {
        if total <= self.wrap_at.saturating_sub(pos) {
            return (total + RECORD_HEADER as u64, false);
        }
        let size = self.v.size();
        let limit = self.wrap_at.max(2 * total + RECORD_HEADER as u64).min(size);
        if total <= limit.saturating_sub(pos) {
            (total + RECORD_HEADER as u64, false)
        } else {
            (size - pos + total + RECORD_HEADER as u64, true)
        }
    }

    /// The ring geometry.
    pub fn geometry(&self) -> Geometry {
        self.v.geo
    }

    /// Largest payload of one record.
    pub fn max_record(&self) -> usize {
        self.v.geo.max_record as usize
    }

    /// Largest payload of a piece of a large message now: two such records,
    /// their headers and the free header slot after them fit before the
    /// wrap offset, so the receiver copies one out while the sender writes
    /// the next, within the ring's share of its budget. The largest record
    /// when the ring is used whole.
    #[inline]
    pub fn piece(&self) -> usize {
        if self.wrap_at >= self.v.size() {
            return self.max_record();
        }
        let fit = (self.wrap_at.saturating_sub(2 * RECORD_HEADER as u64) / 2) as usize & !7;
        self.max_record().min(fit)
    }

    /// Early wrap: when a record at `pos` would end past [`REWIND_AT`], fits
    /// before `pos`, and the consumer has taken everything, pad to the end
    /// of the data area and put the record at offset 0 instead: a ring that
    /// the consumer keeps up with never reaches past `REWIND_AT` (or past
    /// twice its largest record when that is larger). A record of at most
    /// [`WRAP_BEHIND_MAX`] bytes does not wait for the consumer to take
    /// everything: it wraps as soon as what the consumer passed in this
    /// lap holds it and the header slot after it. A stream of small
    /// messages whose receiver is always a few of them behind (a window of
    /// osu_bw) otherwise found the ring empty at almost no look and ran
    /// laps of megabytes: 1.8 MiB of ring for 8-byte messages, and the
    /// first lap over fresh pages at half the speed of the next ones (at
    /// 512 B to 2 KiB a third of vader's bandwidth in short runs: that
    /// first lap is most of what they send). Larger records keep the rule:
    /// between two pinned ranks, wrapping every record behind the consumer
    /// cost streams of 1 KiB to 256 KiB 8-31 %, and from 4 KiB ivcom is
    /// 2-10x vader on long laps (docs/PERFORMANCE.md). Long streams of 1-2
    /// KiB between pinned ranks also run faster on long laps, but reaching
    /// them costs that first lap, and growing laps with the traffic
    /// measured slower still in the meantime: see the medium records below.
    ///
    /// And where the wrap offset lies at least [`LONG_LAP_MIN`] into the
    /// data area (few peers under the budget), a lap that holds a record
    /// larger than `WRAP_BEHIND_MAX` does not wrap early before
    /// [`LONG_LAP`] (1 MiB, or the wrap offset when nearer), with the
    /// small records that follow it in the lap (`long_lap`) unless they
    /// alone come to more than [`LONG_LAP_SMALL_LOOKS`] looks in a row
    /// (an exchange that went small: a real job's ping-pongs of 8 bytes
    /// after a stream held a lap open that never reached 1 MiB, and the
    /// ring kept its pages); past it the rules above apply, and the next
    /// lap starts over. A ring that the
    /// consumer keeps empty (a ping-pong of large messages) otherwise
    /// wrote the same first kilobytes again at every message, lines that
    /// the receiving core had just read and still held: each write waits
    /// for the other core to let its copy go. Between two pinned ranks
    /// osu_latency from 8 KiB to 256 KiB took 0.47-0.80 of the time on
    /// long laps (docs/PERFORMANCE.md); laps of 64 and 256 KiB gained
    /// nothing, 1 MiB most of it. Such a ring's first MiB is touched once
    /// (its pages stay until the give-back), as a stream's already was;
    /// laps that ran to the wrap offset ran a ping-pong over all 4 MiB of
    /// a ring once a record of the largest size had been sent, and the
    /// phase that did paid the fresh pages.
    ///
    /// Medium records ([`MEDIUM_MIN`] to `WRAP_BEHIND_MAX`: messages of
    /// 512 bytes to 2 KiB) open long laps the same way once they form a
    /// one-way stream that has run [`MEDIUM_STREAM_COLD`] bytes, or
    /// [`MEDIUM_STREAM`] where the long lap's pages are there already
    /// (`streams`): a receiver that keeps up with them (at 1-2 KiB the
    /// sender sets the pace) read lines that the next lap wrote again; on
    /// long laps osu_bw moved 1.26-1.51x (1 KiB) and 1.35-1.78x (2 KiB)
    /// as much between pinned ranks in long runs (docs/PERFORMANCE.md).
    /// Shorter runs of them keep the short laps and pay no first lap; a
    /// ping-pong of them, or a pair that streams both ways, keeps them
    /// too.
    ///
    /// Whether the ring is empty costs a look at the consumer index (the
    /// transfer of the consumer's cache line). The first record of a lap
    /// that would cross `REWIND_AT` looks; when the ring is not empty, the
    /// producer looks again 16 KiB further on, or at its next record when
    /// `heard` moved since it last read the coarse clock and the clock
    /// moved since the last look.
    ///
    /// `heard` is the caller's count of what it took from its peer (the
    /// other ring of a channel), and the coarse clock ticks every few
    /// milliseconds: a producer that heard from its peer, and whose
    /// records on this ring are further apart than a tick, is exchanging
    /// rather than streaming (many ranks on few cores, the consumer
    /// descheduled). For it a look per record is cheap, and each is another
    /// chance to wrap: with a look per 16 KiB such rings grew by that much
    /// at a time (64 ranks on 2 cores: 151 MiB of rings, against 102 MiB
    /// with this rule). A producer that streams looks once per 16 KiB:
    /// a look per KiB halved the bandwidth of 1 KiB messages, and a look
    /// per record whenever `heard` moved (an acknowledgement per message,
    /// as in ob1's rendezvous) halved it from 2 to 64 KiB.
    ///
    /// So the clock is read again only when `heard` moved since the last
    /// read: a stream of small messages whose receiver acknowledges each
    /// window (osu_bw) hears from its peer once per window, and reading
    /// the clock at every record until the next tick cost a clock read per
    /// message.
    ///
    /// Inlined into every reservation: the test that most records end at
    /// (no look due, [`Producer::no_look_due`], which
    /// [`Producer::push2_fast`] asks too); the rest is
    /// [`Producer::rewind_look`].
    #[inline(always)]
    fn rewind(&mut self, pos: u64, total: u64, heard: u64) -> Result<()> {
        if self.no_look_due(pos, pos + total, heard) {
            return Ok(());
        }
        self.rewind_look(pos, total, heard)
    }

    /// `rewind`'s first test: a record from `pos` to `end` in this lap
    /// (not at its start) that ends before the next look and, past
    /// `rewind_at`, was not preceded by news from the peer (`heard`).
    #[inline(always)]
    fn no_look_due(&self, pos: u64, end: u64, heard: u64) -> bool {
        pos != 0 && end <= self.look_at && (end <= self.rewind_at || heard == self.heard)
    }

    /// [`Producer::rewind`] past its first test: a new lap, or a record
    /// at which a look is due or may come (the peer was heard from).
    #[inline(never)]
    fn rewind_look(&mut self, pos: u64, total: u64, heard: u64) -> Result<()> {
        if pos == 0 {
            // a new lap
            self.start_lap_over();
            if self.give_back.is_some() && self.ended_at_the_end(pos) {
                self.end_lap = self.prod;
                self.went_far();
            }
            return Ok(());
        }
        let opens = self.wrap_at >= LONG_LAP_MIN
            && (self.streams(pos, total, heard) || total > WRAP_BEHIND_MAX);
        if (self.long_lap || opens) && pos + total <= LONG_LAP {
            // A lap that holds a large record (or a medium one of a
            // stream) runs on to LONG_LAP (or the wrap offset), small
            // records after it too (see `rewind`), unless they alone come
            // to looks: the exchange went small.
            if opens {
                self.small_looks = 0;
            } else {
                self.small_looks += 1;
            }
            if self.small_looks <= LONG_LAP_SMALL_LOOKS {
                self.long_lap = true;
                self.look_at = LONG_LAP.min(self.wrap_at);
                self.heard = heard;
                return Ok(());
            }
            self.start_lap_over();
        }
        let due = pos + total > self.look_at;
        // Wrapping pays only when the record and the free header slot after
        // it fit before `pos`: the padding record holds the rest of the
        // data area until the consumer passes it.
        if total + RECORD_HEADER as u64 > pos {
            return Ok(());
        }
        self.heard = heard;
        let now = coarse_ticks();
        if !due && now == self.looked {
            return Ok(());
        }
        self.looked = now;
        if self.ran_out {
            self.ran_out = false;
            self.ran_out_at = now;
        } else if self.min_lap > self.rewind_at
            && now.wrapping_sub(self.ran_out_at)
                >= self.give_back.unwrap_or(LONG_LAPS_FOR).min(LONG_LAPS_FOR)
        {
            // (and the laps after this one start looking at `rewind_at`)
            self.min_lap = self.rewind_at;
            self.look_at = self.rewind_at;
            self.long_since = Some(self.ran_out_at);
        }
        if pos + total <= self.min_lap {
            self.look_at = self.min_lap;
            return Ok(());
        }
        if self.prod != self.cons {
            self.reload_cons()?;
        }
        // What the consumer has not taken yet lies before `pos` in this
        // lap when there is less of it than `pos`; what it passed in this
        // lap is free for the next one, and so is the rest of the data
        // area. A small record wraps when it and the free header slot
        // after it fit in what the consumer passed; a larger one when the
        // ring is empty (see `rewind`).
        let backlog = self.prod.wrapping_sub(self.cons);
        let behind_ok = backlog == 0 || total <= WRAP_BEHIND_MAX;
        if !behind_ok || backlog + total + RECORD_HEADER as u64 > pos {
            self.look_at = pos + REWIND_STRIDE;
            return Ok(());
        }
        // Everything the consumer has not taken lies in [pos - backlog,
        // pos): below KEEP_BYTES when `pos` is, so the pages past it are
        // free to give back.
        if let Some(after) = self.give_back {
            if self.far_at != 0
                && pos + RECORD_HEADER as u64 <= KEEP_BYTES
                && now.wrapping_sub(self.far_at) >= after
            {
                self.give_pages_back();
            }
        }
        self.pad_to_end(pos);
        Ok(())
    }

    /// At a look, whether a record of `total` bytes is a medium one of a
    /// one-way stream that has run [`MEDIUM_STREAM`] bytes (over pages
    /// that are there, `touched`) or [`MEDIUM_STREAM_COLD`]: every look
    /// in its last `stream_run` bytes found a medium record, and the peer
    /// had sent at most 1/[`ONE_WAY`] of what this side wrote since the
    /// look before (in this lap: a look that begins a lap may follow a
    /// whole lap without one). A ping-pong of such messages, or a pair
    /// that streams both ways, keeps the short laps. (`heard` counts the padding records of the
    /// peer's wraps too: the look that follows one starts the stream over.)
    fn streams(&mut self, pos: u64, total: u64, heard: u64) -> bool {
        // (this lap's part: the padding that ended the last one aside)
        let wrote = self.prod.wrapping_sub(self.look_prod).min(pos);
        let one_way = heard.wrapping_sub(self.look_heard) <= wrote.max(REWIND_STRIDE) / ONE_WAY;
        (self.look_prod, self.look_heard) = (self.prod, heard);
        if !(total > MEDIUM_MIN && total <= WRAP_BEHIND_MAX && one_way) {
            self.stream_run = 0;
            return false;
        }
        self.stream_run = self.stream_run.saturating_add(wrote);
        let end = LONG_LAP.min(self.wrap_at);
        let warm = self.touched + (64 << 10) >= end
            || (self.stream_run >= MEDIUM_PREPARE && self.prepared(end & !4095));
        self.stream_run >= MEDIUM_STREAM && (warm || self.stream_run >= MEDIUM_STREAM_COLD)
    }

    /// Whether the pages up to `end` (page-aligned) are there because the consumer
    /// prepared them ([`MEDIUM_PREPARE`]): asks it first (once an epoch),
    /// and when it answers, maps them here and counts them as touched.
    /// Only for memory that comes with its first write and goes back with
    /// the give-back (the host backend's): elsewhere the pages are there
    /// from the start or never counted. What the consumer answers is a
    /// hint: a consumer that claims pages it did not prepare makes this
    /// producer allocate them in its long laps, as without it.
    #[cold]
    fn prepared(&mut self, end: u64) -> bool {
        if self.give_back.is_none() {
            return false;
        }
        let epoch = u64::from(self.prep_epoch);
        if !self.prep_asked {
            self.prep_asked = true;
            self.v
                .word(OFF_PROD_WANT)
                .store(pages_word(epoch, end), Ordering::Relaxed);
            // Pages past KEEP_BYTES come now: they go back a give-back
            // delay after this if no long lap follows.
            self.far_at = coarse_ticks().max(1);
            return false;
        }
        let (ready_epoch, ready) =
            pages_word_parts(self.v.word(OFF_CONS_READY).load(Ordering::Relaxed));
        if ready_epoch != epoch || ready < end {
            return false;
        }
        let from = self.touched.max(KEEP_BYTES);
        if from < end {
            // SAFETY: KEEP_BYTES <= from < end <= the data size: a
            // page-aligned range (`end` is, `from` rounded down, not below
            // KEEP_BYTES, a multiple of the page) of this producer's
            // mapping. Populating maps what is there and allocates the
            // rest, leaving every byte as it is. Where the kernel lacks it
            // the writes fault them in.
            let from = from & !4095;
            unsafe {
                libc::madvise(
                    self.v.data().add(from as usize).cast(),
                    (end - from) as usize,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
        self.touched = self.touched.max(end);
        true
    }

    /// Ends a long lap (if any) and looks next at `min_lap`, as at the
    /// start of a lap. (`small_looks` needs no reset: the record that
    /// begins a long lap resets it.)
    #[inline]
    fn start_lap_over(&mut self) {
        self.long_lap = false;
        self.look_at = self.min_lap;
    }

    /// The ring had no room for a record at `pos`: laps of at least twice
    /// that from now on (see `min_lap`).
    #[cold]
    fn out_of_room(&mut self, pos: u64) {
        self.min_lap = self.min_lap.max(pos.saturating_mul(2).min(self.wrap_at));
        self.ran_out = true;
    }

    /// Fills the data area from `pos` (the producer's offset, whose space
    /// to the end the caller found free) to its end with a padding record,
    /// so that the next record goes at offset 0, and recomputes the wrap
    /// offset.
    fn pad_to_end(&mut self, pos: u64) {
        debug_assert!(pos > 0, "a padding record never starts at offset 0");
        let contig = self.v.size() - pos;
        self.reach = self.reach.max(pos + RECORD_HEADER as u64);
        self.touched = self.touched.max(pos + RECORD_HEADER as u64);
        if self.give_back.is_some() && pos + RECORD_HEADER as u64 > KEEP_BYTES {
            self.went_far();
        }
        if self.long_lap {
            // (the next lap starts over)
            self.start_lap_over();
        }
        let pad = crate::record::encode((contig - RECORD_HEADER as u64) as u32, kind::PAD, 0);
        // The next lap's first slot reads "empty" before the padding record
        // that leads to it is visible (the caller found it free).
        self.v.slot(0).store(0, Ordering::Relaxed);
        self.v.slot(pos).store(pad, Ordering::Release);
        self.prod += contig;
        // A version 2 consumer sees the padding record as soon as it is
        // written: it counts as published (the consumer may pass it).
        self.published = self.prod;
        self.relimit();
    }

    fn fail(&mut self, v: Violation) -> Error {
        self.broken = Some(v);
        Error::Broken(v)
    }

    /// For a caller that found nothing to receive and would give its core
    /// away (ranks that outnumber the cores): whether the consumer is at
    /// work on this ring now, on another core. A sender that waits for an
    /// answer keeps its core while that lasts, as it does over shared
    /// memory while its buffers come back; one whose consumer waits for
    /// this very core gives it away at once.
    ///
    /// Where both ends share a kernel's CPUs ([`Producer::share_cpus`]) and
    /// the consumer told the CPU it runs on ([`OFF_CONS_CPU`]): at work when
    /// that is another CPU than this thread's and it took anything since
    /// the last call (a one-record answer taken whole too); never when it
    /// is this CPU. Otherwise (a consumer that does not tell, a Xen domain
    /// whose virtual CPUs are its own): when it took some, not all, of the
    /// burst this caller waits on (what it published since its last call
    /// but one, or since its last `false`) since the last call; a burst
    /// taken whole, or records taken after a `false` (the caller gave its
    /// core away then), may have been taken by a consumer on this very
    /// core while the caller was off it. After a `true` the next
    /// [`DRAINING_GRACE`] calls answer `true` too, records outstanding or
    /// not. Reads the index (validated as every read of it is) only while
    /// records are outstanding, and the CPU word beside it only when the
    /// index moved. A consumer that lies about its index breaks
    /// the ring ([`Violation::BadIndex`]); one that moves it, or names
    /// another CPU, keeps its sender on the core, which its own records
    /// could do anyway. The producer's own decisions stay those it takes
    /// with a fresh look (the index only ever comes closer to the
    /// producer's own).
    pub fn consumer_draining(&mut self) -> Result<bool> {
        if self.published != self.idle_published {
            // Sent since the last call: a new wait, on a new burst.
            self.burst_from = self.idle_published;
            self.idle_published = self.published;
        }
        let before = self.cons;
        if self.cons != self.published {
            self.reload_cons()?;
        }
        let moved = self.cons != before;
        // Where the consumer said it runs, when both ends share a kernel's
        // CPUs and it said so (0: not told); read beside the index just
        // read, and only then.
        let hint = if moved && self.cpus_shared {
            self.v.word(OFF_CONS_CPU).load(Ordering::Relaxed)
        } else {
            0
        };
        let at_work = if !moved {
            false
        } else if hint == 0 {
            // Took some of this burst since the last call, not all of it
            // (wrapping distances from the burst's start; the consumer is
            // never past `published`).
            let took = self.cons.wrapping_sub(self.burst_from);
            took > 0 && took < self.published.wrapping_sub(self.burst_from)
        } else if hint == cpu_plus_one() {
            // On this very core: it runs when this side gives the core
            // away.
            self.draining_grace = 0;
            false
        } else {
            // On another core: a burst taken whole counts too (a
            // one-record answer).
            true
        };
        if at_work {
            self.draining_grace = DRAINING_GRACE;
            return Ok(true);
        }
        // (a consumer releases its space a batch at a time, and one that
        // took the last record answers a moment later)
        if self.draining_grace > 0 {
            self.draining_grace -= 1;
            return Ok(true);
        }
        // The caller gives its core away now: what the consumer takes
        // meanwhile of what is published says nothing of the next wait
        // (its consumer may run on this very core).
        self.burst_from = self.published;
        Ok(false)
    }

    /// Both ends of this ring run on the CPUs of one kernel (the host
    /// backend): [`Producer::consumer_draining`] may believe the CPU its
    /// consumer says it runs on.
    pub fn share_cpus(&mut self) {
        self.cpus_shared = true;
    }

    /// Reloads the consumer index from the shared page, validating it.
    fn reload_cons(&mut self) -> Result<()> {
        // A broken ring stays broken, with its first violation.
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        if let Err(Error::Broken(v)) = self.v.recheck() {
            return Err(self.fail(v));
        }
        let c = self.v.word(OFF_CONS).load(Ordering::Acquire);
        let size = self.v.size();
        if c.wrapping_sub(self.cons) > size || self.published.wrapping_sub(c) > size {
            return Err(self.fail(Violation::BadIndex));
        }
        // The consumer cannot have consumed what was never published.
        if c.wrapping_sub(self.cons) > self.published.wrapping_sub(self.cons) {
            return Err(self.fail(Violation::BadIndex));
        }
        self.cons = c;
        Ok(())
    }

    /// Reserves room for a record of `len` payload bytes and returns a
    /// pointer to its payload in ring space, or `None` when the ring is full.
    /// At most one reservation is outstanding; a second call replaces it.
    #[inline]
    pub fn reserve(&mut self, len: usize) -> Result<Option<*mut u8>> {
        self.reserve_heard(len, self.heard)
    }

    /// [`Producer::reserve`], told how much the caller has taken from its
    /// peer so far (a count that grows while the peer's records arrive, as
    /// [`Consumer::taken`] of the other ring): it decides how often the
    /// producer looks whether it may wrap early.
    #[inline(always)]
    pub fn reserve_heard(&mut self, len: usize, heard: u64) -> Result<Option<*mut u8>> {
        let Some(at) = self.place(len, heard)? else {
            self.reserved = None;
            return Ok(None);
        };
        self.reserved = Some(len);
        // SAFETY: place put the record in the data area.
        Ok(Some(unsafe { self.v.payload(at.pos) }))
    }

    /// Where a record of `len` payload bytes goes now (past the padding
    /// record of a wrap, which this writes), or `None` when the ring is
    /// full: [`Producer::reserve_heard`] without the reservation.
    /// [`Producer::push2_fast`] decides its commonest case alone, with the
    /// same tests (`no_look_due`, `need` without a wrap): a change here is
    /// a change there (`the_fast_push_does_what_push2_does` compares the
    /// two byte for byte).
    #[inline(always)]
    fn place(&mut self, len: usize, heard: u64) -> Result<Option<Place>> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        let max = self.max_record();
        if len > max {
            return Err(Error::TooLarge { len, max });
        }
        let size = self.v.size();
        let total = (RECORD_HEADER + align8(len)) as u64;
        self.rewind(self.prod & (size - 1), total, heard)?;
        let pos = self.prod & (size - 1);
        let (need, wrap) = self.need(pos, total);
        if size - self.prod.wrapping_sub(self.cons) < need {
            self.reload_cons()?;
            if size - self.prod.wrapping_sub(self.cons) < need {
                self.out_of_room(pos);
                return Ok(None);
            }
        }
        if wrap {
            // (the space is free: checked above)
            self.pad_to_end(pos);
        }
        // (pos + total <= size: no wrap by construction)
        Ok(Some(Place {
            pos: self.prod & (size - 1),
            total,
        }))
    }

    /// Sends a record of two pieces, `head` then `body`, or returns
    /// `Ok(None)` when the ring is full: [`Producer::push_heard`] for the
    /// commonest send (an upper layer's header and a short payload) in one
    /// pass, short pieces copied inline. Drops an outstanding reservation,
    /// as a reservation would. `Ok(Some(true))` when the consumer sleeps
    /// and must be rung.
    #[inline(always)]
    pub fn push2(
        &mut self,
        kind: u8,
        tag: u8,
        head: &[u8],
        body: &[u8],
        heard: u64,
    ) -> Result<Option<bool>> {
        let len = head.len() + body.len();
        self.reserved = None;
        let Some(at) = self.place(len, heard)? else {
            return Ok(None);
        };
        let p = self.begin_record(at.pos, at.total, len);
        // SAFETY: the payload has room for `len` bytes of ring space, which
        // the caller's slices cannot overlap.
        unsafe {
            copy_short(head.as_ptr(), p.payload, head.len());
            copy_short(body.as_ptr(), p.payload.add(head.len()), body.len());
        }
        Ok(Some(self.publish_record(p, kind, tag)))
    }

    /// [`Producer::push2`] for the commonest case alone, in the fewest
    /// steps: a record smaller than the largest, to a consumer that polls
    /// (so no doorbell), that fits after the last one in this lap with no
    /// look at the consumer due (see `rewind`) and no need to read the
    /// consumer index again. `true` when it was sent; `false` when any of
    /// that does not hold, and then nothing was written and no state
    /// changed: [`Producer::push2`] does the rest. `SMALL`: both pieces
    /// are at most [`SMALL_PIECE`] bytes (the caller checked), copied with
    /// no call, so that a caller whose fast path makes no other call needs
    /// no registers saved.
    #[inline(always)]
    pub fn push2_fast<const SMALL: bool>(
        &mut self,
        kind: u8,
        tag: u8,
        head: &[u8],
        body: &[u8],
        heard: u64,
    ) -> bool {
        let len = head.len() + body.len();
        if self.broken.is_some() || !self.peer_polls || len >= self.v.geo.max_record as usize {
            return false;
        }
        let size = self.v.size();
        let total = (RECORD_HEADER + align8(len)) as u64;
        let pos = self.prod & (size - 1);
        let end = pos + total;
        // `rewind`'s first test, and `need` without a wrap (`wrap_at` is
        // never past the end of the data area) with the room it needs.
        if !self.no_look_due(pos, end, heard)
            || end > self.wrap_at
            || size - self.prod.wrapping_sub(self.cons) < total + RECORD_HEADER as u64
        {
            return false;
        }
        self.reserved = None;
        let p = self.begin_record(pos, total, len);
        // SAFETY: pos + total <= wrap_at <= size: the record's `len` bytes
        // of payload lie in the data area, which the caller's slices cannot
        // overlap.
        unsafe { copy_pieces::<SMALL>(head, body, p.payload) };
        // (the consumer polls: nobody to ring)
        let _ = self.publish_record(p, kind, tag);
        true
    }

    /// Whether the consumer has announced that it sleeps (tests wait for it
    /// to make a sleeping receiver certain rather than likely).
    #[cfg(test)]
    pub fn consumer_waiting(&self) -> bool {
        self.v.word(OFF_CONS_WAITING).load(Ordering::Acquire) != 0
    }

    /// Declares that this producer never sleeps waiting for space.
    pub fn declare_polling(&self) {
        self.v.word(OFF_PROD_POLLS).store(1, Ordering::Release);
    }

    /// Reads, once, whether the consumer declared that it never sleeps
    /// (call after the peer set up its side, before the first commit). A
    /// consumer that declares it and sleeps all the same only delays itself
    /// (its sleeps are time-limited).
    pub fn learn_peer(&mut self) {
        self.peer_polls = self.v.word(OFF_CONS_POLLS).load(Ordering::Acquire) != 0;
    }

    /// Commits the outstanding reservation with `len` payload bytes (at most
    /// the reserved length). Returns `true` when the consumer sleeps and the
    /// caller must ring the doorbell.
    #[inline(always)]
    pub fn commit(&mut self, len: usize, kind: u8, tag: u8) -> bool {
        let cap = self.reserved.take().expect("commit without reserve");
        assert!(
            len <= cap,
            "commit of {len} bytes exceeds reservation of {cap}"
        );
        let pos = self.prod & (self.v.size() - 1);
        let total = (RECORD_HEADER + align8(len)) as u64;
        // (the caller wrote the payload into the reservation)
        let p = self.begin_record(pos, total, len);
        self.publish_record(p, kind, tag)
    }

    /// Begins the record of `len` payload bytes (`total` with header and
    /// alignment) at `pos`, the producer index: says where its payload
    /// goes. The caller writes the payload there (a reservation's was
    /// written before) and ends with [`Producer::publish_record`]: every
    /// record is published by the two, in one order of stores. What the
    /// publication needs of this producer is read here, before the payload
    /// is written: the compiler cannot tell ring memory from the
    /// producer's fields and would read each again after the copy.
    #[inline(always)]
    fn begin_record(&mut self, pos: u64, total: u64, len: usize) -> Publication {
        if len >= self.v.geo.max_record as usize {
            self.large = true;
        }
        Publication {
            header: self.v.slot(pos),
            next: self.v.slot((pos + total) & (self.v.size() - 1)),
            // SAFETY: pos + total <= size: the payload's `len` bytes lie in
            // the data area.
            payload: unsafe { self.v.payload(pos) },
            index: self.v.word(OFF_PROD),
            prod: self.prod + total,
            polls: self.peer_polls,
            len,
        }
    }

    /// Publishes the record that [`Producer::begin_record`] began, its
    /// payload written. Returns `true` when the consumer sleeps and must
    /// be rung.
    #[inline(always)]
    fn publish_record(&mut self, p: Publication, kind: u8, tag: u8) -> bool {
        // SAFETY: `next` and `header` are 8-aligned slots of the data area
        // and `index` a word of the control page, mapped while the
        // producer lives.
        let (next, header, index) = unsafe { (&*p.next, &*p.header, &*p.index) };
        // The next record's header slot reads "empty" before this record is
        // visible (reserve found it free; it is offset 0 when this record
        // ends at the end of the data area), so that a consumer that moves
        // on to it never takes what an earlier lap left there for a record.
        next.store(0, Ordering::Relaxed);
        // The header is the record's publication: payload and the cleared
        // slot are written before it (release).
        header.store(
            crate::record::encode(p.len as u32, kind, tag),
            Ordering::Release,
        );
        self.prod = p.prod;
        self.published = p.prod;
        // The producer index: with the notify protocol, unless the consumer
        // polls.
        if p.polls {
            index.store(p.prod, Ordering::Release);
            return false;
        }
        protocol::publish(index, p.prod, self.v.word(OFF_CONS_WAITING))
    }

    /// Drops the outstanding reservation.
    pub fn cancel(&mut self) {
        self.reserved = None;
    }

    /// Copies `parts` into one record. `Ok(None)` when the ring is full;
    /// `Ok(Some(notify))` otherwise.
    pub fn push(&mut self, kind: u8, tag: u8, parts: &[&[u8]]) -> Result<Option<bool>> {
        self.push_heard(kind, tag, parts, self.heard)
    }

    /// [`Producer::push`] with the caller's `heard` count (see
    /// [`Producer::reserve_heard`]).
    pub fn push_heard(
        &mut self,
        kind: u8,
        tag: u8,
        parts: &[&[u8]],
        heard: u64,
    ) -> Result<Option<bool>> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.reserved = None;
        let Some(at) = self.place(len, heard)? else {
            return Ok(None);
        };
        let rec = self.begin_record(at.pos, at.total, len);
        let mut off = 0;
        for p in parts {
            // SAFETY: the payload has room for `len` bytes; parts do not
            // overlap ring space (they are caller memory).
            unsafe { ptr::copy_nonoverlapping(p.as_ptr(), rec.payload.add(off), p.len()) };
            off += p.len();
        }
        Ok(Some(self.publish_record(rec, kind, tag)))
    }

    /// True when a record of `len` payload bytes fits without waiting.
    pub fn fits(&mut self, len: usize) -> Result<bool> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        let max = self.max_record();
        if len > max {
            return Err(Error::TooLarge { len, max });
        }
        let size = self.v.size();
        let total = (RECORD_HEADER + align8(len)) as u64;
        let (need, _) = self.need(self.prod & (size - 1), total);
        if size - self.prod.wrapping_sub(self.cons) >= need {
            return Ok(true);
        }
        self.reload_cons()?;
        Ok(size - self.prod.wrapping_sub(self.cons) >= need)
    }

    /// Announces that the producer is about to sleep until the consumer frees
    /// space. Returns `false` when space was freed meanwhile (do not sleep).
    ///
    /// Unlike the consumer's, this sleep does not look at a closed flag, and
    /// has no close to miss: the closed flag of this ring is written by this
    /// producer alone, never while it waits; and the peer's close of the
    /// other ring of a channel closes only the peer's sending direction (it
    /// may still consume, and then rings as usual). A peer that goes away
    /// without consuming is found by the caller's liveness check between
    /// sleep slices, as one that dies without closing.
    pub fn prepare_sleep(&mut self) -> Result<bool> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        let seen = self.cons;
        let sleep =
            protocol::prepare_sleep(self.v.word(OFF_PROD_WAITING), self.v.word(OFF_CONS), seen);
        if !sleep {
            self.reload_cons()?;
        }
        Ok(sleep)
    }

    /// Withdraws the sleep announcement.
    pub fn finish_sleep(&mut self) {
        protocol::finish_sleep(self.v.word(OFF_PROD_WAITING));
    }

    /// Marks the ring closed: the consumer sees [`Error::Closed`] once it has
    /// drained what was committed. Returns whether the consumer sleeps (and
    /// must be rung: it announced sleep before it could see the close).
    pub fn close(&mut self) -> bool {
        protocol::close(
            self.v.word(OFF_CLOSED),
            self.v.word(OFF_PROD),
            self.published,
            self.v.word(OFF_CONS_WAITING),
        )
    }

    /// Bytes committed but not yet handed back by the consumer, from a fresh
    /// look at its index (one load of the consumer's line, validated like
    /// every other look: a bad index breaks the ring).
    pub fn backlog(&mut self) -> Result<u64> {
        self.reload_cons()?;
        Ok(self.in_flight())
    }

    /// Bytes committed but not yet consumed (from the cached index).
    pub fn in_flight(&self) -> u64 {
        self.published.wrapping_sub(self.cons)
    }

    /// The doorbell word that wakes this ring's consumer (host backend).
    pub fn bell(&self) -> *const AtomicU32 {
        self.v.bell()
    }

    /// The ring's control page, for tests that play a hostile producer
    /// (they write records and indices by hand, as `docs/ring-format.md`
    /// describes). Not for anything else.
    #[doc(hidden)]
    pub fn raw_base(&self) -> *mut u8 {
        self.v.base
    }
}

/// A record seen in place in ring space.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// Payload in ring space. The peer can still write it (it is shared
    /// memory); its bytes are data, never trusted as structure.
    pub ptr: *const u8,
    /// Payload length (validated against the ring).
    pub len: usize,
    /// Record type (one of [`kind`]).
    pub kind: u8,
    /// Tag of the layer above.
    pub tag: u8,
}

/// The whole messages one [`Consumer::peek_msgs`] took, in place: up to
/// [`Batch::CAP`]. Nothing to set up (the slots past the count stay
/// uninitialised), as a poller makes one for every poll.
pub struct Batch {
    recs: [MaybeUninit<Record>; Batch::CAP],
    n: usize,
}

impl Batch {
    /// The most messages a batch holds.
    pub const CAP: usize = 16;

    /// An empty batch.
    #[inline(always)]
    pub fn new() -> Batch {
        Batch {
            recs: [const { MaybeUninit::uninit() }; Batch::CAP],
            n: 0,
        }
    }

    /// Empties the batch.
    #[inline(always)]
    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// Adds a message taken in place elsewhere (a receive queue's); a
    /// full batch takes no more.
    #[inline(always)]
    pub(crate) fn push(&mut self, r: Record) {
        if let Some(slot) = self.recs.get_mut(self.n) {
            slot.write(r);
            self.n += 1;
        }
    }

    /// The messages taken, in ring order.
    #[inline(always)]
    pub fn records(&self) -> &[Record] {
        // SAFETY: peek_msgs, the only writer, initialises the first n
        // slots and then sets n (n <= CAP); MaybeUninit<Record> has
        // Record's layout.
        unsafe { std::slice::from_raw_parts(self.recs.as_ptr().cast::<Record>(), self.n) }
    }
}

impl Default for Batch {
    fn default() -> Batch {
        Batch::new()
    }
}

impl Record {
    /// The payload, as a view that copies out of ring space and never
    /// lends a reference to it.
    ///
    /// # Safety
    /// Valid only until the record is released; the caller must not keep
    /// the view beyond that.
    pub unsafe fn payload<'a>(&self) -> Payload<'a> {
        // SAFETY: ptr/len were validated to lie inside the data area, which
        // stays mapped while the consumer exists (caller's contract).
        unsafe { Payload::shared(self.ptr, self.len) }
    }
}

/// The reading end of a ring.
///
/// It polls the header slot where the next record starts (version 2):
/// a non-zero word there is the producer's publication of that record, so
/// a message costs the consumer the transfer of the lines the record
/// occupies and nothing else (version 1 read the producer index first, a
/// second line the producer writes on every record). The producer index
/// is still published (for the peer's sleep protocol and for observers);
/// this consumer never needs it.
pub struct Consumer {
    v: View,
    /// Local, authoritative consumer index.
    cons: u64,
    /// Last consumer index made visible to the producer.
    published: u64,
    /// Size of the record returned by the last `peek`, if not yet released.
    current: Option<u64>,
    /// How long the last lap was: where its padding record stood, or the
    /// data size when it ran to the end (0 before the first lap ends).
    /// Released records are claimed while it is at most [`CLAIM_LAP`].
    lap: u64,
    /// The producer declared that it never sleeps: publish without the
    /// notify protocol.
    peer_polls: bool,
    /// Both ends run on the CPUs of one kernel: tell the producer ours
    /// ([`OFF_CONS_CPU`]) once [`tell_cpu`] was called; the value last told.
    cpus_shared: bool,
    cpu_told: u64,
    /// The epoch of the pages the producer asked for that this consumer
    /// prepares ([`Consumer::prepare_pages`]), and the next offset to.
    prep_epoch: u64,
    prep_at: u64,
    /// A page a call ([`Consumer::prepare_a_page_a_call`], or the mapping
    /// cannot be populated as a range).
    prep_by_page: bool,
    broken: Option<Violation>,
}

// SAFETY: as for Producer.
unsafe impl Send for Consumer {}

impl Consumer {
    /// The consuming end of the ring at `base`.
    ///
    /// # Safety
    /// As for [`Producer::new`], with exactly one consumer.
    pub unsafe fn new(base: *mut u8, geo: Geometry) -> Result<Self> {
        // SAFETY: forwarded contract.
        unsafe { check(base, geo)? };
        Ok(Consumer {
            v: View { base, geo },
            cons: 0,
            published: 0,
            current: None,
            lap: 0,
            peer_polls: false,
            cpus_shared: false,
            cpu_told: 0,
            prep_epoch: 0,
            prep_at: 0,
            prep_by_page: false,
            broken: None,
        })
    }

    /// For a poll that found nothing, every [`PREPARE_EVERY`]: prepares
    /// the pages that the producer asked for ([`OFF_PROD_WANT`],
    /// [`MEDIUM_PREPARE`]), if any, and says when all are there
    /// ([`OFF_CONS_READY`]). A read: the backend allocates the pages
    /// (zeros) for both mappings, and the producer's first writes there no
    /// longer wait for them. All in one call where the kernel can
    /// (`MADV_POPULATE_READ`, Linux 5.14: a 1 MiB lap's 240 pages in one
    /// stop of the receiver, where one page every [`PREPARE_EVERY`] empty
    /// polls took most of a short stream such as OSU's 1 KiB phase); else
    /// (a mapping that cannot be populated so) one page per call. Memory
    /// that the kernel refuses (the memory cgroup's limit) ends the
    /// preparation unanswered. The request is a hint from memory the
    /// producer writes: read once per call, its end bounded by the data
    /// area, pages from [`KEEP_BYTES`] (the short laps' pages are there),
    /// nothing parsed and nothing written to the data area. Returns the
    /// number of pages it prepared.
    #[cold]
    pub fn prepare_pages(&mut self) -> u64 {
        let (epoch, end) = pages_word_parts(self.v.word(OFF_PROD_WANT).load(Ordering::Relaxed));
        if epoch == 0 {
            return 0;
        }
        let end = end.min(self.v.size()) & !4095;
        if epoch != self.prep_epoch {
            self.prep_epoch = epoch;
            self.prep_at = KEEP_BYTES;
        }
        if self.prep_at >= end {
            return 0;
        }
        let from = self.prep_at;
        if !self.prep_by_page {
            // SAFETY: KEEP_BYTES <= prep_at < end <= the data size, both
            // multiples of the page: a page-aligned range of this
            // consumer's mapping of the data area. Populating for reading
            // allocates what is missing and changes no byte.
            let rc = unsafe {
                libc::madvise(
                    self.v.data().add(self.prep_at as usize).cast(),
                    (end - self.prep_at) as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
            if rc == 0 {
                self.prep_at = end;
            } else {
                match std::io::Error::last_os_error().raw_os_error() {
                    // A mapping that cannot be populated so (an older
                    // kernel, a grant mapping): a page at a time, from now
                    // on (below).
                    Some(libc::EINVAL) => self.prep_by_page = true,
                    // Interrupted: the next empty poll goes on.
                    Some(libc::EINTR | libc::EAGAIN) => return 0,
                    // The memory is refused (this process's memory cgroup
                    // at its limit): prepare no more this epoch and do not
                    // say they are there; the producer keeps its short laps.
                    _ => {
                        self.prep_at = end;
                        return 0;
                    }
                }
            }
        }
        if self.prep_by_page {
            // (a page of the data area: KEEP_BYTES <= prep_at < end <= size;
            // the value is of no use, the read is the point)
            std::hint::black_box(self.v.slot(self.prep_at).load(Ordering::Relaxed));
            self.prep_at += 4096;
        }
        if self.prep_at >= end {
            self.v
                .word(OFF_CONS_READY)
                .store(pages_word(epoch, self.prep_at), Ordering::Relaxed);
        }
        (self.prep_at - from) / 4096
    }

    /// Makes [`Consumer::prepare_pages`] prepare a page a call, in the
    /// receiver's slack, instead of the whole range in one stop: for a
    /// receiver whose process's co-resident ranks outnumber the CPUs, where
    /// a stop of the receiver (0.9 ms for a lap's 240 pages here) takes the
    /// time of ranks that share its core and is more than a short stream
    /// gains from the long laps (docs/design.md). As where the mapping
    /// cannot be populated as a range.
    pub fn prepare_a_page_a_call(&mut self) {
        self.prep_by_page = true;
    }

    /// Whether [`Consumer::prepare_pages`] prepares a page a call.
    pub fn prepares_a_page_a_call(&self) -> bool {
        self.prep_by_page
    }

    /// The ring geometry.
    pub fn geometry(&self) -> Geometry {
        self.v.geo
    }

    fn fail(&mut self, v: Violation) -> Error {
        self.broken = Some(v);
        Error::Broken(v)
    }

    /// The ring looks empty: re-checks the header words (a peer that
    /// rewrote them breaks the ring; this is where a consumer notices, at
    /// the latest when it has taken every record before the change).
    #[cold]
    fn check_idle(&mut self) -> Result<()> {
        if let Err(Error::Broken(v)) = self.v.recheck() {
            return Err(self.fail(v));
        }
        Ok(())
    }

    /// Breaks the ring for a violation the layer above found in a record
    /// (a tag out of its range, say): every later call reports it.
    pub fn poison(&mut self, v: Violation) -> Error {
        self.fail(v)
    }

    /// The header word at the consumer index (zero: nothing published
    /// there yet).
    #[inline(always)]
    fn next_header(&self, order: Ordering) -> u64 {
        self.v.slot(self.cons & (self.v.size() - 1)).load(order)
    }

    /// Cheap hint for pollers: `true` when nothing new was published since
    /// the last look (one relaxed load; no validation). A `false` answer is
    /// followed by [`Consumer::peek`], which validates everything.
    #[inline]
    pub fn looks_empty(&self) -> bool {
        self.current.is_none() && self.next_header(Ordering::Relaxed) == 0
    }

    /// True when a record is waiting.
    pub fn has_data(&mut self) -> Result<bool> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        if self.current.is_some() || self.next_header(Ordering::Acquire) != 0 {
            return Ok(true);
        }
        self.check_idle()?;
        Ok(false)
    }

    /// The next record in place, or `None` when the ring is empty. The
    /// record stays valid until [`Consumer::release`]. Calling `peek` again
    /// without releasing returns the same record.
    #[inline]
    pub fn peek(&mut self) -> Result<Option<Record>> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        let size = self.v.size();
        // At most two rounds: a padding record leads to offset 0, where a
        // second padding record is a violation.
        loop {
            let pos = self.cons & (size - 1);
            // One read of the header into a local: no double fetch.
            let mut hdr = self.v.slot(pos).load(Ordering::Acquire);
            if hdr == 0 {
                if self.v.word(OFF_CLOSED).load(Ordering::Acquire) == 0 {
                    self.check_idle()?;
                    return Ok(None);
                }
                // Closed: every record was written before the flag; look
                // once more, in case one landed after the first look.
                hdr = self.v.slot(pos).load(Ordering::Acquire);
                if hdr == 0 {
                    self.check_idle()?;
                    return Err(Error::Closed);
                }
            }
            let contig = size - pos;
            let (len, k, tag, _) = crate::record::decode(hdr);
            if k == kind::PAD {
                if pos == 0 || len as u64 + RECORD_HEADER as u64 != contig {
                    return Err(self.fail(Violation::BadPadding));
                }
                self.cons += contig;
                self.lap = pos;
                continue;
            }
            if !kind::valid(k) {
                return Err(self.fail(Violation::BadType));
            }
            if len > self.v.geo.max_record as usize {
                return Err(self.fail(Violation::BadLength));
            }
            let total = (RECORD_HEADER + align8(len)) as u64;
            if total > contig {
                return Err(self.fail(Violation::BadLength));
            }
            self.current = Some(total);
            return Ok(Some(Record {
                // SAFETY: pos + total <= size, checked above.
                ptr: unsafe { self.v.payload(pos) },
                len,
                kind: k,
                tag,
            }));
        }
    }

    /// The whole messages that follow one another at the consumer, into
    /// `out` (emptied first): up to `max` of them (at most
    /// [`Batch::CAP`]) and [`BATCH_BYTES`] of ring space (the record that
    /// reaches it is the last), each a record of kind MSG with a tag below
    /// `tag_limit` that passes every check of [`Consumer::peek`], its header
    /// read once and nothing in it acted on unless it passes. They are
    /// taken as `peek` takes a record: in place until the next
    /// [`Consumer::release`], which releases them all. Returns how many and
    /// their payload bytes; stops at anything else (nothing there, a
    /// padding or control record, a fragment, a violation), which it leaves
    /// for `peek` to read afresh and name, and takes nothing while a record
    /// is outstanding or the ring is broken. The receive path's common case
    /// in few instructions: a poller takes a batch, hands each message up
    /// without touching the consumer again, and releases once.
    #[inline(always)]
    pub fn peek_msgs(&mut self, tag_limit: u16, out: &mut Batch, max: usize) -> (usize, usize) {
        let recs = &mut out.recs;
        let (n, bytes) = self.peek_msgs_with(tag_limit, max.min(Batch::CAP), |i, r| {
            recs[i].write(r);
        });
        out.n = n;
        (n, bytes)
    }

    /// [`Consumer::peek_msgs`] handing each message to `put` (its index in
    /// the run, from 0, and the record) in place of a [`Batch`]: up to
    /// `max` of them, for a caller with its own array to fill.
    #[inline(always)]
    pub fn peek_msgs_with(
        &mut self,
        tag_limit: u16,
        max: usize,
        mut put: impl FnMut(usize, Record),
    ) -> (usize, usize) {
        if self.broken.is_some() || self.current.is_some() {
            return (0, 0);
        }
        let mask = self.v.size() - 1;
        let data = self.v.data();
        let max_record = self.v.geo.max_record as u64;
        // (locals, not fields: `put` may write memory the compiler cannot
        // tell apart from the consumer's, which would reload each field)
        let start = self.cons;
        let batch_end = start + BATCH_BYTES;
        let (mut cons, mut n, mut bytes) = (start, 0, 0);
        while n < max {
            let pos = cons & mask;
            // SAFETY: `pos` is an 8-aligned offset inside the data area
            // (as `View::slot`, from the base read once above).
            let slot = unsafe { &*(data.add(pos as usize) as *const AtomicU64) };
            // The header, read once.
            let word = slot.load(Ordering::Acquire);
            let len = crate::record::len_of(word);
            // A MSG with a tag below the limit, in one compare (see
            // `record::kind_tag`). (A zero header, nothing published, has
            // kind 0: not MSG.)
            let kind_tag = crate::record::kind_tag(word);
            if kind_tag.wrapping_sub(u16::from(kind::MSG) << 8) >= tag_limit || len > max_record {
                break;
            }
            // (RECORD_HEADER + align8(len), in one step)
            let total = (len + RECORD_HEADER as u64 + 7) & !7;
            // (pos + total <= size, said with the mask alone)
            if pos + total - 1 > mask {
                break;
            }
            put(
                n,
                Record {
                    // SAFETY: pos + total <= size, checked above.
                    ptr: unsafe { data.add(pos as usize + RECORD_HEADER) },
                    len: len as usize,
                    kind: kind::MSG,
                    tag: kind_tag as u8,
                },
            );
            cons += total;
            n += 1;
            bytes += len as usize;
            if cons >= batch_end {
                break;
            }
        }
        if n > 0 {
            self.current = Some(cons - start);
        }
        (n, bytes)
    }

    /// [`Consumer::peek_msgs`] for one message: `(tag, pointer, len)`.
    #[inline(always)]
    pub fn peek_msg_fast(&mut self, tag_limit: u16) -> Option<(u8, *const u8, usize)> {
        let mut one = Batch::new();
        self.peek_msgs(tag_limit, &mut one, 1);
        one.records().first().map(|r| (r.tag, r.ptr, r.len))
    }

    /// Releases the record returned by the last `peek` (or the records of
    /// the last `peek_msgs`) locally. The space is
    /// handed back to the producer by [`Consumer::flush`] (call it once per
    /// batch, or use [`Consumer::release_flush`]).
    ///
    /// Records of [`CLAIM_MIN`] bytes and more are claimed as they are
    /// released: the consumer writes a zero word into every cache line
    /// they occupy (only bytes of the records themselves: no other
    /// record's header, no padding), so that the producer's next lap finds
    /// those lines modified in the consumer's cache rather than shared by
    /// both. Its copy into lines that another core holds shared ran 2-5
    /// times slower on this project's machines than into lines the other
    /// core holds modified (`cargo bench -p ivcom-core`, docs/PERFORMANCE.md).
    /// The format allows it: a released record's bytes mean nothing, and
    /// they are written before the index that hands them back is
    /// published.
    #[inline]
    pub fn release(&mut self) {
        if let Some(total) = self.current.take() {
            if total >= CLAIM_MIN && self.lap <= CLAIM_LAP {
                self.claim(total);
            }
            let before = self.cons;
            self.cons += total;
            if (before ^ self.cons) & !(self.v.size() - 1) != 0 {
                // A run that ended exactly at the end of the data area.
                self.lap = self.v.size();
            }
        }
    }

    /// Writes a zero word at the start of every cache line of the `total`
    /// bytes from the consumer index (the record's first word where the
    /// line begins before it). They are records that `peek` or
    /// `peek_msgs` checked, each inside the data area; a run of them
    /// continues at offset 0 after one that ends exactly at the end, hence
    /// the mask at each line.
    #[inline(never)]
    fn claim(&self, total: u64) {
        let mask = self.v.size() - 1;
        let end = self.cons + total;
        let mut at = self.cons;
        while at < end {
            self.v.slot(at & mask).store(0, Ordering::Relaxed);
            at = (at | 63) + 1;
        }
    }

    /// Bytes taken from this ring so far (the local consumer index): the
    /// `heard` count for the producer of the other ring of a channel.
    #[inline]
    pub fn taken(&self) -> u64 {
        self.cons
    }

    /// Bytes released locally but not yet published to the producer.
    #[inline]
    pub fn unpublished(&self) -> u64 {
        self.cons.wrapping_sub(self.published)
    }

    /// Whether the producer declared that it never sleeps
    /// ([`Consumer::learn_peer`]): then handing space back never needs a
    /// doorbell.
    pub fn peer_polls(&self) -> bool {
        self.peer_polls
    }

    /// Declares that this consumer never sleeps waiting for data.
    pub fn declare_polling(&self) {
        self.v.word(OFF_CONS_POLLS).store(1, Ordering::Release);
    }

    /// Reads, once, whether the producer declared that it never sleeps (as
    /// [`Producer::learn_peer`]).
    pub fn learn_peer(&mut self) {
        self.peer_polls = self.v.word(OFF_PROD_POLLS).load(Ordering::Acquire) != 0;
    }

    /// Publishes the consumer index. Returns `true` when the producer sleeps
    /// waiting for space and the caller must ring the doorbell.
    #[inline]
    pub fn flush(&mut self) -> bool {
        if self.published == self.cons {
            return false;
        }
        self.published = self.cons;
        if TELL_CPU.load(Ordering::Relaxed) && self.cpus_shared {
            self.write_cpu();
        }
        if self.peer_polls {
            self.v.word(OFF_CONS).store(self.cons, Ordering::Release);
            return false;
        }
        protocol::publish(
            self.v.word(OFF_CONS),
            self.cons,
            self.v.word(OFF_PROD_WAITING),
        )
    }

    /// Both ends of this ring run on the CPUs of one kernel (the host
    /// backend): once [`tell_cpu`] was called, publishing the index tells
    /// the producer this consumer's CPU.
    pub fn share_cpus(&mut self) {
        self.cpus_shared = true;
    }

    /// Writes this thread's CPU to [`OFF_CONS_CPU`] when it changed (before
    /// the index it goes with is published).
    #[inline(never)]
    fn write_cpu(&mut self) {
        let c = cpu_plus_one();
        if c != self.cpu_told {
            self.cpu_told = c;
            self.v.word(OFF_CONS_CPU).store(c, Ordering::Relaxed);
        }
    }

    /// `release` then `flush`.
    pub fn release_flush(&mut self) -> bool {
        self.release();
        self.flush()
    }

    /// Announces that the consumer is about to sleep until data arrives or
    /// the producer closes the ring. Returns `false` when data arrived or the
    /// ring was closed meanwhile (do not sleep).
    ///
    /// The word re-read after the fence is the header slot at the consumer
    /// index, with zero as the value seen: the producer writes it before
    /// its own publish and fence, so either this side sees the record or
    /// the producer sees the waiting flag (the protocol of
    /// [`crate::protocol`], over another word).
    pub fn prepare_sleep(&mut self) -> Result<bool> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        if self.current.is_some() {
            return Ok(false);
        }
        self.check_idle()?;
        // The closed flag is read after the fence (a close that lands
        // while the sleep is announced is not missed; issue 13).
        let sleep = protocol::prepare_sleep_unless_closed(
            self.v.word(OFF_CONS_WAITING),
            self.v.slot(self.cons & (self.v.size() - 1)),
            0,
            self.v.word(OFF_CLOSED),
        );
        Ok(sleep)
    }

    /// Withdraws the sleep announcement.
    pub fn finish_sleep(&mut self) {
        protocol::finish_sleep(self.v.word(OFF_CONS_WAITING));
    }

    /// True when the producer closed the ring (records published before the
    /// close may still be waiting: [`Consumer::peek`] delivers them first).
    /// Blocking waits check it alongside [`Consumer::has_data`].
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.v.word(OFF_CLOSED).load(Ordering::Acquire) != 0
    }

    /// The doorbell word that wakes this ring's consumer (host backend).
    pub fn bell(&self) -> *const AtomicU32 {
        self.v.bell()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{alloc_zeroed, dealloc, Layout};
    use std::cell::Cell;

    thread_local! {
        /// While set, `coarse_ticks` on this thread reads this instead of
        /// the clock: two rings driven alike then decide alike.
        pub(super) static FROZEN_CLOCK: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// A ring in private memory with both of its ends.
    struct Pair {
        base: *mut u8,
        layout: Layout,
        prod: Producer,
        cons: Consumer,
    }

    impl Pair {
        fn new(geo: Geometry) -> Pair {
            let layout = Layout::from_size_align(geo.ring_bytes(), 4096).unwrap();
            // SAFETY: non-zero size.
            let base = unsafe { alloc_zeroed(layout) };
            assert!(!base.is_null());
            // SAFETY: private, aligned, writable, with one end of each kind.
            let (mut prod, mut cons) = unsafe {
                init(base, geo, 7);
                (
                    Producer::new(base, geo).unwrap(),
                    Consumer::new(base, geo).unwrap(),
                )
            };
            cons.declare_polling();
            prod.declare_polling();
            prod.learn_peer();
            cons.learn_peer();
            Pair {
                base,
                layout,
                prod,
                cons,
            }
        }

        /// Sends `n` messages of 100 bytes, which must fit.
        fn send_n(&mut self, n: usize) {
            for i in 0..n {
                assert_eq!(
                    self.prod.push(kind::MSG, 1, &[&[i as u8; 100]]).unwrap(),
                    Some(false)
                );
            }
        }

        /// Takes `n` messages of 100 bytes and hands their space back.
        fn take_n(&mut self, n: usize) {
            for _ in 0..n {
                assert_eq!(self.cons.peek().unwrap().unwrap().len, 100);
                self.cons.release();
            }
            self.cons.flush();
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: the mapping lives as long as the pair.
            unsafe { std::slice::from_raw_parts(self.base, self.layout.size()) }
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.base, self.layout) };
        }
    }

    /// A small deterministic generator (splitmix64).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }
    }

    /// Two rings driven alike, one by `push2` alone and one by
    /// `push2_fast` (with `push2` when it declines): whenever the fast
    /// path takes a message, the shared pages (control page and data area,
    /// every byte) are what `push2` makes of them, and so is everything
    /// after, which depends on the producer's state; every message of
    /// both arrives whole and in order. Sizes cross the fast path's
    /// limits (its copy without a call, the largest record), the consumer
    /// falls behind and catches up (full rings, wraps, early wraps at
    /// looks), and the peer's traffic (`heard`) moves at random.
    /// Where both ends share a kernel's CPUs and the consumer tells its
    /// CPU: on the producer's own core it is never at work (it runs when
    /// the producer gives the core away), elsewhere any take counts, a
    /// burst taken whole too (a one-record answer). The consumer tells it
    /// as it publishes its index, once told to.
    #[test]
    fn a_consumer_that_tells_its_cpu_is_at_work_only_on_another_core() {
        // This thread stays on one CPU for the test (its CPU is compared).
        // SAFETY: a zeroed set with one CPU, for this thread.
        let here = unsafe {
            let c = libc::sched_getcpu();
            assert!(c >= 0);
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(c as usize, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
                0
            );
            c as u64 + 1
        };
        let geo = Geometry::with_max_record(64 << 10, 1024).unwrap();
        let mut p = Pair::new(geo);
        p.prod.share_cpus();
        p.cons.share_cpus();
        let cpu_word =
            // SAFETY: the hint word of the pair's own ring.
            |p: &Pair| unsafe { &*(p.base.add(OFF_CONS_CPU) as *const AtomicU64) };
        // Told to, the consumer tells the CPU it runs on with its index.
        tell_cpu();
        p.send_n(4);
        p.take_n(4);
        assert_eq!(cpu_word(&p).load(Ordering::Relaxed), here);
        assert!(!p.prod.consumer_draining().unwrap());
        // On this core: never at work, however it moves.
        p.send_n(8);
        assert!(!p.prod.consumer_draining().unwrap());
        p.take_n(3);
        assert!(!p.prod.consumer_draining().unwrap());
        p.take_n(5);
        assert!(!p.prod.consumer_draining().unwrap());
        // On another core (as it says): a one-record answer taken whole
        // since the last call counts, then the grace.
        // (the consumer here runs on this thread: it must not tell again)
        cpu_word(&p).store(here + 1, Ordering::Relaxed);
        p.cons.cpu_told = here;
        p.send_n(1);
        assert!(!p.prod.consumer_draining().unwrap());
        p.take_n(1);
        assert!(p.prod.consumer_draining().unwrap());
        for _ in 0..DRAINING_GRACE {
            assert!(p.prod.consumer_draining().unwrap());
        }
        assert!(!p.prod.consumer_draining().unwrap());
        // Back on this core (it tells as it publishes): no more.
        p.cons.cpu_told = 0;
        p.send_n(4);
        p.take_n(4);
        assert_eq!(cpu_word(&p).load(Ordering::Relaxed), here);
        assert!(!p.prod.consumer_draining().unwrap());
    }

    #[test]
    fn a_waiting_sender_sees_its_consumer_at_work_only_while_it_takes_this_burst() {
        let geo = Geometry::with_max_record(64 << 10, 1024).unwrap();
        let mut p = Pair::new(geo);
        // Nothing sent: no look at the consumer.
        assert!(!p.prod.consumer_draining().unwrap());
        // A burst the consumer has not reached: give the core away.
        p.send_n(8);
        assert!(!p.prod.consumer_draining().unwrap());
        // It took all of it meanwhile (it may have run on this core while
        // the sender was off it): that says nothing of now.
        p.take_n(8);
        assert!(!p.prod.consumer_draining().unwrap());
        // The next burst, taken in part since: at work now, and for the
        // grace calls after, records outstanding or not.
        p.send_n(8);
        p.take_n(3);
        assert!(p.prod.consumer_draining().unwrap());
        p.take_n(5);
        for i in 0..DRAINING_GRACE {
            assert!(p.prod.consumer_draining().unwrap(), "grace call {i}");
        }
        assert!(!p.prod.consumer_draining().unwrap());
        // A burst taken whole between two looks: not seen at work.
        p.send_n(8);
        p.take_n(8);
        assert!(!p.prod.consumer_draining().unwrap());
        // What the consumer takes of a burst after a look that found it
        // not at work (its sender gave the core away then) is not seen.
        p.send_n(16);
        assert!(!p.prod.consumer_draining().unwrap());
        p.take_n(4);
        assert!(!p.prod.consumer_draining().unwrap());
        p.take_n(12);
        assert!(!p.prod.consumer_draining().unwrap());
        // Moves within the burst renew the grace; a look that finds no
        // move uses it up.
        p.send_n(16);
        p.take_n(4);
        assert!(p.prod.consumer_draining().unwrap());
        for _ in 0..10 {
            assert!(p.prod.consumer_draining().unwrap());
        }
        p.take_n(4);
        assert!(p.prod.consumer_draining().unwrap());
        for _ in 0..DRAINING_GRACE {
            assert!(p.prod.consumer_draining().unwrap());
        }
        assert!(!p.prod.consumer_draining().unwrap());
        p.take_n(8);
        // A consumer index out of bounds breaks the ring, here as anywhere.
        p.send_n(2);
        let bad = p.prod.published + 4096;
        // SAFETY: the consumer index word of the pair's own ring.
        unsafe { (*(p.base.add(OFF_CONS) as *const AtomicU64)).store(bad, Ordering::Release) };
        assert!(matches!(
            p.prod.consumer_draining(),
            Err(Error::Broken(Violation::BadIndex))
        ));
    }

    #[test]
    fn the_fast_push_does_what_push2_does() {
        let mut fast_sends = 0u64;
        let mut declined = 0u64;
        let mut got_all = 0u64;
        for seed in 1..=24u64 {
            let mut r = Rng(seed);
            let data = [16usize << 10, 64 << 10, 128 << 10][(seed % 3) as usize];
            let max = [1024usize, 4096, 8000][(seed / 3 % 3) as usize];
            let geo = Geometry::with_max_record(data, max).unwrap();
            let (mut a, mut b) = (Pair::new(geo), Pair::new(geo));
            // The consumer keeps up, or falls behind and keeps the ring
            // about full (which the fast path must see: it never reads the
            // consumer index again).
            let take = [40u64, 4, 2][(seed / 9 % 3) as usize];
            let mut clock = 1_000_000u64;
            let (mut heard, mut sent, mut got) = (0u64, 0u64, 0u64);
            for step in 0..20_000u32 {
                FROZEN_CLOCK.with(|c| c.set(Some(clock)));
                clock += r.below(3) * 1_000_000;
                if r.below(64) == 0 {
                    heard += 1 + r.below(100);
                }
                if r.below(3) != 0 {
                    // A send: head and body of sizes around the limits.
                    let hl = [0, 8, 14, 16, 24, 40, 64, 65][r.below(8) as usize];
                    let bl = match r.below(4) {
                        0 => r.below(17),
                        1 => r.below(65),
                        2 => r.below(300),
                        _ => r.below(max as u64 + 16),
                    } as usize;
                    let msg: Vec<u8> = (0..hl + bl)
                        .map(|i| (sent as usize * 31 + i) as u8)
                        .collect();
                    let (h, bd) = msg.split_at(hl);
                    let tag = (sent % 200) as u8;
                    let ra = a.prod.push2(kind::MSG, tag, h, bd, heard);
                    let small = hl <= SMALL_PIECE && bd.len() <= SMALL_PIECE;
                    let took = if small {
                        b.prod.push2_fast::<true>(kind::MSG, tag, h, bd, heard)
                    } else {
                        b.prod.push2_fast::<false>(kind::MSG, tag, h, bd, heard)
                    };
                    let rb = if took {
                        fast_sends += 1;
                        Ok(Some(false))
                    } else {
                        declined += 1;
                        b.prod.push2(kind::MSG, tag, h, bd, heard)
                    };
                    match (&ra, &rb) {
                        (Ok(x), Ok(y)) => assert_eq!(x, y, "seed {seed} step {step}"),
                        (Err(Error::TooLarge { .. }), Err(Error::TooLarge { .. })) => {}
                        _ => panic!("seed {seed} step {step}: {ra:?} vs {rb:?}"),
                    }
                    if matches!(ra, Ok(Some(_))) {
                        sent += 1;
                    }
                } else {
                    // The consumer takes some of what waits (`peek`, which
                    // passes padding records).
                    for _ in 0..1 + r.below(take) {
                        let (x, y) = (a.cons.peek().unwrap(), b.cons.peek().unwrap());
                        let (Some(x), Some(y)) = (x, y) else {
                            assert!(x.is_none() && y.is_none(), "seed {seed} step {step}");
                            break;
                        };
                        // SAFETY: taken, not released.
                        let (xs, ys) = unsafe {
                            (
                                std::slice::from_raw_parts(x.ptr, x.len),
                                std::slice::from_raw_parts(y.ptr, y.len),
                            )
                        };
                        assert_eq!((x.kind, x.tag, xs), (y.kind, y.tag, ys));
                        let want: Vec<u8> = (0..xs.len())
                            .map(|i| (got as usize * 31 + i) as u8)
                            .collect();
                        assert_eq!(xs, &want[..], "seed {seed} message {got}");
                        assert_eq!((x.kind, x.tag), (kind::MSG, (got % 200) as u8));
                        got += 1;
                        a.cons.release();
                        b.cons.release();
                    }
                    if r.below(2) == 0 {
                        a.cons.flush();
                        b.cons.flush();
                    }
                }
                assert!(
                    a.bytes() == b.bytes(),
                    "seed {seed} step {step}: pages differ"
                );
            }
            FROZEN_CLOCK.with(|c| c.set(None));
            got_all += got;
        }
        // Both paths ran often, and most messages arrived.
        assert!(got_all > 250_000, "{got_all}");
        assert!(
            fast_sends > 200_000 && declined > 10_000,
            "{fast_sends} {declined}"
        );
    }

    #[test]
    fn record_sizes_near_the_top_of_usize_are_refused() {
        // Rounding such a size up to 8 bytes wrapped to a tiny number,
        // which passed the "fits in half the ring" check.
        for m in [usize::MAX, usize::MAX - 3, usize::MAX - 7, usize::MAX - 8] {
            assert!(Geometry::with_max_record(4096, m).is_err(), "{m}");
        }
        assert!(Geometry::with_max_record(4096, 2040).is_ok());
        assert!(Geometry::with_max_record(4096, 2041).is_err());
    }
}
