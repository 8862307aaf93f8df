//! The Service controller: keeps one Swarm service per Service object, labelled as berth's, and
//! reports its replicas, rollout state and task errors as status. Steps: `dereference.rs` (secrets,
//! configs, volumes, networks, pull credentials, the pinned digest) -> `build.rs` (pure) ->
//! `predeploy.rs` (the steps that gate a rollout of a new image) -> `apply.rs` (create/update,
//! paced) -> `status.rs` (pure, with `rollout.rs` for the revision history).

pub mod apply;
pub mod build;
pub mod dereference;
pub mod predeploy;
pub mod rollout;
pub mod status;

use crate::api::SecretReader;
use crate::runtime::{
    Action, Cached, Context, Error, Hooks, Reconciled, Reconciler, Records, Resource,
};
use crate::swarm::pull::PullAuthLookup;
use crate::swarm::{Owner, SwarmFiles};
use apply::{Engine, Outcome};
use async_trait::async_trait;
use berth_api_types::registry::RegistrySpec;
use berth_api_types::service::{validate_service, Service, ServiceSpec, ServiceStatus};
use berth_api_types::validate::FieldError;
use berth_api_types::{Event, Kind};
use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::Docker;
use dereference::{Deps, Sources};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How often a service that is not yet Ready is looked at again (task starts, rollouts).
const PROGRESS_POLL: Duration = Duration::from_secs(2);

pub struct ServiceController {
    engine: Engine,
    secrets: Arc<dyn SecretReader>,
}

impl ServiceController {
    /// `instance`: the installation id stamped on everything; `secrets`: where Secret and Config
    /// values are read (only this controller hands them to the engine); `records`: what it applied.
    pub fn new(
        docker: Docker,
        instance: &str,
        secrets: Arc<dyn SecretReader>,
        records: Records,
    ) -> Self {
        ServiceController {
            engine: Engine {
                files: SwarmFiles::new(docker.clone()),
                docker,
                owner: Owner::new(instance, Kind::Service),
                records,
                pace: Default::default(),
            },
            secrets,
        }
    }

    /// Secrets and configs no service uses are collected after `grace` instead of
    /// `swarm::files::GC_GRACE` (tests that watch collection happen).
    pub fn with_file_grace(mut self, grace: Duration) -> Self {
        self.engine.files = SwarmFiles::with_grace(self.engine.docker.clone(), grace);
        self
    }

    /// The registry servers whose credentials an event may have changed: a Registry's own server,
    /// or the servers of the Registries whose password is in the Secret. `Some(empty)`: unknown (the
    /// Registry is gone), so every Service is concerned. `None`: no registry is concerned.
    async fn registry_hosts(&self, event: &Event, ctx: &Context<Self>) -> Option<Vec<String>> {
        let registries = match event.kind {
            Kind::Registry | Kind::Secret => ctx.store.list(Kind::Registry).await.ok()?,
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
}

impl Resource for ServiceController {
    type Object = Service;
    type Status = ServiceStatus;
    const KIND: Kind = Kind::Service;

    fn validate(object: &Service) -> Result<(), Vec<FieldError>> {
        validate_service(object)
    }
}

#[async_trait]
impl Reconciler for ServiceController {
    async fn reconcile(
        &self,
        obj: Arc<Cached<Self>>,
        ctx: &Context<Self>,
    ) -> Result<Reconciled<ServiceStatus>, Error> {
        let svc: &Service = &obj.object;
        let name = obj.name();
        let generation = obj.generation();
        let engine = &self.engine;
        let src = Sources {
            docker: &engine.docker,
            store: &*ctx.store,
            secrets: &*self.secrets,
            files: &engine.files,
            owner: &engine.owner,
            default_network: &ctx.installation.default_network,
        };

        // Paused: observe only. Nothing is written, so the stored spec (and drift from it) waits for
        // the resume, which rolls everything out in one update.
        if svc.spec.paused {
            let found = engine.find(name).await?;
            let now = chrono::Utc::now();
            let status = match found.owned.first() {
                Some(swarm) => {
                    let tasks = engine.tasks(swarm).await?;
                    let o = status::Observed {
                        service: swarm,
                        tasks: &tasks,
                        now,
                    };
                    status::paused(&obj.status, svc, Some(&o), now)
                }
                None => status::paused(&obj.status, svc, None, now),
            };
            let action = if status::is_ready(&status) {
                Action::await_change()
            } else {
                Action::requeue(PROGRESS_POLL)
            };
            return Ok(Reconciled { status, action });
        }

        // Dereference: what it depends on (a missing dependency is waited for, not retried hot),
        // the image's credentials, and the digest its tag names.
        let resolved = match dereference::dependencies(&src, &svc.spec).await? {
            Deps::Ready(r) => r,
            Deps::Waiting { reasons, soon } => {
                let status = status::refused(
                    &obj.status,
                    generation,
                    "WaitingForDependencies",
                    &format!("waiting: {}", reasons.join("; ")),
                    chrono::Utc::now(),
                );
                let action = if soon {
                    Action::requeue(PROGRESS_POLL)
                } else {
                    Action::await_change()
                };
                return Ok(Reconciled { status, action });
            }
        };
        let pull = dereference::pull_auth(&src, &svc.spec.image).await?;
        let pull_auth = match &pull {
            PullAuthLookup::Ready(a) => Some(a.as_ref()),
            _ => None,
        };
        // Pin the image to the digest its tag names now, as `docker service create` does, when it
        // comes from a registry berth has credentials for (others: the engine pulls the tag). The
        // pin is kept for its generation, so a resync never follows a tag that moved.
        let record = engine.record(name, svc.metadata.uid.as_ref());
        let digest = match (&svc.spec.image.digest, pull_auth) {
            (None, Some(auth)) => {
                let known = record
                    .as_ref()
                    .and_then(|r| r.pinned.clone())
                    .filter(|(g, _)| *g == generation)
                    .map(|(_, d)| d);
                match known {
                    Some(d) => Some(d),
                    None => {
                        dereference::resolve_digest(&engine.docker, &svc.spec.image, auth).await
                    }
                }
            }
            _ => None,
        };

        // Build.
        let built = build::build_pinned(svc, &engine.owner, &resolved, digest.as_deref());

        // A Service berth never wrote is created without looking first (see `Engine::apply`),
        // unless its pre-deploy steps need to know what runs.
        let (trigger, _) = rollout::trigger(&svc.metadata);
        let steps = svc
            .spec
            .deploy
            .as_ref()
            .map(|d| d.steps_for(trigger == "rollback"))
            .unwrap_or_default();
        let seen = match record {
            Some(_) => Some(engine.find(name).await?),
            None if !steps.is_empty() => Some(engine.find(name).await?),
            None => None,
        };

        // Pre-deploy steps, before a rollout of a new image.
        let mut pre_deploy = None;
        let current = seen
            .as_ref()
            .and_then(|s| s.owned.first())
            .and_then(|s| s.spec.as_ref());
        if !steps.is_empty() && predeploy::rollout_pending(current, &built.spec) {
            let now = chrono::Utc::now();
            let image = svc.spec.image.to_string();
            let rollout = predeploy::Rollout {
                svc,
                key: predeploy::rollout_key(&built.spec, &steps),
                revision: predeploy::revision_of(
                    &obj.status.revisions,
                    &image,
                    digest.as_deref(),
                    svc.spec.force_update,
                ),
                steps,
                image,
                digest: digest.as_deref(),
                previous: obj.status.pre_deploy.as_ref(),
                now,
            };
            match predeploy::gate(&src, &rollout).await? {
                predeploy::Gate::Passed(s) => pre_deploy = Some(s),
                predeploy::Gate::Running(s) => {
                    return Ok(Reconciled {
                        status: status::pre_deploy_running(&obj.status, generation, s, now),
                        action: Action::requeue(PROGRESS_POLL),
                    })
                }
                predeploy::Gate::Failed { status: s, settle } => {
                    // Final for this rollout: a new deploy is a new rollout. A job past its
                    // timeout is stopped once this status is stored, by the reconcile right after.
                    let status =
                        status::pre_deploy_failed(&obj.status, svc, s, digest.as_deref(), now);
                    let action = if settle {
                        Action::requeue(Duration::from_secs(1))
                    } else {
                        Action::await_change()
                    };
                    return Ok(Reconciled { status, action });
                }
                predeploy::Gate::Waiting { reasons, soon } => {
                    let status = status::refused(
                        &obj.status,
                        generation,
                        "WaitingForDependencies",
                        &format!("pre-deploy: waiting: {}", reasons.join("; ")),
                        now,
                    );
                    let action = if soon {
                        Action::requeue(PROGRESS_POLL)
                    } else {
                        Action::await_change()
                    };
                    return Ok(Reconciled { status, action });
                }
            }
        }

        // Apply.
        let had_files = apply::mounts_files(seen.as_ref().and_then(|s| s.owned.first()));
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let (swarm, wrote, created) =
            match engine.apply(name, &uid, &built, seen, pull_auth).await? {
                Outcome::Unchanged(s) => (s, false, false),
                Outcome::Wrote(s) => (s, true, false),
                Outcome::Created(s) => (s, true, true),
                Outcome::Deferred(wait) => {
                    return Ok(Reconciled {
                        status: obj.status.clone(),
                        action: Action::requeue(wait),
                    })
                }
            };
        // Everything resolved is now referenced by the service: the engine itself keeps it.
        engine.files.settled(
            resolved
                .secrets
                .iter()
                .chain(&resolved.configs)
                .map(|f| f.name.as_str()),
        );
        // A write may have left old secret or config contents unused.
        if wrote && had_files {
            if let Err(e) = engine.collect_files().await {
                warn!(error = %e, "cannot collect unused secret and config versions yet");
            }
        }

        // Status.
        // A service created a moment ago has no tasks yet; its events bring the next look.
        let tasks = if created {
            Vec::new()
        } else {
            engine.tasks(&swarm).await?
        };
        let now = chrono::Utc::now();
        let mut st = status::after_apply(
            &obj.status,
            svc,
            &status::Observed {
                service: &swarm,
                tasks: &tasks,
                now,
            },
            &status::Applied {
                wrote,
                digest: digest.as_deref(),
            },
        );
        if let Some(p) = pre_deploy {
            st.pre_deploy = Some(p);
        }
        if let Some(keep) = svc.spec.deploy.as_ref().map(|d| d.job_history()) {
            if wrote {
                if let Err(e) = predeploy::collect(&engine.docker, &engine.owner, name, keep).await
                {
                    warn!(error = %e, "cannot remove old pre-deploy jobs yet");
                }
            }
        }
        if status::pull_failing(&tasks, now) {
            if let Some(why) = engine.explain_pull(&svc.spec.image, &pull).await {
                status::explain_pull_failure(&mut st, &why, now);
            }
        }
        let action = if status::is_ready(&st) {
            Action::await_change()
        } else {
            Action::requeue(PROGRESS_POLL)
        };
        Ok(Reconciled { status: st, action })
    }

    async fn cleanup(&self, name: &str, _ctx: &Context<Self>) -> Result<Action, Error> {
        self.engine.remove_all(name).await?;
        Ok(Action::await_change())
    }
}

#[async_trait]
impl Hooks for ServiceController {
    async fn engine_names(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .engine
            .owned(None)
            .await?
            .into_iter()
            .filter_map(|s| self.engine.owner.object_of(s.spec?.labels.as_ref()))
            .collect())
    }

    async fn collect_garbage(&self, _ctx: &Context<Self>) -> Result<(), Error> {
        Ok(self.engine.collect_files().await?)
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
    async fn map_related(&self, event: &Event, ctx: &Context<Self>) -> Vec<String> {
        let registry_hosts = self.registry_hosts(event, ctx).await;
        let default_network = &ctx.installation.default_network;
        let uses = |spec: &ServiceSpec| {
            spec.uses(event.kind, &event.name, default_network)
                || registry_hosts.as_ref().is_some_and(|hosts| {
                    hosts.is_empty() || hosts.contains(&spec.image.registry_host())
                })
        };
        ctx.cache
            .objects()
            .iter()
            .filter(|o| uses(&o.object.spec))
            .map(|o| o.name().to_string())
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
            EventMessageTypeEnum::CONTAINER => self.engine.owner.object_of(Some(attrs)),
            _ => None,
        }
    }
}
