//! The in-memory simulation behind `storectl crush test`: build a uniform cluster, map
//! every PG, report the distribution and, for a change, how much data it moves compared
//! with the minimum any placement could achieve. Pure computation; the CLI prints.

use std::collections::{BTreeMap, BTreeSet};

use store_types::map::{
    ClusterMap, CrushWeight, FailureDomain, HostBucket, OsdId, OsdInfo, Pool, PoolId, WEIGHT_ONE,
};

use crate::crush::{pool_mappings, PgMapping};

/// The id of the simulation's single pool.
pub const SIM_POOL_ID: PoolId = 1;

/// Upper bounds that keep a mistyped command from eating the machine: the simulation maps
/// every PG against every OSD, so its cost is `pg_num × osds` straw2 draws per map.
pub const MAX_SIM_OSDS: u32 = 100_000;
pub const MAX_SIM_PG_NUM: u32 = 1 << 22;

/// The cluster to simulate: `hosts × osds_per_host` OSDs of weight 1.0, all up and in,
/// and one pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimSpec {
    pub hosts: u32,
    pub osds_per_host: u32,
    pub pg_num: u32,
    pub size: u32,
    pub failure_domain: FailureDomain,
}

/// The change whose data movement to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimChange {
    None,
    /// Purge an OSD from the hierarchy. The report also says what marking it out moves.
    RemoveOsd(OsdId),
    /// Add one more host of `osds_per_host` OSDs, with the next free ids.
    AddHost,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("the simulated cluster needs at least one host")]
    NoHosts,
    #[error("each simulated host needs at least one OSD")]
    NoOsdsPerHost,
    #[error("pg_num must be at least 1")]
    NoPgs,
    #[error("pool size must be at least 1")]
    ZeroSize,
    #[error(
        "{hosts} hosts × {osds_per_host} OSDs is more than the simulation allows ({max} OSDs)"
    )]
    TooManyOsds {
        hosts: u32,
        osds_per_host: u32,
        max: u32,
    },
    #[error("pg_num {pg_num} is more than the simulation allows ({max})")]
    TooManyPgs { pg_num: u32, max: u32 },
    #[error("osd.{osd} does not exist: the simulated OSDs are osd.0 to osd.{last}")]
    UnknownOsd { osd: OsdId, last: OsdId },
}

/// One OSD's share of the replica placements.
#[derive(Clone, Debug, PartialEq)]
pub struct OsdUsage {
    pub id: OsdId,
    pub host: String,
    pub weight: CrushWeight,
    /// Replica slots (PG, OSD) placed on this OSD.
    pub placements: u64,
    /// `total placements × weight / total weight`.
    pub expected: f64,
}

/// How evenly one map spreads the placements over its eligible OSDs.
#[derive(Clone, Debug, PartialEq)]
pub struct Distribution {
    /// Eligible OSDs (in, weight > 0), by id.
    pub osds: Vec<OsdUsage>,
    pub pgs: u32,
    /// Replica placements made: `pgs × size` unless some PGs are undersized.
    pub total_placements: u64,
    /// PGs whose raw set is shorter than the pool size (too few failure domains).
    pub undersized_pgs: u32,
    pub min_placements: u64,
    pub max_placements: u64,
    pub mean_placements: f64,
    /// Population standard deviation of the per-OSD placement counts.
    pub stddev_placements: f64,
    /// `max |placements - expected| / expected` over the OSDs: 0.1 means some OSD is 10%
    /// away from its weight share.
    pub max_deviation: f64,
}

/// The data a change moves.
#[derive(Clone, Debug, PartialEq)]
pub struct Movement {
    /// Placements in the new mapping whose OSD did not hold that PG before.
    pub moved_placements: u64,
    /// All placements in the new mapping.
    pub total_placements: u64,
    /// PGs with at least one moved placement.
    pub pgs_changed: u32,
    /// `moved_placements / total_placements`.
    pub moved_fraction: f64,
    /// The least any placement could move: removed weight / old total weight, or added
    /// weight / new total weight.
    pub optimal_fraction: f64,
    /// `moved_fraction / optimal_fraction`; 1.0 is perfect.
    pub ratio_to_optimal: f64,
}

/// The cluster after a change.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeOutcome {
    pub distribution: Distribution,
    pub movement: Movement,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    pub spec: SimSpec,
    pub change: SimChange,
    /// The cluster as specified.
    pub before: Distribution,
    /// After the change; `None` for [`SimChange::None`].
    pub after: Option<ChangeOutcome>,
    /// For [`SimChange::RemoveOsd`]: the same OSD marked out instead of purged.
    pub if_marked_out: Option<ChangeOutcome>,
}

/// Runs the simulation. Cost: `pg_num × osds` straw2 draws per map (two or three maps).
pub fn simulate(spec: SimSpec, change: SimChange) -> Result<SimReport, SimError> {
    let before_map = build_map(spec)?;
    let pool = sim_pool(&before_map);
    let before_pgs = pool_mappings(&before_map, pool);
    let before = distribution(&before_map, pool, &before_pgs);
    let (after, if_marked_out) = match change {
        SimChange::None => (None, None),
        SimChange::RemoveOsd(osd) => {
            check_osd_exists(&before_map, osd)?;
            let purged = outcome(&before_map, &before_pgs, &purge_osd(&before_map, osd));
            let marked_out = outcome(&before_map, &before_pgs, &mark_out(&before_map, osd));
            (Some(purged), Some(marked_out))
        }
        SimChange::AddHost => {
            let grown = outcome(&before_map, &before_pgs, &add_host(&before_map, spec));
            (Some(grown), None)
        }
    };
    Ok(SimReport {
        spec,
        change,
        before,
        after,
        if_marked_out,
    })
}

/// The cluster map a spec describes: OSD ids `0..`, host `hostN` holding OSDs
/// `N*osds_per_host..`, weight 1.0, all up and in, one pool with id [`SIM_POOL_ID`].
pub fn build_map(spec: SimSpec) -> Result<ClusterMap, SimError> {
    validate(spec)?;
    let mut map = ClusterMap::new("simulation");
    for _ in 0..spec.hosts {
        push_host(&mut map, spec.osds_per_host);
    }
    let pool = Pool {
        id: SIM_POOL_ID,
        name: "sim".to_string(),
        size: spec.size,
        // Ceph's default: a majority of the replicas.
        min_size: spec.size - spec.size / 2,
        pg_num: spec.pg_num,
        failure_domain: spec.failure_domain,
        created_epoch: 0,
    };
    map.pools.insert(SIM_POOL_ID, pool);
    map.next_pool_id = SIM_POOL_ID + 1;
    Ok(map)
}

fn validate(spec: SimSpec) -> Result<(), SimError> {
    if spec.hosts == 0 {
        return Err(SimError::NoHosts);
    }
    if spec.osds_per_host == 0 {
        return Err(SimError::NoOsdsPerHost);
    }
    if spec.pg_num == 0 {
        return Err(SimError::NoPgs);
    }
    if spec.size == 0 {
        return Err(SimError::ZeroSize);
    }
    let too_many = SimError::TooManyOsds {
        hosts: spec.hosts,
        osds_per_host: spec.osds_per_host,
        max: MAX_SIM_OSDS,
    };
    // One more host must still fit, for SimChange::AddHost.
    let with_extra_host = spec.hosts.checked_add(1).ok_or(too_many.clone())?;
    match with_extra_host.checked_mul(spec.osds_per_host) {
        Some(n) if n <= MAX_SIM_OSDS => {}
        _ => return Err(too_many),
    }
    if spec.pg_num > MAX_SIM_PG_NUM {
        return Err(SimError::TooManyPgs {
            pg_num: spec.pg_num,
            max: MAX_SIM_PG_NUM,
        });
    }
    Ok(())
}

/// Appends host `host{n}` with `osds` new OSDs, keeping the CRUSH buckets and the OSD
/// entries consistent as the monitors would.
fn push_host(map: &mut ClusterMap, osds: u32) {
    let name = format!("host{}", map.crush.hosts.len());
    let first: OsdId = map.next_osd_id;
    let ids: Vec<OsdId> = (first..first + osds).collect();
    for &id in &ids {
        map.osds.insert(id, sim_osd(id, &name));
    }
    let bucket = HostBucket {
        id: map.crush.next_bucket_id,
        name: name.clone(),
        osds: ids,
    };
    map.crush.hosts.insert(name, bucket);
    map.crush.next_bucket_id -= 1;
    map.next_osd_id = first + osds;
}

fn sim_osd(id: OsdId, host: &str) -> OsdInfo {
    OsdInfo {
        id,
        uuid: format!("sim-osd-{id}"),
        addr: String::new(),
        host: host.to_string(),
        weight: WEIGHT_ONE,
        up: true,
        is_in: true,
        up_from: 0,
        down_stamp_ms: None,
    }
}

fn sim_pool(map: &ClusterMap) -> &Pool {
    // Invariant: build_map always inserts the pool, and changes never remove it.
    map.pools.get(&SIM_POOL_ID).expect("simulation pool")
}

fn check_osd_exists(map: &ClusterMap, osd: OsdId) -> Result<(), SimError> {
    if map.osds.contains_key(&osd) {
        Ok(())
    } else {
        Err(SimError::UnknownOsd {
            osd,
            last: map.next_osd_id.saturating_sub(1),
        })
    }
}

fn purge_osd(map: &ClusterMap, osd: OsdId) -> ClusterMap {
    let mut map = map.clone();
    map.osds.remove(&osd);
    for host in map.crush.hosts.values_mut() {
        host.osds.retain(|&id| id != osd);
    }
    map
}

fn mark_out(map: &ClusterMap, osd: OsdId) -> ClusterMap {
    let mut map = map.clone();
    if let Some(info) = map.osds.get_mut(&osd) {
        info.is_in = false;
    }
    map
}

fn add_host(map: &ClusterMap, spec: SimSpec) -> ClusterMap {
    let mut map = map.clone();
    push_host(&mut map, spec.osds_per_host);
    map
}

fn outcome(old_map: &ClusterMap, old_pgs: &[PgMapping], new_map: &ClusterMap) -> ChangeOutcome {
    let pool = sim_pool(new_map);
    let new_pgs = pool_mappings(new_map, pool);
    let distribution = distribution(new_map, pool, &new_pgs);
    let optimal_fraction = optimal_fraction(old_map, new_map);
    let movement = movement(old_pgs, &new_pgs, optimal_fraction);
    ChangeOutcome {
        distribution,
        movement,
    }
}

/// Total weight of the crush-eligible OSDs.
fn eligible_weight(map: &ClusterMap) -> u64 {
    map.osds
        .values()
        .filter(|o| o.crush_eligible())
        .map(|o| u64::from(o.weight))
        .sum()
}

/// The fraction of data that must move at minimum: what left over the old total, or what
/// arrived over the new total.
fn optimal_fraction(old_map: &ClusterMap, new_map: &ClusterMap) -> f64 {
    let old_weight = eligible_weight(old_map);
    let new_weight = eligible_weight(new_map);
    if new_weight >= old_weight {
        ratio((new_weight - old_weight) as f64, new_weight as f64)
    } else {
        ratio((old_weight - new_weight) as f64, old_weight as f64)
    }
}

/// `numerator / denominator`, 0 when the denominator is 0 (nothing to compare against).
fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        0.0
    } else {
        numerator / denominator
    }
}

fn movement(old_pgs: &[PgMapping], new_pgs: &[PgMapping], optimal_fraction: f64) -> Movement {
    let mut moved_placements = 0u64;
    let mut total_placements = 0u64;
    let mut pgs_changed = 0u32;
    for (old, new) in old_pgs.iter().zip(new_pgs) {
        let old_set: BTreeSet<OsdId> = old.raw.iter().copied().collect();
        let moved = new.raw.iter().filter(|id| !old_set.contains(id)).count() as u64;
        moved_placements += moved;
        total_placements += new.raw.len() as u64;
        pgs_changed += u32::from(moved > 0);
    }
    let moved_fraction = ratio(moved_placements as f64, total_placements as f64);
    Movement {
        moved_placements,
        total_placements,
        pgs_changed,
        moved_fraction,
        optimal_fraction,
        ratio_to_optimal: ratio(moved_fraction, optimal_fraction),
    }
}

fn distribution(map: &ClusterMap, pool: &Pool, pgs: &[PgMapping]) -> Distribution {
    let mut counts: BTreeMap<OsdId, u64> = BTreeMap::new();
    for pg in pgs {
        for &id in &pg.raw {
            *counts.entry(id).or_default() += 1;
        }
    }
    let total_placements: u64 = counts.values().sum();
    let total_weight = eligible_weight(map) as f64;
    let osds: Vec<OsdUsage> = map
        .osds
        .values()
        .filter(|o| o.crush_eligible())
        .map(|o| OsdUsage {
            id: o.id,
            host: o.host.clone(),
            weight: o.weight,
            placements: counts.get(&o.id).copied().unwrap_or(0),
            expected: ratio(total_placements as f64 * f64::from(o.weight), total_weight),
        })
        .collect();
    let undersized_pgs = pgs
        .iter()
        .filter(|pg| pg.raw.len() < pool.size as usize)
        .count() as u32;
    summarise(osds, pgs.len() as u32, total_placements, undersized_pgs)
}

fn summarise(
    osds: Vec<OsdUsage>,
    pgs: u32,
    total_placements: u64,
    undersized_pgs: u32,
) -> Distribution {
    let n = osds.len() as f64;
    let mean = ratio(total_placements as f64, n);
    let variance = ratio(
        osds.iter()
            .map(|o| (o.placements as f64 - mean).powi(2))
            .sum::<f64>(),
        n,
    );
    let max_deviation = osds
        .iter()
        .map(|o| ratio((o.placements as f64 - o.expected).abs(), o.expected))
        .fold(0.0, f64::max);
    Distribution {
        min_placements: osds.iter().map(|o| o.placements).min().unwrap_or(0),
        max_placements: osds.iter().map(|o| o.placements).max().unwrap_or(0),
        mean_placements: mean,
        stddev_placements: variance.sqrt(),
        max_deviation,
        osds,
        pgs,
        total_placements,
        undersized_pgs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hosts: u32, osds_per_host: u32) -> SimSpec {
        SimSpec {
            hosts,
            osds_per_host,
            pg_num: 256,
            size: 3,
            failure_domain: FailureDomain::Host,
        }
    }

    #[test]
    fn rejects_invalid_specs() {
        let ok = spec(3, 2);
        let cases = [
            (SimSpec { hosts: 0, ..ok }, SimError::NoHosts),
            (
                SimSpec {
                    osds_per_host: 0,
                    ..ok
                },
                SimError::NoOsdsPerHost,
            ),
            (SimSpec { pg_num: 0, ..ok }, SimError::NoPgs),
            (SimSpec { size: 0, ..ok }, SimError::ZeroSize),
            (
                SimSpec {
                    pg_num: MAX_SIM_PG_NUM + 1,
                    ..ok
                },
                SimError::TooManyPgs {
                    pg_num: MAX_SIM_PG_NUM + 1,
                    max: MAX_SIM_PG_NUM,
                },
            ),
        ];
        for (bad, expected) in cases {
            assert_eq!(simulate(bad, SimChange::None).unwrap_err(), expected);
        }
        let huge = SimSpec {
            hosts: u32::MAX,
            osds_per_host: 2,
            ..ok
        };
        assert!(matches!(
            simulate(huge, SimChange::None),
            Err(SimError::TooManyOsds { .. })
        ));
        assert_eq!(
            simulate(ok, SimChange::RemoveOsd(6)).unwrap_err(),
            SimError::UnknownOsd { osd: 6, last: 5 }
        );
    }

    #[test]
    fn builds_a_consistent_map() {
        let map = build_map(spec(3, 2)).unwrap();
        assert_eq!(map.osds.len(), 6);
        assert_eq!(map.crush.hosts["host2"].osds, vec![4, 5]);
        assert_eq!(map.osds[&5].host, "host2");
        assert!(map
            .osds
            .values()
            .all(|o| o.up && o.is_in && o.weight == WEIGHT_ONE));
        assert_eq!(map.pools[&SIM_POOL_ID].pg_num, 256);
    }

    #[test]
    fn no_change_reports_only_the_distribution() {
        let report = simulate(spec(4, 2), SimChange::None).unwrap();
        assert!(report.after.is_none() && report.if_marked_out.is_none());
        assert_eq!(report.before.total_placements, 256 * 3);
        assert_eq!(report.before.osds.len(), 8);
        assert_eq!(report.before.undersized_pgs, 0);
        let sum: u64 = report.before.osds.iter().map(|o| o.placements).sum();
        assert_eq!(sum, 256 * 3);
        assert!((report.before.mean_placements - 96.0).abs() < 1e-9);
    }

    #[test]
    fn too_few_hosts_are_reported_as_undersized() {
        let report = simulate(spec(2, 3), SimChange::None).unwrap();
        assert_eq!(report.before.undersized_pgs, 256);
        assert_eq!(report.before.total_placements, 256 * 2);
    }

    #[test]
    fn purge_and_out_move_the_same_placements() {
        let report = simulate(spec(5, 2), SimChange::RemoveOsd(3)).unwrap();
        let purged = report.after.unwrap();
        let out = report.if_marked_out.unwrap();
        assert_eq!(purged.movement, out.movement);
        assert!((purged.movement.optimal_fraction - 0.1).abs() < 1e-12);
        assert!(purged.distribution.osds.iter().all(|o| o.id != 3));
        // Everything that moved was on osd.3: one new placement per PG that held it.
        let on_removed = report
            .before
            .osds
            .iter()
            .find(|o| o.id == 3)
            .unwrap()
            .placements;
        assert_eq!(purged.movement.moved_placements, on_removed);
        assert_eq!(u64::from(purged.movement.pgs_changed), on_removed);
    }

    #[test]
    fn add_host_gives_new_ids_and_a_new_bucket() {
        let report = simulate(spec(4, 2), SimChange::AddHost).unwrap();
        let grown = report.after.unwrap();
        let ids: Vec<_> = grown.distribution.osds.iter().map(|o| o.id).collect();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        assert_eq!(grown.distribution.osds[9].host, "host4");
        assert!((grown.movement.optimal_fraction - 0.2).abs() < 1e-12);
        // A host holds at most one replica per PG, so each changed PG moved exactly one.
        assert_eq!(
            u64::from(grown.movement.pgs_changed),
            grown.movement.moved_placements
        );
    }
}
