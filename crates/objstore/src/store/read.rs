//! Reads, checksum-verified block by block, and the queries of an object's block map
//! (`allocated`, `stat`).

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use store_types::blockdata::BlockData;

use super::format::object_key;
use super::{block_span, meta_err, zero_block_crc, BlockStore};
use crate::aligned::AlignedBuf;
use crate::blockmap::BlockRef;
use crate::device::BlockDevice;
use crate::{ObjError, ObjectId, ObjectStat, BLOCK_SIZE, MAX_IO_BYTES, MAX_OBJECT_BYTES};

/// Device reads one object read keeps in flight when its blocks are fragmented.
const READ_RUNS_IN_FLIGHT: usize = 32;

/// What [`BlockStore::read_blocks`] found: one buffer per logical block (None for holes),
/// and the whole range as one buffer when a single device read covered every block.
pub(super) struct BlocksRead {
    pub(super) blocks: Vec<Option<Bytes>>,
    whole: Option<Bytes>,
}

impl<D: BlockDevice> BlockStore<D> {
    /// [`crate::ObjectStore::read_data`].
    pub(super) async fn read_object(
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

    /// [`crate::ObjectStore::allocated`].
    pub(super) async fn allocated_ranges(
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

    /// [`crate::ObjectStore::stat`].
    pub(super) async fn stat_object(&self, id: &ObjectId) -> Result<Option<ObjectStat>, ObjError> {
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

    /// Reads mapped blocks and verifies every checksum. Device-contiguous runs are read as
    /// one request each, and the runs of a fragmented range are read concurrently (at most
    /// [`READ_RUNS_IN_FLIGHT`] at once). The blocks share the buffers they were read
    /// into: no copy here.
    pub(super) async fn read_blocks(
        &self,
        id: &ObjectId,
        b0: u32,
        refs: &[Option<BlockRef>],
    ) -> Result<BlocksRead, ObjError> {
        let mut out: Vec<Option<Bytes>> = vec![None; refs.len()];
        let mut refs = refs.to_vec();
        self.take_pending(id, b0, &mut refs, &mut out)?;
        let runs = device_runs(&refs);
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

    /// Blocks whose deferred write has not reached the device yet come from memory: moves
    /// those of `refs` (the map from block `b0`) into `out`, checksum verified, and leaves
    /// None in their place in `refs`.
    fn take_pending(
        &self,
        id: &ObjectId,
        b0: u32,
        refs: &mut [Option<BlockRef>],
        out: &mut [Option<Bytes>],
    ) -> Result<(), ObjError> {
        let d = self
            .deferred
            .lock()
            .map_err(|_| meta_err("deferred lock poisoned"))?;
        if d.pending.is_empty() {
            return Ok(());
        }
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
        Ok(())
    }
}

/// (first logical index, blocks, first device block) of each run of `refs` that is
/// contiguous on the device.
fn device_runs(refs: &[Option<BlockRef>]) -> Vec<(usize, usize, u64)> {
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
    runs
}
