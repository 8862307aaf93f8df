//! End-to-end tests of the Ingress controller against the real Swarm engine and a real Caddy proxy
//! (`berth-test/caddy:1`, Debian's caddy), from the outside, as a browser would: `curl` with
//! `--resolve` pointing the test domains at 127.0.0.1, `openssl s_client` to read the certificate.
//!
//! The proxy publishes the node's ports 443 and 80, which only one proxy can hold, so the tests of
//! this file take turns (`PORTS`). Each test has its own berth installation, proxy name and name
//! prefix, and its guards (declared before the stack) remove what it made even when it fails.

use berth_api_types::Kind;
use berth_e2e::{condition, eventually, on_both_buses, prefix, Berth, Bus, Cleanup, Stack};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CADDY: &str = "berth-test/caddy:1";
const WEB: &str = "berth-demo/web:1";
const BUSYBOX: &str = "berth-test/busybox:1";
/// Generous bound for convergence on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(60);

/// The node's ports 443, 80 and 2021 (the proxy's admin endpoint): one proxy at a time.
static PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Set-up

/// Removes the proxy's state volume once its last container is gone (after the stack stopped).
struct VolumeCleanup(String);

impl Drop for VolumeCleanup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let gone = Command::new("docker")
                .args(["volume", "inspect", &self.0])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| !s.success());
            let removed = Command::new("docker")
                .args(["volume", "rm", &self.0])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if gone || removed {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Fails loudly when something already holds the HTTPS port (a proxy left by a killed run, or any
/// other server): the test would otherwise time out waiting for a proxy that cannot start.
fn ports_are_free() {
    for port in [443, 80, 2021] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "e2e: something listens on port {port} already; the ingress tests need it \
             (`docker service ls` for a leftover e2e-ing-* proxy)"
        );
    }
}

/// A berth with its proxy named `<p>-lb`, running the test image on ports 443, 80 and 2021.
fn start(bus: Bus, p: &str) -> Stack {
    let lb = format!("{p}-lb");
    Stack::start_with(bus, &["--ingress-name", &lb, "--ingress-image", CADDY])
}

fn web_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {WEB}\n  replicas: 1\n  stopGracePeriod: 2s\n{extra}"
    )
}

/// A second tenant: busybox httpd serving `tenant-b` (an image that declares no ports).
fn tenant_yaml(name: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {BUSYBOX}\n  command: [\"sh\", \"-c\", \"mkdir -p /w && echo tenant-b > /w/index.html && exec httpd -f -p 8080 -h /w\"]\n  init: true\n  stopGracePeriod: 1s\n"
    )
}

/// An Ingress with one host; `paths` are (path, service, port); `tls` is the YAML of `tls:`.
fn ingress_yaml(name: &str, host: &str, paths: &[(&str, &str, u32)], tls: &str) -> String {
    let mut s = format!(
        "apiVersion: berth/v1\nkind: Ingress\nmetadata:\n  name: {name}\nspec:\n  tls: {tls}\n  rules:\n    - host: {host}\n      paths:\n"
    );
    for (path, service, port) in paths {
        s.push_str(&format!(
            "        - {{path: \"{path}\", service: {service}, port: {port}}}\n"
        ));
    }
    s
}

/// A self-signed certificate for `host` whose subject names `org`, as a berth TLS Secret.
fn tls_secret_yaml(name: &str, host: &str, org: &str, dir: &Path) -> (String, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={host}/O={org}"),
            "-addext",
            &format!("subjectAltName=DNS:{host}"),
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("e2e: openssl is missing (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let indent = |p: &Path| {
        std::fs::read_to_string(p)
            .expect("read pem")
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    };
    let yaml = format!(
        "apiVersion: berth/v1\nkind: Secret\nmetadata:\n  name: {name}\nspec:\n  stringData:\n    tls.crt: |\n{}    tls.key: |\n{}",
        indent(&cert),
        indent(&key)
    );
    (yaml, cert)
}

// ---------------------------------------------------------------------------------------------
// The outside view

/// What one request through the proxy got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Http {
        code: u16,
        location: String,
        hsts: bool,
        body: String,
    },
    /// curl failed before an HTTP answer: its exit code (7 refused, 35 TLS handshake, 60 untrusted).
    Failed(i32, String),
}

impl Reply {
    fn code(&self) -> Option<u16> {
        match self {
            Reply::Http { code, .. } => Some(*code),
            Reply::Failed(..) => None,
        }
    }
}

/// GET `url` with `host` resolved to 127.0.0.1; `ca` is the only trusted root (none: `-k`).
fn fetch(url: &str, ca: Option<&Path>, extra: &[&str]) -> Reply {
    let (host, port) = {
        let rest = url.split("://").nth(1).expect("url");
        let authority = rest.split('/').next().expect("authority");
        let default = if url.starts_with("https") { 443 } else { 80 };
        (authority.to_string(), default)
    };
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-D", "-", "-o", "-"])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"));
    match ca {
        Some(ca) => cmd.arg("--cacert").arg(ca),
        None => cmd.arg("-k"),
    };
    let out = cmd
        .args(extra)
        .arg(url)
        .output()
        .expect("e2e: curl is missing (scripts/test installs it)");
    if !out.status.success() {
        return Reply::Failed(
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    Reply::Http {
        code,
        location: header("location"),
        hsts: !header("strict-transport-security").is_empty(),
        body: body.to_string(),
    }
}

/// Subject and issuer of the certificate the proxy presents for `host` (SNI).
fn peer_certificate(host: &str) -> String {
    let mut s_client = Command::new("openssl")
        .args(["s_client", "-connect", "127.0.0.1:443", "-servername", host])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("e2e: openssl is missing");
    let pem = s_client.stdout.take().expect("stdout");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-issuer"])
        .stdin(pem)
        .output()
        .expect("openssl x509");
    let _ = s_client.wait();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// berth side

/// Waits until the Ingress has observed its generation and its condition `type_` has `status`.
async fn wait_condition(b: &Berth, name: &str, type_: &str, status: &str) -> Value {
    let what = format!("ingress/{name} {type_}={status}");
    eventually(b, CONVERGE, &what, || async move {
        let o = b
            .object(Kind::Ingress, name)
            .await
            .ok_or("object not found")?;
        let observed = o["status"]["observedGeneration"] == o["metadata"]["generation"];
        match condition(&o, type_) {
            Some(c) if observed && c["status"] == status => Ok(o),
            _ => Err(format!("status {}", o["status"])),
        }
    })
    .await
}

/// Waits until a request through the proxy gets `want`.
async fn wait_reply(
    b: &Berth,
    url: &str,
    ca: Option<&Path>,
    want: impl Fn(&Reply) -> bool,
) -> Reply {
    let what = format!("the proxy's answer to {url}");
    eventually(b, CONVERGE, &what, || {
        let r = fetch(url, ca, &[]);
        let ok = want(&r);
        async move {
            if ok {
                Ok(r)
            } else {
                Err(format!("{r:?}"))
            }
        }
    })
    .await
}

/// How many tasks the proxy service ever had (1: it was never restarted).
fn proxy_tasks(lb: &str) -> usize {
    let out = Command::new("docker")
        .args(["service", "ps", "-q", lb])
        .output()
        .expect("docker service ps");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// HTTPS with the Secret's certificate and with the internal CA, the HTTP redirect, unknown hosts,
/// a conflicting Ingress, a missing backend, and a deleted Ingress — all route changes loaded live.
async fn routes_tls_and_conflicts(bus: Bus) {
    let _turn = PORTS.lock().await;
    let p = prefix("ing");
    let lb = format!("{p}-lb");
    let _volume = VolumeCleanup(format!("{lb}-state"));
    let _cleanup = Cleanup::new(&p);
    ports_are_free();
    let stack = start(bus, &p);
    let b = &stack.berth;
    let tmp = berth_e2e::tempdir("ingress");

    let (web, tenant) = (format!("{p}-web"), format!("{p}-tenant"));
    let (secret, cert) = tls_secret_yaml(&format!("{p}-tls"), "app.example.test", &p, tmp.path());
    b.apply(&format!(
        "{secret}---\n{}---\n{}---\n{}",
        web_yaml(&web, ""),
        tenant_yaml(&tenant),
        ingress_yaml(
            &format!("{p}-app"),
            "app.example.test",
            &[("/", &web, 8080)],
            &format!("{{secretRef: {p}-tls}}")
        )
    ));
    let app = wait_condition(b, &format!("{p}-app"), "Ready", "True").await;
    assert_eq!(
        app["status"]["urls"],
        serde_json::json!(["https://app.example.test/"])
    );
    assert_eq!(app["status"]["proxy"], lb.as_str());
    // The Secret's certificate is valid for 2 days (`openssl req -days 2`): its expiry is in status.
    let not_after: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(app["status"]["certificateNotAfter"].clone())
            .unwrap_or_else(|e| panic!("status.certificateNotAfter: {e}: {}", app["status"]));
    let left = not_after - chrono::Utc::now();
    assert!(
        left > chrono::Duration::hours(47) && left <= chrono::Duration::hours(48),
        "{not_after}"
    );

    // HTTPS with the Secret's certificate: trusted with exactly that certificate as the root.
    let r = wait_reply(b, "https://app.example.test/", Some(&cert), |r| {
        r.code() == Some(200)
    })
    .await;
    let Reply::Http { body, hsts, .. } = &r else {
        unreachable!()
    };
    // berth-demo/web:1's page: its greeting first, then what the task was given.
    assert_eq!(body.lines().next(), Some("hello from berth"), "{body}");
    assert!(hsts, "HSTS is on by default: {r:?}");
    let presented = peer_certificate("app.example.test");
    assert!(
        presented.contains(&format!("O = {p}")),
        "the proxy must present the Secret's certificate: {presented}"
    );

    // Plain HTTP only redirects.
    let r = fetch("http://app.example.test/x?q=1", None, &[]);
    assert!(
        matches!(&r, Reply::Http { code: 308, location, .. } if location == "https://app.example.test/x?q=1"),
        "{r:?}"
    );
    let r = fetch("http://unknown.example.test/", None, &[]);
    assert_eq!(r.code(), Some(308), "{r:?}");

    // A second tenant with a certificate from berth's internal CA, loaded live.
    b.apply(&ingress_yaml(
        &format!("{p}-b"),
        "b.example.test",
        &[("/", &tenant, 8080)],
        "{mode: internal}",
    ));
    let ing_b = wait_condition(b, &format!("{p}-b"), "Ready", "True").await;
    assert_eq!(ing_b["status"]["delivery"], "live", "{}", ing_b["status"]);
    assert!(
        ing_b["status"]["certificateNotAfter"].is_string(),
        "an internal-CA Ingress reports its CA's expiry: {}",
        ing_b["status"]
    );
    let ca = tmp.path().join("berth-ca.pem");
    std::fs::write(
        &ca,
        ing_b["status"]["caCertificate"]
            .as_str()
            .expect("status.caCertificate for an internal-CA Ingress"),
    )
    .expect("write CA");
    let r = wait_reply(b, "https://b.example.test/", Some(&ca), |r| {
        r.code() == Some(200)
    })
    .await;
    assert!(
        matches!(&r, Reply::Http { body, .. } if body.trim() == "tenant-b"),
        "{r:?}"
    );
    let presented = peer_certificate("b.example.test");
    assert!(
        presented.contains("issuer=CN = berth ingress CA"),
        "issued by berth's CA (through Caddy's intermediate): {presented}"
    );
    // Not trusted with the other tenant's certificate: the chain really is berth's CA.
    assert!(matches!(
        fetch("https://b.example.test/", Some(&cert), &[]),
        Reply::Failed(60, _)
    ));

    // Unknown hosts never reach a backend: no certificate for the name, and a 404 for a Host header
    // no Ingress names.
    assert!(
        matches!(
            fetch("https://unknown.example.test/", None, &[]),
            Reply::Failed(35, _)
        ),
        "TLS refused for an unknown host"
    );
    let r = fetch(
        "https://app.example.test/",
        Some(&cert),
        &["-H", "Host: unknown.example.test"],
    );
    assert!(
        matches!(&r, Reply::Http { code: 404, body, .. } if !body.contains("hello") && !body.contains("tenant")),
        "{r:?}"
    );

    // A later Ingress claiming the same host and path gets the Conflict condition; the route stays
    // with the older one.
    b.apply(&ingress_yaml(
        &format!("{p}-dup"),
        "app.example.test",
        &[("/", &tenant, 8080)],
        &format!("{{secretRef: {p}-tls}}"),
    ));
    let dup = wait_condition(b, &format!("{p}-dup"), "Conflict", "True").await;
    let msg = condition(&dup, "Conflict").unwrap()["message"]
        .as_str()
        .unwrap();
    assert!(
        msg.contains(&format!("path `/` is already routed by Ingress `{p}-app`")),
        "{msg}"
    );
    assert_eq!(condition(&dup, "Accepted").unwrap()["status"], "False");
    let app = b.object(Kind::Ingress, &format!("{p}-app")).await.unwrap();
    assert_eq!(condition(&app, "Conflict").unwrap()["status"], "False");
    assert!(matches!(
        fetch("https://app.example.test/", Some(&cert), &[]),
        Reply::Http { code: 200, body, .. } if body.lines().next() == Some("hello from berth")
    ));

    // Missing backends are conditions, and their paths answer 503; the rest keeps working.
    b.apply(&ingress_yaml(
        &format!("{p}-broken"),
        "broken.example.test",
        &[("/", &format!("{p}-ghost"), 80), ("/web", &web, 9090)],
        "{mode: internal}",
    ));
    let broken = wait_condition(b, &format!("{p}-broken"), "BackendMissing", "True").await;
    let c = condition(&broken, "BackendMissing").unwrap();
    assert_eq!(c["reason"], "ServiceMissing");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("Service `{p}-ghost` does not exist")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "Service `{web}`'s image exposes port 8080, not 9090"
        )),
        "{msg}"
    );
    wait_reply(b, "https://broken.example.test/web/x", Some(&ca), |r| {
        r.code() == Some(503)
    })
    .await;
    assert_eq!(
        fetch("https://b.example.test/", Some(&ca), &[]).code(),
        Some(200)
    );

    // Deleting an Ingress takes its route away.
    b.cli_ok(&["delete", "ingress", &format!("{p}-b")]);
    wait_reply(b, "https://b.example.test/", None, |r| {
        matches!(r, Reply::Failed(35, _))
    })
    .await;
    assert_eq!(
        fetch("https://app.example.test/", Some(&cert), &[]).code(),
        Some(200)
    );

    // Every change after the first went in live: the proxy never restarted.
    assert_eq!(proxy_tasks(&lb), 1, "the proxy's task was replaced");

    // A rotated certificate is a new Swarm secret to mount: the restart path. The restarted proxy
    // presents it, and still has every route loaded live before.
    let rotated_dir = tmp.path().join("rotated");
    std::fs::create_dir(&rotated_dir).expect("mkdir");
    let org = format!("{p}-rotated");
    let (rotated, cert2) =
        tls_secret_yaml(&format!("{p}-tls"), "app.example.test", &org, &rotated_dir);
    b.apply(&rotated);
    eventually(b, CONVERGE, "the rotated certificate", || {
        let presented = peer_certificate("app.example.test");
        let ok = presented.contains(&format!("O = {org}"));
        async move {
            if ok {
                Ok(())
            } else {
                Err(presented)
            }
        }
    })
    .await;
    eventually(b, CONVERGE, "Ready by restart", || async {
        let o = b
            .object(Kind::Ingress, &format!("{p}-app"))
            .await
            .ok_or("gone")?;
        let ready = condition(&o, "Ready").is_some_and(|c| c["status"] == "True");
        if ready && o["status"]["delivery"] == "restart" {
            Ok(())
        } else {
            Err(o["status"].to_string())
        }
    })
    .await;
    assert_eq!(
        fetch("https://app.example.test/", Some(&cert2), &[]).code(),
        Some(200)
    );
    assert_eq!(
        fetch("https://broken.example.test/web/x", Some(&ca), &[]).code(),
        Some(503)
    );
    assert!(matches!(
        fetch("https://b.example.test/", None, &[]),
        Reply::Failed(35, _)
    ));
    assert_eq!(proxy_tasks(&lb), 2, "one restart for the new certificate");
}

on_both_buses!(routes_tls_and_conflicts);

/// Requests in a loop while the backend rolls to a new spec and another Ingress is added: every one
/// is answered, none with a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dropped_requests_during_rollout_and_route_changes() {
    let _turn = PORTS.lock().await;
    let p = prefix("ing");
    let lb = format!("{p}-lb");
    let _volume = VolumeCleanup(format!("{lb}-state"));
    let _cleanup = Cleanup::new(&p);
    ports_are_free();
    let stack = start(Bus::Embedded, &p);
    let b = &stack.berth;
    let tmp = berth_e2e::tempdir("ingress");

    let web = format!("{p}-web");
    let rolling = "  replicas: 2\n  update: {parallelism: 1, order: start-first}\n";
    b.apply(&format!(
        "{}---\n{}",
        web_yaml(&web, "  env: [{name: VERSION, value: \"1\"}]\n")
            .replace("  replicas: 1\n", rolling),
        ingress_yaml(
            &format!("{p}-app"),
            "app.example.test",
            &[("/", &web, 8080)],
            "{mode: internal}"
        )
    ));
    let app = wait_condition(b, &format!("{p}-app"), "Ready", "True").await;
    let ca = tmp.path().join("berth-ca.pem");
    std::fs::write(&ca, app["status"]["caCertificate"].as_str().unwrap()).unwrap();
    wait_reply(b, "https://app.example.test/", Some(&ca), |r| {
        r.code() == Some(200)
    })
    .await;

    // The load: one request after another, from a thread, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let ca = ca.clone();
        std::thread::spawn(move || {
            let mut replies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                replies.push(fetch("https://app.example.test/", Some(&ca), &[]));
            }
            replies
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A rolling update of the backend and a new Ingress, at the same time.
    b.apply(&format!(
        "{}---\n{}",
        web_yaml(&web, "  env: [{name: VERSION, value: \"2\"}]\n")
            .replace("  replicas: 1\n", rolling),
        ingress_yaml(
            &format!("{p}-new"),
            "new.example.test",
            &[("/", &web, 8080)],
            "{mode: internal}"
        )
    ));
    let new = wait_condition(b, &format!("{p}-new"), "Ready", "True").await;
    assert_eq!(new["status"]["delivery"], "live", "{}", new["status"]);
    wait_reply(b, "https://new.example.test/", Some(&ca), |r| {
        r.code() == Some(200)
    })
    .await;
    // The rollout is over once the service runs two tasks of the new spec and none of the old.
    let what = "the backend's rolling update to finish";
    eventually(b, CONVERGE, what, || async {
        let o = b.object(Kind::Service, &web).await.ok_or("gone")?;
        let st = &o["status"];
        let done = st["observedGeneration"] == o["metadata"]["generation"]
            && st["runningReplicas"] == 2
            && st["updateState"] == "completed"
            && condition(&o, "Ready").is_some_and(|c| c["status"] == "True");
        if done {
            Ok(())
        } else {
            Err(st.to_string())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let replies = load.join().expect("load thread");

    let bad: Vec<&Reply> = replies.iter().filter(|r| r.code() != Some(200)).collect();
    eprintln!(
        "e2e: {} requests during the rollout and the route change, {} not 200",
        replies.len(),
        bad.len()
    );
    assert!(replies.len() >= 20, "too few requests: {}", replies.len());
    assert!(bad.is_empty(), "dropped or failed requests: {bad:?}");
    assert_eq!(proxy_tasks(&lb), 1, "the proxy's task was replaced");
}
