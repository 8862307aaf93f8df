//! Registry: credentials for a private image registry. The password lives in a Secret so it is
//! sealed at rest and never appears in a Registry's spec, status or events; the Registry names the
//! server and the user and points at the Secret key.
//!
//! A Registry applies to every Service whose image is pulled from its server (see
//! [`crate::image::ImageRef::registry_host`]): berth sends the credentials with each create and
//! update of such a Swarm service.

use crate::image::{check_registry_host, normalize_registry_host};
use crate::meta::{Condition, Object};
use crate::validate::{check_dns_label, check_envelope, Errors, FieldError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub type Registry = Object<RegistrySpec, RegistryStatus>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistrySpec {
    /// `host[:port]` as it appears in image references, e.g. `registry.example.com` or
    /// `127.0.0.1:5000`; `docker.io` for Docker Hub.
    pub server: String,
    pub username: String,
    /// The Secret key holding the password (or access token).
    pub password_secret_ref: SecretKeyRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

impl RegistrySpec {
    /// The server in the form image references are matched against.
    pub fn host(&self) -> String {
        normalize_registry_host(&self.server)
    }
}

/// One key of a Secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The Secret's resourceVersion the last check used: a rotated password is checked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_resource_version: Option<String>,
    /// When the registry last answered a login check (successfully or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<DateTime<Utc>>,
}

pub mod conditions {
    /// The registry accepted the credentials. False with reason `Rejected` (the registry said no),
    /// `Unreachable` (retried with backoff), `SecretMissing`, `Duplicate` or `InvalidSpec`.
    pub const AUTHENTICATED: &str = "Authenticated";
}

pub fn validate_registry(
    r: &Object<RegistrySpec, serde_json::Value>,
) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &r.api_version, &r.metadata);
    let server = r.spec.server.as_str();
    if server.is_empty() {
        errors.add("spec.server", "must not be empty");
    } else if let Some((scheme, _)) = server.split_once("://") {
        errors.add(
            "spec.server",
            format!(
                "`{server}` has a scheme (`{scheme}://`): give host[:port] only, as in image names"
            ),
        );
    } else if server.contains('/') {
        errors.add(
            "spec.server",
            format!("`{server}` has a path: give host[:port] only, as in image names"),
        );
    } else if let Err(why) = check_registry_host(server) {
        errors.add("spec.server", why);
    }
    let user = r.spec.username.as_str();
    if user.is_empty() {
        errors.add("spec.username", "must not be empty");
    } else if user.contains(':') || user.chars().any(char::is_control) {
        // Basic auth joins user and password with `:`.
        errors.add(
            "spec.username",
            "must not contain `:` or control characters",
        );
    }
    check_dns_label(
        &mut errors,
        "spec.passwordSecretRef.name",
        &r.spec.password_secret_ref.name,
    );
    if r.spec.password_secret_ref.key.is_empty() {
        errors.add("spec.passwordSecretRef.key", "must not be empty");
    }
    if r.spec.email.as_deref().is_some_and(|e| !e.contains('@')) {
        errors.add("spec.email", "is not an e-mail address");
    }
    errors.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::typed::decode_object;
    use serde_json::json;

    fn doc(spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": crate::API_VERSION, "kind": "Registry",
               "metadata": {"name": "team"}, "spec": spec})
    }

    fn errors(spec: serde_json::Value) -> Vec<String> {
        match decode_object(&doc(spec)) {
            Ok(_) => Vec::new(),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn accepts_a_registry() {
        let spec = json!({"server": "127.0.0.1:5000", "username": "ci",
                          "passwordSecretRef": {"name": "reg-pass", "key": "password"}});
        let obj = decode_object(&doc(spec)).unwrap();
        let r: RegistrySpec = serde_json::from_value(obj.spec).unwrap();
        assert_eq!(r.host(), "127.0.0.1:5000");
        let hub = RegistrySpec {
            server: "Index.Docker.io".into(),
            ..r
        };
        assert_eq!(hub.host(), "docker.io");
    }

    #[test]
    fn names_each_bad_field() {
        let e = errors(
            json!({"server": "https://reg.example.com", "username": "a:b",
                              "passwordSecretRef": {"name": "Bad_Name", "key": ""},
                              "email": "nope"}),
        );
        let all = e.join("\n");
        for want in [
            "spec.server: `https://reg.example.com` has a scheme",
            "spec.username: must not contain `:`",
            "spec.passwordSecretRef.name: `Bad_Name` must be a DNS label",
            "spec.passwordSecretRef.key: must not be empty",
            "spec.email: is not an e-mail address",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        let e = errors(json!({"server": "reg.example.com/v2", "username": "u",
                              "passwordSecretRef": {"name": "p", "key": "k"}}));
        assert!(e[0].contains("has a path"), "{e:?}");
        let e = errors(json!({"server": "reg.example.com:0", "username": "u",
                              "passwordSecretRef": {"name": "p", "key": "k"}}));
        assert!(e[0].contains("not a port number"), "{e:?}");
    }

    #[test]
    fn the_password_cannot_be_inlined() {
        let e = errors(
            json!({"server": "r.example.com", "username": "u", "password": "hunter2",
                              "passwordSecretRef": {"name": "p", "key": "k"}}),
        );
        assert!(e[0].contains("unknown field `password`"), "{e:?}");
        assert!(
            !e[0].contains("hunter2"),
            "the value must not be echoed: {e:?}"
        );
    }
}
