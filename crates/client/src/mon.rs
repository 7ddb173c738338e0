//! Talking to the monitors: requests with failover across monitors, and map subscriptions.

use std::sync::Arc;
use std::time::Duration;

use store_types::map::ClusterMap;
use store_types::msg::{CommandOutcome, MapCommand, MonRequest, MonResponse, StatusReport};
use store_types::wire::{self, DEFAULT_MAX_FRAME_BYTES};
use store_types::{ErrorCode, StoreError};
use tokio::sync::{watch, Mutex};
use tracing::{debug, warn};

use crate::conn::RpcConn;

#[derive(Clone, Debug)]
pub struct MonClientOptions {
    pub connect_timeout: Duration,
    /// Bound for reads (status, map).
    pub read_timeout: Duration,
    /// Bound for map changes; the monitor bounds its own wait below this.
    pub command_timeout: Duration,
}

impl Default for MonClientOptions {
    fn default() -> Self {
        MonClientOptions {
            connect_timeout: Duration::from_millis(1000),
            read_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(20),
        }
    }
}

/// A client of the monitor cluster. Keeps one connection, to the first monitor that answers.
pub struct MonClient {
    addrs: Vec<String>,
    opts: MonClientOptions,
    current: Mutex<Option<RpcConn>>,
}

impl MonClient {
    pub fn new(addrs: Vec<String>, opts: MonClientOptions) -> Arc<Self> {
        Arc::new(MonClient {
            addrs,
            opts,
            current: Mutex::new(None),
        })
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// A live connection: the current one, or the first monitor (in order, starting after
    /// the last one that failed) that accepts. The error lists what each address said.
    async fn conn(&self) -> Result<RpcConn, StoreError> {
        let mut cur = self.current.lock().await;
        if let Some(c) = cur.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let start = cur
            .as_ref()
            .and_then(|c| self.addrs.iter().position(|a| a == c.addr()))
            .map(|i| i + 1)
            .unwrap_or(0);
        let mut errors = Vec::new();
        for i in 0..self.addrs.len() {
            let addr = &self.addrs[(start + i) % self.addrs.len()];
            match RpcConn::connect(addr, self.opts.connect_timeout, DEFAULT_MAX_FRAME_BYTES).await {
                Ok((c, _pushes)) => {
                    *cur = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => errors.push(e.message),
            }
        }
        Err(StoreError::new(
            ErrorCode::Unreachable,
            format!("cannot reach any monitor: {}", errors.join("; ")),
        ))
    }

    /// Sends a request; on a broken connection retries once per monitor.
    pub async fn request(
        &self,
        req: &MonRequest,
        timeout: Duration,
    ) -> Result<MonResponse, StoreError> {
        let mut last = None;
        for _ in 0..self.addrs.len().max(1) {
            let conn = self.conn().await?;
            match conn.call::<_, MonResponse>(req, timeout).await {
                Ok(MonResponse::Error(e)) => return Err(e),
                Ok(resp) => return Ok(resp),
                Err(e) if e.code == ErrorCode::Unreachable => {
                    debug!(addr = conn.addr(), error = %e, "monitor connection failed, trying next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::new(ErrorCode::Unreachable, "no monitors")))
    }

    pub async fn command(&self, cmd: MapCommand) -> Result<CommandOutcome, StoreError> {
        match self
            .request(&MonRequest::Command(cmd), self.opts.command_timeout)
            .await?
        {
            MonResponse::Outcome(o) => Ok(o),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn status(&self) -> Result<StatusReport, StoreError> {
        match self
            .request(&MonRequest::Status, self.opts.read_timeout)
            .await?
        {
            MonResponse::Status(s) => Ok(*s),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn get_map(&self) -> Result<ClusterMap, StoreError> {
        match self
            .request(&MonRequest::GetMap, self.opts.read_timeout)
            .await?
        {
            MonResponse::Map(m) => Ok(*m),
            other => Err(unexpected(&other)),
        }
    }

    /// Subscribes to the map. The receiver holds the newest map seen (None until the first
    /// arrives). A background task keeps the subscription alive across monitor failures and
    /// only ever moves the epoch forward.
    pub fn subscribe(self: &Arc<Self>) -> watch::Receiver<Option<Arc<ClusterMap>>> {
        let (tx, rx) = watch::channel(None);
        let me = self.clone();
        tokio::spawn(async move { me.subscription_loop(tx).await });
        rx
    }

    async fn subscription_loop(&self, tx: watch::Sender<Option<Arc<ClusterMap>>>) {
        let mut idx = 0usize;
        while !tx.is_closed() {
            let addr = self.addrs[idx % self.addrs.len()].clone();
            idx += 1;
            if let Err(e) = self.follow_one(&addr, &tx).await {
                debug!(%addr, error = %e, "map subscription broke; trying next monitor");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn follow_one(
        &self,
        addr: &str,
        tx: &watch::Sender<Option<Arc<ClusterMap>>>,
    ) -> Result<(), StoreError> {
        let (conn, mut pushes) =
            RpcConn::connect(addr, self.opts.connect_timeout, DEFAULT_MAX_FRAME_BYTES).await?;
        let have_epoch = tx.borrow().as_ref().map(|m| m.epoch).unwrap_or(0);
        let resp: MonResponse = conn
            .call(
                &MonRequest::Subscribe { have_epoch },
                self.opts.read_timeout,
            )
            .await?;
        if let MonResponse::Error(e) = resp {
            return Err(e);
        }
        // Maps are pushed only when they change, so a silent connection says nothing: ping
        // the monitor on it, and give it up (to reconnect, possibly elsewhere) when a ping
        // goes unanswered. A partitioned peer's connection can stay open on this side
        // forever otherwise, and this follower would never see a newer map.
        let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            let bytes = tokio::select! {
                b = pushes.recv() => match b {
                    Some(b) => b,
                    None => break,
                },
                _ = ping.tick() => {
                    conn.call::<_, MonResponse>(&MonRequest::Ping, self.opts.read_timeout)
                        .await?;
                    continue;
                }
            };
            let map: ClusterMap = match wire::decode_payload::<MonResponse>(&bytes) {
                Ok(MonResponse::Map(m)) => *m,
                Ok(other) => {
                    warn!(%addr, "unexpected push: {other:?}");
                    continue;
                }
                Err(e) => {
                    // Not a transient fault: the monitor runs another release.
                    warn!(%addr, "cannot decode a map from the monitor (another release?): {e}");
                    return Err(StoreError::new(e.code(), e.to_string()));
                }
            };
            let newer = tx.borrow().as_ref().is_none_or(|cur| map.epoch > cur.epoch);
            if newer {
                tx.send_replace(Some(Arc::new(map)));
            }
            if tx.is_closed() {
                break;
            }
        }
        Err(StoreError::new(
            ErrorCode::Unreachable,
            format!("{addr}: subscription closed"),
        ))
    }
}

/// How often a map subscription checks that its monitor still answers.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(2);

fn unexpected(resp: &MonResponse) -> StoreError {
    StoreError::internal(format!("unexpected monitor reply: {resp:?}"))
}

/// Sends one request to every monitor (those of the map plus the configured ones), keeping
/// a connection to each: liveness reports (OSD and client heartbeats) go to all monitors so
/// whichever leads, or leads next, has fresh data.
pub struct MonFanout {
    configured: Vec<String>,
    conns: std::collections::HashMap<String, RpcConn>,
    timeout: Duration,
}

impl MonFanout {
    pub fn new(configured: Vec<String>, timeout: Duration) -> Self {
        MonFanout {
            configured,
            conns: Default::default(),
            timeout,
        }
    }

    /// Sends `req` to every monitor in parallel; failures are logged at debug and retried
    /// on the next call.
    pub async fn send_all(&mut self, map: Option<&ClusterMap>, req: &MonRequest) {
        let mut addrs: std::collections::BTreeSet<String> =
            self.configured.iter().cloned().collect();
        if let Some(map) = map {
            addrs.extend(map.mons.values().map(|m| m.addr.clone()));
        }
        self.conns
            .retain(|a, c| addrs.contains(a) && !c.is_closed());
        let timeout = self.timeout;
        let sends = addrs.iter().map(|addr| {
            let existing = self.conns.get(addr).cloned();
            async move {
                let conn = match existing {
                    Some(c) => c,
                    None => RpcConn::connect(addr, timeout, DEFAULT_MAX_FRAME_BYTES)
                        .await
                        .ok()
                        .map(|(c, _)| c)?,
                };
                match conn.call::<_, MonResponse>(req, timeout).await {
                    Ok(MonResponse::Error(e)) => debug!(%addr, "report refused: {e}"),
                    Ok(_) => {}
                    Err(e) => debug!(%addr, "report failed: {e}"),
                }
                Some((addr.clone(), conn))
            }
        });
        for (addr, conn) in futures::future::join_all(sends).await.into_iter().flatten() {
            self.conns.insert(addr, conn);
        }
    }
}
