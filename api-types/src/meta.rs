//! The object envelope every kind shares (`apiVersion`, `kind`, `metadata`, `spec`, `status`) and the
//! status conventions borrowed from Kubernetes: `observedGeneration` and typed conditions whose
//! transition time moves only when the condition flips.

use crate::kind::Kind;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Metadata of every object. `name`, `labels` and `annotations` come from the user; the rest is set by
/// the API server and ignored when a manifest carries it (so `berth get -o yaml` output re-applies).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Server-set, a ULID, fixed for the object's lifetime (a delete and re-create gets a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Server-set; bumped only when `spec` changes, so `status.observedGeneration` can say whether a
    /// controller has seen the latest spec.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Server-set; changes on every write (spec, metadata or status). Send it back to make a write
    /// conditional on nobody else having written in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Server-set, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub creation_timestamp: Option<DateTime<Utc>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The envelope, generic over a kind's spec and status. `Object<Value, Value>` is the untyped form the
/// store and the wire use; each kind deserializes its typed form from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    bound(deserialize = "S: Deserialize<'de>, St: Deserialize<'de> + Default")
)]
pub struct Object<S, St> {
    pub api_version: String,
    pub kind: Kind,
    pub metadata: ObjectMeta,
    pub spec: S,
    /// Absent or `null` until a controller writes it.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: St,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The untyped object as stored and sent over the API.
pub type DynObject = Object<serde_json::Value, serde_json::Value>;

impl<S, St> Object<S, St> {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

/// Status of a condition, as in Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// One typed condition. `lastTransitionTime` is when `status` last flipped, not when it was last
/// written, so a watcher can tell "Ready for 3 days" from "Ready since the last resync".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: DateTime<Utc>,
}

/// Sets (or adds) the condition of `type_`, keeping its transition time unless `status` flips.
/// Returns whether anything visible changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status || c.reason != reason || c.message != message;
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message.to_string();
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition_time: now,
            });
            true
        }
    }
}

/// Reasons of a `Degraded=True` condition that will not clear without someone changing something
/// (the spec, a registry, a name someone else holds): waiting longer only repeats them. `berth wait`
/// and `apply --wait` stop at these instead of running into their timeout.
pub const GIVE_UP_REASONS: [&str; 8] = [
    "InvalidSpec",
    "Refused",
    "Conflict",
    "ImagePullFailed",
    "RolledBack",
    "UpdatePaused",
    crate::service::conditions::PRE_DEPLOY_FAILED,
    crate::service::conditions::PRE_DEPLOY_TIMED_OUT,
];

/// Looks a condition up by type.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// RFC 3339 with second precision, the format of every timestamp berth prints.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn transition_time_moves_only_on_flip() {
        let t0 = Utc::now();
        let t1 = t0 + Duration::seconds(10);
        let t2 = t0 + Duration::seconds(20);
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Starting",
            "0/1",
            t0
        ));
        // Same status, new message: visible change, same transition time.
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Starting",
            "0/2",
            t1
        ));
        assert_eq!(c[0].last_transition_time, t0);
        // Identical: no change at all.
        assert!(!set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Starting",
            "0/2",
            t2
        ));
        assert_eq!(c[0].last_transition_time, t0);
        // Flip: time moves.
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::True,
            "Running",
            "",
            t2
        ));
        assert_eq!(c[0].last_transition_time, t2);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn server_fields_are_optional_in_manifests() {
        let m: ObjectMeta = serde_json::from_str(r#"{"name":"web"}"#).unwrap();
        assert_eq!(m.generation, 0);
        assert!(m.uid.is_none());
        let e = serde_json::from_str::<ObjectMeta>(r#"{"name":"web","lables":{}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `lables`"), "{e}");
    }
}
