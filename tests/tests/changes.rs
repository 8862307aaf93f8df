//! End-to-end tests of the day-2 commands that change objects without a manifest, and of waiting
//! for them: `apply --wait` / `wait` (Ready, and a broken image named), `scale` (kept through a
//! resync), `rollout restart` (new tasks, same spec), `rollout pause|resume`, `diff`, `edit`,
//! `label` and `apply --prune -l`, plus `env` written as a Compose-style map. What the engine runs
//! is read with bollard, never through berth.

use berth_api_types::Kind;
use berth_e2e::{await_resync, docker, manifest, prefix, swarm_replicas, Berth, Cleanup, Docker};
use std::collections::BTreeSet;
use std::time::Duration;

const IMAGE: &str = "berth-test/busybox:1";
const CONVERGE: Duration = Duration::from_secs(120);

fn service_yaml(name: &str, replicas: u64, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\n  labels:\n    app: {name}\nspec:\n  image: {IMAGE}\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: {replicas}\n{extra}"
    )
}

/// Ids of the service's tasks that are running now.
async fn running_task_ids(d: &Docker, name: &str) -> BTreeSet<String> {
    berth_e2e::deploy::running_tasks(d, name)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// The environment the engine gives the service's containers.
async fn engine_env(d: &Docker, name: &str) -> Vec<String> {
    berth_e2e::containers::container_spec(d, name)
        .await
        .env
        .unwrap_or_default()
}

async fn ready(b: &Berth, name: &str) -> serde_json::Value {
    b.wait_condition(Kind::Service, name, "Ready", CONVERGE, |c| {
        c["status"] == "True"
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_returns_on_ready_and_wait_fails_naming_a_broken_image() {
    let p = prefix("wait");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let good = format!("{p}-good");
    let (_dir, file) = manifest("good.yaml", &service_yaml(&good, 2, ""));
    let out = b.cli(&[
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--wait",
        "--timeout",
        "2m",
    ]);
    assert!(
        out.success,
        "apply --wait: {}\n{}",
        out.stderr,
        b.log_text()
    );
    assert!(
        out.stdout
            .contains(&format!("service/{good} condition met: Ready=True")),
        "{}",
        out.stdout
    );
    // It returned because the engine runs it, not because of an old status.
    assert_eq!(running_task_ids(&docker().await, &good).await.len(), 2);

    // An image no registry serves: the wait stops with the pull failure, long before its timeout.
    let broken = format!("{p}-broken");
    let yaml = service_yaml(&broken, 1, "").replace(IMAGE, "berth-test/does-not-exist:1");
    b.apply(&yaml);
    let started = std::time::Instant::now();
    let out = b.cli(&[
        "wait",
        "service",
        &broken,
        "--for",
        "condition=Ready",
        "--timeout",
        "1m30s",
    ]);
    assert!(
        !out.success,
        "wait on a broken image succeeded: {}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains(&format!("service/{broken} failed (ImagePullFailed)"))
            && out.stderr.contains("berth-test/does-not-exist:1"),
        "the reason names the image: {}",
        out.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(85),
        "wait ran into its timeout instead of stopping at the failure: {}",
        out.stderr
    );

    // Bad input is refused before anything is asked.
    let out = b.cli(&["wait", "service", &good, "--for", "Ready"]);
    assert!(
        !out.success && out.stderr.contains("`Ready` is not a goal"),
        "{}",
        out.stderr
    );
    let out = b.cli(&["wait", "service", &good, "--timeout", "soon"]);
    assert!(
        !out.success && out.stderr.contains("invalid duration `soon`"),
        "{}",
        out.stderr
    );

    // `--for delete` returns once it is gone.
    b.cli_ok(&["delete", "service", &good]);
    let out = b.cli(&[
        "wait",
        "service",
        &good,
        "--for",
        "delete",
        "--timeout",
        "1m",
    ]);
    assert!(out.success, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_is_kept_by_drift_repair_and_restart_replaces_tasks_with_the_same_spec() {
    let p = prefix("scale");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start_with(None, &["--resync", "3"]);
    let d = docker().await;
    let name = format!("{p}-web");
    b.apply(&service_yaml(&name, 1, ""));
    ready(&b, &name).await;

    let out = b.cli_ok(&["scale", "service", &name, "--replicas", "3"]);
    assert_eq!(out, format!("service/{name} scaled to 3\n"));
    let obj = ready(&b, &name).await;
    assert_eq!(obj["spec"]["replicas"], 3);
    assert_eq!(swarm_replicas(&d, &name).await, Some(3));
    // A full resync compares the engine with the spec: the scale is the spec now, so it stays.
    await_resync(&b, &d, &p, CONVERGE).await;
    assert_eq!(swarm_replicas(&d, &name).await, Some(3));
    assert_eq!(running_task_ids(&d, &name).await.len(), 3);
    let out = b.cli(&["scale", "service", &name, "--replicas", "-1"]);
    assert!(!out.success, "a negative count was accepted");

    // Restart: every task replaced, the spec unchanged but for forceUpdate.
    let before_ids = running_task_ids(&d, &name).await;
    let before = b.object(Kind::Service, &name).await.unwrap();
    let out = b.cli_ok(&["rollout", "restart", "service", &name]);
    assert_eq!(out, format!("service/{name} restarted\n"));
    let status = b.cli(&["rollout", "status", "service", &name, "--timeout", "2m"]);
    assert!(status.success, "{}", status.stderr);
    let after_ids = running_task_ids(&d, &name).await;
    assert_eq!(after_ids.len(), 3);
    assert!(
        after_ids.is_disjoint(&before_ids),
        "old tasks survived the restart: {before_ids:?} -> {after_ids:?}"
    );
    let after = b.object(Kind::Service, &name).await.unwrap();
    let mut spec = after["spec"].clone();
    assert_eq!(
        spec["forceUpdate"],
        before["spec"]["forceUpdate"].as_u64().unwrap_or(0) + 1
    );
    spec.as_object_mut().unwrap().remove("forceUpdate");
    assert_eq!(spec, before["spec"], "only forceUpdate moved");
    let history = b.cli_ok(&["rollout", "history", "service", &name]);
    assert!(
        history.contains("restart"),
        "the history names the restart: {history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_service_keeps_running_its_old_spec_until_resumed() {
    let p = prefix("pause");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let d = docker().await;
    let name = format!("{p}-web");
    // `env` as Compose writes it: a map with unquoted scalars.
    b.apply(&service_yaml(
        &name,
        1,
        "  env:\n    ROUND: 1\n    DEBUG: true\n",
    ));
    ready(&b, &name).await;
    let env = engine_env(&d, &name).await;
    assert!(
        env.contains(&"ROUND=1".to_string()) && env.contains(&"DEBUG=true".to_string()),
        "{env:?}"
    );

    assert_eq!(
        b.cli_ok(&["rollout", "pause", "service", &name]),
        format!("service/{name} paused\n")
    );
    // The manifest does not say `paused`: applying it (as a CI job would) keeps the pause.
    b.apply(&service_yaml(
        &name,
        1,
        "  env:\n    ROUND: 2\n    DEBUG: true\n",
    ));
    let obj = b
        .wait_condition(Kind::Service, &name, "Progressing", CONVERGE, |c| {
            c["reason"] == "Paused"
        })
        .await;
    assert_eq!(
        obj["spec"]["env"][1],
        serde_json::json!({"name": "ROUND", "value": "2"})
    );
    assert!(
        engine_env(&d, &name).await.contains(&"ROUND=1".to_string()),
        "a paused service was rolled out"
    );
    // Waiting on a paused service is a mistake in a pipeline: it says so instead of hanging.
    let out = b.cli(&["wait", "service", &name, "--timeout", "30s"]);
    assert!(
        !out.success && out.stderr.contains("is paused"),
        "{}",
        out.stderr
    );

    assert_eq!(
        b.cli_ok(&["rollout", "resume", "service", &name]),
        format!("service/{name} resumed\n")
    );
    let out = b.cli(&["wait", "service", &name, "--timeout", "2m"]);
    assert!(out.success, "{}", out.stderr);
    assert!(engine_env(&d, &name).await.contains(&"ROUND=2".to_string()));
    let obj = b.object(Kind::Service, &name).await.unwrap();
    assert!(obj["spec"].get("paused").is_none(), "{}", obj["spec"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_edit_and_label_change_exactly_what_they_say() {
    let p = prefix("diff");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let name = format!("{p}-web");
    let secret = format!("{p}-creds");
    let secret_yaml = |value: &str| {
        format!("apiVersion: berth/v1\nkind: Secret\nmetadata:\n  name: {secret}\nspec:\n  stringData:\n    password: {value}\n")
    };
    let v1 = format!(
        "{}---\n{}",
        service_yaml(&name, 0, ""),
        secret_yaml("first-Value-1")
    );
    let (dir, file) = manifest("app.yaml", &v1);
    let path = file.to_str().unwrap();
    b.cli_ok(&["apply", "-f", path]);

    let same = b.cli(&["diff", "-f", path]);
    assert!(same.success, "no change is exit 0: {}", same.stderr);
    assert_eq!(same.stdout, "");

    let v2 = format!(
        "{}---\n{}",
        service_yaml(&name, 2, ""),
        secret_yaml("second-Value-2")
    );
    std::fs::write(&file, &v2).unwrap();
    let out = b.cli(&["diff", "-f", path]);
    assert_eq!(out.code, Some(1), "differences are exit 1: {}", out.stderr);
    assert!(
        out.stdout.contains(&format!("--- live/service/{name}"))
            && out.stdout.contains("-  replicas: 0\n+  replicas: 2"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("secret/{secret}: values or keys change")),
        "{}",
        out.stdout
    );
    for v in ["first-Value-1", "second-Value-2"] {
        assert!(
            !out.stdout.contains(v) && !out.stderr.contains(v),
            "a secret value was printed"
        );
    }
    assert_eq!(
        b.object(Kind::Service, &name).await.unwrap()["spec"]["replicas"],
        0,
        "diff changed something"
    );
    drop(dir);

    // edit: the editor is a script; what it writes is applied, conditionally on the version read.
    let editor = |script: &str| {
        let mut cmd = std::process::Command::new(berth_e2e::berth_bin());
        cmd.args(["edit", "service", &name])
            .env("BERTH_URL", b.client_urls())
            .env("BERTH_TOKEN", &b.token)
            .env_remove("VISUAL")
            .env("EDITOR", script);
        cmd.output().expect("berth edit")
    };
    let out = editor("sed -i 's/replicas: 0/replicas: 1/'");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        b.object(Kind::Service, &name).await.unwrap()["spec"]["replicas"],
        1
    );
    let out = editor("true");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no changes made"));
    // An invalid edit: nothing changes, the error names the field, and the edit is kept.
    let out = editor("sed -i 's/replicas: 1/replicas: many/'");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "an invalid edit succeeded");
    assert!(
        err.contains("spec.replicas") && err.contains("your changes are kept in"),
        "{err}"
    );
    let kept = err
        .split("your changes are kept in ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    assert!(std::fs::read_to_string(kept)
        .unwrap()
        .contains("replicas: many"));
    let _ = std::fs::remove_file(kept);
    assert_eq!(
        b.object(Kind::Service, &name).await.unwrap()["spec"]["replicas"],
        1
    );
    let out = editor("true");
    assert!(out.status.success());
    let out = std::process::Command::new(berth_e2e::berth_bin())
        .args(["edit", "secret", &secret])
        .env("BERTH_URL", b.client_urls())
        .env("BERTH_TOKEN", &b.token)
        .env("EDITOR", "true")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("secrets are not edited"));

    // label: set, refuse to overwrite silently, overwrite, remove.
    b.cli_ok(&["label", "service", &name, "tier=web"]);
    let out = b.cli(&["label", "service", &name, "tier=db"]);
    assert!(
        !out.success && out.stderr.contains("--overwrite"),
        "{}",
        out.stderr
    );
    b.cli_ok(&["label", "service", &name, "tier=db", "--overwrite", "app-"]);
    let labels = b.object(Kind::Service, &name).await.unwrap()["metadata"]["labels"].clone();
    assert_eq!(labels, serde_json::json!({"tier": "db"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_prune_deletes_only_what_the_selector_owns_and_the_files_dropped() {
    let p = prefix("prune");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let d = docker().await;
    let owned = |name: &str, app: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\n  labels:\n    app: {app}\nspec:\n  image: {IMAGE}\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n"
        )
    };
    let app = format!("{p}-shop");
    let (web, api, other) = (format!("{p}-web"), format!("{p}-api"), format!("{p}-other"));
    let config = format!("apiVersion: berth/v1\nkind: Config\nmetadata:\n  name: {p}-cfg\n  labels:\n    app: {app}\nspec:\n  stringData:\n    a: b\n");
    // Another team's object, labelled otherwise: never a candidate.
    b.apply(&owned(&other, "someone-else"));
    let all = format!(
        "{}---\n{}---\n{config}",
        owned(&web, &app),
        owned(&api, &app)
    );
    let (_dir, file) = manifest("shop.yaml", &all);
    let path = file.to_str().unwrap();
    let selector = format!("app={app}");
    b.cli_ok(&[
        "apply",
        "-f",
        path,
        "--prune",
        "-l",
        &selector,
        "--wait",
        "--timeout",
        "2m",
    ]);
    assert!(swarm_replicas(&d, &api).await.is_some());

    // The api service and the config leave the files.
    std::fs::write(&file, owned(&web, &app)).unwrap();
    let out = b.cli(&["apply", "-f", path, "--prune", "-l", &selector, "--dry-run"]);
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("service/{api} pruned (dry run)")),
        "{}",
        out.stdout
    );
    assert!(
        b.object(Kind::Service, &api).await.is_some(),
        "a dry run deleted"
    );

    let out = b.cli(&["apply", "-f", path, "--prune", "-l", &selector]);
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("pruning 2 object(s) matching `{selector}`")),
        "what goes is shown first: {}",
        out.stderr
    );
    assert!(
        out.stdout.contains(&format!("service/{api} pruned")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("config/{p}-cfg pruned")),
        "{}",
        out.stdout
    );
    assert!(b.object(Kind::Service, &api).await.is_none());
    assert!(b.object(Kind::Config, &format!("{p}-cfg")).await.is_none());
    assert!(b.object(Kind::Service, &web).await.is_some());
    assert!(
        b.object(Kind::Service, &other).await.is_some(),
        "another team's object was pruned"
    );
    berth_e2e::wait_for(CONVERGE, "the pruned Swarm service to go", || async {
        swarm_replicas(&d, &api).await.is_none().then_some(())
    })
    .await;

    // A selector is required, and a bad one changes nothing.
    let out = b.cli(&["apply", "-f", path, "--prune"]);
    assert!(
        !out.success && out.stderr.contains("--selector"),
        "{}",
        out.stderr
    );
    std::fs::write(
        &file,
        owned(&web, &app).replace("replicas: 1", "replicas: 2"),
    )
    .unwrap();
    let out = b.cli(&["apply", "-f", path, "--prune", "-l", "app in (x"]);
    assert!(!out.success && out.stderr.contains("-l:"), "{}", out.stderr);
    assert_eq!(
        b.object(Kind::Service, &web).await.unwrap()["spec"]["replicas"],
        1
    );
}
