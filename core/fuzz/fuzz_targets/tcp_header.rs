//! The TCP frame header parser: 8 header bytes and a frame limit from the
//! input; an accepted header is within the limit, of a known record type,
//! and re-encodes to the same bytes.
#![no_main]

use ivcom_core::ring::kind;
use ivcom_core::tcp::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = [0u8; 8];
    let n = data.len().min(8);
    h[..n].copy_from_slice(&data[..n]);
    let mut m = [0u8; 8];
    let rest = &data[n..];
    let k = rest.len().min(8);
    m[..k].copy_from_slice(&rest[..k]);
    let max = u64::from_le_bytes(m) as usize;
    if let Ok((len, k, tag)) = parse_header(h, max) {
        assert!(len <= max);
        assert!(matches!(
            k,
            kind::MSG | kind::FIRST | kind::MORE | kind::CTRL
        ));
        let v = len as u64 | (k as u64) << 32 | (tag as u64) << 40;
        assert_eq!(v.to_le_bytes(), h);
    }
});
