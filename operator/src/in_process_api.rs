//! The store as a controller's `ResourceStore` and `SecretReader`, for controllers running inside
//! `berth up`: the same interface a separate controller process reaches over HTTP (`ApiClient`),
//! without the HTTP, and with the same answers (redacted Secrets, the same error statuses).

use crate::api_client::registration;
use crate::server::redact;
use crate::store::{Store, StoreError, WriteMode};
use async_trait::async_trait;
use berth_api_types::secret_config::DataSpec;
use berth_api_types::typed::decode_object;
use berth_api_types::wire::Installation;
use berth_api_types::{DynObject, Kind};
use berth_controllers::api::{ClientError, DataFiles, ResourceStore, SecretReader};
use serde_json::Value;

#[derive(Clone)]
pub struct InProcessApi {
    pub store: Store,
    pub default_network: String,
}

fn to_client(e: StoreError) -> ClientError {
    let (status, reason) = e.status_and_reason();
    ClientError::Api {
        status,
        reason: reason.to_string(),
        message: e.to_string(),
        details: Vec::new(),
    }
}

#[async_trait]
impl ResourceStore for InProcessApi {
    // Secrets come back redacted, exactly as over HTTP, so a controller behaves the same in `berth up`
    // and as its own process; values are read through `SecretReader::data`.
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<DynObject>, ClientError> {
        self.store
            .get(kind, name)
            .map(|o| o.map(|o| redact(self.store.content_key(), o)))
            .map_err(to_client)
    }

    async fn list(&self, kind: Kind) -> Result<Vec<DynObject>, ClientError> {
        self.store
            .list(kind)
            .map(|os| {
                os.into_iter()
                    .map(|o| redact(self.store.content_key(), o))
                    .collect()
            })
            .map_err(to_client)
    }

    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        status: Value,
        resource_version: Option<&str>,
    ) -> Result<DynObject, ClientError> {
        self.store
            .update_status(kind, name, status, resource_version)
            .await
            .map(|o| redact(self.store.content_key(), o))
            .map_err(to_client)
    }

    async fn installation(&self) -> Result<Installation, ClientError> {
        Ok(Installation {
            instance: self.store.instance().to_string(),
            default_network: self.default_network.clone(),
        })
    }

    async fn register(&self, kind: Kind, name: &str) -> Result<(), ClientError> {
        let obj = decode_object(&registration(kind, name)).map_err(|errors| {
            ClientError::Protocol(format!("cannot register {kind} `{name}`: {errors:?}"))
        })?;
        match self
            .store
            .write(vec![obj], WriteMode::Create, None, false)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match to_client(e) {
                e if e.status() == Some(409) => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn deregister(&self, kind: Kind, name: &str) -> Result<(), ClientError> {
        match self.store.delete(kind, name, &self.default_network).await {
            Ok(_) => Ok(()),
            Err(e) => match to_client(e) {
                e if e.is_not_found() => Ok(()),
                e => Err(e),
            },
        }
    }
}

#[async_trait]
impl SecretReader for InProcessApi {
    async fn data(&self, kind: Kind, name: &str) -> Result<Option<DataFiles>, ClientError> {
        let Some(obj) = self.store.get(kind, name).map_err(to_client)? else {
            return Ok(None);
        };
        let spec: DataSpec = serde_json::from_value(obj.spec)
            .map_err(|_| ClientError::Protocol(format!("{kind} `{name}` has no readable data")))?;
        let files = spec.files();
        // The same digests the data endpoint hands a controller in its own process.
        let digests = self.store.content_key().digests(&files);
        Ok(Some(DataFiles { files, digests }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn local() -> (InProcessApi, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([5u8; 32], "test key");
        let store = Store::open(dir.path(), &key).await.unwrap();
        (
            InProcessApi {
                store,
                default_network: "berth-internal".into(),
            },
            dir,
        )
    }

    #[tokio::test]
    async fn status_writes_are_conditional_as_over_http() {
        let (l, _d) = local().await;
        let obj = decode_object(&json!({"apiVersion": "berth/v1", "kind": "Secret",
            "metadata": {"name": "db"}, "spec": {"stringData": {"pw": "hunter2-value"}}}))
        .unwrap();
        let r = l
            .store
            .write(vec![obj], WriteMode::Create, None, false)
            .await
            .unwrap();
        let rv = r[0].1.metadata.resource_version.clone().unwrap();
        let o = l
            .update_status(Kind::Secret, "db", json!({"n": 1}), Some(&rv))
            .await
            .unwrap();
        assert_eq!(o.status, json!({"n": 1}));
        assert!(
            !o.spec.to_string().contains("hunter2-value"),
            "the written object comes back redacted: {}",
            o.spec
        );
        let err = l
            .update_status(Kind::Secret, "db", json!({"n": 2}), Some(&rv))
            .await
            .unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert_eq!(err.status(), Some(409));
        l.update_status(Kind::Secret, "db", json!({"n": 3}), None)
            .await
            .unwrap();
        let err = l
            .update_status(Kind::Secret, "gone", json!({}), None)
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        // Values only through the SecretReader.
        let files = l.data(Kind::Secret, "db").await.unwrap().unwrap();
        assert_eq!(files["pw"], b"hunter2-value");
        assert_eq!(
            files.digests["pw"],
            l.store.content_key().digest(b"hunter2-value"),
            "keyed digests with the values, as over HTTP"
        );
        assert!(l.data(Kind::Secret, "gone").await.unwrap().is_none());
        let inst = l.installation().await.unwrap();
        assert_eq!(inst.instance, l.store.instance());
        assert_eq!(inst.default_network, "berth-internal");
    }
}
