//! Faults a daemon must survive or die of loudly: a panic in any task ends the process
//! (it does not limp on with poisoned state), and the rest of the cluster keeps serving.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use bytes::Bytes;
use store_integration::{ClusterOpts, TestCluster};

/// A panic in a spawned task (here injected by `STORE_FAILPOINT=panic_after_start`) must
/// abort the whole daemon with the panic in its log as an ERROR. Without the panic hook,
/// tokio catches the task's panic and the OSD keeps running (and heartbeating as up).
#[test]
fn a_panic_in_any_task_ends_the_daemon_loudly() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        ..Default::default()
    });
    c.create_pool("vm-pool", 8);
    c.start_osd_env(3, &[("STORE_FAILPOINT", "panic_after_start")]);
    let name = TestCluster::osd_name(3);
    let status = c
        .wait_exit(&name, Duration::from_secs(20))
        .expect("the panicking OSD must exit by itself");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
    assert!(
        c.log_has(&name, "ERROR") && c.log_has(&name, "panic, aborting the daemon"),
        "the panic must be logged as an ERROR"
    );
    assert!(c.log_has(&name, "failpoint panic_after_start"));
    c.allow_error("panic, aborting");
    // The others keep serving.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    rt.block_on(client.write(pool, "still-here", 0, Bytes::from_static(b"ok")))
        .expect("write after the panic");
    c.check_logs();
}
