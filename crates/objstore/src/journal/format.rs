//! The journal's on-device formats: its region (recorded in the superblock), its head
//! (recorded in RocksDB), and its entries (header, payload, checks). See the module
//! documentation of [`crate::journal`] for the entry layout.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use store_types::wire::{decode_record, encode_record};

use crate::aligned::AlignedBuf;
use crate::BLOCK_SIZE;

pub(super) const ENTRY_MAGIC: [u8; 8] = *b"STJRNL01";
/// Bytes before an entry's payload: magic, header length, header, header checksum.
pub(super) const HEADER_AREA: usize = 64;
/// Entries of version 1 hold batches only; version 2 entries hold (batch, side data) pairs;
/// version 3 entries add, after the pairs, the checks of their unflushed data.
pub(super) const ENTRY_V1: u16 = 1;
pub(super) const ENTRY_V2: u16 = 2;
pub(super) const ENTRY_V: u16 = 3;
/// The version of an entry's list of [`CheckRun`]s.
pub(super) const CHECKS_V: u16 = 1;
pub(super) const HEAD_V1: u16 = 1;
pub(super) const HEAD_V: u16 = 2;
/// Smallest and largest journal, in blocks (1 MiB and 64 MiB).
pub(super) const MIN_BLOCKS: u64 = 256;
pub(super) const MAX_BLOCKS: u64 = 16 << 10;

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
    pub(super) fn device_block(&self, logical: u64) -> u64 {
        self.start + logical % self.blocks
    }

    /// Where an entry of `n` blocks goes when the next free logical block is `next`: there,
    /// or at the start of the next lap when it would run past the region's end (entries
    /// never wrap).
    pub(super) fn place(&self, next: u64, n: u64) -> u64 {
        let off = next % self.blocks;
        if off + n > self.blocks {
            next.saturating_add(self.blocks - off)
        } else {
            next
        }
    }

    /// Largest entry in blocks: a quarter of the journal, so that an entry always fits
    /// once the flush of what precedes it has freed the space.
    pub(super) fn max_entry_blocks(&self) -> u64 {
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
pub(super) struct JournalHeadV1 {
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
    pub(super) fn with_holds(
        gen: u64,
        seq: u64,
        next: u64,
        oldest: Option<(u64, u64)>,
    ) -> JournalHead {
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
pub(super) struct EntryHeader {
    pub(super) journal_id: u64,
    pub(super) gen: u64,
    pub(super) seq: u64,
    pub(super) blocks: u32,
    pub(super) payload_bytes: u32,
    pub(super) payload_crc: u32,
}

/// Blocks of an entry holding batches of `payload_bytes` (lengths included).
pub(super) fn entry_blocks(payload_bytes: usize) -> u64 {
    (HEADER_AREA + payload_bytes).div_ceil(BLOCK_SIZE) as u64
}

/// One commit in an entry: a `WriteBatch`'s bytes and its side data (in parts, written
/// one after the other; empty when there is none).
pub(super) type Item<'a> = (&'a [u8], &'a [Bytes]);

/// Blocks a commit's batch names whose data was written to the device but not flushed:
/// `crcs[i]` is the crc32c of device block `start + i`. The journal write's own flush
/// (RWF_DSYNC) makes that data durable with the entry, so such a commit needs no flush
/// of its own before it; replay checks them for the last entry (see [`super::Journal::recover`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRun {
    pub start: u64,
    pub crcs: Vec<u32>,
}

/// Payload bytes of `item`, lengths included.
pub(super) fn item_bytes((batch, side): &Item<'_>) -> usize {
    8 + batch.len() + side.iter().map(|p| p.len()).sum::<usize>()
}

/// At most the encoded size of `checks` (varints: a block number takes at most 10 bytes,
/// a crc or a length 5), its length field included.
pub(super) fn checks_bytes_bound(checks: &[CheckRun]) -> usize {
    16 + checks.iter().map(|c| 15 + 5 * c.crcs.len()).sum::<usize>()
}

/// Encodes one entry holding `items`, in whole blocks: per item, the batch and then the
/// side data, each after its u32 length; then `checks` (a versioned record) after its
/// length.
pub(super) fn encode_entry(
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
pub(super) fn seal(
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
pub(super) fn decode_header(block0: &[u8]) -> Option<(EntryHeader, u16)> {
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
pub(super) type Decoded<'a> = (Vec<(&'a [u8], &'a [u8])>, Vec<CheckRun>);

/// The commits and checks of a whole entry whose header is `h` (of `version`), if its
/// payload is intact. Version 1 entries have no side data, versions 1 and 2 no checks.
pub(super) fn decode_payload<'a>(
    entry: &'a [u8],
    h: &EntryHeader,
    version: u16,
) -> Option<Decoded<'a>> {
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
