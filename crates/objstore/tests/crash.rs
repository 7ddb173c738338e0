//! Crash safety of the object store under SIGKILL.
//!
//! The test re-runs its own binary as a child process (selected by an environment
//! variable) that writes known patterns to a few objects, each writer sequential, logging
//! an intent line before each write and an ack line after it. The parent SIGKILLs the child
//! at random moments, many times, and after each kill reopens the store and checks, per
//! object, that its content equals the state after all acknowledged writes, or after those
//! plus the one write that was in flight. Nothing acknowledged is lost, nothing is torn,
//! and space held by uncommitted writes is free again.
//!
//! A second test simulates a power cut that keeps a large write's journal entry but not
//! its unflushed data: the entry must not be applied.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use store_objstore::device::uring::UringDevice;
use store_objstore::device::{create_file_device, FileFill};
use store_objstore::{BlockStore, ObjectId, ObjectStore, Version, BLOCK_SIZE};

const FSID: &str = "crash-fsid";
const WRITERS: u64 = 4;
const CHILD_ENV: &str = "OBJSTORE_CRASH_CHILD_DIR";
/// Set in the child of the test of stores without a commit journal.
const CHILD_WAL_ENV: &str = "OBJSTORE_CRASH_CHILD_WAL";
const OBJECT_SPAN: u64 = 256 * 1024;

fn id(w: u64) -> ObjectId {
    ObjectId {
        pool: 1,
        pg: 0,
        name: format!("obj{w}"),
    }
}

/// xorshift: the write parameters and data are a pure function of (writer, n).
fn rng(mut x: u64) -> impl FnMut() -> u64 {
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// The n-th write of writer w: offset, data.
fn nth_write(w: u64, n: u64) -> (u64, Bytes) {
    let mut r = rng(w * 1_000_003 + n);
    // Mix aligned multi-block writes and unaligned partial ones.
    let (off, len) = if r().is_multiple_of(2) {
        let b = r() % (OBJECT_SPAN / BLOCK_SIZE as u64 - 8);
        (b * BLOCK_SIZE as u64, (1 + r() % 8) * BLOCK_SIZE as u64)
    } else {
        (r() % (OBJECT_SPAN - 9000), 1 + r() % 9000)
    };
    let seed = r() as u8;
    let data: Vec<u8> = (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(31) ^ (n as u8))
        .collect();
    (off, Bytes::from(data))
}

fn log_path(dir: &Path, w: u64) -> PathBuf {
    dir.join(format!("writer{w}.log"))
}

/// The child: open (or create) the store and write until killed.
async fn child(dir: PathBuf) {
    let dev = UringDevice::open(&dir.join("dev.img")).expect("device");
    let db = dir.join("db");
    let fresh = std::fs::read_dir(&db)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    let store = if fresh {
        let journal = std::env::var_os(CHILD_WAL_ENV).is_none();
        BlockStore::create_with(dev, &db, FSID, "u", journal)
            .await
            .expect("create")
    } else {
        BlockStore::open(dev, &db, FSID).await.expect("open")
    };
    let store = std::sync::Arc::new(store);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let dir = dir.clone();
        tasks.push(tokio::spawn(async move {
            let done = replay_log(&log_path(&dir, w))
                .last()
                .map_or(0, |(n, _)| n + 1);
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path(&dir, w))
                .expect("log");
            for n in done.. {
                let (off, data) = nth_write(w, n);
                // One write(2) per line: `writeln!` on a File writes each formatted piece
                // with its own call, and a kill between them left a torn line ("I 1" of
                // "I 123") that named another write.
                log.write_all(format!("I {n}\n").as_bytes())
                    .expect("log intent");
                let v = Version {
                    epoch: 1,
                    seq: n + 1,
                };
                store.write(&id(w), off, data, v).await.expect("write");
                log.write_all(format!("A {n}\n").as_bytes())
                    .expect("log ack");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Acked,
    /// Not acknowledged and found not applied after a crash (resolved by the parent).
    Aborted,
    /// Intent logged, no ack: in flight when the child was killed.
    InFlight,
}

/// (n, outcome) for each write the log shows an intent for, in order.
fn replay_log(path: &Path) -> Vec<(u64, Outcome)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: Vec<(u64, Outcome)> = Vec::new();
    for line in text.lines() {
        let mut it = line.split(' ');
        let (Some(kind), Some(Ok(n))) = (it.next(), it.next().map(str::parse::<u64>)) else {
            continue; // a line torn by the kill
        };
        let resolve = |out: &mut Vec<(u64, Outcome)>, o| {
            if let Some(last) = out.last_mut().filter(|(m, _)| *m == n) {
                last.1 = o;
            }
        };
        match kind {
            "I" => out.push((n, Outcome::InFlight)),
            "A" => resolve(&mut out, Outcome::Acked),
            "X" => resolve(&mut out, Outcome::Aborted),
            _ => {}
        }
    }
    out
}

fn apply(state: &mut Vec<u8>, w: u64, n: u64) {
    let (off, data) = nth_write(w, n);
    let end = off as usize + data.len();
    if state.len() < end {
        state.resize(end, 0);
    }
    state[off as usize..end].copy_from_slice(&data);
}

/// Checks every object against its log; resolves the write that was in flight (appending
/// "A n" if it turned out applied, "X n" if not) so the next round starts from a known state.
async fn verify(dir: &Path) -> (u64, u64, u64) {
    let dev = UringDevice::open(&dir.join("dev.img")).expect("device");
    let store = BlockStore::open(dev, &dir.join("db"), FSID)
        .await
        .expect("reopen after crash");
    let replayed = store.journal_replayed_commits();
    let mut allocated = 0;
    let mut acked_total = 0;
    for w in 0..WRITERS {
        let log = replay_log(&log_path(dir, w));
        let in_flight: Vec<u64> = log
            .iter()
            .filter(|(_, o)| *o == Outcome::InFlight)
            .map(|(n, _)| *n)
            .collect();
        assert!(
            in_flight.len() <= 1
                && in_flight
                    .iter()
                    .all(|n| Some(*n) == log.last().map(|l| l.0)),
            "writer {w}: only the last write can be in flight: {log:?}"
        );
        let mut before = Vec::new();
        for (n, o) in &log {
            if *o == Outcome::Acked {
                apply(&mut before, w, *n);
                acked_total += 1;
            }
        }
        let mut after = before.clone();
        if let Some(n) = in_flight.first() {
            apply(&mut after, w, *n);
        }
        let got = match store.stat(&id(w)).await.expect("stat") {
            None => Vec::new(),
            Some(st) => {
                allocated += st.allocated_bytes;
                store
                    .read(&id(w), 0, st.size as usize)
                    .await
                    .expect("read")
                    .to_vec()
            }
        };
        let first_diff =
            |want: &[u8]| (0..got.len().max(want.len())).find(|i| got.get(*i) != want.get(*i));
        assert!(
            got == before || got == after,
            "writer {w}: object matches neither the acknowledged state (first difference at \
             byte {:?}) nor it plus the write in flight (at {:?}); log tail {:?}",
            first_diff(&before),
            first_diff(&after),
            &log[log.len().saturating_sub(4)..]
        );
        if let Some(n) = in_flight.first() {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(log_path(dir, w))
                .expect("log");
            // A torn last line would swallow ours: start on a fresh line.
            let mark = if got == after && got != before {
                "A"
            } else {
                "X"
            };
            writeln!(f, "\n{mark} {n}").expect("resolve");
        }
    }
    assert_eq!(
        store.usage().used_bytes,
        allocated,
        "blocks of uncommitted writes must be free again"
    );
    (acked_total, store.usage().objects, replayed)
}

#[test]
fn sigkill_at_random_points_loses_nothing_acknowledged() {
    sigkill_rounds("sigkill_at_random_points_loses_nothing_acknowledged", true);
}

/// The same for a store that commits through RocksDB's synced WAL (stores created before
/// the commit journal, and devices too small for one).
#[test]
fn sigkill_without_a_journal_loses_nothing_acknowledged() {
    sigkill_rounds(
        "sigkill_without_a_journal_loses_nothing_acknowledged",
        false,
    );
}

fn sigkill_rounds(test_name: &str, journal: bool) {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(child(PathBuf::from(dir)));
        return;
    }
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("crash-")
        .tempdir_in(base)
        .expect("tmp");
    create_file_device(&tmp.path().join("dev.img"), 64 << 20, FileFill::Reserve).expect("device");
    let exe = std::env::current_exe().expect("test binary");
    let mut r = rng(42);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut last_acked = 0;
    let mut replayed_total = 0;
    for round in 0..12 {
        let mut cmd = Command::new(&exe);
        cmd.args(["--exact", test_name, "--nocapture"])
            .env(CHILD_ENV, tmp.path());
        if !journal {
            cmd.env(CHILD_WAL_ENV, "1");
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        std::thread::sleep(Duration::from_millis(150 + r() % 350));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let (acked, objects, replayed) = rt.block_on(verify(tmp.path()));
        eprintln!(
            "round {round}: {acked} acknowledged writes verified, {objects} objects, \
             {replayed} commits applied again from the journal"
        );
        assert!(acked >= last_acked, "acknowledged writes went missing");
        last_acked = acked;
        replayed_total += replayed;
    }
    assert!(last_acked > 0, "the child never got a write acknowledged");
    // The kills must have left work for the journal's replay, or it was not tested.
    assert_eq!(
        replayed_total > 0,
        journal,
        "{replayed_total} commits replayed"
    );
}

/// Set in the child of the lost-data test: the step to run (see [`lost_data_child`]).
const LOST_DATA_STEP_ENV: &str = "OBJSTORE_LOST_DATA_STEP";
const BIG_BLOCKS: usize = 64;

fn big_id() -> ObjectId {
    ObjectId {
        pool: 1,
        pg: 0,
        name: "big".into(),
    }
}

fn big_version(n: u8) -> Bytes {
    Bytes::from(
        (0..BIG_BLOCKS * BLOCK_SIZE)
            .map(|i| n ^ (i as u8).wrapping_mul(7))
            .collect::<Vec<u8>>(),
    )
}

/// Step "first": creates the store and writes version 1 of a large object, then closes it.
/// Step "second": writes version 2 over all of it and exits at once on the acknowledgement,
/// as a crash would, so the write's commit is in the journal only.
async fn lost_data_child(dir: PathBuf, step: &str) {
    let dev = UringDevice::open(&dir.join("dev.img")).expect("device");
    let db = dir.join("db");
    let big = big_id();
    let v = |seq| Version { epoch: 1, seq };
    if step == "first" {
        let store = BlockStore::create_with(dev, &db, FSID, "u", true)
            .await
            .expect("create");
        store
            .write(&big, 0, big_version(1), v(1))
            .await
            .expect("v1");
        std::fs::write(
            dir.join("first_data_block"),
            store.first_data_block().to_string(),
        )
        .expect("note");
        return;
    }
    let store = BlockStore::open(dev, &db, FSID).await.expect("open");
    store
        .write(&big, 0, big_version(2), v(2))
        .await
        .expect("v2");
    std::process::exit(0);
}

/// A large write's data goes to the device without a flush of its own: its journal
/// entry's flush covers it. A power cut can still persist the entry and not the data (a
/// volatile write cache keeps no order), so replay must not apply a last entry whose data
/// is not there. Here the child writes version 2 of an object and stops dead; then the
/// device's data blocks are set back to what they held before (the data "lost", the entry
/// kept), and the reopened store holds version 1, readable, not blocks that fail their
/// checksums. Without the loss, version 2 is there.
#[test]
fn a_large_write_whose_data_was_lost_before_its_flush_is_not_applied() {
    let test_name = "a_large_write_whose_data_was_lost_before_its_flush_is_not_applied";
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let step = std::env::var(LOST_DATA_STEP_ENV).expect("step");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(lost_data_child(PathBuf::from(dir), &step));
        return;
    }
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let exe = std::env::current_exe().expect("test binary");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for lose in [false, true] {
        let tmp = tempfile::Builder::new()
            .prefix("lost-data-")
            .tempdir_in(&base)
            .expect("tmp");
        let dev_path = tmp.path().join("dev.img");
        create_file_device(&dev_path, 64 << 20, FileFill::Reserve).expect("device");
        let run = |step: &str| {
            let status = Command::new(&exe)
                .args(["--exact", test_name, "--nocapture"])
                .env(CHILD_ENV, tmp.path())
                .env(LOST_DATA_STEP_ENV, step)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .status()
                .expect("child");
            assert!(status.success(), "child step {step}: {status}");
        };
        run("first");
        let before = std::fs::read(&dev_path).expect("device image");
        run("second");
        let first: usize = std::fs::read_to_string(tmp.path().join("first_data_block"))
            .expect("note")
            .parse()
            .expect("number");
        let mut after = std::fs::read(&dev_path).expect("device image");
        let data_from = first * BLOCK_SIZE;
        let changed = (data_from..after.len())
            .step_by(BLOCK_SIZE)
            .filter(|at| after[*at..*at + BLOCK_SIZE] != before[*at..*at + BLOCK_SIZE])
            .count();
        assert!(
            changed >= BIG_BLOCKS,
            "version 2 wrote {changed} data blocks"
        );
        if lose {
            after[data_from..].copy_from_slice(&before[data_from..]);
            std::fs::write(&dev_path, &after).expect("lose the data");
        }
        let got = rt.block_on(async {
            let dev = UringDevice::open(&dev_path).expect("device");
            let store = BlockStore::open(dev, &tmp.path().join("db"), FSID)
                .await
                .expect("reopen");
            store
                .read(&big_id(), 0, BIG_BLOCKS * BLOCK_SIZE)
                .await
                .expect("read after the replay")
        });
        let want = big_version(if lose { 1 } else { 2 });
        assert!(
            got == want,
            "lose {lose}: not version {}",
            if lose { 1 } else { 2 }
        );
    }
}
