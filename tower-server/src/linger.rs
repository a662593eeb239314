//! A lingering close for the frontend's HTTP/1.1 connections.
//!
//! tower-server answers some requests before it reads their bodies: no or a bad token
//! (401), an unknown cluster (404), a cluster without its agent or past a limit (503,
//! 429). hyper then closes the connection with the rest of the body unread, and a TCP
//! socket closed with unread data sends a reset, not a FIN: a client still sending its
//! body meets the reset on its next write and, like hyper's client, often never reads the
//! answer waiting in its socket. A caller uploading a large object with a stale token saw
//! "error writing a body to connection" instead of Tower's 401 (tests/tests/bad_input.rs).
//!
//! [`Lingering`] closes as nginx (`lingering_close`) and Go's net/http
//! (`conn.closeWriteAndWait`) do: it shuts its side down (TLS close_notify, then a FIN),
//! then reads and drops what the client still sends, until the client closes or
//! [`LINGER`] has passed, so the close that follows finds nothing unread, or comes after
//! the client had the time to read the answer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a closing connection reads and drops what its client still sends (Go's
/// `rstAvoidanceDelay` is 500 ms).
pub(crate) const LINGER: Duration = Duration::from_millis(500);

/// See the module's documentation.
pub(crate) struct Lingering<T> {
    io: T,
    /// Set once this side is shut down: until when it reads and drops. Boxed: only
    /// closing connections pay for a timer.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Lingering<T> {
    pub(crate) fn new(io: T) -> Self {
        Lingering { io, linger: None }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let Some(linger) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        // A few reads a turn: a client that keeps sending must not hold the worker.
        for _ in 0..16 {
            if linger.is_elapsed() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // More of what the client sends: dropped.
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                // The client closed too, or the connection is gone: nothing left unread.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return linger.as_mut().poll(cx).map(Ok),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// A client that sends a body nobody read, then closes its side: it reads the server's
    /// close as an end, not a reset (which a plain close with data unread would send).
    #[tokio::test]
    async fn unread_data_is_dropped_so_the_close_is_clean() {
        let (mut client, server) = pair().await;
        let sending = tokio::spawn(async move {
            client.write_all(&vec![7u8; 4 << 20]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await
        });
        let mut server = Lingering::new(server);
        server.shutdown().await.unwrap();
        drop(server);
        let read = sending.await.unwrap();
        assert_eq!(read.unwrap(), 0, "an end, no reset");
    }

    /// A client that never stops sending holds the close for [`LINGER`], no longer.
    #[tokio::test]
    async fn a_client_that_keeps_sending_is_closed_after_the_linger() {
        let (mut client, server) = pair().await;
        let sending = tokio::spawn(async move {
            let chunk = vec![7u8; 64 << 10];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let started = Instant::now();
        let mut server = Lingering::new(server);
        tokio::time::timeout(Duration::from_secs(10), server.shutdown())
            .await
            .expect("the linger ends")
            .unwrap();
        assert!(started.elapsed() >= LINGER);
        drop(server);
        tokio::time::timeout(Duration::from_secs(10), sending)
            .await
            .expect("the client's writes end")
            .unwrap();
    }
}
