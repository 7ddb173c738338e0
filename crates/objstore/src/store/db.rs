//! Opening the metadata store: its column families and RocksDB's options.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use super::{CF_BLOCKS, CF_DEFERRED, CF_LEGACY_BLOCKS, CF_META, CF_OBJECTS, CF_PGLOG};
use crate::ObjError;

/// Bound on the live WAL files: beyond it, the column families holding the oldest one
/// flush so that it can be recycled.
const WAL_MAX_TOTAL_BYTES: u64 = 64 << 20;

/// Every column family, in the order they are opened.
pub(super) const ALL_CFS: [&str; 6] = [
    CF_META,
    CF_OBJECTS,
    CF_BLOCKS,
    CF_LEGACY_BLOCKS,
    CF_PGLOG,
    CF_DEFERRED,
];

/// Opens the metadata store; `journal`: the store commits through its journal (see
/// [`crate::journal`]), so RocksDB's WAL carries almost nothing and every flush must cover
/// all column families at once.
pub(super) fn open_db(dir: &Path, create: bool, journal: bool) -> Result<DB, ObjError> {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.set_keep_log_file_num(4);
    // A store from before a column family existed gets it (empty) at its next open.
    opts.create_missing_column_families(true);
    if journal {
        // Commits reach RocksDB with its WAL disabled; what SST files hold must then be a
        // prefix of the commits, whichever family filled first.
        opts.set_atomic_flush(true);
    } else {
        // Every commit is a synced WAL append. Recycled WAL files are overwritten in
        // place, so once warm an fdatasync has no file size to journal (one device flush,
        // not two). Point-in-time recovery is what recycling needs; synced writes are all
        // recovered. (RocksDB refuses unlogged writes with recycling.)
        opts.set_recycle_log_file_num(4);
    }
    // A WAL file is only recycled once every column family with data in it has flushed.
    // The deferred-data family switches memtables every few seconds under load while the
    // small ones would hold theirs for hundreds of MB of WAL: without a bound every switch
    // starts a brand-new file, and each synced append to it must also write its inode
    // (an extra device write before every commit's flush).
    opts.set_max_total_wal_size(WAL_MAX_TOTAL_BYTES);
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
    // WAL appends stay in RocksDB's buffer until the commit thread writes and syncs them,
    // once per group: otherwise every batch of a group costs its own `write` system call.
    // Synced writes still flush the buffer first.
    opts.set_manual_wal_flush(true);
    opts.set_max_background_jobs(2);
    // Point lookups (object metadata, block map) skip SST files through bloom filters;
    // one block cache serves every column family.
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let cf_opts = || {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_block_cache(&cache);
        let mut o = Options::default();
        o.set_block_based_table_factory(&table);
        o.set_write_buffer_size(16 << 20);
        // Memtables get a bloom filter too: a point lookup skips the memtables that do
        // not hold its key instead of searching each skiplist.
        o.set_memtable_prefix_bloom_ratio(0.1);
        o.set_memtable_whole_key_filtering(true);
        o
    };
    let cfs = ALL_CFS
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, cf_opts()));
    DB::open_cf_descriptors(&opts, dir, cfs)
        .map_err(|e| ObjError::Refused(format!("metadata store {}: {e}", dir.display())))
}

pub(super) fn dir_is_empty(dir: &Path) -> Result<bool, ObjError> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(ObjError::Refused(format!("{}: {e}", dir.display()))),
    }
}
