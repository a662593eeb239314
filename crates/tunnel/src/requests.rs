//! The requests one connection serves, and when it has served none for long.
//!
//! A connection nobody uses should close: an HTTP/2 client that answers pings and never
//! sends a request, an HTTP/1.1 one that trickles its headers, a pooled tunnel stream the
//! server forgot. hyper's HTTP/1.1 header read timeout does some of that, but arms a
//! timer for every request (a boxed sleep, registered and cancelled, and one more poll of
//! the reader after each request head to start it): 1.5 K of the server's 76 K
//! instructions per small request, 1.1 K of the agent's 71 K (benches/reference/counts.sh).
//! [`OpenRequests::idle`] does it with one timer per connection, looked at only when it
//! runs out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::exchanges::{Exchange, Exchanges};

/// The requests one connection is serving now.
///
/// Nothing here wakes the watcher per request: it sleeps to its deadline and then looks
/// at when the last request ended. A request used to notify it going to and from zero,
/// and it armed a new timer each time (~1.7 K instructions per request on an HTTP/2
/// connection that serves one request at a time, as kubectl's does; callgrind).
#[derive(Debug)]
pub struct OpenRequests {
    open: AtomicUsize,
    served: AtomicBool,
    /// When a request last ended, as nanoseconds since `origin`.
    ended: AtomicU64,
    origin: Instant,
    /// The session's count each request also adds to, on a tunnel stream.
    session: Option<Exchanges>,
}

impl Default for OpenRequests {
    fn default() -> Self {
        OpenRequests {
            open: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            ended: AtomicU64::new(0),
            origin: Instant::now(),
            session: None,
        }
    }
}

/// Why a connection was closed for want of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// No request came within the first-request deadline.
    NoFirstRequest,
    /// No request was open for the idle deadline.
    Idle,
}

impl Idle {
    /// The `reason` label of `tower_requests_limited_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Idle::NoFirstRequest => "first_request_timeout",
            Idle::Idle => "connection_idle_timeout",
        }
    }
}

impl OpenRequests {
    /// The requests of one stream of a session, each also counted among the session's
    /// exchanges while open ([`crate::SessionHandle::exchanges`]).
    pub fn counting(session: &Exchanges) -> Self {
        OpenRequests {
            session: Some(session.clone()),
            ..OpenRequests::default()
        }
    }

    /// Counts a request open until the returned guard is dropped (with its response body).
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        self.served.store(true, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            requests: self.clone(),
            _exchange: self.session.as_ref().map(Exchanges::begin),
        }
    }

    /// Resolves once no request has been open for `first` since now and no request
    /// ended since, or for `idle` since the last one ended.
    pub async fn idle(&self, first: Duration, idle: Duration) -> Idle {
        let start = Instant::now();
        let mut deadline = start + first;
        loop {
            tokio::time::sleep_until(deadline).await;
            if self.open.load(Ordering::Acquire) > 0 {
                // It can be idle no sooner than `idle` after its open requests end.
                deadline = Instant::now() + idle;
                continue;
            }
            let ended = self.origin + Duration::from_nanos(self.ended.load(Ordering::Acquire));
            let due = if ended > start {
                ended + idle
            } else {
                start + first
            };
            if Instant::now() >= due {
                return if self.served.load(Ordering::Relaxed) {
                    Idle::Idle
                } else {
                    Idle::NoFirstRequest
                };
            }
            deadline = due;
        }
    }
}

/// A request counted in [`OpenRequests`] (and among its session's exchanges, if counted
/// there).
#[derive(Debug)]
pub struct RequestGuard {
    requests: Arc<OpenRequests>,
    _exchange: Option<Exchange>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let requests = &self.requests;
        // Before the count drops: whoever sees it at zero sees when that was.
        let since = u64::try_from(requests.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        requests.ended.fetch_max(since, Ordering::AcqRel);
        requests.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_streams_requests_count_among_its_sessions_exchanges_while_open() {
        let session = Exchanges::default();
        let requests = Arc::new(OpenRequests::counting(&session));
        let first = requests.start();
        assert!(!session.several());
        let second = requests.start();
        assert!(session.several(), "two open requests are two exchanges");
        drop(second);
        assert!(!session.several());
        // Another stream's request on the same session counts too.
        let other = Arc::new(OpenRequests::counting(&session)).start();
        assert!(session.several());
        drop((first, other));
        assert!(!session.several());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_requests_is_idle_after_its_deadlines() {
        let first = Duration::from_secs(10);
        let idle = Duration::from_secs(60);
        // Never a request: the first-request deadline.
        let requests = Arc::new(OpenRequests::default());
        let start = Instant::now();
        assert_eq!(requests.idle(first, idle).await, Idle::NoFirstRequest);
        assert_eq!(start.elapsed(), first);

        // A request open for 100 s keeps it; then the idle deadline counts from its end.
        let requests = Arc::new(OpenRequests::default());
        let watcher = tokio::spawn({
            let requests = requests.clone();
            async move { requests.idle(first, idle).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let request = requests.start();
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!watcher.is_finished());
        let ended = Instant::now();
        drop(request);
        assert_eq!(watcher.await.unwrap(), Idle::Idle);
        assert_eq!(ended.elapsed(), idle);

        // Short requests one after another (as kubectl sends them) each move the idle
        // deadline to the end of the last; the watcher is not woken by any of them.
        let requests = Arc::new(OpenRequests::default());
        let watcher = tokio::spawn({
            let requests = requests.clone();
            async move { requests.idle(first, idle).await }
        });
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(7)).await;
            drop(requests.start());
        }
        let ended = Instant::now();
        assert!(!watcher.is_finished());
        assert_eq!(watcher.await.unwrap(), Idle::Idle);
        assert_eq!(ended.elapsed(), idle);
    }
}
