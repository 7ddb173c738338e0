//! The OSD port: accepts connections and dispatches each request (replica operations are
//! queued in frame order; everything else runs in its own task).

use std::sync::Arc;

use store_client::server::{accept_loop, ServerConn};
use store_objstore::ObjectStore;
use store_types::osdmsg::{
    ClientOpKind, Mutation, OsdRequest, OsdResponse, Pg, OSD_MAX_FRAME_BYTES,
};
use store_types::StoreError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, Instrument};

use super::apply::Applied;
use super::client::{ClientReq, ReplyTo};
use super::{obj_err, OsdService};

/// Requests handled at once per connection.
const PER_CONN_CONCURRENCY: usize = 256;

/// A client operation as SLOW_OPS names it: `write obj-24 (pg 1.1f)`.
fn describe_op(op: &ClientOpKind, object: &str, pg: Pg) -> String {
    let what = match op {
        ClientOpKind::Mutate(Mutation::Write { .. }) => "write",
        ClientOpKind::Mutate(Mutation::Zero { .. }) => "zero",
        ClientOpKind::Mutate(Mutation::Delete) => "delete",
        ClientOpKind::Read { .. } => "read",
        ClientOpKind::Stat => "stat",
        ClientOpKind::Allocated { .. } => "allocated",
        ClientOpKind::List => "list",
    };
    format!("{what} {object} (pg {}.{:x})", pg.pool, pg.seed)
}

impl<S: ObjectStore> OsdService<S> {
    /// Serves the OSD port until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        accept_loop(listener, |stream| self.clone().connection(stream)).await
    }

    async fn connection(self: Arc<Self>, stream: TcpStream) {
        let mut conn = ServerConn::new(stream, OSD_MAX_FRAME_BYTES, PER_CONN_CONCURRENCY);
        let replier = conn.replier();
        let slots = Arc::new(Semaphore::new(PER_CONN_CONCURRENCY));
        while let Some((tag, req)) = conn.next_request::<OsdRequest>().await {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let me = self.clone();
            let replier = replier.clone();
            // Replica mutations are enqueued here, in frame order, so replicas apply in the
            // primary's order; everything else runs in its own task.
            let work: futures::future::BoxFuture<'static, OsdResponse> = match req {
                OsdRequest::Replica {
                    map_epoch,
                    from,
                    pg,
                    object,
                    version,
                    mutation,
                } => {
                    if self.fire_failpoint(&object) {
                        continue;
                    }
                    let stale = match self.stale_primary(map_epoch, from, pg) {
                        None if !self.pg_exists(pg) => Some(StoreError::not_found(format!(
                            "no PG {}.{:x} in this OSD's map",
                            pg.pool, pg.seed
                        ))),
                        other => other,
                    };
                    if let Some(e) = stale {
                        // Not an error for the client: its primary resends it there (a PG
                        // this OSD's map does not have yet: once it has the map).
                        debug!("{}", e.message);
                        let epoch = self.map().map_or(map_epoch, |m| m.epoch);
                        tokio::spawn(async move {
                            let _permit = permit;
                            replier.reply(tag, &OsdResponse::NotPrimary { epoch }).await;
                        });
                        continue;
                    }
                    self.claim_stray_now(pg);
                    // Answered by the PG's apply task once durable here.
                    let done = Applied::Reply {
                        replier: replier.clone(),
                        tag,
                        _slot: permit,
                    };
                    self.replica_op(pg, object, version, mutation, done);
                    continue;
                }
                OsdRequest::Fetch {
                    pg,
                    object,
                    offset,
                    len,
                } => Box::pin(async move { me.fetch(pg, object, offset, len).await }),
                OsdRequest::PgHead { pg } => Box::pin(async move {
                    me.claim_stray(pg).await;
                    match me.query_head(pg, me.id).await {
                        Ok((head, state)) => OsdResponse::Head { head, state },
                        Err(e) => OsdResponse::Error(e),
                    }
                }),
                OsdRequest::PgMark {
                    map_epoch,
                    from,
                    pg,
                    state,
                } => Box::pin(async move {
                    if let Some(e) = me.stale_primary(map_epoch, from, pg) {
                        return OsdResponse::Error(e);
                    }
                    me.claim_stray(pg).await;
                    match me.store.set_pg_state(pg.pool, pg.seed, state).await {
                        Ok(()) => OsdResponse::Marked,
                        Err(e) => OsdResponse::Error(obj_err(e)),
                    }
                }),
                OsdRequest::PgStray {
                    map_epoch,
                    from,
                    pg,
                } => Box::pin(async move { me.stray_verdict(map_epoch, from, pg).await }),
                OsdRequest::PgList { pg } => Box::pin(async move {
                    me.claim_stray(pg).await;
                    match me.local_objects(pg).await {
                        Ok(list) => OsdResponse::Objects(list.into_iter().collect()),
                        Err(e) => OsdResponse::Error(e),
                    }
                }),
                OsdRequest::Client {
                    map_epoch,
                    pg,
                    object,
                    op,
                    guard,
                } => {
                    let to = ReplyTo {
                        replier: replier.clone(),
                        tag,
                        slot: permit,
                        _op: self.ops.start(describe_op(&op, &object, pg)),
                    };
                    let req = ClientReq {
                        map_epoch,
                        pg,
                        object,
                        op,
                        guard,
                    };
                    let Some((req, to)) = self.client_op_now(req, to) else {
                        continue;
                    };
                    tokio::spawn(async move { me.client_op(req, to).await });
                    continue;
                }
            };
            let span = tracing::debug_span!("osd_request", tag);
            tokio::spawn(
                async move {
                    let _permit = permit;
                    let resp = work.await;
                    replier.reply(tag, &resp).await;
                }
                .instrument(span),
            );
        }
        conn.finish().await;
    }
}
