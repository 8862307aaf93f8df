//! A control plane that survives losing a machine: three `berth api --store nats` servers on a
//! three-server NATS JetStream cluster (replicas 3), against the real Swarm engine. Clients and
//! controllers get every API server's URL and fail over.
//!
//! - kill -9 the API server a client talks to in the middle of a burst of applies: every apply
//!   is acknowledged (through the others), each is stored exactly once, and a controller that
//!   talked to the killed server keeps converging.
//! - stop one of the three NATS servers in the middle of a burst: nothing acknowledged is lost.
//! - `berth admin migrate-store` sled -> nats -> sled keeps everything (a full export compared).

use berth_api_types::names::paths;
use berth_api_types::Kind;
use berth_e2e::{
    berth_bin, condition, docker, eventually, prefix, swarm_replicas, Berth, Cleanup, NatsCluster,
};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bar: a write succeeds within this through the surviving servers.
const WRITE_BOUND: Duration = Duration::from_secs(10);

fn config_yaml(name: &str, i: usize) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Config\nmetadata:\n  name: {name}\nspec:\n  stringData:\n    n: \"{i}\"\n"
    )
}

/// What one apply of the burst got.
struct Applied {
    name: String,
    ok: bool,
    took: Duration,
    stderr: String,
}

/// Applies `n` Configs one after the other with the CLI, through `urls` (the failover list) and
/// `token`; `acked` counts the acknowledged ones as they come, for the test to strike mid-burst.
fn burst(
    urls: String,
    token: String,
    p: String,
    n: usize,
    acked: Arc<AtomicUsize>,
) -> Vec<Applied> {
    use std::io::Write;
    (0..n)
        .map(|i| {
            let name = format!("{p}-c{i}");
            let started = Instant::now();
            let mut child = std::process::Command::new(berth_bin())
                .args(["apply", "-f", "-"])
                .env("BERTH_URL", &urls)
                .env("BERTH_TOKEN", &token)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("e2e: cannot run berth");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(config_yaml(&name, i).as_bytes())
                .expect("write stdin");
            let out = child.wait_with_output().expect("berth output");
            if out.status.success() {
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Applied {
                name,
                ok: out.status.success(),
                took: started.elapsed(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        })
        .collect()
}

/// A burst of `n` applies through `via`'s URL list (in a thread), with `strike` done once 10 of
/// them are acknowledged: what each apply got.
async fn burst_struck(via: &Berth, p: &str, n: usize, strike: impl FnOnce()) -> Vec<Applied> {
    let acked = Arc::new(AtomicUsize::new(0));
    let thread = {
        let (urls, token, p, acked) = (
            via.client_urls(),
            via.token.clone(),
            p.to_string(),
            acked.clone(),
        );
        std::thread::spawn(move || burst(urls, token, p, n, acked))
    };
    while acked.load(Ordering::SeqCst) < 10 {
        assert!(
            !thread.is_finished(),
            "the burst ended before 10 applies were acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    strike();
    thread.join().expect("the burst thread")
}

/// Every apply was acknowledged, each within the bound; returns the names.
fn all_acknowledged(results: &[Applied], what: &str) -> Vec<String> {
    for r in results {
        assert!(r.ok, "{what}: apply of {} failed: {}", r.name, r.stderr);
        assert!(
            r.took < WRITE_BOUND,
            "{what}: apply of {} took {:?} (the bar is {WRITE_BOUND:?})",
            r.name,
            r.took
        );
    }
    let slowest = results.iter().map(|r| r.took).max().unwrap_or_default();
    eprintln!(
        "{what}: {} applies acknowledged, slowest {slowest:?}",
        results.len()
    );
    results.iter().map(|r| r.name.clone()).collect()
}

/// The names of the Configs with prefix `p`, as one API server lists them.
async fn config_names(b: &Berth, p: &str) -> Vec<String> {
    let (code, list) = b.api_get(&paths::collection(Kind::Config)).await;
    assert_eq!(code, 200, "list configs on {}: {list}", b.url());
    let mut names: Vec<String> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .filter(|n| n.starts_with(&format!("{p}-c")))
        .map(String::from)
        .collect();
    names.sort();
    names
}

/// How many `Applied` events the store recorded for each of `names`.
async fn applied_events(b: &Berth, names: &[String]) -> Vec<(String, usize)> {
    let (code, events) = b
        .api_get(&format!("{}?kind=config&limit=5000", paths::EVENTS))
        .await;
    assert_eq!(code, 200, "events: {events}");
    let events = events["items"].as_array().cloned().unwrap_or_default();
    names
        .iter()
        .map(|n| {
            let count = events
                .iter()
                .filter(|e| e["name"] == n.as_str() && e["type"] == "Applied")
                .count();
            (n.clone(), count)
        })
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The store's stream of a test: its own, on the shared cluster harness.
fn stream_of(p: &str) -> String {
    p.replace('-', "_")
}

/// `berth api --store nats` on `cluster`, on the test's own stream.
fn nats_store_api(cluster: &NatsCluster, p: &str, extra: &[&str]) -> Berth {
    let stream = stream_of(p);
    let mut args = vec!["--store", "nats", "--store-stream", &stream];
    args.extend_from_slice(extra);
    Berth::start_api_with(Some(cluster.urls()), &args)
}

/// Three API servers on one NATS store; `servers[0]`'s clients list the others after it.
fn three_api_servers(cluster: &NatsCluster, p: &str) -> Vec<Berth> {
    let first = nats_store_api(cluster, p, &[]);
    let second = first.start_replica();
    let third = first.start_replica();
    let mut servers = vec![first, second, third];
    let urls: Vec<String> = servers.iter().map(Berth::url).collect();
    for (i, s) in servers.iter_mut().enumerate() {
        s.peers = urls
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, u)| u.clone())
            .collect();
    }
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_api_server_loses_no_acknowledged_apply_and_controllers_converge() {
    let p = prefix("ha-kill");
    let _cleanup = Cleanup::new(&p);
    let cluster = NatsCluster::start();
    let mut servers = three_api_servers(&cluster, &p);
    let d = docker().await;
    // Controllers talk to the first server, which is about to die; they know the others.
    let _net = servers[0].start_controller("network");
    let _svc = servers[0].start_controller("service");

    let pid = servers[0].pid().expect("the first API server runs");
    // SIGKILL by pid: the burst borrows the server for its URLs meanwhile.
    let results = burst_struck(&servers[0], &p, 40, || unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    })
    .await;
    servers[0].kill9(); // reaps it
    let names = all_acknowledged(&results, "kill -9 of the API server");
    let after_kill = results.iter().skip(10).count();
    assert!(after_kill >= 20, "the kill came too late to prove anything");

    // Every acknowledged apply is there, once, on each surviving server.
    for s in &servers[1..] {
        assert_eq!(
            config_names(s, &p).await,
            sorted(names.clone()),
            "on {}",
            s.url()
        );
    }
    for (name, n) in applied_events(&servers[2], &names).await {
        assert_eq!(n, 1, "{name} was stored {n} times");
    }

    // The controllers lost their API server and go on through the others.
    let svc = format!("{p}-web");
    let yaml = format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {svc}\nspec:\n  image: berth-test/busybox:1\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n"
    );
    let out = servers[1].cli_in(&["apply", "-f", "-"], Some(&yaml));
    assert!(out.success, "apply through a survivor: {}", out.stderr);
    let obj = eventually(
        &servers[2],
        Duration::from_secs(60),
        "the Service Ready after the API server's death",
        || async {
            let (_, obj) = servers[2]
                .api_get(&paths::object(Kind::Service, &svc))
                .await;
            match condition(&obj, "Ready") {
                Some(c) if c["status"] == "True" => Ok(obj),
                other => Err(format!("Ready: {other:?}")),
            }
        },
    )
    .await;
    assert_eq!(obj["status"]["observedGeneration"], 1);
    assert_eq!(swarm_replicas(&d, &svc).await, Some(1));
    let out = servers[1].cli(&["delete", "service", &svc]);
    assert!(out.success, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_nats_server_mid_burst_loses_nothing_acknowledged() {
    let p = prefix("ha-nats");
    let _cleanup = Cleanup::new(&p);
    let mut cluster = NatsCluster::start();
    let servers = three_api_servers(&cluster, &p);

    let results = burst_struck(&servers[1], &p, 40, || cluster.stop(0)).await;
    let names = all_acknowledged(&results, "a NATS server stopped");
    for s in &servers {
        assert_eq!(
            config_names(s, &p).await,
            sorted(names.clone()),
            "on {}",
            s.url()
        );
    }
    // It comes back and catches up; the store still holds everything, once.
    cluster.start_node(0);
    let out = servers[0].cli_in(
        &["apply", "-f", "-"],
        Some(&config_yaml(&format!("{p}-c-after"), 0)),
    );
    assert!(out.success, "apply after the restart: {}", out.stderr);
    for (name, n) in applied_events(&servers[2], &names).await {
        assert_eq!(n, 1, "{name} was stored {n} times");
    }
    assert_eq!(config_names(&servers[0], &p).await.len(), names.len() + 1);
}

/// Everything a team would miss after a migration: every kind's objects as the API shows them,
/// webhooks, tokens, the audit trail and the event history.
fn export(b: &Berth) -> Value {
    let mut all = serde_json::Map::new();
    let cli_json = |args: &[&str]| -> Value {
        let out = b.cli(args);
        assert!(out.success, "{args:?}: {}", out.stderr);
        // One document, or one per line (events, audit).
        serde_json::from_str(&out.stdout).unwrap_or_else(|_| {
            Value::Array(
                out.stdout
                    .lines()
                    .map(|l| {
                        serde_json::from_str(l)
                            .unwrap_or_else(|e| panic!("{args:?} is not JSON ({e}): {l}"))
                    })
                    .collect(),
            )
        })
    };
    for kind in Kind::ALL {
        let plural = kind.plural();
        all.insert(plural.to_string(), cli_json(&["get", plural, "-o", "json"]));
    }
    all.insert(
        "webhooks".into(),
        cli_json(&["webhook", "list", "-o", "json"]),
    );
    all.insert("tokens".into(), cli_json(&["token", "list", "-o", "json"]));
    all.insert("audit".into(), cli_json(&["audit", "-o", "json"]));
    all.insert(
        "events".into(),
        cli_json(&["events", "--limit", "1000", "-o", "json"]),
    );
    Value::Object(all)
}

fn migrate(b: &Berth, from: &str, to: &str, cluster: &NatsCluster, stream: &str) -> String {
    let out = std::process::Command::new(berth_bin())
        .args(["admin", "migrate-store", "--from", from, "--to", to])
        .arg("--data-dir")
        .arg(&b.data_dir)
        .args(["--nats", &cluster.urls(), "--store-stream", stream])
        .output()
        .expect("e2e: cannot run berth admin migrate-store");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate-store {from} -> {to}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("source and target agree"), "{stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_sled_to_nats_and_back_keeps_everything() {
    let p = prefix("ha-mig");
    let _cleanup = Cleanup::new(&p);
    let cluster = NatsCluster::start();
    let stream = stream_of(&p);

    let mut sled = Berth::start_api_with(None, &[]);
    let manifests = format!(
        "apiVersion: berth/v1\nkind: Secret\nmetadata:\n  name: {p}-db\nspec:\n  stringData:\n    password: hunter2\n---\n\
         apiVersion: berth/v1\nkind: Config\nmetadata:\n  name: {p}-cfg\n  labels: {{team: a}}\nspec:\n  stringData:\n    a.conf: x=1\n---\n\
         apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}-web\nspec:\n  image: berth-test/busybox:1\n  replicas: 0\n  secrets: [{{name: {p}-db}}]\n"
    );
    let out = sled.cli_in(&["apply", "-f", "-"], Some(&manifests));
    assert!(out.success, "{}", out.stderr);
    sled.cli_ok(&["webhook", "create", &format!("{p}-web"), "--signed"]);
    sled.cli_ok(&[
        "token",
        "create",
        "--role",
        "viewer",
        "--description",
        "auditor",
    ]);
    let before = export(&sled);
    assert!(before["secrets"].to_string().contains(&format!("{p}-db")));
    assert!(!before["secrets"].to_string().contains("hunter2"));
    let (data_dir, network) = (sled.data_dir.clone(), sled.default_network.clone());
    sled.stop();

    // sled -> nats: the same installation, served from NATS.
    let table = migrate(&sled, "sled", "nats", &cluster, &stream);
    eprintln!("{table}");
    let nats = Berth::start_api_on(
        &data_dir,
        &network,
        Some(cluster.urls()),
        &["--store", "nats", "--store-stream", &stream],
    );
    assert_eq!(
        export(&nats),
        before,
        "sled -> nats changed the installation"
    );
    assert!(nats.cli_ok(&["audit", "verify"]).contains("intact"));
    // The Secret's value is still there, and opens with the same key.
    let (code, data) = nats
        .api_get(&paths::data(Kind::Secret, &format!("{p}-db")))
        .await;
    assert_eq!(code, 200, "{data}");
    // That read is audited: the trail moves on, on the NATS store.
    let mid = export(&nats);
    let audit = |v: &Value| v["audit"]["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(audit(&mid).len(), audit(&before).len() + 1);
    assert_eq!(audit(&mid)[..audit(&before).len()], audit(&before)[..]);
    drop(nats);

    // nats -> sled, into a data directory whose old store is moved aside.
    std::fs::rename(data_dir.join("store"), data_dir.join("store.before")).unwrap();
    migrate(&sled, "nats", "sled", &cluster, &stream);
    let back = Berth::start_api_on(&data_dir, &network, None, &[]);
    assert_eq!(export(&back), mid, "nats -> sled changed the installation");
    assert!(back.cli_ok(&["audit", "verify"]).contains("intact"));

    // A target that holds anything is refused, and the source is left as it was.
    drop(back);
    let out = std::process::Command::new(berth_bin())
        .args(["admin", "migrate-store", "--from", "nats", "--to", "sled"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--nats", &cluster.urls(), "--store-stream", &stream])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The log does not grow forever: every `--store-compact-every` commits it becomes a snapshot
/// and is purged. A server started afterwards, and one restarted after a crash, load the
/// snapshot and every commit after it, and serve the whole store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_log_loads_into_new_and_restarted_servers() {
    let p = prefix("ha-snap");
    let _cleanup = Cleanup::new(&p);
    let cluster = NatsCluster::start();
    let stream = stream_of(&p);
    let first = nats_store_api(&cluster, &p, &["--store-compact-every", "40"]);
    let mut second = first.start_replica();
    let acked = Arc::new(AtomicUsize::new(0));
    let names = all_acknowledged(
        &burst(first.url(), first.token.clone(), p.clone(), 60, acked),
        "applies while compacting",
    );

    // The log was purged: its first message is past the first commits.
    let client = async_nats::connect(cluster.url(1)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let first_seq = eventually(&first, Duration::from_secs(30), "a compaction", || {
        let js = js.clone();
        let stream = stream.clone();
        async move {
            let info = js
                .get_stream(&stream)
                .await
                .map_err(|e| e.to_string())?
                .cached_info()
                .state
                .clone();
            if info.first_sequence > 40 {
                Ok(info.first_sequence)
            } else {
                Err(format!("log still starts at {}", info.first_sequence))
            }
        }
    })
    .await;
    eprintln!("the log now starts at {first_seq}");
    assert!(first.log_text().contains("compacted the store's log"));

    // A new server and a crashed-and-restarted one both hold everything.
    let third = first.start_replica();
    assert!(
        third.log_text().contains("loaded the store's snapshot"),
        "{}",
        third.log_text()
    );
    second.restart();
    for s in [&first, &second, &third] {
        assert_eq!(
            config_names(s, &p).await,
            sorted(names.clone()),
            "on {}",
            s.url()
        );
        assert!(s.cli_ok(&["audit", "verify"]).contains("intact"));
    }
    // And they go on together.
    let out = third.cli_in(
        &["apply", "-f", "-"],
        Some(&config_yaml(&format!("{p}-c-late"), 0)),
    );
    assert!(out.success, "{}", out.stderr);
    assert_eq!(config_names(&second, &p).await.len(), names.len() + 1);
}

/// Backups run on the NATS store as on sled (the snapshot reads the store through the same
/// interface), and an environment snapshot of a NATS installation restores into a fresh data
/// directory (on sled; `admin migrate-store` takes it back to NATS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_backup_of_the_nats_store_restores() {
    let p = prefix("ha-bk");
    let _cleanup = Cleanup::new(&p);
    let cluster = NatsCluster::start();
    let a = nats_store_api(&cluster, &p, &[]);
    let repo = a.backup_dir().join("repo");
    let manifests = format!(
        "apiVersion: berth/v1\nkind: Secret\nmetadata:\n  name: {p}-db\nspec:\n  stringData:\n    password: hunter2\n---\n\
         apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}-web\nspec:\n  image: berth-test/busybox:1\n  replicas: 0\n  secrets: [{{name: {p}-db}}]\n---\n\
         apiVersion: berth/v1\nkind: Backup\nmetadata:\n  name: {p}-dr\nspec:\n  schedule: \"0 0 1 1 *\"\n  repository:\n    path: {}\n",
        repo.display()
    );
    let out = a.cli_in(&["apply", "-f", "-"], Some(&manifests));
    assert!(out.success, "{}", out.stderr);
    let ran = a.cli_ok(&["backup", "run", &format!("{p}-dr")]);
    let id = ran
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no snapshot id in `{ran}`"))
        .to_string();
    let keep = tempfile::tempdir().unwrap();
    let key_file = keep.path().join("backup.key");
    std::fs::write(&key_file, a.cli_ok(&["backup", "key"]).trim()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fresh = keep.path().join("data");
    berth_e2e::restore_environment(&id, &fresh, &repo, &key_file, false);
    let b = Berth::start_api_on(&fresh, &a.default_network, None, &[]);
    assert_eq!(b.instance, a.instance, "the same installation");
    for path in [
        paths::object(Kind::Service, &format!("{p}-web")),
        paths::object(Kind::Secret, &format!("{p}-db")),
    ] {
        let (code_a, obj_a) = a.api_get(&path).await;
        let (code_b, obj_b) = b.api_get(&path).await;
        assert_eq!((code_a, code_b), (200, 200), "{path}: {obj_a} / {obj_b}");
        assert_eq!(obj_a["spec"], obj_b["spec"], "{path}");
    }
}

/// One commit is one NATS message: a change larger than the servers' `max_payload` (1 MB by
/// default) is refused whole, with what to do, and nothing of it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_big_for_one_message_is_refused_whole() {
    let p = prefix("ha-big");
    let _cleanup = Cleanup::new(&p);
    let cluster = NatsCluster::start();
    let a = nats_store_api(&cluster, &p, &[]);
    let big = "x".repeat(400_000);
    let docs: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "apiVersion: berth/v1\nkind: Config\nmetadata:\n  name: {p}-c{i}\nspec:\n  stringData:\n    blob: {big}\n"
            )
        })
        .collect();
    let out = a.cli_in(&["apply", "-f", "-"], Some(&docs.join("---\n")));
    assert!(!out.success, "a 1.2 MB commit was accepted");
    assert!(out.stderr.contains("max_payload"), "{}", out.stderr);
    assert!(
        config_names(&a, &p).await.is_empty(),
        "part of it was written"
    );
    // One at a time fits.
    let out = a.cli_in(&["apply", "-f", "-"], Some(&docs[0]));
    assert!(out.success, "{}", out.stderr);
    assert_eq!(config_names(&a, &p).await.len(), 1);
}
