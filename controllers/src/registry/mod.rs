//! The Registry controller: checks each Registry's credentials against the registry and reports the
//! answer as the `Authenticated` condition, with the registry's own words when it says no. It creates
//! nothing in Swarm: the Service controller sends the credentials with each service it writes
//! (`swarm::pull` is how both find a server's Registry and its password).
//!
//! Steps: `dereference.rs` (the one Registry for its server, its password) -> `build.rs` (pure: is a
//! check due) -> `apply.rs` (the login, `login.rs`) -> `status.rs` (pure). A refusal waits for a
//! change; an unreachable registry is retried with backoff.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod login;
pub mod status;

use crate::api::SecretReader;
use crate::runtime::{Action, Cached, Context, Error, Hooks, Reconciled, Reconciler, Resource};
use async_trait::async_trait;
use berth_api_types::registry::{validate_registry, RegistrySpec, RegistryStatus};
use berth_api_types::validate::FieldError;
use berth_api_types::{Event, Kind, Object};
use dereference::Found;
use login::LoginOutcome;
use status::reasons;
use std::sync::Arc;

pub struct RegistryController {
    secrets: Arc<dyn SecretReader>,
    http: reqwest::Client,
}

impl RegistryController {
    /// `secrets`: where the Registries' passwords are read.
    pub fn new(secrets: Arc<dyn SecretReader>) -> Self {
        RegistryController {
            secrets,
            http: login::client(),
        }
    }
}

impl Resource for RegistryController {
    type Object = Object<RegistrySpec, serde_json::Value>;
    type Status = RegistryStatus;
    const KIND: Kind = Kind::Registry;

    fn validate(object: &Self::Object) -> Result<(), Vec<FieldError>> {
        validate_registry(object)
    }
}

#[async_trait]
impl Reconciler for RegistryController {
    async fn reconcile(
        &self,
        obj: Arc<Cached<Self>>,
        ctx: &Context<Self>,
    ) -> Result<Reconciled<RegistryStatus>, Error> {
        let spec = &obj.object.spec;
        let name = obj.name();
        let (password, secret_version) =
            match dereference::dereference(&*ctx.store, &*self.secrets, name, spec).await? {
                Found::Password {
                    password,
                    secret_version,
                } => (password, secret_version),
                Found::Duplicate(why) => return Err(Error::refused(reasons::DUPLICATE, why)),
                // The Secret's events bring us back (see `map_related`).
                Found::SecretMissing(why) => {
                    return Err(Error::refused(reasons::SECRET_MISSING, why))
                }
            };
        let now = chrono::Utc::now();
        let check = match build::build(
            spec,
            &password,
            &obj.status,
            obj.generation(),
            &secret_version,
            now,
        ) {
            Ok(check) => check,
            Err(wait) => {
                return Ok(Reconciled {
                    status: obj.status.clone(),
                    action: Action::requeue(wait),
                })
            }
        };
        let outcome = apply::apply(&self.http, &check).await;
        let status = status::checked(
            &obj.status,
            obj.generation(),
            &secret_version,
            &outcome,
            &check.username,
            &check.host,
            now,
        );
        let action = match outcome {
            LoginOutcome::Unreachable(_) => Action::Backoff,
            _ => Action::requeue(status::RECHECK),
        };
        Ok(Reconciled { status, action })
    }

    /// Nothing exists in the engine for a Registry, so a deleted one needs no cleanup.
    async fn cleanup(&self, _name: &str, _ctx: &Context<Self>) -> Result<Action, Error> {
        Ok(Action::await_change())
    }
}

#[async_trait]
impl Hooks for RegistryController {
    fn watches(&self) -> Vec<Kind> {
        vec![Kind::Secret]
    }

    /// The Registries whose password is in the Secret an event is about.
    async fn map_related(&self, event: &Event, ctx: &Context<Self>) -> Vec<String> {
        if event.kind != Kind::Secret {
            return Vec::new();
        }
        ctx.cache
            .objects()
            .iter()
            .filter(|o| o.object.spec.password_secret_ref.name == event.name)
            .map(|o| o.name().to_string())
            .collect()
    }
}
