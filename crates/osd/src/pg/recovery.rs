//! Recovery handlers while active: objects a client operation waits for are recovered
//! first, the rest in the background under an OSD-wide grant; results of each object's
//! recovery, and OSDs marked complete once they miss nothing.

use std::collections::HashMap;

use store_types::map::OsdId;

use super::state::{Grant, ObjectGate, Queued, Recovery, State};
use super::{Command, PgError, PgPrimary, RecoveryFailure};

impl<P: Clone> PgPrimary<P> {
    /// Starts the recovery of an object an operation waits for, unless something runs
    /// on it (then it starts when that ends).
    pub(super) fn start_urgent(&mut self, object: &str, out: &mut Vec<Command<P>>) {
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
    pub(super) fn on_object_done(
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
                rec.refused.remove(object);
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
                // Mutations fail now; reads go to a copy that has the object.
                let object = object.to_string();
                if let State::Active { rec, .. } = &mut self.state {
                    rec.refused.insert(object.clone(), error.clone());
                }
                let is_read = |q: &Queued<P>| matches!(q, Queued::Read { .. });
                self.reject_gated(&object, out, is_read, |_| PgError::RecoveryFailed {
                    object: object.clone(),
                    error: error.clone(),
                });
                self.drain_gate(&object, out);
            }
        }
    }

    pub(super) fn on_completed(&mut self, to: OsdId, interval: u64, out: &mut Vec<Command<P>>) {
        let State::Active { round, rec, .. } = &mut self.state else {
            return;
        };
        if *round == interval && rec.marking.remove(&to) {
            rec.incomplete.remove(&to);
            rec.left.remove(&to);
        }
        self.pump(out);
    }

    pub(super) fn on_granted(&mut self, interval: u64, out: &mut Vec<Command<P>>) {
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
    pub(super) fn pump(&mut self, out: &mut Vec<Command<P>>) {
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
}
