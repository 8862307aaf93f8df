//! The one fake API store for controller unit tests: objects in memory with the API's rules that
//! controllers rely on (resourceVersion moves on every write, conditional status writes answer
//! 409, identical status is a no-op), Secret and Config values, and a record of status writes.

use crate::api::{ClientError, DataFiles, ResourceStore, SecretReader};
use async_trait::async_trait;
use berth_api_types::secret_config::ContentKey;
use berth_api_types::wire::Installation;
use berth_api_types::{DynObject, Kind};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
struct Inner {
    objects: BTreeMap<(Kind, String), DynObject>,
    data: BTreeMap<(Kind, String), BTreeMap<String, Vec<u8>>>,
    rv: u64,
    status_writes: Vec<(Kind, String)>,
}

pub struct FakeStore {
    inner: Mutex<Inner>,
    /// Stands in for the API server's content key (digests of `data`); tests swap it to play a
    /// master key rotation.
    content_key: Mutex<ContentKey>,
    installation: Installation,
}

impl Default for FakeStore {
    fn default() -> Self {
        FakeStore::new("test-instance")
    }
}

fn api_error(status: u16, reason: &str, message: String) -> ClientError {
    ClientError::Api {
        status,
        reason: reason.to_string(),
        message,
        details: Vec::new(),
    }
}

impl FakeStore {
    pub fn new(instance: &str) -> Self {
        FakeStore {
            inner: Mutex::default(),
            content_key: Mutex::new(ContentKey::derive(&[0u8; 32])),
            installation: Installation {
                instance: instance.to_string(),
                default_network: "berth-internal".to_string(),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores (creates or replaces) an object from its JSON form, as an apply would: a new uid on
    /// create, generation 1 on create and +1 when the spec changes, a new resourceVersion.
    pub fn put(&self, value: Value) -> DynObject {
        let mut obj: DynObject = serde_json::from_value(value).expect("a well-formed object");
        let mut inner = self.lock();
        inner.rv += 1;
        let key = (obj.kind, obj.metadata.name.clone());
        match inner.objects.get(&key) {
            Some(old) => {
                obj.metadata.uid = old.metadata.uid.clone();
                obj.metadata.creation_timestamp = old.metadata.creation_timestamp;
                obj.metadata.generation = old.metadata.generation + u64::from(old.spec != obj.spec);
                if obj.status.is_null() {
                    obj.status = old.status.clone();
                }
            }
            None => {
                obj.metadata.uid = Some(ulid::Ulid::new().to_string());
                obj.metadata.generation = 1;
                obj.metadata
                    .creation_timestamp
                    .get_or_insert_with(chrono::Utc::now);
            }
        }
        obj.metadata.resource_version = Some(inner.rv.to_string());
        inner.objects.insert(key, obj.clone());
        obj
    }

    /// The digest the API server would give `value` now.
    pub fn digest(&self, value: &[u8]) -> String {
        self.content_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .digest(value)
    }

    /// Derives digests from another master key from now on (as after `berth admin rotate-master-key`).
    pub fn set_master_key(&self, master: &[u8; 32]) {
        *self.content_key.lock().unwrap_or_else(|p| p.into_inner()) = ContentKey::derive(master);
    }

    /// The values a Secret or Config holds (what `SecretReader::data` answers).
    pub fn put_data(&self, kind: Kind, name: &str, files: &[(&str, &[u8])]) {
        self.lock().data.insert(
            (kind, name.to_string()),
            files
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        );
    }

    pub fn remove(&self, kind: Kind, name: &str) {
        self.lock().objects.remove(&(kind, name.to_string()));
    }

    /// Every object of a kind, by name.
    pub fn objects(&self, kind: Kind) -> Vec<DynObject> {
        self.lock()
            .objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, o)| o.clone())
            .collect()
    }

    pub fn object(&self, kind: Kind, name: &str) -> Option<DynObject> {
        self.lock().objects.get(&(kind, name.to_string())).cloned()
    }

    /// The stored status of an object (`Null` when it has none or is gone).
    pub fn status(&self, kind: Kind, name: &str) -> Value {
        self.object(kind, name)
            .map(|o| o.status)
            .unwrap_or(Value::Null)
    }

    /// How many status writes changed something, per object, in order.
    pub fn status_writes(&self) -> Vec<(Kind, String)> {
        self.lock().status_writes.clone()
    }
}

#[async_trait]
impl ResourceStore for FakeStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<DynObject>, ClientError> {
        Ok(self.object(kind, name))
    }

    async fn list(&self, kind: Kind) -> Result<Vec<DynObject>, ClientError> {
        Ok(self.objects(kind))
    }

    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        status: Value,
        resource_version: Option<&str>,
    ) -> Result<DynObject, ClientError> {
        let mut inner = self.lock();
        let key = (kind, name.to_string());
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(api_error(
                404,
                "NotFound",
                format!("{kind} `{name}` not found"),
            ));
        };
        if let Some(rv) = resource_version {
            if current.metadata.resource_version.as_deref() != Some(rv) {
                return Err(api_error(
                    409,
                    "Conflict",
                    format!("{kind} `{name}` changed meanwhile"),
                ));
            }
        }
        if current.status == status {
            return Ok(current);
        }
        inner.rv += 1;
        let mut obj = current;
        obj.status = status;
        obj.metadata.resource_version = Some(inner.rv.to_string());
        inner.objects.insert(key.clone(), obj.clone());
        inner.status_writes.push(key);
        Ok(obj)
    }

    async fn register(&self, kind: Kind, name: &str) -> Result<(), ClientError> {
        if self.object(kind, name).is_none() {
            self.put(serde_json::json!({
                "apiVersion": berth_api_types::API_VERSION, "kind": kind.as_str(),
                "metadata": {"name": name}, "spec": {}
            }));
        }
        Ok(())
    }

    async fn deregister(&self, kind: Kind, name: &str) -> Result<(), ClientError> {
        self.remove(kind, name);
        Ok(())
    }

    async fn installation(&self) -> Result<Installation, ClientError> {
        Ok(self.installation.clone())
    }
}

#[async_trait]
impl SecretReader for FakeStore {
    async fn data(&self, kind: Kind, name: &str) -> Result<Option<DataFiles>, ClientError> {
        let files = {
            let inner = self.lock();
            if !inner.objects.contains_key(&(kind, name.to_string())) {
                return Ok(None);
            }
            inner
                .data
                .get(&(kind, name.to_string()))
                .cloned()
                .unwrap_or_default()
        };
        let digests = self
            .content_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .digests(&files);
        Ok(Some(DataFiles { files, digests }))
    }
}
