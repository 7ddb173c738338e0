//! The primary's replication engine for one placement group, sans-IO.
//!
//! Events in (map intervals, client operations, replica acknowledgements, clock ticks),
//! commands out (apply an operation on an OSD, release a read, answer a client). The OSD
//! runtime does the I/O: it sends `Apply` commands to each OSD in emission order over one
//! FIFO per peer, and feeds back `Durable`/`Failed` events.
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
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// A new map epoch: the PG's acting set (primary first) and pool min_size.
    Map {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        /// Changes when an acting OSD restarted (its up_from): a restart is a new interval
        /// even with the same acting set, as in Ceph.
        incarnation: u64,
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
    /// OSD `from` could not apply `version`; it waits for the next interval.
    Failed {
        version: Version,
        from: OsdId,
    },
    Tick {
        now_ms: u64,
    },
    /// Peering: OSD `from`'s PG log head, asked for in `interval`.
    Head {
        from: OsdId,
        interval: u64,
        head: Option<Version>,
    },
    /// Peering: OSD `to` now holds the newest PG contents.
    Recovered {
        to: OsdId,
        interval: u64,
    },
    /// Peering: a head query or recovery involving `osd` failed; retried on a tick.
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
    /// Peering: ask OSD `to` (this one included) for its PG log head.
    QueryHead { to: OsdId, interval: u64 },
    /// Peering: make OSD `to`'s copy of the PG equal to OSD `from`'s (one of them is this
    /// OSD): objects whose version differs are replaced, objects `from` lacks are removed.
    Recover {
        from: OsdId,
        to: OsdId,
        interval: u64,
    },
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
    /// A new interval: the acting OSDs agree on the newest PG contents before any I/O.
    Peering {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        p: Peering,
    },
    Active {
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
    },
}

/// Progress of peering in one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Peering {
    /// This peering round's id: answers from other rounds are ignored.
    interval: u64,
    /// Each acting OSD's PG log head, once known.
    heads: BTreeMap<OsdId, Option<Version>>,
    /// OSDs being brought up to the newest head.
    recovering: BTreeSet<OsdId>,
    /// OSDs whose head query or recovery failed: retried on the next tick.
    failed: BTreeSet<OsdId>,
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
/// by version), never a read with a mutation; arrivals that would break that wait in order.
#[derive(Debug)]
struct ObjectGate<P> {
    readers: usize,
    writers: usize,
    waiting: VecDeque<Queued<P>>,
}

impl<P> Default for ObjectGate<P> {
    fn default() -> Self {
        ObjectGate {
            readers: 0,
            writers: 0,
            waiting: VecDeque::new(),
        }
    }
}

impl<P> ObjectGate<P> {
    fn idle(&self) -> bool {
        self.readers == 0 && self.writers == 0 && self.waiting.is_empty()
    }

    fn admits(&self, q: &Queued<P>) -> bool {
        match q {
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
            peering_rounds: 0,
            now_ms: 0,
        }
    }

    /// Continues sequence numbers after `seq` (from the PG log found on disk).
    pub fn raise_seq(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// The current peering round's id, while peering.
    pub fn peering_round(&self) -> Option<u64> {
        match &self.state {
            State::Peering { p, .. } => Some(p.interval),
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
            State::Peering { epoch, p, .. } if !p.recovering.is_empty() => {
                Some((PgPhase::Recovering, *epoch))
            }
            State::Peering { epoch, .. } => Some((PgPhase::Peering, *epoch)),
            State::Active { epoch, .. } => Some((PgPhase::Active, *epoch)),
        }
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
                incarnation,
            } => self.on_map(epoch, acting, min_size, incarnation, &mut out),
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
            Event::Tick { now_ms } => self.on_tick(now_ms, &mut out),
            Event::Head {
                from,
                interval,
                head,
            } => self.on_head(from, interval, head, &mut out),
            Event::Recovered { to, interval } => self.on_recovered(to, interval, &mut out),
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
            | State::Active { epoch, .. } => *epoch,
        }
    }

    fn on_map(
        &mut self,
        epoch: u64,
        acting: Vec<OsdId>,
        min_size: u32,
        incarnation: u64,
        out: &mut Vec<Command<P>>,
    ) {
        if epoch < self.epoch() {
            return; // maps only move forward
        }
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
    /// with new versions, once the PG is active again.
    fn requeue_unacknowledged(&mut self) {
        let mut queue: VecDeque<Queued<P>> = std::mem::take(&mut self.in_flight)
            .into_values()
            .map(|f| Queued::Mutate(f.m))
            .collect();
        for gate in self.objects.values_mut() {
            gate.writers = 0;
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
                recovering: BTreeSet::new(),
                failed: BTreeSet::new(),
            },
        };
    }

    /// An OSD of the acting set did not apply a mutation (lost connection, or refused): its
    /// copy may now lack it while later ones succeed, so the PG peers again before any
    /// more I/O, which brings that OSD up to date (or waits for the map to drop it).
    fn repeer(&mut self, out: &mut Vec<Command<P>>) {
        let State::Active {
            epoch,
            acting,
            min_size,
        } = std::mem::replace(&mut self.state, State::Unknown)
        else {
            return;
        };
        self.requeue_unacknowledged();
        self.start_peering(epoch, acting, min_size, out);
    }

    /// Peering is done: start serving, queued operations first.
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
        if let Some(seq) = p.heads.values().flatten().map(|v| v.seq).max() {
            self.raise_seq(seq);
        }
        self.state = State::Active {
            epoch,
            acting,
            min_size,
        };
        for q in std::mem::take(&mut self.queue) {
            self.admit(q, out);
        }
    }

    fn on_head(
        &mut self,
        from: OsdId,
        interval: u64,
        head: Option<Version>,
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

    /// With every head known: bring this OSD to the newest head first (from an OSD that
    /// has it), then every other OSD that is behind (from this one).
    fn plan_recovery(&mut self, out: &mut Vec<Command<P>>) {
        let me = self.whoami;
        let State::Peering { acting, p, .. } = &mut self.state else {
            return;
        };
        let newest = p.heads.values().max().copied().flatten();
        let mine = p.heads.get(&me).copied().flatten();
        if mine < newest {
            let source = acting
                .iter()
                .copied()
                .find(|o| p.heads.get(o).copied().flatten() == newest)
                .expect("the newest head belongs to an acting OSD");
            p.recovering.insert(me);
            out.push(Command::Recover {
                from: source,
                to: me,
                interval: p.interval,
            });
            return;
        }
        let behind: Vec<OsdId> = acting
            .iter()
            .copied()
            .filter(|o| *o != me && p.heads.get(o).copied().flatten() < newest)
            .collect();
        for to in behind {
            p.recovering.insert(to);
            out.push(Command::Recover {
                from: me,
                to,
                interval: p.interval,
            });
        }
        if p.recovering.is_empty() {
            self.activate(out);
        }
    }

    fn on_recovered(&mut self, to: OsdId, interval: u64, out: &mut Vec<Command<P>>) {
        let State::Peering { p, .. } = &mut self.state else {
            return;
        };
        if p.interval != interval || !p.recovering.remove(&to) {
            return;
        }
        let newest = p.heads.values().max().copied().flatten();
        p.heads.insert(to, newest);
        p.failed.remove(&to);
        if p.recovering.is_empty() {
            self.plan_recovery(out);
        }
    }

    fn on_peer_failed(&mut self, osd: OsdId, interval: u64) {
        if let State::Peering { p, .. } = &mut self.state {
            if p.interval == interval {
                p.failed.insert(osd);
            }
        }
    }

    /// While peering: expire operations that waited too long, and retry failed head
    /// queries and recoveries (one attempt per tick).
    fn peering_tick(&mut self, now_ms: u64, out: &mut Vec<Command<P>>) {
        let timeout = self.limits.op_timeout_ms;
        let (expired, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|q| now_ms.saturating_sub(q.arrived_ms()) >= timeout);
        self.queue = keep;
        for q in expired {
            out.push(Command::Reject {
                op: q.op(),
                error: PgError::Peering {
                    waited_ms: now_ms.saturating_sub(q.arrived_ms()),
                },
            });
        }
        let me = self.whoami;
        let State::Peering { p, .. } = &mut self.state else {
            return;
        };
        let newest = p.heads.values().max().copied().flatten();
        for osd in std::mem::take(&mut p.failed) {
            if !p.heads.contains_key(&osd) {
                out.push(Command::QueryHead {
                    to: osd,
                    interval: p.interval,
                });
            } else if p.recovering.contains(&osd) {
                let from = if osd == me {
                    p.heads
                        .iter()
                        .find(|(o, h)| **o != me && **h == newest)
                        .map(|(o, _)| *o)
                        .unwrap_or(me)
                } else {
                    me
                };
                out.push(Command::Recover {
                    from,
                    to: osd,
                    interval: p.interval,
                });
            }
        }
    }

    fn set_epoch(&mut self, e: u64) {
        match &mut self.state {
            State::NotPrimary { epoch }
            | State::Inactive { epoch, .. }
            | State::Peering { epoch, .. }
            | State::Active { epoch, .. } => *epoch = e,
            State::Unknown => {}
        }
    }

    fn on_op(&mut self, q: Queued<P>, out: &mut Vec<Command<P>>) {
        match &self.state {
            State::Active { .. } => {
                if self.waiting() >= self.limits.max_waiting && !self.gate_open(&q) {
                    return self.reject_full(q, out);
                }
                self.admit(q, out)
            }
            State::NotPrimary { epoch } => out.push(Command::Reject {
                op: q.op(),
                error: PgError::NotPrimary { epoch: *epoch },
            }),
            State::Unknown | State::Inactive { .. } | State::Peering { .. } => {
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

    fn gate_open(&self, q: &Queued<P>) -> bool {
        self.objects
            .get(Self::object_of(q))
            .is_none_or(|g| g.waiting.is_empty() && g.admits(q))
    }

    /// Runs the operation now if its object's gate admits it, else queues it at the gate.
    fn admit(&mut self, q: Queued<P>, out: &mut Vec<Command<P>>) {
        if self.gate_open(&q) {
            self.run(q, out);
        } else {
            let object = Self::object_of(&q).to_string();
            self.objects.entry(object).or_default().waiting.push_back(q);
            self.gated += 1;
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
        self.in_flight
            .insert(version, InFlight { m, pending, acting });
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
        out.push(Command::Acked {
            op: f.m.op,
            version,
        });
        if let Some(g) = self.objects.get_mut(&f.m.object) {
            g.writers = g.writers.saturating_sub(1);
        }
        self.drain_gate(&f.m.object, out);
    }

    /// Runs what the object's gate now admits, in order; forgets idle gates.
    fn drain_gate(&mut self, object: &str, out: &mut Vec<Command<P>>) {
        let active = self.is_active();
        loop {
            let Some(g) = self.objects.get_mut(object) else {
                return;
            };
            let runnable = active && g.waiting.front().is_some_and(|q| g.admits(q));
            if !runnable {
                if g.idle() {
                    self.objects.remove(object);
                }
                return;
            }
            let q = g.waiting.pop_front().expect("front exists");
            self.gated -= 1;
            self.run(q, out);
        }
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Command<P>>) {
        let timeout = self.limits.op_timeout_ms;
        let (up, min_size) = match &self.state {
            State::Inactive {
                acting, min_size, ..
            } => (acting.len(), *min_size),
            State::Unknown => (0, 0),
            State::Active { .. } => return,
            State::Peering { .. } => return self.peering_tick(now_ms, out),
            State::NotPrimary { .. } => return,
        };
        let (expired, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|q| now_ms.saturating_sub(q.arrived_ms()) >= timeout);
        self.queue = keep;
        for q in expired {
            out.push(Command::Reject {
                op: q.op(),
                error: PgError::Inactive {
                    up,
                    min_size,
                    waited_ms: now_ms.saturating_sub(q.arrived_ms()),
                },
            });
        }
    }

    /// Answers an in-flight mutation with an error (never acknowledged) and releases its
    /// object.
    fn fail_mutation(&mut self, version: Version, error: PgError, out: &mut Vec<Command<P>>) {
        let Some(f) = self.in_flight.remove(&version) else {
            return; // already answered, or from an earlier interval
        };
        out.push(Command::Reject { op: f.m.op, error });
        if let Some(g) = self.objects.get_mut(&f.m.object) {
            g.writers = g.writers.saturating_sub(1);
        }
        self.drain_gate(&f.m.object, out);
    }
}

#[cfg(test)]
mod tests;
