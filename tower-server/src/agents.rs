//! The tunnel listener: agents dial in with `GET /v1/tunnel` and are upgraded to a
//! yamux session, which is then registered for its cluster.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_auth::Verifier;
use tower_proto::handshake::{self, Refusal, ServerHello};
use tower_proto::names::validate_cluster_name;
use tower_proto::{ControlMessage, Preamble};
use tower_tunnel::SessionConfig;
use tower_tunnel::control::{self, Keepalive};
use tower_tunnel::session::{self, Role};

use crate::http2::Http2Channel;
use crate::metrics::Metrics;
use crate::registry::{Registry, Tunnel};
use crate::status::{Body, text};

/// The longest a newcomer waits while the cluster's live tunnel is asked for a pong.
const CONFLICT_PROBE: Duration = Duration::from_secs(3);

/// The longest a dial waits for this server's first list of Cluster objects before it is
/// refused (503): below the agent's dial timeout (15 s by default), so the agent hears why.
const HOLD_UNTIL_LISTED: Duration = Duration::from_secs(10);

/// Accepts agent tunnels.
pub(crate) struct Acceptor {
    pub(crate) registry: Arc<Registry>,
    pub(crate) verifier: Verifier,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) hello: ServerHello,
    /// The replica count now (`hello.server_count` is only the start value).
    pub(crate) server_count: Arc<AtomicU16>,
    pub(crate) keepalive: Keepalive,
    pub(crate) session: SessionConfig,
    pub(crate) draining: CancellationToken,
    pub(crate) sessions: TaskTracker,
    pub(crate) grace: Duration,
}

impl Acceptor {
    /// Answers one request on the tunnel listener.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<Body> {
        if req.uri().path() == "/healthz" {
            return text(StatusCode::OK, "ok");
        }
        let mut admitted = self.admit(&req);
        if matches!(admitted, Err((Refusal::Draining, _)))
            && !self.registry.is_synced()
            && !self.draining.is_cancelled()
        {
            // The agent's credentials passed, but the Cluster objects are not listed yet
            // (this server just started). Holding the dial until they are admits a fleet
            // that comes back together at once, where a refusal costs each agent a TLS
            // handshake per retry and climbs its backoff: 10,000 agents refused for the
            // 2.5 s of a list took 30 s to all come back (B9, Kubernetes mode).
            let listed = tokio::select! {
                listed = self.registry.wait_synced(HOLD_UNTIL_LISTED) => listed,
                () = self.draining.cancelled() => false,
            };
            if listed {
                admitted = self.admit(&req);
            }
        }
        match admitted {
            Ok(admitted) => match self.second_agent(&admitted.cluster, remote).await {
                Some(refused) => refused,
                None => self.upgrade(req, admitted, remote),
            },
            Err((refusal, reason)) => {
                self.metrics.count_refusal(refusal);
                // The reason quotes what the agent sent (names, a token's alg): a string field, so
                // that text logs show it escaped (in Debug) and JSON as a string.
                tracing::info!(%remote, status = refusal.status(), reason = reason.as_str(), "refused a tunnel");
                let mut response = text(
                    StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST),
                    reason,
                );
                if refusal == Refusal::UnsupportedVersion {
                    response.headers_mut().insert(
                        header::UPGRADE,
                        header::HeaderValue::from_static(handshake::UPGRADE_PROTOCOL),
                    );
                }
                response
            }
        }
    }

    /// A newcomer for a cluster whose live tunnel answers a ping now is a second agent
    /// with the same token (a copied Secret, a stolen token): it is refused with 409, so it
    /// never receives callers' requests and their tokens. A live tunnel that does not
    /// answer within the probe (its agent restarted, its link died) is replaced at once.
    async fn second_agent(&self, cluster: &str, remote: SocketAddr) -> Option<Response<Body>> {
        let live = self.registry.tunnel(cluster).ok()?;
        let within = self.keepalive.timeout.min(CONFLICT_PROBE);
        if !live.health.answers(&live.control, within).await {
            tracing::info!(%cluster, live = %live.remote_addr, newcomer = %remote, "the live tunnel did not answer a ping: the newcomer replaces it");
            return None;
        }
        let refusal = Refusal::Conflict;
        self.metrics.count_refusal(refusal);
        self.registry.record_conflict(
            cluster,
            crate::registry::Conflict {
                newcomer: remote.to_string(),
                live: live.remote_addr.clone(),
                at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            },
        );
        tracing::warn!(%cluster, live = %live.remote_addr, newcomer = %remote, "refused a second agent: the live tunnel answered");
        let mut response = text(
            StatusCode::CONFLICT,
            format!(
                "cluster {cluster:?} already has a live agent tunnel (from {}), which answered just now: \
                 a second agent with the same token is refused. If this agent replaces that one, \
                 it gets through once the old one stops.",
                live.remote_addr
            ),
        );
        response.headers_mut().insert(
            handshake::HEADER_REFUSAL,
            header::HeaderValue::from_static(refusal.as_str()),
        );
        Some(response)
    }

    fn admit(&self, req: &Request<Incoming>) -> Result<Admitted, (Refusal, String)> {
        if req.uri().path() != handshake::TUNNEL_PATH {
            return Err((
                Refusal::UnknownCluster,
                format!(
                    "this is tower's tunnel listener: agents dial GET {}",
                    handshake::TUNNEL_PATH
                ),
            ));
        }
        if self.draining.is_cancelled() {
            return Err((
                Refusal::Draining,
                "this server is draining: dial again".into(),
            ));
        }
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if req.method() != Method::GET || upgrade.is_empty() {
            return Err((
                Refusal::BadRequest,
                format!(
                    "expected GET {} with Connection: Upgrade and Upgrade: {}",
                    handshake::TUNNEL_PATH,
                    handshake::UPGRADE_PROTOCOL
                ),
            ));
        }
        if !handshake::upgrade_matches(upgrade) {
            return Err((
                Refusal::UnsupportedVersion,
                format!(
                    "this server speaks {}, not {upgrade:?}: upgrade the agent or the server",
                    handshake::UPGRADE_PROTOCOL
                ),
            ));
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let token = tower_auth::bearer(header(header::AUTHORIZATION.as_str())).ok_or((
            Refusal::BadToken,
            tower_auth::AuthError::Missing.to_string(),
        ))?;
        let claims = self
            .verifier
            .verify_agent(token)
            .map_err(|e| (Refusal::BadToken, format!("agent token refused: {e}")))?;
        let name = header(handshake::HEADER_CLUSTER);
        if name.is_empty() {
            return Err((
                Refusal::BadRequest,
                format!(
                    "missing {} header (the agent's --name)",
                    handshake::HEADER_CLUSTER
                ),
            ));
        }
        validate_cluster_name(name).map_err(|e| (Refusal::BadRequest, e.to_string()))?;
        if name != claims.sub {
            return Err((
                Refusal::Forbidden,
                format!(
                    "agent --name {name:?} does not match its token, which is for cluster {:?}",
                    claims.sub
                ),
            ));
        }
        if handshake::list(header(handshake::HEADER_HELD)).any(|id| id == self.hello.server_id) {
            return Err((
                Refusal::Duplicate,
                format!(
                    "this agent already holds a tunnel to replica {:?}",
                    self.hello.server_id
                ),
            ));
        }
        if !self.registry.is_synced() {
            return Err((
                Refusal::Draining,
                "this server has not listed its Cluster objects yet: dial again".into(),
            ));
        }
        self.registry
            .admits(name, token)
            .map_err(|e| (Refusal::Forbidden, e.to_string()))?;
        if !handshake::list(header(handshake::HEADER_CAPABILITIES))
            .any(|c| c == handshake::CAPABILITY_IDENTITY)
        {
            return Err((
                Refusal::UnsupportedVersion,
                "this agent checks callers' tokens with the jwtSecret itself; this server \
                 sends identity assertions signed with the cluster's own key instead: \
                 upgrade tower-agent"
                    .into(),
            ));
        }
        Ok(Admitted {
            replicas: self.holders(handshake::list(header(handshake::HEADER_HELD))),
            token: token.into(),
            token_exp: claims.exp,
            cluster: claims.sub,
            agent_version: header(handshake::HEADER_AGENT_VERSION)
                .chars()
                .take(64)
                .collect(),
            targets: handshake::list(header(handshake::HEADER_TARGETS))
                .take(16)
                .map(String::from)
                .collect(),
            http2: handshake::list(header(handshake::HEADER_CAPABILITIES))
                .any(|c| c == handshake::CAPABILITY_HTTP2),
        })
    }

    fn upgrade(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        admitted: Admitted,
        remote: SocketAddr,
    ) -> Response<Body> {
        let on_upgrade = hyper::upgrade::on(&mut req);
        let this = self.clone();
        self.sessions.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    this.run_session(hyper_util::rt::TokioIo::new(upgraded), admitted, remote)
                        .await
                }
                Err(e) => tracing::info!(%remote, error = %e, "tunnel upgrade failed"),
            }
        });
        let mut response = Response::new(crate::status::full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        headers.insert(
            header::UPGRADE,
            header::HeaderValue::from_static(handshake::UPGRADE_PROTOCOL),
        );
        let hello = ServerHello {
            server_count: self.server_count.load(Ordering::Relaxed),
            ..self.hello.clone()
        };
        for (name, value) in hello.headers() {
            if let Ok(value) = header::HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        response
    }

    async fn run_session<T>(&self, io: T, admitted: Admitted, remote: SocketAddr)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let cluster = admitted.cluster;
        let (handle, _inbound, driver) = session::start(io, Role::Server, &self.session);
        let driver = tokio::spawn(driver.run());
        let control_stream = async {
            let mut stream = handle.open_stream().await?;
            stream
                .write_preamble(&Preamble::control(&self.hello.server_id))
                .await?;
            Ok::<_, tower_tunnel::TunnelError>(stream)
        };
        let control_stream = match control_stream.await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%cluster, %remote, error = %e, "could not open the control stream");
                handle.close();
                tower_tunnel::session::finish(driver).await;
                return;
            }
        };
        let (control_tx, control_rx) = mpsc::channel(8);
        let (events_tx, mut events_rx) = mpsc::channel(8);
        let id = self.registry.next_id();
        let tunnel = Arc::new(Tunnel {
            id,
            session: handle.clone(),
            control: control_tx,
            since: SystemTime::now(),
            agent_version: admitted.agent_version,
            remote_addr: remote.to_string(),
            targets: admitted.targets,
            token: admitted.token,
            replicas: Arc::new(std::sync::RwLock::new(admitted.replicas)),
            http2: admitted.http2.then(|| {
                Arc::new(Http2Channel::new(
                    handle.clone(),
                    self.hello.server_id.as_str().into(),
                    self.metrics.clone(),
                ))
            }),
            health: Arc::default(),
            kubernetes: crate::frontend::PoolAddress::new(
                tower_proto::preamble::KUBERNETES_TARGET,
                id,
                &cluster,
            ),
        });
        let token = tunnel.token.clone();
        let replicas = tunnel.replicas.clone();
        let health = tunnel.health.clone();
        let this_tunnel = tunnel.clone();
        let token_expired = until_unix(admitted.token_exp);
        tokio::pin!(token_expired);
        let mut expired = false;
        self.metrics.tunnels.inc();
        let (replaced, reconnect) = self.registry.insert(&cluster, tunnel);
        if reconnect {
            self.metrics.reconnects.inc();
        }
        // The Cluster may have changed (token rotated, deleted) since the handshake.
        if let Err(e) = self.registry.admits(&cluster, &token) {
            tracing::warn!(%cluster, tunnel = id, error = %e, "no longer admitted: closing");
            handle.close();
        }
        if let Some(old) = replaced {
            retire(old, self.grace);
        }
        tracing::info!(%cluster, %remote, tunnel = id, "agent connected");
        // It dialed with the token the Cluster's current one renewed (an agent restarted
        // from a Deployment that carries the old one): give it the new one.
        if let Some(renewed) = self.registry.renewed_token(&cluster, &token) {
            tracing::info!(%cluster, tunnel = id, "the agent dialed with a renewed token: giving it the new one");
            let _ = this_tunnel
                .control
                .try_send(tower_proto::ControlMessage::Token { token: renewed });
        }

        let control = control::run(
            control_stream,
            self.keepalive,
            control_rx,
            events_tx,
            &health,
        );
        tokio::pin!(control);
        loop {
            tokio::select! {
                result = &mut control => {
                    match result {
                        Ok(()) => tracing::info!(%cluster, tunnel = id, "agent closed its control stream"),
                        Err(e) => tracing::warn!(%cluster, tunnel = id, error = %e, "closing tunnel"),
                    }
                    break;
                }
                Some(event) = events_rx.recv() => match event {
                    ControlMessage::Held { server_ids } => {
                        let holders = self.holders(server_ids.iter().map(String::as_str));
                        *replicas.write().unwrap_or_else(|e| e.into_inner()) = holders;
                    }
                    ControlMessage::Drain { grace_ms } => {
                        // The agent is going away: route nothing new here; what runs on
                        // the tunnel finishes, and the agent closes it. Logged once done, so
                        // the line says the tunnel is unrouted.
                        self.registry.remove(&cluster, id);
                        tracing::info!(%cluster, tunnel = id, grace_ms, "agent is draining: unrouted");
                    }
                    event => tracing::debug!(%cluster, ?event, "control message from agent"),
                },
                () = &mut token_expired, if !expired => {
                    expired = true;
                    // The agent redials at once on the drain, with its token file read
                    // again: a rotated token reconnects, an expired one is refused (401).
                    tracing::warn!(%cluster, tunnel = id, grace = ?self.grace, "the agent token expired: draining the tunnel");
                    self.registry.remove(&cluster, id);
                    retire(this_tunnel.clone(), self.grace);
                }
                () = handle.closed() => break,
            }
        }
        // Unroute first, so callers get a fast 503 instead of a dying tunnel; then close.
        self.registry.remove(&cluster, id);
        self.metrics.tunnels.dec();
        handle.close();
        tower_tunnel::session::finish(driver).await;
        tracing::info!(%cluster, %remote, tunnel = id, "agent disconnected");
    }
}

impl Acceptor {
    /// The replicas an agent says it holds, bounded, sorted, with this one (held by
    /// definition).
    fn holders<'a>(&self, said: impl Iterator<Item = &'a str>) -> Vec<String> {
        let mut holders: Vec<String> = said
            .take(64)
            .map(String::from)
            .chain(std::iter::once(self.hello.server_id.clone()))
            .collect();
        holders.sort();
        holders.dedup();
        holders
    }
}

struct Admitted {
    cluster: String,
    token: Arc<str>,
    /// The agent token's `exp` (Unix seconds): the tunnel is drained then.
    token_exp: Option<u64>,
    replicas: Vec<String>,
    agent_version: String,
    targets: Vec<String>,
    /// The agent serves HTTP/2 streams.
    http2: bool,
}

/// Resolves at `exp` (Unix seconds); never without one.
async fn until_unix(exp: Option<u64>) {
    let Some(exp) = exp else {
        return std::future::pending().await;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    tokio::time::sleep(Duration::from_secs(exp.saturating_sub(now))).await;
}

/// Drains a tunnel that a newer one replaced (or whose token expired): tells the agent (which stops using it), then
/// closes it after `grace`, so requests still running on it can finish.
pub(crate) fn retire(tunnel: Arc<Tunnel>, grace: Duration) {
    tokio::spawn(async move {
        let _ = tunnel
            .control
            .send(ControlMessage::Drain {
                grace_ms: grace.as_millis().min(u128::from(u32::MAX)) as u32,
            })
            .await;
        tokio::select! {
            () = tokio::time::sleep(grace) => {}
            () = tunnel.session.closed() => return,
        }
        tunnel.session.close();
    });
}
