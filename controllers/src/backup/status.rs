//! Step 4 (pure): a plan's status from its records: last run and success, next run and
//! verification, how many snapshots and how big the repository is, and the conditions `Ready`
//! and `LastRunFailed`.

use super::operations::PlanRecord;
use crate::runtime::ObjectStatus;
use berth_api_types::backup::{conditions, BackupStatus, RunSummary};
use berth_api_types::meta::set_condition;
use berth_api_types::ConditionStatus::{False, True};
use chrono::{DateTime, Utc};

pub mod reasons {
    pub const SCHEDULED: &str = "Scheduled";
    pub const SUSPENDED: &str = "Suspended";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The plan names something that is missing (an SFTP key's Secret).
    pub const PLAN_INCOMPLETE: &str = "PlanIncomplete";
    pub const RUN_FAILED: &str = "RunFailed";
    pub const RUN_SUCCEEDED: &str = "RunSucceeded";
    pub const NO_RUN_YET: &str = "NoRunYet";
}

/// What the reconcile found, for the status.
pub struct Observed<'a> {
    pub generation: u64,
    pub schedule: &'a str,
    pub verify_schedule: &'a str,
    pub repository: String,
    pub suspended: bool,
    pub record: &'a PlanRecord,
    pub snapshots: u64,
    pub next_run: Option<DateTime<Utc>>,
    pub next_verification: Option<DateTime<Utc>>,
}

pub fn build(current: &BackupStatus, o: &Observed<'_>, now: DateTime<Utc>) -> BackupStatus {
    let mut s = current.clone();
    s.observed_generation = Some(o.generation);
    s.schedule = Some(o.schedule.to_string());
    s.verify_schedule = Some(o.verify_schedule.to_string());
    s.repository = Some(o.repository.clone());
    s.last_run = o.record.last_run.as_ref().map(|r| RunSummary {
        id: r.id.clone(),
        started: r.time,
        finished: r.finished.unwrap_or(r.time),
        ok: r.ok,
        message: r.error.clone(),
    });
    s.last_success = o.record.last_success;
    s.next_run = if o.suspended { None } else { o.next_run };
    s.next_verification = o.next_verification;
    s.snapshots = o.snapshots;
    s.repository_bytes = o.record.repository_bytes;
    s.last_verification = o.record.last_verification.clone();
    if o.suspended {
        set_condition(
            &mut s.conditions,
            conditions::READY,
            False,
            reasons::SUSPENDED,
            "scheduled runs are off (spec.suspend); on-demand runs still work",
            now,
        );
    } else {
        let next = o
            .next_run
            .map(|t| berth_api_types::meta::format_time(&t))
            .unwrap_or_else(|| "never (the schedule has no next time)".into());
        set_condition(
            &mut s.conditions,
            conditions::READY,
            True,
            reasons::SCHEDULED,
            &format!("next run {next} (`{}`, UTC)", o.schedule),
            now,
        );
    }
    let (status, reason, message) = match &o.record.last_run {
        None => (False, reasons::NO_RUN_YET, String::new()),
        Some(r) if r.ok => (False, reasons::RUN_SUCCEEDED, String::new()),
        Some(r) => (True, reasons::RUN_FAILED, r.error.clone()),
    };
    set_condition(
        &mut s.conditions,
        conditions::LAST_RUN_FAILED,
        status,
        reason,
        &message,
        now,
    );
    s
}

impl ObjectStatus for BackupStatus {
    fn refused(&self, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) -> Self {
        let mut s = self.clone();
        s.observed_generation = Some(generation);
        s.next_run = None;
        set_condition(
            &mut s.conditions,
            conditions::READY,
            False,
            reason,
            message,
            now,
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::backup::SnapshotRecord;
    use berth_api_types::meta::condition;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn run(ok: bool, at: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: format!("run-{at}"),
            plan: "environment".into(),
            installation: "i".into(),
            time: t(at),
            finished: Some(t(at)),
            ok,
            error: if ok {
                String::new()
            } else {
                "volume `db` on n2: agent timed out".into()
            },
            restic_snapshot: None,
            objects: Default::default(),
            volumes: vec![],
            excluded: vec![],
            verification: None,
        }
    }

    #[test]
    fn a_failed_run_flips_last_run_failed_and_keeps_the_last_success() {
        let good = PlanRecord {
            last_run: Some(run(true, "2026-11-29T10:17:00Z")),
            last_success: Some(t("2026-11-29T10:17:05Z")),
            ..Default::default()
        };
        let o = |record| Observed {
            generation: 3,
            schedule: "17 * * * *",
            verify_schedule: "17 3 * * *",
            repository: "/var/lib/berth-backups/i".into(),
            suspended: false,
            record,
            snapshots: 5,
            next_run: Some(t("2026-11-29T11:17:00Z")),
            next_verification: None,
        };
        let s1 = build(
            &BackupStatus::default(),
            &o(&good),
            t("2026-11-29T10:18:00Z"),
        );
        let c = condition(&s1.conditions, conditions::LAST_RUN_FAILED).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str()),
            (False, reasons::RUN_SUCCEEDED)
        );
        assert!(condition(&s1.conditions, conditions::READY)
            .unwrap()
            .message
            .contains("2026-11-29T11:17:00Z"));

        let bad = PlanRecord {
            last_run: Some(run(false, "2026-11-29T11:17:00Z")),
            ..good.clone()
        };
        let s2 = build(&s1, &o(&bad), t("2026-11-29T11:18:00Z"));
        let c = condition(&s2.conditions, conditions::LAST_RUN_FAILED).unwrap();
        assert_eq!((c.status, c.reason.as_str()), (True, reasons::RUN_FAILED));
        assert_eq!(c.message, "volume `db` on n2: agent timed out");
        assert_eq!(c.last_transition_time, t("2026-11-29T11:18:00Z"));
        assert_eq!(s2.last_success, Some(t("2026-11-29T10:17:05Z")));
        assert_eq!(s2.observed_generation, Some(3));
    }
}
