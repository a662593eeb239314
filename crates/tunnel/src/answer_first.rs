//! An upstream HTTP/1.1 connection that keeps reading after its peer stopped taking
//! writes, so that an answer sent before a request body was all read reaches the caller.
//!
//! A server may answer before it has read a request's body and close the connection: a
//! kube-apiserver refuses a body past its 3 MiB with 413 (`limitedReadBody`, k8s.io/apiserver
//! `handlers/rest.go`) and closes with the rest unread, as nginx does with
//! `client_max_body_size` (RFC 9110 15.5.14: "the server MAY terminate the request"). The
//! close reaches the client as a reset, and its next write fails with EPIPE or ECONNRESET;
//! hyper's client gives up on the connection at that error, though the answer may already
//! wait in the socket. A caller of Tower then got 502 ("could not reach its kubernetes
//! upstream: … Broken pipe") for the member's 413 (tests/tests/limits.rs). The same holds
//! over the tunnel: tower-agent refusing `--as` answers before it reads the body and drops
//! the stream, which yamux resets, and tower-server's next write on it fails with
//! `WriteZero`. RFC 9112 9.5 asks a client sending a body to watch for such an answer and
//! stop sending.
//!
//! [`AnswerFirst`] takes every write after such an error and drops it, so hyper goes on to
//! read: the answer if the peer sent one, else the read fails as the connection did (a
//! reset, or an end before a complete answer), and the caller gets that error instead. No
//! other error is hidden, and nothing a peer never answered is taken for an answer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// See the module's documentation.
#[derive(Debug)]
pub(crate) struct AnswerFirst<T> {
    io: T,
    /// The peer stopped taking writes: every write since is dropped.
    closed: bool,
}

impl<T> AnswerFirst<T> {
    pub(crate) fn new(io: T) -> Self {
        AnswerFirst { io, closed: false }
    }

    /// Whether `result` says the peer closed the connection; if so, from now on writes are
    /// dropped and `result` becomes `taken`.
    fn on_write<R>(&mut self, result: Poll<io::Result<R>>, taken: R) -> Poll<io::Result<R>> {
        match result {
            Poll::Ready(Err(e)) if peer_closed(&e) => {
                tracing::debug!(
                    error = %e,
                    "the upstream stopped taking the request; reading its answer, if any"
                );
                self.closed = true;
                Poll::Ready(Ok(taken))
            }
            other => other,
        }
    }
}

/// A write error that means the peer closed the connection: a TCP reset, or a write
/// after it; over the tunnel, yamux's `WriteZero` ("connection is closed") for a stream
/// the agent reset after answering (tower-agent refusing `--as` before reading the body).
fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::WriteZero
    )
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for AnswerFirst<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for AnswerFirst<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Ok(buf.len()));
        }
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.on_write(result, buf.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let all = bufs.iter().map(|b| b.len()).sum();
        if self.closed {
            return Poll::Ready(Ok(all));
        }
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.on_write(result, all)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.on_write(result, ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
