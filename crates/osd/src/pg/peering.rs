//! Map and peering handlers: a new map interval (or a failed apply) starts a peering
//! round; head answers choose the authoritative copy, plans say what each other OSD
//! misses, and once the map records the acting set the PG goes active.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use store_types::map::OsdId;

use super::state::{Peering, Queued, Recovery, State};
use super::{same_osds, Command, Fix, PgError, PgPrimary, RecoveryMode, RecoveryPause, Version};

impl<P: Clone> PgPrimary<P> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_map(
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
    pub(super) fn repeer(&mut self, out: &mut Vec<Command<P>>) {
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

    pub(super) fn on_head(
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

    pub(super) fn on_planned(
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

    pub(super) fn on_peer_failed(&mut self, osd: OsdId, interval: u64) {
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
    pub(super) fn peering_tick(&mut self, now_ms: u64, out: &mut Vec<Command<P>>) {
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
}
