//! Values as structured-merge-diff's `typed` package sees them: the fields a value sets
//! (`tofieldset.go`), what changed between two (`compare.go`), one merged over another
//! (`merge.go`), a field removed (`remove.go`), and field sets as `FieldsV1`
//! (`fieldpath/serialize.go`) — all by the schema table [`shape`].

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::{Path, Scope, Set};
use crate::store::Resource;
use crate::store::decode::Step;

/// The object a create is compared with: the zero value of the type, whose non-pointer
/// structs exist before anything is set (so a Deployment's creator owns
/// `spec.template.spec.containers`, not `spec`). Custom resources have none.
pub(super) fn zero_object(resource: Resource) -> Value {
    match resource {
        Resource::Pods => json!({"metadata": {}, "spec": {}, "status": {}}),
        Resource::Deployments => json!({"metadata": {},
            "spec": {"template": {"metadata": {}, "spec": {}}, "strategy": {}}, "status": {}}),
        Resource::Services => json!({"metadata": {}, "spec": {}, "status": {"loadBalancer": {}}}),
        Resource::Namespaces => json!({"metadata": {}, "spec": {}, "status": {}}),
        _ if resource.is_custom() => json!({}),
        _ => json!({"metadata": {}}),
    }
}

/// How the schema table treats a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// An object with named fields: owned through its fields.
    Struct,
    /// A `map[string]T`: its keys are fields of their own.
    Map,
    /// Set and replaced whole: one field.
    Atomic,
    /// A list whose items are told apart by these fields (`listType=map`).
    Keyed(&'static [&'static str]),
    /// A list of distinct scalars (`listType=set`).
    Set,
}

/// The schema table: the shape of the node at `path` of a `resource`.
fn shape(resource: Resource, path: &[String]) -> Shape {
    if path.last().is_some_and(|pe| pe.starts_with("k:")) {
        return Shape::Struct;
    }
    let mut names = path.iter().filter_map(|pe| pe.strip_prefix("f:")).rev();
    let (Some(last), parent) = (names.next(), names.next()) else {
        return Shape::Struct;
    };
    let pods = matches!(resource, Resource::Pods | Resource::Deployments);
    let top = path.len() == 1;
    match (parent, last) {
        (_, "labels" | "annotations") => Shape::Map,
        (Some("metadata"), "finalizers") => Shape::Set,
        (Some("metadata"), "ownerReferences") => Shape::Keyed(&["uid"]),
        (None, "data" | "binaryData" | "stringData")
            if top && matches!(resource, Resource::ConfigMaps | Resource::Secrets) =>
        {
            Shape::Map
        }
        (_, "limits" | "requests") if pods => Shape::Map,
        // `+mapType=atomic` / `+structType=atomic` in core/v1 and apps/v1.
        (_, "selector" | "nodeSelector") if pods || resource == Resource::Services => Shape::Atomic,
        (_, "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env")
            if pods =>
        {
            Shape::Keyed(&["name"])
        }
        (_, "imagePullSecrets") if pods || resource == Resource::ServiceAccounts => {
            Shape::Keyed(&["name"])
        }
        (_, "volumeMounts") if pods => Shape::Keyed(&["mountPath"]),
        (Some("containers" | "initContainers" | "ephemeralContainers"), "ports") if pods => {
            Shape::Keyed(&["containerPort", "protocol"])
        }
        (Some("spec"), "ports") if resource == Resource::Services => {
            Shape::Keyed(&["port", "protocol"])
        }
        (Some("status"), "conditions") if resource == Resource::Pods => Shape::Keyed(&["type"]),
        _ => Shape::Struct,
    }
}

/// The path element of a list item; `None` when the item lacks a key field.
fn item_element(shape: Shape, item: &Value) -> Option<String> {
    match shape {
        Shape::Keyed(keys) => {
            let object = item.as_object()?;
            let mut key = Map::new();
            for &name in keys {
                let value = match object.get(name) {
                    Some(v) if !v.is_null() => v.clone(),
                    // The key field the models give a default: a port's protocol.
                    _ if name == "protocol" => Value::from("TCP"),
                    _ => return None,
                };
                key.insert(name.to_owned(), value);
            }
            Some(format!("k:{}", Value::Object(key)))
        }
        Shape::Set => Some(format!("v:{item}")),
        Shape::Struct | Shape::Map | Shape::Atomic => None,
    }
}

/// A list's items by path element, when the list is keyed and every item has one
/// (otherwise it is treated as atomic).
fn keyed_items(shape: Shape, items: &[Value]) -> Option<Vec<(String, &Value)>> {
    items
        .iter()
        .map(|item| Some((item_element(shape, item)?, item)))
        .collect()
}

/// `ToFieldSet`: the fields a value sets.
pub(super) fn field_set(resource: Resource, value: &Value) -> Set {
    let mut set = Set::new();
    collect(resource, value, &mut Vec::new(), &mut set);
    set
}

fn collect(resource: Resource, value: &Value, path: &mut Path, set: &mut Set) {
    let shape = shape(resource, path);
    match value {
        Value::Object(map) if matches!(shape, Shape::Struct | Shape::Map) => {
            for (key, child) in map {
                path.push(format!("f:{key}"));
                collect(resource, child, path, set);
                let empty = child.is_null() || child.as_object().is_some_and(Map::is_empty);
                if empty || shape == Shape::Map {
                    set.insert(path.clone());
                }
                path.pop();
            }
        }
        Value::Array(items) => match keyed_items(shape, items) {
            Some(items) => {
                for (pe, item) in items {
                    path.push(pe);
                    collect(resource, item, path, set);
                    set.insert(path.clone());
                    path.pop();
                }
            }
            None => {
                set.insert(path.clone());
            }
        },
        _ if !path.is_empty() => {
            set.insert(path.clone());
        }
        _ => {}
    }
}

/// `TypedValue.Compare`: the fields `rhs` added, removed and changed.
#[derive(Debug, Default)]
pub(super) struct Comparison {
    pub(super) added: Set,
    pub(super) removed: Set,
    pub(super) modified: Set,
}

impl Comparison {
    pub(super) fn of(resource: Resource, lhs: &Value, rhs: &Value) -> Comparison {
        let mut out = Comparison::default();
        compare(resource, Some(lhs), Some(rhs), &mut Vec::new(), &mut out);
        out
    }

    /// `ExcludeFields` of what the scope may not own.
    pub(super) fn within(self, scope: Scope) -> Comparison {
        Comparison {
            added: scope.filter(self.added),
            removed: scope.filter(self.removed),
            modified: scope.filter(self.modified),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.modified.is_empty()
    }
}

/// A node of one side of a comparison.
enum Node<'a> {
    Absent,
    Object(&'a Map<String, Value>),
    List(Vec<(String, &'a Value)>),
    Leaf,
}

impl<'a> Node<'a> {
    fn of(shape: Shape, value: Option<&'a Value>) -> Node<'a> {
        match value {
            None => Node::Absent,
            Some(Value::Object(map)) if matches!(shape, Shape::Struct | Shape::Map) => {
                Node::Object(map)
            }
            Some(Value::Array(items)) => match keyed_items(shape, items) {
                Some(items) => Node::List(items),
                None => Node::Leaf,
            },
            Some(_) => Node::Leaf,
        }
    }
}

pub(super) fn compare<'a>(
    resource: Resource,
    lhs: Option<&'a Value>,
    rhs: Option<&'a Value>,
    path: &mut Path,
    out: &mut Comparison,
) {
    fn child<'a>(node: &Node<'a>, key: &str) -> Option<&'a Value> {
        match node {
            Node::Object(map) => map.get(key),
            _ => None,
        }
    }
    fn items<'n, 'a>(node: &'n Node<'a>) -> &'n [(String, &'a Value)] {
        match node {
            Node::List(items) => items,
            _ => &[],
        }
    }
    fn item<'a>(items: &[(String, &'a Value)], pe: &str) -> Option<&'a Value> {
        items.iter().find(|(p, _)| p == pe).map(|(_, v)| *v)
    }
    let shape = shape(resource, path);
    let (l, r) = (Node::of(shape, lhs), Node::of(shape, rhs));
    // Both sides empty (or absent) is a leaf: it keeps the empty/null distinction.
    let granular = match (&l, &r) {
        (Node::Object(_) | Node::Absent, Node::Object(_) | Node::Absent) => {
            let keys: BTreeSet<&String> = [&l, &r]
                .into_iter()
                .filter_map(|n| match n {
                    Node::Object(m) => Some(m.keys()),
                    _ => None,
                })
                .flatten()
                .collect();
            for key in &keys {
                path.push(format!("f:{key}"));
                compare(resource, child(&l, key), child(&r, key), path, out);
                path.pop();
            }
            !keys.is_empty()
        }
        (Node::List(_) | Node::Absent, Node::List(_) | Node::Absent) => {
            let (li, ri) = (items(&l), items(&r));
            let elements: BTreeSet<&String> = li.iter().chain(ri).map(|(p, _)| p).collect();
            for pe in &elements {
                path.push((*pe).clone());
                compare(resource, item(li, pe), item(ri, pe), path, out);
                path.pop();
            }
            !elements.is_empty()
        }
        _ => false,
    };
    if path.is_empty() {
        return;
    }
    match (lhs, rhs) {
        (None, Some(_)) => {
            out.added.insert(path.clone());
        }
        (Some(_), None) => {
            out.removed.insert(path.clone());
        }
        (Some(a), Some(b)) if !granular && a != b => {
            out.modified.insert(path.clone());
        }
        _ => {}
    }
}

/// `TypedValue.Merge`: `rhs` over `lhs`, maps and keyed lists item by item.
pub(super) fn merge(resource: Resource, lhs: &Value, rhs: &Value, path: &mut Path) -> Value {
    let shape = shape(resource, path);
    match (lhs, rhs) {
        (Value::Object(l), Value::Object(r)) if matches!(shape, Shape::Struct | Shape::Map) => {
            let mut out = l.clone();
            for (key, rv) in r {
                path.push(format!("f:{key}"));
                let merged = match l.get(key) {
                    Some(lv) => merge(resource, lv, rv, path),
                    None => rv.clone(),
                };
                path.pop();
                out.insert(key.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(l), Value::Array(r)) => {
            match (keyed_items(shape, l), keyed_items(shape, r)) {
                (Some(l), Some(r)) => {
                    let mut out: Vec<(String, Value)> =
                        l.into_iter().map(|(pe, v)| (pe, v.clone())).collect();
                    for (pe, rv) in r {
                        path.push(pe.clone());
                        match out.iter_mut().find(|(p, _)| *p == pe) {
                            Some((_, lv)) => {
                                let merged = merge(resource, lv, rv, path);
                                *lv = merged;
                            }
                            None => out.push((pe, rv.clone())),
                        }
                        path.pop();
                    }
                    Value::Array(out.into_iter().map(|(_, v)| v).collect())
                }
                _ => rhs.clone(),
            }
        }
        _ => rhs.clone(),
    }
}

/// `RemoveItems` of one field.
pub(super) fn remove(resource: Resource, value: &mut Value, target: &[String], path: &mut Path) {
    let Some((first, rest)) = target.split_first() else {
        return;
    };
    let shape = shape(resource, path);
    match value {
        Value::Object(map) => {
            let Some(key) = first.strip_prefix("f:") else {
                return;
            };
            if rest.is_empty() {
                map.remove(key);
            } else if let Some(child) = map.get_mut(key) {
                path.push(first.clone());
                remove(resource, child, rest, path);
                path.pop();
            }
        }
        Value::Array(items) => {
            if rest.is_empty() {
                items.retain(|item| item_element(shape, item).as_ref() != Some(first));
            } else if let Some(item) = items
                .iter_mut()
                .find(|item| item_element(shape, item).as_ref() == Some(first))
            {
                path.push(first.clone());
                remove(resource, item, rest, path);
                path.pop();
            }
        }
        _ => {}
    }
}

/// `FieldsV1` into a set.
pub(super) fn parse_fields(node: &Value, path: &mut Path, set: &mut Set) -> Result<(), String> {
    let Value::Object(map) = node else {
        return Err(format!("FieldsV1 node is not an object: {node}"));
    };
    if !path.is_empty() && (map.is_empty() || map.contains_key(".")) {
        set.insert(path.clone());
    }
    for (key, child) in map {
        if key == "." {
            continue;
        }
        if !["f:", "k:", "v:", "i:"].iter().any(|p| key.starts_with(p)) {
            return Err(format!("unexpected FieldsV1 key {key:?}"));
        }
        path.push(key.clone());
        parse_fields(child, path, set)?;
        path.pop();
    }
    Ok(())
}

/// A set as `FieldsV1`: a member with children gets `.`.
pub(super) fn to_fields(set: &Set) -> Value {
    #[derive(Default)]
    struct Tree {
        member: bool,
        children: BTreeMap<String, Tree>,
    }
    fn value(tree: &Tree) -> Value {
        let mut map = Map::new();
        if tree.member && !tree.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (key, child) in &tree.children {
            map.insert(key.clone(), value(child));
        }
        Value::Object(map)
    }
    let mut root = Tree::default();
    for path in set {
        let mut node = &mut root;
        for pe in path {
            node = node.children.entry(pe.clone()).or_default();
        }
        node.member = true;
    }
    value(&root)
}

/// `fieldpath.Path.String`: `.spec.containers[name="web"].image`.
pub(super) fn path_string(path: &[String]) -> String {
    let mut out = String::new();
    for pe in path {
        if let Some(name) = pe.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(key) = pe.strip_prefix("k:") {
            let fields: Vec<String> = serde_json::from_str::<Map<String, Value>>(key)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            out.push_str(&format!("[{}]", fields.join(",")));
        } else if let Some(value) = pe.strip_prefix("v:") {
            out.push_str(&format!("[={value}]"));
        } else if let Some(index) = pe.strip_prefix("i:") {
            out.push_str(&format!("[{index}]"));
        }
    }
    out
}

/// The field at `steps` of `value` as structured-merge-diff names it: a keyed list's item
/// by its key (`.spec.template.spec.containers[name="a"].image`), other items by index.
pub(super) fn path_of_steps(resource: Resource, value: &Value, steps: &[Step]) -> String {
    let mut path = Path::new();
    let mut at = Some(value);
    for step in steps {
        match step {
            Step::Key(key) => {
                path.push(format!("f:{key}"));
                at = at.and_then(|v| v.get(key));
            }
            Step::Index(i) => {
                let item = at.and_then(|v| v.get(*i));
                let element = item
                    .and_then(|item| item_element(shape(resource, &path), item))
                    .unwrap_or_else(|| format!("i:{i}"));
                path.push(element);
                at = item;
            }
        }
    }
    path_string(&path)
}
