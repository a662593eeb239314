//! Authentication and impersonation, as kube-apiserver does them.
//!
//! * A client certificate the stand-in's CA signed: user = CN, groups = O values
//!   (staging/src/k8s.io/apiserver/pkg/authentication/request/x509/x509.go). It is tried
//!   before the bearer token, as in kube-apiserver's authenticator union.
//! * The static token given to [`StandIn::start`](crate::StandIn::start) and those added by
//!   [`StandIn::accept_token`](crate::StandIn::accept_token): user [`ADMIN_USER`] in
//!   `system:masters` (a token-file entry with that group).
//! * ServiceAccount tokens from TokenRequest ([`TokenIssuer`]): user
//!   `system:serviceaccount:NS:NAME`, groups `system:serviceaccounts` and
//!   `system:serviceaccounts:NS`
//!   (staging/src/k8s.io/apiserver/pkg/authentication/serviceaccount/util.go). Valid while
//!   unexpired, meant for the apiserver's audience, and while the ServiceAccount (and the
//!   object the token is bound to) exists with the UID in the token
//!   (pkg/serviceaccount/claims.go, `validator.Validate`).
//! * Every authenticated user also gets `system:authenticated`
//!   (staging/src/k8s.io/apiserver/pkg/authentication/group/authenticated_group_adder.go).
//! * No credential: `system:anonymous` in `system:unauthenticated` (anonymous auth on, the
//!   default). A bearer token that none of them accepts is a 401, not anonymous.
//!
//! Impersonation follows staging/src/k8s.io/apiserver/pkg/endpoints/filters/impersonation.go
//! ([`impersonate`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{Body, full};
use crate::clock;
use crate::rbac::{
    ANONYMOUS, AUTHENTICATED, Attributes, Authorizer, UNAUTHENTICATED, UserInfo, forbidden,
};
use crate::status::ApiError;
use crate::store::{Resource, Store};

/// The user the static token authenticates as.
pub const ADMIN_USER: &str = "stand-in-admin";
/// The issuer of ServiceAccount tokens, and the one audience the stand-in accepts (as
/// kube-apiserver's `--service-account-issuer` and default `--api-audiences`).
pub(crate) const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// Default `spec.expirationSeconds` of a TokenRequest (`SetDefaults_TokenRequestSpec` in
/// pkg/apis/authentication/v1/defaults.go).
const DEFAULT_TOKEN_SECONDS: i64 = 3600;
/// The shortest token lifetime a TokenRequest may ask for (ValidateTokenRequest in
/// pkg/apis/authentication/validation/validation.go).
const MIN_TOKEN_SECONDS: i64 = 600;
/// The longest.
const MAX_TOKEN_SECONDS: i64 = 1 << 32;

/// The client certificate's identity, read once per connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientCert {
    pub(crate) common_name: String,
    pub(crate) organizations: Vec<String>,
}

/// Who authenticated, and how (for [`crate::Call::credential`]).
#[derive(Debug, Clone)]
pub(crate) struct Authenticated {
    pub(crate) user: UserInfo,
    pub(crate) credential: String,
}

/// The outcome of authentication.
#[derive(Debug)]
pub(crate) enum Authentication {
    /// A credential was accepted.
    User(Authenticated),
    /// No credential at all: the request runs as `system:anonymous`.
    Anonymous,
    /// A bearer token none of the authenticators accepted: 401.
    Rejected,
}

/// The `system:anonymous` user.
pub(crate) fn anonymous() -> UserInfo {
    UserInfo {
        name: ANONYMOUS.to_owned(),
        groups: vec![UNAUTHENTICATED.to_owned()],
        ..UserInfo::default()
    }
}

/// `group.AuthenticatedGroupAdder`: `system:authenticated` unless the user is in it or in
/// `system:unauthenticated` already.
fn with_authenticated(mut groups: Vec<String>) -> Vec<String> {
    if !groups
        .iter()
        .any(|g| g == AUTHENTICATED || g == UNAUTHENTICATED)
    {
        groups.push(AUTHENTICATED.to_owned());
    }
    groups
}

/// Authenticates a request from its `Authorization` header and its connection's client
/// certificate. `static_token` returns the credential name (`token`, `token#N`) of a
/// matching static token.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    client_cert: Option<&ClientCert>,
    static_token: impl Fn(&str) -> Option<String>,
    tokens: &TokenIssuer,
    store: &Store,
) -> Authentication {
    // x509's `CommonNameUserConversion`: a certificate without a common name names no
    // user, and the request goes on to the other authenticators.
    if let Some(cert) = client_cert.filter(|c| !c.common_name.is_empty()) {
        return Authentication::User(Authenticated {
            user: UserInfo {
                name: cert.common_name.clone(),
                groups: with_authenticated(cert.organizations.clone()),
                ..UserInfo::default()
            },
            credential: format!("client-cert:{}", cert.common_name),
        });
    }
    let Some(authorization) = headers.get(header::AUTHORIZATION) else {
        return Authentication::Anonymous;
    };
    // request/bearertoken/bearertoken.go: the header trimmed, split on single spaces into
    // at most three; the token is the second part. An empty one (two spaces after
    // `Bearer`) is no credential at all: the request is anonymous.
    let Ok(authorization) = authorization.to_str() else {
        return Authentication::Rejected;
    };
    let mut parts = authorization.trim().splitn(3, ' ');
    let scheme = parts.next().unwrap_or_default();
    let Some(bearer) = parts
        .next()
        .filter(|_| scheme.eq_ignore_ascii_case("bearer"))
    else {
        // Other schemes: a real apiserver would go on to its other authenticators and,
        // with none, serve the request as anonymous; refused here, which is stricter.
        return Authentication::Rejected;
    };
    if bearer.is_empty() {
        return Authentication::Anonymous;
    }
    if let Some(credential) = static_token(bearer) {
        return Authentication::User(Authenticated {
            user: UserInfo {
                name: ADMIN_USER.to_owned(),
                groups: vec![
                    crate::rbac::SYSTEM_MASTERS.to_owned(),
                    AUTHENTICATED.to_owned(),
                ],
                ..UserInfo::default()
            },
            credential,
        });
    }
    match tokens.validate(bearer, store) {
        Some(authenticated) => Authentication::User(authenticated),
        None => Authentication::Rejected,
    }
}

/// The private claims kube-apiserver puts into a ServiceAccount token
/// (pkg/serviceaccount/claims.go).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<Ref>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ref {
    name: String,
    uid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
}

/// Issues and validates ServiceAccount tokens: JWTs signed with an ECDSA P-256 key
/// generated at start, ES256, as kube-apiserver signs with an EC
/// `--service-account-key-file` (RS256 with an RSA one; pkg/serviceaccount/jwt.go
/// `signerFromECDSAPrivateKey`). Not HS256: a proxy that tells tokens apart by their
/// algorithm (Tower passes through what is not KubeSphere's) must meet the real ones.
pub(crate) struct TokenIssuer {
    signing: EncodingKey,
    verifying: DecodingKey,
    /// Seconds added to the wall clock for token lifetimes ([`crate::StandIn::advance_clock`]).
    offset: AtomicI64,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Default for TokenIssuer {
    fn default() -> Self {
        // rcgen's default key: ECDSA P-256. PKCS#8 to sign, the SEC1 point to verify.
        let key = rcgen::KeyPair::generate().expect("generating an ECDSA P-256 key");
        TokenIssuer {
            signing: EncodingKey::from_ec_der(&key.serialize_der()),
            verifying: DecodingKey::from_ec_der(key.public_key_raw()),
            offset: AtomicI64::new(0),
        }
    }
}

impl TokenIssuer {
    /// Now, as token lifetimes see it.
    pub(crate) fn now(&self) -> i64 {
        clock::unix_now() + self.offset.load(Ordering::SeqCst)
    }

    /// Moves the token clock forward.
    pub(crate) fn advance(&self, seconds: i64) {
        self.offset.fetch_add(seconds, Ordering::SeqCst);
    }

    fn validate(&self, token: &str, store: &Store) -> Option<Authenticated> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.verifying, &validation)
            .ok()?
            .claims;
        let now = self.now();
        if claims.exp <= now
            || claims.iss != API_AUDIENCE
            || !claims.aud.iter().any(|a| a == API_AUDIENCE)
        {
            return None;
        }
        let k = &claims.kubernetes;
        let ns = &k.namespace;
        // The token is bound to the ServiceAccount's UID, and to its pod or secret if any.
        let live = |resource: Resource, r: &Ref| {
            store.uid(resource, ns, &r.name).as_deref() == Some(r.uid.as_str())
        };
        if !live(Resource::ServiceAccounts, &k.serviceaccount)
            || k.pod.as_ref().is_some_and(|p| !live(Resource::Pods, p))
            || k.secret
                .as_ref()
                .is_some_and(|s| !live(Resource::Secrets, s))
        {
            return None;
        }
        let name = &k.serviceaccount.name;
        Some(Authenticated {
            user: UserInfo {
                name: format!("system:serviceaccount:{ns}:{name}"),
                uid: k.serviceaccount.uid.clone(),
                groups: vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{ns}"),
                    AUTHENTICATED.to_owned(),
                ],
                extra: BTreeMap::from([(
                    "authentication.kubernetes.io/credential-id".to_owned(),
                    vec![format!("JTI={}", claims.jti)],
                )]),
            },
            credential: format!("serviceaccount:{ns}/{name}"),
        })
    }

    /// `POST …/serviceaccounts/{name}/token`: a TokenRequest in, the same with
    /// `status.token` and `status.expirationTimestamp` out (TokenREST.Create in
    /// pkg/registry/core/serviceaccount/storage/token.go).
    pub(crate) fn token_request(
        &self,
        store: &Store,
        namespace: &str,
        name: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let invalid = |detail: String| {
            ApiError::invalid(format!(
                "TokenRequest.authentication.k8s.io \"{name}\" is invalid: {detail}"
            ))
        };
        match body.get("apiVersion").and_then(Value::as_str) {
            None | Some("" | "authentication.k8s.io/v1") => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({other}) does not match the expected API version (authentication.k8s.io/v1)"
                )));
            }
        }
        let meta = &body["metadata"];
        if let Some(n) = meta["name"]
            .as_str()
            .filter(|n| !n.is_empty() && *n != name)
        {
            return Err(invalid(format!(
                "metadata.name: Invalid value: \"{n}\": must match the service account name if specified"
            )));
        }
        if let Some(n) = meta["namespace"]
            .as_str()
            .filter(|n| !n.is_empty() && *n != namespace)
        {
            return Err(invalid(format!(
                "metadata.namespace: Invalid value: \"{n}\": must match the service account namespace if specified"
            )));
        }
        let spec = &body["spec"];
        let seconds = match &spec["expirationSeconds"] {
            Value::Null => DEFAULT_TOKEN_SECONDS,
            v => v.as_i64().ok_or_else(|| {
                ApiError::bad_request("spec.expirationSeconds must be an integer")
            })?,
        };
        if seconds < MIN_TOKEN_SECONDS {
            return Err(invalid(format!(
                "spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration less than 10 minutes"
            )));
        }
        if seconds > MAX_TOKEN_SECONDS {
            return Err(invalid(format!(
                "spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration larger than 2^32 seconds"
            )));
        }
        let sa_uid = store
            .uid(Resource::ServiceAccounts, namespace, name)
            .ok_or_else(|| ApiError::not_found("serviceaccounts", name))?;
        let mut audiences: Vec<String> = spec["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if audiences.is_empty() {
            audiences.push(API_AUDIENCE.to_owned());
        }
        let (mut pod, mut secret) = (None, None);
        let bound = &spec["boundObjectRef"];
        if bound.is_object() {
            let kind = bound["kind"].as_str().unwrap_or("");
            let api_version = bound["apiVersion"].as_str().unwrap_or("v1");
            let ref_name = bound["name"].as_str().unwrap_or("");
            let resource = match (api_version, kind) {
                ("v1", "Pod") => Resource::Pods,
                ("v1", "Secret") => Resource::Secrets,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token to object of type {api_version}, Kind={kind}"
                    )));
                }
            };
            let uid = store
                .uid(resource, namespace, ref_name)
                .ok_or_else(|| ApiError::not_found(resource.plural(), ref_name))?;
            if let Some(want) = bound["uid"].as_str().filter(|u| !u.is_empty() && *u != uid) {
                return Err(ApiError::conflict_with(
                    kind,
                    ref_name,
                    &format!(
                        "the UID in the bound object reference ({want}) does not match the UID in record ({uid}). The object might have been deleted and then recreated"
                    ),
                ));
            }
            let r = Some(Ref {
                name: ref_name.to_owned(),
                uid,
            });
            if resource == Resource::Pods {
                pod = r;
            } else {
                secret = r;
            }
        }
        let now = self.now();
        let exp = now + seconds;
        let claims = Claims {
            iss: API_AUDIENCE.to_owned(),
            sub: format!("system:serviceaccount:{namespace}:{name}"),
            aud: audiences.clone(),
            exp,
            iat: now,
            nbf: now,
            jti: uuid_like(&rand::random::<[u8; 16]>()),
            kubernetes: KubernetesClaims {
                namespace: namespace.to_owned(),
                serviceaccount: Ref {
                    name: name.to_owned(),
                    uid: sa_uid,
                },
                pod,
                secret,
            },
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.signing)
            .map_err(|e| ApiError::internal(format!("failed to generate token: {e}")))?;
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
            "spec": {
                "audiences": audiences,
                "expirationSeconds": seconds,
                "boundObjectRef": if bound.is_object() { bound.clone() } else { Value::Null },
            },
            "status": {
                "token": token,
                "expirationTimestamp": clock::format_rfc3339(exp),
            },
        }))
    }
}

fn uuid_like(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// One thing a request asks to act as (`buildImpersonationRequests`).
#[derive(Debug, Clone)]
enum Request {
    User(String),
    ServiceAccount(String, String),
    Group(String),
    Extra(String, String),
    Uid(String),
}

impl Request {
    /// How Go's `%v` prints the `ObjectReference` (Kind Namespace Name UID APIVersion
    /// ResourceVersion FieldPath), for the "without impersonating a user" error.
    fn go_string(&self) -> String {
        let (kind, ns, name, api_version, field) = match self {
            Request::User(n) => ("User", "", n.as_str(), "", ""),
            Request::ServiceAccount(ns, n) => ("ServiceAccount", ns.as_str(), n.as_str(), "", ""),
            Request::Group(g) => ("Group", "", g.as_str(), "", ""),
            Request::Extra(k, v) => (
                "UserExtra",
                "",
                v.as_str(),
                "authentication.k8s.io/v1",
                k.as_str(),
            ),
            Request::Uid(u) => ("UID", "", u.as_str(), "authentication.k8s.io/v1", ""),
        };
        format!("{{{kind} {ns} {name}  {api_version}  {field}}}")
    }
}

/// `system:serviceaccount:NS:NAME` split, if it is one (`serviceaccount.SplitUsername`).
fn split_service_account(user: &str) -> Option<(String, String)> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let parts: Vec<&str> = rest.split(':').collect();
    match parts.as_slice() {
        [ns, name] if valid_dns_name(ns, 63) && valid_dns_name(name, 253) => {
            Some(((*ns).to_owned(), (*name).to_owned()))
        }
        _ => None,
    }
}

fn valid_dns_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Percent-decodes an `Impersonate-Extra-` key (`unescapeExtraKey`: undecodable keys stay
/// as they are).
fn unescape_extra_key(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = key
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return key.to_owned(),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| key.to_owned())
}

/// Why impersonation was refused: a plain-text 500 (a group, extra or UID without a user)
/// or a 403 `Status`.
#[derive(Debug)]
pub(crate) enum Refusal {
    InternalError(String),
    Forbidden(ApiError),
}

impl Refusal {
    pub(crate) fn response(&self) -> Response<Body> {
        match self {
            Refusal::Forbidden(err) => crate::api::error_response(err),
            Refusal::InternalError(text) => {
                let mut resp = Response::new(full(Bytes::from(format!("{text}\n"))));
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp.headers_mut().insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                resp
            }
        }
    }
}

/// `WithImpersonation`: if the request carries `Impersonate-*` headers, checks that
/// `requestor` may `impersonate` each requested user (`users`, or `serviceaccounts` in the
/// account's namespace for `system:serviceaccount:NS:NAME`), group (`groups`), extra
/// (`userextras/KEY`) and UID (`uids`), in that order, and returns the user the request runs
/// as: with `system:authenticated` added (or `system:unauthenticated` for
/// `system:anonymous`), and a ServiceAccount's groups when no group was given.
/// `Ok(None)`: no impersonation asked for.
pub(crate) fn impersonate(
    headers: &HeaderMap,
    request_uri: &str,
    requestor: &UserInfo,
    authorizer: &Authorizer,
    store: &Store,
) -> Result<Option<UserInfo>, Refusal> {
    let value = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let mut requests = Vec::new();
    let user = headers
        .get("impersonate-user")
        .map(value)
        .filter(|u| !u.is_empty());
    if let Some(user) = &user {
        requests.push(match split_service_account(user) {
            Some((ns, name)) => Request::ServiceAccount(ns, name),
            None => Request::User(user.clone()),
        });
    }
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .map(value)
        .collect();
    requests.extend(groups.iter().cloned().map(Request::Group));
    let mut extras: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(name, v)| {
            let key = name.as_str().strip_prefix("impersonate-extra-")?;
            Some((unescape_extra_key(&key.to_ascii_lowercase()), value(v)))
        })
        .collect();
    // Go iterates the header map in random order; sorting keeps the stand-in deterministic.
    extras.sort();
    let has_extras = !extras.is_empty();
    requests.extend(extras.into_iter().map(|(k, v)| Request::Extra(k, v)));
    let uid = headers
        .get("impersonate-uid")
        .map(value)
        .filter(|u| !u.is_empty());
    if let Some(uid) = &uid {
        requests.push(Request::Uid(uid.clone()));
    }
    if (!groups.is_empty() || has_extras || uid.is_some()) && user.is_none() {
        let list: Vec<String> = requests.iter().map(Request::go_string).collect();
        return Err(Refusal::InternalError(format!(
            "Internal Server Error: {request_uri:?}: requested [{}] without impersonating a user",
            list.join(" ")
        )));
    }
    if requests.is_empty() {
        return Ok(None);
    }
    let groups_specified = !groups.is_empty();
    let mut result = UserInfo::default();
    for request in &requests {
        let mut attrs = Attributes {
            verb: "impersonate".to_owned(),
            resource_request: true,
            api_version: "v1".to_owned(),
            ..Attributes::default()
        };
        match request {
            Request::ServiceAccount(ns, name) => {
                attrs.resource = "serviceaccounts".to_owned();
                attrs.namespace.clone_from(ns);
                attrs.name.clone_from(name);
                result.name = format!("system:serviceaccount:{ns}:{name}");
                if !groups_specified {
                    result.groups = vec![
                        "system:serviceaccounts".to_owned(),
                        format!("system:serviceaccounts:{ns}"),
                    ];
                }
            }
            Request::User(name) => {
                attrs.resource = "users".to_owned();
                attrs.name.clone_from(name);
                result.name.clone_from(name);
            }
            Request::Group(group) => {
                attrs.resource = "groups".to_owned();
                attrs.name.clone_from(group);
                result.groups.push(group.clone());
            }
            Request::Extra(key, v) => {
                attrs.api_group = "authentication.k8s.io".to_owned();
                attrs.resource = "userextras".to_owned();
                attrs.subresource.clone_from(key);
                attrs.name.clone_from(v);
                result.extra.entry(key.clone()).or_default().push(v.clone());
            }
            Request::Uid(u) => {
                attrs.api_group = "authentication.k8s.io".to_owned();
                attrs.resource = "uids".to_owned();
                attrs.name.clone_from(u);
                result.uid.clone_from(u);
            }
        }
        let decision = authorizer.authorize(store, requestor, &attrs);
        if !decision.allowed {
            return Err(Refusal::Forbidden(forbidden(
                &requestor.name,
                &attrs,
                &decision.reason,
            )));
        }
    }
    if result.name == ANONYMOUS {
        if !result.groups.iter().any(|g| g == UNAUTHENTICATED) {
            result.groups.push(UNAUTHENTICATED.to_owned());
        }
    } else if !result
        .groups
        .iter()
        .any(|g| g == AUTHENTICATED || g == UNAUTHENTICATED)
    {
        result.groups.push(AUTHENTICATED.to_owned());
    }
    Ok(Some(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_as_the_apiserver_reads_them() {
        let store = Store::seeded();
        let issuer = TokenIssuer::default();
        let auth = |value: &str, cert: Option<&ClientCert>| {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(value)
                && !value.is_empty()
            {
                headers.insert(header::AUTHORIZATION, value);
            }
            let static_token = |t: &str| (t == "s3cret").then(|| "token".to_owned());
            authenticate(&headers, cert, static_token, &issuer, &store)
        };
        let user = |a: Authentication| match a {
            Authentication::User(u) => Some(u.user),
            _ => None,
        };
        let name = |a| user(a).map(|u| u.name);
        assert_eq!(
            name(auth("Bearer s3cret", None)).as_deref(),
            Some(ADMIN_USER)
        );
        // The second of at most three space-separated parts, whatever follows.
        assert_eq!(
            name(auth("bearer s3cret more", None)).as_deref(),
            Some(ADMIN_USER)
        );
        // A space before the token leaves it empty: no credential, anonymous.
        assert!(matches!(
            auth("Bearer  s3cret", None),
            Authentication::Anonymous
        ));
        assert!(matches!(
            auth("Bearer nope", None),
            Authentication::Rejected
        ));
        // A certificate without a common name names nobody: the token decides.
        let nameless = ClientCert {
            common_name: String::new(),
            organizations: vec!["system:masters".into()],
        };
        assert_eq!(
            name(auth("Bearer s3cret", Some(&nameless))).as_deref(),
            Some(ADMIN_USER)
        );
        assert!(matches!(
            auth("", Some(&nameless)),
            Authentication::Anonymous
        ));
        // A user in system:unauthenticated is not made authenticated as well.
        let unauthenticated = ClientCert {
            common_name: "x".into(),
            organizations: vec![UNAUTHENTICATED.into()],
        };
        assert_eq!(
            user(auth("", Some(&unauthenticated))).map(|u| u.groups),
            Some(vec![UNAUTHENTICATED.to_owned()])
        );
    }

    #[test]
    fn service_account_user_names_split_like_the_apiserver() {
        assert_eq!(
            split_service_account("system:serviceaccount:ns:bot"),
            Some(("ns".to_owned(), "bot".to_owned()))
        );
        assert_eq!(split_service_account("system:serviceaccount:ns"), None);
        assert_eq!(split_service_account("system:serviceaccount:ns:a:b"), None);
        assert_eq!(split_service_account("system:serviceaccount:NS:bot"), None);
        assert_eq!(split_service_account("alice"), None);
        assert_eq!(
            unescape_extra_key("example.org%2fscope"),
            "example.org/scope"
        );
        assert_eq!(unescape_extra_key("bad%zz"), "bad%zz");
    }

    #[test]
    fn tokens_live_as_long_as_their_service_account() {
        let store = Store::seeded();
        let issuer = TokenIssuer::default();
        let tr = issuer
            .token_request(&store, "default", "default", &json!({}))
            .expect("token");
        let token = tr["status"]["token"].as_str().expect("token").to_owned();
        assert_eq!(tr["spec"]["expirationSeconds"], 3600);
        let who = issuer.validate(&token, &store).expect("valid");
        assert_eq!(who.user.name, "system:serviceaccount:default:default");
        assert_eq!(
            who.user.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:default",
                "system:authenticated"
            ]
        );
        // Expired.
        issuer.advance(3600);
        assert!(issuer.validate(&token, &store).is_none());
        issuer.advance(-3600);
        // Another audience is not for the apiserver.
        let other = issuer
            .token_request(
                &store,
                "default",
                "default",
                &json!({"spec": {"audiences": ["vault"]}}),
            )
            .expect("token");
        assert!(
            issuer
                .validate(other["status"]["token"].as_str().expect("t"), &store)
                .is_none()
        );
        // Deleted, then recreated under the same name: a new UID, the old token is dead.
        store
            .delete(Resource::ServiceAccounts, "default", "default")
            .expect("delete");
        assert!(issuer.validate(&token, &store).is_none());
        store
            .create(
                Resource::ServiceAccounts,
                "default",
                json!({"metadata": {"name": "default"}}),
            )
            .expect("create");
        assert!(issuer.validate(&token, &store).is_none());
        // A forged signature.
        let mut forged = token.clone();
        forged.push('x');
        assert!(issuer.validate(&forged, &store).is_none());

        let err = issuer
            .token_request(
                &store,
                "default",
                "default",
                &json!({"spec": {"expirationSeconds": 599}}),
            )
            .expect_err("too short");
        assert_eq!(
            err.message,
            "TokenRequest.authentication.k8s.io \"default\" is invalid: spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 minutes"
        );
        let err = issuer
            .token_request(&store, "default", "nobody", &json!({}))
            .expect_err("missing");
        assert_eq!(err.code, 404);
    }
}
