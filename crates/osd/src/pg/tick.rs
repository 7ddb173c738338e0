//! Clock ticks: operations that waited past the op timeout are answered with what they
//! waited for (per phase), peering retries, and failed recoveries are retried.

use std::collections::VecDeque;

use super::state::State;
use super::{Command, PgError, PgPrimary};

impl<P: Clone> PgPrimary<P> {
    pub(super) fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Command<P>>) {
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

    /// Rejects queued operations that waited `op_timeout_ms`, with the error `why` gives.
    pub(super) fn expire_queued(
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
}
