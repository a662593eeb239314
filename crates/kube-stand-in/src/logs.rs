//! Pod logs: 20 lines `log line N from {pod}`, then with `follow=true` one more line every
//! 100 ms until the client goes away (each line its own chunk). `tailLines` and `limitBytes`
//! are honoured, and `timestamps=true` prefixes each line with its time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderValue};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;

use crate::api::{Body, Query};
use crate::{Shared, StreamGuard, clock};

/// Lines a pod has logged when the request arrives.
const INITIAL_LINES: u64 = 20;
/// Interval between followed lines.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

struct LogState {
    shared: Arc<Shared>,
    pod: String,
    next: u64,
    follow: bool,
    timestamps: bool,
    bytes_left: Option<u64>,
    interval: Option<tokio::time::Interval>,
    _guard: StreamGuard,
}

/// Serves `GET …/pods/{pod}/log`.
pub(crate) fn serve(shared: &Arc<Shared>, pod: &str, query: &Query) -> Response<Body> {
    let tail = query
        .get("tailLines")
        .and_then(|t| t.parse::<i64>().ok())
        .filter(|t| *t >= 0)
        .map(u64::try_from)
        .and_then(Result::ok);
    let first = tail.map_or(1, |t| INITIAL_LINES.saturating_sub(t) + 1);
    let state = LogState {
        shared: shared.clone(),
        pod: pod.to_owned(),
        next: first,
        follow: query.flag("follow"),
        timestamps: query.flag("timestamps"),
        bytes_left: query.get("limitBytes").and_then(|b| b.parse().ok()),
        interval: None,
        _guard: StreamGuard::new(shared),
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        let line = state.next_line().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), state))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

impl LogState {
    async fn next_line(&mut self) -> Option<Bytes> {
        if self.bytes_left == Some(0) {
            return None;
        }
        if self.next > INITIAL_LINES {
            if !self.follow {
                return None;
            }
            let interval = self.interval.get_or_insert_with(|| {
                let mut i = tokio::time::interval_at(
                    tokio::time::Instant::now() + FOLLOW_INTERVAL,
                    FOLLOW_INTERVAL,
                );
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            tokio::select! {
                () = self.shared.cancel.cancelled() => return None,
                _ = interval.tick() => {}
            }
        }
        let stamp = if self.timestamps {
            // The kubelet's RFC 3339 with nanoseconds.
            let now = clock::now_rfc3339();
            format!("{}.000000000Z ", now.trim_end_matches('Z'))
        } else {
            String::new()
        };
        let mut line = format!("{stamp}log line {} from {}\n", self.next, self.pod).into_bytes();
        self.next += 1;
        if let Some(left) = self.bytes_left.as_mut() {
            let keep = usize::try_from(*left).unwrap_or(usize::MAX).min(line.len());
            line.truncate(keep);
            *left -= keep as u64;
        }
        Some(Bytes::from(line))
    }
}
