//! Response bodies read from the upstream no faster than their tunnel stream takes them.
//!
//! hyper's HTTP/1.1 server keeps polling a response body until its write buffer holds
//! `max_buf_size` (~400 KiB by default; the agent's must also hold the largest request
//! head the server forwards, so it cannot be made small). When a caller stops reading,
//! its tunnel stream stops taking bytes once the server's receive window is full, and all
//! of that stays in the agent for as long as the caller keeps the response open: with the
//! upstream connection's read buffer and the chunk in flight, ~1.4 MB per response.
//! [`PacedBody`] hands hyper the next chunk only once the stream ([`PacedIo`]) has taken
//! the chunks before it, so a stalled response costs hyper's buffer one chunk at most,
//! and the upstream is read no further ahead than its connection's own read buffer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower_tunnel::requests::RequestGuard;

/// What one stream has taken and what its response bodies have given, shared by the
/// stream's [`PacedIo`] and each of its [`PacedBody`]s.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    /// Bytes the stream has taken (heads and framing included).
    taken: AtomicU64,
    /// Body bytes handed to hyper.
    given: AtomicU64,
    /// The body waiting for the stream to take what it gave.
    waiting: AtomicWaker,
}

impl Pace {
    /// Whether the stream has taken at least every body byte handed out so far.
    fn caught_up(&self) -> bool {
        self.given.load(Ordering::Acquire) <= self.taken.load(Ordering::Acquire)
    }
}

/// A stream that counts what it takes for the bodies written to it.
#[derive(Debug)]
pub(crate) struct PacedIo<T> {
    io: T,
    pace: Arc<Pace>,
}

impl<T> PacedIo<T> {
    /// `io`, and the pace its response bodies keep to ([`PacedBody::new`]).
    pub(crate) fn new(io: T) -> (Self, Arc<Pace>) {
        let pace = Arc::new(Pace::default());
        (
            PacedIo {
                io,
                pace: pace.clone(),
            },
            pace,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PacedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T> PacedIo<T> {
    /// Counts what a write took, and wakes the body waiting for it.
    fn took(&self, written: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written
            && *n > 0
        {
            self.pace.taken.fetch_add(*n as u64, Ordering::AcqRel);
            self.pace.waiting.wake();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PacedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.took(&written);
        written
    }

    /// Forwarded, so that hyper queues the body's chunks rather than copying them into
    /// its own buffer first (it does for I/O that cannot write vectored).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.took(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that yields its next chunk only once its stream has taken the ones
/// before.
pub(crate) struct PacedBody<B> {
    inner: B,
    pace: Arc<Pace>,
    /// Its request, counted open on the stream until the body is gone.
    open: Option<RequestGuard>,
}

impl<B> PacedBody<B> {
    /// The body of the response the stream writes next: what the stream took before
    /// (earlier responses, their heads and framing) gives it no head start.
    pub(crate) fn new(inner: B, pace: Arc<Pace>) -> Self {
        pace.given
            .store(pace.taken.load(Ordering::Acquire), Ordering::Release);
        PacedBody {
            inner,
            pace,
            open: None,
        }
    }

    /// Holds `open` (its request's count on the stream) until the body is gone.
    pub(crate) fn holding(mut self, open: RequestGuard) -> Self {
        self.open = Some(open);
        self
    }
}

impl<B> Body for PacedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if !self.pace.caught_up() {
            self.pace.waiting.register(cx.waker());
            // Taken between the check and the registration: go on now.
            if !self.pace.caught_up() {
                return Poll::Pending;
            }
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(data) = frame.data_ref()
        {
            self.pace
                .given
                .fetch_add(data.len() as u64, Ordering::AcqRel);
        }
        frame
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
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::AsyncWriteExt;

    /// A body of `chunks` chunks of `size` bytes, ready at once.
    fn body(chunks: usize, size: usize) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames = (0..chunks).map(move |_| Ok(Frame::data(Bytes::from(vec![7u8; size]))));
        StreamBody::new(futures::stream::iter(frames))
    }

    /// A stream that writes vectored and takes every slice at once, as the tunnel
    /// stream does.
    struct Vectored(Vec<u8>);

    impl AsyncWrite for Vectored {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let before = self.0.len();
            for buf in bufs {
                self.0.extend_from_slice(buf);
            }
            Poll::Ready(Ok(self.0.len() - before))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// hyper writes vectored when the stream can (a head and a chunk in one write), and
    /// what such a write takes counts as taken.
    #[tokio::test]
    async fn vectored_writes_pass_through_and_count_as_taken() {
        let (mut io, pace) = PacedIo::new(Vectored(Vec::new()));
        assert!(io.is_write_vectored());
        let taken = pace.clone();
        let mut body = PacedBody::new(body(2, 64), pace);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(futures::poll!(body.frame()).is_pending());
        let head = b"40\r\n";
        let slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(&first)];
        let n = io.write_vectored(&slices).await.unwrap();
        // Both slices in one write, not the first alone.
        assert_eq!(n, head.len() + first.len());
        assert_eq!(taken.taken.load(Ordering::Acquire), n as u64);
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second.len(), 64);
    }

    #[tokio::test]
    async fn the_next_chunk_waits_until_the_stream_took_the_last() {
        // A stream that takes 100 bytes, then nothing until its reader reads.
        let (near, mut far) = tokio::io::duplex(100);
        let (mut io, pace) = PacedIo::new(near);
        let mut body = PacedBody::new(body(3, 64), pace);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        // Given but not taken: the next chunk waits.
        let waiting = futures::poll!(body.frame());
        assert!(
            waiting.is_pending(),
            "a second chunk before the first was taken"
        );
        io.write_all(&first).await.unwrap();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        // The stream takes 36 of these 64 bytes, then is full: still waiting.
        let taken = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, &second))
            .await
            .unwrap();
        assert_eq!(taken, 36);
        assert!(futures::poll!(body.frame()).is_pending());
        // The reader reads; the rest is taken, and the last chunk comes.
        let mut sink = vec![0u8; 100];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut sink)
            .await
            .unwrap();
        io.write_all(&second[36..]).await.unwrap();
        let third = body.frame().await.unwrap().unwrap().into_data().unwrap();
        // The end, too, comes once the stream has taken what came before it.
        assert!(futures::poll!(body.frame()).is_pending());
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut sink[..28])
            .await
            .unwrap();
        io.write_all(&third).await.unwrap();
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_later_response_gets_no_head_start_from_what_the_stream_took_before() {
        let (near, _far) = tokio::io::duplex(1 << 20);
        let (mut io, pace) = PacedIo::new(near);
        // Heads and earlier bodies: the stream took more than any body gave.
        io.write_all(&[0u8; 10_000]).await.unwrap();
        let mut body = PacedBody::new(body(3, 64), pace);
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(
            futures::poll!(body.frame()).is_pending(),
            "the bytes taken before this body let a second chunk through"
        );
    }
}
