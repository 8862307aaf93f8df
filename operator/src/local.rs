//! The store as a controller's `ResourceStore`, for controllers running inside `berth up`: the same
//! interface a separate controller process reaches over HTTP, without the HTTP.

use crate::server::redact;
use crate::store::{Store, StoreError};
use async_trait::async_trait;
use berth_api_types::data::DataSpec;
use berth_api_types::{DynObject, Kind};
use berth_controllers::client::{ClientError, ErrorDetail, ResourceStore};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Clone)]
pub struct LocalStore {
    pub store: Store,
    pub default_network: String,
}

fn to_client(e: StoreError) -> ClientError {
    let (status, reason) = match &e {
        StoreError::NotFound { .. } => (404, "NotFound"),
        StoreError::AlreadyExists { .. } | StoreError::Conflict { .. } => (409, "Conflict"),
        StoreError::InUse { .. } => (409, "InUse"),
        StoreError::Protected { .. } => (409, "Protected"),
        StoreError::Storage(_) | StoreError::WrongKey { .. } => (500, "StorageError"),
    };
    ClientError::Api {
        status,
        reason: reason.to_string(),
        message: e.to_string(),
        details: Vec::<ErrorDetail>::new(),
    }
}

#[async_trait]
impl ResourceStore for LocalStore {
    // Secrets come back redacted, exactly as over HTTP, so a controller behaves the same in `berth up`
    // and as its own process; values are read through `data`.
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<DynObject>, ClientError> {
        self.store
            .get(kind, name)
            .map(|o| o.map(redact))
            .map_err(to_client)
    }

    async fn list(&self, kind: Kind) -> Result<Vec<DynObject>, ClientError> {
        self.store
            .list(kind)
            .map(|os| os.into_iter().map(redact).collect())
            .map_err(to_client)
    }

    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        status: Value,
    ) -> Result<(), ClientError> {
        self.store
            .update_status(kind, name, status)
            .await
            .map(|_| ())
            .map_err(to_client)
    }

    async fn instance(&self) -> Result<String, ClientError> {
        Ok(self.store.instance().to_string())
    }

    async fn data(
        &self,
        kind: Kind,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ClientError> {
        let Some(obj) = self.store.get(kind, name).map_err(to_client)? else {
            return Ok(None);
        };
        let spec: DataSpec = serde_json::from_value(obj.spec)
            .map_err(|e| ClientError::Protocol(format!("{kind} `{name}` has no data: {e}")))?;
        Ok(Some(spec.files()))
    }

    async fn default_network(&self) -> Result<String, ClientError> {
        Ok(self.default_network.clone())
    }
}
