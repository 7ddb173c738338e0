//! Messages of the monitor protocol (clients, OSDs and monitors talking to a monitor).
//!
//! Every message travels inside a [`crate::wire::Frame`], whose header carries the protocol
//! version. Raft's own RPCs travel as opaque bytes ([`MonRequest::Raft`]) so that this crate
//! does not depend on the consensus library.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::map::{ClusterMap, FailureDomain, Flag, MonId, OsdId, PoolId, SessionId};

/// A change to the cluster map. Each one that changes something is one Raft entry and one
/// epoch. Validation happens when it is applied, so every monitor reaches the same verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapCommand {
    /// An OSD boots: registers (first time, gets an id) or is marked up again.
    OsdBoot {
        uuid: String,
        addr: String,
        host: String,
        weight: u32,
    },
    /// The leader's failure detector: OSDs whose heartbeats stopped.
    OsdMarkDown {
        ids: Vec<OsdId>,
        now_ms: u64,
    },
    /// Mark OSDs out (by the operator, or automatically after the down-out interval).
    OsdOut {
        ids: Vec<OsdId>,
    },
    OsdIn {
        ids: Vec<OsdId>,
    },
    /// Change an OSD's CRUSH weight (fixed point); 0 drains it like `out` but keeps it in.
    OsdReweight {
        id: OsdId,
        weight: u32,
    },
    /// Remove an OSD for good: from the map and the CRUSH hierarchy. Only a down, out OSD
    /// may be purged (the CLI checks safe-to-destroy first).
    OsdPurge {
        id: OsdId,
    },
    SetFlag(Flag),
    UnsetFlag(Flag),
    PoolCreate {
        name: String,
        size: u32,
        min_size: u32,
        pg_num: u32,
        /// None: `host`, or `osd` when the CRUSH map has a single host.
        failure_domain: Option<FailureDomain>,
    },
    PoolSet {
        name: String,
        key: String,
        value: String,
    },
    PoolRm {
        name: String,
    },
    /// A session asks for an image's exclusive lock. Granted (generation + 1) when free,
    /// already its own, or held by a blocklisted session; otherwise the holder is asked to
    /// release (`requested_by`) and the answer is LOCK_BUSY.
    LockAcquire(LockClaim),
    /// The holder releases; the lock goes straight to the waiting session, if any.
    LockRelease {
        lock_key: String,
        session: SessionId,
        generation: u64,
    },
    /// Proposed by the leader only, for a LockAcquire whose holder is gone (no session
    /// heartbeat within the grace, or its gateway restarted): the holder is blocklisted
    /// and the lock granted to the claimant in one step.
    LockBreak {
        claim: LockClaim,
        holder: SessionId,
        reason: String,
    },
    /// An image was removed: forget its lock (refused while another live session holds it).
    LockDrop {
        lock_key: String,
        session: SessionId,
    },
    BlocklistAdd {
        session: SessionId,
        reason: String,
        /// See [`crate::map::BlocklistEntry::expire_s`].
        expire_s: Option<u64>,
    },
    BlocklistRm {
        session: SessionId,
    },
    /// The leader: these entries (session, the epoch it was added) have expired. Entries
    /// gone or added again since, or whose session holds an image lock, are left as they
    /// are.
    BlocklistExpire {
        sessions: Vec<(SessionId, u64)>,
    },
    /// PG primaries: these PGs went (or go) active with these acting sets; each replaces
    /// the PG's [`crate::map::LastActive`] when its `since_epoch` is not older.
    PgActivated {
        pgs: Vec<PgActivation>,
    },
    /// PG primaries: every OSD of these PGs' `pg_temp` sets holds a complete copy; each
    /// entry is dropped if it still equals the set given (the PG then maps by CRUSH).
    PgTempDone {
        pgs: Vec<(PoolId, u32, Vec<OsdId>)>,
    },
    /// The operator: this OSD is gone for good with its data (Ceph's `osd lost`). PGs stop
    /// waiting for it: it is dropped from every PG's last active set. Refused unless the
    /// OSD is down.
    OsdLost {
        id: OsdId,
    },
}

/// One PG's activation, as [`MapCommand::PgActivated`] carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgActivation {
    pub pool: PoolId,
    pub seed: u32,
    pub since_epoch: u64,
    pub osds: Vec<OsdId>,
}

/// Who wants an image lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockClaim {
    pub lock_key: String,
    /// `pool/image`, for operators.
    pub image: String,
    pub session: SessionId,
    pub desc: String,
    pub instance: u64,
}

/// A live client session, as its process reports it with heartbeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    /// `pool/image`.
    pub image: String,
    /// Where it runs: e.g. `gateway 127.0.0.1:10809` or `storectl@host`.
    pub desc: String,
    /// The process instance (random per process start).
    pub instance: u64,
}

/// A session as a monitor knows it, for `storectl client ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    pub info: SessionInfo,
    /// Milliseconds since this monitor last heard from it.
    pub last_seen_ms_ago: u64,
}

/// What a successfully applied command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    /// Epoch of the map after the command (unchanged if it was a no-op).
    pub epoch: u64,
    /// Whether the map changed.
    pub changed: bool,
    /// Human summary, e.g. "pool 'vm-pool' created (id 1)".
    pub message: String,
    /// For OsdBoot: the OSD's id.
    pub osd_id: Option<OsdId>,
    /// For lock grants: the generation granted.
    pub lock_generation: Option<u64>,
}

/// Per-OSD usage, reported with heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdStat {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub objects: u64,
    /// Checksum mismatches found by reads since the OSD started.
    pub checksum_errors: u64,
    /// Objects this OSD copied or removed in recovery since it started (a counter).
    pub recovered_objects: u64,
    /// Bytes of object data this OSD copied in recovery since it started (a counter).
    pub recovered_bytes: u64,
    /// I/O errors its data device returned since it started: an OSD stops at the first.
    pub device_errors: u64,
}

/// The operations a daemon (an OSD or a gateway) has had in hand longer than its
/// complaint time (`osd_op_complaint_time`), as it reports them in each heartbeat: the
/// monitors raise `SLOW_OPS` while any daemon reports some (Ceph's SLOW_OPS).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowOps {
    /// How many operations are blocked past the complaint time now.
    pub count: u64,
    /// How long the oldest of them has been in hand.
    pub oldest_age_ms: u64,
    /// What the oldest one is, for the operator (e.g. `write obj-24 (pg 1.1f)`).
    pub oldest: String,
}

/// Monitor membership changes (through Raft's joint consensus).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonMembership {
    Add { name: String, addr: String },
    Remove { name: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MonRequest {
    /// Liveness and identity of a monitor (also used between monitors for quorum checks).
    Ping,
    /// The current map, as this monitor has it.
    GetMap,
    /// Send the map now if newer than `have_epoch`, then every new epoch as a push.
    Subscribe { have_epoch: u64 },
    /// A map change: forwarded to the leader if needed.
    Command(MapCommand),
    /// The cluster status (health, quorum, counts), computed by the answering monitor.
    Status,
    /// OSD liveness report; sent to every monitor.
    OsdHeartbeat {
        id: OsdId,
        uuid: String,
        stat: OsdStat,
        /// The PGs it is primary of that are not active (peering, recovering, inactive),
        /// as of map epoch `pgs_epoch` (every PG engine of the OSD had seen that map).
        busy_pgs: Vec<crate::osdmsg::PgReport>,
        pgs_epoch: u64,
        /// Client operations it has had in hand past `osd_op_complaint_time`.
        slow_ops: SlowOps,
    },
    /// Client session liveness (image opens); sent to every monitor.
    ClientHeartbeat {
        sessions: Vec<SessionInfo>,
        /// The reporting process's operations blocked past its complaint time.
        slow_ops: SlowOps,
    },
    /// The client sessions this monitor has heard from recently.
    ClientList,
    /// Add or remove a monitor.
    Membership(MonMembership),
    /// A leader operation (Command or Membership) forwarded by a follower monitor: the
    /// receiver does not forward it again, so leadership changes cannot make a loop.
    Forward(Box<MonRequest>),
    /// A Raft RPC between monitors; the bytes are private to the monitor crate.
    Raft { kind: u8, body: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MonResponse {
    Pong(PongInfo),
    Map(Box<ClusterMap>),
    Subscribed,
    Outcome(CommandOutcome),
    Status(Box<StatusReport>),
    HeartbeatAck { epoch: u64 },
    Clients(Vec<SessionReport>),
    Raft(Vec<u8>),
    Error(StoreError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PongInfo {
    pub fsid: String,
    pub mon_id: MonId,
    pub name: String,
    pub epoch: u64,
    pub leader: Option<MonId>,
}

/// Health severity, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    Ok,
    Warn,
    Err,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "HEALTH_OK",
            Severity::Warn => "HEALTH_WARN",
            Severity::Err => "HEALTH_ERR",
        }
    }
}

/// One active health check, as in `ceph health detail`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub severity: Severity,
    pub summary: String,
    pub detail: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonStatus {
    pub id: MonId,
    pub name: String,
    pub addr: String,
    /// Whether the answering monitor could reach it just now.
    pub reachable: bool,
    /// Why not, if not.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Each OSD's last reported usage and recovery counters (the answering monitor's view).
    pub osd_stats: BTreeMap<OsdId, OsdStat>,
    pub fsid: String,
    pub epoch: u64,
    pub health: Severity,
    /// Check code (e.g. `OSD_DOWN`) → check.
    pub checks: BTreeMap<String, HealthCheck>,
    pub mons: Vec<MonStatus>,
    /// Names of the monitors in quorum; empty without quorum.
    pub quorum_names: Vec<String>,
    pub leader_name: Option<String>,
    /// Name of the monitor that answered.
    pub answered_by: String,
    pub num_osds: usize,
    pub num_up_osds: usize,
    pub num_in_osds: usize,
    pub num_pools: usize,
    pub num_pgs: u64,
    /// PG state string (e.g. `active+clean`) → count.
    pub pgs_by_state: BTreeMap<String, u64>,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub flags: Vec<String>,
    /// Client sessions (image opens) this monitor heard from recently.
    pub num_sessions: usize,
    /// Objects the primaries still have to recover (copy or remove), and all object copies.
    pub recovery_objects_left: u64,
    pub object_copies: u64,
    /// Recovery speed over the last seconds, when known.
    pub recovery_objects_per_sec: Option<u64>,
    pub recovery_bytes_per_sec: Option<u64>,
    /// Image locks held.
    pub num_image_locks: usize,
    pub num_blocklisted: usize,
    /// Of `recovery_objects_left`, the copies missing below the pools' sizes.
    pub degraded_objects: u64,
    /// PGs served by other OSDs than CRUSH names (pg_temp), or held by `norebalance`.
    pub pgs_remapped: u64,
    /// Object copies in the wrong place: missing on the OSDs remapped PGs move to, plus
    /// an estimate of what `norebalance` holds back (copies spread evenly over PGs).
    pub misplaced_objects: u64,
}
