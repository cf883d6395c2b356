//! Message framing shared by the ring and TCP paths: a message that does not
//! fit in one record travels as a `FIRST` record (payload: the message length
//! as a little-endian u64, then data) followed by `MORE` records. Also the
//! one receive loop of both paths ([`Inbox`], [`poll_inbox`], [`take_one`]).

use crate::error::{Error, Result, Violation};
use crate::payload::Payload;
use crate::record::kind;

/// Per-direction counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages sent.
    pub tx_msgs: u64,
    /// Doorbells rung to wake the receiver. (Between the two counts every
    /// send adds to: side by side, the optimizer adds them with vector
    /// moves, more instructions than two adds.)
    pub tx_doorbells: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Messages received.
    pub rx_msgs: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
    /// Doorbells rung to wake a sender waiting for space.
    pub rx_doorbells: u64,
    /// Ring path: how far into its data area the sending ring has written
    /// so far (bytes from its start; the pages it touched). 0 on TCP.
    pub tx_reach: u64,
}

/// Splits a message into records of at most `max` payload bytes (`max` >
/// 8), calling `emit(kind, tag, parts)` for each. `sent` counts the bytes of
/// `msg` already emitted (start at 0); when `emit` returns `Ok(false)` (no
/// room) the function returns `Ok(false)` and the caller resumes later with
/// the same `sent`. Returns `Ok(true)` once the whole message is emitted.
pub fn fragment(
    tag: u8,
    msg: &[u8],
    max: usize,
    sent: &mut usize,
    mut emit: impl FnMut(u8, u8, &[&[u8]]) -> Result<bool>,
) -> Result<bool> {
    if *sent == 0 && msg.len() <= max {
        return emit(kind::MSG, tag, &[msg]).inspect(|&ok| {
            if ok {
                *sent = msg.len();
            }
        });
    }
    if *sent == 0 {
        let hdr = (msg.len() as u64).to_le_bytes();
        let n = max - 8;
        if !emit(kind::FIRST, tag, &[&hdr, &msg[..n]])? {
            return Ok(false);
        }
        *sent = n;
    }
    while *sent < msg.len() {
        let n = (msg.len() - *sent).min(max);
        if !emit(kind::MORE, tag, &[&msg[*sent..*sent + n]])? {
            return Ok(false);
        }
        *sent += n;
    }
    Ok(true)
}

/// The receive side of either path, one complete message at a time: the
/// ring's consumer with its reassembly ([`crate::channel::Channel`]) and the
/// TCP link's receive buffer ([`crate::tcp::TcpLink`]). [`poll_inbox`] is
/// the one poll loop of both.
pub trait Inbox {
    /// Whether a message may lie in memory the peer can still write (ring
    /// records): its view is then handed up as shared, never as a `&[u8]`.
    const PEER_WRITABLE: bool;
    /// The next complete message, as `(tag, pointer, len)`, valid until
    /// [`Inbox::release_msg`]; `None` when none is complete now.
    fn peek_msg(&mut self) -> Result<Option<(u8, *const u8, usize)>>;
    /// Consumes the message [`Inbox::peek_msg`] returned.
    fn release_msg(&mut self) -> Result<()>;
    /// Ends a batch of messages (the ring hands released space back).
    fn end_batch(&mut self) -> Result<()>;
}

/// Delivers up to `max` complete messages of `inbox` to `f(tag, bytes)`
/// without blocking; each view is valid only during its call. Returns how
/// many were delivered.
#[inline]
pub fn poll_inbox<I: Inbox>(
    inbox: &mut I,
    max: usize,
    f: &mut dyn FnMut(u8, Payload<'_>),
) -> Result<usize> {
    let mut n = 0;
    while n < max {
        let Some((tag, p, len)) = inbox.peek_msg()? else {
            break;
        };
        let m = if I::PEER_WRITABLE {
            // SAFETY: p/len describe the message until release_msg (ring
            // space or the reassembly buffer), and the view ends with f.
            unsafe { Payload::shared(p, len) }
        } else {
            // SAFETY: p/len describe memory private to this link (the
            // receive or reassembly buffer) until release_msg.
            Payload::private(unsafe { std::slice::from_raw_parts(p, len) })
        };
        f(tag, m);
        inbox.release_msg()?;
        n += 1;
    }
    inbox.end_batch()?;
    Ok(n)
}

/// One non-blocking receive attempt for the blocking `recv` of both paths:
/// `poll(max, f)` is asked for one message, which is copied into `out`.
/// Returns its tag, or `None` when nothing was there.
pub fn take_one(
    out: &mut Vec<u8>,
    poll: impl FnOnce(usize, &mut dyn FnMut(u8, Payload<'_>)) -> Result<usize>,
) -> Result<Option<u8>> {
    let mut tag = 0;
    let got = poll(1, &mut |t, m| {
        tag = t;
        out.clear();
        m.append_to(out);
    })?;
    Ok((got == 1).then_some(tag))
}

/// What a record means to the receiver.
pub enum Delivery<'a> {
    /// A complete message, in place (whole-record messages) or reassembled.
    Message(u8, Payload<'a>),
    /// A fragment was absorbed; nothing to deliver yet.
    Partial,
}

/// Buffers of reassembled messages larger than this are freed once the
/// message was delivered (a big message must not pin its memory).
const KEEP_BUFFER: usize = 1 << 20;

/// Reassembles fragmented messages. The buffer grows as fragments arrive:
/// a `FIRST` record announces a total, but nothing is reserved for it (a
/// hostile peer could announce anything); the total only bounds what may
/// follow, and is itself bounded by `max_message`.
#[derive(Default)]
pub struct Reassembly {
    buf: Vec<u8>,
    total: usize,
    tag: u8,
    active: bool,
    /// Largest message accepted.
    pub max_message: usize,
}

impl Reassembly {
    /// A reassembler accepting messages up to `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Reassembly {
            max_message,
            ..Default::default()
        }
    }

    /// Feeds one record. `data` is the record payload (copied out once).
    pub fn feed<'a>(&'a mut self, k: u8, tag: u8, data: Payload<'a>) -> Result<Delivery<'a>> {
        match k {
            kind::MSG if !self.active => Ok(Delivery::Message(tag, data)),
            kind::FIRST if !self.active => {
                if data.len() < 8 {
                    return Err(Violation::BadLength.into());
                }
                let mut t = [0u8; 8];
                data.read_at(0, &mut t);
                let total = u64::from_le_bytes(t);
                let body = data.slice(8, data.len() - 8);
                if total > self.max_message as u64 {
                    return Err(Error::TooLarge {
                        len: total.min(usize::MAX as u64) as usize,
                        max: self.max_message,
                    });
                }
                let total = total as usize;
                if total <= body.len() {
                    return Err(Violation::BadLength.into());
                }
                if self.buf.capacity() > KEEP_BUFFER {
                    self.buf = Vec::new();
                }
                self.buf.clear();
                body.append_to(&mut self.buf);
                self.total = total;
                self.tag = tag;
                self.active = true;
                Ok(Delivery::Partial)
            }
            kind::MORE if self.active => {
                if data.len() > self.total - self.buf.len() {
                    return Err(Violation::BadLength.into());
                }
                data.append_to(&mut self.buf);
                if self.buf.len() == self.total {
                    self.active = false;
                    Ok(Delivery::Message(self.tag, Payload::private(&self.buf)))
                } else {
                    Ok(Delivery::Partial)
                }
            }
            _ => Err(Violation::BadSequence.into()),
        }
    }

    /// True while a fragmented message is incomplete.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Bytes of the buffer (for tests of the growth rule).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_reassemble() {
        for len in [0usize, 1, 63, 64, 65, 200, 1000] {
            let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut recs: Vec<(u8, u8, Vec<u8>)> = Vec::new();
            let mut sent = 0;
            let done = fragment(9, &msg, 64, &mut sent, |k, t, parts| {
                recs.push((k, t, parts.concat()));
                Ok(true)
            })
            .unwrap();
            assert!(done);
            assert_eq!(sent, len);
            let mut r = Reassembly::new(1 << 20);
            let mut got = None;
            for (k, t, d) in &recs {
                assert!(d.len() <= 64);
                if let Delivery::Message(tag, m) = r.feed(*k, *t, Payload::private(d)).unwrap() {
                    got = Some((tag, m.to_vec()));
                }
            }
            assert_eq!(got, Some((9, msg)));
        }
    }

    fn p(b: &[u8]) -> Payload<'_> {
        Payload::private(b)
    }

    #[test]
    fn hostile_sequences_rejected() {
        let mut r = Reassembly::new(100);
        assert!(r.feed(kind::MORE, 0, p(b"x")).is_err());
        let mut r = Reassembly::new(100);
        assert!(r.feed(kind::FIRST, 0, p(&1000u64.to_le_bytes())).is_err());
        let mut r = Reassembly::new(100);
        assert!(r.feed(kind::FIRST, 0, p(&u64::MAX.to_le_bytes())).is_err());
        let mut r = Reassembly::new(100);
        assert!(r.feed(kind::FIRST, 0, p(&[1, 2])).is_err());
        let mut r = Reassembly::new(100);
        let mut first = 10u64.to_le_bytes().to_vec();
        first.extend_from_slice(b"abc");
        assert!(matches!(
            r.feed(kind::FIRST, 0, p(&first)),
            Ok(Delivery::Partial)
        ));
        assert!(r.feed(kind::MSG, 0, p(b"x")).is_err());
        let mut r2 = Reassembly::new(100);
        r2.feed(kind::FIRST, 0, p(&first)).ok();
        assert!(r2.feed(kind::MORE, 0, p(&[0u8; 8])).is_err());
    }

    #[test]
    fn the_buffer_grows_with_the_fragments_not_the_announced_total() {
        // A FIRST announcing 512 MiB with 8 bytes of data: nothing near the
        // total is reserved, and the buffer grows only as fragments come.
        let mut r = Reassembly::new(1 << 30);
        let mut first = (512u64 << 20).to_le_bytes().to_vec();
        first.extend_from_slice(&[1; 8]);
        assert!(matches!(
            r.feed(kind::FIRST, 0, p(&first)),
            Ok(Delivery::Partial)
        ));
        assert!(r.capacity() < 4096, "{}", r.capacity());
        for _ in 0..16 {
            r.feed(kind::MORE, 0, p(&[2; 4096])).unwrap();
        }
        assert!(r.capacity() < 4 * 16 * 4096, "{}", r.capacity());
    }
}
