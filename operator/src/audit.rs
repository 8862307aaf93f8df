//! The audit trail: the record every write, token change, secret read and refused request leaves
//! behind (the access layer decides which, and calls [`AuditLog::append`] after answering), kept
//! in the store's database, hash-chained so that editing or deleting a record is detected, and
//! copied onto the bus (`berth.audit.<topic>`) for collectors outside this machine.
//!
//! Layout, beside the objects in the same sled database (same directory, same durability):
//! tree `audit` maps the sequence number (big-endian u64, so the tree's order is the chain's) to
//! the record's JSON; tree `audit-meta` holds `chain-key` (the chain's key, sealed), `head` (the
//! last record's seq and hash, keyed) and `published` (the last seq on the bus).
//!
//! The chain: a record's `hash` is HMAC-SHA256 under the chain key, in hex, over its canonical
//! form, which is the compact JSON array
//! `["berth.audit/v1", seq, time, tokenId, role, source, action, kind, name, generationBefore,
//! generationAfter, code, outcome, prev]` (absent fields `null`) as serde_json writes it; an
//! exec's record is `[that array, task, program]`. An
//! array with a fixed order rather than the record's object: its bytes depend on no map ordering,
//! serde attribute or field a later version adds. `prev` is the hash of the record before (64
//! zeros for the first), so a record cannot be changed, removed or moved without breaking the
//! link to the one after it.
//!
//! Why a key and not a plain hash: whoever can write the database files could recompute a plain
//! chain after editing it. The chain key is 32 random bytes made at first use and kept sealed
//! under the master key (associated data `audit/chain-key`), so editing the files is not enough,
//! and a master-key rotation that re-seals what is sealed keeps the chain verifiable (the chain
//! key itself never changes). The price: only this server (or whoever holds the master key) can
//! verify.
//!
//! Deleting the newest records leaves no gap to see; the `head` entry, written in the same
//! transaction as each record and keyed like it, still names the last seq and hash. What no
//! local check can see is the whole database rolled back to an older copy: the bus copy and a
//! head written down elsewhere (`berth audit verify` prints it) are for that.

use crate::crypto::Sealer;
use crate::store::backend::Tree;
use crate::store::{Store, StoreError};
use berth_api_types::access::{AuditEntry, AuditRecord, AuditVerification};
use berth_api_types::names::subjects;
use berth_api_types::Kind;
use berth_controllers::bus::EventBus;
use berth_controllers::runtime::backoff::BackoffPolicy;
use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::{Mutex, Notify};
use tracing::warn;

const RECORDS_TREE: &str = "audit";
const META_TREE: &str = "audit-meta";
/// The chain key, sealed with the master key. A master-key rotation must re-seal it (see
/// [`chain_key_resealed`]).
const CHAIN_KEY: &str = "chain-key";
/// Associated data of the sealed chain key: it opens only as what it is.
pub(crate) const CHAIN_KEY_AAD: &[u8] = b"audit/chain-key";
const HEAD: &str = "head";
const PUBLISHED: &str = "published";
/// `prev` of the first record.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// First element of a record's canonical form: a later format can be told apart.
const RECORD_TAG: &str = "berth.audit/v1";
const HEAD_TAG: &str = "berth.audit-head/v1";
/// Records read per round by the bus publisher.
const PUBLISH_BATCH: usize = 256;

/// The chain's key. Never printed.
struct ChainKey([u8; 32]);

impl ChainKey {
    fn mac(&self, canonical: &impl Serialize) -> String {
        let bytes = serde_json::to_vec(canonical).expect("tuples of strings and numbers encode");
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(&bytes);
        hex::encode(mac.finalize().into_bytes())
    }

    fn record_hash(&self, r: &AuditRecord) -> String {
        let e = &r.entry;
        let base = (
            RECORD_TAG,
            r.seq,
            &r.time,
            &e.token_id,
            e.role,
            &e.source,
            &e.action,
            &e.kind,
            &e.name,
            e.generation_before,
            e.generation_after,
            e.code,
            &e.outcome,
            &r.prev,
        );
        // An exec's task and program (added after the first records were written) extend the
        // array only when present, so every record written before keeps its hash.
        if e.task.is_none() && e.program.is_none() {
            self.mac(&base)
        } else {
            self.mac(&(base, &e.task, &e.program))
        }
    }

    fn head(&self, seq: u64, hash: &str) -> Head {
        Head {
            seq,
            hash: hash.to_string(),
            mac: self.mac(&(HEAD_TAG, seq, hash)),
        }
    }

    /// The head entry, if it is one this key wrote.
    fn check_head(&self, head: &Head) -> bool {
        same(&self.head(head.seq, &head.hash).mac, &head.mac)
    }
}

/// The last record as of the last append: what deleting the newest records cannot hide.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
    mac: String,
}

/// A stored record on its way to the bus: the stored bytes as they are.
struct Unpublished {
    seq: u64,
    topic: &'static str,
    payload: Vec<u8>,
}

/// Where the next record goes.
#[derive(Clone)]
struct Tip {
    seq: u64,
    hash: String,
}

/// The audit log of one store. Clones share it.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    records: Tree,
    meta: Tree,
    key: ChainKey,
    /// Held while a record is numbered, chained and committed: one append at a time, so every
    /// `seq` and `prev` follows from the one before.
    tip: Mutex<Tip>,
    /// Wakes the bus publisher after an append.
    appended: Notify,
    /// The highest seq known to be on disk: the publisher goes no further, so the bus never
    /// carries a record that a crash could still take from the store (and give its number to
    /// another).
    durable: AtomicU64,
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn storage(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("audit log: {what}: {e}"))
}

/// The bus topic of a record: the lowercase kind of a known kind, `token` for token changes,
/// `api` for everything else. Only berth's own kind names become subject tokens: the kind of a
/// refused request comes from its URL, and a `*` or `.` there must not reach a subject.
pub fn topic(entry: &AuditEntry) -> &'static str {
    let kind = entry.kind.as_deref().unwrap_or("");
    if entry.action.starts_with("token-") || kind.eq_ignore_ascii_case("token") {
        return "token";
    }
    Kind::parse_loose(kind).map(Kind::lower).unwrap_or("api")
}

impl AuditLog {
    /// Opens the store's audit log, making the chain key at first use. Refuses a log whose chain
    /// key is missing while records exist, or does not open with the master key: the trail could
    /// then be neither verified nor continued, and starting a new chain over it would hide that.
    pub async fn open(store: &Store) -> Result<AuditLog, StoreError> {
        let records = store.aux_tree(RECORDS_TREE)?;
        let meta = store.aux_tree(META_TREE)?;
        let key = match meta.get(CHAIN_KEY)? {
            Some(sealed) => {
                let opened = std::str::from_utf8(&sealed)
                    .ok()
                    .and_then(|s| store.sealer().open(CHAIN_KEY_AAD, s).ok())
                    .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok());
                ChainKey(opened.ok_or_else(|| {
                    StoreError::Storage(
                        "the audit trail's chain key does not open with this master key (it was \
                         altered, or a master key change did not re-seal it): the trail can be \
                         neither verified nor continued; restore the data directory from a backup"
                            .into(),
                    )
                })?)
            }
            None if !records.is_empty() || meta.contains_key(HEAD)? => {
                return Err(StoreError::Storage(
                    "the audit trail holds records but its chain key is gone: the store was \
                     altered or damaged; restore the data directory from a backup"
                        .into(),
                ))
            }
            None => {
                let mut bytes = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut bytes);
                let sealed = store.sealer().seal(CHAIN_KEY_AAD, &bytes);
                // Create-if-absent: API servers starting together on one NATS log make one chain.
                let kept = store
                    .db()
                    .transact(&[&meta], |t| match t[0].get(CHAIN_KEY)? {
                        Some(theirs) => Ok(Some(theirs)),
                        None => {
                            t[0].insert(CHAIN_KEY, sealed.as_bytes())?;
                            Ok(None)
                        }
                    })
                    .await?;
                // On disk before any record depends on it.
                store.flush().await?;
                match kept {
                    None => ChainKey(bytes),
                    Some(theirs) => ChainKey(
                        std::str::from_utf8(&theirs)
                            .ok()
                            .and_then(|s| store.sealer().open(CHAIN_KEY_AAD, s).ok())
                            .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
                            .ok_or_else(|| {
                                StoreError::Storage(
                                    "the audit trail's chain key does not open with this master key"
                                        .into(),
                                )
                            })?,
                    ),
                }
            }
        };
        let tip = Self::find_tip(&records, &meta, &key)?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                // What was read back from disk is on disk.
                durable: AtomicU64::new(tip.seq),
                store: store.clone(),
                records,
                meta,
                key,
                tip: Mutex::new(tip),
                appended: Notify::new(),
            }),
        })
    }

    /// Where the chain continues: after the last stored record, or after the head if that is
    /// further (the newest records were deleted: numbering on from them keeps the hole visible
    /// instead of filling it with new records).
    fn find_tip(records: &Tree, meta: &Tree, key: &ChainKey) -> Result<Tip, StoreError> {
        let mut tip = Tip {
            seq: 0,
            hash: GENESIS.to_string(),
        };
        for item in records.iter().rev() {
            let (k, v) = item?;
            if let Some(seq) = seq_of(&k) {
                let hash = serde_json::from_slice::<AuditRecord>(&v)
                    .map(|r| r.hash)
                    // `verify` names this record; the chain goes on after it.
                    .unwrap_or_else(|_| "unreadable".to_string());
                tip = Tip { seq, hash };
                break;
            }
        }
        if let Some(head) = read_head(meta)? {
            if key.check_head(&head) && head.seq > tip.seq {
                tip = Tip {
                    seq: head.seq,
                    hash: head.hash,
                };
            }
        }
        Ok(tip)
    }

    /// Records one entry: numbered, timed, chained, and on disk before this returns.
    #[cfg(test)]
    pub async fn append(&self, entry: AuditEntry) -> Result<AuditRecord, StoreError> {
        let mut records = self.append_all(vec![entry]).await?;
        Ok(records.pop().expect("one entry in, one record out"))
    }

    /// Records several entries (one request that changed several objects) in one transaction and
    /// one fsync: an apply of 100 objects costs one disk flush, not 100.
    pub async fn append_all(
        &self,
        entries: Vec<AuditEntry>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let out = {
            let mut tip = inner.tip.lock().await;
            let time = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
            let cached = tip.clone();
            // Numbered and chained inside the transaction, from the head it reads: on the NATS
            // log other API servers append to the same chain, and a commit made on a head that
            // moved meanwhile is refused and chained again.
            let (out, last) = inner
                .store
                .db()
                .transact(&[&inner.records, &inner.meta], |t| {
                    let head = match t[1].get(HEAD)? {
                        Some(v) => serde_json::from_slice::<Head>(&v).ok(),
                        None => None,
                    };
                    let start = match head {
                        Some(h) if inner.key.check_head(&h) && h.seq >= cached.seq => Tip {
                            seq: h.seq,
                            hash: h.hash,
                        },
                        _ => cached.clone(),
                    };
                    let (mut seq, mut prev) = (start.seq, start.hash);
                    let mut out = Vec::with_capacity(entries.len());
                    for entry in &entries {
                        seq += 1;
                        let mut record = AuditRecord {
                            seq,
                            time: time.clone(),
                            entry: entry.clone(),
                            prev,
                            hash: String::new(),
                        };
                        record.hash = inner.key.record_hash(&record);
                        prev = record.hash.clone();
                        let bytes =
                            serde_json::to_vec(&record).expect("audit records always encode");
                        t[0].insert(seq_key(seq), bytes)?;
                        out.push(record);
                    }
                    let head = serde_json::to_vec(&inner.key.head(seq, &prev))
                        .expect("the head always encodes");
                    t[1].insert(HEAD, head)?;
                    Ok((out, Tip { seq, hash: prev }))
                })
                .await
                .map_err(|e| storage("cannot append", e))?;
            *tip = last;
            out
        };
        // Outside the lock, so appends that arrive meanwhile share this fsync (group commit).
        inner.store.flush().await?;
        let last = out.last().map_or(0, |r| r.seq);
        inner.durable.fetch_max(last, Ordering::AcqRel);
        inner.appended.notify_one();
        Ok(out)
    }

    /// Every readable record at or after `since`, oldest first. A record that does not decode is
    /// left out (and logged): `verify` names it.
    pub fn list(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.records.iter() {
            let (k, v) = item?;
            let record = match serde_json::from_slice::<AuditRecord>(&v) {
                Ok(r) => r,
                Err(e) => {
                    warn!(seq = ?seq_of(&k), error = %e, "an audit record does not decode; `berth audit verify` reports it");
                    continue;
                }
            };
            let after = |s: DateTime<Utc>| {
                // A time that does not parse is shown rather than silently filtered away.
                DateTime::parse_from_rfc3339(&record.time).map_or(true, |t| t >= s)
            };
            if since.is_none_or(after) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Recomputes the whole chain in seq order and names the first record that breaks it: a
    /// gap (a deleted record), a record that does not decode, holds anything beside a record's
    /// fields, sits under another seq, does not link to the hash before it, or whose hash does
    /// not match its content; then the head (the newest records deleted).
    pub fn verify(&self) -> Result<AuditVerification, StoreError> {
        let key = &self.inner.key;
        let mut checked = 0u64;
        let mut broken: Option<(u64, String)> = None;
        let mut expected = 1u64;
        let mut prev = GENESIS.to_string();
        for item in self.inner.records.iter() {
            let (k, v) = item?;
            checked += 1;
            if broken.is_some() {
                continue;
            }
            let Some(seq) = seq_of(&k) else {
                broken = Some((
                    expected,
                    format!("an entry under a key that is no sequence number ({} bytes) was added to the audit tree", k.len()),
                ));
                continue;
            };
            if seq != expected {
                let problem = if seq > expected {
                    let last_missing = seq - 1;
                    if last_missing == expected {
                        format!("record {expected} is missing (deleted): the next stored record is {seq}")
                    } else {
                        format!("records {expected} to {last_missing} are missing (deleted): the next stored record is {seq}")
                    }
                } else {
                    format!("record {seq} is stored out of order")
                };
                broken = Some((expected, problem));
                continue;
            }
            match check_record(key, seq, &v, &prev) {
                Ok(hash) => prev = hash,
                Err(problem) => {
                    broken = Some((seq, problem));
                    continue;
                }
            }
            expected += 1;
        }
        let last = expected - 1;
        if broken.is_none() {
            broken = check_head(key, read_head(&self.inner.meta)?, last, &prev);
        }
        let head = (last > 0 && broken.is_none()).then_some(prev);
        Ok(AuditVerification {
            records: checked,
            ok: broken.is_none(),
            first_broken: broken.as_ref().map(|(seq, _)| *seq),
            problem: broken.map(|(_, p)| p),
            head,
        })
    }

    /// The oldest records not yet on the bus (after the `published` cursor).
    async fn unpublished(&self, max: usize) -> Result<Vec<Unpublished>, StoreError> {
        let from = self.published()? + 1;
        let durable = self.inner.durable.load(Ordering::Acquire);
        if from > durable {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in self
            .inner
            .records
            .range_inclusive(seq_key(from), seq_key(durable))
            .take(max)
        {
            let (k, v) = item?;
            let Some(seq) = seq_of(&k) else { continue };
            match serde_json::from_slice::<AuditRecord>(&v) {
                Ok(r) => out.push(Unpublished {
                    seq,
                    topic: topic(&r.entry),
                    payload: v.to_vec(),
                }),
                Err(e) => {
                    // Unreadable: it cannot be routed, and waiting would stop every later one.
                    warn!(seq, error = %e, "an audit record does not decode; not published (`berth audit verify` reports it)");
                    self.mark_published(seq).await?;
                }
            }
        }
        Ok(out)
    }

    fn published(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .meta
            .get(PUBLISHED)?
            .and_then(|v| seq_of(&v))
            .unwrap_or(0))
    }

    /// Moves the cursor. Not flushed on its own: after a crash a few records go out again,
    /// which the stream drops as duplicates (same message id) or a reader recognises by seq.
    async fn mark_published(&self, seq: u64) -> Result<(), StoreError> {
        self.inner.meta.insert(PUBLISHED, seq_key(seq)).await?;
        Ok(())
    }

    fn instance(&self) -> &str {
        self.inner.store.instance()
    }
}

fn read_head(meta: &Tree) -> Result<Option<Head>, StoreError> {
    Ok(meta
        .get(HEAD)?
        // An unreadable head counts as altered: `check_head` says so.
        .map(|v| {
            serde_json::from_slice(&v).unwrap_or(Head {
                seq: 0,
                hash: String::new(),
                mac: String::new(),
            })
        }))
}

/// One stored record against its seq and the hash before it; its hash when it holds.
fn check_record(key: &ChainKey, seq: u64, bytes: &[u8], prev: &str) -> Result<String, String> {
    let stored: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("record {seq} is not JSON: {e}"))?;
    let record: AuditRecord = serde_json::from_value(stored.clone())
        .map_err(|e| format!("record {seq} does not decode as an audit record: {e}"))?;
    // Decoding ignores unknown fields; an added one is a change too.
    let canonical = serde_json::to_value(&record).expect("audit records always encode");
    if canonical != stored {
        return Err(format!(
            "record {seq} holds fields or values that are not part of an audit record (it was edited)"
        ));
    }
    if record.seq != seq {
        return Err(format!(
            "record {seq} says it is record {} (it was moved)",
            record.seq
        ));
    }
    if !same(&record.prev, prev) {
        return Err(format!(
            "record {seq} does not link to the record before it (its prev is not the hash of record {}): a record was replaced",
            seq - 1
        ));
    }
    if !same(&key.record_hash(&record), &record.hash) {
        return Err(format!(
            "record {seq}'s hash does not match its content (it was edited)"
        ));
    }
    Ok(record.hash)
}

/// The head against the last record of an otherwise intact chain (`last`, hash `hash`).
fn check_head(key: &ChainKey, head: Option<Head>, last: u64, hash: &str) -> Option<(u64, String)> {
    let Some(head) = head else {
        return (last > 0).then(|| {
            (
                last,
                "the head entry (audit-meta/head) is missing: it was deleted, so deleted newest records could not be told"
                    .to_string(),
            )
        });
    };
    if !key.check_head(&head) {
        return Some((
            last.max(1),
            "the head entry (audit-meta/head) was altered: its keyed hash does not match".into(),
        ));
    }
    if head.seq > last {
        let first = last + 1;
        let problem = if head.seq == first {
            format!("record {first}, the newest, is missing (deleted): the head names record {} but the log ends at {last}", head.seq)
        } else {
            format!(
                "records {first} to {}, the newest, are missing (deleted): the head names record {} but the log ends at {last}",
                head.seq, head.seq
            )
        };
        return Some((first, problem));
    }
    if head.seq < last {
        return Some((
            head.seq + 1,
            format!(
                "records after {} are not covered by the head entry: they were added outside the API server, or the head was rolled back",
                head.seq
            ),
        ));
    }
    if !same(&head.hash, hash) {
        return Some((
            last,
            format!("record {last} is not the record the head entry names: it was replaced"),
        ));
    }
    None
}

/// The chain key re-sealed from one master key to another, as a record for the master-key
/// rotation's single transaction (`store::rekey`): the chain key itself stays, so every record
/// keeps verifying. No records when there is no chain yet.
pub(crate) fn chain_key_resealed(
    store: &Store,
    from: &Sealer,
    to: &Sealer,
) -> Result<crate::store::rekey::TreeReseal, StoreError> {
    let meta = store.aux_tree(META_TREE)?;
    let mut records = Vec::new();
    if let Some(sealed) = meta.get(CHAIN_KEY)? {
        let key = std::str::from_utf8(&sealed)
            .ok()
            .and_then(|s| from.open(CHAIN_KEY_AAD, s).ok())
            .ok_or_else(|| {
                StoreError::Storage(
                    "the audit trail's chain key does not open with the old master key".into(),
                )
            })?;
        let new = to.seal(CHAIN_KEY_AAD, &key).into_bytes();
        records.push((CHAIN_KEY.as_bytes().to_vec(), sealed, new));
    }
    Ok(crate::store::rekey::TreeReseal {
        tree: meta,
        records,
    })
}

/// Copies the log onto the bus, in seq order, from the `published` cursor on, for as long as the
/// process runs. Records are on disk before they are published, so a bus that is down, or a
/// crash before publishing, only delays them.
pub async fn publish(log: AuditLog, bus: Arc<dyn EventBus>) {
    let mut retry = BackoffPolicy::reconnect().retry();
    loop {
        let batch = match log.unpublished(PUBLISH_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                let delay = retry.next_delay();
                warn!(error = %e, retry_in = ?delay, "cannot read the audit log");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if batch.is_empty() {
            // Woken by every append; the timeout is a safety net, not the mechanism.
            let _ =
                tokio::time::timeout(Duration::from_secs(5), log.inner.appended.notified()).await;
            continue;
        }
        let mut last = None;
        let mut failed = None;
        for Unpublished {
            seq,
            topic,
            payload,
        } in batch
        {
            let id = format!("audit-{}-{seq}", log.instance());
            match bus
                .publish_audit(&subjects::audit(topic), &id, payload)
                .await
            {
                Ok(()) => {
                    retry.reset();
                    last = Some(seq);
                }
                Err(e) => {
                    // The rest waits: the copy keeps the chain's order.
                    failed = Some(e);
                    break;
                }
            }
        }
        // One cursor move per batch: on the NATS log every move is a commit.
        if let Some(seq) = last {
            if let Err(e) = log.mark_published(seq).await {
                warn!(error = %e, seq, "cannot move the audit publish cursor");
            }
        }
        if let Some(e) = failed {
            let delay = retry.next_delay();
            warn!(error = %e, bus = %bus.describe(), retry_in = ?delay, "cannot publish audit record; will retry");
            tokio::time::sleep(delay).await;
        }
    }
}

/// `since` of `berth audit` and `GET /audit`: an RFC 3339 time, or a duration back from `now`
/// (`90m`, `24h`; the spec's duration syntax).
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = berth_api_types::units::Duration::parse(s).map_err(|_| {
        format!(
            "`{s}` is neither an RFC 3339 time (e.g. 2026-01-31T12:00:00Z) nor a duration \
             (e.g. 90m, 24h)"
        )
    })?;
    let back = i64::try_from(d.as_nanos())
        .ok()
        .and_then(|n| now.checked_sub_signed(chrono::Duration::nanoseconds(n)))
        .ok_or_else(|| format!("`{s}` reaches back further than time can be told"))?;
    Ok(back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_key;
    use berth_api_types::access::Role;
    use berth_controllers::bus::{BusError, Subscription};
    use std::sync::Mutex as StdMutex;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            token_id: format!("token-{i}"),
            role: Some(Role::Operator),
            source: Some("10.1.2.3:40000".into()),
            action: "apply".into(),
            kind: Some("Service".into()),
            name: Some(format!("web-{i}")),
            generation_before: i.checked_sub(1).filter(|g| *g > 0),
            generation_after: Some(i),
            code: 200,
            outcome: "ok".into(),
            ..AuditEntry::default()
        }
    }

    fn refused() -> AuditEntry {
        AuditEntry {
            token_id: "anonymous".into(),
            action: "delete".into(),
            kind: Some("Secret".into()),
            name: Some("db".into()),
            code: 401,
            outcome: "Unauthorized".into(),
            ..AuditEntry::default()
        }
    }

    async fn log_with(n: u64) -> (AuditLog, Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &test_key()).await.unwrap();
        let log = AuditLog::open(&store).await.unwrap();
        for i in 1..=n {
            log.append(entry(i)).await.unwrap();
        }
        (log, store, dir)
    }

    fn stored(log: &AuditLog, seq: u64) -> Vec<u8> {
        log.inner
            .records
            .get(seq_key(seq))
            .unwrap()
            .unwrap()
            .to_vec()
    }

    async fn put(log: &AuditLog, seq: u64, bytes: &[u8]) {
        log.inner.records.insert(seq_key(seq), bytes).await.unwrap();
    }

    /// Edits a record's JSON the way someone with the database files could.
    async fn edit(log: &AuditLog, seq: u64, change: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value = serde_json::from_slice(&stored(log, seq)).unwrap();
        change(&mut v);
        put(log, seq, &serde_json::to_vec(&v).unwrap()).await;
    }

    fn broken_at(v: &AuditVerification) -> (u64, String) {
        assert!(!v.ok, "the chain verified: {v:?}");
        assert!(
            v.head.is_none(),
            "a broken chain vouches for no head: {v:?}"
        );
        (v.first_broken.unwrap(), v.problem.clone().unwrap())
    }

    #[tokio::test]
    async fn a_chain_of_appends_verifies_and_links_each_record_to_the_one_before() {
        let (log, _s, _d) = log_with(40).await;
        let batch = log.append_all(vec![refused(), entry(41)]).await.unwrap();
        assert_eq!(batch.iter().map(|r| r.seq).collect::<Vec<_>>(), [41, 42]);
        let all = log.list(None).unwrap();
        assert_eq!(all.len(), 42);
        assert_eq!(all[0].prev, GENESIS);
        for (i, pair) in all.windows(2).enumerate() {
            assert_eq!(pair[0].seq, i as u64 + 1);
            assert_eq!(
                pair[1].prev, pair[0].hash,
                "record {} links back",
                pair[1].seq
            );
        }
        assert_eq!(all[40].entry, refused());
        assert!(
            DateTime::parse_from_rfc3339(&all[0].time).is_ok() && all[0].time.ends_with('Z'),
            "{}",
            all[0].time
        );
        let v = log.verify().unwrap();
        assert_eq!(
            v,
            AuditVerification {
                records: 42,
                ok: true,
                first_broken: None,
                problem: None,
                head: Some(all[41].hash.clone()),
            }
        );
    }

    #[tokio::test]
    async fn an_empty_log_verifies() {
        let (log, _s, _d) = log_with(0).await;
        let v = log.verify().unwrap();
        assert!(v.ok && v.records == 0 && v.head.is_none(), "{v:?}");
    }

    #[test]
    fn the_canonical_form_is_a_fixed_json_array() {
        let key = ChainKey([7u8; 32]);
        let record = AuditRecord {
            seq: 3,
            time: "2026-11-30T02:38:00.123Z".into(),
            entry: AuditEntry {
                token_id: "ci".into(),
                role: Some(Role::Deployer),
                source: None,
                action: "patch".into(),
                kind: Some("Service".into()),
                name: Some("we\"b".into()),
                generation_before: Some(1),
                generation_after: Some(2),
                code: 200,
                outcome: "ok".into(),
                ..AuditEntry::default()
            },
            prev: "ab".repeat(32),
            hash: String::new(),
        };
        // Written out by hand: what an outside verifier holding the key would compute.
        let canonical = format!(
            r#"["berth.audit/v1",3,"2026-11-30T02:38:00.123Z","ci","deployer",null,"patch","Service","we\"b",1,2,200,"ok","{}"]"#,
            "ab".repeat(32)
        );
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7u8; 32]).unwrap();
        mac.update(canonical.as_bytes());
        assert_eq!(
            key.record_hash(&record),
            hex::encode(mac.finalize().into_bytes())
        );
        // An exec's record: the same array, then its task and program.
        let mut exec = record.clone();
        exec.entry.task = Some("web.1.abc@vm".into());
        exec.entry.program = Some("sh".into());
        let canonical = format!(
            r#"[["berth.audit/v1",3,"2026-11-30T02:38:00.123Z","ci","deployer",null,"patch","Service","we\"b",1,2,200,"ok","{}"],"web.1.abc@vm","sh"]"#,
            "ab".repeat(32)
        );
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7u8; 32]).unwrap();
        mac.update(canonical.as_bytes());
        assert_eq!(
            key.record_hash(&exec),
            hex::encode(mac.finalize().into_bytes())
        );
    }

    #[tokio::test]
    async fn editing_a_record_is_named_with_its_seq() {
        let (log, _s, _d) = log_with(5).await;
        log.append(refused()).await.unwrap();
        log.append(entry(7)).await.unwrap();
        edit(&log, 6, |v| v["outcome"] = "ok".into()).await;
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 6);
        assert!(
            problem.contains("hash does not match its content"),
            "{problem}"
        );
    }

    #[tokio::test]
    async fn a_record_rehashed_without_the_key_still_fails() {
        let (log, _s, _d) = log_with(6).await;
        // The forger recomputes what they can: a plain SHA-256 of the canonical form, and the
        // next record's link to it.
        edit(&log, 3, |v| {
            v["tokenId"] = "someone-else".into();
            let r: AuditRecord = serde_json::from_value(v.clone()).unwrap();
            let e = &r.entry;
            let canonical = serde_json::to_vec(&(
                RECORD_TAG,
                r.seq,
                &r.time,
                &e.token_id,
                e.role,
                &e.source,
                &e.action,
                &e.kind,
                &e.name,
                e.generation_before,
                e.generation_after,
                e.code,
                &e.outcome,
                &r.prev,
            ))
            .unwrap();
            use sha2::Digest;
            v["hash"] = hex::encode(Sha256::digest(&canonical)).into();
        })
        .await;
        let forged = serde_json::from_slice::<AuditRecord>(&stored(&log, 3))
            .unwrap()
            .hash;
        edit(&log, 4, |v| v["prev"] = forged.clone().into()).await;
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 3);
        assert!(problem.contains("hash does not match"), "{problem}");
    }

    #[tokio::test]
    async fn an_added_field_or_a_moved_record_is_detected() {
        let (log, _s, _d) = log_with(4).await;
        edit(&log, 2, |v| v["note"] = "nothing to see".into()).await;
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 2);
        assert!(problem.contains("not part of an audit record"), "{problem}");

        let (log, _s, _d) = log_with(4).await;
        // Record 3 swapped with record 2: each sits under the other's number.
        let (two, three) = (stored(&log, 2), stored(&log, 3));
        put(&log, 2, &three).await;
        put(&log, 3, &two).await;
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 2);
        assert!(problem.contains("says it is record 3"), "{problem}");
    }

    #[tokio::test]
    async fn a_record_that_does_not_decode_is_named() {
        let (log, _s, _d) = log_with(3).await;
        put(&log, 2, b"{\"seq\": 2, truncated").await;
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 2);
        assert!(problem.contains("not JSON"), "{problem}");
        assert_eq!(
            log.list(None).unwrap().len(),
            2,
            "the export shows the rest"
        );
    }

    #[tokio::test]
    async fn deleting_a_middle_record_names_the_gap() {
        let (log, _s, _d) = log_with(6).await;
        log.inner.records.remove(seq_key(4)).await.unwrap();
        let v = log.verify().unwrap();
        let (seq, problem) = broken_at(&v);
        assert_eq!(seq, 4);
        assert!(
            problem.contains("record 4 is missing") && problem.contains("next stored record is 5"),
            "{problem}"
        );
        assert_eq!(v.records, 5);

        log.inner.records.remove(seq_key(5)).await.unwrap();
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 4);
        assert!(problem.contains("records 4 to 5 are missing"), "{problem}");
    }

    #[tokio::test]
    async fn deleting_the_newest_records_is_caught_by_the_head_and_numbering_goes_on_past_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &test_key()).await.unwrap();
            let log = AuditLog::open(&store).await.unwrap();
            for i in 1..=5 {
                log.append(entry(i)).await.unwrap();
            }
            log.inner.records.remove(seq_key(5)).await.unwrap();
            let (seq, problem) = broken_at(&log.verify().unwrap());
            assert_eq!(seq, 5);
            assert!(
                problem.contains("record 5, the newest, is missing"),
                "{problem}"
            );
            log.inner.records.remove(seq_key(4)).await.unwrap();
            let (seq, problem) = broken_at(&log.verify().unwrap());
            assert_eq!(seq, 4);
            assert!(problem.contains("records 4 to 5, the newest"), "{problem}");
            store.flush().await.unwrap();
        }
        // After a restart the hole is not filled with new records: they are numbered after it.
        let store = Store::open(dir.path(), &test_key()).await.unwrap();
        let log = AuditLog::open(&store).await.unwrap();
        let r = log.append(entry(6)).await.unwrap();
        assert_eq!(r.seq, 6);
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 4);
        assert!(problem.contains("records 4 to 5 are missing"), "{problem}");
    }

    #[tokio::test]
    async fn the_head_cannot_be_rewound_or_removed_unnoticed() {
        let (log, _s, _d) = log_with(5).await;
        let four = serde_json::from_slice::<AuditRecord>(&stored(&log, 4)).unwrap();
        log.inner.records.remove(seq_key(5)).await.unwrap();
        // Pointing the head at record 4 takes the key.
        let forged = Head {
            seq: 4,
            hash: four.hash.clone(),
            mac: "0".repeat(64),
        };
        log.inner
            .meta
            .insert(HEAD, serde_json::to_vec(&forged).unwrap())
            .await
            .unwrap();
        let (_, problem) = broken_at(&log.verify().unwrap());
        assert!(
            problem.contains("head entry") && problem.contains("altered"),
            "{problem}"
        );

        log.inner.meta.remove(HEAD).await.unwrap();
        let (seq, problem) = broken_at(&log.verify().unwrap());
        assert_eq!(seq, 4);
        assert!(
            problem.contains("head entry") && problem.contains("missing"),
            "{problem}"
        );
    }

    #[tokio::test]
    async fn reopening_the_store_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let third = {
            let store = Store::open(dir.path(), &test_key()).await.unwrap();
            let log = AuditLog::open(&store).await.unwrap();
            let mut last = None;
            for i in 1..=3 {
                last = Some(log.append(entry(i)).await.unwrap());
            }
            last.unwrap()
        };
        let store = Store::open(dir.path(), &test_key()).await.unwrap();
        let log = AuditLog::open(&store).await.unwrap();
        let fourth = log.append(entry(4)).await.unwrap();
        assert_eq!(fourth.seq, 4);
        assert_eq!(fourth.prev, third.hash);
        let v = log.verify().unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.records, v.head), (4, Some(fourth.hash)));
    }

    #[tokio::test]
    async fn the_chain_key_is_sealed_and_a_log_without_its_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &test_key()).await.unwrap();
        let log = AuditLog::open(&store).await.unwrap();
        log.append(entry(1)).await.unwrap();
        let sealed = log.inner.meta.get(CHAIN_KEY).unwrap().unwrap();
        assert_eq!(
            store
                .sealer()
                .open(CHAIN_KEY_AAD, std::str::from_utf8(&sealed).unwrap())
                .unwrap(),
            log.inner.key.0,
            "kept sealed with the master key, bound to its purpose"
        );
        // Sealed with another master key: refused, not replaced.
        let other = crate::crypto::MasterKey::random("other").sealer();
        log.inner
            .meta
            .insert(CHAIN_KEY, other.seal(CHAIN_KEY_AAD, &[1u8; 32]).as_bytes())
            .await
            .unwrap();
        let err = AuditLog::open(&store).await.err().unwrap().to_string();
        assert!(err.contains("does not open with this master key"), "{err}");
        // Gone while records exist: refused too.
        log.inner.meta.remove(CHAIN_KEY).await.unwrap();
        let err = AuditLog::open(&store).await.err().unwrap().to_string();
        assert!(err.contains("chain key is gone"), "{err}");
    }

    #[tokio::test]
    async fn a_master_key_rotation_reseals_the_chain_key_itself_unchanged() {
        let (log, store, _d) = log_with(3).await;
        let new = crate::crypto::MasterKey::random("new").sealer();
        let reseal = chain_key_resealed(&store, store.sealer(), &new).unwrap();
        assert_eq!(reseal.records.len(), 1);
        let (k, _, bytes) = &reseal.records[0];
        reseal.tree.insert(k, bytes.as_slice()).await.unwrap();
        let sealed = log.inner.meta.get(CHAIN_KEY).unwrap().unwrap();
        let sealed = std::str::from_utf8(&sealed).unwrap();
        assert_eq!(new.open(CHAIN_KEY_AAD, sealed).unwrap(), log.inner.key.0);
        assert!(store.sealer().open(CHAIN_KEY_AAD, sealed).is_err());
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_consecutive_seqs_and_chain() {
        let (log, _s, _d) = log_with(0).await;
        let tasks: Vec<_> = (1..=64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(entry(i)).await.unwrap().seq })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=64).collect::<Vec<_>>());
        assert!(log.verify().unwrap().ok);
    }

    #[tokio::test]
    async fn list_keeps_records_since_a_time() {
        let (log, _s, _d) = log_with(3).await;
        let first = log.list(None).unwrap()[0].time.clone();
        let first = DateTime::parse_from_rfc3339(&first)
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(log.list(Some(first)).unwrap().len(), 3);
        let later = Utc::now() + chrono::Duration::hours(1);
        assert!(log.list(Some(later)).unwrap().is_empty());
    }

    #[test]
    fn since_is_a_time_or_a_duration_back_from_now() {
        let now = DateTime::parse_from_rfc3339("2026-11-30T03:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = |s: &str| parse_since(s, now).map(|t| t.to_rfc3339());
        assert_eq!(t("1h").unwrap(), "2026-11-30T02:00:00+00:00");
        assert_eq!(t("90m").unwrap(), "2026-11-30T01:30:00+00:00");
        assert_eq!(
            t("2026-11-30T04:00:00+02:00").unwrap(),
            "2026-11-30T02:00:00+00:00"
        );
        let err = t("yesterday").unwrap_err();
        assert!(
            err.contains("`yesterday` is neither an RFC 3339 time"),
            "{err}"
        );
    }

    #[test]
    fn topics_are_known_kinds_token_or_api() {
        let with = |action: &str, kind: Option<&str>| {
            topic(&AuditEntry {
                action: action.into(),
                kind: kind.map(str::to_string),
                ..AuditEntry::default()
            })
        };
        assert_eq!(with("apply", Some("Service")), "service");
        assert_eq!(with("delete", Some("secrets")), "secret");
        assert_eq!(with("token-create", Some("Token")), "token");
        assert_eq!(with("admin-rotate", Some("Token")), "token");
        assert_eq!(with("token-revoke", None), "token");
        assert_eq!(with("GET /x", None), "api");
        // A kind from a refused request's URL never becomes a subject token.
        assert_eq!(with("delete", Some("a.*.>")), "api");
    }

    /// Records what is published; refuses the first `outage` attempts.
    #[derive(Default)]
    struct Recorder {
        outage: usize,
        attempts: StdMutex<usize>,
        published: StdMutex<Vec<(String, String, Vec<u8>)>>,
    }

    #[async_trait::async_trait]
    impl EventBus for Recorder {
        async fn publish(&self, _: &berth_api_types::Event) -> Result<(), BusError> {
            Ok(())
        }
        async fn subscribe(&self, _: &[Kind], _: Option<&str>) -> Result<Subscription, BusError> {
            unimplemented!("the audit publisher does not subscribe")
        }
        async fn publish_audit(
            &self,
            subject: &str,
            id: &str,
            payload: Vec<u8>,
        ) -> Result<(), BusError> {
            let mut attempts = self.attempts.lock().unwrap();
            *attempts += 1;
            if *attempts <= self.outage {
                return Err(BusError::Publish {
                    id: id.into(),
                    subject: subject.into(),
                    reason: "bus down".into(),
                });
            }
            self.published
                .lock()
                .unwrap()
                .push((subject.into(), id.into(), payload));
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    async fn published_count(bus: &Recorder, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while bus.published.lock().unwrap().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "not published in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_publisher_sends_records_after_the_cursor_in_order_through_an_outage() {
        let (log, store, _d) = log_with(1).await;
        // Record 1 went out before a restart.
        log.mark_published(1).await.unwrap();
        log.append(entry(2)).await.unwrap();
        let token_change = AuditEntry {
            action: "token-revoke".into(),
            kind: Some("Token".into()),
            name: Some("ci".into()),
            ..entry(3)
        };
        log.append(token_change).await.unwrap();
        let bus = Arc::new(Recorder {
            outage: 2,
            ..Recorder::default()
        });
        let publisher = tokio::spawn(publish(log.clone(), bus.clone()));
        // Appended while the publisher runs: woken, not polled for.
        log.append(refused()).await.unwrap();
        log.append(AuditEntry {
            kind: None,
            name: None,
            action: "GET /apis/berth/v1/nothing".into(),
            ..refused()
        })
        .await
        .unwrap();
        published_count(&bus, 4).await;
        let got = bus.published.lock().unwrap().clone();
        let instance = store.instance();
        assert_eq!(
            got.iter()
                .map(|(s, id, _)| (s.as_str(), id.clone()))
                .collect::<Vec<_>>(),
            [
                ("berth.audit.service", format!("audit-{instance}-2")),
                ("berth.audit.token", format!("audit-{instance}-3")),
                ("berth.audit.secret", format!("audit-{instance}-4")),
                ("berth.audit.api", format!("audit-{instance}-5")),
            ],
            "after the cursor, in order, each once"
        );
        for (i, (_, _, payload)) in got.iter().enumerate() {
            assert_eq!(
                *payload,
                stored(&log, i as u64 + 2),
                "the stored bytes, as they are"
            );
        }
        assert_eq!(log.published().unwrap(), 5);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(bus.published.lock().unwrap().len(), 4, "nothing twice");
        publisher.abort();
    }

    #[tokio::test]
    async fn the_publisher_stops_at_what_is_on_disk() {
        let (log, _s, _d) = log_with(3).await;
        // Record 3 committed but not yet flushed, as between an append's commit and its fsync.
        log.inner.durable.store(2, Ordering::SeqCst);
        async fn seqs(log: &AuditLog) -> Vec<u64> {
            log.unpublished(10)
                .await
                .unwrap()
                .iter()
                .map(|u| u.seq)
                .collect::<Vec<_>>()
        }
        assert_eq!(seqs(&log).await, [1, 2]);
        log.append(entry(4)).await.unwrap();
        assert_eq!(seqs(&log).await, [1, 2, 3, 4], "the next flush covers it");
    }

    /// What an append costs: `cargo test -p berth-operator append_latency -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn append_latency() {
        let (log, _s, _d) = log_with(0).await;
        let mut times = Vec::with_capacity(1000);
        let start = std::time::Instant::now();
        for i in 0..1000 {
            let t = std::time::Instant::now();
            log.append(entry(i)).await.unwrap();
            times.push(t.elapsed());
        }
        let total = start.elapsed();
        times.sort();
        println!(
            "sequential: 1000 appends in {total:?}; p50 {:?} p99 {:?} max {:?}",
            times[500], times[990], times[999]
        );
        let start = std::time::Instant::now();
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let t = std::time::Instant::now();
                    log.append(refused()).await.unwrap();
                    let _ = i;
                    t.elapsed()
                })
            })
            .collect();
        let mut times = Vec::with_capacity(1000);
        for t in tasks {
            times.push(t.await.unwrap());
        }
        let total = start.elapsed();
        times.sort();
        println!(
            "concurrent: 1000 appends in {total:?}; p50 {:?} p99 {:?} max {:?}",
            times[500], times[990], times[999]
        );
        let start = std::time::Instant::now();
        let v = log.verify().unwrap();
        println!("verify of {} records: {:?}", v.records, start.elapsed());
        assert!(v.ok);
        // The disk's share: one small write and the store's flush, without the chain's work.
        let scratch = log.inner.store.aux_tree("audit-latency-scratch").unwrap();
        let start = std::time::Instant::now();
        for i in 0u64..1000 {
            scratch
                .insert(i.to_be_bytes(), b"x".as_slice())
                .await
                .unwrap();
            log.inner.store.flush().await.unwrap();
        }
        println!("flush alone: 1000 in {:?}", start.elapsed());
        // The CPU's share: numbering, hashing and encoding, without the disk.
        let start = std::time::Instant::now();
        for i in 0..1000 {
            let mut r = AuditRecord {
                seq: i,
                time: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
                entry: entry(i),
                prev: GENESIS.into(),
                hash: String::new(),
            };
            r.hash = log.inner.key.record_hash(&r);
            std::hint::black_box(serde_json::to_vec(&r).unwrap());
        }
        println!("hash and encode alone: 1000 in {:?}", start.elapsed());
    }
}
