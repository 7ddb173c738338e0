//! What the monitors keep per PG beyond CRUSH, pure (part of `apply`): `pg_temp`, the
//! acting set of a PG that is being moved, and `pg_history`, each PG's last interval
//! that went active. See docs/replication.md ("Remapped PGs" and "Past intervals").

use std::collections::BTreeMap;

use store_placement::pool_mappings;
use store_types::map::{ClusterMap, LastActive, OsdId, PoolId};
use store_types::msg::PgActivation;
use store_types::{ErrorCode, StoreError};

/// After a command that moved CRUSH placement (`before` → `map`): every PG whose new CRUSH
/// set names OSDs that did not serve it keeps the OSDs that did (those still up) acting,
/// with the new ones added, until its primary says all of them hold it (`PgTempDone`).
/// A PG whose new set is exactly the OSDs that served it (up) has no entry.
pub fn update_pg_temp(before: &ClusterMap, map: &mut ClusterMap) {
    let mut temp: BTreeMap<PoolId, BTreeMap<u32, Vec<OsdId>>> = BTreeMap::new();
    for pool in map.pools.values() {
        let Some(old_pool) = before.pools.get(&pool.id) else {
            continue;
        };
        let old = pool_mappings(before, old_pool);
        let new = pool_mappings(map, pool);
        for (seed, now) in new.iter().enumerate() {
            let Some(was) = old.get(seed) else {
                continue;
            };
            let mut acting: Vec<OsdId> = was
                .acting
                .iter()
                .copied()
                .filter(|o| map.osds.get(o).is_some_and(|o| o.up))
                .collect();
            for o in &now.up {
                if !acting.contains(o) {
                    acting.push(*o);
                }
            }
            let same = acting.len() == now.up.len() && now.up.iter().all(|o| acting.contains(o));
            if !same && !acting.is_empty() {
                temp.entry(pool.id).or_default().insert(seed as u32, acting);
            }
        }
    }
    map.pg_temp = temp;
}

/// `PgTempDone`: drops the entries that still equal what the primary saw.
pub fn temp_done(map: &mut ClusterMap, pgs: &[(PoolId, u32, Vec<OsdId>)]) -> String {
    let mut dropped = 0;
    for (pool, seed, osds) in pgs {
        let Some(entries) = map.pg_temp.get_mut(pool) else {
            continue;
        };
        if entries.get(seed) == Some(osds) {
            entries.remove(seed);
            dropped += 1;
        }
        if entries.is_empty() {
            map.pg_temp.remove(pool);
        }
    }
    if dropped > 0 {
        map.epoch += 1;
    }
    format!("{dropped} of {} pg_temp entries dropped", pgs.len())
}

/// A new pool's PGs start with their CRUSH sets as last active sets: nothing is written
/// yet, so no primary has to record its first interval before serving.
pub fn init_history(map: &mut ClusterMap, pool: PoolId) {
    let Some(p) = map.pools.get(&pool) else {
        return;
    };
    let records = pool_mappings(map, p)
        .into_iter()
        .enumerate()
        .map(|(seed, m)| {
            let rec = LastActive {
                since_epoch: map.epoch,
                osds: m.acting,
            };
            (seed as u32, rec)
        })
        .collect();
    map.pg_history.insert(pool, records);
}

/// A removed pool's records go with it.
pub fn forget_pool(map: &mut ClusterMap, pool: PoolId) {
    map.pg_temp.remove(&pool);
    map.pg_history.remove(&pool);
}

/// `PgActivated`: records each PG's newest active interval. A record only replaces one
/// that started at the same epoch or earlier, so a late proposal from an older interval
/// never hides a newer one.
pub fn activated(map: &mut ClusterMap, pgs: &[PgActivation]) -> String {
    let mut recorded = 0;
    for a in pgs {
        let Some(pool) = map.pools.get(&a.pool) else {
            continue;
        };
        if a.seed >= pool.pg_num || a.since_epoch > map.epoch {
            continue;
        }
        let records = map.pg_history.entry(a.pool).or_default();
        let newer = records
            .get(&a.seed)
            .is_none_or(|r| r.since_epoch <= a.since_epoch && r.osds != a.osds);
        if newer {
            records.insert(
                a.seed,
                LastActive {
                    since_epoch: a.since_epoch,
                    osds: a.osds.clone(),
                },
            );
            recorded += 1;
        }
    }
    if recorded > 0 {
        map.epoch += 1;
    }
    format!("{recorded} of {} PG activations recorded", pgs.len())
}

/// Drops `id` from every PG's last active set: PGs stop waiting for it (after
/// `osd lost`, or a purge). Returns how many records named it.
fn forget_osd(map: &mut ClusterMap, id: OsdId) -> usize {
    let mut n = 0;
    for rec in map.pg_history.values_mut().flat_map(|p| p.values_mut()) {
        if rec.osds.contains(&id) {
            rec.osds.retain(|o| *o != id);
            n += 1;
        }
    }
    n
}

/// `OsdLost`: only for a down OSD. The PGs that waited for it may now go active from
/// the copies that are left, losing whatever only it held.
pub fn osd_lost(map: &mut ClusterMap, id: OsdId) -> Result<String, StoreError> {
    let Some(osd) = map.osds.get(&id) else {
        return Err(StoreError::not_found(format!("osd.{id} does not exist")));
    };
    if osd.up {
        return Err(StoreError::new(
            ErrorCode::NotPermitted,
            format!("osd.{id} is up: only a down OSD can be declared lost"),
        ));
    }
    let n = forget_osd(map, id);
    if n == 0 {
        return Ok(format!("no PG waits for osd.{id}"));
    }
    map.epoch += 1;
    Ok(format!(
        "osd.{id} declared lost: {n} PGs no longer wait for it"
    ))
}

/// A purged OSD is gone for good: no PG waits for it (the epoch is bumped by the purge).
pub fn purged(map: &mut ClusterMap, id: OsdId) {
    forget_osd(map, id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::apply_command;
    use store_placement::map_pg;
    use store_placement::PgId;
    use store_types::map::WEIGHT_ONE;
    use store_types::msg::MapCommand;

    fn boot(map: &mut ClusterMap, i: u32) {
        apply_command(
            map,
            &MapCommand::OsdBoot {
                uuid: format!("u{i}"),
                addr: format!("127.0.0.1:{}", 7000 + i),
                host: format!("h{i}"),
                weight: WEIGHT_ONE,
            },
        )
        .unwrap();
    }

    fn cluster(osds: u32) -> ClusterMap {
        let mut m = ClusterMap::new("fsid");
        for i in 0..osds {
            boot(&mut m, i);
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

    fn mapping(m: &ClusterMap, seed: u32) -> store_placement::PgMapping {
        map_pg(m, &m.pools[&1], PgId { pool: 1, seed })
    }

    #[test]
    fn a_new_pool_records_its_crush_sets_and_has_no_pg_temp() {
        let m = cluster(4);
        assert!(m.pg_temp.is_empty());
        for seed in 0..64 {
            let rec = m.last_active(1, seed).expect("record");
            assert_eq!(rec.osds, mapping(&m, seed).up);
        }
    }

    #[test]
    fn a_new_osd_joins_acting_sets_beside_the_old_ones_until_done() {
        let mut m = cluster(3);
        let before = m.clone();
        boot(&mut m, 3);
        let moved: Vec<u32> = (0..64)
            .filter(|s| mapping(&m, *s).up.contains(&3))
            .collect();
        assert!(!moved.is_empty());
        for seed in 0..64 {
            let now = mapping(&m, seed);
            let was = mapping(&before, seed);
            if moved.contains(&seed) {
                // The old OSDs keep serving (same primary), the new one is added.
                assert!(now.remapped(), "{now:?}");
                assert_eq!(now.acting[..3], was.acting[..], "{now:?}");
                assert_eq!(now.acting.len(), 4);
                assert_eq!(now.primary, was.primary);
            } else {
                assert!(!now.remapped());
            }
        }
        // The primary says done for one PG: it maps by CRUSH again. A stale "done" (an
        // entry that changed since) is ignored.
        let seed = moved[0];
        let acting = mapping(&m, seed).acting;
        let epoch = m.epoch;
        apply_command(
            &mut m,
            &MapCommand::PgTempDone {
                pgs: vec![(1, seed, vec![9, 9]), (1, seed, acting)],
            },
        )
        .unwrap();
        assert_eq!(m.epoch, epoch + 1);
        assert_eq!(m.placement_epoch, m.epoch);
        assert!(!mapping(&m, seed).remapped());
        assert_eq!(m.pg_temp_of(1, seed), None);
    }

    #[test]
    fn a_down_osd_leaves_no_pg_temp_but_a_down_new_one_keeps_the_old_set() {
        let mut m = cluster(5);
        apply_command(
            &mut m,
            &MapCommand::OsdMarkDown {
                ids: vec![0],
                now_ms: 1,
            },
        )
        .unwrap();
        assert!(m.pg_temp.is_empty(), "{:?}", m.pg_temp);
        // Marked out while down: its PGs go to the others, degraded (nothing to keep).
        apply_command(&mut m, &MapCommand::OsdOut { ids: vec![0] }).unwrap();
        assert!(m.pg_temp.is_empty(), "{:?}", m.pg_temp);
        // An OSD marked out while up keeps serving until the new one is filled.
        let before = m.clone();
        apply_command(&mut m, &MapCommand::OsdOut { ids: vec![1] }).unwrap();
        let seeds: Vec<u32> = (0..64).filter(|s| m.pg_temp_of(1, *s).is_some()).collect();
        assert!(!seeds.is_empty());
        for s in &seeds {
            assert!(mapping(&m, *s).acting.contains(&1));
            assert!(!mapping(&m, *s).up.contains(&1));
        }
        // The new OSD of such a PG goes down: the old set (with osd.1) stays acting.
        let s = seeds[0];
        let was = mapping(&before, s).acting;
        let new = *mapping(&m, s)
            .up
            .iter()
            .find(|o| !was.contains(o))
            .expect("a new OSD");
        apply_command(
            &mut m,
            &MapCommand::OsdMarkDown {
                ids: vec![new],
                now_ms: 2,
            },
        )
        .unwrap();
        let now = mapping(&m, s);
        assert_eq!(now.acting, was, "{now:?}");
    }

    #[test]
    fn activations_only_replace_older_records_and_lost_osds_are_forgotten() {
        let mut m = cluster(4);
        let act = |since_epoch, osds: Vec<u32>| PgActivation {
            pool: 1,
            seed: 5,
            since_epoch,
            osds,
        };
        let e = m.epoch;
        apply_command(
            &mut m,
            &MapCommand::PgActivated {
                pgs: vec![act(e, vec![0, 1])],
            },
        )
        .unwrap();
        assert_eq!(m.last_active(1, 5).unwrap().osds, vec![0, 1]);
        // An older interval's late proposal does not replace it.
        let out = apply_command(
            &mut m,
            &MapCommand::PgActivated {
                pgs: vec![act(e - 1, vec![2, 3])],
            },
        )
        .unwrap();
        assert!(!out.changed);
        assert_eq!(m.last_active(1, 5).unwrap().osds, vec![0, 1]);
        // From the future: refused (an OSD cannot have seen that epoch).
        let future = m.epoch + 5;
        assert!(
            !apply_command(
                &mut m,
                &MapCommand::PgActivated {
                    pgs: vec![act(future, vec![2])],
                },
            )
            .unwrap()
            .changed
        );
        // osd lost: refused while up, then the PG stops waiting for it.
        assert!(apply_command(&mut m, &MapCommand::OsdLost { id: 0 }).is_err());
        apply_command(
            &mut m,
            &MapCommand::OsdMarkDown {
                ids: vec![0],
                now_ms: 1,
            },
        )
        .unwrap();
        apply_command(&mut m, &MapCommand::OsdLost { id: 0 }).unwrap();
        assert_eq!(m.last_active(1, 5).unwrap().osds, vec![1]);
        assert!(m
            .pg_history
            .values()
            .flat_map(|p| p.values())
            .all(|r| !r.osds.contains(&0)));
        // Removing the pool forgets its records.
        apply_command(&mut m, &MapCommand::PoolRm { name: "p".into() }).unwrap();
        assert!(m.pg_history.is_empty() && m.pg_temp.is_empty());
    }
}
