//! The OSD's data service: the runtime around [`crate::pg::PgPrimary`].
//!
//! - Client operations arrive on the OSD port, are fed to the PG's engine, and the engine's
//!   commands are carried out here.
//! - Every mutation, local or from a primary, goes through the PG's apply queue: one task
//!   per PG applies them in arrival order, so each OSD applies a PG's mutations in the
//!   primary's order.
//! - Mutations for another OSD go through that peer's sender task, which puts them on the
//!   wire in the order the engine emitted them.
//!
//! The apply and peer queues are unbounded channels whose contents are bounded by the
//! engines' `max_waiting` (operations per PG) on the primaries that feed them.
//!
//! This file holds [`OsdService`], its PG slots and what every part shares (the map, the
//! connections kept to peers). The rest, by responsibility:
//!
//! - `port`: the OSD port, dispatching each request;
//! - `client`: client operations, from their checks to the PG's engine;
//! - `runtime`: feeding events to the engines and carrying out their commands;
//! - `apply`: the apply queues, the replica side and the peer queues;
//! - `read`: reads, read repair and fetches;
//! - `peering`: log heads, copy states, listings and recovery plans;
//! - `recovery`: recovering objects, and its limits and throttle;
//! - `backfill`: backfill reservations and finished-backfill announcements;
//! - `stray`: removing copies of PGs this OSD no longer serves;
//! - `housekeeping`: ticks, pruning, primary PG engines and the busy-PG report;
//! - `failpoint`: the tests' fault injection.

mod apply;
mod backfill;
mod client;
mod failpoint;
mod housekeeping;
mod peering;
mod port;
mod read;
mod recovery;
mod runtime;
mod stray;

pub use failpoint::Failpoint;
pub use recovery::RecoveryLimits;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use store_client::optrack::OpTracker;
use store_client::RpcConn;
use store_objstore::{ObjError, ObjectStore};
use store_placement::PgId;
use store_types::map::{ClusterMap, OsdId};
use store_types::osdmsg::{Mutation, OsdRequest, OsdResponse, Pg, OSD_MAX_FRAME_BYTES};
use store_types::{ErrorCode, StoreError};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::announce::Announcer;
use crate::pg::{OpId, PgLimits, PgPrimary};

use apply::{ApplyJob, PeerJob};
use backfill::Backfill;
use client::Waiter;
use recovery::RecoveryThrottle;
use stray::StrayRemoval;

/// How long a replica operation may take before the primary counts it as failed.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(30);

pub type MapRx = watch::Receiver<Option<Arc<ClusterMap>>>;

/// Converts object store errors to wire errors with stable codes.
pub fn obj_err(e: ObjError) -> StoreError {
    let code = match &e {
        ObjError::NoSpace { .. } => ErrorCode::NoSpace,
        ObjError::Io(_) => ErrorCode::DeviceError,
        ObjError::Checksum { .. } => ErrorCode::Corrupt,
        ObjError::NotFound(_) => ErrorCode::NotFound,
        ObjError::Invalid(_) | ObjError::StaleVersion { .. } => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    };
    StoreError::new(code, e.to_string())
}

struct PgSlot {
    pg: Pg,
    engine: Mutex<PgPrimary<Mutation>>,
    epoch_fed: AtomicU64,
    waiters: Mutex<HashMap<OpId, Waiter>>,
    apply_tx: mpsc::UnboundedSender<ApplyJob>,
    /// Whether the engine's sequence was raised to the PG log's head.
    seq_loaded: std::sync::atomic::AtomicBool,
    /// Background recovery slots granted to this PG, by round (one at most per round).
    grants: Mutex<HashMap<u64, OwnedSemaphorePermit>>,
    /// This PG's reservation of one of the OSD's backfill slots.
    backfill: Mutex<Backfill>,
}

pub struct OsdService<S: ObjectStore> {
    id: OsdId,
    store: Arc<S>,
    maps: MapRx,
    limits: PgLimits,
    pgs: Mutex<HashMap<Pg, Arc<PgSlot>>>,
    peers: Mutex<HashMap<OsdId, mpsc::UnboundedSender<PeerJob>>>,
    next_op: AtomicU64,
    started: Instant,
    /// Damaged local copies rewritten from a replica.
    repaired: AtomicU64,
    /// Objects copied or removed by recoveries this OSD ran (pulls and pushes).
    recovered: AtomicU64,
    recovered_bytes: AtomicU64,
    throttle: RecoveryThrottle,
    /// Test-only fault injection (see [`Failpoint`]).
    failpoint: Mutex<Option<Failpoint>>,
    /// The newest map epoch whose primary PGs have engines.
    primaries_at: AtomicU64,
    /// Activations and finished backfills, for the monitors.
    announce: Arc<Announcer>,
    /// Client operations in hand, for SLOW_OPS.
    ops: Arc<OpTracker>,
    /// I/O errors the data device returned; the first stops the OSD (see
    /// [`OsdService::device_failure`]).
    device_errors: AtomicU64,
    device_failure: watch::Sender<Option<String>>,
    /// Connections kept for peering and recovery calls, by peer address.
    peer_conns: Mutex<HashMap<String, RpcConn>>,
    /// pg_temp entries announced done, and when: not repeated for a while.
    temp_announced: Mutex<HashMap<Pg, (Vec<OsdId>, Instant)>>,
    /// Copies of PGs this OSD no longer serves, being removed.
    strays: Mutex<HashMap<Pg, Arc<StrayRemoval>>>,
}

impl<S: ObjectStore> OsdService<S> {
    pub fn new(
        id: OsdId,
        store: Arc<S>,
        maps: MapRx,
        limits: PgLimits,
        recovery: RecoveryLimits,
        announce: Arc<Announcer>,
        ops: Arc<OpTracker>,
    ) -> Arc<Self> {
        Arc::new(OsdService {
            id,
            store,
            maps,
            limits,
            pgs: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            next_op: AtomicU64::new(1),
            started: Instant::now(),
            repaired: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            recovered_bytes: AtomicU64::new(0),
            throttle: RecoveryThrottle {
                slots: Arc::new(Semaphore::new(recovery.max_active.max(1))),
                backfills: Arc::new(Semaphore::new(recovery.max_backfills.max(1))),
                sleep: recovery.sleep,
            },
            failpoint: Mutex::new(Failpoint::from_env()),
            primaries_at: AtomicU64::new(0),
            announce,
            ops,
            device_errors: AtomicU64::new(0),
            device_failure: watch::Sender::new(None),
            peer_conns: Mutex::new(HashMap::new()),
            temp_announced: Mutex::new(HashMap::new()),
            strays: Mutex::new(HashMap::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Set (with what failed) once the data device returned an I/O error: the OSD must
    /// stop, as Ceph's does, so its PGs go to OSDs whose disks work.
    pub fn device_failure(&self) -> watch::Receiver<Option<String>> {
        self.device_failure.subscribe()
    }

    pub fn device_errors(&self) -> u64 {
        self.device_errors.load(Ordering::Relaxed)
    }

    fn device_failed(&self, what: &str, e: &std::io::Error) {
        self.device_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            osd = self.id,
            "I/O error on the data device while {what}: {e}; this OSD stops"
        );
        self.device_failure
            .send_if_modified(|f| f.replace(format!("{what}: {e}")).is_none());
    }

    /// The client operations in hand past the complaint time.
    pub fn slow_ops(&self) -> store_types::msg::SlowOps {
        self.ops.slow_ops()
    }

    fn map(&self) -> Option<Arc<ClusterMap>> {
        self.maps.borrow().clone()
    }

    fn current_map(&self) -> Result<Arc<ClusterMap>, StoreError> {
        self.map()
            .ok_or_else(|| StoreError::new(ErrorCode::Unavailable, "this OSD has no map yet"))
    }

    /// The PG's slot, created on first use with its apply task.
    fn slot(self: &Arc<Self>, pg: Pg) -> Arc<PgSlot> {
        let mut pgs = self.pgs.lock().expect("pg table lock");
        pgs.entry(pg)
            .or_insert_with(|| {
                let (apply_tx, apply_rx) = mpsc::unbounded_channel();
                tokio::spawn(self.clone().apply_loop(pg, apply_rx));
                Arc::new(PgSlot {
                    pg,
                    engine: Mutex::new(PgPrimary::new(self.id, 0, self.limits)),
                    epoch_fed: AtomicU64::new(0),
                    waiters: Mutex::new(HashMap::new()),
                    apply_tx,
                    seq_loaded: std::sync::atomic::AtomicBool::new(false),
                    grants: Mutex::new(HashMap::new()),
                    backfill: Mutex::new(Backfill::None),
                })
            })
            .clone()
    }

    /// Whether `pg` exists in this OSD's map: its pool does, and its seed is below the
    /// pool's pg_num. PG slots (an engine, an apply task) are made only for those.
    fn pg_exists(&self, pg: Pg) -> bool {
        self.map()
            .and_then(|m| m.pools.get(&pg.pool).map(|p| pg.seed < p.pg_num))
            .unwrap_or(false)
    }

    /// Waits (briefly) until our map is at least the client's, so a client with a newer
    /// map is not bounced for nothing.
    async fn catch_up(&self, epoch: u64) {
        let mut rx = self.maps.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            rx.wait_for(|m| m.as_ref().is_some_and(|m| m.epoch >= epoch)),
        )
        .await;
    }

    /// Objects copied or removed, and bytes copied, in recovery since start.
    pub fn recovered(&self) -> (u64, u64) {
        (
            self.recovered.load(Ordering::Relaxed),
            self.recovered_bytes.load(Ordering::Relaxed),
        )
    }

    /// Damaged copies this OSD has repaired from replicas since it started.
    pub fn repaired(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }

    /// One request to another OSD (peering and recovery), on the connection kept for
    /// that OSD's address: a recovery of many objects, or of one in many 4 MiB pieces,
    /// does not open a connection per call.
    async fn peer_call(&self, osd: OsdId, req: &OsdRequest) -> Result<OsdResponse, StoreError> {
        let addr = self
            .map()
            .and_then(|m| m.osds.get(&osd).map(|o| o.addr.clone()))
            .ok_or_else(|| StoreError::not_found(format!("osd.{osd} is not in the map")))?;
        let conn = self.peer_conn(&addr).await?;
        let res = conn.call::<_, OsdResponse>(req, REPLICA_TIMEOUT).await;
        if res.is_err() {
            // A connection that failed or timed out may be stuck: the next call opens anew.
            self.forget_peer_conn(&addr);
        }
        match res? {
            OsdResponse::Error(e) => Err(e),
            other => Ok(other),
        }
    }

    /// The kept connection to `addr`, opened if there is none or it closed. One per peer
    /// address; those of addresses that leave the map are dropped by housekeeping.
    async fn peer_conn(&self, addr: &str) -> Result<RpcConn, StoreError> {
        if let Some(c) = self.peer_conns_lock().get(addr).filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (conn, _) = RpcConn::connect(addr, Duration::from_secs(2), OSD_MAX_FRAME_BYTES).await?;
        self.peer_conns_lock()
            .insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    fn forget_peer_conn(&self, addr: &str) {
        self.peer_conns_lock().remove(addr);
    }

    fn peer_conns_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RpcConn>> {
        self.peer_conns.lock().expect("peer conns lock")
    }
}

fn pg_id(pg: Pg) -> PgId {
    PgId {
        pool: pg.pool,
        seed: pg.seed,
    }
}

#[cfg(test)]
mod tests;
