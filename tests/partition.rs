//! A network partition of one OSD rather than a kill: the OSD runs in its own network
//! namespace, joined to this one by a veth pair carrying 127.77.N.0/24 addresses (the only
//! addresses used besides 127.0.0.1). Cutting the link (`ip link set ... down`) gets the
//! OSD marked down while it keeps running; writes go on without it; when the link returns
//! the OSD boots again ("wrongly marked me down"), is recovered, and every replica holds
//! exactly what was acknowledged.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use store_integration::{wait_for, ClusterOpts, TestCluster};

/// A network namespace with a veth link to this one, removed on drop (which removes the
/// link and its routes).
struct Netns {
    name: String,
    host_if: String,
    /// The namespace side's address.
    addr: String,
    /// This side's address on the link.
    host_addr: String,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Needs CAP_NET_ADMIN (the test machines run tests as root).
    fn create() -> Netns {
        let tag = std::process::id() % 100_000;
        let net = 1 + std::process::id() % 250;
        let n = Netns {
            name: format!("store-part-{tag}"),
            host_if: format!("sph{tag}"),
            addr: format!("127.77.{net}.2"),
            host_addr: format!("127.77.{net}.1"),
        };
        let host_addr = n.host_addr.clone();
        let ns_if = format!("spn{tag}");
        sh(&["ip", "netns", "add", &n.name]);
        sh(&[
            "ip", "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        sh(&["ip", "link", "set", &ns_if, "netns", &n.name]);
        // 127/8 is only routed off `lo` where route_localnet allows it: set it on the two
        // ends of our link only.
        sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.route_localnet=1", n.host_if),
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_addr}/32"),
            "dev",
            &n.host_if,
        ]);
        sh(&["ip", "link", "set", &n.host_if, "up"]);
        // This side: the namespace's address goes over the link (more specific than the
        // local 127/8 route, so it needs the local table).
        sh(&[
            "ip",
            "route",
            "add",
            &format!("{}/32", n.addr),
            "dev",
            &n.host_if,
            "src",
            &host_addr,
            "table",
            "local",
        ]);
        let inside = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", n.name.as_str()];
            v.extend_from_slice(args);
            sh(&v);
        };
        inside(&["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"]);
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/32", n.addr),
            "dev",
            &ns_if,
        ]);
        inside(&["ip", "link", "set", &ns_if, "up"]);
        // The namespace reaches this side's 127.0.0.1 (monitors, other OSDs) over the link.
        inside(&[
            "ip",
            "route",
            "add",
            &format!("{host_addr}/32"),
            "dev",
            &ns_if,
        ]);
        inside(&[
            "ip",
            "route",
            "add",
            "127.0.0.0/8",
            "dev",
            &ns_if,
            "src",
            &n.addr,
        ]);
        n
    }

    /// Cuts or restores the link. While cut, this side drops what it sends to the
    /// namespace (a blackhole route: like a pulled cable, nothing answers, not even a
    /// reset) and the namespace's side has no carrier.
    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        sh(&["ip", "link", "set", &self.host_if, state]);
        let dst = format!("{}/32", self.addr);
        let mut route = vec!["ip", "route", "replace"];
        if up {
            route.extend([dst.as_str(), "dev", &self.host_if, "src", &self.host_addr]);
        } else {
            route.extend(["blackhole", dst.as_str()]);
        }
        route.extend(["table", "local"]);
        sh(&route);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args([
                "route",
                "del",
                &format!("{}/32", self.addr),
                "table",
                "local",
            ])
            .output();
    }
}

fn content(i: u64, round: u64) -> Bytes {
    Bytes::from(
        (0..(900 + i * 61))
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(11) ^ (round as u8).wrapping_mul(29))
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn a_partitioned_osd_is_marked_down_and_recovered_when_the_link_returns() {
    // Declared first, dropped last: the cluster's processes are killed before the
    // namespace goes.
    let ns = Netns::create();
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 2,
        grace_secs: 2.0,
        ..Default::default()
    });
    c.start_osd_netns(2, &ns.name, &format!("{}:0", ns.addr));
    c.wait_osds_up(3, Duration::from_secs(60));
    let map = c.map();
    let partitioned = map
        .osds
        .values()
        .find(|o| o.addr.starts_with(&ns.addr))
        .expect("the namespaced OSD registered its 127.77 address")
        .id;
    c.create_pool("vm-pool", 16);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool");
    let mut model: BTreeMap<String, Bytes> = BTreeMap::new();
    let write = |model: &mut BTreeMap<String, Bytes>, round: u64| {
        rt.block_on(async {
            for i in 0..120u64 {
                let name = format!("obj-{i}");
                client
                    .write(pool.id, &name, 0, content(i, round))
                    .await
                    .expect("write");
                model.insert(name, content(i, round));
            }
        })
    };
    write(&mut model, 0);

    // Cut the link: the OSD keeps running, but nobody hears it. Writes start at once:
    // those whose PG includes the cut OSD wait until it is marked down (a new interval
    // without it), then complete with two copies.
    let t0 = Instant::now();
    ns.link(false);
    write(&mut model, 1);
    let writes_done = t0.elapsed();
    wait_for(
        Duration::from_secs(30),
        "the partitioned OSD marked down",
        || {
            let s = c.try_status()?;
            (s["osdmap"]["num_up_osds"] == 2).then_some(())
        },
    );
    let down_after = t0.elapsed();
    assert!(c.pid(&TestCluster::osd_name(2)).is_some());
    let map = c.map();
    assert!(!map.osds[&partitioned].up, "osd.{partitioned} still up");
    eprintln!(
        "FIGURE partition: 120 writes started at the cut all done {writes_done:?} after it; osd.{partitioned} marked down (seen in status) {down_after:?} after it"
    );

    // The link returns: the OSD boots again and is recovered.
    let t2 = Instant::now();
    ns.link(true);
    wait_for(
        Duration::from_secs(60),
        "HEALTH_OK after the link returned",
        || {
            let s = c.try_status()?;
            (s["osdmap"]["num_up_osds"] == 3 && s["health"]["status"] == "HEALTH_OK").then_some(())
        },
    );
    eprintln!(
        "FIGURE partition: HEALTH_OK {:?} after the link returned",
        t2.elapsed()
    );
    // The partitioned OSD booted again.
    c.wait_log(
        &TestCluster::osd_name(2),
        "map marks this OSD down while it runs; booting again",
    );
    store_integration::check_replicas(&rt, &c.map(), "vm-pool", &model);
    c.check_logs();
}
