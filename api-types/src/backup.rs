//! Backup: a backup plan. When to snapshot the environment (berth's objects and the data of the
//! named volumes its Services mount), how long to keep snapshots, and where the restic-format
//! repository is. A plan named `environment` with every default exists from first start, so
//! backups are on unless a team turns them off (`suspend: true`).

use crate::meta::{Condition, Object};
use crate::validate::{check_envelope, Errors, FieldError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Backup = Object<BackupSpec, serde_json::Value>;

/// The plan every installation starts with.
pub const DEFAULT_PLAN: &str = "environment";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupSpec {
    /// When to take a snapshot: 5-field cron, UTC. Default: hourly, at a minute chosen per
    /// installation (so installations sharing storage do not all write at :00).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// When to re-read every blob of the newest snapshot: 5-field cron, UTC. Default: nightly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_schedule: Option<String>,
    /// `true` stops scheduled runs (on-demand runs and verification still work).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
    /// Where the snapshots go. Default: a local directory per installation under berth's backup
    /// directory (`--backup-dir`, outside the data directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepositorySpec>,
    /// Which named volumes to copy. Default: every named volume a Service of this installation
    /// mounts.
    #[serde(default, skip_serializing_if = "VolumeSelector::is_default")]
    pub volumes: VolumeSelector,
}

/// How many snapshots to keep; buckets are UTC calendar hours, days, ISO weeks and months.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionSpec {
    /// Every snapshot of the last this many hours.
    #[serde(default = "default_hourly")]
    pub hourly: u32,
    /// The newest snapshot of each of the last this many days.
    #[serde(default = "default_daily")]
    pub daily: u32,
    /// The newest snapshot of each of the last this many weeks.
    #[serde(default = "default_weekly")]
    pub weekly: u32,
    /// The newest snapshot of each of the last this many months; omitted: every month, forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
}

fn default_hourly() -> u32 {
    24
}
fn default_daily() -> u32 {
    7
}
fn default_weekly() -> u32 {
    4
}

impl Default for RetentionSpec {
    fn default() -> Self {
        RetentionSpec {
            hourly: default_hourly(),
            daily: default_daily(),
            weekly: default_weekly(),
            monthly: None,
        }
    }
}

/// A local directory, or an SFTP location for a copy off the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepositorySpec {
    /// An absolute directory on the manager that runs berth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sftp: Option<SftpSpec>,
}

/// `sftp:USER@HOST:PATH` over ssh with a key: the private key and the server's host key line come
/// from berth Secrets, so no credential is written into the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SftpSpec {
    pub host: String,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    pub user: String,
    /// Absolute path of the repository on the server.
    pub path: String,
    /// The Secret key holding the ssh private key (`name` and `key`).
    pub identity: SecretKeyRef,
    /// The Secret key holding the server's `known_hosts` line(s): the host key is pinned.
    pub known_hosts: SecretKeyRef,
}

fn default_ssh_port() -> u16 {
    22
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// Volume names to include (default: all) and to leave out. `*` at the end of a name matches any
/// suffix.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSelector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl VolumeSelector {
    fn is_default(&self) -> bool {
        self == &VolumeSelector::default()
    }

    /// Whether the plan copies volume `name`.
    pub fn selects(&self, name: &str) -> bool {
        let included = self.include.is_empty() || self.include.iter().any(|p| matches(p, name));
        included && !self.exclude.iter().any(|p| matches(p, name))
    }
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

pub mod conditions {
    /// The plan can run: its schedule, repository and key are usable. False with reason
    /// `InvalidSpec`, `RepositoryUnavailable`, `Suspended`...
    pub const READY: &str = "Ready";
    /// True when the newest run failed (reason `RunFailed`, message: why); the newest successful
    /// snapshot is kept whatever retention says.
    pub const LAST_RUN_FAILED: &str = "LastRunFailed";
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The schedules in force (the spec's, or the defaults chosen for this installation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_schedule: Option<String>,
    /// Where the repository is (never a credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_verification: Option<DateTime<Utc>>,
    /// Snapshots of this plan in the repository.
    #[serde(default)]
    pub snapshots: u64,
    /// Bytes the repository takes on its storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<Verification>,
}

/// One run of a plan, as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub id: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The result of re-reading a snapshot's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub time: DateTime<Utc>,
    pub ok: bool,
    /// Which snapshot (berth's id) was read; empty for a whole-repository check.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot: String,
    /// What is damaged, in restic's words (pack files, blobs), when not ok.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// One snapshot, as the evidence export lists it (`berth backup list`): what it holds, where it
/// came from, and whether it was verified. The same record (without `verification`) is stored
/// inside the snapshot as `manifest.json`, so the evidence survives the loss of the manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// berth's id of the run (a ULID).
    pub id: String,
    pub plan: String,
    pub installation: String,
    /// When the run started (UTC); the time retention buckets by.
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<DateTime<Utc>>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The restic snapshot id (full), when the run wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restic_snapshot: Option<String>,
    /// berth objects in the snapshot, by kind.
    #[serde(default)]
    pub objects: BTreeMap<String, u64>,
    #[serde(default)]
    pub volumes: Vec<VolumeRecord>,
    /// Mounts of Services that are not in the snapshot, and why.
    #[serde(default)]
    pub excluded: Vec<ExcludedMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// A volume's data in a snapshot: which node it was read on, and how much.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    pub name: String,
    /// The node's Node object name (hostname, or ID when hostnames collide).
    pub node: String,
    pub node_id: String,
    /// The directory that holds the volume's files inside the restic snapshot.
    pub path: String,
    pub bytes: u64,
    pub files: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExcludedMount {
    pub service: String,
    /// The path inside the container.
    pub target: String,
    /// `anonymous`, `tmpfs`, `bind`, or `volume` (for a named volume the plan's selector leaves out).
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
}

/// The format tag of [`EnvironmentDocument`].
pub const ENVIRONMENT_FORMAT: &str = "berth.io/environment/v1";

/// What a snapshot holds of berth itself (`environment/objects.json` in the snapshot): every
/// object as stored (Secrets sealed), the webhooks as their token hashes, and the master key the
/// Secrets are sealed with, so that the repository key alone recovers a lost manager. The
/// repository's encryption protects it; whoever holds the repository key can read the Secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentDocument {
    pub format: String,
    /// The installation that wrote it: a restore into a fresh data directory takes this id and so
    /// adopts the Swarm objects it made.
    pub installation: String,
    pub created: DateTime<Utc>,
    /// base64 of the master key the sealed values were sealed with.
    pub master_key: String,
    /// The objects, without status (controllers observe it again).
    pub objects: Vec<serde_json::Value>,
    /// Webhook records: token hashes (never tokens), signing secrets sealed with `master_key`.
    #[serde(default)]
    pub webhooks: Vec<serde_json::Value>,
    /// What a snapshot deliberately does not hold (for the evidence).
    #[serde(default)]
    pub not_included: Vec<String>,
}

/// Stated in every environment document and evidence export.
pub const NOT_INCLUDED: [&str; 3] = [
    "the nodes themselves: their number, size and addresses are the platform's, not berth's",
    "anonymous volumes, tmpfs and bind mounts (listed as excluded per Service)",
    "status: controllers observe it again after a restore",
];

pub fn validate_backup(b: &Backup) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &b.api_version, &b.metadata);
    let spec = &b.spec;
    if let Err(e) = spec.schedule.as_deref().map(crate::cron::check).transpose() {
        errors.add("spec.schedule", e);
    }
    if let Err(e) = spec
        .verify_schedule
        .as_deref()
        .map(crate::cron::check)
        .transpose()
    {
        errors.add("spec.verifySchedule", e);
    }
    if let Some(r) = &spec.retention {
        if r.hourly == 0 && r.daily == 0 && r.weekly == 0 && r.monthly == Some(0) {
            errors.add(
                "spec.retention",
                "keeps nothing but the newest snapshot; set at least one of hourly, daily, \
                 weekly, monthly above 0 (omit `monthly` to keep one per month forever)",
            );
        }
    }
    if let Some(repo) = &spec.repository {
        match (&repo.path, &repo.sftp) {
            (Some(_), Some(_)) | (None, None) => errors.add(
                "spec.repository",
                "set exactly one of `path` (a local directory) and `sftp`",
            ),
            (Some(p), None) => {
                if !p.starts_with('/') {
                    errors.add(
                        "spec.repository.path",
                        format!("`{p}` is not an absolute path"),
                    );
                }
            }
            (None, Some(s)) => {
                if !s.path.starts_with('/') {
                    errors.add(
                        "spec.repository.sftp.path",
                        format!("`{}` is not an absolute path", s.path),
                    );
                }
                if s.host.is_empty() || s.host.contains(['@', ':', '/', ' ']) {
                    errors.add(
                        "spec.repository.sftp.host",
                        format!("`{}` is not a host name or address", s.host),
                    );
                }
                if s.user.is_empty() || s.user.contains(['@', ':', '/', ' ']) {
                    errors.add(
                        "spec.repository.sftp.user",
                        format!("`{}` is not a user name", s.user),
                    );
                }
                if s.port == 0 {
                    errors.add("spec.repository.sftp.port", "must be 1-65535");
                }
            }
        }
    }
    for (i, p) in spec.volumes.include.iter().enumerate() {
        if p.is_empty() {
            errors.add(format!("spec.volumes.include[{i}]"), "is empty");
        }
    }
    for (i, p) in spec.volumes.exclude.iter().enumerate() {
        if p.is_empty() {
            errors.add(format!("spec.volumes.exclude[{i}]"), "is empty");
        }
    }
    errors.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::typed::decode_object;
    use serde_json::json;

    fn errors(spec: serde_json::Value) -> Vec<String> {
        let obj = json!({"apiVersion": "berth/v1", "kind": "Backup", "metadata": {"name": "nightly"}, "spec": spec});
        decode_object(&obj)
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn an_empty_spec_is_the_default_plan() {
        assert!(errors(json!({})).is_empty());
        assert!(
            errors(json!({"schedule": "*/15 * * * *", "verifySchedule": "30 3 * * 1-5"}))
                .is_empty()
        );
        assert!(errors(json!({"schedule": "@daily"})).is_empty());
    }

    #[test]
    fn a_bad_schedule_names_the_field_and_what_is_wrong() {
        assert_eq!(
            errors(json!({"schedule": "61 * * * *"})),
            ["spec.schedule: minute field `61` is out of range 0-59"]
        );
        let e = errors(json!({"schedule": "hourly"}));
        assert!(
            e[0].starts_with("spec.schedule: `hourly` has 1 field(s)"),
            "{e:?}"
        );
        let e = errors(json!({"verifySchedule": "0 x * * *"}));
        assert_eq!(e, ["spec.verifySchedule: hour field `x` is not a number"]);
    }

    #[test]
    fn repository_is_a_path_or_sftp() {
        assert!(errors(json!({"repository": {"path": "/srv/backups"}})).is_empty());
        let e = errors(json!({"repository": {"path": "backups"}}));
        assert_eq!(
            e,
            ["spec.repository.path: `backups` is not an absolute path"]
        );
        let e = errors(json!({"repository": {}}));
        assert!(e[0].contains("exactly one"), "{e:?}");
        let sftp = json!({"host": "vault.example", "user": "berth", "path": "/srv/b",
            "identity": {"name": "backup-ssh", "key": "id"},
            "knownHosts": {"name": "backup-ssh", "key": "known_hosts"}});
        assert!(errors(json!({"repository": {"sftp": sftp}})).is_empty());
        let e = errors(json!({"repository": {"sftp": {"host": "h"}}}));
        assert!(e[0].contains("user") || e[0].contains("missing"), "{e:?}");
    }

    #[test]
    fn retention_defaults_and_keeping_nothing() {
        let r: RetentionSpec = serde_json::from_value(json!({})).unwrap();
        assert_eq!(r, RetentionSpec::default());
        assert_eq!((r.hourly, r.daily, r.weekly, r.monthly), (24, 7, 4, None));
        let e = errors(json!({"retention": {"hourly": 0, "daily": 0, "weekly": 0, "monthly": 0}}));
        assert!(e[0].starts_with("spec.retention: keeps nothing"), "{e:?}");
    }

    #[test]
    fn volume_selector() {
        let s = VolumeSelector::default();
        assert!(s.selects("anything"));
        let s = VolumeSelector {
            include: vec!["db-*".into(), "uploads".into()],
            exclude: vec!["db-scratch".into()],
        };
        assert!(s.selects("db-main"));
        assert!(s.selects("uploads"));
        assert!(!s.selects("db-scratch"));
        assert!(!s.selects("cache"));
    }
}
