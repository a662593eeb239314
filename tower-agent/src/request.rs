//! One request from the tunnel to a target: who the caller is (the server's identity
//! assertion, [`crate::identity`]), what they may not ask for (`Impersonate-*`, front-proxy
//! identity headers), and the call to the upstream with the agent's own credential and
//! the caller's identity impersonated.

use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderName, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tower_tunnel::http::{failure, strip_hop_by_hop};

use crate::Config;
use crate::identity::{IDENTITY_HEADER, IdentityError};
use crate::metrics::Refused;
use crate::upstream::{self, Credentials};
use tower_auth::identity::Asserted;

/// The header names the agent reads, removes or sets on every request, parsed once.
const IDENTITY: HeaderName = HeaderName::from_static(IDENTITY_HEADER);
const IMPERSONATE_USER: HeaderName = HeaderName::from_static("impersonate-user");
const IMPERSONATE_GROUP: HeaderName = HeaderName::from_static("impersonate-group");

/// A response body toward the tunnel.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

fn reply(response: Response<Full<Bytes>>) -> Response<Body> {
    response.map(|b| b.map_err(|never| match never {}).boxed())
}

/// Counts the refusal `why` and answers it with a `Status` saying `message`, with the
/// code and Kubernetes reason of that kind of refusal.
fn refuse(config: &Config, why: Refused, message: &str) -> Response<Body> {
    config.metrics.refused(why);
    let (code, reason) = match why {
        Refused::BadIdentity => (StatusCode::UNAUTHORIZED, "Unauthorized"),
        Refused::NoIdentityKey => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        Refused::PassThrough | Refused::Impersonation | Refused::UnknownTarget => {
            (StatusCode::FORBIDDEN, "Forbidden")
        }
        Refused::BadRequest => (StatusCode::BAD_REQUEST, "BadRequest"),
    };
    reply(failure(code, reason, message))
}

/// Checks, rewrites and forwards one request to `target`.
///
/// Returns an `async` block rather than being an `async fn`, which would keep `req` twice
/// in the future (as captured, and as the local it is moved into): the future is boxed
/// and copied per request (BENCHMARKS.md, "Smaller request futures"). It owns what it
/// uses, so the caller can make it where the request is and box it as it is, instead of
/// in a block of its own that would hold the request once more.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would hold `req` twice in the future"
)]
pub(crate) fn handle_request<B>(
    config: Arc<Config>,
    target: Arc<str>,
    mut req: Request<B>,
) -> impl Future<Output = Response<Body>> + 'static
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<upstream::BoxError>,
{
    async move {
        let target: &str = &target;
        // On the member's path, before the upstream's base is put in front of it.
        let watch = tower_proto::request_info::is_watch(req.method(), req.uri());
        let Some(upstream) = config.targets.get(target) else {
            return refuse(
                &config,
                Refused::UnknownTarget,
                &format!("target {target:?} is not on this agent's allowlist"),
            );
        };
        let identity = match config
            .identity
            .verify(req.headers().get(&IDENTITY).and_then(|v| v.to_str().ok()))
        {
            Ok(Asserted::User(identity)) => Some(identity),
            Ok(Asserted::PassThrough) => None,
            Err(e @ IdentityError::NoKey(_)) => {
                return refuse(&config, Refused::NoIdentityKey, &e.to_string());
            }
            Err(e) => {
                return refuse(&config, Refused::BadIdentity, &e.to_string());
            }
        };
        if identity.is_none()
            && matches!(upstream.credentials, Some(Credentials::ClientCertificate))
        {
            // kube-apiserver authenticates a client certificate before a bearer token: the
            // caller's credential would run as this agent.
            return refuse(
                &config,
                Refused::PassThrough,
                "tower-agent: this agent calls its API server with a client certificate, \
             which would take the place of your credential: pass-through needs an agent \
             that uses a token (in a pod, its ServiceAccount)",
            );
        }
        // On every target: a target without credentials of ours (ks-apiserver) proxies to its
        // own kube-apiserver with a privileged credential, where Impersonate-* would act.
        if req.headers().keys().any(is_impersonation)
            && !(identity.is_some()
                && upstream.credentials.is_some()
                && is_discovery(req.method(), req.uri().path()))
        {
            // kubectl sends --as on its discovery requests too, and shows only "Forbidden:
            // unknown" when one is refused. Discovery reads the same for every user: with
            // our own credentials it is served as the token's user (its Impersonate-*
            // headers are replaced below), and the request that follows is refused here,
            // with the reason.
            let user = identity
                .as_ref()
                .map_or("your credential's own", |i| &i.user);
            config.metrics.refused(Refused::Impersonation);
            return refuse_impersonation(req.headers(), user);
        }
        let client_upgrade = req
            .headers()
            .contains_key(header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        // In a block of its own: the parts are dead once the request is built, and so
        // take no room in the future across the send.
        let request = {
            let (mut parts, body) = req.into_parts();
            // Whatever the tunnel stream spoke; the upstream pools pick their own version.
            parts.version = http::Version::HTTP_11;
            let root = PathAndQuery::from_static("/");
            parts.uri = match upstream.uri_for(parts.uri.path_and_query().unwrap_or(&root)) {
                Ok(uri) => uri,
                Err(e) => {
                    return refuse(&config, Refused::BadRequest, &e.to_string());
                }
            };
            strip_hop_by_hop(&mut parts.headers);
            // Meant for this agent alone.
            parts.headers.remove(&IDENTITY);
            // The server strips these too; the member is the authority, so it checks again.
            tower_tunnel::http::strip_remote_identity(&mut parts.headers);
            parts.headers.remove(header::HOST);
            // A pass-through credential goes as it came: the member's API server judges it.
            if let (Some(credentials), Some(identity)) = (&upstream.credentials, &identity) {
                // The member is the authority: replace the caller's credentials and any
                // Impersonate-* headers (only a discovery read gets here with some) with our own
                // credentials and the verified identity.
                parts.headers.remove(header::AUTHORIZATION);
                let asked: Vec<_> = parts
                    .headers
                    .keys()
                    .filter(|n| is_impersonation(n))
                    .cloned()
                    .collect();
                for name in asked {
                    parts.headers.remove(name);
                }
                match credentials {
                    Credentials::Token(authorization) => {
                        parts
                            .headers
                            .insert(header::AUTHORIZATION, authorization.clone());
                    }
                    Credentials::TokenFile(file) => {
                        parts
                            .headers
                            .insert(header::AUTHORIZATION, file.authorization());
                    }
                    Credentials::ClientCertificate | Credentials::None => {}
                }
                // As client-go sends them (`ImpersonatingRoundTripper`): the names' bytes,
                // UTF-8 included, which Go's server takes (`httpguts.ValidHeaderFieldValue`
                // refuses only control characters). A name that cannot be sent refuses the
                // request: a group left out could be one a policy denies.
                let Ok(user) = header::HeaderValue::from_bytes(identity.user.as_bytes()) else {
                    return refuse(
                        &config,
                        Refused::BadRequest,
                        "the token's user name cannot be sent as a header",
                    );
                };
                parts.headers.insert(IMPERSONATE_USER, user);
                for group in &identity.groups {
                    let Ok(group) = header::HeaderValue::from_bytes(group.as_bytes()) else {
                        return refuse(
                            &config,
                            Refused::BadRequest,
                            &format!(
                                "the token's group {:?} cannot be sent as a header",
                                group.chars().take(64).collect::<String>()
                            ),
                        );
                    };
                    parts.headers.append(&IMPERSONATE_GROUP, group);
                }
            }
            Request::from_parts(parts, body.map_err(Into::into).boxed_unsync())
        };
        let sent = std::time::Instant::now();
        let answer = upstream.send(request, watch).await;
        let code = answer.as_ref().ok().map(|r| r.status().as_u16());
        config.metrics.upstream(target, code, sent.elapsed());
        let mut response = match answer {
            Ok(response) => response,
            Err(e) => {
                let e = tower_tunnel::http::error_chain(&*e);
                tracing::warn!(%target, error = %e, "upstream request failed");
                return reply(failure(
                    StatusCode::BAD_GATEWAY,
                    "InternalError",
                    &format!("tower-agent could not reach its {target} upstream: {e}"),
                ));
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                // The server bounds how long it may sit idle; its end closes this one.
                tokio::spawn(tower_tunnel::http::join_upgrades(
                    client_upgrade,
                    upstream_upgrade,
                    || {},
                ));
            }
        } else {
            strip_hop_by_hop(response.headers_mut());
        }
        response
    }
}

/// Whether `name` is one of kube-apiserver's impersonation headers (`Impersonate-User`,
/// `-Group`, `-Uid`, `-Extra-*`).
fn is_impersonation(name: &http::HeaderName) -> bool {
    name.as_str().starts_with("impersonate-")
}

/// A 403 for a request that asks to impersonate someone (`kubectl --as`, `--as-group`,
/// `--as-uid`: `Impersonate-User`, `-Group`, `-Uid`, `-Extra-*`, or any other
/// `Impersonate-*` header). Tower impersonates the token's own user; silently dropping
/// the caller's wish would run the request as someone the caller did not ask for.
fn refuse_impersonation(headers: &http::HeaderMap, user: &str) -> Response<Body> {
    let asked: Vec<&str> = headers
        .keys()
        .filter(|n| is_impersonation(n))
        .map(http::HeaderName::as_str)
        .collect();
    reply(failure(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!(
            "tower-agent: Tower impersonates the user of your token ({user:?}) itself; \
             kubectl --as/--as-group/--as-uid and Impersonate-* headers are not accepted \
             (this request had: {})",
            asked.join(", ")
        ),
    ))
}

/// Whether a request only reads API discovery (`/api`, `/api/v1`, `/apis`,
/// `/apis/GROUP[/VERSION]`, `/version`, `/openapi/v2`, `/openapi/v3[/...]`), which every
/// authenticated user may read and which reads the same for all. Only plain paths
/// qualify: a `.`/`..` segment, an empty one or a %-escape could name something else to
/// a hop that normalises paths.
fn is_discovery(method: &http::Method, path: &str) -> bool {
    if method != http::Method::GET && method != http::Method::HEAD {
        return false;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let Some(path) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = path.split('/');
    if segments
        .clone()
        .any(|s| s.is_empty() || s == "." || s == ".." || s.contains('%'))
    {
        return false;
    }
    match (segments.next(), segments.next(), segments.next()) {
        (Some("api"), None | Some("v1"), None) | (Some("apis" | "version"), None, None) => true,
        (Some("apis"), Some(_), _) => segments.next().is_none(),
        (Some("openapi"), Some("v2"), None) | (Some("openapi"), Some("v3"), _) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::Duration;

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tower_auth::identity::Asserter;
    use tower_auth::{Identity, Minter, Secret};
    use tower_proto::preamble::KUBERNETES_TARGET;
    use tower_tunnel::control::Keepalive;
    use tower_tunnel::dial::DialConfig;

    use super::*;
    use crate::Backoff;
    use crate::identity::{IdentityKeys, KeySource};
    use crate::upstream::Upstream;

    #[test]
    fn discovery_paths_are_told_apart_from_resources() {
        let get = http::Method::GET;
        for path in [
            "/api",
            "/api/",
            "/api/v1",
            "/apis",
            "/apis/apps",
            "/apis/apps/v1",
            "/version",
            "/openapi/v2",
            "/openapi/v3/apis/apps/v1",
        ] {
            assert!(is_discovery(&get, path), "{path}");
        }
        for path in [
            "/",
            "/api/v1/pods",
            "/api/v1/namespaces/default/pods",
            "/apis/apps/v1/deployments",
            "/apis/apps/v1/namespaces/default/deployments/web",
            "/apis//v1",
            "/healthz",
            "/apiss",
            "//api",
            "/api//",
            "/openapi",
            "/openapi/v4",
            // Names that a hop normalising paths would read as resources.
            "/openapi/../api/v1/namespaces/default/secrets",
            "/openapi/v3/../../api/v1/secrets",
            "/openapi/%2e%2e/api/v1/secrets",
            "/apis/../api",
            "/apis/apps/..",
            "/apis/apps/./v1",
            "/api/%76%31",
        ] {
            assert!(!is_discovery(&get, path), "{path}");
        }
        assert!(!is_discovery(&http::Method::POST, "/api"));
    }
    /// An upstream that records the headers of every request it gets.
    async fn recording_upstream() -> (String, mpsc::UnboundedReceiver<http::HeaderMap>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let _ = tx.send(req.headers().clone());
                        async {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}"), rx)
    }

    fn agent_config(upstream: &str, secret: &Secret) -> Config {
        let mut kube = kube::Config::new(upstream.parse().unwrap());
        kube.auth_info.token = Some("member-sa-token".to_string().into());
        let mut targets = HashMap::new();
        targets.insert(
            KUBERNETES_TARGET.to_owned(),
            Upstream::kubernetes(&kube, None, upstream::DEFAULT_STREAMS_PER_CONNECTION).unwrap(),
        );
        Config {
            dial: DialConfig {
                host: "unused".into(),
                port: 1,
                tls: None,
                proxy: None,
                token: String::new(),
                cluster: "c1".into(),
                agent_version: "test".into(),
                targets: vec![KUBERNETES_TARGET.into()],
                timeout: Duration::from_secs(1),
            },
            token_file: None,
            renewed_token: crate::RenewedToken::default(),
            identity: Arc::new(IdentityKeys::new("c1", Ok(secret.cluster_key("c1")))),
            key_source: KeySource::JwtSecret(secret.clone()),
            targets,
            keepalive: Keepalive::default(),
            backoff: Backoff::default(),
            metrics: Default::default(),
            shutdown_grace: Duration::from_secs(1),
        }
    }

    /// A request as the server sends it: `assertion` says who the caller is; the
    /// caller's own token comes along (as it does to targets other than kubernetes).
    fn request(assertion: &header::HeaderValue, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut builder = Request::get("/api/v1/pods")
            .header("host", "tower-frontend:9443")
            .header(IDENTITY_HEADER, assertion)
            .header("authorization", "Bearer the-callers-own-token");
        for (k, v) in extra {
            builder = builder.header(*k, *v);
        }
        builder.body(Full::new(Bytes::new())).unwrap()
    }

    #[tokio::test]
    async fn names_go_as_their_bytes_and_a_group_that_cannot_be_sent_refuses_the_request() {
        let secret = Secret::new("the host's secret").unwrap();
        let (url, mut seen) = recording_upstream().await;
        let config = Arc::new(agent_config(&url, &secret));
        let assert = |user: &str, groups: &[&str]| {
            Asserter::new(&secret).assert(
                "c1",
                &Identity {
                    user: user.into(),
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                },
            )
        };
        let zoe = assert("zoë", &["équipe", "devs"]);
        let response =
            handle_request(config.clone(), KUBERNETES_TARGET.into(), request(&zoe, &[])).await;
        assert_eq!(response.status(), 200);
        let headers = seen.recv().await.unwrap();
        assert_eq!(headers["impersonate-user"].as_bytes(), "zoë".as_bytes());
        let groups: Vec<_> = headers
            .get_all("impersonate-group")
            .iter()
            .map(|g| g.as_bytes())
            .collect();
        assert_eq!(groups, ["équipe".as_bytes(), b"devs"]);

        for (user, groups) in [("alice", &["devs", "bad\ngroup"][..]), ("bad\ruser", &[])] {
            let response = handle_request(
                config.clone(),
                KUBERNETES_TARGET.into(),
                request(&assert(user, groups), &[]),
            )
            .await;
            assert_eq!(response.status(), 400, "{user:?} {groups:?}");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                String::from_utf8_lossy(&body).contains("cannot be sent as a header"),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
        assert!(
            seen.try_recv().is_err(),
            "refused requests never reach the upstream"
        );
    }

    #[tokio::test]
    async fn the_agent_impersonates_only_whom_the_servers_assertion_names() {
        let secret = Secret::new("the host's secret").unwrap();
        let (url, mut seen) = recording_upstream().await;
        let config = Arc::new(agent_config(&url, &secret));
        let alice = Asserter::new(&secret).assert(
            "c1",
            &Identity {
                user: "alice".into(),
                groups: vec!["devs".into()],
            },
        );

        // `kubectl --as root --as-group system:masters`, `--as-uid`, and extras: each is
        // refused with a Status that says why, and never reaches the upstream.
        for asked in [
            &[
                ("impersonate-user", "root"),
                ("impersonate-group", "system:masters"),
            ][..],
            &[("impersonate-group", "system:masters")][..],
            &[("impersonate-uid", "0")][..],
            &[("impersonate-extra-scopes", "x")][..],
            &[("Impersonate-User", "alice")][..],
        ] {
            let response = handle_request(
                config.clone(),
                KUBERNETES_TARGET.into(),
                request(&alice, asked),
            )
            .await;
            assert_eq!(response.status(), 403, "{asked:?}");
            assert_eq!(response.headers()["content-type"], "application/json");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["reason"], "Forbidden");
            assert_eq!(status["code"], 403);
            let message = status["message"].as_str().unwrap();
            assert!(
                message.contains("Tower impersonates the user of your token (\"alice\")")
                    && message.contains("--as")
                    && message.contains("Impersonate-* headers are not accepted")
                    && message.contains(&asked[0].0.to_ascii_lowercase()),
                "{message}"
            );
        }
        assert!(
            seen.try_recv().is_err(),
            "refused requests never reach the upstream"
        );

        // Without such headers: the agent's own credentials and the token's identity.
        // Front-proxy identity headers never reach the member.
        let forged = [
            ("x-remote-user", "root"),
            ("x-remote-group", "system:masters"),
        ];
        let response = handle_request(
            config.clone(),
            KUBERNETES_TARGET.into(),
            request(&alice, &forged),
        )
        .await;
        assert_eq!(response.status(), 200);
        let headers = seen.recv().await.unwrap();
        assert!(headers.get("x-remote-user").is_none() && headers.get("x-remote-group").is_none());
        assert_eq!(headers["authorization"], "Bearer member-sa-token");
        assert_eq!(headers["impersonate-user"], "alice");
        let groups: Vec<_> = headers.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["devs"]);
        assert!(headers.get("impersonate-uid").is_none());
        assert_ne!(headers["host"], "tower-frontend:9443");

        // Discovery (which kubectl sends with --as too, and whose refusal it would show
        // only as "unknown") is served as the token's user.
        // Nothing the caller asked for survives: not a group, a uid or an extra either.
        let mut discovery = request(
            &alice,
            &[
                ("impersonate-user", "root"),
                ("impersonate-group", "system:masters"),
                ("impersonate-uid", "0"),
                ("impersonate-extra-scopes", "x"),
            ],
        );
        *discovery.uri_mut() = "/apis/apps/v1".parse().unwrap();
        let response = handle_request(config.clone(), KUBERNETES_TARGET.into(), discovery).await;
        assert_eq!(response.status(), 200);
        let headers = seen.recv().await.unwrap();
        assert_eq!(headers["impersonate-user"], "alice");
        assert_eq!(headers.get_all("impersonate-user").iter().count(), 1);
        let groups: Vec<_> = headers.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["devs"]);
        assert!(headers.get("impersonate-uid").is_none());
        assert!(headers.get("impersonate-extra-scopes").is_none());

        assert!(
            headers.get(IDENTITY_HEADER).is_none(),
            "the assertion is for the agent alone"
        );

        // What reaches the agent without an assertion, or with one this member's key
        // did not sign (another host's), or the caller's user token in its place, is
        // refused before anything else is looked at.
        let other_host = Asserter::new(&Secret::new("another host").unwrap()).assert(
            "c1",
            &Identity {
                user: "alice".into(),
                groups: vec![],
            },
        );
        let user_token = Minter::new(&secret).user_token("alice", &[], None);
        for (assertion, why) in [
            ("", "no identity assertion"),
            (
                other_host.to_str().unwrap(),
                "does not verify with this member's key",
            ),
            (
                user_token.as_str(),
                "does not verify with this member's key",
            ),
        ] {
            let refused = handle_request(
                config.clone(),
                KUBERNETES_TARGET.into(),
                request(
                    &header::HeaderValue::from_str(assertion).unwrap(),
                    &[("impersonate-user", "root")],
                ),
            )
            .await;
            assert_eq!(refused.status(), 401, "the identity is checked first");
            let body = refused.into_body().collect().await.unwrap().to_bytes();
            assert!(String::from_utf8_lossy(&body).contains(why), "{why}");
        }

        // Without a key (the member's KubeSphere configuration unreadable): 503, why.
        let keyless = Arc::new(Config {
            identity: Arc::new(IdentityKeys::new(
                "c1",
                Err("ConfigMap ke-system/ke-config: not found".into()),
            )),
            ..agent_config(&url, &secret)
        });
        let refused = handle_request(keyless, KUBERNETES_TARGET.into(), request(&alice, &[])).await;
        assert_eq!(refused.status(), 503);
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("ke-system/ke-config: not found"));

        let elsewhere =
            handle_request(config.clone(), "dashboard".into(), request(&alice, &[])).await;
        assert_eq!(elsewhere.status(), 403);
        assert!(
            seen.try_recv().is_err(),
            "refused requests never reach the upstream"
        );
    }
}
