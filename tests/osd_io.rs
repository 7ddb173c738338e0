//! OSD data path faults: a damaged copy is detected, repaired from a replica and never
//! returned; garbage on the OSD port closes only that connection; a full device fails
//! writes clearly and damages nothing stored.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use bytes::Bytes;
use store_integration::{expect_closed, wait_for, ClusterOpts, TestCluster};
use store_placement::{map_pg, object_to_pg};
use store_types::ErrorCode;

/// Where the data blocks of the test's 16 MiB devices begin: after the superblock and the
/// commit journal (1/16 of the device), which also holds a copy of each small write. Only
/// the data blocks are damaged: a journal entry is read only when replaying after a crash.
const DATA_START_BYTES: usize = (1 + 256) * 4096;

/// Flips a byte after each copy of `marker` in the device's data blocks; returns how many.
/// A small write reaches its data blocks up to ~10 ms after it is acknowledged (its data
/// is durable in the journal first): wait (2 s at most) for a copy to be there.
fn damage(device: &std::path::Path, marker: &[u8]) -> usize {
    let t0 = std::time::Instant::now();
    loop {
        let hits = damage_now(device, marker);
        if hits > 0 {
            // Let the store take the written blocks out of its in-memory pending set, so
            // the next read goes to the damaged device blocks.
            std::thread::sleep(Duration::from_millis(50));
            return hits;
        }
        if t0.elapsed() > Duration::from_secs(2) {
            return hits;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn damage_now(device: &std::path::Path, marker: &[u8]) -> usize {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .expect("device");
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).expect("read device");
    let mut hits = 0;
    let mut at = DATA_START_BYTES;
    while let Some(pos) = buf[at..].windows(marker.len()).position(|w| w == marker) {
        let p = at + pos + marker.len();
        f.seek(SeekFrom::Start(p as u64)).expect("seek");
        f.write_all(&[buf[p] ^ 0x40]).expect("flip");
        hits += 1;
        at = p;
    }
    f.sync_all().expect("sync");
    hits
}

fn payload(marker: &[u8]) -> Bytes {
    let mut d = marker.to_vec();
    d.extend((0..20_000u32).map(|i| (i % 251) as u8));
    Bytes::from(d)
}

#[test]
fn damaged_copies_are_repaired_from_replicas_and_never_returned() {
    // Small devices: the test scans them for its marker.
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        device_size: "16M",
        ..Default::default()
    });
    c.create_pool("p", 8);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cl = c.object_client(&rt);
    let pool = cl.pool("p").expect("pool");
    let marker = b"MARKER-one-copy-damaged-0123456789";
    let data = payload(marker);
    rt.block_on(cl.write(pool.id, "victim", 0, data.clone()))
        .expect("write");

    // Damage the primary's copy: the read is repaired from a replica.
    let map = cl.map();
    let primary = map_pg(&map, &pool, object_to_pg(&pool, "victim"))
        .primary
        .expect("primary");
    let dev = (0..3)
        .find(|i| c.osd_id(*i) == primary)
        .expect("the primary's device");
    let device = c.dir.path().join(TestCluster::osd_name(dev)).join("block");
    assert_eq!(damage(&device, marker), 1);
    let got = rt
        .block_on(cl.read(pool.id, "victim", 0, data.len() as u32))
        .expect("read");
    assert_eq!(got, data, "a damaged copy must never be returned");
    // The repair is logged.
    c.wait_log(&TestCluster::osd_name(dev), "repaired a damaged local copy");
    // The repaired copy reads clean, and health stays OK once repaired.
    assert_eq!(
        rt.block_on(cl.read(pool.id, "victim", 0, data.len() as u32))
            .expect("read"),
        data
    );
    std::thread::sleep(Duration::from_secs(1));
    let s = c.status();
    assert!(s["health"]["checks"]["OSD_SCRUB_ERRORS"].is_null(), "{s}");

    // Damage every copy: the read fails clearly; health reports the damage.
    let marker2 = b"MARKER-all-copies-damaged-987654321";
    let data2 = payload(marker2);
    rt.block_on(cl.write(pool.id, "doomed", 0, data2.clone()))
        .expect("write");
    let damaged: usize = (0..3)
        .map(|i| {
            damage(
                &c.dir.path().join(TestCluster::osd_name(i)).join("block"),
                marker2,
            )
        })
        .sum();
    assert_eq!(damaged, 3);
    let err = rt
        .block_on(cl.read(pool.id, "doomed", 0, data2.len() as u32))
        .expect_err("no good copy left");
    assert_eq!(err.code, ErrorCode::Corrupt, "{err}");
    wait_for(Duration::from_secs(10), "OSD_SCRUB_ERRORS", || {
        c.try_status()?["health"]["checks"]["OSD_SCRUB_ERRORS"]
            .is_object()
            .then_some(())
    });
    c.allow_error("Unreachable node");
    c.check_logs();
}

#[test]
fn garbage_on_the_osd_port_closes_only_that_connection() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 1,
        ..Default::default()
    });
    c.ctl_ok(&[
        "pool",
        "create",
        "p",
        "--size",
        "1",
        "--min_size",
        "1",
        "--pg_num",
        "4",
    ]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cl = c.object_client(&rt);
    let addr = cl.map().osds.values().next().expect("osd").addr.clone();
    let mut huge = Vec::new();
    huge.extend_from_slice(b"STOR");
    huge.extend_from_slice(&1u16.to_le_bytes());
    huge.extend_from_slice(&1u16.to_le_bytes());
    huge.extend_from_slice(&1u64.to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(&0u32.to_le_bytes());
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &huge[..],
        &noise[..],
    ] {
        expect_closed(&addr, bytes);
    }
    let pool = cl.pool("p").expect("pool");
    rt.block_on(cl.write(pool.id, "still-works", 0, Bytes::from_static(b"yes")))
        .expect("the OSD keeps serving");
    // Malformed input is logged.
    c.wait_log(&TestCluster::osd_name(0), "closing connection");
    c.check_logs();
}

#[test]
fn full_devices_fail_writes_clearly_and_keep_what_is_stored() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 2,
        device_size: "24M",
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
        "8",
    ]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cl = c.object_client(&rt);
    let pool = cl.pool("p").expect("pool");
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    let mut stored = Vec::new();
    let err = loop {
        let name = format!("fill-{}", stored.len());
        match rt.block_on(cl.write(pool.id, &name, 0, chunk.clone())) {
            Ok(_) => stored.push(name),
            Err(e) => break e,
        }
        assert!(stored.len() < 40, "a 24 MiB device cannot hold 40 MiB");
    };
    assert_eq!(err.code, ErrorCode::NoSpace, "{err}");
    assert!(stored.len() >= 10, "only {} MiB fit", stored.len());
    for name in &stored {
        let got = rt
            .block_on(cl.read(pool.id, name, 0, 1 << 20))
            .expect("read stored data");
        assert_eq!(got, chunk, "{name} damaged by the failed write");
    }
    wait_for(Duration::from_secs(10), "OSD_FULL or OSD_NEARFULL", || {
        let s = c.try_status()?;
        let checks = &s["health"]["checks"];
        (checks["OSD_FULL"].is_object() || checks["OSD_NEARFULL"].is_object()).then_some(())
    });
    c.allow_error("Unreachable node");
    c.check_logs();
}
