//! Placement: where data lives, computed rather than looked up.
//!
//! This crate owns the two pure functions every client, OSD and monitor must agree on
//! bit for bit, and the simulation that shows what they do to a cluster:
//!
//! - object → PG ([`object_to_pg`]): an xxh64 hash of the object name folded onto the
//!   pool's `pg_num` with Ceph's [`stable_mod`], so raising `pg_num` splits PGs instead of
//!   reshuffling every object;
//! - PG → OSDs ([`map_pg`], [`PoolMapper`], [`pool_mappings`]): a flat straw2 ranking of the
//!   crush-eligible OSDs with one replica per failure domain, giving the raw CRUSH set, the
//!   up set and the primary;
//! - [`sim`]: an in-memory cluster for `storectl crush test` that measures utilisation and
//!   data movement against the theoretical optimum.
//!
//! Everything here is deterministic integer arithmetic over a [`store_types::map::ClusterMap`]:
//! no floats in the mapping (see [`fixed_log`]), no clocks, no randomness, no I/O. It must
//! not know about sockets, storage engines, consensus or PG health: callers hand it a map
//! and get placements back. See `docs/placement.md` for the design and its measurements.

pub mod crush;
pub mod fixed_log;
pub mod pg;
pub mod sim;

pub use crush::{
    map_pg, placement_hash, pool_mappings, straw2_draw, PgMapping, PoolMapper, PLACEMENT_HASH_SEED,
};
pub use fixed_log::{log2_fixed, LOG2_FRAC_BITS, LOG2_ONE};
pub use pg::{
    object_hash, object_to_pg, pg_num_mask, pool_pgs, stable_mod, ParsePgIdError, PgId,
    OBJECT_HASH_SEED,
};
