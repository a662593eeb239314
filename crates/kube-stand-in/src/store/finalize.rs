//! Finalizers, as kube-apiserver's generic registry keeps them (kubernetes/kubernetes):
//! - `staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go`, `Delete` →
//!   `updateForGracefulDeletionAndFinalizers`: a DELETE of an object with finalizers only
//!   sets `metadata.deletionTimestamp` (and `deletionGracePeriodSeconds: 0`); the object
//!   stays, terminating, and watchers see it MODIFIED. Deleting it again changes nothing.
//! - `staging/src/k8s.io/apiserver/pkg/registry/rest/create.go` `BeforeCreate` and
//!   `rest/update.go` `BeforeUpdate`: a create never carries a deletion timestamp; an
//!   update can never remove or change one.
//! - `staging/src/k8s.io/apimachinery/pkg/api/validation/objectmeta.go`
//!   `ValidateNoNewFinalizers`: no finalizer may be added to a terminating object.
//! - `store.go` `Update` → `shouldDeleteDuringUpdate` → `deleteWithoutFinalizers`: the
//!   update that leaves a terminating object without finalizers deletes it (watchers see
//!   DELETED, and the garbage collector takes its dependents).
//!
//! Not modelled: finalizer name validation; the garbage collector's own
//! `foregroundDeletion` and `orphan` finalizers; and finalizers on the objects the
//! namespace controller and the garbage collector delete (they go at once here, where the
//! real controllers' DELETEs would leave them terminating).

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{EventType, Inner, Key, Resource, Store};
use crate::clock;
use crate::status::ApiError;

const DELETION_TIMESTAMP: &str = "deletionTimestamp";
const GRACE_PERIOD: &str = "deletionGracePeriodSeconds";

/// The object's finalizers (none when the field is absent or null).
fn finalizers(meta: &Map<String, Value>) -> Vec<&str> {
    meta.get("finalizers")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn terminating(meta: &Map<String, Value>) -> bool {
    meta.get(DELETION_TIMESTAMP).is_some_and(|t| !t.is_null())
}

/// Whether an object with this metadata is terminating and has no finalizer left: the
/// write that made it so deletes it.
pub(super) fn finished(meta: &Map<String, Value>) -> bool {
    terminating(meta) && finalizers(meta).is_empty()
}

/// What `BeforeCreate` and `BeforeUpdate` do to the deletion fields of a create (`old` is
/// `None`) or an update, and `ValidateNoNewFinalizers`.
pub(super) fn before_write(
    resource: Resource,
    name: &str,
    old: Option<&Map<String, Value>>,
    meta: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let Some(old) = old else {
        meta.remove(DELETION_TIMESTAMP);
        meta.remove(GRACE_PERIOD);
        return Ok(());
    };
    if !terminating(old) {
        // Set only by a DELETE.
        meta.remove(DELETION_TIMESTAMP);
        meta.remove(GRACE_PERIOD);
        return Ok(());
    }
    for field in [DELETION_TIMESTAMP, GRACE_PERIOD] {
        if let Some(value) = old.get(field) {
            meta.insert(field.into(), value.clone());
        }
    }
    let had = finalizers(old);
    let added: Vec<&str> = finalizers(meta)
        .into_iter()
        .filter(|f| !had.contains(f))
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    let kind = if resource.group().is_empty() {
        resource.kind().to_owned()
    } else {
        format!("{}.{}", resource.kind(), resource.group())
    };
    // Go's `%#v` of a []string.
    let found = added
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ApiError::invalid(format!(
        "{kind} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{found}}}"
    )))
}

impl Store {
    /// What a delete would answer without deleting (`dryRun=All`): the object, marked
    /// terminating when finalizers hold it.
    pub(crate) fn delete_dry_run(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Bytes, ApiError> {
        let key = (resource, namespace.to_owned(), name.to_owned());
        let (mut object, _) = Self::stored(&self.lock(), &key)?;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut)
            && !finalizers(meta).is_empty()
            && !terminating(meta)
        {
            meta.insert(
                DELETION_TIMESTAMP.into(),
                Value::String(clock::now_rfc3339()),
            );
            meta.insert(GRACE_PERIOD.into(), Value::from(0));
        }
        Ok(Bytes::from(object.to_string()))
    }

    /// A DELETE of the object at `key`: if it has finalizers it is marked terminating (once)
    /// and returned, `Some`; without finalizers, `None`, and the caller deletes it.
    pub(super) fn mark_terminating(
        &self,
        inner: &mut Inner,
        key: &Key,
    ) -> Result<Option<Bytes>, ApiError> {
        let (resource, namespace, name) = key;
        let (mut object, stored) = Self::stored(inner, key)?;
        let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
            return Ok(None);
        };
        if finalizers(meta).is_empty() {
            return Ok(None);
        }
        if terminating(meta) {
            return Ok(Some(stored.json.clone()));
        }
        let labels = stored.labels.clone();
        inner.rv += 1;
        let rv = inner.rv;
        meta.insert(
            DELETION_TIMESTAMP.into(),
            Value::String(clock::now_rfc3339()),
        );
        meta.insert(GRACE_PERIOD.into(), Value::from(0));
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        let json = Bytes::from(object.to_string());
        inner.objects.insert(
            key.clone(),
            super::Stored {
                json: json.clone(),
                rv,
                labels: labels.clone(),
            },
        );
        self.publish(
            inner,
            EventType::Modified,
            *resource,
            namespace,
            name,
            labels,
            json.clone(),
        );
        Ok(Some(json))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::super::{Filter, Since, Target};
    use super::*;

    fn cluster(finalizers: &[&str]) -> Value {
        json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1",
            "kind": "Cluster",
            "metadata": {"name": "member-1", "finalizers": finalizers},
            "spec": {"connection": {"type": "proxy"}},
        })
    }

    fn value(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn get(store: &Store) -> Option<Value> {
        store
            .get(Resource::Clusters, "", "member-1")
            .ok()
            .map(|b| value(&b))
    }

    #[test]
    fn a_finalizer_keeps_a_deleted_object_until_it_is_removed() {
        let store = Store::seeded();
        store
            .create(
                Resource::Clusters,
                "",
                cluster(&["finalizer.cluster.kubesphere.io"]),
            )
            .unwrap();
        let since = store.resource_version();

        let answer = value(&store.delete(Resource::Clusters, "", "member-1").unwrap());
        let stamp = answer["metadata"]["deletionTimestamp"].clone();
        assert!(stamp.is_string(), "{answer}");
        assert_eq!(answer["metadata"]["deletionGracePeriodSeconds"], 0);
        let kept = get(&store).expect("still there, terminating");
        assert_eq!(kept["metadata"]["deletionTimestamp"], stamp);

        // Deleting again changes nothing.
        let rv = store.resource_version();
        store.delete(Resource::Clusters, "", "member-1").unwrap();
        assert_eq!(store.resource_version(), rv);

        // An update cannot take the timestamp away (this one, with it put back, changes
        // nothing and is not written), nor add a finalizer.
        let mut stale = cluster(&["finalizer.cluster.kubesphere.io"]);
        stale["metadata"]["resourceVersion"] = kept["metadata"]["resourceVersion"].clone();
        let updated = value(
            &store
                .replace(Resource::Clusters, "", "member-1", Target::Object, stale)
                .unwrap(),
        );
        assert_eq!(updated["metadata"]["deletionTimestamp"], stamp);
        assert_eq!(store.resource_version(), rv);
        let mut more = updated.clone();
        more["metadata"]["finalizers"] = json!(["finalizer.cluster.kubesphere.io", "x.io/y"]);
        let refused = store
            .replace(Resource::Clusters, "", "member-1", Target::Object, more)
            .unwrap_err();
        assert_eq!(refused.code, 422);
        assert!(
            refused.message.contains(
                "no new finalizers can be added if the object is being deleted, found new finalizers []string{\"x.io/y\"}"
            ),
            "{}",
            refused.message
        );

        // The write that removes the last finalizer deletes it.
        store
            .patch(
                Resource::Clusters,
                "",
                "member-1",
                Target::Object,
                super::super::PatchKind::Merge,
                &json!({"metadata": {"finalizers": null}}),
            )
            .unwrap();
        assert!(get(&store).is_none());

        let kinds: Vec<EventType> = store
            .watch(
                Resource::Clusters,
                &Filter::default(),
                Since::Version(since),
            )
            .unwrap()
            .replay
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, [EventType::Modified, EventType::Deleted]);
    }

    #[test]
    fn without_finalizers_a_delete_is_at_once_and_a_create_carries_no_deletion() {
        let store = Store::seeded();
        let mut object = cluster(&[]);
        object["metadata"]["deletionTimestamp"] = json!("2020-01-01T00:00:00Z");
        let created = value(&store.create(Resource::Clusters, "", object).unwrap());
        assert!(created["metadata"].get("deletionTimestamp").is_none());
        store.delete(Resource::Clusters, "", "member-1").unwrap();
        assert!(get(&store).is_none());
    }
}
