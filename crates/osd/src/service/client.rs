//! Client operations: what a client waits for and where its answer goes, the checks an
//! operation passes (map epoch, pool, PG), and its submission to the PG's engine.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use store_client::optrack::OpGuard;
use store_objstore::ObjectStore;
use store_placement::map_pg;
use store_types::map::WriteGuard;
use store_types::osdmsg::{ClientOpKind, OsdResponse, Pg};
use store_types::{ErrorCode, StoreError};
use tokio::sync::OwnedSemaphorePermit;

use crate::pg::Event;

use super::{obj_err, pg_id, OsdService, PgSlot};

/// What a client waits for.
pub(super) enum Waiter {
    Mutation(ReplyTo),
    Read {
        to: ReplyTo,
        object: String,
        op: ClientOpKind,
    },
}

/// A client operation as it arrived.
pub(super) struct ClientReq {
    pub(super) map_epoch: u64,
    pub(super) pg: Pg,
    pub(super) object: String,
    pub(super) op: ClientOpKind,
    pub(super) guard: Option<WriteGuard>,
}

/// Where a client operation's answer goes: straight onto the client's connection, from
/// whichever code finishes the operation (no task waits for it). The connection's
/// concurrency slot is held until then.
pub(super) struct ReplyTo {
    pub(super) replier: store_client::server::Replier,
    pub(super) tag: u64,
    pub(super) slot: OwnedSemaphorePermit,
    /// The operation counts as in hand (for SLOW_OPS) until it is answered.
    pub(super) _op: OpGuard,
}

impl ReplyTo {
    pub(super) fn send(self, resp: OsdResponse) {
        self.replier.reply_now(self.tag, &resp, self.slot)
    }
}

impl<S: ObjectStore> OsdService<S> {
    /// A client operation, answered through `to`: at once when it is refused, when the
    /// engine acknowledges it or when its read is done.
    pub(super) async fn client_op(self: &Arc<Self>, req: ClientReq, to: ReplyTo) {
        let ClientReq {
            map_epoch,
            pg,
            object,
            op,
            guard,
        } = req;
        self.catch_up(map_epoch).await;
        if let ClientOpKind::List = op {
            return to.send(self.list_pg(pg).await);
        }
        let slot = match self.client_slot(pg, &object) {
            Ok(s) => s,
            Err(resp) => return to.send(resp),
        };
        if !slot.seq_loaded.load(Ordering::Acquire) {
            match self.store.pg_log_head(pg.pool, pg.seed).await {
                Ok(head) => {
                    let seq = head.map_or(0, |v| v.seq);
                    slot.engine.lock().expect("engine lock").raise_seq(seq);
                    slot.seq_loaded.store(true, Ordering::Release);
                }
                Err(e) => return to.send(OsdResponse::Error(obj_err(e))),
            }
        }
        self.submit(&slot, object, op, guard.as_ref(), to);
    }

    /// The fast path of a client operation, inline on its connection: taken when this
    /// OSD's map is at least the client's and the PG is loaded, so nothing needs waiting
    /// for; the operation is handed back otherwise.
    pub(super) fn client_op_now(
        self: &Arc<Self>,
        req: ClientReq,
        to: ReplyTo,
    ) -> Option<(ClientReq, ReplyTo)> {
        let current = self.map().is_some_and(|m| m.epoch >= req.map_epoch);
        if !current || matches!(req.op, ClientOpKind::List) {
            return Some((req, to));
        }
        let slot = match self.client_slot(req.pg, &req.object) {
            Ok(s) => s,
            Err(resp) => {
                to.send(resp);
                return None;
            }
        };
        if !slot.seq_loaded.load(Ordering::Acquire) {
            return Some((req, to));
        }
        self.submit(&slot, req.object, req.op, req.guard.as_ref(), to);
        None
    }

    /// The PG's slot for a client operation, or the answer refusing it.
    fn client_slot(self: &Arc<Self>, pg: Pg, object: &str) -> Result<Arc<PgSlot>, OsdResponse> {
        let Some(map) = self.map() else {
            return Err(OsdResponse::Error(StoreError::new(
                ErrorCode::Unavailable,
                "this OSD has no map yet",
            )));
        };
        let Some(pool) = map.pools.get(&pg.pool) else {
            return Err(OsdResponse::Error(StoreError::not_found(format!(
                "pool {} does not exist",
                pg.pool
            ))));
        };
        if pg.seed >= pool.pg_num || object.is_empty() {
            return Err(OsdResponse::Error(StoreError::invalid(
                "bad PG or empty object name",
            )));
        }
        Ok(self.slot(pg))
    }

    /// Lists a PG's objects, on its primary.
    async fn list_pg(&self, pg: Pg) -> OsdResponse {
        let Some(map) = self.map() else {
            return OsdResponse::Error(StoreError::new(
                ErrorCode::Unavailable,
                "this OSD has no map yet",
            ));
        };
        let Some(pool) = map.pools.get(&pg.pool).filter(|p| pg.seed < p.pg_num) else {
            return OsdResponse::Error(StoreError::not_found(format!(
                "pool {} has no PG {}",
                pg.pool, pg.seed
            )));
        };
        if map_pg(&map, pool, pg_id(pg)).primary != Some(self.id) {
            return OsdResponse::NotPrimary { epoch: map.epoch };
        }
        match self.store.list(pg.pool, pg.seed).await {
            Ok(names) => OsdResponse::Listed(names),
            Err(e) => OsdResponse::Error(obj_err(e)),
        }
    }

    /// Registers a client operation's answer and feeds it to the PG's engine.
    fn submit(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        object: String,
        op: ClientOpKind,
        guard: Option<&WriteGuard>,
        to: ReplyTo,
    ) {
        let op_id = self.next_op.fetch_add(1, Ordering::Relaxed);
        let now_ms = self.now_ms();
        let event = match op {
            ClientOpKind::Mutate(m) => {
                slot.waiters
                    .lock()
                    .expect("waiters lock")
                    .insert(op_id, Waiter::Mutation(to));
                Event::Mutate {
                    op: op_id,
                    object,
                    payload: m,
                    now_ms,
                }
            }
            kind => {
                slot.waiters.lock().expect("waiters lock").insert(
                    op_id,
                    Waiter::Read {
                        to,
                        object: object.clone(),
                        op: kind,
                    },
                );
                Event::Read {
                    op: op_id,
                    object,
                    now_ms,
                }
            }
        };
        if let Err(e) = self.feed_guarded(slot, event, guard) {
            let w = slot.waiters.lock().expect("waiters lock").remove(&op_id);
            if let Some(Waiter::Mutation(to)) | Some(Waiter::Read { to, .. }) = w {
                to.send(OsdResponse::Error(e));
            }
        }
    }
}
