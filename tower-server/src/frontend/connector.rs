//! How the frontend's connection pool reaches a cluster: one tunnel stream per pooled
//! connection, under an authority that names the target, the tunnel and the cluster.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Uri, header};
use hyper_util::rt::TokioIo;
use tower_proto::Preamble;
use tower_tunnel::TunnelStream;

use crate::metrics::Metrics;
use crate::registry::Registry;

/// Where the frontend sends a tunnel's requests for one target: the authority of their
/// URIs ([`pool_authority`]) and the same as a `Host` header.
#[derive(Debug, Clone)]
pub(crate) struct PoolAddress {
    pub(crate) authority: http::uri::Authority,
    pub(crate) host: header::HeaderValue,
}

impl PoolAddress {
    pub(crate) fn new(target: &str, tunnel: u64, cluster: &str) -> Option<PoolAddress> {
        let authority = pool_authority(target, tunnel, cluster).ok()?;
        let host = header::HeaderValue::from_str(authority.as_str()).ok()?;
        Some(PoolAddress { authority, host })
    }
}

/// The authority `{target}.{tunnel}.{cluster}` of the URIs the frontend sends a tunnel's
/// requests to: it keys the connection pool. With the tunnel's id in it, requests routed
/// after an agent redialed take streams of the new tunnel, never idle ones pooled on the
/// old (which may be a dead link the server has not noticed yet).
pub(crate) fn pool_authority(
    target: &str,
    tunnel: u64,
    cluster: &str,
) -> Result<http::uri::Authority, http::uri::InvalidUri> {
    http::uri::Authority::try_from(format!("{target}.{tunnel}.{cluster}"))
}

/// Counts a request in flight until dropped.
pub(super) struct InFlight(Arc<Metrics>);

impl InFlight {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        metrics.in_flight.inc();
        InFlight(metrics)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Opens a tunnel stream per pooled connection; `http://{target}.{tunnel}.{cluster}/`.
#[derive(Clone)]
pub(crate) struct TunnelConnector {
    pub(super) registry: Arc<Registry>,
    pub(super) server_id: Arc<str>,
    pub(super) metrics: Arc<Metrics>,
}

type ConnectError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TunnelConnector {
    type Response = TunnelConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TunnelConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("upstream URI without a host")?;
            // `{target}.{tunnel}.{cluster}` (see `pool_authority`): the tunnel id
            // only keys the pool; a new connection takes the cluster's tunnel of now.
            let (target, cluster) = host
                .split_once('.')
                .and_then(|(target, rest)| Some((target, rest.split_once('.')?.1)))
                .ok_or("upstream URI without a target and a tunnel")?;
            let tunnel = this
                .registry
                .tunnel(cluster)
                .map_err(|_| format!("cluster {cluster:?} has no agent connected"))?;
            let mut stream = tunnel.session.open_stream().await?;
            stream
                .write_preamble(&Preamble::http(target, &*this.server_id))
                .await?;
            this.metrics.streams.inc();
            Ok(TunnelConn {
                io: TokioIo::new(stream),
                metrics: this.metrics.clone(),
            })
        })
    }
}

/// A pooled connection: one tunnel stream.
///
/// Not vectored, though the stream is: what the server writes into the tunnel is request
/// heads (and the rare upload), which hyper's copy into one buffer costs less than its
/// queue of buffers does (counts.sh: +289 instructions per small request with it, and
/// nothing for downloads, whose bytes go the other way; the agent's responses are
/// vectored, `tower_agent::pace::PacedIo`).
pub(crate) struct TunnelConn {
    io: TokioIo<TunnelStream>,
    metrics: Arc<Metrics>,
}

impl Drop for TunnelConn {
    fn drop(&mut self) {
        self.metrics.streams.dec();
    }
}

impl hyper::rt::Read for TunnelConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
