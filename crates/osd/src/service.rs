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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use store_client::server::{accept_loop, ServerConn};
use store_client::RpcConn;
use store_objstore::{ObjError, ObjectId, ObjectStore, PG_LOG_MAX_ENTRIES};
use store_placement::{map_pg, PgId, PoolMapper};
use store_types::map::{ClusterMap, Flag, OsdId, WriteGuard};
use store_types::osdmsg::{
    ClientOpKind, Mutation, ObjStat, ObjVersion, OsdRequest, OsdResponse, Pg, PgCopyState, PgPhase,
    PgReport, OSD_MAX_FRAME_BYTES,
};
use store_types::wire;
use store_types::{ErrorCode, StoreError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn, Instrument};

use crate::announce::Announcer;
use crate::pg::{
    Command, Event, Fix, OpId, PgError, PgLimits, PgPrimary, RecoveryFailure, RecoveryMode,
    RecoveryPause,
};
use store_client::optrack::{OpGuard, OpTracker};

/// Requests handled at once per connection.
const PER_CONN_CONCURRENCY: usize = 256;
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

fn pg_err(e: PgError) -> OsdResponse {
    match e {
        PgError::NotPrimary { epoch } => OsdResponse::NotPrimary { epoch },
        PgError::Refused { osd, error } => OsdResponse::Error(StoreError::new(
            error.code,
            format!("osd.{osd}: {}", error.message),
        )),
        PgError::RecoveryFailed { ref error, .. } => {
            OsdResponse::Error(StoreError::new(error.code, e.to_string()))
        }
        PgError::Blocked { .. } => {
            OsdResponse::Error(StoreError::new(ErrorCode::Timeout, e.to_string()))
        }
        other => OsdResponse::Error(StoreError::new(ErrorCode::Unavailable, other.to_string())),
    }
}

/// Why the recovery of one object failed, as the engine needs to know it.
#[derive(Debug, thiserror::Error)]
enum RecoverError {
    /// A copy is not at the planned version: the plan is stale.
    #[error("stale recovery plan: {0}")]
    Stale(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl RecoverError {
    fn cause(&self) -> RecoveryFailure {
        match self {
            RecoverError::Stale(_) => RecoveryFailure::StalePlan,
            // An OSD that cannot take the object: waiting operations fail at once.
            RecoverError::Store(e) if matches!(e.code, ErrorCode::NoSpace | ErrorCode::Corrupt) => {
                RecoveryFailure::Refused(e.clone())
            }
            RecoverError::Store(_) => RecoveryFailure::Transient,
        }
    }
}

/// EIO, as the kernel reports a failed device I/O.
const fn libc_eio() -> i32 {
    5
}

/// A client operation as SLOW_OPS names it: `write obj-24 (pg 1.1f)`.
fn describe_op(op: &ClientOpKind, object: &str, pg: Pg) -> String {
    let what = match op {
        ClientOpKind::Mutate(Mutation::Write { .. }) => "write",
        ClientOpKind::Mutate(Mutation::Zero { .. }) => "zero",
        ClientOpKind::Mutate(Mutation::Delete) => "delete",
        ClientOpKind::Read { .. } => "read",
        ClientOpKind::Stat => "stat",
        ClientOpKind::Allocated { .. } => "allocated",
        ClientOpKind::List => "list",
    };
    format!("{what} {object} (pg {}.{:x})", pg.pool, pg.seed)
}

/// A mutation to apply in PG order, and where its result goes.
struct ApplyJob {
    object: String,
    version: ObjVersion,
    mutation: Mutation,
    done: Applied,
}

/// Who learns that an apply is done.
enum Applied {
    /// This OSD is the PG's primary: the engine gets Durable (or Refused) directly.
    Engine(Arc<PgSlot>),
    /// A replica operation: answered to the primary on its connection, straight from
    /// the apply task (the connection's concurrency slot is held until then).
    Reply {
        replier: store_client::server::Replier,
        tag: u64,
        _slot: OwnedSemaphorePermit,
    },
}

/// What a client waits for.
enum Waiter {
    Mutation(ReplyTo),
    Read {
        to: ReplyTo,
        object: String,
        op: ClientOpKind,
    },
}

/// A client operation as it arrived.
struct ClientReq {
    map_epoch: u64,
    pg: Pg,
    object: String,
    op: ClientOpKind,
    guard: Option<WriteGuard>,
}

/// Where a client operation's answer goes: straight onto the client's connection, from
/// whichever code finishes the operation (no task waits for it). The connection's
/// concurrency slot is held until then.
struct ReplyTo {
    replier: store_client::server::Replier,
    tag: u64,
    slot: OwnedSemaphorePermit,
    /// The operation counts as in hand (for SLOW_OPS) until it is answered.
    _op: OpGuard,
}

impl ReplyTo {
    fn send(self, resp: OsdResponse) {
        self.replier.reply_now(self.tag, &resp, self.slot)
    }
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

/// A PG's claim on one of `osd_max_backfills` slots: asked for when it has objects to
/// backfill, held until it has none.
enum Backfill {
    None,
    Waiting,
    Held(#[allow(dead_code)] OwnedSemaphorePermit),
}

struct PeerJob {
    slot: Arc<PgSlot>,
    payload: wire::Payload,
    version: ObjVersion,
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

/// A stray copy being removed, step by step. Any peering or replica request for its PG
/// claims it back: the removal stops before its next step (the copy was marked
/// incomplete first, so it is backfilled like an empty one).
#[derive(Default)]
struct StrayRemoval {
    claimed: std::sync::atomic::AtomicBool,
    step: tokio::sync::Mutex<()>,
}

/// Objects a stray removal deletes per step.
const STRAY_STEP_OBJECTS: usize = 64;
/// How often an OSD looks for stray copies.
const STRAY_SWEEP_EVERY: Duration = Duration::from_secs(3);

/// A fault the tests inject, from `STORE_FAILPOINT` in the OSD's environment:
/// `drop_replica_op:NAME` makes this OSD silently drop the first replica operation on
/// object NAME (never applied, never answered), so another replica holds a write that the
/// primary never acknowledged: a divergent replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failpoint {
    DropReplicaOp {
        object: String,
    },
    /// `device_eio:NAME`: applying a mutation of object NAME fails as the device would
    /// with EIO.
    DeviceEio {
        object: String,
    },
}

impl Failpoint {
    pub fn from_env() -> Option<Failpoint> {
        let v = std::env::var("STORE_FAILPOINT").ok()?;
        match v.split_once(':') {
            Some(("drop_replica_op", object)) if !object.is_empty() => {
                Some(Failpoint::DropReplicaOp {
                    object: object.to_string(),
                })
            }
            Some(("device_eio", object)) if !object.is_empty() => Some(Failpoint::DeviceEio {
                object: object.to_string(),
            }),
            // The daemon's own (see `stored`).
            _ if v == "panic_after_start" => None,
            _ => {
                warn!("ignoring unknown STORE_FAILPOINT '{v}'");
                None
            }
        }
    }
}

/// How hard recovery may work, so client I/O keeps most of the device (Ceph's
/// `osd_recovery_max_active` and `osd_recovery_sleep`).
#[derive(Clone, Copy, Debug)]
pub struct RecoveryLimits {
    /// Recoveries (pulls and pushes, one per PG and target) running at once on this OSD.
    pub max_active: usize,
    /// PGs this OSD leads that backfill at once (Ceph's `osd_max_backfills`): the others
    /// wait (`backfill_wait`) until one is done.
    pub max_backfills: usize,
    /// Pause after each recovered object.
    pub sleep: Duration,
}

impl Default for RecoveryLimits {
    fn default() -> Self {
        RecoveryLimits {
            max_active: 3,
            max_backfills: 1,
            sleep: Duration::ZERO,
        }
    }
}

struct RecoveryThrottle {
    slots: Arc<Semaphore>,
    backfills: Arc<Semaphore>,
    sleep: Duration,
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

    /// The `device_eio` failpoint: the result a failing device would give.
    fn inject_device_error(&self, object: &str, res: Result<(), ObjError>) -> Result<(), ObjError> {
        let fp = self.failpoint.lock().expect("failpoint lock");
        match &*fp {
            Some(Failpoint::DeviceEio { object: o }) if o == object => {
                Err(ObjError::Io(std::io::Error::from_raw_os_error(libc_eio())))
            }
            _ => res,
        }
    }

    /// The client operations in hand past the complaint time.
    pub fn slow_ops(&self) -> store_types::msg::SlowOps {
        self.ops.slow_ops()
    }

    /// A released read, answered within the op timeout: a read that repairs from slow
    /// replicas could otherwise hold its client for one timeout per peer. Past the bound
    /// the client gets TIMEOUT, and the read still runs to its end (it may be repairing
    /// the local copy) before its object is released.
    async fn bounded_read(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        object: String,
        kind: ClientOpKind,
        to: ReplyTo,
    ) {
        let me = self.clone();
        let pg = slot.pg;
        let name = object.clone();
        let mut read = tokio::spawn(async move { me.local_read(pg, &name, kind).await });
        let bound = Duration::from_millis(self.limits.op_timeout_ms);
        match tokio::time::timeout(bound, &mut read).await {
            Ok(res) => to.send(res.unwrap_or_else(|e| {
                OsdResponse::Error(StoreError::internal(format!("read task failed: {e}")))
            })),
            Err(_) => {
                warn!(pg = ?pg, object, "read not done within the op timeout; answered TIMEOUT");
                to.send(OsdResponse::Error(StoreError::new(
                    ErrorCode::Timeout,
                    format!("read of {object} not done within {} ms", bound.as_millis()),
                )));
                let _ = read.await;
            }
        }
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

    /// Applies a PG's mutations one at a time, in arrival order.
    async fn apply_loop(self: Arc<Self>, pg: Pg, mut rx: mpsc::UnboundedReceiver<ApplyJob>) {
        while let Some(job) = rx.recv().await {
            let id = ObjectId {
                pool: pg.pool,
                pg: pg.seed,
                name: job.object,
            };
            let res = match job.mutation {
                Mutation::Write { offset, data } => {
                    self.store.write(&id, offset, data, job.version).await
                }
                Mutation::Zero { offset, len } => {
                    self.store.zero(&id, offset, len, job.version).await
                }
                Mutation::Delete => self.store.delete(&id, job.version).await.map(|_| ()),
            };
            let res = self.inject_device_error(&id.name, res);
            if let Err(ObjError::Io(e)) = &res {
                // Not answered: the OSD stops, and its peers see the connection close.
                self.device_failed(&format!("applying {:?} to {}", job.version, id.name), e);
                continue;
            }
            let res = res.map_err(obj_err);
            match job.done {
                Applied::Reply { replier, tag, .. } => {
                    let resp = match res {
                        Ok(()) => OsdResponse::Committed {
                            version: job.version,
                        },
                        Err(e) => OsdResponse::Error(e),
                    };
                    replier.reply(tag, &resp).await;
                }
                Applied::Engine(slot) => {
                    let (version, from) = (job.version, self.id);
                    let ev = match res {
                        Ok(()) => Event::Durable { version, from },
                        Err(error) => {
                            warn!(pg = ?slot.pg, ?version, "local apply refused: {error}");
                            Event::Refused {
                                version,
                                from,
                                error,
                            }
                        }
                    };
                    self.feed(&slot, ev);
                }
            }
        }
    }

    /// The engine's Map event for the current map, if the engine has not seen it.
    fn map_event(&self, slot: &PgSlot) -> Option<Event<Mutation>> {
        let map = self.map()?;
        if slot.epoch_fed.load(Ordering::Acquire) >= map.epoch {
            return None;
        }
        slot.epoch_fed.store(map.epoch, Ordering::Release);
        let (acting, min_size, size) = match map.pools.get(&slot.pg.pool) {
            Some(pool) => {
                let m = map_pg(&map, pool, pg_id(slot.pg));
                (m.acting, pool.min_size, pool.size)
            }
            // Pool removed: nobody is primary.
            None => (Vec::new(), 1, 1),
        };
        let history = map
            .last_active(slot.pg.pool, slot.pg.seed)
            .map(|r| r.osds.clone())
            .unwrap_or_default();
        // An acting OSD that restarted (new up_from) makes a new interval.
        let incarnation = acting.iter().fold(0u64, |h, id| {
            let up_from = map.osds.get(id).map_or(0, |o| o.up_from);
            h.wrapping_mul(0x100_0000_01b3).wrapping_add(up_from)
        });
        let pause = RecoveryPause {
            norecover: map.flags.contains(&Flag::NoRecover),
            nobackfill: map.flags.contains(&Flag::NoBackfill),
        };
        Some(Event::Map {
            epoch: map.epoch,
            acting,
            min_size,
            size,
            incarnation,
            pause,
            history,
        })
    }

    /// Feeds an event (after the current map) and carries out the commands while holding the
    /// engine: commands reach the apply and peer queues in the order the engine emitted
    /// them, which is what keeps every OSD applying a PG's mutations in the same order.
    fn feed(self: &Arc<Self>, slot: &Arc<PgSlot>, event: Event<Mutation>) {
        let _ = self.feed_guarded(slot, event, None);
    }

    /// Feeds a client event, first checking its write guard against the current map while
    /// holding the engine: a write is ordered only if its lock generation is current at the
    /// moment it is ordered, so no write of an old lock holder can follow one of the new.
    fn feed_guarded(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        event: Event<Mutation>,
        guard: Option<&WriteGuard>,
    ) -> Result<(), StoreError> {
        let mut engine = slot.engine.lock().expect("engine lock");
        match (guard, &event) {
            (Some(g), _) => self.current_map()?.check_write_guard(g)?,
            (None, Event::Mutate { object, .. }) => self
                .current_map()?
                .check_unguarded_write(slot.pg.pool, object)?,
            (None, _) => {}
        }
        let mut events: VecDeque<Event<Mutation>> = self.map_event(slot).into_iter().collect();
        events.push_back(event);
        while let Some(ev) = events.pop_front() {
            let cmds = engine.handle(ev);
            self.execute(slot, cmds, &mut events);
        }
        Ok(())
    }

    /// Carries out engine commands. Never blocks: I/O goes to tasks and queues; outcomes
    /// known at once (a dead queue) come back through `events`.
    fn execute(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        cmds: Vec<Command<Mutation>>,
        events: &mut VecDeque<Event<Mutation>>,
    ) {
        let mut encoded = None;
        for c in cmds {
            match c {
                Command::Apply {
                    to,
                    version,
                    object,
                    payload,
                } => {
                    if !self.apply_on(slot, to, version, object, payload, &mut encoded) {
                        events.push_back(Event::Failed { version, from: to });
                    }
                }
                Command::Read { op } => {
                    let waiter = slot.waiters.lock().expect("waiters lock").remove(&op);
                    if let Some(Waiter::Read {
                        to,
                        object,
                        op: kind,
                    }) = waiter
                    {
                        let me = self.clone();
                        let slot = slot.clone();
                        tokio::spawn(async move {
                            me.bounded_read(&slot, object, kind, to).await;
                            me.feed(&slot, Event::ReadDone { op });
                        });
                    }
                }
                Command::Acked { op, version } => {
                    if let Some(Waiter::Mutation(to)) =
                        slot.waiters.lock().expect("waiters lock").remove(&op)
                    {
                        to.send(OsdResponse::Committed { version });
                    }
                }
                Command::QueryHead { to, interval } => {
                    let me = self.clone();
                    let slot = slot.clone();
                    tokio::spawn(async move {
                        let ev = match me.query_head(slot.pg, to).await {
                            Ok((head, state)) => Event::Head {
                                from: to,
                                interval,
                                head: effective_head(head, state),
                                complete: state.complete,
                            },
                            Err(e) => {
                                debug!(pg = ?slot.pg, osd = to, "peering: head query failed: {e}");
                                Event::PeerFailed { osd: to, interval }
                            }
                        };
                        me.feed(&slot, ev);
                    });
                }
                Command::Plan {
                    from,
                    to,
                    interval,
                    auth_head,
                } => {
                    let me = self.clone();
                    let slot = slot.clone();
                    tokio::spawn(async move {
                        let ev = match me.plan(slot.pg, from, to, auth_head).await {
                            Ok((fixes, mode)) => {
                                if !fixes.is_empty() {
                                    info!(pg = ?slot.pg, from, to, objects = fixes.len(), ?mode, "recovery planned");
                                }
                                Event::Planned {
                                    to,
                                    interval,
                                    fixes,
                                    mode,
                                }
                            }
                            Err(e) => {
                                warn!(pg = ?slot.pg, from, to, "recovery planning failed, will retry: {e}");
                                Event::PeerFailed { osd: to, interval }
                            }
                        };
                        me.feed(&slot, ev);
                    });
                }
                Command::RecoverObject {
                    object,
                    source,
                    fixes,
                    interval,
                    background,
                } => {
                    let permit = background
                        .then(|| slot.grants.lock().expect("grants lock").remove(&interval))
                        .flatten();
                    let me = self.clone();
                    let slot = slot.clone();
                    tokio::spawn(async move {
                        let res = me
                            .recover_object(&slot, &object, source, &fixes, interval)
                            .await;
                        let ev = match res {
                            Ok(()) => Event::ObjectRecovered { object, interval },
                            Err(e) => {
                                warn!(pg = ?slot.pg, object, "recovery of an object failed: {e}");
                                let cause = e.cause();
                                Event::ObjectFailed {
                                    object,
                                    interval,
                                    cause,
                                }
                            }
                        };
                        me.feed(&slot, ev);
                        if background {
                            me.recovery_pause().await;
                        }
                        drop(permit);
                    });
                }
                Command::MarkComplete {
                    to,
                    interval,
                    log_from,
                } => {
                    let me = self.clone();
                    let slot = slot.clone();
                    tokio::spawn(async move {
                        let state = PgCopyState {
                            complete: true,
                            log_from,
                        };
                        let ev = match me.mark(slot.pg, to, state).await {
                            Ok(()) => {
                                info!(pg = ?slot.pg, osd = to, "recovery done: the copy is complete");
                                Event::Completed { to, interval }
                            }
                            Err(e) => {
                                warn!(pg = ?slot.pg, osd = to, "marking a copy complete failed, will retry: {e}");
                                Event::PeerFailed { osd: to, interval }
                            }
                        };
                        me.feed(&slot, ev);
                    });
                }
                Command::RecordActive { since_epoch, osds } => {
                    self.announce.activated(slot.pg, since_epoch, osds);
                }
                Command::WantGrant { interval } => {
                    let me = self.clone();
                    let slot = slot.clone();
                    tokio::spawn(async move {
                        // A backfilling PG first holds one of the OSD's backfill slots.
                        me.reserve_backfill(&slot).await;
                        // Throttled: at most max_active background recoveries on this OSD.
                        let Ok(permit) = me.throttle.slots.clone().acquire_owned().await else {
                            return;
                        };
                        slot.grants
                            .lock()
                            .expect("grants lock")
                            .insert(interval, permit);
                        me.feed(&slot, Event::Granted { interval });
                    });
                }
                Command::ReleaseGrant { interval } => {
                    slot.grants.lock().expect("grants lock").remove(&interval);
                }
                Command::Reject { op, error } => {
                    let w = slot.waiters.lock().expect("waiters lock").remove(&op);
                    let to = match w {
                        Some(Waiter::Mutation(to)) | Some(Waiter::Read { to, .. }) => to,
                        None => continue,
                    };
                    to.send(pg_err(error));
                }
            }
        }
    }

    /// Queues a mutation for OSD `to`; false if it cannot even be queued.
    /// `encoded`: the replica request of the last version encoded, reused for the next
    /// replica of the same mutation (the engine emits one Apply per OSD, in a row).
    fn apply_on(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        to: OsdId,
        version: ObjVersion,
        object: String,
        mutation: Mutation,
        encoded: &mut Option<(ObjVersion, wire::Payload)>,
    ) -> bool {
        if to == self.id {
            let job = ApplyJob {
                object,
                version,
                mutation,
                done: Applied::Engine(slot.clone()),
            };
            return slot.apply_tx.send(job).is_ok();
        }
        let payload = match encoded {
            Some((v, p)) if *v == version => p.clone(),
            _ => {
                let map_epoch = self.map().map(|m| m.epoch).unwrap_or(0);
                let req = OsdRequest::Replica {
                    map_epoch,
                    from: self.id,
                    pg: slot.pg,
                    object,
                    version,
                    mutation,
                };
                match wire::encode_payload(&req) {
                    Ok(p) => {
                        *encoded = Some((version, p.clone()));
                        p
                    }
                    Err(e) => {
                        warn!("cannot encode replica op: {e}");
                        return false;
                    }
                }
            }
        };
        let job = PeerJob {
            slot: slot.clone(),
            payload,
            version,
        };
        self.peer_sender(to).send(job).is_ok()
    }

    fn peer_sender(self: &Arc<Self>, to: OsdId) -> mpsc::UnboundedSender<PeerJob> {
        let mut peers = self.peers.lock().expect("peers lock");
        peers
            .entry(to)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(self.clone().peer_loop(to, rx));
                tx
            })
            .clone()
    }

    /// Puts one peer's replica operations on the wire in order; results come back as
    /// Durable/Failed events.
    async fn peer_loop(self: Arc<Self>, to: OsdId, mut rx: mpsc::UnboundedReceiver<PeerJob>) {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut conn: Option<(String, RpcConn)> = None;
        // Replies awaited, in one task: fewer than the connection's in-flight bound, so
        // sending never waits for a reply this loop has not read yet.
        let mut replies = FuturesUnordered::new();
        loop {
            let job = tokio::select! {
                job = rx.recv(), if replies.len() < store_client::conn::MAX_IN_FLIGHT / 2 => match job {
                    Some(job) => job,
                    None => break,
                },
                Some((job, res)) = replies.next(), if !replies.is_empty() => {
                    self.replica_answered(to, job, res);
                    continue;
                }
            };
            let failed = |job: &PeerJob| Event::Failed {
                version: job.version,
                from: to,
            };
            let addr = self
                .map()
                .and_then(|m| m.osds.get(&to).map(|o| o.addr.clone()));
            let Some(addr) = addr else {
                self.feed(&job.slot, failed(&job));
                continue;
            };
            if conn
                .as_ref()
                .is_none_or(|(a, c)| *a != addr || c.is_closed())
            {
                conn = match RpcConn::connect(&addr, Duration::from_secs(2), OSD_MAX_FRAME_BYTES)
                    .await
                {
                    Ok((c, _)) => Some((addr.clone(), c)),
                    Err(e) => {
                        debug!(peer = to, "replica connection failed: {e}");
                        None
                    }
                };
            }
            let Some((_, c)) = conn.as_ref() else {
                self.feed(&job.slot, failed(&job));
                continue;
            };
            match c.send_raw(job.payload.clone()).await {
                Ok(pending) => replies.push(async move {
                    let res = pending.wait_decoded::<OsdResponse>(REPLICA_TIMEOUT).await;
                    (job, res)
                }),
                Err(e) => {
                    debug!(peer = to, "replica send failed: {e}");
                    conn = None;
                    self.feed(&job.slot, failed(&job));
                }
            }
        }
        while let Some((job, res)) = replies.next().await {
            self.replica_answered(to, job, res);
        }
    }

    /// Feeds a replica's answer to its PG's engine.
    fn replica_answered(
        self: &Arc<Self>,
        to: OsdId,
        job: PeerJob,
        res: Result<OsdResponse, StoreError>,
    ) {
        let version = job.version;
        let ev = match res {
            Ok(OsdResponse::Committed { .. }) => Event::Durable { version, from: to },
            Ok(OsdResponse::NotPrimary { epoch }) => {
                debug!(
                    peer = to,
                    ?version,
                    epoch,
                    "replica has a map in which we are not the primary"
                );
                Event::Superseded {
                    version,
                    from: to,
                    epoch,
                }
            }
            Ok(OsdResponse::Error(error)) => {
                warn!(peer = to, ?version, "replica refused: {error}");
                Event::Refused {
                    version,
                    from: to,
                    error,
                }
            }
            Ok(other) => {
                warn!(peer = to, ?version, "unexpected replica reply: {other:?}");
                Event::Failed { version, from: to }
            }
            Err(e) => {
                debug!(peer = to, "replica op failed: {e}");
                Event::Failed { version, from: to }
            }
        };
        self.feed(&job.slot, ev);
    }

    /// Damaged copies this OSD has repaired from replicas since it started.
    /// Whether a one-shot injected fault swallows this replica operation.
    fn fire_failpoint(&self, object: &str) -> bool {
        let mut fp = self.failpoint.lock().expect("failpoint lock");
        match fp.as_ref() {
            Some(Failpoint::DropReplicaOp { object: o }) if o == object => {
                warn!(object, "failpoint: dropping a replica operation");
                *fp = None;
                true
            }
            _ => false,
        }
    }

    /// The configured pause between recovered objects.
    async fn recovery_pause(&self) {
        if !self.throttle.sleep.is_zero() {
            tokio::time::sleep(self.throttle.sleep).await;
        }
    }

    /// Objects copied or removed, and bytes copied, in recovery since start.
    pub fn recovered(&self) -> (u64, u64) {
        (
            self.recovered.load(Ordering::Relaxed),
            self.recovered_bytes.load(Ordering::Relaxed),
        )
    }

    pub fn repaired(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }

    async fn local_read(&self, pg: Pg, object: &str, op: ClientOpKind) -> OsdResponse {
        let id = ObjectId {
            pool: pg.pool,
            pg: pg.seed,
            name: object.to_string(),
        };
        let res = match op {
            ClientOpKind::Read { offset, len } => {
                match self.store.read_data(&id, offset, len as usize).await {
                    Err(ObjError::Checksum { .. }) => match self.repair(pg, &id).await {
                        Ok(()) => self.store.read_data(&id, offset, len as usize).await,
                        Err(e) => return OsdResponse::Error(e),
                    },
                    other => other,
                }
                .map(OsdResponse::Data)
            }
            ClientOpKind::Allocated { offset, len } => self
                .store
                .allocated(&id, offset, len)
                .await
                .map(OsdResponse::Extents),
            ClientOpKind::Stat => self.store.stat(&id).await.map(|s| {
                OsdResponse::Stat(s.map(|s| ObjStat {
                    size: s.size,
                    version: s.version,
                }))
            }),
            _ => return OsdResponse::Error(StoreError::internal("not a read")),
        };
        if let Err(ObjError::Io(e)) = &res {
            self.device_failed(&format!("reading {object}"), e);
        }
        res.unwrap_or_else(|e| OsdResponse::Error(obj_err(e)))
    }

    /// Rewrites a damaged local object from the first other acting OSD that has a good
    /// copy. Runs inside a read of the object, so no mutation of it can interleave.
    async fn repair(&self, pg: Pg, id: &ObjectId) -> Result<(), StoreError> {
        let map = self.map().ok_or_else(|| StoreError::internal("no map"))?;
        let pool = map
            .pools
            .get(&pg.pool)
            .ok_or_else(|| StoreError::not_found("pool removed"))?;
        let peers: Vec<(OsdId, String)> = map_pg(&map, pool, pg_id(pg))
            .acting
            .into_iter()
            .filter(|o| *o != self.id)
            .filter_map(|o| map.osds.get(&o).map(|i| (o, i.addr.clone())))
            .collect();
        let mut errors = Vec::new();
        for (peer, addr) in peers {
            let res = async {
                let (data, version) = self.fetch_whole(pg, id, &addr).await?;
                // The object keeps its version: damage left by a repair cut short is still
                // caught by the checksums of the next read.
                for (off, piece, _) in pieces(&data, version) {
                    self.store
                        .write(id, off, piece, version)
                        .await
                        .map_err(obj_err)?;
                }
                Ok::<_, StoreError>(())
            }
            .await;
            match res {
                Ok(()) => {
                    self.repaired.fetch_add(1, Ordering::Relaxed);
                    warn!(object = %id, from = peer, "repaired a damaged local copy from a replica");
                    return Ok(());
                }
                Err(e) => errors.push(format!("osd.{peer}: {e}")),
            }
        }
        Err(StoreError::new(
            ErrorCode::Corrupt,
            format!(
                "{id}: the local copy is damaged and no replica could supply a good one ({})",
                if errors.is_empty() {
                    "no other OSD up".to_string()
                } else {
                    errors.join("; ")
                }
            ),
        ))
    }

    async fn fetch_whole(
        &self,
        pg: Pg,
        id: &ObjectId,
        addr: &str,
    ) -> Result<(Bytes, ObjVersion), StoreError> {
        const CHUNK: u32 = 4 << 20;
        let conn = self.peer_conn(addr).await?;
        let mut out = bytes::BytesMut::new();
        let mut version = None;
        loop {
            let req = OsdRequest::Fetch {
                pg,
                object: id.name.clone(),
                offset: out.len() as u64,
                len: CHUNK,
            };
            match conn.call::<_, OsdResponse>(&req, REPLICA_TIMEOUT).await? {
                OsdResponse::Fetched {
                    size,
                    version: v,
                    data,
                } => {
                    if version.is_some_and(|old| old != v) {
                        return Err(StoreError::internal("object changed while fetching"));
                    }
                    version = Some(v);
                    out.extend_from_slice(&data);
                    if data.is_empty() || out.len() as u64 >= size {
                        break;
                    }
                }
                OsdResponse::Error(e) => return Err(e),
                other => return Err(StoreError::internal(format!("unexpected reply {other:?}"))),
            }
        }
        Ok((out.freeze(), version.unwrap_or_default()))
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

    /// An OSD's log head of the PG and the state of its copy.
    async fn query_head(
        &self,
        pg: Pg,
        osd: OsdId,
    ) -> Result<(Option<ObjVersion>, PgCopyState), StoreError> {
        if osd == self.id {
            let head = self
                .store
                .pg_log_head(pg.pool, pg.seed)
                .await
                .map_err(obj_err)?;
            let state = self
                .store
                .pg_state(pg.pool, pg.seed)
                .await
                .map_err(obj_err)?;
            return Ok((head, state));
        }
        match self.peer_call(osd, &OsdRequest::PgHead { pg }).await? {
            OsdResponse::Head { head, state } => Ok((head, state)),
            other => Err(StoreError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Records the state of OSD `to`'s copy of the PG (durable on return).
    async fn mark(&self, pg: Pg, to: OsdId, state: PgCopyState) -> Result<(), StoreError> {
        if to == self.id {
            return self
                .store
                .set_pg_state(pg.pool, pg.seed, state)
                .await
                .map_err(obj_err);
        }
        let req = OsdRequest::PgMark {
            map_epoch: self.map().map(|m| m.epoch).unwrap_or(0),
            from: self.id,
            pg,
            state,
        };
        match self.peer_call(to, &req).await? {
            OsdResponse::Marked => Ok(()),
            other => Err(StoreError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// This OSD's objects of a PG with their versions.
    async fn local_objects(&self, pg: Pg) -> Result<BTreeMap<String, ObjVersion>, StoreError> {
        let mut out = BTreeMap::new();
        for name in self.store.list(pg.pool, pg.seed).await.map_err(obj_err)? {
            let id = ObjectId {
                pool: pg.pool,
                pg: pg.seed,
                name: name.clone(),
            };
            if let Some(st) = self.store.stat(&id).await.map_err(obj_err)? {
                out.insert(name, st.version);
            }
        }
        Ok(out)
    }

    async fn remote_objects(
        &self,
        pg: Pg,
        osd: OsdId,
    ) -> Result<BTreeMap<String, ObjVersion>, StoreError> {
        match self.peer_call(osd, &OsdRequest::PgList { pg }).await? {
            OsdResponse::Objects(list) => Ok(list.into_iter().collect()),
            other => Err(StoreError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A PG's objects with their versions on OSD `osd` (this one or another).
    async fn objects_on(
        &self,
        pg: Pg,
        osd: OsdId,
    ) -> Result<BTreeMap<String, ObjVersion>, StoreError> {
        if osd == self.id {
            self.local_objects(pg).await
        } else {
            self.remote_objects(pg, osd).await
        }
    }

    /// Whether round `interval` is still the PG's current one (recovery work of an
    /// earlier round must stop touching the PG).
    fn still_round(&self, slot: &PgSlot, interval: u64) -> Result<(), StoreError> {
        if slot.engine.lock().expect("engine lock").round() == Some(interval) {
            Ok(())
        } else {
            Err(StoreError::new(
                ErrorCode::Unavailable,
                "the PG's interval changed; recovery stopped",
            ))
        }
    }

    /// Peering: what OSD `to` misses against `from`'s authoritative copy (whose head is
    /// `auth_head`). From this OSD's PG log when it is the source and its log covers the
    /// gap; else by comparing the two listings. Before answering, `to` is marked
    /// incomplete if it misses anything, or complete up to `auth_head` if not.
    async fn plan(
        &self,
        pg: Pg,
        from: OsdId,
        to: OsdId,
        auth_head: Option<ObjVersion>,
    ) -> Result<(Vec<(String, Fix)>, RecoveryMode), StoreError> {
        let (head, state) = self.query_head(pg, to).await?;
        let by_log = if from == self.id && state.complete {
            self.log_delta(pg, effective_head(head, state)).await?
        } else {
            None
        };
        let (fixes, mode) = match by_log {
            Some(fixes) => (fixes, RecoveryMode::Log),
            None => {
                let source = self.objects_on(pg, from).await?;
                let target = self.objects_on(pg, to).await?;
                (listing_delta(&source, &target), RecoveryMode::Backfill)
            }
        };
        let new_state = if fixes.is_empty() {
            PgCopyState {
                complete: true,
                log_from: auth_head.max(state.log_from),
            }
        } else {
            PgCopyState {
                complete: false,
                log_from: state.log_from,
            }
        };
        if new_state != state {
            self.mark(pg, to, new_state).await?;
        }
        Ok((fixes, mode))
    }

    /// Brings one object to its authoritative version on every OSD of `fixes`: this OSD
    /// first (from `source`), then the others from this OSD, through their ordered
    /// replica paths. The engine runs no client operation on the object meanwhile.
    async fn recover_object(
        &self,
        slot: &PgSlot,
        object: &str,
        source: OsdId,
        fixes: &[(OsdId, Fix)],
        interval: u64,
    ) -> Result<(), RecoverError> {
        let oid = ObjectId {
            pool: slot.pg.pool,
            pg: slot.pg.seed,
            name: object.to_string(),
        };
        if let Some((_, fix)) = fixes.iter().find(|(o, _)| *o == self.id) {
            self.recover_here(slot, &oid, source, *fix, interval)
                .await?;
        }
        let others: Vec<(OsdId, Fix)> = fixes
            .iter()
            .copied()
            .filter(|(o, _)| *o != self.id)
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let data = match self.store.stat(&oid).await.map_err(obj_err)? {
            Some(st) => {
                let data = self
                    .store
                    .read(&oid, 0, st.size as usize)
                    .await
                    .map_err(obj_err)?;
                Some((data, st.version))
            }
            None => None,
        };
        for (to, fix) in others {
            self.still_round(slot, interval)?;
            self.push_copy(slot.pg, &oid, to, fix, data.as_ref())
                .await?;
            self.recovered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Recovery into this OSD: its copy of `oid` becomes `fix.want`, pulled from `source`.
    async fn recover_here(
        &self,
        slot: &PgSlot,
        oid: &ObjectId,
        source: OsdId,
        fix: Fix,
        interval: u64,
    ) -> Result<(), RecoverError> {
        self.still_round(slot, interval)?;
        let data = match fix.want {
            Some(want) => {
                let addr = self
                    .map()
                    .and_then(|m| m.osds.get(&source).map(|o| o.addr.clone()))
                    .ok_or_else(|| {
                        StoreError::not_found(format!("osd.{source} is not in the map"))
                    })?;
                let (data, got) = self.fetch_whole(slot.pg, oid, &addr).await?;
                if got != want {
                    return Err(RecoverError::Stale(format!(
                        "{oid} is at {got:?} on osd.{source}, not {want:?} as planned"
                    )));
                }
                Some((data, want))
            }
            None => None,
        };
        self.still_round(slot, interval)?;
        if let Some(have) = fix.have {
            self.store.delete(oid, have).await.map_err(|e| match e {
                ObjError::StaleVersion { .. } => RecoverError::Stale(e.to_string()),
                e => obj_err(e).into(),
            })?;
        }
        if let Some((data, want)) = data {
            self.recovered_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            for (off, piece, v) in pieces(&data, want) {
                self.store
                    .write(oid, off, piece, v)
                    .await
                    .map_err(obj_err)?;
            }
        }
        self.recovered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Recovery into OSD `to` from this OSD's copy (`data`: its bytes and version), over
    /// `to`'s ordered replica path.
    async fn push_copy(
        &self,
        pg: Pg,
        oid: &ObjectId,
        to: OsdId,
        fix: Fix,
        data: Option<&(Bytes, ObjVersion)>,
    ) -> Result<(), RecoverError> {
        let send = |version: ObjVersion, mutation: Mutation| {
            let req = OsdRequest::Replica {
                map_epoch: self.map().map(|m| m.epoch).unwrap_or(0),
                from: self.id,
                pg,
                object: oid.name.clone(),
                version,
                mutation,
            };
            async move {
                match self.peer_call(to, &req).await {
                    Ok(OsdResponse::Committed { .. }) => Ok(()),
                    // A replica refuses a removal below what it holds: the plan is stale.
                    Err(e) if e.code == ErrorCode::InvalidArgument => {
                        Err(RecoverError::Stale(format!("osd.{to}: {}", e.message)))
                    }
                    Err(e) => Err(RecoverError::from(StoreError::new(
                        e.code,
                        format!("osd.{to}: {}", e.message),
                    ))),
                    Ok(other) => {
                        Err(StoreError::internal(format!("unexpected reply {other:?}")).into())
                    }
                }
            }
        };
        if let Some(have) = fix.have {
            send(have, Mutation::Delete).await?;
        }
        let Some(want) = fix.want else {
            return Ok(());
        };
        let Some((data, version)) = data else {
            return Err(RecoverError::Stale(format!(
                "{oid} is missing here, but planned at {want:?}"
            )));
        };
        if *version != want {
            return Err(RecoverError::Stale(format!(
                "{oid} is at {version:?} here, not {want:?} as planned"
            )));
        }
        self.recovered_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        for (offset, chunk, v) in pieces(data, want) {
            let mutation = Mutation::Write {
                offset,
                data: chunk.into(),
            };
            send(v, mutation).await?;
        }
        Ok(())
    }

    /// Log-based planning: when this OSD's PG log holds the target's newest entry (and is
    /// a full history from there), only the objects of the entries after it changed. Each
    /// fix removes the target's copy at the target's head version (at or above whatever
    /// it holds) first. None when the log does not cover the gap, or the target has
    /// nothing: then the PG is backfilled.
    async fn log_delta(
        &self,
        pg: Pg,
        target_head: Option<ObjVersion>,
    ) -> Result<Option<Vec<(String, Fix)>>, StoreError> {
        let Some(head) = target_head else {
            return Ok(None);
        };
        let mine = self
            .store
            .pg_state(pg.pool, pg.seed)
            .await
            .map_err(obj_err)?;
        if mine.log_from.is_some_and(|from| head < from) {
            return Ok(None);
        }
        let log = self
            .store
            .pg_log(pg.pool, pg.seed, None, PG_LOG_MAX_ENTRIES as usize + 64)
            .await
            .map_err(obj_err)?;
        let Some(at) = log.iter().position(|e| e.version == head) else {
            return Ok(None);
        };
        let changed: BTreeSet<&str> = log[at + 1..].iter().map(|e| e.object.as_str()).collect();
        let mut fixes = Vec::new();
        for name in changed {
            let id = ObjectId {
                pool: pg.pool,
                pg: pg.seed,
                name: name.to_string(),
            };
            let want = self
                .store
                .stat(&id)
                .await
                .map_err(obj_err)?
                .map(|st| st.version);
            fixes.push((
                name.to_string(),
                Fix {
                    have: Some(head),
                    want,
                },
            ));
        }
        Ok(Some(fixes))
    }

    /// Serves a replica's range of an object to a repairing primary.
    async fn fetch(&self, pg: Pg, object: String, offset: u64, len: u32) -> OsdResponse {
        let id = ObjectId {
            pool: pg.pool,
            pg: pg.seed,
            name: object,
        };
        let st = match self.store.stat(&id).await {
            Ok(Some(st)) => st,
            Ok(None) => {
                return OsdResponse::Error(StoreError::not_found(format!(
                    "{id} does not exist here"
                )))
            }
            Err(e) => return OsdResponse::Error(obj_err(e)),
        };
        match self.store.read(&id, offset, len as usize).await {
            Ok(data) => OsdResponse::Fetched {
                size: st.size,
                version: st.version,
                data,
            },
            Err(e) => OsdResponse::Error(obj_err(e)),
        }
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

    /// A client operation, answered through `to`: at once when it is refused, when the
    /// engine acknowledges it or when its read is done.
    async fn client_op(self: &Arc<Self>, req: ClientReq, to: ReplyTo) {
        let ClientReq {
            map_epoch,
            pg,
            object,
            op,
            guard,
        } = req;
        self.catch_up(map_epoch).await;
        if let ClientOpKind::List = op {
            return to.send(self.list_pg(pg).await);
        }
        let slot = match self.client_slot(pg, &object) {
            Ok(s) => s,
            Err(resp) => return to.send(resp),
        };
        if !slot.seq_loaded.load(Ordering::Acquire) {
            match self.store.pg_log_head(pg.pool, pg.seed).await {
                Ok(head) => {
                    let seq = head.map_or(0, |v| v.seq);
                    slot.engine.lock().expect("engine lock").raise_seq(seq);
                    slot.seq_loaded.store(true, Ordering::Release);
                }
                Err(e) => return to.send(OsdResponse::Error(obj_err(e))),
            }
        }
        self.submit(&slot, object, op, guard.as_ref(), to);
    }

    /// The fast path of a client operation, inline on its connection: taken when this
    /// OSD's map is at least the client's and the PG is loaded, so nothing needs waiting
    /// for; the operation is handed back otherwise.
    fn client_op_now(
        self: &Arc<Self>,
        req: ClientReq,
        to: ReplyTo,
    ) -> Option<(ClientReq, ReplyTo)> {
        let current = self.map().is_some_and(|m| m.epoch >= req.map_epoch);
        if !current || matches!(req.op, ClientOpKind::List) {
            return Some((req, to));
        }
        let slot = match self.client_slot(req.pg, &req.object) {
            Ok(s) => s,
            Err(resp) => {
                to.send(resp);
                return None;
            }
        };
        if !slot.seq_loaded.load(Ordering::Acquire) {
            return Some((req, to));
        }
        self.submit(&slot, req.object, req.op, req.guard.as_ref(), to);
        None
    }

    /// The PG's slot for a client operation, or the answer refusing it.
    fn client_slot(self: &Arc<Self>, pg: Pg, object: &str) -> Result<Arc<PgSlot>, OsdResponse> {
        let Some(map) = self.map() else {
            return Err(OsdResponse::Error(StoreError::new(
                ErrorCode::Unavailable,
                "this OSD has no map yet",
            )));
        };
        let Some(pool) = map.pools.get(&pg.pool) else {
            return Err(OsdResponse::Error(StoreError::not_found(format!(
                "pool {} does not exist",
                pg.pool
            ))));
        };
        if pg.seed >= pool.pg_num || object.is_empty() {
            return Err(OsdResponse::Error(StoreError::invalid(
                "bad PG or empty object name",
            )));
        }
        Ok(self.slot(pg))
    }

    /// Lists a PG's objects, on its primary.
    async fn list_pg(&self, pg: Pg) -> OsdResponse {
        let Some(map) = self.map() else {
            return OsdResponse::Error(StoreError::new(
                ErrorCode::Unavailable,
                "this OSD has no map yet",
            ));
        };
        let Some(pool) = map.pools.get(&pg.pool).filter(|p| pg.seed < p.pg_num) else {
            return OsdResponse::Error(StoreError::not_found(format!(
                "pool {} has no PG {}",
                pg.pool, pg.seed
            )));
        };
        if map_pg(&map, pool, pg_id(pg)).primary != Some(self.id) {
            return OsdResponse::NotPrimary { epoch: map.epoch };
        }
        match self.store.list(pg.pool, pg.seed).await {
            Ok(names) => OsdResponse::Listed(names),
            Err(e) => OsdResponse::Error(obj_err(e)),
        }
    }

    /// Registers a client operation's answer and feeds it to the PG's engine.
    fn submit(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        object: String,
        op: ClientOpKind,
        guard: Option<&WriteGuard>,
        to: ReplyTo,
    ) {
        let op_id = self.next_op.fetch_add(1, Ordering::Relaxed);
        let now_ms = self.now_ms();
        let event = match op {
            ClientOpKind::Mutate(m) => {
                slot.waiters
                    .lock()
                    .expect("waiters lock")
                    .insert(op_id, Waiter::Mutation(to));
                Event::Mutate {
                    op: op_id,
                    object,
                    payload: m,
                    now_ms,
                }
            }
            kind => {
                slot.waiters.lock().expect("waiters lock").insert(
                    op_id,
                    Waiter::Read {
                        to,
                        object: object.clone(),
                        op: kind,
                    },
                );
                Event::Read {
                    op: op_id,
                    object,
                    now_ms,
                }
            }
        };
        if let Err(e) = self.feed_guarded(slot, event, guard) {
            let w = slot.waiters.lock().expect("waiters lock").remove(&op_id);
            if let Some(Waiter::Mutation(to)) | Some(Waiter::Read { to, .. }) = w {
                to.send(OsdResponse::Error(e));
            }
        }
    }

    /// A replica operation from an OSD that, by this OSD's newer map, is not the PG's
    /// primary: refused, so a primary that lost its role cannot keep writing.
    fn stale_primary(&self, map_epoch: u64, from: OsdId, pg: Pg) -> Option<StoreError> {
        let map = self.map()?;
        if map_epoch >= map.epoch {
            return None;
        }
        let pool = map.pools.get(&pg.pool)?;
        let primary = map_pg(&map, pool, pg_id(pg)).primary;
        (primary != Some(from)).then(|| {
            StoreError::new(
                ErrorCode::NotPermitted,
                format!(
                    "osd.{from} is not the primary of {}.{:x} at epoch {} (it sent epoch {map_epoch})",
                    pg.pool, pg.seed, map.epoch
                ),
            )
        })
    }

    /// Replica side: apply in PG order, answer when durable here.
    fn replica_op(
        self: &Arc<Self>,
        pg: Pg,
        object: String,
        version: ObjVersion,
        mutation: Mutation,
        done: Applied,
    ) {
        let slot = self.slot(pg);
        let _ = slot.apply_tx.send(ApplyJob {
            object,
            version,
            mutation,
            done,
        });
    }

    /// Whether `pg` exists in this OSD's map: its pool does, and its seed is below the
    /// pool's pg_num. PG slots (an engine, an apply task) are made only for those.
    fn pg_exists(&self, pg: Pg) -> bool {
        self.map()
            .and_then(|m| m.pools.get(&pg.pool).map(|p| pg.seed < p.pg_num))
            .unwrap_or(false)
    }

    /// Forgets what belongs to things gone from the map: the slots of removed pools' PGs
    /// (pool ids are never reused, and no slot is made for a PG the map lacks, so none comes
    /// back; operations still running finish on the slot they hold), the replica senders
    /// of purged OSDs (ids are never reused; each sender's task ends once its queue is
    /// drained), and kept peer connections to addresses no OSD has.
    fn prune(&self, map: &ClusterMap) {
        let mut pgs = self.pgs.lock().expect("pg table lock");
        let before = pgs.len();
        pgs.retain(|pg, _| map.pools.get(&pg.pool).is_some_and(|p| pg.seed < p.pg_num));
        let gone = before - pgs.len();
        drop(pgs);
        if gone > 0 {
            info!(epoch = map.epoch, "forgot {gone} PG slots of removed pools");
        }
        self.peers
            .lock()
            .expect("peers lock")
            .retain(|osd, _| map.osds.contains_key(osd));
        let addrs: std::collections::HashSet<&str> =
            map.osds.values().map(|o| o.addr.as_str()).collect();
        self.peer_conns_lock()
            .retain(|addr, _| addrs.contains(addr.as_str()));
    }

    /// PG slots and replica senders held now (for tests and reports).
    pub fn table_sizes(&self) -> (usize, usize) {
        let slots = self.pgs.lock().expect("pg table lock").len();
        (slots, self.peers.lock().expect("peers lock").len())
    }

    /// Feeds clock ticks and new maps to every PG engine.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut maps = self.maps.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = maps.changed() => if r.is_err() { return },
            }
            if let Some(map) = self.map() {
                self.prune(&map);
                self.ensure_primary_slots(&map);
            }
            let slots = self.all_slots();
            let now_ms = self.now_ms();
            for s in &slots {
                self.feed(s, Event::Tick { now_ms });
            }
            self.release_backfills(&slots);
            if let Some(map) = self.map() {
                self.announce_finished_backfills(&map, &slots);
            }
        }
    }

    /// Waits for one of the OSD's backfill slots if the PG's recovery is a backfill and
    /// it holds none yet.
    async fn reserve_backfill(&self, slot: &PgSlot) {
        let backfilling = slot.engine.lock().expect("engine lock").recovery_mode()
            == Some(RecoveryMode::Backfill);
        {
            let mut b = slot.backfill.lock().expect("backfill lock");
            if !backfilling || !matches!(*b, Backfill::None) {
                return;
            }
            *b = Backfill::Waiting;
        }
        if let Ok(permit) = self.throttle.backfills.clone().acquire_owned().await {
            *slot.backfill.lock().expect("backfill lock") = Backfill::Held(permit);
        }
    }

    /// Gives back the backfill slots of PGs that have nothing left to backfill.
    fn release_backfills(&self, slots: &[Arc<PgSlot>]) {
        for slot in slots {
            // Engine first, then the reservation: the order every path takes them in.
            let done = slot.engine.lock().expect("engine lock").recovery_mode()
                != Some(RecoveryMode::Backfill);
            let mut b = slot.backfill.lock().expect("backfill lock");
            if done && matches!(*b, Backfill::Held(_)) {
                *b = Backfill::None;
            }
        }
    }

    /// Tells the monitors which remapped PGs this OSD leads are done: every OSD of the
    /// acting set (its pg_temp entry) holds a complete copy, those CRUSH names included,
    /// so the entry can go and the PG map by CRUSH again.
    fn announce_finished_backfills(&self, map: &ClusterMap, slots: &[Arc<PgSlot>]) {
        const REPEAT_AFTER: Duration = Duration::from_secs(2);
        let mut announced = self.temp_announced.lock().expect("announced lock");
        announced.retain(|pg, (entry, _)| map.pg_temp_of(pg.pool, pg.seed) == Some(entry));
        for slot in slots {
            let pg = slot.pg;
            let (Some(entry), Some(pool)) =
                (map.pg_temp_of(pg.pool, pg.seed), map.pools.get(&pg.pool))
            else {
                continue;
            };
            if announced
                .get(&pg)
                .is_some_and(|(_, at)| at.elapsed() < REPEAT_AFTER)
            {
                continue;
            }
            let m = map_pg(map, pool, pg_id(pg));
            let engine = slot.engine.lock().expect("engine lock");
            let done = engine.clean_acting().is_some_and(|acting| {
                acting == m.acting && m.up.iter().all(|o| acting.contains(o))
            });
            drop(engine);
            if done {
                self.announce.temp_done(pg, entry.to_vec());
                announced.insert(pg, (entry.to_vec(), Instant::now()));
            }
        }
    }

    fn all_slots(&self) -> Vec<Arc<PgSlot>> {
        self.pgs
            .lock()
            .expect("pg table lock")
            .values()
            .cloned()
            .collect()
    }

    /// Creates the engine of every PG this OSD is primary of, so each peers (and recovers
    /// its OSDs) as soon as its interval starts, not when a client first touches it.
    /// Placement is computed once per map epoch, whoever asks first (housekeeping on a map
    /// change, or the heartbeat's report).
    fn ensure_primary_slots(self: &Arc<Self>, map: &ClusterMap) {
        if self.primaries_at.fetch_max(map.epoch, Ordering::AcqRel) >= map.epoch {
            return;
        }
        for pool in map.pools.values() {
            let mapper = PoolMapper::new(map, pool);
            for seed in 0..pool.pg_num {
                if mapper.map_seed(seed).primary == Some(self.id) {
                    self.slot(Pg {
                        pool: pool.id,
                        seed,
                    });
                }
            }
        }
    }

    /// The PGs this OSD is primary of that are not active (peering, recovering, inactive),
    /// and the map epoch every PG engine has seen: what it reports to the monitors with its
    /// heartbeats. The current map is fed to every engine first, so the report is true of
    /// that epoch. Bounded by the PG count.
    pub fn busy_pgs(self: &Arc<Self>) -> (u64, Vec<PgReport>) {
        let Some(map) = self.map() else {
            return (0, Vec::new());
        };
        self.ensure_primary_slots(&map);
        let slots = self.all_slots();
        let now_ms = self.now_ms();
        let busy = slots
            .iter()
            .filter_map(|s| {
                self.feed(s, Event::Tick { now_ms });
                let engine = s.engine.lock().expect("engine lock");
                let (phase, epoch) = engine.phase()?;
                let (objects_left, misplaced) = engine.recovery_left();
                // Backfilling only while it holds one of the OSD's backfill slots: a PG
                // that has just asked for one (its reservation task not yet run) waits.
                let held = matches!(
                    *s.backfill.lock().expect("backfill lock"),
                    Backfill::Held(_)
                );
                let phase = match phase {
                    PgPhase::Backfilling if !held => PgPhase::BackfillWait,
                    p => p,
                };
                (phase != PgPhase::Active).then_some(PgReport {
                    pg: s.pg,
                    phase,
                    epoch,
                    objects_left,
                    misplaced,
                })
            })
            .collect();
        (map.epoch, busy)
    }

    /// Claims a PG back from a stray removal, if one runs: it stops before its next step.
    fn claim_stray_now(&self, pg: Pg) -> Option<Arc<StrayRemoval>> {
        let strays = self.strays.lock().expect("strays lock");
        if strays.is_empty() {
            return None;
        }
        let r = strays.get(&pg).cloned()?;
        drop(strays);
        r.claimed.store(true, Ordering::Release);
        Some(r)
    }

    /// [`Self::claim_stray_now`], then waits for the step under way to end, so what is
    /// read of the copy next does not change under the reader.
    async fn claim_stray(&self, pg: Pg) {
        if let Some(r) = self.claim_stray_now(pg) {
            let _step = r.step.lock().await;
        }
    }

    /// Whether this OSD neither serves `pg` nor is named by CRUSH for it, by its map;
    /// None when the pool is gone (its copies can go without asking anybody).
    fn serves(&self, map: &ClusterMap, pg: Pg) -> Option<bool> {
        let pool = map.pools.get(&pg.pool)?;
        if pg.seed >= pool.pg_num {
            return None;
        }
        let m = map_pg(map, pool, pg_id(pg));
        Some(m.acting.contains(&self.id) || m.up.contains(&self.id))
    }

    /// Primary side of `PgStray`: the asker's copy may go once this PG is active and
    /// every OSD of its acting set, which does not include the asker, is complete.
    async fn stray_verdict(self: &Arc<Self>, map_epoch: u64, from: OsdId, pg: Pg) -> OsdResponse {
        self.catch_up(map_epoch).await;
        let Some(map) = self.map() else {
            return OsdResponse::Stray { remove: false };
        };
        let Some(pool) = map.pools.get(&pg.pool).filter(|p| pg.seed < p.pg_num) else {
            return OsdResponse::Stray { remove: true };
        };
        let m = map_pg(&map, pool, pg_id(pg));
        if m.primary != Some(self.id) {
            return OsdResponse::NotPrimary { epoch: map.epoch };
        }
        if m.acting.contains(&from) || m.up.contains(&from) {
            return OsdResponse::Stray { remove: false };
        }
        let Some(slot) = self.pgs.lock().expect("pg table lock").get(&pg).cloned() else {
            return OsdResponse::Stray { remove: false };
        };
        self.feed(
            &slot,
            Event::Tick {
                now_ms: self.now_ms(),
            },
        );
        let engine = slot.engine.lock().expect("engine lock");
        let remove = engine.clean_acting() == Some(m.acting.as_slice());
        OsdResponse::Stray { remove }
    }

    /// Looks for copies of PGs this OSD no longer serves, every few seconds, and removes
    /// each once its primary says the PG is clean without it (or its pool is gone).
    pub async fn sweep_strays(self: Arc<Self>) {
        let mut tick = tokio::time::interval(STRAY_SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pgs = match self.store.pgs().await {
                Ok(p) => p,
                Err(e) => {
                    warn!("listing stored PGs failed: {e}");
                    continue;
                }
            };
            for (pool, seed) in pgs {
                let pg = Pg { pool, seed };
                if let Err(e) = self.clone().remove_if_stray(pg).await {
                    debug!(%pool, seed, "stray copy kept for now: {e}");
                }
            }
        }
    }

    async fn remove_if_stray(self: Arc<Self>, pg: Pg) -> Result<(), StoreError> {
        let Some(map) = self.map() else {
            return Ok(());
        };
        match self.serves(&map, pg) {
            Some(true) => return Ok(()),
            Some(false) => {
                let pool = &map.pools[&pg.pool];
                let primary = map_pg(&map, pool, pg_id(pg)).primary;
                let Some(primary) = primary else {
                    return Ok(());
                };
                let req = OsdRequest::PgStray {
                    map_epoch: map.epoch,
                    from: self.id,
                    pg,
                };
                match self.peer_call(primary, &req).await? {
                    OsdResponse::Stray { remove: true } => {}
                    _ => return Ok(()),
                }
            }
            None => {}
        }
        let removal = Arc::new(StrayRemoval::default());
        self.strays
            .lock()
            .expect("strays lock")
            .insert(pg, removal.clone());
        let res = self.remove_stray(pg, &removal).await;
        self.strays.lock().expect("strays lock").remove(&pg);
        res
    }

    /// Removes a stray copy step by step, until it is gone or claimed back.
    async fn remove_stray(&self, pg: Pg, removal: &StrayRemoval) -> Result<(), StoreError> {
        let mut steps = 0u64;
        loop {
            let _step = removal.step.lock().await;
            let still_stray = self
                .map()
                .is_some_and(|m| self.serves(&m, pg) != Some(true));
            if removal.claimed.load(Ordering::Acquire) || !still_stray {
                debug!(
                    pool = pg.pool,
                    seed = pg.seed,
                    "stray removal stopped: the PG is back"
                );
                return Ok(());
            }
            if steps == 0 {
                let incomplete = PgCopyState {
                    complete: false,
                    log_from: None,
                };
                self.store
                    .set_pg_state(pg.pool, pg.seed, incomplete)
                    .await
                    .map_err(obj_err)?;
            }
            steps += 1;
            if self
                .store
                .remove_pg(pg.pool, pg.seed, STRAY_STEP_OBJECTS)
                .await
                .map_err(obj_err)?
            {
                info!(
                    pool = pg.pool,
                    seed = pg.seed,
                    "removed the stray copy of a PG this OSD no longer serves"
                );
                return Ok(());
            }
        }
    }

    /// Serves the OSD port until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        accept_loop(listener, |stream| self.clone().connection(stream)).await
    }

    async fn connection(self: Arc<Self>, stream: TcpStream) {
        let mut conn = ServerConn::new(stream, OSD_MAX_FRAME_BYTES, PER_CONN_CONCURRENCY);
        let replier = conn.replier();
        let slots = Arc::new(Semaphore::new(PER_CONN_CONCURRENCY));
        while let Some((tag, req)) = conn.next_request::<OsdRequest>().await {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let me = self.clone();
            let replier = replier.clone();
            // Replica mutations are enqueued here, in frame order, so replicas apply in the
            // primary's order; everything else runs in its own task.
            let work: futures::future::BoxFuture<'static, OsdResponse> = match req {
                OsdRequest::Replica {
                    map_epoch,
                    from,
                    pg,
                    object,
                    version,
                    mutation,
                } => {
                    if self.fire_failpoint(&object) {
                        continue;
                    }
                    let stale = match self.stale_primary(map_epoch, from, pg) {
                        None if !self.pg_exists(pg) => Some(StoreError::not_found(format!(
                            "no PG {}.{:x} in this OSD's map",
                            pg.pool, pg.seed
                        ))),
                        other => other,
                    };
                    if let Some(e) = stale {
                        // Not an error for the client: its primary resends it there (a PG
                        // this OSD's map does not have yet: once it has the map).
                        debug!("{}", e.message);
                        let epoch = self.map().map_or(map_epoch, |m| m.epoch);
                        tokio::spawn(async move {
                            let _permit = permit;
                            replier.reply(tag, &OsdResponse::NotPrimary { epoch }).await;
                        });
                        continue;
                    }
                    self.claim_stray_now(pg);
                    // Answered by the PG's apply task once durable here.
                    let done = Applied::Reply {
                        replier: replier.clone(),
                        tag,
                        _slot: permit,
                    };
                    self.replica_op(pg, object, version, mutation, done);
                    continue;
                }
                OsdRequest::Fetch {
                    pg,
                    object,
                    offset,
                    len,
                } => Box::pin(async move { me.fetch(pg, object, offset, len).await }),
                OsdRequest::PgHead { pg } => Box::pin(async move {
                    me.claim_stray(pg).await;
                    match me.query_head(pg, me.id).await {
                        Ok((head, state)) => OsdResponse::Head { head, state },
                        Err(e) => OsdResponse::Error(e),
                    }
                }),
                OsdRequest::PgMark {
                    map_epoch,
                    from,
                    pg,
                    state,
                } => Box::pin(async move {
                    if let Some(e) = me.stale_primary(map_epoch, from, pg) {
                        return OsdResponse::Error(e);
                    }
                    me.claim_stray(pg).await;
                    match me.store.set_pg_state(pg.pool, pg.seed, state).await {
                        Ok(()) => OsdResponse::Marked,
                        Err(e) => OsdResponse::Error(obj_err(e)),
                    }
                }),
                OsdRequest::PgStray {
                    map_epoch,
                    from,
                    pg,
                } => Box::pin(async move { me.stray_verdict(map_epoch, from, pg).await }),
                OsdRequest::PgList { pg } => Box::pin(async move {
                    me.claim_stray(pg).await;
                    match me.local_objects(pg).await {
                        Ok(list) => OsdResponse::Objects(list.into_iter().collect()),
                        Err(e) => OsdResponse::Error(e),
                    }
                }),
                OsdRequest::Client {
                    map_epoch,
                    pg,
                    object,
                    op,
                    guard,
                } => {
                    let to = ReplyTo {
                        replier: replier.clone(),
                        tag,
                        slot: permit,
                        _op: self.ops.start(describe_op(&op, &object, pg)),
                    };
                    let req = ClientReq {
                        map_epoch,
                        pg,
                        object,
                        op,
                        guard,
                    };
                    let Some((req, to)) = self.client_op_now(req, to) else {
                        continue;
                    };
                    tokio::spawn(async move { me.client_op(req, to).await });
                    continue;
                }
            };
            let span = tracing::debug_span!("osd_request", tag);
            tokio::spawn(
                async move {
                    let _permit = permit;
                    let resp = work.await;
                    replier.reply(tag, &resp).await;
                }
                .instrument(span),
            );
        }
        conn.finish().await;
    }
}

/// An object's bytes as (offset, piece, version) writes small enough for one message; an
/// empty object is one empty piece (so it is still created). Every piece but the last
/// carries the lowest version, so a copy cut short never claims the source's version.
fn pg_id(pg: Pg) -> PgId {
    PgId {
        pool: pg.pool,
        seed: pg.seed,
    }
}

fn pieces(data: &Bytes, version: ObjVersion) -> Vec<(u64, Bytes, ObjVersion)> {
    const PIECE: usize = 4 << 20;
    if data.is_empty() {
        return vec![(0, Bytes::new(), version)];
    }
    let starts: Vec<usize> = (0..data.len()).step_by(PIECE).collect();
    let last = starts.len() - 1;
    starts
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let v = if i == last {
                version
            } else {
                ObjVersion::default()
            };
            (o as u64, data.slice(o..(o + PIECE).min(data.len())), v)
        })
        .collect()
}

/// The head peering counts for a copy: what its state says it holds, if that is newer
/// than its log's newest entry (a recovered copy holds objects, not log entries).
fn effective_head(head: Option<ObjVersion>, state: PgCopyState) -> Option<ObjVersion> {
    head.max(state.log_from)
}

/// What makes `target`'s copy of a PG equal to `source`'s: remove what `source` lacks,
/// replace every object whose version differs (removing the target's copy at its own
/// version first).
fn listing_delta(
    source: &BTreeMap<String, ObjVersion>,
    target: &BTreeMap<String, ObjVersion>,
) -> Vec<(String, Fix)> {
    let removes = target
        .iter()
        .filter(|(n, _)| !source.contains_key(*n))
        .map(|(n, v)| {
            let fix = Fix {
                have: Some(*v),
                want: None,
            };
            (n.clone(), fix)
        });
    let copies = source
        .iter()
        .filter(|(n, v)| target.get(*n) != Some(v))
        .map(|(n, v)| {
            let fix = Fix {
                have: target.get(n).copied(),
                want: Some(*v),
            };
            (n.clone(), fix)
        });
    removes.chain(copies).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(epoch: u64, seq: u64) -> ObjVersion {
        ObjVersion { epoch, seq }
    }

    #[test]
    fn listing_delta_removes_extras_and_replaces_what_differs() {
        let source: BTreeMap<String, ObjVersion> = [
            ("a", v(6, 20)),
            ("b", v(6, 19)),
            ("c", v(1, 1)),
            ("same", v(2, 2)),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        let target: BTreeMap<String, ObjVersion> =
            [("b", v(3, 1)), ("gone", v(4, 4)), ("same", v(2, 2))]
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
        let fix = |have, want| Fix { have, want };
        assert_eq!(
            listing_delta(&source, &target),
            vec![
                ("gone".to_string(), fix(Some(v(4, 4)), None)),
                ("a".to_string(), fix(None, Some(v(6, 20)))),
                ("b".to_string(), fix(Some(v(3, 1)), Some(v(6, 19)))),
                ("c".to_string(), fix(None, Some(v(1, 1)))),
            ]
        );
    }

    #[test]
    fn a_recovered_copy_counts_as_holding_what_it_was_recovered_to() {
        let state = PgCopyState {
            complete: true,
            log_from: Some(v(5, 50)),
        };
        assert_eq!(effective_head(Some(v(5, 10)), state), Some(v(5, 50)));
        assert_eq!(effective_head(Some(v(6, 1)), state), Some(v(6, 1)));
        assert_eq!(effective_head(None, PgCopyState::default()), None);
    }

    #[test]
    fn only_the_last_piece_carries_the_version() {
        let data = Bytes::from(vec![7u8; (4 << 20) * 2 + 5]);
        let p = pieces(&data, v(9, 9));
        assert_eq!(p.len(), 3);
        assert_eq!(
            p.iter().map(|(o, _, _)| *o).collect::<Vec<_>>(),
            vec![0, 4 << 20, 8 << 20]
        );
        assert_eq!(
            p.iter().map(|(_, _, v)| *v).collect::<Vec<_>>(),
            vec![v(0, 0), v(0, 0), v(9, 9)]
        );
        assert_eq!(p.iter().map(|(_, d, _)| d.len()).sum::<usize>(), data.len());
        assert_eq!(
            pieces(&Bytes::new(), v(1, 1)),
            vec![(0, Bytes::new(), v(1, 1))]
        );
    }
}
