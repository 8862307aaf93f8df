//! Service, the pre-deploy gate (between build and apply): before the Swarm service rolls to a new
//! image (or a forced redeploy), each step of `spec.deploy.preDeploy` runs as a one-shot Swarm job
//! (`replicated-job` mode) with that image and the service's networks, volumes, secrets, configs
//! and env, in order. The rollout goes ahead only when every step exited 0; otherwise the service
//! keeps its current image and the status names the step, its exit code and its last log lines.
//!
//! Level-based: what runs is read back from the engine each time. The jobs are labelled with the
//! rollout they gate (a hash of the built image and the forced-redeploy counter), so a reconcile
//! finds the job of each step and goes on from where the steps are. A step that failed or timed out
//! is remembered in `status.preDeploy` (the jobs may be gone): the steps do not run again for that
//! rollout; a new deploy (another image, `rollout restart`, a webhook call) is a new rollout.
//! Jobs of the last `jobHistory` rollouts are kept for `berth logs job`; older ones are removed.

use super::build::{self, Built};
use super::dereference::{self, Deps, Sources};
use crate::runtime::Error;
use crate::swarm::engine::{gone, message};
use crate::swarm::hash::canonical_hash;
use crate::swarm::Owner;
use berth_api_types::names::{labels, swarm as swarm_names};
use berth_api_types::predeploy::{
    PreDeployStatus, PreDeployStep, StepState, StepStatus, LOG_TAIL_LINES,
};
use berth_api_types::service::{Revision, Service};
use bollard::container::LogOutput;
use bollard::models::{
    HealthConfig, Service as SwarmService, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicatedJob, Task, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
    TaskState,
};
use bollard::query_parameters::{ListServicesOptions, ListTasksOptions, LogsOptions};
use bollard::Docker;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::collections::HashMap;
use tracing::{info, warn};

/// Whether applying `built` starts a rollout of new tasks: the service does not exist yet, or its
/// tasks run another image or forced-redeploy counter. Other changes (replicas, env...) are not
/// deploys and run no steps.
pub fn rollout_pending(current: Option<&ServiceSpec>, built: &ServiceSpec) -> bool {
    let Some(current) = current else {
        return true;
    };
    let image = |s: &ServiceSpec| {
        s.task_template
            .as_ref()
            .and_then(|t| t.container_spec.as_ref())
            .and_then(|c| c.image.clone())
    };
    let force = |s: &ServiceSpec| {
        s.task_template
            .as_ref()
            .and_then(|t| t.force_update)
            .unwrap_or(0)
    };
    image(current) != image(built) || force(current) != force(built)
}

/// The rollout a built spec is, with the steps it runs: its image (as pinned), forced-redeploy
/// counter and the steps. Steps edited after a failure (a fixed migration command) are a new
/// rollout, so they run; the same steps for the same image are not run again.
pub fn rollout_key(built: &ServiceSpec, steps: &[(usize, &PreDeployStep)]) -> String {
    let t = built.task_template.as_ref();
    let v = serde_json::json!({
        "image": t.and_then(|t| t.container_spec.as_ref()).and_then(|c| c.image.clone()),
        "force": t.and_then(|t| t.force_update).unwrap_or(0),
        "steps": steps,
    });
    canonical_hash(&v)[..16].to_string()
}

/// The revision number the rollout will have: the latest one if it is this very image, digest and
/// counter (a failed pre-deploy of it, looked at again), else the next.
pub fn revision_of(
    revisions: &[Revision],
    image: &str,
    digest: Option<&str>,
    force_update: u64,
) -> u64 {
    match revisions.last() {
        Some(r)
            if r.image == image
                && r.digest.as_deref() == digest
                && r.force_update == force_update =>
        {
            r.revision
        }
        Some(r) => r.revision + 1,
        None => 1,
    }
}

/// A job's Swarm name: `<service>_job-<revision>-<step>`, or with a hash of revision and step
/// when that would be too long for the engine (63 characters). It starts with the Service's name,
/// so whatever matches a Service's objects by name prefix (tests' cleanups) finds its jobs too.
pub fn job_name(service: &str, revision: u64, step: &str) -> String {
    let name = format!("{service}{}{revision}-{step}", swarm_names::JOB_INFIX);
    if name.len() <= 63 {
        return name;
    }
    let h = canonical_hash(&serde_json::json!([service, revision, step]));
    let short = format!("{}{revision}-{}", swarm_names::JOB_INFIX, &h[..8]);
    let keep = 63usize.saturating_sub(short.len()).min(service.len());
    format!("{}{short}", &service[..keep])
}

/// What one step's job is for (its labels).
pub struct JobFor<'a> {
    pub service: &'a str,
    pub rollout: &'a str,
    pub revision: u64,
    pub step: usize,
}

/// Turns the service spec built for a step (`PreDeployStep::job_spec` through `build`) into its
/// job: one task that runs to completion, never restarted, no update policy, no healthcheck (a job
/// is judged by its exit code), labelled as the Service's pre-deploy job. Pure.
pub fn job_spec(
    mut built: ServiceSpec,
    owner: &Owner,
    job: &JobFor,
    step_name: &str,
) -> ServiceSpec {
    let revision = job.revision.to_string();
    let step = job.step.to_string();
    built.name = Some(job_name(job.service, job.revision, step_name));
    built.labels = Some(owner.labels_with(
        job.service,
        &[
            (labels::ROLE, labels::ROLE_PRE_DEPLOY),
            (labels::ROLLOUT, job.rollout),
            (labels::REVISION, &revision),
            (labels::STEP, &step),
        ],
    ));
    built.mode = Some(ServiceSpecMode {
        replicated_job: Some(ServiceSpecModeReplicatedJob {
            max_concurrent: Some(1),
            total_completions: Some(1),
        }),
        ..Default::default()
    });
    built.update_config = None;
    built.rollback_config = None;
    if let Some(t) = built.task_template.as_mut() {
        t.restart_policy = Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
            ..Default::default()
        });
        if let Some(c) = t.container_spec.as_mut() {
            c.health_check = Some(HealthConfig {
                test: Some(vec!["NONE".into()]),
                ..Default::default()
            });
        }
    }
    built
}

/// How one job's task ended, or that it has not.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Not started or still running, since this time (the job's creation).
    Running,
    Succeeded,
    Failed {
        exit_code: Option<i64>,
        err: String,
    },
}

/// The state of a job from its tasks (one task: `total_completions` is 1 and nothing restarts).
pub fn job_state(tasks: &[Task]) -> JobState {
    let Some(task) = tasks.iter().max_by_key(|t| t.created_at) else {
        return JobState::Running;
    };
    let status = task.status.as_ref();
    match status.and_then(|s| s.state) {
        Some(TaskState::COMPLETE) => JobState::Succeeded,
        Some(
            TaskState::FAILED | TaskState::REJECTED | TaskState::SHUTDOWN | TaskState::ORPHANED,
        ) => JobState::Failed {
            exit_code: status
                .and_then(|s| s.container_status.as_ref())
                .and_then(|c| c.exit_code),
            err: status.and_then(|s| s.err.clone()).unwrap_or_default(),
        },
        _ => JobState::Running,
    }
}

/// How long after a job's task ended its log is taken as complete.
const LOG_SETTLE: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// Whether the job's task ended less than [`LOG_SETTLE`] ago.
fn just_ended(tasks: &[Task], now: DateTime<Utc>) -> bool {
    tasks
        .iter()
        .max_by_key(|t| t.created_at)
        .and_then(|t| t.status.as_ref()?.timestamp)
        .is_some_and(|at| now - at < LOG_SETTLE)
}

/// What the gate decided.
pub enum Gate {
    /// Every step succeeded: apply, with this as `status.preDeploy`.
    Passed(PreDeployStatus),
    /// A step runs: come back soon.
    Running(PreDeployStatus),
    /// A step failed or timed out: the service stays as it is. `settle`: the failure was only just
    /// seen (a timed-out job is stopped by the next reconcile, once this status is stored).
    Failed {
        status: PreDeployStatus,
        settle: bool,
    },
    /// A step's secrets, configs, volumes or networks do not exist yet.
    Waiting { reasons: Vec<String>, soon: bool },
}

/// The gate for one rollout of one Service.
pub struct Rollout<'a> {
    pub svc: &'a Service,
    pub steps: Vec<(usize, &'a PreDeployStep)>,
    pub key: String,
    pub revision: u64,
    pub image: String,
    /// The digest the service's image is pinned to for this rollout, if it is.
    pub digest: Option<&'a str>,
    /// `status.preDeploy` as stored.
    pub previous: Option<&'a PreDeployStatus>,
    pub now: DateTime<Utc>,
}

/// Runs the gate: reads the jobs back, starts the next step's, stops one past its timeout.
pub async fn gate(src: &Sources<'_>, r: &Rollout<'_>) -> Result<Gate, Error> {
    let name = r.svc.metadata.name.as_str();
    let docker = src.docker;
    // What was stored for this rollout: a failure there is final.
    let mut status = match r.previous.filter(|p| p.rollout == r.key) {
        Some(p) => p.clone(),
        None => PreDeployStatus {
            rollout: r.key.clone(),
            revision: r.revision,
            image: r.image.clone(),
            steps: r
                .steps
                .iter()
                .map(|(_, s)| StepStatus {
                    name: s.name.clone(),
                    ..Default::default()
                })
                .collect(),
        },
    };
    // Every step of this rollout succeeded already (the engine rolled its tasks back since, or the
    // write is retried): the steps are not run again, whether or not their jobs are still kept.
    if !status.steps.is_empty() && status.steps.iter().all(|s| s.state == StepState::Succeeded) {
        return Ok(Gate::Passed(status));
    }
    let jobs = jobs_of(docker, src.owner, name, Some(&r.key)).await?;
    if status.failure().is_some() {
        // Stop what still runs of it (a timed-out job, once its status is stored).
        for job in &jobs {
            if job_state(&tasks_of(docker, job).await?) == JobState::Running {
                info!(job = ?job_name_of(job), "stopping the pre-deploy job of a failed rollout");
                remove(docker, job).await?;
            }
        }
        return Ok(Gate::Failed {
            status,
            settle: false,
        });
    }
    for (pos, (index, step)) in r.steps.iter().enumerate() {
        let Some(st) = status.steps.get_mut(pos) else {
            break;
        };
        let job = jobs
            .iter()
            .find(|j| label(j, labels::STEP).and_then(|s| s.parse::<usize>().ok()) == Some(*index));
        let Some(job) = job else {
            // Start this step's job.
            let spec = step.job_spec(&r.svc.spec);
            let mut job_svc = r.svc.clone();
            job_svc.spec = spec;
            let resolved = match dereference::dependencies(src, &job_svc.spec).await? {
                Deps::Ready(resolved) => resolved,
                Deps::Waiting { reasons, soon } => return Ok(Gate::Waiting { reasons, soon }),
            };
            let Built { spec, .. } = build::build_pinned(&job_svc, src.owner, &resolved, r.digest);
            let spec = job_spec(
                spec,
                src.owner,
                &JobFor {
                    service: name,
                    rollout: &r.key,
                    revision: r.revision,
                    step: *index,
                },
                &step.name,
            );
            let job_name = spec.name.clone().unwrap_or_default();
            // A job of this name from another rollout (a revision number reused after the history
            // was cut) goes first.
            for stale in jobs_of(docker, src.owner, name, None).await? {
                if job_name_of(&stale) == Some(job_name.as_str()) {
                    remove(docker, &stale).await?;
                }
            }
            docker.create_service(spec, None).await.map_err(|e| {
                Error::Transient(format!("cannot start pre-deploy job: {}", message(&e)))
            })?;
            info!(job = %job_name, step = %step.name, "started pre-deploy job");
            st.state = StepState::Running;
            st.job = Some(job_name);
            st.started = Some(r.now);
            return Ok(Gate::Running(status));
        };
        st.job = job_name_of(job).map(str::to_string);
        let started = job.created_at.unwrap_or(r.now);
        st.started = Some(started);
        let tasks = tasks_of(docker, job).await?;
        match job_state(&tasks) {
            JobState::Succeeded => {
                st.state = StepState::Succeeded;
                st.exit_code = Some(0);
                st.finished.get_or_insert(r.now);
            }
            JobState::Failed { .. } if just_ended(&tasks, r.now) => {
                // The engine's log copier may still hold the last lines the job wrote: look again
                // in a moment, so that the reported tail ends where the job did.
                st.state = StepState::Running;
                return Ok(Gate::Running(status));
            }
            JobState::Failed { exit_code, err } => {
                st.state = StepState::Failed;
                st.exit_code = exit_code;
                // The engine's "non-zero exit (3)" says no more than the exit code; its other
                // errors ("No such image") say why there is none.
                st.message = Some(err).filter(|e| !e.is_empty() && exit_code.is_none());
                (st.log_tail, st.last_error) = log_tail(docker, &tasks).await;
                st.finished = Some(r.now);
                warn!(step = %step.name, ?exit_code, "pre-deploy step failed");
                return Ok(Gate::Failed {
                    status,
                    settle: false,
                });
            }
            JobState::Running => {
                let limit = step.timeout();
                let ran = (r.now - started).to_std().unwrap_or_default();
                if ran >= limit {
                    st.state = StepState::TimedOut;
                    st.message = Some(format!(
                        "ran longer than its timeout of {}s",
                        limit.as_secs()
                    ));
                    (st.log_tail, st.last_error) = log_tail(docker, &tasks).await;
                    st.finished = Some(r.now);
                    warn!(step = %step.name, "pre-deploy step timed out");
                    return Ok(Gate::Failed {
                        status,
                        settle: true,
                    });
                }
                st.state = StepState::Running;
                return Ok(Gate::Running(status));
            }
        }
    }
    Ok(Gate::Passed(status))
}

/// Removes the jobs of all but the newest `keep` rollouts of a Service (by revision).
pub async fn collect(
    docker: &Docker,
    owner: &Owner,
    service: &str,
    keep: u64,
) -> Result<(), Error> {
    let jobs = jobs_of(docker, owner, service, None).await?;
    let mut revisions: Vec<u64> = jobs
        .iter()
        .filter_map(|j| label(j, labels::REVISION).and_then(|r| r.parse().ok()))
        .collect();
    revisions.sort_unstable();
    revisions.dedup();
    let cut = revisions.len().saturating_sub(keep as usize);
    let old: Vec<u64> = revisions[..cut].to_vec();
    for job in jobs {
        let rev = label(&job, labels::REVISION).and_then(|r| r.parse::<u64>().ok());
        if rev.is_some_and(|r| old.contains(&r)) {
            info!(job = ?job_name_of(&job), "removing an old pre-deploy job");
            remove(docker, &job).await?;
        }
    }
    Ok(())
}

/// The pre-deploy jobs of a Service: all, or those of one rollout.
pub async fn jobs_of(
    docker: &Docker,
    owner: &Owner,
    service: &str,
    rollout: Option<&str>,
) -> Result<Vec<SwarmService>, Error> {
    let mut extra = vec![(labels::ROLE, labels::ROLE_PRE_DEPLOY)];
    if let Some(r) = rollout {
        extra.push((labels::ROLLOUT, r));
    }
    Ok(docker
        .list_services(Some(ListServicesOptions {
            filters: Some(owner.filters(Some(service), &extra)),
            ..Default::default()
        }))
        .await?)
}

/// Whether a Swarm service is a pre-deploy job (not the Service's own).
pub fn is_job(s: &SwarmService) -> bool {
    label(s, labels::ROLE) == Some(labels::ROLE_PRE_DEPLOY)
}

fn label<'a>(s: &'a SwarmService, key: &str) -> Option<&'a str> {
    s.spec
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn job_name_of(s: &SwarmService) -> Option<&str> {
    s.spec.as_ref()?.name.as_deref()
}

async fn tasks_of(docker: &Docker, job: &SwarmService) -> Result<Vec<Task>, Error> {
    let id = job.id.clone().unwrap_or_default();
    Ok(docker
        .list_tasks(Some(ListTasksOptions {
            filters: Some(HashMap::from([("service".to_string(), vec![id])])),
        }))
        .await?)
}

async fn remove(docker: &Docker, job: &SwarmService) -> Result<(), Error> {
    Ok(gone(
        docker
            .delete_service(job.id.as_deref().unwrap_or_default())
            .await,
    )?)
}

/// The last lines of the job's task log (stdout and stderr), read through the manager, and the
/// last line it wrote to stderr.
async fn log_tail(docker: &Docker, tasks: &[Task]) -> (Vec<String>, Option<String>) {
    let Some(id) = tasks
        .iter()
        .max_by_key(|t| t.created_at)
        .and_then(|t| t.id.clone())
    else {
        return (Vec::new(), None);
    };
    let mut stream = docker.task_logs(
        &id,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: LOG_TAIL_LINES.to_string(),
            // stdout and stderr arrive as two streams: the engine's timestamps put them in order.
            timestamps: true,
            ..Default::default()
        }),
    );
    let mut text = String::new();
    let mut errors = String::new();
    let read = async {
        while let Some(item) = stream.next().await {
            match item {
                Ok(LogOutput::StdErr { message }) => {
                    let line = String::from_utf8_lossy(&message);
                    errors.push_str(&line);
                    text.push_str(&line)
                }
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                    text.push_str(&String::from_utf8_lossy(&message))
                }
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) => {
                    warn!(error = %message(&e), "cannot read a pre-deploy job's log");
                    break;
                }
            }
        }
    };
    // A log that does not end (a job stopped at its timeout) is read for a bounded time.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
    let last_error = ordered_tail(&errors)
        .into_iter()
        .rev()
        .find(|l| !l.trim().is_empty());
    (ordered_tail(&text), last_error)
}

/// Log lines as the engine sends them with `timestamps` (`<RFC 3339> <line>`), in time order and
/// without the timestamps, the last [`LOG_TAIL_LINES`] of them.
fn ordered_tail(text: &str) -> Vec<String> {
    let mut lines: Vec<(&str, &str)> = text
        .lines()
        .map(|l| l.split_once(' ').unwrap_or(("", l)))
        .collect();
    // RFC 3339 in UTC with nanoseconds sorts as text; equal times keep their order.
    lines.sort_by(|a, b| a.0.cmp(b.0));
    let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[skip..].iter().map(|(_, l)| l.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::service::RolloutResult;
    use berth_api_types::Kind;
    use bollard::models::{TaskSpec, TaskSpecContainerSpec, TaskStatus};

    fn spec(image: &str, force: u64) -> ServiceSpec {
        ServiceSpec {
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(image.into()),
                    ..Default::default()
                }),
                force_update: (force > 0).then_some(force),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_new_image_or_a_forced_redeploy_is_a_rollout() {
        let v1 = spec("app:1", 0);
        assert!(rollout_pending(None, &v1), "a first deploy runs the steps");
        assert!(!rollout_pending(Some(&v1), &v1));
        assert!(rollout_pending(Some(&v1), &spec("app:2", 0)));
        assert!(rollout_pending(Some(&v1), &spec("app:1", 1)));
        // Replicas, env and the like are not deploys.
        let mut scaled = v1.clone();
        scaled.labels = Some(HashMap::from([("x".into(), "y".into())]));
        assert!(!rollout_pending(Some(&v1), &scaled));
    }

    #[test]
    fn the_rollout_key_follows_image_counter_and_steps() {
        let step: PreDeployStep =
            serde_json::from_value(serde_json::json!({"name": "m", "args": ["up"]})).unwrap();
        let steps = [(0, &step)];
        let a = rollout_key(&spec("app:2", 0), &steps);
        assert_eq!(a, rollout_key(&spec("app:2", 0), &steps));
        assert_ne!(a, rollout_key(&spec("app:2@sha256:aa", 0), &steps));
        assert_ne!(a, rollout_key(&spec("app:2", 1), &steps));
        let fixed: PreDeployStep =
            serde_json::from_value(serde_json::json!({"name": "m", "args": ["up", "--fix"]}))
                .unwrap();
        assert_ne!(a, rollout_key(&spec("app:2", 0), &[(0, &fixed)]));
        assert_eq!(a.len(), 16);
    }

    fn rev(n: u64, image: &str, result: RolloutResult) -> Revision {
        Revision {
            revision: n,
            image: image.into(),
            digest: None,
            generation: n,
            force_update: 0,
            time: chrono::Utc::now(),
            trigger: "api".into(),
            deploy_id: None,
            result,
            message: None,
        }
    }

    #[test]
    fn a_failed_rollout_keeps_its_revision_number() {
        assert_eq!(revision_of(&[], "app:1", None, 0), 1);
        let h = vec![rev(1, "app:1", RolloutResult::Complete)];
        assert_eq!(revision_of(&h, "app:2", None, 0), 2);
        let h = vec![
            rev(1, "app:1", RolloutResult::Complete),
            rev(2, "app:2", RolloutResult::FailedPredeploy),
        ];
        assert_eq!(revision_of(&h, "app:2", None, 0), 2);
        assert_eq!(revision_of(&h, "app:2", None, 1), 3);
        assert_eq!(revision_of(&h, "app:2", Some("sha256:bb"), 0), 3);
    }

    #[test]
    fn job_names_start_with_the_service_and_fit_the_engine() {
        assert_eq!(job_name("web", 4, "migrate"), "web_job-4-migrate");
        let long = "s".repeat(60);
        let n = job_name(&long, 12, "migrate-the-database");
        assert!(n.len() <= 63, "{n}");
        assert!(n.starts_with("sss"), "{n}");
        assert!(n.contains("_job-12-"), "{n}");
        assert_ne!(n, job_name(&long, 12, "seed"));
    }

    #[test]
    fn a_job_runs_once_without_restarts_healthchecks_or_update_policy() {
        let owner = Owner::new("inst", Kind::Service);
        let mut built = spec("app:2", 0);
        built.name = Some("web".into());
        built.update_config = Some(Default::default());
        let job = job_spec(
            built,
            &owner,
            &JobFor {
                service: "web",
                rollout: "abc",
                revision: 3,
                step: 1,
            },
            "migrate",
        );
        assert_eq!(job.name.as_deref(), Some("web_job-3-migrate"));
        let mode = job.mode.unwrap();
        assert!(mode.replicated.is_none() && mode.global.is_none());
        let rj = mode.replicated_job.unwrap();
        assert_eq!(
            (rj.max_concurrent, rj.total_completions),
            (Some(1), Some(1))
        );
        assert!(job.update_config.is_none() && job.rollback_config.is_none());
        let t = job.task_template.unwrap();
        assert_eq!(
            t.restart_policy.unwrap().condition,
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
        assert_eq!(
            t.container_spec.unwrap().health_check.unwrap().test,
            Some(vec!["NONE".to_string()])
        );
        let l = job.labels.unwrap();
        assert_eq!(l[labels::NAME], "web");
        assert_eq!(l[labels::ROLE], labels::ROLE_PRE_DEPLOY);
        assert_eq!(l[labels::ROLLOUT], "abc");
        assert_eq!(l[labels::REVISION], "3");
        assert_eq!(l[labels::STEP], "1");
        assert_eq!(owner.object_of(Some(&l)).as_deref(), Some("web"));
    }

    fn task(state: TaskState, exit: Option<i64>, err: &str) -> Task {
        Task {
            status: Some(TaskStatus {
                state: Some(state),
                err: Some(err.into()),
                container_status: Some(bollard::models::ContainerStatus {
                    exit_code: exit,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn log_lines_of_both_streams_come_in_time_order() {
        let text = "2026-11-30T10:00:00.300000000Z table exists\n\
                    2026-11-30T10:00:00.100000000Z applying 7\n\
                    2026-11-30T10:00:00.200000000Z  indented\n";
        assert_eq!(
            ordered_tail(text),
            ["applying 7", " indented", "table exists"]
        );
        let many: String = (0..30)
            .map(|i| format!("2026-11-30T10:00:{i:02}.000000000Z line {i}\n"))
            .collect();
        let tail = ordered_tail(&many);
        assert_eq!(tail.len(), LOG_TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("line 29"));
    }

    #[test]
    fn a_jobs_state_comes_from_its_task() {
        assert_eq!(job_state(&[]), JobState::Running);
        assert_eq!(
            job_state(&[task(TaskState::RUNNING, Some(0), "")]),
            JobState::Running
        );
        assert_eq!(
            job_state(&[task(TaskState::COMPLETE, Some(0), "")]),
            JobState::Succeeded
        );
        assert_eq!(
            job_state(&[task(TaskState::FAILED, Some(3), "task: non-zero exit (3)")]),
            JobState::Failed {
                exit_code: Some(3),
                err: "task: non-zero exit (3)".into()
            }
        );
        assert!(matches!(
            job_state(&[task(TaskState::REJECTED, None, "No such image: app:9")]),
            JobState::Failed {
                exit_code: None,
                ..
            }
        ));
    }
}
