//! berth's resource model: the object envelope shared by every kind, the kinds' specs and validation,
//! manifest loading, the API's other documents (`wire`: errors, discovery, lists), and the names
//! (API paths, NATS subjects, Swarm labels) that other crates and outside tools rely on.

pub mod access;
pub mod backup;
pub mod controllers;
pub mod cron;
pub mod deploy;
pub mod event;
pub mod image;
pub mod ingress;
pub mod kind;
pub mod manifest;
pub mod meta;
pub mod names;
pub mod network;
pub mod node;
pub mod predeploy;
pub mod registry;
pub mod schema;
pub mod secret_config;
pub mod selector;
pub mod service;
pub mod typed;
pub mod units;
pub mod validate;
pub mod volume;
pub mod wire;
pub mod workload;

pub use event::{Event, EventType};
pub use kind::Kind;
pub use meta::{Condition, ConditionStatus, DynObject, Object, ObjectMeta};
pub use names::API_VERSION;
