//! The control stream: keepalive with a pong deadline, drain and server info.
//!
//! The server opens one control stream per tunnel right after the handshake. Both sides
//! then run [`run`]: every `interval` each sends a ping and expects the pong within
//! `timeout`; a missed pong ends the loop with [`TunnelError::Timeout`], and the caller
//! closes the tunnel. A half-open link (blackholed, frozen peer, a load balancer that
//! silently dropped the flow) is so noticed within `interval + timeout`.

use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tower_proto::ControlMessage;

use crate::{TunnelError, TunnelStream};

/// Keepalive timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// How often to ping.
    pub interval: Duration,
    /// How long a pong may take.
    pub timeout: Duration,
}

impl Keepalive {
    /// The shortest and longest `--keepalive` the binaries take: below the least, pings
    /// would be most of a tunnel's traffic; above the most, a dead link would go unnoticed
    /// for hours (and deadlines computed from it could overflow).
    pub const FLAG_RANGE: std::ops::RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(3600);

    /// Pings every `interval`, allowing each pong as long again (at least 2 s).
    pub fn new(interval: Duration) -> Self {
        Keepalive {
            interval,
            timeout: interval.max(Duration::from_secs(2)),
        }
    }

    /// [`Keepalive::new`] for a `--keepalive` flag, which must be in [`Keepalive::FLAG_RANGE`].
    pub fn from_flag(interval: Duration) -> Result<Self, String> {
        if Self::FLAG_RANGE.contains(&interval) {
            Ok(Keepalive::new(interval))
        } else {
            Err(format!(
                "--keepalive must be between 100ms and 1h (got {interval:?})"
            ))
        }
    }

    /// This keepalive, pinging no less often than `interval` (a peer's wish): the pong
    /// deadline shrinks with it, so a dead link is noticed within two of the rounds that
    /// actually run.
    pub fn at_most(self, interval: Duration) -> Self {
        if interval >= self.interval {
            return self;
        }
        Keepalive {
            interval,
            timeout: self.timeout.min(Keepalive::new(interval).timeout),
        }
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive::new(Duration::from_secs(10))
    }
}

/// What the control stream knows of the link: when the peer last answered a ping, and
/// the round trip of this side's last own ping. Shared with whoever asks whether the
/// link is alive ([`LinkHealth::answers`]).
#[derive(Debug, Default)]
pub struct LinkHealth {
    seen: Mutex<Seen>,
    pong: Notify,
}

#[derive(Debug, Default)]
struct Seen {
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
}

impl LinkHealth {
    /// The round trip of the last keepalive ping this side sent, once one was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).rtt
    }

    fn pong_seen(&self, rtt: Option<Duration>) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.last_pong = Some(Instant::now());
            if rtt.is_some() {
                seen.rtt = rtt;
            }
        }
        self.pong.notify_waiters();
    }

    /// Sends a ping through `control` (the [`run`] loop's outgoing channel) and waits up
    /// to `within` for a pong: whether the peer is alive and reading its control stream
    /// now, not just at the last keepalive round.
    pub async fn answers(&self, control: &mpsc::Sender<ControlMessage>, within: Duration) -> bool {
        let asked = Instant::now();
        let answered = || {
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last_pong
                .is_some_and(|at| at >= asked)
        };
        if control
            .try_send(ControlMessage::Ping {
                nonce: rand::random(),
            })
            .is_err()
        {
            return false;
        }
        let deadline = asked + within;
        loop {
            let notified = self.pong.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if answered() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return answered();
            }
        }
    }
}

/// Runs the control stream until it ends, a pong is late, or the peer breaks protocol.
///
/// Messages on `outgoing` are sent to the peer; every message from the peer other than
/// ping and pong goes to `events`. Returns `Ok` when the peer closes the stream cleanly.
/// Every pong is recorded in `health`.
pub async fn run(
    stream: TunnelStream,
    keepalive: Keepalive,
    mut outgoing: mpsc::Receiver<ControlMessage>,
    events: mpsc::Sender<ControlMessage>,
    health: &LinkHealth,
) -> Result<(), TunnelError> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut ticker = tokio::time::interval(keepalive.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.reset(); // the first ping after one interval, not at once
    let mut buf = BytesMut::with_capacity(256);
    let mut out = BytesMut::with_capacity(64);
    let mut nonce: u64 = rand::random();
    let mut awaiting: Option<(u64, Instant)> = None;
    let mut outgoing_open = true;
    loop {
        let deadline = awaiting.map(|(_, sent)| sent + keepalive.timeout);
        tokio::select! {
            read = reader.read_buf(&mut buf) => {
                let n = read.map_err(|e| TunnelError::io("reading control stream", e))?;
                if n == 0 {
                    return Ok(());
                }
                while let Some(message) = ControlMessage::decode(&mut buf)
                    .map_err(|e| TunnelError::Protocol(format!("control stream: {e}")))?
                {
                    match message {
                        ControlMessage::Ping { nonce } => {
                            ControlMessage::Pong { nonce }.encode(&mut out).map_err(protocol)?;
                        }
                        ControlMessage::Pong { nonce } => {
                            let ours = awaiting.filter(|(want, _)| *want == nonce);
                            if ours.is_some() {
                                awaiting = None;
                            }
                            health.pong_seen(ours.map(|(_, sent)| sent.elapsed()));
                        }
                        ControlMessage::Unknown { kind } => {
                            tracing::debug!(kind, "skipping unknown control message");
                        }
                        other => {
                            let _ = events.send(other).await;
                        }
                    }
                }
            }
            _ = ticker.tick(), if awaiting.is_none() => {
                nonce = nonce.wrapping_add(1);
                ControlMessage::Ping { nonce }.encode(&mut out).map_err(protocol)?;
                awaiting = Some((nonce, Instant::now()));
            }
            () = sleep_until(deadline) => {
                return Err(TunnelError::Timeout("no pong within the keepalive deadline"));
            }
            message = outgoing.recv(), if outgoing_open => match message {
                Some(message) => message.encode(&mut out).map_err(protocol)?,
                None => outgoing_open = false,
            },
        }
        if !out.is_empty() {
            let budget = keepalive.timeout;
            tokio::time::timeout(budget, writer.write_all(&out))
                .await
                .map_err(|_| TunnelError::Timeout("control stream write stalled"))?
                .map_err(|e| TunnelError::io("writing control stream", e))?;
            out.clear();
        }
    }
}

fn protocol(e: tower_proto::DecodeError) -> TunnelError {
    TunnelError::Protocol(e.to_string())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::session::{self, Role, SessionConfig};

    #[test]
    fn a_peer_asking_for_more_pings_shortens_the_pong_deadline_too() {
        let secs = Duration::from_secs;
        // --keepalive 5m against a server pinging every 10 s: a dead link is noticed
        // within 20 s, not 5 minutes and 10 s.
        let five_minutes = Keepalive::new(secs(300));
        assert_eq!(
            five_minutes.at_most(secs(10)),
            Keepalive {
                interval: secs(10),
                timeout: secs(10)
            }
        );
        // A peer asking for fewer pings changes nothing.
        assert_eq!(
            Keepalive::new(secs(10)).at_most(secs(60)),
            Keepalive::new(secs(10))
        );
        // A deadline set shorter than the new interval's is kept.
        let tight = Keepalive {
            interval: secs(30),
            timeout: secs(1),
        };
        assert_eq!(
            tight.at_most(secs(5)),
            Keepalive {
                interval: secs(5),
                timeout: secs(1)
            }
        );
    }

    #[test]
    fn the_keepalive_flag_is_bounded() {
        assert_eq!(
            Keepalive::from_flag(Duration::from_secs(10)),
            Ok(Keepalive::new(Duration::from_secs(10)))
        );
        assert!(Keepalive::from_flag(Duration::from_millis(100)).is_ok());
        assert!(Keepalive::from_flag(Duration::from_secs(3600)).is_ok());
        for bad in [
            Duration::from_millis(99),
            Duration::from_secs(3601),
            Duration::MAX,
        ] {
            let err = Keepalive::from_flag(bad).unwrap_err();
            assert!(
                err.contains("--keepalive must be between 100ms and 1h"),
                "{err}"
            );
        }
    }

    async fn control_pair() -> (TunnelStream, TunnelStream, Vec<session::SessionHandle>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let config = SessionConfig::default();
        let (server, _, sd) = session::start(a, Role::Server, &config);
        let (agent, mut inbound, ad) = session::start(b, Role::Agent, &config);
        tokio::spawn(sd.run());
        tokio::spawn(ad.run());
        let mut s = server.open_stream().await.unwrap();
        s.write_all(&[0]).await.unwrap(); // make the stream known to the peer
        let mut a = inbound.recv().await.unwrap();
        let mut one = [0u8; 1];
        a.read_exact(&mut one).await.unwrap();
        (s, a, vec![server, agent])
    }

    #[tokio::test(start_paused = true)]
    async fn live_peers_keep_pinging_and_deliver_drain() {
        let (s, a, _handles) = control_pair().await;
        let ka = Keepalive::new(Duration::from_secs(5));
        let (to_agent, server_out) = mpsc::channel(4);
        let (_keep, agent_out) = mpsc::channel(4);
        let (server_events, _se) = mpsc::channel(4);
        let (agent_events, mut ae) = mpsc::channel(4);
        let server = tokio::spawn(async move {
            run(s, ka, server_out, server_events, &LinkHealth::default()).await
        });
        let agent = tokio::spawn(async move {
            run(a, ka, agent_out, agent_events, &LinkHealth::default()).await
        });
        // A minute of pings both ways: nobody times out.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!server.is_finished() && !agent.is_finished());
        to_agent
            .send(ControlMessage::Drain { grace_ms: 1000 })
            .await
            .unwrap();
        assert_eq!(
            ae.recv().await,
            Some(ControlMessage::Drain { grace_ms: 1000 })
        );
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_detected_within_interval_plus_timeout() {
        let (s, _silent_agent, _handles) = control_pair().await;
        let ka = Keepalive {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
        };
        let (_out_tx, out) = mpsc::channel(1);
        let (events, _rx) = mpsc::channel(1);
        let started = Instant::now();
        let result = run(s, ka, out, events, &LinkHealth::default()).await;
        assert!(matches!(result, Err(TunnelError::Timeout(_))), "{result:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(8));
    }
}
