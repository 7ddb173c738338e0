//! Mutations: copy-on-write writes, zeroing and deletion, and the allocation and release
//! of the blocks they use. See docs/objstore.md, "Crash safety: copy-on-write blocks".

use std::sync::atomic::Ordering;

use rocksdb::WriteBatch;
use store_types::blockdata::BlockData;
use store_types::wire::encode_record;

use super::deferred::deferred_max_blocks;
use super::format::{object_key, ObjMeta, RECORD_V};
use super::{block_span, meta_err, BlockStore, CF_BLOCKS, CF_OBJECTS};
use crate::aligned::AlignedBuf;
use crate::alloc::{Allocator, Extent};
use crate::blockmap::{self, BlockRef, MapSpan};
use crate::device::BlockDevice;
use crate::journal::CheckRun;
use crate::{LogOp, ObjError, ObjectId, Version, BLOCK_SIZE, MAX_OBJECT_BYTES};

/// What a copy-on-write commit records besides the block map.
struct Change<'a> {
    id: &'a ObjectId,
    meta: ObjMeta,
    created: bool,
    /// The PG log entry to append in the same batch (None for partial steps of one op).
    log: Option<LogOp>,
}

/// The crc32c of each block of `contents`: `known` for its first blocks (crcs that came
/// with the data, checked in debug builds), computed for the others.
fn block_crcs(contents: &AlignedBuf, known: &[u32]) -> Vec<u32> {
    (0..contents.blocks())
        .map(|i| match known.get(i) {
            Some(&crc) => {
                debug_assert_eq!(crc, crc32c::crc32c(contents.block(i)), "block {i}");
                crc
            }
            None => crc32c::crc32c(contents.block(i)),
        })
        .collect()
}

/// Maps logical blocks `b0..` to `device_blocks`, whose data has `crcs`.
fn map_new_blocks(
    map: &mut MapSpan,
    b0: u32,
    device_blocks: &[u64],
    crcs: &[u32],
) -> Result<(), String> {
    for (i, (crc, device_block)) in crcs.iter().zip(device_blocks).enumerate() {
        let r = BlockRef {
            device_block: *device_block,
            crc: *crc,
        };
        map.set(b0 + i as u32, Some(r))?;
    }
    Ok(())
}

/// A block partly zeroed: its number, its entry, and the bytes `from..to` in it to zero.
type ZeroEdge = (u32, BlockRef, u64, u64);

/// The mapped blocks of `refs` (the map from block `b0`) that the zeroed bytes `range`
/// cover whole, to unmap, and those it covers in part, to rewrite.
fn split_zeroed(
    b0: u32,
    refs: &[Option<BlockRef>],
    range: std::ops::Range<u64>,
) -> (Vec<(u32, BlockRef)>, Vec<ZeroEdge>) {
    let (offset, end) = (range.start, range.end);
    let bs = BLOCK_SIZE as u64;
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
    (deletes, edges)
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

impl<D: BlockDevice> BlockStore<D> {
    /// [`crate::ObjectStore::write`].
    pub(super) async fn write_object(
        &self,
        id: &ObjectId,
        offset: u64,
        data: BlockData,
        version: Version,
    ) -> Result<(), ObjError> {
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
            let created = meta.is_none();
            return self
                .write_nothing(id, &okey, offset, new_meta, created)
                .await;
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
        self.merge_partial_edges(id, b0, &old, &mut contents, start..stop)
            .await?;
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

    /// A write of no bytes: the object's size (at least `offset`) and version, and its
    /// log entry, without a block.
    async fn write_nothing(
        &self,
        id: &ObjectId,
        okey: &[u8],
        offset: u64,
        new_meta: ObjMeta,
        created: bool,
    ) -> Result<(), ObjError> {
        let cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, okey, encode_record(RECORD_V, &new_meta));
        let op = LogOp::Write { offset, len: 0 };
        self.log_into(&mut batch, id, new_meta.version, op).await?;
        let res = self.commit(batch).await;
        self.meta_committed(okey, &res, Some(new_meta));
        res?;
        if created {
            self.objects.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Partial edge blocks keep their other bytes: reads the old first and last blocks
    /// (`old`, the map of the blocks from `b0`) where the new data, at bytes `new` of
    /// `contents`, does not cover them whole, verifies them, and merges what the new data
    /// does not cover.
    async fn merge_partial_edges(
        &self,
        id: &ObjectId,
        b0: u32,
        old: &[Option<BlockRef>],
        contents: &mut AlignedBuf,
        new: std::ops::Range<usize>,
    ) -> Result<(), ObjError> {
        let (start, stop) = (new.start, new.end);
        // Offsets within the span: the first block is partial unless the data starts at
        // its start, the last unless the data ends at its end.
        let head_partial = start != 0;
        let tail_partial = !stop.is_multiple_of(BLOCK_SIZE);
        let last = old.len() - 1;
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
        Ok(())
    }

    /// [`crate::ObjectStore::zero`].
    pub(super) async fn zero_range(
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
        // Whole blocks are unmapped (freed); partial edge blocks that hold data are rewritten.
        let (deletes, edges) = split_zeroed(b0, &refs, offset..end);
        self.zero_edges(id, &okey, meta, edges).await?;
        let freeing = block_runs(deletes.iter().map(|(_, r)| r.device_block));
        self.check_in_use(&freeing)?;
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
        self.log_into(&mut batch, id, version, LogOp::Zero { offset, len })
            .await?;
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
        self.release(freeing)
    }

    /// Rewrites the partially zeroed blocks `edges` (block, its entry, bytes to zero) of
    /// an object whose metadata is `meta`, each in a commit of its own.
    async fn zero_edges(
        &self,
        id: &ObjectId,
        okey: &[u8],
        meta: Option<ObjMeta>,
        edges: Vec<ZeroEdge>,
    ) -> Result<(), ObjError> {
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
            let map = self.map_span(okey, b, b + 1)?;
            self.cow_commit(okey, b, contents, map, change, &[]).await?;
        }
        Ok(())
    }

    /// [`crate::ObjectStore::delete`].
    pub(super) async fn delete_object(
        &self,
        id: &ObjectId,
        version: Version,
    ) -> Result<bool, ObjError> {
        let okey = object_key(id);
        let _guard = self.lock(&okey).write().await;
        let Some(meta) = self.get_meta(&okey)? else {
            return Ok(false);
        };
        Self::check_version(id, Some(meta), version)?;
        let (_, b1) = block_span(0, meta.size);
        let refs = self.block_refs(&okey, 0, b1.max(1))?;
        let freeing = block_runs(refs.iter().flatten().map(|r| r.device_block));
        self.check_in_use(&freeing)?;
        let blocks_cf = self.db.cf_handle(CF_BLOCKS).expect("column family exists");
        let objects_cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let mut batch = WriteBatch::default();
        blockmap::delete_object(&mut batch, blocks_cf, &okey);
        batch.delete_cf(objects_cf, &okey);
        self.log_into(&mut batch, id, version, LogOp::Delete)
            .await?;
        let res = self.commit(batch).await;
        self.map_cache.forget_object(&okey, b1);
        self.meta_committed(&okey, &res, None);
        res?;
        self.objects.fetch_sub(1, Ordering::Relaxed);
        self.release(freeing)?;
        Ok(true)
    }

    /// Writes new contents for logical blocks `b0..` (copy-on-write) and commits the block
    /// map, the object metadata and the PG log entry in one batch. Small writes are
    /// deferred (see [`super::DEFERRED_MAX_BLOCKS`]): their data rides in the commit, and the
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
        let freeing = block_runs(old.iter().flatten().map(|r| r.device_block));
        let deferred = contents.blocks() <= deferred_max_blocks();
        let extents = self.alloc(n, deferred, &freeing)?;
        let crcs = block_crcs(&contents, known_crcs);
        let blocks_cf = self.db.cf_handle(CF_BLOCKS).expect("column family exists");
        let objects_cf = self.db.cf_handle(CF_OBJECTS).expect("column family exists");
        let mut batch = WriteBatch::default();
        let device_blocks: Vec<u64> = extents
            .iter()
            .flat_map(|e| e.start..e.start + e.len)
            .collect();
        if let Err(e) = map_new_blocks(&mut map, b0, &device_blocks, &crcs) {
            // A refused release is logged; this error is the write's.
            let _ = self.release(extents);
            return Err(meta_err(e));
        }
        map.write(&mut batch, blocks_cf, okey);
        self.remove_flushed_records(&mut batch)?;
        batch.put_cf(objects_cf, okey, encode_record(RECORD_V, &change.meta));
        if let Some(op) = change.log {
            self.log_into(&mut batch, change.id, change.meta.version, op)
                .await?;
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
                let _ = self.release(extents); // a refusal is logged, as above
            }
            return Err(e);
        }
        map.committed(&self.map_cache, okey);
        if change.created {
            self.objects.fetch_add(1, Ordering::Relaxed);
        }
        // The commit stands (it is durable) even if the release is refused: the error then
        // reports the corruption.
        self.release(freeing)
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

    /// Takes `n` blocks; `small` for a deferred write (see
    /// [`crate::alloc::Allocator::alloc_small`]). `freeing`: the blocks the commit will free;
    /// if the allocator holds one of them as free already, the commit is refused before
    /// anything changes (see [`BlockStore::check_in_use`]).
    fn alloc(&self, n: u64, small: bool, freeing: &[Extent]) -> Result<Vec<Extent>, ObjError> {
        let mut a = self
            .alloc
            .lock()
            .map_err(|_| ObjError::Metadata("allocator lock poisoned".into()))?;
        check_in_use(&mut a, freeing)?;
        let free = a.free_blocks();
        let got = if small { a.alloc_small(n) } else { a.alloc(n) };
        if let Some(e) = a.failure() {
            return Err(e.clone().into());
        }
        got.ok_or(ObjError::NoSpace {
            need_blocks: n,
            free_blocks: free,
        })
    }

    /// Refuses a commit that would free blocks the allocator holds as free already: the
    /// block map and the allocator disagree, and freeing them again would let two objects
    /// have them. Called before the commit is sent, so the refusal changes nothing; from
    /// then on the store allocates nothing until it is opened again (the mount rebuilds
    /// the free space from the block map).
    pub(super) fn check_in_use(&self, freeing: &[Extent]) -> Result<(), ObjError> {
        if freeing.is_empty() {
            return Ok(());
        }
        let mut a = self
            .alloc
            .lock()
            .map_err(|_| ObjError::Metadata("allocator lock poisoned".into()))?;
        check_in_use(&mut a, freeing)
    }

    /// Returns the blocks a commit freed (or that a failed write took) to the allocator.
    /// Errors if it refuses some as free already (a double free, logged; the others are
    /// freed): [`Self::check_in_use`] let the commit through, so something freed them in
    /// between, and the store allocates nothing more until it is opened again.
    pub(super) fn release(
        &self,
        extents: impl IntoIterator<Item = Extent>,
    ) -> Result<(), ObjError> {
        let Ok(mut d) = self.deferred.lock() else {
            return Ok(()); // poisoned: leak the blocks rather than risk reusing them
        };
        // Blocks still pending a deferred write are freed once it is done; the rest go
        // back as runs (one allocator update per run, not per block).
        let blocks = extents.into_iter().flat_map(|e| e.start..e.start + e.len);
        let runs = block_runs(blocks.filter(|b| {
            let pending = d.pending.contains_key(b);
            if pending {
                d.free_when_written.insert(*b);
            }
            !pending
        }));
        drop(d);
        let Ok(mut a) = self.alloc.lock() else {
            return Ok(()); // poisoned: leak, as above
        };
        let mut refused = None;
        for e in runs {
            if let Err(err) = a.free_extent(e) {
                tracing::error!(
                    start = e.start,
                    blocks = e.len,
                    "refused to free blocks that are free already (the block map and the allocator disagree); the store allocates nothing until it is opened again: {err}"
                );
                refused.get_or_insert(err);
            }
        }
        refused.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// Checks that no block of `extents` is free (see [`BlockStore::check_in_use`]).
fn check_in_use(a: &mut Allocator, extents: &[Extent]) -> Result<(), ObjError> {
    for e in extents {
        if let Err(err) = a.check_in_use(*e) {
            tracing::error!(
                start = e.start,
                blocks = e.len,
                "refusing a commit that would free blocks that are free already (the block map and the allocator disagree); the store allocates nothing until it is opened again: {err}"
            );
            return Err(err.into());
        }
    }
    Ok(())
}

/// `blocks` as runs of adjacent blocks, in their order.
pub(super) fn block_runs(blocks: impl IntoIterator<Item = u64>) -> Vec<Extent> {
    let mut runs: Vec<Extent> = Vec::new();
    for b in blocks {
        match runs.last_mut() {
            Some(r) if r.start + r.len == b => r.len += 1,
            _ => runs.push(Extent { start: b, len: 1 }),
        }
    }
    runs
}
