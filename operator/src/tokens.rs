//! API tokens: issued with a role, kept only as SHA-256 hashes in the store, checked in constant
//! time. A token reads `berth_<id>_<64 hex>`: the id finds the record without trying every hash,
//! the 256 random bits make a fast hash the right one (nothing to brute-force, unlike a password).
//!
//! The admin token of first start is written once to `<data-dir>/admin.token` for the person who
//! installed berth; the store keeps only its hash, so the file can be moved into a vault and
//! `berth token rotate-admin` replaces it. Tokens made before roles existed (64 hex, no prefix) are
//! the admin token too, under the id `admin`.

use crate::store::backend::Tree;
use crate::store::{Store, StoreError};
use berth_api_types::access::{IssuedToken, Role, TokenInfo, TokenRequest, ADMIN_TOKEN_ID};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const TREE: &str = "tokens";
const PREFIX: &str = "berth_";

/// Who a request comes from, once its token checked out.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub token_id: String,
    pub role: Role,
    /// For a deployer: the Services it may deploy.
    pub services: Vec<String>,
    /// Whether the token was given the exec grant (`berth token create --exec`).
    pub exec: bool,
}

/// A stored token: everything but the secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRecord {
    #[serde(flatten)]
    info: TokenInfo,
    /// Hex SHA-256 of the whole token string.
    hash: String,
}

/// Why a bearer token was not accepted. The message never repeats the token.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token (set BERTH_TOKEN or --token)")]
    Missing,
    #[error("unknown or wrong bearer token (check BERTH_TOKEN or --token)")]
    Unknown,
    #[error("token `{0}` was revoked")]
    Revoked(String),
    #[error("token `{0}` expired at {1}")]
    Expired(String, String),
}

#[derive(Clone)]
pub struct Tokens {
    tree: Tree,
    store: Store,
    /// `<data-dir>/admin.token`: a rotation rewrites it when it is still there, so the file
    /// never holds a token that no longer works.
    admin_file: Option<std::path::PathBuf>,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The id a presented token claims (`berth_<id>_<secret>`; a bare legacy token claims `admin`).
fn claimed_id(token: &str) -> Option<&str> {
    match token.strip_prefix(PREFIX) {
        Some(rest) => rest
            .rsplit_once('_')
            .map(|(id, _)| id)
            .filter(|id| !id.is_empty()),
        None => (token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(ADMIN_TOKEN_ID),
    }
}

/// A fresh admin token (`berth_admin_<64 hex>`).
pub fn new_admin_token() -> String {
    format!("{PREFIX}{ADMIN_TOKEN_ID}_{}", secret())
}

/// `90d`, `2w`, or a duration as manifests write them (`12h`, `30m`).
pub fn parse_expiry(s: &str) -> Result<chrono::Duration, String> {
    let t = s.trim();
    let days = |n: &str, per: i64| {
        n.parse::<i64>()
            .ok()
            .filter(|n| (1..=36_500).contains(n))
            .map(|n| chrono::Duration::days(n * per))
    };
    let parsed = if let Some(n) = t.strip_suffix('d') {
        days(n, 1)
    } else if let Some(n) = t.strip_suffix('w') {
        days(n, 7)
    } else {
        berth_api_types::units::Duration::parse(t)
            .ok()
            .and_then(|d| i64::try_from(d.as_nanos()).ok())
            .filter(|n| *n > 0)
            .map(chrono::Duration::nanoseconds)
    };
    parsed.ok_or_else(|| {
        format!("invalid expiry `{s}`: expected e.g. `90d`, `2w`, `12h` (at most 100 years)")
    })
}

impl Tokens {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Tokens {
            tree: store.aux_tree(TREE)?,
            store: store.clone(),
            admin_file: None,
        })
    }

    pub fn with_admin_file(mut self, path: std::path::PathBuf) -> Self {
        self.admin_file = Some(path);
        self
    }

    fn record(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tree
            .get(id)?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Storage(format!("token record `{id}`: {e}")))
            })
            .transpose()
    }

    async fn put(&self, rec: &TokenRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).expect("token records always encode");
        self.tree.insert(rec.info.id.as_bytes(), bytes).await?;
        self.store.flush().await
    }

    pub fn has_admin(&self) -> Result<bool, StoreError> {
        Ok(self.record(ADMIN_TOKEN_ID)?.is_some())
    }

    /// Makes `token` the admin token when the store has none yet (first start, or a store from
    /// before roles existed). Returns whether it did: afterwards the file is only for people.
    pub async fn ensure_admin(&self, token: &str) -> Result<bool, StoreError> {
        let rec = TokenRecord {
            info: TokenInfo {
                id: ADMIN_TOKEN_ID.into(),
                role: Role::Admin,
                services: vec![],
                description: "the admin token of first start".into(),
                created: now(),
                expires: None,
                revoked: None,
                exec: false,
            },
            hash: hash(token),
        };
        let bytes = serde_json::to_vec(&rec).expect("token records always encode");
        // Create-if-absent in one transaction: API servers starting together on one NATS log
        // must not overwrite each other's admin token.
        let made = self
            .store
            .db()
            .transact(&[&self.tree], |t| {
                if t[0].get(ADMIN_TOKEN_ID)?.is_some() {
                    return Ok(false);
                }
                t[0].insert(ADMIN_TOKEN_ID, &bytes)?;
                Ok(true)
            })
            .await?;
        self.store.flush().await?;
        Ok(made)
    }

    /// The admin token, without waiting for the disk (unit tests of the routes).
    #[cfg(test)]
    pub async fn set_admin_for_tests(&self, token: &str) {
        let rec = TokenRecord {
            info: TokenInfo {
                id: ADMIN_TOKEN_ID.into(),
                role: Role::Admin,
                services: vec![],
                description: String::new(),
                created: now(),
                expires: None,
                revoked: None,
                exec: false,
            },
            hash: hash(token),
        };
        self.tree
            .insert(ADMIN_TOKEN_ID, serde_json::to_vec(&rec).unwrap())
            .await
            .unwrap();
    }

    /// Checks a presented bearer token.
    pub fn authenticate(&self, given: &str) -> Result<Principal, AuthError> {
        if given.is_empty() {
            return Err(AuthError::Missing);
        }
        let id = claimed_id(given).ok_or(AuthError::Unknown)?;
        let rec = self.record(id).ok().flatten().ok_or(AuthError::Unknown)?;
        // Constant time, so a token cannot be guessed byte by byte from response timing.
        if !bool::from(hash(given).as_bytes().ct_eq(rec.hash.as_bytes())) {
            return Err(AuthError::Unknown);
        }
        if rec.info.revoked.is_some() {
            return Err(AuthError::Revoked(rec.info.id));
        }
        if let Some(exp) = &rec.info.expires {
            let expired = DateTime::parse_from_rfc3339(exp)
                .map(|t| t <= Utc::now())
                .unwrap_or(true);
            if expired {
                return Err(AuthError::Expired(rec.info.id, exp.clone()));
            }
        }
        Ok(Principal {
            token_id: rec.info.id,
            role: rec.info.role,
            services: rec.info.services,
            exec: rec.info.exec,
        })
    }

    /// Checks a request and returns the token it describes (not yet stored).
    pub fn validate(req: &TokenRequest) -> Result<(Role, Option<String>), String> {
        let role = Role::parse(&req.role)?;
        if role == Role::Admin {
            return Err(
                "there is one admin token; rotate it with `berth token rotate-admin`".into(),
            );
        }
        match (role, req.services.is_empty()) {
            (Role::Deployer, true) => {
                return Err(
                    "a deployer token needs the Services it may deploy (--services a,b)".into(),
                )
            }
            (Role::Deployer, false) => {
                let mut errors = berth_api_types::validate::Errors::default();
                for s in &req.services {
                    berth_api_types::validate::check_dns_label(&mut errors, "services", s);
                }
                if let Some(e) = errors.0.first() {
                    return Err(e.to_string());
                }
            }
            (_, false) => {
                return Err(format!(
                    "--services is only for deployer tokens, not {role}"
                ))
            }
            _ => {}
        }
        if req.exec && !matches!(role, Role::Operator | Role::Deployer) {
            return Err(format!(
                "--exec is for operator and deployer tokens, not {role}: a viewer only reads, and a \
                 controller never runs commands in containers"
            ));
        }
        if req.description.len() > 200 || req.description.chars().any(char::is_control) {
            return Err("description: at most 200 characters, no control characters".into());
        }
        let expires = req
            .expires
            .as_deref()
            .map(parse_expiry)
            .transpose()?
            .map(|d| (Utc::now() + d).to_rfc3339_opts(SecondsFormat::Secs, true));
        Ok((role, expires))
    }

    pub async fn create(&self, req: &TokenRequest) -> Result<IssuedToken, CreateError> {
        let (role, expires) = Self::validate(req).map_err(CreateError::Invalid)?;
        let id = ulid::Ulid::new().to_string().to_lowercase();
        let token = format!("{PREFIX}{id}_{}", secret());
        let info = TokenInfo {
            id,
            role,
            services: req.services.clone(),
            description: req.description.clone(),
            created: now(),
            expires,
            revoked: None,
            exec: req.exec,
        };
        self.put(&TokenRecord {
            info: info.clone(),
            hash: hash(&token),
        })
        .await?;
        Ok(IssuedToken { info, token })
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            match serde_json::from_slice::<TokenRecord>(&v) {
                Ok(r) => out.push(r.info),
                Err(e) => tracing::error!(
                    id = %String::from_utf8_lossy(&k),
                    error = %e,
                    "a token record does not decode; it authenticates nobody"
                ),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Revokes a token; the record stays, so the audit trail's token ids keep a meaning.
    pub async fn revoke(&self, id: &str) -> Result<TokenInfo, CreateError> {
        if id == ADMIN_TOKEN_ID {
            return Err(CreateError::Invalid(
                "the admin token cannot be revoked, only rotated (`berth token rotate-admin`)"
                    .into(),
            ));
        }
        let mut rec = self
            .record(id)?
            .ok_or_else(|| CreateError::NotFound(id.to_string()))?;
        if rec.info.revoked.is_none() {
            rec.info.revoked = Some(now());
            self.put(&rec).await?;
        }
        Ok(rec.info)
    }

    /// A new admin token; the old one stops working at once.
    pub async fn rotate_admin(&self) -> Result<IssuedToken, StoreError> {
        let token = new_admin_token();
        let info = TokenInfo {
            id: ADMIN_TOKEN_ID.into(),
            role: Role::Admin,
            services: vec![],
            description: "the admin token, rotated".into(),
            created: now(),
            expires: None,
            revoked: None,
            exec: false,
        };
        self.put(&TokenRecord {
            info: info.clone(),
            hash: hash(&token),
        })
        .await?;
        if let Some(path) = self.admin_file.as_ref().filter(|p| p.exists()) {
            if let Err(e) = crate::daemon::write_private(path, &token) {
                tracing::warn!(file = %path.display(), error = %e, "the admin token was rotated but its file could not be rewritten; keep the token from this answer");
            }
        }
        Ok(IssuedToken { info, token })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error("no token `{0}` (list them with `berth token list`)")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn tokens() -> (tempfile::TempDir, Tokens) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &crate::store::testing::test_key())
            .await
            .unwrap();
        (dir, Tokens::open(&store).unwrap())
    }

    fn req(role: &str, services: &[&str], expires: Option<&str>) -> TokenRequest {
        TokenRequest {
            role: role.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            expires: expires.map(str::to_string),
            description: String::new(),
            exec: false,
        }
    }

    #[tokio::test]
    async fn issued_tokens_authenticate_with_their_role_and_only_their_hash_is_kept() {
        let (_d, t) = tokens().await;
        let issued = t.create(&req("viewer", &[], None)).await.unwrap();
        assert!(issued.token.starts_with("berth_"));
        let p = t.authenticate(&issued.token).unwrap();
        assert_eq!(
            (p.role, p.token_id.as_str()),
            (Role::Viewer, issued.info.id.as_str())
        );
        // The store holds the hash, never the token.
        for item in t.tree.iter() {
            let (_, v) = item.unwrap();
            let text = String::from_utf8_lossy(&v);
            assert!(!text.contains(&issued.token[20..]), "{text}");
        }
        // One changed character is a different token.
        let mut wrong = issued.token.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert_eq!(t.authenticate(&wrong), Err(AuthError::Unknown));
        assert_eq!(t.authenticate(""), Err(AuthError::Missing));
        assert_eq!(t.authenticate("berth_nosuch_00"), Err(AuthError::Unknown));
    }

    #[tokio::test]
    async fn revoked_and_expired_tokens_are_refused_by_name() {
        let (_d, t) = tokens().await;
        let a = t.create(&req("operator", &[], None)).await.unwrap();
        t.revoke(&a.info.id).await.unwrap();
        assert_eq!(
            t.authenticate(&a.token),
            Err(AuthError::Revoked(a.info.id.clone()))
        );
        let b = t.create(&req("viewer", &[], Some("1ns"))).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(
            matches!(t.authenticate(&b.token), Err(AuthError::Expired(id, _)) if id == b.info.id)
        );
        assert!(matches!(
            t.revoke("nosuch").await,
            Err(CreateError::NotFound(_))
        ));
        assert!(matches!(
            t.revoke("admin").await,
            Err(CreateError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn the_admin_token_of_first_start_stays_until_rotated() {
        let (_d, t) = tokens().await;
        let legacy = "ab".repeat(32);
        assert!(t.ensure_admin(&legacy).await.unwrap());
        // A later start with a different file content does not replace the stored hash.
        assert!(!t.ensure_admin(&"cd".repeat(32)).await.unwrap());
        assert_eq!(t.authenticate(&legacy).unwrap().role, Role::Admin);
        let rotated = t.rotate_admin().await.unwrap();
        assert_eq!(t.authenticate(&legacy), Err(AuthError::Unknown));
        let p = t.authenticate(&rotated.token).unwrap();
        assert_eq!((p.role, p.token_id.as_str()), (Role::Admin, ADMIN_TOKEN_ID));
    }

    #[test]
    fn requests_are_checked_before_anything_is_stored() {
        let bad = [
            (req("root", &[], None), "not a role"),
            (req("admin", &[], None), "rotate-admin"),
            (req("deployer", &[], None), "needs the Services"),
            (req("viewer", &["web"], None), "only for deployer"),
            (
                req("deployer", &["Not A Name"], None),
                "services: `Not A Name` must be a DNS label",
            ),
            (
                req("viewer", &[], Some("forever")),
                "invalid expiry `forever`",
            ),
            (req("viewer", &[], Some("99999999d")), "invalid expiry"),
            (
                TokenRequest {
                    exec: true,
                    ..req("viewer", &[], None)
                },
                "--exec is for operator and deployer tokens, not viewer",
            ),
            (
                TokenRequest {
                    exec: true,
                    ..req("controller", &[], None)
                },
                "not controller",
            ),
        ];
        for (r, want) in bad {
            let e = Tokens::validate(&r).unwrap_err();
            assert!(e.contains(want), "{e} should say {want}");
        }
        let (role, exp) = Tokens::validate(&req("deployer", &["web", "api"], Some("90d"))).unwrap();
        assert_eq!(role, Role::Deployer);
        assert!(exp.is_some());
        assert_eq!(parse_expiry("2w").unwrap(), chrono::Duration::days(14));
        assert_eq!(parse_expiry("12h").unwrap(), chrono::Duration::hours(12));
    }
}
