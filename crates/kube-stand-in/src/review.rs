//! The review APIs a caller uses to ask about itself: `SelfSubjectReview`
//! (`authentication.k8s.io/v1`, what `kubectl auth whoami` prints) and
//! `SelfSubjectAccessReview` (`authorization.k8s.io/v1`, what `kubectl auth can-i` asks).
//!
//! Modelled on pkg/registry/authentication/selfsubjectreview/rest.go (the status is the user
//! the request runs as, after impersonation) and
//! pkg/registry/authorization/selfsubjectaccessreview/rest.go with
//! pkg/apis/authorization/validation/validation.go (exactly one of `resourceAttributes` and
//! `nonResourceAttributes`; the answer is the authorizer's decision and reason).

use serde_json::{Map, Value, json};

use crate::rbac::{Attributes, Authorizer, UserInfo};
use crate::status::ApiError;
use crate::store::Store;

/// The create-only review resources, for discovery: (group, version, plural, kind).
pub(crate) const RESOURCES: [(&str, &str, &str, &str); 2] = [
    (
        "authentication.k8s.io",
        "v1",
        "selfsubjectreviews",
        "SelfSubjectReview",
    ),
    (
        "authorization.k8s.io",
        "v1",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
    ),
];

fn check_type(body: &Value, api_version: &str, kind: &str) -> Result<(), ApiError> {
    for (field, want) in [("apiVersion", api_version), ("kind", kind)] {
        match body.get(field).and_then(Value::as_str) {
            None | Some("") => {}
            Some(v) if v == want => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the {field} in the data ({v}) does not match the expected {field} ({want})"
                )));
            }
        }
    }
    Ok(())
}

/// `POST /apis/authentication.k8s.io/v1/selfsubjectreviews`.
pub(crate) fn self_subject_review(user: &UserInfo, body: &Value) -> Result<Value, ApiError> {
    check_type(body, "authentication.k8s.io/v1", "SelfSubjectReview")?;
    let mut info = Map::new();
    info.insert("username".into(), json!(user.name));
    if !user.uid.is_empty() {
        info.insert("uid".into(), json!(user.uid));
    }
    info.insert("groups".into(), json!(user.groups));
    if !user.extra.is_empty() {
        info.insert("extra".into(), json!(user.extra));
    }
    Ok(json!({
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": info},
    }))
}

/// `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`: may `user` do what the
/// spec says?
pub(crate) fn self_subject_access_review(
    authorizer: &Authorizer,
    store: &Store,
    user: &UserInfo,
    body: &Value,
) -> Result<Value, ApiError> {
    check_type(body, "authorization.k8s.io/v1", "SelfSubjectAccessReview")?;
    let spec = &body["spec"];
    let resource = spec.get("resourceAttributes").filter(|v| v.is_object());
    let non_resource = spec.get("nonResourceAttributes").filter(|v| v.is_object());
    let s = |v: &Value, key: &str| v[key].as_str().unwrap_or("").to_owned();
    let attributes = match (resource, non_resource) {
        (Some(r), None) => Attributes {
            verb: s(r, "verb"),
            resource_request: true,
            api_group: s(r, "group"),
            api_version: s(r, "version"),
            namespace: s(r, "namespace"),
            resource: s(r, "resource"),
            subresource: s(r, "subresource"),
            name: s(r, "name"),
            ..Attributes::default()
        },
        (None, Some(n)) => Attributes {
            verb: s(n, "verb"),
            path: s(n, "path"),
            ..Attributes::default()
        },
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "SelfSubjectAccessReview.authorization.k8s.io \"\" is invalid: spec.nonResourceAttributes: Invalid value: \"\": cannot be specified in combination with resourceAttributes",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "SelfSubjectAccessReview.authorization.k8s.io \"\" is invalid: spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified",
            ));
        }
    };
    let decision = authorizer.authorize(store, user, &attributes);
    let mut status = Map::new();
    status.insert("allowed".into(), json!(decision.allowed));
    if !decision.reason.is_empty() {
        status.insert("reason".into(), json!(decision.reason));
    }
    Ok(json!({
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            name: name.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..UserInfo::default()
        }
    }

    #[test]
    fn access_reviews_ask_the_authorizer() {
        let store = Store::seeded();
        let authorizer = Authorizer::default();
        let alice = user("alice", &["system:authenticated"]);
        let ask = |spec: Value| {
            self_subject_access_review(&authorizer, &store, &alice, &json!({"spec": spec}))
        };
        let pods = ask(json!({"resourceAttributes": {"verb": "list", "resource": "pods", "namespace": "default"}}))
            .expect("review");
        assert_eq!(pods["status"], json!({"allowed": false}));
        let healthz = ask(json!({"nonResourceAttributes": {"verb": "get", "path": "/healthz"}}))
            .expect("review");
        assert_eq!(healthz["status"]["allowed"], true);
        assert_eq!(ask(json!({})).expect_err("neither").code, 422);
        let who = self_subject_review(&alice, &json!({})).expect("review");
        assert_eq!(
            who["status"]["userInfo"],
            json!({"username": "alice", "groups": ["system:authenticated"]})
        );
    }
}
