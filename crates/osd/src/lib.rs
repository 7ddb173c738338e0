//! The OSD daemon: one per data device.
//!
//! This first part owns the OSD's identity and cluster membership: the data dir's identity
//! record, registering with the monitors (which assign the id), heartbeats to every monitor,
//! and re-booting when the map wrongly says it is down. Object storage and replication join
//! it with the replicated I/O issue. It must not know how monitors agree or how CRUSH maps.

pub mod announce;
pub mod pg;
pub mod service;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use store_client::{MonClient, MonFanout};
use store_objstore::device::{self, AnyDevice, Backend};
use store_objstore::{BlockStore, ObjectStore};
use store_types::map::{ClusterMap, CrushWeight, WEIGHT_ONE};
use store_types::msg::{MapCommand, MonRequest, OsdStat};
use store_types::wire::{decode_record, encode_record};
use store_types::{ErrorCode, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

const META_FILE: &str = "osd_meta";
const META_V: u16 = 1;

/// The identity record in the OSD's data dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdMeta {
    pub fsid: String,
    pub uuid: String,
    /// Assigned by the monitors at first boot.
    pub id: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct OsdSettings {
    pub fsid: String,
    /// Identity record and the object store's RocksDB (`db/`).
    pub data_dir: PathBuf,
    /// The data device: a block device or a file.
    pub device: PathBuf,
    /// Create a file-backed device of this size when `device` does not exist.
    pub device_size_bytes: Option<u64>,
    /// How a new file-backed device gets its space.
    pub device_fill: device::FileFill,
    pub backend: Backend,
    pub host: String,
    /// Address to listen on; port 0 picks a free one.
    pub addr: String,
    /// CRUSH weight; None: the device's size in TiB (as Ceph does).
    pub weight: Option<CrushWeight>,
    pub mon_addrs: Vec<String>,
    pub heartbeat_interval: Duration,
    pub pg_limits: pg::PgLimits,
    pub recovery: service::RecoveryLimits,
    /// Client operations in hand longer than this are reported as slow (SLOW_OPS;
    /// Ceph's `osd_op_complaint_time`).
    pub op_complaint: Duration,
}

/// Reads or creates the identity record. An empty or missing dir is initialised; a dir with
/// other content, or another cluster's record, is refused.
pub fn open_data_dir(dir: &Path, fsid: &str) -> Result<OsdMeta, StoreError> {
    let refuse = |m: String| {
        StoreError::new(
            ErrorCode::NotPermitted,
            format!("osd data dir {}: {m}", dir.display()),
        )
    };
    let meta_path = dir.join(META_FILE);
    if meta_path.exists() {
        let bytes = std::fs::read(&meta_path)
            .map_err(|e| refuse(format!("cannot read {META_FILE}: {e}")))?;
        let meta: OsdMeta = decode_record(META_V, &bytes).map_err(|e| {
            refuse(format!(
                "{META_FILE} is unreadable ({e}); refusing to reinitialise it"
            ))
        })?;
        if meta.fsid != fsid {
            return Err(StoreError::new(
                ErrorCode::WrongCluster,
                format!(
                    "osd data dir {} belongs to cluster {}, but store.conf says fsid {fsid}",
                    dir.display(),
                    meta.fsid
                ),
            ));
        }
        return Ok(meta);
    }
    let empty = match std::fs::read_dir(dir) {
        Ok(mut it) => it.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(refuse(format!("cannot read: {e}"))),
    };
    if !empty {
        return Err(refuse(
            "not empty and has no osd_meta: not an OSD data dir; refusing to touch it".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| refuse(format!("cannot create: {e}")))?;
    let meta = OsdMeta {
        fsid: fsid.to_string(),
        uuid: uuid::Uuid::new_v4().to_string(),
        id: None,
    };
    write_meta(dir, &meta)?;
    Ok(meta)
}

/// Writes the identity record atomically (temp file, fsync, rename, fsync dir).
fn write_meta(dir: &Path, meta: &OsdMeta) -> Result<(), StoreError> {
    let io = |e: std::io::Error| {
        StoreError::internal(format!("writing {}/{META_FILE}: {e}", dir.display()))
    };
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&encode_record(META_V, meta)).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, dir.join(META_FILE)).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

type Store = BlockStore<AnyDevice>;

fn refused(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(ErrorCode::NotPermitted, e.to_string())
}

/// Opens the object store, creating the device file and the store on first start.
async fn open_store(s: &OsdSettings, meta: &OsdMeta) -> Result<Store, StoreError> {
    if !s.device.exists() {
        let Some(size) = s.device_size_bytes else {
            return Err(refused(format!(
                "device {} does not exist: pass --size to create a file-backed device",
                s.device.display()
            )));
        };
        device::create_file_device(&s.device, size, s.device_fill)
            .map_err(|e| refused(format!("creating device {}: {e}", s.device.display())))?;
        info!(device = %s.device.display(), size, "created file-backed device");
    }
    let dev = AnyDevice::open(&s.device, s.backend)
        .map_err(|e| refused(format!("opening device {}: {e}", s.device.display())))?;
    let db = s.data_dir.join("db");
    let fresh = std::fs::read_dir(&db)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    let store = if fresh {
        BlockStore::create(dev, &db, &s.fsid, &meta.uuid).await
    } else {
        BlockStore::open(dev, &db, &s.fsid).await
    };
    store.map_err(|e| refused(format!("object store ({}): {e}", s.device.display())))
}

/// CRUSH weight from capacity: 1.0 per TiB, at least the smallest non-zero weight.
fn weight_for(total_bytes: u64) -> CrushWeight {
    let w = (total_bytes as u128 * WEIGHT_ONE as u128) >> 40;
    w.clamp(1, u32::MAX as u128) as CrushWeight
}

/// Usage for heartbeats; checksum errors count only damage not yet repaired.
fn stat_of(store: &Store, service: &service::OsdService<Store>) -> OsdStat {
    let (recovered, recovered_bytes) = service.recovered();
    let u = store.usage();
    OsdStat {
        total_bytes: u.total_bytes,
        used_bytes: u.used_bytes,
        objects: u.objects,
        checksum_errors: u.checksum_errors.saturating_sub(service.repaired()),
        recovered_objects: recovered,
        recovered_bytes,
        device_errors: service.device_errors(),
    }
}

/// Runs the OSD until the process is stopped.
pub async fn run(settings: OsdSettings) -> Result<(), StoreError> {
    let mut meta = open_data_dir(&settings.data_dir, &settings.fsid)?;
    let store = Arc::new(open_store(&settings, &meta).await?);
    let weight = settings
        .weight
        .unwrap_or_else(|| weight_for(store.usage().total_bytes));
    let listener = TcpListener::bind(&settings.addr)
        .await
        .map_err(|e| StoreError::invalid(format!("cannot listen on {}: {e}", settings.addr)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StoreError::internal(e.to_string()))?
        .to_string();
    let mons = MonClient::new(settings.mon_addrs.clone(), Default::default());
    let id = boot(&mons, &meta, &addr, &settings.host, weight).await?;
    if meta.id != Some(id) {
        meta.id = Some(id);
        write_meta(&settings.data_dir, &meta)?;
    }
    info!(osd = id, %addr, host = %settings.host, "osd booted");
    let settings = Arc::new(settings);
    // Follow the map; if it says we are down while we run, boot again (Ceph's
    // "wrongly marked me down").
    let mut maps = mons.subscribe();
    let announcer = announce::Announcer::new();
    tokio::spawn(announcer.clone().run(mons.clone()));
    let service = service::OsdService::new(
        id,
        store.clone(),
        maps.clone(),
        settings.pg_limits,
        settings.recovery,
        announcer,
        store_client::optrack::OpTracker::new(settings.op_complaint),
    );
    tokio::spawn(service.clone().serve(listener));
    tokio::spawn(service.clone().housekeeping());
    tokio::spawn(service.clone().sweep_strays());
    tokio::spawn(heartbeat_loop(
        id,
        meta.uuid.clone(),
        settings.clone(),
        maps.clone(),
        store.clone(),
        service.clone(),
    ));
    let mut device_failure = service.device_failure();
    loop {
        tokio::select! {
            r = maps.changed() => if r.is_err() {
                return Err(StoreError::internal("map subscription ended"));
            },
            _ = device_failure.changed() => {
                let what = device_failure.borrow().clone().unwrap_or_default();
                return Err(stop_on_device_failure(id, &meta, &settings, &store, &service, what).await);
            }
        }
        let map: Option<Arc<ClusterMap>> = maps.borrow_and_update().clone();
        let Some(map) = map else { continue };
        match map.osds.get(&id) {
            Some(o) if !o.up => {
                warn!(
                    osd = id,
                    epoch = map.epoch,
                    "map marks this OSD down while it runs; booting again"
                );
                if let Err(e) = boot(&mons, &meta, &addr, &settings.host, weight).await {
                    warn!("re-boot failed: {e}");
                }
            }
            Some(_) => {}
            None => debug!(osd = id, epoch = map.epoch, "this OSD is not in the map"),
        }
    }
}

/// The data device failed an I/O: report it (the heartbeat carries the error count, for
/// OSD_DEVICE_ERRORS), have the monitors mark this OSD down at once rather than after the
/// heartbeat grace, and stop. Each step is bounded: the OSD stops whatever they answer.
async fn stop_on_device_failure(
    id: u32,
    meta: &OsdMeta,
    settings: &OsdSettings,
    store: &Store,
    service: &Arc<service::OsdService<Store>>,
    what: String,
) -> StoreError {
    let bound = Duration::from_secs(3);
    let mut fanout = MonFanout::new(settings.mon_addrs.clone(), bound);
    let (pgs_epoch, busy_pgs) = service.busy_pgs();
    let report = MonRequest::OsdHeartbeat {
        id,
        uuid: meta.uuid.clone(),
        stat: stat_of(store, service),
        busy_pgs,
        pgs_epoch,
        slow_ops: service.slow_ops(),
    };
    let _ = tokio::time::timeout(bound, fanout.send_all(None, &report)).await;
    let mons = MonClient::new(settings.mon_addrs.clone(), Default::default());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let down = MapCommand::OsdMarkDown {
        ids: vec![id],
        now_ms,
    };
    if let Ok(Err(e)) = tokio::time::timeout(bound, mons.command(down)).await {
        warn!("could not have this OSD marked down: {e}");
    }
    StoreError::new(
        ErrorCode::DeviceError,
        format!("osd.{id} stopped: I/O error on its data device while {what}"),
    )
}

async fn boot(
    mons: &MonClient,
    meta: &OsdMeta,
    addr: &str,
    host: &str,
    weight: CrushWeight,
) -> Result<u32, StoreError> {
    let cmd = MapCommand::OsdBoot {
        uuid: meta.uuid.clone(),
        addr: addr.to_string(),
        host: host.to_string(),
        weight,
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match mons.command(cmd.clone()).await {
            Ok(out) => {
                return out
                    .osd_id
                    .ok_or_else(|| StoreError::internal("monitor did not return an OSD id"))
            }
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::WrongCluster
                        | ErrorCode::InvalidArgument
                        | ErrorCode::VersionMismatch
                ) =>
            {
                return Err(e)
            }
            Err(e) => {
                warn!(
                    "boot not accepted yet, retrying in {} ms: {e}",
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// How long after a map change an OSD reports its PGs (the engines see the map first).
const MAP_REPORT_DELAY: Duration = Duration::from_millis(30);

/// Heartbeats every monitor (those in the map, plus mon_host), so whichever leads has
/// fresh data.
async fn heartbeat_loop(
    id: u32,
    uuid: String,
    s: Arc<OsdSettings>,
    maps: watch::Receiver<Option<Arc<ClusterMap>>>,
    store: Arc<Store>,
    service: Arc<service::OsdService<Store>>,
) {
    let timeout = s.heartbeat_interval.max(Duration::from_millis(200));
    let mut fanout = MonFanout::new(s.mon_addrs.clone(), timeout);
    let mut tick = tokio::time::interval(s.heartbeat_interval);
    let mut changes = maps.clone();
    loop {
        // Also report soon after a map change: until this OSD reports on the newest
        // placement, the monitors show its PGs as unknown.
        tokio::select! {
            _ = tick.tick() => {}
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                tokio::time::sleep(MAP_REPORT_DELAY).await;
                changes.borrow_and_update();
                tick.reset();
            }
        }
        let (pgs_epoch, busy_pgs) = service.busy_pgs();
        let slow_ops = service.slow_ops();
        if slow_ops.count > 0 {
            warn!(
                "{} slow ops, oldest one blocked for {} ms: {}",
                slow_ops.count, slow_ops.oldest_age_ms, slow_ops.oldest
            );
        }
        let req = MonRequest::OsdHeartbeat {
            id,
            uuid: uuid.clone(),
            stat: stat_of(&store, &service),
            busy_pgs,
            pgs_epoch,
            slow_ops,
        };
        let map = maps.borrow().clone();
        fanout.send_all(map.as_deref(), &req).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_identity_is_kept_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("osd0");
        let m1 = open_data_dir(&dir, "fsid-a").unwrap();
        let m2 = open_data_dir(&dir, "fsid-a").unwrap();
        assert_eq!(m1, m2, "identity must survive a restart");
        let e = open_data_dir(&dir, "fsid-b").unwrap_err();
        assert_eq!(e.code, ErrorCode::WrongCluster);
        std::fs::write(dir.join(META_FILE), b"garbage").unwrap();
        assert!(open_data_dir(&dir, "fsid-a").is_err());
        let other = d.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("file"), b"x").unwrap();
        assert!(open_data_dir(&other, "fsid-a").is_err());
    }
}

/// Golden bytes of the OSD's data-dir identity record (`osd_meta`): a changed field or
/// field order would make every existing OSD refuse its data dir. If this fails, the
/// format changed: bump `META_V` (and read the old version) or undo the change.
#[cfg(test)]
mod golden {
    use super::*;

    /// Bytes from hex digits; whitespace is ignored.
    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        (digits.chunks(2))
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `[META_V u16 LE][fsid][uuid][id: Option<u32>]`, postcard.
    const META: &str = "01 00  02 66 73  03 75 2d 31  01 ac 02";
    const META_NO_ID: &str = "01 00  02 66 73  03 75 2d 31  00";

    fn meta(id: Option<u32>) -> OsdMeta {
        OsdMeta {
            fsid: "fs".into(),
            uuid: "u-1".into(),
            id,
        }
    }

    #[test]
    fn golden_osd_meta_record() {
        assert_eq!((META_FILE, META_V), ("osd_meta", 1));
        for (value, want) in [(meta(Some(300)), META), (meta(None), META_NO_ID)] {
            let got = encode_record(META_V, &value);
            assert_eq!(
                to_hex(&got),
                to_hex(&hex(want)),
                "osd_meta record of {value:?}"
            );
            assert_eq!(decode_record::<OsdMeta>(META_V, &hex(want)).unwrap(), value);
        }
    }

    /// The file `open_data_dir` reads is exactly that record.
    #[test]
    fn golden_osd_meta_file() {
        let d = tempfile::tempdir().unwrap();
        write_meta(d.path(), &meta(Some(300))).unwrap();
        let file = std::fs::read(d.path().join("osd_meta")).unwrap();
        assert_eq!(to_hex(&file), to_hex(&hex(META)));
        assert_eq!(open_data_dir(d.path(), "fs").unwrap(), meta(Some(300)));
    }
}
