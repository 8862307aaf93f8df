//! The NATS connection options, defined once and flattened into every command that talks to NATS
//! (`berth up`, `berth api`, `berth controller KIND`), so they read the same everywhere.
//!
//! The URL itself stays with each command: `berth controller` requires it, `up` and `api` run on
//! the embedded bus without it. Passwords and tokens are read from the environment only: a
//! command line is visible to every user of the machine through `ps`.

use berth_controllers::bus::NatsSettings;
use clap::Args;
use std::path::PathBuf;

/// The environment variables holding NATS secrets (not options: see the module docs).
pub const PASSWORD_ENV: &str = "BERTH_NATS_PASSWORD";
pub const TOKEN_ENV: &str = "BERTH_NATS_TOKEN";

#[derive(Args, Clone, Debug, Default)]
pub struct NatsAuthArgs {
    /// NATS credentials file (user JWT and NKey seed, as `nsc` writes them).
    #[arg(long, env = "BERTH_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// File holding an NKey user seed (`SU...`), for servers that list users by NKey.
    #[arg(long, env = "BERTH_NATS_NKEY", value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,
    /// NATS user name; the password comes from BERTH_NATS_PASSWORD (a token, without a user,
    /// from BERTH_NATS_TOKEN). Credentials in the URL (`nats://user:password@host`) work too.
    #[arg(long, env = "BERTH_NATS_USER")]
    pub nats_user: Option<String>,
    /// Root certificate(s), PEM, that the NATS server's certificate must chain to (for `tls://`
    /// URLs and servers that require TLS). Given, berth never connects without TLS.
    #[arg(long, env = "BERTH_NATS_CA", value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate, PEM, for NATS servers that verify clients (`verify: true`).
    #[arg(
        long,
        env = "BERTH_NATS_TLS_CERT",
        value_name = "FILE",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's private key, PEM.
    #[arg(
        long,
        env = "BERTH_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsAuthArgs {
    /// The settings for connecting to `url`, secrets taken from the environment.
    pub fn settings(&self, url: &str) -> NatsSettings {
        self.settings_with(url, |name| std::env::var(name).ok())
    }

    fn settings_with(&self, url: &str, env: impl Fn(&str) -> Option<String>) -> NatsSettings {
        // An empty variable is as good as unset (`BERTH_NATS_TOKEN=` in a unit file).
        let secret = |name: &str| env(name).filter(|v| !v.is_empty());
        NatsSettings {
            url: url.to_string(),
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
            user: self.nats_user.clone(),
            password: secret(PASSWORD_ENV),
            token: secret(TOKEN_ENV),
            ca: self.nats_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_the_environment() {
        let args = NatsAuthArgs {
            nats_user: Some("berth-api".into()),
            nats_ca: Some("/etc/berth/nats-ca.pem".into()),
            ..Default::default()
        };
        let s = args.settings_with("tls://nats:4222", |name| match name {
            PASSWORD_ENV => Some("pw".into()),
            TOKEN_ENV => Some(String::new()),
            _ => None,
        });
        assert_eq!(s.url, "tls://nats:4222");
        assert_eq!(s.user.as_deref(), Some("berth-api"));
        assert_eq!(s.password.as_deref(), Some("pw"));
        assert_eq!(s.token, None, "an empty variable is unset");
        assert_eq!(s.ca, Some(PathBuf::from("/etc/berth/nats-ca.pem")));
    }
}
