//! `berth import compose` end to end: the shop fixture (fixtures/compose/shop: a web front end, a
//! database with a volume and a secret, a queue worker, two configs, two networks) is imported,
//! its secret created with the command the import prints, the manifests applied with `berth apply
//! -f DIR`, and every service waits until Ready on the real Swarm. What Compose meant then holds in
//! the engine: the entrypoint/command split, env from `environment` and `env_file`, replicas, the
//! config and secret files where Compose would put them.
//!
//! Names carry the test's `prefix(..)` (`--prefix`), and the `Cleanup` guard is declared before
//! berth, so berth stops before the leftovers are removed.

use berth_e2e::containers::{container_spec, exec, read_file, running_containers};
use berth_e2e::{docker, prefix, swarm_replicas, Berth, Cleanup};
use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_compose_file_applies_and_converges() {
    let p = prefix("compose");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let d = docker().await;
    let compose =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/compose/shop/docker-compose.yml");
    let compose = compose.to_str().expect("utf-8 path");
    let dir = berth_e2e::tempdir("compose");
    let out_dir = dir.path().join("manifests");
    let out_dir_s = out_dir.to_str().expect("utf-8 path");

    let import = b.cli(&[
        "import", "compose", compose, "--prefix", &p, "-o", out_dir_s,
    ]);
    assert!(import.success, "import failed: {import:?}");
    // What has no berth equivalent is reported, naming the service and the key; the secret's
    // value (and the credential-looking env value) never reaches the terminal.
    for says in [
        "services.web.ports[0]: not imported",
        "services.web.depends_on: not imported",
        "services.web.build: not imported",
        "services.db.cap_add: not imported",
        "SESSION_SECRET looks like a credential",
    ] {
        assert!(
            import.stderr.contains(says),
            "no `{says}` in:\n{}",
            import.stderr
        );
    }
    let printed = format!("{}{}", import.stdout, import.stderr);
    assert!(
        !printed.contains("fixture-db-password") && !printed.contains("fixture-session-value"),
        "a value reached the terminal:\n{printed}"
    );
    // One file per object, and the Ingress stub all comments.
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let (web, db, worker) = (format!("{p}-web"), format!("{p}-db"), format!("{p}-worker"));
    let want: Vec<String> = [
        format!("config-{p}-index-html.yaml"),
        format!("config-{p}-worker-conf.yaml"),
        format!("ingress-{web}.yaml"),
        format!("network-{p}-backend.yaml"),
        format!("network-{p}-frontend.yaml"),
        format!("service-{db}.yaml"),
        format!("service-{web}.yaml"),
        format!("service-{worker}.yaml"),
        format!("volume-{p}-db-data.yaml"),
    ]
    .into();
    assert_eq!(files, want);
    let stub = std::fs::read_to_string(out_dir.join(format!("ingress-{web}.yaml"))).unwrap();
    assert!(stub.lines().all(|l| l.starts_with('#')), "{stub}");
    // No file holds the secret's value.
    for f in &files {
        let text = std::fs::read_to_string(out_dir.join(f)).unwrap();
        assert!(
            !text.contains("fixture-db-password"),
            "{f} holds the secret"
        );
    }

    // The secret, created with the command the import printed.
    let command = import
        .stderr
        .lines()
        .find_map(|l| {
            l.split_once("create it from its file with: berth ")
                .map(|(_, c)| c)
        })
        .unwrap_or_else(|| panic!("no create command in:\n{}", import.stderr));
    let args: Vec<&str> = command.split_whitespace().collect();
    b.cli_ok(&args);

    // Applying the directory creates everything (the commented stub is nothing to apply).
    let applied = b.cli_ok(&["apply", "-f", out_dir_s]);
    for what in [
        format!("service/{web} created"),
        format!("service/{db} created"),
        format!("service/{worker} created"),
        format!("network/{p}-backend created"),
        format!("volume/{p}-db-data created"),
        format!("config/{p}-index-html created"),
    ] {
        assert!(applied.contains(&what), "no `{what}` in:\n{applied}");
    }
    assert!(!applied.contains("ingress/"), "{applied}");
    let waited = b.cli(&[
        "wait",
        "service",
        &web,
        &db,
        &worker,
        "--for",
        "condition=Ready",
        "--timeout",
        "150s",
    ]);
    assert!(
        waited.success,
        "the imported services did not converge: {waited:?}\n--- berth log ---\n{}",
        b.log_text()
    );

    // What Compose meant is what the engine runs.
    let spec = container_spec(&d, &web).await;
    assert_eq!(spec.command, Some(vec!["httpd".to_string()]));
    assert_eq!(
        spec.args,
        Some(
            ["-f", "-p", "8080", "-h", "/www"]
                .map(String::from)
                .to_vec()
        )
    );
    let env = spec.env.unwrap_or_default();
    for e in [
        "GREETING=hello from compose",
        "LOG_LEVEL=info",
        "DATABASE_HOST=db",
    ] {
        assert!(env.contains(&e.to_string()), "{e} not in {env:?}");
    }
    assert_eq!(swarm_replicas(&d, &web).await, Some(2));
    let worker_spec = container_spec(&d, &worker).await;
    assert_eq!(worker_spec.command, None, "the image's entrypoint stays");
    assert_eq!(worker_spec.args.as_ref().map(|a| a[0].as_str()), Some("sh"));
    // The config where Compose's target put it, served by the web front end; the secret where
    // the database stand-in reads it (it would not be Ready without it).
    let container = running_containers(&d, &web)
        .await
        .pop()
        .expect("a web container");
    let (code, page) = exec(&d, &container, &["cat", "/www/index.html"])
        .await
        .unwrap();
    assert_eq!((code, page.as_str()), (0, "<h1>shop</h1>\n"));
    let (_, secret) = read_file(&d, &db, "/run/secrets/db_password")
        .await
        .unwrap();
    assert_eq!(secret, "fixture-db-password\n");
    let (_, conf) = read_file(&d, &worker, "/etc/worker.conf").await.unwrap();
    assert_eq!(conf, "queue=jobs\n");

    // Importing again into the same directory overwrites nothing.
    let again = b.cli(&[
        "import", "compose", compose, "--prefix", &p, "-o", out_dir_s,
    ]);
    assert!(
        !again.success && again.stderr.contains("already exist"),
        "{again:?}"
    );
}

/// A Compose file with a type error: a non-zero exit naming the file, line and key, and no
/// manifest written.
#[test]
fn a_wrong_type_names_file_line_and_key_and_writes_nothing() {
    let dir = berth_e2e::tempdir("compose-bad");
    let file = dir.path().join("docker-compose.yml");
    std::fs::write(
        &file,
        "services:\n  web:\n    image: berth-test/busybox:1\n    deploy:\n      replicas: two\n",
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let out = std::process::Command::new(berth_e2e::berth_bin())
        .args([
            "import",
            "compose",
            file.to_str().unwrap(),
            "-o",
            out_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:5:7: services.web.deploy.replicas: must be a whole number",
            file.display()
        )),
        "{stderr}"
    );
    assert!(!out_dir.exists(), "a manifest was written");
}
