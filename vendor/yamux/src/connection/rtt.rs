// Copyright (c) 2023 Protocol Labs.
//
// Licensed under the Apache License, Version 2.0 or MIT license, at your option.
//
// A copy of the Apache License, Version 2.0 is included in the software as
// LICENSE-APACHE and a copy of the MIT license is included in the software
// as LICENSE-MIT. You may also obtain a copy of the Apache License, Version 2.0
// at https://www.apache.org/licenses/LICENSE-2.0 and a copy of the MIT license
// at https://opensource.org/licenses/MIT.

//! Connection round-trip time measurement

use std::cmp;
use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use parking_lot::Mutex;
use web_time::{Duration, Instant};

use crate::connection::Action;
use crate::frame::{header::Ping, Frame};

const PING_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub(crate) struct Rtt {
    inner: Arc<Mutex<RttInner>>,
    /// Next ping identifier, used for matching pongs.
    next_id: Arc<AtomicU32>,
    /// The largest receive window a stream of this connection has grown to (Tower's
    /// patch, see `Config::set_fast_window_ramp`): like the round-trip time, a fact
    /// about the path that every stream shares.
    learned_window: Arc<AtomicU32>,
}

impl Rtt {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(RttInner {
                rtt: None,
                min: MinFilter::new(),
                sample_sent_at: None,
                state: RttState::Waiting {
                    next: Instant::now(),
                },
            })),
            next_id: Arc::new(AtomicU32::new(0)),
            learned_window: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The largest receive window a stream of this connection has grown to; 0 if none grew.
    pub(crate) fn learned_window(&self) -> u32 {
        self.learned_window.load(Ordering::Relaxed)
    }

    /// Records that a stream's receive window grew to `window`.
    pub(crate) fn learn_window(&self, window: u32) {
        self.learned_window.fetch_max(window, Ordering::Relaxed);
    }

    pub(crate) fn next_ping(&mut self) -> Option<Frame<Ping>> {
        let state = &mut self.inner.lock().state;

        match state {
            RttState::AwaitingPong { .. } => return None,
            RttState::Waiting { next } => {
                if *next > Instant::now() {
                    return None;
                }
            }
        }

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *state = RttState::AwaitingPong {
            sent_at: Instant::now(),
            id,
        };
        log::debug!("sending ping {id}");
        Some(Frame::ping(id))
    }

    pub(crate) fn handle_pong(&mut self, received_id: u32) -> Action {
        let inner = &mut self.inner.lock();

        let (sent_at, expected_id) = match inner.state {
            RttState::Waiting { .. } => {
                log::error!("received unexpected pong {received_id}");
                return Action::Terminate(Frame::protocol_error());
            }
            RttState::AwaitingPong { sent_at, id } => (sent_at, id),
        };

        if received_id != expected_id {
            log::error!("received pong with {received_id} but expected {expected_id}");
            return Action::Terminate(Frame::protocol_error());
        }

        let rtt = sent_at.elapsed();
        inner.rtt = Some(rtt);
        inner.min.push(rtt, Instant::now());
        inner.sample_sent_at = Some(sent_at);
        log::debug!("received pong {received_id}, estimated round-trip-time {rtt:?}");

        inner.state = RttState::Waiting {
            next: Instant::now() + PING_INTERVAL,
        };

        Action::None
    }

    pub(crate) fn get(&self) -> Option<Duration> {
        self.inner.lock().rtt
    }

    /// Asks for the next sample sooner than `PING_INTERVAL` (Tower's patch): data is
    /// flowing, and whether its window may grow depends on the latest round trip.
    pub(crate) fn sample_soon(&self) {
        let inner = &mut *self.inner.lock();
        let (Some(min), Some(sample_sent_at)) = (inner.min.get(), inner.sample_sent_at) else {
            return;
        };
        if let RttState::Waiting { next } = &mut inner.state {
            let due = sample_sent_at + cmp::max(min * BUSY_PINGS_PER_RTT, BUSY_PING_INTERVAL);
            if due < *next {
                *next = due;
            }
        }
    }

    /// Whether the path is short and the ping of its latest round trip went out before
    /// `since` (Tower's patch; a download's start): the round trip of an idle tunnel,
    /// which says nothing of the queue the download itself makes.
    pub(crate) fn stale_on_short_path(&self, since: Instant) -> bool {
        let inner = self.inner.lock();
        inner.is_short_path() && inner.sample_sent_at.is_none_or(|at| at < since)
    }

    /// Whether the least round trip seen lately is under `SHORT_PATH` (Tower's patch).
    pub(crate) fn short_path(&self) -> bool {
        self.inner.lock().is_short_path()
    }

    /// Whether the latest round trip is within twice the least seen lately (Tower's
    /// patch; true until both are known). A window grown past what the path holds
    /// only fills a queue on it (on loopback: the sockets' buffers and the processes'
    /// backlog), and the queue shows as a longer round trip; growth that fills a long,
    /// fast link does not lengthen it.
    pub(crate) fn near_min(&self) -> bool {
        let inner = self.inner.lock();
        match (inner.rtt, inner.min.get()) {
            (Some(rtt), Some(min)) => rtt <= min * 2,
            _ => true,
        }
    }
}

/// A path whose least round trip is under this is short (Tower's patch): a loopback, a
/// LAN, a region. Waiting there for a round trip sampled during a download costs the
/// download at most this much.
const SHORT_PATH: Duration = Duration::from_millis(10);
/// While data flows (Tower's patch), a sample every this many least round trips ...
const BUSY_PINGS_PER_RTT: u32 = 8;
/// ... but no more often than this: on loopback the least round trip is tens of
/// microseconds.
const BUSY_PING_INTERVAL: Duration = Duration::from_millis(1);
/// The least round trip is the least of the samples of the current such period and the
/// one before it (a period starts at the first sample after the last one ended, so after
/// a quiet spell "the one before" may be older), so that a path whose round trip rose for
/// good (a new route) is not held to the old one for the connection's life.
const MIN_RTT_PERIOD: Duration = Duration::from_secs(30);

/// The least of the samples of the current period and the one before (Tower's patch).
#[derive(Debug, Clone, Copy)]
struct MinFilter {
    previous: Option<Duration>,
    current: Option<Duration>,
    current_since: Instant,
}

impl MinFilter {
    fn new() -> Self {
        MinFilter {
            previous: None,
            current: None,
            current_since: Instant::now(),
        }
    }

    fn push(&mut self, sample: Duration, now: Instant) {
        if now.duration_since(self.current_since) >= MIN_RTT_PERIOD {
            self.previous = self.current.take();
            self.current_since = now;
        }
        self.current = Some(self.current.map_or(sample, |min| min.min(sample)));
    }

    fn get(&self) -> Option<Duration> {
        match (self.previous, self.current) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
impl Rtt {
    /// Records a least round trip of `least`, then a latest of `latest`, each as if its
    /// ping went out now (Tower's patch, for tests).
    pub(crate) fn set_samples(&self, least: Duration, latest: Duration) {
        let inner = &mut *self.inner.lock();
        let now = Instant::now();
        inner.min.push(least, now);
        inner.min.push(latest, now);
        inner.rtt = Some(latest);
        inner.sample_sent_at = Some(now);
    }
}

#[cfg(test)]
impl quickcheck::Arbitrary for Rtt {
    fn arbitrary(g: &mut quickcheck::Gen) -> Self {
        Self {
            inner: Arc::new(Mutex::new(RttInner::arbitrary(g))),
            next_id: Arc::new(AtomicU32::new(0)),
            learned_window: Arc::new(AtomicU32::new(0)),
        }
    }
}

#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
struct RttInner {
    state: RttState,
    rtt: Option<Duration>,
    /// The least round trip seen lately (Tower's patch).
    min: MinFilter,
    /// When the latest sample's ping was sent (Tower's patch).
    sample_sent_at: Option<Instant>,
}

impl RttInner {
    fn is_short_path(&self) -> bool {
        self.min.get().is_some_and(|min| min < SHORT_PATH)
    }
}

#[cfg(test)]
impl quickcheck::Arbitrary for RttInner {
    fn arbitrary(g: &mut quickcheck::Gen) -> Self {
        Self {
            state: RttState::arbitrary(g),
            rtt: if bool::arbitrary(g) {
                Some(Duration::arbitrary(g))
            } else {
                None
            },
            min: MinFilter::new(),
            sample_sent_at: None,
        }
    }
}

#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
enum RttState {
    AwaitingPong { sent_at: Instant, id: u32 },
    Waiting { next: Instant },
}

#[cfg(test)]
impl quickcheck::Arbitrary for RttState {
    fn arbitrary(g: &mut quickcheck::Gen) -> Self {
        if bool::arbitrary(g) {
            RttState::AwaitingPong {
                sent_at: Instant::now(),
                id: u32::arbitrary(g),
            }
        } else {
            RttState::Waiting {
                next: Instant::now(),
            }
        }
    }
}
