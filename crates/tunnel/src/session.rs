//! One yamux connection, driven by one task.
//!
//! yamux only makes progress while its connection is polled, so [`start`] moves the
//! connection into a [`Driver`] future that the caller spawns; everything else talks to
//! it through a cloneable [`SessionHandle`] (open a stream, close, wait for the end).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use crate::coalesce::{Coalesce, Flusher, coalesce};
use crate::exchanges::Exchanges;
use crate::frames::WatchFrames;
use crate::queued::Queued;
use crate::woken::woken_only;
use tokio_util::sync::CancellationToken;

use crate::{TunnelError, TunnelStream};

/// Which end of the tunnel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// tower-server: opens streams, accepts none.
    Server,
    /// tower-agent: accepts streams, opens none.
    Agent,
}

/// [`SessionConfig::max_streams`] by default (the agent always uses it).
const DEFAULT_MAX_STREAMS: usize = 16_384;

/// Most requests an agent takes at once on one tunnel, as streams of their own or on a
/// shared HTTP/2 stream: what its yamux session (twice its limit, see [`start`]) and its
/// HTTP/2 streams accept. A server may not set its own limit higher, or requests past
/// this would fail the session (yamux) or wait for a free place (HTTP/2).
pub const AGENT_MAX_REQUESTS: usize = 2 * DEFAULT_MAX_STREAMS;

/// How long opening a stream may wait. yamux opens no stream while 256 it opened are
/// unacknowledged by the peer, which this crate's agents acknowledge as they accept them
/// (see [`acknowledge`]), so a wait is one round trip; an agent that acknowledges a
/// stream only when its upstream answers can make it last as long as its slowest
/// requests: past this the request fails (503) instead of waiting with them.
pub const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How far the receive windows of a session's streams may grow past yamux's 256 KiB,
/// all together.
const WINDOW_GROWTH: usize = 32 * 1024 * 1024;

/// Session limits.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Most streams open at once on one tunnel.
    pub max_streams: usize,
    /// Largest yamux data frame (at most 64 KiB).
    pub split_send_size: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_streams: DEFAULT_MAX_STREAMS,
            split_send_size: 64 * 1024,
        }
    }
}

enum Command {
    Open(oneshot::Sender<Result<yamux::Stream, TunnelError>>),
}

/// A cloneable handle on a running session.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
    slots: Arc<Semaphore>,
    max_streams: usize,
    close: CancellationToken,
    closed: CancellationToken,
    /// Cancelled when the session starts closing or ends: every stream's reads and writes
    /// fail from then on (see [`TunnelStream`]).
    streams_end: CancellationToken,
    /// What the streams have queued in yamux.
    queued: Queued,
    /// The exchanges in flight, which the flush goes by.
    exchanges: Exchanges,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Open")
    }
}

impl SessionHandle {
    /// Opens a stream toward the peer. Fails at once when the tunnel is closed or carries
    /// its maximum of streams (never waits for a slot, so callers can answer 503).
    pub async fn open_stream(&self) -> Result<TunnelStream, TunnelError> {
        let slot = self.reserve()?;
        self.open(Some(slot)).await
    }

    /// Opens a stream that takes no slot of its own because every request it carries
    /// takes one ([`SessionHandle::reserve`]): one HTTP/2 connection per target.
    pub async fn open_shared_stream(&self) -> Result<TunnelStream, TunnelError> {
        self.open(None).await
    }

    async fn open(&self, slot: Option<OwnedSemaphorePermit>) -> Result<TunnelStream, TunnelError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Open(tx))
            .map_err(|_| TunnelError::Closed("session driver has stopped".into()))?;
        let stream = tokio::time::timeout(OPEN_TIMEOUT, rx)
            .await
            .map_err(|_| TunnelError::Unacknowledged(OPEN_TIMEOUT))?
            .map_err(|_| TunnelError::Closed("session driver has stopped".into()))??;
        Ok(TunnelStream::new(
            stream,
            slot,
            &self.streams_end,
            &self.queued,
        ))
    }

    /// Takes one of the session's stream slots without opening a yamux stream, for a
    /// request multiplexed inside a stream already open (HTTP/2): it counts against
    /// the same limit as a stream of its own. Fails at once when all are taken.
    pub fn reserve(&self) -> Result<OwnedSemaphorePermit, TunnelError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| TunnelError::StreamLimit(self.max_streams))
    }

    /// The requests and responses in flight on this session, each counted from before
    /// the request's first write to the end of its response body ([`Exchanges::begin`],
    /// or a stream's [`crate::requests::OpenRequests::counting`]): while several are,
    /// the session's flushes wait for the end of the worker's turn and gather the frames
    /// of the streams that write in it ([`crate::exchanges`]).
    pub fn exchanges(&self) -> &Exchanges {
        &self.exchanges
    }

    /// Streams open now (through this handle's slots), multiplexed requests included.
    pub fn open_streams(&self) -> usize {
        self.max_streams - self.slots.available_permits()
    }

    /// Asks the driver to close the connection (a yamux GoAway, then the socket).
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }
}

/// Streams the peer opened (only the agent receives any).
pub struct Inbound(Option<mpsc::Receiver<TunnelStream>>);

impl Inbound {
    /// The next stream the peer opened; `None` once the session ended, and at once on
    /// the server, which holds no channel for them: a channel's first block of slots
    /// (5 KiB of `TunnelStream`s) was the largest thing an idle tunnel cost the server.
    pub async fn recv(&mut self) -> Option<TunnelStream> {
        match &mut self.0 {
            Some(streams) => streams.recv().await,
            None => None,
        }
    }
}

/// Starts a session on an established connection.
///
/// Returns the handle, the peer-opened streams (always empty for [`Role::Server`]: the
/// agent never opens streams toward the host, and such streams are reset), and the
/// driver to spawn.
pub fn start<T>(io: T, role: Role, config: &SessionConfig) -> (SessionHandle, Inbound, Driver<T>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut yamux_config = yamux::Config::default();
    // yamux asserts that the connection's window holds every stream's first 256 KiB
    // whenever either is set: lift it before raising the stream count.
    yamux_config.set_max_connection_receive_window(None);
    // Twice the limit: yamux fails the whole connection when asked for one stream too
    // many, and it forgets dropped streams only when the driver next runs. Plus room
    // for the shared streams, which take no slot (one per target; agents have ≤ 16).
    let max_num_streams = config.max_streams * 2 + 64;
    yamux_config.set_max_num_streams(max_num_streams);
    // Every stream's first 256 KiB is a promise, not an allocation; what the windows of
    // fast streams grow past it (yamux widens them toward twice the bandwidth-delay
    // product) is bounded for the whole tunnel, since what a window let in waits in
    // memory once its reader stops reading.
    yamux_config.set_max_connection_receive_window(Some(
        max_num_streams * yamux::DEFAULT_CREDIT as usize + WINDOW_GROWTH,
    ));
    yamux_config.set_split_send_size(config.split_send_size.min(crate::stream::MAX_FRAME));
    // A stream's window starts at 256 KiB and doubles at most once a round trip: over a
    // 1 Gbit/s x 100 ms WAN a download spent ~0.6 s of 2.2 s ramping (B8). This grows it
    // four times a round trip, at once to what the tunnel's earlier downloads needed, and
    // from the first update of a download on a pooled stream (vendor/README.md). Only
    // the receiving side's setting matters: the server's for responses, the agent's for
    // uploads.
    yamux_config.set_fast_window_ramp(true);
    let mode = match role {
        Role::Server => yamux::Mode::Client,
        Role::Agent => yamux::Mode::Server,
    };
    let violated = CancellationToken::new();
    let queued = Queued::default();
    let exchanges = Exchanges::default();
    let (io, flusher) = coalesce(io, exchanges.clone());
    let io = WatchFrames::new(io, violated.clone(), queued.clone());
    let connection = yamux::Connection::new(io.compat(), yamux_config, mode);
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (inbound_tx, inbound) = match role {
        Role::Agent => {
            let (tx, rx) = mpsc::channel(1024);
            (Some(tx), Inbound(Some(rx)))
        }
        Role::Server => (None, Inbound(None)),
    };
    let handle = SessionHandle {
        commands,
        slots: Arc::new(Semaphore::new(config.max_streams)),
        max_streams: config.max_streams,
        close: CancellationToken::new(),
        closed: CancellationToken::new(),
        streams_end: CancellationToken::new(),
        queued,
        exchanges,
    };
    let driver = Driver {
        connection,
        flusher,
        commands: command_rx,
        inbound: inbound_tx,
        close: handle.close.clone(),
        closed: handle.closed.clone(),
        streams_end: handle.streams_end.clone(),
        queued: handle.queued.clone(),
        violated,
    };
    (handle, inbound, driver)
}

/// Owns the yamux connection; run it with [`Driver::run`] on its own task.
pub struct Driver<T> {
    connection: yamux::Connection<Compat<WatchFrames<Coalesce<T>>>>,
    /// Sends what yamux wrote in a turn, once the turn is over.
    flusher: Flusher<T>,
    commands: mpsc::UnboundedReceiver<Command>,
    inbound: Option<mpsc::Sender<TunnelStream>>,
    close: CancellationToken,
    closed: CancellationToken,
    streams_end: CancellationToken,
    queued: Queued,
    /// yamux sent the peer an error GoAway: it broke the protocol.
    violated: CancellationToken,
}

enum Event {
    Inbound(yamux::Stream),
    Close,
    Violated,
    Ended(Result<(), yamux::ConnectionError>),
}

impl<T> Driver<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Drives the connection until it ends; returns why it ended.
    ///
    /// Returns an `async` block rather than being an `async fn`, which would hold the
    /// driver (~0.5 KiB) twice in every tunnel's task, as captured and as the local it is
    /// moved into (BENCHMARKS.md, "Smaller request futures").
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold the driver twice in the future"
    )]
    pub fn run(mut self) -> impl Future<Output = Result<(), TunnelError>> {
        async move {
            // Marks the session closed however this ends, aborted tasks included; the
            // streams end first (guards drop in reverse order).
            let _closed = self.closed.clone().drop_guard();
            let _streams_end = self.streams_end.clone().drop_guard();
            self.drive().await
        }
    }

    async fn drive(&mut self) -> Result<(), TunnelError> {
        let mut pending: VecDeque<oneshot::Sender<Result<yamux::Stream, TunnelError>>> =
            VecDeque::new();
        let close = self.close.clone();
        // Polled every turn, fired once at most: polled through only when they fire.
        let mut close_requested = std::pin::pin!(woken_only(close.cancelled()));
        let violated = self.violated.clone();
        let mut violation = std::pin::pin!(woken_only(violated.cancelled()));
        let mut warned_inbound = false;
        loop {
            let event = poll_fn(|cx| {
                let event = self.turn(
                    cx,
                    &mut pending,
                    close_requested.as_mut(),
                    violation.as_mut(),
                );
                // What yamux wrote leaves together, once the worker has run the other
                // tasks ready now (their frames go too; crate::coalesce).
                match self.flusher.poll_flush(cx) {
                    Poll::Ready(Err(e)) => Poll::Ready(Event::Ended(Err(e.into()))),
                    Poll::Ready(Ok(())) | Poll::Pending => event,
                }
            })
            .await;
            match event {
                Event::Inbound(stream) => match &self.inbound {
                    Some(tx) => {
                        let stream =
                            TunnelStream::new(stream, None, &self.streams_end, &self.queued);
                        if let Err(e) = tx.try_send(stream) {
                            tracing::warn!(error = %e, "dropping a stream the peer opened: nobody takes it");
                        }
                    }
                    None => {
                        // Once per tunnel at warn: a flood must not flood the log too.
                        if !warned_inbound {
                            warned_inbound = true;
                            tracing::warn!(
                                "the agent opened a stream; agents may not: resetting it (and any more, logged at debug)"
                            );
                        } else {
                            tracing::debug!("resetting another stream the agent opened");
                        }
                        drop(stream);
                    }
                },
                Event::Close => {
                    // yamux's graceful close neither ends nor wakes the streams still
                    // open: a request in flight would wait for its idle timeout (hours).
                    // They fail now; what they wrote before still leaves with the close.
                    self.streams_end.cancel();
                    for reply in pending.drain(..) {
                        let _ = reply.send(Err(TunnelError::Closed("session closing".into())));
                    }
                    // A close flushes what is queued, then the GoAway and the TLS
                    // close_notify. On a dead link (the reason for most closes: a missed
                    // pong) that waits on TCP's retransmission timeout, ~15 minutes, while
                    // `closed()` keeps the agent from redialing: bound it here.
                    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
                    let connection = &mut self.connection;
                    let close = poll_fn(|cx| connection.poll_close(cx));
                    match tokio::time::timeout_at(deadline, close).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(TunnelError::Closed(e.to_string())),
                        Err(_) => {
                            return Err(TunnelError::Closed(format!(
                                "the close did not get through within {CLOSE_TIMEOUT:?}: connection dropped"
                            )));
                        }
                    }
                    // The socket stays open, read, until the peer closes too: dropped
                    // now, it would be reset by the peer's next bytes, and the reset
                    // would lose what it has not read yet (`Flusher::poll_discard`). A
                    // peer that stays silent for LINGER_QUIET is not reading anything
                    // (a dead link, a hung server): no need to wait for it.
                    let flusher = &self.flusher;
                    let linger = async {
                        loop {
                            let read = poll_fn(|cx| flusher.poll_discard(cx));
                            match tokio::time::timeout(LINGER_QUIET, read).await {
                                Ok(Ok(0)) => return,
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "after the close");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(
                                        "the peer sent nothing for {LINGER_QUIET:?} after the close"
                                    );
                                    return;
                                }
                            }
                        }
                    };
                    if tokio::time::timeout_at(deadline, linger).await.is_err() {
                        tracing::debug!("the peer did not close within {CLOSE_TIMEOUT:?} of ours");
                    }
                    return Ok(());
                }
                Event::Violated => {
                    for reply in pending.drain(..) {
                        let _ = reply.send(Err(TunnelError::Closed("session ended".into())));
                    }
                    // yamux has told the peer why (the GoAway); dropping the connection
                    // closes the socket.
                    return Err(TunnelError::Protocol(
                        "the peer broke the yamux protocol (window, stream id or frame): tunnel closed".into(),
                    ));
                }
                Event::Ended(result) => {
                    for reply in pending.drain(..) {
                        let _ = reply.send(Err(TunnelError::Closed("session ended".into())));
                    }
                    return result.map_err(|e| TunnelError::Closed(e.to_string()));
                }
            }
        }
    }

    /// One turn of the driver: commands, new outbound streams, then yamux's own work.
    fn turn(
        &mut self,
        cx: &mut std::task::Context<'_>,
        pending: &mut VecDeque<oneshot::Sender<Result<yamux::Stream, TunnelError>>>,
        close_requested: std::pin::Pin<&mut impl Future<Output = ()>>,
        violation: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Event> {
        if close_requested.poll(cx).is_ready() {
            return Poll::Ready(Event::Close);
        }
        if violation.poll(cx).is_ready() {
            return Poll::Ready(Event::Violated);
        }
        while let Poll::Ready(Some(Command::Open(reply))) = self.commands.poll_recv(cx) {
            pending.push_back(reply);
        }
        // yamux wakes a waiting open when the peer acknowledges a stream, not when one of
        // the unacknowledged ones ends (which it learns inside `poll_next_inbound`): so
        // after it, pending opens are tried again, and yamux polled again for the streams
        // that opened (until it has new streams, their first writes would wake no one).
        let mut first = true;
        loop {
            let opened = match self.open_pending(cx, pending) {
                Ok(opened) => opened,
                Err(e) => return Poll::Ready(Event::Ended(Err(e))),
            };
            if !first && !opened {
                return Poll::Pending;
            }
            first = false;
            match self.connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(mut stream))) => {
                    if self.inbound.is_some() {
                        acknowledge(&mut stream, cx);
                    }
                    return Poll::Ready(Event::Inbound(stream));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Event::Ended(Err(e))),
                Poll::Ready(None) => return Poll::Ready(Event::Ended(Ok(()))),
                Poll::Pending => {}
            }
        }
    }

    /// Opens streams for the pending opens while yamux lets it; whether any opened.
    fn open_pending(
        &mut self,
        cx: &mut std::task::Context<'_>,
        pending: &mut VecDeque<oneshot::Sender<Result<yamux::Stream, TunnelError>>>,
    ) -> Result<bool, yamux::ConnectionError> {
        let mut opened = false;
        while let Some(reply) = pending.front() {
            // An opener that gave up (its wait timed out) takes no stream.
            if reply.is_closed() {
                pending.pop_front();
                continue;
            }
            match self.connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    opened = true;
                    if let Some(reply) = pending.pop_front() {
                        let _ = reply.send(Ok(stream));
                    }
                }
                Poll::Ready(Err(e)) => {
                    for reply in pending.drain(..) {
                        let _ = reply.send(Err(TunnelError::Closed(e.to_string())));
                    }
                    return Err(e);
                }
                Poll::Pending => break,
            }
        }
        Ok(opened)
    }
}

/// Acknowledges a stream the peer opened, at once: an empty data frame with yamux's ACK
/// flag (as Go's yamux acknowledges on accept, with a window update).
///
/// Left to itself, yamux acknowledges an inbound stream with its first frame out, which
/// on the agent is the upstream's first byte, and the opener may hold at most
/// `MAX_ACK_BACKLOG` (256) streams unacknowledged: 256 requests that the member has not
/// answered (uploads whose bodies never finish, slow upstreams) would stop the server
/// from opening any more streams on that tunnel, for every caller. A peer of any version
/// takes the empty frame (yamux skips empty data when reading).
fn acknowledge(stream: &mut yamux::Stream, cx: &mut std::task::Context<'_>) {
    match futures::AsyncWrite::poll_write(std::pin::Pin::new(stream), cx, &[]) {
        Poll::Ready(Ok(_)) => {}
        Poll::Ready(Err(e)) => tracing::debug!(error = %e, "acknowledging a stream failed"),
        // A new stream's command queue is empty, so this does not happen; should it, the
        // stream is acknowledged with its first frame, as yamux would.
        Poll::Pending => tracing::debug!("acknowledging a stream must wait for its first frame"),
    }
}

/// Waits for a closing session's driver task, but not forever. The driver bounds its own
/// close by [`CLOSE_TIMEOUT`]; this is the backstop that aborts the task (dropping the
/// socket) should it still be running then.
pub async fn finish(driver: tokio::task::JoinHandle<Result<(), TunnelError>>) {
    let abort = driver.abort_handle();
    if tokio::time::timeout(CLOSE_TIMEOUT, driver).await.is_err() {
        tracing::debug!("session did not close in time: dropping its connection");
        abort.abort();
    }
}

/// How long a closing session may take.
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// After a close, how long a silent peer is waited for. A peer still reading what the
/// session sent answers with window updates at least every half window it reads (at
/// 1 Mbit/s, one 256 KiB window's half a second); a peer silent this long is gone or
/// hung, and the session's end (the agent's redial) does not wait on it.
const LINGER_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::task::Context;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

    #[tokio::test]
    async fn the_server_holds_no_inbound_channel_and_its_inbound_ends_at_once() {
        let (a, _b) = tokio::io::duplex(1 << 10);
        let (_server, mut inbound, _driver) = start(a, Role::Server, &SessionConfig::default());
        assert!(inbound.0.is_none());
        assert!(inbound.recv().await.is_none());
    }

    fn pair(max_streams: usize) -> (SessionHandle, SessionHandle, Inbound) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let config = SessionConfig {
            max_streams,
            ..SessionConfig::default()
        };
        let (server, _, server_driver) = start(a, Role::Server, &config);
        let (agent, agent_inbound, agent_driver) = start(b, Role::Agent, &config);
        tokio::spawn(server_driver.run());
        tokio::spawn(agent_driver.run());
        (server, agent, agent_inbound)
    }

    /// Opens a tunnel stream per connection, as tower-server's frontend does.
    #[derive(Clone)]
    struct OverTunnel(SessionHandle);

    impl tower_service::Service<http::Uri> for OverTunnel {
        type Response = hyper_util::rt::TokioIo<TunnelStream>;
        type Error = TunnelError;
        type Future =
            Pin<Box<dyn std::future::Future<Output = Result<Self::Response, TunnelError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), TunnelError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Uri) -> Self::Future {
            let session = self.0.clone();
            Box::pin(async move {
                session
                    .open_stream()
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            })
        }
    }

    /// The agent answers before it read a request's body and drops the stream, which
    /// resets it while the server still sends the body (tower-agent refusing `--as`): the
    /// server's HTTP/1.1 client over the tunnel hands the caller that answer, every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_before_the_body_comes_back_over_a_reset_stream() {
        use http_body_util::BodyExt as _;
        let (server, _agent, mut inbound) = pair(64);
        tokio::spawn(async move {
            while let Some(mut s) = inbound.recv().await {
                tokio::spawn(async move {
                    let mut some = vec![0; 64 << 10];
                    let _ = s.read(&mut some).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 6\r\n\r\nrefuse")
                        .await;
                    let _ = s.flush().await;
                });
            }
        });
        let pool = crate::pool::Http1Pool::new(OverTunnel(server), None, 4);
        for _ in 0..20 {
            let uri = http::Uri::from_static("http://agent/upload");
            let request = crate::pool::tests::upload(&uri);
            let response = tokio::time::timeout(Duration::from_secs(10), pool.send(request))
                .await
                .expect("an answer or an error within 10 s")
                .unwrap();
            assert_eq!(response.status(), 403);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"refuse");
        }
    }

    #[tokio::test]
    async fn server_opens_streams_and_bytes_flow_both_ways() {
        let (server, _agent, mut inbound) = pair(8);
        let echo = tokio::spawn(async move {
            let mut s = inbound.recv().await.unwrap();
            let mut buf = vec![0; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut s = server.open_stream().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn stream_limit_refuses_at_once_and_frees_on_drop() {
        let (server, _agent, _inbound) = pair(2);
        let a = server.open_stream().await.unwrap();
        let _b = server.open_stream().await.unwrap();
        assert!(matches!(
            server.open_stream().await,
            Err(TunnelError::StreamLimit(2))
        ));
        assert_eq!(server.open_streams(), 2);
        drop(a);
        assert!(server.open_stream().await.is_ok());
    }

    #[tokio::test]
    async fn reserved_slots_count_against_the_same_limit() {
        let (server, _agent, _inbound) = pair(2);
        let _stream = server.open_stream().await.unwrap();
        let request = server.reserve().unwrap();
        assert_eq!(server.open_streams(), 2);
        assert!(matches!(server.reserve(), Err(TunnelError::StreamLimit(2))));
        assert!(matches!(
            server.open_stream().await,
            Err(TunnelError::StreamLimit(2))
        ));
        drop(request);
        assert!(server.reserve().is_ok());
    }

    /// Reads as hyper does through `TokioIo`: into a fresh, uninitialized 512 KiB buffer
    /// each time. Returns the bytes of one read and how much of the buffer it initialized
    /// (written, or zeroed first).
    async fn read_fresh(s: &mut crate::TunnelStream) -> (Vec<u8>, usize) {
        let mut memory = vec![std::mem::MaybeUninit::<u8>::uninit(); 512 * 1024];
        let mut buf = tokio::io::ReadBuf::uninit(&mut memory);
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_read(cx, &mut buf))
            .await
            .unwrap();
        (buf.filled().to_vec(), buf.initialized().len())
    }

    #[tokio::test]
    async fn reads_initialize_only_what_they_fill_and_lose_nothing() {
        let (server, _agent, mut inbound) = pair(8);
        let sizes = [1, 300, 5_000, 65_536, 200_000, 17, 1_000_000, 3];
        let total: usize = sizes.iter().sum();
        let sender = tokio::spawn(async move {
            let mut s = inbound.recv().await.unwrap();
            let mut n = 0u8;
            for size in sizes {
                let chunk: Vec<u8> = (0..size)
                    .map(|_| {
                        n = n.wrapping_add(1);
                        n
                    })
                    .collect();
                s.write_all(&chunk).await.unwrap();
            }
            s.shutdown().await.unwrap();
        });
        let mut s = server.open_stream().await.unwrap();
        s.write_all(b"go").await.unwrap();
        let (mut got, mut reads, mut initialized) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let (read, init) = read_fresh(&mut s).await;
            if read.is_empty() {
                break;
            }
            reads.push(read.len());
            initialized.push(init);
            got.extend_from_slice(&read);
        }
        sender.await.unwrap();
        assert_eq!(got.len(), total);
        assert!(
            got.iter()
                .enumerate()
                .all(|(k, &b)| b == ((k + 1) % 256) as u8),
            "bytes lost or out of order"
        );
        // No read zeroes memory: each initializes only the bytes it fills.
        for (i, (&n, &init)) in reads.iter().zip(&initialized).enumerate() {
            assert_eq!(init, n, "read {i} initialized {init} bytes for {n}");
        }
        // And a read takes what is there, up to the buffer: a long stream is read in big
        // reads (small ones would multiply the work of a bulk transfer).
        assert!(
            reads.iter().any(|&n| n >= 128 * 1024),
            "reads never grew: {reads:?}"
        );
    }

    /// The vendored yamux reuses spent frame bodies, process-wide, for new frames of
    /// either direction (`vendor/yamux/src/spare.rs`): several streams, each echoing
    /// megabytes of its own bytes back, must each get back exactly their own, none of
    /// another stream's or of an earlier frame's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_streams_get_only_their_own_bytes_while_bodies_are_reused() {
        const STREAMS: u8 = 4;
        const LEN: usize = 3 << 20;
        let pattern = |stream: u8| -> Vec<u8> {
            (0..LEN)
                .map(|k| (k % 253) as u8 ^ stream.wrapping_mul(67))
                .collect()
        };
        let (server, _agent, mut inbound) = pair(16);
        let echo = tokio::spawn(async move {
            let mut echoes = Vec::new();
            for _ in 0..STREAMS {
                let s = inbound.recv().await.unwrap();
                echoes.push(tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(s);
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                }));
            }
            for e in echoes {
                e.await.unwrap();
            }
        });
        let mut callers = Vec::new();
        for stream in 0..STREAMS {
            let s = server.open_stream().await.unwrap();
            callers.push(tokio::spawn(async move {
                let sent = pattern(stream);
                let (mut r, mut w) = tokio::io::split(s);
                let out = sent.clone();
                let writer = tokio::spawn(async move {
                    // Writes of odd sizes, so frames of many lengths come and go.
                    for part in out.chunks(100_003) {
                        w.write_all(part).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                });
                let mut back = Vec::with_capacity(LEN);
                r.read_to_end(&mut back).await.unwrap();
                writer.await.unwrap();
                assert_eq!(back.len(), LEN, "stream {stream}: length");
                let first_wrong = back.iter().zip(&sent).position(|(a, b)| a != b);
                assert_eq!(first_wrong, None, "stream {stream}: bytes differ");
            }));
        }
        for c in callers {
            c.await.unwrap();
        }
        echo.await.unwrap();
    }

    /// A vectored write gathers its slices into one frame, up to the frame's limit, and
    /// what arrives is every byte in order: hyper writes a message's head and body this
    /// way, where it would otherwise copy them into one buffer first.
    #[tokio::test]
    async fn vectored_writes_gather_their_slices_and_lose_nothing() {
        use std::io::IoSlice;
        let (server, _agent, mut inbound) = pair(8);
        let mut s = server.open_stream().await.unwrap();
        assert!(s.is_write_vectored());
        let head = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let small = [
            IoSlice::new(&head),
            IoSlice::new(b"5\r\n"),
            IoSlice::new(b"hello"),
        ];
        // All of a small message at once: one frame.
        assert_eq!(s.write_vectored(&small).await.unwrap(), head.len() + 3 + 5);
        let mut sent = [&head[..], b"5\r\n", b"hello"].concat();
        // A large one a frame at a time, each as much as the frame takes.
        let mut at = 0;
        while at < body.len() {
            let slices = [IoSlice::new(&head[..4]), IoSlice::new(&body[at..])];
            let n = s.write_vectored(&slices).await.unwrap();
            assert!(n > 4 && n <= crate::stream::MAX_FRAME, "{n}");
            sent.extend_from_slice(&head[..4]);
            sent.extend_from_slice(&body[at..at + n - 4]);
            at += n - 4;
        }
        s.shutdown().await.unwrap();
        let mut accepted = inbound.recv().await.unwrap();
        let mut got = Vec::new();
        accepted.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes arrived changed or out of order");
    }

    /// yamux opens no more than 256 streams the peer has not acknowledged. The agent
    /// acknowledges each stream as it accepts it, so streams it never writes to (requests
    /// its upstream has not answered) do not stop the server from opening more.
    #[tokio::test]
    async fn streams_the_agent_never_answers_do_not_hold_back_new_ones() {
        let (server, _agent, _inbound) = pair(1000);
        let mut opened = Vec::new();
        for n in 0..600 {
            let mut stream = tokio::time::timeout(Duration::from_secs(5), server.open_stream())
                .await
                .unwrap_or_else(|_| panic!("opening stream {n} waited for acknowledgements"))
                .unwrap();
            // yamux sends a stream's SYN with its first frame, as the preamble is here.
            stream.write_all(b"p").await.unwrap();
            opened.push(stream);
        }
    }

    /// A peer that acknowledges a stream only with its first write (yamux's default, and
    /// agents before this one) and writes nothing: opens past its 256 fail once they have
    /// waited [`OPEN_TIMEOUT`], and say why, instead of waiting with the streams before.
    #[tokio::test(start_paused = true)]
    async fn opens_past_256_unacknowledged_streams_fail_after_the_open_timeout() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (server, _inbound, driver) = start(a, Role::Server, &SessionConfig::default());
        tokio::spawn(driver.run());
        let mut peer =
            yamux::Connection::new(b.compat(), yamux::Config::default(), yamux::Mode::Server);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(Ok(stream)) = poll_fn(|cx| peer.poll_next_inbound(cx)).await {
                held.push(stream);
            }
        });
        let mut opened = Vec::new();
        for _ in 0..256 {
            let mut stream = server.open_stream().await.unwrap();
            stream.write_all(b"p").await.unwrap();
            opened.push(stream);
        }
        let asked = tokio::time::Instant::now();
        let refused = server.open_stream().await.unwrap_err();
        assert!(
            matches!(refused, TunnelError::Unacknowledged(OPEN_TIMEOUT)),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("256 streams"), "{refused}");
        assert_eq!(asked.elapsed(), OPEN_TIMEOUT);
        // Once one is done with, the next open goes through again.
        drop(opened.pop());
        let mut stream = tokio::time::timeout(Duration::from_secs(1), server.open_stream())
            .await
            .expect("an open after a stream ended")
            .unwrap();
        stream.write_all(b"p").await.unwrap();
    }

    /// Counts the writes that reach the socket under a session.
    struct CountWrites<T> {
        inner: T,
        writes: Arc<AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for CountWrites<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for CountWrites<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Requests written by many tasks at once leave in one write, not one each: on a
    /// worker, a stream's write wakes the driver into the slot polled next, so a flush at
    /// the end of every driver poll sent each request alone (0.9 tunnel writes per
    /// request at c=64). One worker, as deployed (1 CPU per pod).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn frames_written_by_tasks_ready_together_leave_together() {
        const STREAMS: usize = 32;
        let (a, b) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let a = CountWrites {
            inner: a,
            writes: writes.clone(),
        };
        let config = SessionConfig::default();
        let (server, _, server_driver) = start(a, Role::Server, &config);
        tokio::spawn(server_driver.run());
        let config = config.clone();
        // The agent is another process: its tasks must not share the server's worker. It
        // reads each stream's message and says when it has them all.
        let (received, all_received) = oneshot::channel();
        let agent = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (_agent, mut inbound, driver) = start(b, Role::Agent, &config);
                tokio::spawn(driver.run());
                for _ in 0..STREAMS {
                    let mut s = inbound.recv().await.unwrap();
                    let mut got = [0u8; 100];
                    s.read_exact(&mut got).await.unwrap();
                    assert_eq!(got, [7u8; 100]);
                }
                received.send(()).unwrap();
            })
        });
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            streams.push(server.open_stream().await.unwrap());
        }
        let (go, ready) = tokio::sync::watch::channel(false);
        let mut writers = Vec::new();
        for mut stream in streams {
            let mut ready = ready.clone();
            // Each a request in flight, as the proxies count them.
            let exchange = server.exchanges().begin();
            writers.push(tokio::spawn(async move {
                ready.wait_for(|go| *go).await.unwrap();
                stream.write_all(&[7u8; 100]).await.unwrap();
                (stream, exchange)
            }));
        }
        // What went out before the writers start (an open sends nothing: a stream opens
        // with its first frame).
        let before = writes.load(Relaxed);
        // Woken from a task on the worker, all 32 are ready in the same turn.
        tokio::spawn(async move { go.send(true).unwrap() })
            .await
            .unwrap();
        all_received.await.unwrap();
        let sent = writes.load(Relaxed) - before;
        // One write, or two when tokio's maintenance tick (every 61st) falls inside the
        // turn; plus, when the agent's thread started late, the pong to the ping yamux
        // sends as its session starts. Each frame alone would be 32.
        assert!(
            (1..=3).contains(&sent),
            "{STREAMS} streams' frames took {sent} writes"
        );
        for writer in writers {
            drop(writer.await.unwrap());
        }
        agent.join().unwrap();
    }

    #[tokio::test]
    async fn close_ends_both_sides() {
        let (server, agent, _inbound) = pair(8);
        server.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), agent.closed())
            .await
            .unwrap();
        server.closed().await;
        assert!(server.open_stream().await.is_err());
    }

    /// A close on a link that takes no more bytes (a peer gone silent behind a NAT) ends
    /// within [`CLOSE_TIMEOUT`], not when TCP gives up minutes later: the agent redials
    /// only once its session has ended.
    #[tokio::test(start_paused = true)]
    async fn close_on_a_stalled_link_ends_in_bounded_time() {
        // The peer end is held and never read: 4 KiB fill the link.
        let (near, _silent_peer) = tokio::io::duplex(4096);
        let (handle, _inbound, driver) = start(near, Role::Server, &SessionConfig::default());
        let driver = tokio::spawn(driver.run());
        let mut stream = handle.open_stream().await.unwrap();
        // yamux takes a window's worth (256 KiB) and queues what the link does not.
        stream.write_all(&[7; 256 * 1024]).await.unwrap();

        let asked = tokio::time::Instant::now();
        handle.close();
        tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_secs(1), handle.closed())
            .await
            .expect("the session did not end after close() on a stalled link");
        // Not sooner either: the close was stuck behind the queued bytes, and let go.
        assert!(asked.elapsed() >= CLOSE_TIMEOUT, "{:?}", asked.elapsed());
        let ended = driver.await.unwrap();
        assert!(
            matches!(&ended, Err(TunnelError::Closed(why)) if why.contains("did not get through")),
            "{ended:?}"
        );
    }

    /// A close to a peer that takes the bytes but never answers (a hung server) ends once
    /// the peer has been silent for [`LINGER_QUIET`], not at [`CLOSE_TIMEOUT`]: the agent
    /// redials when its session has ended.
    #[tokio::test(start_paused = true)]
    async fn a_close_waits_for_a_silent_peer_only_briefly() {
        let (near, _silent_peer) = tokio::io::duplex(1 << 16);
        let (handle, _inbound, driver) = start(near, Role::Server, &SessionConfig::default());
        let driver = tokio::spawn(driver.run());
        let asked = tokio::time::Instant::now();
        handle.close();
        handle.closed().await;
        let took = asked.elapsed();
        assert!(
            took >= LINGER_QUIET && took < LINGER_QUIET + Duration::from_millis(100),
            "{took:?}"
        );
        assert!(driver.await.unwrap().is_ok());
    }

    /// Streams writing faster than the link takes their bytes queue at most
    /// [`QUEUE_LIMIT`](crate::queued::QUEUE_LIMIT) (and one write) in yamux together,
    /// however many streams and however wide their windows: then their writes wait.
    #[tokio::test]
    async fn what_streams_queue_behind_a_stalled_link_is_bounded_for_the_session() {
        use crate::queued::QUEUE_LIMIT;
        // The peer end is held and never read: the link takes 4 KiB.
        let (near, _silent_peer) = tokio::io::duplex(4096);
        let (handle, _inbound, driver) = start(near, Role::Server, &SessionConfig::default());
        tokio::spawn(driver.run());
        let mut accepted = 0;
        let mut streams = Vec::new();
        // 20 streams with 256 KiB of window each: 5 MiB if nothing held them back.
        for _ in 0..20 {
            let mut stream = handle.open_stream().await.unwrap();
            let chunk = vec![7u8; 16 * 1024];
            // Written until a write makes no progress for 50 ms: it waits.
            while let Ok(written) =
                tokio::time::timeout(Duration::from_millis(50), stream.write(&chunk)).await
            {
                accepted += written.unwrap();
            }
            streams.push(stream);
        }
        let queued = handle.queued.bytes();
        assert!(
            (QUEUE_LIMIT..=QUEUE_LIMIT + 16 * 1024).contains(&queued),
            "{queued} bytes queued in yamux"
        );
        // The rest is in the coalescing buffer (80 KiB) and the link (4 KiB).
        assert!(
            accepted - queued <= 84 * 1024,
            "{accepted} bytes taken, {queued} of them queued"
        );
    }

    /// Once the link takes bytes again, the queue drains and writers go on: the count of
    /// what is queued follows what leaves exactly, so it returns to zero.
    #[tokio::test]
    async fn queued_bytes_drain_to_zero_once_delivered() {
        let (server, _agent, mut inbound) = pair(64);
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut readers = Vec::new();
            for _ in 0..8 {
                let mut s = inbound.recv().await.unwrap();
                readers.push(tokio::spawn(async move {
                    let mut sink = Vec::new();
                    s.read_to_end(&mut sink).await.unwrap();
                    sink.len()
                }));
            }
            for r in readers {
                total += r.await.unwrap();
            }
            total
        });
        let mut writers = Vec::new();
        for _ in 0..8 {
            let mut s = server.open_stream().await.unwrap();
            writers.push(tokio::spawn(async move {
                let chunk = vec![1u8; 40_000];
                for _ in 0..100 {
                    s.write_all(&chunk).await.unwrap();
                }
                s.shutdown().await.unwrap();
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), 8 * 100 * 40_000);
        assert_eq!(server.queued.bytes(), 0);
    }

    /// A read waiting on a stream when its session is closed fails at once (yamux's own
    /// close leaves it waiting for ever), and so does a read on a stream of a session
    /// that ended.
    #[tokio::test]
    async fn streams_waiting_when_their_session_closes_fail_instead_of_hanging() {
        let (server, agent, mut inbound) = pair(8);
        let mut waiting = server.open_stream().await.unwrap();
        waiting.write_all(b"request").await.unwrap();
        // The agent takes the stream and never answers.
        let mut accepted = inbound.recv().await.unwrap();
        let mut got = [0; 7];
        accepted.read_exact(&mut got).await.unwrap();

        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            waiting.read(&mut buf).await
        });
        server.close();
        let read = tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .expect("the read still waits after close()")
            .unwrap();
        // An error, not an end of stream: a caller must not take a cut response as whole.
        assert!(read.is_err(), "{read:?}");

        // The agent's side of it ends too once its session has.
        tokio::time::timeout(Duration::from_secs(5), agent.closed())
            .await
            .unwrap();
        let mut buf = [0; 16];
        let after = tokio::time::timeout(Duration::from_secs(2), accepted.read(&mut buf))
            .await
            .expect("the agent's stream still waits after its session ended");
        assert!(matches!(after, Ok(0) | Err(_)), "{after:?}");
    }

    /// A closing session keeps its socket until the peer closes too. Bytes the peer sends
    /// after the close (a window update for what it is still reading) would otherwise
    /// arrive at a closed socket, which the kernel answers with a reset, throwing away
    /// what it had not sent: the peer would lose the end of its data and the GoAway.
    #[tokio::test]
    async fn a_close_reaches_a_peer_still_sending_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small receive buffer: what the session sends waits in its kernel.
        socket.set_recv_buffer_size(4096).unwrap();
        let mut peer = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (near, _) = listener.accept().await.unwrap();
        let (handle, _inbound, driver) = start(near, Role::Server, &SessionConfig::default());
        let driver = tokio::spawn(driver.run());
        for _ in 0..4 {
            let mut stream = handle.open_stream().await.unwrap();
            // A window each (the peer grants no more); cut short by the close.
            tokio::spawn(async move { stream.write_all(&[7; 256 * 1024]).await });
        }
        let mut received = vec![0; 4096];
        let mut n = 0;
        while n < 4096 {
            n += peer.read(&mut received[n..]).await.unwrap();
        }

        handle.close();
        // Sent before the driver runs again: it never reads these. A yamux pong (a Ping
        // with the ACK flag), as a peer answers pings.
        let pong = [0u8, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0];
        peer.write_all(&pong).await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest)
            .await
            .expect("the session's close reset the connection");
        received.extend_from_slice(&rest);
        drop(peer);

        // Every frame whole, and the GoAway (type 3) last.
        let mut at = 0;
        let mut last = None;
        while let Some(header) = received.get(at..at + 12) {
            let length = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
            at += 12 + if header[1] == 0 { length } else { 0 };
            last = Some(header[1]);
        }
        assert_eq!(at, received.len(), "a frame cut short");
        assert_eq!(last, Some(3), "the GoAway did not arrive");
        let ended = tokio::time::timeout(CLOSE_TIMEOUT, driver).await.unwrap();
        assert!(ended.unwrap().is_ok());
    }
}
