//! Field management: which writer set which field of an object (`metadata.managedFields`),
//! and what server-side apply makes of it: conflicts, forcing, and pruning what an applier
//! stopped applying.
//!
//! Modelled on kube-apiserver's field manager (k8s.io/apimachinery/pkg/util/managedfields/
//! internal: `fieldmanager.go` `decodeLiveOrNew`, `managedfieldsupdater.go`,
//! `stripmeta.go`, `lastappliedmanager.go`, `lastappliedupdater.go`, `conflict.go`,
//! `managedfields.go`) over sigs.k8s.io/structured-merge-diff (`merge/update.go`'s `update`,
//! `Update`, `Apply` and `prune`; `typed/compare.go`, `typed/tofieldset.go`,
//! `typed/merge.go`):
//!
//! - every write records, for its manager (the `fieldManager` parameter, else the
//!   User-Agent up to its first `/`), its operation and subresource, the fields it owns, as
//!   `FieldsV1`;
//! - an update owns what it added or changed, which no other manager owns any more; a field
//!   it removed nobody owns;
//! - an apply owns exactly the fields of its configuration. A field it would add or change
//!   that another manager owns is a conflict, refused with 409 and a
//!   `FieldManagerConflict` cause per field, unless `force=true`, which takes the field. A
//!   field it applied before and leaves out now is removed from the object unless another
//!   manager owns it;
//! - kubectl's own manager (`kubectl`) may take the fields its client-side apply
//!   annotation still agrees with, and keeps that annotation up to date.
//!
//! The schema is a table ([`shape`]), not the OpenAPI models: the maps, atomic fields and
//! keyed lists of the types the stand-in serves; every other object is a struct and every
//! other list atomic, which is what a custom resource without list markers (KubeSphere's
//! Cluster) has. Update managers are capped at ten, the oldest merged into `ancient-changes`
//! (`capmanagers.go`). Not modelled: field sets across API versions, duplicate items of a keyed list, key fields' defaults other than a
//! port's `protocol`. Fields the stand-in defaults or allocates itself (a Service's cluster
//! IP, a pod's status) are owned by nobody, where a real apiserver's defaulting at decode
//! gives the writer the defaults.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::Resource;
use crate::clock;
use crate::status::{ApiError, StatusCause};

mod typed;

use typed::{
    Comparison, field_set, merge, parse_fields, path_string, remove, to_fields, zero_object,
};

/// A field as the keys of `FieldsV1`: `f:<name>`, `k:<key fields as JSON>`,
/// `v:<value as JSON>`.
type Path = Vec<String>;
/// A set of fields.
type Set = BTreeSet<Path>;

/// kubectl's client-side apply annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// The manager kubectl's server-side apply writes as (`lastappliedmanager.go`).
const KUBECTL: &str = "kubectl";
/// `validation.FieldManagerMaxLength`.
const MANAGER_MAX_LEN: usize = 128;
/// `DefaultMaxUpdateManagers`: the most Update entries an object keeps.
const MAX_UPDATE_MANAGERS: usize = 10;
/// `capManagersManager.oldUpdatesManagerName`: where the oldest Update entries go.
const ANCIENT_CHANGES: &str = "ancient-changes";

/// Who makes a write: the apiserver's `managerOrUserAgent`.
pub(crate) fn manager_name(field_manager: Option<&str>, user_agent: Option<&str>) -> String {
    if let Some(manager) = field_manager.filter(|m| !m.is_empty()) {
        return manager.to_owned();
    }
    // `prefixFromUserAgent`: up to the first `/`, printable characters only, at most 128
    // bytes.
    let mut name = String::new();
    for c in user_agent
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .chars()
    {
        if c.is_control() {
            continue;
        }
        if name.len() + c.len_utf8() > MANAGER_MAX_LEN {
            break;
        }
        name.push(c);
    }
    name
}

/// Which part of an object a write may change, and so which fields it can own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// A resource without a status subresource.
    Whole,
    /// The object of a resource with a status subresource: `.status` is not its to own
    /// (the strategies' `GetResetFields`).
    WithoutStatus,
    /// The `status` subresource.
    StatusOnly,
}

impl Scope {
    fn subresource(self) -> &'static str {
        match self {
            Scope::StatusOnly => "status",
            Scope::Whole | Scope::WithoutStatus => "",
        }
    }

    /// Whether a field is one the write can own.
    fn covers(self, path: &[String]) -> bool {
        let status = path.first().is_some_and(|pe| pe == "f:status");
        match self {
            Scope::Whole => true,
            Scope::WithoutStatus => !status,
            Scope::StatusOnly => status,
        }
    }

    pub(super) fn filter(self, set: Set) -> Set {
        set.into_iter().filter(|p| self.covers(p)).collect()
    }
}

/// What the writer of a request is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Writer<'a> {
    /// The manager's name.
    pub(crate) manager: &'a str,
    /// Which part of the object the request addresses.
    pub(crate) scope: Scope,
}

/// The operation of a managedFields entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// One entry of `metadata.managedFields`.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    manager: String,
    operation: Operation,
    api_version: String,
    subresource: String,
    time: Option<String>,
    fields: Set,
}

impl Entry {
    /// `BuildManagerIdentifier`: an applier is the same manager whatever its apiVersion.
    fn is(&self, manager: &str, operation: Operation, api_version: &str, sub: &str) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource == sub
            && (operation == Operation::Apply || self.api_version == api_version)
    }

    /// `printManager`, for conflict messages (the identifier has no time).
    fn describe(&self) -> String {
        let mut name = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            name = format!("{name} with subresource {:?}", self.subresource);
        }
        match self.operation {
            Operation::Update => format!("{name} using {}", self.api_version),
            Operation::Apply => name,
        }
    }
}

/// The managedFields of an object.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Managed(Vec<Entry>);

impl Managed {
    /// `decodeLiveOrNew`: the managedFields a write brings, unless it brings none or
    /// invalid ones (then the stored object's), or writes a subresource (which cannot set
    /// them); `[]` or `[{}]` clears them.
    pub(crate) fn of_write(live: Option<&Value>, new: &Value, scope: Scope) -> Managed {
        let from_live = || {
            live.and_then(|v| v.pointer("/metadata/managedFields"))
                .and_then(|m| Managed::decode(m).ok())
                .unwrap_or_default()
        };
        if scope == Scope::StatusOnly {
            return from_live();
        }
        match new.pointer("/metadata/managedFields") {
            Some(Value::Array(items))
                if items.is_empty()
                    || (items.len() == 1 && items[0].as_object().is_some_and(Map::is_empty)) =>
            {
                Managed::default()
            }
            Some(given) => match Managed::decode(given) {
                Ok(managed) if !managed.0.is_empty() => managed,
                _ => from_live(),
            },
            None => from_live(),
        }
    }

    /// The managedFields of a stored object (or none).
    pub(crate) fn of(object: Option<&Value>) -> Managed {
        object
            .and_then(|v| v.pointer("/metadata/managedFields"))
            .and_then(|m| Managed::decode(m).ok())
            .unwrap_or_default()
    }

    /// `DecodeManagedFields`.
    fn decode(value: &Value) -> Result<Managed, String> {
        let Value::Array(items) = value else {
            return Err("managedFields must be a list".into());
        };
        let mut entries = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let text = |name: &str| item.get(name).and_then(Value::as_str).unwrap_or("");
            let operation = match text("operation") {
                "Apply" => Operation::Apply,
                "Update" => Operation::Update,
                _ => return Err("operation must be `Apply` or `Update`".into()),
            };
            if text("apiVersion").is_empty() {
                return Err("apiVersion must not be empty".into());
            }
            match text("fieldsType") {
                "FieldsV1" => {}
                "" => return Err(format!("missing fieldsType in managed fields entry {i}")),
                other => {
                    return Err(format!(
                        "invalid fieldsType {other:?} in managed fields entry {i}"
                    ));
                }
            }
            let mut fields = Set::new();
            if let Some(v1) = item.get("fieldsV1") {
                parse_fields(v1, &mut Vec::new(), &mut fields)?;
            }
            entries.push(Entry {
                manager: text("manager").to_owned(),
                operation,
                api_version: text("apiVersion").to_owned(),
                subresource: text("subresource").to_owned(),
                time: item.get("time").and_then(Value::as_str).map(str::to_owned),
                fields,
            });
        }
        Ok(Managed(entries))
    }

    /// `encodeManagedFields`, sorted as `sortEncodedManagedFields`; `None` when there is
    /// no entry (the field is left out).
    pub(crate) fn encode(&self) -> Option<Value> {
        if self.0.is_empty() {
            return None;
        }
        let mut entries: Vec<&Entry> = self.0.iter().collect();
        entries.sort_by(|p, q| {
            let seconds = |e: &Entry| {
                e.time
                    .as_deref()
                    .and_then(clock::parse_rfc3339)
                    .unwrap_or(0)
            };
            (
                p.operation,
                seconds(p),
                &p.manager,
                &p.api_version,
                &p.subresource,
            )
                .cmp(&(
                    q.operation,
                    seconds(q),
                    &q.manager,
                    &q.api_version,
                    &q.subresource,
                ))
        });
        let items = entries
            .into_iter()
            .map(|e| {
                let mut item = Map::new();
                item.insert("manager".into(), json!(e.manager));
                item.insert("operation".into(), json!(e.operation.as_str()));
                item.insert("apiVersion".into(), json!(e.api_version));
                if let Some(time) = &e.time {
                    item.insert("time".into(), json!(time));
                }
                item.insert("fieldsType".into(), json!("FieldsV1"));
                item.insert("fieldsV1".into(), to_fields(&e.fields));
                if !e.subresource.is_empty() {
                    item.insert("subresource".into(), json!(e.subresource));
                }
                Value::Object(item)
            })
            .collect();
        Some(Value::Array(items))
    }

    fn position(
        &self,
        manager: &str,
        op: Operation,
        api_version: &str,
        sub: &str,
    ) -> Option<usize> {
        self.0
            .iter()
            .position(|e| e.is(manager, op, api_version, sub))
    }

    /// Drops what `update` took or saw removed from every manager but `except`; `Err` with
    /// the conflicts when another manager owns a field the write changes and it may not
    /// take it.
    fn take(
        &mut self,
        comparison: &Comparison,
        except: Option<usize>,
        force: bool,
    ) -> Result<(), Vec<(usize, Path)>> {
        let mut conflicts = Vec::new();
        for (i, entry) in self.0.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            for path in &entry.fields {
                if comparison.modified.contains(path) || comparison.added.contains(path) {
                    conflicts.push((i, path.clone()));
                }
            }
        }
        if !force && !conflicts.is_empty() {
            return Err(conflicts);
        }
        for (i, path) in &conflicts {
            self.0[*i].fields.remove(path);
        }
        for (i, entry) in self.0.iter_mut().enumerate() {
            if Some(i) != except {
                entry.fields.retain(|p| !comparison.removed.contains(p));
            }
        }
        Ok(())
    }

    /// Every entry with no field is gone.
    fn drop_empty(&mut self) {
        self.0.retain(|e| !e.fields.is_empty());
    }

    /// `capManagersManager.capUpdateManagers`: past [`MAX_UPDATE_MANAGERS`] Update
    /// entries, the oldest (by time in seconds, then by name) are merged, per apiVersion,
    /// into an `ancient-changes` entry, which takes the newest merged entry's time. The
    /// first of a version met becomes that entry unless one exists; it is not itself
    /// counted as merged.
    fn cap_update_managers(&mut self) {
        let mut updaters: Vec<usize> = (0..self.0.len())
            .filter(|&i| self.0[i].operation == Operation::Update)
            .collect();
        if updaters.len() <= MAX_UPDATE_MANAGERS {
            return;
        }
        // RFC 3339 times in UTC order as text; none is the epoch.
        updaters.sort_by(|&i, &j| {
            let (p, q) = (&self.0[i], &self.0[j]);
            let seconds = |e: &Entry| e.time.as_deref().unwrap_or("").get(..19).map(str::to_owned);
            seconds(p)
                .cmp(&seconds(q))
                .then_with(|| p.manager.cmp(&q.manager))
                .then_with(|| p.subresource.cmp(&q.subresource))
        });
        let bucket_of = |entries: &[Entry], version: &str| {
            entries
                .iter()
                .position(|e| e.is(ANCIENT_CHANGES, Operation::Update, version, ""))
        };
        let mut first_of_version: BTreeMap<String, usize> = BTreeMap::new();
        let mut merged = Vec::new();
        let mut length = updaters.len();
        for &i in &updaters {
            if length <= MAX_UPDATE_MANAGERS {
                break;
            }
            let version = self.0[i].api_version.clone();
            let Some(&first) = first_of_version.get(&version) else {
                first_of_version.insert(version, i);
                continue;
            };
            let bucket = match bucket_of(&self.0, &version) {
                Some(bucket) => bucket,
                None => {
                    let entry = &mut self.0[first];
                    entry.manager = ANCIENT_CHANGES.to_owned();
                    entry.subresource = String::new();
                    first
                }
            };
            if bucket == i {
                continue;
            }
            let (fields, time) = (self.0[i].fields.clone(), self.0[i].time.clone());
            self.0[bucket].fields.extend(fields);
            self.0[bucket].time = time;
            merged.push(i);
            length -= 1;
        }
        let mut i = 0;
        self.0.retain(|_| {
            i += 1;
            !merged.contains(&(i - 1))
        });
    }

    /// The union of every manager's fields.
    fn owned(&self) -> Set {
        self.0
            .iter()
            .flat_map(|e| e.fields.iter().cloned())
            .collect()
    }
}

/// `stripmeta.go`: what no manager ever owns.
fn strip(mut set: Set) -> Set {
    let f = |name: &str| format!("f:{name}");
    for top in ["apiVersion", "kind", "metadata"] {
        set.remove(&vec![f(top)]);
    }
    for meta in [
        "name",
        "namespace",
        "creationTimestamp",
        "selfLink",
        "uid",
        "clusterName",
        "generation",
        "managedFields",
        "resourceVersion",
    ] {
        set.remove(&vec![f("metadata"), f(meta)]);
    }
    set
}

/// An update (create, replace, patch) by `writer` from `live` (`None`: a create) to
/// `new`: the managedFields `new` is to be stored with (`managedfieldsupdater.go` over
/// `Updater.Update`). `managed` is what [`Managed::of_write`] found.
pub(crate) fn update(
    resource: Resource,
    live: Option<&Value>,
    new: &Value,
    mut managed: Managed,
    writer: Writer<'_>,
) -> Managed {
    let zero;
    let live = match live {
        Some(live) => live,
        None => {
            zero = zero_object(resource);
            &zero
        }
    };
    let comparison = Comparison::of(resource, live, new).within(writer.scope);
    let api_version = resource.api_version();
    let sub = writer.scope.subresource();
    // What this operation took: every other manager loses it (an update always forces).
    let _ = managed.take(&comparison, None, true);
    let took = strip(
        comparison
            .modified
            .iter()
            .chain(&comparison.added)
            .cloned()
            .collect(),
    );
    if !took.is_empty() {
        let now = Some(clock::now_rfc3339());
        match managed.position(writer.manager, Operation::Update, api_version, sub) {
            Some(i) => {
                let entry = &mut managed.0[i];
                entry.fields.extend(took);
                entry.time = now;
            }
            None => managed.0.push(Entry {
                manager: writer.manager.to_owned(),
                operation: Operation::Update,
                api_version: api_version.to_owned(),
                subresource: sub.to_owned(),
                time: now,
                fields: took,
            }),
        }
    }
    managed.drop_empty();
    managed.cap_update_managers();
    managed
}

/// A server-side apply of `config` by `writer` to `live` (`None`: the apply creates the
/// object): the object and its managedFields, or the 409 of its conflicts.
pub(crate) fn apply(
    resource: Resource,
    live: Option<&Value>,
    config: &Value,
    writer: Writer<'_>,
    force: bool,
) -> Result<(Value, Managed), ApiError> {
    let applied = apply_once(resource, live, config, writer, force);
    let result = match applied {
        Err(conflicts) if writer.manager == KUBECTL => {
            // `lastappliedmanager.go`: kubectl may take what its client-side apply
            // annotation still agrees with.
            let allowed = live
                .and_then(|live| allowed_by_last_applied(resource, live))
                .unwrap_or_default();
            let mut conflicts = conflicts;
            conflicts.paths.retain(|(_, p)| !allowed.contains(p));
            if conflicts.paths.is_empty() {
                apply_once(resource, live, config, writer, true)
            } else {
                Err(conflicts)
            }
        }
        other => other,
    };
    let (mut object, managed) = result.map_err(|c| c.into_error())?;
    // `lastappliedupdater.go`: kubectl's apply keeps its client-side apply annotation up to
    // date where there is one.
    let had_last_applied = live
        .and_then(|l| l.pointer("/metadata/annotations"))
        .and_then(|a| a.get(LAST_APPLIED))
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if writer.manager == KUBECTL && had_last_applied {
        let mut last = config.clone();
        if let Some(annotations) = last
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove(LAST_APPLIED);
        }
        if let Some(annotations) = object
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.insert(LAST_APPLIED.into(), Value::String(format!("{last}\n")));
        }
    }
    Ok((object, managed))
}

/// Conflicts of an apply: the managers and the fields.
struct Conflicts {
    managed: Managed,
    paths: Vec<(usize, Path)>,
}

impl Conflicts {
    /// `NewConflictError`.
    fn into_error(self) -> ApiError {
        let described: Vec<(String, String)> = self
            .paths
            .iter()
            .map(|(i, path)| (self.managed.0[*i].describe(), path_string(path)))
            .collect();
        let message = if let [(manager, path)] = described.as_slice() {
            format!("Apply failed with 1 conflict: conflict with {manager}: {path}")
        } else {
            let mut by_manager: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (manager, path) in &described {
                by_manager.entry(manager).or_default().push(path);
            }
            let lines: Vec<String> = by_manager
                .iter()
                .flat_map(|(manager, paths)| {
                    std::iter::once(format!("conflicts with {manager}:"))
                        .chain(paths.iter().map(|p| format!("- {p}")))
                })
                .collect();
            format!(
                "Apply failed with {} conflicts: {}",
                described.len(),
                lines.join("\n")
            )
        };
        let causes = described
            .into_iter()
            .map(|(manager, field)| StatusCause {
                reason: "FieldManagerConflict",
                message: format!("conflict with {manager}"),
                field,
            })
            .collect();
        ApiError::apply_conflict(message, causes)
    }
}

/// `Updater.Apply`, once.
fn apply_once(
    resource: Resource,
    live: Option<&Value>,
    config: &Value,
    writer: Writer<'_>,
    force: bool,
) -> Result<(Value, Managed), Conflicts> {
    let mut managed = Managed::of(live);
    let empty = Value::Object(Map::new());
    let base = live.unwrap_or(&empty);
    let merged = merge(resource, base, config, &mut Vec::new());
    let set = strip(writer.scope.filter(field_set(resource, config)));
    let sub = writer.scope.subresource();
    let api_version = resource.api_version();
    let me = match managed.position(writer.manager, Operation::Apply, api_version, sub) {
        Some(i) => i,
        None => {
            managed.0.push(Entry {
                manager: writer.manager.to_owned(),
                operation: Operation::Apply,
                api_version: api_version.to_owned(),
                subresource: sub.to_owned(),
                time: None,
                fields: Set::new(),
            });
            managed.0.len() - 1
        }
    };
    let last = std::mem::replace(&mut managed.0[me].fields, set);
    managed.0[me].api_version = api_version.to_owned();
    // `prune`: what this manager applied before and no longer does goes, unless someone
    // (this apply included) owns it or something beneath it.
    let owned = managed.owned();
    let mut object = merged;
    for path in last.difference(&owned) {
        let beneath = owned
            .range(path.clone()..)
            .next()
            .is_some_and(|o| o.starts_with(path));
        if !beneath {
            remove(resource, &mut object, path, &mut Vec::new());
        }
    }
    let comparison = Comparison::of(resource, base, &object).within(writer.scope);
    if let Err(paths) = managed.take(&comparison, Some(me), force) {
        return Err(Conflicts { managed, paths });
    }
    // `managedfieldsupdater.go`: the time moves when the apply changed the object.
    if !comparison.is_empty() {
        managed.0[me].time = Some(clock::now_rfc3339());
    }
    managed.drop_empty();
    Ok((object, managed))
}

/// `allowedConflictsFromLastApplied`: the fields of the client-side apply annotation whose
/// values the object still has.
fn allowed_by_last_applied(resource: Resource, live: &Value) -> Option<Set> {
    let text = live
        .pointer("/metadata/annotations")?
        .get(LAST_APPLIED)?
        .as_str()?;
    let last: Value = serde_json::from_str(text).ok()?;
    if last.get("apiVersion").and_then(Value::as_str) != Some(resource.api_version()) {
        return None;
    }
    let comparison = Comparison::of(resource, &last, live);
    Some(
        field_set(resource, &last)
            .into_iter()
            .filter(|p| {
                !comparison.modified.contains(p)
                    && !comparison.added.contains(p)
                    && !comparison.removed.contains(p)
            })
            .collect(),
    )
}

/// What an apply of `config` would make of `live`, conflicts aside (for checks that need
/// the result before the write, such as RBAC's escalation check).
pub(crate) fn preview_apply(resource: Resource, live: Option<&Value>, config: &Value) -> Value {
    match live {
        Some(live) => merge(resource, live, config, &mut Vec::new()),
        None => config.clone(),
    }
}

/// The field at `steps` of an apply configuration, as structured-merge-diff's errors name
/// it (`.spec.template.spec.containers[name="a"].foo`).
pub(crate) fn path_string_of(
    resource: Resource,
    config: &Value,
    steps: &[super::decode::Step],
) -> String {
    typed::path_of_steps(resource, config, steps)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;

    use super::*;
    use crate::store::{By, PatchKind, Store, Target};

    static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    fn by(manager: &str) -> By<'_> {
        By {
            manager,
            dry_run: false,
            strict: false,
            warnings: &WARNINGS,
        }
    }

    fn value(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    /// The object's managedFields as (manager, operation, subresource, fieldsV1).
    fn entries(object: &Value) -> Vec<(String, String, String, Value)> {
        object["metadata"]["managedFields"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|e| {
                        let text = |k: &str| e[k].as_str().unwrap_or("").to_owned();
                        (
                            text("manager"),
                            text("operation"),
                            text("subresource"),
                            e["fieldsV1"].clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn entry(manager: &str, operation: &str, fields: Value) -> (String, String, String, Value) {
        (manager.into(), operation.into(), String::new(), fields)
    }

    fn config_map(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "cm", "namespace": "default"}, "data": data})
    }

    #[test]
    fn managers_come_from_the_parameter_or_the_user_agent() {
        assert_eq!(
            manager_name(Some("tower-server"), Some("kubectl/v1.32")),
            "tower-server"
        );
        assert_eq!(
            manager_name(None, Some("kubectl/v1.32.0 (linux/amd64)")),
            "kubectl"
        );
        assert_eq!(manager_name(Some(""), Some("kube-rs")), "kube-rs");
        assert_eq!(manager_name(None, None), "");
        assert_eq!(
            manager_name(None, Some(&"x".repeat(200))).len(),
            MANAGER_MAX_LEN
        );
    }

    #[test]
    fn past_ten_update_managers_the_oldest_are_merged_into_ancient_changes() {
        let store = Store::seeded();
        let r = Resource::ConfigMaps;
        store
            .create_by(r, "default", config_map(json!({})), by("creator"))
            .unwrap();
        let mut last = Value::Null;
        for i in 0..11 {
            let patch = json!({"data": {format!("k{i:02}"): "v"}});
            let target = ("cm", Target::Object);
            let written = store
                .patch_by(
                    r,
                    "default",
                    target,
                    (PatchKind::Merge, &patch),
                    by(&format!("m{i:02}")),
                )
                .unwrap();
            last = value(&written);
        }
        // Twelve updaters (the creator keeps `data` itself) in the same second or so: by
        // time, then by name, `creator` is the oldest and becomes the bucket, and m00 and
        // m01 are merged into it.
        let got: Vec<(String, Value)> = entries(&last)
            .into_iter()
            .map(|(manager, _, _, fields)| (manager, fields))
            .collect();
        assert_eq!(got.len(), 10, "{got:?}");
        let ancient: Vec<&(String, Value)> =
            got.iter().filter(|(m, _)| m == "ancient-changes").collect();
        assert_eq!(
            ancient,
            [&(
                "ancient-changes".to_owned(),
                json!({"f:data": {".": {}, "f:k00": {}, "f:k01": {}}})
            )]
        );
        let gone = ["creator", "m00", "m01"];
        assert!(
            !got.iter().any(|(m, _)| gone.contains(&m.as_str())),
            "{got:?}"
        );
        assert!(got.iter().any(|(m, _)| m == "m10"), "{got:?}");
    }

    #[test]
    fn updates_take_what_they_change_and_applies_conflict_over_it() {
        let store = Store::seeded();
        let r = Resource::ConfigMaps;
        let apply = |config: &Value, manager: &str, force: bool| {
            let target = ("cm", Target::Object);
            store.apply(r, "default", target, config, (by(manager), force))
        };
        let created = store
            .create_by(
                r,
                "default",
                config_map(json!({"key": "one"})),
                by("kubectl-client-side-apply"),
            )
            .unwrap();
        assert_eq!(
            entries(&value(&created)),
            [entry(
                "kubectl-client-side-apply",
                "Update",
                json!({"f:data": {".": {}, "f:key": {}}})
            )]
        );
        let patched = store
            .patch_by(
                r,
                "default",
                ("cm", Target::Object),
                (PatchKind::Merge, &json!({"data": {"key": "three"}})),
                by("kubectl-patch"),
            )
            .unwrap();
        // The patch took `data.key`; the creator keeps `data` itself.
        assert_eq!(
            entries(&value(&patched)),
            [
                entry("kubectl-client-side-apply", "Update", json!({"f:data": {}})),
                entry("kubectl-patch", "Update", json!({"f:data": {"f:key": {}}})),
            ]
        );

        // An apply that would change the patch's field is refused, naming it.
        let four = config_map(json!({"key": "four"}));
        let err = apply(&four, "kubectl", false).unwrap_err();
        assert_eq!(err.code, 409);
        assert_eq!(
            err.message,
            "Apply failed with 1 conflict: conflict with \"kubectl-patch\" using v1: .data.key"
        );
        let status = err.to_value();
        assert_eq!(
            status["details"]["causes"],
            json!([{"reason": "FieldManagerConflict", "message": "conflict with \"kubectl-patch\" using v1", "field": ".data.key"}])
        );
        assert_eq!(
            value(&store.get(r, "default", "cm").unwrap())["data"]["key"],
            "three"
        );

        // Forced, it takes the field.
        let (applied, created) = apply(&four, "kubectl", true).unwrap();
        assert!(!created);
        let applied = value(&applied);
        assert_eq!(applied["data"]["key"], "four");
        assert_eq!(
            entries(&applied),
            [
                entry("kubectl", "Apply", json!({"f:data": {"f:key": {}}})),
                entry("kubectl-client-side-apply", "Update", json!({"f:data": {}})),
            ]
        );

        // Another applier setting the same value shares the field: no conflict.
        let (shared, _) = apply(&four, "other", false).unwrap();
        assert_eq!(entries(&value(&shared)).len(), 3);

        // What an applier stops applying goes, unless someone else owns it.
        let only_new = config_map(json!({"new": "x"}));
        let (pruned, _) = apply(&only_new, "kubectl", false).unwrap();
        assert_eq!(
            value(&pruned)["data"],
            json!({"key": "four", "new": "x"}),
            "`other` owns key"
        );
        let (pruned, _) = apply(&only_new, "other", false).unwrap();
        assert_eq!(value(&pruned)["data"], json!({"new": "x"}));
    }

    #[test]
    fn apply_configurations_are_checked() {
        let store = Store::seeded();
        let r = Resource::ConfigMaps;
        let target = ("settings", Target::Object);
        let mut config = config_map(json!({}));
        config["metadata"]["name"] = json!("settings");
        config["apiVersion"] = json!("v2");
        let err = store
            .apply(r, "default", target, &config, (by("m"), false))
            .unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .contains("Incorrect version specified in apply patch"),
            "{err}"
        );
        config["apiVersion"] = json!("v1");
        config["metadata"]["managedFields"] = json!([]);
        let err = store
            .apply(r, "default", target, &config, (by("m"), false))
            .unwrap_err();
        assert_eq!(err.message, "metadata.managedFields must be nil");
    }

    #[test]
    fn keyed_list_items_have_owners_of_their_own() {
        let store = Store::seeded();
        let r = Resource::Deployments;
        let deployment = |containers: Value| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "d", "namespace": "default"},
                   "spec": {"selector": {"matchLabels": {"app": "d"}},
                            "template": {"metadata": {"labels": {"app": "d"}},
                                         "spec": {"containers": containers}}}})
        };
        let target = ("d", Target::Object);
        let web = deployment(
            json!([{"name": "web", "image": "web:1", "ports": [{"containerPort": 80}]}]),
        );
        let (created, was_created) = store
            .apply(r, "default", target, &web, (by("a"), false))
            .unwrap();
        assert!(was_created);
        let fields = &entries(&value(&created))[0].3;
        let web_item =
            &fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!(web_item["."], json!({}));
        // A port's protocol defaults to TCP in its key.
        assert!(
            web_item["f:ports"]["k:{\"containerPort\":80,\"protocol\":\"TCP\"}"].is_object(),
            "{fields}"
        );
        // A second applier adds its own container: no conflict, both kept.
        let sidecar = deployment(json!([{"name": "sidecar", "image": "side:1"}]));
        let (both, _) = store
            .apply(r, "default", target, &sidecar, (by("b"), false))
            .unwrap();
        let both = value(&both);
        let names: Vec<&str> = both["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web", "sidecar"]);
        // Changing the other's container's image is a conflict on that item's field.
        let steal = deployment(json!([{"name": "web", "image": "web:2"}]));
        let err = store
            .apply(r, "default", target, &steal, (by("b"), false))
            .unwrap_err();
        assert_eq!(
            err.message,
            "Apply failed with 1 conflict: conflict with \"a\": .spec.template.spec.containers[name=\"web\"].image"
        );
    }

    #[test]
    fn status_writes_are_owned_apart_from_the_object() {
        let store = Store::seeded();
        store.set_cluster_status_subresource(true);
        let r = Resource::Clusters;
        let cluster = json!({"apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
                             "metadata": {"name": "m1"}, "spec": {"provider": "x"}});
        let created = value(&store.create_by(r, "", cluster, by("ks-apiserver")).unwrap());
        assert_eq!(
            entries(&created),
            [entry(
                "ks-apiserver",
                "Update",
                json!({"f:spec": {".": {}, "f:provider": {}}})
            )]
        );
        let status =
            json!({"status": {"conditions": [{"type": "AgentAvailable", "status": "True"}]}});
        let written = store
            .patch_by(
                r,
                "",
                ("m1", Target::Status),
                (PatchKind::Merge, &status),
                by("tower-server"),
            )
            .unwrap();
        let written = entries(&value(&written));
        assert_eq!(written.len(), 2);
        // The custom resource's conditions are an atomic list: one field.
        assert_eq!(
            written[1],
            (
                "tower-server".into(),
                "Update".into(),
                "status".into(),
                json!({"f:status": {".": {}, "f:conditions": {}}})
            )
        );
    }

    #[test]
    fn fields_v1_round_trips() {
        let fields = json!({"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                            "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}}}},
                            "f:finalizers": {"v:\"a\"": {}}});
        let mut set = Set::new();
        parse_fields(&fields, &mut Vec::new(), &mut set).unwrap();
        assert_eq!(set.len(), 5, "{set:?}");
        assert_eq!(to_fields(&set), fields);
        assert!(parse_fields(&json!({"x:y": {}}), &mut Vec::new(), &mut Set::new()).is_err());
    }

    #[test]
    fn a_write_that_sets_managed_fields_is_taken_at_its_word() {
        let store = Store::seeded();
        let r = Resource::ConfigMaps;
        store
            .create_by(
                r,
                "default",
                config_map(json!({"key": "one"})),
                by("kubectl-client-side-apply"),
            )
            .unwrap();
        // kubectl's migration to server-side apply rewrites the entries with a JSON patch.
        let migrated = json!([{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:key": {}}}}]);
        let ops = json!([{"op": "replace", "path": "/metadata/managedFields", "value": migrated}]);
        let written = store
            .patch_by(
                r,
                "default",
                ("cm", Target::Object),
                (PatchKind::Json, &ops),
                by("kubectl"),
            )
            .unwrap();
        assert_eq!(
            entries(&value(&written)),
            [entry("kubectl", "Apply", json!({"f:data": {"f:key": {}}}))]
        );
        // An update that sends none keeps them.
        let mut replaced = value(&written);
        replaced["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        replaced["data"]["other"] = json!("x");
        let replaced = store
            .replace_by(
                r,
                "default",
                ("cm", Target::Object),
                replaced,
                by("kubectl-replace"),
            )
            .unwrap();
        assert_eq!(entries(&value(&replaced)).len(), 2);
    }
}
