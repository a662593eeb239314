#![forbid(unsafe_code)]
#![no_main]
//! See `tower_fuzz::tokens`.
libfuzzer_sys::fuzz_target!(|input: tower_fuzz::tokens::Input| {
    let _ = tower_fuzz::tokens::check(input);
});
