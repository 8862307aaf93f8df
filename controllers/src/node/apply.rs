//! Node, step 3: update one engine node to what its object wants, with the node's version index so
//! a concurrent change (by hand, or another manager) is never overwritten blindly: on a version
//! conflict the node is read again and the change recomputed from what it has now.

use super::build::{self, Member};
use super::dereference;
use crate::runtime::Error;
use crate::swarm::engine::message;
use berth_api_types::node::NodeSpec;
use bollard::query_parameters::UpdateNodeOptionsBuilder;
use bollard::Docker;
use std::collections::BTreeSet;
use tracing::info;

/// Tries before a conflict is left to the backoff policy.
const ATTEMPTS: usize = 3;

/// The engine's answer to an update made with an old version index.
fn is_version_conflict(e: &bollard::errors::Error) -> bool {
    message(e).contains("update out of sequence")
        || crate::swarm::engine::status_code(e) == Some(409)
}

/// Brings node `id` to `spec`; returns the node as it is afterwards (what status shows).
pub async fn update(
    docker: &Docker,
    name: &str,
    id: &str,
    spec: &NodeSpec,
    managed: &BTreeSet<String>,
) -> Result<Member, Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let node = docker.inspect_node(id).await?;
        let current = dereference::member(&node);
        let want = build::desired(&current, spec, managed);
        if !build::differs(&current, &want) {
            return Ok(want);
        }
        let version = node
            .version
            .as_ref()
            .and_then(|v| v.index)
            .ok_or_else(|| Error::Transient(format!("node {id} has no version index")))?;
        let engine_spec = build::engine_spec(&node.spec.clone().unwrap_or_default(), &want);
        match docker
            .update_node(
                id,
                engine_spec,
                UpdateNodeOptionsBuilder::new()
                    .version(version as i64)
                    .build(),
            )
            .await
        {
            Ok(()) => {
                info!(node = %name, role = want.role.as_str(), availability = want.availability.as_str(), "node updated");
                return Ok(want);
            }
            Err(e) if is_version_conflict(&e) && attempt < ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
