//! Locality cards come from peers (modex, command line): parsing either form
//! must never panic, and whatever parses must round-trip.
#![no_main]

use ivcom_core::Card;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(card) = Card::from_bytes(data) {
        let bytes = card.to_bytes();
        assert_eq!(Card::from_bytes(&bytes).expect("re-parse"), card);
        assert_eq!(Card::parse(&card.to_string()).expect("printable"), card);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(card) = Card::parse(s) {
            assert_eq!(Card::parse(&card.to_string()).expect("re-parse"), card);
            assert_eq!(Card::from_bytes(&card.to_bytes()).expect("binary"), card);
        }
    }
});
