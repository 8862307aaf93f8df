//! Ingress, step 1: every valid Ingress, the Services they route to (their networks, the ports
//! their images declare and the addresses of their tasks) and the TLS Secrets they name, planned
//! into routes (`build::plan`).

use super::build::{self, Backend, Candidate, Plan};
use super::IngressController;
use crate::runtime::{Cached, Error};
use crate::swarm::engine::status_code;
use berth_api_types::service::ServiceSpec;
use berth_api_types::Kind;
use bollard::query_parameters::InspectNetworkOptions;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tracing::debug;

/// The endpoint addresses of `service`'s tasks in a verbose network inspect's `Services`.
pub fn task_addresses(services: &Value, service: &str) -> BTreeSet<String> {
    services
        .get(service)
        .and_then(|s| s.get("Tasks"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("EndpointIP").and_then(Value::as_str))
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .map(str::to_string)
        .collect()
}

impl IngressController {
    /// TCP ports the image declares (`EXPOSE`), if it can be inspected on this engine and declares
    /// any. An image that declares none is not held to it: many never say.
    pub(super) async fn exposed_ports(&self, image: &str) -> Option<BTreeSet<u32>> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Some(
                i.config
                    .and_then(|c| c.exposed_ports)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()))
                    .collect::<BTreeSet<u32>>(),
            )
            .filter(|ports| !ports.is_empty()),
            Err(e) => {
                if status_code(&e) != Some(404) {
                    debug!(%image, error = %e, "cannot inspect a backend's image");
                }
                None
            }
        }
    }

    /// The services on a network and their tasks' endpoints, as this node's view of the network
    /// (`docker network inspect -v`) has them: every node's tasks once this node has joined the
    /// network (a proxy task here does). Nothing when the network is not known here: the proxy then
    /// simply has no health memory for those backends (see `build::proxy_handler`).
    async fn network_services(&self, network: &str) -> Value {
        let options = InspectNetworkOptions {
            verbose: true,
            ..Default::default()
        };
        match self.docker.inspect_network(network, Some(options)).await {
            Ok(n) => serde_json::to_value(n.services.unwrap_or_default()).unwrap_or_default(),
            Err(e) => {
                debug!(%network, error = %e, "cannot list the network's task endpoints");
                Value::Null
            }
        }
    }

    /// Reads and checks every Ingress, the Services and Secrets they name, and plans the routes.
    pub(super) async fn dereference(
        &self,
        valid: &[Arc<Cached<Self>>],
        default_network: &str,
    ) -> Result<(Plan, BTreeMap<String, Vec<u8>>), Error> {
        let wanted: BTreeSet<&str> = valid
            .iter()
            .flat_map(|i| i.object.spec.rules.iter())
            .flat_map(|r| r.paths.iter().map(|p| p.service.as_str()))
            .collect();
        let mut services = BTreeMap::new();
        let mut endpoints: BTreeMap<String, Value> = BTreeMap::new();
        for name in wanted {
            let Some(obj) = self.store.get(Kind::Service, name).await? else {
                continue;
            };
            let Ok(spec) = serde_json::from_value::<ServiceSpec>(obj.spec) else {
                continue;
            };
            let networks = if spec.networks.is_empty() {
                vec![default_network.to_string()]
            } else {
                spec.networks.clone()
            };
            let exposed = self.exposed_ports(&spec.image.to_string()).await;
            let mut tasks = BTreeSet::new();
            for net in &networks {
                if !endpoints.contains_key(net) {
                    let found = self.network_services(net).await;
                    endpoints.insert(net.clone(), found);
                }
                tasks.extend(task_addresses(&endpoints[net], name));
            }
            services.insert(
                name.to_string(),
                Backend {
                    networks,
                    exposed,
                    tasks,
                },
            );
        }
        let mut usable = BTreeMap::new();
        let mut pems = BTreeMap::new();
        let refs: BTreeSet<String> = valid
            .iter()
            .filter_map(|i| i.object.spec.tls.secret_ref.clone())
            .collect();
        for secret in refs {
            let verdict = match self.secrets.data(Kind::Secret, &secret).await? {
                None => Err(format!("Secret `{secret}` does not exist")),
                Some(files) => build::certificate_pem(&secret, &files).map(|pem| {
                    pems.insert(secret.clone(), pem);
                }),
            };
            usable.insert(secret, verdict);
        }
        let candidates: Vec<Candidate> = valid
            .iter()
            .map(|i| Candidate {
                name: i.name(),
                created: i.meta.creation_timestamp,
                spec: &i.object.spec,
            })
            .collect();
        Ok((build::plan(&candidates, &services, &usable), pems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn task_addresses_of_one_service() {
        let services = json!({
            "web": {"VIP": "10.0.5.2", "Tasks": [
                {"Name": "web.1.x", "EndpointIP": "10.0.5.4", "Info": {"Host IP": "10.99.0.2"}},
                {"Name": "web.2.y", "EndpointIP": "10.0.5.3"},
                {"Name": "web.3.z", "EndpointIP": ""}]},
            "other": {"Tasks": [{"EndpointIP": "10.0.5.9"}]}
        });
        assert_eq!(
            task_addresses(&services, "web"),
            BTreeSet::from(["10.0.5.3".to_string(), "10.0.5.4".to_string()])
        );
        assert!(task_addresses(&services, "ghost").is_empty());
        assert!(task_addresses(&Value::Null, "web").is_empty());
    }
}
