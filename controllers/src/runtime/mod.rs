//! The shared controller runtime, after kube-runtime: a per-kind cache fed by list, bus events and
//! resync; a work queue with per-key backoff; workers that hand each reconcile its object and write
//! the status it returns; the one retry policy; how several instances share a kind's objects
//! (leases); a controller's on-disk records; and one fake API store for the controllers' unit tests.

pub mod backoff;
pub mod cache;
pub mod controller;
pub mod queue;
pub mod reconciler;
pub mod records;
pub mod shares;
pub mod testing;

pub use cache::{Cache, Cached};
pub use controller::{converge_once, reconcile_once, Controller, ControllerConfig};
pub use reconciler::{
    Action, Aggregator, Context, Converged, Error, Hooks, ObjectStatus, Reconciled, Reconciler,
    Resource,
};
pub use records::Records;
