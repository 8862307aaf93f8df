//! Network, step 1: what the engine has under the object's name, split into berth's own network for
//! this object and anyone else's.

use crate::swarm::Owner;
use bollard::errors::Error as DockerError;
use bollard::models::Network as SwarmNetwork;
use bollard::query_parameters::ListNetworksOptions;
use bollard::Docker;
use std::collections::HashMap;

/// The engine's networks named like the object.
pub struct Observed {
    /// This installation's, for this object (normally at most one).
    pub owned: Vec<SwarmNetwork>,
    /// Anyone else's: never adopted, replaced or removed.
    pub foreign: Vec<SwarmNetwork>,
}

/// Every network named exactly `name`, whoever owns it and whatever its scope. The engine's `name`
/// filter matches substrings, hence the exact comparison.
pub async fn named(docker: &Docker, name: &str) -> Result<Vec<SwarmNetwork>, DockerError> {
    Ok(docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(HashMap::from([(
                "name".to_string(),
                vec![name.to_string()],
            )])),
        }))
        .await?
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(name))
        .collect())
}

pub async fn observe(docker: &Docker, owner: &Owner, name: &str) -> Result<Observed, DockerError> {
    let (owned, foreign) = named(docker, name)
        .await?
        .into_iter()
        .partition(|n| owner.owns(n.labels.as_ref(), name));
    Ok(Observed { owned, foreign })
}
