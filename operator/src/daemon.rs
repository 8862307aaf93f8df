//! The long-running commands: `berth up` (API server and every controller in one process),
//! `berth api` (API server alone) and `berth controller KIND` (one controller alone). They share the
//! pieces below; only which pieces run differs.

use crate::api_client::ApiClient;
use crate::audit::AuditLog;
use crate::crypto::MasterKey;
use crate::hooks::{self, HookState};
use crate::in_process_api::InProcessApi;
use crate::server::{router, AppState};
use crate::store::backend::jetstream::Log;
use crate::store::{Store, StoreError};
use crate::tokens::Tokens;
use crate::{deploy_applier, Conn, IngressArgs, ServerArgs, StoreBackend};
use berth_api_types::Kind;
use berth_controllers::api::{ResourceStore, SecretReader};
use berth_controllers::backup::operations::{Backups, Settings};
use berth_controllers::backup::schedule::SystemClock;
use berth_controllers::backup::volumes::Transfers;
use berth_controllers::backup::BackupController;
use berth_controllers::bus::{self, EventBus};
use berth_controllers::ingress::IngressController;
use berth_controllers::network::NetworkController;
use berth_controllers::node::NodeController;
use berth_controllers::registry::RegistryController;
use berth_controllers::runtime::shares::Sharing;
use berth_controllers::runtime::{Controller, ControllerConfig, Hooks, Records};
use berth_controllers::service::ServiceController;
use berth_controllers::swarm::engine;
use bollard::Docker;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The admin token of first start: made (256 random bits, file mode 0600) when the store knows no
/// admin token yet, or taken from the file an older berth wrote. From then on the store keeps only
/// its hash; the file is the installer's copy (it may be moved into a vault, and
/// `berth token rotate-admin` rewrites it while it is there).
async fn admin_token(data_dir: &Path, tokens: &Tokens) -> Result<PathBuf, String> {
    let path = data_dir.join("admin.token");
    if tokens.has_admin().map_err(|e| format!("error: {e}"))? {
        return Ok(path);
    }
    // A token file group or others can read is refused, not used (see `data_dir`).
    if path.exists() {
        crate::data_dir::check_private_file(&path, "admin token")
            .map_err(|e| format!("error: {e}"))?;
    }
    let (token, made_file) = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => (t.trim().to_string(), false),
        _ => {
            let token = crate::tokens::new_admin_token();
            write_private(&path, &token)
                .map_err(|e| format!("error: cannot write {}: {e}", path.display()))?;
            (token, true)
        }
    };
    let kept = tokens
        .ensure_admin(&token)
        .await
        .map_err(|e| format!("error: {e}"))?;
    if !kept && made_file {
        // Another API server on the same NATS store made the admin token first: this file's
        // token would work nowhere.
        let _ = std::fs::remove_file(&path);
        info!("the store's admin token was made by another API server; use that one's admin.token");
    }
    Ok(path)
}

pub(crate) fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

/// Opens the store with the master key. A key file created just now for a store whose Secrets were
/// sealed with another key is removed again, so the next start does not pick up a wrong key.
async fn open_store(
    server: &ServerArgs,
    key: &MasterKey,
    nats: Option<&async_nats::Client>,
) -> Result<Store, String> {
    let opened = match server.store {
        StoreBackend::Sled => Store::open(&crate::admin::store_dir(&server.data_dir), key).await,
        StoreBackend::Nats => {
            let (Some(client), Some(url)) = (nats, server.nats_settings()) else {
                return Err(
                    "error: --store nats needs --nats (the NATS servers that keep the store)"
                        .into(),
                );
            };
            match Log::open(client.clone(), url.shown_url(), server.store_log.config()).await {
                Ok(log) => Store::open_log(log, key).await,
                Err(e) => Err(e),
            }
        }
    };
    match opened {
        Ok(s) => Ok(s),
        Err(e @ StoreError::WrongKey { .. }) => {
            let mut msg = format!("error: {e}");
            if let Some(created) = key.created_file() {
                let _ = std::fs::remove_file(created);
                msg.push_str(&format!(
                    "\n{} did not exist, so a new key was made (and removed again): restore the original file",
                    created.display()
                ));
            }
            Err(msg)
        }
        Err(e) => Err(format!("error: {e}")),
    }
}

struct ApiParts {
    store: Store,
    bus: Arc<dyn EventBus>,
    sharing: Sharing,
}

/// Opens the store, connects the bus, starts the outbox publisher and the HTTP server.
/// `ingress_proxy`: the ingress proxy's name, whose Swarm objects no berth object may be named as.
async fn start_api(
    server: &ServerArgs,
    docker_host: Option<&str>,
    ingress_proxy: &str,
    tasks: &mut Tasks,
) -> Result<ApiParts, String> {
    // Before anything is read or created in it: 0700, files 0600, umask 077 (see `data_dir`).
    crate::data_dir::prepare(&server.data_dir, &crate::data_dir::KEY_FILES)
        .map_err(|e| format!("error: {e}"))?;
    let key = MasterKey::resolve(&server.data_dir).map_err(|e| format!("error: {e}"))?;
    // A master key rotation interrupted by a crash is completed or rolled back here.
    let key = crate::admin::settle_rotation(&server.data_dir, key)
        .await
        .map_err(|e| format!("error: {e}"))?;
    let connected = bus::connect(server.nats_settings().as_ref())
        .await
        .map_err(|e| format!("error: {e}"))?;
    let store = open_store(server, &key, connected.nats.as_ref())
        .await?
        .with_policy(crate::store::Policy {
            allow_bind_mounts: server.allow_bind_mounts,
            ingress_proxy: ingress_proxy.to_string(),
        });
    if server.allow_bind_mounts {
        tracing::warn!("--allow-bind-mounts: Volumes may mount host paths and devices");
    }
    let audit_log = AuditLog::open(&store)
        .await
        .map_err(|e| format!("error: {e}"))?;
    if !server.backup.no_default_backup_plan
        && crate::store::ensure_backup_plan(&store)
            .await
            .map_err(|e| format!("error: {e}"))?
    {
        info!(
            plan = berth_api_types::backup::DEFAULT_PLAN,
            "created the default backup plan"
        );
    }
    if crate::store::ensure_network(&store, &server.default_network)
        .await
        .map_err(|e| format!("error: {e} (see --default-network)"))?
    {
        info!(network = %server.default_network, "created the default network");
    }
    let tokens = Tokens::open(&store)
        .map_err(|e| format!("error: {e}"))?
        .with_admin_file(server.data_dir.join("admin.token"));
    let token_path = admin_token(&server.data_dir, &tokens).await?;
    let bus = connected.events;
    let listeners = Listeners::bind(server, store.instance()).await?;
    info!(addr = %listeners.api_addr, instance = %store.instance(), bus = %bus.describe(), store = %store.describe(), "API server listening");
    listeners.announce(&token_path);

    tasks.spawn(publisher_task(store.clone(), bus.clone()));
    // A failed flush leaves writes in memory that may not be on disk: the store refuses service,
    // and the process exits so that its restart recovers exactly what is on disk.
    let watched = store.clone();
    tasks.spawn(async move {
        watched.failed().await;
        Err(
            "error: the store could not flush a write to disk (see the log); restart berth: it \
             recovers what is on disk, and clients re-apply what was not acknowledged"
                .to_string(),
        )
    });
    tasks.spawn(audit_publisher_task(audit_log.clone(), bus.clone()));
    let backups = start_backups(
        server,
        &store,
        &key,
        docker_host,
        (bus.clone(), connected.sharing.clone()),
        tasks,
    )
    .await?;
    // Deploy events become spec changes here, in the only writer of spec. Durable on NATS (named
    // per installation, like the controllers' consumers) so deploys queued while down still land.
    let applier = server
        .nats
        .is_some()
        .then(|| format!("berth-{}-deploy-applier", store.instance()));
    let audit: Arc<dyn crate::access::AuditSink> = Arc::new(audit_log.clone());
    let applier = deploy_applier::start(
        store.clone(),
        connected.deploys.clone(),
        applier,
        audit.clone(),
    )
    .await;
    tasks.spawn(async move {
        applier.await;
        Ok(())
    });
    let remote_exec = start_remote_exec(server, store.instance(), docker_host).await?;
    let state = AppState {
        store: store.clone(),
        tokens,
        audit,
        default_network: Arc::new(server.default_network.clone()),
        docker_host: docker_host.map(|h| Arc::new(h.to_string())),
        backups,
        remote_exec,
        controllers: connected.sharing.store().clone(),
        audit_log,
        nats: connected.nats.clone(),
    };
    let hook_state = HookState::new(store.clone(), connected.deploys, server.hook_rate)
        .map_err(|e| format!("error: {e}"))?;
    listeners.serve(state, hook_state, tasks);
    Ok(ApiParts {
        store,
        bus,
        sharing: connected.sharing,
    })
}

/// The API listener and, with `--hooks-listen`, the webhook listener: bound, checked (plain HTTP
/// only on loopback unless allowed), with their TLS.
struct Listeners {
    api: tokio::net::TcpListener,
    api_addr: std::net::SocketAddr,
    hooks: Option<(tokio::net::TcpListener, std::net::SocketAddr)>,
    tls: Option<crate::tls::ServerTls>,
}

impl Listeners {
    async fn bind(server: &ServerArgs, instance: &str) -> Result<Listeners, String> {
        async fn bind(
            flag: &str,
            addr: &str,
        ) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), String> {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("error: cannot listen on {addr} ({flag}): {e}"))?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            Ok((l, bound))
        }
        let (api, api_addr) = bind("--listen", &server.listen).await?;
        server.tls.check_plain("--listen", api_addr)?;
        let hooks = match &server.hooks_listen {
            Some(addr) => {
                let (l, bound) = bind("--hooks-listen", addr).await?;
                server.tls.check_plain("--hooks-listen", bound)?;
                Some((l, bound))
            }
            None => None,
        };
        let mut addrs = vec![api_addr];
        addrs.extend(hooks.as_ref().map(|h| h.1));
        let tls = server.tls.server_tls(&server.data_dir, instance, &addrs)?;
        Ok(Listeners {
            api,
            api_addr,
            hooks,
            tls,
        })
    }

    /// Tells the operator where berth listens and what clients need.
    fn announce(&self, token_path: &Path) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if token_path.exists() {
            crate::logging::announce(format!(
                "berth API on {scheme}://{}; admin token in {}",
                self.api_addr,
                token_path.display()
            ));
        } else {
            // Another API server of the same NATS store made it (or the file was moved away).
            crate::logging::announce(format!(
                "berth API on {scheme}://{}; the admin token is the store's (not in {})",
                self.api_addr,
                token_path.display()
            ));
        }
        if let Some(ca) = self.tls.as_ref().and_then(|t| t.ca_file.as_ref()) {
            crate::logging::announce(format!(
                "clients trust berth's CA in {} (berth --ca or BERTH_CA)",
                ca.display()
            ));
        }
        if let Some((_, addr)) = &self.hooks {
            crate::logging::announce(format!("webhooks on {scheme}://{addr} (only /hooks/...)"));
        }
    }

    fn serve(self, api: AppState, hooks: HookState, tasks: &mut Tasks) {
        let config = self.tls.map(|t| t.config);
        let serve = |listener, app, what: &'static str| {
            let config = config.clone();
            async move {
                crate::tls::serve(listener, config, app)
                    .await
                    .map_err(|e| format!("error: {what} failed: {e}"))
            }
        };
        match self.hooks {
            None => tasks.spawn(serve(
                self.api,
                router(api.clone()).merge(hooks::router(api, hooks)),
                "API server",
            )),
            Some((listener, _)) => {
                let (main, hooks) = hooks::separate_listeners(api, hooks);
                tasks.spawn(serve(self.api, main, "API server"));
                tasks.spawn(serve(listener, hooks, "webhook listener"));
            }
        }
    }
}

/// The installation's backups and the Backup controller that schedules them. They run here, in
/// the API server's process, because a snapshot reads the store's sealed values and master key.
/// Without an engine there are no volumes to read: backups are off (and say so) rather than the
/// API refusing to start.
/// Exec agents for tasks on other nodes, when the operator allows them (off by default: see
/// `AgentArgs::allow_remote_exec`). Refusing to start is better than a flag that silently does
/// nothing: asked for and impossible (no engine, not in a swarm) is an error.
async fn start_remote_exec(
    server: &ServerArgs,
    instance: &str,
    docker_host: Option<&str>,
) -> Result<Option<Arc<crate::exec_agent::RemoteExec>>, String> {
    if !server.agents.allow_remote_exec {
        return Ok(None);
    }
    let docker = engine::connect(docker_host)
        .await
        .map_err(|e| format!("error: --allow-remote-exec: {e}"))?;
    let remote = crate::exec_agent::RemoteExec::new(
        docker,
        instance,
        server.agents.agent_image.clone(),
        server.agents.agent_host_network,
        server.agents.agent_engine_socket.clone(),
    )
    .await
    .map_err(|e| format!("error: --allow-remote-exec: {e}"))?;
    tracing::warn!(
        "remote exec is allowed: `berth exec` into tasks on other nodes starts an agent there with the node's engine socket"
    );
    Ok(Some(Arc::new(remote)))
}

async fn start_backups(
    server: &ServerArgs,
    store: &Store,
    key: &MasterKey,
    docker_host: Option<&str>,
    (bus, sharing): (Arc<dyn EventBus>, Sharing),
    tasks: &mut Tasks,
) -> Result<Option<Arc<Backups>>, String> {
    let docker = match engine::connect(docker_host).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "no Swarm engine: backups are off in this process");
            return Ok(None);
        }
    };
    let instance = store.instance().to_string();
    let local = Arc::new(InProcessApi {
        store: store.clone(),
        default_network: server.default_network.clone(),
    });
    let settings = Settings {
        installation: instance.clone(),
        backup_dir: server.backup.backup_dir.clone(),
        work_dir: server.data_dir.join("backup"),
        key_file: server.data_dir.join("backup.key"),
        restic: server.backup.restic.clone(),
    };
    let transfers = Transfers::new(docker.clone(), &instance, server.agents.agent_image.clone())
        .await
        .map_err(|e| format!("error: backups: {e}"))?
        // Off by default: see `AgentArgs::agent_host_network`.
        .host_network(server.agents.agent_host_network);
    let records = Records::open(
        &server.data_dir.join("controllers").join("backup"),
        "backups",
    )
    .map_err(|e| format!("error: {e}"))?;
    let environment = Arc::new(crate::environment::StoreEnvironment {
        store: store.clone(),
        key: key.clone(),
    });
    let backups = Arc::new(Backups::new(
        docker,
        settings,
        environment,
        local.clone(),
        local.clone(),
        transfers,
        records,
    ));
    let controller = Arc::new(BackupController::new(
        backups.clone(),
        Arc::new(SystemClock),
    ));
    let config = ControllerConfig {
        durable: server
            .nats
            .is_some()
            .then(|| format!("berth-{instance}-controller-{}", Kind::Backup.lower())),
        sharing,
        reconcile_log: reconcile_log(),
        ..Default::default()
    };
    spawn(tasks, Controller::new(controller, local, bus, config));
    Ok(Some(backups))
}

async fn publisher_task(store: Store, bus: Arc<dyn EventBus>) -> Result<(), String> {
    crate::store::outbox::publish(store, bus).await;
    Ok(())
}

async fn audit_publisher_task(log: AuditLog, bus: Arc<dyn EventBus>) -> Result<(), String> {
    crate::audit::publish(log, bus).await;
    Ok(())
}

/// The controllers berth runs: the one list `berth up` starts and `berth controller KIND` picks
/// from. Networks first, so the default network exists before services look for it.
const CONTROLLERS: [Kind; 5] = [
    Kind::Network,
    Kind::Service,
    Kind::Registry,
    Kind::Ingress,
    Kind::Node,
];

/// What every controller is built from.
struct Wiring<'a> {
    store: Arc<dyn ResourceStore>,
    /// Secret and Config values: handed only to the controllers that pass them to the engine or a
    /// registry (service, registry, ingress).
    secrets: Arc<dyn SecretReader>,
    bus: Arc<dyn EventBus>,
    docker_host: Option<&'a str>,
    /// Where controllers keep their records (`<dir>/<kind>`).
    records_dir: &'a Path,
    resync: u64,
    /// With NATS, a durable consumer lets a controller catch up on what it missed while down.
    durable: bool,
    /// How instances of one controller share its objects (leases on NATS).
    sharing: Sharing,
    ingress: &'a IngressArgs,
}

/// `BERTH_RECONCILE_LOG=FILE`: every controller appends one JSON line per reconcile (for checking
/// that instances never reconcile one object at the same time).
fn reconcile_log() -> Option<PathBuf> {
    std::env::var_os("BERTH_RECONCILE_LOG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl Wiring<'_> {
    fn config(&self, kind: Kind, instance: &str) -> ControllerConfig {
        ControllerConfig {
            resync: Duration::from_secs(self.resync.max(1)),
            // Named per installation: two berths on one NATS server must not share (and split) a
            // consumer.
            durable: self
                .durable
                .then(|| format!("berth-{instance}-controller-{}", kind.lower())),
            sharing: self.sharing.clone(),
            reconcile_log: reconcile_log(),
            ..Default::default()
        }
    }

    async fn docker(&self) -> Result<Docker, String> {
        engine::connect(self.docker_host)
            .await
            .map_err(|e| format!("error: {e}"))
    }

    /// Builds the controller of `kind` and runs it as one of the process's supervised tasks.
    async fn start(&self, kind: Kind, tasks: &mut Tasks) -> Result<(), String> {
        let instance = installation(&self.store).await?;
        let config = self.config(kind, &instance);
        let (store, bus) = (self.store.clone(), self.bus.clone());
        match kind {
            Kind::Network => {
                let docker = self.docker().await?;
                let reconciler = Arc::new(NetworkController::new(docker.clone(), &instance));
                spawn(
                    tasks,
                    Controller::new(reconciler, store, bus, config).with_engine_events(docker),
                );
            }
            Kind::Service => {
                let docker = self.docker().await?;
                let records = Records::open(&self.records_dir.join("service"), "applied")
                    .map_err(|e| format!("error: {e}"))?;
                let reconciler = Arc::new(ServiceController::new(
                    docker.clone(),
                    &instance,
                    self.secrets.clone(),
                    records,
                ));
                spawn(
                    tasks,
                    Controller::new(reconciler, store, bus, config).with_engine_events(docker),
                );
            }
            // The Registry controller talks to registries, not to the engine.
            Kind::Registry => {
                let reconciler = Arc::new(RegistryController::new(self.secrets.clone()));
                spawn(tasks, Controller::new(reconciler, store, bus, config));
            }
            Kind::Ingress => {
                let settings = self.ingress.settings();
                settings.validate().map_err(|e| format!("error: {e}"))?;
                let docker = self.docker().await?;
                // Kept with the controller's records: the proxies keep letting berth in after a
                // restart.
                let identity = berth_controllers::ingress::ca::AdminIdentity::load_or_create(
                    &self.records_dir.join("ingress").join("admin-client.pem"),
                    &instance,
                )
                .map_err(|e| format!("error: {e}"))?;
                let aggregator = Arc::new(IngressController::new(
                    docker.clone(),
                    store.clone(),
                    self.secrets.clone(),
                    &instance,
                    settings,
                    identity,
                ));
                spawn(
                    tasks,
                    Controller::aggregate(aggregator, store, bus, config)
                        .with_engine_events(docker),
                );
            }
            Kind::Node => {
                let docker = self.docker().await?;
                let aggregator = Arc::new(NodeController::new(docker.clone()));
                spawn(
                    tasks,
                    Controller::aggregate(aggregator, store, bus, config)
                        .with_engine_events(docker),
                );
            }
            other => return Err(no_controller(other.lower())),
        }
        Ok(())
    }
}

fn no_controller(asked: &str) -> String {
    if Kind::parse_loose(asked) == Some(Kind::Backup) {
        return "error: the Backup controller runs in the API server's process (`berth up`, \
                `berth api`): a snapshot reads the store's sealed values, which only that process holds"
            .into();
    }
    let available: Vec<&str> = CONTROLLERS.iter().map(|k| k.lower()).collect();
    format!(
        "error: no controller for `{asked}` (available: {})",
        available.join(", ")
    )
}

/// The installation id every Swarm object a controller creates is labelled with.
async fn installation(store: &Arc<dyn ResourceStore>) -> Result<String, String> {
    store
        .installation()
        .await
        .map(|i| i.instance)
        .map_err(|e| format!("error: cannot read the installation id from the API: {e}"))
}

/// How long a clean stop waits for the controllers to hand their work over.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The process's supervised tasks, and the clean stop of the controllers among them.
struct Tasks {
    set: tokio::task::JoinSet<Result<(), String>>,
    /// Set on SIGTERM/SIGINT: every controller stops taking work.
    stop: tokio::sync::watch::Sender<bool>,
    /// Each controller task holds a clone until its clean stop is done (leases handed over, its
    /// consumer removed), so the process can wait for all of them.
    running: tokio::sync::mpsc::Sender<()>,
    all_stopped: tokio::sync::mpsc::Receiver<()>,
}

impl Tasks {
    fn new() -> Tasks {
        let (running, all_stopped) = tokio::sync::mpsc::channel(1);
        Tasks {
            set: tokio::task::JoinSet::new(),
            stop: tokio::sync::watch::channel(false).0,
            running,
            all_stopped,
        }
    }

    fn spawn(
        &mut self,
        task: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
    ) {
        self.set.spawn(task);
    }
}

/// Runs a controller as one of the process's supervised tasks, until the process stops.
fn spawn<R: Hooks>(tasks: &mut Tasks, controller: Controller<R>) {
    let mut stop = tasks.stop.subscribe();
    let running = tasks.running.clone();
    tasks.spawn(async move {
        controller
            .run(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        drop(running);
        Ok(())
    });
}

/// Waits for a signal or for a task to fail, whichever comes first. On a signal the controllers
/// stop cleanly first: another instance takes their objects at once instead of after the lease
/// time.
async fn supervise(tasks: Tasks) -> Result<(), String> {
    let Tasks {
        set: mut tasks,
        stop,
        running,
        mut all_stopped,
    } = tasks;
    tokio::select! {
        _ = shutdown_signal() => {
            info!("shutting down");
            let _ = stop.send(true);
            drop(running);
            if tokio::time::timeout(STOP_GRACE, all_stopped.recv()).await.is_err() {
                tracing::warn!("controllers did not stop within {STOP_GRACE:?}; exiting anyway");
            }
            Ok(())
        }
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err("error: a component stopped unexpectedly".into()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(format!("error: a component panicked: {e}")),
        },
    }
}

pub async fn up(
    server: ServerArgs,
    docker_host: Option<String>,
    resync: u64,
    ingress: IngressArgs,
) -> Result<(), String> {
    let mut tasks = Tasks::new();
    let parts = start_api(
        &server,
        docker_host.as_deref(),
        &ingress.ingress_name,
        &mut tasks,
    )
    .await?;
    let local = Arc::new(InProcessApi {
        store: parts.store.clone(),
        default_network: server.default_network.clone(),
    });
    let records_dir = server.data_dir.join("controllers");
    let wiring = Wiring {
        store: local.clone(),
        secrets: local,
        bus: parts.bus.clone(),
        docker_host: docker_host.as_deref(),
        records_dir: &records_dir,
        resync,
        durable: server.nats.is_some(),
        sharing: parts.sharing.clone(),
        ingress: &ingress,
    };
    for kind in CONTROLLERS {
        wiring.start(kind, &mut tasks).await?;
    }
    supervise(tasks).await
}

pub async fn api(
    server: ServerArgs,
    docker_host: Option<String>,
    ingress_name: String,
) -> Result<(), String> {
    let mut tasks = Tasks::new();
    start_api(&server, docker_host.as_deref(), &ingress_name, &mut tasks).await?;
    supervise(tasks).await
}

/// A controller runs with a `controller` token: it reads objects and secret values and writes
/// status, and nothing more. The admin token (or any other role) is refused here, so that a
/// controller process is never the easiest way to the keys of the whole installation.
async fn controller_token_check(http: &ApiClient) -> Result<(), String> {
    use berth_api_types::access::{Role, WhoAmI};
    // The API may still be starting (controllers and the API server often start together).
    let mut tries = 0;
    let me: WhoAmI = loop {
        match http
            .request_json(
                reqwest::Method::GET,
                berth_api_types::names::paths::WHOAMI,
                None,
            )
            .await
        {
            Ok(me) => break me,
            Err(e) if e.is_transient() && tries < 30 => {
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(format!("error: cannot check this controller's token: {e}")),
        }
    };
    if me.role != Role::Controller {
        return Err(format!(
            "error: a controller runs with a `controller` token, not a `{}` token ({}); make one with \
             `berth token create --role controller` and pass it as BERTH_TOKEN",
            me.role, me.id
        ));
    }
    Ok(())
}

pub async fn controller(
    kind: &str,
    conn: Conn,
    nats: bus::NatsSettings,
    docker_host: Option<String>,
    state_dir: PathBuf,
    resync: u64,
    ingress: IngressArgs,
) -> Result<(), String> {
    let resolved = crate::client_config::resolve(&conn)?;
    let token = resolved.token.ok_or(crate::cli::NO_TOKEN)?;
    let http = Arc::new(ApiClient::new(
        &resolved.url,
        &token.value,
        resolved.ca.as_deref(),
    )?);
    let connected = bus::connect(Some(&nats))
        .await
        .map_err(|e| format!("error: {e}"))?;
    controller_token_check(&http).await?;
    crate::data_dir::prepare(&state_dir, &[]).map_err(|e| format!("error: {e}"))?;
    let kind = CONTROLLERS
        .into_iter()
        .find(|k| Kind::parse_loose(kind) == Some(*k))
        .ok_or_else(|| no_controller(kind))?;
    let wiring = Wiring {
        store: http.clone(),
        secrets: http,
        bus: connected.events,
        docker_host: docker_host.as_deref(),
        records_dir: &state_dir,
        resync,
        durable: true,
        sharing: connected.sharing,
        ingress: &ingress,
    };
    let mut tasks = Tasks::new();
    wiring.start(kind, &mut tasks).await?;
    supervise(tasks).await
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_admin_token_file_is_made_private_and_refused_when_readable() {
        let dir = tempfile::tempdir().unwrap();
        let key = MasterKey::from_bytes([4u8; 32], "test key");
        let store = Store::open(&dir.path().join("store"), &key).await.unwrap();
        let path = dir.path().join("admin.token");
        // An older berth's file, readable by others: refused (it may have been copied), kept.
        std::fs::write(&path, "old-token-value").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tokens = Tokens::open(&store).unwrap();
        let e = admin_token(dir.path(), &tokens).await.unwrap_err();
        assert!(
            e.contains(&path.display().to_string())
                && e.contains("mode 0644")
                && e.contains(&format!("chmod 600 {}", path.display())),
            "{e}"
        );
        assert!(!e.contains("old-token-value"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old-token-value");
        // The start's own check says the same before anything else runs.
        let e = crate::data_dir::prepare(dir.path(), &crate::data_dir::KEY_FILES).unwrap_err();
        assert!(e.contains("admin token") && e.contains("chmod 600"), "{e}");
        // A fresh token file is made 0600.
        std::fs::remove_file(&path).unwrap();
        admin_token(dir.path(), &tokens).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
