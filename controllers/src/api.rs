//! What a controller may ask of the API server: read objects, write their status, learn the
//! installation (`ResourceStore`), and, for the few controllers that hand values to the engine, read
//! decrypted Secret/Config data (`SecretReader`). In `berth up` these are the store itself; a
//! controller running as its own process reaches the same interface over HTTP (the operator's
//! `ApiClient`). Either way the API server stays the only writer of `spec`.

use async_trait::async_trait;
use berth_api_types::wire::{ErrorDetail, Installation};
use berth_api_types::{DynObject, Kind};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error document.
    #[error("{message}")]
    Api {
        status: u16,
        reason: String,
        message: String,
        details: Vec<ErrorDetail>,
    },
    #[error("cannot reach the berth API at {url}: {}", transport_cause(source))]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from the berth API: {0}")]
    Protocol(String),
}

/// The whole chain of a transport error (reqwest's own message names only the URL; the reason, e.g.
/// a certificate the client does not trust, is further down), with what to do about an untrusted
/// certificate.
fn transport_cause(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    let mut out = parts.join(": ");
    if out.contains("certificate") {
        out.push_str(
            " (the server's TLS certificate is not trusted: pass the CA that signed it with --ca \
             or BERTH_CA, e.g. <data-dir>/ca.pem of a berth started with --tls internal)",
        );
    }
    out
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// A conditional write lost: the object changed since it was read (HTTP 409 Conflict).
    pub fn is_conflict(&self) -> bool {
        matches!(self, ClientError::Api { status: 409, reason, .. } if reason == "Conflict")
    }

    /// Whether retrying later may succeed (server down, overloaded, or a write conflict).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Api { status, .. } => *status == 409 || *status == 429 || *status >= 500,
            ClientError::Unreachable { .. } => true,
            ClientError::Protocol(_) => false,
        }
    }
}

/// What a controller needs from the API server.
#[async_trait]
pub trait ResourceStore: Send + Sync + 'static {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<DynObject>, ClientError>;
    async fn list(&self, kind: Kind) -> Result<Vec<DynObject>, ClientError>;
    /// Replaces the object's status, only if its resourceVersion is still `resource_version`
    /// (when given): otherwise 409 Conflict (`ClientError::Api{status:409, reason:"Conflict",..}`).
    /// Identical status is a no-op that publishes no event. Returns the object as stored afterwards.
    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        status: Value,
        resource_version: Option<&str>,
    ) -> Result<DynObject, ClientError>;
    /// The installation id Swarm objects are labelled with, and the default network.
    async fn installation(&self) -> Result<Installation, ClientError>;
    /// Creates an object with an empty spec unless one of that name exists: how the Node controller
    /// registers a node it finds in the swarm (as a kubelet registers its Node). Teams then set the
    /// spec; the controller never writes one.
    async fn register(&self, kind: Kind, name: &str) -> Result<(), ClientError>;
    /// Deletes an object the controller registered once what it stood for is gone from the engine
    /// (a node removed from the swarm). An object already gone is not an error.
    async fn deregister(&self, kind: Kind, name: &str) -> Result<(), ClientError>;
}

/// The files of a Secret or Config (key -> bytes), each with its keyed digest (key -> hex). The
/// digest is computed by the API server, which alone holds the key it is derived from (see
/// `secret_config::ContentKey`); controllers name Swarm secrets and configs by it, never by a plain
/// hash of the value. Reads as the map of files; no `Debug`, so values cannot reach a log by accident.
#[derive(Clone, Default)]
pub struct DataFiles {
    pub files: BTreeMap<String, Vec<u8>>,
    pub digests: BTreeMap<String, String>,
}

impl std::ops::Deref for DataFiles {
    type Target = BTreeMap<String, Vec<u8>>;
    fn deref(&self) -> &Self::Target {
        &self.files
    }
}

/// Decrypted Secret/Config values. Given only to controllers that must hand them to the engine: it
/// is how a Secret's value reaches Swarm, and the only way it leaves the API.
#[async_trait]
pub trait SecretReader: Send + Sync + 'static {
    /// The files of a Secret or Config with their digests; `None` if the object does not exist.
    async fn data(&self, kind: Kind, name: &str) -> Result<Option<DataFiles>, ClientError>;
}
