//! Objects to placement groups: the first, cheap half of placement.

use std::fmt;
use std::str::FromStr;

use store_types::map::{Pool, PoolId};
use xxhash_rust::xxh64::xxh64;

/// Seed of the object-name hash. Fixed forever: changing it moves every object.
pub const OBJECT_HASH_SEED: u64 = 0;

/// A placement group: a pool and a seed in `0..pool.pg_num`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PgId {
    pub pool: PoolId,
    pub seed: u32,
}

impl PgId {
    pub fn new(pool: PoolId, seed: u32) -> Self {
        PgId { pool, seed }
    }
}

/// Ceph's spelling: the pool id in decimal, a dot, the seed in lowercase hex (`1.1f`).
impl fmt::Display for PgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}", self.pool, self.seed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PG id '{0}': expected <pool>.<hex seed>, e.g. 1.1f")]
pub struct ParsePgIdError(pub String);

impl FromStr for PgId {
    type Err = ParsePgIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParsePgIdError(s.to_string());
        let (pool, seed) = s.split_once('.').ok_or_else(bad)?;
        let pool = pool.parse::<PoolId>().map_err(|_| bad())?;
        let seed = u32::from_str_radix(seed, 16).map_err(|_| bad())?;
        Ok(PgId { pool, seed })
    }
}

/// Ceph's `ceph_stable_mod`: `x mod b` that stays stable while `b` grows.
///
/// `bmask` is `next_power_of_two(b) - 1`. Values whose masked hash is below `b` keep it;
/// the others fold onto the lower half. When `b` grows by one, only the hashes that were
/// folded from the new slot move, and they all came from `slot - (bmask + 1) / 2`: a PG
/// *splits* into itself and one child, instead of every object being reshuffled as with
/// a plain `%`.
pub fn stable_mod(x: u32, b: u32, bmask: u32) -> u32 {
    if x & bmask < b {
        x & bmask
    } else {
        x & (bmask >> 1)
    }
}

/// The mask [`stable_mod`] needs for `pg_num` PGs: `next_power_of_two(pg_num) - 1`.
pub fn pg_num_mask(pg_num: u32) -> u32 {
    // pg_num above 2^31 has no u32 power of two above it; all 32 bits are then significant.
    pg_num
        .checked_next_power_of_two()
        .map_or(u32::MAX, |p| p - 1)
}

/// The 32-bit hash of an object name that selects its PG: the low half of
/// `xxh64(name, seed 0)`.
pub fn object_hash(object_name: &str) -> u32 {
    xxh64(object_name.as_bytes(), OBJECT_HASH_SEED) as u32
}

/// The PG an object lives in. `pg_num` 0 is invalid for a pool; it maps everything to seed 0.
pub fn object_to_pg(pool: &Pool, object_name: &str) -> PgId {
    let seed = stable_mod(
        object_hash(object_name),
        pool.pg_num,
        pg_num_mask(pool.pg_num),
    );
    PgId {
        pool: pool.id,
        seed,
    }
}

/// Every PG of a pool, in seed order.
pub fn pool_pgs(pool: &Pool) -> impl Iterator<Item = PgId> + '_ {
    (0..pool.pg_num).map(move |seed| PgId {
        pool: pool.id,
        seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_pool_dot_hex_seed() {
        assert_eq!(PgId::new(1, 0x1f).to_string(), "1.1f");
        assert_eq!(PgId::new(12, 0).to_string(), "12.0");
        assert_eq!(PgId::new(3, 255).to_string(), "3.ff");
    }

    #[test]
    fn parse_round_trips_and_rejects_garbage() {
        let pg: PgId = "7.a3".parse().unwrap();
        assert_eq!(pg, PgId::new(7, 0xa3));
        assert_eq!(pg.to_string().parse::<PgId>().unwrap(), pg);
        for bad in ["", "1", "1.", ".1", "x.1", "1.g", "-1.1"] {
            assert!(bad.parse::<PgId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn stable_mod_matches_ceph() {
        // b = 12, bmask = 15: 0..=11 stay, 12..=15 fold to 4..=7.
        for x in 0..16 {
            let expected = if x < 12 { x } else { x - 8 };
            assert_eq!(stable_mod(x, 12, 15), expected, "x={x}");
        }
        // Power-of-two b is a plain mask.
        for x in [0u32, 7, 8, 1000, u32::MAX] {
            assert_eq!(stable_mod(x, 8, 7), x & 7);
        }
    }

    #[test]
    fn masks() {
        assert_eq!(pg_num_mask(1), 0);
        assert_eq!(pg_num_mask(8), 7);
        assert_eq!(pg_num_mask(12), 15);
        assert_eq!(pg_num_mask(4096), 4095);
        assert_eq!(pg_num_mask(u32::MAX), u32::MAX);
        assert_eq!(pg_num_mask(0), 0);
    }
}
