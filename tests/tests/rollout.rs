//! End-to-end tests of rollouts: a failing image rolled back by the engine, reported as such in the
//! revision history and by `berth rollout status` (non-zero exit), and `berth rollout undo`. What
//! the engine runs is read with bollard, never through berth.

use berth_api_types::Kind;
use berth_e2e::{condition, docker, prefix, Berth, Bus, Cleanup, Docker, Stack};
use bollard::query_parameters::ListTasksOptions;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

const GOOD: &str = "berth-test/busybox:1";
/// busybox without its applets: `sleep` does not exist, so every task fails at once.
const BROKEN: &str = "berth-test/broken:1";

/// A service that rolls back when an update fails, watching each new task for 3 s.
fn service_yaml(name: &str, image: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n  update:\n    failureAction: rollback\n    monitor: 3s\n"
    )
}

async fn engine_image(d: &Docker, name: &str) -> String {
    berth_e2e::containers::container_spec(d, name)
        .await
        .image
        .unwrap_or_default()
}

/// Images of the tasks that are running now.
async fn running_images(d: &Docker, name: &str) -> Vec<String> {
    d.list_tasks(Some(ListTasksOptions {
        filters: Some(HashMap::from([
            ("service".to_string(), vec![name.to_string()]),
            ("desired-state".to_string(), vec!["running".to_string()]),
        ])),
    }))
    .await
    .expect("list tasks")
    .into_iter()
    .filter(|t| {
        t.status
            .as_ref()
            .and_then(|s| s.state)
            .map(|s| s.to_string())
            == Some("running".into())
    })
    .filter_map(|t| t.spec?.container_spec?.image)
    .collect()
}

fn revisions(o: &Value) -> Vec<(u64, String, String, String)> {
    o["status"]["revisions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["revision"].as_u64().unwrap_or(0),
                        r["image"].as_str().unwrap_or("").to_string(),
                        r["trigger"].as_str().unwrap_or("").to_string(),
                        r["result"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn rollout_status(b: &Berth, name: &str) -> berth_e2e::CliOutput {
    b.cli(&["rollout", "status", "service", name, "--timeout", "120s"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rollout_is_rolled_back_reported_and_undone() {
    let p = prefix("rollback");
    let d = docker().await;
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let svc = format!("{p}-app");

    b.apply(&service_yaml(&svc, GOOD));
    let out = rollout_status(b, &svc);
    assert!(out.success, "first rollout: {out:?}");
    assert!(
        out.stdout.contains("successfully rolled out: revision 1"),
        "{}",
        out.stdout
    );

    // A new image whose tasks exit at once: the engine rolls back; berth says so and exits non-zero.
    b.apply(&service_yaml(&svc, BROKEN));
    let out = rollout_status(b, &svc);
    assert!(!out.success, "a rolled-back rollout must fail: {out:?}");
    assert!(
        out.stderr
            .contains("revision 2 (berth-test/broken:1) was rolled back by the engine"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!("tasks run {GOOD}")),
        "{}",
        out.stderr
    );
    assert_eq!(engine_image(&d, &svc).await, GOOD, "the engine went back");
    berth_e2e::eventually(
        b,
        Duration::from_secs(30),
        "the previous image running",
        || {
            let d = d.clone();
            let svc = svc.clone();
            async move {
                let images = running_images(&d, &svc).await;
                if images == vec![GOOD.to_string()] {
                    Ok(())
                } else {
                    Err(format!("running {images:?}"))
                }
            }
        },
    )
    .await;
    let o = b.object(Kind::Service, &svc).await.expect("service");
    assert_eq!(
        revisions(&o),
        vec![
            (1, GOOD.into(), "api".into(), "complete".into()),
            (2, BROKEN.into(), "api".into(), "rolled-back".into()),
        ]
    );
    let degraded = condition(&o, "Degraded").expect("Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("RolledBack"))
    );

    // The history table, then undo: the spec goes back to revision 1's image, as a rollback.
    let history = b.cli_ok(&["rollout", "history", "service", &svc]);
    assert!(
        history.contains("rolled-back") && history.contains(BROKEN),
        "{history}"
    );
    let undo = b.cli_ok(&["rollout", "undo", "service", &svc]);
    assert!(undo.contains("rolled back to revision 1"), "{undo}");
    let out = rollout_status(b, &svc);
    assert!(out.success, "after undo: {out:?}");
    let o = b.object(Kind::Service, &svc).await.expect("service");
    assert_eq!(o["spec"]["image"], GOOD);
    let revs = revisions(&o);
    assert_eq!(
        revs.last().cloned(),
        Some((3, GOOD.into(), "rollback".into(), "complete".into()))
    );
    // Nothing to go back to that is not already there.
    let again = b.cli(&["rollout", "undo", "service", &svc, "--to-revision", "3"]);
    assert!(
        !again.success && again.stderr.contains("already names"),
        "{again:?}"
    );
}
