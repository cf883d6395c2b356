//! The bodies of the fuzz targets (each `fuzz_targets/<name>.rs` calls one),
//! also run on stable by `core/tests/fuzz_smoke.rs` over pseudo-random
//! inputs. Each asserts properties, not just "no panic".

use ivcom_core::card::{Card, Key};
use ivcom_core::frame::{Delivery, Reassembly};
use ivcom_core::hypervisor::host;
use ivcom_core::hypervisor::xen::xenstore;
use ivcom_core::hypervisor::BackendKind;
use ivcom_core::node::handshake::{
    self, Acceptor, Decoder, Initiator, Msg, Target, Verdict, NONCE,
};
use ivcom_core::payload::Payload;
use ivcom_core::record::{self, kind};
use ivcom_core::tcp::{Parsed, StreamParser};
use ivcom_core::Error;

/// Handshake messages from arbitrary bytes: the incremental decoder over
/// any chunking, and `Msg::decode` of any type and payload. Whatever
/// decodes re-encodes to a message that decodes to itself.
pub fn handshake_messages(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // The decoder, fed in chunks of `first % 17 + 1` bytes.
    let step = first as usize % 17 + 1;
    let max = if first & 0x80 != 0 {
        handshake::MAX_PREAUTH
    } else {
        1 << 20
    };
    let mut d = Decoder::new(max);
    let mut off = 0;
    while off < rest.len() {
        let n = step.min(d.want()).min(rest.len() - off);
        match d.feed(&rest[off..off + n]) {
            Ok(Some(m)) => round_trip(&m),
            Ok(None) => {}
            Err(_) => break,
        }
        off += n;
    }
    // Any type with the rest as its payload.
    if let Ok(m) = Msg::decode(first, rest) {
        round_trip(&m);
    }
}

fn round_trip(m: &Msg) {
    let b = m.encode();
    let (t, len) = Msg::check_header(b[..8].try_into().unwrap()).expect("own header");
    assert_eq!(len, b.len() - 8);
    let again = Msg::decode(t, &b[8..]).expect("own encoding decodes");
    match m {
        // Reasons are clipped and made printable: a fixed point after one
        // more trip.
        Msg::Refuse(_) | Msg::TcpOnly(_) | Msg::Refused(_) | Msg::Abort(_) => {
            let b2 = again.encode();
            assert_eq!(Msg::decode(t, &b2[8..]).unwrap(), again);
        }
        _ => assert_eq!(&again, m),
    }
}

fn node(id: u64, key: u8) -> Card {
    Card {
        id,
        name: id ^ 0x5555,
        backend: Some(BackendKind::Host),
        host_id: [9; 16],
        domain: 100 + id as u32,
        addr: "127.0.0.1:4000".parse().unwrap(),
        key: Some(Key([key; 32])),
    }
}

/// The handshake with a man in the middle: a legitimate exchange between
/// two nodes whose four messages (HELLO, CHALLENGE, AUTH, ACK) are altered
/// by the input (triples: message, offset, xor). When every message still
/// decodes to what was sent, both sides must succeed; when any decodes to
/// something else, they must not both succeed.
pub fn handshake_exchange(data: &[u8]) {
    let (i, a) = (node(1, 0x11), node(2, 0x22));
    let muts: Vec<(usize, usize, u8)> = data
        .chunks_exact(4)
        .map(|c| {
            (
                c[0] as usize % 4,
                u16::from_le_bytes([c[1], c[2]]) as usize,
                c[3],
            )
        })
        .collect();
    // One hop: encode, alter, decode; `None` when the altered bytes do not
    // decode (the receiver would drop the connection).
    let mut altered = false;
    let mut hop = |k: usize, m: &Msg| -> Option<Msg> {
        let mut b = m.encode();
        for &(mk, off, x) in &muts {
            if mk == k && x != 0 && !b.is_empty() {
                let at = off % b.len();
                b[at] ^= x;
            }
        }
        let mut d = Decoder::new(1 << 20);
        let mut got = None;
        let mut off = 0;
        while off < b.len() {
            let n = d.want().min(b.len() - off);
            match d.feed(&b[off..off + n]) {
                Ok(Some(x)) => {
                    got = Some(x);
                    off += n;
                    break;
                }
                Ok(None) => off += n,
                Err(_) => break,
            }
        }
        // Trailing bytes would be a second message: the receiver reads on
        // and meets it, which the exchange does not expect.
        let out = got.filter(|_| off == b.len());
        if out.as_ref() != Some(m) {
            altered = true;
        }
        out
    };
    let (mut ini, hello) = Initiator::start(&i, Target::Card(a.clone()), [7; NONCE]);
    let mut acc = Acceptor::new(&a, [8; NONCE]);
    let both = (|| {
        let ch = acc.on_hello(hop(0, &hello)?).ok()?;
        let auth = ini.on_challenge(hop(1, &ch)?).ok()?;
        let claimed = acc.on_auth(hop(2, &auth)?).ok()?;
        // What the acceptor would look up: the initiator it knows.
        if !claimed.same_node(&i) {
            return None;
        }
        let v = acc.verdict(i.key.as_ref().unwrap(), true).ok()?;
        match ini.on_verdict(hop(3, &v)?) {
            Ok(Verdict::Accepted(p)) => Some(p),
            _ => None,
        }
    })();
    if altered {
        assert!(
            both.is_none(),
            "an altered exchange authenticated: {muts:?}"
        );
    } else {
        assert_eq!(both.map(|p| p.id), Some(a.id), "an intact exchange failed");
    }
}

/// Reassembly of arbitrary record sequences (`[kind, tag, len lo, len hi,
/// data...]`), against a model: what is delivered is what the records
/// carried, nothing exceeds the limit, and the buffer never grows far
/// beyond what arrived.
pub fn reassembly(data: &[u8]) {
    const MAX: usize = 4096;
    let mut r = Reassembly::new(MAX);
    let mut model: Option<(u8, usize, Vec<u8>)> = None;
    let mut rest = data;
    while rest.len() >= 4 {
        let k = match rest[0] % 5 {
            0 => kind::MSG,
            1 => kind::FIRST,
            2 => kind::MORE,
            3 => kind::CTRL,
            _ => rest[0],
        };
        let tag = rest[1];
        let len = (u16::from_le_bytes([rest[2], rest[3]]) as usize).min(rest.len() - 4);
        let body = &rest[4..4 + len];
        rest = &rest[4 + len..];
        let out = r.feed(k, tag, Payload::private(body));
        // The model.
        let want: Result<Option<(u8, Vec<u8>)>, ()> = match (k, &mut model) {
            (kind::MSG, None) => Ok(Some((tag, body.to_vec()))),
            (kind::FIRST, None) => {
                if body.len() < 8 {
                    Err(())
                } else {
                    let total = u64::from_le_bytes(body[..8].try_into().unwrap());
                    if total > MAX as u64 || total as usize <= body.len() - 8 {
                        Err(())
                    } else {
                        model = Some((tag, total as usize, body[8..].to_vec()));
                        Ok(None)
                    }
                }
            }
            (kind::MORE, Some((t, total, buf))) => {
                if buf.len() + body.len() > *total {
                    Err(())
                } else {
                    buf.extend_from_slice(body);
                    if buf.len() == *total {
                        let m = (*t, std::mem::take(buf));
                        model = None;
                        Ok(Some(m))
                    } else {
                        Ok(None)
                    }
                }
            }
            _ => Err(()),
        };
        match (out, want) {
            (Ok(Delivery::Message(t, m)), Ok(Some((wt, wm)))) => {
                assert_eq!((t, m.to_vec()), (wt, wm));
                assert!(m.len() <= MAX || k == kind::MSG);
            }
            (Ok(Delivery::Partial), Ok(None)) => {}
            (Err(_), Err(())) => return,
            (o, w) => panic!(
                "reassembly {:?} vs model {:?}",
                o.map(|d| matches!(d, Delivery::Partial)),
                w.map(|x| x.is_none())
            ),
        }
        assert!(r.capacity() <= 2 * MAX + 64, "buffer {}", r.capacity());
    }
}

/// The TCP receive parser over arbitrary bytes in arbitrary chunks: every
/// message it hands out fits the limits, a violation sticks, and nothing
/// panics.
pub fn tcp_stream(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    const FRAME: usize = 256;
    const MAX: usize = 2048;
    let mut p = StreamParser::new(FRAME, MAX);
    let step = first as usize % 61 + 1;
    let mut off = 0;
    let mut delivered = 0u64;
    loop {
        match p.parse_next() {
            Ok(Parsed::Msg(_, ptr, len)) => {
                assert!(len <= MAX);
                assert!(!ptr.is_null());
                delivered += 1;
                p.release();
            }
            Ok(Parsed::More) => {
                if off >= rest.len() {
                    break;
                }
                let space = p.space();
                assert!(!space.is_empty(), "no room although a frame is incomplete");
                let n = step.min(space.len()).min(rest.len() - off);
                space[..n].copy_from_slice(&rest[off..off + n]);
                p.filled(n);
                off += n;
            }
            Err(Error::Broken(v)) => {
                // It stays broken, with the same violation.
                assert!(matches!(p.parse_next(), Err(Error::Broken(w)) if w == v));
                break;
            }
            Err(_) => break,
        }
    }
    assert_eq!(p.rx_msgs, delivered);
}

/// The xenstore reply parsers: a header from the first 16 bytes, the
/// value of a read from the rest, a domain id from the rest.
pub fn xenstore(data: &[u8]) {
    if data.len() >= xenstore::HEADER {
        let h: [u8; xenstore::HEADER] = data[..xenstore::HEADER].try_into().unwrap();
        if let Ok(hdr) = xenstore::parse_header(&h) {
            assert!(hdr.len <= xenstore::PAYLOAD_MAX);
            let body = &data[xenstore::HEADER..];
            let body = &body[..hdr.len.min(body.len())];
            if let Ok(v) = xenstore::read_value(&hdr, body, hdr.req_id, "domid") {
                assert!(v.len() <= body.len());
            }
        }
    }
    if let Ok(d) = xenstore::parse_domid(data) {
        assert!(d < 0x7ff0);
        let s = std::str::from_utf8(data).unwrap();
        assert_eq!(s.trim_end_matches(['\n', '\0']).parse::<u16>().unwrap(), d);
    }
}

/// The host backend's region descriptors and socket names: whatever is
/// accepted is exactly the canonical form (no path separator, no other
/// byte a peer could smuggle into a path).
pub fn host_names(data: &[u8]) {
    if let Some((name, token)) = host::parse_desc(data) {
        let canon = format!("{name}:{}", host::hex(&token));
        assert_eq!(canon.as_bytes(), data);
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
        assert!(host::parse_socket_name(name).is_some());
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(n) = host::parse_socket_name(s) {
            assert_eq!(n, s);
            assert!(!n.contains('/') && n.len() == 43);
        }
    }
}

/// Cards: whatever parses (binary or printable) round-trips through both
/// forms, and the public forms never carry the key.
pub fn card(data: &[u8]) {
    if let Ok(card) = Card::from_bytes(data) {
        assert_eq!(Card::from_bytes(&card.to_bytes()).expect("re-parse"), card);
        assert_eq!(
            Card::parse(&card.to_secret_string()).expect("printable"),
            card
        );
        assert_eq!(
            Card::parse(&card.to_string()).expect("public"),
            card.public()
        );
        assert!(card.public_bytes().len() <= card.to_bytes().len());
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(card) = Card::parse(s) {
            assert_eq!(
                Card::parse(&card.to_secret_string()).expect("re-parse"),
                card
            );
            assert_eq!(Card::from_bytes(&card.to_bytes()).expect("binary"), card);
        }
    }
}

/// The frame header parser: 8 header bytes and a frame limit; an accepted
/// header is within the limit, of a kind that may travel, and re-encodes
/// to the same bytes.
pub fn tcp_header(data: &[u8]) {
    let mut h = [0u8; 8];
    let n = data.len().min(8);
    h[..n].copy_from_slice(&data[..n]);
    let mut m = [0u8; 8];
    let rest = &data[n..];
    let k = rest.len().min(8);
    m[..k].copy_from_slice(&rest[..k]);
    let max = u64::from_le_bytes(m) as usize;
    if let Ok((len, k, tag)) = ivcom_core::tcp::parse_header(h, max) {
        assert!(len <= max);
        assert!(kind::valid(k) && k != kind::PAD);
        assert_eq!(record::encode_bytes(len, k, tag), h);
    }
}

/// A receive queue (`ivcom_core::queue`) driven by a script: honest
/// producers in three slots push records, reserve and leave reservations
/// open, and commit them later; the consumer takes and releases; forged
/// words land anywhere in the control page or the data area. Ops (one
/// byte, then operands): `0 s l` push from slot `s % 3` a record of
/// `4 * l` bytes; `1` consumer peek and release one; `2 s l` reserve in
/// slot `s % 3` without committing (at most one open reservation a slot);
/// `3 s h` end slot `s`'s open reservation as `h % 3` says: commit it
/// whole, commit its first `len * (h / 3) / 85` bytes (the rest published
/// as skipped space), or give it back unsent (skipped space, never handed
/// out); `4 o0 o1 w0..w7` store the
/// word `w` at the 8-aligned offset `o` of the region; `5` the consumer
/// prepares to sleep and finishes. Checks: no panic, no access outside the
/// region (ASan), every record handed out inside the data area with a
/// length of at most the largest record, a producer slot of the queue and
/// a valid kind; while no word was forged, records arrive exactly as the
/// model (reservation order, contents) says; a broken consumer stays
/// broken; no error other than `Broken`, `Closed` or `TooLarge`.
pub fn queue(data: &[u8]) {
    use ivcom_core::queue::{Consumer, Geometry, Producer, Reservation, CTRL_BYTES};
    use std::collections::VecDeque;

    const SLOTS: usize = 3;
    let geo = Geometry::new(4096, 1000, SLOTS).unwrap();
    // Declared first: freed after the producers and consumer that use it.
    let region = QueueRegion::new(geo, 9);
    let base = region.base;
    let mut c = unsafe { Consumer::new(base, geo) }.unwrap();
    let mut ps: Vec<Producer> = (0..SLOTS)
        .map(|s| unsafe { Producer::attach(base, geo, s) }.unwrap())
        .collect();
    let mut open: Vec<Option<(Reservation, u32)>> = (0..SLOTS).map(|_| None).collect();
    // The model: records in reservation order, (slot, seq, len, committed
    // or cancelled, cancelled: published as skipped space, never seen).
    let mut model: VecDeque<(usize, u32, usize, bool, bool)> = VecDeque::new();
    let mut seq = 0u32;
    let mut forged = false;
    let mut broken = false;
    let data_start = base as usize + CTRL_BYTES;
    let data_end = base as usize + geo.region_bytes();
    let fill = |p: *mut u8, len: usize, seq: u32| {
        for i in 0..len {
            // SAFETY: inside the reservation.
            unsafe {
                p.add(i)
                    .write((seq as usize).wrapping_mul(7).wrapping_add(i) as u8)
            };
        }
    };
    let ok_err = |e: &Error| matches!(e, Error::Broken(_) | Error::Closed | Error::TooLarge { .. });
    let mut i = 0;
    while i < data.len() {
        let op = data[i] % 6;
        let arg = |k: usize| data.get(i + k).copied().unwrap_or(0);
        match op {
            0 | 2 => {
                let s = arg(1) as usize % SLOTS;
                let len = arg(2) as usize * 4;
                i += 3;
                if open[s].is_some() {
                    continue;
                }
                match ps[s].reserve(len) {
                    Ok(Some(r)) => {
                        fill(r.payload(), len, seq);
                        let a = r.payload() as usize;
                        assert!(a >= data_start && a + len <= data_end);
                        if op == 0 {
                            ps[s].commit(r, kind::MSG, s as u8);
                            model.push_back((s, seq, len, true, false));
                        } else {
                            open[s] = Some((r, seq));
                            model.push_back((s, seq, len, false, false));
                        }
                        seq += 1;
                    }
                    Ok(None) => {}
                    Err(e) => assert!(ok_err(&e), "{e}"),
                }
            }
            3 => {
                // Commit an open reservation whole, commit its first part
                // (the rest skipped), or give it back unsent.
                let s = arg(1) as usize % SLOTS;
                let how = arg(2);
                i += 3;
                if let Some((r, q)) = open[s].take() {
                    let m = model.iter_mut().find(|m| m.1 == q).unwrap();
                    match how % 3 {
                        0 => {
                            ps[s].commit(r, kind::MSG, s as u8);
                        }
                        1 => {
                            let len = m.2 * usize::from(how / 3) / 85;
                            ps[s].commit_len(r, len, kind::MSG, s as u8);
                            m.2 = len;
                        }
                        _ => {
                            ps[s].cancel(r);
                            m.4 = true;
                        }
                    }
                    m.3 = true;
                }
            }
            4 => {
                let off = (u16::from_le_bytes([arg(1), arg(2)]) as usize * 8) % geo.region_bytes();
                let mut w = [0u8; 8];
                for (k, b) in w.iter_mut().enumerate() {
                    *b = arg(3 + k);
                }
                i += 11;
                // SAFETY: an 8-aligned word inside the region.
                unsafe {
                    (*(base.add(off) as *const std::sync::atomic::AtomicU64))
                        .store(u64::from_le_bytes(w), std::sync::atomic::Ordering::Release)
                };
                forged = true;
            }
            5 => {
                i += 1;
                // A consumer hands back what it released before it sleeps.
                c.flush();
                if c.prepare_sleep() {
                    c.finish_sleep();
                }
            }
            _ => {
                let quiet = data[i] & 0x80 != 0;
                i += 1;
                match c.peek() {
                    Ok(Some(r)) => {
                        assert!(!broken, "a broken consumer handed out a record");
                        let a = r.ptr as usize;
                        assert!(a >= data_start && a + r.len <= data_end);
                        assert!(r.len <= geo.max_record && r.slot < SLOTS);
                        assert!(record::kind::valid(r.kind));
                        if !forged {
                            // Space given back was passed.
                            while model.front().is_some_and(|m| m.4) {
                                model.pop_front();
                            }
                            let (s, q, len, done, _) =
                                model.pop_front().expect("a record nobody wrote");
                            assert!(done, "a record handed out before its commit");
                            assert_eq!((r.slot, r.len, r.tag as usize), (s, len, s));
                            for k in 0..len {
                                // SAFETY: inside the record.
                                let b = unsafe { *r.ptr.add(k) };
                                assert_eq!(b, (q as usize).wrapping_mul(7).wrapping_add(k) as u8);
                            }
                        }
                        // Released at once, or quietly and handed back
                        // with a later batch.
                        if !quiet {
                            c.release(&r);
                        } else {
                            c.release_quiet(&r);
                        }
                    }
                    Ok(None) => {
                        if !forged && !broken {
                            while model.front().is_some_and(|m| m.4) {
                                model.pop_front();
                            }
                            assert!(
                                model.front().is_none_or(|m| !m.3),
                                "a committed record not seen"
                            );
                        }
                    }
                    Err(e) => {
                        assert!(matches!(e, Error::Broken(_)), "{e}");
                        assert!(forged, "an honest queue broke: {e}");
                        broken = true;
                    }
                }
            }
        }
    }
}

/// A receive queue's region in zeroed heap memory, initialised; freed when
/// dropped (after the producers and consumers that use it: declare it
/// first).
struct QueueRegion {
    base: *mut u8,
    layout: std::alloc::Layout,
}

impl QueueRegion {
    fn new(geo: ivcom_core::queue::Geometry, nonce: u64) -> QueueRegion {
        let layout = std::alloc::Layout::from_size_align(geo.region_bytes(), 4096).unwrap();
        // SAFETY: non-zero size; freed in drop.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!base.is_null());
        // SAFETY: a fresh zeroed region of the right size.
        unsafe { ivcom_core::queue::init(base, geo, nonce) };
        QueueRegion { base, layout }
    }
}

impl Drop for QueueRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout; its users are gone.
        unsafe { std::alloc::dealloc(self.base, self.layout) }
    }
}

/// Messages over a receive queue (`ivcom_core::queue_path`) driven by a
/// script: three admitted slots send messages of up to five records each
/// (fragments of the three interleaved), raw records of any kind from an
/// admitted slot (a hostile rank of the domain), a record from a slot that
/// was never admitted, words forged anywhere in the region, polls, and
/// runs of one slot's whole messages taken in place (`take_own`, as a
/// queue link hands them up).
/// Checks: no panic, no out-of-bounds access; each slot that sent only
/// honest messages gets exactly them, in order, whatever the others did
/// (until the queue itself breaks); a broken slot delivers nothing more; a
/// broken queue stays broken; nothing larger than the limit is delivered,
/// nor any tag at the tag limit (255: a raw record may carry it); a record
/// taken in place is a whole message of the slot asked for, no larger than
/// a record, and lies inside the data area.
pub fn queue_messages(data: &[u8]) {
    use ivcom_core::queue::{Consumer, Geometry, Producer};
    use ivcom_core::queue_path::{QueueRx, QueueTx};
    use std::collections::VecDeque;

    const SLOTS: usize = 4;
    const LIMIT: usize = 4000;
    let geo = Geometry::new(4096, 500, SLOTS).unwrap();
    // Declared first: freed after the ends that use it.
    let region = QueueRegion::new(geo, 3);
    let base = region.base;
    let mut rx = QueueRx::new(unsafe { Consumer::new(base, geo) }.unwrap(), SLOTS, 255);
    for s in 0..3 {
        rx.admit(s, LIMIT).unwrap();
    }
    let mut txs: Vec<QueueTx> = (0..SLOTS)
        .map(|s| QueueTx::new(unsafe { Producer::attach(base, geo, s) }.unwrap(), 500).unwrap())
        .collect();
    // Per slot: the message being sent and how much of it went; complete
    // messages not yet delivered; whether the slot ever sent a raw record.
    let mut pending: Vec<Option<(Vec<u8>, usize)>> = vec![None; SLOTS];
    let mut model: Vec<VecDeque<Vec<u8>>> = vec![VecDeque::new(); SLOTS];
    let mut hostile = [false; SLOTS];
    let mut forged = false;
    let mut queue_broken = false;
    let mut seq = 0u32;
    let mut i = 0;
    while i < data.len() {
        let op = data[i] % 6;
        let arg = |k: usize| data.get(i + k).copied().unwrap_or(0) as usize;
        let (a1, a2, a3) = (arg(1), arg(2), arg(3));
        i += 4;
        match op {
            0 => {
                let s = a1 % 3;
                let (msg, mut sent) = pending[s].take().unwrap_or_else(|| {
                    seq += 1;
                    let len = (a2 * 256 + a3) % 2400;
                    ((0..len).map(|k| (k as u32 ^ seq) as u8).collect(), 0)
                });
                let mut ring = false;
                match txs[s].try_send(s as u8, &msg, &mut sent, &mut ring) {
                    Ok(true) => model[s].push_back(msg),
                    Ok(false) => pending[s] = Some((msg, sent)),
                    Err(e) => assert!(forged, "an honest send failed: {e}"),
                }
            }
            1 => {
                let s = a1 % 3;
                let k = [kind::MSG, kind::FIRST, kind::MORE, kind::CTRL, 0x55][a2 % 5];
                let body = vec![a3 as u8; a3 * 3];
                if k == 0x55 {
                    // Not a kind a producer may write: write the header
                    // word by hand at the reservation.
                    if let Ok(Some(r)) = txs[s].producer().reserve(8) {
                        // SAFETY: the header precedes the reserved payload.
                        unsafe {
                            (*(r.payload().sub(8) as *const std::sync::atomic::AtomicU64)).store(
                                record::encode(8, 0x55, 0) | (s as u64) << 48,
                                std::sync::atomic::Ordering::Release,
                            )
                        };
                        hostile[s] = true;
                        // The queue breaks at this record (bad type).
                        forged = true;
                    }
                } else if let Ok(Some(_)) = txs[s].producer().push(k, a3 as u8, &[&body]) {
                    hostile[s] = true;
                }
            }
            2 => {
                let max = a1 % 8 + 1;
                let mut got: Vec<(usize, u8, Vec<u8>)> = Vec::new();
                let before: Vec<bool> = (0..SLOTS).map(|s| rx.slot_broken(s)).collect();
                match rx.poll(max, &mut |s, t, m| got.push((s, t, m.to_vec()))) {
                    Ok((n, _)) => {
                        assert!(!queue_broken, "a broken queue delivered");
                        assert_eq!(n, got.len());
                        assert!(n <= max);
                        for (s, t, m) in got {
                            assert!(s < 3, "a message of slot {s}, never admitted");
                            assert!(!before[s], "a broken slot delivered");
                            assert!(m.len() <= LIMIT);
                            assert!(t < 255, "a tag at the limit was delivered");
                            if !hostile[s] && !forged {
                                let want = model[s].pop_front().expect("a message nobody sent");
                                assert_eq!((t as usize, m), (s, want), "slot {s}");
                            }
                        }
                        for (s, &h) in hostile.iter().enumerate().take(3) {
                            if !h && !forged {
                                assert!(!rx.slot_broken(s), "an honest slot broke");
                            }
                        }
                    }
                    Err(e) => {
                        assert!(matches!(e, Error::Broken(_)), "{e}");
                        assert!(forged, "an honest queue broke: {e}");
                        queue_broken = true;
                    }
                }
            }
            5 => {
                let s = a1 % 3;
                let max = a2 % 16 + 1;
                let broken = rx.slot_broken(s);
                let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
                let n = match rx.take_own(s, max, |i, r| {
                    assert_eq!(i, got.len());
                    assert_eq!((r.slot, r.kind), (s, kind::MSG));
                    assert!(r.len <= 500 && r.tag < 255);
                    let (lo, hi) = (base as usize + 4096, base as usize + geo.region_bytes());
                    assert!(r.ptr as usize >= lo && r.ptr as usize + r.len <= hi);
                    // SAFETY: inside the data area (checked above).
                    got.push((
                        r.tag,
                        unsafe { std::slice::from_raw_parts(r.ptr, r.len) }.to_vec(),
                    ));
                }) {
                    Ok(n) => n,
                    Err(e) => {
                        assert!(forged, "an honest queue broke: {e}");
                        queue_broken = true;
                        0
                    }
                };
                assert_eq!(n, got.len());
                assert!(n <= max);
                if n > 0 {
                    assert!(
                        !queue_broken && !broken,
                        "a broken queue or slot handed records up"
                    );
                    for (t, m) in got {
                        if !hostile[s] && !forged {
                            let want = model[s].pop_front().expect("a message nobody sent");
                            assert_eq!((t as usize, m), (s, want), "slot {s}, in place");
                        }
                    }
                    rx.release_taken();
                }
            }
            3 => {
                // The slot no handshake admitted.
                if let Ok(Some(_)) = txs[3].producer().push(kind::MSG, 3, &[b"out"]) {
                    forged = true;
                }
            }
            _ => {
                let off = (a1 * 256 + a2) * 8 % geo.region_bytes();
                // SAFETY: an 8-aligned word inside the region.
                unsafe {
                    (*(base.add(off) as *const std::sync::atomic::AtomicU64)).store(
                        (a3 as u64) << 40 | a3 as u64,
                        std::sync::atomic::Ordering::Release,
                    )
                };
                forged = true;
            }
        }
    }
}
