//! Property tests ("fuzzing") of the parsers in this crate that untrusted input reaches: the API's
//! JSON merge patch, a CI webhook's body and query, its signature headers, and a registry's
//! notification envelope. Properties: none panics on any input; merge patch keeps RFC 7386's laws;
//! registry event ids and times never lie ahead of the server's clock.
//!
//! `cargo test` runs each with proptest's default 256 cases. A longer pass:
//! `PROPTEST_CASES=200000 cargo test --release -p berth-operator fuzz_`.

use crate::push_hooks::{event_id, pushes};
use crate::server::merge_patch;
use crate::webhook::{sign, verify_signature};
use axum::http::Request;
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec!["a", "b", "c", "spec", "metadata", "x"]).prop_map(str::to_string),
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[a-z]{0,4}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// `v` without the members of its objects that are `null`, recursively (what patching a value
/// with itself leaves).
fn without_null_members(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_null_members(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A registry notification with arbitrary parts where untrusted input goes.
fn envelope() -> impl Strategy<Value = Vec<u8>> {
    let time = prop_oneof![
        Just(None),
        any::<String>().prop_map(Some),
        (i64::MIN / 1_000_000..i64::MAX / 1_000_000).prop_map(|s| {
            Some(
                Utc.timestamp_opt(s.clamp(-8_000_000_000_000, 8_000_000_000_000), 0)
                    .single()
                    .map_or_else(|| s.to_string(), |t| t.to_rfc3339()),
            )
        }),
        (1_400_000_000i64..2_000_000_000)
            .prop_map(|s| { Some(Utc.timestamp_opt(s, 0).unwrap().to_rfc3339()) }),
    ];
    let event = (
        any::<String>(),
        time,
        prop::sample::select(vec!["push", "pull", "delete", ""]),
        prop::sample::select(vec![
            "application/vnd.oci.image.manifest.v1+json",
            "application/octet-stream",
            "",
        ]),
        "[a-z/]{0,12}",
        prop_oneof!["[a-z0-9.]{0,6}", any::<String>()],
        prop_oneof![Just(String::new()), "sha256:[0-9a-f]{64}", any::<String>()],
        any::<String>(),
    )
        .prop_map(|(id, time, action, media, repo, tag, digest, host)| {
            let mut e = json!({"id": id, "action": action, "target": {"mediaType": media,
                "repository": repo, "tag": tag, "digest": digest}, "request": {"host": host}});
            if let Some(t) = time {
                e["timestamp"] = json!(t);
            }
            e
        });
    prop_oneof![
        prop::collection::vec(event, 0..4)
            .prop_map(|events| serde_json::to_vec(&json!({ "events": events })).unwrap()),
        any::<Vec<u8>>(),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
}

proptest! {
    /// RFC 7386: applying a patch twice is applying it once; a `null` member removes the key;
    /// a value patched with itself loses only its null members.
    #[test]
    fn fuzz_merge_patch_laws(doc in json_value(), patch in json_value()) {
        let mut once = doc.clone();
        merge_patch(&mut once, &patch);
        let mut twice = once.clone();
        merge_patch(&mut twice, &patch);
        prop_assert_eq!(&twice, &once);
        if let (Some(p), Some(o)) = (patch.as_object(), once.as_object()) {
            for (k, v) in p {
                if v.is_null() {
                    prop_assert!(!o.contains_key(k), "{} kept", k);
                } else {
                    prop_assert!(o.contains_key(k), "{} lost", k);
                }
            }
        }
        if !patch.is_object() {
            prop_assert_eq!(&once, &patch, "a non-object patch replaces the document");
        }
        let mut itself = patch.clone();
        merge_patch(&mut itself, &patch);
        prop_assert_eq!(itself, without_null_members(&patch));
    }

    /// A CI call: whatever body and query string, a deploy request or a clean error.
    #[test]
    fn fuzz_webhook_requests_never_panic(
        body in prop_oneof![any::<Vec<u8>>(), json_value().prop_map(|v| serde_json::to_vec(&v).unwrap())],
        query in prop_oneof![Just(String::new()), "[a-z=&%0-9A-F]{0,30}", "(tag|digest)=[^#]{0,20}"],
    ) {
        let uri = if query.is_empty() { "/hooks/v1/t".to_string() } else { format!("/hooks/v1/t?{query}") };
        let Ok(req) = Request::post(uri.as_str()).body(()) else { return Ok(()) };
        let (parts, ()) = req.into_parts();
        if let Err(why) = crate::hooks::deploy_request(&parts, &body) {
            prop_assert!(!why.is_empty());
        }
    }

    /// Signature headers: any timestamp and signature text is a clean verdict, and only the
    /// right HMAC within the window verifies.
    #[test]
    fn fuzz_signature_headers(
        ts in prop_oneof![any::<i64>().prop_map(|t| t.to_string()), any::<String>()],
        sig in prop_oneof![any::<String>(), "sha256=[0-9a-fA-F]{0,70}"],
        now in any::<i64>(),
        body in any::<Vec<u8>>(),
    ) {
        let _ = verify_signature(b"k", Some(&ts), Some(&sig), &body, now);
        if let Ok(t) = ts.trim().parse::<i64>() {
            let good = sign(b"k", t, &body);
            let verdict = verify_signature(b"k", Some(&ts), Some(&good), &body, now);
            prop_assert_eq!(verdict.is_ok(), now.abs_diff(t) <= 300 && ts.trim() == t.to_string());
        }
    }

    /// A registry's envelope: parsed or refused, never a panic; every time taken is not after
    /// now, and so is every event id made from it.
    #[test]
    fn fuzz_registry_envelopes(body in envelope(), service in "[a-z0-9-]{1,12}") {
        let now: DateTime<Utc> = Utc::now();
        match pushes(&body, now) {
            Ok(found) => {
                for p in &found {
                    prop_assert!(p.time.is_none_or(|t| t <= now));
                    let id = ulid::Ulid::from_string(&event_id(p, &service)).unwrap();
                    prop_assert!(id.timestamp_ms() <= Utc::now().timestamp_millis() as u64);
                }
            }
            Err(why) => prop_assert!(!why.is_empty()),
        }
    }
}
