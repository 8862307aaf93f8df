//! Service, step 2 (pure): Service -> Swarm service spec. Client-free: everything the engine is told
//! comes from here, so it is unit-tested without Docker. The spec hash stamped as a label and the
//! containment check come from the Swarm kit (`swarm::hash`).

use super::dereference::Resolved;
use crate::swarm::hash::spec_hash;
use crate::swarm::{FileKind, Owner};
use berth_api_types::names::labels;
use berth_api_types::service::FileRef;
use berth_api_types::service::VolumeMount;
use berth_api_types::service::{
    FailureAction, RestartCondition, Service, ServiceMode, UpdateOrder, UpdatePolicy,
};
use berth_api_types::Kind;
use bollard::models::{
    HealthConfig, Limit, Mount, MountTmpfsOptions, MountType, MountVolumeOptions,
    MountVolumeOptionsDriverConfig, NetworkAttachmentConfig, ResourceObject, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, ServiceSpecRollbackConfig,
    ServiceSpecRollbackConfigFailureActionEnum, ServiceSpecRollbackConfigOrderEnum,
    ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecConfigs, TaskSpecContainerSpecFile, TaskSpecContainerSpecFile1,
    TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecPlacementPreferences,
    TaskSpecPlacementSpread, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum,
};
use std::collections::HashMap;

/// The Swarm spec for a Service and its hash (also stamped on it as the `io.berth.spec-hash` label).
#[derive(Debug, Clone)]
pub struct Built {
    pub spec: ServiceSpec,
    pub hash: String,
    /// (generation, digest) when the image was pinned to a digest the spec does not name.
    pub pinned: Option<(u64, String)>,
}

/// Builds the Swarm service spec, labelled as `owner`'s; `deps` are the Service's dependencies as
/// they exist in Swarm.
pub fn build(svc: &Service, owner: &Owner, deps: &Resolved) -> Built {
    build_pinned(svc, owner, deps, None)
}

/// Like `build`, with the image pinned to `digest` (`repo:tag@sha256:...`, as the docker CLI sends
/// it) unless the spec already names one.
pub fn build_pinned(svc: &Service, owner: &Owner, deps: &Resolved, digest: Option<&str>) -> Built {
    let s = &svc.spec;
    let pinned = digest
        .filter(|_| s.image.digest.is_none())
        .map(|d| (svc.metadata.generation, d.to_string()));
    let image = match &pinned {
        Some((_, d)) => format!("{}@{d}", s.image),
        None => s.image.to_string(),
    };
    let name = svc.metadata.name.clone();
    let uid = svc.metadata.uid.clone().unwrap_or_default();

    let mut service_labels: HashMap<String, String> = s.labels.clone().into_iter().collect();
    service_labels.extend(owner.labels(&name));
    service_labels.insert(labels::UID.into(), uid);
    service_labels.insert(
        labels::GENERATION.into(),
        svc.metadata.generation.to_string(),
    );

    // Containers carry the ownership labels too: container events then name their berth object.
    let mut container_labels: HashMap<String, String> =
        s.container_labels.clone().into_iter().collect();
    container_labels.extend(owner.labels(&name));

    let container = TaskSpecContainerSpec {
        image: Some(image),
        labels: Some(container_labels),
        command: s.command.clone(),
        args: s.args.clone(),
        hostname: s.hostname.clone(),
        env: non_empty(
            s.env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
        ),
        dir: s.working_dir.clone(),
        user: s.user.clone(),
        stop_grace_period: s.stop_grace_period.as_ref().map(|d| nanos(d.as_nanos())),
        init: s.init,
        health_check: s.healthcheck.as_ref().map(|h| HealthConfig {
            test: if h.disable {
                Some(vec!["NONE".into()])
            } else {
                non_empty(h.test.clone())
            },
            interval: h.interval.as_ref().map(|d| nanos(d.as_nanos())),
            timeout: h.timeout.as_ref().map(|d| nanos(d.as_nanos())),
            retries: h.retries.map(count),
            start_period: h.start_period.as_ref().map(|d| nanos(d.as_nanos())),
            ..Default::default()
        }),
        secrets: non_empty(
            s.secrets
                .iter()
                .zip(&deps.secrets)
                .map(|(r, f)| TaskSpecContainerSpecSecrets {
                    file: Some(TaskSpecContainerSpecFile {
                        name: Some(file_target(FileKind::Secret, r)),
                        uid: Some(r.uid.clone().unwrap_or_else(|| "0".into())),
                        gid: Some(r.gid.clone().unwrap_or_else(|| "0".into())),
                        mode: Some(r.mode_bits().unwrap_or(0o444)),
                    }),
                    secret_id: Some(f.id.clone()),
                    secret_name: Some(f.name.clone()),
                })
                .collect(),
        ),
        configs: non_empty(
            s.configs
                .iter()
                .zip(&deps.configs)
                .map(|(r, f)| TaskSpecContainerSpecConfigs {
                    file: Some(TaskSpecContainerSpecFile1 {
                        name: Some(file_target(FileKind::Config, r)),
                        uid: Some(r.uid.clone().unwrap_or_else(|| "0".into())),
                        gid: Some(r.gid.clone().unwrap_or_else(|| "0".into())),
                        mode: Some(r.mode_bits().unwrap_or(0o444)),
                    }),
                    config_id: Some(f.id.clone()),
                    config_name: Some(f.name.clone()),
                    ..Default::default()
                })
                .collect(),
        ),
        mounts: non_empty(s.volumes.iter().map(|v| mount(v, owner, deps)).collect()),
        ..Default::default()
    };

    let resources = s.resources.as_ref().map(|r| TaskSpecResources {
        limits: r.limits.as_ref().map(|l| Limit {
            nano_cpus: l.cpus.as_ref().map(|c| c.nano_cpus()),
            memory_bytes: l.memory.as_ref().map(|m| m.bytes()),
            ..Default::default()
        }),
        reservations: r.reservations.as_ref().map(|l| ResourceObject {
            nano_cpus: l.cpus.as_ref().map(|c| c.nano_cpus()),
            memory_bytes: l.memory.as_ref().map(|m| m.bytes()),
            ..Default::default()
        }),
        ..Default::default()
    });

    let placement = s.placement.as_ref().map(|p| TaskSpecPlacement {
        constraints: non_empty(p.constraints.clone()),
        preferences: non_empty(
            p.spread
                .iter()
                .map(|d| TaskSpecPlacementPreferences {
                    spread: Some(TaskSpecPlacementSpread {
                        spread_descriptor: Some(d.clone()),
                    }),
                })
                .collect(),
        ),
        max_replicas: p.max_replicas_per_node.map(count),
        ..Default::default()
    });

    let restart = s.restart.as_ref().map(|r| TaskSpecRestartPolicy {
        condition: r.condition.map(|c| match c {
            RestartCondition::None => TaskSpecRestartPolicyConditionEnum::NONE,
            RestartCondition::OnFailure => TaskSpecRestartPolicyConditionEnum::ON_FAILURE,
            RestartCondition::Any => TaskSpecRestartPolicyConditionEnum::ANY,
        }),
        delay: r.delay.as_ref().map(|d| nanos(d.as_nanos())),
        max_attempts: r.max_attempts.map(count),
        window: r.window.as_ref().map(|d| nanos(d.as_nanos())),
    });

    let mode = match s.mode() {
        ServiceMode::Replicated => ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(count(s.replicas.unwrap_or(1))),
            }),
            ..Default::default()
        },
        ServiceMode::Global => ServiceSpecMode {
            global: Some(HashMap::new()),
            ..Default::default()
        },
    };

    let mut spec = ServiceSpec {
        name: Some(name),
        labels: Some(service_labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources,
            restart_policy: restart,
            placement,
            networks: non_empty(
                deps.networks
                    .iter()
                    .map(|id| NetworkAttachmentConfig {
                        target: Some(id.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            // Left unset at 0, so a spec without `forceUpdate` hashes as before and existing
            // services do not roll when this field appears.
            force_update: (s.force_update > 0).then_some(s.force_update),
            ..Default::default()
        }),
        mode: Some(mode),
        update_config: s.update.as_ref().map(update_config),
        rollback_config: s.rollback.as_ref().map(rollback_config),
        ..Default::default()
    };
    let hash = spec_hash(&spec, &[]);
    if let Some(l) = spec.labels.as_mut() {
        l.insert(labels::SPEC_HASH.into(), hash.clone());
    }
    Built { spec, hash, pinned }
}

/// One mount. A named volume carries its Volume's driver, options and labels: Swarm has no volume
/// object of its own, and each node creates the volume from these on first use.
fn mount(v: &VolumeMount, owner: &Owner, deps: &Resolved) -> Mount {
    match (&v.volume, v.tmpfs) {
        (Some(name), _) => {
            let spec = deps.volumes.get(name).cloned().unwrap_or_default();
            let mut vlabels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
            vlabels.extend(owner.for_kind(Kind::Volume).labels(name));
            Mount {
                target: Some(v.target.clone()),
                source: Some(name.clone()),
                typ: Some(MountType::VOLUME),
                read_only: v.read_only.then_some(true),
                volume_options: Some(MountVolumeOptions {
                    labels: Some(vlabels),
                    driver_config: Some(MountVolumeOptionsDriverConfig {
                        name: Some(spec.driver().to_string()),
                        options: non_empty_map(spec.driver_opts.clone().into_iter().collect()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
        (None, true) => Mount {
            target: Some(v.target.clone()),
            typ: Some(MountType::TMPFS),
            read_only: v.read_only.then_some(true),
            tmpfs_options: v.size.as_ref().map(|s| MountTmpfsOptions {
                size_bytes: Some(s.bytes()),
                ..Default::default()
            }),
            ..Default::default()
        },
        (None, false) => Mount {
            target: Some(v.target.clone()),
            typ: Some(MountType::VOLUME),
            read_only: v.read_only.then_some(true),
            ..Default::default()
        },
    }
}

fn non_empty_map(m: HashMap<String, String>) -> Option<HashMap<String, String>> {
    if m.is_empty() {
        None
    } else {
        Some(m)
    }
}

fn update_config(u: &UpdatePolicy) -> ServiceSpecUpdateConfig {
    ServiceSpecUpdateConfig {
        parallelism: u.parallelism.map(count),
        delay: u.delay.as_ref().map(|d| nanos(d.as_nanos())),
        failure_action: u.failure_action.map(|a| match a {
            FailureAction::Pause => ServiceSpecUpdateConfigFailureActionEnum::PAUSE,
            FailureAction::Continue => ServiceSpecUpdateConfigFailureActionEnum::CONTINUE,
            FailureAction::Rollback => ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK,
        }),
        monitor: u.monitor.as_ref().map(|d| nanos(d.as_nanos())),
        max_failure_ratio: u.max_failure_ratio,
        order: u.order.map(|o| match o {
            UpdateOrder::StopFirst => ServiceSpecUpdateConfigOrderEnum::STOP_FIRST,
            UpdateOrder::StartFirst => ServiceSpecUpdateConfigOrderEnum::START_FIRST,
        }),
    }
}

fn rollback_config(u: &UpdatePolicy) -> ServiceSpecRollbackConfig {
    ServiceSpecRollbackConfig {
        parallelism: u.parallelism.map(count),
        delay: u.delay.as_ref().map(|d| nanos(d.as_nanos())),
        // Validation refuses `rollback` here: a rollback cannot roll back.
        failure_action: u.failure_action.and_then(|a| match a {
            FailureAction::Pause => Some(ServiceSpecRollbackConfigFailureActionEnum::PAUSE),
            FailureAction::Continue => Some(ServiceSpecRollbackConfigFailureActionEnum::CONTINUE),
            FailureAction::Rollback => None,
        }),
        monitor: u.monitor.as_ref().map(|d| nanos(d.as_nanos())),
        max_failure_ratio: u.max_failure_ratio,
        order: u.order.map(|o| match o {
            UpdateOrder::StopFirst => ServiceSpecRollbackConfigOrderEnum::STOP_FIRST,
            UpdateOrder::StartFirst => ServiceSpecRollbackConfigOrderEnum::START_FIRST,
        }),
    }
}

fn nanos(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A count as the engine's signed field. Validation bounds every count far below `i64::MAX`; this
/// only makes sure that a value that got past it is never sent as a negative number.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Swarm drops empty lists; sending them would make every comparison see drift.
fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    if v.is_empty() {
        None
    } else {
        Some(v)
    }
}

/// Where a file lands in the container: secrets default to `/run/secrets/<target>` (the engine's own
/// rule for relative names); configs have no such directory, so a relative target is made absolute.
pub fn file_target(kind: FileKind, r: &FileRef) -> String {
    let t = r.target.clone().unwrap_or_else(|| r.name.clone());
    match kind {
        FileKind::Secret => t,
        FileKind::Config if t.starts_with('/') => t,
        FileKind::Config => format!("/{t}"),
    }
}

/// Swarm cannot switch a service between replicated and global: that takes a re-create.
pub fn same_mode(observed: &ServiceSpec, desired: &ServiceSpec) -> bool {
    let global = |s: &ServiceSpec| s.mode.as_ref().is_some_and(|m| m.global.is_some());
    global(observed) == global(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::hash::contains;
    use berth_api_types::Kind;
    use serde_json::json;
    use serde_json::Value;

    fn build_plain(svc: &Service, instance: &str) -> Built {
        build(
            svc,
            &Owner::new(instance, Kind::Service),
            &Resolved::default(),
        )
    }

    fn service(spec: Value) -> Service {
        let obj = berth_api_types::typed::decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "web", "uid": "01HZXTEST", "generation": 3},
            "spec": spec
        }))
        .expect("valid test service");
        serde_json::from_value(serde_json::to_value(obj).unwrap()).unwrap()
    }

    #[test]
    fn force_update_reaches_the_task_template_only_when_set() {
        let plain = build_plain(&service(json!({"image": "a:1"})), "i");
        let zero = build_plain(&service(json!({"image": "a:1", "forceUpdate": 0})), "i");
        assert_eq!(
            plain.hash, zero.hash,
            "a spec without forceUpdate must not roll existing services"
        );
        let v = serde_json::to_value(&plain.spec).unwrap();
        assert!(v["TaskTemplate"].get("ForceUpdate").is_none(), "{v}");
        let forced = build_plain(&service(json!({"image": "a:1", "forceUpdate": 3})), "i");
        let v = serde_json::to_value(&forced.spec).unwrap();
        assert_eq!(v["TaskTemplate"]["ForceUpdate"], 3);
        assert_ne!(forced.hash, plain.hash);
        // The engine reports ForceUpdate 0 for a service that never set it: no drift.
        let mut observed = plain.spec.clone();
        observed.task_template.as_mut().unwrap().force_update = Some(0);
        assert!(contains(&observed, &plain.spec));
        assert!(!contains(&observed, &forced.spec));
    }

    #[test]
    fn builds_every_field() {
        let b = build_plain(
            &service(json!({
                "image": "berth-test/busybox:1", "replicas": 3,
                "command": ["sleep"], "args": ["100"],
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "x=y"}],
                "labels": {"team": "blue"}, "containerLabels": {"c": "1"},
                "workingDir": "/srv", "user": "1000", "stopGracePeriod": "30s", "init": true,
                "resources": {"limits": {"cpus": "0.5", "memory": "128Mi"},
                              "reservations": {"cpus": "100m", "memory": "64Mi"}},
                "placement": {"constraints": ["node.role == manager"], "spread": ["node.labels.zone"],
                              "maxReplicasPerNode": 2},
                "update": {"parallelism": 2, "delay": "5s", "failureAction": "rollback",
                           "monitor": "10s", "maxFailureRatio": 0.5, "order": "start-first"},
                "rollback": {"parallelism": 0, "order": "stop-first"},
                "restart": {"condition": "on-failure", "delay": "2s", "maxAttempts": 5, "window": "1m"},
                "healthcheck": {"test": ["CMD", "true"], "interval": "10s", "timeout": "2s",
                                "retries": 3, "startPeriod": "1s"}
            })),
            "inst1",
        );
        let v = serde_json::to_value(&b.spec).unwrap();
        assert_eq!(v["Name"], "web");
        assert_eq!(v["Labels"]["team"], "blue");
        assert_eq!(v["Labels"][labels::MANAGED_BY], "berth");
        assert_eq!(v["Labels"][labels::INSTANCE], "inst1");
        assert_eq!(v["Labels"][labels::KIND], "service");
        assert_eq!(v["Labels"][labels::NAME], "web");
        assert_eq!(v["Labels"][labels::UID], "01HZXTEST");
        assert_eq!(v["Labels"][labels::GENERATION], "3");
        assert_eq!(v["Labels"][labels::SPEC_HASH], b.hash.as_str());
        let c = &v["TaskTemplate"]["ContainerSpec"];
        assert_eq!(c["Image"], "berth-test/busybox:1");
        assert_eq!(c["Command"], json!(["sleep"]));
        assert_eq!(c["Args"], json!(["100"]));
        assert_eq!(c["Env"], json!(["A=1", "B=x=y"]));
        assert_eq!(c["Labels"]["c"], "1");
        assert_eq!(c["Labels"][labels::NAME], "web");
        assert_eq!(c["Dir"], "/srv");
        assert_eq!(c["User"], "1000");
        assert_eq!(c["StopGracePeriod"], 30_000_000_000i64);
        assert_eq!(c["Init"], true);
        assert_eq!(c["HealthCheck"]["Test"], json!(["CMD", "true"]));
        assert_eq!(c["HealthCheck"]["Interval"], 10_000_000_000i64);
        assert_eq!(c["HealthCheck"]["StartPeriod"], 1_000_000_000i64);
        let r = &v["TaskTemplate"]["Resources"];
        assert_eq!(r["Limits"]["NanoCPUs"], 500_000_000);
        assert_eq!(r["Limits"]["MemoryBytes"], 128 << 20);
        assert_eq!(r["Reservations"]["NanoCPUs"], 100_000_000);
        assert_eq!(r["Reservations"]["MemoryBytes"], 64 << 20);
        let p = &v["TaskTemplate"]["Placement"];
        assert_eq!(p["Constraints"], json!(["node.role == manager"]));
        assert_eq!(
            p["Preferences"][0]["Spread"]["SpreadDescriptor"],
            "node.labels.zone"
        );
        assert_eq!(p["MaxReplicas"], 2);
        let rp = &v["TaskTemplate"]["RestartPolicy"];
        assert_eq!(rp["Condition"], "on-failure");
        assert_eq!(rp["MaxAttempts"], 5);
        assert_eq!(rp["Window"], 60_000_000_000i64);
        assert_eq!(v["Mode"]["Replicated"]["Replicas"], 3);
        let u = &v["UpdateConfig"];
        assert_eq!(u["Parallelism"], 2);
        assert_eq!(u["FailureAction"], "rollback");
        assert_eq!(u["Order"], "start-first");
        assert_eq!(u["Monitor"], 10_000_000_000i64);
        assert_eq!(u["MaxFailureRatio"], 0.5);
        assert_eq!(v["RollbackConfig"]["Parallelism"], 0);
        assert_eq!(v["RollbackConfig"]["Order"], "stop-first");
    }

    #[test]
    fn dependencies_become_files_mounts_and_networks() {
        let svc = service(json!({
            "image": "a",
            "secrets": [{"name": "db", "target": "db_pw", "uid": "70", "mode": "0400"}],
            "configs": [{"name": "nginx"}],
            "volumes": [
                {"target": "/data", "volume": "pgdata"},
                {"target": "/ro", "volume": "pgdata", "readOnly": true},
                {"target": "/tmp", "tmpfs": true, "size": "64Mi"},
                {"target": "/cache"}
            ],
            "networks": ["backend"]
        }));
        let deps = Resolved {
            secrets: vec![crate::swarm::SwarmFile { id: "sid".into(), name: "db-abc".into() }],
            configs: vec![crate::swarm::SwarmFile { id: "cid".into(), name: "nginx-def".into() }],
            volumes: std::collections::BTreeMap::from([(
                "pgdata".to_string(),
                serde_json::from_value(json!({"driver": "local", "driverOpts": {"type": "tmpfs"}, "labels": {"tier": "db"}})).unwrap(),
            )]),
            networks: vec!["netid1".into()],
        };
        let v =
            serde_json::to_value(build(&svc, &Owner::new("i", Kind::Service), &deps).spec).unwrap();
        let c = &v["TaskTemplate"]["ContainerSpec"];
        assert_eq!(
            c["Secrets"][0],
            json!({"File": {"Name": "db_pw", "UID": "70", "GID": "0", "Mode": 0o400}, "SecretID": "sid", "SecretName": "db-abc"})
        );
        assert_eq!(
            c["Configs"][0],
            json!({"File": {"Name": "/nginx", "UID": "0", "GID": "0", "Mode": 0o444}, "ConfigID": "cid", "ConfigName": "nginx-def"})
        );
        let m = &c["Mounts"];
        assert_eq!(m[0]["Type"], "volume");
        assert_eq!(m[0]["Source"], "pgdata");
        assert_eq!(
            m[0]["VolumeOptions"]["DriverConfig"],
            json!({"Name": "local", "Options": {"type": "tmpfs"}})
        );
        assert_eq!(m[0]["VolumeOptions"]["Labels"]["tier"], "db");
        assert_eq!(m[0]["VolumeOptions"]["Labels"][labels::INSTANCE], "i");
        assert!(m[0].get("ReadOnly").is_none());
        assert_eq!(m[1]["ReadOnly"], true);
        assert_eq!(
            m[2],
            json!({"Target": "/tmp", "Type": "tmpfs", "TmpfsOptions": {"SizeBytes": 64 << 20}})
        );
        assert_eq!(m[3], json!({"Target": "/cache", "Type": "volume"}));
        assert_eq!(v["TaskTemplate"]["Networks"], json!([{"Target": "netid1"}]));
    }

    #[test]
    fn global_mode_and_defaults() {
        let b = build_plain(&service(json!({"image": "a", "mode": "global"})), "i");
        let v = serde_json::to_value(&b.spec).unwrap();
        assert_eq!(v["Mode"], json!({"Global": {}}));
        let b = build_plain(&service(json!({"image": "a"})), "i");
        let v = serde_json::to_value(&b.spec).unwrap();
        assert_eq!(v["Mode"]["Replicated"]["Replicas"], 1);
        // Nothing the user did not ask for: the engine's defaults stay the engine's.
        assert!(v.get("UpdateConfig").is_none());
        assert!(v["TaskTemplate"].get("Resources").is_none());
        assert!(v["TaskTemplate"]["ContainerSpec"].get("Env").is_none());
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = build_plain(
            &service(json!({"image": "a", "labels": {"x": "1", "y": "2", "z": "3"}})),
            "i",
        );
        for _ in 0..20 {
            // HashMap iteration order differs between builds; the hash must not.
            let again = build_plain(
                &service(json!({"image": "a", "labels": {"z": "3", "y": "2", "x": "1"}})),
                "i",
            );
            assert_eq!(a.hash, again.hash);
        }
        let b = build_plain(
            &service(json!({"image": "a", "labels": {"x": "1", "y": "2", "z": "4"}})),
            "i",
        );
        assert_ne!(a.hash, b.hash);
        let c = build_plain(
            &service(json!({"image": "a", "labels": {"x": "1", "y": "2", "z": "3"}})),
            "other",
        );
        assert_ne!(a.hash, c.hash);
    }

    #[test]
    fn containment_ignores_engine_defaults_but_sees_drift() {
        let desired = build_plain(
            &service(json!({"image": "a", "replicas": 2, "env": [{"name": "A", "value": "1"}]})),
            "i",
        )
        .spec;
        let mut observed = desired.clone();
        // What the engine adds on its own.
        observed.endpoint_spec = Some(bollard::models::EndpointSpec {
            mode: Some(bollard::models::EndpointSpecModeEnum::VIP),
            ..Default::default()
        });
        if let Some(t) = observed.task_template.as_mut() {
            t.force_update = Some(0);
            t.placement = Some(TaskSpecPlacement::default());
        }
        assert!(contains(&observed, &desired));
        // Scaled by hand.
        let mut scaled = observed.clone();
        scaled.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(5) }),
            ..Default::default()
        });
        assert!(!contains(&scaled, &desired));
        // Env var added by hand.
        let mut env = observed.clone();
        env.task_template
            .as_mut()
            .unwrap()
            .container_spec
            .as_mut()
            .unwrap()
            .env = Some(vec!["A=1".into(), "B=2".into()]);
        assert!(!contains(&env, &desired));
        assert!(same_mode(&observed, &desired));
        let global = build_plain(&service(json!({"image": "a", "mode": "global"})), "i").spec;
        assert!(!same_mode(&global, &desired));
    }
}
