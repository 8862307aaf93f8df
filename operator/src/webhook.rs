//! Deploy webhooks: the records behind `berth webhook create|list|rotate|delete`, their tokens and
//! the signed mode's HMAC check.
//!
//! A webhook URL carries a token of 256 random bits; the store keeps only its SHA-256, indexed by
//! that hash, so a request is looked up by the hash of what it presents (no byte-by-byte compare of
//! secrets that timing could reveal) and the hash is then compared again in constant time. The
//! token is shown once, when the webhook is created or rotated.
//!
//! A signed webhook also has a signing secret: the server must know it to check an HMAC, so it is
//! kept sealed with the master key (as Secrets are, `crypto.rs`) and shown once, like the token.
//! A signature covers `<timestamp>.<body>`, is accepted within a 5 minute window around the
//! server's clock, and only once (replays are remembered for as long as they would be accepted).

use crate::crypto::Sealer;
use crate::store::backend::Tree;
use crate::store::{Store, StoreError};
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Header with `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-berth-signature";
/// Header with the signing time, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-berth-timestamp";
/// How far a signature's timestamp may be from the server's clock, either way.
pub const REPLAY_WINDOW_SECS: i64 = 300;
/// Prefix of every webhook token: recognisable by secret scanners, and by people.
const TOKEN_PREFIX: &str = "bh_";

/// What a webhook deploys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// One Service; CI calls it with a tag or digest (or nothing: redeploy).
    Service,
    /// A registry's push notifications; deploys every Service running the pushed repository:tag.
    Registry,
}

/// A webhook as stored. The token itself is never stored; the signing secret only sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: String,
    pub kind: HookKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Registry hooks: the host (with port) services use in their image references for this
    /// registry, when it differs from the `request.host` the registry reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_host: Option<String>,
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    /// The signing secret, sealed with the master key; present on signed webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_sealed: Option<String>,
    pub created: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<DateTime<Utc>>,
}

/// A webhook as the API shows it: no token, no hash, no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    pub id: String,
    pub kind: HookKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_host: Option<String>,
    pub signed: bool,
    pub created: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<DateTime<Utc>>,
}

impl Webhook {
    pub fn view(&self) -> WebhookView {
        WebhookView {
            id: self.id.clone(),
            kind: self.kind,
            service: self.service.clone(),
            registry_host: self.registry_host.clone(),
            signed: self.signing_sealed.is_some(),
            created: self.created,
            rotated: self.rotated,
            last_used: self.last_used,
        }
    }
}

/// Body of `POST /apis/berth/v1/webhooks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhook {
    /// The Service a service hook deploys (required unless `registry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Require an HMAC signature on every call (service hooks).
    #[serde(default)]
    pub signed: bool,
    /// A registry notification hook instead of a service hook.
    #[serde(default)]
    pub registry: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_host: Option<String>,
}

/// Answer to create and rotate: the only time the token and signing secret are shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSecrets {
    pub webhook: WebhookView,
    pub token: String,
    /// The path to call, relative to the API server's URL.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
}

/// A fresh token: `bh_` and 256 random bits, URL-safe base64.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// A fresh signing secret: 256 random bits as 64 hex characters. The HMAC key is this string's
/// bytes, so `openssl dgst -sha256 -hmac "$SECRET"` uses it as printed.
pub fn new_signing_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A short public id (`wh-` and 40 random bits): names a webhook in lists and commands; grants nothing.
fn new_id() -> String {
    let mut bytes = [0u8; 5];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("wh-{}", hex::encode(bytes))
}

fn signing_aad(id: &str) -> Vec<u8> {
    format!("webhook/{id}/signing").into_bytes()
}

/// Webhook records in the store: `webhooks` (id -> record) and `webhook-tokens` (token hash -> id).
#[derive(Clone)]
pub struct Webhooks {
    store: Store,
    by_id: Tree,
    by_hash: Tree,
}

impl Webhooks {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Webhooks {
            by_id: store.aux_tree("webhooks")?,
            by_hash: store.aux_tree("webhook-tokens")?,
            store: store.clone(),
        })
    }

    fn sealer(&self) -> &Sealer {
        self.store.sealer()
    }

    /// Every webhook. A record that does not decode is moved into the store's quarantine and
    /// left out, so one bad record does not hide the others (or fail the environment snapshot).
    pub async fn list(&self) -> Result<Vec<Webhook>, StoreError> {
        let mut out: Vec<Webhook> = Vec::new();
        for item in self.by_id.iter() {
            let (k, v) = item?;
            match decode(&v) {
                Ok(h) => out.push(h),
                Err(_) => {
                    self.store
                        .quarantine_record(&self.by_id, &k, &v, "does not decode as a webhook")
                        .await?;
                }
            }
        }
        out.sort_by(|a, b| (&a.service, a.created).cmp(&(&b.service, b.created)));
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        self.by_id.get(id)?.map(|v| decode(&v)).transpose()
    }

    /// Creates a webhook; returns it with its token and signing secret (shown once).
    pub async fn create(
        &self,
        kind: HookKind,
        service: Option<String>,
        registry_host: Option<String>,
        signed: bool,
    ) -> Result<(Webhook, String, Option<String>), StoreError> {
        let token = new_token();
        let id = new_id();
        let secret = signed.then(new_signing_secret);
        let hook = Webhook {
            signing_sealed: secret
                .as_ref()
                .map(|s| self.sealer().seal(&signing_aad(&id), s.as_bytes())),
            id,
            kind,
            service,
            registry_host,
            token_hash: token_hash(&token),
            created: Utc::now(),
            rotated: None,
            last_used: None,
        };
        self.put(&hook, None).await?;
        Ok((hook, token, secret))
    }

    /// New token (and new signing secret, if signed); the old URL stops working at once.
    pub async fn rotate(
        &self,
        id: &str,
    ) -> Result<Option<(Webhook, String, Option<String>)>, StoreError> {
        let Some(old) = self.get(id)? else {
            return Ok(None);
        };
        let token = new_token();
        let secret = old.signing_sealed.is_some().then(new_signing_secret);
        let hook = Webhook {
            token_hash: token_hash(&token),
            signing_sealed: secret
                .as_ref()
                .map(|s| self.sealer().seal(&signing_aad(id), s.as_bytes())),
            rotated: Some(Utc::now()),
            ..old.clone()
        };
        self.put(&hook, Some(&old.token_hash)).await?;
        Ok(Some((hook, token, secret)))
    }

    /// Puts back a webhook from an environment snapshot: the same id and token hash (so CI's URL
    /// works again), its signing secret opened with the snapshot's key and sealed with this
    /// store's.
    pub async fn restore(
        &self,
        mut hook: Webhook,
        snapshot_sealer: &Sealer,
    ) -> Result<(), StoreError> {
        if let Some(sealed) = &hook.signing_sealed {
            let secret = snapshot_sealer
                .open(&signing_aad(&hook.id), sealed)
                .map_err(|_| {
                    StoreError::Storage(format!(
                        "webhook {}: its signing secret does not open with the snapshot's key",
                        hook.id
                    ))
                })?;
            hook.signing_sealed = Some(self.sealer().seal(&signing_aad(&hook.id), &secret));
        }
        self.put(&hook, None).await
    }

    pub async fn delete(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        let Some(old) = self.get(id)? else {
            return Ok(None);
        };
        self.store
            .db()
            .transact(&[&self.by_id, &self.by_hash], |t| {
                t[0].remove(id.as_bytes())?;
                t[1].remove(old.token_hash.as_bytes())
            })
            .await?;
        self.store.flush().await?;
        Ok(Some(old))
    }

    /// Writes a record and its hash index in one transaction (dropping `old_hash`), then flushes.
    async fn put(&self, hook: &Webhook, old_hash: Option<&str>) -> Result<(), StoreError> {
        let value = serde_json::to_vec(hook).expect("a webhook always encodes");
        self.store
            .db()
            .transact(&[&self.by_id, &self.by_hash], |t| {
                if let Some(h) = old_hash {
                    t[1].remove(h.as_bytes())?;
                }
                t[0].insert(hook.id.as_bytes(), &value)?;
                t[1].insert(hook.token_hash.as_bytes(), hook.id.as_bytes())
            })
            .await?;
        self.store.flush().await
    }

    /// The webhook a presented token belongs to, if any. Looked up by the token's hash, then
    /// compared in constant time.
    pub fn find(&self, token: &str) -> Result<Option<Webhook>, StoreError> {
        let hash = token_hash(token);
        let Some(id) = self.by_hash.get(hash.as_bytes())? else {
            return Ok(None);
        };
        let Some(hook) = self.get(&String::from_utf8_lossy(&id))? else {
            return Ok(None);
        };
        let same: bool = hook.token_hash.as_bytes().ct_eq(hash.as_bytes()).into();
        Ok(same.then_some(hook))
    }

    /// The signing secret of a signed webhook, opened with the master key.
    pub fn signing_secret(&self, hook: &Webhook) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(sealed) = &hook.signing_sealed else {
            return Ok(None);
        };
        self.sealer()
            .open(&signing_aad(&hook.id), sealed)
            .map(Some)
            .map_err(|_| {
                StoreError::Storage(format!(
                    "the signing secret of webhook {} cannot be decrypted (another master key?)",
                    hook.id
                ))
            })
    }

    /// Every signed webhook's record with its signing secret sealed again under `new` (for
    /// `berth admin rotate-master-key`, which writes them in one transaction with the Secrets).
    pub(crate) fn resealed(
        &self,
        new: &Sealer,
    ) -> Result<crate::store::rekey::TreeReseal, StoreError> {
        let mut records = Vec::new();
        for item in self.by_id.iter() {
            let (k, v) = item?;
            let mut hook = decode(&v)?;
            let Some(secret) = self.signing_secret(&hook)? else {
                continue;
            };
            hook.signing_sealed = Some(new.seal(&signing_aad(&hook.id), &secret));
            let bytes = serde_json::to_vec(&hook).expect("a webhook always encodes");
            records.push((k, v, bytes));
        }
        Ok(crate::store::rekey::TreeReseal {
            tree: self.by_id.clone(),
            records,
        })
    }

    /// What is wrong with the stored webhooks (`berth admin fsck`): records that do not decode,
    /// signing secrets that do not open. Returns (records checked, problems).
    pub(crate) fn check(&self) -> Result<(usize, Vec<String>), StoreError> {
        let mut problems = Vec::new();
        let mut n = 0;
        for item in self.by_id.iter() {
            let (k, v) = item?;
            n += 1;
            let id = String::from_utf8_lossy(&k).into_owned();
            match decode(&v) {
                Err(_) => problems.push(format!("webhook {id}: the record does not decode")),
                Ok(hook) => {
                    if self.signing_secret(&hook).is_err() {
                        problems.push(format!(
                            "webhook {id}: its signing secret does not open with the master key"
                        ));
                    }
                }
            }
        }
        Ok((n, problems))
    }

    /// Records that a webhook was used. Best effort and not flushed: a lost `lastUsed` after a
    /// crash is harmless, and a flush per call would cost more than the call itself.
    pub async fn touch(&self, hook: &Webhook) {
        let mut h = hook.clone();
        h.last_used = Some(Utc::now());
        let (Ok(new), Ok(current)) = (serde_json::to_vec(&h), serde_json::to_vec(hook)) else {
            return;
        };
        // Only if the record is unchanged meanwhile (a rotate or delete wins).
        let _ = self
            .store
            .db()
            .transact(&[&self.by_id], |t| {
                if t[0].get(hook.id.as_bytes())?.as_deref() == Some(current.as_slice()) {
                    t[0].insert(hook.id.as_bytes(), &new)?;
                }
                Ok(())
            })
            .await;
    }
}

fn decode(bytes: &[u8]) -> Result<Webhook, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Storage(format!("corrupt webhook: {e}")))
}

/// Why a signed call was refused. Shown to nobody in detail (the caller gets one generic answer);
/// logged at debug level to help whoever sets a bridge up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    MissingTimestamp,
    BadTimestamp,
    OutsideWindow,
    MissingSignature,
    Malformed,
    Mismatch,
    Replayed,
}

/// Checks `X-Berth-Signature: sha256=<hex>` = HMAC-SHA256(secret, "<timestamp>.<body>") and that
/// the timestamp is within `REPLAY_WINDOW_SECS` of `now` (both ends inclusive). Replays are the
/// caller's to check (`ReplayGuard`), after this succeeds. Returns the signature's timestamp.
pub fn verify_signature(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<i64, SignatureError> {
    let ts_text = timestamp.ok_or(SignatureError::MissingTimestamp)?.trim();
    let ts: i64 = ts_text.parse().map_err(|_| SignatureError::BadTimestamp)?;
    // `abs_diff`: a timestamp like i64::MIN must be "outside the window", not an overflow.
    if now.abs_diff(ts) > REPLAY_WINDOW_SECS.unsigned_abs() {
        return Err(SignatureError::OutsideWindow);
    }
    let sig = signature.ok_or(SignatureError::MissingSignature)?.trim();
    let hex_sig = sig
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed)?;
    let given = hex::decode(hex_sig).map_err(|_| SignatureError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(ts_text.as_bytes());
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)?;
    Ok(ts)
}

/// `sha256=<hex>` for a body and timestamp: what a bridge sends.
#[cfg(test)]
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Signatures already accepted, in the store (tree `webhook-replays`, signature -> when it leaves
/// the window): every API server of a NATS store refuses a call any of them accepted, and a
/// restart forgets nothing. The check and the record are one transaction.
pub struct ReplayGuard {
    store: Store,
    tree: Tree,
    /// When this process last dropped entries past the window (unix seconds).
    pruned: std::sync::atomic::AtomicI64,
}

impl ReplayGuard {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(ReplayGuard {
            tree: store.aux_tree("webhook-replays")?,
            store: store.clone(),
            pruned: Default::default(),
        })
    }

    /// Records a signature of webhook `id` signed at `ts`; false if it was seen before (and is
    /// still within the window at `now`). A store that cannot record it refuses the call.
    pub async fn first_use(
        &self,
        id: &str,
        signature: &str,
        ts: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let key = format!("{id} {}", signature.trim().to_ascii_lowercase());
        let until = ts.saturating_add(REPLAY_WINDOW_SECS);
        let first = self
            .store
            .db()
            .transact(&[&self.tree], |t| {
                let seen_until = t[0]
                    .get(key.as_bytes())?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                    .map(i64::from_be_bytes);
                if seen_until.is_some_and(|u| u >= now) {
                    return Ok(false);
                }
                t[0].insert(key.as_bytes(), until.to_be_bytes())?;
                Ok(true)
            })
            .await?;
        self.store.flush().await?;
        self.prune(now).await;
        Ok(first)
    }

    /// Drops entries past the window, at most once a minute per process.
    async fn prune(&self, now: i64) {
        use std::sync::atomic::Ordering;
        let last = self.pruned.load(Ordering::Acquire);
        if now.saturating_sub(last) < 60
            || self
                .pruned
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let expired: Vec<Vec<u8>> = self
            .tree
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| {
                <[u8; 8]>::try_from(v.as_slice())
                    .map(i64::from_be_bytes)
                    .is_ok_and(|u| u < now)
            })
            .map(|(k, _)| k)
            .collect();
        if expired.is_empty() {
            return;
        }
        let _ = self
            .store
            .db()
            .transact(&[&self.tree], |t| {
                for k in &expired {
                    t[0].remove(k)?;
                }
                Ok(())
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([7u8; 32], "test key");
        (Store::open(dir.path(), &key).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn an_unreadable_webhook_is_quarantined_and_the_others_listed() {
        let (s, _d) = store().await;
        let w = Webhooks::open(&s).unwrap();
        let (good, _, _) = w
            .create(HookKind::Service, Some("web".into()), None, true)
            .await
            .unwrap();
        w.by_id
            .insert("wh-broken", b"{not json".as_slice())
            .await
            .unwrap();
        let ids: Vec<String> = w.list().await.unwrap().into_iter().map(|h| h.id).collect();
        assert_eq!(ids, [good.id]);
        let q = s.quarantined().unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(
            (q[0].tree.as_str(), q[0].key.as_str()),
            ("webhooks", "wh-broken")
        );
        assert!(w.by_id.get("wh-broken").unwrap().is_none());
    }

    #[test]
    fn tokens_carry_256_random_bits_and_are_stored_hashed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&a[TOKEN_PREFIX.len()..])
            .unwrap();
        assert_eq!(raw.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
        assert_eq!(token_hash(&a).len(), 64);
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(new_signing_secret().len(), 64);
    }

    #[tokio::test]
    async fn create_find_rotate_delete_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([7u8; 32], "test key");
        let (id, token, secret) = {
            let store = Store::open(dir.path(), &key).await.unwrap();
            let hooks = Webhooks::open(&store).unwrap();
            let (hook, token, secret) = hooks
                .create(HookKind::Service, Some("web".into()), None, true)
                .await
                .unwrap();
            let secret = secret.unwrap();
            // Nothing stored holds the token or the secret in clear.
            let raw: Vec<String> = store
                .aux_tree("webhooks")
                .unwrap()
                .iter()
                .map(|item| String::from_utf8_lossy(&item.unwrap().1).into_owned())
                .collect();
            assert_eq!(raw.len(), 1);
            assert!(
                !raw[0].contains(&token) && !raw[0].contains(&secret),
                "{raw:?}"
            );
            assert!(raw[0].contains(&token_hash(&token)));
            (hook.id, token, secret)
        };
        let store = Store::open(dir.path(), &key).await.unwrap();
        let hooks = Webhooks::open(&store).unwrap();
        let found = hooks.find(&token).unwrap().expect("found after reopen");
        assert_eq!(found.id, id);
        assert_eq!(found.service.as_deref(), Some("web"));
        assert!(found.view().signed);
        assert_eq!(
            hooks.signing_secret(&found).unwrap().unwrap(),
            secret.as_bytes()
        );
        assert!(hooks.find("bh_nope").unwrap().is_none());
        assert!(hooks.find("").unwrap().is_none());

        let (rotated, new_token, new_secret) = hooks.rotate(&id).await.unwrap().unwrap();
        assert_eq!(rotated.id, id);
        assert!(rotated.rotated.is_some());
        assert!(
            hooks.find(&token).unwrap().is_none(),
            "old token still works"
        );
        assert_eq!(hooks.find(&new_token).unwrap().unwrap().id, id);
        let new_secret = new_secret.unwrap();
        assert_ne!(new_secret, secret);
        assert_eq!(
            hooks.signing_secret(&rotated).unwrap().unwrap(),
            new_secret.as_bytes()
        );

        hooks.touch(&rotated).await;
        assert!(hooks.get(&id).unwrap().unwrap().last_used.is_some());

        assert!(hooks.delete(&id).await.unwrap().is_some());
        assert!(hooks.find(&new_token).unwrap().is_none());
        assert!(hooks.list().await.unwrap().is_empty());
        assert!(hooks.delete(&id).await.unwrap().is_none());
        assert!(hooks.rotate(&id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn unsigned_hooks_have_no_secret() {
        let (store, _d) = store().await;
        let hooks = Webhooks::open(&store).unwrap();
        let (hook, _, secret) = hooks
            .create(HookKind::Registry, None, Some("reg:5000".into()), false)
            .await
            .unwrap();
        assert!(secret.is_none());
        assert!(hooks.signing_secret(&hook).unwrap().is_none());
        let v = serde_json::to_value(hook.view()).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["created", "id", "kind", "registryHost", "signed"]
        );
    }

    #[test]
    fn signatures_verify_within_the_window_only() {
        let secret = b"s3cret";
        let body = br#"{"tag":"2"}"#;
        let now = 1_700_000_000;
        let sig = sign(secret, now, body);
        let ts = now.to_string();
        let check = |ts: &str, sig: &str, body: &[u8], now: i64| {
            verify_signature(secret, Some(ts), Some(sig), body, now)
        };
        assert_eq!(check(&ts, &sig, body, now), Ok(now));
        // Window edges, both ways: 300 s is in, 301 s is out.
        assert_eq!(check(&ts, &sig, body, now + 300), Ok(now));
        assert_eq!(check(&ts, &sig, body, now - 300), Ok(now));
        assert_eq!(
            check(&ts, &sig, body, now + 301),
            Err(SignatureError::OutsideWindow)
        );
        assert_eq!(
            check(&ts, &sig, body, now - 301),
            Err(SignatureError::OutsideWindow)
        );
        assert_eq!(
            check(&ts, &sig, br#"{"tag":"3"}"#, now),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is covered by the MAC: moving it breaks the signature.
        assert_eq!(
            check(&(now + 1).to_string(), &sig, body, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"other", Some(&ts), Some(&sig), body, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(&ts, sig.trim_start_matches("sha256="), body, now),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check(&ts, "sha256=zz", body, now),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check("soon", &sig, body, now),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            verify_signature(secret, None, Some(&sig), body, now),
            Err(SignatureError::MissingTimestamp)
        );
        assert_eq!(
            verify_signature(secret, Some(&ts), None, body, now),
            Err(SignatureError::MissingSignature)
        );
        // Upper-case hex is the same signature.
        let upper = format!("sha256={}", sig[7..].to_ascii_uppercase());
        assert_eq!(check(&ts, &upper, body, now), Ok(now));
    }

    /// Timestamps at the ends of i64 are outside the window (they used to overflow `now - ts`),
    /// whatever the server's clock says; and the replay guard takes any accepted one.
    #[test]
    fn extreme_timestamps_are_outside_the_window() {
        let secret = b"s3cret";
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX, -1] {
            let sig = sign(secret, ts, b"{}");
            for now in [0, 1_700_000_000, i64::MAX, i64::MIN] {
                let got = verify_signature(secret, Some(&ts.to_string()), Some(&sig), b"{}", now);
                let want = if now.abs_diff(ts) <= 300 {
                    Ok(ts)
                } else {
                    Err(SignatureError::OutsideWindow)
                };
                assert_eq!(got, want, "ts {ts}, now {now}");
            }
        }
    }

    #[tokio::test]
    async fn the_replay_guard_takes_extreme_times() {
        let (s, _d) = store().await;
        let guard = ReplayGuard::open(&s).unwrap();
        assert!(guard
            .first_use("wh", "sha256=aa", i64::MAX, i64::MAX)
            .await
            .unwrap());
        assert!(!guard
            .first_use("wh", "sha256=aa", i64::MAX, i64::MAX)
            .await
            .unwrap());
    }

    #[test]
    fn signature_matches_the_openssl_recipe() {
        // printf '%s' '1700000000.{"tag":"2"}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            sign(b"s3cret", 1_700_000_000, br#"{"tag":"2"}"#),
            "sha256=1bd64263479c4ead1e2e8276f8bf2014a3fd057673763d2408e2b88674624066"
        );
    }

    #[tokio::test]
    async fn replays_are_refused_while_they_could_be_accepted_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([7u8; 32], "test key");
        let now = 1_700_000_000;
        {
            let s = Store::open(dir.path(), &key).await.unwrap();
            let guard = ReplayGuard::open(&s).unwrap();
            assert!(guard
                .first_use("wh-1", "sha256=ab", now, now)
                .await
                .unwrap());
            assert!(!guard
                .first_use("wh-1", "sha256=ab", now, now + 10)
                .await
                .unwrap());
        }
        // Another process of the same store (a restart, or another API server).
        let s = Store::open(dir.path(), &key).await.unwrap();
        let guard = ReplayGuard::open(&s).unwrap();
        let first = |id: &'static str, sig: &'static str, at: i64| {
            let guard = &guard;
            async move { guard.first_use(id, sig, now, at).await.unwrap() }
        };
        assert!(!first("wh-1", "sha256=ab", now + 10).await);
        assert!(!first("wh-1", "SHA256=AB", now + 10).await, "case");
        assert!(first("wh-2", "sha256=ab", now).await, "per webhook");
        assert!(!first("wh-1", "sha256=ab", now + REPLAY_WINDOW_SECS).await);
        // Once the timestamp is out of the window the entry no longer counts (the window check
        // refuses the signature from then on), and pruning drops it.
        assert!(first("wh-1", "sha256=ab", now + REPLAY_WINDOW_SECS + 1).await);
    }
}
