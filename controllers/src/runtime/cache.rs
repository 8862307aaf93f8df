//! The per-kind cache (a reflector, after kube-runtime's `Store`): every object of a controller's
//! kind, decoded and validated once when it enters, fed by a list at start and on every resync and
//! by the bus events of the kind. Reconcile reads its object from here instead of fetching by name,
//! and the runtime keeps it current with the objects its own status writes return.

use super::reconciler::{ObjectStatus, Resource};
use berth_api_types::typed::recheck;
use berth_api_types::{DynObject, ObjectMeta};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// One object as the controller sees it.
pub struct Cached<R: Resource> {
    pub meta: ObjectMeta,
    /// The typed, validated object.
    pub object: Arc<R::Object>,
    /// The status as stored (the kind's default when it has none or it does not decode).
    pub status: R::Status,
}

impl<R: Resource> Cached<R> {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn generation(&self) -> u64 {
        self.meta.generation
    }
}

/// An object the controller cannot act on: it does not decode or validate.
pub struct Invalid<R: Resource> {
    pub meta: ObjectMeta,
    pub status: R::Status,
    /// Every problem, in one line, for the status condition.
    pub why: String,
}

pub enum Entry<R: Resource> {
    Valid(Arc<Cached<R>>),
    Invalid(Arc<Invalid<R>>),
}

impl<R: Resource> Clone for Entry<R> {
    fn clone(&self) -> Self {
        match self {
            Entry::Valid(c) => Entry::Valid(c.clone()),
            Entry::Invalid(i) => Entry::Invalid(i.clone()),
        }
    }
}

impl<R: Resource> Entry<R> {
    /// Decodes and validates a stored object.
    pub fn decode(obj: DynObject) -> Self {
        let status: R::Status = serde_json::from_value(obj.status.clone()).unwrap_or_default();
        match recheck::<R::Object>(&obj, R::validate) {
            Ok(object) => Entry::Valid(Arc::new(Cached {
                meta: obj.metadata,
                object: Arc::new(object),
                status,
            })),
            Err(why) => Entry::Invalid(Arc::new(Invalid {
                meta: obj.metadata,
                status,
                why,
            })),
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Entry::Valid(c) => &c.meta,
            Entry::Invalid(i) => &i.meta,
        }
    }

    pub fn status(&self) -> &R::Status {
        match self {
            Entry::Valid(c) => &c.status,
            Entry::Invalid(i) => &i.status,
        }
    }
}

/// The cache itself; clones share one map.
pub struct Cache<R: Resource> {
    map: Arc<RwLock<BTreeMap<String, Entry<R>>>>,
}

impl<R: Resource> Clone for Cache<R> {
    fn clone(&self) -> Self {
        Cache {
            map: self.map.clone(),
        }
    }
}

impl<R: Resource> Default for Cache<R> {
    fn default() -> Self {
        Cache {
            map: Arc::default(),
        }
    }
}

impl<R: Resource> Cache<R> {
    pub fn get(&self, name: &str) -> Option<Entry<R>> {
        self.read().get(name).cloned()
    }

    /// The valid object `name`, if there is one.
    pub fn valid(&self, name: &str) -> Option<Arc<Cached<R>>> {
        match self.get(name)? {
            Entry::Valid(c) => Some(c),
            Entry::Invalid(_) => None,
        }
    }

    /// Every entry, by name.
    pub fn entries(&self) -> Vec<Entry<R>> {
        self.read().values().cloned().collect()
    }

    /// Every valid object, by name.
    pub fn objects(&self) -> Vec<Arc<Cached<R>>> {
        self.read()
            .values()
            .filter_map(|e| match e {
                Entry::Valid(c) => Some(c.clone()),
                Entry::Invalid(_) => None,
            })
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Takes what the API returned for `name` (`None`: it is gone), unless the cache already holds
    /// a newer version (an event can arrive after the object returned by a later write).
    pub fn apply(&self, name: &str, obj: Option<DynObject>) {
        let mut map = self.write();
        match obj {
            None => {
                map.remove(name);
            }
            Some(obj) => {
                let incoming = rv(&obj.metadata);
                let held = map.get(name).map(|e| rv(e.meta()));
                let same_object = map.get(name).map(|e| &e.meta().uid) == Some(&obj.metadata.uid);
                if same_object && held.is_some_and(|h| h > incoming) {
                    return;
                }
                map.insert(name.to_string(), Entry::decode(obj));
            }
        }
    }

    /// Replaces everything with a fresh list.
    pub fn replace(&self, objects: Vec<DynObject>) {
        let fresh: BTreeMap<String, Entry<R>> = objects
            .into_iter()
            .map(|o| (o.metadata.name.clone(), Entry::decode(o)))
            .collect();
        *self.write() = fresh;
    }

    /// Whether the cache holds `name` at resourceVersion `version` or newer.
    pub fn has_version(&self, name: &str, version: &str) -> bool {
        let Ok(v) = version.parse::<u64>() else {
            return false;
        };
        self.read().get(name).is_some_and(|e| rv(e.meta()) >= v)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry<R>>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry<R>>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The resourceVersion as a number (the store's counter); 0 when absent or not a number.
fn rv(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A status as the runtime writes it for an object it cannot act on.
pub fn refused_status<S: ObjectStatus>(
    current: &S,
    generation: u64,
    reason: &str,
    message: &str,
) -> S {
    current.refused(generation, reason, message, chrono::Utc::now())
}
