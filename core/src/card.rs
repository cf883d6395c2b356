//! The locality card a rank publishes (for Open MPI, through the modex):
//! who it is, which backend it shares pages with, on which host, and where
//! its TCP listener is.
//!
//! Binary form (little-endian, 44 or 56 bytes):
//! `"IVC1"`, version u8 (1), backend u8 (0 none, 1 host, 2 xen), family u8
//! (4 or 6), reserved u8, id u64, domain u32, port u16, reserved u16,
//! host id [16], address [4 or 16].
//!
//! Printable form: `ivcom1:<backend>:<host id hex>:<domain>:<addr>:<id hex>`.

use crate::error::{Error, Result};
use crate::hypervisor::{host::hex, BackendKind};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A rank's locality card.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Card {
    /// Random identity of the node (also orders crossing connections).
    pub id: u64,
    /// Backend that can share pages, if any.
    pub backend: Option<BackendKind>,
    /// Host identity of that backend.
    pub host_id: [u8; 16],
    /// Domain id within the host (Xen domid; host backend: process id).
    pub domain: u32,
    /// TCP listener (fallback path and control plane).
    pub addr: SocketAddr,
}

const MAGIC: &[u8; 4] = b"IVC1";

impl Card {
    /// Serializes the card.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(52);
        v.extend_from_slice(MAGIC);
        v.push(1);
        v.push(self.backend.map_or(0, |b| b as u8));
        v.push(if self.addr.is_ipv4() { 4 } else { 6 });
        v.push(0);
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.domain.to_le_bytes());
        v.extend_from_slice(&self.addr.port().to_le_bytes());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&self.host_id);
        match self.addr.ip() {
            IpAddr::V4(a) => v.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => v.extend_from_slice(&a.octets()),
        }
        v
    }

    /// Parses a card; rejects anything malformed.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::Protocol(format!("bad card: {why}"));
        // 44 bytes is the smallest valid card (IPv4).
        if b.len() < 44 || &b[..4] != MAGIC {
            return Err(bad("length or magic"));
        }
        if b[4] != 1 {
            return Err(bad("version"));
        }
        let backend = match b[5] {
            0 => None,
            x => Some(BackendKind::from_u8(x).ok_or_else(|| bad("backend"))?),
        };
        let id = u64::from_le_bytes(b[8..16].try_into().expect("8"));
        let domain = u32::from_le_bytes(b[16..20].try_into().expect("4"));
        let port = u16::from_le_bytes(b[20..22].try_into().expect("2"));
        let host_id: [u8; 16] = b[24..40].try_into().map_err(|_| bad("length"))?;
        let ip = match (b[6], b.len()) {
            (4, 44) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&b[40..44]).expect("4"))),
            (6, 56) => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&b[40..56]).expect("16"),
            )),
            _ => return Err(bad("address")),
        };
        Ok(Card {
            id,
            backend,
            host_id,
            domain,
            addr: SocketAddr::new(ip, port),
        })
    }

    /// Whether the backends say the two cards' domains may share a host.
    pub fn ring_candidate(&self, other: &Card) -> bool {
        self.backend.is_some() && self.backend == other.backend && self.host_id == other.host_id
    }

    /// Parses the printable form.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::Protocol(format!("bad card string '{s}'"));
        let rest = s.strip_prefix("ivcom1:").ok_or_else(bad)?;
        let mut it = rest.splitn(4, ':');
        let backend = match it.next().ok_or_else(bad)? {
            "none" => None,
            "host" => Some(BackendKind::Host),
            "xen" => Some(BackendKind::Xen),
            _ => return Err(bad()),
        };
        let hid = it.next().ok_or_else(bad)?;
        if hid.len() != 32 || !hid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut host_id = [0u8; 16];
        for (i, b) in host_id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hid[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let domain = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let tail = it.next().ok_or_else(bad)?;
        let (addr, id) = tail.rsplit_once(':').ok_or_else(bad)?;
        Ok(Card {
            id: u64::from_str_radix(id, 16).map_err(|_| bad())?,
            backend,
            host_id,
            domain,
            addr: addr.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.backend.map_or("none".to_string(), |b| b.to_string());
        write!(
            f,
            "ivcom1:{b}:{}:{}:{}:{:016x}",
            hex(&self.host_id),
            self.domain,
            self.addr,
            self.id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for addr in ["10.1.2.3:4567", "[::1]:80"] {
            let c = Card {
                id: 0xdead_beef_0102_0304,
                backend: Some(BackendKind::Host),
                host_id: [7; 16],
                domain: 42,
                addr: addr.parse().unwrap(),
            };
            assert_eq!(Card::from_bytes(&c.to_bytes()).unwrap(), c);
            assert_eq!(Card::parse(&c.to_string()).unwrap(), c);
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(Card::from_bytes(b"").is_err());
        assert!(Card::from_bytes(&[0u8; 44]).is_err());
        let mut b = Card {
            id: 1,
            backend: None,
            host_id: [0; 16],
            domain: 0,
            addr: "1.2.3.4:5".parse().unwrap(),
        }
        .to_bytes();
        b[5] = 9;
        assert!(Card::from_bytes(&b).is_err());
        assert!(Card::parse("ivcom1:host:zz:1:1.2.3.4:5:1").is_err());
        // Found by the fuzzer: short cards and non-ASCII host ids.
        for n in 36..44 {
            let mut short = b"IVC1".to_vec();
            short.extend([1, 0, 4, 0]);
            short.resize(n, 0);
            assert!(Card::from_bytes(&short).is_err());
        }
        let euro = format!("ivcom1:host:\u{20ac}{}:1:1.2.3.4:5:1", "0".repeat(29));
        assert!(Card::parse(&euro).is_err());
    }
}
