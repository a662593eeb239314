//! Ending a watch cleanly on drain.
//!
//! A Kubernetes watch never ends by itself, so a proxy that is draining would either wait
//! out its whole grace period or cut the stream (which clients report as an error). Like
//! kube-apiserver on shutdown, Tower instead ends the watch response *cleanly*: once the
//! signal fires, the body ends at the next event boundary, and clients re-list or re-watch
//! elsewhere. Where a boundary is depends on the watch's Content-Type ([`Framer`]), as
//! kube-apiserver frames it (k8s.io/apimachinery/pkg/util/framer): JSON events one per
//! line, protobuf events behind a 4-byte big-endian length. A body whose framing Tower
//! does not know is never ended early: it runs until the grace period is over.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Where the events of a watch body begin and end, tracked over the bytes passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framer {
    /// JSON: one event per line. `at_boundary`: the last byte passed on was a newline
    /// (or none was passed on yet).
    Lines {
        /// Whether the bytes so far end an event.
        at_boundary: bool,
    },
    /// Protobuf (`application/vnd.kubernetes.protobuf;stream=watch`): a 4-byte big-endian
    /// length, then that many bytes.
    LengthPrefixed {
        /// Length bytes of the next frame read so far.
        header: [u8; 4],
        /// How many of them.
        have: usize,
        /// Bytes of the current frame still to come.
        remaining: u64,
    },
    /// A framing Tower does not know (CBOR sequences, say): no boundary is ever assumed.
    Unknown,
}

impl Framer {
    /// The framing of a watch response with this `Content-Type` (JSON when absent).
    pub fn for_content_type(content_type: Option<&http::HeaderValue>) -> Framer {
        let Some(value) = content_type else {
            return Framer::Lines { at_boundary: true };
        };
        let media = value
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/vnd.kubernetes.protobuf" => Framer::LengthPrefixed {
                header: [0; 4],
                have: 0,
                remaining: 0,
            },
            m if m == "application/json" || m.ends_with("+json") => {
                Framer::Lines { at_boundary: true }
            }
            _ => Framer::Unknown,
        }
    }

    /// Whether the bytes passed on so far end exactly at an event boundary.
    pub fn at_boundary(&self) -> bool {
        match self {
            Framer::Lines { at_boundary } => *at_boundary,
            Framer::LengthPrefixed {
                have, remaining, ..
            } => *have == 0 && *remaining == 0,
            Framer::Unknown => false,
        }
    }

    /// Takes in `data`, which is passed on. With `stop_at_boundary`, stops at the first
    /// event boundary inside it and returns its offset (the bytes after it are not taken
    /// in); otherwise takes in everything and returns `data.len()`.
    pub fn advance(&mut self, data: &[u8], stop_at_boundary: bool) -> usize {
        match self {
            Framer::Lines { at_boundary } => {
                if stop_at_boundary && let Some(newline) = data.iter().position(|b| *b == b'\n') {
                    *at_boundary = true;
                    return newline + 1;
                }
                if let Some(last) = data.last() {
                    *at_boundary = *last == b'\n';
                }
                data.len()
            }
            Framer::LengthPrefixed {
                header,
                have,
                remaining,
            } => {
                let mut i = 0;
                while i < data.len() {
                    if *remaining > 0 {
                        let take = usize::try_from(*remaining)
                            .unwrap_or(usize::MAX)
                            .min(data.len() - i);
                        i += take;
                        *remaining -= take as u64;
                    } else {
                        header[*have] = data[i];
                        *have += 1;
                        i += 1;
                        if *have < header.len() {
                            continue;
                        }
                        *have = 0;
                        *remaining = u64::from(u32::from_be_bytes(*header));
                    }
                    if stop_at_boundary && *have == 0 && *remaining == 0 {
                        return i;
                    }
                }
                data.len()
            }
            Framer::Unknown => data.len(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A watch body that ends at the first event boundary after `signal` fires.
    pub struct EndOnSignal<B> {
        #[pin]
        inner: B,
        #[pin]
        signal: WaitForCancellationFutureOwned,
        framer: Framer,
        // The signal fired: end at the next boundary.
        ending: bool,
        done: bool,
    }
}

impl<B> EndOnSignal<B> {
    /// Wraps `inner`, framed by `framer` (see [`Framer::for_content_type`]); `signal` asks
    /// for a clean end.
    pub fn new(inner: B, framer: Framer, signal: CancellationToken) -> Self {
        EndOnSignal {
            inner,
            signal: signal.cancelled_owned(),
            framer,
            ending: false,
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
        if *this.ending && this.framer.at_boundary() {
            *this.done = true;
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        let taken = this.framer.advance(&data, *this.ending);
                        // Pass on the rest of the event in progress; the next poll ends.
                        data.truncate(taken);
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
        let body = EndOnSignal::new(
            http_body_util::StreamBody::new(rx),
            Framer::Lines { at_boundary: true },
            signal,
        );
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

    /// A protobuf watch frame: the length, then `len` bytes of `fill`.
    fn pb_frame(len: u32, fill: u8) -> Vec<u8> {
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend(std::iter::repeat_n(fill, len as usize));
        frame
    }

    #[tokio::test]
    async fn a_drained_protobuf_watch_ends_after_the_frame_in_progress_whatever_its_bytes() {
        let signal = CancellationToken::new();
        let (mut tx, rx) = futures::channel::mpsc::channel(8);
        let content_type =
            http::HeaderValue::from_static("application/vnd.kubernetes.protobuf;stream=watch");
        let body = EndOnSignal::new(
            http_body_util::StreamBody::new(rx),
            Framer::for_content_type(Some(&content_type)),
            signal.clone(),
        );
        let reader = tokio::spawn(body.collect());
        // Frames full of newline bytes: a line framer would cut them anywhere.
        let (first, second, third) = (pb_frame(5, b'\n'), pb_frame(300, b'\n'), pb_frame(2, 7));
        let mut sent: Vec<u8> = first.clone();
        sent.extend_from_slice(&second[..3]); // a frame's length, split
        let send = |tx: &mut Tx, bytes: &[u8]| {
            let frame: Result<Frame<Bytes>, std::io::Error> =
                Ok(Frame::data(Bytes::copy_from_slice(bytes)));
            tx.try_send(frame).unwrap();
        };
        send(&mut tx, &sent);
        tokio::task::yield_now().await;
        signal.cancel();
        let mut rest = second[3..].to_vec();
        rest.extend_from_slice(&third);
        send(&mut tx, &rest[..100]);
        send(&mut tx, &rest[100..]);
        let out = reader.await.unwrap().unwrap().to_bytes();
        let mut want = first;
        want.extend_from_slice(&second);
        assert_eq!(out.len(), want.len(), "ends after the second frame, whole");
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn framing_follows_the_content_type() {
        let framer =
            |ct: &str| Framer::for_content_type(Some(&http::HeaderValue::from_str(ct).unwrap()));
        assert_eq!(
            framer("application/json;stream=watch"),
            Framer::Lines { at_boundary: true }
        );
        assert_eq!(
            framer("application/json;as=Table;v=v1;g=meta.k8s.io"),
            Framer::Lines { at_boundary: true }
        );
        assert_eq!(
            Framer::for_content_type(None),
            Framer::Lines { at_boundary: true }
        );
        assert!(matches!(
            framer("application/vnd.kubernetes.protobuf;stream=watch"),
            Framer::LengthPrefixed { .. }
        ));
        assert_eq!(framer("application/cbor-seq"), Framer::Unknown);
        // Unknown framing: never a boundary, so never ended early.
        let mut unknown = Framer::Unknown;
        assert!(!unknown.at_boundary());
        assert_eq!(unknown.advance(b"a\nb", true), 3);
        // An empty protobuf frame is a whole event.
        let mut pb = framer("application/vnd.kubernetes.protobuf");
        assert_eq!(pb.advance(&[0, 0, 0, 0, 0, 0, 0, 1, 9], true), 4);
        assert!(pb.at_boundary());
        assert_eq!(pb.advance(&[0, 0, 0, 1, 9], false), 5);
        assert!(pb.at_boundary());
        assert_eq!(pb.advance(&[0, 0], false), 2);
        assert!(!pb.at_boundary());
    }
}
