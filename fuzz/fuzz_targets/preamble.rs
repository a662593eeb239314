#![forbid(unsafe_code)]
#![no_main]
//! See `tower_fuzz::preamble`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_fuzz::preamble::check(data));
