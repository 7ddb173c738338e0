//! Messages of the OSD protocol: client operations to a PG's primary, and replica
//! operations from the primary to the other OSDs of the acting set.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blockdata::BlockData;
use crate::error::StoreError;
use crate::map::WriteGuard;

/// Bound for OSD connections: the largest I/O plus headroom for the message around it.
pub const OSD_MAX_FRAME_BYTES: usize = 32 << 20;

/// Version of a mutation: (map epoch when the primary ordered it, sequence in the PG).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ObjVersion {
    pub epoch: u64,
    pub seq: u64,
}

/// A PG: pool id and seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pg {
    pub pool: u32,
    pub seed: u32,
}

/// Where a PG's primary is in its interval, as reported to the monitors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PgPhase {
    /// Fewer than min_size OSDs up: no I/O.
    Inactive,
    /// Agreeing on the newest PG contents (log heads) before serving I/O.
    Peering,
    /// Serving I/O while bringing OSDs of the acting set up to date from the PG log.
    Recovering,
    /// Serving I/O, clean.
    Active,
    /// Serving I/O while copying the PG to an OSD by comparing listings.
    Backfilling,
    /// Recovery waits: `norecover` is set.
    RecoveryWait,
    /// Backfill waits: `nobackfill` is set.
    BackfillWait,
    /// No OSD of the acting set holds a complete copy: no I/O until one returns.
    Incomplete,
    /// No OSD of the PG's last active set is here: acknowledged writes may be only on
    /// OSDs that are down, so no I/O until one returns (or is declared lost).
    Down,
}

/// What one OSD's copy of a PG can be trusted for; persisted with the copy and reported in
/// peering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgCopyState {
    /// False while a recovery into this copy is unfinished: its log head then says nothing
    /// about which objects it holds, and it is never the authoritative copy.
    pub complete: bool,
    /// This copy holds everything up to this version, and its log is a full history only
    /// of what came after it (a recovery writes objects, not the log entries between).
    pub log_from: Option<ObjVersion>,
}

impl Default for PgCopyState {
    fn default() -> Self {
        PgCopyState {
            complete: true,
            log_from: None,
        }
    }
}

/// One PG's phase as its primary reports it, with the map epoch the primary saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgReport {
    pub pg: Pg,
    pub phase: PgPhase,
    pub epoch: u64,
    /// While recovering: object copies still to write or remove.
    pub objects_left: u64,
    /// Of those, copies the PG does not need for its redundancy: the acting set already
    /// holds `size` complete copies of the object (a remapped PG filling a new OSD).
    /// The rest are degraded.
    pub misplaced: u64,
}

/// A mutation, as the primary orders it and the replicas apply it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    Write {
        offset: u64,
        /// With its block crcs once it has come through a frame (see [`BlockData`]).
        data: BlockData,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Delete,
}

/// A client operation on one object (or, for `List`, on the whole PG).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientOpKind {
    Mutate(Mutation),
    Read {
        offset: u64,
        len: u32,
    },
    Stat,
    /// The allocated ranges of the object within offset..offset+len.
    Allocated {
        offset: u64,
        len: u64,
    },
    List,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsdRequest {
    /// From a client to the PG's primary. `map_epoch` is the client's map; `guard`, on
    /// writes to a locked image, names the lock generation the writer holds.
    Client {
        map_epoch: u64,
        pg: Pg,
        object: String,
        op: ClientOpKind,
        guard: Option<WriteGuard>,
    },
    /// From the primary to an OSD of the acting set: apply this mutation at this version.
    Replica {
        map_epoch: u64,
        /// The sending primary: a receiver with a newer map refuses a primary it does not
        /// know as the PG's primary.
        from: u32,
        pg: Pg,
        object: String,
        version: ObjVersion,
        mutation: Mutation,
    },
    /// From a primary to another OSD of the acting set: a range of its copy of an object,
    /// checksums verified, to repair a damaged local copy.
    Fetch {
        pg: Pg,
        object: String,
        offset: u64,
        len: u32,
    },
    /// Peering: the newest version in this OSD's log of the PG.
    PgHead { pg: Pg },
    /// Peering: every object of the PG on this OSD, with its version.
    PgList { pg: Pg },
    /// Recovery: record what this OSD's copy of the PG can be trusted for (durable when
    /// answered). From the PG's primary only.
    PgMark {
        map_epoch: u64,
        from: u32,
        pg: Pg,
        state: PgCopyState,
    },
    /// From an OSD holding a copy of a PG it no longer serves, to the PG's primary: may
    /// that copy go? Yes once the PG is active+clean without it.
    PgStray { map_epoch: u64, from: u32, pg: Pg },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjStat {
    pub size: u64,
    pub version: ObjVersion,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsdResponse {
    /// A mutation is durable on the whole acting set (or, for a replica op, here).
    Committed {
        version: ObjVersion,
    },
    /// With the block crcs the OSD verified the data against, when it read whole blocks.
    Data(BlockData),
    Stat(Option<ObjStat>),
    /// Answer to `Allocated`: (offset, length) ranges; None if the object does not exist.
    Extents(Option<Vec<(u64, u64)>>),
    Listed(Vec<String>),
    /// Answer to `Fetch`: the object's size and version, and the requested bytes.
    Fetched {
        size: u64,
        version: ObjVersion,
        #[serde(with = "crate::wire::shared_bytes")]
        data: Bytes,
    },
    /// Answer to `PgHead`: the newest version in the copy's log, and its state.
    Head {
        head: Option<ObjVersion>,
        state: PgCopyState,
    },
    /// Answer to `PgMark`.
    Marked,
    /// Answer to `PgStray`: whether the asker may remove its copy.
    Stray {
        remove: bool,
    },
    Objects(Vec<(String, ObjVersion)>),
    /// The receiver is not this PG's primary at `epoch`: get a newer map and resend.
    NotPrimary {
        epoch: u64,
    },
    Error(StoreError),
}

/// What a PG log entry records about a mutation (the data itself is in the object).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogOp {
    Write { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Delete,
}

/// One entry of a PG's log: which object changed, how, at which version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgLogEntry {
    pub version: ObjVersion,
    pub object: String,
    pub op: LogOp,
}
