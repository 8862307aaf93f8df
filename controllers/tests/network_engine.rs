//! The Network controller against the real Swarm engine. Each test drives `reconcile` directly over a
//! small in-memory `ResourceStore`, with its own installation id and its own network names, and checks
//! the engine with bollard. A guard removes every service and network with the test's prefix when the
//! test ends, also when it fails. No engine (or no Swarm) fails the tests: a silently skipped engine
//! test would hide a broken controller.

mod common;

use berth_api_types::Kind;
use berth_controllers::api::ResourceStore;
use berth_controllers::network::status::NetworkStatus;
use berth_controllers::network::NetworkController;
use berth_controllers::runtime::testing::FakeStore;
use berth_controllers::runtime::{reconcile_once, Action, Error, Hooks};
use bollard::models::{
    EventMessage, Network as SwarmNetwork, NetworkAttachmentConfig, NetworkCreateRequest,
    ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec,
};
use bollard::query_parameters::{EventsOptions, ListNetworksOptions};
use bollard::Docker;
use common::{swarm_engine, test_names, Cleanup};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The API server's side: the runtime's one fake store, plus what these tests ask of it.
struct Store(Arc<FakeStore>);

impl Store {
    fn new(instance: &str) -> Arc<Self> {
        Arc::new(Store(Arc::new(FakeStore::new(instance))))
    }

    /// Stores a Network object, bumping its generation if its spec changed (as the API server does).
    fn apply(&self, name: &str, spec: Value) {
        self.0.put(json!({
            "apiVersion": "berth/v1", "kind": "Network",
            "metadata": {"name": name},
            "spec": spec,
        }));
    }

    fn delete(&self, name: &str) {
        self.0.remove(Kind::Network, name);
    }

    fn status(&self, name: &str) -> NetworkStatus {
        serde_json::from_value(self.0.status(Kind::Network, name)).expect("status decodes")
    }

    fn writes(&self) -> usize {
        self.0.status_writes().len()
    }
}

struct Fixture {
    docker: Docker,
    store: Arc<Store>,
    ctl: Arc<NetworkController>,
    instance: String,
    prefix: String,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn new() -> Self {
        let docker = swarm_engine().await;
        let (prefix, instance) = test_names("net");
        let store = Store::new(&instance);
        let ctl = Arc::new(NetworkController::new(docker.clone(), &instance));
        Fixture {
            docker,
            store,
            ctl,
            instance,
            _cleanup: Cleanup(prefix.clone()),
            prefix,
        }
    }

    /// Every network named exactly `name`.
    async fn networks(&self, name: &str) -> Vec<SwarmNetwork> {
        self.docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(HashMap::from([("name".into(), vec![name.into()])])),
            }))
            .await
            .expect("list networks")
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .collect()
    }

    async fn network(&self, name: &str) -> SwarmNetwork {
        let mut found = self.networks(name).await;
        assert_eq!(found.len(), 1, "exactly one network `{name}`: {found:?}");
        found.remove(0)
    }

    /// One reconcile of `name`, exactly as the runtime's worker runs it.
    async fn try_reconcile(&self, name: &str) -> Result<Action, Error> {
        let api: Arc<dyn ResourceStore> = self.store.0.clone();
        reconcile_once(&self.ctl, api, name).await
    }

    async fn reconcile(&self, name: &str) -> Action {
        self.try_reconcile(name)
            .await
            .unwrap_or_else(|e| panic!("reconcile {name}: {e}"))
    }

    /// Reconciles until `done` holds for the status (the engine frees networks asynchronously).
    async fn reconcile_until(&self, name: &str, what: &str, done: impl Fn(&NetworkStatus) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = self.try_reconcile(name).await;
            if result.is_ok() && done(&self.store.status(name)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still not there after 60 s (last result {result:?}, status {:?})",
                self.store.status(name)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn condition(s: &NetworkStatus, type_: &str) -> (String, String, String) {
    let c = berth_api_types::meta::condition(&s.conditions, type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {s:?}"));
    (
        format!("{:?}", c.status),
        c.reason.clone(),
        c.message.clone(),
    )
}

fn labels(n: &SwarmNetwork) -> HashMap<String, String> {
    n.labels.clone().unwrap_or_default()
}

#[tokio::test]
async fn creates_an_encrypted_overlay_and_re_reconcile_is_a_no_op() {
    let f = Fixture::new().await;
    let name = f.prefix.clone();
    // The stream is lazy; `since` replays what the engine logged from just before the create.
    let since = (chrono::Utc::now().timestamp() - 1).to_string();
    let mut events = f.docker.events(Some(EventsOptions {
        since: Some(since),
        filters: Some(HashMap::from([(
            "type".to_string(),
            f.ctl
                .engine_event_types()
                .into_iter()
                .map(str::to_string)
                .collect(),
        )])),
        ..Default::default()
    }));
    f.store.apply(
        &name,
        json!({"attachable": true, "labels": {"team": "blue"}}),
    );

    assert_eq!(f.reconcile(&name).await, Action::await_change());

    let net = f.network(&name).await;
    assert_eq!(net.driver.as_deref(), Some("overlay"));
    assert_eq!(net.scope.as_deref(), Some("swarm"));
    assert_eq!(net.attachable, Some(true));
    assert_eq!(net.internal, Some(false));
    let options = net.options.clone().unwrap_or_default();
    // Docker 20.10 keeps the value as sent; the overlay driver encrypts whenever the key is present.
    assert_eq!(
        options.get("encrypted").map(String::as_str),
        Some(""),
        "{options:?}"
    );
    let l = labels(&net);
    assert_eq!(l["team"], "blue");
    assert_eq!(l["io.berth.managed-by"], "berth");
    assert_eq!(l["io.berth.instance"], f.instance);
    assert_eq!(l["io.berth.kind"], "network");
    assert_eq!(l["io.berth.name"], name);
    assert_eq!(l["io.berth.uid"].len(), 26, "a ULID: {l:?}");
    assert_eq!(l["io.berth.spec-hash"].len(), 16);

    let st = f.store.status(&name);
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.network_id, net.id);
    assert_eq!(st.encrypted, Some(true));
    assert_eq!(st.driver.as_deref(), Some("overlay"));
    assert_eq!(condition(&st, "Ready").0, "True");
    assert_eq!(condition(&st, "Degraded").0, "False");
    assert_eq!(f.store.writes(), 1);

    // Nothing changed: same network, no status write.
    assert_eq!(f.reconcile(&name).await, Action::await_change());
    assert_eq!(f.network(&name).await.id, net.id);
    assert_eq!(f.store.writes(), 1);

    // Resync sees it, and the engine's create event maps back to the object.
    assert!(f.ctl.engine_names().await.unwrap().contains(&name));
    let mapped = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = events.next().await {
            let ev: EventMessage = ev.expect("engine event");
            if f.ctl.map_engine_event(&ev).as_deref() == Some(name.as_str()) {
                return ev.action;
            }
        }
        None
    })
    .await
    .expect("an engine event for the new network within 10 s");
    assert_eq!(mapped.as_deref(), Some("create"));
}

#[tokio::test]
async fn opting_out_of_encryption_sets_no_encryption_option() {
    let f = Fixture::new().await;
    let name = f.prefix.clone();
    f.store
        .apply(&name, json!({"encrypted": false, "internal": true}));
    f.reconcile(&name).await;

    let net = f.network(&name).await;
    let options = net.options.clone().unwrap_or_default();
    assert!(!options.contains_key("encrypted"), "{options:?}");
    assert_eq!(net.internal, Some(true));
    let st = f.store.status(&name);
    assert_eq!(st.encrypted, Some(false));
    assert_eq!(condition(&st, "Ready").0, "True");

    f.reconcile(&name).await;
    assert_eq!(f.network(&name).await.id, net.id);
    assert_eq!(f.store.writes(), 1);
}

#[tokio::test]
async fn deleting_the_object_removes_its_network() {
    let f = Fixture::new().await;
    let name = f.prefix.clone();
    f.store.apply(&name, json!({}));
    f.reconcile(&name).await;
    assert_eq!(f.networks(&name).await.len(), 1);

    f.store.delete(&name);
    // What resync hands the controller for an orphan: its name from the engine.
    assert!(f.ctl.engine_names().await.unwrap().contains(&name));
    assert_eq!(f.reconcile(&name).await, Action::await_change());
    assert!(f.networks(&name).await.is_empty());
    assert!(!f.ctl.engine_names().await.unwrap().contains(&name));
    // Gone already: still fine.
    assert_eq!(f.reconcile(&name).await, Action::await_change());
}

#[tokio::test]
async fn a_network_berth_does_not_own_is_refused_and_left_alone() {
    let f = Fixture::new().await;
    let unmanaged = format!("{}-hand", f.prefix);
    let other = format!("{}-other", f.prefix);
    let create = |name: &str, labels: HashMap<String, String>| NetworkCreateRequest {
        name: name.to_string(),
        driver: Some("overlay".into()),
        labels: Some(labels),
        ..Default::default()
    };
    let hand_id = f
        .docker
        .create_network(create(&unmanaged, HashMap::new()))
        .await
        .expect("create a network by hand")
        .id;
    let other_labels = HashMap::from([
        ("io.berth.managed-by".to_string(), "berth".to_string()),
        ("io.berth.instance".to_string(), "someone-else".to_string()),
        ("io.berth.kind".to_string(), "network".to_string()),
        ("io.berth.name".to_string(), other.clone()),
    ]);
    let other_id = f
        .docker
        .create_network(create(&other, other_labels.clone()))
        .await
        .expect("create another installation's network")
        .id;

    for (name, id, words) in [
        (&unmanaged, &hand_id, "does not manage"),
        (
            &other,
            &other_id,
            "another berth installation (someone-else)",
        ),
    ] {
        f.store.apply(name, json!({"labels": {"team": "blue"}}));
        assert_eq!(f.reconcile(name).await, Action::await_change());
        let st = f.store.status(name);
        let (status, reason, message) = condition(&st, "Degraded");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Refused"));
        assert!(message.contains(words), "{message}");
        assert!(message.contains(name.as_str()), "{message}");
        assert_eq!(condition(&st, "Ready").0, "False");
        assert_eq!(st.network_id, None);

        // Untouched: same network, labels as they were, no encryption added.
        let net = f.network(name).await;
        assert_eq!(net.id.as_deref(), Some(id.as_str()));
        assert!(!labels(&net).contains_key("team"));
        assert!(!net.options.unwrap_or_default().contains_key("encrypted"));

        // Deleting the object does not delete someone else's network either.
        f.store.delete(name);
        f.reconcile(name).await;
        assert_eq!(f.network(name).await.id.as_deref(), Some(id.as_str()));
    }
    assert_eq!(labels(&f.network(&other).await), other_labels);
    let ours = f.ctl.engine_names().await.unwrap();
    assert!(
        !ours.contains(&unmanaged) && !ours.contains(&other),
        "{ours:?}"
    );
}

#[tokio::test]
async fn a_changed_spec_waits_while_in_use_then_re_creates() {
    let f = Fixture::new().await;
    let name = f.prefix.clone();
    let svc_name = format!("{}-svc", f.prefix);
    f.store.apply(&name, json!({}));
    f.reconcile(&name).await;
    let first = f.network(&name).await;

    let service = ServiceSpec {
        name: Some(svc_name.clone()),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some("berth-test/busybox:1".into()),
                args: Some(vec!["sleep".into(), "600".into()]),
                ..Default::default()
            }),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(name.clone()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let svc_id = f
        .docker
        .create_service(service, None)
        .await
        .expect("create a service on the network")
        .id
        .expect("service id");

    // Swarm networks cannot change: the new spec needs a re-create, which must wait.
    f.store.apply(&name, json!({"encrypted": false}));
    assert_eq!(f.reconcile(&name).await, Action::await_change());
    let st = f.store.status(&name);
    assert_eq!(st.observed_generation, Some(2));
    let (status, reason, message) = condition(&st, "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InUse"));
    assert!(message.contains("must be re-created"), "{message}");
    assert!(
        message.contains(&format!("service {svc_name}")),
        "{message}"
    );
    assert_eq!(condition(&st, "Ready").0, "False");
    assert_eq!(st.network_id, first.id, "the old network stays");
    assert_eq!(st.encrypted, Some(true), "as the engine still has it");
    assert_eq!(f.network(&name).await.id, first.id);
    // Waiting again writes nothing new.
    let writes = f.store.writes();
    f.reconcile(&name).await;
    assert_eq!(f.store.writes(), writes);

    // Deleting the object while the network is in use: an error, so the runtime backs off and retries.
    let spec_before_delete = json!({"encrypted": false});
    f.store.delete(&name);
    match f.try_reconcile(&name).await {
        Err(Error::Transient(why)) => assert!(
            why.contains("still in use") && why.contains(&format!("service {svc_name}")),
            "{why}"
        ),
        other => panic!("expected an in-use error, got {other:?}"),
    }
    assert_eq!(f.network(&name).await.id, first.id);
    f.store.apply(&name, spec_before_delete);

    // Once the service is gone the network is re-created from the new spec.
    f.docker
        .delete_service(&svc_id)
        .await
        .expect("remove service");
    f.reconcile_until(&name, "re-created network", |s| {
        s.network_id.is_some() && s.network_id != first.id && s.encrypted == Some(false)
    })
    .await;
    let second = f.network(&name).await;
    assert_ne!(second.id, first.id);
    assert!(!second
        .options
        .clone()
        .unwrap_or_default()
        .contains_key("encrypted"));
    let st = f.store.status(&name);
    assert_eq!(condition(&st, "Ready").0, "True");
    assert_eq!(condition(&st, "Degraded").0, "False");
    assert_eq!(st.network_id, second.id);

    // And it stays.
    f.reconcile(&name).await;
    assert_eq!(f.network(&name).await.id, second.id);
}
