//! Observed Swarm network -> Network status. Pure: the reconcile hands in what it read from the engine
//! and gets back the status to write, conditions included.

use super::apply::Outcome;
use super::build::is_encrypted;
use crate::runtime::ObjectStatus;
use berth_api_types::meta::set_condition;
use berth_api_types::Condition;
use berth_api_types::ConditionStatus::{False, True};
use bollard::models::Network as SwarmNetwork;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Condition types of a Network.
pub mod conditions {
    /// The Swarm network exists and matches the spec.
    pub const READY: &str = "Ready";
    /// The spec cannot be applied: invalid, the name is taken, or the network must be re-created
    /// while in use.
    pub const DEGRADED: &str = "Degraded";
}

/// Condition reasons this controller sets.
pub mod reasons {
    pub const READY: &str = "NetworkReady";
    /// Created; Swarm's allocator has not set it up yet (a moment, normally).
    pub const ALLOCATING: &str = "Allocating";
    /// The spec does not deserialize or validate.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A network berth does not own has the name, or the engine refused the request.
    pub const REFUSED: &str = "Refused";
    /// The spec changed, Swarm networks are immutable, and something still uses the network.
    pub const IN_USE: &str = "InUse";
    /// berth's network carries this spec's hash but differs from it (it was changed behind berth's
    /// back); reported, never re-created in a loop.
    pub const MISMATCH: &str = "Mismatch";
}

/// What the Network controller reports. Written only by the controller, through the status endpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The Swarm network's ID (of berth's network for this object; none while the name is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_id: Option<String>,
    /// Whether the engine reports the network as encrypted (its `encrypted` driver option is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

/// Copies what the engine reports about berth's network (or clears it when there is none).
fn engine_fields(s: &mut NetworkStatus, network: Option<&SwarmNetwork>) {
    s.network_id = network.and_then(|n| n.id.clone());
    s.encrypted = network.map(|n| is_encrypted(n.options.as_ref()));
    s.driver = network.and_then(|n| n.driver.clone());
}

/// The network exists and matches the spec.
pub fn ready(
    current: &NetworkStatus,
    generation: u64,
    network: &SwarmNetwork,
    now: DateTime<Utc>,
) -> NetworkStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    engine_fields(&mut s, Some(network));
    let msg = format!(
        "{} {} network{}",
        if is_encrypted(network.options.as_ref()) {
            "encrypted"
        } else {
            "unencrypted"
        },
        network.scope.as_deref().unwrap_or("swarm"),
        network
            .id
            .as_deref()
            .map(|id| format!(" {id}"))
            .unwrap_or_default(),
    );
    set_condition(
        &mut s.conditions,
        conditions::READY,
        True,
        reasons::READY,
        &msg,
        now,
    );
    set_condition(
        &mut s.conditions,
        conditions::DEGRADED,
        False,
        reasons::READY,
        "",
        now,
    );
    s
}

/// The network exists but Swarm has not allocated it yet: not ready, not degraded either.
pub fn allocating(
    current: &NetworkStatus,
    generation: u64,
    network: &SwarmNetwork,
    now: DateTime<Utc>,
) -> NetworkStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    s.network_id = network.id.clone();
    let msg = "Swarm is allocating the network";
    set_condition(
        &mut s.conditions,
        conditions::READY,
        False,
        reasons::ALLOCATING,
        msg,
        now,
    );
    set_condition(
        &mut s.conditions,
        conditions::DEGRADED,
        False,
        reasons::ALLOCATING,
        "",
        now,
    );
    s
}

/// The spec changed but the network cannot be re-created: `users` (services, containers) still use it.
pub fn in_use(
    current: &NetworkStatus,
    generation: u64,
    network: &SwarmNetwork,
    users: &[String],
    now: DateTime<Utc>,
) -> NetworkStatus {
    let name = network.name.as_deref().unwrap_or_default();
    let msg = format!(
        "the spec changed and Swarm networks cannot be changed in place: network `{name}` must be \
         re-created, but it is in use by {}; berth re-creates it once nothing uses it",
        users.join(", ")
    );
    refused(
        current,
        generation,
        reasons::IN_USE,
        &msg,
        Some(network),
        now,
    )
}

/// Status for a spec berth will not (or cannot yet) apply. `network` is berth's own network for the
/// object, if it has one (a refused name has none).
pub fn refused(
    current: &NetworkStatus,
    generation: u64,
    reason: &str,
    message: &str,
    network: Option<&SwarmNetwork>,
    now: DateTime<Utc>,
) -> NetworkStatus {
    let mut s = current.clone();
    engine_fields(&mut s, network);
    not_ready(&mut s, generation, reason, message, now);
    s
}

/// Ready=False and Degraded=True for `reason`, observed at `generation`.
fn not_ready(
    s: &mut NetworkStatus,
    generation: u64,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) {
    s.observed_generation = Some(generation);
    set_condition(
        &mut s.conditions,
        conditions::READY,
        False,
        reason,
        message,
        now,
    );
    set_condition(
        &mut s.conditions,
        conditions::DEGRADED,
        True,
        reason,
        message,
        now,
    );
}

/// The status for what apply found or did.
pub fn observed(
    current: &NetworkStatus,
    generation: u64,
    outcome: &Outcome,
    name: &str,
    now: DateTime<Utc>,
) -> NetworkStatus {
    match outcome {
        Outcome::InPlace(n) if super::build::allocated(n) => ready(current, generation, n, now),
        Outcome::InPlace(n) => allocating(current, generation, n, now),
        Outcome::Mismatch {
            network,
            differences,
        } => {
            let msg = format!(
                "network `{name}` carries this spec's hash but differs from it ({}); it was \
                 changed outside berth: remove it and berth re-creates it",
                differences.join("; ")
            );
            refused(
                current,
                generation,
                reasons::MISMATCH,
                &msg,
                Some(network),
                now,
            )
        }
        Outcome::InUse { network, users } => in_use(current, generation, network, users, now),
        Outcome::Refused(msg) => refused(current, generation, reasons::REFUSED, msg, None, now),
    }
}

impl ObjectStatus for NetworkStatus {
    /// Refused with the engine fields as they were: the network itself is untouched.
    fn refused(&self, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) -> Self {
        let mut s = self.clone();
        not_ready(&mut s, generation, reason, message, now);
        s
    }
}

/// Whether the status says the network is in place.
pub fn is_ready(s: &NetworkStatus) -> bool {
    berth_api_types::meta::condition(&s.conditions, conditions::READY)
        .is_some_and(|c| c.status == True)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::meta::condition;
    use berth_api_types::ConditionStatus;
    use chrono::Duration;
    use std::collections::HashMap;

    fn net(encrypted: bool) -> SwarmNetwork {
        let mut options = HashMap::from([(
            "com.docker.network.driver.overlay.vxlanid_list".to_string(),
            "4097".to_string(),
        )]);
        if encrypted {
            options.insert("encrypted".into(), "".into());
        }
        SwarmNetwork {
            name: Some("backend".into()),
            id: Some("n1abc".into()),
            scope: Some("swarm".into()),
            driver: Some("overlay".into()),
            options: Some(options),
            ..Default::default()
        }
    }

    fn cond(s: &NetworkStatus, t: &str) -> (ConditionStatus, String, String) {
        let c = condition(&s.conditions, t).unwrap();
        (c.status, c.reason.clone(), c.message.clone())
    }

    #[test]
    fn ready_reports_what_the_engine_reports() {
        let now = Utc::now();
        let s = ready(&NetworkStatus::default(), 3, &net(true), now);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.network_id.as_deref(), Some("n1abc"));
        assert_eq!(s.encrypted, Some(true));
        assert_eq!(s.driver.as_deref(), Some("overlay"));
        let (st, reason, msg) = cond(&s, "Ready");
        assert_eq!((st, reason.as_str()), (True, "NetworkReady"));
        assert_eq!(msg, "encrypted swarm network n1abc");
        assert_eq!(cond(&s, "Degraded").0, False);
        assert!(is_ready(&s));

        let plain = ready(&NetworkStatus::default(), 1, &net(false), now);
        assert_eq!(plain.encrypted, Some(false));
        assert!(cond(&plain, "Ready").2.starts_with("unencrypted"));

        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["observedGeneration"], 3);
        assert_eq!(json["networkId"], "n1abc");
        assert_eq!(json["encrypted"], true);
        assert_eq!(json["driver"], "overlay");
        assert_eq!(json["conditions"][0]["type"], "Ready");
    }

    #[test]
    fn unchanged_observation_is_an_identical_status() {
        let t0 = Utc::now();
        let s1 = ready(&NetworkStatus::default(), 1, &net(true), t0);
        let s2 = ready(&s1, 1, &net(true), t0 + Duration::seconds(60));
        assert_eq!(s1, s2, "nothing changed, so nothing to write");
        let u1 = in_use(&s1, 2, &net(true), &["web".into()], t0);
        let u2 = in_use(
            &u1,
            2,
            &net(true),
            &["web".into()],
            t0 + Duration::seconds(60),
        );
        assert_eq!(u1, u2);
    }

    #[test]
    fn in_use_names_the_users_and_keeps_the_network() {
        let t0 = Utc::now();
        let before = ready(&NetworkStatus::default(), 1, &net(true), t0);
        let s = in_use(
            &before,
            2,
            &net(true),
            &["service api".into(), "service web".into()],
            t0 + Duration::seconds(5),
        );
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.network_id.as_deref(), Some("n1abc"), "the old one stays");
        assert_eq!(s.encrypted, Some(true), "as the engine still has it");
        let (st, reason, msg) = cond(&s, "Degraded");
        assert_eq!((st, reason.as_str()), (True, "InUse"));
        assert!(msg.contains("must be re-created"), "{msg}");
        assert!(msg.contains("service api, service web"), "{msg}");
        assert!(msg.contains("`backend`"), "{msg}");
        let ready_cond = condition(&s.conditions, "Ready").unwrap();
        assert_eq!(ready_cond.status, False);
        assert_eq!(ready_cond.last_transition_time, t0 + Duration::seconds(5));
        assert!(!is_ready(&s));
    }

    #[test]
    fn allocating_is_neither_ready_nor_degraded() {
        let mut pending = net(true);
        pending.driver = Some(String::new());
        pending.options = None;
        let s = allocating(&NetworkStatus::default(), 1, &pending, Utc::now());
        assert_eq!(s.network_id.as_deref(), Some("n1abc"));
        assert_eq!(cond(&s, "Ready").0, False);
        assert_eq!(cond(&s, "Ready").1, "Allocating");
        assert_eq!(cond(&s, "Degraded").0, False);
        assert!(!is_ready(&s));
    }

    #[test]
    fn refused_clears_engine_fields() {
        let now = Utc::now();
        let before = ready(&NetworkStatus::default(), 1, &net(true), now);
        let s = refused(
            &before,
            4,
            "Refused",
            "a network named `backend` exists that berth does not manage",
            None,
            now,
        );
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(
            (&s.network_id, s.encrypted, &s.driver),
            (&None, None, &None)
        );
        assert_eq!(
            cond(&s, "Degraded"),
            (
                True,
                "Refused".into(),
                "a network named `backend` exists that berth does not manage".into()
            )
        );
        assert_eq!(cond(&s, "Ready").0, False);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("networkId").is_none());
    }
}
