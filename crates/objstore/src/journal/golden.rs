//! Golden bytes of the journal's formats (see `crate::store::golden` for the rules): the
//! head it records in RocksDB, and its entries on the device, the current version written
//! and checked byte for byte, the older ones read from bytes written out by hand. The
//! region record is pinned with the superblock that holds it.

use bytes::Bytes;
use store_types::wire::encode_record;

use super::format::{
    decode_header, decode_payload, encode_entry, CHECKS_V, ENTRY_V, ENTRY_V1, ENTRY_V2,
};
use super::{CheckRun, JournalHead};
use crate::aligned::AlignedBuf;
use crate::BLOCK_SIZE;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A block holding `hex` at its start, zeros after.
fn block(hex: &str) -> AlignedBuf {
    AlignedBuf::with_data(1, 0, &unhex(hex))
}

fn checks() -> Vec<CheckRun> {
    vec![CheckRun {
        start: 40,
        crcs: vec![0xdead_beef, 1],
    }]
}

const CHECKS_RECORD: &str = concat!(
    "0100",       // record version 1
    "01",         // one run
    "28",         // start 40
    "02",         // two crcs
    "effdb6f50d", // 0xdeadbeef
    "01",         // 1
);

/// The head, in `meta` under "journal": version 2, and version 1 (no side data) still read.
#[test]
fn golden_journal_head() {
    let head = JournalHead {
        gen: 5,
        seq: 300,
        next: 1000,
        data_seq: 290,
        data_from: 900,
    };
    let v2 = concat!(
        "0200", // record version 2
        "05",   // gen 5
        "ac02", // seq 300
        "e807", // next 1000
        "a202", // data_seq 290
        "8407", // data_from 900
    );
    assert_eq!(hex(&head.encode()), v2);
    assert_eq!(JournalHead::decode(&unhex(v2)), Ok(head));
    let v1 = concat!(
        "0100", // record version 1
        "05",   // gen 5
        "ac02", // seq 300
        "e807", // next 1000
    );
    let nothing_held = JournalHead {
        data_seq: 301,
        data_from: 1000,
        ..head
    };
    assert_eq!(JournalHead::decode(&unhex(v1)), Ok(nothing_held));
}

#[test]
fn golden_checks_record() {
    assert_eq!(hex(&encode_record(CHECKS_V, &checks())), CHECKS_RECORD);
}

/// The payload of the entries below: one commit, batch "batch" and side data "side".
const PAYLOAD_V2: &str = concat!(
    "05000000",   // batch length, u32 LE
    "6261746368", // "batch"
    "04000000",   // side data length, u32 LE
    "73696465",   // "side"
);

/// A version 3 entry, as written today: one block.
#[test]
fn golden_entry() {
    let side = [Bytes::from_static(b"si"), Bytes::from_static(b"de")];
    let entry = encode_entry(77, 5, 3, &[(b"batch", &side)], &checks());
    let header = concat!(
        "53544a524e4c3031", // "STJRNL01"
        "0c00",             // header record length, u16 LE
        "0300",             // record version 3
        "4d",               // journal id 77
        "05",               // generation 5
        "03",               // sequence 3
        "01",               // one block
        "20",               // payload bytes 32
        "fd93ded809",       // payload crc32c
        "8b562fba",         // crc32c of the bytes before it, LE
    );
    let payload = format!(
        "{PAYLOAD_V2}{len}{CHECKS_RECORD}",
        len = "0b000000", // checks record length, u32 LE
    );
    let want = format!("{header}{}{payload}", "00".repeat(64 - header.len() / 2));
    assert_eq!(entry.blocks(), 1);
    assert_eq!(hex(&entry[..want.len() / 2]), want);
    assert!(entry[want.len() / 2..].iter().all(|b| *b == 0));
    let (h, version) = decode_header(&entry[..BLOCK_SIZE]).expect("header");
    assert_eq!(version, ENTRY_V);
    let (items, got_checks) = decode_payload(&entry, &h, version).expect("payload");
    assert_eq!(items, vec![(&b"batch"[..], &b"side"[..])]);
    assert_eq!(got_checks, checks());
}

/// Entries of versions 1 (batches only) and 2 (batches and side data, no checks), as
/// builds before version 3 wrote them, are still read.
#[test]
fn golden_older_entries_are_read() {
    let v1_header = concat!(
        "53544a524e4c3031", // "STJRNL01"
        "0c00",             // header record length, u16 LE
        "0100",             // record version 1
        "4d0503",           // journal id 77, generation 5, sequence 3
        "01",               // one block
        "09",               // payload bytes 9
        "c2f3c1d90f",       // payload crc32c
        "e459165e",         // crc32c of the bytes before it, LE
    );
    let v1_payload = concat!(
        "05000000",   // batch length, u32 LE
        "6261746368", // "batch"
    );
    let v1 = block(&format!("{v1_header}{}{v1_payload}", "00".repeat(38)));
    let (h, version) = decode_header(&v1).expect("v1 header");
    assert_eq!((h.journal_id, h.gen, h.seq, version), (77, 5, 3, ENTRY_V1));
    let (items, checks) = decode_payload(&v1, &h, version).expect("v1 payload");
    assert_eq!(items, vec![(&b"batch"[..], &b""[..])]);
    assert!(checks.is_empty());

    let v2_header = concat!(
        "53544a524e4c3031", // "STJRNL01"
        "0c00",             // header record length, u16 LE
        "0200",             // record version 2
        "4d0503",           // journal id 77, generation 5, sequence 3
        "01",               // one block
        "11",               // payload bytes 17
        "9fd2d6fe03",       // payload crc32c
        "229e594e",         // crc32c of the bytes before it, LE
    );
    let v2 = block(&format!("{v2_header}{}{PAYLOAD_V2}", "00".repeat(38)));
    let (h, version) = decode_header(&v2).expect("v2 header");
    assert_eq!((h.journal_id, h.gen, h.seq, version), (77, 5, 3, ENTRY_V2));
    let (items, checks) = decode_payload(&v2, &h, version).expect("v2 payload");
    assert_eq!(items, vec![(&b"batch"[..], &b"side"[..])]);
    assert!(checks.is_empty());
}
