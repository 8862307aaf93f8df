//! `berth wait KIND NAME... --for condition=Ready` and `berth apply --wait`: block until objects
//! reach a condition, so a CI job fails at the deploy step that broke, naming what broke, instead
//! of at some later test.
//!
//! Level-based like the controllers: each round reads the objects and judges what their status
//! says about the generation asked for; no event is needed to have been seen. A status older than
//! that generation is never taken as an answer (a Service that was Ready before the change is not
//! Ready *with* it until the controller says so).

use crate::api_client::ApiClient;
use crate::cli::{api_error, client};
use crate::Conn;
use berth_api_types::meta::{condition, Condition, GIVE_UP_REASONS};
use berth_api_types::service::conditions::PAUSED_REASON;
use berth_api_types::{ConditionStatus, DynObject, Kind};
use berth_controllers::api::ClientError;
use std::time::{Duration, Instant};

/// How often the objects are read again. Polling through the API keeps `wait` working across an
/// API server failover, where an event stream would have to be re-established and re-checked.
const POLL: Duration = Duration::from_millis(500);

/// What `--for` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    /// A condition with this status (`condition=Ready`, `condition=Degraded=False`).
    Condition {
        type_: String,
        status: ConditionStatus,
    },
    /// The object is gone.
    Delete,
}

impl Goal {
    pub fn ready() -> Goal {
        Goal::Condition {
            type_: "Ready".into(),
            status: ConditionStatus::True,
        }
    }
}

/// Parses `--for`: `condition=TYPE`, `condition=TYPE=True|False`, or `delete`, as kubectl writes them.
pub fn parse_goal(s: &str) -> Result<Goal, String> {
    if s == "delete" {
        return Ok(Goal::Delete);
    }
    let bad = || {
        format!("`{s}` is not a goal: use `condition=Ready`, `condition=TYPE=False` or `delete`")
    };
    let rest = s.strip_prefix("condition=").ok_or_else(bad)?;
    let (type_, status) = match rest.split_once('=') {
        None => (rest, ConditionStatus::True),
        Some((t, v)) => {
            let status = match v.to_ascii_lowercase().as_str() {
                "true" => ConditionStatus::True,
                "false" => ConditionStatus::False,
                "unknown" => ConditionStatus::Unknown,
                _ => return Err(bad()),
            };
            (t, status)
        }
    };
    if type_.is_empty() || !type_.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    Ok(Goal::Condition {
        type_: type_.to_string(),
        status,
    })
}

/// What one read of an object says.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Met(String),
    /// Not yet: the line saying where it stands.
    Waiting(String),
    /// It will not get there without a change: why.
    Failed(String),
}

fn conditions_of(obj: &DynObject) -> Vec<Condition> {
    obj.status
        .get("conditions")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

fn observed_generation(obj: &DynObject) -> u64 {
    obj.status
        .get("observedGeneration")
        .and_then(|g| g.as_u64())
        .unwrap_or(0)
}

/// Pure: judges one object against the goal, for a status that reports on at least `generation`.
fn verdict(obj: &DynObject, goal: &Goal, generation: u64) -> Verdict {
    let what = format!("{}/{}", obj.kind.lower(), obj.metadata.name);
    let Goal::Condition { type_, status } = goal else {
        return Verdict::Waiting(format!("{what} still exists"));
    };
    let seen = observed_generation(obj);
    if seen < generation {
        return Verdict::Waiting(format!(
            "{what}: waiting for generation {generation} to be picked up (status is of {seen})"
        ));
    }
    let conditions = conditions_of(obj);
    // What a paused Service reports is about the spec before the pause: never an answer.
    if let Some(c) = condition(&conditions, "Progressing").filter(|c| c.reason == PAUSED_REASON) {
        return Verdict::Failed(format!("{what} is paused: {}", c.message));
    }
    if let Some(c) = condition(&conditions, type_).filter(|c| c.status == *status) {
        return Verdict::Met(format!("{what} condition met: {type_}={:?}", c.status));
    }
    if let Some(c) = condition(&conditions, "Degraded").filter(|c| {
        c.status == ConditionStatus::True && GIVE_UP_REASONS.contains(&c.reason.as_str())
    }) {
        return Verdict::Failed(format!("{what} failed ({}): {}", c.reason, c.message));
    }
    let now = match condition(&conditions, type_) {
        Some(c) if c.message.is_empty() => format!("{type_}={:?} ({})", c.status, c.reason),
        Some(c) => format!("{type_}={:?} ({}: {})", c.status, c.reason, c.message),
        None => format!("no {type_} condition yet"),
    };
    Verdict::Waiting(format!("{what}: {now}"))
}

/// One object to wait for, and the generation its status must report on.
pub struct Target {
    pub kind: Kind,
    pub name: String,
    pub generation: u64,
}

/// Waits until every target meets the goal; fails at the first one that cannot, or at the timeout
/// (0: no limit) naming every target still waiting and where it stands. Prints one line per change
/// of where a target stands, and one when it is met.
pub async fn until(
    client: &ApiClient,
    targets: &[Target],
    goal: &Goal,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    let mut pending: Vec<(&Target, String)> = targets.iter().map(|t| (t, String::new())).collect();
    loop {
        let mut still = Vec::new();
        for (t, last) in pending {
            let line = match client.get_object(t.kind, &t.name).await {
                Err(ClientError::Api { status: 404, .. }) if *goal == Goal::Delete => {
                    println!("{}/{} deleted", t.kind.lower(), t.name);
                    continue;
                }
                Err(ClientError::Api { status: 404, .. }) => {
                    return Err(format!(
                        "error: {}/{} does not exist (deleted while waiting?)",
                        t.kind.lower(),
                        t.name
                    ))
                }
                Err(e) => return Err(api_error(e)),
                Ok(obj) => match verdict(&obj, goal, t.generation) {
                    Verdict::Met(line) => {
                        println!("{line}");
                        continue;
                    }
                    Verdict::Failed(why) => return Err(format!("error: {why}")),
                    Verdict::Waiting(line) => line,
                },
            };
            if line != last {
                eprintln!("{line}");
            }
            still.push((t, line));
        }
        if still.is_empty() {
            return Ok(());
        }
        if !timeout.is_zero() && start.elapsed() >= timeout {
            let lines: Vec<String> = still.iter().map(|(_, l)| format!("  {l}")).collect();
            return Err(format!(
                "error: timed out after {} waiting for {} object(s):\n{}",
                berth_api_types::units::Duration::from_nanos(timeout.as_nanos() as u64),
                still.len(),
                lines.join("\n")
            ));
        }
        pending = still;
        tokio::time::sleep(POLL).await;
    }
}

/// Refuses a condition goal on a kind nothing reconciles: it would never be met.
pub fn check_kind(kind: Kind, goal: &Goal) -> Result<(), String> {
    if matches!(goal, Goal::Condition { .. }) && !kind.is_reconciled() {
        return Err(format!(
            "error: {} have no conditions: nothing reconciles them, they are in effect once applied (use --for delete, or wait for the Service that uses them)",
            kind.plural()
        ));
    }
    Ok(())
}

/// `berth wait KIND NAME... --for GOAL --timeout D`.
pub async fn wait(
    conn: &Conn,
    kind: &str,
    names: &[String],
    goal: &str,
    timeout: Duration,
) -> Result<(), String> {
    let kind = crate::cli::kind_arg(kind)?;
    let goal = parse_goal(goal).map_err(|e| format!("error: --for: {e}"))?;
    check_kind(kind, &goal)?;
    let client = client(conn)?;
    let mut targets = Vec::new();
    for name in names {
        // The generation as of now: a status about an older spec is no answer.
        let generation = match client.get_object(kind, name).await {
            Ok(o) => o.metadata.generation,
            Err(ClientError::Api { status: 404, .. }) if goal == Goal::Delete => 0,
            Err(e) => return Err(api_error(e)),
        };
        targets.push(Target {
            kind,
            name: name.clone(),
            generation,
        });
    }
    until(&client, &targets, &goal, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::cli::testing::service_at as obj;

    fn cond(t: &str, s: &str, reason: &str, msg: &str) -> serde_json::Value {
        json!({"type": t, "status": s, "reason": reason, "message": msg,
               "lastTransitionTime": "2026-11-30T10:00:00Z"})
    }

    #[test]
    fn goals_parse_as_kubectl_writes_them() {
        assert_eq!(parse_goal("condition=Ready").unwrap(), Goal::ready());
        assert_eq!(
            parse_goal("condition=Degraded=false").unwrap(),
            Goal::Condition {
                type_: "Degraded".into(),
                status: ConditionStatus::False
            }
        );
        assert_eq!(parse_goal("delete").unwrap(), Goal::Delete);
        for bad in [
            "Ready",
            "condition=",
            "condition=Ready=maybe",
            "jsonpath={.x}",
        ] {
            assert!(parse_goal(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn a_status_about_an_older_generation_is_no_answer() {
        let ready = json!({"observedGeneration": 1,
            "conditions": [cond("Ready", "True", "AllTasksRunning", "1/1 tasks running")]});
        assert!(
            matches!(verdict(&obj(2, ready.clone()), &Goal::ready(), 2), Verdict::Waiting(l) if l.contains("generation 2"))
        );
        assert!(matches!(
            verdict(&obj(1, ready), &Goal::ready(), 1),
            Verdict::Met(_)
        ));
    }

    #[test]
    fn a_reason_that_will_not_clear_fails_at_once_others_wait() {
        let pull = json!({"observedGeneration": 3, "conditions": [
            cond("Ready", "False", "TasksStarting", "0/1 tasks running"),
            cond("Degraded", "True", "ImagePullFailed", "registry says: manifest unknown")]});
        assert_eq!(
            verdict(&obj(3, pull), &Goal::ready(), 3),
            Verdict::Failed(
                "service/web failed (ImagePullFailed): registry says: manifest unknown".into()
            )
        );
        // A task that crashed may come up on its next try (a database still starting).
        let crash = json!({"observedGeneration": 3, "conditions": [
            cond("Ready", "False", "TasksStarting", "0/1 tasks running"),
            cond("Degraded", "True", "TaskFailed", "task x failed: exit 1")]});
        assert_eq!(
            verdict(&obj(3, crash), &Goal::ready(), 3),
            Verdict::Waiting("service/web: Ready=False (TasksStarting: 0/1 tasks running)".into())
        );
        let paused = json!({"observedGeneration": 3, "conditions": [
            cond("Ready", "True", "AllTasksRunning", "1/1 tasks running"),
            cond("Progressing", "False", "Paused", "rollout paused: ...")]});
        assert!(
            matches!(verdict(&obj(3, paused), &Goal::ready(), 3), Verdict::Failed(l) if l.contains("is paused"))
        );
        let none = json!({"observedGeneration": 3});
        assert!(
            matches!(verdict(&obj(3, none), &Goal::ready(), 3), Verdict::Waiting(l) if l.contains("no Ready condition"))
        );
    }

    #[test]
    fn data_kinds_have_no_conditions_to_wait_for() {
        assert!(check_kind(Kind::Secret, &Goal::ready())
            .unwrap_err()
            .contains("secrets have no conditions"));
        assert!(check_kind(Kind::Secret, &Goal::Delete).is_ok());
        assert!(check_kind(Kind::Service, &Goal::ready()).is_ok());
    }
}
