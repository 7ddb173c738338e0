//! Deferred small writes: their data rides in the durable commit (as journal side data,
//! or a record in the `deferred` column family), is served from memory until a background
//! task has written it to its blocks, and is dropped from the journal or RocksDB once a
//! device flush has made those blocks durable. See docs/objstore.md, "Deferred small
//! writes".

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rocksdb::{IteratorMode, WriteBatch};
use store_types::wire::{decode_record, encode_record};

use super::format::{deferred_key, DeferredPlace, DeferredWrite, RECORD_V};
use super::{meta_err, BlockStore, Committer, CF_DEFERRED};
use crate::aligned::AlignedBuf;
use crate::alloc::{Allocator, Extent};
use crate::device::BlockDevice;
use crate::journal::Holds;
use crate::{ObjError, BLOCK_SIZE};

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
pub(super) fn deferred_max_blocks() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("STORE_DEFERRED_MAX_BLOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFERRED_MAX_BLOCKS)
    })
}

/// Applied deferred writes that trigger a device flush and the removal of their records.
pub(super) const DEFERRED_CLEAN_EVERY: usize = 64;

/// Deferred writes between their commit and their records' removal.
#[derive(Default)]
pub(super) struct Deferred {
    /// Device block → its committed contents, until written to the device: reads take
    /// them from here.
    pub(super) pending: HashMap<u64, Bytes>,
    /// Blocks freed while their deferred write was pending: freed once it is written
    /// (so a late write never lands on a block that was reused).
    pub(super) free_when_written: std::collections::HashSet<u64>,
    /// Records (or journal hold ids) whose blocks are written (not yet flushed).
    applied: Vec<u64>,
    /// Records whose blocks are flushed: the next copy-on-write commit removes them in its
    /// batch (stores without a journal; with one, the hold ids are released instead). A
    /// removal lost with a failed commit or a crash only means the record is written
    /// again at the next mount, where the block map still names its blocks.
    flushed: Vec<u64>,
}

/// One deferred write to put on the device.
pub(super) struct ApplyJob {
    seq: u64,
    blocks: Vec<(u64, Bytes)>,
}

/// Batches of deferred writes being written to the device at once.
pub(super) const APPLY_IN_FLIGHT: usize = 32;
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
pub(super) async fn apply_loop<D: BlockDevice>(
    dev: Arc<D>,
    state: Arc<Mutex<Deferred>>,
    alloc: Arc<Mutex<Allocator>>,
    holds: Option<Arc<Holds>>,
    mut rx: tokio::sync::mpsc::Receiver<ApplyJob>,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
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
            let Some(seqs) = applied_to_clean(&state, urgent) else {
                return;
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
                match job {
                    Some(job) => gather(job, &mut rx, &mut gathered, gather_timer.as_mut()),
                    None => closed = true,
                }
            }
            () = &mut gather_timer, if !gathered.is_empty() && !gather_timer.is_elapsed() => {}
            Some(done) = running.next(), if !running.is_empty() => {
                if !batch_written(&state, &alloc, holds.as_deref(), done) {
                    return;
                }
            }
        }
    }
    while running.next().await.is_some() {}
}

/// Held journal entries are released by [`apply_loop`] only: once it ends, for whatever
/// reason, commits must fail rather than wait for space held by them.
struct FailHolds(Option<Arc<Holds>>);

impl Drop for FailHolds {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.fail("the store's deferred-write task has stopped");
        }
    }
}

/// Adds `job`, and the jobs waiting behind it up to [`APPLY_BATCH_JOBS`], to `gathered`;
/// the first job of a batch starts the time it gathers for (`timer`).
fn gather(
    job: ApplyJob,
    rx: &mut tokio::sync::mpsc::Receiver<ApplyJob>,
    gathered: &mut Vec<ApplyJob>,
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
) {
    if gathered.is_empty() {
        let at =
            tokio::time::Instant::now() + std::time::Duration::from_millis(APPLY_GATHER_MAX_MS);
        timer.reset(at);
    }
    gathered.push(job);
    while gathered.len() < APPLY_BATCH_JOBS {
        match rx.try_recv() {
            Ok(j) => gathered.push(j),
            Err(_) => break,
        }
    }
}

/// The records (or journal hold ids) whose data is on its blocks, taken for a cleaning
/// round once there are [`DEFERRED_CLEAN_EVERY`] of them, or any when `urgent`. None if
/// the state's lock is poisoned.
fn applied_to_clean(state: &Mutex<Deferred>, urgent: bool) -> Option<Vec<u64>> {
    let mut st = state.lock().ok()?;
    let due = st.applied.len() >= DEFERRED_CLEAN_EVERY || (urgent && !st.applied.is_empty());
    Some(if due {
        std::mem::take(&mut st.applied)
    } else {
        Vec::new()
    })
}

/// After a batch of deferred writes (`done`: each job and whether all its blocks were
/// written): reads go to the device for the blocks written, the blocks freed meanwhile
/// are freed, and the written jobs wait for a cleaning round; a failed one fails the
/// journal's holds. False if the state's lock is poisoned.
fn batch_written(
    state: &Mutex<Deferred>,
    alloc: &Mutex<Allocator>,
    holds: Option<&Holds>,
    done: Vec<(ApplyJob, bool)>,
) -> bool {
    let Ok(mut st) = state.lock() else {
        return false;
    };
    for (job, ok) in done {
        for (block, _) in &job.blocks {
            if ok {
                st.pending.remove(block);
            }
            if st.free_when_written.remove(block) {
                if let Ok(mut a) = alloc.lock() {
                    let freed = Extent {
                        start: *block,
                        len: 1,
                    };
                    if let Err(e) = a.free_extent(freed) {
                        tracing::error!(
                            block,
                            "refused to free a block that is free already (the block map and the allocator disagree); the store allocates nothing until it is opened again: {e}"
                        );
                    }
                }
            }
        }
        if ok {
            st.applied.push(job.seq);
        } else if let Some(h) = holds {
            // Its journal entry would stay held: the data is written from the journal at
            // the next mount instead.
            h.fail("writing a small write's data to its blocks failed");
        }
    }
    true
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

impl<D: BlockDevice> BlockStore<D> {
    /// Writes a deferred write's blocks that the block map still names with its checksums
    /// (a block since freed and reused must not be overwritten); returns how many.
    pub(super) async fn rewrite_deferred(&self, rec: &DeferredWrite) -> Result<usize, ObjError> {
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
    pub(super) async fn replay_deferred(&self) -> Result<(), ObjError> {
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

    /// Commits a deferred write's `batch` with its data. With a journal, the data rides in
    /// the journal entry as side data, kept out of RocksDB, and goes to its blocks at once
    /// (they are new: nothing names them until the commit), released once flushed; the
    /// write task has it before the commit, so a caller that gives up cannot strand the
    /// journal's hold. Without one, the data is a record in the batch, and goes to its
    /// blocks after the commit. Either way readers find it in memory until it is written.
    pub(super) async fn commit_deferred(
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
                batch.put_cf(cf, deferred_key(seq), encode_record(RECORD_V, &rec));
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

    /// Adds the removal of the deferred records whose blocks are flushed to `batch`.
    pub(super) fn remove_flushed_records(&self, batch: &mut WriteBatch) -> Result<(), ObjError> {
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
                batch.delete_cf(cf, deferred_key(seq));
            }
        }
        Ok(())
    }
}
