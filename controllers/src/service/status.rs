//! Observed Swarm state -> Service status. Pure: the reconcile hands in what it read from the engine
//! (the service and its tasks) and gets back the status to write, conditions included.

use super::rollout;
use crate::runtime::ObjectStatus;
use berth_api_types::meta::set_condition;
use berth_api_types::predeploy::{PreDeployStatus, StepState};
use berth_api_types::service::{conditions, RolloutResult, Service, ServiceStatus};
use berth_api_types::ConditionStatus::{False, True};
use bollard::models::{
    Service as SwarmService, ServiceUpdateStatusStateEnum as U, Task, TaskState,
};
use chrono::{DateTime, Duration, Utc};

/// Task failures older than this no longer mark a service Degraded once it runs fully again.
const RECENT_FAILURE: i64 = 120;

/// What the reconcile observed.
pub struct Observed<'a> {
    pub service: &'a SwarmService,
    pub tasks: &'a [Task],
    pub now: DateTime<Utc>,
}

/// Status for a spec berth will not apply (invalid, or a name taken by a service berth does not own).
pub fn refused(
    current: &ServiceStatus,
    generation: u64,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) -> ServiceStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    set_condition(
        &mut s.conditions,
        conditions::READY,
        False,
        reason,
        message,
        now,
    );
    set_condition(
        &mut s.conditions,
        conditions::PROGRESSING,
        False,
        reason,
        "",
        now,
    );
    set_condition(
        &mut s.conditions,
        conditions::DEGRADED,
        True,
        reason,
        message,
        now,
    );
    s
}

/// Status of a paused Service (`spec.paused`): what the engine runs, observed as usual when the
/// Swarm service exists, with `Progressing=False/Paused` saying that the spec is not rolled out.
pub fn paused(
    current: &ServiceStatus,
    svc: &Service,
    o: Option<&Observed>,
    now: DateTime<Utc>,
) -> ServiceStatus {
    let generation = svc.metadata.generation;
    let name = &svc.metadata.name;
    let mut s = match o {
        Some(o) => observed(current, generation, o),
        None => {
            let mut s = current.clone();
            s.observed_generation = Some(generation);
            set_condition(
                &mut s.conditions,
                conditions::READY,
                False,
                conditions::PAUSED_REASON,
                "not created while paused",
                now,
            );
            s
        }
    };
    set_condition(
        &mut s.conditions,
        conditions::PROGRESSING,
        False,
        conditions::PAUSED_REASON,
        &format!("rollout paused: spec changes roll out on `berth rollout resume service {name}`"),
        now,
    );
    s
}

/// Status while pre-deploy steps run: the service still runs its previous image, and the new one
/// is not rolled out yet, so it is not Ready.
pub fn pre_deploy_running(
    current: &ServiceStatus,
    generation: u64,
    steps: PreDeployStatus,
    now: DateTime<Utc>,
) -> ServiceStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    let total = steps.steps.len();
    let message = match steps
        .steps
        .iter()
        .position(|st| st.state == StepState::Running)
    {
        Some(i) => format!(
            "revision {}: pre-deploy step `{}` ({}/{total}) running before the rollout",
            steps.revision,
            steps.steps[i].name,
            i + 1
        ),
        None => format!("revision {}: pre-deploy steps running", steps.revision),
    };
    let reason = conditions::PRE_DEPLOY_RUNNING;
    set_condition(
        &mut s.conditions,
        conditions::READY,
        False,
        reason,
        &message,
        now,
    );
    set_condition(
        &mut s.conditions,
        conditions::PROGRESSING,
        True,
        reason,
        &message,
        now,
    );
    set_condition(
        &mut s.conditions,
        conditions::DEGRADED,
        False,
        reason,
        "",
        now,
    );
    s.pre_deploy = Some(steps);
    s
}

/// Status after a pre-deploy step failed or timed out: the rollout does not happen, the service
/// keeps running its previous image, and the history gets the revision as `failed-predeploy`.
pub fn pre_deploy_failed(
    current: &ServiceStatus,
    svc: &Service,
    steps: PreDeployStatus,
    digest: Option<&str>,
    now: DateTime<Utc>,
) -> ServiceStatus {
    let failed = steps.failure().cloned().unwrap_or_default();
    let reason = if failed.state == StepState::TimedOut {
        conditions::PRE_DEPLOY_TIMED_OUT
    } else {
        conditions::PRE_DEPLOY_FAILED
    };
    let message = format!(
        "revision {} not rolled out: {}; the service still runs {}",
        steps.revision,
        failed.summary(),
        current.image.as_deref().unwrap_or("its previous spec")
    );
    // Final for this rollout, as a refused spec is for its generation.
    let mut s = refused(current, svc.metadata.generation, reason, &message, now);
    let (trigger, deploy_id) = rollout::trigger(&svc.metadata);
    let image = svc.spec.image.to_string();
    s.revisions = rollout::record(
        &s.revisions,
        &rollout::Sent {
            generation: svc.metadata.generation,
            image: &image,
            digest,
            force_update: svc.spec.force_update,
            trigger: &trigger,
            deploy_id: deploy_id.as_deref(),
            now,
        },
    );
    if let Some(last) = s.revisions.last_mut() {
        last.result = RolloutResult::FailedPredeploy;
        last.message = Some(failed.summary());
    }
    s.pre_deploy = Some(steps);
    s
}

/// What apply did, for the status.
pub struct Applied<'a> {
    /// Whether berth wrote the Swarm service in this reconcile (a new revision, if the image moved).
    pub wrote: bool,
    /// The digest the image was pinned to, if it was.
    pub digest: Option<&'a str>,
}

/// The whole status after apply: the engine's view, the revision history and the mounts no volume
/// backs.
pub fn after_apply(
    current: &ServiceStatus,
    svc: &Service,
    o: &Observed,
    applied: &Applied,
) -> ServiceStatus {
    let generation = svc.metadata.generation;
    let mut st = observed(current, generation, o);
    if applied.wrote || st.revisions.is_empty() {
        let (trigger, deploy_id) = rollout::trigger(&svc.metadata);
        let image = svc.spec.image.to_string();
        st.revisions = rollout::record(
            &st.revisions,
            &rollout::Sent {
                generation,
                image: &image,
                digest: applied.digest,
                force_update: svc.spec.force_update,
                trigger: &trigger,
                deploy_id: deploy_id.as_deref(),
                now: o.now,
            },
        );
    }
    rollout::observe(
        &mut st.revisions,
        &rollout::Progress {
            update_state: st.update_state.as_deref(),
            update_message: st.update_message.as_deref(),
            all_updated: st.updated_replicas >= st.desired_replicas
                && st.running_replicas >= st.desired_replicas,
        },
    );
    st.unbacked_mounts = svc
        .spec
        .volumes
        .iter()
        .filter_map(|v| {
            v.unbacked_reason()
                .map(|why| format!("{} ({why})", v.target))
        })
        .collect();
    st
}

impl ObjectStatus for ServiceStatus {
    fn refused(&self, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) -> Self {
        refused(self, generation, reason, message, now)
    }
}

/// Status from the engine's view of the service.
pub fn observed(current: &ServiceStatus, generation: u64, o: &Observed) -> ServiceStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    let spec = o.service.spec.as_ref();
    let global = spec
        .and_then(|sp| sp.mode.as_ref())
        .is_some_and(|m| m.global.is_some());
    let live: Vec<&Task> = o
        .tasks
        .iter()
        .filter(|t| t.desired_state == Some(TaskState::RUNNING))
        .collect();
    let running = live
        .iter()
        .filter(|t| t.status.as_ref().and_then(|st| st.state) == Some(TaskState::RUNNING))
        .count() as u64;
    let desired = if global {
        live.len() as u64
    } else {
        spec.and_then(|sp| sp.mode.as_ref())
            .and_then(|m| m.replicated.as_ref())
            .and_then(|r| r.replicas)
            .unwrap_or(0)
            .max(0) as u64
    };
    // Tasks carry the task spec they were made from: those made from the current one are updated.
    let template = spec.and_then(|sp| sp.task_template.as_ref());
    let current = |t: &&&Task| {
        let ts = t.spec.as_ref();
        ts.and_then(|x| x.container_spec.as_ref())
            .and_then(|c| c.image.as_deref())
            == template
                .and_then(|x| x.container_spec.as_ref())
                .and_then(|c| c.image.as_deref())
            && ts.and_then(|x| x.force_update).unwrap_or(0)
                == template.and_then(|x| x.force_update).unwrap_or(0)
    };
    s.updated_replicas = live
        .iter()
        .filter(|t| t.status.as_ref().and_then(|st| st.state) == Some(TaskState::RUNNING))
        .filter(current)
        .count() as u64;
    s.desired_replicas = desired;
    s.running_replicas = running;
    s.image = spec
        .and_then(|sp| sp.task_template.as_ref())
        .and_then(|t| t.container_spec.as_ref())
        .and_then(|c| c.image.clone());
    s.swarm_service_id = o.service.id.clone();
    let update = o.service.update_status.as_ref();
    let state = update.and_then(|u| u.state).filter(|st| *st != U::EMPTY);
    s.update_state = state.map(|st| st.to_string());
    s.update_message = update
        .and_then(|u| u.message.clone())
        .filter(|m| !m.is_empty());

    // The newest recent failure explains a service that is not fully running.
    let failure = newest_failure(o.tasks, o.now)
        .map(|(id, err)| format!("task {} failed: {err}", id.unwrap_or("?")));

    let now = o.now;
    let msg_update = s.update_message.clone().unwrap_or_default();
    let replicas_msg = format!("{running}/{desired} tasks running");
    match state {
        Some(U::ROLLBACK_COMPLETED) | Some(U::ROLLBACK_STARTED) | Some(U::ROLLBACK_PAUSED) => {
            let reason = if state == Some(U::ROLLBACK_COMPLETED) {
                "RolledBack"
            } else {
                "RollingBack"
            };
            let why = if msg_update.is_empty() {
                failure
                    .clone()
                    .unwrap_or_else(|| "update failed; engine rolled back".into())
            } else {
                msg_update.clone()
            };
            set_condition(
                &mut s.conditions,
                conditions::READY,
                False,
                reason,
                &why,
                now,
            );
            set_condition(
                &mut s.conditions,
                conditions::PROGRESSING,
                (state == Some(U::ROLLBACK_STARTED)).into(),
                reason,
                &replicas_msg,
                now,
            );
            set_condition(
                &mut s.conditions,
                conditions::DEGRADED,
                True,
                reason,
                &why,
                now,
            );
        }
        Some(U::PAUSED) => {
            let why = if msg_update.is_empty() {
                "update paused".to_string()
            } else {
                msg_update.clone()
            };
            set_condition(
                &mut s.conditions,
                conditions::READY,
                False,
                "UpdatePaused",
                &why,
                now,
            );
            set_condition(
                &mut s.conditions,
                conditions::PROGRESSING,
                False,
                "UpdatePaused",
                &replicas_msg,
                now,
            );
            set_condition(
                &mut s.conditions,
                conditions::DEGRADED,
                True,
                "UpdatePaused",
                &why,
                now,
            );
        }
        _ => {
            let updating = state == Some(U::UPDATING);
            let complete = running >= desired && !updating;
            if complete {
                set_condition(
                    &mut s.conditions,
                    conditions::READY,
                    True,
                    "AllTasksRunning",
                    &replicas_msg,
                    now,
                );
                set_condition(
                    &mut s.conditions,
                    conditions::PROGRESSING,
                    False,
                    "AllTasksRunning",
                    &replicas_msg,
                    now,
                );
                set_condition(
                    &mut s.conditions,
                    conditions::DEGRADED,
                    False,
                    "AllTasksRunning",
                    "",
                    now,
                );
            } else {
                let reason = if updating {
                    "Updating"
                } else {
                    "TasksStarting"
                };
                set_condition(
                    &mut s.conditions,
                    conditions::READY,
                    False,
                    reason,
                    &replicas_msg,
                    now,
                );
                set_condition(
                    &mut s.conditions,
                    conditions::PROGRESSING,
                    True,
                    reason,
                    &replicas_msg,
                    now,
                );
                match &failure {
                    Some(f) => set_condition(
                        &mut s.conditions,
                        conditions::DEGRADED,
                        True,
                        "TaskFailed",
                        f,
                        now,
                    ),
                    None => set_condition(
                        &mut s.conditions,
                        conditions::DEGRADED,
                        False,
                        reason,
                        "",
                        now,
                    ),
                };
            }
        }
    }
    s
}

/// The newest task failure of the last `RECENT_FAILURE` seconds: (task id, the engine's error).
fn newest_failure(tasks: &[Task], now: DateTime<Utc>) -> Option<(Option<&str>, String)> {
    tasks
        .iter()
        .filter(|t| {
            matches!(
                t.status.as_ref().and_then(|st| st.state),
                Some(TaskState::FAILED | TaskState::REJECTED)
            )
        })
        .filter_map(|t| {
            let st = t.status.as_ref()?;
            let at = st.timestamp?;
            (now - at < Duration::seconds(RECENT_FAILURE)).then(|| {
                let err = st
                    .err
                    .clone()
                    .or_else(|| st.message.clone())
                    .unwrap_or_default();
                (at, (t.id.as_deref(), err))
            })
        })
        .max_by_key(|(at, _)| *at)
        .map(|(_, f)| f)
}

/// Whether the newest recent task failure is the engine not getting the image. The engine words
/// this as "No such image" whatever the registry said, so the reconcile asks the registry why
/// and reports that instead (`explain_pull_failure`).
pub fn pull_failing(tasks: &[Task], now: DateTime<Utc>) -> bool {
    newest_failure(tasks, now).is_some_and(|(_, err)| {
        let e = err.to_ascii_lowercase();
        [
            "no such image",
            "pull access denied",
            "manifest unknown",
            "unauthorized",
            "no basic auth credentials",
        ]
        .iter()
        .any(|needle| e.contains(needle))
    })
}

/// Replaces a generic image-pull task failure with what the registry said.
pub fn explain_pull_failure(s: &mut ServiceStatus, explanation: &str, now: DateTime<Utc>) {
    let degraded = berth_api_types::meta::condition(&s.conditions, conditions::DEGRADED)
        .is_some_and(|c| c.status == True);
    if degraded {
        set_condition(
            &mut s.conditions,
            conditions::DEGRADED,
            True,
            "ImagePullFailed",
            explanation,
            now,
        );
    }
}

/// Whether the service is fully converged (nothing left to watch closely).
pub fn is_ready(s: &ServiceStatus) -> bool {
    berth_api_types::meta::condition(&s.conditions, conditions::READY)
        .is_some_and(|c| c.status == True)
}

/// Whether the engine gave up on the current spec (paused or rolled back): pushing the same spec again
/// would only repeat the failure.
pub fn engine_gave_up(service: &SwarmService) -> bool {
    matches!(
        service.update_status.as_ref().and_then(|u| u.state),
        Some(U::PAUSED | U::ROLLBACK_STARTED | U::ROLLBACK_PAUSED | U::ROLLBACK_COMPLETED)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::meta::condition;
    use bollard::models::{
        ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, ServiceUpdateStatus, TaskStatus,
    };

    fn swarm(replicas: i64, state: Option<U>, msg: &str) -> SwarmService {
        SwarmService {
            id: Some("svc1".into()),
            spec: Some(ServiceSpec {
                mode: Some(ServiceSpecMode {
                    replicated: Some(ServiceSpecModeReplicated {
                        replicas: Some(replicas),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_status: state.map(|s| ServiceUpdateStatus {
                state: Some(s),
                message: Some(msg.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn task(
        id: &str,
        desired: TaskState,
        state: TaskState,
        err: Option<&str>,
        at: DateTime<Utc>,
    ) -> Task {
        Task {
            id: Some(id.into()),
            desired_state: Some(desired),
            status: Some(TaskStatus {
                state: Some(state),
                err: err.map(Into::into),
                timestamp: Some(at),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_paused_service_reports_what_runs_and_that_it_is_paused() {
        let now = Utc::now();
        let mut svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"image": "a:2", "paused": true}
        }))
        .unwrap();
        svc.metadata.generation = 4;
        let s = paused(&ServiceStatus::default(), &svc, None, now);
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(
            cond(&s, "Ready"),
            (False, "Paused".into(), "not created while paused".into())
        );
        let (st, reason, msg) = cond(&s, "Progressing");
        assert_eq!((st, reason.as_str()), (False, "Paused"));
        assert!(msg.contains("berth rollout resume service web"), "{msg}");
    }

    fn cond(s: &ServiceStatus, t: &str) -> (berth_api_types::ConditionStatus, String, String) {
        let c = condition(&s.conditions, t).unwrap();
        (c.status, c.reason.clone(), c.message.clone())
    }

    #[test]
    fn ready_when_all_running() {
        let now = Utc::now();
        let tasks = vec![
            task("a", TaskState::RUNNING, TaskState::RUNNING, None, now),
            task("b", TaskState::RUNNING, TaskState::RUNNING, None, now),
        ];
        let svc = swarm(2, Some(U::COMPLETED), "update completed");
        let s = observed(
            &ServiceStatus::default(),
            4,
            &Observed {
                service: &svc,
                tasks: &tasks,
                now,
            },
        );
        assert_eq!((s.running_replicas, s.desired_replicas), (2, 2));
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(cond(&s, "Ready").0, True);
        assert_eq!(cond(&s, "Degraded").0, False);
        assert!(is_ready(&s));
        assert_eq!(s.update_state.as_deref(), Some("completed"));
    }

    #[test]
    fn degraded_with_task_error_text() {
        let now = Utc::now();
        let tasks = vec![
            task("a", TaskState::RUNNING, TaskState::RUNNING, None, now),
            task(
                "old",
                TaskState::SHUTDOWN,
                TaskState::FAILED,
                Some("starting container failed: exec: \"nope\": not found"),
                now - Duration::seconds(5),
            ),
        ];
        let svc = swarm(2, None, "");
        let s = observed(
            &ServiceStatus::default(),
            1,
            &Observed {
                service: &svc,
                tasks: &tasks,
                now,
            },
        );
        let (st, reason, msg) = cond(&s, "Degraded");
        assert_eq!((st, reason.as_str()), (True, "TaskFailed"));
        assert!(msg.contains("exec: \"nope\": not found"), "{msg}");
        assert_eq!(cond(&s, "Ready").0, False);
        assert_eq!(cond(&s, "Progressing").0, True);
    }

    #[test]
    fn rolled_back_is_degraded_not_ready() {
        let now = Utc::now();
        let tasks = vec![task("a", TaskState::RUNNING, TaskState::RUNNING, None, now)];
        let svc = swarm(1, Some(U::ROLLBACK_COMPLETED), "rollback completed");
        let s = observed(
            &ServiceStatus::default(),
            2,
            &Observed {
                service: &svc,
                tasks: &tasks,
                now,
            },
        );
        assert_eq!(
            cond(&s, "Ready"),
            (False, "RolledBack".into(), "rollback completed".into())
        );
        assert_eq!(cond(&s, "Degraded").0, True);
        assert!(engine_gave_up(&svc));
        assert_eq!(s.update_state.as_deref(), Some("rollback_completed"));
    }

    #[test]
    fn transition_time_kept_across_observations() {
        let t0 = Utc::now();
        let tasks = vec![task("a", TaskState::RUNNING, TaskState::RUNNING, None, t0)];
        let svc = swarm(1, None, "");
        let s1 = observed(
            &ServiceStatus::default(),
            1,
            &Observed {
                service: &svc,
                tasks: &tasks,
                now: t0,
            },
        );
        let s2 = observed(
            &s1,
            1,
            &Observed {
                service: &svc,
                tasks: &tasks,
                now: t0 + Duration::seconds(60),
            },
        );
        assert_eq!(s1, s2, "nothing changed, so nothing to write");
    }

    #[test]
    fn refused_is_terminal_shape() {
        let s = refused(
            &ServiceStatus::default(),
            7,
            "InvalidSpec",
            "spec.image: bad",
            Utc::now(),
        );
        assert_eq!(s.observed_generation, Some(7));
        assert_eq!(
            cond(&s, "Ready"),
            (False, "InvalidSpec".into(), "spec.image: bad".into())
        );
        assert_eq!(cond(&s, "Degraded").0, True);
    }

    #[test]
    fn a_failed_pre_deploy_step_is_a_failed_revision_and_the_old_image_stays() {
        use berth_api_types::predeploy::StepStatus;
        let svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "web", "generation": 4}, "spec": {"image": "app:2"}
        }))
        .unwrap();
        let current = ServiceStatus {
            image: Some("app:1".into()),
            ..Default::default()
        };
        let steps = PreDeployStatus {
            rollout: "k".into(),
            revision: 2,
            image: "app:2".into(),
            steps: vec![StepStatus {
                name: "migrate".into(),
                state: StepState::Failed,
                exit_code: Some(3),
                log_tail: vec!["table exists".into()],
                ..Default::default()
            }],
        };
        let now = Utc::now();
        let s = pre_deploy_failed(&current, &svc, steps.clone(), None, now);
        assert_eq!(s.observed_generation, Some(4));
        let (status, reason, message) = cond(&s, "Degraded");
        assert_eq!((status, reason.as_str()), (True, "PreDeployFailed"));
        assert_eq!(
            message,
            "revision 2 not rolled out: pre-deploy step `migrate` failed with exit code 3: table exists; the service still runs app:1"
        );
        assert_eq!(cond(&s, "Ready").0, False);
        let last = s.revisions.last().unwrap();
        assert_eq!((last.revision, last.image.as_str()), (1, "app:2"));
        assert_eq!(last.result, RolloutResult::FailedPredeploy);
        assert_eq!(s.pre_deploy, Some(steps.clone()));
        // Looked at again: the same revision, not another.
        let again = pre_deploy_failed(&s, &svc, steps, None, now);
        assert_eq!(again.revisions, s.revisions);
    }
}
