//! The event published on every change to an object: the payload outside tools subscribe to on
//! `berth.events.<kind>.<name>`. It names the object and its versions but carries no spec or status,
//! so nothing sensitive travels on the bus; subscribers GET the object for details.

use crate::kind::Kind;
use crate::names::subjects;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// Created, or its spec/metadata changed.
    Applied,
    Deleted,
    /// A controller wrote new status.
    StatusChanged,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// ULID; also the JetStream message id, so a re-published event is deduplicated.
    pub id: String,
    #[serde(rename = "type")]
    pub type_: EventType,
    pub kind: Kind,
    pub name: String,
    pub uid: String,
    pub generation: u64,
    pub resource_version: String,
    pub time: DateTime<Utc>,
    /// Short human text (e.g. the Ready condition's message on `StatusChanged`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Event {
    pub fn subject(&self) -> String {
        subjects::event(self.kind, &self.name)
    }
}
