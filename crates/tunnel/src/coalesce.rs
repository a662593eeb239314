//! Write coalescing under TLS.
//!
//! yamux writes every frame as two writes (the 12-byte header, then the body) and flushes
//! between frames. Straight onto a TLS stream, each write becomes its own TLS record — a
//! header alone costs a whole record (22 bytes of overhead and an AEAD seal) — and each
//! flush a syscall. [`Coalesce`] gathers writes until the next flush, so a frame (and any
//! frames written before that flush) leaves as one record per 16 KiB and one syscall.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes are gathered up to this size before they are pushed on without a flush.
const CAPACITY: usize = 64 * 1024;

/// Buffers writes until flush (or until [`CAPACITY`] is reached).
pub(crate) struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner stream has taken.
    written: usize,
}

impl<T> Coalesce<T> {
    pub(crate) fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::with_capacity(CAPACITY),
            written: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Hands the whole buffer to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() > CAPACITY && !this.buf.is_empty() {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= CAPACITY {
            // Too big to gather: pass it straight on.
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct Counting {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_until_a_flush_leave_as_one() {
        let mut c = Coalesce::new(Counting::default());
        c.write_all(&[0u8; 12]).await.unwrap();
        c.write_all(&[1u8; 100]).await.unwrap();
        assert!(c.inner.writes.is_empty(), "nothing leaves before the flush");
        c.flush().await.unwrap();
        assert_eq!(c.inner.writes.len(), 1);
        assert_eq!(c.inner.writes[0].len(), 112);
        // Big writes go straight through, after what was gathered.
        c.write_all(&[2u8; 5]).await.unwrap();
        c.write_all(&vec![3u8; CAPACITY]).await.unwrap();
        c.shutdown().await.unwrap();
        let sizes: Vec<usize> = c.inner.writes.iter().map(Vec::len).collect();
        assert_eq!(sizes, [112, 5, CAPACITY]);
    }

    #[tokio::test]
    async fn bytes_arrive_intact_through_a_pipe() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut c = Coalesce::new(a);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in data.chunks(777) {
                c.write_all(chunk).await.unwrap();
                c.flush().await.unwrap();
            }
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
    }
}
