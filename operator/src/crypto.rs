//! Encryption at rest of Secrets: XChaCha20-Poly1305 (an authenticated cipher, so a tampered or
//! misplaced blob is detected, never decrypted into garbage) under one 32-byte master key.
//!
//! The key comes from `BERTH_MASTER_KEY` (base64 or 64 hex characters) or from `<data-dir>/master.key`
//! (32 raw bytes, created at first start from the OS RNG with mode 0600). Errors never show a key.
//! Each sealed value is `base64(nonce || ciphertext)` with a fresh random 24-byte nonce, and is bound
//! to what it belongs to through the associated data (e.g. `secret/<name>`).

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Environment variable that carries the master key (it takes precedence over the key file).
pub const MASTER_KEY_ENV: &str = "BERTH_MASTER_KEY";
/// Name of the key file inside the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// The master key. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct MasterKey {
    bytes: [u8; KEY_LEN],
    /// Where it came from, for error messages (`BERTH_MASTER_KEY`, or the file's path).
    source: String,
    /// Whether the key file was created by this process (nothing was sealed with it yet).
    created: Option<PathBuf>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(<from {}>)", self.source)
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN], source: impl Into<String>) -> Self {
        MasterKey {
            bytes,
            source: source.into(),
            created: None,
        }
    }

    /// A fresh random key (tests, and the first start).
    pub fn random(source: impl Into<String>) -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes, source)
    }

    /// Where the key came from, e.g. `BERTH_MASTER_KEY` or `/var/lib/berth/master.key`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The key file this process just created, if it did.
    pub fn created_file(&self) -> Option<&Path> {
        self.created.as_deref()
    }

    /// The key for a server: `BERTH_MASTER_KEY` if set, else `<data_dir>/master.key` (created if missing).
    pub fn resolve(data_dir: &Path) -> Result<Self, String> {
        match std::env::var_os(MASTER_KEY_ENV) {
            Some(v) => {
                let v = v.into_string().map_err(|_| {
                    format!("{MASTER_KEY_ENV} is not valid UTF-8; {}", KEY_FORMAT_HINT)
                })?;
                Self::parse_env(&v)
            }
            None => Self::load_or_create(&data_dir.join(MASTER_KEY_FILE)),
        }
    }

    /// Parses the value of `BERTH_MASTER_KEY`: 64 hex characters or base64 of 32 bytes. The value is
    /// never part of an error.
    pub fn parse_env(value: &str) -> Result<Self, String> {
        let v = value.trim();
        if v.is_empty() {
            return Err(format!(
                "{MASTER_KEY_ENV} is set but empty; {KEY_FORMAT_HINT}"
            ));
        }
        if v.len() == 2 * KEY_LEN && v.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes = hex::decode(v).map_err(|_| format!("{MASTER_KEY_ENV}: bad hex"))?;
            return Ok(Self::from_bytes(to_key(&bytes)?, MASTER_KEY_ENV));
        }
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        let decoded = engines.iter().find_map(|e| e.decode(v.as_bytes()).ok());
        match decoded {
            Some(bytes) if bytes.len() == KEY_LEN => {
                Ok(Self::from_bytes(to_key(&bytes)?, MASTER_KEY_ENV))
            }
            Some(bytes) => Err(format!(
                "{MASTER_KEY_ENV} decodes (as base64) to {} bytes, not {KEY_LEN}; {KEY_FORMAT_HINT}",
                bytes.len()
            )),
            None => Err(format!(
                "{MASTER_KEY_ENV} is neither base64 nor 64 hex characters; {KEY_FORMAT_HINT}"
            )),
        }
    }

    /// Reads the key file, or creates it (32 bytes from the OS RNG, mode 0600, fsynced) if it does
    /// not exist. Refuses a file of the wrong length or one that group or others can read.
    pub fn load_or_create(path: &Path) -> Result<Self, String> {
        match std::fs::metadata(path) {
            Ok(meta) => {
                check_private(path, &meta, "master key")?;
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("cannot read the master key {}: {e}", path.display()))?;
                if bytes.len() != KEY_LEN {
                    return Err(format!(
                        "the master key file {} holds {} bytes; a master key is exactly {KEY_LEN} \
                         bytes. Restore the original file (without it, stored Secrets cannot be \
                         decrypted) or remove it only if the store holds no Secrets",
                        path.display(),
                        bytes.len()
                    ));
                }
                Ok(Self::from_bytes(
                    to_key(&bytes)?,
                    path.display().to_string(),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key_file(path),
            Err(e) => Err(format!(
                "cannot read the master key {}: {e}",
                path.display()
            )),
        }
    }

    /// The key as base64, for the environment snapshot only (inside the encrypted backup
    /// repository; see `environment.rs`). Never logged.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.bytes)
    }

    /// The key that signs deploy events on the bus, derived for that purpose alone.
    pub fn deploy_key(&self) -> crate::deploy_auth::DeployKey {
        crate::deploy_auth::DeployKey::derive(&self.bytes)
    }

    pub fn sealer(&self) -> Sealer {
        Sealer {
            cipher: Arc::new(XChaCha20Poly1305::new(Key::from_slice(&self.bytes))),
        }
    }
}

const KEY_FORMAT_HINT: &str =
    "it must hold a 32-byte key as base64 (e.g. `openssl rand -base64 32`) \
     or as 64 hex characters (the value is not shown)";

fn to_key(bytes: &[u8]) -> Result<[u8; KEY_LEN], String> {
    <[u8; KEY_LEN]>::try_from(bytes).map_err(|_| format!("a master key is exactly {KEY_LEN} bytes"))
}

/// Refuses a key file (`what`: "master key", "API CA key") that group or others can read or write,
/// or that is not a regular file.
#[cfg(unix)]
pub(crate) fn check_private(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &str,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the {what} file {} is readable or writable by group or others (mode {mode:04o}); \
             refusing to use it. Run `chmod 600 {}` (and consider the key exposed)",
            path.display(),
            path.display()
        ));
    }
    if !meta.is_file() {
        return Err(format!(
            "the {what} {} is not a regular file",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
pub(crate) fn check_private(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &str,
) -> Result<(), String> {
    if !meta.is_file() {
        return Err(format!(
            "the {what} {} is not a regular file",
            path.display()
        ));
    }
    Ok(())
}

/// Writes a fresh key to a temporary file (mode 0600, fsynced), then links it into place without
/// replacing anything (two servers starting at once agree on one key), then fsyncs the directory.
fn create_key_file(path: &Path) -> Result<MasterKey, String> {
    use std::io::Write;
    let key = MasterKey::random(path.display().to_string());
    let tmp = path.with_extension(format!("key.tmp-{}", std::process::id()));
    let fail = |what: &str, e: std::io::Error| {
        format!(
            "cannot create the master key {}: {what}: {e}",
            path.display()
        )
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = std::fs::remove_file(&tmp);
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(&key.bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("write", e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        // Someone else created it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return MasterKey::load_or_create(path)
        }
        Err(e) => return Err(fail("link into place", e)),
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(|e| fail("sync directory", e))?;
    }
    Ok(MasterKey {
        created: Some(path.to_path_buf()),
        ..key
    })
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Seals and opens values under the master key.
#[derive(Clone)]
pub struct Sealer {
    cipher: Arc<XChaCha20Poly1305>,
}

/// A sealed value could not be opened: wrong key, tampered, or bound to something else.
#[derive(Debug)]
pub struct OpenError;

impl Sealer {
    /// `base64(nonce || ciphertext+tag)`, with a fresh random nonce; `aad` binds it to its owner.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    pub fn open(&self, aad: &[u8], sealed: &str) -> Result<Vec<u8>, OpenError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed.as_bytes())
            .map_err(|_| OpenError)?;
        if raw.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_binding() {
        let s = MasterKey::random("test").sealer();
        let a = s.seal(b"secret/a", b"value");
        let b = s.seal(b"secret/a", b"value");
        assert_ne!(a, b, "fresh nonce every time");
        assert_eq!(s.open(b"secret/a", &a).unwrap(), b"value");
        assert!(
            s.open(b"secret/b", &a).is_err(),
            "bound to its owner by the AAD"
        );
        assert!(MasterKey::random("other")
            .sealer()
            .open(b"secret/a", &a)
            .is_err());
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(a.as_bytes())
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = base64::engine::general_purpose::STANDARD.encode(raw);
        assert!(s.open(b"secret/a", &tampered).is_err());
        assert!(s.open(b"secret/a", "short").is_err());
    }

    #[test]
    fn env_key_formats_and_errors_never_echo() {
        let bytes = [7u8; 32];
        let hex_key = hex::encode(bytes);
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        for v in [hex_key.clone(), b64.clone(), format!(" {b64}\n")] {
            let k = MasterKey::parse_env(&v).unwrap();
            assert_eq!(k.bytes, bytes);
            assert_eq!(k.source(), MASTER_KEY_ENV);
            assert!(!format!("{k:?}").contains(&b64));
        }
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        for bad in [
            short.as_str(),
            "not a key at all!",
            "",
            &hex_key[..62],
            "zz-definitely-wrong-zz",
        ] {
            let e = MasterKey::parse_env(bad).unwrap_err();
            assert!(e.starts_with(MASTER_KEY_ENV), "{e}");
            if !bad.is_empty() {
                assert!(!e.contains(bad), "the value is echoed: {e}");
            }
        }
        assert!(MasterKey::parse_env(&short)
            .unwrap_err()
            .contains("16 bytes, not 32"));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_created_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        let k1 = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(k1.created_file(), Some(path.as_path()));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let k2 = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(k1.bytes, k2.bytes, "the same key on the next start");
        assert!(k2.created_file().is_none());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left behind"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = MasterKey::load_or_create(&path).unwrap_err();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("mode 0644"),
            "{e}"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [1u8; 31]).unwrap();
        let e = MasterKey::load_or_create(&path).unwrap_err();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("holds 31 bytes"),
            "{e}"
        );
    }
}
