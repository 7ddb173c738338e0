//! The journal's tests: entry and head formats (current and older versions), replay, and
//! the holds of side data.

use serde::Serialize;
use store_types::wire::encode_record;

use super::format::{
    seal, CHECKS_V, ENTRY_V, ENTRY_V1, ENTRY_V2, HEADER_AREA, HEAD_V1, MAX_BLOCKS,
};
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
