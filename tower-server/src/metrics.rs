//! Prometheus metrics of the server (`/metrics` on the admin listener).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tower_proto::handshake::Refusal;

/// Labels of `tower_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status class or code ("200", "503", …).
    pub code: String,
}

/// Labels of `tower_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `request` (caller → member) or `response` (member → caller).
    pub direction: &'static str,
}

/// Every metric the server exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Tunnels open now.
    pub tunnels: Gauge,
    /// Tunnel streams open now.
    pub streams: Gauge,
    /// Frontend requests in flight.
    pub in_flight: Gauge,
    /// Frontend requests answered, by status.
    pub requests: Family<StatusLabels, Counter>,
    /// Body bytes proxied, by direction.
    pub bytes: Family<DirectionLabels, Counter>,
    /// Tunnels accepted for a cluster that had connected before.
    pub reconnects: Counter,
    /// Tunnel handshakes refused, by why.
    pub refused_tunnels: Family<RefusalLabels, Counter>,
    /// Requests turned away or cut by a limit, by which limit.
    pub limited: Family<ReasonLabels, Counter>,
    /// Tokio tasks alive in the process (set when scraped).
    pub live_tasks: Gauge,
    /// Connections open now, by listener.
    pub connections: Family<ListenerLabels, Gauge>,
    /// Connections closed as soon as accepted, by listener and limit.
    pub refused_connections: Family<ConnectionRefusalLabels, Counter>,
}

/// Labels of `tower_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `tunnel`, `frontend` or `admin`.
    pub listener: &'static str,
}

/// Labels of `tower_connections_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionRefusalLabels {
    /// `tunnel`, `frontend` or `admin`.
    pub listener: &'static str,
    /// `listener_limit` (`--max-…-connections`) or `source_limit`
    /// (`--max-connections-per-source`).
    pub reason: &'static str,
}

/// Labels of `tower_tunnel_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `bad_request`, `bad_token`, `forbidden`, `unknown_cluster`, `unsupported_version`,
    /// `draining` or `duplicate`.
    pub reason: &'static str,
    /// The HTTP status the agent got.
    pub code: u16,
}

impl RefusalLabels {
    /// The labels of `refusal`.
    pub fn of(refusal: Refusal) -> Self {
        RefusalLabels {
            reason: refusal.as_str(),
            code: refusal.status(),
        }
    }
}

/// Which limit turned a request away.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `cluster_concurrency`, `stream_limit`, `idle_timeout`, `header_too_large`,
    /// `header_read_timeout`, `tls_handshake_timeout`, `first_request_timeout` or
    /// `connection_idle_timeout` (an HTTP/2 connection without a request, closed).
    pub reason: &'static str,
}

impl Metrics {
    /// Registers every metric under the `tower` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tower");
        r.register("tunnels", "Agent tunnels open now", self.tunnels.clone());
        r.register("streams", "Tunnel streams open now", self.streams.clone());
        r.register(
            "requests_in_flight",
            "Frontend requests being served",
            self.in_flight.clone(),
        );
        r.register(
            "requests",
            "Frontend requests answered, by status code",
            self.requests.clone(),
        );
        r.register(
            "bytes",
            "Body bytes proxied, by direction",
            self.bytes.clone(),
        );
        r.register(
            "tunnel_reconnects",
            "Tunnels accepted for a cluster that had been connected before",
            self.reconnects.clone(),
        );
        r.register(
            "tunnel_refusals",
            "Tunnel handshakes refused, by reason and HTTP status",
            self.refused_tunnels.clone(),
        );
        r.register(
            "requests_limited",
            "Requests refused (429, 431, 503) or cut (504, idle, slow headers) by a limit, by limit",
            self.limited.clone(),
        );
        r.register(
            "connections",
            "Connections open now, by listener",
            self.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed as soon as accepted, by listener and limit (listener_limit, source_limit)",
            self.refused_connections.clone(),
        );
        r.register(
            "live_tasks",
            "Tokio tasks alive in the process",
            self.live_tasks.clone(),
        );
    }

    /// Counts a request hit by limit `reason`.
    pub fn count_limited(&self, reason: &'static str) {
        self.limited.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a refused tunnel handshake.
    pub fn count_refusal(&self, refusal: Refusal) {
        self.refused_tunnels
            .get_or_create(&RefusalLabels::of(refusal))
            .inc();
    }

    /// Counts a response with `code`.
    pub fn count_status(&self, code: u16) {
        self.requests
            .get_or_create(&StatusLabels {
                code: code.to_string(),
            })
            .inc();
    }
}
