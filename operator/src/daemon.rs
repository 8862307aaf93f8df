//! The long-running commands: `berth up` (API server and every controller in one process),
//! `berth api` (API server alone) and `berth controller KIND` (one controller alone). They share the
//! pieces below; only which pieces run differs.

use crate::api_client::ApiClient;
use crate::crypto::MasterKey;
use crate::hooks::{self, HookState};
use crate::in_process_api::InProcessApi;
use crate::server::{router, AppState};
use crate::store::{Store, StoreError};
use crate::{deploy_applier, Conn, IngressArgs, ServerArgs};
use berth_controllers::api::{ResourceStore, SecretReader};
use berth_controllers::bus::{self, EventBus};
use berth_controllers::engine;
use berth_controllers::ingress::IngressController;
use berth_controllers::network::NetworkController;
use berth_controllers::registry::RegistryController;
use berth_controllers::runtime::state::LocalState;
use berth_controllers::runtime::{Controller, ControllerConfig, Reconciler};
use berth_controllers::service::ServiceController;
use bollard::Docker;
use rand::RngCore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal; log files and journals get plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

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

/// Reads the admin token, creating it (256 random bits, file mode 0600) at first start.
fn admin_token(data_dir: &Path) -> Result<(String, PathBuf), String> {
    let path = data_dir.join("admin.token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok((t, path));
        }
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &token)
        .map_err(|e| format!("error: cannot write {}: {e}", path.display()))?;
    Ok((token, path))
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
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
fn open_store(dir: &Path, key: &MasterKey) -> Result<Store, String> {
    match Store::open(dir, key) {
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
}

/// Opens the store, connects the bus, starts the outbox publisher and the HTTP server.
async fn start_api(
    server: &ServerArgs,
    tasks: &mut tokio::task::JoinSet<Result<(), String>>,
) -> Result<ApiParts, String> {
    std::fs::create_dir_all(&server.data_dir)
        .map_err(|e| format!("error: cannot create {}: {e}", server.data_dir.display()))?;
    let key = MasterKey::resolve(&server.data_dir).map_err(|e| format!("error: {e}"))?;
    let store = open_store(&server.data_dir.join("store"), &key)?;
    if crate::store::ensure_network(&store, &server.default_network)
        .await
        .map_err(|e| format!("error: {e} (see --default-network)"))?
    {
        info!(network = %server.default_network, "created the default network");
    }
    let (token, token_path) = admin_token(&server.data_dir)?;
    let connected = bus::connect(server.nats.as_deref())
        .await
        .map_err(|e| format!("error: {e}"))?;
    let bus = connected.events;
    let listener = tokio::net::TcpListener::bind(&server.listen)
        .await
        .map_err(|e| format!("error: cannot listen on {}: {e}", server.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    info!(%addr, instance = %store.instance(), bus = %bus.describe(), "API server listening");
    eprintln!(
        "berth API on http://{addr}; admin token in {}",
        token_path.display()
    );

    tasks.spawn(publisher_task(store.clone(), bus.clone()));
    // Deploy events become spec changes here, in the only writer of spec. Durable on NATS (named
    // per installation, like the controllers' consumers) so deploys queued while down still land.
    let applier = server
        .nats
        .is_some()
        .then(|| format!("berth-{}-deploy-applier", store.instance()));
    let applier = deploy_applier::start(store.clone(), connected.deploys.clone(), applier).await;
    tasks.spawn(async move {
        applier.await;
        Ok(())
    });
    let state = AppState {
        store: store.clone(),
        token: Arc::new(token),
        default_network: Arc::new(server.default_network.clone()),
    };
    let hook_state = HookState::new(store.clone(), connected.deploys, server.hook_rate)
        .map_err(|e| format!("error: {e}"))?;
    let app = router(state.clone()).merge(hooks::router(state, hook_state));
    tasks.spawn(async move {
        // The peer address is what webhook calls are rate-limited by.
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .map_err(|e| format!("error: API server failed: {e}"))
    });
    Ok(ApiParts { store, bus })
}

async fn publisher_task(store: Store, bus: Arc<dyn EventBus>) -> Result<(), String> {
    crate::store::outbox::publish(store, bus).await;
    Ok(())
}

fn config(resync: u64, durable: Option<String>) -> ControllerConfig {
    ControllerConfig {
        resync: Duration::from_secs(resync.max(1)),
        durable,
        ..Default::default()
    }
}

/// What every controller needs before its reconciler can be built: the engine and the installation id.
async fn prepare(
    store: &Arc<dyn ResourceStore>,
    docker_host: Option<&str>,
) -> Result<(Docker, String), String> {
    let docker = engine::connect(docker_host)
        .await
        .map_err(|e| format!("error: {e}"))?;
    Ok((docker, installation(store).await?))
}

/// The installation id every Swarm object a controller creates is labelled with.
async fn installation(store: &Arc<dyn ResourceStore>) -> Result<String, String> {
    store
        .installation()
        .await
        .map(|i| i.instance)
        .map_err(|e| format!("error: cannot read the installation id from the API: {e}"))
}

/// A reconciler on the shared runtime, triggered by the bus, the engine (when it has engine objects)
/// and the resync.
fn assemble<R: Reconciler>(
    reconciler: R,
    store: Arc<dyn ResourceStore>,
    bus: Arc<dyn EventBus>,
    docker: Option<Docker>,
    instance: &str,
    resync: u64,
    durable: bool,
) -> Controller<R> {
    // Named per installation: two berths on one NATS server must not share (and split) a consumer.
    let durable =
        durable.then(|| format!("berth-{instance}-controller-{}", reconciler.kind().lower()));
    let controller = Controller::new(Arc::new(reconciler), store, bus, config(resync, durable));
    match docker {
        Some(docker) => controller.with_engine_events(docker),
        None => controller,
    }
}

async fn service_controller(
    store: Arc<dyn ResourceStore>,
    secrets: Arc<dyn SecretReader>,
    bus: Arc<dyn EventBus>,
    docker_host: Option<&str>,
    state_dir: &Path,
    resync: u64,
    durable: bool,
) -> Result<Controller<ServiceController>, String> {
    let (docker, instance) = prepare(&store, docker_host).await?;
    let state = LocalState::open(&state_dir.join("service"), "applied")
        .map_err(|e| format!("error: {e}"))?;
    let reconciler = ServiceController::new(
        docker.clone(),
        store.clone(),
        secrets,
        instance.clone(),
        state,
    );
    Ok(assemble(
        reconciler,
        store,
        bus,
        Some(docker),
        &instance,
        resync,
        durable,
    ))
}

async fn network_controller(
    store: Arc<dyn ResourceStore>,
    bus: Arc<dyn EventBus>,
    docker_host: Option<&str>,
    resync: u64,
    durable: bool,
) -> Result<Controller<NetworkController>, String> {
    let (docker, instance) = prepare(&store, docker_host).await?;
    let reconciler = NetworkController::new(docker.clone(), store.clone(), instance.clone());
    Ok(assemble(
        reconciler,
        store,
        bus,
        Some(docker),
        &instance,
        resync,
        durable,
    ))
}

/// The Registry controller talks to registries, not to the engine.
async fn registry_controller(
    store: Arc<dyn ResourceStore>,
    secrets: Arc<dyn SecretReader>,
    bus: Arc<dyn EventBus>,
    resync: u64,
    durable: bool,
) -> Result<Controller<RegistryController>, String> {
    let instance = installation(&store).await?;
    let reconciler = RegistryController::new(store.clone(), secrets);
    Ok(assemble(
        reconciler, store, bus, None, &instance, resync, durable,
    ))
}

async fn ingress_controller(
    store: Arc<dyn ResourceStore>,
    secrets: Arc<dyn SecretReader>,
    bus: Arc<dyn EventBus>,
    docker_host: Option<&str>,
    ingress: &IngressArgs,
    resync: u64,
    durable: bool,
) -> Result<Controller<IngressController>, String> {
    let settings = ingress.settings();
    settings.validate().map_err(|e| format!("error: {e}"))?;
    let (docker, instance) = prepare(&store, docker_host).await?;
    let reconciler = IngressController::new(
        docker.clone(),
        store.clone(),
        secrets,
        instance.clone(),
        settings,
    );
    Ok(assemble(
        reconciler,
        store,
        bus,
        Some(docker),
        &instance,
        resync,
        durable,
    ))
}

/// Runs a controller as one of the process's supervised tasks.
fn spawn_controller<R: Reconciler>(
    tasks: &mut tokio::task::JoinSet<Result<(), String>>,
    controller: Controller<R>,
) {
    tasks.spawn(async move {
        controller.run(std::future::pending()).await;
        Ok(())
    });
}

/// Waits for a signal or for a task to fail, whichever comes first.
async fn supervise(mut tasks: tokio::task::JoinSet<Result<(), String>>) -> Result<(), String> {
    tokio::select! {
        _ = shutdown_signal() => {
            info!("shutting down");
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
    init_tracing();
    let mut tasks = tokio::task::JoinSet::new();
    let parts = start_api(&server, &mut tasks).await?;
    let local = Arc::new(InProcessApi {
        store: parts.store.clone(),
        default_network: server.default_network.clone(),
    });
    let store: Arc<dyn ResourceStore> = local.clone();
    let secrets: Arc<dyn SecretReader> = local;
    // With NATS, a durable consumer lets the controller catch up on what it missed while down.
    let durable = server.nats.is_some();
    let networks = network_controller(
        store.clone(),
        parts.bus.clone(),
        docker_host.as_deref(),
        resync,
        durable,
    )
    .await?;
    let registries = registry_controller(
        store.clone(),
        secrets.clone(),
        parts.bus.clone(),
        resync,
        durable,
    )
    .await?;
    let ingresses = ingress_controller(
        store.clone(),
        secrets.clone(),
        parts.bus.clone(),
        docker_host.as_deref(),
        &ingress,
        resync,
        durable,
    )
    .await?;
    let services = service_controller(
        store,
        secrets,
        parts.bus.clone(),
        docker_host.as_deref(),
        &server.data_dir.join("controllers"),
        resync,
        durable,
    )
    .await?;
    spawn_controller(&mut tasks, networks);
    spawn_controller(&mut tasks, services);
    spawn_controller(&mut tasks, registries);
    spawn_controller(&mut tasks, ingresses);
    supervise(tasks).await
}

pub async fn api(server: ServerArgs) -> Result<(), String> {
    init_tracing();
    let mut tasks = tokio::task::JoinSet::new();
    start_api(&server, &mut tasks).await?;
    supervise(tasks).await
}

pub async fn controller(
    kind: &str,
    conn: Conn,
    nats: String,
    docker_host: Option<String>,
    state_dir: PathBuf,
    resync: u64,
    ingress: IngressArgs,
) -> Result<(), String> {
    init_tracing();
    let token = conn
        .token
        .ok_or("error: no token: set BERTH_TOKEN or pass --token")?;
    let http = Arc::new(ApiClient::new(&conn.url, &token));
    let client: Arc<dyn ResourceStore> = http.clone();
    let secrets: Arc<dyn SecretReader> = http;
    let bus = bus::connect(Some(&nats))
        .await
        .map_err(|e| format!("error: {e}"))?
        .events;
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| format!("error: cannot create {}: {e}", state_dir.display()))?;
    let mut tasks = tokio::task::JoinSet::new();
    match kind {
        "service" | "services" => {
            let ctl = service_controller(
                client,
                secrets,
                bus,
                docker_host.as_deref(),
                &state_dir,
                resync,
                true,
            )
            .await?;
            spawn_controller(&mut tasks, ctl);
        }
        "network" | "networks" => {
            let ctl = network_controller(client, bus, docker_host.as_deref(), resync, true).await?;
            spawn_controller(&mut tasks, ctl);
        }
        "registry" | "registries" => {
            let ctl = registry_controller(client, secrets, bus, resync, true).await?;
            spawn_controller(&mut tasks, ctl);
        }
        "ingress" | "ingresses" => {
            let ctl = ingress_controller(
                client,
                secrets,
                bus,
                docker_host.as_deref(),
                &ingress,
                resync,
                true,
            )
            .await?;
            spawn_controller(&mut tasks, ctl);
        }
        other => {
            return Err(format!(
            "error: no controller for `{other}` (available: service, network, registry, ingress)"
        ))
        }
    }
    supervise(tasks).await
}
