//! Network, step 3: bring the engine to the built request. Swarm networks are immutable, so a
//! changed spec is remove and re-create, and only while nothing uses the network.

use super::build::{self, Built};
use super::dereference::{named, Observed};
use crate::runtime::Error;
use crate::swarm::engine::{found, refusal, status_code};
use crate::swarm::Owner;
use bollard::errors::Error as DockerError;
use bollard::models::Network as SwarmNetwork;
use bollard::query_parameters::{InspectNetworkOptions, ListServicesOptions};
use bollard::Docker;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a create waits for Swarm's allocator before answering (it normally takes milliseconds).
const ALLOCATION_WAIT: Duration = Duration::from_secs(5);

/// Where the network stands after apply; `status.rs` turns it into conditions.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// berth's network matches the spec (it may still be waiting for Swarm's allocator).
    InPlace(SwarmNetwork),
    /// berth's network carries this spec's hash but differs from it: changed behind berth's back.
    Mismatch {
        network: SwarmNetwork,
        differences: Vec<String>,
    },
    /// The spec changed and the network must be re-created, but these still use it.
    InUse {
        network: SwarmNetwork,
        users: Vec<String>,
    },
    /// A network berth does not own has the name, or the engine refused the request.
    Refused(String),
}

pub async fn apply(
    docker: &Docker,
    owner: &Owner,
    name: &str,
    built: &Built,
    observed: Observed,
) -> Result<Outcome, Error> {
    // Swarm keeps network names unique, so there is at most one owned network; should there be more
    // (local-scope ones carrying our labels), the one made from this spec wins.
    let existing = observed
        .owned
        .iter()
        .find(|n| !build::needs_recreate(n, built))
        .or(observed.owned.first())
        .cloned();
    match existing {
        Some(ex) if !build::needs_recreate(&ex, built) => {
            if !build::allocated(&ex) {
                debug!("network not allocated yet");
                return Ok(Outcome::InPlace(ex));
            }
            let differences = build::differences(&ex, built);
            if differences.is_empty() {
                return Ok(Outcome::InPlace(ex));
            }
            warn!(
                ?differences,
                "Swarm network differs from the spec it was created from"
            );
            Ok(Outcome::Mismatch {
                network: ex,
                differences,
            })
        }
        Some(ex) => {
            let users = users(docker, &ex).await?;
            if !users.is_empty() {
                info!(?users, "spec changed but the network is in use: waiting");
                return Ok(Outcome::InUse { network: ex, users });
            }
            info!(id = ?ex.id, old = ?build::hash_of(&ex), new = %built.hash,
                "spec changed: re-creating the Swarm network");
            remove(docker, &ex).await?;
            create(docker, name, built).await
        }
        None => match observed.foreign.first() {
            // Never adopt or replace a network berth does not own.
            Some(f) => Ok(Outcome::Refused(owner.refusal(
                "network",
                name,
                f.labels.as_ref(),
            ))),
            None => create(docker, name, built).await,
        },
    }
}

/// Removes berth's networks for an object that is gone; refuses (backing off) while one is in use.
pub async fn remove_owned(
    docker: &Docker,
    name: &str,
    owned: &[SwarmNetwork],
) -> Result<(), Error> {
    for net in owned {
        let users = users(docker, net).await?;
        if !users.is_empty() {
            return Err(Error::Transient(format!(
                "network `{name}` is still in use by {}; removing it once nothing uses it",
                users.join(", ")
            )));
        }
        info!(id = ?net.id, "object gone: removing its Swarm network");
        remove(docker, net).await?;
    }
    Ok(())
}

/// What still uses the network: services whose tasks join it, and containers attached to it on
/// this node (other than those services' own tasks and the per-node load balancer endpoint).
async fn users(docker: &Docker, net: &SwarmNetwork) -> Result<Vec<String>, DockerError> {
    let id = net.id.as_deref().unwrap_or_default();
    let name = net.name.as_deref().unwrap_or_default();
    let services = docker.list_services(None::<ListServicesOptions>).await?;
    let services = build::services_using(id, name, &services);
    let containers = found(
        docker
            .inspect_network(id, None::<InspectNetworkOptions>)
            .await,
    )?
    .and_then(|n| n.containers)
    .unwrap_or_default();
    let mut containers: Vec<String> = containers
        .into_iter()
        .filter(|(key, _)| !key.starts_with("lb-"))
        .map(|(key, ep)| ep.name.unwrap_or(key))
        .filter(|c| !services.iter().any(|s| c.starts_with(&format!("{s}."))))
        .collect();
    containers.sort();
    Ok(services
        .into_iter()
        .map(|s| format!("service {s}"))
        .chain(containers.into_iter().map(|c| format!("container {c}")))
        .collect())
}

/// Removes the network; gone already is success. (Engine 20.10 answers 500, not 404, for a Swarm
/// network removed meanwhile, so a failure is checked against whether the network still exists.)
async fn remove(docker: &Docker, net: &SwarmNetwork) -> Result<(), DockerError> {
    let id = net.id.as_deref().unwrap_or_default();
    match docker.remove_network(id).await {
        Ok(()) => Ok(()),
        Err(e) if status_code(&e) == Some(404) => Ok(()),
        Err(e) => {
            let still_there = found(
                docker
                    .inspect_network(id, None::<InspectNetworkOptions>)
                    .await,
            )?
            .is_some();
            if still_there {
                Err(e)
            } else {
                Ok(())
            }
        }
    }
}

/// Creates the network and waits briefly for Swarm's allocator.
async fn create(docker: &Docker, name: &str, built: &Built) -> Result<Outcome, Error> {
    let id = match docker.create_network(built.request.clone()).await {
        Ok(created) => created.id,
        Err(e) if status_code(&e) == Some(400) => {
            return Ok(Outcome::Refused(refusal("network", &e)))
        }
        // 409 included: someone created the name meanwhile; the next attempt sees who.
        Err(e) => return Err(e.into()),
    };
    info!(%id, hash = %built.hash, "created Swarm network");
    // The engine reports driver and options only once Swarm has allocated the network.
    let deadline = tokio::time::Instant::now() + ALLOCATION_WAIT;
    loop {
        let now = named(docker, name)
            .await?
            .into_iter()
            .find(|n| n.id.as_deref() == Some(id.as_str()))
            .ok_or_else(|| {
                Error::Transient(format!(
                    "network `{name}` vanished right after it was created"
                ))
            })?;
        if build::allocated(&now) || tokio::time::Instant::now() >= deadline {
            return Ok(Outcome::InPlace(now));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
