//! `berth diff -f PATH`: what `berth apply -f PATH` would change, as a unified diff of each object's
//! labels, annotations and spec (live first, files second), exiting 1 when anything would change,
//! as `kubectl diff` and `diff` do, so a CI step can gate on it.
//!
//! The server decides what changes: the files go through a dry-run apply (validation, admission
//! and canonical form included), and only what it reports as created or configured is diffed.
//! A Secret's values never appear: the API never returns them, and the local ones are not printed.

use crate::cli::{api_error, client, load};
use crate::Conn;
use berth_api_types::secret_config::DataSpec;
use berth_api_types::wire::ApplyOutcome;
use berth_api_types::{DynObject, Kind};
use berth_controllers::api::ClientError;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// What of an object a diff shows: what the user writes (server-set metadata and status left out).
fn comparable(obj: &DynObject) -> Value {
    let mut metadata = serde_json::Map::new();
    if !obj.metadata.labels.is_empty() {
        metadata.insert("labels".into(), json!(obj.metadata.labels));
    }
    if !obj.metadata.annotations.is_empty() {
        metadata.insert("annotations".into(), json!(obj.metadata.annotations));
    }
    json!({"metadata": metadata, "spec": obj.spec})
}

/// The key names of a Secret: from the files' plaintext spec, or the API's redacted view.
fn secret_keys(spec: &Value) -> BTreeSet<String> {
    if let Some(redacted) = spec.get("redacted").and_then(Value::as_object) {
        return redacted.keys().cloned().collect();
    }
    serde_json::from_value::<DataSpec>(spec.clone())
        .map(|d| d.files().into_keys().collect())
        .unwrap_or_default()
}

/// Pure: the text shown for one object that changes; `live` is `None` for one to be created.
fn object_diff(live: Option<&DynObject>, local: &DynObject) -> String {
    let id = format!("{}/{}", local.kind.lower(), local.metadata.name);
    if local.kind == Kind::Secret {
        let after = secret_keys(&local.spec);
        let Some(live) = live else {
            let keys: Vec<_> = after.into_iter().collect();
            return format!(
                "{id}: created with keys {} (values not shown)\n",
                keys.join(", ")
            );
        };
        let before = secret_keys(&live.spec);
        let mut parts: Vec<String> = after
            .difference(&before)
            .map(|k| format!("+{k}"))
            .chain(before.difference(&after).map(|k| format!("-{k}")))
            .collect();
        if parts.is_empty() {
            parts.push("same keys".into());
        }
        let labels = if comparable(&DynObject {
            spec: Value::Null,
            ..live.clone()
        }) != comparable(&DynObject {
            spec: Value::Null,
            ..local.clone()
        }) {
            "; labels or annotations change"
        } else {
            ""
        };
        return format!(
            "{id}: values or keys change ({}; values not shown){labels}\n",
            parts.join(" ")
        );
    }
    let text = |v: Option<Value>| v.map(|v| crate::output::to_yaml(&v)).unwrap_or_default();
    let before = text(live.map(comparable));
    let after = text(Some(comparable(local)));
    similar::TextDiff::from_lines(&before, &after)
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("live/{id}"),
            &format!("{}/{id}", if live.is_some() { "files" } else { "new" }),
        )
        .to_string()
}

/// `berth diff -f PATH...`.
pub async fn diff(conn: &Conn, files: &[PathBuf]) -> Result<(), String> {
    let objects = load(files)?;
    let client = client(conn)?;
    let results = client.apply(&objects, true).await.map_err(api_error)?;
    let mut changed = 0;
    for (local, r) in objects.iter().zip(&results) {
        if r.outcome == ApplyOutcome::Unchanged {
            continue;
        }
        let live = match client.get_object(local.kind, &local.metadata.name).await {
            Ok(o) => Some(o),
            Err(ClientError::Api { status: 404, .. }) => None,
            Err(e) => return Err(api_error(e)),
        };
        print!("{}", object_diff(live.as_ref(), local));
        changed += 1;
    }
    if changed == 0 {
        eprintln!("no changes: the files match what berth has");
        Ok(())
    } else {
        eprintln!("{changed} object(s) would change");
        // Exit status 1 says "differences", as diff(1) and kubectl diff do; the text is out already.
        Err(String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &str, spec: Value) -> DynObject {
        serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": kind, "metadata": {"name": "web", "labels": {"app": "shop"}},
            "spec": spec, "status": {"observedGeneration": 1}
        }))
        .unwrap()
    }

    #[test]
    fn a_changed_spec_is_a_unified_diff_of_spec_only() {
        let live = obj("Service", json!({"image": "app:1", "replicas": 2}));
        let local = obj("Service", json!({"image": "app:2", "replicas": 2}));
        let d = object_diff(Some(&live), &local);
        assert!(
            d.starts_with("--- live/service/web\n+++ files/service/web\n"),
            "{d}"
        );
        assert!(
            d.contains("-  image: \"app:1\"\n+  image: \"app:2\"\n"),
            "{d}"
        );
        assert!(!d.contains("observedGeneration"), "{d}");
        let new = object_diff(None, &local);
        assert!(
            new.contains("+++ new/service/web") && new.contains("+  image: \"app:2\""),
            "{new}"
        );
    }

    #[test]
    fn secret_values_never_show() {
        let live = obj(
            "Secret",
            json!({"redacted": {"pw": {"size": 3, "digest": "x"}, "old": {"size": 1, "digest": "y"}}}),
        );
        let local = obj(
            "Secret",
            json!({"stringData": {"pw": "hunter2", "new": "s3cret"}}),
        );
        let d = object_diff(Some(&live), &local);
        assert_eq!(
            d,
            "secret/web: values or keys change (+new -old; values not shown)\n"
        );
        let d = object_diff(None, &local);
        assert!(!d.contains("hunter2") && !d.contains("s3cret"), "{d}");
        assert!(d.contains("new, pw"), "{d}");
    }
}
