//! PGs to OSDs: a flat straw2 ranking with failure-domain separation.
//!
//! Every crush-eligible OSD (in, weight > 0) draws `log(u) / weight` for the PG, where `u`
//! is a uniform hash of (pool, pg seed, osd). The draws are an exponential race, so the
//! best draw falls on each OSD with probability exactly proportional to its weight
//! (straw2). The OSDs are ranked by draw and taken greedily, skipping any whose failure
//! domain is already used, until the pool's size is reached.
//!
//! Why not Ceph's hierarchical descent (straw2 over hosts, then over the chosen host's
//! OSDs)? Descent ties an OSD's fate to its host's aggregate weight: when one OSD of a
//! 4-OSD host leaves, the host's weight drops and PGs on the *other* three OSDs of that
//! host move too (≈1.7x the optimal movement). A flat ranking has no aggregate weights:
//! removing an OSD only changes the PGs that held it, and each of those gains exactly one
//! new replica. See `docs/placement.md` for the numbers.
//!
//! Down vs out: only eligibility (in and weight > 0) enters the ranking. A down-but-in OSD
//! keeps its place in the raw set and leaves a hole in the up set (the PG is degraded but
//! nothing moves), exactly as in Ceph; marking it out is what redraws. That is what makes
//! the `noout` flag meaningful during maintenance.

use std::collections::BTreeMap;

use store_types::map::{ClusterMap, CrushWeight, FailureDomain, OsdId, OsdInfo, Pool, PoolId};

use crate::fixed_log::{log2_fixed, LOG2_ONE};
use crate::pg::PgId;

/// Seed of the straw2 hash. Fixed forever: changing it moves every PG. ("crush_v2" in ASCII.)
pub const PLACEMENT_HASH_SEED: u64 = 0x6372_7573_685f_7632;

/// Bits of the uniform draw taken from the hash.
const DRAW_BITS: u32 = 48;

/// xxh64 (seed [`PLACEMENT_HASH_SEED`]) of the 12 bytes `pool_id: u32 LE, pg_seed: u32 LE,
/// osd_id: u32 LE`.
///
/// The encoding is explicit so the result cannot depend on the host's byte order or a
/// struct layout. The hash is the `xxhash-rust` crate's XXH64: no hash of our own, and the
/// golden tests freeze its values.
pub fn placement_hash(pool: PoolId, pg_seed: u32, osd: OsdId) -> u64 {
    let mut bytes = [0u8; 12];
    bytes[0..4].copy_from_slice(&pool.to_le_bytes());
    bytes[4..8].copy_from_slice(&pg_seed.to_le_bytes());
    bytes[8..12].copy_from_slice(&osd.to_le_bytes());
    xxhash_rust::xxh64::xxh64(&bytes, PLACEMENT_HASH_SEED)
}

/// `floor(2^63 / weight)`: the draw multiplies by this instead of dividing by the weight,
/// so the hot loop has no division. Relative error ≤ weight / 2^63 (2^-47 at weight 1.0),
/// finer than the log itself. Weight 0 has no reciprocal (such OSDs are not eligible).
fn weight_reciprocal(weight: CrushWeight) -> u64 {
    (1u64 << 63) / u64::from(weight.max(1))
}

/// The straw2 draw of one OSD for one PG: `log2(u / 2^48) * 2^32 * floor(2^63 / weight)`,
/// with `u = (placement_hash >> 16) + 1` uniform in `[1, 2^48]`. Always ≤ 0; the highest
/// draw wins. A weight of 0 never wins (`i128::MIN`).
pub fn straw2_draw(pool: PoolId, pg_seed: u32, osd: OsdId, weight: CrushWeight) -> i128 {
    if weight == 0 {
        return i128::MIN;
    }
    draw_with_reciprocal(pool, pg_seed, osd, weight_reciprocal(weight))
}

fn draw_with_reciprocal(pool: PoolId, pg_seed: u32, osd: OsdId, reciprocal: u64) -> i128 {
    let u = (placement_hash(pool, pg_seed, osd) >> (64 - DRAW_BITS)) + 1;
    // log2(u / 2^48) in Q32: in [-48, 0], so |log| < 2^38 and the product < 2^101.
    let log_q32 = log2_fixed(u) - i64::from(DRAW_BITS) * LOG2_ONE;
    i128::from(log_q32) * i128::from(reciprocal)
}

/// Where one PG lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgMapping {
    /// The CRUSH result, best first: in OSDs only, one per failure domain. Shorter than the
    /// pool size when there are too few failure domains. Down OSDs stay here.
    pub raw: Vec<OsdId>,
    /// `raw` without its down OSDs, order kept. Shorter than `raw` means degraded.
    pub up: Vec<OsdId>,
    /// The OSDs that serve the PG, primary first: the up OSDs of its `pg_temp` entry while
    /// it has one (the PG is remapped: OSDs that held it keep serving while `up` fills),
    /// else `up`.
    pub acting: Vec<OsdId>,
    /// The first acting OSD, which serves the PG; `None` when no replica is up.
    pub primary: Option<OsdId>,
}

impl PgMapping {
    /// Whether the PG is served by other OSDs than CRUSH names (a `pg_temp` entry).
    pub fn remapped(&self) -> bool {
        self.acting != self.up
    }
}

/// An eligible OSD, as the hot loop needs it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: OsdId,
    /// `weight_reciprocal(weight)`, computed once per mapper.
    reciprocal: u64,
    up: bool,
}

/// A candidate's draw for the PG being mapped.
#[derive(Clone, Copy, Debug)]
struct Ranked {
    draw: i128,
    id: OsdId,
    up: bool,
}

impl Ranked {
    /// Ranking order: higher draw first, ties to the smaller OSD id.
    fn beats(&self, other: &Ranked) -> bool {
        self.draw > other.draw || (self.draw == other.draw && self.id < other.id)
    }
}

/// The per-pool precomputation: eligible OSDs grouped by failure domain. Build it once and
/// map many PGs with it; it borrows nothing, so it is a snapshot of the map it came from.
#[derive(Clone, Debug)]
pub struct PoolMapper {
    pool: PoolId,
    size: usize,
    /// Eligible OSDs, contiguous per failure domain, each domain sorted by OSD id.
    candidates: Vec<Candidate>,
    /// End index (exclusive) in `candidates` of each failure domain.
    domain_ends: Vec<usize>,
    /// The pool's `pg_temp` entries, down OSDs left out (entries left empty dropped).
    temp: BTreeMap<u32, Vec<OsdId>>,
}

impl PoolMapper {
    pub fn new(map: &ClusterMap, pool: &Pool) -> Self {
        // `map.osds` iterates in id order, so each domain ends up sorted by id.
        let mut eligible: Vec<(&OsdInfo, CrushWeight)> = map
            .osds
            .values()
            .filter_map(|o| crush_standing(map, o).map(|w| (o, w)))
            .collect();
        if pool.failure_domain == FailureDomain::Host {
            // Stable sort: ids stay ascending within a host. `OsdInfo::host` names the
            // host bucket holding the OSD; the monitors keep the two consistent.
            eligible.sort_by(|a, b| a.0.host.cmp(&b.0.host));
        }
        let domain_ends = domain_ends(&eligible, pool.failure_domain);
        let candidates = eligible
            .iter()
            .map(|(o, weight)| Candidate {
                id: o.id,
                reciprocal: weight_reciprocal(*weight),
                up: o.up,
            })
            .collect();
        let is_up = |id: &OsdId| map.osds.get(id).is_some_and(|o| o.up);
        let temp = map
            .pg_temp
            .get(&pool.id)
            .into_iter()
            .flatten()
            .map(|(seed, osds)| {
                (
                    *seed,
                    osds.iter().copied().filter(is_up).collect::<Vec<_>>(),
                )
            })
            .filter(|(_, osds)| !osds.is_empty())
            .collect();
        PoolMapper {
            pool: pool.id,
            size: pool.size as usize,
            candidates,
            domain_ends,
            temp,
        }
    }

    /// Number of failure domains holding at least one eligible OSD: the longest raw set.
    pub fn failure_domains(&self) -> usize {
        self.domain_ends.len()
    }

    /// Maps one PG of this pool by its seed.
    pub fn map_seed(&self, pg_seed: u32) -> PgMapping {
        let ranked = self.rank(pg_seed);
        let raw: Vec<OsdId> = ranked.iter().map(|r| r.id).collect();
        let up: Vec<OsdId> = ranked.iter().filter(|r| r.up).map(|r| r.id).collect();
        let acting = self.temp.get(&pg_seed).unwrap_or(&up).clone();
        let primary = acting.first().copied();
        PgMapping {
            raw,
            up,
            acting,
            primary,
        }
    }

    /// The best OSD of each failure domain, then the best `size` of those, best first.
    /// Equivalent to ranking every OSD and taking greedily while skipping used domains
    /// (a domain is first met at its best OSD), without sorting all N OSDs.
    fn rank(&self, pg_seed: u32) -> Vec<Ranked> {
        // A pool size beyond the number of domains (even a corrupt u32::MAX) cannot be filled.
        let mut top: Vec<Ranked> = Vec::with_capacity(self.size.min(self.domain_ends.len()) + 1);
        let mut start = 0;
        for &end in &self.domain_ends {
            let best = self.best_in_domain(&self.candidates[start..end], pg_seed);
            offer(&mut top, best, self.size);
            start = end;
        }
        top
    }

    fn best_in_domain(&self, domain: &[Candidate], pg_seed: u32) -> Ranked {
        let mut best: Option<Ranked> = None;
        for c in domain {
            let r = Ranked {
                draw: draw_with_reciprocal(self.pool, pg_seed, c.id, c.reciprocal),
                id: c.id,
                up: c.up,
            };
            if best.is_none_or(|b| r.beats(&b)) {
                best = Some(r);
            }
        }
        // Invariant: `domain_ends` never produces an empty domain.
        best.expect("failure domain without candidates")
    }
}

/// The CRUSH weight an OSD draws with, None if it is not eligible: its own standing, or
/// the one held by `norebalance` while it is up (see [`ClusterMap::rebalance_hold`]).
pub fn crush_standing(map: &ClusterMap, o: &OsdInfo) -> Option<CrushWeight> {
    match &map.rebalance_hold {
        Some(hold) if o.up => hold
            .get(&o.id)
            .filter(|h| h.is_in && h.weight > 0)
            .map(|h| h.weight),
        _ => o.crush_eligible().then_some(o.weight),
    }
}

/// Where each failure domain ends in the (grouped) eligible list.
fn domain_ends(eligible: &[(&OsdInfo, CrushWeight)], failure_domain: FailureDomain) -> Vec<usize> {
    let mut ends = Vec::new();
    for i in 1..=eligible.len() {
        let boundary = i == eligible.len()
            || match failure_domain {
                FailureDomain::Osd => true,
                FailureDomain::Host => eligible[i].0.host != eligible[i - 1].0.host,
            };
        if boundary {
            ends.push(i);
        }
    }
    ends
}

/// Inserts `candidate` into the best-first list `top` if it belongs in the best `size`.
fn offer(top: &mut Vec<Ranked>, candidate: Ranked, size: usize) {
    if size == 0 {
        return;
    }
    if top.len() == size && !top.last().is_some_and(|worst| candidate.beats(worst)) {
        return;
    }
    let position = top
        .iter()
        .position(|r| candidate.beats(r))
        .unwrap_or(top.len());
    top.insert(position, candidate);
    top.truncate(size);
}

/// Maps one PG. `pg.pool` must be `pool.id`. For many PGs of one pool, build a
/// [`PoolMapper`] once (or use [`pool_mappings`]) instead: this rebuilds it per call.
pub fn map_pg(map: &ClusterMap, pool: &Pool, pg: PgId) -> PgMapping {
    debug_assert_eq!(pg.pool, pool.id, "PG {pg} is not in pool {}", pool.id);
    PoolMapper::new(map, pool).map_seed(pg.seed)
}

/// The mapping of every PG of a pool, indexed by seed.
pub fn pool_mappings(map: &ClusterMap, pool: &Pool) -> Vec<PgMapping> {
    let mapper = PoolMapper::new(map, pool);
    (0..pool.pg_num).map(|seed| mapper.map_seed(seed)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranked(draw: i128, id: OsdId) -> Ranked {
        Ranked { draw, id, up: true }
    }

    #[test]
    fn offer_keeps_best_first_and_bounded() {
        let mut top = Vec::new();
        for (draw, id) in [(-5, 1), (-1, 2), (-3, 3), (-1, 0), (-9, 4), (-2, 5)] {
            offer(&mut top, ranked(draw, id), 3);
        }
        let ids: Vec<_> = top.iter().map(|r| r.id).collect();
        // -1 (id 0 wins the tie), -1 (id 2), -2.
        assert_eq!(ids, vec![0, 2, 5]);
    }

    #[test]
    fn offer_with_zero_size_keeps_nothing() {
        let mut top = Vec::new();
        offer(&mut top, ranked(0, 1), 0);
        assert!(top.is_empty());
    }

    #[test]
    fn draw_is_non_positive_and_inversely_proportional_to_weight() {
        for osd in 0..100 {
            let light = straw2_draw(1, 7, osd, 0x10000);
            let heavy = straw2_draw(1, 7, osd, 3 * 0x10000);
            assert!(light < 0 && heavy < 0);
            // Same hash, 3x weight: a third of the draw, to within 2^-40 relative.
            assert!((heavy * 3 - light).abs() << 40 <= light.abs(), "osd {osd}");
        }
        assert_eq!(straw2_draw(1, 7, 3, 0), i128::MIN);
    }
}
