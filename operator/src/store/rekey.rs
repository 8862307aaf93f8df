//! Master key rotation inside the store: every sealed value (Secret specs, the key check, and what
//! other modules seal in their own trees, e.g. webhook signing secrets) is opened with the current
//! key and sealed with the new one, and all of it is written in ONE transaction with the new
//! key check. A crash leaves either everything under the old key or everything under the new one;
//! the key check says which (`crate::admin` keeps both key files until it knows, and the daemon's
//! start finishes or rolls back a rotation that was interrupted).
//!
//! Runs with berth stopped (sled's lock on the directory keeps a running server out; on the NATS
//! log every API server must be stopped first, as they hold the old key).

use super::backend::{abort, Tree, TxError, TxView};
use super::seal::{key_check_value, reseal_object};
use super::{Store, StoreError};
use crate::crypto::MasterKey;
use berth_api_types::Kind;

/// One record to replace: (key, bytes read, new bytes).
pub(crate) type Replacement = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Records of one other tree to replace in the rotation's transaction. A record whose bytes
/// changed meanwhile aborts the rotation.
pub(crate) struct TreeReseal {
    pub tree: Tree,
    pub records: Vec<Replacement>,
}

/// What a rotation re-sealed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    pub secrets: usize,
    pub other: usize,
}

impl Store {
    /// Re-seals every Secret under `new`, with `others` (records of other trees their modules
    /// re-sealed) and the new key check, in one transaction, then flushes. Nothing is changed if
    /// any Secret does not open (it is named; quarantined records are not touched).
    pub(crate) async fn reseal_all(
        &self,
        new: &MasterKey,
        others: &[TreeReseal],
    ) -> Result<Resealed, StoreError> {
        let new_sealer = new.sealer();
        let mut secrets = Vec::new();
        for item in self
            .objects
            .scan_prefix(format!("{}/", Kind::Secret.lower()))
        {
            let (k, v) = item?;
            let resealed = reseal_object(&v, &self.sealer, &new_sealer)?;
            secrets.push((k, v, resealed));
        }
        let check = key_check_value(&new_sealer);
        let mut trees: Vec<&Tree> = vec![&self.objects, &self.meta];
        trees.extend(others.iter().map(|o| &o.tree));
        let replace = |view: &TxView<'_>, records: &[Replacement]| -> Result<(), TxError> {
            for (k, old, new) in records {
                if view.get(k)?.as_ref() != Some(old) {
                    return abort(StoreError::Storage(format!(
                        "{} changed during the rotation; nothing was changed",
                        String::from_utf8_lossy(k)
                    )));
                }
                view.insert(k, new)?;
            }
            Ok(())
        };
        self.db
            .transact(&trees, |views| {
                replace(&views[0], &secrets)?;
                views[1].insert(super::seal::KEY_CHECK, check.as_bytes())?;
                for (i, o) in others.iter().enumerate() {
                    replace(&views[2 + i], &o.records)?;
                }
                Ok(())
            })
            .await?;
        self.db.flush_blocking()?;
        Ok(Resealed {
            secrets: secrets.len(),
            other: others.iter().map(|o| o.records.len()).sum(),
        })
    }
}
