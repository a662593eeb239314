//! The admin listener (plain HTTP): `/healthz`, `/readyz`, `/metrics`, `GET /v1/clusters`.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::status::{Body, full, text};

/// Serves admin requests.
pub(crate) struct Admin {
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: MetricsRegistry,
    pub(crate) draining: CancellationToken,
}

impl Admin {
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET");
        }
        match req.uri().path() {
            "/healthz" | "/livez" => text(StatusCode::OK, "ok"),
            "/readyz" if self.draining.is_cancelled() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining")
            }
            "/readyz" => text(StatusCode::OK, "ok"),
            "/metrics" => {
                let mut out = String::new();
                if prometheus_client::encoding::text::encode(&mut out, &self.metrics).is_err() {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed");
                }
                let mut response = Response::new(full(out));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/v1/clusters" => {
                let body = serde_json::to_string_pretty(&self.registry.status())
                    .unwrap_or_else(|_| "[]".into());
                let mut response = Response::new(full(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                response
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "admin endpoints: /healthz /readyz /metrics /v1/clusters",
            ),
        }
    }
}
