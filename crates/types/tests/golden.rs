//! Golden bytes: the exact encoding of every message that crosses the wire, pinned.
//!
//! Every frame payload is postcard, which encodes an enum as its variant *index* and a
//! struct as its fields *in declaration order*, without names: reordering variants or
//! fields, or changing a field's type, silently changes the bytes and breaks mixed-release
//! clusters and stored data. Each case here builds one fixed value and compares its
//! encoding with hard-coded bytes, then decodes those bytes back to the value.
//!
//! **If a case fails, the format changed.** Either the change was a mistake (undo it), or
//! it is intended: then bump [`WIRE_VERSION`] (or the on-disk record's version) and update
//! the bytes here, which the failure message prints ready to paste.
//!
//! A new case: write its golden bytes as a placeholder `"?Name"` and run the test; it
//! prints `PASTE ?Name "<bytes>"` (with `-- --nocapture`). Check the bytes (variant index
//! first, then the fields in order) before pasting them.
//!
//! New variants: every message enum has a `*_variant` function below with a `match` and
//! no wildcard arm, so a new variant does not compile until it is named there; and
//! [`check_enum`] requires the samples to cover the variant indices 0, 1, 2, … with no gap
//! and the next index to be no variant, so a variant without a golden sample fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use store_types::blockdata::BlockData;
use store_types::error::{ErrorCode, StoreError};
use store_types::map::{
    BlocklistEntry, ClusterMap, CrushMap, FailureDomain, Flag, HeldPlacement, HostBucket,
    ImageLock, LastActive, MonInfo, OsdInfo, Pool, WriteGuard,
};
use store_types::msg::{
    CommandOutcome, HealthCheck, LockClaim, MapCommand, MonMembership, MonRequest, MonResponse,
    MonStatus, OsdStat, PgActivation, PongInfo, SessionInfo, SessionReport, Severity, SlowOps,
    StatusReport,
};
use store_types::osdmsg::{
    ClientOpKind, LogOp, Mutation, ObjStat, ObjVersion, OsdRequest, OsdResponse, Pg, PgCopyState,
    PgLogEntry, PgPhase, PgReport,
};
use store_types::wire::{
    decode_frame_payload, decode_payload, decode_record, encode_payload, encode_record, Frame,
    FrameCodec, FrameKind, DATA_BLOCK_BYTES, FRAME_MAGIC, HEADER_LEN, SEND_IN_PLACE_BYTES,
    WIRE_VERSION,
};
use tokio_util::codec::{Decoder, Encoder};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Bytes from hex digits; whitespace (spaces, newlines) is ignored.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {s:?}"
    );
    digits
        .chunks(2)
        .map(|p| {
            let p = std::str::from_utf8(p).expect("ascii");
            u8::from_str_radix(p, 16).unwrap_or_else(|_| panic!("bad hex {p:?} in {s:?}"))
        })
        .collect()
}

/// `bytes` as a Rust string literal for [`hex`], 16 bytes a line when long.
fn hex_literal(bytes: &[u8]) -> String {
    let lines: Vec<String> = bytes
        .chunks(16)
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

/// Collects mismatches so one run reports every changed case (with the new bytes).
#[derive(Default)]
struct Golden {
    failures: Vec<String>,
}

impl Golden {
    /// Compares `got` with the golden `want` (hex).
    fn bytes(&mut self, name: &str, got: &[u8], want: &str) -> bool {
        let placeholder = want.trim().is_empty() || want.trim_start().starts_with('?');
        let ok = !placeholder && hex(want) == got;
        if placeholder {
            // For the one writing a new case: `PASTE <placeholder> <bytes>`.
            println!(
                "PASTE {} {}",
                want.trim(),
                hex_literal(got).replace('\n', " ")
            );
        }
        if !ok {
            self.failures.push(format!(
                "GOLDEN {name}\n  want: {}\n  got:  {}",
                want.split_whitespace().collect::<Vec<_>>().join(" "),
                hex_literal(got)
            ));
        }
        ok
    }

    /// A message: its payload encoding (the bytes a frame carries) is `want`, which
    /// decodes back to the same value.
    fn msg<T>(&mut self, name: &str, value: &T, want: &str) -> Vec<u8>
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let got = encode_payload(value).unwrap().into_bytes().to_vec();
        assert_eq!(
            got,
            postcard::to_stdvec(value).unwrap(),
            "{name}: a payload is plain postcard"
        );
        if self.bytes(name, &got, want) {
            let back: T = decode_payload(&hex(want)).unwrap();
            assert_eq!(&back, value, "{name}: golden bytes decode to another value");
        }
        got
    }

    fn finish(self, what: &str) {
        assert!(
            self.failures.is_empty(),
            "{} {what} golden case(s) changed: the wire or record format changed \
             (intended? bump the version and paste the new bytes):\n\n{}",
            self.failures.len(),
            self.failures.join("\n\n")
        );
    }
}

/// Checks the samples of one enum, in variant order: each encodes to its golden bytes and
/// back; sample `i` is variant index `i` (so every variant up to the last sample has one);
/// and the index after the last sample is no variant (so a variant added without a golden
/// sample fails here).
fn check_enum<T>(
    g: &mut Golden,
    enum_name: &str,
    name_of: fn(&T) -> &'static str,
    cases: &[(T, &str)],
) where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    for (i, (value, want)) in cases.iter().enumerate() {
        let name = format!("{enum_name}::{}", name_of(value));
        let got = g.msg(&name, value, want);
        assert!(i < 0x80, "one-byte variant indices only");
        assert_eq!(
            got[0] as usize, i,
            "{name}: sample {i} has variant index {}: samples must follow the variant order",
            got[0]
        );
    }
    let next = cases.len() as u8;
    assert!(
        matches!(
            postcard::from_bytes::<T>(&[next]),
            Err(postcard::Error::SerdeDeCustom)
        ),
        "{enum_name} has a variant at index {next} without a golden sample: add one"
    );
}

// ---------------------------------------------------------------------------------------
// Sample values (shared by several cases)
// ---------------------------------------------------------------------------------------

fn pg() -> Pg {
    Pg {
        pool: 1,
        seed: 0x1f,
    }
}

fn ver() -> ObjVersion {
    ObjVersion { epoch: 7, seq: 300 }
}

fn claim() -> LockClaim {
    LockClaim {
        lock_key: "1/ab".into(),
        image: "p/i".into(),
        session: 0x0102_0304_0506_0708,
        desc: "gw".into(),
        instance: 9,
    }
}

fn session_info() -> SessionInfo {
    SessionInfo {
        id: 0xfeed,
        image: "p/i".into(),
        desc: "gw".into(),
        instance: 77,
    }
}

fn osd_stat() -> OsdStat {
    OsdStat {
        total_bytes: 1 << 30,
        used_bytes: 4096,
        objects: 3,
        checksum_errors: 1,
        recovered_objects: 2,
        recovered_bytes: 8192,
        device_errors: 4,
    }
}

fn slow_ops() -> SlowOps {
    SlowOps {
        count: 2,
        oldest_age_ms: 31_000,
        oldest: "w o".into(),
    }
}

fn pg_report() -> PgReport {
    PgReport {
        pg: pg(),
        phase: PgPhase::Recovering,
        epoch: 12,
        objects_left: 5,
        misplaced: 1,
    }
}

fn store_error() -> StoreError {
    StoreError::new(ErrorCode::LockBusy, "busy")
}

/// A cluster map with every field populated (each collection with one entry or two).
fn full_map() -> ClusterMap {
    ClusterMap {
        fsid: "fs".into(),
        epoch: 42,
        placement_epoch: 40,
        mons: BTreeMap::from([(
            1,
            MonInfo {
                id: 1,
                name: "a".into(),
                addr: "h:1".into(),
                voter: true,
            },
        )]),
        osds: BTreeMap::from([(
            0,
            OsdInfo {
                id: 0,
                uuid: "u0".into(),
                addr: "h:2".into(),
                host: "h".into(),
                weight: 0x10000,
                up: true,
                is_in: false,
                up_from: 5,
                down_stamp_ms: Some(1000),
            },
        )]),
        crush: CrushMap {
            hosts: BTreeMap::from([(
                "h".to_string(),
                HostBucket {
                    id: -2,
                    name: "h".into(),
                    osds: vec![0],
                },
            )]),
            next_bucket_id: -3,
        },
        pools: BTreeMap::from([(
            1,
            Pool {
                id: 1,
                name: "p".into(),
                size: 3,
                min_size: 2,
                pg_num: 32,
                failure_domain: FailureDomain::Osd,
                created_epoch: 6,
            },
        )]),
        flags: BTreeSet::from([Flag::NoOut, Flag::NoBackfill]),
        image_locks: BTreeMap::from([(
            "1/ab".to_string(),
            ImageLock {
                image: "p/i".into(),
                holder: Some(0xaa),
                holder_desc: "gw".into(),
                holder_instance: 3,
                generation: 4,
                requested_by: Some(0xbb),
                requested_desc: "cli".into(),
                requested_instance: 5,
                granted_epoch: 41,
                recent_releases: vec![(0xcc, 2)],
                taken_from: vec![0xdd],
            },
        )]),
        blocklist: BTreeMap::from([(
            0xdd,
            BlocklistEntry {
                added_epoch: 30,
                reason: "r".into(),
                expire_s: Some(3600),
            },
        )]),
        next_osd_id: 1,
        next_pool_id: 2,
        rebalance_hold: Some(BTreeMap::from([(
            0,
            HeldPlacement {
                weight: 0x8000,
                is_in: true,
            },
        )])),
        pg_temp: BTreeMap::from([(1, BTreeMap::from([(0x1f, vec![0, 2])]))]),
        pg_history: BTreeMap::from([(
            1,
            BTreeMap::from([(
                0x1f,
                LastActive {
                    since_epoch: 39,
                    osds: vec![0, 2, 1],
                },
            )]),
        )]),
    }
}

/// A status report with every field populated.
fn full_status() -> StatusReport {
    StatusReport {
        osd_stats: BTreeMap::from([(0, osd_stat())]),
        fsid: "fs".into(),
        epoch: 42,
        health: Severity::Warn,
        checks: BTreeMap::from([(
            "OSD_DOWN".to_string(),
            HealthCheck {
                severity: Severity::Warn,
                summary: "1 osd down".into(),
                detail: vec!["osd.0".into()],
            },
        )]),
        mons: vec![MonStatus {
            id: 1,
            name: "a".into(),
            addr: "h:1".into(),
            reachable: false,
            error: Some("e".into()),
        }],
        quorum_names: vec!["a".into(), "b".into()],
        leader_name: Some("b".into()),
        answered_by: "c".into(),
        num_osds: 3,
        num_up_osds: 2,
        num_in_osds: 1,
        num_pools: 14,
        num_pgs: 32,
        pgs_by_state: BTreeMap::from([("active+clean".to_string(), 31)]),
        total_bytes: 1 << 40,
        used_bytes: 1 << 20,
        flags: vec!["noout".into()],
        num_sessions: 4,
        recovery_objects_left: 5,
        object_copies: 6,
        recovery_objects_per_sec: Some(7),
        recovery_bytes_per_sec: Some(8),
        num_image_locks: 9,
        num_blocklisted: 10,
        degraded_objects: 11,
        pgs_remapped: 12,
        misplaced_objects: 13,
    }
}

// ---------------------------------------------------------------------------------------
// Exhaustive variant names: adding a variant fails to compile until it is named here, and
// `check_enum` then fails until it has a golden sample.
// ---------------------------------------------------------------------------------------

fn map_command_variant(v: &MapCommand) -> &'static str {
    match v {
        MapCommand::OsdBoot { .. } => "OsdBoot",
        MapCommand::OsdMarkDown { .. } => "OsdMarkDown",
        MapCommand::OsdOut { .. } => "OsdOut",
        MapCommand::OsdIn { .. } => "OsdIn",
        MapCommand::OsdReweight { .. } => "OsdReweight",
        MapCommand::OsdPurge { .. } => "OsdPurge",
        MapCommand::SetFlag(_) => "SetFlag",
        MapCommand::UnsetFlag(_) => "UnsetFlag",
        MapCommand::PoolCreate { .. } => "PoolCreate",
        MapCommand::PoolSet { .. } => "PoolSet",
        MapCommand::PoolRm { .. } => "PoolRm",
        MapCommand::LockAcquire(_) => "LockAcquire",
        MapCommand::LockRelease { .. } => "LockRelease",
        MapCommand::LockBreak { .. } => "LockBreak",
        MapCommand::LockDrop { .. } => "LockDrop",
        MapCommand::BlocklistAdd { .. } => "BlocklistAdd",
        MapCommand::BlocklistRm { .. } => "BlocklistRm",
        MapCommand::BlocklistExpire { .. } => "BlocklistExpire",
        MapCommand::PgActivated { .. } => "PgActivated",
        MapCommand::PgTempDone { .. } => "PgTempDone",
        MapCommand::OsdLost { .. } => "OsdLost",
    }
}

fn mon_membership_variant(v: &MonMembership) -> &'static str {
    match v {
        MonMembership::Add { .. } => "Add",
        MonMembership::Remove { .. } => "Remove",
    }
}

fn mon_request_variant(v: &MonRequest) -> &'static str {
    match v {
        MonRequest::Ping => "Ping",
        MonRequest::GetMap => "GetMap",
        MonRequest::Subscribe { .. } => "Subscribe",
        MonRequest::Command(_) => "Command",
        MonRequest::Status => "Status",
        MonRequest::OsdHeartbeat { .. } => "OsdHeartbeat",
        MonRequest::ClientHeartbeat { .. } => "ClientHeartbeat",
        MonRequest::ClientList => "ClientList",
        MonRequest::Membership(_) => "Membership",
        MonRequest::Forward(_) => "Forward",
        MonRequest::Raft { .. } => "Raft",
    }
}

fn mon_response_variant(v: &MonResponse) -> &'static str {
    match v {
        MonResponse::Pong(_) => "Pong",
        MonResponse::Map(_) => "Map",
        MonResponse::Subscribed => "Subscribed",
        MonResponse::Outcome(_) => "Outcome",
        MonResponse::Status(_) => "Status",
        MonResponse::HeartbeatAck { .. } => "HeartbeatAck",
        MonResponse::Clients(_) => "Clients",
        MonResponse::Raft(_) => "Raft",
        MonResponse::Error(_) => "Error",
    }
}

fn severity_variant(v: &Severity) -> &'static str {
    match v {
        Severity::Ok => "Ok",
        Severity::Warn => "Warn",
        Severity::Err => "Err",
    }
}

fn failure_domain_variant(v: &FailureDomain) -> &'static str {
    match v {
        FailureDomain::Host => "Host",
        FailureDomain::Osd => "Osd",
    }
}

fn flag_variant(v: &Flag) -> &'static str {
    match v {
        Flag::NoOut => "NoOut",
        Flag::NoRebalance => "NoRebalance",
        Flag::NoDown => "NoDown",
        Flag::NoUp => "NoUp",
        Flag::NoRecover => "NoRecover",
        Flag::NoBackfill => "NoBackfill",
    }
}

fn error_code_variant(v: &ErrorCode) -> &'static str {
    match v {
        ErrorCode::NoQuorum => "NoQuorum",
        ErrorCode::Unreachable => "Unreachable",
        ErrorCode::NotFound => "NotFound",
        ErrorCode::AlreadyExists => "AlreadyExists",
        ErrorCode::InvalidArgument => "InvalidArgument",
        ErrorCode::Timeout => "Timeout",
        ErrorCode::VersionMismatch => "VersionMismatch",
        ErrorCode::Malformed => "Malformed",
        ErrorCode::NotPermitted => "NotPermitted",
        ErrorCode::WrongCluster => "WrongCluster",
        ErrorCode::Unavailable => "Unavailable",
        ErrorCode::NoSpace => "NoSpace",
        ErrorCode::Corrupt => "Corrupt",
        ErrorCode::Internal => "Internal",
        ErrorCode::Blocklisted => "Blocklisted",
        ErrorCode::LockLost => "LockLost",
        ErrorCode::LockBusy => "LockBusy",
        ErrorCode::DeviceError => "DeviceError",
    }
}

fn pg_phase_variant(v: &PgPhase) -> &'static str {
    match v {
        PgPhase::Inactive => "Inactive",
        PgPhase::Peering => "Peering",
        PgPhase::Recovering => "Recovering",
        PgPhase::Active => "Active",
        PgPhase::Backfilling => "Backfilling",
        PgPhase::RecoveryWait => "RecoveryWait",
        PgPhase::BackfillWait => "BackfillWait",
        PgPhase::Incomplete => "Incomplete",
        PgPhase::Down => "Down",
    }
}

fn mutation_variant(v: &Mutation) -> &'static str {
    match v {
        Mutation::Write { .. } => "Write",
        Mutation::Zero { .. } => "Zero",
        Mutation::Delete => "Delete",
    }
}

fn client_op_variant(v: &ClientOpKind) -> &'static str {
    match v {
        ClientOpKind::Mutate(_) => "Mutate",
        ClientOpKind::Read { .. } => "Read",
        ClientOpKind::Stat => "Stat",
        ClientOpKind::Allocated { .. } => "Allocated",
        ClientOpKind::List => "List",
    }
}

fn osd_request_variant(v: &OsdRequest) -> &'static str {
    match v {
        OsdRequest::Client { .. } => "Client",
        OsdRequest::Replica { .. } => "Replica",
        OsdRequest::Fetch { .. } => "Fetch",
        OsdRequest::PgHead { .. } => "PgHead",
        OsdRequest::PgList { .. } => "PgList",
        OsdRequest::PgMark { .. } => "PgMark",
        OsdRequest::PgStray { .. } => "PgStray",
    }
}

fn osd_response_variant(v: &OsdResponse) -> &'static str {
    match v {
        OsdResponse::Committed { .. } => "Committed",
        OsdResponse::Data(_) => "Data",
        OsdResponse::Stat(_) => "Stat",
        OsdResponse::Extents(_) => "Extents",
        OsdResponse::Listed(_) => "Listed",
        OsdResponse::Fetched { .. } => "Fetched",
        OsdResponse::Head { .. } => "Head",
        OsdResponse::Marked => "Marked",
        OsdResponse::Stray { .. } => "Stray",
        OsdResponse::Objects(_) => "Objects",
        OsdResponse::NotPrimary { .. } => "NotPrimary",
        OsdResponse::Error(_) => "Error",
    }
}

fn log_op_variant(v: &LogOp) -> &'static str {
    match v {
        LogOp::Write { .. } => "Write",
        LogOp::Zero { .. } => "Zero",
        LogOp::Delete => "Delete",
    }
}

// ---------------------------------------------------------------------------------------
// Monitor protocol
// ---------------------------------------------------------------------------------------

#[test]
fn golden_map_command() {
    let mut g = Golden::default();
    check_enum(
        &mut g,
        "MapCommand",
        map_command_variant,
        &[
            (
                MapCommand::OsdBoot {
                    uuid: "u0".into(),
                    addr: "h:2".into(),
                    host: "h".into(),
                    weight: 0x10000,
                },
                "00 02 75 30 03 68 3a 32 01 68 80 80 04",
            ),
            (
                MapCommand::OsdMarkDown {
                    ids: vec![1, 300],
                    now_ms: 1000,
                },
                "01 02 01 ac 02 e8 07",
            ),
            (MapCommand::OsdOut { ids: vec![2] }, "02 01 02"),
            (MapCommand::OsdIn { ids: vec![3] }, "03 01 03"),
            (
                MapCommand::OsdReweight {
                    id: 4,
                    weight: 0x8000,
                },
                "04 04 80 80 02",
            ),
            (MapCommand::OsdPurge { id: 5 }, "05 05"),
            (MapCommand::SetFlag(Flag::NoRebalance), "06 01"),
            (MapCommand::UnsetFlag(Flag::NoBackfill), "07 05"),
            (
                MapCommand::PoolCreate {
                    name: "p".into(),
                    size: 3,
                    min_size: 2,
                    pg_num: 128,
                    failure_domain: Some(FailureDomain::Osd),
                },
                "08 01 70 03 02 80 01 01 01",
            ),
            (
                MapCommand::PoolSet {
                    name: "p".into(),
                    key: "size".into(),
                    value: "2".into(),
                },
                "09 01 70 04 73 69 7a 65 01 32",
            ),
            (MapCommand::PoolRm { name: "p".into() }, "0a 01 70"),
            (
                MapCommand::LockAcquire(claim()),
                "
                    0b 04 31 2f 61 62 03 70 2f 69 88 8e 98 a8 c0 e0
                    80 81 01 02 67 77 09
                ",
            ),
            (
                MapCommand::LockRelease {
                    lock_key: "1/ab".into(),
                    session: 0xaa,
                    generation: 4,
                },
                "0c 04 31 2f 61 62 aa 01 04",
            ),
            (
                MapCommand::LockBreak {
                    claim: claim(),
                    holder: 0xaa,
                    reason: "r".into(),
                },
                "
                    0d 04 31 2f 61 62 03 70 2f 69 88 8e 98 a8 c0 e0
                    80 81 01 02 67 77 09 aa 01 01 72
                ",
            ),
            (
                MapCommand::LockDrop {
                    lock_key: "1/ab".into(),
                    session: 0xaa,
                },
                "0e 04 31 2f 61 62 aa 01",
            ),
            (
                MapCommand::BlocklistAdd {
                    session: 0xaa,
                    reason: "r".into(),
                    expire_s: Some(3600),
                },
                "0f aa 01 01 72 01 90 1c",
            ),
            (MapCommand::BlocklistRm { session: 0xaa }, "10 aa 01"),
            (
                MapCommand::BlocklistExpire {
                    sessions: vec![(0xaa, 30), (0xbb, 31)],
                },
                "11 02 aa 01 1e bb 01 1f",
            ),
            (
                MapCommand::PgActivated {
                    pgs: vec![PgActivation {
                        pool: 1,
                        seed: 0x1f,
                        since_epoch: 39,
                        osds: vec![0, 2, 1],
                    }],
                },
                "12 01 01 1f 27 03 00 02 01",
            ),
            (
                MapCommand::PgTempDone {
                    pgs: vec![(1, 0x1f, vec![0, 2])],
                },
                "13 01 01 1f 02 00 02",
            ),
            (MapCommand::OsdLost { id: 6 }, "14 06"),
        ],
    );
    // The None of the optional fields.
    g.msg(
        "MapCommand::PoolCreate(failure_domain None)",
        &MapCommand::PoolCreate {
            name: "p".into(),
            size: 3,
            min_size: 2,
            pg_num: 128,
            failure_domain: None,
        },
        "08 01 70 03 02 80 01 00",
    );
    g.msg(
        "MapCommand::BlocklistAdd(expire_s None)",
        &MapCommand::BlocklistAdd {
            session: 0xaa,
            reason: "r".into(),
            expire_s: None,
        },
        "0f aa 01 01 72 00",
    );
    g.finish("MapCommand");
}

#[test]
fn golden_mon_request() {
    let mut g = Golden::default();
    check_enum(
        &mut g,
        "MonMembership",
        mon_membership_variant,
        &[
            (
                MonMembership::Add {
                    name: "d".into(),
                    addr: "h:4".into(),
                },
                "00 01 64 03 68 3a 34",
            ),
            (MonMembership::Remove { name: "d".into() }, "01 01 64"),
        ],
    );
    check_enum(
        &mut g,
        "MonRequest",
        mon_request_variant,
        &[
            (MonRequest::Ping, "00"),
            (MonRequest::GetMap, "01"),
            (MonRequest::Subscribe { have_epoch: 200 }, "02 c8 01"),
            (
                MonRequest::Command(MapCommand::OsdOut { ids: vec![2] }),
                "03 02 01 02",
            ),
            (MonRequest::Status, "04"),
            (
                MonRequest::OsdHeartbeat {
                    id: 2,
                    uuid: "u2".into(),
                    stat: osd_stat(),
                    busy_pgs: vec![pg_report()],
                    pgs_epoch: 12,
                    slow_ops: slow_ops(),
                },
                "
                    05 02 02 75 32 80 80 80 80 04 80 20 03 01 02 80
                    40 04 01 01 1f 02 0c 05 01 0c 02 98 f2 01 03 77
                    20 6f
                ",
            ),
            (
                MonRequest::ClientHeartbeat {
                    sessions: vec![session_info()],
                    slow_ops: SlowOps::default(),
                },
                "06 01 ed fd 03 03 70 2f 69 02 67 77 4d 00 00 00",
            ),
            (MonRequest::ClientList, "07"),
            (
                MonRequest::Membership(MonMembership::Remove { name: "d".into() }),
                "08 01 01 64",
            ),
            (
                MonRequest::Forward(Box::new(MonRequest::Command(MapCommand::OsdIn {
                    ids: vec![3],
                }))),
                "09 03 03 01 03",
            ),
            (
                MonRequest::Raft {
                    kind: 2,
                    body: vec![0xde, 0xad],
                },
                "0a 02 02 de ad",
            ),
        ],
    );
    g.finish("MonRequest");
}

#[test]
fn golden_mon_response() {
    let mut g = Golden::default();
    check_enum(
        &mut g,
        "Severity",
        severity_variant,
        &[
            (Severity::Ok, "00"),
            (Severity::Warn, "01"),
            (Severity::Err, "02"),
        ],
    );
    check_enum(
        &mut g,
        "MonResponse",
        mon_response_variant,
        &[
            (
                MonResponse::Pong(PongInfo {
                    fsid: "fs".into(),
                    mon_id: 1,
                    name: "a".into(),
                    epoch: 42,
                    leader: Some(2),
                }),
                "00 02 66 73 01 01 61 2a 01 02",
            ),
            (
                MonResponse::Map(Box::new(full_map())),
                "
                    01 02 66 73 2a 28 01 01 01 01 61 03 68 3a 31 01
                    01 00 00 02 75 30 03 68 3a 32 01 68 80 80 04 01
                    00 05 01 e8 07 01 01 68 03 01 68 01 00 05 01 01
                    01 01 70 03 02 20 01 06 02 00 05 01 04 31 2f 61
                    62 03 70 2f 69 01 aa 01 02 67 77 03 04 01 bb 01
                    03 63 6c 69 05 29 01 cc 01 02 01 dd 01 01 dd 01
                    1e 01 72 01 90 1c 01 02 01 01 00 80 80 02 01 01
                    01 01 1f 02 00 02 01 01 01 1f 27 03 00 02 01
                ",
            ),
            (MonResponse::Subscribed, "02"),
            (
                MonResponse::Outcome(CommandOutcome {
                    epoch: 43,
                    changed: true,
                    message: "ok".into(),
                    osd_id: Some(3),
                    lock_generation: Some(5),
                }),
                "03 2b 01 02 6f 6b 01 03 01 05",
            ),
            (
                MonResponse::Status(Box::new(full_status())),
                "
                    04 01 00 80 80 80 80 04 80 20 03 01 02 80 40 04
                    02 66 73 2a 01 01 08 4f 53 44 5f 44 4f 57 4e 01
                    0a 31 20 6f 73 64 20 64 6f 77 6e 01 05 6f 73 64
                    2e 30 01 01 01 61 03 68 3a 31 00 01 01 65 02 01
                    61 01 62 01 01 62 01 63 03 02 01 0e 20 01 0c 61
                    63 74 69 76 65 2b 63 6c 65 61 6e 1f 80 80 80 80
                    80 20 80 80 40 01 05 6e 6f 6f 75 74 04 05 06 01
                    07 01 08 09 0a 0b 0c 0d
                ",
            ),
            (MonResponse::HeartbeatAck { epoch: 42 }, "05 2a"),
            (
                MonResponse::Clients(vec![SessionReport {
                    info: session_info(),
                    last_seen_ms_ago: 250,
                }]),
                "06 01 ed fd 03 03 70 2f 69 02 67 77 4d fa 01",
            ),
            (MonResponse::Raft(vec![1, 2, 3]), "07 03 01 02 03"),
            (MonResponse::Error(store_error()), "08 10 04 62 75 73 79"),
        ],
    );
    g.finish("MonResponse");
}

/// The cluster map with every field set: it travels in `MonResponse::Map` and pushes, and
/// the monitors store it in their state machine record.
#[test]
fn golden_cluster_map() {
    let mut g = Golden::default();
    g.msg(
        "ClusterMap",
        &full_map(),
        "
            02 66 73 2a 28 01 01 01 01 61 03 68 3a 31 01 01
            00 00 02 75 30 03 68 3a 32 01 68 80 80 04 01 00
            05 01 e8 07 01 01 68 03 01 68 01 00 05 01 01 01
            01 70 03 02 20 01 06 02 00 05 01 04 31 2f 61 62
            03 70 2f 69 01 aa 01 02 67 77 03 04 01 bb 01 03
            63 6c 69 05 29 01 cc 01 02 01 dd 01 01 dd 01 1e
            01 72 01 90 1c 01 02 01 01 00 80 80 02 01 01 01
            01 1f 02 00 02 01 01 01 1f 27 03 00 02 01
        ",
    );
    g.msg(
        "ClusterMap::new",
        &ClusterMap::new("fs"),
        "
            02 66 73 00 00 00 00 00 03 00 00 00 00 00 01 00
            00 00
        ",
    );
    check_enum(
        &mut g,
        "FailureDomain",
        failure_domain_variant,
        &[(FailureDomain::Host, "00"), (FailureDomain::Osd, "01")],
    );
    // Flag::ALL lists the flags in declaration order.
    let flags: Vec<(Flag, &str)> = Flag::ALL
        .into_iter()
        .zip(["00", "01", "02", "03", "04", "05"])
        .collect();
    check_enum(&mut g, "Flag", flag_variant, &flags);
    g.msg(
        "WriteGuard",
        &WriteGuard {
            session: 0xaa,
            lock_key: "1/ab".into(),
            generation: 4,
        },
        "aa 01 04 31 2f 61 62 04",
    );
    g.finish("ClusterMap");
}

#[test]
fn golden_error_code() {
    use ErrorCode::*;
    let mut g = Golden::default();
    let codes = [
        (NoQuorum, "00"),
        (Unreachable, "01"),
        (NotFound, "02"),
        (AlreadyExists, "03"),
        (InvalidArgument, "04"),
        (Timeout, "05"),
        (VersionMismatch, "06"),
        (Malformed, "07"),
        (NotPermitted, "08"),
        (WrongCluster, "09"),
        (Unavailable, "0a"),
        (NoSpace, "0b"),
        (Corrupt, "0c"),
        (Internal, "0d"),
        (Blocklisted, "0e"),
        (LockLost, "0f"),
        (LockBusy, "10"),
        (DeviceError, "11"),
    ];
    check_enum(&mut g, "ErrorCode", error_code_variant, &codes);
    g.msg("StoreError", &store_error(), "10 04 62 75 73 79");
    g.finish("ErrorCode");
}

// ---------------------------------------------------------------------------------------
// OSD protocol
// ---------------------------------------------------------------------------------------

#[test]
fn golden_osd_request() {
    let mut g = Golden::default();
    check_enum(
        &mut g,
        "Mutation",
        mutation_variant,
        &[
            (
                Mutation::Write {
                    offset: 8192,
                    data: BlockData::from(Bytes::from_static(b"abc")),
                },
                "00 80 40 03 61 62 63",
            ),
            (
                Mutation::Zero {
                    offset: 4096,
                    len: 1 << 20,
                },
                "01 80 20 80 80 40",
            ),
            (Mutation::Delete, "02"),
        ],
    );
    check_enum(
        &mut g,
        "ClientOpKind",
        client_op_variant,
        &[
            (ClientOpKind::Mutate(Mutation::Delete), "00 02"),
            (
                ClientOpKind::Read {
                    offset: 4096,
                    len: 512,
                },
                "01 80 20 80 04",
            ),
            (ClientOpKind::Stat, "02"),
            (
                ClientOpKind::Allocated {
                    offset: 0,
                    len: 4 << 20,
                },
                "03 00 80 80 80 02",
            ),
            (ClientOpKind::List, "04"),
        ],
    );
    check_enum(
        &mut g,
        "OsdRequest",
        osd_request_variant,
        &[
            (
                OsdRequest::Client {
                    map_epoch: 42,
                    pg: pg(),
                    object: "o".into(),
                    op: ClientOpKind::Mutate(Mutation::Write {
                        offset: 0,
                        data: BlockData::from(Bytes::from_static(b"xy")),
                    }),
                    guard: Some(WriteGuard {
                        session: 0xaa,
                        lock_key: "1/ab".into(),
                        generation: 4,
                    }),
                },
                "
                    00 2a 01 1f 01 6f 00 00 00 02 78 79 01 aa 01 04
                    31 2f 61 62 04
                ",
            ),
            (
                OsdRequest::Replica {
                    map_epoch: 42,
                    from: 2,
                    pg: pg(),
                    object: "o".into(),
                    version: ver(),
                    mutation: Mutation::Zero {
                        offset: 0,
                        len: 4096,
                    },
                },
                "01 2a 02 01 1f 01 6f 07 ac 02 01 00 80 20",
            ),
            (
                OsdRequest::Fetch {
                    pg: pg(),
                    object: "o".into(),
                    offset: 4096,
                    len: 8192,
                },
                "02 01 1f 01 6f 80 20 80 40",
            ),
            (OsdRequest::PgHead { pg: pg() }, "03 01 1f"),
            (OsdRequest::PgList { pg: pg() }, "04 01 1f"),
            (
                OsdRequest::PgMark {
                    map_epoch: 42,
                    from: 2,
                    pg: pg(),
                    state: PgCopyState {
                        complete: false,
                        log_from: Some(ver()),
                    },
                },
                "05 2a 02 01 1f 00 01 07 ac 02",
            ),
            (
                OsdRequest::PgStray {
                    map_epoch: 42,
                    from: 3,
                    pg: pg(),
                },
                "06 2a 03 01 1f",
            ),
        ],
    );
    // The None of the optional guard.
    g.msg(
        "OsdRequest::Client(guard None)",
        &OsdRequest::Client {
            map_epoch: 42,
            pg: pg(),
            object: "o".into(),
            op: ClientOpKind::Read {
                offset: 0,
                len: 4096,
            },
            guard: None,
        },
        "00 2a 01 1f 01 6f 01 00 80 20 00",
    );
    g.finish("OsdRequest");
}

#[test]
fn golden_osd_response() {
    let mut g = Golden::default();
    check_enum(
        &mut g,
        "OsdResponse",
        osd_response_variant,
        &[
            (OsdResponse::Committed { version: ver() }, "00 07 ac 02"),
            (
                OsdResponse::Data(BlockData::from(Bytes::from_static(b"abc"))),
                "01 03 61 62 63",
            ),
            (
                OsdResponse::Stat(Some(ObjStat {
                    size: 4 << 20,
                    version: ver(),
                })),
                "02 01 80 80 80 02 07 ac 02",
            ),
            (
                OsdResponse::Extents(Some(vec![(0, 4096), (8192, 4096)])),
                "03 01 02 00 80 20 80 40 80 20",
            ),
            (
                OsdResponse::Listed(vec!["a".into(), "b".into()]),
                "04 02 01 61 01 62",
            ),
            (
                OsdResponse::Fetched {
                    size: 8192,
                    version: ver(),
                    data: Bytes::from_static(b"xyz"),
                },
                "05 80 40 07 ac 02 03 78 79 7a",
            ),
            (
                OsdResponse::Head {
                    head: Some(ver()),
                    state: PgCopyState::default(),
                },
                "06 01 07 ac 02 01 00",
            ),
            (OsdResponse::Marked, "07"),
            (OsdResponse::Stray { remove: true }, "08 01"),
            (
                OsdResponse::Objects(vec![("o".into(), ver())]),
                "09 01 01 6f 07 ac 02",
            ),
            (OsdResponse::NotPrimary { epoch: 43 }, "0a 2b"),
            (OsdResponse::Error(store_error()), "0b 10 04 62 75 73 79"),
        ],
    );
    // The Nones.
    g.msg("OsdResponse::Stat(None)", &OsdResponse::Stat(None), "02 00");
    g.msg(
        "OsdResponse::Extents(None)",
        &OsdResponse::Extents(None),
        "03 00",
    );
    g.msg(
        "OsdResponse::Head(None)",
        &OsdResponse::Head {
            head: None,
            state: PgCopyState {
                complete: false,
                log_from: None,
            },
        },
        "06 00 00 00",
    );
    g.finish("OsdResponse");
}

/// PG types the OSD reports to the monitors and keeps with each PG copy (the object store
/// wraps `PgLogEntry` and `PgCopyState` in its own versioned records; those are pinned by
/// its own golden tests).
#[test]
fn golden_pg_types() {
    let mut g = Golden::default();
    let phases: Vec<(PgPhase, &str)> = [
        PgPhase::Inactive,
        PgPhase::Peering,
        PgPhase::Recovering,
        PgPhase::Active,
        PgPhase::Backfilling,
        PgPhase::RecoveryWait,
        PgPhase::BackfillWait,
        PgPhase::Incomplete,
        PgPhase::Down,
    ]
    .into_iter()
    .zip(["00", "01", "02", "03", "04", "05", "06", "07", "08"])
    .collect();
    check_enum(&mut g, "PgPhase", pg_phase_variant, &phases);
    g.msg("PgReport", &pg_report(), "01 1f 02 0c 05 01");
    check_enum(
        &mut g,
        "LogOp",
        log_op_variant,
        &[
            (
                LogOp::Write {
                    offset: 4096,
                    len: 8192,
                },
                "00 80 20 80 40",
            ),
            (
                LogOp::Zero {
                    offset: 0,
                    len: 4096,
                },
                "01 00 80 20",
            ),
            (LogOp::Delete, "02"),
        ],
    );
    g.msg(
        "PgLogEntry",
        &PgLogEntry {
            version: ver(),
            object: "o".into(),
            op: LogOp::Delete,
        },
        "07 ac 02 01 6f 02",
    );
    g.msg(
        "PgCopyState",
        &PgCopyState {
            complete: true,
            log_from: Some(ver()),
        },
        "01 01 07 ac 02",
    );
    g.finish("PG types");
}

// ---------------------------------------------------------------------------------------
// Frames and record envelopes
// ---------------------------------------------------------------------------------------

fn encode_frame(f: Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    FrameCodec::default().encode(f, &mut buf).unwrap();
    buf.to_vec()
}

/// One whole frame of each kind: the 32-byte header (magic `STOR`, version, kind, tag,
/// payload length, data region offset and length, crc32c), then the payload.
#[test]
fn golden_frames() {
    assert_eq!(FRAME_MAGIC.to_le_bytes(), *b"STOR");
    assert_eq!(HEADER_LEN, 32);
    let mut g = Golden::default();
    let cases = [
        (
            "Frame::Request",
            FrameKind::Request,
            1,
            encode_payload(&MonRequest::Subscribe { have_epoch: 7 }).unwrap(),
            "
                53 54 4f 52 05 00 01 00 01 00 00 00 00 00 00 00
                02 00 00 00 00 00 00 00 00 00 00 00 27 7f 52 90
                02 07
            ",
        ),
        (
            "Frame::Reply",
            FrameKind::Reply,
            1,
            encode_payload(&MonResponse::HeartbeatAck { epoch: 9 }).unwrap(),
            "
                53 54 4f 52 05 00 02 00 01 00 00 00 00 00 00 00
                02 00 00 00 00 00 00 00 00 00 00 00 26 38 7b 8d
                05 09
            ",
        ),
        (
            "Frame::Push",
            FrameKind::Push,
            0,
            encode_payload(&MonResponse::Map(Box::new(ClusterMap::new("fs")))).unwrap(),
            "
                53 54 4f 52 05 00 03 00 00 00 00 00 00 00 00 00
                13 00 00 00 00 00 00 00 00 00 00 00 63 85 ec 44
                01 02 66 73 00 00 00 00 00 03 00 00 00 00 00 01
                00 00 00
            ",
        ),
    ];
    for (name, kind, tag, payload, want) in cases {
        let frame = Frame { kind, tag, payload };
        let got = encode_frame(frame.clone());
        if g.bytes(name, &got, want) {
            let back = FrameCodec::default()
                .decode(&mut BytesMut::from(&hex(want)[..]))
                .unwrap()
                .unwrap();
            assert_eq!(back, frame, "{name}");
        }
    }
    g.finish("frame");
}

/// A frame with a data region: a write large enough that its data is sent in place, with
/// the crc32c of each 4 KiB block of it between the header and the payload. The bytes
/// around the region are golden; the region is the data itself.
#[test]
fn golden_frame_with_data_region() {
    let data: Bytes = (0..4 * DATA_BLOCK_BYTES + 100)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    assert!(data.len() >= SEND_IN_PLACE_BYTES);
    let msg = OsdRequest::Replica {
        map_epoch: 42,
        from: 2,
        pg: pg(),
        object: "o".into(),
        version: ver(),
        mutation: Mutation::Write {
            offset: 0,
            data: BlockData::from(data.clone()),
        },
    };
    let frame = Frame {
        kind: FrameKind::Request,
        tag: 5,
        payload: encode_payload(&msg).unwrap(),
    };
    let got = encode_frame(frame.clone());
    // header, 5 block crcs, the payload up to the region, the region, the rest (nothing).
    let region_at = got.len() - data.len();
    assert_eq!(&got[region_at..], &data[..]);
    let mut g = Golden::default();
    g.bytes(
        "Frame::Request with a data region (all but the region)",
        &got[..region_at],
        "
            53 54 4f 52 05 00 01 00 05 00 00 00 00 00 00 00
            73 40 00 00 0f 00 00 00 64 40 00 00 1f e6 2b 56
            fc 77 90 71 04 b2 9b cf 41 2f fa a8 d5 9a b3 c7
            cb de fd c2 01 2a 02 01 1f 01 6f 07 ac 02 00 00
            e4 80 01
        ",
    );
    g.finish("frame");
    let back = FrameCodec::default()
        .decode(&mut BytesMut::from(&got[..]))
        .unwrap()
        .unwrap();
    assert_eq!(back, frame);
    let decoded: OsdRequest = decode_frame_payload(back.payload).unwrap();
    assert_eq!(decoded, msg);
}

/// The envelope of every versioned on-disk record: `[version u16 LE][postcard body]`.
#[test]
fn golden_record_envelope() {
    const RECORD: &str = "03 00 02 61 62 ac 02 01 07 ac 02";
    let mut g = Golden::default();
    let value = ("ab".to_string(), 300u32, Some(ver()));
    if g.bytes("encode_record(3, ..)", &encode_record(3, &value), RECORD) {
        let back: (String, u32, Option<ObjVersion>) = decode_record(3, &hex(RECORD)).unwrap();
        assert_eq!(back, value);
    }
    g.finish("record");
}

/// Names that are stored (object names of image data, the map's lock keys) or parsed
/// back (session names given on the command line).
#[test]
fn golden_names() {
    use store_types::map::{image_data_object, image_lock_key, parse_session, session_name};
    assert_eq!(image_lock_key(1, "ab"), "1/ab");
    assert_eq!(
        image_data_object("0123456789abcdef", 0x2a),
        "0123456789abcdef.000000000000002a"
    );
    assert_eq!(session_name(0xaa), "client.00000000000000aa");
    assert_eq!(parse_session("client.00000000000000aa"), Some(0xaa));
}

#[test]
fn wire_version_is_pinned() {
    // The golden bytes above are those of this version: a format change bumps it (and the
    // frames' golden bytes with it).
    assert_eq!(WIRE_VERSION, 5);
}
