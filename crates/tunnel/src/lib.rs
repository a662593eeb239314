//! `tower-tunnel`: the transport between tower-agent and tower-server.
//!
//! * [`tls`]: rustls configurations — a server identity, and an agent that trusts only
//!   the CA from its manifest (a PEM or a `sha256:` pin), never "anything".
//! * [`dial`]: the agent's side of a tunnel: TCP (through an HTTP CONNECT proxy when
//!   `HTTPS_PROXY` says so), TLS, then the `GET /v1/tunnel` upgrade.
//! * [`session`]: one yamux connection driven by one task ([`session::Driver`]), used
//!   through a cloneable [`SessionHandle`].
//! * [`http`]: what both proxies share: hop-by-hop headers, upgrades, `Status` errors.
//! * [`control`]: the control stream: keepalive pings with a pong deadline, drain.
//! * [`stream`]: a yamux stream as tokio and hyper I/O, and its preamble.
//! * [`requests`]: the requests a connection (or tunnel stream) serves, and when it has
//!   served none for long.
//! * [`exchanges`]: the requests in flight on a session, which its flush goes by.
//! * [`runtime`]: the tokio runtime both binaries run on (current-thread on one CPU).
//! * [`shutdown`]: the signals (SIGTERM, SIGINT) that start either binary's drain.

#![forbid(unsafe_code)]

mod answer_first;
mod coalesce;
pub mod control;
pub mod dial;
pub mod exchanges;
mod frames;
pub mod http;
pub mod pool;
mod queued;
pub mod read_ahead;
pub mod requests;
pub mod runtime;
pub mod session;
pub mod shutdown;
pub mod stream;
pub mod tls;
pub mod watch_end;
pub mod woken;

pub use session::{SessionConfig, SessionHandle};
pub use stream::TunnelStream;

/// Errors of the tunnel layer.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS setup or handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server answered the tunnel upgrade with a refusal.
    #[error("server refused the tunnel ({status}): {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's plain-text reason.
        reason: String,
        /// Which refusal a 409 is (`tower-refusal`: `duplicate` or `conflict`), if said.
        refusal: Option<String>,
    },
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The yamux session is closed or failed.
    #[error("tunnel closed: {0}")]
    Closed(String),
    /// The tunnel carries as many streams as it may.
    #[error("tunnel has reached its limit of {0} concurrent streams")]
    StreamLimit(usize),
    /// Opening a stream waited this long: the peer has not acknowledged the streams
    /// opened before it (yamux opens no more than 256 such).
    #[error(
        "256 streams opened toward the agent are unacknowledged, and none was within {0:?}: the agent is overloaded, or older than this server and acknowledges a stream only once its upstream answers"
    )]
    Unacknowledged(std::time::Duration),
    /// A timeout expired.
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

impl TunnelError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TunnelError::Io {
            context: context.into(),
            source,
        }
    }
}
