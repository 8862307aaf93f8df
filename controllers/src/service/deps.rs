//! A Service's dependencies: the Secrets and Configs it mounts, the Volumes and Networks it uses.
//!
//! Swarm secrets and configs are immutable, so each key's content is materialised as its own Swarm
//! object named `<object>-<content hash>`: a changed value is a new name, the service is updated onto
//! it (a rolling update, no manual restart), and the old one is removed once no service uses it.
//! The pure parts (names, labels, key choice) are here; the engine calls are in `mod.rs`.

use berth_api_types::names::labels;
use berth_api_types::service::FileRef;
use berth_api_types::volume::VolumeSpec;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

pub use crate::swarm_file::{FileKind, SwarmFile};

/// Everything `build` needs besides the Service itself.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// One per `spec.secrets` entry, same order.
    pub secrets: Vec<SwarmFile>,
    /// One per `spec.configs` entry, same order.
    pub configs: Vec<SwarmFile>,
    /// Volume objects by name.
    pub volumes: BTreeMap<String, VolumeSpec>,
    /// Swarm network IDs to attach, in the order listed (the engine stores IDs, not names).
    pub networks: Vec<String>,
}

/// The longest name the engine accepts for a secret or config.
pub const MAX_SWARM_NAME: usize = 64;

/// The Swarm name of one key's content: `<object>-<12 hex of sha256(key, value)>`. Content-addressed,
/// so the same value is never created twice and a new value never reuses a name.
///
/// Object names may be 63 characters but the engine takes at most 64 for the whole name, so a longer
/// object name is cut to fit; the full name then goes into the hash too, so two objects that share
/// the cut prefix still get different names. Names that fit are as they always were.
pub fn swarm_name(object: &str, key: &str, value: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0u8]);
    h.update(value);
    let keep = MAX_SWARM_NAME - 13;
    let prefix = if object.len() > keep {
        h.update([0u8]);
        h.update(object.as_bytes());
        let cut = (0..=keep)
            .rev()
            .find(|&i| object.is_char_boundary(i))
            .unwrap_or(0);
        &object[..cut]
    } else {
        object
    };
    format!("{prefix}-{}", &hex::encode(h.finalize())[..12])
}

/// Labels on a materialised secret or config: owner, installation, which object and key.
pub fn file_labels(
    instance: &str,
    kind: FileKind,
    object: &str,
    key: &str,
) -> HashMap<String, String> {
    HashMap::from([
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
        (labels::INSTANCE.to_string(), instance.to_string()),
        (labels::KIND.to_string(), kind.kind().lower().to_string()),
        (labels::NAME.to_string(), object.to_string()),
        (labels::KEY.to_string(), key.to_string()),
    ])
}

/// Filters selecting every secret or config this installation materialised.
pub fn owned_file_filters(instance: &str, kind: FileKind) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
            format!("{}={instance}", labels::INSTANCE),
            format!("{}={}", labels::KIND, kind.kind().lower()),
        ],
    )])
}

/// Which key of the object a reference mounts: the one named, or the only one there is.
pub fn pick_key<'a>(
    kind: FileKind,
    files: &'a BTreeMap<String, Vec<u8>>,
    r: &FileRef,
) -> Result<(&'a str, &'a [u8]), String> {
    let what = kind.kind();
    match &r.key {
        Some(k) => files
            .get_key_value(k)
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .ok_or_else(|| {
                format!(
                    "{what} `{}` has no key `{k}` (keys: {})",
                    r.name,
                    files.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }),
        None if files.len() == 1 => {
            let (k, v) = files.iter().next().expect("one entry");
            Ok((k.as_str(), v.as_slice()))
        }
        None => Err(format!(
            "{what} `{}` has {} keys ({}); say which with `key`",
            r.name,
            files.len(),
            files.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Where a file lands in the container: secrets default to `/run/secrets/<target>` (the engine's own
/// rule for relative names); configs have no such directory, so a relative target is made absolute.
pub fn file_target(kind: FileKind, r: &FileRef) -> String {
    let t = r.target.clone().unwrap_or_else(|| r.name.clone());
    match kind {
        FileKind::Secret => t,
        FileKind::Config if t.starts_with('/') => t,
        FileKind::Config => format!("/{t}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fref(name: &str, key: Option<&str>) -> FileRef {
        FileRef {
            name: name.into(),
            key: key.map(Into::into),
            target: None,
            uid: None,
            gid: None,
            mode: None,
        }
    }

    #[test]
    fn names_are_content_addressed() {
        let a = swarm_name("db", "password", b"one");
        assert!(a.starts_with("db-") && a.len() == "db-".len() + 12, "{a}");
        assert_eq!(a, swarm_name("db", "password", b"one"));
        assert_ne!(a, swarm_name("db", "password", b"two"));
        assert_ne!(
            a,
            swarm_name("db", "user", b"one"),
            "same value under another key"
        );
        // The longest object names still give names the engine accepts, and distinct ones.
        let long_a = format!("{}a", "x".repeat(62));
        let long_b = format!("{}b", "x".repeat(62));
        let na = swarm_name(&long_a, "k", b"v");
        let nb = swarm_name(&long_b, "k", b"v");
        assert_eq!(na.len(), MAX_SWARM_NAME, "{na}");
        assert_eq!(na[..51], long_a[..51]);
        assert_ne!(na, nb, "objects sharing the cut prefix");
        let fits = "y".repeat(51);
        assert_eq!(swarm_name(&fits, "k", b"v").len(), MAX_SWARM_NAME);
        assert!(swarm_name(&fits, "k", b"v").starts_with(&format!("{fits}-")));
    }

    #[test]
    fn key_choice() {
        let one = BTreeMap::from([("pw".to_string(), b"x".to_vec())]);
        assert_eq!(
            pick_key(FileKind::Secret, &one, &fref("db", None))
                .unwrap()
                .0,
            "pw"
        );
        let two = BTreeMap::from([("a".to_string(), vec![]), ("b".to_string(), vec![])]);
        let e = pick_key(FileKind::Secret, &two, &fref("db", None)).unwrap_err();
        assert_eq!(e, "Secret `db` has 2 keys (a, b); say which with `key`");
        let e = pick_key(FileKind::Config, &two, &fref("app", Some("c"))).unwrap_err();
        assert_eq!(e, "Config `app` has no key `c` (keys: a, b)");
        assert_eq!(
            pick_key(FileKind::Config, &two, &fref("app", Some("b")))
                .unwrap()
                .0,
            "b"
        );
    }

    #[test]
    fn targets() {
        let mut r = fref("nginx", None);
        assert_eq!(file_target(FileKind::Config, &r), "/nginx");
        assert_eq!(file_target(FileKind::Secret, &r), "nginx");
        r.target = Some("/etc/nginx.conf".into());
        assert_eq!(file_target(FileKind::Config, &r), "/etc/nginx.conf");
    }
}
