//! Network: a Swarm overlay network that Services attach to, encrypted unless the spec explicitly
//! opts out, and the default network every Service joins unless it lists its own.

use crate::meta::Object;
use crate::validate::{check_envelope, check_label_key, Errors, FieldError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Network = Object<NetworkSpec, serde_json::Value>;

/// The network every Service joins unless it lists networks of its own.
pub const DEFAULT_NETWORK: &str = "berth-internal";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// IPsec encryption of the overlay's traffic between nodes. On unless set to `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// Whether standalone containers (not only services) may join.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attachable: bool,
    /// No route to the outside world.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl NetworkSpec {
    pub fn encrypted(&self) -> bool {
        self.encrypted.unwrap_or(true)
    }
}

pub fn validate_network(n: &Network) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &n.api_version, &n.metadata);
    for key in n.spec.labels.keys() {
        check_label_key(&mut errors, "spec.labels", key);
    }
    errors.into_result()
}
