//! Stray copies: copies of PGs this OSD no longer serves, found by a periodic sweep and
//! removed step by step once their primary says the PG is clean without them (or the pool is
//! gone); any peering or replica request for the PG claims it back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use store_objstore::ObjectStore;
use store_placement::map_pg;
use store_types::map::{ClusterMap, OsdId};
use store_types::osdmsg::{OsdRequest, OsdResponse, Pg, PgCopyState};
use store_types::StoreError;
use tracing::{debug, info, warn};

use crate::pg::Event;

use super::{obj_err, pg_id, OsdService};

/// A stray copy being removed, step by step. Any peering or replica request for its PG
/// claims it back: the removal stops before its next step (the copy was marked
/// incomplete first, so it is backfilled like an empty one).
#[derive(Default)]
pub(super) struct StrayRemoval {
    claimed: std::sync::atomic::AtomicBool,
    step: tokio::sync::Mutex<()>,
}

/// Objects a stray removal deletes per step.
const STRAY_STEP_OBJECTS: usize = 64;
/// How often an OSD looks for stray copies.
const STRAY_SWEEP_EVERY: Duration = Duration::from_secs(3);

impl<S: ObjectStore> OsdService<S> {
    /// Claims a PG back from a stray removal, if one runs: it stops before its next step.
    pub(super) fn claim_stray_now(&self, pg: Pg) -> Option<Arc<StrayRemoval>> {
        let strays = self.strays.lock().expect("strays lock");
        if strays.is_empty() {
            return None;
        }
        let r = strays.get(&pg).cloned()?;
        drop(strays);
        r.claimed.store(true, Ordering::Release);
        Some(r)
    }

    /// [`Self::claim_stray_now`], then waits for the step under way to end, so what is
    /// read of the copy next does not change under the reader.
    pub(super) async fn claim_stray(&self, pg: Pg) {
        if let Some(r) = self.claim_stray_now(pg) {
            let _step = r.step.lock().await;
        }
    }

    /// Whether this OSD neither serves `pg` nor is named by CRUSH for it, by its map;
    /// None when the pool is gone (its copies can go without asking anybody).
    fn serves(&self, map: &ClusterMap, pg: Pg) -> Option<bool> {
        let pool = map.pools.get(&pg.pool)?;
        if pg.seed >= pool.pg_num {
            return None;
        }
        let m = map_pg(map, pool, pg_id(pg));
        Some(m.acting.contains(&self.id) || m.up.contains(&self.id))
    }

    /// Primary side of `PgStray`: the asker's copy may go once this PG is active and
    /// every OSD of its acting set, which does not include the asker, is complete.
    pub(super) async fn stray_verdict(
        self: &Arc<Self>,
        map_epoch: u64,
        from: OsdId,
        pg: Pg,
    ) -> OsdResponse {
        self.catch_up(map_epoch).await;
        let Some(map) = self.map() else {
            return OsdResponse::Stray { remove: false };
        };
        let Some(pool) = map.pools.get(&pg.pool).filter(|p| pg.seed < p.pg_num) else {
            return OsdResponse::Stray { remove: true };
        };
        let m = map_pg(&map, pool, pg_id(pg));
        if m.primary != Some(self.id) {
            return OsdResponse::NotPrimary { epoch: map.epoch };
        }
        if m.acting.contains(&from) || m.up.contains(&from) {
            return OsdResponse::Stray { remove: false };
        }
        let Some(slot) = self.pgs.lock().expect("pg table lock").get(&pg).cloned() else {
            return OsdResponse::Stray { remove: false };
        };
        self.feed(
            &slot,
            Event::Tick {
                now_ms: self.now_ms(),
            },
        );
        let engine = slot.engine.lock().expect("engine lock");
        let remove = engine.clean_acting() == Some(m.acting.as_slice());
        OsdResponse::Stray { remove }
    }

    /// Looks for copies of PGs this OSD no longer serves, every few seconds, and removes
    /// each once its primary says the PG is clean without it (or its pool is gone).
    pub async fn sweep_strays(self: Arc<Self>) {
        let mut tick = tokio::time::interval(STRAY_SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pgs = match self.store.pgs().await {
                Ok(p) => p,
                Err(e) => {
                    warn!("listing stored PGs failed: {e}");
                    continue;
                }
            };
            for (pool, seed) in pgs {
                let pg = Pg { pool, seed };
                if let Err(e) = self.clone().remove_if_stray(pg).await {
                    debug!(%pool, seed, "stray copy kept for now: {e}");
                }
            }
        }
    }

    async fn remove_if_stray(self: Arc<Self>, pg: Pg) -> Result<(), StoreError> {
        let Some(map) = self.map() else {
            return Ok(());
        };
        match self.serves(&map, pg) {
            Some(true) => return Ok(()),
            Some(false) => {
                let pool = &map.pools[&pg.pool];
                let primary = map_pg(&map, pool, pg_id(pg)).primary;
                let Some(primary) = primary else {
                    return Ok(());
                };
                let req = OsdRequest::PgStray {
                    map_epoch: map.epoch,
                    from: self.id,
                    pg,
                };
                match self.peer_call(primary, &req).await? {
                    OsdResponse::Stray { remove: true } => {}
                    _ => return Ok(()),
                }
            }
            None => {}
        }
        let removal = Arc::new(StrayRemoval::default());
        self.strays
            .lock()
            .expect("strays lock")
            .insert(pg, removal.clone());
        let res = self.remove_stray(pg, &removal).await;
        self.strays.lock().expect("strays lock").remove(&pg);
        res
    }

    /// Removes a stray copy step by step, until it is gone or claimed back.
    async fn remove_stray(&self, pg: Pg, removal: &StrayRemoval) -> Result<(), StoreError> {
        let mut steps = 0u64;
        loop {
            let _step = removal.step.lock().await;
            let still_stray = self
                .map()
                .is_some_and(|m| self.serves(&m, pg) != Some(true));
            if removal.claimed.load(Ordering::Acquire) || !still_stray {
                debug!(
                    pool = pg.pool,
                    seed = pg.seed,
                    "stray removal stopped: the PG is back"
                );
                return Ok(());
            }
            if steps == 0 {
                let incomplete = PgCopyState {
                    complete: false,
                    log_from: None,
                };
                self.store
                    .set_pg_state(pg.pool, pg.seed, incomplete)
                    .await
                    .map_err(obj_err)?;
            }
            steps += 1;
            if self
                .store
                .remove_pg(pg.pool, pg.seed, STRAY_STEP_OBJECTS)
                .await
                .map_err(obj_err)?
            {
                info!(
                    pool = pg.pool,
                    seed = pg.seed,
                    "removed the stray copy of a PG this OSD no longer serves"
                );
                return Ok(());
            }
        }
    }
}
