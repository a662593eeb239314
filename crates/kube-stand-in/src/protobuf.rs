//! Just enough of Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`) to
//! read what kubectl's typed clients send: `kubectl create token` (a TokenRequest), the
//! generators `kubectl create configmap|secret generic|serviceaccount|role|clusterrole|
//! rolebinding|clusterrolebinding`, and `kubectl auth whoami|can-i`.
//!
//! A body is the magic `k8s\0` followed by a `runtime.Unknown` message (`typeMeta` = 1 with
//! `apiVersion` = 1 and `kind` = 2, `raw` = 2) whose `raw` is the object
//! (staging/src/k8s.io/apimachinery/pkg/runtime/serializer/protobuf/protobuf.go). The field
//! numbers below are those of the `generated.proto` files of staging/src/k8s.io/api
//! (core/v1, rbac/v1, authentication/v1, authorization/v1) and of apimachinery's meta/v1 `ObjectMeta`, checked
//! against what kubectl 1.32 sends (`kubectl -v=8`). Fields the stand-in does not model are
//! skipped; empty strings are left out, as JSON's `omitempty` would.

use serde_json::{Map, Value, json};

/// The four bytes every Kubernetes protobuf body starts with.
const MAGIC: &[u8] = b"k8s\0";

/// One field of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Reads a message's fields in order: (number, value). Errors on truncated or malformed
/// input.
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (number, wire_type) = (key >> 3, key & 7);
        let field = match wire_type {
            0 => Field::Varint(varint(&mut buf)?),
            1 | 5 => {
                let n = if wire_type == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or("truncated fixed-width field")?;
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "length too large")?;
                let bytes = buf.get(..len).ok_or("truncated length-delimited field")?;
                buf = &buf[len..];
                Field::Bytes(bytes)
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        out.push((number, field));
    }
    Ok(out)
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".to_owned())
}

fn text(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a string field is not UTF-8".to_owned())
}

/// Whether a body is Kubernetes protobuf.
pub(crate) fn is_protobuf(body: &[u8]) -> bool {
    body.starts_with(MAGIC)
}

/// The envelope: (apiVersion, kind, raw object).
fn unwrap(body: &[u8]) -> Result<(String, String, &[u8]), String> {
    let inner = body
        .strip_prefix(MAGIC)
        .ok_or("missing the k8s protobuf magic")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (number, field) in fields(inner)? {
        match (number, field) {
            (1, Field::Bytes(type_meta)) => {
                for (n, f) in fields(type_meta)? {
                    match (n, f) {
                        (1, Field::Bytes(b)) => api_version = text(b)?,
                        (2, Field::Bytes(b)) => kind = text(b)?,
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    Ok((api_version, kind, raw))
}

/// How a field turns into JSON.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    Message(&'static [Spec]),
    /// `map<string, string>` (repeated entries with `key` = 1, `value` = 2).
    MapStr,
    /// `map<string, bytes>`.
    MapBytes,
}

/// One field of a schema: number, JSON name, kind, repeated.
type Spec = (u64, &'static str, Kind, bool);

const OBJECT_META: &[Spec] = &[
    (1, "name", Kind::Str, false),
    (2, "generateName", Kind::Str, false),
    (3, "namespace", Kind::Str, false),
    (11, "labels", Kind::MapStr, false),
    (12, "annotations", Kind::MapStr, false),
];
const CONFIG_MAP: &[Spec] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "data", Kind::MapStr, false),
    (3, "binaryData", Kind::MapBytes, false),
    (4, "immutable", Kind::Bool, false),
];
const SECRET: &[Spec] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "data", Kind::MapBytes, false),
    (3, "type", Kind::Str, false),
    (4, "stringData", Kind::MapStr, false),
    (5, "immutable", Kind::Bool, false),
];
const LOCAL_OBJECT_REFERENCE: &[Spec] = &[(1, "name", Kind::Str, false)];
const SERVICE_ACCOUNT: &[Spec] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (
        3,
        "imagePullSecrets",
        Kind::Message(LOCAL_OBJECT_REFERENCE),
        true,
    ),
    (4, "automountServiceAccountToken", Kind::Bool, false),
];
const POLICY_RULE: &[Spec] = &[
    (1, "verbs", Kind::Str, true),
    (2, "apiGroups", Kind::Str, true),
    (3, "resources", Kind::Str, true),
    (4, "resourceNames", Kind::Str, true),
    (5, "nonResourceURLs", Kind::Str, true),
];
const ROLE: &[Spec] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "rules", Kind::Message(POLICY_RULE), true),
];
const SUBJECT: &[Spec] = &[
    (1, "kind", Kind::Str, false),
    (2, "apiGroup", Kind::Str, false),
    (3, "name", Kind::Str, false),
    (4, "namespace", Kind::Str, false),
];
const ROLE_REF: &[Spec] = &[
    (1, "apiGroup", Kind::Str, false),
    (2, "kind", Kind::Str, false),
    (3, "name", Kind::Str, false),
];
const BINDING: &[Spec] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "subjects", Kind::Message(SUBJECT), true),
    (3, "roleRef", Kind::Message(ROLE_REF), false),
];
const BOUND_OBJECT_REFERENCE: &[Spec] = &[
    (1, "kind", Kind::Str, false),
    (2, "apiVersion", Kind::Str, false),
    (3, "name", Kind::Str, false),
    (4, "uid", Kind::Str, false),
];
const TOKEN_REQUEST_SPEC: &[Spec] = &[
    (1, "audiences", Kind::Str, true),
    (
        3,
        "boundObjectRef",
        Kind::Message(BOUND_OBJECT_REFERENCE),
        false,
    ),
    (4, "expirationSeconds", Kind::Int, false),
];
const TOKEN_REQUEST: &[Spec] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "spec", Kind::Message(TOKEN_REQUEST_SPEC), false),
];

const RESOURCE_ATTRIBUTES: &[Spec] = &[
    (1, "namespace", Kind::Str, false),
    (2, "verb", Kind::Str, false),
    (3, "group", Kind::Str, false),
    (4, "version", Kind::Str, false),
    (5, "resource", Kind::Str, false),
    (6, "subresource", Kind::Str, false),
    (7, "name", Kind::Str, false),
];
const NON_RESOURCE_ATTRIBUTES: &[Spec] =
    &[(1, "path", Kind::Str, false), (2, "verb", Kind::Str, false)];
const SELF_SUBJECT_ACCESS_REVIEW_SPEC: &[Spec] = &[
    (
        1,
        "resourceAttributes",
        Kind::Message(RESOURCE_ATTRIBUTES),
        false,
    ),
    (
        2,
        "nonResourceAttributes",
        Kind::Message(NON_RESOURCE_ATTRIBUTES),
        false,
    ),
];
const SELF_SUBJECT_ACCESS_REVIEW: &[Spec] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (
        2,
        "spec",
        Kind::Message(SELF_SUBJECT_ACCESS_REVIEW_SPEC),
        false,
    ),
];
const SELF_SUBJECT_REVIEW: &[Spec] = &[(1, "metadata", Kind::Message(OBJECT_META), false)];

/// The schema of a kind the stand-in reads as protobuf.
fn schema(api_version: &str, kind: &str) -> Option<&'static [Spec]> {
    Some(match (api_version, kind) {
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => BINDING,
        ("authentication.k8s.io/v1", "TokenRequest") => TOKEN_REQUEST,
        ("authentication.k8s.io/v1", "SelfSubjectReview") => SELF_SUBJECT_REVIEW,
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => SELF_SUBJECT_ACCESS_REVIEW,
        _ => return None,
    })
}

fn map_entry(bytes: &[u8], value_kind: Kind) -> Result<(String, Value), String> {
    let (mut key, mut value) = (String::new(), String::new());
    for (n, f) in fields(bytes)? {
        match (n, f) {
            (1, Field::Bytes(b)) => key = text(b)?,
            (2, Field::Bytes(b)) => {
                value = match value_kind {
                    Kind::MapBytes => {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD.encode(b)
                    }
                    _ => text(b)?,
                };
            }
            _ => {}
        }
    }
    Ok((key, Value::String(value)))
}

/// Decodes a message by its schema.
fn message(bytes: &[u8], schema: &[Spec]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (number, field) in fields(bytes)? {
        let Some(&(_, name, kind, repeated)) = schema.iter().find(|s| s.0 == number) else {
            continue;
        };
        let value = match (kind, field) {
            (Kind::Str, Field::Bytes(b)) => {
                let t = text(b)?;
                if t.is_empty() && !repeated {
                    continue;
                }
                Value::String(t)
            }
            // int64 on the wire: two's complement in 64 bits.
            (Kind::Int, Field::Varint(v)) => json!(i64::from_ne_bytes(v.to_ne_bytes())),
            (Kind::Bool, Field::Varint(v)) => Value::Bool(v != 0),
            (Kind::Message(inner), Field::Bytes(b)) => Value::Object(message(b, inner)?),
            (Kind::MapStr | Kind::MapBytes, Field::Bytes(b)) => {
                let (k, v) = map_entry(b, kind)?;
                let entry = out.entry(name).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(map) = entry {
                    map.insert(k, v);
                }
                continue;
            }
            _ => return Err(format!("field {name} has an unexpected wire type")),
        };
        if repeated {
            let entry = out.entry(name).or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(items) = entry {
                items.push(value);
            }
        } else {
            out.insert(name.to_owned(), value);
        }
    }
    Ok(out)
}

/// A protobuf body as the JSON object the stand-in works with; an error says why not (a
/// kind it has no schema for, or malformed input).
pub(crate) fn decode(body: &[u8]) -> Result<Value, String> {
    let (api_version, kind, raw) = unwrap(body)?;
    let schema = schema(&api_version, &kind)
        .ok_or_else(|| format!("no protobuf schema for {api_version}, Kind={kind}"))?;
    let mut object = message(raw, schema)?;
    object.insert("apiVersion".into(), Value::String(api_version));
    object.insert("kind".into(), Value::String(kind));
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kubectl 1.32 sends for `kubectl create token default --duration=20m
    /// --audience=aud1 --audience=aud2 --bound-object-kind=Secret --bound-object-name=sec`
    /// (as `kubectl -v=8` prints it).
    fn kubectl_body() -> Vec<u8> {
        let hex = concat!(
            "6b3873000a280a1861757468656e7469636174696f6e2e6b38732e696f2f7631",
            "120c546f6b656e52657175657374123e0a100a0012001a0022002a0032003800",
            "420012240a04617564310a04617564321a130a06536563726574120276311a03",
            "736563220020b0091a040a0012001a002200",
        );
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn reads_kubectls_token_request() {
        let body = kubectl_body();
        assert!(is_protobuf(&body));
        let tr = decode(&body).expect("decodes");
        assert_eq!(
            tr,
            json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "metadata": {},
                "spec": {
                    "audiences": ["aud1", "aud2"],
                    "boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": "sec"},
                    "expirationSeconds": 1200,
                },
            })
        );
    }

    #[test]
    fn malformed_input_is_an_error() {
        let body = kubectl_body();
        for cut in [5, 20, 60, body.len() - 3] {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(b"{}").is_err());
        let pod = decode(b"k8s\0\x0a\x07\x0a\x02v1\x12\x01P").expect_err("no schema");
        assert_eq!(pod, "no protobuf schema for v1, Kind=P");
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn reads_kubectls_reviews() {
        // kubectl auth can-i list deployments.apps --subresource=scale
        let can_i = hex(
            "6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f763112
                         1753656c665375626a65637441636365737352657669657712 4d0a100a001200
                         1a0022002a00320038004200122f0a2d0a0764656661756c7412046c6973741a
                         046170707322002a0b6465706c6f796d656e747332057363616c653a001a0808
                         0012001a0020001a002200",
        );
        assert_eq!(
            decode(&can_i).expect("can-i"),
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                   "metadata": {},
                   "spec": {"resourceAttributes": {"namespace": "default", "verb": "list",
                            "group": "apps", "resource": "deployments", "subresource": "scale"}}})
        );
        // kubectl auth can-i get /healthz
        let url = hex(
            "6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f763112
                       1753656c665375626a656374416363657373526576696577122f0a100a001200
                       1a0022002a003200380042001211120f0a082f6865616c74687a1203676574
                       1a0808001200 1a0020001a002200",
        );
        assert_eq!(
            decode(&url).expect("can-i url")["spec"],
            json!({"nonResourceAttributes": {"path": "/healthz", "verb": "get"}})
        );
    }

    #[test]
    fn reads_kubectls_generators() {
        // kubectl create configmap cm1 --from-literal=a=b --from-literal=c=d
        let cm = hex(
            "6b3873000a0f0a0276311209436f6e6669674d617012250a130a03636d311200
                      1a0022002a00320038004200120 60a016112016212060a016312016 41a002200",
        );
        assert_eq!(
            decode(&cm).expect("configmap"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm1"},
                   "data": {"a": "b", "c": "d"}})
        );
        // kubectl create secret generic s1 --from-literal=k=v --type=Opaque
        let secret = hex(
            "6b3873000a0c0a0276311206536563726574122 40a120a027331120 01a002200
                          2a00320038004200120 60a016b120176 1a064f706171756 51a002200",
        );
        assert_eq!(
            decode(&secret).expect("secret"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1"},
                   "data": {"k": "dg=="}, "type": "Opaque"})
        );
        // kubectl create clusterrole cr1 --verb=get --non-resource-url=/healthz
        let role = hex(
            "6b3873000a2b0a1c726261632e617574686f72697a6174696f6e2e6b38732e69
                        6f2f763112 0b436c7573746572526f6c6512260a130a0363723112001a00
                        22002a00320038004200120f0a036765742a082f6865616c74687a1a002200",
        );
        assert_eq!(
            decode(&role).expect("clusterrole"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "cr1"},
                   "rules": [{"verbs": ["get"], "nonResourceURLs": ["/healthz"]}]})
        );
        // kubectl create clusterrolebinding crb1 --clusterrole=cr1 --user=u1
        let binding = hex(
            "6b3873000a320a1c726261632e617574686f72697a6174696f6e2e6b38732e69
                           6f2f76311212436c7573746572526f6c6542696e64696e67126e0a140a0463
                           72623112001a0022002a003200380042001227 0a045573657212197262616
                           32e617574686f72697a6174696f6e2e6b38732e696f1a02753122001a2d0a
                           19726261632e617574686f72697a6174696f6e2e6b38732e696f120b436c75
                           73746572526f6c651a036372311a002200",
        );
        assert_eq!(
            decode(&binding).expect("binding"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "crb1"},
                   "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "u1"}],
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cr1"}})
        );
    }
}
