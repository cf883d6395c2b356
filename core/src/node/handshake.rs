//! The handshake codec: its messages, their encoding, the authentication
//! transcript and the two state machines. No I/O: the drivers in
//! `session.rs` move the bytes.
//!
//! Every message is a `CTRL` record on the TCP connection (the record
//! header of [`crate::record`], the message type as the tag). The
//! exchange, I the initiator (it connected), A the acceptor:
//!
//! ```text
//! I -> A  HELLO      version, nonce_i, I's public card
//! A -> I  CHALLENGE  nonce_a, A's public card
//! I -> A  AUTH       MAC(key_A, "initiator" | transcript)
//! A -> I  ACK        MAC(key_I, "acceptor"  | transcript)   (or REJECT:
//!                    MAC(key_I, "rejector" | transcript), when the two
//!                    connected to each other at once and this connection
//!                    loses)
//! then the path: OFFER/TCPONLY, MAPPED/REFUSED, SWITCH/ABORT
//! or, on the queue path: QOFFER, QMAPPED/REFUSED, MAPPED/REFUSED/ABORT,
//! SWITCH/ABORT
//! ```
//!
//! `transcript` is both public cards and both nonces. Each side proves that
//! it knows the *other* side's key, which only the job's members have (the
//! keys travel through the job's private channel, never the wire), and
//! checks the other's proof with its own key. Both nonces are fresh, so a
//! recorded handshake cannot be replayed to either side; the role labels
//! differ, so no proof can be reflected back. A proves itself only after I
//! did: an outsider learns nothing and costs A no lookup of a peer.
//!
//! The acceptor answers a failed check with `REFUSE` (a reason, no
//! secret) and closes.

use crate::card::{self, Card, Key};
use crate::error::{Error, Result};
use crate::record::{self, kind};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Version of the handshake (HELLO carries it).
pub const VERSION: u16 = 2;
/// Bytes of a nonce.
pub const NONCE: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const PROOF: usize = 32;
/// Longest reason text carried by a message.
pub const MAX_REASON: usize = 512;
/// Longest grant or doorbell descriptor in an offer.
pub const MAX_DESC: usize = 300 << 10;

/// Message types (the tag of the `CTRL` record).
pub mod ty {
    pub const HELLO: u8 = 1;
    pub const CHALLENGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const ACK: u8 = 4;
    pub const REJECT: u8 = 5;
    pub const REFUSE: u8 = 6;
    pub const OFFER: u8 = 7;
    pub const TCPONLY: u8 = 8;
    pub const MAPPED: u8 = 9;
    pub const REFUSED: u8 = 10;
    pub const SWITCH: u8 = 11;
    pub const ABORT: u8 = 12;
    pub const QOFFER: u8 = 13;
    pub const QMAPPED: u8 = 14;
}

/// Largest payload of a message of type `t` (`None`: unknown type).
pub fn max_payload(t: u8) -> Option<usize> {
    Some(match t {
        ty::HELLO => 4 + NONCE + card::MAX_LEN,
        ty::CHALLENGE => NONCE + card::MAX_LEN,
        ty::AUTH | ty::ACK | ty::REJECT => PROOF,
        ty::REFUSE | ty::TCPONLY | ty::REFUSED | ty::ABORT => MAX_REASON,
        ty::OFFER => 16 + 2 * MAX_DESC,
        ty::QOFFER => QOFFER_FIXED + 2 * MAX_DESC,
        ty::QMAPPED => 8 + QOFFER_FIXED + 2 * MAX_DESC,
        ty::MAPPED => 8,
        ty::SWITCH => 0,
        _ => return None,
    })
}

/// Bytes of a queue offer besides its two descriptors: data size, record
/// size, slots, slot and the descriptors' two lengths.
const QOFFER_FIXED: usize = 4 + 4 + 2 + 2 + 4 + 4;

/// A process's offer of a slot in its receive queue for the peer's domain
/// (the queue path): the queue's geometry, the slot, and the descriptors
/// to map the queue and reach its doorbell by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOffer {
    pub data_size: u32,
    pub max_record: u32,
    pub slots: u16,
    pub slot: u16,
    pub grant: Vec<u8>,
    pub bell: Vec<u8>,
}

impl QueueOffer {
    fn encode(&self, p: &mut Vec<u8>) {
        p.extend_from_slice(&self.data_size.to_le_bytes());
        p.extend_from_slice(&self.max_record.to_le_bytes());
        p.extend_from_slice(&self.slots.to_le_bytes());
        p.extend_from_slice(&self.slot.to_le_bytes());
        for b in [&self.grant, &self.bell] {
            p.extend_from_slice(&(b.len() as u32).to_le_bytes());
            p.extend_from_slice(b);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<QueueOffer> {
        Ok(QueueOffer {
            data_size: r.u32()?,
            max_record: r.u32()?,
            slots: r.u16()?,
            slot: r.u16()?,
            grant: r.blob(MAX_DESC)?.to_vec(),
            bell: r.blob(MAX_DESC)?.to_vec(),
        })
    }
}

/// The longest message before authentication (what an unauthenticated
/// connection may make the acceptor buffer).
pub const MAX_PREAUTH: usize = record::HEADER + 4 + NONCE + card::MAX_LEN;

/// A handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello {
        version: u16,
        nonce: [u8; NONCE],
        card: Card,
    },
    Challenge {
        nonce: [u8; NONCE],
        card: Card,
    },
    Auth([u8; PROOF]),
    Ack([u8; PROOF]),
    Reject([u8; PROOF]),
    Refuse(String),
    Offer {
        data_size: u32,
        max_record: u32,
        grant: Vec<u8>,
        bell: Vec<u8>,
    },
    TcpOnly(String),
    Mapped(u64),
    Refused(String),
    Switch,
    Abort(String),
    /// The initiator's queue for the acceptor's domain.
    QueueOffer(QueueOffer),
    /// The acceptor mapped the initiator's queue (the nonce it read there)
    /// and offers its own for the initiator's domain.
    QueueMapped {
        nonce: u64,
        offer: QueueOffer,
    },
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Protocol(format!("handshake: {what}"))
}

/// A reason as sent: valid UTF-8, at most [`MAX_REASON`] bytes.
fn clip(s: &str) -> &[u8] {
    let mut n = s.len().min(MAX_REASON);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

/// A reason as received: printable, whatever the peer sent.
fn reason(p: &[u8]) -> String {
    String::from_utf8_lossy(p)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("message too short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N"))
    }
    fn blob(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(bad(format_args!("descriptor of {n} bytes")));
        }
        self.take(n)
    }
    fn end(&self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(bad("trailing bytes"))
        }
    }
}

/// A public card from a message: no key may travel on the wire.
fn public_card(b: &[u8]) -> Result<Card> {
    let c = Card::from_bytes(b)?;
    if c.key.is_some() {
        return Err(bad("a card with a key on the wire"));
    }
    Ok(c)
}

impl Msg {
    /// The message type.
    pub fn ty(&self) -> u8 {
        match self {
            Msg::Hello { .. } => ty::HELLO,
            Msg::Challenge { .. } => ty::CHALLENGE,
            Msg::Auth(_) => ty::AUTH,
            Msg::Ack(_) => ty::ACK,
            Msg::Reject(_) => ty::REJECT,
            Msg::Refuse(_) => ty::REFUSE,
            Msg::Offer { .. } => ty::OFFER,
            Msg::TcpOnly(_) => ty::TCPONLY,
            Msg::Mapped(_) => ty::MAPPED,
            Msg::Refused(_) => ty::REFUSED,
            Msg::Switch => ty::SWITCH,
            Msg::Abort(_) => ty::ABORT,
            Msg::QueueOffer(_) => ty::QOFFER,
            Msg::QueueMapped { .. } => ty::QMAPPED,
        }
    }

    /// The message as a record: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Msg::Hello {
                version,
                nonce,
                card,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(&[0, 0]);
                p.extend_from_slice(nonce);
                p.extend_from_slice(&card.public_bytes());
            }
            Msg::Challenge { nonce, card } => {
                p.extend_from_slice(nonce);
                p.extend_from_slice(&card.public_bytes());
            }
            Msg::Auth(m) | Msg::Ack(m) | Msg::Reject(m) => p.extend_from_slice(m),
            Msg::Refuse(s) | Msg::TcpOnly(s) | Msg::Refused(s) | Msg::Abort(s) => {
                p.extend_from_slice(clip(s))
            }
            Msg::Offer {
                data_size,
                max_record,
                grant,
                bell,
            } => {
                p.extend_from_slice(&data_size.to_le_bytes());
                p.extend_from_slice(&max_record.to_le_bytes());
                for b in [grant, bell] {
                    p.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    p.extend_from_slice(b);
                }
            }
            Msg::Mapped(n) => p.extend_from_slice(&n.to_le_bytes()),
            Msg::Switch => {}
            Msg::QueueOffer(o) => o.encode(&mut p),
            Msg::QueueMapped { nonce, offer } => {
                p.extend_from_slice(&nonce.to_le_bytes());
                offer.encode(&mut p);
            }
        }
        let mut v = record::encode_bytes(p.len(), kind::CTRL, self.ty()).to_vec();
        v.extend_from_slice(&p);
        v
    }

    /// Checks a record header read from the connection: a `CTRL` record of
    /// a known message type, no longer than that type allows. Returns
    /// `(type, payload length)`.
    pub fn check_header(h: [u8; record::HEADER]) -> Result<(u8, usize)> {
        let (len, k, t) = record::parse(u64::from_le_bytes(h), u32::MAX as usize)?;
        if k != kind::CTRL {
            return Err(bad("a data record before the handshake ended"));
        }
        let max = max_payload(t).ok_or_else(|| bad(format_args!("unknown message {t}")))?;
        if len > max {
            return Err(bad(format_args!(
                "message {t} of {len} bytes (at most {max})"
            )));
        }
        Ok((t, len))
    }

    /// Decodes the payload of a message of type `t` (its header checked by
    /// [`Msg::check_header`]).
    pub fn decode(t: u8, p: &[u8]) -> Result<Msg> {
        let mut r = Reader(p);
        let m = match t {
            ty::HELLO => {
                let version = r.u16()?;
                r.take(2)?;
                let nonce = r.array()?;
                Msg::Hello {
                    version,
                    nonce,
                    card: public_card(r.0)?,
                }
            }
            ty::CHALLENGE => {
                let nonce = r.array()?;
                Msg::Challenge {
                    nonce,
                    card: public_card(r.0)?,
                }
            }
            ty::AUTH => Msg::Auth(r.array()?),
            ty::ACK => Msg::Ack(r.array()?),
            ty::REJECT => Msg::Reject(r.array()?),
            ty::REFUSE => Msg::Refuse(reason(p)),
            ty::TCPONLY => Msg::TcpOnly(reason(p)),
            ty::REFUSED => Msg::Refused(reason(p)),
            ty::ABORT => Msg::Abort(reason(p)),
            ty::OFFER => {
                let data_size = r.u32()?;
                let max_record = r.u32()?;
                let grant = r.blob(MAX_DESC)?.to_vec();
                let bell = r.blob(MAX_DESC)?.to_vec();
                Msg::Offer {
                    data_size,
                    max_record,
                    grant,
                    bell,
                }
            }
            ty::MAPPED => Msg::Mapped(r.u64()?),
            ty::SWITCH => Msg::Switch,
            ty::QOFFER => Msg::QueueOffer(QueueOffer::decode(&mut r)?),
            ty::QMAPPED => Msg::QueueMapped {
                nonce: r.u64()?,
                offer: QueueOffer::decode(&mut r)?,
            },
            _ => return Err(bad(format_args!("unknown message {t}"))),
        };
        if matches!(
            m,
            Msg::Auth(_)
                | Msg::Ack(_)
                | Msg::Reject(_)
                | Msg::Offer { .. }
                | Msg::Mapped(_)
                | Msg::Switch
                | Msg::QueueOffer(_)
                | Msg::QueueMapped { .. }
        ) {
            r.end()?;
        }
        Ok(m)
    }

    /// A short name for messages.
    pub fn name(t: u8) -> &'static str {
        match t {
            ty::HELLO => "HELLO",
            ty::CHALLENGE => "CHALLENGE",
            ty::AUTH => "AUTH",
            ty::ACK => "ACK",
            ty::REJECT => "REJECT",
            ty::REFUSE => "REFUSE",
            ty::OFFER => "OFFER",
            ty::TCPONLY => "TCPONLY",
            ty::MAPPED => "MAPPED",
            ty::REFUSED => "REFUSED",
            ty::SWITCH => "SWITCH",
            ty::ABORT => "ABORT",
            ty::QOFFER => "QOFFER",
            ty::QMAPPED => "QMAPPED",
            _ => "unknown",
        }
    }
}

/// Incremental decoder of a byte stream into messages, for the acceptor's
/// non-blocking connections. It never buffers more than one message, and
/// rejects a header announcing more than `max` bytes before reading on.
pub struct Decoder {
    buf: Vec<u8>,
    max: usize,
}

impl Decoder {
    /// A decoder for messages of at most `max` bytes (header included).
    pub fn new(max: usize) -> Self {
        Decoder {
            buf: Vec::with_capacity(max.min(4096)),
            max,
        }
    }

    /// How many more bytes the current message needs (at least 1).
    pub fn want(&self) -> usize {
        if self.buf.len() < record::HEADER {
            return record::HEADER - self.buf.len();
        }
        let h: [u8; 8] = self.buf[..8].try_into().expect("8");
        let len = record::len_of(u64::from_le_bytes(h)) as usize;
        (record::HEADER + len).saturating_sub(self.buf.len()).max(1)
    }

    /// Takes bytes (at most [`Decoder::want`] of them); returns a complete
    /// message when one is there.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Msg>> {
        if bytes.len() > self.want() {
            return Err(Error::Invalid("decoder fed past a message".into()));
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() < record::HEADER {
            return Ok(None);
        }
        let h: [u8; 8] = self.buf[..8].try_into().expect("8");
        let (t, len) = Msg::check_header(h)?;
        if record::HEADER + len > self.max {
            return Err(bad(format_args!(
                "{} of {len} bytes is not expected now",
                Msg::name(t)
            )));
        }
        if self.buf.len() < record::HEADER + len {
            return Ok(None);
        }
        let m = Msg::decode(t, &self.buf[record::HEADER..]);
        self.buf.clear();
        m.map(Some)
    }
}

/// HMAC-SHA256 of the length-prefixed `parts` under `key`.
pub fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Checks a proof in constant time.
fn verify(key: &[u8; 32], parts: &[&[u8]], proof: &[u8; PROOF]) -> bool {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m.verify_slice(proof).is_ok()
}

const LABEL: &[u8] = b"ivcom-handshake-v2";
const AS_INITIATOR: &[u8] = b"initiator";
const AS_ACCEPTOR: &[u8] = b"acceptor";
const AS_REJECTOR: &[u8] = b"rejector";

/// Both public cards and both nonces.
struct Transcript {
    initiator: Vec<u8>,
    acceptor: Vec<u8>,
    nonce_i: [u8; NONCE],
    nonce_a: [u8; NONCE],
}

impl Transcript {
    fn parts<'a>(&'a self, role: &'a [u8]) -> [&'a [u8]; 6] {
        [
            LABEL,
            role,
            &self.initiator,
            &self.acceptor,
            &self.nonce_i,
            &self.nonce_a,
        ]
    }
    fn prove(&self, role: &[u8], key: &Key) -> [u8; PROOF] {
        mac(&key.0, &self.parts(role))
    }
    fn check(&self, role: &[u8], key: &Key, proof: &[u8; PROOF]) -> bool {
        verify(&key.0, &self.parts(role), proof)
    }
}

/// Who the initiator expects to reach.
#[derive(Clone)]
pub enum Target {
    /// A node whose full card this side was given.
    Card(Card),
    /// Whoever answers at the address, if it is a member of the job that
    /// shares this secret.
    Psk(Key),
}

/// How the acceptor answered an authenticated initiator.
#[derive(Debug)]
pub enum Verdict {
    /// This connection carries the link to `peer` (the acceptor's card,
    /// with the key this side used).
    Accepted(Card),
    /// The two sides connected to each other at once and the other
    /// connection wins.
    Crossed(Card),
}

/// The initiator's state machine.
pub struct Initiator {
    me: Card,
    target: Target,
    nonce: [u8; NONCE],
    sent: Option<(Transcript, Card)>,
}

impl Initiator {
    /// Starts a handshake from `me` (this node's full card) to `target`;
    /// returns the state and the HELLO to send.
    pub fn start(me: &Card, target: Target, nonce: [u8; NONCE]) -> (Self, Msg) {
        let hello = Msg::Hello {
            version: VERSION,
            nonce,
            card: me.public(),
        };
        let s = Initiator {
            me: me.clone(),
            target,
            nonce,
            sent: None,
        };
        (s, hello)
    }

    /// Takes the acceptor's CHALLENGE; returns the AUTH to send.
    pub fn on_challenge(&mut self, m: Msg) -> Result<Msg> {
        let (nonce_a, card) = match m {
            Msg::Challenge { nonce, card } if self.sent.is_none() => (nonce, card),
            Msg::Refuse(why) => return Err(Error::Auth(format!("refused: {why}"))),
            m => {
                return Err(bad(format_args!(
                    "{} instead of CHALLENGE",
                    Msg::name(m.ty())
                )))
            }
        };
        let peer = match &self.target {
            Target::Card(want) => {
                if !want.same_node(&card) {
                    return Err(Error::Auth(format!(
                        "{} answered as {card}, expected {}",
                        want.addr,
                        want.public()
                    )));
                }
                want.clone()
            }
            Target::Psk(psk) => Card {
                key: Some(Key::derive(psk, card.id)),
                ..card
            },
        };
        if peer.id == self.me.id {
            return Err(Error::Auth("connected to itself".into()));
        }
        let key = peer
            .key
            .clone()
            .ok_or_else(|| Error::Invalid(format!("no key for {peer}")))?;
        let t = Transcript {
            initiator: self.me.public_bytes(),
            acceptor: peer.public_bytes(),
            nonce_i: self.nonce,
            nonce_a,
        };
        let auth = Msg::Auth(t.prove(AS_INITIATOR, &key));
        self.sent = Some((t, peer));
        Ok(auth)
    }

    /// Takes the acceptor's verdict (ACK or REJECT), checked against this
    /// node's own key.
    pub fn on_verdict(&mut self, m: Msg) -> Result<Verdict> {
        let (t, peer) = self.sent.take().ok_or_else(|| bad("verdict before AUTH"))?;
        let own = self
            .me
            .key
            .as_ref()
            .ok_or_else(|| Error::Invalid("this node's card has no key".into()))?;
        match m {
            Msg::Ack(p) if t.check(AS_ACCEPTOR, own, &p) => Ok(Verdict::Accepted(peer)),
            Msg::Reject(p) if t.check(AS_REJECTOR, own, &p) => Ok(Verdict::Crossed(peer)),
            Msg::Ack(_) | Msg::Reject(_) => Err(Error::Auth(format!(
                "{} failed to prove that it knows this node's key",
                peer.public()
            ))),
            Msg::Refuse(why) => Err(Error::Auth(format!("refused by {}: {why}", peer.public()))),
            m => Err(bad(format_args!("{} instead of ACK", Msg::name(m.ty())))),
        }
    }
}

/// The acceptor's state machine.
pub struct Acceptor {
    me: Card,
    nonce: [u8; NONCE],
    seen: Option<Transcript>,
    proven: bool,
}

impl Acceptor {
    /// A fresh acceptor for one connection.
    pub fn new(me: &Card, nonce: [u8; NONCE]) -> Self {
        Acceptor {
            me: me.clone(),
            nonce,
            seen: None,
            proven: false,
        }
    }

    /// Takes the HELLO; returns the CHALLENGE to send.
    pub fn on_hello(&mut self, m: Msg) -> Result<Msg> {
        let (version, nonce_i, card) = match m {
            Msg::Hello {
                version,
                nonce,
                card,
            } if self.seen.is_none() => (version, nonce, card),
            m => return Err(bad(format_args!("{} instead of HELLO", Msg::name(m.ty())))),
        };
        if version != VERSION {
            return Err(bad(format_args!(
                "version {version} (this node speaks {VERSION})"
            )));
        }
        if card.id == self.me.id {
            return Err(bad("a HELLO with this node's own id"));
        }
        self.seen = Some(Transcript {
            initiator: card.to_bytes(),
            acceptor: self.me.public_bytes(),
            nonce_i,
            nonce_a: self.nonce,
        });
        Ok(Msg::Challenge {
            nonce: self.nonce,
            card: self.me.public(),
        })
    }

    /// Takes the AUTH and checks it against this node's own key. On
    /// success returns the initiator's public card: a member of the job,
    /// whose claim to that card the caller still checks against the card it
    /// has for that id (or resolves).
    pub fn on_auth(&mut self, m: Msg) -> Result<Card> {
        let t = self.seen.as_ref().ok_or_else(|| bad("AUTH before HELLO"))?;
        let proof = match m {
            Msg::Auth(p) if !self.proven => p,
            m => return Err(bad(format_args!("{} instead of AUTH", Msg::name(m.ty())))),
        };
        let own = self
            .me
            .key
            .as_ref()
            .ok_or_else(|| Error::Invalid("this node's card has no key".into()))?;
        if !t.check(AS_INITIATOR, own, &proof) {
            return Err(Error::Auth(
                "authentication failed (the peer does not know this node's key)".into(),
            ));
        }
        self.proven = true;
        Card::from_bytes(&t.initiator)
    }

    /// The verdict for an authenticated initiator whose key is `peer_key`:
    /// ACK, or REJECT when this connection loses a crossing.
    pub fn verdict(&self, peer_key: &Key, accept: bool) -> Result<Msg> {
        let t = self
            .seen
            .as_ref()
            .filter(|_| self.proven)
            .ok_or_else(|| bad("verdict before a proven AUTH"))?;
        Ok(if accept {
            Msg::Ack(t.prove(AS_ACCEPTOR, peer_key))
        } else {
            Msg::Reject(t.prove(AS_REJECTOR, peer_key))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::BackendKind;

    fn node(id: u64) -> Card {
        Card {
            id,
            name: id << 8,
            backend: Some(BackendKind::Host),
            host_id: [3; 16],
            domain: 7,
            addr: "127.0.0.1:4000".parse().unwrap(),
            key: Some(Key::random()),
        }
    }

    fn wire(m: &Msg) -> Msg {
        let b = m.encode();
        let (t, len) = Msg::check_header(b[..8].try_into().unwrap()).unwrap();
        assert_eq!(len, b.len() - 8);
        Msg::decode(t, &b[8..]).unwrap()
    }

    /// A full exchange; returns what each side concluded.
    fn run(i: &Card, a: &Card, target: Target, accept: bool) -> (Result<Verdict>, Result<Card>) {
        let (mut ini, hello) = Initiator::start(i, target, [1; NONCE]);
        let mut acc = Acceptor::new(a, [2; NONCE]);
        let ch = acc.on_hello(wire(&hello)).unwrap();
        let auth = match ini.on_challenge(wire(&ch)) {
            Ok(m) => m,
            Err(e) => return (Err(e), Err(Error::Closed)),
        };
        let who = acc.on_auth(wire(&auth));
        let v = match &who {
            Ok(_) => acc.verdict(i.key.as_ref().unwrap(), accept).unwrap(),
            Err(e) => Msg::Refuse(e.to_string()),
        };
        (ini.on_verdict(wire(&v)), who)
    }

    #[test]
    fn both_sides_prove_their_knowledge() {
        let (i, a) = (node(1), node(2));
        let (v, who) = run(&i, &a, Target::Card(a.clone()), true);
        assert!(matches!(v.unwrap(), Verdict::Accepted(c) if c == a));
        assert_eq!(who.unwrap(), i.public());
        let (v, _) = run(&i, &a, Target::Card(a.clone()), false);
        assert!(matches!(v.unwrap(), Verdict::Crossed(_)));
    }

    #[test]
    fn a_wrong_key_fails_on_either_side() {
        let (i, a) = (node(1), node(2));
        // The initiator believes a different key for a: a refuses it.
        let mut fake = a.clone();
        fake.key = Some(Key::random());
        let (v, who) = run(&i, &a, Target::Card(fake), true);
        assert!(who
            .unwrap_err()
            .to_string()
            .contains("authentication failed"));
        assert!(v.unwrap_err().to_string().contains("refused"));
        // a answers with a wrong key for i: i refuses the answer.
        let (mut ini, hello) = Initiator::start(&i, Target::Card(a.clone()), [1; NONCE]);
        let mut acc = Acceptor::new(&a, [2; NONCE]);
        let ch = acc.on_hello(hello).unwrap();
        acc.on_auth(ini.on_challenge(ch).unwrap()).unwrap();
        let e = ini
            .on_verdict(acc.verdict(&Key::random(), true).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("failed to prove"), "{e}");
    }

    #[test]
    fn a_recorded_auth_does_not_replay() {
        let (i, a) = (node(1), node(2));
        let (mut ini, hello) = Initiator::start(&i, Target::Card(a.clone()), [1; NONCE]);
        let mut acc = Acceptor::new(&a, [2; NONCE]);
        let auth = ini
            .on_challenge(acc.on_hello(hello.clone()).unwrap())
            .unwrap();
        assert!(acc.on_auth(auth.clone()).is_ok());
        // The same HELLO and AUTH to a fresh connection (a new nonce_a).
        let mut acc2 = Acceptor::new(&a, [9; NONCE]);
        acc2.on_hello(hello).unwrap();
        assert!(matches!(acc2.on_auth(auth), Err(Error::Auth(_))));
        // A recorded ACK does not satisfy an initiator with a new nonce.
        let ack = acc.verdict(i.key.as_ref().unwrap(), true).unwrap();
        let (mut ini2, hello2) = Initiator::start(&i, Target::Card(a.clone()), [5; NONCE]);
        let mut acc3 = Acceptor::new(&a, [2; NONCE]);
        ini2.on_challenge(acc3.on_hello(hello2).unwrap()).unwrap();
        assert!(matches!(ini2.on_verdict(ack), Err(Error::Auth(_))));
    }

    #[test]
    fn no_proof_reflects_into_another_role() {
        // The acceptor's ACK proof, sent back as an AUTH, fails: the labels
        // differ (and so does the key).
        let (i, a) = (node(1), node(2));
        let (mut ini, hello) = Initiator::start(&i, Target::Card(a.clone()), [1; NONCE]);
        let mut acc = Acceptor::new(&a, [2; NONCE]);
        let ch = acc.on_hello(hello).unwrap();
        let Msg::Auth(p) = ini.on_challenge(ch).unwrap() else {
            panic!()
        };
        // Reflect the initiator's own proof as the acceptor's verdict.
        assert!(ini.on_verdict(Msg::Ack(p)).is_err());
    }

    #[test]
    fn psk_members_authenticate_by_address_only() {
        let psk = Key::random();
        let mut i = node(1);
        let mut a = node(2);
        i.key = Some(Key::derive(&psk, 1));
        a.key = Some(Key::derive(&psk, 2));
        let (v, who) = run(&i, &a, Target::Psk(psk), true);
        assert!(matches!(v.unwrap(), Verdict::Accepted(c) if c == a));
        assert_eq!(who.unwrap(), i.public());
        // Another job's secret does not.
        let (v, who) = run(&i, &a, Target::Psk(Key::random()), true);
        assert!(who.is_err() && v.is_err());
    }

    #[test]
    fn the_initiator_checks_who_answers() {
        let (i, a, b) = (node(1), node(2), node(3));
        let (mut ini, hello) = Initiator::start(&i, Target::Card(a.clone()), [1; NONCE]);
        let mut acc = Acceptor::new(&b, [2; NONCE]);
        let e = ini.on_challenge(acc.on_hello(hello).unwrap()).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_rejected() {
        let c = node(5).public();
        for m in [
            Msg::Hello {
                version: VERSION,
                nonce: [4; NONCE],
                card: c.clone(),
            },
            Msg::Challenge {
                nonce: [4; NONCE],
                card: c.clone(),
            },
            Msg::Auth([1; PROOF]),
            Msg::Ack([2; PROOF]),
            Msg::Reject([3; PROOF]),
            Msg::Refuse("no".into()),
            Msg::Offer {
                data_size: 4096,
                max_record: 1024,
                grant: vec![1, 2, 3],
                bell: vec![],
            },
            Msg::TcpOnly("why".into()),
            Msg::Mapped(77),
            Msg::Refused("x".into()),
            Msg::Switch,
            Msg::Abort("y".into()),
            Msg::QueueOffer(QueueOffer {
                data_size: 65536,
                max_record: 8320,
                slots: 256,
                slot: 7,
                grant: vec![9; 40],
                bell: vec![1],
            }),
            Msg::QueueMapped {
                nonce: u64::MAX - 3,
                offer: QueueOffer {
                    data_size: 4096,
                    max_record: 1024,
                    slots: 1,
                    slot: 0,
                    grant: vec![],
                    bell: vec![2, 3],
                },
            },
        ] {
            assert_eq!(wire(&m), m);
        }
        // a queue offer cut short, or with bytes after it
        let q = Msg::QueueOffer(QueueOffer {
            data_size: 4096,
            max_record: 1024,
            slots: 2,
            slot: 1,
            grant: vec![5; 3],
            bell: vec![],
        })
        .encode();
        let body = &q[record::HEADER..];
        assert!(Msg::decode(ty::QOFFER, &body[..body.len() - 1]).is_err());
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(Msg::decode(ty::QOFFER, &longer).is_err());
        assert!(Msg::decode(ty::QMAPPED, body).is_err());
        // a key on the wire
        let with_key = node(6);
        let mut p = vec![2, 0, 0, 0];
        p.extend_from_slice(&[0; NONCE]);
        p.extend_from_slice(&with_key.to_bytes());
        assert!(Msg::decode(ty::HELLO, &p).is_err());
        // lengths over the type's maximum, unknown types, data records
        let over = record::encode_bytes(PROOF + 1, kind::CTRL, ty::AUTH);
        assert!(Msg::check_header(over).is_err());
        assert!(Msg::check_header(record::encode_bytes(0, kind::CTRL, 99)).is_err());
        assert!(Msg::check_header(record::encode_bytes(0, kind::MSG, ty::SWITCH)).is_err());
        assert!(Msg::decode(ty::AUTH, &[0; PROOF - 1]).is_err());
        assert!(Msg::decode(ty::SWITCH, &[0]).is_err());
        // reasons are clipped and made printable
        let long = Msg::Refuse("é".repeat(400));
        let Msg::Refuse(s) = wire(&long) else {
            panic!()
        };
        assert!(s.len() <= MAX_REASON);
        assert_eq!(
            Msg::decode(ty::REFUSE, b"a\x1b[31mb").unwrap(),
            Msg::Refuse("a [31mb".into())
        );
    }

    #[test]
    fn the_decoder_buffers_one_bounded_message() {
        let m = Msg::Hello {
            version: VERSION,
            nonce: [4; NONCE],
            card: node(5).public(),
        };
        let b = m.encode();
        let mut d = Decoder::new(MAX_PREAUTH);
        let mut got = None;
        let mut off = 0;
        while off < b.len() {
            let n = d.want().min(3);
            got = d.feed(&b[off..off + n]).unwrap();
            off += n;
        }
        assert_eq!(got, Some(m));
        // an OFFER is legal, but not before authentication
        let big = record::encode_bytes(4000, kind::CTRL, ty::OFFER);
        assert!(Decoder::new(MAX_PREAUTH).feed(&big).is_err());
        assert!(Decoder::new(MAX_PREAUTH).feed(&[0xff; 8]).is_err());
    }

    #[test]
    fn a_hello_of_another_version_is_refused_by_name() {
        // A peer of another build (version 1 had another record format; a
        // later one may change anything) never reaches the proofs: the
        // acceptor names both versions and goes no further.
        let (i, a) = (node(1), node(2));
        for other in [VERSION - 1, VERSION + 1] {
            let hello = Msg::Hello {
                version: other,
                nonce: [1; NONCE],
                card: i.clone(),
            };
            let mut acc = Acceptor::new(&a, [2; NONCE]);
            let e = acc.on_hello(wire(&hello)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("version {other} (this node speaks {VERSION})")),
                "{e}"
            );
            // Nothing was recorded: the right HELLO still starts afresh.
            let (_, good) = Initiator::start(&i, Target::Card(a.clone()), [1; NONCE]);
            assert!(acc.on_hello(wire(&good)).is_ok());
        }
    }

    #[test]
    fn out_of_order_messages_are_protocol_errors() {
        let (i, a) = (node(1), node(2));
        let mut acc = Acceptor::new(&a, [2; NONCE]);
        assert!(acc.on_auth(Msg::Auth([0; PROOF])).is_err());
        assert!(acc.verdict(i.key.as_ref().unwrap(), true).is_err());
        let (mut ini, hello) = Initiator::start(&i, Target::Card(a.clone()), [1; NONCE]);
        assert!(ini.on_verdict(Msg::Ack([0; PROOF])).is_err());
        assert!(acc.on_hello(Msg::Switch).is_err());
        let ch = acc.on_hello(hello.clone()).unwrap();
        assert!(acc.on_hello(hello).is_err());
        let auth = ini.on_challenge(ch.clone()).unwrap();
        assert!(ini.on_challenge(ch).is_err());
        acc.on_auth(auth.clone()).unwrap();
        assert!(acc.on_auth(auth).is_err());
    }
}
