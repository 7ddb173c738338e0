//! Recovery without client I/O: an OSD that was down while objects changed comes back,
//! its PGs' primaries peer and recover it on their own (no client touches the PGs), the
//! cluster reports the PGs busy while it lasts and returns to HEALTH_OK, and then every
//! replica, read directly from each OSD, holds exactly what was acknowledged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use store_client::RpcConn;
use store_integration::{wait_for, ClusterOpts, TestCluster};
use store_placement::object_to_pg;
use store_types::osdmsg::{OsdRequest, OsdResponse, Pg, OSD_MAX_FRAME_BYTES};
use store_types::ErrorCode;

fn content(i: u64, round: u64) -> Bytes {
    let len = 1000 + (i * 7919 + round * 104_729) % 20_000;
    Bytes::from(
        (0..len)
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(31) ^ round as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Writes rounds of overwrites, recording what was acknowledged.
type WriteRounds<'a> = dyn FnMut(&mut BTreeMap<String, Bytes>, std::ops::Range<u64>) + 'a;

/// Content whose length depends only on the object, so an overwrite replaces it whole.
fn fixed_len_content(i: u64, round: u64) -> Bytes {
    Bytes::from(
        (0..(800 + i * 97))
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(7) ^ (round as u8).wrapping_mul(13))
            .collect::<Vec<u8>>(),
    )
}

/// Every OSD's own copy of `object` (None where it has none), read with `Fetch`.
async fn replicas(
    conns: &BTreeMap<u32, RpcConn>,
    pg: Pg,
    object: &str,
) -> BTreeMap<u32, Option<Bytes>> {
    let mut out = BTreeMap::new();
    for (id, conn) in conns {
        let req = OsdRequest::Fetch {
            pg,
            object: object.to_string(),
            offset: 0,
            len: 1 << 20,
        };
        let copy = match conn
            .call::<_, OsdResponse>(&req, Duration::from_secs(10))
            .await
        {
            Ok(OsdResponse::Fetched { data, .. }) => Some(data),
            Ok(OsdResponse::Error(e)) if e.code == ErrorCode::NotFound => None,
            other => panic!("osd.{id} fetch {object}: {other:?}"),
        };
        out.insert(*id, copy);
    }
    out
}

#[test]
fn a_returning_osd_is_recovered_without_client_io_and_replicas_match() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 3.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 32);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool");
    let mut model: BTreeMap<String, Option<Bytes>> = BTreeMap::new();
    rt.block_on(async {
        for i in 0..300u64 {
            let name = format!("obj-{i}");
            client
                .write(pool.id, &name, 0, content(i, 0))
                .await
                .expect("write");
            model.insert(name, Some(content(i, 0)));
        }
    });

    // `status --watch` prints the events of what follows.
    let watch_out = c.dir.path().join("watch.out");
    let mut watcher = std::process::Command::new(store_integration::bin_dir().join("storectl"))
        .arg("--conf")
        .arg(c.conf())
        .args(["status", "--watch"])
        .stdout(std::fs::File::create(&watch_out).expect("watch output"))
        .spawn()
        .expect("storectl status --watch");

    c.kill(&TestCluster::osd_name(2));
    wait_for(Duration::from_secs(30), "osd marked down", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 2).then_some(())
    });
    rt.block_on(async {
        for i in 0..300u64 {
            let name = format!("obj-{i}");
            match i % 3 {
                0 => {
                    client.delete(pool.id, &name).await.expect("delete");
                    model.insert(name, None);
                }
                1 => {
                    client.delete(pool.id, &name).await.expect("delete");
                    client
                        .write(pool.id, &name, 0, content(i, 1))
                        .await
                        .expect("rewrite");
                    model.insert(name, Some(content(i, 1)));
                }
                _ => {}
            }
        }
        for i in 300..400u64 {
            let name = format!("obj-{i}");
            client
                .write(pool.id, &name, 0, content(i, 1))
                .await
                .expect("write");
            model.insert(name, Some(content(i, 1)));
        }
    });

    wait_for(
        Duration::from_secs(10),
        "the watch to print OSD_DOWN",
        || {
            let out = std::fs::read_to_string(&watch_out).ok()?;
            out.contains("raised OSD_DOWN").then_some(())
        },
    );

    // Back, with no client I/O from here on.
    let t0 = Instant::now();
    c.start_osd(2);
    let mut busy_seen = false;
    wait_for(
        Duration::from_secs(60),
        "HEALTH_OK after the OSD returned",
        || {
            let s = c.try_status()?;
            let checks = &s["health"]["checks"];
            busy_seen |= checks["PG_AVAILABILITY"].is_object()
                || checks["PG_DEGRADED"]["summary"]
                    .as_str()
                    .is_some_and(|m| !m.contains("(0 recovering, 0 waiting)"));
            (s["osdmap"]["num_up_osds"] == 3 && s["health"]["status"] == "HEALTH_OK").then_some(())
        },
    );
    eprintln!(
        "FIGURE back to HEALTH_OK {:?} after the OSD restarted (PGs reported busy on the way: {busy_seen})",
        t0.elapsed()
    );
    // The recovery shows in status: the rate over the last seconds, nothing left to do.
    let s = wait_for(Duration::from_secs(10), "a recovery rate in status", || {
        let s = c.try_status()?;
        (s["pgmap"]["recovering_objects_per_sec"].as_u64()? > 0).then_some(s)
    });
    assert_eq!(s["pgmap"]["degraded_objects"], 0, "{s}");
    assert!(
        s["pgmap"]["degraded_total"].as_u64().unwrap_or(0) >= 3 * 200,
        "{s}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _ = watcher.kill();
    let _ = watcher.wait();
    let events = std::fs::read_to_string(&watch_out).expect("watch output");
    for want in [
        "raised OSD_DOWN",
        "cleared OSD_DOWN",
        "health HEALTH_WARN -> HEALTH_OK",
    ] {
        assert!(
            events.contains(want),
            "no '{want}' in the watch output:\n{events}"
        );
    }

    let map = c.ctl_json(&["map"]);
    let addrs: Vec<(u32, String)> = map["osds"]
        .as_object()
        .expect("osds")
        .values()
        .map(|o| {
            (
                o["id"].as_u64().expect("id") as u32,
                o["addr"].as_str().expect("addr").to_string(),
            )
        })
        .collect();
    rt.block_on(async {
        let mut conns = BTreeMap::new();
        for (id, addr) in &addrs {
            let (conn, _) = RpcConn::connect(addr, Duration::from_secs(5), OSD_MAX_FRAME_BYTES)
                .await
                .expect("connect to osd");
            conns.insert(*id, conn);
        }
        for (name, want) in &model {
            let pgid = object_to_pg(&pool, name);
            let pg = Pg {
                pool: pgid.pool,
                seed: pgid.seed,
            };
            for (osd, got) in replicas(&conns, pg, name).await {
                assert!(
                    &got == want,
                    "{name} on osd.{osd}: {:?} bytes, expected {:?}",
                    got.as_ref().map(|b| b.len()),
                    want.as_ref().map(|b| b.len())
                );
            }
        }
    });
    c.check_logs();
}

/// The count of PGs in `state` in a status report.
fn pgs_in(s: &serde_json::Value, state: &str) -> u64 {
    s["pgmap"]["pgs_by_state"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["state_name"] == state)
        .filter_map(|e| e["count"].as_u64())
        .sum()
}

#[test]
fn client_io_goes_on_while_recovery_is_held_and_touched_objects_are_recovered_first() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 2.0,
        ..Default::default()
    });
    // One PG, so the one PG is the one recovering.
    c.create_pool("onepg", 1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("onepg").expect("pool");
    let map = c.map();
    let primary = store_placement::map_pg(&map, &pool, object_to_pg(&pool, "x"))
        .primary
        .expect("primary");
    let victim = (0..3).find(|i| c.osd_id(*i) != primary).expect("a replica");
    let mut model: BTreeMap<String, Bytes> = BTreeMap::new();
    let write = |model: &mut BTreeMap<String, Bytes>, objects: std::ops::Range<u64>, round| {
        rt.block_on(async {
            for i in objects {
                let name = format!("obj-{i}");
                let data = fixed_len_content(i, round);
                client
                    .write(pool.id, &name, 0, data.clone())
                    .await
                    .expect("write");
                model.insert(name, data);
            }
        })
    };
    write(&mut model, 0..60, 0);
    c.kill(&TestCluster::osd_name(victim));
    wait_for(Duration::from_secs(30), "osd marked down", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 2).then_some(())
    });
    write(&mut model, 0..60, 1);
    for flag in ["norecover", "nobackfill"] {
        let out = c.ctl(&["osd", "set", flag]);
        assert!(out.status.success(), "osd set {flag}: {out:?}");
    }
    c.start_osd(victim);
    let s = wait_for(Duration::from_secs(30), "the PG waiting to recover", || {
        let s = c.try_status()?;
        (s["osdmap"]["num_up_osds"] == 3
            && pgs_in(&s, "active+recovery_wait+degraded") == 1
            && s["pgmap"]["degraded_objects"] == 60)
            .then_some(s)
    });
    assert_eq!(s["health"]["status"], "HEALTH_WARN", "{s}");

    // Client I/O goes on while the PG waits: writes of 10 missing objects (each is
    // recovered first, then written), reads of 10 others (served by the primary, which
    // has them).
    let t0 = Instant::now();
    write(&mut model, 0..10, 2);
    let write_time = t0.elapsed();
    rt.block_on(async {
        for i in 10..20u64 {
            let name = format!("obj-{i}");
            let got = client
                .read(pool.id, &name, 0, 1 << 20)
                .await
                .expect("read while recovering");
            assert_eq!(got, model[&name], "{name}");
        }
    });
    eprintln!("FIGURE 10 writes of missing objects while recovery is held: {write_time:?}");
    // Exactly the touched objects were recovered; the rest still waits.
    let s = wait_for(Duration::from_secs(10), "10 objects recovered", || {
        let s = c.try_status()?;
        (s["pgmap"]["degraded_objects"] == 50).then_some(s)
    });
    assert_eq!(pgs_in(&s, "active+recovery_wait+degraded"), 1, "{s}");
    let touched: BTreeMap<String, Bytes> = model
        .iter()
        .filter(|(n, _)| (0..10).any(|i| **n == format!("obj-{i}")))
        .map(|(n, d)| (n.clone(), d.clone()))
        .collect();
    store_integration::check_replicas(&rt, &c.map(), "onepg", &touched);

    for flag in ["norecover", "nobackfill"] {
        let out = c.ctl(&["osd", "unset", flag]);
        assert!(out.status.success(), "osd unset {flag}: {out:?}");
    }
    let t0 = Instant::now();
    wait_for(Duration::from_secs(60), "HEALTH_OK", || {
        (c.try_status()?["health"]["status"] == "HEALTH_OK").then_some(())
    });
    eprintln!(
        "FIGURE HEALTH_OK {:?} after the flags were unset",
        t0.elapsed()
    );
    store_integration::check_replicas(&rt, &c.map(), "onepg", &model);
    c.check_logs();
}

#[test]
fn short_outages_recover_from_the_log_and_long_ones_are_backfilled() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 2.0,
        // Throttled recovery still completes.
        osd_conf: "osd_recovery_max_active = 1\nosd_recovery_sleep = 0.002",
        ..Default::default()
    });
    // One PG, so its log fills quickly.
    c.create_pool("logpool", 1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("logpool").expect("pool");
    let map = c.map();
    let primary = store_placement::map_pg(&map, &pool, object_to_pg(&pool, "x"))
        .primary
        .expect("primary");
    let daemon = |id: u32| (0..3).find(|i| c.osd_id(*i) == id).expect("daemon");
    let primary_daemon = daemon(primary);
    let victim = (0..3).find(|i| *i != primary_daemon).expect("a replica");
    let mut model: BTreeMap<String, Bytes> = BTreeMap::new();
    let mut write_rounds = |model: &mut BTreeMap<String, Bytes>, rounds: std::ops::Range<u64>| {
        rt.block_on(async {
            for round in rounds {
                let writes: Vec<_> = (0..10u64)
                    .map(|i| {
                        let (client, name, pool_id) = (client.clone(), format!("obj-{i}"), pool.id);
                        tokio::spawn(async move {
                            client
                                .write(pool_id, &name, 0, fixed_len_content(i, round))
                                .await
                                .expect("write");
                            (name, fixed_len_content(i, round))
                        })
                    })
                    .collect();
                for w in writes {
                    let (name, data) = w.await.expect("writer");
                    model.insert(name, data);
                }
            }
        })
    };
    write_rounds(&mut model, 0..2);

    let outage = |c: &mut TestCluster,
                  model: &mut BTreeMap<String, Bytes>,
                  rounds,
                  write: &mut WriteRounds| {
        c.kill(&TestCluster::osd_name(victim));
        wait_for(Duration::from_secs(30), "osd marked down", || {
            (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 2).then_some(())
        });
        write(model, rounds);
        c.start_osd(victim);
        wait_for(Duration::from_secs(60), "HEALTH_OK", || {
            let s = c.try_status()?;
            (s["osdmap"]["num_up_osds"] == 3 && s["health"]["status"] == "HEALTH_OK").then_some(())
        });
    };
    let primary_log_path = c.log_path(&TestCluster::osd_name(primary_daemon));
    let primary_log = || std::fs::read_to_string(&primary_log_path).expect("log");
    // A short outage: 5 rounds (50 log entries) are replayed from the log.
    outage(&mut c, &mut model, 2..7, &mut write_rounds);
    let log = primary_log();
    assert!(log.contains("mode=Log"), "no log-based recovery:\n{log}");
    assert!(
        !log.contains("mode=Backfill"),
        "backfilled a short outage:\n{log}"
    );
    // A long one: 340 rounds, more than the 3000 entries (plus trim slack) a PG log keeps:
    // backfilled.
    outage(&mut c, &mut model, 7..347, &mut write_rounds);
    let log = primary_log();
    assert!(
        log.contains("mode=Backfill"),
        "no backfill after a long outage:\n{log}"
    );
    store_integration::check_replicas(&rt, &c.map(), "logpool", &model);
    c.check_logs();
}

#[test]
fn a_divergent_replica_converges_with_the_others() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 2.0,
        op_timeout_secs: 60.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 8);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool");
    let name = "diverge-0";
    let (v1, v2) = (fixed_len_content(1, 1), fixed_len_content(1, 2));
    rt.block_on(client.write(pool.id, name, 0, v1.clone()))
        .expect("write v1");

    // The PG's OSDs: primary P, replicas R1 and R2. R2 will drop the next write's
    // replica operation, so only P and R1 apply it and it is never acknowledged.
    let map = c.map();
    let pgid = object_to_pg(&pool, name);
    let up = store_placement::map_pg(&map, &pool, pgid).up;
    let daemon = |id: u32| (0..3).find(|i| c.osd_id(*i) == id).expect("daemon");
    let (p, r2) = (daemon(up[0]), daemon(up[2]));
    c.ctl_ok(&["osd", "set", "noout"]);
    c.kill(&TestCluster::osd_name(r2));
    let failpoint = format!("drop_replica_op:{name}");
    c.start_osd_env(r2, &[("STORE_FAILPOINT", failpoint.as_str())]);
    wait_for(Duration::from_secs(30), "all OSDs up", || {
        (c.try_status()?["osdmap"]["num_up_osds"] == 3).then_some(())
    });
    c.wait_pgs_settled();

    let (client2, v2c) = (client.clone(), v2.clone());
    let pending = rt.spawn(async move { client2.write(pool.id, name, 0, v2c).await });
    wait_for(Duration::from_secs(10), "R2 to drop the replica op", || {
        let log = std::fs::read_to_string(c.log_path(&TestCluster::osd_name(r2))).ok()?;
        log.contains("failpoint: dropping").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !pending.is_finished(),
        "the write was acknowledged without R2"
    );
    // The primary dies with the write unacknowledged; the client gives up on it.
    pending.abort();
    c.kill(&TestCluster::osd_name(p));
    wait_for(Duration::from_secs(30), "P marked down", || {
        (c.try_status()?["osdmap"]["num_up_osds"] == 2).then_some(())
    });
    c.wait_pgs_settled();
    c.start_osd(p);
    c.ctl_ok(&["osd", "unset", "noout"]);
    wait_for(Duration::from_secs(60), "HEALTH_OK", || {
        let s = c.try_status()?;
        (s["osdmap"]["num_up_osds"] == 3 && s["health"]["status"] == "HEALTH_OK").then_some(())
    });

    // Every copy is the same, and is one of the two versions (an unacknowledged write may
    // survive or be rolled back, but never differ between replicas).
    let map = c.map();
    let copies = rt.block_on(async {
        let mut conns = BTreeMap::new();
        for o in map.osds.values() {
            let (conn, _) = RpcConn::connect(&o.addr, Duration::from_secs(5), OSD_MAX_FRAME_BYTES)
                .await
                .expect("connect");
            conns.insert(o.id, conn);
        }
        replicas(
            &conns,
            Pg {
                pool: pgid.pool,
                seed: pgid.seed,
            },
            name,
        )
        .await
    });
    let first = copies.values().next().cloned().flatten().expect("a copy");
    assert!(first == v1 || first == v2, "a copy that is neither version");
    for (osd, copy) in &copies {
        assert!(
            copy.as_ref() == Some(&first),
            "osd.{osd} diverges: {:?} bytes",
            copy.as_ref().map(|b| b.len())
        );
    }
    eprintln!(
        "divergent write {}",
        if first == v2 {
            "survived"
        } else {
            "was rolled back"
        }
    );
    c.check_logs();
}
