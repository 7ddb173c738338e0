//! The engine runtime: feeds events (after the current map) to a PG's engine while holding
//! it, and carries out the commands the engine emits, without blocking.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use store_objstore::ObjectStore;
use store_placement::map_pg;
use store_types::map::{Flag, OsdId, WriteGuard};
use store_types::osdmsg::{Mutation, OsdResponse, PgCopyState};
use store_types::{ErrorCode, StoreError};
use tracing::{debug, info, warn};

use crate::pg::{Command, Event, OpId, PgError, RecoveryPause};

use super::client::Waiter;
use super::peering::effective_head;
use super::{pg_id, OsdService, PgSlot};

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

impl<S: ObjectStore> OsdService<S> {
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
    pub(super) fn feed(self: &Arc<Self>, slot: &Arc<PgSlot>, event: Event<Mutation>) {
        let _ = self.feed_guarded(slot, event, None);
    }

    /// Feeds a client event, first checking its write guard against the current map while
    /// holding the engine: a write is ordered only if its lock generation is current at the
    /// moment it is ordered, so no write of an old lock holder can follow one of the new.
    pub(super) fn feed_guarded(
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

    /// Runs a read the engine released: on this OSD's copy, or on `from`'s; the engine
    /// hears when it is done.
    fn release_read(self: &Arc<Self>, slot: &Arc<PgSlot>, op: OpId, from: Option<OsdId>) {
        let waiter = slot.waiters.lock().expect("waiters lock").remove(&op);
        let Some(Waiter::Read {
            to,
            object,
            op: kind,
        }) = waiter
        else {
            return;
        };
        let me = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            me.bounded_read(&slot, object, kind, from, to).await;
            me.feed(&slot, Event::ReadDone { op });
        });
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
                Command::Read { op } => self.release_read(slot, op, None),
                Command::ReadFrom { op, from } => self.release_read(slot, op, Some(from)),
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
}
