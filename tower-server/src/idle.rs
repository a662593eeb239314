//! The idle stream timeout: a proxied request whose bytes stop moving in both directions
//! for `--stream-idle-timeout` is ended — with 504 if the member never answered, or by
//! cutting the response body (an error the caller sees, never a clean short end).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// When a request last moved a byte (either direction).
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    /// Records activity now.
    pub(crate) fn touch(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// When the request goes idle if nothing moves before.
    fn deadline(&self, timeout: Duration) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
    }
}

/// The error a cut body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no bytes moved for {0:?} (--stream-idle-timeout): stream closed")]
pub(crate) struct IdleTimeout(pub(crate) Duration);

pin_project_lite::pin_project! {
    /// What [`unless_idle`] returns.
    pub(crate) struct UnlessIdle<'a, F> {
        #[pin]
        future: F,
        activity: &'a Activity,
        timeout: Duration,
        #[pin]
        sleep: Sleep,
    }
}

/// Waits for `future` while `activity` shows bytes moving; `Err` once idle for `timeout`.
///
/// A future of its own rather than an `async fn`: that held `future` twice (the argument
/// and the pinned local), and the frontend's is a request's send, so every request's
/// future grew by it and was copied with it (BENCHMARKS.md, "Smaller request futures").
pub(crate) fn unless_idle<F: Future>(
    future: F,
    activity: &Activity,
    timeout: Duration,
) -> UnlessIdle<'_, F> {
    UnlessIdle {
        future,
        activity,
        timeout,
        sleep: tokio::time::sleep_until(activity.deadline(timeout)),
    }
}

impl<F: Future> Future for UnlessIdle<'_, F> {
    type Output = Result<F::Output, IdleTimeout>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        ready!(poll_idle(this.sleep, this.activity, *this.timeout, cx));
        Poll::Ready(Err(IdleTimeout(*this.timeout)))
    }
}

/// Ready once `activity` has moved nothing for `timeout`; until then `sleep` is re-armed
/// to the deadline the latest activity sets.
fn poll_idle(
    mut sleep: Pin<&mut Sleep>,
    activity: &Activity,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        ready!(sleep.as_mut().poll(cx));
        let deadline = activity.deadline(timeout);
        if deadline <= Instant::now() {
            return Poll::Ready(());
        }
        sleep.as_mut().reset(deadline);
    }
}

/// The responses one connection is serving, watched for a caller that stops reading: its
/// socket (or HTTP/2 window) fills, hyper stops polling the body, and so [`IdleBody`]'s own
/// timer, which runs only when polled, never fires. Each connection has one (its
/// `Peer`'s, handed to every request's handler), and its task closes the connection once
/// [`Unread::stalled_past`] resolves, which drops the responses and all they hold.
#[derive(Clone, Debug, Default)]
pub(crate) struct Unread(Arc<Mutex<Watched>>);

#[derive(Debug, Default)]
struct Watched {
    /// The responses' activity, dead once a response body is gone.
    responses: Vec<Weak<Activity>>,
    /// Past this length, dead entries are dropped before the next is added.
    tidy_at: usize,
}

impl Unread {
    /// Watches a response until its body (the last holder of `activity`) is gone.
    pub(crate) fn watch(&self, activity: &Arc<Activity>) {
        let mut watched = self.lock();
        if watched.responses.len() >= watched.tidy_at {
            watched.responses.retain(|r| r.strong_count() > 0);
            watched.tidy_at = (2 * watched.responses.len()).max(16);
        }
        watched.responses.push(Arc::downgrade(activity));
    }

    /// Resolves once a response still being served has moved nothing for `timeout` and a
    /// quarter more. Looked at every quarter of `timeout`: the quarter's slack lets
    /// [`IdleBody`], when it is polled, end a merely silent body first (on HTTP/2 that
    /// costs one stream, not the connection).
    pub(crate) async fn stalled_past(&self, timeout: Duration) {
        let quarter = timeout / 4;
        let mut tick = tokio::time::interval_at(Instant::now() + quarter, quarter);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = tick.tick().await;
            let mut watched = self.lock();
            watched.responses.retain(|r| r.strong_count() > 0);
            let stalled = watched
                .responses
                .iter()
                .filter_map(Weak::upgrade)
                .any(|activity| activity.deadline(timeout) + quarter <= now);
            if stalled {
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pin_project_lite::pin_project! {
    /// A body that counts as activity and ends with [`IdleTimeout`] once nothing has
    /// moved for `timeout`, calling `on_timeout` then. The callback is a type parameter,
    /// not a box: one allocation fewer per request.
    pub(crate) struct IdleBody<B, R> {
        #[pin]
        inner: B,
        activity: Arc<Activity>,
        timeout: Duration,
        #[pin]
        sleep: Sleep,
        on_timeout: Option<R>,
    }
}

impl<B, R: FnOnce()> IdleBody<B, R> {
    pub(crate) fn new(inner: B, activity: Arc<Activity>, timeout: Duration, on_timeout: R) -> Self {
        let sleep = tokio::time::sleep_until(activity.deadline(timeout));
        IdleBody {
            inner,
            activity,
            timeout,
            sleep,
            on_timeout: Some(on_timeout),
        }
    }
}

impl<B, R> Body for IdleBody<B, R>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::status::BoxError>,
    R: FnOnce(),
{
    type Data = Bytes;
    type Error = crate::status::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            this.activity.touch();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(poll_idle(this.sleep, this.activity, *this.timeout, cx));
        if let Some(report) = this.on_timeout.take() {
            report();
        }
        Poll::Ready(Some(Err(Box::new(IdleTimeout(*this.timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_is_cut_and_a_busy_one_is_not() {
        let activity = Activity::new();
        let (mut tx, rx) =
            futures::channel::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let body = IdleBody::new(
            http_body_util::StreamBody::new(rx),
            activity.clone(),
            Duration::from_secs(10),
            || {},
        );
        let reader = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        // Bytes every 6 s keep it alive well past 10 s.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            tx.try_send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .unwrap();
        }
        // Activity elsewhere (the request body) counts too.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            activity.touch();
        }
        assert!(!reader.is_finished());
        tokio::time::sleep(Duration::from_secs(11)).await;
        let err = reader.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("stream-idle-timeout"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_left_unread_is_noticed_after_the_timeout_and_a_quarter() {
        let timeout = Duration::from_secs(8);
        let unread = Unread::default();
        let activity = Activity::new();
        unread.watch(&activity);
        let watching = tokio::spawn({
            let unread = unread.clone();
            async move { unread.stalled_past(timeout).await }
        });
        // Activity keeps it from resolving.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            activity.touch();
        }
        assert!(!watching.is_finished());
        let quiet = Instant::now();
        watching.await.unwrap();
        // 10 s (8 + 2) after the last byte, seen at the next 2 s tick.
        let noticed = quiet.elapsed();
        assert!(
            noticed >= Duration::from_secs(10) && noticed <= Duration::from_secs(12),
            "{noticed:?}"
        );

        // A response whose body is gone (its activity dropped) is no longer watched, and
        // dead entries do not pile up.
        let unread = Unread::default();
        for _ in 0..1000 {
            unread.watch(&Activity::new());
        }
        assert!(
            unread.lock().responses.len() <= 16,
            "{}",
            unread.lock().responses.len()
        );
        let never = tokio::time::timeout(Duration::from_secs(60), unread.stalled_past(timeout));
        assert!(never.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_headers_gives_up_only_when_idle() {
        let activity = Activity::new();
        let slow = tokio::time::sleep(Duration::from_secs(25));
        let toucher = {
            let activity = activity.clone();
            tokio::spawn(async move {
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    activity.touch();
                }
            })
        };
        assert!(
            unless_idle(slow, &activity, Duration::from_secs(10))
                .await
                .is_ok()
        );
        toucher.await.unwrap();
        let never = std::future::pending::<()>();
        assert!(
            unless_idle(never, &activity, Duration::from_secs(10))
                .await
                .is_err()
        );
    }
}
