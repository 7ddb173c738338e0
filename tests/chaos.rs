//! A bounded chaos run: writers keep overwriting objects (and checking what they read)
//! while a driver SIGKILLs and restarts random OSDs, one at a time (size − min_size = 1),
//! and adds an OSD half-way. No write may fail; afterwards the cluster must be HEALTH_OK
//! within a bound, and every object must hold its last acknowledged content on every OSD
//! of its PG, read directly from each.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use store_integration::{check_replicas, wait_for, xorshift, ClusterOpts, TestCluster};

const OBJECTS: u64 = 120;
const WRITERS: u64 = 4;
const RUN: Duration = Duration::from_secs(30);

/// Fixed length per object (an overwrite replaces it whole); content varies by round.
fn content(i: u64, round: u64) -> Bytes {
    let len = 700 + (i * 7919) % 12_000;
    Bytes::from(
        (0..len)
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(29) ^ (round as u8).wrapping_mul(101))
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn osds_killed_and_added_under_writes_lose_nothing() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 4,
        grace_secs: 2.0,
        op_timeout_secs: 30.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 32);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    let model: Arc<Mutex<BTreeMap<String, Bytes>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));

    // Writers: each owns the objects i ≡ w (mod WRITERS), so per-object order is known.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, model, stop, writes) =
            (client.clone(), model.clone(), stop.clone(), writes.clone());
        tasks.push(rt.spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for i in (w..OBJECTS).step_by(WRITERS as usize) {
                    let name = format!("obj-{i}");
                    let data = content(i, round);
                    client
                        .write(pool, &name, 0, data.clone())
                        .await
                        .unwrap_or_else(|e| panic!("write {name} round {round}: {e}"));
                    model
                        .lock()
                        .expect("model")
                        .insert(name.clone(), data.clone());
                    writes.fetch_add(1, Ordering::Relaxed);
                    // Read-your-write through whatever primary serves it now.
                    let got = client
                        .read(pool, &name, 0, data.len() as u32)
                        .await
                        .unwrap_or_else(|e| panic!("read {name}: {e}"));
                    assert!(
                        got == data,
                        "{name} round {round}: read differs from the write"
                    );
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
        }));
    }

    let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ std::process::id() as u64;
    eprintln!("chaos seed {seed:#x}");
    let t0 = Instant::now();
    let mut kills = 0;
    let mut added = false;
    while t0.elapsed() < RUN {
        if !added && t0.elapsed() > RUN / 2 {
            c.start_osd(4);
            added = true;
            eprintln!("added osd-dev4 at {:?}", t0.elapsed());
        }
        let n = if added { 5 } else { 4 };
        let victim = (xorshift(&mut seed) % n) as usize;
        c.kill(&TestCluster::osd_name(victim));
        kills += 1;
        std::thread::sleep(Duration::from_millis(1000 + xorshift(&mut seed) % 3000));
        c.start_osd(victim);
        // One OSD away at a time: wait until it is back and its PGs have settled.
        wait_for(
            Duration::from_secs(60),
            "the OSD back and PGs settled",
            || {
                let s = c.try_status()?;
                (s["osdmap"]["num_up_osds"].as_u64()? == n).then_some(())
            },
        );
        c.wait_pgs_settled();
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        rt.block_on(t).expect("writer");
    }
    let t1 = Instant::now();
    wait_for(Duration::from_secs(60), "HEALTH_OK after the chaos", || {
        let s = c.try_status()?;
        (s["health"]["status"] == "HEALTH_OK").then_some(())
    });
    eprintln!(
        "FIGURE chaos: {kills} OSD kills, {} acknowledged writes, HEALTH_OK {:?} after the last restart",
        writes.load(Ordering::Relaxed),
        t1.elapsed()
    );
    // The added OSD may still be filling (misplaced copies do not warn): wait for every
    // PG to be active+clean where CRUSH puts it, then compare.
    c.wait_clean(Duration::from_secs(60));
    eprintln!(
        "FIGURE chaos: all PGs active+clean {:?} after the last restart",
        t1.elapsed()
    );
    let model = model.lock().expect("model").clone();
    assert_eq!(model.len() as u64, OBJECTS);
    check_replicas(&rt, &c.map(), "vm-pool", &model);
    c.check_logs();
}
