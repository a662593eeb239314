//! The I/O driver of a server-side SPDY/3.1 session: a reader loop that decodes frames and
//! dispatches them to streams, and a writer task that owns the send-side codec.
//!
//! Streams the peer opens are answered with SYN_REPLY and handed to the application as
//! [`IncomingStream`]s: a receiver of the stream's data (closed at the peer's FIN or
//! RST_STREAM, or when the connection ends) and a [`StreamSender`] for the way back.
//!
//! Flow control: data handed to a stream counts as consumed and is acknowledged with
//! WINDOW_UPDATE; the per-stream channels are bounded, so a slow stream stalls the reader and
//! with it the TCP connection. The send side does not wait for the peer's windows: kubectl's
//! SPDY library (moby/spdystream) never sends WINDOW_UPDATE, so honouring the 64 KiB initial
//! window would stall every transfer larger than that, exactly as it would against a kubelet.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::frame::{Codec, FLAG_FIN, Frame, Headers, rst};

/// Largest data frame payload this side writes.
const MAX_DATA_FRAME: usize = 32 * 1024;
/// Unacknowledged received bytes on a stream (or the session) that trigger a WINDOW_UPDATE.
const WINDOW_UPDATE_THRESHOLD: u32 = 32 * 1024;
/// Chunks buffered per stream before the reader waits for the stream's consumer.
const STREAM_BUFFER: usize = 16;
/// How long the session waits for the peer to hang up once the application is done.
const LINGER: Duration = Duration::from_secs(30);

/// A stream the peer opened with SYN_STREAM.
#[derive(Debug)]
pub(crate) struct IncomingStream {
    /// Its headers (names lowercase).
    pub(crate) headers: Headers,
    /// The stream's data until the peer half-closes it (or resets it, or the connection ends).
    pub(crate) data: mpsc::Receiver<Bytes>,
    /// The way back.
    pub(crate) sender: StreamSender,
}

/// The sending half of one stream. Sending fails once the connection is gone.
#[derive(Debug, Clone)]
pub(crate) struct StreamSender {
    stream_id: u32,
    out: mpsc::Sender<Out>,
}

/// The connection was closed; nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("SPDY connection closed")]
pub(crate) struct Closed;

impl StreamSender {
    /// Sends `data` (split into frames as needed).
    pub(crate) async fn send(&self, mut data: Bytes) -> Result<(), Closed> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
            self.frame(Frame::Data {
                stream_id: self.stream_id,
                flags: 0,
                data: chunk,
            })
            .await?;
        }
        Ok(())
    }

    /// Half-closes the stream: an empty data frame with FIN.
    pub(crate) async fn finish(&self) -> Result<(), Closed> {
        self.frame(Frame::Data {
            stream_id: self.stream_id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        })
        .await
    }

    /// Resets the stream.
    pub(crate) async fn reset(&self, status: u32) -> Result<(), Closed> {
        self.frame(Frame::RstStream {
            stream_id: self.stream_id,
            status,
        })
        .await
    }

    async fn frame(&self, frame: Frame) -> Result<(), Closed> {
        self.out.send(Out::Frame(frame)).await.map_err(|_| Closed)
    }
}

/// What the writer task is told.
#[derive(Debug)]
enum Out {
    /// Encode and write this frame.
    Frame(Frame),
    /// The peer reset this stream: drop whatever is still to be sent on it.
    PeerReset(u32),
}

/// Serves one SPDY session on `io` until the peer hangs up (or, once `app` has finished,
/// for at most [`LINGER`] longer). `app` receives the streams the peer opens.
pub(crate) async fn serve<IO, A, Fut>(io: IO, app: A)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
    A: FnOnce(mpsc::Receiver<IncomingStream>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(64);
    let (incoming_tx, incoming_rx) = mpsc::channel(16);
    let writer = tokio::spawn(write_loop(write_half, out_rx));
    let mut app = tokio::spawn(app(incoming_rx));
    // Boxed so that dropping it below really drops its state (and its frame sender).
    let mut reader = Box::pin(read_loop(read_half, out_tx, incoming_tx));
    tokio::select! {
        () = &mut reader => {}
        _ = &mut app => {
            if tokio::time::timeout(LINGER, &mut reader).await.is_err() {
                tracing::debug!("SPDY peer did not hang up after the session finished");
            }
        }
    }
    // Whatever the application still runs ends as its streams close and its sends fail.
    drop(reader);
    let abort = writer.abort_handle();
    if tokio::time::timeout(LINGER, writer).await.is_err() {
        abort.abort();
    }
}

/// Reads and dispatches frames until EOF or a protocol error.
async fn read_loop<R: AsyncRead>(
    read_half: R,
    out: mpsc::Sender<Out>,
    incoming: mpsc::Sender<IncomingStream>,
) {
    tokio::pin!(read_half);
    let mut codec = Codec::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut state = ReadState {
        out,
        incoming: Some(incoming),
        streams: HashMap::new(),
        last_stream_id: 0,
        session_unacked: 0,
        session_windows: false,
    };
    loop {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if state.handle(frame).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("SPDY protocol error from peer: {e}");
                    let _ = state
                        .out
                        .send(Out::Frame(Frame::GoAway {
                            last_good_stream_id: state.last_stream_id,
                            status: 1,
                        }))
                        .await;
                    return;
                }
            }
        }
        buf.reserve(16 * 1024);
        match read_half.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("SPDY read failed: {e}");
                return;
            }
        }
    }
}

/// Per-stream receive state.
struct StreamState {
    /// Delivers data to the application; `None` once the peer half-closed or reset.
    data: Option<mpsc::Sender<Bytes>>,
    /// Bytes delivered since the last WINDOW_UPDATE.
    unacked: u32,
}

struct ReadState {
    out: mpsc::Sender<Out>,
    incoming: Option<mpsc::Sender<IncomingStream>>,
    streams: HashMap<u32, StreamState>,
    last_stream_id: u32,
    session_unacked: u32,
    /// Whether the peer uses SPDY/3.1 session flow control (it sent a session WINDOW_UPDATE).
    session_windows: bool,
}

impl ReadState {
    async fn send(&self, frame: Frame) -> Result<(), Closed> {
        self.out.send(Out::Frame(frame)).await.map_err(|_| Closed)
    }

    /// Handles one frame; `Err` ends the session (the writer is gone).
    async fn handle(&mut self, frame: Frame) -> Result<(), Closed> {
        let fin = frame.is_fin();
        match frame {
            Frame::SynStream {
                stream_id, headers, ..
            } => {
                if self.streams.contains_key(&stream_id) {
                    return self
                        .send(Frame::RstStream {
                            stream_id,
                            status: rst::STREAM_IN_USE,
                        })
                        .await;
                }
                let Some(incoming) = self.incoming.clone() else {
                    // After GOAWAY-like shutdown of the application: refuse.
                    return self
                        .send(Frame::RstStream {
                            stream_id,
                            status: rst::REFUSED_STREAM,
                        })
                        .await;
                };
                self.last_stream_id = self.last_stream_id.max(stream_id);
                self.send(Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Vec::new(),
                })
                .await?;
                let (data_tx, data_rx) = mpsc::channel(STREAM_BUFFER);
                self.streams.insert(
                    stream_id,
                    StreamState {
                        data: (!fin).then_some(data_tx),
                        unacked: 0,
                    },
                );
                let stream = IncomingStream {
                    headers,
                    data: data_rx,
                    sender: StreamSender {
                        stream_id,
                        out: self.out.clone(),
                    },
                };
                if incoming.send(stream).await.is_err() {
                    // The application is gone; later streams are refused.
                    self.incoming = None;
                }
            }
            Frame::Data {
                stream_id, data, ..
            } => {
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                let Some(stream) = self.streams.get_mut(&stream_id) else {
                    return self
                        .send(Frame::RstStream {
                            stream_id,
                            status: rst::INVALID_STREAM,
                        })
                        .await;
                };
                let Some(tx) = stream.data.as_ref() else {
                    return self
                        .send(Frame::RstStream {
                            stream_id,
                            status: rst::STREAM_ALREADY_CLOSED,
                        })
                        .await;
                };
                if !data.is_empty() && tx.send(data).await.is_ok() {
                    stream.unacked = stream.unacked.saturating_add(len);
                }
                if fin {
                    stream.data = None;
                }
                let stream_update = (stream.unacked >= WINDOW_UPDATE_THRESHOLD
                    && stream.data.is_some())
                .then(|| std::mem::take(&mut stream.unacked));
                if let Some(delta) = stream_update {
                    self.send(Frame::WindowUpdate { stream_id, delta }).await?;
                }
                self.session_unacked = self.session_unacked.saturating_add(len);
                if self.session_windows && self.session_unacked >= WINDOW_UPDATE_THRESHOLD {
                    let delta = std::mem::take(&mut self.session_unacked);
                    self.send(Frame::WindowUpdate {
                        stream_id: 0,
                        delta,
                    })
                    .await?;
                }
            }
            Frame::Headers { stream_id, .. } => {
                if fin && let Some(stream) = self.streams.get_mut(&stream_id) {
                    stream.data = None;
                }
            }
            Frame::RstStream { stream_id, status } => {
                tracing::trace!("peer reset SPDY stream {stream_id} (status {status})");
                if self.streams.remove(&stream_id).is_some() {
                    let _ = self.out.send(Out::PeerReset(stream_id)).await;
                }
            }
            Frame::Ping { id } => self.send(Frame::Ping { id }).await?,
            Frame::WindowUpdate { stream_id: 0, .. } => self.session_windows = true,
            Frame::GoAway { .. } => {
                // The peer opens no more streams; the existing ones run to completion.
            }
            Frame::SynReply { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Unknown { .. } => {}
        }
        Ok(())
    }
}

/// Encodes and writes frames until every sender is gone, then shuts the write side down.
async fn write_loop<W: AsyncWrite>(write_half: W, mut out: mpsc::Receiver<Out>) {
    tokio::pin!(write_half);
    let mut codec = Codec::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // Streams this side sent FIN on (no more data), and streams reset by either side
    // (nothing more at all).
    let mut finished: HashSet<u32> = HashSet::new();
    let mut reset: HashSet<u32> = HashSet::new();
    while let Some(first) = out.recv().await {
        let mut next = Some(first);
        // Batch whatever is already queued into one write.
        while let Some(item) = next.take() {
            if buf.len() < 256 * 1024 {
                next = out.try_recv().ok();
            }
            match item {
                Out::PeerReset(id) => {
                    reset.insert(id);
                }
                Out::Frame(frame) => {
                    let skip = match &frame {
                        Frame::Data { stream_id, .. } => {
                            let skip = reset.contains(stream_id) || finished.contains(stream_id);
                            if !skip && frame.is_fin() {
                                finished.insert(*stream_id);
                            }
                            skip
                        }
                        Frame::RstStream { stream_id, .. } => !reset.insert(*stream_id),
                        _ => false,
                    };
                    if skip {
                        continue;
                    }
                    if let Err(e) = codec.encode(&frame, &mut buf) {
                        tracing::warn!("cannot encode SPDY frame: {e}");
                        return;
                    }
                }
            }
        }
        if !buf.is_empty() {
            if let Err(e) = write_half.write_all(&buf).await {
                tracing::debug!("SPDY write failed: {e}");
                return;
            }
            buf.clear();
            if let Err(e) = write_half.flush().await {
                tracing::debug!("SPDY flush failed: {e}");
                return;
            }
        }
    }
    let _ = write_half.shutdown().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::spdy::frame::FLAG_FIN;

    /// A client-side view of a session: encodes frames into the pipe and decodes replies.
    struct Peer {
        io: tokio::io::DuplexStream,
        codec: Codec,
        buf: BytesMut,
    }

    impl Peer {
        async fn send(&mut self, frame: Frame) {
            let mut out = BytesMut::new();
            self.codec.encode(&frame, &mut out).unwrap();
            self.io.write_all(&out).await.unwrap();
        }

        async fn recv(&mut self) -> Option<Frame> {
            loop {
                if let Some(f) = self.codec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                if self.io.read_buf(&mut self.buf).await.unwrap() == 0 {
                    return None;
                }
            }
        }
    }

    fn syn(stream_id: u32, kind: &str) -> Frame {
        Frame::SynStream {
            stream_id,
            associated_id: 0,
            priority: 0,
            flags: 0,
            headers: vec![("streamtype".into(), kind.into())],
        }
    }

    #[tokio::test]
    async fn replies_to_syn_stream_and_ping_and_echoes() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let session = tokio::spawn(serve(server, |mut incoming| async move {
            while let Some(mut s) = incoming.recv().await {
                tokio::spawn(async move {
                    while let Some(b) = s.data.recv().await {
                        s.sender.send(b).await.unwrap();
                    }
                    s.sender.finish().await.unwrap();
                });
            }
        }));
        let mut peer = Peer {
            io: client,
            codec: Codec::new(),
            buf: BytesMut::new(),
        };
        peer.send(syn(1, "data")).await;
        assert_eq!(
            peer.recv().await,
            Some(Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Vec::new()
            })
        );
        peer.send(Frame::Ping { id: 5 }).await;
        assert_eq!(peer.recv().await, Some(Frame::Ping { id: 5 }));
        let payload = Bytes::from(vec![7u8; 100_000]);
        peer.send(Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: payload.clone(),
        })
        .await;
        let mut echoed = Vec::new();
        let mut window_updates = 0;
        loop {
            match peer.recv().await.unwrap() {
                Frame::Data {
                    stream_id: 1,
                    flags,
                    data,
                } => {
                    assert!(data.len() <= MAX_DATA_FRAME);
                    echoed.extend_from_slice(&data);
                    if flags & FLAG_FIN != 0 {
                        break;
                    }
                }
                Frame::WindowUpdate { .. } => window_updates += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(echoed, payload);
        // A FIN'd stream gets no WINDOW_UPDATE; the session window is only updated for 3.1 peers.
        assert_eq!(window_updates, 0);
        // Data after FIN is refused.
        peer.send(Frame::Data {
            stream_id: 1,
            flags: 0,
            data: Bytes::from_static(b"x"),
        })
        .await;
        assert_eq!(
            peer.recv().await,
            Some(Frame::RstStream {
                stream_id: 1,
                status: rst::STREAM_ALREADY_CLOSED
            })
        );
        drop(peer);
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn acknowledges_consumed_data_and_drops_sends_after_peer_reset() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (got_tx, mut got_rx) = mpsc::channel::<StreamSender>(1);
        let _session = tokio::spawn(serve(server, move |mut incoming| async move {
            while let Some(mut s) = incoming.recv().await {
                got_tx.send(s.sender.clone()).await.unwrap();
                tokio::spawn(async move { while s.data.recv().await.is_some() {} });
            }
        }));
        let mut peer = Peer {
            io: client,
            codec: Codec::new(),
            buf: BytesMut::new(),
        };
        peer.send(syn(3, "stdin")).await;
        assert!(matches!(
            peer.recv().await,
            Some(Frame::SynReply { stream_id: 3, .. })
        ));
        let sender = got_rx.recv().await.unwrap();
        peer.send(Frame::WindowUpdate {
            stream_id: 0,
            delta: 1,
        })
        .await;
        peer.send(Frame::Data {
            stream_id: 3,
            flags: 0,
            data: Bytes::from(vec![1u8; 40_000]),
        })
        .await;
        let mut updates = Vec::new();
        while updates.len() < 2 {
            match peer.recv().await.unwrap() {
                Frame::WindowUpdate { stream_id, delta } => updates.push((stream_id, delta)),
                other => panic!("unexpected {other:?}"),
            }
        }
        updates.sort_unstable();
        assert_eq!(updates, vec![(0, 40_000), (3, 40_000)]);
        peer.send(Frame::RstStream {
            stream_id: 3,
            status: rst::CANCEL,
        })
        .await;
        // A ping round trip orders the reset before the send below.
        peer.send(Frame::Ping { id: 1 }).await;
        assert_eq!(peer.recv().await, Some(Frame::Ping { id: 1 }));
        sender.send(Bytes::from_static(b"dropped")).await.unwrap();
        peer.send(Frame::Ping { id: 3 }).await;
        assert_eq!(peer.recv().await, Some(Frame::Ping { id: 3 }));
        // Unknown stream.
        peer.send(Frame::Data {
            stream_id: 9,
            flags: 0,
            data: Bytes::from_static(b"?"),
        })
        .await;
        assert_eq!(
            peer.recv().await,
            Some(Frame::RstStream {
                stream_id: 9,
                status: rst::INVALID_STREAM
            })
        );
    }

    #[tokio::test]
    async fn garbage_ends_the_session_with_goaway() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let session = tokio::spawn(serve(server, |mut incoming| async move {
            while incoming.recv().await.is_some() {}
        }));
        client
            .write_all(&[0x80, 0x02, 0, 1, 0, 0, 0, 0])
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let mut codec = Codec::new();
        loop {
            if let Some(f) = codec.decode(&mut buf).unwrap() {
                assert!(matches!(f, Frame::GoAway { status: 1, .. }));
                break;
            }
            assert_ne!(client.read_buf(&mut buf).await.unwrap(), 0);
        }
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .unwrap()
            .unwrap();
    }
}
