//! Backfill reservations: a backfilling PG holds one of the OSD's `osd_max_backfills` slots
//! until it has nothing left to backfill; remapped PGs whose backfill is done are announced
//! to the monitors, so their pg_temp entries can go.

use std::sync::Arc;
use std::time::{Duration, Instant};

use store_objstore::ObjectStore;
use store_placement::map_pg;
use store_types::map::ClusterMap;
use tokio::sync::OwnedSemaphorePermit;

use crate::pg::RecoveryMode;

use super::{pg_id, OsdService, PgSlot};

/// A PG's claim on one of `osd_max_backfills` slots: asked for when it has objects to
/// backfill, held until it has none.
pub(super) enum Backfill {
    None,
    Waiting,
    Held(#[allow(dead_code)] OwnedSemaphorePermit),
}

impl<S: ObjectStore> OsdService<S> {
    /// Waits for one of the OSD's backfill slots if the PG's recovery is a backfill and
    /// it holds none yet.
    pub(super) async fn reserve_backfill(&self, slot: &PgSlot) {
        let backfilling = slot.engine.lock().expect("engine lock").recovery_mode()
            == Some(RecoveryMode::Backfill);
        {
            let mut b = slot.backfill.lock().expect("backfill lock");
            if !backfilling || !matches!(*b, Backfill::None) {
                return;
            }
            *b = Backfill::Waiting;
        }
        if let Ok(permit) = self.throttle.backfills.clone().acquire_owned().await {
            *slot.backfill.lock().expect("backfill lock") = Backfill::Held(permit);
        }
    }

    /// Gives back the backfill slots of PGs that have nothing left to backfill.
    pub(super) fn release_backfills(&self, slots: &[Arc<PgSlot>]) {
        for slot in slots {
            // Engine first, then the reservation: the order every path takes them in.
            let done = slot.engine.lock().expect("engine lock").recovery_mode()
                != Some(RecoveryMode::Backfill);
            let mut b = slot.backfill.lock().expect("backfill lock");
            if done && matches!(*b, Backfill::Held(_)) {
                *b = Backfill::None;
            }
        }
    }

    /// Tells the monitors which remapped PGs this OSD leads are done: every OSD of the
    /// acting set (its pg_temp entry) holds a complete copy, those CRUSH names included,
    /// so the entry can go and the PG map by CRUSH again.
    pub(super) fn announce_finished_backfills(&self, map: &ClusterMap, slots: &[Arc<PgSlot>]) {
        const REPEAT_AFTER: Duration = Duration::from_secs(2);
        let mut announced = self.temp_announced.lock().expect("announced lock");
        announced.retain(|pg, (entry, _)| map.pg_temp_of(pg.pool, pg.seed) == Some(entry));
        for slot in slots {
            let pg = slot.pg;
            let (Some(entry), Some(pool)) =
                (map.pg_temp_of(pg.pool, pg.seed), map.pools.get(&pg.pool))
            else {
                continue;
            };
            if announced
                .get(&pg)
                .is_some_and(|(_, at)| at.elapsed() < REPEAT_AFTER)
            {
                continue;
            }
            let m = map_pg(map, pool, pg_id(pg));
            let engine = slot.engine.lock().expect("engine lock");
            let done = engine.clean_acting().is_some_and(|acting| {
                acting == m.acting && m.up.iter().all(|o| acting.contains(o))
            });
            drop(engine);
            if done {
                self.announce.temp_done(pg, entry.to_vec());
                announced.insert(pg, (entry.to_vec(), Instant::now()));
            }
        }
    }
}
