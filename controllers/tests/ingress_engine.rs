//! The Ingress controller against the real Swarm engine and a real Caddy proxy
//! (`berth-test/caddy:1`), one converge at a time: each test drives `converge_once` over the
//! runtime's one fake store, exactly as a worker runs it, and checks the engine with bollard and the
//! proxy through its remote admin endpoint on this node (as berth reaches it, with berth's client
//! identity). Every test has its own installation id, name prefix (its proxy is `<prefix>-lb`) and
//! free high host ports, so it never meets the e2e ingress tests (ports 443, 80 and 2021) or another
//! test here; a guard removes every service, secret, config, network and volume with
//! the prefix when the test ends, also when it fails. No engine (or no Swarm) fails the tests.
//!
//! Backend Services are objects in the fake store only: the controller reads their spec (networks,
//! image), and nothing here sends requests through the proxy to them (the e2e tests do that).

mod common;

use berth_api_types::meta::condition;
use berth_api_types::Kind;
use berth_controllers::api::{ResourceStore, SecretReader};
use berth_controllers::ingress::admin::Admin;
use berth_controllers::ingress::build::Settings;
use berth_controllers::ingress::ca::AdminIdentity;
use berth_controllers::ingress::status::IngressStatus;
use berth_controllers::ingress::IngressController;
use berth_controllers::network::NetworkController;
use berth_controllers::runtime::testing::FakeStore;
use berth_controllers::runtime::{converge_once, reconcile_once, Action, Context, Error, Hooks};
use bollard::models::{
    EndpointPortConfigPublishModeEnum, Service as SwarmService, ServiceSpec, TaskState,
};
use bollard::query_parameters::{
    InspectServiceOptions, ListConfigsOptions, ListSecretsOptions, ListServicesOptions,
    ListTasksOptions,
};
use bollard::Docker;
use common::{service_by_hand, swarm_engine, test_names, Cleanup};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const CADDY: &str = "berth-test/caddy:1";
const BUSYBOX: &str = "berth-test/busybox:1";
/// Generous bound for a proxy start or a collection on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(120);
/// `swarm::files::GC_GRACE`: files created this recently are never collected.
const GC_GRACE: Duration = Duration::from_secs(60);

/// Three free host ports (HTTPS, HTTP, admin) above the e2e tests' 443, 80 and 2021 and apart from
/// each other: 18443+n, 18080+n and 18800+n, n from a random start and distinct within this process.
fn free_ports() -> (u16, u16, u16) {
    // One random start per process, then one step per call: two tests of this process never
    // get the same ports, even before the first proxy has bound its own.
    static START: OnceLock<u16> = OnceLock::new();
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = *START.get_or_init(|| (ulid::Ulid::new().random() % 300) as u16);
    for _ in 0..300 {
        let n = (start + NEXT.fetch_add(1, Ordering::SeqCst)) % 300;
        let (https, http, admin) = (18443 + n, 18080 + n, 18800 + n);
        let free = |p: u16| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok();
        if free(https) && free(http) && free(admin) {
            return (https, http, admin);
        }
    }
    panic!("no three free ports in 18443..18743 / 18080..18380 / 18800..19100");
}

struct Fixture {
    docker: Docker,
    store: Arc<FakeStore>,
    ctl: Arc<IngressController>,
    settings: Settings,
    identity: AdminIdentity,
    instance: String,
    prefix: String,
    /// The Network object (and Swarm network) the backend Service joins.
    net_id: String,
    /// The backend Service object.
    web: String,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn new() -> Self {
        let docker = swarm_engine().await;
        let (prefix, instance) = test_names("ing");
        let cleanup = Cleanup(prefix.clone());
        let (https_port, http_port, admin_port) = free_ports();
        let settings = Settings {
            name: format!("{prefix}-lb"),
            image: CADDY.into(),
            https_port,
            http_port,
            admin_port,
        };
        let identity = AdminIdentity::generate(&instance).expect("an admin identity");
        settings.validate().expect("valid ingress settings");
        let store = Arc::new(FakeStore::new(&instance));
        let api: Arc<dyn ResourceStore> = store.clone();
        let secrets: Arc<dyn SecretReader> = store.clone();
        let ctl = Arc::new(IngressController::new(
            docker.clone(),
            api.clone(),
            secrets,
            &instance,
            settings.clone(),
            identity.clone(),
        ));

        // The backend's network, made by the Network controller: the proxy joins it.
        let net = format!("{prefix}-net");
        store.put(json!({
            "apiVersion": "berth/v1", "kind": "Network",
            "metadata": {"name": net}, "spec": {"encrypted": false},
        }));
        let networks = Arc::new(NetworkController::new(docker.clone(), &instance));
        reconcile_once(&networks, api, &net)
            .await
            .unwrap_or_else(|e| panic!("create the test network: {e}"));
        let net_id = store.status(Kind::Network, &net)["networkId"]
            .as_str()
            .expect("the Network controller reports the network's ID")
            .to_string();
        let web = format!("{prefix}-web");
        store.put(json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": web},
            "spec": {"image": BUSYBOX, "networks": [net]},
        }));
        Fixture {
            docker,
            store,
            ctl,
            settings,
            identity,
            instance,
            net_id,
            web,
            prefix,
            _cleanup: cleanup,
        }
    }

    fn lb(&self) -> &str {
        &self.settings.name
    }

    /// Stores an Ingress routing `paths` of `host` to the backend on port 8080.
    fn ingress(&self, name: &str, host: &str, paths: &[&str], tls: Value) {
        let paths: Vec<Value> = paths
            .iter()
            .map(|p| json!({"path": p, "service": self.web, "port": 8080}))
            .collect();
        self.store.put(json!({
            "apiVersion": "berth/v1", "kind": "Ingress",
            "metadata": {"name": name},
            "spec": {"rules": [{"host": host, "paths": paths}], "tls": tls},
        }));
    }

    fn status(&self, name: &str) -> IngressStatus {
        serde_json::from_value(self.store.status(Kind::Ingress, name)).expect("status decodes")
    }

    fn writes(&self) -> usize {
        self.store
            .status_writes()
            .iter()
            .filter(|(k, _)| *k == Kind::Ingress)
            .count()
    }

    async fn try_converge(&self) -> Result<Action, Error> {
        let api: Arc<dyn ResourceStore> = self.store.clone();
        converge_once(&self.ctl, api).await
    }

    async fn converge(&self) -> Action {
        self.try_converge()
            .await
            .unwrap_or_else(|e| panic!("converge: {e}"))
    }

    /// Converges (as the runtime's requeues would) until every named Ingress is Ready.
    async fn converge_until_ready(&self, names: &[&str]) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let result = self.try_converge().await;
            if result.is_ok() && names.iter().all(|n| ready(&self.status(n))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy does not serve after {CONVERGE:?} (last result {result:?}, statuses {:?})",
                names.iter().map(|n| self.status(n)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn collect_garbage(&self) {
        let api: Arc<dyn ResourceStore> = self.store.clone();
        let ctx = Context {
            installation: api.installation().await.expect("installation"),
            cache: Default::default(),
            store: api,
        };
        self.ctl
            .collect_garbage(&ctx)
            .await
            .unwrap_or_else(|e| panic!("collect garbage: {e}"));
    }

    async fn proxy(&self) -> Option<SwarmService> {
        self.docker
            .list_services(Some(ListServicesOptions {
                filters: Some(HashMap::from([("name".into(), vec![self.lb().into()])])),
                ..Default::default()
            }))
            .await
            .expect("list services")
            .into_iter()
            .find(|s| s.spec.as_ref().and_then(|sp| sp.name.as_deref()) == Some(self.lb()))
    }

    async fn must_proxy(&self) -> SwarmService {
        self.proxy().await.expect("the proxy service exists")
    }

    /// (name, labels, content) of this proxy's Swarm configs.
    async fn configs(&self) -> Vec<(String, HashMap<String, String>, Vec<u8>)> {
        use base64::Engine;
        self.docker
            .list_configs(Some(ListConfigsOptions {
                filters: Some(HashMap::from([("name".into(), vec![self.lb().into()])])),
            }))
            .await
            .expect("list configs")
            .into_iter()
            .filter_map(|c| {
                let spec = c.spec?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(spec.data.unwrap_or_default())
                    .unwrap_or_default();
                Some((spec.name?, spec.labels.unwrap_or_default(), data))
            })
            .filter(|(n, _, _)| n.starts_with(self.lb()))
            .collect()
    }

    /// (name, labels) of this proxy's Swarm secrets.
    async fn secrets(&self) -> Vec<(String, HashMap<String, String>)> {
        self.docker
            .list_secrets(Some(ListSecretsOptions {
                filters: Some(HashMap::from([("name".into(), vec![self.lb().into()])])),
            }))
            .await
            .expect("list secrets")
            .into_iter()
            .filter_map(|s| {
                let spec = s.spec?;
                Some((spec.name?, spec.labels.unwrap_or_default()))
            })
            .filter(|(n, _)| n.starts_with(self.lb()))
            .collect()
    }

    async fn config_names(&self, role: &str) -> BTreeSet<String> {
        self.configs()
            .await
            .into_iter()
            .filter(|(_, l, _)| l.get("io.berth.role").map(String::as_str) == Some(role))
            .map(|(n, _, _)| n)
            .collect()
    }

    async fn secret_names(&self, role: &str) -> BTreeSet<String> {
        self.secrets()
            .await
            .into_iter()
            .filter(|(_, l)| l.get("io.berth.role").map(String::as_str) == Some(role))
            .map(|(n, _)| n)
            .collect()
    }

    /// The content of the Swarm config `name`, as JSON.
    async fn config_json(&self, name: &str) -> Value {
        let (_, _, data) = self
            .configs()
            .await
            .into_iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no Swarm config `{name}`"));
        serde_json::from_slice(&data).expect("a JSON config")
    }

    async fn state_dir(&self) -> Option<PathBuf> {
        self.docker
            .inspect_volume(&self.settings.volume())
            .await
            .ok()
            .map(|v| PathBuf::from(v.mountpoint))
    }

    /// The proxy's remote admin API on this node: the node's swarm address and the admin port,
    /// verified against berth's CA, called with berth's identity.
    async fn admin(&self) -> Admin {
        let info = self.docker.info().await.expect("engine info");
        let ip: std::net::IpAddr = info
            .swarm
            .and_then(|s| s.node_addr)
            .and_then(|a| a.parse().ok())
            .expect("the node's swarm address");
        let ca = self.config_names("ca").await;
        let ca = ca.iter().next().expect("berth's CA");
        let pem = self
            .configs()
            .await
            .into_iter()
            .find(|(n, _, _)| n == ca)
            .map(|(_, _, data)| String::from_utf8(data).unwrap())
            .unwrap();
        Admin::new(
            &self.identity,
            &pem,
            self.lb(),
            std::net::SocketAddr::new(ip, self.settings.admin_port),
        )
        .expect("an admin client")
    }

    /// The config the proxy runs, once its admin endpoint answers: a task Swarm reports running
    /// (and berth Ready, booted with its config) may still be opening it.
    async fn live_config(&self, admin: &Admin) -> Value {
        let deadline = Instant::now() + CONVERGE;
        loop {
            match admin.config().await {
                Ok(v) => return v,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the proxy's admin API does not answer: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// IDs of the proxy's tasks that should be running.
    async fn task_ids(&self) -> BTreeSet<String> {
        let svc = self.must_proxy().await;
        self.docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([
                    ("service".into(), vec![svc.id.unwrap_or_default()]),
                    ("desired-state".into(), vec!["running".into()]),
                ])),
            }))
            .await
            .expect("list tasks")
            .into_iter()
            .filter(|t| t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING))
            .filter_map(|t| t.id)
            .collect()
    }
}

fn cond(s: &IngressStatus, type_: &str) -> (String, String, String) {
    let c =
        condition(&s.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition in {s:?}"));
    (
        format!("{:?}", c.status),
        c.reason.clone(),
        c.message.clone(),
    )
}

fn ready(s: &IngressStatus) -> bool {
    condition(&s.conditions, "Ready").is_some_and(|c| format!("{:?}", c.status) == "True")
}

fn version(s: &SwarmService) -> u64 {
    s.version.as_ref().and_then(|v| v.index).expect("a version")
}

fn spec(s: &SwarmService) -> &ServiceSpec {
    s.spec.as_ref().expect("a spec")
}

/// (config name, target) of every config the proxy mounts.
fn mounted_configs(s: &SwarmService) -> Vec<(String, String)> {
    spec(s)
        .task_template
        .as_ref()
        .and_then(|t| t.container_spec.as_ref())
        .and_then(|c| c.configs.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            (
                c.config_name.unwrap_or_default(),
                c.file.and_then(|f| f.name).unwrap_or_default(),
            )
        })
        .collect()
}

fn mounted_secrets(s: &SwarmService) -> BTreeSet<String> {
    spec(s)
        .task_template
        .as_ref()
        .and_then(|t| t.container_spec.as_ref())
        .and_then(|c| c.secrets.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.secret_name)
        .collect()
}

/// The boot config the proxy service mounts.
fn boot(s: &SwarmService) -> String {
    mounted_configs(s)
        .into_iter()
        .find(|(_, target)| target == "/etc/berth-ingress/caddy.json")
        .map(|(name, _)| name)
        .expect("a boot config")
}

/// What the node's HTTP port answers for `host` and `path` (status line and Location), polled until
/// the proxy listens.
fn http_redirect(port: u16, host: &str, path: &str) -> (String, String) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let answer = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        if let Ok(text) = answer.as_ref() {
            if let Some(status) = text.lines().next().filter(|l| l.starts_with("HTTP/")) {
                let location = text
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                    })
                    .map(|(_, v)| v.trim().to_string())
                    .unwrap_or_default();
                return (status.trim().to_string(), location);
            }
        }
        assert!(
            Instant::now() < deadline,
            "nothing answers HTTP on port {port}: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test]
async fn serves_every_ingress_then_delivers_route_changes_and_drift_live() {
    let f = Fixture::new().await;
    let (a, b) = (format!("{}-a", f.prefix), format!("{}-b", f.prefix));
    let (host_a, host_b) = (
        format!("a.{}.test", f.prefix),
        format!("b.{}.test", f.prefix),
    );
    let internal = json!({"mode": "internal"});
    f.ingress(&a, &host_a, &["/"], internal.clone());
    f.ingress(&b, &host_b, &["/"], internal.clone());

    // The first converge creates the proxy: a global service on host-mode ports from the settings.
    assert!(
        matches!(f.converge().await, Action::Requeue(_)),
        "a starting proxy is looked at again soon"
    );
    let svc = f.must_proxy().await;
    let sp = spec(&svc);
    let l = sp.labels.clone().unwrap_or_default();
    assert_eq!(l["io.berth.managed-by"], "berth");
    assert_eq!(l["io.berth.instance"], f.instance);
    assert_eq!(l["io.berth.kind"], "ingress");
    assert_eq!(l["io.berth.name"], f.lb());
    assert_eq!(l["io.berth.role"], "proxy");
    assert!(
        sp.mode.as_ref().is_some_and(|m| m.global.is_some()),
        "{:?}",
        sp.mode
    );
    let mut ports: Vec<(i64, i64, bool)> = sp
        .endpoint_spec
        .as_ref()
        .and_then(|e| e.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            (
                p.target_port.unwrap_or_default(),
                p.published_port.unwrap_or_default(),
                p.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST),
            )
        })
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        vec![
            (80, i64::from(f.settings.http_port), true),
            (443, i64::from(f.settings.https_port), true),
            (2021, i64::from(f.settings.admin_port), true)
        ]
    );
    let c = sp
        .task_template
        .as_ref()
        .unwrap()
        .container_spec
        .as_ref()
        .unwrap();
    assert_eq!(c.image.as_deref(), Some(CADDY));
    let nets: Vec<String> = sp
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
        "the proxy joins the backend's network"
    );
    // Its config and berth's CA (certificate as a config, key as a secret), labelled as berth's.
    let first_config = boot(&svc);
    assert_eq!(
        f.config_names("config").await,
        BTreeSet::from([first_config.clone()])
    );
    let cas = f.config_names("ca").await;
    assert_eq!(cas.len(), 1, "{cas:?}");
    let ca = cas.iter().next().unwrap().clone();
    assert_eq!(f.secret_names("ca-key").await.len(), 1);
    assert!(mounted_configs(&svc).contains(&(ca.clone(), "/etc/berth-ingress/ca.crt".into())));
    assert_eq!(mounted_secrets(&svc), f.secret_names("ca-key").await);
    let rendered = f.config_json(&first_config).await;
    let hosts = rendered["apps"]["http"]["servers"]["https"]["routes"].to_string();
    assert!(
        hosts.contains(&host_a) && hosts.contains(&host_b),
        "{hosts}"
    );
    assert!(hosts.contains(&format!("tasks.{}", f.web)), "{hosts}");
    // Every Ingress's status: accepted, waiting for the proxy.
    for (name, host) in [(&a, &host_a), (&b, &host_b)] {
        let st = f.status(name);
        assert_eq!(st.observed_generation, Some(1));
        assert_eq!(st.urls, vec![format!("https://{host}/")]);
        assert_eq!(st.proxy.as_deref(), Some(f.lb()));
        assert_eq!(cond(&st, "Accepted").0, "True");
        assert_eq!(cond(&st, "Ready").1, "ProxyStarting");
    }

    // Once the task runs, both are served from the boot config.
    f.converge_until_ready(&[&a, &b]).await;
    let ca_pem = String::from_utf8(
        f.configs()
            .await
            .into_iter()
            .find(|(n, _, _)| *n == ca)
            .unwrap()
            .2,
    )
    .unwrap();
    for name in [&a, &b] {
        let st = f.status(name);
        assert_eq!(st.config.as_deref(), Some(first_config.as_str()));
        assert_eq!(st.delivery.as_deref(), Some("restart"), "booted with it");
        assert_eq!(st.ca_certificate.as_deref(), Some(ca_pem.as_str()));
        let (_, reason, message) = cond(&st, "Ready");
        assert_eq!(reason, "Serving");
        assert!(message.contains(&first_config), "{message}");
        assert_eq!(st.proxies, Some(1), "one proxy node serves it");
    }
    let admin = f.admin().await;
    assert!(
        f.live_config(&admin).await == rendered,
        "the proxy runs its boot config"
    );
    // The node's HTTP port (from the settings) answers with the redirect to the HTTPS port.
    let (status, location) = http_redirect(f.settings.http_port, &host_a, "/x");
    assert!(status.contains(" 308"), "{status}");
    assert_eq!(
        location,
        format!("https://{host_a}:{}/x", f.settings.https_port)
    );

    // Converged: another converge changes nothing, in the engine or in any status.
    let before = version(&f.must_proxy().await);
    let writes = f.writes();
    assert_eq!(f.converge().await, Action::await_change());
    assert_eq!(version(&f.must_proxy().await), before, "no service update");
    assert_eq!(f.writes(), writes, "no status write");

    // A new path: a new config, loaded live; the service spec and its tasks stay.
    let tasks = f.task_ids().await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    f.ingress(&a, &host_a, &["/", "/api"], internal.clone());
    assert_eq!(f.converge().await, Action::await_change());
    let after = f.must_proxy().await;
    assert_eq!(version(&after), before, "the service spec is not touched");
    assert_eq!(boot(&after), first_config, "it keeps its boot config");
    assert_eq!(f.task_ids().await, tasks, "no task restarted");
    let configs = f.config_names("config").await;
    assert_eq!(configs.len(), 2, "{configs:?}");
    let second_config = configs
        .iter()
        .find(|n| **n != first_config)
        .unwrap()
        .clone();
    let second = f.config_json(&second_config).await;
    assert!(
        second.to_string().contains("/api/*"),
        "the new path is in the new config"
    );
    assert!(
        f.live_config(&admin).await == second,
        "the proxy runs the new config"
    );
    let st = f.status(&a);
    assert_eq!(st.observed_generation, Some(2));
    assert_eq!(
        st.urls,
        vec![
            format!("https://{host_a}/"),
            format!("https://{host_a}/api")
        ]
    );
    // Every Ingress is served by the new config, the one whose spec did not change too.
    for name in [&a, &b] {
        let st = f.status(name);
        assert!(ready(&st), "{st:?}");
        assert_eq!(st.config.as_deref(), Some(second_config.as_str()), "{name}");
        assert_eq!(st.delivery.as_deref(), Some("live"), "{name}");
        assert_eq!(st.proxies, Some(1), "{name}");
    }

    // Drift: a config loaded by hand through the admin endpoint. The next converge loads
    // berth's again, still without touching the service.
    let mut hand = f.live_config(&admin).await;
    let routes = hand["apps"]["http"]["servers"]["https"]["routes"]
        .as_array_mut()
        .unwrap();
    routes.retain(|r| !r.to_string().contains(&host_b));
    admin
        .load(&serde_json::to_vec(&hand).unwrap())
        .await
        .expect("load a config by hand");
    assert!(
        f.live_config(&admin).await != second,
        "the drift is in place"
    );
    let writes = f.writes();
    assert_eq!(f.converge().await, Action::await_change());
    assert!(
        f.live_config(&admin).await == second,
        "berth's config is back"
    );
    assert_eq!(version(&f.must_proxy().await), before);
    assert_eq!(f.task_ids().await, tasks);
    assert_eq!(f.writes(), writes, "the statuses already said so");
    assert!(ready(&f.status(&b)));

    // Only berth's identity gets in: another client certificate is turned away in the handshake.
    let intruder = Admin::new(
        &AdminIdentity::generate("intruder").unwrap(),
        &admin_ca_pem(&f).await,
        f.lb(),
        admin.addr(),
    )
    .unwrap();
    assert!(
        intruder.config().await.is_err(),
        "a client the proxy's config does not name is refused"
    );
}

async fn admin_ca_pem(f: &Fixture) -> String {
    let ca = f.config_names("ca").await;
    let ca = ca.iter().next().expect("berth's CA").clone();
    f.configs()
        .await
        .into_iter()
        .find(|(n, _, _)| *n == ca)
        .map(|(_, _, data)| String::from_utf8(data).unwrap())
        .unwrap()
}

#[tokio::test]
async fn the_last_ingress_gone_removes_the_proxy_and_collection_its_files() {
    let f = Fixture::new().await;
    let name = format!("{}-a", f.prefix);
    let host = format!("a.{}.test", f.prefix);
    // A certificate of the Ingress's own, from a Secret: mounted as a Swarm secret.
    let tls = format!("{}-tls", f.prefix);
    let cert = rcgen::generate_simple_self_signed(vec![host.clone()]).expect("a certificate");
    f.store.put(json!({
        "apiVersion": "berth/v1", "kind": "Secret",
        "metadata": {"name": tls}, "spec": {},
    }));
    f.store.put_data(
        Kind::Secret,
        &tls,
        &[
            ("tls.crt", cert.cert.pem().as_bytes()),
            ("tls.key", cert.key_pair.serialize_pem().as_bytes()),
        ],
    );
    f.ingress(&name, &host, &["/"], json!({"secretRef": tls}));
    f.converge_until_ready(&[&name]).await;
    let last_converge = Instant::now();
    let svc = f.must_proxy().await;
    let certificates = f.secret_names("certificate").await;
    assert_eq!(certificates.len(), 1, "{certificates:?}");
    assert!(mounted_secrets(&svc).is_superset(&certificates));
    let configs = f.config_names("config").await;
    assert_eq!(configs.len(), 1, "{configs:?}");
    let ca = (f.config_names("ca").await, f.secret_names("ca-key").await);
    assert_eq!((ca.0.len(), ca.1.len()), (1, 1), "{ca:?}");
    assert!(f.state_dir().await.is_some(), "the proxy's state volume");
    assert_eq!(
        f.ctl.engine_names().await.unwrap(),
        vec![f.lb().to_string()]
    );

    // The last Ingress goes: nothing to serve, so no proxy holding the nodes' ports.
    f.store.remove(Kind::Ingress, &name);
    let writes = f.writes();
    assert_eq!(f.converge().await, Action::await_change());
    assert!(f.proxy().await.is_none(), "the proxy service is removed");
    assert!(
        f.docker
            .inspect_service(svc.id.as_deref().unwrap(), None::<InspectServiceOptions>)
            .await
            .is_err(),
        "by ID too"
    );
    assert!(f.ctl.engine_names().await.unwrap().is_empty());
    assert_eq!(f.writes(), writes, "no status for an Ingress that is gone");
    // Nothing left to converge: still no proxy.
    assert_eq!(f.converge().await, Action::await_change());
    assert!(f.proxy().await.is_none());

    // Collection: what was created (or ensured) within the grace stays a while, in case a
    // converge is about to use it...
    f.collect_garbage().await;
    if last_converge.elapsed() < GC_GRACE - Duration::from_secs(10) {
        assert_eq!(f.config_names("config").await, configs, "within the grace");
        assert_eq!(f.secret_names("certificate").await, certificates);
    }
    // ...then the proxy's config and certificate go, with its state volume. berth's CA stays: the
    // next proxy issues from the same root, which clients may already trust.
    let deadline = Instant::now() + GC_GRACE + CONVERGE;
    loop {
        f.collect_garbage().await;
        let configs = f.config_names("config").await;
        let certificates = f.secret_names("certificate").await;
        let volume = f.state_dir().await;
        if configs.is_empty() && certificates.is_empty() && volume.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there after the grace: configs {configs:?}, certificates {certificates:?}, \
             volume {volume:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(
        (f.config_names("ca").await, f.secret_names("ca-key").await),
        ca
    );
}

#[tokio::test]
async fn a_proxy_name_taken_by_a_foreign_service_is_refused_on_every_ingress() {
    let f = Fixture::new().await;
    let foreign = service_by_hand(&f.docker, f.lb(), HashMap::new()).await;
    let before = f.must_proxy().await;
    let (a, b) = (format!("{}-a", f.prefix), format!("{}-b", f.prefix));
    f.ingress(
        &a,
        &format!("a.{}.test", f.prefix),
        &["/"],
        json!({"mode": "internal"}),
    );
    f.ingress(
        &b,
        &format!("b.{}.test", f.prefix),
        &["/"],
        json!({"mode": "internal"}),
    );

    assert_eq!(f.converge().await, Action::await_change(), "no hot retry");
    for name in [&a, &b] {
        let st = f.status(name);
        let (status, reason, message) = cond(&st, "Ready");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "ProxyRefused")
        );
        assert!(message.contains("does not manage"), "{message}");
        assert!(message.contains(f.lb()), "{message}");
        assert_eq!(cond(&st, "Accepted").0, "True", "the routes are fine");
    }
    let after = f.must_proxy().await;
    assert_eq!(after.id, foreign.id);
    assert_eq!(version(&after), version(&before), "left alone");
    assert_eq!(after.spec, before.spec);
    assert!(f.ctl.engine_names().await.unwrap().is_empty(), "not ours");

    // Without Ingresses berth removes only a proxy of its own.
    f.store.remove(Kind::Ingress, &a);
    f.store.remove(Kind::Ingress, &b);
    assert_eq!(f.converge().await, Action::await_change());
    assert_eq!(version(&f.must_proxy().await), version(&before));
}
