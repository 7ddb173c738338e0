//! The monitor's network side: one TCP port for clients, OSDs and peer monitors.
//!
//! Each connection reads frames, handles requests concurrently (bounded per connection) and
//! writes replies in completion order. A malformed frame closes that connection only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use store_client::server::{accept_loop, Replier, ServerConn};
use store_client::RpcConn;
use store_types::map::{session_name, ClusterMap};
use store_types::msg::{
    CommandOutcome, MonMembership, MonRequest, MonResponse, MonStatus, PongInfo,
};
use store_types::wire::DEFAULT_MAX_FRAME_BYTES;
use store_types::{ErrorCode, StoreError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn, Instrument};

use crate::clock;
use crate::consensus::{Consensus, ConsensusError};
use crate::failure::FailureDetector;
use crate::health;
use crate::sessions::SessionTable;
use crate::slowops::SlowOpsTable;

/// Requests handled at once per connection.
const PER_CONN_CONCURRENCY: usize = 64;
/// Replies queued per connection before handlers wait.
const REPLY_QUEUE: usize = 256;
/// Bound on the PG reports one OSD heartbeat may carry.
const MAX_PG_REPORTS: usize = 1 << 20;
/// Bound on the sessions one client heartbeat may carry.
const MAX_SESSIONS_PER_REPORT: usize = 10_000;

/// How long a peer monitor may take to answer a ping before it counts as unreachable.
const PING_TIMEOUT: Duration = Duration::from_millis(500);

/// Locks one of the monitor's tables. A poisoned lock means a thread panicked while holding
/// it, which is a bug (daemons abort on panic): fail loudly. Skipping the work instead would
/// leave the monitor running with, say, a failure detector that never marks an OSD down.
fn locked<'a, T>(mutex: &'a Mutex<T>, what: &str) -> MutexGuard<'a, T> {
    mutex.lock().unwrap_or_else(|_| {
        panic!("the monitor's {what} lock is poisoned: a thread panicked while holding it (a bug)")
    })
}

pub struct MonitorCore<C: Consensus> {
    pub consensus: C,
    pub name: String,
    pub fsid: String,
    detector: Mutex<FailureDetector>,
    /// Client sessions (image opens), for lock decisions and `client ls`.
    sessions: Mutex<SessionTable>,
    /// Daemons' slow operations, for SLOW_OPS.
    slow_ops: Mutex<SlowOpsTable>,
    /// The leader's timer for blocklist entries, and the default expiry (0: never).
    blocklist_expiry: Mutex<crate::locks::BlocklistExpiry>,
    blocklist_expire_ms: u64,
    /// Bound on how long a map change may take before the client gets an error.
    pub command_timeout: Duration,
    /// How long a new monitor may take to catch up before `mon add` gives up.
    pub mon_catch_up: Duration,
    peers: tokio::sync::Mutex<HashMap<String, RpcConn>>,
}

impl<C: Consensus> MonitorCore<C> {
    pub fn new(
        consensus: C,
        name: String,
        fsid: String,
        detector: FailureDetector,
        sessions: SessionTable,
        blocklist_expire_ms: u64,
    ) -> Arc<Self> {
        Arc::new(MonitorCore {
            consensus,
            name,
            fsid,
            detector: Mutex::new(detector),
            sessions: Mutex::new(sessions),
            slow_ops: Mutex::default(),
            blocklist_expiry: Mutex::default(),
            blocklist_expire_ms,
            command_timeout: Duration::from_secs(10),
            mon_catch_up: Duration::from_secs(60),
            peers: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    fn map(&self) -> Arc<ClusterMap> {
        self.consensus.map().borrow().clone()
    }

    fn detector(&self) -> MutexGuard<'_, FailureDetector> {
        locked(&self.detector, "failure detector")
    }

    fn sessions(&self) -> MutexGuard<'_, SessionTable> {
        locked(&self.sessions, "session table")
    }

    fn slow_ops(&self) -> MutexGuard<'_, SlowOpsTable> {
        locked(&self.slow_ops, "slow ops table")
    }

    /// The shared connection to a peer monitor; connects outside the table's lock, so one
    /// dead peer never serializes probes to the others.
    async fn peer(&self, addr: &str, timeout: Duration) -> Result<RpcConn, StoreError> {
        if let Some(c) = self.peers.lock().await.get(addr).filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (c, _) = RpcConn::connect(addr, timeout, DEFAULT_MAX_FRAME_BYTES).await?;
        let mut peers = self.peers.lock().await;
        match peers.get(addr).filter(|c| !c.is_closed()) {
            Some(existing) => Ok(existing.clone()),
            None => {
                peers.insert(addr.to_string(), c.clone());
                Ok(c)
            }
        }
    }

    /// Pings every monitor of the map concurrently; this monitor counts as reachable.
    pub async fn probe_mons(&self) -> Vec<MonStatus> {
        let map = self.map();
        let me = self.consensus.my_id();
        let probes = map.mons.values().map(|m| async move {
            let res = if m.id == me {
                Ok(())
            } else {
                self.ping(&m.addr).await
            };
            MonStatus {
                id: m.id,
                name: m.name.clone(),
                addr: m.addr.clone(),
                reachable: res.is_ok(),
                error: res.err().map(|e| e.message),
            }
        });
        futures::future::join_all(probes).await
    }

    async fn ping(&self, addr: &str) -> Result<(), StoreError> {
        let conn = self.peer(addr, PING_TIMEOUT).await?;
        match conn
            .call::<_, MonResponse>(&MonRequest::Ping, PING_TIMEOUT)
            .await?
        {
            MonResponse::Pong(p) if p.fsid == self.fsid => Ok(()),
            MonResponse::Pong(p) => Err(StoreError::new(
                ErrorCode::WrongCluster,
                format!("{addr} belongs to cluster {}", p.fsid),
            )),
            other => Err(StoreError::internal(format!(
                "unexpected ping reply {other:?}"
            ))),
        }
    }

    /// Fails fast when a majority of voting monitors cannot be reached.
    async fn check_quorum(&self) -> Result<(), StoreError> {
        let map = self.map();
        let probes = self.probe_mons().await;
        let voters: Vec<&MonStatus> = probes
            .iter()
            .filter(|p| map.mons.get(&p.id).is_some_and(|m| m.voter))
            .collect();
        if voters.is_empty() {
            return Err(StoreError::new(
                ErrorCode::NoQuorum,
                "the monitor cluster has not formed yet (no membership committed): \
                 waiting for a majority of mon_initial_members to start",
            ));
        }
        let up = voters.iter().filter(|p| p.reachable).count();
        let need = voters.len() / 2 + 1;
        if up >= need {
            return Ok(());
        }
        let who: Vec<String> = voters
            .iter()
            .map(|p| match &p.error {
                None => format!("mon.{}: ok", p.name),
                Some(e) => format!("mon.{}: {e}", p.name),
            })
            .collect();
        Err(StoreError::new(
            ErrorCode::NoQuorum,
            format!(
                "no monitor quorum: {up} of {} monitors reachable, {need} needed ({})",
                voters.len(),
                who.join("; ")
            ),
        ))
    }

    /// Runs a leader-only operation here if this monitor leads, else forwards it once to the
    /// leader. Retries across elections until `command_timeout`; fails fast without quorum.
    pub async fn leader_op(
        &self,
        op: MonRequest,
        forwarded: bool,
    ) -> Result<MonResponse, StoreError> {
        // Adding a monitor waits for it to catch up; everything else is quick.
        let budget = match &op {
            MonRequest::Membership(_) => self.command_timeout + self.mon_catch_up,
            _ => self.command_timeout,
        };
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                self.check_quorum().await?;
                return Err(StoreError::new(
                    ErrorCode::Timeout,
                    format!(
                        "map change not committed within {} s (the leader may be changing); it may still apply",
                        budget.as_secs()
                    ),
                ));
            }
            if self.consensus.is_leader() {
                self.check_quorum().await?;
                match tokio::time::timeout(remaining, self.execute(&op)).await {
                    Ok(Ok(out)) => return Ok(MonResponse::Outcome(out)),
                    Ok(Err(ConsensusError::Rejected(e))) => return Err(e),
                    Ok(Err(ConsensusError::Fatal(e))) => return Err(StoreError::internal(e)),
                    Ok(Err(ConsensusError::NotLeader(_))) | Err(_) => continue,
                }
            }
            match self
                .consensus
                .leader()
                .filter(|l| l.id != self.consensus.my_id())
            {
                Some(leader) if !forwarded => {
                    match self.forward(&leader.addr, &op, remaining).await {
                        Ok(resp) => {
                            self.catch_up(&resp).await;
                            return Ok(resp);
                        }
                        Err(e)
                            if e.code == ErrorCode::Unreachable || e.code == ErrorCode::Timeout =>
                        {
                            debug!(leader = %leader.name, error = %e, "forward failed; re-checking");
                            self.check_quorum().await?;
                        }
                        Err(e)
                            if e.code == ErrorCode::NotPermitted
                                && e.message.starts_with("not leader") => {}
                        Err(e) => return Err(e),
                    }
                }
                Some(_) => {
                    return Err(StoreError::new(
                        ErrorCode::NotPermitted,
                        "not leader: leadership moved while forwarding; retry",
                    ))
                }
                None => self.check_quorum().await?,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Read-your-writes: before answering a forwarded change, wait (briefly) until this
    /// monitor has applied it too, so the client's next read here sees it.
    async fn catch_up(&self, resp: &MonResponse) {
        let MonResponse::Outcome(out) = resp else {
            return;
        };
        let mut rx = self.consensus.map();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            rx.wait_for(|m| m.epoch >= out.epoch),
        )
        .await;
    }

    async fn forward(
        &self,
        addr: &str,
        op: &MonRequest,
        timeout: Duration,
    ) -> Result<MonResponse, StoreError> {
        let conn = self.peer(addr, PING_TIMEOUT).await?;
        let req = MonRequest::Forward(Box::new(op.clone()));
        match conn.call::<_, MonResponse>(&req, timeout).await? {
            MonResponse::Error(e) => Err(e),
            other => Ok(other),
        }
    }

    async fn execute(&self, op: &MonRequest) -> Result<CommandOutcome, ConsensusError> {
        match op {
            MonRequest::Command(cmd) => {
                // Only the leader decides whether a lock holder is gone.
                let cmd = self
                    .sessions()
                    .resolve(&self.map(), cmd.clone(), clock::now());
                self.consensus.propose(cmd).await
            }
            MonRequest::Membership(MonMembership::Add { name, addr }) => {
                self.consensus
                    .add_monitor(name.clone(), addr.clone(), self.mon_catch_up)
                    .await
            }
            MonRequest::Membership(MonMembership::Remove { name }) => {
                self.consensus.remove_monitor(name.clone()).await
            }
            other => Err(ConsensusError::Rejected(StoreError::invalid(format!(
                "not a leader operation: {other:?}"
            )))),
        }
    }

    fn heartbeat(
        &self,
        id: u32,
        uuid: &str,
        stat: store_types::msg::OsdStat,
        pgs: (u64, Vec<store_types::osdmsg::PgReport>),
    ) -> Result<MonResponse, StoreError> {
        if pgs.1.len() > MAX_PG_REPORTS {
            return Err(StoreError::invalid(format!(
                "osd.{id} reported {} PGs; at most {MAX_PG_REPORTS}",
                pgs.1.len()
            )));
        }
        let map = self.map();
        match map.osds.get(&id) {
            Some(o) if o.uuid == uuid => {}
            Some(_) => {
                return Err(StoreError::new(
                    ErrorCode::NotPermitted,
                    format!("osd.{id} heartbeat with a uuid that is not osd.{id}'s"),
                ))
            }
            None => return Err(StoreError::not_found(format!("osd.{id} does not exist"))),
        }
        self.detector().heartbeat(id, stat, pgs, clock::now());
        Ok(MonResponse::HeartbeatAck { epoch: map.epoch })
    }

    async fn status(&self) -> MonResponse {
        let mons = self.probe_mons().await;
        let map = self.map();
        let (stats, reports, recovery_rate) = {
            let d = self.detector();
            (
                d.stats().clone(),
                d.pg_reports().clone(),
                d.recovery_rate(clock::now()),
            )
        };
        let busy = health::busy_pgs(&map, &reports);
        let leader_name = self.consensus.leader().map(|l| l.name);
        let (live_sessions, silent_holders) = self.session_health(&map);
        MonResponse::Status(Box::new(health::status(health::StatusInput {
            map: &map,
            mons,
            leader_name,
            answered_by: self.name.clone(),
            osd_stats: &stats,
            live_sessions,
            silent_holders,
            busy: &busy,
            recovery_rate,
            slow_ops: &self.slow_ops().current(clock::now()),
        })))
    }

    /// Live sessions, and the locks whose holders stopped reporting (None until this
    /// monitor has watched for a grace).
    fn session_health(&self, map: &ClusterMap) -> (usize, Option<Vec<String>>) {
        let now = clock::now();
        let t = self.sessions();
        let silent = t.knows_enough(now).then(|| {
            map.image_locks
                .values()
                .filter_map(|l| l.holder.map(|h| (l, h)))
                .filter(|(_, h)| !map.blocklist.contains_key(h) && !t.alive(*h, now))
                .map(|(l, h)| {
                    format!(
                        "image {} is locked by {} ({}), silent for over {} ms",
                        l.image,
                        session_name(h),
                        l.holder_desc,
                        t.grace_ms()
                    )
                })
                .collect()
        });
        (t.live_count(now), silent)
    }

    /// Handles one request (other than Subscribe, which needs the connection).
    pub async fn handle(&self, req: MonRequest) -> MonResponse {
        let res = match req {
            MonRequest::Ping => Ok(MonResponse::Pong(PongInfo {
                fsid: self.fsid.clone(),
                mon_id: self.consensus.my_id(),
                name: self.name.clone(),
                epoch: self.map().epoch,
                leader: self.consensus.leader().map(|l| l.id),
            })),
            MonRequest::GetMap => Ok(MonResponse::Map(Box::new((*self.map()).clone()))),
            MonRequest::Status => Ok(self.status().await),
            MonRequest::OsdHeartbeat {
                id,
                uuid,
                stat,
                busy_pgs,
                pgs_epoch,
                slow_ops,
            } => {
                let res = self.heartbeat(id, &uuid, stat, (pgs_epoch, busy_pgs));
                if res.is_ok() {
                    self.slow_ops()
                        .report(&format!("osd.{id}"), slow_ops, clock::now());
                }
                res
            }
            MonRequest::ClientHeartbeat { sessions, slow_ops } => {
                // A process's sessions share its description (`gateway ADDR on HOST`).
                if let Some(s) = sessions.first() {
                    self.slow_ops().report(&s.desc, slow_ops, clock::now());
                }
                if sessions.len() > MAX_SESSIONS_PER_REPORT {
                    Err(StoreError::invalid("too many sessions in one report"))
                } else {
                    self.sessions().heartbeat(sessions, clock::now());
                    Ok(MonResponse::HeartbeatAck {
                        epoch: self.map().epoch,
                    })
                }
            }
            MonRequest::ClientList => Ok(MonResponse::Clients(
                self.sessions().report(&self.map(), clock::now()),
            )),
            op @ (MonRequest::Command(_) | MonRequest::Membership(_)) => {
                self.leader_op(op, false).await
            }
            MonRequest::Forward(op) => match *op {
                op @ (MonRequest::Command(_) | MonRequest::Membership(_)) => {
                    self.leader_op(op, true).await
                }
                other => Err(StoreError::invalid(format!("cannot forward {other:?}"))),
            },
            MonRequest::Raft { kind, body } => self
                .consensus
                .handle_peer_rpc(kind, &body)
                .await
                .map(MonResponse::Raft),
            MonRequest::Subscribe { .. } => {
                Err(StoreError::internal("subscribe handled by the connection"))
            }
        };
        res.unwrap_or_else(MonResponse::Error)
    }

    /// The leader's duty loop: failure detection, blocklist expiry. Runs until the process
    /// ends.
    pub async fn leader_duties(self: Arc<Self>, tick: Duration) {
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            let leader = self.consensus.is_leader();
            let map = self.map();
            let now = clock::now();
            let mut cmds = {
                let mut d = self.detector();
                d.set_leader(leader, now);
                d.tick(&map, now)
            };
            cmds.extend(locked(&self.blocklist_expiry, "blocklist expiry").tick(
                &map,
                leader,
                now,
                self.blocklist_expire_ms,
            ));
            for cmd in cmds {
                match tokio::time::timeout(
                    self.command_timeout,
                    self.consensus.propose(cmd.clone()),
                )
                .await
                {
                    Ok(Ok(out)) if out.changed => info!(epoch = out.epoch, "{}", out.message),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => debug!(?cmd, "failure detector proposal not applied: {e}"),
                    Err(_) => warn!(?cmd, "failure detector proposal timed out (no quorum?)"),
                }
            }
        }
    }
}

/// Accepts connections until the listener fails.
pub async fn serve<C: Consensus>(core: Arc<MonitorCore<C>>, listener: TcpListener) {
    accept_loop(listener, |stream| connection(core.clone(), stream)).await
}

async fn connection<C: Consensus>(core: Arc<MonitorCore<C>>, stream: TcpStream) {
    let mut conn = ServerConn::new(stream, DEFAULT_MAX_FRAME_BYTES, REPLY_QUEUE);
    let replier = conn.replier();
    let slots = Arc::new(Semaphore::new(PER_CONN_CONCURRENCY));
    let mut subscription: Option<tokio::task::JoinHandle<()>> = None;
    while let Some((tag, req)) = conn.next_request::<MonRequest>().await {
        if let MonRequest::Subscribe { have_epoch } = req {
            // One subscription per connection: its pushes share the connection's writer.
            if subscription.is_some() {
                let e = StoreError::invalid("this connection is already subscribed");
                replier.reply(tag, &MonResponse::Error(e)).await;
                continue;
            }
            replier.reply(tag, &MonResponse::Subscribed).await;
            subscription = Some(tokio::spawn(push_maps(
                core.clone(),
                replier.clone(),
                have_epoch,
            )));
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let core = core.clone();
        let replier = replier.clone();
        let span = tracing::debug_span!("request", tag, kind = request_kind(&req));
        tokio::spawn(
            async move {
                let _permit = permit;
                let resp = core.handle(req).await;
                replier.reply(tag, &resp).await;
            }
            .instrument(span),
        );
    }
    if let Some(sub) = subscription {
        sub.abort();
    }
    conn.finish().await;
}

fn request_kind(req: &MonRequest) -> &'static str {
    match req {
        MonRequest::Ping => "ping",
        MonRequest::GetMap => "get_map",
        MonRequest::Subscribe { .. } => "subscribe",
        MonRequest::Command(_) => "command",
        MonRequest::Status => "status",
        MonRequest::OsdHeartbeat { .. } => "osd_heartbeat",
        MonRequest::ClientHeartbeat { .. } => "client_heartbeat",
        MonRequest::ClientList => "client_list",
        MonRequest::Membership(_) => "membership",
        MonRequest::Forward(_) => "forward",
        MonRequest::Raft { .. } => "raft",
    }
}

/// Pushes every map newer than what the subscriber has, until the connection closes.
async fn push_maps<C: Consensus>(core: Arc<MonitorCore<C>>, replier: Replier, mut have: u64) {
    let mut rx = core.consensus.map();
    loop {
        let map = rx.borrow_and_update().clone();
        if map.epoch > have {
            have = map.epoch;
            if !replier
                .push(&MonResponse::Map(Box::new((*map).clone())))
                .await
            {
                return;
            }
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = replier.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "the monitor's failure detector lock is poisoned")]
    fn a_poisoned_table_fails_loudly() {
        let m = Arc::new(Mutex::new(0u32));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("a bug while holding the lock");
        })
        .join();
        assert!(m.is_poisoned());
        drop(locked(&m, "failure detector"));
    }
}
