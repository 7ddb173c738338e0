//! `storectl cluster up/down`: a local cluster of real `stored` processes on 127.0.0.1.
//!
//! Layout of DIR: `store.conf`, `mon.NAME/` (monitor stores), `osd-devN/` (OSD data),
//! `log/` (one log per daemon), `run/` (one pid file per daemon). `up` on a DIR that already
//! has a cluster restarts its stopped daemons with their data; `down` stops them by pid.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use store_client::{MonClient, MonClientOptions};
use store_types::config::{default_mon_name, Config};

use crate::output::print_json;
use crate::Format;

#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// Start (or restart) a local cluster and wait for HEALTH_OK.
    Up {
        /// Directory for the conf file, data, logs and pids.
        #[arg(long, default_value = "./store-cluster")]
        dir: PathBuf,
        /// Number of monitors (1, 3 or 5 recommended).
        #[arg(long, default_value_t = 3)]
        mons: u32,
        /// Number of OSDs; each gets its own simulated host (node1, node2, ...).
        #[arg(long, default_value_t = 3)]
        osds: u32,
        /// Number of NBD gateways (two, so live migration can be tried on one machine).
        #[arg(long, default_value_t = 2)]
        gateways: u32,
        /// Size of each OSD's file-backed device (allocated up front), e.g. 1G, 8G.
        #[arg(long = "osd-size", default_value = "1G")]
        osd_size: String,
        /// Write zeros over each new OSD device file instead of only reserving its space
        /// (slower to create; first writes then cost what they cost on a block device).
        #[arg(long = "osd-zero-fill")]
        osd_zero_fill: bool,
        /// Give up waiting for HEALTH_OK after this many seconds.
        #[arg(long = "timeout-secs", default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Stop every daemon of a local cluster.
    Down {
        #[arg(long, default_value = "./store-cluster")]
        dir: PathBuf,
    },
}

pub async fn run(format: Format, cmd: &ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Up {
            dir,
            mons,
            osds,
            gateways,
            osd_size,
            osd_zero_fill,
            timeout_secs,
        } => {
            let shape = Shape {
                mons: *mons,
                osds: *osds,
                gateways: *gateways,
                osd_size: osd_size.clone(),
                osd_zero_fill: *osd_zero_fill,
            };
            up(format, dir, shape, Duration::from_secs(*timeout_secs)).await
        }
        ClusterCmd::Down { dir } => down(format, dir),
    }
}

/// The `stored` binary next to this `storectl`, else on PATH.
fn stored_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("stored")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("stored"))
}

/// `n` distinct free ports on 127.0.0.1. Every listener stays open until all are chosen:
/// a port released at once may be handed out again by the next bind (seen: a gateway given
/// its monitor's port).
fn free_ports(n: u32) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn write_conf(dir: &Path, mons: u32, gateways: u32) -> anyhow::Result<()> {
    let names: Vec<String> = (0..mons as usize).map(default_mon_name).collect();
    let mut ports = free_ports(mons + gateways)?.into_iter();
    let addrs: Vec<String> = ports
        .by_ref()
        .take(mons as usize)
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let nbd: Vec<String> = ports.map(|p| format!("127.0.0.1:{p}")).collect();
    let conf = format!(
        "# Local cluster written by `storectl cluster up`.\n\
         [global]\n\
         fsid = {}\n\
         mon_initial_members = {}\n\
         mon_host = {}\n\
         \n\
         [mon]\n\
         mon_data = $cluster_dir/mon.$id\n\
         osd_heartbeat_grace = 20\n\
         mon_osd_down_out_interval = 600\n\
         \n\
         [osd]\n\
         osd_heartbeat_interval = 2\n\
         \n\
         [nbd]\n\
         {GATEWAYS_KEY} = {}\n",
        uuid::Uuid::new_v4(),
        names.join(", "),
        addrs.join(", "),
        nbd.join(", ")
    );
    std::fs::write(dir.join("store.conf"), conf).context("writing store.conf")?;
    Ok(())
}

/// How many daemons of each kind a new local cluster gets.
#[derive(Clone)]
struct Shape {
    mons: u32,
    osds: u32,
    gateways: u32,
    /// Device size for new OSDs (`stored osd --size`).
    osd_size: String,
    /// `stored osd --zero-fill` for new devices.
    osd_zero_fill: bool,
}

/// The conf key listing the NBD gateways (`storectl gateway ls` reads it).
pub const GATEWAYS_KEY: &str = "nbd_gateways";

/// The gateways store.conf lists (section [nbd], key nbd_gateways).
pub fn gateway_addrs(conf: &Config) -> Vec<String> {
    conf.get("nbd", GATEWAYS_KEY)
        .map(|v| {
            v.split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// A daemon of the local cluster: its name (for pid and log files) and arguments.
struct Daemon {
    name: String,
    args: Vec<String>,
}

fn daemons(conf: &Config, dir: &Path, shape: &Shape) -> anyhow::Result<Vec<Daemon>> {
    let (osds, osd_size) = (shape.osds, shape.osd_size.as_str());
    let gateways: Vec<Daemon> = gateway_addrs(conf)
        .into_iter()
        .enumerate()
        .map(|(i, addr)| Daemon {
            name: format!("nbd.{i}"),
            args: vec![
                "--conf".into(),
                dir.join("store.conf").display().to_string(),
                "nbd".into(),
                "--listen".into(),
                addr,
            ],
        })
        .collect();
    let gateway_count = gateways.len();
    let conf_path = dir.join("store.conf").display().to_string();
    let mut out: Vec<Daemon> = conf
        .mons()?
        .into_iter()
        .map(|m| Daemon {
            name: format!("mon.{}", m.name),
            args: vec![
                "--conf".into(),
                conf_path.clone(),
                "mon".into(),
                "--id".into(),
                m.name,
            ],
        })
        .collect();
    // Keep the OSD count of an existing cluster.
    let existing = (0..)
        .take_while(|i| dir.join(format!("osd-dev{i}")).exists())
        .count() as u32;
    for i in 0..osds.max(existing) {
        out.push(Daemon {
            name: format!("osd-dev{i}"),
            args: vec![
                "--conf".into(),
                conf_path.clone(),
                "osd".into(),
                "--data".into(),
                dir.join(format!("osd-dev{i}")).display().to_string(),
                "--host".into(),
                format!("node{}", i + 1),
                "--size".into(),
                osd_size.to_string(),
            ]
            .into_iter()
            .chain(shape.osd_zero_fill.then(|| "--zero-fill".to_string()))
            .collect(),
        });
    }
    out.extend(gateways);
    if let Some(n) = worker_threads(osds.max(existing) as usize + gateway_count) {
        for d in &mut out {
            d.args
                .splice(0..0, ["--worker-threads".to_string(), n.to_string()]);
        }
    }
    Ok(out)
}

/// Runtime threads per daemon of a local cluster: its data-path daemons share this host's
/// CPUs, and more runnable threads than CPUs only adds wake-ups between them (on 2 cores
/// with 3 OSDs and a gateway, one thread each gave 27% more 4 KiB reads at QD32 and
/// ~40 µs less per QD1 read than one per CPU). None when $STORE_WORKER_THREADS decides.
fn worker_threads(data_daemons: usize) -> Option<usize> {
    if std::env::var_os("STORE_WORKER_THREADS").is_some() {
        return None;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cpus / data_daemons.max(1)).max(1))
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("stored"))
        .unwrap_or(false)
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| has_exited(&s))
}

/// Whether a `/proc/.../stat` line is of a task that has exited (zombie or dead). The
/// state follows the last ')': the command name in parentheses may hold any byte.
fn has_exited(stat: &str) -> bool {
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    state.starts_with('Z') || state.starts_with('X')
}

/// Whether any thread of `pid` has not finished exiting. A daemon killed by a signal
/// loses its command line (what [`pid_alive`] checks) while its threads still tear down
/// (io_uring rings, RocksDB's threads): until the last one is gone its files, RocksDB's
/// lock among them, stay open. A zombie that nobody has reaped yet is gone for this
/// purpose. Only for pids this command just signalled.
fn threads_running(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| !has_exited(&stat))
    })
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn start(dir: &Path, d: &Daemon) -> anyhow::Result<Option<u32>> {
    let pid_file = dir.join("run").join(format!("{}.pid", d.name));
    if read_pid(&pid_file).is_some_and(pid_alive) {
        return Ok(None);
    }
    let log_path = dir.join("log").join(format!("{}.log", d.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(stored_bin())
        .args(&d.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} ({})", d.name, stored_bin().display()))?;
    std::fs::write(&pid_file, child.id().to_string())?;
    Ok(Some(child.id()))
}

async fn up(format: Format, dir: &Path, shape: Shape, timeout: Duration) -> anyhow::Result<()> {
    let Shape {
        mons,
        osds,
        gateways,
        ..
    } = shape;
    if mons == 0 || mons > 7 {
        bail!("--mons {mons}: use 1 to 7 monitors (1, 3 or 5 recommended)");
    }
    if osds > 64 {
        bail!("--osds {osds}: at most 64 OSDs in a local cluster");
    }
    std::fs::create_dir_all(dir.join("log"))?;
    std::fs::create_dir_all(dir.join("run"))?;
    let dir = dir.canonicalize()?;
    let conf_path = dir.join("store.conf");
    let fresh = !conf_path.exists();
    if fresh {
        write_conf(&dir, mons, gateways)?;
    }
    let conf = Config::load(Some(&conf_path))?;
    let list = daemons(&conf, &dir, &shape)?;
    let mut started = Vec::new();
    let spawned_at = Instant::now();
    for d in &list {
        if let Some(pid) = start(&dir, d)? {
            started.push((d.name.clone(), pid));
        }
    }
    let addrs = conf.mons()?.into_iter().map(|m| m.addr).collect();
    let client = MonClient::new(addrs, MonClientOptions::default());
    let bar = (format == Format::Plain).then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let t0 = Instant::now();
    let want_osds = list.iter().filter(|d| d.name.starts_with("osd")).count();
    let status = loop {
        let msg = match client.status().await {
            // Flags an operator set (e.g. noout) are not a reason to keep waiting.
            Ok(s)
                if s.num_up_osds >= want_osds
                    && !s.quorum_names.is_empty()
                    && s.checks.keys().all(|c| c == "OSDMAP_FLAGS") =>
            {
                break s
            }
            Ok(s) => {
                let codes: Vec<&str> = s.checks.keys().map(String::as_str).collect();
                format!(
                    "{}: {} of {} OSDs up, quorum [{}] {}",
                    s.health.as_str(),
                    s.num_up_osds,
                    want_osds,
                    s.quorum_names.join(","),
                    codes.join(" ")
                )
            }
            Err(e) => format!("waiting for monitors: {}", e.message),
        };
        if let Some(b) = &bar {
            b.set_message(msg.clone());
        }
        if t0.elapsed() > timeout {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            bail!(
                "cluster in {} did not reach HEALTH_OK within {} s: {msg}; see logs in {}/log",
                dir.display(),
                timeout.as_secs(),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // A daemon that exited at once (a gateway that could not listen, say) is not part of a
    // healthy cluster, even if the monitors never needed it. Give it time to fail first:
    // when only a gateway was (re)started, the monitors answer at once.
    const SETTLE: Duration = Duration::from_millis(500);
    tokio::time::sleep(SETTLE.saturating_sub(spawned_at.elapsed())).await;
    let dead: Vec<&str> = started
        .iter()
        .filter(|(_, pid)| !pid_alive(*pid as i32))
        .map(|(name, _)| name.as_str())
        .collect();
    if !dead.is_empty() {
        bail!(
            "{} exited after starting; see {}/log/{}.log",
            dead.join(", "),
            dir.display(),
            dead[0]
        );
    }
    let conf_str = conf_path.display().to_string();
    match format {
        Format::Json => print_json(&json!({
            "dir": dir, "conf": conf_str, "fsid": status.fsid, "health": status.health.as_str(),
            "mons": status.mons.iter().map(|m| json!({"name": m.name, "addr": m.addr})).collect::<Vec<_>>(),
            "num_osds": status.num_osds,
            "started": started.iter().map(|(n, p)| json!({"name": n, "pid": p})).collect::<Vec<_>>(),
            "seconds": t0.elapsed().as_secs_f64(),
        })),
        Format::Plain => {
            println!(
                "cluster {} is {} after {:.1} s: {} monitors ({}), {} OSDs",
                status.fsid,
                status.health.as_str(),
                t0.elapsed().as_secs_f64(),
                status.mons.len(),
                status.quorum_names.join(","),
                status.num_up_osds
            );
            println!(
                "started {} daemons; logs in {}/log",
                started.len(),
                dir.display()
            );
            println!();
            println!("next:");
            if let Some(bin) = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                println!("  export PATH={}:$PATH", bin.display());
            }
            println!("  export STORE_CONF={conf_str}");
            println!("  storectl pool create vm-pool --size 3 --min_size 2");
            println!("  storectl status");
            println!("  storectl osd tree");
            println!("  storectl cluster down --dir {}", dir.display());
        }
    }
    Ok(())
}

fn down(format: Format, dir: &Path) -> anyhow::Result<()> {
    let run = dir.join("run");
    if !run.exists() {
        bail!(
            "{} has no run/ directory: not a local cluster dir",
            dir.display()
        );
    }
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(&run)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "pid") {
            if let Some(pid) = read_pid(&path).filter(|p| pid_alive(*p)) {
                // SAFETY: plain kill(2) on a pid we verified runs `stored`.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                pids.push((path.clone(), pid));
            } else {
                std::fs::remove_file(&path).ok();
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    // Done when every thread has exited, not when the main one has: see threads_running.
    while Instant::now() < deadline && pids.iter().any(|(_, p)| threads_running(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut killed = 0;
    for (path, pid) in &pids {
        if threads_running(*pid) {
            // SAFETY: as above; it did not stop on SIGTERM.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
            killed += 1;
        }
        std::fs::remove_file(path).ok();
    }
    match format {
        Format::Json => print_json(&json!({ "stopped": pids.len(), "killed": killed })),
        Format::Plain => println!(
            "stopped {} daemons{}",
            pids.len(),
            if killed > 0 {
                format!(" ({killed} needed SIGKILL)")
            } else {
                String::new()
            }
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_is_read_after_the_last_parenthesis() {
        assert!(has_exited("42 (stored) Z 1 42"));
        assert!(has_exited("42 (stored) X 1 42"));
        assert!(!has_exited("42 (stored) S 1 42"));
        // A command name may itself hold ") Z".
        assert!(!has_exited("42 (odd) Z name) R 1 42"));
        assert!(has_exited("42 (odd) S name) Z 1 42"));
    }

    #[test]
    fn an_unreaped_zombie_has_no_threads_running_and_a_live_process_has() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        assert!(threads_running(pid), "a sleeping process counts as running");
        child.kill().expect("kill sleep");
        // Not reaped yet: it stays a zombie, which must not count as running.
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads_running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let stopped = !threads_running(pid);
        child.wait().expect("reap sleep");
        assert!(
            stopped,
            "a killed, unreaped process still counts as running: {zombie}"
        );
        assert!(!threads_running(pid), "a reaped process has no threads");
    }
}
