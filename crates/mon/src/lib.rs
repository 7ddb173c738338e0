//! The monitor: keeps the cluster map replicated by Raft, answers reads, forwards changes
//! to the leader, detects failed OSDs and computes cluster health.
//!
//! Owns: the map's state machine ([`apply`]), the Raft log and state on RocksDB
//! ([`raft::store`]), failure detection ([`failure`]), health ([`health`]) and the monitor
//! port ([`server`]). Only [`raft`] knows openraft; the rest uses [`consensus::Consensus`].
//! It must not know how OSDs store data or how images are laid out.

pub mod apply;
pub mod clock;
pub mod consensus;
pub mod failure;
pub mod health;
pub mod locks;
pub mod pgs;
pub mod raft;
pub mod server;
pub mod sessions;
pub mod slowops;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use store_types::config::Config;
use store_types::msg::{MonRequest, MonResponse};
use store_types::{ErrorCode, StoreError};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::consensus::Consensus;
use crate::failure::{FailureDetector, FailurePolicy};
use crate::raft::store::MonIdentity;
use crate::raft::{MonNode, RaftConsensus, RaftTiming};

/// Everything a monitor needs to start, resolved from store.conf and the command line.
#[derive(Clone, Debug)]
pub struct MonitorSettings {
    pub fsid: String,
    pub name: String,
    pub addr: String,
    pub data_dir: PathBuf,
    /// Raft id, when known from mon_initial_members; None for a monitor added later.
    pub id: Option<u64>,
    /// The initial monitors (id → name, addr) when this monitor is one of them.
    pub initial: Option<BTreeMap<u64, MonNode>>,
    /// Addresses of the other monitors, to find our id when added later.
    pub mon_addrs: Vec<String>,
    pub policy: FailurePolicy,
    /// A client session silent for this long is gone: a lock claim may break its lock.
    pub session_grace_ms: u64,
    /// Blocklist entries without their own expiry are lifted after this long (0: never).
    pub blocklist_expire_ms: u64,
    pub timing: RaftTiming,
}

fn secs_ms(conf: &Config, entity: &str, key: &str, default_s: f64) -> Result<u64, StoreError> {
    let v: f64 = conf
        .get_parsed(entity, key, default_s)
        .map_err(|e| StoreError::invalid(e.to_string()))?;
    if !(0.0..=1e9).contains(&v) {
        return Err(StoreError::invalid(format!(
            "{key} = {v}: must be a positive number of seconds"
        )));
    }
    Ok((v * 1000.0) as u64)
}

impl MonitorSettings {
    /// Resolves settings for monitor `name` from the conf file.
    pub fn from_conf(
        conf: &Config,
        name: &str,
        addr_override: Option<String>,
    ) -> Result<Self, StoreError> {
        let inv = |e: store_types::config::ConfigError| StoreError::invalid(e.to_string());
        let fsid = conf.fsid().map_err(inv)?;
        let mons = conf.mons().map_err(inv)?;
        let entity = format!("mon.{name}");
        let me = mons.iter().find(|m| m.name == name);
        let addr = addr_override
            .or_else(|| conf.get(&entity, "public_addr"))
            .or_else(|| me.map(|m| m.addr.clone()))
            .ok_or_else(|| {
                StoreError::invalid(format!(
                    "mon.{name} is not in mon_initial_members and has no public_addr: pass --addr IP:PORT"
                ))
            })?;
        let data_dir = conf
            .get(&entity, "mon_data")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/store/mon/{name}")));
        let initial = me.map(|_| {
            mons.iter()
                .map(|m| {
                    (
                        m.id,
                        MonNode {
                            name: m.name.clone(),
                            addr: m.addr.clone(),
                        },
                    )
                })
                .collect()
        });
        let policy = FailurePolicy {
            grace_ms: secs_ms(conf, &entity, "osd_heartbeat_grace", 20.0)?,
            down_out_ms: secs_ms(conf, &entity, "mon_osd_down_out_interval", 600.0)?,
        };
        Ok(MonitorSettings {
            fsid,
            name: name.to_string(),
            addr,
            data_dir,
            id: me.map(|m| m.id),
            initial,
            mon_addrs: mons.iter().map(|m| m.addr.clone()).collect(),
            policy,
            session_grace_ms: secs_ms(conf, &entity, "client_session_grace", 20.0)?,
            // Ceph's mon_osd_blocklist_default_expire: an hour.
            blocklist_expire_ms: secs_ms(conf, &entity, "mon_blocklist_default_expire", 3600.0)?,
            timing: RaftTiming::default(),
        })
    }
}

/// Asks the running monitors for this monitor's id (it was added with `storectl mon add`).
async fn find_my_id(settings: &MonitorSettings) -> Result<u64, StoreError> {
    let others: Vec<String> = settings
        .mon_addrs
        .iter()
        .filter(|a| **a != settings.addr)
        .cloned()
        .collect();
    if others.is_empty() {
        return Err(StoreError::invalid("no other monitors in mon_host to join"));
    }
    let client = store_client::MonClient::new(others, Default::default());
    let mut warned = false;
    loop {
        match client
            .request(&MonRequest::GetMap, Duration::from_secs(2))
            .await
        {
            Ok(MonResponse::Map(map)) => {
                if map.fsid != settings.fsid {
                    return Err(StoreError::new(
                        ErrorCode::WrongCluster,
                        format!("monitors at mon_host belong to cluster {}", map.fsid),
                    ));
                }
                if let Some(m) = map.mons.values().find(|m| m.name == settings.name) {
                    return Ok(m.id);
                }
            }
            Ok(_) => {}
            Err(e) => warn!("waiting for the monitor cluster: {e}"),
        }
        if !warned {
            info!(
                "mon.{} is not a member yet: waiting for `storectl mon add {} {}`",
                settings.name, settings.name, settings.addr
            );
            warned = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs a monitor until the process is stopped or it is removed from the cluster.
pub async fn run(settings: MonitorSettings) -> Result<(), StoreError> {
    // Bind first: a port conflict is the most common start-up failure and should be clear.
    let listener = TcpListener::bind(&settings.addr).await.map_err(|e| {
        StoreError::invalid(format!(
            "mon.{}: cannot listen on {}: {e}",
            settings.name, settings.addr
        ))
    })?;
    let id = match settings.id {
        Some(id) => id,
        None => find_my_id(&settings).await?,
    };
    std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
        StoreError::internal(format!(
            "cannot create {}: {e}",
            settings.data_dir.display()
        ))
    })?;
    let identity = MonIdentity {
        fsid: settings.fsid.clone(),
        mon_id: id,
        name: settings.name.clone(),
    };
    let consensus = RaftConsensus::start(
        &settings.data_dir,
        identity,
        settings.initial.clone(),
        settings.timing.clone(),
    )
    .await?;
    let mut map_rx = consensus.map();
    let core = server::MonitorCore::new(
        consensus,
        settings.name.clone(),
        settings.fsid.clone(),
        FailureDetector::new(settings.policy),
        sessions::SessionTable::new(settings.session_grace_ms, clock::now()),
        settings.blocklist_expire_ms,
    );
    info!(
        name = %settings.name, id, addr = %settings.addr, epoch = map_rx.borrow().epoch,
        "monitor started"
    );
    tokio::spawn(server::serve(core.clone(), listener));
    tokio::spawn(core.clone().leader_duties(Duration::from_millis(500)));
    // Exit once a committed membership no longer includes us. The leader stops replicating
    // to a removed monitor, so it may never apply its own removal: also ask the leader.
    let mut was_member = map_rx.borrow().mons.contains_key(&id);
    let mut check = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            changed = map_rx.changed() => if changed.is_err() { break },
            _ = check.tick() => {
                if was_member && removed_per_leader(&core, id).await {
                    info!("mon.{} was removed from the monitor cluster (per the leader); exiting", settings.name);
                    break;
                }
                continue;
            }
        }
        let member = map_rx.borrow().mons.contains_key(&id);
        if was_member && !member {
            info!(
                "mon.{} was removed from the monitor cluster; exiting",
                settings.name
            );
            break;
        }
        was_member |= member;
    }
    core.consensus.shutdown().await;
    Ok(())
}

/// Whether the leader's map, newer than ours, no longer lists monitor `id`.
async fn removed_per_leader(core: &Core, id: u64) -> bool {
    let Some(leader) = core.consensus.leader().filter(|l| l.id != id) else {
        return false;
    };
    let ours = core.consensus.map().borrow().epoch;
    let client = store_client::MonClient::new(vec![leader.addr], Default::default());
    match client.get_map().await {
        Ok(map) => map.fsid == core.fsid && map.epoch > ours && !map.mons.contains_key(&id),
        Err(_) => false,
    }
}

/// For callers that want the core (tests, embedding).
pub type Core = Arc<server::MonitorCore<RaftConsensus>>;
