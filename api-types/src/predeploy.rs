//! Pre-deploy steps of a Service (`spec.deploy.preDeploy`): database migrations and other scripts
//! that run on the cluster, with the image being deployed, before the service rolls to it. Each
//! step is a one-shot Swarm job; the rollout goes ahead only when every step exits 0. Here: the
//! spec, its validation, and the status the service controller reports about the steps.

use crate::service::{EnvVar, FileRef, ServiceSpec};
use crate::units::Duration;
use crate::validate::Errors;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// A step's timeout when it names none.
pub const DEFAULT_STEP_TIMEOUT_SECS: u64 = 600;
/// The longest a step may run: a migration that takes a day is an operation, not a deploy step.
pub const MAX_STEP_TIMEOUT_SECS: u64 = 24 * 3600;
/// Most steps per Service.
pub const MAX_STEPS: usize = 10;
/// How many rollouts' jobs are kept (for `berth logs job`) when `jobHistory` is not given.
pub const DEFAULT_JOB_HISTORY: u64 = 3;
/// Most rollouts' jobs kept.
pub const MAX_JOB_HISTORY: u64 = 50;
/// How many lines of a failed step's log its status keeps.
pub const LOG_TAIL_LINES: usize = 20;

/// How a Service is deployed, beyond the Swarm update policy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploySpec {
    /// Steps run in order before every rollout of a new image (or a forced redeploy), each as a
    /// one-shot Swarm job with the new image and the service's networks, volumes, secrets, configs
    /// and env. The rollout proceeds only when every step exits 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_deploy: Vec<PreDeployStep>,
    /// How many rollouts' jobs are kept for `berth logs job` (default 3); older ones are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_history: Option<u64>,
}

/// One pre-deploy step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreDeployStep {
    /// Names the step in status, events and `berth logs job` (a DNS label, unique in the list).
    pub name: String,
    /// Replaces the image's entrypoint (the service's own `command` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's CMD (the service's own `args` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Added to the service's env; a name the service sets too takes the step's value.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::service::env_list_or_map"
    )]
    #[schemars(schema_with = "crate::service::env_schema")]
    pub env: Vec<EnvVar>,
    /// Stopped and reported as timed out after this long (default 10m, at most 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Secret keys mounted for this step only, besides the service's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<FileRef>,
    /// Config keys mounted for this step only, besides the service's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<FileRef>,
    /// Also run when the rollout is a rollback (`berth rollout undo`). Off by default: going back
    /// to an older image should not run migrations forward again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_rollback: bool,
}

impl PreDeployStep {
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout.as_ref().map_or(
            std::time::Duration::from_secs(DEFAULT_STEP_TIMEOUT_SECS),
            |d| std::time::Duration::from_nanos(d.as_nanos()),
        )
    }

    /// The service spec a step's job runs: the service's, with the step's command, args, env,
    /// secrets and configs. Its image is the service's (the one being deployed).
    pub fn job_spec(&self, service: &ServiceSpec) -> ServiceSpec {
        let mut spec = service.clone();
        if self.command.is_some() {
            spec.command = self.command.clone();
        }
        if self.args.is_some() {
            spec.args = self.args.clone();
        }
        for e in &self.env {
            match spec.env.iter_mut().find(|s| s.name == e.name) {
                Some(s) => s.value = e.value.clone(),
                None => spec.env.push(e.clone()),
            }
        }
        spec.secrets.extend(self.secrets.iter().cloned());
        spec.configs.extend(self.configs.iter().cloned());
        spec
    }
}

impl DeploySpec {
    pub fn job_history(&self) -> u64 {
        self.job_history.unwrap_or(DEFAULT_JOB_HISTORY)
    }

    /// The steps a rollout runs: all of them, or for a rollback only those marked `onRollback`.
    pub fn steps_for(&self, rollback: bool) -> Vec<(usize, &PreDeployStep)> {
        self.pre_deploy
            .iter()
            .enumerate()
            .filter(|(_, s)| !rollback || s.on_rollback)
            .collect()
    }

    /// Rules the types cannot express, for the `service` spec this belongs to.
    pub fn validate(&self, service: &ServiceSpec, errors: &mut Errors) {
        if self.pre_deploy.len() > MAX_STEPS {
            errors.add(
                "spec.deploy.preDeploy",
                format!("has {} steps; at most {MAX_STEPS}", self.pre_deploy.len()),
            );
        }
        if let Some(h) = self.job_history {
            if !(1..=MAX_JOB_HISTORY).contains(&h) {
                errors.add(
                    "spec.deploy.jobHistory",
                    format!("{h} is out of range (1 to {MAX_JOB_HISTORY})"),
                );
            }
        }
        let mut names = HashSet::new();
        for (i, step) in self.pre_deploy.iter().enumerate() {
            let at = |field: &str| format!("spec.deploy.preDeploy[{i}].{field}");
            crate::validate::check_dns_label(errors, &at("name"), &step.name);
            if !names.insert(step.name.as_str()) {
                errors.add(at("name"), format!("`{}` names two steps", step.name));
            }
            if step.command.is_none() && step.args.is_none() {
                errors.add(
                    at("command"),
                    "a step needs `command` or `args` (else it would run the service's own program)",
                );
            }
            if step.command.as_ref().is_some_and(Vec::is_empty) {
                errors.add(
                    at("command"),
                    "must not be empty when given (omit it to use the image's entrypoint)",
                );
            }
            if let Some(t) = &step.timeout {
                let secs = t.as_nanos() / 1_000_000_000;
                if t.as_nanos() < 1_000_000_000 || secs > MAX_STEP_TIMEOUT_SECS {
                    errors.add(at("timeout"), format!("{t} is out of range (1s to 24h)"));
                }
            }
            crate::service::check_env_names(errors, &at("env"), &step.env);
            // The step's files join the service's in one container: check them together, under
            // the step's own paths.
            let mut job = service.clone();
            job.secrets = step.secrets.clone();
            job.configs = step.configs.clone();
            job.volumes.clear();
            job.networks.clear();
            let mut own = Errors::default();
            job.validate_files(&mut own);
            for e in own.into_result().err().unwrap_or_default() {
                errors.add(
                    format!(
                        "spec.deploy.preDeploy[{i}].{}",
                        e.path.trim_start_matches("spec.")
                    ),
                    e.message,
                );
            }
            for (field, refs, base) in [
                ("secrets", &step.secrets, "/run/secrets/"),
                ("configs", &step.configs, "/"),
            ] {
                let taken: HashSet<String> = match field {
                    "secrets" => service.secrets.iter(),
                    _ => service.configs.iter(),
                }
                .map(|r| crate::service::file_target(r, base))
                .collect();
                for (j, r) in refs.iter().enumerate() {
                    let target = crate::service::file_target(r, base);
                    if taken.contains(&target) {
                        errors.add(
                            at(&format!("{field}[{j}].target")),
                            format!("`{target}` is already mounted by the service"),
                        );
                    }
                }
            }
        }
    }
}

/// What happened to the steps of the latest rollout that has steps (a Service's
/// `status.preDeploy`). Written by the service controller; also its memory of a step that failed
/// or timed out, so that the steps do not run again until a new rollout is asked for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreDeployStatus {
    /// The rollout the steps are for: a hash of the image (with its pinned digest) and the
    /// forced-redeploy counter. The jobs carry it as a label.
    pub rollout: String,
    /// The revision this rollout is (or would have been) in the history.
    pub revision: u64,
    /// The image the steps ran with.
    pub image: String,
    pub steps: Vec<StepStatus>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub name: String,
    pub state: StepState,
    /// The Swarm job's name (`berth logs job` reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The last lines of a failed or timed-out step's log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// The last line the step wrote to stderr. The engine stamps stdout and stderr lines as two
    /// copiers read them, so lines written a moment apart on the two streams may come out of
    /// order in `logTail`; the error a step printed last is kept on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    /// Not started yet (an earlier step runs).
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    TimedOut,
}

impl StepState {
    pub fn is_failure(self) -> bool {
        matches!(self, StepState::Failed | StepState::TimedOut)
    }
}

impl std::fmt::Display for StepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::TimedOut => "timed-out",
        })
    }
}

impl PreDeployStatus {
    /// The step that failed or timed out, if one did.
    pub fn failure(&self) -> Option<&StepStatus> {
        self.steps.iter().find(|s| s.state.is_failure())
    }
}

impl StepStatus {
    /// One line for a condition, an event or `rollout status`: which step, how it ended, and the
    /// last line it wrote to stderr (or, without one, the last line of its log).
    pub fn summary(&self) -> String {
        let how = match (self.state, self.exit_code) {
            (StepState::Failed, Some(code)) => format!("failed with exit code {code}"),
            (StepState::TimedOut, _) => "timed out and was stopped".to_string(),
            (state, _) => state.to_string(),
        };
        let mut s = format!("pre-deploy step `{}` {how}", self.name);
        if let Some(m) = self.message.as_deref().filter(|m| !m.is_empty()) {
            s.push_str(&format!(" ({m})"));
        }
        let last = self
            .last_error
            .iter()
            .chain(self.log_tail.iter().rev())
            .find(|l| !l.trim().is_empty());
        if let Some(last) = last {
            s.push_str(&format!(": {}", last.trim()));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::service::{validate_service, Service};
    use serde_json::json;

    fn problems(deploy: serde_json::Value) -> Vec<String> {
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"image": "app:1", "secrets": [{"name": "db", "target": "db_password"}],
                     "env": {"MODE": "web"}, "deploy": deploy}
        }))
        .unwrap();
        match validate_service(&svc) {
            Ok(()) => vec![],
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn steps_are_checked_at_their_own_paths() {
        assert!(
            problems(json!({"preDeploy": [{"name": "migrate", "command": ["/app/migrate"]}]}))
                .is_empty()
        );
        let p = problems(json!({"preDeploy": [
            {"name": "migrate", "args": ["up"]},
            {"name": "migrate", "command": [], "timeout": "48h"},
            {"name": "Bad_Name"},
            {"name": "seed", "args": ["x"], "env": [{"name": "A=B", "value": "1"}],
             "secrets": [{"name": "db", "target": "db_password"}]}
        ], "jobHistory": 0}));
        let text = p.join("\n");
        for expected in [
            "spec.deploy.preDeploy[1].name: `migrate` names two steps",
            "spec.deploy.preDeploy[1].command: must not be empty",
            "spec.deploy.preDeploy[1].timeout: 48h is out of range (1s to 24h)",
            "spec.deploy.preDeploy[2].name",
            "spec.deploy.preDeploy[2].command: a step needs `command` or `args`",
            "spec.deploy.preDeploy[3].env[0].name: `A=B` must not contain `=`",
            "spec.deploy.preDeploy[3].secrets[0].target: `/run/secrets/db_password` is already mounted by the service",
            "spec.deploy.jobHistory: 0 is out of range (1 to 50)",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }

    #[test]
    fn a_job_runs_the_service_with_the_steps_overrides() {
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"image": "app:2", "command": ["/app/web"], "args": ["--port", "80"],
                     "env": {"MODE": "web", "DB": "db:5432"},
                     "deploy": {"preDeploy": [
                        {"name": "migrate", "args": ["migrate"], "env": {"MODE": "migrate"},
                         "configs": [{"name": "schema", "target": "/schema.sql"}]},
                        {"name": "warm", "command": ["/app/warm"], "onRollback": true}]}}
        }))
        .unwrap();
        let d = svc.spec.deploy.as_ref().unwrap();
        let job = d.pre_deploy[0].job_spec(&svc.spec);
        assert_eq!(job.image.to_string(), "app:2");
        assert_eq!(job.command, Some(vec!["/app/web".to_string()]));
        assert_eq!(job.args, Some(vec!["migrate".to_string()]));
        let env: Vec<(&str, &str)> = job
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(env, [("DB", "db:5432"), ("MODE", "migrate")]);
        assert_eq!(job.configs.len(), 1);
        assert_eq!(d.pre_deploy[0].timeout().as_secs(), 600);
        let names = |rollback| {
            d.steps_for(rollback)
                .into_iter()
                .map(|(i, s)| (i, s.name.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(false), [(0, "migrate".into()), (1, "warm".into())]);
        assert_eq!(
            names(true),
            [(1, "warm".into())],
            "a rollback runs only onRollback steps"
        );
        // The step's own files are dependencies of the Service.
        assert!(svc.spec.uses(crate::Kind::Config, "schema", "net"));
    }

    #[test]
    fn a_failed_step_is_summed_up_with_its_last_log_line() {
        use super::*;
        let s = StepStatus {
            name: "migrate".into(),
            state: StepState::Failed,
            exit_code: Some(3),
            log_tail: vec!["applying 7".into(), "table exists".into(), "".into()],
            ..Default::default()
        };
        assert_eq!(
            s.summary(),
            "pre-deploy step `migrate` failed with exit code 3: table exists"
        );
        let t = StepStatus {
            state: StepState::TimedOut,
            message: Some("ran longer than its timeout of 3s".into()),
            ..s
        };
        assert_eq!(
            t.summary(),
            "pre-deploy step `migrate` timed out and was stopped (ran longer than its timeout of 3s): table exists"
        );
        // The stderr line wins over a stdout line the engine stamped later.
        let e = StepStatus {
            log_tail: vec!["table exists".into(), "applying 7".into()],
            last_error: Some("table exists".into()),
            ..t.clone()
        };
        assert!(e.summary().ends_with("): table exists"), "{}", e.summary());
    }
}
