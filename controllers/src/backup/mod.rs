//! The Backup controller: each Backup object is a plan (schedule, retention, repository, volume
//! selector). On the plan's schedule it takes a snapshot of the environment (berth's objects and
//! the data of the named volumes Services mount) into a restic-format repository, applies
//! retention, and re-reads the newest snapshot on the verification schedule; the status shows the
//! last and next run, the snapshot count, the repository's size and the last verification.
//!
//! Steps: `dereference.rs` is folded into the reconcile (a plan names nothing but, for SFTP, two
//! Secret keys: checked on every reconcile, watched, and read when the repository is opened) ->
//! `build.rs` (pure: which volumes, where, tags) -> `operations.rs` (the run, verification,
//! restore; shared with the API) -> `status.rs` (pure). Scheduling is `schedule.rs`, what to keep
//! `retention.rs`, the repository `restic.rs`, volumes on other nodes `volumes.rs` (an
//! agent task from the Swarm kit's `agent_task.rs` running `agent.rs`, the data as `stream.rs`).
//!
//! It runs in the API server's process (`berth up`, `berth api`): a snapshot must read the store's
//! sealed values and master key, which only that process holds.

pub mod agent;
pub mod build;
pub mod operations;
pub mod restic;
pub mod retention;
pub mod schedule;
pub mod status;
pub mod stream;
pub mod volumes;

use crate::runtime::{Action, Cached, Context, Error, Hooks, Reconciled, Reconciler, Resource};
use async_trait::async_trait;
use berth_api_types::backup::{validate_backup, Backup, BackupSpec, BackupStatus};
use berth_api_types::validate::FieldError;
use berth_api_types::{Event, Kind};
use chrono::{DateTime, Utc};
use operations::{BackupError, Backups};
use schedule::{Clock, Schedule};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// The status is refreshed at least this often between runs (repository size, next run).
const REFRESH: Duration = Duration::from_secs(60);

pub struct BackupController {
    backups: Arc<Backups>,
    clock: Arc<dyn Clock>,
}

impl BackupController {
    pub fn new(backups: Arc<Backups>, clock: Arc<dyn Clock>) -> Self {
        BackupController { backups, clock }
    }

    /// The schedules in force: the spec's, or this installation's defaults.
    fn schedules(&self, spec: &BackupSpec) -> Result<(Schedule, Schedule), Error> {
        let installation = &self.backups.settings().installation;
        let run = spec
            .schedule
            .clone()
            .unwrap_or_else(|| schedule::default_expression(installation));
        let verify = spec
            .verify_schedule
            .clone()
            .unwrap_or_else(|| schedule::default_verify_expression(installation));
        let parse = |field: &str, expr: &str| {
            Schedule::parse(expr)
                .map_err(|e| Error::refused(status::reasons::INVALID_SPEC, format!("{field}: {e}")))
        };
        Ok((
            parse("spec.schedule", &run)?,
            parse("spec.verifySchedule", &verify)?,
        ))
    }
}

impl Resource for BackupController {
    type Object = Backup;
    type Status = BackupStatus;
    const KIND: Kind = Kind::Backup;

    fn validate(object: &Self::Object) -> Result<(), Vec<FieldError>> {
        validate_backup(object)
    }
}

#[async_trait]
impl Reconciler for BackupController {
    async fn reconcile(
        &self,
        obj: Arc<Cached<Self>>,
        _ctx: &Context<Self>,
    ) -> Result<Reconciled<BackupStatus>, Error> {
        let plan = &obj.object;
        let name = obj.name();
        let (run_schedule, verify_schedule) = self.schedules(&plan.spec)?;
        let created = plan
            .metadata
            .creation_timestamp
            .unwrap_or_else(|| self.clock.now());
        // A missing Secret key is the plan's fault, shown now rather than when a run is due; a
        // store that cannot be read is left to the run, which records it.
        if let Err(BackupError::Plan(why)) = self.backups.check_plan(&plan.spec).await {
            return Err(Error::refused(status::reasons::PLAN_INCOMPLETE, why));
        }
        let record = self.backups.plan_record(name);

        let now = self.clock.now();
        let last_run = record.last_run.as_ref().map(|r| r.time);
        if !plan.spec.suspend && schedule::due(&run_schedule, last_run, created, now).is_some() {
            match self.backups.run(plan, &|_| {}).await {
                Ok(_) => {}
                // Recorded on the plan (`LastRunFailed`); the next scheduled time tries again.
                Err(BackupError::Plan(why)) => {
                    return Err(Error::refused(status::reasons::PLAN_INCOMPLETE, why))
                }
                Err(e) => warn!(plan = %name, error = %e, "scheduled backup failed"),
            }
        }
        let record = self.backups.plan_record(name);
        let now = self.clock.now();
        let last_verified = record.last_verification.as_ref().map(|v| v.time);
        if schedule::due(&verify_schedule, last_verified, created, now).is_some() {
            let newest = self
                .backups
                .snapshots(Some(name))
                .into_iter()
                .rev()
                .find(|r| r.ok);
            if let Some(newest) = newest {
                if let Err(e) = self.backups.verify(plan, &newest.id, &|_| {}).await {
                    warn!(plan = %name, error = %e, "scheduled verification failed to run");
                }
            }
        }

        let record = self.backups.plan_record(name);
        let now = self.clock.now();
        let next_run = run_schedule.next_after(now);
        let next_verification = verify_schedule.next_after(now);
        let snapshots = self.backups.snapshots(Some(name)).len() as u64;
        let observed = status::Observed {
            generation: obj.generation(),
            schedule: &run_schedule.to_string(),
            verify_schedule: &verify_schedule.to_string(),
            repository: self.backups.describe_repository(&plan.spec),
            suspended: plan.spec.suspend,
            record: &record,
            snapshots,
            next_run,
            next_verification,
        };
        let status = status::build(&obj.status, &observed, now);
        Ok(Reconciled {
            status,
            action: Action::requeue(wake_after(now, next_run, next_verification)),
        })
    }

    /// The repository and its snapshots stay when a plan is deleted: backups outlive plans, and
    /// deleting evidence must be a deliberate act on the repository itself.
    async fn cleanup(&self, _name: &str, _ctx: &Context<Self>) -> Result<Action, Error> {
        Ok(Action::await_change())
    }
}

#[async_trait]
impl Hooks for BackupController {
    /// What a transfer interrupted by a crash left in Swarm (an agent service, its grant secret).
    async fn collect_garbage(&self, _ctx: &Context<Self>) -> Result<(), Error> {
        match self.backups.collect_leftovers().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(agents = n, "removed transfer agents left by an earlier run"),
            Err(e) => return Err(Error::Transient(e.to_string())),
        }
        Ok(())
    }

    /// An SFTP repository's identity and known_hosts are Secret keys: a plan waiting for one
    /// (`PlanIncomplete`) is looked at again when it appears.
    fn watches(&self) -> Vec<Kind> {
        vec![Kind::Secret]
    }

    /// The plans whose SFTP repository names the Secret an event is about.
    async fn map_related(&self, event: &Event, ctx: &Context<Self>) -> Vec<String> {
        if event.kind != Kind::Secret {
            return Vec::new();
        }
        ctx.cache
            .objects()
            .iter()
            .filter(|o| {
                o.object
                    .spec
                    .repository
                    .as_ref()
                    .and_then(|r| r.sftp.as_ref())
                    .is_some_and(|s| {
                        s.identity.name == event.name || s.known_hosts.name == event.name
                    })
            })
            .map(|o| o.name().to_string())
            .collect()
    }
}

/// How long until the next scheduled thing, at most [`REFRESH`], at least a second.
fn wake_after(
    now: DateTime<Utc>,
    next_run: Option<DateTime<Utc>>,
    next_verification: Option<DateTime<Utc>>,
) -> Duration {
    [next_run, next_verification]
        .into_iter()
        .flatten()
        .map(|t| (t - now).to_std().unwrap_or_default())
        .min()
        .unwrap_or(REFRESH)
        .clamp(Duration::from_secs(1), REFRESH)
}
