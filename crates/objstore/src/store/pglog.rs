//! Each PG's log: one entry per mutation, appended (and trimmed) in the mutation's own
//! commit. See docs/objstore.md, "PG log".

use rocksdb::{Direction, IteratorMode, WriteBatch};
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

impl<D: BlockDevice> BlockStore<D> {
    /// Adds a PG log entry to `batch`, and trims the PG's log in the same batch once it is
    /// over its bound.
    pub(super) fn log_into(
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
        let mut lens = self
            .log_len
            .lock()
            .map_err(|_| meta_err("log lock poisoned"))?;
        let prefix = pg_prefix(id.pool, id.pg);
        let count = match lens.remove(&(id.pool, id.pg)) {
            Some(c) => c,
            None => {
                let mut c = LogCount::default();
                for k in self.keys_with_prefix(cf, &prefix) {
                    let k = k?;
                    c.entries += 1;
                    c.newest = Some(k.to_vec());
                }
                c
            }
        };
        // Only a version at or below the newest logged can already have an entry.
        let existed = match &count.newest {
            Some(newest) if key <= *newest => {
                self.db.get_pinned_cf(cf, &key).map_err(meta_err)?.is_some()
            }
            _ => false,
        };
        batch.put_cf(cf, &key, encode_record(RECORD_V, &entry));
        let newest = match count.newest {
            Some(n) if n > key => Some(n),
            _ => Some(key.clone()),
        };
        let len = count.entries + u64::from(!existed);
        let slack = PG_LOG_TRIM_SLACK.min(self.log_max);
        let len = if len > self.log_max + slack {
            // Delete everything before the oldest entry to keep.
            let skip = (len - self.log_max) as usize;
            let cut = self
                .db
                .iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward))
                .nth(skip)
                .and_then(|kv| kv.ok())
                .map(|(k, _)| k.to_vec());
            match cut {
                Some(cut) if cut.starts_with(&prefix) && cut < key => {
                    batch.delete_range_cf(cf, &prefix, &cut);
                    self.log_max
                }
                _ => len,
            }
        } else {
            len
        };
        lens.insert(
            (id.pool, id.pg),
            LogCount {
                entries: len,
                newest,
            },
        );
        Ok(())
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
