//! Volume: the storage a Service mounts, a named volume with its driver and options. Swarm has no
//! cluster-wide volume object: the engine creates a named volume on each node where a task first
//! mounts it, from the driver options on the mount, so berth passes a Volume's spec on every mount
//! that names it.

use crate::meta::Object;
use crate::validate::{check_envelope, check_label_key, Errors, FieldError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Volume = Object<VolumeSpec, serde_json::Value>;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// Volume driver; default `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub driver_opts: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl VolumeSpec {
    pub fn driver(&self) -> &str {
        self.driver.as_deref().unwrap_or("local")
    }
}

pub fn validate_volume(v: &Volume) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &v.api_version, &v.metadata);
    for key in v.spec.labels.keys() {
        check_label_key(&mut errors, "spec.labels", key);
    }
    if v.spec.driver.as_deref().is_some_and(str::is_empty) {
        errors.add("spec.driver", "must not be empty (omit it for `local`)");
    }
    errors.into_result()
}
