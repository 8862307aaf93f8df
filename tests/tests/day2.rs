//! End-to-end tests of the day-2 commands against the real Swarm engine: `berth logs` (lines of
//! every replica with their task prefix; `-f` streams lines printed after it started), `berth ps`
//! (a task that cannot start shows the engine's error) and `berth exec` (output and exit code, an
//! interactive shell through a pty, and who may exec at all). The CLI is the binary under test; it
//! reaches the engine only through berth's API.

use berth_api_types::names::paths;
use berth_api_types::Kind;
use berth_e2e::{berth_bin, prefix, Berth, Bus, Cleanup, Stack};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "berth-test/busybox:1";
/// Starting tasks on a loaded 2-core machine.
const RUNNING: Duration = Duration::from_secs(60);

/// A Service whose replicas greet once, then print a numbered tick every second.
fn ticking(name: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: berth/v1
kind: Service
metadata:
  name: {name}
spec:
  image: {IMAGE}
  command: ["sh", "-c", "echo hello-from-$(hostname); i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done"]
  init: true
  stopGracePeriod: 1s
  replicas: {replicas}
"#
    )
}

/// `berth ps NAME -o json`'s tasks.
fn ps(b: &Berth, name: &str) -> Vec<Value> {
    let out = b.cli_ok(&["ps", name, "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("ps -o json: {e}: {out}"));
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Waits until `berth ps` shows `n` running tasks; returns them.
fn wait_running(b: &Berth, name: &str, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let tasks = ps(b, name);
        let running: Vec<Value> = tasks
            .iter()
            .filter(|t| t["state"] == "running" && t["desiredState"] == "running")
            .cloned()
            .collect();
        if running.len() == n {
            return running;
        }
        assert!(
            start.elapsed() < RUNNING,
            "e2e: {name}: {n} running tasks expected, ps shows {tasks:?}\n--- log ---\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test]
async fn logs_show_every_replica_with_its_task_and_follow_streams_new_lines() {
    let p = prefix("day2logs");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    b.apply(&ticking(&p, 2));
    let tasks = wait_running(b, &p, 2);
    // Both replicas have greeted once they have ticked.
    let start = Instant::now();
    let out = loop {
        let out = b.cli_ok(&["logs", &p]);
        if out.matches("hello-from-").count() >= 2 {
            break out;
        }
        assert!(start.elapsed() < RUNNING, "two greetings expected:\n{out}");
        std::thread::sleep(Duration::from_millis(500));
    };
    for t in &tasks {
        // `<name>.<slot>.<task id, 12>@<node> | line`, as docker service logs prints it.
        let id = t["id"].as_str().unwrap();
        let want = format!(
            "{}.{}@{} | hello-from-",
            t["name"].as_str().unwrap(),
            &id[..12],
            t["node"].as_str().unwrap()
        );
        assert!(out.contains(&want), "missing `{want}` in:\n{out}");
    }
    assert!(
        out.lines()
            .all(|l| l.starts_with(&format!("{p}.")) && l.contains(" | ")),
        "every line carries its task prefix:\n{out}"
    );
    // --tail 1 --task 1: one line, of slot 1 only.
    let one = b.cli_ok(&["logs", &p, "--tail", "1", "--task", "1"]);
    assert_eq!(one.lines().count(), 1, "{one}");
    assert!(one.starts_with(&format!("{p}.1.")), "{one}");
    // --since with the manifests' duration syntax; a bad one is refused naming the flag.
    assert!(b
        .cli_ok(&["logs", &p, "--since", "1h"])
        .contains("hello-from-"));
    let bad = b.cli(&["logs", &p, "--since", "yesterday"]);
    assert!(
        !bad.success && bad.stderr.contains("--since"),
        "{}",
        bad.show()
    );
    // An unknown Service is a clear 404.
    let missing = b.cli(&["logs", &format!("{p}-nosuch")]);
    assert!(
        !missing.success && missing.stderr.contains("no Service"),
        "{}",
        missing.show()
    );

    // -f --tail 0: nothing old, so every line it shows was printed after it started.
    let mut follow = Command::new(berth_bin())
        .args(["logs", &p, "-f", "--tail", "0"])
        .env("BERTH_URL", b.client_urls())
        .env("BERTH_TOKEN", &b.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("berth logs -f");
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = follow.kill();
    let _ = follow.wait();
    let line = line.expect("berth logs -f showed no new line within 20 s");
    assert!(
        line.starts_with(&format!("{p}.")) && line.contains(" | tick-"),
        "{line}"
    );
    // Reading logs is recorded (they may hold user data).
    let audit = b.cli_ok(&["audit", "-o", "json"]);
    assert!(audit.contains("read-logs"), "{audit}");
}

#[tokio::test]
async fn ps_shows_why_a_task_cannot_start() {
    let p = prefix("day2ps");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let missing_image = format!("berth-test/nosuch-{p}:1");
    b.apply(&format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}\nspec:\n  image: {missing_image}\n  replicas: 1\n"
    ));
    let start = Instant::now();
    let task = loop {
        if let Some(t) = ps(b, &p)
            .into_iter()
            .find(|t| t["error"].as_str().is_some_and(|e| !e.is_empty()))
        {
            break t;
        }
        assert!(
            start.elapsed() < RUNNING,
            "no task with an error: {:?}",
            ps(b, &p)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let error = task["error"].as_str().unwrap();
    assert!(
        error.contains("No such image") && error.contains(&missing_image),
        "{task}"
    );
    assert!(
        matches!(task["state"].as_str(), Some("rejected" | "failed")),
        "{task}"
    );
    // The table shows it too, with the slot, node and how long ago.
    let table = b.cli_ok(&["ps", &p]);
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "TASK", "NODE", "DESIRED", "STATE", "SINCE", "DIGEST", "ERROR",
    ] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table.contains(&format!("{p}.1"))
            && table.contains("No such image")
            && table.contains(" ago"),
        "{table}"
    );
    // exec has nothing to run in.
    let out = b.cli(&["exec", &p, "--", "true"]);
    assert!(
        !out.success && out.stderr.contains("no task of it is running"),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn exec_runs_a_command_with_its_exit_code_and_a_shell_through_a_pty() {
    let p = prefix("day2exec");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    b.apply(&ticking(&p, 1));
    let tasks = wait_running(b, &p, 1);

    // Output and exit code are the command's.
    let out = b.cli(&[
        "exec",
        &p,
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(out.code, Some(3), "{}", out.show());
    assert_eq!(out.stdout, "hi\n", "{}", out.show());
    assert_eq!(out.stderr, "oops\n", "{}", out.show());
    let ok = b.cli(&["exec", &p, "--task", "1", "--", "cat", "/proc/1/cmdline"]);
    assert_eq!(ok.code, Some(0), "{}", ok.show());
    // Standard input with -i.
    let piped = b.cli_in(
        &["exec", &p, "-i", "--", "sh", "-c", "tr a-z A-Z"],
        Some("shout\n"),
    );
    assert_eq!(
        (piped.code, piped.stdout.as_str()),
        (Some(0), "SHOUT\n"),
        "{}",
        piped.show()
    );
    // By task id too; a task that does not exist is named.
    let id = tasks[0]["id"].as_str().unwrap();
    let by_id = b.cli(&["exec", &p, "--task", &id[..8], "--", "true"]);
    assert_eq!(by_id.code, Some(0), "{}", by_id.show());
    let none = b.cli(&["exec", &p, "--task", "9", "--", "true"]);
    assert!(
        !none.success && none.stderr.contains("no running task in slot 9"),
        "{}",
        none.show()
    );
    // -t without a terminal is refused before anything runs.
    let no_tty = b.cli(&["exec", &p, "-t", "--", "sh"]);
    assert!(
        !no_tty.success && no_tty.stderr.contains("not a TTY"),
        "{}",
        no_tty.show()
    );

    // An interactive shell: the CLI runs under `script`, which gives it a pty for stdin/stdout.
    let (code, text) = b.interactive_shell(
        &p,
        &[
            ("echo $((6*7))\n", Duration::from_millis(1500)),
            ("exit 5\n", Duration::from_millis(1500)),
        ],
        Duration::from_secs(30),
    );
    assert!(
        text.lines().any(|l| l.trim() == "42"),
        "the shell's answer on a line of its own: {text:?}"
    );
    // The input line came back through the remote terminal's echo (a real pty over there).
    assert!(text.contains("echo $((6*7))"), "{text:?}");
    assert_eq!(code, Some(5), "{text:?}");

    // The audit names the token, the task and the program, never the arguments.
    let audit = b.cli_ok(&["audit", "-o", "json"]);
    let records: Value = serde_json::from_str(&audit).expect("audit json");
    let execs: Vec<&Value> = records["items"]
        .as_array()
        .or(records.as_array())
        .expect("audit records")
        .iter()
        .filter(|r| r["action"] == "exec" && r["code"] == 101 && r["outcome"] == "ok")
        .collect();
    assert!(execs.len() >= 5, "{audit}");
    assert!(
        execs.iter().all(|r| r["tokenId"] == "admin"
            && r["name"] == p.as_str()
            && r["task"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("{p}.1.")))),
        "{audit}"
    );
    assert!(execs.iter().any(|r| r["program"] == "sh"), "{audit}");
    assert!(
        !audit.contains("echo hi") && !audit.contains("oops"),
        "{audit}"
    );
}

#[tokio::test]
async fn exec_is_refused_without_the_grant_and_allowed_with_it() {
    let p = prefix("day2grant");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    b.apply(&ticking(&p, 1));
    wait_running(b, &p, 1);
    let token = |args: &[&str]| {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        b.cli_ok(&all).trim().to_string()
    };
    let viewer = token(&["--role", "viewer"]);
    let operator = token(&["--role", "operator"]);
    let granted = token(&["--role", "operator", "--exec", "--description", "support"]);
    let refused_grant = b.cli(&["token", "create", "--role", "viewer", "--exec"]);
    assert!(
        !refused_grant.success
            && refused_grant
                .stderr
                .contains("--exec is for operator and deployer"),
        "{}",
        refused_grant.show()
    );
    // `token list` shows who holds the grant.
    let list = b.cli_ok(&["token", "list", "-o", "json"]);
    let list: Value = serde_json::from_str(&list).unwrap();
    let with_exec: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["exec"] == true)
        .map(|t| t["description"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(with_exec, vec!["support"], "{list}");
    assert!(b.cli_ok(&["token", "list"]).contains("EXEC"));

    let exec = ["exec", &p, "--", "sh", "-c", "echo through; exit 4"];
    for (who, t) in [("viewer", &viewer), ("operator without --exec", &operator)] {
        let out = b.cli_as(t, &exec, None);
        assert!(
            !out.success && out.stderr.contains("may not POST") && out.stderr.contains("--exec"),
            "{who}: {}",
            out.show()
        );
        assert!(
            !out.stdout.contains("through"),
            "{who} ran it: {}",
            out.show()
        );
        // The same refusal over plain HTTP is a 403.
        let resp = b
            .client()
            .post(format!("{}{}", b.url(), paths::exec(Kind::Service, &p)))
            .bearer_auth(t)
            .json(&serde_json::json!({"command": ["true"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{who}");
    }
    let out = b.cli_as(&granted, &exec, None);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(4), "through\n"),
        "{}",
        out.show()
    );
    // Both reads stay open to the viewer.
    assert!(b.cli_as(&viewer, &["ps", &p], None).success);
    assert!(
        b.cli_as(&viewer, &["logs", &p, "--tail", "1"], None)
            .success
    );
}
