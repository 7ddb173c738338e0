//! The apply and peer queues: each PG's apply task, which applies the PG's mutations (local
//! and from primaries) one at a time in arrival order; the replica side of the OSD port; and
//! the per-peer sender tasks that put replica operations on the wire in the order the
//! engine emitted them, feeding the replicas' answers back to the engines.

use std::sync::Arc;
use std::time::Duration;

use store_client::RpcConn;
use store_objstore::{ObjError, ObjectId, ObjectStore};
use store_placement::map_pg;
use store_types::map::OsdId;
use store_types::osdmsg::{Mutation, ObjVersion, OsdRequest, OsdResponse, Pg, OSD_MAX_FRAME_BYTES};
use store_types::wire;
use store_types::{ErrorCode, StoreError};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{debug, warn};

use crate::pg::Event;

use super::{obj_err, pg_id, OsdService, PgSlot, REPLICA_TIMEOUT};

/// A mutation to apply in PG order, and where its result goes.
pub(super) struct ApplyJob {
    object: String,
    version: ObjVersion,
    mutation: Mutation,
    done: Applied,
}

/// Who learns that an apply is done.
pub(super) enum Applied {
    /// This OSD is the PG's primary: the engine gets Durable (or Refused) directly.
    Engine(Arc<PgSlot>),
    /// A replica operation: answered to the primary on its connection, straight from
    /// the apply task (the connection's concurrency slot is held until then).
    Reply {
        replier: store_client::server::Replier,
        tag: u64,
        _slot: OwnedSemaphorePermit,
    },
}

pub(super) struct PeerJob {
    slot: Arc<PgSlot>,
    payload: wire::Payload,
    version: ObjVersion,
}

impl<S: ObjectStore> OsdService<S> {
    /// Applies a PG's mutations one at a time, in arrival order.
    pub(super) async fn apply_loop(
        self: Arc<Self>,
        pg: Pg,
        mut rx: mpsc::UnboundedReceiver<ApplyJob>,
    ) {
        while let Some(job) = rx.recv().await {
            let id = ObjectId {
                pool: pg.pool,
                pg: pg.seed,
                name: job.object,
            };
            let res = match job.mutation {
                Mutation::Write { offset, data } => {
                    self.store.write(&id, offset, data, job.version).await
                }
                Mutation::Zero { offset, len } => {
                    self.store.zero(&id, offset, len, job.version).await
                }
                Mutation::Delete => self.store.delete(&id, job.version).await.map(|_| ()),
            };
            let res = self.inject_device_error(&id.name, res);
            if let Err(ObjError::Io(e)) = &res {
                // Not answered: the OSD stops, and its peers see the connection close.
                self.device_failed(&format!("applying {:?} to {}", job.version, id.name), e);
                continue;
            }
            let res = res.map_err(obj_err);
            match job.done {
                Applied::Reply { replier, tag, .. } => {
                    let resp = match res {
                        Ok(()) => OsdResponse::Committed {
                            version: job.version,
                        },
                        Err(e) => OsdResponse::Error(e),
                    };
                    replier.reply(tag, &resp).await;
                }
                Applied::Engine(slot) => {
                    let (version, from) = (job.version, self.id);
                    let ev = match res {
                        Ok(()) => Event::Durable { version, from },
                        Err(error) => {
                            warn!(pg = ?slot.pg, ?version, "local apply refused: {error}");
                            Event::Refused {
                                version,
                                from,
                                error,
                            }
                        }
                    };
                    self.feed(&slot, ev);
                }
            }
        }
    }

    /// Queues a mutation for OSD `to`; false if it cannot even be queued.
    /// `encoded`: the replica request of the last version encoded, reused for the next
    /// replica of the same mutation (the engine emits one Apply per OSD, in a row).
    pub(super) fn apply_on(
        self: &Arc<Self>,
        slot: &Arc<PgSlot>,
        to: OsdId,
        version: ObjVersion,
        object: String,
        mutation: Mutation,
        encoded: &mut Option<(ObjVersion, wire::Payload)>,
    ) -> bool {
        if to == self.id {
            let job = ApplyJob {
                object,
                version,
                mutation,
                done: Applied::Engine(slot.clone()),
            };
            return slot.apply_tx.send(job).is_ok();
        }
        let payload = match encoded {
            Some((v, p)) if *v == version => p.clone(),
            _ => {
                let map_epoch = self.map().map(|m| m.epoch).unwrap_or(0);
                let req = OsdRequest::Replica {
                    map_epoch,
                    from: self.id,
                    pg: slot.pg,
                    object,
                    version,
                    mutation,
                };
                match wire::encode_payload(&req) {
                    Ok(p) => {
                        *encoded = Some((version, p.clone()));
                        p
                    }
                    Err(e) => {
                        warn!("cannot encode replica op: {e}");
                        return false;
                    }
                }
            }
        };
        let job = PeerJob {
            slot: slot.clone(),
            payload,
            version,
        };
        self.peer_sender(to).send(job).is_ok()
    }

    fn peer_sender(self: &Arc<Self>, to: OsdId) -> mpsc::UnboundedSender<PeerJob> {
        let mut peers = self.peers.lock().expect("peers lock");
        peers
            .entry(to)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(self.clone().peer_loop(to, rx));
                tx
            })
            .clone()
    }

    /// Puts one peer's replica operations on the wire in order; results come back as
    /// Durable/Failed events.
    async fn peer_loop(self: Arc<Self>, to: OsdId, mut rx: mpsc::UnboundedReceiver<PeerJob>) {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut conn: Option<(String, RpcConn)> = None;
        // Replies awaited, in one task: fewer than the connection's in-flight bound, so
        // sending never waits for a reply this loop has not read yet.
        let mut replies = FuturesUnordered::new();
        loop {
            let job = tokio::select! {
                job = rx.recv(), if replies.len() < store_client::conn::MAX_IN_FLIGHT / 2 => match job {
                    Some(job) => job,
                    None => break,
                },
                Some((job, res)) = replies.next(), if !replies.is_empty() => {
                    self.replica_answered(to, job, res);
                    continue;
                }
            };
            let failed = |job: &PeerJob| Event::Failed {
                version: job.version,
                from: to,
            };
            let addr = self
                .map()
                .and_then(|m| m.osds.get(&to).map(|o| o.addr.clone()));
            let Some(addr) = addr else {
                self.feed(&job.slot, failed(&job));
                continue;
            };
            if conn
                .as_ref()
                .is_none_or(|(a, c)| *a != addr || c.is_closed())
            {
                conn = match RpcConn::connect(&addr, Duration::from_secs(2), OSD_MAX_FRAME_BYTES)
                    .await
                {
                    Ok((c, _)) => Some((addr.clone(), c)),
                    Err(e) => {
                        debug!(peer = to, "replica connection failed: {e}");
                        None
                    }
                };
            }
            let Some((_, c)) = conn.as_ref() else {
                self.feed(&job.slot, failed(&job));
                continue;
            };
            match c.send_raw(job.payload.clone()).await {
                Ok(pending) => replies.push(async move {
                    let res = pending.wait_decoded::<OsdResponse>(REPLICA_TIMEOUT).await;
                    (job, res)
                }),
                Err(e) => {
                    debug!(peer = to, "replica send failed: {e}");
                    conn = None;
                    self.feed(&job.slot, failed(&job));
                }
            }
        }
        while let Some((job, res)) = replies.next().await {
            self.replica_answered(to, job, res);
        }
    }

    /// Feeds a replica's answer to its PG's engine.
    fn replica_answered(
        self: &Arc<Self>,
        to: OsdId,
        job: PeerJob,
        res: Result<OsdResponse, StoreError>,
    ) {
        let version = job.version;
        let ev = match res {
            Ok(OsdResponse::Committed { .. }) => Event::Durable { version, from: to },
            Ok(OsdResponse::NotPrimary { epoch }) => {
                debug!(
                    peer = to,
                    ?version,
                    epoch,
                    "replica has a map in which we are not the primary"
                );
                Event::Superseded {
                    version,
                    from: to,
                    epoch,
                }
            }
            Ok(OsdResponse::Error(error)) => {
                warn!(peer = to, ?version, "replica refused: {error}");
                Event::Refused {
                    version,
                    from: to,
                    error,
                }
            }
            Ok(other) => {
                warn!(peer = to, ?version, "unexpected replica reply: {other:?}");
                Event::Failed { version, from: to }
            }
            Err(e) => {
                debug!(peer = to, "replica op failed: {e}");
                Event::Failed { version, from: to }
            }
        };
        self.feed(&job.slot, ev);
    }

    /// A replica operation from an OSD that, by this OSD's newer map, is not the PG's
    /// primary: refused, so a primary that lost its role cannot keep writing.
    pub(super) fn stale_primary(&self, map_epoch: u64, from: OsdId, pg: Pg) -> Option<StoreError> {
        let map = self.map()?;
        if map_epoch >= map.epoch {
            return None;
        }
        let pool = map.pools.get(&pg.pool)?;
        let primary = map_pg(&map, pool, pg_id(pg)).primary;
        (primary != Some(from)).then(|| {
            StoreError::new(
                ErrorCode::NotPermitted,
                format!(
                    "osd.{from} is not the primary of {}.{:x} at epoch {} (it sent epoch {map_epoch})",
                    pg.pool, pg.seed, map.epoch
                ),
            )
        })
    }

    /// Replica side: apply in PG order, answer when durable here.
    pub(super) fn replica_op(
        self: &Arc<Self>,
        pg: Pg,
        object: String,
        version: ObjVersion,
        mutation: Mutation,
        done: Applied,
    ) {
        let slot = self.slot(pg);
        let _ = slot.apply_tx.send(ApplyJob {
            object,
            version,
            mutation,
            done,
        });
    }
}
