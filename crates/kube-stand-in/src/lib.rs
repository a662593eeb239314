//! A stand-in for a member cluster's kube-apiserver, for Tower's tests and benchmarks.
//!
//! [`StandIn::start`] serves HTTPS (HTTP/1.1) on a listener the caller bound, with a CA and
//! serving certificate it generates itself. It speaks enough of the Kubernetes API that the
//! real `kubectl` works against it unchanged:
//!
//! * discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}[/{version}]`,
//!   `/openapi/v3`; `/openapi/v2` is a 404 on purpose);
//! * `namespaces`, `pods`, `configmaps`, `services` and KubeSphere `clusters` in memory: get,
//!   list, create, replace, merge and strategic-merge patch, JSON patch, server-side apply
//!   with field ownership (`metadata.managedFields`, conflicts, `force`: `store::fields`),
//!   server-side dry runs (`dryRun=All`: answered, never stored), unknown fields dropped,
//!   named in `Warning` headers or refused (`fieldValidation`; built-in kinds decoded as
//!   their types, `store::decode`; Clusters by their CRD's schema, `store::crd`), delete,
//!   server-side `Table`
//!   printing, and watches that replay an in-memory history and then fan out live
//!   events from one broadcast channel. No services or clusters are seeded;
//! * content negotiation (module `negotiate`): `configmaps` and `secrets` are answered in
//!   protobuf (`application/vnd.kubernetes.protobuf`, watches `…;stream=watch`: length-
//!   prefixed `WatchEvent`s) to a client that asks for it, as client-go's informers do;
//!   other kinds in JSON, or 406 to a client that takes no JSON. Objects, lists and errors
//!   larger than 128 KiB are gzipped for a client that sends `Accept-Encoding: gzip` (as
//!   kubectl does), never watches; [`StandIn::gzipped_responses`] counts them;
//! * pod logs (`follow` streams a line every 100 ms), exec and attach over WebSocket
//!   (`v5.channel.k8s.io`, `v4.channel.k8s.io`) running [`command::run_command`], and the
//!   SPDY upgrades (exec, port-forward) handed to [`spdy`]; a TTY's resize messages (WebSocket
//!   channel 4, SPDY's `resize` stream) are recorded ([`StandIn::terminal_resizes`]);
//! * a small in-memory filesystem per pod ([`files::PodFiles`]), shared by every exec into
//!   it, that the simulated `tar` reads and writes, so `kubectl cp` works both ways;
//! * a seeded namespace `bulk` whose configmaps total more than 55 MB, and
//!   `/debug/bytes?size=N` for raw throughput;
//! * `services` (core `v1`: a cluster IP and node ports are allocated) and KubeSphere's
//!   cluster-scoped `clusters` (`cluster.kubesphere.io/v1alpha1`, served like a custom
//!   resource: pruned and checked against v3.4.1's CRD schema, module `store::crd`) both
//!   have a `status` subresource: only `…/status` changes `.status`;
//! * KubeSphere's `users` (`iam.kubesphere.io/v1alpha2`), pruned and checked against
//!   v3.4.1's CRD schema like `clusters`, with no status subresource;
//! * the service proxy (`services/{[scheme:]name[:port]}/proxy/…`, module
//!   `service_proxy`) to an address the Service's `endpoints` name; Endpoints are stored as
//!   written (no endpoints controller), so a test points them at a listener of its own;
//! * `secrets` (`stringData` folded into `data`), `serviceaccounts` (with the `token`
//!   subresource: TokenRequest, so `kubectl create token` works), the four RBAC kinds
//!   (`rbac.authorization.k8s.io/v1`) and `poddisruptionbudgets` (`policy/v1`), so that
//!   Tower's own manifests (`kubectl apply -k deploy/host`, an agent.yaml) go in;
//! * authentication as kube-apiserver does it (module `auth`): the static token is
//!   user [`ADMIN_USER`] in `system:masters`; a client certificate is its CN with its O
//!   values as groups; ServiceAccount tokens from TokenRequest are
//!   `system:serviceaccount:NS:NAME` until they expire or their ServiceAccount is deleted;
//!   no credential is `system:anonymous`; a bearer token nobody accepts is a 401;
//! * impersonation (`Impersonate-User`, `-Group`, `-Uid`, `-Extra-*`) checked against the
//!   `impersonate` verb, and RBAC authorization of every request, resource and
//!   non-resource alike, with `system:masters` allowed everything and the bootstrap policy
//!   (`cluster-admin`, `system:discovery`, `system:basic-user`,
//!   `system:public-info-viewer` and their bindings) seeded as objects; refusals are the
//!   apiserver's 403 `Status` with its message. [`StandIn::start`] adds one test fixture on
//!   top, the ClusterRoleBinding [`FIXTURE_BINDING`] that makes every authenticated user
//!   `cluster-admin` (so impersonating anyone works); [`StandIn::start_strict`] leaves it
//!   out, as a fresh cluster;
//! * `SelfSubjectReview` and `SelfSubjectAccessReview`, so `kubectl auth whoami` and
//!   `kubectl auth can-i` answer as on a real cluster;
//! * every call recorded (credential, `Impersonate-*` headers, and the user and groups it
//!   ran as) for tests to inspect through [`StandIn::calls`];
//! * faults for clients that must survive an apiserver restart:
//!   [`StandIn::drop_connections`] cuts every open connection, and
//!   [`StandIn::set_available`] refuses connections until it is turned back on.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod api;
mod auth;
mod clock;
pub mod command;
mod connections;
mod discovery;
mod exec_ws;
pub mod files;
mod logs;
mod negotiate;
mod openapi;
mod protobuf;
mod rbac;
mod review;
mod service_proxy;
pub mod spdy;
pub mod status;
mod store;
mod table;
mod tls;
mod tty;
pub use tty::Resizes;
mod watch;

pub use auth::ADMIN_USER;

/// Name of the ClusterRoleBinding [`StandIn::start`] seeds as a test fixture: Group
/// `system:authenticated` bound to ClusterRole `cluster-admin`.
pub const FIXTURE_BINDING: &str = rbac::FIXTURE_BINDING;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most requests at once on one HTTP/2 connection: kube-apiserver's default (its
/// `--http2-max-streams-per-connection`) since kubernetes#121120.
pub const HTTP2_MAX_STREAMS: u32 = 100;
/// How long open connections get to finish after [`StandIn::shutdown`].
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One request the stand-in served (or refused), as [`StandIn::calls`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path and query as sent, e.g. `/api/v1/namespaces/default/pods?limit=500`.
    pub path_and_query: String,
    /// How the caller authenticated: `token`, `token#N` (the Nth token given to
    /// [`StandIn::accept_token`]), `client-cert:<CN>`, `serviceaccount:<NS>/<NAME>` (a
    /// token from TokenRequest) or `anonymous` (no credential; or, with
    /// [`Call::saw_authorization`], a bearer token that was refused with 401).
    pub credential: String,
    /// The `Impersonate-User` header, if any.
    pub impersonate_user: Option<String>,
    /// Every `Impersonate-Group` header, in order.
    pub impersonate_groups: Vec<String>,
    /// Whether the request carried an `Authorization` header at all.
    pub saw_authorization: bool,
    /// The HTTP version it came over (HTTP/1.1 or HTTP/2).
    pub version: http::Version,
    /// The user the request ran as, after impersonation (`system:anonymous` without a
    /// credential); the requesting user when impersonation was refused; `None` after a 401.
    pub user: Option<String>,
    /// That user's groups (including `system:authenticated` or `system:unauthenticated`).
    pub groups: Vec<String>,
    /// The `Accept` header, if any.
    pub accept: Option<String>,
    /// The `Accept-Encoding` header, if any.
    pub accept_encoding: Option<String>,
    /// The `User-Agent` header, if any (a write's field manager when it names none).
    pub user_agent: Option<String>,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// How an exec or attach session reached the stand-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecTransport {
    /// WebSocket (`v5.channel.k8s.io` or `v4.channel.k8s.io`): resizes on channel 4.
    WebSocket,
    /// SPDY/3.1: resizes on the stream whose `streamType` is `resize`.
    Spdy,
}

/// A terminal size a TTY session's client sent, as the kubelet reads it: a JSON
/// `{"Width":…,"Height":…}`; sizes with a zero side are ignored, as the kubelet does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalResize {
    /// Which transport carried it.
    pub transport: ExecTransport,
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// Which credential [`StandIn::kubeconfig_yaml`] embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeconfigAuth {
    /// The bearer ("ServiceAccount") token.
    Token,
    /// The client certificate and key (CN `tower-agent-client`).
    ClientCert,
}

/// State shared by the accept loop, every connection and every stream.
pub(crate) struct Shared {
    pub(crate) store: store::Store,
    /// Decides what each user may do, from the RBAC objects in `store`.
    pub(crate) authorizer: rbac::Authorizer,
    /// Issues and checks ServiceAccount tokens.
    pub(crate) tokens: auth::TokenIssuer,
    pub(crate) token: String,
    /// Tokens accepted besides `token` ([`StandIn::accept_token`]), as after a rotation.
    pub(crate) more_tokens: Mutex<Vec<String>>,
    pub(crate) calls: Mutex<Vec<Call>>,
    /// Each pod's files, for the commands exec runs.
    pub(crate) filesystems: files::Filesystems,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) open_streams: AtomicUsize,
    /// Every open connection, for [`StandIn::drop_connections`].
    pub(crate) connections: Arc<connections::Connections>,
    /// Cleared by [`StandIn::set_available`]: new connections are closed at once.
    pub(crate) available: AtomicBool,
    /// Connections closed at once because the stand-in was unavailable.
    pub(crate) refused: AtomicU64,
    /// Responses sent gzipped.
    pub(crate) gzipped: AtomicU64,
    /// Every terminal size TTY sessions received, in order.
    pub(crate) resizes: Resizes,
    /// Set by [`StandIn::hold_watch_events`]: open watches send no live event until cleared.
    pub(crate) watches_held: tokio::sync::watch::Sender<bool>,
}

/// Counts an open long-lived stream (watch, log follow, exec session) while alive.
pub(crate) struct StreamGuard(Arc<Shared>);

impl StreamGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> StreamGuard {
        shared.open_streams.fetch_add(1, Ordering::SeqCst);
        StreamGuard(shared.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running stand-in kube-apiserver. Dropping it shuts it down.
pub struct StandIn {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl StandIn {
    /// Serves on an already-bound listener (tests bind `127.0.0.1:0`). Generates its own CA
    /// and serving certificate (SANs 127.0.0.1, ::1, localhost) and seeds the store: the
    /// objects listed in the crate docs, the RBAC bootstrap policy, and the test fixture
    /// [`FIXTURE_BINDING`], which makes every authenticated user (any impersonated one
    /// included) `cluster-admin`. `token` authenticates as [`ADMIN_USER`] in
    /// `system:masters`.
    pub async fn start(listener: TcpListener, token: impl Into<String>) -> anyhow::Result<StandIn> {
        StandIn::start_with_policy(listener, token.into(), false).await
    }

    /// Like [`StandIn::start`], but with only the bootstrap policy, as a fresh cluster:
    /// users other than `system:masters` members may discover the API and read
    /// `/version` and `/healthz`, and nothing else until a Role or ClusterRole is bound
    /// to them.
    pub async fn start_strict(
        listener: TcpListener,
        token: impl Into<String>,
    ) -> anyhow::Result<StandIn> {
        StandIn::start_with_policy(listener, token.into(), true).await
    }

    async fn start_with_policy(
        listener: TcpListener,
        token: String,
        strict: bool,
    ) -> anyhow::Result<StandIn> {
        anyhow::ensure!(!token.is_empty(), "the stand-in's token must not be empty");
        let addr = listener
            .local_addr()
            .context("reading the listener's address")?;
        let pki = tls::Pki::generate()?;
        let acceptor = TlsAcceptor::from(pki.server_config()?);
        let store = tokio::task::spawn_blocking(move || {
            let store = store::Store::seeded();
            if !strict {
                store.seed(
                    store::Resource::ClusterRoleBindings,
                    "",
                    rbac::permissive_fixture(),
                );
            }
            store
        })
        .await
        .context("seeding the store")?;
        let shared = Arc::new(Shared {
            store,
            authorizer: rbac::Authorizer::default(),
            tokens: auth::TokenIssuer::default(),
            token,
            more_tokens: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            filesystems: files::Filesystems::default(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            open_streams: AtomicUsize::new(0),
            connections: Arc::new(connections::Connections::default()),
            available: AtomicBool::new(true),
            refused: AtomicU64::new(0),
            gzipped: AtomicU64::new(0),
            resizes: Resizes::default(),
            watches_held: tokio::sync::watch::Sender::new(false),
        });
        shared
            .tracker
            .spawn(accept_loop(shared.clone(), listener, acceptor));
        tracing::info!(%addr, "kube stand-in listening");
        Ok(StandIn {
            shared,
            addr,
            ca_pem: pki.ca_pem,
            client_cert_pem: pki.client_cert_pem,
            client_key_pem: pki.client_key_pem,
        })
    }

    /// `https://127.0.0.1:PORT` (or the listener's address).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the serving certificate and the client certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The accepted bearer ("ServiceAccount") token.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Accepts `token` too, as kube-apiserver accepts both the old and the new token
    /// of a rotated ServiceAccount; calls with it are recorded with credential
    /// `token#N`, N counting the tokens added this way from 1.
    pub fn accept_token(&self, token: impl Into<String>) {
        self.shared
            .more_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(token.into());
    }

    /// Moves the stand-in's clock for ServiceAccount tokens forward by `by`, so that tests
    /// can see a token expire without waiting (TokenRequest's shortest lifetime is ten
    /// minutes). Nothing else (timestamps, ages, watch timeouts) is affected.
    pub fn advance_clock(&self, by: Duration) {
        self.shared
            .tokens
            .advance(i64::try_from(by.as_secs()).unwrap_or(i64::MAX));
    }

    /// PEM of a client certificate (CN `tower-agent-client`, O `system:masters`) accepted
    /// instead of the token.
    pub fn client_cert_pem(&self) -> &str {
        &self.client_cert_pem
    }

    /// PEM (PKCS#8) of the client certificate's key.
    pub fn client_key_pem(&self) -> &str {
        &self.client_key_pem
    }

    /// A kubeconfig for this stand-in (CA inline) with either the token or the client
    /// certificate and key inline. Context, cluster and user are all named `stand-in`.
    pub fn kubeconfig_yaml(&self, auth: KubeconfigAuth) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let user = match auth {
            // A JSON string is a valid YAML scalar whatever the token contains.
            KubeconfigAuth::Token => format!(
                "    token: {}\n",
                serde_json::Value::String(self.shared.token.clone())
            ),
            KubeconfigAuth::ClientCert => format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&self.client_cert_pem),
                b64(&self.client_key_pem)
            ),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: stand-in\n  user:\n{user}contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n    namespace: default\ncurrent-context: stand-in\n",
            self.url(),
            b64(&self.ca_pem),
        )
    }

    /// Every request served so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many responses were sent gzipped (larger than 128 KiB, to a client that asked).
    pub fn gzipped_responses(&self) -> u64 {
        self.shared.gzipped.load(Ordering::SeqCst)
    }

    /// Every terminal size that TTY exec and attach sessions received, in order.
    pub fn terminal_resizes(&self) -> Vec<TerminalResize> {
        self.shared.resizes.all()
    }

    /// How many long-lived streams (watches, followed logs, exec sessions) are open now.
    /// Tests use it to check that a client going away ends its stream.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }

    /// Serves Clusters with (the default) or without the status subresource, as
    /// KubeSphere's own CRD does: without it, `…/status` is 404 and writes to the object
    /// change `.status` too.
    pub fn set_cluster_status_subresource(&self, on: bool) {
        self.shared.store.set_cluster_status_subresource(on);
    }

    /// `true`: open watches keep each live event back (in order, none lost) until called
    /// with `false`, as an apiserver's watch cache lagging behind etcd does. A watcher's
    /// copy of an object then trails what reads and writes see, so a test can make a
    /// client write from a stale copy on purpose.
    pub fn hold_watch_events(&self, held: bool) {
        self.shared.watches_held.send_replace(held);
    }

    /// Abruptly closes every open connection, as if the apiserver had died: in-flight
    /// watches and streams end without a clean end of their body (and without a TLS
    /// `close_notify`), upgraded exec and port-forward sessions are cut too. The listener
    /// keeps accepting, so the next request on a new connection succeeds.
    pub fn drop_connections(&self) {
        self.shared.connections.cut_all();
    }

    /// `false`: every newly accepted connection is closed at once (after accept, before the
    /// TLS handshake) and every open one is cut as by [`StandIn::drop_connections`] — the
    /// apiserver is down. `true`: it serves again.
    pub fn set_available(&self, available: bool) {
        // Store first, then cut: a connection registered after the cut sees the flag.
        self.shared.available.store(available, Ordering::SeqCst);
        if !available {
            self.shared.connections.cut_all();
        }
        tracing::info!(available, "stand-in availability changed");
    }

    /// Whether it serves (see [`StandIn::set_available`]).
    pub fn is_available(&self) -> bool {
        self.shared.available.load(Ordering::SeqCst)
    }

    /// How many connections were closed at once while unavailable. Tests poll it to know
    /// that a client has tried (and failed) to reach the stand-in.
    pub fn refused_connections(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// How many TCP connections are open now (including upgraded exec and port-forward
    /// sessions). Tests use it to see that a cut connection is gone.
    pub fn open_connections(&self) -> usize {
        self.shared.connections.len()
    }

    /// Stops accepting, ends open watches and streams, and closes connections (after a
    /// short grace period for responses in flight). Returns at once; see
    /// [`StandIn::wait_stopped`].
    pub fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
    }

    /// Waits until every connection and task has ended after [`StandIn::shutdown`].
    pub async fn wait_stopped(&self) {
        self.shared.tracker.wait().await;
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let accepted = tokio::select! {
            () = shared.cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                // Registered before the availability check, so `set_available(false)`
                // either cuts it or this sees the flag.
                let tcp = shared.connections.register(tcp);
                if !shared.available.load(Ordering::SeqCst) {
                    tracing::debug!(%peer, "unavailable: closing a new connection");
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    drop(tcp);
                    continue;
                }
                shared.tracker.spawn(serve_connection(
                    shared.clone(),
                    acceptor.clone(),
                    tcp,
                    peer,
                ));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::select! {
                    () = shared.cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: connections::TrackedStream,
    peer: SocketAddr,
) {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let tls = tokio::select! {
        () = shared.cancel.cancelled() => return,
        tls = handshake => match tls {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let client_cert: Option<Arc<auth::ClientCert>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| {
            let (cn, organizations) = tls::subject_names(cert).unwrap_or_default();
            Arc::new(auth::ClientCert {
                common_name: cn.unwrap_or_default(),
                organizations,
            })
        });
    let service_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = service_shared.clone();
        let client_cert = client_cert.clone();
        async move { Ok::<_, std::convert::Infallible>(api::handle(shared, client_cert, req).await) }
    });
    // HTTP/2 when the client's ALPN asks for it (as kube-apiserver), HTTP/1.1 otherwise
    // (upgrades: exec, attach, port-forward). Each boxed on its own, so that an HTTP/1.1
    // connection does not cost the size of an HTTP/2 one.
    let result = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(HTTP2_MAX_STREAMS)
            .serve_connection(TokioIo::new(tls), service);
        let mut conn = Box::pin(conn);
        tokio::select! {
            result = conn.as_mut() => result,
            () = shared.cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                Ok(())
            }
        }
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades();
        let mut conn = Box::pin(conn);
        tokio::select! {
            result = conn.as_mut() => result,
            () = shared.cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                Ok(())
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}
