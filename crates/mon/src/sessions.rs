//! Client session liveness, sans-IO: heartbeats and clock in, verdicts out.
//!
//! Clients (gateways, tools) report every image they have open to every monitor, like OSDs
//! report themselves. The leader uses this to decide whether a lock holder is gone (then a
//! claim breaks the lock, blocklisting the holder) or alive (then the holder is asked to
//! release). A monitor that started less than a grace ago knows too little to call anyone
//! gone.
//!
//! Liveness is measured on the monotonic clock ([`Now::mono_ms`]): a step of the leader's
//! wall clock must neither make a live writer look gone (and its lock broken) nor keep a
//! gone one looking alive.

use std::collections::HashMap;

use store_types::map::{ClusterMap, ImageLock, SessionId};
use store_types::msg::{LockClaim, MapCommand, SessionInfo, SessionReport};

use crate::clock::Now;

/// Bound on tracked sessions, so a misbehaving client cannot grow monitor memory forever.
pub const MAX_SESSIONS: usize = 100_000;
/// Sessions not heard from for this many graces are forgotten.
const FORGET_AFTER_GRACES: u64 = 10;

#[derive(Debug)]
pub struct SessionTable {
    grace_ms: u64,
    /// When this table started watching, on the monotonic clock.
    started_mono_ms: u64,
    /// Each session and when it was last heard from, on the monotonic clock.
    seen: HashMap<SessionId, (SessionInfo, u64)>,
}

/// What the leader knows about a lock holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    Alive,
    /// Not heard from within the grace (and this monitor has been up long enough to know).
    Gone,
    /// Its gateway restarted: a claim from the same place with another process instance.
    Replaced,
}

impl SessionTable {
    pub fn new(grace_ms: u64, now: Now) -> Self {
        SessionTable {
            grace_ms,
            started_mono_ms: now.mono_ms,
            seen: HashMap::new(),
        }
    }

    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    pub fn heartbeat(&mut self, sessions: Vec<SessionInfo>, now: Now) {
        let horizon = self.grace_ms * FORGET_AFTER_GRACES;
        self.seen
            .retain(|_, (_, seen)| now.mono_ms.saturating_sub(*seen) <= horizon);
        for s in sessions {
            if self.seen.len() >= MAX_SESSIONS && !self.seen.contains_key(&s.id) {
                break;
            }
            self.seen.insert(s.id, (s, now.mono_ms));
        }
    }

    pub fn alive(&self, id: SessionId, now: Now) -> bool {
        self.seen
            .get(&id)
            .is_some_and(|(_, seen)| now.mono_ms.saturating_sub(*seen) <= self.grace_ms)
    }

    /// Whether this monitor has watched long enough to call a silent session gone.
    pub fn knows_enough(&self, now: Now) -> bool {
        now.mono_ms.saturating_sub(self.started_mono_ms) > self.grace_ms
    }

    pub fn holder_state(&self, lock: &ImageLock, claim: &LockClaim, now: Now) -> Holder {
        let Some(h) = lock.holder else {
            return Holder::Alive;
        };
        if lock.holder_desc == claim.desc
            && lock.holder_instance != claim.instance
            && lock.holder_instance != 0
        {
            return Holder::Replaced;
        }
        if self.alive(h, now) || !self.knows_enough(now) {
            Holder::Alive
        } else {
            Holder::Gone
        }
    }

    /// The leader's rewrite of a lock claim: a claim on a lock whose holder is gone becomes
    /// a break (blocklist the holder, grant the claimant); anything else goes as is.
    pub fn resolve(&self, map: &ClusterMap, cmd: MapCommand, now: Now) -> MapCommand {
        let MapCommand::LockAcquire(claim) = cmd else {
            return cmd;
        };
        let Some(lock) = map.image_locks.get(&claim.lock_key) else {
            return MapCommand::LockAcquire(claim);
        };
        match (lock.holder, self.holder_state(lock, &claim, now)) {
            (Some(holder), state)
                if holder != claim.session
                    && !map.blocklist.contains_key(&holder)
                    && state != Holder::Alive =>
            {
                let reason = match state {
                    Holder::Replaced => format!("its gateway ({}) restarted", lock.holder_desc),
                    _ => format!(
                        "no heartbeat from it for over {} ms ({})",
                        self.grace_ms, lock.holder_desc
                    ),
                };
                MapCommand::LockBreak {
                    claim,
                    holder,
                    reason,
                }
            }
            _ => MapCommand::LockAcquire(claim),
        }
    }

    /// Sessions for `client ls`: the live ones, and lock holders however silent.
    pub fn report(&self, map: &ClusterMap, now: Now) -> Vec<SessionReport> {
        let holds_lock = |id: SessionId| map.image_locks.values().any(|l| l.holder == Some(id));
        let mut out: Vec<SessionReport> = self
            .seen
            .values()
            .filter(|(info, _)| self.alive(info.id, now) || holds_lock(info.id))
            .map(|(info, seen)| SessionReport {
                info: info.clone(),
                last_seen_ms_ago: now.mono_ms.saturating_sub(*seen),
            })
            .collect();
        out.sort_by_key(|r| r.info.id);
        out
    }

    /// Sessions heard from within the grace.
    pub fn live_count(&self, now: Now) -> usize {
        self.seen.keys().filter(|id| self.alive(**id, now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both clocks at `ms`.
    fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            wall_ms: ms,
        }
    }
    use crate::locks;

    fn claim(session: SessionId, desc: &str, instance: u64) -> LockClaim {
        LockClaim {
            lock_key: "1/x".into(),
            image: "p/x".into(),
            session,
            desc: desc.into(),
            instance,
        }
    }

    fn info(id: SessionId) -> SessionInfo {
        SessionInfo {
            id,
            image: "p/x".into(),
            desc: "gw".into(),
            instance: 1,
        }
    }

    #[test]
    fn a_live_holder_is_asked_a_gone_one_is_broken() {
        let mut map = ClusterMap::new("f");
        locks::acquire(&mut map, &claim(1, "gateway a", 10)).unwrap();
        let mut t = SessionTable::new(1000, at(0));
        t.heartbeat(vec![info(1)], at(0));
        let c = MapCommand::LockAcquire(claim(2, "gateway b", 20));
        // Young monitor: never breaks.
        assert!(matches!(
            t.resolve(&map, c.clone(), at(900)),
            MapCommand::LockAcquire(_)
        ));
        t.heartbeat(vec![info(1)], at(1500));
        assert!(matches!(
            t.resolve(&map, c.clone(), at(2000)),
            MapCommand::LockAcquire(_)
        ));
        // Silent for more than the grace: broken.
        match t.resolve(&map, c.clone(), at(2600)) {
            MapCommand::LockBreak { holder, .. } => assert_eq!(holder, 1),
            other => panic!("{other:?}"),
        }
        // A blocklisted holder needs no break: the claim is granted as is.
        locks::add_blocklist(&mut map, 1, "t", None).unwrap();
        assert!(matches!(
            t.resolve(&map, c, at(2600)),
            MapCommand::LockAcquire(_)
        ));
    }

    #[test]
    fn a_restarted_gateway_replaces_its_old_instance_at_once() {
        let mut map = ClusterMap::new("f");
        locks::acquire(&mut map, &claim(1, "gateway a", 10)).unwrap();
        let mut t = SessionTable::new(1000, at(0));
        t.heartbeat(vec![info(1)], at(0));
        let c = MapCommand::LockAcquire(claim(2, "gateway a", 11));
        assert!(matches!(
            t.resolve(&map, c, at(10)),
            MapCommand::LockBreak { .. }
        ));
        // The same instance (another open of the same gateway) is not a restart.
        let c = MapCommand::LockAcquire(claim(3, "gateway a", 10));
        assert!(matches!(
            t.resolve(&map, c, at(10)),
            MapCommand::LockAcquire(_)
        ));
    }

    const WALL_MS: u64 = 1_700_000_000_000;
    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn a_live_holder_stays_alive_across_a_wall_clock_step() {
        let mut map = ClusterMap::new("f");
        locks::acquire(&mut map, &claim(1, "gateway a", 10)).unwrap();
        let t0 = Now {
            mono_ms: 0,
            wall_ms: WALL_MS,
        };
        let mut t = SessionTable::new(1000, t0);
        t.heartbeat(vec![info(1)], t0.plus_ms(1500));
        // The wall clock steps an hour ahead while 100 ms pass.
        let stepped = Now {
            mono_ms: 1600,
            wall_ms: WALL_MS + 1600 + HOUR_MS,
        };
        assert!(t.alive(1, stepped));
        assert_eq!(t.live_count(stepped), 1);
        assert_eq!(t.report(&map, stepped)[0].last_seen_ms_ago, 100);
        let c = MapCommand::LockAcquire(claim(2, "gateway b", 20));
        assert!(
            matches!(t.resolve(&map, c, stepped), MapCommand::LockAcquire(_)),
            "a live writer's lock is not broken"
        );
    }

    #[test]
    fn a_silent_holder_is_gone_across_a_backward_wall_clock_step() {
        let mut map = ClusterMap::new("f");
        locks::acquire(&mut map, &claim(1, "gateway a", 10)).unwrap();
        let t0 = Now {
            mono_ms: 0,
            wall_ms: WALL_MS,
        };
        let mut t = SessionTable::new(1000, t0);
        t.heartbeat(vec![info(1)], t0);
        // The wall clock steps an hour back; the holder stays silent for 2.5 s.
        let stepped = Now {
            mono_ms: 2500,
            wall_ms: WALL_MS + 2500 - HOUR_MS,
        };
        assert!(!t.alive(1, stepped));
        let c = MapCommand::LockAcquire(claim(2, "gateway b", 20));
        assert!(matches!(
            t.resolve(&map, c, stepped),
            MapCommand::LockBreak { holder: 1, .. }
        ));
    }
}
