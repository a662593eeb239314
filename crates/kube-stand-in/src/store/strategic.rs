//! Strategic merge patch (`application/strategic-merge-patch+json`) as the apiserver
//! applies it to a built-in kind: k8s.io/apimachinery `util/strategicpatch/patch.go`
//! (`StrategicMergeMapPatch` with `MergeOptions{IgnoreUnmatchedNulls: true}`), described in
//! kubernetes/community's `strategic-merge-patch.md`.
//!
//! A JSON merge patch replaces every list; a strategic one merges the lists the Go types
//! tag `patchStrategy:"merge"`: items with the same `patchMergeKey` are merged (a
//! container by `name`), others appended, and lists of scalars (`finalizers`) are unions.
//! Directives: `$patch: replace` (a map, or a list through an item of its own) and
//! `$patch: delete` (a map, or the keyed item it sits in), `$retainKeys` (fields of the map
//! not listed are cleared), `$deleteFromPrimitiveList/<list>` and `$setElementOrder/<list>`.
//!
//! Not modelled: `setElementOrder` puts the items it names first, in its order, and the
//! others after them in their own order, where `normalizeElementOrder` interleaves the
//! others by their old positions; kubectl's patches name every item of the list they set.

use serde_json::{Map, Value};

use super::Resource;
use super::patch::strip_directives;

/// How a list (or a struct) of a kind is merged, by its Go struct tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    /// No `patchStrategy`: the patch's value replaces the old one (lists), or is merged
    /// into it field by field (maps).
    Default,
    /// `patchStrategy:"merge"` with this `patchMergeKey`.
    MergeBy(&'static str),
    /// `patchStrategy:"merge"` on a list of scalars: a set.
    Union,
    /// `patchStrategy:"replace"` on a struct: taken whole.
    Replace,
}

/// The tags of the field at `path` (field names, no list indices) of a `resource`, from
/// k8s.io/api's `core/v1`, `apps/v1` and `policy/v1` `types.go`.
fn strategy(resource: Resource, path: &[String]) -> Strategy {
    let mut names = path.iter().rev().map(String::as_str);
    let (Some(last), parent) = (names.next(), names.next()) else {
        return Strategy::Default;
    };
    let pods = matches!(resource, Resource::Pods | Resource::Deployments);
    let in_container = matches!(
        parent,
        Some("containers" | "initContainers" | "ephemeralContainers")
    );
    let pod_spec = pods && parent == Some("spec");
    match (parent, last) {
        (Some("metadata"), "finalizers") => Strategy::Union,
        (Some("metadata"), "ownerReferences") => Strategy::MergeBy("uid"),
        (_, "containers" | "initContainers" | "ephemeralContainers" | "volumes")
        | (_, "imagePullSecrets" | "resourceClaims" | "schedulingGates")
            if pod_spec =>
        {
            Strategy::MergeBy("name")
        }
        (_, "hostAliases") if pod_spec => Strategy::MergeBy("ip"),
        (_, "topologySpreadConstraints") if pod_spec => Strategy::MergeBy("topologyKey"),
        (_, "env") if pods && in_container => Strategy::MergeBy("name"),
        (_, "ports") if pods && in_container => Strategy::MergeBy("containerPort"),
        (_, "volumeMounts") if pods && in_container => Strategy::MergeBy("mountPath"),
        (_, "volumeDevices") if pods && in_container => Strategy::MergeBy("devicePath"),
        (Some("status"), "conditions") => Strategy::MergeBy("type"),
        (Some("status"), "podIPs" | "hostIPs") if resource == Resource::Pods => {
            Strategy::MergeBy("ip")
        }
        (Some("status"), "addresses") if resource == Resource::Nodes => Strategy::MergeBy("type"),
        (Some("spec"), "podCIDRs") if resource == Resource::Nodes => Strategy::Union,
        (Some("spec"), "ports") if resource == Resource::Services => Strategy::MergeBy("port"),
        (None, "secrets") if resource == Resource::ServiceAccounts => Strategy::MergeBy("name"),
        (Some("spec"), "selector") if resource == Resource::PodDisruptionBudgets => {
            Strategy::Replace
        }
        _ => Strategy::Default,
    }
}

/// An error of the patch's own making, with the apiserver's status code: 400 for a
/// malformed directive, 500 for what `interpretStrategicMergePatchError` passes through
/// (a keyed item without its key).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PatchError {
    BadRequest(String),
    Internal(String),
}

/// Applies a strategic merge `patch` to `original` (a whole object of `resource`).
pub(super) fn strategic_merge(
    resource: Resource,
    original: &mut Value,
    patch: &Value,
) -> Result<(), PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::BadRequest("invalid JSON document".to_owned()));
    };
    if !original.is_object() {
        *original = Value::Object(Map::new());
    }
    let Value::Object(original) = original else {
        return Ok(());
    };
    merge_map(resource, &mut Vec::new(), original, patch)
}

fn merge_map(
    resource: Resource,
    path: &mut Vec<String>,
    original: &mut Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), PatchError> {
    if let Some(directive) = patch.get("$patch") {
        match directive.as_str() {
            Some("replace") => {
                let Value::Object(replacement) = strip_directives(&Value::Object(patch.clone()))
                else {
                    return Ok(());
                };
                *original = without_nulls(replacement);
                return Ok(());
            }
            Some("delete") => {
                original.clear();
                return Ok(());
            }
            _ => {
                return Err(PatchError::BadRequest(format!(
                    "Unknown patch type: {directive}"
                )));
            }
        }
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keys: Option<Vec<&str>> = retain
            .as_array()
            .and_then(|keys| keys.iter().map(Value::as_str).collect());
        let Some(keys) = keys else {
            return Err(PatchError::BadRequest(
                "invalid patch format of retainKeys".to_owned(),
            ));
        };
        original.retain(|key, _| keys.contains(&key.as_str()));
    }
    for (key, delete) in patch {
        let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") else {
            continue;
        };
        let Value::Array(delete) = delete else {
            return Err(PatchError::BadRequest(
                "invalid patch format of primitive list".to_owned(),
            ));
        };
        if let Some(Value::Array(items)) = original.get_mut(list) {
            items.retain(|item| !delete.contains(item));
        }
    }
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            original.remove(key);
            continue;
        }
        path.push(key.clone());
        let order = patch.get(&format!("$setElementOrder/{key}"));
        match original.get_mut(key) {
            Some(old) => merge_value(resource, path, old, value, order)?,
            None => {
                original.insert(key.clone(), without_nulls_value(strip_directives(value)));
            }
        }
        path.pop();
    }
    // An order for a list the patch does not otherwise touch (`mergePatchIntoOriginal`).
    for (key, order) in patch {
        let Some(list) = key.strip_prefix("$setElementOrder/") else {
            continue;
        };
        if patch.contains_key(list) {
            continue;
        }
        if let Some(old) = original.get_mut(list) {
            path.push(list.to_owned());
            merge_value(resource, path, old, &Value::Array(Vec::new()), Some(order))?;
            path.pop();
        }
    }
    Ok(())
}

fn merge_value(
    resource: Resource,
    path: &mut Vec<String>,
    old: &mut Value,
    value: &Value,
    order: Option<&Value>,
) -> Result<(), PatchError> {
    match (&mut *old, value, strategy(resource, path)) {
        (Value::Object(old), Value::Object(value), strategy) if strategy != Strategy::Replace => {
            merge_map(resource, path, old, value)
        }
        (Value::Array(old), Value::Array(items), Strategy::MergeBy(key)) => {
            merge_keyed(resource, path, old, items, key, order)
        }
        (Value::Array(old), Value::Array(items), Strategy::Union) => {
            for item in items {
                if !old.contains(item) {
                    old.push(item.clone());
                }
            }
            if let Some(Value::Array(order)) = order {
                reorder(old, |item| order.iter().position(|o| o == item));
            }
            Ok(())
        }
        _ => {
            *old = without_nulls_value(strip_directives(value));
            Ok(())
        }
    }
}

/// Merges a keyed list: `mergeSlice` with a merge key.
fn merge_keyed(
    resource: Resource,
    path: &mut Vec<String>,
    old: &mut Vec<Value>,
    items: &[Value],
    key: &str,
    order: Option<&Value>,
) -> Result<(), PatchError> {
    let directive = |item: &Value| {
        item.get("$patch")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if items
        .iter()
        .any(|item| directive(item).as_deref() == Some("replace"))
    {
        *old = items
            .iter()
            .filter(|item| directive(item).as_deref() != Some("replace"))
            .map(|item| without_nulls_value(strip_directives(item)))
            .collect();
        return Ok(());
    }
    for item in items {
        let Some(fields) = item.as_object() else {
            return Err(PatchError::BadRequest(format!(
                "unable to find api field in struct for the list item {item}"
            )));
        };
        let Some(wanted) = fields.get(key) else {
            return Err(PatchError::Internal(format!(
                "map: {item} does not contain declared merge key: {key}"
            )));
        };
        match directive(item).as_deref() {
            Some("delete") => old.retain(|o| o.get(key) != Some(wanted)),
            Some(other) => {
                return Err(PatchError::BadRequest(format!(
                    "Unknown patch type: {other}"
                )));
            }
            None => match old.iter_mut().find(|o| o.get(key) == Some(wanted)) {
                Some(Value::Object(existing)) => merge_map(resource, path, existing, fields)?,
                Some(existing) => *existing = without_nulls_value(strip_directives(item)),
                None => old.push(without_nulls_value(strip_directives(item))),
            },
        }
    }
    if let Some(Value::Array(order)) = order {
        reorder(old, |item| {
            order
                .iter()
                .position(|o| o.get(key).is_some() && o.get(key) == item.get(key))
        });
    }
    Ok(())
}

/// Puts the items `rank` places first, in its order; the others after them, as they were.
fn reorder(items: &mut [Value], rank: impl Fn(&Value) -> Option<usize>) {
    items.sort_by_key(|item| rank(item).unwrap_or(usize::MAX));
}

/// A value from the patch where the object had none: its nulls set nothing
/// (`IgnoreUnmatchedNulls`).
fn without_nulls_value(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(without_nulls(map)),
        other => other,
    }
}

fn without_nulls(map: Map<String, Value>) -> Map<String, Value> {
    map.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k, without_nulls_value(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn merged(resource: Resource, mut original: Value, patch: Value) -> Value {
        strategic_merge(resource, &mut original, &patch).unwrap();
        original
    }

    fn deployment(containers: Value) -> Value {
        json!({"spec": {"template": {"spec": {"containers": containers}}}})
    }

    #[test]
    fn keyed_lists_merge_by_their_key_and_other_lists_are_replaced() {
        let old = deployment(json!([
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}],
             "args": ["one", "two"]},
            {"name": "b", "image": "b:1"},
        ]));
        // kubectl apply's patch for a new image of `a`, one more env var and new args.
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "a", "image": "a:2", "args": ["three"],
                "$setElementOrder/env": [{"name": "X"}, {"name": "Y"}],
                "env": [{"name": "Y", "value": "2"}]}],
        }}}});
        assert_eq!(
            merged(Resource::Deployments, old.clone(), patch),
            deployment(json!([
                {"name": "a", "image": "a:2", "args": ["three"],
                 "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "b", "image": "b:1"},
            ]))
        );
        // A new container is appended; `$patch: delete` removes one by its key.
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "c:1"}, {"name": "a", "$patch": "delete"}]}}}});
        assert_eq!(
            merged(Resource::Deployments, old.clone(), patch),
            deployment(json!([{"name": "b", "image": "b:1"}, {"name": "c", "image": "c:1"}]))
        );
        // `$patch: replace` as an item of its own takes the list as the patch has it.
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "z", "image": "z"}, {"$patch": "replace"}]}}}});
        assert_eq!(
            merged(Resource::Deployments, old.clone(), patch),
            deployment(json!([{"name": "z", "image": "z"}]))
        );
        // `$setElementOrder` reorders.
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}]}}}});
        let got = merged(Resource::Deployments, old.clone(), patch);
        let names: Vec<&str> = got["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["b", "a"]);
        // A keyed item without its key.
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}});
        assert_eq!(
            strategic_merge(Resource::Deployments, &mut old.clone(), &patch),
            Err(PatchError::Internal(
                "map: {\"image\":\"x\"} does not contain declared merge key: name".to_owned()
            ))
        );
        // In a ConfigMap nothing is keyed: a JSON merge patch's outcome.
        let got = merged(
            Resource::ConfigMaps,
            json!({"data": {"a": "1", "b": "2"}, "extra": [1, 2]}),
            json!({"data": {"a": null, "c": "3"}, "extra": [3]}),
        );
        assert_eq!(got, json!({"data": {"b": "2", "c": "3"}, "extra": [3]}));
    }

    #[test]
    fn scalar_sets_retain_keys_and_map_directives() {
        let old = json!({"metadata": {"finalizers": ["a", "b", "c"]}, "spec": {
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
            "selector": {"matchLabels": {"app": "x"}}}});
        let patch = json!({"metadata": {"finalizers": ["d", "a"],
            "$deleteFromPrimitiveList/finalizers": ["b"]}});
        assert_eq!(
            merged(Resource::Deployments, old.clone(), patch)["metadata"]["finalizers"],
            json!(["a", "c", "d"])
        );
        // kubectl's patch from RollingUpdate to Recreate clears rollingUpdate.
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate",
            "rollingUpdate": null}}});
        assert_eq!(
            merged(Resource::Deployments, old.clone(), patch)["spec"]["strategy"],
            json!({"type": "Recreate"})
        );
        // `$patch: replace` on a map; a PodDisruptionBudget's selector is replaced whole.
        let patch = json!({"spec": {"strategy": {"$patch": "replace", "type": "Recreate"}}});
        assert_eq!(
            merged(Resource::Deployments, old.clone(), patch)["spec"]["strategy"],
            json!({"type": "Recreate"})
        );
        let patch = json!({"spec": {"selector": {"matchExpressions": []}}});
        assert_eq!(
            merged(Resource::PodDisruptionBudgets, old.clone(), patch.clone())["spec"]["selector"],
            json!({"matchExpressions": []})
        );
        assert_eq!(
            merged(Resource::Deployments, old, patch)["spec"]["selector"],
            json!({"matchLabels": {"app": "x"}, "matchExpressions": []})
        );
    }
}
