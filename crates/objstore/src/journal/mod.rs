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

mod format;
#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use rocksdb::{FlushOptions, WriteBatch, WriteOptions, DB};
use tokio::sync::{oneshot, Notify};

use crate::aligned::AlignedBuf;
use crate::device::BlockDevice;
use crate::BLOCK_SIZE;

use format::{checks_bytes_bound, decode_header, decode_payload, encode_entry, entry_blocks};
use format::{item_bytes, Item};
pub use format::{CheckRun, JournalHead, JournalRegion};

/// Batches in one entry at most.
const GROUP_MAX_BATCHES: usize = 64;

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
