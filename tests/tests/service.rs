//! End-to-end tests of the Service kind: `berth up` against the real Swarm engine, once with the
//! embedded bus and once with a real nats-server. Every scenario is an `async fn scenario(bus)`
//! with one `#[tokio::test]` wrapper per bus.
//!
//! Each test names every Swarm object after its own `prefix(..)` and declares its `Cleanup` guard
//! before the stack, so berth stops before the leftovers are removed (locals drop in reverse order).
//! Other tests and other berth instances share the Swarm: nothing here assumes an empty engine.

use berth_api_types::names::{labels, paths, subjects};
use berth_api_types::{Event, EventType, Kind};
use berth_e2e::{
    await_resync, condition, docker, eventually, manifest, on_both_buses, on_every_store, prefix,
    Berth, Bus, Cleanup, Docker, Stack,
};
use bollard::models::{Service as SwarmService, ServiceSpec, ServiceSpecMode, TaskSpec};
use bollard::query_parameters::{ListServicesOptions, UpdateServiceOptions};
use futures::StreamExt;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

const IMAGE: &str = "berth-test/busybox:1";
/// Generous bound for convergence on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Manifests

/// A Service that sleeps, stops fast (`init` + 1 s grace) and exercises env, labels and limits.
fn service_yaml(name: &str, replicas: u64) -> String {
    format!(
        r#"apiVersion: berth/v1
kind: Service
metadata:
  name: {name}
spec:
  image: {IMAGE}
  command: ["sleep", "100000"]
  init: true
  stopGracePeriod: 1s
  replicas: {replicas}
  env:
    - name: GREETING
      value: hello world
    - name: EMPTY
  labels:
    team: blue
    example.com/tier: backend
  resources:
    limits:
      cpus: 0.5
      memory: 64Mi
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Swarm side (always bollard, never CLI output)

async fn swarm_service(d: &Docker, name: &str) -> Option<SwarmService> {
    match d.inspect_service(name, None).await {
        Ok(s) => Some(s),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => None,
        Err(e) => panic!("e2e: inspecting Swarm service {name}: {e}"),
    }
}

/// Names of the Swarm services whose name starts with `prefix`.
async fn swarm_names(d: &Docker, prefix: &str) -> Vec<String> {
    let list = d
        .list_services(Some(ListServicesOptions {
            filters: Some(HashMap::from([(
                "name".to_string(),
                vec![prefix.to_string()],
            )])),
            ..Default::default()
        }))
        .await
        .expect("e2e: listing Swarm services");
    let mut names: Vec<String> = list
        .into_iter()
        .filter_map(|s| s.spec?.name)
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn spec_of(s: &SwarmService) -> &ServiceSpec {
    s.spec.as_ref().expect("Swarm service without a spec")
}

fn labels_of(s: &SwarmService) -> HashMap<String, String> {
    spec_of(s).labels.clone().unwrap_or_default()
}

fn replicas_of(s: &SwarmService) -> Option<i64> {
    spec_of(s).mode.as_ref()?.replicated.as_ref()?.replicas
}

fn version_of(s: &SwarmService) -> u64 {
    s.version
        .as_ref()
        .and_then(|v| v.index)
        .expect("Swarm service without a version")
}

fn task_of(s: &SwarmService) -> &TaskSpec {
    spec_of(s)
        .task_template
        .as_ref()
        .expect("Swarm service without a task template")
}

/// Waits until the Swarm service exists and satisfies `ok` (which explains itself on `Err`).
async fn wait_swarm<F>(b: &Berth, d: &Docker, name: &str, what: &str, ok: F) -> SwarmService
where
    F: Fn(&SwarmService) -> Result<(), String>,
{
    let ok = &ok;
    eventually(b, CONVERGE, what, || async move {
        let s = swarm_service(d, name)
            .await
            .ok_or_else(|| format!("no Swarm service `{name}`"))?;
        ok(&s).map(|()| s)
    })
    .await
}

/// Changes the replica count behind berth's back, as `docker service scale` would.
async fn scale_by_hand(d: &Docker, name: &str, replicas: i64) {
    let s = swarm_service(d, name).await.expect("service to scale");
    let mut spec = spec_of(&s).clone();
    spec.mode = Some(ServiceSpecMode {
        replicated: Some(bollard::models::ServiceSpecModeReplicated {
            replicas: Some(replicas),
        }),
        ..Default::default()
    });
    d.update_service(
        s.id.as_deref().expect("service id"),
        spec,
        UpdateServiceOptions {
            version: version_of(&s) as i32,
            ..Default::default()
        },
        None,
    )
    .await
    .expect("e2e: scaling the Swarm service by hand");
}

// ---------------------------------------------------------------------------------------------
// berth side

/// `berth get service NAME -o json`; `None` when the object does not exist.
fn get_service(b: &Berth, name: &str) -> Option<Value> {
    let out = b.cli(&["get", "service", name, "-o", "json"]);
    if out.success {
        Some(serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "e2e: `get -o json` printed invalid JSON ({e}):\n{}",
                out.stdout
            )
        }))
    } else {
        assert!(
            out.stderr.contains(&format!("Service `{name}` not found")),
            "e2e: `berth get service {name}` failed for another reason than not found: {}",
            out.stderr
        );
        assert_eq!(out.code, Some(1), "exit code of a failed get");
        None
    }
}

fn uid_of(obj: &Value) -> String {
    obj["metadata"]["uid"]
        .as_str()
        .expect("object without metadata.uid")
        .to_string()
}

/// Waits until `get -o json` shows `replicas` running out of `replicas` desired, `Ready=True` and
/// `status.observedGeneration == metadata.generation`; returns the object.
async fn wait_ready(b: &Berth, name: &str, replicas: u64) -> Value {
    let what = format!("service/{name} Ready with {replicas}/{replicas} running");
    eventually(b, CONVERGE, &what, || async move {
        let o = get_service(b, name).ok_or("object not found")?;
        let generation = o["metadata"]["generation"].as_u64();
        let st = &o["status"];
        let ready = condition(&o, "Ready").is_some_and(|c| c["status"] == "True");
        if generation.is_some()
            && st["observedGeneration"].as_u64() == generation
            && st["runningReplicas"].as_u64() == Some(replicas)
            && st["desiredReplicas"].as_u64() == Some(replicas)
            && ready
        {
            Ok(o)
        } else {
            Err(format!("generation {generation:?}, status {st}"))
        }
    })
    .await
}

/// The event history the API keeps for one Service (oldest first).
async fn api_events(b: &Berth, name: &str) -> Vec<Value> {
    let (code, body) = b
        .api_get(&format!("{}?kind=service&name={name}", paths::EVENTS))
        .await;
    assert_eq!(code, 200, "GET events: {body}");
    body["items"].as_array().expect("events items").clone()
}

fn apply_ok(b: &Berth, file: &std::path::Path) -> String {
    b.cli_ok(&["apply", "-f", file.to_str().expect("utf-8 path")])
}

// ---------------------------------------------------------------------------------------------
// 1, 2, 4 (+ 9 on NATS): apply, change replicas, delete.

/// An outside NATS subscriber on one subject (core NATS, no JetStream).
struct Tap {
    rx: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Tap {
    async fn start(url: &str, subject: String) -> Tap {
        let client = async_nats::connect(url)
            .await
            .expect("e2e: test client cannot connect to nats-server");
        let mut sub = client.subscribe(subject).await.expect("subscribe");
        client.flush().await.expect("flush");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _client = client;
            while let Some(m) = sub.next().await {
                let v: Value = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
                    panic!(
                        "e2e: non-JSON message on {}: {e}: {}",
                        m.subject,
                        String::from_utf8_lossy(&m.payload)
                    )
                });
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Tap { rx }
    }

    /// Everything received until (and including) the first `Deleted` event.
    async fn until_deleted(&mut self, b: &Berth) -> Vec<Value> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(v)) => {
                    let done = v["type"] == "Deleted";
                    got.push(v);
                    if done {
                        return got;
                    }
                }
                _ => panic!(
                    "e2e: no Deleted event on NATS within {CONVERGE:?}; got {got:#?}\n--- berth log ---\n{}",
                    b.log_text()
                ),
            }
        }
    }
}

/// Checks the fields of one event as an outside tool sees the JSON.
fn check_event_json(v: &Value, name: &str, uid: &str, since: SystemTime) -> Event {
    let id = v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("event without id: {v}"));
    assert_eq!(id.len(), 26, "event id is a ULID: {v}");
    ulid::Ulid::from_string(id).unwrap_or_else(|e| panic!("event id `{id}` is not a ULID: {e}"));
    assert!(
        ["Applied", "StatusChanged", "Deleted"].contains(&v["type"].as_str().unwrap_or("")),
        "event type: {v}"
    );
    assert_eq!(v["kind"], "Service", "{v}");
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["uid"], uid, "{v}");
    assert!(
        v["generation"].as_u64().is_some_and(|g| g >= 1),
        "generation: {v}"
    );
    assert!(v["time"].is_string(), "time: {v}");
    let e: Event = serde_json::from_value(v.clone())
        .unwrap_or_else(|err| panic!("event does not decode as berth's Event ({err}): {v}"));
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(e.time.timestamp_millis() as u64);
    let now = SystemTime::now();
    assert!(
        t + Duration::from_secs(1) >= since && t <= now + Duration::from_secs(1),
        "event time {} is outside the test's run: {v}",
        e.time
    );
    e
}

/// The order of one Service's life: Applied(1), StatusChanged(1).., Applied(2), StatusChanged(2)..,
/// Deleted(2); exactly two Applied and one Deleted.
fn check_event_sequence(events: &[Event], what: &str) {
    let shape: Vec<(EventType, u64)> = events.iter().map(|e| (e.type_, e.generation)).collect();
    assert!(events.len() >= 5, "{what}: too few events: {shape:?}");
    assert_eq!(shape[0], (EventType::Applied, 1), "{what}: {shape:?}");
    assert_eq!(
        shape[shape.len() - 1],
        (EventType::Deleted, 2),
        "{what}: {shape:?}"
    );
    let applied: Vec<usize> = (0..shape.len())
        .filter(|&i| shape[i].0 == EventType::Applied)
        .collect();
    assert_eq!(applied.len(), 2, "{what}: two Applied events: {shape:?}");
    let second = applied[1];
    assert_eq!(shape[second].1, 2, "{what}: {shape:?}");
    assert!(
        shape[1..second].contains(&(EventType::StatusChanged, 1)),
        "{what}: StatusChanged for generation 1 before the second Applied: {shape:?}"
    );
    assert!(
        shape[second + 1..].contains(&(EventType::StatusChanged, 2)),
        "{what}: StatusChanged for generation 2 after the second Applied: {shape:?}"
    );
    assert_eq!(
        shape.iter().filter(|s| s.0 == EventType::Deleted).count(),
        1,
        "{what}: {shape:?}"
    );
    // Status events never carry a generation the spec has not reached yet.
    for (i, (t, g)) in shape.iter().enumerate() {
        if *t == EventType::StatusChanged {
            assert_eq!(*g, if i < second { 1 } else { 2 }, "{what}: {shape:?}");
        }
    }
}

/// Reads, through a JetStream consumer created only now, every event the stream kept for `subject`.
async fn late_consumer_events(url: &str, subject: &str, expect: usize) -> Vec<(String, Value)> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let client = async_nats::connect(url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .unwrap_or_else(|e| panic!("e2e: stream {} missing: {e}", subjects::EVENTS_STREAM));
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("e2e: creating a late JetStream consumer");
    let mut messages = consumer.messages().await.expect("consumer messages");
    let mut out = Vec::new();
    // Read what is there, and a little longer to catch anything extra.
    loop {
        let wait = if out.len() < expect {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(500)
        };
        match tokio::time::timeout(wait, messages.next()).await {
            Ok(Some(Ok(m))) => {
                let msg_id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let v: Value = serde_json::from_slice(&m.payload).expect("JSON event in stream");
                out.push((msg_id, v));
            }
            Ok(Some(Err(e))) => panic!("e2e: late consumer failed: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

async fn apply_update_delete(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "aud-emb",
        Bus::Nats => "aud-nats",
        Bus::NatsStore => "aud-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let d = &docker().await;
    let name = format!("{p}-web");
    let since = SystemTime::now();

    // An outside tool subscribing on NATS before anything happens.
    let mut tap = match bus {
        Bus::Nats | Bus::NatsStore => {
            Some(Tap::start(&stack.nats_url(), subjects::event(Kind::Service, &name)).await)
        }
        Bus::Embedded => None,
    };

    // 1. apply -> a Swarm service with everything the manifest says, labelled as berth's.
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 1));
    assert_eq!(apply_ok(b, &file), format!("service/{name} created\n"));
    let obj = get_service(b, &name).expect("object after apply");
    let uid = uid_of(&obj);
    assert_eq!(obj["metadata"]["generation"], 1);
    let (code, discovery) = b.api_get(paths::API_ROOT).await;
    assert_eq!(code, 200);
    let instance = discovery["instance"]
        .as_str()
        .expect("discovery instance")
        .to_string();

    let svc = wait_swarm(b, d, &name, "the Swarm service to be created", |_| Ok(())).await;
    let spec = spec_of(&svc);
    assert_eq!(spec.name.as_deref(), Some(name.as_str()));
    let c = task_of(&svc)
        .container_spec
        .as_ref()
        .expect("container spec");
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    assert_eq!(
        c.command,
        Some(vec!["sleep".to_string(), "100000".to_string()])
    );
    assert_eq!(
        c.env,
        Some(vec![
            "GREETING=hello world".to_string(),
            "EMPTY=".to_string()
        ])
    );
    assert_eq!(c.init, Some(true));
    assert_eq!(c.stop_grace_period, Some(1_000_000_000));
    assert_eq!(replicas_of(&svc), Some(1));
    let limits = task_of(&svc)
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("resource limits");
    assert_eq!(limits.nano_cpus, Some(500_000_000));
    assert_eq!(limits.memory_bytes, Some(64 * 1024 * 1024));
    let l = labels_of(&svc);
    assert_eq!(l.get("team").map(String::as_str), Some("blue"), "{l:?}");
    assert_eq!(
        l.get("example.com/tier").map(String::as_str),
        Some("backend"),
        "{l:?}"
    );
    assert_eq!(l.get(labels::MANAGED_BY).map(String::as_str), Some("berth"));
    assert_eq!(l.get(labels::KIND).map(String::as_str), Some("service"));
    assert_eq!(l.get(labels::NAME), Some(&name));
    assert_eq!(l.get(labels::UID), Some(&uid));
    assert_eq!(l.get(labels::INSTANCE), Some(&instance));
    assert_eq!(l.get(labels::GENERATION).map(String::as_str), Some("1"));
    let hash = l.get(labels::SPEC_HASH).expect("spec-hash label");
    assert!(
        hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "spec-hash `{hash}`"
    );
    // Nothing but the user's labels and berth's own.
    for k in l.keys() {
        assert!(
            k == "team" || k == "example.com/tier" || k.starts_with(labels::PREFIX),
            "unexpected label {k} in {l:?}"
        );
    }
    let first = wait_ready(b, &name, 1).await;
    assert_eq!(
        first["status"]["swarmServiceId"].as_str(),
        svc.id.as_deref(),
        "status names the Swarm service"
    );

    // 2. change replicas -> the same Swarm service is updated, status follows the new generation.
    std::fs::write(&file, service_yaml(&name, 2)).expect("rewrite manifest");
    assert_eq!(apply_ok(b, &file), format!("service/{name} configured\n"));
    let obj = get_service(b, &name).expect("object after update");
    assert_eq!(obj["metadata"]["generation"], 2);
    assert_eq!(uid_of(&obj), uid, "an update keeps the uid");
    let updated = wait_swarm(b, d, &name, "replicas 2 in Swarm", |s| {
        let g = labels_of(s).get(labels::GENERATION).cloned();
        if replicas_of(s) == Some(2) && g.as_deref() == Some("2") {
            Ok(())
        } else {
            Err(format!(
                "replicas {:?}, generation label {g:?}",
                replicas_of(s)
            ))
        }
    })
    .await;
    assert_eq!(updated.id, svc.id, "updated in place, not re-created");
    assert_ne!(labels_of(&updated).get(labels::SPEC_HASH), Some(hash));
    let ready = wait_ready(b, &name, 2).await;
    assert_eq!(ready["metadata"]["generation"], 2);
    assert_eq!(ready["status"]["observedGeneration"], 2);

    // 4. delete -> the Swarm service is gone, and so is the object.
    assert_eq!(
        b.cli_ok(&["delete", "service", &name]),
        format!("service/{name} deleted\n")
    );
    eventually(b, CONVERGE, "the Swarm service to be removed", || async {
        match swarm_service(d, &name).await {
            None => Ok(()),
            Some(s) => Err(format!("still there: {:?}", s.id)),
        }
    })
    .await;
    assert!(get_service(b, &name).is_none(), "object gone after delete");
    assert!(swarm_names(d, &p).await.is_empty());

    // The API's own history, for both buses.
    let history = eventually(
        b,
        CONVERGE,
        "a Deleted event in the API history",
        || async {
            let h = api_events(b, &name).await;
            if h.last().is_some_and(|e| e["type"] == "Deleted") {
                Ok(h)
            } else {
                Err(format!("{h:?}"))
            }
        },
    )
    .await;
    let history: Vec<Event> = history
        .iter()
        .map(|v| check_event_json(v, &name, &uid, since))
        .collect();
    check_event_sequence(&history, "API event history");

    // 9. NATS: an outside subscriber saw the same events, and JetStream kept them for latecomers.
    if let Some(tap) = tap.as_mut() {
        let seen = tap.until_deleted(b).await;
        // Delivery is at least once: a publish retried after a lost ack reaches core subscribers
        // twice (only the stream deduplicates), so compare by id.
        let mut ids = HashSet::new();
        let events: Vec<Event> = seen
            .iter()
            .map(|v| check_event_json(v, &name, &uid, since))
            .filter(|e| ids.insert(e.id.clone()))
            .collect();
        check_event_sequence(&events, "core NATS subscriber");
        eprintln!(
            "{name}: NATS events {:?}",
            events
                .iter()
                .map(|e| (e.type_, e.generation))
                .collect::<Vec<_>>()
        );
        let core_ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let unique: HashSet<&str> = core_ids.iter().copied().collect();
        let history_ids: HashSet<&str> = history.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(unique, history_ids, "NATS and the API history agree");

        let subject = subjects::event(Kind::Service, &name);
        let kept = late_consumer_events(&stack.nats_url(), &subject, unique.len()).await;
        let kept_ids: Vec<&str> = kept
            .iter()
            .map(|(_, v)| v["id"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            kept_ids, core_ids,
            "a consumer created after the fact reads the same events, in the same order"
        );
        for (msg_id, v) in &kept {
            assert_eq!(
                msg_id,
                v["id"].as_str().unwrap_or(""),
                "Nats-Msg-Id is the event id"
            );
            check_event_json(v, &name, &uid, since);
        }
    }
}

on_every_store!(apply_update_delete);

// ---------------------------------------------------------------------------------------------
// 3: re-applying an unchanged manifest changes nothing, also across forced resyncs.

async fn reapply_unchanged(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "same-emb",
        Bus::Nats => "same-nats",
        Bus::NatsStore => "same-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start_with(bus, &["--resync", "2"]);
    let b = &stack.berth;
    let d = &docker().await;
    let name = format!("{p}-web");

    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 1));
    assert_eq!(apply_ok(b, &file), format!("service/{name} created\n"));
    let before = wait_ready(b, &name, 1).await;
    let svc = swarm_service(d, &name).await.expect("Swarm service");
    let version = version_of(&svc);
    let events_before = api_events(b, &name).await.len();

    let out = b.cli(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.success, "re-apply failed: {}", out.stderr);
    assert_eq!(out.stdout, format!("service/{name} unchanged\n"));
    assert_eq!(out.stderr, "", "nothing on stderr");
    let after = get_service(b, &name).expect("object");
    assert_eq!(
        after["metadata"], before["metadata"],
        "no write at all: same generation and resourceVersion"
    );

    // Wait across at least one full resync, proven by the resync collecting a planted orphan.
    let (_, discovery) = b.api_get(paths::API_ROOT).await;
    let instance = discovery["instance"]
        .as_str()
        .expect("instance")
        .to_string();
    assert_eq!(instance, b.instance);
    await_resync(b, d, &p, CONVERGE).await;
    // And one more resync period, plus slack.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let now = swarm_service(d, &name).await.expect("Swarm service");
    assert_eq!(now.id, svc.id);
    assert_eq!(
        version_of(&now),
        version,
        "the Swarm service was written although nothing changed"
    );
    let after = get_service(b, &name).expect("object");
    assert_eq!(
        after["metadata"], before["metadata"],
        "resyncs rewrote the object although nothing changed"
    );
    assert_eq!(
        after["status"], before["status"],
        "status churned without change"
    );
    assert_eq!(
        api_events(b, &name).await.len(),
        events_before,
        "no events for a no-op"
    );
    assert_eq!(swarm_names(d, &p).await, vec![name.clone()]);
}

on_both_buses!(reapply_unchanged);

// ---------------------------------------------------------------------------------------------
// A name taken in the engine: a Swarm service berth does not own (no labels, or another
// installation's) is never adopted, updated or removed; the Service is `Refused` and says why.

/// A plain Swarm service (0 replicas) created behind berth's back, with the given labels.
async fn foreign_service(d: &Docker, name: &str, labels: HashMap<String, String>) -> SwarmService {
    let spec = ServiceSpec {
        name: Some(name.to_string()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(bollard::models::TaskSpecContainerSpec {
                image: Some(IMAGE.to_string()),
                command: Some(vec!["sleep".into(), "4242".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(bollard::models::ServiceSpecModeReplicated { replicas: Some(0) }),
            ..Default::default()
        }),
        ..Default::default()
    };
    d.create_service(spec, None)
        .await
        .expect("e2e: creating a foreign Swarm service");
    swarm_service(d, name).await.expect("the foreign service")
}

async fn name_taken_is_refused(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "taken-emb",
        Bus::Nats => "taken-nats",
        Bus::NatsStore => "taken-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    // Resyncs every 2 s, so the refusal is also checked against repeated reconciles.
    let stack = Stack::start_with(bus, &["--resync", "2"]);
    let b = &stack.berth;
    let d = &docker().await;
    let plain = format!("{p}-plain");
    let other = format!("{p}-other");
    let other_instance = "01other0installation0000000";
    let before_plain = foreign_service(
        d,
        &plain,
        HashMap::from([("owner".to_string(), "someone-else".to_string())]),
    )
    .await;
    let before_other = foreign_service(
        d,
        &other,
        HashMap::from([
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
            (labels::INSTANCE.to_string(), other_instance.to_string()),
            (labels::KIND.to_string(), "service".to_string()),
            (labels::NAME.to_string(), other.clone()),
        ]),
    )
    .await;

    b.apply(&format!(
        "{}---\n{}",
        service_yaml(&plain, 1),
        service_yaml(&other, 1)
    ));
    for (name, want) in [
        (
            &plain,
            format!("a Swarm service named `{plain}` exists that berth does not manage"),
        ),
        (
            &other,
            format!("belongs to another berth installation ({other_instance})"),
        ),
    ] {
        let o = b
            .wait_condition(Kind::Service, name, "Ready", CONVERGE, |c| {
                c["status"] == "False" && c["reason"] == "Refused"
            })
            .await;
        let msg = condition(&o, "Ready").unwrap()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains(&want), "{name}: {msg}");
    }

    // Several resyncs later (each reconciles both again), the engine's services are as they were.
    await_resync(b, d, &p, CONVERGE).await;
    await_resync(b, d, &p, CONVERGE).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let untouched = |before: &SwarmService, name: &str| {
        let before = before.clone();
        let name = name.to_string();
        async move {
            let now = swarm_service(d, &name)
                .await
                .unwrap_or_else(|| panic!("{name} was removed"));
            assert_eq!(now.id, before.id, "{name} was re-created");
            assert_eq!(version_of(&now), version_of(&before), "{name} was written");
            assert_eq!(
                serde_json::to_value(spec_of(&now)).unwrap(),
                serde_json::to_value(spec_of(&before)).unwrap(),
                "{name}'s spec changed"
            );
        }
    };
    untouched(&before_plain, &plain).await;
    untouched(&before_other, &other).await;
    for name in [&plain, &other] {
        let o = b.object(Kind::Service, name).await.expect("the Service");
        let ready = condition(&o, "Ready").expect("Ready");
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("Refused")),
            "{o}"
        );
    }

    // Deleting the Service does not delete what berth never owned.
    b.cli_ok(&["delete", "service", &plain]);
    b.cli_ok(&["delete", "service", &other]);
    eventually(b, CONVERGE, "the Services to be gone", || async {
        let left = [
            b.object(Kind::Service, &plain).await.is_some(),
            b.object(Kind::Service, &other).await.is_some(),
        ];
        if left == [false, false] {
            Ok(())
        } else {
            Err(format!("still there: {left:?}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    untouched(&before_plain, &plain).await;
    untouched(&before_other, &other).await;
}

on_both_buses!(name_taken_is_refused);

// ---------------------------------------------------------------------------------------------
// 5, 6: drift by hand is repaired at once, from the engine's own events: a removed service comes
// back and a scaled one is scaled back, long before any resync would have found them.

async fn self_heal(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "heal-emb",
        Bus::Nats => "heal-nats",
        Bus::NatsStore => "heal-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    // No resync during the test: a repair can only come from the engine's events. (Speed is the
    // benchmark's business; this test asserts which path repairs, with generous deadlines.)
    let stack = Stack::start_with(bus, &["--resync", "3600"]);
    let b = &stack.berth;
    let d = &docker().await;
    let name = format!("{p}-web");

    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 1));
    assert_eq!(apply_ok(b, &file), format!("service/{name} created\n"));
    let obj = wait_ready(b, &name, 1).await;
    let uid = uid_of(&obj);
    let original = swarm_service(d, &name).await.expect("Swarm service");

    // 5. removed by hand -> re-created from the engine's remove event.
    d.delete_service(original.id.as_deref().unwrap())
        .await
        .expect("e2e: removing the Swarm service by hand");
    let removed_at = Instant::now();
    let back = eventually(
        b,
        CONVERGE,
        "the removed Swarm service to come back",
        || async {
            match swarm_service(d, &name).await {
                Some(s) if s.id != original.id => Ok(s),
                Some(_) => Err("the old service is still visible".to_string()),
                None => Err("not there".to_string()),
            }
        },
    )
    .await;
    eprintln!(
        "{name}: re-created {:?} after it was removed by hand",
        removed_at.elapsed()
    );
    let l = labels_of(&back);
    assert_eq!(
        l.get(labels::UID),
        Some(&uid),
        "re-created for the same object"
    );
    assert_eq!(replicas_of(&back), Some(1));
    wait_ready(b, &name, 1).await;

    // 6. scaled by hand -> scaled back to the manifest's replicas.
    let current = swarm_service(d, &name).await.expect("Swarm service");
    let v0 = version_of(&current);
    scale_by_hand(d, &name, 3).await;
    let restored = wait_swarm(b, d, &name, "replicas restored to 1", |s| {
        // Our update is one version, berth's correction at least one more.
        if replicas_of(s) == Some(1) && version_of(s) >= v0 + 2 {
            Ok(())
        } else {
            Err(format!(
                "replicas {:?}, version {} (before the scale: {v0})",
                replicas_of(s),
                version_of(s)
            ))
        }
    })
    .await;
    assert_eq!(restored.id, back.id, "scaled back in place");
    wait_ready(b, &name, 1).await;
    assert_eq!(swarm_names(d, &p).await, vec![name.clone()]);
    // The object itself was never touched by the repairs.
    let obj = get_service(b, &name).expect("object");
    assert_eq!(obj["metadata"]["generation"], 1);
    assert_eq!(uid_of(&obj), uid);
}

on_both_buses!(self_heal);

// ---------------------------------------------------------------------------------------------
// 7: bad manifests are refused with file:line:col, document, field path and message, and nothing
// at all is written.

/// A valid document, `---`, then a second document built from `spec_lines`.
fn two_docs(p: &str, spec_lines: &[&str]) -> String {
    let mut s = service_yaml(&format!("{p}-good"), 1);
    s.push_str(&format!(
        "---\napiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}-bad\nspec:\n"
    ));
    for l in spec_lines {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// 1-based line number of the first line equal to `line`.
fn line_of(text: &str, line: &str) -> usize {
    text.lines()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("`{line}` not in manifest"))
        + 1
}

/// Applies `text`, expects a refusal whose error lines start with `want` (in order), and checks
/// the summary line, the exit code and that stdout is empty.
fn refused(b: &Berth, file_name: &str, text: &str, want: &[String], docs: usize) -> Vec<String> {
    let (_dir, file) = manifest(file_name, text);
    let out = b.cli(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.success, "a bad manifest was accepted:\n{text}");
    assert_eq!(out.code, Some(1), "exit code; stderr: {}", out.stderr);
    assert_eq!(out.stdout, "", "nothing reported as applied");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        want.len() + 1,
        "one line per problem plus a summary:\n{}",
        out.stderr
    );
    for (got, want) in lines.iter().zip(want) {
        let want = want.replace("{file}", &file.display().to_string());
        assert!(
            got.starts_with(&want),
            "error line\n  got:  {got}\n  want: {want}..."
        );
    }
    assert_eq!(
        lines[want.len()],
        format!(
            "nothing was applied: {} problem(s) in {docs} document(s)",
            want.len()
        )
    );
    let file = file.display().to_string();
    lines.iter().map(|l| l.replace(&file, "{file}")).collect()
}

async fn bad_manifest(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "bad-emb",
        Bus::Nats => "bad-nats",
        Bus::NatsStore => "bad-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let d = &docker().await;

    // A type error: the exact line, with the file, position, document, field and serde's message.
    let text = two_docs(&p, &["image: berth-test/busybox:1", "replicas: three"]);
    let at = line_of(&text, "  replicas: three");
    let want = format!(
        "error: {{file}}:{at}:3: document 2: spec.replicas: invalid type: string \"three\", expected u64"
    );
    let lines = refused(b, "type.yaml", &text, std::slice::from_ref(&want), 2);
    assert_eq!(lines[0], want, "exactly this line");

    // An unknown field (a typo) is pointed at the typo itself.
    let text = two_docs(&p, &["image: berth-test/busybox:1", "replicsa: 2"]);
    let at = line_of(&text, "  replicsa: 2");
    refused(
        b,
        "typo.yaml",
        &text,
        &[format!(
            "error: {{file}}:{at}:3: document 2: spec.replicsa: unknown field `replicsa`, expected one of `image`, "
        )],
        2,
    );

    // A semantic error: global mode with replicas, placed at `replicas`.
    let text = two_docs(
        &p,
        &["image: berth-test/busybox:1", "mode: global", "replicas: 2"],
    );
    let at = line_of(&text, "  replicas: 2");
    refused(
        b,
        "global.yaml",
        &text,
        &[format!(
            "error: {{file}}:{at}:3: document 2: spec.replicas: cannot be set when mode is `global` (global runs one task per node)"
        )],
        2,
    );

    // An invalid image reference.
    let text = two_docs(&p, &["image: Bad Image"]);
    let at = line_of(&text, "  image: Bad Image");
    let want = format!(
        "error: {{file}}:{at}:3: document 2: spec.image: invalid image reference `Bad Image`: path \
         component `Bad Image` must be lower-case letters and digits, separated by `.`, `_`, `__` or `-`"
    );
    let lines = refused(b, "image.yaml", &text, std::slice::from_ref(&want), 2);
    assert_eq!(lines[0], want, "exactly this line");

    // Several problems in several documents: all are reported in one run, each at its own place
    // (document 1 is not numbered; a nested list field points at the list item's key).
    let text = format!(
        "{}---\napiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}-two\nspec:\n  image: {IMAGE}\n  \
         mode: global\n  replicas: 2\n  env:\n    - name: A\n      value: x\n    - name: A\n",
        service_yaml(&format!("{p}-one"), 1).replace(&format!("image: {IMAGE}"), "image: Bad Image")
    );
    let image_at = line_of(&text, "  image: Bad Image");
    let replicas_at = line_of(&text, "  replicas: 2");
    let dup_at = text
        .lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| *l == "    - name: A")
        .unwrap()
        + 1;
    let lines = refused(
        b,
        "many.yaml",
        &text,
        &[
            format!("error: {{file}}:{image_at}:3: spec.image: invalid image reference `Bad Image`: "),
            format!(
                "error: {{file}}:{replicas_at}:3: document 2: spec.replicas: cannot be set when mode is `global`"
            ),
            format!("error: {{file}}:{dup_at}:7: document 2: spec.env[1].name: `A` is set twice"),
        ],
        2,
    );
    assert_eq!(
        lines[2],
        format!("error: {{file}}:{dup_at}:7: document 2: spec.env[1].name: `A` is set twice")
    );

    // The API refuses the same on its own, all or nothing, for clients that skip the CLI.
    let good = serde_json::json!({
        "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": format!("{p}-good")},
        "spec": {"image": IMAGE, "command": ["sleep", "100000"], "init": true}
    });
    let bad = serde_json::json!({
        "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": format!("{p}-bad")},
        "spec": {"image": IMAGE, "replicas": "three"}
    });
    let (code, body) = b
        .api_post(paths::APPLY, &serde_json::json!({"items": [good, bad]}))
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["reason"], "Invalid", "{body}");
    assert_eq!(
        body["message"],
        format!("Service/{p}-bad: spec.replicas: invalid type: string \"three\", expected u64"),
        "{body}"
    );
    assert_eq!(
        body["details"][0]["object"],
        format!("Service/{p}-bad"),
        "{body}"
    );
    assert_eq!(body["details"][0]["path"], "spec.replicas", "{body}");

    // Nothing was written: no objects, no events, no Swarm services.
    let list = b.cli_ok(&["get", "services", "-o", "json"]);
    let list: Value = serde_json::from_str(&list).expect("JSON list");
    assert_eq!(list["items"], Value::Array(vec![]), "objects were written");
    let (code, events) = b.api_get(&format!("{}?kind=service", paths::EVENTS)).await;
    assert_eq!(code, 200);
    assert_eq!(events["items"], Value::Array(vec![]), "events were written");
    // Give a (wrongly) started controller a moment to show itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(swarm_names(d, &p).await, Vec::<String>::new());
}

on_both_buses!(bad_manifest);

// ---------------------------------------------------------------------------------------------
// 8: an acknowledged apply survives `kill -9` of the server right after it.

async fn kill9_after_apply(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "k9-emb",
        Bus::Nats => "k9-nats",
        Bus::NatsStore => "k9-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    let mut stack = Stack::start(bus);
    let d = &docker().await;
    let name = format!("{p}-web");

    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 1));
    let out = stack.berth.cli(&["apply", "-f", file.to_str().unwrap()]);
    stack.berth.kill9();
    assert!(out.success, "apply failed: {}", out.stderr);
    assert_eq!(out.stdout, format!("service/{name} created\n"));

    stack.berth.restart();
    let b = &stack.berth;
    let obj = get_service(b, &name).expect("the acknowledged object survives kill -9");
    assert_eq!(obj["metadata"]["generation"], 1);
    let uid = uid_of(&obj);
    let svc = wait_swarm(
        b,
        d,
        &name,
        "the Swarm service after the restart",
        |s| match labels_of(s).get(labels::UID) {
            Some(u) if *u == uid => Ok(()),
            other => Err(format!("uid label {other:?}")),
        },
    )
    .await;
    assert_eq!(replicas_of(&svc), Some(1));
    wait_ready(b, &name, 1).await;
    assert_eq!(swarm_names(d, &p).await, vec![name.clone()], "exactly one");
    // Its Applied event survived too (it was in the outbox/history before the kill).
    let history = api_events(b, &name).await;
    assert_eq!(
        history.first().map(|e| e["type"].clone()),
        Some("Applied".into())
    );

    // A converged installation that restarts resumes without touching Swarm: the controller's own
    // state says what it applied, so the startup resync is a no-op (no update, no status churn).
    let version = version_of(&swarm_service(d, &name).await.expect("the Swarm service"));
    let status = get_service(b, &name).expect("object")["status"].clone();
    stack.berth.restart();
    let b = &stack.berth;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        version_of(&swarm_service(d, &name).await.expect("the Swarm service")),
        version,
        "a restart must not update the Swarm service\n{}",
        b.log_text()
    );
    assert_eq!(get_service(b, &name).expect("object")["status"], status);
}

on_every_store!(kill9_after_apply);

// ---------------------------------------------------------------------------------------------
// 10: the API requires the token; only /healthz is open.

async fn api_requires_token(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "auth-emb",
        Bus::Nats => "auth-nats",
        Bus::NatsStore => "auth-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let http = reqwest::Client::new();
    let collection = format!("{}{}", b.url(), paths::collection(Kind::Service));

    for token in [None, Some("wrong"), Some("")] {
        let mut req = http.get(&collection);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 401, "token {token:?}");
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
        assert!(resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json")));
        let body: Value = resp.json().await.expect("401 with a JSON body");
        assert_eq!(body["code"], 401, "{body}");
        assert_eq!(body["reason"], "Unauthorized", "{body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("bearer token")),
            "{body}"
        );
    }
    // Writes are refused too, and write nothing.
    let resp = http
        .post(format!("{}{}", b.url(), paths::APPLY))
        .json(&serde_json::json!({"items": []}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 401);

    let resp = http
        .get(format!("{}{}", b.url(), paths::HEALTHZ))
        .send()
        .await
        .expect("healthz");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.expect("body"), "ok");

    let (code, body) = b.api_get(&paths::collection(Kind::Service)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["items"], Value::Array(vec![]));

    // The CLI says so too.
    let out = std::process::Command::new(berth_e2e::berth_bin())
        .args(["get", "services"])
        .env("BERTH_URL", b.url())
        .env("BERTH_TOKEN", "wrong")
        .output()
        .expect("run berth");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown or wrong bearer token"),
        "stderr: {stderr}"
    );
}

on_both_buses!(api_requires_token);

// ---------------------------------------------------------------------------------------------
// 11: a service whose tasks cannot start is Degraded, with the engine's own error text.

async fn failing_task(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "fail-emb",
        Bus::Nats => "fail-nats",
        Bus::NatsStore => "fail-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    let stack = Stack::start(bus);
    let b = &stack.berth;
    let name = format!("{p}-web");
    // No `init`: the engine itself must fail to exec the command (with an init, the init would
    // start and exit non-zero instead). Few restarts: a crash loop keeps the engine's task reaper
    // busy, which is what makes removing a service crash engine 20.10 (see `Cleanup`).
    let text = format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {IMAGE}\n  \
         command: [\"/nonexistent\"]\n  replicas: 1\n  restart:\n    delay: 1s\n    maxAttempts: 3\n"
    );
    let (_dir, file) = manifest("fail.yaml", &text);
    assert_eq!(apply_ok(b, &file), format!("service/{name} created\n"));
    // Degraded=True may first say WaitingForDependencies while the default network is created.
    let obj = eventually(b, CONVERGE, "Degraded=True with the task error", || async {
        let o = get_service(b, &name).ok_or("object not found")?;
        match condition(&o, "Degraded") {
            Some(c) if c["status"] == "True" && c["reason"] == "TaskFailed" => Ok(o.clone()),
            other => Err(format!("Degraded: {other:?}")),
        }
    })
    .await;
    let degraded = condition(&obj, "Degraded").unwrap();
    assert_eq!(degraded["reason"], "TaskFailed", "{degraded}");
    let msg = degraded["message"].as_str().unwrap_or("");
    assert!(msg.starts_with("task "), "{msg}");
    assert!(
        msg.contains(r#"exec: "/nonexistent": stat /nonexistent: no such file or directory"#),
        "the engine's error text is in the message: {msg}"
    );
    let ready = condition(&obj, "Ready").expect("Ready condition");
    assert_eq!(ready["status"], "False", "{ready}");
    assert_eq!(obj["status"]["runningReplicas"], 0);
    assert_eq!(obj["status"]["desiredReplicas"], 1);
    assert_eq!(obj["status"]["observedGeneration"], 1);
}

on_both_buses!(failing_task);

// ---------------------------------------------------------------------------------------------
// Extra: a Service whose name happens to be a prefix of a foreign Swarm service's ID is not a name
// conflict. (The engine resolves `GET /services/{x}` by ID, then name, then ID prefix.)

/// The Swarm service named exactly `name`, found by listing (never by ID prefix).
async fn swarm_service_named(d: &Docker, name: &str) -> Option<SwarmService> {
    d.list_services(Some(ListServicesOptions {
        filters: Some(HashMap::from([(
            "name".to_string(),
            vec![name.to_string()],
        )])),
        ..Default::default()
    }))
    .await
    .expect("e2e: listing Swarm services")
    .into_iter()
    .find(|s| s.spec.as_ref().and_then(|sp| sp.name.as_deref()) == Some(name))
}

async fn id_prefix_is_no_conflict(bus: Bus) {
    let p = prefix(match bus {
        Bus::Embedded => "idp-emb",
        Bus::Nats => "idp-nats",
        Bus::NatsStore => "idp-nstore",
    });
    let _cleanup = Cleanup::new(&p);
    let d = &docker().await;
    // A service berth does not manage, then a berth object named after the start of its ID.
    let foreign = d
        .create_service(
            ServiceSpec {
                name: Some(format!("{p}-foreign")),
                task_template: Some(TaskSpec {
                    container_spec: Some(bollard::models::TaskSpecContainerSpec {
                        image: Some(IMAGE.to_string()),
                        command: Some(vec!["sleep".into(), "100000".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                mode: Some(ServiceSpecMode {
                    replicated: Some(bollard::models::ServiceSpecModeReplicated {
                        replicas: Some(0),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None,
        )
        .await
        .expect("e2e: creating a foreign Swarm service");
    let foreign_id = foreign.id.expect("foreign id");
    let name = foreign_id[..12].to_string();
    let _cleanup_named = Cleanup::new(&name);
    let foreign_before = swarm_service(d, &foreign_id).await.expect("foreign");
    let stack = Stack::start(bus);
    let b = &stack.berth;

    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 1));
    assert_eq!(apply_ok(b, &file), format!("service/{name} created\n"));
    let obj = wait_ready(b, &name, 1).await;
    let ours = swarm_service_named(d, &name)
        .await
        .expect("berth's own Swarm service");
    assert_eq!(labels_of(&ours).get(labels::UID), Some(&uid_of(&obj)));
    assert_ne!(ours.id.as_deref(), Some(foreign_id.as_str()));
    let foreign_after = swarm_service(d, &foreign_id).await.expect("foreign kept");
    assert_eq!(
        version_of(&foreign_after),
        version_of(&foreign_before),
        "berth touched a service it does not manage"
    );
    assert_eq!(
        b.cli_ok(&["delete", "service", &name]),
        format!("service/{name} deleted\n")
    );
    eventually(
        b,
        CONVERGE,
        "berth's Swarm service to be removed",
        || async {
            match swarm_service_named(d, &name).await {
                None => Ok(()),
                Some(s) => Err(format!("still there: {:?}", s.id)),
            }
        },
    )
    .await;
    assert!(
        swarm_service(d, &foreign_id).await.is_some(),
        "the foreign service must survive"
    );
}

on_both_buses!(id_prefix_is_no_conflict);
