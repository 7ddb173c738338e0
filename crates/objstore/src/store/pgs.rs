//! What the store holds per PG besides its log: the copy's state, its objects' names,
//! the PGs present, and the removal of a PG copy.

use std::sync::atomic::Ordering;

use rocksdb::{Direction, IteratorMode, WriteBatch};
use store_types::wire::{decode_record, encode_record};

use super::format::{pg_prefix, pg_state_key, PG_STATE_PREFIX, RECORD_V};
use super::write::block_runs;
use super::{block_span, meta_err, BlockStore, CF_BLOCKS, CF_META, CF_OBJECTS, CF_PGLOG};
use crate::blockmap;
use crate::device::BlockDevice;
use crate::{ObjError, PgCopyState};

impl<D: BlockDevice> BlockStore<D> {
    /// [`crate::ObjectStore::pg_state`].
    pub(super) async fn read_pg_state(&self, pool: u32, pg: u32) -> Result<PgCopyState, ObjError> {
        let cf = self.db.cf_handle(CF_META).expect("column family exists");
        match self
            .db
            .get_cf(cf, pg_state_key(pool, pg))
            .map_err(meta_err)?
        {
            Some(b) => decode_record(RECORD_V, &b).map_err(meta_err),
            None => Ok(PgCopyState::default()),
        }
    }

    /// [`crate::ObjectStore::set_pg_state`].
    pub(super) async fn store_pg_state(
        &self,
        pool: u32,
        pg: u32,
        state: PgCopyState,
    ) -> Result<(), ObjError> {
        let cf = self.db.cf_handle(CF_META).expect("column family exists");
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, pg_state_key(pool, pg), encode_record(RECORD_V, &state));
        self.commit(batch).await
    }

    /// [`crate::ObjectStore::list`].
    pub(super) async fn list_objects(&self, pool: u32, pg: u32) -> Result<Vec<String>, ObjError> {
        let prefix = pg_prefix(pool, pg);
        let cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let mut names = Vec::new();
        for k in self.keys_with_prefix(cf, &prefix) {
            let k = k?;
            let name = k
                .get(prefix.len() + 2..)
                .ok_or_else(|| meta_err("short object key"))?;
            names.push(String::from_utf8_lossy(name).into_owned());
        }
        Ok(names)
    }

    /// [`crate::ObjectStore::pgs`].
    pub(super) async fn list_pgs(&self) -> Result<Vec<(u32, u32)>, ObjError> {
        let mut out = std::collections::BTreeSet::new();
        for cf in [CF_OBJECTS, CF_PGLOG] {
            let cf = self.db.cf_handle(cf).expect("column family exists");
            out.extend(self.pg_prefixes(cf, &[])?);
        }
        let meta = self.db.cf_handle(CF_META).expect("column family exists");
        out.extend(self.pg_prefixes(meta, PG_STATE_PREFIX)?);
        Ok(out.into_iter().collect())
    }

    /// [`crate::ObjectStore::remove_pg`].
    pub(super) async fn remove_pg_step(
        &self,
        pool: u32,
        pg: u32,
        max_objects: usize,
    ) -> Result<bool, ObjError> {
        let prefix = pg_prefix(pool, pg);
        let objects_cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let okeys: Vec<Vec<u8>> = self
            .db
            .iterator_cf(objects_cf, IteratorMode::From(&prefix, Direction::Forward))
            .take_while(|kv| kv.as_ref().is_ok_and(|(k, _)| k.starts_with(&prefix)))
            .take(max_objects.max(1))
            .map(|kv| kv.map(|(k, _)| k.to_vec()).map_err(meta_err))
            .collect::<Result<_, _>>()?;
        if okeys.is_empty() {
            let log_cf = self.db.cf_handle(CF_PGLOG).expect("column family exists");
            let meta_cf = self.db.cf_handle(CF_META).expect("column family exists");
            let mut end = prefix.clone();
            end.extend_from_slice(&[0xff; 17]);
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(log_cf, &prefix, &end);
            batch.delete_cf(log_cf, &end);
            batch.delete_cf(meta_cf, pg_state_key(pool, pg));
            self.commit(batch).await?;
            self.forget_pg_log(pool, pg)?;
            return Ok(true);
        }
        for okey in okeys {
            let _guard = self.lock(&okey).write().await;
            let Some(meta) = self.get_meta(&okey)? else {
                continue;
            };
            let (_, b1) = block_span(0, meta.size);
            let refs = self.block_refs(&okey, 0, b1.max(1))?;
            let blocks_cf = self.db.cf_handle(CF_BLOCKS).expect("column family exists");
            let mut batch = WriteBatch::default();
            blockmap::delete_object(&mut batch, blocks_cf, &okey);
            batch.delete_cf(objects_cf, &okey);
            let freeing = block_runs(refs.iter().flatten().map(|r| r.device_block));
            self.check_in_use(&freeing)?;
            let res = self.commit(batch).await;
            self.map_cache.forget_object(&okey, b1);
            self.meta_committed(&okey, &res, None);
            res?;
            self.objects.fetch_sub(1, Ordering::Relaxed);
            self.release(freeing)?;
        }
        Ok(false)
    }

    /// The distinct (pool, pg) of the keys that start with `lead` then a PG prefix, found
    /// by seeking from one PG to the next (one seek per PG, not a scan of every key).
    fn pg_prefixes(
        &self,
        cf: &rocksdb::ColumnFamily,
        lead: &[u8],
    ) -> Result<Vec<(u32, u32)>, ObjError> {
        let mut out = Vec::new();
        let mut from = lead.to_vec();
        loop {
            let mut it = self
                .db
                .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward));
            let Some(kv) = it.next() else { break };
            let (k, _) = kv.map_err(meta_err)?;
            let Some(rest) = k.strip_prefix(lead).filter(|r| r.len() >= 8) else {
                break;
            };
            let pool = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
            let pg = u32::from_be_bytes(rest[4..8].try_into().expect("4 bytes"));
            out.push((pool, pg));
            // The next PG's prefix: (pool, pg + 1), carrying into the pool.
            let next = (u64::from(pool) << 32 | u64::from(pg)).checked_add(1);
            let Some(next) = next else { break };
            from = lead.to_vec();
            from.extend_from_slice(&next.to_be_bytes());
        }
        Ok(out)
    }

    /// The keys of `cf` that start with `prefix`, in order.
    fn keys_with_prefix<'a>(
        &'a self,
        cf: &'a rocksdb::ColumnFamily,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<Box<[u8]>, ObjError>> + 'a {
        self.db
            .iterator_cf(cf, IteratorMode::From(prefix, Direction::Forward))
            .map(|kv| kv.map(|(k, _)| k).map_err(meta_err))
            .take_while(move |k| k.as_ref().map_or(true, |k| k.starts_with(prefix)))
    }
}
