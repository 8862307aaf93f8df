//! The Registry controller: checks each Registry's credentials against the registry and reports the
//! answer as the `Authenticated` condition, with the registry's own words when it says no. It creates
//! nothing in Swarm: the Service controller sends the credentials with each service it writes
//! (`creds.rs` is how both find a server's Registry and its password).
//!
//! Reconcile: dereference (Registry, its Secret) -> validate -> check (only when the Registry, its
//! password or the age of the last answer call for it) -> update status. A refusal waits for a
//! change; an unreachable registry is retried with backoff.

pub mod creds;
pub mod login;
pub mod status;

use crate::api::{ClientError, ResourceStore, SecretReader};
use crate::runtime::{Action, Reconciler};
use async_trait::async_trait;
use berth_api_types::registry::{validate_registry, RegistrySpec, RegistryStatus};
use berth_api_types::typed::recheck;
use berth_api_types::{Event, Kind, Object};
use creds::Password;
use login::LoginOutcome;
use status::reasons;
use std::sync::Arc;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("berth API: {0}")]
    Api(#[from] ClientError),
    /// The registry did not answer; the status says so and the check is retried with backoff.
    #[error("registry check: {0}")]
    Unreachable(String),
}

pub struct RegistryController {
    store: Arc<dyn ResourceStore>,
    /// The password Secret's value, to log in with.
    secrets: Arc<dyn SecretReader>,
    http: reqwest::Client,
}

impl RegistryController {
    pub fn new(store: Arc<dyn ResourceStore>, secrets: Arc<dyn SecretReader>) -> Self {
        RegistryController {
            store,
            secrets,
            http: login::client(),
        }
    }

    async fn write(
        &self,
        name: &str,
        current: &RegistryStatus,
        new: RegistryStatus,
    ) -> Result<(), RegistryError> {
        // The runtime will write status; until then, written here unless unchanged. An object
        // deleted meanwhile is not an error: its delete event brings the controller back.
        if new == *current {
            return Ok(());
        }
        let value = serde_json::to_value(&new).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match self
            .store
            .update_status(Kind::Registry, name, value, None)
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Reconciler for RegistryController {
    type Error = RegistryError;

    fn kind(&self) -> Kind {
        Kind::Registry
    }

    async fn reconcile(&self, name: &str) -> Result<Action, RegistryError> {
        // Dereference. Nothing exists in the engine for a Registry, so a deleted one needs no cleanup.
        let Some(object) = self.store.get(Kind::Registry, name).await? else {
            return Ok(Action::await_change());
        };
        let generation = object.metadata.generation;
        let current: RegistryStatus =
            serde_json::from_value(object.status.clone()).unwrap_or_default();
        let now = chrono::Utc::now();

        // Validate (the API did on write; this guards against objects stored by another version).
        let typed = recheck::<Object<RegistrySpec, serde_json::Value>>(&object, validate_registry);
        let spec = match typed {
            Ok(r) => r.spec,
            Err(message) => {
                let st =
                    status::not_checked(&current, generation, reasons::INVALID_SPEC, &message, now);
                self.write(name, &current, st).await?;
                return Ok(Action::await_change());
            }
        };
        let host = spec.host();

        // One Registry per server: the oldest is used, later ones are reported and left alone.
        let all = self.store.list(Kind::Registry).await?;
        if let Some((used, _)) = creds::select(&all, &host) {
            if used.metadata.name != name {
                let message = format!(
                    "Registry `{}` already provides the credentials for {host}; this one is not used",
                    used.metadata.name
                );
                let st =
                    status::not_checked(&current, generation, reasons::DUPLICATE, &message, now);
                self.write(name, &current, st).await?;
                return Ok(Action::await_change());
            }
        }

        let (password, secret_version) = match creds::password(&*self.store, &*self.secrets, &spec)
            .await?
        {
            Password::Found {
                password,
                secret_version,
            } => (password, secret_version),
            Password::Missing(why) => {
                let st =
                    status::not_checked(&current, generation, reasons::SECRET_MISSING, &why, now);
                self.write(name, &current, st).await?;
                // The Secret's events bring us back (see `map_related`).
                return Ok(Action::await_change());
            }
        };

        if let Some(wait) = status::next_check(&current, generation, &secret_version, now) {
            return Ok(Action::requeue(wait));
        }

        // Check.
        let outcome = login::login(&self.http, &host, &spec.username, &password).await;
        match &outcome {
            LoginOutcome::Accepted => info!(%host, "registry accepted the credentials"),
            LoginOutcome::Rejected(why) => warn!(%host, %why, "registry rejected the credentials"),
            LoginOutcome::Unreachable(_) => {}
        }

        // Update status.
        let st = status::checked(
            &current,
            generation,
            &secret_version,
            &outcome,
            &spec.username,
            &host,
            now,
        );
        self.write(name, &current, st).await?;
        match outcome {
            LoginOutcome::Unreachable(why) => Err(RegistryError::Unreachable(why)),
            _ => Ok(Action::requeue(status::RECHECK)),
        }
    }

    async fn engine_names(&self) -> Result<Vec<String>, RegistryError> {
        Ok(Vec::new())
    }

    fn watches(&self) -> Vec<Kind> {
        vec![Kind::Secret]
    }

    /// The Registries whose password is in the Secret an event is about.
    async fn map_related(&self, event: &Event) -> Vec<String> {
        if event.kind != Kind::Secret {
            return Vec::new();
        }
        match self.store.list(Kind::Registry).await {
            Ok(all) => all
                .into_iter()
                .filter(|o| {
                    serde_json::from_value::<RegistrySpec>(o.spec.clone())
                        .is_ok_and(|s| s.password_secret_ref.name == event.name)
                })
                .map(|o| o.metadata.name)
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list registries for a Secret event");
                Vec::new()
            }
        }
    }
}
