//! A script of hostile page writes interleaved with producer and consumer
//! calls on one ring, and the checks that must hold whatever the script does.
//!
//! Shared by `core/tests/hostile.rs` (proptest builds the ops) and the fuzz
//! target `ring_consumer` (the fuzz input is decoded into ops by
//! [`decode`]). It depends on nothing but `ivcom_core` and `std`.
//!
//! The properties checked after every call:
//! - no panic (the harness only calls the API as documented: `commit` only
//!   after a successful `reserve`, at most the reserved length);
//! - every record returned by `peek` lies inside the data area, 8-aligned,
//!   with `len <= max_record` and a valid record type;
//! - a batch of `peek_msgs` holds at most the count asked for (and
//!   `Batch::CAP`), only whole messages (kind MSG) with tags below the
//!   limit, each where the one before it ends, within `BATCH_BYTES` of
//!   ring space but for its last record, and nothing once the ring broke;
//! - every reservation returned by `reserve` lies inside the data area;
//! - once any call returned `Err(Broken(v))`, each later `peek`/`has_data`
//!   (consumer) or `reserve`/`push` (producer) returns `Err(Broken(v))`
//!   with the same first violation, and so does any other call that reports
//!   an error (`fits` and `prepare_sleep` on a broken ring may still answer
//!   `Ok`: their callers go through `peek`/`reserve` next);
//! - `looks_empty` (the poller's hint) never hides a record: when it says
//!   empty, `peek` hands out nothing;
//! - no error other than `Broken`, `Closed` (consumer) or `TooLarge` (a
//!   reservation beyond the largest record) ever surfaces.

#![allow(dead_code)]

use ivcom_core::ring::{self, kind, Consumer, Geometry, Producer, CTRL_BYTES, RECORD_HEADER};
use ivcom_core::{Error, Violation};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr;

/// Data area of the rings the scripts run on.
pub const DATA: usize = 4096;

/// A word of the control page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Word {
    Magic,
    Geometry,
    Nonce,
    Prod,
    ProdWaiting,
    Closed,
    Cons,
    ConsWaiting,
    /// The producer's request for prepared pages.
    ProdWant,
}

impl Word {
    pub const ALL: [Word; 9] = [
        Word::Magic,
        Word::Geometry,
        Word::Nonce,
        Word::Prod,
        Word::ProdWaiting,
        Word::Closed,
        Word::Cons,
        Word::ConsWaiting,
        Word::ProdWant,
    ];

    pub fn offset(self) -> usize {
        match self {
            Word::Magic => ring::OFF_MAGIC,
            Word::Geometry => ring::OFF_GEOMETRY,
            Word::Nonce => ring::OFF_NONCE,
            Word::Prod => ring::OFF_PROD,
            Word::ProdWaiting => ring::OFF_PROD_WAITING,
            Word::Closed => ring::OFF_CLOSED,
            Word::Cons => ring::OFF_CONS,
            Word::ConsWaiting => ring::OFF_CONS_WAITING,
            Word::ProdWant => ring::OFF_PROD_WANT,
        }
    }
}

/// Where a forged record header goes in the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// An absolute offset (taken modulo the data size, rounded down to 8).
    At(u32),
    /// Where the consumer reads next, as far as the harness can tell from
    /// the records it was handed.
    ConsumerNext,
    /// At the producer index the page currently shows.
    ProdWord,
    /// At the consumer index the page currently shows.
    ConsWord,
}

/// One step of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    // --- the hostile peer writes the shared pages ---
    /// Arbitrary bytes into the data area at `off % DATA` (cut at its end).
    Bytes {
        off: u32,
        data: Vec<u8>,
    },
    /// A record header `{len, kind, tag}` at an anchor, plus `delta` records
    /// of 8 bytes (may be negative).
    Header {
        at: Anchor,
        delta: i8,
        len: u32,
        kind: u8,
        tag: u8,
    },
    /// A control-page word set to `value`.
    Set {
        word: Word,
        value: u64,
    },
    /// A control-page word moved by `delta` (wrapping).
    Nudge {
        word: Word,
        delta: i64,
    },
    /// The header word rewritten with another version / control page count.
    Version {
        version: u16,
        ctrl_pages: u16,
    },
    /// The geometry word rewritten.
    Geometry {
        data_size: u32,
        max_record: u32,
    },
    // --- consumer calls ---
    Peek,
    /// `peek_msgs` asking for `max` messages with tags below `tag_limit`.
    PeekMsgs {
        max: u8,
        tag_limit: u16,
    },
    Release,
    Flush,
    ReleaseFlush,
    HasData,
    LooksEmpty,
    /// `prepare_pages`, as a poll that found nothing calls it.
    PreparePage,
    ConsumerSleep,
    ConsumerWake,
    // --- producer calls ---
    Reserve {
        len: u32,
    },
    Commit {
        len: u32,
        kind: u8,
        tag: u8,
    },
    Cancel,
    Push {
        len: u32,
        kind: u8,
        tag: u8,
    },
    Fits {
        len: u32,
    },
    ProducerSleep,
    ProducerWake,
    Close,
}

/// One ring in private, 4096-aligned memory, with both of its ends.
pub struct Harness {
    base: *mut u8,
    layout: Layout,
    pub geo: Geometry,
    pub prod: Producer,
    pub cons: Consumer,
    cons_broken: Option<Violation>,
    prod_broken: Option<Violation>,
    /// Payload capacity of the reservation the last `reserve` returned.
    reserved: Option<usize>,
    /// Offset in the data area of the next header, as far as we know.
    cons_next: usize,
    /// Records handed out by `peek` (for the fuzzer's sake, the bytes are
    /// read and folded here so that the reads cannot be optimised away).
    pub records: u64,
    pub checksum: u64,
}

impl Harness {
    /// A fresh ring of `DATA` bytes whose largest record is `max_record`
    /// (clamped to what the geometry allows).
    pub fn new(max_record: usize) -> Harness {
        let max_record = max_record.min(DATA / 2 - RECORD_HEADER);
        let geo = Geometry::with_max_record(DATA, max_record).expect("valid geometry");
        let layout = Layout::from_size_align(geo.ring_bytes(), 4096).expect("layout");
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null(), "out of memory");
        // SAFETY: base points to ring_bytes() private, aligned, writable bytes
        // that live until Drop; the producer and consumer are the only ends.
        let (prod, cons) = unsafe {
            ring::init(base, geo, 0x1234_5678_9abc_def0);
            (
                Producer::new(base, geo).expect("producer"),
                Consumer::new(base, geo).expect("consumer"),
            )
        };
        Harness {
            base,
            layout,
            geo,
            prod,
            cons,
            cons_broken: None,
            prod_broken: None,
            reserved: None,
            cons_next: 0,
            records: 0,
            checksum: 0,
        }
    }

    fn data(&self) -> usize {
        self.base as usize + CTRL_BYTES
    }

    fn max(&self) -> usize {
        self.geo.max_record as usize
    }

    pub fn read_word(&self, w: Word) -> u64 {
        // SAFETY: an 8-aligned word of the control page.
        unsafe { ptr::read_volatile(self.base.add(w.offset()) as *const u64) }
    }

    pub fn write_word(&self, w: Word, v: u64) {
        // SAFETY: an 8-aligned word of the control page.
        unsafe { ptr::write_volatile(self.base.add(w.offset()) as *mut u64, v) }
    }

    /// Writes `bytes` into the data area at `off` (cut at the end).
    pub fn write_data(&self, off: usize, bytes: &[u8]) {
        let off = off % DATA;
        let n = bytes.len().min(DATA - off);
        // SAFETY: off + n <= DATA, inside the data area; source is a slice.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(CTRL_BYTES + off), n) }
    }

    fn write_header(&self, off: usize, len: u32, k: u8, tag: u8) {
        let off = (off % DATA) & !7;
        let h = len as u64 | (k as u64) << 32 | (tag as u64) << 40;
        // SAFETY: 8-aligned and off + 8 <= DATA.
        unsafe { ptr::write_volatile(self.base.add(CTRL_BYTES + off) as *mut u64, h) }
    }

    /// Whether the consumer was seen broken, and by what.
    pub fn consumer_broken(&self) -> Option<Violation> {
        self.cons_broken
    }

    /// Whether the producer was seen broken, and by what.
    pub fn producer_broken(&self) -> Option<Violation> {
        self.prod_broken
    }

    fn consumer_err(&mut self, e: Error, what: &str) {
        match e {
            Error::Broken(v) => {
                let first = *self.cons_broken.get_or_insert(v);
                assert_eq!(first, v, "{what}: violation changed after the ring broke");
            }
            Error::Closed => {
                assert!(
                    self.cons_broken.is_none(),
                    "{what}: Closed after Broken({:?})",
                    self.cons_broken
                );
            }
            e => panic!("{what}: unexpected consumer error {e:?}"),
        }
    }

    fn producer_err(&mut self, e: Error, what: &str, len: usize) {
        match e {
            Error::Broken(v) => {
                let first = *self.prod_broken.get_or_insert(v);
                assert_eq!(first, v, "{what}: violation changed after the ring broke");
            }
            Error::TooLarge { len: l, max } => {
                assert_eq!(l, len);
                assert_eq!(max, self.max());
                assert!(len > max, "{what}: TooLarge for {len} <= {max}");
            }
            e => panic!("{what}: unexpected producer error {e:?}"),
        }
    }

    fn check_reservation(&self, p: *mut u8, len: usize) {
        let p = p as usize;
        let data = self.data();
        assert!(
            p >= data + RECORD_HEADER,
            "reservation before the data area"
        );
        assert!(p + len <= data + DATA, "reservation past the data area");
        assert_eq!((p - data) % 8, 0, "reservation not 8-aligned");
    }

    /// Runs one op and checks the properties.
    pub fn step(&mut self, op: &Op) {
        match *op {
            Op::Bytes { off, ref data } => self.write_data(off as usize, data),
            Op::Header {
                at,
                delta,
                len,
                kind,
                tag,
            } => {
                let base = match at {
                    Anchor::At(o) => o as usize,
                    Anchor::ConsumerNext => self.cons_next,
                    Anchor::ProdWord => self.read_word(Word::Prod) as usize,
                    Anchor::ConsWord => self.read_word(Word::Cons) as usize,
                };
                let off = (base as isize).wrapping_add(delta as isize * 8) as usize;
                self.write_header(off, len, kind, tag);
            }
            Op::Set { word, value } => self.write_word(word, value),
            Op::Nudge { word, delta } => {
                let v = self.read_word(word).wrapping_add(delta as u64);
                self.write_word(word, v)
            }
            Op::Version {
                version,
                ctrl_pages,
            } => {
                let h = ring::MAGIC as u64 | (version as u64) << 32 | (ctrl_pages as u64) << 48;
                self.write_word(Word::Magic, h)
            }
            Op::Geometry {
                data_size,
                max_record,
            } => self.write_word(Word::Geometry, data_size as u64 | (max_record as u64) << 32),
            Op::Peek => self.peek(),
            Op::PeekMsgs { max, tag_limit } => self.peek_msgs(max as usize, tag_limit),
            Op::Release => self.cons.release(),
            Op::Flush => {
                self.cons.flush();
            }
            Op::ReleaseFlush => {
                self.cons.release_flush();
            }
            Op::HasData => {
                let was = self.cons_broken;
                match self.cons.has_data() {
                    Ok(_) => assert!(was.is_none(), "has_data Ok after Broken({was:?})"),
                    Err(e) => self.consumer_err(e, "has_data"),
                }
            }
            Op::LooksEmpty => {
                if self.cons.looks_empty() {
                    let was = self.cons_broken;
                    match self.cons.peek() {
                        Ok(Some(_)) => panic!("looks_empty hid a record"),
                        Ok(None) => assert!(was.is_none(), "peek Ok(None) after Broken({was:?})"),
                        Err(e) => self.consumer_err(e, "peek after looks_empty"),
                    }
                }
            }
            Op::PreparePage => {
                self.cons.prepare_pages();
            }
            Op::ConsumerSleep => {
                // Not checked for stickiness: prepare_sleep does not look at
                // the broken state (the caller's has_data/peek does).
                if let Err(e) = self.cons.prepare_sleep() {
                    self.consumer_err(e, "consumer prepare_sleep");
                }
            }
            Op::ConsumerWake => self.cons.finish_sleep(),
            Op::Reserve { len } => {
                let len = len as usize;
                let was = self.prod_broken;
                match self.prod.reserve(len) {
                    Ok(Some(p)) => {
                        assert!(was.is_none(), "reserve Ok after Broken({was:?})");
                        assert!(len <= self.max());
                        self.check_reservation(p, len);
                        // Fill the payload: out-of-bounds pointers would show
                        // up as corruption under sanitizers and Miri.
                        // SAFETY: checked to lie inside the data area.
                        unsafe { ptr::write_bytes(p, 0xa5, len) };
                        self.reserved = Some(len);
                    }
                    Ok(None) => {
                        assert!(was.is_none(), "reserve Ok after Broken({was:?})");
                        self.reserved = None;
                    }
                    Err(e) => {
                        self.reserved = None;
                        self.producer_err(e, "reserve", len)
                    }
                }
            }
            Op::Commit { len, kind, tag } => {
                if let Some(cap) = self.reserved.take() {
                    let len = len as usize % (cap + 1);
                    self.prod.commit(len, kind, tag);
                }
            }
            Op::Cancel => {
                self.prod.cancel();
                self.reserved = None;
            }
            Op::Push { len, kind, tag } => {
                let len = len as usize;
                let was = self.prod_broken;
                let buf = vec![0x5au8; len.min(self.max() + 64)];
                let (a, b) = buf.split_at(buf.len() / 3);
                // push reserves: it replaces any reservation.
                self.reserved = None;
                match self.prod.push(kind, tag, &[a, b]) {
                    Ok(_) => assert!(was.is_none(), "push Ok after Broken({was:?})"),
                    Err(e) => self.producer_err(e, "push", buf.len()),
                }
            }
            Op::Fits { len } => {
                let len = len as usize % (self.max() + 1);
                // fits answers from the cached index when the record fits
                // (even on a broken ring); only a reload reports the damage.
                if let Err(e) = self.prod.fits(len) {
                    self.producer_err(e, "fits", len);
                }
            }
            Op::ProducerSleep => {
                if let Err(e) = self.prod.prepare_sleep() {
                    self.producer_err(e, "producer prepare_sleep", 0);
                }
            }
            Op::ProducerWake => self.prod.finish_sleep(),
            Op::Close => {
                self.prod.close();
            }
        }
    }

    /// Checks a record that a consumer call handed out (inside the data
    /// area, 8-aligned, at most max_record, a kind that may surface), folds
    /// its payload into the checksum and notes where the next header is.
    /// Returns the record's offset in the data area and where it ends.
    fn take(&mut self, rec: &ring::Record, what: &str) -> (usize, usize) {
        let data = self.data();
        let p = rec.ptr as usize;
        assert!(
            p >= data + RECORD_HEADER,
            "{what}: record before the data area"
        );
        assert!(
            p.checked_add(rec.len).is_some_and(|end| end <= data + DATA),
            "{what}: record of {} bytes at {} runs past the data area",
            rec.len,
            p - data
        );
        assert_eq!((p - data) % 8, 0, "{what}: record not 8-aligned");
        assert!(
            rec.len <= self.max(),
            "{what}: record longer than max_record"
        );
        assert!(
            matches!(rec.kind, kind::MSG | kind::FIRST | kind::MORE | kind::CTRL),
            "{what}: record of type {:#x} surfaced",
            rec.kind
        );
        // SAFETY: checked above to lie inside the data area, which lives as
        // long as the harness.
        let bytes = unsafe { rec.payload() }.to_vec();
        let mut h = self.checksum;
        for b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self.checksum = h;
        self.records += 1;
        let at = p - data - RECORD_HEADER;
        let end = at + RECORD_HEADER + rec.len.div_ceil(8) * 8;
        self.cons_next = end;
        (at, end)
    }

    fn peek(&mut self) {
        let was = self.cons_broken;
        match self.cons.peek() {
            Ok(Some(rec)) => {
                assert!(
                    was.is_none(),
                    "peek returned a record after Broken({was:?})"
                );
                self.take(&rec, "peek");
            }
            Ok(None) => assert!(was.is_none(), "peek Ok(None) after Broken({was:?})"),
            Err(e) => self.consumer_err(e, "peek"),
        }
    }

    fn peek_msgs(&mut self, max: usize, tag_limit: u16) {
        let was = self.cons_broken;
        let mut b = ring::Batch::new();
        let (n, bytes) = self.cons.peek_msgs(tag_limit, &mut b, max);
        let recs = b.records();
        assert_eq!(recs.len(), n);
        assert!(n <= max.min(ring::Batch::CAP), "{n} messages for {max}");
        assert!(n == 0 || was.is_none(), "a batch after Broken({was:?})");
        let (mut next, mut span, mut sum) = (None, 0u64, 0);
        for (i, rec) in recs.iter().enumerate() {
            assert_eq!(rec.kind, kind::MSG, "batch record of type {:#x}", rec.kind);
            assert!(
                (rec.tag as u16) < tag_limit,
                "batch record's tag {} >= {tag_limit}",
                rec.tag
            );
            assert!(span < ring::BATCH_BYTES, "batch went on past its bound");
            let (at, end) = self.take(rec, "batch");
            if let Some(n) = next {
                assert_eq!(at, n, "batch record {i} not where the one before ended");
            }
            span += (end - at) as u64;
            next = Some(end % DATA);
            sum += rec.len;
        }
        assert_eq!(bytes, sum);
    }

    /// Runs a whole script.
    pub fn run(&mut self, ops: &[Op]) {
        for op in ops {
            self.step(op);
        }
        // Whatever happened, a few more calls keep the properties.
        for _ in 0..3 {
            self.step(&Op::Peek);
            self.step(&Op::HasData);
            self.step(&Op::Release);
            self.step(&Op::Reserve { len: 8 });
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout; the producer and
        // consumer are not used after this point (they hold no destructor
        // that touches the memory).
        unsafe { dealloc(self.base, self.layout) }
    }
}

/// Reads the fuzz input as a script: byte 0-1 pick the largest record, then
/// each op is an opcode byte followed by its operands (missing bytes read
/// as zero).
pub fn decode(input: &[u8]) -> (usize, Vec<Op>) {
    let mut c = Cursor { b: input, i: 0 };
    let max_record = c.u16() as usize % (DATA / 2 - RECORD_HEADER + 1);
    let mut ops = Vec::new();
    while !c.done() && ops.len() < 4096 {
        let code = c.u8();
        let op = match code % 25 {
            0 => {
                let off = c.u16() as u32;
                let n = (c.u8() % 24) as usize;
                Op::Bytes {
                    off,
                    data: c.bytes(n),
                }
            }
            1 | 2 => {
                let at = match c.u8() % 4 {
                    0 => Anchor::At(c.u16() as u32),
                    1 => Anchor::ConsumerNext,
                    2 => Anchor::ProdWord,
                    _ => Anchor::ConsWord,
                };
                let delta = c.u8() as i8;
                let k = match c.u8() % 6 {
                    0 => kind::PAD,
                    1 => kind::MSG,
                    2 => kind::FIRST,
                    3 => kind::MORE,
                    4 => kind::CTRL,
                    _ => c.u8(),
                };
                let len = match c.u8() % 4 {
                    0 => c.u8() as u32,
                    1 => c.u16() as u32,
                    2 => max_record as u32 + c.u8() as u32 % 3,
                    _ => c.u32(),
                };
                Op::Header {
                    at,
                    delta,
                    len,
                    kind: k,
                    tag: c.u8(),
                }
            }
            3 => Op::Set {
                word: Word::ALL[c.u8() as usize % Word::ALL.len()],
                value: c.u64(),
            },
            4 | 5 => Op::Nudge {
                word: Word::ALL[c.u8() as usize % Word::ALL.len()],
                delta: c.u16() as i16 as i64,
            },
            6 => Op::Version {
                version: c.u8() as u16 % 4,
                ctrl_pages: c.u8() as u16 % 3,
            },
            7 => Op::Geometry {
                data_size: DATA as u32 ^ (c.u8() as u32) << 8,
                max_record: c.u16() as u32,
            },
            8 => Op::Peek,
            9 => Op::PeekMsgs {
                max: c.u8() % 20,
                tag_limit: match c.u8() % 3 {
                    0 => 256,
                    _ => c.u16() % 257,
                },
            },
            10 => Op::Release,
            11 => Op::Flush,
            12 => Op::ReleaseFlush,
            13 => Op::HasData,
            14 => Op::ConsumerSleep,
            15 => Op::ConsumerWake,
            16 | 17 => Op::Reserve {
                len: c.u16() as u32 % (max_record as u32 + 9),
            },
            18 => Op::Commit {
                len: c.u16() as u32,
                kind: c.u8(),
                tag: c.u8(),
            },
            19 => Op::Cancel,
            20 => Op::Push {
                len: c.u16() as u32 % (max_record as u32 + 9),
                kind: c.u8(),
                tag: c.u8(),
            },
            21 => Op::Fits {
                len: c.u16() as u32,
            },
            22 => match c.u8() % 3 {
                0 => Op::ProducerSleep,
                1 => Op::ProducerWake,
                _ => Op::Close,
            },
            23 => Op::LooksEmpty,
            _ => Op::PreparePage,
        };
        ops.push(op);
    }
    (max_record, ops)
}

/// Decodes and runs a fuzz input.
pub fn run_bytes(input: &[u8]) {
    let (max_record, ops) = decode(input);
    Harness::new(max_record).run(&ops);
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
    fn u8(&mut self) -> u8 {
        let v = self.b.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}
