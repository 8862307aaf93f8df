//! What a running controller instance reports about itself: the record behind `berth controllers`
//! (`GET /apis/berth/v1/controllers`). Instances of one kind share that kind's objects by
//! partition; each renews its record with its leases, so a record is at most a lease time old.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Kind;

/// One controller instance, as it last reported itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerInstance {
    pub kind: Kind,
    /// A ULID chosen when the process starts.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// Partitions of the kind's objects this instance holds a lease on (of `partitionsTotal`).
    pub partitions: u32,
    pub partitions_total: u32,
    /// Objects of the kind in those partitions, as its cache knows them.
    pub objects: u64,
    /// Whether it runs the kind's once-per-installation work (garbage collection): the holder of
    /// partition 0.
    pub leader: bool,
    pub started: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

impl ControllerInstance {
    /// The share of the kind's partitions this instance owns, 0.0..=1.0.
    pub fn share(&self) -> f64 {
        if self.partitions_total == 0 {
            0.0
        } else {
            f64::from(self.partitions) / f64::from(self.partitions_total)
        }
    }
}
