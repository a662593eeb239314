//! `tower-auth`: the JWTs Tower accepts and the keys they are signed with.
//!
//! * **User tokens** ([`UserClaims`]), in KubeSphere's shape, HS256 with the host's
//!   jwtSecret: `username` (or `sub`), optional `groups`, `token_type` `access_token` or
//!   `static_token`, optional `exp`. Only the server checks them ([`Verifier`]). What
//!   KubeSphere 3.4's issuer refuses is refused here too
//!   (pkg/apiserver/authentication/token/issuer.go `Verify`): an `exp` in the past, with no
//!   leeway, and an `iat` later than now plus [`MAXIMUM_CLOCK_SKEW`].
//! * **Cluster keys** ([`Secret::cluster_key`]): one key per member, derived from the
//!   jwtSecret with HMAC-SHA256 over the cluster's name. A member holds its own key, never
//!   the jwtSecret: with it, it can check what the server says to it and forge nothing
//!   for another member or for the host.
//! * **Agent tokens** ([`AgentClaims`]), HS256 with the cluster's key: `sub` = cluster
//!   name, `aud` = `tower-agent`, `iat`, optional `exp`, `jti`, and `ca`, the pin of the
//!   Tower CA the agent should trust (so a token alone is enough to dial safely).
//! * **Identity assertions** ([`identity`]): after verifying a caller, the server tells
//!   the member's agent who it is in a short-lived JWT signed with that member's key; the
//!   agent impersonates whom the assertion names.
//!
//! [`Verifier`] checks user and agent tokens and refuses each kind of bad token with its
//! own [`AuthError`]; [`Minter`] makes them (for `tower-server token` and tests).

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use foldhash::HashMap;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub mod identity;

/// The audience of agent tokens.
pub const AGENT_AUDIENCE: &str = "tower-agent";
/// The `token_type` of KubeSphere access tokens.
pub const ACCESS_TOKEN: &str = "access_token";
/// The `token_type` of KubeSphere static tokens (long-lived API tokens, no `exp`).
pub const STATIC_TOKEN: &str = "static_token";
/// How far a user token's `iat` may be ahead of this clock: KubeSphere's
/// `authentication.maximumClockSkew` default.
pub const MAXIMUM_CLOCK_SKEW: Duration = Duration::from_secs(10);
/// The longest a verified user token is remembered, even without an `exp`.
const USER_CACHE_TTL: u64 = 600;

/// Why a token was refused. Each variant has its own message; none includes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header (or an empty token).
    #[error("no bearer token: send `Authorization: Bearer <JWT>`")]
    Missing,
    /// Not three base64url parts with a JSON header.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg: none`.
    #[error("unsigned token (alg: none) refused")]
    Unsigned,
    /// Any algorithm but HS256. KubeSphere signs access, refresh and static tokens with
    /// HS256 and only its OIDC ID tokens with RS256 (release-3.4 and master,
    /// pkg/apiserver/authentication/token/issuer.go, `IssueTo`): an RS256 token is not one
    /// of its API credentials.
    #[error(
        "token algorithm {0:?} refused: only HS256 is accepted (KubeSphere signs its access \
         and static tokens with HS256; RS256 only its OIDC ID tokens, no API credential)"
    )]
    WrongAlgorithm(String),
    /// The signature does not match the jwtSecret (or, for an agent token or an
    /// assertion, the cluster's key derived from it).
    #[error(
        "token signature does not match: not signed with this host's jwtSecret (or, for an \
         agent token, the cluster's key derived from it)"
    )]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    /// `iat` is later than now plus the allowed clock skew.
    #[error("token used before it was issued (iat is in the future)")]
    IssuedInFuture,
    /// An agent token was presented where a user token belongs.
    #[error("an agent token (aud tower-agent) cannot be used as a user token")]
    AgentTokenAsUser,
    /// A user token was presented where an agent token belongs.
    #[error("a user token cannot be used as an agent token (want aud tower-agent)")]
    UserTokenAsAgent,
    /// The audience is neither the agent's nor absent.
    #[error("token audience {0:?} refused: want {AGENT_AUDIENCE:?}")]
    WrongAudience(String),
    /// A user token of another `token_type` (a refresh token, say: it only buys a new
    /// access token from KubeSphere, it is no API credential).
    #[error("token_type {0:?} refused: want {ACCESS_TOKEN:?} or {STATIC_TOKEN:?}")]
    WrongTokenType(String),
    /// A claim is missing or has the wrong type.
    #[error("token claim {0} is missing or malformed")]
    BadClaim(&'static str),
    /// An agent token signed with the jwtSecret itself, as Tower made them before
    /// per-cluster keys: the member would need the host's secret to check anything.
    #[error(
        "agent token signed with the jwtSecret itself (made by an older Tower): \
         mint a new one (tower-server token, or empty the Cluster's spec.connection.token)"
    )]
    LegacyAgentToken,
    /// An identity assertion made for another cluster.
    #[error("identity assertion is for cluster {0:?}, not this one")]
    WrongCluster(String),
}

/// The jwtSecret shared by host and members.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw secret bytes; trailing whitespace (a file's newline) is dropped.
    /// Returns `None` for an empty secret.
    pub fn new(bytes: impl AsRef<[u8]>) -> Option<Self> {
        let bytes = bytes.as_ref();
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        (end > 0).then(|| Secret(bytes[..end].to_vec()))
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The key of member `cluster`, derived from this jwtSecret: base64url (no padding)
    /// of HMAC-SHA256(jwtSecret, `tower cluster key v1` NUL `cluster`), 43 characters.
    /// What one member holds says nothing of another's key or of the jwtSecret
    /// (HMAC is a pseudo-random function), and every replica derives the same key with
    /// no state to share.
    pub fn cluster_key(&self, cluster: &str) -> Secret {
        // A key of any length is accepted by HMAC: `new_from_slice` cannot fail.
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(CLUSTER_KEY_CONTEXT);
        mac.update(&[0]);
        mac.update(cluster.as_bytes());
        let key =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Secret(key.into_bytes())
    }
}

/// What a cluster key's derivation is bound to, so the same jwtSecret keyed for any other
/// purpose never yields a cluster key.
const CLUSTER_KEY_CONTEXT: &[u8] = b"tower cluster key v1";

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An `aud` claim: one string or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single audience.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, want: &str) -> bool {
        match self {
            Audience::One(a) => a == want,
            Audience::Many(list) => list.iter().any(|a| a == want),
        }
    }

    fn describe(&self) -> String {
        match self {
            Audience::One(a) => a.clone(),
            Audience::Many(list) => list.join(","),
        }
    }
}

/// The claims of an agent token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentClaims {
    /// The cluster this agent serves.
    pub sub: String,
    /// Always [`AGENT_AUDIENCE`].
    pub aud: Audience,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expiry, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// A unique id, so one token can be told from another in logs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// The pin (`sha256:HEX` of the SubjectPublicKeyInfo) of the CA that signs the
    /// server's certificate: an agent given no CA of its own trusts this one alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl AgentClaims {
    /// The claims of `token` as it says them, unverified: for an agent reading its own
    /// token (its cluster, its CA pin), which it has no key to verify and need not.
    pub fn read_unverified(token: &str) -> Result<AgentClaims, AuthError> {
        let value = claims_unverified(token)?;
        serde_json::from_value(value).map_err(|_| AuthError::BadClaim("sub/aud/iat"))
    }
}

/// The claims of a user token, in KubeSphere's shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    /// The user (KubeSphere's claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The user, when `username` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Groups the user belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// `access_token` for tokens that may call APIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// Expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Audience; a user token must not carry the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Issuer: KubeSphere writes `kubesphere`; tokens Tower mints say [`TOWER_ISSUER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// The `iss` of user tokens Tower mints itself (`tower-server user-token`, kubeconfigs):
/// their claims stand where KubeSphere's tokens are resolved against its Users.
pub const TOWER_ISSUER: &str = "tower";

/// Who a verified user token speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The user name to impersonate.
    pub user: String,
    /// The groups to impersonate.
    pub groups: Vec<String>,
}

/// Checks tokens against one jwtSecret.
///
/// Verified user tokens are remembered (keyed by the whole token, until their `exp`), so a
/// client that sends the same token with every request costs one HMAC and one JSON parse,
/// not one per request: that was a tenth of the server's CPU per small request. The cache
/// hashes its ~200-byte keys with foldhash (SipHash took ~700 instructions a request);
/// only tokens that verified are inserted, so nobody can fill it with chosen collisions.
#[derive(Clone)]
pub struct Verifier {
    secret: Secret,
    key: DecodingKey,
    validation: Validation,
    users: Arc<Mutex<HashMap<String, VerifiedUser>>>,
}

/// A user token that verified, and until when that holds.
#[derive(Clone)]
struct VerifiedUser {
    identity: Identity,
    /// Whether Tower minted it (`iss` [`TOWER_ISSUER`]).
    tower_issued: bool,
    /// Unix seconds: its `exp`, or the end of its time in the cache if sooner.
    valid_until: u64,
    /// Whether `valid_until` is the token's own `exp` (then it is refused past it).
    expires: bool,
}

/// How many verified user tokens are remembered (all are forgotten when full).
const USER_CACHE_CAPACITY: usize = 4096;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_aud = false; // checked here, with messages that say which kind
        validation.validate_nbf = true;
        // KubeSphere checks exp with no leeway; a token it refuses is refused here too.
        validation.leeway = 0;
        Verifier {
            secret: secret.clone(),
            key: DecodingKey::from_secret(&secret.0),
            validation,
            users: Arc::default(),
        }
    }

    /// Verifies an agent token, signed with the key of the cluster it names (`sub`), and
    /// returns its claims.
    pub fn verify_agent(&self, token: &str) -> Result<AgentClaims, AuthError> {
        // Which cluster's key to check it with is the token's own word; a token that is
        // no agent token at all is told so before any key is derived.
        let unverified = claims_unverified(token)?;
        check_agent_audience(&unverified)?;
        let cluster = match unverified.get("sub") {
            Some(serde_json::Value::String(sub)) if !sub.is_empty() => sub,
            _ => return Err(AuthError::BadClaim("sub")),
        };
        let key = DecodingKey::from_secret(&self.secret.cluster_key(cluster).0);
        let value = match decode(token, &key, &self.validation) {
            Err(AuthError::BadSignature) if self.decode(token).is_ok() => {
                return Err(AuthError::LegacyAgentToken);
            }
            decoded => decoded?,
        };
        let claims: AgentClaims =
            serde_json::from_value(value).map_err(|_| AuthError::BadClaim("sub/iat"))?;
        if claims.sub.is_empty() {
            return Err(AuthError::BadClaim("sub"));
        }
        Ok(claims)
    }

    /// Verifies a user token and returns who it speaks for.
    pub fn verify_user(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_user_issued(token).map(|(identity, _)| identity)
    }

    /// Verifies a user token and returns who it speaks for, and whether Tower minted it
    /// (`iss` [`TOWER_ISSUER`]).
    pub fn verify_user_issued(&self, token: &str) -> Result<(Identity, bool), AuthError> {
        let token = token.trim();
        let now = now();
        {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(hit) = users.get(token) {
                if now < hit.valid_until {
                    return Ok((hit.identity.clone(), hit.tower_issued));
                }
                let expired = hit.expires;
                users.remove(token);
                if expired {
                    return Err(AuthError::Expired);
                }
                // Remembered long enough: verified again below.
            }
        }
        let (identity, exp, tower_issued) = self.verify_user_uncached(token)?;
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if users.len() >= USER_CACHE_CAPACITY {
            users.clear();
        }
        // Remembered until its exp, and never longer than USER_CACHE_TTL.
        let remember_until = now.saturating_add(USER_CACHE_TTL);
        users.insert(
            token.to_owned(),
            VerifiedUser {
                identity: identity.clone(),
                tower_issued,
                valid_until: exp.unwrap_or(remember_until).min(remember_until),
                expires: exp.is_some(),
            },
        );
        Ok((identity, tower_issued))
    }

    fn verify_user_uncached(
        &self,
        token: &str,
    ) -> Result<(Identity, Option<u64>, bool), AuthError> {
        let value = match self.decode(token) {
            // An agent token is signed with its cluster's key: say what it is.
            Err(AuthError::BadSignature) if is_agent_token(token) => {
                return Err(AuthError::AgentTokenAsUser);
            }
            decoded => decoded?,
        };
        let claims: UserClaims =
            serde_json::from_value(value).map_err(|_| AuthError::BadClaim("username/groups"))?;
        if claims
            .aud
            .as_ref()
            .is_some_and(|aud| aud.contains(AGENT_AUDIENCE))
        {
            return Err(AuthError::AgentTokenAsUser);
        }
        match claims.token_type.as_deref() {
            Some(ACCESS_TOKEN | STATIC_TOKEN) => {}
            Some(other) => return Err(AuthError::WrongTokenType(other.to_owned())),
            None => return Err(AuthError::BadClaim("token_type")),
        }
        if claims
            .iat
            .is_some_and(|iat| iat > now().saturating_add(MAXIMUM_CLOCK_SKEW.as_secs()))
        {
            return Err(AuthError::IssuedInFuture);
        }
        let user = claims
            .username
            .or(claims.sub)
            .filter(|u| !u.is_empty())
            .ok_or(AuthError::BadClaim("username"))?;
        Ok((
            Identity {
                user,
                groups: claims.groups,
            },
            claims.exp,
            claims.iss.as_deref() == Some(TOWER_ISSUER),
        ))
    }

    fn decode(&self, token: &str) -> Result<serde_json::Value, AuthError> {
        decode(token, &self.key, &self.validation)
    }
}

/// Checks `token`'s header, signature (HS256 with `key`), `exp` and `nbf`; returns its
/// claims.
fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<serde_json::Value, AuthError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    check_header(token)?;
    let claims = jsonwebtoken::decode::<serde_json::Value>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm("?".into()),
                ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                    AuthError::Malformed("claims are not a JSON object")
                }
                ErrorKind::InvalidClaimFormat(_) => AuthError::BadClaim("exp/nbf"),
                _ => AuthError::Malformed("cannot be decoded"),
            }
        })?;
    // jsonwebtoken holds a token valid through the second its `exp` names (`exp < now`
    // expires it); KubeSphere refuses it from that second on: golang-jwt v4's
    // `now.Before(exp)`, with a `now` that has its fractions of a second
    // (pkg/apiserver/authentication/token/issuer.go, `Verify`). Refused here as there,
    // and as the verifiers' caches refuse a remembered token (`now < valid_until`).
    let exp = claims.get("exp").and_then(serde_json::Value::as_u64);
    if validation.validate_exp
        && exp.is_some_and(|exp| exp.saturating_add(validation.leeway) <= now())
    {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

/// The claims of `token`, read without checking its signature (after its header's).
fn claims_unverified(token: &str) -> Result<serde_json::Value, AuthError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    check_header(token)?;
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed("claims are not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(value),
        _ => Err(AuthError::Malformed("claims are not a JSON object")),
    }
}

/// Whether `token` says it is an agent token (unverified: only to name a refusal).
fn is_agent_token(token: &str) -> bool {
    claims_unverified(token)
        .ok()
        .and_then(|v| serde_json::from_value::<UserClaims>(v).ok())
        .and_then(|claims| claims.aud)
        .is_some_and(|aud| aud.contains(AGENT_AUDIENCE))
}

/// Refuses claims that are not an agent token's: a user token, or another audience.
fn check_agent_audience(claims: &serde_json::Value) -> Result<(), AuthError> {
    let user: UserClaims = serde_json::from_value(claims.clone()).unwrap_or_default();
    match &user.aud {
        Some(aud) if aud.contains(AGENT_AUDIENCE) => Ok(()),
        None if user.token_type.is_some() || user.username.is_some() => {
            Err(AuthError::UserTokenAsAgent)
        }
        None => Err(AuthError::BadClaim("aud")),
        Some(aud) => Err(AuthError::WrongAudience(aud.describe())),
    }
}

/// Looks at the JOSE header before any cryptography so the refusal can name the problem.
fn check_header(token: &str) -> Result<(), AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("a JWT has three dot-separated parts"));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed("header is not base64url"))?;
    #[derive(Deserialize)]
    struct Jose {
        alg: Option<String>,
    }
    let jose: Jose =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed("header is not JSON"))?;
    match jose.alg.as_deref() {
        Some("HS256") => Ok(()),
        None => Err(AuthError::Malformed("header has no alg")),
        Some(alg) if alg.eq_ignore_ascii_case("none") => Err(AuthError::Unsigned),
        Some(alg) => Err(AuthError::WrongAlgorithm(alg.chars().take(16).collect())),
    }
}

/// Makes tokens signed with one jwtSecret.
#[derive(Clone)]
pub struct Minter {
    secret: Secret,
    key: EncodingKey,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter").finish_non_exhaustive()
    }
}

impl Minter {
    /// A minter for `secret`.
    pub fn new(secret: &Secret) -> Self {
        Minter {
            secret: secret.clone(),
            key: EncodingKey::from_secret(&secret.0),
        }
    }

    /// An agent token for `cluster`, valid for `ttl` (forever when `None`), with no CA
    /// pin (the agent is then told its CA by a flag).
    pub fn agent_token(&self, cluster: &str, ttl: Option<Duration>) -> String {
        self.agent_token_pinned(cluster, ttl, None)
    }

    /// An agent token for `cluster`, valid for `ttl` (forever when `None`), that names the
    /// CA the agent should trust (`ca_pin`, `sha256:HEX`), signed with the cluster's key.
    pub fn agent_token_pinned(
        &self,
        cluster: &str,
        ttl: Option<Duration>,
        ca_pin: Option<&str>,
    ) -> String {
        let iat = now();
        let claims = AgentClaims {
            sub: cluster.to_owned(),
            aud: Audience::One(AGENT_AUDIENCE.to_owned()),
            iat,
            exp: ttl.map(|t| iat.saturating_add(t.as_secs())),
            jti: random_id(),
            ca: ca_pin.map(str::to_owned),
        };
        let key = EncodingKey::from_secret(&self.secret.cluster_key(cluster).0);
        sign(&claims, &key)
    }

    /// A KubeSphere-shaped access token for `user` in `groups`, valid for `ttl`.
    pub fn user_token(&self, user: &str, groups: &[String], ttl: Option<Duration>) -> String {
        let iat = now();
        let claims = UserClaims {
            username: Some(user.to_owned()),
            groups: groups.to_vec(),
            token_type: Some(ACCESS_TOKEN.to_owned()),
            iat: Some(iat),
            exp: ttl.map(|t| iat.saturating_add(t.as_secs())),
            iss: Some(TOWER_ISSUER.to_owned()),
            ..UserClaims::default()
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims with HS256 and the jwtSecret (tests use it to build odd
    /// tokens).
    pub fn sign<T: Serialize>(&self, claims: &T) -> String {
        sign(claims, &self.key)
    }

    /// Signs arbitrary claims with HS256 and `cluster`'s key (tests use it to build odd
    /// agent tokens).
    pub fn sign_for_cluster<T: Serialize>(&self, cluster: &str, claims: &T) -> String {
        sign(
            claims,
            &EncodingKey::from_secret(&self.secret.cluster_key(cluster).0),
        )
    }
}

/// `claims` signed with HS256 and `key`.
fn sign<T: Serialize>(claims: &T, key: &EncodingKey) -> String {
    // HS256 over serde-serializable claims cannot fail.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key).unwrap_or_default()
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// Constant-time equality of two secrets or tokens.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id() -> String {
    let bytes: [u8; 12] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests;
