//! The frontend listener: `/clusters/{name}/…` → that cluster's tunnel.
//!
//! The caller's JWT is checked here before anything is routed, then the request goes
//! unchanged (but for hop-by-hop headers) down a pooled tunnel stream to the agent,
//! which checks it again; watches share one HTTP/2 stream ([`crate::http2`]). Bodies
//! stream both ways; upgrades (exec, attach, port-forward) are joined end to end once
//! both sides have switched protocols.
//!
//! The per-user limit is in `user_slots`; how the pool opens tunnel streams, in
//! `connector`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt as _};
use futures::FutureExt as _;
use http::header;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_auth::identity::{Asserter, IDENTITY_HEADER};
use tower_auth::{AuthError, Identity, Verifier};
use tower_proto::names::validate_cluster_name;
use tower_proto::preamble::{KUBERNETES_TARGET, is_target_name};
use tower_tunnel::TunnelError;
use tower_tunnel::exchanges::Exchange;
use tower_tunnel::pool::Http1Pool;
use tower_tunnel::watch_end::{EndOnSignal, Framer};

use crate::connections::Peer;
use crate::idle::{Activity, IdleBody, unless_idle};
use crate::metrics::{ClusterMetrics, Metrics};
use crate::registry::{Lookup, Registry};
use crate::status::{Body, BoxError, failure};

mod connector;
mod user_slots;

use connector::InFlight;
pub(crate) use connector::{PoolAddress, TunnelConnector, pool_authority};
use user_slots::{UserSlot, UserSlots};

/// The assertion's header, as a name made once: inserted by its `&str`, a custom name
/// is copied into a new allocation per request.
const IDENTITY: header::HeaderName = header::HeaderName::from_static(IDENTITY_HEADER);

type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// How the frontend judges callers and tells members who they are.
pub(crate) struct CallerAuth {
    /// Checks user tokens (the jwtSecret).
    pub(crate) verifier: Verifier,
    /// Tells each member's agent who the caller is, under that member's own key.
    pub(crate) asserter: Asserter,
    /// Bearer tokens this host did not sign go to the member as they are
    /// (`--pass-through-unknown-tokens`).
    pub(crate) pass_through: bool,
    /// With `--kubernetes`: the host's KubeSphere Users, against which callers resolve.
    pub(crate) users: Option<Arc<crate::users::KubeSphereUsers>>,
}

/// Who is calling, as far as this server can tell.
enum Caller {
    /// A user token this host signed, verified.
    User(Identity),
    /// A bearer token this host did not sign, passed through
    /// (`--pass-through-unknown-tokens`); named by a digest of it (for the per-user
    /// limit and logs, never the token itself).
    PassThrough(String),
}

impl Caller {
    /// The name its requests are counted and logged under.
    fn name(&self) -> &str {
        match self {
            Caller::User(identity) => &identity.user,
            Caller::PassThrough(key) => key,
        }
    }
}

/// Whether `error` says the token is simply not one of this host's (signed with another
/// key or algorithm, or not a JWT at all), as opposed to one of ours that is refused
/// (expired, a refresh token, an agent token, `alg: none`): only the former may pass
/// through.
fn not_signed_here(error: &AuthError) -> bool {
    matches!(
        error,
        AuthError::BadSignature | AuthError::Malformed(_) | AuthError::WrongAlgorithm(_)
    )
}

/// A pass-through caller's name: `pass-through:` and 16 hex digits of the token's
/// SHA-256, so each credential has its own share of --max-requests-per-user.
fn pass_through_key(token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    format!("pass-through:{}", hex::encode(&digest[..8]))
}

/// Routes frontend requests into tunnels.
pub(crate) struct Frontend {
    registry: Arc<Registry>,
    auth: CallerAuth,
    /// HTTP/1.1 over the tunnels' streams, pooled per `{target}.{tunnel}.{cluster}`.
    client: Http1Pool<TunnelConnector, UpstreamBody>,
    metrics: Arc<Metrics>,
    /// Requests in flight per cluster, each bounded by `max_requests_per_cluster`.
    per_cluster: Mutex<HashMap<String, Arc<Semaphore>>>,
    max_requests_per_cluster: usize,
    /// Requests in flight per user and cluster.
    per_user: UserSlots,
    idle_timeout: Duration,
    /// Cancelled when the server drains: open watches end cleanly.
    draining: CancellationToken,
}

impl Frontend {
    pub(crate) fn new(
        registry: Arc<Registry>,
        auth: CallerAuth,
        metrics: Arc<Metrics>,
        server_id: String,
        limits: &crate::Limits,
        draining: CancellationToken,
    ) -> Self {
        let connector = TunnelConnector {
            registry: registry.clone(),
            server_id: server_id.into(),
            metrics: metrics.clone(),
        };
        let client = Http1Pool::new(connector, None, 256);
        Frontend {
            registry,
            auth,
            client,
            metrics,
            per_cluster: Mutex::new(HashMap::new()),
            max_requests_per_cluster: limits.max_requests_per_cluster,
            per_user: UserSlots::new(limits.max_requests_per_user),
            idle_timeout: limits.stream_idle_timeout,
            draining,
        }
    }

    /// A slot among the cluster's requests in flight, or 429 when they are all taken.
    fn cluster_slot(&self, cluster: &str) -> Result<OwnedSemaphorePermit, ProxyError> {
        let semaphore = {
            let mut per_cluster = self.per_cluster.lock().unwrap_or_else(|e| e.into_inner());
            // Look up before inserting: no key allocated on the per-request path.
            match per_cluster.get(cluster) {
                Some(semaphore) => semaphore.clone(),
                None => per_cluster
                    .entry(cluster.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.max_requests_per_cluster)))
                    .clone(),
            }
        };
        semaphore.try_acquire_owned().map_err(|_| {
            self.metrics.count_limited("cluster_concurrency");
            ProxyError::TooManyRequests(format!(
                "cluster {cluster:?} already has {} requests in flight through this server (--max-requests-per-cluster): retry later",
                self.max_requests_per_cluster
            ))
        })
    }

    /// A slot among the requests `user` has in flight to `cluster`, or 429 when they are
    /// all taken: one caller may not hold every place the cluster has.
    fn user_slot(&self, cluster: &str, user: &str) -> Result<UserSlot, ProxyError> {
        self.per_user.take(cluster, user).ok_or_else(|| {
            self.metrics.count_limited("user_concurrency");
            ProxyError::TooManyRequests(format!(
                "user {user:?} already has {} requests in flight to cluster {cluster:?} through this server (--max-requests-per-user): retry later",
                self.per_user.max
            ))
        })
    }

    /// Answers one frontend request.
    ///
    /// This and [`Frontend::route`] return an `async` block rather than being `async fn`s:
    /// an `async fn` keeps its arguments twice in its future (as captured, and as the
    /// locals they are moved into), and this future is boxed and copied per request
    /// (BENCHMARKS.md, "Smaller request futures").
    pub(crate) fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Body>> {
        let started = std::time::Instant::now();
        let in_flight = InFlight::new(self.metrics.clone());
        // Only what the request needs of its connection goes into the future.
        let Peer {
            forwarded_for,
            unread,
            ..
        } = peer;
        async move {
            // Set once the path names a cluster the registry knows: other names count only
            // in the totals, so they never make a series.
            let mut cluster = None;
            let (response, slot) = match self.route(req, forwarded_for, &mut cluster).await {
                Ok(routed) => routed,
                Err(e) => (e.response(), None),
            };
            if let Some(cluster) = &cluster {
                cluster.observe(response.status().as_u16(), started.elapsed());
            }
            // A caller that stops reading stops hyper polling the body, and so the body's own
            // idle timer: its connection watches for that apart, and closes.
            if let Some(slots) = &slot {
                unread.watch(&slots.activity);
            }
            self.metrics.count_status(response.status().as_u16());
            let metrics = self.metrics.clone();
            let (parts, body) = response.into_parts();
            let body = body
                .map_frame(move |frame| {
                    let _held_until_the_body_ends = (&in_flight, &slot);
                    count_frame(&metrics, cluster.as_deref(), false, &frame);
                    frame
                })
                .boxed();
            Response::from_parts(parts, body)
        }
    }

    /// Proxies `req`; the response comes with the cluster slot it holds until its body ends.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold its arguments twice in the future (see handle)"
    )]
    fn route<'a>(
        &'a self,
        mut req: Request<Incoming>,
        forwarded_for: header::HeaderValue,
        cluster: &'a mut Option<Arc<ClusterMetrics>>,
    ) -> impl Future<Output = Result<(Response<Body>, Option<Slots>), ProxyError>> + 'a {
        async move {
            // A copy (of reference counts) for the route to borrow from while the request
            // moves on.
            let uri = req.uri().clone();
            let route = Route::parse(&uri)?;
            *cluster = self.registry.metrics_of(route.cluster);
            let cluster = cluster.clone();
            let token = tower_auth::bearer(
                req.headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default(),
            );
            let caller = match token
                .ok_or(AuthError::Missing)
                .and_then(|token| self.auth.verifier.verify_user_issued(token))
            {
                Ok((identity, tower_issued)) => match &self.auth.users {
                    None => Caller::User(identity),
                    Some(users) => match users.resolve(identity, tower_issued) {
                        Ok(identity) => Caller::User(identity),
                        Err(e @ crate::users::Refused::NotReady(_)) => {
                            return Err(ProxyError::Unavailable(e.to_string()));
                        }
                        Err(e) => return Err(ProxyError::Unauthorized(e.to_string())),
                    },
                },
                Err(e) if self.auth.pass_through && not_signed_here(&e) => {
                    Caller::PassThrough(pass_through_key(token.unwrap_or_default()))
                }
                Err(e) => return Err(ProxyError::Unauthorized(e.to_string())),
            };
            if !self.registry.target_allowed(route.cluster, route.target) {
                return Err(ProxyError::Forbidden(format!(
                    "target {:?} of cluster {:?} is not allowed by the clusters file",
                    route.target, route.cluster
                )));
            }
            let tunnel = match self.registry.tunnel(route.cluster) {
                Ok(tunnel) => tunnel,
                Err(Lookup::Unknown) => {
                    return Err(ProxyError::NotFound(format!(
                        "cluster {:?} is not registered with tower",
                        route.cluster
                    )));
                }
                Err(Lookup::Disconnected) => {
                    return Err(ProxyError::Unavailable(format!(
                        "cluster {:?} has no agent connected: its tower-agent is down or cannot reach this server",
                        route.cluster
                    )));
                }
            };
            let user_slot = self.user_slot(route.cluster, caller.name())?;
            let slot = self.cluster_slot(route.cluster)?;
            tracing::debug!(cluster = %route.cluster, target = %route.target, user = caller.name(), method = req.method().as_str(), path = route.path.as_str(), "proxying");
            let activity = Activity::new();

            let client_upgrade = req
                .headers()
                .contains_key(header::UPGRADE)
                .then(|| hyper::upgrade::on(&mut req));
            // In a block of its own: the parts of the request it builds are dead once
            // it is built, and so take no room in the future across the send.
            let (upstream, watch) = {
                let (mut parts, body) = req.into_parts();
                let kubernetes = tunnel
                    .kubernetes
                    .as_ref()
                    .filter(|_| route.target == KUBERNETES_TARGET);
                parts.uri = route
                    .upstream_uri(tunnel.id, kubernetes.map(|k| &k.authority))
                    .map_err(|e| ProxyError::BadRequest(format!("bad path: {e}")))?;
                // An HTTP/2 caller's request has no Host (its authority is in the URI), and the
                // tunnel stream speaks HTTP/1.1, which needs one: the pool would format it per
                // request. What it says does not matter: the agent sets its upstream's own.
                if let Some(kubernetes) = kubernetes
                    && !parts.headers.contains_key(header::HOST)
                {
                    parts.headers.insert(header::HOST, kubernetes.host.clone());
                }
                // Judged on the member's path: `/clusters/watch/…` is a cluster, not a watch.
                let watch = tower_proto::request_info::is_watch(&parts.method, &parts.uri);
                tower_tunnel::http::strip_hop_by_hop(&mut parts.headers);
                // Identity is the verified token's alone; where the request came from is what
                // this listener saw, not what the caller claims.
                tower_tunnel::http::strip_remote_identity(&mut parts.headers);
                tower_tunnel::http::set_forwarded_for(&mut parts.headers, forwarded_for);
                // The member learns who the caller is from this server's assertion, signed with
                // the member's own key. The kubernetes target never needs the caller's token (the
                // agent calls its API server with its own credential), so it stays here; other
                // targets (ks-apiserver) check it themselves, so it goes along.
                let assertion = match &caller {
                    Caller::User(identity) => {
                        if route.target == KUBERNETES_TARGET {
                            parts.headers.remove(header::AUTHORIZATION);
                        }
                        self.auth.asserter.assert(route.cluster, identity)
                    }
                    // Not ours to judge: it goes as it came, for the member to authenticate.
                    Caller::PassThrough(_) => self.auth.asserter.assert_pass_through(route.cluster),
                };
                parts.headers.insert(IDENTITY, assertion);
                // Streams in the tunnel carry HTTP/1.1, whatever the caller spoke.
                parts.version = http::Version::HTTP_11;
                let metrics = self.metrics.clone();
                let request_activity = activity.clone();
                let body = body
                    .map_frame(move |frame| {
                        request_activity.touch();
                        count_frame(&metrics, cluster.as_deref(), true, &frame);
                        frame
                    })
                    .boxed_unsync();
                (Request::from_parts(parts, body), watch)
            };
            // Watches ride the tunnel's HTTP/2 connection when the agent serves one: by the
            // thousand, a stream and an HTTP/1.1 codec each would cost both sides ~25 KiB.
            // Only for targets the agent announced: one shared stream each, at most 16.
            let channel = tunnel.http2.as_ref().filter(|_| {
                watch
                    && client_upgrade.is_none()
                    && tunnel.targets.iter().any(|t| t == route.target)
            });
            // Counted among the session's exchanges while it runs, as the agent counts it:
            // with several in flight, the tunnel gathers their frames into shared writes.
            // Watches on the shared HTTP/2 stream are that stream's codec's to gather.
            let exchange = channel
                .is_none()
                .then(|| tunnel.session.exchanges().begin());
            // The send's future is made here, taking the request, rather than in an async
            // block that would hold the request too (240 bytes more in every request's
            // future, copied with it).
            let sent = match channel {
                // Boxed: watches only, and its future (kilobytes) would otherwise be part
                // of every request's, copied with it.
                Some(channel) => futures::future::Either::Left(
                    Box::pin(channel.send(route.target, upstream)).map(|sent| {
                        sent.map(|(response, slot)| (response.map(Either::Right), Some(slot)))
                    }),
                ),
                None => futures::future::Either::Right(self.client.send(upstream).map(|sent| {
                    sent.map(|response| (response.map(Either::Left), None))
                        .map_err(BoxError::from)
                })),
            };
            let answer = unless_idle(sent, &activity, self.idle_timeout)
                .await
                .map_err(|e| {
                    self.metrics.count_limited("idle_timeout");
                    ProxyError::GatewayTimeout(format!(
                        "cluster {:?} did not answer: {e}",
                        route.cluster
                    ))
                })?;
            let (mut response, stream_slot) = answer.map_err(|e: BoxError| {
                // A limit of the tunnel's (the metric's reason, the flag that sets it): 503.
                let limit = match tunnel_error(&*e) {
                    Some(TunnelError::StreamLimit(_)) => {
                        Some(("stream_limit", " (--max-streams-per-tunnel)"))
                    }
                    Some(TunnelError::Unacknowledged(_)) => Some(("unacknowledged_streams", "")),
                    _ => None,
                };
                if let Some((reason, flag)) = limit {
                    self.metrics.count_limited(reason);
                    return ProxyError::Unavailable(format!(
                        "cluster {:?}: {}{flag}: retry later",
                        route.cluster,
                        tower_tunnel::http::error_chain(&*e)
                    ));
                }
                tracing::warn!(cluster = %route.cluster, error = %e, "tunnel request failed");
                ProxyError::BadGateway(format!(
                    "cluster {:?}: the tunnel failed: {}",
                    route.cluster,
                    tower_tunnel::http::error_chain(&*e)
                ))
            })?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let Some(client_upgrade) = client_upgrade else {
                    return Err(ProxyError::BadGateway(
                        "the member switched protocols on a request that did not ask to".into(),
                    ));
                };
                // hyper drops a 101's body once its head is sent, so the session itself holds
                // the request's places (cluster and stream), counts in flight, and ends when
                // idle as long as a response body would.
                let agent_upgrade = hyper::upgrade::on(&mut response);
                let held = (
                    Slots {
                        _user: user_slot,
                        _cluster: slot,
                        _stream: stream_slot,
                        _exchange: exchange,
                        activity: activity.clone(),
                    },
                    InFlight::new(self.metrics.clone()),
                );
                let (idle, metrics) = (self.idle_timeout, self.metrics.clone());
                tokio::spawn(async move {
                    let touch = {
                        let activity = activity.clone();
                        move || activity.touch()
                    };
                    let joined =
                        tower_tunnel::http::join_upgrades(client_upgrade, agent_upgrade, touch);
                    if unless_idle(joined, &activity, idle).await.is_err() {
                        tracing::debug!(?idle, "upgraded connection idle: closed");
                        metrics.count_limited("idle_timeout");
                    }
                    drop(held);
                });
                return Ok((response.map(|b| b.map_err(BoxError::from).boxed()), None));
            }
            tower_tunnel::http::strip_hop_by_hop(response.headers_mut());
            let metrics = self.metrics.clone();
            let draining = self.draining.clone();
            let body_activity = activity.clone();
            let framer = watch
                .then(|| Framer::for_content_type(response.headers().get(header::CONTENT_TYPE)));
            let response = response.map(|b| {
                let body = IdleBody::new(b, body_activity, self.idle_timeout, move || {
                    metrics.count_limited("idle_timeout");
                });
                // A watch ends cleanly when this server drains; clients watch again elsewhere.
                match framer {
                    Some(framer) => EndOnSignal::new(body, framer, draining).boxed(),
                    None => body.boxed(),
                }
            });
            Ok((
                response,
                Some(Slots {
                    _user: user_slot,
                    _cluster: slot,
                    _stream: stream_slot,
                    _exchange: exchange,
                    activity,
                }),
            ))
        }
    }
}

/// Counts a body frame's bytes, caller → member (`request`) or back, in the totals and,
/// once the path named a known cluster, in the cluster's series.
fn count_frame(
    metrics: &Metrics,
    cluster: Option<&ClusterMetrics>,
    request: bool,
    frame: &hyper::body::Frame<Bytes>,
) {
    if let Some(data) = frame.data_ref() {
        metrics.count_bytes(request, data.len());
        if let Some(cluster) = cluster {
            cluster.count_bytes(request, data.len());
        }
    }
}

/// What a proxied response holds until its body ends: its place among its user's and
/// its cluster's requests in flight, among the tunnel's streams when it shares an
/// HTTP/2 stream, and among the session's exchanges when it has a stream of its own.
struct Slots {
    _user: UserSlot,
    _cluster: OwnedSemaphorePermit,
    _stream: Option<OwnedSemaphorePermit>,
    _exchange: Option<Exchange>,
    /// When the request last moved a byte.
    activity: Arc<Activity>,
}

/// The [`TunnelError`] somewhere in `e`'s chain of causes.
fn tunnel_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TunnelError> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<TunnelError>() {
            return Some(t);
        }
        cause = c.source();
    }
    None
}

/// Why a frontend request was not proxied; each maps to a status and a `Status` reason.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The caller's path is malformed (bad cluster or target name).
    #[error("{0}")]
    BadRequest(String),
    /// The caller's token is missing or refused.
    #[error("{0}")]
    Unauthorized(String),
    /// The clusters file does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// No such cluster, or not a tower path.
    #[error("{0}")]
    NotFound(String),
    /// The cluster's agent is not connected.
    #[error("{0}")]
    Unavailable(String),
    /// The tunnel or the agent failed mid-request.
    #[error("{0}")]
    BadGateway(String),
    /// The cluster has as many requests in flight as it may.
    #[error("{0}")]
    TooManyRequests(String),
    /// The member did not answer while nothing moved for the idle timeout.
    #[error("{0}")]
    GatewayTimeout(String),
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::NotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ProxyError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn response(&self) -> Response<Body> {
        let reason = match self {
            ProxyError::BadRequest(_) => "BadRequest",
            ProxyError::Unauthorized(_) => "Unauthorized",
            ProxyError::Forbidden(_) => "Forbidden",
            ProxyError::NotFound(_) => "NotFound",
            ProxyError::Unavailable(_) | ProxyError::BadGateway(_) => "ServiceUnavailable",
            ProxyError::TooManyRequests(_) => "TooManyRequests",
            ProxyError::GatewayTimeout(_) => "Timeout",
        };
        let mut response = failure(self.status(), reason, &self.to_string());
        if matches!(
            self,
            ProxyError::TooManyRequests(_) | ProxyError::Unavailable(_)
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Where a frontend path leads: names borrowed from the request's URI.
#[derive(Debug, PartialEq, Eq)]
struct Route<'a> {
    cluster: &'a str,
    target: &'a str,
    /// Path and query to send to the member, starting with `/`.
    path: String,
}

impl<'a> Route<'a> {
    /// `/clusters/{name}/{rest}` → kubernetes; `/clusters/{name}/targets/{target}/{rest}`
    /// → a named target.
    fn parse(uri: &'a Uri) -> Result<Route<'a>, ProxyError> {
        let bad = ProxyError::BadRequest;
        let path = uri.path();
        let Some(rest) = path.strip_prefix("/clusters/") else {
            return Err(ProxyError::NotFound(
                "tower routes only /clusters/{name}/…".into(),
            ));
        };
        let (cluster, rest) = rest.split_once('/').unwrap_or((rest, ""));
        validate_cluster_name(cluster).map_err(|e| bad(e.to_string()))?;
        let (target, rest) = match rest.strip_prefix("targets/") {
            Some(named) => {
                let (target, rest) = named.split_once('/').unwrap_or((named, ""));
                if !is_target_name(target) {
                    return Err(bad(format!(
                        "invalid target name {:?}: a target is a DNS label",
                        target.chars().take(64).collect::<String>()
                    )));
                }
                (target, rest)
            }
            None => (KUBERNETES_TARGET, rest),
        };
        let mut path = format!("/{rest}");
        if let Some(query) = uri.query() {
            path.push('?');
            path.push_str(query);
        }
        Ok(Route {
            cluster,
            target,
            path,
        })
    }

    /// The URI the pooled client sends, to [`pool_authority`]; `kubernetes` is the
    /// tunnel's, made when it came up.
    fn upstream_uri(
        &self,
        tunnel: u64,
        kubernetes: Option<&http::uri::Authority>,
    ) -> Result<Uri, http::Error> {
        let authority = match kubernetes {
            Some(authority) if self.target == KUBERNETES_TARGET => authority.clone(),
            _ => pool_authority(self.target, tunnel, self.cluster)?,
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query = Some(self.path.as_str().try_into()?);
        Ok(Uri::from_parts(parts)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Why `path` is refused.
    fn refusal(path: &str) -> StatusCode {
        Route::parse(&path.parse().unwrap()).unwrap_err().status()
    }

    #[test]
    fn routes_kubernetes_and_named_targets() {
        let uris: Vec<Uri> = [
            "/clusters/member-1/api/v1/pods?watch=1",
            "/clusters/m",
            "/clusters/m/targets/kubesphere/kapis/x",
            "/clusters/eu.prod-1/api",
        ]
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
        let [pods, root, ks, dotted] = [0, 1, 2, 3].map(|i| Route::parse(&uris[i]).unwrap());
        assert_eq!(
            pods,
            Route {
                cluster: "member-1",
                target: "kubernetes",
                path: "/api/v1/pods?watch=1".into()
            }
        );
        assert_eq!(root.path, "/");
        assert_eq!((ks.target, ks.path.as_str()), ("kubesphere", "/kapis/x"));
        assert_eq!(
            ks.upstream_uri(7, None).unwrap().to_string(),
            "http://kubesphere.7.m/kapis/x"
        );
        // Dotted cluster names keep their dots after the tunnel id.
        assert_eq!(
            dotted.upstream_uri(12, None).unwrap().host(),
            Some("kubernetes.12.eu.prod-1")
        );
        // The tunnel's own authority serves its kubernetes target, and only that.
        let made = pool_authority(KUBERNETES_TARGET, 12, "eu.prod-1").unwrap();
        assert_eq!(
            dotted.upstream_uri(12, Some(&made)).unwrap(),
            dotted.upstream_uri(12, None).unwrap()
        );
        let other = pool_authority(KUBERNETES_TARGET, 3, "elsewhere").unwrap();
        assert_eq!(
            ks.upstream_uri(7, Some(&other)).unwrap().to_string(),
            "http://kubesphere.7.m/kapis/x"
        );
    }

    #[test]
    fn refuses_path_tricks_and_bad_names() {
        for bad in [
            "/clusters/../api",
            "/clusters/a%2fb/api",
            "/clusters/A/api",
            "/clusters//api",
            "/clusters/a/targets/../x",
            "/clusters/a/targets/Not_A_Label/x",
        ] {
            assert_eq!(refusal(bad), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(refusal("/api/v1"), StatusCode::NOT_FOUND);
    }
}
