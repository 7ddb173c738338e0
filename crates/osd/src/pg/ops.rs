//! Client operation handlers: admission (queue, object gate, or run now), mutations
//! ordered and sent to every acting OSD, reads released, acknowledgements on durability,
//! and the object gate draining as operations end.

use std::collections::VecDeque;

use store_types::map::OsdId;

use super::state::{InFlight, Mutation, Queued, State};
use super::{Command, OpId, PgError, PgPrimary, Version};

impl<P: Clone> PgPrimary<P> {
    pub(super) fn on_op(&mut self, q: Queued<P>, out: &mut Vec<Command<P>>) {
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
        let object = Self::object_of(q);
        rec.missing.get(object).is_some_and(|m| match q {
            Queued::Mutate(_) => true,
            // A refused object is read from a copy that has it instead.
            Queued::Read { .. } => {
                m.contains_key(&self.whoami) && !rec.refused.contains_key(object)
            }
        })
    }

    /// An acting OSD that holds `object` at its authoritative version, when this OSD
    /// misses it (the round's source, unless it misses it too).
    fn good_copy(&self, object: &str) -> Option<OsdId> {
        let State::Active { rec, acting, .. } = &self.state else {
            return None;
        };
        let missing = rec.missing.get(object)?;
        if !missing.contains_key(&self.whoami) {
            return None;
        }
        std::iter::once(rec.source)
            .chain(acting.iter().copied())
            .find(|o| !missing.contains_key(o))
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
    pub(super) fn admit(&mut self, q: Queued<P>, out: &mut Vec<Command<P>>) {
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
                let elsewhere = self.good_copy(&object);
                self.objects.entry(object.clone()).or_default().readers += 1;
                self.reads.insert(op, object);
                out.push(match elsewhere {
                    Some(from) => Command::ReadFrom { op, from },
                    None => Command::Read { op },
                });
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

    pub(super) fn on_read_done(&mut self, op: OpId, out: &mut Vec<Command<P>>) {
        let Some(object) = self.reads.remove(&op) else {
            return;
        };
        if let Some(g) = self.objects.get_mut(&object) {
            g.readers = g.readers.saturating_sub(1);
        }
        self.drain_gate(&object, out);
    }

    pub(super) fn on_durable(&mut self, version: Version, from: OsdId, out: &mut Vec<Command<P>>) {
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
    pub(super) fn drain_gate(&mut self, object: &str, out: &mut Vec<Command<P>>) {
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

    /// Rejects the operations waiting at `object`'s gate, with the error `why` gives for
    /// each one's wait in ms.
    pub(super) fn reject_gated(
        &mut self,
        object: &str,
        out: &mut Vec<Command<P>>,
        keep: impl Fn(&Queued<P>) -> bool,
        why: impl Fn(u64) -> PgError,
    ) {
        let Some(g) = self.objects.get_mut(object) else {
            return;
        };
        let now_ms = self.now_ms;
        let (kept, rejected): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut g.waiting)
            .into_iter()
            .partition(|q| keep(q));
        g.waiting = kept;
        for q in rejected {
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

    /// Answers an in-flight mutation with an error (never acknowledged) and releases its
    /// object.
    pub(super) fn fail_mutation(
        &mut self,
        version: Version,
        error: PgError,
        out: &mut Vec<Command<P>>,
    ) {
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
