//! The agent's own HTTP listener: `/healthz` (alive), `/readyz` (a tunnel is up) and
//! `/metrics` ([`crate::metrics`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the admin endpoints on `listener` until `shutdown`; ready while `up` > 0.
pub(crate) async fn serve_admin(
    listener: TcpListener,
    up: Arc<AtomicUsize>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (up, metrics) = (up.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let ready = up.load(Ordering::SeqCst) > 0;
                let scraped = (req.uri().path() == "/metrics")
                    .then(|| crate::metrics::response(&metrics, &up));
                async move {
                    if let Some(response) = scraped {
                        return Ok::<_, Infallible>(response);
                    }
                    let (code, body) = match req.uri().path() {
                        "/healthz" | "/livez" => (StatusCode::OK, "ok\n"),
                        "/readyz" if ready => (StatusCode::OK, "ok: tunnel up\n"),
                        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "tunnel down\n"),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "endpoints: /healthz /readyz /metrics\n",
                        ),
                    };
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *response.status_mut() = code;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
