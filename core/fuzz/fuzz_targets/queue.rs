//! A receive queue under a script of honest producers, a consumer and
//! forged words: bounds, the model's order and contents, sticky breaks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::queue(data));
