//! The Ingress controller: one HTTPS-only load balancer (Caddy, a global Swarm service with host-mode
//! ports 443 and 80) routing the domains of every Ingress to their Services.
//!
//! The proxy's state is a function of *all* Ingresses, so every reconcile, whatever name it was
//! queued for, runs the same pipeline over the full set — dereference (Ingresses, their Services and
//! TLS Secrets) -> validate -> plan and render (pure, `build.rs`) -> apply -> status (pure,
//! `status.rs`) for every Ingress — under one lock, and converges to the same proxy.
//!
//! How a new config reaches the proxy without dropping traffic:
//! - Every rendered config is a Swarm config named by its content hash. The proxy service mounts one
//!   of them as its *boot* config: what a task starts from.
//! - A change that only touches routes (hosts, paths, backends on networks the proxy already joined,
//!   internal certificates) is *loaded live* through Caddy's admin API, on a unix socket in the
//!   proxy's state volume (no network address: only the proxy and root on its node reach it). Caddy
//!   keeps its listeners and drains the old config, so nothing is refused or cut. The service spec
//!   is not touched, because any service update restarts the tasks, and two tasks cannot share a
//!   node's host port: every restart is a gap.
//! - A restarted task must not fall back to an older config: Caddy autosaves each loaded config and
//!   starts with `--resume`, and its autosave directory is named after the boot config, so a task
//!   resumes the newest config loaded since its service got that boot config, never one from before.
//! - The restart path (update the service with the current config as boot config) is the fallback,
//!   and the only way for what lives in the service spec: image, ports, networks to join, mounted
//!   certificate secrets, placement. It is also taken when the admin socket cannot be reached — a
//!   proxy task on another node (berth reaches only its own node's socket), or berth talking to a
//!   remote engine. A config Caddy refuses is never booted from: the old one keeps serving and every
//!   Ingress says why it is not Ready.

pub mod admin;
pub mod build;
pub mod ca;
pub mod status;

use crate::api::{ClientError, ResourceStore, SecretReader};
use crate::engine::{canonical_hash, status_code};
use crate::runtime::{Action, Reconciler};
use crate::swarm_file::{self, FileKind, SwarmFile};
use admin::Admin;
use async_trait::async_trait;
use berth_api_types::ingress::{validate_ingress, Ingress};
use berth_api_types::names::labels;
use berth_api_types::service::ServiceSpec;
use berth_api_types::{DynObject, Event, EventType, Kind};
use bollard::errors::Error as DockerError;
use bollard::models::{
    EventMessage, EventMessageTypeEnum, Service as SwarmService, ServiceUpdateStatusStateEnum,
    Task, TaskState,
};
use bollard::query_parameters::{
    InspectNetworkOptions, ListConfigsOptions, ListNodesOptions, ListSecretsOptions,
    ListServicesOptions, ListTasksOptions, RemoveVolumeOptions, UpdateServiceOptions,
};
use bollard::Docker;
use build::{roles, Backend, Candidate, Files, Plan, ProxyParts, Settings};
use serde_json::Value;
use status::{delivery, IngressStatus, ProxyState};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How often a proxy that is not serving the current config yet is looked at again.
const PROGRESS_POLL: Duration = Duration::from_secs(1);
/// A config or secret created this recently is not collected (another reconcile may be using it).
const GC_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("berth API: {0}")]
    Api(#[from] ClientError),
    #[error("Swarm engine: {0}")]
    Engine(#[from] DockerError),
    /// Something berth must not or cannot do (a name it does not own, a CA it cannot make); shown
    /// on every Ingress rather than retried hot.
    #[error("{0}")]
    Refused(String),
}

/// berth's CA as mounted into the proxy.
struct Ca {
    cert: SwarmFile,
    key: SwarmFile,
    pem: String,
}

pub struct IngressController {
    docker: Docker,
    store: Arc<dyn ResourceStore>,
    /// TLS certificates and keys, handed to the proxy as Swarm secrets.
    secrets: Arc<dyn SecretReader>,
    instance: String,
    settings: Settings,
    /// One converge at a time: they all compute and apply the same global state.
    lock: tokio::sync::Mutex<()>,
    /// Swarm configs and secrets created recently (see `GC_GRACE`).
    fresh: std::sync::Mutex<HashMap<String, Instant>>,
    /// The newest rendered config: kept by garbage collection even while only loaded live.
    latest: std::sync::Mutex<Option<String>>,
    local_node: tokio::sync::OnceCell<String>,
}

impl IngressController {
    pub fn new(
        docker: Docker,
        store: Arc<dyn ResourceStore>,
        secrets: Arc<dyn SecretReader>,
        instance: String,
        settings: Settings,
    ) -> Self {
        IngressController {
            docker,
            store,
            secrets,
            instance,
            settings,
            lock: Default::default(),
            fresh: Default::default(),
            latest: Default::default(),
            local_node: Default::default(),
        }
    }

    fn mark_fresh(&self, name: &str) {
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Instant::now());
    }

    /// Whether a Swarm object carries this installation's labels for this proxy.
    fn owns(&self, l: Option<&HashMap<String, String>>) -> bool {
        let get = |k: &str| l.and_then(|l| l.get(k)).map(String::as_str);
        get(labels::MANAGED_BY) == Some(labels::MANAGED_BY_VALUE)
            && get(labels::INSTANCE) == Some(self.instance.as_str())
            && get(labels::KIND) == Some(Kind::Ingress.lower())
            && get(labels::NAME) == Some(self.settings.name.as_str())
    }

    /// The Swarm service named like the proxy, whoever owns it.
    async fn proxy_service(&self) -> Result<Option<SwarmService>, DockerError> {
        let name = &self.settings.name;
        Ok(self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(HashMap::from([("name".to_string(), vec![name.clone()])])),
                ..Default::default()
            }))
            .await?
            .into_iter()
            .find(|s| s.spec.as_ref().and_then(|sp| sp.name.as_deref()) == Some(name.as_str())))
    }

    async fn local_node(&self) -> Result<&str, DockerError> {
        self.local_node
            .get_or_try_init(|| async {
                let info = self.docker.info().await?;
                Ok(info.swarm.and_then(|s| s.node_id).unwrap_or_default())
            })
            .await
            .map(String::as_str)
    }

    /// The proxy's state volume on this node, if it exists here and is ours.
    async fn state_dir(&self) -> Option<PathBuf> {
        let v = self
            .docker
            .inspect_volume(&self.settings.volume())
            .await
            .ok()?;
        self.owns(Some(&v.labels))
            .then(|| PathBuf::from(v.mountpoint))
    }

    async fn admin(&self) -> Option<Admin> {
        Some(Admin::new(
            &self.state_dir().await?.join(build::ADMIN_SOCKET),
        ))
    }

    /// TCP ports the image declares (`EXPOSE`), if it can be inspected on this engine and declares
    /// any. An image that declares none is not held to it: many never say.
    async fn exposed_ports(&self, image: &str) -> Option<BTreeSet<u32>> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Some(
                i.config
                    .and_then(|c| c.exposed_ports)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()))
                    .collect::<BTreeSet<u32>>(),
            )
            .filter(|ports| !ports.is_empty()),
            Err(e) => {
                if status_code(&e) != Some(404) {
                    debug!(%image, error = %e, "cannot inspect a backend's image");
                }
                None
            }
        }
    }

    /// Reads and checks every Ingress, the Services and Secrets they name, and plans the routes.
    async fn dereference(
        &self,
        objects: &[DynObject],
    ) -> Result<(Plan, BTreeMap<String, String>, BTreeMap<String, Vec<u8>>), IngressError> {
        let mut valid: Vec<(DynObject, Ingress)> = Vec::new();
        let mut invalid = BTreeMap::new();
        for o in objects {
            match decode(o) {
                Ok(i) => valid.push((o.clone(), i)),
                Err(message) => {
                    invalid.insert(o.metadata.name.clone(), message);
                }
            }
        }
        let default_network = self.store.installation().await?.default_network;
        let wanted: BTreeSet<&str> = valid
            .iter()
            .flat_map(|(_, i)| i.spec.rules.iter())
            .flat_map(|r| r.paths.iter().map(|p| p.service.as_str()))
            .collect();
        let mut services = BTreeMap::new();
        for name in wanted {
            let Some(obj) = self.store.get(Kind::Service, name).await? else {
                continue;
            };
            let Ok(spec) = serde_json::from_value::<ServiceSpec>(obj.spec) else {
                continue;
            };
            let networks = if spec.networks.is_empty() {
                vec![default_network.clone()]
            } else {
                spec.networks.clone()
            };
            let exposed = self.exposed_ports(&spec.image.to_string()).await;
            services.insert(name.to_string(), Backend { networks, exposed });
        }
        let mut usable = BTreeMap::new();
        let mut pems = BTreeMap::new();
        let refs: BTreeSet<String> = valid
            .iter()
            .filter_map(|(_, i)| i.spec.tls.secret_ref.clone())
            .collect();
        for secret in refs {
            let verdict = match self.secrets.data(Kind::Secret, &secret).await? {
                None => Err(format!("Secret `{secret}` does not exist")),
                Some(files) => build::certificate_pem(&secret, &files).map(|pem| {
                    pems.insert(secret.clone(), pem);
                }),
            };
            usable.insert(secret, verdict);
        }
        let candidates: Vec<Candidate> = valid
            .iter()
            .map(|(o, i)| Candidate {
                name: &o.metadata.name,
                created: o.metadata.creation_timestamp,
                spec: &i.spec,
            })
            .collect();
        Ok((build::plan(&candidates, &services, &usable), invalid, pems))
    }

    /// The whole pipeline; see the module documentation.
    async fn converge(&self) -> Result<Action, IngressError> {
        let _one_at_a_time = self.lock.lock().await;
        let objects = self.store.list(Kind::Ingress).await?;
        let (plan, invalid, pems) = self.dereference(&objects).await?;

        let (proxy, ca_pem, poll) = if plan.hosts.is_empty() {
            // Nothing to serve: no proxy holding the nodes' ports 443 and 80.
            self.remove_proxy().await?;
            *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = None;
            (ProxyState::Starting(String::new()), None, false)
        } else {
            match self.apply(&plan, &pems).await {
                Ok(applied) => applied,
                Err(IngressError::Refused(why)) => (ProxyState::Refused(why), None, false),
                Err(e) => return Err(e),
            }
        };

        let now = chrono::Utc::now();
        for o in &objects {
            let name = &o.metadata.name;
            let current: IngressStatus =
                serde_json::from_value(o.status.clone()).unwrap_or_default();
            let generation = o.metadata.generation;
            let new = match (invalid.get(name), plan.ingresses.get(name)) {
                (Some(why), _) => status::invalid(&current, generation, why, now),
                (None, Some(outcome)) => status::observed(
                    &current,
                    generation,
                    outcome,
                    &self.settings.name,
                    &proxy,
                    ca_pem.as_deref(),
                    now,
                ),
                (None, None) => continue,
            };
            if new != current {
                let value =
                    serde_json::to_value(&new).map_err(|e| ClientError::Protocol(e.to_string()))?;
                match self
                    .store
                    .update_status(Kind::Ingress, name, value, None)
                    .await
                {
                    Ok(_) => {}
                    // Deleted meanwhile: its delete event brings the next converge.
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(if poll {
            Action::requeue(PROGRESS_POLL)
        } else {
            Action::await_change()
        })
    }

    /// Materialises what the proxy needs and brings the proxy to the plan. Returns the proxy's
    /// state, the CA certificate, and whether to look again soon.
    async fn apply(
        &self,
        plan: &Plan,
        pems: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(ProxyState, Option<String>, bool), IngressError> {
        // The CA is mounted whether or not an Ingress uses it yet, so switching one to internal TLS
        // never needs a restart.
        let ca = self.ensure_ca().await?;
        let mut certificates = Vec::new();
        let mut files = Files::default();
        for secret in plan.tls_secrets() {
            let Some(pem) = pems.get(&secret) else {
                continue;
            };
            let name = build::certificate_name(&self.settings, &secret, pem);
            let f = self
                .ensure_file(FileKind::Secret, &name, pem, roles::CERTIFICATE, &secret)
                .await?;
            files
                .certificates
                .insert(secret, build::certificate_path(&f.name));
            certificates.push(f);
        }
        certificates.sort_by(|a, b| a.name.cmp(&b.name));

        let rendered = build::render(plan, &self.settings, &files);
        let bytes =
            serde_json::to_vec(&rendered).map_err(|e| IngressError::Refused(e.to_string()))?;
        let config_name = build::config_name(&self.settings, &rendered);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(config_name.clone());
        let config = self
            .ensure_file(FileKind::Config, &config_name, &bytes, roles::CONFIG, "")
            .await?;

        let (networks, networks_pending) = self.resolve_networks(&plan.networks).await?;
        let labelled = !self
            .docker
            .list_nodes(Some(ListNodesOptions {
                filters: Some(HashMap::from([(
                    "node.label".to_string(),
                    vec![format!("{}=true", labels::INGRESS_NODE)],
                )])),
            }))
            .await?
            .is_empty();
        let parts = ProxyParts {
            certificates,
            ca_cert: ca.cert,
            ca_key: ca.key,
            networks,
            constraint: build::constraint(labelled),
        };

        let state = match self.proxy_service().await? {
            Some(svc) if !self.owns(svc.spec.as_ref().and_then(|s| s.labels.as_ref())) => {
                let owner = svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.labels.as_ref())
                    .and_then(|l| l.get(labels::INSTANCE).cloned());
                ProxyState::Refused(match owner {
                    Some(other) => format!("the Swarm service `{}` belongs to another berth installation ({other}); give this one another --ingress-name", self.settings.name),
                    None => format!("a Swarm service named `{}` exists that berth does not manage; remove it or give berth another --ingress-name", self.settings.name),
                })
            }
            None => self.write_service(None, &parts, &config).await?,
            Some(svc) => {
                let spec = svc.spec.clone().unwrap_or_default();
                if build::needs_restart(&spec, &self.settings, &self.instance, &parts) {
                    info!("the proxy's service spec changes: restarting it with the new config");
                    self.write_service(Some(&svc), &parts, &config).await?
                } else {
                    self.deliver(&svc, &parts, &config, &rendered, &bytes)
                        .await?
                }
            }
        };
        // A refusal waits for the next change (or the resync) instead of being retried every second.
        let poll = networks_pending || matches!(state, ProxyState::Starting(_));
        Ok((state, Some(ca.pem), poll))
    }

    /// Gets `config` to a proxy whose service spec is current: nothing to do, a live load, or, when
    /// that is impossible, the restart path.
    async fn deliver(
        &self,
        svc: &SwarmService,
        parts: &ProxyParts,
        config: &SwarmFile,
        rendered: &Value,
        bytes: &[u8],
    ) -> Result<ProxyState, IngressError> {
        let spec = svc.spec.clone().unwrap_or_default();
        let boot = build::boot_of(&spec).unwrap_or_default();
        let updating = svc
            .update_status
            .as_ref()
            .and_then(|u| u.state)
            .is_some_and(|s| {
                matches!(
                    s,
                    ServiceUpdateStatusStateEnum::UPDATING
                        | ServiceUpdateStatusStateEnum::ROLLBACK_STARTED
                )
            });
        let tasks = self.tasks(svc).await?;
        let running: Vec<&Task> = tasks
            .iter()
            .filter(|t| t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING))
            .collect();
        if updating || tasks.is_empty() || running.len() < tasks.len() {
            let problem = tasks
                .iter()
                .filter_map(|t| t.status.as_ref())
                .find_map(|s| s.err.clone())
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            return Ok(ProxyState::Starting(format!(
                "{} of {} proxy tasks running{problem}",
                running.len(),
                tasks.len()
            )));
        }
        let served = |how: &str| ProxyState::Serving {
            config: config.name.clone(),
            delivery: how.to_string(),
        };
        let local = self.local_node().await?;
        let all_here = tasks.iter().all(|t| t.node_id.as_deref() == Some(local));
        let booted_with_it = tasks
            .iter()
            .all(|t| task_boot(t) == Some(config.name.as_str()));
        if all_here {
            if let Some(admin) = self.admin().await {
                match admin.config().await {
                    Ok(live) if canonical_hash(&live) == canonical_hash(rendered) => {
                        return Ok(served(if booted_with_it && boot.name == config.name {
                            delivery::RESTART
                        } else {
                            delivery::LIVE
                        }));
                    }
                    Ok(_) => match admin.load(bytes).await {
                        Ok(()) => {
                            info!(config = %config.name, "loaded the new proxy config live");
                            return Ok(served(delivery::LIVE));
                        }
                        // Caddy keeps running the config it has; booting a task from one it
                        // rejects would only take the proxy down.
                        Err(e @ admin::AdminError::Refused { .. }) => {
                            warn!(error = %e, config = %config.name, "the proxy refused the new config");
                            return Ok(ProxyState::Refused(format!(
                                "the proxy refused config `{}` and keeps serving the previous one: {e}",
                                config.name
                            )));
                        }
                        Err(e) => {
                            warn!(error = %e, "live load failed; restarting the proxy instead")
                        }
                    },
                    Err(e) => {
                        warn!(error = %e, "proxy admin API unreachable; restarting the proxy instead")
                    }
                }
            }
        }
        if booted_with_it {
            return Ok(served(delivery::RESTART));
        }
        info!(config = %config.name, "proxy not reachable for a live load: restarting it with the new config");
        self.write_service(Some(svc), parts, config).await
    }

    /// Creates or updates (restarts) the proxy service with `config` as its boot config.
    async fn write_service(
        &self,
        existing: Option<&SwarmService>,
        parts: &ProxyParts,
        config: &SwarmFile,
    ) -> Result<ProxyState, IngressError> {
        // A task must boot from this config, not from an autosave an earlier generation with the
        // same boot config left on this node.
        if let Some(dir) = self.state_dir().await {
            let stale = dir.join(build::AUTOSAVE_DIR).join(&config.name);
            if tokio::fs::remove_dir_all(&stale).await.is_ok() {
                debug!(dir = %stale.display(), "removed a stale autosave");
            }
        }
        let built = build::build_service(&self.settings, &self.instance, parts, config);
        let result = match existing {
            None => self
                .docker
                .create_service(built.spec, None)
                .await
                .map(|r| info!(id = ?r.id, config = %config.name, "created the proxy service")),
            Some(svc) => {
                let version = svc.version.as_ref().and_then(|v| v.index).unwrap_or(0);
                self.docker
                    .update_service(
                        svc.id.as_deref().unwrap_or_default(),
                        built.spec,
                        UpdateServiceOptions {
                            version: version as i32,
                            ..Default::default()
                        },
                        None,
                    )
                    .await
                    .map(|_| info!(config = %config.name, "updated the proxy service"))
            }
        };
        match result {
            Ok(()) => Ok(ProxyState::Starting(
                "the proxy service is starting with the new config".into(),
            )),
            Err(e) if status_code(&e) == Some(400) => Ok(ProxyState::Refused(
                crate::engine::refusal("proxy service", &e),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn tasks(&self, svc: &SwarmService) -> Result<Vec<Task>, DockerError> {
        self.docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([
                    (
                        "service".to_string(),
                        vec![svc.id.clone().unwrap_or_default()],
                    ),
                    ("desired-state".to_string(), vec!["running".to_string()]),
                ])),
            }))
            .await
    }

    async fn remove_proxy(&self) -> Result<(), IngressError> {
        if let Some(svc) = self.proxy_service().await? {
            if self.owns(svc.spec.as_ref().and_then(|s| s.labels.as_ref())) {
                info!("no Ingress left: removing the proxy service");
                match self
                    .docker
                    .delete_service(svc.id.as_deref().unwrap_or_default())
                    .await
                {
                    Ok(()) => {}
                    Err(e) if status_code(&e) == Some(404) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Swarm IDs of the berth Networks the proxy joins; `true` if some are still being created.
    async fn resolve_networks(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<(Vec<String>, bool), IngressError> {
        let mut ids = Vec::new();
        let mut pending = false;
        for name in names {
            if self.store.get(Kind::Network, name).await?.is_none() {
                continue;
            }
            match self
                .docker
                .inspect_network(name, None::<InspectNetworkOptions>)
                .await
            {
                Ok(n) => {
                    let owner = n.labels.as_ref().and_then(|l| l.get(labels::INSTANCE));
                    if owner == Some(&self.instance) && n.name.as_deref() == Some(name.as_str()) {
                        ids.extend(n.id);
                    } else {
                        warn!(network = %name, "the Swarm network is not this installation's; the proxy does not join it");
                    }
                }
                Err(e) if status_code(&e) == Some(404) => pending = true,
                Err(e) => return Err(e.into()),
            }
        }
        ids.sort();
        Ok((ids, pending))
    }

    /// Makes sure the Swarm secret or config `name` holds `data` and is ours.
    async fn ensure_file(
        &self,
        kind: FileKind,
        name: &str,
        data: &[u8],
        role: &str,
        key: &str,
    ) -> Result<SwarmFile, IngressError> {
        self.mark_fresh(name);
        let mut l = build::labels_for(&self.instance, &self.settings.name, role);
        if !key.is_empty() {
            l.insert(labels::KEY.to_string(), key.to_string());
        }
        swarm_file::ensure(&self.docker, kind, name, data, l, |l| self.owns(Some(l)))
            .await?
            .map_err(IngressError::Refused)
    }

    /// The current CA: the newest root whose certificate (config) and key (secret) both exist in
    /// Swarm, generated on first use. `None` from `current_ca` only.
    async fn current_ca(&self) -> Result<Option<Ca>, DockerError> {
        use base64::Engine;
        let keys: HashMap<String, SwarmFile> = self
            .docker
            .list_secrets(Some(ListSecretsOptions {
                filters: Some(build::owned_filters(&self.instance, Some(roles::CA_KEY))),
            }))
            .await?
            .into_iter()
            .filter_map(|s| {
                let spec = s.spec?;
                if !self.owns(spec.labels.as_ref()) {
                    return None;
                }
                let id = spec.labels.as_ref()?.get(labels::KEY)?.clone();
                Some((
                    id,
                    SwarmFile {
                        id: s.id?,
                        name: spec.name?,
                    },
                ))
            })
            .collect();
        let mut certs: Vec<_> = self
            .docker
            .list_configs(Some(ListConfigsOptions {
                filters: Some(build::owned_filters(&self.instance, Some(roles::CA))),
            }))
            .await?
            .into_iter()
            .filter(|c| self.owns(c.spec.as_ref().and_then(|s| s.labels.as_ref())))
            .collect();
        certs.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        for c in certs {
            let Some(spec) = c.spec else { continue };
            let Some(key) = spec
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::KEY))
                .and_then(|id| keys.get(id))
            else {
                continue;
            };
            let Some(pem) = spec
                .data
                .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                .and_then(|b| String::from_utf8(b).ok())
            else {
                continue;
            };
            return Ok(Some(Ca {
                cert: SwarmFile {
                    id: c.id.unwrap_or_default(),
                    name: spec.name.unwrap_or_default(),
                },
                key: key.clone(),
                pem,
            }));
        }
        Ok(None)
    }

    async fn ensure_ca(&self) -> Result<Ca, IngressError> {
        if let Some(ca) = self.current_ca().await? {
            return Ok(ca);
        }
        let generated = ca::generate(&self.instance).map_err(IngressError::Refused)?;
        let id = ca::ca_id(&generated.cert_pem);
        let proxy = &self.settings.name;
        // The key first: a certificate without its key is never picked as the current CA.
        let key = self
            .ensure_file(
                FileKind::Secret,
                &format!("{proxy}-ca-key-{id}"),
                generated.key_pem.as_bytes(),
                roles::CA_KEY,
                &id,
            )
            .await?;
        let cert = self
            .ensure_file(
                FileKind::Config,
                &format!("{proxy}-ca-{id}"),
                generated.cert_pem.as_bytes(),
                roles::CA,
                &id,
            )
            .await?;
        info!(%id, "created berth's ingress CA");
        Ok(Ca {
            cert,
            key,
            pem: generated.cert_pem,
        })
    }

    /// Removes configs and certificates the proxy no longer mounts (old versions), keeping the
    /// newest rendered config, the current CA and anything created in the last minute; and, on this
    /// node, autosave directories of boot configs the proxy no longer has.
    async fn collect(&self) -> Result<(), IngressError> {
        let _one_at_a_time = self.lock.lock().await;
        let svc = self
            .proxy_service()
            .await?
            .filter(|s| self.owns(s.spec.as_ref().and_then(|sp| sp.labels.as_ref())));
        let mut keep: HashSet<String> = HashSet::new();
        let c = svc
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.task_template.as_ref())
            .and_then(|t| t.container_spec.as_ref());
        for f in c.and_then(|c| c.configs.as_ref()).into_iter().flatten() {
            keep.extend(f.config_name.clone());
        }
        for f in c.and_then(|c| c.secrets.as_ref()).into_iter().flatten() {
            keep.extend(f.secret_name.clone());
        }
        if let Some(latest) = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            keep.insert(latest);
        }
        {
            let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
            fresh.retain(|_, at| at.elapsed() < GC_GRACE);
            keep.extend(fresh.keys().cloned());
        }
        if let Some(ca) = self.current_ca().await? {
            keep.insert(ca.cert.name);
            keep.insert(ca.key.name);
        }
        let filters = Some(build::owned_filters(&self.instance, None));
        for s in self
            .docker
            .list_secrets(Some(ListSecretsOptions {
                filters: filters.clone(),
            }))
            .await?
        {
            let Some(spec) = s.spec else { continue };
            let name = spec.name.clone().unwrap_or_default();
            if self.owns(spec.labels.as_ref()) && !keep.contains(&name) {
                match self
                    .docker
                    .delete_secret(s.id.as_deref().unwrap_or_default())
                    .await
                {
                    Ok(()) => info!(%name, "removed an unused proxy secret"),
                    Err(e) if matches!(status_code(&e), Some(400 | 404 | 409)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for cfg in self
            .docker
            .list_configs(Some(ListConfigsOptions { filters }))
            .await?
        {
            let Some(spec) = cfg.spec else { continue };
            let name = spec.name.clone().unwrap_or_default();
            if self.owns(spec.labels.as_ref()) && !keep.contains(&name) {
                match self
                    .docker
                    .delete_config(cfg.id.as_deref().unwrap_or_default())
                    .await
                {
                    Ok(()) => info!(%name, "removed an unused proxy config"),
                    Err(e) if matches!(status_code(&e), Some(400 | 404 | 409)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        match svc
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(build::boot_of)
        {
            Some(boot) => {
                if let Some(dir) = self.state_dir().await {
                    let mut entries = match tokio::fs::read_dir(dir.join(build::AUTOSAVE_DIR)).await
                    {
                        Ok(e) => e,
                        Err(_) => return Ok(()),
                    };
                    while let Ok(Some(e)) = entries.next_entry().await {
                        if e.file_name().to_string_lossy() != boot.name {
                            let _ = tokio::fs::remove_dir_all(e.path()).await;
                        }
                    }
                }
            }
            None => {
                // No proxy: its state volume goes too, once its last container is gone.
                if self.state_dir().await.is_some() {
                    match self
                        .docker
                        .remove_volume(&self.settings.volume(), None::<RemoveVolumeOptions>)
                        .await
                    {
                        Ok(()) => info!("removed the proxy's state volume"),
                        Err(e) => debug!(error = %e, "the proxy's state volume stays for now"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether any Ingress names the Service or Secret `name`.
    async fn any_ingress_uses(&self, kind: Kind, name: &str) -> bool {
        let Ok(objects) = self.store.list(Kind::Ingress).await else {
            // Cannot tell: a converge too many is harmless.
            return true;
        };
        objects.iter().any(|o| {
            serde_json::from_value::<berth_api_types::ingress::IngressSpec>(o.spec.clone())
                .is_ok_and(|s| match kind {
                    Kind::Service => s
                        .rules
                        .iter()
                        .any(|r| r.paths.iter().any(|p| p.service == name)),
                    Kind::Secret => s.tls.secret_ref.as_deref() == Some(name),
                    _ => true,
                })
        })
    }
}

/// The boot config a task was started with.
fn task_boot(t: &Task) -> Option<&str> {
    t.spec
        .as_ref()?
        .container_spec
        .as_ref()?
        .configs
        .as_ref()?
        .iter()
        .find(|c| c.file.as_ref().and_then(|f| f.name.as_deref()) == Some(build::BOOT_CONFIG_PATH))?
        .config_name
        .as_deref()
}

/// The typed, validated Ingress; `Err` is the message for status. The API validated on write; this
/// guards against objects stored by another version.
fn decode(o: &DynObject) -> Result<Ingress, String> {
    berth_api_types::typed::recheck(o, validate_ingress)
}

#[async_trait]
impl Reconciler for IngressController {
    type Error = IngressError;

    fn kind(&self) -> Kind {
        Kind::Ingress
    }

    /// Every name converges the whole proxy and every Ingress's status (see the module docs).
    async fn reconcile(&self, _name: &str) -> Result<Action, IngressError> {
        self.converge().await
    }

    /// The proxy's name, while its service exists: the resync then converges even with no Ingress
    /// left (removing the proxy if they were deleted while the controller was down).
    async fn engine_names(&self) -> Result<Vec<String>, IngressError> {
        Ok(self
            .proxy_service()
            .await?
            .filter(|s| self.owns(s.spec.as_ref().and_then(|sp| sp.labels.as_ref())))
            .map(|_| self.settings.name.clone())
            .into_iter()
            .collect())
    }

    async fn collect_garbage(&self) -> Result<(), IngressError> {
        self.collect().await
    }

    fn engine_event_types(&self) -> Vec<&'static str> {
        vec!["service", "container", "node"]
    }

    /// The proxy's own service and containers (a task restarted, a service changed by hand) and
    /// node changes (an `io.berth.ingress` label) all mean "converge".
    fn map_engine_event(&self, ev: &EventMessage) -> Option<String> {
        let attrs = ev.actor.as_ref()?.attributes.as_ref();
        let get = |k: &str| attrs.and_then(|a| a.get(k)).map(String::as_str);
        let ours = match ev.typ? {
            EventMessageTypeEnum::SERVICE => get("name") == Some(self.settings.name.as_str()),
            EventMessageTypeEnum::CONTAINER => {
                get(labels::INSTANCE) == Some(self.instance.as_str())
                    && get(labels::KIND) == Some(Kind::Ingress.lower())
            }
            EventMessageTypeEnum::NODE => true,
            _ => false,
        };
        ours.then(|| self.settings.name.clone())
    }

    fn watches(&self) -> Vec<Kind> {
        vec![Kind::Service, Kind::Secret, Kind::Network]
    }

    /// A backend Service or TLS Secret appearing, changing or going away, or a Network the proxy may
    /// join being created. All of them change the one proxy, so they map to its name.
    async fn map_related(&self, event: &Event) -> Vec<String> {
        let relevant = match event.kind {
            // A Service's status moves on every task start; only its existence and spec matter here.
            Kind::Service if event.type_ == EventType::StatusChanged => false,
            Kind::Service | Kind::Secret => self.any_ingress_uses(event.kind, &event.name).await,
            Kind::Network => self
                .store
                .list(Kind::Ingress)
                .await
                .map_or(true, |l| !l.is_empty()),
            _ => false,
        };
        if relevant {
            vec![self.settings.name.clone()]
        } else {
            Vec::new()
        }
    }
}
