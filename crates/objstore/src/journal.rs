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
//! the point at which it was asked for.
//!
//! Entry layout, in whole blocks: `[magic 8][header length u16][header][crc32c of the
//! preceding bytes u32]`, zero padding to 64 bytes, then the payload: per batch a
//! u32 length and the batch's bytes. The header (a versioned postcard record) carries the
//! journal's id, generation, sequence, block count and payload checksum. Every mount
//! starts a new generation, so an entry left from an earlier run is never mistaken for a
//! new one, and the id (random, in the superblock) keeps out entries of an earlier store
//! on the same device. Batches name column families by RocksDB's ids, which are fixed when
//! a family is created: a family must never be dropped and created again.
//!
//! Limits: memtable applies run on the runtime thread, so a RocksDB write stall (flushes
//! falling behind) blocks it; and a leader task whose callers all gave up keeps the
//! metadata store open until its entry is done.

use std::sync::{Arc, Mutex};

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
const ENTRY_V: u16 = 1;
const HEAD_V: u16 = 1;
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
/// entry goes (or the start of the next lap, when the entry did not fit before the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHead {
    pub gen: u64,
    pub seq: u64,
    pub next: u64,
}

impl JournalHead {
    pub fn encode(&self) -> Vec<u8> {
        encode_record(HEAD_V, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<JournalHead, String> {
        decode_record(HEAD_V, bytes).map_err(|e| format!("unreadable journal head: {e}"))
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

/// Encodes one entry holding `batches` (each a `WriteBatch`'s bytes), in whole blocks.
fn encode_entry(journal_id: u64, gen: u64, seq: u64, batches: &[&[u8]]) -> AlignedBuf {
    let payload_bytes: usize = batches.iter().map(|b| 4 + b.len()).sum();
    let blocks = entry_blocks(payload_bytes) as usize;
    let mut buf = AlignedBuf::zeroed(blocks);
    let mut at = HEADER_AREA;
    for b in batches {
        buf[at..at + 4].copy_from_slice(&(b.len() as u32).to_le_bytes());
        buf[at + 4..at + 4 + b.len()].copy_from_slice(b);
        at += 4 + b.len();
    }
    let header = EntryHeader {
        journal_id,
        gen,
        seq,
        blocks: blocks as u32,
        payload_bytes: payload_bytes as u32,
        payload_crc: crc32c::crc32c(&buf[HEADER_AREA..at]),
    };
    let h = encode_record(ENTRY_V, &header);
    // Six varints and a version: at most 2 + 10 + 10 + 10 + 5 + 5 + 5 = 47 bytes.
    debug_assert!(8 + 2 + h.len() + 4 <= HEADER_AREA);
    buf[..8].copy_from_slice(&ENTRY_MAGIC);
    buf[8..10].copy_from_slice(&(h.len() as u16).to_le_bytes());
    buf[10..10 + h.len()].copy_from_slice(&h);
    let crc = crc32c::crc32c(&buf[..10 + h.len()]);
    buf[10 + h.len()..14 + h.len()].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The header of the entry starting in `block0`, if one does (magic, checksum, version).
fn decode_header(block0: &[u8]) -> Option<EntryHeader> {
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
    let h: EntryHeader = decode_record(ENTRY_V, &block0[10..10 + len]).ok()?;
    let fits = HEADER_AREA + h.payload_bytes as usize <= h.blocks as usize * BLOCK_SIZE;
    (h.blocks > 0 && fits).then_some(h)
}

/// The batches of a whole entry whose header is `h`, if its payload is intact.
fn decode_payload<'a>(entry: &'a [u8], h: &EntryHeader) -> Option<Vec<&'a [u8]>> {
    let payload = entry.get(HEADER_AREA..HEADER_AREA + h.payload_bytes as usize)?;
    if crc32c::crc32c(payload) != h.payload_crc {
        return None;
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let len = u32::from_le_bytes(payload.get(at..at + 4)?.try_into().ok()?) as usize;
        out.push(payload.get(at + 4..at + 4 + len)?);
        at += 4 + len;
    }
    Some(out)
}

/// A batch waiting for the journal, and who waits for it.
type Queued = (WriteBatch, oneshot::Sender<Result<(), String>>);

/// The journal's mutable state (one lock, held only briefly and never across an await).
struct State {
    gen: u64,
    /// The last entry written (or being written).
    seq: u64,
    /// The next free logical block.
    next: u64,
    /// The oldest logical block still needed: entries before it are in SST files.
    tail: u64,
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
    /// Woken when a flush finished (space may be free).
    flushed: Notify,
    /// To the flush thread: flush, then free the journal before this logical block.
    flush_tx: Mutex<Option<std::sync::mpsc::Sender<u64>>>,
}

/// The commit journal of one store. Dropping it waits for a running memtable flush.
pub struct Journal<D: BlockDevice> {
    inner: Arc<Inner<D>>,
    flush_thread: Option<std::thread::JoinHandle<()>>,
}

impl<D: BlockDevice> Drop for Journal<D> {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.inner.flush_tx.lock() {
            tx.take();
        }
        if let Some(t) = self.flush_thread.take() {
            let _ = t.join();
        }
    }
}

/// What opening the journal found.
pub struct Replayed {
    pub entries: u64,
    pub batches: u64,
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
        let head = JournalHead {
            gen: 1,
            seq: 0,
            next: 0,
        };
        db.put_cf_opt(cf, head_key, head.encode(), &wo)
            .map_err(|e| e.to_string())
    }

    /// Opens the journal of a mounted store: applies again every entry written after the
    /// head RocksDB holds, then starts a new generation (durable before any new entry).
    pub async fn open(
        dev: Arc<D>,
        db: Arc<DB>,
        region: JournalRegion,
        cfs: Vec<String>,
        meta_cf: &str,
        head_key: &'static [u8],
    ) -> Result<(Journal<D>, Replayed), String> {
        let cf = db
            .cf_handle(meta_cf)
            .ok_or_else(|| format!("column family {meta_cf} is missing"))?;
        let bytes = db
            .get_cf(cf, head_key)
            .map_err(|e| e.to_string())?
            .ok_or("the store has a journal but its metadata has no journal head")?;
        let mut head = JournalHead::decode(&bytes)?;
        let mut replayed = Replayed {
            entries: 0,
            batches: 0,
        };
        let start = head.next;
        while let Some((at, entry)) = Self::find_next(&*dev, region, &head, start).await? {
            let h = decode_header(&entry[..BLOCK_SIZE]).ok_or("journal entry changed")?;
            let batches = decode_payload(&entry, &h).ok_or("journal entry changed")?;
            for b in &batches {
                db.write_opt(WriteBatch::from_data(b), &no_wal())
                    .map_err(|e| format!("applying journal entry {}: {e}", h.seq))?;
            }
            replayed.entries += 1;
            replayed.batches += batches.len() as u64;
            head.seq = h.seq;
            head.next = at + u64::from(h.blocks);
        }
        // A new generation, durable (with everything applied above) before the first new
        // entry: entries of earlier runs can never pass for the next one.
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
                queue: Vec::new(),
                leading: false,
                flushing: false,
                failed: None,
            }),
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
            replayed,
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
            let Some(h) = decode_header(&first) else {
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
            if decode_payload(&entry, &h).is_some() {
                return Ok(Some((at, entry)));
            }
        }
        Ok(None)
    }

    /// Commits `batch` durably: it is in the journal when this returns Ok, and applied to
    /// the memtables (readable).
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let lead_now = {
            let mut st = lock(&self.inner.state)?;
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            st.queue.push((batch, tx));
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
        let more = payload + 4 + st.queue[n].0.data().len();
        if entry_blocks(more) > max_blocks {
            if n == 0 {
                // Nothing was written: fail only this commit.
                let (_, tx) = st.queue.remove(0);
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
        answers.extend(st.queue.drain(..).map(|(_, tx)| (tx, Err(why.clone()))));
    }
    answers.extend(group.into_iter().map(|(_, tx)| (tx, Err(why.clone()))));
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
        let datas: Vec<&[u8]> = group.iter().map(|(b, _)| b.data()).collect();
        encode_entry(region.id, gen, seq, &datas)
    };
    let n = entry.blocks() as u64;
    let at = match reserve(inner, n).await {
        Ok(at) => at,
        Err(e) => return fail(inner, group, e, answers),
    };
    if let Err(e) = inner.dev.write(region.device_block(at), entry).await {
        return fail(inner, group, format!("journal write: {e}"), answers);
    }
    // The head rides in the entry's last batch. SST files may hold the batches before it
    // with the older head; replay then applies them again, which changes nothing (the same
    // puts and deletes in the same order, and no later entry was applied yet).
    let head = JournalHead {
        gen,
        seq,
        next: at + n,
    };
    let Some(cf) = inner.db.cf_handle(&inner.meta_cf) else {
        return fail(
            inner,
            group,
            "the meta column family is missing".into(),
            answers,
        );
    };
    if let Some((last, _)) = group.last_mut() {
        last.put_cf(cf, inner.head_key, head.encode());
    }
    let wo = no_wal();
    let mut group = group.into_iter();
    while let Some((batch, tx)) = group.next() {
        if let Err(e) = inner.db.write_opt(batch, &wo) {
            // The batches before this one are durable and applied: they succeeded.
            answers.push((tx, Err(e.to_string())));
            let why = format!("applying a journaled commit to the memtables: {e}");
            return fail(inner, group.collect(), why, answers);
        }
        answers.push((tx, Ok(())));
    }
    // Ask for a flush once half the journal is in use, so writers rarely wait for space.
    let ask = match lock(&inner.state) {
        Ok(mut st) if !st.flushing && st.next - st.tail > region.blocks / 2 => {
            st.flushing = true;
            Some(st.next)
        }
        _ => None,
    };
    if let Some(upto) = ask {
        ask_flush(inner, upto);
    }
}

/// Asks the flush thread for a flush; false when it is gone (the store is closing).
fn ask_flush<D>(inner: &Inner<D>, upto: u64) -> bool {
    let sent = inner
        .flush_tx
        .lock()
        .ok()
        .and_then(|tx| tx.as_ref().map(|tx| tx.send(upto).is_ok()))
        == Some(true);
    if !sent {
        if let Ok(mut st) = inner.state.lock() {
            st.flushing = false;
        }
    }
    sent
}

/// Reserves `n` blocks for the next entry (waiting for a flush when the journal is full)
/// and returns the logical block where it goes.
async fn reserve<D: BlockDevice>(inner: &Inner<D>, n: u64) -> Result<u64, String> {
    let region = inner.region;
    loop {
        let wake = inner.flushed.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let ask = {
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
            if st.flushing {
                None
            } else {
                st.flushing = true;
                Some(st.next)
            }
        };
        if let Some(upto) = ask {
            if !ask_flush(inner, upto) {
                return Err("the store is closing".into());
            }
        }
        wake.await;
    }
}

/// Flushes the memtables when asked, then frees the journal before the block it was asked
/// with (every entry before it was applied before the flush began).
fn flush_thread<D>(inner: Arc<Inner<D>>, rx: std::sync::mpsc::Receiver<u64>) {
    while let Ok(upto) = rx.recv() {
        let res = flush_all(&inner.db, &inner.cfs);
        if let Ok(mut st) = inner.state.lock() {
            st.flushing = false;
            match res {
                Ok(()) => st.tail = st.tail.max(upto),
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
        let region = JournalRegion {
            start: 1,
            blocks: 12,
            id: 77,
        };
        let big = vec![9u8; 2 * BLOCK_SIZE];
        let head = |gen, seq, next| JournalHead { gen, seq, next };
        let found = |h: JournalHead| {
            let dev = &dev;
            async move {
                JournalHead::decode(&h.encode()).expect("head round trip");
                Journal::find_next(dev, region, &h, h.next)
                    .await
                    .expect("read")
                    .map(|(at, e)| (at, decode_header(&e[..BLOCK_SIZE]).expect("h").seq))
            }
        };
        // seq 1 at logical 0 (one block), seq 2 at logical 1 (three blocks).
        dev.write(1, encode_entry(77, 5, 1, &[b"a"]))
            .await
            .expect("w");
        dev.write(2, encode_entry(77, 5, 2, &[&big]))
            .await
            .expect("w");
        assert_eq!(found(head(5, 0, 0)).await, Some((0, 1)));
        assert_eq!(found(head(5, 1, 1)).await, Some((1, 2)));
        assert_eq!(found(head(5, 2, 4)).await, None, "nothing written there");
        assert_eq!(found(head(6, 0, 0)).await, None, "an earlier generation's");
        assert_eq!(found(head(5, 1, 0)).await, None, "not the next sequence");
        // Another store's journal (a reused device): same generation and sequence.
        dev.write(5, encode_entry(78, 5, 3, &[b"b"]))
            .await
            .expect("w");
        assert_eq!(found(head(5, 2, 4)).await, None, "another journal's entry");
        // seq 3 (three blocks) does not fit at logical 10 of 12: it went to the next lap.
        dev.write(1, encode_entry(77, 5, 3, &[&big]))
            .await
            .expect("w");
        assert_eq!(found(head(5, 2, 10)).await, Some((12, 3)));
        // Torn: its last block never reached the device.
        dev.write(3, AlignedBuf::zeroed(1)).await.expect("w");
        let torn = found(head(5, 2, 10)).await;
        assert_eq!(torn, None, "a torn entry ends the replay");
    }

    #[test]
    fn entries_round_trip_and_damage_is_refused() {
        let a = vec![7u8; 5000];
        let b = b"second".to_vec();
        let e = encode_entry(9, 3, 42, &[&a, &b]);
        assert_eq!(e.blocks(), 2);
        let h = decode_header(&e[..BLOCK_SIZE]).expect("header");
        assert_eq!((h.journal_id, h.gen, h.seq, h.blocks), (9, 3, 42, 2));
        let got = decode_payload(&e, &h).expect("payload");
        assert_eq!(got, vec![&a[..], &b[..]]);
        // A torn entry (second block never written) fails its payload checksum.
        let mut torn = AlignedBuf::with_data(e.blocks(), 0, &e);
        torn.block_mut(1).fill(0);
        assert!(decode_payload(&torn, &h).is_none());
        // A damaged header is no entry at all.
        let mut bad = AlignedBuf::with_data(e.blocks(), 0, &e);
        bad[12] ^= 1;
        assert!(decode_header(&bad[..BLOCK_SIZE]).is_none());
        assert!(decode_header(&[0u8; BLOCK_SIZE]).is_none());
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
