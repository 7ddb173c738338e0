//! Golden bytes of everything the store writes to the device and into RocksDB: each test
//! encodes a fixed value and compares it with bytes written out by hand, field by field.
//! A reordered enum variant, a changed field or a changed key layout fails here instead of
//! silently changing the format of existing stores. If one fails, the format changed: a
//! new record version (and a decoder for the old one) is needed, not new golden bytes.
//!
//! Records are `store_types::wire::encode_record`: a u16 LE version, then postcard
//! (integers as LEB128 varints, strings and byte strings after a varint length, `Option`
//! as 0 or 1 then the value, an enum variant as a varint index). The journal's own formats
//! are pinned in `crate::journal::golden`, the block map's in `crate::blockmap`.

use bytes::Bytes;
use rocksdb::WriteBatch;
use store_types::wire::encode_record;

use super::db::{open_db, ALL_CFS};
use super::format::{
    deferred_key, log_key, object_key, parse_superblock, pg_state_key, superblock, DeferredPlace,
    DeferredWrite, Identity, ObjMeta, KEY_IDENTITY, KEY_JOURNAL, RECORD_V,
};
use crate::journal::JournalRegion;
use crate::{LogOp, ObjectId, PgCopyState, PgLogEntry, Version, BLOCK_SIZE};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn identity() -> Identity {
    Identity {
        fsid: "f".into(),
        osd_uuid: "u".into(),
        device_blocks: 1 << 20,
    }
}

/// Object "obj" of PG 0x2a of pool 1.
fn object() -> ObjectId {
    ObjectId {
        pool: 1,
        pg: 0x2a,
        name: "obj".into(),
    }
}

const OBJECT_KEY: &str = concat!(
    "00000001", // pool, u32 BE
    "0000002a", // pg, u32 BE
    "0003",     // name length, u16 BE
    "6f626a",   // "obj"
);

const IDENTITY_RECORD: &str = concat!(
    "0100",   // record version 1
    "0166",   // fsid: length 1, "f"
    "0175",   // osd_uuid: length 1, "u"
    "808040", // device_blocks: 1 << 20
);

const VERSION_7_300: &str = concat!(
    "07",   // epoch 7
    "ac02", // seq 300
);

#[test]
fn golden_identity_record_and_meta_keys() {
    assert_eq!(hex(&encode_record(RECORD_V, &identity())), IDENTITY_RECORD);
    assert_eq!(KEY_IDENTITY, b"identity");
    assert_eq!(KEY_JOURNAL, b"journal");
}

/// The superblock of a store without a journal: magic, the identity record after its
/// u32 LE length, zeros, and the crc32c of everything before it (LE) in the last 4 bytes.
#[test]
fn golden_superblock_without_journal() {
    let sb = superblock(&identity(), None);
    let head = concat!(
        "53544f5245444556", // "STOREDEV"
        "09000000",         // identity record length, u32 LE
    );
    let head = format!("{head}{IDENTITY_RECORD}");
    assert_eq!(hex(&sb[..head.len() / 2]), head);
    assert!(sb[head.len() / 2..BLOCK_SIZE - 4].iter().all(|b| *b == 0));
    assert_eq!(hex(&sb[BLOCK_SIZE - 4..]), "45461bed", "crc32c, LE");
    assert_eq!(parse_superblock(&sb), Ok((identity(), None)));
}

/// The superblock of a store with a commit journal: another magic, and the journal region
/// record after the identity record.
#[test]
fn golden_superblock_with_journal() {
    let region = JournalRegion {
        start: 1,
        blocks: 1 << 14,
        id: 0x0102_0304_0506_0708,
    };
    let sb = superblock(&identity(), Some(region));
    let head = format!(
        "{magic}{len}{IDENTITY_RECORD}{jlen}{region}",
        magic = "53544f5245444a31", // "STOREDJ1"
        len = "09000000",           // identity record length, u32 LE
        jlen = "0f000000",          // region record length, u32 LE
        region = concat!(
            "0100",               // record version 1
            "01",                 // start 1
            "808001",             // blocks 1 << 14
            "888e98a8c0e0808101", // id 0x0102030405060708
        ),
    );
    assert_eq!(hex(&sb[..head.len() / 2]), head);
    assert!(sb[head.len() / 2..BLOCK_SIZE - 4].iter().all(|b| *b == 0));
    assert_eq!(hex(&sb[BLOCK_SIZE - 4..]), "019e6114", "crc32c, LE");
    assert_eq!(parse_superblock(&sb), Ok((identity(), Some(region))));
}

/// `objects`: object key → (size, version).
#[test]
fn golden_object_key_and_metadata() {
    assert_eq!(hex(&object_key(&object())), OBJECT_KEY);
    let meta = ObjMeta {
        size: 4 << 20,
        version: Version { epoch: 7, seq: 300 },
    };
    let want = format!("0100{size}{VERSION_7_300}", size = "80808002");
    assert_eq!(hex(&encode_record(RECORD_V, &meta)), want);
}

/// `pglog`: PG + version (BE) → entry, for every operation.
#[test]
fn golden_pg_log_keys_and_entries() {
    let v = Version {
        epoch: 7,
        seq: 0x0102,
    };
    let key = concat!(
        "00000001",         // pool, u32 BE
        "0000002a",         // pg, u32 BE
        "0000000000000007", // epoch, u64 BE
        "0000000000000102", // seq, u64 BE
    );
    assert_eq!(hex(&log_key(1, 0x2a, v)), key);
    let entry = |op| PgLogEntry {
        version: Version { epoch: 7, seq: 300 },
        object: "obj".into(),
        op,
    };
    // Record version 1, the entry's version, object "obj"; then the operation: its
    // variant's index, then its fields.
    let head = format!("0100{VERSION_7_300}036f626a");
    let write = LogOp::Write {
        offset: 4096,
        len: 8192,
    };
    let zero = LogOp::Zero {
        offset: 4096,
        len: 8192,
    };
    let ops = [
        (write, concat!("00", "8020", "8040")), // Write, offset 4096, len 8192
        (zero, concat!("01", "8020", "8040")),  // Zero, offset 4096, len 8192
        (LogOp::Delete, "02"),                  // Delete
    ];
    for (op, tail) in ops {
        let got = hex(&encode_record(RECORD_V, &entry(op.clone())));
        assert_eq!(got, format!("{head}{tail}"), "{op:?}");
    }
}

/// `meta`: "pgstate/" + PG → the copy's state.
#[test]
fn golden_pg_state_key_and_record() {
    let key = concat!(
        "706773746174652f", // "pgstate/"
        "00000001",         // pool, u32 BE
        "0000002a",         // pg, u32 BE
    );
    assert_eq!(hex(&pg_state_key(1, 0x2a)), key);
    let fresh = PgCopyState::default();
    let want = concat!(
        "0100", // record version 1
        "01",   // complete
        "00",   // log_from: None
    );
    assert_eq!(hex(&encode_record(RECORD_V, &fresh)), want);
    let recovering = PgCopyState {
        complete: false,
        log_from: Some(Version { epoch: 7, seq: 300 }),
    };
    let want = format!(
        "{}{VERSION_7_300}",
        concat!(
            "0100", // record version 1
            "00",   // not complete
            "01",   // log_from: Some
        )
    );
    assert_eq!(hex(&encode_record(RECORD_V, &recovering)), want);
}

/// The deferred write's fields: the object key, first logical block, device blocks.
fn deferred_place_fields() -> String {
    format!(
        "{len}{OBJECT_KEY}{lblock}{blocks}",
        len = "0d",          // object key: length 13
        lblock = "03",       // lblock 3
        blocks = "0264c801", // two device blocks: 100, 200
    )
}

/// `deferred` (stores without a journal): sequence (u64 BE) → the small write's record.
#[test]
fn golden_deferred_record() {
    let rec = DeferredWrite {
        okey: object_key(&object()),
        lblock: 3,
        device_blocks: vec![100, 200],
        data: Bytes::from_static(b"data"),
    };
    let data = "0464617461"; // length 4, "data"
    let want = format!("0100{}{data}", deferred_place_fields());
    assert_eq!(hex(&encode_record(RECORD_V, &rec)), want);
    assert_eq!(hex(&deferred_key(5)), "0000000000000005", "its key: u64 BE");
}

/// The side data of a small write in a journal entry: a u32 LE length, the place record,
/// then the data as it is.
#[test]
fn golden_deferred_side_data() {
    let place = DeferredPlace {
        okey: object_key(&object()),
        lblock: 3,
        device_blocks: vec![100, 200],
    };
    let parts = place.side(Bytes::from_static(b"data"));
    let side: Vec<u8> = parts.concat();
    let want = format!(
        "{len}0100{fields}{data}",
        len = "15000000", // place record length (21), u32 LE
        fields = deferred_place_fields(),
        data = "64617461", // "data", as it is
    );
    assert_eq!(hex(&side), want);
    let back = DeferredPlace::from_side(&side).expect("decode");
    assert_eq!(
        (back.okey, back.lblock, back.device_blocks, back.data),
        (
            object_key(&object()),
            3,
            vec![100, 200],
            Bytes::from_static(b"data")
        )
    );
}

/// Journal entries hold RocksDB's own encoding of each batch (`WriteBatch::data`), which
/// names column families by the ids RocksDB gave them at creation, in [`ALL_CFS`]'s order.
/// Pinned here: a RocksDB upgrade that changed the encoding, or a change of the families
/// or their order, would make journals of existing stores replay into the wrong place.
#[test]
fn golden_column_families_and_journaled_batches() {
    assert_eq!(
        ALL_CFS,
        ["meta", "objects", "blockmap", "blocks", "pglog", "deferred"]
    );
    let (_tmp, _, dir) = crate::test_store_paths(64 << 10);
    let db = open_db(&dir, true, true).expect("create");
    let mut batch = WriteBatch::default();
    for name in ALL_CFS {
        batch.put_cf(db.cf_handle(name).expect("cf"), b"k", b"v");
    }
    let meta = db.cf_handle("meta").expect("cf");
    batch.delete_cf(meta, b"k");
    batch.delete_range_cf(db.cf_handle("pglog").expect("cf"), b"a", b"b");
    let puts: String = (1..=6)
        .map(|id| format!("05{id:02x}016b0176")) // put, cf id, "k", "v"
        .collect();
    let want = format!(
        "{seq}{count}{puts}{delete}{range}",
        seq = "0000000000000000", // sequence, u64 LE
        count = "08000000",       // records, u32 LE
        delete = "0401016b",      // delete, cf 1 (meta), "k"
        range = "0e0501610162",   // delete range, cf 5 (pglog), "a".."b"
    );
    assert_eq!(hex(batch.data()), want);
}
