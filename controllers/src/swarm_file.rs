//! Swarm secrets and configs that berth creates: found by exact name, created with berth's labels,
//! and never adopted from anyone else. Shared by the service controller (the materialised keys of
//! Secrets and Configs) and the ingress controller (the proxy's config, certificates and CA).
//!
//! Swarm secrets and configs are immutable, so callers name them by content hash: "ensure" either
//! finds the one with that name or creates it.

use crate::engine::{refusal, status_code};
use berth_api_types::Kind;
use bollard::errors::Error as DockerError;
use bollard::models::{ConfigSpec, SecretSpec};
use bollard::query_parameters::{ListConfigsOptions, ListSecretsOptions};
use bollard::Docker;
use std::collections::HashMap;

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
pub async fn find(
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

/// Makes sure the Swarm secret or config `name` exists and is ours (`owns` its labels), creating it
/// with `data` and `labels` if it does not. `Ok(Err(why))`: it can never be used (someone else's, or
/// the engine refuses it), for a status condition rather than a retry.
pub async fn ensure(
    docker: &Docker,
    kind: FileKind,
    name: &str,
    data: &[u8],
    labels: HashMap<String, String>,
    owns: impl Fn(&HashMap<String, String>) -> bool,
) -> Result<Result<SwarmFile, String>, DockerError> {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
    for attempt in 0..2 {
        if let Some((id, l)) = find(docker, kind, name).await? {
            return Ok(if owns(&l) {
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
