//! Creating a store, and opening one: the checks that device and metadata belong
//! together, the journal's replay, the allocator rebuilt from the block map, and the
//! small writes' data written again where it may be missing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use rocksdb::{IteratorMode, WriteOptions, DB};
use store_types::wire::{decode_record, encode_record};
use tokio::sync::RwLock;

use super::commit::{Committer, FlushGroup};
use super::db::{dir_is_empty, open_db, ALL_CFS};
use super::deferred::{apply_loop, Deferred, APPLY_IN_FLIGHT};
use super::format::{
    parse_superblock, superblock, DeferredPlace, Identity, KEY_IDENTITY, KEY_JOURNAL, RECORD_V,
    SUPERBLOCK_MAGIC, SUPERBLOCK_MAGIC_JOURNAL,
};
use super::{
    meta_err, BlockStore, CF_BLOCKS, CF_LEGACY_BLOCKS, CF_META, CF_OBJECTS, LOCK_STRIPES,
    MAP_CACHE_CHUNKS, META_CACHE_OBJECTS,
};
use crate::aligned::AlignedBuf;
use crate::alloc::Allocator;
use crate::blockmap::{self, ChunkCache};
use crate::cache::GenCache;
use crate::device::BlockDevice;
use crate::journal::{Holds, Journal, JournalRegion};
use crate::{ObjError, PG_LOG_MAX_ENTRIES};

impl<D: BlockDevice> BlockStore<D> {
    /// Initialises a new store: writes the superblock and creates the metadata store in the
    /// (missing or empty) `db_dir`. Refuses to overwrite a device that already has a
    /// superblock or a non-empty `db_dir`.
    pub async fn create(
        dev: D,
        db_dir: &Path,
        fsid: &str,
        osd_uuid: &str,
    ) -> Result<Self, ObjError> {
        Self::create_with(dev, db_dir, fsid, osd_uuid, true).await
    }

    /// [`Self::create`], with a commit journal if `journal` and the device is large enough
    /// (see [`JournalRegion::for_device`]), else committing through RocksDB's synced WAL.
    pub async fn create_with(
        dev: D,
        db_dir: &Path,
        fsid: &str,
        osd_uuid: &str,
        journal: bool,
    ) -> Result<Self, ObjError> {
        if !dir_is_empty(db_dir)? {
            return Err(ObjError::Refused(format!(
                "{} is not empty: refusing to create a new store over it",
                db_dir.display()
            )));
        }
        let head = dev.read(0, 1).await?;
        if head[..8] == SUPERBLOCK_MAGIC || head[..8] == SUPERBLOCK_MAGIC_JOURNAL {
            return Err(ObjError::Refused(
                "the device already holds a store (superblock present); refusing to overwrite it"
                    .into(),
            ));
        }
        let identity = Identity {
            fsid: fsid.to_string(),
            osd_uuid: osd_uuid.to_string(),
            device_blocks: dev.blocks(),
        };
        std::fs::create_dir_all(db_dir)
            .map_err(|e| ObjError::Refused(format!("{}: {e}", db_dir.display())))?;
        let region = journal
            .then(|| JournalRegion::for_device(identity.device_blocks))
            .flatten();
        let db = open_db(db_dir, true, region.is_some())?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let cf = db
            .cf_handle(CF_META)
            .ok_or_else(|| meta_err("the meta column family is missing"))?;
        db.put_cf_opt(cf, KEY_IDENTITY, encode_record(RECORD_V, &identity), &wo)
            .map_err(meta_err)?;
        if let Some(r) = region {
            Journal::<D>::initialise(&db, CF_META, KEY_JOURNAL).map_err(meta_err)?;
            // Written once over: on a file-backed device whose space is only reserved, the
            // first write of each block also converts its extent (a metadata update synced
            // with every journal write of the first lap).
            const CHUNK_BLOCKS: u64 = 256;
            let mut at = r.start;
            while at < r.end() {
                let n = CHUNK_BLOCKS.min(r.end() - at);
                dev.write_lazy(at, AlignedBuf::zeroed(n as usize)).await?;
                at += n;
            }
            dev.flush().await?;
        }
        dev.write(0, superblock(&identity, region)).await?;
        Self::mount(dev, db, &identity, region).await
    }

    /// Opens an existing store, checking that device and metadata belong together and to
    /// cluster `fsid`.
    pub async fn open(dev: D, db_dir: &Path, fsid: &str) -> Result<Self, ObjError> {
        if dir_is_empty(db_dir)? {
            return Err(ObjError::Refused(format!(
                "metadata dir {} is missing or empty: the device's metadata is gone; refusing to start",
                db_dir.display()
            )));
        }
        let head = dev.read(0, 1).await?;
        let (on_device, region) = parse_superblock(&head).map_err(ObjError::Refused)?;
        let db = open_db(db_dir, false, region.is_some())?;
        let cf = db
            .cf_handle(CF_META)
            .expect("opened with this column family");
        let bytes = db
            .get_cf(cf, KEY_IDENTITY)
            .map_err(meta_err)?
            .ok_or_else(|| ObjError::Refused("metadata store has no identity record".into()))?;
        let in_db: Identity = decode_record(RECORD_V, &bytes)
            .map_err(|e| ObjError::Refused(format!("unreadable identity record: {e}")))?;
        if in_db != on_device {
            return Err(ObjError::Refused(format!(
                "device and metadata do not belong together (device: {on_device:?}, metadata: {in_db:?})"
            )));
        }
        if in_db.fsid != fsid {
            return Err(ObjError::Refused(format!(
                "store belongs to cluster {}, not {fsid}",
                in_db.fsid
            )));
        }
        if in_db.device_blocks != dev.blocks() {
            return Err(ObjError::Refused(format!(
                "device has {} blocks but was created with {}",
                dev.blocks(),
                in_db.device_blocks
            )));
        }
        let has_head = db.get_cf(cf, KEY_JOURNAL).map_err(meta_err)?.is_some();
        if has_head != region.is_some() {
            return Err(ObjError::Refused(format!(
                "device and metadata disagree about the commit journal (superblock: {region:?}, journal head in metadata: {has_head})"
            )));
        }
        Self::mount(dev, db, &in_db, region).await
    }

    /// Rebuilds the allocator from the block map, counts objects and writes the deferred
    /// writes that may not have reached the device.
    async fn mount(
        dev: D,
        db: DB,
        identity: &Identity,
        journal: Option<JournalRegion>,
    ) -> Result<Self, ObjError> {
        let dev = Arc::new(dev);
        let db = Arc::new(db);
        // First the journal: what it holds is newer than anything RocksDB has.
        let recovered = match journal {
            Some(region) => Some(
                Journal::recover(&*dev, &db, region, CF_META, KEY_JOURNAL)
                    .await
                    .map_err(|e| ObjError::Refused(format!("commit journal: {e}")))?,
            ),
            None => None,
        };
        let first_data_block = journal.map_or(1, |r| r.end());
        let (alloc, objects) = load_block_map(&db, first_data_block, identity.device_blocks)?;
        let alloc = Arc::new(Mutex::new(alloc));
        let deferred = Arc::new(Mutex::new(Deferred::default()));
        let holds = recovered.as_ref().map(|_| Arc::new(Holds::default()));
        let (apply_tx, apply_rx) = tokio::sync::mpsc::channel(4 * APPLY_IN_FLIGHT);
        tokio::spawn(apply_loop(
            dev.clone(),
            deferred.clone(),
            alloc.clone(),
            holds.clone(),
            apply_rx,
        ));
        let mut store = BlockStore {
            dev,
            db,
            alloc,
            locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            objects: AtomicU64::new(objects),
            checksum_errors: AtomicU64::new(0),
            log_slots: Mutex::new(HashMap::new()),
            log_max: PG_LOG_MAX_ENTRIES,
            deferred_seq: AtomicU64::new(0),
            deferred,
            apply_tx,
            first_data_block,
            journal_replayed: 0,
            committer: None,
            flushes: FlushGroup::default(),
            map_cache: ChunkCache::new(MAP_CACHE_CHUNKS),
            meta_cache: GenCache::new(META_CACHE_OBJECTS),
            #[cfg(test)]
            log_scan_hook: None,
        };
        store.committer = Some(match (recovered, journal, holds) {
            (Some(recovered), Some(region), Some(holds)) => {
                store.start_journal(recovered, region, holds).await?
            }
            _ => store.start_commit_thread()?,
        });
        store.replay_deferred().await?;
        Ok(store)
    }

    /// Writes the side data of the journal's held entries where the block map still names
    /// it (as [`Self::replay_deferred`] does with records), makes it durable, then starts
    /// the journal (whose new head no longer points at that data).
    async fn start_journal(
        &mut self,
        recovered: crate::journal::Recovered,
        region: JournalRegion,
        holds: Arc<Holds>,
    ) -> Result<Committer<D>, ObjError> {
        let mut written = 0;
        for side in &recovered.sides {
            let rec = DeferredPlace::from_side(side)
                .map_err(|e| ObjError::Refused(format!("commit journal: {e}")))?;
            written += self.rewrite_deferred(&rec).await?;
        }
        if !recovered.sides.is_empty() {
            self.dev.flush().await?;
        }
        let (entries, sides) = (recovered.replayed.entries, recovered.sides.len());
        let cfs = ALL_CFS.iter().map(|c| c.to_string()).collect();
        let (j, replayed) = Journal::start(
            recovered,
            self.dev.clone(),
            self.db.clone(),
            region,
            cfs,
            CF_META,
            KEY_JOURNAL,
            holds,
        )
        .map_err(|e| ObjError::Refused(format!("commit journal: {e}")))?;
        self.journal_replayed = replayed.batches;
        if entries > 0 || sides > 0 {
            tracing::info!(
                entries,
                commits = replayed.batches,
                deferred_writes = sides,
                blocks = written,
                "applied commits from the journal that the metadata store had not flushed, and wrote the small writes' data it held"
            );
        }
        Ok(Committer::Journal(j))
    }
}

/// Moves a per-block block map into chunks (stores written before them), then rebuilds
/// the allocator from the block map (every block it does not name is free; data blocks
/// are `first_data_block..device_blocks`) and counts the objects.
fn load_block_map(
    db: &DB,
    first_data_block: u64,
    device_blocks: u64,
) -> Result<(Allocator, u64), ObjError> {
    let handle = |name| {
        db.cf_handle(name)
            .ok_or_else(|| ObjError::Refused(format!("column family {name} is missing")))
    };
    let (blocks, legacy) = (handle(CF_BLOCKS)?, handle(CF_LEGACY_BLOCKS)?);
    let moved = blockmap::migrate_legacy(db, legacy, blocks)
        .map_err(|e| ObjError::Refused(format!("moving the block map to chunks: {e}")))?;
    if moved > 0 {
        tracing::info!(
            records = moved,
            "moved the per-block block map into chunk records"
        );
    }
    let mut used = Vec::new();
    blockmap::for_each_device_block(db, blocks, |b| {
        if b < first_data_block || b >= device_blocks {
            return Err(format!("block map points outside the device (block {b})"));
        }
        used.push(b);
        Ok(())
    })
    .map_err(ObjError::Refused)?;
    let objects_cf = db
        .cf_handle(CF_OBJECTS)
        .expect("opened with this column family");
    let objects = db.iterator_cf(objects_cf, IteratorMode::Start).count() as u64;
    let alloc = Allocator::from_used(first_data_block, device_blocks, used);
    Ok((alloc, objects))
}
