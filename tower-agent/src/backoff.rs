//! When to dial again: exponential backoff with full jitter ([`Backoff`]), and the
//! bookkeeping of failures since the last healthy tunnel ([`Reconnects`]).

use std::time::Duration;

/// Reconnect backoff: exponential with full jitter, capped, reset after a healthy tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay's upper bound.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A tunnel up this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            // Small first steps: a restarted server is usually back within a second.
            base: Duration::from_millis(100),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The largest delay before attempt `attempt` (0-based): `min(max, base·2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max)
    }

    /// The delay before attempt `attempt` (0-based): uniform in `[0, ceiling(attempt)]`
    /// ("full jitter", so agents cut off together do not come back together).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(rand::random::<f64>())
    }
}

/// The reconnect bookkeeping of [`run`], apart from its I/O: which backoff step the next
/// dial waits for.
#[derive(Debug, Default)]
pub(crate) struct Reconnects {
    /// Failures (failed dials, tunnels that died young) since the last healthy tunnel.
    failures: u32,
}

impl Reconnects {
    /// A dial failed: the backoff step to wait before the next one.
    pub(crate) fn dial_failed(&mut self) -> u32 {
        let step = self.failures;
        self.failures = self.failures.saturating_add(1);
        step
    }

    /// A tunnel ended after `lasted`: the backoff step to wait before dialing again, or
    /// `None` to dial at once (a healthy tunnel the server drained: another replica
    /// answers). A tunnel that stayed up for `healthy_after` first resets the count; one
    /// drained younger counts as a failure, so a server that drains every tunnel it takes
    /// is not redialed in a hot loop.
    pub(crate) fn tunnel_ended(
        &mut self,
        ended: &Ended,
        lasted: Duration,
        healthy_after: Duration,
    ) -> Option<u32> {
        let healthy = lasted >= healthy_after;
        if healthy {
            self.failures = 0;
        }
        match ended {
            Ended::Drained if healthy => None,
            Ended::Drained | Ended::Closed => Some(self.dial_failed()),
        }
    }
}

/// How a tunnel ended.
pub(crate) enum Ended {
    /// Closed (by either side, or the link died).
    Closed,
    /// The server drained it: another replica answers.
    Drained,
}

/// The pause before dialing again after landing on a replica already held.
pub(crate) fn duplicate_delay(backoff: &Backoff, duplicates: u32) -> Duration {
    Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_secs(2).min(backoff.max),
        ..*backoff
    }
    .delay(duplicates.min(6))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            healthy_after: Duration::from_secs(1),
        };
        // The ceiling doubles per attempt from `base` up to `max`, and stays there (no
        // overflow, however many attempts).
        let ms = |attempt| b.ceiling(attempt).as_millis();
        let ceilings: Vec<_> = (0..7).map(ms).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(ms(40), 2000);
        assert_eq!(ms(u32::MAX), 2000);

        // Full jitter: for each attempt, delays spread over all of [0, ceiling] (uniform,
        // so the mean is ceiling/2 and many fall below ceiling/4). A delay that never
        // grows, "equal jitter" (ceiling/2 + jitter) or a missing cap all fail here.
        const SAMPLES: u32 = 2000;
        for attempt in [0, 1, 2, 3, 4, 5, 12, 40] {
            let ceiling = b.ceiling(attempt);
            let samples: Vec<Duration> = (0..SAMPLES).map(|_| b.delay(attempt)).collect();
            let most = samples.iter().max().unwrap();
            let least = samples.iter().min().unwrap();
            let mean = samples.iter().sum::<Duration>() / SAMPLES;
            let low = samples.iter().filter(|d| **d < ceiling / 4).count();
            assert!(
                *most <= ceiling,
                "attempt {attempt}: {most:?} over {ceiling:?}"
            );
            assert!(
                *most >= ceiling.mul_f64(0.95),
                "attempt {attempt}: nothing near the ceiling {ceiling:?} (max {most:?})"
            );
            assert!(
                *least <= ceiling / 20,
                "attempt {attempt}: nothing near zero (min {least:?}): not full jitter"
            );
            assert!(
                (ceiling.mul_f64(0.45)..=ceiling.mul_f64(0.55)).contains(&mean),
                "attempt {attempt}: mean {mean:?} is not about {ceiling:?}/2"
            );
            // Expected 500 of 2000; 350 is over 8 standard deviations away.
            assert!(
                low > 350,
                "attempt {attempt}: only {low} below a quarter of the ceiling"
            );
        }
    }

    #[test]
    fn reconnect_attempts_grow_until_a_tunnel_stays_up_for_the_healthy_period() {
        let healthy = Duration::from_secs(5);
        let mut r = Reconnects::default();
        // Dials failing in a row climb the backoff.
        assert_eq!(
            [r.dial_failed(), r.dial_failed(), r.dial_failed()],
            [0, 1, 2]
        );
        // A tunnel that came up but died young keeps climbing: a flapping link must not
        // reconnect at full speed.
        let young = healthy - Duration::from_millis(1);
        assert_eq!(r.tunnel_ended(&Ended::Closed, young, healthy), Some(3));
        assert_eq!(r.dial_failed(), 4);
        // A drain of a young tunnel climbs too: a server draining every tunnel it takes
        // must not be redialed in a hot loop.
        assert_eq!(r.tunnel_ended(&Ended::Drained, young, healthy), Some(5));
        assert_eq!(r.dial_failed(), 6);
        // A tunnel that stayed up for the healthy period resets the count: the next wait
        // is the first step again, and so is the climb after it.
        assert_eq!(r.tunnel_ended(&Ended::Closed, healthy, healthy), Some(0));
        assert_eq!(r.dial_failed(), 1);
        // A healthy tunnel drained asks for an immediate redial and resets the count.
        assert_eq!(
            r.tunnel_ended(&Ended::Drained, Duration::from_secs(3600), healthy),
            None
        );
        assert_eq!(
            r.dial_failed(),
            0,
            "a drain after a healthy tunnel resets too"
        );
        // No overflow after very many failures.
        let mut r = Reconnects {
            failures: u32::MAX - 1,
        };
        assert_eq!(r.dial_failed(), u32::MAX - 1);
        assert_eq!(r.dial_failed(), u32::MAX);
        assert_eq!(r.dial_failed(), u32::MAX);
    }
}
