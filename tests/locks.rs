//! The image lock with real gateways and real NBD clients: live-migration hand-over,
//! coherence while the lock moves, fencing by the operator and of a hung gateway, a
//! gateway restart under QEMU's reconnecting NBD client, and an OSD killed under writes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use store_integration::{run_tool, tool_ok, wait_for, ClusterOpts, TestCluster};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/nbd_locks.py");

fn cluster() -> TestCluster {
    cluster_with("")
}

/// One monitor (with these `[mon]` settings), three OSDs, a pool and an image.
fn cluster_with(mon_conf: &'static str) -> TestCluster {
    let c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        mon_conf,
        ..Default::default()
    });
    c.create_pool("vm-pool", 16);
    c.ctl_ok(&["image", "create", "vm-pool/vm-100-disk-0", "--size", "64M"]);
    c
}

fn uri(addr: &str) -> String {
    format!("nbd://{addr}/vm-pool/vm-100-disk-0")
}

fn script(args: &[&str]) -> Value {
    let mut all = vec![SCRIPT];
    all.extend_from_slice(args);
    let out = tool_ok("/usr/bin/python3", &all);
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("script output {out}: {e}"))
}

/// An NBD client that wrote once through a gateway (so its session holds the lock) and
/// writes again when told.
struct FencedWriter {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl FencedWriter {
    fn start(uri: &str) -> Self {
        let mut child = Command::new("/usr/bin/python3")
            .args([SCRIPT, "fenced", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        assert_eq!(lines.next().expect("line").expect("read"), "wrote");
        FencedWriter { child, lines }
    }

    /// Writes again; "refused: ..." or "accepted".
    fn write_again(&mut self) -> String {
        writeln!(self.child.stdin.as_mut().expect("stdin")).expect("go");
        let verdict = self.lines.next().expect("line").expect("read");
        let _ = self.child.wait();
        verdict
    }
}

impl Drop for FencedWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `client ls` row of the session holding the image's lock.
fn lock_holder(c: &TestCluster) -> Option<Value> {
    c.ctl_json(&["client", "ls"])
        .as_array()?
        .iter()
        .find(|r| !r["lock"].is_null())
        .cloned()
}

#[test]
fn live_migration_hands_the_lock_over_and_keeps_every_record() {
    let mut c = cluster();
    let a = c.start_gateway("nbd-a");
    let b = c.start_gateway("nbd-b");
    let res = script(&["handover", &uri(&a), &uri(&b), "400"]);
    assert_eq!(res["records"], 401, "{res}");
    eprintln!("hand-over: {res}");
    // A -> B -> A (asked back): three grants; the clients left, so the gateways released it.
    let map = c.ctl_json(&["map"]);
    let lock = map["image_locks"]
        .as_object()
        .and_then(|l| l.values().next())
        .cloned()
        .expect("a lock entry");
    assert!(lock["generation"].as_u64().unwrap_or(0) >= 3, "{lock}");
    assert!(lock["holder"].is_null(), "released on disconnect: {lock}");
    assert!(lock_holder(&c).is_none());

    // The lock moves every round; every read through the other gateway is fresh.
    let res = script(&["pingpong", &uri(&a), &uri(&b), "24"]);
    assert_eq!(res["rounds"], 24, "{res}");
    eprintln!("ping-pong: {res}");
    let status = c.ctl_json(&["status"]);
    assert_eq!(status["clients"]["num_image_locks"], 0, "{status}");
    assert_eq!(status["health"]["status"], "HEALTH_OK", "{status}");
    c.check_logs();
}

#[test]
fn a_blocklisted_session_gets_errors_and_its_writes_never_land() {
    let mut c = cluster();
    let a = c.start_gateway("nbd-a");
    let b = c.start_gateway("nbd-b");
    let mut writer = FencedWriter::start(&uri(&a));

    let holder = wait_for(Duration::from_secs(10), "the lock in client ls", || {
        lock_holder(&c)
    });
    let id = holder["id"].as_str().expect("id").to_string();
    assert!(
        holder["addr"].as_str().unwrap_or("").contains(&a),
        "{holder}"
    );
    let out = c.ctl_ok(&["client", "blocklist", "add", &id]);
    assert!(out.contains("blocklisted"), "{out}");
    let listed = c.ctl_json(&["client", "blocklist", "ls"]);
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    let health = c.ctl_json(&["status"]);
    assert!(
        health["health"]["checks"]["IMAGE_LOCK_BLOCKLISTED"].is_object(),
        "{health}"
    );

    let verdict = writer.write_again();
    assert!(verdict.starts_with("refused"), "fenced write: {verdict}");
    // Reads elsewhere see the write before the fence, not the one after.
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xaa 0 4096", &uri(&b)],
    );
    // Another gateway takes the lock of the fenced session at once.
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xcc 0 4096", &uri(&b)],
    );
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xcc 0 4096", &uri(&a)],
    );
    let health = c.ctl_json(&["status"]);
    assert!(
        health["health"]["checks"]["IMAGE_LOCK_BLOCKLISTED"].is_null(),
        "{health}"
    );
    c.ctl_ok(&["client", "blocklist", "rm", &id]);
    let bad = c.ctl(&["client", "blocklist", "add", "client.xyz"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a session id"));
    c.check_logs();
}

#[test]
fn a_hung_gateway_is_fenced_when_another_takes_its_lock() {
    let mut c = cluster();
    let a = c.start_gateway("nbd-a");
    let b = c.start_gateway("nbd-b");
    let mut writer = FencedWriter::start(&uri(&a));
    // The gateway hangs (a frozen host): no heartbeats, no answers.
    let pid = c.pid("nbd-a").expect("pid") as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t0 = Instant::now();
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xdd 0 4096", &uri(&b)],
    );
    let takeover = t0.elapsed();
    eprintln!("takeover from a hung holder: {takeover:?} (session grace 3 s)");
    let health = c.ctl_json(&["health", "detail"]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // It wakes up and writes: refused, and the data stays B's.
    let verdict = writer.write_again();
    assert!(
        verdict.starts_with("refused"),
        "hung holder's write: {verdict}"
    );
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xdd 0 4096", &uri(&b)],
    );
    let listed = c.ctl_json(&["client", "blocklist", "ls"]);
    assert_eq!(
        listed.as_array().map(|a| a.len()),
        Some(1),
        "{listed} {health}"
    );
    c.check_logs();
}

#[test]
fn a_hung_gateway_stays_fenced_after_its_blocklist_entry_expired() {
    let mut c = cluster_with("mon_blocklist_default_expire = 1");
    let a = c.start_gateway("nbd-a");
    let b = c.start_gateway("nbd-b");
    let mut writer = FencedWriter::start(&uri(&a));
    // An entry that never expires, and one of a session that holds no lock.
    c.ctl_ok(&["client", "blocklist", "add", "client.77", "--expire-s", "0"]);
    c.ctl_ok(&["client", "blocklist", "add", "client.78"]);
    let pid = c.pid("nbd-a").expect("pid") as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xdd 0 4096", &uri(&b)],
    );
    // A's entry (it lost its lock) and client.78's expire; client.77's stays.
    let t0 = Instant::now();
    let left = wait_for(
        Duration::from_secs(15),
        "blocklist entries to expire",
        || {
            let listed = c.ctl_json(&["client", "blocklist", "ls"]);
            let ids: Vec<String> = listed
                .as_array()?
                .iter()
                .filter_map(|e| e["id"].as_str().map(String::from))
                .collect();
            (ids.len() == 1).then_some(ids)
        },
    );
    eprintln!("blocklist entries expired after {:?}", t0.elapsed());
    assert_eq!(left, vec!["client.0000000000000077".to_string()]);
    // Woken after its entry is gone, the old holder still may not write: it was fenced.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let verdict = writer.write_again();
    if !verdict.starts_with("refused") {
        for n in ["nbd-a", "mon.a"] {
            eprintln!(
                "==== {n}\n{}",
                std::fs::read_to_string(c.log_path(n)).unwrap_or_default()
            );
        }
    }
    assert!(
        verdict.starts_with("refused"),
        "write of a holder fenced before its entry expired: {verdict}"
    );
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xdd 0 4096", &uri(&b)],
    );
    c.check_logs();
}

#[test]
fn a_gateway_restart_is_not_a_guest_io_error() {
    let mut c = cluster();
    let a = c.start_gateway("nbd-a");
    let (host, port) = a.split_once(':').expect("addr");
    let opts = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export=vm-pool/vm-100-disk-0,reconnect-delay=30"
    );
    let guest = Command::new("qemu-io")
        .args([
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "sleep 3000",
            "-c",
            "write -P 0x22 1M 1M",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x22 1M 1M",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_millis(1000));
    c.kill("nbd-a");
    std::thread::sleep(Duration::from_millis(500));
    c.start_gateway_at("nbd-a", &a);
    let out = guest.wait_with_output().expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("error"),
        "{text}"
    );
    assert_eq!(text.matches("wrote 1048576/1048576").count(), 2, "{text}");
    // The restarted gateway took the lock from its dead self at once (no grace wait).
    let listed = c.ctl_json(&["client", "blocklist", "ls"]);
    assert!(
        listed[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("restarted"),
        "{listed}"
    );
    c.check_logs();
}

#[test]
fn an_osd_killed_under_guest_writes_is_not_an_error() {
    let mut c = cluster();
    let a = c.start_gateway("nbd-a");
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..24u64 {
        args.push("-c".into());
        args.push(format!("write -P {} {}M 1M", i + 1, i * 2));
        args.push("-c".into());
        args.push("sleep 250".into());
    }
    args.push(uri(&a));
    let guest = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_millis(1500));
    c.kill(&TestCluster::osd_name(1));
    let out = guest.wait_with_output().expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("wrote 1048576/1048576").count(), 24, "{text}");
    let mut reads: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..24u64 {
        reads.push("-c".into());
        reads.push(format!("read -P {} {}M 1M", i + 1, i * 2));
    }
    reads.push(uri(&a));
    let refs: Vec<&str> = reads.iter().map(String::as_str).collect();
    let (success, out) = run_tool("qemu-io", &refs);
    assert!(
        success && !out.contains("Pattern verification failed"),
        "{out}"
    );
    c.check_logs();
}
