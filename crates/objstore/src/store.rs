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

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use store_types::blockdata::BlockData;
use store_types::wire::{decode_record, encode_record};
use tokio::sync::RwLock;

use crate::aligned::AlignedBuf;
use crate::alloc::{Allocator, Extent};
use crate::blockmap::{self, BlockRef, ChunkCache, MapSpan};
use crate::cache::GenCache;
use crate::device::BlockDevice;
use crate::journal::{CheckRun, Holds, Journal, JournalRegion};
use crate::{
    LogOp, ObjError, ObjectId, ObjectStat, ObjectStore, PgCopyState, PgLogEntry, Usage, Version,
    BLOCK_SIZE, MAX_IO_BYTES, MAX_OBJECT_BYTES, PG_LOG_MAX_ENTRIES,
};

const CF_META: &str = "meta";
const CF_OBJECTS: &str = "objects";
const CF_BLOCKS: &str = "blockmap";
const CF_LEGACY_BLOCKS: &str = "blocks";
const CF_PGLOG: &str = "pglog";
const CF_DEFERRED: &str = "deferred";
/// Writes of at most this many blocks are *deferred*, as BlueStore defers small writes:
/// their data goes into the same synced metadata commit as their block map (one flush),
/// while it is also written to its new (copy-on-write) blocks without a flush. A record
/// stays until a later device flush has made its blocks durable; at mount, the records
/// still there are written again (only where the block map still names that block with
/// that checksum). Larger writes are written, made durable by a device flush shared with
/// concurrent writers, then committed (two flushes in a row).
pub const DEFERRED_MAX_BLOCKS: usize = 16;
/// [`DEFERRED_MAX_BLOCKS`], or `STORE_DEFERRED_MAX_BLOCKS` from the environment (0: no
/// deferred writes), for benchmarks comparing the two paths.
fn deferred_max_blocks() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("STORE_DEFERRED_MAX_BLOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFERRED_MAX_BLOCKS)
    })
}

/// Device reads one object read keeps in flight when its blocks are fragmented.
const READ_RUNS_IN_FLIGHT: usize = 32;
/// Applied deferred writes that trigger a device flush and the removal of their records.
const DEFERRED_CLEAN_EVERY: usize = 64;
/// Trim a PG log only once it is this far over its bound, to batch the work.
const PG_LOG_TRIM_SLACK: u64 = 256;
const RECORD_V: u16 = 1;
const KEY_IDENTITY: &[u8] = b"identity";
/// The commit journal's head (see [`crate::journal`]); present exactly in stores with one.
const KEY_JOURNAL: &[u8] = b"journal";
const SUPERBLOCK_MAGIC: [u8; 8] = *b"STOREDEV";
/// The superblock magic of stores with a commit journal: a build from before journals
/// finds no superblock it knows and refuses the device, instead of mounting it without
/// replaying the journal and allocating the journal's blocks as data.
const SUPERBLOCK_MAGIC_JOURNAL: [u8; 8] = *b"STOREDJ1";
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

/// Who a device and its metadata belong to. Written to the superblock and to RocksDB at
/// creation; both must match at every open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub fsid: String,
    pub osd_uuid: String,
    pub device_blocks: u64,
}

/// A small write's data, durable in the metadata log until its blocks are flushed.
#[derive(Debug, Serialize, Deserialize)]
struct DeferredWrite {
    okey: Vec<u8>,
    /// The first logical block written.
    lblock: u32,
    /// The device block of each logical block, in order.
    device_blocks: Vec<u64>,
    /// Whole blocks.
    data: Bytes,
}

/// Where a small write's data goes, carried with its data as side data in the commit
/// journal (stores with a journal keep that data out of RocksDB).
#[derive(Debug, Serialize, Deserialize)]
struct DeferredPlace {
    okey: Vec<u8>,
    lblock: u32,
    device_blocks: Vec<u64>,
}

impl DeferredPlace {
    /// The journal side data of a write of `data` here: a u32 length, this record, then
    /// the data itself (passed as its own part, not copied here).
    fn side(&self, data: Bytes) -> Vec<Bytes> {
        let rec = encode_record(RECORD_V, self);
        let mut head = Vec::with_capacity(4 + rec.len());
        head.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        head.extend_from_slice(&rec);
        vec![Bytes::from(head), data]
    }

    fn from_side(side: &[u8]) -> Result<DeferredWrite, String> {
        let len = side
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or("short deferred side data")? as usize;
        let rec = side.get(4..4 + len).ok_or("short deferred side data")?;
        let place: DeferredPlace =
            decode_record(RECORD_V, rec).map_err(|e| format!("deferred side data: {e}"))?;
        Ok(DeferredWrite {
            okey: place.okey,
            lblock: place.lblock,
            device_blocks: place.device_blocks,
            data: Bytes::copy_from_slice(&side[4 + len..]),
        })
    }
}

/// What [`BlockStore::read_blocks`] found: one buffer per logical block (None for holes),
/// and the whole range as one buffer when a single device read covered every block.
struct BlocksRead {
    blocks: Vec<Option<Bytes>>,
    whole: Option<Bytes>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct ObjMeta {
    size: u64,
    version: Version,
}

pub struct BlockStore<D: BlockDevice> {
    dev: Arc<D>,
    db: Arc<DB>,
    alloc: Arc<Mutex<Allocator>>,
    locks: Vec<RwLock<()>>,
    objects: AtomicU64,
    checksum_errors: AtomicU64,
    /// Entries in each PG's log, counted on first use.
    log_len: Mutex<HashMap<(u32, u32), LogCount>>,
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
}

/// Group flush of the device: a flush makes durable every write that completed before it
/// started, so writers that wait while one runs share the next instead of queueing one
/// each (with `RWF_DSYNC`, each of eight concurrent 1 MiB writes asks for its own flush).
#[derive(Default)]
struct FlushGroup {
    /// Writes completed (and registered) so far; a write's number is the count after it.
    completed: AtomicU64,
    /// Every write numbered up to this is durable.
    durable: AtomicU64,
    /// Held while a flush runs: one at a time, and a waiter re-checks `durable` after it.
    running: tokio::sync::Mutex<()>,
}

/// How a store makes its metadata commits durable.
enum Committer<D: BlockDevice> {
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

impl<D: BlockDevice> Drop for BlockStore<D> {
    fn drop(&mut self) {
        // The journal's flush thread or the commit thread is joined here.
        self.committer.take();
    }
}

/// A batch to commit durably, and who waits for it.
type Commit = (WriteBatch, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Batches committed per sync at most.
const COMMIT_GROUP_MAX: usize = 64;

/// The commit thread: takes every batch waiting, writes them in arrival order into the
/// WAL's buffer (the WAL is flushed by hand, see [`open_db`]), then writes and syncs the
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

/// Deferred writes between their commit and their records' removal.
#[derive(Default)]
struct Deferred {
    /// Device block → its committed contents, until written to the device: reads take
    /// them from here.
    pending: HashMap<u64, Bytes>,
    /// Blocks freed while their deferred write was pending: freed once it is written
    /// (so a late write never lands on a block that was reused).
    free_when_written: std::collections::HashSet<u64>,
    /// Records (or journal hold ids) whose blocks are written (not yet flushed).
    applied: Vec<u64>,
    /// Records whose blocks are flushed: the next copy-on-write commit removes them in its
    /// batch (stores without a journal; with one, the hold ids are released instead). A
    /// removal lost with a failed commit or a crash only means the record is written
    /// again at the next mount, where the block map still names its blocks.
    flushed: Vec<u64>,
}

/// One deferred write to put on the device.
struct ApplyJob {
    seq: u64,
    blocks: Vec<(u64, Bytes)>,
}

/// Batches of deferred writes being written to the device at once.
const APPLY_IN_FLIGHT: usize = 32;
/// Deferred writes taken into one batch at most.
const APPLY_BATCH_JOBS: usize = 64;
/// Blocks per device write when a batch's adjacent blocks are merged.
const APPLY_MERGE_MAX_BLOCKS: usize = 256;
/// Deferred writes gathered before they go to the device as one batch: each batch's
/// completion wakes the runtime, and at QD1 that was one wake-up per write on every OSD.
/// 32 rather than 8: at QD32, 0.28 fewer device writes per client write (each a doorbell,
/// a trap to the hypervisor on a VM) and ~4% less daemon CPU per write (2026-12-02).
const APPLY_GATHER_JOBS: usize = 32;
/// How long gathered writes wait at most when no more come (their data is served from
/// memory meanwhile, and stays durable in its record).
const APPLY_GATHER_MAX_MS: u64 = 10;

/// Writes deferred data to its blocks (unflushed), then lets reads go to the device and
/// frees what waited for it. Runs until the store is dropped. Writes are gathered, up to
/// [`APPLY_GATHER_JOBS`] or for [`APPLY_GATHER_MAX_MS`], and go out as one batch, in
/// which adjacent blocks (small writes are allocated side by side) become one device
/// write. Once [`DEFERRED_CLEAN_EVERY`] records have their data on the device, it flushes
/// the device in the background (no write waits for that flush), after which the next
/// commit removes their records, or the journal's `holds` are released. When the journal
/// runs short of space it asks, and whatever is gathered or written is handled at once.
async fn apply_loop<D: BlockDevice>(
    dev: Arc<D>,
    state: Arc<Mutex<Deferred>>,
    alloc: Arc<Mutex<Allocator>>,
    holds: Option<Arc<Holds>>,
    mut rx: tokio::sync::mpsc::Receiver<ApplyJob>,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    /// Held journal entries are released by this task only: once it ends, for whatever
    /// reason, commits must fail rather than wait for space held by them.
    struct FailHolds(Option<Arc<Holds>>);
    impl Drop for FailHolds {
        fn drop(&mut self) {
            if let Some(h) = &self.0 {
                h.fail("the store's deferred-write task has stopped");
            }
        }
    }
    let _fail_holds = FailHolds(holds.clone());
    let mut running = FuturesUnordered::new();
    // At most one cleaning at a time; records applied meanwhile wait for the next.
    let mut cleaning = FuturesUnordered::new();
    let mut gathered: Vec<ApplyJob> = Vec::new();
    let gather_timer = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(gather_timer);
    let mut closed = false;
    // The journal asked for its held entries: no gathering, no waiting for a full round.
    let mut urgent = false;
    loop {
        let due = gathered.len() >= APPLY_GATHER_JOBS
            || ((closed || urgent) && !gathered.is_empty())
            || (!gathered.is_empty() && gather_timer.is_elapsed());
        if due && running.len() < APPLY_IN_FLIGHT {
            running.push(apply_batch(dev.clone(), std::mem::take(&mut gathered)));
            continue;
        }
        if closed && gathered.is_empty() {
            break;
        }
        if cleaning.is_empty() {
            let seqs = match state.lock() {
                Ok(mut st)
                    if st.applied.len() >= DEFERRED_CLEAN_EVERY
                        || (urgent && !st.applied.is_empty()) =>
                {
                    std::mem::take(&mut st.applied)
                }
                Ok(_) => Vec::new(),
                Err(_) => return,
            };
            if !seqs.is_empty() {
                urgent &= !(gathered.is_empty() && running.is_empty());
                cleaning.push(flush_applied(
                    dev.clone(),
                    state.clone(),
                    holds.clone(),
                    seqs,
                ));
            }
        }
        let pressured = async {
            match &holds {
                Some(h) => h.pressured().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(()) = cleaning.next(), if !cleaning.is_empty() => {}
            () = pressured => urgent = true,
            job = rx.recv(), if !closed && gathered.len() < APPLY_BATCH_JOBS => {
                let Some(job) = job else {
                    closed = true;
                    continue;
                };
                if gathered.is_empty() {
                    let at = tokio::time::Instant::now()
                        + std::time::Duration::from_millis(APPLY_GATHER_MAX_MS);
                    gather_timer.as_mut().reset(at);
                }
                gathered.push(job);
                while gathered.len() < APPLY_BATCH_JOBS {
                    match rx.try_recv() {
                        Ok(j) => gathered.push(j),
                        Err(_) => break,
                    }
                }
            }
            () = &mut gather_timer, if !gathered.is_empty() && !gather_timer.is_elapsed() => {}
            Some(done) = running.next(), if !running.is_empty() => {
                let Ok(mut st) = state.lock() else { return };
                for (job, ok) in done {
                    for (block, _) in &job.blocks {
                        if ok {
                            st.pending.remove(block);
                        }
                        if st.free_when_written.remove(block) {
                            if let Ok(mut a) = alloc.lock() {
                                a.free_extent(Extent { start: *block, len: 1 });
                            }
                        }
                    }
                    if ok {
                        st.applied.push(job.seq);
                    } else if let Some(h) = &holds {
                        // Its journal entry would stay held: the data is written from
                        // the journal at the next mount instead.
                        h.fail("writing a small write's data to its blocks failed");
                    }
                }
            }
        }
    }
    while running.next().await.is_some() {}
}

/// Flushes the device, making the applied deferred writes' blocks durable, then hands their
/// records to the next commit to remove (or releases their journal holds). If the flush
/// fails the records (or journal entries) stay, and are written again at the next mount.
async fn flush_applied<D: BlockDevice>(
    dev: Arc<D>,
    state: Arc<Mutex<Deferred>>,
    holds: Option<Arc<Holds>>,
    seqs: Vec<u64>,
) {
    if let Err(e) = dev.flush().await {
        tracing::error!(
            records = seqs.len(),
            "device flush failed; deferred records are kept and written again at the next start: {e}"
        );
        if let Some(h) = holds {
            h.fail(&format!("device flush failed: {e}"));
        }
        return;
    }
    match holds {
        Some(h) => h.release(&seqs),
        None => {
            if let Ok(mut st) = state.lock() {
                st.flushed.extend(seqs);
            }
        }
    }
}

/// Writes a batch of deferred writes, adjacent blocks merged; returns each job with
/// whether all of its blocks were written.
async fn apply_batch<D: BlockDevice>(dev: Arc<D>, jobs: Vec<ApplyJob>) -> Vec<(ApplyJob, bool)> {
    // (device block, job index, block index in the job), in device order.
    let mut order: Vec<(u64, usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| {
            job.blocks
                .iter()
                .enumerate()
                .map(move |(b, (db, _))| (*db, j, b))
        })
        .collect();
    order.sort_unstable();
    let mut runs: Vec<&[(u64, usize, usize)]> = Vec::new();
    let mut first = 0;
    for i in 1..=order.len() {
        let ends = i == order.len()
            || order[i].0 != order[i - 1].0 + 1
            || i - first == APPLY_MERGE_MAX_BLOCKS;
        if ends {
            runs.push(&order[first..i]);
            first = i;
        }
    }
    let writes = runs.iter().map(|run| {
        let parts: Vec<&[u8]> = run
            .iter()
            .map(|(_, j, b)| &jobs[*j].blocks[*b].1[..])
            .collect();
        let buf = AlignedBuf::concat(&parts);
        let dev = &dev;
        let start = run[0].0;
        async move { dev.write_lazy(start, buf).await }
    });
    let results = futures::future::join_all(writes).await;
    let mut ok = vec![true; jobs.len()];
    for (run, res) in runs.iter().zip(results) {
        if let Err(e) = res {
            tracing::error!(
                block = run[0].0,
                blocks = run.len(),
                "writing deferred data failed (the records are kept and written again at the next start): {e}"
            );
            for (_, j, _) in run.iter() {
                ok[*j] = false;
            }
        }
    }
    jobs.into_iter().zip(ok).collect()
}

/// The checks of blocks written over `extents`, in order, whose crcs are `crcs` (one per
/// block of the extents).
fn check_runs(extents: &[Extent], crcs: &[u32]) -> Vec<CheckRun> {
    debug_assert_eq!(
        extents.iter().map(|e| e.len as usize).sum::<usize>(),
        crcs.len()
    );
    let mut at = 0;
    extents
        .iter()
        .map(|e| {
            let n = (e.len as usize).min(crcs.len().saturating_sub(at));
            let run = CheckRun {
                start: e.start,
                crcs: crcs[at..at + n].to_vec(),
            };
            at += n;
            run
        })
        .collect()
}

fn meta_err(e: impl std::fmt::Display) -> ObjError {
    ObjError::Metadata(e.to_string())
}

fn object_key(id: &ObjectId) -> Vec<u8> {
    let mut k = pg_prefix(id.pool, id.pg);
    k.extend_from_slice(&(id.name.len() as u16).to_be_bytes());
    k.extend_from_slice(id.name.as_bytes());
    k
}

fn pg_prefix(pool: u32, pg: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(&pool.to_be_bytes());
    k.extend_from_slice(&pg.to_be_bytes());
    k
}

/// The superblock: magic, the identity record and, after it, the journal region record
/// (a zero length where there is none, as in superblocks written before journals).
fn superblock(identity: &Identity, journal: Option<JournalRegion>) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(1);
    let body = encode_record(RECORD_V, identity);
    let magic = match journal {
        Some(_) => SUPERBLOCK_MAGIC_JOURNAL,
        None => SUPERBLOCK_MAGIC,
    };
    buf[..8].copy_from_slice(&magic);
    buf[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    buf[12..12 + body.len()].copy_from_slice(&body);
    if let Some(region) = journal {
        let at = 12 + body.len();
        let rec = encode_record(RECORD_V, &region);
        buf[at..at + 4].copy_from_slice(&(rec.len() as u32).to_le_bytes());
        buf[at + 4..at + 4 + rec.len()].copy_from_slice(&rec);
    }
    let crc = crc32c::crc32c(&buf[..BLOCK_SIZE - 4]);
    buf[BLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn parse_superblock(buf: &[u8]) -> Result<(Identity, Option<JournalRegion>), String> {
    let journal_magic = buf[..8] == SUPERBLOCK_MAGIC_JOURNAL;
    if buf[..8] != SUPERBLOCK_MAGIC && !journal_magic {
        return Err(
            "no store superblock (not a device of this store, or never initialised)".into(),
        );
    }
    let crc = u32::from_le_bytes(
        buf[BLOCK_SIZE - 4..]
            .try_into()
            .map_err(|_| "short superblock")?,
    );
    if crc != crc32c::crc32c(&buf[..BLOCK_SIZE - 4]) {
        return Err("superblock checksum mismatch: the device header is damaged".into());
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().map_err(|_| "short superblock")?) as usize;
    if 12 + len > BLOCK_SIZE - 4 {
        return Err("superblock length field is out of range".into());
    }
    let identity = decode_record(RECORD_V, &buf[12..12 + len])
        .map_err(|e| format!("unreadable superblock: {e}"))?;
    let at = 12 + len;
    let jlen =
        u32::from_le_bytes(buf[at..at + 4].try_into().map_err(|_| "short superblock")?) as usize;
    if jlen == 0 && !journal_magic {
        return Ok((identity, None));
    }
    if jlen == 0 || !journal_magic {
        return Err(
            "superblock magic and journal record disagree: the device header is damaged".into(),
        );
    }
    if at + 4 + jlen > BLOCK_SIZE - 4 {
        return Err("superblock journal length field is out of range".into());
    }
    let region: JournalRegion = decode_record(RECORD_V, &buf[at + 4..at + 4 + jlen])
        .map_err(|e| format!("unreadable journal record in the superblock: {e}"))?;
    region.validate(identity.device_blocks)?;
    Ok((identity, Some(region)))
}

/// Bound on the live WAL files: beyond it, the column families holding the oldest one
/// flush so that it can be recycled.
const WAL_MAX_TOTAL_BYTES: u64 = 64 << 20;

/// Every column family, in the order they are opened.
const ALL_CFS: [&str; 6] = [
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
fn open_db(dir: &Path, create: bool, journal: bool) -> Result<DB, ObjError> {
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

fn dir_is_empty(dir: &Path) -> Result<bool, ObjError> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(ObjError::Refused(format!("{}: {e}", dir.display()))),
    }
}

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
        let handle = |name| {
            db.cf_handle(name)
                .ok_or_else(|| ObjError::Refused(format!("column family {name} is missing")))
        };
        let (blocks, legacy) = (handle(CF_BLOCKS)?, handle(CF_LEGACY_BLOCKS)?);
        let moved = blockmap::migrate_legacy(&db, legacy, blocks)
            .map_err(|e| ObjError::Refused(format!("moving the block map to chunks: {e}")))?;
        if moved > 0 {
            tracing::info!(
                records = moved,
                "moved the per-block block map into chunk records"
            );
        }
        let mut used = Vec::new();
        blockmap::for_each_device_block(&db, blocks, |b| {
            if b < first_data_block || b >= identity.device_blocks {
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
        let alloc = Arc::new(Mutex::new(Allocator::from_used(
            first_data_block,
            identity.device_blocks,
            used,
        )));
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
            log_len: Mutex::new(HashMap::new()),
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

    fn start_commit_thread(&self) -> Result<Committer<D>, ObjError> {
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

    /// Writes a deferred write's blocks that the block map still names with its checksums
    /// (a block since freed and reused must not be overwritten); returns how many.
    async fn rewrite_deferred(&self, rec: &DeferredWrite) -> Result<usize, ObjError> {
        let n = rec.device_blocks.len() as u32;
        if rec.data.len() != n as usize * BLOCK_SIZE {
            return Err(ObjError::Metadata(format!(
                "deferred write of {:?}: {} bytes for {n} blocks",
                rec.okey,
                rec.data.len()
            )));
        }
        let end = rec.lblock.checked_add(n).ok_or_else(|| {
            ObjError::Metadata(format!(
                "deferred write of {:?} ends past the largest block",
                rec.okey
            ))
        })?;
        let refs = self.block_refs(&rec.okey, rec.lblock, end)?;
        let mut written = 0;
        for (i, d) in rec.device_blocks.iter().enumerate() {
            let block = &rec.data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            let current =
                refs[i].is_some_and(|r| r.device_block == *d && r.crc == crc32c::crc32c(block));
            if current {
                self.dev
                    .write_lazy(*d, AlignedBuf::with_data(1, 0, block))
                    .await?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Writes every deferred write whose blocks the block map still names with the
    /// record's checksums (a block since freed and reused must not be overwritten), flushes
    /// the device, then drops the records. Continues sequence numbers after the newest.
    async fn replay_deferred(&self) -> Result<(), ObjError> {
        let cf = self
            .db
            .cf_handle(CF_DEFERRED)
            .expect("column family exists");
        let mut keys = Vec::new();
        let mut written = 0usize;
        let records: Vec<(Vec<u8>, Vec<u8>)> = self
            .db
            .iterator_cf(cf, IteratorMode::Start)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(meta_err))
            .collect::<Result<_, _>>()?;
        for (k, v) in records {
            let rec: DeferredWrite = decode_record(RECORD_V, &v).map_err(meta_err)?;
            written += self.rewrite_deferred(&rec).await?;
            keys.push(k);
        }
        if let Some(last) = keys.last() {
            let seq = u64::from_be_bytes(last[..8].try_into().map_err(meta_err)?);
            self.deferred_seq.store(seq + 1, Ordering::Relaxed);
            self.dev.flush().await?;
            let mut batch = WriteBatch::default();
            for k in &keys {
                batch.delete_cf(cf, k);
            }
            self.commit(batch).await?;
            tracing::info!(
                records = keys.len(),
                blocks = written,
                "wrote deferred data left by the last run again (its records outlive a stop until a flush covers them)"
            );
        }
        Ok(())
    }

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

    /// Reads mapped blocks and verifies every checksum. Device-contiguous runs are read as
    /// one request each, and the runs of a fragmented range are read concurrently (at most
    /// [`READ_RUNS_IN_FLIGHT`] at once). The blocks share the buffers they were read
    /// into: no copy here.
    async fn read_blocks(
        &self,
        id: &ObjectId,
        b0: u32,
        refs: &[Option<BlockRef>],
    ) -> Result<BlocksRead, ObjError> {
        let mut out: Vec<Option<Bytes>> = vec![None; refs.len()];
        // Blocks whose deferred write has not reached the device yet come from memory.
        let mut refs = refs.to_vec();
        {
            let d = self
                .deferred
                .lock()
                .map_err(|_| meta_err("deferred lock poisoned"))?;
            if !d.pending.is_empty() {
                for (i, r) in refs.iter_mut().enumerate() {
                    let Some(data) = r.and_then(|r| d.pending.get(&r.device_block)) else {
                        continue;
                    };
                    let want = r.map(|r| r.crc).unwrap_or(0);
                    if crc32c::crc32c(data) != want {
                        return Err(ObjError::Checksum {
                            object: id.to_string(),
                            block: (b0 as usize + i) as u64,
                        });
                    }
                    out[i] = Some(data.clone());
                    *r = None;
                }
            }
        }
        // (first logical index, blocks, first device block) of each contiguous run.
        let mut runs = Vec::new();
        let mut i = 0;
        while i < refs.len() {
            let Some(first) = refs[i] else {
                i += 1;
                continue;
            };
            let mut n = 1;
            while i + n < refs.len()
                && refs[i + n].is_some_and(|r| r.device_block == first.device_block + n as u64)
            {
                n += 1;
            }
            runs.push((i, n, first.device_block));
            i += n;
        }
        // In order, at most READ_RUNS_IN_FLIGHT at once (the pread backend spends a
        // blocking-pool thread on each).
        let bufs: Vec<AlignedBuf> = {
            use futures::stream::{StreamExt, TryStreamExt};
            let dev = &self.dev;
            let reads: Vec<(u64, usize)> = runs.iter().map(|&(_, n, b)| (b, n)).collect();
            futures::stream::iter(reads)
                .map(|(device_block, n)| dev.read(device_block, n))
                .buffered(READ_RUNS_IN_FLIGHT)
                .try_collect()
                .await?
        };
        let mut whole = None;
        for (&(i, n, _), buf) in runs.iter().zip(bufs) {
            for j in 0..n {
                let want = refs[i + j].map(|r| r.crc).unwrap_or(0);
                if crc32c::crc32c(buf.block(j)) != want {
                    self.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(object = %id, block = b0 as usize + i + j, "checksum mismatch on read");
                    return Err(ObjError::Checksum {
                        object: id.to_string(),
                        block: (b0 as usize + i + j) as u64,
                    });
                }
            }
            let buf = Bytes::from_owner(buf);
            for j in 0..n {
                out[i + j] = Some(buf.slice(j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE));
            }
            if n == refs.len() {
                whole = Some(buf);
            }
        }
        Ok(BlocksRead { blocks: out, whole })
    }

    /// Takes `n` blocks; `small` for a deferred write (see [`Allocator::alloc_small`]).
    fn alloc(&self, n: u64, small: bool) -> Result<Vec<Extent>, ObjError> {
        let mut a = self
            .alloc
            .lock()
            .map_err(|_| ObjError::Metadata("allocator lock poisoned".into()))?;
        let free = a.free_blocks();
        let got = if small { a.alloc_small(n) } else { a.alloc(n) };
        got.ok_or(ObjError::NoSpace {
            need_blocks: n,
            free_blocks: free,
        })
    }

    fn release(&self, extents: impl IntoIterator<Item = Extent>) {
        let Ok(mut d) = self.deferred.lock() else {
            return; // poisoned: leak the blocks rather than risk reusing them
        };
        // Blocks still pending a deferred write are freed once it is done; the rest go
        // back as runs (one allocator update per run, not per block).
        let mut runs: Vec<Extent> = Vec::new();
        for b in extents.into_iter().flat_map(|e| e.start..e.start + e.len) {
            if d.pending.contains_key(&b) {
                d.free_when_written.insert(b);
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.start + r.len == b => r.len += 1,
                _ => runs.push(Extent { start: b, len: 1 }),
            }
        }
        let extents = runs;
        drop(d);
        if let Ok(mut a) = self.alloc.lock() {
            for e in extents {
                a.free_extent(e);
            }
        }
    }

    /// Commits a batch durably: through the journal, or the commit thread in stores
    /// without one (both group concurrent commits).
    async fn commit(&self, batch: WriteBatch) -> Result<(), ObjError> {
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
    async fn commit_written(
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

    /// Writes new contents for logical blocks `b0..` (copy-on-write) and commits the block
    /// map, the object metadata and the PG log entry in one batch. Small writes are
    /// deferred (see [`DEFERRED_MAX_BLOCKS`]): their data rides in the commit, and the
    /// device write runs alongside it, unflushed. Either way, both are done on return.
    /// `map` is the object's block map loaded over (at least) the blocks written;
    /// `known_crcs`, the crcs of the first blocks of `contents` if known.
    async fn cow_commit(
        &self,
        okey: &[u8],
        b0: u32,
        contents: AlignedBuf,
        mut map: MapSpan,
        change: Change<'_>,
        known_crcs: &[u32],
    ) -> Result<(), ObjError> {
        let n = contents.blocks() as u64;
        let old = map.refs(b0, b0 + n as u32);
        let deferred = contents.blocks() <= deferred_max_blocks();
        let extents = self.alloc(n, deferred)?;
        let crcs: Vec<u32> = (0..contents.blocks())
            .map(|i| match known_crcs.get(i) {
                Some(&crc) => {
                    debug_assert_eq!(crc, crc32c::crc32c(contents.block(i)), "block {i}");
                    crc
                }
                None => crc32c::crc32c(contents.block(i)),
            })
            .collect();
        let blocks_cf = self.db.cf_handle(CF_BLOCKS).expect("column family exists");
        let objects_cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let mut batch = WriteBatch::default();
        let device_blocks: Vec<u64> = extents
            .iter()
            .flat_map(|e| e.start..e.start + e.len)
            .collect();
        for (i, (crc, device_block)) in crcs.iter().zip(&device_blocks).enumerate() {
            let r = BlockRef {
                device_block: *device_block,
                crc: *crc,
            };
            if let Err(e) = map.set(b0 + i as u32, Some(r)) {
                self.release(extents);
                return Err(meta_err(e));
            }
        }
        map.write(&mut batch, blocks_cf, okey);
        self.remove_flushed_records(&mut batch)?;
        batch.put_cf(objects_cf, okey, encode_record(RECORD_V, &change.meta));
        if let Some(op) = change.log {
            self.log_into(&mut batch, change.id, change.meta.version, op)?;
        }
        // Set once the commit is sent: its failure may still have left it durable (a
        // journal entry or WAL record on the device that the next mount applies), so the
        // new blocks must not be reused before that mount.
        let mut commit_sent = false;
        let res = if deferred {
            commit_sent = true;
            self.commit_deferred(batch, okey, b0, device_blocks, contents)
                .await
        } else {
            match self.write_extents(&extents, contents, false).await {
                Ok(()) => {
                    let checks = check_runs(&extents, &crcs);
                    self.commit_written(batch, checks, &mut commit_sent).await
                }
                Err(e) => Err(e),
            }
        };
        self.meta_committed(okey, &res, Some(change.meta));
        if let Err(e) = res {
            map.failed(&self.map_cache, okey);
            if !commit_sent {
                self.release(extents);
            }
            return Err(e);
        }
        map.committed(&self.map_cache, okey);
        if change.created {
            self.objects.fetch_add(1, Ordering::Relaxed);
        }
        let freed = old.iter().flatten().map(|r| Extent {
            start: r.device_block,
            len: 1,
        });
        self.release(freed);
        Ok(())
    }

    /// Commits a deferred write's `batch` with its data. With a journal, the data rides in
    /// the journal entry as side data, kept out of RocksDB, and goes to its blocks at once
    /// (they are new: nothing names them until the commit), released once flushed; the
    /// write task has it before the commit, so a caller that gives up cannot strand the
    /// journal's hold. Without one, the data is a record in the batch, and goes to its
    /// blocks after the commit. Either way readers find it in memory until it is written.
    async fn commit_deferred(
        &self,
        mut batch: WriteBatch,
        okey: &[u8],
        lblock: u32,
        device_blocks: Vec<u64>,
        contents: AlignedBuf,
    ) -> Result<(), ObjError> {
        let seq = self.deferred_seq.fetch_add(1, Ordering::Relaxed);
        // The write's buffer itself backs the record and the pending blocks.
        let data = Bytes::from_owner(contents);
        let blocks: Vec<(u64, Bytes)> = device_blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, data.slice(i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE)))
            .collect();
        // Readers find the data here from the moment the block map can name these blocks
        // (this write holds the object's lock until then).
        self.deferred
            .lock()
            .map_err(|_| meta_err("deferred lock poisoned"))?
            .pending
            .extend(blocks.iter().cloned());
        let journal = match &self.committer {
            Some(Committer::Journal(j)) => Some(j),
            _ => None,
        };
        let res = match journal {
            Some(j) => {
                let place = DeferredPlace {
                    okey: okey.to_vec(),
                    lblock,
                    device_blocks,
                };
                let res = match self.apply_tx.send(ApplyJob { seq, blocks }).await {
                    Ok(()) => j
                        .commit_with(batch, place.side(data), Some(seq))
                        .await
                        .map_err(meta_err),
                    Err(_) => Err(meta_err("the deferred write task has stopped")),
                };
                res.map_err(|e| (e, place.device_blocks))
            }
            None => {
                let rec = DeferredWrite {
                    okey: okey.to_vec(),
                    lblock,
                    device_blocks,
                    data,
                };
                let cf = (self.db.cf_handle(CF_DEFERRED))
                    .ok_or_else(|| meta_err("the deferred column family is missing"))?;
                batch.put_cf(cf, seq.to_be_bytes(), encode_record(RECORD_V, &rec));
                match self.commit(batch).await {
                    Ok(()) => self
                        .apply_tx
                        .send(ApplyJob { seq, blocks })
                        .await
                        .map_err(|_| (meta_err("the deferred write task has stopped"), Vec::new())),
                    Err(e) => Err((e, blocks.into_iter().map(|(b, _)| b).collect())),
                }
            }
        };
        res.map_err(|(e, blocks)| {
            if let Ok(mut d) = self.deferred.lock() {
                for b in &blocks {
                    d.pending.remove(b);
                }
            }
            e
        })
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

    /// Adds the removal of the deferred records whose blocks are flushed to `batch`.
    fn remove_flushed_records(&self, batch: &mut WriteBatch) -> Result<(), ObjError> {
        let seqs = std::mem::take(
            &mut self
                .deferred
                .lock()
                .map_err(|_| meta_err("deferred lock poisoned"))?
                .flushed,
        );
        if !seqs.is_empty() {
            let cf = self
                .db
                .cf_handle(CF_DEFERRED)
                .ok_or_else(|| meta_err("the deferred column family is missing"))?;
            for seq in seqs {
                batch.delete_cf(cf, seq.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Writes `contents` over the extents in order, durably or not.
    async fn write_extents(
        &self,
        extents: &[Extent],
        contents: AlignedBuf,
        durable: bool,
    ) -> Result<(), ObjError> {
        let write = |start, buf| async move {
            if durable {
                self.dev.write(start, buf).await
            } else {
                self.dev.write_lazy(start, buf).await
            }
        };
        if extents.len() == 1 {
            write(extents[0].start, contents).await?;
            return Ok(());
        }
        let mut at = 0usize;
        for e in extents {
            let piece = contents.blocks_of(at, e.len as usize);
            write(e.start, piece).await?;
            at += e.len as usize;
        }
        Ok(())
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

/// What this store knows of one PG's log without reading it: its length (to trim it), and
/// its newest key, so that appending a newer version needs no lookup to learn whether it
/// replaces an entry.
#[derive(Default)]
struct LogCount {
    entries: u64,
    newest: Option<Vec<u8>>,
}

/// What a copy-on-write commit records besides the block map.
struct Change<'a> {
    id: &'a ObjectId,
    meta: ObjMeta,
    created: bool,
    /// The PG log entry to append in the same batch (None for partial steps of one op).
    log: Option<LogOp>,
}

const PG_STATE_PREFIX: &[u8] = b"pgstate/";

/// Key of a PG copy's state in the meta column family.
fn pg_state_key(pool: u32, pg: u32) -> Vec<u8> {
    let mut k = PG_STATE_PREFIX.to_vec();
    k.extend_from_slice(&pg_prefix(pool, pg));
    k
}

fn log_key(pool: u32, pg: u32, v: Version) -> Vec<u8> {
    let mut k = pg_prefix(pool, pg);
    k.extend_from_slice(&v.epoch.to_be_bytes());
    k.extend_from_slice(&v.seq.to_be_bytes());
    k
}

impl<D: BlockDevice> BlockStore<D> {
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

    /// Adds a PG log entry to `batch`, and trims the PG's log in the same batch once it is
    /// over its bound.
    fn log_into(
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
}

/// Logical blocks `b0..b1` covering `offset..offset+len` (len > 0).
/// The crc32c of a block of zeros (a hole reads as one).
fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK_SIZE]))
}

fn block_span(offset: u64, len: u64) -> (u32, u32) {
    let bs = BLOCK_SIZE as u64;
    ((offset / bs) as u32, (offset + len).div_ceil(bs) as u32)
}

impl<D: BlockDevice> ObjectStore for BlockStore<D> {
    async fn write(
        &self,
        id: &ObjectId,
        offset: u64,
        data: impl Into<BlockData> + Send,
        version: Version,
    ) -> Result<(), ObjError> {
        let data: BlockData = data.into();
        Self::check_range(id, offset, data.len() as u64)?;
        let okey = object_key(id);
        let _guard = self.lock(&okey).write().await;
        let meta = self.get_meta(&okey)?;
        Self::check_version(id, meta, version)?;
        let end = offset + data.len() as u64;
        let new_meta = ObjMeta {
            size: meta.map_or(end, |m| m.size.max(end)),
            version,
        };
        if data.is_empty() {
            let cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
            let mut batch = WriteBatch::default();
            batch.put_cf(cf, &okey, encode_record(RECORD_V, &new_meta));
            self.log_into(&mut batch, id, version, LogOp::Write { offset, len: 0 })?;
            let res = self.commit(batch).await;
            self.meta_committed(&okey, &res, Some(new_meta));
            res?;
            if meta.is_none() {
                self.objects.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        let (b0, b1) = block_span(offset, data.len() as u64);
        let map = self.map_span(&okey, b0, b1)?;
        let old = map.refs(b0, b1);
        let start = (offset - b0 as u64 * BLOCK_SIZE as u64) as usize;
        let stop = start + data.len();
        // Whole blocks that arrived at an aligned address go to the device as they are.
        let mut contents = if start == 0 && data.len().is_multiple_of(BLOCK_SIZE) {
            AlignedBuf::shared(data.bytes().clone())
                .unwrap_or_else(|b| AlignedBuf::with_data((b1 - b0) as usize, 0, &b))
        } else {
            AlignedBuf::with_data((b1 - b0) as usize, start, &data)
        };
        // Partial edge blocks keep their other bytes: read, verify, merge what the new
        // data does not cover.
        let head_partial = !offset.is_multiple_of(BLOCK_SIZE as u64);
        let tail_partial = !end.is_multiple_of(BLOCK_SIZE as u64);
        let last = (b1 - b0 - 1) as usize;
        for (i, partial) in [(0usize, head_partial), (last, tail_partial)] {
            if partial && old[i].is_some() {
                let got = self.read_blocks(id, b0 + i as u32, &old[i..=i]).await?;
                if let Some(b) = &got.blocks[0] {
                    let base = i * BLOCK_SIZE;
                    for r in [
                        base..start.max(base),
                        stop.min(base + BLOCK_SIZE)..base + BLOCK_SIZE,
                    ] {
                        if r.start < r.end {
                            contents[r.clone()].copy_from_slice(&b[r.start - base..r.end - base]);
                        }
                    }
                }
            }
        }
        let change = Change {
            id,
            meta: new_meta,
            created: meta.is_none(),
            log: Some(LogOp::Write {
                offset,
                len: data.len() as u64,
            }),
        };
        // The data's block i is block b0 + i here when it starts on a block boundary; a
        // partial last block also holds old bytes, so its crc is computed.
        let known_crcs = match data.block_crcs() {
            Some(crcs) if start == 0 => &crcs[..data.len() / BLOCK_SIZE],
            _ => &[],
        };
        self.cow_commit(&okey, b0, contents, map, change, known_crcs)
            .await
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
        Self::check_range(
            id,
            offset.min(MAX_OBJECT_BYTES),
            len.min(MAX_IO_BYTES) as u64,
        )?;
        let okey = object_key(id);
        let _guard = self.lock(&okey).read().await;
        let meta = self
            .get_meta(&okey)?
            .ok_or_else(|| ObjError::NotFound(id.to_string()))?;
        if offset >= meta.size || len == 0 {
            return Ok(BlockData::default());
        }
        let len = (len.min(MAX_IO_BYTES) as u64).min(meta.size - offset);
        let (b0, b1) = block_span(offset, len);
        let refs = self.block_refs(&okey, b0, b1)?;
        let got = self.read_blocks(id, b0, &refs).await?;
        let start = (offset - b0 as u64 * BLOCK_SIZE as u64) as usize;
        let bytes = match got.whole {
            // One device read covered the range: hand out its buffer as it is.
            Some(whole) => whole.slice(start..start + len as usize),
            None => {
                let mut out = BytesMut::zeroed(((b1 - b0) as usize) * BLOCK_SIZE);
                for (i, b) in got.blocks.iter().enumerate() {
                    if let Some(b) = b {
                        out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].copy_from_slice(b);
                    }
                }
                out.freeze().slice(start..start + len as usize)
            }
        };
        // Only a reply large enough to carry its data as a frame's data region uses the
        // crcs: a small read allocates nothing for them.
        if start != 0 || bytes.len() < store_types::wire::SEND_IN_PLACE_BYTES {
            return Ok(bytes.into());
        }
        // The crcs the blocks were just verified against (a hole's is a zero block's); a
        // short last block, cut at the end of the object, gets its own.
        let whole_blocks = bytes.len() / BLOCK_SIZE;
        let mut crcs: Vec<u32> = (refs[..whole_blocks].iter())
            .map(|r| r.map_or_else(zero_block_crc, |r| r.crc))
            .collect();
        if whole_blocks * BLOCK_SIZE < bytes.len() {
            crcs.push(crc32c::crc32c(&bytes[whole_blocks * BLOCK_SIZE..]));
        }
        Ok(BlockData::with_block_crcs(bytes, crcs))
    }

    async fn zero(
        &self,
        id: &ObjectId,
        offset: u64,
        len: u64,
        version: Version,
    ) -> Result<(), ObjError> {
        // Zeroing is not bounded by the I/O size (it moves no data): only by the object's.
        Self::check_range(id, offset, 0)?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > MAX_OBJECT_BYTES)
        {
            return Err(ObjError::Invalid(
                "zero range beyond the object size limit".into(),
            ));
        }
        let okey = object_key(id);
        let _guard = self.lock(&okey).write().await;
        let meta = self.get_meta(&okey)?;
        Self::check_version(id, meta, version)?;
        let end = offset + len;
        let new_meta = ObjMeta {
            size: meta.map_or(end, |m| m.size.max(end)),
            version,
        };
        let (b0, b1) = if len == 0 {
            (0, 0)
        } else {
            block_span(offset, len)
        };
        let refs = if len == 0 {
            Vec::new()
        } else {
            self.block_refs(&okey, b0, b1)?
        };
        let bs = BLOCK_SIZE as u64;
        // Whole blocks are unmapped (freed); partial edge blocks that hold data are rewritten.
        let mut deletes = Vec::new();
        let mut edges = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let b = b0 + i as u32;
            let (bstart, bend) = (b as u64 * bs, (b as u64 + 1) * bs);
            let Some(r) = r else { continue };
            if offset <= bstart && end >= bend {
                deletes.push((b, *r));
            } else {
                edges.push((b, *r, offset.max(bstart) - bstart, end.min(bend) - bstart));
            }
        }
        for (b, r, from, to) in edges {
            let got = self.read_blocks(id, b, &[Some(r)]).await?;
            let mut contents = AlignedBuf::zeroed(1);
            if let Some(data) = &got.blocks[0] {
                contents.copy_from_slice(data);
            }
            contents[from as usize..to as usize].fill(0);
            // Edge blocks commit under the object's old version: only the final batch
            // (whole-block deletes, new version, PG log entry) marks the zero as done, so a
            // crash in between leaves an object that recovery sees as not yet changed.
            let Some(old_meta) = meta else {
                return Err(ObjError::Metadata(format!(
                    "{id}: block map entries without object metadata"
                )));
            };
            let change = Change {
                id,
                meta: old_meta,
                created: false,
                log: None,
            };
            // Loaded now: the edge committed before this one changed the map.
            let map = self.map_span(&okey, b, b + 1)?;
            self.cow_commit(&okey, b, contents, map, change, &[])
                .await?;
        }
        let blocks_cf = self.db.cf_handle(CF_BLOCKS).expect("column family exists");
        let objects_cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let mut batch = WriteBatch::default();
        let map = if deletes.is_empty() {
            None
        } else {
            let mut map = self.map_span(&okey, b0, b1)?;
            for (b, _) in &deletes {
                map.set(*b, None).map_err(meta_err)?;
            }
            map.write(&mut batch, blocks_cf, &okey);
            Some(map)
        };
        batch.put_cf(objects_cf, &okey, encode_record(RECORD_V, &new_meta));
        self.log_into(&mut batch, id, version, LogOp::Zero { offset, len })?;
        let res = self.commit(batch).await;
        self.meta_committed(&okey, &res, Some(new_meta));
        if let Some(map) = &map {
            match &res {
                Ok(()) => map.committed(&self.map_cache, &okey),
                Err(_) => map.failed(&self.map_cache, &okey),
            }
        }
        res?;
        if meta.is_none() {
            self.objects.fetch_add(1, Ordering::Relaxed);
        }
        self.release(deletes.iter().map(|(_, r)| Extent {
            start: r.device_block,
            len: 1,
        }));
        Ok(())
    }

    async fn allocated(
        &self,
        id: &ObjectId,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, ObjError> {
        let okey = object_key(id);
        let _guard = self.lock(&okey).read().await;
        let Some(meta) = self.get_meta(&okey)? else {
            return Ok(None);
        };
        let end = offset.saturating_add(len).min(meta.size);
        if offset >= end {
            return Ok(Some(Vec::new()));
        }
        let (b0, b1) = block_span(offset, end - offset);
        let refs = self.block_refs(&okey, b0, b1)?;
        let bs = BLOCK_SIZE as u64;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            if r.is_none() {
                continue;
            }
            let start = ((b0 as u64 + i as u64) * bs).max(offset);
            let stop = ((b0 as u64 + i as u64 + 1) * bs).min(end);
            match runs.last_mut() {
                Some((o, l)) if *o + *l == start => *l += stop - start,
                _ => runs.push((start, stop - start)),
            }
        }
        Ok(Some(runs))
    }

    async fn stat(&self, id: &ObjectId) -> Result<Option<ObjectStat>, ObjError> {
        let okey = object_key(id);
        let _guard = self.lock(&okey).read().await;
        let Some(meta) = self.get_meta(&okey)? else {
            return Ok(None);
        };
        let (_, b1) = block_span(0, meta.size);
        let allocated = self
            .block_refs(&okey, 0, b1.max(1))?
            .iter()
            .flatten()
            .count() as u64;
        Ok(Some(ObjectStat {
            size: meta.size,
            version: meta.version,
            allocated_bytes: allocated * BLOCK_SIZE as u64,
        }))
    }

    async fn delete(&self, id: &ObjectId, version: Version) -> Result<bool, ObjError> {
        let okey = object_key(id);
        let _guard = self.lock(&okey).write().await;
        let Some(meta) = self.get_meta(&okey)? else {
            return Ok(false);
        };
        Self::check_version(id, Some(meta), version)?;
        let (_, b1) = block_span(0, meta.size);
        let refs = self.block_refs(&okey, 0, b1.max(1))?;
        let blocks_cf = self.db.cf_handle(CF_BLOCKS).expect("column family exists");
        let objects_cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let mut batch = WriteBatch::default();
        blockmap::delete_object(&mut batch, blocks_cf, &okey);
        batch.delete_cf(objects_cf, &okey);
        self.log_into(&mut batch, id, version, LogOp::Delete)?;
        let res = self.commit(batch).await;
        self.map_cache.forget_object(&okey, b1);
        self.meta_committed(&okey, &res, None);
        res?;
        self.objects.fetch_sub(1, Ordering::Relaxed);
        self.release(refs.iter().flatten().map(|r| Extent {
            start: r.device_block,
            len: 1,
        }));
        Ok(true)
    }

    async fn pg_log(
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

    async fn pg_log_head(&self, pool: u32, pg: u32) -> Result<Option<Version>, ObjError> {
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

    async fn pg_state(&self, pool: u32, pg: u32) -> Result<PgCopyState, ObjError> {
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

    async fn set_pg_state(&self, pool: u32, pg: u32, state: PgCopyState) -> Result<(), ObjError> {
        let cf = self.db.cf_handle(CF_META).expect("column family exists");
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, pg_state_key(pool, pg), encode_record(RECORD_V, &state));
        self.commit(batch).await
    }

    async fn list(&self, pool: u32, pg: u32) -> Result<Vec<String>, ObjError> {
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

    async fn pgs(&self) -> Result<Vec<(u32, u32)>, ObjError> {
        let mut out = std::collections::BTreeSet::new();
        for cf in [CF_OBJECTS, CF_PGLOG] {
            let cf = self.db.cf_handle(cf).expect("column family exists");
            out.extend(self.pg_prefixes(cf, &[])?);
        }
        let meta = self.db.cf_handle(CF_META).expect("column family exists");
        out.extend(self.pg_prefixes(meta, PG_STATE_PREFIX)?);
        Ok(out.into_iter().collect())
    }

    async fn remove_pg(&self, pool: u32, pg: u32, max_objects: usize) -> Result<bool, ObjError> {
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
            self.log_len
                .lock()
                .map_err(|_| meta_err("log lock poisoned"))?
                .remove(&(pool, pg));
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
            let res = self.commit(batch).await;
            self.map_cache.forget_object(&okey, b1);
            self.meta_committed(&okey, &res, None);
            res?;
            self.objects.fetch_sub(1, Ordering::Relaxed);
            self.release(refs.iter().flatten().map(|r| Extent {
                start: r.device_block,
                len: 1,
            }));
        }
        Ok(false)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::file::FileDevice;
    use crate::test_store_paths;

    /// `writes` 4 KiB writes over seven objects, each object's blocks in turn.
    async fn small_writes(store: &BlockStore<FileDevice>, writes: usize) {
        for i in 0..writes {
            let id = ObjectId {
                pool: 1,
                pg: 0,
                name: format!("o{}", i % 7),
            };
            let data = Bytes::from(vec![i as u8; BLOCK_SIZE]);
            let version = Version {
                epoch: 1,
                seq: i as u64 + 1,
            };
            store
                .write(&id, (i / 7 * BLOCK_SIZE) as u64, data, version)
                .await
                .expect("write");
        }
    }

    fn deferred_records(store: &BlockStore<FileDevice>) -> usize {
        let cf = store
            .db
            .cf_handle(CF_DEFERRED)
            .expect("column family exists");
        store
            .db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .count()
    }

    /// A file device whose durable writes (the journal's) fail while `fail` is set.
    struct FailingWrites {
        dev: FileDevice,
        fail: Arc<std::sync::atomic::AtomicBool>,
        /// Fails writes without a flush (small writes' data going to its blocks).
        fail_lazy: Arc<std::sync::atomic::AtomicBool>,
    }

    impl BlockDevice for FailingWrites {
        fn blocks(&self) -> u64 {
            self.dev.blocks()
        }
        async fn read(&self, start: u64, blocks: usize) -> std::io::Result<AlignedBuf> {
            self.dev.read(start, blocks).await
        }
        async fn write(&self, start: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("injected write error"));
            }
            self.dev.write(start, buf).await
        }
        async fn write_lazy(&self, start: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
            if self.fail_lazy.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("injected lazy write error"));
            }
            self.dev.write_lazy(start, buf).await
        }
        async fn flush(&self) -> std::io::Result<()> {
            self.dev.flush().await
        }
    }

    type Flag = Arc<std::sync::atomic::AtomicBool>;

    /// A new store on a device whose durable writes (first flag) or lazy writes (second)
    /// fail while the flag is set.
    async fn failing_store(
        dev_path: &std::path::Path,
        db: &std::path::Path,
    ) -> (BlockStore<FailingWrites>, Flag, Flag) {
        let (fail, fail_lazy) = (Flag::default(), Flag::default());
        let dev = FailingWrites {
            dev: FileDevice::open(dev_path).expect("open device"),
            fail: fail.clone(),
            fail_lazy: fail_lazy.clone(),
        };
        let store = BlockStore::create(dev, db, "fsid", "osd")
            .await
            .expect("create");
        (store, fail, fail_lazy)
    }

    fn named(n: &str) -> ObjectId {
        ObjectId {
            pool: 1,
            pg: 0,
            name: n.into(),
        }
    }

    fn version(seq: u64) -> Version {
        Version { epoch: 1, seq }
    }

    /// A small write whose data never reaches its blocks (the device refuses the write)
    /// is still acknowledged, since its journal entry holds the data; later commits fail
    /// instead of waiting for that entry to be released; the store opened again writes
    /// the data from the journal.
    #[tokio::test]
    async fn a_failed_block_write_fails_later_commits_and_the_journal_restores_it() {
        let (_tmp, dev_path, db) = test_store_paths(16 << 20);
        let (store, _, fail_lazy) = failing_store(&dev_path, &db).await;
        let (id, v) = (named, version);
        fail_lazy.store(true, Ordering::Relaxed);
        let data = Bytes::from(vec![7u8; BLOCK_SIZE]);
        store
            .write(&id("a"), 0, data.clone(), v(1))
            .await
            .expect("journaled: acknowledged");
        let mut refused = false;
        for seq in 2..200 {
            let small = Bytes::from(vec![1u8; BLOCK_SIZE]);
            if store.write(&id("b"), 0, small, v(seq)).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(refused, "commits go on failing, not hanging");
        drop(store);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
        assert_eq!(
            store.read(&id("a"), 0, BLOCK_SIZE).await.expect("read"),
            data,
            "written from the journal"
        );
    }

    /// A 256-block journal fills with held entries many times over (sequential 64 KiB
    /// writes, far fewer than a cleaning round each lap): writers wait for the held data to
    /// be flushed and released, never forever, and everything reads back after a reopen.
    #[tokio::test]
    async fn a_small_journal_full_of_held_entries_makes_room() {
        let (_tmp, dev_path, db) = test_store_paths(16 << 20);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = BlockStore::create(dev, &db, "fsid", "osd")
            .await
            .expect("create");
        let bytes = DEFERRED_MAX_BLOCKS * BLOCK_SIZE;
        let id = |i: u64| ObjectId {
            pool: 1,
            pg: 0,
            name: format!("o{}", i % 5),
        };
        let data = |i: u64| Bytes::from(vec![i as u8; bytes]);
        let writes = async {
            for i in 0..150u64 {
                let version = Version {
                    epoch: 1,
                    seq: i + 1,
                };
                store
                    .write(&id(i), 0, data(i), version)
                    .await
                    .expect("write");
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), writes)
            .await
            .expect("the journal made room");
        drop(store);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
        for i in 145..150 {
            let got = store.read(&id(i), 0, bytes).await.expect("read");
            assert_eq!(got, data(i), "object {}", i % 5);
        }
    }

    /// With a journal, small writes' data never goes into RocksDB, and the journal entries
    /// holding it are released in rounds as it is flushed on its blocks.
    #[tokio::test]
    async fn small_writes_stay_out_of_rocksdb_and_their_entries_are_released() {
        let (_tmp, dev_path, db) = test_store_paths(64 << 20);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = BlockStore::create(dev, &db, "fsid", "osd")
            .await
            .expect("create");
        let writes = 3 * DEFERRED_CLEAN_EVERY + 8;
        small_writes(&store, writes).await;
        assert_eq!(deferred_records(&store), 0, "no data records in RocksDB");
        let held = || match &store.committer {
            Some(Committer::Journal(j)) => j.held_entries(),
            _ => panic!("a 64 MiB store has a journal"),
        };
        let mut left = held();
        for _ in 0..200 {
            if left <= DEFERRED_CLEAN_EVERY {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            left = held();
        }
        assert!(
            left <= DEFERRED_CLEAN_EVERY,
            "{left} of {writes} entries still held"
        );
    }

    /// A failed journal write fails its commit and every later one (nothing unjournaled is
    /// acknowledged), and the store opened again holds exactly what was acknowledged.
    #[tokio::test]
    async fn a_failed_journal_write_fails_commits_until_reopened() {
        let (_tmp, dev_path, db) = test_store_paths(16 << 20);
        let (store, fail, _) = failing_store(&dev_path, &db).await;
        let (id, v) = (named, version);
        let kept = Bytes::from(vec![1u8; BLOCK_SIZE]);
        store
            .write(&id("a"), 0, kept.clone(), v(1))
            .await
            .expect("write");
        fail.store(true, Ordering::Relaxed);
        let lost = Bytes::from(vec![2u8; BLOCK_SIZE]);
        let err = store.write(&id("a"), 0, lost, v(2)).await;
        assert!(
            err.is_err(),
            "a write whose journal entry failed is not acknowledged"
        );
        fail.store(false, Ordering::Relaxed);
        let later = store.write(&id("b"), 0, kept.clone(), v(1)).await;
        assert!(
            later.is_err(),
            "commits fail until the store is opened again"
        );
        drop(store);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
        assert_eq!(
            store.read(&id("a"), 0, BLOCK_SIZE).await.expect("read"),
            kept
        );
        assert!(store.stat(&id("b")).await.expect("stat").is_none());
        store
            .write(&id("b"), 0, kept.clone(), v(1))
            .await
            .expect("write after reopen");
    }

    /// Superblocks with and without a journal round-trip; one whose magic and journal
    /// record disagree, or whose journal does not fit the device, is refused (never taken
    /// for a store without a journal, which would skip the replay).
    #[test]
    fn superblocks_name_their_journal_exactly() {
        let identity = Identity {
            fsid: "f".into(),
            osd_uuid: "u".into(),
            device_blocks: 1 << 20,
        };
        let region = JournalRegion::for_device(identity.device_blocks).expect("4 GiB");
        assert_eq!(
            parse_superblock(&superblock(&identity, None)),
            Ok((identity.clone(), None))
        );
        assert_eq!(
            parse_superblock(&superblock(&identity, Some(region))),
            Ok((identity.clone(), Some(region)))
        );
        let reseal = |buf: &mut AlignedBuf| {
            let crc = crc32c::crc32c(&buf[..BLOCK_SIZE - 4]);
            buf[BLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        };
        // The old magic over a journal record, and the journal magic without one.
        let mut mixed = superblock(&identity, Some(region));
        mixed[..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        reseal(&mut mixed);
        assert!(parse_superblock(&mixed).is_err());
        let mut bare = superblock(&identity, None);
        bare[..8].copy_from_slice(&SUPERBLOCK_MAGIC_JOURNAL);
        reseal(&mut bare);
        assert!(parse_superblock(&bare).is_err());
        // A journal that does not fit the device.
        let small = Identity {
            device_blocks: region.blocks,
            ..identity.clone()
        };
        assert!(parse_superblock(&superblock(&small, Some(region))).is_err());
    }

    /// Concurrent 64 KiB deferred writes on a 16 MiB device (a 256-block journal, whose
    /// entries hold 64 blocks at most): the queued commits are split into entries that fit,
    /// every write succeeds, and all read back after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_concurrent_commits_are_split_into_entries_that_fit() {
        let (_tmp, dev_path, db) = test_store_paths(16 << 20);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = Arc::new(
            BlockStore::create(dev, &db, "fsid", "osd")
                .await
                .expect("create"),
        );
        assert!(store.first_data_block > 1, "a 16 MiB device gets a journal");
        let id = |i: usize| ObjectId {
            pool: 1,
            pg: 0,
            name: format!("o{i}"),
        };
        let bytes = DEFERRED_MAX_BLOCKS * BLOCK_SIZE;
        let data = |round: usize, i: usize| Bytes::from(vec![(round * 16 + i) as u8; bytes]);
        for round in 0..3 {
            let writes = (0..16).map(|i| {
                let store = store.clone();
                let version = Version {
                    epoch: 1,
                    seq: round as u64 + 1,
                };
                let (id, data) = (id(i), data(round, i));
                tokio::spawn(async move { store.write(&id, 0, data, version).await })
            });
            for w in futures::future::join_all(writes).await {
                w.expect("task").expect("write");
            }
        }
        let store = Arc::into_inner(store).expect("the only handle");
        drop(store);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
        for i in 0..16 {
            let got = store.read(&id(i), 0, bytes).await.expect("read");
            assert_eq!(got, data(2, i), "object {i}");
        }
    }

    /// Applied deferred writes are flushed in the background, in rounds of
    /// DEFERRED_CLEAN_EVERY, and later commits remove their records; the data stays
    /// readable (a store without a journal: with one there are no records).
    #[tokio::test]
    async fn applied_deferred_records_are_removed_in_the_background() {
        let (_tmp, dev_path, db) = test_store_paths(64 << 20);
        let dev = FileDevice::open(&dev_path).expect("open device");
        let store = BlockStore::create_with(dev, &db, "fsid", "osd", false)
            .await
            .expect("create");
        let writes = 3 * DEFERRED_CLEAN_EVERY + 8;
        small_writes(&store, writes).await;
        // Removals ride in later commits: keep writing (another object) while waiting.
        let mut left = deferred_records(&store);
        for n in 0..200u64 {
            if left < DEFERRED_CLEAN_EVERY {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let id = ObjectId {
                pool: 1,
                pg: 0,
                name: "later".into(),
            };
            let version = Version {
                epoch: 1,
                seq: writes as u64 + n + 1,
            };
            let data = Bytes::from(vec![0u8; BLOCK_SIZE]);
            store.write(&id, 0, data, version).await.expect("write");
            left = deferred_records(&store);
        }
        assert!(
            left < DEFERRED_CLEAN_EVERY,
            "{left} of {writes} deferred records are still there"
        );
        for i in (0..writes).step_by(13) {
            let id = ObjectId {
                pool: 1,
                pg: 0,
                name: format!("o{}", i % 7),
            };
            let got = store
                .read(&id, (i / 7 * BLOCK_SIZE) as u64, BLOCK_SIZE)
                .await
                .expect("read");
            assert!(
                got.iter().all(|b| *b == i as u8),
                "write {i} reads back wrong"
            );
        }
    }
}
