//! Changing one object from the command line without writing a manifest: `berth scale`,
//! `berth label` and `berth edit`. Each is a spec or metadata write through the API like any other
//! (validated, audited, kept by drift repair), made conditional on the version it was computed from
//! so a concurrent change is refused instead of silently overwritten.

use crate::cli::{api_error, client, kind_arg};
use crate::Conn;
use berth_api_types::manifest::parse_str;
use berth_api_types::names::paths;
use berth_api_types::{DynObject, Kind};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

type CliResult = Result<(), String>;

/// `berth scale service NAME --replicas N`: writes `spec.replicas`, so the service controller keeps
/// it (a `docker service scale` is drift, and berth puts the spec's count back).
pub async fn scale(conn: &Conn, kind: &str, name: &str, replicas: u64) -> CliResult {
    if kind_arg(kind)? != Kind::Service {
        return Err(format!(
            "error: only services scale: use `berth scale service NAME --replicas N`, not `{kind}`"
        ));
    }
    let client = client(conn)?;
    let obj = client
        .get_object(Kind::Service, name)
        .await
        .map_err(api_error)?;
    if obj.spec.get("mode").and_then(Value::as_str) == Some("global") {
        return Err(format!(
            "error: service {name} is global (one task per eligible node): it has no replica count to scale"
        ));
    }
    let patch = json!({
        "metadata": {"resourceVersion": obj.metadata.resource_version},
        "spec": {"replicas": replicas},
    });
    client
        .patch_object(Kind::Service, name, &patch)
        .await
        .map_err(api_error)?;
    println!("service/{name} scaled to {replicas}");
    Ok(())
}

/// One `berth label` argument: `key=value` sets, `key-` removes.
#[derive(Debug, PartialEq, Eq)]
enum LabelChange {
    Set(String, String),
    Remove(String),
}

fn parse_label_change(arg: &str) -> Result<LabelChange, String> {
    if let Some((k, v)) = arg.split_once('=') {
        if k.is_empty() {
            return Err(format!(
                "error: `{arg}` has no key: write `key=value` or `key-`"
            ));
        }
        return Ok(LabelChange::Set(k.to_string(), v.to_string()));
    }
    match arg.strip_suffix('-') {
        Some(k) if !k.is_empty() => Ok(LabelChange::Remove(k.to_string())),
        _ => Err(format!(
            "error: `{arg}` is neither `key=value` (set) nor `key-` (remove)"
        )),
    }
}

/// Pure: the merge patch of `metadata.labels` for the changes, refusing to replace a value unless
/// `overwrite` (kubectl's rule: a typo should not silently move an object out of a selector).
fn label_patch(
    current: &BTreeMap<String, String>,
    changes: &[LabelChange],
    overwrite: bool,
) -> Result<Map<String, Value>, String> {
    let mut patch = Map::new();
    for c in changes {
        match c {
            LabelChange::Set(k, v) => {
                if let Some(old) = current.get(k).filter(|old| *old != v) {
                    if !overwrite {
                        return Err(format!(
                            "error: label `{k}` is already `{old}`: pass --overwrite to replace it"
                        ));
                    }
                }
                patch.insert(k.clone(), Value::String(v.clone()));
            }
            LabelChange::Remove(k) => {
                patch.insert(k.clone(), Value::Null);
            }
        }
    }
    Ok(patch)
}

/// `berth label KIND NAME key=value... key-... [--overwrite]`.
pub async fn label(
    conn: &Conn,
    kind: &str,
    name: &str,
    changes: &[String],
    overwrite: bool,
) -> CliResult {
    let kind = kind_arg(kind)?;
    let changes = changes
        .iter()
        .map(|c| parse_label_change(c))
        .collect::<Result<Vec<_>, _>>()?;
    let client = client(conn)?;
    let obj = client.get_object(kind, name).await.map_err(api_error)?;
    let labels = label_patch(&obj.metadata.labels, &changes, overwrite)?;
    let patch = json!({
        "metadata": {"resourceVersion": obj.metadata.resource_version, "labels": labels},
    });
    client
        .patch_object(kind, name, &patch)
        .await
        .map_err(api_error)?;
    println!("{}/{name} labeled", kind.lower());
    Ok(())
}

/// What `berth edit` puts in front of the user: what they may change, nothing the server sets.
fn editable(obj: &DynObject) -> Value {
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(obj.metadata.name));
    if !obj.metadata.labels.is_empty() {
        metadata.insert("labels".into(), json!(obj.metadata.labels));
    }
    if !obj.metadata.annotations.is_empty() {
        metadata.insert("annotations".into(), json!(obj.metadata.annotations));
    }
    // The version the edit applies to: a change made meanwhile makes the write fail, not vanish.
    metadata.insert(
        "resourceVersion".into(),
        json!(obj.metadata.resource_version),
    );
    json!({
        "apiVersion": obj.api_version,
        "kind": obj.kind,
        "metadata": metadata,
        "spec": obj.spec,
    })
}

/// `berth edit KIND NAME`: the object in `$VISUAL`/`$EDITOR` (default `vi`), written back with
/// the resourceVersion it was read at. Bad YAML or a refused write keeps the edited file and says
/// where it is, so no work is lost.
pub async fn edit(conn: &Conn, kind: &str, name: &str) -> CliResult {
    let kind = kind_arg(kind)?;
    if kind == Kind::Secret {
        // The API never returns a Secret's values, and writing what it returns would replace them
        // with the redaction; a temporary file would also put them on disk in clear.
        return Err(
            "error: secrets are not edited in a text editor (their values would be written to a temporary file in clear, and the API never returns them): replace one with `berth create secret NAME --from-file KEY=PATH`, or apply a manifest"
                .into(),
        );
    }
    let client = client(conn)?;
    let obj = client.get_object(kind, name).await.map_err(api_error)?;
    let original = format!(
        "# Edit {}/{name}; saving an unchanged file or an empty one changes nothing.\n{}",
        kind.lower(),
        crate::output::to_yaml(&editable(&obj))
    );
    let file = tempfile::Builder::new()
        .prefix(&format!("berth-edit-{}-{name}-", kind.lower()))
        .suffix(".yaml")
        .tempfile()
        .map_err(|e| format!("error: cannot create a temporary file: {e}"))?;
    std::fs::write(file.path(), &original)
        .map_err(|e| format!("error: cannot write {}: {e}", file.path().display()))?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    // Through the shell, as git and kubectl do: EDITOR may carry arguments (`code --wait`).
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .await
        .map_err(|e| format!("error: cannot run the editor `{editor}`: {e}"))?;
    if !status.success() {
        return Err(format!(
            "error: the editor `{editor}` exited with {status}; nothing was changed"
        ));
    }
    let edited = std::fs::read_to_string(file.path())
        .map_err(|e| format!("error: cannot read {}: {e}", file.path().display()))?;
    let content_lines = |t: &str| {
        t.lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    if content_lines(&edited).is_empty() || content_lines(&edited) == content_lines(&original) {
        println!("Edit cancelled, no changes made.");
        return Ok(());
    }
    // From here a failure keeps the file: the user's edit is in it.
    let shown = file.path().display().to_string();
    match write_back(&client, kind, name, &shown, &edited).await {
        Ok(()) => {
            println!("{}/{name} edited", kind.lower());
            Ok(())
        }
        Err(why) => Err(match file.keep() {
            Ok((_, path)) => format!(
                "{why}\nyour changes are kept in {}: fix them and run `berth apply -f {}`",
                path.display(),
                path.display()
            ),
            Err(_) => why,
        }),
    }
}

/// Checks the edited text like `apply` would and writes it over the object.
async fn write_back(
    client: &crate::api_client::ApiClient,
    kind: Kind,
    name: &str,
    shown: &str,
    edited: &str,
) -> CliResult {
    let docs = parse_str(shown, edited).map_err(|e| format!("error: {e}"))?;
    let [doc] = docs.as_slice() else {
        return Err(format!(
            "error: {shown}: expected one object, found {}",
            docs.len()
        ));
    };
    let checked = load_one(doc)?;
    if checked.kind != kind || checked.metadata.name != name {
        return Err(format!(
            "error: {shown}: the kind and name cannot change in an edit (it is {}/{name})",
            kind.lower()
        ));
    }
    let body = serde_json::to_value(&checked).map_err(|e| e.to_string())?;
    let _: DynObject = client
        .request_json(
            reqwest::Method::PUT,
            &paths::object(kind, name),
            Some(&body),
        )
        .await
        .map_err(api_error)?;
    Ok(())
}

/// One document decoded and validated like `apply` does, its errors placed at file and line.
fn load_one(doc: &berth_api_types::manifest::SourceDoc) -> Result<DynObject, String> {
    berth_api_types::typed::decode_doc(doc).map_err(|errs| {
        errs.iter()
            .map(|e| format!("error: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_arguments_set_or_remove() {
        assert_eq!(
            parse_label_change("app=shop").unwrap(),
            LabelChange::Set("app".into(), "shop".into())
        );
        assert_eq!(
            parse_label_change("tier=").unwrap(),
            LabelChange::Set("tier".into(), String::new())
        );
        assert_eq!(
            parse_label_change("app-").unwrap(),
            LabelChange::Remove("app".into())
        );
        for bad in ["app", "=x", "-"] {
            assert!(parse_label_change(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn replacing_a_label_needs_overwrite() {
        let current = BTreeMap::from([("app".to_string(), "shop".to_string())]);
        let change = [LabelChange::Set("app".into(), "cart".into())];
        let e = label_patch(&current, &change, false).unwrap_err();
        assert!(e.contains("--overwrite") && e.contains("`shop`"), "{e}");
        let p = label_patch(&current, &change, true).unwrap();
        assert_eq!(Value::Object(p), json!({"app": "cart"}));
        // Setting the value it already has, or removing, needs nothing.
        let same = [
            LabelChange::Set("app".into(), "shop".into()),
            LabelChange::Remove("x".into()),
        ];
        let p = label_patch(&current, &same, false).unwrap();
        assert_eq!(Value::Object(p), json!({"app": "shop", "x": null}));
    }

    #[test]
    fn the_edited_document_holds_nothing_the_server_sets() {
        let mut o: DynObject = serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "web", "labels": {"app": "shop"}},
            "spec": {"image": "a:1"}, "status": {"observedGeneration": 3}
        }))
        .unwrap();
        o.metadata.generation = 3;
        o.metadata.resource_version = Some("17".into());
        let v = editable(&o);
        assert_eq!(
            v,
            json!({"apiVersion": "berth/v1", "kind": "Service",
                   "metadata": {"name": "web", "labels": {"app": "shop"}, "resourceVersion": "17"},
                   "spec": {"image": "a:1"}})
        );
    }
}
