//! Docker image references (`[registry[:port]/]path[:tag][@sha256:digest]`), parsed with the grammar of
//! the distribution project so a typo is caught at apply time instead of as a task that never starts.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    text: String,
    /// Registry host (with port) when the reference names one.
    pub registry: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        let err = |why: &str| format!("invalid image reference `{s}`: {why}");
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.len() > 512 {
            return Err(err("longer than 512 characters"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            let (algo, hex) = d
                .split_once(':')
                .ok_or_else(|| err("digest must look like sha256:<64 hex digits>"))?;
            let ok = match algo {
                "sha256" => hex.len() == 64,
                "sha384" => hex.len() == 96,
                "sha512" => hex.len() == 128,
                _ => false,
            } && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return Err(err(
                    "digest must look like sha256:<64 lower-case hex digits>",
                ));
            }
        }
        // A tag is a `:` after the last `/`; a `:` before it belongs to a registry port.
        let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            let valid = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
            if !valid {
                return Err(err(
                    "tag must be 1-128 of [A-Za-z0-9_.-], not starting with `.` or `-`",
                ));
            }
        }
        if name.is_empty() {
            return Err(err("repository name is empty"));
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        let registry = if parts.len() > 1
            && (parts[0].contains('.')
                || parts[0].contains(':')
                || parts[0] == "localhost"
                || parts[0].bytes().any(|b| b.is_ascii_uppercase()))
        {
            let host = parts.remove(0);
            validate_host(host).map_err(|w| err(&w))?;
            Some(host.to_string())
        } else {
            None
        };
        for p in &parts {
            if !valid_path_component(p) {
                return Err(err(&format!(
                    "path component `{p}` must be lower-case letters and digits, separated by `.`, `_`, `__` or `-`"
                )));
            }
        }
        Ok(ImageRef {
            text: s.to_string(),
            registry,
            repository: parts.join("/"),
            tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The registry the engine pulls this image from, in the normal form Registry objects are
    /// matched by: no registry named means Docker Hub.
    pub fn registry_host(&self) -> String {
        normalize_registry_host(self.registry.as_deref().unwrap_or(DOCKER_HUB))
    }
}

/// Docker Hub's canonical name; the engine also knows it as the two aliases below.
pub const DOCKER_HUB: &str = "docker.io";

/// One spelling per registry: host names are case-insensitive and Docker Hub has three names.
pub fn normalize_registry_host(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => h,
    }
}

/// Checks a registry `host[:port]` with the rules image references use.
pub fn check_registry_host(host: &str) -> Result<(), String> {
    validate_host(host)
}

fn validate_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if let Some(p) = port {
        if p.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            return Err(format!("registry port `{p}` is not a port number"));
        }
    }
    let ok = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("registry host `{name}` is not a valid host name"))
    }
}

fn valid_path_component(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // Separators: `.`, `_`, `__`, or one or more `-`; each must sit between alphanumerics.
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &p[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for ImageRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl schemars::JsonSchema for ImageRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ImageRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        crate::units::text_schema(
            "An image reference: `[registry/]repository[:tag][@sha256:digest]`, as `docker pull` takes it.",
            r"^\S+$",
            false,
        )
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ImageRef::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_usual_forms() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(
            (r.registry, r.repository.as_str(), r.tag),
            (None, "busybox", None)
        );
        let r = ImageRef::parse("berth-test/busybox:1").unwrap();
        assert_eq!(r.repository, "berth-test/busybox");
        assert_eq!(r.tag.as_deref(), Some("1"));
        let r = ImageRef::parse("127.0.0.1:5000/team/app:2.0-rc_1").unwrap();
        assert_eq!(r.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.repository, "team/app");
        let d = format!("registry.example.com/app@sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&d).unwrap();
        assert_eq!(r.digest.unwrap(), format!("sha256:{}", "a".repeat(64)));
        assert!(r.tag.is_none());
        let both = format!("localhost:5000/app:1@sha256:{}", "0".repeat(64));
        assert!(ImageRef::parse(&both).is_ok());
        assert!(ImageRef::parse("my_org/my__app/x-y--z:latest").is_ok());
    }

    #[test]
    fn registry_hosts_are_normalised() {
        let host = |s: &str| ImageRef::parse(s).unwrap().registry_host();
        assert_eq!(host("busybox"), "docker.io");
        assert_eq!(host("library/busybox:1"), "docker.io");
        assert_eq!(host("index.docker.io/library/busybox"), "docker.io");
        assert_eq!(host("Registry.Example.com/app"), "registry.example.com");
        assert_eq!(host("127.0.0.1:5000/team/app:1"), "127.0.0.1:5000");
    }

    #[test]
    fn rejects_with_reasons() {
        let cases = [
            ("", "empty"),
            ("Busybox", "path component `Busybox`"),
            ("app:", "tag must be"),
            ("app:-x", "tag must be"),
            ("app@sha256:abc", "digest must"),
            ("host:99999/app", "registry port"),
            ("a//b", "path component ``"),
            ("app_", "path component `app_`"),
            ("app:1 2", "tag must be"),
        ];
        for (input, want) in cases {
            let e = ImageRef::parse(input).unwrap_err();
            assert!(e.contains(want), "{input:?}: {e}");
        }
    }
}
