//! Request handling: authentication, impersonation and authorization (see [`crate::auth`] and
//! [`crate::rbac`]), the call log, routing, discovery and the object verbs.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming, SizeHint};
use serde_json::{Value, json};

use crate::StreamGuard;
use crate::negotiate::{self, Output};
use crate::rbac::{self, Attributes};
use crate::status::ApiError;
use crate::store::{self, By, Filter, PatchKind, Resource, Since, Target};
use crate::table::{self, IncludeObject};
use crate::{
    Call, Shared, auth, discovery, exec_ws, logs, openapi, protobuf, review, service_proxy, spdy,
    watch,
};

/// The response body type of every handler.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted: kube-apiserver's `MaxRequestBodyBytes` default, 3 MiB
/// (k8s.io/apiserver `server/config.go`); past it, 413.
const MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;
/// Lists smaller than this are sent with a Content-Length; larger ones are streamed.
const STREAM_LIST_ABOVE: usize = 1024 * 1024;
/// Chunk size of `/debug/bytes`.
const DEBUG_CHUNK: usize = 64 * 1024;

/// A whole body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A JSON response, as the apiserver's `SerializeObject` writes it (gzipped when large).
pub(crate) fn json_response(code: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.extensions_mut().insert(negotiate::Serialized);
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

/// A protobuf response (`application/vnd.kubernetes.protobuf`), gzipped when large.
fn protobuf_response(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = json_response(code, body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(negotiate::PROTOBUF),
    );
    resp
}

/// A `Status` error response.
pub(crate) fn error_response(err: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        err.to_bytes(),
    )
}

/// Decoded query parameters, in order (repeated keys such as `command` are kept), as Go's
/// `url.ParseQuery` reads a query (kube-apiserver's `req.URL.Query()`): pairs split at
/// `&`, key and value unescaped with `+` as a space, and a pair that holds a `;` or an
/// invalid escape dropped.
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(query: Option<&str>) -> Query {
        Query(
            query
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty() && !p.contains(';'))
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    Some((percent_decode(k)?, percent_decode(v)?))
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A boolean option (`watch`, `follow`, `stdin`, ...) as the parameter codec converts
    /// it: true when present with any first value but a false one ([`is_false`]).
    pub(crate) fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| !is_false(v))
    }
}

/// Whether a boolean option's value is false: apimachinery's `Convert_Slice_string_To_bool`
/// (k8s.io/apimachinery/pkg/runtime/conversion.go) takes only `0` and `false` (Go's
/// `strings.EqualFold`, under which `ſ` is an `s`) as false; anything else, an empty value
/// too, is true.
pub(crate) fn is_false(value: &str) -> bool {
    value == "0" || value.replace('\u{17F}', "s").eq_ignore_ascii_case("false")
}

/// `s` unescaped as Go's `url.QueryUnescape` does, or `None` where an escape is not `%`
/// and two hex digits.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Authenticates, impersonates, records, authorizes and routes one request, in the order of
/// kube-apiserver's handler chain (authentication, impersonation, authorization).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    client_cert: Option<Arc<auth::ClientCert>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let headers = req.headers();
    let static_token = |presented: &str| -> Option<String> {
        if constant_time_eq(presented.as_bytes(), shared.token.as_bytes()) {
            return Some("token".to_owned());
        }
        shared
            .more_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .position(|t| constant_time_eq(presented.as_bytes(), t.as_bytes()))
            .map(|i| format!("token#{}", i + 1))
    };
    let authentication = auth::authenticate(
        headers,
        client_cert.as_deref(),
        static_token,
        &shared.tokens,
        &shared.store,
    );
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    let mut call = Call {
        method: req.method().to_string(),
        path_and_query: path_and_query.clone(),
        credential: "anonymous".to_owned(),
        impersonate_user: header_str(headers, "impersonate-user").map(str::to_owned),
        impersonate_groups: headers
            .get_all("impersonate-group")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect(),
        saw_authorization: headers.contains_key(header::AUTHORIZATION),
        version: req.version(),
        user: None,
        groups: Vec::new(),
        accept: header_str(headers, "accept").map(str::to_owned),
        accept_encoding: header_str(headers, "accept-encoding").map(str::to_owned),
        user_agent: header_str(headers, "user-agent").map(str::to_owned),
        at: std::time::Instant::now(),
    };
    let gzip = negotiate::accepts_gzip(headers);
    let record = |call: Call| {
        tracing::debug!(method = %call.method, path = %call.path_and_query,
            credential = %call.credential, user = ?call.user, "request");
        shared
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    };
    let requestor = match authentication {
        auth::Authentication::User(authenticated) => {
            call.credential = authenticated.credential;
            authenticated.user
        }
        auth::Authentication::Anonymous => auth::anonymous(),
        auth::Authentication::Rejected => {
            record(call);
            return error_response(&ApiError::unauthorized());
        }
    };
    let user = match auth::impersonate(
        headers,
        &path_and_query,
        &requestor,
        &shared.authorizer,
        &shared.store,
    ) {
        Ok(impersonated) => impersonated.unwrap_or(requestor),
        Err(refusal) => {
            call.user = Some(requestor.name);
            call.groups = requestor.groups;
            record(call);
            return refusal.response();
        }
    };
    call.user = Some(user.name.clone());
    call.groups.clone_from(&user.groups);
    record(call);
    let query = Query::parse(req.uri().query());
    let attributes = Attributes::from_request(req.method(), req.uri().path(), &query.0);
    let decision = shared
        .authorizer
        .authorize(&shared.store, &user, &attributes);
    if !decision.allowed {
        return error_response(&rbac::forbidden(&user.name, &attributes, &decision.reason));
    }
    let mut resp = match route(&shared, user, req, query).await {
        Ok(resp) => resp,
        Err(err) => error_response(&err),
    };
    if gzip && negotiate::gzip_if_large(&mut resp) {
        shared
            .gzipped
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    resp
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn route(
    shared: &Arc<Shared>,
    user: rbac::UserInfo,
    req: Request<Incoming>,
    query: Query,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let method = req.method().clone();
    let get_only = |resp: Response<Body>| {
        if method == Method::GET || method == Method::HEAD {
            Ok(resp)
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match segments.as_slice() {
        ["version"] => get_only(json_response(StatusCode::OK, version_json())),
        ["healthz"] | ["livez"] | ["readyz"] => get_only(text_response("ok")),
        ["api"] => get_only(json_response(StatusCode::OK, api_versions_json(&req))),
        ["api", "v1"] => get_only(json_response(
            StatusCode::OK,
            discovery::api_resources_json("v1").ok_or_else(ApiError::path_not_found)?,
        )),
        // Legacy discovery only: kubectl's aggregated-discovery `Accept`
        // (`…;as=APIGroupDiscoveryList`) gets a plain `application/json` APIGroupList, and
        // client-go falls back to fetching each group-version's APIResourceList.
        ["apis"] => get_only(json_response(
            StatusCode::OK,
            discovery::api_group_list_json(),
        )),
        ["apis", group] => get_only(json_response(
            StatusCode::OK,
            discovery::api_group_json(group).ok_or_else(ApiError::path_not_found)?,
        )),
        ["apis", group, version] => get_only(json_response(
            StatusCode::OK,
            discovery::api_resources_json(&format!("{group}/{version}"))
                .ok_or_else(ApiError::path_not_found)?,
        )),
        ["openapi", "v3"] => get_only(json_response(StatusCode::OK, openapi::v3_root())),
        ["openapi", "v3", "api", "v1"] => get_only(json_response(
            StatusCode::OK,
            openapi::v3_group_version("v1").ok_or_else(ApiError::path_not_found)?,
        )),
        ["openapi", "v3", "apis", group, version] => get_only(json_response(
            StatusCode::OK,
            openapi::v3_group_version(&format!("{group}/{version}"))
                .ok_or_else(ApiError::path_not_found)?,
        )),
        ["debug", "bytes"] => get_only(debug_bytes(&query)?),
        ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"] => {
            if method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let body = read_json(req).await?;
            let review = review::self_subject_review(&user, &body)?;
            Ok(json_response(StatusCode::CREATED, review.to_string()))
        }
        [
            "apis",
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
        ] => {
            if method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let body = read_json(req).await?;
            let review = review::self_subject_access_review(
                &shared.authorizer,
                &shared.store,
                &user,
                &body,
            )?;
            Ok(json_response(StatusCode::CREATED, review.to_string()))
        }
        ["api", "v1", "watch", rest @ ..] => {
            resource_route(shared, &user, req, "v1", rest, query, true).await
        }
        ["api", "v1", rest @ ..] => {
            resource_route(shared, &user, req, "v1", rest, query, false).await
        }
        ["apis", group, version, "watch", rest @ ..] => {
            let group_version = format!("{group}/{version}");
            resource_route(shared, &user, req, &group_version, rest, query, true).await
        }
        ["apis", group, version, rest @ ..] => {
            let group_version = format!("{group}/{version}");
            resource_route(shared, &user, req, &group_version, rest, query, false).await
        }
        _ => Err(ApiError::path_not_found()),
    }
}

fn text_response(text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(text.as_bytes())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Routes `/api/v1/…` and `/apis/{group}/{version}/…` below the version (`watch_path`: below
/// `…/watch/`).
async fn resource_route(
    shared: &Arc<Shared>,
    user: &rbac::UserInfo,
    req: Request<Incoming>,
    group_version: &str,
    rest: &[&str],
    query: Query,
    watch_path: bool,
) -> Result<Response<Body>, ApiError> {
    let lookup = |plural: &str| Resource::lookup(group_version, plural);
    // `…/watch/{plural}/{name}` watches one object.
    let one = |mut query: Query, name: &str| {
        query
            .0
            .push(("fieldSelector".into(), format!("metadata.name={name}")));
        query
    };
    match rest {
        // Cluster-scoped collections, or namespaced ones across all namespaces.
        [plural] => {
            let r = lookup(plural).ok_or_else(ApiError::path_not_found)?;
            collection(shared, user, req, r, None, query, watch_path).await
        }
        ["namespaces", ns, plural, tail @ ..]
            if lookup(plural).is_some_and(Resource::namespaced) =>
        {
            let r = lookup(plural).ok_or_else(ApiError::path_not_found)?;
            match tail {
                [] => collection(shared, user, req, r, Some(ns), query, watch_path).await,
                [name] if watch_path => {
                    collection(shared, user, req, r, Some(ns), one(query, name), true).await
                }
                [name] => object(shared, user, req, r, ns, name, Target::Object, &query).await,
                [name, "status"] if shared.store.status_subresource(r) && !watch_path => {
                    object(shared, user, req, r, ns, name, Target::Status, &query).await
                }
                [name, "proxy", tail @ ..] if r == Resource::Services && !watch_path => {
                    service_proxy::serve(shared, req, ns, name, tail).await
                }
                [name, sub] if r == Resource::Pods && !watch_path => {
                    pod_subresource(shared, user.name.clone(), req, ns, name, sub, &query)
                }
                [name, "token"] if r == Resource::ServiceAccounts && !watch_path => {
                    token_request(shared, req, ns, name).await
                }
                _ => Err(ApiError::path_not_found()),
            }
        }
        [plural, name, tail @ ..] if lookup(plural).is_some_and(|r| !r.namespaced()) => {
            let r = lookup(plural).ok_or_else(ApiError::path_not_found)?;
            match tail {
                [] if watch_path => {
                    collection(shared, user, req, r, None, one(query, name), true).await
                }
                [] => object(shared, user, req, r, "", name, Target::Object, &query).await,
                ["status"] if shared.store.status_subresource(r) && !watch_path => {
                    object(shared, user, req, r, "", name, Target::Status, &query).await
                }
                _ => Err(ApiError::path_not_found()),
            }
        }
        _ => Err(ApiError::path_not_found()),
    }
}

/// GET (list or watch) and POST (create) on a collection.
async fn collection(
    shared: &Arc<Shared>,
    user: &rbac::UserInfo,
    req: Request<Incoming>,
    resource: Resource,
    namespace: Option<&str>,
    query: Query,
    watch_path: bool,
) -> Result<Response<Body>, ApiError> {
    match *req.method() {
        Method::GET => {
            let filter = Filter::new(
                namespace.map(str::to_owned),
                query.get("fieldSelector"),
                query.get("labelSelector"),
            )?;
            let as_table = header_str(req.headers(), "accept").is_some_and(table::wants_table);
            let include = IncludeObject::from_query(query.get("includeObject"));
            let watching = watch_path || query.flag("watch");
            let output = if as_table {
                Output::Json
            } else {
                negotiate::output(
                    header_str(req.headers(), "accept"),
                    protobuf::writes(resource.api_version(), resource.kind()),
                )?
            };
            if watching {
                // `sendInitialEvents=true` (the watch-list protocol): the current state as
                // ADDED events, then a bookmark marking their end.
                let initial_events = query.flag("sendInitialEvents");
                let since = match query.get("resourceVersion") {
                    _ if initial_events => Since::Now,
                    None | Some("") | Some("0") => Since::Now,
                    Some(rv) => Since::Version(rv.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                    })?),
                };
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let options = watch::Options {
                    since,
                    timeout,
                    as_table,
                    include,
                    initial_events_end_bookmark: initial_events
                        && query.flag("allowWatchBookmarks"),
                    output,
                };
                return Ok(watch::serve(shared, resource, filter, options));
            }
            // `limit` and `continue`, as kube-apiserver pages a list: the token names the
            // list's resourceVersion and the last object given; each page starts after it.
            let limit = query
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0 && !as_table && output != Output::Protobuf);
            let resumed = match query.get("continue").filter(|c| !c.is_empty()) {
                Some(token) => Some(ContinueToken::parse(token)?),
                None => None,
            };
            let (rv, items, next) = match limit {
                Some(limit) => {
                    let after = resumed
                        .as_ref()
                        .map(|t| (t.namespace.as_str(), t.name.as_str()));
                    let (rv, items, next) = shared.store.list_page(resource, &filter, after, limit);
                    let rv = resumed.as_ref().map_or(rv, |t| t.rv);
                    let next = next.map(|(namespace, name)| ContinueToken {
                        rv,
                        namespace,
                        name,
                    });
                    (rv, items, next)
                }
                None => {
                    let (rv, items) = shared.store.list(resource, &filter);
                    (rv, items, None)
                }
            };
            if let Some(next) = next {
                return Ok(list_response_continued(
                    resource,
                    rv,
                    items,
                    &next.to_string(),
                ));
            }
            if as_table {
                let objects: Vec<Value> = items
                    .iter()
                    .filter_map(|b| serde_json::from_slice(b).ok())
                    .collect();
                let t = table::table(resource, &objects, &rv.to_string(), true, include);
                return Ok(json_response(StatusCode::OK, t.to_string()));
            }
            if output == Output::Protobuf {
                let objects = items
                    .iter()
                    .map(|item| serde_json::from_slice(item))
                    .collect::<Result<Vec<Value>, _>>()
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let body = protobuf::encode_list(
                    resource.api_version(),
                    &resource.list_kind(),
                    resource.kind(),
                    &rv.to_string(),
                    &objects,
                )
                .map_err(ApiError::internal)?;
                return Ok(protobuf_response(StatusCode::OK, body));
            }
            Ok(list_response(resource, rv, items))
        }
        Method::POST => {
            let Some(ns) = namespace.or((!resource.namespaced()).then_some("")) else {
                return Err(ApiError::method_not_allowed());
            };
            let manager = field_manager(&req, &query);
            let warnings = Warnings::for_request(&query);
            let by = client_write(&manager, &query, "CreateOptions", &warnings)?;
            let body = read_json(req).await?;
            if resource.is_rbac() {
                shared
                    .authorizer
                    .check_rbac_write(&shared.store, user, resource, ns, &body)?;
            }
            let created = shared.store.create_by(resource, ns, body, by)?;
            Ok(warnings.on(json_response(StatusCode::CREATED, created)))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// Where a paged list goes on: `{rv}:{namespace}/{name}` of the last object given.
struct ContinueToken {
    rv: u64,
    namespace: String,
    name: String,
}

impl ContinueToken {
    fn parse(token: &str) -> Result<ContinueToken, ApiError> {
        let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
        let (rv, key) = token.split_once(':').ok_or_else(bad)?;
        let (namespace, name) = key.split_once('/').ok_or_else(bad)?;
        Ok(ContinueToken {
            rv: rv.parse().map_err(|_| bad())?,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for ContinueToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.rv, self.namespace, self.name)
    }
}

/// One page of a list, with its `continue` token.
fn list_response_continued(
    resource: Resource,
    rv: u64,
    items: Vec<Bytes>,
    token: &str,
) -> Response<Body> {
    let metadata = json!({"resourceVersion": rv.to_string(), "continue": token});
    let items: Vec<Value> = items
        .iter()
        .filter_map(|b| serde_json::from_slice(b).ok())
        .collect();
    let list = json!({
        "kind": resource.list_kind(),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
        "items": items,
    });
    json_response(StatusCode::OK, list.to_string())
}

/// A `…List` body: small lists in one piece, large ones streamed item by item straight from
/// the store's shared buffers.
fn list_response(resource: Resource, rv: u64, items: Vec<Bytes>) -> Response<Body> {
    let head = Bytes::from(format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"}},\"items\":[",
        resource.list_kind(),
        resource.api_version()
    ));
    let total: usize = items.iter().map(Bytes::len).sum();
    if total < STREAM_LIST_ABOVE {
        let mut body = Vec::with_capacity(head.len() + total + items.len() + 2);
        body.extend_from_slice(&head);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"]}");
        return json_response(StatusCode::OK, body);
    }
    let frames = std::iter::once(head)
        .chain(items.into_iter().enumerate().flat_map(|(i, item)| {
            let sep = (i > 0).then(|| Bytes::from_static(b","));
            sep.into_iter().chain(std::iter::once(item))
        }))
        .chain(std::iter::once(Bytes::from_static(b"]}")))
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed_unsync());
    resp.extensions_mut().insert(negotiate::Serialized);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// GET, PUT, PATCH and DELETE on one object; GET, PUT and PATCH on its `status`
/// subresource (`target`).
// The request, its caller and what it is addressed to: each is needed.
#[allow(clippy::too_many_arguments)]
async fn object(
    shared: &Arc<Shared>,
    user: &rbac::UserInfo,
    req: Request<Incoming>,
    resource: Resource,
    namespace: &str,
    name: &str,
    target: Target,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    match *req.method() {
        Method::GET => {
            let json = shared.store.get(resource, namespace, name)?;
            if header_str(req.headers(), "accept").is_some_and(table::wants_table) {
                let object: Value =
                    serde_json::from_slice(&json).map_err(|e| ApiError::internal(e.to_string()))?;
                let rv = object["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let include = IncludeObject::from_query(query.get("includeObject"));
                let t = table::table(resource, &[object], &rv, true, include);
                return Ok(json_response(StatusCode::OK, t.to_string()));
            }
            let output = negotiate::output(
                header_str(req.headers(), "accept"),
                protobuf::writes(resource.api_version(), resource.kind()),
            )?;
            if output == Output::Protobuf {
                let object: Value =
                    serde_json::from_slice(&json).map_err(|e| ApiError::internal(e.to_string()))?;
                let body = protobuf::encode(&object).map_err(ApiError::internal)?;
                return Ok(protobuf_response(StatusCode::OK, body));
            }
            Ok(json_response(StatusCode::OK, json))
        }
        Method::PUT => {
            let manager = field_manager(&req, query);
            let warnings = Warnings::for_request(query);
            let by = client_write(&manager, query, "UpdateOptions", &warnings)?;
            let body = read_json(req).await?;
            if resource.is_rbac() {
                shared.authorizer.check_rbac_write(
                    &shared.store,
                    user,
                    resource,
                    namespace,
                    &body,
                )?;
            }
            let json = shared
                .store
                .replace_by(resource, namespace, (name, target), body, by)?;
            Ok(warnings.on(json_response(StatusCode::OK, json)))
        }
        Method::PATCH => {
            let manager = field_manager(&req, query);
            let warnings = Warnings::for_request(query);
            let by = client_write(&manager, query, "PatchOptions", &warnings)?;
            let force = query.get("force");
            let content_type = header_str(req.headers(), "content-type")
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            let kind = match content_type.as_str() {
                "application/merge-patch+json" => PatchKind::Merge,
                // Like a real apiserver: custom resources have no strategic merge.
                "application/strategic-merge-patch+json" if !resource.is_custom() => {
                    PatchKind::Strategic
                }
                "application/json-patch+json" => PatchKind::Json,
                // Server-side apply. kubectl sends the configuration as JSON, which is YAML.
                "application/apply-patch+yaml" => {
                    if query.get("fieldManager").is_none_or(str::is_empty) {
                        return Err(ApiError::invalid(
                            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                        ));
                    }
                    let config = read_json(req).await?;
                    if resource.is_rbac() {
                        let result = shared
                            .store
                            .preview_apply(resource, namespace, name, &config)?;
                        shared.authorizer.check_rbac_write(
                            &shared.store,
                            user,
                            resource,
                            namespace,
                            &result,
                        )?;
                    }
                    // `force` is a bool (`PatchOptions.Force`): "true" or "false".
                    let force = match force {
                        None | Some("false") => false,
                        Some("true") => true,
                        Some(other) => {
                            return Err(ApiError::bad_request(format!(
                                "invalid value for force: {other:?}"
                            )));
                        }
                    };
                    let (json, created) = shared.store.apply(
                        resource,
                        namespace,
                        (name, target),
                        &config,
                        (by, force),
                    )?;
                    let code = if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    return Ok(warnings.on(json_response(code, json)));
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            if force.is_some() {
                // `validatePatchOptions`.
                return Err(ApiError::invalid(
                    "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch",
                ));
            }
            let patch = read_json(req).await?;
            if resource.is_rbac() {
                let result = shared
                    .store
                    .preview_patch(resource, namespace, name, kind, &patch)?;
                shared.authorizer.check_rbac_write(
                    &shared.store,
                    user,
                    resource,
                    namespace,
                    &result,
                )?;
            }
            let json =
                shared
                    .store
                    .patch_by(resource, namespace, (name, target), (kind, &patch), by)?;
            Ok(warnings.on(json_response(StatusCode::OK, json)))
        }
        Method::DELETE if target == Target::Object => {
            // kubectl sends DeleteOptions; the apiserver reads them (Go's server would
            // drain them anyway). Left unread, hyper closes the connection after the
            // answer without saying so, and a client that pooled it fails its next
            // request: a real apiserver never does that to a kept-alive connection.
            let options = read_body(req).await?;
            // DeleteOptions come in the body (kubectl's way) or the query.
            let mut dry_run_values = query.all("dryRun");
            // (A protobuf body, which the stand-in does not decode, is read as none.)
            if let Some(values) = serde_json::from_slice::<Value>(&options)
                .ok()
                .as_ref()
                .and_then(|o| o.get("dryRun"))
                .and_then(Value::as_array)
            {
                dry_run_values.extend(values.iter().map(|v| v.as_str().unwrap_or("").to_owned()));
            }
            let json = if dry_run(&dry_run_values, "DeleteOptions")? {
                shared.store.delete_dry_run(resource, namespace, name)?
            } else {
                shared.store.delete(resource, namespace, name)?
            };
            Ok(json_response(StatusCode::OK, json))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// Whether a write is a dry run (`dryRun` values all `All`); any other value is refused as
/// `ValidateDryRun` refuses it, in the words of the request's `options` kind.
fn dry_run(values: &[String], options: &str) -> Result<bool, ApiError> {
    if values.iter().any(|v| v != "All") {
        let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        return Err(ApiError::invalid(format!(
            "{options}.meta.k8s.io \"\" is invalid: dryRun: Unsupported value: []string{{{}}}: supported values: \"All\"",
            quoted.join(", ")
        )));
    }
    Ok(!values.is_empty())
}

/// A client's write as the store takes it: who makes it (`manager`), `dryRun` (refused in
/// the words of `options`, the request's options kind, when not `All`),
/// `fieldValidation=Strict`, and where its warnings go.
fn client_write<'a>(
    manager: &'a str,
    query: &Query,
    options: &str,
    warnings: &'a Warnings,
) -> Result<By<'a>, ApiError> {
    let field_validation = query.get("fieldValidation").unwrap_or("");
    if !matches!(field_validation, "" | "Ignore" | "Warn" | "Strict") {
        // `ValidateFieldValidation`.
        return Err(ApiError::invalid(format!(
            "{options}.meta.k8s.io \"\" is invalid: fieldValidation: Unsupported value: {field_validation:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
        )));
    }
    Ok(By {
        manager,
        dry_run: dry_run(&query.all("dryRun"), options)?,
        strict: field_validation == "Strict",
        warnings: &warnings.texts,
    })
}

/// What a write warns its client of, sent as `Warning` headers (k8s.io/apiserver's
/// `warning` package: `299 - "<text>"`, the text quoted as Go's `strconv.Quote` does);
/// none under `fieldValidation=Ignore`, which drops unknown fields silently.
struct Warnings {
    texts: std::sync::Mutex<Vec<String>>,
    silent: bool,
}

impl Warnings {
    fn for_request(query: &Query) -> Warnings {
        Warnings {
            texts: std::sync::Mutex::new(Vec::new()),
            silent: query.get("fieldValidation") == Some("Ignore"),
        }
    }

    fn on(&self, mut resp: Response<Body>) -> Response<Body> {
        let texts = std::mem::take(&mut *self.texts.lock().unwrap_or_else(|e| e.into_inner()));
        if self.silent {
            return resp;
        }
        for text in texts {
            let quoted = serde_json::Value::String(text).to_string();
            if let Ok(value) = HeaderValue::from_str(&format!("299 - {quoted}")) {
                resp.headers_mut().append(header::WARNING, value);
            }
        }
        resp
    }
}

/// The field manager of a write: its `fieldManager`, else its User-Agent's prefix.
fn field_manager(req: &Request<Incoming>, query: &Query) -> String {
    store::manager_name(
        query.get("fieldManager"),
        header_str(req.headers(), "user-agent"),
    )
}

/// `POST serviceaccounts/{name}/token`: TokenRequest.
async fn token_request(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    namespace: &str,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::POST {
        return Err(ApiError::method_not_allowed());
    }
    // `kubectl create token` sends protobuf.
    let body = read_json(req).await?;
    let answer = shared
        .tokens
        .token_request(&shared.store, namespace, name, &body)?;
    Ok(json_response(StatusCode::CREATED, answer.to_string()))
}

/// `pods/{name}/log|exec|attach|portforward`.
fn pod_subresource(
    shared: &Arc<Shared>,
    user: String,
    req: Request<Incoming>,
    namespace: &str,
    name: &str,
    sub: &str,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let known = matches!(sub, "log" | "exec" | "attach" | "portforward");
    if !known {
        return Err(ApiError::path_not_found());
    }
    if !shared.store.pod_exists(namespace, name) {
        return Err(ApiError::not_found("pods", name));
    }
    let upgrade = header_str(req.headers(), "upgrade")
        .unwrap_or("")
        .to_ascii_lowercase();
    match sub {
        "log" => {
            if req.method() != Method::GET {
                return Err(ApiError::method_not_allowed());
            }
            Ok(logs::serve(shared, name, query))
        }
        "portforward" => {
            if upgrade.is_empty() {
                return Err(ApiError::bad_request("Upgrade request required"));
            }
            let hold = StreamGuard::new(shared);
            Ok(spdy::portforward(req, hold).map(BodyExt::boxed_unsync))
        }
        _ => {
            if req.method() != Method::GET && req.method() != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let command = if sub == "attach" {
                vec!["cat".to_owned()]
            } else {
                let command = query.all("command");
                if command.is_empty() {
                    return Err(ApiError::bad_request("you must specify at least 1 command"));
                }
                command
            };
            let streams = exec_ws::Streams {
                stdin: query.flag("stdin"),
                stdout: query.flag("stdout"),
                stderr: query.flag("stderr"),
                tty: query.flag("tty"),
            };
            let files = shared.filesystems.pod(namespace, name);
            if upgrade == "websocket" {
                exec_ws::serve(shared, req, command, user, files, streams)
            } else if upgrade.starts_with("spdy/") {
                let hold = StreamGuard::new(shared);
                Ok(
                    spdy::exec(req, command, user, files, shared.resizes.clone(), hold)
                        .map(BodyExt::boxed_unsync),
                )
            } else {
                Err(ApiError::bad_request("Upgrade request required"))
            }
        }
    }
}

/// Reads a request body (at most [`MAX_REQUEST_BODY`]).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Ok(Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::request_entity_too_large(MAX_REQUEST_BODY)
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes())
}

/// Reads a JSON request body (at most [`MAX_REQUEST_BODY`]), or a protobuf one of the kinds
/// [`protobuf`] reads (kubectl's typed clients send protobuf: `kubectl create configmap`, …);
/// other protobuf is refused with 415.
async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(req).await?;
    parse_json(&body)
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if protobuf::is_protobuf(body) {
        return protobuf::decode(body).map_err(|e| {
            ApiError::unsupported_media_type(&format!(
                "application/vnd.kubernetes.protobuf: the stand-in reads it for a few kinds only: {e}"
            ))
        });
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON (the stand-in accepts JSON only): {e}"
        ))
    })
}

fn version_json() -> &'static str {
    r#"{"major":"1","minor":"32","gitVersion":"v1.32.0","gitCommit":"70d3cc986aa8221cd1dfb1121852688902d3bf53","gitTreeState":"clean","buildDate":"2024-12-11T17:59:15Z","goVersion":"go1.23.3","compiler":"gc","platform":"linux/amd64"}"#
}

fn api_versions_json(req: &Request<Incoming>) -> String {
    let host = header_str(req.headers(), "host").unwrap_or("127.0.0.1");
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
    })
    .to_string()
}

/// `GET /debug/bytes?size=N[&chunked=1]`.
fn debug_bytes(query: &Query) -> Result<Response<Body>, ApiError> {
    let size: u64 = query
        .get("size")
        .ok_or_else(|| ApiError::bad_request("size is required"))?
        .parse()
        .map_err(|_| ApiError::bad_request("size must be a non-negative integer"))?;
    let chunked = query.flag("chunked");
    let body = PatternBody {
        offset: 0,
        size,
        exact: !chunked,
    };
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if !chunked {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(resp)
}

/// 64 KiB plus one period of the `i % 251` pattern, built once.
fn pattern() -> &'static Bytes {
    static PATTERN: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..DEBUG_CHUNK + 251)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect::<Vec<u8>>()
            .into()
    })
}

/// Byte `i` of the body is `(i % 251) as u8`, generated chunk by chunk.
struct PatternBody {
    offset: u64,
    size: u64,
    exact: bool,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let remaining = self.size - self.offset;
        if remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(remaining.min(DEBUG_CHUNK as u64)).unwrap_or(DEBUG_CHUNK);
        // Byte i is i % 251, so every chunk is a window of one shared buffer.
        let start = usize::try_from(self.offset % 251).unwrap_or(0);
        let chunk = pattern().slice(start..start + len);
        self.offset += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset == self.size
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.size - self.offset)
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding_keeps_repeats() {
        let q = Query::parse(Some(
            "command=sh&command=-c&command=exit%203&stdin=true&x=a+b",
        ));
        assert_eq!(q.all("command"), ["sh", "-c", "exit 3"]);
        assert!(q.flag("stdin"));
        assert_eq!(q.get("x"), Some("a b"));
    }

    /// As `url.ParseQuery`: a pair with an invalid escape or a `;` is dropped, the rest
    /// kept.
    #[test]
    fn query_pairs_go_would_not_parse_are_dropped() {
        for bad in ["%zz", "%4", "%", "a%g1"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
        let q = Query::parse(Some("watch=%zz&a=1;b=2&%zz=1&watch=1&c=%41"));
        assert_eq!(q.all("watch"), ["1"]);
        assert_eq!((q.get("a"), q.get("c")), (None, Some("A")));
    }

    /// kube-apiserver's boolean options: only `0` and `false` (any case) are false.
    #[test]
    fn flags_are_true_unless_zero_or_false() {
        let q = Query::parse(Some(
            "a=1&b=true&c=TRUE&d=t&e=yes&f&g=&h=0&i=false&j=FALSE&k=fal%C5%BFe&m=0&m=1",
        ));
        for on in ["a", "b", "c", "d", "e", "f", "g"] {
            assert!(q.flag(on), "{on}");
        }
        for off in ["h", "i", "j", "k", "m", "absent"] {
            assert!(!q.flag(off), "{off}");
        }
    }
}
