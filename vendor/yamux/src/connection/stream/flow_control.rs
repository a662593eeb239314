use std::{cmp, sync::Arc};

use parking_lot::Mutex;
use web_time::{Duration, Instant};

use crate::{
    connection::{rtt::Rtt, sharing::Sharing},
    frame::header::StreamId,
    Config, ConnectionError, DEFAULT_CREDIT,
};

/// How long after another stream of the connection last received data a stream counts
/// as sharing it (Tower's patch, see `FlowController::shared_cap`): longer than the
/// pauses between a client's requests, so that a download's window does not grow back
/// between them.
const SHARING_SPELL: Duration = Duration::from_secs(1);
/// A stream that received no data for this long starts anew when its data resumes
/// (Tower's patch, see `FlowController::active_since`).
const QUIET: Duration = Duration::from_millis(100);
/// On a short path a window grows to this even once the round trip has risen (Tower's
/// patch, see `FlowController::next_window_update`).
const SHORT_PATH_WINDOW: u32 = 4 * 1024 * 1024;

#[derive(Debug)]
pub(crate) struct FlowController {
    /// The stream's own id (Tower's patch, for `sharing`).
    stream: StreamId,
    config: Arc<Config>,
    last_window_update: Instant,
    /// See [`Connection::rtt`].
    rtt: Rtt,
    /// See [`Connection::accumulated_max_stream_windows`].
    accumulated_max_stream_windows: Arc<Mutex<usize>>,
    receive_window: u32,
    max_receive_window: u32,
    send_window: u32,
    /// Tower's patch, see `Config::set_fast_window_ramp`.
    burst: Burst,
    /// Which of the connection's streams received data lately (Tower's patch).
    sharing: Sharing,
    /// Whether this stream's data counts in `sharing` (Tower's patch).
    shares: bool,
    /// When this stream's data last resumed after `QUIET` without (Tower's patch):
    /// other streams' data before it is no one this stream's window holds up. So a
    /// download that follows another is not taken for one beside it.
    active_since: Instant,
}

/// The stream's data since it last sat idle for two round trips (Tower's patch).
///
/// Auto-tuning asks whether the sender used half its window within two round trips of
/// the last window update. A stream that sat idle (a pooled connection between
/// requests) last updated its window long ago, so the first update of its next download
/// never grows the window, costing that download a round trip. A burst is measured from
/// its own first byte instead, once it has brought a quarter of the window (so a trickle
/// of small messages, each arriving after a pause, never counts as fast).
#[derive(Debug, Clone, Copy)]
struct Burst {
    start: Instant,
    last_data: Instant,
    bytes: u32,
}

impl Burst {
    fn new() -> Self {
        let now = Instant::now();
        Burst {
            start: now,
            last_data: now,
            bytes: 0,
        }
    }
}

impl FlowController {
    pub(crate) fn new(
        stream: StreamId,
        receive_window: u32,
        send_window: u32,
        accumulated_max_stream_windows: Arc<Mutex<usize>>,
        rtt: Rtt,
        sharing: Sharing,
        config: Arc<Config>,
    ) -> Self {
        Self {
            stream,
            sharing,
            shares: true,
            active_since: Instant::now(),
            receive_window,
            send_window,
            config,
            rtt,
            accumulated_max_stream_windows,
            max_receive_window: DEFAULT_CREDIT,
            last_window_update: Instant::now(),
            burst: Burst::new(),
        }
    }

    /// Calculate the number of additional window bytes the receiving side (local) should grant the
    /// sending side (remote) via a window update message.
    ///
    /// Returns `None` if too small to justify a window update message.
    pub(crate) fn next_window_update(&mut self, buffer_len: usize) -> Option<u32> {
        self.assert_invariants(buffer_len);

        let bytes_received = self.max_receive_window - self.receive_window;
        let mut next_window_update =
            bytes_received.saturating_sub(buffer_len.try_into().unwrap_or(u32::MAX));

        // Don't send an update in case half or more of the window is still available to the sender.
        if next_window_update < self.max_receive_window / 2 {
            return None;
        }
        // Tower's patch: an update within a cap is due only when this one is (it is
        // `max_receive_window - cap` smaller, and its threshold half of `cap`).
        if let Some(cap) = self.shared_cap() {
            return self.next_window_update_within(cap, buffer_len);
        }

        log::trace!(
            "received {} mb in {} seconds ({} mbit/s)",
            next_window_update as f64 / crate::MIB as f64,
            self.last_window_update.elapsed().as_secs_f64(),
            next_window_update as f64 / crate::MIB as f64 * 8.0
                / self.last_window_update.elapsed().as_secs_f64()
        );

        // Auto-tuning `max_receive_window`
        //
        // The ideal `max_receive_window` is equal to the bandwidth-delay-product (BDP), thus
        // allowing the remote sender to exhaust the entire available bandwidth on a single stream.
        // Choosing `max_receive_window` too small prevents the remote sender from exhausting the
        // available bandwidth. Choosing `max_receive_window` to large is wasteful and delays
        // backpressure from the receiver to the sender on the stream.
        //
        // In case the remote sender has exhausted half or more of its credit in less than 2
        // round-trips, try to double `max_receive_window`.
        //
        // For simplicity `max_receive_window` is never decreased.
        //
        // This implementation is heavily influenced by QUIC. See document below for rational on the
        // above strategy.
        //
        // https://docs.google.com/document/d/1F2YfdDXKpy20WVKJueEf4abn_LVZHhMUMS5gX6Pgjl4/edit?usp=sharing
        let rtt = self.rtt.get();
        // Tower's patch: or the current burst brought a quarter of the window or more
        // within two round trips of its first byte (see `Burst`).
        let fast_burst = self.config.fast_window_ramp
            && self.burst.bytes >= self.max_receive_window / 4
            && rtt.is_some_and(|rtt| self.burst.start.elapsed() < rtt * 2);
        // Tower's patch: and the round trip has not risen, see `Rtt::near_min`; or, on a
        // short path, the window is under `SHORT_PATH_WINDOW`. There the round trip of a
        // busy host rises at once (two relays taking turns on its cores) and held a lone
        // download to 1 MiB, about a tenth slower than at 4 MiB on loopback (Tower's
        // BENCHMARKS.md, "Bulk, session 32"); the queue that the brake kept short is now
        // only a lone download's, since beside another stream's data the window is held
        // at 256 KiB (`shared_cap`).
        let near_min = !self.config.fast_window_ramp || {
            self.rtt.sample_soon();
            self.rtt.near_min()
        };
        let under_short_path_window = !near_min
            && self.config.fast_window_ramp
            && self.max_receive_window < SHORT_PATH_WINDOW
            && self.rtt.short_path();
        if (rtt
            .map(|rtt| self.last_window_update.elapsed() < rtt * 2)
            .unwrap_or(false)
            || fast_burst)
            && (near_min || under_short_path_window)
        {
            let mut accumulated_max_stream_windows = self.accumulated_max_stream_windows.lock();

            // Tower's patch: a download's first growth on a short path, on a round trip
            // sampled before the download began, only doubles and does not jump below:
            // on loopback the sample of an idle tunnel let every download grow to 1 MiB,
            // and a window past what the path holds is a queue that a small response on
            // the same tunnel waits behind (B3). The sample asked for above (a ping, sent
            // at once) comes a round trip later, and the growth after it goes by it.
            let fast =
                self.config.fast_window_ramp && !self.rtt.stale_on_short_path(self.burst.start);
            // Ideally one can just double it (Tower's patch: quadruple it, see
            // `Config::set_fast_window_ramp`):
            let factor = if fast { 4 } else { 2 };
            let new_max = self.max_receive_window.saturating_mul(factor);

            // The part of the connection limit no stream has taken yet:
            let free: usize =
                // the overall configured conneciton limit
                self.config.max_connection_receive_window.unwrap_or(usize::MAX)
                // minus the minimum amount of window guaranteed to each stream
                - self.config.max_num_streams * DEFAULT_CREDIT as usize
                // minus the amount of bytes beyond the minimum amount (`DEFAULT_CREDIT`)
                // already allocated by this and other streams on the connection.
                - *accumulated_max_stream_windows;

            // Tower's patch: or jump to half the largest window this connection's streams
            // grew to, taking at most half of what is free.
            let new_max = if fast {
                let jump = cmp::min(
                    self.rtt.learned_window() / 2,
                    self.max_receive_window
                        .saturating_add((free / 2).try_into().unwrap_or(u32::MAX)),
                );
                cmp::max(new_max, jump)
            } else {
                new_max
            };

            // But one has to consider the configured connection limit:
            let new_max = {
                let connection_limit: usize = self.max_receive_window as usize + free;

                cmp::min(new_max, connection_limit.try_into().unwrap_or(u32::MAX))
            };
            // Tower's patch: growth past the brake stops at `SHORT_PATH_WINDOW`.
            let new_max = if near_min {
                new_max
            } else {
                cmp::min(new_max, SHORT_PATH_WINDOW)
            };
            if self.config.fast_window_ramp {
                self.rtt.learn_window(new_max);
            }

            // Account for the additional credit on the accumulated connection counter.
            *accumulated_max_stream_windows += (new_max - self.max_receive_window) as usize;
            drop(accumulated_max_stream_windows);

            log::debug!(
                "old window_max: {} mb, new window_max: {} mb",
                self.max_receive_window as f64 / crate::MIB as f64,
                new_max as f64 / crate::MIB as f64
            );

            self.max_receive_window = new_max;

            // Recalculate `next_window_update` with the new `max_receive_window`.
            let bytes_received = self.max_receive_window - self.receive_window;
            next_window_update =
                bytes_received.saturating_sub(buffer_len.try_into().unwrap_or(u32::MAX));
        }

        self.last_window_update = Instant::now();
        self.receive_window += next_window_update;

        self.assert_invariants(buffer_len);

        Some(next_window_update)
    }

    /// The window this stream may use now, if less than the one it grew to (Tower's
    /// patch): on a short path, while another stream of the connection receives data
    /// (within the last `SHARING_SPELL`, and since this stream's data began), yamux's
    /// 256 KiB. Past what the path holds, a window is a queue (on loopback, the
    /// sockets' buffers and the processes' backlog; see `Rtt::near_min`), and every
    /// other stream's data waits behind it: a small response behind a download waited
    /// milliseconds (BENCHMARKS.md, B3). A stream alone, as a download is most of the
    /// time, keeps the window it grew to, which on loopback is worth a fifth of its rate
    /// through the processes' scheduling delays; over a long path the window is the
    /// bandwidth-delay product and no stream holds it back.
    fn shared_cap(&self) -> Option<u32> {
        let sharing = self.config.fast_window_ramp
            && self.rtt.short_path()
            && self
                .sharing
                .others_last(self.stream)
                .is_some_and(|at| at >= self.active_since && at.elapsed() < SHARING_SPELL);
        sharing.then_some(DEFAULT_CREDIT)
    }

    /// The window update that brings what the sender may send, with what is buffered,
    /// back to `cap` (Tower's patch, see `shared_cap`); `None` while the sender still
    /// has half of that. Credit already granted past `cap` cannot be taken back: it is
    /// used up first. The window's grown size is kept for when the stream is alone again.
    fn next_window_update_within(&mut self, cap: u32, buffer_len: usize) -> Option<u32> {
        let held = self
            .receive_window
            .saturating_add(buffer_len.try_into().unwrap_or(u32::MAX));
        let next_window_update = cap.saturating_sub(held);
        if next_window_update < cap / 2 {
            return None;
        }
        self.last_window_update = Instant::now();
        self.receive_window += next_window_update;
        self.assert_invariants(buffer_len);
        Some(next_window_update)
    }

    fn assert_invariants(&self, buffer_len: usize) {
        if !cfg!(debug_assertions) {
            return;
        }

        let config = &self.config;
        let rtt = self.rtt.get();
        let accumulated_max_stream_windows = *self.accumulated_max_stream_windows.lock();

        assert!(
            buffer_len <= self.max_receive_window as usize,
            "The current buffer size never exceeds the maximum stream receive window."
        );
        assert!(
            self.receive_window <= self.max_receive_window,
            "The current window never exceeds the maximum."
        );
        assert!(
            (self.max_receive_window - DEFAULT_CREDIT) as usize
                <= config.max_connection_receive_window.unwrap_or(usize::MAX)
                    - config.max_num_streams * DEFAULT_CREDIT as usize,
            "The maximum never exceeds its maximum portion of the configured connection limit."
        );
        assert!(
            (self.max_receive_window - DEFAULT_CREDIT) as usize
                <= accumulated_max_stream_windows,
            "The amount by which the stream maximum exceeds DEFAULT_CREDIT is tracked in accumulated_max_stream_windows."
        );
        if rtt.is_none() {
            assert_eq!(
                self.max_receive_window, DEFAULT_CREDIT,
                "The maximum is only increased iff an rtt measurement is available."
            );
        }
    }

    /// See `Stream::exclude_from_sharing`.
    pub(crate) fn exclude_from_sharing(&mut self) {
        self.shares = false;
    }

    pub(crate) fn send_window(&self) -> u32 {
        self.send_window
    }

    pub(crate) fn consume_send_window(&mut self, i: u32) -> Result<(), ConnectionError> {
        self.send_window = self
            .send_window
            .checked_sub(i)
            .ok_or(ConnectionError::InvalidWindowUpdate)?;
        Ok(())
    }

    pub(crate) fn increase_send_window_by(&mut self, i: u32) -> Result<(), ConnectionError> {
        self.send_window = self
            .send_window
            .checked_add(i)
            .ok_or(ConnectionError::InvalidWindowUpdate)?;
        Ok(())
    }

    pub(crate) fn consume_receive_window(&mut self, i: u32) -> Result<(), ConnectionError> {
        self.receive_window = self
            .receive_window
            .checked_sub(i)
            .ok_or(ConnectionError::InvalidWindowUpdate)?;
        if self.config.fast_window_ramp {
            let now = Instant::now();
            if self.shares {
                self.sharing.record(self.stream, now);
            }
            if now.duration_since(self.burst.last_data) > QUIET {
                self.active_since = now;
            }
            let idle = self
                .rtt
                .get()
                .is_some_and(|rtt| now.duration_since(self.burst.last_data) > rtt * 2);
            if idle {
                self.burst.start = now;
                self.burst.bytes = 0;
            }
            self.burst.bytes = self.burst.bytes.saturating_add(i);
            self.burst.last_data = now;
        }
        Ok(())
    }
}

impl Drop for FlowController {
    fn drop(&mut self) {
        let mut accumulated_max_stream_windows = self.accumulated_max_stream_windows.lock();

        debug_assert!(
            *accumulated_max_stream_windows >= (self.max_receive_window - DEFAULT_CREDIT) as usize,
            "{accumulated_max_stream_windows} {}",
            self.max_receive_window
        );

        *accumulated_max_stream_windows -= (self.max_receive_window - DEFAULT_CREDIT) as usize;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{GenRange, QuickCheck};

    #[derive(Debug)]
    struct Input {
        controller: FlowController,
        buffer_len: usize,
    }

    #[cfg(test)]
    impl Clone for Input {
        fn clone(&self) -> Self {
            Self {
                controller: FlowController {
                    stream: self.controller.stream,
                    sharing: self.controller.sharing.clone(),
                    shares: self.controller.shares,
                    active_since: self.controller.active_since,
                    config: self.controller.config.clone(),
                    accumulated_max_stream_windows: Arc::new(Mutex::new(
                        *self.controller.accumulated_max_stream_windows.lock(),
                    )),
                    rtt: self.controller.rtt.clone(),
                    last_window_update: self.controller.last_window_update,
                    receive_window: self.controller.receive_window,
                    max_receive_window: self.controller.max_receive_window,
                    send_window: self.controller.send_window,
                    burst: self.controller.burst,
                },
                buffer_len: self.buffer_len,
            }
        }
    }

    impl quickcheck::Arbitrary for Input {
        fn arbitrary(g: &mut quickcheck::Gen) -> Self {
            let config = Arc::new(Config::arbitrary(g));
            let rtt = Rtt::arbitrary(g);

            let max_connection_minus_default =
                config.max_connection_receive_window.unwrap_or(usize::MAX)
                    - (config.max_num_streams * (DEFAULT_CREDIT as usize));

            let max_receive_window = if rtt.get().is_none() {
                DEFAULT_CREDIT
            } else {
                g.gen_range(
                    DEFAULT_CREDIT
                        ..(DEFAULT_CREDIT as usize)
                            .saturating_add(max_connection_minus_default)
                            .try_into()
                            .unwrap_or(u32::MAX)
                            .saturating_add(1),
                )
            };
            let receive_window = g.gen_range(0..max_receive_window);
            let buffer_len = g.gen_range(0..max_receive_window as usize);
            let accumulated_max_stream_windows = Arc::new(Mutex::new(g.gen_range(
                (max_receive_window - DEFAULT_CREDIT) as usize
                    ..max_connection_minus_default.saturating_add(1),
            )));
            let last_window_update =
                Instant::now() - Duration::from_secs(g.gen_range(0..(60 * 60 * 24)));
            let send_window = g.gen_range(0..u32::MAX);

            Self {
                controller: FlowController {
                    stream: StreamId::new(1),
                    sharing: Sharing::default(),
                    shares: true,
                    active_since: Instant::now(),
                    accumulated_max_stream_windows,
                    rtt,
                    last_window_update,
                    config,
                    receive_window,
                    max_receive_window,
                    send_window,
                    burst: Burst::new(),
                },
                buffer_len,
            }
        }
    }

    #[test]
    fn next_window_update() {
        fn property(
            Input {
                mut controller,
                buffer_len,
            }: Input,
        ) {
            controller.next_window_update(buffer_len);
        }

        QuickCheck::new().quickcheck(property as fn(_))
    }

    /// On a short path whose round trip has risen past twice its least, a stream's window
    /// still grows, to `SHORT_PATH_WINDOW` and no further, though the connection learned
    /// a larger one to jump to (Tower's patch).
    #[test]
    fn on_a_short_path_a_risen_round_trip_stops_growth_at_short_path_window() {
        let mut config = Config::default();
        config
            .set_fast_window_ramp(true)
            .set_max_num_streams(8)
            .set_max_connection_receive_window(Some(8 * DEFAULT_CREDIT as usize + (64 << 20)));
        let rtt = Rtt::new();
        rtt.learn_window(32 << 20);
        let mut controller = FlowController::new(
            StreamId::new(1),
            DEFAULT_CREDIT,
            DEFAULT_CREDIT,
            Arc::new(Mutex::new(0)),
            rtt.clone(),
            Sharing::default(),
            Arc::new(config),
        );
        // Sampled after the stream's data began: growth may quadruple and jump.
        rtt.set_samples(Duration::from_millis(1), Duration::from_millis(5));
        let mut windows = Vec::new();
        for _ in 0..8 {
            // The sender uses the whole window at once; the reader takes it all.
            controller
                .consume_receive_window(controller.receive_window)
                .unwrap();
            controller.next_window_update(0).unwrap();
            windows.push(controller.max_receive_window);
        }
        assert_eq!(
            windows.iter().max(),
            Some(&SHORT_PATH_WINDOW),
            "{windows:?}"
        );
    }
}
