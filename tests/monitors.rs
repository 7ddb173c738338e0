//! Monitors: leader failover, loss of quorum, convergence after restarts, full-cluster
//! restart, membership changes. Real processes on 127.0.0.1.

use std::time::{Duration, Instant};

use serde_json::Value;
use store_client::RpcConn;
use store_integration::{free_port, wait_for, ClusterOpts, TestCluster};
use store_types::msg::{MonRequest, MonResponse, PongInfo};
use store_types::wire::DEFAULT_MAX_FRAME_BYTES;

fn ping(addr: &str) -> Option<PongInfo> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let (c, _) = RpcConn::connect(addr, Duration::from_millis(500), DEFAULT_MAX_FRAME_BYTES)
            .await
            .ok()?;
        match c
            .call::<_, MonResponse>(&MonRequest::Ping, Duration::from_secs(2))
            .await
        {
            Ok(MonResponse::Pong(p)) => Some(p),
            _ => None,
        }
    })
}

fn leader(c: &TestCluster) -> String {
    wait_for(Duration::from_secs(30), "a monitor leader", || {
        c.try_status()?["quorum_leader_name"]
            .as_str()
            .map(String::from)
    })
}

fn create_pool(c: &TestCluster, name: &str) -> std::process::Output {
    c.ctl(&[
        "pool",
        "create",
        name,
        "--size",
        "3",
        "--min_size",
        "2",
        "--pg_num",
        "32",
    ])
}

#[test]
fn leader_failover_quorum_loss_and_convergence() {
    let mut c = TestCluster::start(ClusterOpts::default());
    assert!(create_pool(&c, "vm-pool").status.success());
    let old_leader = leader(&c);

    c.kill(&format!("mon.{old_leader}"));
    let t0 = Instant::now();
    let mut attempts = 0;
    wait_for(
        Duration::from_secs(30),
        "pool create after the leader died",
        || {
            attempts += 1;
            create_pool(&c, "after-failover")
                .status
                .success()
                .then_some(())
        },
    );
    let failover = t0.elapsed();
    eprintln!("FIGURE leader failover (SIGKILL -> first successful change): {failover:?} ({attempts} attempts)");
    let new_leader = leader(&c);
    assert_ne!(new_leader, old_leader, "a new leader must be elected");

    // Kill a second monitor: no quorum. Changes fail fast and clearly; status still answers.
    let second = c
        .mons
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old_leader && *n != new_leader)
        .expect("third monitor");
    c.kill(&format!("mon.{new_leader}"));
    let t0 = Instant::now();
    let out = create_pool(&c, "no-quorum");
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a change without quorum must fail");
    assert!(stderr.contains("NO_QUORUM"), "{stderr}");
    assert!(stderr.contains("1 of 3 monitors reachable"), "{stderr}");
    assert!(
        took < Duration::from_secs(20),
        "no-quorum error took {took:?}: must not hang"
    );
    eprintln!("FIGURE no-quorum error returned after {took:?}");
    let s = c.status();
    assert_eq!(s["health"]["status"], "HEALTH_ERR", "{s}");
    assert!(s["health"]["checks"]["MON_QUORUM_LOST"].is_object(), "{s}");
    assert!(
        s["quorum_names"].as_array().is_some_and(|q| q.is_empty()),
        "{s}"
    );
    assert_eq!(s["answered_by"], second.as_str());

    // Restart both: all monitors converge to the same epoch, and changes work again.
    c.start_mon(&old_leader);
    c.start_mon(&new_leader);
    wait_for(Duration::from_secs(30), "quorum back", || {
        create_pool(&c, "after-restart")
            .status
            .success()
            .then_some(())
    });
    let want = c.status()["osdmap"]["epoch"].as_u64().expect("epoch");
    let addrs: Vec<String> = c.mons.iter().map(|m| m.addr.clone()).collect();
    wait_for(
        Duration::from_secs(30),
        "all monitors at the same epoch",
        || {
            let epochs: Vec<u64> = addrs
                .iter()
                .filter_map(|a| ping(a))
                .map(|p| p.epoch)
                .collect();
            (epochs.len() == 3 && epochs.iter().all(|e| *e == epochs[0] && *e >= want))
                .then_some(())
        },
    );
    let pools = c.ctl_json(&["pool", "ls"]);
    let names: Vec<&str> = pools
        .as_array()
        .expect("pool list")
        .iter()
        .filter_map(|p| p["pool_name"].as_str())
        .collect();
    assert_eq!(names, vec!["vm-pool", "after-failover", "after-restart"]);
    c.check_logs();
}

/// What must survive a restart of every process: pools, OSDs, CRUSH, flags.
fn durable_view(c: &TestCluster) -> Value {
    let map = c.ctl_json(&["map"]);
    let osds: Vec<Value> = map["osds"]
        .as_object()
        .expect("osds")
        .values()
        .map(|o| {
            serde_json::json!({
                "id": o["id"], "uuid": o["uuid"], "host": o["host"],
                "weight": o["weight"], "is_in": o["is_in"],
            })
        })
        .collect();
    serde_json::json!({
        "fsid": map["fsid"], "pools": map["pools"], "crush": map["crush"],
        "flags": map["flags"], "osds": osds, "mons": map["mons"],
    })
}

#[test]
fn every_process_restarted_keeps_pools_osds_and_crush() {
    let opts = ClusterOpts::default();
    let mut c = TestCluster::start(opts.clone());
    assert!(create_pool(&c, "vm-pool").status.success());
    c.ctl_ok(&[
        "pool",
        "create",
        "osd-pool",
        "--size",
        "2",
        "--min_size",
        "1",
        "--failure-domain",
        "osd",
    ]);
    c.ctl_ok(&["osd", "set", "noout"]);
    c.ctl_ok(&["osd", "out", "1"]);
    let before = durable_view(&c);
    let epoch_before = c.status()["osdmap"]["epoch"].as_u64().expect("epoch");

    let names: Vec<String> = c
        .mons
        .iter()
        .map(|m| format!("mon.{}", m.name))
        .chain((0..opts.osds).map(TestCluster::osd_name))
        .collect();
    for n in &names {
        c.kill(n);
    }
    for m in c.mons.iter().map(|m| m.name.clone()).collect::<Vec<_>>() {
        c.start_mon(&m);
    }
    for i in 0..opts.osds {
        c.start_osd(i);
    }
    c.wait_osds_up(opts.osds, Duration::from_secs(60));
    let after = durable_view(&c);
    assert_eq!(
        before, after,
        "state after restarting every process differs"
    );
    let epoch_after = c.status()["osdmap"]["epoch"].as_u64().expect("epoch");
    assert!(
        epoch_after >= epoch_before,
        "epoch went backwards: {epoch_before} -> {epoch_after}"
    );
    c.check_logs();
}

#[test]
fn mon_add_and_remove_through_raft() {
    let mut c = TestCluster::start(ClusterOpts {
        osds: 1,
        ..Default::default()
    });
    let addr = format!("127.0.0.1:{}", free_port());
    c.spawn(
        "mon.d",
        &[
            "mon".into(),
            "--id".into(),
            "d".into(),
            "--addr".into(),
            addr.clone(),
        ],
    );
    let out = c.ctl_ok(&["mon", "add", "d", &addr]);
    assert!(out.contains("mon.d"), "{out}");
    let s = wait_for(Duration::from_secs(30), "4 monitors in quorum", || {
        let s = c.try_status()?;
        (s["quorum_names"].as_array()?.len() == 4).then_some(s)
    });
    assert!(
        s["health"]["checks"]["EVEN_MONITOR_COUNT"].is_object(),
        "{s}"
    );
    // The new monitor serves the map too.
    let pong = ping(&addr).expect("mon.d answers");
    assert_eq!(pong.name, "d");
    // Adding it again is refused clearly.
    let again = c.ctl(&["mon", "add", "d", &addr]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("ALREADY_EXISTS"));

    c.ctl_ok(&["mon", "rm", "d"]);
    c.allow_error("Unreachable node");
    let s = wait_for(Duration::from_secs(30), "3 monitors again", || {
        let s = c.try_status()?;
        (s["monmap"]["num_mons"].as_u64()? == 3).then_some(s)
    });
    assert!(s["health"]["checks"]["EVEN_MONITOR_COUNT"].is_null(), "{s}");
    // The removed monitor exits on its own.
    wait_for(Duration::from_secs(20), "removed monitor to exit", || {
        let pid = c.pid("mon.d")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z")).then_some(())
    });
    let rm_unknown = c.ctl(&["mon", "rm", "zz"]);
    assert!(String::from_utf8_lossy(&rm_unknown.stderr).contains("NOT_FOUND"));
    c.check_logs();
}
