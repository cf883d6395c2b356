//! Receive queue: many producers, one consumer, in one shared region.
//!
//! A ring ([`crate::ring`]) serves one pair of processes; on Xen every ring
//! costs the domain that grants it pages of a pool that all of its
//! processes share (gntalloc's 1,024 pages by default), and a layout of
//! many domains of many ranks runs out of it (docs/design.md, "Memory
//! follows the traffic"). A receive queue serves one consuming process and
//! every producing process of one peer domain: the consumer grants it, the
//! producers of that domain all map it and share its space, so a domain
//! needs one queue per process and peer domain, not one ring per pair.
//!
//! The wire format is in `docs/queue-format.md`. In short: a 4 KiB control
//! page (header; the reservation word the producers share; the consumer
//! index; the doorbell and the sleep flags; one waiting bit per producer),
//! then a power-of-two data area of records that start on 16-byte cells:
//! the ring's 8-byte header word, whose reserved high 16 bits name the
//! producer's slot, then the payload. A producer reserves a record's cells
//! with one compare-and-swap of the reservation word, writes the payload
//! and then the header with release ordering; the consumer polls the header
//! word at its own index. Producers commit out of order (each in its own
//! reserved space) and the consumer takes records in the order of their
//! reservations: a slot's records arrive in the order it sent them.
//!
//! A stale word can never pass for a header: the consumer zeroes the space
//! it releases before it publishes the index that hands it back, and a
//! producer writes into released space only after it read that index
//! (acquire). So every cell a record may start on reads zero until a
//! producer publishes a header there. (A ring clears the next header slot
//! from the producer instead; with several producers the next slot may be
//! another producer's header, already published.) The consumer hands space
//! back in batches ([`Consumer::release_quiet`], [`Consumer::flush`]), so
//! that the zeroing, whose stores each wait for a line the producer wrote,
//! does not sit in front of what the consumer sends next.
//!
//! Trust. The consumer's domain and the producers' domain do not trust each
//! other: every word either side reads from the region is read once into a
//! local and checked, and a violation breaks the queue with a named
//! [`Violation`] on the side that saw it. The producers of one queue are
//! the ranks of one job in one domain (one user, one VM): they share the
//! reservation word and can stall or spoil each other's records, which no
//! outsider can; the consumer takes from a record only what its header
//! bounds, and a record that names no producer slot breaks the queue
//! ([`Violation::BadSender`]). A producer that reserves space and never
//! fills it (a rank that died in between) leaves the consumer waiting at
//! that record: [`Consumer::blocked`] tells the layer above, which breaks
//! the queue when it learns that a producer of that domain is gone.

use crate::error::{Error, Result, Violation};
use crate::protocol;
use crate::record::{self, kind};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `"IVCQ"` little-endian.
pub const MAGIC: u32 = 0x5143_5649;
/// Wire-format version of receive queues.
pub const VERSION: u16 = 4;
/// Size of the control page that precedes the data area.
pub const CTRL_BYTES: usize = 4096;
/// Records start on cells of this many bytes: a small message's record
/// (8-byte header, up to 8 bytes of payload) takes one, four share a cache
/// line. (Cells of a whole line cost a small message a line transfer of its
/// own: 1.5x a ring's round trip and a third of its stream of 8-byte
/// records, against 1.1x and about 0.6 with 16-byte cells; docs/
/// PERFORMANCE.md.)
pub const CELL: usize = 16;
/// Smallest data area.
pub const MIN_DATA: usize = 4096;
/// Largest data area.
pub const MAX_DATA: usize = 1 << 30;
/// Most producer slots of one queue (one waiting bit each).
pub const MAX_SLOTS: usize = 256;

/// Offsets in the control page.
pub const OFF_MAGIC: usize = 0x00; // magic u32, version u16, slots u16
/// data_size u32, max_record u32.
pub const OFF_GEOMETRY: usize = 0x08;
/// u64 nonce, written by the creator.
pub const OFF_NONCE: usize = 0x10;
/// Reservation word: free-running byte index of the next free cell (producers).
pub const OFF_RESERVE: usize = 0x40;
/// Consumer index: free-running byte index of the next record (consumer).
pub const OFF_CONS: usize = 0x80;
/// Doorbell word of the host backend (futex; wakes the consumer).
pub const OFF_BELL: usize = 0xC0;
/// Consumer-waiting flag (consumer sets, a producer clears and rings).
pub const OFF_CONS_WAITING: usize = 0x100;
/// Closed flag (the consumer closed the queue).
pub const OFF_CLOSED: usize = 0x140;
/// Producers-waiting bits: `MAX_SLOTS / 64` words (a producer sets its own
/// bit; the consumer clears them all and rings those producers).
pub const OFF_PROD_WAITING: usize = 0x180;
/// Consumer-polls flag: non-zero, the consumer never sleeps on its doorbell
/// (it polls), so a commit needs no fence and no look at its waiting flag.
pub const OFF_CONS_POLLS: usize = 0x1C0;
/// Producers-poll bits, `MAX_SLOTS / 64` words: a producer sets its own bit
/// once, before its first record, when it never sleeps for room; the
/// consumer publishes its index without a fence while every producer it
/// admitted has its bit set.
pub const OFF_PROD_POLLS: usize = 0x200;
/// Doorbell words of the host backend, one per producer slot: the 32-bit
/// word of slot `s` at `OFF_SLOT_BELLS + 4 * s` (futex; the consumer bumps
/// it to wake that producer, which sleeps on it for room).
pub const OFF_SLOT_BELLS: usize = 0x400;

/// Words of producers-waiting bits.
const WAIT_WORDS: usize = MAX_SLOTS / 64;
/// Producers to ring after a publication of the consumer index: bit
/// `s % 64` of word `s / 64` for slot `s` (the waiting bits it cleared).
pub type Wake = [u64; WAIT_WORDS];
/// Released bytes after which a consumer that takes records with
/// [`Consumer::release_quiet`] hands them back ([`Consumer::flush`]) even
/// while records keep coming (it also does when it finds nothing to take).
pub const BATCH_BYTES: u64 = 4096;
/// Compare-and-swap attempts a reservation makes before it reports the
/// queue full for now (the other producers, or a consumer that scribbles
/// on the word, took them all); the caller comes back as it does for a
/// full queue.
const CAS_TRIES: u32 = 64;

const fn cells(n: usize) -> usize {
    (n + CELL - 1) & !(CELL - 1)
}

/// Shape of a queue: data area size, largest record payload, and how many
/// producer slots it has. Agreed by both sides; the consumer writes it to
/// the control page and every producer checks it there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes in the data area (a power of two).
    pub data_size: usize,
    /// Largest record payload.
    pub max_record: usize,
    /// Producer slots (1 to [`MAX_SLOTS`]).
    pub slots: usize,
}

impl Geometry {
    /// A geometry, checked: a power-of-two data area from [`MIN_DATA`] to
    /// [`MAX_DATA`], a largest record whose cells fill at most half of it,
    /// 1 to [`MAX_SLOTS`] slots.
    pub fn new(data_size: usize, max_record: usize, slots: usize) -> Result<Geometry> {
        if !data_size.is_power_of_two() || !(MIN_DATA..=MAX_DATA).contains(&data_size) {
            return Err(Error::Invalid(format!(
                "queue data size {data_size} is not a power of two from {MIN_DATA} to {MAX_DATA}"
            )));
        }
        if max_record > u32::MAX as usize || cells(record::HEADER + max_record) > data_size / 2 {
            return Err(Error::Invalid(format!(
                "queue record of {max_record} bytes does not fit twice in {data_size}"
            )));
        }
        if !(1..=MAX_SLOTS).contains(&slots) {
            return Err(Error::Invalid(format!(
                "queue of {slots} producer slots (1 to {MAX_SLOTS})"
            )));
        }
        Ok(Geometry {
            data_size,
            max_record,
            slots,
        })
    }

    /// The geometry of a queue of `data_size` bytes with [`MAX_SLOTS`]
    /// slots whose records are as large as `record`, and at most what
    /// fits twice in the data area (half of it less a header, in whole
    /// cells).
    pub fn with_records_up_to(data_size: usize, record: usize) -> Result<Geometry> {
        let half = (data_size / 2).saturating_sub(record::HEADER) & !(CELL - 1);
        Geometry::new(data_size, record.min(half), MAX_SLOTS)
    }

    /// Bytes of the whole region: control page and data area.
    pub fn region_bytes(&self) -> usize {
        CTRL_BYTES + self.data_size
    }

    /// Bytes a record of `len` payload bytes occupies (header and payload,
    /// rounded up to whole cells).
    pub fn record_bytes(len: usize) -> usize {
        cells(record::HEADER + len)
    }

    fn header_word(&self) -> u64 {
        MAGIC as u64 | (VERSION as u64) << 32 | (self.slots as u64) << 48
    }

    fn geometry_word(&self) -> u64 {
        self.data_size as u64 | (self.max_record as u64) << 32
    }
}

/// Raw view of a queue in mapped memory; holds no ownership (whoever
/// creates a producer or consumer keeps the mapping alive).
#[derive(Clone, Copy)]
struct View {
    base: *mut u8,
    geo: Geometry,
}

impl View {
    #[inline(always)]
    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is an 8-aligned offset inside the control page,
        // mapped while the view is used; atomics are valid on shared memory.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    #[inline(always)]
    fn size(&self) -> u64 {
        self.geo.data_size as u64
    }

    /// The offset in the data area of the free-running index `at` (the
    /// data size is a power of two, which [`Geometry::new`] checks: a
    /// mask, where `%` by a size the compiler cannot see is a division,
    /// tens of cycles at every record).
    #[inline(always)]
    fn offset(&self, at: u64) -> u64 {
        at & (self.size() - 1)
    }

    /// The first word of the cell at offset `off` of the data area: where a
    /// record's header is published.
    #[inline(always)]
    fn cell(&self, off: u64) -> &AtomicU64 {
        debug_assert!(off < self.size() && (off as usize).is_multiple_of(CELL));
        // SAFETY: `off` is a cell offset inside the data area (callers take
        // it modulo the data size), which follows the control page inside
        // the mapping; the peer may write it concurrently, hence an atomic.
        unsafe { &*(self.base.add(CTRL_BYTES + off as usize) as *const AtomicU64) }
    }

    /// The payload of the record whose header is at `off`.
    ///
    /// # Safety
    /// The record (header and payload) lies inside the data area.
    #[inline(always)]
    unsafe fn payload(&self, off: u64) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.base.add(CTRL_BYTES + off as usize + record::HEADER) }
    }

    /// Zeroes `n` bytes of the data area from offset `off`.
    ///
    /// # Safety
    /// `[off, off + n)` lies inside the data area and is released space:
    /// no honest producer reads or writes it until the consumer publishes
    /// an index past it.
    /// `n` is a multiple of the cell size: up to 256 bytes (a few small
    /// records) the cells are cleared with a store each, inline (a call
    /// to `memset` and its size dispatch cost more); more with `memset`.
    #[inline(always)]
    unsafe fn zero(&self, off: u64, n: u64) {
        debug_assert!(n.is_multiple_of(CELL as u64));
        // SAFETY: forwarded contract (inside the mapping, nobody else's).
        let p = unsafe { self.base.add(CTRL_BYTES + off as usize) };
        if n <= 256 {
            let mut at = 0;
            while at < n as usize {
                // SAFETY: a whole cell of the range (n is whole cells).
                unsafe { p.add(at).cast::<[u64; 2]>().write_unaligned([0; 2]) };
                at += CELL;
            }
        } else {
            // SAFETY: as above.
            unsafe { ptr::write_bytes(p, 0, n as usize) }
        }
    }

    /// The padding a record of `need` bytes reserved at the free-running
    /// index `r` takes first: the rest of the data area when the record
    /// would not fit before its end, else none.
    #[inline(always)]
    fn padding(&self, r: u64, need: u64) -> u64 {
        let off = self.offset(r);
        if off + need > self.size() {
            self.size() - off
        } else {
            0
        }
    }

    /// The bytes a consumer passes at padding or skipped space
    /// ([`kind::SKIP`]) of `len` at the free-running index `at` (offset
    /// `off`), bounded as every consumer bounds them: padding runs exactly
    /// to the end of the data area and never from offset 0 (it would lead
    /// the consumer around a whole lap); skipped space takes a record's
    /// cells at most, within the data area; either ends by `limit`, the
    /// producers' bound. `Ok(None)`: kind `k` is neither.
    #[inline(always)]
    fn passed(
        &self,
        k: u8,
        len: usize,
        off: u64,
        at: u64,
        limit: u64,
    ) -> std::result::Result<Option<u64>, Violation> {
        let size = self.size();
        if k == kind::PAD {
            if off == 0 || len as u64 != size - off - 8 || at + (size - off) > limit {
                return Err(Violation::BadPadding);
            }
            return Ok(Some(size - off));
        }
        if k == kind::SKIP {
            let bytes = Geometry::record_bytes(len) as u64;
            let most = Geometry::record_bytes(self.geo.max_record) as u64;
            if bytes > most || off + bytes > size || at + bytes > limit {
                return Err(Violation::BadLength);
            }
            return Ok(Some(bytes));
        }
        Ok(None)
    }

    /// The bytes a record of `len` payload bytes at the free-running index
    /// `at` (offset `off`) takes, when it is no larger than the largest
    /// record and lies within the data area and `limit`, the producers'
    /// bound; `None` otherwise (`BadLength`).
    #[inline(always)]
    fn record_span(&self, len: usize, off: u64, at: u64, limit: u64) -> Option<u64> {
        let bytes = Geometry::record_bytes(len) as u64;
        (len <= self.geo.max_record && off + bytes <= self.size() && at + bytes <= limit)
            .then_some(bytes)
    }

    /// Slot `s`'s word and bit in the bit set at `off` (producers
    /// waiting, producers that poll).
    #[inline(always)]
    fn slot_bit(&self, off: usize, s: usize) -> (&AtomicU64, u64) {
        (self.word(off + 8 * (s / 64)), 1u64 << (s % 64))
    }

    fn bell(&self) -> *const AtomicU32 {
        // SAFETY: in bounds of the control page, 4-aligned.
        unsafe { self.base.add(OFF_BELL) as *const AtomicU32 }
    }

    /// Slot `s`'s doorbell word (host backend).
    fn slot_bell(&self, s: usize) -> *const AtomicU32 {
        debug_assert!(s < MAX_SLOTS);
        // SAFETY: `OFF_SLOT_BELLS + 4 * s` lies inside the control page
        // for every slot below MAX_SLOTS, 4-aligned.
        unsafe { self.base.add(OFF_SLOT_BELLS + 4 * s) as *const AtomicU32 }
    }

    fn check(&self) -> Result<()> {
        let h = self.word(OFF_MAGIC).load(Ordering::Relaxed);
        let g = self.word(OFF_GEOMETRY).load(Ordering::Relaxed);
        if h as u32 != MAGIC {
            return Err(Violation::BadMagic.into());
        }
        if h != self.geo.header_word() {
            return Err(Violation::BadVersion.into());
        }
        if g != self.geo.geometry_word() {
            return Err(Violation::BadGeometry.into());
        }
        Ok(())
    }
}

/// Writes a fresh queue's control page (the consumer's side, which creates
/// and grants the region). The data area must read zero (fresh pages).
///
/// # Safety
/// `base` points to a writable mapping of at least `geo.region_bytes()`
/// bytes, 8-aligned, that nobody else uses yet.
pub unsafe fn init(base: *mut u8, geo: Geometry, nonce: u64) {
    // SAFETY: the control page is inside the mapping (contract).
    unsafe { ptr::write_bytes(base, 0, CTRL_BYTES) };
    let v = View { base, geo };
    v.word(OFF_GEOMETRY)
        .store(geo.geometry_word(), Ordering::Relaxed);
    v.word(OFF_NONCE).store(nonce, Ordering::Relaxed);
    v.word(OFF_MAGIC)
        .store(geo.header_word(), Ordering::Release);
}

/// One producer of a queue: a process of the peer domain, in its slot.
pub struct Producer {
    v: View,
    slot: u16,
    /// Consumer index last read (acquire), checked.
    cons: u64,
    /// The consumer declared that it polls ([`Producer::learn_peer`]).
    peer_polls: bool,
    broken: Option<Violation>,
}

// SAFETY: the producer owns its view of the shared pages; moving it to
// another thread moves that exclusive use with it.
unsafe impl Send for Producer {}

/// Where [`Producer::reserve`] put a record: its payload, to be filled,
/// then published with [`Producer::commit`].
#[derive(Debug)]
pub struct Reservation {
    off: u64,
    len: usize,
    payload: *mut u8,
}

// SAFETY: the reserved space is this producer's alone until it is
// committed or cancelled; the reservation moves with the producer that
// holds the mapping.
unsafe impl Send for Reservation {}

impl Reservation {
    /// The payload bytes to fill (exactly the length reserved).
    pub fn payload(&self) -> *mut u8 {
        self.payload
    }
}

impl Producer {
    /// Attaches to a queue as the producer of `slot`, after checking the
    /// control page against the agreed geometry.
    ///
    /// # Safety
    /// `base` points to a mapping of at least `geo.region_bytes()` bytes,
    /// 8-aligned, that stays mapped while the producer is used.
    pub unsafe fn attach(base: *mut u8, geo: Geometry, slot: usize) -> Result<Producer> {
        if slot >= geo.slots {
            return Err(Error::Invalid(format!(
                "producer slot {slot} of a queue of {}",
                geo.slots
            )));
        }
        let v = View { base, geo };
        v.check()?;
        Ok(Producer {
            v,
            slot: slot as u16,
            cons: 0,
            peer_polls: false,
            broken: None,
        })
    }

    /// Declares that this producer never sleeps waiting for room (it polls
    /// or naps): its bit of the producers-poll words. Call before the first
    /// record, before the consumer admits this slot.
    pub fn declare_polling(&self) {
        let (w, bit) = self.bit(OFF_PROD_POLLS);
        w.fetch_or(bit, Ordering::Release);
    }

    /// Reads, once, whether the consumer declared that it never sleeps
    /// (after the consumer set up the queue, before the first commit): then
    /// a commit is the header's release store alone. A consumer that
    /// declares it and sleeps all the same only delays itself (its sleeps
    /// are time-limited).
    pub fn learn_peer(&mut self) {
        self.peer_polls = self.v.word(OFF_CONS_POLLS).load(Ordering::Acquire) != 0;
    }

    /// The slot this producer writes in.
    pub fn slot(&self) -> usize {
        self.slot as usize
    }

    /// The nonce the consumer wrote when it created the queue (read once;
    /// a mapper echoes it to prove it maps the same memory).
    pub fn nonce(&self) -> u64 {
        self.v.word(OFF_NONCE).load(Ordering::Acquire)
    }

    fn fail(&mut self, v: Violation) -> Error {
        self.broken = Some(v);
        Error::Broken(v)
    }

    /// Reads the consumer index (acquire: the consumer cleared the cells it
    /// released before it stored the index), then the reservation word,
    /// which is therefore at least that index, then the consumer index
    /// again, and checks them: the consumer is never ahead of what was
    /// reserved, nor back from where it was, and nothing was reserved more
    /// than the data area past the second reading. (Against the first
    /// reading that last bound does not hold: between the two loads the
    /// consumer may release and another producer reserve what it released.
    /// Each reservation ends at most the data area past an index its
    /// producer read before its compare-and-swap, whose release this
    /// acquire load sees, so the second reading is at least that index.)
    /// Returns the fresh reservation word.
    fn reload_cons(&mut self) -> Result<u64> {
        let c = self.v.word(OFF_CONS).load(Ordering::Acquire);
        let r = self.v.word(OFF_RESERVE).load(Ordering::Acquire);
        let c2 = self.v.word(OFF_CONS).load(Ordering::Relaxed);
        if c > r
            || c2 < c
            || r > c2.saturating_add(self.v.size())
            || !c.is_multiple_of(CELL as u64)
            || c < self.cons
        {
            return Err(self.fail(Violation::BadIndex));
        }
        self.cons = c;
        Ok(r)
    }

    /// Reserves room for a record of `len` payload bytes. `Ok(None)`: the
    /// queue is full for now (come back, or sleep with
    /// [`Producer::prepare_sleep`]). A record that does not fit before the
    /// end of the data area is preceded by a padding record to the end,
    /// published here.
    pub fn reserve(&mut self, len: usize) -> Result<Option<Reservation>> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        if len > self.v.geo.max_record {
            return Err(Error::TooLarge {
                len,
                max: self.v.geo.max_record,
            });
        }
        let size = self.v.size();
        let need = Geometry::record_bytes(len) as u64;
        let v = self.v;
        let word = v.word(OFF_RESERVE);
        let mut r = word.load(Ordering::Relaxed);
        let mut reloaded = false;
        for _ in 0..CAS_TRIES {
            if !r.is_multiple_of(CELL as u64) {
                return Err(self.fail(Violation::BadIndex));
            }
            let off = v.offset(r);
            let pad = self.v.padding(r, need);
            let Some(end) = r.checked_add(pad + need) else {
                return Err(self.fail(Violation::BadIndex));
            };
            if end > self.cons + size {
                if reloaded {
                    return Ok(None);
                }
                if self.v.word(OFF_CLOSED).load(Ordering::Acquire) != 0 {
                    return Err(Error::Closed);
                }
                r = self.reload_cons()?;
                reloaded = true;
                continue;
            }
            // Release: a producer that reads this word (`reload_cons`)
            // then reads the consumer index at least as far as this one
            // had when it reserved.
            match word.compare_exchange_weak(r, end, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => {
                    if pad != 0 {
                        // Padding to the end, published at once: nothing to
                        // fill. `pad` is at least one cell (`off` < size).
                        let h = record::encode((pad - 8) as u32, kind::PAD, 0)
                            | (self.slot as u64) << 48;
                        self.v.cell(off).store(h, Ordering::Release);
                    }
                    let at = v.offset(r + pad);
                    return Ok(Some(Reservation {
                        off: at,
                        len,
                        // SAFETY: `at + need` <= size: the record fits before
                        // the end of the data area (padding otherwise).
                        payload: unsafe { self.v.payload(at) },
                    }));
                }
                Err(now) => {
                    r = now;
                    reloaded = false;
                }
            }
        }
        Ok(None)
    }

    /// Whether a record of `len` payload bytes finds room now (a hint:
    /// other producers may take the room before this one reserves it).
    /// Reads the consumer index.
    pub fn fits(&mut self, len: usize) -> Result<bool> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        if len > self.v.geo.max_record {
            return Ok(false);
        }
        let size = self.v.size();
        let need = Geometry::record_bytes(len) as u64;
        let r = self.reload_cons()?;
        Ok(r.saturating_add(self.v.padding(r, need) + need) <= self.cons + size)
    }

    /// Publishes a reserved record: its header word, with release ordering
    /// (the payload written before it is visible to a consumer that reads
    /// the header). Returns whether the consumer announced that it sleeps:
    /// if so the caller rings the consumer's doorbell once.
    #[inline]
    pub fn commit(&mut self, res: Reservation, kind: u8, tag: u8) -> bool {
        let len = res.len;
        self.commit_len(res, len, kind, tag)
    }

    /// [`Producer::commit`] of the reservation's first `len` bytes (at most
    /// what was reserved): cells reserved past the record are given back
    /// as a [`kind::SKIP`] record, stored before the record's header is
    /// published (a consumer that reads the header sees it).
    #[inline(always)]
    pub fn commit_len(&mut self, res: Reservation, len: usize, kind: u8, tag: u8) -> bool {
        debug_assert!(kind::valid(kind));
        assert!(
            len <= res.len,
            "commit of {len} bytes exceeds the reservation of {}",
            res.len
        );
        let used = Geometry::record_bytes(len) as u64;
        let rest = Geometry::record_bytes(res.len) as u64 - used;
        if rest != 0 {
            // Relaxed: the record's header, stored below with release, is
            // what the consumer reads (acquire) before it looks here.
            let h = self.skip_header(rest);
            self.v.cell(res.off + used).store(h, Ordering::Relaxed);
        }
        let h = record::encode(len as u32, kind, tag) | (self.slot as u64) << 48;
        self.publish(res.off, h)
    }

    /// Gives a reservation back unused: publishes it whole as a
    /// [`kind::SKIP`] record, which the consumer passes (a producer cannot
    /// take back space that others may have reserved after it). Returns
    /// whether the consumer must be rung, as [`Producer::commit`].
    pub fn cancel(&mut self, res: Reservation) -> bool {
        let h = self.skip_header(Geometry::record_bytes(res.len) as u64);
        self.publish(res.off, h)
    }

    /// The header of a [`kind::SKIP`] record of `bytes` bytes (a multiple
    /// of the cell), this producer's slot in it.
    fn skip_header(&self, bytes: u64) -> u64 {
        record::encode((bytes - 8) as u32, kind::SKIP, 0) | (self.slot as u64) << 48
    }

    /// Stores the header word `h` at `off`, publishing what precedes it.
    #[inline]
    fn publish(&mut self, off: u64, h: u64) -> bool {
        let header = self.v.cell(off);
        if self.peer_polls {
            // Nobody to ring: the header's release store publishes it.
            header.store(h, Ordering::Release);
            return false;
        }
        // The rings' publish: the header is the word this side stores.
        protocol::publish(header, h, self.v.word(OFF_CONS_WAITING))
    }

    /// Reserves, copies `parts` in one after the other and commits: a
    /// record of their total length. `Ok(None)`: full for now; otherwise
    /// whether the caller must ring the consumer.
    pub fn push(&mut self, kind: u8, tag: u8, parts: &[&[u8]]) -> Result<Option<bool>> {
        let len = parts.iter().map(|p| p.len()).sum();
        let Some(res) = self.reserve(len)? else {
            return Ok(None);
        };
        let mut at = res.payload();
        for p in parts {
            // SAFETY: the reservation holds `len` bytes, the sum of the parts.
            unsafe {
                ptr::copy_nonoverlapping(p.as_ptr(), at, p.len());
                at = at.add(p.len());
            }
        }
        Ok(Some(self.commit(res, kind, tag)))
    }

    /// [`Producer::push`] of a record of two pieces in its commonest case,
    /// with nothing that can fail and no call: the consumer polls (nobody
    /// to ring), the record fits before the end of the data area (no
    /// padding) and in the room the last consumer index read leaves, and
    /// the reservation word's one compare-and-swap succeeds. `true`: the
    /// record is published; `false`: nothing was done, and
    /// [`Producer::push`] decides (it reloads and checks what this path
    /// only compares). `SMALL`: both pieces are at most
    /// [`crate::ring::SMALL_PIECE`] bytes (the caller checked).
    #[inline(always)]
    pub fn push2_fast<const SMALL: bool>(
        &mut self,
        kind: u8,
        tag: u8,
        head: &[u8],
        body: &[u8],
    ) -> bool {
        let len = head.len() + body.len();
        if self.broken.is_some() || !self.peer_polls || len > self.v.geo.max_record {
            return false;
        }
        let size = self.v.size();
        let need = Geometry::record_bytes(len) as u64;
        let word = self.v.word(OFF_RESERVE);
        let r = word.load(Ordering::Relaxed);
        let off = r & (size - 1);
        // (a word that is no multiple of a cell, or past what the consumer
        // index allows, is the general path's to report)
        if !r.is_multiple_of(CELL as u64)
            || off + need > size
            || r.wrapping_add(need) > self.cons.wrapping_add(size)
            || r < self.cons
        {
            return false;
        }
        // Release: as in `reserve`.
        if word
            .compare_exchange_weak(r, r + need, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // SAFETY: `off + need` <= size: the record lies in the data area,
        // reserved by the swap above for this producer alone; the caller's
        // slices cannot overlap shared pages they do not point into.
        let payload = unsafe { self.v.payload(off) };
        // SAFETY: as above.
        unsafe { crate::ring::copy_pieces::<SMALL>(head, body, payload) };
        // (the consumer polls: the header's release store alone)
        let _ = self.commit(Reservation { off, len, payload }, kind, tag);
        true
    }

    /// Announces that this producer sleeps until the consumer index moves
    /// (its waiting bit; the consumer clears the bits when it releases and
    /// rings those producers). `true`: sleep (the consumer will ring);
    /// `false`: room came meanwhile, do not sleep.
    pub fn prepare_sleep(&mut self) -> bool {
        let (w, bit) = self.bit(OFF_PROD_WAITING);
        protocol::prepare_sleep_bit(
            w,
            bit,
            self.v.word(OFF_CONS),
            self.cons,
            self.v.word(OFF_CLOSED),
        )
    }

    /// Withdraws the sleep announcement after waking.
    pub fn finish_sleep(&mut self) {
        let (w, bit) = self.bit(OFF_PROD_WAITING);
        protocol::finish_sleep_bit(w, bit);
    }

    /// This slot's word and bit in the bit set at `off` (waiting or polls).
    fn bit(&self, off: usize) -> (&AtomicU64, u64) {
        self.v.slot_bit(off, self.slot as usize)
    }

    /// The host backend's doorbell word of the queue (wakes the consumer).
    pub fn bell(&self) -> *const AtomicU32 {
        self.v.bell()
    }

    /// The host backend's doorbell word of this producer's slot (it sleeps
    /// on it for room; the consumer rings it).
    pub fn slot_bell(&self) -> *const AtomicU32 {
        self.v.slot_bell(self.slot as usize)
    }
}

/// A record the consumer found: the producer slot that wrote it, its kind
/// and tag, and its payload in the shared pages (which the producers may
/// still write: copy before parsing).
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// Producer slot named by the header (checked below the slot count).
    pub slot: usize,
    /// Record kind ([`kind::MSG`], [`kind::FIRST`], [`kind::MORE`],
    /// [`kind::CTRL`]).
    pub kind: u8,
    /// Tag of the layer above.
    pub tag: u8,
    /// Payload in the shared pages.
    pub ptr: *const u8,
    /// Payload length (at most the geometry's largest record).
    pub len: usize,
    bytes: u64,
}

impl Record {
    /// The bytes the record takes in the data area (header and payload in
    /// whole cells).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A look at a queue's cells apart from its consumer: whether a record is
/// published at an index, for a poller that asks without taking the
/// consumer (a hint: the answer may be stale by the time it is used).
#[derive(Clone, Copy)]
pub struct Watch {
    v: View,
}

// SAFETY: the view only loads cells atomically; whoever holds the watch
// keeps the mapping alive (as for the consumer it came from).
unsafe impl Send for Watch {}
// SAFETY: as above: atomic loads only.
unsafe impl Sync for Watch {}

impl Watch {
    /// Whether the cell at the free-running index `index` (a multiple of
    /// the cell size) holds a header.
    #[inline]
    pub fn published_at(&self, index: u64) -> bool {
        self.v.cell(self.v.offset(index)).load(Ordering::Acquire) != 0
    }
}

/// The consumer of a queue: the process that created and granted it.
pub struct Consumer {
    v: View,
    /// Own index: free-running byte count of the next record.
    idx: u64,
    /// Bytes of the record handed out by `peek` and not yet released.
    held: u64,
    /// The index last published.
    published: u64,
    /// Some admitted producer may sleep for room ([`Consumer::learn_peers`]):
    /// publishing the index then fences and collects the waiting bits.
    sleepers: bool,
    broken: Option<Violation>,
}

// SAFETY: as for the producer.
unsafe impl Send for Consumer {}

impl Consumer {
    /// The consumer of a queue whose control page [`init`] wrote.
    ///
    /// # Safety
    /// `base` points to a mapping of at least `geo.region_bytes()` bytes,
    /// 8-aligned, that stays mapped while the consumer is used.
    pub unsafe fn new(base: *mut u8, geo: Geometry) -> Result<Consumer> {
        let v = View { base, geo };
        v.check()?;
        Ok(Consumer {
            v,
            idx: 0,
            held: 0,
            published: 0,
            sleepers: true,
            broken: None,
        })
    }

    /// Declares that this consumer never sleeps waiting for records (it
    /// polls). Call before the producers attach ([`Producer::learn_peer`]).
    pub fn declare_polling(&self) {
        self.v.word(OFF_CONS_POLLS).store(1, Ordering::Release);
    }

    /// Learns which producers may sleep for room, from the slots admitted
    /// so far (each declared, or not, before it was admitted: call after
    /// every admission with all of them). While none may, publishing the
    /// index is one release store; a producer that declared polling and
    /// sleeps all the same only delays itself. Until the first call every
    /// producer counts as one that may sleep.
    pub fn learn_peers(&mut self, admitted: impl IntoIterator<Item = usize>) {
        let mut sleepers = false;
        for s in admitted {
            if s >= self.v.geo.slots {
                continue;
            }
            let (w, bit) = self.v.slot_bit(OFF_PROD_POLLS, s);
            sleepers |= w.load(Ordering::Acquire) & bit == 0;
        }
        self.sleepers = sleepers;
    }

    /// Breaks the queue for good with `v`.
    pub fn poison(&mut self, v: Violation) -> Error {
        self.broken = Some(v);
        Error::Broken(v)
    }

    /// The next record, if one is published: `Ok(None)` while the cell at
    /// the consumer's index reads zero, and while the consumer has taken a
    /// whole data area since it last handed space back (nothing can follow
    /// until it does: [`Consumer::flush`]). Padding and skipped space
    /// ([`kind::SKIP`]) are passed here. The record stays the consumer's
    /// until [`Consumer::release`]; peeking again before that returns it
    /// again.
    ///
    /// No honest record or padding ends past the last published index plus
    /// the data area (producers reserve against that index): one that does
    /// breaks the queue, so the consumer never reads space it took and has
    /// not zeroed yet.
    pub fn peek(&mut self) -> Result<Option<Record>> {
        let mut at = self.idx;
        let r = self.record_at(&mut at);
        // Padding and skips passed stay passed (released with the record,
        // or by the next flush when none follows).
        self.idx = at;
        let r = r?;
        if let Some(r) = &r {
            self.held = r.bytes;
        }
        Ok(r)
    }

    /// The record after those held since the last [`Consumer::peek`], when
    /// one is published and `accept` takes it: it is held with them (one
    /// release hands all of them back, [`Consumer::release_last_quiet`]).
    /// `Ok(None)`, nothing changed, when there is none or `accept` refuses
    /// it: the next [`Consumer::peek`] after the release returns it. For a
    /// caller that hands several records up in place at once. Call only
    /// while `peek` has a record held. Since [`Consumer::peek_run`] took
    /// over that caller's work, only the tests call it: it is the
    /// reference that `peek_run` is checked against.
    #[cfg(test)]
    pub fn peek_next(&mut self, accept: impl FnOnce(&Record) -> bool) -> Result<Option<Record>> {
        debug_assert!(self.held > 0, "peek_next without a record held");
        let mut at = self.idx + self.held;
        let Some(r) = self.record_at(&mut at)? else {
            return Ok(None);
        };
        if !accept(&r) {
            return Ok(None);
        }
        self.held = at + r.bytes - self.idx;
        Ok(Some(r))
    }

    /// The run of records from the consumer's index that are whole
    /// messages (`MSG`) of `slot` with a tag below `tag_limit`, padding
    /// and skipped space among them passed: up to `max` records, and past
    /// the first only while the run holds less than `max_bytes`. Each goes
    /// to `put` (its place in the run, from 0, and the record), and all of
    /// them are held as [`Consumer::peek`] holds a record: one
    /// [`Consumer::release_last_quiet`] releases the run.
    /// Returns how many; 0, with nothing changed, when the first record is
    /// none of those, is not there yet, or is not bounded as `peek` says
    /// (the next `peek` finds it, and breaks the queue for a bad one).
    ///
    /// What `peek` and then a look at each next record would do for such
    /// a run (the tests' `peek_next`), in one loop:
    /// each header read once, the checks of a message record only, the
    /// bound on the run computed once. The fast way for a consumer that
    /// hands its records up in place (a queue link's messages, 16 at a
    /// time: half the instructions a record of the two calls). Call with
    /// nothing held.
    #[inline(always)]
    pub fn peek_run(
        &mut self,
        slot: usize,
        tag_limit: u16,
        max: usize,
        max_bytes: u64,
        mut put: impl FnMut(usize, &Record),
    ) -> Result<usize> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        debug_assert_eq!(self.held, 0, "peek_run with a record held");
        let v = self.v;
        let limit = self.published + v.size();
        // The header's kind, tag and slot (bits 32 to 63) of a record
        // this run takes, the tag aside.
        let want = (u64::from(kind::MSG) | (slot as u64) << 16) as u32;
        let (mut at, mut n, mut bytes) = (self.idx, 0, 0);
        while n < max && (n == 0 || bytes < max_bytes) && at < limit {
            let off = v.offset(at);
            let h = v.cell(off).load(Ordering::Acquire);
            let (len, k, tag, _) = record::decode(h);
            if (h >> 32) as u32 & 0xffff_00ff != want || u16::from(tag) >= tag_limit {
                // Padding or skipped space, bounded as `record_at` bounds
                // it, is passed; anything else ends the run, nothing
                // published (a zero header: the end of most runs) first.
                if h != 0 && (h >> 48) < v.geo.slots as u64 {
                    if let Ok(Some(pass)) = v.passed(k, len, off, at, limit) {
                        at += pass;
                        continue;
                    }
                }
                break;
            }
            let Some(b) = v.record_span(len, off, at, limit) else {
                break;
            };
            put(
                n,
                &Record {
                    slot,
                    kind: k,
                    tag,
                    // SAFETY: `off + b` <= size: the record lies in the
                    // data area.
                    ptr: unsafe { v.payload(off) },
                    len,
                    bytes: b,
                },
            );
            at += b;
            bytes += b;
            n += 1;
        }
        if n > 0 {
            // The run, and whatever it passed before its first record.
            self.held = at - self.idx;
        }
        Ok(n)
    }

    /// The record at the free-running index `*at`, the padding and skips
    /// before it passed (`*at` moves past it), bounded as
    /// [`Consumer::peek`] says.
    fn record_at(&mut self, at: &mut u64) -> Result<Option<Record>> {
        if let Some(v) = self.broken {
            return Err(Error::Broken(v));
        }
        let size = self.v.size();
        let limit = self.published + size;
        loop {
            if *at >= limit {
                return Ok(None);
            }
            let off = self.v.offset(*at);
            let h = self.v.cell(off).load(Ordering::Acquire);
            if h == 0 {
                return Ok(None);
            }
            let (len, k, tag, slot) = record::decode(h);
            if slot as usize >= self.v.geo.slots {
                return Err(self.poison(Violation::BadSender));
            }
            match self.v.passed(k, len, off, *at, limit) {
                Ok(Some(pass)) => {
                    *at += pass;
                    continue;
                }
                Ok(None) => {}
                Err(v) => return Err(self.poison(v)),
            }
            if !kind::valid(k) {
                return Err(self.poison(Violation::BadType));
            }
            let Some(bytes) = self.v.record_span(len, off, *at, limit) else {
                return Err(self.poison(Violation::BadLength));
            };
            return Ok(Some(Record {
                slot: slot as usize,
                kind: k,
                tag,
                // SAFETY: `off + bytes` <= size: the record lies in the data
                // area.
                ptr: unsafe { self.v.payload(off) },
                len,
                bytes,
            }));
        }
    }

    /// Zeroes what was released since the last publication (records and
    /// padding passed), `[published, idx)` of the free-running index, before
    /// the index that hands it back is published: at least the first word
    /// of every cell must read zero, and zeroing whole bytes (wide stores)
    /// is cheaper than a store per cell. At most the whole data area (the
    /// consumer never passes a producer's reservation), in at most two
    /// pieces (the end of the area, then its start).
    fn clear_released(&self) {
        let size = self.v.size();
        let mut at = self.published;
        while at < self.idx {
            let off = self.v.offset(at);
            let n = (self.idx - at).min(size - off);
            // SAFETY: `off + n` <= size; the bytes were taken by this
            // consumer (records `peek` bounded, padding to the end) and are
            // not handed back yet.
            unsafe { self.v.zero(off, n) };
            at += n;
        }
    }

    /// Releases the record `peek` returned and hands back everything
    /// released so far: zeroes it, publishes the consumer index, and returns the producers that announced they sleep
    /// for room (their waiting bits, cleared: ring each once), as a bit set
    /// of slots in `MAX_SLOTS / 64` words.
    pub fn release(&mut self, rec: &Record) -> Wake {
        self.release_quiet(rec);
        self.flush()
    }

    /// Releases the record `peek` returned without handing its space back:
    /// that (clearing its cells, then publishing the index) waits for the
    /// next [`Consumer::flush`], one for a batch of records, and off the
    /// path of the record just taken (the clearing stores would otherwise
    /// queue, on a machine that makes stores visible in order, in front of
    /// whatever the consumer sends next, each waiting for its line).
    pub fn release_quiet(&mut self, rec: &Record) {
        debug_assert_eq!(rec.bytes, self.held);
        self.idx += rec.bytes;
        self.held = 0;
    }

    /// Releases the record the last [`Consumer::peek`] returned, or the
    /// run [`Consumer::peek_run`] took, as
    /// [`Consumer::release_quiet`] does, for a caller that kept no copy of
    /// them (the lengths they were validated with, never read again).
    pub fn release_last_quiet(&mut self) {
        self.idx += self.held;
        self.held = 0;
    }

    /// A look at this queue's cells for pollers that do not hold the
    /// consumer; valid as long as the consumer's mapping.
    pub fn watch(&self) -> Watch {
        Watch { v: self.v }
    }

    /// Whether a record `peek` returned is not released yet.
    pub fn holds(&self) -> bool {
        self.held != 0
    }

    /// Bytes released and not yet published.
    pub fn unpublished(&self) -> u64 {
        self.idx - self.published
    }

    /// Hands back what was released since the last publication (zeroes it,
    /// publishes the index) and returns the producers to ring (as
    /// [`Consumer::release`]). A consumer that releases with
    /// [`Consumer::release_quiet`] calls it once [`Consumer::unpublished`]
    /// reaches [`BATCH_BYTES`], whenever [`Consumer::peek`] finds nothing,
    /// and before it sleeps: producers waiting for room wait for it.
    pub fn flush(&mut self) -> Wake {
        if self.published == self.idx {
            return [0; WAIT_WORDS];
        }
        self.publish(self.sleepers)
    }

    /// Clears what was released and publishes the consumer index (release:
    /// after the cleared cells); with `collect`, as the sleep protocol
    /// needs when a producer may sleep, fences and collects the waiting
    /// producers, else that store alone.
    fn publish(&mut self, collect: bool) -> Wake {
        self.clear_released();
        self.published = self.idx;
        let v = self.v;
        if !collect {
            v.word(OFF_CONS).store(self.idx, Ordering::Release);
            return [0; WAIT_WORDS];
        }
        protocol::publish_collect(
            v.word(OFF_CONS),
            self.idx,
            std::array::from_fn::<_, WAIT_WORDS, _>(|i| v.word(OFF_PROD_WAITING + 8 * i)),
        )
    }

    /// Whether anything is published at the consumer's index (a record,
    /// padding, skipped space: a hint, as [`Watch::published_at`]).
    pub fn more_waiting(&self) -> bool {
        self.watch().published_at(self.idx)
    }

    /// The size of the data area.
    pub fn data_size(&self) -> u64 {
        self.v.size()
    }

    /// Whether a producer reserved space at the consumer's index and has
    /// not published its record yet (the reservation word, a hint that the
    /// producers write, is past the index while the cell reads zero). A
    /// queue blocked for long, or blocked when a producer of its domain is
    /// known to be gone, is broken by the layer above.
    pub fn blocked(&self) -> bool {
        let r = self.v.word(OFF_RESERVE).load(Ordering::Relaxed);
        r > self.idx && self.v.cell(self.v.offset(self.idx)).load(Ordering::Relaxed) == 0
    }

    /// Announces that the consumer sleeps until a record is published at its
    /// index. `true`: sleep (the producer that publishes will ring);
    /// `false`: a record came meanwhile. Hand back what was released first
    /// ([`Consumer::flush`]): a producer waiting for that room would wait
    /// for this sleep to end.
    pub fn prepare_sleep(&mut self) -> bool {
        debug_assert_eq!(self.published, self.idx, "flush before sleeping");
        // The rings' announcement, over the header word at the index, whose
        // value seen is zero (nothing published).
        protocol::prepare_sleep(
            self.v.word(OFF_CONS_WAITING),
            self.v.cell(self.v.offset(self.idx)),
            0,
        )
    }

    /// Withdraws the sleep announcement after waking.
    pub fn finish_sleep(&mut self) {
        protocol::finish_sleep(self.v.word(OFF_CONS_WAITING));
    }

    /// Closes the queue: producers that find it full, or that would sleep,
    /// learn it ([`Error::Closed`]); returns the producers to ring.
    pub fn close(&mut self) -> Wake {
        self.v.word(OFF_CLOSED).store(1, Ordering::Release);
        self.publish(true)
    }

    /// The consumer's index (free-running bytes).
    pub fn index(&self) -> u64 {
        self.idx
    }

    /// The host backend's doorbell word of the queue.
    pub fn bell(&self) -> *const AtomicU32 {
        self.v.bell()
    }

    /// The host backend's doorbell word of producer slot `s` (below the
    /// queue's slot count).
    pub fn slot_bell(&self, s: usize) -> *const AtomicU32 {
        assert!(
            s < self.v.geo.slots,
            "slot {s} of a queue of {}",
            self.v.geo.slots
        );
        self.v.slot_bell(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    /// Zeroed, page-aligned memory standing in for a granted region.
    struct Region {
        p: *mut u8,
        l: Layout,
    }

    impl Region {
        fn new(geo: Geometry) -> Region {
            let l = Layout::from_size_align(geo.region_bytes(), 4096).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { alloc_zeroed(l) };
            assert!(!p.is_null());
            // SAFETY: fresh zeroed allocation of the region's size.
            unsafe { init(p, geo, 7) };
            Region { p, l }
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout.
            unsafe { dealloc(self.p, self.l) }
        }
    }

    fn take(c: &mut Consumer) -> Option<(usize, u8, Vec<u8>)> {
        let r = c.peek().unwrap()?;
        // SAFETY: the record's payload lies in the region.
        let v = unsafe { std::slice::from_raw_parts(r.ptr, r.len) }.to_vec();
        c.release(&r);
        Some((r.slot, r.tag, v))
    }

    #[test]
    fn geometry_bounds() {
        assert!(Geometry::new(4096, 2048 - 8, 1).is_ok());
        assert!(Geometry::new(4096, 2048, 1).is_err());
        assert!(Geometry::new(6000, 100, 1).is_err());
        assert!(Geometry::new(4096, 100, 0).is_err());
        assert!(Geometry::new(4096, 100, MAX_SLOTS + 1).is_err());
        assert_eq!(Geometry::record_bytes(0), 16);
        assert_eq!(Geometry::record_bytes(8), 16);
        assert_eq!(Geometry::record_bytes(9), 32);
        assert_eq!(Geometry::record_bytes(1016), 1024);
    }

    #[test]
    fn records_of_several_slots_arrive_in_reservation_order_across_laps() {
        let geo = Geometry::new(4096, 1000, 3).unwrap();
        let reg = Region::new(geo);
        // SAFETY: the region outlives producers and consumer.
        let mut ps: Vec<Producer> = (0..3)
            .map(|s| unsafe { Producer::attach(reg.p, geo, s) }.unwrap())
            .collect();
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        let mut n = 0u32;
        for round in 0..200u32 {
            let len = (round as usize * 37) % 1000;
            let s = (round % 3) as usize;
            let body: Vec<u8> = (0..len).map(|i| (i as u32 ^ round) as u8).collect();
            assert!(ps[s].push(kind::MSG, s as u8, &[&body]).unwrap().is_some());
            let (slot, tag, got) = take(&mut c).unwrap();
            assert_eq!((slot, tag as usize), (s, s));
            assert_eq!(got, body);
            n += 1;
        }
        assert_eq!(n, 200);
        assert!(take(&mut c).is_none());
        assert!(c.index() > 4 * 4096, "went round several laps");
    }

    /// One consumer step of the in-place path, as `take_own` takes runs:
    /// `Some` run of (offset in the data area, length, tag), empty when
    /// the next record is not one (it is then taken alone, as a poll
    /// would, and returned as `Err`). `fast`: with `peek_run`; else with
    /// `peek` and `peek_next`, as before it existed.
    #[allow(clippy::type_complexity)]
    fn run_step(
        c: &mut Consumer,
        base: *mut u8,
        fast: bool,
        slot: usize,
        limit: u16,
        max: usize,
        max_bytes: u64,
    ) -> Option<std::result::Result<Vec<(usize, usize, u8)>, (usize, usize, u8, u8)>> {
        let at = |r: &Record| r.ptr as usize - base as usize - CTRL_BYTES;
        let mut run = Vec::new();
        if fast {
            let n = c
                .peek_run(slot, limit, max, max_bytes, |i, r| {
                    assert_eq!(i, run.len());
                    run.push((at(r), r.len, r.tag));
                })
                .unwrap();
            assert_eq!(n, run.len());
        } else {
            let mine =
                |r: &Record| r.slot == slot && r.kind == kind::MSG && u16::from(r.tag) < limit;
            if let Some(r) = c.peek().unwrap() {
                if mine(&r) {
                    run.push((at(&r), r.len, r.tag));
                    let mut bytes = r.bytes();
                    while run.len() < max && bytes < max_bytes {
                        match c.peek_next(mine) {
                            Ok(Some(r)) => {
                                run.push((at(&r), r.len, r.tag));
                                bytes += r.bytes();
                            }
                            _ => break,
                        }
                    }
                } else {
                    c.release_last_quiet();
                    c.flush();
                    return Some(Err((at(&r), r.len, r.tag, r.kind)));
                }
            }
        }
        if run.is_empty() {
            if !fast {
                return None;
            }
            let r = c.peek().unwrap()?;
            c.release_last_quiet();
            c.flush();
            return Some(Err((at(&r), r.len, r.tag, r.kind)));
        }
        c.release_last_quiet();
        c.flush();
        Some(Ok(run))
    }

    #[test]
    fn a_run_taken_in_one_loop_is_the_run_that_peek_and_peek_next_take() {
        // Two queues fed the same records (several slots, tags above the
        // limit, fragments, padding at every lap's end, reservations given
        // back and committed shorter), one read with `peek_run`, the other
        // as before; every step must take the same records.
        let geo = Geometry::new(4096, 600, 3).unwrap();
        let (ra, rb) = (Region::new(geo), Region::new(geo));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // SAFETY: the regions outlive producers and consumers.
        let mut pa: Vec<Producer> = (0..3)
            .map(|s| unsafe { Producer::attach(ra.p, geo, s) }.unwrap())
            .collect();
        let mut pb: Vec<Producer> = (0..3)
            .map(|s| unsafe { Producer::attach(rb.p, geo, s) }.unwrap())
            .collect();
        let mut ca = unsafe { Consumer::new(ra.p, geo) }.unwrap();
        let mut cb = unsafe { Consumer::new(rb.p, geo) }.unwrap();
        let (mut runs, mut longest, mut alone, mut passed) = (0, 0, 0, 0);
        // Producers write in bursts of one slot, as ranks do.
        let mut s = 0;
        for step in 0..40_000u32 {
            if rnd(8) == 0 {
                s = rnd(3) as usize;
            }
            if rnd(4) != 0 {
                let len = if rnd(4) == 0 { rnd(601) } else { rnd(40) } as usize;
                let k = [kind::MSG, kind::FIRST, kind::MORE][rnd(12).saturating_sub(9) as usize];
                let tag = [1u8, 2, 3, 254][rnd(4) as usize];
                let body: Vec<u8> = (0..len).map(|i| (i as u32 ^ step) as u8).collect();
                let how = rnd(6);
                let extra = if how == 1 { 48.min(600 - len) } else { 0 };
                // Only where both queues have room: a run may pass the
                // padding after its last record, which a reference run
                // leaves for the next peek, so their room differs at times.
                if !pa[s].fits(len + extra).unwrap() || !pb[s].fits(len + extra).unwrap() {
                    continue;
                }
                let mut sent = Vec::new();
                for p in [&mut pa[s], &mut pb[s]] {
                    let Some(res) = p.reserve(len + extra).unwrap() else {
                        sent.push(false);
                        continue;
                    };
                    // SAFETY: the reservation holds len + extra bytes.
                    unsafe { ptr::copy_nonoverlapping(body.as_ptr(), res.payload(), len) };
                    match how {
                        0 => {
                            p.cancel(res);
                        }
                        1 => {
                            p.commit_len(res, len, k, tag);
                        }
                        _ => {
                            p.commit(res, k, tag);
                        }
                    }
                    sent.push(true);
                }
                assert_eq!(sent[0], sent[1], "both queues hold the same records");
                if how == 0 && sent[0] {
                    passed += 1;
                }
                continue;
            }
            let slot = if rnd(4) == 0 { rnd(3) as usize } else { s };
            let limit = if rnd(2) == 0 { 256 } else { 200 };
            let max = 1 + rnd(16) as usize;
            let max_bytes = [64, 512, BATCH_BYTES][rnd(3) as usize];
            let a = run_step(&mut ca, ra.p, true, slot, limit, max, max_bytes);
            let b = run_step(&mut cb, rb.p, false, slot, limit, max, max_bytes);
            assert_eq!(
                a, b,
                "step {step}: slot {slot}, tags below {limit}, up to {max}"
            );
            match a {
                Some(Ok(run)) => {
                    runs += 1;
                    longest = longest.max(run.len());
                }
                Some(Err(_)) => alone += 1,
                None => {}
            }
        }
        assert!(
            ca.index() > 20 * 4096,
            "went round many laps: {}",
            ca.index()
        );
        assert!(
            runs > 1000 && longest >= 8 && alone > 1000 && passed > 1000,
            "runs {runs} (longest {longest}), records taken alone {alone}, given back {passed}"
        );
    }

    #[test]
    fn a_run_stops_before_a_record_out_of_bounds_which_the_next_peek_breaks_the_queue_at() {
        // Three records of slot 1, the third's header forged: a length past
        // the largest record, padding that does not run to the end,
        // skipped space longer than any record, a header naming no slot of
        // the queue. A run ends before it; the next `peek` breaks the
        // queue by name, and runs after that fail too.
        let geo = Geometry::new(4096, 100, 2).unwrap();
        let third = 2 * Geometry::record_bytes(5) as u64;
        for (forged, why) in [
            (
                record::encode(101, kind::MSG, 5) | 1 << 48,
                Violation::BadLength,
            ),
            (
                record::encode(8, kind::PAD, 0) | 1 << 48,
                Violation::BadPadding,
            ),
            (
                record::encode(4000, kind::SKIP, 0) | 1 << 48,
                Violation::BadLength,
            ),
            (
                record::encode(5, kind::MSG, 5) | 2 << 48,
                Violation::BadSender,
            ),
        ] {
            let reg = Region::new(geo);
            let mut p = unsafe { Producer::attach(reg.p, geo, 1) }.unwrap();
            let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
            for _ in 0..3 {
                p.push(kind::MSG, 5, &[b"whole"]).unwrap().unwrap();
            }
            c.v.cell(third).store(forged, Ordering::Relaxed);
            let mut got = 0;
            assert_eq!(
                c.peek_run(1, 256, 16, BATCH_BYTES, |_, _| got += 1)
                    .unwrap(),
                2
            );
            assert_eq!(got, 2, "{why:?}");
            c.release_last_quiet();
            let none = c.peek_run(1, 256, 16, BATCH_BYTES, |_, _| panic!("taken"));
            assert_eq!(none.unwrap(), 0, "{why:?}");
            assert!(
                matches!(c.peek(), Err(Error::Broken(v)) if v == why),
                "{why:?}"
            );
            assert!(c
                .peek_run(1, 256, 16, BATCH_BYTES, |_, _| panic!("taken"))
                .is_err());
        }
    }

    #[test]
    fn a_full_queue_refuses_then_takes_again_after_release() {
        let geo = Geometry::new(4096, 1016, 2).unwrap();
        let reg = Region::new(geo);
        let mut a = unsafe { Producer::attach(reg.p, geo, 0) }.unwrap();
        let mut b = unsafe { Producer::attach(reg.p, geo, 1) }.unwrap();
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        let body = [5u8; 1016];
        let mut sent = 0;
        while a.push(kind::MSG, 0, &[&body]).unwrap().is_some() {
            sent += 1;
        }
        assert_eq!(sent, 4096 / 1024);
        assert!(b.push(kind::MSG, 0, &[&[1]]).unwrap().is_none());
        assert!(b.prepare_sleep(), "nothing released: the producer sleeps");
        let r = c.peek().unwrap().unwrap();
        let woken = c.release(&r);
        assert_eq!(woken[0], 0b10, "the sleeping producer is rung");
        b.finish_sleep();
        assert!(b.push(kind::MSG, 0, &[&[1]]).unwrap().is_some());
    }

    #[test]
    fn a_consumer_that_sleeps_is_rung_by_the_next_commit() {
        let geo = Geometry::new(4096, 100, 1).unwrap();
        let reg = Region::new(geo);
        let mut p = unsafe { Producer::attach(reg.p, geo, 0) }.unwrap();
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        assert!(c.prepare_sleep());
        assert_eq!(p.push(kind::MSG, 1, &[b"hi"]).unwrap(), Some(true));
        assert_eq!(p.push(kind::MSG, 1, &[b"hi"]).unwrap(), Some(false));
        c.finish_sleep();
        assert!(!c.prepare_sleep(), "records are there");
    }

    #[test]
    fn a_reservation_never_published_blocks_the_consumer_and_says_so() {
        let geo = Geometry::new(4096, 100, 2).unwrap();
        let reg = Region::new(geo);
        let mut a = unsafe { Producer::attach(reg.p, geo, 0) }.unwrap();
        let mut b = unsafe { Producer::attach(reg.p, geo, 1) }.unwrap();
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        let dead = a.reserve(10).unwrap().unwrap();
        b.push(kind::MSG, 0, &[b"after"]).unwrap().unwrap();
        assert!(c.peek().unwrap().is_none());
        assert!(c.blocked());
        a.commit(dead, kind::MSG, 0);
        assert!(!c.blocked());
        assert_eq!(take(&mut c).unwrap().0, 0);
        assert_eq!(take(&mut c).unwrap().2, b"after");
    }

    /// Words of the data area that are not zero.
    fn dirty_words(reg: &Region, geo: Geometry) -> usize {
        (0..geo.data_size / 8)
            // SAFETY: inside the region's data area.
            .filter(|i| unsafe { (reg.p.add(CTRL_BYTES + 8 * i) as *const u64).read() } != 0)
            .count()
    }

    #[test]
    fn space_released_quietly_goes_back_zeroed_at_the_flush_and_not_before() {
        let geo = Geometry::new(4096, 1016, 2).unwrap();
        let reg = Region::new(geo);
        let mut a = unsafe { Producer::attach(reg.p, geo, 0) }.unwrap();
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        // Payloads whose every word looks like a header of slot 0.
        let fake = record::encode(8, kind::MSG, 0).to_le_bytes().repeat(127);
        while a.push(kind::MSG, 0, &[&fake]).unwrap().is_some() {}
        for _ in 0..4 {
            let r = c.peek().unwrap().unwrap();
            assert_eq!(r.len, 1016);
            c.release_quiet(&r);
        }
        assert_eq!(c.unpublished(), 4096);
        assert!(dirty_words(&reg, geo) > 4 * 127, "nothing zeroed yet");
        assert!(
            a.push(kind::MSG, 0, &[b"x"]).unwrap().is_none(),
            "no room before the flush"
        );
        assert_eq!(c.flush(), [0; WAIT_WORDS]);
        assert_eq!(c.unpublished(), 0);
        assert_eq!(
            dirty_words(&reg, geo),
            0,
            "all that was released reads zero"
        );
        assert_eq!(c.flush(), [0; WAIT_WORDS], "nothing more to hand back");
        // A small record in the space of the first large one, then the
        // consumer finds only it: no stale word passes for a record.
        assert!(a.push(kind::MSG, 0, &[b"x"]).unwrap().is_some());
        assert_eq!(take(&mut c).unwrap().2, b"x");
        assert!(c.peek().unwrap().is_none());
    }

    #[test]
    fn a_consumer_that_polls_is_never_rung_and_producers_that_poll_are_not_collected() {
        let geo = Geometry::new(4096, 1016, 2).unwrap();
        let reg = Region::new(geo);
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        c.declare_polling();
        let mut a = unsafe { Producer::attach(reg.p, geo, 0) }.unwrap();
        let mut b = unsafe { Producer::attach(reg.p, geo, 1) }.unwrap();
        a.declare_polling();
        a.learn_peer();
        b.learn_peer();
        // A consumer that declared polling and sleeps all the same is not
        // rung (it only delays itself).
        assert!(c.prepare_sleep());
        assert_eq!(a.push(kind::MSG, 0, &[b"one"]).unwrap(), Some(false));
        c.finish_sleep();
        assert_eq!(take(&mut c).unwrap().2, b"one");
        // Slot 1 did not declare polling: once admitted, a flush looks at
        // the waiting bits; while only slot 0 is, it does not.
        let body = [1u8; 1016];
        let fill = |p: &mut Producer| while p.push(kind::MSG, 0, &[&body]).unwrap().is_some() {};
        c.learn_peers([0]);
        fill(&mut a);
        assert!(a.prepare_sleep());
        let r = c.peek().unwrap().unwrap();
        assert_eq!(
            c.release(&r),
            [0; WAIT_WORDS],
            "slot 0 polls: its bit is not collected"
        );
        a.finish_sleep();
        c.learn_peers([0, 1]);
        fill(&mut b);
        assert!(b.prepare_sleep());
        let r = c.peek().unwrap().unwrap();
        assert_eq!(c.release(&r)[0], 0b10, "slot 1 may sleep: it is rung");
        b.finish_sleep();
    }

    #[test]
    fn a_consumer_never_reads_what_it_took_and_has_not_handed_back() {
        let geo = Geometry::new(4096, 1016, 1).unwrap();
        let reg = Region::new(geo);
        let mut p = unsafe { Producer::attach(reg.p, geo, 0) }.unwrap();
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        let body = [7u8; 1016];
        let quietly = |c: &mut Consumer, n: usize| {
            for _ in 0..n {
                let r = c.peek().unwrap().unwrap();
                c.release_quiet(&r);
            }
        };
        // A whole data area taken quietly: the next cell is the first
        // record's, not zeroed yet, and is not read.
        while p.push(kind::MSG, 0, &[&body]).unwrap().is_some() {}
        quietly(&mut c, 4);
        assert!(c.peek().unwrap().is_none(), "its own first record again");
        c.flush();
        p.push(kind::MSG, 0, &[b"next"]).unwrap().unwrap();
        assert_eq!(take(&mut c).unwrap().2, b"next");
        // Padding that would lead the consumer past what producers may
        // have reserved (the published index plus the data area) is
        // forged: 2048 published, records to 4096 + 1024 taken quietly,
        // a padding header where the next starts (it would lead to 8192,
        // whose cell holds the record taken at 4096, not zeroed).
        let reg = Region::new(geo);
        let mut p = unsafe { Producer::attach(reg.p, geo, 0) }.unwrap();
        let mut c = unsafe { Consumer::new(reg.p, geo) }.unwrap();
        for _ in 0..2 {
            p.push(kind::MSG, 0, &[&body]).unwrap().unwrap();
            take(&mut c).unwrap();
        }
        while p.push(kind::MSG, 0, &[&body]).unwrap().is_some() {}
        quietly(&mut c, 3);
        assert_eq!(c.index(), 4096 + 1024);
        let pad = record::encode(4096 - 1024 - 8, kind::PAD, 0);
        // SAFETY: a cell of the region's data area.
        unsafe {
            (*(reg.p.add(CTRL_BYTES + 1024) as *const AtomicU64)).store(pad, Ordering::Release)
        };
        assert!(matches!(
            c.peek(),
            Err(Error::Broken(Violation::BadPadding))
        ));
    }
}
