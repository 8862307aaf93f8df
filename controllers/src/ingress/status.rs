//! Plan and proxy state -> Ingress status. Pure: the reconcile hands in the planner's verdict on one
//! Ingress and what it found the proxy doing, and gets back the status to write.

use super::build::{Missing, Outcome};
use crate::runtime::ObjectStatus;
use berth_api_types::meta::set_condition;
use berth_api_types::Condition;
use berth_api_types::ConditionStatus::{False, True};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Condition types of an Ingress.
pub mod conditions {
    /// The spec is valid and at least one of its routes is this Ingress's.
    pub const ACCEPTED: &str = "Accepted";
    /// Some host/path (or a host's TLS settings) belongs to an older Ingress.
    pub const CONFLICT: &str = "Conflict";
    /// A Service, a port or a TLS Secret it names does not exist (those paths answer 503).
    pub const BACKEND_MISSING: &str = "BackendMissing";
    /// The proxy serves this Ingress's current spec.
    pub const READY: &str = "Ready";
}

/// Condition reasons this controller sets.
pub mod reasons {
    pub const ACCEPTED: &str = "Accepted";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const CONFLICT: &str = "HostPathConflict";
    pub const NO_CONFLICT: &str = "NoConflict";
    pub const SERVICE_MISSING: &str = "ServiceMissing";
    pub const PORT_NOT_EXPOSED: &str = "PortNotExposed";
    pub const SECRET_MISSING: &str = "SecretMissing";
    pub const BACKENDS_FOUND: &str = "BackendsFound";
    pub const SERVING: &str = "Serving";
    pub const NO_ROUTES: &str = "NoRoutes";
    pub const PROXY_STARTING: &str = "ProxyStarting";
    pub const PROXY_REFUSED: &str = "ProxyRefused";
}

/// How the serving config reached the proxy.
pub mod delivery {
    /// Loaded into every running proxy task through its admin API: no connection dropped.
    pub const LIVE: &str = "live";
    /// The proxy service was updated and its tasks restarted with the config.
    pub const RESTART: &str = "restart";
}

/// What the Ingress controller reports. Written only by the controller, through the status endpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `https://host/path` of every route this Ingress has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// The proxy's Swarm service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// The Swarm config holding the proxy config now served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// `live` or `restart` (see [`delivery`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// How many proxy tasks (one per proxy node) serve [`Self::config`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<u64>,
    /// PEM root certificate of berth's internal CA, for Ingresses with `tls.mode: internal`: what
    /// clients trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
    /// When the certificate behind this Ingress stops being valid: the certificate of its
    /// `tls.secretRef` Secret, or with `internal` TLS the internal CA's (the proxy renews the
    /// short-lived certificates it issues from that CA by itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<DateTime<Utc>>,
}

/// The `notAfter` of the first certificate in `pem` (which may hold a private key too).
pub fn not_after(pem: &[u8]) -> Option<DateTime<Utc>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .and_then(|p| {
            let cert = p.parse_x509().ok()?;
            DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        })
}

/// What the proxy is doing, as the reconcile found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyState {
    /// The current config runs on every proxy task (`proxies` of them).
    Serving {
        config: String,
        delivery: String,
        proxies: usize,
    },
    /// Tasks are starting or being updated.
    Starting(String),
    /// berth cannot run the proxy (a service it does not own has the name, the engine refused it).
    Refused(String),
}

/// A proxy task whose admin endpoint berth could not reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreached {
    pub node: String,
    pub why: String,
    /// The task started, or first failed to answer, moments ago: Caddy may not have opened the
    /// endpoint yet, or be swapping its certificate. Worth waiting for, not restarting.
    pub just_started: bool,
}

/// What a delivery attempt comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Report this state (serving, or waiting for a starting task).
    State(ProxyState),
    /// Some task cannot take the config live: take the restart path.
    Restart { node: String, why: String },
}

/// Decides from one delivery attempt of `config` to `total` running proxy tasks: `loaded` of them
/// took it live just now, `unreached` could not be asked, the rest already ran it.
/// `booted_with_it`: every task booted from this config; `boot_is_config`: it is also the service's
/// boot config.
pub fn verdict(
    config: &str,
    total: usize,
    loaded: usize,
    unreached: &[Unreached],
    booted_with_it: bool,
    boot_is_config: bool,
) -> Verdict {
    let served = |how: &str| {
        Verdict::State(ProxyState::Serving {
            config: config.to_string(),
            delivery: how.to_string(),
            proxies: total,
        })
    };
    let Some(first) = unreached.first() else {
        // Booted with it and never needed a load: the restart got it there.
        return served(if loaded == 0 && booted_with_it && boot_is_config {
            delivery::RESTART
        } else {
            delivery::LIVE
        });
    };
    if booted_with_it {
        // A task that booted from this config runs it (or a newer load of berth's).
        return served(delivery::RESTART);
    }
    if unreached.iter().all(|u| u.just_started) {
        // A task that just started opens its admin endpoint once Caddy has issued its certificate,
        // and a load swaps that certificate: wait a little before restarting anything.
        return Verdict::State(ProxyState::Starting(format!(
            "{} of {total} proxies serve config `{config}`; waiting for the admin endpoint on node {}: {}",
            total - unreached.len(),
            first.node,
            first.why
        )));
    }
    let old = unreached.iter().find(|u| !u.just_started).unwrap_or(first);
    Verdict::Restart {
        node: old.node.clone(),
        why: old.why.clone(),
    }
}

/// Status for a spec that does not validate.
pub fn invalid(
    current: &IngressStatus,
    generation: u64,
    message: &str,
    now: DateTime<Utc>,
) -> IngressStatus {
    not_accepted(current, generation, reasons::INVALID_SPEC, message, now)
}

impl ObjectStatus for IngressStatus {
    fn refused(&self, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) -> Self {
        not_accepted(self, generation, reason, message, now)
    }
}

/// Status for an Ingress berth does not route: nothing of it is served.
fn not_accepted(
    current: &IngressStatus,
    generation: u64,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) -> IngressStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    s.urls.clear();
    s.config = None;
    s.delivery = None;
    s.proxies = None;
    s.ca_certificate = None;
    s.certificate_not_after = None;
    let c = &mut s.conditions;
    set_condition(c, conditions::ACCEPTED, False, reason, message, now);
    set_condition(c, conditions::READY, False, reason, message, now);
    s
}

/// Status from the planner's verdict and the proxy's state.
pub fn observed(
    current: &IngressStatus,
    generation: u64,
    outcome: &Outcome,
    proxy_name: &str,
    proxy: &ProxyState,
    ca_pem: Option<&str>,
    now: DateTime<Utc>,
) -> IngressStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    s.urls = outcome.urls.clone();
    s.proxy = Some(proxy_name.to_string());
    s.ca_certificate = outcome
        .internal_tls
        .then(|| ca_pem.map(str::to_string))
        .flatten();
    let c = &mut s.conditions;

    let lost_everything = outcome.urls.is_empty();
    if lost_everything && !outcome.conflicts.is_empty() {
        set_condition(
            c,
            conditions::ACCEPTED,
            False,
            reasons::CONFLICT,
            "every route of this Ingress belongs to an older Ingress",
            now,
        );
    } else {
        set_condition(c, conditions::ACCEPTED, True, reasons::ACCEPTED, "", now);
    }

    if outcome.conflicts.is_empty() {
        set_condition(
            c,
            conditions::CONFLICT,
            False,
            reasons::NO_CONFLICT,
            "",
            now,
        );
    } else {
        set_condition(
            c,
            conditions::CONFLICT,
            True,
            reasons::CONFLICT,
            &outcome.conflicts.join("; "),
            now,
        );
    }

    match outcome.missing.first() {
        None => set_condition(
            c,
            conditions::BACKEND_MISSING,
            False,
            reasons::BACKENDS_FOUND,
            "",
            now,
        ),
        Some((kind, _)) => {
            let reason = match kind {
                Missing::Service => reasons::SERVICE_MISSING,
                Missing::Port => reasons::PORT_NOT_EXPOSED,
                Missing::Secret => reasons::SECRET_MISSING,
            };
            let all: Vec<&str> = outcome.missing.iter().map(|(_, m)| m.as_str()).collect();
            set_condition(
                c,
                conditions::BACKEND_MISSING,
                True,
                reason,
                &all.join("; "),
                now,
            )
        }
    };

    let (ready, reason, message, config, how, proxies) = match proxy {
        _ if lost_everything => (
            false,
            reasons::NO_ROUTES,
            "no route of this Ingress is served".to_string(),
            None,
            None,
            None,
        ),
        ProxyState::Serving {
            config,
            delivery,
            proxies,
        } => (
            true,
            reasons::SERVING,
            format!(
                "served by `{proxy_name}` on {proxies} node{} (config `{config}`, delivered by {delivery})",
                if *proxies == 1 { "" } else { "s" }
            ),
            Some(config.clone()),
            Some(delivery.clone()),
            Some(*proxies as u64),
        ),
        ProxyState::Starting(m) => (
            false,
            reasons::PROXY_STARTING,
            m.clone(),
            s.config.clone(),
            s.delivery.clone(),
            s.proxies,
        ),
        ProxyState::Refused(m) => (false, reasons::PROXY_REFUSED, m.clone(), None, None, None),
    };
    set_condition(c, conditions::READY, ready.into(), reason, &message, now);
    s.config = config;
    s.delivery = how;
    s.proxies = proxies;
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::meta::condition;
    use berth_api_types::ConditionStatus;

    #[test]
    fn the_certificate_expiry_is_read_from_a_key_and_certificate_pem() {
        let mut params = rcgen::CertificateParams::new(vec!["shop.example".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 3, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // As the proxy gets it from a Secret: the key first, then the certificate.
        let pem = format!("{}{}", key.serialize_pem(), cert.pem());
        assert_eq!(
            not_after(pem.as_bytes()).map(|t| t.to_rfc3339()),
            Some("2031-03-04T00:00:00+00:00".to_string())
        );
        assert_eq!(not_after(b"not a certificate"), None);
    }

    fn cond(s: &IngressStatus, t: &str) -> (ConditionStatus, String, String) {
        let c = condition(&s.conditions, t).unwrap();
        (c.status, c.reason.clone(), c.message.clone())
    }

    fn serving() -> ProxyState {
        ProxyState::Serving {
            config: "lb-0123".into(),
            delivery: delivery::LIVE.into(),
            proxies: 2,
        }
    }

    #[test]
    fn serving_conflicting_and_missing() {
        let now = Utc::now();
        let ok = Outcome {
            urls: vec!["https://a.test/".into()],
            internal_tls: true,
            ..Default::default()
        };
        let s = observed(
            &IngressStatus::default(),
            3,
            &ok,
            "lb",
            &serving(),
            Some("PEM"),
            now,
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(cond(&s, "Ready").0, ConditionStatus::True);
        assert_eq!(
            cond(&s, "Ready").2,
            "served by `lb` on 2 nodes (config `lb-0123`, delivered by live)"
        );
        assert_eq!(s.proxies, Some(2));
        assert_eq!(cond(&s, "Conflict").0, ConditionStatus::False);
        assert_eq!(cond(&s, "BackendMissing").0, ConditionStatus::False);
        assert_eq!(s.ca_certificate.as_deref(), Some("PEM"));
        assert_eq!(s.delivery.as_deref(), Some("live"));

        let lost = Outcome {
            conflicts: vec!["host `a.test` path `/` is already routed by Ingress `x`".into()],
            ..Default::default()
        };
        let s2 = observed(&s, 4, &lost, "lb", &serving(), Some("PEM"), now);
        assert_eq!(cond(&s2, "Accepted").0, ConditionStatus::False);
        assert_eq!(
            cond(&s2, "Conflict"),
            (
                ConditionStatus::True,
                "HostPathConflict".into(),
                "host `a.test` path `/` is already routed by Ingress `x`".into()
            )
        );
        assert_eq!(cond(&s2, "Ready").1, "NoRoutes");
        assert!(s2.ca_certificate.is_none());

        let missing = Outcome {
            urls: vec!["https://a.test/".into()],
            missing: vec![
                (Missing::Service, "Service `web` does not exist".into()),
                (Missing::Secret, "Secret `t` does not exist".into()),
            ],
            ..Default::default()
        };
        let s3 = observed(
            &IngressStatus::default(),
            1,
            &missing,
            "lb",
            &ProxyState::Starting("1 of 1 proxy tasks starting".into()),
            None,
            now,
        );
        assert_eq!(
            cond(&s3, "BackendMissing"),
            (
                ConditionStatus::True,
                "ServiceMissing".into(),
                "Service `web` does not exist; Secret `t` does not exist".into()
            )
        );
        assert_eq!(cond(&s3, "Ready").1, "ProxyStarting");
        assert_eq!(cond(&s3, "Accepted").0, ConditionStatus::True);
    }

    #[test]
    fn delivery_verdicts() {
        let serving = |how: &str| {
            Verdict::State(ProxyState::Serving {
                config: "c".into(),
                delivery: how.into(),
                proxies: 2,
            })
        };
        // Every task already ran it since it booted from it: the restart delivered it.
        assert_eq!(verdict("c", 2, 0, &[], true, true), serving("restart"));
        // Loaded into one task now, or running a config loaded earlier: live.
        assert_eq!(verdict("c", 2, 1, &[], true, true), serving("live"));
        assert_eq!(verdict("c", 2, 0, &[], false, false), serving("live"));
        let young = Unreached {
            node: "n2".into(),
            why: "connection refused".into(),
            just_started: true,
        };
        let old = Unreached {
            just_started: false,
            node: "n3".into(),
            ..young.clone()
        };
        // Unreachable, but it booted from this config: it serves it.
        assert_eq!(
            verdict("c", 2, 0, std::slice::from_ref(&old), true, true),
            serving("restart")
        );
        // A task that just started gets time to open its endpoint.
        assert_eq!(
            verdict("c", 2, 1, std::slice::from_ref(&young), false, false),
            Verdict::State(ProxyState::Starting(
                "1 of 2 proxies serve config `c`; waiting for the admin endpoint on node n2: connection refused".into()
            ))
        );
        // One that had that time: the restart path, naming it.
        assert_eq!(
            verdict("c", 3, 0, &[young, old], false, false),
            Verdict::Restart {
                node: "n3".into(),
                why: "connection refused".into()
            }
        );
    }

    #[test]
    fn invalid_and_refused() {
        let now = Utc::now();
        let s = invalid(&IngressStatus::default(), 2, "spec.tls: bad", now);
        assert_eq!(cond(&s, "Accepted").1, "InvalidSpec");
        assert_eq!(cond(&s, "Ready").0, ConditionStatus::False);
        let ok = Outcome {
            urls: vec!["https://a.test/".into()],
            ..Default::default()
        };
        let s = observed(
            &s,
            2,
            &ok,
            "lb",
            &ProxyState::Refused("taken".into()),
            None,
            now,
        );
        assert_eq!(
            cond(&s, "Ready"),
            (
                ConditionStatus::False,
                "ProxyRefused".into(),
                "taken".into()
            )
        );
        assert_eq!(cond(&s, "Accepted").0, ConditionStatus::True);
    }
}
