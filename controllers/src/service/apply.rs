//! Service, step 3: bring the engine to the built spec — create, update (at most once per second
//! per service, with the registry credentials), or leave alone — and remember what was written
//! (`Applied`), so a converged service costs no update call. Also what the step observes around it:
//! the service's tasks, why a pull fails, and the secrets and configs no service uses any more.

use super::build::{self, Built};
use super::dereference::REGISTRY_QUESTION_TIMEOUT;
use super::status;
use crate::runtime::{Error, Records};
use crate::swarm::engine::{found, gone, message, refusal, status_code};
use crate::swarm::files::mounted_by_services;
use crate::swarm::hash::contains;
use crate::swarm::pull::{self, PullAuth, PullAuthLookup};
use crate::swarm::{FileKind, Owner, SwarmFiles};
use berth_api_types::image::ImageRef;
use berth_api_types::names::labels;
use berth_api_types::ConditionStatus;
use bollard::errors::Error as DockerError;
use bollard::models::{Service as SwarmService, Task};
use bollard::query_parameters::{
    InspectServiceOptions, ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Services are updated at most once per this interval: the engine starts a rolling update for
/// each write, so a burst of deploys is folded into the first and one more with the newest spec.
const MIN_UPDATE_INTERVAL: Duration = Duration::from_secs(1);

/// What apply did.
pub enum Outcome {
    /// The engine already runs this spec.
    Unchanged(SwarmService),
    /// berth updated the Swarm service; this is it afterwards.
    Wrote(SwarmService),
    /// berth created the Swarm service; this is what it sent (the engine has no tasks for it yet).
    Created(SwarmService),
    /// An update is due but the service was written moments ago: try again after this long.
    Deferred(Duration),
}

/// What the controller remembers per object between reconciles and restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub uid: String,
    pub hash: String,
    /// The engine's version index right after berth's own write: if it has not moved, nobody else
    /// changed the service and there is nothing to compare.
    pub version: u64,
    /// Fingerprint of the registry credentials sent with that write (see `PullAuth::fingerprint`).
    #[serde(default)]
    pub auth: Option<String>,
    /// The digest the image was pinned to for a generation, so later reconciles of the same
    /// generation do not ask the registry again (or follow a tag that moved meanwhile).
    #[serde(default)]
    pub pinned: Option<(u64, String)>,
}

/// When each service was last written (see `MIN_UPDATE_INTERVAL`).
#[derive(Default)]
pub struct Pace(Mutex<HashMap<String, Instant>>);

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
        map.insert(name.to_string(), Instant::now());
    }
}

/// The engine-facing half of the Service controller.
pub struct Engine {
    pub docker: Docker,
    pub owner: Owner,
    pub records: Records,
    pub files: SwarmFiles,
    pub pace: Pace,
}

/// The Swarm services berth finds for an object: its own (normally at most one) and, when the
/// name is taken by someone else's, that one.
pub struct Found {
    pub owned: Vec<SwarmService>,
    pub foreign: Option<SwarmService>,
}

impl Engine {
    /// Swarm services this installation owns for `name` (all objects' with `None`).
    pub async fn owned(&self, name: Option<&str>) -> Result<Vec<SwarmService>, DockerError> {
        self.docker
            .list_services(Some(ListServicesOptions {
                filters: Some(self.owner.filters(name, &[])),
                ..Default::default()
            }))
            .await
    }

    /// One lookup by exact name answers both "ours?" and "taken by someone else?". Not
    /// `inspect(name)`: the engine resolves that by ID, then name, then ID prefix, so a name that
    /// happens to start another service's ID would look taken (or fail as ambiguous).
    pub async fn find(&self, name: &str) -> Result<Found, DockerError> {
        let named = self
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
            .find(|s| s.spec.as_ref().and_then(|sp| sp.name.as_deref()) == Some(name));
        Ok(match named {
            Some(s) if self.owner.owns(labels_of(&s), name) => Found {
                owned: vec![s],
                foreign: None,
            },
            other => Found {
                owned: Vec::new(),
                foreign: other,
            },
        })
    }

    pub async fn remove(&self, svc: &SwarmService) -> Result<(), DockerError> {
        gone(
            self.docker
                .delete_service(svc.id.as_deref().unwrap_or_default())
                .await,
        )
    }

    /// The object is gone: remove its services (found by berth's labels, whatever the Swarm
    /// name) and what they alone used.
    pub async fn remove_all(&self, name: &str) -> Result<(), Error> {
        let owned = self.owned(Some(name)).await?;
        for svc in &owned {
            info!(id = ?svc.id, "object gone: removing its Swarm service");
            self.remove(svc).await?;
        }
        self.records.remove(name);
        if !owned.is_empty() {
            self.collect_files().await?;
        }
        Ok(())
    }

    /// The record of berth's last write for this object (of this uid).
    pub fn record(&self, name: &str, uid: Option<&String>) -> Option<Applied> {
        self.records
            .get::<Applied>(name)
            .filter(|r| Some(&r.uid) == uid)
    }

    /// Creates or updates the Swarm service so it matches `built`. `seen`: what `find` returned,
    /// or `None` when berth never wrote this object: then the service is created straight away, and
    /// only a name the engine says is taken is looked up (a create costs one engine call).
    /// `Err(Refused)`: the engine will not take this spec, or the name is someone else's.
    pub async fn apply(
        &self,
        name: &str,
        uid: &str,
        built: &Built,
        seen: Option<Found>,
        pull: Option<&PullAuth>,
    ) -> Result<Outcome, Error> {
        let credentials = pull.map(|p| p.credentials.clone());
        let auth = pull.map(|p| p.fingerprint.clone());
        let record = self.record(name, Some(&uid.to_string()));
        let seen = match seen {
            Some(seen) => seen,
            None => match self.create(name, uid, built, pull).await? {
                Some(created) => return Ok(created),
                None => self.find(name).await?,
            },
        };
        let mut owned = seen.owned;
        owned.sort_by_key(|s| s.created_at);
        for dup in owned.drain(1.min(owned.len())..) {
            warn!(id = ?dup.id, "removing duplicate Swarm service for one object");
            self.remove(&dup).await?;
        }
        let mut existing = owned.pop();

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
            if let Some(foreign) = seen.foreign {
                return Err(Error::refused(
                    "Refused",
                    self.owner.refusal("service", name, labels_of(&foreign)),
                ));
            }
            return match self.create(name, uid, built, pull).await? {
                Some(created) => Ok(created),
                // Taken between the lookup and the create: the next reconcile sees by whom.
                None => Err(Error::Transient(format!(
                    "the Swarm service name `{name}` was taken meanwhile"
                ))),
            };
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
            && (ours_untouched || contains(&observed_spec, &built.spec))
            && auth_sent;
        if in_sync {
            if !ours_untouched {
                // The engine still runs berth's last write (the version moved only by the engine's
                // own bookkeeping, or berth created it without reading it back): remember the
                // version, so the next reconcile needs no comparison.
                if let Some(r) = record.filter(|r| r.hash == built.hash && r.auth == auth) {
                    let r = Applied { version, ..r };
                    if let Err(e) = self.records.put(name, &r) {
                        warn!(error = %e, "cannot record applied state");
                    }
                }
            }
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
                self.after_write(name, uid, built, &id, auth)
                    .await
                    .map(Outcome::Wrote)
            }
            Err(e) if status_code(&e) == Some(400) => {
                Err(Error::refused("Refused", refusal("service", &e)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the service. `Ok(None)`: the engine says the name is taken.
    async fn create(
        &self,
        name: &str,
        uid: &str,
        built: &Built,
        pull: Option<&PullAuth>,
    ) -> Result<Option<Outcome>, Error> {
        let credentials = pull.map(|p| p.credentials.clone());
        match self
            .docker
            .create_service(built.spec.clone(), credentials)
            .await
        {
            Ok(created) => {
                info!(id = ?created.id, hash = %built.hash, registry = ?pull.map(|p| &p.registry), "created Swarm service");
                // Not read back: its version is recorded as unknown (0), so the next reconcile
                // compares once and records it.
                self.wrote(name, uid, built, 0, pull.map(|p| p.fingerprint.clone()));
                Ok(Some(Outcome::Created(SwarmService {
                    id: created.id,
                    spec: Some(built.spec.clone()),
                    ..Default::default()
                })))
            }
            Err(e) if status_code(&e) == Some(409) => Ok(None),
            Err(e) if status_code(&e) == Some(400) => {
                Err(Error::refused("Refused", refusal("service", &e)))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn after_write(
        &self,
        name: &str,
        uid: &str,
        built: &Built,
        id: &str,
        auth: Option<String>,
    ) -> Result<SwarmService, Error> {
        let Some(now) = found(
            self.docker
                .inspect_service(id, None::<InspectServiceOptions>)
                .await,
        )?
        else {
            return Err(Error::Transient(
                "the Swarm service vanished right after it was written".into(),
            ));
        };
        let version = now.version.as_ref().and_then(|v| v.index).unwrap_or(0);
        self.wrote(name, uid, built, version, auth);
        Ok(now)
    }

    /// Remembers a write: its record (for "nothing changed" without a comparison) and its time
    /// (for pacing).
    fn wrote(&self, name: &str, uid: &str, built: &Built, version: u64, auth: Option<String>) {
        let record = Applied {
            uid: uid.to_string(),
            hash: built.hash.clone(),
            version,
            auth,
            pinned: built.pinned.clone(),
        };
        if let Err(e) = self.records.put(name, &record) {
            warn!(error = %e, "cannot record applied state");
        }
        self.pace.wrote(name);
    }

    pub async fn tasks(&self, svc: &SwarmService) -> Result<Vec<Task>, DockerError> {
        let id = svc.id.clone().unwrap_or_default();
        self.docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([("service".to_string(), vec![id])])),
            }))
            .await
    }

    /// Removes this installation's materialised secrets and configs that no Swarm service uses any
    /// more (old contents after a rotation, or those of deleted objects).
    pub async fn collect_files(&self) -> Result<(), DockerError> {
        let used = mounted_by_services(&self.docker).await?;
        for kind in [FileKind::Secret, FileKind::Config] {
            let filters = self.owner.for_kind(kind.kind()).filters(None, &[]);
            self.files.collect(kind, filters, &used).await?;
        }
        Ok(())
    }

    /// Why the engine cannot pull `image`, in the registry's words: the Registry's failed login, or
    /// what the registry answers the engine now (asked with the same credentials the tasks use).
    pub async fn explain_pull(&self, image: &ImageRef, pull: &PullAuthLookup) -> Option<String> {
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
            Ok(Err(e)) => message(&e),
            Err(_) => format!("no answer within {}s", REGISTRY_QUESTION_TIMEOUT.as_secs()),
        };
        Some(match pull {
            PullAuthLookup::Ready(a) => format!(
                "cannot pull {image} with the credentials of Registry `{}`: {why}",
                a.registry
            ),
            _ if pull::asks_for_credentials(&why) => format!(
                "cannot pull {image}: {host} requires credentials and no Registry provides them \
                 (the registry answered: {why})"
            ),
            _ => format!("cannot pull {image}: {why}"),
        })
    }
}

fn labels_of(s: &SwarmService) -> Option<&HashMap<String, String>> {
    s.spec.as_ref().and_then(|sp| sp.labels.as_ref())
}

/// Whether a service mounted secrets or configs: only then can a write leave versions unused.
pub fn mounts_files(svc: Option<&SwarmService>) -> bool {
    svc.and_then(|e| e.spec.as_ref())
        .and_then(|sp| sp.task_template.as_ref())
        .and_then(|t| t.container_spec.as_ref())
        .is_some_and(|c| {
            c.secrets.as_ref().is_some_and(|v| !v.is_empty())
                || c.configs.as_ref().is_some_and(|v| !v.is_empty())
        })
}
