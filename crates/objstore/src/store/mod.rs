//! [`BlockStore`]: the object store on a block device with RocksDB metadata.
//!
//! Device layout: block 0 holds the superblock (identity, size); every other block is data.
//! RocksDB column families:
//! - `meta`: the identity record (must match the superblock);
//! - `objects`: object key → `ObjMeta` (size, version);
//! - `blockmap`: object key + chunk (u32 BE) → the device block and crc32c of each mapped
//!   block of that chunk of 16 logical blocks (see [`crate::blockmap`]);
//! - `blocks`: the per-block map of stores written before chunks, moved into `blockmap` at
//!   mount (empty afterwards);
//! - `deferred`: sequence (u64 BE) → `DeferredWrite`: the data of a small write, committed
//!   with its block map so that one synced commit makes it durable (see [`DEFERRED_MAX_BLOCKS`]).
//!
//! Object keys are `pool u32 BE | pg u32 BE | name length u16 BE | name`, so one PG's
//! objects, and one object's blocks, are contiguous key ranges.
//!
//! One module per responsibility:
//! - `format`: what goes to the device and into RocksDB (superblock, keys, records);
//! - `db`: opening RocksDB (column families, options);
//! - `commit`: how commits become durable (the journal, or the WAL commit thread) and
//!   the shared device flush;
//! - `deferred`: small writes whose data rides in the commit, and the task that puts it
//!   on its blocks;
//! - `write`: copy-on-write writes, zeroing, deletion, block allocation and release;
//! - `read`: reads and the block map queries (`allocated`, `stat`);
//! - `pglog`: the PG log; `pgs`: PG copy states, listing and removal;
//! - `mount`: creating and opening a store.
//!
//! The [`ObjectStore`] implementation here only forwards to those modules.

mod commit;
mod db;
mod deferred;
mod format;
mod mount;
mod pglog;
mod pgs;
mod read;
mod write;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rocksdb::DB;
use store_types::blockdata::BlockData;
use store_types::wire::decode_record;
use tokio::sync::RwLock;

use crate::alloc::Allocator;
use crate::blockmap::{BlockRef, ChunkCache, MapSpan};
use crate::cache::GenCache;
use crate::device::BlockDevice;
use crate::{
    ObjError, ObjectId, ObjectStat, ObjectStore, PgCopyState, PgLogEntry, Usage, Version,
    BLOCK_SIZE, MAX_IO_BYTES, MAX_OBJECT_BYTES,
};

use commit::{Committer, FlushGroup};
pub use deferred::DEFERRED_MAX_BLOCKS;
use deferred::{ApplyJob, Deferred};
pub use format::Identity;
use format::{ObjMeta, RECORD_V};
use pglog::PgLogSlots;

const CF_META: &str = "meta";
const CF_OBJECTS: &str = "objects";
const CF_BLOCKS: &str = "blockmap";
const CF_LEGACY_BLOCKS: &str = "blocks";
const CF_PGLOG: &str = "pglog";
const CF_DEFERRED: &str = "deferred";

/// Object locks are striped: bounded memory, and distinct objects rarely share a stripe.
const LOCK_STRIPES: usize = 1024;
/// Block map chunks kept in memory: 256 Ki chunks of 16 blocks map 16 GiB of data, in
/// roughly 90 MiB (estimated: ~350 bytes per entry with its key and table slot). The
/// cache keeps about its capacity when the working set is larger, but only half of it for
/// sure (a generation), so it is sized well above a typical OSD's hot data rather than at
/// it.
const MAP_CACHE_CHUNKS: usize = 256 << 10;
/// Objects' metadata kept in memory (4 GiB of 4 MiB objects is 1 Ki of them).
const META_CACHE_OBJECTS: usize = 16 << 10;

pub struct BlockStore<D: BlockDevice> {
    dev: Arc<D>,
    db: Arc<DB>,
    alloc: Arc<Mutex<Allocator>>,
    locks: Vec<RwLock<()>>,
    objects: AtomicU64,
    checksum_errors: AtomicU64,
    /// Entries in each PG's log, counted on first use, each PG's behind its own lock.
    log_slots: PgLogSlots,
    log_max: u64,
    /// The next deferred write's sequence number.
    deferred_seq: AtomicU64,
    /// Deferred writes committed and not yet on their blocks, and those written but not
    /// flushed.
    deferred: Arc<Mutex<Deferred>>,
    /// To the task that writes deferred data to its blocks (bounded: writers wait).
    apply_tx: tokio::sync::mpsc::Sender<ApplyJob>,
    /// Commits the journal applied again at mount (they were not in the metadata store).
    journal_replayed: u64,
    /// Blocks before this one hold the superblock and the journal.
    first_data_block: u64,
    /// How commits become durable (None once dropping).
    committer: Option<Committer<D>>,
    /// Device flushes shared by the writes waiting for one (see [`BlockStore::flush_device`]).
    flushes: FlushGroup,
    /// Recently used block map chunks.
    map_cache: ChunkCache,
    /// Recently used objects' metadata (None: the object does not exist). Same rules as
    /// the chunk cache: filled under the object's lock, changed after each commit.
    meta_cache: GenCache<Option<ObjMeta>>,
    /// Called with (pool, pg) when a scan of that PG's log starts (tests pause it there).
    #[cfg(test)]
    log_scan_hook: Option<LogScanHook>,
}

/// See [`BlockStore::with_log_scan_hook`].
#[cfg(test)]
pub(crate) type LogScanHook = Arc<dyn Fn(u32, u32) + Send + Sync>;

impl<D: BlockDevice> Drop for BlockStore<D> {
    fn drop(&mut self) {
        // The journal's flush thread or the commit thread is joined here.
        self.committer.take();
    }
}

fn meta_err(e: impl std::fmt::Display) -> ObjError {
    ObjError::Metadata(e.to_string())
}

/// The crc32c of a block of zeros (a hole reads as one).
fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK_SIZE]))
}

/// Logical blocks `b0..b1` covering `offset..offset+len` (len > 0).
fn block_span(offset: u64, len: u64) -> (u32, u32) {
    let bs = BLOCK_SIZE as u64;
    ((offset / bs) as u32, (offset + len).div_ceil(bs) as u32)
}

impl<D: BlockDevice> BlockStore<D> {
    /// The first block that holds data (those before it are the superblock and journal).
    pub fn first_data_block(&self) -> u64 {
        self.first_data_block
    }

    /// Commits the journal applied again when this store was opened: those acknowledged
    /// (or in flight) after the metadata store's last flush before a crash.
    pub fn journal_replayed_commits(&self) -> u64 {
        self.journal_replayed
    }

    /// Keeps at most `entries` per PG log (tests use small logs).
    pub fn with_pg_log_limit(mut self, entries: u64) -> Self {
        self.log_max = entries.max(1);
        self
    }

    /// Calls `hook` with (pool, pg) whenever a scan of a PG's log starts.
    #[cfg(test)]
    pub(crate) fn with_log_scan_hook(mut self, hook: LogScanHook) -> Self {
        self.log_scan_hook = Some(hook);
        self
    }

    fn lock(&self, okey: &[u8]) -> &RwLock<()> {
        let h = crc32c::crc32c(okey) as usize;
        &self.locks[h % LOCK_STRIPES]
    }

    /// An object's metadata, from the cache or RocksDB. Call with the object's lock held.
    fn get_meta(&self, okey: &[u8]) -> Result<Option<ObjMeta>, ObjError> {
        if let Some(m) = self.meta_cache.get(okey) {
            return Ok(m);
        }
        let cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let meta = match self.db.get_pinned_cf(cf, okey).map_err(meta_err)? {
            None => None,
            Some(b) => Some(decode_record(RECORD_V, &b).map_err(meta_err)?),
        };
        self.meta_cache.put(okey.to_vec(), meta);
        Ok(meta)
    }

    /// Brings the metadata cache in line with a commit that set an object's metadata to
    /// `meta` (None: removed): the new value once committed, nothing known if it failed.
    fn meta_committed(&self, okey: &[u8], res: &Result<(), ObjError>, meta: Option<ObjMeta>) {
        match res {
            Ok(()) => self.meta_cache.put(okey.to_vec(), meta),
            Err(_) => self.meta_cache.remove(okey),
        }
    }

    /// The block map of logical blocks `b0..b1` (b0 < b1) of an object, to read or edit.
    fn map_span(&self, okey: &[u8], b0: u32, b1: u32) -> Result<MapSpan, ObjError> {
        let cf = (self.db.cf_handle(CF_BLOCKS)).ok_or_else(|| meta_err("no block map family"))?;
        MapSpan::load(&self.db, cf, &self.map_cache, okey, b0, b1).map_err(meta_err)
    }

    /// Block map entries for logical blocks `b0..b1` (b0 < b1) of an object.
    fn block_refs(&self, okey: &[u8], b0: u32, b1: u32) -> Result<Vec<Option<BlockRef>>, ObjError> {
        Ok(self.map_span(okey, b0, b1)?.refs(b0, b1))
    }

    fn check_range(id: &ObjectId, offset: u64, len: u64) -> Result<(), ObjError> {
        if id.name.is_empty() || id.name.len() > u16::MAX as usize {
            return Err(ObjError::Invalid(
                "object name must be 1-65535 bytes".into(),
            ));
        }
        if len > MAX_IO_BYTES as u64 {
            return Err(ObjError::Invalid(format!(
                "I/O of {len} bytes exceeds {MAX_IO_BYTES}"
            )));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > MAX_OBJECT_BYTES)
        {
            return Err(ObjError::Invalid(format!(
                "range {offset}+{len} exceeds the object size limit of {MAX_OBJECT_BYTES} bytes"
            )));
        }
        Ok(())
    }

    fn check_version(
        id: &ObjectId,
        meta: Option<ObjMeta>,
        version: Version,
    ) -> Result<(), ObjError> {
        match meta {
            Some(m) if version < m.version => Err(ObjError::StaleVersion {
                object: id.to_string(),
                got: version,
                have: m.version,
            }),
            _ => Ok(()),
        }
    }
}

impl<D: BlockDevice> ObjectStore for BlockStore<D> {
    async fn write(
        &self,
        id: &ObjectId,
        offset: u64,
        data: impl Into<BlockData> + Send,
        version: Version,
    ) -> Result<(), ObjError> {
        self.write_object(id, offset, data.into(), version).await
    }

    async fn read(&self, id: &ObjectId, offset: u64, len: usize) -> Result<Bytes, ObjError> {
        Ok(self.read_data(id, offset, len).await?.into_bytes())
    }

    async fn read_data(
        &self,
        id: &ObjectId,
        offset: u64,
        len: usize,
    ) -> Result<BlockData, ObjError> {
        self.read_object(id, offset, len).await
    }

    async fn zero(
        &self,
        id: &ObjectId,
        offset: u64,
        len: u64,
        version: Version,
    ) -> Result<(), ObjError> {
        self.zero_range(id, offset, len, version).await
    }

    async fn allocated(
        &self,
        id: &ObjectId,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, ObjError> {
        self.allocated_ranges(id, offset, len).await
    }

    async fn stat(&self, id: &ObjectId) -> Result<Option<ObjectStat>, ObjError> {
        self.stat_object(id).await
    }

    async fn delete(&self, id: &ObjectId, version: Version) -> Result<bool, ObjError> {
        self.delete_object(id, version).await
    }

    async fn pg_log(
        &self,
        pool: u32,
        pg: u32,
        after: Option<Version>,
        limit: usize,
    ) -> Result<Vec<PgLogEntry>, ObjError> {
        self.read_pg_log(pool, pg, after, limit).await
    }

    async fn pg_log_head(&self, pool: u32, pg: u32) -> Result<Option<Version>, ObjError> {
        self.read_pg_log_head(pool, pg).await
    }

    async fn pg_state(&self, pool: u32, pg: u32) -> Result<PgCopyState, ObjError> {
        self.read_pg_state(pool, pg).await
    }

    async fn set_pg_state(&self, pool: u32, pg: u32, state: PgCopyState) -> Result<(), ObjError> {
        self.store_pg_state(pool, pg, state).await
    }

    async fn list(&self, pool: u32, pg: u32) -> Result<Vec<String>, ObjError> {
        self.list_objects(pool, pg).await
    }

    async fn pgs(&self) -> Result<Vec<(u32, u32)>, ObjError> {
        self.list_pgs().await
    }

    async fn remove_pg(&self, pool: u32, pg: u32, max_objects: usize) -> Result<bool, ObjError> {
        self.remove_pg_step(pool, pg, max_objects).await
    }

    fn usage(&self) -> Usage {
        let free = self.alloc.lock().map(|a| a.free_blocks()).unwrap_or(0);
        let data_blocks = self.dev.blocks().saturating_sub(self.first_data_block);
        Usage {
            total_bytes: data_blocks * BLOCK_SIZE as u64,
            used_bytes: data_blocks.saturating_sub(free) * BLOCK_SIZE as u64,
            objects: self.objects.load(Ordering::Relaxed),
            checksum_errors: self.checksum_errors.load(Ordering::Relaxed),
        }
    }
}
