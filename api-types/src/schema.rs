//! JSON Schemas of the kinds, generated from the Rust types the server deserializes them with
//! (schemars reads the same serde attributes: names, defaults, `deny_unknown_fields`), so a schema
//! cannot say something the server does not. Served by the API (`paths::schema`), printed by
//! `berth schema KIND`, walked by `berth explain`, and kept as files in `fixtures/schemas/` for
//! editors (`# yaml-language-server: $schema=...`). The server's own checks go further (names,
//! references, ranges): the schema is what an editor can tell before the server is asked.

use crate::backup::BackupSpec;
use crate::ingress::IngressSpec;
use crate::kind::Kind;
use crate::meta::ObjectMeta;
use crate::names::API_VERSION;
use crate::network::NetworkSpec;
use crate::node::NodeSpec;
use crate::registry::RegistrySpec;
use crate::secret_config::DataSpec;
use crate::service::ServiceSpec;
use crate::volume::VolumeSpec;
use schemars::SchemaGenerator;
use serde_json::{json, Value};

/// The schema of a whole object of `kind`: the envelope with this kind's `spec`.
pub fn for_kind(kind: Kind) -> Value {
    let mut g = SchemaGenerator::default();
    let mut root = envelope(kind, &mut g);
    root["$schema"] = json!(DIALECT);
    root["$defs"] = definitions(&mut g);
    root
}

/// One schema for a file of manifests of any kind (each document is one of them, told apart by
/// its `kind`): for editors, whose `$schema` line covers a whole file.
pub fn any_kind() -> Value {
    let mut g = SchemaGenerator::default();
    let kinds: Vec<Value> = Kind::ALL
        .into_iter()
        .filter(|k| k.is_served())
        .map(|k| envelope(k, &mut g))
        .collect();
    json!({
        "$schema": DIALECT,
        "title": "berth manifest",
        "description": "One berth object of any kind (`apiVersion: berth/v1`).",
        "oneOf": kinds,
        "$defs": definitions(&mut g),
    })
}

const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

fn definitions(g: &mut SchemaGenerator) -> Value {
    Value::Object(g.take_definitions(true).into_iter().collect())
}

/// The envelope with `kind`'s spec; its types' definitions stay in `g`. `status` is the
/// controllers' to write and is accepted as anything (the server ignores it on apply).
fn envelope(kind: Kind, g: &mut SchemaGenerator) -> Value {
    let spec = match kind {
        Kind::Service => g.subschema_for::<ServiceSpec>(),
        Kind::Secret | Kind::Config => g.subschema_for::<DataSpec>(),
        Kind::Volume => g.subschema_for::<VolumeSpec>(),
        Kind::Network => g.subschema_for::<NetworkSpec>(),
        Kind::Node => g.subschema_for::<NodeSpec>(),
        Kind::Ingress => g.subschema_for::<IngressSpec>(),
        Kind::Registry => g.subschema_for::<RegistrySpec>(),
        Kind::Backup => g.subschema_for::<BackupSpec>(),
    };
    let metadata = g.subschema_for::<ObjectMeta>();
    json!({
        "title": kind.as_str(),
        "description": description(kind),
        "type": "object",
        "additionalProperties": false,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": API_VERSION, "description": "Always `berth/v1`."},
            "kind": {"const": kind.as_str()},
            "metadata": metadata,
            "spec": spec,
            "status": {"description": "Written by berth's controllers; ignored on apply."}
        }
    })
}

fn description(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "A long-running workload: a Swarm service berth keeps as the spec says.",
        Kind::Secret => "Sensitive values Services mount as files; never shown back in clear.",
        Kind::Config => "Non-sensitive values Services mount as files.",
        Kind::Volume => "A named volume Services mount.",
        Kind::Network => "An overlay network Services join (encrypted by default).",
        Kind::Node => "A swarm node: its labels and availability, as the spec says.",
        Kind::Ingress => "Domains routed to Services through the HTTPS-only load balancer.",
        Kind::Registry => "Credentials for a private image registry.",
        Kind::Backup => "A backup plan: schedule, retention, repository and volumes.",
    }
}

/// What `berth explain` shows for a field: its path, type and description.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDoc {
    pub path: String,
    pub type_name: String,
    pub description: String,
    /// The fields under it (name, type, first line of description), for an object.
    pub fields: Vec<(String, String, String)>,
}

/// The field at `path` (`service.spec.update`, `spec.update` with `kind` given separately) in
/// `kind`'s schema, or what is wrong with the path.
pub fn explain(kind: Kind, path: &[&str]) -> Result<FieldDoc, String> {
    let root = for_kind(kind);
    let defs = root["$defs"].clone();
    let mut node = root.clone();
    let mut walked = vec![kind.lower().to_string()];
    for part in path {
        node = resolve(&node, &defs);
        let props = properties(&node, &defs);
        match props.iter().find(|(name, _)| name == part) {
            Some((_, child)) => node = child.clone(),
            None => {
                let names: Vec<&str> = props.iter().map(|(n, _)| n.as_str()).collect();
                return Err(format!(
                    "`{}` has no field `{part}` (fields: {})",
                    walked.join("."),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
        }
        walked.push(part.to_string());
    }
    let type_name = type_name(&node, &defs);
    let described = node["description"].as_str().map(str::to_string);
    let node = resolve(&node, &defs);
    let description = described
        .or_else(|| node["description"].as_str().map(str::to_string))
        .map(|d| unwrap_lines(&d))
        .unwrap_or_default();
    let fields = properties(&node, &defs)
        .into_iter()
        .map(|(name, child)| {
            let resolved = resolve(&child, &defs);
            let d = child["description"]
                .as_str()
                .or_else(|| resolved["description"].as_str())
                .map(summary)
                .unwrap_or_default();
            (name, self::type_name(&child, &defs), d)
        })
        .collect();
    Ok(FieldDoc {
        path: walked.join("."),
        type_name,
        description,
        fields,
    })
}

/// A doc comment's paragraphs, each on one line (the source wraps them at 100 columns).
fn unwrap_lines(d: &str) -> String {
    d.split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The first sentence of a description (its first paragraph when that has no full stop).
fn summary(d: &str) -> String {
    let first = unwrap_lines(d.split("\n\n").next().unwrap_or_default());
    match first.find(". ") {
        Some(i) => first[..=i].to_string(),
        None => first,
    }
}

/// Follows `$ref`, a single-schema `allOf`, and an `Option`'s `anyOf [T, null]` to the schema
/// that says what the field is.
fn resolve(node: &Value, defs: &Value) -> Value {
    let mut n = node.clone();
    for _ in 0..16 {
        if let Some(r) = n["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap_or_default();
            n = defs[name].clone();
            continue;
        }
        let non_null: Vec<&Value> = n["anyOf"]
            .as_array()
            .or_else(|| n["oneOf"].as_array())
            .or_else(|| n["allOf"].as_array())
            .map(|v| v.iter().filter(|s| s["type"] != "null").collect())
            .unwrap_or_default();
        if non_null.len() == 1 && n.get("properties").is_none() {
            n = non_null[0].clone();
            continue;
        }
        break;
    }
    n
}

fn properties(node: &Value, defs: &Value) -> Vec<(String, Value)> {
    let n = resolve(node, defs);
    if n["type"] == "array" {
        return properties(&n["items"], defs);
    }
    if let Some(m) = n["properties"].as_object() {
        return m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    // A field with several forms (`env`: a list or a map): the first form with fields.
    n["anyOf"]
        .as_array()
        .or_else(|| n["oneOf"].as_array())
        .into_iter()
        .flatten()
        .map(|form| properties(form, defs))
        .find(|p| !p.is_empty())
        .unwrap_or_default()
}

fn type_name(node: &Value, defs: &Value) -> String {
    if let Some(r) = node["$ref"].as_str() {
        return r.rsplit('/').next().unwrap_or_default().to_string();
    }
    let n = resolve(node, defs);
    if let Some(r) = node["anyOf"].as_array().and_then(|a| {
        a.iter()
            .find(|s| s["type"] != "null")
            .and_then(|s| s["$ref"].as_str())
    }) {
        return r.rsplit('/').next().unwrap_or_default().to_string();
    }
    match &n["type"] {
        Value::String(t) if t == "array" => format!("[]{}", type_name(&n["items"], defs)),
        Value::String(t) => t.clone(),
        Value::Array(ts) if ts.iter().any(|t| t == "array") => {
            format!("[]{}", type_name(&n["items"], defs))
        }
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join("|"),
        _ if n.get("enum").is_some() => "enum".into(),
        _ if n.get("anyOf").is_some() => "one of several forms".into(),
        _ => "any".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_str;
    use crate::typed::decode_doc;
    use std::path::{Path, PathBuf};

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace")
            .to_path_buf()
    }

    fn errors(schema: &Value, doc: &Value) -> Vec<String> {
        let v = jsonschema::validator_for(schema).expect("a valid schema");
        v.iter_errors(doc)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect()
    }

    fn manifests() -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for dir in ["fixtures/examples", "fixtures/demo"] {
            for entry in std::fs::read_dir(workspace().join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    out.push((path, text));
                }
            }
        }
        assert!(out.len() >= 10, "the fixtures are where they were");
        out
    }

    /// Every manifest shipped in `fixtures/` is valid for the server (they are documentation, and
    /// documentation that does not apply is worse than none) and for its schema, and names the
    /// schema an editor uses for it in its first line.
    #[test]
    fn every_fixture_validates_against_its_schema() {
        let any = any_kind();
        for (path, text) in manifests() {
            let file = path.display().to_string();
            let docs = parse_str(&file, &text).unwrap();
            let kinds: std::collections::BTreeSet<Kind> = docs
                .iter()
                .map(|d| crate::typed::kind_of(&d.value).unwrap())
                .collect();
            for doc in &docs {
                decode_doc(doc).unwrap_or_else(|e| panic!("{file}: the server refuses it: {e:?}"));
                let kind = crate::typed::kind_of(&doc.value).unwrap();
                assert_eq!(
                    errors(&for_kind(kind), &doc.value),
                    Vec::<String>::new(),
                    "{file}"
                );
                assert_eq!(errors(&any, &doc.value), Vec::<String>::new(), "{file}");
            }
            let want = match kinds.iter().collect::<Vec<_>>()[..] {
                [k] => format!("{}.json", k.lower()),
                _ => "berth.json".to_string(),
            };
            let line = format!("# yaml-language-server: $schema=../schemas/{want}");
            assert_eq!(
                text.lines().next(),
                Some(line.as_str()),
                "{file}'s first line"
            );
        }
    }

    fn service(spec: Value) -> Value {
        json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec})
    }

    /// What the server refuses for its shape, the schema refuses too (it is generated from the
    /// same types); and both take what both take.
    #[test]
    fn the_schema_refuses_what_the_server_refuses() {
        let schema = for_kind(Kind::Service);
        let server = |v: &Value| crate::typed::decode_object(v).is_ok();
        let ok = [
            service(json!({"image": "a:1"})),
            service(json!({"image": "a:1", "env": {"A": "1", "B": 2}})),
            service(json!({"image": "a:1", "env": [{"name": "A", "value": "1"}]})),
            service(
                json!({"image": "a:1", "resources": {"limits": {"cpus": 0.5, "memory": "512Mi"}}}),
            ),
            service(json!({"image": "a:1", "update": {"parallelism": 2, "delay": "10s"}})),
        ];
        for doc in &ok {
            assert!(server(doc), "{doc}");
            assert_eq!(errors(&schema, doc), Vec::<String>::new(), "{doc}");
        }
        let bad = [
            service(json!({"image": "a:1", "replica": 2})),
            service(json!({"image": "a:1", "update": {"paralelism": 2}})),
            service(json!({"image": "a:1", "replicas": "three"})),
            service(json!({"image": "a:1", "env": 5})),
            service(json!({"image": "a:1", "stopGracePeriod": "soon"})),
            service(json!({"replicas": 1})),
            json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web", "nme": 1}, "spec": {"image": "a:1"}}),
            json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"image": "a:1"}, "extra": 1}),
            json!({"apiVersion": "berth/v1", "kind": "Secret", "metadata": {"name": "s"}, "spec": {"value": "x"}}),
        ];
        for doc in &bad {
            assert!(!server(doc), "the server takes {doc}");
            let kind = crate::typed::kind_of(doc).unwrap();
            assert!(
                !errors(&for_kind(kind), doc).is_empty(),
                "the schema takes {doc}"
            );
            assert!(
                !errors(&any_kind(), doc).is_empty(),
                "the any-kind schema takes {doc}"
            );
        }
    }

    /// `fixtures/schemas/` holds what the types generate (editors read those files). After a
    /// change to a spec type: `BERTH_WRITE_SCHEMAS=1 cargo test -p berth-api-types schema`.
    #[test]
    fn the_schema_files_are_what_the_types_generate() {
        let dir = workspace().join("fixtures/schemas");
        let mut files: Vec<(String, Value)> = Kind::ALL
            .into_iter()
            .filter(|k| k.is_served())
            .map(|k| (format!("{}.json", k.lower()), for_kind(k)))
            .collect();
        files.push(("berth.json".into(), any_kind()));
        let write = std::env::var_os("BERTH_WRITE_SCHEMAS").is_some();
        for (name, schema) in files {
            let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            let path = dir.join(&name);
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == text,
                "{} is not what the types generate: run BERTH_WRITE_SCHEMAS=1 cargo test -p \
                 berth-api-types schema",
                path.display()
            );
        }
    }

    #[test]
    fn explain_walks_to_a_field_and_lists_what_is_under_it() {
        let doc = explain(Kind::Service, &["spec", "update"]).unwrap();
        assert_eq!(doc.path, "service.spec.update");
        assert!(
            doc.fields.iter().any(|(n, _, _)| n == "parallelism"),
            "{doc:?}"
        );
        let replicas = explain(Kind::Service, &["spec", "replicas"]).unwrap();
        assert!(replicas.description.contains("default 1"), "{replicas:?}");
        assert_eq!(replicas.type_name, "integer");
        let env = explain(Kind::Service, &["spec", "env", "name"]).unwrap();
        assert_eq!(env.path, "service.spec.env.name");
        let err = explain(Kind::Service, &["spec", "replica"]).unwrap_err();
        assert!(
            err.contains("no field `replica`") && err.contains("replicas"),
            "{err}"
        );
    }
}
