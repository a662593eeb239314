//! HTTP/2 inside a tunnel: one yamux stream per target carries one HTTP/2 connection, and
//! requests ride on it side by side instead of each holding a stream of its own.
//!
//! An HTTP/1.1 tunnel stream costs both sides a full HTTP/1.1 codec (two 8 KiB buffers
//! and more) for as long as its request is open, which for a watch is hours. On the
//! shared HTTP/2 connection a request costs one HTTP/2 stream's state. Only agents that
//! announce [`CAPABILITY_HTTP2`](tower_proto::handshake::CAPABILITY_HTTP2) get these
//! streams; upgrades (exec, attach, port-forward) always keep a stream of their own.
//!
//! Every request takes one of the session's stream slots ([`SessionHandle::reserve`])
//! as if it had a stream of its own, so `--max-streams-per-tunnel` counts it like one;
//! the shared stream itself takes none.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::OwnedSemaphorePermit;
use tower_proto::Preamble;
use tower_proto::preamble::HTTP2_MAX_HEADER_LIST;
use tower_tunnel::SessionHandle;

use crate::metrics::Metrics;
use crate::status::BoxError;

type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// Receive window of each request's response: how far a reader that stops reading may
/// fall behind before the agent stops sending it (yamux's own stream window is 256 KiB).
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Receive window of the whole connection: as large as HTTP/2 allows, so that readers
/// that stop reading hold back only their own streams, never the others'.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// The HTTP/2 connections of one tunnel, one per target, opened when first needed.
#[derive(Debug)]
pub struct Http2Channel {
    session: SessionHandle,
    server_id: Arc<str>,
    metrics: Arc<Metrics>,
    connections: tokio::sync::Mutex<HashMap<String, SendRequest<RequestBody>>>,
}

impl Http2Channel {
    /// Channels over `session`, which must lead to an agent that serves HTTP/2 streams.
    pub(crate) fn new(session: SessionHandle, server_id: Arc<str>, metrics: Arc<Metrics>) -> Self {
        Http2Channel {
            session,
            server_id,
            metrics,
            connections: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Sends `request` to `target`; the response comes with the stream slot it holds
    /// until its body is done. `request` must carry an absolute URI and no upgrade.
    pub(crate) async fn send(
        &self,
        target: &str,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, OwnedSemaphorePermit), BoxError> {
        let slot = self.session.reserve()?;
        request.headers_mut().remove(http::header::HOST);
        *request.version_mut() = http::Version::HTTP_2;
        // A connection that ended between the lookup and the send gives the request
        // back unsent: one more try on a fresh connection.
        let mut retried = false;
        loop {
            let mut sender = self.sender(target).await?;
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, slot)),
                Err(mut refused) => match refused.take_message() {
                    Some(unsent) if !retried => {
                        request = unsent;
                        retried = true;
                    }
                    _ => return Err(refused.into_error().into()),
                },
            }
        }
    }

    /// The live connection to `target`, opened now if there is none.
    async fn sender(&self, target: &str) -> Result<SendRequest<RequestBody>, BoxError> {
        let mut connections = self.connections.lock().await;
        if let Some(sender) = connections.get(target)
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let mut stream = self.session.open_shared_stream().await?;
        stream
            .write_preamble(&Preamble::http2(target, &*self.server_id))
            .await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(HTTP2_MAX_HEADER_LIST)
            // Until the agent's settings arrive; they raise it to its own stream limit.
            .initial_max_send_streams(1024)
            .handshake(TokioIo::new(stream))
            .await?;
        let metrics = self.metrics.clone();
        metrics.streams.inc();
        let target_name = target.to_owned();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(target = %target_name, error = %e, "HTTP/2 tunnel stream ended");
            }
            metrics.streams.dec();
        });
        connections.insert(target.to_owned(), sender.clone());
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty, Full};
    use tower_proto::StreamKind;
    use tower_tunnel::session::{self, Role};
    use tower_tunnel::{SessionConfig, TunnelError};

    /// A tunnel whose agent side answers every request with the ordinal of the HTTP/2
    /// stream it came on; the first stream is cut as soon as it opens when `cut_first`.
    fn tunnel(max_streams: usize, cut_first: bool) -> SessionHandle {
        let (server_io, agent_io) = tokio::io::duplex(1 << 20);
        let config = SessionConfig {
            max_streams,
            ..SessionConfig::default()
        };
        let (server, _, driver) = session::start(server_io, Role::Server, &config);
        tokio::spawn(driver.run());
        let (_agent, mut inbound, driver) =
            session::start(agent_io, Role::Agent, &SessionConfig::default());
        tokio::spawn(driver.run());
        tokio::spawn(async move {
            let opened = AtomicUsize::new(0);
            while let Some(mut stream) = inbound.recv().await {
                let preamble = stream.read_preamble().await.unwrap();
                assert_eq!(preamble.kind, StreamKind::Http2);
                assert_eq!(preamble.target, "kubernetes");
                let n = opened.fetch_add(1, Ordering::Relaxed);
                if cut_first && n == 0 {
                    continue;
                }
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(n.to_string()))))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        server
    }

    fn get() -> Request<RequestBody> {
        Request::get("http://kubernetes.c1/api")
            .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
            .unwrap()
    }

    async fn text(response: Response<Incoming>) -> String {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn requests_share_one_stream_and_each_takes_a_slot() {
        let session = tunnel(3, false);
        let channel = Http2Channel::new(session.clone(), "s".into(), Arc::default());
        let (a, _a) = channel.send("kubernetes", get()).await.unwrap();
        let (b, _b) = channel.send("kubernetes", get()).await.unwrap();
        assert_eq!((text(a).await, text(b).await), ("0".into(), "0".into()));
        assert_eq!(
            session.open_streams(),
            2,
            "two requests; the shared stream takes none"
        );
        let (_c, c) = channel.send("kubernetes", get()).await.unwrap();
        let refused = channel.send("kubernetes", get()).await.unwrap_err();
        assert!(matches!(
            refused.downcast_ref::<TunnelError>(),
            Some(TunnelError::StreamLimit(3))
        ));
        drop(c);
        assert!(channel.send("kubernetes", get()).await.is_ok());
    }

    #[tokio::test]
    async fn a_connection_that_ended_is_replaced() {
        let channel = Http2Channel::new(tunnel(8, true), "s".into(), Arc::default());
        // The request on the cut stream fails, or is given back unsent and retried.
        let response = match channel.send("kubernetes", get()).await {
            Ok((response, _)) => response,
            Err(_) => channel.send("kubernetes", get()).await.unwrap().0,
        };
        assert_eq!(text(response).await, "1");
    }
}
