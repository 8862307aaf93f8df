//! Ingress, step 1: every valid Ingress, the Services they route to (their networks and the ports
//! their images declare) and the TLS Secrets they name, planned into routes (`build::plan`).

use super::build::{self, Backend, Candidate, Plan};
use super::IngressController;
use crate::runtime::{Cached, Error};
use crate::swarm::engine::status_code;
use berth_api_types::service::ServiceSpec;
use berth_api_types::Kind;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tracing::debug;

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
            services.insert(name.to_string(), Backend { networks, exposed });
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
