use super::*;
use crate::apply::{apply_command, set_mons};
use store_types::map::{MonInfo, WEIGHT_ONE};
use store_types::msg::MapCommand;

fn cluster(osds: u32, mons: u64) -> ClusterMap {
    let mut m = ClusterMap::new("f");
    set_mons(
        &mut m,
        (1..=mons)
            .map(|i| MonInfo {
                id: i,
                name: format!("m{i}"),
                addr: format!("127.0.0.1:{i}"),
                voter: true,
            })
            .collect(),
    );
    for i in 0..osds {
        apply_command(
            &mut m,
            &MapCommand::OsdBoot {
                uuid: format!("u{i}"),
                addr: format!("127.0.0.1:{}", 7000 + i),
                host: format!("h{i}"),
                weight: WEIGHT_ONE,
            },
        )
        .unwrap();
    }
    apply_command(
        &mut m,
        &MapCommand::PoolCreate {
            name: "p".into(),
            size: 3,
            min_size: 2,
            pg_num: 64,
            failure_domain: None,
        },
    )
    .unwrap();
    m
}

/// Every OSD reported nothing busy at the current epoch.
fn current(map: &ClusterMap) -> BusyPgs {
    let reports = map
        .osds
        .keys()
        .map(|id| (*id, (map.epoch, vec![])))
        .collect();
    busy_pgs(map, &reports)
}

fn report(map: &ClusterMap, reachable: &[bool]) -> StatusReport {
    let stats = HashMap::new();
    status(StatusInput {
        map,
        mons: map
            .mons
            .values()
            .zip(reachable)
            .map(|(m, r)| MonStatus {
                id: m.id,
                name: m.name.clone(),
                addr: m.addr.clone(),
                reachable: *r,
                error: (!r).then(|| "connection refused".to_string()),
            })
            .collect(),
        leader_name: Some("m1".into()),
        answered_by: "m1".into(),
        osd_stats: &stats,
        slow_ops: &[],
        live_sessions: 0,
        silent_holders: None,
        recovery_rate: (None, None),
        busy: &current(map),
    })
}

#[test]
fn healthy_cluster_is_ok() {
    let m = cluster(3, 3);
    let r = report(&m, &[true, true, true]);
    assert_eq!(r.health, Severity::Ok, "{:?}", r.checks);
    assert_eq!(r.pgs_by_state.get(STATE_CLEAN), Some(&64));
    assert_eq!(r.quorum_names, vec!["m1", "m2", "m3"]);
}

#[test]
fn norebalance_holds_placement_for_up_osds_but_not_for_down_and_out_ones() {
    use store_types::map::Flag;
    let mut m = cluster(4, 1);
    let mappings = |m: &ClusterMap| pool_mappings(m, &m.pools[&1]);
    apply_command(&mut m, &MapCommand::SetFlag(Flag::NoRebalance)).unwrap();
    let held = mappings(&m);
    // A new OSD and a reweight move nothing while the flag is set...
    apply_command(
        &mut m,
        &MapCommand::OsdBoot {
            uuid: "new".into(),
            addr: "127.0.0.1:7100".into(),
            host: "h9".into(),
            weight: WEIGHT_ONE,
        },
    )
    .unwrap();
    apply_command(
        &mut m,
        &MapCommand::OsdReweight {
            id: 0,
            weight: WEIGHT_ONE / 4,
        },
    )
    .unwrap();
    assert_eq!(mappings(&m), held);
    let back = held_back(&m);
    assert!(!back.pgs.is_empty() && back.copies > 0, "{back:?}");
    assert_eq!(back.slots, 64 * 3);
    let r = report(&m, &[true]);
    assert!(r.checks.contains_key("OBJECT_MISPLACED") || r.object_copies == 0);
    assert_eq!(
        r.pgs_by_state.get(STATE_REMAPPED).copied(),
        Some(back.pgs.len() as u64)
    );
    // ...but a down and out OSD's PGs still go elsewhere (recovery, not rebalance).
    apply_command(
        &mut m,
        &MapCommand::OsdMarkDown {
            ids: vec![1],
            now_ms: 1,
        },
    )
    .unwrap();
    apply_command(&mut m, &MapCommand::OsdOut { ids: vec![1] }).unwrap();
    assert!(mappings(&m).iter().all(|pg| !pg.raw.contains(&1)));
    // Unsetting it lets everything move to where CRUSH puts it.
    let before = m.placement_epoch;
    apply_command(&mut m, &MapCommand::UnsetFlag(Flag::NoRebalance)).unwrap();
    assert!(m.placement_epoch > before);
    assert!(m.rebalance_hold.is_none());
    assert!(held_back(&m).pgs.is_empty());
    assert!(mappings(&m).iter().any(|pg| pg.raw.contains(&4)));
}

#[test]
fn osd_down_degrades_pgs_and_two_down_makes_them_inactive() {
    let mut m = cluster(3, 3);
    apply_command(
        &mut m,
        &MapCommand::OsdMarkDown {
            ids: vec![2],
            now_ms: 1,
        },
    )
    .unwrap();
    let r = report(&m, &[true, true, true]);
    assert_eq!(r.health, Severity::Warn);
    assert!(r.checks.contains_key("OSD_DOWN"));
    assert!(r.checks.contains_key("PG_DEGRADED"));
    assert_eq!(r.pgs_by_state.get(STATE_DEGRADED), Some(&64));
    apply_command(
        &mut m,
        &MapCommand::OsdMarkDown {
            ids: vec![1],
            now_ms: 1,
        },
    )
    .unwrap();
    let r = report(&m, &[true, true, true]);
    assert!(r.checks.contains_key("PG_AVAILABILITY"));
    assert_eq!(r.pgs_by_state.get(STATE_INACTIVE), Some(&64));
}

#[test]
fn mon_checks_quorum_and_even_count() {
    let m = cluster(3, 3);
    let r = report(&m, &[true, false, false]);
    assert_eq!(r.health, Severity::Err);
    assert!(r.checks["MON_QUORUM_LOST"].summary.contains("1 of 3"));
    assert!(r.quorum_names.is_empty());
    let r = report(&m, &[true, true, false]);
    assert_eq!(r.checks["MON_DOWN"].summary, "1/3 mons down, quorum m1,m2");
    let m = cluster(3, 2);
    let r = report(&m, &[true, true]);
    assert!(r.checks.contains_key("EVEN_MONITOR_COUNT"));
}

#[test]
fn full_and_damaged_osds_are_reported() {
    let m = cluster(3, 1);
    let mut stats = HashMap::new();
    let st = |used, errs| OsdStat {
        total_bytes: 100,
        used_bytes: used,
        objects: 1,
        checksum_errors: errs,
        recovered_objects: 0,
        recovered_bytes: 0,
        device_errors: 0,
    };
    stats.insert(0, st(96, 0));
    stats.insert(1, st(90, 2));
    stats.insert(
        2,
        OsdStat {
            device_errors: 1,
            ..st(10, 0)
        },
    );
    let r = status(StatusInput {
        map: &m,
        mons: vec![],
        leader_name: None,
        answered_by: "m1".into(),
        osd_stats: &stats,
        slow_ops: &[],
        live_sessions: 0,
        silent_holders: None,
        recovery_rate: (None, None),
        busy: &current(&m),
    });
    assert_eq!(r.checks["OSD_FULL"].detail, vec!["osd.0 is 96.0% full"]);
    assert_eq!(r.checks["OSD_NEARFULL"].detail, vec!["osd.1 is 90.0% full"]);
    assert!(r.checks["OSD_SCRUB_ERRORS"].detail[0].contains("osd.1"));
    assert_eq!(
        r.checks["OSD_DEVICE_ERRORS"].detail,
        vec!["osd.2 stopped after 1 I/O error(s) on its data device"]
    );
    assert_eq!(r.health, Severity::Err);
    assert_eq!(r.used_bytes, 196);
}

#[test]
fn too_few_domains_warns() {
    let m = cluster(2, 1);
    let r = report(&m, &[true]);
    assert!(r.checks.contains_key("POOL_SIZE_EXCEEDS_DOMAINS"));
    assert_eq!(r.pgs_by_state.get(STATE_UNDERSIZED), Some(&64));
}

#[test]
fn locks_of_fenced_or_silent_sessions_warn() {
    use store_types::msg::LockClaim;
    let mut m = cluster(3, 1);
    for (key, session) in [("1/a", 1), ("1/b", 2)] {
        let claim = LockClaim {
            lock_key: key.into(),
            image: format!("p/{key}"),
            session,
            desc: "gw".into(),
            instance: 1,
        };
        apply_command(&mut m, &MapCommand::LockAcquire(claim)).unwrap();
    }
    apply_command(
        &mut m,
        &MapCommand::BlocklistAdd {
            session: 1,
            reason: "t".into(),
            expire_s: None,
        },
    )
    .unwrap();
    let stats = HashMap::new();
    let r = status(StatusInput {
        map: &m,
        mons: vec![],
        leader_name: None,
        answered_by: "m1".into(),
        osd_stats: &stats,
        slow_ops: &[],
        live_sessions: 1,
        silent_holders: Some(vec!["image p/1/b is locked by ...".into()]),
        recovery_rate: (None, None),
        busy: &current(&m),
    });
    assert_eq!(r.checks["IMAGE_LOCK_BLOCKLISTED"].detail.len(), 1);
    assert!(r.checks["IMAGE_LOCK_BLOCKLISTED"].detail[0].contains("p/1/a"));
    assert_eq!(r.checks["IMAGE_LOCK_ORPHANED"].severity, Severity::Warn);
    assert_eq!(
        (r.num_image_locks, r.num_blocklisted, r.num_sessions),
        (2, 1, 1)
    );
}

#[test]
fn every_check_is_keyed_by_its_code_with_the_codes_severity() {
    use store_types::map::Flag;
    let mut m = cluster(2, 2);
    apply_command(&mut m, &MapCommand::SetFlag(Flag::NoOut)).unwrap();
    apply_command(
        &mut m,
        &MapCommand::OsdMarkDown {
            ids: vec![1],
            now_ms: 1,
        },
    )
    .unwrap();
    let r = report(&m, &[true, false]);
    assert!(r.checks.len() >= 7, "{:?}", r.checks.keys());
    for (key, check) in &r.checks {
        let code: HealthCode = key.parse().unwrap();
        assert_eq!(check.severity, code.severity(), "{key}");
    }
}
