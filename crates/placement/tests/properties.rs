//! Properties of the PG → OSD mapping over random maps: random weights (including 0),
//! random up/down and in/out, non-contiguous OSD ids, both failure domains.

mod common;

use std::collections::BTreeSet;

use proptest::prelude::*;
use store_placement::{map_pg, pg_num_mask, pool_mappings, stable_mod, PgId, PgMapping};
use store_types::map::{ClusterMap, FailureDomain, OsdId, Pool};

const PG_NUM: u32 = 48;

/// (hosts, osds): 1..=6 hosts, 1..=24 OSDs with ids spaced by 1..=3.
fn arb_map() -> impl Strategy<Value = ClusterMap> {
    (1usize..=6).prop_flat_map(|hosts| {
        let osd = (
            1u32..=3,
            0..hosts,
            prop_oneof![
                Just(0u32),
                1u32..0x10000,
                Just(0x10000u32),
                0x10000u32..0x80000
            ],
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.8),
        );
        prop::collection::vec(osd, 1..=24).prop_map(move |specs| {
            let mut id = 0;
            let osds: Vec<common::OsdSpec> = specs
                .into_iter()
                .map(|(gap, host, weight, up, is_in)| {
                    id += gap;
                    (id, host, weight, up, is_in)
                })
                .collect();
            common::build_map(hosts, &osds)
        })
    })
}

fn arb_pool() -> impl Strategy<Value = Pool> {
    (
        1u32..1000,
        0u32..=5,
        prop_oneof![Just(FailureDomain::Host), Just(FailureDomain::Osd)],
    )
        .prop_map(|(id, size, fd)| common::pool(id, size, PG_NUM, fd))
}

/// The failure domain an OSD belongs to, as a comparable string.
fn domain(map: &ClusterMap, pool: &Pool, osd: OsdId) -> String {
    match pool.failure_domain {
        FailureDomain::Host => map.osds[&osd].host.clone(),
        FailureDomain::Osd => osd.to_string(),
    }
}

fn check_mapping(map: &ClusterMap, pool: &Pool, m: &PgMapping) -> Result<(), TestCaseError> {
    let domains: BTreeSet<String> = m.raw.iter().map(|&id| domain(map, pool, id)).collect();
    prop_assert_eq!(
        domains.len(),
        m.raw.len(),
        "two replicas in one failure domain: {:?}",
        m.raw
    );
    for id in &m.raw {
        prop_assert!(
            map.osds[id].crush_eligible(),
            "raw holds ineligible osd.{}",
            id
        );
    }
    let expected_len = (pool.size as usize).min(map.failure_domains_available(pool.failure_domain));
    prop_assert_eq!(m.raw.len(), expected_len);
    let up: Vec<OsdId> = m.raw.iter().copied().filter(|id| map.osds[id].up).collect();
    prop_assert_eq!(&m.up, &up);
    prop_assert_eq!(m.primary, up.first().copied());
    Ok(())
}

/// An existing OSD picked by index.
fn pick_osd(map: &ClusterMap, index: prop::sample::Index) -> OsdId {
    let ids: Vec<OsdId> = map.osds.keys().copied().collect();
    ids[index.index(ids.len())]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mappings_are_valid(map in arb_map(), pool in arb_pool()) {
        for m in pool_mappings(&map, &pool) {
            check_mapping(&map, &pool, &m)?;
        }
    }

    #[test]
    fn mapping_is_deterministic(map in arb_map(), pool in arb_pool()) {
        let all = pool_mappings(&map, &pool);
        prop_assert_eq!(&all, &pool_mappings(&map.clone(), &pool));
        for (seed, m) in all.iter().enumerate() {
            prop_assert_eq!(m, &map_pg(&map, &pool, PgId::new(pool.id, seed as u32)));
        }
    }

    #[test]
    fn marking_out_moves_only_pgs_that_held_the_osd(
        map in arb_map(), pool in arb_pool(), pick in any::<prop::sample::Index>(),
    ) {
        let osd = pick_osd(&map, pick);
        let mut out_map = map.clone();
        out_map.osds.get_mut(&osd).unwrap().is_in = false;
        let before = pool_mappings(&map, &pool);
        let after = pool_mappings(&out_map, &pool);
        for (old, new) in before.iter().zip(&after) {
            prop_assert!(!new.raw.contains(&osd));
            if !old.raw.contains(&osd) {
                prop_assert_eq!(&old.raw, &new.raw);
                continue;
            }
            // Every other replica stays; at most one new OSD replaces the lost one.
            let kept: BTreeSet<OsdId> = new.raw.iter().copied().collect();
            for id in old.raw.iter().filter(|&&id| id != osd) {
                prop_assert!(kept.contains(id), "osd.{} lost from {:?} -> {:?}", id, old.raw, new.raw);
            }
            prop_assert!(new.raw.len() <= old.raw.len());
        }
    }

    #[test]
    fn marking_down_changes_no_raw_set(
        map in arb_map(), pool in arb_pool(), pick in any::<prop::sample::Index>(),
    ) {
        let osd = pick_osd(&map, pick);
        let mut down_map = map.clone();
        down_map.osds.get_mut(&osd).unwrap().up = false;
        let before = pool_mappings(&map, &pool);
        let after = pool_mappings(&down_map, &pool);
        for (old, new) in before.iter().zip(&after) {
            prop_assert_eq!(&old.raw, &new.raw);
            let up: Vec<OsdId> = old.up.iter().copied().filter(|&id| id != osd).collect();
            prop_assert_eq!(&new.up, &up);
            check_mapping(&down_map, &pool, new)?;
        }
    }

    /// Growing pg_num by one splits exactly one PG: an object either stays or moves to the
    /// new PG, and then it came from `new - next_power_of_two(pg_num + 1) / 2`.
    #[test]
    fn stable_mod_splits(x in any::<u32>(), pg_num in 1u32..(1 << 20)) {
        let old = stable_mod(x, pg_num, pg_num_mask(pg_num));
        let new = stable_mod(x, pg_num + 1, pg_num_mask(pg_num + 1));
        prop_assert!(old < pg_num && new <= pg_num);
        if new != old {
            prop_assert_eq!(new, pg_num);
            prop_assert_eq!(old, pg_num - (pg_num + 1).next_power_of_two() / 2);
        }
    }
}

#[test]
fn oversized_pool_is_capped_by_failure_domains() {
    let map = common::golden_map();
    // 4 hosts; 10 eligible OSDs (osd.4 is out, osd.10 weighs 0).
    let host_pool = common::pool(9, u32::MAX, 4, FailureDomain::Host);
    let osd_pool = common::pool(9, u32::MAX, 4, FailureDomain::Osd);
    for seed in 0..4 {
        assert_eq!(map_pg(&map, &host_pool, PgId::new(9, seed)).raw.len(), 4);
        assert_eq!(map_pg(&map, &osd_pool, PgId::new(9, seed)).raw.len(), 10);
    }
}

#[test]
fn empty_and_zero_size_maps_give_empty_mappings() {
    let empty = common::build_map(0, &[]);
    let pool = common::pool(1, 3, 4, FailureDomain::Host);
    assert_eq!(map_pg(&empty, &pool, PgId::new(1, 0)), PgMapping::default());
    let zero = common::pool(1, 0, 4, FailureDomain::Osd);
    assert_eq!(
        map_pg(&common::golden_map(), &zero, PgId::new(1, 0)),
        PgMapping::default()
    );
}
