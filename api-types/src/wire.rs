//! The JSON documents of the berth API that are not objects: error bodies, discovery, lists, apply
//! results and the data endpoint's body. They live here, beside the objects, so the server, the CLI,
//! controllers and outside tools decode the same types without depending on one another.

use crate::Kind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The JSON error body every API error carries (modelled on Kubernetes' `Status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: u16,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
}

/// One field-level problem; `object` names which document of a multi-object request it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    pub path: String,
    pub message: String,
}

/// Result of applying one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Configured,
    Unchanged,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    pub kind: Kind,
    pub name: String,
    pub outcome: ApplyOutcome,
    pub generation: u64,
}

/// Discovery document served at the API root.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Discovery {
    pub api_version: String,
    /// Identifies this berth installation; stamped on every Swarm object it creates.
    pub instance: String,
    /// The Network services join when they list none of their own.
    pub default_network: String,
    pub kinds: Vec<Kind>,
    /// Records the store could not read and moved aside (see `berth admin fsck`); 0 when healthy.
    #[serde(default)]
    pub quarantined: usize,
}

/// The answer of `paths::JOIN_COMMAND`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinCommand {
    pub role: String,
    /// `docker swarm join --token TOKEN ADDR:PORT`, to run on the new machine.
    pub command: String,
    /// The managers' addresses a new node can join through.
    pub managers: Vec<String>,
}

/// What a controller needs to know about the installation it works for (a subset of `Discovery`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    /// The id every Swarm object this installation creates is labelled with.
    pub instance: String,
    /// The Network services join when they list none of their own.
    pub default_network: String,
}

/// A list response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    pub items: Vec<T>,
}

/// Body of `GET <object>/data`: base64 values per key, and each value's keyed digest
/// (`secret_config::ContentKey`, hex), by which controllers name what they create in Swarm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataBody {
    pub data: BTreeMap<String, String>,
    /// Absent from servers older than keyed digests; a controller then refuses to name files.
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
}
