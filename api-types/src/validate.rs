//! Semantic validation shared by every kind: field-addressed errors, and the rules every object obeys
//! (apiVersion, names, labels). Type-level errors (wrong type, unknown field) come from deserialization;
//! these are the rules a type cannot express.

use crate::names::{labels, API_VERSION};
use std::fmt;

/// One problem with one field. `path` uses the manifest form (`spec.env[2].name`) so the manifest
/// loader can turn it into a file, line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Collects errors so a user sees every problem of a manifest at once.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    pub fn into_result(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// A DNS label (RFC 1123): what Swarm accepts as a service name and what fits in a hostname.
pub fn check_dns_label(errors: &mut Errors, path: &str, value: &str) {
    if value.is_empty() {
        errors.add(path, "must not be empty");
    } else if value.len() > 63 {
        errors.add(path, format!("`{value}` is longer than 63 characters"));
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || value.starts_with('-')
        || value.ends_with('-')
    {
        errors.add(
            path,
            format!("`{value}` must be a DNS label: lower-case letters, digits and `-`, starting and ending with a letter or digit"),
        );
    }
}

/// Label keys users set; berth's own prefix is reserved so a user label cannot impersonate ownership.
pub fn check_label_key(errors: &mut Errors, path: &str, key: &str) {
    if key.is_empty() {
        errors.add(path, "label keys must not be empty");
    } else if key.starts_with(labels::PREFIX) {
        errors.add(
            format!("{path}.{key}"),
            format!("label prefix `{}` is reserved for berth", labels::PREFIX),
        );
    } else if key.len() > 253 || key.chars().any(|c| c.is_whitespace() || c == '=') {
        errors.add(
            format!("{path}.{key}"),
            "label keys must be at most 253 characters without whitespace or `=`",
        );
    }
}

/// Checks the envelope fields every kind shares.
pub fn check_envelope(errors: &mut Errors, api_version: &str, meta: &crate::meta::ObjectMeta) {
    if api_version != API_VERSION {
        errors.add(
            "apiVersion",
            format!("`{api_version}` is not served; use `{API_VERSION}`"),
        );
    }
    check_dns_label(errors, "metadata.name", &meta.name);
    for key in meta.labels.keys() {
        check_label_key(errors, "metadata.labels", key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(f: impl Fn(&mut Errors)) -> Vec<String> {
        let mut e = Errors::default();
        f(&mut e);
        e.0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn dns_labels() {
        assert!(errs(|e| check_dns_label(e, "n", "web-1")).is_empty());
        assert_eq!(
            errs(|e| check_dns_label(e, "n", "")),
            ["n: must not be empty"]
        );
        assert!(errs(|e| check_dns_label(e, "n", "Web"))[0].contains("must be a DNS label"));
        assert!(errs(|e| check_dns_label(e, "n", "-web"))[0].contains("must be a DNS label"));
        assert!(errs(|e| check_dns_label(e, "n", "web_1"))[0].contains("must be a DNS label"));
        assert!(errs(|e| check_dns_label(e, "n", &"a".repeat(64)))[0].contains("longer than 63"));
    }

    #[test]
    fn reserved_label_prefix() {
        let e = errs(|e| check_label_key(e, "spec.labels", "io.berth.uid"));
        assert_eq!(
            e,
            ["spec.labels.io.berth.uid: label prefix `io.berth.` is reserved for berth"]
        );
    }
}
