//! Property tests ("fuzzing") of the parsers untrusted input reaches in this crate: manifest loading
//! (YAML and JSON, the CLI's loader), object decoding and validation (every API write), durations,
//! sizes and CPU counts, image references, deploy retargeting (a webhook's tag or digest) and cron
//! schedules. Properties: none panics on any input; errors are well formed (a manifest error names
//! its file and a line, a field error a path); no error about a Secret carries a value of it; and
//! round trips hold where a format has one.
//!
//! `cargo test` runs each with proptest's default 256 cases (a few seconds in all). A longer pass:
//! `PROPTEST_CASES=200000 cargo test --release -p berth-api-types --test fuzz`.

use berth_api_types::deploy::retarget;
use berth_api_types::image::ImageRef;
use berth_api_types::manifest::parse_str;
use berth_api_types::typed::{decode_doc, decode_object};
use berth_api_types::units::{ByteSize, Cpus, Duration, MAX_DURATION_NANOS};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Any JSON value, a few levels deep, with keys and strings from a small alphabet (so that
/// generated objects hit real field names now and then) or from anywhere in Unicode.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "apiVersion",
            "kind",
            "metadata",
            "name",
            "spec",
            "status",
            "image",
            "replicas",
            "data",
            "stringData",
            "items",
            "labels",
            "volumes",
            "driverOpts",
            "env",
            "value",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z0-9._-]{0,8}",
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z0-9:/@._-]{0,20}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A berth object of any served kind, its spec arbitrary.
fn object() -> impl Strategy<Value = Value> {
    let kind = prop::sample::select(vec![
        "Service", "Secret", "Config", "Volume", "Network", "Node", "Registry", "Ingress", "Backup",
    ]);
    (kind, "[a-z0-9-]{0,12}", json_value()).prop_map(|(kind, name, spec)| {
        json!({"apiVersion": "berth/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
    })
}

/// The shipped example manifests, for mutation.
fn examples() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/examples");
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .expect("fixtures/examples")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    out.sort();
    assert!(!out.is_empty());
    out
}

/// An example manifest with a few bytes replaced, inserted or cut (kept valid UTF-8).
fn mutated_manifest() -> impl Strategy<Value = String> {
    let edits = prop::collection::vec(
        (
            any::<prop::sample::Index>(),
            0u8..3,
            "[\\x00-\\x7f]{0,3}|.{0,2}",
        ),
        1..6,
    );
    (prop::sample::select(examples()), edits).prop_map(|(text, edits)| {
        let mut chars: Vec<char> = text.chars().collect();
        for (at, op, with) in edits {
            let i = at.index(chars.len() + 1);
            match op {
                0 => {
                    chars.splice(i..i, with.chars());
                }
                1 => {
                    let end = (i + with.len().max(1)).min(chars.len());
                    chars.splice(i.min(end)..end, with.chars());
                }
                _ => chars.truncate(i),
            }
        }
        chars.into_iter().collect()
    })
}

/// Every manifest error names the file and a line.
fn check_manifest_error(e: &berth_api_types::manifest::ManifestError) {
    assert_eq!(e.file, "m.yaml");
    let shown = e.to_string();
    assert!(shown.starts_with("m.yaml"), "{shown}");
    if let Some(loc) = e.location {
        assert!(loc.line >= 1 && loc.column >= 1, "{shown}");
    }
    assert!(!e.message.is_empty(), "{shown}");
}

/// Loads `text` as the CLI does and decodes every document; panics on anything malformed.
fn load(text: &str) {
    match parse_str("m.yaml", text) {
        Ok(docs) => {
            for doc in &docs {
                assert!(doc.doc_start().line >= 1);
                if let Err(errs) = decode_doc(doc) {
                    assert!(!errs.is_empty());
                    errs.iter().for_each(check_manifest_error);
                }
            }
        }
        Err(e) => check_manifest_error(&e),
    }
}

/// The nanoseconds of `(number, unit)` parts, or `None` past the longest duration.
fn exact_nanos(parts: &[(u64, &str)]) -> Option<u64> {
    let mut total: u128 = 0;
    for (n, unit) in parts {
        let scale: u128 = match *unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            _ => 3_600_000_000_000,
        };
        total += u128::from(*n) * scale;
    }
    u64::try_from(total)
        .ok()
        .filter(|&n| n <= MAX_DURATION_NANOS)
}

proptest! {
    #[test]
    fn fuzz_manifest_text_never_panics(text in any::<String>()) {
        load(&text);
    }

    #[test]
    fn fuzz_mutated_manifests_never_panic(text in mutated_manifest()) {
        load(&text);
    }

    /// JSON is YAML: any object written as JSON loads back as the same value (a top-level
    /// object that is not a `List`, which the loader would split into its items).
    #[test]
    fn fuzz_json_documents_load_as_themselves(
        fields in prop::collection::vec(("[a-z][a-zA-Z0-9]{0,6}", json_value()), 1..6),
        pretty in any::<bool>(),
    ) {
        let map: Map<String, Value> = fields.into_iter().filter(|(k, _)| k != "items").collect();
        prop_assume!(!map.is_empty());
        let value = Value::Object(map);
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            serde_json::to_string(&value).unwrap()
        };
        let docs = parse_str("m.json", &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(docs.len(), 1);
        prop_assert_eq!(&docs[0].value, &value, "{}", text);
    }

    /// Every API write decodes through this; it never panics, and every error has a message.
    #[test]
    fn fuzz_decode_object_never_panics(value in prop_oneof![object(), json_value()]) {
        if let Err(errs) = decode_object(&value) {
            prop_assert!(!errs.is_empty());
            for e in &errs {
                prop_assert!(!e.message.is_empty(), "{:?}", e);
            }
        }
    }

    /// No error about a Secret quotes one of its values, whatever shape the spec has: values
    /// are marked strings (`zq...`) and numbers (13 digits) that no message has reason to hold.
    #[test]
    fn fuzz_secret_errors_never_echo_values(
        spec in json_value(),
        marks in prop::collection::vec(("zq[a-z0-9]{10}", 1_000_000_000_000u64..9_999_999_999_999), 1..4),
        shape in 0usize..6,
    ) {
        let mut spec = spec;
        let leak: Vec<String> = marks.iter().flat_map(|(s, n)| [s.clone(), n.to_string()]).collect();
        let (s, n) = &marks[0];
        let put = match shape {
            0 => json!({"stringData": s}),
            1 => json!({"data": {"K": [s, n]}}),
            2 => json!({"stringData": {"K": {"x": s}}, "data": n}),
            3 => json!({"data": {"K": s}, "stringData": {"K": n}}),
            4 => json!(s),
            _ => json!({"stringData": marks.iter().map(|(s, n)| (format!("K{n}"), json!([s]))).collect::<Map<_, _>>()}),
        };
        if let (Some(o), Some(p)) = (spec.as_object_mut(), put.as_object()) {
            o.extend(p.clone());
        } else {
            spec = put;
        }
        let obj = json!({"apiVersion": "berth/v1", "kind": "Secret", "metadata": {"name": "s"}, "spec": spec});
        if let Err(errs) = decode_object(&obj) {
            let text = errs.iter().map(|e| format!("{e} {e:?}")).collect::<String>();
            // Keys are names, not values: shape 5 puts the number into a key on purpose.
            for l in &leak {
                let in_key = shape == 5 && !l.starts_with("zq");
                prop_assert!(in_key || !text.contains(l.as_str()), "{} leaked: {}", l, text);
            }
        }
    }

    #[test]
    fn fuzz_units_never_panic(text in prop_oneof![any::<String>(), "[0-9.]{0,30}(ns|us|µs|ms|s|m|h|k|Ki|m|Mi|g|Gi|t|b|e|E|-|\\+)?([0-9.]{0,30}(ns|ms|s|m|h))?"]) {
        if let Ok(d) = Duration::parse(&text) {
            prop_assert!(d.as_nanos() <= MAX_DURATION_NANOS);
            prop_assert_eq!(d.to_string(), text.clone());
        }
        if let Ok(b) = ByteSize::parse(&text) {
            prop_assert!(b.bytes() >= 0);
            prop_assert_eq!(b.to_string(), text.clone());
        }
        if let Ok(c) = Cpus::parse(&text) {
            prop_assert!(c.nano_cpus() >= 1 && c.nano_cpus() <= 4096 * 1_000_000_000);
            prop_assert_eq!(c.to_string(), text.clone());
        }
    }

    /// Whole-number durations add up exactly, or are "too long"; never a wrapped sum.
    #[test]
    fn fuzz_durations_are_exact_or_too_long(
        parts in prop::collection::vec(
            (prop_oneof![0u64..1000, any::<u64>()], prop::sample::select(vec!["ns", "us", "µs", "ms", "s", "m", "h"])),
            1..5,
        ),
    ) {
        let text: String = parts.iter().map(|(n, u)| format!("{n}{u}")).collect();
        match (Duration::parse(&text), exact_nanos(&parts)) {
            (Ok(d), Some(n)) => prop_assert_eq!(d.as_nanos(), n),
            (Err(e), None) => prop_assert!(e.contains("too long"), "{}", e),
            (got, want) => prop_assert!(false, "{}: parsed {:?}, exact {:?}", text, got, want),
        }
    }

    /// What `Duration::from_nanos` prints parses back to the same nanoseconds.
    #[test]
    fn fuzz_duration_text_round_trips(n in prop_oneof![any::<u64>(), 0u64..10_000_000_000]) {
        let d = Duration::from_nanos(n);
        prop_assert_eq!(Duration::parse(&d.to_string()).unwrap().as_nanos(), n.min(MAX_DURATION_NANOS));
    }

    #[test]
    fn fuzz_sizes_are_exact_for_whole_numbers(n in 0u64..1 << 40, unit in prop::sample::select(vec!["", "k", "Ki", "m", "Mi", "g", "Gi", "t", "Ti", "kb", "MB"])) {
        let scale: u128 = match unit.to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
            "" => 1,
            "k" => 1 << 10,
            "m" => 1 << 20,
            "g" => 1 << 30,
            _ => 1 << 40,
        };
        let want = u128::from(n) * scale;
        match ByteSize::parse(&format!("{n}{unit}")) {
            Ok(b) => prop_assert_eq!(b.bytes() as u128, want),
            Err(_) => prop_assert!(want >= i64::MAX as u128),
        }
    }

    /// Image references print as parsed, and reparse to the same parts; a webhook's tag or
    /// digest either makes a valid reference or a clean error.
    #[test]
    fn fuzz_image_references_and_retarget(
        text in prop_oneof![
            any::<String>(),
            "([a-z0-9.-]{1,10}(:[0-9]{1,5})?/)?[a-z0-9._/-]{1,20}(:[A-Za-z0-9._-]{0,12})?(@sha256:[0-9a-f]{64})?",
        ],
        tag in prop::option::of(prop_oneof![any::<String>(), "[A-Za-z0-9._-]{0,130}"]),
        digest in prop::option::of(prop_oneof![any::<String>(), "sha256:[0-9a-f]{62,66}"]),
    ) {
        if let Ok(img) = ImageRef::parse(&text) {
            prop_assert_eq!(img.to_string(), text.clone());
            prop_assert_eq!(ImageRef::parse(&img.to_string()).unwrap(), img.clone());
            if let Ok(next) = retarget(&img, tag.as_deref(), digest.as_deref()) {
                prop_assert_eq!(&next.registry, &img.registry);
                prop_assert_eq!(&next.repository, &img.repository);
                if let Some(t) = &tag {
                    prop_assert_eq!(next.tag.as_deref(), Some(t.as_str()));
                }
            }
        }
    }

    #[test]
    fn fuzz_cron_never_panics(
        text in prop_oneof![
            any::<String>(),
            "(@[a-z]{0,8})|([0-9*,/-]{1,6} ){0,6}[0-9A-Za-z*,/-]{0,6}",
        ],
    ) {
        if let Ok(five) = berth_api_types::cron::check(&text) {
            prop_assert_eq!(five.split_whitespace().count(), 5);
            prop_assert_eq!(berth_api_types::cron::check(&five), Ok(five.clone()));
        }
    }
}
