//! The deploy event: "run this image for that Service now". Published on `berth.deploy.<service>`
//! by the webhook bridge (a CI call, a signed bridge call, or a registry push notification) and
//! consumed by the API server's deploy applier, which turns it into a Service spec change. Outside
//! tools may follow the subject to see every deploy as it is requested.

use crate::image::ImageRef;
use crate::names::subjects;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What asked for a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploySource {
    /// A call to a plain webhook URL.
    Webhook,
    /// A call to a webhook with a valid HMAC signature.
    Signed,
    /// A push notification from a registry.
    Registry,
    /// A change of the image through the API.
    Api,
    /// The command line.
    Cli,
}

impl DeploySource {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploySource::Webhook => "webhook",
            DeploySource::Signed => "signed",
            DeploySource::Registry => "registry",
            DeploySource::Api => "api",
            DeploySource::Cli => "cli",
        }
    }
}

impl std::fmt::Display for DeploySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployEvent {
    /// ULID; also the JetStream message id (a re-published event is stored once), and the order in
    /// which deploys of one service were asked for.
    pub id: String,
    /// The Service to deploy.
    pub service: String,
    /// The full reference to run, e.g. `127.0.0.1:5000/team/app:2` or `...app@sha256:...`.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Known when the registry told us (push notifications) or the caller named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub source: DeploySource,
    pub time: DateTime<Utc>,
    /// The berth installation the event is for. Two installations may share one NATS server and
    /// have services of the same name: an applier ignores events stamped for another installation,
    /// and refuses events stamped for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Hex HMAC-SHA256 over [`DeployEvent::signed_bytes`], with a key only the installation's API
    /// server holds (derived from its master key). The applier refuses events without a valid one,
    /// so a process that can publish on the bus cannot forge a deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Starts the signed bytes, so they can never be mistaken for another message signed with a key
/// of the same derivation, and a later layout gets a new version.
const SIGNED_PREFIX: &[u8] = b"berth deploy event v1\0";

impl DeployEvent {
    pub fn subject(&self) -> String {
        subjects::deploy(&self.service)
    }

    /// The canonical encoding the signature covers: every field but the signature, each
    /// length-prefixed (an optional one preceded by whether it is present), so no two different
    /// events encode alike, whatever bytes their fields hold. JSON is not signed because its
    /// encoding is not unique (key order, escapes, number and time formats).
    pub fn signed_bytes(&self) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, bytes: &[u8]) {
            out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            out.extend_from_slice(bytes);
        }
        fn optional(out: &mut Vec<u8>, value: Option<&str>) {
            match value {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    field(out, v.as_bytes());
                }
            }
        }
        let mut out = SIGNED_PREFIX.to_vec();
        field(&mut out, self.id.as_bytes());
        field(&mut out, self.service.as_bytes());
        field(&mut out, self.image.as_bytes());
        optional(&mut out, self.tag.as_deref());
        optional(&mut out, self.digest.as_deref());
        field(&mut out, self.source.as_str().as_bytes());
        // Seconds and nanoseconds, not text: the same instant always encodes the same way.
        out.extend_from_slice(&self.time.timestamp().to_be_bytes());
        out.extend_from_slice(&self.time.timestamp_subsec_nanos().to_be_bytes());
        optional(&mut out, self.instance.as_deref());
        out
    }
}

/// The image to deploy when a caller names a new `tag` and/or `digest` for a service that runs
/// `current`: the same registry and repository with the new tag/digest. Neither given means "the
/// current tag again" (a redeploy that pulls anew), so a digest pinned earlier is dropped — unless
/// the service is pinned by digest alone, which is then kept. Errors are the reference grammar's.
pub fn retarget(
    current: &ImageRef,
    tag: Option<&str>,
    digest: Option<&str>,
) -> Result<ImageRef, String> {
    let repo = match &current.registry {
        Some(r) => format!("{r}/{}", current.repository),
        None => current.repository.clone(),
    };
    let text = match (tag, digest) {
        (Some(t), Some(d)) => format!("{repo}:{t}@{d}"),
        (Some(t), None) => format!("{repo}:{t}"),
        (None, Some(d)) => format!("{repo}@{d}"),
        (None, None) => match (&current.tag, &current.digest) {
            (Some(t), _) => format!("{repo}:{t}"),
            (None, Some(d)) => format!("{repo}@{d}"),
            (None, None) => repo,
        },
    };
    ImageRef::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn retarget_keeps_registry_and_repository() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let cur = r("127.0.0.1:5000/team/app:1");
        assert_eq!(
            retarget(&cur, Some("2"), None).unwrap().as_str(),
            "127.0.0.1:5000/team/app:2"
        );
        assert_eq!(
            retarget(&cur, None, Some(&d)).unwrap().as_str(),
            format!("127.0.0.1:5000/team/app@{d}")
        );
        assert_eq!(
            retarget(&cur, Some("2"), Some(&d)).unwrap().as_str(),
            format!("127.0.0.1:5000/team/app:2@{d}")
        );
        assert_eq!(
            retarget(&r("busybox"), Some("1.36"), None)
                .unwrap()
                .as_str(),
            "busybox:1.36"
        );
    }

    #[test]
    fn retarget_without_tag_or_digest_is_the_current_tag() {
        let d = format!("sha256:{}", "0".repeat(64));
        let pinned = r(&format!("team/app:2@{d}"));
        assert_eq!(
            retarget(&pinned, None, None).unwrap().as_str(),
            "team/app:2"
        );
        let by_digest = r(&format!("team/app@{d}"));
        assert_eq!(
            retarget(&by_digest, None, None).unwrap().as_str(),
            format!("team/app@{d}")
        );
        assert_eq!(
            retarget(&r("team/app"), None, None).unwrap().as_str(),
            "team/app"
        );
    }

    #[test]
    fn retarget_rejects_bad_tags_and_digests() {
        let cur = r("team/app:1");
        let e = retarget(&cur, Some("-bad"), None).unwrap_err();
        assert!(e.contains("tag must be"), "{e}");
        let e = retarget(&cur, Some("a/b"), None).unwrap_err();
        assert!(e.contains("invalid image reference"), "{e}");
        let e = retarget(&cur, None, Some("sha256:xyz")).unwrap_err();
        assert!(e.contains("digest must"), "{e}");
    }

    #[test]
    fn event_json_is_stable() {
        let e = DeployEvent {
            id: "01J0000000000000000000000A".into(),
            service: "web".into(),
            image: "team/app:2".into(),
            tag: Some("2".into()),
            digest: None,
            source: DeploySource::Webhook,
            time: "2024-05-01T10:00:00Z".parse().unwrap(),
            instance: None,
            signature: None,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "01J0000000000000000000000A", "service": "web",
                "image": "team/app:2", "tag": "2", "source": "webhook",
                "time": "2024-05-01T10:00:00Z"})
        );
        assert_eq!(e.subject(), "berth.deploy.web");
        assert_eq!(serde_json::from_value::<DeployEvent>(v).unwrap(), e);
    }

    #[test]
    fn signed_bytes_cover_every_field_but_the_signature() {
        let e = DeployEvent {
            id: "01J0000000000000000000000A".into(),
            service: "web".into(),
            image: "team/app:2".into(),
            tag: Some("2".into()),
            digest: None,
            source: DeploySource::Webhook,
            time: "2024-05-01T10:00:00.123456789Z".parse().unwrap(),
            instance: Some("inst".into()),
            signature: None,
        };
        let base = e.signed_bytes();
        let changed: Vec<DeployEvent> = vec![
            DeployEvent {
                id: "01J0000000000000000000000B".into(),
                ..e.clone()
            },
            DeployEvent {
                service: "api".into(),
                ..e.clone()
            },
            DeployEvent {
                image: "team/app:3".into(),
                ..e.clone()
            },
            DeployEvent {
                tag: None,
                ..e.clone()
            },
            DeployEvent {
                tag: Some("3".into()),
                ..e.clone()
            },
            DeployEvent {
                digest: Some(format!("sha256:{}", "a".repeat(64))),
                ..e.clone()
            },
            DeployEvent {
                source: DeploySource::Signed,
                ..e.clone()
            },
            DeployEvent {
                time: "2024-05-01T10:00:00.123456788Z".parse().unwrap(),
                ..e.clone()
            },
            DeployEvent {
                instance: None,
                ..e.clone()
            },
            DeployEvent {
                instance: Some("other".into()),
                ..e.clone()
            },
            // Moving bytes between adjacent fields changes the encoding too.
            DeployEvent {
                service: "we".into(),
                image: "bteam/app:2".into(),
                ..e.clone()
            },
        ];
        for c in &changed {
            assert_ne!(c.signed_bytes(), base, "{c:?}");
        }
        let signed = DeployEvent {
            signature: Some("ab".into()),
            ..e.clone()
        };
        assert_eq!(signed.signed_bytes(), base, "the signature is not signed");
        // A JSON round trip (what the bus does) keeps the encoding.
        let back: DeployEvent = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(back.signed_bytes(), base);
    }
}
