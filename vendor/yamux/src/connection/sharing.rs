//! Which streams of a connection received data lately (Tower's patch, see
//! `Config::set_fast_window_ramp`).

use std::sync::Arc;

use parking_lot::Mutex;
use web_time::Instant;

use crate::frame::header::StreamId;

/// When the connection's streams last received data: the stream that did last, and when
/// any other stream did last. A stream's window past what the path holds is a queue
/// that every other stream's data waits behind; it matters only while others have data.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sharing {
    inner: Arc<Mutex<Latest>>,
}

#[derive(Debug, Default)]
struct Latest {
    /// The stream that received data last, and when.
    newest: Option<(StreamId, Instant)>,
    /// When a stream other than `newest`'s last received data.
    others: Option<Instant>,
}

impl Sharing {
    /// Records that `stream` received data at `now`.
    pub(crate) fn record(&self, stream: StreamId, now: Instant) {
        let mut latest = self.inner.lock();
        if let Some((newest, at)) = latest.newest {
            if newest != stream {
                // `at` is the latest of all, so the latest of the streams other than
                // `stream`.
                latest.others = Some(at);
            }
        }
        latest.newest = Some((stream, now));
    }

    /// When a stream other than `stream` last received data.
    pub(crate) fn others_last(&self, stream: StreamId) -> Option<Instant> {
        let latest = self.inner.lock();
        match latest.newest {
            Some((newest, at)) if newest != stream => Some(at),
            _ => latest.others,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use web_time::Duration;

    #[test]
    fn others_last_is_the_latest_data_of_any_other_stream() {
        let (a, b, c) = (StreamId::new(1), StreamId::new(3), StreamId::new(5));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let sharing = Sharing::default();
        assert_eq!(sharing.others_last(a), None);

        sharing.record(a, at(1));
        assert_eq!(sharing.others_last(a), None);
        assert_eq!(sharing.others_last(b), Some(at(1)));

        sharing.record(a, at(2));
        sharing.record(b, at(3));
        assert_eq!(sharing.others_last(a), Some(at(3)));
        assert_eq!(sharing.others_last(b), Some(at(2)));
        assert_eq!(sharing.others_last(c), Some(at(3)));

        sharing.record(b, at(4));
        assert_eq!(sharing.others_last(b), Some(at(2)));
        sharing.record(c, at(5));
        assert_eq!(sharing.others_last(b), Some(at(5)));
        assert_eq!(sharing.others_last(c), Some(at(4)));
    }
}
