//! How commits become durable: through the commit journal, or (stores without one) the
//! commit thread's synced RocksDB WAL writes; and the device flush shared by concurrent
//! writers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{WriteBatch, WriteOptions, DB};

use super::{meta_err, BlockStore};
use crate::device::BlockDevice;
use crate::journal::{CheckRun, Journal};
use crate::ObjError;

/// Group flush of the device: a flush makes durable every write that completed before it
/// started, so writers that wait while one runs share the next instead of queueing one
/// each (with `RWF_DSYNC`, each of eight concurrent 1 MiB writes asks for its own flush).
#[derive(Default)]
pub(super) struct FlushGroup {
    /// Writes completed (and registered) so far; a write's number is the count after it.
    completed: AtomicU64,
    /// Every write numbered up to this is durable.
    durable: AtomicU64,
    /// Held while a flush runs: one at a time, and a waiter re-checks `durable` after it.
    running: tokio::sync::Mutex<()>,
}

/// How a store makes its metadata commits durable.
pub(super) enum Committer<D: BlockDevice> {
    /// The commit journal on the data device (stores created with one).
    Journal(Journal<D>),
    /// Synced RocksDB WAL writes by the commit thread (stores created without a journal:
    /// older ones, and devices too small for one). The thread is joined on drop so the
    /// metadata store is closed when the store is gone.
    Wal {
        tx: Option<std::sync::mpsc::Sender<Commit>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

impl<D: BlockDevice> Drop for Committer<D> {
    fn drop(&mut self) {
        if let Committer::Wal { tx, thread } = self {
            tx.take();
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A batch to commit durably, and who waits for it.
pub(super) type Commit = (WriteBatch, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Batches committed per sync at most.
const COMMIT_GROUP_MAX: usize = 64;

/// The commit thread: takes every batch waiting, writes them in arrival order into the
/// WAL's buffer (the WAL is flushed by hand, see [`super::db::open_db`]), then writes and syncs the
/// WAL once, and answers them all: one `write` system call, one fsync and one thread
/// wake-up per group instead of per batch. Batches of a group become visible to readers
/// before the group's sync; the writers that wait on them hold their objects' locks until
/// answered, and an answer follows the sync.
fn commit_thread(db: Arc<DB>, rx: std::sync::mpsc::Receiver<Commit>) {
    let mut lazy = WriteOptions::default();
    lazy.set_sync(false);
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < COMMIT_GROUP_MAX {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        let mut failed: Option<String> = None;
        let mut waiters = Vec::with_capacity(group.len());
        for (batch, tx) in group {
            if failed.is_none() {
                if let Err(e) = db.write_opt(batch, &lazy) {
                    failed = Some(e.to_string());
                }
            }
            waiters.push(tx);
        }
        if failed.is_none() {
            if let Err(e) = db.flush_wal(true) {
                failed = Some(e.to_string());
            }
        }
        for tx in waiters {
            let _ = tx.send(match &failed {
                None => Ok(()),
                Some(e) => Err(e.clone()),
            });
        }
    }
    // Unsynced writes made outside the commit thread (deferred-record removal) may still
    // sit in the WAL buffer: write them out before the store closes.
    if let Err(e) = db.flush_wal(true) {
        tracing::warn!("flushing the metadata WAL at close failed: {e}");
    }
}

impl<D: BlockDevice> BlockStore<D> {
    pub(super) fn start_commit_thread(&self) -> Result<Committer<D>, ObjError> {
        let (tx, commits) = std::sync::mpsc::channel();
        let thread = {
            let db = self.db.clone();
            std::thread::Builder::new()
                .name("store-commit".into())
                .spawn(move || commit_thread(db, commits))
                .map_err(|e| ObjError::Refused(format!("cannot start the commit thread: {e}")))?
        };
        Ok(Committer::Wal {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Commits a batch durably: through the journal, or the commit thread in stores
    /// without one (both group concurrent commits).
    pub(super) async fn commit(&self, batch: WriteBatch) -> Result<(), ObjError> {
        let tx = match self.committer.as_ref() {
            Some(Committer::Journal(j)) => return j.commit(batch).await.map_err(meta_err),
            Some(Committer::Wal { tx: Some(tx), .. }) => tx,
            _ => return Err(meta_err("the store is closing")),
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send((batch, reply))
            .map_err(|_| meta_err("the commit thread has stopped"))?;
        rx.await
            .map_err(|_| meta_err("the commit thread dropped a commit"))?
            .map_err(meta_err)
    }

    /// Commits `batch`, which names the unflushed blocks of `checks`. With a journal, the
    /// entry's own flush makes them durable (one device flush per commit instead of two),
    /// and replay checks them if the entry is the last. Without one, a flush shared with
    /// concurrent writers comes first: the block map never names data that is not durable.
    /// Sets `commit_sent` once the commit is sent.
    pub(super) async fn commit_written(
        &self,
        batch: WriteBatch,
        checks: Vec<CheckRun>,
        commit_sent: &mut bool,
    ) -> Result<(), ObjError> {
        if let Some(Committer::Journal(j)) = &self.committer {
            *commit_sent = true;
            return j.commit_unflushed(batch, checks).await.map_err(meta_err);
        }
        self.flush_device().await?;
        *commit_sent = true;
        self.commit(batch).await
    }

    /// Makes every device write that completed before this call durable, sharing the
    /// flush with concurrent callers (see [`FlushGroup`]).
    async fn flush_device(&self) -> Result<(), ObjError> {
        let g = &self.flushes;
        let mine = g.completed.fetch_add(1, Ordering::AcqRel) + 1;
        let _running = g.running.lock().await;
        if g.durable.load(Ordering::Acquire) >= mine {
            return Ok(()); // a flush that started after our write covered it
        }
        // Everything registered so far completed before this flush starts.
        let upto = g.completed.load(Ordering::Acquire);
        self.dev.flush().await?;
        g.durable.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }
}
