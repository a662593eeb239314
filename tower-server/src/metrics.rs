//! Prometheus metrics of the server (`/metrics` on the admin listener).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tower_proto::handshake::Refusal;

/// Labels of `tower_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status code (encoded as its digits, "200", "503", …).
    pub code: u16,
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
    /// `bytes`' request and response series, looked up once: a lookup hashes and locks,
    /// and bodies count every frame.
    bytes_series: [std::sync::OnceLock<Counter>; 2],
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

    /// Counts body bytes proxied caller → member (`request`) or back.
    pub fn count_bytes(&self, request: bool, n: usize) {
        let (series, direction) = match request {
            true => (&self.bytes_series[0], "request"),
            false => (&self.bytes_series[1], "response"),
        };
        series
            .get_or_init(|| {
                self.bytes
                    .get_or_create(&DirectionLabels { direction })
                    .clone()
            })
            .inc_by(n as u64);
    }

    /// Counts a response with `code`.
    pub fn count_status(&self, code: u16) {
        self.requests.get_or_create(&StatusLabels { code }).inc();
    }
}

/// Upper bounds (seconds) of the request-duration histograms; a last, `+Inf` bucket
/// follows. From a fast `get` through a tunnel (a few ms) to a slow list (seconds).
pub const DURATION_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of a [`Histogram`]: [`DURATION_BOUNDS`] and `+Inf`.
pub const BUCKETS: usize = DURATION_BOUNDS.len() + 1;

/// A latency histogram observed with three relaxed atomic adds and no lock (the
/// prometheus-client one takes a mutex per observation, and hides its buckets, which the
/// status page reads).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative).
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the observations, in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = DURATION_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut out = HistogramSnapshot::default();
        for (to, from) in out.buckets.iter_mut().zip(&self.buckets) {
            *to = from.load(Ordering::Relaxed);
        }
        out.sum_micros = self.sum_micros.load(Ordering::Relaxed);
        out
    }
}

/// A copy of a [`Histogram`] (or the difference of two), to compute quantiles from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    pub buckets: [u64; BUCKETS],
    /// Sum of the observations, in microseconds.
    pub sum_micros: u64,
}

impl HistogramSnapshot {
    /// How many observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds `other` to this.
    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_micros += other.sum_micros;
    }

    /// What was observed since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let mut out = *self;
        for (a, b) in out.buckets.iter_mut().zip(&earlier.buckets) {
            *a = a.saturating_sub(*b);
        }
        out.sum_micros = out.sum_micros.saturating_sub(earlier.sum_micros);
        out
    }

    /// The `q` quantile in seconds, interpolated within its bucket as PromQL's
    /// `histogram_quantile` does (so the page and a dashboard agree); `None` with no
    /// observations. A quantile in the `+Inf` bucket reads as the largest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * count as f64;
        let mut below = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            let through = below + n;
            if (through as f64) >= rank && *n > 0 {
                let Some(upper) = DURATION_BOUNDS.get(i) else {
                    return DURATION_BOUNDS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { DURATION_BOUNDS[i - 1] };
                let within = (rank - below as f64) / *n as f64;
                return Some(lower + (upper - lower) * within);
            }
            below = through;
        }
        DURATION_BOUNDS.last().copied()
    }
}

/// HTTP status classes the request histograms are split by.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index in [`STATUS_CLASSES`] of `code`.
fn class_of(code: u16) -> usize {
    usize::from(code / 100).clamp(1, 5) - 1
}

/// One registered cluster's figures. Created when the cluster registers (a clusters file
/// entry, a Cluster object, or, with no registry, its first tunnel) and dropped when it
/// goes, so a name that is not registered never makes a series. Callers hold an `Arc`:
/// counting a request costs a few relaxed atomic adds, nothing allocated.
#[derive(Debug)]
pub struct ClusterMetrics {
    /// Frontend requests, by status class, until the response head.
    durations: [Histogram; 5],
    /// Body bytes caller → member.
    pub request_bytes: AtomicU64,
    /// Body bytes member → caller.
    pub response_bytes: AtomicU64,
    /// When the cluster's state last changed (registered, connected, disconnected).
    state_since: std::sync::Mutex<SystemTime>,
    /// When these figures started (the baseline of the first rates).
    pub created: Instant,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        ClusterMetrics {
            durations: Default::default(),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            state_since: std::sync::Mutex::new(SystemTime::now()),
            created: Instant::now(),
        }
    }
}

/// Cumulative figures of one cluster at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Every request, all classes together.
    pub requests: HistogramSnapshot,
    /// Requests answered 5xx.
    pub errors: u64,
    /// Body bytes caller → member.
    pub request_bytes: u64,
    /// Body bytes member → caller.
    pub response_bytes: u64,
}

impl Totals {
    /// What happened since `earlier`.
    pub fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            requests: self.requests.since(&earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            request_bytes: self.request_bytes.saturating_sub(earlier.request_bytes),
            response_bytes: self.response_bytes.saturating_sub(earlier.response_bytes),
        }
    }
}

impl ClusterMetrics {
    /// Records a request answered `code` after `took`.
    pub fn observe(&self, code: u16, took: Duration) {
        self.durations[class_of(code)].observe(took);
    }

    /// Counts body bytes of a request (`request`) or a response.
    pub fn count_bytes(&self, request: bool, n: usize) {
        let counter = if request {
            &self.request_bytes
        } else {
            &self.response_bytes
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The cumulative figures now.
    pub fn totals(&self) -> Totals {
        let mut requests = HistogramSnapshot::default();
        for histogram in &self.durations {
            requests.add(&histogram.snapshot());
        }
        Totals {
            requests,
            errors: self.durations[4].snapshot().count(),
            request_bytes: self.request_bytes.load(Ordering::Relaxed),
            response_bytes: self.response_bytes.load(Ordering::Relaxed),
        }
    }

    /// Marks a change of state (connected, disconnected) now.
    pub fn state_changed(&self) {
        *self.state_since.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
    }

    /// When the state last changed.
    pub fn state_since(&self) -> SystemTime {
        *self.state_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Encodes the per-cluster series at scrape time, from the registry: one set per
/// registered cluster, none for anything else.
#[derive(Debug)]
pub struct ClusterCollector {
    /// Where the clusters and their tunnels are.
    pub registry: std::sync::Arc<crate::registry::Registry>,
    /// Cancelled when the server drains (then `tower_ready` is 0, as `/readyz` is 503).
    pub draining: tokio_util::sync::CancellationToken,
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let clusters = self.registry.cluster_metrics();
        let live: Vec<_> = clusters
            .iter()
            .map(|(name, _)| self.registry.tunnel(name).ok())
            .collect();

        let ready = ConstGauge::new(i64::from(
            self.registry.is_synced() && !self.draining.is_cancelled(),
        ));
        ready.encode(encoder.encode_descriptor(
            "ready",
            "1 when this replica is ready (its /readyz answers 200), else 0",
            None,
            ready.metric_type(),
        )?)?;

        let mut up = encoder.encode_descriptor(
            "cluster_tunnel_up",
            "1 when the registered cluster has a live agent tunnel to this replica, else 0",
            None,
            MetricType::Gauge,
        )?;
        for ((name, _), tunnel) in clusters.iter().zip(&live) {
            ConstGauge::new(i64::from(tunnel.is_some()))
                .encode(up.encode_family(&[("cluster", name.as_str())])?)?;
        }

        let mut rtt = encoder.encode_descriptor(
            "cluster_tunnel_rtt_seconds",
            "Round trip of the last keepalive ping on the cluster's tunnel (only while connected, once measured)",
            None,
            MetricType::Gauge,
        )?;
        for ((name, _), tunnel) in clusters.iter().zip(&live) {
            if let Some(seconds) = tunnel
                .as_ref()
                .and_then(|t| t.health.rtt())
                .map(|d| d.as_secs_f64())
            {
                ConstGauge::new(seconds)
                    .encode(rtt.encode_family(&[("cluster", name.as_str())])?)?;
            }
        }

        let mut streams = encoder.encode_descriptor(
            "cluster_streams",
            "Streams open now on the cluster's tunnel",
            None,
            MetricType::Gauge,
        )?;
        for ((name, _), tunnel) in clusters.iter().zip(&live) {
            let open = tunnel.as_ref().map_or(0, |t| t.session.open_streams());
            ConstGauge::new(i64::try_from(open).unwrap_or(i64::MAX))
                .encode(streams.encode_family(&[("cluster", name.as_str())])?)?;
        }

        let mut bytes = encoder.encode_descriptor(
            "cluster_bytes",
            "Body bytes proxied to and from the cluster, by direction (request: caller to member)",
            None,
            MetricType::Counter,
        )?;
        for (name, metrics) in &clusters {
            for (direction, counter) in [
                ("request", &metrics.request_bytes),
                ("response", &metrics.response_bytes),
            ] {
                ConstCounter::new(counter.load(Ordering::Relaxed)).encode(
                    bytes.encode_family(&[("cluster", name.as_str()), ("direction", direction)])?,
                )?;
            }
        }

        let mut durations = encoder.encode_descriptor(
            "cluster_request_duration_seconds",
            "Frontend requests to the cluster, by status class: time until the response head (a watch or an exec counts its start)",
            None,
            MetricType::Histogram,
        )?;
        let bounds: Vec<f64> = DURATION_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .collect();
        for (name, metrics) in &clusters {
            for (code_class, histogram) in STATUS_CLASSES.iter().zip(&metrics.durations) {
                let snapshot = histogram.snapshot();
                let buckets: Vec<(f64, u64)> = bounds
                    .iter()
                    .copied()
                    .zip(snapshot.buckets.iter().copied())
                    .collect();
                durations
                    .encode_family(&[("cluster", name.as_str()), ("code_class", code_class)])?
                    .encode_histogram::<NoLabelSet>(
                        snapshot.sum_micros as f64 / 1e6,
                        snapshot.count(),
                        &buckets,
                        None,
                    )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registry::{ClusterSpec, Registry};

    fn scrape(registry: &std::sync::Arc<Registry>) -> String {
        scrape_draining(registry, &tokio_util::sync::CancellationToken::new())
    }

    fn scrape_draining(
        registry: &std::sync::Arc<Registry>,
        draining: &tokio_util::sync::CancellationToken,
    ) -> String {
        let mut metrics = prometheus_client::registry::Registry::default();
        metrics
            .sub_registry_with_prefix("tower")
            .register_collector(Box::new(ClusterCollector {
                registry: registry.clone(),
                draining: draining.clone(),
            }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &metrics).unwrap();
        out
    }

    #[test]
    fn series_exist_for_registered_clusters_only() {
        let spec = |name: &str| ClusterSpec {
            name: name.into(),
            targets: Vec::new(),
        };
        let registry = Registry::new(Some(vec![spec("a"), spec("b")]));
        assert!(registry.metrics_of("nope").is_none());
        let a = registry.metrics_of("a").unwrap();
        a.observe(200, Duration::from_millis(3));
        a.observe(200, Duration::from_millis(40));
        a.observe(503, Duration::from_secs(60));
        a.count_bytes(false, 100);
        let text = scrape(&registry);
        for line in [
            "tower_ready 1",
            "tower_cluster_tunnel_up{cluster=\"a\"} 0",
            "tower_cluster_tunnel_up{cluster=\"b\"} 0",
            "tower_cluster_streams{cluster=\"b\"} 0",
            "tower_cluster_bytes_total{cluster=\"a\",direction=\"response\"} 100",
            "tower_cluster_request_duration_seconds_count{cluster=\"a\",code_class=\"2xx\"} 2",
            "tower_cluster_request_duration_seconds_bucket{le=\"0.005\",cluster=\"a\",code_class=\"2xx\"} 1",
            "tower_cluster_request_duration_seconds_bucket{le=\"0.05\",cluster=\"a\",code_class=\"2xx\"} 2",
            "tower_cluster_request_duration_seconds_bucket{le=\"+Inf\",cluster=\"a\",code_class=\"5xx\"} 1",
            "tower_cluster_request_duration_seconds_bucket{le=\"30.0\",cluster=\"a\",code_class=\"5xx\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(
            !text.contains("tower_cluster_tunnel_rtt_seconds{"),
            "no tunnel, no RTT"
        );
        // A cluster that goes takes its series with it.
        registry.forget("a");
        let text = scrape(&registry);
        assert!(!text.contains("cluster=\"a\""), "{text}");
        assert!(text.contains("cluster=\"b\""));
    }

    #[test]
    fn ready_only_once_synced_and_until_draining() {
        let ready = |registry: &std::sync::Arc<Registry>, draining| {
            let text = scrape_draining(registry, draining);
            text.lines()
                .find_map(|l| l.strip_prefix("tower_ready "))
                .unwrap_or_else(|| panic!("no tower_ready in\n{text}"))
                .to_owned()
        };
        let draining = tokio_util::sync::CancellationToken::new();
        // Cluster objects not listed yet: /readyz says 503, and so does the metric.
        let registry = Registry::with_source(crate::registry::Source::Kubernetes);
        assert_eq!(ready(&registry, &draining), "0");
        registry.set_synced();
        assert_eq!(ready(&registry, &draining), "1");
        draining.cancel();
        assert_eq!(ready(&registry, &draining), "0");
    }

    #[test]
    fn quantiles_interpolate_within_buckets_as_promql_does() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile(0.5), None);
        for _ in 0..10 {
            h.observe(Duration::from_millis(30)); // (0.025, 0.05]
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 10);
        assert_eq!(s.sum_micros, 300_000);
        // histogram_quantile(0.5) = 0.025 + (0.05 - 0.025) * 0.5
        assert!((s.quantile(0.5).unwrap() - 0.0375).abs() < 1e-9);
        h.observe(Duration::from_secs(100));
        assert_eq!(
            h.snapshot().quantile(1.0),
            Some(30.0),
            "+Inf reads as the top bound"
        );
    }
}
