//! Reassembly of arbitrary record sequences against a model; bounded buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::reassembly(data));
