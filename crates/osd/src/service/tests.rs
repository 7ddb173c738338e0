//! The runtime against a real peer: two OSD services on loopback, real stores.

use std::sync::atomic::AtomicUsize;

use store_objstore::device::{self, AnyDevice, Backend, FileFill};
use store_objstore::BlockStore;
use store_types::map::WEIGHT_ONE;
use tokio::net::TcpListener;

use super::*;

async fn service(
    id: OsdId,
    dir: &std::path::Path,
    maps: MapRx,
) -> Arc<OsdService<BlockStore<AnyDevice>>> {
    std::fs::create_dir_all(dir).expect("dir");
    let dev_path = dir.join("dev");
    device::create_file_device(&dev_path, 64 << 20, FileFill::Reserve).expect("device");
    let dev = AnyDevice::open(&dev_path, Backend::File).expect("open device");
    let store = BlockStore::create(dev, &dir.join("db"), "f", &format!("u{id}"))
        .await
        .expect("store");
    OsdService::new(
        id,
        Arc::new(store),
        maps,
        PgLimits::default(),
        RecoveryLimits::default(),
        Announcer::new(),
        OpTracker::new(Duration::from_secs(30)),
    )
}

/// Forwards connections to `to`, counting them.
async fn counting_proxy(to: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, accepted)
}

/// Peering and recovery calls used to open a TCP connection each (and so one per 4 MiB
/// piece of a recovered object); they now share one kept connection per peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_calls_share_one_connection_per_peer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let real = listener.local_addr().expect("addr").to_string();
    let (proxy, accepted) = counting_proxy(real).await;
    let mut map = ClusterMap::new("f");
    for (id, addr) in [(0, "127.0.0.1:1"), (1, proxy.as_str())] {
        map.osds.insert(id, osd_info(id, addr));
    }
    let (_tx, maps) = watch::channel(Some(Arc::new(map)));
    let b = service(1, &tmp.path().join("b"), maps.clone()).await;
    tokio::spawn(b.serve(listener));
    let a = service(0, &tmp.path().join("a"), maps).await;
    let pg = Pg { pool: 1, seed: 0 };
    for _ in 0..5 {
        let resp = a.peer_call(1, &OsdRequest::PgHead { pg }).await;
        assert!(matches!(resp, Ok(OsdResponse::Head { .. })), "{resp:?}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection for five calls"
    );
}

/// An up, in OSD at `addr`.
fn osd_info(id: OsdId, addr: &str) -> store_types::map::OsdInfo {
    store_types::map::OsdInfo {
        id,
        uuid: format!("u{id}"),
        addr: addr.to_string(),
        host: format!("h{id}"),
        weight: WEIGHT_ONE,
        up: true,
        is_in: true,
        up_from: 1,
        down_stamp_ms: None,
    }
}
