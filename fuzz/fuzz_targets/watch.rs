#![forbid(unsafe_code)]
#![no_main]
//! See `tower_fuzz::watch`.
libfuzzer_sys::fuzz_target!(|input: tower_fuzz::watch::Input| {
    let _ = tower_fuzz::watch::check(input);
});
