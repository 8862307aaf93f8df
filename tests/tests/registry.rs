//! End-to-end tests of private registries: a real `docker-registry` with htpasswd users on
//! loopback, a locally built image pushed into it, and Services that can only start when berth
//! sends the right credentials with the Swarm service. What the engine holds is read with bollard,
//! never through berth.
//!
//! The credential story runs once per bus; the two-registries test runs on the embedded bus. Every
//! registry has its own port, so its image names are the test's own: no test can run an image that
//! another test's pull left in the engine's cache.

use berth_api_types::Kind;
use berth_e2e::registry::{TestRegistry, TEST_IMAGE};
use berth_e2e::{condition, docker, on_both_buses, prefix, Berth, Bus, Cleanup, Docker, Stack};
use bollard::query_parameters::{InspectServiceOptions, ListTasksOptions};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// Failed pulls are retried by Swarm after its restart delay; generous for a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(60);

/// A second image with other content (so another digest), built by scripts/test.
const SECOND_IMAGE: &str = "berth-test/app:2";

fn secret_yaml(name: &str, password: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Secret\nmetadata:\n  name: {name}\nspec:\n  stringData:\n    password: \"{password}\"\n"
    )
}

fn registry_yaml(name: &str, server: &str, user: &str, secret: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Registry\nmetadata:\n  name: {name}\nspec:\n  server: \"{server}\"\n  username: {user}\n  passwordSecretRef:\n    name: {secret}\n    key: password\n"
    )
}

fn service_yaml(name: &str, image: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: \"{image}\"\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n"
    )
}

fn status_is(c: &Value, status: &str, reason: &str) -> bool {
    c["status"] == status && c["reason"] == reason
}

/// Waits until the Service runs 1/1 and is Ready.
async fn wait_running(b: &Berth, name: &str) -> Value {
    b.wait_condition(Kind::Service, name, "Ready", CONVERGE, |c| {
        c["status"] == "True"
    })
    .await
}

/// (task id, state) of the service's tasks that should be running.
async fn live_tasks(d: &Docker, service: &str) -> Vec<(String, String)> {
    let tasks = d
        .list_tasks(Some(ListTasksOptions {
            filters: Some(HashMap::from([
                ("service".to_string(), vec![service.to_string()]),
                ("desired-state".to_string(), vec!["running".to_string()]),
            ])),
        }))
        .await
        .expect("list tasks");
    tasks
        .into_iter()
        .map(|t| {
            let state = t
                .status
                .and_then(|s| s.state)
                .map(|s| s.to_string())
                .unwrap_or_default();
            (t.id.unwrap_or_default(), state)
        })
        .collect()
}

async fn version_of(d: &Docker, service: &str) -> u64 {
    d.inspect_service(service, None::<InspectServiceOptions>)
        .await
        .expect("inspect service")
        .version
        .and_then(|v| v.index)
        .unwrap_or(0)
}

/// No credentials, then wrong ones, then the right ones: each step is reported in the registry's
/// words, and fixing the password in the Secret is all it takes for both objects to converge.
async fn wrong_password_then_fixed(bus: Bus) {
    let p = prefix("regfix");
    let d = docker().await;
    let registry = TestRegistry::start(&[("alice", "s3cret-A")]);
    let image = registry
        .push(&d, TEST_IMAGE, "team/app:1", "alice", "s3cret-A")
        .await;
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let (svc, reg, pass) = (format!("{p}-app"), format!("{p}-reg"), format!("{p}-pass"));

    // 1. No Registry for the server: the engine's "No such image" is replaced by the registry's
    //    answer, and the condition says credentials are missing.
    b.apply(&service_yaml(&svc, &image));
    let o = b
        .wait_condition(Kind::Service, &svc, "Degraded", CONVERGE, |c| {
            status_is(c, "True", "ImagePullFailed")
        })
        .await;
    let msg = condition(&o, "Degraded").unwrap()["message"].to_string();
    assert!(
        msg.contains(&registry.host())
            && msg.contains("requires credentials and no Registry provides them"),
        "{msg}"
    );

    // 2. A Registry with the wrong password: not authenticated, with the registry's error, and the
    //    Service's condition names the Registry and why it failed.
    b.apply(&format!(
        "{}---\n{}",
        secret_yaml(&pass, "wrong-password"),
        registry_yaml(&reg, &registry.host(), "alice", &pass)
    ));
    let r = b
        .wait_condition(Kind::Registry, &reg, "Authenticated", CONVERGE, |c| {
            status_is(c, "False", "Rejected")
        })
        .await;
    let why = condition(&r, "Authenticated").unwrap()["message"].to_string();
    assert!(
        why.contains("401") && why.contains("authentication required") && why.contains("alice"),
        "the registry's own words: {why}"
    );
    assert!(
        !why.contains("wrong-password"),
        "no password in status: {why}"
    );
    let o = b
        .wait_condition(Kind::Service, &svc, "Degraded", CONVERGE, |c| {
            status_is(c, "True", "ImagePullFailed")
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("Registry `{reg}` cannot log in")))
        })
        .await;
    let msg = condition(&o, "Degraded").unwrap()["message"].to_string();
    assert!(msg.contains("401"), "{msg}");
    assert_eq!(o["status"]["runningReplicas"], 0);

    // 3. The right password in the Secret: both converge with no further action.
    b.apply(&secret_yaml(&pass, "s3cret-A"));
    b.wait_condition(Kind::Registry, &reg, "Authenticated", CONVERGE, |c| {
        status_is(c, "True", "LoginSucceeded")
    })
    .await;
    let o = wait_running(b, &svc).await;
    assert_eq!(o["status"]["runningReplicas"], 1);
    let degraded = condition(&o, "Degraded").unwrap();
    assert_eq!(degraded["status"], "False", "{o}");
}

on_both_buses!(wrong_password_then_fixed);

/// A private image runs with valid credentials; later writes of the service keep sending them, a new
/// Secret version reaches the engine without restarting the running task, and after the registry's
/// password is rotated a new image is pulled with the new password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_with_every_write() {
    let p = prefix("regwrite");
    let d = docker().await;
    let mut registry = TestRegistry::start(&[("ci", "pw-1")]);
    let image = registry
        .push(&d, TEST_IMAGE, "team/app:1", "ci", "pw-1")
        .await;
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let (svc, reg, pass) = (format!("{p}-app"), format!("{p}-reg"), format!("{p}-pass"));
    b.apply(&format!(
        "{}---\n{}---\n{}",
        secret_yaml(&pass, "pw-1"),
        registry_yaml(&reg, &registry.host(), "ci", &pass),
        service_yaml(&svc, &image)
    ));
    wait_running(b, &svc).await;
    b.wait_condition(Kind::Registry, &reg, "Authenticated", CONVERGE, |c| {
        status_is(c, "True", "LoginSucceeded")
    })
    .await;

    // A new Secret version (the same password, now from a file with a trailing newline, which is
    // not part of it): the credentials are sent again, and the running task is left alone.
    let tasks_before = live_tasks(&d, &svc).await;
    let version_before = version_of(&d, &svc).await;
    b.apply(&secret_yaml(&pass, "pw-1\\n"));
    berth_e2e::wait_for(
        CONVERGE,
        "the engine to receive the new credentials",
        || {
            let d = d.clone();
            let svc = svc.clone();
            async move { (version_of(&d, &svc).await > version_before).then_some(()) }
        },
    )
    .await;
    b.wait_condition(Kind::Registry, &reg, "Authenticated", CONVERGE, |c| {
        status_is(c, "True", "LoginSucceeded")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        live_tasks(&d, &svc).await,
        tasks_before,
        "new credentials alone must not restart tasks"
    );

    // The password is rotated: the registry now accepts only pw-2, and the Secret says pw-2. The
    // engine gets the new credentials with an update of the unchanged spec.
    registry.set_users(&[("ci", "pw-2")]);
    let version_before = version_of(&d, &svc).await;
    b.apply(&secret_yaml(&pass, "pw-2"));
    berth_e2e::wait_for(
        CONVERGE,
        "the engine to receive the rotated credentials",
        || {
            let d = d.clone();
            let svc = svc.clone();
            async move { (version_of(&d, &svc).await > version_before).then_some(()) }
        },
    )
    .await;

    // A new image under a new tag, which the engine has never held: its task must pull it, and
    // the registry lets only pw-2 pull. (Old or no credentials: 401, the task never runs.)
    let image2 = registry
        .push(&d, SECOND_IMAGE, "team/app:2", "ci", "pw-2")
        .await;
    b.apply(&service_yaml(&svc, &image2));
    berth_e2e::eventually(b, CONVERGE, "a task running the new image", || {
        let d = d.clone();
        let svc = svc.clone();
        let image2 = image2.clone();
        async move {
            let tasks = berth_e2e::deploy::running_tasks(&d, &svc).await;
            match tasks.as_slice() {
                [(_, image)] if image.starts_with(&image2) => Ok(()),
                _ => Err(format!("running tasks {tasks:?}")),
            }
        }
    })
    .await;
    let o = wait_running(b, &svc).await;
    assert_eq!(o["status"]["runningReplicas"], 1, "{o}");
}

/// Two registries on different hosts with different users: each Service gets its own registry's
/// credentials (swapped ones would be refused, and the tasks would never start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_each_service_gets_its_own() {
    let p = prefix("reg2");
    let d = docker().await;
    let one = TestRegistry::start(&[("alice", "pass-one")]);
    let two = TestRegistry::start(&[("bob", "pass-two")]);
    let image_one = one
        .push(&d, TEST_IMAGE, "team/one:1", "alice", "pass-one")
        .await;
    let image_two = two
        .push(&d, TEST_IMAGE, "team/two:1", "bob", "pass-two")
        .await;
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    b.apply(
        &[
            secret_yaml(&format!("{p}-pass-one"), "pass-one"),
            secret_yaml(&format!("{p}-pass-two"), "pass-two"),
            registry_yaml(
                &format!("{p}-one"),
                &one.host(),
                "alice",
                &format!("{p}-pass-one"),
            ),
            registry_yaml(
                &format!("{p}-two"),
                &two.host(),
                "bob",
                &format!("{p}-pass-two"),
            ),
            service_yaml(&format!("{p}-svc-one"), &image_one),
            service_yaml(&format!("{p}-svc-two"), &image_two),
        ]
        .join("---\n"),
    );
    for reg in ["one", "two"] {
        b.wait_condition(
            Kind::Registry,
            &format!("{p}-{reg}"),
            "Authenticated",
            CONVERGE,
            |c| status_is(c, "True", "LoginSucceeded"),
        )
        .await;
    }
    wait_running(b, &format!("{p}-svc-one")).await;
    wait_running(b, &format!("{p}-svc-two")).await;

    // The table shows both, with no password.
    let table = b.cli_ok(&["get", "registries"]);
    for want in [one.host(), two.host(), "alice".into(), "bob".into()] {
        assert!(table.contains(&want), "{table}");
    }
    assert!(
        !table.contains("pass-one") && !table.contains("pass-two"),
        "{table}"
    );
    // A Secret a Registry uses cannot be deleted from under it.
    let out = b.cli(&["delete", "secret", &format!("{p}-pass-one")]);
    assert!(!out.success, "deleting a Registry's Secret must be refused");
    assert!(
        out.stderr.contains(&format!("registry/{p}-one")),
        "{}",
        out.stderr
    );
}
