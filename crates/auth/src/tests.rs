#![allow(clippy::unwrap_used)]
use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn secret() -> Secret {
    Secret::new("s3cret-shared-by-host-and-members\n").unwrap()
}

fn verifier() -> Verifier {
    Verifier::new(&secret())
}

fn minter() -> Minter {
    Minter::new(&secret())
}

fn forge(header: &str, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode("sig")
    )
}

#[test]
fn agent_token_round_trips() {
    let token = minter().agent_token("member-1", Some(Duration::from_secs(60)));
    let claims = verifier().verify_agent(&token).unwrap();
    assert_eq!(claims.sub, "member-1");
    assert!(claims.exp.unwrap() > claims.iat);
    assert!(!claims.jti.is_empty());
}

#[test]
fn user_token_round_trips_with_groups() {
    let token = minter().user_token("alice", &["devs".into(), "ops".into()], None);
    assert_eq!(
        verifier().verify_user(&token).unwrap(),
        Identity {
            user: "alice".into(),
            groups: vec!["devs".into(), "ops".into()]
        }
    );
}

#[test]
fn kubesphere_token_with_sub_only_is_accepted() {
    let token = minter().sign(&serde_json::json!({
        "sub": "admin", "token_type": "access_token", "iss": "kubesphere", "exp": now() + 60
    }));
    assert_eq!(verifier().verify_user(&token).unwrap().user, "admin");
}

/// Signs agent `claims` with the key of the cluster they name (`sub`), under `alg`.
fn sign_agent_with(alg: Algorithm, claims: &serde_json::Value) -> String {
    let key = secret().cluster_key(claims["sub"].as_str().unwrap());
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(key.expose()),
    )
    .unwrap()
}

/// Signs agent `claims` with HS256 and the key of the cluster they name.
fn sign_agent(claims: &serde_json::Value) -> String {
    sign_agent_with(Algorithm::HS256, claims)
}

/// Signs `claims` with the shared secret under `alg` (an HMAC algorithm).
fn sign_with(alg: Algorithm, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret().expose()),
    )
    .unwrap()
}

/// How many variants [`AuthError`] has; kept in step with [`cause`].
const VARIANTS: usize = 15;

/// The word each error's message must contain to name its cause. The match has no
/// wildcard, so a new variant does not compile until it is listed here and covered below.
fn cause(error: &AuthError) -> &'static str {
    match error {
        AuthError::Missing => "no bearer token",
        AuthError::Malformed(_) => "malformed",
        AuthError::Unsigned => "alg: none",
        AuthError::WrongAlgorithm(_) => "algorithm",
        AuthError::BadSignature => "signature",
        AuthError::Expired => "expired",
        AuthError::NotYetValid => "not valid yet",
        AuthError::IssuedInFuture => "before it was issued",
        AuthError::AgentTokenAsUser => "cannot be used as a user token",
        AuthError::UserTokenAsAgent => "cannot be used as an agent token",
        AuthError::WrongAudience(_) => "audience",
        AuthError::WrongTokenType(_) => "token_type",
        AuthError::BadClaim(_) => "claim",
        AuthError::LegacyAgentToken => "older tower",
        AuthError::WrongCluster(_) => "not this one",
    }
}

#[test]
fn each_bad_token_has_its_own_error() {
    let v = verifier();
    let agent = minter().agent_token("c1", None);
    let user = minter().user_token("bob", &[], None);
    let other = Minter::new(&Secret::new("another secret").unwrap()).user_token("bob", &[], None);
    let expired = minter().sign(&serde_json::json!({
        "username": "bob", "token_type": "access_token", "exp": now() - 3600
    }));
    let future = minter().sign(&serde_json::json!({
        "username": "bob", "token_type": "access_token", "nbf": now() + 3600
    }));
    let refresh = minter().sign(&serde_json::json!({
        "username": "bob", "token_type": "refresh_token"
    }));
    let issued_later = minter().sign(&serde_json::json!({
        "username": "bob", "token_type": "access_token", "iat": now() + 60
    }));
    let no_token_type = minter().sign(&serde_json::json!({"username": "bob"}));
    let none = forge(
        r#"{"alg":"none","typ":"JWT"}"#,
        &serde_json::json!({"username": "root", "token_type": "access_token"}),
    );
    let rs256 = forge(
        r#"{"alg":"RS256","typ":"JWT"}"#,
        &serde_json::json!({"username": "root", "token_type": "access_token"}),
    );
    let wrong_aud = minter().sign(&serde_json::json!({"sub": "c1", "aud": "kubernetes", "iat": 1}));
    let legacy = minter().sign(&serde_json::json!({"sub": "c1", "aud": "tower-agent", "iat": 1}));
    let for_c2 = identity::Asserter::new(&secret()).assert(
        "c2",
        &Identity {
            user: "bob".into(),
            groups: vec![],
        },
    );
    // c1's agent, holding c1's key, relabels an assertion for c2 as its own: refused.
    let c1_key = secret().cluster_key("c1");
    let relabelled = sign(
        &serde_json::json!({"aud": "tower-identity", "cluster": "c2", "user": "bob",
                            "iat": now(), "exp": now() + 60}),
        &EncodingKey::from_secret(c1_key.expose()),
    );
    let c1 = identity::ClusterVerifier::new("c1", &c1_key);

    // Every variant, each from a real token (or a missing one).
    let cases: Vec<(Result<(), AuthError>, AuthError)> = vec![
        (v.verify_user("").map(drop), AuthError::Missing),
        (
            v.verify_user("garbage").map(drop),
            AuthError::Malformed("a JWT has three dot-separated parts"),
        ),
        (v.verify_user(&none).map(drop), AuthError::Unsigned),
        (v.verify_agent(&none).map(drop), AuthError::Unsigned),
        (
            v.verify_user(&rs256).map(drop),
            AuthError::WrongAlgorithm("RS256".into()),
        ),
        (v.verify_user(&other).map(drop), AuthError::BadSignature),
        (v.verify_user(&expired).map(drop), AuthError::Expired),
        (v.verify_user(&future).map(drop), AuthError::NotYetValid),
        (
            v.verify_user(&issued_later).map(drop),
            AuthError::IssuedInFuture,
        ),
        (v.verify_user(&agent).map(drop), AuthError::AgentTokenAsUser),
        (v.verify_agent(&user).map(drop), AuthError::UserTokenAsAgent),
        (
            v.verify_agent(&wrong_aud).map(drop),
            AuthError::WrongAudience("kubernetes".into()),
        ),
        (
            v.verify_user(&refresh).map(drop),
            AuthError::WrongTokenType("refresh_token".into()),
        ),
        (
            v.verify_user(&no_token_type).map(drop),
            AuthError::BadClaim("token_type"),
        ),
        (
            v.verify_agent(&legacy).map(drop),
            AuthError::LegacyAgentToken,
        ),
        (
            c1.verify(for_c2.to_str().unwrap()).map(drop),
            AuthError::BadSignature,
        ),
        (
            c1.verify(&relabelled).map(drop),
            AuthError::WrongCluster("c2".into()),
        ),
    ];
    for (got, want) in &cases {
        assert_eq!(got, &Err(want.clone()));
    }
    assert!(matches!(
        v.verify_user("a.b.c"),
        Err(AuthError::Malformed(_))
    ));

    // Each variant is produced above; their messages are pairwise distinct, name their
    // cause, and never echo the token.
    let errors: Vec<AuthError> = cases.into_iter().map(|(_, want)| want).collect();
    let mut seen = std::collections::HashSet::new();
    for error in &errors {
        seen.insert(std::mem::discriminant(error));
    }
    assert_eq!(seen.len(), VARIANTS, "every AuthError variant is covered");
    let mut distinct: Vec<AuthError> = Vec::new();
    for error in errors {
        if !distinct
            .iter()
            .any(|e| std::mem::discriminant(e) == std::mem::discriminant(&error))
        {
            distinct.push(error);
        }
    }
    for (i, a) in distinct.iter().enumerate() {
        let message = a.to_string();
        assert!(
            message.to_lowercase().contains(cause(a)),
            "{a:?} says {message:?}, which does not name {:?}",
            cause(a)
        );
        for token in [&agent, &user, &other, &expired, &none, &rs256] {
            assert!(!message.contains(token.as_str()), "{a:?} echoes a token");
        }
        for b in &distinct[i + 1..] {
            assert_ne!(message, b.to_string(), "{a:?} and {b:?} read the same");
        }
    }
}

#[test]
fn hs384_and_hs512_tokens_signed_with_the_right_secret_are_refused() {
    let v = verifier();
    let agent_claims = serde_json::json!({"sub": "c1", "aud": AGENT_AUDIENCE, "iat": now()});
    let user_claims = serde_json::json!({"username": "bob", "token_type": ACCESS_TOKEN});
    // The same claims under HS256 pass, so only the algorithm is at fault below.
    assert_eq!(
        v.verify_agent(&sign_agent(&agent_claims)).unwrap().sub,
        "c1"
    );
    assert_eq!(
        v.verify_user(&sign_with(Algorithm::HS256, &user_claims))
            .unwrap()
            .user,
        "bob"
    );
    for (alg, name) in [(Algorithm::HS384, "HS384"), (Algorithm::HS512, "HS512")] {
        let agent = sign_agent_with(alg, &agent_claims);
        let user = sign_with(alg, &user_claims);
        for refused in [
            v.verify_agent(&agent).map(drop),
            v.verify_user(&user).map(drop),
        ] {
            let error = refused.unwrap_err();
            assert_eq!(error, AuthError::WrongAlgorithm(name.into()));
            let message = error.to_string();
            assert!(
                message.contains("algorithm") && message.contains(name),
                "{message}"
            );
        }
    }
}

#[test]
fn a_token_is_refused_from_the_second_its_exp_names_as_kubesphere_refuses_it() {
    let v = verifier();
    let user = |exp: u64| {
        Minter::new(&secret()).sign(&serde_json::json!({
            "username": "alice", "token_type": ACCESS_TOKEN, "iat": now() - 60, "exp": exp
        }))
    };
    let agent = |exp: u64| {
        sign_agent(&serde_json::json!({
            "sub": "c1", "aud": AGENT_AUDIENCE, "iat": now() - 60, "exp": exp
        }))
    };
    // Whatever second the checks run in, it is no earlier than `now()` here.
    let exp = now();
    assert_eq!(v.verify_user(&user(exp)), Err(AuthError::Expired));
    assert_eq!(
        v.verify_agent(&agent(exp)).map(drop),
        Err(AuthError::Expired)
    );
    assert!(v.verify_user(&user(exp + 60)).is_ok());
    assert!(v.verify_agent(&agent(exp + 60)).is_ok());
}

#[test]
fn an_expired_agent_token_is_refused_as_expired() {
    let v = verifier();
    let claims = |exp: u64| {
        serde_json::json!({
            "sub": "c1", "aud": AGENT_AUDIENCE, "iat": now() - 7200, "exp": exp, "jti": "j1"
        })
    };
    assert_eq!(
        v.verify_agent(&sign_agent(&claims(now() - 3600))),
        Err(AuthError::Expired)
    );
    // No leeway: a second past exp is past it, as KubeSphere has it.
    assert_eq!(
        v.verify_agent(&sign_agent(&claims(now() - 1))),
        Err(AuthError::Expired)
    );
    // The same token with an exp ahead is fine.
    assert_eq!(
        v.verify_agent(&sign_agent(&claims(now() + 3600)))
            .unwrap()
            .jti,
        "j1"
    );
}

#[test]
fn an_agent_token_for_another_audience_is_refused() {
    let v = verifier();
    let with_aud = |aud: serde_json::Value| {
        sign_agent(&serde_json::json!({"sub": "c1", "aud": aud, "iat": now()}))
    };
    assert_eq!(
        v.verify_agent(&with_aud(serde_json::json!("tower-server"))),
        Err(AuthError::WrongAudience("tower-server".into()))
    );
    // Audiences compare exactly.
    assert_eq!(
        v.verify_agent(&with_aud(serde_json::json!("Tower-Agent"))),
        Err(AuthError::WrongAudience("Tower-Agent".into()))
    );
    assert_eq!(
        v.verify_agent(&with_aud(serde_json::json!(["kubesphere", "kubernetes"]))),
        Err(AuthError::WrongAudience("kubesphere,kubernetes".into()))
    );
    // A list that includes the agent's audience is accepted.
    assert_eq!(
        v.verify_agent(&with_aud(serde_json::json!(["kubernetes", AGENT_AUDIENCE])))
            .unwrap()
            .sub,
        "c1"
    );
    let message = AuthError::WrongAudience("tower-server".into()).to_string();
    assert!(
        message.contains("audience") && message.contains("tower-agent"),
        "{message}"
    );
}

#[test]
fn tampered_claims_fail_the_signature() {
    let token = minter().user_token("bob", &[], None);
    let mut parts: Vec<&str> = token.split('.').collect();
    let evil = URL_SAFE_NO_PAD.encode(r#"{"username":"admin","token_type":"access_token"}"#);
    parts[1] = &evil;
    assert_eq!(
        verifier().verify_user(&parts.join(".")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn bearer_and_secret_parsing() {
    assert_eq!(bearer("Bearer abc"), Some("abc"));
    assert_eq!(bearer("bearer  abc "), Some("abc"));
    assert_eq!(bearer("Basic abc"), None);
    assert_eq!(bearer("Bearer "), None);
    assert!(Secret::new(" \n").is_none());
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert_eq!(format!("{:?}", secret()), "Secret(..)");
}

/// KubeSphere 3.4 (pkg/apiserver/authentication/token/issuer.go `Verify`, and the JWT
/// authenticator, which takes access and static tokens): exp enforced when present and
/// with no leeway, iat at most 10 s ahead, static tokens accepted, refresh tokens not.
#[test]
fn user_tokens_follow_kubesphere_s_acceptance_rules() {
    let v = verifier();
    let token = |claims: serde_json::Value| minter().sign(&claims);
    let accepted = [
        serde_json::json!({"username": "bob", "token_type": "static_token"}),
        serde_json::json!({"username": "bob", "token_type": "access_token"}),
        serde_json::json!({"username": "bob", "token_type": "access_token", "iat": now() + 5}),
        serde_json::json!({"username": "bob", "token_type": "access_token", "exp": now() + 5}),
    ];
    for claims in accepted {
        assert!(v.verify_user(&token(claims.clone())).is_ok(), "{claims}");
    }
    let refused = [
        (
            serde_json::json!({"username": "bob", "token_type": "access_token", "exp": now() - 1}),
            AuthError::Expired,
        ),
        (
            serde_json::json!({"username": "bob", "token_type": "access_token", "iat": now() + 15}),
            AuthError::IssuedInFuture,
        ),
        (
            serde_json::json!({"username": "bob", "token_type": "refresh_token", "exp": now() + 60}),
            AuthError::WrongTokenType("refresh_token".into()),
        ),
        (
            serde_json::json!({"username": "bob", "token_type": "code"}),
            AuthError::WrongTokenType("code".into()),
        ),
    ];
    for (claims, error) in refused {
        assert_eq!(
            v.verify_user(&token(claims.clone())),
            Err(error),
            "{claims}"
        );
    }
}

#[test]
fn a_token_without_exp_is_remembered_for_ten_minutes_at_most_then_verified_again() {
    let secret = Secret::new("cache-secret").unwrap();
    let verifier = Verifier::new(&secret);
    let token = Minter::new(&secret).user_token("alice", &[], None);
    verifier.verify_user(&token).unwrap();
    let until = verifier.users.lock().unwrap()[token.as_str()].valid_until;
    assert!(until <= now() + 600 && until > now() + 590, "{until}");
    // Its time in the cache over, it is verified again (and still good), not refused.
    verifier
        .users
        .lock()
        .unwrap()
        .get_mut(token.as_str())
        .unwrap()
        .valid_until = now() - 1;
    assert!(verifier.verify_user(&token).is_ok());
    assert!(verifier.users.lock().unwrap()[token.as_str()].valid_until > now());
}

#[test]
fn verified_user_tokens_are_remembered_until_they_expire() {
    let secret = Secret::new("cache-secret").unwrap();
    let verifier = Verifier::new(&secret);
    let token =
        Minter::new(&secret).user_token("alice", &["dev".into()], Some(Duration::from_secs(60)));
    let first = verifier.verify_user(&token).unwrap();
    assert_eq!(verifier.users.lock().unwrap().len(), 1);
    // A clone shares what was learnt.
    assert_eq!(verifier.clone().verify_user(&token).unwrap(), first);
    // Once past its exp (plus leeway) a remembered token is refused, and forgotten.
    verifier
        .users
        .lock()
        .unwrap()
        .get_mut(token.as_str())
        .unwrap()
        .valid_until = now() - 1;
    assert_eq!(verifier.verify_user(&token), Err(AuthError::Expired));
    assert!(verifier.users.lock().unwrap().is_empty());
    // Refusals are never remembered.
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert!(verifier.verify_user(&forged).is_err());
    assert!(verifier.users.lock().unwrap().is_empty());
}
