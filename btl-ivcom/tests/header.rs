//! The committed header must be what cbindgen generates from the source.

#[test]
fn header_is_current() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/ivcom.h"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/include/ivcom.h");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "btl-ivcom/include/ivcom.h is stale: run scripts/build (it copies the generated header)"
    );
}
