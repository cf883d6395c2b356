//! The handshake state machines with a man in the middle altering the four
//! messages: intact exchanges succeed, altered ones never authenticate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::handshake_exchange(data));
