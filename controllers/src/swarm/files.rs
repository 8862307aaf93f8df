//! Swarm secrets and configs that berth creates: content-addressed names, found by exact name,
//! created with berth's labels, never adopted from anyone else, and collected by one garbage
//! collector with one grace rule. The service controller materialises the keys of Secrets and
//! Configs here; the ingress controller its proxy's config, certificates and CA.
//!
//! Swarm secrets and configs are immutable, so callers name them by content hash: "ensure" either
//! finds the one with that name or creates it, and a changed value is a new name.

use super::engine::{refusal, status_code};
use super::owner::{Filters, Labels, Owner};
use berth_api_types::Kind;
use bollard::errors::Error as DockerError;
use bollard::models::{ConfigSpec, SecretSpec};
use bollard::query_parameters::{ListConfigsOptions, ListSecretsOptions};
use bollard::Docker;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::info;

/// A file created this recently is never collected, referenced or not: another reconcile may be
/// about to update a service onto it.
pub const GC_GRACE: Duration = Duration::from_secs(60);

/// The longest name the engine accepts for a secret or config.
pub const MAX_SWARM_NAME: usize = 64;

/// Which Swarm object family a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Secret,
    Config,
}

impl FileKind {
    /// The berth kind whose values such a file holds.
    pub fn kind(self) -> Kind {
        match self {
            FileKind::Secret => Kind::Secret,
            FileKind::Config => Kind::Config,
        }
    }

    /// `secret` or `config`, for messages.
    pub fn word(self) -> &'static str {
        self.kind().lower()
    }
}

/// A Swarm secret or config, as a service mounts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwarmFile {
    pub id: String,
    pub name: String,
}

/// (id, labels) of the Swarm secret or config named exactly `name` (the engine's name filter also
/// matches prefixes).
async fn find(
    docker: &Docker,
    kind: FileKind,
    name: &str,
) -> Result<Option<(String, HashMap<String, String>)>, DockerError> {
    let filters = Some(HashMap::from([(
        "name".to_string(),
        vec![name.to_string()],
    )]));
    Ok(match kind {
        FileKind::Secret => docker
            .list_secrets(Some(ListSecretsOptions { filters }))
            .await?
            .into_iter()
            .filter_map(|s| Some((s.id?, s.spec?)))
            .find(|(_, sp)| sp.name.as_deref() == Some(name))
            .map(|(id, sp)| (id, sp.labels.unwrap_or_default())),
        FileKind::Config => docker
            .list_configs(Some(ListConfigsOptions { filters }))
            .await?
            .into_iter()
            .filter_map(|c| Some((c.id?, c.spec?)))
            .find(|(_, sp)| sp.name.as_deref() == Some(name))
            .map(|(id, sp)| (id, sp.labels.unwrap_or_default())),
    })
}

/// Makes sure the Swarm secret or config `name` exists and is this installation's, creating it with
/// `data` and `labels` if it does not. `Ok(Err(why))`: it can never be used (someone else's, or the
/// engine refuses it), for a status condition rather than a retry.
async fn ensure(
    docker: &Docker,
    kind: FileKind,
    name: &str,
    data: &[u8],
    labels: Labels,
    owner: &Owner,
) -> Result<Result<SwarmFile, String>, DockerError> {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
    for attempt in 0..2 {
        if let Some((id, l)) = find(docker, kind, name).await? {
            return Ok(if owner.same_installation(Some(&l)) {
                Ok(SwarmFile {
                    id,
                    name: name.to_string(),
                })
            } else {
                Err(format!(
                    "a Swarm {} named `{name}` exists that this berth installation does not own",
                    kind.word()
                ))
            });
        }
        let created = match kind {
            FileKind::Secret => {
                docker
                    .create_secret(SecretSpec {
                        name: Some(name.to_string()),
                        labels: Some(labels.clone()),
                        data: Some(encoded.clone()),
                        ..Default::default()
                    })
                    .await
            }
            FileKind::Config => {
                docker
                    .create_config(ConfigSpec {
                        name: Some(name.to_string()),
                        labels: Some(labels.clone()),
                        data: Some(encoded.clone()),
                        ..Default::default()
                    })
                    .await
            }
        };
        match created {
            Ok(r) => {
                tracing::info!(%name, "created Swarm {}", kind.word());
                return Ok(Ok(SwarmFile {
                    id: r.id,
                    name: name.to_string(),
                }));
            }
            // Created concurrently by another reconcile: look it up again.
            Err(e) if status_code(&e) == Some(409) && attempt == 0 => continue,
            // The engine will never accept this one.
            Err(e) if status_code(&e) == Some(400) => return Ok(Err(refusal(kind.word(), &e))),
            Err(e) => return Err(e),
        }
    }
    Err(DockerError::DockerResponseServerError {
        status_code: 409,
        message: format!(
            "the Swarm {} `{name}` conflicts but cannot be found",
            kind.word()
        ),
    })
}

/// The Swarm name of one key's content: `<object>-<12 hex of sha256(key, digest)>`, where `digest` is
/// the API server's keyed digest of the value (`DataFiles::digests`), never the value itself: a
/// Swarm name is visible to anyone who can list secrets, and a plain hash of a short value could be
/// checked against guesses offline. Content-addressed all the same, so the same value is never
/// created twice and a new value never reuses a name. The digest changes with the master key, so a
/// key rotation (or the upgrade from names of plain hashes) is a new name per key, rolled out and
/// collected like a changed value.
///
/// Object names may be 63 characters but the engine takes at most 64 for the whole name, so a longer
/// object name is cut to fit; the full name then goes into the hash too, so two objects that share
/// the cut prefix still get different names. Names that fit are as they always were.
pub fn swarm_name(object: &str, key: &str, digest: &str) -> String {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0u8]);
    h.update(digest.as_bytes());
    let keep = MAX_SWARM_NAME - 13;
    let prefix = if object.len() > keep {
        h.update([0u8]);
        h.update(object.as_bytes());
        let cut = (0..=keep)
            .rev()
            .find(|&i| object.is_char_boundary(i))
            .unwrap_or(0);
        &object[..cut]
    } else {
        object
    };
    format!("{prefix}-{}", &hex::encode(h.finalize())[..12])
}

/// Names and IDs of every secret and config some Swarm service mounts (anyone's service: a file in
/// use is never collected, whoever uses it).
pub async fn mounted_by_services(docker: &Docker) -> Result<HashSet<String>, DockerError> {
    let services = docker
        .list_services(None::<bollard::query_parameters::ListServicesOptions>)
        .await?;
    let mut used = HashSet::new();
    for s in &services {
        let c = s
            .spec
            .as_ref()
            .and_then(|sp| sp.task_template.as_ref())
            .and_then(|t| t.container_spec.as_ref());
        for f in c.and_then(|c| c.secrets.as_ref()).into_iter().flatten() {
            used.extend(f.secret_id.clone());
            used.extend(f.secret_name.clone());
        }
        for f in c.and_then(|c| c.configs.as_ref()).into_iter().flatten() {
            used.extend(f.config_id.clone());
            used.extend(f.config_name.clone());
        }
    }
    Ok(used)
}

/// The files one controller creates, and their garbage collector. It remembers what it created in
/// the last [`GC_GRACE`], so a file made for an update still in flight is never collected.
pub struct SwarmFiles {
    docker: Docker,
    fresh: Mutex<HashMap<String, Instant>>,
    grace: Duration,
}

impl SwarmFiles {
    pub fn new(docker: Docker) -> Self {
        SwarmFiles::with_grace(docker, GC_GRACE)
    }

    /// Another grace than [`GC_GRACE`] (tests that watch collection happen).
    pub fn with_grace(docker: Docker, grace: Duration) -> Self {
        SwarmFiles {
            docker,
            fresh: Mutex::default(),
            grace,
        }
    }

    /// Makes sure the file `name` holds `data` and is `owner`'s installation's (see [`ensure`]).
    pub async fn ensure(
        &self,
        kind: FileKind,
        name: &str,
        data: &[u8],
        labels: Labels,
        owner: &Owner,
    ) -> Result<Result<SwarmFile, String>, DockerError> {
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Instant::now());
        ensure(&self.docker, kind, name, data, labels, owner).await
    }

    /// Files a service now mounts need no grace any more: the engine itself keeps them.
    pub fn settled<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        for n in names {
            fresh.remove(n);
        }
    }

    /// Removes every file of `kind` that `filters` select and that is neither in `keep` (by name or
    /// ID) nor created within the grace. Returns how many went.
    pub async fn collect(
        &self,
        kind: FileKind,
        filters: Filters,
        keep: &HashSet<String>,
    ) -> Result<usize, DockerError> {
        let protected: HashSet<String> = {
            let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
            fresh.retain(|_, at| at.elapsed() < self.grace);
            fresh.keys().cloned().collect()
        };
        let candidates: Vec<(String, String)> = match kind {
            FileKind::Secret => self
                .docker
                .list_secrets(Some(ListSecretsOptions {
                    filters: Some(filters),
                }))
                .await?
                .into_iter()
                .filter_map(|s| Some((s.id?, s.spec?.name?)))
                .collect(),
            FileKind::Config => self
                .docker
                .list_configs(Some(ListConfigsOptions {
                    filters: Some(filters),
                }))
                .await?
                .into_iter()
                .filter_map(|c| Some((c.id?, c.spec?.name?)))
                .collect(),
        };
        let mut removed = 0;
        for (id, name) in candidates {
            if keep.contains(&id) || keep.contains(&name) || protected.contains(&name) {
                continue;
            }
            let result = match kind {
                FileKind::Secret => self.docker.delete_secret(&id).await,
                FileKind::Config => self.docker.delete_config(&id).await,
            };
            match result {
                Ok(()) => {
                    removed += 1;
                    info!(%name, "removed an unused Swarm {}", kind.word());
                }
                // In use after all (a service updated meanwhile) or already gone: fine.
                Err(e) if matches!(status_code(&e), Some(400 | 404 | 409)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_content_addressed() {
        let a = swarm_name("db", "password", "d-one");
        assert!(a.starts_with("db-") && a.len() == "db-".len() + 12, "{a}");
        assert_eq!(a, swarm_name("db", "password", "d-one"));
        assert_ne!(a, swarm_name("db", "password", "d-two"));
        assert_ne!(
            a,
            swarm_name("db", "user", "d-one"),
            "same value under another key"
        );
        // The longest object names still give names the engine accepts, and distinct ones.
        let long_a = format!("{}a", "x".repeat(62));
        let long_b = format!("{}b", "x".repeat(62));
        let na = swarm_name(&long_a, "k", "d-v");
        let nb = swarm_name(&long_b, "k", "d-v");
        assert_eq!(na.len(), MAX_SWARM_NAME, "{na}");
        assert_eq!(na[..51], long_a[..51]);
        assert_ne!(na, nb, "objects sharing the cut prefix");
        let fits = "y".repeat(51);
        assert_eq!(swarm_name(&fits, "k", "d-v").len(), MAX_SWARM_NAME);
        assert!(swarm_name(&fits, "k", "d-v").starts_with(&format!("{fits}-")));
    }
}
