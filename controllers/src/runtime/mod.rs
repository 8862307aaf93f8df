//! The shared controller runtime: the building blocks every per-kind controller uses to turn change
//! events into serialised, retried reconciles (queue, backoff, the controller loop, local state).

pub mod backoff;
pub mod controller;
pub mod queue;
pub mod state;

pub use controller::{Action, Controller, ControllerConfig, Reconciler};
