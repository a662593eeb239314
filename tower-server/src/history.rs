//! What the status page shows over time: every [`SAMPLE_EVERY`] each registered
//! cluster's figures are sampled, the last [`POINTS`] kept for its chart, and the last
//! minute's totals kept for the table's rates and percentiles.
//!
//! The per-request cost stays in [`ClusterMetrics`] (atomic adds); everything here runs
//! on the sampler's tick or when a page is asked for. Memory: a few KiB per cluster.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::metrics::{ClusterMetrics, Totals};
use crate::registry::Registry;

/// How often the figures are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Points kept per cluster: five minutes.
pub const POINTS: usize = 60;
/// The table's rates and percentiles are over this much of the recent past.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One sample of a cluster: what happened in the interval before `at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// When it was taken.
    pub at: SystemTime,
    /// Requests per second.
    pub rps: f64,
    /// Median request duration, seconds (none without requests).
    pub p50: Option<f64>,
    /// 99th percentile request duration, seconds.
    pub p99: Option<f64>,
    /// Share of requests answered 5xx.
    pub error_ratio: Option<f64>,
    /// The tunnel's keepalive round trip, seconds.
    pub rtt: Option<f64>,
    /// Streams open on the tunnel.
    pub streams: usize,
    /// Whether a tunnel was up.
    pub up: bool,
    /// Request body bytes per second, caller → member.
    pub bytes_in: f64,
    /// Response body bytes per second, member → caller.
    pub bytes_out: f64,
}

/// The figures of the recent past ([`WINDOW`], or since the cluster registered).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Recent {
    /// Requests per second.
    pub rps: f64,
    /// Median request duration, seconds.
    pub p50: Option<f64>,
    /// 99th percentile request duration, seconds.
    pub p99: Option<f64>,
    /// Share of requests answered 5xx.
    pub error_ratio: Option<f64>,
    /// Requests in the window.
    pub requests: u64,
    /// How long the window is.
    pub window: Duration,
}

impl Recent {
    /// The figures of `delta`, which took `window`.
    pub fn of(delta: &Totals, window: Duration) -> Self {
        let requests = delta.requests.count();
        let seconds = window.as_secs_f64().max(0.001);
        Recent {
            rps: requests as f64 / seconds,
            p50: delta.requests.quantile(0.5),
            p99: delta.requests.quantile(0.99),
            error_ratio: (requests > 0).then(|| delta.errors as f64 / requests as f64),
            requests,
            window,
        }
    }
}

#[derive(Debug)]
struct Series {
    /// The last sample's totals, and when.
    last: (Instant, Totals),
    /// Totals at each sample of the last [`WINDOW`] (and one before it).
    window: VecDeque<(Instant, Totals)>,
    points: VecDeque<Point>,
}

/// Samples of every registered cluster.
#[derive(Debug, Default)]
pub struct History {
    series: Mutex<HashMap<String, Series>>,
}

impl History {
    /// Takes a sample of every cluster `registry` knows, and forgets the others.
    pub fn sample(&self, registry: &Registry) {
        let clusters = registry.cluster_metrics();
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series.retain(|name, _| clusters.iter().any(|(n, _)| n == name));
        for (name, metrics) in &clusters {
            let totals = metrics.totals();
            let tunnel = registry.tunnel(name).ok();
            let entry = series.entry(name.clone()).or_insert_with(|| Series {
                last: (metrics.created, Totals::default()),
                window: VecDeque::new(),
                points: VecDeque::with_capacity(POINTS),
            });
            let delta = totals.since(&entry.last.1);
            let took = now.saturating_duration_since(entry.last.0);
            let recent = Recent::of(&delta, took);
            let per_second = |n: u64| n as f64 / took.as_secs_f64().max(0.001);
            if entry.points.len() == POINTS {
                entry.points.pop_front();
            }
            entry.points.push_back(Point {
                at: wall,
                rps: recent.rps,
                p50: recent.p50,
                p99: recent.p99,
                error_ratio: recent.error_ratio,
                rtt: tunnel
                    .as_ref()
                    .and_then(|t| t.health.rtt())
                    .map(|d| d.as_secs_f64()),
                streams: tunnel.as_ref().map_or(0, |t| t.session.open_streams()),
                up: tunnel.is_some(),
                bytes_in: per_second(delta.request_bytes),
                bytes_out: per_second(delta.response_bytes),
            });
            entry.last = (now, totals);
            entry.window.push_back((now, totals));
            // Keep one sample at or before the window's start, as its baseline.
            while entry
                .window
                .get(1)
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= WINDOW)
            {
                entry.window.pop_front();
            }
        }
    }

    /// The figures of `name` over the last [`WINDOW`], up to now.
    pub fn recent(&self, name: &str, metrics: &ClusterMetrics) -> Recent {
        let now = Instant::now();
        let baseline = {
            let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
            series.get(name).and_then(|s| {
                // The newest sample at least a window old, else the oldest one.
                s.window
                    .iter()
                    .rev()
                    .find(|(at, _)| now.saturating_duration_since(*at) >= WINDOW)
                    .or(s.window.front())
                    .copied()
            })
        };
        let (since, before) = baseline.unwrap_or((metrics.created, Totals::default()));
        Recent::of(
            &metrics.totals().since(&before),
            now.saturating_duration_since(since),
        )
    }

    /// The points of `name`, oldest first.
    pub fn points(&self, name: &str) -> Vec<Point> {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series
            .get(name)
            .map(|s| s.points.iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registry::{ClusterSpec, Registry};

    fn spec(name: &str) -> ClusterSpec {
        ClusterSpec {
            name: name.into(),
            targets: Vec::new(),
        }
    }

    #[test]
    fn rates_and_percentiles_follow_the_requests() {
        let registry = Registry::new(Some(vec![spec("a"), spec("b")]));
        let history = History::default();
        let a = registry.metrics_of("a").unwrap();
        for _ in 0..98 {
            a.observe(200, Duration::from_millis(3));
        }
        a.observe(503, Duration::from_millis(700));
        a.observe(500, Duration::from_millis(700));
        let recent = history.recent("a", &a);
        assert_eq!(recent.requests, 100);
        assert!(recent.rps > 0.0);
        // 98 in (0, 5 ms], 2 in (0.5 s, 1 s].
        let p50 = recent.p50.unwrap();
        assert!(p50 > 0.0 && p50 <= 0.005, "{p50}");
        let p99 = recent.p99.unwrap();
        assert!((0.5..=1.0).contains(&p99), "{p99}");
        assert_eq!(recent.error_ratio, Some(0.02));

        history.sample(&registry);
        let points = history.points("a");
        assert_eq!(points.len(), 1);
        assert!(!points[0].up, "no tunnel");
        assert!(points[0].rps > 0.0);
        // A cluster without requests has rates of zero and no percentiles.
        let b = registry.metrics_of("b").unwrap();
        let quiet = history.recent("b", &b);
        assert_eq!(
            (quiet.requests, quiet.p50, quiet.error_ratio),
            (0, None, None)
        );

        // A cluster that goes is forgotten at the next sample.
        registry.forget("a");
        history.sample(&registry);
        assert!(history.points("a").is_empty());
        assert_eq!(history.points("b").len(), 2);
    }

    #[test]
    fn points_are_bounded() {
        let registry = Registry::new(Some(vec![spec("a")]));
        let history = History::default();
        for _ in 0..POINTS + 10 {
            history.sample(&registry);
        }
        assert_eq!(history.points("a").len(), POINTS);
    }
}
