//! The Service controller: keeps one Swarm service per Service object, labelled as berth's, and
//! reports its replicas, rollout state and task errors as status. The reconcile is a pipeline of small
//! steps — dereference, validate, build (pure, `build.rs`), apply, update status (pure, `status.rs`).

pub mod build;
pub mod status;

use crate::client::{ClientError, ResourceStore};
use crate::runtime::state::LocalState;
use crate::runtime::{Action, Reconciler};
use async_trait::async_trait;
use berth_api_types::names::labels;
use berth_api_types::service::{validate_service, Service, ServiceStatus};
use berth_api_types::Kind;
use bollard::errors::Error as DockerError;
use bollard::models::{EventMessage, EventMessageTypeEnum, Service as SwarmService};
use bollard::query_parameters::{
    InspectServiceOptions, ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often a service that is not yet Ready is looked at again (task starts, rollouts).
const PROGRESS_POLL: Duration = Duration::from_secs(2);

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
}

pub struct ServiceController {
    docker: Docker,
    store: Arc<dyn ResourceStore>,
    instance: String,
    state: LocalState,
}

impl ServiceController {
    pub fn new(
        docker: Docker,
        store: Arc<dyn ResourceStore>,
        instance: String,
        state: LocalState,
    ) -> Self {
        ServiceController {
            docker,
            store,
            instance,
            state,
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
        if &new == current {
            return Ok(());
        }
        let value = serde_json::to_value(&new).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match self.store.update_status(Kind::Service, name, value).await {
            Ok(()) => Ok(()),
            // Deleted meanwhile: the delete event brings us back to clean up.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates or updates the Swarm service so it matches `built`. Returns the service as it is now,
    /// or `Err(Ok(message))` when the engine refuses the spec for good.
    async fn apply(
        &self,
        svc: &Service,
        built: &build::Built,
        existing: Option<SwarmService>,
        record: Option<Applied>,
    ) -> Result<Result<SwarmService, String>, ServiceError> {
        let name = svc.name();
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
            if let Some(foreign) = self.named(name).await? {
                let owner = foreign
                    .spec
                    .as_ref()
                    .and_then(|s| s.labels.as_ref())
                    .and_then(|l| l.get(labels::INSTANCE).cloned());
                let msg = match owner {
                    Some(other) => format!("a Swarm service named `{name}` belongs to another berth installation ({other})"),
                    None => format!("a Swarm service named `{name}` exists that berth does not manage; remove or rename it"),
                };
                return Ok(Err(msg));
            }
            match self.docker.create_service(built.spec.clone(), None).await {
                Ok(created) => {
                    info!(id = ?created.id, hash = %built.hash, "created Swarm service");
                    let id = created.id.unwrap_or_default();
                    return self.after_write(name, &uid, built, &id).await;
                }
                Err(e) if status_code(&e) == Some(400) => return Ok(Err(engine_message(&e))),
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
        let in_sync = hash_label.as_deref() == Some(built.hash.as_str())
            && (ours_untouched || build::contains(&observed_spec, &built.spec));
        if in_sync {
            return Ok(Ok(ex));
        }
        if status::engine_gave_up(&ex) && record.as_ref().is_some_and(|r| r.hash == built.hash) {
            // The engine paused or rolled back this very spec; re-sending it would repeat the failure.
            debug!("engine gave up on this spec; waiting for a new one");
            return Ok(Ok(ex));
        }
        let id = ex.id.clone().unwrap_or_default();
        let options = UpdateServiceOptions {
            version: version as i32,
            ..Default::default()
        };
        match self
            .docker
            .update_service(&id, built.spec.clone(), options, None)
            .await
        {
            Ok(resp) => {
                for w in resp.warnings.unwrap_or_default() {
                    debug!(warning = %w, "engine warning");
                }
                info!(%id, hash = %built.hash, "updated Swarm service");
                self.after_write(name, &uid, built, &id).await
            }
            Err(e) if status_code(&e) == Some(400) => Ok(Err(engine_message(&e))),
            Err(e) => Err(e.into()),
        }
    }

    async fn after_write(
        &self,
        name: &str,
        uid: &str,
        built: &build::Built,
        id: &str,
    ) -> Result<Result<SwarmService, String>, ServiceError> {
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
        };
        if let Err(e) = self.state.put(name, &record) {
            warn!(error = %e, "cannot record applied state");
        }
        Ok(Ok(now))
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
        let mut owned = self.owned(Some(name)).await?;

        let Some(object) = object else {
            for svc in &owned {
                info!(id = ?svc.id, "object gone: removing its Swarm service");
                self.remove(svc).await?;
            }
            self.state.remove(name);
            return Ok(Action::await_change());
        };
        let generation = object.metadata.generation;
        let current: ServiceStatus =
            serde_json::from_value(object.status.clone()).unwrap_or_default();
        let now = chrono::Utc::now();

        // Validate. The API validated on write; this guards against objects stored by another version.
        let svc: Service =
            match serde_json::from_value(serde_json::to_value(&object).unwrap_or_default())
                .map_err(|e| e.to_string())
                .and_then(|s: Service| {
                    validate_service(&s).map(|()| s).map_err(|errs| {
                        errs.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                }) {
                Ok(s) => s,
                Err(message) => {
                    let st = status::refused(&current, generation, "InvalidSpec", &message, now);
                    self.write_status(name, &current, st).await?;
                    return Ok(Action::await_change());
                }
            };

        // Build.
        let built = build::build(&svc, &self.instance);

        // Apply.
        owned.sort_by_key(|s| s.created_at);
        let extra: Vec<SwarmService> = owned.drain(1.min(owned.len())..).collect();
        for dup in extra {
            warn!(id = ?dup.id, "removing duplicate Swarm service for one object");
            self.remove(&dup).await?;
        }
        let existing = owned.pop();
        let record: Option<Applied> = self.state.get(name);
        let record = record.filter(|r| Some(&r.uid) == svc.metadata.uid.as_ref());
        let swarm = match self.apply(&svc, &built, existing, record).await? {
            Ok(s) => s,
            Err(refusal) => {
                let st = status::refused(&current, generation, "Refused", &refusal, now);
                self.write_status(name, &current, st).await?;
                return Ok(Action::await_change());
            }
        };

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

fn status_code(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn engine_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => {
            format!("the engine refused the service: {message}")
        }
        other => other.to_string(),
    }
}
