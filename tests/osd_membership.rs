//! OSD membership: boot and ids, failure detection (down after the grace period), degraded
//! PGs, re-boot, down→out with and without noout, in/out by the operator.

use std::time::{Duration, Instant};

use store_integration::{wait_for, ClusterOpts, TestCluster};

fn pg_states(s: &serde_json::Value) -> Vec<(String, u64)> {
    s["pgmap"]["pgs_by_state"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["state_name"].as_str().unwrap_or("").to_string(),
                        p["count"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_osd_is_marked_down_and_its_pgs_degraded() {
    let mut c = TestCluster::start(ClusterOpts::default());
    c.create_pool("vm-pool", 64);
    let s = c.status();
    assert_eq!(s["health"]["status"], "HEALTH_OK", "{s}");
    assert_eq!(pg_states(&s), vec![("active+clean".to_string(), 64)]);

    // Three OSDs on three hosts, ids 0..3, each in its own host bucket.
    let tree = c.ctl_json(&["osd", "tree"]);
    let nodes = tree["nodes"].as_array().expect("nodes");
    let osds: Vec<&serde_json::Value> = nodes.iter().filter(|n| n["type"] == "osd").collect();
    assert_eq!(osds.len(), 3);
    // Weights come from device capacity: equal devices, equal positive weights.
    let w0 = osds[0]["weight"].as_f64().expect("weight");
    assert!(w0 > 0.0);
    assert!(osds
        .iter()
        .all(|o| o["status"] == "up" && o["weight"].as_f64() == Some(w0)));
    assert_eq!(nodes.iter().filter(|n| n["type"] == "host").count(), 3);
    assert_eq!(nodes[0]["type"], "root");

    c.kill(&TestCluster::osd_name(1));
    let t0 = Instant::now();
    let s = wait_for(Duration::from_secs(30), "OSD_DOWN", || {
        let s = c.try_status()?;
        s["health"]["checks"]["OSD_DOWN"].is_object().then_some(s)
    });
    eprintln!(
        "FIGURE osd marked down {:?} after SIGKILL (grace 3 s)",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "marked down before the grace period"
    );
    assert_eq!(s["osdmap"]["num_up_osds"], 2, "{s}");
    assert_eq!(s["osdmap"]["num_in_osds"], 3, "down is not out: {s}");
    // The primaries report on the new map within a heartbeat.
    c.wait_pgs_settled();
    let s = c.status();
    assert!(s["health"]["checks"]["PG_DEGRADED"].is_object(), "{s}");
    assert_eq!(
        pg_states(&s),
        vec![("active+undersized+degraded".to_string(), 64)]
    );
    let detail = c.ctl_ok(&["health", "detail"]);
    assert!(detail.contains("is down"), "{detail}");
    let tree = c.ctl_json(&["osd", "tree"]);
    let down: Vec<i64> = tree["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["status"] == "down")
        .filter_map(|n| n["id"].as_i64())
        .collect();
    assert_eq!(down.len(), 1);

    // A second OSD down: PGs below min_size are inactive.
    c.kill(&TestCluster::osd_name(2));
    let s = wait_for(Duration::from_secs(30), "PG_AVAILABILITY", || {
        let s = c.try_status()?;
        s["health"]["checks"]["PG_AVAILABILITY"]
            .is_object()
            .then_some(s)
    });
    assert_eq!(
        pg_states(&s),
        vec![("undersized+degraded+peered".to_string(), 64)]
    );

    // Restart both: same ids, up again, healthy.
    c.start_osd(1);
    c.start_osd(2);
    let s = wait_for(Duration::from_secs(30), "HEALTH_OK again", || {
        let s = c.try_status()?;
        (s["health"]["status"] == "HEALTH_OK").then_some(s)
    });
    assert_eq!(
        s["osdmap"]["num_osds"], 3,
        "restarted OSDs must keep their ids: {s}"
    );
    c.check_logs();
}

#[test]
fn down_osds_go_out_unless_noout() {
    let mut c = TestCluster::start(ClusterOpts {
        down_out_secs: 3.0,
        ..Default::default()
    });
    c.ctl_ok(&["osd", "set", "noout"]);
    let s = c.status();
    assert!(s["health"]["checks"]["OSDMAP_FLAGS"].is_object(), "{s}");
    c.kill(&TestCluster::osd_name(0));
    wait_for(Duration::from_secs(30), "osd down", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 2).then_some(())
    });
    // Well past grace + down-out interval: noout keeps it in.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.status()["osdmap"]["num_in_osds"], 3);
    c.ctl_ok(&["osd", "unset", "noout"]);
    wait_for(
        Duration::from_secs(30),
        "osd out after noout is unset",
        || (c.try_status()?["osdmap"]["num_in_osds"].as_u64()? == 2).then_some(()),
    );
    // The operator's in/out.
    let tree = c.ctl_json(&["osd", "tree"]);
    let out_id = tree["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["type"] == "osd" && n["in"] == false)
        .and_then(|n| n["id"].as_i64())
        .expect("one OSD is out")
        .to_string();
    c.ctl_ok(&["osd", "in", &out_id]);
    assert_eq!(c.status()["osdmap"]["num_in_osds"], 3);
    c.ctl_ok(&["osd", "set", "noout"]);
    c.ctl_ok(&["osd", "out", &out_id]);
    assert_eq!(c.status()["osdmap"]["num_in_osds"], 2);
    let out = c.ctl(&["osd", "out", "42"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));
    c.check_logs();
}
