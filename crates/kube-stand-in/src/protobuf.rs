//! Just enough of Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`) to
//! read what kubectl's typed clients send: `kubectl create token` (a TokenRequest), the
//! generators `kubectl create configmap|secret generic|serviceaccount|role|clusterrole|
//! rolebinding|clusterrolebinding`, and `kubectl auth whoami|can-i`; and to write what a
//! client-go informer asks for with protobuf: ConfigMaps and Secrets, one or a list, and
//! their watch events ([`watch_event`]).
//!
//! A body is the magic `k8s\0` followed by a `runtime.Unknown` message (`typeMeta` = 1 with
//! `apiVersion` = 1 and `kind` = 2, `raw` = 2) whose `raw` is the object
//! (staging/src/k8s.io/apimachinery/pkg/runtime/serializer/protobuf/protobuf.go). The field
//! numbers below are those of the `generated.proto` files of staging/src/k8s.io/api
//! (core/v1, rbac/v1, authentication/v1, authorization/v1) and of apimachinery's meta/v1 `ObjectMeta`, checked
//! against what kubectl 1.32 sends (`kubectl -v=8`). Fields the stand-in does not model are
//! skipped; empty strings are left out, as JSON's `omitempty` would.
//!
//! Writing is strict the other way: a field of a stored object that its schema lacks is an
//! error, never silently dropped ([`encode`]). Fields are written in field-number order and
//! map entries sorted by key, as gogo-protobuf's generated marshallers do; what the JSON
//! object leaves out is left out (gogo writes every non-pointer field, empty or not, but a
//! proto2 reader takes an absent field for its zero value: the object read is the same).

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
    /// An `int64` behind a pointer (`*int64`): present in JSON whenever set, zero included.
    Int,
    /// A plain `int64` with `omitempty` (`generation`): zero is left out of JSON.
    Count,
    Bool,
    /// `metav1.Time`: the message `{seconds = 1, nanos = 2}`; RFC 3339 (seconds) in JSON.
    Time,
    Message(&'static [Spec]),
    /// `map<string, string>` (repeated entries with `key` = 1, `value` = 2).
    MapStr,
    /// `map<string, bytes>`.
    MapBytes,
    /// A message whose field 1 holds the value as JSON bytes (`FieldsV1.Raw`).
    RawJson,
}

/// One field of a schema: number, JSON name, kind, repeated.
type Spec = (u64, &'static str, Kind, bool);

/// apimachinery's meta/v1 `OwnerReference`.
const OWNER_REFERENCE: &[Spec] = &[
    (1, "kind", Kind::Str, false),
    (3, "name", Kind::Str, false),
    (4, "uid", Kind::Str, false),
    (5, "apiVersion", Kind::Str, false),
    (6, "controller", Kind::Bool, false),
    (7, "blockOwnerDeletion", Kind::Bool, false),
];
/// meta/v1 `ManagedFieldsEntry`; `fieldsV1` is `FieldsV1 {bytes Raw = 1}`, the JSON.
const MANAGED_FIELDS_ENTRY: &[Spec] = &[
    (1, "manager", Kind::Str, false),
    (2, "operation", Kind::Str, false),
    (3, "apiVersion", Kind::Str, false),
    (4, "time", Kind::Time, false),
    (6, "fieldsType", Kind::Str, false),
    (7, "fieldsV1", Kind::RawJson, false),
    (8, "subresource", Kind::Str, false),
];
/// apimachinery's meta/v1 `ObjectMeta` (staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/
/// generated.proto).
const OBJECT_META: &[Spec] = &[
    (1, "name", Kind::Str, false),
    (2, "generateName", Kind::Str, false),
    (3, "namespace", Kind::Str, false),
    (4, "selfLink", Kind::Str, false),
    (5, "uid", Kind::Str, false),
    (6, "resourceVersion", Kind::Str, false),
    (7, "generation", Kind::Count, false),
    (8, "creationTimestamp", Kind::Time, false),
    (9, "deletionTimestamp", Kind::Time, false),
    (10, "deletionGracePeriodSeconds", Kind::Int, false),
    (11, "labels", Kind::MapStr, false),
    (12, "annotations", Kind::MapStr, false),
    (13, "ownerReferences", Kind::Message(OWNER_REFERENCE), true),
    (14, "finalizers", Kind::Str, true),
    (
        17,
        "managedFields",
        Kind::Message(MANAGED_FIELDS_ENTRY),
        true,
    ),
];
/// meta/v1 `ListMeta`.
const LIST_META: &[Spec] = &[
    (1, "selfLink", Kind::Str, false),
    (2, "resourceVersion", Kind::Str, false),
    (3, "continue", Kind::Str, false),
    (4, "remainingItemCount", Kind::Int, false),
];
/// meta/v1 `StatusDetails` (its `causes` are not modelled).
const STATUS_DETAILS: &[Spec] = &[
    (1, "name", Kind::Str, false),
    (2, "group", Kind::Str, false),
    (3, "kind", Kind::Str, false),
    (5, "retryAfterSeconds", Kind::Int, false),
    (6, "uid", Kind::Str, false),
];
/// meta/v1 `Status`: the object of a watch's ERROR event.
const STATUS: &[Spec] = &[
    (1, "metadata", Kind::Message(LIST_META), false),
    (2, "status", Kind::Str, false),
    (3, "message", Kind::Str, false),
    (4, "reason", Kind::Str, false),
    (5, "details", Kind::Message(STATUS_DETAILS), false),
    (6, "code", Kind::Int, false),
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
            (Kind::Count, Field::Varint(0)) => continue,
            (Kind::Count, Field::Varint(v)) => json!(i64::from_ne_bytes(v.to_ne_bytes())),
            (Kind::Bool, Field::Varint(v)) => Value::Bool(v != 0),
            // The zero time (an empty message, as kubectl sends it) is JSON's null: absent.
            (Kind::Time, Field::Bytes(b)) => match time_seconds(b)? {
                0 => continue,
                seconds => Value::String(crate::clock::format_rfc3339(seconds)),
            },
            (Kind::Message(inner), Field::Bytes(b)) => Value::Object(message(b, inner)?),
            (Kind::RawJson, Field::Bytes(b)) => {
                let raw = fields(b)?.into_iter().find_map(|(n, f)| match (n, f) {
                    (1, Field::Bytes(raw)) => Some(raw),
                    _ => None,
                });
                serde_json::from_slice(raw.unwrap_or(b"{}"))
                    .map_err(|e| format!("field {name} is not JSON: {e}"))?
            }
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

/// The seconds of a `metav1.Time` message (its nanoseconds are below JSON's precision).
fn time_seconds(bytes: &[u8]) -> Result<i64, String> {
    let mut seconds = 0;
    for (number, field) in fields(bytes)? {
        if let (1, Field::Varint(v)) = (number, field) {
            seconds = i64::from_ne_bytes(v.to_ne_bytes());
        }
    }
    Ok(seconds)
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

/// The kinds the stand-in writes as protobuf: those a client-go informer of the tests
/// lists and watches with protobuf, and `Status` (the object of a watch's ERROR event).
/// Every other kind is JSON only: a client that will not take JSON gets 406.
fn output_schema(api_version: &str, kind: &str) -> Option<&'static [Spec]> {
    Some(match (api_version, kind) {
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "Status") => STATUS,
        _ => return None,
    })
}

/// Whether the stand-in writes objects of this kind as protobuf.
pub(crate) fn writes(api_version: &str, kind: &str) -> bool {
    output_schema(api_version, kind).is_some()
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, number: u64, wire_type: u64) {
    put_varint(out, (number << 3) | wire_type);
}

/// A length-delimited field (wire type 2): strings, bytes, messages, map entries.
fn put_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    put_key(out, number, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Encodes a JSON object by its schema. Every key of `object` must have a field in the
/// schema (but those in `skip`): a field the stand-in cannot write is an error, never lost.
fn encode_message(
    object: &Map<String, Value>,
    schema: &[Spec],
    skip: &[&str],
) -> Result<Vec<u8>, String> {
    if let Some(key) = object
        .keys()
        .find(|k| !skip.contains(&k.as_str()) && !schema.iter().any(|s| s.1 == k.as_str()))
    {
        return Err(format!(
            "field {key:?} has no protobuf field the stand-in writes"
        ));
    }
    let mut specs: Vec<&Spec> = schema.iter().collect();
    specs.sort_by_key(|s| s.0);
    let mut out = Vec::new();
    for &(number, name, kind, repeated) in specs {
        match object.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) if repeated => {
                for item in items {
                    encode_field(&mut out, number, name, kind, item)?;
                }
            }
            Some(_) if repeated => return Err(format!("field {name} is not a list")),
            Some(value) => encode_field(&mut out, number, name, kind, value)?,
        }
    }
    Ok(out)
}

fn encode_field(
    out: &mut Vec<u8>,
    number: u64,
    name: &str,
    kind: Kind,
    value: &Value,
) -> Result<(), String> {
    let wrong = || format!("field {name} does not fit its protobuf type: {value}");
    match kind {
        Kind::Str => put_bytes(out, number, value.as_str().ok_or_else(wrong)?.as_bytes()),
        Kind::Int | Kind::Count => {
            let n = value.as_i64().ok_or_else(wrong)?;
            put_key(out, number, 0);
            put_varint(out, u64::from_ne_bytes(n.to_ne_bytes()));
        }
        Kind::Bool => {
            put_key(out, number, 0);
            put_varint(out, u64::from(value.as_bool().ok_or_else(wrong)?));
        }
        Kind::Time => {
            let seconds = value
                .as_str()
                .and_then(crate::clock::parse_rfc3339)
                .ok_or_else(wrong)?;
            let mut time = Vec::new();
            put_key(&mut time, 1, 0);
            put_varint(&mut time, u64::from_ne_bytes(seconds.to_ne_bytes()));
            put_key(&mut time, 2, 0);
            put_varint(&mut time, 0);
            put_bytes(out, number, &time);
        }
        Kind::Message(inner) => {
            let message = encode_message(value.as_object().ok_or_else(wrong)?, inner, &[])?;
            put_bytes(out, number, &message);
        }
        Kind::RawJson => {
            let mut message = Vec::new();
            put_bytes(&mut message, 1, value.to_string().as_bytes());
            put_bytes(out, number, &message);
        }
        Kind::MapStr | Kind::MapBytes => {
            let map = value.as_object().ok_or_else(wrong)?;
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for key in keys {
                let text = map[key].as_str().ok_or_else(wrong)?;
                let bytes = if matches!(kind, Kind::MapBytes) {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|_| wrong())?
                } else {
                    text.as_bytes().to_vec()
                };
                let mut entry = Vec::new();
                put_bytes(&mut entry, 1, key.as_bytes());
                put_bytes(&mut entry, 2, &bytes);
                put_bytes(out, number, &entry);
            }
        }
    }
    Ok(())
}

/// The envelope the protobuf serializer writes (protobuf.go, `Serializer.doEncode`): the
/// magic, then `runtime.Unknown{typeMeta = 1 {apiVersion = 1, kind = 2}, raw = 2,
/// contentEncoding = 3, contentType = 4}`, the last two empty.
fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::new();
    put_bytes(&mut type_meta, 1, api_version.as_bytes());
    put_bytes(&mut type_meta, 2, kind.as_bytes());
    let mut out = MAGIC.to_vec();
    put_bytes(&mut out, 1, &type_meta);
    put_bytes(&mut out, 2, raw);
    put_bytes(&mut out, 3, b"");
    put_bytes(&mut out, 4, b"");
    out
}

fn type_of(object: &Map<String, Value>) -> Result<(&str, &str), String> {
    let field = |name: &str| {
        object
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the object has no {name}"))
    };
    Ok((field("apiVersion")?, field("kind")?))
}

/// One object as a protobuf body (what a GET answers with).
pub(crate) fn encode(object: &Value) -> Result<Vec<u8>, String> {
    let object = object.as_object().ok_or("not an object")?;
    let (api_version, kind) = type_of(object)?;
    let schema = output_schema(api_version, kind).ok_or_else(|| {
        format!("the stand-in does not write {api_version}, Kind={kind} as protobuf")
    })?;
    // TypeMeta is the envelope's, not a field of the object's message.
    let raw = encode_message(object, schema, &["apiVersion", "kind"])?;
    Ok(envelope(api_version, kind, &raw))
}

/// A list as a protobuf body: `{metadata = 1 (ListMeta), items = 2}`, the items as bare
/// messages of `item_kind`.
pub(crate) fn encode_list(
    api_version: &str,
    list_kind: &str,
    item_kind: &str,
    resource_version: &str,
    items: &[Value],
) -> Result<Vec<u8>, String> {
    let schema = output_schema(api_version, item_kind).ok_or_else(|| {
        format!("the stand-in does not write {api_version}, Kind={item_kind} as protobuf")
    })?;
    let mut meta = Vec::new();
    put_bytes(&mut meta, 2, resource_version.as_bytes());
    let mut raw = Vec::new();
    put_bytes(&mut raw, 1, &meta);
    for item in items {
        let item = item.as_object().ok_or("a list item is not an object")?;
        put_bytes(
            &mut raw,
            2,
            &encode_message(item, schema, &["apiVersion", "kind"])?,
        );
    }
    Ok(envelope(api_version, list_kind, &raw))
}

/// One event of a protobuf watch, framed, as kube-apiserver writes it
/// (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/watch.go): the object through the
/// negotiated serializer, so with the envelope ([`encode`]); the event itself,
/// `metav1.WatchEvent{type = 1, object = 2 (runtime.RawExtension{raw = 1})}`, through the
/// protobuf *stream* serializer, which is `NewRawSerializer` (serializer/protobuf.go:
/// `StreamSerializer: raw`): no magic and no `runtime.Unknown` around the event; then
/// `LengthDelimitedFramer` (util/framer: a 4-byte big-endian length, then the event).
pub(crate) fn watch_event(event_type: &str, object: &Value) -> Result<Vec<u8>, String> {
    let mut raw_extension = Vec::new();
    put_bytes(&mut raw_extension, 1, &encode(object)?);
    let mut event = Vec::new();
    put_bytes(&mut event, 1, event_type.as_bytes());
    put_bytes(&mut event, 2, &raw_extension);
    let len = u32::try_from(event.len()).map_err(|_| "a watch event over 4 GiB")?;
    let mut framed = Vec::with_capacity(4 + event.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&event);
    Ok(framed)
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

    #[test]
    fn writes_what_it_reads() {
        let object = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "settings", "namespace": "default", "uid": "u-1",
                "resourceVersion": "1001", "generation": 3,
                "creationTimestamp": "2026-12-03T13:11:22Z",
                "labels": {"b": "2", "a": "1"}, "annotations": {"note": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "web", "uid": "u-0", "controller": true}],
                "finalizers": ["f1", "f2"],
                "managedFields": [{"manager": "kubectl-create", "operation": "Update",
                                   "apiVersion": "v1", "time": "2026-12-07T03:00:00Z",
                                   "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:data": {".": {}, "f:mode": {}}}},
                                  {"manager": "tower", "operation": "Update",
                                   "apiVersion": "v1", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:status": {}}, "subresource": "status"}],
            },
            "data": {"mode": "stand-in", "empty": ""},
            "binaryData": {"bin": "AAEC"},
            "immutable": false,
        });
        let body = encode(&object).expect("encodes");
        assert!(is_protobuf(&body));
        assert_eq!(decode(&body).expect("decodes"), object);
        // Map entries go in key order, whatever the JSON's.
        let a = body
            .windows(3)
            .position(|w| w == b"\x0a\x01a")
            .expect("label a");
        let b = body
            .windows(3)
            .position(|w| w == b"\x0a\x01b")
            .expect("label b");
        assert!(a < b);
    }

    #[test]
    fn a_field_it_cannot_write_is_an_error_not_a_loss() {
        let object = json!({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "c", "initializers": {}}});
        let err = encode(&object).expect_err("initializers are not modelled");
        assert!(err.contains("initializers"), "{err}");
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        assert!(encode(&pod).expect_err("no schema").contains("Kind=Pod"));
        assert!(!writes("v1", "Pod") && writes("v1", "Secret"));
    }

    #[test]
    fn a_watch_event_is_a_length_prefixed_raw_watch_event_around_an_enveloped_object() {
        let object = json!({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": "s"}, "data": {"k": "dg=="}, "type": "Opaque"});
        let framed = watch_event("MODIFIED", &object).expect("encodes");
        let len = u32::from_be_bytes(framed[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(len, framed.len() - 4);
        let event = fields(&framed[4..]).expect("a raw WatchEvent: no magic");
        assert_eq!(event[0], (1, Field::Bytes(b"MODIFIED")));
        let Field::Bytes(raw_extension) = event[1].1 else {
            panic!("object is a message: {event:?}");
        };
        let raw = fields(raw_extension).expect("RawExtension");
        let Field::Bytes(inner) = raw[0].1 else {
            panic!("raw is bytes: {raw:?}");
        };
        assert_eq!(decode(inner).expect("the object, enveloped"), object);
    }

    #[test]
    fn a_list_holds_bare_items() {
        let items = [
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}),
        ];
        let body = encode_list("v1", "ConfigMapList", "ConfigMap", "42", &items).expect("list");
        let (api_version, kind, raw) = unwrap(&body).expect("envelope");
        assert_eq!(
            (api_version.as_str(), kind.as_str()),
            ("v1", "ConfigMapList")
        );
        let list = fields(raw).expect("list");
        assert_eq!(list.len(), 3);
        assert_eq!(list[0], (1, Field::Bytes(b"\x12\x0242")));
        let Field::Bytes(first) = list[1].1 else {
            panic!("{list:?}")
        };
        assert_eq!(
            message(first, CONFIG_MAP).expect("item"),
            json!({"metadata": {"name": "a"}})
                .as_object()
                .cloned()
                .expect("map")
        );
    }
}
