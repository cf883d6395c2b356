//! The fuzz targets' bodies (`core/fuzz/src/targets.rs`) on stable, over
//! pseudo-random inputs and a few shaped ones: the same properties the
//! fuzzers check, run by every `cargo test` (the soak is `scripts/fuzz`).

#[path = "../fuzz/src/targets.rs"]
mod targets;

/// Deterministic pseudo-random inputs of lengths up to `max`.
fn inputs(seed: u32, n: usize, max: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    (0..n).map(move |_| {
        let len = next() as usize % (max + 1);
        (0..len).map(|_| next() as u8).collect()
    })
}

#[test]
fn handshake_messages() {
    for v in inputs(1, 3000, 300) {
        targets::handshake_messages(&v);
    }
    // shaped: a valid record header in front of random payloads
    for (t, v) in (0u8..14).cycle().zip(inputs(2, 2000, 200)) {
        let mut b = vec![0x80 | t];
        b.extend_from_slice(&ivcom_core::record::encode_bytes(v.len(), 4, t));
        b.extend_from_slice(&v);
        targets::handshake_messages(&b);
    }
}

#[test]
fn handshake_exchange() {
    targets::handshake_exchange(&[]);
    for v in inputs(3, 1500, 16) {
        targets::handshake_exchange(&v);
    }
}

#[test]
fn reassembly() {
    for v in inputs(4, 4000, 400) {
        targets::reassembly(&v);
    }
}

#[test]
fn queue() {
    for v in inputs(11, 3000, 400) {
        targets::queue(&v);
    }
    // Honest scripts: no forged word (op 4), so the model's order and
    // contents are checked all through.
    for mut v in inputs(12, 3000, 600) {
        for b in v.iter_mut() {
            if *b % 6 == 4 {
                *b = b.wrapping_add(1);
            }
        }
        targets::queue(&v);
    }
    // Found by the fuzzer: a consumer that took a whole data area quietly
    // read its own first record again, not zeroed yet.
    let found: String = [
        "0100faf6a8a8f6f6f6f6f6f60501004141f6f6f60b000000000000004141fda9",
        "a2a9a90101f6f6f6f6f60501004141f6f6f6f6f6f6f6f6f60b0000004141fda9",
        "a2a9ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "ffffffffffffffffffffffffffffffffffffffffffffffffff0e1b1ba9a9a9a9",
        "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "ffffff5100ffffffffffffffffa90101ca0100faf6a8a8f6f6f6f6f6f6050100",
        "4141f6f6f60b0080000000000041f60a0080583000fa00a8f6f6f6f6ffff69eb",
        "3d3da2a93d2ba9a901",
    ]
    .concat();
    let bytes: Vec<u8> = (0..found.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&found[i..i + 2], 16).unwrap())
        .collect();
    targets::queue(&bytes);
}

#[test]
fn queue_messages() {
    for v in inputs(13, 3000, 400) {
        targets::queue_messages(&v);
    }
    // Honest scripts: sends and polls only.
    for mut v in inputs(14, 3000, 800) {
        for (k, b) in v.iter_mut().enumerate() {
            if k % 4 == 0 && *b % 5 != 0 && *b % 5 != 2 {
                *b = (*b / 5).min(50) * 5 + 2 * (*b & 1);
            }
        }
        targets::queue_messages(&v);
    }
}

#[test]
fn tcp_stream() {
    for v in inputs(5, 4000, 600) {
        targets::tcp_stream(&v);
    }
}

#[test]
fn xenstore() {
    for v in inputs(6, 4000, 64) {
        targets::xenstore(&v);
    }
    targets::xenstore(b"7\0");
    targets::xenstore(b"32752");
}

#[test]
fn host_names_and_cards() {
    for v in inputs(7, 4000, 120) {
        targets::host_names(&v);
        targets::card(&v);
        targets::tcp_header(&v);
    }
    let good = format!("ivcom-{}.sock:{}", "a1".repeat(16), "0f".repeat(16));
    targets::host_names(good.as_bytes());
}
