//! Secret and Config: named sets of files (key -> bytes). A Secret is stored encrypted and its values
//! never leave the API except to controllers; a Config is stored and shown in clear. Both are
//! materialised in Swarm per content (`<name>-<hash>`), because Swarm secrets and configs are immutable.

use crate::meta::Object;
use crate::validate::{check_envelope, Errors, FieldError};
use hmac::{Hmac, Mac};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
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

impl schemars::JsonSchema for DataSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DataSpec".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": false,
            "description": "`data` holds base64 values, `stringData` plain text (as in Kubernetes). A key may be in one only.",
            "properties": {
                "data": {
                    "description": "Keys to base64-encoded values.",
                    "type": "object",
                    "additionalProperties": {"type": "string", "contentEncoding": "base64"}
                },
                "stringData": {
                    "description": "Keys to plain-text values (stored as given).",
                    "type": "object",
                    "additionalProperties": {"type": "string"}
                }
            }
        })
    }
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

/// The key of content digests: derived from the master key (`HMAC-SHA256(master, "berth content
/// hash v1")`), so only the API server can compute one, and a digest in a response or a Swarm name
/// cannot be used to test guesses of a value offline (a plain SHA-256 of a short password can).
/// Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct ContentKey([u8; 32]);

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentKey(<derived>)")
    }
}

/// Names what the derived key is for; another layout of digests gets another label (and key).
const CONTENT_KEY_LABEL: &[u8] = b"berth content hash v1";

impl ContentKey {
    /// Derives the content key from the master key's bytes (a PRF over a fixed label: stable
    /// across restarts, distinct from the master key and from its other uses).
    pub fn derive(master: &[u8; 32]) -> Self {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(master).expect("HMAC takes keys of any length");
        mac.update(CONTENT_KEY_LABEL);
        ContentKey(mac.finalize().into_bytes().into())
    }

    /// One value's digest: lowercase hex of `HMAC-SHA256(content key, bytes)`. Equal values give
    /// equal digests within one installation (and one master key); nothing else can be learnt.
    pub fn digest(&self, bytes: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(bytes);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The digest of every file of a Secret or Config (key -> digest): what the data endpoint hands
    /// controllers, who name Swarm secrets and configs by it.
    pub fn digests(&self, files: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(k, v)| (k.clone(), self.digest(v)))
            .collect()
    }
}

/// What the API shows of one Secret key instead of its value. `digest` is a keyed hash (see
/// [`ContentKey`]), not a SHA-256 of the value: it tells whether a value changed, nothing more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedactedKey {
    pub size: usize,
    pub digest: String,
}

/// The read-only view of a Secret's spec that the API returns: keys, sizes and keyed digests, no
/// values. It is not accepted on apply, so output of `berth get` cannot overwrite a secret by accident.
pub fn redacted_view(spec: &DataSpec, key: &ContentKey) -> serde_json::Value {
    let keys: BTreeMap<String, RedactedKey> = spec
        .files()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                RedactedKey {
                    size: v.len(),
                    digest: key.digest(&v),
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
        let key = ContentKey::derive(&[1u8; 32]);
        let v = redacted_view(&d, &key);
        assert_eq!(v["redacted"]["pw"]["size"], 12);
        assert_eq!(v["redacted"]["pw"]["digest"], key.digest(b"s3cret-value"));
        assert!(v["redacted"]["pw"].get("sha256").is_none(), "{v}");
        assert!(!v.to_string().contains("s3cret"));
        // Not the plain SHA-256 an offline guesser could check candidates against.
        use sha2::Digest;
        let plain = hex::encode(Sha256::digest(b"s3cret-value"));
        assert_ne!(key.digest(b"s3cret-value"), plain);
        assert!(!v.to_string().contains(&plain));
    }

    #[test]
    fn content_digests_are_keyed() {
        let a = ContentKey::derive(&[1u8; 32]);
        let b = ContentKey::derive(&[2u8; 32]);
        assert_eq!(a.digest(b"v"), a.digest(b"v"), "stable under one key");
        assert_ne!(a.digest(b"v"), a.digest(b"w"));
        assert_ne!(
            a.digest(b"v"),
            b.digest(b"v"),
            "another master key, another digest"
        );
        assert_eq!(a.digest(b"v").len(), 64);
        assert!(!format!("{a:?}").contains("01"));
        // Pinned, so a change of derivation is deliberate (it renames every Swarm secret):
        // CK=$(printf 'berth content hash v1' | openssl dgst -sha256 -mac HMAC -macopt hexkey:0101..01)
        // printf v | openssl dgst -sha256 -mac HMAC -macopt hexkey:$CK
        assert_eq!(
            a.digest(b"v"),
            "dee1110fd83884cdc21a7a6a47cbe872d8aa50426835daa080afef0d16a25be4"
        );
        let files = BTreeMap::from([("k".to_string(), b"v".to_vec())]);
        assert_eq!(a.digests(&files)["k"], a.digest(b"v"));
    }
}
