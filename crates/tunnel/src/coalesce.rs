//! Write coalescing under TLS.
//!
//! yamux writes every frame as two writes (the 12-byte header, then the body) and flushes
//! after every frame. Straight onto a TLS stream, each write becomes its own TLS record (a
//! header alone costs a whole record: 22 bytes of overhead and an AEAD seal) and each
//! flush a syscall. [`Coalesce`] gathers writes, and its flushes only mark the buffer as
//! due: the session's driver pushes it out with [`Flusher::poll_flush`], which waits for
//! the end of the worker thread's turn (below). So every frame written before then leaves
//! as one record per 16 KiB and one syscall.
//!
//! The turn, not the driver's poll: a stream's write wakes the driver, and tokio runs a
//! task woken that way next, on the same worker (its LIFO slot). So with 64 requests in
//! flight, the driver used to be polled once per response, right after the stream task
//! that wrote it, and flushed each alone: 0.9 tunnel writes per request on each side (one
//! worker each, wrk at c=64; `perf stat`). The flush now waits until the worker has run
//! every task ready and looked for I/O ([`tokio::task::yield_now`]'s deferral, which
//! wakes no other worker), so the other streams' frames go with it: 0.1 writes per
//! request. With nothing else ready (one request at a time) the wait cost the driver one
//! more poll and the worker a look for I/O (+10 % instructions per request on both
//! sides, `benches/reference/counts.sh`); with two or more workers also a wake-up of a
//! sleeping one (tokio wakes another worker when a searching one finds work: 2.9 and 3.2
//! `futex` calls per request). So the flush waits only while a second exchange is in
//! flight on the session ([`crate::exchanges`]), or while what is due fills a TLS record
//! (a download, whose next chunks come in the same turn); a small write of a lone
//! exchange goes at once, as nothing else is coming.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::exchanges::Exchanges;

/// Writes are gathered up to this size before they are pushed on without a flush: a
/// 64 KiB frame (yamux's largest here) and its header fit.
const CAPACITY: usize = 80 * 1024;
/// Due bytes from which a flush waits for the end of the turn even with one exchange in
/// flight: a TLS record's worth, which a small response does not fill and a download's
/// every chunk does (the agent reads its upstream a record at a time). A download alone
/// writes its next chunks in the same turn: sent frame by frame, it cost the agent 126
/// system calls per MiB against 96 (counts.sh).
const STREAMING: usize = 16 * 1024;
/// The buffer a session starts with: what an idle tunnel writes (pings, a window
/// update) fits. It grows as writes need, up to [`CAPACITY`], and keeps what it grew to:
/// a busy tunnel reallocates a few times in its life, and the 10,000 idle tunnels of a
/// large fleet do not each hold 80 KiB of address space and the pages they touched
/// (B9).
const INITIAL: usize = 512;

/// Buffers writes until the driver flushes (or until [`CAPACITY`] is reached).
pub(crate) struct Coalesce<T> {
    state: Arc<Mutex<State<T>>>,
}

/// The driver's hand on the same buffer: flushes what yamux asked to flush.
pub(crate) struct Flusher<T> {
    state: Arc<Mutex<State<T>>>,
    /// Whether another stream may write in the same turn.
    exchanges: Exchanges,
}

struct State<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner stream has taken.
    written: usize,
    /// yamux flushed since the buffer last went out.
    due: bool,
    /// The end of the worker's turn the due flush waits for, once it waits.
    turn_end: Option<Arc<TurnEnd>>,
}

/// Wakes the driver when the worker's turn is over, and records that it has.
struct TurnEnd {
    over: AtomicBool,
    driver: Waker,
}

impl Wake for TurnEnd {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.over.store(true, Ordering::Release);
        self.driver.wake_by_ref();
    }
}

/// A coalescing writer over `inner`, and the flusher its driver calls, which waits for
/// the end of the worker's turn while `exchanges` has several in flight or a download's
/// bytes are due.
pub(crate) fn coalesce<T>(inner: T, exchanges: Exchanges) -> (Coalesce<T>, Flusher<T>) {
    let state = Arc::new(Mutex::new(State {
        inner,
        buf: Vec::with_capacity(INITIAL),
        written: 0,
        due: false,
        turn_end: None,
    }));
    (
        Coalesce {
            state: state.clone(),
        },
        Flusher { state, exchanges },
    )
}

/// Only the driver task touches the state (yamux's socket and the flusher are both
/// polled by it), so the lock is never contended; a poisoned one is still consistent
/// (a buffer and an offset), so it is used as is.
fn lock<T>(state: &Mutex<State<T>>) -> MutexGuard<'_, State<T>> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: AsyncWrite + Unpin> State<T> {
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

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.due = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> Flusher<T> {
    /// Pushes out what yamux flushed since the last time: once the worker's turn is over
    /// while several exchanges are in flight or [`STREAMING`] bytes are due, else now (see
    /// the module's documentation); ready at once if nothing is due.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = lock(&self.state);
        if !state.due {
            return Poll::Ready(Ok(()));
        }
        if self.exchanges.several() || state.buf.len() - state.written >= STREAMING {
            match &state.turn_end {
                None => {
                    let turn_end = Arc::new(TurnEnd {
                        over: AtomicBool::new(false),
                        driver: cx.waker().clone(),
                    });
                    // Its first poll hands the waker to the worker, to be woken when the
                    // worker runs out of ready tasks (at once outside a runtime), and is
                    // Pending; the future itself is not needed after that.
                    let waker = Waker::from(turn_end.clone());
                    let _ = std::pin::pin!(tokio::task::yield_now())
                        .as_mut()
                        .poll(&mut Context::from_waker(&waker));
                    state.turn_end = Some(turn_end);
                    return Poll::Pending;
                }
                Some(turn_end) if !turn_end.over.load(Ordering::Acquire) => {
                    return Poll::Pending;
                }
                Some(_) => {}
            }
        }
        // The turn is over, or nothing else is coming: a wait begun earlier is moot (its
        // waker may still fire, and finds nothing due).
        state.turn_end = None;
        state.poll_flush(cx)
    }
}

impl<T: AsyncRead + Unpin> Flusher<T> {
    /// Reads and drops what the peer sends, once a close went out: how many bytes, 0 when
    /// the peer has closed its side. A socket closed while bytes still arrive is reset
    /// (RFC 1122, 4.2.2.13, "new data is received after CLOSE is called"), and the reset
    /// throws away what the kernel had not sent yet: the tail of a download the peer is
    /// still reading, and answering with window updates. The peer closes on the GoAway.
    pub(crate) fn poll_discard(&self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut scratch = [0u8; 2048];
        let mut buf = ReadBuf::new(&mut scratch);
        ready!(Pin::new(&mut lock(&self.state).inner).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.state).inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = lock(&self.state);
        if state.buf.len() + data.len() > CAPACITY && !state.buf.is_empty() {
            ready!(state.poll_drain(cx))?;
        }
        if data.len() >= CAPACITY {
            // Too big to gather: pass it straight on.
            return Pin::new(&mut state.inner).poll_write(cx, data);
        }
        let needed = state.buf.len() + data.len();
        if needed > state.buf.capacity() {
            // Doubling, but never past CAPACITY (Vec's own growth could double 80 KiB).
            let grown = needed.next_power_of_two().min(CAPACITY);
            let len = state.buf.len();
            state.buf.reserve_exact(grown - len);
        }
        state.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    /// Marks the buffer due; the driver's [`Flusher`] sends it at the end of its turn.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.state).due = true;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = lock(&self.state);
        ready!(state.poll_drain(cx))?;
        Pin::new(&mut state.inner).poll_shutdown(cx)
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

    /// What reached the inner stream, write by write.
    fn writes(c: &Coalesce<Counting>) -> Vec<usize> {
        lock(&c.state).inner.writes.iter().map(Vec::len).collect()
    }

    async fn driver_flush<T: AsyncWrite + Unpin>(f: &Flusher<T>) {
        std::future::poll_fn(|cx| f.poll_flush(cx)).await.unwrap();
    }

    #[tokio::test]
    async fn frames_flushed_in_one_turn_leave_as_one_write() {
        let (mut c, flusher) = coalesce(Counting::default(), Exchanges::default());
        // Two frames, each header then body and a flush, as yamux writes them.
        for body in [100, 40] {
            c.write_all(&[0u8; 12]).await.unwrap();
            c.write_all(&vec![1u8; body]).await.unwrap();
            c.flush().await.unwrap();
        }
        assert!(
            writes(&c).is_empty(),
            "nothing leaves before the driver's flush"
        );
        driver_flush(&flusher).await;
        assert_eq!(writes(&c), [164]);
        // Nothing due: the driver's flush writes nothing.
        driver_flush(&flusher).await;
        assert_eq!(writes(&c), [164]);
        // Written but not flushed by yamux: not due either.
        c.write_all(&[2u8; 5]).await.unwrap();
        driver_flush(&flusher).await;
        assert_eq!(writes(&c), [164]);
        // A largest frame and its header fit; bigger writes go straight through, after
        // what was gathered; shutdown sends what is left.
        c.write_all(&[0u8; 12]).await.unwrap();
        c.write_all(&vec![3u8; 64 * 1024]).await.unwrap();
        c.write_all(&vec![4u8; CAPACITY]).await.unwrap();
        c.write_all(&[5u8; 7]).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(writes(&c), [164, 5 + 12 + 64 * 1024, CAPACITY, 7]);
    }

    /// One frame, header and body, as yamux writes and flushes it.
    async fn frame(c: &mut Coalesce<Counting>, body: usize) {
        c.write_all(&[0u8; 12]).await.unwrap();
        c.write_all(&vec![1u8; body]).await.unwrap();
        c.flush().await.unwrap();
    }

    #[tokio::test]
    async fn a_flush_waits_for_the_turn_only_for_several_exchanges_or_a_download() {
        let exchanges = Exchanges::default();
        let (mut c, flusher) = coalesce(Counting::default(), exchanges.clone());
        let poll = |f: &Flusher<Counting>| {
            f.poll_flush(&mut Context::from_waker(Waker::noop()))
                .map(Result::unwrap)
        };
        // None in flight (pings, window updates) or one (a request alone): at once.
        frame(&mut c, 10).await;
        assert!(poll(&flusher).is_ready());
        assert_eq!(writes(&c), [22]);
        let first = exchanges.begin();
        frame(&mut c, 20).await;
        assert!(poll(&flusher).is_ready());
        assert_eq!(writes(&c), [22, 32]);
        // Two: the flush waits for the end of the worker's turn, and what other streams
        // write before then goes with it.
        let second = exchanges.begin();
        frame(&mut c, 30).await;
        assert!(poll(&flusher).is_pending());
        frame(&mut c, 40).await;
        assert!(poll(&flusher).is_pending());
        assert_eq!(writes(&c), [22, 32]);
        tokio::task::yield_now().await;
        assert!(poll(&flusher).is_ready());
        assert_eq!(writes(&c), [22, 32, 42 + 52]);
        // A wait begun while two were in flight ends when one of them does.
        frame(&mut c, 50).await;
        assert!(poll(&flusher).is_pending());
        drop(second);
        assert!(poll(&flusher).is_ready());
        assert_eq!(writes(&c), [22, 32, 94, 62]);
        // One in flight, but a download's chunk: it waits, and the next goes with it.
        frame(&mut c, STREAMING).await;
        assert!(poll(&flusher).is_pending());
        frame(&mut c, 60).await;
        tokio::task::yield_now().await;
        assert!(poll(&flusher).is_ready());
        assert_eq!(writes(&c), [22, 32, 94, 62, 12 + STREAMING + 72]);
        drop(first);
    }

    #[tokio::test]
    async fn bytes_arrive_intact_through_a_pipe() {
        let (a, mut b) = tokio::io::duplex(1024);
        // Several exchanges in flight: every flush waits for the end of the turn.
        let exchanges = Exchanges::default();
        let _in_flight = [exchanges.begin(), exchanges.begin()];
        let (mut c, flusher) = coalesce(a, exchanges.clone());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            for (i, chunk) in data.chunks(777).enumerate() {
                c.write_all(chunk).await.unwrap();
                c.flush().await.unwrap();
                if i % 3 == 0 {
                    driver_flush(&flusher).await;
                }
            }
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
    }
}
