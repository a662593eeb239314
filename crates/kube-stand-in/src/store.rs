//! The in-memory object store: namespaces, pods, configmaps, services and KubeSphere
//! clusters as JSON, one global resourceVersion counter, a bounded event history and one
//! broadcast channel that every watch subscribes to (a watch costs a receiver, never a copy
//! of the store).
//!
//! Services and clusters have a `status` subresource with the apiserver's semantics: a write
//! to the object keeps the stored `.status`, a write to `…/status` changes nothing else.
//!
//! Beside it: the resource types served (`resource`), list and watch selectors (`filter`),
//! the patch formats (`patch`), per-kind defaults and validation (`validation`), what
//! finalizers do to deletes and updates (`finalize`), and what the garbage collector and
//! node controller add (`gc`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::clock;
use crate::status::ApiError;

mod crd;
mod decode;
mod fields;
mod filter;
mod finalize;
mod gc;
mod patch;
mod resource;
mod strategic;
mod validation;

pub(crate) use fields::manager_name;
use fields::{Managed, Scope, Writer};
pub(crate) use filter::Filter;
use patch::{json_patch, merge_patch};
pub(crate) use resource::{RBAC_GROUP, Resource};
use strategic::{PatchError, strategic_merge};
use validation::{
    binding_defaults, check_type, dns_subdomain, secret_defaults, service_defaults,
    validate_config_map, validate_deployment, validate_meta, validate_role,
};

/// How many events the history keeps for watches that resume from a resourceVersion.
const HISTORY_CAP: usize = 4096;
/// Capacity of the broadcast channel; a watch that falls this far behind is ended with 410.
const BROADCAST_CAP: usize = 4096;
/// The node every pod runs on.
const NODE_NAME: &str = "stand-in-node";
/// Number of configmaps in namespace `bulk`.
pub(crate) const BULK_COUNT: usize = 550;
/// Size of each bulk configmap's `data.payload`.
pub(crate) const BULK_VALUE_LEN: usize = 100 * 1024;

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, shared (behind an `Arc`) by the history and every watch that sees it.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) kind: EventType,
    pub(crate) resource: Resource,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) rv: u64,
    pub(crate) object: Bytes,
    line: OnceLock<Bytes>,
    table_line: OnceLock<Bytes>,
}

impl Event {
    /// `{"type":"…","object":{…}}\n`, rendered once and shared by every watch.
    pub(crate) fn line(&self) -> Bytes {
        self.line
            .get_or_init(|| event_line(self.kind, &self.object))
            .clone()
    }

    /// The same event with a one-row `Table` as its object (for `as=Table` watches).
    pub(crate) fn table_line(&self) -> Bytes {
        self.table_line
            .get_or_init(|| {
                let object: Value = serde_json::from_slice(&self.object).unwrap_or(Value::Null);
                let table = crate::table::table(
                    self.resource,
                    std::slice::from_ref(&object),
                    &self.rv.to_string(),
                    false,
                    crate::table::IncludeObject::Metadata,
                );
                let mut line = json!({"type": self.kind.as_str(), "object": table}).to_string();
                line.push('\n');
                Bytes::from(line)
            })
            .clone()
    }
}

/// Renders one watch event line.
pub(crate) fn event_line(kind: EventType, object: &[u8]) -> Bytes {
    let prefix = format!("{{\"type\":\"{}\",\"object\":", kind.as_str());
    let mut line = Vec::with_capacity(prefix.len() + object.len() + 2);
    line.extend_from_slice(prefix.as_bytes());
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

#[derive(Debug)]
struct Stored {
    json: Bytes,
    rv: u64,
    labels: BTreeMap<String, String>,
}

type Key = (Resource, String, String);

#[derive(Debug)]
struct Inner {
    objects: BTreeMap<Key, Stored>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    /// Every event with an rv above this is in `history`.
    history_floor: u64,
    seq: u64,
    /// Cluster IPs handed out so far (the next service gets 10.96.x.y from this counter).
    cluster_ips: u32,
    /// Node ports handed out so far.
    node_ports: u32,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Since {
    /// `resourceVersion` unset or `0`: synthetic ADDED events for the current state first.
    Now,
    /// Events after this resourceVersion.
    Version(u64),
}

/// What a new watch replays before it turns to live events.
pub(crate) struct WatchStart {
    /// Current objects (JSON) to send as ADDED events.
    pub(crate) initial: Vec<Bytes>,
    /// Past events to replay.
    pub(crate) replay: Vec<Arc<Event>>,
    /// Live events from here on.
    pub(crate) live: broadcast::Receiver<Arc<Event>>,
    /// The resourceVersion the watch starts at.
    pub(crate) rv: u64,
}

/// The object store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
    seed: u64,
    /// KubeSphere's own Cluster CRD has no status subresource; this turns it off.
    cluster_status_subresource: std::sync::atomic::AtomicBool,
    /// Counts writes to the RBAC kinds, so the authorizer knows when its view is stale.
    rbac_generation: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Whether `resource` serves `…/status` now (see [`Resource::has_status_subresource`]).
    pub(crate) fn status_subresource(&self, resource: Resource) -> bool {
        resource.has_status_subresource()
            && (resource != Resource::Clusters
                || self
                    .cluster_status_subresource
                    .load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Serves Clusters with or without the status subresource.
    pub(crate) fn set_cluster_status_subresource(&self, on: bool) {
        self.cluster_status_subresource
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// A store with the seed objects: namespaces `default`, `kube-system`, `bulk` (each with
    /// its `default` ServiceAccount); pods `default/web-0`, `default/web-1`; configmap
    /// `default/settings`; the bulk configmaps; and the RBAC bootstrap policy
    /// ([`crate::rbac::bootstrap_policy`]).
    pub(crate) fn seeded() -> Store {
        let (events, _) = broadcast::channel(BROADCAST_CAP);
        let seed = clock::unix_now().unsigned_abs();
        let store = Store {
            inner: Mutex::new(Inner {
                objects: BTreeMap::new(),
                rv: 1000,
                history: VecDeque::new(),
                history_floor: 0,
                seq: 0,
                cluster_ips: 0,
                node_ports: 0,
            }),
            events,
            seed,
            cluster_status_subresource: std::sync::atomic::AtomicBool::new(true),
            rbac_generation: std::sync::atomic::AtomicU64::new(0),
        };
        let seeds = [
            (
                Resource::Namespaces,
                "",
                json!({"metadata": {"name": "default"}}),
            ),
            (
                Resource::Namespaces,
                "",
                json!({"metadata": {"name": "kube-system"}}),
            ),
            (
                Resource::Namespaces,
                "",
                json!({"metadata": {"name": "bulk"}}),
            ),
            (Resource::Nodes, "", gc::seed_node(NODE_NAME)),
            (Resource::Pods, "default", seed_pod("web-0")),
            (Resource::Pods, "default", seed_pod("web-1")),
            (
                Resource::ConfigMaps,
                "default",
                json!({"metadata": {"name": "settings", "labels": {"app": "web"}},
                       "data": {"mode": "stand-in", "replicas": "2"}}),
            ),
        ];
        let policy = crate::rbac::bootstrap_policy()
            .into_iter()
            .map(|(resource, obj)| (resource, "", obj));
        for (resource, ns, obj) in seeds.into_iter().chain(policy) {
            // The seeds are valid by construction.
            let _ = store.create(resource, ns, obj);
        }
        {
            let mut inner = store.lock();
            store.seed_bulk(&mut inner);
            // Seeding is not history: watches start after it.
            inner.history.clear();
            inner.history_floor = inner.rv;
        }
        store
    }

    /// Adds a fixture object after seeding; like the seeds, it is not watch history.
    pub(crate) fn seed(&self, resource: Resource, namespace: &str, object: Value) {
        let _ = self.create(resource, namespace, object);
        let mut inner = self.lock();
        inner.history.clear();
        inner.history_floor = inner.rv;
    }

    /// Fills namespace `bulk` with [`BULK_COUNT`] configmaps of [`BULK_VALUE_LEN`] bytes of
    /// deterministic text each. The JSON is written directly (the payload needs no escaping),
    /// so seeding stays fast even in unoptimised builds.
    fn seed_bulk(&self, inner: &mut Inner) {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let base: Vec<u8> = ALPHABET
            .iter()
            .copied()
            .cycle()
            .take(BULK_VALUE_LEN + ALPHABET.len())
            .collect();
        let created = clock::now_rfc3339();
        let labels: BTreeMap<String, String> = [("tier".to_owned(), "bulk".to_owned())].into();
        for i in 0..BULK_COUNT {
            inner.rv += 1;
            inner.seq += 1;
            let name = format!("bulk-{i:04}");
            let head = format!(
                "{{\"kind\":\"ConfigMap\",\"apiVersion\":\"v1\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"bulk\",\"uid\":\"{}\",\"resourceVersion\":\"{}\",\"creationTimestamp\":\"{created}\",\"labels\":{{\"tier\":\"bulk\"}}}},\"data\":{{\"index\":\"{i}\",\"payload\":\"",
                uid(self.seed, inner.seq),
                inner.rv
            );
            let offset = i % ALPHABET.len();
            let mut json = Vec::with_capacity(head.len() + BULK_VALUE_LEN + 3);
            json.extend_from_slice(head.as_bytes());
            json.extend_from_slice(&base[offset..offset + BULK_VALUE_LEN]);
            json.extend_from_slice(b"\"}}");
            inner.objects.insert(
                (Resource::ConfigMaps, "bulk".to_owned(), name),
                Stored {
                    json: Bytes::from(json),
                    rv: inner.rv,
                    labels: labels.clone(),
                },
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current resourceVersion.
    pub(crate) fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Goes up with every write to a Role, ClusterRole or binding.
    pub(crate) fn rbac_generation(&self) -> u64 {
        self.rbac_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The UID of an object, if it exists.
    pub(crate) fn uid(&self, resource: Resource, namespace: &str, name: &str) -> Option<String> {
        let inner = self.lock();
        let stored = inner
            .objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))?;
        let object: Value = serde_json::from_slice(&stored.json).ok()?;
        object["metadata"]["uid"].as_str().map(str::to_owned)
    }

    /// Whether a pod exists.
    pub(crate) fn pod_exists(&self, namespace: &str, name: &str) -> bool {
        self.lock()
            .objects
            .contains_key(&(Resource::Pods, namespace.to_owned(), name.to_owned()))
    }

    /// One object.
    pub(crate) fn get(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Bytes, ApiError> {
        self.lock()
            .objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
            .map(|s| s.json.clone())
            .ok_or_else(|| ApiError::not_found(&resource.qualified_plural(), name))
    }

    /// The list's resourceVersion and the matching objects, in (namespace, name) order. The
    /// returned `Bytes` share the store's buffers.
    pub(crate) fn list(&self, resource: Resource, filter: &Filter) -> (u64, Vec<Bytes>) {
        let inner = self.lock();
        let items = Self::matching(&inner, resource, filter)
            .map(|s| s.json.clone())
            .collect();
        (inner.rv, items)
    }

    /// One page of [`Store::list`]: at most `limit` objects after the (namespace, name)
    /// `after`, and the last one's key when more follow (for a `continue` token).
    pub(crate) fn list_page(
        &self,
        resource: Resource,
        filter: &Filter,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> (u64, Vec<Bytes>, Option<(String, String)>) {
        let inner = self.lock();
        let start = match after {
            Some((ns, name)) => (resource, ns.to_owned(), name.to_owned()),
            None => (
                resource,
                filter.namespace.clone().unwrap_or_default(),
                String::new(),
            ),
        };
        let mut matching = inner
            .objects
            .range((std::ops::Bound::Excluded(start), std::ops::Bound::Unbounded))
            .take_while(move |((r, ns, _), _)| {
                *r == resource && filter.namespace.as_deref().is_none_or(|want| want == ns)
            })
            .filter(move |((_, ns, name), s)| filter.matches(ns, name, &s.labels));
        let mut items = Vec::new();
        let mut last = None;
        for ((_, ns, name), stored) in matching.by_ref().take(limit) {
            items.push(stored.json.clone());
            last = Some((ns.clone(), name.clone()));
        }
        let more = matching.next().is_some();
        (inner.rv, items, last.filter(|_| more))
    }

    fn matching<'a>(
        inner: &'a Inner,
        resource: Resource,
        filter: &'a Filter,
    ) -> impl Iterator<Item = &'a Stored> + 'a {
        let start = (
            resource,
            filter.namespace.clone().unwrap_or_default(),
            String::new(),
        );
        inner
            .objects
            .range(start..)
            .take_while(move |((r, ns, _), _)| {
                *r == resource && filter.namespace.as_deref().is_none_or(|want| want == ns)
            })
            .filter(move |((_, ns, name), s)| filter.matches(ns, name, &s.labels))
            .map(|(_, s)| s)
    }

    /// Creates an object as the stand-in itself (seeds, tests): no field manager recorded.
    pub(crate) fn create(
        &self,
        resource: Resource,
        namespace: &str,
        object: Value,
    ) -> Result<Bytes, ApiError> {
        self.create_tracked(resource, namespace, object, Track::Untracked)
    }

    /// Creates an object (POST) for a client.
    pub(crate) fn create_by(
        &self,
        resource: Resource,
        namespace: &str,
        object: Value,
        by: By<'_>,
    ) -> Result<Bytes, ApiError> {
        self.create_tracked(resource, namespace, object, Track::Update(by))
    }

    fn create_tracked(
        &self,
        resource: Resource,
        namespace: &str,
        object: Value,
        track: Track<'_>,
    ) -> Result<Bytes, ApiError> {
        let dry_run = track.dry_run();
        let mut inner = self.lock();
        let created = self.write_locked(
            &mut inner,
            resource,
            namespace,
            None,
            object,
            Write::Create,
            track,
        )?;
        if resource == Resource::Namespaces && !dry_run {
            self.default_service_account(&mut inner, &created);
        }
        Ok(created)
    }

    /// What the ServiceAccount controller does for every new namespace
    /// (pkg/controller/serviceaccount/serviceaccounts_controller.go): a ServiceAccount
    /// named `default` in it. Done at once here, as part of the namespace's creation.
    fn default_service_account(&self, inner: &mut Inner, namespace: &Bytes) {
        let Some(ns) = serde_json::from_slice::<Value>(namespace)
            .ok()
            .and_then(|v| v["metadata"]["name"].as_str().map(str::to_owned))
        else {
            return;
        };
        let _ = self.write_locked(
            inner,
            Resource::ServiceAccounts,
            &ns,
            None,
            json!({"metadata": {"name": "default"}}),
            Write::Create,
            Track::Update(By {
                manager: "kube-controller-manager",
                dry_run: false,
                strict: false,
                warnings: &std::sync::Mutex::new(Vec::new()),
            }),
        );
    }

    /// Replaces an object (PUT), or with [`Target::Status`] only its `.status`, as the
    /// stand-in itself.
    #[cfg(test)]
    pub(crate) fn replace(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        target: Target,
        object: Value,
    ) -> Result<Bytes, ApiError> {
        let mut inner = self.lock();
        let write = target.write();
        let name = Some(name);
        self.write_locked(
            &mut inner,
            resource,
            namespace,
            name,
            object,
            write,
            Track::Untracked,
        )
    }

    /// [`Store::replace`] for a client.
    pub(crate) fn replace_by(
        &self,
        resource: Resource,
        namespace: &str,
        (name, target): (&str, Target),
        object: Value,
        by: By<'_>,
    ) -> Result<Bytes, ApiError> {
        let mut inner = self.lock();
        let (write, track) = (target.write(), Track::Update(by));
        self.write_locked(
            &mut inner,
            resource,
            namespace,
            Some(name),
            object,
            write,
            track,
        )
    }

    /// Applies a patch: JSON merge patch, strategic merge patch or RFC 6902 JSON patch. The patch applies to the whole
    /// object either way; with [`Target::Status`] only the resulting `.status` is kept, with
    /// [`Target::Object`] the stored `.status` is kept if the resource has a status
    /// subresource.
    #[cfg(test)]
    pub(crate) fn patch(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        target: Target,
        kind: PatchKind,
        patch: &Value,
    ) -> Result<Bytes, ApiError> {
        let key = (resource, namespace.to_owned(), name.to_owned());
        self.patch_locked(
            &mut self.lock(),
            &key,
            target,
            kind,
            patch,
            Track::Untracked,
        )
    }

    /// [`Store::patch`] for a client.
    pub(crate) fn patch_by(
        &self,
        resource: Resource,
        namespace: &str,
        (name, target): (&str, Target),
        (kind, patch): (PatchKind, &Value),
        by: By<'_>,
    ) -> Result<Bytes, ApiError> {
        let key = (resource, namespace.to_owned(), name.to_owned());
        let track = Track::Update(by);
        self.patch_locked(&mut self.lock(), &key, target, kind, patch, track)
    }

    /// Server-side apply (`application/apply-patch+yaml`) by a client: the configuration
    /// merged into the object (or creating it), with field ownership, conflicts and
    /// pruning (`fields`). Returns the object and whether it was created.
    pub(crate) fn apply(
        &self,
        resource: Resource,
        namespace: &str,
        (name, target): (&str, Target),
        config: &Value,
        (by, force): (By<'_>, bool),
    ) -> Result<(Bytes, bool), ApiError> {
        check_apply_config(resource, config)?;
        decode::check_apply_config(resource, namespace, name, config)?;
        let mut inner = self.lock();
        let key = (resource, namespace.to_owned(), name.to_owned());
        let live = match Self::stored(&inner, &key) {
            Ok((live, stored)) => {
                if let Some(rv) = config
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    && rv != stored.rv.to_string()
                {
                    return Err(ApiError::conflict(&resource.qualified_plural(), name));
                }
                Some(live)
            }
            Err(e) if target == Target::Status => return Err(e),
            Err(_) => None,
        };
        let writer = Writer {
            manager: by.manager,
            scope: self.scope(resource, target.write()),
        };
        let (object, managed) = fields::apply(resource, live.as_ref(), config, writer, force)?;
        let (write, created) = match live {
            Some(_) => (target.write(), false),
            None => (Write::Create, true),
        };
        let track = Track::Applied(managed, by);
        let object = self.write_locked(
            &mut inner,
            resource,
            namespace,
            Some(name),
            object,
            write,
            track,
        )?;
        if created && resource == Resource::Namespaces && !by.dry_run {
            self.default_service_account(&mut inner, &object);
        }
        Ok((object, created))
    }

    /// What a patch would make of an object, without writing it (for checks that need the
    /// result, such as the RBAC escalation check).
    pub(crate) fn preview_patch(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        kind: PatchKind,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let key = (resource, namespace.to_owned(), name.to_owned());
        Self::patched(&self.lock(), &key, kind, patch)
    }

    /// What a server-side apply would make of an object, conflicts aside, without writing
    /// it.
    pub(crate) fn preview_apply(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        config: &Value,
    ) -> Result<Value, ApiError> {
        check_apply_config(resource, config)?;
        let key = (resource, namespace.to_owned(), name.to_owned());
        let live = Self::stored(&self.lock(), &key).ok().map(|(live, _)| live);
        Ok(fields::preview_apply(resource, live.as_ref(), config))
    }

    /// Which part of an object a write can own fields of.
    fn scope(&self, resource: Resource, write: Write) -> Scope {
        match write {
            Write::Status => Scope::StatusOnly,
            _ if self.status_subresource(resource) => Scope::WithoutStatus,
            _ => Scope::Whole,
        }
    }

    fn patch_locked(
        &self,
        inner: &mut Inner,
        key: &Key,
        target: Target,
        kind: PatchKind,
        patch: &Value,
        track: Track<'_>,
    ) -> Result<Bytes, ApiError> {
        let object = Self::patched(inner, key, kind, patch)?;
        let name = Some(key.2.as_str());
        self.write_locked(inner, key.0, &key.1, name, object, target.write(), track)
    }

    /// The object stored at `key`, parsed, beside its stored form; 404 when there is none.
    fn stored<'a>(inner: &'a Inner, key: &Key) -> Result<(Value, &'a Stored), ApiError> {
        let stored = inner
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(&key.0.qualified_plural(), &key.2))?;
        let object = serde_json::from_slice(&stored.json)
            .map_err(|e| ApiError::internal(format!("stored object is not JSON: {e}")))?;
        Ok((object, stored))
    }

    /// The stored object with `patch` applied and its current resourceVersion.
    fn patched(
        inner: &Inner,
        key: &Key,
        kind: PatchKind,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let (resource, name) = (key.0, key.2.as_str());
        let (mut object, stored) = Self::stored(inner, key)?;
        let current_rv = stored.rv.to_string();
        match kind {
            PatchKind::Merge | PatchKind::Strategic => {
                if let Some(rv) = patch
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    && rv != current_rv
                {
                    return Err(ApiError::conflict(&resource.qualified_plural(), name));
                }
                if kind == PatchKind::Merge {
                    merge_patch(&mut object, patch);
                } else {
                    strategic_merge(resource, &mut object, patch).map_err(|e| match e {
                        PatchError::BadRequest(m) => ApiError::bad_request(m),
                        PatchError::Internal(m) => ApiError::internal(m),
                    })?;
                }
            }
            PatchKind::Json => {
                json_patch(&mut object, patch).map_err(ApiError::invalid)?;
                if let Some(rv) = object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    && rv != current_rv
                {
                    return Err(ApiError::conflict(&resource.qualified_plural(), name));
                }
            }
        }
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(current_rv));
        }
        Ok(object)
    }

    /// Deletes an object and returns it (with the deletion's resourceVersion); one with
    /// finalizers is only marked terminating, and returned as it now is.
    pub(crate) fn delete(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Bytes, ApiError> {
        let mut inner = self.lock();
        let key = (resource, namespace.to_owned(), name.to_owned());
        if let Some(terminating) = self.mark_terminating(&mut inner, &key)? {
            return Ok(terminating);
        }
        let deleted = self.delete_locked(&mut inner, resource, namespace, name)?;
        self.collect_garbage(&mut inner, &deleted);
        if resource == Resource::Namespaces {
            let children: Vec<Key> = inner
                .objects
                .keys()
                .filter(|(r, ns, _)| r.namespaced() && ns == name)
                .cloned()
                .collect();
            for (r, ns, n) in children {
                let _ = self.delete_locked(&mut inner, r, &ns, &n);
            }
        }
        Ok(deleted)
    }

    fn delete_locked(
        &self,
        inner: &mut Inner,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Bytes, ApiError> {
        let key = (resource, namespace.to_owned(), name.to_owned());
        let stored = inner
            .objects
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(&resource.qualified_plural(), name))?;
        inner.rv += 1;
        let rv = inner.rv;
        if resource.is_rbac() {
            self.rbac_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let json = match serde_json::from_slice::<Value>(&stored.json) {
            Ok(mut v) => {
                if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
                }
                Bytes::from(v.to_string())
            }
            Err(_) => stored.json,
        };
        self.publish(
            inner,
            EventType::Deleted,
            resource,
            namespace,
            name,
            stored.labels,
            json.clone(),
        );
        Ok(json)
    }

    /// Sets `meta`'s `managedFields` for a write of `obj` (without its metadata) over
    /// `live`: what an update's manager took (`fields::update`), what an apply worked out,
    /// or, for the stand-in's own writes, what the object had.
    fn track(
        &self,
        resource: Resource,
        write: Write,
        live: Option<&Map<String, Value>>,
        obj: &Map<String, Value>,
        meta: &mut Map<String, Value>,
        track: Track<'_>,
    ) {
        let managed = match track {
            Track::Untracked => {
                let stored = live
                    .and_then(|l| l.get("metadata"))
                    .and_then(|m| m.get("managedFields"))
                    .cloned();
                match stored {
                    Some(stored) => meta.insert("managedFields".into(), stored),
                    None => meta.remove("managedFields"),
                };
                return;
            }
            Track::Applied(managed, _) => managed,
            Track::Update(By { manager, .. }) => {
                let scope = self.scope(resource, write);
                let live = live.map(|l| Value::Object(l.clone()));
                let mut new = obj.clone();
                new.insert("metadata".into(), Value::Object(meta.clone()));
                let mut new = Value::Object(new);
                let managed = Managed::of_write(live.as_ref(), &new, scope);
                if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("managedFields");
                }
                let writer = Writer { manager, scope };
                fields::update(resource, live.as_ref(), &new, managed, writer)
            }
        };
        match managed.encode() {
            Some(encoded) => meta.insert("managedFields".into(), encoded),
            None => meta.remove("managedFields"),
        };
    }

    /// The one write path: validates `object` against `resource`, records who set what
    /// (`track`), fills in server-owned metadata and defaults, stores it and publishes the
    /// event. [`Write::Status`] keeps the stored object and takes only `.status` (and the
    /// resourceVersion precondition) from `object`.
    // What is written, where, and by whom: each is needed.
    #[allow(clippy::too_many_arguments)]
    fn write_locked(
        &self,
        inner: &mut Inner,
        resource: Resource,
        namespace: &str,
        path_name: Option<&str>,
        object: Value,
        write: Write,
        track: Track<'_>,
    ) -> Result<Bytes, ApiError> {
        let dry_run = track.dry_run();
        let Value::Object(mut obj) = object else {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ));
        };
        check_type(resource, &obj)?;
        let mut meta = match obj.remove("metadata") {
            Some(Value::Object(m)) => m,
            None | Some(Value::Null) => Map::new(),
            Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
        };
        // Name.
        let body_name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        let name = match (path_name, body_name) {
            (Some(p), Some(b)) if p != b => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({b}) does not match the name on the URL ({p})"
                )));
            }
            (Some(p), _) => p.to_owned(),
            (None, Some(b)) => b,
            (None, None) => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    inner.seq += 1;
                    format!("{prefix}{}", short_suffix(self.seed ^ inner.seq))
                }
                _ => {
                    return Err(ApiError::invalid(format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        resource.kind()
                    )));
                }
            },
        };
        // RBAC objects take any path segment as a name (ValidateRBACName is
        // path.IsValidPathSegmentName), e.g. `system:discovery`.
        let valid = if resource.is_rbac() {
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%'])
        } else {
            dns_subdomain(&name)
        };
        if !valid {
            return Err(ApiError::invalid(format!(
                "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                resource.kind()
            )));
        }
        meta.insert("name".into(), Value::String(name.clone()));
        // Namespace.
        if resource.namespaced() {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
            if !inner.objects.contains_key(&(
                Resource::Namespaces,
                String::new(),
                namespace.to_owned(),
            )) {
                return Err(ApiError::not_found("namespaces", namespace));
            }
            meta.insert("namespace".into(), Value::String(namespace.to_owned()));
        } else {
            meta.remove("namespace");
        }
        let key = (resource, namespace.to_owned(), name.clone());
        let existing = inner.objects.get(&key);
        let existing_value: Option<Map<String, Value>> = match (write, existing) {
            (Write::Create, Some(_)) => {
                return Err(ApiError::already_exists(
                    &resource.qualified_plural(),
                    &name,
                ));
            }
            (Write::Replace | Write::Status, None) => {
                return Err(ApiError::not_found(&resource.qualified_plural(), &name));
            }
            (Write::Replace | Write::Status, Some(s)) => {
                match meta.get("resourceVersion").and_then(Value::as_str) {
                    Some(rv) if !rv.is_empty() && rv != s.rv.to_string() => {
                        return Err(ApiError::conflict(&resource.qualified_plural(), &name));
                    }
                    Some(rv) if !rv.is_empty() => {}
                    // Custom resources do not allow unconditional updates.
                    _ if resource.is_custom() => {
                        return Err(ApiError::invalid(format!(
                            "{}.{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                            resource.kind(),
                            resource.group()
                        )));
                    }
                    _ => {}
                }
                match serde_json::from_slice(&s.json) {
                    Ok(Value::Object(old)) => Some(old),
                    _ => return Err(ApiError::internal("stored object is not a JSON object")),
                }
            }
            (Write::Create, None) => None,
        };
        let old_meta = existing_value
            .as_ref()
            .and_then(|v| v.get("metadata"))
            .and_then(Value::as_object);
        let old_status = existing_value
            .as_ref()
            .and_then(|v| v.get("status"))
            .cloned();
        if write == Write::Status {
            // Only `.status` comes from the request; everything else stays as stored.
            let status = obj.remove("status");
            obj = existing_value.clone().unwrap_or_default();
            obj.remove("metadata");
            match status {
                Some(status) => obj.insert("status".into(), status),
                None => obj.remove("status"),
            };
            meta = old_meta.cloned().unwrap_or_default();
        } else {
            finalize::before_write(resource, &name, old_meta, &mut meta)?;
        }
        if write != Write::Status && self.status_subresource(resource) {
            // Writes to the object itself never change `.status`.
            match old_status.clone() {
                Some(status) => obj.insert("status".into(), status),
                None => obj.remove("status"),
            };
        }
        // Decoding (built-in kinds) or the CRD's pruning drops undeclared fields before
        // anything validates.
        let dropped = if crd::schema_of(resource).is_some() {
            crd::prune_and_validate(resource, &mut obj, &name, track.strict())?
        } else {
            decode::decode_object(resource, &mut obj, &mut meta, track.strict())?
        };
        if let Some(by) = track.by() {
            let mut warnings = by.warnings.lock().unwrap_or_else(|e| e.into_inner());
            warnings.extend(dropped.into_iter().map(|f| format!("unknown field {f:?}")));
        }
        if write != Write::Status {
            validate_meta(resource, &name, &meta)?;
        }
        self.track(
            resource,
            write,
            existing_value.as_ref(),
            &obj,
            &mut meta,
            track,
        );
        let uid = old_meta
            .and_then(|m| m.get("uid"))
            .cloned()
            .unwrap_or_else(|| {
                inner.seq += 1;
                Value::String(uid(self.seed, inner.seq))
            });
        let created = old_meta
            .and_then(|m| m.get("creationTimestamp"))
            .cloned()
            .unwrap_or_else(|| Value::String(clock::now_rfc3339()));
        if resource.is_custom() {
            // `metadata.generation` counts changes to anything but metadata
            // (apiextensions-apiserver's customresource `strategy.go`, `PrepareForUpdate`):
            // a write to the object without a status subresource changes `.status` too,
            // and counts; with one, `.status` was kept above, and writes to `…/status`
            // never count.
            let with_status = write != Write::Status;
            let old_generation = old_meta
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64);
            let generation = match (&existing_value, old_generation) {
                (Some(old), Some(g)) => {
                    if spec_part(old, with_status) == spec_part(&obj, with_status) {
                        g
                    } else {
                        g + 1
                    }
                }
                _ => 1,
            };
            meta.insert("generation".into(), Value::from(generation));
        }
        match resource {
            Resource::Services => {
                service_defaults(inner, &name, &mut obj, existing_value.as_ref())?;
            }
            Resource::Secrets if write != Write::Status => {
                secret_defaults(&name, &mut obj, existing_value.as_ref())?;
            }
            Resource::ConfigMaps => validate_config_map(&name, &obj, existing_value.as_ref())?,
            Resource::Deployments if write != Write::Status => {
                validate_deployment(&name, &obj, existing_value.as_ref())?;
            }
            Resource::Roles | Resource::ClusterRoles => validate_role(resource, &name, &obj)?,
            Resource::RoleBindings | Resource::ClusterRoleBindings => {
                binding_defaults(resource, &name, &mut obj, existing_value.as_ref())?;
            }
            _ => {}
        }
        // The version this write will have; taken below unless the write changes nothing.
        let rv = inner.rv + 1;
        meta.insert("uid".into(), uid);
        meta.insert("creationTimestamp".into(), created);
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        meta.remove("generateName");
        let labels: BTreeMap<String, String> = meta
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();

        // Status defaults.
        match resource {
            Resource::Namespaces => {
                obj.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
                obj.insert("status".into(), json!({"phase": "Active"}));
            }
            Resource::Pods => {
                // The "scheduler": every pod lands on the one node.
                if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.entry("nodeName")
                        .or_insert_with(|| Value::String(NODE_NAME.to_owned()));
                }
                let has_status = obj
                    .get("status")
                    .and_then(Value::as_object)
                    .is_some_and(|s| !s.is_empty());
                if !has_status {
                    let status = old_status.unwrap_or_else(|| {
                        pod_status(&obj, u8::try_from(rv % 250).unwrap_or(0) + 2)
                    });
                    obj.insert("status".into(), status);
                }
            }
            Resource::Services if !obj.get("status").is_some_and(Value::is_object) => {
                obj.insert("status".into(), json!({"loadBalancer": {}}));
            }
            Resource::PodDisruptionBudgets if !obj.get("status").is_some_and(Value::is_object) => {
                obj.insert(
                    "status".into(),
                    json!({"disruptionsAllowed": 0, "currentHealthy": 0,
                           "desiredHealthy": 0, "expectedPods": 0}),
                );
            }
            _ => {}
        }

        let finished = existing_value.is_some() && finalize::finished(&meta);
        let mut out = Map::new();
        out.insert("kind".into(), Value::String(resource.kind().into()));
        out.insert(
            "apiVersion".into(),
            Value::String(resource.api_version().into()),
        );
        out.insert("metadata".into(), Value::Object(meta));
        out.extend(
            obj.into_iter()
                .filter(|(k, _)| k != "kind" && k != "apiVersion"),
        );
        if !finished
            && let Some(old) = &existing_value
            && same_but_version(old, &out)
            && let Some(stored) = inner.objects.get(&key)
        {
            // etcd3's `GuaranteedUpdate` (staging/src/k8s.io/apiserver/pkg/storage/etcd3/
            // store.go): an update that changes nothing is not written. The object keeps
            // its resourceVersion, and watchers see no event.
            return Ok(stored.json.clone());
        }
        if dry_run {
            // `DryRunnableStorage` (staging/src/k8s.io/apiserver/pkg/registry/generic/
            // registry/dryrun.go): all but the storing. A created object has no
            // resourceVersion yet; an updated one keeps the stored one.
            let stored_rv = inner.objects.get(&key).map(|s| s.rv.to_string());
            if let Some(Value::Object(meta)) = out.get_mut("metadata") {
                match stored_rv {
                    Some(rv) => meta.insert("resourceVersion".into(), Value::String(rv)),
                    None => meta.remove("resourceVersion"),
                };
            }
            return serde_json::to_vec(&Value::Object(out))
                .map(Bytes::from)
                .map_err(|e| ApiError::internal(format!("serializing: {e}")));
        }
        inner.rv = rv;
        let json = Bytes::from(
            serde_json::to_vec(&Value::Object(out))
                .map_err(|e| ApiError::internal(format!("serializing: {e}")))?,
        );
        let kind = if finished {
            // `shouldDeleteDuringUpdate`: the write took the last finalizer away.
            inner.objects.remove(&key);
            EventType::Deleted
        } else {
            let replaced = inner.objects.insert(
                key,
                Stored {
                    json: json.clone(),
                    rv,
                    labels: labels.clone(),
                },
            );
            if replaced.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            }
        };
        if resource.is_rbac() {
            self.rbac_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.publish(
            inner,
            kind,
            resource,
            namespace,
            &name,
            labels,
            json.clone(),
        );
        if finished {
            self.collect_garbage(inner, &json);
        }
        Ok(json)
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        inner: &mut Inner,
        kind: EventType,
        resource: Resource,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        object: Bytes,
    ) {
        let event = Arc::new(Event {
            kind,
            resource,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels,
            rv: inner.rv,
            object,
            line: OnceLock::new(),
            table_line: OnceLock::new(),
        });
        inner.history.push_back(event.clone());
        while inner.history.len() > HISTORY_CAP {
            if let Some(old) = inner.history.pop_front() {
                inner.history_floor = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.events.send(event);
    }

    /// Starts a watch: what to replay, and a receiver for what comes next. Subscribing and
    /// snapshotting happen under one lock, so no event is missed or seen twice.
    pub(crate) fn watch(
        &self,
        resource: Resource,
        filter: &Filter,
        since: Since,
    ) -> Result<WatchStart, ApiError> {
        let inner = self.lock();
        let live = self.events.subscribe();
        match since {
            Since::Now => Ok(WatchStart {
                initial: Self::matching(&inner, resource, filter)
                    .map(|s| s.json.clone())
                    .collect(),
                replay: Vec::new(),
                live,
                rv: inner.rv,
            }),
            Since::Version(rv) => {
                if rv < inner.history_floor {
                    return Err(ApiError::expired(rv, inner.history_floor));
                }
                Ok(WatchStart {
                    initial: Vec::new(),
                    replay: inner
                        .history
                        .iter()
                        .filter(|e| e.rv > rv && filter.matches_event(resource, e))
                        .cloned()
                        .collect(),
                    live,
                    rv: inner.rv,
                })
            }
        }
    }
}

/// The flavour of a PATCH body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`, built-in kinds only (`store::strategic`).
    Strategic,
    /// `application/json-patch+json`.
    Json,
}

/// What a PUT or PATCH is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The object itself (`…/{name}`).
    Object,
    /// Its `status` subresource (`…/{name}/status`).
    Status,
}

impl Target {
    fn write(self) -> Write {
        match self {
            Target::Object => Write::Replace,
            Target::Status => Write::Status,
        }
    }
}

/// A client's write: who makes it, and whether it is only a dry run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct By<'a> {
    /// Its field manager (`fieldManager`, else the User-Agent's prefix).
    pub(crate) manager: &'a str,
    /// `dryRun=All`: checked, defaulted and answered as the write would be, never stored
    /// (the apiserver's `DryRunnableStorage`).
    pub(crate) dry_run: bool,
    /// `fieldValidation=Strict`: a field a custom resource's schema does not declare is
    /// refused instead of dropped.
    pub(crate) strict: bool,
    /// Where the write's warnings go (sent to the client as `Warning` headers): a field
    /// dropped because the schema does not declare it (`fieldValidation=Warn`, the default).
    pub(crate) warnings: &'a std::sync::Mutex<Vec<String>>,
}

/// What a write records in `metadata.managedFields`, and whether it is stored.
enum Track<'a> {
    /// The stand-in's own write (a seed, a controller it models): what the object had.
    Untracked,
    /// An update (create, replace, patch) by a client.
    Update(By<'a>),
    /// A server-side apply's result, worked out with its conflicts, by a client.
    Applied(Managed, By<'a>),
}

impl Track<'_> {
    fn by(&self) -> Option<&By<'_>> {
        match self {
            Track::Untracked => None,
            Track::Update(by) | Track::Applied(_, by) => Some(by),
        }
    }

    fn strict(&self) -> bool {
        self.by().is_some_and(|by| by.strict)
    }

    fn dry_run(&self) -> bool {
        self.by().is_some_and(|by| by.dry_run)
    }
}

/// What an apply configuration must be (`fieldmanager.go`, `structuredmerge.go`
/// `Apply`, `versioncheck.go`): typed, of the resource's version, without managedFields.
fn check_apply_config(resource: Resource, config: &Value) -> Result<(), ApiError> {
    for field in ["apiVersion", "kind"] {
        if config
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(format!(
                "{field} must be set in an apply configuration"
            )));
        }
    }
    let api_version = config["apiVersion"].as_str().unwrap_or("");
    if api_version != resource.api_version() {
        return Err(ApiError::bad_request(format!(
            "Incorrect version specified in apply patch. Specified patch version: {api_version}, expected: {}",
            resource.api_version()
        )));
    }
    if config
        .pointer("/metadata/managedFields")
        .is_some_and(|m| !m.is_null())
    {
        return Err(ApiError::bad_request("metadata.managedFields must be nil"));
    }
    Ok(())
}

/// What a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// POST: a new object.
    Create,
    /// PUT or PATCH of the object itself (its `.status` is kept if it has a status
    /// subresource).
    Replace,
    /// PUT or PATCH of the `status` subresource: only `.status` changes.
    Status,
}

/// Whether two objects are the same but for their resourceVersion.
fn same_but_version(old: &Map<String, Value>, new: &Map<String, Value>) -> bool {
    let without_version = |object: &Map<String, Value>| {
        let mut object = object.clone();
        if let Some(Value::Object(meta)) = object.get_mut("metadata") {
            meta.remove("resourceVersion");
        }
        object
    };
    old.len() == new.len() && without_version(old) == without_version(new)
}

/// Everything `metadata.generation` counts changes of: all but metadata and the type, and
/// `.status` only `with_status`.
fn spec_part(obj: &Map<String, Value>, with_status: bool) -> BTreeMap<&str, &Value> {
    obj.iter()
        .filter(|(k, _)| match k.as_str() {
            "metadata" | "kind" | "apiVersion" => false,
            "status" => with_status,
            _ => true,
        })
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

fn seed_pod(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
        },
    })
}

fn pod_status(pod: &Map<String, Value>, ip_octet: u8) -> Value {
    let now = clock::now_rfc3339();
    let containers: Vec<Value> = pod
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    json!({
                        "name": c.get("name").cloned().unwrap_or(Value::Null),
                        "image": c.get("image").cloned().unwrap_or(Value::Null),
                        "imageID": "",
                        "ready": true,
                        "restartCount": 0,
                        "started": true,
                        "state": {"running": {"startedAt": now}},
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "phase": "Running",
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        ],
        "hostIP": "10.0.0.10",
        "podIP": format!("10.244.0.{ip_octet}"),
        "podIPs": [{"ip": format!("10.244.0.{ip_octet}")}],
        "startTime": now,
        "containerStatuses": containers,
        "qosClass": "BestEffort",
    })
}

fn uid(seed: u64, seq: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (seed & 0xffff_ffff),
        (seed >> 32) & 0xffff,
        (seq >> 48) & 0xfff,
        (seq >> 36) & 0xfff,
        seq & 0xffff_ffff_ffff
    )
}

fn short_suffix(mut n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    n = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..5)
        .map(|_| {
            let c = ALPHABET[usize::try_from(n % 27).unwrap_or(0)];
            n /= 27;
            char::from(c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(b: &Bytes) -> Value {
        serde_json::from_slice(b).expect("json")
    }

    #[test]
    fn seeds_are_present_and_bulk_is_large() {
        let store = Store::seeded();
        let (_, pods) = store.list(
            Resource::Pods,
            &Filter::new(Some("default".into()), None, None).expect("filter"),
        );
        assert_eq!(pods.len(), 2);
        let (_, bulk) = store.list(
            Resource::ConfigMaps,
            &Filter::new(Some("bulk".into()), None, None).expect("filter"),
        );
        assert_eq!(bulk.len(), BULK_COUNT);
        let total: usize = bulk.iter().map(Bytes::len).sum();
        let last = value(&bulk[BULK_COUNT - 1]);
        assert_eq!(last["metadata"]["name"], "bulk-0549");
        assert_eq!(
            last["data"]["payload"].as_str().map(str::len),
            Some(BULK_VALUE_LEN)
        );
        assert!(total >= 55_000_000, "bulk total {total}");
        let (_, all) = store.list(Resource::ConfigMaps, &Filter::default());
        assert_eq!(all.len(), BULK_COUNT + 1);
    }

    #[test]
    fn a_dry_run_answers_and_stores_nothing() {
        let store = Store::seeded();
        let r = Resource::ConfigMaps;
        let warnings = std::sync::Mutex::new(Vec::new());
        let dry = By {
            manager: "kubectl-create",
            dry_run: true,
            strict: false,
            warnings: &warnings,
        };
        let before = store.resource_version();
        let mut watch = store
            .watch(r, &Filter::default(), Since::Now)
            .expect("watch");
        let object = json!({"metadata": {"name": "dry"}, "data": {"a": "b"}});
        let created = value(
            &store
                .create_by(r, "default", object, dry)
                .expect("dry create"),
        );
        assert!(created["metadata"]["uid"].is_string(), "{created}");
        assert!(
            created["metadata"].get("resourceVersion").is_none(),
            "{created}"
        );
        assert_eq!(
            created["metadata"]["managedFields"][0]["manager"],
            "kubectl-create"
        );
        assert_eq!(
            store.get(r, "default", "dry").expect_err("not stored").code,
            404
        );
        // Names are generated, still nothing stored; a new namespace gets no account.
        let generated = json!({"metadata": {"generateName": "dry-"}});
        let generated = value(&store.create_by(r, "default", generated, dry).expect("dry"));
        assert!(
            generated["metadata"]["name"]
                .as_str()
                .expect("name")
                .starts_with("dry-")
        );
        let ns = json!({"metadata": {"name": "dry-ns"}});
        store
            .create_by(Resource::Namespaces, "", ns, dry)
            .expect("dry namespace");
        let accounts = Filter::new(Some("dry-ns".into()), None, None).expect("filter");
        assert!(
            store
                .list(Resource::ServiceAccounts, &accounts)
                .1
                .is_empty()
        );

        let target = ("settings", Target::Object);
        let patch = json!({"data": {"mode": "dry"}});
        let patched = value(
            &store
                .patch_by(r, "default", target, (PatchKind::Merge, &patch), dry)
                .expect("dry patch"),
        );
        assert_eq!(patched["data"]["mode"], "dry");
        let stored = value(&store.get(r, "default", "settings").expect("settings"));
        assert_ne!(stored["data"]["mode"], "dry");
        assert_eq!(
            patched["metadata"]["resourceVersion"],
            stored["metadata"]["resourceVersion"]
        );
        let config = json!({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "settings"}, "data": {"mode": "applied"}});
        let (applied, _) = store
            .apply(r, "default", target, &config, (dry, true))
            .expect("dry apply");
        assert_eq!(value(&applied)["data"]["mode"], "applied");
        store
            .delete_dry_run(r, "default", "settings")
            .expect("dry delete");
        assert_eq!(
            value(&store.get(r, "default", "settings").expect("still there")),
            stored
        );
        assert_eq!(store.resource_version(), before);
        assert!(
            matches!(
                watch.live.try_recv(),
                Err(broadcast::error::TryRecvError::Empty)
            ),
            "a dry run published an event"
        );
    }

    #[test]
    fn create_conflicts_and_stale_replace() {
        let store = Store::seeded();
        let cm = json!({"metadata": {"name": "a"}, "data": {"k": "v"}});
        let created = value(
            &store
                .create(Resource::ConfigMaps, "default", cm.clone())
                .expect("create"),
        );
        let err = store
            .create(Resource::ConfigMaps, "default", cm)
            .expect_err("duplicate");
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
        let mut stale = created.clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        let err = store
            .replace(Resource::ConfigMaps, "default", "a", Target::Object, stale)
            .expect_err("stale");
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        // A replace that changes nothing is not written: same version, no event.
        let rv = store.resource_version();
        let same = value(
            &store
                .replace(
                    Resource::ConfigMaps,
                    "default",
                    "a",
                    Target::Object,
                    created.clone(),
                )
                .expect("replace"),
        );
        assert_eq!(same, created);
        assert_eq!(store.resource_version(), rv);
        let mut changed = created.clone();
        changed["data"]["k"] = json!("v2");
        let replaced = value(
            &store
                .replace(
                    Resource::ConfigMaps,
                    "default",
                    "a",
                    Target::Object,
                    changed,
                )
                .expect("replace"),
        );
        assert_eq!(replaced["metadata"]["uid"], created["metadata"]["uid"]);
        assert_ne!(
            replaced["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        let err = store
            .create(
                Resource::ConfigMaps,
                "nope",
                json!({"metadata": {"name": "x"}}),
            )
            .expect_err("missing namespace");
        assert_eq!(err.code, 404);
    }

    #[test]
    fn patch_merges_and_drops_directives() {
        let store = Store::seeded();
        let patched = value(
            &store
                .patch(
                    Resource::Pods,
                    "default",
                    "web-0",
                    Target::Object,
                    PatchKind::Merge,
                    &json!({"metadata": {"labels": {"tier": "front", "app": null}},
                            "$setElementOrder/containers": [{"name": "app"}]}),
                )
                .expect("patch"),
        );
        assert_eq!(patched["metadata"]["labels"], json!({"tier": "front"}));
        assert!(patched.get("$setElementOrder/containers").is_none());
        assert_eq!(patched["status"]["phase"], "Running");
    }

    #[test]
    fn immutable_values_and_a_deployments_selector_stay_as_written() {
        let store = Store::seeded();
        let patch = |r: Resource, name: &str, p: Value| {
            store.patch(r, "default", name, Target::Object, PatchKind::Merge, &p)
        };
        let refused = |result: Result<Bytes, ApiError>| {
            let err = result.expect_err("refused");
            assert_eq!(err.code, 422, "{}", err.message);
            err.message
        };
        let forbidden = "Forbidden: field is immutable when `immutable` is set";
        store
            .create(
                Resource::ConfigMaps,
                "default",
                json!({"metadata": {"name": "c"}, "data": {"k": "v"}, "immutable": true}),
            )
            .expect("create");
        let message = refused(patch(
            Resource::ConfigMaps,
            "c",
            json!({"data": {"k": "w"}}),
        ));
        assert!(
            message.ends_with(&format!("data: {forbidden}")),
            "{message}"
        );
        let message = refused(patch(
            Resource::ConfigMaps,
            "c",
            json!({"immutable": false}),
        ));
        assert!(
            message.ends_with(&format!("immutable: {forbidden}")),
            "{message}"
        );
        patch(
            Resource::ConfigMaps,
            "c",
            json!({"metadata": {"labels": {"a": "b"}}}),
        )
        .expect("metadata may change");

        store
            .create(
                Resource::Secrets,
                "default",
                json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}, "immutable": true}),
            )
            .expect("create");
        let message = refused(patch(
            Resource::Secrets,
            "s",
            json!({"stringData": {"k": "w"}}),
        ));
        assert!(
            message.ends_with(&format!("data: {forbidden}")),
            "{message}"
        );
        patch(Resource::Secrets, "s", json!({"stringData": {"k": "v"}}))
            .expect("the same value is no change");

        let labels = json!({"app": "a"});
        store
            .create(
                Resource::Deployments,
                "default",
                json!({"metadata": {"name": "d"}, "spec": {
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "a", "image": "a"}]}}}}),
            )
            .expect("create");
        let message = refused(patch(
            Resource::Deployments,
            "d",
            json!({"spec": {"selector": {"matchLabels": {"app": "b"}},
                "template": {"metadata": {"labels": {"app": "b"}}}}}),
        ));
        assert!(
            message.ends_with(
                r#"spec.selector: Invalid value: {"matchLabels":{"app":"b"}}: field is immutable"#
            ),
            "{message}"
        );
        // The template's labels must match the selector, which may not be empty.
        let message = refused(patch(
            Resource::Deployments,
            "d",
            json!({"spec": {"template": {"metadata": {"labels": {"app": "z"}}}}}),
        ));
        assert!(
            message.ends_with(
                r#"spec.template.metadata.labels: Invalid value: {"app":"z"}: `selector` does not match template `labels`"#
            ),
            "{message}"
        );
        let empty = store.create(
            Resource::Deployments,
            "default",
            json!({"metadata": {"name": "e"}, "spec": {"selector": {},
                "template": {"spec": {"containers": [{"name": "a", "image": "a"}]}}}}),
        );
        let message = refused(empty);
        assert!(
            message.ends_with(
                "spec.selector: Invalid value: {}: empty selector is invalid for deployment"
            ),
            "{message}"
        );
        let expressions = json!({"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["a", "b"]},
            {"key": "tier", "operator": "DoesNotExist"}]});
        store
            .create(
                Resource::Deployments,
                "default",
                json!({"metadata": {"name": "x"}, "spec": {"selector": expressions,
                    "template": {"metadata": {"labels": {"app": "b"}},
                        "spec": {"containers": [{"name": "a", "image": "a"}]}}}}),
            )
            .expect("matched by its expressions");
        patch(Resource::Deployments, "d", json!({"spec": {"replicas": 3}}))
            .expect("the rest of the spec may change");
    }

    #[test]
    fn json_patch_operations() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "move", "from": "/c", "path": "/d"},
                {"op": "remove", "path": "/a/b/0"},
                {"op": "add", "path": "/e~1f", "value": true},
                {"op": "test", "path": "/d", "value": "y"},
            ]),
        )
        .expect("patch applies");
        assert_eq!(doc, json!({"a": {"b": [2, 3]}, "d": "y", "e/f": true}));
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/zz"}])).is_err());
    }

    #[test]
    fn watch_replays_history_after_a_version() {
        let store = Store::seeded();
        let start = store.resource_version();
        let _ = store
            .create(
                Resource::ConfigMaps,
                "default",
                json!({"metadata": {"name": "w1"}}),
            )
            .expect("create");
        let _ = store
            .delete(Resource::ConfigMaps, "default", "w1")
            .expect("delete");
        let filter = Filter::new(Some("default".into()), None, None).expect("filter");
        let w = store
            .watch(Resource::ConfigMaps, &filter, Since::Version(start))
            .expect("watch");
        let kinds: Vec<_> = w.replay.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventType::Added, EventType::Deleted]);
        let err = store
            .watch(Resource::ConfigMaps, &filter, Since::Version(5))
            .err()
            .expect("too old");
        assert_eq!(err.code, 410);
        let by_name = Filter::new(None, Some("metadata.name=web-1"), None).expect("filter");
        let w = store
            .watch(Resource::Pods, &by_name, Since::Now)
            .expect("watch");
        assert_eq!(w.initial.len(), 1);
    }

    #[test]
    fn label_selectors() {
        let store = Store::seeded();
        let f = Filter::new(None, None, Some("app=web")).expect("filter");
        assert_eq!(store.list(Resource::Pods, &f).1.len(), 2);
        let f = Filter::new(None, None, Some("app in (db, cache)")).expect("filter");
        assert_eq!(store.list(Resource::Pods, &f).1.len(), 0);
        let f = Filter::new(None, None, Some("!app")).expect("filter");
        assert_eq!(store.list(Resource::Pods, &f).1.len(), 0);
    }

    fn cluster(name: &str, connection: &str) -> Value {
        json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1",
            "kind": "Cluster",
            "metadata": {"name": name},
            "spec": {"connection": {"type": connection, "token": "t0k3n"}},
        })
    }

    fn service(name: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"type": "LoadBalancer", "selector": {"app": name},
                     "ports": [{"name": "https", "port": 443}]},
        })
    }

    #[test]
    fn service_defaults_and_allocations() {
        let store = Store::seeded();
        let svc = value(
            &store
                .create(Resource::Services, "default", service("tower"))
                .expect("create"),
        );
        let ip = svc["spec"]["clusterIP"].as_str().expect("cluster IP");
        assert!(ip.starts_with("10.96."), "{ip}");
        assert_eq!(svc["spec"]["clusterIPs"], json!([ip]));
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 443);
        let node_port = svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("node port");
        assert!((30000..=32767).contains(&node_port));
        assert_eq!(svc["status"], json!({"loadBalancer": {}}));

        let plain = value(
            &store
                .create(
                    Resource::Services,
                    "default",
                    json!({"metadata": {"name": "plain"}, "spec": {"ports": [{"port": 80}]},
                           "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}),
                )
                .expect("create"),
        );
        assert_eq!(plain["spec"]["type"], "ClusterIP");
        assert_ne!(
            plain["spec"]["clusterIP"], ip,
            "each service gets its own IP"
        );
        assert!(plain["spec"]["ports"][0].get("nodePort").is_none());
        // Like the apiserver: status in a create is dropped.
        assert_eq!(plain["status"], json!({"loadBalancer": {}}));

        // A replace without the allocated fields keeps them; changing the IP is refused.
        let mut replacement = service("tower");
        replacement["spec"]["ports"][0]["port"] = json!(443);
        let replaced = value(
            &store
                .replace(
                    Resource::Services,
                    "default",
                    "tower",
                    Target::Object,
                    replacement.clone(),
                )
                .expect("replace"),
        );
        assert_eq!(replaced["spec"]["clusterIP"], ip);
        assert_eq!(replaced["spec"]["ports"][0]["nodePort"], node_port);
        replacement["spec"]["clusterIP"] = json!("10.96.200.200");
        let err = store
            .replace(
                Resource::Services,
                "default",
                "tower",
                Target::Object,
                replacement,
            )
            .expect_err("immutable");
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        let err = store
            .create(
                Resource::Services,
                "default",
                json!({"metadata": {"name": "odd"}, "spec": {"type": "Weird"}}),
            )
            .expect_err("bad type");
        assert_eq!(err.code, 422);
    }

    #[test]
    fn status_subresource_is_the_only_way_to_change_status() {
        let store = Store::seeded();
        let created = value(
            &store
                .create(Resource::Services, "default", service("tower"))
                .expect("create"),
        );
        let ingress = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}});

        // A status write changes only the status, whatever else the body says.
        let mut body = created.clone();
        body["status"] = ingress.clone();
        body["spec"]["ports"][0]["port"] = json!(8443);
        body["metadata"]["labels"] = json!({"sneaky": "yes"});
        let after_status = value(
            &store
                .replace(Resource::Services, "default", "tower", Target::Status, body)
                .expect("status write"),
        );
        assert_eq!(after_status["status"], ingress);
        assert_eq!(after_status["spec"], created["spec"]);
        assert!(after_status["metadata"].get("labels").is_none());
        assert_ne!(
            after_status["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );

        // A main-object write keeps the stored status, even if it sends another one.
        let mut body = after_status.clone();
        body["status"] = json!({"loadBalancer": {}});
        body["metadata"]["labels"] = json!({"app": "tower"});
        let after_main = value(
            &store
                .replace(Resource::Services, "default", "tower", Target::Object, body)
                .expect("main write"),
        );
        assert_eq!(after_main["status"], ingress);
        assert_eq!(after_main["metadata"]["labels"], json!({"app": "tower"}));
        let patched = value(
            &store
                .patch(
                    Resource::Services,
                    "default",
                    "tower",
                    Target::Object,
                    PatchKind::Merge,
                    &json!({"status": null, "metadata": {"annotations": {"a": "b"}}}),
                )
                .expect("main patch"),
        );
        assert_eq!(patched["status"], ingress);
        assert_eq!(patched["metadata"]["annotations"]["a"], "b");

        // A status patch changes only the status.
        let patched = value(
            &store
                .patch(
                    Resource::Services,
                    "default",
                    "tower",
                    Target::Status,
                    PatchKind::Merge,
                    &json!({"status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}]}},
                            "spec": {"type": "ClusterIP"}}),
                )
                .expect("status patch"),
        );
        assert_eq!(
            patched["status"]["loadBalancer"]["ingress"],
            json!([{"hostname": "lb.example"}])
        );
        assert_eq!(patched["spec"]["type"], "LoadBalancer");
        let err = store
            .replace(
                Resource::Services,
                "default",
                "nope",
                Target::Status,
                json!({}),
            )
            .expect_err("missing");
        assert_eq!(err.code, 404);
    }

    #[test]
    fn users_are_written_as_kubesphere_s_crd_has_them() {
        let store = Store::seeded();
        let user = |spec: Value| {
            json!({"apiVersion": "iam.kubesphere.io/v1alpha2", "kind": "User",
                   "metadata": {"name": "alice"}, "spec": spec,
                   "status": {"state": "Disabled"}})
        };
        let err = store
            .create(Resource::Users, "", user(json!({"groups": ["devs"]})))
            .expect_err("no email");
        assert_eq!(err.code, 422, "{}", err.message);
        let created = value(
            &store
                .create(
                    Resource::Users,
                    "",
                    user(json!({"email": "alice@example.com", "groups": ["devs"], "x": 1})),
                )
                .expect("create"),
        );
        assert_eq!(
            created["spec"],
            json!({"email": "alice@example.com", "groups": ["devs"]})
        );
        // No status subresource: the object's own writes carry its state.
        assert_eq!(created["status"]["state"], "Disabled");
    }

    #[test]
    fn clusters_are_custom_resources_pruned_to_their_schema() {
        let store = Store::seeded();
        let mut body = cluster("member-1", "proxy");
        body["spec"]["connection"]["kubernetesAPIEndpoint"] = json!("https://10.0.0.1:6443");
        body["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
        let created = value(
            &store
                .create(Resource::Clusters, "", body.clone())
                .expect("create"),
        );
        assert_eq!(created["apiVersion"], "cluster.kubesphere.io/v1alpha1");
        assert_eq!(created["kind"], "Cluster");
        assert_eq!(created["spec"], body["spec"]);
        // A field the CRD's schema does not declare is dropped (`store::crd`).
        let mut extra = body.clone();
        extra["metadata"]["name"] = json!("member-9");
        extra["spec"]["anything"] = json!({"nested": [1, 2, 3]});
        let pruned = value(&store.create(Resource::Clusters, "", extra).expect("create"));
        assert_eq!(pruned["spec"], body["spec"]);
        assert!(created["metadata"].get("namespace").is_none());
        assert_eq!(created["metadata"]["generation"], 1);
        assert!(
            created.get("status").is_none(),
            "status on create is dropped"
        );

        let wrong = json!({"apiVersion": "v1", "kind": "Cluster", "metadata": {"name": "x"}});
        let err = store
            .create(Resource::Clusters, "", wrong)
            .expect_err("wrong apiVersion");
        assert_eq!(err.code, 400);
        assert!(
            err.message.contains("cluster.kubesphere.io/v1alpha1"),
            "{}",
            err.message
        );
        let err = store
            .create(Resource::Clusters, "", cluster("member-1", "direct"))
            .expect_err("duplicate");
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
        assert_eq!(
            err.message,
            "clusters.cluster.kubesphere.io \"member-1\" already exists"
        );

        // Status through the subresource; generation counts spec changes only.
        let mut status_body = created.clone();
        status_body["status"] =
            json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Connected"}]});
        let with_status = value(
            &store
                .replace(
                    Resource::Clusters,
                    "",
                    "member-1",
                    Target::Status,
                    status_body,
                )
                .expect("status"),
        );
        assert_eq!(
            with_status["status"]["conditions"][0]["reason"],
            "Connected"
        );
        assert_eq!(with_status["metadata"]["generation"], 1);
        let respec = value(
            &store
                .patch(
                    Resource::Clusters,
                    "",
                    "member-1",
                    Target::Object,
                    PatchKind::Merge,
                    &json!({"spec": {"connection": {"type": "direct"}}, "status": {"conditions": []}}),
                )
                .expect("patch"),
        );
        assert_eq!(respec["spec"]["connection"]["type"], "direct");
        assert_eq!(respec["spec"]["connection"]["token"], "t0k3n");
        assert_eq!(respec["status"], with_status["status"]);
        assert_eq!(respec["metadata"]["generation"], 2);
        let relabelled = value(
            &store
                .patch(
                    Resource::Clusters,
                    "",
                    "member-1",
                    Target::Object,
                    PatchKind::Json,
                    &json!([{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]),
                )
                .expect("json patch"),
        );
        assert_eq!(relabelled["metadata"]["generation"], 2);

        // Without a status subresource (KubeSphere's CRD) the status is written with the
        // object, and counts.
        store.set_cluster_status_subresource(false);
        let restatus = value(
            &store
                .patch(
                    Resource::Clusters,
                    "",
                    "member-1",
                    Target::Object,
                    PatchKind::Merge,
                    &json!({"status": {"conditions": []}}),
                )
                .expect("patch"),
        );
        assert_eq!(restatus["status"]["conditions"], json!([]));
        assert_eq!(restatus["metadata"]["generation"], 3);
    }

    #[test]
    fn cluster_updates_need_a_current_resource_version() {
        let store = Store::seeded();
        let created = value(
            &store
                .create(Resource::Clusters, "", cluster("member-2", "proxy"))
                .expect("create"),
        );
        let rv = created["metadata"]["resourceVersion"].clone();
        let mut update = created.clone();
        update["spec"]["connection"]["type"] = json!("direct");
        let updated = value(
            &store
                .replace(
                    Resource::Clusters,
                    "",
                    "member-2",
                    Target::Object,
                    update.clone(),
                )
                .expect("replace at the current version"),
        );
        assert_ne!(updated["metadata"]["resourceVersion"], rv);

        // The same body again carries the old version now.
        for target in [Target::Object, Target::Status] {
            let err = store
                .replace(Resource::Clusters, "", "member-2", target, update.clone())
                .expect_err("stale");
            assert_eq!((err.code, err.reason), (409, "Conflict"), "{target:?}");
            assert!(
                err.message
                    .contains("clusters.cluster.kubesphere.io \"member-2\"")
            );
        }
        let err = store
            .patch(
                Resource::Clusters,
                "",
                "member-2",
                Target::Status,
                PatchKind::Merge,
                &json!({"metadata": {"resourceVersion": rv}, "status": {"x": 1}}),
            )
            .expect_err("stale patch");
        assert_eq!(err.code, 409);
        // Custom resources refuse unconditional updates; patches need no version.
        let mut unconditional = update;
        unconditional["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("resourceVersion");
        let err = store
            .replace(
                Resource::Clusters,
                "",
                "member-2",
                Target::Object,
                unconditional,
            )
            .expect_err("no resourceVersion");
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        store
            .patch(
                Resource::Clusters,
                "",
                "member-2",
                Target::Status,
                PatchKind::Merge,
                &json!({"status": {"x": 1}}),
            )
            .expect("unconditional patch");
    }

    #[test]
    fn cluster_watches_see_their_events_only() {
        let store = Store::seeded();
        let start = store.resource_version();
        let all = Filter::new(None, None, None).expect("filter");
        let mut live = store
            .watch(Resource::Clusters, &all, Since::Now)
            .expect("watch");
        assert!(live.initial.is_empty(), "no clusters are seeded");
        let created = value(
            &store
                .create(Resource::Clusters, "", cluster("member-3", "proxy"))
                .expect("create"),
        );
        let _ = store
            .create(
                Resource::ConfigMaps,
                "default",
                json!({"metadata": {"name": "noise"}}),
            )
            .expect("create");
        let _ = store
            .patch(
                Resource::Clusters,
                "",
                "member-3",
                Target::Status,
                PatchKind::Merge,
                &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            )
            .expect("status");
        let _ = store
            .delete(Resource::Clusters, "", "member-3")
            .expect("delete");

        let replay = store
            .watch(Resource::Clusters, &all, Since::Version(start))
            .expect("watch");
        let kinds: Vec<_> = replay.replay.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventType::Added, EventType::Modified, EventType::Deleted]
        );
        let modified: Value = serde_json::from_slice(&replay.replay[1].object).expect("json");
        assert_eq!(modified["status"]["conditions"][0]["type"], "Ready");
        assert_eq!(modified["apiVersion"], "cluster.kubesphere.io/v1alpha1");
        assert!(replay.replay.iter().all(|e| e.namespace.is_empty()));

        // The live receiver sees the same cluster events among the rest.
        let mut seen = Vec::new();
        while let Ok(event) = live.live.try_recv() {
            if all.matches_event(Resource::Clusters, &event) {
                seen.push((event.kind, event.name.clone()));
            }
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], (EventType::Added, "member-3".to_owned()));
        assert_eq!(created["metadata"]["name"], "member-3");
    }
}
