//! Each PG's log: one entry per mutation, appended (and trimmed) in the mutation's own
//! commit. See docs/objstore.md, "PG log".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamily, Direction, IteratorMode, WriteBatch, DB};
use store_types::wire::{decode_record, encode_record};

use super::format::{log_key, pg_prefix, RECORD_V};
use super::{meta_err, BlockStore, CF_PGLOG};
use crate::device::BlockDevice;
use crate::{LogOp, ObjError, ObjectId, PgLogEntry, Version};

/// Trim a PG log only once it is this far over its bound, to batch the work.
const PG_LOG_TRIM_SLACK: u64 = 256;

/// What this store knows of one PG's log without reading it: its length (to trim it), and
/// its newest key, so that appending a newer version needs no lookup to learn whether it
/// replaces an entry.
#[derive(Default)]
pub(super) struct LogCount {
    entries: u64,
    newest: Option<Vec<u8>>,
}

/// One PG's [`LogCount`] (None until its log is counted), behind a lock of its own: the
/// appends to one PG's log are serialised by it, those of other PGs do not wait for it.
/// An async lock, because it is held across the scans of that PG's log.
pub(super) type PgLogSlot = Arc<tokio::sync::Mutex<Option<LogCount>>>;

/// Every PG's [`PgLogSlot`]. This lock is OSD-wide, so it is held only to find or add a
/// slot, never across I/O.
pub(super) type PgLogSlots = Mutex<HashMap<(u32, u32), PgLogSlot>>;

impl<D: BlockDevice> BlockStore<D> {
    /// Adds a PG log entry to `batch`, and trims the PG's log in the same batch once it is
    /// over its bound.
    ///
    /// Why the PG's own lock and no other: the count and newest key are read, then
    /// replaced, so two appends to the same PG must not interleave (one's increment would
    /// be lost); appends to different PGs share nothing. The scans (counting the log the
    /// first time, finding where to trim) run on the blocking pool while only that PG's
    /// lock is held; they read RocksDB through an iterator, a consistent snapshot, just
    /// as they did under the OSD-wide lock, which never kept commits out either.
    pub(super) async fn log_into(
        &self,
        batch: &mut WriteBatch,
        id: &ObjectId,
        version: Version,
        op: LogOp,
    ) -> Result<(), ObjError> {
        let cf = self.db.cf_handle(CF_PGLOG).expect("column family exists");
        let entry = PgLogEntry {
            version,
            object: id.name.clone(),
            op,
        };
        let key = log_key(id.pool, id.pg, version);
        let slot = self.pg_log_slot(id.pool, id.pg)?;
        let mut known = slot.lock().await;
        // Set only once the scan is done: if this future is dropped meanwhile, the next
        // append counts again.
        if known.is_none() {
            *known = Some(self.count_pg_log(id.pool, id.pg).await?);
        }
        let count = known.as_mut().expect("counted above");
        // Only a version at or below the newest logged can already have an entry.
        let existed = match &count.newest {
            Some(newest) if key <= *newest => {
                self.db.get_pinned_cf(cf, &key).map_err(meta_err)?.is_some()
            }
            _ => false,
        };
        batch.put_cf(cf, &key, encode_record(RECORD_V, &entry));
        if count.newest.as_ref().is_none_or(|n| *n <= key) {
            count.newest = Some(key.clone());
        }
        count.entries += u64::from(!existed);
        let slack = PG_LOG_TRIM_SLACK.min(self.log_max);
        if count.entries > self.log_max + slack {
            // Delete everything before the oldest entry to keep. (If this future is
            // dropped during the scan, the count stays over the bound: the next append
            // trims.)
            let skip = (count.entries - self.log_max) as usize;
            let prefix = pg_prefix(id.pool, id.pg);
            let cut = self.nth_pg_log_key(id.pool, id.pg, skip).await?;
            if let Some(cut) = cut.filter(|cut| cut.starts_with(&prefix) && *cut < key) {
                batch.delete_range_cf(cf, &prefix, &cut);
                count.entries = self.log_max;
            }
        }
        Ok(())
    }

    /// The lock and count of a PG's log, added if missing.
    fn pg_log_slot(&self, pool: u32, pg: u32) -> Result<PgLogSlot, ObjError> {
        let mut slots = (self.log_slots.lock()).map_err(|_| meta_err("log lock poisoned"))?;
        Ok(slots.entry((pool, pg)).or_default().clone())
    }

    /// Forgets what is known of a PG's log (it was removed).
    pub(super) fn forget_pg_log(&self, pool: u32, pg: u32) -> Result<(), ObjError> {
        (self.log_slots.lock())
            .map_err(|_| meta_err("log lock poisoned"))?
            .remove(&(pool, pg));
        Ok(())
    }

    /// Counts a PG's log and finds its newest key: a scan of the whole log (up to
    /// [`crate::PG_LOG_MAX_ENTRIES`] and the trim slack), on the blocking pool.
    async fn count_pg_log(&self, pool: u32, pg: u32) -> Result<LogCount, ObjError> {
        let prefix = pg_prefix(pool, pg);
        self.scan_pg_log(pool, pg, move |db, cf| {
            let mut count = LogCount::default();
            for kv in db.iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward)) {
                let (k, _) = kv.map_err(meta_err)?;
                if !k.starts_with(&prefix) {
                    break;
                }
                count.entries += 1;
                count.newest = Some(k.to_vec());
            }
            Ok(count)
        })
        .await
    }

    /// The key `skip` keys after the start of a PG's log (None if there is none, or it is
    /// unreadable: the log is then not trimmed this time), on the blocking pool.
    async fn nth_pg_log_key(
        &self,
        pool: u32,
        pg: u32,
        skip: usize,
    ) -> Result<Option<Vec<u8>>, ObjError> {
        let prefix = pg_prefix(pool, pg);
        self.scan_pg_log(pool, pg, move |db, cf| {
            Ok(db
                .iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward))
                .nth(skip)
                .and_then(|kv| kv.ok())
                .map(|(k, _)| k.to_vec()))
        })
        .await
    }

    /// Runs `scan` over the PG log family on the blocking pool: a scan of thousands of
    /// keys must not hold up the runtime thread's other tasks.
    async fn scan_pg_log<T: Send + 'static>(
        &self,
        pool: u32,
        pg: u32,
        scan: impl FnOnce(&DB, &ColumnFamily) -> Result<T, ObjError> + Send + 'static,
    ) -> Result<T, ObjError> {
        #[cfg(test)]
        let hook = self.log_scan_hook.clone();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            if let Some(hook) = hook {
                hook(pool, pg);
            }
            #[cfg(not(test))]
            let _ = (pool, pg);
            let cf = db
                .cf_handle(CF_PGLOG)
                .ok_or_else(|| meta_err("no PG log family"))?;
            scan(&db, cf)
        })
        .await
        .map_err(|e| meta_err(format!("scanning a PG log: {e}")))?
    }

    /// [`crate::ObjectStore::pg_log`].
    pub(super) async fn read_pg_log(
        &self,
        pool: u32,
        pg: u32,
        after: Option<Version>,
        limit: usize,
    ) -> Result<Vec<PgLogEntry>, ObjError> {
        let prefix = pg_prefix(pool, pg);
        let start = match after {
            Some(v) => {
                let mut k = log_key(pool, pg, v);
                k.push(0); // strictly after v
                k
            }
            None => prefix.clone(),
        };
        let cf = self.db.cf_handle(CF_PGLOG).expect("column family exists");
        let mut out = Vec::new();
        for kv in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = kv.map_err(meta_err)?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(decode_record(RECORD_V, &v).map_err(meta_err)?);
        }
        Ok(out)
    }

    /// [`crate::ObjectStore::pg_log_head`].
    pub(super) async fn read_pg_log_head(
        &self,
        pool: u32,
        pg: u32,
    ) -> Result<Option<Version>, ObjError> {
        let prefix = pg_prefix(pool, pg);
        let mut end = prefix.clone();
        end.extend_from_slice(&[0xff; 16]);
        let cf = self.db.cf_handle(CF_PGLOG).expect("column family exists");
        let newest = self
            .db
            .iterator_cf(cf, IteratorMode::From(&end, Direction::Reverse))
            .next()
            .transpose()
            .map_err(meta_err)?;
        match newest {
            Some((k, v)) if k.starts_with(&prefix) => {
                let e: PgLogEntry = decode_record(RECORD_V, &v).map_err(meta_err)?;
                Ok(Some(e.version))
            }
            _ => Ok(None),
        }
    }
}
