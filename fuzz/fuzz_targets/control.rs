#![forbid(unsafe_code)]
#![no_main]
//! See `tower_fuzz::control`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_fuzz::control::check(data));
