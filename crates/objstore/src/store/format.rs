//! What the store writes to the device and into RocksDB: the superblock, the keys of its
//! column families and the records it stores in them. Every record carries a format
//! version (`store_types::wire::encode_record`); the golden tests pin their bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use store_types::wire::{decode_record, encode_record};

use crate::aligned::AlignedBuf;
use crate::journal::JournalRegion;
use crate::{ObjectId, Version, BLOCK_SIZE};

pub(super) const RECORD_V: u16 = 1;
pub(super) const KEY_IDENTITY: &[u8] = b"identity";
/// The commit journal's head (see [`crate::journal`]); present exactly in stores with one.
pub(super) const KEY_JOURNAL: &[u8] = b"journal";
pub(super) const SUPERBLOCK_MAGIC: [u8; 8] = *b"STOREDEV";
/// The superblock magic of stores with a commit journal: a build from before journals
/// finds no superblock it knows and refuses the device, instead of mounting it without
/// replaying the journal and allocating the journal's blocks as data.
pub(super) const SUPERBLOCK_MAGIC_JOURNAL: [u8; 8] = *b"STOREDJ1";

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
pub(super) struct DeferredWrite {
    pub(super) okey: Vec<u8>,
    /// The first logical block written.
    pub(super) lblock: u32,
    /// The device block of each logical block, in order.
    pub(super) device_blocks: Vec<u64>,
    /// Whole blocks.
    pub(super) data: Bytes,
}

/// Where a small write's data goes, carried with its data as side data in the commit
/// journal (stores with a journal keep that data out of RocksDB).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DeferredPlace {
    pub(super) okey: Vec<u8>,
    pub(super) lblock: u32,
    pub(super) device_blocks: Vec<u64>,
}

impl DeferredPlace {
    /// The journal side data of a write of `data` here: a u32 length, this record, then
    /// the data itself (passed as its own part, not copied here).
    pub(super) fn side(&self, data: Bytes) -> Vec<Bytes> {
        let rec = encode_record(RECORD_V, self);
        let mut head = Vec::with_capacity(4 + rec.len());
        head.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        head.extend_from_slice(&rec);
        vec![Bytes::from(head), data]
    }

    pub(super) fn from_side(side: &[u8]) -> Result<DeferredWrite, String> {
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(super) struct ObjMeta {
    pub(super) size: u64,
    pub(super) version: Version,
}

pub(super) fn object_key(id: &ObjectId) -> Vec<u8> {
    let mut k = pg_prefix(id.pool, id.pg);
    k.extend_from_slice(&(id.name.len() as u16).to_be_bytes());
    k.extend_from_slice(id.name.as_bytes());
    k
}

pub(super) fn pg_prefix(pool: u32, pg: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(&pool.to_be_bytes());
    k.extend_from_slice(&pg.to_be_bytes());
    k
}

/// The superblock: magic, the identity record and, after it, the journal region record
/// (a zero length where there is none, as in superblocks written before journals).
pub(super) fn superblock(identity: &Identity, journal: Option<JournalRegion>) -> AlignedBuf {
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

pub(super) fn parse_superblock(buf: &[u8]) -> Result<(Identity, Option<JournalRegion>), String> {
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

/// Key of a deferred write's record in the `deferred` column family (stores without a
/// journal): its sequence, big-endian, so records sort in commit order.
pub(super) fn deferred_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(super) const PG_STATE_PREFIX: &[u8] = b"pgstate/";

/// Key of a PG copy's state in the meta column family.
pub(super) fn pg_state_key(pool: u32, pg: u32) -> Vec<u8> {
    let mut k = PG_STATE_PREFIX.to_vec();
    k.extend_from_slice(&pg_prefix(pool, pg));
    k
}

pub(super) fn log_key(pool: u32, pg: u32, v: Version) -> Vec<u8> {
    let mut k = pg_prefix(pool, pg);
    k.extend_from_slice(&v.epoch.to_be_bytes());
    k.extend_from_slice(&v.seq.to_be_bytes());
    k
}
