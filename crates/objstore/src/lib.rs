//! The OSD's object store: objects on one data device, metadata in RocksDB.
//!
//! Owns: the data device (io_uring or pread/pwrite, O_DIRECT), block allocation, the block
//! map (object → device blocks, crc32c per 4 KiB block) and object metadata. It must not
//! know about placement, replication, peers or the network; the [`ObjectStore`] trait has no
//! RocksDB type in its signature so another metadata engine can sit behind it.
//!
//! Crash safety is copy-on-write: a write goes to free blocks, is durable (O_DSYNC) before
//! the metadata that points to it commits in one durable batch (through the commit journal
//! on the device, see [`journal`], or RocksDB's synced WAL in stores without one), and the
//! old blocks are freed only after that commit. A crash at any point leaves every block of an object
//! holding either its old or its new content. See docs/objstore.md.

pub mod aligned;
pub mod alloc;
mod blockmap;
mod cache;
pub mod device;
pub mod journal;
pub mod store;

use std::future::Future;

use bytes::Bytes;
use store_types::blockdata::BlockData;

pub use store::{BlockStore, Identity};

/// The unit of checksums, allocation and device I/O.
pub const BLOCK_SIZE: usize = 4096;
// Block crcs computed where a write enters the cluster are stored as they are.
const _: () = assert!(BLOCK_SIZE == store_types::wire::DATA_BLOCK_BYTES);
/// Largest object.
pub const MAX_OBJECT_BYTES: u64 = 64 << 20;
/// Entries kept per PG log (Ceph's osd_max_pg_log_entries is of this order).
pub const PG_LOG_MAX_ENTRIES: u64 = 3000;
/// Largest single read or write.
pub const MAX_IO_BYTES: usize = 16 << 20;

/// An object: its name within a placement group of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub pool: u32,
    pub pg: u32,
    pub name: String,
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:x}/{}", self.pool, self.pg, self.name)
    }
}

/// Version of an object: (map epoch, sequence in its PG), as the primary assigns it.
pub use store_types::osdmsg::ObjVersion as Version;
pub use store_types::osdmsg::{LogOp, PgCopyState, PgLogEntry};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub version: Version,
    /// Bytes of device space the object uses (thin: holes take none).
    pub allocated_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub objects: u64,
    /// Checksum mismatches seen by reads since the store was opened.
    pub checksum_errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjError {
    #[error("no space left on the device: need {need_blocks} blocks, {free_blocks} free")]
    NoSpace { need_blocks: u64, free_blocks: u64 },
    #[error("checksum mismatch in {object} block {block}: the copy on this device is damaged")]
    Checksum { object: String, block: u64 },
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("stale version {got:?} for {object}: it is at {have:?}")]
    StaleVersion {
        object: String,
        got: Version,
        have: Version,
    },
    #[error("device I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("metadata store: {0}")]
    Metadata(String),
    #[error("refusing to open: {0}")]
    Refused(String),
    /// The allocator refused to free blocks that are free already: the block map and the
    /// free space disagree. The store allocates nothing until it is opened again, which
    /// rebuilds the free space from the block map.
    #[error("free space corrupt: {0}; the store allocates nothing until it is opened again")]
    Alloc(#[from] alloc::AllocError),
}

/// What every object store backend provides. The conformance suite (tests/conformance.rs)
/// runs against each.
pub trait ObjectStore: Send + Sync + 'static {
    /// Writes `data` at `offset`, creating the object if needed; durable on return. Block
    /// crcs that come with the data (see [`BlockData`]) are stored as they are for the
    /// whole blocks they cover, not computed again.
    fn write(
        &self,
        id: &ObjectId,
        offset: u64,
        data: impl Into<BlockData> + Send,
        version: Version,
    ) -> impl Future<Output = Result<(), ObjError>> + Send;
    /// Reads up to `len` bytes at `offset` (short at the end of the object; holes are zeros).
    fn read(
        &self,
        id: &ObjectId,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Bytes, ObjError>> + Send;
    /// Like [`ObjectStore::read`], with the crc32c of each 4 KiB block of what is returned
    /// when the store has them at hand (those it verified the blocks against), so the
    /// reply's frame need not compute them again.
    fn read_data(
        &self,
        id: &ObjectId,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<BlockData, ObjError>> + Send {
        async move { self.read(id, offset, len).await.map(BlockData::from) }
    }
    /// Zeroes a range, freeing every whole block in it; durable on return.
    fn zero(
        &self,
        id: &ObjectId,
        offset: u64,
        len: u64,
        version: Version,
    ) -> impl Future<Output = Result<(), ObjError>> + Send;
    fn stat(
        &self,
        id: &ObjectId,
    ) -> impl Future<Output = Result<Option<ObjectStat>, ObjError>> + Send;
    /// Removes the object and frees its space; false if it did not exist.
    fn delete(
        &self,
        id: &ObjectId,
        version: Version,
    ) -> impl Future<Output = Result<bool, ObjError>> + Send;
    /// The PG's log after `after` (all kept entries when None), oldest first, at most `limit`.
    /// Every mutation appends one entry in the same atomic commit as the change itself; the
    /// newest [`PG_LOG_MAX_ENTRIES`] are kept.
    fn pg_log(
        &self,
        pool: u32,
        pg: u32,
        after: Option<Version>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<PgLogEntry>, ObjError>> + Send;
    /// The newest version in the PG's log.
    fn pg_log_head(
        &self,
        pool: u32,
        pg: u32,
    ) -> impl Future<Output = Result<Option<Version>, ObjError>> + Send;
    /// The allocated byte ranges (offset, length) of an object within `offset..offset+len`,
    /// at block granularity, clipped to the object's size; None if the object does not
    /// exist. Unallocated ranges read as zeros.
    fn allocated(
        &self,
        id: &ObjectId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Option<Vec<(u64, u64)>>, ObjError>> + Send;
    /// What this copy of a PG can be trusted for ([`PgCopyState::default`] if never set).
    fn pg_state(
        &self,
        pool: u32,
        pg: u32,
    ) -> impl Future<Output = Result<PgCopyState, ObjError>> + Send;
    /// Records the PG copy's state; durable on return.
    fn set_pg_state(
        &self,
        pool: u32,
        pg: u32,
        state: PgCopyState,
    ) -> impl Future<Output = Result<(), ObjError>> + Send;
    /// Names of a PG's objects, in order.
    fn list(
        &self,
        pool: u32,
        pg: u32,
    ) -> impl Future<Output = Result<Vec<String>, ObjError>> + Send;
    /// The PGs this store holds anything of (objects, log entries or a copy state), in
    /// order.
    fn pgs(&self) -> impl Future<Output = Result<Vec<(u32, u32)>, ObjError>> + Send;
    /// Removes a copy of a PG that this OSD no longer serves, in steps: up to
    /// `max_objects` of its objects per call (no log entries: the copy is going away),
    /// then, once none is left, its log and copy state. True when nothing of it is left.
    /// Callers mark the copy incomplete first, so a copy half removed is never trusted.
    fn remove_pg(
        &self,
        pool: u32,
        pg: u32,
        max_objects: usize,
    ) -> impl Future<Output = Result<bool, ObjError>> + Send;
    fn usage(&self) -> Usage;
}

/// A temp dir on the target dir's filesystem (tmpfs has no O_DIRECT) with a device file of
/// `size_bytes` (space reserved), and the path for the metadata dir.
#[cfg(test)]
pub(crate) fn test_store_paths(
    size_bytes: u64,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base).expect("tmp");
    let dev_path = tmp.path().join("dev.img");
    let db = tmp.path().join("db");
    device::create_file_device(&dev_path, size_bytes, device::FileFill::Reserve).expect("device");
    (tmp, dev_path, db)
}
