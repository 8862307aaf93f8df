//! Where the store's records live: named trees of keys and bytes with atomic multi-tree
//! transactions, on one of two backends behind one interface.
//!
//! - **sled** (`--store sled`, the default): one database in the data directory of one API
//!   server. A transaction is a sled transaction; durability is the store's group-commit flush.
//! - **JetStream** (`--store nats`): a replicated log on NATS (`jetstream.rs`). Every API server
//!   that points at the same NATS cluster serves the same state; a commit is acknowledged once a
//!   quorum of NATS servers has it.
//!
//! Everything above this layer (objects, events, outbox, tokens, webhooks, the audit chain, the
//! master-key rotation) is written once against [`Db`], [`Tree`] and [`TxView`], so both backends
//! keep the same rules: a transaction's closure may run more than once (sled on a conflict, the log
//! when another server committed first), so it must not have side effects.

pub mod jetstream;

use super::StoreError;
use sled::transaction::{ConflictableTransactionError, UnabortableTransactionError};
use sled::Transactional;
use std::sync::Arc;

/// A key and its bytes, as the iterators of both backends yield them.
pub type Entry = (Vec<u8>, Vec<u8>);

/// An iterator over a tree (or a prefix of it) in key order, reversible.
pub type Iter = Box<dyn DoubleEndedIterator<Item = Result<Entry, StoreError>> + Send>;

/// The database under a store: sled on this machine, or the replicated log on NATS.
#[derive(Clone)]
pub enum Db {
    Sled(sled::Db),
    Log(Arc<jetstream::Log>),
}

/// One named tree of a [`Db`].
#[derive(Clone)]
pub struct Tree {
    name: Arc<str>,
    inner: TreeInner,
}

#[derive(Clone)]
enum TreeInner {
    Sled(sled::Tree),
    Log(Arc<jetstream::Log>),
}

/// Why a transaction's closure stopped: a refusal (the transaction writes nothing and returns
/// it), or a sled conflict that sled retries.
#[derive(Debug)]
pub enum TxError {
    Abort(StoreError),
    Sled(UnabortableTransactionError),
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Abort(e)
    }
}

impl From<UnabortableTransactionError> for TxError {
    fn from(e: UnabortableTransactionError) -> Self {
        TxError::Sled(e)
    }
}

/// Stops a transaction with `e`; nothing it wrote is kept.
pub fn abort<T>(e: StoreError) -> Result<T, TxError> {
    Err(TxError::Abort(e))
}

/// One tree as a transaction sees it: its reads include the transaction's own writes.
pub enum TxView<'a> {
    Sled(&'a sled::transaction::TransactionalTree),
    Log(jetstream::TxTree<'a>),
}

impl TxView<'_> {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, TxError> {
        match self {
            TxView::Sled(t) => Ok(t.get(key.as_ref())?.map(|v| v.to_vec())),
            TxView::Log(t) => Ok(t.get(key.as_ref())),
        }
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), TxError> {
        match self {
            TxView::Sled(t) => {
                t.insert(key.as_ref(), value.as_ref())?;
            }
            TxView::Log(t) => t.insert(key.as_ref(), value.as_ref()),
        }
        Ok(())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), TxError> {
        match self {
            TxView::Sled(t) => {
                t.remove(key.as_ref())?;
            }
            TxView::Log(t) => t.remove(key.as_ref()),
        }
        Ok(())
    }
}

impl Db {
    pub fn tree(&self, name: &str) -> Result<Tree, StoreError> {
        let inner = match self {
            Db::Sled(db) => TreeInner::Sled(db.open_tree(name)?),
            Db::Log(log) => TreeInner::Log(log.clone()),
        };
        Ok(Tree {
            name: name.into(),
            inner,
        })
    }

    /// Whether acknowledged commits are durable as they stand (the log: a quorum has them) or
    /// need the store's flush (sled).
    pub fn needs_flush(&self) -> bool {
        matches!(self, Db::Sled(_))
    }

    /// Whether checks that read other records (admission) belong inside the transaction. On the
    /// log, other servers commit concurrently and only a check inside the transaction is
    /// serialized with them. On sled, the store's write lock already keeps every writer out, and
    /// a read of a tree inside a sled transaction would wait on that transaction (sled's
    /// concurrency control): a deadlock.
    pub fn checks_inside_transactions(&self) -> bool {
        matches!(self, Db::Log(_))
    }

    /// sled's fsync; nothing to do on the log.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        if let Db::Sled(db) = self {
            db.flush()?;
        }
        Ok(())
    }

    /// Runs `f` over `trees` as one atomic transaction: either everything it wrote is committed
    /// or nothing. `f` may run more than once. A sled commit still needs the store's flush to be
    /// durable; a log commit is durable when this returns.
    pub async fn transact<R>(
        &self,
        trees: &[&Tree],
        f: impl Fn(&[TxView<'_>]) -> Result<R, TxError>,
    ) -> Result<R, StoreError> {
        match self {
            Db::Sled(_) => {
                let sled_trees: Vec<&sled::Tree> = trees
                    .iter()
                    .map(|t| match &t.inner {
                        TreeInner::Sled(s) => s,
                        TreeInner::Log(_) => unreachable!("a log tree in a sled database"),
                    })
                    .collect();
                sled_trees[..]
                    .transaction(|views| {
                        let wrapped: Vec<TxView<'_>> = views.iter().map(TxView::Sled).collect();
                        f(&wrapped).map_err(|e| match e {
                            TxError::Abort(e) => ConflictableTransactionError::Abort(e),
                            TxError::Sled(u) => u.into(),
                        })
                    })
                    .map_err(StoreError::from)
            }
            Db::Log(log) => {
                let names: Vec<&str> = trees.iter().map(|t| &*t.name).collect();
                log.transact(&names, f).await
            }
        }
    }

    /// Every tree that holds or held records (sled's internal default tree left out).
    pub fn tree_names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Db::Sled(db) => db
                .tree_names()
                .into_iter()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .filter(|n| n != "__sled__default")
                .collect(),
            Db::Log(log) => log.tree_names(),
        };
        names.sort();
        names
    }

    /// What the store runs on, for the start log and `berth version`.
    pub fn describe(&self) -> String {
        match self {
            Db::Sled(_) => "sled".into(),
            Db::Log(log) => log.describe(),
        }
    }

    /// Waits until this server has applied every commit acknowledged anywhere before the call
    /// (a read then sees every write another server acknowledged). Immediate on sled.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        match self {
            Db::Sled(_) => Ok(()),
            Db::Log(log) => log.catch_up().await,
        }
    }
}

impl Tree {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.inner {
            TreeInner::Sled(t) => Ok(t.get(key.as_ref())?.map(|v| v.to_vec())),
            TreeInner::Log(log) => Ok(log.get(&self.name, key.as_ref())),
        }
    }

    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }

    /// Every record, in key order.
    pub fn iter(&self) -> Iter {
        self.scan_prefix([])
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        match &self.inner {
            TreeInner::Sled(t) => Box::new(t.scan_prefix(prefix.as_ref()).map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StoreError::from)
            })),
            TreeInner::Log(log) => Box::new(
                log.scan(&self.name, prefix.as_ref())
                    .into_iter()
                    .map(Ok::<_, StoreError>),
            ),
        }
    }

    /// Every record with `start <= key <= end`, in key order.
    pub fn range_inclusive(&self, start: impl AsRef<[u8]>, end: impl AsRef<[u8]>) -> Iter {
        let (start, end) = (start.as_ref().to_vec(), end.as_ref().to_vec());
        match &self.inner {
            TreeInner::Sled(t) => Box::new(t.range(start..=end).map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StoreError::from)
            })),
            TreeInner::Log(log) => Box::new(
                log.range(&self.name, start, end)
                    .into_iter()
                    .map(Ok::<_, StoreError>),
            ),
        }
    }

    pub fn len(&self) -> usize {
        match &self.inner {
            TreeInner::Sled(t) => t.len(),
            TreeInner::Log(log) => log.len(&self.name),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes one record (its own transaction). Durable on the log when this returns; on sled
    /// after the store's flush.
    pub async fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), StoreError> {
        match &self.inner {
            TreeInner::Sled(t) => {
                t.insert(key.as_ref(), value.as_ref())?;
                Ok(())
            }
            TreeInner::Log(log) => {
                let (k, v) = (key.as_ref(), value.as_ref());
                log.transact(&[&self.name], |t| t[0].insert(k, v)).await
            }
        }
    }

    /// Removes one record (its own transaction); see [`Tree::insert`].
    pub async fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), StoreError> {
        match &self.inner {
            TreeInner::Sled(t) => {
                t.remove(key.as_ref())?;
                Ok(())
            }
            TreeInner::Log(log) => {
                let k = key.as_ref();
                log.transact(&[&self.name], |t| t[0].remove(k)).await
            }
        }
    }
}
