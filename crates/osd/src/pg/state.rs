//! The engine's private state: the PG's phase ([`State`]) with its peering progress and
//! recovery bookkeeping, client operations (queued, gated, in flight), and the per-object
//! gate that keeps reads, mutations and recovery of one object apart.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use store_types::map::OsdId;
use store_types::StoreError;

use super::{Fix, OpId, RecoveryMode, RecoveryPause, Version};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum State {
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
pub(super) struct Peering {
    /// This peering round's id: answers from other rounds are ignored.
    pub(super) interval: u64,
    /// Each acting OSD's (head, complete), once known.
    pub(super) heads: BTreeMap<OsdId, (Option<Version>, bool)>,
    /// The authoritative OSD and its head, once every head is known.
    pub(super) auth: Option<(OsdId, Option<Version>)>,
    /// OSDs whose plan is awaited.
    pub(super) planning: BTreeSet<OsdId>,
    pub(super) plans: BTreeMap<OsdId, (Vec<(String, Fix)>, RecoveryMode)>,
    /// OSDs whose head query or plan failed: retried on the next tick.
    pub(super) failed: BTreeSet<OsdId>,
    /// The map epoch this round started at: what a record of its activation says.
    pub(super) since_epoch: u64,
    /// Plans are done and the acting set is being recorded as the last active set.
    pub(super) recording: bool,
}

/// Whether this PG holds an OSD-wide background recovery slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Grant {
    Idle,
    Asked,
    /// Used by the background recovery of this object.
    Held(String),
}

/// Recovery while active: what each OSD misses, and what is being done about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Recovery {
    /// The authoritative OSD (objects missing on this OSD come from it) and its head.
    pub(super) source: OsdId,
    pub(super) auth_head: Option<Version>,
    pub(super) mode: RecoveryMode,
    pub(super) missing: BTreeMap<String, BTreeMap<OsdId, Fix>>,
    /// Missing copies per OSD; an OSD at zero is marked complete.
    pub(super) left: BTreeMap<OsdId, usize>,
    /// Objects being recovered.
    pub(super) running: BTreeSet<String>,
    /// Objects a client operation waits for: recovered as soon as their gate is free.
    pub(super) urgent: BTreeSet<String>,
    /// Objects whose recovery failed: retried on the next tick.
    pub(super) failed: BTreeSet<String>,
    /// Objects an OSD refused to take this round (e.g. its device is full), with its
    /// error: reads of them go to a copy that has them, mutations fail at once; until
    /// a retry recovers them.
    pub(super) refused: BTreeMap<String, StoreError>,
    /// OSDs marked incomplete and not yet marked complete again.
    pub(super) incomplete: BTreeSet<OsdId>,
    pub(super) marking: BTreeSet<OsdId>,
    pub(super) grant: Grant,
    pub(super) pause: RecoveryPause,
}

impl Recovery {
    pub(super) fn clean(source: OsdId, auth_head: Option<Version>, pause: RecoveryPause) -> Self {
        Recovery {
            source,
            auth_head,
            mode: RecoveryMode::Log,
            missing: BTreeMap::new(),
            left: BTreeMap::new(),
            running: BTreeSet::new(),
            urgent: BTreeSet::new(),
            failed: BTreeSet::new(),
            refused: BTreeMap::new(),
            incomplete: BTreeSet::new(),
            marking: BTreeSet::new(),
            grant: Grant::Idle,
            pause,
        }
    }

    pub(super) fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.incomplete.is_empty()
    }

    pub(super) fn paused(&self) -> bool {
        match self.mode {
            RecoveryMode::Log => self.pause.norecover,
            RecoveryMode::Backfill => self.pause.nobackfill,
        }
    }

    pub(super) fn copies_left(&self) -> u64 {
        self.left.values().map(|n| *n as u64).sum()
    }
}

#[derive(Clone, Debug)]
pub(super) struct Mutation<P> {
    pub(super) op: OpId,
    pub(super) object: String,
    pub(super) payload: P,
    pub(super) arrived_ms: u64,
}

#[derive(Clone, Debug)]
pub(super) struct InFlight<P> {
    pub(super) m: Mutation<P>,
    pub(super) pending: BTreeSet<OsdId>,
    pub(super) acting: usize,
    /// The client was already answered (it timed out): it stays in flight only so the
    /// object's gate and the versions stay right, and is never acknowledged.
    pub(super) answered: bool,
}

#[derive(Clone, Debug)]
pub(super) enum Queued<P> {
    Mutate(Mutation<P>),
    Read {
        op: OpId,
        object: String,
        arrived_ms: u64,
    },
}

impl<P> Queued<P> {
    pub(super) fn op(&self) -> OpId {
        match self {
            Queued::Mutate(m) => m.op,
            Queued::Read { op, .. } => *op,
        }
    }

    pub(super) fn arrived_ms(&self) -> u64 {
        match self {
            Queued::Mutate(m) => m.arrived_ms,
            Queued::Read { arrived_ms, .. } => *arrived_ms,
        }
    }
}

/// Per-object exclusion: reads run together, mutations run together (pipelined, ordered
/// by version), never a read with a mutation, nothing during the object's recovery;
/// arrivals that would break that wait in order.
#[derive(Debug)]
pub(super) struct ObjectGate<P> {
    pub(super) readers: usize,
    pub(super) writers: usize,
    pub(super) recovering: bool,
    pub(super) waiting: VecDeque<Queued<P>>,
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
    pub(super) fn idle(&self) -> bool {
        self.unused() && self.waiting.is_empty()
    }

    /// No operation or recovery runs on the object.
    pub(super) fn unused(&self) -> bool {
        self.readers == 0 && self.writers == 0 && !self.recovering
    }

    pub(super) fn admits(&self, q: &Queued<P>) -> bool {
        !self.recovering
            && match q {
                Queued::Mutate(_) => self.readers == 0,
                Queued::Read { .. } => self.writers == 0,
            }
    }
}
