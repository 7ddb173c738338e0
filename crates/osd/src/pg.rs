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
//!
//! Layout: this file holds the public types and the one transition function,
//! [`PgPrimary::handle`], which hands each event to a handler in `pg/`: `peering` (maps,
//! peering rounds, activation), `ops` (client operations, object gates), `recovery`
//! (recovery while active), `tick` (op timeouts and retries); `state` holds the private
//! state types.

use std::collections::{BTreeMap, HashMap, VecDeque};

use store_types::map::OsdId;
use store_types::StoreError;

mod ops;
mod peering;
mod recovery;
mod state;
mod tick;

use state::{InFlight, Mutation, ObjectGate, Queued, State};

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
    /// Serve this read from OSD `from`'s copy now: this OSD misses the object and could
    /// not recover it (another OSD refused it, e.g. a full device), so a read does not
    /// wait for a recovery that cannot finish.
    ReadFrom { op: OpId, from: OsdId },
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
}

/// Whether two OSD lists name the same OSDs (order aside).
fn same_osds(a: &[OsdId], b: &[OsdId]) -> bool {
    a.len() == b.len() && a.iter().all(|o| b.contains(o))
}

#[cfg(test)]
mod tests;
