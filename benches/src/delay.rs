//! A WAN on loopback: a TCP relay that holds every chunk it reads for a fixed one-way
//! delay before writing it on, in both directions, optionally paced to a link rate.
//!
//! The machine has no netem (and the bench no `CAP_NET_ADMIN`), so B8 puts a
//! [`DelayRelay`] between tower-agent and tower-server, and another with the same
//! [`Link`] between the direct client and the upstream.
//!
//! Each direction of a connection is a reader and a writer joined by a queue of
//! timestamped chunks: the reader stamps a chunk with the time it is due at the far end
//! and goes on reading, the writer sleeps until a chunk is due and writes it. So the relay
//! is pipelined: a link of one-way delay D and rate R holds R × D bytes in flight, as a
//! real one does, instead of one chunk per delay.
//!
//! What it models, per [`Link`]:
//! - **propagation**: every byte arrives `one_way` after the relay read it;
//! - **a bottleneck** of `rate` bits per second in each direction, shared by all the
//!   relay's connections (one link, not one per connection): a chunk is sent once the
//!   chunks scheduled before it are, and arrives `one_way` after its last byte was sent;
//! - **the bottleneck's queue**, at most [`Link::queue`] of sending time: while it is
//!   full the relay reads nothing more, and the sender's TCP backs up (backpressure
//!   where a router would drop);
//! - **TCP's handshake**: a connection's first bytes toward the target are read a round
//!   trip after the relay accepted it, as a client's first bytes leave only once the
//!   SYN-ACK came back; a refused connection is closed a round trip after it was accepted.
//!
//! Not modelled: loss, reordering, and TCP's own congestion control over the delay (the
//! endpoints' TCP sees loopback: the relay's queue is the only window they meet).
//!
//! The relay's sockets keep a small receive buffer ([`RECEIVE_BUFFER`]): the bytes it
//! has not taken yet wait in the sender's socket, as they would on a real link.
//!
//! Memory is bounded: each direction of a connection holds at most [`Link::buffer`]
//! bytes (with a rate, what the link can carry in `one_way` plus its queue).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The most the relay reads at once.
const CHUNK: usize = 64 * 1024;

/// What one direction of a connection may hold without a rate (with one, the link's
/// rate bounds it): 16 MiB, enough for 1.3 Gbit/s over 100 ms one way.
const UNPACED_BUFFER: usize = 16 << 20;

/// The kernel's receive buffer of the relay's sockets (which it doubles). What the relay
/// has not read yet waits in the sender's socket, as unacknowledged bytes do on a real
/// link: left to autotune on loopback, this buffer grew to 3.7 MB during B8's tunnel
/// download, a queue no real link has.
const RECEIVE_BUFFER: u32 = 128 * 1024;

/// The bottleneck's queue unless told otherwise: shallow, as in a router that keeps
/// latency low, yet several of the relay's timer ticks (1 ms) deep, so a reader that
/// wakes late does not leave the link idle.
const DEFAULT_QUEUE: Duration = Duration::from_millis(10);

/// A WAN link: the same in both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Link {
    /// How long every byte takes to cross, each way.
    pub(crate) one_way: Duration,
    /// The bottleneck's rate in bits per second, each way; `None`: no bottleneck.
    pub(crate) rate: Option<u64>,
    /// The most sending time queued before the bottleneck.
    pub(crate) queue: Duration,
}

impl Link {
    /// A link with round-trip time `rtt` (half of it each way) and `rate` bits per second.
    pub(crate) fn new(rtt: Duration, rate: Option<u64>) -> Link {
        Link {
            one_way: rtt / 2,
            rate,
            queue: DEFAULT_QUEUE,
        }
    }

    /// The round-trip time of an idle link.
    pub(crate) fn rtt(&self) -> Duration {
        self.one_way * 2
    }

    /// Bytes per second, if it has a rate.
    fn bytes_per_second(&self) -> Option<f64> {
        self.rate.map(|bits| bits as f64 / 8.0)
    }

    /// The bandwidth-delay product (bytes), if it has a rate.
    pub(crate) fn bdp(&self) -> Option<u64> {
        self.bytes_per_second()
            .map(|rate| (rate * self.rtt().as_secs_f64()) as u64)
    }

    /// The most one direction of one connection holds: what the link carries in
    /// `one_way` plus its queue (two chunks besides), or [`UNPACED_BUFFER`].
    pub(crate) fn buffer(&self) -> usize {
        match self.bytes_per_second() {
            Some(rate) => (rate * (self.one_way + self.queue).as_secs_f64()) as usize + 2 * CHUNK,
            None => UNPACED_BUFFER,
        }
    }

    /// "50 ms RTT, 400 Mbit/s", as the table names it.
    pub(crate) fn describe(&self) -> String {
        let rtt = format!("{:.0} ms RTT", self.rtt().as_secs_f64() * 1e3);
        match self.rate {
            Some(bits) if bits % 1_000_000_000 == 0 => {
                format!("{rtt}, {} Gbit/s", bits / 1_000_000_000)
            }
            Some(bits) => format!("{rtt}, {} Mbit/s", bits / 1_000_000),
            None => rtt,
        }
    }
}

/// One direction of a link: its bottleneck, shared by every connection of the relay.
#[derive(Debug)]
struct Wire {
    link: Link,
    /// When the bottleneck will have sent everything scheduled so far.
    free_at: Mutex<Instant>,
}

impl Wire {
    fn new(link: Link) -> Wire {
        Wire {
            link,
            free_at: Mutex::new(Instant::now()),
        }
    }

    fn free_at(&self) -> std::sync::MutexGuard<'_, Instant> {
        // A poisoned lock still holds a valid instant.
        self.free_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules `n` bytes read at `now`; returns when they reach the far end.
    fn schedule(&self, now: Instant, n: usize) -> Instant {
        let Some(rate) = self.link.bytes_per_second() else {
            return now + self.link.one_way;
        };
        let mut free_at = self.free_at();
        let start = (*free_at).max(now);
        *free_at = start + Duration::from_secs_f64(n as f64 / rate);
        *free_at + self.link.one_way
    }

    /// How long until the bottleneck's queue has room (zero if it has).
    fn wait_for_room(&self, now: Instant) -> Duration {
        if self.link.rate.is_none() {
            return Duration::ZERO;
        }
        self.free_at()
            .saturating_duration_since(now)
            .saturating_sub(self.link.queue)
    }
}

/// A running relay: every connection to [`DelayRelay::addr`] is relayed to its target
/// over a [`Link`]. Dropping it stops it and closes every connection.
pub(crate) struct DelayRelay {
    /// Where clients connect (127.0.0.1, a port the kernel chose).
    pub(crate) addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayRelay {
    /// Listens on 127.0.0.1:0 and relays every connection to `target` over `link`, on a
    /// thread (and runtime) of its own, so the clients' work never delays its timers.
    pub(crate) fn start(target: SocketAddr, link: Link) -> std::io::Result<DelayRelay> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("delay-relay".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match listen() {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = bound_tx.send(listener.local_addr());
                    // Toward the target, toward the client.
                    let wires = [Arc::new(Wire::new(link)), Arc::new(Wire::new(link))];
                    loop {
                        tokio::select! {
                            () = stopped.cancelled() => break,
                            accepted = listener.accept() => {
                                if let Ok((client, _)) = accepted {
                                    tokio::spawn(relay(client, target, wires.clone()));
                                }
                            }
                        }
                    }
                });
                // Dropping the runtime drops every connection's task, and its sockets.
            })?;
        let mut relay = DelayRelay {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stop,
            thread: Some(thread),
        };
        relay.addr = bound
            .recv()
            .map_err(|_| std::io::Error::other("the relay's thread ended"))??;
        Ok(relay)
    }
}

/// A socket with a receive buffer of [`RECEIVE_BUFFER`].
fn socket() -> std::io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
    Ok(socket)
}

/// The relay's listener on 127.0.0.1:0 (its connections inherit its receive buffer).
fn listen() -> std::io::Result<TcpListener> {
    let socket = socket()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(1024)
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Relays one accepted connection to `target`.
async fn relay(client: TcpStream, target: SocketAddr, [forward, backward]: [Arc<Wire>; 2]) {
    let accepted = Instant::now();
    // The client's first bytes could leave only once its handshake's round trip was over.
    let handshake_over = accepted + forward.link.rtt();
    let connected = match socket() {
        Ok(socket) => socket.connect(target).await,
        Err(e) => Err(e),
    };
    let Ok(upstream) = connected else {
        // Refused: the client learns it a round trip later, as it would from a RST.
        tokio::time::sleep_until(handshake_over).await;
        return;
    };
    for socket in [&client, &upstream] {
        let _ = socket.set_nodelay(true);
    }
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    // A reset on either side ends both directions (once it has crossed the link).
    let broken = CancellationToken::new();
    tokio::join!(
        pipe(
            client_read,
            upstream_write,
            forward,
            handshake_over,
            broken.clone()
        ),
        pipe(upstream_read, client_write, backward, accepted, broken),
    );
}

/// What crosses one direction of a connection.
enum Chunk {
    Data(Bytes),
    /// The sender closed its side cleanly: shut down ours.
    End,
    /// Reading failed (a reset): close the connection.
    Broken,
}

/// One direction of a connection: reads from `from` (from `start` on) and writes each
/// chunk to `to` when `wire` says it arrives.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    wire: Arc<Wire>,
    start: Instant,
    broken: CancellationToken,
) {
    let one_way = wire.link.one_way;
    // One permit per byte this direction may hold.
    let held = Semaphore::new(wire.link.buffer());
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Chunk)>();
    let reader = async {
        tokio::time::sleep_until(start).await;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let Ok(permits) = held.acquire_many(CHUNK as u32).await else {
                break;
            };
            permits.forget();
            loop {
                let wait = wire.wait_for_room(Instant::now());
                if wait.is_zero() {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
            let read = from.read(&mut buf).await;
            let now = Instant::now();
            let (due, chunk) = match read {
                Ok(0) => (now + one_way, Chunk::End),
                Ok(n) => {
                    held.add_permits(CHUNK - n);
                    // A copy the size of what was read: a queue of small reads holds
                    // what they read, not a chunk's capacity each.
                    (
                        wire.schedule(now, n),
                        Chunk::Data(Bytes::copy_from_slice(&buf[..n])),
                    )
                }
                Err(_) => (now + one_way, Chunk::Broken),
            };
            let last = !matches!(chunk, Chunk::Data(_));
            if tx.send((due, chunk)).is_err() || last {
                break;
            }
        }
    };
    let writer = async {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Chunk::Data(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        broken.cancel();
                        break;
                    }
                    held.add_permits(bytes.len());
                }
                Chunk::End => {
                    let _ = to.shutdown().await;
                    break;
                }
                Chunk::Broken => {
                    broken.cancel();
                    break;
                }
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(reader, writer) } => {}
        () = broken.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes every connection back to itself; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// `len` bytes of a pattern that repeats every 251 bytes, from `offset` on.
    fn pattern(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    /// Writes `total` bytes of the pattern in `write`-byte writes while reading the echo
    /// back whole; checks every byte and returns how long it took.
    async fn echo_through(addr: SocketAddr, total: usize, write: usize) -> Duration {
        let started = Instant::now();
        let socket = TcpStream::connect(addr).await.expect("connect");
        let (mut r, mut w) = socket.into_split();
        let sender = tokio::spawn(async move {
            let mut sent = 0;
            while sent < total {
                let n = write.min(total - sent);
                w.write_all(&pattern(sent, n)).await.expect("write");
                sent += n;
            }
            w.shutdown().await.expect("shutdown");
        });
        let mut got = Vec::with_capacity(total);
        r.read_to_end(&mut got).await.expect("read");
        sender.await.expect("sender");
        assert_eq!(got.len(), total, "the echo came back short");
        assert!(got == pattern(0, total), "the echo came back changed");
        started.elapsed()
    }

    #[tokio::test]
    async fn every_byte_crosses_both_ways_no_sooner_than_the_delay() {
        let link = Link::new(Duration::from_millis(80), None);
        let relay = DelayRelay::start(echo().await, link).expect("relay");
        let started = Instant::now();
        let mut socket = TcpStream::connect(relay.addr).await.expect("connect");
        socket.write_all(b"ping").await.expect("write");
        let mut reply = [0u8; 4];
        socket.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"ping");
        // The handshake's round trip, then the request's.
        let first = started.elapsed();
        assert!(first >= 2 * link.rtt(), "first echo after {first:?}");
        let again = Instant::now();
        socket.write_all(b"pong").await.expect("write");
        socket.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"pong");
        let second = again.elapsed();
        assert!(second >= link.rtt(), "second echo after {second:?}");
        // The relay's half-close crosses too: the echo ends once the client's side did.
        socket.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        socket
            .read_to_end(&mut rest)
            .await
            .expect("read to the end");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn chunks_are_pipelined_not_delayed_one_after_another() {
        // 8 MiB in 64 KiB writes: 128 chunks each way. One delay per chunk would take
        // 128 × 100 ms = 12.8 s; a pipelined relay takes about a round trip more than
        // the copying does.
        let link = Link::new(Duration::from_millis(100), None);
        let relay = DelayRelay::start(echo().await, link).expect("relay");
        let took = echo_through(relay.addr, 8 << 20, 64 * 1024).await;
        assert!(took >= 2 * link.rtt(), "{took:?}");
        // Below the unpipelined 12.8 s with room for a loaded machine.
        assert!(took < Duration::from_secs(10), "{took:?}: not pipelined");
    }

    #[tokio::test]
    async fn a_rate_caps_throughput_and_keeps_bytes_exact() {
        // 40 Mbit/s = 5 MB/s: 2 MB each way (the echo's way back queues behind it) takes
        // at least 0.4 s of sending, plus the handshake's and the data's round trip.
        let link = Link::new(Duration::from_millis(20), Some(40_000_000));
        let relay = DelayRelay::start(echo().await, link).expect("relay");
        let total = 2_000_000;
        let took = echo_through(relay.addr, total, 3_000).await;
        let sending = Duration::from_secs_f64(total as f64 * 8.0 / 40e6);
        assert!(took >= sending + 2 * link.rtt(), "{took:?}");
        // Generous (a loaded machine's debug build wakes the relay late): the cap, not the
        // relay's speed, is what this run met; a relay that ignored the rate would not be
        // caught here but by the lower bound above.
        assert!(took < 30 * sending, "{took:?}: far below the rate");
    }

    #[tokio::test]
    async fn the_link_is_shared_by_its_connections() {
        // Two connections at once over one 40 Mbit/s link each move 1 MB each way: the
        // link carries 2 MB each way, so neither can finish before 0.4 s of sending.
        let link = Link::new(Duration::from_millis(20), Some(40_000_000));
        let relay = DelayRelay::start(echo().await, link).expect("relay");
        let total = 1_000_000;
        let (a, b) = tokio::join!(
            echo_through(relay.addr, total, 16_384),
            echo_through(relay.addr, total, 16_384)
        );
        let both = Duration::from_secs_f64(2.0 * total as f64 * 8.0 / 40e6);
        assert!(a.max(b) >= both, "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn a_refused_connection_closes_after_a_round_trip() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = closed.local_addr().expect("addr");
        drop(closed);
        let link = Link::new(Duration::from_millis(60), None);
        let relay = DelayRelay::start(target, link).expect("relay");
        let started = Instant::now();
        let mut socket = TcpStream::connect(relay.addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let read = socket.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= link.rtt(), "{:?}", started.elapsed());
    }

    #[test]
    fn a_paced_link_holds_its_bandwidth_delay_product() {
        let link = Link::new(Duration::from_millis(100), Some(1_000_000_000));
        assert_eq!(link.bdp(), Some(12_500_000));
        // 50 ms one way and a 10 ms queue at 125 MB/s, and two chunks.
        assert_eq!(link.buffer(), 7_500_000 + 2 * CHUNK);
        assert_eq!(link.describe(), "100 ms RTT, 1 Gbit/s");
        let slow = Link::new(Duration::from_millis(50), Some(400_000_000));
        assert_eq!(slow.describe(), "50 ms RTT, 400 Mbit/s");
        assert_eq!(
            Link::new(Duration::from_millis(50), None).buffer(),
            UNPACED_BUFFER
        );
    }
}
