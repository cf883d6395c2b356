//! The xenstore reply parsers (header, read value, domain id).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::xenstore(data));
