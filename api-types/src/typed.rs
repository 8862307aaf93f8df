//! Turning untyped objects (an API request body, a manifest document) into checked ones: find the
//! kind, deserialize its typed form with field paths, run its validation, and hand back the canonical
//! untyped object the store keeps. One function per entry point, one rule set for both.

use crate::backup::{validate_backup, BackupSpec};
use crate::ingress::{validate_ingress, IngressSpec};
use crate::kind::Kind;
use crate::manifest::{ManifestError, SourceDoc};
use crate::meta::DynObject;
use crate::meta::Object;
use crate::network::{validate_network, NetworkSpec};
use crate::node::{validate_node, NodeSpec};
use crate::registry::{validate_registry, RegistrySpec};
use crate::secret_config::{validate_data, DataSpec};
use crate::service::{validate_service, ServiceSpec};
use crate::validate::FieldError;
use crate::volume::{validate_volume, VolumeSpec};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deserializes `value` into `T`, reporting the failing field's path (`spec.env[1].name`; for an
/// unknown field, the path of the unknown field itself, so a manifest error points at the typo).
pub fn deserialize_value<T: DeserializeOwned>(value: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        if path == "." {
            path.clear();
        }
        let message = e.inner().to_string();
        FieldError { path, message }
    })
}

/// The kind an untyped object declares, checked before anything else so errors can be kind-specific.
pub fn kind_of(value: &Value) -> Result<Kind, FieldError> {
    match value.get("kind") {
        None => Err(FieldError::new("kind", "missing field `kind`")),
        Some(Value::String(s)) => {
            let kind: Kind = s.parse().map_err(|e: String| FieldError::new("kind", e))?;
            if !kind.is_served() {
                return Err(FieldError::new(
                    "kind",
                    format!("kind `{kind}` is not served by this version of berth yet"),
                ));
            }
            Ok(kind)
        }
        Some(_) => Err(FieldError::new("kind", "must be a string")),
    }
}

/// A stored object in its typed form, validated again: what a controller does before trusting an
/// object (the API validated it on write; another version of berth may have stored it). `Err` holds
/// every problem in one line, for a status condition.
pub fn recheck<T: DeserializeOwned>(
    obj: &DynObject,
    validate: impl Fn(&T) -> Result<(), Vec<FieldError>>,
) -> Result<T, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    let typed: T = deserialize_value(&value).map_err(|e| e.to_string())?;
    validate(&typed).map_err(|errs| {
        errs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(typed)
}

/// Checks an untyped object and returns it in canonical form: spec re-serialized from its typed form,
/// status dropped (status is written only through the status endpoint).
pub fn decode_object(value: &Value) -> Result<DynObject, Vec<FieldError>> {
    let kind = kind_of(value).map_err(|e| vec![e])?;
    match kind {
        Kind::Service => decode_as::<ServiceSpec>(value, |o| {
            validate_service(&Object {
                api_version: o.api_version.clone(),
                kind: o.kind,
                metadata: o.metadata.clone(),
                spec: o.spec.clone(),
                status: Default::default(),
            })
        }),
        Kind::Secret | Kind::Config => decode_as::<DataSpec>(value, validate_data),
        Kind::Volume => decode_as::<VolumeSpec>(value, validate_volume),
        Kind::Network => decode_as::<NetworkSpec>(value, validate_network),
        Kind::Node => decode_as::<NodeSpec>(value, validate_node),
        Kind::Registry => decode_as::<RegistrySpec>(value, validate_registry),
        Kind::Ingress => decode_as::<IngressSpec>(value, validate_ingress),
        Kind::Backup => decode_as::<BackupSpec>(value, validate_backup),
    }
}

/// Deserializes the typed form, validates it, and re-serializes the spec.
fn decode_as<S>(
    value: &Value,
    validate: impl Fn(&Object<S, Value>) -> Result<(), Vec<FieldError>>,
) -> Result<DynObject, Vec<FieldError>>
where
    S: serde::Serialize + DeserializeOwned,
{
    let typed: Object<S, Value> = deserialize_value(value).map_err(|e| vec![e])?;
    let obj = Object {
        status: Value::Null,
        ..typed
    };
    validate(&obj)?;
    Ok(DynObject {
        spec: serde_json::to_value(&obj.spec)
            .map_err(|e| vec![FieldError::new("spec", format!("cannot encode spec: {e}"))])?,
        api_version: obj.api_version,
        kind: obj.kind,
        metadata: obj.metadata,
        status: Value::Null,
    })
}

/// The same for one manifest document, with every error placed at its file, line and column.
pub fn decode_doc(doc: &SourceDoc) -> Result<DynObject, Vec<ManifestError>> {
    decode_object(&doc.value).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| ManifestError::at(doc, &e.path, e.message))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_drops_status_and_keeps_spelling() {
        let obj = decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"image": "a:1", "resources": {"limits": {"cpus": 0.5}}},
            "status": {"anything": true}
        }))
        .unwrap();
        assert_eq!(obj.status, Value::Null);
        assert_eq!(obj.spec["resources"]["limits"]["cpus"], json!("0.5"));
    }

    #[test]
    fn errors_carry_paths() {
        let e = decode_object(&json!({"apiVersion": "berth/v1", "metadata": {"name": "x"}}))
            .unwrap_err();
        assert_eq!(e[0].to_string(), "kind: missing field `kind`");
        let e = decode_object(&json!({"apiVersion": "berth/v1", "kind": "Pod"})).unwrap_err();
        assert!(
            e[0].to_string().starts_with("kind: unknown kind `Pod`"),
            "{}",
            e[0]
        );
        let e = decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "x"},
            "spec": {"image": "a", "env": [{"name": "A", "valeu": "1"}]}
        }))
        .unwrap_err();
        assert_eq!(e[0].path, "spec.env[0].valeu");
        assert!(e[0].message.starts_with("unknown field `valeu`"));
        let e = decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "x"},
            "spec": {"image": "a", "replicas": "three"}
        }))
        .unwrap_err();
        assert_eq!(e[0].path, "spec.replicas");
    }
}
