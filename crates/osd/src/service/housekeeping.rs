//! Housekeeping: clock ticks and new maps fed to every PG engine, forgetting what left the
//! map, creating the engines of the PGs this OSD leads, and the report of busy PGs sent with
//! the heartbeats.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use store_objstore::ObjectStore;
use store_placement::PoolMapper;
use store_types::map::ClusterMap;
use store_types::osdmsg::{Pg, PgPhase, PgReport};
use tracing::info;

use crate::pg::Event;

use super::backfill::Backfill;
use super::{OsdService, PgSlot};

impl<S: ObjectStore> OsdService<S> {
    /// Forgets what belongs to things gone from the map: the slots of removed pools' PGs
    /// (pool ids are never reused, and no slot is made for a PG the map lacks, so none comes
    /// back; operations still running finish on the slot they hold), the replica senders
    /// of purged OSDs (ids are never reused; each sender's task ends once its queue is
    /// drained), and kept peer connections to addresses no OSD has.
    fn prune(&self, map: &ClusterMap) {
        let mut pgs = self.pgs.lock().expect("pg table lock");
        let before = pgs.len();
        pgs.retain(|pg, _| map.pools.get(&pg.pool).is_some_and(|p| pg.seed < p.pg_num));
        let gone = before - pgs.len();
        drop(pgs);
        if gone > 0 {
            info!(epoch = map.epoch, "forgot {gone} PG slots of removed pools");
        }
        self.peers
            .lock()
            .expect("peers lock")
            .retain(|osd, _| map.osds.contains_key(osd));
        let addrs: std::collections::HashSet<&str> =
            map.osds.values().map(|o| o.addr.as_str()).collect();
        self.peer_conns_lock()
            .retain(|addr, _| addrs.contains(addr.as_str()));
    }

    /// Feeds clock ticks and new maps to every PG engine.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut maps = self.maps.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = maps.changed() => if r.is_err() { return },
            }
            if let Some(map) = self.map() {
                self.prune(&map);
                self.ensure_primary_slots(&map);
            }
            let slots = self.all_slots();
            let now_ms = self.now_ms();
            for s in &slots {
                self.feed(s, Event::Tick { now_ms });
            }
            self.release_backfills(&slots);
            if let Some(map) = self.map() {
                self.announce_finished_backfills(&map, &slots);
            }
        }
    }

    fn all_slots(&self) -> Vec<Arc<PgSlot>> {
        self.pgs
            .lock()
            .expect("pg table lock")
            .values()
            .cloned()
            .collect()
    }

    /// Creates the engine of every PG this OSD is primary of, so each peers (and recovers
    /// its OSDs) as soon as its interval starts, not when a client first touches it.
    /// Placement is computed once per map epoch, whoever asks first (housekeeping on a map
    /// change, or the heartbeat's report).
    fn ensure_primary_slots(self: &Arc<Self>, map: &ClusterMap) {
        if self.primaries_at.fetch_max(map.epoch, Ordering::AcqRel) >= map.epoch {
            return;
        }
        for pool in map.pools.values() {
            let mapper = PoolMapper::new(map, pool);
            for seed in 0..pool.pg_num {
                if mapper.map_seed(seed).primary == Some(self.id) {
                    self.slot(Pg {
                        pool: pool.id,
                        seed,
                    });
                }
            }
        }
    }

    /// The PGs this OSD is primary of that are not active (peering, recovering, inactive),
    /// and the map epoch every PG engine has seen: what it reports to the monitors with its
    /// heartbeats. The current map is fed to every engine first, so the report is true of
    /// that epoch. Bounded by the PG count.
    pub fn busy_pgs(self: &Arc<Self>) -> (u64, Vec<PgReport>) {
        let Some(map) = self.map() else {
            return (0, Vec::new());
        };
        self.ensure_primary_slots(&map);
        let slots = self.all_slots();
        let now_ms = self.now_ms();
        let busy = slots
            .iter()
            .filter_map(|s| {
                self.feed(s, Event::Tick { now_ms });
                let engine = s.engine.lock().expect("engine lock");
                let (phase, epoch) = engine.phase()?;
                let (objects_left, misplaced) = engine.recovery_left();
                // Backfilling only while it holds one of the OSD's backfill slots: a PG
                // that has just asked for one (its reservation task not yet run) waits.
                let held = matches!(
                    *s.backfill.lock().expect("backfill lock"),
                    Backfill::Held(_)
                );
                let phase = match phase {
                    PgPhase::Backfilling if !held => PgPhase::BackfillWait,
                    p => p,
                };
                (phase != PgPhase::Active).then_some(PgReport {
                    pg: s.pg,
                    phase,
                    epoch,
                    objects_left,
                    misplaced,
                })
            })
            .collect();
        (map.epoch, busy)
    }
}
