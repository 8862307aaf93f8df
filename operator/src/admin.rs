//! `berth admin ...`: operations on the data directory itself, run on the API server's machine with
//! berth stopped (sled locks the store, so a running server makes them fail, and they say so).
//!
//! - `fsck`: opens the store as the server does (unreadable records go into quarantine), checks
//!   that every object decodes, every sealed value opens (Secrets, webhook signing secrets, the key
//!   check) and that the key and token files are private, lists the quarantine; exits non-zero when
//!   anything is wrong.
//! - `rotate-master-key`: a new master key, with every sealed value re-sealed under it in one sled
//!   transaction. Crash safety comes from keeping both keys until the store says which one it is
//!   sealed with: the new key is written to `master.key.new` (0600, fsynced) BEFORE the transaction
//!   and only then renamed over `master.key`. At start ([`settle_rotation`]) a leftover
//!   `master.key.new` is resolved by the store's key check: if the current key opens the store
//!   the transaction never committed and the file is removed; if only the new key does, the
//!   rotation is completed (renamed into place). Either the old or the new key works for
//!   everything at every point.
//!
//! - `migrate-store --from sled|nats --to nats|sled`: copies the whole store to the other backend
//!   (`store::migrate`), checks both sides record for record, and checks that the master key
//!   opens the copy. With every API server stopped; the services in Swarm run on.
//!
//! Everything derived from the master key changes with it: content digests (so every Swarm secret
//! and config berth made gets a new name and is rolled out and collected like a changed value) and
//! the deploy-event signing key (deploy events signed before the rotation and still queued on NATS
//! are refused; send them again). Environment snapshots carry the key of their time and restore as
//! before.

use crate::crypto::{self, MasterKey, MASTER_KEY_ENV, MASTER_KEY_FILE, PENDING_KEY_FILE};
use crate::store::backend::{jetstream::Log, Db};
use crate::store::{Store, StoreError};
use crate::webhook::Webhooks;
use crate::{StoreBackend, StoreLogArgs};
use berth_controllers::bus::NatsSettings;
use std::path::Path;

/// The store's directory inside the data directory.
pub fn store_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("store")
}

/// Opens the store for an offline command; a running server holds sled's lock.
async fn open_offline(data_dir: &Path, key: &MasterKey) -> Result<Store, String> {
    let dir = store_dir(data_dir);
    if !dir.exists() {
        return Err(format!("error: no store at {}", dir.display()));
    }
    Store::open(&dir, key).await.map_err(|e| match e {
        StoreError::Storage(m) if m.contains("lock") => format!(
            "error: the store {} is in use ({m}); stop berth first",
            dir.display()
        ),
        e => format!("error: {e}"),
    })
}

/// A problem with the key that needs the operator, before anything is opened: a rotation that
/// was not settled by a start yet.
fn refuse_pending(data_dir: &Path) -> Result<(), String> {
    let pending = data_dir.join(PENDING_KEY_FILE);
    if pending.exists() {
        return Err(format!(
            "error: {} exists: a master key rotation has not been settled; start berth once (it \
             completes or rolls back the rotation), stop it, then run this again",
            pending.display()
        ));
    }
    Ok(())
}

/// `berth admin fsck`: the report on stdout, `Err` (exit non-zero) when anything is wrong.
pub async fn fsck(data_dir: &Path) -> Result<(), String> {
    crate::data_dir::private_umask();
    refuse_pending(data_dir)?;
    let mut problems = Vec::new();
    for (file, what) in [
        (MASTER_KEY_FILE, "master key"),
        ("admin.token", "admin token"),
    ] {
        let p = data_dir.join(file);
        if p.exists() {
            if let Err(e) = crate::data_dir::check_private_file(&p, what) {
                problems.push(e);
            }
        }
    }
    let key = MasterKey::resolve_existing(data_dir).map_err(|e| format!("error: {e}"))?;
    // The key check runs at open: a wrong key stops here, naming it.
    let store = open_offline(data_dir, &key).await?;
    let (objects, object_problems) = store.check_objects().map_err(|e| e.to_string())?;
    problems.extend(object_problems);
    let (hooks, hook_problems) = Webhooks::open(&store)
        .and_then(|w| w.check())
        .map_err(|e| e.to_string())?;
    problems.extend(hook_problems);
    let quarantined = store.quarantined().map_err(|e| e.to_string())?;
    println!(
        "checked {objects} objects and {hooks} webhooks with the master key from {}",
        key.source()
    );
    for q in &quarantined {
        println!(
            "quarantined: {} `{}` since {}: {} ({} bytes kept)",
            q.tree,
            q.key,
            q.quarantined_at.to_rfc3339(),
            q.reason,
            base64_len(&q.bytes)
        );
    }
    for p in &problems {
        println!("problem: {p}");
    }
    if problems.is_empty() && quarantined.is_empty() {
        println!("ok");
        return Ok(());
    }
    Err(format!(
        "fsck: {} problem(s), {} quarantined record(s)",
        problems.len(),
        quarantined.len()
    ))
}

fn base64_len(b64: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map(|b| b.len())
        .unwrap_or(0)
}

/// `berth admin rotate-master-key` (see the module comment for the crash rule).
pub async fn rotate_master_key(data_dir: &Path) -> Result<(), String> {
    crate::data_dir::private_umask();
    refuse_pending(data_dir)?;
    let old = MasterKey::resolve_existing(data_dir).map_err(|e| format!("error: {e}"))?;
    let store = open_offline(data_dir, &old).await?;
    let pending = data_dir.join(PENDING_KEY_FILE);
    let new = MasterKey::random(pending.display().to_string());
    let webhooks = Webhooks::open(&store)
        .and_then(|w| w.resealed(&new.sealer()))
        .map_err(|e| format!("error: {e}"))?;
    crypto::write_new_key_file(&pending, &new)
        .map_err(|e| format!("error: cannot write {}: {e}", pending.display()))?;
    let chain_key = crate::audit::chain_key_resealed(&store, &old.sealer(), &new.sealer())
        .map_err(|e| format!("error: {e}"))?;
    let done = match store.reseal_all(&new, &[webhooks, chain_key]).await {
        Ok(done) => done,
        Err(e) => {
            // Nothing was changed: the transaction did not commit.
            let _ = std::fs::remove_file(&pending);
            return Err(format!("error: {e}"));
        }
    };
    drop(store);
    println!(
        "re-sealed {} Secret(s) and {} other sealed value(s) under a new master key",
        done.secrets, done.other
    );
    if old.is_from_env() {
        // The new key cannot be put where the old one came from: print it once. Until a start
        // with it, master.key.new keeps it (0600), so a lost terminal loses nothing.
        println!(
            "the old key came from {MASTER_KEY_ENV}: set it to the new key before starting berth:\n\n  \
             {MASTER_KEY_ENV}={}\n\n(shown once; until berth starts with it, it is also in {}, which \
             that start removes)",
            new.to_base64(),
            pending.display()
        );
    } else {
        let file = data_dir.join(MASTER_KEY_FILE);
        crypto::replace_key_file(&pending, &file).map_err(|e| {
            format!(
                "error: cannot move {} into place: {e}; the next start completes it",
                pending.display()
            )
        })?;
        println!("the new key is in {}", file.display());
    }
    println!(
        "Swarm secrets and configs get new names (their digests are keyed by the master key) and \
         are rolled out at the next reconcile; deploy events signed before now are refused."
    );
    Ok(())
}

/// One side of a migration, opened raw (nothing written to it by opening).
async fn open_side(
    backend: StoreBackend,
    data_dir: &Path,
    nats: Option<&NatsSettings>,
    log: &StoreLogArgs,
) -> Result<(Db, String), String> {
    match backend {
        StoreBackend::Sled => {
            let dir = store_dir(data_dir);
            let db = crate::store::open_sled(&dir).map_err(|e| match e {
                StoreError::Storage(m) if m.contains("lock") => format!(
                    "error: the store {} is in use ({m}); stop berth first",
                    dir.display()
                ),
                e => format!("error: {e}"),
            })?;
            Ok((db, format!("sled {}", dir.display())))
        }
        StoreBackend::Nats => {
            let settings = nats.ok_or("error: the nats side needs --nats (its NATS servers)")?;
            let bus = berth_controllers::bus::NatsBus::connect_with(settings)
                .await
                .map_err(|e| format!("error: {e}"))?;
            let log = Log::open(bus.client(), settings.shown_url(), log.config())
                .await
                .map_err(|e| format!("error: {e}"))?;
            let shown = log.describe();
            Ok((Db::Log(log), shown))
        }
    }
}

/// `berth admin migrate-store` (see the module comment).
pub async fn migrate_store(
    data_dir: &Path,
    from: StoreBackend,
    to: StoreBackend,
    nats: Option<&NatsSettings>,
    log: &StoreLogArgs,
) -> Result<(), String> {
    crate::data_dir::private_umask();
    refuse_pending(data_dir)?;
    if from == to {
        return Err("error: --from and --to name the same backend; nothing to do".into());
    }
    let key = MasterKey::resolve_existing(data_dir).map_err(|e| format!("error: {e}"))?;
    let (source, source_shown) = open_side(from, data_dir, nats, log).await?;
    // The source must open with this key, or the copy would be of no use to this installation.
    Store::open_db(source.clone(), &source_shown, &key)
        .await
        .map_err(|e| format!("error: {e}"))?;
    let (target, target_shown) = open_side(to, data_dir, nats, log).await?;
    println!("copying {source_shown} -> {target_shown}");
    let trees = crate::store::migrate::copy(&source, &target)
        .await
        .map_err(|e| format!("error: {e}"))?;
    Store::open_db(target, &target_shown, &key)
        .await
        .map_err(|e| format!("error: the copy does not open with the master key: {e}"))?;
    println!("{:<24} {:>8}  SHA-256 (both sides)", "TREE", "RECORDS");
    for t in &trees {
        println!("{:<24} {:>8}  {}", t.name, t.records, t.sha256);
    }
    let total: usize = trees.iter().map(|t| t.records).sum();
    println!(
        "copied {total} records in {} trees; source and target agree. Start the API servers \
         with --store {} (the source is left as it was: remove it once they serve)",
        trees.len(),
        match to {
            StoreBackend::Sled => "sled",
            StoreBackend::Nats => "nats",
        }
    );
    Ok(())
}

/// At start, before the store is opened for service: settles a rotation that did not finish
/// (see the module comment). Returns the key the store is sealed with.
pub async fn settle_rotation(data_dir: &Path, key: MasterKey) -> Result<MasterKey, String> {
    let pending = data_dir.join(PENDING_KEY_FILE);
    if !pending.exists() {
        return Ok(key);
    }
    crate::data_dir::check_private_file(&pending, "master key")?;
    let new = MasterKey::load_or_create(&pending)?;
    let dir = store_dir(data_dir);
    match Store::open(&dir, &key).await {
        Ok(_) => {
            // The store opens with the key given: either the rotation's transaction never
            // committed (old key), or this start already has the new key in BERTH_MASTER_KEY.
            std::fs::remove_file(&pending)
                .map_err(|e| format!("cannot remove {}: {e}", pending.display()))?;
            if key.same_as(&new) {
                tracing::info!(
                    "started with the rotated master key; removed {}",
                    pending.display()
                );
            } else {
                tracing::warn!(
                    "a master key rotation did not commit; keeping the current key, removed {}",
                    pending.display()
                );
            }
            Ok(key)
        }
        Err(StoreError::WrongKey { .. }) => {
            // Only the new key can be right now: the transaction committed.
            Store::open(&dir, &new)
                .await
                .map_err(|e| format!("{e} (nor with {})", pending.display()))?;
            if key.is_from_env() {
                return Err(format!(
                    "the store was re-keyed by `berth admin rotate-master-key`: set {MASTER_KEY_ENV} \
                     to the new key (`export {MASTER_KEY_ENV}=$(base64 -w0 < {})`) and start again",
                    pending.display()
                ));
            }
            let file = data_dir.join(MASTER_KEY_FILE);
            crypto::replace_key_file(&pending, &file)
                .map_err(|e| format!("cannot move {} into place: {e}", pending.display()))?;
            tracing::info!("completed an interrupted master key rotation");
            MasterKey::load_or_create(&file)
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WriteMode;
    use berth_api_types::typed::decode_object;
    use berth_api_types::Kind;
    use serde_json::json;

    fn secret(name: &str, v: &str) -> berth_api_types::DynObject {
        decode_object(&json!({"apiVersion": "berth/v1", "kind": "Secret",
            "metadata": {"name": name}, "spec": {"stringData": {"pw": v}}}))
        .unwrap()
    }

    /// A data directory with a key file, two Secrets and a signed webhook.
    async fn installation() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = MasterKey::load_or_create(&dir.path().join(MASTER_KEY_FILE)).unwrap();
        let store = Store::open(&store_dir(dir.path()), &key).await.unwrap();
        store
            .write(
                vec![secret("a", "aardvark-1"), secret("b", "badger-2")],
                WriteMode::Create,
                None,
                false,
            )
            .await
            .unwrap();
        let (hook, _, signing) = Webhooks::open(&store)
            .unwrap()
            .create(
                crate::webhook::HookKind::Service,
                Some("web".into()),
                None,
                true,
            )
            .await
            .unwrap();
        assert!(signing.is_some());
        (dir, hook.id)
    }

    async fn assert_everything_opens(data_dir: &Path, key: &MasterKey, hook: &str) {
        let store = Store::open(&store_dir(data_dir), key).await.unwrap();
        for (n, v) in [("a", "aardvark-1"), ("b", "badger-2")] {
            assert_eq!(
                store.get(Kind::Secret, n).unwrap().unwrap().spec["stringData"]["pw"],
                v
            );
        }
        let w = Webhooks::open(&store).unwrap();
        let h = w.get(hook).unwrap().unwrap();
        assert!(w.signing_secret(&h).unwrap().is_some());
        assert_eq!(w.check().unwrap().1, Vec::<String>::new());
    }

    #[tokio::test]
    async fn rotation_reseals_everything_under_a_new_key() {
        let (dir, hook) = installation().await;
        let file = dir.path().join(MASTER_KEY_FILE);
        let old = MasterKey::load_or_create(&file).unwrap();
        rotate_master_key(dir.path()).await.unwrap();
        let new = MasterKey::load_or_create(&file).unwrap();
        assert!(!new.same_as(&old));
        assert!(!dir.path().join(PENDING_KEY_FILE).exists());
        assert_everything_opens(dir.path(), &new, &hook).await;
        let err = Store::open(&store_dir(dir.path()), &old)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        // The content key moved with it: Swarm names will change.
        assert_ne!(
            new.content_key().digest(b"x"),
            old.content_key().digest(b"x")
        );
        fsck(dir.path()).await.unwrap();
    }

    #[tokio::test]
    async fn a_crash_on_either_side_of_the_commit_leaves_one_working_key() {
        // Crash after the new key file was written, before the transaction: the old key stays.
        let (dir, hook) = installation().await;
        let file = dir.path().join(MASTER_KEY_FILE);
        let old = MasterKey::load_or_create(&file).unwrap();
        let pending = dir.path().join(PENDING_KEY_FILE);
        crypto::write_new_key_file(&pending, &MasterKey::random("new")).unwrap();
        assert!(fsck(dir.path())
            .await
            .unwrap_err()
            .contains("not been settled"));
        let key = settle_rotation(dir.path(), old.clone()).await.unwrap();
        assert!(key.same_as(&old));
        assert!(!pending.exists());
        assert_everything_opens(dir.path(), &old, &hook).await;

        // Crash after the transaction committed, before the rename: the start completes it.
        let new = MasterKey::random("new");
        crypto::write_new_key_file(&pending, &new).unwrap();
        {
            let store = Store::open(&store_dir(dir.path()), &old).await.unwrap();
            let w = Webhooks::open(&store)
                .unwrap()
                .resealed(&new.sealer())
                .unwrap();
            store.reseal_all(&new, &[w]).await.unwrap();
        }
        let key = settle_rotation(dir.path(), old.clone()).await.unwrap();
        assert!(key.same_as(&new));
        assert!(!pending.exists());
        assert!(MasterKey::load_or_create(&file).unwrap().same_as(&new));
        assert_everything_opens(dir.path(), &new, &hook).await;
    }

    #[tokio::test]
    async fn with_the_key_in_the_environment_the_new_key_is_kept_until_a_start_uses_it() {
        let (dir, hook) = installation().await;
        let file = dir.path().join(MASTER_KEY_FILE);
        let old = MasterKey::load_or_create(&file).unwrap();
        let old_env = MasterKey::parse_env(&old.to_base64()).unwrap();
        assert!(old_env.is_from_env());
        let pending = dir.path().join(PENDING_KEY_FILE);
        let new = MasterKey::random("new");
        crypto::write_new_key_file(&pending, &new).unwrap();
        {
            let store = Store::open(&store_dir(dir.path()), &old).await.unwrap();
            let w = Webhooks::open(&store)
                .unwrap()
                .resealed(&new.sealer())
                .unwrap();
            store.reseal_all(&new, &[w]).await.unwrap();
        }
        // Started with the old key still in the environment: refused, naming the fix; the new
        // key is not lost.
        let err = settle_rotation(dir.path(), old_env).await.unwrap_err();
        assert!(
            err.contains(MASTER_KEY_ENV) && err.contains(PENDING_KEY_FILE),
            "{err}"
        );
        assert!(pending.exists());
        // Started with the new key: the pending file goes.
        let new_env = MasterKey::parse_env(&new.to_base64()).unwrap();
        let key = settle_rotation(dir.path(), new_env).await.unwrap();
        assert!(key.same_as(&new));
        assert!(!pending.exists());
        assert_everything_opens(dir.path(), &new, &hook).await;
    }

    #[tokio::test]
    async fn a_secret_that_does_not_open_stops_the_rotation_before_anything_changes() {
        let (dir, hook) = installation().await;
        let file = dir.path().join(MASTER_KEY_FILE);
        let old = MasterKey::load_or_create(&file).unwrap();
        let other = MasterKey::random("other");
        let store = Store::open(&store_dir(dir.path()), &old).await.unwrap();
        // The rotation opens every Secret with the current key; one sealed under another key
        // (as if tampered with after the open's quarantine scan) makes it stop before writing.
        let w = Webhooks::open(&store)
            .unwrap()
            .resealed(&other.sealer())
            .unwrap();
        store
            .reseal_all(&other, &[w])
            .await
            .expect("a clean store re-seals");
        let w = Webhooks::open(&store).unwrap().resealed(&old.sealer());
        assert!(
            w.is_err(),
            "webhook secrets no longer open with the old key"
        );
        let err = store.reseal_all(&old, &[]).await.unwrap_err();
        assert!(err.to_string().contains("does not open"), "{err}");
        drop(store);
        // Still everything under `other`, the key check included.
        assert_everything_opens(dir.path(), &other, &hook).await;
    }

    #[tokio::test]
    async fn fsck_reports_quarantined_records_and_fails() {
        let (dir, _) = installation().await;
        let key = MasterKey::load_or_create(&dir.path().join(MASTER_KEY_FILE)).unwrap();
        {
            let store = Store::open(&store_dir(dir.path()), &key).await.unwrap();
            let objects = store.aux_tree("objects").unwrap();
            objects
                .insert("service/broken", b"garbage".as_slice())
                .await
                .unwrap();
            store.flush().await.unwrap();
        }
        let err = fsck(dir.path()).await.unwrap_err();
        assert!(err.contains("1 quarantined"), "{err}");
        // The store itself still opens and serves.
        let store = Store::open(&store_dir(dir.path()), &key).await.unwrap();
        assert_eq!(store.list(Kind::Secret).unwrap().len(), 2);
        assert_eq!(store.quarantined_count(), 1);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn fsck_refuses_readable_key_files() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _) = installation().await;
        let file = dir.path().join(MASTER_KEY_FILE);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = fsck(dir.path()).await.unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
