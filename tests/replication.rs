//! Replicated object I/O with size 3 / min_size 2 on real OSD processes: every acknowledged
//! byte survives the loss of an OSD; with fewer than min_size OSDs up, I/O waits and then
//! fails clearly and is never acknowledged; it resumes when an OSD returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use store_client::ObjectClient;
use store_integration::{wait_for, ClusterOpts, TestCluster};
use store_types::ErrorCode;

/// Object sizes: mostly small, some up to 128 KiB, some unaligned.
fn object(i: u64) -> (String, Bytes) {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    x ^= x >> 29;
    let len = if x.is_multiple_of(20) {
        8192 + x % (120 << 10)
    } else {
        1 + x % 8192
    };
    let data: Vec<u8> = (0..len)
        .map(|j| (j as u8).wrapping_mul(13) ^ (i as u8) ^ (i >> 8) as u8)
        .collect();
    (format!("obj-{i}"), Bytes::from(data))
}

/// Writes objects `range` with `qd` in flight; returns what was acknowledged.
async fn write_all(
    c: &Arc<ObjectClient>,
    pool: u32,
    range: std::ops::Range<u64>,
    qd: usize,
) -> BTreeMap<String, Bytes> {
    let mut acked = BTreeMap::new();
    let ids: Vec<u64> = range.collect();
    for chunk in ids.chunks(qd) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let (name, data) = object(i);
                c.write(pool, &name, 0, data.clone())
                    .await
                    .map(|_| (name, data))
            }));
        }
        for t in tasks {
            let (name, data) = t.await.expect("task").expect("write acknowledged");
            acked.insert(name, data);
        }
    }
    acked
}

async fn verify_all(c: &Arc<ObjectClient>, pool: u32, model: &BTreeMap<String, Bytes>) {
    let entries: Vec<(String, Bytes)> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for chunk in entries.chunks(64) {
        let mut tasks = Vec::new();
        for (name, data) in chunk.iter().cloned() {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let got = c
                    .read(pool, &name, 0, data.len() as u32 + 100)
                    .await
                    .expect("read");
                assert!(
                    got == data,
                    "{name}: read back {} bytes that differ from the {} acknowledged",
                    got.len(),
                    data.len()
                );
            }));
        }
        for t in tasks {
            t.await.expect("verify task");
        }
    }
}

#[test]
fn acknowledged_writes_survive_osd_loss_and_io_waits_below_min_size() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 3.0,
        op_timeout_secs: 5.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 32);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;

    let t0 = Instant::now();
    let mut model = rt.block_on(write_all(&client, pool, 0..6000, 32));
    rt.block_on(verify_all(&client, pool, &model));
    eprintln!(
        "FIGURE 6000 objects written and verified in {:?}",
        t0.elapsed()
    );

    // One OSD dies: I/O to its PGs waits until it is marked down, then goes on with two.
    c.kill(&TestCluster::osd_name(0));
    let t0 = Instant::now();
    model.extend(rt.block_on(write_all(&client, pool, 6000..10_000, 32)));
    eprintln!(
        "FIGURE 4000 more objects written with one OSD dead in {:?}",
        t0.elapsed()
    );
    rt.block_on(verify_all(&client, pool, &model));
    let s = c.status();
    assert_eq!(s["osdmap"]["num_up_osds"], 2, "{s}");

    // A second OSD of the same PGs dies: below min_size. I/O waits, then fails clearly.
    c.kill(&TestCluster::osd_name(1));
    let t0 = Instant::now();
    let err = rt
        .block_on(client.write(pool, "never-acked", 0, Bytes::from_static(b"x")))
        .expect_err("a write with one OSD up must not be acknowledged");
    let waited = t0.elapsed();
    eprintln!("FIGURE write below min_size failed after {waited:?}: {err}");
    assert!(
        matches!(err.code, ErrorCode::Unavailable | ErrorCode::Timeout),
        "unexpected error {err}"
    );
    assert!(
        waited >= Duration::from_secs(3),
        "it must wait for the OSDs first, not fail at once"
    );
    let s = c.status();
    assert!(s["health"]["checks"]["PG_AVAILABILITY"].is_object(), "{s}");

    // The OSD that died second has every acknowledged write: restart it and I/O resumes.
    c.start_osd(1);
    wait_for(Duration::from_secs(30), "two OSDs up", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 2).then_some(())
    });
    let t0 = Instant::now();
    model.extend(rt.block_on(write_all(&client, pool, 10_000..10_500, 32)));
    eprintln!(
        "FIGURE I/O resumed {:?} after the OSD returned",
        t0.elapsed()
    );
    rt.block_on(verify_all(&client, pool, &model));
    assert_eq!(model.len(), 10_500);
    c.allow_error("Unreachable node");
    c.check_logs();
}

/// Block contents that name their write: (writer, seq, block index) in the first 24 bytes,
/// then a pattern derived from them, so a torn or misplaced block is detected.
fn block_for(writer: u64, seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..8].copy_from_slice(&writer.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (i as u64 ^ seq.wrapping_mul(31) ^ block.wrapping_mul(7) ^ writer) as u8;
    }
    b
}

const BLOCKS_PER_OBJECT: u64 = 16;

#[test]
fn killing_and_restarting_osds_loses_no_acknowledged_write() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 20.0,
        op_timeout_secs: 20.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 16);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Per writer: for each block, (last acknowledged seq, every seq ever written there).
    type Log = Vec<(u64, Vec<u64>)>;
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let client = client.clone();
        let stop = stop.clone();
        writers.push(rt.spawn(async move {
            let mut log: Log = vec![(0, vec![0]); BLOCKS_PER_OBJECT as usize];
            let name = format!("w{w}");
            let mut seq = 0u64;
            let mut x = (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut acked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let first = x % BLOCKS_PER_OBJECT;
                let n = 1 + (x >> 8) % 3.min(BLOCKS_PER_OBJECT - first);
                let mut data = Vec::new();
                for b in first..first + n {
                    data.extend(block_for(w, seq, b));
                    log[b as usize].1.push(seq);
                }
                if client
                    .write(pool, &name, first * 4096, Bytes::from(data))
                    .await
                    .is_ok()
                {
                    for b in first..first + n {
                        log[b as usize].0 = seq;
                    }
                    acked += 1;
                }
            }
            (name, log, acked)
        }));
    }
    let mut r = 0x5eedu64;
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(300 + r % 700));
        r = r
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let victim = TestCluster::osd_name((r >> 33) as usize % 3);
        c.kill(&victim);
        std::thread::sleep(Duration::from_millis(100 + (r >> 40) % 400));
        c.start_osd(victim.trim_start_matches("osd-dev").parse().expect("index"));
        eprintln!("round {round}: killed and restarted {victim}");
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total_acked = 0;
    for wtask in writers {
        let (name, log, acked) = rt.block_on(wtask).expect("writer");
        total_acked += acked;
        let got = rt
            .block_on(client.read(pool, &name, 0, (BLOCKS_PER_OBJECT * 4096) as u32))
            .expect("read back");
        for (b, (last_acked, written)) in log.iter().enumerate() {
            let chunk = got
                .get(b * 4096..(b + 1) * 4096)
                .map(<[u8]>::to_vec)
                .unwrap_or_else(|| vec![0; 4096]);
            let seq = u64::from_le_bytes(chunk[8..16].try_into().expect("8 bytes"));
            assert!(
                seq >= *last_acked,
                "{name} block {b}: holds seq {seq}, older than acknowledged {last_acked}"
            );
            assert!(
                written.contains(&seq),
                "{name} block {b}: seq {seq} was never written there"
            );
            if seq > 0 {
                let w = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
                assert_eq!(
                    chunk,
                    block_for(w, seq, b as u64),
                    "{name} block {b}: torn or misplaced"
                );
            }
        }
    }
    eprintln!("FIGURE {total_acked} acknowledged writes verified after 8 OSD kill/restart rounds");
    assert!(
        total_acked > 100,
        "the writers made too little progress: {total_acked}"
    );
    c.allow_error("Unreachable node");
    c.check_logs();
}

/// An OSD that was marked down and missed writes, overwrites and deletes comes back: its
/// PGs peer and serve at once while they recover it, and no read returns its stale copy
/// (objects the primary misses are recovered before they are read). Once the cluster is
/// HEALTH_OK the other two OSDs are killed: the returned OSD alone serves everything,
/// proving it holds every acknowledged change.
#[test]
fn a_returning_osd_serves_correct_data_while_it_catches_up() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 3.0,
        op_timeout_secs: 20.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 16);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    let mut model = rt.block_on(write_all(&client, pool, 0..600, 32));

    c.kill(&TestCluster::osd_name(0));
    wait_for(Duration::from_secs(30), "osd marked down", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 2).then_some(())
    });
    // While it is away: new objects, overwrites with other sizes, deletes.
    model.extend(rt.block_on(write_all(&client, pool, 600..900, 32)));
    for i in 0..100u64 {
        let (name, _) = object(i);
        let data = Bytes::from(vec![i as u8; 3000 + i as usize]);
        rt.block_on(client.delete(pool, &name)).expect("delete");
        rt.block_on(client.write(pool, &name, 0, data.clone()))
            .expect("overwrite");
        model.insert(name, data);
    }
    let mut deleted = Vec::new();
    for i in 100..150u64 {
        let (name, _) = object(i);
        rt.block_on(client.delete(pool, &name)).expect("delete");
        model.remove(&name);
        deleted.push(name);
    }

    let t0 = Instant::now();
    c.start_osd(0);
    wait_for(Duration::from_secs(30), "osd back up", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 3).then_some(())
    });
    rt.block_on(verify_all(&client, pool, &model));
    eprintln!(
        "FIGURE returning OSD recovered and all reads correct {:?} after restart",
        t0.elapsed()
    );
    // The returning OSD's PGs planned recovery.
    c.wait_log(&TestCluster::osd_name(0), "recovery planned");
    wait_for(Duration::from_secs(60), "HEALTH_OK", || {
        (c.try_status()?["health"]["status"] == "HEALTH_OK").then_some(())
    });

    // Now only the returned OSD: it must hold every change by itself.
    c.ctl_ok(&["pool", "set", "vm-pool", "min_size", "1"]);
    c.kill(&TestCluster::osd_name(1));
    c.kill(&TestCluster::osd_name(2));
    wait_for(Duration::from_secs(30), "only one OSD up", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 1).then_some(())
    });
    rt.block_on(verify_all(&client, pool, &model));
    for name in &deleted {
        let st = rt.block_on(client.stat(pool, name)).expect("stat");
        assert!(
            st.is_none(),
            "{name} was deleted while the OSD was away but came back"
        );
    }
    c.allow_error("Unreachable node");
    c.check_logs();
}
