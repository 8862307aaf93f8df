//! The Service controller: keeps one Swarm service per Service object, labelled as berth's, and
//! reports its replicas, rollout state and task errors as status. The reconcile is a pipeline of small
//! steps — dereference, validate, build (pure, `build.rs`), apply, update status (pure, `status.rs`).

pub mod build;
pub mod deps;
pub mod rollout;
pub mod status;

use crate::api::{ClientError, ResourceStore, SecretReader};
use crate::engine::status_code;
use crate::registry::creds::{self, PullAuth, PullAuthLookup};
use crate::runtime::state::LocalState;
use crate::runtime::{Action, Reconciler};
use crate::swarm_file;
use async_trait::async_trait;
use berth_api_types::image::ImageRef;
use berth_api_types::names::labels;
use berth_api_types::registry::RegistrySpec;
use berth_api_types::service::ServiceSpec;
use berth_api_types::service::{validate_service, Service, ServiceStatus};
use berth_api_types::typed::recheck;
use berth_api_types::volume::VolumeSpec;
use berth_api_types::Kind;
use berth_api_types::{ConditionStatus, Event};
use bollard::errors::Error as DockerError;
use bollard::models::{EventMessage, EventMessageTypeEnum, Service as SwarmService};
use bollard::query_parameters::{
    InspectNetworkOptions, InspectServiceOptions, ListConfigsOptions, ListSecretsOptions,
    ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};
use bollard::Docker;
use deps::{FileKind, Resolved, SwarmFile};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often a service that is not yet Ready is looked at again (task starts, rollouts).
const PROGRESS_POLL: Duration = Duration::from_secs(2);

/// A secret or config this process materialised, and no service references yet, is not
/// garbage-collected for this long: another worker may be about to update a service onto it.
const FILE_GC_GRACE: Duration = Duration::from_secs(60);

/// How long the registry is given to explain a failing pull.
const REGISTRY_QUESTION_TIMEOUT: Duration = Duration::from_secs(10);

/// What `apply` did.
enum Outcome {
    /// The engine already runs this spec.
    Unchanged(SwarmService),
    /// berth created or updated the Swarm service; this is it afterwards.
    Wrote(SwarmService),
    /// An update is due but the service was written moments ago: try again after this long.
    Deferred(Duration),
    /// The engine will not take this spec (or the name is not berth's): the message says why.
    Refused(String),
}

/// What resolving a Service's dependencies found.
enum DepsOutcome {
    Ready(Resolved),
    /// Something does not exist yet; the reasons name it. `soon`: it is being created (poll).
    Waiting {
        reasons: Vec<String>,
        soon: bool,
    },
    /// Something exists but berth may not use it (e.g. a Swarm object it does not own).
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("berth API: {0}")]
    Api(#[from] ClientError),
    #[error("Swarm engine: {0}")]
    Engine(#[from] DockerError),
}

/// What this controller remembers per object between reconciles and restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    uid: String,
    hash: String,
    /// The engine's version index right after berth's own write: if it has not moved, nobody else
    /// changed the service and there is nothing to compare.
    version: u64,
    /// Fingerprint of the registry credentials sent with that write (see `PullAuth::fingerprint`).
    #[serde(default)]
    auth: Option<String>,
    /// The digest the image was pinned to for a generation, so later reconciles of the same
    /// generation do not ask the registry again (or follow a tag that moved meanwhile).
    #[serde(default)]
    pinned: Option<(u64, String)>,
}

pub struct ServiceController {
    docker: Docker,
    store: Arc<dyn ResourceStore>,
    /// Secret and Config values, handed to the engine as Swarm secrets/configs.
    secrets: Arc<dyn SecretReader>,
    instance: String,
    state: LocalState,
    /// Swarm secret/config names this process materialised recently (see `FILE_GC_GRACE`).
    fresh: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    pace: Pace,
}

/// Services are updated at most once per this interval: the engine starts a rolling update for
/// each write, so a burst of deploys is folded into the first and one more with the newest spec.
const MIN_UPDATE_INTERVAL: Duration = Duration::from_secs(1);

/// When each service was last written (see `MIN_UPDATE_INTERVAL`).
#[derive(Default)]
struct Pace(std::sync::Mutex<HashMap<String, std::time::Instant>>);

impl Pace {
    /// How long `name` must still wait before its next update, if at all.
    fn wait(&self, name: &str) -> Option<Duration> {
        let last = *self.0.lock().unwrap_or_else(|p| p.into_inner()).get(name)?;
        MIN_UPDATE_INTERVAL
            .checked_sub(last.elapsed())
            .filter(|d| !d.is_zero())
    }

    fn wrote(&self, name: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, at| at.elapsed() < MIN_UPDATE_INTERVAL);
        map.insert(name.to_string(), std::time::Instant::now());
    }
}

impl ServiceController {
    pub fn new(
        docker: Docker,
        store: Arc<dyn ResourceStore>,
        secrets: Arc<dyn SecretReader>,
        instance: String,
        state: LocalState,
    ) -> Self {
        ServiceController {
            docker,
            store,
            secrets,
            instance,
            state,
            fresh: Default::default(),
            pace: Pace::default(),
        }
    }

    /// Swarm services this instance owns for `name` (normally zero or one).
    async fn owned(&self, name: Option<&str>) -> Result<Vec<SwarmService>, DockerError> {
        self.docker
            .list_services(Some(ListServicesOptions {
                filters: Some(build::owned_filters(&self.instance, name)),
                ..Default::default()
            }))
            .await
    }

    /// Whether a Swarm service carries this installation's ownership labels for object `name`.
    fn owns(&self, svc: &SwarmService, name: &str) -> bool {
        let l = svc.spec.as_ref().and_then(|sp| sp.labels.as_ref());
        let get = |k: &str| l.and_then(|l| l.get(k)).map(String::as_str);
        get(labels::MANAGED_BY) == Some(labels::MANAGED_BY_VALUE)
            && get(labels::INSTANCE) == Some(self.instance.as_str())
            && get(labels::KIND) == Some(Kind::Service.lower())
            && get(labels::NAME) == Some(name)
    }

    async fn inspect(&self, id: &str) -> Result<Option<SwarmService>, DockerError> {
        match self
            .docker
            .inspect_service(id, None::<InspectServiceOptions>)
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The Swarm service named exactly `name`, whoever owns it. Not `inspect(name)`: the engine
    /// resolves that by ID, then name, then ID prefix, so a name that happens to start another
    /// service's ID would look taken (or fail as ambiguous).
    async fn named(&self, name: &str) -> Result<Option<SwarmService>, DockerError> {
        Ok(self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(HashMap::from([(
                    "name".to_string(),
                    vec![name.to_string()],
                )])),
                ..Default::default()
            }))
            .await?
            .into_iter()
            .find(|s| s.spec.as_ref().and_then(|sp| sp.name.as_deref()) == Some(name)))
    }

    async fn remove(&self, svc: &SwarmService) -> Result<(), DockerError> {
        let id = svc.id.as_deref().unwrap_or_default();
        match self.docker.delete_service(id).await {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn write_status(
        &self,
        name: &str,
        current: &ServiceStatus,
        new: ServiceStatus,
    ) -> Result<(), ServiceError> {
        // The runtime will write status; until then, written here unless unchanged. An object
        // deleted meanwhile is not an error: its delete event brings the controller back.
        if new == *current {
            return Ok(());
        }
        let value = serde_json::to_value(&new).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match self
            .store
            .update_status(Kind::Service, name, value, None)
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }

    /// Creates or updates the Swarm service so it matches `built`.
    async fn apply(
        &self,
        svc: &Service,
        built: &build::Built,
        existing: Option<SwarmService>,
        foreign: Option<SwarmService>,
        record: Option<Applied>,
        pull: Option<&PullAuth>,
    ) -> Result<Outcome, ServiceError> {
        let name = svc.name();
        let credentials = pull.map(|p| p.credentials.clone());
        let auth = pull.map(|p| p.fingerprint.clone());
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let mut existing = existing;

        if let Some(ex) = &existing {
            let observed_spec = ex.spec.clone().unwrap_or_default();
            if !build::same_mode(&observed_spec, &built.spec) {
                info!("service mode changed: re-creating the Swarm service");
                self.remove(ex).await?;
                existing = None;
            }
        }

        let Some(ex) = existing else {
            // Never adopt or replace a service berth does not own.
            if let Some(foreign) = foreign {
                let owner = foreign
                    .spec
                    .as_ref()
                    .and_then(|s| s.labels.as_ref())
                    .and_then(|l| l.get(labels::INSTANCE).cloned());
                let msg = match owner {
                    Some(other) => format!("a Swarm service named `{name}` belongs to another berth installation ({other})"),
                    None => format!("a Swarm service named `{name}` exists that berth does not manage; remove or rename it"),
                };
                return Ok(Outcome::Refused(msg));
            }
            match self
                .docker
                .create_service(built.spec.clone(), credentials)
                .await
            {
                Ok(created) => {
                    info!(id = ?created.id, hash = %built.hash, registry = ?pull.map(|p| &p.registry), "created Swarm service");
                    let id = created.id.unwrap_or_default();
                    return self
                        .after_write(name, &uid, built, &id, auth)
                        .await
                        .map(Outcome::Wrote);
                }
                Err(e) if status_code(&e) == Some(400) => {
                    return Ok(Outcome::Refused(crate::engine::refusal("service", &e)))
                }
                Err(e) => return Err(e.into()),
            }
        };

        let version = ex.version.as_ref().and_then(|v| v.index).unwrap_or(0);
        let observed_spec = ex.spec.clone().unwrap_or_default();
        let hash_label = observed_spec
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::SPEC_HASH))
            .cloned();
        let ours_untouched = record
            .as_ref()
            .is_some_and(|r| r.hash == built.hash && r.version == version);
        // New credentials (a rotated password, a Registry added) are sent with an update of an
        // otherwise unchanged spec; the engine keeps running tasks and uses them for the next pull.
        // Credentials that went away cannot be taken back from the engine, so that is no reason.
        let auth_sent = auth.is_none() || record.as_ref().is_some_and(|r| r.auth == auth);
        let in_sync = hash_label.as_deref() == Some(built.hash.as_str())
            && (ours_untouched || build::contains(&observed_spec, &built.spec))
            && auth_sent;
        if in_sync {
            return Ok(Outcome::Unchanged(ex));
        }
        if auth_sent
            && status::engine_gave_up(&ex)
            && record.as_ref().is_some_and(|r| r.hash == built.hash)
        {
            // The engine paused or rolled back this very spec; re-sending it would repeat the failure.
            debug!("engine gave up on this spec; waiting for a new one");
            return Ok(Outcome::Unchanged(ex));
        }
        // One update per service per interval: a burst of deploys becomes at most two rollouts, the
        // second at the newest spec.
        if let Some(wait) = self.pace.wait(name) {
            debug!(?wait, "updated moments ago; deferring");
            return Ok(Outcome::Deferred(wait));
        }
        let id = ex.id.clone().unwrap_or_default();
        let options = UpdateServiceOptions {
            version: version as i32,
            ..Default::default()
        };
        match self
            .docker
            .update_service(&id, built.spec.clone(), options, credentials)
            .await
        {
            Ok(resp) => {
                for w in resp.warnings.unwrap_or_default() {
                    debug!(warning = %w, "engine warning");
                }
                info!(%id, hash = %built.hash, registry = ?pull.map(|p| &p.registry), "updated Swarm service");
                self.after_write(name, &uid, built, &id, auth)
                    .await
                    .map(Outcome::Wrote)
            }
            Err(e) if status_code(&e) == Some(400) => {
                Ok(Outcome::Refused(crate::engine::refusal("service", &e)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Dereferences everything the spec names: Secret and Config keys (materialised in Swarm),
    /// Volume specs, and the Swarm IDs of its Networks.
    async fn resolve(&self, spec: &ServiceSpec) -> Result<DepsOutcome, ServiceError> {
        let mut resolved = Resolved::default();
        let mut waiting = Vec::new();
        let mut soon = false;
        for (kind, refs) in [
            (FileKind::Secret, &spec.secrets),
            (FileKind::Config, &spec.configs),
        ] {
            for r in refs {
                let Some(files) = self.secrets.data(kind.kind(), &r.name).await? else {
                    waiting.push(format!("{} `{}` does not exist", kind.kind(), r.name));
                    continue;
                };
                let (key, value) = match deps::pick_key(kind, &files, r) {
                    Ok(kv) => kv,
                    Err(why) => {
                        waiting.push(why);
                        continue;
                    }
                };
                match self.materialise(kind, &r.name, key, value).await? {
                    Ok(f) => match kind {
                        FileKind::Secret => resolved.secrets.push(f),
                        FileKind::Config => resolved.configs.push(f),
                    },
                    Err(refusal) => return Ok(DepsOutcome::Refused(refusal)),
                }
            }
        }
        for name in spec.references(Kind::Volume) {
            match self.store.get(Kind::Volume, name).await? {
                Some(obj) => match serde_json::from_value::<VolumeSpec>(obj.spec) {
                    Ok(v) => {
                        resolved.volumes.insert(name.to_string(), v);
                    }
                    Err(e) => waiting.push(format!("Volume `{name}` is unreadable: {e}")),
                },
                None => waiting.push(format!("Volume `{name}` does not exist")),
            }
        }
        let networks = if spec.networks.is_empty() {
            vec![self.store.installation().await?.default_network]
        } else {
            spec.networks.clone()
        };
        for name in &networks {
            if self.store.get(Kind::Network, name).await?.is_none() {
                waiting.push(format!("Network `{name}` does not exist"));
                continue;
            }
            match self
                .docker
                .inspect_network(name, None::<InspectNetworkOptions>)
                .await
            {
                Ok(n) => {
                    let owner = n.labels.as_ref().and_then(|l| l.get(labels::INSTANCE));
                    if owner != Some(&self.instance) || n.name.as_deref() != Some(name.as_str()) {
                        return Ok(DepsOutcome::Refused(format!(
                            "the Swarm network `{name}` is not this berth installation's"
                        )));
                    }
                    resolved.networks.push(n.id.unwrap_or_default());
                }
                Err(e) if status_code(&e) == Some(404) => {
                    waiting.push(format!("Network `{name}` is being created"));
                    soon = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if waiting.is_empty() {
            Ok(DepsOutcome::Ready(resolved))
        } else {
            Ok(DepsOutcome::Waiting {
                reasons: waiting,
                soon,
            })
        }
    }

    /// Makes sure the Swarm secret or config holding this content exists; returns it.
    async fn materialise(
        &self,
        kind: FileKind,
        object: &str,
        key: &str,
        value: &[u8],
    ) -> Result<Result<SwarmFile, String>, ServiceError> {
        let name = deps::swarm_name(object, key, value);
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), std::time::Instant::now());
        let labels = deps::file_labels(&self.instance, kind, object, key);
        let ours = |l: &HashMap<String, String>| {
            l.get(labels::INSTANCE).map(String::as_str) == Some(self.instance.as_str())
        };
        Ok(swarm_file::ensure(&self.docker, kind, &name, value, labels, ours).await?)
    }

    /// Removes this installation's materialised secrets and configs that no Swarm service uses any
    /// more (old contents after a rotation, or those of deleted objects).
    async fn collect_files(&self) -> Result<(), DockerError> {
        let services = self
            .docker
            .list_services(None::<ListServicesOptions>)
            .await?;
        let mut used = std::collections::HashSet::new();
        for s in &services {
            let c = s
                .spec
                .as_ref()
                .and_then(|sp| sp.task_template.as_ref())
                .and_then(|t| t.container_spec.as_ref());
            for sec in c.and_then(|c| c.secrets.as_ref()).into_iter().flatten() {
                used.extend(sec.secret_id.clone());
            }
            for cfg in c.and_then(|c| c.configs.as_ref()).into_iter().flatten() {
                used.extend(cfg.config_id.clone());
            }
        }
        let protected: std::collections::HashSet<String> = {
            let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
            fresh.retain(|_, at| at.elapsed() < FILE_GC_GRACE);
            fresh.keys().cloned().collect()
        };
        let old = |name: Option<&String>| name.is_some_and(|n| !protected.contains(n));
        let secrets = self
            .docker
            .list_secrets(Some(ListSecretsOptions {
                filters: Some(deps::owned_file_filters(&self.instance, FileKind::Secret)),
            }))
            .await?;
        for s in secrets {
            let id = s.id.clone().unwrap_or_default();
            if !used.contains(&id) && old(s.spec.as_ref().and_then(|sp| sp.name.as_ref())) {
                match self.docker.delete_secret(&id).await {
                    Ok(()) => {
                        info!(name = ?s.spec.and_then(|sp| sp.name), "removed unused secret version")
                    }
                    // In use after all (a service updated meanwhile) or already gone: fine.
                    Err(e) if matches!(status_code(&e), Some(404 | 409 | 400)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let configs = self
            .docker
            .list_configs(Some(ListConfigsOptions {
                filters: Some(deps::owned_file_filters(&self.instance, FileKind::Config)),
            }))
            .await?;
        for c in configs {
            let id = c.id.clone().unwrap_or_default();
            if !used.contains(&id) && old(c.spec.as_ref().and_then(|sp| sp.name.as_ref())) {
                match self.docker.delete_config(&id).await {
                    Ok(()) => {
                        info!(name = ?c.spec.and_then(|sp| sp.name), "removed unused config version")
                    }
                    Err(e) if matches!(status_code(&e), Some(404 | 409 | 400)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The digest the registry serves for `image` now, asked through the engine with the Registry's
    /// credentials. `None` when the registry does not say (the engine then pulls the tag).
    async fn resolve_digest(&self, image: &ImageRef, auth: &PullAuth) -> Option<String> {
        let answer = tokio::time::timeout(
            REGISTRY_QUESTION_TIMEOUT,
            self.docker
                .inspect_registry_image(image.as_str(), Some(auth.credentials.clone())),
        )
        .await;
        match answer {
            Ok(Ok(d)) => Some(d.descriptor.digest?).filter(|d| d.starts_with("sha256:")),
            Ok(Err(e)) => {
                debug!(%image, error = %crate::engine::message(&e), "cannot resolve the image digest");
                None
            }
            Err(_) => {
                debug!(%image, "the registry did not tell the image digest in time");
                None
            }
        }
    }

    /// Why the engine cannot pull `image`, in the registry's words: the Registry's failed login, or
    /// what the registry answers the engine now (asked with the same credentials the tasks use).
    async fn explain_pull(&self, image: &ImageRef, pull: &PullAuthLookup) -> Option<String> {
        let (host, credentials) = match pull {
            PullAuthLookup::Ready(a) => {
                if let Some(c) = a
                    .authenticated
                    .as_ref()
                    .filter(|c| c.status == ConditionStatus::False)
                {
                    return Some(format!(
                        "cannot pull {image}: Registry `{}` cannot log in to {}: {}",
                        a.registry, a.host, c.message
                    ));
                }
                (a.host.as_str(), Some(a.credentials.clone()))
            }
            PullAuthLookup::Anonymous { host } => (host.as_str(), None),
            PullAuthLookup::Broken { .. } => return None,
        };
        let answer = tokio::time::timeout(
            REGISTRY_QUESTION_TIMEOUT,
            self.docker
                .inspect_registry_image(image.as_str(), credentials),
        )
        .await;
        let why = match answer {
            Ok(Ok(_)) => return None,
            Ok(Err(e)) => crate::engine::message(&e),
            Err(_) => format!("no answer within {}s", REGISTRY_QUESTION_TIMEOUT.as_secs()),
        };
        Some(match pull {
            PullAuthLookup::Ready(a) => format!(
                "cannot pull {image} with the credentials of Registry `{}`: {why}",
                a.registry
            ),
            _ if creds::asks_for_credentials(&why) => format!(
                "cannot pull {image}: {host} requires credentials and no Registry provides them \
                 (the registry answered: {why})"
            ),
            _ => format!("cannot pull {image}: {why}"),
        })
    }

    /// The registry servers whose credentials an event may have changed: a Registry's own server,
    /// or the servers of the Registries whose password is in the Secret. `Some(empty)`: unknown (the
    /// Registry is gone), so every Service is concerned. `None`: no registry is concerned.
    async fn registry_hosts(&self, event: &Event) -> Option<Vec<String>> {
        let registries = match event.kind {
            Kind::Registry | Kind::Secret => self.store.list(Kind::Registry).await.ok()?,
            _ => return None,
        };
        let specs = registries.iter().filter_map(|o| {
            let spec: RegistrySpec = serde_json::from_value(o.spec.clone()).ok()?;
            Some((o.metadata.name.as_str(), spec))
        });
        let hosts: Vec<String> = match event.kind {
            Kind::Registry => specs
                .filter(|(name, _)| *name == event.name)
                .map(|(_, s)| s.host())
                .collect(),
            _ => specs
                .filter(|(_, s)| s.password_secret_ref.name == event.name)
                .map(|(_, s)| s.host())
                .collect(),
        };
        match (event.kind, hosts.is_empty()) {
            (Kind::Registry, true) => Some(Vec::new()),
            (_, true) => None,
            _ => Some(hosts),
        }
    }

    async fn after_write(
        &self,
        name: &str,
        uid: &str,
        built: &build::Built,
        id: &str,
        auth: Option<String>,
    ) -> Result<SwarmService, ServiceError> {
        let pinned = built.pinned.clone();
        let Some(now) = self.inspect(id).await? else {
            return Err(ServiceError::Engine(
                DockerError::DockerResponseServerError {
                    status_code: 404,
                    message: "service vanished right after it was written".into(),
                },
            ));
        };
        let record = Applied {
            uid: uid.to_string(),
            hash: built.hash.clone(),
            version: now.version.as_ref().and_then(|v| v.index).unwrap_or(0),
            auth,
            pinned,
        };
        if let Err(e) = self.state.put(name, &record) {
            warn!(error = %e, "cannot record applied state");
        }
        self.pace.wrote(name);
        Ok(now)
    }
}

#[async_trait]
impl Reconciler for ServiceController {
    type Error = ServiceError;

    fn kind(&self) -> Kind {
        Kind::Service
    }

    async fn reconcile(&self, name: &str) -> Result<Action, ServiceError> {
        // Dereference.
        let object = self.store.get(Kind::Service, name).await?;
        let Some(object) = object else {
            // Garbage collection goes by berth's labels, whatever the Swarm name.
            let owned = self.owned(Some(name)).await?;
            for svc in &owned {
                info!(id = ?svc.id, "object gone: removing its Swarm service");
                self.remove(svc).await?;
            }
            self.state.remove(name);
            if !owned.is_empty() {
                self.collect_files().await?;
            }
            return Ok(Action::await_change());
        };
        // One lookup by exact name answers both "ours?" and "taken by someone else?".
        let (mut owned, foreign) = match self.named(name).await? {
            Some(s) if self.owns(&s, name) => (vec![s], None),
            Some(s) => (Vec::new(), Some(s)),
            None => (Vec::new(), None),
        };
        let generation = object.metadata.generation;
        let current: ServiceStatus =
            serde_json::from_value(object.status.clone()).unwrap_or_default();
        let now = chrono::Utc::now();

        // Validate. The API validated on write; this guards against objects stored by another version.
        let svc: Service = match recheck(&object, validate_service) {
            Ok(s) => s,
            Err(message) => {
                let st = status::refused(&current, generation, "InvalidSpec", &message, now);
                self.write_status(name, &current, st).await?;
                return Ok(Action::await_change());
            }
        };

        // Dereference what it depends on; a missing dependency is waited for, not retried hot.
        let resolved = match self.resolve(&svc.spec).await? {
            DepsOutcome::Ready(r) => r,
            DepsOutcome::Waiting { reasons, soon } => {
                let st = status::refused(
                    &current,
                    generation,
                    "WaitingForDependencies",
                    &format!("waiting: {}", reasons.join("; ")),
                    now,
                );
                self.write_status(name, &current, st).await?;
                return Ok(if soon {
                    Action::requeue(PROGRESS_POLL)
                } else {
                    Action::await_change()
                });
            }
            DepsOutcome::Refused(why) => {
                let st = status::refused(&current, generation, "Refused", &why, now);
                self.write_status(name, &current, st).await?;
                return Ok(Action::await_change());
            }
        };

        // The image's registry credentials, if a Registry provides them.
        let pull = match creds::for_image(&*self.store, &*self.secrets, &svc.spec.image).await? {
            PullAuthLookup::Broken {
                registry,
                host,
                why,
            } => {
                let st = status::refused(
                    &current,
                    generation,
                    "RegistryCredentialsMissing",
                    &format!(
                        "cannot read the credentials of Registry `{registry}` for {host}: {why}"
                    ),
                    now,
                );
                self.write_status(name, &current, st).await?;
                return Ok(Action::await_change());
            }
            other => other,
        };
        let pull_auth = match &pull {
            PullAuthLookup::Ready(a) => Some(a.as_ref()),
            _ => None,
        };

        // Pin the image to the digest its tag names now, as `docker service create` does, when it
        // comes from a registry berth has credentials for (others: the engine pulls the tag).
        let record: Option<Applied> = self.state.get(name);
        let record = record.filter(|r| Some(&r.uid) == svc.metadata.uid.as_ref());
        let digest = match (&svc.spec.image.digest, pull_auth) {
            (None, Some(auth)) => {
                let known = record
                    .as_ref()
                    .and_then(|r| r.pinned.clone())
                    .filter(|(g, _)| *g == generation)
                    .map(|(_, d)| d);
                match known {
                    Some(d) => Some(d),
                    None => self.resolve_digest(&svc.spec.image, auth).await,
                }
            }
            _ => None,
        };

        // Build.
        let built = build::build_pinned(&svc, &self.instance, &resolved, digest.as_deref());

        // Apply.
        owned.sort_by_key(|s| s.created_at);
        let extra: Vec<SwarmService> = owned.drain(1.min(owned.len())..).collect();
        for dup in extra {
            warn!(id = ?dup.id, "removing duplicate Swarm service for one object");
            self.remove(&dup).await?;
        }
        let existing = owned.pop();
        // Only a service that mounted secrets or configs before this write can leave versions unused.
        let had_files = existing
            .as_ref()
            .and_then(|e| e.spec.as_ref())
            .and_then(|sp| sp.task_template.as_ref())
            .and_then(|t| t.container_spec.as_ref())
            .is_some_and(|c| {
                c.secrets.as_ref().is_some_and(|v| !v.is_empty())
                    || c.configs.as_ref().is_some_and(|v| !v.is_empty())
            });
        let (swarm, wrote) = match self
            .apply(&svc, &built, existing, foreign, record, pull_auth)
            .await?
        {
            Outcome::Unchanged(s) => (s, false),
            Outcome::Wrote(s) => (s, true),
            Outcome::Deferred(wait) => return Ok(Action::requeue(wait)),
            Outcome::Refused(refusal) => {
                let st = status::refused(&current, generation, "Refused", &refusal, now);
                self.write_status(name, &current, st).await?;
                return Ok(Action::await_change());
            }
        };

        // Everything resolved is now referenced by the service, so "fresh" no longer needs to protect it.
        {
            let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
            for f in resolved.secrets.iter().chain(&resolved.configs) {
                fresh.remove(&f.name);
            }
        }
        // A write may have left old secret or config contents unused.
        if wrote && had_files {
            if let Err(e) = self.collect_files().await {
                warn!(error = %e, "cannot collect unused secret and config versions yet");
            }
        }

        // Update status.
        let id = swarm.id.clone().unwrap_or_default();
        let tasks = self
            .docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([("service".to_string(), vec![id])])),
            }))
            .await?;
        let st = status::observed(
            &current,
            generation,
            &status::Observed {
                service: &swarm,
                tasks: &tasks,
                now,
            },
        );
        let mut st = st;
        if wrote || st.revisions.is_empty() {
            let (trigger, deploy_id) = rollout::trigger(&svc.metadata);
            let image = svc.spec.image.to_string();
            st.revisions = rollout::record(
                &st.revisions,
                &rollout::Sent {
                    generation,
                    image: &image,
                    digest: digest.as_deref(),
                    force_update: svc.spec.force_update,
                    trigger: &trigger,
                    deploy_id: deploy_id.as_deref(),
                    now,
                },
            );
        }
        rollout::observe(
            &mut st.revisions,
            &rollout::Progress {
                update_state: st.update_state.as_deref(),
                update_message: st.update_message.as_deref(),
                all_updated: st.updated_replicas >= st.desired_replicas
                    && st.running_replicas >= st.desired_replicas,
            },
        );
        if status::pull_failing(&tasks, now) {
            if let Some(why) = self.explain_pull(&svc.spec.image, &pull).await {
                status::explain_pull_failure(&mut st, &why, now);
            }
        }
        st.unbacked_mounts = svc
            .spec
            .volumes
            .iter()
            .filter_map(|v| {
                v.unbacked_reason()
                    .map(|why| format!("{} ({why})", v.target))
            })
            .collect();
        let ready = status::is_ready(&st);
        self.write_status(name, &current, st).await?;
        Ok(if ready {
            Action::await_change()
        } else {
            Action::requeue(PROGRESS_POLL)
        })
    }

    async fn engine_names(&self) -> Result<Vec<String>, ServiceError> {
        Ok(self
            .owned(None)
            .await?
            .into_iter()
            .filter_map(|s| s.spec?.labels?.get(labels::NAME).cloned())
            .collect())
    }

    async fn collect_garbage(&self) -> Result<(), ServiceError> {
        Ok(self.collect_files().await?)
    }

    fn watches(&self) -> Vec<Kind> {
        vec![
            Kind::Secret,
            Kind::Config,
            Kind::Volume,
            Kind::Network,
            Kind::Registry,
        ]
    }

    /// The Services that use the object an event is about (a Secret's new value, a Network that now
    /// exists...), so they converge without waiting for the resync.
    async fn map_related(&self, event: &Event) -> Vec<String> {
        let services = match self.store.list(Kind::Service).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot list services for a dependency event");
                return Vec::new();
            }
        };
        let default_network = match event.kind {
            Kind::Network => self
                .store
                .installation()
                .await
                .map(|i| i.default_network)
                .unwrap_or_default(),
            _ => String::new(),
        };
        let registry_hosts = self.registry_hosts(event).await;
        services
            .into_iter()
            .filter(|o| {
                serde_json::from_value::<ServiceSpec>(o.spec.clone()).is_ok_and(|spec| {
                    spec.uses(event.kind, &event.name, &default_network)
                        || registry_hosts.as_ref().is_some_and(|hosts| {
                            hosts.is_empty() || hosts.contains(&spec.image.registry_host())
                        })
                })
            })
            .map(|o| o.metadata.name)
            .collect()
    }

    fn engine_event_types(&self) -> Vec<&'static str> {
        vec!["service", "container"]
    }

    fn map_engine_event(&self, ev: &EventMessage) -> Option<String> {
        let attrs = ev.actor.as_ref()?.attributes.as_ref()?;
        match ev.typ? {
            // Service events carry only the name; a name that is not ours reconciles to a no-op.
            EventMessageTypeEnum::SERVICE => attrs.get("name").cloned(),
            // Container events carry the container's labels, ownership included.
            EventMessageTypeEnum::CONTAINER => (attrs.get(labels::INSTANCE)
                == Some(&self.instance)
                && attrs.get(labels::KIND).map(String::as_str) == Some("service"))
            .then(|| attrs.get(labels::NAME).cloned())
            .flatten(),
            _ => None,
        }
    }
}
