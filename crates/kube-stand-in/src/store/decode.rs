//! What a real apiserver's decoding does to a built-in kind's JSON before anything else
//! sees it.
//!
//! k8s.io/apiserver's create, update and patch handlers (`handlers/create.go`,
//! `update.go`, `patch.go`) decode the body, or a patch's result, into the kind's Go struct
//! with the strict serializer (sigs.k8s.io/json): a field the struct does not declare has
//! nowhere to go and is dropped, and is reported as `unknown field
//! "spec.template.spec.containers[0].foo"` — under `fieldValidation=Strict` (kubectl's
//! default) the request fails with 400 `{Kind} in version "{v}" cannot be handled as a
//! {Kind}: strict decoding error: unknown field …`, under the default `Warn` each is a
//! `Warning` header, under `Ignore` nothing. A value of the wrong type fails the decoding
//! whatever the directive (400). Server-side apply turns the apply configuration into its
//! typed form first (`fieldmanager.go`, `YAMLToTyped`) and refuses an undeclared field
//! whatever the directive: 500 `failed to create typed patch object ({namespace}/{name};
//! {group}/{version}, Kind={Kind}): .spec.foo: field not declared in schema`.
//!
//! The Go structs are modelled by k8s-openapi's types, generated from the same OpenAPI:
//! `serde_ignored` names each field their deserializers skip, `serde_path_to_error` where a
//! value failed. (k8s-openapi fills a missing required field with its zero value, as Go's
//! decoding does; validation, not decoding, refuses one.)

use std::fmt::Write as _;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::Resource;
use crate::status::ApiError;

/// One step of a path into a JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Key(String),
    Index(usize),
}

/// What decoding an object found: the fields the kind does not declare (those met before
/// a failure, if any), and where and why a value failed to decode (serde's words).
struct Decoded {
    unknown: Vec<Vec<Step>>,
    failure: Option<(String, String)>,
}

/// Decodes `object` (a whole object of `resource`, `apiVersion` and `kind` set) as the
/// kind's type. `None` for kinds served as custom resources (they have schemas of their
/// own, or none).
fn decode_as(resource: Resource, object: &Value) -> Option<Decoded> {
    use k8s_openapi::api::{apps, core, networking, policy, rbac};
    Some(match resource {
        Resource::Namespaces => decode::<core::v1::Namespace>(object),
        Resource::Pods => decode::<core::v1::Pod>(object),
        Resource::ConfigMaps => decode::<core::v1::ConfigMap>(object),
        Resource::Services => decode::<core::v1::Service>(object),
        Resource::Endpoints => decode::<core::v1::Endpoints>(object),
        Resource::Deployments => decode::<apps::v1::Deployment>(object),
        Resource::Secrets => decode::<core::v1::Secret>(object),
        Resource::ServiceAccounts => decode::<core::v1::ServiceAccount>(object),
        Resource::ClusterRoles => decode::<rbac::v1::ClusterRole>(object),
        Resource::ClusterRoleBindings => decode::<rbac::v1::ClusterRoleBinding>(object),
        Resource::Roles => decode::<rbac::v1::Role>(object),
        Resource::RoleBindings => decode::<rbac::v1::RoleBinding>(object),
        Resource::PodDisruptionBudgets => decode::<policy::v1::PodDisruptionBudget>(object),
        Resource::NetworkPolicies => decode::<networking::v1::NetworkPolicy>(object),
        Resource::Nodes => decode::<core::v1::Node>(object),
        Resource::Clusters | Resource::Users => return None,
    })
}

fn decode<K: DeserializeOwned>(object: &Value) -> Decoded {
    let mut unknown = Vec::new();
    let mut skipped = |path: serde_ignored::Path<'_>| unknown.push(steps(&path));
    let ignoring = serde_ignored::Deserializer::new(object, &mut skipped);
    let failure = serde_path_to_error::deserialize::<_, K>(ignoring)
        .err()
        .map(|e| (go_path(&path_steps(e.path())), e.into_inner().to_string()));
    Decoded { unknown, failure }
}

/// A `serde_ignored` path as steps (option and newtype wrappers are no steps).
fn steps(path: &serde_ignored::Path<'_>) -> Vec<Step> {
    let mut out = Vec::new();
    let mut at = path;
    loop {
        match at {
            serde_ignored::Path::Root => break,
            serde_ignored::Path::Seq { parent, index } => {
                out.push(Step::Index(*index));
                at = parent;
            }
            serde_ignored::Path::Map { parent, key } => {
                out.push(Step::Key(key.clone()));
                at = parent;
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => at = parent,
        }
    }
    out.reverse();
    out
}

fn path_steps(path: &serde_path_to_error::Path) -> Vec<Step> {
    path.iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => Some(Step::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect()
}

/// sigs.k8s.io/json's way of naming a field: `spec.containers[0].name`.
fn go_path(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// Go's words for bad base64 in a `[]byte` field (`base64.CorruptInputError`: "illegal
/// base64 data at input byte 3"), from the base64 crate's ("Invalid symbol 32, offset 3.").
fn go_base64_error(message: &str) -> Option<String> {
    let at = if let Some(rest) = message
        .strip_prefix("Invalid symbol ")
        .or_else(|| message.strip_prefix("Invalid last symbol "))
    {
        rest.split_once(", offset ")?
            .1
            .trim_end_matches('.')
            .to_owned()
    } else {
        message.strip_prefix("Invalid input length: ")?.to_owned()
    };
    Some(format!("illegal base64 data at input byte {at}"))
}

/// `{Kind} in version "{v}" cannot be handled as a {Kind}: …`, the 400 of a body that
/// does not decode.
fn undecodable(resource: Resource, why: &str) -> ApiError {
    let kind = resource.kind();
    ApiError::bad_request(format!(
        "{kind} in version \"{}\" cannot be handled as a {kind}: {why}",
        resource.version()
    ))
}

/// Decodes a built-in kind's object about to be written (`object` without its metadata,
/// `meta` apart) as the apiserver does: a wrong type is refused, an unknown field dropped
/// from both, or with `strict` refused. Returns the fields dropped (`spec.foo`).
pub(super) fn decode_object(
    resource: Resource,
    object: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    strict: bool,
) -> Result<Vec<String>, ApiError> {
    let mut whole = object.clone();
    whole.insert("apiVersion".into(), resource.api_version().into());
    whole.insert("kind".into(), resource.kind().into());
    whole.insert("metadata".into(), Value::Object(meta.clone()));
    let whole = Value::Object(whole);
    let Some(Decoded { unknown, failure }) = decode_as(resource, &whole) else {
        return Ok(Vec::new());
    };
    if let Some((path, message)) = failure {
        let why = match go_base64_error(&message) {
            Some(words) => words,
            None if path.is_empty() => format!("json: {message}"),
            None => format!("json: {message} at {path}"),
        };
        return Err(undecodable(resource, &why));
    }
    let named: Vec<String> = unknown.iter().map(|steps| go_path(steps)).collect();
    if strict && !named.is_empty() {
        let listed: Vec<String> = named
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        return Err(undecodable(
            resource,
            &format!("strict decoding error: {}", listed.join(", ")),
        ));
    }
    for steps in &unknown {
        match steps.split_first() {
            Some((Step::Key(top), rest)) if top == "metadata" => remove_from_map(meta, rest),
            _ => remove_from_map(object, steps),
        }
    }
    Ok(named)
}

/// Refuses an apply configuration of a built-in kind that sets a field the kind does not
/// declare, or one that does not decode (see the module's words).
pub(super) fn check_apply_config(
    resource: Resource,
    namespace: &str,
    name: &str,
    config: &Value,
) -> Result<(), ApiError> {
    let typed_error = |detail: String| {
        let group = resource.group();
        ApiError::internal(format!(
            "failed to create typed patch object ({namespace}/{name}; {group}/{}, Kind={}): {detail}",
            resource.version(),
            resource.kind()
        ))
    };
    let Some(Decoded { unknown, failure }) = decode_as(resource, config) else {
        return Ok(());
    };
    if let Some(first) = unknown.first() {
        return Err(typed_error(format!(
            "{}: field not declared in schema",
            super::fields::path_string_of(resource, config, first)
        )));
    }
    match failure {
        None => Ok(()),
        Some((path, message)) => Err(typed_error(format!(".{path}: {message}"))),
    }
}

/// Removes the field at `steps` from `map`, if it is there.
fn remove_from_map(map: &mut Map<String, Value>, steps: &[Step]) {
    match steps {
        [] => {}
        [Step::Key(key)] => {
            map.remove(key);
        }
        [Step::Key(key), rest @ ..] => {
            if let Some(child) = map.get_mut(key) {
                remove_from_value(child, rest);
            }
        }
        [Step::Index(_), ..] => {}
    }
}

fn remove_from_value(value: &mut Value, steps: &[Step]) {
    match (value, steps) {
        (Value::Object(map), _) => remove_from_map(map, steps),
        (Value::Array(items), [Step::Index(i), rest @ ..]) => {
            if let Some(item) = items.get_mut(*i) {
                remove_from_value(item, rest);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn split(value: Value) -> (Map<String, Value>, Map<String, Value>) {
        let Value::Object(mut object) = value else {
            panic!("not an object")
        };
        let meta = match object.remove("metadata") {
            Some(Value::Object(meta)) => meta,
            _ => Map::new(),
        };
        (object, meta)
    }

    fn deployment(container: Value) -> Value {
        json!({
            "metadata": {"name": "d", "labels": {"app": "d"}},
            "spec": {
                "selector": {"matchLabels": {"app": "d"}},
                "template": {
                    "metadata": {"labels": {"app": "d"}},
                    "spec": {"containers": [{"name": "a", "image": "a"}, container]},
                },
            },
        })
    }

    #[test]
    fn unknown_fields_are_dropped_at_any_depth_or_refused_when_strict() {
        let typo = json!({"name": "b", "image": "b",
            "securityContext": {"readOnlyRootFileSystem": true, "runAsNonRoot": true},
            "resources": {"limits": {"cpu": 1, "memory": "64Mi"}}});
        let (mut object, mut meta) = split(deployment(typo.clone()));
        meta.insert("labelz".into(), json!({"x": "y"}));
        object.insert("extra".into(), json!(1));
        let dropped = decode_object(Resource::Deployments, &mut object, &mut meta, false).unwrap();
        assert_eq!(
            dropped,
            [
                "extra",
                "metadata.labelz",
                "spec.template.spec.containers[1].securityContext.readOnlyRootFileSystem",
            ]
        );
        assert!(!object.contains_key("extra") && !meta.contains_key("labelz"));
        let context = &object["spec"]["template"]["spec"]["containers"][1]["securityContext"];
        assert_eq!(context, &json!({"runAsNonRoot": true}), "the rest is kept");
        // A number where a quantity goes is a quantity, as Go's Quantity decodes it.
        assert_eq!(
            object["spec"]["template"]["spec"]["containers"][1]["resources"]["limits"]["cpu"],
            json!(1)
        );

        let (mut object, mut meta) = split(deployment(typo));
        let err = decode_object(Resource::Deployments, &mut object, &mut meta, true).unwrap_err();
        assert_eq!(err.code, 400);
        assert_eq!(
            err.message,
            "Deployment in version \"v1\" cannot be handled as a Deployment: strict decoding error: \
             unknown field \"spec.template.spec.containers[1].securityContext.readOnlyRootFileSystem\""
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused() {
        let (mut object, mut meta) = split(json!({"metadata": {"name": "c"}, "data": {"k": 1}}));
        let err = decode_object(Resource::ConfigMaps, &mut object, &mut meta, false).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message.starts_with("ConfigMap in version \"v1\" cannot be handled as a ConfigMap: json: invalid type: integer `1`")
                && err.message.ends_with(" at data.k"),
            "{}",
            err.message
        );

        let (mut object, mut meta) =
            split(json!({"metadata": {"name": "s"}, "data": {"k": "not base64!"}}));
        let err = decode_object(Resource::Secrets, &mut object, &mut meta, false).unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (
                400,
                "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data at input byte 3"
            )
        );

        // Custom resources are not decoded here.
        let (mut object, mut meta) = split(json!({"spec": {"anything": 1}}));
        assert!(
            decode_object(Resource::Users, &mut object, &mut meta, true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_apply_configuration_with_an_undeclared_field_is_refused_by_its_typed_path() {
        let mut config =
            deployment(json!({"name": "b", "image": "b", "imagePullPolicyy": "Always"}));
        config["apiVersion"] = json!("apps/v1");
        config["kind"] = json!("Deployment");
        let err = check_apply_config(Resource::Deployments, "ns", "d", &config).unwrap_err();
        assert_eq!(err.code, 500);
        assert_eq!(
            err.message,
            "failed to create typed patch object (ns/d; apps/v1, Kind=Deployment): \
             .spec.template.spec.containers[name=\"b\"].imagePullPolicyy: field not declared in schema"
        );
        // A configuration sets only what it sets: no selector, no template.
        let config = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d"}, "spec": {"replicas": 2}});
        check_apply_config(Resource::Deployments, "ns", "d", &config).unwrap();
    }
}
