//! Placement changes and past intervals, on real processes:
//! - a new OSD: the PGs CRUSH moves to it stay served by their old OSDs (pg_temp) while it
//!   is filled, so their objects are misplaced, never degraded; afterwards the old OSDs
//!   drop their stray copies;
//! - a PG whose last active OSDs are all down is `down`: it never serves the older copy
//!   another OSD holds, until one of them returns, or the operator declares it lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use store_integration::{check_replicas, stray_copies, wait_for, ClusterOpts, TestCluster};

/// The same length every round, so a write replaces the whole object.
fn content(i: u64, round: u64) -> Bytes {
    let len = 700 + (i * 7919) % 5000;
    Bytes::from(
        (0..len)
            .map(|j| (j as u8).wrapping_add(i as u8) ^ (round as u8).wrapping_mul(31))
            .collect::<Vec<u8>>(),
    )
}

fn pg_states(s: &serde_json::Value) -> String {
    s["pgmap"]["pgs_by_state"].to_string()
}

#[test]
fn a_new_osd_is_filled_while_the_old_ones_serve_and_strays_are_removed() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        // One PG backfills at a time per primary, slowly enough to be seen.
        osd_conf: "osd_max_backfills = 1\nosd_recovery_sleep = 0.05",
        ..Default::default()
    });
    c.create_pool("vm-pool", 32);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    let mut model = BTreeMap::new();
    let put = |model: &mut BTreeMap<String, Bytes>, range: std::ops::Range<u64>, round| {
        rt.block_on(async {
            for i in range {
                let name = format!("obj-{i}");
                client.delete(pool, &name).await.expect("delete");
                client
                    .write(pool, &name, 0, content(i, round))
                    .await
                    .expect("write");
                model.insert(name, content(i, round));
            }
        })
    };
    put(&mut model, 0..200, 0);

    // nobackfill holds the filling, so the remapped state can be looked at.
    c.ctl_ok(&["osd", "set", "nobackfill"]);
    c.start_osd(3);
    c.wait_osds_up(4, Duration::from_secs(60));
    let s = wait_for(
        Duration::from_secs(30),
        "remapped PGs waiting to backfill",
        || {
            let s = c.try_status()?;
            (pg_states(&s).contains("active+remapped+backfill_wait")
                && s["pgmap"]["misplaced_objects"].as_u64()? > 0
                && !pg_states(&s).contains("unknown")
                && !pg_states(&s).contains("peering"))
            .then_some(s)
        },
    );
    // The old OSDs still serve every PG: nothing is degraded, and only the flag warns.
    assert_eq!(s["pgmap"]["degraded_objects"], 0, "{s}");
    assert!(!pg_states(&s).contains("degraded"), "{s}");
    let checks: Vec<&String> = s["health"]["checks"]
        .as_object()
        .expect("checks")
        .keys()
        .collect();
    assert_eq!(checks, vec!["OSDMAP_FLAGS"], "{s}");
    let map = c.map();
    let new_osd = c.osd_id(3);
    let temp: usize = map.pg_temp.values().map(|p| p.len()).sum();
    assert!(temp > 0 && temp as u64 == s["pgmap"]["pgs_remapped"].as_u64().unwrap_or(0));
    for entries in map.pg_temp.values() {
        for osds in entries.values() {
            assert_eq!(osds.len(), 4, "old set plus the new OSD: {osds:?}");
            assert_eq!(osds[3], new_osd);
        }
    }
    eprintln!(
        "FIGURE new OSD under nobackfill: {temp} pgs remapped, {} object copies misplaced, 0 degraded",
        s["pgmap"]["misplaced_objects"]
    );
    // Writes go on meanwhile (to the old OSDs and the new one).
    put(&mut model, 150..250, 1);

    let t0 = Instant::now();
    c.ctl_ok(&["osd", "unset", "nobackfill"]);
    let count = |s: &serde_json::Value, what: &str| -> u64 {
        s["pgmap"]["pgs_by_state"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state_name"].as_str().is_some_and(|n| n.contains(what)))
            .filter_map(|p| p["count"].as_u64())
            .sum()
    };
    let mut both_seen = false;
    wait_for(
        Duration::from_secs(90),
        "every PG active+clean, no pg_temp",
        || {
            let s = c.try_status()?;
            // osd_max_backfills = 1: one backfilling PG per primary at most, the rest wait.
            let (running, waiting) = (count(&s, "backfilling"), count(&s, "backfill_wait"));
            assert!(running <= 3, "{running} PGs backfill at once: {s}");
            both_seen |= running > 0 && waiting > 0;
            let clean = s["pgmap"]["pgs_by_state"]
                .as_array()?
                .iter()
                .all(|p| p["state_name"] == "active+clean");
            (clean && s["health"]["status"] == "HEALTH_OK" && c.map().pg_temp.is_empty())
                .then_some(())
        },
    );
    eprintln!(
        "FIGURE new OSD filled, all PGs active+clean {:?} after nobackfill was unset",
        t0.elapsed()
    );
    assert!(both_seen, "never saw PGs waiting for a backfill slot");
    let map = c.map();
    let share = store_placement::pool_mappings(&map, map.pool_by_name("vm-pool").expect("pool"))
        .iter()
        .filter(|m| m.acting.contains(&new_osd))
        .count();
    assert!(share > 0, "the new OSD serves no PG");
    check_replicas(&rt, &map, "vm-pool", &model);
    // The OSDs the PGs left drop their copies.
    let t1 = Instant::now();
    wait_for(Duration::from_secs(30), "stray copies removed", || {
        (stray_copies(&rt, &c.map(), "vm-pool", model.keys().cloned()) == 0).then_some(())
    });
    eprintln!(
        "FIGURE stray copies removed {:?} after the PGs were clean",
        t1.elapsed()
    );
    // The removal is logged (just after its last object is gone, so wait for it).
    wait_for(Duration::from_secs(10), "a stray removal logged", || {
        (0..3)
            .any(|i| {
                std::fs::read_to_string(c.log_path(&TestCluster::osd_name(i)))
                    .is_ok_and(|log| log.contains("removed the stray copy"))
            })
            .then_some(())
    });
    check_replicas(&rt, &c.map(), "vm-pool", &model);
    c.check_logs();
}

/// Reads `names` and returns what each read gave (None: it failed or did not answer
/// within `wait`).
fn read_all(
    rt: &tokio::runtime::Runtime,
    client: &store_client::ObjectClient,
    pool: u32,
    names: &[String],
    wait: Duration,
) -> Vec<Option<Bytes>> {
    rt.block_on(async {
        let mut out = Vec::new();
        for n in names {
            let r = tokio::time::timeout(wait, client.read(pool, n, 0, 1 << 20)).await;
            out.push(r.ok().and_then(|r| r.ok()));
        }
        out
    })
}

/// Compares reads with what they should be, naming the first that differs (not its bytes).
fn assert_reads(got: &[Option<Bytes>], want: &[Option<Bytes>]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g == w,
            "read {i}: got {:?} bytes, want {:?} bytes (or different contents)",
            g.as_ref().map(|b| b.len()),
            w.as_ref().map(|b| b.len())
        );
    }
}

#[test]
fn a_pg_whose_last_active_osds_are_down_waits_for_them_or_for_osd_lost() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 2,
        grace_secs: 2.0,
        ..Default::default()
    });
    c.ctl_ok(&[
        "pool",
        "create",
        "p",
        "--size",
        "2",
        "--min_size",
        "1",
        "--pg_num",
        "4",
    ]);
    c.wait_pgs_settled();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("p").expect("pool").id;
    let names: Vec<String> = (0..16).map(|i| format!("obj-{i}")).collect();
    let write = |round: u64| {
        rt.block_on(async {
            for (i, n) in names.iter().enumerate() {
                client
                    .write(pool, n, 0, content(i as u64, round))
                    .await
                    .expect("write");
            }
        })
    };
    let want = |round: u64| -> Vec<Option<Bytes>> {
        (0..names.len())
            .map(|i| Some(content(i as u64, round)))
            .collect()
    };
    let (a, b) = (TestCluster::osd_name(0), TestCluster::osd_name(1));
    let id_a = c.osd_id(0);
    let up = |c: &TestCluster, n: u64| {
        wait_for(Duration::from_secs(30), "OSDs up", || {
            (c.try_status()?["osdmap"]["num_up_osds"] == n).then_some(())
        })
    };
    let wait_down = |c: &TestCluster| {
        wait_for(Duration::from_secs(30), "PGs down", || {
            let s = c.try_status()?;
            let all_down = s["pgmap"]["pgs_by_state"]
                .as_array()?
                .iter()
                .all(|p| p["state_name"] == "down");
            all_down.then_some(s)
        })
    };
    write(0);

    // B goes; round 1 is acknowledged by A alone. Then A goes and B returns: B's copy
    // looks complete but is older. The PGs are down, and nothing is read from B.
    c.kill(&b);
    up(&c, 1);
    write(1);
    c.kill(&a);
    c.start_osd(1);
    wait_for(Duration::from_secs(30), "A down, B up", || {
        let m = c.map();
        (!m.osds[&id_a].up && m.num_up_osds() == 1).then_some(())
    });
    let s = wait_down(&c);
    let detail = s["health"]["checks"]["PG_AVAILABILITY"].to_string();
    assert!(detail.contains("4 down"), "{s}");
    let health = c.ctl_ok(&["health", "detail"]);
    assert!(
        health.contains(&format!("osd.{id_a}, down")) && health.contains("osd lost"),
        "{health}"
    );
    let reads = read_all(&rt, &client, pool, &names[..2], Duration::from_secs(3));
    assert!(reads.iter().all(|r| r.is_none()), "a down PG served a read");
    // A returns: the PGs go active from it, and B is brought up to date.
    let t0 = Instant::now();
    c.start_osd(0);
    wait_for(Duration::from_secs(60), "HEALTH_OK with A back", || {
        (c.try_status()?["health"]["status"] == "HEALTH_OK").then_some(())
    });
    eprintln!(
        "FIGURE down PGs active again, HEALTH_OK {:?} after their last OSD returned",
        t0.elapsed()
    );
    assert_reads(
        &read_all(&rt, &client, pool, &names, Duration::from_secs(30)),
        &want(1),
    );
    let model: BTreeMap<String, Bytes> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), content(i as u64, 1)))
        .collect();
    check_replicas(&rt, &c.map(), "p", &model);

    // Again, but A never comes back: the operator declares it lost, and the PGs go on
    // with B's copy (round 1; round 2 was only on A).
    c.kill(&b);
    up(&c, 1);
    write(2);
    c.kill(&a);
    c.start_osd(1);
    wait_for(Duration::from_secs(30), "A down, B up", || {
        let m = c.map();
        (!m.osds[&id_a].up && m.num_up_osds() == 1).then_some(())
    });
    wait_down(&c);
    let refused = c.ctl(&["osd", "lost", &id_a.to_string()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes-i-really-mean-it"));
    c.ctl_ok(&["osd", "lost", &id_a.to_string(), "--yes-i-really-mean-it"]);
    wait_for(Duration::from_secs(30), "PGs active without A", || {
        let s = c.try_status()?;
        let states = pg_states(&s);
        (states.contains("active") && !states.contains("down") && !states.contains("peering"))
            .then_some(())
    });
    assert_reads(
        &read_all(&rt, &client, pool, &names, Duration::from_secs(30)),
        &want(1),
    );
    // A, started again after all, is brought back to B's history: its round 2 was
    // given up, and every copy agrees.
    c.start_osd(0);
    wait_for(Duration::from_secs(60), "HEALTH_OK with A back", || {
        (c.try_status()?["health"]["status"] == "HEALTH_OK").then_some(())
    });
    check_replicas(&rt, &c.map(), "p", &model);
    c.check_logs();
}
