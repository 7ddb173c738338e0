//! What PG primaries tell the monitors: activations to record as last active sets, and
//! `pg_temp` entries whose backfill is done. Engines and housekeeping drop notes here; one
//! task sends them in batches (one map command per kind), so a burst of peering PGs costs
//! a few Raft commits, not one each. A note that is lost (no quorum, a leader change) is
//! dropped here again by its engine's next tick.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use store_client::mon::MonClient;
use store_types::map::OsdId;
use store_types::msg::{MapCommand, PgActivation};
use store_types::osdmsg::Pg;
use tokio::sync::Notify;
use tracing::debug;

/// How long notes gather before a batch goes out.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Notes {
    activated: BTreeMap<Pg, PgActivation>,
    temp_done: BTreeMap<Pg, Vec<OsdId>>,
}

/// Bounded by the PG count: one note per PG and kind, the newest kept.
#[derive(Default)]
pub struct Announcer {
    notes: Mutex<Notes>,
    wake: Notify,
}

impl Announcer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The PG goes active with `osds`, in an interval that started at `since_epoch`.
    pub fn activated(&self, pg: Pg, since_epoch: u64, osds: Vec<OsdId>) {
        let note = PgActivation {
            pool: pg.pool,
            seed: pg.seed,
            since_epoch,
            osds,
        };
        self.notes
            .lock()
            .expect("notes lock")
            .activated
            .insert(pg, note);
        self.wake.notify_one();
    }

    /// Every OSD of the PG's `pg_temp` entry `entry` holds a complete copy.
    pub fn temp_done(&self, pg: Pg, entry: Vec<OsdId>) {
        self.notes
            .lock()
            .expect("notes lock")
            .temp_done
            .insert(pg, entry);
        self.wake.notify_one();
    }

    /// Sends the notes, batched, for as long as the OSD runs.
    pub async fn run(self: Arc<Self>, mons: Arc<MonClient>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(BATCH_WINDOW).await;
            let notes = std::mem::take(&mut *self.notes.lock().expect("notes lock"));
            if !notes.activated.is_empty() {
                let pgs: Vec<PgActivation> = notes.activated.into_values().collect();
                let n = pgs.len();
                match mons.command(MapCommand::PgActivated { pgs }).await {
                    Ok(out) => debug!(n, "{}", out.message),
                    Err(e) => debug!(n, "PG activations not recorded yet (retried): {e}"),
                }
            }
            if !notes.temp_done.is_empty() {
                let pgs: Vec<(u32, u32, Vec<OsdId>)> = notes
                    .temp_done
                    .into_iter()
                    .map(|(pg, osds)| (pg.pool, pg.seed, osds))
                    .collect();
                let n = pgs.len();
                match mons.command(MapCommand::PgTempDone { pgs }).await {
                    Ok(out) => debug!(n, "{}", out.message),
                    Err(e) => debug!(n, "pg_temp entries not dropped yet (retried): {e}"),
                }
            }
        }
    }
}
