//! Ingresses -> proxy. Pure and client-free, so every rule is unit-tested without Docker:
//!
//! - [`plan`]: which Ingress gets which host and path (the oldest claim wins; later ones are told),
//!   which routes have no backend, which networks the proxy must join;
//! - [`render`]: the Caddy JSON config for a plan, deterministic (same Ingresses, same bytes, same
//!   Swarm config name), so a reconcile of any Ingress converges to the same proxy state;
//! - [`build_service`]: the global Swarm service running the proxy, and the hash of the part of it
//!   that only a task restart can change (image, ports, networks, mounted files, placement).
//!
//! The proxy boots from a Swarm config and is then kept current through Caddy's admin API; see
//! `mod.rs` for how the two relate.

use super::admin;
use crate::swarm::hash::{canonical_hash, contains, spec_hash};
use crate::swarm::{Owner, SwarmFile};
use berth_api_types::ingress::{normalise_path, IngressSpec, TlsSource};
use berth_api_types::names::labels;
use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, Mount, MountType, MountVolumeOptions, NetworkAttachmentConfig, ServiceSpec,
    ServiceSpecMode, ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecConfigs, TaskSpecContainerSpecFile, TaskSpecContainerSpecFile1,
    TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum,
};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Where the volume holding the proxy's state (admin socket, autosaved config, Caddy's storage) is
/// mounted in the proxy's containers.
pub const STATE_MOUNT: &str = "/berth";
/// The admin socket's file name inside the state volume.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// Directory (inside the state volume) of per-boot-config autosave directories.
pub const AUTOSAVE_DIR: &str = "state";
/// Where the boot config (the Swarm config) is mounted.
pub const BOOT_CONFIG_PATH: &str = "/etc/berth-ingress/caddy.json";
/// Where the internal CA's root certificate (a Swarm config) is mounted.
pub const CA_CERT_PATH: &str = "/etc/berth-ingress/ca.crt";
/// Where the internal CA's private key (a Swarm secret) is mounted (under /run/secrets).
pub const CA_KEY_TARGET: &str = "berth-ingress-ca.key";
/// The Caddy PKI id of berth's CA.
pub const CA_ID: &str = "berth";
/// Backend requests are retried (on another task) for this long before the client gets a 502:
/// it covers a task being replaced in a rolling update.
pub const TRY_DURATION: &str = "10s";
/// A backend task that failed a request (could not be dialled, or the connection broke) is out of
/// rotation this long. Not longer than [`TRY_DURATION`]: a request whose only backend is out waits
/// for it to come back instead of failing.
pub const FAIL_DURATION: &str = "10s";
/// How long a connection to a backend task may take. Tasks are on the same overlay network, a
/// hop or two away (milliseconds); a task that does not answer this fast is tried elsewhere and
/// taken out of rotation, instead of costing the request a second per attempt.
pub const DIAL_TIMEOUT: &str = "250ms";

/// How the proxy is run: from `berth up` / `berth controller ingress` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Name of the proxy's Swarm service; also the prefix of its configs, secrets and volume.
    pub name: String,
    pub image: String,
    /// Host ports published in host mode on every proxy node.
    pub https_port: u16,
    pub http_port: u16,
    /// Host port (host mode, on every proxy node) of the proxy's remote admin endpoint: only berth's
    /// admin client certificate is let in (see `admin.rs`).
    pub admin_port: u16,
}

impl Settings {
    /// Checks the settings once at start, so a bad flag is an error and not a status.
    pub fn validate(&self) -> Result<(), String> {
        let mut e = berth_api_types::validate::Errors::default();
        berth_api_types::validate::check_dns_label(&mut e, "--ingress-name", &self.name);
        if let Some(first) = e.0.first() {
            return Err(first.to_string());
        }
        // Swarm object names are at most 64 characters and get `-<16 hex>` appended.
        if self.name.len() > 40 {
            return Err(format!(
                "--ingress-name: `{}` is longer than 40 characters",
                self.name
            ));
        }
        if self.image.trim().is_empty() {
            return Err("--ingress-image: must not be empty".into());
        }
        let ports = [self.https_port, self.http_port, self.admin_port];
        if ports.contains(&0)
            || ports[0] == ports[1]
            || ports[0] == ports[2]
            || ports[1] == ports[2]
        {
            return Err(format!(
                "--ingress-https-port {}, --ingress-http-port {} and --ingress-admin-port {} must be three different ports from 1 to 65535",
                self.https_port, self.http_port, self.admin_port
            ));
        }
        Ok(())
    }

    /// The named volume (one per node) holding the proxy's state.
    pub fn volume(&self) -> String {
        format!("{}-state", self.name)
    }
}

/// One valid Ingress, as the planner sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub created: Option<DateTime<Utc>>,
    pub spec: &'a IngressSpec,
}

/// What the planner knows of one existing Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backend {
    /// The berth Networks its tasks join (the default network when it lists none).
    pub networks: Vec<String>,
    /// Ports its image declares (`EXPOSE`); `None` when the image cannot be inspected here or
    /// declares none (then any port is taken on trust).
    pub exposed: Option<BTreeSet<u32>>,
    /// Addresses of its tasks on the networks the proxy joins, as Swarm knows them now (see
    /// `proxy_handler` for what they are used for).
    pub tasks: BTreeSet<String>,
}

/// Where a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Backend {
        service: String,
        port: u32,
        /// Task addresses known when the config was rendered.
        tasks: BTreeSet<String>,
    },
    /// Nothing to send to (reported on the Ingress); the path answers 503 rather than falling through
    /// to a shorter prefix that may belong to someone else.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub path: String,
    pub ingress: String,
    pub target: Target,
}

/// Everything routed for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// The Ingress that claimed the host first; its TLS settings apply to the host.
    pub owner: String,
    pub tls: TlsSource,
    pub hsts: bool,
    /// Longest prefix first.
    pub routes: Vec<Route>,
}

/// Why part of an Ingress is not served as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Missing {
    Service,
    Port,
    Secret,
}

/// The planner's verdict on one Ingress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Host/path pairs (or TLS settings) another, older Ingress already has.
    pub conflicts: Vec<String>,
    pub missing: Vec<(Missing, String)>,
    /// `https://host/path` of every route this Ingress won.
    pub urls: Vec<String>,
    /// Whether one of its hosts uses the internal CA.
    pub internal_tls: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub hosts: BTreeMap<String, HostPlan>,
    pub ingresses: BTreeMap<String, Outcome>,
    /// Berth Networks the proxy joins to reach the backends.
    pub networks: BTreeSet<String>,
}

impl Plan {
    /// Berth Secrets whose certificates the proxy serves.
    pub fn tls_secrets(&self) -> BTreeSet<String> {
        self.hosts
            .values()
            .filter_map(|h| match &h.tls {
                TlsSource::Secret(s) => Some(s.clone()),
                TlsSource::Internal => None,
            })
            .collect()
    }
}

/// Decides every route. Ingresses are taken oldest first (then by name), so the first to claim a host
/// and path keeps it whatever order events arrive in; `secrets` says, per TLS Secret referenced,
/// whether it is usable (`Err(why)` if not).
pub fn plan(
    ingresses: &[Candidate],
    services: &BTreeMap<String, Backend>,
    secrets: &BTreeMap<String, Result<(), String>>,
) -> Plan {
    let mut ordered: Vec<&Candidate> = ingresses.iter().collect();
    ordered.sort_by(|a, b| (a.created, a.name).cmp(&(b.created, b.name)));
    let mut plan = Plan::default();
    let mut claims: BTreeMap<(String, String), String> = BTreeMap::new();
    for ing in ordered {
        let mut out = Outcome::default();
        let tls = ing.spec.tls.source();
        if let TlsSource::Secret(s) = &tls {
            if let Some(Err(why)) = secrets.get(s) {
                out.missing.push((Missing::Secret, why.clone()));
            }
        }
        for rule in &ing.spec.rules {
            let host = plan
                .hosts
                .entry(rule.host.clone())
                .or_insert_with(|| HostPlan {
                    owner: ing.name.to_string(),
                    tls: tls.clone(),
                    hsts: ing.spec.tls.hsts(),
                    routes: Vec::new(),
                });
            if host.owner != ing.name && (host.tls != tls || host.hsts != ing.spec.tls.hsts()) {
                out.conflicts.push(format!(
                    "host `{}` takes its TLS settings from Ingress `{}`",
                    rule.host, host.owner
                ));
            }
            if host.tls == TlsSource::Internal && host.owner == ing.name {
                out.internal_tls = true;
            }
            for p in &rule.paths {
                let key = (rule.host.clone(), normalise_path(&p.path).to_string());
                if let Some(other) = claims.get(&key) {
                    out.conflicts.push(format!(
                        "host `{}` path `{}` is already routed by Ingress `{other}`",
                        rule.host, p.path
                    ));
                    continue;
                }
                claims.insert(key, ing.name.to_string());
                let target = match services.get(&p.service) {
                    None => {
                        out.missing.push((
                            Missing::Service,
                            format!("Service `{}` does not exist", p.service),
                        ));
                        Target::Unavailable
                    }
                    Some(b) if b.exposed.as_ref().is_some_and(|e| !e.contains(&p.port)) => {
                        let ports: Vec<String> = b
                            .exposed
                            .iter()
                            .flatten()
                            .map(ToString::to_string)
                            .collect();
                        out.missing.push((
                            Missing::Port,
                            format!(
                                "Service `{}`'s image exposes port{} {}, not {}",
                                p.service,
                                if ports.len() == 1 { "" } else { "s" },
                                if ports.is_empty() {
                                    "none".to_string()
                                } else {
                                    ports.join(", ")
                                },
                                p.port
                            ),
                        ));
                        Target::Unavailable
                    }
                    Some(b) => {
                        plan.networks.extend(b.networks.iter().cloned());
                        Target::Backend {
                            service: p.service.clone(),
                            port: p.port,
                            tasks: b.tasks.clone(),
                        }
                    }
                };
                out.urls.push(format!("https://{}{}", rule.host, p.path));
                host.routes.push(Route {
                    path: normalise_path(&p.path).to_string(),
                    ingress: ing.name.to_string(),
                    target,
                });
            }
        }
        out.missing.sort();
        out.missing.dedup();
        plan.ingresses.insert(ing.name.to_string(), out);
    }
    for host in plan.hosts.values_mut() {
        host.routes
            .sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.path.cmp(&b.path)));
    }
    plan
}

/// Paths of the files the rendered config refers to, in the proxy's containers, and the one
/// client the proxy's admin endpoint lets in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Files {
    /// Berth Secret name -> PEM file (key and certificate chain in one file).
    pub certificates: BTreeMap<String, String>,
    /// berth's admin client certificate, base64 DER (public; `ca::AdminIdentity`).
    pub admin_client: String,
}

/// The container path of a materialised certificate.
pub fn certificate_path(swarm_name: &str) -> String {
    format!("/run/secrets/{swarm_name}")
}

fn not_found() -> Value {
    json!({"handler": "static_response", "status_code": 404, "body": "no route\n"})
}

/// Caddy path matcher for a prefix matched by whole segments.
fn path_match(prefix: &str) -> Option<Value> {
    if prefix == "/" {
        None
    } else {
        Some(json!([{"path": [prefix, format!("{prefix}/*")]}]))
    }
}

/// The reverse proxy of one route.
///
/// Upstreams are the backend's tasks from Swarm's `tasks.<service>` DNS, looked up again every
/// second (`dynamic_upstreams`), not the service VIP: Caddy then balances and retries per request
/// across tasks, skips a task that just failed, and needs no IPVS. DNS is the truth about which
/// tasks exist, so a rolling update needs nothing from berth.
///
/// Health: Caddy 2.6.2 runs no active health checks on dynamic upstreams, and it forgets a dynamic
/// upstream's passive failures as soon as the attempt that counted them ends (its shared host
/// record goes when no request holds it), so without help every request dials a dead task again.
/// The task addresses berth knows are therefore also listed as static `upstreams`: Caddy keeps a
/// static upstream's host record while the config runs, and the dynamic upstream of the same
/// address shares it, so a task whose dial failed is skipped by every request for
/// [`FAIL_DURATION`]. The list is only that memory (and the fallback should the DNS lookup fail):
/// a task started since the render is still used, just without the memory until the next render.
fn proxy_handler(service: &str, port: u32, tasks: &BTreeSet<String>) -> Value {
    let mut handler = json!({
        "handler": "reverse_proxy",
        "dynamic_upstreams": {
            "source": "a", "name": format!("tasks.{service}"), "port": port.to_string(),
            "refresh": "1s"
        },
        "load_balancing": {
            "selection_policy": {"policy": "round_robin"},
            "try_duration": TRY_DURATION, "try_interval": "50ms"
        },
        "health_checks": {"passive": {"fail_duration": FAIL_DURATION, "max_fails": 1}},
        "transport": {"protocol": "http", "dial_timeout": DIAL_TIMEOUT}
    });
    if !tasks.is_empty() {
        // Caddy names a dynamic A upstream `ip:port`: the same text keys the shared record.
        handler["upstreams"] = tasks
            .iter()
            .map(|ip| json!({"dial": dial(ip, port)}))
            .collect();
    }
    handler
}

/// `ip:port`, with brackets for IPv6, as Go's `net.JoinHostPort` writes it.
fn dial(ip: &str, port: u32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The Caddy JSON config for a plan: an HTTPS server on :443 with one route per host (unknown hosts
/// and paths get 404), an HTTP server on :80 that only redirects, TLS from the mounted certificate
/// files and from berth's CA, and the admin API: on the socket in the state volume (for an operator
/// on the node) and remotely, for berth's client certificate only (see `admin.rs`).
pub fn render(plan: &Plan, settings: &Settings, files: &Files) -> Value {
    let mut routes = Vec::new();
    let mut load_files = Vec::new();
    let mut internal_hosts = Vec::new();
    for (host, h) in &plan.hosts {
        match &h.tls {
            TlsSource::Internal => internal_hosts.push(host.clone()),
            TlsSource::Secret(s) => {
                if let Some(path) = files.certificates.get(s) {
                    load_files.push(json!({"certificate": path, "key": path, "tags": [format!("berth-secret-{s}")]}));
                }
            }
        }
        let mut sub: Vec<Value> = h
            .routes
            .iter()
            .map(|r| {
                let handler = match &r.target {
                    Target::Backend {
                        service,
                        port,
                        tasks,
                    } => proxy_handler(service, *port, tasks),
                    Target::Unavailable => json!({
                        "handler": "static_response", "status_code": 503,
                        "body": "service unavailable\n"
                    }),
                };
                let mut route = json!({"handle": [handler]});
                if let Some(m) = path_match(&r.path) {
                    route["match"] = m;
                }
                route
            })
            .collect();
        sub.push(json!({"handle": [not_found()]}));
        let mut handle = Vec::new();
        if h.hsts {
            handle.push(json!({"handler": "headers", "response": {"set": {
                "Strict-Transport-Security": ["max-age=31536000"]
            }}}));
        }
        handle.push(json!({"handler": "subroute", "routes": sub}));
        routes.push(json!({"match": [{"host": [host]}], "terminal": true, "handle": handle}));
    }
    routes.push(json!({"handle": [not_found()]}));
    // Duplicates collapse: several hosts may share one Secret's certificate.
    load_files.dedup();

    let port = if settings.https_port == 443 {
        String::new()
    } else {
        format!(":{}", settings.https_port)
    };
    let mut certificates = json!({});
    if !load_files.is_empty() {
        certificates["load_files"] = json!(load_files);
    }
    if !internal_hosts.is_empty() {
        certificates["automate"] = json!(internal_hosts);
    }
    let mut tls = json!({"certificates": certificates});
    if !internal_hosts.is_empty() {
        tls["automation"] = json!({"policies": [{
            "subjects": internal_hosts,
            "issuers": [{"module": "internal", "ca": CA_ID}]
        }]});
    }
    json!({
        "admin": {
            "listen": format!("unix/{STATE_MOUNT}/{ADMIN_SOCKET}"),
            "config": {"persist": true},
            // The remote endpoint's certificate, issued by Caddy from berth's CA (which berth
            // trusts) for one name on every node.
            "identity": {
                "identifiers": [admin::server_name(&settings.name)],
                "issuers": [{"module": "internal", "ca": CA_ID}]
            },
            "remote": {
                "listen": format!(":{}", admin::ADMIN_TARGET_PORT),
                // Caddy 2.6 checks every permission entry: one entry, so GET and POST go to both
                // paths (`POST /config/` can do no more than `/load`). Nothing else: no /stop, no
                // /pki.
                "access_control": [{
                    "public_keys": [files.admin_client],
                    "permissions": [{"paths": ["/config/", "/load"], "methods": ["GET", "POST"]}]
                }]
            }
        },
        "apps": {
            "http": {
                "grace_period": "5s",
                "servers": {
                    "https": {
                        "listen": [":443"],
                        "protocols": ["h1", "h2"],
                        "automatic_https": {"disable": true},
                        "tls_connection_policies": [{}],
                        "routes": routes
                    },
                    "redirect": {
                        "listen": [":80"],
                        "protocols": ["h1"],
                        "automatic_https": {"disable": true},
                        "routes": [{"handle": [{
                            "handler": "static_response", "status_code": 308,
                            "headers": {"Location": [format!("https://{{http.request.host}}{port}{{http.request.uri}}")]}
                        }]}]
                    }
                }
            },
            "tls": tls,
            "pki": {"certificate_authorities": {CA_ID: {
                "name": "berth ingress CA",
                "install_trust": false,
                "root": {"certificate": CA_CERT_PATH, "private_key": format!("/run/secrets/{CA_KEY_TARGET}"), "format": "pem_file"}
            }}}
        }
    })
}

/// The Swarm config name of a rendered config: content-addressed, so a change is a new name.
pub fn config_name(settings: &Settings, rendered: &Value) -> String {
    format!("{}-{}", settings.name, canonical_hash(rendered))
}

/// Roles of the objects the controller makes.
pub mod roles {
    pub const PROXY: &str = "proxy";
    pub const CONFIG: &str = "config";
    pub const CERTIFICATE: &str = "certificate";
    pub const CA: &str = "ca";
    pub const CA_KEY: &str = "ca-key";
    pub const STATE: &str = "state";
}

/// Everything the proxy service is made of besides the settings.
#[derive(Debug, Clone, Default)]
pub struct ProxyParts {
    /// Materialised certificates (secrets), mounted at [`certificate_path`] of their names.
    pub certificates: Vec<SwarmFile>,
    pub ca_cert: SwarmFile,
    pub ca_key: SwarmFile,
    /// Swarm network IDs, sorted.
    pub networks: Vec<String>,
    /// Placement constraint choosing the proxy's nodes.
    pub constraint: String,
}

/// The proxy's Swarm service spec, and the hash of everything in it but the boot config.
#[derive(Debug, Clone)]
pub struct BuiltProxy {
    pub spec: ServiceSpec,
    /// Equal hashes: the running service can take any new config through the admin API; different:
    /// only a service update (a task restart) gets it there.
    pub structural_hash: String,
}

/// The placement constraint: nodes labelled for ingress, or the managers when no node is.
pub fn constraint(any_node_labelled: bool) -> String {
    if any_node_labelled {
        format!("node.labels.{} == true", labels::INGRESS_NODE)
    } else {
        "node.role == manager".to_string()
    }
}

/// Where a boot config's autosave lives: one directory per boot config, so a task restarted after a
/// service update never resumes the config of an older generation (see `mod.rs`).
pub fn autosave_home(boot_name: &str) -> String {
    format!("{STATE_MOUNT}/{AUTOSAVE_DIR}/{boot_name}")
}

/// Builds the proxy service with `boot` as its boot config.
pub fn build_service(
    settings: &Settings,
    owner: &Owner,
    parts: &ProxyParts,
    boot: &SwarmFile,
) -> BuiltProxy {
    let placeholder = SwarmFile {
        id: String::new(),
        name: String::new(),
    };
    let mut spec = service_spec(settings, owner, parts, &placeholder);
    let structural_hash = spec_hash(&spec, &[]);
    spec = service_spec(settings, owner, parts, boot);
    if let Some(l) = spec.labels.as_mut() {
        l.insert(labels::SPEC_HASH.into(), structural_hash.clone());
    }
    BuiltProxy {
        spec,
        structural_hash,
    }
}

fn service_spec(
    settings: &Settings,
    owner: &Owner,
    parts: &ProxyParts,
    boot: &SwarmFile,
) -> ServiceSpec {
    let own = owner.labels_with(&settings.name, &[(labels::ROLE, roles::PROXY)]);
    let file = |name: &str| TaskSpecContainerSpecFile {
        name: Some(name.to_string()),
        uid: Some("0".into()),
        gid: Some("0".into()),
        mode: Some(0o400),
    };
    let config_file = |name: &str| TaskSpecContainerSpecFile1 {
        name: Some(name.to_string()),
        uid: Some("0".into()),
        gid: Some("0".into()),
        mode: Some(0o444),
    };
    let mut secrets = vec![TaskSpecContainerSpecSecrets {
        file: Some(file(CA_KEY_TARGET)),
        secret_id: Some(parts.ca_key.id.clone()),
        secret_name: Some(parts.ca_key.name.clone()),
    }];
    secrets.extend(
        parts
            .certificates
            .iter()
            .map(|c| TaskSpecContainerSpecSecrets {
                file: Some(file(&c.name)),
                secret_id: Some(c.id.clone()),
                secret_name: Some(c.name.clone()),
            }),
    );
    let configs = vec![
        TaskSpecContainerSpecConfigs {
            file: Some(config_file(BOOT_CONFIG_PATH)),
            config_id: Some(boot.id.clone()),
            config_name: Some(boot.name.clone()),
            ..Default::default()
        },
        TaskSpecContainerSpecConfigs {
            file: Some(config_file(CA_CERT_PATH)),
            config_id: Some(parts.ca_cert.id.clone()),
            config_name: Some(parts.ca_cert.name.clone()),
            ..Default::default()
        },
    ];
    let container = TaskSpecContainerSpec {
        image: Some(settings.image.clone()),
        labels: Some(own.clone()),
        command: Some(
            ["caddy", "run", "--config", BOOT_CONFIG_PATH, "--resume"]
                .map(String::from)
                .to_vec(),
        ),
        env: Some(vec![
            format!("XDG_CONFIG_HOME={}", autosave_home(&boot.name)),
            format!("XDG_DATA_HOME={STATE_MOUNT}/data"),
        ]),
        // Caddy drains connections for its 5 s grace period on SIGTERM.
        stop_grace_period: Some(10_000_000_000),
        secrets: Some(secrets),
        configs: Some(configs),
        mounts: Some(vec![Mount {
            target: Some(STATE_MOUNT.into()),
            source: Some(settings.volume()),
            typ: Some(MountType::VOLUME),
            volume_options: Some(MountVolumeOptions {
                labels: Some(owner.labels_with(&settings.name, &[(labels::ROLE, roles::STATE)])),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let port = |target: i64, published: u16| EndpointPortConfig {
        protocol: Some(EndpointPortConfigProtocolEnum::TCP),
        target_port: Some(target),
        published_port: Some(i64::from(published)),
        // The routing mesh would hide client addresses (and needs IPVS); an edge proxy binds the
        // node's own port.
        publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
        ..Default::default()
    };
    ServiceSpec {
        name: Some(settings.name.clone()),
        labels: Some(own),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                delay: Some(1_000_000_000),
                ..Default::default()
            }),
            placement: Some(TaskSpecPlacement {
                constraints: Some(vec![parts.constraint.clone()]),
                ..Default::default()
            }),
            networks: (!parts.networks.is_empty()).then(|| {
                parts
                    .networks
                    .iter()
                    .map(|id| NetworkAttachmentConfig {
                        target: Some(id.clone()),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            global: Some(HashMap::new()),
            ..Default::default()
        }),
        // Two tasks cannot hold one node's host port: a new task can only start once the old one
        // stopped, one node at a time.
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(1),
            order: Some(ServiceSpecUpdateConfigOrderEnum::STOP_FIRST),
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::CONTINUE),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            ports: Some(vec![
                port(443, settings.https_port),
                port(80, settings.http_port),
                // Who may use it: berth's admin client only (mutual TLS; see `admin.rs`).
                port(i64::from(admin::ADMIN_TARGET_PORT), settings.admin_port),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The boot config a container spec mounts (the Swarm config at [`BOOT_CONFIG_PATH`]).
pub fn boot_config(
    c: &bollard::models::TaskSpecContainerSpec,
) -> Option<&bollard::models::TaskSpecContainerSpecConfigs> {
    c.configs
        .as_ref()?
        .iter()
        .find(|c| c.file.as_ref().and_then(|f| f.name.as_deref()) == Some(BOOT_CONFIG_PATH))
}

/// The boot config a running proxy service was given (the Swarm config mounted at
/// [`BOOT_CONFIG_PATH`]).
pub fn boot_of(spec: &ServiceSpec) -> Option<SwarmFile> {
    boot_config(spec.task_template.as_ref()?.container_spec.as_ref()?).map(|c| SwarmFile {
        id: c.config_id.clone().unwrap_or_default(),
        name: c.config_name.clone().unwrap_or_default(),
    })
}

/// Whether the running service needs an update (a restart) for `parts`: anything but the boot config
/// changed, or was changed behind berth's back.
pub fn needs_restart(
    observed: &ServiceSpec,
    settings: &Settings,
    owner: &Owner,
    parts: &ProxyParts,
) -> bool {
    let Some(boot) = boot_of(observed) else {
        return true;
    };
    let built = build_service(settings, owner, parts, &boot);
    let label = observed
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::SPEC_HASH));
    label != Some(&built.structural_hash) || !contains(observed, &built.spec)
}

/// The Swarm name of a materialised certificate: content-addressed, per proxy.
pub fn certificate_name(settings: &Settings, secret: &str, pem: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(secret.as_bytes());
    h.update([0u8]);
    h.update(pem);
    format!("{}-tls-{}", settings.name, &hex::encode(h.finalize())[..12])
}

/// The certificate file berth mounts for a TLS Secret: the private key, then the chain. Caddy reads
/// the key and the certificates out of one PEM file. `Err` says what is wrong with the Secret
/// (never its content).
pub fn certificate_pem(secret: &str, files: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, String> {
    use berth_api_types::ingress::{TLS_CERT_KEY, TLS_KEY_KEY};
    let get = |k: &str| {
        files
            .get(k)
            .ok_or_else(|| format!("Secret `{secret}` has no key `{k}`"))
    };
    let cert = get(TLS_CERT_KEY)?;
    let key = get(TLS_KEY_KEY)?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if !text(cert).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "Secret `{secret}`: `{TLS_CERT_KEY}` is not a PEM certificate"
        ));
    }
    if !text(key).contains("PRIVATE KEY-----") {
        return Err(format!(
            "Secret `{secret}`: `{TLS_KEY_KEY}` is not a PEM private key"
        ));
    }
    let mut pem = key.clone();
    if !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    pem.extend_from_slice(cert);
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::ingress::Ingress;
    use berth_api_types::Kind;
    use chrono::TimeZone;
    use serde_json::Value;

    fn settings() -> Settings {
        Settings {
            name: "berth-ingress".into(),
            image: "caddy:2".into(),
            https_port: 443,
            http_port: 80,
            admin_port: 2021,
        }
    }

    fn ingress(name: &str, spec: Value) -> Ingress {
        serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": "Ingress", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap()
    }

    fn at(secs: i64) -> Option<DateTime<Utc>> {
        Some(Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap())
    }

    fn web() -> BTreeMap<String, Backend> {
        BTreeMap::from([
            (
                "web".to_string(),
                Backend {
                    networks: vec!["berth-internal".into()],
                    exposed: Some(BTreeSet::from([8080])),
                    tasks: BTreeSet::new(),
                },
            ),
            (
                "api".to_string(),
                Backend {
                    networks: vec!["backend".into()],
                    exposed: None,
                    tasks: BTreeSet::from(["10.0.1.7".to_string(), "10.0.1.5".to_string()]),
                },
            ),
        ])
    }

    #[test]
    fn oldest_claim_wins_whatever_the_order() {
        let a = ingress(
            "a",
            json!({"rules": [{"host": "app.test", "paths": [
            {"path": "/", "service": "web", "port": 8080}]}], "tls": {"mode": "internal"}}),
        );
        let b = ingress(
            "b",
            json!({"rules": [{"host": "app.test", "paths": [
            {"path": "/", "service": "api", "port": 9000},
            {"path": "/api/", "service": "api", "port": 9000}]}], "tls": {"mode": "internal"}}),
        );
        let first = [
            Candidate {
                name: "b",
                created: at(5),
                spec: &b.spec,
            },
            Candidate {
                name: "a",
                created: at(1),
                spec: &a.spec,
            },
        ];
        let p = plan(&first, &web(), &BTreeMap::new());
        let mut reversed = first.clone();
        reversed.reverse();
        assert_eq!(p, plan(&reversed, &web(), &BTreeMap::new()));
        assert_eq!(
            p.ingresses["b"].conflicts,
            ["host `app.test` path `/` is already routed by Ingress `a`"]
        );
        assert!(p.ingresses["a"].conflicts.is_empty());
        let routes = &p.hosts["app.test"].routes;
        assert_eq!(routes[0].path, "/api", "longest prefix first");
        assert_eq!(routes[0].ingress, "b");
        assert_eq!(routes[1].ingress, "a");
        assert_eq!(
            p.networks,
            BTreeSet::from(["berth-internal".to_string(), "backend".to_string()])
        );
        assert_eq!(p.ingresses["b"].urls, ["https://app.test/api/"]);
    }

    #[test]
    fn missing_backends_ports_and_secrets_are_reported_and_answer_503() {
        let a = ingress(
            "a",
            json!({"rules": [{"host": "app.test", "paths": [
            {"path": "/", "service": "web", "port": 9999},
            {"path": "/x", "service": "ghost", "port": 80},
            {"path": "/api", "service": "api", "port": 1}]}], "tls": {"secretRef": "tls"}}),
        );
        let secrets = BTreeMap::from([(
            "tls".to_string(),
            Err("Secret `tls` does not exist".to_string()),
        )]);
        let p = plan(
            &[Candidate {
                name: "a",
                created: at(0),
                spec: &a.spec,
            }],
            &web(),
            &secrets,
        );
        let o = &p.ingresses["a"];
        assert_eq!(
            o.missing,
            [
                (Missing::Service, "Service `ghost` does not exist".into()),
                (
                    Missing::Port,
                    "Service `web`'s image exposes port 8080, not 9999".into()
                ),
                (Missing::Secret, "Secret `tls` does not exist".into()),
            ]
        );
        let h = &p.hosts["app.test"];
        let paths: Vec<&str> = h.routes.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/api", "/x", "/"]);
        assert_eq!(h.routes[1].target, Target::Unavailable);
        assert_eq!(h.routes[2].target, Target::Unavailable);
        let rendered = render(&p, &settings(), &Files::default());
        let text = rendered.to_string();
        assert!(text.contains("\"status_code\":503"));
        // An image without EXPOSE data (not inspectable here) is trusted.
        assert!(text.contains("tasks.api"));
        assert!(!text.contains("tasks.ghost") && !text.contains("tasks.web"));
        assert_eq!(p.networks, BTreeSet::from(["backend".to_string()]));
        // The Secret is unusable: no certificate file is rendered for the host.
        assert!(!text.contains("load_files"));
    }

    #[test]
    fn tls_settings_come_from_the_host_owner() {
        let a = ingress(
            "a",
            json!({"rules": [{"host": "app.test", "paths": [
            {"path": "/", "service": "web", "port": 8080}]}], "tls": {"secretRef": "tls"}}),
        );
        let b = ingress(
            "b",
            json!({"rules": [{"host": "app.test", "paths": [
            {"path": "/b", "service": "web", "port": 8080}]}], "tls": {"mode": "internal"}}),
        );
        let p = plan(
            &[
                Candidate {
                    name: "a",
                    created: at(0),
                    spec: &a.spec,
                },
                Candidate {
                    name: "b",
                    created: at(1),
                    spec: &b.spec,
                },
            ],
            &web(),
            &BTreeMap::from([("tls".to_string(), Ok(()))]),
        );
        assert_eq!(
            p.ingresses["b"].conflicts,
            ["host `app.test` takes its TLS settings from Ingress `a`"]
        );
        assert_eq!(p.ingresses["b"].urls, ["https://app.test/b"]);
        assert!(!p.ingresses["b"].internal_tls);
        assert_eq!(p.tls_secrets(), BTreeSet::from(["tls".to_string()]));
    }

    #[test]
    fn render_is_deterministic_and_complete() {
        let a = ingress(
            "a",
            json!({"rules": [
            {"host": "app.test", "paths": [{"path": "/", "service": "web", "port": 8080},
                                           {"path": "/api", "service": "api", "port": 9000}]},
            {"host": "int.test", "paths": [{"path": "/", "service": "web", "port": 8080}]}],
            "tls": {"secretRef": "tls"}}),
        );
        let b = ingress(
            "b",
            json!({"rules": [
            {"host": "other.test", "paths": [{"path": "/", "service": "web", "port": 8080}]}],
            "tls": {"mode": "internal", "hsts": false}}),
        );
        let c = [
            Candidate {
                name: "a",
                created: at(0),
                spec: &a.spec,
            },
            Candidate {
                name: "b",
                created: at(1),
                spec: &b.spec,
            },
        ];
        let secrets = BTreeMap::from([("tls".to_string(), Ok(()))]);
        let files = Files {
            certificates: BTreeMap::from([("tls".into(), "/run/secrets/x-tls-1".into())]),
            admin_client: "QUJD".into(),
        };
        let p = plan(&c, &web(), &secrets);
        let r = render(&p, &settings(), &files);
        let mut rev = c.clone();
        rev.reverse();
        assert_eq!(
            r,
            render(&plan(&rev, &web(), &secrets), &settings(), &files)
        );
        assert_eq!(
            config_name(&settings(), &r),
            config_name(&settings(), &r.clone())
        );
        assert!(config_name(&settings(), &r).starts_with("berth-ingress-"));

        assert_eq!(r["admin"]["listen"], "unix//berth/admin.sock");
        // The remote admin endpoint: certificate from berth's CA for one name, and only berth's
        // client certificate let in, for reading and loading configs.
        assert_eq!(
            r["admin"]["identity"],
            json!({"identifiers": ["berth-ingress.admin.berth"],
                   "issuers": [{"module": "internal", "ca": "berth"}]})
        );
        assert_eq!(
            r["admin"]["remote"],
            json!({"listen": ":2021", "access_control": [{"public_keys": ["QUJD"],
                "permissions": [{"paths": ["/config/", "/load"], "methods": ["GET", "POST"]}]}]})
        );
        let https = &r["apps"]["http"]["servers"]["https"];
        assert_eq!(https["listen"], json!([":443"]));
        let routes = https["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 4, "three hosts and the 404 catch-all");
        assert_eq!(routes[0]["match"][0]["host"], json!(["app.test"]));
        assert_eq!(routes[3], json!({"handle": [not_found()]}));
        let app = &routes[0]["handle"];
        assert_eq!(
            app[0]["response"]["set"]["Strict-Transport-Security"],
            json!(["max-age=31536000"])
        );
        let sub = app[1]["routes"].as_array().unwrap();
        assert_eq!(sub[0]["match"], json!([{"path": ["/api", "/api/*"]}]));
        assert_eq!(
            sub[0]["handle"][0]["dynamic_upstreams"]["name"],
            "tasks.api"
        );
        assert_eq!(sub[0]["handle"][0]["dynamic_upstreams"]["port"], "9000");
        // The known tasks are the health memory; DNS stays the truth about which tasks exist.
        let api = &sub[0]["handle"][0];
        assert_eq!(
            api["upstreams"],
            json!([{"dial": "10.0.1.5:9000"}, {"dial": "10.0.1.7:9000"}])
        );
        assert_eq!(
            api["health_checks"],
            json!({"passive": {"fail_duration": "10s", "max_fails": 1}})
        );
        assert_eq!(api["transport"]["dial_timeout"], DIAL_TIMEOUT);
        assert!(
            sub[1]["handle"][0].get("upstreams").is_none(),
            "no task known: DNS only"
        );
        assert_eq!(dial("fd00::5", 80), "[fd00::5]:80");
        assert!(sub[1].get("match").is_none(), "`/` matches everything");
        assert_eq!(sub[2], json!({"handle": [not_found()]}));
        // HSTS off for other.test.
        assert_eq!(routes[2]["match"][0]["host"], json!(["other.test"]));
        assert_eq!(routes[2]["handle"][0]["handler"], "subroute");

        let redirect = &r["apps"]["http"]["servers"]["redirect"];
        assert_eq!(redirect["listen"], json!([":80"]));
        assert_eq!(
            redirect["routes"][0]["handle"][0]["headers"]["Location"],
            json!(["https://{http.request.host}{http.request.uri}"])
        );
        let tls = &r["apps"]["tls"];
        assert_eq!(
            tls["certificates"]["load_files"],
            json!([{"certificate": "/run/secrets/x-tls-1", "key": "/run/secrets/x-tls-1", "tags": ["berth-secret-tls"]}])
        );
        assert_eq!(tls["certificates"]["automate"], json!(["other.test"]));
        assert_eq!(
            tls["automation"]["policies"][0]["issuers"][0],
            json!({"module": "internal", "ca": "berth"})
        );
        assert_eq!(
            r["apps"]["pki"]["certificate_authorities"]["berth"]["root"]["certificate"],
            CA_CERT_PATH
        );

        // Another HTTPS port is part of the redirect.
        let s = Settings {
            https_port: 8443,
            ..settings()
        };
        let r = render(&p, &s, &files);
        assert_eq!(
            r["apps"]["http"]["servers"]["redirect"]["routes"][0]["handle"][0]["headers"]
                ["Location"],
            json!(["https://{http.request.host}:8443{http.request.uri}"])
        );
    }

    fn parts() -> ProxyParts {
        ProxyParts {
            certificates: vec![SwarmFile {
                id: "s1".into(),
                name: "berth-ingress-tls-abc".into(),
            }],
            ca_cert: SwarmFile {
                id: "c1".into(),
                name: "berth-ingress-ca-1".into(),
            },
            ca_key: SwarmFile {
                id: "k1".into(),
                name: "berth-ingress-ca-key-1".into(),
            },
            networks: vec!["n1".into()],
            constraint: constraint(false),
        }
    }

    #[test]
    fn proxy_service_is_global_host_mode_and_boots_from_its_config() {
        let boot = SwarmFile {
            id: "b1".into(),
            name: "berth-ingress-0123".into(),
        };
        let built = build_service(
            &settings(),
            &Owner::new("inst", Kind::Ingress),
            &parts(),
            &boot,
        );
        let s = &built.spec;
        assert_eq!(s.name.as_deref(), Some("berth-ingress"));
        assert!(s.mode.as_ref().unwrap().global.is_some());
        let ports = s.endpoint_spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!(ports.len(), 3);
        assert!(ports
            .iter()
            .all(|p| p.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST)));
        assert_eq!(ports[0].published_port, Some(443));
        assert_eq!(ports[1].published_port, Some(80));
        assert_eq!(
            (ports[2].target_port, ports[2].published_port),
            (Some(2021), Some(2021))
        );
        let t = s.task_template.as_ref().unwrap();
        assert_eq!(
            t.placement.as_ref().unwrap().constraints,
            Some(vec!["node.role == manager".to_string()])
        );
        let c = t.container_spec.as_ref().unwrap();
        assert!(c
            .env
            .as_ref()
            .unwrap()
            .contains(&"XDG_CONFIG_HOME=/berth/state/berth-ingress-0123".to_string()));
        assert_eq!(boot_of(s), Some(boot.clone()));
        let l = s.labels.as_ref().unwrap();
        assert_eq!(l[labels::KIND], "ingress");
        assert_eq!(l[labels::ROLE], "proxy");
        assert_eq!(l[labels::SPEC_HASH], built.structural_hash);
        assert_eq!(
            c.secrets.as_ref().unwrap()[1].file.as_ref().unwrap().name,
            Some("berth-ingress-tls-abc".into())
        );
        assert_eq!(
            certificate_path("berth-ingress-tls-abc"),
            "/run/secrets/berth-ingress-tls-abc"
        );

        // A new boot config alone is not structural: the admin API can deliver it.
        let other = SwarmFile {
            id: "b2".into(),
            name: "berth-ingress-4567".into(),
        };
        assert_eq!(
            build_service(
                &settings(),
                &Owner::new("inst", Kind::Ingress),
                &parts(),
                &other
            )
            .structural_hash,
            built.structural_hash
        );
        assert!(!needs_restart(
            s,
            &settings(),
            &Owner::new("inst", Kind::Ingress),
            &parts()
        ));
        // A new network, certificate, image or placement is.
        let mut p = parts();
        p.networks.push("n2".into());
        assert!(needs_restart(
            s,
            &settings(),
            &Owner::new("inst", Kind::Ingress),
            &p
        ));
        let mut p = parts();
        p.certificates.clear();
        assert!(needs_restart(
            s,
            &settings(),
            &Owner::new("inst", Kind::Ingress),
            &p
        ));
        let mut p = parts();
        p.constraint = constraint(true);
        assert!(needs_restart(
            s,
            &settings(),
            &Owner::new("inst", Kind::Ingress),
            &p
        ));
        let img = Settings {
            image: "caddy:2.7".into(),
            ..settings()
        };
        assert!(needs_restart(
            s,
            &img,
            &Owner::new("inst", Kind::Ingress),
            &parts()
        ));
        // Drift: the image changed by hand.
        let mut drifted = s.clone();
        drifted
            .task_template
            .as_mut()
            .unwrap()
            .container_spec
            .as_mut()
            .unwrap()
            .image = Some("evil:1".into());
        assert!(needs_restart(
            &drifted,
            &settings(),
            &Owner::new("inst", Kind::Ingress),
            &parts()
        ));
    }

    #[test]
    fn settings_and_certificates() {
        assert!(settings().validate().is_ok());
        let bad = Settings {
            name: "Bad_Name".into(),
            ..settings()
        };
        assert!(bad.validate().unwrap_err().contains("--ingress-name"));
        let same = Settings {
            http_port: 443,
            ..settings()
        };
        assert!(same.validate().is_err());
        let admin_clash = Settings {
            admin_port: 80,
            ..settings()
        };
        assert!(admin_clash
            .validate()
            .unwrap_err()
            .contains("--ingress-admin-port"));
        assert_eq!(settings().volume(), "berth-ingress-state");

        let files = BTreeMap::from([
            (
                "tls.crt".to_string(),
                b"-----BEGIN CERTIFICATE-----\nx\n".to_vec(),
            ),
            (
                "tls.key".to_string(),
                b"-----BEGIN PRIVATE KEY-----\ny".to_vec(),
            ),
        ]);
        let pem = certificate_pem("t", &files).unwrap();
        assert!(String::from_utf8(pem.clone())
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\ny\n-----BEGIN CERTIFICATE-----"));
        let a = certificate_name(&settings(), "t", &pem);
        assert!(a.starts_with("berth-ingress-tls-") && a.len() <= 64);
        assert_ne!(a, certificate_name(&settings(), "t", b"other"));
        let mut missing = files.clone();
        missing.remove("tls.key");
        assert_eq!(
            certificate_pem("t", &missing).unwrap_err(),
            "Secret `t` has no key `tls.key`"
        );
        let mut garbage = files.clone();
        garbage.insert("tls.crt".into(), b"hello".to_vec());
        assert!(certificate_pem("t", &garbage)
            .unwrap_err()
            .contains("not a PEM certificate"));
    }
}
