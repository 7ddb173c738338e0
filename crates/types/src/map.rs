//! The cluster map: the one replicated document the monitors agree on.
//!
//! Every change to it is one committed Raft entry and bumps [`ClusterMap::epoch`].
//! Daemons and clients hold a copy and compare epochs to know whether theirs is current.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies an OSD. Assigned by the monitors at first boot, never reused while the OSD exists.
pub type OsdId = u32;
/// Identifies a pool. Assigned by the monitors, never reused.
pub type PoolId = u32;
/// Identifies a monitor; it is also the Raft node id.
pub type MonId = u64;

/// Fixed-point CRUSH weight: 0x10000 is 1.0 (as in Ceph), conventionally one TiB of capacity.
pub type CrushWeight = u32;
pub const WEIGHT_ONE: CrushWeight = 0x10000;

/// Converts a fixed-point CRUSH weight to a float for display.
pub fn weight_to_f64(w: CrushWeight) -> f64 {
    w as f64 / WEIGHT_ONE as f64
}

/// Converts a float weight (e.g. from the CLI) to fixed point; negative and NaN become 0.
pub fn weight_from_f64(w: f64) -> CrushWeight {
    if w.is_nan() || w <= 0.0 {
        0
    } else {
        (w * WEIGHT_ONE as f64).round().min(u32::MAX as f64) as CrushWeight
    }
}

/// A client session: one gateway's (or tool's) open of one image, as librbd's client
/// instance. Random, chosen by the client; shown as `client.<16 hex digits>`.
pub type SessionId = u64;

/// How sessions are named to operators.
pub fn session_name(id: SessionId) -> String {
    format!("client.{id:016x}")
}

/// Parses `client.<hex>` or bare hex.
pub fn parse_session(s: &str) -> Option<SessionId> {
    let hex = s.strip_prefix("client.").unwrap_or(s);
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The key of an image's lock: pool id and image id (not name, so it survives renames).
pub fn image_lock_key(pool: PoolId, image_id: &str) -> String {
    format!("{pool}/{image_id}")
}

/// The name of an image's data object: its id and the object's number (16 hex digits).
pub fn image_data_object(image_id: &str, object_no: u64) -> String {
    format!("{image_id}.{object_no:016x}")
}

/// The image id a data object's name carries, when it is one (see [`image_data_object`]).
pub fn image_of_data_object(object: &str) -> Option<&str> {
    let (id, no) = object.rsplit_once('.')?;
    let is_no = no.len() == 16 && no.bytes().all(|b| b.is_ascii_hexdigit());
    (is_no && !id.is_empty()).then_some(id)
}

/// An image's exclusive lock (librbd's exclusive-lock feature, kept in the map so every
/// OSD checks writes against the same generation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLock {
    /// `pool/image`, for operators.
    pub image: String,
    pub holder: Option<SessionId>,
    /// Where the holder runs (gateway address, or tool and host), for operators.
    pub holder_desc: String,
    /// Process instance of the holder: a gateway restarted on the same address has a new
    /// one, which proves the old holder gone.
    pub holder_instance: u64,
    /// Bumped by every grant; never decreases. Writes carry it; OSDs refuse older ones.
    pub generation: u64,
    /// A session waiting for the lock: the holder should finish its writes and release.
    pub requested_by: Option<SessionId>,
    /// Where the waiting session runs, and its process instance (it becomes the holder's).
    pub requested_desc: String,
    pub requested_instance: u64,
    /// Epoch of the last grant.
    pub granted_epoch: u64,
    /// The last few releases (session, generation), newest last, at most
    /// [`RECENT_RELEASES`]: a release resent after it applied is answered as done, while a
    /// release by a session the lock was taken from (a break) is refused, so that session
    /// knows it was fenced even once its blocklist entry has expired.
    pub recent_releases: Vec<(SessionId, u64)>,
    /// The last few sessions the lock was taken from without their release (a break, or a
    /// grant over a blocklisted holder), at most [`RECENT_RELEASES`]: their claims are
    /// refused for good, so a fenced session stays fenced once its blocklist entry expired.
    pub taken_from: Vec<SessionId>,
}

/// How many releases an [`ImageLock`] remembers.
pub const RECENT_RELEASES: usize = 8;

/// Why and since when a session is fenced, and for how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocklistEntry {
    pub added_epoch: u64,
    pub reason: String,
    /// Seconds after which the leader lifts the entry (measured on its own clock from
    /// when it first saw the entry, so a leader change only lengthens it); None: the
    /// monitors' `mon_blocklist_default_expire`; Some(0): never. An entry whose session
    /// still holds an image lock is never lifted by expiry.
    pub expire_s: Option<u64>,
}

/// What a lock-guarded write carries, for OSDs to check against their map.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WriteGuard {
    pub session: SessionId,
    pub lock_key: String,
    pub generation: u64,
}

/// A monitor as the map knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonInfo {
    pub id: MonId,
    pub name: String,
    pub addr: String,
    /// False while a newly added monitor catches up as a Raft learner.
    pub voter: bool,
}

/// An OSD as the map knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdInfo {
    pub id: OsdId,
    /// Stable identity of the OSD's data device, so a re-registering OSD gets its old id back.
    pub uuid: String,
    /// Address the OSD serves clients and peers on.
    pub addr: String,
    /// The CRUSH host bucket it lives in.
    pub host: String,
    /// CRUSH weight (capacity), fixed point.
    pub weight: CrushWeight,
    pub up: bool,
    /// `in` is a keyword: `is_in` says whether CRUSH may place data on it.
    pub is_in: bool,
    /// Epoch at which the OSD last went up.
    pub up_from: u64,
    /// Wall-clock milliseconds (as proposed by the monitor leader) when it was marked down.
    pub down_stamp_ms: Option<u64>,
}

impl OsdInfo {
    /// Eligible for CRUSH: in and with weight. (Down-but-in OSDs stay in the CRUSH result
    /// and leave a hole in the up set, as in Ceph: that is what makes `noout` useful.)
    pub fn crush_eligible(&self) -> bool {
        self.is_in && self.weight > 0
    }
}

/// The level at which a pool's replicas must differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailureDomain {
    Host,
    Osd,
}

impl fmt::Display for FailureDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureDomain::Host => "host",
            FailureDomain::Osd => "osd",
        })
    }
}

impl std::str::FromStr for FailureDomain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(FailureDomain::Host),
            "osd" => Ok(FailureDomain::Osd),
            other => Err(format!(
                "unknown failure domain '{other}': expected 'host' or 'osd'"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub id: PoolId,
    pub name: String,
    pub size: u32,
    pub min_size: u32,
    pub pg_num: u32,
    pub failure_domain: FailureDomain,
    /// Epoch at which the pool was created.
    pub created_epoch: u64,
}

/// Cluster-wide flags, as in `ceph osd set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Flag {
    /// Down OSDs are not marked out automatically.
    NoOut,
    /// No data moves for rebalancing (recovery of degraded data still runs).
    NoRebalance,
    /// Missed heartbeats do not mark OSDs down.
    NoDown,
    /// OSDs may not be marked up.
    NoUp,
    /// Recovery is paused.
    NoRecover,
    /// Backfill is paused.
    NoBackfill,
}

impl Flag {
    pub const ALL: [Flag; 6] = [
        Flag::NoOut,
        Flag::NoRebalance,
        Flag::NoDown,
        Flag::NoUp,
        Flag::NoRecover,
        Flag::NoBackfill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Flag::NoOut => "noout",
            Flag::NoRebalance => "norebalance",
            Flag::NoDown => "nodown",
            Flag::NoUp => "noup",
            Flag::NoRecover => "norecover",
            Flag::NoBackfill => "nobackfill",
        }
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Flag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Flag::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Flag::ALL.iter().map(|f| f.name()).collect();
                format!("unknown flag '{s}': expected one of {}", names.join(", "))
            })
    }
}

/// A host bucket of the CRUSH hierarchy (root → host → osd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBucket {
    /// Negative, as CRUSH bucket ids are in Ceph; stable once assigned.
    pub id: i32,
    pub name: String,
    /// OSD ids in this host, sorted.
    pub osds: Vec<OsdId>,
}

/// The CRUSH hierarchy: one root (`default`, id -1) holding host buckets holding OSDs.
/// Weights live on the OSDs; a host weighs the sum of its OSDs' CRUSH weights.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrushMap {
    /// Host buckets by name.
    pub hosts: BTreeMap<String, HostBucket>,
    /// Next host bucket id to hand out (starts at -2; -1 is the root).
    pub next_bucket_id: i32,
}

pub const CRUSH_ROOT_ID: i32 = -1;
pub const CRUSH_ROOT_NAME: &str = "default";

/// The replicated cluster map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Cluster id (Ceph's fsid).
    pub fsid: String,
    /// Bumped by every change.
    pub epoch: u64,
    /// The last epoch that changed placement (OSD states, weights, CRUSH, pools): a PG
    /// report made before it may describe an old acting set.
    pub placement_epoch: u64,
    pub mons: BTreeMap<MonId, MonInfo>,
    pub osds: BTreeMap<OsdId, OsdInfo>,
    pub crush: CrushMap,
    pub pools: BTreeMap<PoolId, Pool>,
    pub flags: BTreeSet<Flag>,
    /// Exclusive image locks by [`image_lock_key`]: who may write each image, at which
    /// generation. OSDs refuse guarded writes that do not match.
    pub image_locks: BTreeMap<String, ImageLock>,
    /// Fenced client sessions: OSDs refuse their writes, monitors refuse them locks.
    pub blocklist: BTreeMap<SessionId, BlocklistEntry>,
    pub next_osd_id: OsdId,
    pub next_pool_id: PoolId,
    /// While `norebalance` is set: each OSD's CRUSH standing when it was set. Placement
    /// uses it for OSDs that are up, so adding, reweighting or marking out running OSDs
    /// moves nothing; down OSDs use their current standing, so a PG whose OSD is down and
    /// out still recovers elsewhere (as Ceph's norebalance, which holds back only the
    /// backfill of PGs that are not degraded).
    pub rebalance_hold: Option<BTreeMap<OsdId, HeldPlacement>>,
    /// Ceph's `pg_temp`: pool → PG seed → the PG's acting set (primary first) while it
    /// differs from the CRUSH set. Set by the monitors when placement moves a PG onto
    /// OSDs that do not hold it yet: the OSDs that served it keep serving, with the new
    /// ones added and backfilled (the PG is *remapped*, its missing copies *misplaced*,
    /// not degraded). Cleared by the PG's primary once every OSD of it holds a complete
    /// copy; the OSDs CRUSH no longer names then drop their stray copies.
    pub pg_temp: BTreeMap<PoolId, BTreeMap<u32, Vec<OsdId>>>,
    /// pool → PG seed → the PG's last interval that went active (Ceph's past intervals,
    /// kept per PG): a primary records its acting set here before it serves a write in a
    /// new interval, so every acknowledged write is on each OSD named here. Peering takes
    /// the authoritative copy from one of them; with none of them present the PG is
    /// `down` (`storectl osd lost` gives one up for good).
    pub pg_history: BTreeMap<PoolId, BTreeMap<u32, LastActive>>,
}

/// A PG's last interval that went active, as [`ClusterMap::pg_history`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastActive {
    /// The map epoch at which that interval started: a record only replaces an older one.
    pub since_epoch: u64,
    /// Its acting set. Empty: nothing is known to have been written (a new pool, or every
    /// OSD of the record declared lost).
    pub osds: Vec<OsdId>,
}

/// An OSD's CRUSH standing, as [`ClusterMap::rebalance_hold`] keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldPlacement {
    pub weight: CrushWeight,
    pub is_in: bool,
}

impl ClusterMap {
    pub fn new(fsid: impl Into<String>) -> Self {
        ClusterMap {
            fsid: fsid.into(),
            epoch: 0,
            placement_epoch: 0,
            mons: BTreeMap::new(),
            osds: BTreeMap::new(),
            crush: CrushMap {
                hosts: BTreeMap::new(),
                next_bucket_id: -2,
            },
            pools: BTreeMap::new(),
            flags: BTreeSet::new(),
            image_locks: BTreeMap::new(),
            blocklist: BTreeMap::new(),
            next_osd_id: 0,
            next_pool_id: 1,
            rebalance_hold: None,
            pg_temp: BTreeMap::new(),
            pg_history: BTreeMap::new(),
        }
    }

    /// The PG's `pg_temp` entry, if any.
    pub fn pg_temp_of(&self, pool: PoolId, seed: u32) -> Option<&[OsdId]> {
        self.pg_temp.get(&pool)?.get(&seed).map(Vec::as_slice)
    }

    /// The PG's last active interval, if recorded.
    pub fn last_active(&self, pool: PoolId, seed: u32) -> Option<&LastActive> {
        self.pg_history.get(&pool)?.get(&seed)
    }

    pub fn pool_by_name(&self, name: &str) -> Option<&Pool> {
        self.pools.values().find(|p| p.name == name)
    }

    pub fn has_flag(&self, flag: Flag) -> bool {
        self.flags.contains(&flag)
    }

    /// CRUSH weight of a host bucket: the sum of its OSDs' weights.
    pub fn host_weight(&self, host: &HostBucket) -> u64 {
        host.osds
            .iter()
            .filter_map(|id| self.osds.get(id))
            .map(|o| o.weight as u64)
            .sum()
    }

    pub fn num_up_osds(&self) -> usize {
        self.osds.values().filter(|o| o.up).count()
    }

    pub fn num_in_osds(&self) -> usize {
        self.osds.values().filter(|o| o.is_in).count()
    }

    /// Number of distinct failure domains of the given type that hold at least one in OSD.
    pub fn failure_domains_available(&self, domain: FailureDomain) -> usize {
        match domain {
            FailureDomain::Osd => self.osds.values().filter(|o| o.crush_eligible()).count(),
            FailureDomain::Host => self
                .crush
                .hosts
                .values()
                .filter(|h| {
                    h.osds
                        .iter()
                        .any(|id| self.osds.get(id).is_some_and(|o| o.crush_eligible()))
                })
                .count(),
        }
    }

    /// Voting monitors (learners that are still catching up do not count).
    pub fn voters(&self) -> impl Iterator<Item = &MonInfo> {
        self.mons.values().filter(|m| m.voter)
    }

    /// Whether a guarded write may be ordered under this map. `Unavailable` means this map
    /// is older than the grant the writer holds (fetch a newer map); the other refusals are
    /// final for that writer.
    /// A mutation that carries no guard: refused on a data object of an image whose lock
    /// has a live holder (one not blocklisted), or the blocklist would not fence a writer
    /// that simply left its guard out.
    pub fn check_unguarded_write(
        &self,
        pool: PoolId,
        object: &str,
    ) -> Result<(), crate::StoreError> {
        let Some(image_id) = image_of_data_object(object) else {
            return Ok(());
        };
        let key = image_lock_key(pool, image_id);
        match self.image_locks.get(&key).and_then(|l| l.holder) {
            Some(h) if !self.blocklist.contains_key(&h) => Err(crate::StoreError::new(
                crate::ErrorCode::NotPermitted,
                format!(
                    "{object} is a data object of image {key}, whose lock {} holds: writes to it must carry that lock's guard",
                    session_name(h)
                ),
            )),
            _ => Ok(()),
        }
    }

    pub fn check_write_guard(&self, g: &WriteGuard) -> Result<(), crate::StoreError> {
        use crate::{ErrorCode, StoreError};
        if let Some(b) = self.blocklist.get(&g.session) {
            return Err(StoreError::new(
                ErrorCode::Blocklisted,
                format!(
                    "{} is blocklisted since epoch {} ({})",
                    session_name(g.session),
                    b.added_epoch,
                    b.reason
                ),
            ));
        }
        let lock = self.image_locks.get(&g.lock_key);
        let current = lock.map_or(0, |l| l.generation);
        if g.generation > current {
            return Err(StoreError::new(
                ErrorCode::Unavailable,
                format!(
                    "map epoch {} predates lock generation {} of {}",
                    self.epoch, g.generation, g.lock_key
                ),
            ));
        }
        match lock {
            Some(l) if l.holder == Some(g.session) && l.generation == g.generation => Ok(()),
            _ => Err(StoreError::new(
                ErrorCode::LockLost,
                format!(
                    "{} writes {} at lock generation {}, but the lock is at generation {current} held by {}",
                    session_name(g.session),
                    lock.map_or(g.lock_key.as_str(), |l| l.image.as_str()),
                    g.generation,
                    lock.and_then(|l| l.holder).map_or("nobody".to_string(), session_name)
                ),
            )),
        }
    }

    /// Monitor quorum size: floor(n/2)+1 of the voting monitors.
    pub fn quorum_size(&self) -> usize {
        self.voters().count() / 2 + 1
    }
}
