//! The TCP receive parser over arbitrary bytes in arbitrary chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::tcp_stream(data));
