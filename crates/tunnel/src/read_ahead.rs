//! Reads a busy tunnel socket in large pieces, beneath TLS.
//!
//! rustls reads its socket into a buffer of at most one record (about 16.7 KB), and
//! starts again at 4 KiB whenever that buffer empties (`DeframerVecBuffer::prepare_read`
//! in rustls 0.23): through a download the server made 35,034 reads a second averaging
//! 12.2 KB, a third of them 4 KiB or less (BENCHMARKS.md). [`ReadAhead`] gives a
//! connection a 64 KiB buffer while its reads keep filling what rustls asks for, and
//! drops it once they come back short again, so that an idle connection (a member with
//! nothing to relay) holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The buffer a busy connection reads into.
const AHEAD: usize = 64 * 1024;
/// Reads filling the caller's buffer in a row before one is taken.
const BUSY_AFTER: u8 = 8;
/// Reads of less than a quarter of the buffer in a row before it is dropped.
const IDLE_AFTER: u8 = 8;
/// The smallest read that counts as filling the caller's buffer: rustls asks for 4 KiB
/// at least.
const FULL_FROM: usize = 4096;

/// A socket read through a buffer while it is busy (see the module's documentation);
/// writes go straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    ahead: Option<Box<[u8]>>,
    /// `ahead[pos..end]` is read and not yet taken.
    pos: usize,
    end: usize,
    /// Full reads in a row without a buffer, or short ones with it.
    streak: u8,
}

impl<T> ReadAhead<T> {
    /// Reads `inner` without a buffer until it shows a backlog.
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            ahead: None,
            pos: 0,
            end: 0,
            streak: 0,
        }
    }

    /// Whether the connection holds a buffer now.
    #[cfg(test)]
    fn is_reading_ahead(&self) -> bool {
        self.ahead.is_some()
    }

    fn count(&mut self, busy: bool) {
        self.streak = if busy {
            self.streak.saturating_add(1)
        } else {
            0
        };
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.end {
            let Some(ahead) = this.ahead.as_mut() else {
                let wanted = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                this.count(wanted >= FULL_FROM && out.filled().len() - before == wanted);
                if this.streak >= BUSY_AFTER {
                    this.ahead = Some(vec![0; AHEAD].into_boxed_slice());
                    this.streak = 0;
                }
                return Poll::Ready(Ok(()));
            };
            let mut into = ReadBuf::new(ahead);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut into))?;
            let got = into.filled().len();
            (this.pos, this.end) = (0, got);
            this.count(got < AHEAD / 4);
        }
        let ahead = this.ahead.as_ref().expect("unread bytes are in the buffer");
        let n = (this.end - this.pos).min(out.remaining());
        out.put_slice(&ahead[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.end && this.streak >= IDLE_AFTER {
            this.ahead = None;
            this.streak = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What rustls asks for once its record buffer has grown: one record at most.
    const RECORD: usize = 16_709;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Reads `len` bytes as rustls does, at most `piece` at a time.
    async fn read_in_pieces<T: AsyncRead + Unpin>(
        reader: &mut ReadAhead<T>,
        len: usize,
        piece: usize,
    ) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut buf = vec![0; piece];
        while got.len() < len {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "early end of stream after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_backlog_is_read_through_a_buffer_and_every_byte_arrives_in_order() {
        let (mut writer, reader) = tokio::io::duplex(8 << 20);
        let sent = pattern(4 << 20);
        writer.write_all(&sent).await.unwrap();
        let mut reader = ReadAhead::new(reader);
        let got = read_in_pieces(&mut reader, sent.len(), RECORD).await;
        assert!(got == sent, "bytes lost or reordered");
        assert!(reader.is_reading_ahead(), "a backlog read without a buffer");
    }

    #[tokio::test]
    async fn the_buffer_goes_when_reads_come_back_short_and_none_is_taken_for_small_ones() {
        let (mut writer, reader) = tokio::io::duplex(8 << 20);
        let mut reader = ReadAhead::new(reader);
        // A backlog, then a trickle: every piece written is read before the next.
        let backlog = pattern(1 << 20);
        writer.write_all(&backlog).await.unwrap();
        assert!(read_in_pieces(&mut reader, backlog.len(), RECORD).await == backlog);
        assert!(reader.is_reading_ahead());
        for i in 0..2 * usize::from(IDLE_AFTER) {
            let piece = pattern(100 + i);
            writer.write_all(&piece).await.unwrap();
            assert!(read_in_pieces(&mut reader, piece.len(), RECORD).await == piece);
        }
        assert!(
            !reader.is_reading_ahead(),
            "an idle connection kept its buffer"
        );
        // Small reads of a backlog never take one: they do not show a busy socket.
        let more = pattern(1 << 20);
        writer.write_all(&more).await.unwrap();
        assert!(read_in_pieces(&mut reader, more.len(), 1024).await == more);
        assert!(!reader.is_reading_ahead());
    }

    #[tokio::test]
    async fn the_end_of_the_stream_and_writes_pass_through() {
        let (mut near, far) = tokio::io::duplex(8 << 20);
        let mut far = ReadAhead::new(far);
        let sent = pattern(1 << 20);
        near.write_all(&sent).await.unwrap();
        near.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0; RECORD];
        loop {
            match far.read(&mut buf).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        assert!(got == sent);
        // The end came through the buffer, not around it.
        assert!(far.is_reading_ahead());
        far.write_all(b"back").await.unwrap();
        let mut back = [0; 4];
        near.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
