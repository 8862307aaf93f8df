//! End-to-end tests of deploys through webhooks: `berth up` against the real Swarm engine (and a
//! real nats-server on the NATS bus). A webhook call must end with the Swarm tasks running the new
//! tag, and an independent NATS subscriber must see the deploy event; refused calls (wrong token,
//! bad or replayed signature, oversized body) must leave no event and no spec change.
//!
//! Images are local: `berth-test/busybox:1` is tagged `berth-test/busybox:2` through the engine
//! API, so no registry is needed. Signed calls are signed with `openssl`, exactly as docs/deploy.md
//! tells users to.

use berth_api_types::names::{annotations, paths};
use berth_e2e::deploy::{create_webhook, post, running_tasks, wait_running, Tap, CONVERGE};
use berth_e2e::{
    docker, eventually, manifest, on_both_buses, on_every_store, prefix, Berth, Bus, Cleanup,
    Docker, Stack,
};
use bollard::query_parameters::TagImageOptions;
use serde_json::Value;
use std::time::Duration;

const IMAGE_1: &str = "berth-test/busybox:1";
const REPO: &str = "berth-test/busybox";

fn service_yaml(name: &str, replicas: u64) -> String {
    format!(
        r#"apiVersion: berth/v1
kind: Service
metadata:
  name: {name}
spec:
  image: {IMAGE_1}
  command: ["sleep", "100000"]
  init: true
  stopGracePeriod: 1s
  replicas: {replicas}
"#
    )
}

fn apply(b: &Berth, name: &str, replicas: u64) {
    let (_dir, path) = manifest("svc.yaml", &service_yaml(name, replicas));
    b.cli_ok(&["apply", "-f", path.to_str().expect("utf-8 path")]);
}

/// `berth-test/busybox:2`: the same content under a new tag (idempotent; other tests may share it).
async fn tag_image_2(d: &Docker) {
    d.tag_image(
        IMAGE_1,
        Some(TagImageOptions {
            repo: Some(REPO.to_string()),
            tag: Some("2".to_string()),
        }),
    )
    .await
    .expect("e2e: tagging berth-test/busybox:1 as :2");
}

async fn service(b: &Berth, name: &str) -> Value {
    let (code, v) = b
        .api_get(&paths::object(berth_api_types::Kind::Service, name))
        .await;
    assert_eq!(code, 200, "GET service/{name}: {v}");
    v
}

/// The recipe of docs/deploy.md: `printf '%s' "$TS.$BODY" | openssl dgst -sha256 -hmac "$SECRET"`.
fn openssl_sign(secret: &str, ts: i64, body: &str) -> String {
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            r#"printf '%s' "$TS.$BODY" | openssl dgst -sha256 -hmac "$SECRET" | sed 's/^.* //'"#,
        ])
        .env("TS", ts.to_string())
        .env("BODY", body)
        .env("SECRET", secret)
        .output()
        .expect("e2e: openssl (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("sha256={}", String::from_utf8_lossy(&out.stdout).trim())
}

// ---------------------------------------------------------------------------------------------

/// A webhook call with a new tag rolls the service onto it; a call without a tag redeploys the
/// same tag (new tasks). On NATS an independent subscriber sees each deploy event.
async fn webhook_rolls_out_new_tag(bus: Bus) {
    let p = prefix("hook");
    let _cleanup = Cleanup::new(&p);
    let d = docker().await;
    tag_image_2(&d).await;
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let name = format!("{p}-web");
    apply(b, &name, 1);
    let first = wait_running(b, &d, &name, IMAGE_1, 1).await;
    let mut tap = match bus {
        Bus::Nats | Bus::NatsStore => Some(Tap::start(&stack.nats_url(), &name).await),
        Bus::Embedded => None,
    };

    let hook = create_webhook(b, &[&name]);
    let url = hook["url"].as_str().expect("url").to_string();
    assert!(
        url.starts_with(&format!("{}/hooks/v1/bh_", b.url())),
        "{url}"
    );
    let called = std::time::Instant::now();
    let (code, body) = post(
        &url,
        &[("content-type", "application/json".into())],
        r#"{"tag": "2"}"#,
    )
    .await;
    assert_eq!(code, 202, "{body}\n{}", b.log_text());
    let answered = called.elapsed();
    let id = body["id"].as_str().expect("event id").to_string();

    wait_running(b, &d, &name, &format!("{REPO}:2"), 1).await;
    eprintln!(
        "{bus:?}: webhook answered 202 in {answered:?}; new task running {:?} after the call",
        called.elapsed()
    );
    let svc = service(b, &name).await;
    assert_eq!(svc["spec"]["image"], format!("{REPO}:2"));
    assert_eq!(
        svc["metadata"]["annotations"][annotations::DEPLOY_ID],
        id.as_str()
    );
    assert_eq!(
        svc["metadata"]["annotations"][annotations::DEPLOY_SOURCE],
        "webhook"
    );
    let generation = svc["metadata"]["generation"].as_u64().unwrap();
    assert_eq!(
        svc["metadata"]["annotations"][annotations::DEPLOY_GENERATION],
        generation.to_string()
    );
    if let Some(tap) = tap.as_mut() {
        let ev = tap.next().await;
        assert_eq!(ev["id"], id.as_str());
        assert_eq!(ev["service"], name.as_str());
        assert_eq!(ev["image"], format!("{REPO}:2"));
        assert_eq!(ev["tag"], "2");
        assert_eq!(ev["source"], "webhook");
        assert!(ev["time"].as_str().is_some_and(|t| t.contains('T')), "{ev}");
    }

    // Same tag again, no body: new tasks (the engine is told to force an update and pull).
    let before = wait_running(b, &d, &name, &format!("{REPO}:2"), 1).await;
    assert_ne!(before, first);
    let (code, body) = post(&url, &[], "").await;
    assert_eq!(code, 202, "{body}");
    let what = "a new task after a redeploy of the same tag";
    let before = &before;
    let name2 = &name;
    let d2 = &d;
    eventually(b, CONVERGE, what, || async move {
        let now: Vec<String> = running_tasks(d2, name2)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if now.len() == 1 && !before.contains(&now[0]) {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
    let svc = service(b, &name).await;
    assert_eq!(svc["spec"]["image"], format!("{REPO}:2"));
    assert_eq!(svc["spec"]["forceUpdate"], 1);
    assert_eq!(svc["metadata"]["generation"].as_u64(), Some(generation + 1));
    let swarm = d.inspect_service(&name, None).await.expect("inspect");
    let forced = swarm
        .spec
        .and_then(|s| s.task_template)
        .and_then(|t| t.force_update);
    assert_eq!(forced, Some(1));
    if let Some(tap) = tap.as_mut() {
        let ev = tap.next().await;
        assert_eq!(ev["image"], format!("{REPO}:2"));
        assert_eq!(ev["source"], "webhook");
    }
}

on_every_store!(webhook_rolls_out_new_tag);

/// Wrong token, bad signature, replayed signature and oversized body: refused, no deploy event,
/// no spec change. One good signed call in between shows the checks are not simply always failing.
async fn refused_calls_change_nothing(bus: Bus) {
    let p = prefix("hookno");
    let _cleanup = Cleanup::new(&p);
    let d = docker().await;
    tag_image_2(&d).await;
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let name = format!("{p}-web");
    // No tasks: the refusals are about the spec and the bus, not the engine.
    apply(b, &name, 0);
    let mut tap = match bus {
        Bus::Nats | Bus::NatsStore => Some(Tap::start(&stack.nats_url(), &name).await),
        Bus::Embedded => None,
    };
    let hook = create_webhook(b, &[&name, "--signed"]);
    let url = hook["url"].as_str().unwrap().to_string();
    let secret = hook["signingSecret"]
        .as_str()
        .expect("signing secret")
        .to_string();
    let generation = || async {
        service(b, &name).await["metadata"]["generation"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(generation().await, 1);

    let body = r#"{"tag":"2"}"#;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let signed = |ts: i64, sig: String| {
        vec![
            ("x-berth-timestamp", ts.to_string()),
            ("x-berth-signature", sig),
        ]
    };

    // Wrong token (with a valid signature for good measure): 404, exactly the generic body.
    let ts = now();
    let wrong = url.replace("/hooks/v1/bh_", "/hooks/v1/bh_x");
    let (code, v) = post(&wrong, &signed(ts, openssl_sign(&secret, ts, body)), body).await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["message"], "no such API path");
    // Bad signatures: none, wrong key, other body, stale.
    let (code, _) = post(&url, &[], body).await;
    assert_eq!(code, 401);
    let (code, _) = post(
        &url,
        &signed(ts, openssl_sign("not-the-secret", ts, body)),
        body,
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = post(
        &url,
        &signed(ts, openssl_sign(&secret, ts, r#"{"tag":"1"}"#)),
        body,
    )
    .await;
    assert_eq!(code, 401);
    let stale = ts - 600;
    let (code, _) = post(
        &url,
        &signed(stale, openssl_sign(&secret, stale, body)),
        body,
    )
    .await;
    assert_eq!(code, 401);
    // Oversized, even if signed.
    let big = format!(r#"{{"tag":"2","x":"{}"}}"#, "y".repeat(70 * 1024));
    let (code, _) = post(
        &url,
        &signed(ts, openssl_sign(&secret, ts, &big)),
        big.clone(),
    )
    .await;
    assert_eq!(code, 413);
    assert_eq!(generation().await, 1, "a refused call changed the spec");
    if let Some(tap) = tap.as_mut() {
        assert_eq!(
            tap.drain().await,
            Vec::<Value>::new(),
            "a refused call published an event"
        );
    }

    // One good call...
    let good = signed(ts, openssl_sign(&secret, ts, body));
    let (code, v) = post(&url, &good, body).await;
    assert_eq!(code, 202, "{v}\n{}", b.log_text());
    let id = v["id"].as_str().unwrap().to_string();
    let what = "the signed deploy to reach the spec";
    let (b2, n2) = (b, &name);
    eventually(b, CONVERGE, what, || async move {
        let s = service(b2, n2).await;
        if s["spec"]["image"] == format!("{REPO}:2") {
            Ok(())
        } else {
            Err(s["spec"].to_string())
        }
    })
    .await;
    let svc = service(b, &name).await;
    assert_eq!(
        svc["metadata"]["annotations"][annotations::DEPLOY_SOURCE],
        "signed"
    );
    assert_eq!(svc["metadata"]["generation"], 2);
    // ...and its replay is refused.
    let (code, _) = post(&url, &good, body).await;
    assert_eq!(code, 401);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(generation().await, 2, "the replay changed the spec");
    if let Some(tap) = tap.as_mut() {
        let seen: Vec<Value> = tap.drain().await;
        let ids: Vec<&str> = seen.iter().filter_map(|e| e["id"].as_str()).collect();
        assert_eq!(
            ids,
            [id.as_str()],
            "exactly the good call's event: {seen:?}"
        );
        assert_eq!(seen[0]["source"], "signed");
    }
}

on_both_buses!(refused_calls_change_nothing);

/// `berth webhook` round trip: create prints a URL once, list never shows it, a restart keeps it,
/// rotate invalidates the old URL, delete invalidates the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_cli_round_trip() {
    let p = prefix("hookcli");
    let _cleanup = Cleanup::new(&p);
    let mut b = Berth::start(None);
    let name = format!("{p}-web");
    apply(&b, &name, 0);

    let out = b.cli_ok(&["webhook", "create", &name]);
    let url = out
        .split_whitespace()
        .find(|w| w.contains("/hooks/v1/"))
        .unwrap_or_else(|| panic!("no URL in `webhook create` output:\n{out}"))
        .to_string();
    let token = url.rsplit('/').next().unwrap().to_string();
    assert!(
        token.len() >= 3 + 22,
        "token too short for 128 bits: {token}"
    );
    assert!(out.contains("shown only now"), "{out}");

    let list = b.cli_ok(&["webhook", "list"]);
    assert!(list.contains(&name) && !list.contains(&token), "{list}");
    let json = b.cli_ok(&["webhook", "list", "-o", "json"]);
    assert!(!json.contains(&token), "{json}");
    let v: Value = serde_json::from_str(&json).unwrap();
    let id = v["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(v["items"][0]["service"], name.as_str());
    // The token is not in the store in clear either.
    let on_disk = files_containing(&b.data_dir, token.as_bytes());
    assert!(on_disk.is_empty(), "token stored in clear in {on_disk:?}");

    // Survives a restart of the API server.
    b.restart();
    let (code, v) = post(&url, &[], "").await;
    assert_eq!(code, 202, "{v}");

    let rotated = b.cli_ok(&["webhook", "rotate", &name]);
    let new_url = rotated
        .split_whitespace()
        .find(|w| w.contains("/hooks/v1/"))
        .expect("rotate prints the new URL")
        .to_string();
    assert_ne!(new_url, url);
    let (code, _) = post(&url, &[], "").await;
    assert_eq!(code, 404, "the old URL still works after rotate");
    let (code, v) = post(&new_url, &[], "").await;
    assert_eq!(code, 202, "{v}");

    b.cli_ok(&["webhook", "delete", &id]);
    let (code, _) = post(&new_url, &[], "").await;
    assert_eq!(code, 404, "a deleted webhook still works");
    let out = b.cli(&["webhook", "delete", &name]);
    assert!(
        !out.success && out.stderr.contains("no webhook"),
        "{}",
        out.stderr
    );
    let out = b.cli(&["webhook", "create", "no-such-service"]);
    assert!(
        !out.success && out.stderr.contains("Service `no-such-service` not found"),
        "{}",
        out.stderr
    );
    let list = b.cli(&["webhook", "list"]);
    assert!(
        list.success && list.stderr.contains("No webhooks found"),
        "{list:?}"
    );
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    out.push(path);
                }
            }
        }
    }
    out
}

/// HMAC-SHA256 with `openssl`, the key given as hex: the recipe of docs/deploy.md for checking a
/// deploy event's signature by hand. Returns lowercase hex.
fn openssl_hmac(key_hex: &str, data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-mac",
            "HMAC",
            "-macopt",
            &format!("hexkey:{key_hex}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("e2e: openssl (scripts/test installs it)");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.rsplit(' ').next().unwrap().trim().to_string()
}

/// Forged deploy events published straight on NATS, as any process with bus access could: no
/// signature, a wrong one, another installation's, a foreign repository, an id far in the future.
/// None changes the Service, berth's log names each refusal, and a webhook deploy still works
/// afterwards (the future id did not freeze the service). The foreign repository and the future
/// id are also tried *validly signed* (the test reads the installation's master key from its data
/// dir and derives the deploy key with openssl, as docs/deploy.md describes), to show those checks
/// do not lean on the signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_deploy_events_on_the_bus_change_nothing() {
    use berth_api_types::deploy::DeployEvent;
    let p = prefix("forge");
    let _cleanup = Cleanup::new(&p);
    let d = docker().await;
    tag_image_2(&d).await;
    let stack = Stack::start(Bus::Nats);
    let b = &stack.berth;
    let name = format!("{p}-web");
    // No tasks: what is checked is the spec.
    apply(b, &name, 0);
    let mut tap = Tap::start(&stack.nats_url(), &name).await;

    // A genuine deploy, to have a real event to imitate (and the installation id it carries).
    let hook = create_webhook(b, &[&name]);
    let url = hook["url"].as_str().unwrap().to_string();
    let (code, v) = post(&url, &[], r#"{"tag":"2"}"#).await;
    assert_eq!(code, 202, "{v}\n{}", b.log_text());
    let genuine: DeployEvent = serde_json::from_value(tap.next().await).unwrap();
    let sig = genuine
        .signature
        .clone()
        .expect("the bridge signs its events");
    assert_eq!(sig.len(), 64, "hex HMAC-SHA256: {sig}");
    let (b2, n2) = (b, &name);
    eventually(b, CONVERGE, "the genuine deploy", || async move {
        let s = service(b2, n2).await;
        (s["spec"]["image"] == format!("{REPO}:2"))
            .then_some(())
            .ok_or_else(|| s["spec"].to_string())
    })
    .await;
    let before = service(b, &name).await;

    // The installation's own deploy key, derived as docs/deploy.md says.
    let master = std::fs::read(b.data_dir.join("master.key")).expect("e2e: master.key");
    let deploy_key = openssl_hmac(&hex(&master), b"berth deploy events v1");
    let sign = |e: &mut DeployEvent| {
        e.signature = Some(openssl_hmac(&deploy_key, &e.signed_bytes()));
    };
    let mut check = genuine.clone();
    sign(&mut check);
    assert_eq!(
        check.signature, genuine.signature,
        "the derivation in docs/deploy.md does not reproduce berth's signature"
    );

    let fresh = |image: &str| {
        let mut e = genuine.clone();
        e.id = ulid::Ulid::new().to_string();
        e.image = image.to_string();
        e.tag = image.rsplit(':').next().map(str::to_string);
        e
    };
    let future_id = || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let ten_years = Duration::from_secs(3650 * 86400);
        ulid::Ulid::from_parts((now + ten_years).as_millis() as u64, 1).to_string()
    };
    let evil = "evil.example/attacker/miner:1";
    let mut forged: Vec<(&str, DeployEvent)> = Vec::new();
    let mut e = fresh(&format!("{REPO}:1"));
    e.signature = None;
    forged.push(("the event is not signed", e));
    let mut e = fresh(evil);
    e.signature = Some(sig.clone());
    forged.push(("signature is not this installation", e));
    let mut e = fresh(&format!("{REPO}:1"));
    e.signature = Some("0".repeat(64));
    forged.push(("signature is not this installation", e));
    let mut e = fresh(&format!("{REPO}:1"));
    e.instance = None;
    sign(&mut e);
    forged.push(("names no installation", e));
    let mut e = fresh(evil);
    sign(&mut e);
    forged.push(("is not the service's", e));
    let mut e = fresh(&format!("{REPO}:1"));
    e.id = future_id();
    e.signature = None;
    forged.push(("the event is not signed", e));
    let mut e = fresh(&format!("{REPO}:1"));
    e.id = future_id();
    sign(&mut e);
    forged.push(("in the future", e));
    let mut other = fresh(&format!("{REPO}:1"));
    other.instance = Some("another-installation".into());
    sign(&mut other);
    forged.push(("another installation; ignored", other));

    // Published with a bare client on core NATS: the stream captures the subject all the same.
    let client = async_nats::connect(stack.nats_url()).await.unwrap();
    for (_, e) in &forged {
        client
            .publish(e.subject(), serde_json::to_vec(e).unwrap().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();

    // Each one is logged by id with its reason.
    for (reason, e) in &forged {
        let what = format!("berth to log the refusal of {} ({reason})", e.id);
        let id = e.id.clone();
        eventually(b, CONVERGE, &what, || {
            let id = id.clone();
            async move {
                let log = b.log_text();
                log.lines()
                    .find(|l| l.contains(&id) && l.contains(reason))
                    .map(|_| ())
                    .ok_or_else(|| "not logged yet".to_string())
            }
        })
        .await;
    }
    let log = b.log_text();
    assert!(
        !log.contains(&deploy_key) && !log.contains(&sig),
        "a key or signature reached the log"
    );
    let after = service(b, &name).await;
    assert_eq!(
        after["spec"], before["spec"],
        "a forged event changed the spec"
    );
    // Not resourceVersion: it also moves with the controller's status writes, which go on while
    // the forged events are refused. What a deploy would change is the generation and the
    // deploy annotations.
    assert_eq!(
        after["metadata"]["generation"],
        before["metadata"]["generation"]
    );
    assert_eq!(
        after["metadata"]["annotations"],
        before["metadata"]["annotations"]
    );

    // A genuine deploy still lands, so the future id froze nothing.
    let (code, v) = post(&url, &[], r#"{"tag":"1"}"#).await;
    assert_eq!(code, 202, "{v}\n{}", b.log_text());
    eventually(
        b,
        CONVERGE,
        "the webhook deploy after the forgeries",
        || async move {
            let s = service(b2, n2).await;
            (s["spec"]["image"] == IMAGE_1)
                .then_some(())
                .ok_or_else(|| s["spec"].to_string())
        },
    )
    .await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
