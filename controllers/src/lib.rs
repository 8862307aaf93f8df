//! berth controllers: the shared controller runtime (cache, queue, backoff, status writes), the
//! Swarm kit every controller uses, the event buses, the API a controller sees, and one folder per
//! kind. Controllers never import each other.

pub mod api;
pub mod backup;
pub mod bus;
pub mod ingress;
pub mod metrics;
pub mod network;
pub mod node;
pub mod registry;
pub mod runtime;
pub mod service;
pub mod swarm;
