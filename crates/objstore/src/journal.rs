//! The store's commit journal: a ring of blocks at the front of the data device, written
//! with O_DIRECT and `RWF_DSYNC` through the device's io_uring, that makes metadata
//! batches durable instead of RocksDB's synced WAL.
//!
//! Why: a synced RocksDB commit is a hand-off to a thread that calls `fdatasync` on the
//! WAL file, which sleeps once for the data write, once for the device flush and often once
//! more for the file's metadata: four or five thread switches per commit, each ~15-30 µs
//! of CPU on a small VM, and the latency of every one of them. A journal write is one
//! device write (the kernel adds the flush, or uses FUA) whose completion wakes the runtime
//! once. See docs/objstore.md, "The commit journal".
//!
//! How: a commit's `WriteBatch` (RocksDB's own encoding) is written into the journal as
//! part of an entry, then applied to RocksDB's memtables with the WAL disabled. Concurrent
//! commits form one entry (group commit): while one entry is being written, new batches
//! queue, and the next entry takes them all. RocksDB runs with `atomic_flush`, so its SST
//! files always hold a prefix of the applied batches, and every entry's last batch records
//! the journal head (generation, last sequence, where the next entry goes). At mount the
//! entries after the head found in RocksDB are applied again, in order, up to the first
//! block that is not the expected entry (a torn or never-written one: its commits were
//! never acknowledged). Space comes back when a memtable flush covers the entries before
//! the replay start it recorded.
//!
//! Entry layout, in whole blocks: `[magic 8][header length u16][header][crc32c of the
//! preceding bytes u32]`, zero padding to 64 bytes, then the payload: per commit, the
//! batch's bytes and then its side data, each after a u32 length (version 1 entries,
//! written before side data existed, hold batches only). The header (a versioned postcard record) carries the
//! journal's id, generation, sequence, block count and payload checksum. Every mount
//! starts a new generation, so an entry left from an earlier run is never mistaken for a
//! new one, and the id (random, in the superblock) keeps out entries of an earlier store
//! on the same device. Batches name column families by RocksDB's ids, which are fixed when
//! a family is created: a family must never be dropped and created again.
//!
//! Side data: a commit may carry bytes that go into its entry but not into RocksDB (a
//! small write's data, which the store writes to its blocks without a flush) and a hold
//! id. The entry stays *held* until the store has released every id in it, saying that
//! data is durable elsewhere ([`Holds::release`]; an id may be released before its entry
//! is written): the head records the oldest held entry (`data_from`), replay
//! reads from there (side data only, for entries RocksDB already has) and the space is
//! not reused before a head naming a later start is flushed. This keeps 4 KiB of data per
//! small write out of the memtables, their flushes and compactions.
//!
//! Limits: memtable applies run on the runtime thread, so a RocksDB write stall (flushes
//! falling behind) blocks it; and a leader task whose callers all gave up keeps the
//! metadata store open until its entry is done.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use rocksdb::{FlushOptions, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use store_types::wire::{decode_record, encode_record};
use tokio::sync::{oneshot, Notify};

use crate::aligned::AlignedBuf;
use crate::device::BlockDevice;
use crate::BLOCK_SIZE;

const ENTRY_MAGIC: [u8; 8] = *b"STJRNL01";
/// Bytes before an entry's payload: magic, header length, header, header checksum.
const HEADER_AREA: usize = 64;
/// Entries of version 1 hold batches only; version 2 entries hold (batch, side data) pairs;
/// version 3 entries add, after the pairs, the checks of their unflushed data.
const ENTRY_V1: u16 = 1;
const ENTRY_V2: u16 = 2;
const ENTRY_V: u16 = 3;
/// The version of an entry's list of [`CheckRun`]s.
const CHECKS_V: u16 = 1;
const HEAD_V1: u16 = 1;
const HEAD_V: u16 = 2;
/// Batches in one entry at most.
const GROUP_MAX_BATCHES: usize = 64;
/// Smallest and largest journal, in blocks (1 MiB and 64 MiB).
const MIN_BLOCKS: u64 = 256;
const MAX_BLOCKS: u64 = 16 << 10;

/// Where the journal lives on the device (in blocks), and its id. Recorded in the
/// superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRegion {
    pub start: u64,
    pub blocks: u64,
    /// Random, chosen at creation and in every entry: entries left on a reused device by
    /// an earlier store are never taken for this one's.
    pub id: u64,
}

impl JournalRegion {
    /// The journal a new store gets: right after the superblock, 1/16 of the device
    /// between 1 MiB and 64 MiB. None for a device under 16 MiB (it commits through
    /// RocksDB's WAL instead).
    pub fn for_device(device_blocks: u64) -> Option<JournalRegion> {
        use std::hash::{BuildHasher, Hasher};
        let blocks = (device_blocks / 16).min(MAX_BLOCKS);
        // SipHash with the process's random keys: a random u64 without another crate.
        let id = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        (blocks >= MIN_BLOCKS).then_some(JournalRegion {
            start: 1,
            blocks,
            id,
        })
    }

    /// Checks a region read from a superblock against a device of `device_blocks`.
    pub fn validate(&self, device_blocks: u64) -> Result<(), String> {
        let sized = (MIN_BLOCKS..=MAX_BLOCKS).contains(&self.blocks);
        let inside = self.start >= 1
            && self
                .start
                .checked_add(self.blocks)
                .is_some_and(|end| end <= device_blocks);
        if sized && inside {
            Ok(())
        } else {
            Err(format!(
                "journal region {self:?} is not a valid journal on a device of {device_blocks} blocks"
            ))
        }
    }

    /// The first block after the journal (a validated region's cannot overflow).
    pub fn end(&self) -> u64 {
        self.start + self.blocks
    }

    /// The device block of logical journal block `logical` (logical blocks only grow;
    /// lap `n` covers `n * blocks ..`).
    fn device_block(&self, logical: u64) -> u64 {
        self.start + logical % self.blocks
    }

    /// Where an entry of `n` blocks goes when the next free logical block is `next`: there,
    /// or at the start of the next lap when it would run past the region's end (entries
    /// never wrap).
    fn place(&self, next: u64, n: u64) -> u64 {
        let off = next % self.blocks;
        if off + n > self.blocks {
            next.saturating_add(self.blocks - off)
        } else {
            next
        }
    }

    /// Largest entry in blocks: a quarter of the journal, so that an entry always fits
    /// once the flush of what precedes it has freed the space.
    fn max_entry_blocks(&self) -> u64 {
        self.blocks / 4
    }
}

/// The journal head, stored in RocksDB with every entry's last batch: the generation of
/// the run that wrote it, the last entry applied and the logical block where the next
/// entry goes (or the start of the next lap, when the entry did not fit before the end),
/// and where replay must start reading side data: the oldest held entry (its sequence
/// and logical block), or `seq + 1` at `next` when none is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHead {
    pub gen: u64,
    pub seq: u64,
    pub next: u64,
    pub data_seq: u64,
    pub data_from: u64,
}

/// A head as version 1 wrote it (no side data).
#[derive(Deserialize)]
struct JournalHeadV1 {
    gen: u64,
    seq: u64,
    next: u64,
}

impl JournalHead {
    pub fn encode(&self) -> Vec<u8> {
        encode_record(HEAD_V, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<JournalHead, String> {
        let head: JournalHead = match decode_record::<JournalHeadV1>(HEAD_V1, bytes) {
            Ok(v1) => JournalHead {
                gen: v1.gen,
                seq: v1.seq,
                next: v1.next,
                data_seq: v1.seq.saturating_add(1),
                data_from: v1.next,
            },
            Err(_) => {
                decode_record(HEAD_V, bytes).map_err(|e| format!("unreadable journal head: {e}"))?
            }
        };
        let ordered = head.data_seq <= head.seq.saturating_add(1) && head.data_from <= head.next;
        if !ordered {
            return Err(format!(
                "journal head {head:?}: its side data starts after its last entry"
            ));
        }
        Ok(head)
    }

    /// The head of an entry `seq` ending before `next`, given the oldest held entry.
    fn with_holds(gen: u64, seq: u64, next: u64, oldest: Option<(u64, u64)>) -> JournalHead {
        let (data_seq, data_from) = match oldest {
            Some((s, at)) if s <= seq => (s, at.min(next)),
            _ => (seq.saturating_add(1), next),
        };
        JournalHead {
            gen,
            seq,
            next,
            data_seq,
            data_from,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct EntryHeader {
    journal_id: u64,
    gen: u64,
    seq: u64,
    blocks: u32,
    payload_bytes: u32,
    payload_crc: u32,
}

/// Blocks of an entry holding batches of `payload_bytes` (lengths included).
fn entry_blocks(payload_bytes: usize) -> u64 {
    (HEADER_AREA + payload_bytes).div_ceil(BLOCK_SIZE) as u64
}

/// One commit in an entry: a `WriteBatch`'s bytes and its side data (in parts, written
/// one after the other; empty when there is none).
type Item<'a> = (&'a [u8], &'a [Bytes]);

/// Blocks a commit's batch names whose data was written to the device but not flushed:
/// `crcs[i]` is the crc32c of device block `start + i`. The journal write's own flush
/// (RWF_DSYNC) makes that data durable with the entry, so such a commit needs no flush
/// of its own before it; replay checks them for the last entry (see [`Journal::recover`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRun {
    pub start: u64,
    pub crcs: Vec<u32>,
}

/// Payload bytes of `item`, lengths included.
fn item_bytes((batch, side): &Item<'_>) -> usize {
    8 + batch.len() + side.iter().map(|p| p.len()).sum::<usize>()
}

/// At most the encoded size of `checks` (varints: a block number takes at most 10 bytes,
/// a crc or a length 5), its length field included.
fn checks_bytes_bound(checks: &[CheckRun]) -> usize {
    16 + checks.iter().map(|c| 15 + 5 * c.crcs.len()).sum::<usize>()
}

/// Encodes one entry holding `items`, in whole blocks: per item, the batch and then the
/// side data, each after its u32 length; then `checks` (a versioned record) after its
/// length.
fn encode_entry(
    journal_id: u64,
    gen: u64,
    seq: u64,
    items: &[Item<'_>],
    checks: &[CheckRun],
) -> AlignedBuf {
    let checks = encode_record(CHECKS_V, &checks);
    let payload_bytes: usize = items.iter().map(item_bytes).sum::<usize>() + 4 + checks.len();
    let blocks = entry_blocks(payload_bytes) as usize;
    let mut buf = AlignedBuf::zeroed(blocks);
    let mut at = HEADER_AREA;
    for (batch, side) in items {
        buf[at..at + 4].copy_from_slice(&(batch.len() as u32).to_le_bytes());
        buf[at + 4..at + 4 + batch.len()].copy_from_slice(batch);
        at += 4 + batch.len();
        let side_len: usize = side.iter().map(|p| p.len()).sum();
        buf[at..at + 4].copy_from_slice(&(side_len as u32).to_le_bytes());
        at += 4;
        for part in side.iter() {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }
    buf[at..at + 4].copy_from_slice(&(checks.len() as u32).to_le_bytes());
    buf[at + 4..at + 4 + checks.len()].copy_from_slice(&checks);
    seal(&mut buf, ENTRY_V, (journal_id, gen, seq), payload_bytes);
    buf
}

/// Writes the header of an entry whose payload is in place: (journal id, generation,
/// sequence), its size and checksums, as entry `version`.
fn seal(
    buf: &mut AlignedBuf,
    version: u16,
    (journal_id, gen, seq): (u64, u64, u64),
    payload_bytes: usize,
) {
    let header = EntryHeader {
        journal_id,
        gen,
        seq,
        blocks: buf.blocks() as u32,
        payload_bytes: payload_bytes as u32,
        payload_crc: crc32c::crc32c(&buf[HEADER_AREA..HEADER_AREA + payload_bytes]),
    };
    let h = encode_record(version, &header);
    // Six varints and a version: at most 2 + 10 + 10 + 10 + 5 + 5 + 5 = 47 bytes.
    debug_assert!(8 + 2 + h.len() + 4 <= HEADER_AREA);
    buf[..8].copy_from_slice(&ENTRY_MAGIC);
    buf[8..10].copy_from_slice(&(h.len() as u16).to_le_bytes());
    buf[10..10 + h.len()].copy_from_slice(&h);
    let crc = crc32c::crc32c(&buf[..10 + h.len()]);
    buf[10 + h.len()..14 + h.len()].copy_from_slice(&crc.to_le_bytes());
}

/// The header of the entry starting in `block0`, if one does (magic, checksum, version),
/// and its version.
fn decode_header(block0: &[u8]) -> Option<(EntryHeader, u16)> {
    if block0.len() < HEADER_AREA || block0[..8] != ENTRY_MAGIC {
        return None;
    }
    let len = u16::from_le_bytes([block0[8], block0[9]]) as usize;
    if 14 + len > HEADER_AREA {
        return None;
    }
    let crc = u32::from_le_bytes(block0[10 + len..14 + len].try_into().ok()?);
    if crc != crc32c::crc32c(&block0[..10 + len]) {
        return None;
    }
    let raw = &block0[10..10 + len];
    let (h, version): (EntryHeader, u16) = [ENTRY_V, ENTRY_V2, ENTRY_V1]
        .into_iter()
        .find_map(|v| decode_record(v, raw).ok().map(|h| (h, v)))?;
    let fits = HEADER_AREA + h.payload_bytes as usize <= h.blocks as usize * BLOCK_SIZE;
    (h.blocks > 0 && fits).then_some((h, version))
}

/// A decoded entry's commits, (batch, side data) pairs, and the checks of its unflushed
/// data.
type Decoded<'a> = (Vec<(&'a [u8], &'a [u8])>, Vec<CheckRun>);

/// The commits and checks of a whole entry whose header is `h` (of `version`), if its
/// payload is intact. Version 1 entries have no side data, versions 1 and 2 no checks.
fn decode_payload<'a>(entry: &'a [u8], h: &EntryHeader, version: u16) -> Option<Decoded<'a>> {
    let payload = entry.get(HEADER_AREA..HEADER_AREA + h.payload_bytes as usize)?;
    if crc32c::crc32c(payload) != h.payload_crc {
        return None;
    }
    let mut fields = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let len = u32::from_le_bytes(payload.get(at..at + 4)?.try_into().ok()?) as usize;
        fields.push(payload.get(at + 4..at + 4 + len)?);
        at += 4 + len;
    }
    if version == ENTRY_V1 {
        return Some((
            fields.into_iter().map(|b| (b, &[][..])).collect(),
            Vec::new(),
        ));
    }
    let checks = match version {
        ENTRY_V2 => Vec::new(),
        _ => decode_record(CHECKS_V, fields.pop()?).ok()?,
    };
    if fields.len() % 2 != 0 {
        return None;
    }
    Some((fields.chunks(2).map(|p| (p[0], p[1])).collect(), checks))
}

/// A batch waiting for the journal, its side data, hold id and unflushed data's checks,
/// and who waits for it.
struct Queued {
    batch: WriteBatch,
    side: Vec<Bytes>,
    hold: Option<u64>,
    checks: Vec<CheckRun>,
    tx: oneshot::Sender<Result<(), String>>,
}

/// Which entries hold side data not yet released.
#[derive(Default)]
struct HoldMap {
    /// Entry sequence → (its logical block, hold ids not yet released).
    entries: BTreeMap<u64, (u64, u32)>,
    /// Hold id → the entry holding its side data.
    entry_of: HashMap<u64, u64>,
    /// Ids released before their entry was written (or that never will be: a failed
    /// commit's; the journal refuses commits after a failure anyway).
    early: HashSet<u64>,
}

/// Entries whose side data the store has not yet made durable elsewhere, shared with the
/// store's task that writes that data (it holds no RocksDB handle: dropping the store
/// closes RocksDB at once).
#[derive(Default)]
pub struct Holds {
    held: Mutex<HoldMap>,
    /// Set when held data can no longer be released (its block write or flush failed,
    /// or the store's write task stopped): commits fail instead of waiting for space
    /// that will never come; the next mount writes the data from the journal.
    failed: Mutex<Option<String>>,
    /// Woken when an entry is released (the journal may be waiting for space).
    released: Notify,
    /// Woken when held entries keep the journal from reusing space: the store should make
    /// what it has written durable and release it now rather than in its own time.
    pressure: Notify,
}

impl Holds {
    /// Releases hold ids: their side data is durable elsewhere.
    pub fn release(&self, ids: &[u64]) {
        if let Ok(mut held) = self.held.lock() {
            for id in ids {
                let Some(seq) = held.entry_of.remove(id) else {
                    held.early.insert(*id);
                    continue;
                };
                if let Some((_, n)) = held.entries.get_mut(&seq) {
                    *n -= 1;
                    if *n == 0 {
                        held.entries.remove(&seq);
                    }
                }
            }
        }
        self.released.notify_waiters();
    }

    /// Held entries will not be released: every later commit fails with `why` (until
    /// the store is opened again, which writes their data from the journal).
    pub fn fail(&self, why: &str) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert_with(|| why.to_string());
        }
        self.released.notify_waiters();
    }

    fn failure(&self) -> Option<String> {
        match self.failed.lock() {
            Ok(f) => f.clone(),
            Err(_) => Some("journal holds lock poisoned".into()),
        }
    }

    /// Resolves once the journal needs held entries released.
    pub async fn pressured(&self) {
        self.pressure.notified().await
    }

    /// The oldest held entry: (sequence, logical block).
    fn oldest(&self) -> Result<Option<(u64, u64)>, String> {
        let held = lock(&self.held)?;
        Ok(held.entries.iter().next().map(|(s, (at, _))| (*s, *at)))
    }

    /// Holds entry `seq` at logical block `at` for the ids not released yet.
    fn hold(&self, seq: u64, at: u64, ids: impl Iterator<Item = u64>) -> Result<(), String> {
        let mut held = lock(&self.held)?;
        let mut n = 0;
        for id in ids {
            if !held.early.remove(&id) {
                held.entry_of.insert(id, seq);
                n += 1;
            }
        }
        if n > 0 {
            held.entries.insert(seq, (at, n));
        }
        Ok(())
    }
}

/// The journal's mutable state (one lock, held only briefly and never across an await).
struct State {
    gen: u64,
    /// The last entry written (or being written).
    seq: u64,
    /// The next free logical block.
    next: u64,
    /// The oldest logical block still needed: entries before it are in SST files and
    /// hold no side data.
    tail: u64,
    /// The head of the last entry applied to the memtables.
    applied: JournalHead,
    queue: Vec<Queued>,
    /// A task is writing entries; new batches only queue.
    leading: bool,
    /// A memtable flush is asked for and has not finished.
    flushing: bool,
    /// Set when a journal write or memtable apply failed: the memtables may lack what the
    /// journal holds, so every later commit fails until the store is opened again.
    failed: Option<String>,
}

struct Inner<D> {
    dev: Arc<D>,
    db: Arc<DB>,
    region: JournalRegion,
    /// Names of every column family (all flush together).
    cfs: Vec<String>,
    /// The key of the journal head in `meta_cf`.
    meta_cf: String,
    head_key: &'static [u8],
    state: Mutex<State>,
    /// Held while batches go into the memtables, so the flush thread's head (written
    /// outside any entry) never goes in between an entry's batches.
    apply: Mutex<()>,
    holds: Arc<Holds>,
    /// Woken when a flush finished (space may be free).
    flushed: Notify,
    /// To the flush thread: flush, then free the journal before the head's `data_from`.
    flush_tx: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

/// The commit journal of one store. Dropping it waits for a running memtable flush.
pub struct Journal<D: BlockDevice> {
    inner: Arc<Inner<D>>,
    flush_thread: Option<std::thread::JoinHandle<()>>,
}

impl<D: BlockDevice> Drop for Journal<D> {
    fn drop(&mut self) {
        // A leader still running (its callers gone) must not wait for space forever: it
        // holds the metadata store open.
        if let Ok(mut st) = self.inner.state.lock() {
            st.failed
                .get_or_insert_with(|| "the store is closing".into());
        }
        self.inner.holds.released.notify_waiters();
        if let Ok(mut tx) = self.inner.flush_tx.lock() {
            tx.take();
        }
        if let Some(t) = self.flush_thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
impl<D: BlockDevice> Journal<D> {
    /// Entries held for their side data.
    pub(crate) fn held_entries(&self) -> usize {
        self.inner.holds.held.lock().map_or(0, |h| h.entries.len())
    }
}

/// What opening the journal found.
pub struct Replayed {
    pub entries: u64,
    pub batches: u64,
    /// The last entry was left out: its unflushed data was not on the device.
    pub dropped_last: bool,
}

/// A journal whose entries are applied again, not yet taking commits: the store first
/// writes [`Recovered::sides`] where they belong and makes that durable, then
/// [`Journal::start`]s it.
pub struct Recovered {
    head: JournalHead,
    pub replayed: Replayed,
    /// The side data of every held entry, in commit order.
    pub sides: Vec<Vec<u8>>,
}

fn no_wal() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    wo
}

fn flush_all(db: &DB, cfs: &[String]) -> Result<(), String> {
    let handles: Vec<_> = cfs
        .iter()
        .map(|n| {
            db.cf_handle(n)
                .ok_or_else(|| format!("column family {n} is missing"))
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<_> = handles.iter().collect();
    let mut fo = FlushOptions::default();
    fo.set_wait(true);
    db.flush_cfs_opt(&refs, &fo).map_err(|e| e.to_string())
}

impl<D: BlockDevice> Journal<D> {
    /// Writes the head of a new, empty journal (at store creation; synced through the WAL,
    /// like the rest of what creation writes).
    pub fn initialise(db: &DB, meta_cf: &str, head_key: &[u8]) -> Result<(), String> {
        let cf = db
            .cf_handle(meta_cf)
            .ok_or_else(|| format!("column family {meta_cf} is missing"))?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let head = JournalHead::with_holds(1, 0, 0, None);
        db.put_cf_opt(cf, head_key, head.encode(), &wo)
            .map_err(|e| e.to_string())
    }

    /// Applies again every entry written after the head RocksDB holds, and reads the side
    /// data of every entry still held (from the head's `data_from`).
    pub async fn recover(
        dev: &D,
        db: &DB,
        region: JournalRegion,
        meta_cf: &str,
        head_key: &'static [u8],
    ) -> Result<Recovered, String> {
        let cf = db
            .cf_handle(meta_cf)
            .ok_or_else(|| format!("column family {meta_cf} is missing"))?;
        let bytes = db
            .get_cf(cf, head_key)
            .map_err(|e| e.to_string())?
            .ok_or("the store has a journal but its metadata has no journal head")?;
        let head = JournalHead::decode(&bytes)?;
        let mut replayed = Replayed {
            entries: 0,
            batches: 0,
            dropped_last: false,
        };
        let mut sides = Vec::new();
        // From the oldest held entry: its side data and that of every later entry, and
        // the batches of those after the head.
        let mut at_head = JournalHead {
            seq: head.data_seq.saturating_sub(1),
            next: head.data_from,
            ..head
        };
        let start = head.data_from;
        // The last entry applied; `at_head`, the last found. An entry is applied once the
        // next is found, or once its unflushed data is checked when it is the last.
        let mut applied = at_head;
        let mut found: Option<AlignedBuf> = None;
        loop {
            let next = Self::find_next(dev, region, &at_head, start).await?;
            if let Some(entry) = found.take() {
                let (h, v) = decode_header(&entry[..BLOCK_SIZE]).ok_or("journal entry changed")?;
                let (items, checks) =
                    decode_payload(&entry, &h, v).ok_or("journal entry changed")?;
                let in_db = h.seq <= head.seq;
                // A later entry was written only after this one's write, and so its flush,
                // completed: only the last one's unflushed data can be missing.
                if next.is_none() && !in_db && !unflushed_data_present(dev, &checks).await? {
                    tracing::warn!(
                        entry = h.seq,
                        commits = items.len(),
                        "the journal's last entry names data that never reached the device (a crash before its flush: none of its commits was acknowledged); it is not applied"
                    );
                    replayed.dropped_last = true;
                    break;
                }
                for (batch, side) in &items {
                    if !in_db {
                        db.write_opt(WriteBatch::from_data(batch), &no_wal())
                            .map_err(|e| format!("applying journal entry {}: {e}", h.seq))?;
                    }
                    if !side.is_empty() {
                        sides.push(side.to_vec());
                    }
                }
                if !in_db {
                    replayed.entries += 1;
                    replayed.batches += items.len() as u64;
                }
                applied = at_head;
            }
            let Some((at, entry)) = next else { break };
            let (h, _) = decode_header(&entry[..BLOCK_SIZE]).ok_or("journal entry changed")?;
            at_head.seq = h.seq;
            at_head.next = at + u64::from(h.blocks);
            found = Some(entry);
        }
        let at_head = applied;
        if at_head.seq < head.seq {
            return Err(format!(
                "the journal lacks entries {}..={} holding data not yet on its blocks (the journal is damaged)",
                at_head.seq + 1,
                head.seq
            ));
        }
        let head = JournalHead::with_holds(head.gen, at_head.seq, at_head.next, None);
        Ok(Recovered {
            head,
            replayed,
            sides,
        })
    }

    /// Starts a recovered journal: a new generation, durable (with everything applied
    /// by [`Self::recover`]) before the first new entry, so entries of earlier runs can
    /// never pass for the next one. The store must have made the recovered side data
    /// durable first: the new head no longer points at it. `holds` is shared with the
    /// store's task that releases them.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        recovered: Recovered,
        dev: Arc<D>,
        db: Arc<DB>,
        region: JournalRegion,
        cfs: Vec<String>,
        meta_cf: &str,
        head_key: &'static [u8],
        holds: Arc<Holds>,
    ) -> Result<(Journal<D>, Replayed), String> {
        let cf = db
            .cf_handle(meta_cf)
            .ok_or_else(|| format!("column family {meta_cf} is missing"))?;
        let mut head = recovered.head;
        head.gen += 1;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, head_key, head.encode());
        db.write_opt(batch, &no_wal()).map_err(|e| e.to_string())?;
        flush_all(&db, &cfs)?;
        let (flush_tx, flush_rx) = std::sync::mpsc::channel();
        let inner = Arc::new(Inner {
            dev,
            db,
            region,
            cfs,
            meta_cf: meta_cf.to_string(),
            head_key,
            state: Mutex::new(State {
                gen: head.gen,
                seq: head.seq,
                next: head.next,
                tail: head.next,
                applied: head,
                queue: Vec::new(),
                leading: false,
                flushing: false,
                failed: None,
            }),
            apply: Mutex::new(()),
            holds,
            flushed: Notify::new(),
            flush_tx: Mutex::new(Some(flush_tx)),
        });
        let flush_thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("store-flush".into())
                .spawn(move || flush_thread(inner, flush_rx))
                .map_err(|e| format!("cannot start the flush thread: {e}"))?
        };
        Ok((
            Journal {
                inner,
                flush_thread: Some(flush_thread),
            },
            recovered.replayed,
        ))
    }

    /// The entry after `head` if it was written whole: at `head.next`, or at the start of
    /// the next lap if it did not fit before the end. Never reads past one lap from
    /// `start` (where this replay began).
    async fn find_next(
        dev: &D,
        region: JournalRegion,
        head: &JournalHead,
        start: u64,
    ) -> Result<Option<(u64, AlignedBuf)>, String> {
        let mut candidates = vec![head.next];
        let lap_start = region.place(head.next, region.blocks);
        if lap_start != head.next {
            candidates.push(lap_start);
        }
        for at in candidates {
            let first = dev
                .read(region.device_block(at), 1)
                .await
                .map_err(|e| format!("reading the journal: {e}"))?;
            let Some((h, version)) = decode_header(&first) else {
                continue;
            };
            let n = u64::from(h.blocks);
            let expected = h.journal_id == region.id
                && h.gen == head.gen
                && Some(h.seq) == head.seq.checked_add(1);
            let within_a_lap = (at + n).saturating_sub(start) <= region.blocks;
            if !expected
                || n > region.max_entry_blocks()
                || region.place(head.next, n) != at
                || !within_a_lap
            {
                continue;
            }
            let entry = if n == 1 {
                first
            } else {
                dev.read(region.device_block(at), n as usize)
                    .await
                    .map_err(|e| format!("reading the journal: {e}"))?
            };
            if decode_payload(&entry, &h, version).is_some() {
                return Ok(Some((at, entry)));
            }
        }
        Ok(None)
    }

    /// Commits `batch` durably: it is in the journal when this returns Ok, and applied to
    /// the memtables (readable).
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), String> {
        self.enqueue(batch, Vec::new(), None, Vec::new()).await
    }

    /// Commits `batch`, which names the blocks of `checks` whose data was written but not
    /// flushed: the entry's own flush makes that data durable before this returns, and
    /// replay keeps the entry only if the data is there (see [`Self::recover`]).
    pub async fn commit_unflushed(
        &self,
        batch: WriteBatch,
        checks: Vec<CheckRun>,
    ) -> Result<(), String> {
        self.enqueue(batch, Vec::new(), None, checks).await
    }

    /// Commits `batch` with side data (in parts): both are durable when this returns, and
    /// with `hold` the entry is held until that id is released through [`Holds::release`].
    /// Once queued, the commit goes on even if this future is dropped.
    pub async fn commit_with(
        &self,
        batch: WriteBatch,
        side: Vec<Bytes>,
        hold: Option<u64>,
    ) -> Result<(), String> {
        self.enqueue(batch, side, hold, Vec::new()).await
    }

    async fn enqueue(
        &self,
        batch: WriteBatch,
        side: Vec<Bytes>,
        hold: Option<u64>,
        checks: Vec<CheckRun>,
    ) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let lead_now = {
            if let Some(e) = self.inner.holds.failure() {
                return Err(e);
            }
            let mut st = lock(&self.inner.state)?;
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            st.queue.push(Queued {
                batch,
                side,
                hold,
                checks,
                tx,
            });
            !std::mem::replace(&mut st.leading, true)
        };
        if lead_now {
            // A task of its own: a caller that gives up waiting cannot strand the group.
            tokio::spawn(lead(self.inner.clone()));
        }
        rx.await
            .map_err(|_| "the journal dropped a commit".to_string())?
    }
}

/// Blocks read at once when checking unflushed data.
const CHECK_READ_BLOCKS: usize = 256;

/// Whether every block of `checks` holds the data its crc names (reads in runs).
async fn unflushed_data_present<D: BlockDevice>(
    dev: &D,
    checks: &[CheckRun],
) -> Result<bool, String> {
    for run in checks {
        for (i, crcs) in run.crcs.chunks(CHECK_READ_BLOCKS).enumerate() {
            let first = run.start + (i * CHECK_READ_BLOCKS) as u64;
            let data = dev
                .read(first, crcs.len())
                .await
                .map_err(|e| format!("reading blocks {first}.. named by the journal: {e}"))?;
            let intact = data
                .chunks(BLOCK_SIZE)
                .zip(crcs)
                .all(|(block, crc)| crc32c::crc32c(block) == *crc);
            if !intact {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, String> {
    m.lock()
        .map_err(|_| "journal state lock poisoned".to_string())
}

/// A commit's outcome, sent once the task that decided it no longer holds the store.
type Answer = (oneshot::Sender<Result<(), String>>, Result<(), String>);

/// Takes the next entry's batches off the queue: as many as fit in one entry (at least
/// one; a batch too large alone is answered with an error here).
fn take_group<D>(inner: &Inner<D>, answers: &mut Vec<Answer>) -> Result<Vec<Queued>, String> {
    let max_blocks = inner.region.max_entry_blocks();
    let mut st = lock(&inner.state)?;
    let mut payload = 0;
    let mut n = 0;
    while n < st.queue.len().min(GROUP_MAX_BATCHES) {
        let q = &st.queue[n];
        let more = payload + item_bytes(&(q.batch.data(), &q.side)) + checks_bytes_bound(&q.checks);
        if entry_blocks(more) > max_blocks {
            if n == 0 {
                // Nothing was written: fail only this commit.
                let tx = st.queue.remove(0).tx;
                let why = format!(
                    "a commit of {more} bytes does not fit in one entry of the journal of {} blocks",
                    inner.region.blocks
                );
                answers.push((tx, Err(why)));
                continue;
            }
            break;
        }
        payload = more;
        n += 1;
    }
    Ok(st.queue.drain(..n).collect())
}

/// Writes one entry of the queued batches, then goes on in a new task while more queued
/// meanwhile (each task's future stays small and nothing waits behind a long loop). The
/// answers go out after this task has let go of the store, so that a caller that drops
/// the store on its answer closes RocksDB itself (a reopen then finds it unlocked).
fn lead<D: BlockDevice>(
    inner: Arc<Inner<D>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let mut answers = Vec::new();
        match take_group(&inner, &mut answers) {
            Ok(group) if !group.is_empty() => write_entry(&inner, group, &mut answers).await,
            Ok(_) => {}
            Err(e) => fail(&inner, Vec::new(), e, &mut answers),
        }
        let more = match lock(&inner.state) {
            Ok(mut st) => {
                if st.queue.is_empty() {
                    st.leading = false;
                }
                st.leading
            }
            Err(_) => false,
        };
        if more {
            tokio::spawn(lead(inner));
        } else {
            drop(inner);
        }
        for (tx, res) in answers {
            let _ = tx.send(res);
        }
    })
}

/// Fails every batch of `group` and every queued one, and every later commit, with `why`.
fn fail<D>(inner: &Inner<D>, group: Vec<Queued>, why: String, answers: &mut Vec<Answer>) {
    tracing::error!("journal commit failed; the store refuses commits until reopened: {why}");
    if let Ok(mut st) = inner.state.lock() {
        st.failed.get_or_insert_with(|| why.clone());
        answers.extend(st.queue.drain(..).map(|q| (q.tx, Err(why.clone()))));
    }
    answers.extend(group.into_iter().map(|q| (q.tx, Err(why.clone()))));
}

/// Writes one entry holding `group`, then applies its batches to the memtables; their
/// answers go to `answers`.
async fn write_entry<D: BlockDevice>(
    inner: &Inner<D>,
    mut group: Vec<Queued>,
    answers: &mut Vec<Answer>,
) {
    let region = inner.region;
    let (gen, seq) = match lock(&inner.state) {
        Ok(st) => (st.gen, st.seq + 1),
        Err(e) => return fail(inner, group, e, answers),
    };
    let entry = {
        let checks: Vec<CheckRun> = group
            .iter_mut()
            .flat_map(|q| std::mem::take(&mut q.checks))
            .collect();
        let items: Vec<Item<'_>> = group
            .iter()
            .map(|q| (q.batch.data(), &q.side[..]))
            .collect();
        encode_entry(region.id, gen, seq, &items, &checks)
    };
    let n = entry.blocks() as u64;
    let at = match reserve(inner, n).await {
        Ok(at) => at,
        Err(e) => return fail(inner, group, e, answers),
    };
    if let Err(e) = inner.dev.write(region.device_block(at), entry).await {
        return fail(inner, group, format!("journal write: {e}"), answers);
    }
    let ids = group.iter().filter_map(|q| q.hold);
    if let Err(e) = inner.holds.hold(seq, at, ids) {
        return fail(inner, group, e, answers);
    }
    let Some(cf) = inner.db.cf_handle(&inner.meta_cf) else {
        return fail(
            inner,
            group,
            "the meta column family is missing".into(),
            answers,
        );
    };
    let applying = match lock(&inner.apply) {
        Ok(guard) => guard,
        Err(e) => return fail(inner, group, e, answers),
    };
    // The head rides in the entry's last batch. SST files may hold the batches before it
    // with the older head; replay then applies them again, which changes nothing (the same
    // puts and deletes in the same order, and no later entry was applied yet).
    let head = match inner.holds.oldest() {
        Ok(oldest) => JournalHead::with_holds(gen, seq, at + n, oldest),
        Err(e) => return fail(inner, group, e, answers),
    };
    if let Some(last) = group.last_mut() {
        last.batch.put_cf(cf, inner.head_key, head.encode());
    }
    let wo = no_wal();
    let mut group = group.into_iter();
    while let Some(Queued { batch, tx, .. }) = group.next() {
        if let Err(e) = inner.db.write_opt(batch, &wo) {
            // The batches before this one are durable and applied: they succeeded.
            answers.push((tx, Err(e.to_string())));
            let why = format!("applying a journaled commit to the memtables: {e}");
            drop(applying);
            return fail(inner, group.collect(), why, answers);
        }
        answers.push((tx, Ok(())));
    }
    let ask = match lock(&inner.state) {
        Ok(mut st) => {
            st.applied = head;
            space_wanted(&mut st, region, head.data_from)
        }
        Err(_) => Space::Enough,
    };
    drop(applying);
    match ask {
        Space::Flush => {
            ask_flush(inner);
        }
        Space::Release => inner.holds.pressure.notify_one(),
        Space::Enough => {}
    }
}

/// What the journal's space needs after an entry.
enum Space {
    Enough,
    /// A memtable flush would free enough (it is marked asked for).
    Flush,
    /// Held entries keep most of the used space.
    Release,
}

/// Asks for a flush once half the journal is in use and a flush would free at least half
/// of that (so writers rarely wait for space, and held entries do not cause a flush per
/// entry); asks for releases when held entries keep more than half of the journal.
fn space_wanted(st: &mut State, region: JournalRegion, data_from: u64) -> Space {
    let used = st.next - st.tail;
    let freeable = data_from.saturating_sub(st.tail);
    if !st.flushing && used > region.blocks / 2 && freeable >= used / 2 {
        st.flushing = true;
        Space::Flush
    } else if st.next - data_from > region.blocks / 2 {
        Space::Release
    } else {
        Space::Enough
    }
}

/// Asks the flush thread for a flush; false when it is gone (the store is closing).
fn ask_flush<D>(inner: &Inner<D>) -> bool {
    let sent = inner
        .flush_tx
        .lock()
        .ok()
        .and_then(|tx| tx.as_ref().map(|tx| tx.send(()).is_ok()))
        == Some(true);
    if !sent {
        if let Ok(mut st) = inner.state.lock() {
            st.flushing = false;
        }
    }
    sent
}

/// Reserves `n` blocks for the next entry (waiting for a flush, or for held entries'
/// release, when the journal is full) and returns the logical block where it goes.
async fn reserve<D: BlockDevice>(inner: &Inner<D>, n: u64) -> Result<u64, String> {
    let region = inner.region;
    loop {
        let flushed = inner.flushed.notified();
        let released = inner.holds.released.notified();
        tokio::pin!(flushed, released);
        flushed.as_mut().enable();
        released.as_mut().enable();
        if let Some(e) = inner.holds.failure() {
            return Err(e);
        }
        let oldest = inner.holds.oldest()?;
        let (ask, press) = {
            let mut st = lock(&inner.state)?;
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            let at = region.place(st.next, n);
            if at + n - st.tail <= region.blocks {
                st.seq += 1;
                st.next = at + n;
                return Ok(at);
            }
            // Where replay would have to start if a flush ran now: flush only if that
            // makes room for this entry (no flush per release while entries are held).
            let a = st.applied;
            let data_from = JournalHead::with_holds(a.gen, a.seq, a.next, oldest).data_from;
            let ask = !st.flushing && at + n - data_from <= region.blocks;
            if ask {
                st.flushing = true;
            }
            (ask, data_from < st.next)
        };
        if ask && !ask_flush(inner) {
            return Err("the store is closing".into());
        }
        if press {
            inner.holds.pressure.notify_one();
        }
        tokio::select! {
            () = flushed => {}
            () = released => {}
        }
    }
}

/// Flushes the memtables when asked, then frees the journal before the replay start of
/// the head it wrote just before (every entry before it is applied and holds no side
/// data; a later head in the flush only starts later).
fn flush_thread<D>(inner: Arc<Inner<D>>, rx: std::sync::mpsc::Receiver<()>) {
    while let Ok(()) = rx.recv() {
        let res = fresh_head(&inner).and_then(|from| {
            flush_all(&inner.db, &inner.cfs)?;
            Ok(from)
        });
        if let Ok(mut st) = inner.state.lock() {
            st.flushing = false;
            match res {
                Ok(from) => st.tail = st.tail.max(from),
                Err(e) => {
                    tracing::error!("memtable flush for the journal failed: {e}");
                    st.failed
                        .get_or_insert_with(|| format!("memtable flush failed: {e}"));
                }
            }
        }
        inner.flushed.notify_waiters();
    }
}

/// Puts the last applied entry's head again with the current oldest held entry (entries
/// released since it was written need no replay), between two entries' batches; returns
/// its replay start.
fn fresh_head<D>(inner: &Inner<D>) -> Result<u64, String> {
    // Holding `apply`, no entry changes `applied` meanwhile; `state` is not held across
    // the put (a RocksDB stall there must not block committers on it).
    let _applying = lock(&inner.apply)?;
    let oldest = inner.holds.oldest()?;
    let a = lock(&inner.state)?.applied;
    let head = JournalHead::with_holds(a.gen, a.seq, a.next, oldest);
    if head != a {
        let cf = inner
            .db
            .cf_handle(&inner.meta_cf)
            .ok_or("the meta column family is missing")?;
        inner
            .db
            .put_cf_opt(cf, inner.head_key, head.encode(), &no_wal())
            .map_err(|e| e.to_string())?;
        lock(&inner.state)?.applied = head;
    }
    Ok(head.data_from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::file::FileDevice;

    /// Only the entry that follows the head is found: same generation, next sequence,
    /// whole, where the head says (or at the next lap's start when it did not fit).
    #[tokio::test]
    async fn replay_finds_only_the_next_whole_entry_of_this_generation() {
        let (_tmp, path, _) = crate::test_store_paths(64 * BLOCK_SIZE as u64);
        let dev = FileDevice::open(&path).expect("open");
        let region = TEST_REGION;
        let big = vec![9u8; 2 * BLOCK_SIZE];
        let head = |gen, seq, next| JournalHead::with_holds(gen, seq, next, None);
        let e = |seq, data: &[u8]| encode_entry(77, 5, seq, &[(data, &[][..])], &[]);
        let found = |h: JournalHead| {
            let dev = &dev;
            async move {
                JournalHead::decode(&h.encode()).expect("head round trip");
                Journal::find_next(dev, region, &h, h.next)
                    .await
                    .expect("read")
                    .map(|(at, e)| (at, decode_header(&e[..BLOCK_SIZE]).expect("h").0.seq))
            }
        };
        // seq 1 at logical 0 (one block), seq 2 at logical 1 (three blocks).
        dev.write(1, e(1, b"a")).await.expect("w");
        dev.write(2, e(2, &big)).await.expect("w");
        assert_eq!(found(head(5, 0, 0)).await, Some((0, 1)));
        assert_eq!(found(head(5, 1, 1)).await, Some((1, 2)));
        assert_eq!(found(head(5, 2, 4)).await, None, "nothing written there");
        assert_eq!(found(head(6, 0, 0)).await, None, "an earlier generation's");
        assert_eq!(found(head(5, 1, 0)).await, None, "not the next sequence");
        // Another store's journal (a reused device): same generation and sequence.
        dev.write(5, encode_entry(78, 5, 3, &[(b"b", &[][..])], &[]))
            .await
            .expect("w");
        assert_eq!(found(head(5, 2, 4)).await, None, "another journal's entry");
        // seq 3 (three blocks) does not fit at logical 10 of 12: it went to the next lap.
        dev.write(1, e(3, &big)).await.expect("w");
        assert_eq!(found(head(5, 2, 10)).await, Some((12, 3)));
        // Torn: its last block never reached the device.
        dev.write(3, AlignedBuf::zeroed(1)).await.expect("w");
        let torn = found(head(5, 2, 10)).await;
        assert_eq!(torn, None, "a torn entry ends the replay");
    }

    /// An entry as version 1 wrote it: the batches only, after their lengths.
    fn encode_entry_v1(journal_id: u64, gen: u64, seq: u64, batch: &[u8]) -> AlignedBuf {
        let payload_bytes = 4 + batch.len();
        let blocks = entry_blocks(payload_bytes) as usize;
        let mut buf = AlignedBuf::zeroed(blocks);
        let at = HEADER_AREA;
        buf[at..at + 4].copy_from_slice(&(batch.len() as u32).to_le_bytes());
        buf[at + 4..at + payload_bytes].copy_from_slice(batch);
        seal(&mut buf, ENTRY_V1, (journal_id, gen, seq), payload_bytes);
        buf
    }

    /// The journal of the tests: blocks 1..13 of the device, id 77.
    const TEST_REGION: JournalRegion = JournalRegion {
        start: 1,
        blocks: 12,
        id: 77,
    };

    /// A 64-block device file and a RocksDB with a `meta` column family.
    fn device_and_db() -> (tempfile::TempDir, FileDevice, DB) {
        let (tmp, path, db_path) = crate::test_store_paths(64 * BLOCK_SIZE as u64);
        let dev = FileDevice::open(&path).expect("open");
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf(&opts, &db_path, ["meta"]).expect("db");
        (tmp, dev, db)
    }

    /// An entry as version 2 wrote it: (batch, side data) pairs, no checks.
    fn encode_entry_v2(journal_id: u64, gen: u64, seq: u64, items: &[Item<'_>]) -> AlignedBuf {
        let payload_bytes: usize = items.iter().map(item_bytes).sum();
        let mut buf = AlignedBuf::zeroed(entry_blocks(payload_bytes) as usize);
        let mut at = HEADER_AREA;
        for (batch, side) in items {
            let side: Vec<u8> = side.concat();
            for field in [&batch[..], &side[..]] {
                buf[at..at + 4].copy_from_slice(&(field.len() as u32).to_le_bytes());
                buf[at + 4..at + 4 + field.len()].copy_from_slice(field);
                at += 4 + field.len();
            }
        }
        seal(&mut buf, ENTRY_V2, (journal_id, gen, seq), payload_bytes);
        buf
    }

    /// The last entry is applied only if the data it names as unflushed is on the device
    /// (a crash before its flush may have kept the entry but not the data); an entry
    /// followed by another is applied without a check: the later one was written only
    /// after this one's flush.
    #[tokio::test]
    async fn the_last_entry_is_applied_only_with_its_unflushed_data() {
        let (_tmp, dev, db) = device_and_db();
        let cf = db.cf_handle("meta").expect("cf");
        let region = TEST_REGION;
        let head = JournalHead::with_holds(4, 2, 3, None);
        db.put_cf(cf, b"journal", head.encode()).expect("head");
        // Data blocks 40..43: what the entries say was written there.
        let data = AlignedBuf::with_data(3, 0, &[5u8; 3 * BLOCK_SIZE]);
        let crcs: Vec<u32> = (0..3).map(|i| crc32c::crc32c(data.block(i))).collect();
        let checks = |start: u64| {
            vec![CheckRun {
                start,
                crcs: crcs.clone(),
            }]
        };
        let put = |k: &[u8]| {
            let mut b = WriteBatch::default();
            b.put_cf(cf, k, b"v");
            b
        };
        let (b3, b4) = (put(b"k3"), put(b"k4"));
        // Entry 3 names blocks 20..23, which never got their data, but entry 4 follows it.
        let e3 = encode_entry(77, 4, 3, &[(b3.data(), &[][..])], &checks(20));
        let at4 = 3 + e3.blocks() as u64;
        dev.write(region.device_block(3), e3).await.expect("w");
        let e4 = encode_entry(77, 4, 4, &[(b4.data(), &[][..])], &checks(40));
        let after4 = at4 + e4.blocks() as u64;
        dev.write(region.device_block(at4), e4).await.expect("w");
        let recover = || Journal::recover(&dev, &db, region, "meta", b"journal");

        // Entry 4's data is not on the device: entry 3 is applied, entry 4 is not.
        let got = recover().await.expect("recover");
        let r = &got.replayed;
        assert_eq!((r.entries, r.batches, r.dropped_last), (1, 1, true));
        assert_eq!(got.head, JournalHead::with_holds(4, 3, at4, None));
        assert!(db.get_cf(cf, b"k3").expect("get").is_some());
        assert!(db.get_cf(cf, b"k4").expect("get").is_none());

        // One block of three is wrong: still not applied.
        let mut partial = AlignedBuf::with_data(3, 0, &data);
        partial.block_mut(2).fill(6);
        dev.write(40, partial).await.expect("w");
        let got = recover().await.expect("recover");
        assert_eq!((got.replayed.entries, got.replayed.dropped_last), (1, true));
        assert!(db.get_cf(cf, b"k4").expect("get").is_none());

        // With the data there, both are applied.
        dev.write(40, data).await.expect("w");
        let got = recover().await.expect("recover");
        assert_eq!(
            (got.replayed.entries, got.replayed.dropped_last),
            (2, false)
        );
        assert_eq!(got.head, JournalHead::with_holds(4, 4, after4, None));
        assert!(db.get_cf(cf, b"k4").expect("get").is_some());
    }

    /// A journal written before side data existed (a version 1 head, version 1 entries of
    /// batches only) is replayed: its batches are applied and no side data is found.
    #[tokio::test]
    async fn a_journal_from_before_side_data_is_replayed() {
        #[derive(Serialize)]
        struct V1 {
            gen: u64,
            seq: u64,
            next: u64,
        }
        let (_tmp, dev, db) = device_and_db();
        let cf = db.cf_handle("meta").expect("cf");
        let head = V1 {
            gen: 4,
            seq: 2,
            next: 3,
        };
        db.put_cf(cf, b"journal", encode_record(HEAD_V1, &head))
            .expect("head");
        let region = TEST_REGION;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, b"k", b"v");
        let entry = encode_entry_v1(77, 4, 3, batch.data());
        let n = entry.blocks() as u64;
        dev.write(region.device_block(3), entry).await.expect("w");
        let got = Journal::recover(&dev, &db, region, "meta", b"journal")
            .await
            .expect("recover");
        assert_eq!((got.replayed.entries, got.replayed.batches), (1, 1));
        assert!(got.sides.is_empty());
        assert_eq!(got.head, JournalHead::with_holds(4, 3, 3 + n, None));
        let value = db.get_cf(cf, b"k").expect("get");
        assert_eq!(value.as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn entries_round_trip_and_damage_is_refused() {
        let a = vec![7u8; 5000];
        let b = b"second".to_vec();
        let side = [Bytes::from_static(b"side "), Bytes::from_static(b"data")];
        let checks = vec![
            CheckRun {
                start: 1 << 40,
                crcs: vec![u32::MAX, 0, 7],
            },
            CheckRun {
                start: 5,
                crcs: vec![1],
            },
        ];
        let e = encode_entry(9, 3, 42, &[(&a, &side), (&b, &[])], &checks);
        assert_eq!(e.blocks(), 2);
        let (h, v) = decode_header(&e[..BLOCK_SIZE]).expect("header");
        assert_eq!(
            (h.journal_id, h.gen, h.seq, h.blocks, v),
            (9, 3, 42, 2, ENTRY_V)
        );
        let (got, got_checks) = decode_payload(&e, &h, v).expect("payload");
        assert_eq!(got, vec![(&a[..], &b"side data"[..]), (&b[..], &[][..])]);
        assert_eq!(got_checks, checks);
        assert!(
            checks_bytes_bound(&checks) >= 4 + encode_record(CHECKS_V, &checks).len(),
            "the bound take_group counts with"
        );
        // A version 2 entry (no checks field) still decodes.
        let v2 = encode_entry_v2(9, 3, 43, &[(&b[..], &side[..])]);
        let (h2, v) = decode_header(&v2[..BLOCK_SIZE]).expect("v2 header");
        assert_eq!(v, ENTRY_V2);
        let (got, got_checks) = decode_payload(&v2, &h2, v).expect("v2 payload");
        assert_eq!(got, vec![(&b[..], &b"side data"[..])]);
        assert!(got_checks.is_empty());
        // A torn entry (second block never written) fails its payload checksum.
        let mut torn = AlignedBuf::with_data(e.blocks(), 0, &e);
        torn.block_mut(1).fill(0);
        assert!(decode_payload(&torn, &h, v).is_none());
        // A damaged header is no entry at all.
        let mut bad = AlignedBuf::with_data(e.blocks(), 0, &e);
        bad[12] ^= 1;
        assert!(decode_header(&bad[..BLOCK_SIZE]).is_none());
        assert!(decode_header(&[0u8; BLOCK_SIZE]).is_none());
    }

    /// Entries stay held until every id in them is released, an id may be released before
    /// its entry is written, and the oldest held entry is where replay must start.
    #[test]
    fn entries_are_held_until_all_their_ids_are_released() {
        let holds = Holds::default();
        holds.hold(5, 10, [1, 2].into_iter()).expect("hold");
        holds.release(&[3]); // written and flushed before its entry
        holds.hold(6, 14, [3, 4].into_iter()).expect("hold");
        holds.hold(7, 18, std::iter::empty()).expect("no side data");
        assert_eq!(holds.oldest().expect("lock"), Some((5, 10)));
        holds.release(&[1]);
        assert_eq!(
            holds.oldest().expect("lock"),
            Some((5, 10)),
            "2 is still held"
        );
        holds.release(&[2]);
        assert_eq!(holds.oldest().expect("lock"), Some((6, 14)));
        holds.release(&[4]);
        assert_eq!(holds.oldest().expect("lock"), None, "3 was released early");
        // A head names the oldest held entry at or before its own, else its own end.
        let h = JournalHead::with_holds(2, 9, 30, Some((6, 14)));
        assert_eq!((h.data_seq, h.data_from), (6, 14));
        let h = JournalHead::with_holds(2, 9, 30, Some((10, 30)));
        assert_eq!(
            (h.data_seq, h.data_from),
            (10, 30),
            "not yet applied: after it"
        );
        assert_eq!(JournalHead::decode(&h.encode()), Ok(h));
    }

    /// Heads written before side data decode with nothing held; a head whose side data
    /// would start after its own end is refused.
    #[test]
    fn old_heads_decode_and_inconsistent_heads_are_refused() {
        #[derive(Serialize)]
        struct V1 {
            gen: u64,
            seq: u64,
            next: u64,
        }
        let old = encode_record(
            HEAD_V1,
            &V1 {
                gen: 3,
                seq: 8,
                next: 40,
            },
        );
        let h = JournalHead::decode(&old).expect("v1 head");
        assert_eq!(h, JournalHead::with_holds(3, 8, 40, None));
        let mut bad = JournalHead::with_holds(3, 8, 40, None);
        bad.data_from = 41;
        assert!(JournalHead::decode(&bad.encode()).is_err());
        let mut bad = JournalHead::with_holds(3, 8, 40, None);
        bad.data_seq = 10;
        assert!(JournalHead::decode(&bad.encode()).is_err());
    }

    #[test]
    fn entries_never_wrap_and_regions_scale_with_the_device() {
        let r = JournalRegion {
            start: 1,
            blocks: 100,
            id: 1,
        };
        assert_eq!(r.place(10, 5), 10);
        assert_eq!(r.place(95, 5), 95);
        assert_eq!(r.place(96, 5), 100, "does not fit: next lap");
        assert_eq!(r.device_block(100), 1);
        assert_eq!(r.device_block(199), 100);
        assert_eq!(JournalRegion::for_device(4095), None, "under 16 MiB");
        let r = JournalRegion::for_device(4096 * 4).expect("64 MiB");
        assert_eq!((r.start, r.blocks), (1, 1024));
        assert_eq!(r.validate(4096 * 4), Ok(()));
        assert!(r.validate(1000).is_err(), "past the device's end");
        let r = JournalRegion::for_device(1 << 30).expect("4 TiB");
        assert_eq!(r.blocks, MAX_BLOCKS);
        let ids: std::collections::HashSet<u64> = (0..8)
            .filter_map(|_| JournalRegion::for_device(1 << 20).map(|r| r.id))
            .collect();
        assert_eq!(ids.len(), 8, "each journal gets its own id");
        let bad = JournalRegion {
            start: 1,
            blocks: 0,
            id: 1,
        };
        assert!(bad.validate(1 << 20).is_err(), "an empty journal");
    }
}
