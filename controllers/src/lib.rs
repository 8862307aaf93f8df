//! berth controllers: the shared controller runtime (queue, backoff, resync, event intake), the event
//! buses, the interface to the API server (`api`), and one folder per kind.

pub mod api;
pub mod bus;
pub mod engine;
pub mod ingress;
pub mod network;
pub mod registry;
pub mod runtime;
pub mod service;
pub mod swarm_file;
