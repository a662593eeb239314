//! The idle stream timeout: a proxied request whose bytes stop moving in both directions
//! for `--stream-idle-timeout` is ended — with 504 if the member never answered, or by
//! cutting the response body (an error the caller sees, never a clean short end).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, DropGuard};

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

/// Waits for `future` while `activity` shows bytes moving; `Err` once idle for `timeout`.
pub(crate) async fn unless_idle<F: Future>(
    future: F,
    activity: &Activity,
    timeout: Duration,
) -> Result<F::Output, IdleTimeout> {
    tokio::pin!(future);
    loop {
        let deadline = activity.deadline(timeout);
        tokio::select! {
            out = &mut future => return Ok(out),
            () = tokio::time::sleep_until(deadline) => {
                if activity.deadline(timeout) <= Instant::now() {
                    return Err(IdleTimeout(timeout));
                }
            }
        }
    }
}

/// Closes the caller's connection: each listener puts one, for the connection a request
/// came on, into the request's extensions.
#[derive(Clone, Debug, Default)]
pub(crate) struct CloseConnection(pub(crate) CancellationToken);

/// Watches a response whose body hyper may stop asking for: a caller that stops reading
/// fills its socket (or its HTTP/2 window), hyper then stops polling the body, and
/// [`IdleBody`]'s own timer, which runs only when polled, never fires. With nothing moved
/// for `timeout` and a quarter more (so that [`IdleBody`], when it is polled, cuts the body
/// first and cleanly), this closes the caller's connection, which drops the response and
/// everything it holds. Stops when the returned guard is dropped (with the body).
pub(crate) fn close_when_unread(
    activity: Arc<Activity>,
    timeout: Duration,
    close: CloseConnection,
    on_timeout: impl FnOnce() + Send + 'static,
) -> DropGuard {
    let done = CancellationToken::new();
    let body_gone = done.clone();
    let slack = timeout / 4;
    tokio::spawn(async move {
        loop {
            let deadline = activity.deadline(timeout) + slack;
            tokio::select! {
                () = body_gone.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => {
                    if activity.deadline(timeout) + slack <= Instant::now() {
                        tracing::debug!(?timeout, "a response sat unread: closing its connection");
                        on_timeout();
                        close.0.cancel();
                        return;
                    }
                }
            }
        }
    });
    done.drop_guard()
}

pin_project_lite::pin_project! {
    /// A body that counts as activity and ends with [`IdleTimeout`] once nothing has
    /// moved for `timeout`.
    pub(crate) struct IdleBody<B> {
        #[pin]
        inner: B,
        activity: Arc<Activity>,
        timeout: Duration,
        #[pin]
        sleep: Sleep,
        on_timeout: Option<Box<dyn FnOnce() + Send + Sync>>,
    }
}

impl<B> IdleBody<B> {
    pub(crate) fn new(
        inner: B,
        activity: Arc<Activity>,
        timeout: Duration,
        on_timeout: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        let sleep = tokio::time::sleep_until(activity.deadline(timeout));
        IdleBody {
            inner,
            activity,
            timeout,
            sleep,
            on_timeout: Some(Box::new(on_timeout)),
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::status::BoxError>,
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
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            let deadline = this.activity.deadline(*this.timeout);
            if deadline <= Instant::now() {
                if let Some(report) = this.on_timeout.take() {
                    report();
                }
                return Poll::Ready(Some(Err(Box::new(IdleTimeout(*this.timeout)))));
            }
            this.sleep.as_mut().reset(deadline);
        }
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
    async fn an_unread_response_closes_its_connection_after_the_timeout_and_a_quarter() {
        let timeout = Duration::from_secs(8);
        let activity = Activity::new();
        let close = CloseConnection::default();
        let (fired_tx, fired) = tokio::sync::oneshot::channel();
        let _guard = close_when_unread(activity.clone(), timeout, close.clone(), move || {
            let _ = fired_tx.send(());
        });
        // Activity keeps it open.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            activity.touch();
        }
        assert!(!close.0.is_cancelled());
        let quiet = Instant::now();
        close.0.cancelled().await;
        assert_eq!(quiet.elapsed(), Duration::from_secs(10));
        fired.await.unwrap();

        // Dropping the guard (the body ended) stops the watch.
        let close = CloseConnection::default();
        let guard = close_when_unread(Activity::new(), timeout, close.clone(), || {});
        drop(guard);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!close.0.is_cancelled());
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
