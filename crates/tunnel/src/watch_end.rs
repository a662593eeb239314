//! Ending a watch cleanly on drain.
//!
//! A Kubernetes watch never ends by itself, so a proxy that is draining would either wait
//! out its whole grace period or cut the stream (which clients report as an error). Like
//! kube-apiserver on shutdown, Tower instead ends the watch response *cleanly*: once the
//! signal fires, the body ends at the next event boundary (watch events are
//! newline-delimited JSON), and clients re-list or re-watch elsewhere.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Whether a request (its Kubernetes API path) is a watch: `?watch=1|true`, or the
/// deprecated watch paths `/api/{version}/watch/…` and `/apis/{group}/{version}/watch/…`.
/// Only there: a namespace or an object may be called `watch`, and a body taken for a
/// watch's is ended early on drain.
pub fn is_watch(uri: &http::Uri) -> bool {
    let mut segments = uri.path().split('/').skip(1);
    let watch_path = match segments.next() {
        Some("api") => segments.nth(1) == Some("watch"),
        Some("apis") => segments.nth(2) == Some("watch"),
        _ => false,
    };
    watch_path
        || uri.query().is_some_and(|q| {
            q.split('&')
                .any(|kv| matches!(kv, "watch=1" | "watch=true" | "watch=True"))
        })
}

pin_project_lite::pin_project! {
    /// A watch body that ends at the first event boundary after `signal` fires.
    pub struct EndOnSignal<B> {
        #[pin]
        inner: B,
        #[pin]
        signal: WaitForCancellationFutureOwned,
        // The signal fired: end at the next newline.
        ending: bool,
        // The last byte passed on was a newline (or nothing was passed on yet).
        at_boundary: bool,
        done: bool,
    }
}

impl<B> EndOnSignal<B> {
    /// Wraps `inner`; `signal` asks for a clean end.
    pub fn new(inner: B, signal: CancellationToken) -> Self {
        EndOnSignal {
            inner,
            signal: signal.cancelled_owned(),
            ending: false,
            at_boundary: true,
            done: false,
        }
    }
}

impl<B> Body for EndOnSignal<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if !*this.ending && this.signal.as_mut().poll(cx).is_ready() {
            *this.ending = true;
        }
        if *this.ending && *this.at_boundary {
            *this.done = true;
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        if *this.ending
                            && let Some(newline) = data.iter().position(|b| *b == b'\n')
                        {
                            // Pass on the rest of this event, then end.
                            data.truncate(newline + 1);
                            *this.at_boundary = true;
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        if let Some(last) = data.last() {
                            *this.at_boundary = *last == b'\n';
                        }
                        Frame::data(data)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ending {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures::SinkExt;
    use http_body_util::BodyExt;

    type Tx = futures::channel::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

    fn body(
        signal: CancellationToken,
    ) -> (
        Tx,
        EndOnSignal<impl Body<Data = Bytes, Error = std::io::Error>>,
    ) {
        let (tx, rx) = futures::channel::mpsc::channel(8);
        let body = EndOnSignal::new(http_body_util::StreamBody::new(rx), signal);
        (tx, body)
    }

    fn data(s: &str) -> Result<Frame<Bytes>, std::io::Error> {
        Ok(Frame::data(Bytes::from(s.to_owned())))
    }

    #[tokio::test]
    async fn a_drained_watch_ends_after_the_event_in_progress() {
        let signal = CancellationToken::new();
        let (mut tx, body) = body(signal.clone());
        let reader = tokio::spawn(body.collect());
        tx.send(data("{\"type\":\"ADDED\"}\n{\"type\":"))
            .await
            .unwrap();
        tokio::task::yield_now().await;
        signal.cancel();
        tx.send(data("\"MODIFIED\"}\n{\"type\":\"DELETED\"}\n"))
            .await
            .unwrap();
        let out = reader.await.unwrap().unwrap().to_bytes();
        assert_eq!(&out[..], b"{\"type\":\"ADDED\"}\n{\"type\":\"MODIFIED\"}\n");
    }

    #[tokio::test]
    async fn at_a_boundary_it_ends_at_once() {
        let signal = CancellationToken::new();
        let (mut tx, body) = body(signal.clone());
        let reader = tokio::spawn(body.collect());
        tx.send(data("{\"type\":\"ADDED\"}\n")).await.unwrap();
        tokio::task::yield_now().await;
        signal.cancel();
        // The sender stays open: the end comes from the signal alone.
        let out = reader.await.unwrap().unwrap().to_bytes();
        assert_eq!(&out[..], b"{\"type\":\"ADDED\"}\n");
        drop(tx);
    }

    #[test]
    fn watches_are_recognised() {
        let yes = [
            "/api/v1/pods?watch=1",
            "/api/v1/pods?limit=5&watch=true",
            "/api/v1/watch/pods",
            "/api/v1/watch/namespaces/default/pods/web-0",
            "/apis/apps/v1/watch/deployments",
        ];
        for uri in yes {
            assert!(is_watch(&uri.parse().unwrap()), "{uri}");
        }
        let no = [
            "/api/v1/pods",
            "/api/v1/pods?watch=0",
            "/api/v1/pods?watchy=1",
            // Names that are only names.
            "/api/v1/namespaces/watch/pods",
            "/api/v1/namespaces/default/configmaps/watch",
            "/apis/apps/v1/namespaces/watch/deployments",
            "/apis/watch/v1/things",
            "/clusters/watch/api/v1/pods",
            "/kapis/watch/x",
        ];
        for uri in no {
            assert!(!is_watch(&uri.parse().unwrap()), "{uri}");
        }
    }
}
