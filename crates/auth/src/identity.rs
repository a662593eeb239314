//! Identity assertions: how the server tells one member's agent who a caller is.
//!
//! The server verifies a caller's token with the jwtSecret; the member never sees the
//! jwtSecret and, on the `kubernetes` target, never sees the caller's token either.
//! Instead each request carries [`IDENTITY_HEADER`]: a JWT (HS256 with the member's
//! [cluster key](crate::Secret::cluster_key)) with `aud` [`ASSERTION_AUDIENCE`], the
//! `cluster` it is meant for, the `user` and `groups` to impersonate, `iat` and `exp`.
//! The agent checks it with its own key ([`ClusterVerifier`]) and impersonates whom it
//! names. A member can so verify identities meant for itself, and forge nothing for
//! another member (a different key) or for the host (the jwtSecret).
//!
//! Both sides remember what they made or checked ([`Asserter`], [`ClusterVerifier`]), so
//! a caller that sends many requests costs one signature and one check per
//! [`ASSERTION_LIFETIME`] / 2, not one per request. Those caches are looked up on every
//! request (the agent's by a ~300-byte assertion), so they hash with foldhash rather
//! than SipHash; a key is only inserted after its signature checked, so nobody can fill
//! them with chosen collisions.

use std::sync::Mutex;
use std::time::Duration;

use foldhash::HashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::{AuthError, Identity, Secret, check_header, decode, now, sign};

/// The request header that carries the assertion through the tunnel. The server sets it
/// (replacing any a caller sent); the agent removes it before calling its upstream.
pub const IDENTITY_HEADER: &str = "tower-identity";
/// The `aud` of every assertion.
pub const ASSERTION_AUDIENCE: &str = "tower-identity";
/// How long an assertion is valid. The server makes a new one after half of it.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);
/// How far the member's clock may be ahead of the host's before an assertion reads as
/// expired there. Host and member are different machines in different networks; an
/// assertion only ever travels over the pinned tunnel to the one member it names, so a
/// generous leeway costs nothing.
const CLOCK_LEEWAY: u64 = 300;
/// How many assertions each side remembers (all are forgotten when full).
const CACHE_CAPACITY: usize = 4096;

/// The claims of an identity assertion.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AssertionClaims {
    aud: String,
    cluster: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    user: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    /// The caller's credential is not one the server judges: the member's API server
    /// authenticates it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pass_through: bool,
    iat: u64,
    exp: u64,
}

/// What an assertion tells the agent about a request's caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asserted {
    /// A caller the server verified: impersonate this identity.
    User(Identity),
    /// A bearer token the server does not judge (not signed with the jwtSecret: a
    /// member ServiceAccount token, say, as kubefed stores them), passed through for the
    /// member's API server to authenticate: no impersonation, no agent credential.
    PassThrough,
}

/// An assertion the server made, and when it makes a fresh one instead.
struct Made {
    /// Ready to send: a request takes a reference count, not a copy.
    assertion: http::HeaderValue,
    renew_at: u64,
}

/// The server's side: makes assertions for verified callers, one key per cluster.
pub struct Asserter {
    secret: Secret,
    /// Cluster → its key, and the assertions made for it.
    clusters: Mutex<HashMap<String, ClusterAssertions>>,
}

/// One cluster's key and the assertions made with it, by identity.
struct ClusterAssertions {
    key: EncodingKey,
    made: HashMap<Identity, Made>,
    pass_through: Option<Made>,
}

impl std::fmt::Debug for Asserter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asserter").finish_non_exhaustive()
    }
}

impl Asserter {
    /// An asserter deriving each cluster's key from `secret` (the jwtSecret).
    pub fn new(secret: &Secret) -> Self {
        Asserter {
            secret: secret.clone(),
            clusters: Mutex::default(),
        }
    }

    /// The assertion that `identity` calls `cluster`: the one made earlier while it has
    /// more than half its life left, else a new one.
    pub fn assert(&self, cluster: &str, identity: &Identity) -> http::HeaderValue {
        self.made(cluster, Some(identity))
    }

    /// The assertion that a request to `cluster` carries a credential for the member to
    /// judge ([`Asserted::PassThrough`]).
    pub fn assert_pass_through(&self, cluster: &str) -> http::HeaderValue {
        self.made(cluster, None)
    }

    fn made(&self, cluster: &str, identity: Option<&Identity>) -> http::HeaderValue {
        let now = now();
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(made) = clusters
            .get(cluster)
            .and_then(|c| match identity {
                Some(identity) => c.made.get(identity),
                None => c.pass_through.as_ref(),
            })
            .filter(|made| now < made.renew_at)
        {
            return made.assertion.clone();
        }
        if clusters.values().map(|c| c.made.len()).sum::<usize>() >= CACHE_CAPACITY {
            clusters.clear();
        }
        let assertions = clusters
            .entry(cluster.to_owned())
            .or_insert_with(|| ClusterAssertions {
                key: EncodingKey::from_secret(self.secret.cluster_key(cluster).expose()),
                made: HashMap::default(),
                pass_through: None,
            });
        let lifetime = ASSERTION_LIFETIME.as_secs();
        let assertion = sign(
            &AssertionClaims {
                aud: ASSERTION_AUDIENCE.to_owned(),
                cluster: cluster.to_owned(),
                user: identity.map(|i| i.user.clone()).unwrap_or_default(),
                groups: identity.map(|i| i.groups.clone()).unwrap_or_default(),
                pass_through: identity.is_none(),
                iat: now,
                exp: now.saturating_add(lifetime),
            },
            &assertions.key,
        );
        // A JWT (base64url and dots) is always a valid header value.
        let assertion = http::HeaderValue::try_from(assertion)
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        let made = Made {
            assertion: assertion.clone(),
            renew_at: now.saturating_add(lifetime / 2),
        };
        match identity {
            Some(identity) => {
                assertions.made.insert(identity.clone(), made);
            }
            None => assertions.pass_through = Some(made),
        }
        assertion
    }
}

/// A verified assertion, remembered until it expires.
struct Checked {
    asserted: Asserted,
    valid_until: u64,
}

/// The agent's side: checks assertions with its cluster's key.
pub struct ClusterVerifier {
    cluster: String,
    key: DecodingKey,
    validation: Validation,
    checked: Mutex<HashMap<String, Checked>>,
}

impl std::fmt::Debug for ClusterVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterVerifier")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl ClusterVerifier {
    /// A verifier for assertions meant for `cluster`, signed with `key` (its cluster
    /// key, as [`Secret::cluster_key`] derives it).
    pub fn new(cluster: &str, key: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims = ["exp".to_owned()].into();
        validation.validate_aud = false; // checked below, with a message that says which
        validation.leeway = CLOCK_LEEWAY;
        ClusterVerifier {
            cluster: cluster.to_owned(),
            key: DecodingKey::from_secret(key.expose()),
            validation,
            checked: Mutex::default(),
        }
    }

    /// What `assertion` says of the caller, if it is for this cluster, signed with its
    /// key and not expired.
    pub fn verify(&self, assertion: &str) -> Result<Asserted, AuthError> {
        let assertion = assertion.trim();
        let now = now();
        {
            let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(hit) = checked.get(assertion) {
                if now < hit.valid_until {
                    return Ok(hit.asserted.clone());
                }
                checked.remove(assertion);
            }
        }
        check_header(assertion)?;
        let claims: AssertionClaims =
            serde_json::from_value(decode(assertion, &self.key, &self.validation)?)
                .map_err(|_| AuthError::BadClaim("aud/cluster/user/exp"))?;
        if claims.aud != ASSERTION_AUDIENCE {
            return Err(AuthError::WrongAudience(claims.aud));
        }
        if claims.cluster != self.cluster {
            return Err(AuthError::WrongCluster(claims.cluster));
        }
        let asserted = match (claims.pass_through, claims.user.is_empty()) {
            (true, true) => Asserted::PassThrough,
            (false, false) => Asserted::User(Identity {
                user: claims.user,
                groups: claims.groups,
            }),
            _ => return Err(AuthError::BadClaim("user/pass_through")),
        };
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.len() >= CACHE_CAPACITY {
            checked.clear();
        }
        checked.insert(
            assertion.to_owned(),
            Checked {
                asserted: asserted.clone(),
                valid_until: claims.exp.saturating_add(CLOCK_LEEWAY),
            },
        );
        Ok(asserted)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Minter;

    fn secret() -> Secret {
        Secret::new("the host's jwtSecret").unwrap()
    }

    fn alice() -> Identity {
        Identity {
            user: "alice".into(),
            groups: vec!["devs".into(), "system:authenticated".into()],
        }
    }

    fn verifier_of(cluster: &str) -> ClusterVerifier {
        ClusterVerifier::new(cluster, &secret().cluster_key(cluster))
    }

    #[test]
    fn cluster_keys_are_stable_distinct_and_printable() {
        let a = secret().cluster_key("member-a");
        assert_eq!(a.expose(), secret().cluster_key("member-a").expose());
        assert_ne!(a.expose(), secret().cluster_key("member-b").expose());
        assert_ne!(
            a.expose(),
            Secret::new("another secret")
                .unwrap()
                .cluster_key("member-a")
                .expose()
        );
        assert_eq!(a.expose().len(), 43);
        assert!(
            a.expose()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        );
        // A key read back from a file (with its newline) is the same key.
        let text = format!("{}\n", String::from_utf8(a.expose().to_vec()).unwrap());
        assert_eq!(Secret::new(text).unwrap().expose(), a.expose());
    }

    #[test]
    fn an_assertion_round_trips_and_is_reused() {
        let asserter = Asserter::new(&secret());
        let assertion = asserter.assert("member-a", &alice());
        assert_eq!(asserter.assert("member-a", &alice()), assertion);
        assert_eq!(
            verifier_of("member-a")
                .verify(assertion.to_str().unwrap())
                .unwrap(),
            Asserted::User(alice())
        );
        let pass_through = asserter.assert_pass_through("member-a");
        assert_eq!(
            verifier_of("member-a")
                .verify(pass_through.to_str().unwrap())
                .unwrap(),
            Asserted::PassThrough
        );
        assert_ne!(pass_through, assertion);
        assert_eq!(asserter.assert_pass_through("member-a"), pass_through);
        assert_eq!(
            verifier_of("member-b")
                .verify(pass_through.to_str().unwrap())
                .unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn an_assertion_for_one_member_is_worthless_to_another() {
        let made = Asserter::new(&secret()).assert("member-a", &alice());
        let assertion = made.to_str().unwrap();
        // Member b's key does not verify it.
        assert_eq!(
            verifier_of("member-b").verify(assertion).unwrap_err(),
            AuthError::BadSignature
        );
        // Member a, holding its own key, cannot relabel it for b: signing with a's key
        // for cluster b still names a's key, which b does not accept.
        let forged = sign(
            &AssertionClaims {
                aud: ASSERTION_AUDIENCE.into(),
                cluster: "member-b".into(),
                user: "admin".into(),
                groups: vec!["system:masters".into()],
                pass_through: false,
                iat: now(),
                exp: now() + 60,
            },
            &EncodingKey::from_secret(secret().cluster_key("member-a").expose()),
        );
        assert_eq!(
            verifier_of("member-b").verify(&forged).unwrap_err(),
            AuthError::BadSignature
        );
        // And a's own verifier refuses it as meant for another cluster.
        assert_eq!(
            verifier_of("member-a").verify(&forged).unwrap_err(),
            AuthError::WrongCluster("member-b".into())
        );
    }

    #[test]
    fn a_user_token_is_no_assertion_and_an_assertion_no_user_token() {
        let user_token = Minter::new(&secret()).user_token("alice", &[], None);
        assert_eq!(
            verifier_of("member-a").verify(&user_token).unwrap_err(),
            AuthError::BadSignature
        );
        let assertion = Asserter::new(&secret()).assert("member-a", &alice());
        assert!(
            crate::Verifier::new(&secret())
                .verify_user(assertion.to_str().unwrap())
                .is_err()
        );
    }

    #[test]
    fn expired_assertions_and_other_audiences_are_refused() {
        let key = EncodingKey::from_secret(secret().cluster_key("member-a").expose());
        let claims = |aud: &str, exp: u64| AssertionClaims {
            aud: aud.into(),
            cluster: "member-a".into(),
            user: "alice".into(),
            groups: vec![],
            pass_through: false,
            iat: now(),
            exp,
        };
        let verifier = verifier_of("member-a");
        let expired = sign(&claims(ASSERTION_AUDIENCE, now() - CLOCK_LEEWAY - 5), &key);
        assert_eq!(verifier.verify(&expired).unwrap_err(), AuthError::Expired);
        // Within the clock leeway: a member whose clock runs ahead still accepts it.
        let skewed = sign(&claims(ASSERTION_AUDIENCE, now() - 30), &key);
        assert!(
            matches!(verifier.verify(&skewed).unwrap(), Asserted::User(u) if u.user == "alice")
        );
        // A user and pass-through at once, or neither, is no assertion.
        for (user, pass_through) in [("alice", true), ("", false)] {
            let odd = sign(
                &AssertionClaims {
                    user: user.into(),
                    pass_through,
                    ..claims(ASSERTION_AUDIENCE, now() + 60)
                },
                &key,
            );
            assert_eq!(
                verifier.verify(&odd).unwrap_err(),
                AuthError::BadClaim("user/pass_through")
            );
        }
        let agent = sign(&claims("tower-agent", now() + 60), &key);
        assert_eq!(
            verifier.verify(&agent).unwrap_err(),
            AuthError::WrongAudience("tower-agent".into())
        );
        assert!(matches!(
            verifier.verify("not.a.jwt").unwrap_err(),
            AuthError::Malformed(_)
        ));
    }

    #[test]
    fn agent_tokens_are_signed_with_the_cluster_key_and_carry_the_ca_pin() {
        let minter = Minter::new(&secret());
        let pin = format!("sha256:{}", "ab".repeat(32));
        let token = minter.agent_token_pinned("member-a", None, Some(&pin));
        let claims = crate::Verifier::new(&secret())
            .verify_agent(&token)
            .unwrap();
        assert_eq!(claims.ca.as_deref(), Some(pin.as_str()));
        assert_eq!(
            crate::AgentClaims::read_unverified(&token).unwrap().ca,
            Some(pin)
        );
        // Signed with member-a's key, not with the jwtSecret.
        let by_secret = crate::Verifier::new(&secret()).verify_user(&token);
        assert!(by_secret.is_err());
        // A token signed with the jwtSecret itself (an older Tower) is named as such.
        let legacy = minter.sign(&serde_json::json!({
            "sub": "member-a", "aud": "tower-agent", "iat": now()
        }));
        assert_eq!(
            crate::Verifier::new(&secret())
                .verify_agent(&legacy)
                .unwrap_err(),
            AuthError::LegacyAgentToken
        );
        // Relabelling a token for another cluster breaks its signature.
        let key_a = EncodingKey::from_secret(secret().cluster_key("member-a").expose());
        let relabelled = sign(
            &serde_json::json!({"sub": "member-b", "aud": "tower-agent", "iat": now()}),
            &key_a,
        );
        assert_eq!(
            crate::Verifier::new(&secret())
                .verify_agent(&relabelled)
                .unwrap_err(),
            AuthError::BadSignature
        );
    }
}
