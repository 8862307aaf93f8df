//! The kinds berth serves and their spellings (manifest `kind`, API plural, event subject segment).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A resource kind. Every kind shares the envelope in [`crate::meta`]; each has its own spec type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Service,
    Secret,
    Config,
    Volume,
    Network,
    Node,
    Ingress,
    Registry,
    Backup,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Service,
        Kind::Secret,
        Kind::Config,
        Kind::Volume,
        Kind::Network,
        Kind::Node,
        Kind::Ingress,
        Kind::Registry,
        Kind::Backup,
    ];

    /// The `kind:` value in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Secret => "Secret",
            Kind::Config => "Config",
            Kind::Volume => "Volume",
            Kind::Network => "Network",
            Kind::Node => "Node",
            Kind::Ingress => "Ingress",
            Kind::Registry => "Registry",
            Kind::Backup => "Backup",
        }
    }

    /// Lower-case singular, used in NATS subjects and object keys.
    pub fn lower(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Secret => "secret",
            Kind::Config => "config",
            Kind::Volume => "volume",
            Kind::Network => "network",
            Kind::Node => "node",
            Kind::Ingress => "ingress",
            Kind::Registry => "registry",
            Kind::Backup => "backup",
        }
    }

    /// The API collection name.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Secret => "secrets",
            Kind::Config => "configs",
            Kind::Volume => "volumes",
            Kind::Network => "networks",
            Kind::Node => "nodes",
            Kind::Ingress => "ingresses",
            Kind::Registry => "registries",
            Kind::Backup => "backups",
        }
    }

    /// Whether this version of berth has a spec type (and so an API) for the kind. The others are
    /// named everywhere already so their subjects, paths and labels are fixed before they ship.
    pub fn is_served(self) -> bool {
        matches!(
            self,
            Kind::Service
                | Kind::Secret
                | Kind::Config
                | Kind::Volume
                | Kind::Network
                | Kind::Node
                | Kind::Registry
                | Kind::Ingress
                | Kind::Backup
        )
    }

    /// Whether a controller reconciles the kind and reports conditions in its status. Secrets,
    /// Configs and Volumes are data that Services use: they are in effect once stored.
    pub fn is_reconciled(self) -> bool {
        matches!(
            self,
            Kind::Service
                | Kind::Network
                | Kind::Node
                | Kind::Registry
                | Kind::Ingress
                | Kind::Backup
        )
    }

    /// Accepts what a kubectl user would type: `Service`, `service`, `services`, `svc`.
    pub fn parse_loose(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            l == k.lower()
                || l == k.plural()
                || matches!(
                    (k, l.as_str()),
                    (Kind::Service, "svc")
                        | (Kind::Ingress, "ing")
                        | (Kind::Network, "net")
                        | (Kind::Node, "no")
                )
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown kind `{s}` (expected one of: {})",
                    Kind::ALL.map(|k| k.as_str()).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for k in Kind::ALL {
            assert_eq!(k.as_str().parse::<Kind>().unwrap(), k);
            assert_eq!(Kind::parse_loose(k.plural()), Some(k));
            assert_eq!(Kind::parse_loose(k.lower()), Some(k));
        }
        assert_eq!(Kind::parse_loose("svc"), Some(Kind::Service));
        assert!("service".parse::<Kind>().is_err());
        assert_eq!(Kind::parse_loose("pods"), None);
        assert_eq!(Kind::parse_loose("net"), Some(Kind::Network));
    }
}
