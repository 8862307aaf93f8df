//! The Ingress controller: one HTTPS-only load balancer (Caddy, a global Swarm service with host-mode
//! ports 443 and 80) routing the domains of every Ingress to their Services.
//!
//! The proxy's state is a function of *all* Ingresses, so this controller is an `Aggregator`: every
//! Ingress, backend and engine event is the one queue key of the proxy, and a burst of changes is
//! one converge. Steps: `dereference.rs` (Ingresses, their Services and TLS Secrets, planned) ->
//! `build.rs` (pure: plan, render, the proxy's service) -> `apply.rs` -> `status.rs` (pure, for
//! every Ingress).
//!
//! How a new config reaches the proxy without dropping traffic:
//! - Every rendered config is a Swarm config named by its content hash. The proxy service mounts one
//!   of them as its *boot* config: what a task starts from.
//! - A change that only touches routes (hosts, paths, backends on networks the proxy already joined,
//!   internal certificates) is *loaded live* into every proxy task, on every node, through Caddy's
//!   remote admin API: each task publishes it on its node's admin port, and only berth's client
//!   certificate gets in, over mutual TLS (`admin.rs`). berth finds each task's node address in
//!   Swarm, reads the running config back, and loads the new one where it differs. Caddy keeps its
//!   listeners and drains the old config, so nothing is refused or cut. The service spec is not
//!   touched, because any service update restarts the tasks, and two tasks cannot share a node's
//!   host port: every restart is a gap.
//! - Push, not pull: Caddy 2.6.2 can also poll for its config (`admin.config.load` with the `http`
//!   loader and `load_delay`). Tried with the real binary: it keeps polling while the config is
//!   unchanged or the server is down, but stops for good after one pulled config it refuses, and its
//!   HTTP loader sends every poll ten times (a retry loop without a break). Pushing also tells berth,
//!   per task, what each proxy runs, which the Ingress status counts.
//! - A restarted task must not fall back to an older config: Caddy autosaves each loaded config and
//!   starts with `--resume`, and its autosave directory is named after the boot config, so a task
//!   resumes the newest config loaded since its service got that boot config, never one from before.
//! - The restart path (update the service with the current config as boot config) is the fallback,
//!   and the only way for what lives in the service spec: image, ports, networks to join, mounted
//!   certificate secrets, placement. It is also taken when a proxy task's admin endpoint cannot be
//!   reached once the task has had time to open it (a firewall, a lost admin key). A config Caddy
//!   refuses is never booted from: the old one keeps serving and every Ingress says why it is not
//!   Ready.

pub mod admin;
pub mod apply;
pub mod build;
pub mod ca;
pub mod dereference;
pub mod status;

use crate::api::{ResourceStore, SecretReader};
use crate::runtime::{Action, Aggregator, Cached, Context, Converged, Error, Hooks, Resource};
use crate::swarm::{Owner, SwarmFile, SwarmFiles};
use async_trait::async_trait;
use berth_api_types::ingress::{validate_ingress, Ingress};
use berth_api_types::names::labels;
use berth_api_types::validate::FieldError;
use berth_api_types::{Event, Kind};
use bollard::errors::Error as DockerError;
use bollard::models::{EventMessage, EventMessageTypeEnum, Service as SwarmService, Task};
use bollard::query_parameters::ListServicesOptions;
use bollard::Docker;
use build::Settings;
use status::{IngressStatus, ProxyState};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// How often a proxy that is not serving the current config yet is looked at again.
const PROGRESS_POLL: Duration = Duration::from_secs(1);

/// The reason every Ingress shows when berth cannot run the proxy.
const PROXY_REFUSED: &str = "ProxyRefused";

/// Something berth must not or cannot do for the proxy (a name it does not own, a CA it cannot
/// make): shown on every Ingress rather than retried hot.
fn refused(message: String) -> Error {
    Error::refused(PROXY_REFUSED, message)
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
    secrets: Arc<dyn SecretReader>,
    owner: Owner,
    settings: Settings,
    files: SwarmFiles,
    /// Converge and garbage collection never run at once: collection must see what converge keeps.
    lock: tokio::sync::Mutex<()>,
    /// The newest rendered config: kept by garbage collection even while only loaded live.
    latest: std::sync::Mutex<Option<String>>,
    /// berth's client identity for the proxies' admin endpoints.
    identity: ca::AdminIdentity,
    /// Since when each proxy task (by ID) has not answered on its admin endpoint: a moment's
    /// silence (Caddy swaps the endpoint's certificate during every load) is no reason to restart.
    unreachable_since: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl IngressController {
    /// `instance`: the installation id stamped on everything; `store`: where backend Services and
    /// Networks are read; `secrets`: where TLS certificates are read; `identity`: what berth calls
    /// the proxies' admin endpoints with (kept across restarts: `ca::AdminIdentity::load_or_create`).
    pub fn new(
        docker: Docker,
        store: Arc<dyn ResourceStore>,
        secrets: Arc<dyn SecretReader>,
        instance: &str,
        settings: Settings,
        identity: ca::AdminIdentity,
    ) -> Self {
        IngressController {
            files: SwarmFiles::new(docker.clone()),
            docker,
            store,
            secrets,
            owner: Owner::new(instance, Kind::Ingress),
            settings,
            lock: Default::default(),
            latest: Default::default(),
            identity,
            unreachable_since: Default::default(),
        }
    }

    /// Whether a Swarm object carries this installation's labels for this proxy.
    fn owns(&self, l: Option<&HashMap<String, String>>) -> bool {
        self.owner.owns(l, &self.settings.name)
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
}

/// The boot config a task was started with.
fn task_boot(t: &Task) -> Option<&str> {
    build::boot_config(t.spec.as_ref()?.container_spec.as_ref()?)?
        .config_name
        .as_deref()
}

impl Resource for IngressController {
    type Object = Ingress;
    type Status = IngressStatus;
    const KIND: Kind = Kind::Ingress;

    fn validate(object: &Ingress) -> Result<(), Vec<FieldError>> {
        validate_ingress(object)
    }
}

#[async_trait]
impl Aggregator for IngressController {
    fn key(&self) -> String {
        self.settings.name.clone()
    }

    /// The whole pipeline; see the module documentation.
    async fn converge(
        &self,
        objects: Vec<Arc<Cached<Self>>>,
        ctx: &Context<Self>,
    ) -> Result<Converged<IngressStatus>, Error> {
        let _one_at_a_time = self.lock.lock().await;
        let (plan, pems) = self
            .dereference(&objects, &ctx.installation.default_network)
            .await?;

        let (proxy, ca_pem, poll) = if plan.hosts.is_empty() {
            // Nothing to serve: no proxy holding the nodes' ports 443 and 80.
            self.remove_proxy().await?;
            *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = None;
            (ProxyState::Starting(String::new()), None, false)
        } else {
            match self.apply(&plan, &pems).await {
                Ok(applied) => applied,
                Err(Error::Refused { message, .. }) => (ProxyState::Refused(message), None, false),
                Err(e) => return Err(e),
            }
        };

        let now = chrono::Utc::now();
        let mut statuses = BTreeMap::new();
        for o in &objects {
            if let Some(outcome) = plan.ingresses.get(o.name()) {
                let mut s = status::observed(
                    &o.status,
                    o.generation(),
                    outcome,
                    &self.settings.name,
                    &proxy,
                    ca_pem.as_deref(),
                    now,
                );
                s.certificate_not_after = match &o.object.spec.tls.secret_ref {
                    Some(secret) => pems.get(secret).and_then(|pem| status::not_after(pem)),
                    None => s
                        .ca_certificate
                        .as_deref()
                        .and_then(|pem| status::not_after(pem.as_bytes())),
                };
                statuses.insert(o.name().to_string(), s);
            }
        }
        let action = if poll {
            Action::requeue(PROGRESS_POLL)
        } else {
            Action::await_change()
        };
        Ok(Converged { statuses, action })
    }
}

#[async_trait]
impl Hooks for IngressController {
    /// The proxy's name, while its service exists: the resync then converges even with no Ingress
    /// left (removing the proxy if they were deleted while the controller was down).
    async fn engine_names(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .proxy_service()
            .await?
            .filter(|s| self.owns(s.spec.as_ref().and_then(|sp| sp.labels.as_ref())))
            .map(|_| self.settings.name.clone())
            .into_iter()
            .collect())
    }

    async fn collect_garbage(&self, _ctx: &Context<Self>) -> Result<(), Error> {
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
                get(labels::INSTANCE) == Some(self.owner.instance())
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
    /// join being created. All of them change the one proxy, so they map to its key.
    async fn map_related(&self, event: &Event, ctx: &Context<Self>) -> Vec<String> {
        let ingresses = ctx.cache.objects();
        let relevant = match event.kind {
            // Status changes too: a task started or stopped changes the task addresses the proxy
            // keeps health records for (`build::proxy_handler`).
            Kind::Service => ingresses.iter().any(|i| {
                i.object
                    .spec
                    .rules
                    .iter()
                    .any(|r| r.paths.iter().any(|p| p.service == event.name))
            }),
            Kind::Secret => ingresses
                .iter()
                .any(|i| i.object.spec.tls.secret_ref.as_deref() == Some(event.name.as_str())),
            Kind::Network => !ctx.cache.is_empty(),
            _ => false,
        };
        if relevant {
            info!(kind = %event.kind, name = %event.name, "a backend changed: converging the proxy");
            vec![self.settings.name.clone()]
        } else {
            Vec::new()
        }
    }
}
