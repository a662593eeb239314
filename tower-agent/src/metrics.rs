//! The agent's Prometheus metrics, served at `/metrics` on its admin listener.
//!
//! - `tower_agent_tunnels`: tunnels up now (with their control stream open).
//! - `tower_agent_tunnel_dial_failures_total{reason}`: dials that did not give a tunnel:
//!   the server's refusal (`bad_token`, `forbidden`, `conflict`, …) or `error` (network,
//!   TLS, proxy).
//! - `tower_agent_upstream_request_duration_seconds{target,code_class}`: requests to an
//!   upstream (kube-apiserver, ks-apiserver), until its response head.
//! - `tower_agent_upstream_failures_total{target}`: requests the upstream did not answer.
//! - `tower_agent_requests_refused_total{reason}`: requests the agent refused itself
//!   (`bad_identity`, `no_identity_key`, `pass_through`, `impersonation`,
//!   `unknown_target`, `bad_request`).
//!
//! Targets are labels only once the agent serves them (its allowlist), so the set of
//! series is fixed by its flags. Counting a request takes a read lock and a histogram
//! observation; nothing is allocated after a target's first request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower_proto::handshake::Refusal;

/// Upper bounds (seconds) of the upstream latency histogram (as the server's).
const DURATION_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why the agent refused a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The server's identity assertion did not verify.
    BadIdentity,
    /// The agent has no key to verify identity assertions with (yet).
    NoIdentityKey,
    /// A pass-through credential on an agent whose own credential would replace it.
    PassThrough,
    /// `Impersonate-*` headers (`kubectl --as`).
    Impersonation,
    /// A target not on the allowlist.
    UnknownTarget,
    /// A request that cannot be forwarded (a path, a user name unfit for a header).
    BadRequest,
}

impl Refused {
    fn as_str(self) -> &'static str {
        match self {
            Refused::BadIdentity => "bad_identity",
            Refused::NoIdentityKey => "no_identity_key",
            Refused::PassThrough => "pass_through",
            Refused::Impersonation => "impersonation",
            Refused::UnknownTarget => "unknown_target",
            Refused::BadRequest => "bad_request",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetClassLabels {
    target: String,
    code_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

/// One target's handles, made on its first request.
#[derive(Debug)]
struct TargetMetrics {
    name: String,
    durations: [Histogram; 5],
    failures: Counter,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tunnels: Gauge,
    dial_failures: Family<ReasonLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    upstream: Family<TargetClassLabels, Histogram>,
    failures: Family<TargetLabels, Counter>,
    targets: RwLock<Vec<TargetMetrics>>,
    /// Tunnels up now (readiness; what `tunnels` shows when encoded). Agents that share
    /// one `Metrics` (the bench runs thousands in one process) share the count.
    pub(crate) up: Arc<AtomicUsize>,
    /// Every dial that gave no tunnel, whatever the reason.
    dials_failed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let tunnels = Gauge::default();
        let dial_failures = Family::<ReasonLabels, Counter>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        let upstream = Family::<TargetClassLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BOUNDS)) as fn() -> Histogram,
        );
        let failures = Family::<TargetLabels, Counter>::default();
        let r = registry.sub_registry_with_prefix("tower_agent");
        r.register(
            "tunnels",
            "Tunnels up now (control stream open), one per server replica",
            tunnels.clone(),
        );
        r.register(
            "tunnel_dial_failures",
            "Dials that gave no tunnel, by the server's refusal or `error` (network, TLS, proxy)",
            dial_failures.clone(),
        );
        r.register(
            "requests_refused",
            "Requests the agent refused itself, by reason",
            refused.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Requests to an upstream by target and status class, until the response head",
            upstream.clone(),
        );
        r.register(
            "upstream_failures",
            "Requests the upstream did not answer (connection refused, TLS, reset), by target",
            failures.clone(),
        );
        Metrics {
            registry,
            tunnels,
            dial_failures,
            refused,
            upstream: upstream.clone(),
            failures,
            targets: RwLock::new(Vec::new()),
            up: Arc::default(),
            dials_failed: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts a request the agent refused.
    pub fn refused(&self, why: Refused) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    /// Counts a dial that gave no tunnel: `refusal` is the server's (its 409 kind, or
    /// what its status stands for), `None` a failure before any answer.
    pub fn dial_failed(&self, status: Option<u16>, refusal: Option<&str>) {
        let reason = match (status, refusal) {
            (None, _) => "error",
            (Some(_), Some(said)) => [Refusal::Conflict, Refusal::Duplicate]
                .into_iter()
                .find(|r| r.as_str() == said)
                .map_or("other", Refusal::as_str),
            (Some(status), None) => Refusal::from_status(status).map_or("other", Refusal::as_str),
        };
        self.dial_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.dials_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Tunnels up now, across every agent that shares these metrics.
    pub fn tunnels_up(&self) -> usize {
        self.up.load(Ordering::SeqCst)
    }

    /// Dials that gave no tunnel so far, whatever the reason.
    pub fn dials_failed(&self) -> u64 {
        self.dials_failed.load(Ordering::Relaxed)
    }

    /// Counts a dial that failed with `error`.
    pub fn dial_error(&self, error: &tower_tunnel::TunnelError) {
        match error {
            tower_tunnel::TunnelError::Refused {
                status, refusal, ..
            } => self.dial_failed(Some(*status), refusal.as_deref()),
            _ => self.dial_failed(None, None),
        }
    }

    /// Records a request to `target` answered `code` after `took`, or not answered
    /// (`None`). `target` is one the agent serves (checked before the request is sent).
    pub fn upstream(&self, target: &str, code: Option<u16>, took: Duration) {
        let record = |t: &TargetMetrics| match code {
            Some(code) => {
                t.durations[usize::from(code / 100).clamp(1, 5) - 1].observe(took.as_secs_f64())
            }
            None => {
                t.failures.inc();
            }
        };
        {
            let targets = self.targets.read().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = targets.iter().find(|t| t.name == target) {
                record(t);
                return;
            }
        }
        let mut targets = self.targets.write().unwrap_or_else(|e| e.into_inner());
        if !targets.iter().any(|t| t.name == target) {
            targets.push(TargetMetrics {
                name: target.to_owned(),
                durations: STATUS_CLASSES.map(|code_class| {
                    self.upstream
                        .get_or_create(&TargetClassLabels {
                            target: target.to_owned(),
                            code_class,
                        })
                        .clone()
                }),
                failures: self
                    .failures
                    .get_or_create(&TargetLabels {
                        target: target.to_owned(),
                    })
                    .clone(),
            });
        }
        if let Some(t) = targets.iter().find(|t| t.name == target) {
            record(t);
        }
    }

    /// The metrics in the OpenMetrics text format, with `tunnels` up now.
    pub fn encode(&self, tunnels: &AtomicUsize) -> String {
        self.tunnels
            .set(i64::try_from(tunnels.load(Ordering::SeqCst)).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The `/metrics` answer.
pub(crate) fn response(
    metrics: &Arc<Metrics>,
    tunnels: &AtomicUsize,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut response = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
        metrics.encode(tunnels),
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_by_bounded_labels() {
        let m = Metrics::default();
        m.upstream("kubernetes", Some(200), Duration::from_millis(3));
        m.upstream("kubernetes", Some(503), Duration::from_millis(300));
        m.upstream("kubernetes", None, Duration::from_millis(1));
        m.refused(Refused::Impersonation);
        m.dial_failed(Some(409), Some("conflict"));
        m.dial_failed(Some(401), None);
        m.dial_failed(Some(409), Some("made-up\nby a proxy"));
        m.dial_failed(None, None);
        let text = m.encode(&AtomicUsize::new(2));
        for line in [
            "tower_agent_tunnels 2",
            "tower_agent_upstream_request_duration_seconds_count{target=\"kubernetes\",code_class=\"2xx\"} 1",
            "tower_agent_upstream_request_duration_seconds_count{target=\"kubernetes\",code_class=\"5xx\"} 1",
            "tower_agent_upstream_request_duration_seconds_bucket{le=\"0.005\",target=\"kubernetes\",code_class=\"2xx\"} 1",
            "tower_agent_upstream_failures_total{target=\"kubernetes\"} 1",
            "tower_agent_requests_refused_total{reason=\"impersonation\"} 1",
            "tower_agent_tunnel_dial_failures_total{reason=\"conflict\"} 1",
            "tower_agent_tunnel_dial_failures_total{reason=\"bad_token\"} 1",
            "tower_agent_tunnel_dial_failures_total{reason=\"other\"} 1",
            "tower_agent_tunnel_dial_failures_total{reason=\"error\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        // Every class of a served target exists from its first request on, at zero.
        assert!(text.contains("code_class=\"4xx\"} 0"));
    }
}
