//! The NATS event bus against a real `nats-server` with JetStream: every test starts its own
//! server on a free port with its own store, so tests run in parallel and leave nothing behind.
//! A missing `nats-server` fails the tests: a silently skipped bus test would hide a broken bus.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_api_types::deploy::{DeployEvent, DeploySource};
use berth_api_types::names::subjects;
use berth_api_types::{Event, EventType, Kind};
use berth_controllers::bus::{
    Ack, BusMessage, DeployMessage, DeployQueue, DeploySubscription, EventBus, NatsBus,
    Subscription,
};
use futures::StreamExt;

const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// Durable consumers in these tests redeliver an unacked message after this long (the default
/// is 30 s), so that waiting a little longer than this shows a missing ack as a redelivery.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long "nothing more arrives" is watched for: past the ack wait, with room for the server's
/// redelivery on a loaded machine.
const IDLE: Duration = Duration::from_millis(1800);

/// A bus on the test's server whose durable consumers use the short `ACK_WAIT`.
async fn connect(url: &str) -> NatsBus {
    NatsBus::connect(url)
        .await
        .expect("connect to the test's nats-server")
        .with_ack_wait(ACK_WAIT)
}

/// A `nats-server` child process, killed when the guard is dropped (also when a test panics).
struct NatsServer {
    child: Child,
    port: u16,
    url: String,
    store: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> Self {
        let store = tempfile::tempdir().expect("create JetStream store dir");
        // Another process may grab the free port before the server binds it; try a few.
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn_server(port, store.path()) {
                return NatsServer {
                    child,
                    port,
                    url: format!("nats://127.0.0.1:{port}"),
                    store,
                };
            }
        }
        panic!("nats-server did not start on any of 5 free ports");
    }

    /// Stops the server and starts it again on the same port and store, as after a crash.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(child) = spawn_server(self.port, self.store.path()) {
                self.child = child;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `nats-server` and waits until it listens; `None` if it exits first (port taken).
fn spawn_server(port: u16, store: &Path) -> Option<Child> {
    let binary = if Path::new(NATS_SERVER).exists() {
        NATS_SERVER
    } else {
        "nats-server"
    };
    // A fresh directory per start: a ports file left by a previous start must not count.
    let ports_dir = tempfile::tempdir_in(store).expect("create ports dir");
    let mut child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.join("js"))
        .arg("--ports_file_dir")
        .arg(ports_dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot start `{binary}` ({err}): these tests need a real NATS server; install \
                 nats-server (e.g. `apt-get install nats-server`) so it is at {NATS_SERVER} or \
                 on PATH"
            )
        });
    // The server writes its ports file once it listens. Polling the port with connects instead
    // can be fooled by a TCP self-connect on an ephemeral port, or by another test's server.
    let ports_file_suffix = format!("_{}.ports", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let written = std::fs::read_dir(ports_dir.path())
            .expect("read ports dir")
            .flatten()
            .any(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .ends_with(&ports_file_suffix)
            });
        if written {
            return Some(child);
        }
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server did not listen on port {port} within 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn event(kind: Kind, name: &str) -> Event {
    Event {
        id: ulid::Ulid::new().to_string(),
        type_: EventType::Applied,
        kind,
        name: name.to_string(),
        uid: format!("uid-{name}"),
        generation: 3,
        resource_version: "7".to_string(),
        time: chrono::Utc::now(),
        message: String::new(),
    }
}

async fn next(sub: &mut Subscription) -> BusMessage {
    tokio::time::timeout(Duration::from_secs(3), sub.next())
        .await
        .expect("no message within 3s")
        .expect("subscription ended")
}

async fn next_event(sub: &mut Subscription) -> Event {
    match next(sub).await {
        BusMessage::Event(e) => e,
        BusMessage::Lagged => panic!("unexpected Lagged"),
    }
}

/// Asserts nothing arrives for a while: past the ack wait, so an event that was not acked comes
/// back (redelivered) and fails the test, as does a stray message.
async fn assert_idle(sub: &mut Subscription) {
    let got = tokio::time::timeout(IDLE, sub.next()).await;
    assert!(got.is_err(), "unexpected message: {got:?}");
}

#[tokio::test]
async fn round_trip_filters_by_kind() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    assert_eq!(bus.describe(), server.url);

    let mut live_services = bus.subscribe(&[Kind::Service], None).await.unwrap();
    let mut live_all = bus.subscribe(&[], None).await.unwrap();
    let mut durable_nodes = bus.subscribe(&[Kind::Node], Some("nodes")).await.unwrap();
    let mut durable_two = bus
        .subscribe(&[Kind::Service, Kind::Ingress], Some("svc.and.ing"))
        .await
        .unwrap();

    let published = [
        event(Kind::Node, "n1"),
        event(Kind::Service, "web"),
        event(Kind::Ingress, "i1"),
        event(Kind::Service, "api"),
    ];
    for e in &published {
        bus.publish(e).await.unwrap();
    }

    assert_eq!(next_event(&mut live_services).await, published[1]);
    assert_eq!(next_event(&mut live_services).await, published[3]);
    for e in &published {
        assert_eq!(&next_event(&mut live_all).await, e);
    }
    assert_eq!(next_event(&mut durable_nodes).await, published[0]);
    // Two kinds need multiple filter subjects (NATS >= 2.10); older servers filter client-side.
    for e in [&published[1], &published[2], &published[3]] {
        assert_eq!(&next_event(&mut durable_two).await, e);
    }
    assert_idle(&mut live_services).await;
    assert_idle(&mut durable_nodes).await;
    assert_idle(&mut durable_two).await;
}

#[tokio::test]
async fn duplicate_publish_is_delivered_once() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    let mut live = bus.subscribe(&[Kind::Service], None).await.unwrap();
    let mut durable = bus
        .subscribe(&[Kind::Service], Some("dedup"))
        .await
        .unwrap();

    let e = event(Kind::Service, "web");
    bus.publish(&e).await.unwrap();
    bus.publish(&e).await.unwrap();
    let after = event(Kind::Service, "after");
    bus.publish(&after).await.unwrap();

    // JetStream drops the duplicate, so it is neither stored nor forwarded to core subscribers.
    for sub in [&mut durable, &mut live] {
        assert_eq!(next_event(sub).await, e);
        assert_eq!(next_event(sub).await, after);
        assert_idle(sub).await;
    }
}

#[tokio::test]
async fn durable_consumer_catches_up_without_redelivery() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;

    let first: Vec<Event> = (0..3)
        .map(|i| event(Kind::Service, &format!("before-{i}")))
        .collect();
    for e in &first {
        bus.publish(e).await.unwrap();
    }
    // Created after the events: deliver policy All still hands it everything in the stream.
    let mut sub = bus
        .subscribe(&[Kind::Service], Some("service-controller"))
        .await
        .unwrap();
    for e in &first {
        assert_eq!(&next_event(&mut sub).await, e);
    }
    drop(sub);

    // Published while the controller is "down"; other kinds must not show up later.
    let missed: Vec<Event> = (0..5)
        .map(|i| event(Kind::Service, &format!("missed-{i}")))
        .collect();
    for (i, e) in missed.iter().enumerate() {
        bus.publish(e).await.unwrap();
        bus.publish(&event(Kind::Node, &format!("node-{i}")))
            .await
            .unwrap();
    }

    // A fresh connection, as after a restart of the process.
    let restarted = connect(&server.url).await;
    let mut sub = restarted
        .subscribe(&[Kind::Service], Some("service-controller"))
        .await
        .unwrap();
    for e in &missed {
        assert_eq!(&next_event(&mut sub).await, e, "catch-up out of order");
    }
    assert_idle(&mut sub).await;

    let live = event(Kind::Service, "live");
    restarted.publish(&live).await.unwrap();
    assert_eq!(next_event(&mut sub).await, live);
}

#[tokio::test]
async fn outside_core_subscriber_sees_the_event_json() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    let outside = async_nats::connect(&server.url).await.unwrap();
    let subject = subjects::event(Kind::Service, "web");
    let mut sub = outside.subscribe(subject.clone()).await.unwrap();
    // `flush` only writes the socket; a request round trip proves the server has the SUB before
    // the bus (another connection) publishes.
    let _ = outside.request("$JS.API.INFO", "".into()).await.unwrap();

    let e = event(Kind::Service, "web");
    bus.publish(&e).await.unwrap();

    let msg = tokio::time::timeout(Duration::from_secs(3), sub.next())
        .await
        .expect("no message within 3s")
        .expect("subscriber closed");
    assert_eq!(msg.subject.as_str(), subject);
    let json: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(json["id"], e.id.as_str());
    assert_eq!(json["type"], "Applied");
    assert_eq!(json["kind"], "Service");
    assert_eq!(json["name"], "web");
    assert_eq!(json["generation"], 3);
    let time = json["time"].as_str().expect("time is a string");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(time).unwrap(),
        e.time,
        "time must be RFC 3339"
    );
    let headers = msg.headers.expect("published with headers");
    assert_eq!(
        headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str()),
        Some(e.id.as_str())
    );
}

#[tokio::test]
async fn wrong_url_fails_fast_naming_the_url() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let err = NatsBus::connect(&url)
        .await
        .expect_err("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "connect retried"
    );
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn undecodable_message_is_skipped() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    let mut durable = bus.subscribe(&[], Some("poison")).await.unwrap();
    let mut live = bus.subscribe(&[], None).await.unwrap();

    // Someone else publishes garbage into the stream's subjects.
    let outside = async_nats::connect(&server.url).await.unwrap();
    let js = async_nats::jetstream::new(outside);
    js.publish(subjects::event(Kind::Service, "junk"), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let good = event(Kind::Service, "good");
    bus.publish(&good).await.unwrap();

    assert_eq!(next_event(&mut durable).await, good);
    assert_eq!(next_event(&mut live).await, good);
}

/// Skips any `Lagged` and returns the next event.
async fn next_event_after_lag(sub: &mut Subscription) -> Event {
    loop {
        if let BusMessage::Event(e) = next(sub).await {
            return e;
        }
    }
}

#[tokio::test]
async fn deleted_consumer_is_recreated_and_reports_lagged() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    let mut sub = bus
        .subscribe(&[Kind::Service], Some("reset-me"))
        .await
        .unwrap();
    let first = event(Kind::Service, "first");
    bus.publish(&first).await.unwrap();
    assert_eq!(next_event(&mut sub).await, first);

    // An operator deletes the consumer: events may be missed, so the subscriber must resync.
    let admin = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    admin
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .unwrap()
        .delete_consumer("reset-me")
        .await
        .unwrap();
    assert!(matches!(next(&mut sub).await, BusMessage::Lagged));

    // Re-created from "now": the subscription goes on without replaying `first`.
    let after = event(Kind::Service, "after");
    bus.publish(&after).await.unwrap();
    assert_eq!(next_event(&mut sub).await, after);
}

#[tokio::test]
async fn server_restart_makes_live_subscribers_resync() {
    let mut server = NatsServer::start();
    let bus = connect(&server.url).await;
    let mut live = bus.subscribe(&[Kind::Service], None).await.unwrap();
    let mut durable = bus
        .subscribe(&[Kind::Service], Some("survivor"))
        .await
        .unwrap();
    let before = event(Kind::Service, "before");
    bus.publish(&before).await.unwrap();
    assert_eq!(next_event(&mut live).await, before);
    assert_eq!(next_event(&mut durable).await, before);

    server.restart();
    // Core NATS lost whatever was published during the gap; only a resync can cover it.
    assert!(matches!(next(&mut live).await, BusMessage::Lagged));

    // The file store kept the stream, and both subscriptions work again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = event(Kind::Service, "after");
    while let Err(err) = bus.publish(&after).await {
        assert!(Instant::now() < deadline, "publish after restart: {err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(next_event_after_lag(&mut live).await, after);
    assert_eq!(next_event_after_lag(&mut durable).await, after);
}

fn deploy(service: &str, tag: &str) -> DeployEvent {
    DeployEvent {
        id: ulid::Ulid::new().to_string(),
        service: service.to_string(),
        image: format!("127.0.0.1:5000/team/app:{tag}"),
        tag: Some(tag.to_string()),
        digest: None,
        source: DeploySource::Webhook,
        time: chrono::Utc::now(),
        instance: None,
        signature: None,
    }
}

/// The next deploy, acked as the applier does once it is applied.
async fn next_deploy(sub: &mut DeploySubscription) -> DeployEvent {
    let (d, ack) = next_deploy_unacked(sub).await;
    ack.ack().await.expect("ack the deploy");
    d
}

async fn next_deploy_unacked(sub: &mut DeploySubscription) -> (DeployEvent, Ack) {
    match tokio::time::timeout(Duration::from_secs(3), sub.next())
        .await
        .expect("no deploy within 3s")
        .expect("deploy subscription ended")
    {
        DeployMessage::Deploy(d, ack) => (d, ack),
        DeployMessage::Lagged => panic!("unexpected Lagged"),
    }
}

#[tokio::test]
async fn deploys_stay_unacked_until_the_subscriber_acks() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    let mut durable = bus.subscribe_deploys(Some("applier")).await.unwrap();
    let d1 = deploy("web", "2");
    bus.publish_deploy(&d1).await.unwrap();
    // Received but not acked (the applier crashed before its write, or the write failed):
    // delivered again after the ack wait.
    let (got, ack) = next_deploy_unacked(&mut durable).await;
    assert_eq!(got, d1);
    drop(ack);
    let (again, ack) = next_deploy_unacked(&mut durable).await;
    assert_eq!(again, d1, "an unacked deploy must be redelivered");
    // Acked once handled: never again, also not to a new subscriber of the same consumer.
    ack.ack().await.unwrap();
    assert_no_deploy(&mut durable).await;
    drop(durable);
    let mut durable = bus.subscribe_deploys(Some("applier")).await.unwrap();
    assert_no_deploy(&mut durable).await;
    // Live subscriptions have nothing to ack; their handle is a no-op.
    let mut live = bus.subscribe_deploys(None).await.unwrap();
    let d2 = deploy("web", "3");
    bus.publish_deploy(&d2).await.unwrap();
    let (got, ack) = next_deploy_unacked(&mut live).await;
    assert_eq!(got, d2);
    ack.ack().await.unwrap();
    assert_eq!(next_deploy(&mut durable).await, d2);
}

/// As `assert_idle`, for deploys.
async fn assert_no_deploy(sub: &mut DeploySubscription) {
    let got = tokio::time::timeout(IDLE, sub.next()).await;
    assert!(got.is_err(), "unexpected deploy message: {got:?}");
}

#[tokio::test]
async fn deploys_have_their_own_stream_and_are_delivered_once() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    // Published before any durable consumer exists: a new consumer must not replay it.
    let old = deploy("web", "0");
    bus.publish_deploy(&old).await.unwrap();

    let mut resource_events = bus.subscribe(&[], None).await.unwrap();
    let mut live = bus.subscribe_deploys(None).await.unwrap();
    let mut durable = bus.subscribe_deploys(Some("applier")).await.unwrap();
    // An outside tool on plain core NATS, as docs/events.md describes.
    let client = async_nats::connect(&server.url).await.unwrap();
    let mut outside = client.subscribe(subjects::deploy("web")).await.unwrap();
    client.flush().await.unwrap();

    let d1 = deploy("web", "2");
    bus.publish_deploy(&d1).await.unwrap();
    // A retried publish (lost ack) is stored and delivered once.
    bus.publish_deploy(&d1).await.unwrap();
    let d2 = deploy("api", "3");
    bus.publish_deploy(&d2).await.unwrap();

    assert_eq!(next_deploy(&mut live).await, d1);
    assert_eq!(next_deploy(&mut live).await, d2);
    assert_eq!(next_deploy(&mut durable).await, d1);
    assert_eq!(next_deploy(&mut durable).await, d2);
    assert_no_deploy(&mut durable).await;
    assert_no_deploy(&mut live).await;
    assert_idle(&mut resource_events).await;

    let msg = tokio::time::timeout(Duration::from_secs(3), outside.next())
        .await
        .expect("outside subscriber got nothing")
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(json["id"], d1.id.as_str());
    assert_eq!(json["service"], "web");
    assert_eq!(json["image"], "127.0.0.1:5000/team/app:2");
    assert_eq!(json["source"], "webhook");

    // The durable consumer resumes after a restart of the subscriber, without redelivery.
    drop(durable);
    let d3 = deploy("web", "4");
    bus.publish_deploy(&d3).await.unwrap();
    let mut durable = bus.subscribe_deploys(Some("applier")).await.unwrap();
    assert_eq!(next_deploy(&mut durable).await, d3);
    assert_no_deploy(&mut durable).await;
    assert_ne!(old.id, d3.id);
}

#[tokio::test]
async fn audit_records_go_to_their_own_stream_once_and_only_on_audit_subjects() {
    let server = NatsServer::start();
    let bus = connect(&server.url).await;
    let admin = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    assert!(
        admin.get_stream(subjects::AUDIT_STREAM).await.is_err(),
        "connecting alone creates no audit stream (controllers have no permission on it)"
    );
    let mut resource_events = bus.subscribe(&[], None).await.unwrap();
    let client = async_nats::connect(&server.url).await.unwrap();
    let mut outside = client.subscribe(subjects::AUDIT_ALL).await.unwrap();
    let _ = client.request("$JS.API.INFO", "".into()).await.unwrap();

    let payload = br#"{"seq":1,"tokenId":"ci","action":"patch","kind":"Service"}"#.to_vec();
    let subject = subjects::audit("service");
    bus.publish_audit(&subject, "audit-inst-1", payload.clone())
        .await
        .unwrap();
    // A retry after a lost ack is stored once.
    bus.publish_audit(&subject, "audit-inst-1", payload.clone())
        .await
        .unwrap();
    bus.publish_audit(&subjects::audit("token"), "audit-inst-2", b"{}".to_vec())
        .await
        .unwrap();

    let mut stream = admin.get_stream(subjects::AUDIT_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 2);
    assert_eq!(info.config.subjects, [subjects::AUDIT_ALL]);
    let msg = tokio::time::timeout(Duration::from_secs(3), outside.next())
        .await
        .expect("outside subscriber got nothing")
        .unwrap();
    assert_eq!(msg.subject.as_str(), subject);
    assert_eq!(
        msg.payload.as_ref(),
        payload.as_slice(),
        "the bytes as given"
    );

    let err = bus
        .publish_audit(&subjects::event(Kind::Service, "web"), "x", b"{}".to_vec())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an audit subject"), "{err}");
    assert_idle(&mut resource_events).await;
}
