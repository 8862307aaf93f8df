//! The Ingress kind: domain names mapped to Services through berth's HTTPS-only load balancer.
//!
//! A Service is reachable only on berth's internal networks; an Ingress is what exposes one of its
//! ports to the outside, as `https://HOST/PATH...`, with a certificate from a Secret (`tls.crt` and
//! `tls.key`) or from the internal CA berth manages. Plain HTTP only ever answers a redirect to
//! HTTPS. Several Ingresses share one proxy; which one wins a contested host and path is decided by
//! the controller (the oldest), and reported in status.

use crate::meta::Object;
use crate::validate::{check_dns_label, check_envelope, Errors, FieldError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Ingress = Object<IngressSpec, serde_json::Value>;

/// Name of the load-balancer Swarm service when none is configured (`--ingress-name`).
pub const DEFAULT_PROXY_NAME: &str = "berth-ingress";

/// The Secret keys a `tls.secretRef` must have (the Kubernetes TLS secret convention).
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

/// Longest host name DNS allows.
const MAX_HOST: usize = 253;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressSpec {
    /// One rule per host.
    pub rules: Vec<IngressRule>,
    /// Where the certificate for every host of this Ingress comes from. Required: there is no plain
    /// HTTP service.
    pub tls: IngressTls,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// A DNS name such as `app.example.com` (lower case, no wildcard, no port).
    pub host: String,
    pub paths: Vec<IngressPath>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressPath {
    /// A path prefix, matched by whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    /// The longest matching prefix of a host wins. The path is passed on unchanged.
    pub path: String,
    /// The berth Service that receives the requests.
    pub service: String,
    /// The port the Service's containers listen on (the one its image exposes).
    pub port: u32,
}

/// Exactly one of `secretRef` and `mode`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressTls {
    /// A Secret with keys `tls.crt` (PEM chain) and `tls.key` (PEM private key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// `internal`: certificates issued by berth's own CA (see the Ingress status for its root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TlsMode>,
    /// `Strict-Transport-Security` on every response; on unless set to `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Internal,
}

/// Where a host's certificate comes from, once validated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsSource {
    Secret(String),
    Internal,
}

impl IngressTls {
    pub fn hsts(&self) -> bool {
        self.hsts.unwrap_or(true)
    }

    /// The certificate source (`Internal` for a spec that failed validation, never used as such).
    pub fn source(&self) -> TlsSource {
        match &self.secret_ref {
            Some(s) => TlsSource::Secret(s.clone()),
            None => TlsSource::Internal,
        }
    }
}

/// A DNS name: dot-separated DNS labels, at most 253 characters.
pub fn check_host(errors: &mut Errors, path: &str, host: &str) {
    if host.is_empty() {
        errors.add(path, "must not be empty");
        return;
    }
    if host.len() > MAX_HOST {
        errors.add(path, format!("is longer than {MAX_HOST} characters"));
        return;
    }
    if host.contains('*') {
        errors.add(path, format!("`{host}`: wildcard hosts are not supported"));
        return;
    }
    if host.contains(':') {
        errors.add(
            path,
            format!("`{host}` must be a host name without a port (the proxy serves 443)"),
        );
        return;
    }
    let mut label_errors = Errors::default();
    for label in host.split('.') {
        check_dns_label(&mut label_errors, path, label);
    }
    if !label_errors.0.is_empty() {
        errors.add(
            path,
            format!("`{host}` must be a DNS name: lower-case labels of letters, digits and `-`, separated by dots"),
        );
    }
}

/// A path prefix: starts with `/`, and nothing the proxy would read as a pattern or a query.
fn check_path(errors: &mut Errors, path: &str, value: &str) {
    if !value.starts_with('/') {
        errors.add(path, format!("`{value}` must start with `/`"));
    } else if value
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '?' | '#' | '%'))
    {
        errors.add(
            path,
            format!("`{value}` must be a plain path prefix (no `*`, `?`, `#`, `%` or whitespace)"),
        );
    } else if value.split('/').any(|s| s == ".." || s == ".") {
        errors.add(
            path,
            format!("`{value}` must not contain `.` or `..` segments"),
        );
    }
}

impl IngressSpec {
    /// Rules the types cannot express. Paths are relative to the object (`spec.…`).
    pub fn validate(&self, errors: &mut Errors) {
        if self.rules.is_empty() {
            errors.add("spec.rules", "needs at least one rule");
        }
        let mut hosts: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            check_host(errors, &format!("{at}.host"), &rule.host);
            if let Some(first) = hosts.insert(&rule.host, i) {
                errors.add(
                    format!("{at}.host"),
                    format!(
                        "`{}` is already listed in spec.rules[{first}]; put all its paths in one rule",
                        rule.host
                    ),
                );
                hosts.insert(&rule.host, first);
            }
            if rule.paths.is_empty() {
                errors.add(format!("{at}.paths"), "needs at least one path");
            }
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            for (j, p) in rule.paths.iter().enumerate() {
                let pat = format!("{at}.paths[{j}]");
                check_path(errors, &format!("{pat}.path"), &p.path);
                if let Some(first) = seen.insert(normalise_path(&p.path), j) {
                    errors.add(
                        format!("{pat}.path"),
                        format!("`{}` is the same prefix as paths[{first}]", p.path),
                    );
                }
                check_dns_label(errors, &format!("{pat}.service"), &p.service);
                if !(1..=65535).contains(&p.port) {
                    errors.add(
                        format!("{pat}.port"),
                        format!("{} is out of range (1 to 65535)", p.port),
                    );
                }
            }
        }
        match (&self.tls.secret_ref, &self.tls.mode) {
            (Some(s), None) => check_dns_label(errors, "spec.tls.secretRef", s),
            (None, Some(_)) => {}
            (Some(_), Some(_)) => errors.add(
                "spec.tls",
                "set exactly one of `secretRef` and `mode`, not both",
            ),
            (None, None) => errors.add(
                "spec.tls",
                "set exactly one of `secretRef` (a Secret with tls.crt and tls.key) and `mode: internal`",
            ),
        }
    }
}

/// The prefix with one trailing `/` removed (except for `/` itself): `/api` and `/api/` route the
/// same requests, so they are the same prefix.
pub fn normalise_path(path: &str) -> &str {
    if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    }
}

/// Validates a whole Ingress object: the shared envelope rules, then the spec's own.
pub fn validate_ingress(ing: &Ingress) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &ing.api_version, &ing.metadata);
    ing.spec.validate(&mut errors);
    errors.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(spec: serde_json::Value) -> Result<Ingress, String> {
        serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": "Ingress",
            "metadata": {"name": "shop"}, "spec": spec
        }))
        .map_err(|e| e.to_string())
    }

    fn problems(spec: serde_json::Value) -> Vec<String> {
        match validate_ingress(&ingress(spec).unwrap()) {
            Ok(()) => vec![],
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    fn rule(host: &str, path: &str, port: u32) -> serde_json::Value {
        json!({"host": host, "paths": [{"path": path, "service": "web", "port": port}]})
    }

    #[test]
    fn valid_specs() {
        let i = ingress(json!({
            "rules": [
                {"host": "app.example.com", "paths": [
                    {"path": "/", "service": "web", "port": 8080},
                    {"path": "/api", "service": "api", "port": 9000}]},
                rule("example.com", "/", 80)
            ],
            "tls": {"secretRef": "shop-tls"}
        }))
        .unwrap();
        assert_eq!(validate_ingress(&i), Ok(()));
        assert!(i.spec.tls.hsts());
        assert_eq!(i.spec.tls.source(), TlsSource::Secret("shop-tls".into()));
        let i = ingress(json!({"rules": [rule("a.test", "/", 1)],
            "tls": {"mode": "internal", "hsts": false}}))
        .unwrap();
        assert_eq!(validate_ingress(&i), Ok(()));
        assert!(!i.spec.tls.hsts());
        assert_eq!(i.spec.tls.source(), TlsSource::Internal);
    }

    #[test]
    fn type_errors_are_precise() {
        let e = ingress(json!({"rules": [], "tls": {"mode": "acme"}})).unwrap_err();
        assert!(e.contains("unknown variant `acme`"), "{e}");
        let e = ingress(json!({"rules": [rule("a.test", "/", 1)]})).unwrap_err();
        assert!(e.contains("missing field `tls`"), "{e}");
        let e = ingress(json!({"rules": [{"host": "a.test", "paths": [
            {"path": "/", "service": "web", "port": -1}]}], "tls": {"mode": "internal"}}))
        .unwrap_err();
        assert!(e.contains("invalid value: integer `-1`"), "{e}");
        let e = ingress(json!({"rules": [], "tls": {"secretref": "x"}})).unwrap_err();
        assert!(e.contains("unknown field `secretref`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let internal = json!({"mode": "internal"});
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"rules": [], "tls": internal}),
                "spec.rules: needs at least one rule",
            ),
            (
                json!({"rules": [rule("App.example.com", "/", 80)], "tls": internal}),
                "spec.rules[0].host: `App.example.com` must be a DNS name",
            ),
            (
                json!({"rules": [rule("a..b", "/", 80)], "tls": internal}),
                "spec.rules[0].host: `a..b` must be a DNS name",
            ),
            (
                json!({"rules": [rule("*.example.com", "/", 80)], "tls": internal}),
                "spec.rules[0].host: `*.example.com`: wildcard hosts are not supported",
            ),
            (
                json!({"rules": [rule("a.test:8443", "/", 80)], "tls": internal}),
                "spec.rules[0].host: `a.test:8443` must be a host name without a port",
            ),
            (
                json!({"rules": [rule("a.test", "/", 80), rule("a.test", "/x", 80)], "tls": internal}),
                "spec.rules[1].host: `a.test` is already listed in spec.rules[0]",
            ),
            (
                json!({"rules": [rule("a.test", "api", 80)], "tls": internal}),
                "spec.rules[0].paths[0].path: `api` must start with `/`",
            ),
            (
                json!({"rules": [rule("a.test", "/api*", 80)], "tls": internal}),
                "spec.rules[0].paths[0].path: `/api*` must be a plain path prefix",
            ),
            (
                json!({"rules": [rule("a.test", "/a/../b", 80)], "tls": internal}),
                "spec.rules[0].paths[0].path: `/a/../b` must not contain",
            ),
            (
                json!({"rules": [{"host": "a.test", "paths": [
                    {"path": "/api", "service": "web", "port": 80},
                    {"path": "/api/", "service": "web", "port": 80}]}], "tls": internal}),
                "spec.rules[0].paths[1].path: `/api/` is the same prefix as paths[0]",
            ),
            (
                json!({"rules": [{"host": "a.test", "paths": []}], "tls": internal}),
                "spec.rules[0].paths: needs at least one path",
            ),
            (
                json!({"rules": [rule("a.test", "/", 0)], "tls": internal}),
                "spec.rules[0].paths[0].port: 0 is out of range (1 to 65535)",
            ),
            (
                json!({"rules": [rule("a.test", "/", 65536)], "tls": internal}),
                "spec.rules[0].paths[0].port: 65536 is out of range",
            ),
            (
                json!({"rules": [{"host": "a.test", "paths": [
                    {"path": "/", "service": "Web_1", "port": 80}]}], "tls": internal}),
                "spec.rules[0].paths[0].service: `Web_1` must be a DNS label",
            ),
            (
                json!({"rules": [rule("a.test", "/", 80)], "tls": {}}),
                "spec.tls: set exactly one of `secretRef`",
            ),
            (
                json!({"rules": [rule("a.test", "/", 80)],
                       "tls": {"mode": "internal", "secretRef": "x"}}),
                "spec.tls: set exactly one of `secretRef` and `mode`, not both",
            ),
            (
                json!({"rules": [rule("a.test", "/", 80)], "tls": {"secretRef": "X"}}),
                "spec.tls.secretRef: `X` must be a DNS label",
            ),
        ];
        for (spec, want) in cases {
            let got = problems(spec.clone());
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{spec}: want {want:?}, got {got:?}"
            );
        }
        let long = format!("{}.test", "a.".repeat(130));
        assert!(
            problems(json!({"rules": [rule(&long, "/", 80)], "tls": internal}))[0]
                .contains("longer than 253")
        );
    }

    #[test]
    fn prefixes_normalise() {
        assert_eq!(normalise_path("/"), "/");
        assert_eq!(normalise_path("/api/"), "/api");
        assert_eq!(normalise_path("/api"), "/api");
    }
}
