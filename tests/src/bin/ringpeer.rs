//! `ivcom-ringpeer`: a hostile peer on a ring. It joins a job honestly (it
//! knows the job's secret, as a member whose VM was taken over would),
//! gets a ring to `ivcom-xfer listen`, and then writes its sending ring by
//! hand: some well-formed data messages, then one attack.
//!
//! ```text
//! ivcom-ringpeer --card-file F --host-dir D --attack A
//! ```
//! Attacks: `tag255` (a record with tag 255), `short` (a first fragment
//! shorter than its length field), `overlen` (a length past the largest
//! record), `pastend` (a record that runs past the end of the data area),
//! `padloop` (a padding record at offset 0, which would lead a reader back
//! to where it stands), `badkind` (an unknown record type), `rewrite`
//! (records rewritten after they were published, then a tag-255 record).
//! Well-formed records are written as `docs/ring-format.md` says: payload,
//! the next header slot cleared, then the header (release). Prints `RINGPEER sent=N` and stays up a few seconds so
//! that the victim meets the violation, not a vanished peer.

use ivcom_core::ring::{kind, Geometry, CTRL_BYTES, OFF_BELL, OFF_CONS, OFF_PROD};
use ivcom_core::{BackendChoice, Card, Config, Key, Node, PathKind};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn die(m: &str) -> ! {
    eprintln!("ivcom-ringpeer: {m}");
    std::process::exit(2)
}

/// The sending ring, written by hand.
struct Raw {
    base: *mut u8,
    geo: Geometry,
    prod: u64,
}

impl Raw {
    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: an 8-aligned offset inside the mapped control page.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area follows the control page.
        unsafe { self.base.add(CTRL_BYTES) }
    }
    fn size(&self) -> u64 {
        self.geo.data_size as u64
    }
    fn slot(&self, pos: u64) -> &AtomicU64 {
        // SAFETY: 8-aligned, inside the data area (taken modulo its size).
        unsafe { &*(self.data().add((pos % self.size()) as usize) as *const AtomicU64) }
    }
    fn put_u64(&self, pos: u64, v: u64) {
        self.slot(pos).store(v, Ordering::Relaxed);
    }
    /// Publishes a record by its header (release: what was written before
    /// it is visible with it).
    fn put_header(&self, pos: u64, v: u64) {
        self.slot(pos).store(v, Ordering::Release);
    }
    fn pad_to_end(&mut self) {
        let contig = self.size() - self.prod % self.size();
        self.put_u64(0, 0);
        self.put_header(
            self.prod,
            ivcom_core::record::encode((contig - 8) as u32, kind::PAD, 0),
        );
        self.prod += contig;
    }
    fn publish(&self, index: u64) {
        self.word(OFF_PROD).store(index, Ordering::Release);
        // Wake a consumer asleep on the futex doorbell (host backend).
        // SAFETY: the 32-bit doorbell word of the control page.
        unsafe {
            let bell = self.base.add(OFF_BELL) as *const AtomicU32;
            (*bell).fetch_add(1, Ordering::Release);
            libc::syscall(libc::SYS_futex, bell, libc::FUTEX_WAKE, 1);
        }
    }
    /// Waits until `need` bytes are free; false when the victim stopped
    /// consuming (it broke the link).
    fn try_room(&self, need: u64) -> bool {
        let t0 = Instant::now();
        while self.size() - (self.prod - self.word(OFF_CONS).load(Ordering::Acquire)) < need {
            if t0.elapsed() > Duration::from_secs(5) {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }
    fn room(&self, need: u64) {
        if !self.try_room(need) {
            die("the victim stopped consuming");
        }
    }
    /// Writes one well-formed record (after a padding record where it would
    /// not fit before the end of the data area).
    fn record(&mut self, k: u8, tag: u8, payload: &[u8]) -> u64 {
        let total = 8 + payload.len().div_ceil(8) as u64 * 8;
        let contig = self.size() - self.prod % self.size();
        if contig < total {
            self.room(contig + total + 8);
            self.pad_to_end();
        }
        self.room(total + 8);
        let at = self.prod;
        for (i, c) in payload.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.put_u64(at + 8 + 8 * i as u64, u64::from_le_bytes(w));
        }
        self.put_u64(at + total, 0);
        self.put_header(at, ivcom_core::record::encode(payload.len() as u32, k, tag));
        self.prod += total;
        self.publish(self.prod);
        at
    }
}

/// An `ivcom-xfer` data message: index, length, then bytes.
fn data_msg(i: u64, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len.max(16)];
    m[..8].copy_from_slice(&i.to_le_bytes());
    let n = m.len() as u64;
    m[8..16].copy_from_slice(&n.to_le_bytes());
    for (k, b) in m[16..].iter_mut().enumerate() {
        *b = (k as u8).wrapping_mul(31) ^ i as u8;
    }
    m
}

fn main() {
    let mut card_file = None;
    let mut host_dir = None;
    let mut attack = String::new();
    let mut a = std::env::args().skip(1);
    while let Some(k) = a.next() {
        let v = a
            .next()
            .unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--card-file" => card_file = Some(v),
            "--host-dir" => host_dir = Some(v),
            "--attack" => attack = v,
            _ => die(&format!("unknown option {k}")),
        }
    }
    let f = card_file.unwrap_or_else(|| die("--card-file needed"));
    let t0 = Instant::now();
    let s = loop {
        match std::fs::read_to_string(&f) {
            Ok(s) if s.contains("CARD ") => break s,
            _ if t0.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => die("no card file"),
        }
    };
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| die("bad card file"))
            .trim()
            .to_string()
    };
    let psk = Key::from_hex(&field("PSK ")).unwrap_or_else(|e| die(&e.to_string()));
    let peer = Card::parse(&field("CARD ")).unwrap_or_else(|e| die(&e.to_string()));
    let node = Node::new(Config {
        backend: BackendChoice::Host,
        host_dir: host_dir.map(Into::into),
        psk: Some(psk),
        ..Config::default()
    })
    .unwrap_or_else(|e| die(&e.to_string()));
    let mut link = node.link(&peer).unwrap_or_else(|e| die(&e.to_string()));
    if link.path() != PathKind::Ring {
        die(&format!("no ring: {}", link.reason()));
    }
    let (base, geo) = link.raw_tx_ring().expect("a ring link");
    let mut r = Raw { base, geo, prod: 0 };
    // Well-formed traffic first: the victim delivers and checks it.
    // tests/tests/trust.rs knows this count (RINGPEER_GOOD_MESSAGES).
    let good = 20u64;
    for i in 0..good {
        r.record(kind::MSG, 1, &data_msg(i, 64));
    }
    let size = r.size();
    match attack.as_str() {
        "tag255" => {
            r.record(kind::MSG, 255, &data_msg(good, 64));
        }
        "short" => {
            r.record(kind::FIRST, 1, &[1, 2, 3, 4]);
        }
        "overlen" => {
            let at = r.prod;
            r.room(64);
            r.put_header(
                at,
                ivcom_core::record::encode(geo.max_record + 8, kind::MSG, 1),
            );
            r.publish(at + 64);
        }
        "pastend" => {
            // Well-formed records up to the last 72 to 136 bytes of the data
            // area, then one whose length runs past its end.
            let mut i = good;
            while size - r.prod % size >= 2 * 72 {
                r.record(kind::MSG, 1, &data_msg(i, 64));
                i += 1;
            }
            let contig = size - r.prod % size;
            r.room(contig);
            r.put_header(
                r.prod,
                ivcom_core::record::encode(contig as u32, kind::MSG, 1),
            );
            r.publish(r.prod + contig);
        }
        "padloop" => {
            // A valid padding record to the end, then one at offset 0 that
            // spans the whole data area.
            r.room(size - r.prod % size + 8);
            r.pad_to_end();
            r.put_header(0, ivcom_core::record::encode(size as u32 - 8, kind::PAD, 0));
            r.publish(r.prod + size);
        }
        "badkind" => {
            r.record(9, 1, &data_msg(good, 64));
        }
        "rewrite" => {
            // Records rewritten under the reader: payloads and headers of
            // what was just published, again and again.
            let until = Instant::now() + Duration::from_secs(2);
            let mut i = good;
            // Stops early once the victim broke the link and consumes no
            // more (80-byte records: room for one is room for the next
            // padding too, as the data area is a power of two).
            while Instant::now() < until && r.try_room(2 * 80) {
                let at = r.record(kind::MSG, 1, &data_msg(i, 64));
                for k in 0..50u64 {
                    r.put_u64(at + 8 + 8 * (k % 8), k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    // lengths that flip between valid and far past the
                    // record: a reader that fetched the header twice would
                    // check one and use the other
                    let len = if k % 2 == 0 {
                        (k * 977) as u32
                    } else {
                        u32::MAX - k as u32
                    };
                    r.put_u64(at, ivcom_core::record::encode(len, kind::MSG, k as u8));
                }
                i += 1;
            }
            if r.try_room(2 * 80) {
                r.record(kind::MSG, 255, &data_msg(i, 64));
            }
        }
        a => die(&format!("unknown attack {a}")),
    }
    println!("RINGPEER attack={attack} sent={}", r.prod);
    // Stay up until the victim breaks the link (its close ends the wait)
    // or 3 s pass: the victim must meet the violation, not a vanished peer.
    let until = Instant::now() + Duration::from_secs(3);
    let mut sink = Vec::new();
    while Instant::now() < until && link.recv(&mut sink, Some(until)).is_ok() {}
    drop(link);
}
