//! What the apiserver's registry does to an object of some kinds before storing it: the
//! defaults it fills in and the validation it refuses with 422, each modelled on the
//! kube-apiserver source named at the function.

use serde_json::{Map, Value, json};

use super::{Inner, RBAC_GROUP, Resource};
use crate::status::ApiError;

/// Checks `kind` and `apiVersion` of a request body (both may be left out).
pub(super) fn check_type(resource: Resource, obj: &Map<String, Value>) -> Result<(), ApiError> {
    match obj.get("kind").and_then(Value::as_str) {
        None | Some("") => {}
        Some(k) if k == resource.kind() => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind of the object ({k}) does not match the resource ({})",
                resource.plural()
            )));
        }
    }
    match obj.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => Ok(()),
        Some(v) if v == resource.api_version() => Ok(()),
        Some(v) => Err(ApiError::bad_request(format!(
            "the API version in the data ({v}) does not match the expected API version ({})",
            resource.api_version()
        ))),
    }
}

/// `{Kind}[.{group}] "{name}" is invalid: …`, the apiserver's 422 for failed validation
/// (`apierrors.NewInvalid`): one field error as is, several in brackets.
pub(super) fn invalid_object(resource: Resource, name: &str, errors: &[String]) -> ApiError {
    let kind = match resource.group() {
        "" => resource.kind().to_owned(),
        group => format!("{}.{group}", resource.kind()),
    };
    let detail = match errors {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    ApiError::invalid(format!("{kind} \"{name}\" is invalid: {detail}"))
}

/// The strings of a JSON array (missing or not an array: none).
fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A Secret as the apiserver stores it. `stringData` is write-only: each entry overwrites
/// the `data` entry of the same key, base64-encoded (Convert_v1_Secret_To_core_Secret in
/// pkg/apis/core/v1/conversion.go). `type` defaults to `Opaque`
/// (pkg/apis/core/v1/defaults.go) and may not change (ValidateSecretUpdate in
/// pkg/apis/core/validation/validation.go); the typed secrets need their keys
/// (ValidateSecret); an `immutable` one keeps its data.
pub(super) fn secret_defaults(
    name: &str,
    obj: &mut Map<String, Value>,
    old: Option<&Map<String, Value>>,
) -> Result<(), ApiError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Decoding (`decode.rs`) has refused what a Secret cannot hold: `data` and
    // `stringData` not maps of strings, `data` values not base64.
    let mut data = match obj.remove("data") {
        Some(Value::Object(data)) => data,
        _ => Map::new(),
    };
    if let Some(Value::Object(string_data)) = obj.remove("stringData") {
        for (key, value) in string_data {
            if let Value::String(text) = value {
                data.insert(key, Value::String(b64.encode(text)));
            }
        }
    }
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .unwrap_or("Opaque")
        .to_owned();
    let mut errors = Vec::new();
    if let Some(old_type) = old
        .and_then(|o| o.get("type"))
        .and_then(Value::as_str)
        .filter(|t| *t != ty)
    {
        errors.push(format!(
            "type: Invalid value: \"{ty}\": field is immutable (was \"{old_type}\")"
        ));
    }
    let required: &[&str] = match ty.as_str() {
        "kubernetes.io/tls" => &["tls.crt", "tls.key"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        "kubernetes.io/dockercfg" => &[".dockercfg"],
        _ => &[],
    };
    for key in required {
        if !data.contains_key(*key) {
            errors.push(format!("data[{key}]: Required value"));
        }
    }
    let mut size = 0;
    for (key, value) in &data {
        check_config_key("data", key, &mut errors);
        size += value
            .as_str()
            .and_then(|v| b64.decode(v).ok())
            .map_or(0, |bytes| bytes.len());
    }
    if size > MAX_DATA_SIZE {
        errors.push(too_long("data"));
    }
    if old.is_some_and(|o| o.get("immutable") == Some(&Value::Bool(true))) {
        let mut folded = obj.clone();
        folded.insert("data".into(), Value::Object(data.clone()));
        immutable_values(old, &folded, &["data"], &mut errors);
    }
    if !errors.is_empty() {
        return Err(invalid_object(Resource::Secrets, name, &errors));
    }
    obj.insert("type".into(), Value::String(ty));
    if !data.is_empty() {
        obj.insert("data".into(), Value::Object(data));
    }
    Ok(())
}

/// `ValidateConfigMapUpdate` and `ValidateSecretUpdate`: once `old` was written with
/// `immutable: true`, the flag stays and the values `bags` (`data`, …) may not change.
fn immutable_values(
    old: Option<&Map<String, Value>>,
    new: &Map<String, Value>,
    bags: &[&str],
    errors: &mut Vec<String>,
) {
    let Some(old) = old.filter(|o| o.get("immutable") == Some(&Value::Bool(true))) else {
        return;
    };
    let forbidden =
        |field: &str| format!("{field}: Forbidden: field is immutable when `immutable` is set");
    if new.get("immutable") != Some(&Value::Bool(true)) {
        errors.push(forbidden("immutable"));
    }
    // An empty map is no map (`omitempty`).
    fn values<'a>(o: &'a Map<String, Value>, bag: &str) -> Option<&'a Map<String, Value>> {
        o.get(bag)
            .and_then(Value::as_object)
            .filter(|m| !m.is_empty())
    }
    for bag in bags {
        if values(old, bag) != values(new, bag) {
            errors.push(forbidden(bag));
        }
    }
}

/// `ValidateDeploymentSpec` and `ValidateDeploymentUpdate` (apps/v1): the selector is
/// there and not empty, the pod template's labels match it
/// (`ValidatePodTemplateSpecForReplicaSet`), and it never changes. Values are shown as
/// JSON where Go prints its structs and maps.
pub(super) fn validate_deployment(
    name: &str,
    new: &Map<String, Value>,
    old: Option<&Map<String, Value>>,
) -> Result<(), ApiError> {
    fn selector(o: &Map<String, Value>) -> Option<&Value> {
        o.get("spec").and_then(|s| s.get("selector"))
    }
    let mut errors = Vec::new();
    match selector(new) {
        None | Some(Value::Null) => errors.push("spec.selector: Required value".to_owned()),
        Some(chosen) => {
            let labels = new
                .get("spec")
                .and_then(|s| s.pointer("/template/metadata/labels"))
                .and_then(Value::as_object);
            let terms = |field: &str| {
                chosen
                    .get(field)
                    .and_then(|v| v.as_object().map(Map::len).or(v.as_array().map(Vec::len)))
                    .unwrap_or(0)
            };
            if terms("matchLabels") + terms("matchExpressions") == 0 {
                errors.push(format!(
                    "spec.selector: Invalid value: {chosen}: empty selector is invalid for deployment"
                ));
            } else if !selector_matches(chosen, labels) {
                let shown = labels.map_or(Value::Null, |l| Value::Object(l.clone()));
                errors.push(format!(
                    "spec.template.metadata.labels: Invalid value: {shown}: `selector` does not match template `labels`"
                ));
            }
        }
    }
    if let Some(old) = old
        && selector(old) != selector(new)
    {
        errors.push(format!(
            "spec.selector: Invalid value: {}: field is immutable",
            selector(new).unwrap_or(&Value::Null)
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid_object(Resource::Deployments, name, &errors))
    }
}

/// Whether a `LabelSelector` (`matchLabels`, and `matchExpressions` with `In`, `NotIn`,
/// `Exists`, `DoesNotExist`) selects `labels` (`metav1.LabelSelectorAsSelector`).
fn selector_matches(selector: &Value, labels: Option<&Map<String, Value>>) -> bool {
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
    let by_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(key, value)| label(key) == value.as_str());
    let by_expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .all(|term| {
            let key = term.get("key").and_then(Value::as_str).unwrap_or("");
            let values: Vec<&str> = term
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match (term.get("operator").and_then(Value::as_str), label(key)) {
                (Some("In"), Some(v)) => values.contains(&v),
                (Some("NotIn"), v) => v.is_none_or(|v| !values.contains(&v)),
                (Some("Exists"), v) => v.is_some(),
                (Some("DoesNotExist"), v) => v.is_none(),
                _ => false,
            }
        });
    by_labels && by_expressions
}

/// `core.MaxSecretSize`: the most bytes a Secret's or a ConfigMap's values may hold.
const MAX_DATA_SIZE: usize = 1024 * 1024;

/// `field.TooLong` for [`MAX_DATA_SIZE`] (the wording of Kubernetes 1.30 and later).
fn too_long(path: &str) -> String {
    format!("{path}: Too long: may not be more than {MAX_DATA_SIZE} bytes")
}

/// `IsConfigMapKey`, for the key of a ConfigMap's or a Secret's `bag`.
fn check_config_key(bag: &str, key: &str, errors: &mut Vec<String>) {
    let valid = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        errors.push(format!(
            "{bag}[{key}]: Invalid value: \"{key}\": a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
        ));
    }
}

/// `ValidateConfigMap` (pkg/apis/core/validation/validation.go): keys are config keys, in
/// one of `data` and `binaryData` only, and the values (`binaryData` decoded) hold at most
/// 1 MiB in all; once written `immutable`, they stay as they are.
pub(super) fn validate_config_map(
    name: &str,
    obj: &Map<String, Value>,
    old: Option<&Map<String, Value>>,
) -> Result<(), ApiError> {
    use base64::Engine as _;
    let bag = |field: &str| obj.get(field).and_then(Value::as_object);
    let (data, binary) = (bag("data"), bag("binaryData"));
    let mut errors = Vec::new();
    let mut size = 0;
    for (key, value) in data.into_iter().flatten() {
        check_config_key("data", key, &mut errors);
        if binary.is_some_and(|b| b.contains_key(key)) {
            errors.push(format!(
                "data[{key}]: Invalid value: \"{key}\": duplicate of key present in binaryData"
            ));
        }
        size += value.as_str().map_or(0, str::len);
    }
    for (key, value) in binary.into_iter().flatten() {
        check_config_key("binaryData", key, &mut errors);
        if data.is_some_and(|d| d.contains_key(key)) {
            errors.push(format!(
                "binaryData[{key}]: Invalid value: \"{key}\": duplicate of key present in data"
            ));
        }
        size += value
            .as_str()
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map_or(0, |bytes| bytes.len());
    }
    if size > MAX_DATA_SIZE {
        // The error names no field: it is the whole object's.
        errors.push(too_long("[]"));
    }
    immutable_values(old, obj, &["data", "binaryData"], &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid_object(Resource::ConfigMaps, name, &errors))
    }
}

/// ValidatePolicyRule (pkg/apis/rbac/validation/validation.go): every rule names verbs, and
/// either non-resource URLs (cluster roles only) or API groups and resources.
pub(super) fn validate_role(
    resource: Resource,
    name: &str,
    obj: &Map<String, Value>,
) -> Result<(), ApiError> {
    let namespaced = resource.namespaced();
    let mut errors = Vec::new();
    let rules = match obj.get("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rules)) => rules.clone(),
        Some(_) => return Err(ApiError::bad_request("rules must be an array")),
    };
    for (i, rule) in rules.iter().enumerate() {
        let field = |f: &str| format!("rules[{i}].{f}");
        if strings(rule.get("verbs")).is_empty() {
            errors.push(format!(
                "{}: Required value: verbs must contain at least one value",
                field("verbs")
            ));
        }
        let urls = strings(rule.get("nonResourceURLs"));
        if !urls.is_empty() {
            if namespaced {
                errors.push(format!(
                    "{}: Invalid value: {urls:?}: namespaced rules cannot apply to non-resource URLs",
                    field("nonResourceURLs")
                ));
            }
            let has_resources = ["apiGroups", "resources", "resourceNames"]
                .iter()
                .any(|f| !strings(rule.get(*f)).is_empty());
            if has_resources {
                errors.push(format!(
                    "{}: Invalid value: {urls:?}: rules cannot apply to both regular resources and non-resource URLs",
                    field("nonResourceURLs")
                ));
            }
            continue;
        }
        if rule
            .get("apiGroups")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            errors.push(format!(
                "{}: Required value: resource rules must supply at least one api group",
                field("apiGroups")
            ));
        }
        if strings(rule.get("resources")).is_empty() {
            errors.push(format!(
                "{}: Required value: resource rules must supply at least one resource",
                field("resources")
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid_object(resource, name, &errors))
    }
}

/// A binding's defaults and validation: `roleRef.apiGroup` and each User or Group subject's
/// `apiGroup` default to the RBAC group (SetDefaults_Subject and the binding defaults in
/// pkg/apis/rbac/v1/defaults.go); ValidateRoleBinding / ValidateClusterRoleBinding check the
/// role reference and subjects, and the Update variants refuse a changed `roleRef`
/// (pkg/apis/rbac/validation/validation.go).
pub(super) fn binding_defaults(
    resource: Resource,
    name: &str,
    obj: &mut Map<String, Value>,
    old: Option<&Map<String, Value>>,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let role_ref = obj
        .entry("roleRef")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(role_ref) = role_ref else {
        return Err(ApiError::bad_request("roleRef must be an object"));
    };
    if role_ref
        .get("apiGroup")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        role_ref.insert("apiGroup".into(), Value::String(RBAC_GROUP.into()));
    }
    let role_ref = Value::Object(role_ref.clone());
    let api_group = role_ref["apiGroup"].as_str().unwrap_or("");
    if api_group != RBAC_GROUP {
        errors.push(format!(
            "roleRef.apiGroup: Unsupported value: \"{api_group}\": supported values: \"{RBAC_GROUP}\""
        ));
    }
    let kind = role_ref["kind"].as_str().unwrap_or("");
    let kinds: &[&str] = if resource == Resource::RoleBindings {
        &["Role", "ClusterRole"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&kind) {
        let supported: Vec<String> = kinds.iter().map(|k| format!("\"{k}\"")).collect();
        errors.push(format!(
            "roleRef.kind: Unsupported value: \"{kind}\": supported values: {}",
            supported.join(", ")
        ));
    }
    if role_ref["name"].as_str().is_none_or(str::is_empty) {
        errors.push("roleRef.name: Required value".to_owned());
    }
    if let Some(old_ref) = old.and_then(|o| o.get("roleRef"))
        && *old_ref != role_ref
    {
        errors.push(format!(
            "roleRef: Invalid value: rbac.RoleRef{{APIGroup:\"{api_group}\", Kind:\"{kind}\", Name:\"{}\"}}: cannot change roleRef",
            role_ref["name"].as_str().unwrap_or("")
        ));
    }
    if let Some(Value::Array(subjects)) = obj.get_mut("subjects") {
        for (i, subject) in subjects.iter_mut().enumerate() {
            let Some(subject) = subject.as_object_mut() else {
                errors.push(format!("subjects[{i}]: Invalid value: must be an object"));
                continue;
            };
            let kind = subject
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if subject
                .get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                errors.push(format!("subjects[{i}].name: Required value"));
            }
            match kind.as_str() {
                "User" | "Group" => {
                    let group = subject
                        .entry("apiGroup")
                        .or_insert_with(|| Value::String(RBAC_GROUP.into()));
                    if group.as_str().is_none_or(str::is_empty) {
                        *group = Value::String(RBAC_GROUP.into());
                    }
                    if group.as_str() != Some(RBAC_GROUP) {
                        errors.push(format!(
                            "subjects[{i}].apiGroup: Unsupported value: {group}: supported values: \"{RBAC_GROUP}\""
                        ));
                    }
                }
                "ServiceAccount" => {
                    if resource == Resource::ClusterRoleBindings
                        && subject
                            .get("namespace")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                    {
                        errors.push(format!("subjects[{i}].namespace: Required value"));
                    }
                }
                other => errors.push(format!(
                    "subjects[{i}].kind: Unsupported value: \"{other}\": supported values: \"ServiceAccount\", \"User\", \"Group\""
                )),
            }
        }
    }
    obj.insert("roleRef".into(), role_ref);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid_object(resource, name, &errors))
    }
}

/// The service types the apiserver accepts.
const SERVICE_TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
/// The first node port handed out (the apiserver's default range is 30000-32767).
const NODE_PORT_BASE: u32 = 30000;
/// How many node ports the default range holds.
const NODE_PORT_RANGE: u32 = 2768;

/// A Service's defaults and allocations, as the apiserver's service REST storage fills them
/// in: `type` (ClusterIP), `sessionAffinity`, port protocols and target ports, a cluster IP
/// from 10.96.0.0/16 (kept across updates; changing it is refused), and node ports for
/// NodePort and LoadBalancer services.
pub(super) fn service_defaults(
    inner: &mut Inner,
    name: &str,
    obj: &mut Map<String, Value>,
    old: Option<&Map<String, Value>>,
) -> Result<(), ApiError> {
    let invalid = |field: &str, detail: String| {
        ApiError::invalid(format!("Service \"{name}\" is invalid: {field}: {detail}"))
    };
    let old_spec = old
        .and_then(|o| o.get("spec"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let spec = match obj
        .entry("spec")
        .or_insert_with(|| Value::Object(Map::new()))
    {
        Value::Object(spec) => spec,
        _ => return Err(invalid("spec", "Invalid value: must be an object".into())),
    };
    let ty = spec
        .entry("type")
        .or_insert_with(|| Value::String("ClusterIP".into()))
        .as_str()
        .unwrap_or("")
        .to_owned();
    if !SERVICE_TYPES.contains(&ty.as_str()) {
        return Err(invalid(
            "spec.type",
            format!(
                "Unsupported value: \"{ty}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
            ),
        ));
    }
    spec.entry("sessionAffinity")
        .or_insert_with(|| Value::String("None".into()));
    if ty == "ExternalName" {
        return Ok(());
    }
    // The cluster IP is allocated once and immutable afterwards.
    let requested = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty())
        .map(str::to_owned);
    let previous = old_spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty())
        .map(str::to_owned);
    let cluster_ip = match (requested, previous) {
        (Some(new), Some(old)) if new != old => {
            return Err(invalid(
                "spec.clusterIPs[0]",
                format!("Invalid value: []string{{\"{new}\"}}: may not change once set"),
            ));
        }
        (Some(ip), _) | (None, Some(ip)) => ip,
        (None, None) => {
            inner.cluster_ips += 1;
            let n = inner.cluster_ips;
            format!("10.96.{}.{}", (n / 254) % 256, n % 254 + 1)
        }
    };
    spec.insert("clusterIP".into(), Value::String(cluster_ip.clone()));
    spec.insert("clusterIPs".into(), json!([cluster_ip]));
    spec.entry("ipFamilies").or_insert_with(|| json!(["IPv4"]));
    spec.entry("ipFamilyPolicy")
        .or_insert_with(|| Value::String("SingleStack".into()));
    spec.entry("internalTrafficPolicy")
        .or_insert_with(|| Value::String("Cluster".into()));
    let node_ports = ty == "NodePort" || ty == "LoadBalancer";
    if node_ports {
        spec.entry("externalTrafficPolicy")
            .or_insert_with(|| Value::String("Cluster".into()));
    }
    if ty == "LoadBalancer" {
        spec.entry("allocateLoadBalancerNodePorts")
            .or_insert(Value::Bool(true));
    }
    let old_ports = old_spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol")
                .or_insert_with(|| Value::String("TCP".into()));
            if let Some(number) = port.get("port").cloned() {
                port.entry("targetPort").or_insert(number);
            }
            if node_ports
                && port
                    .get("nodePort")
                    .is_none_or(|p| p.as_u64().unwrap_or(0) == 0)
            {
                let kept = old_ports
                    .iter()
                    .find(|old| old["port"] == port["port"] && old["protocol"] == port["protocol"])
                    .and_then(|old| old.get("nodePort"))
                    .filter(|p| p.as_u64().is_some_and(|p| p > 0))
                    .cloned();
                let node_port = kept.unwrap_or_else(|| {
                    let n = inner.node_ports % NODE_PORT_RANGE;
                    inner.node_ports += 1;
                    Value::from(NODE_PORT_BASE + n)
                });
                port.insert("nodePort".into(), node_port);
            }
        }
    }
    Ok(())
}

/// `ValidateObjectMeta`'s checks of what a writer chooses (k8s.io/apimachinery/pkg/api/
/// validation/objectmeta.go, pkg/apis/core/validation `ValidateNamespaceName` /
/// `ValidateServiceName`, meta/v1/validation `ValidateLabels`, and `util/validation`'s
/// `IsQualifiedName`, `IsValidLabelValue`, `IsDNS1123Label`, `IsDNS1035Label`): a
/// Namespace's name is a DNS-1123 label and a Service's a DNS-1035 label (the others'
/// names are checked as subdomains by the store); label keys are qualified names and
/// their values at most 63 characters of `[-A-Za-z0-9_.]` starting and ending
/// alphanumeric; annotation keys are qualified names, and keys and values together at most
/// 256 KiB.
pub(super) fn validate_meta(
    resource: Resource,
    name: &str,
    meta: &Map<String, Value>,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let label = |value: &str| value.len() <= 63 && dns_label(value, false);
    match resource {
        Resource::Namespaces if !label(name) => errors.push(format!(
            "metadata.name: Invalid value: {name:?}: {}",
            if name.len() > 63 {
                "must be no more than 63 characters".to_owned()
            } else {
                regex_error(
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                    "[a-z0-9]([-a-z0-9]*[a-z0-9])?",
                    &["my-name", "123-abc"],
                )
            }
        )),
        Resource::Services if !(name.len() <= 63 && dns_label(name, true)) => errors.push(format!(
            "metadata.name: Invalid value: {name:?}: {}",
            if name.len() > 63 {
                "must be no more than 63 characters".to_owned()
            } else {
                regex_error(
                    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
                    "[a-z]([-a-z0-9]*[a-z0-9])?",
                    &["my-name", "abc-123"],
                )
            }
        )),
        _ => {}
    }
    let map = |field: &str| -> Vec<(String, String)> {
        meta.get(field)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (key, value) in map("labels") {
        for msg in qualified_name(&key) {
            errors.push(format!("metadata.labels: Invalid value: {key:?}: {msg}"));
        }
        if value.len() > 63 {
            errors.push(format!(
                "metadata.labels: Invalid value: {value:?}: must be no more than 63 characters"
            ));
        }
        if !(value.is_empty() || qualified_name_part(&value)) {
            errors.push(format!(
                "metadata.labels: Invalid value: {value:?}: {}",
                regex_error(
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                    "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?",
                    &["MyValue", "my_value", "12345"],
                )
            ));
        }
    }
    let mut total = 0;
    for (key, value) in map("annotations") {
        for msg in qualified_name(&key.to_ascii_lowercase()) {
            errors.push(format!(
                "metadata.annotations: Invalid value: {key:?}: {msg}"
            ));
        }
        total += key.len() + value.len();
    }
    const ANNOTATIONS_MAX: usize = 256 * 1024;
    if total > ANNOTATIONS_MAX {
        errors.push(format!(
            "metadata.annotations: Too long: may not be more than {ANNOTATIONS_MAX} bytes"
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid_object(resource, name, &errors))
    }
}

/// `RegexError`: the message, its examples and the regex.
fn regex_error(message: &str, regex: &str, examples: &[&str]) -> String {
    let examples: Vec<String> = examples.iter().map(|e| format!("'{e}', ")).collect();
    format!(
        "{message} (e.g. {}regex used for validation is '{regex}')",
        examples.join(" or ")
    )
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` (DNS-1123 label), or with `alpha_first`
/// `[a-z]([-a-z0-9]*[a-z0-9])?` (DNS-1035 label); the length is checked apart.
fn dns_label(value: &str, alpha_first: bool) -> bool {
    let bytes = value.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    let lower_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (if alpha_first {
        first.is_ascii_lowercase()
    } else {
        lower_alnum(first)
    }) && lower_alnum(last)
        && bytes.iter().all(|b| lower_alnum(b) || *b == b'-')
}

/// `IsDNS1123Subdomain`: at most 253 characters matching
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*` (its labels' length is
/// not checked), what most objects' names must be.
pub(super) fn dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(|label| dns_label(label, false))
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, the name part of a qualified name.
fn qualified_name_part(value: &str) -> bool {
    let bytes = value.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `IsQualifiedName`: what is wrong with a label or annotation key (nothing: empty).
fn qualified_name(key: &str) -> Vec<String> {
    const NAME: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
    const FORMAT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
    let mut errors = Vec::new();
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else if !dns_subdomain(prefix) {
                errors.push(format!(
                    "prefix part {}",
                    regex_error(
                        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                        "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                        &["example.com"],
                    )
                ));
            }
            name
        }
        _ => {
            return vec![format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(NAME, FORMAT, &["MyName", "my.name", "123-abc"])
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_owned());
    }
    if !qualified_name_part(name) {
        errors.push(format!(
            "name part {}",
            regex_error(NAME, FORMAT, &["MyName", "my.name", "123-abc"])
        ));
    }
    errors
}

#[cfg(test)]
mod meta_tests {
    use super::*;

    fn meta(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn names_labels_and_annotations_are_checked_as_the_apiserver_checks_them() {
        let ok = meta(
            json!({"labels": {"app.kubernetes.io/name": "tower", "empty": "",
                                        "tower.kubesphere.io/cluster": "eu.prod-1_a"},
                             "annotations": {"Example.com/Note": "anything at all: 😀"}}),
        );
        assert!(validate_meta(Resource::Services, "mc-member-1", &ok).is_ok());
        let long = "a".repeat(64);
        let err = validate_meta(
            Resource::Services,
            "mc-x",
            &meta(json!({"labels": {"tower.kubesphere.io/cluster": long}})),
        )
        .expect_err("a label value of 64 characters");
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            format!(
                "Service \"mc-x\" is invalid: metadata.labels: Invalid value: \"{long}\": must be no more than 63 characters"
            )
        );
        for (key, value) in [
            ("a/b/c", "v"),
            ("-a", "v"),
            ("Example.com/a", "v"),
            ("a", "-v"),
            ("a", "v w"),
        ] {
            let labels = meta(json!({"labels": {key: value}}));
            assert!(
                validate_meta(Resource::ConfigMaps, "c", &labels).is_err(),
                "{key}={value}"
            );
        }
        let big = meta(json!({"annotations": {"a": "x".repeat(256 * 1024)}}));
        let err = validate_meta(Resource::ConfigMaps, "c", &big).expect_err("too large");
        assert!(
            err.message.contains("may not be more than 262144 bytes"),
            "{}",
            err.message
        );
        // Names: a Service's is a DNS-1035 label, a Namespace's a DNS-1123 label.
        for (resource, name) in [
            (Resource::Services, "1abc"),
            (Resource::Services, "a.b"),
            (Resource::Services, &"s".repeat(64)),
            (Resource::Namespaces, "a.b"),
        ] {
            assert!(
                validate_meta(resource, name, &Map::new()).is_err(),
                "{name}"
            );
        }
        assert!(validate_meta(Resource::Namespaces, "1abc", &Map::new()).is_ok());
        for bad in ["a..b", "a.-b", "-a", "a.", "A", &"a".repeat(254)] {
            assert!(!dns_subdomain(bad), "{bad}");
        }
        assert!(
            dns_subdomain(&format!("{}.b", "a".repeat(100))),
            "labels' length unchecked"
        );
        assert!(validate_meta(Resource::ConfigMaps, "a.b", &Map::new()).is_ok());
    }
}
