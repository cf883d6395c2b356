//! The host backend's region descriptors and hand-over socket names.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ivcom_core_fuzz::targets::host_names(data));
