//! Locality cards in both forms: what parses round-trips, public forms carry
//! no key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::card(data));
