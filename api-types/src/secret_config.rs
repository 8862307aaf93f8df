//! Secret and Config: named sets of files (key -> bytes). A Secret is stored encrypted and its values
//! never leave the API except to controllers; a Config is stored and shown in clear. Both are
//! materialised in Swarm per content (`<name>-<hash>`), because Swarm secrets and configs are immutable.

use crate::meta::Object;
use crate::validate::{check_envelope, Errors, FieldError};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;

pub type Secret = Object<DataSpec, serde_json::Value>;
pub type Config = Object<DataSpec, serde_json::Value>;

/// Largest total size of one Secret or Config (Swarm's own limit for one secret or config is 500 KiB).
pub const MAX_DATA_BYTES: usize = 500 * 1024;

/// `data` holds base64 values, `stringData` plain text (as in Kubernetes). A key may be in one only.
///
/// Deserialized quietly: no error about a malformed spec, `data` or `stringData` quotes what was
/// given, because serde's own ("invalid type: string \"hunter2\", expected a map") would put a
/// secret written in the wrong place into an API answer or a CLI message.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DataSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, Base64Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub string_data: BTreeMap<String, TextValue>,
}

/// What `DataSpec` reads once its input is known to be a mapping.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDataSpec {
    #[serde(default, deserialize_with = "quiet_mapping")]
    data: BTreeMap<String, Base64Value>,
    #[serde(default, deserialize_with = "quiet_mapping")]
    string_data: BTreeMap<String, TextValue>,
}

impl<'de> Deserialize<'de> for DataSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: RawDataSpec = quiet_mapping(d)?;
        Ok(DataSpec {
            data: raw.data,
            string_data: raw.string_data,
        })
    }
}

/// Deserializes `T` from a mapping; anything else is an error that does not show the value.
fn quiet_mapping<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(QuietMapping(std::marker::PhantomData))
}

struct QuietMapping<T>(std::marker::PhantomData<T>);

const NOT_A_MAPPING: &str = "must be a mapping of key: value (the value given is not shown)";

impl<'de, T: Deserialize<'de>> Visitor<'de> for QuietMapping<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Err(E::custom(NOT_A_MAPPING))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::custom(NOT_A_MAPPING))
    }
}

impl DataSpec {
    /// Every key with its bytes.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out: BTreeMap<String, Vec<u8>> = self
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        for (k, v) in &self.string_data {
            out.insert(k.clone(), v.0.as_bytes().to_vec());
        }
        out
    }

    pub fn validate(&self, errors: &mut Errors) {
        let mut total = 0usize;
        for (field, keys) in [
            ("spec.data", self.data.keys().collect::<Vec<_>>()),
            ("spec.stringData", self.string_data.keys().collect()),
        ] {
            for k in keys {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
                if !ok {
                    errors.add(
                        format!("{field}.{k}"),
                        "keys must be 1-253 of [A-Za-z0-9._-] (they become file names)",
                    );
                }
            }
        }
        for k in self.string_data.keys() {
            if self.data.contains_key(k) {
                errors.add(
                    format!("spec.stringData.{k}"),
                    "is also set in `data`; set each key once",
                );
            }
        }
        for v in self.files().values() {
            total += v.len();
        }
        if self.data.is_empty() && self.string_data.is_empty() {
            errors.add("spec", "needs at least one key in `data` or `stringData`");
        }
        if total > MAX_DATA_BYTES {
            errors.add(
                "spec",
                format!("holds {total} bytes; the most Swarm accepts is {MAX_DATA_BYTES}"),
            );
        }
    }
}

/// One key's content hash, as shown instead of a Secret's value and used in Swarm names.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What the API shows of one Secret key instead of its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedactedKey {
    pub size: usize,
    pub sha256: String,
}

/// The read-only view of a Secret's spec that the API returns: keys, sizes and hashes, no values.
/// It is not accepted on apply, so output of `berth get` cannot overwrite a secret by accident.
pub fn redacted_view(spec: &DataSpec) -> serde_json::Value {
    let keys: BTreeMap<String, RedactedKey> = spec
        .files()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                RedactedKey {
                    size: v.len(),
                    sha256: content_hash(&v),
                },
            )
        })
        .collect();
    serde_json::json!({ "redacted": keys })
}

pub fn validate_data(obj: &Object<DataSpec, serde_json::Value>) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &obj.api_version, &obj.metadata);
    obj.spec.validate(&mut errors);
    errors.into_result()
}

/// Bytes written as base64. Errors never quote the value: it may be a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Base64Value(pub Vec<u8>);

impl fmt::Debug for Base64Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for Base64Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let s = d.deserialize_any(QuietString)?;
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map(Base64Value)
            .map_err(|_| de::Error::custom("is not valid base64 (use `stringData` for plain text)"))
    }
}

/// Plain text. Errors never quote the value: it may be a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TextValue(pub String);

impl fmt::Debug for TextValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for TextValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TextValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(QuietString).map(TextValue)
    }
}

/// Accepts only strings, and says what was wrong without echoing what was given (serde's own
/// "invalid type: integer `123456`" would put a secret into an error message).
struct QuietString;

impl<'de> Visitor<'de> for QuietString {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(de::Error::custom(NOT_A_STRING))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(de::Error::custom(NOT_A_STRING))
    }
}

const NOT_A_STRING: &str = "must be a string (quote numbers and booleans; the value is not shown)";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_never_echo_values() {
        let e = serde_json::from_value::<DataSpec>(json!({"stringData": {"pw": 123456789}}))
            .unwrap_err();
        assert!(!e.to_string().contains("123456789"), "{e}");
        assert!(e.to_string().contains("must be a string"), "{e}");
        let e =
            serde_json::from_value::<DataSpec>(json!({"data": {"pw": "hunter2!!"}})).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("not valid base64"), "{e}");
        let d: DataSpec =
            serde_json::from_value(json!({"data": {"a": "aGVsbG8="}, "stringData": {"b": "x"}}))
                .unwrap();
        assert!(!format!("{d:?}").contains("hello"));
        assert_eq!(d.files()["a"], b"hello");
    }

    /// Every way to give a Secret's `spec`, `data` or `stringData` the wrong shape, through both
    /// entry points (an API body and a YAML manifest): the error names the field and never
    /// contains the value.
    #[test]
    fn malformed_secret_specs_name_the_field_and_never_echo_the_value() {
        const V: &str = "hunter2-9731";
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (json!({"stringData": V}), "spec.stringData"),
            (json!({"data": V}), "spec.data"),
            (json!({"stringData": 97319731}), "spec.stringData"),
            (json!({"data": -97319731}), "spec.data"),
            (json!({"stringData": 9731.9731}), "spec.stringData"),
            (json!({"stringData": true}), "spec.stringData"),
            (json!({"stringData": [V]}), "spec.stringData"),
            (json!({"data": [V, 97319731]}), "spec.data"),
            (
                json!({"stringData": {"pw": {"nested": V}}}),
                "spec.stringData.pw",
            ),
            (json!({"stringData": {"pw": [V]}}), "spec.stringData.pw"),
            (
                json!({"stringData": {"pw": 97319731}}),
                "spec.stringData.pw",
            ),
            (json!({"stringData": {"pw": null}}), "spec.stringData.pw"),
            (json!({"data": {"pw": V}}), "spec.data.pw"),
            (json!({"data": {"pw": {"k": V}}}), "spec.data.pw"),
            (json!({"data": {"pw": 97319731}}), "spec.data.pw"),
            (json!(V), "spec"),
            (json!(97319731), "spec"),
            (json!([V]), "spec"),
        ];
        for kind in ["Secret", "Config"] {
            for (spec, path) in &cases {
                let obj = json!({"apiVersion": "berth/v1", "kind": kind,
                                 "metadata": {"name": "db"}, "spec": spec});
                let errs = crate::typed::decode_object(&obj).unwrap_err();
                let text = format!("{errs:?} {}", errs[0]);
                assert_eq!(&errs[0].path, path, "{spec}: {text}");
                for leak in [V, "97319731", "9731.9731", "hunter2"] {
                    assert!(!text.contains(leak), "{spec} echoed: {text}");
                }
                // The CLI's loader: YAML text, errors placed at file:line:col.
                let yaml = format!(
                    "apiVersion: berth/v1\nkind: {kind}\nmetadata: {{name: db}}\nspec: {spec}\n"
                );
                let doc = &crate::manifest::parse_str("s.yaml", &yaml).unwrap()[0];
                let errs = crate::typed::decode_doc(doc).unwrap_err();
                let text = errs.iter().map(ToString::to_string).collect::<String>();
                assert!(text.contains(&format!(": {path}: ")), "{yaml}: {text}");
                for leak in [V, "97319731", "9731.9731", "hunter2"] {
                    assert!(!text.contains(leak), "{yaml} echoed: {text}");
                }
            }
        }
    }

    #[test]
    fn validation() {
        let check = |v: serde_json::Value| {
            let d: DataSpec = serde_json::from_value(v).unwrap();
            let mut e = Errors::default();
            d.validate(&mut e);
            e.0.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert!(check(json!({"stringData": {"a.b_c-1": "x"}})).is_empty());
        assert_eq!(
            check(json!({})),
            ["spec: needs at least one key in `data` or `stringData`"]
        );
        assert!(check(json!({"stringData": {"a/b": "x"}}))[0]
            .starts_with("spec.stringData.a/b: keys must be"));
        assert!(
            check(json!({"data": {"a": "eA=="}, "stringData": {"a": "x"}}))[0]
                .contains("also set in `data`")
        );
        let big = "x".repeat(MAX_DATA_BYTES + 1);
        assert!(check(json!({"stringData": {"a": big}}))[0].contains("the most Swarm accepts"));
    }

    #[test]
    fn redacted_view_has_no_values() {
        let d: DataSpec =
            serde_json::from_value(json!({"stringData": {"pw": "s3cret-value"}})).unwrap();
        let v = redacted_view(&d);
        assert_eq!(v["redacted"]["pw"]["size"], 12);
        assert_eq!(v["redacted"]["pw"]["sha256"], content_hash(b"s3cret-value"));
        assert!(!v.to_string().contains("s3cret"));
    }
}
