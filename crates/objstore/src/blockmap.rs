//! The block map's layout in RocksDB: one record per *chunk* of [`CHUNK_BLOCKS`] logical
//! blocks of an object, keyed `object key | chunk (u32 BE)`, holding the device block and
//! crc32c of each mapped block of the chunk.
//!
//! Why chunks: with one record per block, a 1 MiB write put 256 keys into the memtable and
//! the WAL of each OSD, and compaction rewrote them all (perf, all CPU samples in 1 MiB
//! writes: the OSDs' commit threads, which insert those keys and write and sync the WAL,
//! ~12%; RocksDB's flush and compaction threads ~6%). A chunk of 16 blocks costs a 4 KiB
//! write a read-modify-write of one record of about 170 bytes (estimated from its encoding),
//! which it already read to find the block it replaces.
//!
//! Stores written before chunks kept one record per block in the `blocks` column family;
//! [`migrate_legacy`] moves them into chunk records at mount.

use rocksdb::{ColumnFamily, Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use store_types::wire::{decode_record, encode_record};

use crate::cache::GenCache;

/// Logical blocks per block map record.
pub const CHUNK_BLOCKS: u32 = 16;
const CHUNK_V: u16 = 1;
/// Version of the legacy per-block records.
const LEGACY_V: u16 = 1;
/// Legacy records moved per committed migration batch (each batch ends at a chunk
/// boundary, so no chunk is ever half migrated).
const MIGRATE_BATCH_RECORDS: usize = 4096;

/// Where a logical block lives on the device, and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    pub device_block: u64,
    pub crc: u32,
}

/// One chunk's record: entry `i` maps logical block `chunk * CHUNK_BLOCKS + i`. Stored
/// without trailing holes; an all-hole chunk has no record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Chunk {
    refs: Vec<Option<BlockRef>>,
}

impl Chunk {
    fn get(&self, i: usize) -> Option<BlockRef> {
        self.refs.get(i).copied().flatten()
    }

    fn set(&mut self, i: usize, r: Option<BlockRef>) {
        if self.refs.len() <= i {
            if r.is_none() {
                return;
            }
            self.refs.resize(i + 1, None);
        }
        self.refs[i] = r;
        while self.refs.last().is_some_and(Option::is_none) {
            self.refs.pop();
        }
    }

    fn decode(v: &[u8]) -> Result<Chunk, String> {
        let c: Chunk = decode_record(CHUNK_V, v).map_err(|e| format!("block map record: {e}"))?;
        if c.refs.len() > CHUNK_BLOCKS as usize {
            return Err(format!(
                "block map record maps {} blocks, more than a chunk's {CHUNK_BLOCKS}",
                c.refs.len()
            ));
        }
        Ok(c)
    }
}

pub fn chunk_key(okey: &[u8], chunk: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(okey.len() + 4);
    k.extend_from_slice(okey);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

/// The chunk number of a key of `okey`'s map, or None for a key of another object.
fn chunk_of(okey: &[u8], key: &[u8]) -> Option<u32> {
    let rest = key.strip_prefix(okey).filter(|r| r.len() == 4)?;
    Some(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]))
}

/// Adds to `batch` the removal of every record of `okey`'s map.
pub fn delete_object(batch: &mut WriteBatch, cf: &ColumnFamily, okey: &[u8]) {
    batch.delete_range_cf(cf, chunk_key(okey, 0), chunk_key(okey, u32::MAX));
    batch.delete_cf(cf, chunk_key(okey, u32::MAX));
}

/// Recently used chunk records (an absent chunk as an empty one), so that the 4 KiB I/O of
/// a working set that fits does not look its block up in RocksDB each time (perf: ~9% of
/// an OSD's CPU in 4 KiB writes went to that lookup).
///
/// Coherence is the caller's: an entry is filled or changed only under the object's lock,
/// and changed after every commit that changes its chunk.
pub struct ChunkCache(GenCache<Chunk>);

impl ChunkCache {
    pub fn new(max_chunks: usize) -> ChunkCache {
        ChunkCache(GenCache::new(max_chunks))
    }

    fn get(&self, key: &[u8]) -> Option<Chunk> {
        self.0.get(key)
    }

    fn put(&self, key: Vec<u8>, c: Chunk) {
        self.0.put(key, c)
    }

    /// Forgets every chunk of `okey` below logical block `blocks` (after a delete).
    pub fn forget_object(&self, okey: &[u8], blocks: u32) {
        self.forget_object_chunks(okey, 0..=blocks / CHUNK_BLOCKS);
    }

    fn forget_object_chunks(&self, okey: &[u8], chunks: impl Iterator<Item = u32>) {
        for chunk in chunks {
            self.0.remove(&chunk_key(okey, chunk));
        }
    }
}

/// The map of logical blocks `b0..b1` of one object (whole chunks), loaded to be read or
/// edited and written back in a batch.
pub struct MapSpan {
    first_chunk: u32,
    chunks: Vec<Chunk>,
    dirty: Vec<bool>,
}

impl MapSpan {
    /// Loads the chunks covering `b0..b1` (b0 < b1): from the cache or by point lookups
    /// for one or two chunks, by one range scan for more. Call with the object's lock held.
    pub fn load(
        db: &DB,
        cf: &ColumnFamily,
        cache: &ChunkCache,
        okey: &[u8],
        b0: u32,
        b1: u32,
    ) -> Result<MapSpan, String> {
        let (c0, c1) = (b0 / CHUNK_BLOCKS, (b1.max(b0 + 1) - 1) / CHUNK_BLOCKS);
        let n = (c1 - c0 + 1) as usize;
        let mut chunks = vec![Chunk::default(); n];
        if n <= 2 {
            for (i, c) in chunks.iter_mut().enumerate() {
                let key = chunk_key(okey, c0 + i as u32);
                if let Some(hit) = cache.get(&key) {
                    *c = hit;
                    continue;
                }
                if let Some(v) = db.get_pinned_cf(cf, &key).map_err(|e| e.to_string())? {
                    *c = Chunk::decode(&v)?;
                }
                cache.put(key, c.clone());
            }
        } else {
            let start = chunk_key(okey, c0);
            for kv in db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
                let (k, v) = kv.map_err(|e| e.to_string())?;
                let Some(c) = chunk_of(okey, &k).filter(|c| *c <= c1) else {
                    break;
                };
                let slot = c.checked_sub(c0).and_then(|i| chunks.get_mut(i as usize));
                let Some(slot) = slot else {
                    return Err(format!("block map scan from chunk {c0} met chunk {c}"));
                };
                *slot = Chunk::decode(&v)?;
            }
        }
        Ok(MapSpan {
            first_chunk: c0,
            dirty: vec![false; n],
            chunks,
        })
    }

    /// Chunk index within the span and entry within the chunk of logical block `b`.
    fn at(&self, b: u32) -> Option<(usize, usize)> {
        let c = (b / CHUNK_BLOCKS).checked_sub(self.first_chunk)? as usize;
        (c < self.chunks.len()).then_some((c, (b % CHUNK_BLOCKS) as usize))
    }

    /// The entry of logical block `b` (None for a hole or a block outside the span).
    pub fn get(&self, b: u32) -> Option<BlockRef> {
        self.at(b).and_then(|(c, i)| self.chunks[c].get(i))
    }

    /// The entries of logical blocks `b0..b1`.
    pub fn refs(&self, b0: u32, b1: u32) -> Vec<Option<BlockRef>> {
        (b0..b1).map(|b| self.get(b)).collect()
    }

    /// Maps (or, with None, unmaps) logical block `b`, which must lie in the span.
    pub fn set(&mut self, b: u32, r: Option<BlockRef>) -> Result<(), String> {
        let (c, i) = self
            .at(b)
            .ok_or_else(|| format!("block {b} is outside the loaded block map span"))?;
        self.chunks[c].set(i, r);
        self.dirty[c] = true;
        Ok(())
    }

    /// Puts the changed chunks into the cache: call once their batch is committed.
    pub fn committed(&self, cache: &ChunkCache, okey: &[u8]) {
        for (i, c) in self.chunks.iter().enumerate() {
            if self.dirty[i] {
                cache.put(chunk_key(okey, self.first_chunk + i as u32), c.clone());
            }
        }
    }

    /// Drops the changed chunks from the cache: call when their batch failed to commit
    /// (what RocksDB holds is then unknown until read again).
    pub fn failed(&self, cache: &ChunkCache, okey: &[u8]) {
        cache.forget_object_chunks(
            okey,
            (0..self.chunks.len())
                .filter(|i| self.dirty[*i])
                .map(|i| self.first_chunk + i as u32),
        );
    }

    /// Adds the changed chunks to `batch`: put, or delete once all holes.
    pub fn write(&self, batch: &mut WriteBatch, cf: &ColumnFamily, okey: &[u8]) {
        for (i, c) in self.chunks.iter().enumerate() {
            if !self.dirty[i] {
                continue;
            }
            let key = chunk_key(okey, self.first_chunk + i as u32);
            if c.refs.is_empty() {
                batch.delete_cf(cf, key);
            } else {
                batch.put_cf(cf, key, encode_record(CHUNK_V, c));
            }
        }
    }
}

/// Calls `f` with every mapped device block of every object.
pub fn for_each_device_block(
    db: &DB,
    cf: &ColumnFamily,
    mut f: impl FnMut(u64) -> Result<(), String>,
) -> Result<(), String> {
    for kv in db.iterator_cf(cf, IteratorMode::Start) {
        let (_, v) = kv.map_err(|e| e.to_string())?;
        for r in Chunk::decode(&v)?.refs.into_iter().flatten() {
            f(r.device_block)?;
        }
    }
    Ok(())
}

/// Moves every legacy per-block record (`legacy`: object key | block u32 BE → BlockRef)
/// into chunk records of `cf`, in synced batches that each put whole chunks and delete
/// their legacy records (a crash in between leaves a store this resumes from). Returns the
/// number of records moved.
pub fn migrate_legacy(db: &DB, legacy: &ColumnFamily, cf: &ColumnFamily) -> Result<u64, String> {
    let mut moved = 0u64;
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    loop {
        let mut batch = WriteBatch::default();
        let mut in_batch = 0usize;
        // (object key, chunk) being gathered, and its record so far.
        let mut current: Option<(Vec<u8>, u32, Chunk)> = None;
        let mut ended = true;
        for kv in db.iterator_cf(legacy, IteratorMode::Start) {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            if k.len() < 4 {
                return Err(format!("legacy block map key of {} bytes", k.len()));
            }
            let (okey, b) = k.split_at(k.len() - 4);
            let block = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let r: BlockRef =
                decode_record(LEGACY_V, &v).map_err(|e| format!("legacy block map: {e}"))?;
            let chunk = block / CHUNK_BLOCKS;
            let same = matches!(&current, Some((o, c, _)) if o == okey && *c == chunk);
            if !same {
                if let Some((o, c, rec)) = current.take() {
                    put_merged(db, cf, &mut batch, &o, c, rec)?;
                    if in_batch >= MIGRATE_BATCH_RECORDS {
                        ended = false;
                        break;
                    }
                }
                current = Some((okey.to_vec(), chunk, Chunk::default()));
            }
            if let Some((_, _, rec)) = current.as_mut() {
                rec.set((block % CHUNK_BLOCKS) as usize, Some(r));
            }
            batch.delete_cf(legacy, &k);
            in_batch += 1;
        }
        // Stopped at the batch bound: every chunk gathered is in the batch, and the record
        // that began the next chunk is left for the next round. Ran out: the last chunk.
        if let Some((o, c, rec)) = current.take() {
            put_merged(db, cf, &mut batch, &o, c, rec)?;
        }
        if in_batch == 0 {
            return Ok(moved);
        }
        db.write_opt(batch, &synced).map_err(|e| e.to_string())?;
        moved += in_batch as u64;
        if ended {
            return Ok(moved);
        }
    }
}

/// Puts `rec` for (`okey`, `chunk`) into `batch`, over any entries already migrated.
fn put_merged(
    db: &DB,
    cf: &ColumnFamily,
    batch: &mut WriteBatch,
    okey: &[u8],
    chunk: u32,
    rec: Chunk,
) -> Result<(), String> {
    let key = chunk_key(okey, chunk);
    let mut merged = match db.get_pinned_cf(cf, &key).map_err(|e| e.to_string())? {
        Some(v) => Chunk::decode(&v)?,
        None => Chunk::default(),
    };
    for (i, r) in rec.refs.into_iter().enumerate() {
        if r.is_some() {
            merged.set(i, r);
        }
    }
    batch.put_cf(cf, key, encode_record(CHUNK_V, &merged));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_keeps_no_trailing_holes() {
        let r = BlockRef {
            device_block: 9,
            crc: 1,
        };
        let mut c = Chunk::default();
        c.set(5, Some(r));
        assert_eq!(c.refs.len(), 6);
        c.set(2, Some(r));
        c.set(5, None);
        assert_eq!(c.refs.len(), 3);
        assert_eq!(c.get(2), Some(r));
        assert_eq!(c.get(9), None);
        c.set(2, None);
        assert!(c.refs.is_empty());
        c.set(15, None);
        assert!(c.refs.is_empty());
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Golden bytes of the block map's records (see `crate::store::golden` for the rules):
    /// `blockmap` (object key | chunk u32 BE → the chunk's entries), and the legacy
    /// per-block records of `blocks` (object key | block u32 BE → one entry), still read
    /// at mount to move them.
    #[test]
    fn golden_block_map_records() {
        let okey = b"\0\0\0\x01\0\0\0\x2a\0\x03obj";
        assert_eq!(
            hex(&chunk_key(okey, 3)),
            "000000010000002a00036f626a00000003"
        );
        let r = BlockRef {
            device_block: 300,
            crc: 0xdead_beef,
        };
        let mut chunk = Chunk::default();
        chunk.set(1, Some(r));
        let want = concat!(
            "0100",       // record version 1
            "02",         // two entries (no trailing holes)
            "00",         // block 0: a hole (None)
            "01",         // block 1: Some
            "ac02",       // device block 300
            "effdb6f50d", // crc 0xdeadbeef
        );
        assert_eq!(hex(&encode_record(CHUNK_V, &chunk)), want);
        assert_eq!(Chunk::decode(&encode_record(CHUNK_V, &chunk)), Ok(chunk));
        let legacy = [0x01, 0x00, 0xac, 0x02, 0xef, 0xfd, 0xb6, 0xf5, 0x0d];
        let got: BlockRef = decode_record(LEGACY_V, &legacy).expect("legacy record");
        assert_eq!(got, r);
    }

    #[test]
    fn keys_of_other_objects_are_not_chunks() {
        let okey = b"\0\0\0\x01\0\0\0\x07\0\x01a".to_vec();
        assert_eq!(chunk_of(&okey, &chunk_key(&okey, 3)), Some(3));
        let mut other = okey.clone();
        other.push(b'b');
        assert_eq!(chunk_of(&okey, &chunk_key(&other, 3)), None);
        assert_eq!(chunk_of(&okey, &okey), None);
    }
}
