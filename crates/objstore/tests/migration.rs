//! A store written before the block map was kept in chunks (one RocksDB record per
//! block, column family `blocks`) opens with every object intact: its map is moved into
//! chunk records at mount, in several batches, and the allocator knows every block in use.
//!
//! The legacy store is made from a current one by rewriting its map in the old layout,
//! which this test spells out on purpose: it is the on-disk format being kept readable.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use store_objstore::device::file::FileDevice;
use store_objstore::device::{create_file_device, FileFill};
use store_objstore::{BlockStore, ObjectId, ObjectStore, Version};

const FSID: &str = "migration-fsid";
const MIB: u64 = 1 << 20;
const CHUNK_BLOCKS: u32 = 16;
const CFS: [&str; 6] = ["meta", "objects", "blockmap", "blocks", "pglog", "deferred"];

#[derive(Serialize, Deserialize)]
struct BlockRef {
    device_block: u64,
    crc: u32,
}

#[derive(Serialize, Deserialize)]
struct Chunk {
    refs: Vec<Option<BlockRef>>,
}

fn record<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = 1u16.to_le_bytes().to_vec();
    out.extend(postcard::to_stdvec(v).unwrap());
    out
}

fn open_raw(db: &PathBuf) -> rocksdb::DB {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(false);
    rocksdb::DB::open_cf(&opts, db, CFS).unwrap()
}

/// Rewrites the chunk records as per-block records; returns how many.
fn to_legacy_layout(db: &PathBuf) -> usize {
    let db = open_raw(db);
    let (chunks, legacy) = (
        db.cf_handle("blockmap").unwrap(),
        db.cf_handle("blocks").unwrap(),
    );
    let mut batch = rocksdb::WriteBatch::default();
    let mut n = 0;
    for kv in db.iterator_cf(chunks, rocksdb::IteratorMode::Start) {
        let (k, v) = kv.unwrap();
        let (okey, c) = k.split_at(k.len() - 4);
        let chunk = u32::from_be_bytes(c.try_into().unwrap());
        let rec: Chunk = postcard::from_bytes(&v[2..]).unwrap();
        for (i, r) in rec.refs.iter().enumerate() {
            let Some(r) = r else { continue };
            let mut key = okey.to_vec();
            key.extend_from_slice(&(chunk * CHUNK_BLOCKS + i as u32).to_be_bytes());
            batch.put_cf(legacy, key, record(r));
            n += 1;
        }
        batch.delete_cf(chunks, &k);
    }
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo).unwrap();
    n
}

fn id(name: &str) -> ObjectId {
    ObjectId {
        pool: 1,
        pg: 3,
        name: name.into(),
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i * 13 % 241) as u8))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn a_per_block_map_is_moved_into_chunks_at_mount() {
    let tmp = tempfile::Builder::new()
        .prefix("migration-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let (dev, db) = (tmp.path().join("dev.img"), tmp.path().join("db"));
    create_file_device(&dev, 64 * MIB, FileFill::Reserve).unwrap();
    let s = BlockStore::create(FileDevice::open(&dev).unwrap(), &db, FSID, "uuid")
        .await
        .unwrap();
    // Objects: whole 4 MiB ones (more records than one migration batch moves), one with
    // holes and unaligned edges, one partly zeroed.
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut seq = 0;
    let put = |name: &str, offset: usize, data: Bytes, m: &mut BTreeMap<String, Vec<u8>>| {
        let v = m.entry(name.to_string()).or_default();
        if v.len() < offset + data.len() {
            v.resize(offset + data.len(), 0);
        }
        v[offset..offset + data.len()].copy_from_slice(&data);
    };
    for i in 0..5u8 {
        let name = format!("big{i}");
        for mib in 0..4usize {
            seq += 1;
            let data = pattern(i * 4 + mib as u8, MIB as usize);
            s.write(
                &id(&name),
                (mib as u64) * MIB,
                data.clone(),
                Version { epoch: 1, seq },
            )
            .await
            .unwrap();
            put(&name, mib * MIB as usize, data, &mut model);
        }
    }
    seq += 1;
    let data = pattern(77, 70_000);
    s.write(
        &id("holes"),
        300_123,
        data.clone(),
        Version { epoch: 1, seq },
    )
    .await
    .unwrap();
    put("holes", 300_123, data, &mut model);
    seq += 1;
    s.zero(&id("big1"), 100_000, 200_000, Version { epoch: 1, seq })
        .await
        .unwrap();
    put("big1", 100_000, Bytes::from(vec![0u8; 200_000]), &mut model);
    drop(s);

    let legacy = to_legacy_layout(&db);
    assert!(
        legacy > 4096,
        "more records ({legacy}) than one migration batch"
    );

    let s = BlockStore::open(FileDevice::open(&dev).unwrap(), &db, FSID)
        .await
        .unwrap();
    for (name, want) in &model {
        let got = s.read(&id(name), 0, want.len()).await.unwrap();
        assert!(got == want.as_slice(), "{name} differs after the migration");
    }
    // The allocator knows every block in use: new data lands elsewhere.
    seq += 1;
    let fresh = pattern(5, 8 * MIB as usize / 2);
    s.write(&id("fresh"), 0, fresh.clone(), Version { epoch: 1, seq })
        .await
        .unwrap();
    for (name, want) in &model {
        let got = s.read(&id(name), 0, want.len()).await.unwrap();
        assert!(
            got == want.as_slice(),
            "{name} overwritten after the migration"
        );
    }
    assert!(s.read(&id("fresh"), 0, fresh.len()).await.unwrap() == fresh);
    drop(s);

    // Nothing is left in the old layout.
    let raw = open_raw(&db);
    let left = raw
        .iterator_cf(
            raw.cf_handle("blocks").unwrap(),
            rocksdb::IteratorMode::Start,
        )
        .count();
    assert_eq!(left, 0);
}
