//! The Service controller against the real Swarm engine, one reconcile at a time: each test drives
//! `reconcile_once` over the runtime's one fake store, exactly as a worker runs it, and checks the
//! engine with bollard. Every test has its own installation id and its own name prefix; a guard
//! removes every service, secret, config, network and volume with that prefix when the test ends,
//! also when it fails. The engine is shared with other test runs, so nothing here assumes it is
//! empty. No engine (or no Swarm) fails the tests: a silently skipped engine test would hide a
//! broken controller.
//!
//! The Service joins a Network object of its own (created by the Network controller, whose status
//! carries the Swarm network's ID), never the installation's default network: that one may belong
//! to another berth on this engine.

mod common;

use berth_api_types::meta::condition;
use berth_api_types::service::ServiceStatus;
use berth_api_types::Kind;
use berth_controllers::api::{ResourceStore, SecretReader};
use berth_controllers::network::NetworkController;
use berth_controllers::runtime::testing::FakeStore;
use berth_controllers::runtime::{reconcile_once, Action, Error, Hooks, Records};
use berth_controllers::service::ServiceController;
use berth_controllers::swarm::files::swarm_name;
use bollard::models::{
    Secret as SwarmSecret, SecretSpec, Service as SwarmService, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, TaskSpecContainerSpec,
};
use bollard::query_parameters::{
    InspectServiceOptions, ListConfigsOptions, ListContainersOptions, ListSecretsOptions,
    ListServicesOptions, UpdateServiceOptions,
};
use bollard::Docker;
use common::{service_by_hand, swarm_engine, test_names, Cleanup};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUSYBOX: &str = "berth-test/busybox:1";
/// Generous bound for anything the engine does asynchronously on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(90);

struct Fixture {
    docker: Docker,
    store: Arc<FakeStore>,
    ctl: Arc<ServiceController>,
    instance: String,
    prefix: String,
    /// The Network object (and Swarm network) every Service of the test joins.
    net: String,
    net_id: String,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn new() -> Self {
        let docker = swarm_engine().await;
        let (prefix, instance) = test_names("svc");
        let cleanup = Cleanup(prefix.clone());
        let store = Arc::new(FakeStore::new(&instance));
        let secrets: Arc<dyn SecretReader> = store.clone();
        let ctl = Arc::new(
            ServiceController::new(
                docker.clone(),
                &instance,
                secrets,
                Records::temporary().expect("temporary records"),
            )
            // Collection is observable at once (the default grace is a minute).
            .with_file_grace(Duration::ZERO),
        );

        // The network, as the Network controller makes it: its status carries the Swarm ID, which
        // the Service controller uses without asking the engine.
        let net = format!("{prefix}-net");
        store.put(json!({
            "apiVersion": "berth/v1", "kind": "Network",
            "metadata": {"name": net}, "spec": {"encrypted": false},
        }));
        let networks = Arc::new(NetworkController::new(docker.clone(), &instance));
        let api: Arc<dyn ResourceStore> = store.clone();
        reconcile_once(&networks, api, &net)
            .await
            .unwrap_or_else(|e| panic!("create the test network: {e}"));
        let net_id = store.status(Kind::Network, &net)["networkId"]
            .as_str()
            .expect("the Network controller reports the network's ID")
            .to_string();
        Fixture {
            docker,
            store,
            ctl,
            instance,
            net,
            net_id,
            prefix,
            _cleanup: cleanup,
        }
    }

    /// Stores a Service object (a new generation if the spec changed), joined to the test network.
    fn apply(&self, name: &str, mut spec: Value) {
        spec["networks"] = json!([self.net]);
        self.store.put(json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": name}, "spec": spec,
        }));
    }

    /// A Secret object holding one key.
    fn secret(&self, name: &str, key: &str, value: &[u8]) {
        self.store.put(json!({
            "apiVersion": "berth/v1", "kind": "Secret",
            "metadata": {"name": name}, "spec": {},
        }));
        self.store.put_data(Kind::Secret, name, &[(key, value)]);
    }

    fn config(&self, name: &str, key: &str, value: &[u8]) {
        self.store.put(json!({
            "apiVersion": "berth/v1", "kind": "Config",
            "metadata": {"name": name}, "spec": {},
        }));
        self.store.put_data(Kind::Config, name, &[(key, value)]);
    }

    fn status(&self, name: &str) -> ServiceStatus {
        serde_json::from_value(self.store.status(Kind::Service, name)).expect("status decodes")
    }

    /// Status writes that changed something, for Services.
    fn writes(&self) -> usize {
        self.store
            .status_writes()
            .iter()
            .filter(|(k, _)| *k == Kind::Service)
            .count()
    }

    async fn try_reconcile(&self, name: &str) -> Result<Action, Error> {
        let api: Arc<dyn ResourceStore> = self.store.clone();
        reconcile_once(&self.ctl, api, name).await
    }

    async fn reconcile(&self, name: &str) -> Action {
        self.try_reconcile(name)
            .await
            .unwrap_or_else(|e| panic!("reconcile {name}: {e}"))
    }

    /// Reconciles (as the runtime's requeues would) until `done` holds for the status.
    async fn reconcile_until(&self, name: &str, what: &str, done: impl Fn(&ServiceStatus) -> bool) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let result = self.try_reconcile(name).await;
            if result.is_ok() && done(&self.status(name)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still not there after {CONVERGE:?} (last result {result:?}, status {:?})",
                self.status(name)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Reconciles until every task runs and the status says Ready.
    async fn ready(&self, name: &str) {
        self.reconcile_until(name, "Ready", |s| {
            cond(s, "Ready").0 == "True" && s.running_replicas == s.desired_replicas
        })
        .await;
    }

    /// The Swarm service named exactly `name`, if any.
    async fn service(&self, name: &str) -> Option<SwarmService> {
        self.docker
            .list_services(Some(ListServicesOptions {
                filters: Some(HashMap::from([("name".into(), vec![name.into()])])),
                ..Default::default()
            }))
            .await
            .expect("list services")
            .into_iter()
            .find(|s| s.spec.as_ref().and_then(|sp| sp.name.as_deref()) == Some(name))
    }

    async fn must_service(&self, name: &str) -> SwarmService {
        self.service(name)
            .await
            .unwrap_or_else(|| panic!("no Swarm service `{name}`"))
    }

    /// Names of the Swarm secrets whose name starts with `prefix`.
    async fn secrets(&self, prefix: &str) -> Vec<SwarmSecret> {
        self.docker
            .list_secrets(Some(ListSecretsOptions {
                filters: Some(HashMap::from([("name".into(), vec![prefix.into()])])),
            }))
            .await
            .expect("list secrets")
            .into_iter()
            .filter(|s| {
                s.spec
                    .as_ref()
                    .and_then(|sp| sp.name.as_deref())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .collect()
    }

    async fn secret_names(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .secrets(prefix)
            .await
            .into_iter()
            .filter_map(|s| s.spec?.name)
            .collect();
        names.sort();
        names
    }

    async fn config_names(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .docker
            .list_configs(Some(ListConfigsOptions {
                filters: Some(HashMap::from([("name".into(), vec![prefix.into()])])),
            }))
            .await
            .expect("list configs")
            .into_iter()
            .filter_map(|c| c.spec?.name)
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names
    }

    /// What a running task of the service reads at `path` (through `docker exec`).
    async fn read_in_task(&self, service: &str, path: &str) -> Vec<u8> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let containers = self
                .docker
                .list_containers(Some(ListContainersOptions {
                    filters: Some(HashMap::from([
                        (
                            "label".into(),
                            vec![format!("com.docker.swarm.service.name={service}")],
                        ),
                        ("status".into(), vec!["running".into()]),
                    ])),
                    ..Default::default()
                }))
                .await
                .expect("list containers");
            for c in containers {
                let id = c.id.unwrap_or_default();
                let out = Command::new("docker")
                    .args(["exec", &id, "cat", path])
                    .output()
                    .expect("docker exec");
                if out.status.success() {
                    return out.stdout;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no running task of `{service}` could read {path}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn cond(s: &ServiceStatus, type_: &str) -> (String, String, String) {
    let c =
        condition(&s.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition in {s:?}"));
    (
        format!("{:?}", c.status),
        c.reason.clone(),
        c.message.clone(),
    )
}

fn version(s: &SwarmService) -> u64 {
    s.version.as_ref().and_then(|v| v.index).expect("a version")
}

fn swarm_spec(s: &SwarmService) -> &ServiceSpec {
    s.spec.as_ref().expect("a spec")
}

fn labels(s: &SwarmService) -> HashMap<String, String> {
    swarm_spec(s).labels.clone().unwrap_or_default()
}

fn replicas(s: &SwarmService) -> Option<i64> {
    swarm_spec(s).mode.as_ref()?.replicated.as_ref()?.replicas
}

fn container(s: &SwarmService) -> &TaskSpecContainerSpec {
    swarm_spec(s)
        .task_template
        .as_ref()
        .and_then(|t| t.container_spec.as_ref())
        .expect("a container spec")
}

/// (secret name, file name) of every secret the service mounts.
fn mounted_secrets(s: &SwarmService) -> Vec<(String, String)> {
    container(s)
        .secrets
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.secret_name.unwrap_or_default(),
                m.file.and_then(|f| f.name).unwrap_or_default(),
            )
        })
        .collect()
}

fn mounted_configs(s: &SwarmService) -> Vec<(String, String)> {
    container(s)
        .configs
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.config_name.unwrap_or_default(),
                m.file.and_then(|f| f.name).unwrap_or_default(),
            )
        })
        .collect()
}

/// A long-running busybox: stops fast, needs nothing.
fn sleeper() -> Value {
    json!({
        "image": BUSYBOX,
        "command": ["sleep", "3600"],
        "init": true,
        "stopGracePeriod": "1s",
        "replicas": 1,
    })
}

/// A value no test prints: random bytes, different each run.
fn secret_value(tag: &str) -> Vec<u8> {
    format!("{tag}-{}", ulid::Ulid::new()).into_bytes()
}

#[tokio::test]
async fn creates_the_service_with_berths_labels_then_re_reconcile_is_a_no_op() {
    let f = Fixture::new().await;
    let name = format!("{}-web", f.prefix);
    let mut spec = sleeper();
    spec["labels"] = json!({"team": "blue"});
    spec["containerLabels"] = json!({"tier": "front"});
    spec["env"] = json!([{"name": "GREETING", "value": "hello"}]);
    f.apply(&name, spec);

    // A service that was just created has no tasks yet: not Ready, looked at again soon.
    assert!(
        matches!(f.reconcile(&name).await, Action::Requeue(_)),
        "a new service is looked at again soon"
    );
    let svc = f.must_service(&name).await;
    let obj = f.store.object(Kind::Service, &name).expect("the object");
    let l = labels(&svc);
    assert_eq!(l["team"], "blue", "the spec's labels: {l:?}");
    assert_eq!(l["io.berth.managed-by"], "berth");
    assert_eq!(l["io.berth.instance"], f.instance);
    assert_eq!(l["io.berth.kind"], "service");
    assert_eq!(l["io.berth.name"], name);
    assert_eq!(Some(&l["io.berth.uid"]), obj.metadata.uid.as_ref());
    assert_eq!(l["io.berth.generation"], "1");
    assert_eq!(l["io.berth.spec-hash"].len(), 16, "{l:?}");
    let c = container(&svc);
    assert_eq!(c.image.as_deref(), Some(BUSYBOX));
    assert_eq!(
        c.command.as_deref(),
        Some(&["sleep".to_string(), "3600".to_string()][..])
    );
    assert_eq!(c.env.as_deref(), Some(&["GREETING=hello".to_string()][..]));
    let cl = c.labels.clone().unwrap_or_default();
    assert_eq!(cl["tier"], "front");
    assert_eq!(
        cl["io.berth.name"], name,
        "containers carry the ownership too"
    );
    assert_eq!(replicas(&svc), Some(1));
    let nets: Vec<String> = swarm_spec(&svc)
        .task_template
        .as_ref()
        .and_then(|t| t.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.target)
        .collect();
    assert_eq!(
        nets,
        vec![f.net_id.clone()],
        "joined by the ID the Network's status gives"
    );

    // The runtime wrote the status reconcile returned.
    let st = f.status(&name);
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.swarm_service_id, svc.id);
    assert_eq!(st.desired_replicas, 1);
    assert_eq!(st.image.as_deref(), Some(BUSYBOX));
    assert_eq!(cond(&st, "Ready").0, "False");
    assert_eq!(
        st.revisions.len(),
        1,
        "the first rollout: {:?}",
        st.revisions
    );
    assert_eq!(f.writes(), 1);
    assert!(f.ctl.engine_names().await.unwrap().contains(&name));

    // Until its task runs.
    f.ready(&name).await;
    let st = f.status(&name);
    assert_eq!(st.running_replicas, 1);
    assert_eq!(cond(&st, "Ready").0, "True");
    assert_eq!(cond(&st, "Degraded").0, "False");

    // Converged: another reconcile writes nothing, to the engine or to the status.
    let before = version(&f.must_service(&name).await);
    let writes = f.writes();
    assert_eq!(f.reconcile(&name).await, Action::await_change());
    assert_eq!(f.reconcile(&name).await, Action::await_change());
    assert_eq!(
        version(&f.must_service(&name).await),
        before,
        "no engine update"
    );
    assert_eq!(f.writes(), writes, "no status write");
    assert_eq!(f.status(&name).revisions.len(), 1);

    // A new generation of the spec is sent to the engine, and the status observes it.
    let mut spec = sleeper();
    spec["labels"] = json!({"team": "blue"});
    spec["containerLabels"] = json!({"tier": "front"});
    spec["env"] = json!([{"name": "GREETING", "value": "bonjour"}]);
    f.apply(&name, spec);
    f.reconcile_until(&name, "generation 2 observed and Ready", |s| {
        s.observed_generation == Some(2) && cond(s, "Ready").0 == "True"
    })
    .await;
    let svc = f.must_service(&name).await;
    assert!(version(&svc) > before, "berth updated the service");
    assert_eq!(labels(&svc)["io.berth.generation"], "2");
    assert_eq!(
        container(&svc).env.as_deref(),
        Some(&["GREETING=bonjour".to_string()][..])
    );
}

#[tokio::test]
async fn drift_made_by_hand_is_put_back() {
    let f = Fixture::new().await;
    let name = format!("{}-web", f.prefix);
    let mut spec = sleeper();
    spec["labels"] = json!({"team": "blue"});
    f.apply(&name, spec);
    f.reconcile(&name).await;
    f.ready(&name).await;
    let ours = f.must_service(&name).await;

    // Someone scales the service and drops a label behind berth's back.
    let mut changed = swarm_spec(&ours).clone();
    changed.mode = Some(ServiceSpecMode {
        replicated: Some(ServiceSpecModeReplicated { replicas: Some(3) }),
        ..Default::default()
    });
    changed.labels.as_mut().unwrap().remove("team");
    f.docker
        .update_service(
            ours.id.as_deref().unwrap(),
            changed,
            UpdateServiceOptions {
                version: version(&ours) as i32,
                ..Default::default()
            },
            None,
        )
        .await
        .expect("update the service by hand");
    let by_hand = version(&f.must_service(&name).await);
    assert!(by_hand > version(&ours));
    assert_eq!(replicas(&f.must_service(&name).await), Some(3));

    // Reconciling puts the spec back (an update may wait out the pacing interval first).
    let deadline = Instant::now() + CONVERGE;
    loop {
        let action = f.reconcile(&name).await;
        let now = f.must_service(&name).await;
        if replicas(&now) == Some(1) {
            assert_eq!(labels(&now).get("team").map(String::as_str), Some("blue"));
            assert!(version(&now) > by_hand, "berth wrote the service");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hand-made drift is still there (last action {action:?})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    f.ready(&name).await;
    let st = f.status(&name);
    assert_eq!(st.desired_replicas, 1);
    assert_eq!(st.observed_generation, Some(1));

    // And it stays put back.
    let put_back = version(&f.must_service(&name).await);
    f.reconcile(&name).await;
    assert_eq!(version(&f.must_service(&name).await), put_back);
}

#[tokio::test]
async fn a_name_taken_by_a_service_berth_does_not_own_is_refused_and_left_alone() {
    let f = Fixture::new().await;
    let unmanaged = format!("{}-hand", f.prefix);
    let other = format!("{}-other", f.prefix);
    let other_labels = HashMap::from([
        ("io.berth.managed-by".to_string(), "berth".to_string()),
        ("io.berth.instance".to_string(), "someone-else".to_string()),
        ("io.berth.kind".to_string(), "service".to_string()),
        ("io.berth.name".to_string(), other.clone()),
    ]);
    for (name, l) in [
        (
            &unmanaged,
            HashMap::from([("mine".to_string(), "yes".to_string())]),
        ),
        (&other, other_labels.clone()),
    ] {
        service_by_hand(&f.docker, name, l).await;
    }

    for (name, words) in [
        (&unmanaged, "does not manage"),
        (&other, "another berth installation (someone-else)"),
    ] {
        let before = f.must_service(name).await;
        f.apply(name, sleeper());
        assert_eq!(f.reconcile(name).await, Action::await_change());
        let st = f.status(name);
        let (status, reason, message) = cond(&st, "Ready");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Refused"));
        assert!(message.contains(words), "{message}");
        assert!(message.contains(name.as_str()), "{message}");
        assert_eq!(cond(&st, "Degraded").0, "True");
        assert_eq!(st.observed_generation, Some(1));

        // Untouched: same version, same spec.
        let after = f.must_service(name).await;
        assert_eq!(after.id, before.id);
        assert_eq!(version(&after), version(&before));
        assert_eq!(after.spec, before.spec);

        // Refused again: nothing new is written anywhere.
        let writes = f.writes();
        assert_eq!(f.reconcile(name).await, Action::await_change());
        assert_eq!(f.writes(), writes);
        assert_eq!(version(&f.must_service(name).await), version(&before));

        // Deleting the object does not delete someone else's service either.
        f.store.remove(Kind::Service, name);
        assert_eq!(f.reconcile(name).await, Action::await_change());
        assert_eq!(version(&f.must_service(name).await), version(&before));
    }
    assert_eq!(labels(&f.must_service(&other).await), other_labels);
    let ours = f.ctl.engine_names().await.unwrap();
    assert!(
        !ours.contains(&unmanaged) && !ours.contains(&other),
        "{ours:?}"
    );
}

#[tokio::test]
async fn a_rotated_secret_moves_the_service_and_the_old_one_is_collected() {
    let f = Fixture::new().await;
    let name = format!("{}-app", f.prefix);
    let db = format!("{}-db", f.prefix);
    let conf = format!("{}-conf", f.prefix);
    let first = secret_value("one");
    f.secret(&db, "password", &first);
    f.config(&conf, "app.conf", b"mode = test\n");
    // A secret of this prefix that berth did not make: collection must leave it alone.
    let hand = format!("{}-hand", f.prefix);
    f.docker
        .create_secret(SecretSpec {
            name: Some(hand.clone()),
            data: Some("aGFuZA==".into()),
            ..Default::default()
        })
        .await
        .expect("create a secret by hand");
    let mut spec = sleeper();
    spec["secrets"] = json!([{"name": db}]);
    spec["configs"] = json!([{"name": conf, "target": "/etc/app.conf"}]);
    f.apply(&name, spec);

    f.reconcile(&name).await;
    // The value is materialised under a content-addressed name, labelled as berth's.
    let v1 = swarm_name(&db, "password", &f.store.digest(&first));
    let c1 = swarm_name(&conf, "app.conf", &f.store.digest(b"mode = test\n"));
    assert_eq!(f.secret_names(&db).await, vec![v1.clone()]);
    assert_eq!(f.config_names(&conf).await, vec![c1.clone()]);
    let s1 = f.secrets(&v1).await.remove(0);
    let l = s1.spec.as_ref().and_then(|s| s.labels.clone()).unwrap();
    assert_eq!(l["io.berth.managed-by"], "berth");
    assert_eq!(l["io.berth.instance"], f.instance);
    assert_eq!(l["io.berth.kind"], "secret");
    assert_eq!(l["io.berth.name"], db);
    assert_eq!(l["io.berth.key"], "password");
    let svc = f.must_service(&name).await;
    assert_eq!(mounted_secrets(&svc), vec![(v1.clone(), db.clone())]);
    assert_eq!(
        mounted_configs(&svc),
        vec![(c1.clone(), "/etc/app.conf".to_string())]
    );
    f.ready(&name).await;
    assert!(
        f.read_in_task(&name, &format!("/run/secrets/{db}")).await == first,
        "the task does not read the Secret's value"
    );

    // Rotate: the new value is a new Swarm secret, the service moves onto it (a rolling update),
    // and the old one, unused now, is collected by the reconcile that wrote.
    let second = secret_value("two");
    f.store
        .put_data(Kind::Secret, &db, &[("password", &second)]);
    let v2 = swarm_name(&db, "password", &f.store.digest(&second));
    assert_ne!(v1, v2);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let action = f.reconcile(&name).await;
        if mounted_secrets(&f.must_service(&name).await) == vec![(v2.clone(), db.clone())] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service does not mount the new secret (last action {action:?})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        f.secret_names(&db).await,
        vec![v2.clone()],
        "the old value's secret is collected"
    );
    assert_eq!(
        f.config_names(&conf).await,
        vec![c1.clone()],
        "the config in use stays"
    );
    assert_eq!(f.secret_names(&hand).await, vec![hand.clone()]);
    f.ready(&name).await;
    assert!(
        f.read_in_task(&name, &format!("/run/secrets/{db}")).await == second,
        "the task does not read the rotated value"
    );
    // Resync's collection keeps what is in use.
    let api: Arc<dyn ResourceStore> = f.store.clone();
    let ctx = berth_controllers::runtime::Context {
        installation: api.installation().await.unwrap(),
        cache: Default::default(),
        store: api,
    };
    f.ctl.collect_garbage(&ctx).await.expect("collect garbage");
    assert_eq!(f.secret_names(&db).await, vec![v2.clone()]);
    assert_eq!(f.config_names(&conf).await, vec![c1.clone()]);

    // The master key changes (`berth admin rotate-master-key`; the same happens once at the upgrade
    // from names of plain SHA-256 hashes): every digest, so every name, changes with it. The values
    // did not change, and the normal path moves the service onto the new names and collects the
    // old ones, exactly as for a changed value.
    f.store.set_master_key(&[77u8; 32]);
    let v3 = swarm_name(&db, "password", &f.store.digest(&second));
    let c3 = swarm_name(&conf, "app.conf", &f.store.digest(b"mode = test\n"));
    assert_ne!(v3, v2);
    assert_ne!(c3, c1);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let action = f.reconcile(&name).await;
        let svc = f.must_service(&name).await;
        if mounted_secrets(&svc) == vec![(v3.clone(), db.clone())]
            && mounted_configs(&svc) == vec![(c3.clone(), "/etc/app.conf".to_string())]
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service does not move onto the re-keyed names (last action {action:?})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + CONVERGE;
    while f.secret_names(&db).await != vec![v3.clone()]
        || f.config_names(&conf).await != vec![c3.clone()]
    {
        assert!(
            Instant::now() < deadline,
            "the old names are not collected: {:?} {:?}",
            f.secret_names(&db).await,
            f.config_names(&conf).await
        );
        f.reconcile(&name).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    f.ready(&name).await;
    assert!(
        f.read_in_task(&name, &format!("/run/secrets/{db}")).await == second,
        "the task reads the same value under its new name"
    );

    // The object is deleted: cleanup removes its service and what only it used.
    f.store.remove(Kind::Service, &name);
    assert!(f.ctl.engine_names().await.unwrap().contains(&name));
    assert_eq!(f.reconcile(&name).await, Action::await_change());
    assert!(f.service(&name).await.is_none(), "the service is removed");
    assert!(
        f.docker
            .inspect_service(svc.id.as_deref().unwrap(), None::<InspectServiceOptions>)
            .await
            .is_err(),
        "by ID too"
    );
    assert!(
        f.secret_names(&db).await.is_empty(),
        "its secret is removed"
    );
    assert!(
        f.config_names(&conf).await.is_empty(),
        "its config is removed"
    );
    assert_eq!(
        f.secret_names(&hand).await,
        vec![hand.clone()],
        "a secret berth did not make stays"
    );
    assert!(!f.ctl.engine_names().await.unwrap().contains(&name));
    // Gone already: still fine.
    assert_eq!(f.reconcile(&name).await, Action::await_change());
}
