//! Ingress, step 3: materialise what the proxy needs (its config, certificates and berth's CA as
//! content-addressed Swarm configs and secrets) and bring the proxy to the plan: a live load into
//! every proxy task, through each one's remote admin endpoint on its node, when only routes change;
//! the restart path otherwise (see `mod.rs`). Also the proxy's garbage collection.

use super::admin;
use super::build::{self, roles, Files, Plan, ProxyParts};
use super::ca;
use super::status::{self, ProxyState, Unreached, Verdict};
use super::{refused, task_boot, Ca, IngressController};
use crate::runtime::Error;
use crate::swarm::engine::status_code;
use crate::swarm::hash::canonical_hash;
use crate::swarm::{FileKind, SwarmFile};
use berth_api_types::names::labels;
use berth_api_types::Kind;
use bollard::errors::Error as DockerError;
use bollard::models::{Service as SwarmService, ServiceUpdateStatusStateEnum, Task, TaskState};
use bollard::query_parameters::{
    InspectNetworkOptions, ListConfigsOptions, ListNodesOptions, ListSecretsOptions,
    ListTasksOptions, RemoveVolumeOptions, UpdateServiceOptions,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use tracing::{debug, info, warn};

/// How long a proxy task whose admin endpoint does not answer is waited for before the restart
/// path: after the task's start (Caddy opens the endpoint once it has issued its certificate), and
/// after the first failed attempt (Caddy swaps the endpoint's certificate during every load, and a
/// handshake in that moment fails).
const ADMIN_GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// Whether a task started within [`ADMIN_GRACE`].
fn young(t: &Task) -> bool {
    t.status
        .as_ref()
        .and_then(|s| s.timestamp)
        .is_some_and(|at| chrono::Utc::now() - at < ADMIN_GRACE)
}

impl IngressController {
    /// Materialises what the proxy needs and brings the proxy to the plan. Returns the proxy's
    /// state, the CA certificate, and whether to look again soon.
    pub(super) async fn apply(
        &self,
        plan: &Plan,
        pems: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(ProxyState, Option<String>, bool), Error> {
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

        files.admin_client = self.identity.certificate_base64();
        let rendered = build::render(plan, &self.settings, &files);
        let bytes = serde_json::to_vec(&rendered).map_err(|e| refused(e.to_string()))?;
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
                if build::needs_restart(&spec, &self.settings, &self.owner, &parts) {
                    info!("the proxy's service spec changes: restarting it with the new config");
                    self.write_service(Some(&svc), &parts, &config).await?
                } else {
                    self.deliver(&svc, &parts, &config, &rendered, &bytes, &ca.pem)
                        .await?
                }
            }
        };
        // A refusal waits for the next change (or the resync) instead of being retried every second.
        let poll = networks_pending || matches!(state, ProxyState::Starting(_));
        Ok((state, Some(ca.pem), poll))
    }

    /// Gets `config` to every task of a proxy whose service spec is current: nothing to do, a live
    /// load into each task through its node's admin endpoint, or, when a task cannot be reached,
    /// the restart path.
    pub(super) async fn deliver(
        &self,
        svc: &SwarmService,
        parts: &ProxyParts,
        config: &SwarmFile,
        rendered: &Value,
        bytes: &[u8],
        ca_pem: &str,
    ) -> Result<ProxyState, Error> {
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
        let total = tasks.len();
        if updating || tasks.is_empty() || running.len() < total {
            let problem = tasks
                .iter()
                .filter_map(|t| t.status.as_ref())
                .find_map(|s| s.err.clone())
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            return Ok(ProxyState::Starting(format!(
                "{} of {total} proxy tasks running{problem}",
                running.len(),
            )));
        }
        let booted_with_it = tasks
            .iter()
            .all(|t| task_boot(t) == Some(config.name.as_str()));
        let target = canonical_hash(rendered);
        let mut loaded = 0;
        let mut unreachable: Vec<Unreached> = Vec::new();
        let task_ids: HashSet<String> = running.iter().filter_map(|t| t.id.clone()).collect();
        let mut silent = self
            .unreachable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        silent.retain(|id, _| task_ids.contains(id));
        let mut waited = |t: &Task| {
            let since = *silent
                .entry(t.id.clone().unwrap_or_default())
                .or_insert_with(std::time::Instant::now);
            young(t) || since.elapsed() < ADMIN_GRACE.to_std().unwrap_or_default()
        };
        let mut answered = Vec::new();
        for t in &running {
            let node = t.node_id.clone().unwrap_or_default();
            let admin = match self.node_addr(&node).await? {
                Some(ip) => admin::Admin::new(
                    &self.identity,
                    ca_pem,
                    &self.settings.name,
                    SocketAddr::new(ip, self.settings.admin_port),
                )
                .map_err(|e| refused(e.to_string()))?,
                None => {
                    unreachable.push(Unreached {
                        node,
                        why: "the node reports no address".into(),
                        just_started: waited(t),
                    });
                    continue;
                }
            };
            let live = match admin.config().await {
                Ok(live) => live,
                Err(e) => {
                    debug!(node = %node, error = %e, "proxy admin endpoint unreachable");
                    unreachable.push(Unreached {
                        node,
                        why: e.to_string(),
                        just_started: waited(t),
                    });
                    continue;
                }
            };
            answered.extend(t.id.clone());
            if canonical_hash(&live) == target {
                continue;
            }
            match admin.load(bytes).await {
                Ok(()) => {
                    info!(config = %config.name, node = %node, addr = %admin.addr(), "loaded the new proxy config live");
                    loaded += 1;
                }
                // Caddy keeps running the config it has; booting a task from one it rejects would
                // only take the proxy down.
                Err(e @ admin::AdminError::Refused { .. }) => {
                    warn!(error = %e, config = %config.name, node = %node, "the proxy refused the new config");
                    return Ok(ProxyState::Refused(format!(
                        "the proxy refused config `{}` and keeps serving the previous one: {e}",
                        config.name
                    )));
                }
                Err(e) => unreachable.push(Unreached {
                    node,
                    why: e.to_string(),
                    just_started: waited(t),
                }),
            }
        }
        for id in &answered {
            silent.remove(id);
        }
        *self
            .unreachable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = silent;

        match status::verdict(
            &config.name,
            total,
            loaded,
            &unreachable,
            booted_with_it,
            boot.name == config.name,
        ) {
            Verdict::State(state) => Ok(state),
            Verdict::Restart { node, why } => {
                warn!(config = %config.name, %node, error = %why, "a proxy cannot be reached for a live load: restarting the proxy with the new config");
                self.write_service(Some(svc), parts, config).await
            }
        }
    }

    /// The address berth reaches a node's published ports at: the address the node reports to the
    /// swarm (managers listening on 0.0.0.0 report that; their manager address then says).
    async fn node_addr(&self, node: &str) -> Result<Option<IpAddr>, Error> {
        let n = match self.docker.inspect_node(node).await {
            Ok(n) => n,
            Err(e) if status_code(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let usable = |a: &str| a.parse::<IpAddr>().ok().filter(|ip| !ip.is_unspecified());
        Ok(n.status
            .and_then(|s| s.addr)
            .and_then(|a| usable(&a))
            .or_else(|| {
                let m = n.manager_status?.addr?;
                usable(
                    m.rsplit_once(':')
                        .map_or(m.as_str(), |(h, _)| h)
                        .trim_matches(['[', ']']),
                )
            }))
    }

    /// Creates or updates (restarts) the proxy service with `config` as its boot config.
    pub(super) async fn write_service(
        &self,
        existing: Option<&SwarmService>,
        parts: &ProxyParts,
        config: &SwarmFile,
    ) -> Result<ProxyState, Error> {
        // A task must boot from this config, not from an autosave an earlier generation with the
        // same boot config left on this node.
        if let Some(dir) = self.state_dir().await {
            let stale = dir.join(build::AUTOSAVE_DIR).join(&config.name);
            if tokio::fs::remove_dir_all(&stale).await.is_ok() {
                debug!(dir = %stale.display(), "removed a stale autosave");
            }
        }
        let built = build::build_service(&self.settings, &self.owner, parts, config);
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
                crate::swarm::engine::refusal("proxy service", &e),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn tasks(&self, svc: &SwarmService) -> Result<Vec<Task>, DockerError> {
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

    pub(super) async fn remove_proxy(&self) -> Result<(), Error> {
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
    pub(super) async fn resolve_networks(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<(Vec<String>, bool), Error> {
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
                    let ours = self
                        .owner
                        .for_kind(Kind::Network)
                        .same_installation(n.labels.as_ref());
                    if ours && n.name.as_deref() == Some(name.as_str()) {
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
    pub(super) async fn ensure_file(
        &self,
        kind: FileKind,
        name: &str,
        data: &[u8],
        role: &str,
        key: &str,
    ) -> Result<SwarmFile, Error> {
        let mut l = self
            .owner
            .labels_with(&self.settings.name, &[(labels::ROLE, role)]);
        if !key.is_empty() {
            l.insert(labels::KEY.to_string(), key.to_string());
        }
        self.files
            .ensure(kind, name, data, l, &self.owner)
            .await?
            .map_err(refused)
    }

    /// The current CA: the newest root whose certificate (config) and key (secret) both exist in
    /// Swarm, generated on first use. `None` from `current_ca` only.
    pub(super) async fn current_ca(&self) -> Result<Option<Ca>, DockerError> {
        use base64::Engine;
        let keys: HashMap<String, SwarmFile> = self
            .docker
            .list_secrets(Some(ListSecretsOptions {
                filters: Some(
                    self.owner
                        .filters(Some(&self.settings.name), &[(labels::ROLE, roles::CA_KEY)]),
                ),
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
                filters: Some(
                    self.owner
                        .filters(Some(&self.settings.name), &[(labels::ROLE, roles::CA)]),
                ),
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

    pub(super) async fn ensure_ca(&self) -> Result<Ca, Error> {
        if let Some(ca) = self.current_ca().await? {
            return Ok(ca);
        }
        let generated = ca::generate(self.owner.instance()).map_err(refused)?;
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
    pub(super) async fn collect(&self) -> Result<(), Error> {
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
        if let Some(ca) = self.current_ca().await? {
            keep.insert(ca.cert.name);
            keep.insert(ca.key.name);
        }
        for kind in [FileKind::Secret, FileKind::Config] {
            let filters = self.owner.filters(Some(&self.settings.name), &[]);
            self.files.collect(kind, filters, &keep).await?;
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
}
