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

#[test]
fn each_bad_token_has_its_own_error() {
    let v = verifier();
    let agent = minter().agent_token("c1", None);
    let user = minter().user_token("bob", &[], None);
    let other = Minter::new(&Secret::new("another secret").unwrap()).user_token("bob", &[], None);
    let expired = minter().sign(&serde_json::json!({
        "username": "bob", "token_type": "access_token", "exp": now() - 3600
    }));
    let refresh = minter().sign(&serde_json::json!({
        "username": "bob", "token_type": "refresh_token"
    }));
    let none = forge(
        r#"{"alg":"none","typ":"JWT"}"#,
        &serde_json::json!({"username": "root", "token_type": "access_token"}),
    );
    let rs256 = forge(
        r#"{"alg":"RS256","typ":"JWT"}"#,
        &serde_json::json!({"username": "root", "token_type": "access_token"}),
    );
    let wrong_aud = minter().sign(&serde_json::json!({"sub": "c1", "aud": "kubernetes", "iat": 1}));

    assert_eq!(v.verify_user(""), Err(AuthError::Missing));
    assert_eq!(
        v.verify_user("garbage"),
        Err(AuthError::Malformed("a JWT has three dot-separated parts"))
    );
    assert!(matches!(
        v.verify_user("a.b.c"),
        Err(AuthError::Malformed(_))
    ));
    assert_eq!(v.verify_user(&other), Err(AuthError::BadSignature));
    assert_eq!(v.verify_user(&expired), Err(AuthError::Expired));
    assert_eq!(v.verify_user(&none), Err(AuthError::Unsigned));
    assert_eq!(v.verify_agent(&none), Err(AuthError::Unsigned));
    assert_eq!(
        v.verify_user(&rs256),
        Err(AuthError::WrongAlgorithm("RS256".into()))
    );
    assert_eq!(v.verify_user(&agent), Err(AuthError::AgentTokenAsUser));
    assert_eq!(v.verify_agent(&user), Err(AuthError::UserTokenAsAgent));
    assert_eq!(
        v.verify_agent(&wrong_aud),
        Err(AuthError::WrongAudience("kubernetes".into()))
    );
    assert_eq!(
        v.verify_user(&refresh),
        Err(AuthError::WrongTokenType("refresh_token".into()))
    );

    // Messages are distinct and never echo the token.
    let errors = [
        AuthError::Missing,
        AuthError::Unsigned,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::AgentTokenAsUser,
        AuthError::UserTokenAsAgent,
    ];
    let messages: std::collections::HashSet<String> =
        errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(messages.len(), errors.len());
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
        .valid_until = Some(now() - 1);
    assert_eq!(verifier.verify_user(&token), Err(AuthError::Expired));
    assert!(verifier.users.lock().unwrap().is_empty());
    // Refusals are never remembered.
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert!(verifier.verify_user(&forged).is_err());
    assert!(verifier.users.lock().unwrap().is_empty());
}
