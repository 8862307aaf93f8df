//! Network -> Swarm network create request. Pure and client-free: everything the engine is told comes
//! from here, so it is unit-tested without Docker. Also the questions the reconcile asks of what it
//! observed: does it still match the spec, who uses it.
//!
//! Swarm networks are immutable: there is no update call, so "does not match" always means "remove and
//! re-create", which is only possible while nothing uses the network.

use crate::swarm::Owner;
use berth_api_types::names::labels;
use berth_api_types::network::Network;
use bollard::models::{Network as SwarmNetwork, NetworkCreateRequest, Service as SwarmService};
use std::collections::HashMap;

/// The only driver a berth Network uses.
pub const DRIVER: &str = "overlay";
/// The scope a berth Network lives in: one network for the whole Swarm.
pub const SCOPE: &str = "swarm";
/// The overlay driver option that turns on IPsec encryption between nodes. The driver looks only at
/// whether the key is present (libnetwork `if _, ok := optMap["encrypted"]; ok`), never at its
/// value: `encrypted=false` still encrypts. Docker 20.10 stores and reports the value verbatim.
pub const ENCRYPTED_OPTION: &str = "encrypted";
/// The value berth sends: what `docker network create --opt encrypted` sends and stores.
pub const ENCRYPTED_VALUE: &str = "";

/// The create request for a Network and its hash (also stamped on it as the `io.berth.spec-hash` label).
#[derive(Debug, Clone)]
pub struct Built {
    pub request: NetworkCreateRequest,
    pub hash: String,
}

/// Builds the create request, labelled as `owner`'s.
pub fn build(net: &Network, owner: &Owner) -> Built {
    let s = &net.spec;
    let name = net.metadata.name.clone();

    let mut network_labels: HashMap<String, String> = s.labels.clone().into_iter().collect();
    network_labels.extend(owner.labels(&name));

    let mut options = HashMap::new();
    if s.encrypted() {
        options.insert(ENCRYPTED_OPTION.to_string(), ENCRYPTED_VALUE.to_string());
    }

    let mut request = NetworkCreateRequest {
        name,
        driver: Some(DRIVER.into()),
        scope: Some(SCOPE.into()),
        attachable: Some(s.attachable),
        internal: Some(s.internal),
        options: Some(options),
        labels: Some(network_labels),
        ..Default::default()
    };
    // The hash says what the network *is*; the uid says which object asked for it. A Network deleted
    // and applied again with the same spec keeps its (possibly in-use) Swarm network.
    let hash = spec_hash(&request);
    if let Some(l) = request.labels.as_mut() {
        l.insert(labels::SPEC_HASH.into(), hash.clone());
        l.insert(
            labels::UID.into(),
            net.metadata.uid.clone().unwrap_or_default(),
        );
    }
    Built { request, hash }
}

/// Whether the engine's options turn encryption on (the key's presence, whatever its value).
pub fn is_encrypted(options: Option<&HashMap<String, String>>) -> bool {
    options.is_some_and(|o| o.contains_key(ENCRYPTED_OPTION))
}

/// The spec hash berth stamped on a network, if any.
pub fn hash_of(net: &SwarmNetwork) -> Option<&str> {
    net.labels
        .as_ref()
        .and_then(|l| l.get(labels::SPEC_HASH))
        .map(String::as_str)
}

/// Whether Swarm's allocator has set the network up. Until it has, the engine reports no driver and no
/// driver options (they come from the allocator's driver state, not from the spec), so there is
/// nothing to compare yet.
pub fn allocated(observed: &SwarmNetwork) -> bool {
    observed.driver.as_deref().is_some_and(|d| !d.is_empty())
}

/// Whether the network must be re-created for `built`: it was made from another spec. Networks cannot
/// be changed, and a network stamped with this very hash was created from this very spec, so that is
/// the only reason to re-create (anything else would re-create in a loop should the engine report a
/// field differently from how it was sent).
pub fn needs_recreate(observed: &SwarmNetwork, built: &Built) -> bool {
    hash_of(observed) != Some(built.hash.as_str())
}

/// How the engine's network differs from what `built` asks for (empty: it matches).
pub fn differences(observed: &SwarmNetwork, built: &Built) -> Vec<String> {
    let r = &built.request;
    let mut diffs = Vec::new();
    let observed_labels = observed.labels.clone().unwrap_or_default();
    let mut wrong_labels: Vec<&str> = r
        .labels
        .iter()
        .flatten()
        // The uid only records which object created the network (see `build`).
        .filter(|(k, v)| k.as_str() != labels::UID && observed_labels.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .collect();
    wrong_labels.sort();
    if !wrong_labels.is_empty() {
        diffs.push(format!("labels {}", wrong_labels.join(", ")));
    }
    if observed.driver.as_deref() != r.driver.as_deref() {
        diffs.push(format!(
            "driver {} (want {})",
            observed.driver.as_deref().unwrap_or("none"),
            r.driver.as_deref().unwrap_or("none")
        ));
    }
    if observed.scope.as_deref() != r.scope.as_deref() {
        diffs.push(format!(
            "scope {} (want {})",
            observed.scope.as_deref().unwrap_or("none"),
            r.scope.as_deref().unwrap_or("none")
        ));
    }
    let flag = |b: Option<bool>| b.unwrap_or(false);
    if flag(observed.attachable) != flag(r.attachable) {
        diffs.push(format!("attachable {}", flag(observed.attachable)));
    }
    if flag(observed.internal) != flag(r.internal) {
        diffs.push(format!("internal {}", flag(observed.internal)));
    }
    let enc = is_encrypted(observed.options.as_ref());
    if enc != is_encrypted(r.options.as_ref()) {
        diffs.push(format!("encrypted {enc}"));
    }
    diffs
}

/// Whether the network the engine has is the one `built` asks for.
pub fn matches(observed: &SwarmNetwork, built: &Built) -> bool {
    !needs_recreate(observed, built) && differences(observed, built).is_empty()
}

/// The Swarm services whose tasks join the network `id` (by ID, which is what Swarm stores, or by
/// name, which older clients could leave in the deprecated top-level `Networks`).
pub fn services_using(id: &str, name: &str, services: &[SwarmService]) -> Vec<String> {
    let mut users: Vec<String> = services
        .iter()
        .filter(|s| {
            let Some(spec) = s.spec.as_ref() else {
                return false;
            };
            let task_networks = spec
                .task_template
                .as_ref()
                .and_then(|t| t.networks.as_ref())
                .into_iter()
                .flatten();
            let old_networks = spec.networks.as_ref().into_iter().flatten();
            task_networks
                .chain(old_networks)
                .filter_map(|n| n.target.as_deref())
                .any(|t| t == id || t == name)
        })
        .map(|s| {
            s.spec
                .as_ref()
                .and_then(|sp| sp.name.clone())
                .or_else(|| s.id.clone())
                .unwrap_or_default()
        })
        .collect();
    users.sort();
    users
}

/// Hash of the request: what the network *is*, so without the uid label (which object asked).
pub fn spec_hash(request: &NetworkCreateRequest) -> String {
    crate::swarm::hash::spec_hash(request, &[labels::UID])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{NetworkAttachmentConfig, ServiceSpec, TaskSpec};
    use serde_json::json;
    use serde_json::Value;

    fn owner(instance: &str) -> Owner {
        Owner::new(instance, berth_api_types::Kind::Network)
    }

    fn network(spec: Value) -> Network {
        network_named("backend", "01HZXNET", spec)
    }

    fn network_named(name: &str, uid: &str, spec: Value) -> Network {
        let obj = berth_api_types::typed::decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Network",
            "metadata": {"name": name, "uid": uid, "generation": 2},
            "spec": spec
        }))
        .expect("valid test network");
        serde_json::from_value(serde_json::to_value(obj).unwrap()).unwrap()
    }

    /// What the engine reports for a network created from `b` (plus what it adds on its own).
    fn as_created(b: &Built) -> SwarmNetwork {
        let r = &b.request;
        let mut options = r.options.clone().unwrap_or_default();
        options.insert(
            "com.docker.network.driver.overlay.vxlanid_list".into(),
            "4097".into(),
        );
        SwarmNetwork {
            name: Some(r.name.clone()),
            id: Some("n1".into()),
            scope: r.scope.clone(),
            driver: r.driver.clone(),
            attachable: r.attachable,
            internal: r.internal,
            options: Some(options),
            labels: r.labels.clone(),
            ..Default::default()
        }
    }

    #[test]
    fn builds_labels_and_options() {
        let b = build(
            &network(json!({"attachable": true, "internal": true, "labels": {"team": "blue"}})),
            &Owner::new("inst1", berth_api_types::Kind::Network),
        );
        let v = serde_json::to_value(&b.request).unwrap();
        assert_eq!(v["Name"], "backend");
        assert_eq!(v["Driver"], "overlay");
        assert_eq!(v["Scope"], "swarm");
        assert_eq!(v["Attachable"], true);
        assert_eq!(v["Internal"], true);
        assert_eq!(v["Options"], json!({"encrypted": ""}));
        assert_eq!(
            v["Labels"],
            json!({
                "team": "blue",
                "io.berth.managed-by": "berth",
                "io.berth.instance": "inst1",
                "io.berth.kind": "network",
                "io.berth.name": "backend",
                "io.berth.uid": "01HZXNET",
                "io.berth.spec-hash": b.hash,
            })
        );
    }

    #[test]
    fn encryption_is_on_by_default_and_opt_out_is_honoured() {
        let default = build(&network(json!({})), &owner("i"));
        let explicit = build(&network(json!({"encrypted": true})), &owner("i"));
        let off = build(&network(json!({"encrypted": false})), &owner("i"));
        assert!(is_encrypted(default.request.options.as_ref()));
        assert!(is_encrypted(explicit.request.options.as_ref()));
        assert_eq!(
            default.hash, explicit.hash,
            "`encrypted: true` is the default"
        );
        // Opting out leaves the key out entirely: the driver would encrypt even for `encrypted=false`.
        assert_eq!(off.request.options, Some(HashMap::new()));
        assert!(!is_encrypted(off.request.options.as_ref()));
        assert_ne!(default.hash, off.hash);
        assert_eq!(
            default.request.attachable,
            Some(false),
            "defaults are explicit"
        );
        assert_eq!(default.request.internal, Some(false));
    }

    #[test]
    fn engine_encryption_is_the_key_not_its_value() {
        let opts = |v: &str| Some(HashMap::from([("encrypted".to_string(), v.to_string())]));
        assert!(is_encrypted(opts("").as_ref()));
        assert!(is_encrypted(opts("true").as_ref()));
        assert!(is_encrypted(opts("false").as_ref()));
        assert!(!is_encrypted(Some(&HashMap::new())));
        assert!(!is_encrypted(None));
    }

    #[test]
    fn hash_is_stable_and_tracks_what_the_network_is() {
        let spec = json!({"attachable": true, "labels": {"a": "1", "b": "2", "c": "3"}});
        let h = build(&network(spec.clone()), &owner("i")).hash;
        for _ in 0..20 {
            assert_eq!(build(&network(spec.clone()), &owner("i")).hash, h);
        }
        assert_eq!(h.len(), 16);
        // Neither the object's uid nor its generation make a different network.
        assert_eq!(
            build(
                &network_named("backend", "OTHERUID", spec.clone()),
                &owner("i")
            )
            .hash,
            h
        );
        // Everything the engine is told does.
        assert_ne!(
            build(
                &network(json!({"attachable": false, "labels": {"a": "1", "b": "2", "c": "3"}})),
                &owner("i")
            )
            .hash,
            h
        );
        assert_ne!(
            build(
                &network(json!({"attachable": true, "internal": true, "labels": {"a": "1", "b": "2", "c": "3"}})),
                &owner("i")
            )
            .hash,
            h
        );
        assert_ne!(
            build(
                &network(json!({"attachable": true, "labels": {"a": "1", "b": "2"}})),
                &owner("i")
            )
            .hash,
            h
        );
        assert_ne!(build(&network(spec.clone()), &owner("other")).hash, h);
        assert_ne!(
            build(&network_named("frontend", "X", spec), &owner("i")).hash,
            h
        );
    }

    #[test]
    fn matches_what_the_engine_reports_and_nothing_else() {
        let b = build(&network(json!({"labels": {"team": "blue"}})), &owner("i"));
        let created = as_created(&b);
        assert!(matches(&created, &b));
        // The same object re-created (new uid) still matches its network.
        let again = build(
            &network_named("backend", "NEWUID", json!({"labels": {"team": "blue"}})),
            &owner("i"),
        );
        assert!(matches(&created, &again));

        let off = build(
            &network(json!({"encrypted": false, "labels": {"team": "blue"}})),
            &owner("i"),
        );
        assert!(!matches(&created, &off));
        assert!(!matches(&as_created(&off), &b));
        let attachable = build(
            &network(json!({"attachable": true, "labels": {"team": "blue"}})),
            &owner("i"),
        );
        assert!(!matches(&created, &attachable));
        let relabelled = build(&network(json!({"labels": {"team": "red"}})), &owner("i"));
        assert!(!matches(&created, &relabelled));
        assert!(needs_recreate(&created, &off));
        assert!(!needs_recreate(&created, &again));

        // Same hash but not what the hash promises (labels forged, or the engine reports a field
        // differently): a mismatch to report, never a reason to re-create.
        let mut bridge = created.clone();
        bridge.driver = Some("bridge".into());
        bridge.scope = Some("local".into());
        bridge.options = None;
        assert!(!matches(&bridge, &b));
        assert!(!needs_recreate(&bridge, &b));
        assert_eq!(
            differences(&bridge, &b),
            vec![
                "driver bridge (want overlay)",
                "scope local (want swarm)",
                "encrypted false"
            ]
        );
        let mut unlabelled = created.clone();
        unlabelled.labels.as_mut().unwrap().remove("team");
        assert_eq!(differences(&unlabelled, &b), vec!["labels team"]);
        assert!(differences(&created, &b).is_empty());

        // Not yet allocated: the engine reports neither driver nor options.
        let mut pending = created.clone();
        pending.driver = Some(String::new());
        pending.options = None;
        assert!(!allocated(&pending));
        assert!(allocated(&created));
        assert!(!needs_recreate(&pending, &b));
    }

    #[test]
    fn services_using_by_id_or_name() {
        let svc = |name: &str, targets: &[&str]| SwarmService {
            id: Some(format!("id-{name}")),
            spec: Some(ServiceSpec {
                name: Some(name.into()),
                task_template: Some(TaskSpec {
                    networks: Some(
                        targets
                            .iter()
                            .map(|t| NetworkAttachmentConfig {
                                target: Some(t.to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut legacy = svc("legacy", &[]);
        legacy.spec.as_mut().unwrap().networks = Some(vec![NetworkAttachmentConfig {
            target: Some("backend".into()),
            ..Default::default()
        }]);
        let services = vec![
            svc("web", &["other", "n1"]),
            svc("api", &["n1"]),
            svc("db", &["other"]),
            legacy,
            SwarmService::default(),
        ];
        assert_eq!(
            services_using("n1", "backend", &services),
            vec!["api", "legacy", "web"]
        );
        assert!(services_using("n2", "frontend", &services).is_empty());
    }
}
