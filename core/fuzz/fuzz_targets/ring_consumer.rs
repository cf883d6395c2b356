//! The fuzz input is a script of hostile writes into a ring's shared pages
//! interleaved with producer and consumer calls (see `src/script.rs` for the
//! encoding and the properties checked after every step).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ivcom_core_fuzz::script::run_bytes(data);
});
