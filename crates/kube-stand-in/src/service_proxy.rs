//! `services/{[scheme:]name[:port]}/proxy/{path}`: the apiserver's service proxy, which
//! KubeSphere's cluster controller reads a member's ks-apiserver through
//! (`…/services/:ks-apiserver:80/proxy/kapis/…`, kubesphere/kubesphere v3.4.1
//! pkg/controller/cluster/cluster_controller.go, `proxyFormat`). Modelled on kubernetes'
//! pkg/registry/core/service/storage/storage.go (`ResourceLocation`) and
//! pkg/registry/core/service/proxy.go (`ProxyREST.Connect`), with apimachinery's
//! `SplitSchemeNamePort` and `JoinPreservingTrailingSlash`:
//!
//! - the id is `name`, `name:port` or `scheme:name:port`, the scheme `http`, `https` or
//!   empty; anything else is 400 `invalid service request`;
//! - a port given by number must be one of the Service's ports (503 if not) and stands for
//!   that port's name; a missing Service (looked up only then) or Endpoints is 404;
//! - Endpoints without subsets, or without a subset that has an address and a port of that
//!   name, are 503 `no endpoints available for service`;
//! - the request goes to `{ip}:{port}` of such an address, at the path after `proxy`
//!   (cleaned, its trailing slash kept) with the caller's query, without `Authorization`
//!   and `Impersonate-*` (the authentication and impersonation filters delete them before
//!   any handler runs) or hop-by-hop headers; a backend that cannot be reached is 503
//!   `error trying to reach service`.
//!
//! Not modelled: `https` backends (refused with a 503 saying so), upgrades (400), the
//! random choice among subsets and addresses (the first is taken), `isValidAddress`'s check
//! that an address is a pod's (the stand-in's pods have no network: a test points the
//! Endpoints at a listener of its own), and streaming (both bodies are read whole, up to
//! [`BODY_LIMIT`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::Shared;
use crate::api::{Body, full};
use crate::status::ApiError;
use crate::store::Resource;

/// The most either body may hold.
pub(crate) const BODY_LIMIT: usize = 16 << 20;

/// How long the backend has to accept the connection and answer.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that are the connection's own, not the request's (RFC 9110 7.6.1, as Go's
/// `httputil.ReverseProxy` removes them).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `(scheme, name, port)` of an id, as `SplitSchemeNamePort`.
fn split_scheme_name_port(id: &str) -> Option<(&str, &str, &str)> {
    let parts: Vec<&str> = id.split(':').collect();
    let (scheme, name, port) = match parts.as_slice() {
        [name] => ("", *name, ""),
        [name, port] => ("", *name, *port),
        [scheme, name, port] => (*scheme, *name, *port),
        _ => return None,
    };
    (!name.is_empty() && matches!(scheme, "" | "http" | "https")).then_some((scheme, name, port))
}

/// The path the backend is asked for: the segments after `proxy`, `.` and `..` resolved as
/// `path.Join` does, with the request's trailing slash kept.
fn backend_path(tail: &[&str], trailing_slash: bool) -> String {
    let mut kept: Vec<&str> = Vec::new();
    for segment in tail {
        match *segment {
            "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut path = format!("/{}", kept.join("/"));
    if trailing_slash && !path.ends_with('/') {
        path.push('/');
    }
    path
}

/// Where `id` in `namespace` leads: `ResourceLocation`.
fn resolve(shared: &Shared, namespace: &str, id: &str) -> Result<String, ApiError> {
    let invalid = || ApiError::bad_request(format!("invalid service request {id:?}"));
    let (scheme, name, port) = split_scheme_name_port(id).ok_or_else(invalid)?;
    let object = |resource| -> Result<Value, ApiError> {
        let bytes = shared.store.get(resource, namespace, name)?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(e.to_string()))
    };
    let mut port_name = port.to_owned();
    if let Ok(number) = port.parse::<i64>() {
        let service = object(Resource::Services)?;
        port_name = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["port"].as_i64() == Some(number))
            .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
            .ok_or_else(|| {
                ApiError::service_unavailable(format!(
                    "no service port {number} found for service {name:?}"
                ))
            })?;
    }
    let endpoints = object(Resource::Endpoints)?;
    let subsets = endpoints["subsets"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if subsets.is_empty() {
        return Err(ApiError::service_unavailable(format!(
            "no endpoints available for service {name:?}"
        )));
    }
    let location = subsets.iter().find_map(|subset| {
        let ip = subset["addresses"].as_array()?.first()?["ip"].as_str()?;
        let port = subset["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"].as_str().unwrap_or_default() == port_name)?["port"]
            .as_i64()?;
        Some(if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        })
    });
    let location = location.ok_or_else(|| {
        ApiError::service_unavailable(format!("no endpoints available for service {id:?}"))
    })?;
    if scheme == "https" {
        return Err(ApiError::service_unavailable(
            "the stand-in's service proxy dials plain HTTP backends only",
        ));
    }
    Ok(location)
}

/// Proxies `req`, addressed to `…/services/{id}/proxy/{tail…}`.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    namespace: &str,
    id: &str,
    tail: &[&str],
) -> Result<Response<Body>, ApiError> {
    if req.headers().contains_key(header::UPGRADE) {
        return Err(ApiError::bad_request(
            "the stand-in's service proxy does not carry upgrades",
        ));
    }
    let location = resolve(shared, namespace, id)?;
    let (parts, body) = req.into_parts();
    let mut path_and_query = backend_path(tail, parts.uri.path().ends_with('/'));
    if let Some(query) = parts.uri.query() {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    let body = Limited::new(body, BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
        .to_bytes();
    let mut headers = forwarded_headers(&parts.headers);
    headers.remove(header::AUTHORIZATION);
    let impersonation: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for name in impersonation {
        headers.remove(name);
    }
    let uri: Uri = path_and_query
        .parse()
        .map_err(|e| ApiError::bad_request(format!("proxy path: {e}")))?;
    let mut outgoing = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(Full::new(body))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    *outgoing.headers_mut() = headers;
    // The caller's Host goes through (the handler does not set `UseLocationHost`); an
    // HTTP/2 caller's request has none, and HTTP/1.1 needs one.
    if !outgoing.headers().contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(&location)
    {
        outgoing.headers_mut().insert(header::HOST, host);
    }
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::service_unavailable(format!("error trying to reach service: {e}"))
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&location)
            .await
            .map_err(|e| unreachable(&format!("dial tcp {location}: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        // Tracked, and ended at the stand-in's shutdown even if the backend never
        // answers (a timed-out exchange leaves it waiting).
        let cancel = shared.cancel.clone();
        shared.tracker.spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = cancel.cancelled() => {}
            }
        });
        let answer = sender
            .send_request(outgoing)
            .await
            .map_err(|e| unreachable(&e))?;
        let (parts, body) = answer.into_parts();
        let body = Limited::new(body, BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok::<_, ApiError>((parts, body))
    };
    let (answer, body): (http::response::Parts, Bytes) =
        tokio::time::timeout(BACKEND_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(&"timed out"))??;
    let mut resp = Response::new(full(body));
    *resp.status_mut() = answer.status;
    *resp.headers_mut() = forwarded_headers(&answer.headers);
    Ok(resp)
}

/// `headers` without the hop-by-hop ones, nor those `Connection` names.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut kept = headers.clone();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        kept.remove(name);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_split_as_the_apiserver_splits_them() {
        assert_eq!(split_scheme_name_port("ks"), Some(("", "ks", "")));
        assert_eq!(split_scheme_name_port("ks:80"), Some(("", "ks", "80")));
        assert_eq!(split_scheme_name_port(":ks:80"), Some(("", "ks", "80")));
        assert_eq!(
            split_scheme_name_port("https:ks:web"),
            Some(("https", "ks", "web"))
        );
        assert_eq!(split_scheme_name_port("ftp:ks:80"), None);
        assert_eq!(split_scheme_name_port(":80"), None);
        assert_eq!(split_scheme_name_port("a:b:c:d"), None);
    }

    #[test]
    fn the_backend_path_is_cleaned_and_keeps_its_trailing_slash() {
        assert_eq!(backend_path(&["kapis", "version"], false), "/kapis/version");
        assert_eq!(backend_path(&[], false), "/");
        assert_eq!(backend_path(&["a", "..", "b", "."], true), "/b/");
        assert_eq!(backend_path(&["..", "x"], false), "/x");
    }
}
