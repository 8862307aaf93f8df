//! End-to-end tests of a Service's dependencies — Secrets, Configs, Volumes and Networks — against
//! the real Swarm engine: what the running containers see (read by exec-ing into them), what the
//! engine holds (inspected with bollard, never through berth), and what berth refuses or never shows.
//!
//! Rotation and waiting-for-a-dependency run once with the embedded bus and once with a real
//! nats-server; the rest run with the embedded bus only. Each test names every object after its own
//! `prefix(..)` and declares its `Cleanup` guard before the stack, so berth stops before the
//! leftovers are removed (locals drop in reverse order). Nothing here assumes an empty engine.

use berth_api_types::names::{labels, paths};
use berth_api_types::Kind;
use berth_e2e::containers::{exec, read_file, running_containers};
use berth_e2e::{
    condition, docker, eventually, manifest, on_both_buses, on_every_store, prefix, Berth, Bus,
    Cleanup, Docker, Stack,
};
use bollard::models::Service as SwarmService;
use bollard::query_parameters::{InspectNetworkOptions, ListConfigsOptions, ListSecretsOptions};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "berth-test/busybox:1";
/// Generous bound for convergence on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(45);

// ---------------------------------------------------------------------------------------------
// Manifests

/// A Service that sleeps and stops fast; `extra` is more of its spec, each line indented by two.
fn service_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {IMAGE}\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n{extra}"
    )
}

/// A Secret or Config with one key in `stringData` (a single-line value).
fn data_yaml(kind: &str, name: &str, key: &str, value: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n  stringData:\n    {key}: \"{value}\"\n"
    )
}

/// A Config holding a small ini file (a multi-line value, as a block scalar).
fn ini_config_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Config\nmetadata:\n  name: {name}\nspec:\n  stringData:\n    app.ini: |\n      [server]\n      port = {port}\n"
    )
}

fn ini_text(port: u16) -> String {
    format!("[server]\nport = {port}\n")
}

fn volume_yaml(name: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Volume\nmetadata:\n  name: {name}\nspec:\n  driver: local\n  labels:\n    backup: hourly\n"
    )
}

fn network_yaml(name: &str, encrypted: Option<bool>) -> String {
    let spec = match encrypted {
        Some(e) => format!("spec:\n  encrypted: {e}\n"),
        None => "spec: {}\n".to_string(),
    };
    format!("apiVersion: berth/v1\nkind: Network\nmetadata:\n  name: {name}\n{spec}")
}

// ---------------------------------------------------------------------------------------------
// berth side

/// Waits until the Service reports 1/1 running, `Ready=True` and has observed its generation.
async fn wait_ready(b: &Berth, name: &str) -> Value {
    let what = format!("service/{name} Ready with 1/1 running");
    eventually(b, CONVERGE, &what, || async move {
        let o = b
            .object(Kind::Service, name)
            .await
            .ok_or("object not found")?;
        let generation = o["metadata"]["generation"].as_u64();
        let st = &o["status"];
        let ready = condition(&o, "Ready").is_some_and(|c| c["status"] == "True");
        if generation.is_some()
            && st["observedGeneration"].as_u64() == generation
            && st["runningReplicas"].as_u64() == Some(1)
            && ready
        {
            Ok(o)
        } else {
            Err(format!("generation {generation:?}, status {st}"))
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Engine side (bollard)

async fn swarm_service(d: &Docker, name: &str) -> Option<SwarmService> {
    match d.inspect_service(name, None).await {
        Ok(s) => Some(s),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => None,
        Err(e) => panic!("e2e: inspecting Swarm service {name}: {e}"),
    }
}

/// The Swarm network IDs a service's tasks join.
fn network_targets(s: &SwarmService) -> Vec<String> {
    s.spec
        .as_ref()
        .and_then(|sp| sp.task_template.as_ref())
        .and_then(|t| t.networks.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|n| n.target.clone())
        .collect()
}

/// Waits until the service's one running container holds `want` at `path`; returns its ID.
async fn wait_file(b: &Berth, d: &Docker, service: &str, path: &str, want: &str) -> String {
    let what = format!("{path} in the running task of {service} to read {want:?}");
    eventually(b, CONVERGE, &what, || async move {
        let (container, text) = read_file(d, service, path).await?;
        if text == want {
            Ok(container)
        } else {
            Err(format!("container {} reads {text:?}", &container[..12]))
        }
    })
    .await
}

/// A Swarm secret or config as the engine lists it.
#[derive(Debug, Clone)]
struct SwarmFile {
    id: String,
    name: String,
    labels: HashMap<String, String>,
}

impl SwarmFile {
    fn new(
        id: Option<String>,
        name: Option<String>,
        labels: Option<HashMap<String, String>>,
    ) -> Self {
        SwarmFile {
            id: id.unwrap_or_default(),
            name: name.unwrap_or_default(),
            labels: labels.unwrap_or_default(),
        }
    }
}

/// The Swarm secrets or configs this installation materialised for `object`.
async fn swarm_files(d: &Docker, kind: Kind, instance: &str, object: &str) -> Vec<SwarmFile> {
    let filters = Some(HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}={instance}", labels::INSTANCE),
            format!("{}={object}", labels::NAME),
        ],
    )]));
    match kind {
        Kind::Secret => d
            .list_secrets(Some(ListSecretsOptions { filters }))
            .await
            .expect("e2e: listing Swarm secrets")
            .into_iter()
            .map(|s| {
                let spec = s.spec.unwrap_or_default();
                SwarmFile::new(s.id, spec.name, spec.labels)
            })
            .collect(),
        Kind::Config => d
            .list_configs(Some(ListConfigsOptions { filters }))
            .await
            .expect("e2e: listing Swarm configs")
            .into_iter()
            .map(|c| {
                let spec = c.spec.unwrap_or_default();
                SwarmFile::new(c.id, spec.name, spec.labels)
            })
            .collect(),
        other => panic!("no Swarm files for {other}"),
    }
}

fn names(files: &[SwarmFile]) -> Vec<&str> {
    files.iter().map(|f| f.name.as_str()).collect()
}

/// The secret and config IDs a Swarm service's spec mounts.
fn mounted_file_ids(s: &SwarmService) -> (Vec<String>, Vec<String>) {
    let c = s
        .spec
        .as_ref()
        .and_then(|sp| sp.task_template.as_ref())
        .and_then(|t| t.container_spec.as_ref());
    let secrets = c
        .and_then(|c| c.secrets.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|s| s.secret_id.clone())
        .collect();
    let configs = c
        .and_then(|c| c.configs.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|s| s.config_id.clone())
        .collect();
    (secrets, configs)
}

/// Waits until exactly one Swarm version of `object` is left and it is not `old`; returns its ID.
async fn wait_one_version(b: &Berth, d: &Docker, kind: Kind, object: &str, old: &str) -> String {
    let instance = b.instance.clone();
    let what = format!("the Swarm {kind} versions of {object} to be one new one");
    eventually(b, CONVERGE, &what, || {
        let instance = instance.clone();
        async move {
            let found = swarm_files(d, kind, &instance, object).await;
            match found.as_slice() {
                [f] if f.id != old => Ok(f.id.clone()),
                _ => Err(format!("{:?}", names(&found))),
            }
        }
    })
    .await
}

/// Removes named engine volumes on drop, retrying while the last task containers go away (the
/// installation's own teardown tries once, while they may still hold the volume).
struct VolumeGuard(Vec<String>);

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for v in &self.0 {
            loop {
                let exists = Command::new("docker")
                    .args(["volume", "inspect", v])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !exists || Instant::now() > deadline {
                    break;
                }
                let _ = Command::new("docker")
                    .args(["volume", "rm", v])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Rotation: a new Secret or Config value reaches the running task with no manual restart, and
//    the Swarm object holding the old value is removed.

async fn rotation(bus: Bus) {
    let p = prefix("rotate");
    let secret = format!("{p}-pw");
    // The longest name berth accepts (63): its Swarm names must still fit the engine's 64.
    let config = format!("{p}-ini-{}", "x".repeat(63 - p.len() - 5));
    assert_eq!(config.len(), 63);
    let svc = format!("{p}-app");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let d = docker().await;

    let a = format!("alpha-{}", ulid::Ulid::new());
    b.apply(&data_yaml("Secret", &secret, "password", &a));
    b.apply(&ini_config_yaml(&config, 8080));
    let service = service_yaml(
        &svc,
        &format!(
            "  secrets:\n    - name: {secret}\n      target: app_pw\n  configs:\n    - name: {config}\n      target: /etc/app.ini\n"
        ),
    );
    b.apply(&service);
    wait_ready(b, &svc).await;
    let first = wait_file(b, &d, &svc, "/run/secrets/app_pw", &a).await;
    let (c, ini) = read_file(&d, &svc, "/etc/app.ini").await.expect("read ini");
    assert_eq!(
        (c.as_str(), ini.as_str()),
        (first.as_str(), ini_text(8080).as_str())
    );

    // What Swarm holds: one secret and one config, labelled as this installation's, mounted.
    let secrets = swarm_files(&d, Kind::Secret, &b.instance, &secret).await;
    assert_eq!(
        secrets.len(),
        1,
        "one Swarm secret for {secret}: {secrets:?}"
    );
    let SwarmFile {
        id: old_secret,
        name: old_name,
        labels: l,
    } = secrets[0].clone();
    assert!(old_name.starts_with(&format!("{secret}-")), "{old_name}");
    assert_eq!(
        old_name.len(),
        secret.len() + 13,
        "`<name>-<12 hex>`: {old_name}"
    );
    assert_eq!(l.get(labels::KIND).map(String::as_str), Some("secret"));
    assert_eq!(l.get(labels::KEY).map(String::as_str), Some("password"));
    assert_eq!(
        l.get(labels::MANAGED_BY).map(String::as_str),
        Some(labels::MANAGED_BY_VALUE)
    );
    let configs = swarm_files(&d, Kind::Config, &b.instance, &config).await;
    assert_eq!(
        configs.len(),
        1,
        "one Swarm config for {config}: {configs:?}"
    );
    let old_config = configs[0].id.clone();
    assert_eq!(
        configs[0].labels.get(labels::KIND).map(String::as_str),
        Some("config")
    );
    assert_eq!(configs[0].labels.get(labels::NAME), Some(&config));
    assert!(configs[0].name.len() <= 64, "{configs:?}");
    let s = swarm_service(&d, &svc).await.expect("Swarm service");
    assert_eq!(
        mounted_file_ids(&s),
        (vec![old_secret.clone()], vec![old_config.clone()])
    );

    // Rotate the Secret; the Service manifest is not touched.
    let bval = format!("bravo-{}", ulid::Ulid::new());
    let out = b.apply(&data_yaml("Secret", &secret, "password", &bval));
    assert!(
        out.contains(&format!("secret/{secret} configured")),
        "{out}"
    );
    let second = wait_file(b, &d, &svc, "/run/secrets/app_pw", &bval).await;
    assert_ne!(second, first, "a new value means a new task");
    let new_secret = wait_one_version(b, &d, Kind::Secret, &secret, &old_secret).await;
    let s = swarm_service(&d, &svc).await.expect("Swarm service");
    assert_eq!(
        mounted_file_ids(&s),
        (vec![new_secret.clone()], vec![old_config.clone()])
    );
    let (_, ini) = read_file(&d, &svc, "/etc/app.ini").await.expect("read ini");
    assert_eq!(
        ini,
        ini_text(8080),
        "the config is untouched by a secret rotation"
    );

    // Rotate the Config the same way.
    b.apply(&ini_config_yaml(&config, 9090));
    let third = wait_file(b, &d, &svc, "/etc/app.ini", &ini_text(9090)).await;
    assert_ne!(third, second);
    let new_config = wait_one_version(b, &d, Kind::Config, &config, &old_config).await;
    let (_, pw) = read_file(&d, &svc, "/run/secrets/app_pw")
        .await
        .expect("read secret");
    assert_eq!(pw, bval);
    let s = swarm_service(&d, &svc).await.expect("Swarm service");
    assert_eq!(mounted_file_ids(&s), (vec![new_secret], vec![new_config]));

    // Nobody re-applied the Service: it is still at generation 1, and Ready again.
    let obj = wait_ready(b, &svc).await;
    assert_eq!(obj["metadata"]["generation"], 1, "{obj}");
}

on_every_store!(rotation);

// ---------------------------------------------------------------------------------------------
// 4. A Service naming a Secret that does not exist waits for it, then converges by itself.

async fn waits_for_missing_secret(bus: Bus) {
    let p = prefix("waitdep");
    let secret = format!("{p}-token");
    let svc = format!("{p}-app");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let d = docker().await;

    b.apply(&service_yaml(
        &svc,
        &format!("  secrets:\n    - name: {secret}\n      target: token\n"),
    ));
    let waiting = eventually(b, CONVERGE, "Ready=False WaitingForDependencies", || {
        let svc = svc.clone();
        async move {
            let o = b.object(Kind::Service, &svc).await.ok_or("not found")?;
            let c = condition(&o, "Ready").ok_or("no Ready condition yet")?;
            if c["status"] == "False" && c["reason"] == "WaitingForDependencies" {
                Ok(o)
            } else {
                Err(c.to_string())
            }
        }
    })
    .await;
    let ready = condition(&waiting, "Ready").expect("Ready");
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("Secret `{secret}`")),
        "the message names the secret: {ready}"
    );
    assert_eq!(waiting["status"]["observedGeneration"], 1, "{waiting}");
    assert!(
        swarm_service(&d, &svc).await.is_none(),
        "no Swarm service while waiting"
    );
    // Still nothing a moment later: waiting is not a hot retry that creates something half-made.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(swarm_service(&d, &svc).await.is_none());
    assert!(swarm_files(&d, Kind::Secret, &b.instance, &secret)
        .await
        .is_empty());

    // The Secret appears; the Service converges without being applied again.
    let value = format!("tok-{}", ulid::Ulid::new());
    b.apply(&data_yaml("Secret", &secret, "value", &value));
    let obj = wait_ready(b, &svc).await;
    assert_eq!(obj["metadata"]["generation"], 1, "{obj}");
    wait_file(b, &d, &svc, "/run/secrets/token", &value).await;
    let degraded = condition(&obj, "Degraded").expect("Degraded condition");
    assert_eq!(degraded["status"], "False", "{obj}");
}

on_both_buses!(waits_for_missing_secret);

// ---------------------------------------------------------------------------------------------
// 2. A named volume's data survives an update that replaces the task; status lists what is not
//    backed (tmpfs, anonymous volumes) and not the named volume.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_volume_survives_update() {
    let p = prefix("vol");
    let vol = format!("{p}-data");
    let svc = format!("{p}-app");
    let _volumes = VolumeGuard(vec![vol.clone()]);
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let d = docker().await;

    let mounts = format!(
        "  volumes:\n    - volume: {vol}\n      target: /data\n    - target: /scratch\n      tmpfs: true\n      size: 8Mi\n    - target: /anon\n"
    );
    b.apply(&volume_yaml(&vol));
    b.apply(&service_yaml(
        &svc,
        &format!("  env:\n    - name: ROUND\n      value: one\n{mounts}"),
    ));
    let obj = wait_ready(b, &svc).await;
    assert_eq!(
        obj["status"]["unbackedMounts"],
        serde_json::json!(["/scratch (tmpfs)", "/anon (anonymous volume)"]),
        "{obj}"
    );

    let running = running_containers(&d, &svc).await;
    assert_eq!(running.len(), 1, "{running:?}");
    let first = running[0].clone();
    let (code, _) = exec(&d, &first, &["sh", "-c", "echo keep > /data/f"])
        .await
        .expect("write into the volume");
    assert_eq!(code, 0);

    // The engine created the volume from the Volume's spec, with berth's labels beside its own.
    let v = d.inspect_volume(&vol).await.expect("e2e: the named volume");
    assert_eq!(v.driver, "local");
    let l = &v.labels;
    assert_eq!(l.get(labels::INSTANCE), Some(&b.instance), "{l:?}");
    assert_eq!(
        l.get(labels::KIND).map(String::as_str),
        Some("volume"),
        "{l:?}"
    );
    assert_eq!(l.get(labels::NAME), Some(&vol), "{l:?}");
    assert_eq!(
        l.get(labels::MANAGED_BY).map(String::as_str),
        Some(labels::MANAGED_BY_VALUE)
    );
    assert_eq!(l.get("backup").map(String::as_str), Some("hourly"), "{l:?}");

    // A changed env var forces a new task; the data is still there.
    b.apply(&service_yaml(
        &svc,
        &format!("  env:\n    - name: ROUND\n      value: two\n{mounts}"),
    ));
    let obj = wait_ready(b, &svc).await;
    assert_eq!(obj["metadata"]["generation"], 2);
    // Ready for generation 2 may still be reported while the old task runs (the rolling update
    // replaces it next): wait for the new task, and only then look at what it holds.
    let second = eventually(
        b,
        CONVERGE,
        "the generation-2 task to replace the first",
        || {
            let (d, svc, first) = (&d, &svc, &first);
            async move {
                let running = running_containers(d, svc).await;
                match running.as_slice() {
                    [c] if c != first => Ok(c.clone()),
                    _ => Err(format!("running containers {running:?} (first: {first})")),
                }
            }
        },
    )
    .await;
    let (c, data) = read_file(&d, &svc, "/data/f").await.expect("read /data/f");
    assert_eq!(
        (c.as_str(), data.as_str()),
        (second.as_str(), "keep\n"),
        "the new task sees the data the first one wrote"
    );
    let (_, env) = exec(&d, &second, &["sh", "-c", "echo $ROUND"])
        .await
        .expect("env");
    assert_eq!(env, "two\n", "the new task runs the new spec");
    assert_eq!(
        obj["status"]["unbackedMounts"],
        serde_json::json!(["/scratch (tmpfs)", "/anon (anonymous volume)"])
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Networks are encrypted Swarm overlays unless opted out; services join what they list, or the
//    default network when they list nothing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_are_encrypted_overlays() {
    let p = prefix("net");
    let secure = format!("{p}-backend");
    let plain = format!("{p}-plain");
    let listed = format!("{p}-api");
    let unlisted = format!("{p}-worker");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let d = docker().await;

    b.apply(&network_yaml(&secure, None));
    b.apply(&network_yaml(&plain, Some(false)));
    b.apply(&service_yaml(
        &listed,
        &format!("  networks:\n    - {secure}\n"),
    ));
    b.apply(&service_yaml(&unlisted, ""));
    wait_ready(b, &listed).await;
    wait_ready(b, &unlisted).await;

    let mut ids = HashMap::new();
    for (name, encrypted) in [
        (b.default_network.as_str(), true),
        (secure.as_str(), true),
        (plain.as_str(), false),
    ] {
        let d = &d;
        let n = eventually(
            b,
            CONVERGE,
            &format!("network {name} allocated"),
            || async move {
                match d.inspect_network(name, None::<InspectNetworkOptions>).await {
                    Ok(n) if n.driver.as_deref().is_some_and(|d| !d.is_empty()) => Ok(n),
                    Ok(n) => Err(format!("not allocated yet: {n:?}")),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
        assert_eq!(n.name.as_deref(), Some(name));
        assert_eq!(n.driver.as_deref(), Some("overlay"), "{name}: {n:?}");
        assert_eq!(n.scope.as_deref(), Some("swarm"), "{name}: {n:?}");
        let options = n.options.clone().unwrap_or_default();
        assert_eq!(
            options.contains_key("encrypted"),
            encrypted,
            "{name}: options {options:?}"
        );
        let l = n.labels.clone().unwrap_or_default();
        assert_eq!(l.get(labels::INSTANCE), Some(&b.instance), "{name}: {l:?}");
        assert_eq!(l.get(labels::KIND).map(String::as_str), Some("network"));
        ids.insert(name.to_string(), n.id.clone().expect("network id"));
    }

    let s = swarm_service(&d, &listed).await.expect("Swarm service");
    assert_eq!(
        network_targets(&s),
        vec![ids[&secure].clone()],
        "{listed} joins only the network it lists (default is {})",
        ids[&b.default_network]
    );
    let s = swarm_service(&d, &unlisted).await.expect("Swarm service");
    assert_eq!(
        network_targets(&s),
        vec![ids[&b.default_network].clone()],
        "{unlisted} lists no networks: it joins the default one"
    );
    // What berth reports matches the engine.
    let n = b
        .object(Kind::Network, &plain)
        .await
        .expect("Network object");
    assert_eq!(n["spec"]["encrypted"], false, "{n}");
}

// ---------------------------------------------------------------------------------------------
// 5. A Secret's value is nowhere berth writes or answers: not in its data directory, its log, any
//    CLI output or any API response (only the `/data` subresource, for controllers, carries it).

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Standard base64 with padding (the form berth and the engine use).
fn b64(v: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in v.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &byte)| {
            acc | (u32::from(byte) << (16 - 8 * i))
        });
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_value_is_never_shown_or_stored_in_clear() {
    let p = prefix("noleak");
    let secret = format!("{p}-db");
    let svc = format!("{p}-app");
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let d = docker().await;

    let v1 = format!("s3cr3t-{}", ulid::Ulid::new());
    let v2 = format!("s3cr3t-{}", ulid::Ulid::new());
    // (what, text) of everything berth printed or answered.
    let mut seen: Vec<(String, String)> = Vec::new();
    let cli = |seen: &mut Vec<(String, String)>, args: &[&str]| -> String {
        let out = b.cli(args);
        assert!(
            out.success,
            "`berth {}` failed: {}",
            args.join(" "),
            out.stderr
        );
        seen.push((format!("berth {}", args.join(" ")), out.stdout.clone()));
        seen.push((format!("berth {} (stderr)", args.join(" ")), out.stderr));
        out.stdout
    };

    // A positive control: a Config's value is stored and shown in clear, so the searches below
    // must find it; otherwise finding no secret would prove nothing.
    let control = format!("visible-{}", ulid::Ulid::new());
    let config = data_yaml("Config", &format!("{p}-control"), "note", &control);
    let (_dir0, file0) = manifest("config.yaml", &config);
    cli(&mut seen, &["apply", "-f", file0.to_str().unwrap()]);
    let shown = cli(
        &mut seen,
        &["get", "config", &format!("{p}-control"), "-o", "json"],
    );
    assert!(shown.contains(&control), "{shown}");

    // Create: the Secret through the CLI, then the same again through the API's apply.
    let secret_v1 = data_yaml("Secret", &secret, "password", &v1);
    let (_dir, file) = manifest("secret.yaml", &secret_v1);
    cli(&mut seen, &["apply", "-f", file.to_str().unwrap()]);
    let obj = serde_json::json!({
        "apiVersion": "berth/v1", "kind": "Secret", "metadata": {"name": secret},
        "spec": {"stringData": {"password": v1}},
    });
    let (code, text) = b
        .api_raw(
            "POST",
            paths::APPLY,
            Some(&serde_json::json!({ "items": [obj] })),
        )
        .await;
    assert_eq!(code, 200, "{text}");
    seen.push(("POST apply".into(), text));
    let (_dir2, file2) = manifest(
        "svc.yaml",
        &service_yaml(
            &svc,
            &format!("  secrets:\n    - name: {secret}\n      target: db_password\n"),
        ),
    );
    cli(&mut seen, &["apply", "-f", file2.to_str().unwrap()]);
    wait_ready(b, &svc).await;
    // The value did reach the container (so the test's value is the one in use).
    wait_file(b, &d, &svc, "/run/secrets/db_password", &v1).await;

    // The redacted view: keys, sizes, hashes.
    let json = cli(&mut seen, &["get", "secret", &secret, "-o", "json"]);
    let got: Value = serde_json::from_str(&json).expect("get -o json");
    let spec = got["spec"].as_object().expect("spec");
    assert_eq!(spec.keys().collect::<Vec<_>>(), ["redacted"], "{got}");
    assert_eq!(
        got["spec"]["redacted"]["password"]["size"],
        v1.len(),
        "{got}"
    );
    // A keyed digest (only the API server can compute it), not a plain SHA-256 of the value.
    let digest = got["spec"]["redacted"]["password"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{got}"
    );
    {
        use sha2::Digest;
        assert_ne!(
            digest,
            hex::encode(sha2::Sha256::digest(v1.as_bytes())),
            "the redacted view shows a plain SHA-256 of the value"
        );
    }
    assert!(got["spec"]["redacted"]["password"].get("sha256").is_none());

    let reads = |seen: &mut Vec<(String, String)>| {
        for args in [
            vec!["get", "secret", &secret, "-o", "yaml"],
            vec!["get", "secret", &secret, "-o", "json"],
            vec!["get", "secret", &secret],
            vec!["describe", "secret", &secret],
            vec!["get", "secrets"],
            vec!["get", "secrets", "-o", "json"],
            vec!["get", "secrets", "-o", "yaml"],
            vec!["get", "services", "-o", "json"],
            vec!["get", "service", &svc, "-o", "yaml"],
            vec!["describe", "service", &svc],
            vec!["events", "-o", "json"],
            vec!["events", "-o", "yaml"],
            vec!["events"],
        ] {
            cli(seen, &args);
        }
    };
    let api_reads = |secret: String, svc: String| async move {
        let mut out = Vec::new();
        for path in [
            paths::object(Kind::Secret, &secret),
            paths::collection(Kind::Secret),
            paths::status(Kind::Secret, &secret),
            paths::object(Kind::Service, &svc),
            paths::collection(Kind::Service),
            paths::EVENTS.to_string(),
            format!("{}?kind=secret&name={secret}", paths::EVENTS),
        ] {
            let (code, text) = b.api_raw("GET", &path, None).await;
            assert_eq!(code, 200, "GET {path}: {text}");
            out.push((format!("GET {path}"), text));
        }
        out
    };
    reads(&mut seen);
    seen.extend(api_reads(secret.clone(), svc.clone()).await);

    // Rotate, then read everything again.
    let (_dir3, file3) = manifest(
        "secret.yaml",
        &data_yaml("Secret", &secret, "password", &v2),
    );
    cli(&mut seen, &["apply", "-f", file3.to_str().unwrap()]);
    wait_file(b, &d, &svc, "/run/secrets/db_password", &v2).await;
    wait_ready(b, &svc).await;
    reads(&mut seen);
    seen.extend(api_reads(secret.clone(), svc.clone()).await);

    // Delete: the Service through the CLI, the Secret through the API (its response is the object).
    cli(&mut seen, &["delete", "service", &svc]);
    let (code, text) = b
        .api_raw("DELETE", &paths::object(Kind::Secret, &secret), None)
        .await;
    assert_eq!(code, 200, "{text}");
    seen.push(("DELETE secret".into(), text));
    cli(&mut seen, &["events", "-o", "json"]);
    let (_, text) = b.api_raw("GET", paths::EVENTS, None).await;
    seen.push(("GET events after delete".into(), text));
    eventually(b, CONVERGE, "the Swarm service to be removed", || {
        let d = d.clone();
        let svc = svc.clone();
        async move {
            match swarm_service(&d, &svc).await {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        }
    })
    .await;

    let needles: Vec<(String, String)> = [&v1, &v2]
        .iter()
        .flat_map(|v| [(v.to_string(), "value"), (b64(v), "base64")])
        .map(|(n, how)| (n, how.to_string()))
        .collect();
    seen.push(("berth up log".into(), b.log_text()));
    for (what, text) in &seen {
        for (needle, how) in &needles {
            assert!(
                !text.contains(needle.as_str()),
                "{what} shows the secret ({how}):\n{text}"
            );
        }
    }
    let files = files_under(&b.data_dir);
    let mut control_found = false;
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        control_found |= contains(&bytes, control.as_bytes());
        for (needle, how) in &needles {
            assert!(
                !contains(&bytes, needle.as_bytes()),
                "{} holds the secret ({how})",
                f.display()
            );
        }
    }
    // The search can see stored values at all: a Config (stored in clear) is found.
    assert!(
        control_found,
        "the Config's value is in none of {files:?}: the search of the data directory is blind"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. A Secret, Config, Volume or Network a Service uses cannot be deleted; once the Service is
//    gone it can, and the Secret's Swarm versions go with it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_dependency_in_use_is_refused() {
    let p = prefix("inuse");
    let secret = format!("{p}-pw");
    let config = format!("{p}-ini");
    let vol = format!("{p}-data");
    let net = format!("{p}-backend");
    let svc = format!("{p}-app");
    let _volumes = VolumeGuard(vec![vol.clone()]);
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(Bus::Embedded);
    let b = &stack.berth;
    let d = docker().await;

    let all = [
        data_yaml("Secret", &secret, "password", "hunter2"),
        ini_config_yaml(&config, 8080),
        volume_yaml(&vol),
        network_yaml(&net, None),
        service_yaml(
            &svc,
            &format!(
                "  secrets:\n    - name: {secret}\n  configs:\n    - name: {config}\n      target: /etc/app.ini\n  volumes:\n    - volume: {vol}\n      target: /data\n  networks:\n    - {net}\n"
            ),
        ),
    ]
    .join("---\n");
    b.apply(&all);
    wait_ready(b, &svc).await;
    wait_file(b, &d, &svc, &format!("/run/secrets/{secret}"), "hunter2").await;
    assert_eq!(
        swarm_files(&d, Kind::Secret, &b.instance, &secret)
            .await
            .len(),
        1
    );

    // The CLI: non-zero exit, and the message names the Service.
    let out = b.cli(&["delete", "secret", &secret]);
    assert!(!out.success, "delete of a used Secret must fail: {out:?}");
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains(&format!("service/{svc}")),
        "stderr names the service: {}",
        out.stderr
    );
    assert!(b.object(Kind::Secret, &secret).await.is_some(), "kept");

    // The API: 409 InUse for every dependency kind, and the object stays.
    for kind in [Kind::Secret, Kind::Config, Kind::Volume, Kind::Network] {
        let name = match kind {
            Kind::Secret => &secret,
            Kind::Config => &config,
            Kind::Volume => &vol,
            _ => &net,
        };
        let (code, err) = b.api_delete(&paths::object(kind, name)).await;
        assert_eq!(code, 409, "DELETE {kind}/{name}: {err}");
        assert_eq!(err["reason"], "InUse", "{err}");
        assert!(
            err["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("service/{svc}"))),
            "{err}"
        );
        let (code, _) = b.api_get(&paths::object(kind, name)).await;
        assert_eq!(code, 200, "{kind}/{name} is kept after a refused delete");
    }
    // Nothing changed in the engine either.
    assert!(swarm_service(&d, &svc).await.is_some());
    assert_eq!(
        swarm_files(&d, Kind::Secret, &b.instance, &secret)
            .await
            .len(),
        1
    );

    // Without the Service, the deletes go through and the Swarm versions are removed.
    b.cli_ok(&["delete", "service", &svc]);
    let out = b.cli_ok(&["delete", "secret", &secret]);
    assert!(out.contains(&format!("secret/{secret} deleted")), "{out}");
    let out = b.cli_ok(&["delete", "config", &config]);
    assert!(out.contains(&format!("config/{config} deleted")), "{out}");
    assert!(b.object(Kind::Secret, &secret).await.is_none());
    let instance = b.instance.clone();
    eventually(
        b,
        CONVERGE,
        "the Secret's and Config's Swarm versions to go",
        || {
            let (d, instance, secret, config, svc) = (
                d.clone(),
                instance.clone(),
                secret.clone(),
                config.clone(),
                svc.clone(),
            );
            async move {
                let service = swarm_service(&d, &svc).await.is_some();
                let s = swarm_files(&d, Kind::Secret, &instance, &secret).await;
                let c = swarm_files(&d, Kind::Config, &instance, &config).await;
                if !service && s.is_empty() && c.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "service present: {service}, secrets {:?}, configs {:?}",
                        names(&s),
                        names(&c)
                    ))
                }
            }
        },
    )
    .await;
    b.cli_ok(&["delete", "volume", &vol]);
    b.cli_ok(&["delete", "network", &net]);
}
