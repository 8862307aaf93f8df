//! The Swarm kit every controller uses: talking to the engine, ownership labels and filters,
//! canonical spec hashing, content-addressed secrets and configs with one garbage collector,
//! pull credentials for an image, and short-lived berth agent tasks on a chosen node with a
//! one-time encrypted channel back. Controllers never import each other; what two of them need
//! lives here, once.

pub mod agent_task;
pub mod channel;
pub mod engine;
pub mod files;
pub mod hash;
pub mod owner;
pub mod pull;

pub use files::{FileKind, SwarmFile, SwarmFiles};
pub use owner::{Claim, Owner};
