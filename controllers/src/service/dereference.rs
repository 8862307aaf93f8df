//! Service, step 1: everything the spec names, as it exists in Swarm — each Secret and Config key
//! materialised as a content-addressed Swarm secret or config (`swarm::files`), Volume specs, the
//! Swarm IDs of its Networks — plus the image's pull credentials and the digest its tag names now.
//!
//! A changed value is a new Swarm name, the service is updated onto it (a rolling update, no manual
//! restart), and the old one is collected once no service uses it.

use crate::api::{ResourceStore, SecretReader};
use crate::runtime::Error;
use crate::swarm::engine::{found, message};
use crate::swarm::files::swarm_name;
use crate::swarm::pull::{self, PullAuth, PullAuthLookup};
use crate::swarm::{FileKind, Owner, SwarmFile, SwarmFiles};
use berth_api_types::image::ImageRef;
use berth_api_types::names::labels;
use berth_api_types::service::{FileRef, ServiceSpec};
use berth_api_types::volume::VolumeSpec;
use berth_api_types::Kind;
use bollard::query_parameters::InspectNetworkOptions;
use bollard::Docker;
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::debug;

/// How long the registry is given to tell a digest or explain a failing pull.
pub const REGISTRY_QUESTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `build` needs besides the Service itself.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// One per `spec.secrets` entry, same order.
    pub secrets: Vec<SwarmFile>,
    /// One per `spec.configs` entry, same order.
    pub configs: Vec<SwarmFile>,
    /// Volume objects by name.
    pub volumes: BTreeMap<String, VolumeSpec>,
    /// Swarm network IDs to attach, in the order listed (the engine stores IDs, not names).
    pub networks: Vec<String>,
}

/// What resolving a Service's dependencies found.
pub enum Deps {
    Ready(Resolved),
    /// Something does not exist yet; the reasons name it. `soon`: it is being created (poll).
    Waiting {
        reasons: Vec<String>,
        soon: bool,
    },
}

/// What the step needs from the controller.
pub struct Sources<'a> {
    pub docker: &'a Docker,
    pub store: &'a dyn ResourceStore,
    pub secrets: &'a dyn SecretReader,
    pub files: &'a SwarmFiles,
    pub owner: &'a Owner,
    pub default_network: &'a str,
}

/// Resolves the spec's dependencies. `Err(Refused)`: something exists that berth may not use (a
/// Swarm object it does not own).
pub async fn dependencies(src: &Sources<'_>, spec: &ServiceSpec) -> Result<Deps, Error> {
    let mut resolved = Resolved::default();
    let mut waiting = Vec::new();
    let mut soon = false;
    for (kind, refs) in [
        (FileKind::Secret, &spec.secrets),
        (FileKind::Config, &spec.configs),
    ] {
        for r in refs {
            let Some(files) = src.secrets.data(kind.kind(), &r.name).await? else {
                waiting.push(format!("{} `{}` does not exist", kind.kind(), r.name));
                continue;
            };
            let (key, value) = match pick_key(kind, &files, r) {
                Ok(kv) => kv,
                Err(why) => {
                    waiting.push(why);
                    continue;
                }
            };
            // The API server sends a digest per key; one without is a server older than this
            // controller (it named files by a plain hash): wait for it rather than guess.
            let Some(digest) = files.digests.get(key) else {
                waiting.push(format!(
                    "the API server sent no digest for key `{key}` of {} `{}` (upgrade the API server)",
                    kind.kind(),
                    r.name
                ));
                continue;
            };
            let name = swarm_name(&r.name, key, digest);
            let labels = src
                .owner
                .for_kind(kind.kind())
                .labels_with(&r.name, &[(labels::KEY, key)]);
            match src
                .files
                .ensure(kind, &name, value, labels, src.owner)
                .await?
            {
                Ok(f) => match kind {
                    FileKind::Secret => resolved.secrets.push(f),
                    FileKind::Config => resolved.configs.push(f),
                },
                Err(refusal) => return Err(Error::refused("Refused", refusal)),
            }
        }
    }
    for name in spec.references(Kind::Volume) {
        match src.store.get(Kind::Volume, name).await? {
            Some(obj) => match serde_json::from_value::<VolumeSpec>(obj.spec) {
                Ok(v) => {
                    resolved.volumes.insert(name.to_string(), v);
                }
                Err(e) => waiting.push(format!("Volume `{name}` is unreadable: {e}")),
            },
            None => waiting.push(format!("Volume `{name}` does not exist")),
        }
    }
    let networks = if spec.networks.is_empty() {
        vec![src.default_network.to_string()]
    } else {
        spec.networks.clone()
    };
    let network_owner = src.owner.for_kind(Kind::Network);
    for name in &networks {
        let Some(network) = src.store.get(Kind::Network, name).await? else {
            waiting.push(format!("Network `{name}` does not exist"));
            continue;
        };
        // The Network controller reports the ID of the Swarm network it made for the object (and
        // only of its own): no engine lookup per reconcile. Until it has, ask the engine.
        if let Some(id) = network.status.get("networkId").and_then(|v| v.as_str()) {
            resolved.networks.push(id.to_string());
            continue;
        }
        let net = found(
            src.docker
                .inspect_network(name, None::<InspectNetworkOptions>)
                .await,
        )?;
        match net {
            Some(n) => {
                if !network_owner.same_installation(n.labels.as_ref())
                    || n.name.as_deref() != Some(name.as_str())
                {
                    return Err(Error::refused(
                        "Refused",
                        format!("the Swarm network `{name}` is not this berth installation's"),
                    ));
                }
                resolved.networks.push(n.id.unwrap_or_default());
            }
            None => {
                waiting.push(format!("Network `{name}` is being created"));
                soon = true;
            }
        }
    }
    Ok(if waiting.is_empty() {
        Deps::Ready(resolved)
    } else {
        Deps::Waiting {
            reasons: waiting,
            soon,
        }
    })
}

/// The image's registry credentials, if a Registry provides them. A Registry whose password
/// cannot be read refuses the Service (it waits for the Registry or its Secret to change).
pub async fn pull_auth(src: &Sources<'_>, image: &ImageRef) -> Result<PullAuthLookup, Error> {
    match pull::for_image(src.store, src.secrets, image).await? {
        PullAuthLookup::Broken {
            registry,
            host,
            why,
        } => Err(Error::refused(
            "RegistryCredentialsMissing",
            format!("cannot read the credentials of Registry `{registry}` for {host}: {why}"),
        )),
        other => Ok(other),
    }
}

/// The digest the registry serves for `image` now, asked through the engine with the Registry's
/// credentials. `None` when the registry does not say (the engine then pulls the tag).
pub async fn resolve_digest(docker: &Docker, image: &ImageRef, auth: &PullAuth) -> Option<String> {
    let answer = tokio::time::timeout(
        REGISTRY_QUESTION_TIMEOUT,
        docker.inspect_registry_image(image.as_str(), Some(auth.credentials.clone())),
    )
    .await;
    match answer {
        Ok(Ok(d)) => Some(d.descriptor.digest?).filter(|d| d.starts_with("sha256:")),
        Ok(Err(e)) => {
            debug!(%image, error = %message(&e), "cannot resolve the image digest");
            None
        }
        Err(_) => {
            debug!(%image, "the registry did not tell the image digest in time");
            None
        }
    }
}

/// Which key of the object a reference mounts: the one named, or the only one there is.
pub fn pick_key<'a>(
    kind: FileKind,
    files: &'a BTreeMap<String, Vec<u8>>,
    r: &FileRef,
) -> Result<(&'a str, &'a [u8]), String> {
    let what = kind.kind();
    match &r.key {
        Some(k) => files
            .get_key_value(k)
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .ok_or_else(|| {
                format!(
                    "{what} `{}` has no key `{k}` (keys: {})",
                    r.name,
                    files.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }),
        None if files.len() == 1 => {
            let (k, v) = files.iter().next().expect("one entry");
            Ok((k.as_str(), v.as_slice()))
        }
        None => Err(format!(
            "{what} `{}` has {} keys ({}); say which with `key`",
            r.name,
            files.len(),
            files.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::build::file_target;

    fn fref(name: &str, key: Option<&str>) -> FileRef {
        FileRef {
            name: name.into(),
            key: key.map(Into::into),
            target: None,
            uid: None,
            gid: None,
            mode: None,
        }
    }

    #[test]
    fn key_choice() {
        let one = BTreeMap::from([("pw".to_string(), b"x".to_vec())]);
        assert_eq!(
            pick_key(FileKind::Secret, &one, &fref("db", None))
                .unwrap()
                .0,
            "pw"
        );
        let two = BTreeMap::from([("a".to_string(), vec![]), ("b".to_string(), vec![])]);
        let e = pick_key(FileKind::Secret, &two, &fref("db", None)).unwrap_err();
        assert_eq!(e, "Secret `db` has 2 keys (a, b); say which with `key`");
        let e = pick_key(FileKind::Config, &two, &fref("app", Some("c"))).unwrap_err();
        assert_eq!(e, "Config `app` has no key `c` (keys: a, b)");
        assert_eq!(
            pick_key(FileKind::Config, &two, &fref("app", Some("b")))
                .unwrap()
                .0,
            "b"
        );
    }

    #[test]
    fn targets() {
        let mut r = fref("nginx", None);
        assert_eq!(file_target(FileKind::Config, &r), "/nginx");
        assert_eq!(file_target(FileKind::Secret, &r), "nginx");
        r.target = Some("/etc/nginx.conf".into());
        assert_eq!(file_target(FileKind::Config, &r), "/etc/nginx.conf");
    }
}
