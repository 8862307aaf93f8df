//! Secrets at rest: a stored Secret's `spec` is `{"sealed": "<base64(nonce || ciphertext)>"}`
//! (XChaCha20-Poly1305, see `crypto.rs`), bound to `secret/<name>` so a blob only opens where it was
//! written. `get` and `list` open it again, so callers inside the process see plaintext; the API
//! redacts it. A key check sealed at first open refuses a wrong master key at start, and Secrets
//! stored in clear by a version before encryption are sealed at open.

use super::backend::{Db, Tree};
use super::{decode, encode, key, Store, StoreError};
use crate::crypto::{MasterKey, Sealer};
use berth_api_types::{DynObject, Kind};
use serde_json::{json, Value};

/// Associated data of a sealed Secret spec: the object's key, so a blob only opens where it was written.
fn sealed_aad(name: &str) -> String {
    key(Kind::Secret, name)
}

/// The sealed blob of a stored spec, if it is in sealed form (`{"sealed": "..."}`, nothing else).
fn sealed_blob(spec: &Value) -> Option<&str> {
    let m = spec.as_object()?;
    if m.len() != 1 {
        return None;
    }
    m.get("sealed")?.as_str()
}

/// Key-check entry in `meta`: a known plaintext sealed under the master key at first open, so a
/// wrong key is refused at start rather than discovered on the first read of a Secret.
pub(super) const KEY_CHECK: &str = "key-check";
const KEY_CHECK_AAD: &[u8] = b"berth/key-check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"berth master key check v1";

/// Refuses a master key that is not the one this store was first opened with; records it at first
/// open.
pub(super) async fn check_key(
    db: &Db,
    meta: &Tree,
    sealer: &Sealer,
    place: &str,
    key: &MasterKey,
) -> Result<(), StoreError> {
    let check = key_check_value(sealer);
    // First writer wins, so servers starting together on one log keep one key check.
    let stored = db
        .transact(&[meta], |t| match t[0].get(KEY_CHECK)? {
            Some(v) => Ok(Some(v)),
            None => {
                t[0].insert(KEY_CHECK, check.as_bytes())?;
                Ok(None)
            }
        })
        .await?;
    match stored {
        Some(v) => {
            let ok = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| sealer.open(KEY_CHECK_AAD, s).ok())
                .is_some_and(|p| p == KEY_CHECK_PLAINTEXT);
            if !ok {
                return Err(StoreError::WrongKey {
                    dir: place.to_string(),
                    source_: key.source().to_string(),
                });
            }
        }
        None => db.flush_blocking()?,
    }
    Ok(())
}

/// The key check's value under `sealer`'s key.
pub(super) fn key_check_value(sealer: &Sealer) -> String {
    sealer.seal(KEY_CHECK_AAD, KEY_CHECK_PLAINTEXT)
}

/// A stored Secret record with its spec opened with `old` and sealed again with `new`; everything
/// else as it was. Errors name the object, never a value.
pub(super) fn reseal_object(
    bytes: &[u8],
    old: &Sealer,
    new: &Sealer,
) -> Result<Vec<u8>, StoreError> {
    let mut obj = decode(bytes)?;
    let name = obj.metadata.name.clone();
    let aad = sealed_aad(&name);
    let blob = sealed_blob(&obj.spec).ok_or_else(|| {
        StoreError::Storage(format!(
            "Secret `{name}` is not sealed; nothing was changed"
        ))
    })?;
    let plaintext = old.open(aad.as_bytes(), blob).map_err(|_| {
        StoreError::Storage(format!(
            "Secret `{name}` does not open with the current key; nothing was changed (see `berth admin fsck`)"
        ))
    })?;
    obj.spec = json!({ "sealed": new.seal(aad.as_bytes(), &plaintext) });
    Ok(encode(&obj))
}

impl Store {
    /// Seals any Secret stored in clear (written before encryption at rest existed).
    pub(super) async fn seal_unsealed(&self) -> Result<(), StoreError> {
        let mut sealed_any = false;
        for item in self
            .objects
            .scan_prefix(format!("{}/", Kind::Secret.lower()))
        {
            let (k, v) = item?;
            // Unreadable records are the quarantine's (`quarantine.rs`), which runs next.
            let Ok(obj) = decode(&v) else { continue };
            if sealed_blob(&obj.spec).is_none() {
                self.objects.insert(k, self.encode_obj(&obj)).await?;
                sealed_any = true;
            }
        }
        if sealed_any {
            self.db.flush_blocking()?;
        }
        Ok(())
    }

    /// An object as stored: a Secret's spec sealed, everything else as is.
    pub(super) fn encode_obj(&self, obj: &DynObject) -> Vec<u8> {
        if obj.kind != Kind::Secret {
            return encode(obj);
        }
        let plaintext = encode(&obj.spec);
        let sealed = self
            .sealer
            .seal(sealed_aad(&obj.metadata.name).as_bytes(), &plaintext);
        encode(&DynObject {
            api_version: obj.api_version.clone(),
            kind: obj.kind,
            metadata: obj.metadata.clone(),
            spec: json!({ "sealed": sealed }),
            status: obj.status.clone(),
        })
    }

    /// A stored object as callers see it: a Secret's spec opened. Errors name the object, never a value.
    pub(super) fn decode_obj(&self, bytes: &[u8]) -> Result<DynObject, StoreError> {
        let mut obj = decode(bytes)?;
        if obj.kind != Kind::Secret {
            return Ok(obj);
        }
        let name = obj.metadata.name.clone();
        let Some(blob) = sealed_blob(&obj.spec) else {
            return Err(StoreError::Storage(format!(
                "Secret `{name}` is stored without encryption; restart the API server to seal it"
            )));
        };
        let plaintext = self
            .sealer
            .open(sealed_aad(&name).as_bytes(), blob)
            .map_err(|_| {
                StoreError::Storage(format!(
                    "Secret `{name}` cannot be decrypted: it was sealed with another master key, \
                     for another object, or was altered"
                ))
            })?;
        obj.spec = serde_json::from_slice(&plaintext).map_err(|_| {
            StoreError::Storage(format!("Secret `{name}` decrypts to an unreadable spec"))
        })?;
        Ok(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::store::WriteMode;
    use berth_api_types::wire::ApplyOutcome;

    /// Every byte of every file under `dir`.
    fn all_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn secrets_are_sealed_at_rest() {
        use base64::Engine;
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let text = "zebra-marmalade-4711-TEXT";
        let bin = "okapi-quince-9932-BINARY";
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &test_key()).await.unwrap();
            s.write(
                vec![
                    secret(
                        "db",
                        json!({"stringData": {"pw": text}, "data": {"blob": b64(bin.as_bytes())}}),
                    ),
                    obj(json!({"apiVersion": "berth/v1", "kind": "Config", "metadata": {"name": "plain"},
                               "spec": {"stringData": {"conf": "visible-config-value"}}})),
                ],
                WriteMode::Upsert,
                None,
                false,
            )
            .await
            .unwrap();
            // In-process readers see plaintext.
            let got = s.get(Kind::Secret, "db").unwrap().unwrap();
            assert_eq!(got.spec["stringData"]["pw"], text);
            assert_eq!(s.list(Kind::Secret).unwrap()[0].spec, got.spec);
            // Status writes re-seal; events and the outbox get entries of their own.
            s.update_status(Kind::Secret, "db", json!({"observed": 1}), None)
                .await
                .unwrap();
            let stored = decode(&s.objects.get("secret/db").unwrap().unwrap()).unwrap();
            assert!(sealed_blob(&stored.spec).is_some(), "{}", stored.spec);
            s.db.flush_blocking().unwrap();
        }
        let files = all_files(dir.path());
        assert!(!files.is_empty());
        let mut saw_config = false;
        for (path, bytes) in &files {
            for needle in [
                text.to_string(),
                b64(text.as_bytes()),
                bin.to_string(),
                b64(bin.as_bytes()),
            ] {
                assert!(
                    !contains(bytes, needle.as_bytes()),
                    "{path} holds a secret value in clear"
                );
            }
            saw_config |= contains(bytes, b"visible-config-value");
        }
        assert!(
            saw_config,
            "Configs are stored in clear (and the scan does see values)"
        );

        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let got = s.get(Kind::Secret, "db").unwrap().unwrap();
        assert_eq!(got.spec["stringData"]["pw"], text);
        drop(s);

        let other = MasterKey::from_bytes([7u8; 32], "BERTH_MASTER_KEY");
        let err = Store::open(dir.path(), &other).await.err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{msg}");
        assert!(
            msg.contains("BERTH_MASTER_KEY") && msg.contains("not the key they were sealed with"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_sealed_blob_only_opens_where_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        s.write(
            vec![
                secret("a", json!({"stringData": {"k": "value-of-a"}})),
                secret("b", json!({"stringData": {"k": "value-of-b"}})),
            ],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        // Move a's sealed spec into b: authenticated as `secret/a`, it must not open as `secret/b`.
        let a = decode(&s.objects.get("secret/a").unwrap().unwrap()).unwrap();
        let mut b = decode(&s.objects.get("secret/b").unwrap().unwrap()).unwrap();
        b.spec = a.spec;
        s.objects.insert("secret/b", encode(&b)).await.unwrap();
        let err = s.get(Kind::Secret, "b").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Storage(_)));
        assert!(msg.contains("Secret `b` cannot be decrypted"), "{msg}");
        assert!(!msg.contains("value-of"), "{msg}");
        assert!(s.get(Kind::Secret, "a").is_ok());
    }

    #[tokio::test]
    async fn unsealed_secrets_are_sealed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &test_key()).await.unwrap();
            // As an older version would have stored it.
            let old = secret("old", json!({"stringData": {"k": "legacy-clear-value"}}));
            s.objects.insert("secret/old", encode(&old)).await.unwrap();
            s.db.flush_blocking().unwrap();
        }
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let stored = decode(&s.objects.get("secret/old").unwrap().unwrap()).unwrap();
        assert!(sealed_blob(&stored.spec).is_some());
        assert_eq!(
            s.get(Kind::Secret, "old").unwrap().unwrap().spec["stringData"]["k"],
            "legacy-clear-value"
        );
    }

    #[tokio::test]
    async fn secret_generation_compares_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let write = |v: &str| {
            let s = s.clone();
            let o = secret("db", json!({"stringData": {"pw": v}}));
            async move { s.write(vec![o], WriteMode::Upsert, None, false).await }
        };
        let r = write("one").await.unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Created);
        let r = write("one").await.unwrap();
        assert_eq!(
            r[0].0.outcome,
            ApplyOutcome::Unchanged,
            "fresh nonces do not make a change"
        );
        assert_eq!(r[0].1.metadata.generation, 1);
        let r = write("two").await.unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Configured);
        assert_eq!(r[0].1.metadata.generation, 2);
    }
}
