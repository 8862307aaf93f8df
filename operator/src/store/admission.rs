//! Admission: the kind-specific rules the store applies to writes, kept out of the persistence
//! layer, which asks through `admit` and `check_write` alone. A delete is refused while something
//! still uses the object (a Service's Secrets, Configs, Volumes and Networks; a Registry's password
//! Secret) or when berth needs it (the default Network); an apply keeps what deploys wrote; the
//! default Network is created at start.
//!
//! Every written object also passes the server's [`Policy`], the rules that depend on how this
//! server was started rather than on the object alone: no host bind mounts or devices in a Volume
//! unless `--allow-bind-mounts`, and no name of berth's own Swarm objects (the ingress proxy's,
//! the backup agents', the engine's networks) for any kind whose Swarm object is named after it.

use super::{Store, StoreError, WriteMode};
use berth_api_types::names::swarm;
use berth_api_types::registry::RegistrySpec;
use berth_api_types::service::ServiceSpec;
use berth_api_types::validate::FieldError;
use berth_api_types::volume::VolumeSpec;
use berth_api_types::{DynObject, Kind};
use serde_json::json;

/// What this server allows beyond an object's own validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Volumes may bind-mount host paths or mount host devices (`--allow-bind-mounts`).
    pub allow_bind_mounts: bool,
    /// The ingress proxy's name (`--ingress-name`): its Swarm objects are named after it.
    pub ingress_proxy: String,
}

impl Default for Policy {
    /// The safe default: no host mounts, the default proxy name reserved.
    fn default() -> Self {
        Policy {
            allow_bind_mounts: false,
            ingress_proxy: berth_api_types::ingress::DEFAULT_PROXY_NAME.to_string(),
        }
    }
}

/// The policy's verdict on one object about to be written; `Err` holds every field it refuses.
pub(crate) fn check_write(policy: &Policy, obj: &DynObject) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    let named_in_swarm = matches!(
        obj.kind,
        Kind::Service | Kind::Volume | Kind::Network | Kind::Secret | Kind::Config
    );
    let name = &obj.metadata.name;
    if named_in_swarm {
        if let Some(why) = swarm::reserved(name, &policy.ingress_proxy) {
            errors.push(FieldError::new("metadata.name", format!("`{name}` {why}")));
        }
    }
    if obj.kind == Kind::Network && swarm::ENGINE_NETWORKS.contains(&name.as_str()) {
        errors.push(FieldError::new(
            "metadata.name",
            format!("`{name}` is reserved: it is one of the engine's own networks"),
        ));
    }
    match obj.kind {
        Kind::Volume if !policy.allow_bind_mounts => {
            // Validated before it got here, so the spec parses; if not, validation speaks.
            if let Ok(spec) = serde_json::from_value::<VolumeSpec>(obj.spec.clone()) {
                errors.extend(berth_api_types::volume::host_access(&spec));
            }
        }
        Kind::Service => {
            // A Service mounts Volumes by name: no reserved one either (it could only be a
            // Volume berth refused, or one made by hand on a node).
            if let Ok(spec) = serde_json::from_value::<ServiceSpec>(obj.spec.clone()) {
                for (i, v) in spec.volumes.iter().enumerate() {
                    let Some(volume) = &v.volume else { continue };
                    if let Some(why) = swarm::reserved(volume, &policy.ingress_proxy) {
                        errors.push(FieldError::new(
                            format!("spec.volumes[{i}].volume"),
                            format!("`{volume}` {why}"),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// What the store asks admission about.
pub(super) enum Op<'a> {
    /// An apply over an existing object; admission may change what is written.
    Upsert {
        old: &'a DynObject,
        incoming: &'a mut DynObject,
    },
    /// Deleting an existing object (called under the write lock, so no write can add a reference
    /// between the check and the delete).
    Delete {
        kind: Kind,
        name: &'a str,
        /// The Network services join when they list none.
        default_network: &'a str,
    },
}

/// The one seam between persistence and kind rules: `Err` refuses the operation.
pub(super) fn admit(store: &Store, op: Op<'_>) -> Result<(), StoreError> {
    match op {
        Op::Upsert { old, incoming } => {
            keep_deploy_state(old, incoming);
            Ok(())
        }
        Op::Delete {
            kind,
            name,
            default_network,
        } => check_unused(store, kind, name, default_network),
    }
}

/// What deploys and rollout commands wrote and a manifest does not know about survives `apply` of
/// that manifest: the `deploy.berth.io/*` annotations, a Service's `forceUpdate` counter and its
/// `paused` flag, unless the manifest sets them. Otherwise re-applying an unchanged manifest after a
/// same-tag redeploy would lower the counter and restart every task, and a CI apply would silently
/// resume a service someone paused (only `rollout resume` does that). (The image is the manifest's to set: applying it reverts a deploy,
/// as with kubectl.)
fn keep_deploy_state(old: &DynObject, incoming: &mut DynObject) {
    for (k, v) in &old.metadata.annotations {
        if k.starts_with(berth_api_types::names::annotations::DEPLOY_PREFIX) {
            incoming
                .metadata
                .annotations
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
    }
    if old.kind == Kind::Service {
        if let (Some(n), Some(spec)) = (old.spec.get("forceUpdate"), incoming.spec.as_object_mut())
        {
            spec.entry("forceUpdate").or_insert_with(|| n.clone());
        }
        if let (Some(p), Some(spec)) = (old.spec.get("paused"), incoming.spec.as_object_mut()) {
            spec.entry("paused").or_insert_with(|| p.clone());
        }
    }
}

/// Refuses to delete what a Service or Registry uses, or what berth needs.
fn check_unused(
    store: &Store,
    kind: Kind,
    name: &str,
    default_network: &str,
) -> Result<(), StoreError> {
    if !matches!(
        kind,
        Kind::Secret | Kind::Config | Kind::Volume | Kind::Network
    ) {
        return Ok(());
    }
    if kind == Kind::Network && name == default_network {
        return Err(StoreError::Protected {
            kind,
            name: name.to_string(),
            why: "is the default network (services that list no networks join it); \
                  the default network cannot be deleted"
                .to_string(),
        });
    }
    let mut users = Vec::new();
    for svc in store.list(Kind::Service)? {
        let spec: ServiceSpec = serde_json::from_value(svc.spec).map_err(|e| {
            StoreError::Storage(format!(
                "cannot check whether service/{} uses {kind} `{name}`: its stored spec does \
                 not parse: {e}",
                svc.metadata.name
            ))
        })?;
        if spec.uses(kind, name, default_network) {
            users.push(format!("service/{}", svc.metadata.name));
        }
    }
    if kind == Kind::Secret {
        // A Registry's password: deleting it would break every pull from that registry.
        for reg in store.list(Kind::Registry)? {
            let spec: Result<RegistrySpec, _> = serde_json::from_value(reg.spec);
            if spec.is_ok_and(|r| r.password_secret_ref.name == name) {
                users.push(format!("registry/{}", reg.metadata.name));
            }
        }
    }
    if users.is_empty() {
        Ok(())
    } else {
        Err(StoreError::InUse {
            kind,
            name: name.to_string(),
            users,
        })
    }
}

/// Creates the default Network (`spec: {}`) unless it exists, through the normal write path (so
/// an `Applied` event goes out). Returns whether it was created.
pub async fn ensure_network(store: &Store, name: &str) -> Result<bool, StoreError> {
    if store.get(Kind::Network, name)?.is_some() {
        return Ok(false);
    }
    let obj = berth_api_types::typed::decode_object(&json!({
        "apiVersion": berth_api_types::names::API_VERSION,
        "kind": "Network",
        "metadata": {"name": name},
        "spec": {},
    }))
    .map_err(|errs| {
        let why: Vec<String> = errs.iter().map(ToString::to_string).collect();
        StoreError::Storage(format!(
            "the default network `{name}` is not a valid Network: {}",
            why.join("; ")
        ))
    })?;
    match store.write(vec![obj], WriteMode::Create, None, false).await {
        Ok(_) => Ok(true),
        // Created meanwhile by someone else: just as good.
        Err(StoreError::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates the default backup plan (`environment`, every default) at a store's first start, so
/// backups are on unless a team turns them off. Only once: a plan deleted on purpose stays
/// deleted (the store's meta remembers). Returns whether it was created.
pub async fn ensure_backup_plan(store: &Store) -> Result<bool, StoreError> {
    const DONE: &str = "default-backup-plan";
    if store.meta_flag(DONE)? {
        return Ok(false);
    }
    let name = berth_api_types::backup::DEFAULT_PLAN;
    let obj = berth_api_types::typed::decode_object(&json!({
        "apiVersion": berth_api_types::names::API_VERSION,
        "kind": "Backup",
        "metadata": {"name": name},
        "spec": {},
    }))
    .map_err(|_| StoreError::Storage("the default backup plan does not validate".into()))?;
    let created = match store.write(vec![obj], WriteMode::Create, None, false).await {
        Ok(_) => true,
        Err(StoreError::AlreadyExists { .. }) => false,
        Err(e) => return Err(e),
    };
    store.set_meta_flag(DONE).await?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use berth_api_types::wire::ApplyOutcome;
    use berth_api_types::EventType;
    use serde_json::{json, Value};

    fn user(name: &str, spec: Value) -> DynObject {
        obj(
            json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}),
        )
    }

    #[tokio::test]
    async fn apply_keeps_what_deploys_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let manifest = || {
            obj(
                json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"},
                       "spec": {"image": "app:1"}}),
            )
        };
        s.write(vec![manifest()], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        // A same-tag redeploy, as the deploy applier writes it.
        let mut deployed = s.get(Kind::Service, "web").unwrap().unwrap();
        deployed.spec["forceUpdate"] = json!(1);
        deployed.spec["paused"] = json!(true);
        deployed
            .metadata
            .annotations
            .insert("deploy.berth.io/id".into(), "01J".into());
        s.write(vec![deployed], WriteMode::Replace, None, false)
            .await
            .unwrap();
        // Re-applying the unchanged manifest changes nothing: no lower counter, no lost annotation.
        let r = s
            .write(vec![manifest()], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Unchanged);
        let now = s.get(Kind::Service, "web").unwrap().unwrap();
        assert_eq!(now.spec["forceUpdate"], 1);
        assert_eq!(now.spec["paused"], true);
        assert_eq!(now.metadata.annotations["deploy.berth.io/id"], "01J");
        // A PUT is a full replacement: there the client's object is the whole truth.
        s.write(vec![manifest()], WriteMode::Replace, None, false)
            .await
            .unwrap();
        assert!(s
            .get(Kind::Service, "web")
            .unwrap()
            .unwrap()
            .spec
            .get("forceUpdate")
            .is_none());
    }

    #[tokio::test]
    async fn a_registrys_password_secret_cannot_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let registry = obj(json!({"apiVersion": "berth/v1", "kind": "Registry",
            "metadata": {"name": "team"},
            "spec": {"server": "registry.example.com", "username": "ci",
                     "passwordSecretRef": {"name": "reg-pass", "key": "password"}}}));
        s.write(
            vec![
                secret("reg-pass", json!({"stringData": {"password": "x"}})),
                registry,
            ],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        let err = s
            .delete(Kind::Secret, "reg-pass", "berth-internal")
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Secret `reg-pass` is used by registry/team; remove those references first"
        );
        s.delete(Kind::Registry, "team", "berth-internal")
            .await
            .unwrap();
        s.delete(Kind::Secret, "reg-pass", "berth-internal")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn objects_in_use_cannot_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let net = |n: &str| {
            obj(
                json!({"apiVersion": "berth/v1", "kind": "Network", "metadata": {"name": n}, "spec": {}}),
            )
        };
        s.write(
            vec![
                secret("db", json!({"stringData": {"pw": "x"}})),
                secret("idle", json!({"stringData": {"pw": "x"}})),
                net("backend"),
                net("berth-internal"),
                net("custom-default"),
                user(
                    "api",
                    json!({"image": "a", "secrets": [{"name": "db"}], "networks": ["backend"]}),
                ),
                user("worker", json!({"image": "a", "secrets": [{"name": "db"}]})),
            ],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        let err = s
            .delete(Kind::Secret, "db", "custom-default")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }));
        assert_eq!(
            err.to_string(),
            "Secret `db` is used by service/api, service/worker; remove those references first"
        );
        // `worker` lists no networks, so it uses the configured default, not the built-in name.
        let err = s
            .delete(Kind::Network, "backend", "custom-default")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("used by service/api;"), "{err}");
        s.delete(Kind::Network, "berth-internal", "custom-default")
            .await
            .unwrap();
        let err = s
            .delete(Kind::Network, "custom-default", "custom-default")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Protected { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("the default network cannot be deleted"));
        s.delete(Kind::Secret, "idle", "custom-default")
            .await
            .unwrap();
        // Missing objects are NotFound, not InUse, even when something refers to them.
        s.write(
            vec![user(
                "x",
                json!({"image": "a", "secrets": [{"name": "ghost"}]}),
            )],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        let err = s
            .delete(Kind::Secret, "ghost", "custom-default")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        // Once the references are gone, the delete goes through.
        s.delete(Kind::Service, "worker", "custom-default")
            .await
            .unwrap();
        s.write(
            vec![user("api", json!({"image": "a"}))],
            WriteMode::Replace,
            None,
            false,
        )
        .await
        .unwrap();
        s.delete(Kind::Secret, "db", "custom-default")
            .await
            .unwrap();
        s.delete(Kind::Network, "backend", "custom-default")
            .await
            .unwrap();
    }

    fn any(kind: &str, name: &str, spec: Value) -> DynObject {
        obj(
            json!({"apiVersion": "berth/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}),
        )
    }

    fn volume(name: &str, opts: Value) -> DynObject {
        any("Volume", name, json!({"driverOpts": opts}))
    }

    fn refused_paths(err: StoreError) -> Vec<String> {
        match err {
            StoreError::Refused { errors, .. } => errors.into_iter().map(|e| e.path).collect(),
            other => panic!("not refused by policy: {other}"),
        }
    }

    /// A Volume asking the `local` driver for a host bind mount (the node's root, its Docker
    /// socket) or a host device is refused, naming the option, and nothing is written (dry run
    /// or not, alone or in an apply with valid objects); `--allow-bind-mounts` lets it through.
    #[tokio::test]
    async fn bind_mounts_are_refused_unless_the_server_allows_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let root = volume(
            "rootfs",
            json!({"type": "none", "o": "bind", "device": "/"}),
        );
        let sock = volume(
            "sock",
            json!({"type": "none", "o": "bind", "device": "/var/run/docker.sock"}),
        );
        let disk = volume("disk", json!({"type": "ext4", "device": "/dev/sda1"}));
        let fine = volume("data", json!({}));
        for (v, want) in [
            (&root, vec!["spec.driverOpts.o", "spec.driverOpts.type"]),
            (&sock, vec!["spec.driverOpts.o", "spec.driverOpts.type"]),
            (&disk, vec!["spec.driverOpts.device"]),
        ] {
            for (mode, dry) in [(WriteMode::Create, true), (WriteMode::Upsert, false)] {
                let err = s
                    .write(vec![fine.clone(), v.clone()], mode, None, dry)
                    .await
                    .unwrap_err();
                let text = err.to_string();
                assert_eq!(err.status_and_reason(), (422, "Invalid"));
                assert_eq!(refused_paths(err), want, "{text}");
                assert!(text.contains("--allow-bind-mounts"), "{text}");
            }
        }
        assert!(s.list(Kind::Volume).unwrap().is_empty(), "nothing written");
        let open = Store::open(tempfile::tempdir().unwrap().path(), &test_key())
            .await
            .unwrap()
            .with_policy(Policy {
                allow_bind_mounts: true,
                ..Policy::default()
            });
        open.write(vec![root, sock, disk, fine], WriteMode::Create, None, false)
            .await
            .unwrap();
        assert_eq!(open.list(Kind::Volume).unwrap().len(), 4);
    }

    /// No object whose Swarm object is named after it may take a name of berth's own Swarm
    /// objects: the proxy's (configurable), the backup and exec agents', the engine's networks.
    #[tokio::test]
    async fn berths_own_swarm_names_are_reserved_for_every_kind_they_collide_with() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let spec = |kind: &str| match kind {
            "Service" => json!({"image": "a:1"}),
            "Secret" | "Config" => json!({"stringData": {"k": "v"}}),
            _ => json!({}),
        };
        for kind in ["Service", "Volume", "Network", "Secret", "Config"] {
            for name in [
                "berth-ingress",
                "berth-ingress-state",
                "berth-ingress-tls",
                "berth-transfer-01j",
                "berth-exec-01j",
            ] {
                let err = s
                    .write(
                        vec![any(kind, name, spec(kind))],
                        WriteMode::Upsert,
                        None,
                        false,
                    )
                    .await
                    .unwrap_err();
                let text = err.to_string();
                assert_eq!(
                    refused_paths(err),
                    ["metadata.name"],
                    "{kind}/{name}: {text}"
                );
                assert!(text.contains("is reserved"), "{text}");
            }
            // Only the name itself or `<proxy>-...`: a name that merely starts alike is fine.
            s.write(
                vec![any(kind, "berth-ingressive", spec(kind))],
                WriteMode::Upsert,
                None,
                false,
            )
            .await
            .unwrap();
        }
        for name in ["host", "bridge", "none", "ingress"] {
            let err = s
                .write(
                    vec![any("Network", name, json!({}))],
                    WriteMode::Create,
                    None,
                    false,
                )
                .await
                .unwrap_err();
            assert!(err.to_string().contains("engine's own networks"), "{err}");
        }
        // Kinds with no Swarm object of their name may use it.
        let ingress = json!({"rules": [{"host": "a.example.com",
            "paths": [{"path": "/", "service": "web", "port": 80}]}], "tls": {"secretRef": "t"}});
        s.write(
            vec![any("Ingress", "berth-ingress", ingress)],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        // A Service cannot mount the proxy's state volume by name either.
        let err = s
            .write(
                vec![any(
                    "Service",
                    "thief",
                    json!({"image": "a:1",
                    "volumes": [{"target": "/x", "volume": "berth-ingress-state"}]}),
                )],
                WriteMode::Create,
                None,
                false,
            )
            .await
            .unwrap_err();
        assert_eq!(refused_paths(err), ["spec.volumes[0].volume"]);
        // Another proxy name moves the reservation with it.
        let edge = Store::open(tempfile::tempdir().unwrap().path(), &test_key())
            .await
            .unwrap()
            .with_policy(Policy {
                ingress_proxy: "edge".into(),
                ..Policy::default()
            });
        let err = edge
            .write(
                vec![volume("edge-state", json!({}))],
                WriteMode::Create,
                None,
                false,
            )
            .await
            .unwrap_err();
        assert_eq!(refused_paths(err), ["metadata.name"]);
        edge.write(
            vec![volume("berth-ingress-state", json!({}))],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
    }

    /// Through the API: a 422 whose details name the object and the field.
    #[tokio::test]
    async fn the_api_answers_a_policy_refusal_with_field_details() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &test_key()).await.unwrap();
        let app = crate::server::router(crate::server::AppState::for_tests(store.clone()).await);
        let body = json!({"items": [{"apiVersion": "berth/v1", "kind": "Volume",
            "metadata": {"name": "rootfs"},
            "spec": {"driverOpts": {"type": "none", "o": "bind", "device": "/"}}}]});
        let req = axum::http::Request::post("/apis/berth/v1/apply")
            .header(
                "authorization",
                format!("Bearer {}", crate::server::TEST_ADMIN),
            )
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 422);
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let err: berth_api_types::wire::ErrorBody = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(err.reason, "Invalid");
        let paths: Vec<(Option<&str>, &str)> = err
            .details
            .iter()
            .map(|d| (d.object.as_deref(), d.path.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                (Some("Volume/rootfs"), "spec.driverOpts.o"),
                (Some("Volume/rootfs"), "spec.driverOpts.type")
            ]
        );
        assert!(store.list(Kind::Volume).unwrap().is_empty());
    }

    #[tokio::test]
    async fn default_network_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        assert!(ensure_network(&s, "berth-internal").await.unwrap());
        assert!(!ensure_network(&s, "berth-internal").await.unwrap());
        let n = s.get(Kind::Network, "berth-internal").unwrap().unwrap();
        assert_eq!(n.spec, json!({}));
        assert_eq!(n.metadata.generation, 1);
        assert_eq!(
            outbox_types(&s).await,
            vec![(EventType::Applied, "berth-internal".into(), 1)]
        );
        let err = ensure_network(&s, "Bad_Name").await.unwrap_err();
        assert!(err.to_string().contains("not a valid Network"), "{err}");
    }
}
