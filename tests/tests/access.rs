//! Access control end to end: tokens with roles made and revoked through the CLI, each role doing
//! what it may and refused (403, naming the role needed) what it may not, the admin token
//! rotated, and a split controller refusing to run with the admin token.

use berth_e2e::{berth_bin, manifest, prefix, tempdir, Berth, Cleanup, Nats};
use std::process::Command;

fn service_yaml(name: &str, image: &str, replicas: u32) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: {replicas}\n"
    )
}

fn token(berth: &Berth, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let out = berth.cli(&all);
    assert!(out.success, "token create {args:?}: {}", out.stderr);
    let t = out.stdout.trim().to_string();
    assert!(t.starts_with("berth_"), "{t}");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_tokens_and_rotation() {
    let p = prefix("access");
    let _cleanup = Cleanup::new(&p);
    let mut berth = Berth::start(None);
    let web = format!("{p}-web");
    let other = format!("{p}-other");
    let (_d1, both) = manifest(
        "both.yaml",
        &format!(
            "{}---\n{}",
            service_yaml(&web, "berth-test/busybox:1", 1),
            service_yaml(&other, "berth-test/busybox:1", 1)
        ),
    );
    berth.cli_ok(&["apply", "-f", both.to_str().unwrap()]);

    let viewer = token(&berth, &["--role", "viewer", "--description", "dashboards"]);
    let operator = token(&berth, &["--role", "operator"]);
    let deployer = token(
        &berth,
        &["--role", "deployer", "--services", &web, "--expires", "90d"],
    );

    // The viewer reads, redacted, and is refused every write with the role it would need.
    let out = berth.cli_as(&viewer, &["get", "services", &web, "-o", "json"], None);
    assert!(out.success, "{}", out.stderr);
    let out = berth.cli_as(&viewer, &["delete", "service", &other], None);
    assert!(!out.success);
    assert!(
        out.stderr.contains("role `viewer` may not DELETE")
            && out.stderr.contains("it needs role admin or operator"),
        "{}",
        out.stderr
    );

    // The deployer changes the image of its Service, and nothing else.
    let (_d2, new_image) = manifest("web.yaml", &service_yaml(&web, "berth-test/app:2", 1));
    let out = berth.cli_as(
        &deployer,
        &["apply", "-f", new_image.to_str().unwrap()],
        None,
    );
    assert!(out.success, "{}", out.stderr);
    let (_d3, scaled) = manifest("web3.yaml", &service_yaml(&web, "berth-test/app:2", 3));
    let out = berth.cli_as(&deployer, &["apply", "-f", scaled.to_str().unwrap()], None);
    assert!(
        !out.success && out.stderr.contains("touches more than spec.image"),
        "{}",
        out.stderr
    );
    let (_d4, theirs) = manifest("other.yaml", &service_yaml(&other, "berth-test/app:2", 1));
    let out = berth.cli_as(&deployer, &["apply", "-f", theirs.to_str().unwrap()], None);
    assert!(!out.success, "{}", out.stdout);
    let got = berth.cli_ok(&["get", "services", &other, "-o", "json"]);
    assert!(
        got.contains("berth-test/busybox:1"),
        "a refused deploy changed nothing: {got}"
    );
    let me = berth.cli_as(&deployer, &["whoami", "-o", "json"], None);
    assert!(
        me.stdout.contains("\"deployer\"") && me.stdout.contains(&web),
        "{}",
        me.stdout
    );

    // The operator writes but never reads a secret value; tokens are the admin's.
    let out = berth.cli_as(&operator, &["delete", "service", &other], None);
    assert!(out.success, "{}", out.stderr);
    let out = berth.cli_as(&operator, &["token", "list"], None);
    assert!(
        !out.success && out.stderr.contains("it needs role admin"),
        "{}",
        out.stderr
    );

    // The list shows roles and never a secret; a revoked token stops at once.
    let list = berth.cli_ok(&["token", "list", "-o", "json"]);
    for t in [&viewer, &operator, &deployer] {
        assert!(
            !list.contains(&t[t.len() - 64..]),
            "token list shows a secret: {list}"
        );
    }
    let viewer_id = viewer.split('_').nth(1).unwrap().to_string();
    berth.cli_ok(&["token", "revoke", &viewer_id]);
    let out = berth.cli_as(&viewer, &["get", "services"], None);
    assert!(
        !out.success && out.stderr.contains("was revoked"),
        "{}",
        out.stderr
    );

    // Rotating the admin token: the old one stops, the file holds the new one.
    let old = berth.token.clone();
    let new = berth.cli_ok(&["token", "rotate-admin"]).trim().to_string();
    assert_ne!(new, old);
    let out = berth.cli_as(&old, &["get", "services"], None);
    assert!(!out.success, "the old admin token still works");
    let file = std::fs::read_to_string(berth.data_dir.join("admin.token")).unwrap();
    assert_eq!(file.trim(), new);
    berth.token = new;
    berth.cli_ok(&["get", "services"]);
    // Every write, refusal and token change above is on the audit trail, and its chain holds.
    let trail = berth.cli_ok(&["audit", "-o", "json"]);
    let trail: serde_json::Value = serde_json::from_str(&trail).unwrap();
    let records = trail["items"].as_array().unwrap();
    let has = |action: &str, role: &str, code: u64| {
        records
            .iter()
            .any(|r| r["action"] == action && r["role"] == role && r["code"] == code)
    };
    assert!(
        has("delete", "viewer", 403),
        "the viewer's refused delete: {trail}"
    );
    assert!(
        has("apply", "deployer", 200),
        "the deployer's apply: {trail}"
    );
    assert!(
        has("delete", "operator", 200),
        "the operator's delete: {trail}"
    );
    assert!(has("token-revoke", "admin", 200), "the revocation: {trail}");
    assert!(has("admin-rotate", "admin", 200), "the rotation: {trail}");
    for t in [&viewer, &operator, &deployer] {
        assert!(
            !trail.to_string().contains(&t[t.len() - 64..]),
            "a token in the trail"
        );
    }
    let verify = berth.cli(&["audit", "verify"]);
    assert!(verify.success, "{} {}", verify.stdout, verify.stderr);

    // And the token survives a restart (only its hash is stored).
    berth.restart();
    berth.cli_ok(&["get", "services"]);
    let out = berth.cli_as(&deployer, &["whoami"], None);
    assert!(out.success, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_refuses_the_admin_token() {
    let p = prefix("access-ctl");
    let _cleanup = Cleanup::new(&p);
    let nats = Nats::start();
    let api = Berth::start_api(nats.url());
    let dir = tempdir("controller");
    let out = Command::new(berth_bin())
        .args([
            "controller",
            "service",
            "--nats",
            &nats.url(),
            "--url",
            &api.url(),
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .env("BERTH_TOKEN", &api.token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("not a `admin` token") && err.contains("berth token create --role controller"),
        "{err}"
    );
    assert!(!err.contains(&api.token), "the token leaked: {err}");
}
