//! End-to-end tests of the day-2 client commands against a real `berth up` (embedded bus) and
//! the real Swarm: label selectors on `get` and `delete`, the output formats, `get -w`, several
//! names and KIND/NAME, `events KIND NAME`, the completion scripts and their name completer,
//! client contexts with token files, and `create secret` whose value reaches a running task but
//! never the CLI's output.
//!
//! Each test names its objects after its own `prefix(..)` and declares its `Cleanup` guard before
//! berth, so berth stops before the leftovers are removed.

use berth_api_types::Kind;
use berth_e2e::{
    berth_bin, docker, eventually, manifest, prefix, Berth, Cleanup, CliOutput, Docker,
};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const IMAGE: &str = "berth-test/busybox:1";
const CONVERGE: Duration = Duration::from_secs(45);

fn config_yaml(name: &str, labels: &[(&str, &str)]) -> String {
    let labels = if labels.is_empty() {
        String::new()
    } else {
        let lines: String = labels
            .iter()
            .map(|(k, v)| format!("    {k}: {v}\n"))
            .collect();
        format!("  labels:\n{lines}")
    };
    format!(
        "apiVersion: berth/v1\nkind: Config\nmetadata:\n  name: {name}\n{labels}spec:\n  stringData:\n    k: v\n"
    )
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

fn failed(out: &CliOutput, what: &str) {
    assert!(
        !out.success,
        "{what}: expected a failure, got stdout {:?}",
        out.stdout
    );
}

/// `get -l` and `delete -l` act on exactly the matching objects; several names, KIND/NAME and
/// the `name`, `wide` and `jsonpath` outputs; a bad selector is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_names_and_output_formats() {
    let p = prefix("cli-sel");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let (web, db, bare) = (format!("{p}-web"), format!("{p}-db"), format!("{p}-bare"));
    b.apply(
        &[
            config_yaml(&web, &[("app", "shop"), ("tier", "web")]),
            config_yaml(&db, &[("app", "shop"), ("tier", "db")]),
            config_yaml(&bare, &[]),
        ]
        .join("---\n"),
    );
    let name = |n: &str| format!("config/{n}");
    for (selector, expect) in [
        ("app=shop", vec![&db, &web]),
        ("tier!=db", vec![&bare, &web]),
        ("tier in (db,cache)", vec![&db]),
        ("tier notin (db),app", vec![&web]),
        ("!app", vec![&bare]),
    ] {
        let out = b.cli_ok(&["get", "configs", "-l", selector, "-o", "name"]);
        let expect: Vec<String> = expect.iter().map(|n| name(n)).collect();
        assert_eq!(lines(&out), expect, "get -l {selector}");
    }
    let out = b.cli(&["get", "configs", "-l", "tier in db"]);
    failed(&out, "a bad selector");
    assert!(
        out.stderr.contains("tier in db") && out.stderr.contains("parenthesised list"),
        "{}",
        out.stderr
    );
    let out = b.cli(&["get", "configs", "-l", "app=nothing"]);
    assert!(out.success && out.stdout.is_empty(), "{out:?}");
    assert!(out
        .stderr
        .contains("No configs found matching `app=nothing`"));

    // Several names, KIND/NAME, jsonpath on one object and on a list.
    let out = b.cli_ok(&["get", "config", &web, &db, "-o", "name"]);
    assert_eq!(lines(&out), [name(&web), name(&db)]);
    let out = b.cli_ok(&["get", &name(&db), &name(&web), "-o", "name"]);
    assert_eq!(lines(&out), [name(&db), name(&web)]);
    let out = b.cli_ok(&[
        "get",
        "config",
        &web,
        "-o",
        "jsonpath={.metadata.labels.tier}",
    ]);
    assert_eq!(out.trim(), "web");
    let out = b.cli_ok(&[
        "get",
        "configs",
        "-l",
        "app",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    assert_eq!(out.trim(), format!("{db} {web}"));
    let out = b.cli(&["get", "config", &web, &format!("{p}-missing")]);
    failed(&out, "a missing name");
    assert!(out.stdout.contains(&web), "the found one is still shown");
    assert!(
        out.stderr.contains(&format!("{p}-missing")),
        "{}",
        out.stderr
    );

    // -o wide shows more than the table: labels, and a Service's networks.
    let svc = format!("{p}-svc");
    b.apply(&format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {svc}\n  labels:\n    app: shop\nspec:\n  image: {IMAGE}\n  replicas: 0\n"
    ));
    let table = b.cli_ok(&["get", "service", &svc]);
    let wide = b.cli_ok(&["get", "service", &svc, "-o", "wide"]);
    assert!(
        !table.contains("NETWORKS") && !table.contains("app=shop"),
        "{table}"
    );
    for col in ["NETWORKS", "LABELS", "app=shop", "(default)"] {
        assert!(wide.contains(col), "-o wide lacks {col}: {wide}");
    }

    // delete -l removes exactly the matching objects, and says when none match.
    let out = b.cli_ok(&["delete", "configs", "-l", "tier=db"]);
    assert_eq!(lines(&out), [format!("config/{db} deleted")]);
    let out = b.cli_ok(&["get", "configs", "-o", "name"]);
    assert_eq!(lines(&out), [name(&bare), name(&web)]);
    let out = b.cli_ok(&["delete", "configs", "-l", "tier=db"]);
    assert!(out.contains("nothing deleted"), "{out}");
    let out = b.cli(&["delete", "configs", "-l", "tier in"]);
    failed(&out, "delete with a bad selector");
    assert_eq!(lines(&b.cli_ok(&["get", "configs", "-o", "name"])).len(), 2);
    // Several names, and KIND/NAME.
    let out = b.cli_ok(&["delete", "config", &web, &bare]);
    assert_eq!(
        lines(&out),
        [
            format!("config/{web} deleted"),
            format!("config/{bare} deleted")
        ]
    );
    let out = b.cli_ok(&["delete", &format!("service/{svc}")]);
    assert_eq!(lines(&out), [format!("service/{svc} deleted")]);
    assert!(b.object(Kind::Service, &svc).await.is_none());
}

/// `get -w` prints the list, then a row for an object created after it started; `events KIND
/// NAME` shows that object's events only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_events_of_one_object() {
    let p = prefix("cli-watch");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let (first, later) = (format!("{p}-first"), format!("{p}-later"));
    b.apply(&config_yaml(&first, &[]));

    let mut child = Command::new(berth_bin())
        .args(["get", "configs", "-w"])
        .env("BERTH_URL", b.url())
        .env("BERTH_TOKEN", &b.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("berth get -w");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_line = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => continue,
                Err(e) => panic!("get -w never printed {what}: {e}"),
            }
        }
    };
    wait_line("the header", &|l| l.starts_with("NAME"));
    wait_line("the first object", &|l| l.starts_with(&first));
    b.apply(&config_yaml(&later, &[]));
    let row = wait_line("a row for the later object", &|l| l.contains(&later));
    assert!(row.starts_with(&later), "{row}");
    b.cli_ok(&["delete", "config", &later]);
    let row = wait_line("the deletion", &|l| l.contains("(deleted)"));
    assert!(row.starts_with(&later), "{row}");
    let _ = child.kill();
    let _ = child.wait();

    let out = b.cli_ok(&["events", "config", &first]);
    assert!(out.contains(&format!("config/{first}")), "{out}");
    assert!(!out.contains(&later), "events of another object: {out}");
    let out = b.cli_ok(&["events", &format!("config/{later}")]);
    assert!(
        out.contains("Deleted") && !out.contains(&format!("config/{first}")),
        "{out}"
    );
}

/// Each shell's script knows the subcommands; `__complete` (what the scripts call) returns an
/// object's name from the API; and bash, running the script, completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_scripts_complete_object_names() {
    let p = prefix("cli-compl");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let cfg = format!("{p}-cfg");
    b.apply(&config_yaml(&cfg, &[]));
    for shell in ["bash", "zsh", "fish"] {
        let script = b.cli_ok(&["completion", shell]);
        for word in ["apply", "describe", "events", "__complete"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
    let out = b.cli_ok(&["__complete", "--", "get", "configs", ""]);
    assert_eq!(lines(&out), [cfg.as_str()]);
    let out = b.cli_ok(&["__complete", "--", "get", "config/"]);
    assert_eq!(lines(&out), [format!("config/{cfg}")]);
    let out = b.cli_ok(&["__complete", "--", "get", ""]);
    assert!(lines(&out).contains(&"services"), "{out}");

    // bash itself, with the script loaded, completing `berth describe config <TAB>`.
    let dir = berth_e2e::tempdir("cli-compl");
    let script = dir.path().join("berth.bash");
    std::fs::write(&script, b.cli_ok(&["completion", "bash"])).unwrap();
    let bin_dir = berth_bin().parent().unwrap().to_path_buf();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(berth describe config ''); COMP_CWORD=3; _berth_objects; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .env("BERTH_URL", b.url())
        .env("BERTH_TOKEN", &b.token)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        lines(&stdout),
        [cfg.as_str()],
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client run with only the configuration file: no BERTH_URL/BERTH_TOKEN in its environment.
fn client(config: &Path, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut cmd = Command::new(berth_bin());
    cmd.args(args)
        .env_remove("BERTH_URL")
        .env_remove("BERTH_TOKEN")
        .env_remove("BERTH_TOKEN_FILE")
        .env_remove("BERTH_CONTEXT")
        .env_remove("BERTH_CA")
        .env("BERTH_CONFIG", config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("berth");
    CliOutput {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn private_file(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Two contexts on one server with different token files: `use-context` switches the token in
/// use (`whoami` tells), `--context` overrides it, `--token-file` overrides both, and a token
/// file others can read draws a warning. No token is ever printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_switch_which_token_is_used() {
    let p = prefix("cli-ctx");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let viewer = b
        .cli_ok(&["token", "create", "--role", "viewer"])
        .trim()
        .to_string();
    let dir = berth_e2e::tempdir("cli-ctx");
    let config = dir.path().join("config.yaml");
    let (admin_file, viewer_file) = (
        dir.path().join("admin.token"),
        dir.path().join("viewer.token"),
    );
    private_file(&admin_file, &format!("{}\n", b.token), 0o600);
    private_file(&viewer_file, &viewer, 0o600);
    let url = b.url();
    let ok = |args: &[&str]| {
        let out = client(&config, args, &[]);
        assert!(out.success, "berth {args:?}: {}", out.stderr);
        for t in [&b.token, &viewer] {
            assert!(
                !out.stdout.contains(t.as_str()) && !out.stderr.contains(t.as_str()),
                "a token was printed by {args:?}"
            );
        }
        out
    };
    let role = |extra: &[&str]| -> String {
        let mut args = vec!["whoami", "-o", "json"];
        args.extend_from_slice(extra);
        let out = ok(&args);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("whoami json");
        v["role"].as_str().unwrap_or_default().to_string()
    };
    ok(&[
        "config",
        "set-context",
        "ops",
        "--url",
        &url,
        "--token-file",
        admin_file.to_str().unwrap(),
    ]);
    ok(&[
        "config",
        "set-context",
        "audit",
        "--url",
        &url,
        "--token-file",
        viewer_file.to_str().unwrap(),
    ]);
    let out = client(&config, &["whoami"], &[]);
    failed(&out, "no current context and no token");
    assert!(out.stderr.contains("no token"), "{}", out.stderr);

    ok(&["config", "use-context", "ops"]);
    assert_eq!(ok(&["config", "current-context"]).stdout.trim(), "ops");
    assert_eq!(role(&[]), "admin");
    ok(&["config", "use-context", "audit"]);
    assert_eq!(role(&[]), "viewer");
    assert_eq!(role(&["--context", "ops"]), "admin");
    assert_eq!(
        role(&["--token-file", admin_file.to_str().unwrap()]),
        "admin"
    );
    let listed = ok(&["config", "get-contexts"]).stdout;
    let current: Vec<&str> = listed.lines().filter(|l| l.starts_with('*')).collect();
    assert!(
        current.len() == 1 && current[0].contains("audit"),
        "{listed}"
    );
    assert!(
        listed.contains("ops") && listed.contains(admin_file.to_str().unwrap()),
        "{listed}"
    );
    // The environment beats the context.
    let out = client(
        &config,
        &["whoami", "-o", "json"],
        &[("BERTH_TOKEN_FILE", admin_file.to_str().unwrap())],
    );
    assert!(out.stdout.contains("\"admin\""), "{out:?}");

    let out = client(&config, &["config", "use-context", "nope"], &[]);
    failed(&out, "an unknown context");
    assert!(out.stderr.contains("no context `nope`"), "{}", out.stderr);
    let out = client(&config, &["whoami", "--context", "nope"], &[]);
    failed(&out, "an unknown --context");

    // A token file others can read still works, with a warning that does not show the token.
    let loose = dir.path().join("loose.token");
    private_file(&loose, &b.token, 0o644);
    let out = ok(&["whoami", "--token-file", loose.to_str().unwrap()]);
    assert!(
        out.stderr.contains("can be read by others") && out.stderr.contains("chmod 600"),
        "{}",
        out.stderr
    );
    let out = client(
        &config,
        &[
            "whoami",
            "--token-file",
            dir.path().join("absent").to_str().unwrap(),
        ],
        &[],
    );
    failed(&out, "a missing token file");
    assert!(
        out.stderr.contains("cannot read the token file"),
        "{}",
        out.stderr
    );
}

/// `cat path` in the service's one running container.
async fn read_in_task(d: &Docker, service: &str, path: &str) -> Result<String, String> {
    berth_e2e::containers::read_file(d, service, path)
        .await
        .map(|(_, text)| text)
}

/// `create secret --from-file`: the value reaches the running task and never appears in what
/// the CLI prints; a missing file or a duplicate key creates nothing; a Config's dry run shows
/// its values, a Secret's does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_secret_from_a_file_reaches_the_task_and_never_the_output() {
    let p = prefix("cli-create");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let d = docker().await;
    let value = format!("pw-{}", ulid::Ulid::new());
    let dir = berth_e2e::tempdir("cli-create");
    let file = dir.path().join("db-password");
    std::fs::write(&file, &value).unwrap();
    let from_file = format!("password={}", file.display());
    let (secret, svc) = (format!("{p}-db"), format!("{p}-app"));
    let mut outputs = Vec::new();

    let dry = b.cli(&[
        "create",
        "secret",
        &secret,
        "--from-file",
        &from_file,
        "--dry-run",
        "-o",
        "yaml",
    ]);
    assert!(
        dry.success && dry.stdout.contains("password") && dry.stderr.contains("not shown"),
        "{dry:?}"
    );
    outputs.push(dry);
    assert!(
        b.object(Kind::Secret, &secret).await.is_none(),
        "a dry run created it"
    );
    for (args, says) in [
        (
            vec!["--from-file", &from_file, "--from-literal", "password=x"],
            "given twice",
        ),
        (
            vec!["--from-file", "/nonexistent/berth-e2e"],
            "cannot read it",
        ),
    ] {
        let mut all = vec!["create", "secret", secret.as_str()];
        all.extend(args);
        let out = b.cli(&all);
        failed(&out, says);
        assert!(out.stderr.contains(says), "{}", out.stderr);
        outputs.push(out);
        assert!(
            b.object(Kind::Secret, &secret).await.is_none(),
            "a refused create created it"
        );
    }
    let out = b.cli(&["create", "secret", &secret, "--from-file", &from_file]);
    assert!(
        out.success && out.stdout.trim() == format!("secret/{secret} created"),
        "{out:?}"
    );
    outputs.push(out);
    outputs.push(b.cli(&["get", "secret", &secret, "-o", "yaml"]));
    outputs.push(b.cli(&["describe", "secret", &secret]));
    for out in &outputs {
        assert!(
            !out.stdout.contains(&value) && !out.stderr.contains(&value),
            "the secret's value was printed: {out:?}"
        );
    }

    b.apply(&format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {svc}\nspec:\n  image: {IMAGE}\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n  secrets:\n    - name: {secret}\n      key: password\n      target: db_pw\n"
    ));
    let want = value.clone();
    let d = &d;
    let svc_name = svc.clone();
    eventually(&b, CONVERGE, "the secret in the running task", || {
        let (want, svc_name) = (want.clone(), svc_name.clone());
        async move {
            let text = read_in_task(d, &svc_name, "/run/secrets/db_pw").await?;
            if text == want {
                Ok(())
            } else {
                Err(format!("reads {} bytes", text.len()))
            }
        }
    })
    .await;

    // A Config's dry run shows its values (they are not secret).
    let cfg = format!("{p}-cfg");
    let (_d2, conf) = manifest("app.ini", "port=8080\n");
    let out = b.cli_ok(&[
        "create",
        "config",
        &cfg,
        "--from-literal",
        "mode=fast",
        "--from-file",
        conf.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(
        out.contains("mode: fast") && out.contains("port=8080"),
        "{out}"
    );
    assert!(b.object(Kind::Config, &cfg).await.is_none());
    b.cli_ok(&["create", "config", &cfg, "--from-literal", "mode=fast"]);
    let got = b.cli_ok(&[
        "get",
        "config",
        &cfg,
        "-o",
        "jsonpath={.spec.stringData.mode}",
    ]);
    assert_eq!(got.trim(), "fast");
    b.cli_ok(&["delete", "service", &svc]);
}
