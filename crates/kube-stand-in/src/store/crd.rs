//! The structural schemas of KubeSphere's CRDs that the stand-in serves (Cluster, User)
//! and what apiextensions-apiserver does with them on every write.
//!
//! The schemas are ks-core's `config/ks-core/crds/cluster.kubesphere.io_clusters.yaml`
//! (Tower's `deploy/host/crd-cluster.yaml` has the same fields) and
//! `config/ks-core/crds/iam.kubesphere.io_users.yaml` at kubesphere/kubesphere v3.4.1. A
//! field the schema does not declare is dropped (`structuralpruning.Prune`), or refused
//! with 400 when the request asks `fieldValidation=Strict` (kubectl does); a declared one
//! must have its type and format, and a required one must be there (kube-openapi's
//! validator: 422). Under the default `fieldValidation=Warn` each dropped field is a
//! `Warning` header to the client. Not modelled: the User CRD's `spec.password` length
//! and pattern (Tower never writes Users; KubeSphere's webhook hashes the password).

use base64::Engine as _;
use serde_json::{Map, Value};

use super::Resource;
use super::validation::invalid_object;
use crate::status::ApiError;

/// A node of the schema.
#[derive(Debug, Clone, Copy)]
pub(super) enum Schema {
    /// `type: string`.
    Str,
    /// `type: string, format: byte`: base64.
    Bytes,
    /// `type: string, format: date-time`: RFC 3339.
    DateTime,
    /// `type: integer`.
    Int,
    /// `type: boolean`.
    Bool,
    /// `type: object` with these properties and these required.
    Object(&'static [(&'static str, Schema)], &'static [&'static str]),
    /// `type: object, additionalProperties: …`.
    MapOf(&'static Schema),
    /// `type: array, items: …`.
    List(&'static Schema),
    /// `metadata`: ObjectMeta, validated apart.
    Meta,
}

use Schema::{Bool, Bytes, DateTime, Int, List, MapOf, Meta, Object, Str};

const CONNECTION: Schema = Object(
    &[
        ("externalKubernetesAPIEndpoint", Str),
        ("kubeconfig", Bytes),
        ("kubernetesAPIEndpoint", Str),
        ("kubernetesAPIServerPort", Int),
        ("kubesphereAPIEndpoint", Str),
        ("kubesphereAPIServerPort", Int),
        ("token", Str),
        ("type", Str),
    ],
    &[],
);
const CONDITION: Schema = Object(
    &[
        ("lastTransitionTime", DateTime),
        ("lastUpdateTime", DateTime),
        ("message", Str),
        ("reason", Str),
        ("status", Str),
        ("type", Str),
    ],
    &["status", "type"],
);
const CLUSTER: Schema = Object(
    &[
        ("apiVersion", Str),
        ("kind", Str),
        ("metadata", Meta),
        (
            "spec",
            Object(
                &[
                    ("connection", CONNECTION),
                    ("enable", Bool),
                    ("externalKubeAPIEnabled", Bool),
                    ("joinFederation", Bool),
                    ("provider", Str),
                ],
                &[],
            ),
        ),
        (
            "status",
            Object(
                &[
                    ("conditions", List(&CONDITION)),
                    ("configz", MapOf(&Bool)),
                    ("kubeSphereVersion", Str),
                    ("kubernetesVersion", Str),
                    ("nodeCount", Int),
                    ("region", Str),
                    ("uid", Str),
                    ("zones", List(&Str)),
                ],
                &[],
            ),
        ),
    ],
    &[],
);

/// KubeSphere 3.4's `User`: `spec.email` required, `spec.groups` a list of strings,
/// `status.state` a string (Active, Disabled, AuthLimitExceeded; the CRD has no enum),
/// no status subresource.
const USER: Schema = Object(
    &[
        ("apiVersion", Str),
        ("kind", Str),
        ("metadata", Meta),
        (
            "spec",
            Object(
                &[
                    ("description", Str),
                    ("displayName", Str),
                    ("email", Str),
                    ("groups", List(&Str)),
                    ("lang", Str),
                    ("password", Str),
                ],
                &["email"],
            ),
        ),
        (
            "status",
            Object(
                &[
                    ("lastLoginTime", DateTime),
                    ("lastTransitionTime", DateTime),
                    ("reason", Str),
                    ("state", Str),
                ],
                &[],
            ),
        ),
    ],
    &["spec"],
);

/// The schema of `resource`'s CRD, if it is one of KubeSphere's.
pub(super) fn schema_of(resource: Resource) -> Option<&'static Schema> {
    match resource {
        Resource::Clusters => Some(&CLUSTER),
        Resource::Users => Some(&USER),
        _ => None,
    }
}

/// Prunes `object` (the whole object) to `resource`'s schema, or with `strict` refuses
/// what it would prune; then checks every declared field's type and format and that the
/// required ones are there. Returns the fields dropped (`spec.anything`); a resource
/// that is no CRD here is left alone.
pub(super) fn prune_and_validate(
    resource: Resource,
    object: &mut Map<String, Value>,
    name: &str,
    strict: bool,
) -> Result<Vec<String>, ApiError> {
    let Some(Object(fields, required)) = schema_of(resource) else {
        return Ok(Vec::new());
    };
    let mut unknown = Vec::new();
    let mut errors = Vec::new();
    walk_object(object, fields, required, "", &mut unknown, &mut errors);
    if strict && !unknown.is_empty() {
        let unknown: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        let (kind, version) = (
            resource.kind(),
            resource
                .api_version()
                .rsplit('/')
                .next()
                .unwrap_or_default(),
        );
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            unknown.join(", ")
        )));
    }
    if errors.is_empty() {
        Ok(unknown)
    } else {
        Err(invalid_object(resource, name, &errors))
    }
}

/// Prunes and checks the properties of one object at `path` (`a.b`; the root is empty).
fn walk_object(
    object: &mut Map<String, Value>,
    fields: &[(&str, Schema)],
    required: &[&str],
    path: &str,
    unknown: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    object.retain(|key, _| {
        let known = fields.iter().any(|(name, _)| name == key);
        if !known {
            unknown.push(join(key));
        }
        known
    });
    for required in required {
        if !object.contains_key(*required) {
            errors.push(format!("{}: Required value", join(required)));
        }
    }
    for (key, value) in object.iter_mut() {
        if let Some((_, schema)) = fields.iter().find(|(name, _)| name == key) {
            walk(value, *schema, &join(key), unknown, errors);
        }
    }
}

fn walk(
    value: &mut Value,
    schema: Schema,
    path: &str,
    unknown: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    // kube-openapi's message: `{path}: Invalid value: "{type}": {path} in body must be of
    // type {want}: "{type}"`.
    let mut wrong = |want: &str, value: &Value| {
        let got = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        errors.push(format!(
            "{path}: Invalid value: \"{got}\": {path} in body must be of type {want}: \"{got}\""
        ));
    };
    match (schema, &mut *value) {
        (Meta, _) => {}
        (Str, Value::String(_)) | (Bool, Value::Bool(_)) => {}
        (Int, Value::Number(n)) if n.is_i64() || n.is_u64() => {}
        (Bytes, Value::String(s)) => {
            if base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .is_err()
            {
                errors.push(format!(
                    "{path}: Invalid value: {s:?}: {path} in body must be of type byte: {s:?}"
                ));
            }
        }
        (DateTime, Value::String(s)) => {
            if crate::clock::parse_rfc3339(s).is_none() {
                errors.push(format!(
                    "{path}: Invalid value: {s:?}: {path} in body must be of type date-time: {s:?}"
                ));
            }
        }
        (Object(fields, required), Value::Object(object)) => {
            walk_object(object, fields, required, path, unknown, errors);
        }
        (MapOf(item), Value::Object(object)) => {
            for (key, value) in object.iter_mut() {
                walk(value, *item, &format!("{path}.{key}"), unknown, errors);
            }
        }
        (List(item), Value::Array(items)) => {
            for (i, value) in items.iter_mut().enumerate() {
                walk(value, *item, &format!("{path}[{i}]"), unknown, errors);
            }
        }
        (Str | Bytes | DateTime, other) => wrong("string", other),
        (Int, other) => wrong("integer", other),
        (Bool, other) => wrong("boolean", other),
        (Object(..) | MapOf(_), other) => wrong("object", other),
        (List(_), other) => wrong("array", other),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    /// `bad`, an object of `resource` named `x`, is refused with 422 and `message`.
    fn assert_invalid(resource: Resource, bad: Value, message: &str) {
        let err = prune_and_validate(resource, &mut object(bad), "x", false).expect_err(message);
        assert_eq!(err.code, 422);
        assert!(err.message.contains(message), "{}", err.message);
        let prefix = format!(
            "{}.{} \"x\" is invalid: ",
            resource.kind(),
            resource.api_version().split('/').next().unwrap_or_default()
        );
        assert!(err.message.starts_with(&prefix), "{}", err.message);
    }

    #[test]
    fn undeclared_fields_are_pruned_or_refused_and_declared_ones_checked() {
        let mut cluster = object(json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": {"name": "m", "anything": "metadata is not pruned here"},
            "spec": {"joinFederation": true, "anything": {"nested": [1]},
                     "connection": {"type": "proxy", "kubeconfig": "YWJj", "kubernetesAPIServerPort": 6443}},
            "status": {"configz": {"devops": false}, "zones": ["a"],
                       "conditions": [{"type": "Ready", "status": "True",
                                       "lastTransitionTime": "2026-12-07T03:00:00Z", "extra": 1}]},
        }));
        let dropped = prune_and_validate(Resource::Clusters, &mut cluster, "m", false)
            .expect("valid once pruned");
        assert_eq!(dropped, ["spec.anything", "status.conditions[0].extra"]);
        assert!(cluster["spec"].get("anything").is_none());
        assert!(cluster["status"]["conditions"][0].get("extra").is_none());
        assert_eq!(
            cluster["spec"]["connection"]["kubernetesAPIServerPort"],
            6443
        );
        assert_eq!(
            cluster["metadata"]["anything"],
            "metadata is not pruned here"
        );

        let mut strict = object(json!({"spec": {"anything": 1, "connection": {"other": 2}}}));
        let err =
            prune_and_validate(Resource::Clusters, &mut strict, "m", true).expect_err("strict");
        assert_eq!(err.code, 400);
        assert!(
            err.message.ends_with(
                "strict decoding error: unknown field \"spec.anything\", unknown field \"spec.connection.other\""
            ),
            "{}",
            err.message
        );

        for (bad, message) in [
            (
                json!({"spec": {"connection": {"kubernetesAPIServerPort": "6443"}}}),
                "spec.connection.kubernetesAPIServerPort: Invalid value: \"string\": spec.connection.kubernetesAPIServerPort in body must be of type integer: \"string\"",
            ),
            (
                json!({"spec": {"connection": {"kubeconfig": "not base64!"}}}),
                "spec.connection.kubeconfig in body must be of type byte",
            ),
            (
                json!({"status": {"conditions": [{"type": "Ready"}]}}),
                "status.conditions[0].status: Required value",
            ),
            (
                json!({"status": {"conditions": [{"type": "R", "status": "T", "lastUpdateTime": "yesterday"}]}}),
                "must be of type date-time",
            ),
            (
                json!({"spec": {"enable": "yes"}}),
                "must be of type boolean",
            ),
        ] {
            assert_invalid(Resource::Clusters, bad, message);
        }
    }

    #[test]
    fn users_are_pruned_to_kubesphere_s_schema_and_need_an_email() {
        let mut user = object(json!({
            "apiVersion": "iam.kubesphere.io/v1alpha2", "kind": "User",
            "metadata": {"name": "alice"},
            "spec": {"email": "alice@example.com", "groups": ["devs"], "role": "admin"},
            "status": {"state": "Disabled", "lastTransitionTime": "2026-12-07T03:00:00Z"},
        }));
        let dropped =
            prune_and_validate(Resource::Users, &mut user, "alice", false).expect("valid");
        assert_eq!(dropped, ["spec.role"]);
        assert_eq!(user["spec"]["groups"], json!(["devs"]));
        assert_eq!(user["status"]["state"], "Disabled");

        let err = prune_and_validate(
            Resource::Users,
            &mut object(json!({"spec": {"x": 1}})),
            "u",
            true,
        )
        .expect_err("strict");
        assert_eq!(
            (err.code, err.message.as_str()),
            (
                400,
                "User in version \"v1alpha2\" cannot be handled as a User: strict decoding error: unknown field \"spec.x\""
            )
        );
        for (bad, message) in [
            (json!({"metadata": {"name": "u"}}), "spec: Required value"),
            (
                json!({"spec": {"groups": ["devs"]}}),
                "spec.email: Required value",
            ),
            (
                json!({"spec": {"email": "u@example.com", "groups": "devs"}}),
                "spec.groups in body must be of type array",
            ),
            (
                json!({"spec": {"email": "u@example.com"}, "status": {"state": true}}),
                "status.state in body must be of type string",
            ),
        ] {
            assert_invalid(Resource::Users, bad, message);
        }
    }
}
