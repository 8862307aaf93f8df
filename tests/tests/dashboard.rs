//! The web dashboard in a real browser: berth (`up`, HTTPS with its internal CA) on the shared
//! Swarm, and Debian's headless Chromium driven by playwright-core (`tests/browser/dashboard.mjs`)
//! through sign-in, a live update, logs, the terminal, undo, the evidence download and a viewer's
//! refusals. The HTTP-level guarantees (CSRF, cookie attributes, the policy) are checked here
//! with a plain client, so a failure names the header that is wrong.

use berth_api_types::names::{paths, session};
use berth_api_types::Kind;
use berth_e2e::{berth_bin, prefix, tempdir, Berth, Cleanup};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn service_yaml(name: &str, image: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  \
         command: [\"sh\", \"-c\", \"while true; do echo dashboard-log-line; sleep 2; done\"]\n  \
         init: true\n  stopGracePeriod: 1s\n  replicas: 1\n"
    )
}

fn token(b: &Berth, role: &str) -> String {
    let out = b.cli(&["token", "create", "--role", role]);
    assert!(out.success, "token create {role}: {}", out.stderr);
    out.stdout.trim().to_string()
}

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Where the README's screenshots go when `BERTH_SCREENSHOTS` names a directory.
fn screenshots() -> Option<String> {
    std::env::var("BERTH_SCREENSHOTS")
        .ok()
        .filter(|s| !s.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_watches_a_rollout_reads_logs_runs_a_command_and_a_viewer_may_not() {
    assert!(
        browser_dir().join("node_modules/playwright-core").is_dir(),
        "e2e: tests/browser has no node_modules: scripts/test installs them (berth_browser_deps)"
    );
    let p = prefix("dash");
    let _cleanup = Cleanup::new(&p);
    // With the default backup plan, for the evidence page.
    let mut b = Berth::start_tls_env("up", None, &[], &[("BERTH_NO_DEFAULT_BACKUP_PLAN", "0")]);
    let name = format!("{p}-web");
    let dir = tempdir("dashboard");
    let v1 = dir.path().join("v1.yaml");
    let v2 = dir.path().join("v2.yaml");
    std::fs::write(&v1, service_yaml(&name, "berth-test/busybox:1")).unwrap();
    std::fs::write(&v2, service_yaml(&name, "berth-test/busybox:2")).unwrap();
    let quiet = dir.path().join("quiet.yaml");
    std::fs::write(
        &quiet,
        service_yaml(&format!("{name}-quiet"), "berth-test/busybox:1")
            .replace("replicas: 1", "replicas: 0"),
    )
    .unwrap();
    let viewer = token(&b, "viewer");

    // A snapshot for the evidence page, of the plan berth makes at its first start.
    berth_e2e::eventually(
        &b,
        Duration::from_secs(30),
        "the environment plan",
        || async {
            b.object(berth_api_types::Kind::Backup, "environment")
                .await
                .map(|_| ())
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    let out = b.cli_ok(&["backup", "run", "environment"]);
    let snapshot = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no snapshot id in `{out}`"))
        .to_string();

    let mut node = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .current_dir(browser_dir())
        .env("BERTH_URL", b.url())
        .env("BERTH_BIN", berth_bin())
        .env("BERTH_CA", b.ca_file())
        .env("ADMIN_TOKEN", &b.token)
        .env("VIEWER_TOKEN", &viewer)
        .env("SERVICE", &name)
        .env("MANIFEST_V1", &v1)
        .env("MANIFEST_V2", &v2)
        .env("MANIFEST_QUIET", &quiet)
        .env("SNAPSHOT", &snapshot)
        .env("SCREENSHOTS", screenshots().unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("e2e: cannot run node (scripts/test installs nodejs)");
    let mut to_node = node.stdin.take().unwrap();
    let stderr = node.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut text).unwrap_or_default();
        text
    });
    // The script's steps, one per line; on `RESTART-BERTH` it waits for berth to come back.
    let mut stdout = String::new();
    for line in BufReader::new(node.stdout.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        println!("{line}");
        if line == "RESTART-BERTH" {
            b.restart();
            writeln!(to_node, "restarted").expect("e2e: the browser script went away");
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = node.wait().expect("node");
    let stderr = errors.join().unwrap_or_default();
    assert!(
        status.success(),
        "the browser run failed:\n{stdout}\n{stderr}\n--- berth log (tail) ---\n{}",
        tail(&b.log_text(), 60)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The session's guarantees at the HTTP level: what the cookie is, that a write with it needs the
/// page's CSRF token, that a sign-in from another site is refused, and the policy on every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_needs_the_csrf_token_for_writes_and_pages_carry_a_strict_policy() {
    let p = prefix("dash-csrf");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start_tls("up", None, &[]);
    let c = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(b.ca_file()).unwrap()).unwrap(),
        )
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = b.url();
    let origin = url.clone();

    // Anonymous: a page redirects to the sign-in form; the API still answers 401.
    let r = c
        .get(format!("{url}{}", paths::UI_HOME))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], paths::UI_LOGIN);

    // One sign-in form post, from `origin`.
    let sign_in = |origin: &str, token: &str| {
        c.post(format!("{url}{}", paths::UI_LOGIN))
            .header("origin", origin)
            .form(&[("token", token)])
            .send()
    };
    // A wrong token: 401, no cookie.
    let r = sign_in(&origin, "berth_nobody_00").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());

    // From another site: refused, even with the right token (login CSRF).
    let r = sign_in("https://evil.example", &b.token).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());

    let r = sign_in(&origin, &b.token).await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_string();

    let page = c
        .get(format!("{url}{}", paths::UI_HOME))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.unwrap();
    let csrf = html
        .split("name=\"berth-csrf\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the page carries its CSRF token")
        .to_string();
    assert!(!html.contains(&b.token), "the page never shows the token");
    assert!(
        !html.contains("<script>") && !html.contains(" style=\""),
        "no inline script or style"
    );

    // A write with the cookie and without the CSRF token: refused before the handler, and
    // nothing is created.
    let name = format!("{p}-x");
    let manifest = serde_json::json!({
        "apiVersion": "berth/v1", "kind": "Config",
        "metadata": {"name": name}, "spec": {"data": {"a": "Yg=="}}
    });
    // One Config POST with the session cookie and, when given, a CSRF header.
    let create = |csrf: Option<String>| {
        let mut req = c
            .post(format!("{url}{}", paths::collection(Kind::Config)))
            .header("cookie", &session)
            .json(&manifest);
        if let Some(t) = csrf {
            req = req.header(session::CSRF_HEADER, t);
        }
        req.send()
    };
    let r = create(None).await.unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "CsrfRejected", "{body}");
    assert!(b.object(Kind::Config, &name).await.is_none());
    let r = create(Some("0".repeat(32))).await.unwrap();
    assert_eq!(r.status(), 403, "another session's or a made-up token");

    // With it: the same write goes through, as the token's role allows.
    let r = create(Some(csrf.clone())).await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    b.cli_ok(&["delete", "config", &name]);

    // Signing out clears the cookie.
    let r = c
        .post(format!(
            "{url}{}?{}={csrf}",
            paths::UI_LOGOUT,
            session::CSRF_PARAM
        ))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}
