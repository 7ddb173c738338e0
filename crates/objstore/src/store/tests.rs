//! The store's own tests: the commit journal and deferred writes seen from the store, and
//! its failure paths (the conformance suite in tests/ covers the `ObjectStore` contract).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::commit::Committer;
use super::deferred::DEFERRED_CLEAN_EVERY;
use super::format::{
    parse_superblock, superblock, Identity, SUPERBLOCK_MAGIC, SUPERBLOCK_MAGIC_JOURNAL,
};
use super::{BlockStore, CF_DEFERRED, DEFERRED_MAX_BLOCKS};
use crate::aligned::AlignedBuf;
use crate::device::file::FileDevice;
use crate::device::BlockDevice;
use crate::journal::JournalRegion;
use crate::{test_store_paths, ObjError, ObjectId, ObjectStore, Version, BLOCK_SIZE};

/// `writes` 4 KiB writes over seven objects, each object's blocks in turn.
async fn small_writes(store: &BlockStore<FileDevice>, writes: usize) {
    for i in 0..writes {
        let id = ObjectId {
            pool: 1,
            pg: 0,
            name: format!("o{}", i % 7),
        };
        let data = Bytes::from(vec![i as u8; BLOCK_SIZE]);
        let version = Version {
            epoch: 1,
            seq: i as u64 + 1,
        };
        store
            .write(&id, (i / 7 * BLOCK_SIZE) as u64, data, version)
            .await
            .expect("write");
    }
}

fn deferred_records(store: &BlockStore<FileDevice>) -> usize {
    let cf = store
        .db
        .cf_handle(CF_DEFERRED)
        .expect("column family exists");
    store
        .db
        .iterator_cf(cf, rocksdb::IteratorMode::Start)
        .count()
}

/// A file device whose durable writes (the journal's) fail while `fail` is set.
struct FailingWrites {
    dev: FileDevice,
    fail: Arc<std::sync::atomic::AtomicBool>,
    /// Fails writes without a flush (small writes' data going to its blocks).
    fail_lazy: Arc<std::sync::atomic::AtomicBool>,
}

impl BlockDevice for FailingWrites {
    fn blocks(&self) -> u64 {
        self.dev.blocks()
    }
    async fn read(&self, start: u64, blocks: usize) -> std::io::Result<AlignedBuf> {
        self.dev.read(start, blocks).await
    }
    async fn write(&self, start: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected write error"));
        }
        self.dev.write(start, buf).await
    }
    async fn write_lazy(&self, start: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        if self.fail_lazy.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected lazy write error"));
        }
        self.dev.write_lazy(start, buf).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.dev.flush().await
    }
}

type Flag = Arc<std::sync::atomic::AtomicBool>;

/// A new store on a device whose durable writes (first flag) or lazy writes (second)
/// fail while the flag is set.
async fn failing_store(
    dev_path: &std::path::Path,
    db: &std::path::Path,
) -> (BlockStore<FailingWrites>, Flag, Flag) {
    let (fail, fail_lazy) = (Flag::default(), Flag::default());
    let dev = FailingWrites {
        dev: FileDevice::open(dev_path).expect("open device"),
        fail: fail.clone(),
        fail_lazy: fail_lazy.clone(),
    };
    let store = BlockStore::create(dev, db, "fsid", "osd")
        .await
        .expect("create");
    (store, fail, fail_lazy)
}

fn named(n: &str) -> ObjectId {
    ObjectId {
        pool: 1,
        pg: 0,
        name: n.into(),
    }
}

fn version(seq: u64) -> Version {
    Version { epoch: 1, seq }
}

/// A small write whose data never reaches its blocks (the device refuses the write)
/// is still acknowledged, since its journal entry holds the data; later commits fail
/// instead of waiting for that entry to be released; the store opened again writes
/// the data from the journal.
#[tokio::test]
async fn a_failed_block_write_fails_later_commits_and_the_journal_restores_it() {
    let (_tmp, dev_path, db) = test_store_paths(16 << 20);
    let (store, _, fail_lazy) = failing_store(&dev_path, &db).await;
    let (id, v) = (named, version);
    fail_lazy.store(true, Ordering::Relaxed);
    let data = Bytes::from(vec![7u8; BLOCK_SIZE]);
    store
        .write(&id("a"), 0, data.clone(), v(1))
        .await
        .expect("journaled: acknowledged");
    let mut refused = false;
    for seq in 2..200 {
        let small = Bytes::from(vec![1u8; BLOCK_SIZE]);
        if store.write(&id("b"), 0, small, v(seq)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(refused, "commits go on failing, not hanging");
    drop(store);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
    assert_eq!(
        store.read(&id("a"), 0, BLOCK_SIZE).await.expect("read"),
        data,
        "written from the journal"
    );
}

/// A 256-block journal fills with held entries many times over (sequential 64 KiB
/// writes, far fewer than a cleaning round each lap): writers wait for the held data to
/// be flushed and released, never forever, and everything reads back after a reopen.
#[tokio::test]
async fn a_small_journal_full_of_held_entries_makes_room() {
    let (_tmp, dev_path, db) = test_store_paths(16 << 20);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::create(dev, &db, "fsid", "osd")
        .await
        .expect("create");
    let bytes = DEFERRED_MAX_BLOCKS * BLOCK_SIZE;
    let id = |i: u64| ObjectId {
        pool: 1,
        pg: 0,
        name: format!("o{}", i % 5),
    };
    let data = |i: u64| Bytes::from(vec![i as u8; bytes]);
    let writes = async {
        for i in 0..150u64 {
            let version = Version {
                epoch: 1,
                seq: i + 1,
            };
            store
                .write(&id(i), 0, data(i), version)
                .await
                .expect("write");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), writes)
        .await
        .expect("the journal made room");
    drop(store);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
    for i in 145..150 {
        let got = store.read(&id(i), 0, bytes).await.expect("read");
        assert_eq!(got, data(i), "object {}", i % 5);
    }
}

/// With a journal, small writes' data never goes into RocksDB, and the journal entries
/// holding it are released in rounds as it is flushed on its blocks.
#[tokio::test]
async fn small_writes_stay_out_of_rocksdb_and_their_entries_are_released() {
    let (_tmp, dev_path, db) = test_store_paths(64 << 20);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::create(dev, &db, "fsid", "osd")
        .await
        .expect("create");
    let writes = 3 * DEFERRED_CLEAN_EVERY + 8;
    small_writes(&store, writes).await;
    assert_eq!(deferred_records(&store), 0, "no data records in RocksDB");
    let held = || match &store.committer {
        Some(Committer::Journal(j)) => j.held_entries(),
        _ => panic!("a 64 MiB store has a journal"),
    };
    let mut left = held();
    for _ in 0..200 {
        if left <= DEFERRED_CLEAN_EVERY {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        left = held();
    }
    assert!(
        left <= DEFERRED_CLEAN_EVERY,
        "{left} of {writes} entries still held"
    );
}

/// A failed journal write fails its commit and every later one (nothing unjournaled is
/// acknowledged), and the store opened again holds exactly what was acknowledged.
#[tokio::test]
async fn a_failed_journal_write_fails_commits_until_reopened() {
    let (_tmp, dev_path, db) = test_store_paths(16 << 20);
    let (store, fail, _) = failing_store(&dev_path, &db).await;
    let (id, v) = (named, version);
    let kept = Bytes::from(vec![1u8; BLOCK_SIZE]);
    store
        .write(&id("a"), 0, kept.clone(), v(1))
        .await
        .expect("write");
    fail.store(true, Ordering::Relaxed);
    let lost = Bytes::from(vec![2u8; BLOCK_SIZE]);
    let err = store.write(&id("a"), 0, lost, v(2)).await;
    assert!(
        err.is_err(),
        "a write whose journal entry failed is not acknowledged"
    );
    fail.store(false, Ordering::Relaxed);
    let later = store.write(&id("b"), 0, kept.clone(), v(1)).await;
    assert!(
        later.is_err(),
        "commits fail until the store is opened again"
    );
    drop(store);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
    assert_eq!(
        store.read(&id("a"), 0, BLOCK_SIZE).await.expect("read"),
        kept
    );
    assert!(store.stat(&id("b")).await.expect("stat").is_none());
    store
        .write(&id("b"), 0, kept.clone(), v(1))
        .await
        .expect("write after reopen");
}

/// Superblocks with and without a journal round-trip; one whose magic and journal
/// record disagree, or whose journal does not fit the device, is refused (never taken
/// for a store without a journal, which would skip the replay).
#[test]
fn superblocks_name_their_journal_exactly() {
    let identity = Identity {
        fsid: "f".into(),
        osd_uuid: "u".into(),
        device_blocks: 1 << 20,
    };
    let region = JournalRegion::for_device(identity.device_blocks).expect("4 GiB");
    assert_eq!(
        parse_superblock(&superblock(&identity, None)),
        Ok((identity.clone(), None))
    );
    assert_eq!(
        parse_superblock(&superblock(&identity, Some(region))),
        Ok((identity.clone(), Some(region)))
    );
    let reseal = |buf: &mut AlignedBuf| {
        let crc = crc32c::crc32c(&buf[..BLOCK_SIZE - 4]);
        buf[BLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    };
    // The old magic over a journal record, and the journal magic without one.
    let mut mixed = superblock(&identity, Some(region));
    mixed[..8].copy_from_slice(&SUPERBLOCK_MAGIC);
    reseal(&mut mixed);
    assert!(parse_superblock(&mixed).is_err());
    let mut bare = superblock(&identity, None);
    bare[..8].copy_from_slice(&SUPERBLOCK_MAGIC_JOURNAL);
    reseal(&mut bare);
    assert!(parse_superblock(&bare).is_err());
    // A journal that does not fit the device.
    let small = Identity {
        device_blocks: region.blocks,
        ..identity.clone()
    };
    assert!(parse_superblock(&superblock(&small, Some(region))).is_err());
}

/// Concurrent 64 KiB deferred writes on a 16 MiB device (a 256-block journal, whose
/// entries hold 64 blocks at most): the queued commits are split into entries that fit,
/// every write succeeds, and all read back after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_concurrent_commits_are_split_into_entries_that_fit() {
    let (_tmp, dev_path, db) = test_store_paths(16 << 20);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = Arc::new(
        BlockStore::create(dev, &db, "fsid", "osd")
            .await
            .expect("create"),
    );
    assert!(store.first_data_block > 1, "a 16 MiB device gets a journal");
    let id = |i: usize| ObjectId {
        pool: 1,
        pg: 0,
        name: format!("o{i}"),
    };
    let bytes = DEFERRED_MAX_BLOCKS * BLOCK_SIZE;
    let data = |round: usize, i: usize| Bytes::from(vec![(round * 16 + i) as u8; bytes]);
    for round in 0..3 {
        let writes = (0..16).map(|i| {
            let store = store.clone();
            let version = Version {
                epoch: 1,
                seq: round as u64 + 1,
            };
            let (id, data) = (id(i), data(round, i));
            tokio::spawn(async move { store.write(&id, 0, data, version).await })
        });
        for w in futures::future::join_all(writes).await {
            w.expect("task").expect("write");
        }
    }
    let store = Arc::into_inner(store).expect("the only handle");
    drop(store);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
    for i in 0..16 {
        let got = store.read(&id(i), 0, bytes).await.expect("read");
        assert_eq!(got, data(2, i), "object {i}");
    }
}

/// Applied deferred writes are flushed in the background, in rounds of
/// DEFERRED_CLEAN_EVERY, and later commits remove their records; the data stays
/// readable (a store without a journal: with one there are no records).
#[tokio::test]
async fn applied_deferred_records_are_removed_in_the_background() {
    let (_tmp, dev_path, db) = test_store_paths(64 << 20);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::create_with(dev, &db, "fsid", "osd", false)
        .await
        .expect("create");
    let writes = 3 * DEFERRED_CLEAN_EVERY + 8;
    small_writes(&store, writes).await;
    // Removals ride in later commits: keep writing (another object) while waiting.
    let mut left = deferred_records(&store);
    for n in 0..200u64 {
        if left < DEFERRED_CLEAN_EVERY {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let id = ObjectId {
            pool: 1,
            pg: 0,
            name: "later".into(),
        };
        let version = Version {
            epoch: 1,
            seq: writes as u64 + n + 1,
        };
        let data = Bytes::from(vec![0u8; BLOCK_SIZE]);
        store.write(&id, 0, data, version).await.expect("write");
        left = deferred_records(&store);
    }
    assert!(
        left < DEFERRED_CLEAN_EVERY,
        "{left} of {writes} deferred records are still there"
    );
    for i in (0..writes).step_by(13) {
        let id = ObjectId {
            pool: 1,
            pg: 0,
            name: format!("o{}", i % 7),
        };
        let got = store
            .read(&id, (i / 7 * BLOCK_SIZE) as u64, BLOCK_SIZE)
            .await
            .expect("read");
        assert!(
            got.iter().all(|b| *b == i as u8),
            "write {i} reads back wrong"
        );
    }
}

/// D7: appending to a PG's log for the first time since the store was opened scans that
/// log (to count it), and a trim scans it again. Such a scan must not stall the writes of
/// other PGs. The scan of PG 1's log is held by a hook until a write to PG 2 has
/// completed (or 10 s, which only bounds the failure: that write takes milliseconds);
/// when the scan ran under the OSD-wide PG log mutex, the write to PG 2 waited for it.
#[test]
fn a_pg_log_scan_does_not_stall_writes_to_other_pgs() {
    use std::sync::mpsc;
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (_tmp, dev_path, db) = test_store_paths(16 << 20);
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let hook: super::LogScanHook = Arc::new(move |pool, pg| {
        if (pool, pg) == (1, 1) {
            let _ = started_tx.send(());
            // Bounded: a broken test must not hang the suite.
            let go = go_rx.lock().expect("lock");
            let _ = go.recv_timeout(Duration::from_secs(60));
        }
    });
    let store = rt
        .block_on(async {
            let dev = FileDevice::open(&dev_path).expect("open device");
            BlockStore::create(dev, &db, "fsid", "osd").await
        })
        .expect("create")
        .with_log_scan_hook(hook);
    let in_pg = |pg: u32, name: &str| ObjectId {
        pool: 1,
        pg,
        name: name.into(),
    };
    let (a, b) = (in_pg(1, "a"), in_pg(2, "b"));
    // Distinct object lock stripes: only the PG log may make one wait for the other.
    let stripe = |id: &ObjectId| store.lock(&super::format::object_key(id)) as *const _;
    assert_ne!(stripe(&a), stripe(&b));
    let store = Arc::new(store);
    let data = Bytes::from(vec![3u8; BLOCK_SIZE]);
    let write_a = {
        let (store, data) = (store.clone(), data.clone());
        rt.spawn(async move { store.write(&a, 0, data, version(1)).await })
    };
    started_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the scan of PG 1's log started");
    let (done_tx, done_rx) = mpsc::channel();
    let write_b = {
        let store = store.clone();
        rt.spawn(async move {
            let res = store.write(&b, 0, data, version(1)).await;
            let _ = done_tx.send(());
            res
        })
    };
    let b_done_during_scan = done_rx.recv_timeout(Duration::from_secs(10)).is_ok();
    go_tx.send(()).expect("release the scan");
    rt.block_on(write_a).expect("task").expect("write to PG 1");
    rt.block_on(write_b).expect("task").expect("write to PG 2");
    assert!(
        b_done_during_scan,
        "a write to PG 2 waited for the scan of PG 1's log"
    );
}

/// D10: when the allocator holds as free a block the block map still names (they
/// disagree), a commit that would free that block again is refused before anything
/// changes, and the store allocates nothing more, so the block is never handed out to a
/// second object; the store opened again rebuilds its free space from the block map.
#[tokio::test]
async fn a_commit_that_would_free_a_free_block_is_refused() {
    let (_tmp, dev_path, db) = test_store_paths(16 << 20);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::create(dev, &db, "fsid", "osd")
        .await
        .expect("create");
    let old = Bytes::from(vec![1u8; BLOCK_SIZE]);
    store
        .write(&named("a"), 0, old.clone(), version(1))
        .await
        .expect("write");
    let okey = super::format::object_key(&named("a"));
    let block = store.block_refs(&okey, 0, 1).expect("map")[0]
        .expect("mapped")
        .device_block;
    // The disagreement (a bug elsewhere): the allocator takes the block back while the
    // block map still names it.
    store
        .alloc
        .lock()
        .expect("lock")
        .free(block)
        .expect("in use");
    let used_before = store.usage().used_bytes;
    let new = Bytes::from(vec![2u8; BLOCK_SIZE]);
    let err = store.write(&named("a"), 0, new.clone(), version(2)).await;
    let want = crate::alloc::AllocError::DoubleFree {
        start: block,
        len: 1,
    };
    assert!(
        matches!(&err, Err(ObjError::Alloc(e)) if *e == want),
        "the overwrite is refused: {err:?}"
    );
    let got = store.read(&named("a"), 0, BLOCK_SIZE).await.expect("read");
    assert_eq!(got, old, "the refused commit changed nothing");
    assert_eq!(store.usage().used_bytes, used_before);
    // No other object can get the block: nothing is allocated any more.
    let other = store.write(&named("b"), 0, new.clone(), version(1)).await;
    assert!(matches!(other, Err(ObjError::Alloc(_))), "{other:?}");
    let delete = store.delete(&named("a"), version(3)).await;
    assert!(matches!(delete, Err(ObjError::Alloc(_))), "{delete:?}");
    drop(store);
    let dev = FileDevice::open(&dev_path).expect("open device");
    let store = BlockStore::open(dev, &db, "fsid").await.expect("reopen");
    store
        .write(&named("a"), 0, new.clone(), version(2))
        .await
        .expect("the reopened store writes again");
    assert_eq!(
        store.read(&named("a"), 0, BLOCK_SIZE).await.expect("read"),
        new
    );
}
