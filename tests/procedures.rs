//! The operator's procedures, scripted end to end on real processes: ok-to-stop, a rolling
//! restart under noout, adding a node under norebalance (nothing moves until the flag is
//! unset, then it receives its share), a dry run, and removing a
//! node for good (out, wait, safe-to-destroy, stop, purge). Afterwards every object reads
//! back from every OSD that should hold it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use store_integration::{check_replicas, wait_for, ClusterOpts, TestCluster};

fn content(i: u64, round: u64) -> Bytes {
    let len = 500 + (i * 7919 + round * 104_729) % 9000;
    Bytes::from(
        (0..len)
            .map(|j| (j as u8).wrapping_add(i as u8) ^ (round as u8).wrapping_mul(17))
            .collect::<Vec<u8>>(),
    )
}

fn wait_health_ok(c: &TestCluster, osds_up: u64, what: &str) -> Duration {
    let t0 = Instant::now();
    wait_for(Duration::from_secs(90), what, || {
        let s = c.try_status()?;
        (s["osdmap"]["num_up_osds"] == osds_up && s["health"]["status"] == "HEALTH_OK")
            .then_some(())
    });
    t0.elapsed()
}

#[test]
fn rolling_restart_add_a_node_and_remove_a_node() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 3.0,
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
                // Replace the whole object (a shorter write would keep the old tail).
                client.delete(pool, &name).await.expect("delete");
                client
                    .write(pool, &name, 0, content(i, round))
                    .await
                    .expect("write");
                model.insert(name, content(i, round));
            }
        })
    };
    put(&mut model, 0..150, 0);
    let osd = |i: usize, c: &TestCluster| c.osd_id(i).to_string();

    // ok-to-stop: one of three, yes; two of three, no (min_size 2).
    let o0 = osd(0, &c);
    let o1 = osd(1, &c);
    let out = c.ctl_ok(&["osd", "ok-to-stop", &o0]);
    assert!(out.contains("is ok-to-stop"), "{out}");
    let refused = c.ctl(&["osd", "ok-to-stop", &o0, &o1]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("of min_size 2"));

    // Rolling restart of one node under noout.
    c.ctl_ok(&["osd", "set", "noout"]);
    c.kill(&TestCluster::osd_name(1));
    wait_for(Duration::from_secs(30), "osd marked down", || {
        (c.try_status()?["osdmap"]["num_up_osds"] == 2).then_some(())
    });
    put(&mut model, 100..200, 1);
    c.start_osd(1);
    c.ctl_ok(&["osd", "unset", "noout"]);
    let t = wait_health_ok(&c, 3, "HEALTH_OK after the rolling restart");
    eprintln!("FIGURE rolling restart: HEALTH_OK {t:?} after the OSD was started again");
    check_replicas(&rt, &c.map(), "vm-pool", &model);

    // A new node joins under norebalance (as when adding several at once): it gets
    // nothing, and status counts what would move. Unsetting the flag moves its share.
    c.ctl_ok(&["osd", "set", "norebalance"]);
    c.start_osd(3);
    c.wait_osds_up(4, Duration::from_secs(60));
    let share_of = |c: &TestCluster, o: u32| {
        let map = c.map();
        store_placement::pool_mappings(&map, map.pool_by_name("vm-pool").expect("pool"))
            .iter()
            .filter(|m| m.up.contains(&o))
            .count()
    };
    let o3: u32 = osd(3, &c).parse().expect("id");
    let s = wait_for(
        Duration::from_secs(30),
        "misplaced objects in status",
        || {
            let s = c.try_status()?;
            (s["pgmap"]["misplaced_objects"].as_u64()? > 0
                && s["pgmap"]["pgs_remapped"].as_u64()? > 0)
                .then_some(s)
        },
    );
    assert_eq!(
        share_of(&c, o3),
        0,
        "norebalance let PGs move to the new OSD"
    );
    assert!(s["health"]["checks"]["OBJECT_MISPLACED"].is_object(), "{s}");
    let remapped = s["pgmap"]["pgs_remapped"].as_u64().unwrap_or(0);
    assert!(remapped > 0, "{s}");
    let states = s["pgmap"]["pgs_by_state"].to_string();
    assert!(states.contains("active+remapped+backfill_wait"), "{states}");
    eprintln!(
        "FIGURE norebalance held {remapped} pgs (~{} objects) off the new OSD",
        s["pgmap"]["misplaced_objects"]
    );
    c.ctl_ok(&["osd", "unset", "norebalance"]);
    let t0 = Instant::now();
    wait_health_ok(&c, 4, "HEALTH_OK with the new node");
    // Misplaced copies are not a health warning (the old OSDs still hold them): wait for
    // every PG to be active+clean where CRUSH puts it.
    c.wait_clean(Duration::from_secs(90));
    eprintln!(
        "FIGURE new OSD filled, all PGs active+clean {:?} after norebalance was unset",
        t0.elapsed()
    );
    let map = c.map();
    assert!(share_of(&c, o3) > 0, "the new OSD holds no PG");
    check_replicas(&rt, &map, "vm-pool", &model);

    // A dry run says what would move and moves nothing.
    let epoch = map.epoch;
    let dry = c.ctl_json(&["osd", "out", &o0, "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert!(dry["pgs_remapped"].as_u64().unwrap_or(0) > 0, "{dry}");
    assert_eq!(c.map().epoch, epoch, "a dry run changed the map");

    // Removing a node: refused while in, then out, wait, safe, stop, purge.
    let refused = c.ctl(&["osd", "purge", &o0, "--yes-i-really-mean-it"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is in"));
    c.ctl_ok(&["osd", "out", &o0]);
    // The out OSD keeps serving (pg_temp) while its PGs fill their new OSDs: the data is
    // misplaced, never degraded. The procedure waits for safe-to-destroy, as with Ceph.
    let t0 = Instant::now();
    wait_for(Duration::from_secs(90), "osd safe-to-destroy", || {
        let s = c.try_status()?;
        assert_eq!(s["pgmap"]["degraded_objects"], 0, "{s}");
        c.ctl(&["osd", "safe-to-destroy", &o0])
            .status
            .success()
            .then_some(())
    });
    eprintln!(
        "FIGURE data moved off an out OSD, safe-to-destroy after {:?}",
        t0.elapsed()
    );
    c.kill(&TestCluster::osd_name(0));
    // Marked down: until the primaries report on the new map, PGs are unknown and purge
    // would be refused; it is accepted once the cluster is HEALTH_OK again.
    wait_health_ok(&c, 3, "HEALTH_OK with the stopped OSD down and out");
    c.ctl_ok(&["osd", "purge", &o0, "--yes-i-really-mean-it"]);
    let map = c.map();
    assert!(!map.osds.contains_key(&o0.parse::<u32>().expect("id")));
    wait_health_ok(&c, 3, "HEALTH_OK after the purge");
    check_replicas(&rt, &c.map(), "vm-pool", &model);
    c.check_logs();
}
