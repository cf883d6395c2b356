//! The locality card a rank publishes (for Open MPI, through the modex):
//! who it is, which backend it shares pages with, on which host, where its
//! TCP listener is, and the secret key its peers must prove they know.
//!
//! A card has two forms. The *full* card carries the node's [`Key`] and
//! travels only through a channel the job trusts (the Open MPI modex, a
//! file of mode 0600); only holders of the full card can become peers of
//! the node. The *public* card (`key: None`) is what the handshake sends
//! on the wire and what messages print.
//!
//! Binary form (little-endian, 52 or 64 bytes, 32 more with the key):
//! `"IVC2"`, version u8 (2), backend u8 (0 none, 1 host, 2 xen), family u8
//! (4 or 6), flags u8 (bit 0: a key follows the address), id u64, name u64,
//! domain u32, port u16, reserved u16 (0), host id (16 bytes), address
//! (4 or 16 bytes), key (32 bytes) when flagged.
//!
//! Printable form: `ivcom2:<backend>:<host id hex>:<domain>:<id hex>:<name
//! hex>:<addr>`, followed by `/key=<hex>` in the full form
//! ([`Card::to_secret_string`]); `Display` never prints the key.

use crate::error::{Error, Result};
use crate::hypervisor::{host::hex, BackendKind};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A node's secret key: 32 random bytes. Peers prove that they know it in
/// the handshake; it is never sent on the wire.
#[derive(Clone)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// A fresh key from the kernel's random source.
    pub fn random() -> Key {
        Key(crate::hypervisor::random_bytes::<32>())
    }

    /// The key of node `id` in a job that shares the secret `psk` (see
    /// [`crate::Config::psk`]).
    pub fn derive(psk: &Key, id: u64) -> Key {
        Key(crate::node::handshake::mac(
            &psk.0,
            &[b"ivcom-psk-node-key-v2", &id.to_le_bytes()],
        ))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Key> {
        let b = unhex(s)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Error::Invalid("a key is 64 hex digits".into()))?;
        Ok(Key(b.try_into().expect("32 bytes")))
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl PartialEq for Key {
    /// Compares in constant time.
    fn eq(&self, other: &Key) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}
impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// A rank's locality card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    /// Random identity of the node (also orders crossing connections).
    pub id: u64,
    /// The owner's name for the node (Open MPI: job id and rank); 0 when
    /// unused. A resolver looks peers up by it ([`crate::Config::resolve`]).
    pub name: u64,
    /// Backend that can share pages, if any.
    pub backend: Option<BackendKind>,
    /// Host identity of that backend.
    pub host_id: [u8; 16],
    /// Domain id within the host (Xen domid; host backend: process id).
    pub domain: u32,
    /// TCP listener (fallback path and control plane).
    pub addr: SocketAddr,
    /// The node's secret key (full card only).
    pub key: Option<Key>,
}

const MAGIC: &[u8; 4] = b"IVC2";
const VERSION: u8 = 2;
const FLAG_KEY: u8 = 1;
/// Bytes of a public IPv4 card, the smallest valid card.
pub const MIN_LEN: usize = 52;
/// Bytes of a full IPv6 card, the largest valid card.
pub const MAX_LEN: usize = 96;

impl Card {
    /// The card without its key.
    pub fn public(&self) -> Card {
        Card {
            key: None,
            ..self.clone()
        }
    }

    /// A short description for messages: id, name and address.
    pub fn label(&self) -> String {
        format!("{:016x} (name {:#x}) at {}", self.id, self.name, self.addr)
    }

    /// Whether two cards describe the same node (everything but the key).
    pub fn same_node(&self, other: &Card) -> bool {
        self.id == other.id
            && self.name == other.name
            && self.backend == other.backend
            && self.host_id == other.host_id
            && self.domain == other.domain
            && self.addr == other.addr
    }

    /// Serializes the card (with its key, if it has one).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAX_LEN);
        v.extend_from_slice(MAGIC);
        v.push(VERSION);
        v.push(self.backend.map_or(0, |b| b as u8));
        v.push(if self.addr.is_ipv4() { 4 } else { 6 });
        v.push(if self.key.is_some() { FLAG_KEY } else { 0 });
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.name.to_le_bytes());
        v.extend_from_slice(&self.domain.to_le_bytes());
        v.extend_from_slice(&self.addr.port().to_le_bytes());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&self.host_id);
        match self.addr.ip() {
            IpAddr::V4(a) => v.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => v.extend_from_slice(&a.octets()),
        }
        if let Some(k) = &self.key {
            v.extend_from_slice(&k.0);
        }
        v
    }

    /// The public card's bytes (what the handshake sends).
    pub fn public_bytes(&self) -> Vec<u8> {
        self.public().to_bytes()
    }

    /// Parses a card (public or full); rejects anything malformed.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::Protocol(format!("bad card: {why}"));
        // A card of another build of ivcom (its own "IVC" magic, another
        // format digit) says so, whatever its length: a job across builds
        // then stops naming both formats, not "bad magic".
        if b.len() >= 4 && b[..3] == MAGIC[..3] && b[3] != MAGIC[3] {
            let f = b[3];
            let f = if f.is_ascii_graphic() {
                char::from(f).to_string()
            } else {
                format!("\\x{f:02x}")
            };
            let ours = char::from(MAGIC[3]);
            return Err(bad(&format!(
                "format IVC{f} of another ivcom build (this build reads IVC{ours})"
            )));
        }
        if b.len() < MIN_LEN || &b[..4] != MAGIC {
            return Err(bad("length or magic"));
        }
        if b[4] != VERSION {
            return Err(bad(&format!(
                "version {} (this build reads {VERSION})",
                b[4]
            )));
        }
        let backend = match b[5] {
            0 => None,
            x => Some(BackendKind::from_u8(x).ok_or_else(|| bad("backend"))?),
        };
        if b[7] & !FLAG_KEY != 0 || b[30..32] != [0, 0] {
            return Err(bad("reserved bits"));
        }
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
        let id = word(8);
        let name = word(16);
        let domain = u32::from_le_bytes(b[24..28].try_into().expect("4"));
        let port = u16::from_le_bytes(b[28..30].try_into().expect("2"));
        let host_id: [u8; 16] = b[32..48].try_into().expect("16");
        let alen = match b[6] {
            4 => 4,
            6 => 16,
            _ => return Err(bad("address family")),
        };
        let klen = if b[7] & FLAG_KEY != 0 { 32 } else { 0 };
        if b.len() != 48 + alen + klen {
            return Err(bad("length"));
        }
        let ip = if alen == 4 {
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&b[48..52]).expect("4")))
        } else {
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&b[48..64]).expect("16"),
            ))
        };
        let key = (klen > 0).then(|| Key(b[48 + alen..].try_into().expect("32")));
        Ok(Card {
            id,
            name,
            backend,
            host_id,
            domain,
            addr: SocketAddr::new(ip, port),
            key,
        })
    }

    /// Whether the backends say the two cards' domains may share a host.
    pub fn ring_candidate(&self, other: &Card) -> bool {
        self.backend.is_some() && self.backend == other.backend && self.host_id == other.host_id
    }

    /// The printable form with the key (for a private channel only).
    pub fn to_secret_string(&self) -> String {
        match &self.key {
            Some(k) => format!("{self}/key={}", k.to_hex()),
            None => self.to_string(),
        }
    }

    /// Parses the printable form (public or full).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::Protocol(format!("bad card string '{}'", Card::redact(s)));
        let (s, key) = match s.split_once("/key=") {
            Some((c, k)) => (c, Some(Key::from_hex(k).map_err(|_| bad())?)),
            None => (s, None),
        };
        let rest = s.strip_prefix("ivcom2:").ok_or_else(bad)?;
        let f: Vec<&str> = rest.splitn(6, ':').collect();
        if f.len() != 6 {
            return Err(bad());
        }
        let backend = match f[0] {
            "none" => None,
            "host" => Some(BackendKind::Host),
            "xen" => Some(BackendKind::Xen),
            _ => return Err(bad()),
        };
        let host_id: [u8; 16] = unhex(f[1])
            .and_then(|v| v.try_into().ok())
            .ok_or_else(bad)?;
        let hex64 = |x: &str| {
            (x.len() == 16)
                .then(|| u64::from_str_radix(x, 16).ok())
                .flatten()
                .ok_or_else(bad)
        };
        Ok(Card {
            backend,
            host_id,
            domain: f[2].parse().map_err(|_| bad())?,
            id: hex64(f[3])?,
            name: hex64(f[4])?,
            addr: f[5].parse().map_err(|_| bad())?,
            key,
        })
    }

    /// `s` with any key replaced, for messages.
    fn redact(s: &str) -> String {
        match s.split_once("/key=") {
            Some((c, _)) => format!("{c}/key=..."),
            None => s.to_string(),
        }
    }
}

/// Bytes of an even-length string of hex digits.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

impl fmt::Display for Card {
    /// The public printable form (never the key).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.backend.map_or("none".to_string(), |b| b.to_string());
        write!(
            f,
            "ivcom2:{b}:{}:{}:{:016x}:{:016x}:{}",
            hex(&self.host_id),
            self.domain,
            self.id,
            self.name,
            self.addr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(addr: &str, key: bool) -> Card {
        Card {
            id: 0xdead_beef_0102_0304,
            name: 0x0000_0007_0000_0003,
            backend: Some(BackendKind::Host),
            host_id: [7; 16],
            domain: 42,
            addr: addr.parse().unwrap(),
            key: key.then(Key::random),
        }
    }

    #[test]
    fn round_trips_with_and_without_key() {
        for addr in ["10.1.2.3:4567", "[::1]:80"] {
            for key in [false, true] {
                let c = card(addr, key);
                let b = c.to_bytes();
                assert!((MIN_LEN..=MAX_LEN).contains(&b.len()));
                assert_eq!(Card::from_bytes(&b).unwrap(), c);
                assert_eq!(Card::parse(&c.to_secret_string()).unwrap(), c);
                assert_eq!(Card::parse(&c.to_string()).unwrap(), c.public());
                assert_eq!(Card::from_bytes(&c.public_bytes()).unwrap(), c.public());
                assert!(Card::from_bytes(&b).unwrap().same_node(&c.public()));
            }
        }
    }

    #[test]
    fn the_key_is_never_displayed() {
        let c = card("10.1.2.3:4567", true);
        let k = c.key.as_ref().unwrap().to_hex();
        assert!(!c.to_string().contains(&k));
        assert!(!format!("{c:?}").contains(&k));
        assert!(c.to_secret_string().contains(&k));
        let mut bad = c.to_secret_string();
        bad.replace_range(0..6, "ivcom9");
        let e = Card::parse(&bad).unwrap_err().to_string();
        assert!(!e.contains(&k), "{e}");
    }

    #[test]
    fn derived_keys_differ_per_node_and_psk() {
        let psk = Key::random();
        assert_eq!(Key::derive(&psk, 1), Key::derive(&psk, 1));
        assert_ne!(Key::derive(&psk, 1), Key::derive(&psk, 2));
        assert_ne!(Key::derive(&psk, 1), Key::derive(&Key::random(), 1));
    }

    #[test]
    fn a_card_of_another_build_names_both_formats() {
        // An older build's card ("IVC1", shorter) and a made-up later one.
        for (magic, shown) in [
            (*b"IVC1", "IVC1"),
            (*b"IVC3", "IVC3"),
            (*b"IVC\x07", "IVC\\x07"),
        ] {
            let mut b = card("1.2.3.4:5", true).to_bytes();
            b[..4].copy_from_slice(&magic);
            for len in [4, 40, b.len()] {
                let e = Card::from_bytes(&b[..len]).unwrap_err().to_string();
                assert!(
                    e.contains(&format!(
                        "format {shown} of another ivcom build (this build reads IVC2)"
                    )),
                    "{e}"
                );
            }
        }
        let mut b = card("1.2.3.4:5", true).to_bytes();
        b[4] = 9;
        let e = Card::from_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("version 9 (this build reads 2)"), "{e}");
        // Not ours at all: the plain message.
        let mut b = card("1.2.3.4:5", true).to_bytes();
        b[..4].copy_from_slice(b"XYZ2");
        let e = Card::from_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("length or magic"), "{e}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Card::from_bytes(b"").is_err());
        assert!(Card::from_bytes(&[0u8; 52]).is_err());
        let good = card("1.2.3.4:5", true).to_bytes();
        let mut b = good.clone();
        b[5] = 9;
        assert!(Card::from_bytes(&b).is_err());
        let mut b = good.clone();
        b[7] = 3; // unknown flag
        assert!(Card::from_bytes(&b).is_err());
        let mut b = good.clone();
        b[30] = 1; // reserved
        assert!(Card::from_bytes(&b).is_err());
        // a key flag without the key, a key without the flag
        assert!(Card::from_bytes(&good[..52]).is_err());
        let mut b = good[..52].to_vec();
        b[7] = 0;
        b.extend_from_slice(&[1; 32]);
        assert!(Card::from_bytes(&b).is_err());
        for n in 0..good.len() {
            assert!(Card::from_bytes(&good[..n]).is_err(), "{n} bytes");
        }
        assert!(Card::parse("ivcom2:host:zz:1:1.2.3.4:5:1").is_err());
        let euro = format!(
            "ivcom2:host:\u{20ac}{}:1:{}:{}:1.2.3.4:5",
            "0".repeat(29),
            "0".repeat(16),
            "0".repeat(16)
        );
        assert!(Card::parse(&euro).is_err());
        assert!(Card::parse(&format!("{}/key=abc", card("1.2.3.4:5", false))).is_err());
    }
}
