//! End-to-end tests of pre-deploy steps (`spec.deploy.preDeploy`): a migration step runs as a Swarm
//! job with the image being deployed, before the new tasks start and while the old ones still run;
//! a failing step keeps the old image and is reported with its log; a step past its timeout is
//! stopped and reported; a webhook deploy runs the steps with the new image. What ran where is read
//! from a volume the tasks and the steps write to, and from the engine, never through berth alone.
//!
//! The images are berth-demo/web:1 and :2 (scripts/lib/prereqs.sh), which differ in `/version`.

use berth_api_types::Kind;
use berth_e2e::{docker, prefix, Berth, Bus, Cleanup, Docker, Stack};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const REPO: &str = "berth-demo/web";

/// A Service whose tasks append to `/data/log` (the volume `<name>-data`) when they start (with the
/// marker the steps leave) and then every 0.3 s while they run, so the log shows the order of
/// old tasks, steps and new tasks. `steps` is the YAML list under `preDeploy`.
fn manifest(name: &str, tag: u32, steps: &str) -> String {
    manifest_keeping(name, tag, steps, 3)
}

/// [`manifest`], keeping the jobs of the last `history` rollouts.
fn manifest_keeping(name: &str, tag: u32, steps: &str, history: u32) -> String {
    let task = r#"v=$(cat /version); echo "task-start v$v $(cat /data/marker 2>/dev/null)" >> /data/log; trap 'exit 0' TERM; while true; do echo "alive v$v" >> /data/log; sleep 0.3; done"#;
    format!(
        r#"apiVersion: berth/v1
kind: Volume
metadata: {{name: {name}-data}}
spec: {{}}
---
apiVersion: berth/v1
kind: Service
metadata: {{name: {name}}}
spec:
  image: {REPO}:{tag}
  command: ["sh", "-c", {task:?}]
  init: true
  stopGracePeriod: 1s
  volumes: [{{volume: {name}-data, target: /data}}]
  # The volume is local: tasks and steps run where it is.
  placement: {{constraints: ["node.role == manager"]}}
  deploy:
    jobHistory: {history}
    preDeploy:
{steps}
"#
    )
}

/// The log the tasks and steps wrote, read from the volume with a plain container.
fn volume_log(volume: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["run", "--rm", "-v"])
        .arg(format!("{volume}:/data"))
        .args(["berth-test/busybox:1", "cat", "/data/log"])
        .output()
        .expect("docker run");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

async fn engine_image(d: &Docker, name: &str) -> String {
    berth_e2e::containers::container_spec(d, name)
        .await
        .image
        .unwrap_or_default()
}

fn rollout_status(b: &Berth, name: &str) -> berth_e2e::CliOutput {
    b.cli(&["rollout", "status", "service", name, "--timeout", "120s"])
}

/// The Swarm services that are this Service's pre-deploy jobs, with their tasks' states.
fn jobs(name: &str) -> Vec<(String, String)> {
    let out = Command::new("docker")
        .args(["service", "ls", "--format", "{{.Name}}"])
        .args(["--filter", "label=io.berth.role=pre-deploy"])
        .arg("--filter")
        .arg(format!("label=io.berth.name={name}"))
        .output()
        .expect("docker service ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|job| {
            let ps = Command::new("docker")
                .args(["service", "ps", "--format", "{{.CurrentState}}", job])
                .output()
                .expect("docker service ps");
            (
                job.to_string(),
                String::from_utf8_lossy(&ps.stdout).trim().to_string(),
            )
        })
        .collect()
}

fn last_revision(o: &Value) -> &Value {
    o["status"]["revisions"]
        .as_array()
        .and_then(|a| a.last())
        .expect("a revision")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_deploy_runs_the_migration_with_the_new_image_before_the_new_tasks() {
    let p = prefix("predeploy");
    let d = docker().await;
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let name = format!("{p}-app");
    let steps = r#"      - name: migrate
        command: ["sh", "-c", "echo migrating to v$(cat /version); echo \"step v$(cat /version)\" >> /data/log; echo migrated-v$(cat /version) > /data/marker; sleep 1"]
        timeout: 1m"#;
    // Jobs of the last 2 rollouts are kept.
    b.apply(&manifest_keeping(&name, 1, steps, 2));
    let out = rollout_status(b, &name);
    assert!(out.success, "first rollout: {out:?}\n{}", b.log_text());

    // What CI does after a push: one webhook call with the new tag.
    let created = b.cli_ok(&["webhook", "create", &name, "-o", "json"]);
    let hook: Value = serde_json::from_str(&created).expect("webhook json");
    let url = hook["url"].as_str().expect("url").to_string();
    let resp = berth_e2e::http()
        .post(format!("{url}?tag=2"))
        .send()
        .await
        .expect("webhook call");
    assert_eq!(resp.status().as_u16(), 202);
    let out = rollout_status(b, &name);
    assert!(out.success, "webhook rollout: {out:?}\n{}", b.log_text());
    assert!(
        out.stdout
            .contains(&format!("successfully rolled out: revision 2 ({REPO}:2)")),
        "{}",
        out.stdout
    );
    assert_eq!(engine_image(&d, &name).await, format!("{REPO}:2"));

    // The order, as the volume saw it: the step ran with the new image while the old task still
    // ran, and the new task started after it and saw what it wrote.
    let log = volume_log(&format!("{name}-data"));
    let at = |needle: &str| log.iter().position(|l| l.starts_with(needle));
    let step = at("step v2").unwrap_or_else(|| panic!("no `step v2` in {log:?}"));
    let new = at("task-start v2").unwrap_or_else(|| panic!("no new task in {log:?}"));
    assert!(step < new, "the step ran before the new task: {log:?}");
    assert_eq!(log[new], "task-start v2 migrated-v2", "{log:?}");
    assert!(
        log[step..new].iter().any(|l| l == "alive v1"),
        "the old task still ran while the step did: {log:?}"
    );
    assert_eq!(
        at("step v1").map(|i| i < at("task-start v1").unwrap()),
        Some(true)
    );

    let o = b.object(Kind::Service, &name).await.expect("service");
    let rev = last_revision(&o);
    assert_eq!(rev["trigger"], "webhook", "{rev}");
    assert_eq!(rev["result"], "complete", "{rev}");
    let pd = &o["status"]["preDeploy"];
    assert_eq!(pd["revision"], 2, "{pd}");
    assert_eq!(pd["steps"][0]["state"], "succeeded", "{pd}");
    assert_eq!(pd["steps"][0]["exitCode"], 0, "{pd}");

    // The step's own output stays readable, per revision.
    let logs = b.cli_ok(&["logs", "job", &name]);
    assert!(logs.contains("migrating to v2"), "{logs}");
    let logs = b.cli_ok(&["logs", "job", &name, "--revision", "1"]);
    assert!(logs.contains("migrating to v1"), "{logs}");
    // The same route and grant as a Service's logs: no token, no logs.
    let anonymous = berth_e2e::http()
        .get(format!(
            "{}/apis/berth/v1/services/{name}/logs?job=true",
            b.url()
        ))
        .send()
        .await
        .expect("logs request");
    assert_eq!(anonymous.status().as_u16(), 401);
    // A third rollout (a forced redeploy: same image) runs the step again and removes the jobs of
    // the first: two rollouts' are kept.
    b.cli_ok(&["rollout", "restart", "service", &name]);
    let out = rollout_status(b, &name);
    assert!(out.success, "restart: {out:?}");
    let kept: Vec<String> = jobs(&name).into_iter().map(|(job, _)| job).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept.iter().all(|j| !j.contains("_job-1-")), "{kept:?}");
    let gone = b.cli(&["logs", "job", &name, "--revision", "1"]);
    assert!(!gone.success, "{gone:?}");
    assert!(
        gone.stderr.contains("no pre-deploy jobs of revision 1"),
        "{gone:?}"
    );
    // Jobs carry the Service's ownership: deleting it removes them.
    b.cli_ok(&["delete", "service", &name]);
    berth_e2e::eventually(b, Duration::from_secs(30), "jobs removed", || async {
        let left = jobs(&name);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_keeps_the_old_image_and_is_reported_with_its_log() {
    let p = prefix("predeploy-fail");
    let d = docker().await;
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let name = format!("{p}-app");
    // Succeeds for v1, fails for v2.
    let steps = r#"      - name: migrate
        command: ["sh", "-c", "echo applying migration 7; if [ $(cat /version) = 2 ]; then echo 'table orders already exists' >&2; exit 3; fi"]"#;
    b.apply(&manifest(&name, 1, steps));
    assert!(rollout_status(b, &name).success);

    b.apply(&manifest(&name, 2, steps));
    let out = rollout_status(b, &name);
    assert!(
        !out.success,
        "a failed step must fail rollout status: {out:?}"
    );
    let o = b.object(Kind::Service, &name).await.expect("service");
    assert!(
        out.stderr.contains(&format!(
            "revision 2 ({REPO}:2) was not rolled out: pre-deploy step `migrate` failed with exit code 3: table orders already exists"
        )),
        "{}\n{}",
        out.stderr,
        o["status"]
    );
    assert!(
        out.stderr.contains(&format!("tasks run {REPO}:1")),
        "{}",
        out.stderr
    );
    assert_eq!(engine_image(&d, &name).await, format!("{REPO}:1"));

    let o = b.object(Kind::Service, &name).await.expect("service");
    let degraded = berth_e2e::condition(&o, "Degraded").expect("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "PreDeployFailed");
    assert_eq!(last_revision(&o)["result"], "failed-predeploy");
    let tail = o["status"]["preDeploy"]["steps"][0]["logTail"].to_string();
    assert!(tail.contains("applying migration 7"), "{tail}");
    assert!(tail.contains("table orders already exists"), "{tail}");
    let logs = b.cli_ok(&["logs", "job", &name]);
    assert!(logs.contains("table orders already exists"), "{logs}");

    // Final for this rollout: the step is not run again, and the old tasks keep running.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let of_revision_2: Vec<_> = jobs(&name)
        .into_iter()
        .filter(|(job, _)| job.contains("_job-2-"))
        .collect();
    assert_eq!(of_revision_2.len(), 1, "{of_revision_2:?}");
    assert_eq!(engine_image(&d, &name).await, format!("{REPO}:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_timeout_is_stopped_and_reported() {
    let p = prefix("predeploy-slow");
    let d = docker().await;
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let name = format!("{p}-app");
    let steps = r#"      - name: backfill
        command: ["sh", "-c", "echo backfilling; if [ $(cat /version) = 2 ]; then sleep 300; fi"]
        timeout: 3s"#;
    b.apply(&manifest(&name, 1, steps));
    assert!(rollout_status(b, &name).success);

    b.apply(&manifest(&name, 2, steps));
    let o = b
        .wait_condition(
            Kind::Service,
            &name,
            "Degraded",
            Duration::from_secs(60),
            |c| c["reason"] == "PreDeployTimedOut",
        )
        .await;
    let step = &o["status"]["preDeploy"]["steps"][0];
    assert_eq!(step["state"], "timed-out", "{step}");
    assert!(
        step["message"]
            .as_str()
            .unwrap_or("")
            .contains("timeout of 3s"),
        "{step}"
    );
    assert_eq!(last_revision(&o)["result"], "failed-predeploy");
    // Stopped: its job is removed, so nothing of it runs any more.
    berth_e2e::eventually(
        b,
        Duration::from_secs(30),
        "the timed-out job stopped",
        || async {
            let running: Vec<_> = jobs(&name)
                .into_iter()
                .filter(|(job, state)| job.contains("_job-2-") || state.starts_with("Running"))
                .collect();
            if running.is_empty() {
                Ok(())
            } else {
                Err(format!("{running:?}"))
            }
        },
    )
    .await;
    assert_eq!(engine_image(&d, &name).await, format!("{REPO}:1"));
    let out = rollout_status(b, &name);
    assert!(!out.success);
    assert!(
        out.stderr.contains("pre-deploy step `backfill` timed out"),
        "{}",
        out.stderr
    );
}
