//! Map subscriptions: every subscriber gets each new epoch promptly.

use std::time::{Duration, Instant};

use store_client::{MonClient, MonClientOptions};
use store_integration::{ClusterOpts, TestCluster};
use store_types::map::Flag;
use store_types::msg::MapCommand;

#[test]
fn new_epoch_reaches_fifty_subscribers() {
    let mut c = TestCluster::start(ClusterOpts {
        osds: 1,
        ..Default::default()
    });
    let addrs: Vec<String> = c.mons.iter().map(|m| m.addr.clone()).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let took = rt.block_on(async move {
        let mut subs = Vec::new();
        for _ in 0..50 {
            // Separate clients: separate connections, spread over the monitors.
            let client = MonClient::new(addrs.clone(), MonClientOptions::default());
            subs.push(client.subscribe());
        }
        for s in subs.iter_mut() {
            tokio::time::timeout(Duration::from_secs(20), s.wait_for(|m| m.is_some()))
                .await
                .expect("first map within 20 s")
                .expect("subscription alive");
        }
        let admin = MonClient::new(addrs.clone(), MonClientOptions::default());
        let t0 = Instant::now();
        let out = admin
            .command(MapCommand::SetFlag(Flag::NoRebalance))
            .await
            .expect("set flag");
        assert!(out.changed);
        let epoch = out.epoch;
        for s in subs.iter_mut() {
            let m = tokio::time::timeout(
                Duration::from_secs(20),
                s.wait_for(|m| m.as_ref().is_some_and(|m| m.epoch >= epoch)),
            )
            .await
            .expect("new epoch within 20 s")
            .expect("subscription alive")
            .clone()
            .expect("map");
            assert!(
                m.has_flag(Flag::NoRebalance),
                "epoch {epoch} must carry the change"
            );
        }
        t0.elapsed()
    });
    eprintln!("FIGURE new epoch (commit + delivery) reached 50 subscribers in {took:?}");
    c.check_logs();
}
