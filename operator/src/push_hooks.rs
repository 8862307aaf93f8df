//! Push notifications of a Docker distribution registry (`notifications.endpoints` in its config):
//! which manifest pushes deploy which Services. Pure, so it is tested on real envelopes without a
//! registry.
//!
//! Only a `push` of a manifest *by tag* counts: pulls, blob pushes and pushes by digest alone name
//! no tag a Service could be running. A Service runs the pushed image when its reference names the
//! registry host configured on the webhook, the same repository and the same tag; a digest the
//! service is pinned to does not matter, the new push supersedes it. The envelope
//! (`application/vnd.docker.distribution.events.v1+json`) is read whatever `Content-Type` it comes
//! with.
//!
//! Nothing in the body is trusted to say *which* registry it speaks for: `request.host` is what
//! the pushing client typed, so taking it would let one registry's URL deploy images of any
//! registry. The webhook's configured host decides. The body's `timestamp` only orders events: one
//! ahead of the server's clock counts as now, one absurd (unparseable, before
//! [`EARLIEST_TIMESTAMP`] or more than [`MAX_FUTURE`] ahead) refuses the envelope.

use berth_api_types::image::ImageRef;
use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Deserialize)]
struct Envelope {
    events: Vec<RegistryEvent>,
}

#[derive(Debug, Deserialize)]
struct RegistryEvent {
    #[serde(default)]
    id: String,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: Target,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Target {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    tag: String,
}

/// A push of `host/repository:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The registry's own event id (stable across the registry's retries of one notification).
    pub event_id: String,
    pub time: Option<DateTime<Utc>>,
    pub repository: String,
    pub tag: String,
    /// `sha256:...` when the registry sent a well-formed one.
    pub digest: Option<String>,
}

/// Earliest event time believed: older than the registry notification format itself.
pub const EARLIEST_TIMESTAMP: &str = "2015-01-01T00:00:00Z";
/// How far ahead of the server's clock an event time may be and still be taken (as now): clocks
/// drift, but not by days.
pub const MAX_FUTURE: TimeDelta = TimeDelta::days(1);

/// The tagged manifest pushes in an envelope, in order, with times no later than `now`. Errors
/// describe what is malformed (and refuse the whole envelope: it deploys nothing).
pub fn pushes(body: &[u8], now: DateTime<Utc>) -> Result<Vec<Push>, String> {
    let env: Envelope = serde_json::from_slice(body)
        .map_err(|e| format!("not a registry notification envelope: {e}"))?;
    let mut out = Vec::new();
    for (i, e) in env.events.into_iter().enumerate() {
        // Blobs never carry a tag; the media type check also drops any future non-manifest
        // event that did.
        if e.action != "push" || e.target.tag.is_empty() || is_blob(&e.target.media_type) {
            continue;
        }
        let time = match e.timestamp.as_deref() {
            None => None,
            Some(t) => {
                Some(event_time(t, now).map_err(|why| format!("events[{i}].timestamp: {why}"))?)
            }
        };
        out.push(Push {
            time,
            digest: valid_digest(&e.target.digest).then(|| e.target.digest.clone()),
            event_id: e.id,
            repository: e.target.repository,
            tag: e.target.tag,
        });
    }
    Ok(out)
}

/// An event's time, clamped to `now`; `Err` for one that no registry's clock could have made.
fn event_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let t = DateTime::parse_from_rfc3339(text)
        .map_err(|_| "is not an RFC 3339 time".to_string())?
        .with_timezone(&Utc);
    let earliest: DateTime<Utc> = EARLIEST_TIMESTAMP.parse().expect("a valid constant");
    if t < earliest {
        return Err(format!("is before {EARLIEST_TIMESTAMP}"));
    }
    if now
        .checked_add_signed(MAX_FUTURE)
        .is_some_and(|limit| t > limit)
    {
        return Err(format!(
            "is more than {} hours ahead of this server's clock",
            MAX_FUTURE.num_hours()
        ));
    }
    Ok(t.min(now))
}

fn is_blob(media_type: &str) -> bool {
    media_type == "application/octet-stream"
        || media_type.contains("rootfs")
        || media_type.contains("image.layer")
        || media_type.contains("container.image.v1+json")
        || media_type.contains("image.config")
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Registry host and repository in the form two spellings of one image agree on: host in lower
/// case, Docker Hub's aliases and implicit `library/` made explicit.
fn normalise(host: Option<&str>, repository: &str) -> (String, String) {
    let host = host.unwrap_or("docker.io").to_ascii_lowercase();
    let host = match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => host,
    };
    let repository = if host == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_string()
    };
    (host, repository)
}

/// Whether a service running `image` runs what `push` pushed to the registry the webhook is for
/// (`registry_host`, as configured on it). The host the body reports is not looked at.
pub fn runs(image: &ImageRef, push: &Push, registry_host: &str) -> bool {
    if image.tag.as_deref() != Some(push.tag.as_str()) || registry_host.is_empty() {
        return false;
    }
    normalise(image.registry.as_deref(), &image.repository)
        == normalise(Some(registry_host), &push.repository)
}

/// A deploy event id for `push` to `service` that is the same every time the registry retries the
/// notification: the registry event's time (so ids still order by time) and a hash of its id and
/// the service. Re-sent notifications are then deduplicated by JetStream and by the applier.
pub fn event_id(push: &Push, service: &str) -> String {
    if push.event_id.is_empty() {
        return ulid::Ulid::new().to_string();
    }
    // Never later than now: the applier refuses ids from the future, and the registry's clock
    // may run ahead of ours.
    let now = Utc::now().timestamp_millis().max(0) as u64;
    let ms = push
        .time
        .map_or(now, |t| t.timestamp_millis().max(0) as u64)
        .min(now);
    let h = Sha256::digest(format!("{}/{service}", push.event_id).as_bytes());
    let mut r = [0u8; 16];
    r[6..].copy_from_slice(&h[..10]);
    ulid::Ulid::from_parts(ms, u128::from_be_bytes(r)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from docker-registry 2.8.2 (Debian bookworm) posting to a `notifications.endpoints`
    /// URL during `docker push 127.0.0.1:5731/team/app:2`: the manifest push by tag, one of the
    /// blob pushes, and one of the blob pulls (the registry sent each in its own envelope).
    const MANIFEST_PUSH: &str = include_str!("../tests/data/registry-push.json");
    const BLOB_PUSH: &str = include_str!("../tests/data/registry-blob-push.json");
    const BLOB_PULL: &str = include_str!("../tests/data/registry-pull.json");

    #[test]
    fn only_tagged_manifest_pushes_count() {
        let p = pushes(MANIFEST_PUSH.as_bytes(), Utc::now()).unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        let p = &p[0];
        assert_eq!(p.repository, "team/app");
        assert_eq!(p.tag, "2");
        assert_eq!(
            p.digest.as_deref(),
            Some("sha256:810386da0edfa3e00bd421601b617c3bf245454c39e3ccfee7a03070790409bd")
        );
        assert_eq!(p.event_id, "d16e4033-7a9e-491e-8134-b5ec5263da5f");
        assert!(p.time.is_some());
        assert!(pushes(BLOB_PUSH.as_bytes(), Utc::now()).unwrap().is_empty());
        assert!(pushes(BLOB_PULL.as_bytes(), Utc::now()).unwrap().is_empty());
        // All in one envelope (the registry batches up to `threshold` events).
        let mut events = Vec::new();
        for text in [BLOB_PULL, BLOB_PUSH, MANIFEST_PUSH, BLOB_PULL] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            events.extend(v["events"].as_array().unwrap().clone());
        }
        let batch = serde_json::json!({ "events": events }).to_string();
        assert_eq!(
            pushes(batch.as_bytes(), Utc::now()).unwrap(),
            vec![p.clone()]
        );
    }

    #[test]
    fn malformed_envelopes_are_refused_with_a_reason() {
        let e = pushes(b"{}", Utc::now()).unwrap_err();
        assert!(e.contains("missing field `events`"), "{e}");
        let e = pushes(b"[1,2]", Utc::now()).unwrap_err();
        assert!(e.contains("not a registry notification envelope"), "{e}");
        assert_eq!(pushes(br#"{"events": []}"#, Utc::now()).unwrap(), vec![]);
        // An event with a bad digest still deploys, without pinning.
        let p = pushes(
            br#"{"events":[{"id":"x","action":"push","target":{"mediaType":
            "application/vnd.oci.image.manifest.v1+json","digest":"md5:1","repository":"a",
            "tag":"t"},"request":{"host":"r:5000"}}]}"#,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(p[0].digest, None);
    }

    fn push(repo: &str, tag: &str) -> Push {
        Push {
            event_id: "e1".into(),
            time: None,
            repository: repo.into(),
            tag: tag.into(),
            digest: None,
        }
    }

    fn img(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn services_match_on_the_configured_host_repository_and_tag() {
        let host = "127.0.0.1:5000";
        let p = push("team/app", "2");
        assert!(runs(&img("127.0.0.1:5000/team/app:2"), &p, host));
        let pinned = format!("127.0.0.1:5000/team/app:2@sha256:{}", "a".repeat(64));
        assert!(
            runs(&img(&pinned), &p, host),
            "a pinned digest is superseded"
        );
        assert!(!runs(&img("127.0.0.1:5000/team/app:1"), &p, host));
        assert!(!runs(&img("127.0.0.1:5000/team/other:2"), &p, host));
        assert!(
            !runs(&img("team/app:2"), &p, host),
            "Docker Hub is not this registry"
        );
        assert!(!runs(&img("127.0.0.1:5001/team/app:2"), &p, host));
        let by_digest = format!("127.0.0.1:5000/team/app@sha256:{}", "a".repeat(64));
        assert!(!runs(&img(&by_digest), &p, host));
        assert!(
            !runs(&img("127.0.0.1:5000/team/app:2"), &p, ""),
            "no host, no match"
        );
        // Host names compare without case.
        assert!(runs(
            &img("Registry.Internal:5000/team/app:2"),
            &p,
            "registry.internal:5000"
        ));
        // Docker Hub's spellings of one image agree.
        let hub = push("library/busybox", "1");
        assert!(runs(&img("busybox:1"), &hub, "index.docker.io"));
        assert!(runs(&img("docker.io/library/busybox:1"), &hub, "docker.io"));
    }

    /// The finding: a notification whose body claims another registry (`request.host`) must not
    /// deploy that registry's services; only the webhook's configured host counts.
    #[test]
    fn the_body_cannot_choose_the_registry() {
        let body = br#"{"events":[{"id":"x","action":"push","target":{"mediaType":
            "application/vnd.oci.image.manifest.v1+json","repository":"team/app","tag":"2"},
            "request":{"host":"registry.victim.example"}}]}"#;
        let p = &pushes(body, Utc::now()).unwrap()[0];
        let victim = img("registry.victim.example/team/app:2");
        assert!(!runs(&victim, p, "registry.attacker.example"));
        assert!(runs(
            &img("registry.attacker.example/team/app:2"),
            p,
            "registry.attacker.example"
        ));
    }

    fn with_time(t: &str) -> Vec<u8> {
        format!(
            r#"{{"events":[{{"id":"x","timestamp":"{t}","action":"push","target":{{"mediaType":
            "application/vnd.oci.image.manifest.v1+json","repository":"a","tag":"t"}}}}]}}"#
        )
        .into_bytes()
    }

    #[test]
    fn event_times_are_clamped_to_now_and_absurd_ones_refused() {
        let now: DateTime<Utc> = "2026-11-30T12:00:00Z".parse().unwrap();
        let time = |t: &str| pushes(&with_time(t), now).map(|p| p[0].time.unwrap());
        assert_eq!(
            time("2026-11-30T11:00:00Z"),
            Ok("2026-11-30T11:00:00Z".parse().unwrap())
        );
        // Ahead of the server's clock, within a day: taken as now.
        assert_eq!(time("2026-11-30T18:00:00+00:00"), Ok(now));
        assert_eq!(time("2026-12-01T12:00:00Z"), Ok(now));
        for absurd in [
            "2026-12-01T12:00:01Z",
            "9999-12-31T23:59:59Z",
            "1970-01-01T00:00:00Z",
            "2014-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
            "yesterday",
            "",
        ] {
            let e = pushes(&with_time(absurd), now).unwrap_err();
            assert!(e.starts_with("events[0].timestamp: "), "{absurd}: {e}");
        }
        // Without a timestamp an event is simply untimed (its id then takes the server's time).
        let untimed =
            br#"{"events":[{"id":"x","action":"push","target":{"repository":"a","tag":"t"}}]}"#;
        assert_eq!(pushes(untimed, now).unwrap()[0].time, None);
    }

    #[test]
    fn event_ids_are_stable_per_notification_and_service() {
        let mut p = push("a", "t");
        p.time = Some("2024-05-01T10:00:00Z".parse().unwrap());
        let a = event_id(&p, "web");
        assert_eq!(
            a,
            event_id(&p, "web"),
            "a retried notification has the same id"
        );
        assert_ne!(a, event_id(&p, "api"));
        let parsed = ulid::Ulid::from_string(&a).unwrap();
        assert_eq!(
            parsed.timestamp_ms(),
            p.time.unwrap().timestamp_millis() as u64
        );
        p.event_id.clear();
        assert_ne!(event_id(&p, "web"), event_id(&p, "web"));
    }

    #[test]
    fn a_registry_clock_ahead_of_ours_makes_no_future_id() {
        let mut p = push("a", "t");
        p.time = Some(Utc::now() + chrono::Duration::hours(2));
        let id = ulid::Ulid::from_string(&event_id(&p, "web")).unwrap();
        let now = Utc::now().timestamp_millis() as u64;
        assert!(id.timestamp_ms() <= now, "the applier would refuse it");
    }
}
