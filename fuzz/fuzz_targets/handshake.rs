#![forbid(unsafe_code)]
#![no_main]
//! See `tower_fuzz::handshake`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_fuzz::handshake::check(data));
