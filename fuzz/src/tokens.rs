//! Bearer tokens and identity assertions as a hostile caller or agent sends them: any
//! header, any claims (a valid token's of each kind, changed, or none), signed with the
//! right key, another key or not at all. Checking
//! never panics; a token verifies only when it was signed with the key its kind needs
//! (the jwtSecret for a user, the cluster's key for an agent or an assertion); and a
//! second check (from the verifiers' caches) says what the first said.
use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use tower_auth::identity::{Asserted, ClusterVerifier};
use tower_auth::{AGENT_AUDIENCE, AgentClaims, Secret, Verifier};

const JWT_SECRET: &str = "the fuzzed host's jwtSecret";
/// The member whose agent checks assertions.
pub const MEMBER: &str = "member";

/// A token as a caller or an agent might send it.
#[derive(Arbitrary, Debug)]
pub struct Input {
    header: Header,
    /// The claims a token of a kind has, before `changes`.
    base: Base,
    changes: Vec<(Key, Claim)>,
    signature: Signature,
    around: Around,
}

#[derive(Arbitrary, Debug)]
enum Base {
    User(Expiry),
    Agent(Word),
    Assertion(Word, Expiry),
    Nothing,
}

/// A base's `exp`.
#[derive(Arbitrary, Debug)]
enum Expiry {
    InTenMinutes,
    Never,
    /// Seconds from now, either side of it.
    FromNow(i16),
}

/// What a caller puts around a token.
#[derive(Arbitrary, Debug)]
enum Around {
    Nothing,
    Whitespace,
    Prefix(String),
    Suffix(String),
}

#[derive(Arbitrary, Debug)]
enum Header {
    Hs256,
    Alg(Word),
    Json(String),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Key {
    Username,
    Sub,
    Groups,
    TokenType,
    Exp,
    Iat,
    Nbf,
    Aud,
    Iss,
    Cluster,
    User,
    PassThrough,
    Jti,
    Ca,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Claim {
    Word(Word),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    List(Vec<Word>),
    /// Seconds from now, so that `exp`, `iat` and `nbf` land on both sides of it.
    FromNow(i32),
}

#[derive(Arbitrary, Debug)]
enum Word {
    AccessToken,
    StaticToken,
    RefreshToken,
    AgentAudience,
    AssertionAudience,
    Member,
    Tower,
    Hs256,
    None,
    Any(String),
}

#[derive(Arbitrary, Debug)]
enum Signature {
    /// The key the base's kind needs: the jwtSecret for a user, the cluster's key for an
    /// agent or an assertion.
    Right,
    JwtSecret,
    ClusterKey(Word),
    OtherKey(String),
    Raw(String),
    Missing,
}

impl Expiry {
    /// The `exp` claim (null: none).
    fn at(&self, now: i64) -> Value {
        match self {
            Expiry::InTenMinutes => json!(now + 600),
            Expiry::Never => Value::Null,
            Expiry::FromNow(s) => json!(now + i64::from(*s)),
        }
    }
}

impl Word {
    fn text(&self) -> String {
        match self {
            Word::AccessToken => "access_token".into(),
            Word::StaticToken => "static_token".into(),
            Word::RefreshToken => "refresh_token".into(),
            Word::AgentAudience => AGENT_AUDIENCE.into(),
            Word::AssertionAudience => tower_auth::identity::ASSERTION_AUDIENCE.into(),
            Word::Member => MEMBER.into(),
            Word::Tower => tower_auth::TOWER_ISSUER.into(),
            Word::Hs256 => "HS256".into(),
            Word::None => "none".into(),
            Word::Any(s) => s.clone(),
        }
    }
}

impl Key {
    fn name(&self) -> String {
        match self {
            Key::Username => "username",
            Key::Sub => "sub",
            Key::Groups => "groups",
            Key::TokenType => "token_type",
            Key::Exp => "exp",
            Key::Iat => "iat",
            Key::Nbf => "nbf",
            Key::Aud => "aud",
            Key::Iss => "iss",
            Key::Cluster => "cluster",
            Key::User => "user",
            Key::PassThrough => "pass_through",
            Key::Jti => "jti",
            Key::Ca => "ca",
            Key::Other(s) => s,
        }
        .to_owned()
    }
}

impl Claim {
    fn value(&self, now: i64) -> Value {
        match self {
            Claim::Word(w) => Value::String(w.text()),
            Claim::Int(i) => json!(i),
            Claim::Float(f) => json!(f),
            Claim::Bool(b) => json!(b),
            Claim::Null => Value::Null,
            Claim::List(words) => words.iter().map(Word::text).collect(),
            Claim::FromNow(s) => json!(now + i64::from(*s)),
        }
    }
}

fn hs256(key: &[u8], input: &str) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(input.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// A key as HMAC uses it: hashed past its block (64 bytes), then zero-padded, so keys
/// that differ only in trailing zeros sign alike.
fn hmac_key(key: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut key = if key.len() > 64 {
        sha2::Sha256::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    while key.last() == Some(&0) {
        key.pop();
    }
    key
}

/// Whether an `aud` claim (a string or a list) names the agent's audience.
fn names_agent(aud: &Value) -> bool {
    match aud {
        Value::String(aud) => aud == AGENT_AUDIENCE,
        Value::Array(list) => list.iter().any(|a| a == AGENT_AUDIENCE),
        _ => false,
    }
}

/// Panics if the claims have an `exp` more than `leeway` seconds before `now`.
fn assert_not_expired(claims: &Value, now: i64, leeway: i64) {
    if let Some(exp) = claims.get("exp").and_then(Value::as_f64) {
        #[expect(clippy::cast_precision_loss, reason = "seconds since the epoch")]
        let earliest = (now - leeway) as f64;
        assert!(
            exp >= earliest,
            "a token that expired at {exp} verified at {now}"
        );
    }
}

/// Which kinds of token verified.
#[derive(Debug, Default, Clone, Copy)]
pub struct Verified {
    /// As a user token.
    pub user: bool,
    /// As an agent token.
    pub agent: bool,
    /// As an identity assertion for [`MEMBER`].
    pub assertion: bool,
}

/// Checks one token; says which kinds it verified as.
pub fn check(input: Input) -> Verified {
    let secret = Secret::new(JWT_SECRET).expect("a secret");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs(),
    )
    .expect("seconds fit");
    let header = match &input.header {
        Header::Hs256 => URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "typ": "JWT"}).to_string()),
        Header::Alg(alg) => URL_SAFE_NO_PAD.encode(json!({"alg": alg.text()}).to_string()),
        Header::Json(text) => URL_SAFE_NO_PAD.encode(text),
        Header::Raw(text) => text.clone(),
    };
    let mut claims = match &input.base {
        Base::User(exp) => json!({
            "username": "alice", "groups": ["devs"], "token_type": "access_token",
            "iat": now, "exp": exp.at(now),
        }),
        Base::Agent(cluster) => json!({"sub": cluster.text(), "aud": AGENT_AUDIENCE, "iat": now}),
        Base::Assertion(cluster, exp) => json!({
            "aud": tower_auth::identity::ASSERTION_AUDIENCE, "cluster": cluster.text(),
            "user": "alice", "iat": now, "exp": exp.at(now),
        }),
        Base::Nothing => json!({}),
    };
    let object = claims.as_object_mut().expect("an object");
    object.retain(|_, value| !value.is_null());
    for (key, claim) in &input.changes {
        object.insert(key.name(), claim.value(now));
    }
    let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    // The key that signed the token, if any did.
    let key = match (&input.signature, &input.base) {
        (Signature::Right, Base::Agent(cluster) | Base::Assertion(cluster, _)) => {
            Some(secret.cluster_key(&cluster.text()).expose().to_vec())
        }
        (Signature::Right | Signature::JwtSecret, _) => Some(secret.expose().to_vec()),
        (Signature::ClusterKey(cluster), _) => {
            Some(secret.cluster_key(&cluster.text()).expose().to_vec())
        }
        (Signature::OtherKey(key), _) => Some(key.as_bytes().to_vec()),
        (Signature::Raw(_) | Signature::Missing, _) => None,
    };
    let signature = match (&input.signature, &key) {
        (_, Some(key)) => hs256(key, &signing_input),
        (Signature::Raw(raw), None) => raw.clone(),
        _ => String::new(),
    };
    let signed_with = |want: &Secret| key.as_deref().map(hmac_key) == Some(hmac_key(want.expose()));
    let token = format!("{signing_input}.{signature}");
    let token = match &input.around {
        Around::Nothing => token,
        Around::Whitespace => format!(" \t{token}\r\n"),
        Around::Prefix(prefix) => format!("{prefix}{token}"),
        Around::Suffix(suffix) => token + suffix,
    };

    let verifier = Verifier::new(&secret);
    let user = verifier.verify_user(&token);
    if let Ok(identity) = &user {
        assert!(
            signed_with(&secret),
            "a user token verified without the jwtSecret's signature: {input:?}"
        );
        assert!(!identity.user.is_empty());
        assert!(
            matches!(
                claims["token_type"].as_str(),
                Some("access_token" | "static_token")
            ),
            "a user token verified with token_type {}",
            claims["token_type"]
        );
        assert!(
            !names_agent(&claims["aud"]),
            "an agent's token verified as a user's: {input:?}"
        );
        assert_not_expired(&claims, now, 0);
    }
    assert_eq!(verifier.verify_user(&token), user, "the cache disagrees");

    let agent = verifier.verify_agent(&token);
    if let Ok(claims) = &agent {
        assert!(
            signed_with(&secret.cluster_key(&claims.sub)),
            "an agent token verified without its cluster's key: {input:?}"
        );
        assert!(
            names_agent(&serde_json::to_value(&claims.aud).expect("an audience serializes")),
            "{input:?}"
        );
    }
    let _ = AgentClaims::read_unverified(&token);

    let member = ClusterVerifier::new(MEMBER, &secret.cluster_key(MEMBER));
    let asserted = member.verify(&token);
    if let Ok(asserted) = &asserted {
        assert!(
            signed_with(&secret.cluster_key(MEMBER)),
            "an assertion verified without the member's key: {input:?}"
        );
        if let Asserted::User(identity) = asserted {
            assert!(!identity.user.is_empty());
        }
        assert_eq!(claims["cluster"].as_str(), Some(MEMBER), "{input:?}");
        assert_eq!(
            claims["aud"].as_str(),
            Some(tower_auth::identity::ASSERTION_AUDIENCE),
            "{input:?}"
        );
        assert!(
            claims.get("exp").is_some(),
            "an assertion without exp verified"
        );
        // The agent allows the host's clock to be this far behind its own.
        assert_not_expired(&claims, now, 300);
    }
    assert_eq!(member.verify(&token), asserted, "the cache disagrees");

    let _ = tower_auth::bearer(&format!("Bearer {token}"));
    Verified {
        user: user.is_ok(),
        agent: agent.is_ok(),
        assertion: asserted.is_ok(),
    }
}
