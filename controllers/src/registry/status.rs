//! Registry status from a login check, and when to check again. Pure: the reconcile hands in what it
//! found and the time, and gets back the status to write.

use super::login::LoginOutcome;
use crate::runtime::ObjectStatus;
use berth_api_types::meta::{condition, set_condition};
use berth_api_types::registry::{conditions, RegistryStatus};
use berth_api_types::ConditionStatus::{False, True};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Credentials that worked (or were refused) are checked again this often: a registry may revoke
/// an account or token without anything in berth changing.
pub const RECHECK: Duration = Duration::from_secs(15 * 60);

/// Condition reasons this controller sets.
pub mod reasons {
    pub const LOGIN_SUCCEEDED: &str = "LoginSucceeded";
    /// The registry refused the credentials; checked again when the Registry or its Secret changes.
    pub const REJECTED: &str = "Rejected";
    /// The registry did not answer usefully; retried with backoff.
    pub const UNREACHABLE: &str = "Unreachable";
    pub const SECRET_MISSING: &str = "SecretMissing";
    /// An older Registry names the same server; this one is not used.
    pub const DUPLICATE: &str = "Duplicate";
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// When the credentials must be checked now; otherwise how long until the next periodic check.
pub fn next_check(
    status: &RegistryStatus,
    generation: u64,
    secret_version: &str,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let settled = condition(&status.conditions, conditions::AUTHENTICATED)
        .is_some_and(|c| c.reason == reasons::LOGIN_SUCCEEDED || c.reason == reasons::REJECTED);
    let same_input = status.observed_generation == Some(generation)
        && status.secret_resource_version.as_deref() == Some(secret_version);
    let (true, true, Some(at)) = (settled, same_input, status.last_checked) else {
        return None;
    };
    let age = (now - at).to_std().unwrap_or_default();
    RECHECK.checked_sub(age).filter(|d| !d.is_zero())
}

/// Status after asking the registry.
pub fn checked(
    current: &RegistryStatus,
    generation: u64,
    secret_version: &str,
    outcome: &LoginOutcome,
    username: &str,
    host: &str,
    now: DateTime<Utc>,
) -> RegistryStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    s.secret_resource_version = Some(secret_version.to_string());
    let (status, reason, message) = match outcome {
        LoginOutcome::Accepted => (
            True,
            reasons::LOGIN_SUCCEEDED,
            format!("logged in to {host} as `{username}`"),
        ),
        LoginOutcome::Rejected(why) => (False, reasons::REJECTED, why.clone()),
        LoginOutcome::Unreachable(why) => (False, reasons::UNREACHABLE, why.clone()),
    };
    if !matches!(outcome, LoginOutcome::Unreachable(_)) {
        s.last_checked = Some(now);
    }
    set_condition(
        &mut s.conditions,
        conditions::AUTHENTICATED,
        status,
        reason,
        &message,
        now,
    );
    s
}

/// Status when no check can be made (invalid spec, password missing, duplicate server).
pub fn not_checked(
    current: &RegistryStatus,
    generation: u64,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) -> RegistryStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    s.secret_resource_version = None;
    set_condition(
        &mut s.conditions,
        conditions::AUTHENTICATED,
        False,
        reason,
        message,
        now,
    );
    s
}

impl ObjectStatus for RegistryStatus {
    fn refused(&self, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) -> Self {
        not_checked(self, generation, reason, message, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration as D;

    fn t0() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn checks_when_anything_changed_or_the_answer_is_old() {
        let fresh = RegistryStatus::default();
        assert_eq!(next_check(&fresh, 1, "5", t0()), None, "never checked");
        let ok = checked(&fresh, 1, "5", &LoginOutcome::Accepted, "u", "h", t0());
        let later = t0() + D::minutes(5);
        assert_eq!(
            next_check(&ok, 1, "5", later),
            Some(RECHECK - Duration::from_secs(300))
        );
        assert_eq!(next_check(&ok, 2, "5", later), None, "new generation");
        assert_eq!(next_check(&ok, 1, "6", later), None, "password rotated");
        assert_eq!(
            next_check(&ok, 1, "5", t0() + D::minutes(16)),
            None,
            "too old"
        );
        let no = checked(
            &fresh,
            1,
            "5",
            &LoginOutcome::Rejected("401".into()),
            "u",
            "h",
            t0(),
        );
        assert!(
            next_check(&no, 1, "5", later).is_some(),
            "a refusal is an answer too"
        );
        let down = checked(
            &fresh,
            1,
            "5",
            &LoginOutcome::Unreachable("x".into()),
            "u",
            "h",
            t0(),
        );
        assert_eq!(
            next_check(&down, 1, "5", later),
            None,
            "no answer yet: ask again"
        );
    }

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let a = checked(
            &RegistryStatus::default(),
            1,
            "5",
            &LoginOutcome::Accepted,
            "u",
            "h",
            t0(),
        );
        let b = checked(
            &a,
            1,
            "5",
            &LoginOutcome::Accepted,
            "u",
            "h",
            t0() + D::minutes(20),
        );
        let at = |s: &RegistryStatus| {
            condition(&s.conditions, conditions::AUTHENTICATED)
                .unwrap()
                .last_transition_time
        };
        assert_eq!(at(&a), at(&b));
        assert_eq!(b.last_checked, Some(t0() + D::minutes(20)));
        let c = checked(
            &b,
            1,
            "6",
            &LoginOutcome::Rejected("no".into()),
            "u",
            "h",
            t0() + D::minutes(21),
        );
        assert_eq!(at(&c), t0() + D::minutes(21));
        let cond = condition(&c.conditions, conditions::AUTHENTICATED).unwrap();
        assert_eq!(
            (cond.reason.as_str(), cond.message.as_str()),
            (reasons::REJECTED, "no")
        );
    }
}
