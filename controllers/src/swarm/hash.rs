//! Canonical hashing and comparison of engine specs: what every controller uses to decide "is the
//! engine already running what berth wants?" without an update call.

use berth_api_types::names::labels;
use serde::Serialize;
use serde_json::Value;

/// Short hash (16 hex) of a JSON value in canonical form (object keys sorted at every level), so
/// maps the engine models as `HashMap` hash the same whatever their iteration order.
pub fn canonical_hash(v: &Value) -> String {
    use sha2::{Digest, Sha256};
    fn write(v: &Value, h: &mut Sha256) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                h.update(b"{");
                for k in keys {
                    h.update(serde_json::to_string(k).unwrap_or_default().as_bytes());
                    h.update(b":");
                    write(&m[k], h);
                    h.update(b",");
                }
                h.update(b"}");
            }
            Value::Array(a) => {
                h.update(b"[");
                for x in a {
                    write(x, h);
                    h.update(b",");
                }
                h.update(b"]");
            }
            other => h.update(other.to_string().as_bytes()),
        }
    }
    let mut h = Sha256::new();
    write(v, &mut h);
    hex::encode(&h.finalize()[..8])
}

/// Hash of an engine spec in canonical JSON, leaving out the spec-hash label that will carry it
/// and the labels in `leave_out` (e.g. which object asked for a network, which is not what it is).
pub fn spec_hash<T: Serialize>(spec: &T, leave_out: &[&str]) -> String {
    let mut v = serde_json::to_value(spec).unwrap_or(Value::Null);
    if let Some(l) = v.get_mut("Labels").and_then(Value::as_object_mut) {
        l.remove(labels::SPEC_HASH);
        for k in leave_out {
            l.remove(*k);
        }
    }
    canonical_hash(&v)
}

/// Whether the engine's spec still holds everything berth asked for. The engine fills in defaults
/// (isolation, endpoint mode, platforms...), so equality is too strict; a field berth set that now
/// differs — replicas scaled by hand, an image changed with `docker service update` — is drift.
pub fn contains<T: Serialize>(observed: &T, desired: &T) -> bool {
    let o = serde_json::to_value(observed).unwrap_or(Value::Null);
    let d = serde_json::to_value(desired).unwrap_or(Value::Null);
    value_contains(&o, &d)
}

fn value_contains(observed: &Value, desired: &Value) -> bool {
    match (observed, desired) {
        (Value::Object(o), Value::Object(d)) => d.iter().all(|(k, dv)| match o.get(k) {
            Some(ov) => value_contains(ov, dv),
            // The engine omits empty maps and zero-valued fields it stores as defaults.
            None => is_empty_value(dv),
        }),
        (Value::Array(o), Value::Array(d)) => {
            o.len() == d.len() && o.iter().zip(d).all(|(ov, dv)| value_contains(ov, dv))
        }
        (Value::Number(o), Value::Number(d)) => o.as_f64() == d.as_f64(),
        (o, d) => o == d,
    }
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty_value),
        Value::Array(a) => a.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_hash_ignores_key_order_only() {
        let a = json!({"a": 1, "b": {"x": [1, 2], "y": "z"}});
        let b: Value = serde_json::from_str(r#"{"b": {"y": "z", "x": [1, 2]}, "a": 1}"#).unwrap();
        assert_eq!(canonical_hash(&a), canonical_hash(&b));
        assert_ne!(
            canonical_hash(&a),
            canonical_hash(&json!({"a": 1, "b": {"x": [2, 1], "y": "z"}}))
        );
        assert_eq!(canonical_hash(&a).len(), 16);
    }

    #[test]
    fn spec_hash_leaves_out_its_own_label() {
        let with = json!({"Name": "web", "Labels": {"io.berth.spec-hash": "old", "io.berth.uid": "u", "k": "v"}});
        let without = json!({"Name": "web", "Labels": {"io.berth.uid": "u", "k": "v"}});
        assert_eq!(spec_hash(&with, &[]), spec_hash(&without, &[]));
        let bare = json!({"Name": "web", "Labels": {"k": "v"}});
        assert_ne!(spec_hash(&with, &[]), spec_hash(&bare, &[]));
        assert_eq!(spec_hash(&with, &[labels::UID]), spec_hash(&bare, &[]));
    }

    #[test]
    fn containment_ignores_engine_defaults_but_sees_drift() {
        let desired = json!({"Name": "web", "Mode": {"Replicated": {"Replicas": 2}}, "Env": []});
        let observed =
            json!({"Name": "web", "Mode": {"Replicated": {"Replicas": 2}}, "Isolation": "default"});
        assert!(contains(&observed, &desired));
        let scaled = json!({"Name": "web", "Mode": {"Replicated": {"Replicas": 5}}});
        assert!(!contains(&scaled, &desired));
    }
}
