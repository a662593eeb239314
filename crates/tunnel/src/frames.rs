//! What yamux writes, frame by frame: [`WatchFrames`] reads the frames on their way to
//! the socket for two things yamux does not tell its user.
//!
//! * That it gave up on its peer. When the peer breaks a yamux rule (data beyond its
//!   window, a window update that overflows, a stream id of the wrong parity), yamux 0.14
//!   answers with a GoAway carrying an error code but keeps the connection open. Tower must
//!   end such a tunnel: a GoAway with a non-zero (error) code fires a token.
//! * How much stream data left its queues: DATA bodies give their permits back to the
//!   session's [`Queued`] (see [`crate::queued`]).
//!
//! A yamux frame is a 12-byte header — version u8, type u8, flags u16, stream id u32,
//! length u32, big-endian — and, for data frames (type 0) only, `length` bytes of body.
//! For a GoAway (type 3) `length` is the error code.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::queued::Queued;

const HEADER_LEN: usize = 12;
const TYPE_DATA: u8 = 0;
const TYPE_GO_AWAY: u8 = 3;

/// Parses the outgoing yamux byte stream one frame header at a time.
#[derive(Debug, Default)]
struct FrameScanner {
    header: [u8; HEADER_LEN],
    have: usize,
    /// Body bytes of the current data frame still to skip.
    skip: u64,
}

/// What some written bytes held.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scanned {
    /// The error code of a GoAway among them.
    go_away: Option<u32>,
    /// How many of them were data frame bodies.
    data: usize,
}

impl FrameScanner {
    /// Feeds written bytes, which follow the ones fed before.
    fn feed(&mut self, mut bytes: &[u8]) -> Scanned {
        let mut scanned = Scanned::default();
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.skip -= n as u64;
                scanned.data += n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < HEADER_LEN {
                break;
            }
            self.have = 0;
            let kind = self.header[1];
            let length = u32::from_be_bytes([
                self.header[8],
                self.header[9],
                self.header[10],
                self.header[11],
            ]);
            match kind {
                TYPE_DATA => self.skip = u64::from(length),
                TYPE_GO_AWAY => scanned.go_away = Some(length),
                _ => {}
            }
        }
        scanned
    }
}

/// An I/O object whose writes are scanned for an error GoAway and for stream data sent.
pub(crate) struct WatchFrames<T> {
    inner: T,
    scanner: FrameScanner,
    fired: CancellationToken,
    queued: Queued,
}

impl<T> WatchFrames<T> {
    /// Wraps `inner`; `fired` is cancelled when an error GoAway is written, and `queued`
    /// gets back the permits of the stream data written.
    pub(crate) fn new(inner: T, fired: CancellationToken, queued: Queued) -> Self {
        WatchFrames {
            inner,
            scanner: FrameScanner::default(),
            fired,
            queued,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchFrames<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchFrames<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            let scanned = this.scanner.feed(&buf[..*n]);
            this.queued.sent(scanned.data);
            if scanned.go_away.is_some_and(|code| code != 0) {
                this.fired.cancel();
            }
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, length: u32, body: usize) -> Vec<u8> {
        let mut f = vec![0, kind, 0, 0, 0, 0, 0, 1];
        f.extend_from_slice(&length.to_be_bytes());
        f.extend(std::iter::repeat_n(3u8, body));
        f
    }

    #[test]
    fn finds_a_go_away_behind_data_whatever_the_chunking() {
        let mut stream = frame(TYPE_DATA, 20, 20);
        // A data body that looks like a GoAway header must be skipped.
        let mut fake = frame(TYPE_GO_AWAY, 1, 0);
        let mut data = frame(TYPE_DATA, fake.len() as u32, 0);
        data.append(&mut fake);
        stream.extend(data);
        stream.extend(frame(2, 7, 0)); // ping
        stream.extend(frame(TYPE_GO_AWAY, 1, 0));
        for chunk in [1, 3, 5, 12, 13, stream.len()] {
            let mut scanner = FrameScanner::default();
            let found: Vec<u32> = stream
                .chunks(chunk)
                .filter_map(|c| scanner.feed(c).go_away)
                .collect();
            assert_eq!(found, [1], "chunks of {chunk}");
        }
    }

    #[test]
    fn a_normal_go_away_is_reported_with_code_zero() {
        let mut scanner = FrameScanner::default();
        assert_eq!(scanner.feed(&frame(TYPE_GO_AWAY, 0, 0)).go_away, Some(0));
    }

    #[test]
    fn only_data_bodies_count_as_data_however_the_writes_split_them() {
        let mut stream = frame(TYPE_DATA, 5, 5);
        stream.extend(frame(1, 262_144, 0)); // a window update: its length is credit
        stream.extend(frame(TYPE_DATA, 0, 0)); // an acknowledgement
        stream.extend(frame(2, 7, 0)); // a ping
        stream.extend(frame(TYPE_DATA, 3, 3));
        for chunk in 1..stream.len() {
            let mut scanner = FrameScanner::default();
            let data: usize = stream.chunks(chunk).map(|c| scanner.feed(c).data).sum();
            assert_eq!(data, 8, "written {chunk} bytes at a time");
            assert_eq!((scanner.have, scanner.skip), (0, 0));
        }
    }
}
