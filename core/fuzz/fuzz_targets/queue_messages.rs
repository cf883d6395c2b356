//! Messages over a receive queue, reassembled per slot, under a script of
//! honest and hostile producers, an unadmitted slot and forged words.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::queue_messages(data));
