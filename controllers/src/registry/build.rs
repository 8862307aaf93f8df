//! Registry, step 2 (pure): the login check to make, if one is due. A check is made when the
//! Registry or its password changed, or the last answer is older than `status::RECHECK`.

use super::status::next_check;
use berth_api_types::registry::{RegistrySpec, RegistryStatus};
use chrono::{DateTime, Utc};
use std::fmt;
use std::time::Duration;

/// One login to make.
pub struct Check {
    pub host: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("host", &self.host)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The check to make now, or how long until the next periodic one.
pub fn build(
    spec: &RegistrySpec,
    password: &str,
    current: &RegistryStatus,
    generation: u64,
    secret_version: &str,
    now: DateTime<Utc>,
) -> Result<Check, Duration> {
    match next_check(current, generation, secret_version, now) {
        Some(wait) => Err(wait),
        None => Ok(Check {
            host: spec.host(),
            username: spec.username.clone(),
            password: password.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::registry::SecretKeyRef;

    #[test]
    fn a_check_never_shows_its_password() {
        let spec = RegistrySpec {
            server: "127.0.0.1:5000".into(),
            username: "ci".into(),
            password_secret_ref: SecretKeyRef {
                name: "p".into(),
                key: "k".into(),
            },
            email: None,
        };
        let now = chrono::Utc::now();
        let check = build(&spec, "hunter2", &RegistryStatus::default(), 1, "7", now).unwrap();
        assert_eq!(check.host, "127.0.0.1:5000");
        assert!(!format!("{check:?}").contains("hunter2"));
    }
}
