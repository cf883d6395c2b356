//! The two descriptors the xen backend sends to the peer over the control
//! connection, and their strict parsers (the bytes come from an untrusted
//! peer).
//!
//! Both start with the same 12-byte header, all integers little endian:
//!
//! ```text
//! offset size field
//!      0    4 magic     "IVXG" (grant list) or "IVXE" (event channel)
//!      4    2 version   1
//!      6    2 owner     domid of the domain that granted / allocated
//!      8    2 grantee   domid of the domain allowed to map / bind
//!     10    2 reserved  0
//! ```
//!
//! Grant list (`IVXG`): then `count: u32` and `count` grant references
//! (`u32` each), one per 4 KiB page of the region in order; total length
//! exactly `16 + 4 * count`. Event channel (`IVXE`): then `port: u32`;
//! total length exactly 16.
//!
//! A parser checks everything it can: magic, version, reserved bits, that
//! owner and grantee are the two domains of this link, that the page count
//! is exactly what the agreed region length needs and is bounded, the exact
//! length, and that references and ports are in range (no reserved grant
//! reference, no duplicate, no port 0).

use super::abi::{DomId, EvtchnPort, GrantRef, GNTTAB_NR_RESERVED_ENTRIES, XEN_PAGE_SIZE};
use crate::error::{Error, Result};

/// Magic of a grant-list descriptor.
pub const GRANT_MAGIC: [u8; 4] = *b"IVXG";
/// Magic of an event-channel descriptor.
pub const BELL_MAGIC: [u8; 4] = *b"IVXE";
/// The descriptor format version.
pub const VERSION: u16 = 1;
/// Bytes of the common header.
pub const HEADER: usize = 12;
/// Bytes before the first grant reference of a grant list.
pub const GRANT_FIXED: usize = HEADER + 4;
/// Bytes of an event-channel descriptor.
pub const BELL_LEN: usize = HEADER + 4;
/// Most pages one region may have (256 MiB; also the per-request limit of
/// recent gntdev drivers).
pub const MAX_PAGES: usize = 1 << 16;
/// Ports at or above this do not exist under any event-channel ABI
/// (the FIFO ABI's 2^17).
pub const MAX_PORT: EvtchnPort = 1 << 17;

fn bad(what: &str, why: impl std::fmt::Display) -> Error {
    Error::Backend(format!("malformed {what} descriptor from peer: {why}"))
}

fn header(magic: [u8; 4], owner: DomId, grantee: DomId) -> Vec<u8> {
    let mut v = Vec::with_capacity(GRANT_FIXED);
    v.extend_from_slice(&magic);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&owner.to_le_bytes());
    v.extend_from_slice(&grantee.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Checks the common header against the domains of this link.
fn check_header(what: &str, b: &[u8], magic: [u8; 4], owner: DomId, grantee: DomId) -> Result<()> {
    if b.len() < HEADER {
        return Err(bad(
            what,
            format_args!("{} bytes, shorter than the header", b.len()),
        ));
    }
    if b[..4] != magic {
        return Err(bad(what, "wrong magic"));
    }
    let version = u16_at(b, 4).unwrap_or(0);
    if version != VERSION {
        return Err(bad(
            what,
            format_args!("version {version}, expected {VERSION}"),
        ));
    }
    let o = u16_at(b, 6).unwrap_or(u16::MAX);
    if o != owner {
        return Err(bad(
            what,
            format_args!("made by domain {o}, expected {owner}"),
        ));
    }
    let g = u16_at(b, 8).unwrap_or(u16::MAX);
    if g != grantee {
        return Err(bad(
            what,
            format_args!("made for domain {g}, but this is domain {grantee}"),
        ));
    }
    if u16_at(b, 10) != Some(0) {
        return Err(bad(what, "reserved field not zero"));
    }
    Ok(())
}

/// Encodes the grant list of a region `owner` shares with `grantee`.
pub fn encode_grants(owner: DomId, grantee: DomId, refs: &[GrantRef]) -> Vec<u8> {
    let mut v = header(GRANT_MAGIC, owner, grantee);
    v.reserve(4 + 4 * refs.len());
    v.extend_from_slice(&(refs.len() as u32).to_le_bytes());
    for r in refs {
        v.extend_from_slice(&r.to_le_bytes());
    }
    v
}

/// Number of pages of a region of `len` bytes, if `len` is a non-zero
/// multiple of the Xen page size and within [`MAX_PAGES`].
pub fn pages_for(len: usize) -> Result<usize> {
    if len == 0 || len & (XEN_PAGE_SIZE - 1) != 0 {
        return Err(Error::Backend(format!(
            "region length {len} is not a non-zero multiple of {XEN_PAGE_SIZE}"
        )));
    }
    let pages = len / XEN_PAGE_SIZE;
    if pages > MAX_PAGES {
        return Err(Error::Backend(format!(
            "region of {pages} pages exceeds the xen backend's limit of {MAX_PAGES}"
        )));
    }
    Ok(pages)
}

/// Parses the grant list of a region of `len` bytes that `owner` shared
/// with `grantee` (this domain). Returns the references, one per page.
pub fn parse_grants(b: &[u8], owner: DomId, grantee: DomId, len: usize) -> Result<Vec<GrantRef>> {
    const WHAT: &str = "grant";
    let pages = pages_for(len)?;
    check_header(WHAT, b, GRANT_MAGIC, owner, grantee)?;
    let count = u32_at(b, HEADER).ok_or_else(|| bad(WHAT, "truncated before the count"))?;
    if count as usize != pages {
        return Err(bad(
            WHAT,
            format_args!("{count} pages, but the region needs {pages}"),
        ));
    }
    // pages <= MAX_PAGES, so this cannot overflow.
    let want = GRANT_FIXED + 4 * pages;
    if b.len() != want {
        return Err(bad(
            WHAT,
            format_args!("{} bytes, expected {want} for {pages} pages", b.len()),
        ));
    }
    let refs: Vec<GrantRef> = b[GRANT_FIXED..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(r) = refs.iter().find(|&&r| r < GNTTAB_NR_RESERVED_ENTRIES) {
        return Err(bad(WHAT, format_args!("reserved grant reference {r}")));
    }
    let mut sorted = refs.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(
            WHAT,
            format_args!("grant reference {} listed twice", w[0]),
        ));
    }
    Ok(refs)
}

/// Encodes the event-channel port `owner` allocated for `grantee`.
pub fn encode_bell(owner: DomId, grantee: DomId, port: EvtchnPort) -> Vec<u8> {
    let mut v = header(BELL_MAGIC, owner, grantee);
    v.extend_from_slice(&port.to_le_bytes());
    v
}

/// Parses the event-channel descriptor `owner` made for `grantee` (this
/// domain). Returns the remote port.
pub fn parse_bell(b: &[u8], owner: DomId, grantee: DomId) -> Result<EvtchnPort> {
    const WHAT: &str = "event channel";
    check_header(WHAT, b, BELL_MAGIC, owner, grantee)?;
    if b.len() != BELL_LEN {
        return Err(bad(
            WHAT,
            format_args!("{} bytes, expected {BELL_LEN}", b.len()),
        ));
    }
    let port = u32_at(b, HEADER).unwrap_or(0);
    if port == 0 || port >= MAX_PORT {
        return Err(bad(WHAT, format_args!("port {port} out of range")));
    }
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = XEN_PAGE_SIZE;

    fn refs(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| 100 + i * 3).collect()
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::Backend(s)) => s,
            other => panic!("expected a backend error, got {other:?}"),
        }
    }

    #[test]
    fn grants_round_trip() {
        let r = refs(6);
        let d = encode_grants(3, 5, &r);
        assert_eq!(d.len(), GRANT_FIXED + 4 * 6);
        assert_eq!(&d[..4], b"IVXG");
        assert_eq!(parse_grants(&d, 3, 5, 6 * PAGE).unwrap(), r);
    }

    #[test]
    fn grants_layout_is_little_endian() {
        let d = encode_grants(0x0102, 0x0304, &[0x0a0b0c0d]);
        assert_eq!(
            d,
            [
                b'I', b'V', b'X', b'G', 1, 0, 0x02, 0x01, 0x04, 0x03, 0, 0, 1, 0, 0, 0, 0x0d, 0x0c,
                0x0b, 0x0a
            ]
        );
    }

    #[test]
    fn grants_rejects_malformed() {
        let good = encode_grants(3, 5, &refs(4));
        let len = 4 * PAGE;
        assert!(err(parse_grants(&[], 3, 5, len)).contains("shorter than the header"));
        assert!(err(parse_grants(&good[..11], 3, 5, len)).contains("shorter"));
        assert!(err(parse_grants(&good[..13], 3, 5, len)).contains("truncated"));
        let mut d = good.clone();
        d[0] = b'X';
        assert!(err(parse_grants(&d, 3, 5, len)).contains("magic"));
        assert!(err(parse_grants(&encode_bell(3, 5, 9), 3, 5, len)).contains("magic"));
        let mut d = good.clone();
        d[4] = 2;
        assert!(err(parse_grants(&d, 3, 5, len)).contains("version 2"));
        let mut d = good.clone();
        d[11] = 1;
        assert!(err(parse_grants(&d, 3, 5, len)).contains("reserved"));
        assert!(err(parse_grants(&good, 4, 5, len)).contains("made by domain 3"));
        assert!(err(parse_grants(&good, 3, 6, len)).contains("made for domain 5"));
        // Count disagrees with the agreed length.
        assert!(err(parse_grants(&good, 3, 5, 3 * PAGE)).contains("4 pages"));
        assert!(err(parse_grants(&good, 3, 5, 5 * PAGE)).contains("needs 5"));
        // Trailing or missing references.
        let mut d = good.clone();
        d.push(0);
        assert!(err(parse_grants(&d, 3, 5, len)).contains("expected"));
        assert!(err(parse_grants(&good[..good.len() - 1], 3, 5, len)).contains("expected"));
        // A huge count with a short buffer: rejected before any allocation.
        let mut d = good[..GRANT_FIXED].to_vec();
        d[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err(parse_grants(&d, 3, 5, len)).contains("pages"));
        // Reserved and duplicate references.
        let d = encode_grants(3, 5, &[100, 7, 101, 102]);
        assert!(err(parse_grants(&d, 3, 5, len)).contains("reserved grant reference 7"));
        let d = encode_grants(3, 5, &[100, 101, 102, 100]);
        assert!(err(parse_grants(&d, 3, 5, len)).contains("twice"));
    }

    #[test]
    fn region_length_is_checked() {
        let good = encode_grants(3, 5, &refs(1));
        assert!(err(parse_grants(&good, 3, 5, 0)).contains("multiple"));
        assert!(err(parse_grants(&good, 3, 5, PAGE + 1)).contains("multiple"));
        assert!(err(parse_grants(&good, 3, 5, (MAX_PAGES + 1) * PAGE)).contains("limit"));
        assert_eq!(pages_for(MAX_PAGES * PAGE).unwrap(), MAX_PAGES);
        let big = encode_grants(
            3,
            5,
            &(0..MAX_PAGES as u32).map(|i| i + 8).collect::<Vec<_>>(),
        );
        assert_eq!(
            parse_grants(&big, 3, 5, MAX_PAGES * PAGE).unwrap().len(),
            MAX_PAGES
        );
    }

    #[test]
    fn bell_round_trip_and_rejects() {
        let d = encode_bell(7, 2, 42);
        assert_eq!(d.len(), BELL_LEN);
        assert_eq!(parse_bell(&d, 7, 2).unwrap(), 42);
        assert!(err(parse_bell(&d, 2, 7)).contains("made by"));
        assert!(err(parse_bell(&d, 7, 3)).contains("made for"));
        assert!(err(parse_bell(&d[..15], 7, 2)).contains("expected 16"));
        let mut long = d.clone();
        long.push(0);
        assert!(err(parse_bell(&long, 7, 2)).contains("expected 16"));
        assert!(err(parse_bell(&encode_bell(7, 2, 0), 7, 2)).contains("port 0"));
        assert!(err(parse_bell(&encode_bell(7, 2, MAX_PORT), 7, 2)).contains("out of range"));
        assert!(err(parse_bell(&encode_grants(7, 2, &[9]), 7, 2)).contains("magic"));
        let mut d2 = d.clone();
        d2[5] = 1;
        assert!(err(parse_bell(&d2, 7, 2)).contains("version"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..96),
                                       pages in 0usize..8, owner in 0u16..4, grantee in 0u16..4) {
            let _ = parse_grants(&b, owner, grantee, pages * PAGE);
            let _ = parse_bell(&b, owner, grantee);
        }

        #[test]
        fn mutated_descriptors_never_panic(n in 1usize..8, pos in 0usize..64, val in any::<u8>()) {
            let mut d = encode_grants(1, 2, &refs(n));
            if pos < d.len() { d[pos] = val; }
            if let Ok(r) = parse_grants(&d, 1, 2, n * PAGE) {
                prop_assert_eq!(r.len(), n);
            }
            let mut e = encode_bell(1, 2, 77);
            if pos < e.len() { e[pos] = val; }
            if let Ok(p) = parse_bell(&e, 1, 2) {
                prop_assert!(p > 0 && p < MAX_PORT);
            }
        }
    }
}
