//! `storectl cluster up/down`: the README's first command, end to end.

use std::process::Command;
use std::time::Duration;

use store_integration::{bin_dir, kill_pid};

fn pids(dir: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir(dir.join("run"))
        .map(|it| {
            it.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

/// Kills whatever `cluster up` left behind, even if the test failed half-way.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in pids(&self.0) {
            kill_pid(p);
        }
    }
}

#[test]
fn cluster_up_then_down() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("c");
    let _cleanup = Cleanup(dir.clone());
    let ctl = bin_dir().join("storectl");
    let up = Command::new(&ctl)
        .args([
            "cluster",
            "up",
            "--dir",
            dir.to_str().expect("utf8"),
            "--mons",
            "3",
            "--osds",
            "3",
            "--format",
            "json",
        ])
        .output()
        .expect("cluster up");
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&up.stdout).expect("json");
    assert_eq!(v["health"], "HEALTH_OK", "{v}");
    assert_eq!(v["num_osds"], 3);
    assert_eq!(
        pids(&dir).len(),
        3 + 3 + 2,
        "3 monitors, 3 OSDs, 2 NBD gateways"
    );
    let conf = dir.join("store.conf");
    let st = Command::new(&ctl)
        .args([
            "--conf",
            conf.to_str().expect("utf8"),
            "pool",
            "create",
            "vm-pool",
            "--size",
            "3",
            "--min_size",
            "2",
        ])
        .output()
        .expect("pool create");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // The gateways are listed and answer.
    let gw = Command::new(&ctl)
        .args([
            "--conf",
            conf.to_str().expect("utf8"),
            "gateway",
            "ls",
            "--format",
            "json",
        ])
        .output()
        .expect("gateway ls");
    let gw: serde_json::Value = serde_json::from_slice(&gw.stdout).expect("json");
    let gw = gw.as_array().expect("array");
    assert_eq!(gw.len(), 2, "{gw:?}");
    for g in gw {
        let addr = g["addr"].as_str().expect("addr");
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        assert_eq!(g["reachable"], true, "{g}");
    }
    // Running `up` again on a live cluster starts nothing new.
    let again = Command::new(&ctl)
        .args([
            "cluster",
            "up",
            "--dir",
            dir.to_str().expect("utf8"),
            "--format",
            "json",
        ])
        .output()
        .expect("cluster up again");
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(v["started"].as_array().map(Vec::len), Some(0), "{v}");
    let before = pids(&dir);
    let down = Command::new(&ctl)
        .args(["cluster", "down", "--dir", dir.to_str().expect("utf8")])
        .output()
        .expect("cluster down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        before.iter().all(|p| !alive(*p)),
        "daemons still running after down"
    );
    for log in std::fs::read_dir(dir.join("log")).expect("logs").flatten() {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        assert!(
            !text.contains(" ERROR "),
            "{}: {text}",
            log.path().display()
        );
    }
}
