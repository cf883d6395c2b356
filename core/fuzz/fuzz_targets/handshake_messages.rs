//! Handshake messages from arbitrary bytes (decoder over any chunking, every
//! message type); what decodes re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::handshake_messages(data));
