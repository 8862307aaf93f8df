//! Volume: the storage a Service mounts, a named volume with its driver and options. Swarm has no
//! cluster-wide volume object: the engine creates a named volume on each node where a task first
//! mounts it, from the driver options on the mount, so berth passes a Volume's spec on every mount
//! that names it.
//!
//! The `local` driver's options are mount(8)'s: `type=none,o=bind,device=/` mounts the node's root
//! filesystem (or its Docker socket) into any Service, and `type=ext4,device=/dev/sda1` a host
//! disk. [`host_access`] finds such options; the API server refuses them unless it was started with
//! `--allow-bind-mounts` (operator's store admission), since syntax alone cannot tell a
//! deliberate host mount from an escape.

use crate::meta::Object;
use crate::validate::{check_envelope, check_label_key, Errors, FieldError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Volume = Object<VolumeSpec, serde_json::Value>;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
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

/// `type`s of the `local` driver that mount no host path: memory and network filesystems. Any
/// other type mounts a `device` of the node (a disk, a partition, an image file).
const NON_HOST_TYPES: [&str; 7] = ["tmpfs", "nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs"];

/// The driver options of `spec` that give a Service a path or device of the host: for the `local`
/// driver a bind (`o=bind`/`rbind`, `type=none`) or a host device (`device` with any `type` but a
/// memory or network filesystem). Empty when there are none; other drivers are plugins whose
/// options berth cannot read (installing a plugin on the nodes is the operator's decision).
pub fn host_access(spec: &VolumeSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if spec.driver() != "local" {
        return errors.0;
    }
    let opt = |k: &str| {
        spec.driver_opts
            .get(k)
            .map(|v| v.trim().to_ascii_lowercase())
    };
    const WHY: &str = "the server does not allow bind mounts or host devices (start it with \
                       --allow-bind-mounts if this volume is meant to reach the host)";
    if let Some(o) = opt("o") {
        let binds = o
            .split(',')
            .map(|x| x.trim().split('=').next().unwrap_or_default())
            .any(|x| x == "bind" || x == "rbind");
        if binds {
            errors.add(
                "spec.driverOpts.o",
                format!("bind-mounts a host path: {WHY}"),
            );
        }
    }
    match (opt("type"), opt("device")) {
        (Some(t), _) if t == "none" => {
            errors.add(
                "spec.driverOpts.type",
                format!("`none` is a bind mount of a host path: {WHY}"),
            );
        }
        (Some(t), Some(_)) if !NON_HOST_TYPES.contains(&t.as_str()) => {
            errors.add(
                "spec.driverOpts.device",
                format!("with type `{t}` mounts a device or path of the host: {WHY}"),
            );
        }
        (None, Some(_)) => {
            errors.add(
                "spec.driverOpts.device",
                format!("without a network `type` mounts a device or path of the host: {WHY}"),
            );
        }
        _ => {}
    }
    errors.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(spec: serde_json::Value) -> Vec<String> {
        let spec: VolumeSpec = serde_json::from_value(spec).unwrap();
        host_access(&spec).into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn bind_mounts_and_host_devices_are_found() {
        for (opts, want) in [
            (
                json!({"type": "none", "o": "bind", "device": "/"}),
                vec!["spec.driverOpts.o", "spec.driverOpts.type"],
            ),
            (
                json!({"type": "none", "o": "bind", "device": "/var/run/docker.sock"}),
                vec!["spec.driverOpts.o", "spec.driverOpts.type"],
            ),
            (
                json!({"o": "ro, RBIND", "device": "/etc"}),
                vec!["spec.driverOpts.o", "spec.driverOpts.device"],
            ),
            (
                json!({"type": "ext4", "device": "/dev/sda1"}),
                vec!["spec.driverOpts.device"],
            ),
            (json!({"type": "NONE"}), vec!["spec.driverOpts.type"]),
            (
                json!({"device": "dev/sda1"}),
                vec!["spec.driverOpts.device"],
            ),
            (
                json!({"type": "tmpfs", "device": "tmpfs", "o": "size=100m,bind"}),
                vec!["spec.driverOpts.o"],
            ),
        ] {
            let got = paths(json!({"driverOpts": opts.clone()}));
            assert_eq!(got, want, "{opts}");
            let explicit = paths(json!({"driver": "local", "driverOpts": opts.clone()}));
            assert_eq!(explicit, want, "{opts}");
        }
    }

    #[test]
    fn plain_memory_and_network_volumes_are_fine() {
        for opts in [
            json!({}),
            json!({"type": "tmpfs", "device": "tmpfs", "o": "size=100m,uid=1000"}),
            json!({"type": "nfs", "o": "addr=10.0.0.1,rw", "device": ":/exports/data"}),
            json!({"type": "cifs", "device": "//files/share", "o": "username=x"}),
            json!({"size": "10G"}),
        ] {
            assert!(
                paths(json!({"driverOpts": opts.clone()})).is_empty(),
                "{opts}"
            );
        }
        // A plugin's options are its own business.
        assert!(
            paths(json!({"driver": "rexray", "driverOpts": {"o": "bind", "device": "/"}}))
                .is_empty()
        );
    }
}
