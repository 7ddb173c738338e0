//! Micro-benchmarks of the pieces every I/O goes through, so regressions show:
//! placement (PG → OSDs on a 100 hosts × 10 OSDs map), frame encode/decode of a replica
//! operation, crc32c, and the object store's write path (4 KiB overwrites on a real
//! device file with RocksDB, O_DIRECT, both device backends).
//!
//!     cargo bench --bench micro                 # everything
//!     cargo bench --bench micro -- placement    # one group
//!
//! Figures are per operation; see docs/performance.md for what they are compared with.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use divan::{black_box, Bencher};
use store_objstore::device::file::FileDevice;
use store_objstore::device::uring::UringDevice;
use store_objstore::device::{create_file_device, BlockDevice, FileFill};
use store_objstore::{BlockStore, ObjectId, ObjectStore, Version};
use store_placement::PoolMapper;
use store_types::map::{ClusterMap, FailureDomain, HostBucket, OsdInfo, Pool, WEIGHT_ONE};
use store_types::osdmsg::{Mutation, ObjVersion, OsdRequest, Pg};
use store_types::wire::{decode_payload, encode_payload, Frame, FrameCodec, FrameKind};
use tokio_util::codec::{Decoder, Encoder};

fn main() {
    divan::main();
}

/// 100 hosts × 10 OSDs, all up and in, equal weights; one pool of size 3.
fn big_map() -> (ClusterMap, Pool) {
    let mut map = ClusterMap::new("bench");
    for h in 0..100u32 {
        let name = format!("host{h}");
        let osds: Vec<u32> = (h * 10..h * 10 + 10).collect();
        for &id in &osds {
            map.osds.insert(
                id,
                OsdInfo {
                    id,
                    uuid: format!("u{id}"),
                    addr: String::new(),
                    host: name.clone(),
                    weight: WEIGHT_ONE,
                    up: true,
                    is_in: true,
                    up_from: 1,
                    down_stamp_ms: None,
                },
            );
        }
        let bucket = HostBucket {
            id: -2 - h as i32,
            name: name.clone(),
            osds,
        };
        map.crush.hosts.insert(name, bucket);
    }
    let pool = Pool {
        id: 1,
        name: "p".into(),
        size: 3,
        min_size: 2,
        pg_num: 100_000,
        failure_domain: FailureDomain::Host,
        created_epoch: 1,
    };
    map.pools.insert(1, pool.clone());
    (map, pool)
}

mod placement {
    use super::*;

    /// Every one of 100k PGs mapped once, mapper built once: divide by 100k for one
    /// mapping.
    #[divan::bench(sample_count = 10)]
    fn map_100k_pgs_on_100x10(b: Bencher) {
        let (map, pool) = big_map();
        b.bench(|| {
            let mapper = PoolMapper::new(&map, &pool);
            let mut n = 0u64;
            for seed in 0..pool.pg_num {
                n += u64::from(mapper.map_seed(seed).acting[0]);
            }
            black_box(n)
        });
    }

    /// Building the per-pool mapper (what a client does once per map epoch).
    #[divan::bench]
    fn mapper_for_100x10(b: Bencher) {
        let (map, pool) = big_map();
        b.bench(|| black_box(PoolMapper::new(&map, &pool)));
    }
}

mod frames {
    use super::*;

    fn replica_op() -> OsdRequest {
        OsdRequest::Replica {
            map_epoch: 42,
            from: 1,
            pg: Pg { pool: 1, seed: 77 },
            object: "rbd_data.0123456789abcdef.0000000000000042".into(),
            version: ObjVersion {
                epoch: 42,
                seq: 123_456,
            },
            mutation: Mutation::Write {
                offset: 4096 * 17,
                data: Bytes::from(vec![0xa5u8; 4096]).into(),
            },
        }
    }

    /// A 4 KiB replica write: payload encoding plus framing (header and crc32c).
    #[divan::bench]
    fn encode_4k_replica_write(b: Bencher) {
        let req = replica_op();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::with_capacity(8192);
        b.bench_local(|| {
            buf.clear();
            let payload = encode_payload(&req).expect("encode");
            let frame = Frame {
                kind: FrameKind::Request,
                tag: 9,
                payload,
            };
            codec.encode(frame, &mut buf).expect("frame");
            black_box(buf.len())
        });
    }

    /// The same frame, parsed and decoded.
    #[divan::bench]
    fn decode_4k_replica_write(b: Bencher) {
        let req = replica_op();
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        let frame = Frame {
            kind: FrameKind::Request,
            tag: 9,
            payload: encode_payload(&req).expect("encode"),
        };
        codec.encode(frame, &mut wire).expect("frame");
        let wire = wire.freeze();
        b.bench_local(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let frame = codec.decode(&mut buf).expect("decode").expect("whole");
            black_box(decode_payload::<OsdRequest>(&frame.payload.into_bytes()).expect("payload"))
        });
    }
}

mod checksums {
    use super::*;

    #[divan::bench(args = [4096, 4 << 20])]
    fn crc32c(b: Bencher, len: usize) {
        let data = vec![0x5au8; len];
        b.counter(divan::counter::BytesCount::new(len))
            .bench(|| black_box(crc32c::crc32c(black_box(&data))));
    }
}

mod objstore {
    use super::*;

    struct Env {
        _tmp: tempfile::TempDir,
        rt: tokio::runtime::Runtime,
        store: Arc<dyn Fn(u64) -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
    }

    /// A store on a 1 GiB device file, holding 256 objects of 4 MiB to overwrite.
    fn env<D: BlockDevice + 'static>(open: fn(&std::path::Path) -> D) -> Env {
        let (tmp, dev) = dev_env(1 << 30);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let store = rt.block_on(async {
            BlockStore::create(open(&dev), &tmp.path().join("db"), "bench", "osd")
                .await
                .expect("create")
        });
        let store = Arc::new(store);
        let seq = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let write = {
            let store = store.clone();
            move |i: u64| -> futures::future::BoxFuture<'static, ()> {
                let store = store.clone();
                let seq = seq.clone();
                Box::pin(async move {
                    let id = ObjectId {
                        pool: 1,
                        pg: (i % 64) as u32,
                        name: format!("obj.{}", i % 256),
                    };
                    let v = Version {
                        epoch: 1,
                        seq: seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    };
                    let offset = (i.wrapping_mul(0x9e37_79b9) % 1024) * 4096;
                    store
                        .write(&id, offset, Bytes::from(vec![i as u8; 4096]), v)
                        .await
                        .expect("write");
                })
            }
        };
        Env {
            _tmp: tmp,
            rt,
            store: Arc::new(write),
        }
    }

    fn bench_writes(b: Bencher, e: Env) {
        let mut i = 0u64;
        b.bench_local(|| {
            i += 1;
            e.rt.block_on((e.store)(i));
        });
    }

    /// One 4 KiB overwrite, durable on return (data on the device, block map synced).
    #[divan::bench(sample_count = 20, sample_size = 50)]
    fn write_4k_uring(b: Bencher) {
        bench_writes(b, env(|p| UringDevice::open(p).expect("uring device")));
    }

    #[divan::bench(sample_count = 20, sample_size = 50)]
    fn write_4k_file(b: Bencher) {
        bench_writes(b, env(|p| FileDevice::open(p).expect("file device")));
    }

    /// A temp dir under the target dir (O_DIRECT needs a real filesystem, not tmpfs)
    /// holding a device file of `size_bytes`.
    fn dev_env(size_bytes: u64) -> (tempfile::TempDir, PathBuf) {
        let base = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"));
        std::fs::create_dir_all(&base).expect("bench dir");
        let tmp = tempfile::Builder::new()
            .prefix("micro-")
            .tempdir_in(base)
            .expect("tmp");
        let dev = tmp.path().join("dev.img");
        create_file_device(&dev, size_bytes, FileFill::Reserve).expect("device");
        (tmp, dev)
    }

    /// 4 KiB device writes on io_uring, durable on completion or not.
    fn device_writes(b: Bencher, durable: bool) {
        let (_tmp, path) = dev_env(256 << 20);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let _in_runtime = rt.enter();
        let dev = UringDevice::open(&path).expect("device");
        let mut i = 0u64;
        b.bench_local(|| {
            i += 1;
            let buf = store_objstore::aligned::AlignedBuf::zeroed(1);
            let at = 1 + i % 60_000;
            let res = if durable {
                rt.block_on(dev.write(at, buf))
            } else {
                rt.block_on(dev.write_lazy(at, buf))
            };
            res.expect("write");
        });
    }

    /// The device part alone: one 4 KiB durable write (O_DIRECT, RWF_DSYNC).
    #[divan::bench(sample_count = 20, sample_size = 50)]
    fn device_write_4k_uring(b: Bencher) {
        device_writes(b, true);
    }

    /// Synced RocksDB puts of `value_len` bytes (`recycled`: WAL files reused, small
    /// memtables so that they are within the run).
    fn synced_puts(b: Bencher, value_len: usize, recycled: bool) {
        let (tmp, _) = dev_env(256 << 20);
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        if recycled {
            opts.set_recycle_log_file_num(4);
            opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
            opts.set_write_buffer_size(1 << 20);
        }
        let db = rocksdb::DB::open(&opts, tmp.path().join("db")).expect("db");
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        let value = vec![7u8; value_len];
        let mut i = 0u64;
        b.bench_local(|| {
            i += 1;
            db.put_opt(i.to_be_bytes(), &value, &wo).expect("put");
        });
    }

    /// The metadata part alone: one small synced RocksDB write (the block map commit).
    #[divan::bench(sample_count = 20, sample_size = 50)]
    fn rocksdb_synced_put(b: Bencher) {
        synced_puts(b, 40, false);
    }

    /// A synced RocksDB write carrying 4 KiB (a deferred write's record).
    #[divan::bench(sample_count = 20, sample_size = 50)]
    fn rocksdb_synced_put_4k(b: Bencher) {
        synced_puts(b, 4096, false);
    }

    /// The same with the WAL files recycled (overwritten in place: no file growth for
    /// fdatasync to journal).
    #[divan::bench(sample_count = 20, sample_size = 50)]
    fn rocksdb_synced_put_4k_recycled_wal(b: Bencher) {
        synced_puts(b, 4096, true);
    }

    /// The device part of a deferred write: 4 KiB written without a flush.
    #[divan::bench(sample_count = 20, sample_size = 50)]
    fn device_write_lazy_4k_uring(b: Bencher) {
        device_writes(b, false);
    }
}
