//! `berth rollout status|history|undo service NAME`: following, listing and reverting a Service's
//! rollouts, from the revision history the service controller keeps in status.
//!
//! `status` exits non-zero when the engine rolled the rollout back or paused it: `docker stack deploy`
//! exits 0 after a rollback, which lets a broken deploy pass CI. `undo` is a spec change like any
//! other (a conditional merge patch through the API), marked as a `rollback` deploy so the history
//! says where the revision came from.

use crate::api_client::ApiClient;
use crate::cli::{api_error, client};
use crate::output;
use crate::Conn;
use berth_api_types::meta::condition;
use berth_api_types::names::annotations;
use berth_api_types::service::{conditions, Revision, RolloutResult, ServiceStatus};
use berth_api_types::{ConditionStatus, DynObject, Kind};
use std::time::{Duration, Instant};

type CliResult = Result<(), String>;

fn service_kind(kind: &str) -> Result<(), String> {
    match Kind::parse_loose(kind) {
        Some(Kind::Service) => Ok(()),
        _ => Err(format!(
            "error: rollouts are a Service's: use `berth rollout ... service NAME`, not `{kind}`"
        )),
    }
}

/// The API client and the Service `name` (after checking `kind` names Services).
async fn service(conn: &Conn, kind: &str, name: &str) -> Result<(ApiClient, DynObject), String> {
    service_kind(kind)?;
    let client = client(conn)?;
    let obj = client
        .get_object(Kind::Service, name)
        .await
        .map_err(api_error)?;
    Ok((client, obj))
}

fn status_of(obj: &DynObject) -> ServiceStatus {
    serde_json::from_value(obj.status.clone()).unwrap_or_default()
}

/// Where a rollout stands, as `rollout status` reports it.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Still going: the line to print.
    Waiting(String),
    Done(String),
    Failed(String),
}

/// Pure: the phase of the object's current rollout.
fn phase(obj: &DynObject) -> Phase {
    let name = &obj.metadata.name;
    let st = status_of(obj);
    let generation = obj.metadata.generation;
    if st.observed_generation.unwrap_or(0) < generation {
        return Phase::Waiting(format!(
            "Waiting for service {name} generation {generation} to be picked up..."
        ));
    }
    let degraded = condition(&st.conditions, conditions::DEGRADED);
    // A spec berth will not apply is final until the next change.
    if let Some(c) = degraded.filter(|c| {
        c.status == ConditionStatus::True && matches!(c.reason.as_str(), "InvalidSpec" | "Refused")
    }) {
        return Phase::Failed(format!(
            "service {name} cannot be rolled out ({}): {}",
            c.reason, c.message
        ));
    }
    // Pre-deploy steps run before the new revision reaches the engine (and the history).
    if let Some(c) = condition(&st.conditions, conditions::PROGRESSING)
        .filter(|c| c.status == ConditionStatus::True && c.reason == conditions::PRE_DEPLOY_RUNNING)
    {
        return Phase::Waiting(format!("Waiting for service {name} {}...", c.message));
    }
    let Some(rev) = st.revisions.last() else {
        let why = condition(&st.conditions, conditions::READY)
            .map(|c| format!(" ({}: {})", c.reason, c.message))
            .unwrap_or_default();
        return Phase::Waiting(format!("Waiting for service {name} to be created{why}..."));
    };
    let what = format!("revision {} ({})", rev.revision, pinned(rev));
    // Why a rollout ended badly, and what runs instead.
    let why = rev
        .message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let running = st
        .image
        .as_deref()
        .map(|i| format!("; tasks run {i}"))
        .unwrap_or_default();
    match rev.result {
        RolloutResult::Complete => {
            Phase::Done(format!("service {name} successfully rolled out: {what}"))
        }
        RolloutResult::RolledBack => Phase::Failed(format!(
            "service {name}: {what} was rolled back by the engine{why}{running}"
        )),
        RolloutResult::Paused => Phase::Failed(format!(
            "service {name}: {what} was paused by the engine{why}{running}"
        )),
        RolloutResult::FailedPredeploy => Phase::Failed(format!(
            "service {name}: {what} was not rolled out{why}{running} (its log: berth logs job {name} --revision {})",
            rev.revision
        )),
        RolloutResult::Progressing | RolloutResult::Superseded => {
            let mut line = format!(
                "Waiting for service {name} {what}: {} of {} updated tasks running",
                st.updated_replicas, st.desired_replicas
            );
            if let Some(c) = degraded.filter(|c| c.status == ConditionStatus::True) {
                line.push_str(&format!(" ({}: {})", c.reason, c.message));
            }
            Phase::Waiting(line + "...")
        }
    }
}

/// The image as the engine was told to run it.
pub(crate) fn pinned(r: &Revision) -> String {
    match &r.digest {
        Some(d) if !r.image.contains('@') => format!("{}@{d}", r.image),
        _ => r.image.clone(),
    }
}

pub async fn status(conn: &Conn, kind: &str, name: &str, timeout: Duration) -> CliResult {
    service_kind(kind)?;
    let client = client(conn)?;
    let start = Instant::now();
    let mut last_line = String::new();
    loop {
        let obj = client
            .get_object(Kind::Service, name)
            .await
            .map_err(api_error)?;
        match phase(&obj) {
            Phase::Done(line) => {
                println!("{line}");
                return Ok(());
            }
            Phase::Failed(line) => return Err(format!("error: {line}")),
            Phase::Waiting(line) => {
                if line != last_line {
                    println!("{line}");
                    last_line = line;
                }
            }
        }
        if !timeout.is_zero() && start.elapsed() > timeout {
            return Err(format!(
                "error: timed out after {}s waiting for the rollout of service {name}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn history(conn: &Conn, kind: &str, name: &str) -> CliResult {
    let (_, obj) = service(conn, kind, name).await?;
    let st = status_of(&obj);
    if st.revisions.is_empty() {
        eprintln!("No rollouts of service {name} yet.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = st
        .revisions
        .iter()
        .map(|r| {
            vec![
                r.revision.to_string(),
                r.image.clone(),
                r.digest
                    .as_deref()
                    .map(|d| d.chars().take(19).collect())
                    .unwrap_or_else(|| "-".into()),
                r.trigger.clone(),
                r.result.to_string(),
                output::age_since(r.time),
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(
            &["REVISION", "IMAGE", "DIGEST", "TRIGGER", "RESULT", "AGE"],
            &rows
        )
    );
    Ok(())
}

/// Pure: which revision `undo` goes back to (the one before the latest, or the one asked for).
pub(crate) fn undo_target(revisions: &[Revision], to: Option<u64>) -> Result<&Revision, String> {
    match to {
        Some(n) => revisions.iter().find(|r| r.revision == n).ok_or_else(|| {
            let known: Vec<String> = revisions.iter().map(|r| r.revision.to_string()).collect();
            format!(
                "error: no revision {n} in the history (it has: {})",
                known.join(", ")
            )
        }),
        // The revision before the latest that ever reached the engine: one whose pre-deploy
        // steps failed never ran, so there is nothing of it to go back to.
        None => revisions
            .iter()
            .rev()
            .skip(1)
            .find(|r| r.result != RolloutResult::FailedPredeploy)
            .ok_or_else(|| "error: there is no earlier revision to go back to".to_string()),
    }
}

pub async fn undo(conn: &Conn, kind: &str, name: &str, to: Option<u64>) -> CliResult {
    let (client, obj) = service(conn, kind, name).await?;
    let st = status_of(&obj);
    let target = undo_target(&st.revisions, to)?;
    let image = pinned(target);
    let current = obj.spec.get("image").and_then(|v| v.as_str()).unwrap_or("");
    if current == image {
        return Err(format!(
            "error: service {name} already names {image} (revision {})",
            target.revision
        ));
    }
    let patch = deploy_patch(&obj, "rollback", serde_json::json!({ "image": image }));
    client
        .patch_object(Kind::Service, name, &patch)
        .await
        .map_err(api_error)?;
    println!(
        "service/{name} rolled back to revision {} ({image})",
        target.revision
    );
    Ok(())
}

/// A spec change marked as a deploy from `source`, so the revision history says where it came
/// from. The change makes the next generation; the patch is conditional on the version read, so no
/// other write can take that generation in between.
pub(crate) fn deploy_patch(
    obj: &DynObject,
    source: &str,
    spec: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "resourceVersion": obj.metadata.resource_version,
            "annotations": {
                annotations::DEPLOY_SOURCE: source,
                annotations::DEPLOY_ID: ulid::Ulid::new().to_string(),
                annotations::DEPLOY_GENERATION: (obj.metadata.generation + 1).to_string(),
            }
        },
        "spec": spec,
    })
}

/// `rollout restart`: new tasks from the same spec (`spec.forceUpdate` moves on, as a deploy of
/// the tag already running does), rolled out under the service's update policy.
pub async fn restart(conn: &Conn, kind: &str, name: &str) -> CliResult {
    let (client, obj) = service(conn, kind, name).await?;
    let force = obj
        .spec
        .get("forceUpdate")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let patch = deploy_patch(
        &obj,
        "restart",
        serde_json::json!({ "forceUpdate": force + 1 }),
    );
    client
        .patch_object(Kind::Service, name, &patch)
        .await
        .map_err(api_error)?;
    println!("service/{name} restarted");
    Ok(())
}

/// `rollout pause|resume`: while `spec.paused`, spec changes are kept but not rolled out (see the
/// service controller); resuming rolls out whatever the spec says then, in one update.
pub async fn set_paused(conn: &Conn, kind: &str, name: &str, paused: bool) -> CliResult {
    let (client, obj) = service(conn, kind, name).await?;
    let now = obj.spec.get("paused").and_then(|v| v.as_bool()) == Some(true);
    let word = if paused { "paused" } else { "resumed" };
    if now == paused {
        println!(
            "service/{name} is already {}",
            if paused { "paused" } else { "not paused" }
        );
        return Ok(());
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": obj.metadata.resource_version},
        // `null` removes the field: a resumed service's spec reads as one never paused.
        "spec": {"paused": if paused { serde_json::Value::Bool(true) } else { serde_json::Value::Null }},
    });
    client
        .patch_object(Kind::Service, name, &patch)
        .await
        .map_err(api_error)?;
    println!("service/{name} {word}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::cli::testing::service_at as obj;

    fn rev(n: u64, image: &str, result: &str) -> serde_json::Value {
        json!({"revision": n, "image": image, "generation": n, "time": "2026-11-22T10:00:00Z",
               "trigger": "api", "result": result, "message": "update rolled back due to failure"})
    }

    #[test]
    fn phases() {
        let p = phase(&obj(2, json!({"observedGeneration": 1})));
        assert!(matches!(p, Phase::Waiting(l) if l.contains("generation 2")));
        let p = phase(&obj(
            2,
            json!({"observedGeneration": 2, "updatedReplicas": 1, "desiredReplicas": 3,
                   "revisions": [rev(1, "app:1", "complete"), rev(2, "app:2", "progressing")]}),
        ));
        assert_eq!(
            p,
            Phase::Waiting(
                "Waiting for service web revision 2 (app:2): 1 of 3 updated tasks running..."
                    .into()
            )
        );
        let p = phase(&obj(
            2,
            json!({"observedGeneration": 2, "image": "app:1",
                   "revisions": [rev(1, "app:1", "complete"), rev(2, "app:2", "rolled-back")]}),
        ));
        assert_eq!(
            p,
            Phase::Failed("service web: revision 2 (app:2) was rolled back by the engine: update rolled back due to failure; tasks run app:1".into())
        );
        let p = phase(&obj(
            2,
            json!({"observedGeneration": 2, "revisions": [rev(2, "app:2", "complete")]}),
        ));
        assert!(matches!(p, Phase::Done(_)));
        let invalid = json!({"observedGeneration": 2, "conditions": [{"type": "Degraded",
            "status": "True", "reason": "Refused", "message": "no",
            "lastTransitionTime": "2026-11-22T10:00:00Z"}]});
        assert!(matches!(phase(&obj(2, invalid)), Phase::Failed(_)));
    }

    #[test]
    fn pre_deploy_steps_are_waited_for_and_their_failure_fails() {
        let running = json!({"observedGeneration": 2, "revisions": [rev(1, "app:1", "complete")],
            "conditions": [{"type": "Progressing", "status": "True", "reason": "PreDeployRunning",
            "message": "revision 2: pre-deploy step `migrate` (1/1) running before the rollout",
            "lastTransitionTime": "2026-11-22T10:00:00Z"}]});
        assert_eq!(
            phase(&obj(2, running)),
            Phase::Waiting("Waiting for service web revision 2: pre-deploy step `migrate` (1/1) running before the rollout...".into())
        );
        let mut failed = rev(2, "app:2", "failed-predeploy");
        failed["message"] = json!("pre-deploy step `migrate` failed with exit code 3: boom");
        let p = phase(&obj(
            2,
            json!({"observedGeneration": 2, "image": "app:1",
                   "revisions": [rev(1, "app:1", "complete"), failed]}),
        ));
        assert_eq!(
            p,
            Phase::Failed("service web: revision 2 (app:2) was not rolled out: pre-deploy step `migrate` failed with exit code 3: boom; tasks run app:1 (its log: berth logs job web --revision 2)".into())
        );
    }

    #[test]
    fn undo_skips_revisions_that_never_ran() {
        let revs: Vec<Revision> = serde_json::from_value(json!([
            rev(1, "app:1", "complete"),
            rev(2, "app:2", "complete"),
            rev(3, "app:3", "failed-predeploy"),
            rev(4, "app:4", "complete")
        ]))
        .unwrap();
        assert_eq!(undo_target(&revs, None).unwrap().revision, 2);
    }

    #[test]
    fn undo_goes_to_the_previous_or_the_named_revision() {
        let revs: Vec<Revision> = serde_json::from_value(json!([
            rev(3, "app:1", "complete"),
            rev(4, "app:2", "complete"),
            rev(5, "app:3", "rolled-back")
        ]))
        .unwrap();
        assert_eq!(undo_target(&revs, None).unwrap().revision, 4);
        assert_eq!(undo_target(&revs, Some(3)).unwrap().image, "app:1");
        let e = undo_target(&revs, Some(1)).unwrap_err();
        assert!(e.contains("no revision 1") && e.contains("3, 4, 5"), "{e}");
        assert!(undo_target(&revs[..1], None).is_err());
    }
}
