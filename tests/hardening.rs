//! Faults a daemon must survive or die of loudly: a panic in any task ends the process
//! (it does not limp on with poisoned state), and the rest of the cluster keeps serving.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use bytes::Bytes;
use store_image::{Image, ImageContext};
use store_integration::{run_tool, tool_ok, ClusterOpts, TestCluster};
use store_types::map::image_data_object;
use store_types::ErrorCode;

/// Restarts the OSD at position `nth` of object `name`'s PG with failpoint `kind:name`
/// armed, and waits until every OSD is up and the PGs settled; the PG's OSDs, primary
/// first.
fn restart_with_failpoint(
    c: &mut TestCluster,
    pool: &store_types::map::Pool,
    name: &str,
    nth: usize,
    kind: &str,
) -> Vec<u32> {
    let map = c.map();
    let up = store_placement::map_pg(&map, pool, store_placement::object_to_pg(pool, name)).up;
    let n = map.osds.len();
    let victim = (0..n).find(|i| c.osd_id(*i) == up[nth]).expect("daemon");
    c.kill(&TestCluster::osd_name(victim));
    let failpoint = format!("{kind}:{name}");
    c.start_osd_env(victim, &[("STORE_FAILPOINT", failpoint.as_str())]);
    store_integration::wait_for(Duration::from_secs(30), "all OSDs up", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == n as u64).then_some(())
    });
    c.wait_pgs_settled();
    up
}

/// A panic in a spawned task (here injected by `STORE_FAILPOINT=panic_after_start`) must
/// abort the whole daemon with the panic in its log as an ERROR. Without the panic hook,
/// tokio catches the task's panic and the OSD keeps running (and heartbeating as up).
#[test]
fn a_panic_in_any_task_ends_the_daemon_loudly() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        ..Default::default()
    });
    c.create_pool("vm-pool", 8);
    c.start_osd_env(3, &[("STORE_FAILPOINT", "panic_after_start")]);
    let name = TestCluster::osd_name(3);
    let status = c
        .wait_exit(&name, Duration::from_secs(20))
        .expect("the panicking OSD must exit by itself");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
    assert!(
        c.log_has(&name, "ERROR") && c.log_has(&name, "panic, aborting the daemon"),
        "the panic must be logged as an ERROR"
    );
    assert!(c.log_has(&name, "failpoint panic_after_start"));
    c.allow_error("panic, aborting");
    // The others keep serving.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    rt.block_on(client.write(pool, "still-here", 0, Bytes::from_static(b"ok")))
        .expect("write after the panic");
    c.check_logs();
}

/// A write that leaves out its guard cannot slip past the image lock (and so past the
/// blocklist): while a live session holds an image's lock, OSDs refuse unguarded writes to
/// its data objects. Other objects, and the lock holder's guarded writes, are unaffected.
#[test]
fn unguarded_writes_to_a_locked_images_objects_are_refused() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        ..Default::default()
    });
    c.create_pool("vm-pool", 8);
    c.ctl_ok(&["image", "create", "vm-pool/disk0", "--size", "8M"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    let ctx = {
        let _rt = rt.enter();
        ImageContext::new(
            client.clone(),
            "hardening test".into(),
            Duration::from_secs(30),
        )
    };
    let img = rt.block_on(Image::open(&ctx, pool, "disk0")).expect("open");
    rt.block_on(img.write(0, Bytes::from_static(b"guarded")))
        .expect("the lock holder's write");
    let object = image_data_object(&img.header().id, 0);
    let err = rt
        .block_on(client.write(pool, &object, 0, Bytes::from_static(b"sneaky")))
        .expect_err("an unguarded write to a locked image's object");
    assert_eq!(err.code, ErrorCode::NotPermitted, "{err}");
    assert!(err.message.contains("guard"), "{err}");
    rt.block_on(client.write(pool, "not-an-image", 0, Bytes::from_static(b"free")))
        .expect("other objects take unguarded writes");
    let got = rt.block_on(img.read(0, 7)).expect("read");
    assert_eq!(&got[..], b"guarded");
    // Removal writes under the lock too, so the holder can still remove the image.
    rt.block_on(img.remove()).expect("remove");
    assert_eq!(
        rt.block_on(client.list(pool)).expect("ls"),
        vec!["not-an-image".to_string()]
    );
    c.check_logs();
}

/// One image whose PG is unavailable must not stall the gateway's other handshakes: the
/// gateway-wide table of open images used to stay locked while an image opened.
#[test]
fn an_image_that_cannot_open_does_not_stall_other_exports() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 2.0,
        ..Default::default()
    });
    c.create_pool("vm-pool", 8);
    c.ctl_ok(&["image", "create", "vm-pool/disk0", "--size", "8M"]);
    let victim = solo_image(&mut c, "solo/stuck");
    // The one OSD of the solo pool's only PG stops.
    c.kill(&TestCluster::osd_name(victim));
    store_integration::wait_for(Duration::from_secs(30), "the OSD marked down", || {
        (c.try_status()?["osdmap"]["num_up_osds"].as_u64()? == 2).then_some(())
    });
    let addr = c.start_gateway("nbd-a");
    // A client asks for the stuck image and waits...
    let stuck = std::thread::spawn({
        let uri = format!("nbd://{addr}/solo/stuck");
        move || run_tool("timeout", &["12", "nbdinfo", &uri])
    });
    std::thread::sleep(Duration::from_secs(1));
    // ...while another export of the same gateway opens at once.
    let t0 = std::time::Instant::now();
    let info = tool_ok(
        "timeout",
        &["15", "nbdinfo", &format!("nbd://{addr}/vm-pool/disk0")],
    );
    assert!(info.contains("export-size: 8388608"), "{info}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    let (ok, _) = stuck.join().expect("stuck client");
    assert!(!ok, "the stuck image cannot have opened");
    c.check_logs();
}

/// A write whose replica never answers: the primary reports it as a slow op past
/// `osd_op_complaint_time` (SLOW_OPS names the OSD and the op), answers the client with
/// TIMEOUT at `osd_op_timeout` (naming the OSD it waited for) instead of leaving it
/// waiting, and SLOW_OPS clears once nothing is blocked any more.
#[test]
fn a_blocked_write_raises_slow_ops_and_is_answered_within_the_op_timeout() {
    let (mut c, rt, client, pool) = cluster_with_pool(ClusterOpts {
        mons: 1,
        osds: 3,
        op_timeout_secs: 6.0,
        osd_conf: "osd_op_complaint_time = 1",
        ..Default::default()
    });
    let name = "blocked-0";
    let up = restart_with_failpoint(&mut c, &pool, name, 2, "drop_replica_op");

    let t0 = std::time::Instant::now();
    let (client2, pool_id) = (client.clone(), pool.id);
    let pending = rt.spawn(async move {
        client2
            .write(pool_id, name, 0, Bytes::from_static(b"never acked"))
            .await
    });
    let primary = format!("osd.{}", up[0]);
    let text = wait_raised(&c, "SLOW_OPS").to_string();
    assert!(text.contains(&format!("[{primary}]")), "{text}");
    let detail = c.ctl_json(&["health", "detail"]).to_string();
    assert!(
        detail.contains(&format!("{primary}: 1 ops blocked")) && detail.contains(name),
        "{detail}"
    );
    let err = rt
        .block_on(pending)
        .expect("writer task")
        .expect_err("a write its replica never made durable is not acknowledged");
    assert_eq!(err.code, ErrorCode::Timeout, "{err}");
    assert!(err.message.contains(&format!("osd.{}", up[2])), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "answered after {:?}",
        t0.elapsed()
    );
    wait_cleared(&c, "SLOW_OPS");
    c.check_logs();
}

/// An OSD whose data device fails an I/O (injected as EIO on one object's write) stops, is
/// marked down at once rather than after the heartbeat grace, and health says why
/// (OSD_DEVICE_ERRORS); the write still succeeds on the other OSDs. Before, the EIO went
/// back to the client as INTERNAL ("report a bug") and the OSD carried on.
#[test]
fn a_device_io_error_stops_the_osd_and_says_so_in_health() {
    let (mut c, rt, client, pool) = cluster_with_pool(ClusterOpts {
        mons: 1,
        osds: 4,
        grace_secs: 30.0,
        ..Default::default()
    });
    let name = "eio-0";
    let up = restart_with_failpoint(&mut c, &pool, name, 1, "device_eio");
    let failing = (0..4).find(|i| c.osd_id(*i) == up[1]).expect("daemon");
    let t0 = std::time::Instant::now();
    rt.block_on(client.write(pool.id, name, 0, Bytes::from_static(b"survives")))
        .expect("the write goes on without the failed OSD");
    let status = c
        .wait_exit(&TestCluster::osd_name(failing), Duration::from_secs(10))
        .expect("the OSD stops");
    assert!(!status.success(), "{status:?}");
    // Marked down well within the 30 s grace: the OSD asked for it.
    let s = store_integration::wait_for(Duration::from_secs(10), "OSD_DEVICE_ERRORS", || {
        let s = c.try_status()?;
        s["health"]["checks"]["OSD_DEVICE_ERRORS"]
            .is_object()
            .then_some(s)
    });
    assert_eq!(s["osdmap"]["num_up_osds"], 3);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let detail = c.ctl_json(&["health", "detail"]).to_string();
    assert!(detail.contains(&format!("osd.{}", up[1])), "{detail}");
    // The text form says what to do.
    let text = c.ctl_ok(&["health", "detail"]);
    assert!(
        text.contains("[ERR] OSD_DEVICE_ERRORS") && text.contains("hint: check the device"),
        "{text}"
    );
    let got = rt
        .block_on(client.read(pool.id, name, 0, 8))
        .expect("read from the others");
    assert_eq!(&got[..], b"survives");
    c.allow_error("I/O error on the data device");
    c.allow_error("stopped: I/O error on its data device");
    c.check_logs();
}

/// OSDs keep nothing for PGs their map lacks: a replica write for a PG of no pool is
/// refused (it used to create an engine and an apply task for it, and apply it), and the
/// PG slots of a removed pool are dropped.
#[test]
fn osds_keep_no_state_for_pgs_the_map_lacks() {
    use store_types::osdmsg::{Mutation, ObjVersion, OsdRequest, OsdResponse, Pg};
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        ..Default::default()
    });
    c.create_pool("gone", 8);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("gone").expect("pool").id;
    for i in 0..16 {
        rt.block_on(client.write(pool, &format!("o{i}"), 0, Bytes::from_static(b"x")))
            .expect("write");
    }
    let map = c.map();
    let osd = map.osds.values().next().expect("an OSD").clone();
    let resp = rt.block_on(async {
        let (conn, _) = store_client::RpcConn::connect(
            &osd.addr,
            Duration::from_secs(5),
            store_types::osdmsg::OSD_MAX_FRAME_BYTES,
        )
        .await
        .expect("connect");
        let req = OsdRequest::Replica {
            map_epoch: map.epoch + 1000,
            from: 99,
            pg: Pg {
                pool: 4242,
                seed: 7,
            },
            object: "phantom".into(),
            version: ObjVersion { epoch: 1, seq: 1 },
            mutation: Mutation::Delete,
        };
        conn.call::<_, OsdResponse>(&req, Duration::from_secs(10))
            .await
            .expect("an answer")
    });
    assert!(
        matches!(resp, OsdResponse::NotPrimary { .. }),
        "a replica write for a PG of no pool must not be applied: {resp:?}"
    );
    c.ctl_ok(&["pool", "rm", "gone", "--yes-i-really-mean-it"]);
    for i in 0..3 {
        c.wait_log(&TestCluster::osd_name(i), "PG slots of removed pools");
    }
    c.check_logs();
}

/// A gateway's NBD request blocked past `osd_op_complaint_time` (its image's only OSD is
/// down) raises SLOW_OPS naming the gateway; once the OSD is back the request completes
/// and the check clears.
#[test]
fn a_blocked_gateway_request_raises_slow_ops_naming_the_gateway() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/nbd_locks.py");
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 2.0,
        osd_conf: "osd_op_complaint_time = 1",
        ..Default::default()
    });
    let victim = solo_image(&mut c, "solo/disk");
    let addr = c.start_gateway("nbd-a");
    let mut writer = Command::new("/usr/bin/python3")
        .args([SCRIPT, "fenced", &format!("nbd://{addr}/solo/disk")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(writer.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("line").expect("read"), "wrote");
    // The one OSD of the solo pool's only PG stops.
    c.kill(&TestCluster::osd_name(victim));
    writeln!(writer.stdin.as_mut().expect("stdin")).expect("go");
    let check = wait_raised(&c, "SLOW_OPS").to_string();
    assert!(check.contains(&format!("gateway {addr}")), "{check}");
    let detail = c.ctl_json(&["health", "detail"]).to_string();
    assert!(detail.contains("nbd write solo/disk 0+4096"), "{detail}");
    c.start_osd(victim);
    assert_eq!(lines.next().expect("line").expect("read"), "accepted");
    let _ = writer.wait();
    wait_cleared(&c, "SLOW_OPS");
    c.check_logs();
}

/// A primary that misses an object and cannot recover it (its device refuses it: NO_SPACE,
/// injected by `refuse_recovery`) serves reads of it from a copy that has it, at once;
/// writes of it fail at once with NO_SPACE. Before, both waited for a recovery that could
/// not finish until the client gave up after 60 s.
#[test]
fn reads_of_an_object_that_cannot_be_recovered_are_served_from_a_good_copy() {
    let (mut c, rt, client, pool) = cluster_with_pool(ClusterOpts {
        mons: 1,
        osds: 3,
        grace_secs: 2.0,
        ..Default::default()
    });
    let name = "degraded-0";
    rt.block_on(client.write(pool.id, name, 0, Bytes::from_static(b"version 1")))
        .expect("write v1");
    let map = c.map();
    let up = store_placement::map_pg(&map, &pool, store_placement::object_to_pg(&pool, name)).up;
    let primary = (0..3).find(|i| c.osd_id(*i) == up[0]).expect("daemon");
    // The primary misses the next write...
    c.ctl_ok(&["osd", "set", "noout"]);
    c.kill(&TestCluster::osd_name(primary));
    store_integration::wait_for(Duration::from_secs(30), "the primary marked down", || {
        (c.try_status()?["osdmap"]["num_up_osds"] == 2).then_some(())
    });
    rt.block_on(client.write(pool.id, name, 0, Bytes::from_static(b"version 2")))
        .expect("write v2 without the primary");
    // ...and comes back unable to take it.
    let failpoint = format!("refuse_recovery:{name}");
    c.start_osd_env(primary, &[("STORE_FAILPOINT", failpoint.as_str())]);
    store_integration::wait_for(Duration::from_secs(30), "all OSDs up", || {
        (c.try_status()?["osdmap"]["num_up_osds"] == 3).then_some(())
    });
    c.wait_log(&TestCluster::osd_name(primary), "failpoint: no space");
    let t0 = std::time::Instant::now();
    let got = rt
        .block_on(client.read(pool.id, name, 0, 9))
        .expect("read from a good copy");
    assert_eq!(&got[..], b"version 2");
    let err = rt
        .block_on(client.write(pool.id, name, 0, Bytes::from_static(b"version 3")))
        .expect_err("a write of an object the primary cannot take");
    assert_eq!(err.code, ErrorCode::NoSpace, "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    c.check_logs();
}

/// A pool `solo` of one PG on one OSD, with image `image` in it, and `noout` set: the test
/// OSD that holds it, to stop when the image must become unavailable.
fn solo_image(c: &mut TestCluster, image: &str) -> usize {
    c.ctl_ok(&[
        "pool",
        "create",
        "solo",
        "--size",
        "1",
        "--min_size",
        "1",
        "--pg_num",
        "1",
    ]);
    c.wait_pgs_settled();
    c.ctl_ok(&["image", "create", image, "--size", "8M"]);
    c.ctl_ok(&["osd", "set", "noout"]);
    let map = c.map();
    let solo = map.pool_by_name("solo").expect("pool");
    let osd = store_placement::map_pg(&map, solo, store_placement::PgId::new(solo.id, 0))
        .primary
        .expect("the solo PG has an OSD");
    (0..map.osds.len())
        .find(|i| c.osd_id(*i) == osd)
        .expect("a test OSD")
}

/// Waits for health check `code` to be raised; the check.
fn wait_raised(c: &TestCluster, code: &str) -> serde_json::Value {
    store_integration::wait_for(Duration::from_secs(15), code, || {
        let check = c.try_status()?["health"]["checks"][code].clone();
        check.is_object().then_some(check)
    })
}

/// Waits for health check `code` to be gone.
fn wait_cleared(c: &TestCluster, code: &str) {
    store_integration::wait_for(Duration::from_secs(15), &format!("{code} to clear"), || {
        c.try_status()?["health"]["checks"][code]
            .is_null()
            .then_some(())
    });
}

/// A cluster with pool `vm-pool` (8 PGs, size 3), a runtime and an object client.
fn cluster_with_pool(
    opts: ClusterOpts,
) -> (
    TestCluster,
    tokio::runtime::Runtime,
    std::sync::Arc<store_client::ObjectClient>,
    store_types::map::Pool,
) {
    let c = TestCluster::start(opts);
    c.create_pool("vm-pool", 8);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool");
    (c, rt, client, pool)
}
