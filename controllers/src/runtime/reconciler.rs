//! What a controller implements, after kube-runtime: the kind it owns ([`Resource`]), what triggers
//! it ([`Hooks`]), and its reconcile, in one of two shapes: [`Reconciler`] converges one object at a
//! time; [`Aggregator`] builds one thing (e.g. the ingress proxy) from every object of its kind.
//!
//! Reconcile receives the validated object from the runtime's cache and returns the status to show;
//! the runtime writes it. An [`Error::Refused`] is terminal (a `Ready=False` condition, no retry
//! until the object changes); every other error backs off with the one policy.

use super::cache::{Cache, Cached};
use crate::api::{ClientError, ResourceStore};
use async_trait::async_trait;
use berth_api_types::validate::FieldError;
use berth_api_types::wire::Installation;
use berth_api_types::{Event, Kind};
use bollard::models::EventMessage;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What a reconcile asks for next (after kube-runtime's `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look again after this long even if nothing changes (e.g. while a rollout is in flight).
    Requeue(Duration),
    /// Nothing to do until an event or the periodic resync says otherwise.
    AwaitChange,
    /// The status is written, and the key is retried with the backoff policy as after an error:
    /// for a failure the status reports (a registry that does not answer).
    Backoff,
}

impl Action {
    pub fn requeue(after: Duration) -> Self {
        Action::Requeue(after)
    }

    pub fn await_change() -> Self {
        Action::AwaitChange
    }
}

/// What reconciling one object produced: the status to show and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconciled<St> {
    pub status: St,
    pub action: Action,
}

/// What converging every object into one thing produced: each object's status, and when to look
/// again. An object left out keeps its status.
#[derive(Debug, Clone, PartialEq)]
pub struct Converged<St> {
    pub statuses: BTreeMap<String, St>,
    pub action: Action,
}

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// berth cannot act on the object as it is (its spec, or something it names that berth must not
    /// touch). Shown as `Ready=False` with this reason and message; looked at again only when
    /// something changes, never in a retry loop.
    #[error("{reason}: {message}")]
    Refused { reason: String, message: String },
    #[error("berth API: {0}")]
    Api(#[from] ClientError),
    #[error("Swarm engine: {0}")]
    Engine(#[from] bollard::errors::Error),
    /// Any other transient failure (a registry, the proxy's admin socket...).
    #[error("{0}")]
    Transient(String),
}

impl Error {
    pub fn refused(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Refused {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// A status the runtime can write for a controller.
pub trait ObjectStatus:
    Serialize + DeserializeOwned + Default + Clone + PartialEq + Send + Sync + 'static
{
    /// This status with `Ready=False` (and whatever else the kind shows for an object it cannot
    /// act on) for `reason` and `message`, observed at `generation`.
    fn refused(&self, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) -> Self;
}

/// The kind a controller owns: its typed form, and the check an object passes before a reconcile
/// sees it (the API validated it on write; another version of berth may have stored it).
pub trait Resource: Send + Sync + 'static {
    /// The typed object reconcile receives (e.g. `Service`).
    type Object: DeserializeOwned + Send + Sync + 'static;
    type Status: ObjectStatus;
    const KIND: Kind;

    fn validate(object: &Self::Object) -> Result<(), Vec<FieldError>>;
}

/// What the runtime hands every reconcile besides the object.
pub struct Context<R: Resource> {
    pub store: Arc<dyn ResourceStore>,
    /// Every object of the controller's kind, as the API last said.
    pub cache: Cache<R>,
    pub installation: Installation,
}

/// What triggers a controller besides changes to its own objects. Every method has a default:
/// a controller says only what it needs.
#[async_trait]
pub trait Hooks: Resource {
    /// Names of the objects this controller has created in the engine. Resync reconciles them too,
    /// so an engine object whose berth object is gone (deleted while the controller was down) is
    /// removed.
    async fn engine_names(&self) -> Result<Vec<String>, Error> {
        Ok(Vec::new())
    }

    /// Removes engine objects the controller made that nothing needs any more (e.g. old contents of
    /// a rotated secret). Called on every resync; failures are logged and retried next time.
    async fn collect_garbage(&self, _ctx: &Context<Self>) -> Result<(), Error>
    where
        Self: Sized,
    {
        Ok(())
    }

    /// Engine event types to watch (`service`, `container`, ...); empty: no engine watch.
    fn engine_event_types(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// The object name an engine event concerns, if any.
    fn map_engine_event(&self, _event: &EventMessage) -> Option<String> {
        None
    }

    /// Other kinds this controller depends on: their events (of every type, status included) are
    /// mapped to objects of this kind with `map_related`.
    fn watches(&self) -> Vec<Kind> {
        Vec::new()
    }

    /// The objects of this kind that an event of a watched kind concerns.
    async fn map_related(&self, _event: &Event, _ctx: &Context<Self>) -> Vec<String>
    where
        Self: Sized,
    {
        Vec::new()
    }
}

/// A controller that converges one object at a time.
#[async_trait]
pub trait Reconciler: Hooks + Sized {
    /// Brings the engine to the object and returns the status to show.
    async fn reconcile(
        &self,
        object: Arc<Cached<Self>>,
        ctx: &Context<Self>,
    ) -> Result<Reconciled<Self::Status>, Error>;

    /// The object is gone: remove what berth made for it.
    async fn cleanup(&self, name: &str, ctx: &Context<Self>) -> Result<Action, Error>;
}

/// A controller that builds one thing from every object of its kind (the ingress proxy from all
/// Ingresses). Every change to any of them is one key in the queue, so a burst of changes is one
/// converge, not one per object.
#[async_trait]
pub trait Aggregator: Hooks + Sized {
    /// The one thing's name: the queue key every object and engine event maps to.
    fn key(&self) -> String;

    /// Converges the thing from `objects` (every valid object; invalid ones are reported by the
    /// runtime) and returns their statuses.
    async fn converge(
        &self,
        objects: Vec<Arc<Cached<Self>>>,
        ctx: &Context<Self>,
    ) -> Result<Converged<Self::Status>, Error>;
}
