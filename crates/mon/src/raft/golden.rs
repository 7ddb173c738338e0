//! Golden bytes of the monitor's RocksDB Raft store: its column families and keys, and
//! every record it keeps (identity, vote, committed and purged log ids, log entries, the
//! applied state, the snapshot). Each record is `[RECORD_V u16 LE][postcard body]`; the
//! bodies are our types and openraft's own (`Vote`, `LogId`, `Entry`, `Membership`,
//! `SnapshotMeta`), so an openraft upgrade that changes its serde format fails here too.
//!
//! If a case fails, the on-disk format changed: every existing monitor store would become
//! unreadable. Undo the change, or bump `RECORD_V` (reading the old version) and paste the
//! new bytes, which the failure prints. A new case: write `"?Name"` as its bytes and run
//! the test with `--nocapture`; it prints `PASTE ?Name "<bytes>"`.
//!
//! `EntryPayload` is matched without a wildcard arm in [`payload_variant`], so a payload
//! variant added by openraft fails to compile until it has a golden log entry here.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{CommittedLeaderId, Membership};
use store_types::msg::MapCommand;

use super::*;

/// Bytes from hex digits; whitespace is ignored.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {s:?}"
    );
    (digits.chunks(2))
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// `bytes` as a string literal for [`hex`], 16 bytes a line when long.
fn hex_literal(bytes: &[u8]) -> String {
    let lines: Vec<String> = (bytes.chunks(16))
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    if bytes.len() <= 16 {
        format!("\"{}\"", lines.join(""))
    } else {
        format!("\"\n{}\n\"", lines.join("\n"))
    }
}

/// Compares bytes with a golden hex string; collects every mismatch for one report.
#[derive(Default)]
struct Golden {
    failures: Vec<String>,
}

impl Golden {
    fn bytes(&mut self, name: &str, got: &[u8], want: &str) -> bool {
        let placeholder = want.trim().is_empty() || want.trim_start().starts_with('?');
        if placeholder {
            println!(
                "PASTE {} {}",
                want.trim(),
                hex_literal(got).replace('\n', " ")
            );
        }
        let ok = !placeholder && hex(want) == got;
        if !ok {
            self.failures.push(format!(
                "GOLDEN {name}\n  want: {}\n  got:  {}",
                want.split_whitespace().collect::<Vec<_>>().join(" "),
                hex_literal(got)
            ));
        }
        ok
    }

    /// A record: `encode_record(RECORD_V, value)` is `want`, and `want` decodes to a value
    /// that encodes to `want` again (not every record type has `PartialEq`).
    fn record<T: Serialize + for<'de> Deserialize<'de>>(
        &mut self,
        name: &str,
        value: &T,
        want: &str,
    ) {
        if self.bytes(name, &encode_record(RECORD_V, value), want) {
            let back: T = decode_record(RECORD_V, &hex(want)).unwrap();
            assert_eq!(encode_record(RECORD_V, &back), hex(want), "{name}");
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} monitor store golden case(s) changed: the on-disk format changed \
             (intended? bump RECORD_V and paste the new bytes):\n\n{}",
            self.failures.len(),
            self.failures.join("\n\n")
        );
    }
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 2), index)
}

fn node(name: &str, addr: &str) -> MonNode {
    MonNode {
        name: name.into(),
        addr: addr.into(),
    }
}

/// Voters 1 and 2, learner 3.
fn membership() -> Membership<NodeId, MonNode> {
    Membership::new(
        vec![BTreeSet::from([1, 2])],
        BTreeMap::from([
            (1, node("a", "h:1")),
            (2, node("b", "h:2")),
            (3, node("c", "h:3")),
        ]),
    )
}

fn identity() -> MonIdentity {
    MonIdentity {
        fsid: "fs".into(),
        mon_id: 2,
        name: "b".into(),
    }
}

/// The state after the entries of [`entries`] were applied.
fn sm_state() -> SmState {
    let mut map = ClusterMap::new("fs");
    crate::apply::set_mons(
        &mut map,
        vec![
            MonInfo {
                id: 1,
                name: "a".into(),
                addr: "h:1".into(),
                voter: true,
            },
            MonInfo {
                id: 2,
                name: "b".into(),
                addr: "h:2".into(),
                voter: true,
            },
            MonInfo {
                id: 3,
                name: "c".into(),
                addr: "h:3".into(),
                voter: false,
            },
        ],
    );
    SmState {
        last_applied: Some(log_id(5, 17)),
        membership: StoredMembership::new(Some(log_id(5, 17)), membership()),
        map,
    }
}

fn payload_variant(p: &EntryPayload<TypeConfig>) -> &'static str {
    match p {
        EntryPayload::Blank => "Blank",
        EntryPayload::Normal(_) => "Normal",
        EntryPayload::Membership(_) => "Membership",
    }
}

/// One log entry of each payload variant, in variant order, with its golden record.
fn entries() -> Vec<(Entry<TypeConfig>, &'static str)> {
    vec![
        (
            Entry {
                log_id: log_id(5, 15),
                payload: EntryPayload::Blank,
            },
            "03 00 05 02 0f 00",
        ),
        (
            Entry {
                log_id: log_id(5, 16),
                payload: EntryPayload::Normal(MapCommand::OsdOut { ids: vec![2] }),
            },
            "03 00 05 02 10 01 02 01 02",
        ),
        (
            Entry {
                log_id: log_id(5, 17),
                payload: EntryPayload::Membership(membership()),
            },
            "
                03 00 05 02 11 02 01 02 01 02 03 01 01 61 03 68
                3a 31 02 01 62 03 68 3a 32 03 01 63 03 68 3a 33
            ",
        ),
    ]
}

const VOTE: &str = "03 00 05 02 00";
const VOTE_COMMITTED: &str = "03 00 05 02 01";
const COMMITTED: &str = "03 00 01 05 02 11";
const COMMITTED_NONE: &str = "03 00 00";
const PURGED: &str = "03 00 05 02 0e";
const IDENTITY: &str = "03 00 02 66 73 02 01 62";
const STATE: &str = "
    03 00 01 05 02 11 01 05 02 11 01 02 01 02 03 01
    01 61 03 68 3a 31 02 01 62 03 68 3a 32 03 01 63
    03 68 3a 33 02 66 73 01 00 03 01 01 01 61 03 68
    3a 31 01 02 02 01 62 03 68 3a 32 01 03 03 01 63
    03 68 3a 33 00 00 00 03 00 00 00 00 00 01 00 00
    00
";
const SNAPSHOT: &str = "
    03 00 01 05 02 11 01 05 02 11 01 02 01 02 03 01
    01 61 03 68 3a 31 02 01 62 03 68 3a 32 03 01 63
    03 68 3a 33 0a 54 35 2d 4e 32 2d 31 37 2d 31 51
    03 00 01 05 02 11 01 05 02 11 01 02 01 02 03 01
    01 61 03 68 3a 31 02 01 62 03 68 3a 32 03 01 63
    03 68 3a 33 02 66 73 01 00 03 01 01 01 61 03 68
    3a 31 01 02 02 01 62 03 68 3a 32 01 03 03 01 63
    03 68 3a 33 00 00 00 03 00 00 00 00 00 01 00 00
    00
";

#[test]
fn golden_column_families_and_keys() {
    assert_eq!(RECORD_V, 3);
    assert_eq!([CF_LOG, CF_META, CF_SM], ["log", "meta", "sm"]);
    assert_eq!(
        [
            KEY_VOTE,
            KEY_COMMITTED,
            KEY_PURGED,
            KEY_IDENTITY,
            KEY_STATE,
            KEY_SNAPSHOT
        ],
        [
            &b"vote"[..],
            b"committed",
            b"last_purged",
            b"identity",
            b"state",
            b"snapshot"
        ]
    );
}

#[test]
fn golden_records() {
    let mut g = Golden::default();
    g.record("identity", &identity(), IDENTITY);
    g.record("vote", &Vote::<NodeId>::new(5, 2), VOTE);
    g.record(
        "vote (committed)",
        &Vote::<NodeId>::new_committed(5, 2),
        VOTE_COMMITTED,
    );
    g.record("committed", &Some(log_id(5, 17)), COMMITTED);
    g.record("committed (none)", &None::<LogId<NodeId>>, COMMITTED_NONE);
    g.record("last_purged", &log_id(5, 14), PURGED);
    for (i, (entry, want)) in entries().into_iter().enumerate() {
        let name = format!("log entry {}", payload_variant(&entry.payload));
        g.record(&name, &entry, want);
        // After the 2-byte version and the log id (leader term and node, index), the
        // payload's variant index.
        let at = 2 + postcard::to_stdvec(&entry.log_id).unwrap().len();
        assert_eq!(encode_record(RECORD_V, &entry)[at], i as u8, "{name}");
    }
    // The samples cover every payload variant: the next index is none.
    assert!(matches!(
        postcard::from_bytes::<EntryPayload<TypeConfig>>(&[entries().len() as u8]),
        Err(postcard::Error::SerdeDeCustom)
    ));
    g.record("state", &sm_state(), STATE);
    g.record(
        "snapshot",
        &StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(log_id(5, 17)),
                last_membership: StoredMembership::new(Some(log_id(5, 17)), membership()),
                snapshot_id: "T5-N2-17-1".into(),
            },
            data: encode_record(RECORD_V, &sm_state()),
        },
        SNAPSHOT,
    );
    g.finish();
}

/// Raw bytes under `key` in column family `cf`.
fn raw(db: &DB, cf: &str, key: &[u8]) -> Vec<u8> {
    let h = db.cf_handle(cf).expect("column family exists");
    db.get_cf(h, key).unwrap().expect("record present")
}

/// The store itself writes those records under those keys, and reads golden log entries.
#[tokio::test]
async fn golden_records_as_the_store_writes_and_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path(), &identity()).unwrap();
    let mut g = Golden::default();
    g.bytes("identity", &raw(&db, CF_META, KEY_IDENTITY), IDENTITY);

    let mut log = LogStore::new(db.clone());
    log.save_vote(&Vote::new(5, 2)).await.unwrap();
    g.bytes("vote", &raw(&db, CF_META, KEY_VOTE), VOTE);
    log.save_committed(Some(log_id(5, 17))).await.unwrap();
    g.bytes("committed", &raw(&db, CF_META, KEY_COMMITTED), COMMITTED);
    log.purge(log_id(5, 14)).await.unwrap();
    g.bytes("last_purged", &raw(&db, CF_META, KEY_PURGED), PURGED);

    // Log entries under their index, big-endian: the store reads the golden records.
    let h = db.cf_handle(CF_LOG).unwrap();
    for (entry, want) in entries() {
        if !want.starts_with('?') {
            db.put_cf(h, entry.log_id.index.to_be_bytes(), hex(want))
                .unwrap();
        }
    }
    if g.failures.is_empty() {
        let got = log.try_get_log_entries(15..18).await.unwrap();
        let want: Vec<_> = entries().into_iter().map(|(e, _)| e).collect();
        assert_eq!(got, want);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(5, 17)));
        assert_eq!(state.last_purged_log_id, Some(log_id(5, 14)));
    }

    // The applied state and the snapshot, as applying the entries writes them.
    let (mut sm, _maps) = StateMachine::load(db.clone(), "fs").unwrap();
    sm.apply(entries().into_iter().map(|(e, _)| e))
        .await
        .unwrap();
    g.bytes("state", &raw(&db, CF_SM, KEY_STATE), STATE);
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.snapshot_id, "T5-N2-17-1");
    g.bytes("snapshot", &raw(&db, CF_SM, KEY_SNAPSHOT), SNAPSHOT);
    g.finish();
}
