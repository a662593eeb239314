//! A yamux stream as tokio I/O (and so as hyper I/O through `TokioIo`), with its preamble.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::{CancellationToken, PollSemaphore, WaitForCancellationFutureOwned};
use tower_proto::{Preamble, StreamKind};

use crate::TunnelError;
use crate::queued::Queued;
use crate::woken::{WokenOnly, woken_only};

/// One stream of a tunnel. Holds a slot of its session's stream limit until dropped.
///
/// Once its session closes (or ends), a read or write that would wait fails with
/// `ConnectionAborted` instead: yamux's graceful close does not wake the streams it
/// leaves behind, so without this a request in flight on a closed tunnel would hang.
pub struct TunnelStream {
    inner: Compat<yamux::Stream>,
    /// Resolves when the session is closing or over; polled only when yamux has nothing
    /// for us, so a busy stream pays nothing for it, and then only through its wake
    /// ([`woken_only`]).
    session_over: Pin<Box<WokenOnly<WaitForCancellationFutureOwned>>>,
    /// Permits for bytes queued in yamux, one per byte, shared by the session's streams
    /// ([`crate::queued`]).
    queued: PollSemaphore,
    _slot: Option<OwnedSemaphorePermit>,
}

/// The largest frame a session writes (`SessionConfig::split_send_size` is at most this).
pub(crate) const MAX_FRAME: usize = 64 * 1024;

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("id", &self.inner.get_ref().id())
            .finish()
    }
}

impl TunnelStream {
    pub(crate) fn new(
        stream: yamux::Stream,
        slot: Option<OwnedSemaphorePermit>,
        session_over: &CancellationToken,
        queued: &Queued,
    ) -> Self {
        TunnelStream {
            inner: stream.compat(),
            session_over: Box::pin(woken_only(session_over.clone().cancelled_owned())),
            queued: PollSemaphore::new(queued.semaphore()),
            _slot: slot,
        }
    }

    /// With yamux pending: an error if the session is over, else `Pending` (and the task is
    /// woken when it ends).
    fn pending_unless_over<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match self.session_over.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the tunnel closed",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// From now on, the data this end receives does not count as another stream's beside
    /// a transfer (whose window yamux then holds at 256 KiB on a short path;
    /// vendor/README.md, the seventh change). Done for both ends of the control stream by
    /// [`Self::write_preamble`] and [`Self::read_preamble`]: its keepalives wait behind a
    /// download without harm and would otherwise slow every transfer they meet.
    fn exclude_from_sharing(&mut self) {
        self.inner.get_mut().exclude_from_sharing();
    }

    /// Writes `preamble` at the start of the stream (and leaves a control stream out of
    /// sharing: [`Self::exclude_from_sharing`]).
    pub async fn write_preamble(&mut self, preamble: &Preamble) -> Result<(), TunnelError> {
        if preamble.kind == StreamKind::Control {
            self.exclude_from_sharing();
        }
        let mut buf = BytesMut::with_capacity(64);
        preamble
            .encode(&mut buf)
            .map_err(|e| TunnelError::Protocol(e.to_string()))?;
        self.write_all(&buf)
            .await
            .map_err(|e| TunnelError::io("writing stream preamble", e))
    }

    /// Reads the preamble at the start of the stream, and not a byte more (and leaves a
    /// control stream out of sharing: [`Self::exclude_from_sharing`]).
    pub async fn read_preamble(&mut self) -> Result<Preamble, TunnelError> {
        let mut buf = BytesMut::with_capacity(64);
        let mut want = 4;
        loop {
            let start = buf.len();
            buf.resize(want, 0);
            self.read_exact(&mut buf[start..])
                .await
                .map_err(|e| TunnelError::io("reading stream preamble", e))?;
            let mut view = &buf[..];
            match Preamble::decode(&mut view) {
                Ok(Some(preamble)) => {
                    if preamble.kind == StreamKind::Control {
                        self.exclude_from_sharing();
                    }
                    return Ok(preamble);
                }
                Ok(None) => {
                    // The header says how long the body is; ask for exactly that.
                    let body = u16::from_be_bytes([buf[2], buf[3]]) as usize;
                    want = 4 + body;
                }
                Err(e) => return Err(TunnelError::Protocol(e.to_string())),
            }
        }
    }
}

impl AsyncRead for TunnelStream {
    /// Copies what yamux holds straight into the caller's unfilled buffer (the vendored
    /// yamux's `poll_read_with`). hyper (through `TokioIo`) offers fresh uninitialised
    /// memory on every read, which yamux's `AsyncRead` needs zeroed first: that was 2.5 to
    /// 3.7 % of tower-server's CPU during a download, with reads capped at 256 KiB.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let max = buf.remaining();
        if max == 0 {
            // yamux would wait for data it already holds.
            return Poll::Ready(Ok(()));
        }
        match self
            .inner
            .get_mut()
            .poll_read_with(cx, max, |data| buf.put_slice(data))
        {
            Poll::Ready(n) => Poll::Ready(n.map(drop)),
            Poll::Pending => self.pending_unless_over(cx),
        }
    }
}

impl AsyncWrite for TunnelStream {
    /// One frame of `buf`, as [`TunnelStream::poll_write_frame`] queues it.
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        self.poll_write_frame(cx, buf.len(), |inner, cx| {
            Pin::new(inner).poll_write(cx, buf)
        })
    }

    /// Gathers the slices into one frame (the vendored yamux's `poll_write_vectored`):
    /// hyper then queues a body's chunks behind the head instead of copying them into a
    /// buffer of its own first, which it does for I/O that cannot write vectored. One
    /// copy less per byte of every body the tunnel carries.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        self.poll_write_frame(cx, len, |inner, cx| {
            futures::AsyncWrite::poll_write_vectored(Pin::new(inner.get_mut()), cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending_unless_over(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => self.pending_unless_over(cx),
            ready => ready,
        }
    }
}

impl TunnelStream {
    /// Takes the session's permits for what yamux may queue of `len` bytes (waiting in
    /// line while the session has [`crate::queued::QUEUE_LIMIT`] bytes queued), then
    /// has `write` hand yamux what the stream's send window takes; unused permits go back
    /// at once.
    fn poll_write_frame(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        write: impl FnOnce(&mut Compat<yamux::Stream>, &mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        // yamux takes one frame per write: at most its largest.
        let want = len.min(MAX_FRAME);
        let Poll::Ready(permit) = self.queued.poll_acquire_many(cx, want as u32) else {
            return self.pending_unless_over(cx);
        };
        // The semaphore is never closed; without a permit, go on unbounded.
        if let Some(permit) = permit {
            permit.forget();
        }
        let written = write(&mut self.inner, cx);
        let used = match written {
            Poll::Ready(Ok(n)) => n.min(want),
            _ => 0,
        };
        if used < want {
            self.queued.add_permits(want - used);
        }
        match written {
            Poll::Pending => self.pending_unless_over(cx),
            ready => ready,
        }
    }
}
