//! The conformance suite every object store backend passes: the same tests run on the
//! io_uring device and on the pread/pwrite device, with real RocksDB and real O_DIRECT
//! files in a temp dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use store_objstore::aligned::AlignedBuf;
use store_objstore::device::file::FileDevice;
use store_objstore::device::uring::UringDevice;
use store_objstore::device::{create_file_device, BlockDevice, FileFill};
use store_objstore::{
    BlockStore, LogOp, ObjError, ObjectId, ObjectStore, PgCopyState, Version, BLOCK_SIZE,
};

const FSID: &str = "conformance-fsid";
const MIB: u64 = 1 << 20;

struct Env {
    _tmp: tempfile::TempDir,
    dev: PathBuf,
    db: PathBuf,
}

fn env(size_bytes: u64) -> Env {
    // O_DIRECT needs a filesystem that supports it: tmpfs does not, so use the target dir's
    // filesystem rather than /tmp when it is tmpfs.
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("objstore-")
        .tempdir_in(base)
        .expect("tmp");
    let dev = tmp.path().join("dev.img");
    create_file_device(&dev, size_bytes, FileFill::Reserve).expect("device");
    let db = tmp.path().join("db");
    Env { _tmp: tmp, dev, db }
}

fn id(name: &str) -> ObjectId {
    ObjectId {
        pool: 1,
        pg: 7,
        name: name.into(),
    }
}

fn v(seq: u64) -> Version {
    Version { epoch: 1, seq }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i * 31 % 251) as u8))
            .collect::<Vec<u8>>(),
    )
}

trait Open: BlockDevice + Sized {
    fn open_dev(p: &Path) -> Self;
    /// Whether stores are created with a commit journal (devices of 16 MiB and more).
    const JOURNAL: bool = true;
}

/// A uring device whose stores are created without a commit journal: they commit
/// through RocksDB's synced WAL, like stores created before journals.
struct NoJournal(UringDevice);

impl BlockDevice for NoJournal {
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }
    async fn read(&self, start: u64, blocks: usize) -> std::io::Result<AlignedBuf> {
        self.0.read(start, blocks).await
    }
    async fn write(&self, start: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        self.0.write(start, buf).await
    }
    async fn write_lazy(&self, start: u64, buf: AlignedBuf) -> std::io::Result<AlignedBuf> {
        self.0.write_lazy(start, buf).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.0.flush().await
    }
}

impl Open for NoJournal {
    fn open_dev(p: &Path) -> Self {
        NoJournal(UringDevice::open(p).expect("open uring device"))
    }
    const JOURNAL: bool = false;
}
impl Open for FileDevice {
    fn open_dev(p: &Path) -> Self {
        FileDevice::open(p).expect("open file device")
    }
}
impl Open for UringDevice {
    fn open_dev(p: &Path) -> Self {
        UringDevice::open(p).expect("open uring device")
    }
}

async fn create<D: Open>(e: &Env) -> BlockStore<D> {
    BlockStore::create_with(D::open_dev(&e.dev), &e.db, FSID, "osd-uuid", D::JOURNAL)
        .await
        .expect("create")
}

async fn reopen<D: Open>(e: &Env) -> BlockStore<D> {
    BlockStore::open(D::open_dev(&e.dev), &e.db, FSID)
        .await
        .expect("open")
}

async fn roundtrip_unaligned_and_holes<D: Open>() {
    let e = env(16 * MIB);
    let s = create::<D>(&e).await;
    let o = id("obj");
    assert!(matches!(
        s.read(&o, 0, 10).await,
        Err(ObjError::NotFound(_))
    ));
    // Unaligned write spanning three blocks.
    let data = pattern(1, 2 * BLOCK_SIZE + 100);
    s.write(&o, 1000, data.clone(), v(1)).await.unwrap();
    assert_eq!(s.read(&o, 1000, data.len()).await.unwrap(), data);
    // The bytes before it are zeros; reads stop at the end of the object.
    assert_eq!(
        s.read(&o, 0, 1000).await.unwrap(),
        Bytes::from(vec![0u8; 1000])
    );
    let st = s.stat(&o).await.unwrap().unwrap();
    assert_eq!(st.size, 1000 + data.len() as u64);
    assert_eq!(st.version, v(1));
    assert_eq!(s.read(&o, st.size - 10, 100).await.unwrap().len(), 10);
    assert!(s.read(&o, st.size + 5, 100).await.unwrap().is_empty());
    // A sparse write far away: the hole between takes no space and reads as zeros.
    s.write(&o, 3 * MIB, pattern(2, 10), v(2)).await.unwrap();
    let st = s.stat(&o).await.unwrap().unwrap();
    assert_eq!(st.size, 3 * MIB + 10);
    assert_eq!(
        st.allocated_bytes,
        4 * BLOCK_SIZE as u64,
        "thin provisioning"
    );
    assert_eq!(
        s.read(&o, MIB, 4096).await.unwrap(),
        Bytes::from(vec![0u8; 4096])
    );
    // Overwrite in the middle keeps the neighbours.
    s.write(&o, 1500, pattern(9, 10), v(3)).await.unwrap();
    let back = s.read(&o, 1000, data.len()).await.unwrap();
    assert_eq!(&back[..500], &data[..500]);
    assert_eq!(&back[500..510], &pattern(9, 10)[..]);
    assert_eq!(&back[510..], &data[510..]);
}

async fn versions_only_grow<D: Open>() {
    let e = env(8 * MIB);
    let s = create::<D>(&e).await;
    let o = id("v");
    s.write(&o, 0, pattern(1, 10), v(5)).await.unwrap();
    let err = s.write(&o, 0, pattern(2, 10), v(4)).await.unwrap_err();
    assert!(matches!(err, ObjError::StaleVersion { .. }), "{err}");
    assert_eq!(
        s.read(&o, 0, 10).await.unwrap(),
        pattern(1, 10),
        "a refused write changes nothing"
    );
}

/// Waits (5 s at most) until the store uses at most `bytes`: blocks whose deferred write is
/// still on its way to the device (gathered for up to 10 ms) are freed once it is done.
async fn wait_used_at_most<D: Open>(s: &BlockStore<D>, bytes: u64) {
    let t0 = std::time::Instant::now();
    while s.usage().used_bytes > bytes {
        assert!(t0.elapsed().as_secs() < 5, "freed space not returned");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn zero_and_delete_free_space<D: Open>() {
    let e = env(16 * MIB);
    let s = create::<D>(&e).await;
    let base = s.usage().used_bytes;
    let o = id("z");
    s.write(&o, 0, pattern(3, 4 * MIB as usize), v(1))
        .await
        .unwrap();
    assert_eq!(s.usage().used_bytes - base, 4 * MIB);
    // Zero 1 MiB + 100 bytes from offset 100: whole blocks freed, edges rewritten.
    s.zero(&o, 100, MIB + 100, v(2)).await.unwrap();
    let back = s.read(&o, 0, 2 * MIB as usize).await.unwrap();
    assert_eq!(&back[..100], &pattern(3, 100)[..]);
    assert!(back[100..(MIB + 200) as usize].iter().all(|b| *b == 0));
    assert_eq!(
        &back[(MIB + 200) as usize..],
        &pattern(3, 2 * MIB as usize)[(MIB + 200) as usize..]
    );
    let freed = 4 * MIB - (s.usage().used_bytes - base);
    assert_eq!(freed, MIB - BLOCK_SIZE as u64, "255 whole blocks freed");
    assert_eq!(s.usage().objects, 1);
    assert!(s.delete(&o, v(3)).await.unwrap());
    assert!(!s.delete(&o, v(4)).await.unwrap());
    wait_used_at_most(&s, base).await;
    assert_eq!(s.usage().used_bytes, base);
    assert_eq!(s.usage().objects, 0);
}

async fn allocation_is_reported_per_block<D: Open>() {
    let e = env(16 * MIB);
    let s = create::<D>(&e).await;
    let o = id("sparse");
    assert_eq!(s.allocated(&o, 0, MIB).await.unwrap(), None);
    // Blocks 1 and 2 (from a write straddling them), then block 10.
    s.write(&o, 5000, pattern(1, 5000), v(1)).await.unwrap();
    s.write(&o, 10 * 4096, pattern(2, 4096), v(2))
        .await
        .unwrap();
    let bs = BLOCK_SIZE as u64;
    assert_eq!(
        s.allocated(&o, 0, MIB).await.unwrap(),
        Some(vec![(bs, 2 * bs), (10 * bs, bs)])
    );
    // Clipped to the range asked and to the object's size.
    assert_eq!(
        s.allocated(&o, 6000, 50_000).await.unwrap(),
        Some(vec![(6000, 3 * bs - 6000), (10 * bs, bs)])
    );
    // Zeroing a whole block frees it.
    s.zero(&o, bs, bs, v(3)).await.unwrap();
    assert_eq!(
        s.allocated(&o, 0, MIB).await.unwrap(),
        Some(vec![(2 * bs, bs), (10 * bs, bs)])
    );
}

async fn list_by_pg<D: Open>() {
    let e = env(8 * MIB);
    let s = create::<D>(&e).await;
    for (pg, name) in [(7, "b"), (7, "a"), (8, "c"), (7, "a-longer")] {
        let o = ObjectId {
            pool: 1,
            pg,
            name: name.into(),
        };
        s.write(&o, 0, pattern(1, 1), v(1)).await.unwrap();
    }
    let mut names = s.list(1, 7).await.unwrap();
    names.sort();
    assert_eq!(names, vec!["a", "a-longer", "b"]);
    assert_eq!(s.list(1, 8).await.unwrap(), vec!["c"]);
    assert!(s.list(2, 7).await.unwrap().is_empty());
}

async fn survives_reopen_and_detects_corruption<D: Open>() {
    let e = env(8 * MIB);
    let o = id("persist");
    {
        let s = create::<D>(&e).await;
        s.write(&o, 0, pattern(4, 3 * BLOCK_SIZE), v(1))
            .await
            .unwrap();
        s.write(&o, BLOCK_SIZE as u64, pattern(5, BLOCK_SIZE), v(2))
            .await
            .unwrap();
    }
    let s = reopen::<D>(&e).await;
    let back = s.read(&o, 0, 3 * BLOCK_SIZE).await.unwrap();
    assert_eq!(
        &back[BLOCK_SIZE..2 * BLOCK_SIZE],
        &pattern(5, BLOCK_SIZE)[..]
    );
    assert_eq!(
        s.usage().used_bytes,
        3 * BLOCK_SIZE as u64,
        "freed blocks stay free after reopen"
    );
    drop(s);
    // Flip a bit in every data block on the device: every read of the object must fail.
    let mut raw = std::fs::read(&e.dev).unwrap();
    for b in 1..(raw.len() / BLOCK_SIZE) {
        let chunk = &raw[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
        if chunk.iter().any(|x| *x != 0) {
            raw[b * BLOCK_SIZE + 17] ^= 0x04;
        }
    }
    std::fs::write(&e.dev, raw).unwrap();
    let s = reopen::<D>(&e).await;
    let err = s.read(&o, 0, 10).await.unwrap_err();
    assert!(matches!(err, ObjError::Checksum { .. }), "{err}");
    assert_eq!(s.usage().checksum_errors, 1);
}

async fn full_device_fails_cleanly<D: Open>() {
    let e = env(MIB);
    let s = create::<D>(&e).await;
    let keep = id("keep");
    s.write(&keep, 0, pattern(6, 100 * BLOCK_SIZE), v(1))
        .await
        .unwrap();
    let big = id("big");
    let err = s
        .write(&big, 0, pattern(7, 200 * BLOCK_SIZE), v(1))
        .await
        .unwrap_err();
    assert!(matches!(err, ObjError::NoSpace { .. }), "{err}");
    assert_eq!(
        s.read(&keep, 0, 100 * BLOCK_SIZE).await.unwrap(),
        pattern(6, 100 * BLOCK_SIZE)
    );
    assert!(
        s.stat(&big).await.unwrap().is_none(),
        "a failed write creates nothing"
    );
    // Overwriting in place still works when there is room for the copy.
    s.write(&keep, 0, pattern(8, 10 * BLOCK_SIZE), v(2))
        .await
        .unwrap();
}

async fn foreign_or_missing_metadata_is_refused<D: Open>() {
    let e = env(8 * MIB);
    drop(create::<D>(&e).await);
    let err = BlockStore::open(D::open_dev(&e.dev), &e.db, "other-cluster")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("belongs to cluster"), "{err}");
    // Creating over an existing device is refused too.
    let empty = e.db.with_extension("new");
    let err = BlockStore::create(D::open_dev(&e.dev), &empty, FSID, "u")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("already holds a store"), "{err}");
    // Metadata gone: refuse, never start empty over live data.
    std::fs::remove_dir_all(&e.db).unwrap();
    let err = BlockStore::open(D::open_dev(&e.dev), &e.db, FSID)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("missing or empty"), "{err}");
}

async fn pg_log_records_every_mutation_and_is_trimmed<D: Open>() {
    let e = env(8 * MIB);
    let s = create::<D>(&e).await.with_pg_log_limit(20);
    let a = id("a");
    let other_pg = ObjectId {
        pool: 1,
        pg: 8,
        name: "x".into(),
    };
    s.write(&a, 0, pattern(1, 10), v(1)).await.unwrap();
    s.zero(&a, 0, 4, v(2)).await.unwrap();
    s.write(&other_pg, 0, pattern(1, 1), v(3)).await.unwrap();
    s.delete(&a, v(4)).await.unwrap();
    let log = s.pg_log(1, 7, None, 100).await.unwrap();
    let ops: Vec<(u64, LogOp)> = log.iter().map(|e| (e.version.seq, e.op.clone())).collect();
    assert_eq!(
        ops,
        vec![
            (1, LogOp::Write { offset: 0, len: 10 }),
            (2, LogOp::Zero { offset: 0, len: 4 }),
            (4, LogOp::Delete),
        ]
    );
    assert!(log.iter().all(|e| e.object == "a"));
    assert_eq!(s.pg_log(1, 7, Some(v(2)), 100).await.unwrap().len(), 1);
    assert_eq!(s.pg_log(1, 8, None, 100).await.unwrap().len(), 1);
    assert_eq!(s.pg_log_head(1, 7).await.unwrap(), Some(v(4)));
    assert_eq!(s.pg_log_head(1, 8).await.unwrap(), Some(v(3)));
    assert_eq!(s.pg_log_head(1, 9).await.unwrap(), None);
    // A refused (stale) write adds nothing.
    s.write(&a, 0, pattern(1, 1), v(10)).await.unwrap();
    assert!(s.write(&a, 0, pattern(1, 1), v(9)).await.is_err());
    assert_eq!(s.pg_log(1, 7, None, 100).await.unwrap().len(), 4);
    // The log is bounded; the newest entries are kept.
    for seq in 11..80 {
        s.write(&a, 0, pattern(2, 1), v(seq)).await.unwrap();
    }
    let log = s.pg_log(1, 7, None, 1000).await.unwrap();
    assert!(log.len() <= 40, "{} entries kept", log.len());
    assert_eq!(log.last().unwrap().version, v(79));
    assert!(log.windows(2).all(|w| w[0].version < w[1].version));
    drop(s);
    // The log survives a restart with the data.
    let s = reopen::<D>(&e).await;
    assert_eq!(
        s.pg_log(1, 7, None, 1000)
            .await
            .unwrap()
            .last()
            .unwrap()
            .version,
        v(79)
    );
}

async fn pg_state_is_kept_per_pg_across_reopen<D: Open>() {
    let e = env(8 * MIB);
    let s = create::<D>(&e).await;
    assert_eq!(s.pg_state(1, 7).await.unwrap(), PgCopyState::default());
    let marked = PgCopyState {
        complete: false,
        log_from: Some(v(5)),
    };
    s.set_pg_state(1, 7, marked).await.unwrap();
    assert_eq!(s.pg_state(1, 7).await.unwrap(), marked);
    assert_eq!(s.pg_state(1, 8).await.unwrap(), PgCopyState::default());
    drop(s);
    let s = reopen::<D>(&e).await;
    assert_eq!(s.pg_state(1, 7).await.unwrap(), marked);
    let done = PgCopyState {
        complete: true,
        log_from: Some(v(9)),
    };
    s.set_pg_state(1, 7, done).await.unwrap();
    assert_eq!(s.pg_state(1, 7).await.unwrap(), done);
}

/// Random operations against an in-memory model, with a reopen in the middle.
async fn random_ops_match_a_model<D: Open>() {
    let e = env(32 * MIB);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut s = create::<D>(&e).await;
    for step in 0..400u64 {
        if step == 200 {
            drop(s);
            s = reopen::<D>(&e).await;
        }
        let name = format!("o{}", next(6));
        let o = id(&name);
        let off = next(64 * 1024);
        let len = 1 + next(3 * BLOCK_SIZE as u64 + 500) as usize;
        match next(10) {
            0..=5 => {
                let data = pattern(step as u8, len);
                s.write(&o, off, data.clone(), v(step)).await.unwrap();
                let m = model.entry(name).or_default();
                let end = off as usize + len;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[off as usize..end].copy_from_slice(&data);
            }
            6 => {
                s.zero(&o, off, len as u64, v(step)).await.unwrap();
                let m = model.entry(name).or_default();
                let end = off as usize + len;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[off as usize..end].fill(0);
            }
            7 => {
                assert_eq!(
                    s.delete(&o, v(step)).await.unwrap(),
                    model.remove(&name).is_some()
                );
            }
            _ => match model.get(&name) {
                None => assert!(s.read(&o, off, len).await.is_err()),
                Some(m) => {
                    let got = s.read(&o, off, len).await.unwrap();
                    let from = (off as usize).min(m.len());
                    let to = (off as usize + len).min(m.len());
                    assert_eq!(&got[..], &m[from..to], "step {step} {name} {off}+{len}");
                }
            },
        }
    }
    for (name, m) in &model {
        assert_eq!(
            &s.read(&id(name), 0, m.len()).await.unwrap()[..],
            &m[..],
            "{name}"
        );
    }
    assert_eq!(s.usage().objects, model.len() as u64);
}

async fn stray_pgs_are_listed_and_removed_in_steps<D: Open>() {
    let e = env(16 * MIB);
    let s = create::<D>(&e).await;
    let obj = |pool, pg, name: &str| ObjectId {
        pool,
        pg,
        name: name.into(),
    };
    for i in 0..5u64 {
        let o = obj(1, 7, &format!("o{i}"));
        s.write(&o, 0, pattern(i as u8, 3 * BLOCK_SIZE), v(i + 1))
            .await
            .unwrap();
    }
    s.write(&obj(1, 9, "keep"), 0, pattern(9, 100), v(1))
        .await
        .unwrap();
    // PG u32::MAX of pool 2: only a copy state (an empty, incomplete copy).
    let state = PgCopyState {
        complete: false,
        log_from: None,
    };
    s.set_pg_state(2, u32::MAX, state).await.unwrap();
    assert_eq!(s.pgs().await.unwrap(), vec![(1, 7), (1, 9), (2, u32::MAX)]);
    let used = s.usage().used_bytes;
    // Two objects per step: three steps remove the objects, the fourth the log.
    for _ in 0..3 {
        assert!(!s.remove_pg(1, 7, 2).await.unwrap());
    }
    assert!(s.list(1, 7).await.unwrap().is_empty());
    wait_used_at_most(&s, used - 15 * BLOCK_SIZE as u64).await;
    assert!(s.remove_pg(1, 7, 2).await.unwrap());
    assert!(s.pg_log(1, 7, None, 100).await.unwrap().is_empty());
    assert!(s.remove_pg(2, u32::MAX, 2).await.unwrap());
    assert_eq!(
        s.pg_state(2, u32::MAX).await.unwrap(),
        PgCopyState::default()
    );
    // The other PG is untouched, and a reopened store sees the same.
    assert_eq!(s.pgs().await.unwrap(), vec![(1, 9)]);
    drop(s);
    let s = reopen::<D>(&e).await;
    assert_eq!(s.pgs().await.unwrap(), vec![(1, 9)]);
    assert_eq!(s.usage().objects, 1);
    let back = s.read(&obj(1, 9, "keep"), 0, 100).await.unwrap();
    assert_eq!(back, pattern(9, 100));
}

/// Zeroes every data block of the device from block `first`, as if every write not
/// flushed were lost (the superblock and the journal, written durably, stay).
fn lose_device_data(e: &Env, size_bytes: u64, first: u64) {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&e.dev)
        .unwrap();
    let from = first * BLOCK_SIZE as u64;
    f.seek(std::io::SeekFrom::Start(from)).unwrap();
    f.write_all(&vec![0u8; (size_bytes - from) as usize])
        .unwrap();
    f.sync_all().unwrap();
}

/// Small writes are deferred: their data is in the synced metadata commit (or the
/// journal entry). If the device loses every unflushed block (zeroed here, as after a
/// power cut), the next open writes them again, except where a block was freed and reused
/// since (no stale data written over newer), and every acknowledged write reads back.
async fn deferred_writes_survive_lost_device_writes<D: Open>() {
    // Large enough that its journal never asks for its held data to be flushed early:
    // zeroing flushed blocks would be losing durable data, not unflushed writes.
    const DEV: u64 = 64 * MIB;
    let e = env(DEV);
    let s = create::<D>(&e).await;
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut seq = 0;
    for round in 0..3u8 {
        for i in 0..6u8 {
            seq += 1;
            let name = format!("o{i}");
            let data = pattern(round * 16 + i, 2 * BLOCK_SIZE + 100);
            let offset = u64::from(i) * 512;
            s.write(&id(&name), offset, data.clone(), v(seq))
                .await
                .unwrap();
            let m = model.entry(name).or_default();
            let end = offset as usize + data.len();
            if m.len() < end {
                m.resize(end, 0);
            }
            m[offset as usize..end].copy_from_slice(&data);
        }
    }
    let first = s.first_data_block();
    drop(s);
    // Every data block lost from the device.
    lose_device_data(&e, DEV, first);
    let s = reopen::<D>(&e).await;
    for (name, want) in &model {
        let got = s.read(&id(name), 0, want.len()).await.unwrap();
        assert!(got == want.as_slice(), "{name} differs after the replay");
    }
    // Replayed records are gone: another reopen over a zeroed device finds nothing to
    // write and every read fails its checksum rather than returning zeros.
    drop(s);
    lose_device_data(&e, DEV, first);
    let s = reopen::<D>(&e).await;
    let err = s.read(&id("o0"), 0, 100).await.unwrap_err();
    assert!(matches!(err, ObjError::Checksum { .. }), "{err:?}");
}

/// Data that comes with its block crcs (as a write's data from a frame does), aligned in
/// memory or not, on a block boundary or not, with a partial last block or not: what is
/// read back, before and after a reopen, is what was written, and every block passes the
/// read's check against its stored crc.
async fn data_with_block_crcs_reads_back<D: Open>() {
    use store_types::blockdata::BlockData;
    let e = env(16 * MIB);
    let s = create::<D>(&e).await;
    // An aligned buffer's bytes: the store may write them to the device as they are.
    let aligned = |seed: u8, blocks: usize| {
        let src = pattern(seed, blocks * BLOCK_SIZE);
        Bytes::from_owner(AlignedBuf::with_data(blocks, 0, &src))
    };
    let cases: Vec<(&str, u64, Bytes)> = vec![
        ("aligned-64", 0, aligned(1, 64)),
        ("aligned-small", 8 * BLOCK_SIZE as u64, aligned(2, 2)),
        (
            "misaligned-memory",
            0,
            pattern(3, 20 * BLOCK_SIZE + 1).slice(1..),
        ),
        (
            "partial-last",
            4 * BLOCK_SIZE as u64,
            pattern(4, 5 * BLOCK_SIZE + 300),
        ),
        ("unaligned-offset", 1000, pattern(5, 6 * BLOCK_SIZE)),
    ];
    for (i, (name, offset, bytes)) in cases.iter().enumerate() {
        let data = BlockData::checksummed(bytes.clone());
        s.write(&id(name), *offset, data, v(i as u64 + 1))
            .await
            .unwrap();
        let back = s.read(&id(name), *offset, bytes.len()).await.unwrap();
        assert_eq!(back, bytes, "{name}");
    }
    // Reads from a block boundary come with the crcs the blocks were verified against:
    // holes (the first 8 blocks of "aligned-small") and a short last block included.
    let reads = [
        ("aligned-64", 0, 64 * BLOCK_SIZE),
        ("aligned-small", 0, 10 * BLOCK_SIZE),
        ("partial-last", 4 * BLOCK_SIZE as u64, 5 * BLOCK_SIZE + 300),
        ("partial-last", 0, MIB as usize),
    ];
    for (name, offset, len) in reads {
        let got = s.read_data(&id(name), offset, len).await.unwrap();
        let crcs = got.block_crcs().expect("crcs of an aligned read");
        assert_eq!(
            crcs,
            store_types::wire::block_crcs(&got),
            "{name} at {offset}"
        );
    }
    let unaligned = s
        .read_data(&id("aligned-64"), 100, BLOCK_SIZE)
        .await
        .unwrap();
    assert_eq!(unaligned.block_crcs(), None);
    // The aligned source stays as it was (the store never writes into shared bytes).
    assert_eq!(cases[0].2, aligned(1, 64));
    drop(s);
    let s = reopen::<D>(&e).await;
    for (name, offset, bytes) in &cases {
        let back = s.read(&id(name), *offset, bytes.len()).await.unwrap();
        assert_eq!(&back, bytes, "{name} after reopen");
    }
}

macro_rules! conformance {
    ($module:ident, $dev:ty) => {
        mod $module {
            use super::*;
            #[tokio::test]
            async fn roundtrip_unaligned_and_holes() {
                super::roundtrip_unaligned_and_holes::<$dev>().await
            }
            #[tokio::test]
            async fn versions_only_grow() {
                super::versions_only_grow::<$dev>().await
            }
            #[tokio::test]
            async fn zero_and_delete_free_space() {
                super::zero_and_delete_free_space::<$dev>().await
            }
            #[tokio::test]
            async fn allocation_is_reported_per_block() {
                super::allocation_is_reported_per_block::<$dev>().await
            }
            #[tokio::test]
            async fn list_by_pg() {
                super::list_by_pg::<$dev>().await
            }
            #[tokio::test]
            async fn survives_reopen_and_detects_corruption() {
                super::survives_reopen_and_detects_corruption::<$dev>().await
            }
            #[tokio::test]
            async fn full_device_fails_cleanly() {
                super::full_device_fails_cleanly::<$dev>().await
            }
            #[tokio::test]
            async fn foreign_or_missing_metadata_is_refused() {
                super::foreign_or_missing_metadata_is_refused::<$dev>().await
            }
            #[tokio::test]
            async fn pg_log_records_every_mutation_and_is_trimmed() {
                super::pg_log_records_every_mutation_and_is_trimmed::<$dev>().await
            }
            #[tokio::test]
            async fn pg_state_is_kept_per_pg_across_reopen() {
                super::pg_state_is_kept_per_pg_across_reopen::<$dev>().await
            }
            #[tokio::test]
            async fn deferred_writes_survive_lost_device_writes() {
                super::deferred_writes_survive_lost_device_writes::<$dev>().await
            }
            #[tokio::test]
            async fn stray_pgs_are_listed_and_removed_in_steps() {
                super::stray_pgs_are_listed_and_removed_in_steps::<$dev>().await
            }
            #[tokio::test]
            async fn data_with_block_crcs_reads_back() {
                super::data_with_block_crcs_reads_back::<$dev>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn random_ops_match_a_model() {
                super::random_ops_match_a_model::<$dev>().await
            }
        }
    };
}

conformance!(uring, UringDevice);
conformance!(file, FileDevice);
conformance!(uring_no_journal, NoJournal);
