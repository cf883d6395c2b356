//! The frame header parser: accepted headers are bounded and re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::tcp_header(data));
