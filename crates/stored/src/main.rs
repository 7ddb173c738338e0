//! `stored`: the one daemon binary. `stored mon` runs a monitor, `stored osd` an OSD.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use store_objstore::device::Backend;
use store_types::config::Config;
use store_types::map::weight_from_f64;

/// mimalloc for the daemons' own allocations: the hot paths allocate small buffers across
/// threads (a frame read on one worker, freed on another), where glibc's arenas spent
/// ~11% of an OSD's CPU in 4 KiB writes (`_int_malloc`, `malloc_consolidate`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "stored",
    version,
    about = "Daemons of the distributed block store"
)]
struct Cli {
    /// Path to store.conf (else $STORE_CONF, ./store.conf, /etc/store/store.conf).
    #[arg(long, global = true)]
    conf: Option<PathBuf>,
    /// Runtime worker threads (default: one per CPU, or $STORE_WORKER_THREADS). Several
    /// daemons on a small host contend less with fewer each (`storectl cluster up` gives
    /// each daemon its share of the CPUs, at least one).
    #[arg(long, global = true)]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a monitor.
    Mon {
        /// Monitor name, as in mon_initial_members (e.g. `a`).
        #[arg(long)]
        id: String,
        /// Address to listen on, for a monitor not listed in mon_host (added later).
        #[arg(long)]
        addr: Option<String>,
    },
    /// Run an NBD gateway serving every image as `pool/image`.
    Nbd {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
    },
    /// Run an OSD.
    Osd {
        /// The OSD's data directory (created and initialised when missing or empty);
        /// default: `osd_data` from the [osd] section of store.conf.
        #[arg(long)]
        data: Option<PathBuf>,
        /// CRUSH host bucket (default: this machine's hostname).
        #[arg(long)]
        host: Option<String>,
        /// Address to serve on (default 127.0.0.1:0, a free port; use the node's address on a
        /// real cluster).
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: String,
        /// The data device: a block device, or a file (default DATA/block).
        #[arg(long)]
        device: Option<PathBuf>,
        /// Create a file-backed device of this size (e.g. 10G, 512M) if it does not exist.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// With --size: write zeros over the new file instead of only reserving its space,
        /// so first writes need no filesystem metadata update, as on a block device (slower
        /// to create; what benchmarks use).
        #[arg(long = "zero-fill", requires = "size")]
        zero_fill: bool,
        /// I/O backend: uring (default) or file (pread/pwrite).
        #[arg(long = "io-backend")]
        io_backend: Option<Backend>,
        /// CRUSH weight (default: the device's capacity in TiB).
        #[arg(long)]
        weight: Option<f64>,
    },
}

/// Seconds from the conf file as milliseconds, refusing nonsense.
fn secs_ms(v: f64) -> anyhow::Result<u64> {
    if !(v.is_finite() && v > 0.0 && v < 1e7) {
        bail!("{v} is not a valid number of seconds");
    }
    Ok((v * 1000.0) as u64)
}

/// Parses a size like `10G`, `512M`, `4096` (binary units: K = 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in '{s}': use K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 10G, 512M)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// `osd_recovery_max_active` (recoveries at once per OSD, 1-64, default 3),
/// `osd_max_backfills` (PGs backfilling at once per primary OSD, 1-64, default 1) and
/// `osd_recovery_sleep` (seconds between recovered objects, default 0).
fn recovery_limits(conf: &Config) -> anyhow::Result<store_osd::service::RecoveryLimits> {
    let max_active: usize = conf.get_parsed("osd", "osd_recovery_max_active", 3)?;
    if !(1..=64).contains(&max_active) {
        bail!("osd_recovery_max_active = {max_active}: must be 1 to 64");
    }
    let max_backfills: usize = conf.get_parsed("osd", "osd_max_backfills", 1)?;
    if !(1..=64).contains(&max_backfills) {
        bail!("osd_max_backfills = {max_backfills}: must be 1 to 64");
    }
    let sleep_s: f64 = conf.get_parsed("osd", "osd_recovery_sleep", 0.0)?;
    if !(sleep_s.is_finite() && (0.0..=10.0).contains(&sleep_s)) {
        bail!("osd_recovery_sleep = {sleep_s}: must be 0 to 10 seconds");
    }
    Ok(store_osd::service::RecoveryLimits {
        max_active,
        max_backfills,
        sleep: Duration::from_secs_f64(sleep_s),
    })
}

/// The log filter when `STORE_LOG` is not set: our info, and the libraries' warnings and
/// errors (openraft's among them: hiding them would hide consensus failures).
pub const DEFAULT_LOG_FILTER: &str = "info,openraft=warn";

/// `osd_op_complaint_time` (seconds, default 30, as Ceph): operations an OSD or gateway has
/// had in hand longer than this are reported as SLOW_OPS.
fn op_complaint(conf: &Config) -> anyhow::Result<Duration> {
    let s: f64 = conf.get_parsed("osd", "osd_op_complaint_time", 30.0)?;
    if !(s.is_finite() && (0.1..=3600.0).contains(&s)) {
        bail!("osd_op_complaint_time = {s}: must be 0.1 to 3600 seconds");
    }
    Ok(Duration::from_secs_f64(s))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// A panic anywhere (any thread, any task) ends the daemon at once, after logging it as
/// an ERROR with a backtrace. Without this, tokio catches a task's panic and the daemon
/// limps on: a PG engine whose mutex is poisoned fails every later op while the OSD keeps
/// heartbeating as up. A daemon that hits a bug must die loudly and be restarted (by
/// systemd, as Ceph's daemons are), so its peers see it down and take over.
fn die_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!("panic, aborting the daemon: {info}\n{backtrace}");
        eprintln!("stored: panic, aborting: {info}");
        std::process::abort();
    }));
}

/// Test-only fault injection: `STORE_FAILPOINT=panic_after_start` makes any daemon panic in
/// a task shortly after it starts. Nothing is armed unless the variable is set.
fn failpoints() {
    if std::env::var("STORE_FAILPOINT").as_deref() == Ok("panic_after_start") {
        // Proves the panic hook: a panic in a spawned task must end the process.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            panic!("failpoint panic_after_start");
        });
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    failpoints();
    let conf = Config::load(cli.conf.as_deref())?;
    match cli.cmd {
        Cmd::Mon { id, addr } => {
            let settings = store_mon::MonitorSettings::from_conf(&conf, &id, addr)?;
            store_mon::run(settings).await?;
        }
        Cmd::Nbd { listen } => {
            // Bind first: the port is the gateway's identity, and clients that connect while
            // it reaches the cluster wait in the backlog.
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let mons = conf.mons()?.into_iter().map(|m| m.addr).collect();
            let mons = store_client::MonClient::new(mons, Default::default());
            let client = store_client::ObjectClient::connect(mons, Duration::from_secs(60)).await?;
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let ctx = store_image::ImageContext::with_complaint(
                client,
                format!("gateway {listen} on {}", host.trim()),
                Duration::from_secs(60),
                op_complaint(&conf)?,
            );
            tracing::info!(addr = %listener.local_addr()?, "nbd gateway listening");
            let gateway = store_gateway::Gateway::new(ctx);
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = gateway.clone().serve(listener) => {}
                _ = term.recv() => {
                    // Hand the locks back so other gateways need not wait out the grace.
                    tracing::info!("terminating: releasing image locks");
                    gateway.close_all().await;
                }
            }
        }
        Cmd::Osd {
            data,
            device,
            size,
            zero_fill,
            io_backend,
            host,
            addr,
            weight,
        } => {
            if let Some(w) = weight.filter(|w| !(w.is_finite() && *w > 0.0)) {
                bail!("--weight {w}: must be a positive number");
            }
            let data = match data {
                Some(d) => d,
                None => PathBuf::from(conf.get("osd", "osd_data").context(
                    "no OSD data dir: pass --data DIR or set osd_data in the [osd] section of store.conf",
                )?),
            };
            let mons = conf.mons()?;
            let interval_s: f64 = conf.get_parsed("osd", "osd_heartbeat_interval", 2.0)?;
            if !(interval_s.is_finite() && interval_s > 0.0 && interval_s < 3600.0) {
                bail!("osd_heartbeat_interval = {interval_s}: must be between 0 and 3600 seconds");
            }
            let backend = match io_backend {
                Some(b) => b,
                None => conf.get_parsed("osd", "osd_io_backend", Backend::Uring)?,
            };
            let settings = store_osd::OsdSettings {
                fsid: conf.fsid()?,
                device: device.unwrap_or_else(|| data.join("block")),
                data_dir: data,
                device_size_bytes: size,
                device_fill: if zero_fill {
                    store_objstore::device::FileFill::Zeros
                } else {
                    store_objstore::device::FileFill::Reserve
                },
                backend,
                host: host.unwrap_or_else(hostname),
                addr,
                weight: weight.map(weight_from_f64),
                mon_addrs: mons.into_iter().map(|m| m.addr).collect(),
                heartbeat_interval: Duration::from_secs_f64(interval_s),
                pg_limits: store_osd::pg::PgLimits {
                    op_timeout_ms: secs_ms(conf.get_parsed("osd", "osd_op_timeout", 30.0)?)?,
                    ..Default::default()
                },
                recovery: recovery_limits(&conf)?,
                op_complaint: op_complaint(&conf)?,
            };
            store_osd::run(settings).await.context("osd")?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    die_on_panic();
    let threads = cli.worker_threads.or_else(|| {
        std::env::var("STORE_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        if !(1..=256).contains(&n) {
            eprintln!("stored: --worker-threads {n}: use 1 to 256");
            return ExitCode::FAILURE;
        }
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stored: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("stored: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The consensus library's warnings and errors reach the daemon's log by default (they
    /// were filtered out with `openraft=off`, so neither operators nor the tests' check for
    /// ERROR lines could see a consensus failure); its chatter below WARN does not.
    #[test]
    fn the_default_filter_keeps_openraft_errors_and_warnings() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "openraft::replication", "raft error seen");
            tracing::warn!(target: "openraft::core", "raft warning seen");
            tracing::info!(target: "openraft::core", "raft chatter");
            tracing::info!(target: "store_mon::server", "our info");
        });
        let text = String::from_utf8(out.0.lock().expect("capture").clone()).expect("utf-8");
        assert!(text.contains("raft error seen"), "{text}");
        assert!(text.contains("raft warning seen"), "{text}");
        assert!(!text.contains("raft chatter"), "{text}");
        assert!(text.contains("our info"), "{text}");
    }
}
