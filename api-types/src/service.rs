//! The Service kind: one Swarm service, described the way Docker and Kubernetes users already think
//! about it (image, replicas or global mode, command, env, resources, placement, update and restart
//! policy, healthcheck), and the status the service controller reports back.

use crate::image::ImageRef;
use crate::meta::{Condition, Object};
use crate::predeploy::{DeploySpec, PreDeployStatus};
use crate::units::{ByteSize, Cpus, Duration};
use crate::validate::{check_envelope, check_label_key, Errors, FieldError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

pub type Service = Object<ServiceSpec, ServiceStatus>;

/// Most replicas a Service may ask for; a typo like `replicas: 10000000` should not reach the engine.
pub const MAX_REPLICAS: u64 = 10_000;
/// Most restart attempts or healthcheck retries. The engine holds these as signed numbers: an
/// unchecked `u64` beyond `i64::MAX` would reach it as a negative one.
pub const MAX_ATTEMPTS: u64 = 1_000_000;
/// Highest `forceUpdate`: each deploy of a tag already running adds one, so this is billions of
/// redeploys; a deploy that would pass it is refused instead of wrapping to 0.
pub const MAX_FORCE_UPDATE: u64 = u32::MAX as u64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// `repo:tag` or `repo@sha256:...`.
    pub image: ImageRef,
    /// `replicated` (default) or `global` (one task per eligible node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ServiceMode>,
    /// Replicated mode only; default 1. Zero is allowed (a stopped service that keeps its config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// A list of `{name, value}`, or a map `KEY: value` as Compose files write it; kept as the
    /// list.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "env_list_or_map"
    )]
    #[schemars(schema_with = "env_schema")]
    pub env: Vec<EnvVar>,
    /// Labels on the Swarm service (berth adds its own `io.berth.*` labels beside them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Labels on the service's containers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub container_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period: Option<Duration>,
    /// Run an init process as PID 1 (`docker run --init`), so signals reach programs that do not
    /// handle them themselves and stops do not wait out the grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// How a changed spec rolls out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdatePolicy>,
    /// How a failed update rolls back (used when `update.failureAction` is `rollback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<UpdatePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// Secret keys mounted as files (default target `/run/secrets/<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<FileRef>,
    /// Config keys mounted as files (default target `/<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<FileRef>,
    /// Named volumes (Volume objects), anonymous volumes and tmpfs mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Network objects to join; none listed means the default network `berth-internal`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Bumped to restart every task (pulling the image again) without any other change: what a
    /// deploy of the tag already running does. Swarm's `ForceUpdate`; 0 (absent) is the default.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub force_update: u64,
    /// `berth rollout pause`: berth stops writing the Swarm service (no rollout, no scaling, no
    /// drift repair) while spec changes are stored; `rollout resume` rolls them out in one update.
    /// Applying a manifest that does not mention it keeps it, as with `forceUpdate`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,
    /// How new images are deployed beyond the update policy: pre-deploy steps (migrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeploySpec>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A Secret or Config key mounted into the service's containers as a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRef {
    /// The Secret or Config object.
    pub name: String,
    /// Which key; may be omitted when the object has exactly one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// File path in the container (relative paths are under `/run/secrets` for secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    /// File mode as an octal string, e.g. `"0440"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl FileRef {
    /// The mode as a number, if it parses as octal.
    pub fn mode_bits(&self) -> Option<u32> {
        self.mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8).ok())
    }
}

/// A mount: a named volume (`volume: NAME`), or, without `volume`, an anonymous volume or (with
/// `tmpfs: true`) a tmpfs. Anonymous and tmpfs mounts are not backed up, and status says so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tmpfs: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// tmpfs only: size limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
}

impl VolumeMount {
    /// Why this mount is not backed up, if it is not.
    pub fn unbacked_reason(&self) -> Option<&'static str> {
        match (&self.volume, self.tmpfs) {
            (Some(_), _) => None,
            (None, true) => Some("tmpfs"),
            (None, false) => Some("anonymous volume"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    Replicated,
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// `env` as a list (`- name: A` / `value: "1"`) or a map (`A: 1`). A map's scalar values are
/// taken as written (`PORT: 8080` is `"8080"`, `DEBUG: true` is `"true"`); a key without a value
/// is refused: Compose would take it from the shell that runs `docker stack deploy`, and there
/// is no such shell here.
/// `env`'s two forms: the list of `{name, value}`, or a map of names to scalars.
pub(crate) fn env_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let list = g.subschema_for::<Vec<EnvVar>>();
    schemars::json_schema!({
        "anyOf": [
            list,
            {
                "type": "object",
                "additionalProperties": {"type": ["string", "number", "boolean"]}
            }
        ]
    })
}

pub(crate) fn env_list_or_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<EnvVar>, D::Error> {
    use serde::de::{self, MapAccess, SeqAccess, Visitor};

    struct EnvVisitor;

    /// One map value as text.
    struct Scalar(String);

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            match serde_json::Value::deserialize(d)? {
                serde_json::Value::String(s) => Ok(Scalar(s)),
                serde_json::Value::Number(n) => Ok(Scalar(n.to_string())),
                serde_json::Value::Bool(b) => Ok(Scalar(b.to_string())),
                serde_json::Value::Null => Err(de::Error::custom(
                    "has no value: write one (`\"\"` for empty); berth does not read it from a shell as Compose does",
                )),
                _ => Err(de::Error::custom(
                    "must be a string, a number or a boolean",
                )),
            }
        }
    }

    impl<'de> Visitor<'de> for EnvVisitor {
        type Value = Vec<EnvVar>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of {name, value} or a map of NAME: value")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element::<EnvVar>()? {
                out.push(v);
            }
            Ok(out)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(name) = map.next_key::<String>()? {
                let Scalar(value) = map.next_value()?;
                out.push(EnvVar { name, value });
            }
            Ok(out)
        }
    }

    d.deserialize_any(EnvVisitor)
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservations: Option<ResourceAmounts>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceAmounts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Swarm constraint expressions, e.g. `node.role == manager`, `node.labels.zone != b`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// Spread tasks over the values of a node label, e.g. `node.labels.zone`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdatePolicy {
    /// Tasks changed at once; 0 means all at once. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u64>,
    /// Pause between batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_action: Option<FailureAction>,
    /// How long each task is watched for failure after it is updated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<Duration>,
    /// Fraction (0 to 1) of tasks that may fail before the failure action triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<UpdateOrder>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    Pause,
    Continue,
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    StopFirst,
    StartFirst,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<RestartCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
    /// 0 or absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    /// Window in which restarts count towards `maxAttempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    None,
    OnFailure,
    Any,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Healthcheck {
    /// As in Docker: `["CMD", "prog", "arg"]`, `["CMD-SHELL", "cmd"]` or `["NONE"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    /// Turns off a healthcheck the image defines.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<Duration>,
}

/// What the service controller observed. Written only by the controller, through the status endpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Tasks Swarm wants running (replicas, or eligible nodes in global mode).
    #[serde(default)]
    pub desired_replicas: u64,
    #[serde(default)]
    pub running_replicas: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Swarm's rolling-update state: `updating`, `completed`, `paused`, `rollback_started`,
    /// `rollback_paused`, `rollback_completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm_service_id: Option<String>,
    /// Mounts whose data is not in any backup (anonymous volumes, tmpfs), as `target (why)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbacked_mounts: Vec<String>,
    /// Running tasks that run the current image (the rest still run an older one mid-rollout).
    #[serde(default)]
    pub updated_replicas: u64,
    /// The last rollouts, oldest first (at most [`REVISION_HISTORY`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<Revision>,
    /// The pre-deploy steps of the latest rollout that has steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_deploy: Option<PreDeployStatus>,
}

/// How many rollouts a Service's status remembers.
pub const REVISION_HISTORY: usize = 10;

/// One rollout: an image (or a forced redeploy of the same one) that berth sent to the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// 1, 2, 3...: what `berth rollout undo --to-revision` names.
    pub revision: u64,
    /// The image as the spec names it.
    pub image: String,
    /// The manifest digest the engine was told to run, when berth knew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The object generation this rollout applied.
    pub generation: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub force_update: u64,
    pub time: chrono::DateTime<chrono::Utc>,
    /// What asked for it: `webhook`, `registry`, `api` (any other spec write), `rollback`, ...
    pub trigger: String,
    /// The deploy event's id, for rollouts that came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_id: Option<String>,
    pub result: RolloutResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutResult {
    /// Sent to the engine; tasks are being replaced.
    Progressing,
    /// Every task runs it.
    Complete,
    /// The engine gave up on it and went back to the previous spec.
    RolledBack,
    /// The engine stopped the update on failure (update failure action `pause`).
    Paused,
    /// A newer rollout replaced it before it finished.
    Superseded,
    /// A pre-deploy step failed or timed out: the service stayed on its previous image.
    FailedPredeploy,
}

impl RolloutResult {
    /// Whether the rollout ended badly.
    pub fn failed(self) -> bool {
        matches!(
            self,
            RolloutResult::RolledBack | RolloutResult::Paused | RolloutResult::FailedPredeploy
        )
    }
}

impl std::fmt::Display for RolloutResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RolloutResult::Progressing => "progressing",
            RolloutResult::Complete => "complete",
            RolloutResult::RolledBack => "rolled-back",
            RolloutResult::Paused => "paused",
            RolloutResult::Superseded => "superseded",
            RolloutResult::FailedPredeploy => "failed-predeploy",
        })
    }
}

/// Condition types of a Service.
pub mod conditions {
    /// Every desired task is running and no rollout is in flight.
    pub const READY: &str = "Ready";
    /// A rollout or task start is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Tasks fail, a rollout paused or rolled back, or the spec cannot be applied.
    pub const DEGRADED: &str = "Degraded";
    /// The reason of `Progressing=False` while `spec.paused`.
    pub const PAUSED_REASON: &str = "Paused";
    /// `Progressing=True` while pre-deploy steps run.
    pub const PRE_DEPLOY_RUNNING: &str = "PreDeployRunning";
    /// `Degraded=True` when a pre-deploy step failed: the service stays on its image.
    pub const PRE_DEPLOY_FAILED: &str = "PreDeployFailed";
    /// `Degraded=True` when a pre-deploy step ran past its timeout.
    pub const PRE_DEPLOY_TIMED_OUT: &str = "PreDeployTimedOut";
}

impl ServiceSpec {
    pub fn mode(&self) -> ServiceMode {
        self.mode.unwrap_or(ServiceMode::Replicated)
    }

    /// The pre-deploy steps, in order (none without `deploy`).
    pub fn steps(&self) -> impl Iterator<Item = &crate::predeploy::PreDeployStep> {
        self.deploy.iter().flat_map(|d| &d.pre_deploy)
    }

    /// Rules the types cannot express. Paths are relative to the object (`spec.…`).
    pub fn validate(&self, errors: &mut Errors) {
        if self.mode() == ServiceMode::Global && self.replicas.is_some() {
            errors.add(
                "spec.replicas",
                "cannot be set when mode is `global` (global runs one task per node)",
            );
        }
        if let Some(r) = self.replicas {
            if r > MAX_REPLICAS {
                errors.add(
                    "spec.replicas",
                    format!("{r} is out of range (0 to {MAX_REPLICAS})"),
                );
            }
        }
        self.validate_counts(errors);
        if let Some(c) = &self.command {
            if c.is_empty() {
                errors.add(
                    "spec.command",
                    "must not be empty when given (omit it to use the image's entrypoint)",
                );
            }
        }
        check_env_names(errors, "spec.env", &self.env);
        for key in self.labels.keys() {
            check_label_key(errors, "spec.labels", key);
        }
        for key in self.container_labels.keys() {
            check_label_key(errors, "spec.containerLabels", key);
        }
        if let Some(h) = &self.hostname {
            crate::validate::check_dns_label(errors, "spec.hostname", h);
        }
        if let Some(res) = &self.resources {
            if let (Some(l), Some(r)) = (&res.limits, &res.reservations) {
                if let (Some(lc), Some(rc)) = (&l.cpus, &r.cpus) {
                    if rc.nano_cpus() > lc.nano_cpus() {
                        errors.add(
                            "spec.resources.reservations.cpus",
                            format!("{rc} is more than the limit {lc}"),
                        );
                    }
                }
                if let (Some(lm), Some(rm)) = (&l.memory, &r.memory) {
                    if rm.bytes() > lm.bytes() {
                        errors.add(
                            "spec.resources.reservations.memory",
                            format!("{rm} is more than the limit {lm}"),
                        );
                    }
                }
            }
            if let Some(m) = res.limits.as_ref().and_then(|l| l.memory.as_ref()) {
                // The engine refuses limits under 6 MiB; say so now rather than as a task error.
                if m.bytes() < 6 * 1024 * 1024 {
                    errors.add(
                        "spec.resources.limits.memory",
                        format!("{m} is below the engine's minimum of 6Mi"),
                    );
                }
            }
        }
        if let Some(p) = &self.placement {
            for (i, c) in p.constraints.iter().enumerate() {
                if !["==", "!="].iter().any(|op| c.contains(op)) {
                    errors.add(
                        format!("spec.placement.constraints[{i}]"),
                        format!(
                            "`{c}` must compare with `==` or `!=`, e.g. `node.role == manager`"
                        ),
                    );
                }
            }
            for (i, s) in p.spread.iter().enumerate() {
                if !s.starts_with("node.labels.") && !s.starts_with("engine.labels.") {
                    errors.add(
                        format!("spec.placement.spread[{i}]"),
                        format!("`{s}` must be a node or engine label, e.g. `node.labels.zone`"),
                    );
                }
            }
            if self.mode() == ServiceMode::Global && p.max_replicas_per_node.is_some() {
                errors.add(
                    "spec.placement.maxReplicasPerNode",
                    "has no meaning in global mode",
                );
            }
        }
        for (name, policy) in [("update", &self.update), ("rollback", &self.rollback)] {
            if let Some(u) = policy {
                if let Some(r) = u.max_failure_ratio {
                    if !(0.0..=1.0).contains(&r) {
                        errors.add(
                            format!("spec.{name}.maxFailureRatio"),
                            format!("{r} is out of range (0 to 1)"),
                        );
                    }
                }
            }
        }
        if self
            .rollback
            .as_ref()
            .is_some_and(|r| r.failure_action == Some(FailureAction::Rollback))
        {
            errors.add(
                "spec.rollback.failureAction",
                "`rollback` is not possible for a rollback (use `pause` or `continue`)",
            );
        }
        self.validate_dependencies(errors);
        if let Some(d) = &self.deploy {
            d.validate(self, errors);
        }
        if let Some(h) = &self.healthcheck {
            if h.disable && !h.test.is_empty() {
                errors.add("spec.healthcheck.disable", "cannot be combined with `test`");
            }
            if let Some(first) = h.test.first() {
                let ok = match first.as_str() {
                    "CMD" | "CMD-SHELL" => h.test.len() > 1,
                    "NONE" => h.test.len() == 1,
                    _ => false,
                };
                if !ok {
                    errors.add(
                        "spec.healthcheck.test",
                        "must be [\"CMD\", prog, args...], [\"CMD-SHELL\", command] or [\"NONE\"]",
                    );
                }
            }
        }
    }
}

impl ServiceSpec {
    /// Every count in range, so none reaches the engine cast into a negative number.
    fn validate_counts(&self, errors: &mut Errors) {
        let mut check = |path: &str, value: Option<u64>, max: u64| {
            if let Some(v) = value.filter(|&v| v > max) {
                errors.add(path, format!("{v} is out of range (0 to {max})"));
            }
        };
        for (name, policy) in [("update", &self.update), ("rollback", &self.rollback)] {
            let parallelism = policy.as_ref().and_then(|u| u.parallelism);
            check(
                &format!("spec.{name}.parallelism"),
                parallelism,
                MAX_REPLICAS,
            );
        }
        let per_node = self
            .placement
            .as_ref()
            .and_then(|p| p.max_replicas_per_node);
        check("spec.placement.maxReplicasPerNode", per_node, MAX_REPLICAS);
        let attempts = self.restart.as_ref().and_then(|r| r.max_attempts);
        check("spec.restart.maxAttempts", attempts, MAX_ATTEMPTS);
        let retries = self.healthcheck.as_ref().and_then(|h| h.retries);
        check("spec.healthcheck.retries", retries, MAX_ATTEMPTS);
        check(
            "spec.forceUpdate",
            Some(self.force_update),
            MAX_FORCE_UPDATE,
        );
    }

    /// Secret, config, volume and network references: well-formed, and no two files or mounts on one
    /// path. Whether the referenced objects exist is the controller's business (they may come later).
    fn validate_dependencies(&self, errors: &mut Errors) {
        let mut targets: HashSet<String> = self.validate_files(errors);
        let mut claim = |errors: &mut Errors, path: String, target: String| {
            if !targets.insert(target.clone()) {
                errors.add(path, format!("`{target}` is mounted twice"));
            }
        };
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.target.starts_with('/') || v.target.split('/').any(|c| c == "..") {
                errors.add(
                    format!("spec.volumes[{i}].target"),
                    "must be an absolute path without `..`",
                );
            }
            if let Some(name) = &v.volume {
                crate::validate::check_dns_label(
                    errors,
                    &format!("spec.volumes[{i}].volume"),
                    name,
                );
                if v.tmpfs {
                    errors.add(
                        format!("spec.volumes[{i}].tmpfs"),
                        "cannot be combined with `volume` (a named volume is not a tmpfs)",
                    );
                }
            }
            if v.size.is_some() && !v.tmpfs {
                errors.add(
                    format!("spec.volumes[{i}].size"),
                    "applies to tmpfs mounts only",
                );
            }
            claim(
                errors,
                format!("spec.volumes[{i}].target"),
                v.target.clone(),
            );
        }
        let mut seen = HashSet::new();
        for (i, n) in self.networks.iter().enumerate() {
            crate::validate::check_dns_label(errors, &format!("spec.networks[{i}]"), n);
            if !seen.insert(n) {
                errors.add(
                    format!("spec.networks[{i}]"),
                    format!("`{n}` is listed twice"),
                );
            }
        }
    }

    /// Secret and config references: well-formed, no two on one path. Returns the paths taken.
    pub(crate) fn validate_files(&self, errors: &mut Errors) -> HashSet<String> {
        let mut targets: HashSet<String> = HashSet::new();
        for (field, refs, base) in [
            ("secrets", &self.secrets, "/run/secrets/"),
            ("configs", &self.configs, "/"),
        ] {
            for (i, r) in refs.iter().enumerate() {
                crate::validate::check_dns_label(
                    errors,
                    &format!("spec.{field}[{i}].name"),
                    &r.name,
                );
                if r.mode.is_some() && r.mode_bits().is_none_or(|m| m > 0o777) {
                    errors.add(
                        format!("spec.{field}[{i}].mode"),
                        "must be an octal file mode as a string, e.g. \"0440\"",
                    );
                }
                let target = r.target.clone().unwrap_or_else(|| r.name.clone());
                if target.is_empty() || target.split('/').any(|c| c == "..") {
                    errors.add(
                        format!("spec.{field}[{i}].target"),
                        "must be a file path without `..`",
                    );
                }
                let full = file_target(r, base);
                if !targets.insert(full.clone()) {
                    errors.add(
                        format!("spec.{field}[{i}].target"),
                        format!("`{full}` is mounted twice"),
                    );
                }
            }
        }
        targets
    }

    /// Names of the objects of `kind` this spec refers to.
    pub fn references(&self, kind: crate::Kind) -> Vec<&str> {
        use crate::Kind;
        match kind {
            // A pre-deploy step's own files are dependencies too: its job cannot start without them.
            Kind::Secret => self
                .secrets
                .iter()
                .chain(self.steps().flat_map(|s| &s.secrets))
                .map(|r| r.name.as_str())
                .collect(),
            Kind::Config => self
                .configs
                .iter()
                .chain(self.steps().flat_map(|s| &s.configs))
                .map(|r| r.name.as_str())
                .collect(),
            Kind::Volume => self
                .volumes
                .iter()
                .filter_map(|v| v.volume.as_deref())
                .collect(),
            Kind::Network => self.networks.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether this spec uses the object `kind`/`name`. A spec that lists no networks uses the
    /// installation's default network.
    pub fn uses(&self, kind: crate::Kind, name: &str, default_network: &str) -> bool {
        if kind == crate::Kind::Network && self.networks.is_empty() {
            return name == default_network;
        }
        self.references(kind).contains(&name)
    }
}

/// Env names at `path` (`spec.env`, a step's `env`): set, without `=`, each once.
pub(crate) fn check_env_names(errors: &mut Errors, path: &str, env: &[EnvVar]) {
    let mut seen = HashSet::new();
    for (i, e) in env.iter().enumerate() {
        let at = format!("{path}[{i}].name");
        if e.name.is_empty() {
            errors.add(at, "must not be empty");
        } else if e.name.contains('=') || e.name.contains('\0') {
            errors.add(at, format!("`{}` must not contain `=`", e.name));
        } else if !seen.insert(e.name.as_str()) {
            errors.add(at, format!("`{}` is set twice", e.name));
        }
    }
}

/// Where a secret or config file lands in the container: its target, or its name, under `base`
/// (`/run/secrets/` or `/`) unless absolute.
pub(crate) fn file_target(r: &FileRef, base: &str) -> String {
    let target = r.target.clone().unwrap_or_else(|| r.name.clone());
    if target.starts_with('/') {
        target
    } else {
        format!("{base}{target}")
    }
}

/// Validates a whole Service object: the shared envelope rules, then the spec's own.
pub fn validate_service(svc: &Service) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &svc.api_version, &svc.metadata);
    svc.spec.validate(&mut errors);
    errors.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(spec: serde_json::Value) -> Result<Service, String> {
        serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "web"}, "spec": spec
        }))
        .map_err(|e| e.to_string())
    }

    fn problems(spec: serde_json::Value) -> Vec<String> {
        match validate_service(&svc(spec).unwrap()) {
            Ok(()) => vec![],
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn env_is_a_list_or_a_compose_style_map() {
        let list = svc(json!({"image": "a", "env": [{"name": "PORT", "value": "8080"}]})).unwrap();
        let map = svc(json!({"image": "a", "env": {"PORT": 8080}})).unwrap();
        assert_eq!(list.spec.env, map.spec.env);
        let map = svc(json!({"image": "a", "env": {"B": true, "A": "x y", "C": 1.5}})).unwrap();
        let pairs: Vec<(&str, &str)> = map
            .spec
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(pairs, [("A", "x y"), ("B", "true"), ("C", "1.5")]);
        // Stored (and shown) as the list, whatever form it was written in.
        assert_eq!(
            serde_json::to_value(&map.spec).unwrap()["env"][0],
            json!({"name": "A", "value": "x y"})
        );
        let path_of = |spec| {
            let v = json!({"apiVersion": "berth/v1", "kind": "Service",
                           "metadata": {"name": "web"}, "spec": spec});
            crate::typed::deserialize_value::<Service>(&v)
                .unwrap_err()
                .to_string()
        };
        let e = path_of(json!({"image": "a", "env": {"DEBUG": null}}));
        assert!(
            e.starts_with("spec.env.DEBUG: has no value"),
            "the key is named: {e}"
        );
        let e = path_of(json!({"image": "a", "env": {"A": [1]}}));
        assert!(e.starts_with("spec.env.A: must be a string"), "{e}");
        let e = path_of(json!({"image": "a", "env": "A=1"}));
        assert!(e.contains("a list of {name, value} or a map"), "{e}");
        assert_eq!(
            problems(json!({"image": "a", "env": {"A=B": "1"}})),
            ["spec.env[0].name: `A=B` must not contain `=`"]
        );
    }

    #[test]
    fn full_spec_parses_and_validates() {
        let s = svc(json!({
            "image": "berth-test/busybox:1",
            "replicas": 3,
            "command": ["sleep"], "args": ["1000"],
            "env": [{"name": "A", "value": "1"}, {"name": "B"}],
            "labels": {"team": "x"},
            "resources": {"limits": {"cpus": 0.5, "memory": "128Mi"},
                          "reservations": {"cpus": "100m", "memory": "64m"}},
            "placement": {"constraints": ["node.role == manager"], "maxReplicasPerNode": 2},
            "update": {"parallelism": 1, "delay": "2s", "failureAction": "rollback",
                       "monitor": "5s", "maxFailureRatio": 0.2, "order": "start-first"},
            "restart": {"condition": "on-failure", "delay": "1s", "maxAttempts": 3, "window": "1m"},
            "healthcheck": {"test": ["CMD", "true"], "interval": "5s", "retries": 3},
            "stopGracePeriod": "30s"
        }))
        .unwrap();
        assert_eq!(validate_service(&s), Ok(()));
        assert_eq!(s.spec.update.unwrap().order, Some(UpdateOrder::StartFirst));
    }

    #[test]
    fn type_errors_are_precise() {
        let e = svc(json!({"image": "Bad Image"})).unwrap_err();
        assert!(e.contains("invalid image reference `Bad Image`"), "{e}");
        let e = svc(json!({"image": "a", "replicsa": 2})).unwrap_err();
        assert!(e.contains("unknown field `replicsa`"), "{e}");
        let e = svc(json!({"image": "a", "update": {"order": "sideways"}})).unwrap_err();
        assert!(e.contains("unknown variant `sideways`"), "{e}");
        let e = svc(json!({"image": "a", "replicas": -1})).unwrap_err();
        assert!(e.contains("invalid value: integer `-1`"), "{e}");
        let e = svc(json!({"image": "a", "update": {"delay": "soon"}})).unwrap_err();
        assert!(e.contains("invalid duration `soon`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"image": "a", "mode": "global", "replicas": 2}),
                "spec.replicas: cannot be set when mode is `global`",
            ),
            (
                json!({"image": "a", "replicas": 20000}),
                "spec.replicas: 20000 is out of range (0 to 10000)",
            ),
            (
                json!({"image": "a", "env": [{"name": "A"}, {"name": "A"}]}),
                "spec.env[1].name: `A` is set twice",
            ),
            (
                json!({"image": "a", "env": [{"name": "A=B"}]}),
                "spec.env[0].name: `A=B` must not contain `=`",
            ),
            (
                json!({"image": "a", "labels": {"io.berth.kind": "x"}}),
                "spec.labels.io.berth.kind: label prefix",
            ),
            (
                json!({"image": "a", "resources": {"limits": {"cpus": 1}, "reservations": {"cpus": 2}}}),
                "spec.resources.reservations.cpus: 2 is more than the limit 1",
            ),
            (
                json!({"image": "a", "resources": {"limits": {"memory": "1m"}}}),
                "spec.resources.limits.memory: 1m is below",
            ),
            (
                json!({"image": "a", "placement": {"constraints": ["node.role"]}}),
                "spec.placement.constraints[0]: `node.role` must compare",
            ),
            (
                json!({"image": "a", "update": {"maxFailureRatio": 1.5}}),
                "spec.update.maxFailureRatio: 1.5 is out of range",
            ),
            (
                json!({"image": "a", "healthcheck": {"test": ["true"]}}),
                "spec.healthcheck.test: must be",
            ),
            (
                json!({"image": "a", "command": []}),
                "spec.command: must not be empty",
            ),
            (
                json!({"image": "a", "rollback": {"failureAction": "rollback"}}),
                "spec.rollback.failureAction: `rollback` is not possible",
            ),
        ];
        for (spec, want) in cases {
            let got = problems(spec.clone());
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{spec}: want {want:?}, got {got:?}"
            );
        }
    }

    /// Every count a spec sends to the engine, at `u64::MAX` and just past its limit: a field
    /// error each, never a value the engine would read as negative.
    #[test]
    fn counts_out_of_range_are_field_errors() {
        let max = u64::MAX;
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"update": {"parallelism": max}}),
                "spec.update.parallelism",
            ),
            (
                json!({"rollback": {"parallelism": 10_001}}),
                "spec.rollback.parallelism",
            ),
            (
                json!({"placement": {"maxReplicasPerNode": max}}),
                "spec.placement.maxReplicasPerNode",
            ),
            (
                json!({"restart": {"maxAttempts": max}}),
                "spec.restart.maxAttempts",
            ),
            (
                json!({"healthcheck": {"test": ["CMD", "true"], "retries": max}}),
                "spec.healthcheck.retries",
            ),
            (json!({"forceUpdate": max}), "spec.forceUpdate"),
            (
                json!({"forceUpdate": MAX_FORCE_UPDATE + 1}),
                "spec.forceUpdate",
            ),
        ];
        for (mut spec, path) in cases {
            spec["image"] = json!("a");
            let got = problems(spec.clone());
            assert!(
                got.iter()
                    .any(|g| g.starts_with(&format!("{path}: ")) && g.contains("is out of range")),
                "{spec}: want {path}, got {got:?}"
            );
        }
        assert!(problems(json!({"image": "a", "forceUpdate": MAX_FORCE_UPDATE})).is_empty());
        // Durations the engine cannot hold are refused when parsed.
        let e = svc(json!({"image": "a", "update": {"delay": "3000000h"}})).unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn dependency_references() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"image": "a", "secrets": [{"name": "db", "mode": "999"}]}),
                "spec.secrets[0].mode: must be an octal",
            ),
            (
                json!({"image": "a", "secrets": [{"name": "db"}, {"name": "db2", "target": "db"}]}),
                "spec.secrets[1].target: `/run/secrets/db` is mounted twice",
            ),
            (
                json!({"image": "a", "configs": [{"name": "c", "target": "../etc"}]}),
                "spec.configs[0].target: must be a file path",
            ),
            (
                json!({"image": "a", "volumes": [{"target": "data"}]}),
                "spec.volumes[0].target: must be an absolute path",
            ),
            (
                json!({"image": "a", "volumes": [{"target": "/d", "volume": "v", "tmpfs": true}]}),
                "spec.volumes[0].tmpfs: cannot be combined",
            ),
            (
                json!({"image": "a", "volumes": [{"target": "/d", "size": "1m"}]}),
                "spec.volumes[0].size: applies to tmpfs",
            ),
            (
                json!({"image": "a", "networks": ["n", "n"]}),
                "spec.networks[1]: `n` is listed twice",
            ),
            (
                json!({"image": "a", "networks": ["Bad_Net"]}),
                "spec.networks[0]: `Bad_Net` must be a DNS label",
            ),
        ];
        for (spec, want) in cases {
            let got = problems(spec.clone());
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{spec}: want {want:?}, got {got:?}"
            );
        }
        let ok = svc(json!({"image": "a",
            "secrets": [{"name": "db", "key": "password", "target": "db_pw", "uid": "0", "gid": "0", "mode": "0440"}],
            "configs": [{"name": "nginx", "target": "/etc/nginx.conf"}],
            "volumes": [{"target": "/data", "volume": "pgdata"}, {"target": "/tmp", "tmpfs": true, "size": "64m"}, {"target": "/cache"}],
            "networks": ["backend"]})).unwrap();
        assert_eq!(validate_service(&ok), Ok(()));
        assert_eq!(ok.spec.secrets[0].mode_bits(), Some(0o440));
        assert_eq!(ok.spec.references(crate::Kind::Volume), vec!["pgdata"]);
        assert_eq!(ok.spec.references(crate::Kind::Network), vec!["backend"]);
        let plain = svc(json!({"image": "a"})).unwrap();
        assert!(plain
            .spec
            .uses(crate::Kind::Network, "berth-internal", "berth-internal"));
        assert!(!plain
            .spec
            .uses(crate::Kind::Network, "backend", "berth-internal"));
        assert!(ok
            .spec
            .uses(crate::Kind::Network, "backend", "berth-internal"));
        assert!(!ok
            .spec
            .uses(crate::Kind::Network, "berth-internal", "berth-internal"));
        assert_eq!(
            plain.spec.references(crate::Kind::Network),
            Vec::<&str>::new()
        );
        let unbacked: Vec<_> = ok
            .spec
            .volumes
            .iter()
            .filter_map(|v| v.unbacked_reason())
            .collect();
        assert_eq!(unbacked, vec!["tmpfs", "anonymous volume"]);
    }

    #[test]
    fn envelope_rules_apply() {
        let mut s = svc(json!({"image": "a"})).unwrap();
        s.metadata.name = "Web_1".into();
        s.api_version = "v1".into();
        let e: Vec<String> = validate_service(&s)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(e[0].starts_with("apiVersion: `v1` is not served"), "{e:?}");
        assert!(
            e[1].starts_with("metadata.name: `Web_1` must be a DNS label"),
            "{e:?}"
        );
    }
}
