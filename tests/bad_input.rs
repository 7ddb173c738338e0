//! Bad input: CLI misuse, garbage on the monitor port, unreachable monitors, corrupted or
//! foreign data dirs. Always a clear message and a non-zero exit; daemons keep serving.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use store_integration::{bin_dir, expect_closed, free_port, ClusterOpts, TestCluster};

fn storectl(args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("storectl"))
        .args(args)
        .env_remove("STORE_CONF")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run storectl")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_closed_output_pipe_ends_the_cli_quietly() {
    // Like `storectl crush test ... | head -1`: the reader goes away early.
    let mut child = std::process::Command::new(store_integration::bin_dir().join("storectl"))
        .args(["crush", "test", "--hosts", "10", "--osds-per-host", "4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("storectl");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cli_misuse_is_refused_clearly() {
    let o = storectl(&["frobnicate"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unrecognized subcommand"),
        "{}",
        stderr(&o)
    );
    let o = storectl(&["pool", "create", "p", "--size", "many"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid value"), "{}", stderr(&o));
    let o = storectl(&["pool", "create", "p", "--size", "3", "--min_size", "5"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("min_size 5 is larger than size 3"),
        "{}",
        stderr(&o)
    );
    let o = storectl(&["osd", "set", "nosuchflag"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("noout"), "{}", stderr(&o));
    let o = storectl(&["crush", "test", "--hosts", "0", "--osds-per-host", "4"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("INVALID_ARGUMENT"), "{}", stderr(&o));
    // No conf anywhere.
    let o = storectl(&["status"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no configuration found"),
        "{}",
        stderr(&o)
    );
    let o = storectl(&["--conf", "/nonexistent/store.conf", "status"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/store.conf"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unreachable_monitors_give_a_clear_error_quickly() {
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("store.conf");
    let port = free_port();
    std::fs::write(
        &conf,
        format!("[global]\nfsid = x\nmon_host = 127.0.0.1:{port}\n"),
    )
    .expect("conf");
    let t0 = std::time::Instant::now();
    let o = storectl(&["--conf", conf.to_str().expect("utf8"), "status"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("UNREACHABLE") && e.contains("cannot reach any monitor"),
        "{e}"
    );
    assert!(
        e.contains(&port.to_string()),
        "the error names the address: {e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    std::fs::write(&conf, "[global]\nfsid = x\nmon_host = not-an-address\n").expect("conf");
    let o = storectl(&["--conf", conf.to_str().expect("utf8"), "status"]);
    assert!(stderr(&o).contains("expected IP:PORT"), "{}", stderr(&o));
}

#[test]
fn garbage_on_the_monitor_port_closes_only_that_connection() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 1,
        ..Default::default()
    });
    let addr = c.mons[0].addr.clone();
    expect_closed(&addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // A well-formed header claiming a 4 GiB payload: refused before allocating.
    let mut huge = Vec::new();
    huge.extend_from_slice(b"STOR");
    huge.extend_from_slice(&1u16.to_le_bytes());
    huge.extend_from_slice(&1u16.to_le_bytes());
    huge.extend_from_slice(&1u64.to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(&0u32.to_le_bytes());
    expect_closed(&addr, &huge);
    // Wrong version, then a valid frame with a bad checksum, then random bytes.
    let mut v9 = huge.clone();
    v9[4] = 9;
    expect_closed(&addr, &v9);
    let mut bad_crc = huge.clone();
    bad_crc[16..20].copy_from_slice(&3u32.to_le_bytes());
    bad_crc.extend_from_slice(b"abc");
    expect_closed(&addr, &bad_crc);
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    expect_closed(&addr, &noise);
    // A half-sent frame then hang-up must not disturb anything either.
    drop(TcpStream::connect(&addr).and_then(|mut s| s.write_all(&huge[..10])));
    // The monitor still serves everyone else.
    let s = c.status();
    assert_eq!(s["health"]["status"], "HEALTH_OK", "{s}");
    c.ctl_ok(&["pool", "create", "p", "--size", "1", "--min_size", "1"]);
    // Malformed input is logged.
    c.wait_log("mon.a", "closing connection");
    c.check_logs();
}

#[test]
fn impossible_pools_are_refused_and_oversized_ones_warned() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 2,
        ..Default::default()
    });
    for (args, want) in [
        (
            vec!["--size", "0", "--min_size", "0"],
            "size 0 is out of range",
        ),
        (
            vec!["--size", "3", "--pg_num", "0"],
            "pg_num 0 is out of range",
        ),
        (
            vec!["--size", "11", "--min_size", "2"],
            "size 11 is out of range",
        ),
    ] {
        let mut a = vec!["pool", "create", "p"];
        a.extend(args);
        let o = c.ctl(&a);
        assert!(!o.status.success(), "{a:?} accepted");
        assert!(stderr(&o).contains(want), "{a:?}: {}", stderr(&o));
    }
    let o = c.ctl(&["pool", "create", "bad/name"]);
    assert!(stderr(&o).contains("invalid pool name"), "{}", stderr(&o));
    // Size 3 on two hosts: accepted, with a warning and a health check.
    let o = c.ctl(&["pool", "create", "big", "--size", "3", "--min_size", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("POOL_SIZE_EXCEEDS_DOMAINS"),
        "{}",
        stderr(&o)
    );
    let s = c.status();
    assert!(
        s["health"]["checks"]["POOL_SIZE_EXCEEDS_DOMAINS"].is_object(),
        "{s}"
    );
    let o = c.ctl(&["pool", "create", "big"]);
    assert!(stderr(&o).contains("ALREADY_EXISTS"), "{}", stderr(&o));
    let o = c.ctl(&["pool", "rm", "big"]);
    assert!(!o.status.success() && stderr(&o).contains("--yes-i-really-mean-it"));
    c.ctl_ok(&["pool", "rm", "big", "--yes-i-really-mean-it"]);
    let o = c.ctl(&["pool", "get", "big"]);
    assert!(stderr(&o).contains("NOT_FOUND"), "{}", stderr(&o));
    c.check_logs();
}

#[test]
fn corrupted_or_foreign_monitor_dirs_are_refused() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 0,
        ..Default::default()
    });
    c.kill("mon.a");
    let conf = std::fs::read_to_string(c.conf()).expect("conf");
    let run_mon = |conf_text: &str| {
        std::fs::write(c.conf(), conf_text).expect("conf");
        let o = Command::new(bin_dir().join("stored"))
            .args([
                "--conf",
                c.conf().to_str().expect("utf8"),
                "mon",
                "--id",
                "a",
            ])
            .output()
            .expect("run stored");
        (o.status.success(), stderr(&o))
    };
    // Another cluster's fsid: refused, data untouched.
    let foreign = conf.replacen("fsid = ", "fsid = 0000", 1);
    let (ok, e) = run_mon(&foreign);
    assert!(!ok && e.contains("belongs to cluster"), "{e}");
    // A data dir that is not a monitor store.
    let mon_dir = c.dir.path().join("mon.a");
    let other = c.dir.path().join("not-a-store");
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::write(other.join("precious.txt"), b"keep me").expect("file");
    let (ok, e) = run_mon(&format!(
        "{conf}\n[mon.a]\nmon_data = {}\n",
        other.display()
    ));
    assert!(!ok && e.contains("not a monitor store"), "{e}");
    assert_eq!(
        std::fs::read(other.join("precious.txt")).expect("kept"),
        b"keep me"
    );
    // A corrupted RocksDB: refused with the RocksDB error, never recreated.
    let current = std::fs::read_to_string(mon_dir.join("CURRENT")).expect("CURRENT");
    let manifest = mon_dir.join(current.trim());
    std::fs::write(&manifest, b"garbage garbage garbage").expect("corrupt");
    let (ok, e) = run_mon(&conf);
    assert!(!ok && e.contains("RocksDB"), "{e}");
    assert_eq!(
        std::fs::read(&manifest).expect("still there"),
        b"garbage garbage garbage"
    );
    c.allow_error("RocksDB");
    c.allow_error("belongs to cluster");
    c.allow_error("not a monitor store");
}

#[test]
fn osd_device_problems_are_refused() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 1,
        ..Default::default()
    });
    let conf = c.conf();
    let run_osd = |args: &[&str]| {
        let o = Command::new(bin_dir().join("stored"))
            .args(["--conf", conf.to_str().expect("utf8"), "osd"])
            .args(args)
            .output()
            .expect("run stored");
        (o.status.success(), stderr(&o))
    };
    let fresh = c.dir.path().join("fresh");
    let fresh_s = fresh.to_str().expect("utf8").to_string();
    // No device and no size to create one.
    let (ok, e) = run_osd(&["--data", &fresh_s]);
    assert!(!ok && e.contains("pass --size"), "{e}");
    // Another OSD's device (it has a superblock) with empty metadata: never overwritten.
    let taken = c.dir.path().join(TestCluster::osd_name(0)).join("block");
    let (ok, e) = run_osd(&[
        "--data",
        &fresh_s,
        "--device",
        taken.to_str().expect("utf8"),
    ]);
    assert!(!ok && e.contains("already holds a store"), "{e}");
    // Bad sizes and backends are refused at the command line.
    let (ok, e) = run_osd(&["--data", &fresh_s, "--size", "12Q"]);
    assert!(!ok && e.contains("size suffix"), "{e}");
    let (ok, e) = run_osd(&["--data", &fresh_s, "--size", "1G", "--io-backend", "magic"]);
    assert!(!ok && e.contains("unknown I/O backend"), "{e}");
    // The running OSD was not disturbed.
    assert_eq!(c.status()["osdmap"]["num_up_osds"], 1);
    c.check_logs();
}
