//! Registry, step 1: what the check needs: that this Registry is the one used for its server, and
//! its password from the Secret.

use crate::api::{ResourceStore, SecretReader};
use crate::runtime::Error;
use crate::swarm::pull::{self, Password};
use berth_api_types::registry::RegistrySpec;
use berth_api_types::Kind;

/// What dereferencing found.
pub enum Found {
    /// The password, and the Secret's resourceVersion it was read at.
    Password {
        password: String,
        secret_version: String,
    },
    /// An older Registry already serves this server: this one is not used.
    Duplicate(String),
    /// The Secret or its key is missing or unusable (the text never holds the value).
    SecretMissing(String),
}

pub async fn dereference(
    store: &dyn ResourceStore,
    secrets: &dyn SecretReader,
    name: &str,
    spec: &RegistrySpec,
) -> Result<Found, Error> {
    let host = spec.host();
    // One Registry per server: the oldest is used, later ones are reported and left alone.
    let all = store.list(Kind::Registry).await?;
    if let Some((used, _)) = pull::select(&all, &host) {
        if used.metadata.name != name {
            return Ok(Found::Duplicate(format!(
                "Registry `{}` already provides the credentials for {host}; this one is not used",
                used.metadata.name
            )));
        }
    }
    Ok(match pull::password(store, secrets, spec).await? {
        Password::Found {
            password,
            secret_version,
        } => Found::Password {
            password,
            secret_version,
        },
        Password::Missing(why) => Found::SecretMissing(why),
    })
}
