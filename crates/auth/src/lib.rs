//! `tower-auth`: the two kinds of JWT Tower accepts, both HS256 with the shared jwtSecret.
//!
//! * **Agent tokens** ([`AgentClaims`]): `sub` = cluster name, `aud` = `tower-agent`,
//!   `iat`, optional `exp`, `jti`. The server takes a tunnel's cluster identity from here.
//! * **User tokens** ([`UserClaims`]), in KubeSphere's shape: `username` (or `sub`),
//!   optional `groups`, `token_type` `access_token` or `static_token`, optional `exp`.
//!   The server checks them before routing; the agent checks them again and
//!   impersonates the [`Identity`]. What KubeSphere 3.4's issuer refuses is refused here
//!   too (pkg/apiserver/authentication/token/issuer.go `Verify`): an `exp` in the past,
//!   with no leeway, and an `iat` later than now plus [`MAXIMUM_CLOCK_SKEW`].
//!
//! [`Verifier`] checks both and refuses each kind of bad token with its own
//! [`AuthError`]; [`Minter`] makes them (for `tower-server token` and tests).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

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
    /// Any algorithm but HS256.
    #[error("token algorithm {0:?} refused: only HS256 is accepted")]
    WrongAlgorithm(String),
    /// The signature does not match the jwtSecret.
    #[error("token signature does not match this jwtSecret")]
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

    /// The secret's bytes, for handing it to a member (its agent.yaml).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

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
}

/// Who a verified user token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
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
/// not one per request: that was a tenth of the server's CPU per small request.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    users: Arc<Mutex<HashMap<String, VerifiedUser>>>,
}

/// A user token that verified, and until when that holds.
#[derive(Clone)]
struct VerifiedUser {
    identity: Identity,
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
            key: DecodingKey::from_secret(&secret.0),
            validation,
            users: Arc::default(),
        }
    }

    /// Verifies an agent token and returns its claims.
    pub fn verify_agent(&self, token: &str) -> Result<AgentClaims, AuthError> {
        let value = self.decode(token)?;
        let user: UserClaims = serde_json::from_value(value.clone()).unwrap_or_default();
        match &user.aud {
            Some(aud) if aud.contains(AGENT_AUDIENCE) => {}
            None if user.token_type.is_some() || user.username.is_some() => {
                return Err(AuthError::UserTokenAsAgent);
            }
            None => return Err(AuthError::BadClaim("aud")),
            Some(aud) => return Err(AuthError::WrongAudience(aud.describe())),
        }
        let claims: AgentClaims =
            serde_json::from_value(value).map_err(|_| AuthError::BadClaim("sub/iat"))?;
        if claims.sub.is_empty() {
            return Err(AuthError::BadClaim("sub"));
        }
        Ok(claims)
    }

    /// Verifies a user token and returns who it speaks for.
    pub fn verify_user(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        let now = now();
        {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(hit) = users.get(token) {
                if now < hit.valid_until {
                    return Ok(hit.identity.clone());
                }
                let expired = hit.expires;
                users.remove(token);
                if expired {
                    return Err(AuthError::Expired);
                }
                // Remembered long enough: verified again below.
            }
        }
        let (identity, exp) = self.verify_user_uncached(token)?;
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
                valid_until: exp.unwrap_or(remember_until).min(remember_until),
                expires: exp.is_some(),
            },
        );
        Ok(identity)
    }

    fn verify_user_uncached(&self, token: &str) -> Result<(Identity, Option<u64>), AuthError> {
        let value = self.decode(token)?;
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
        ))
    }

    fn decode(&self, token: &str) -> Result<serde_json::Value, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        check_header(token)?;
        jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
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
            })
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
            key: EncodingKey::from_secret(&secret.0),
        }
    }

    /// An agent token for `cluster`, valid for `ttl` (forever when `None`).
    pub fn agent_token(&self, cluster: &str, ttl: Option<Duration>) -> String {
        let iat = now();
        let claims = AgentClaims {
            sub: cluster.to_owned(),
            aud: Audience::One(AGENT_AUDIENCE.to_owned()),
            iat,
            exp: ttl.map(|t| iat.saturating_add(t.as_secs())),
            jti: random_id(),
        };
        self.sign(&claims)
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
            ..UserClaims::default()
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims with HS256 (tests use it to build odd tokens).
    pub fn sign<T: Serialize>(&self, claims: &T) -> String {
        // HS256 over serde-serializable claims cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.key).unwrap_or_default()
    }
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
