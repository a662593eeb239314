//! What a listener lets in. (How long a connection may then sit without a request is
//! [`tower_tunnel::requests::OpenRequests`], which the agent's tunnel streams share.)
//!
//! * [`Admission`]: at most so many connections on a listener, and so many from one source
//!   address; one more is closed as soon as it is accepted (before any TLS), counted in
//!   `tower_connections_refused_total`. Each listener has its own, so a flood of the
//!   frontend leaves room for agents on the tunnel listener and for the kubelet's probes
//!   on the admin listener.
//! * [`LogThrottle`]: at most one line per interval for events a flood repeats (refused
//!   connections, failed accepts), with the count of those left out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use crate::metrics::{ConnectionRefusalLabels, ListenerLabels, Metrics};

/// The two ends of an accepted connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The client's address.
    pub(crate) remote: SocketAddr,
    /// The address the client dialed (this host's end).
    pub(crate) local: SocketAddr,
    /// `remote`'s address as the `X-Forwarded-For` its proxied requests carry.
    pub(crate) forwarded_for: http::HeaderValue,
    /// The responses the connection's handlers ask to watch: one nobody reads closes
    /// the connection.
    pub(crate) unread: crate::idle::Unread,
}

impl Peer {
    pub(crate) fn new(remote: SocketAddr, local: SocketAddr) -> Peer {
        Peer {
            remote,
            local,
            forwarded_for: tower_tunnel::http::forwarded_for(remote.ip()),
            unread: crate::idle::Unread::default(),
        }
    }
}

/// How many connections each listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The tunnel listener (agents).
    pub tunnel: usize,
    /// The frontend listener (callers).
    pub frontend: usize,
    /// The admin listener (probes, metrics).
    pub admin: usize,
    /// From one source address on each listener (IPv6: one /64); 0 = no such limit.
    pub per_source: usize,
}

impl ConnectionLimits {
    /// File descriptors kept for everything but accepted connections: the state and
    /// secret files, the Kubernetes client's connections, DNS, the listeners themselves.
    pub const RESERVED_FDS: u64 = 256;
    /// The tunnel and frontend limits when the file descriptor limit allows them: each
    /// idle caller connection costs ~26 KiB, so 10,000 stay within the host manifest's
    /// 512 MiB next to the tunnels.
    pub const DEFAULT_PER_LISTENER: usize = 10_000;
    /// The admin listener's: probes and scrapes, a few at a time.
    pub const DEFAULT_ADMIN: usize = 64;
    /// Per source address, on each listener.
    pub const DEFAULT_PER_SOURCE: usize = 1_000;

    /// The defaults for a process that may open `open_files` descriptors (`None`: no
    /// limit known): the tunnel and the frontend share what the admin listener and
    /// [`Self::RESERVED_FDS`] leave, half each, so that a flooded frontend cannot take the
    /// descriptors an agent's tunnel or a probe needs.
    pub fn defaults_for(open_files: Option<u64>) -> Self {
        let half = open_files.map_or(Self::DEFAULT_PER_LISTENER, |n| {
            let left = n.saturating_sub(Self::RESERVED_FDS + Self::DEFAULT_ADMIN as u64);
            usize::try_from(left / 2).unwrap_or(usize::MAX)
        });
        let each = half.clamp(16, Self::DEFAULT_PER_LISTENER);
        ConnectionLimits {
            tunnel: each,
            frontend: each,
            admin: Self::DEFAULT_ADMIN,
            per_source: Self::DEFAULT_PER_SOURCE,
        }
    }

    /// Descriptors these limits may use at once, the reserve included.
    pub fn descriptors(&self) -> u64 {
        (self.tunnel + self.frontend + self.admin) as u64 + Self::RESERVED_FDS
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::defaults_for(None)
    }
}

/// The process's soft limit on open file descriptors (`None`: unlimited or unknown).
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Raises the soft limit on open file descriptors to the hard limit, which an
/// unprivileged process may do (container runtimes often start processes at a soft 1024
/// under a hard limit hundreds of times that). Returns the soft limit before and after.
pub fn raise_open_file_limit() -> std::io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum || limit.maximum.is_none() {
        return Ok((limit.current, limit.current));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok((limit.current, open_file_limit()))
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The listener holds as many connections as it may.
    Listener,
    /// The source address holds as many connections as it may.
    Source,
}

impl Refusal {
    /// The `reason` label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::Listener => "listener_limit",
            Refusal::Source => "source_limit",
        }
    }
}

/// The connections of one listener, bounded in all and per source address.
#[derive(Debug)]
pub(crate) struct Admission {
    /// `tunnel`, `frontend` or `admin`.
    pub(crate) listener: &'static str,
    /// Connections at once.
    pub(crate) max: usize,
    /// Connections at once from one source; 0 = no such limit.
    pub(crate) max_per_source: usize,
    counts: Mutex<Counts>,
    open: Gauge,
    refused_listener: Counter,
    refused_source: Counter,
    /// Refusals are logged at most this often.
    pub(crate) log: LogThrottle,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Admission {
    /// The admission of `listener`, counted in `metrics`.
    pub(crate) fn new(
        listener: &'static str,
        max: usize,
        max_per_source: usize,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let refused = |reason: Refusal| {
            metrics
                .refused_connections
                .get_or_create(&ConnectionRefusalLabels {
                    listener,
                    reason: reason.reason(),
                })
                .clone()
        };
        Arc::new(Admission {
            listener,
            max,
            max_per_source,
            counts: Mutex::new(Counts::default()),
            open: metrics
                .connections
                .get_or_create(&ListenerLabels { listener })
                .clone(),
            refused_listener: refused(Refusal::Listener),
            refused_source: refused(Refusal::Source),
            log: LogThrottle::new(LOG_EVERY),
        })
    }

    /// A place for a connection from `source`, held until the [`Admitted`] is dropped; or
    /// why there is none (counted).
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refusal> {
        let source = source_key(source);
        let mut counts = self.lock();
        let refusal = if counts.total >= self.max {
            Some(Refusal::Listener)
        } else if self.max_per_source > 0
            && counts.by_source.get(&source).copied().unwrap_or(0) >= self.max_per_source
        {
            Some(Refusal::Source)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(counts);
            match refusal {
                Refusal::Listener => self.refused_listener.inc(),
                Refusal::Source => self.refused_source.inc(),
            };
            return Err(refusal);
        }
        counts.total += 1;
        *counts.by_source.entry(source).or_insert(0) += 1;
        drop(counts);
        self.open.inc();
        Ok(Admitted {
            admission: self.clone(),
            source,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What one source address is counted as: IPv4 addresses (IPv4-mapped IPv6 ones too) as
/// they are, IPv6 addresses by their /64, which is what one host or site is given.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// A connection's place on its listener; given back when dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
        drop(counts);
        self.admission.open.dec();
    }
}

/// How often a listener may log a line for events a flood repeats.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one line through per interval and counts the rest.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    /// At most one line every `every`.
    pub(crate) fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when a line may be written now (`n`: how many were left out since the
    /// last one); `None` when this one is left out.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|at| now < at + self.every) {
            *suppressed += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn limits_per_listener_and_per_source() {
        let metrics = Metrics::default();
        let admission = Admission::new("frontend", 3, 2, &metrics);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = admission.admit(a).unwrap();
        let _a2 = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::Source);
        let _b1 = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), Refusal::Listener);
        drop(a1);
        let _b2 = admission.admit(b).unwrap();
        assert_eq!(admission.open.get(), 3);
        assert_eq!(admission.refused_source.get(), 1);
        assert_eq!(admission.refused_listener.get(), 1);

        // No per-source limit: only the listener's.
        let open = Admission::new("tunnel", 2, 0, &metrics);
        let _x = open.admit(a).unwrap();
        let _y = open.admit(a).unwrap();
        assert_eq!(open.admit(a).unwrap_err(), Refusal::Listener);
    }

    #[test]
    fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let key = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
    }

    #[test]
    fn defaults_stay_below_the_descriptor_limit() {
        let roomy = ConnectionLimits::defaults_for(Some(1 << 20));
        assert_eq!(roomy.frontend, ConnectionLimits::DEFAULT_PER_LISTENER);
        assert_eq!(roomy.tunnel, ConnectionLimits::DEFAULT_PER_LISTENER);
        for n in [1024, 4096, 8192] {
            let sized = ConnectionLimits::defaults_for(Some(n));
            assert!(sized.descriptors() <= n, "{n}: {sized:?}");
            assert_eq!(sized.tunnel, sized.frontend);
            assert!(sized.frontend >= 300, "{n}: {sized:?}");
        }
        assert_eq!(
            ConnectionLimits::default().frontend,
            ConnectionLimits::DEFAULT_PER_LISTENER
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_lets_one_line_through_per_interval() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..500 {
            assert_eq!(throttle.allow(), None);
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(throttle.allow(), Some(500));
        assert_eq!(throttle.allow(), None);
    }
}
