//! The primary's replication engine for one placement group, sans-IO.
//!
//! Events in (map intervals, client operations, replica acknowledgements, peering and
//! recovery results, clock ticks), commands out (apply an operation on an OSD, release a
//! read, answer a client, query/plan/recover). The OSD runtime does the I/O: it sends
//! `Apply` commands to each OSD in emission order over one FIFO per peer, and feeds back
//! `Durable`/`Failed` events.
//!
//! Rules (Ceph's primary-copy replication):
//! - only the first OSD of the acting set (the up OSDs of the PG's CRUSH set, in order) is
//!   primary; elsewhere every operation is refused with `NotPrimary`, and the client resends;
//! - the primary orders the PG's mutations and gives each a version (epoch, seq), with seq
//!   growing across intervals;
//! - a mutation is acknowledged only when every OSD of the acting set has made it durable,
//!   and the acting set has at least `min_size` OSDs, or nothing is acknowledged at all;
//! - with fewer than `min_size` OSDs up, the PG is inactive: operations wait (bounded queue)
//!   and fail with `Inactive` after the timeout;
//! - when the interval changes, mutations not yet acknowledged are re-driven in the new
//!   interval with new versions (a write at an offset is idempotent);
//! - a read of an object waits while a mutation of that object is in flight, so a read
//!   never returns data that could still be lost, and always returns acknowledged data.
//!
//! Peering and recovery (Ceph's, simplified; docs/replication.md):
//! - a new interval queries every acting OSD's log head and copy state; the authoritative
//!   copy is the newest head among *complete* copies (a copy is incomplete while a recovery
//!   into it is unfinished); with no complete copy the PG is `Incomplete` and does no I/O;
//! - every other OSD is planned against the authoritative copy (from the PG log when it
//!   covers the gap, else by comparing listings): the plan is the set of objects it misses;
//! - then the PG goes active at once. Objects are recovered in the background, throttled
//!   (one at a time per PG, under an OSD-wide grant), and a client operation that touches
//!   a missing object has that object recovered first; no client operation runs on an
//!   object while it is being recovered;
//! - when a target misses nothing any more it is marked complete again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use store_types::map::OsdId;
use store_types::StoreError;

pub use store_types::osdmsg::PgPhase;

/// Version of a mutation: (map epoch when ordered, sequence within the PG).
pub use store_types::osdmsg::ObjVersion as Version;

/// The runtime's id for a client operation.
pub type OpId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgError {
    /// This OSD is not the PG's primary at `epoch`: resend to the primary of a newer map.
    NotPrimary { epoch: u64 },
    /// Fewer than min_size OSDs up for longer than the op timeout.
    Inactive {
        up: usize,
        min_size: u32,
        waited_ms: u64,
    },
    /// Too many operations already wait for this PG.
    QueueFull { limit: usize },
    /// An OSD refused the mutation (e.g. its device is full): not acknowledged.
    Refused { osd: OsdId, error: StoreError },
    /// The PG did not finish peering within the op timeout.
    Peering { waited_ms: u64 },
    /// No OSD of the acting set holds a complete copy of the PG.
    Incomplete { waited_ms: u64 },
    /// The OSDs that last served the PG are down.
    Down {
        waiting_for: Vec<OsdId>,
        waited_ms: u64,
    },
    /// The PG is active, but the operation was not done within the op timeout: it waited
    /// for what `waiting_for` says. Never acknowledged; the client may resend it.
    Blocked { waiting_for: String, waited_ms: u64 },
    /// The object the operation needs could not be recovered: an OSD refused it (e.g. its
    /// device is full). Background recovery keeps trying; the operation fails now.
    RecoveryFailed { object: String, error: StoreError },
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::NotPrimary { epoch } => write!(f, "not the primary at map epoch {epoch}"),
            PgError::Inactive {
                up,
                min_size,
                waited_ms,
            } => write!(
                f,
                "PG inactive: {up} OSDs up, min_size {min_size}; waited {waited_ms} ms"
            ),
            PgError::QueueFull { limit } => write!(f, "PG queue full ({limit} operations waiting)"),
            PgError::Refused { osd, error } => write!(f, "osd.{osd} refused the write: {error}"),
            PgError::Peering { waited_ms } => write!(
                f,
                "PG still peering (its OSDs are catching up) after {waited_ms} ms"
            ),
            PgError::Incomplete { waited_ms } => write!(
                f,
                "PG incomplete: no up OSD holds a complete copy; waited {waited_ms} ms for one to return"
            ),
            PgError::Down {
                waiting_for,
                waited_ms,
            } => write!(
                f,
                "PG down: the OSDs that last served it ({}) are down; waited {waited_ms} ms for one to return",
                waiting_for
                    .iter()
                    .map(|o| format!("osd.{o}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            PgError::Blocked {
                waiting_for,
                waited_ms,
            } => write!(
                f,
                "operation not done after {waited_ms} ms: waited for {waiting_for}"
            ),
            PgError::RecoveryFailed { object, error } => {
                write!(f, "cannot recover {object} first: {error}")
            }
        }
    }
}

/// Why the recovery of an object failed: what the engine does next depends on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryFailure {
    /// A passing fault (a peer unreachable, a round that ended): retried on a tick.
    Transient,
    /// A copy is not at the version the plan says: the plan is stale (a mutation of an
    /// earlier interval landed after the heads and listings were read). Retrying the same
    /// plan can never succeed, so the PG peers again, which plans from what is there now.
    StalePlan,
    /// An OSD refused the object (e.g. its device is full): the operations waiting for
    /// it fail at once with this error, and background recovery keeps retrying.
    Refused(StoreError),
}

/// What one OSD's copy of an object needs to equal the authoritative copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fix {
    /// A version at or above the one the target holds (None: it lacks the object); its
    /// stale copy is removed at this version first.
    pub have: Option<Version>,
    /// The authoritative version (None: the object must be removed).
    pub want: Option<Version>,
}

/// How a recovery plan was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecoveryMode {
    /// From the authoritative PG log: only the objects changed since the target's head.
    Log,
    /// By comparing the two copies' whole object listings.
    Backfill,
}

/// Cluster flags that hold recovery back (Ceph's `norecover` and `nobackfill`); objects a
/// client touches are still recovered, or its I/O could not go on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryPause {
    pub norecover: bool,
    pub nobackfill: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// A new map epoch: the PG's acting set (primary first) and pool min_size.
    Map {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        /// The pool's size: copies missing beyond it are misplaced, not degraded.
        size: u32,
        /// Changes when an acting OSD restarted (its up_from): a restart is a new interval
        /// even with the same acting set, as in Ceph.
        incarnation: u64,
        pause: RecoveryPause,
        /// The PG's last active set as the map records it (empty: nothing recorded).
        history: Vec<OsdId>,
    },
    /// A client mutation of `object`.
    Mutate {
        op: OpId,
        object: String,
        payload: P,
        now_ms: u64,
    },
    /// A client read of `object`.
    Read {
        op: OpId,
        object: String,
        now_ms: u64,
    },
    /// A read released by [`Command::Read`] is done (the runtime answered the client).
    ReadDone {
        op: OpId,
    },
    /// OSD `from` made mutation `version` durable.
    Durable {
        version: Version,
        from: OsdId,
    },
    /// OSD `from` answered that it will not apply `version` (an error, not a lost
    /// connection): the mutation fails now, unacknowledged.
    Refused {
        version: Version,
        from: OsdId,
        error: StoreError,
    },
    /// OSD `from` refused `version` because its map, at `epoch`, no longer makes this OSD
    /// the PG's primary: the mutation fails unacknowledged with `NotPrimary`, so the
    /// client resends it once it has that map (every operation is idempotent).
    Superseded {
        version: Version,
        from: OsdId,
        epoch: u64,
    },
    /// OSD `from` could not apply `version`; it waits for the next interval.
    Failed {
        version: Version,
        from: OsdId,
    },
    Tick {
        now_ms: u64,
    },
    /// Peering: OSD `from`'s PG log head (counting what its state says it holds) and
    /// whether its copy is complete, asked for in round `interval`.
    Head {
        from: OsdId,
        interval: u64,
        head: Option<Version>,
        complete: bool,
    },
    /// Peering: what OSD `to` misses against the authoritative copy. The runtime has
    /// marked `to` incomplete (durably) when `fixes` is not empty.
    Planned {
        to: OsdId,
        interval: u64,
        fixes: Vec<(String, Fix)>,
        mode: RecoveryMode,
    },
    /// Recovery: every OSD of [`Command::RecoverObject`] now holds the object.
    ObjectRecovered {
        object: String,
        interval: u64,
    },
    /// Recovery of an object failed; what happens next depends on `cause`.
    ObjectFailed {
        object: String,
        interval: u64,
        cause: RecoveryFailure,
    },
    /// OSD `to` is marked complete again.
    Completed {
        to: OsdId,
        interval: u64,
    },
    /// An OSD-wide background recovery slot for round `interval` (after
    /// [`Command::WantGrant`]).
    Granted {
        interval: u64,
    },
    /// A head query, plan or mark involving `osd` failed; retried on a tick.
    PeerFailed {
        osd: OsdId,
        interval: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<P> {
    /// Apply a mutation on OSD `to` (this OSD included) and report Durable or Failed.
    Apply {
        to: OsdId,
        version: Version,
        object: String,
        payload: P,
    },
    /// Serve this read from the local store now.
    Read { op: OpId },
    /// A mutation is durable on the whole acting set.
    Acked { op: OpId, version: Version },
    /// An operation failed.
    Reject { op: OpId, error: PgError },
    /// Peering: ask OSD `to` (this one included) for its PG log head and copy state.
    QueryHead { to: OsdId, interval: u64 },
    /// Peering: find what OSD `to` misses against `from`'s (authoritative) copy, whose
    /// head is `auth_head`; mark `to` incomplete if it misses anything, complete (holding
    /// everything to `auth_head`) if not. Answer with `Planned`.
    Plan {
        from: OsdId,
        to: OsdId,
        interval: u64,
        auth_head: Option<Version>,
    },
    /// Recovery: bring `object` to its authoritative version on each OSD of `fixes`,
    /// this OSD first (from `source`), then the others from this OSD. `background` ones
    /// use the grant of this round. Answer with `ObjectRecovered` or `ObjectFailed`.
    RecoverObject {
        object: String,
        source: OsdId,
        fixes: Vec<(OsdId, Fix)>,
        interval: u64,
        background: bool,
    },
    /// Recovery: OSD `to` misses nothing; mark its copy complete, holding everything up
    /// to `log_from`. Answer with `Completed` (or `PeerFailed`).
    MarkComplete {
        to: OsdId,
        interval: u64,
        log_from: Option<Version>,
    },
    /// Peering: have the monitors record `osds` as the PG's last active set, for an
    /// interval that started at map epoch `since_epoch`. The PG goes active once a map
    /// shows the record (repeated on ticks until then).
    RecordActive { since_epoch: u64, osds: Vec<OsdId> },
    /// Ask for an OSD-wide background recovery slot; answer with `Granted`.
    WantGrant { interval: u64 },
    /// Give back the slot granted for round `interval`, unused.
    ReleaseGrant { interval: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// No map seen yet.
    Unknown,
    NotPrimary {
        epoch: u64,
    },
    Inactive {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
    },
    /// A new interval: the acting OSDs agree on the authoritative copy and what each
    /// misses, before any I/O.
    Peering {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        p: Peering,
    },
    /// No acting OSD holds a complete copy: no I/O until the map changes.
    Incomplete {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
    },
    /// No OSD of the last active set is here with a complete copy, and some of it is not
    /// here: acknowledged writes may be only on those. No I/O until the map changes (one
    /// of them returns, or is declared lost).
    Down {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        waiting_for: Vec<OsdId>,
    },
    Active {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        round: u64,
        rec: Recovery,
    },
}

/// Progress of peering in one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Peering {
    /// This peering round's id: answers from other rounds are ignored.
    interval: u64,
    /// Each acting OSD's (head, complete), once known.
    heads: BTreeMap<OsdId, (Option<Version>, bool)>,
    /// The authoritative OSD and its head, once every head is known.
    auth: Option<(OsdId, Option<Version>)>,
    /// OSDs whose plan is awaited.
    planning: BTreeSet<OsdId>,
    plans: BTreeMap<OsdId, (Vec<(String, Fix)>, RecoveryMode)>,
    /// OSDs whose head query or plan failed: retried on the next tick.
    failed: BTreeSet<OsdId>,
    /// The map epoch this round started at: what a record of its activation says.
    since_epoch: u64,
    /// Plans are done and the acting set is being recorded as the last active set.
    recording: bool,
}

/// Whether this PG holds an OSD-wide background recovery slot.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Grant {
    Idle,
    Asked,
    /// Used by the background recovery of this object.
    Held(String),
}

/// Recovery while active: what each OSD misses, and what is being done about it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Recovery {
    /// The authoritative OSD (objects missing on this OSD come from it) and its head.
    source: OsdId,
    auth_head: Option<Version>,
    mode: RecoveryMode,
    missing: BTreeMap<String, BTreeMap<OsdId, Fix>>,
    /// Missing copies per OSD; an OSD at zero is marked complete.
    left: BTreeMap<OsdId, usize>,
    /// Objects being recovered.
    running: BTreeSet<String>,
    /// Objects a client operation waits for: recovered as soon as their gate is free.
    urgent: BTreeSet<String>,
    /// Objects whose recovery failed: retried on the next tick.
    failed: BTreeSet<String>,
    /// OSDs marked incomplete and not yet marked complete again.
    incomplete: BTreeSet<OsdId>,
    marking: BTreeSet<OsdId>,
    grant: Grant,
    pause: RecoveryPause,
}

impl Recovery {
    fn clean(source: OsdId, auth_head: Option<Version>, pause: RecoveryPause) -> Self {
        Recovery {
            source,
            auth_head,
            mode: RecoveryMode::Log,
            missing: BTreeMap::new(),
            left: BTreeMap::new(),
            running: BTreeSet::new(),
            urgent: BTreeSet::new(),
            failed: BTreeSet::new(),
            incomplete: BTreeSet::new(),
            marking: BTreeSet::new(),
            grant: Grant::Idle,
            pause,
        }
    }

    fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.incomplete.is_empty()
    }

    fn paused(&self) -> bool {
        match self.mode {
            RecoveryMode::Log => self.pause.norecover,
            RecoveryMode::Backfill => self.pause.nobackfill,
        }
    }

    fn copies_left(&self) -> u64 {
        self.left.values().map(|n| *n as u64).sum()
    }
}

#[derive(Clone, Debug)]
struct Mutation<P> {
    op: OpId,
    object: String,
    payload: P,
    arrived_ms: u64,
}

#[derive(Clone, Debug)]
struct InFlight<P> {
    m: Mutation<P>,
    pending: BTreeSet<OsdId>,
    acting: usize,
    /// The client was already answered (it timed out): it stays in flight only so the
    /// object's gate and the versions stay right, and is never acknowledged.
    answered: bool,
}

#[derive(Clone, Debug)]
enum Queued<P> {
    Mutate(Mutation<P>),
    Read {
        op: OpId,
        object: String,
        arrived_ms: u64,
    },
}

impl<P> Queued<P> {
    fn op(&self) -> OpId {
        match self {
            Queued::Mutate(m) => m.op,
            Queued::Read { op, .. } => *op,
        }
    }

    fn arrived_ms(&self) -> u64 {
        match self {
            Queued::Mutate(m) => m.arrived_ms,
            Queued::Read { arrived_ms, .. } => *arrived_ms,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PgLimits {
    /// How long an operation may wait for an inactive PG.
    pub op_timeout_ms: u64,
    /// Operations that may wait (queued or blocked behind a mutation) per PG.
    pub max_waiting: usize,
}

impl Default for PgLimits {
    fn default() -> Self {
        PgLimits {
            op_timeout_ms: 30_000,
            max_waiting: 4096,
        }
    }
}

/// Per-object exclusion: reads run together, mutations run together (pipelined, ordered
/// by version), never a read with a mutation, nothing during the object's recovery;
/// arrivals that would break that wait in order.
#[derive(Debug)]
struct ObjectGate<P> {
    readers: usize,
    writers: usize,
    recovering: bool,
    waiting: VecDeque<Queued<P>>,
}

impl<P> Default for ObjectGate<P> {
    fn default() -> Self {
        ObjectGate {
            readers: 0,
            writers: 0,
            recovering: false,
            waiting: VecDeque::new(),
        }
    }
}

impl<P> ObjectGate<P> {
    fn idle(&self) -> bool {
        self.unused() && self.waiting.is_empty()
    }

    /// No operation or recovery runs on the object.
    fn unused(&self) -> bool {
        self.readers == 0 && self.writers == 0 && !self.recovering
    }

    fn admits(&self, q: &Queued<P>) -> bool {
        !self.recovering
            && match q {
                Queued::Mutate(_) => self.readers == 0,
                Queued::Read { .. } => self.writers == 0,
            }
    }
}

/// Primary-side state of one PG.
pub struct PgPrimary<P> {
    whoami: OsdId,
    limits: PgLimits,
    state: State,
    last_seq: u64,
    in_flight: BTreeMap<Version, InFlight<P>>,
    /// Operations waiting for an active PG, in arrival order.
    queue: VecDeque<Queued<P>>,
    objects: HashMap<String, ObjectGate<P>>,
    /// Reads released to the runtime and not yet done.
    reads: HashMap<OpId, String>,
    /// Operations waiting in object gates.
    gated: usize,
    incarnation: u64,
    pause: RecoveryPause,
    /// The pool's size and the PG's last active set, from the newest map.
    size: u32,
    history: Vec<OsdId>,
    /// Peering rounds started: each round's id, so answers from earlier rounds are ignored.
    peering_rounds: u64,
    /// The newest clock reading seen (from events that carry one).
    now_ms: u64,
}

impl<P: Clone> PgPrimary<P> {
    /// `last_seq`: the highest sequence this PG has used (from the local PG log).
    pub fn new(whoami: OsdId, last_seq: u64, limits: PgLimits) -> Self {
        PgPrimary {
            whoami,
            limits,
            state: State::Unknown,
            last_seq,
            in_flight: BTreeMap::new(),
            queue: VecDeque::new(),
            objects: HashMap::new(),
            reads: HashMap::new(),
            gated: 0,
            incarnation: 0,
            pause: RecoveryPause::default(),
            size: 0,
            history: Vec::new(),
            peering_rounds: 0,
            now_ms: 0,
        }
    }

    /// Continues sequence numbers after `seq` (from the PG log found on disk).
    pub fn raise_seq(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// The current round's id while peering or active: recovery work of another round
    /// must stop touching the PG.
    pub fn round(&self) -> Option<u64> {
        match &self.state {
            State::Peering { p, .. } => Some(p.interval),
            State::Active { round, .. } => Some(*round),
            _ => None,
        }
    }

    /// How the current round's missing objects were planned, while any are missing.
    pub fn recovery_mode(&self) -> Option<RecoveryMode> {
        match &self.state {
            State::Active { rec, .. } if !rec.missing.is_empty() => Some(rec.mode),
            _ => None,
        }
    }

    /// The acting set while the PG is active and every OSD of it holds a complete copy.
    pub fn clean_acting(&self) -> Option<&[OsdId]> {
        match &self.state {
            State::Active { acting, rec, .. } if rec.is_clean() => Some(acting),
            _ => None,
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    /// What the primary reports to the monitors about this PG: None when it is not the
    /// primary (or has seen no map); the phase and map epoch otherwise.
    pub fn phase(&self) -> Option<(PgPhase, u64)> {
        match &self.state {
            State::Unknown | State::NotPrimary { .. } => None,
            State::Inactive { epoch, .. } => Some((PgPhase::Inactive, *epoch)),
            State::Incomplete { epoch, .. } => Some((PgPhase::Incomplete, *epoch)),
            State::Down { epoch, .. } => Some((PgPhase::Down, *epoch)),
            State::Peering { epoch, .. } => Some((PgPhase::Peering, *epoch)),
            State::Active { epoch, rec, .. } => {
                let phase = match (rec.is_clean(), rec.mode, rec.paused()) {
                    (true, _, _) => PgPhase::Active,
                    (false, RecoveryMode::Log, false) => PgPhase::Recovering,
                    (false, RecoveryMode::Log, true) => PgPhase::RecoveryWait,
                    (false, RecoveryMode::Backfill, false) => PgPhase::Backfilling,
                    (false, RecoveryMode::Backfill, true) => PgPhase::BackfillWait,
                };
                Some((phase, *epoch))
            }
        }
    }

    /// Object copies still to recover in this round, and how many of those are
    /// misplaced rather than degraded: an object whose acting set already holds `size`
    /// complete copies misses only copies beyond its redundancy (a remapped PG filling the
    /// OSDs it moves to).
    pub fn recovery_left(&self) -> (u64, u64) {
        let State::Active { rec, acting, .. } = &self.state else {
            return (0, 0);
        };
        let size = self.size as usize;
        let misplaced = rec
            .missing
            .values()
            .map(|lacking| {
                let present = acting.len().saturating_sub(lacking.len());
                let degraded = size.saturating_sub(present).min(lacking.len());
                (lacking.len() - degraded) as u64
            })
            .sum::<u64>();
        let total = rec.copies_left();
        (total, misplaced.min(total))
    }

    /// Operations not yet answered or released (in flight, queued or gated).
    pub fn outstanding(&self) -> usize {
        self.in_flight.len() + self.queue.len() + self.gated
    }

    /// The one transition function.
    pub fn handle(&mut self, event: Event<P>) -> Vec<Command<P>> {
        let mut out = Vec::new();
        if let Event::Mutate { now_ms, .. } | Event::Read { now_ms, .. } | Event::Tick { now_ms } =
            &event
        {
            self.now_ms = self.now_ms.max(*now_ms);
        }
        match event {
            Event::Map {
                epoch,
                acting,
                min_size,
                size,
                incarnation,
                pause,
                history,
            } => {
                if epoch >= self.epoch() {
                    self.size = size;
                }
                self.on_map(
                    epoch,
                    acting,
                    min_size,
                    incarnation,
                    pause,
                    history,
                    &mut out,
                )
            }
            Event::Mutate {
                op,
                object,
                payload,
                now_ms,
            } => {
                let m = Mutation {
                    op,
                    object,
                    payload,
                    arrived_ms: now_ms,
                };
                self.on_op(Queued::Mutate(m), &mut out)
            }
            Event::Read { op, object, now_ms } => self.on_op(
                Queued::Read {
                    op,
                    object,
                    arrived_ms: now_ms,
                },
                &mut out,
            ),
            Event::ReadDone { op } => self.on_read_done(op, &mut out),
            Event::Durable { version, from } => self.on_durable(version, from, &mut out),
            Event::Failed { version, .. } => {
                // Never acknowledge without that OSD: peer again, which re-drives the op.
                if self.in_flight.contains_key(&version) {
                    self.repeer(&mut out);
                }
            }
            Event::Refused {
                version,
                from,
                error,
            } => {
                if self.in_flight.contains_key(&version) {
                    self.fail_mutation(version, PgError::Refused { osd: from, error }, &mut out);
                    self.repeer(&mut out);
                }
            }
            Event::Superseded {
                version,
                from,
                epoch,
            } => {
                if self.in_flight.contains_key(&version) {
                    debug_assert_ne!(from, self.whoami, "a primary never supersedes itself");
                    self.fail_mutation(version, PgError::NotPrimary { epoch }, &mut out);
                    self.repeer(&mut out);
                }
            }
            Event::Tick { now_ms } => self.on_tick(now_ms, &mut out),
            Event::Head {
                from,
                interval,
                head,
                complete,
            } => self.on_head(from, interval, (head, complete), &mut out),
            Event::Planned {
                to,
                interval,
                fixes,
                mode,
            } => self.on_planned(to, interval, fixes, mode, &mut out),
            Event::ObjectRecovered { object, interval } => {
                self.on_object_done(&object, interval, None, &mut out)
            }
            Event::ObjectFailed {
                object,
                interval,
                cause,
            } => self.on_object_done(&object, interval, Some(cause), &mut out),
            Event::Completed { to, interval } => self.on_completed(to, interval, &mut out),
            Event::Granted { interval } => self.on_granted(interval, &mut out),
            Event::PeerFailed { osd, interval } => self.on_peer_failed(osd, interval),
        }
        out
    }

    fn waiting(&self) -> usize {
        self.queue.len() + self.gated
    }

    fn epoch(&self) -> u64 {
        match &self.state {
            State::Unknown => 0,
            State::NotPrimary { epoch }
            | State::Inactive { epoch, .. }
            | State::Peering { epoch, .. }
            | State::Incomplete { epoch, .. }
            | State::Down { epoch, .. }
            | State::Active { epoch, .. } => *epoch,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_map(
        &mut self,
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        incarnation: u64,
        pause: RecoveryPause,
        history: Vec<OsdId>,
        out: &mut Vec<Command<P>>,
    ) {
        if epoch < self.epoch() {
            return; // maps only move forward
        }
        self.pause = pause;
        let history_changed = history != self.history;
        self.history = history;
        let same_interval = match &self.state {
            State::Active {
                acting: a,
                min_size: m,
                ..
            }
            | State::Inactive {
                acting: a,
                min_size: m,
                ..
            }
            | State::Incomplete {
                acting: a,
                min_size: m,
                ..
            }
            | State::Down {
                acting: a,
                min_size: m,
                ..
            }
            | State::Peering {
                acting: a,
                min_size: m,
                ..
            } => *a == acting && *m == min_size && self.incarnation == incarnation,
            _ => false,
        };
        self.incarnation = incarnation;
        if same_interval {
            self.set_epoch(epoch);
            match &mut self.state {
                State::Active { rec, .. } => rec.pause = pause,
                State::Peering { p, acting, .. }
                    if p.recording && same_osds(&self.history, acting) =>
                {
                    self.activate(out)
                }
                // The last active set changed (an OSD declared lost): look again.
                State::Down { acting, .. } | State::Incomplete { acting, .. }
                    if history_changed =>
                {
                    let acting = std::mem::take(acting);
                    self.start_peering(epoch, acting, min_size, out);
                }
                _ => {}
            }
            self.pump(out);
            return;
        }
        self.requeue_unacknowledged();
        if acting.first() != Some(&self.whoami) {
            self.state = State::NotPrimary { epoch };
            for q in std::mem::take(&mut self.queue) {
                out.push(Command::Reject {
                    op: q.op(),
                    error: PgError::NotPrimary { epoch },
                });
            }
            return;
        }
        if (acting.len() as u32) < min_size.max(1) {
            self.state = State::Inactive {
                epoch,
                acting,
                min_size,
            };
            return;
        }
        self.start_peering(epoch, acting, min_size, out);
    }

    /// Everything not acknowledged goes back to the queue, in its original order per object
    /// (in-flight mutations are older than anything gated behind them); it is re-driven,
    /// with new versions, once the PG is active again. Recoveries of the old round are
    /// forgotten (their results are ignored).
    fn requeue_unacknowledged(&mut self) {
        // Mutations already answered (timed out) are not re-driven: the client has its
        // error and resends if it still wants the write.
        let mut queue: VecDeque<Queued<P>> = std::mem::take(&mut self.in_flight)
            .into_values()
            .filter(|f| !f.answered)
            .map(|f| Queued::Mutate(f.m))
            .collect();
        for gate in self.objects.values_mut() {
            gate.writers = 0;
            gate.recovering = false;
            queue.extend(gate.waiting.drain(..));
        }
        self.gated = 0;
        self.objects.retain(|_, g| !g.idle());
        queue.extend(std::mem::take(&mut self.queue));
        self.queue = queue;
    }

    /// Starts a peering round (new interval, or an OSD of the acting set failed to apply a
    /// mutation): query every acting OSD's PG log head.
    fn start_peering(
        &mut self,
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        out: &mut Vec<Command<P>>,
    ) {
        self.peering_rounds += 1;
        let interval = self.peering_rounds;
        for to in &acting {
            out.push(Command::QueryHead { to: *to, interval });
        }
        self.state = State::Peering {
            epoch,
            acting,
            min_size,
            p: Peering {
                interval,
                heads: BTreeMap::new(),
                auth: None,
                planning: BTreeSet::new(),
                plans: BTreeMap::new(),
                failed: BTreeSet::new(),
                since_epoch: epoch,
                recording: false,
            },
        };
    }

    /// An OSD of the acting set did not apply a mutation (lost connection, or refused): its
    /// copy may now lack it while later ones succeed, so the PG peers again before any
    /// more I/O, which plans that OSD's recovery (or waits for the map to drop it).
    fn repeer(&mut self, out: &mut Vec<Command<P>>) {
        let State::Active {
            epoch,
            acting,
            min_size,
            ..
        } = std::mem::replace(&mut self.state, State::Unknown)
        else {
            return;
        };
        self.requeue_unacknowledged();
        self.start_peering(epoch, acting, min_size, out);
    }

    fn on_head(
        &mut self,
        from: OsdId,
        interval: u64,
        head: (Option<Version>, bool),
        out: &mut Vec<Command<P>>,
    ) {
        let State::Peering { acting, p, .. } = &mut self.state else {
            return;
        };
        if p.interval != interval || !acting.contains(&from) || p.heads.contains_key(&from) {
            return;
        }
        p.heads.insert(from, head);
        p.failed.remove(&from);
        if p.heads.len() == acting.len() {
            self.plan_recovery(out);
        }
    }

    /// With every head known: the authoritative copy is the newest head among the complete
    /// copies of the last active set's OSDs (every acknowledged write is on each of them;
    /// any complete copy when nothing is recorded), this OSD's on a tie, else the first in
    /// acting order. Every other OSD that is behind or incomplete is planned against it.
    /// Without such a copy the PG is down (some of that set is not here) or incomplete.
    fn plan_recovery(&mut self, out: &mut Vec<Command<P>>) {
        let State::Peering {
            epoch,
            acting,
            min_size,
            p,
        } = &mut self.state
        else {
            return;
        };
        let history = &self.history;
        let mut auth: Option<(OsdId, Option<Version>)> = None;
        for o in acting.iter() {
            let (head, complete) = p.heads[o];
            let trusted = history.is_empty() || history.contains(o);
            if complete && trusted && auth.is_none_or(|(_, best)| head > best) {
                auth = Some((*o, head));
            }
        }
        let Some((source, auth_head)) = auth else {
            let waiting_for: Vec<OsdId> = history
                .iter()
                .copied()
                .filter(|o| !acting.contains(o))
                .collect();
            let (epoch, acting, min_size) = (*epoch, std::mem::take(acting), *min_size);
            self.state = if waiting_for.is_empty() {
                State::Incomplete {
                    epoch,
                    acting,
                    min_size,
                }
            } else {
                State::Down {
                    epoch,
                    acting,
                    min_size,
                    waiting_for,
                }
            };
            return;
        };
        p.auth = auth;
        for o in acting.iter() {
            let (head, complete) = p.heads[o];
            // A head newer than the authority's holds writes never acknowledged: planned
            // too, so they are rolled back.
            if *o != source && (!complete || head != auth_head) {
                p.planning.insert(*o);
                out.push(Command::Plan {
                    from: source,
                    to: *o,
                    interval: p.interval,
                    auth_head,
                });
            }
        }
        if p.planning.is_empty() {
            self.planned(out);
        }
    }

    /// Every plan is in (each OSD that misses anything is durably marked incomplete): the
    /// PG goes active once the map records this acting set as its last active set, so a
    /// later peering knows where acknowledged writes are (Ceph's up_thru and past
    /// intervals serve the same end).
    fn planned(&mut self, out: &mut Vec<Command<P>>) {
        let State::Peering { acting, p, .. } = &mut self.state else {
            return;
        };
        if same_osds(&self.history, acting) {
            return self.activate(out);
        }
        p.recording = true;
        out.push(Command::RecordActive {
            since_epoch: p.since_epoch,
            osds: acting.clone(),
        });
    }

    fn on_planned(
        &mut self,
        to: OsdId,
        interval: u64,
        fixes: Vec<(String, Fix)>,
        mode: RecoveryMode,
        out: &mut Vec<Command<P>>,
    ) {
        let State::Peering { p, .. } = &mut self.state else {
            return;
        };
        if p.interval != interval || !p.planning.remove(&to) {
            return;
        }
        p.failed.remove(&to);
        p.plans.insert(to, (fixes, mode));
        if p.planning.is_empty() {
            self.planned(out);
        }
    }

    /// Peering is done: start serving, queued operations first, with the plans as what
    /// each OSD misses.
    fn activate(&mut self, out: &mut Vec<Command<P>>) {
        let State::Peering {
            epoch,
            acting,
            min_size,
            p,
        } = std::mem::replace(&mut self.state, State::Unknown)
        else {
            unreachable!("activate is only called while peering");
        };
        if let Some(seq) = p.heads.values().filter_map(|(h, _)| h.map(|v| v.seq)).max() {
            self.raise_seq(seq);
        }
        let (source, auth_head) = p.auth.expect("activate follows the choice of an authority");
        let mut rec = Recovery::clean(source, auth_head, self.pause);
        for (to, (fixes, mode)) in p.plans {
            if fixes.is_empty() {
                continue;
            }
            rec.mode = rec.mode.max(mode);
            rec.incomplete.insert(to);
            rec.left.insert(to, fixes.len());
            for (object, fix) in fixes {
                rec.missing.entry(object).or_default().insert(to, fix);
            }
        }
        self.state = State::Active {
            epoch,
            acting,
            min_size,
            round: p.interval,
            rec,
        };
        for q in std::mem::take(&mut self.queue) {
            self.admit(q, out);
        }
        self.pump(out);
    }

    fn on_peer_failed(&mut self, osd: OsdId, interval: u64) {
        match &mut self.state {
            State::Peering { p, .. } if p.interval == interval => {
                p.failed.insert(osd);
            }
            State::Active { round, rec, .. } if *round == interval => {
                rec.marking.remove(&osd);
            }
            _ => {}
        }
    }

    /// While peering: expire operations that waited too long, and retry failed head
    /// queries and plans (one attempt per tick).
    fn peering_tick(&mut self, now_ms: u64, out: &mut Vec<Command<P>>) {
        self.expire_queued(now_ms, |waited_ms| PgError::Peering { waited_ms }, out);
        let State::Peering { p, acting, .. } = &mut self.state else {
            return;
        };
        if p.recording {
            out.push(Command::RecordActive {
                since_epoch: p.since_epoch,
                osds: acting.clone(),
            });
        }
        for osd in std::mem::take(&mut p.failed) {
            if !p.heads.contains_key(&osd) {
                out.push(Command::QueryHead {
                    to: osd,
                    interval: p.interval,
                });
            } else if let (Some((from, auth_head)), true) = (p.auth, p.planning.contains(&osd)) {
                out.push(Command::Plan {
                    from,
                    to: osd,
                    interval: p.interval,
                    auth_head,
                });
            }
        }
    }

    /// Rejects queued operations that waited `op_timeout_ms`, with the error `why` gives.
    fn expire_queued(
        &mut self,
        now_ms: u64,
        why: impl Fn(u64) -> PgError,
        out: &mut Vec<Command<P>>,
    ) {
        let timeout = self.limits.op_timeout_ms;
        let (expired, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|q| now_ms.saturating_sub(q.arrived_ms()) >= timeout);
        self.queue = keep;
        for q in expired {
            out.push(Command::Reject {
                op: q.op(),
                error: why(now_ms.saturating_sub(q.arrived_ms())),
            });
        }
    }

    fn set_epoch(&mut self, e: u64) {
        match &mut self.state {
            State::NotPrimary { epoch }
            | State::Inactive { epoch, .. }
            | State::Peering { epoch, .. }
            | State::Incomplete { epoch, .. }
            | State::Down { epoch, .. }
            | State::Active { epoch, .. } => *epoch = e,
            State::Unknown => {}
        }
    }

    fn on_op(&mut self, q: Queued<P>, out: &mut Vec<Command<P>>) {
        match &self.state {
            State::Active { .. } => {
                if self.waiting() >= self.limits.max_waiting && !self.runnable(&q) {
                    return self.reject_full(q, out);
                }
                self.admit(q, out)
            }
            State::NotPrimary { epoch } => out.push(Command::Reject {
                op: q.op(),
                error: PgError::NotPrimary { epoch: *epoch },
            }),
            State::Unknown
            | State::Inactive { .. }
            | State::Peering { .. }
            | State::Incomplete { .. }
            | State::Down { .. } => {
                if self.waiting() >= self.limits.max_waiting {
                    return self.reject_full(q, out);
                }
                self.queue.push_back(q);
            }
        }
    }

    fn reject_full(&self, q: Queued<P>, out: &mut Vec<Command<P>>) {
        out.push(Command::Reject {
            op: q.op(),
            error: PgError::QueueFull {
                limit: self.limits.max_waiting,
            },
        });
    }

    fn object_of(q: &Queued<P>) -> &str {
        match q {
            Queued::Mutate(m) => &m.object,
            Queued::Read { object, .. } => object,
        }
    }

    /// Whether the operation's object must be recovered before it runs: a mutation of an
    /// object any acting OSD misses, or a read of one this OSD misses.
    fn needs_recovery(&self, q: &Queued<P>) -> bool {
        let State::Active { rec, .. } = &self.state else {
            return false;
        };
        rec.missing
            .get(Self::object_of(q))
            .is_some_and(|m| matches!(q, Queued::Mutate(_)) || m.contains_key(&self.whoami))
    }

    /// Whether the operation could run now (nothing ahead of it at its object).
    fn runnable(&self, q: &Queued<P>) -> bool {
        !self.needs_recovery(q)
            && self
                .objects
                .get(Self::object_of(q))
                .is_none_or(|g| g.waiting.is_empty() && g.admits(q))
    }

    /// Runs the operation now if it can, else queues it at its object's gate (and has
    /// the object recovered first if that is what it waits for).
    fn admit(&mut self, q: Queued<P>, out: &mut Vec<Command<P>>) {
        if self.runnable(&q) {
            return self.run(q, out);
        }
        let object = Self::object_of(&q).to_string();
        let recover = self.needs_recovery(&q);
        self.objects
            .entry(object.clone())
            .or_default()
            .waiting
            .push_back(q);
        self.gated += 1;
        if recover {
            if let State::Active { rec, .. } = &mut self.state {
                rec.urgent.insert(object.clone());
            }
            self.start_urgent(&object, out);
        }
    }

    fn run(&mut self, q: Queued<P>, out: &mut Vec<Command<P>>) {
        match q {
            Queued::Mutate(m) => self.start(m, out),
            Queued::Read { op, object, .. } => {
                self.objects.entry(object.clone()).or_default().readers += 1;
                self.reads.insert(op, object);
                out.push(Command::Read { op });
            }
        }
    }

    fn start(&mut self, m: Mutation<P>, out: &mut Vec<Command<P>>) {
        let State::Active { epoch, acting, .. } = &self.state else {
            unreachable!("mutations start only while active");
        };
        self.last_seq += 1;
        let version = Version {
            epoch: *epoch,
            seq: self.last_seq,
        };
        for to in acting {
            out.push(Command::Apply {
                to: *to,
                version,
                object: m.object.clone(),
                payload: m.payload.clone(),
            });
        }
        self.objects.entry(m.object.clone()).or_default().writers += 1;
        let pending = acting.iter().copied().collect();
        let acting = acting.len();
        let f = InFlight {
            m,
            pending,
            acting,
            answered: false,
        };
        self.in_flight.insert(version, f);
    }

    fn on_read_done(&mut self, op: OpId, out: &mut Vec<Command<P>>) {
        let Some(object) = self.reads.remove(&op) else {
            return;
        };
        if let Some(g) = self.objects.get_mut(&object) {
            g.readers = g.readers.saturating_sub(1);
        }
        self.drain_gate(&object, out);
    }

    fn on_durable(&mut self, version: Version, from: OsdId, out: &mut Vec<Command<P>>) {
        let Some(f) = self.in_flight.get_mut(&version) else {
            return; // an acknowledgement from an earlier interval
        };
        f.pending.remove(&from);
        if !f.pending.is_empty() {
            return;
        }
        let f = self.in_flight.remove(&version).expect("present above");
        let State::Active { min_size, .. } = &self.state else {
            unreachable!("in-flight mutations exist only while active");
        };
        assert!(
            f.acting >= *min_size as usize,
            "acknowledging {version:?} with {} copies, below min_size {min_size}",
            f.acting
        );
        if !f.answered {
            out.push(Command::Acked {
                op: f.m.op,
                version,
            });
        }
        if let Some(g) = self.objects.get_mut(&f.m.object) {
            g.writers = g.writers.saturating_sub(1);
        }
        self.drain_gate(&f.m.object, out);
    }

    /// Runs what the object's gate now admits, in order (starting the object's recovery
    /// when that is what the first waits for); forgets idle gates.
    fn drain_gate(&mut self, object: &str, out: &mut Vec<Command<P>>) {
        let active = self.is_active();
        while let Some((g, front)) = self
            .objects
            .get(object)
            .and_then(|g| g.waiting.front().map(|f| (g, f)))
        {
            if !active || !g.admits(front) {
                break;
            }
            if self.needs_recovery(front) {
                self.start_urgent(object, out);
                break;
            }
            let g = self.objects.get_mut(object).expect("present above");
            let q = g.waiting.pop_front().expect("front exists");
            self.gated -= 1;
            self.run(q, out);
        }
        if self.objects.get(object).is_some_and(|g| g.idle()) {
            self.objects.remove(object);
        }
        self.pump(out);
    }

    /// Starts the recovery of an object an operation waits for, unless something runs
    /// on it (then it starts when that ends).
    fn start_urgent(&mut self, object: &str, out: &mut Vec<Command<P>>) {
        let free = self.objects.get(object).is_none_or(|g| g.unused());
        let State::Active { rec, .. } = &self.state else {
            return;
        };
        if free && !rec.running.contains(object) && rec.missing.contains_key(object) {
            self.start_recovery(object.to_string(), false, out);
        }
    }

    fn start_recovery(&mut self, object: String, background: bool, out: &mut Vec<Command<P>>) {
        let State::Active { round, rec, .. } = &mut self.state else {
            return;
        };
        let Some(fixes) = rec.missing.get(&object) else {
            return;
        };
        rec.failed.remove(&object);
        rec.running.insert(object.clone());
        if background {
            rec.grant = Grant::Held(object.clone());
        }
        out.push(Command::RecoverObject {
            object: object.clone(),
            source: rec.source,
            fixes: fixes.iter().map(|(o, f)| (*o, *f)).collect(),
            interval: *round,
            background,
        });
        self.objects.entry(object).or_default().recovering = true;
    }

    /// A recovery ended: `failure` is None when every OSD of it now holds the object.
    fn on_object_done(
        &mut self,
        object: &str,
        interval: u64,
        failure: Option<RecoveryFailure>,
        out: &mut Vec<Command<P>>,
    ) {
        let State::Active { round, rec, .. } = &mut self.state else {
            return;
        };
        if *round != interval || !rec.running.remove(object) {
            return;
        }
        if rec.grant == Grant::Held(object.to_string()) {
            rec.grant = Grant::Idle;
        }
        match &failure {
            None => {
                rec.urgent.remove(object);
                for osd in rec.missing.remove(object).unwrap_or_default().into_keys() {
                    if let Some(n) = rec.left.get_mut(&osd) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
            Some(_) => {
                rec.failed.insert(object.to_string());
            }
        }
        if let Some(g) = self.objects.get_mut(object) {
            g.recovering = false;
        }
        match failure {
            None => self.drain_gate(object, out),
            Some(RecoveryFailure::Transient) => self.pump(out),
            Some(RecoveryFailure::StalePlan) => self.repeer(out),
            Some(RecoveryFailure::Refused(error)) => {
                let object = object.to_string();
                self.reject_gated(&object, out, |_| PgError::RecoveryFailed {
                    object: object.clone(),
                    error: error.clone(),
                });
                self.pump(out);
            }
        }
    }

    /// Rejects the operations waiting at `object`'s gate, with the error `why` gives for
    /// each one's wait in ms.
    fn reject_gated(
        &mut self,
        object: &str,
        out: &mut Vec<Command<P>>,
        why: impl Fn(u64) -> PgError,
    ) {
        let Some(g) = self.objects.get_mut(object) else {
            return;
        };
        let now_ms = self.now_ms;
        for q in g.waiting.drain(..) {
            self.gated -= 1;
            out.push(Command::Reject {
                op: q.op(),
                error: why(now_ms.saturating_sub(q.arrived_ms())),
            });
        }
        if g.idle() {
            self.objects.remove(object);
        }
    }

    fn on_completed(&mut self, to: OsdId, interval: u64, out: &mut Vec<Command<P>>) {
        let State::Active { round, rec, .. } = &mut self.state else {
            return;
        };
        if *round == interval && rec.marking.remove(&to) {
            rec.incomplete.remove(&to);
            rec.left.remove(&to);
        }
        self.pump(out);
    }

    fn on_granted(&mut self, interval: u64, out: &mut Vec<Command<P>>) {
        let next = match &mut self.state {
            State::Active { round, rec, .. } if *round == interval && rec.grant == Grant::Asked => {
                rec.grant = Grant::Idle;
                if rec.paused() {
                    None
                } else {
                    Self::next_background(rec, &self.objects)
                }
            }
            _ => None,
        };
        match next {
            Some(object) => self.start_recovery(object, true, out),
            None => out.push(Command::ReleaseGrant { interval }),
        }
        self.pump(out);
    }

    /// The next object background recovery may take: missing, not being recovered, not
    /// failed this tick, nothing running on it.
    fn next_background(rec: &Recovery, objects: &HashMap<String, ObjectGate<P>>) -> Option<String> {
        rec.missing
            .keys()
            .find(|o| {
                !rec.running.contains(*o)
                    && !rec.failed.contains(*o)
                    && objects.get(*o).is_none_or(|g| g.unused())
            })
            .cloned()
    }

    /// Keeps recovery moving: asks for a background slot while there is work, and marks
    /// OSDs that miss nothing any more complete.
    fn pump(&mut self, out: &mut Vec<Command<P>>) {
        let State::Active { round, rec, .. } = &mut self.state else {
            return;
        };
        if rec.grant == Grant::Idle
            && !rec.paused()
            && Self::next_background(rec, &self.objects).is_some()
        {
            rec.grant = Grant::Asked;
            out.push(Command::WantGrant { interval: *round });
        }
        let done: Vec<OsdId> = rec
            .incomplete
            .iter()
            .copied()
            .filter(|o| rec.left.get(o).is_none_or(|n| *n == 0) && !rec.marking.contains(o))
            .collect();
        for to in done {
            rec.marking.insert(to);
            out.push(Command::MarkComplete {
                to,
                interval: *round,
                log_from: rec.auth_head,
            });
        }
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Command<P>>) {
        match &mut self.state {
            State::Inactive {
                acting, min_size, ..
            } => {
                let (up, min_size) = (acting.len(), *min_size);
                self.expire_queued(
                    now_ms,
                    |waited_ms| PgError::Inactive {
                        up,
                        min_size,
                        waited_ms,
                    },
                    out,
                );
            }
            State::Incomplete { .. } => {
                self.expire_queued(now_ms, |waited_ms| PgError::Incomplete { waited_ms }, out)
            }
            State::Down { waiting_for, .. } => {
                let waiting_for = waiting_for.clone();
                self.expire_queued(
                    now_ms,
                    |waited_ms| PgError::Down {
                        waiting_for: waiting_for.clone(),
                        waited_ms,
                    },
                    out,
                )
            }
            State::Unknown => self.expire_queued(
                now_ms,
                |waited_ms| PgError::Inactive {
                    up: 0,
                    min_size: 0,
                    waited_ms,
                },
                out,
            ),
            State::Peering { .. } => self.peering_tick(now_ms, out),
            State::Active { rec, .. } => {
                // Retry failed recoveries: urgent ones now, the rest in the background.
                let failed = std::mem::take(&mut rec.failed);
                let urgent: Vec<String> = failed
                    .into_iter()
                    .filter(|o| rec.urgent.contains(o))
                    .collect();
                self.expire_active(now_ms, out);
                for object in urgent {
                    self.start_urgent(&object, out);
                }
                self.pump(out);
            }
            State::NotPrimary { .. } => {}
        }
    }

    /// While active, no operation waits past the op timeout: gated operations are
    /// rejected and dropped from their gate; in-flight mutations are answered (never
    /// acknowledged) but stay in flight until their copies answer, so the object's
    /// exclusion and the versions stay right. Each error says what the op waited for.
    fn expire_active(&mut self, now_ms: u64, out: &mut Vec<Command<P>>) {
        let timeout = self.limits.op_timeout_ms;
        let late = |arrived_ms: u64| now_ms.saturating_sub(arrived_ms) >= timeout;
        for f in self.in_flight.values_mut() {
            if f.answered || !late(f.m.arrived_ms) {
                continue;
            }
            f.answered = true;
            let osds: Vec<String> = f.pending.iter().map(|o| format!("osd.{o}")).collect();
            out.push(Command::Reject {
                op: f.m.op,
                error: PgError::Blocked {
                    waiting_for: format!("{} to make {} durable", osds.join(", "), f.m.object),
                    waited_ms: now_ms.saturating_sub(f.m.arrived_ms),
                },
            });
        }
        let blocked: Vec<String> = self
            .objects
            .iter()
            .filter(|(_, g)| g.waiting.iter().any(|q| late(q.arrived_ms())))
            .map(|(o, _)| o.clone())
            .collect();
        for object in blocked {
            let waiting_for = self.gate_blocker(&object);
            let g = self.objects.get_mut(&object).expect("listed above");
            let (expired, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut g.waiting)
                .into_iter()
                .partition(|q| late(q.arrived_ms()));
            g.waiting = keep;
            self.gated -= expired.len();
            for q in expired {
                out.push(Command::Reject {
                    op: q.op(),
                    error: PgError::Blocked {
                        waiting_for: waiting_for.clone(),
                        waited_ms: now_ms.saturating_sub(q.arrived_ms()),
                    },
                });
            }
            self.drain_gate(&object, out);
        }
    }

    /// What the operations at `object`'s gate wait for, as an error names it.
    fn gate_blocker(&self, object: &str) -> String {
        let missing = match &self.state {
            State::Active { rec, .. } => rec.missing.get(object),
            _ => None,
        };
        let g = self.objects.get(object);
        match (missing, g) {
            (Some(m), _) => {
                let osds: Vec<String> = m.keys().map(|o| format!("osd.{o}")).collect();
                format!("the recovery of {object} to {}", osds.join(", "))
            }
            (None, Some(g)) if g.writers > 0 => format!("a mutation of {object} in flight"),
            (None, Some(g)) if g.readers > 0 => format!("reads of {object}"),
            _ => format!("{object}'s earlier operations"),
        }
    }

    /// Answers an in-flight mutation with an error (never acknowledged) and releases its
    /// object.
    fn fail_mutation(&mut self, version: Version, error: PgError, out: &mut Vec<Command<P>>) {
        let Some(f) = self.in_flight.remove(&version) else {
            return; // already answered, or from an earlier interval
        };
        if !f.answered {
            out.push(Command::Reject { op: f.m.op, error });
        }
        if let Some(g) = self.objects.get_mut(&f.m.object) {
            g.writers = g.writers.saturating_sub(1);
        }
        self.drain_gate(&f.m.object, out);
    }
}

/// Whether two OSD lists name the same OSDs (order aside).
fn same_osds(a: &[OsdId], b: &[OsdId]) -> bool {
    a.len() == b.len() && a.iter().all(|o| b.contains(o))
}

#[cfg(test)]
mod tests;
