//! Which Registry an image is pulled with, and reading its password. Shared by the Registry
//! controller (which checks the credentials) and the Service controller (which sends them with every
//! create and update), so both agree on which Registry serves a server.

use crate::api::{ClientError, ResourceStore, SecretReader};
use berth_api_types::image::{ImageRef, DOCKER_HUB};
use berth_api_types::meta::condition;
use berth_api_types::registry::{conditions, RegistrySpec, RegistryStatus};
use berth_api_types::{Condition, DynObject, Kind};
use bollard::auth::DockerCredentials;
use std::fmt;

/// The Registry used for `host`: the oldest one that names it (ties: by name). Later ones naming the
/// same server are duplicates, reported as such and never used.
pub fn select<'a>(
    registries: &'a [DynObject],
    host: &str,
) -> Option<(&'a DynObject, RegistrySpec)> {
    registries
        .iter()
        .filter_map(|o| {
            let spec: RegistrySpec = serde_json::from_value(o.spec.clone()).ok()?;
            (spec.host() == host).then_some((o, spec))
        })
        .min_by(|(a, _), (b, _)| {
            (a.metadata.creation_timestamp, &a.metadata.name)
                .cmp(&(b.metadata.creation_timestamp, &b.metadata.name))
        })
}

/// A Registry's password, read from its Secret.
pub enum Password {
    Found {
        password: String,
        /// The Secret's resourceVersion: changes whenever the password may have.
        secret_version: String,
    },
    /// The Secret or key is missing or unusable; the text says which, never the value.
    Missing(String),
}

pub async fn password(
    store: &dyn ResourceStore,
    secrets: &dyn SecretReader,
    spec: &RegistrySpec,
) -> Result<Password, ClientError> {
    let r = &spec.password_secret_ref;
    let Some(secret) = store.get(Kind::Secret, &r.name).await? else {
        return Ok(Password::Missing(format!(
            "Secret `{}` does not exist",
            r.name
        )));
    };
    let Some(files) = secrets.data(Kind::Secret, &r.name).await? else {
        return Ok(Password::Missing(format!(
            "Secret `{}` does not exist",
            r.name
        )));
    };
    let Some(bytes) = files.get(&r.key) else {
        let keys: Vec<&str> = files.keys().map(String::as_str).collect();
        return Ok(Password::Missing(format!(
            "Secret `{}` has no key `{}` (it has: {})",
            r.name,
            r.key,
            keys.join(", ")
        )));
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(Password::Missing(format!(
            "key `{}` of Secret `{}` is not UTF-8 text",
            r.key, r.name
        )));
    };
    // As `docker login --password-stdin` does: a file written with `echo` ends in a newline that is
    // not part of the password.
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if text.is_empty() {
        return Ok(Password::Missing(format!(
            "key `{}` of Secret `{}` is empty",
            r.key, r.name
        )));
    }
    Ok(Password::Found {
        password: text.to_string(),
        secret_version: secret.metadata.resource_version.unwrap_or_default(),
    })
}

/// The engine's registry-auth document for these credentials.
pub fn docker_credentials(spec: &RegistrySpec, password: &str) -> DockerCredentials {
    let host = spec.host();
    // The engine keys Docker Hub credentials by its v1 index URL, as `docker login` stores them.
    let serveraddress = if host == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        host
    };
    DockerCredentials {
        username: Some(spec.username.clone()),
        password: Some(password.to_string()),
        email: spec.email.clone(),
        serveraddress: Some(serveraddress),
        ..Default::default()
    }
}

/// Credentials a Service's image is pulled with.
pub struct PullAuth {
    /// The Registry object's name.
    pub registry: String,
    pub host: String,
    pub credentials: DockerCredentials,
    /// Changes whenever the credentials may have (Registry uid and generation, Secret version); never
    /// derived from the password itself, so it can be stored and logged.
    pub fingerprint: String,
    /// The Registry's `Authenticated` condition, if checked for this generation and password.
    pub authenticated: Option<Condition>,
}

impl fmt::Debug for PullAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullAuth")
            .field("registry", &self.registry)
            .field("host", &self.host)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

pub enum PullAuthLookup {
    /// No Registry names the image's server: the engine pulls anonymously.
    Anonymous {
        host: String,
    },
    Ready(Box<PullAuth>),
    /// A Registry names the server but its password cannot be read.
    Broken {
        registry: String,
        host: String,
        why: String,
    },
}

/// The credentials for pulling `image`, if a Registry provides them.
pub async fn for_image(
    store: &dyn ResourceStore,
    secrets: &dyn SecretReader,
    image: &ImageRef,
) -> Result<PullAuthLookup, ClientError> {
    let host = image.registry_host();
    let registries = store.list(Kind::Registry).await?;
    let Some((obj, spec)) = select(&registries, &host) else {
        return Ok(PullAuthLookup::Anonymous { host });
    };
    let registry = obj.metadata.name.clone();
    match password(store, secrets, &spec).await? {
        Password::Missing(why) => Ok(PullAuthLookup::Broken {
            registry,
            host,
            why,
        }),
        Password::Found {
            password,
            secret_version,
        } => {
            let status: RegistryStatus =
                serde_json::from_value(obj.status.clone()).unwrap_or_default();
            let current = status.observed_generation == Some(obj.metadata.generation)
                && status.secret_resource_version.as_deref() == Some(secret_version.as_str());
            let authenticated = current
                .then(|| condition(&status.conditions, conditions::AUTHENTICATED).cloned())
                .flatten();
            Ok(PullAuthLookup::Ready(Box::new(PullAuth {
                registry,
                host,
                credentials: docker_credentials(&spec, &password),
                fingerprint: format!(
                    "{}/{}/{secret_version}",
                    obj.metadata.uid.as_deref().unwrap_or_default(),
                    obj.metadata.generation
                ),
                authenticated,
            })))
        }
    }
}

/// Whether an engine or registry error says credentials are missing or wrong (rather than, say,
/// that the tag does not exist).
pub fn asks_for_credentials(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "no basic auth credentials",
        "unauthorized",
        "authentication required",
        "access denied",
        "denied",
        "401",
    ]
    .iter()
    .any(|n| m.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::registry::SecretKeyRef;
    use chrono::TimeZone;
    use serde_json::json;

    fn reg(name: &str, server: &str, created: i64) -> DynObject {
        let mut o: DynObject = serde_json::from_value(json!({
            "apiVersion": berth_api_types::API_VERSION, "kind": "Registry",
            "metadata": {"name": name},
            "spec": {"server": server, "username": "u",
                     "passwordSecretRef": {"name": "p", "key": "k"}}
        }))
        .unwrap();
        o.metadata.creation_timestamp = Some(chrono::Utc.timestamp_opt(created, 0).unwrap());
        o
    }

    #[test]
    fn the_oldest_registry_for_a_server_wins() {
        let all = vec![
            reg("newer", "127.0.0.1:5000", 200),
            reg("other", "registry.example.com", 50),
            reg("older", "127.0.0.1:5000", 100),
        ];
        assert_eq!(
            select(&all, "127.0.0.1:5000").unwrap().0.metadata.name,
            "older"
        );
        assert_eq!(
            select(&all, "registry.example.com")
                .unwrap()
                .0
                .metadata
                .name,
            "other"
        );
        assert!(select(&all, "docker.io").is_none());
        let hub = vec![reg("hub", "index.docker.io", 1)];
        assert_eq!(select(&hub, "docker.io").unwrap().0.metadata.name, "hub");
    }

    #[test]
    fn engine_credentials() {
        let spec = RegistrySpec {
            server: "127.0.0.1:5000".into(),
            username: "ci".into(),
            password_secret_ref: SecretKeyRef {
                name: "p".into(),
                key: "k".into(),
            },
            email: None,
        };
        let c = docker_credentials(&spec, "pw");
        assert_eq!(c.serveraddress.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref()),
            (Some("ci"), Some("pw"))
        );
        let hub = RegistrySpec {
            server: "docker.io".into(),
            ..spec
        };
        assert_eq!(
            docker_credentials(&hub, "pw").serveraddress.as_deref(),
            Some("https://index.docker.io/v1/")
        );
    }

    #[test]
    fn credential_errors() {
        assert!(asks_for_credentials(
            "Head \"http://127.0.0.1:5055/v2/team/app/manifests/1\": no basic auth credentials"
        ));
        assert!(asks_for_credentials(
            "pull access denied for x, repository does not exist or may require 'docker login'"
        ));
        assert!(!asks_for_credentials("manifest unknown: manifest unknown"));
    }

    #[test]
    fn debug_output_has_no_password() {
        let auth = PullAuth {
            registry: "team".into(),
            host: "h".into(),
            credentials: DockerCredentials {
                password: Some("hunter2".into()),
                ..Default::default()
            },
            fingerprint: "f".into(),
            authenticated: None,
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }
}
