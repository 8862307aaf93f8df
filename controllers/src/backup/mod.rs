//! The Backup controller's building blocks. So far: moving a named volume's files between the node
//! it lives on and berth's node ([`volumes`]), over a one-time TLS channel ([`channel`]) to a
//! short-lived agent task ([`agent`]), as a tar stream ([`stream`]).

pub mod agent;
pub mod channel;
pub mod stream;
pub mod volumes;

pub use volumes::{ReadVolume, Transfers, VolumeOnNode, WriteSummary};
