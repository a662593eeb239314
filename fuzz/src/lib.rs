//! The checks behind Tower's fuzz targets, one module per target: each takes what the
//! fuzzer made (bytes, or an input built from them) and panics when an invariant breaks.
//!
//! `fuzz_targets/` hands them to libFuzzer (`cargo +nightly fuzz run <target>`, with
//! cargo-fuzz); the tests below hand them seeded random inputs on stable, so that
//! `.ci/run` checks every invariant on each run, not only that the targets build.

#![forbid(unsafe_code)]

pub mod control;
pub mod handshake;
pub mod preamble;
pub mod tokens;
pub mod watch;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use arbitrary::{Arbitrary, Unstructured};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `runs` seeded random inputs of up to `max_len` bytes, each given to `check` as
    /// bytes and, where they build one, as a structured input.
    fn random_inputs(seed: u64, runs: usize, max_len: usize, mut check: impl FnMut(&[u8])) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = vec![0; max_len];
        for _ in 0..runs {
            let len = rng.random_range(0..=max_len);
            rng.fill(&mut data[..len]);
            check(&data[..len]);
        }
    }

    /// `check`'s answer for the input `data` builds, if it builds one.
    fn structured<'a, T: Arbitrary<'a>, R>(
        data: &'a [u8],
        check: impl FnOnce(T) -> R,
    ) -> Option<R> {
        T::arbitrary_take_rest(Unstructured::new(data))
            .ok()
            .map(check)
    }

    #[test]
    fn decoders_hold_their_invariants_on_random_bytes() {
        random_inputs(1, 20_000, 256, |data| {
            crate::preamble::check(data);
            crate::control::check(data);
            crate::handshake::check(data);
        });
    }

    #[test]
    fn tokens_verify_only_with_the_key_their_kind_needs() {
        // How many verified as a user token, an agent token, an assertion: the inputs
        // must reach each, or the checks behind a success never ran.
        let mut verified = [0; 3];
        random_inputs(2, 20_000, 512, |data| {
            if let Some(v) = structured(data, crate::tokens::check) {
                for (count, ok) in verified.iter_mut().zip([v.user, v.agent, v.assertion]) {
                    *count += usize::from(ok);
                }
            }
        });
        assert!(
            verified.iter().all(|&n| n > 0),
            "verified (user, agent, assertion): {verified:?}"
        );
    }

    #[test]
    fn only_a_get_is_a_watch_and_the_first_watch_value_decides() {
        let mut decided = [0; 2];
        random_inputs(3, 20_000, 256, |data| {
            if let Some(Some(watch)) = structured(data, crate::watch::check) {
                decided[usize::from(watch)] += 1;
            }
        });
        assert!(
            decided.iter().all(|&n| n > 0),
            "GETs decided (not a watch, a watch): {decided:?}"
        );
    }
}
