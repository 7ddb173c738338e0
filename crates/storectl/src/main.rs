//! `storectl`: the admin CLI. Every command takes `--format json`.

mod client;
mod cluster;
mod crush;
mod image;
mod obj;
mod osdops;
mod output;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use store_client::{MonClient, MonClientOptions};
use store_types::config::Config;
use store_types::map::{FailureDomain, Flag};
use store_types::msg::{CommandOutcome, MapCommand, MonMembership, MonRequest, MonResponse};
use store_types::StoreError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Plain,
    Json,
}

#[derive(Parser)]
#[command(
    name = "storectl",
    version,
    about = "Administer the distributed block store"
)]
pub struct Cli {
    /// Path to store.conf (else $STORE_CONF, ./store.conf, /etc/store/store.conf).
    #[arg(long, global = true)]
    conf: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "plain")]
    format: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster status: health, monitors, OSDs, pools, PGs, usage.
    Status {
        /// Keep watching: print events (health checks, OSDs, PG states) as they happen.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Health summary, or every check's detail.
    Health {
        #[arg(value_parser = ["detail"])]
        detail: Option<String>,
    },
    /// Pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// OSDs.
    #[command(subcommand)]
    Osd(OsdCmd),
    /// Monitors.
    #[command(subcommand)]
    Mon(MonCmd),
    /// CRUSH placement tools.
    #[command(subcommand)]
    Crush(CrushCmd),
    /// A local cluster of real processes on 127.0.0.1.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Print the current cluster map.
    Map,
    /// Objects in a pool (like `rados`).
    #[command(subcommand)]
    Obj(obj::ObjCmd),
    /// Measure object I/O (like `rados bench`).
    Bench(obj::BenchArgs),
    /// NBD gateways.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Images: block devices striped over a pool's objects (like `rbd`).
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Client sessions, image locks and the blocklist.
    #[command(subcommand)]
    Client(client::ClientCmd),
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create a replicated pool.
    Create {
        name: String,
        /// Number of replicas.
        #[arg(long, default_value_t = 3)]
        size: u32,
        /// Fewest replicas that must be up for I/O.
        #[arg(long = "min_size", alias = "min-size", default_value_t = 2)]
        min_size: u32,
        /// Placement groups.
        #[arg(long = "pg_num", alias = "pg-num", default_value_t = 128)]
        pg_num: u32,
        /// host or osd (default: host; osd when the cluster has a single host).
        #[arg(long = "failure-domain", alias = "failure_domain")]
        failure_domain: Option<FailureDomain>,
    },
    /// List pools.
    Ls,
    /// Show a pool's settings (all, or one key).
    Get { name: String, key: Option<String> },
    /// Change a pool setting: size, min_size, pg_num, failure_domain.
    Set {
        name: String,
        key: String,
        value: String,
    },
    /// Remove a pool and everything in it.
    Rm {
        name: String,
        #[arg(long = "yes-i-really-mean-it")]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum OsdCmd {
    /// The CRUSH hierarchy with OSD states.
    Tree,
    /// Each OSD's usage, objects, PGs and what it recovered since it started.
    Df,
    /// Mark OSDs out: data moves off them.
    Out {
        ids: Vec<u32>,
        /// Only say how many PGs and bytes would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// Mark OSDs in.
    In {
        ids: Vec<u32>,
        /// Only say how many PGs and bytes would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// Set an OSD's CRUSH weight (1.0 = one TiB by convention; 0 drains it).
    Reweight {
        id: u32,
        weight: f64,
        /// Only say how many PGs and bytes would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// Whether stopping these OSDs keeps every PG at or above min_size.
    OkToStop { ids: Vec<u32> },
    /// Whether these OSDs hold no data that exists nowhere else.
    SafeToDestroy { ids: Vec<u32> },
    /// Remove an OSD for good (it must be out, down and safe to destroy).
    Purge {
        id: u32,
        #[arg(long = "yes-i-really-mean-it")]
        yes: bool,
    },
    /// Declare a down OSD gone for good with its data, so PGs that wait for it (`down`)
    /// go active from the copies left. What only it held is lost.
    Lost {
        id: u32,
        #[arg(long = "yes-i-really-mean-it")]
        yes: bool,
    },
    /// What adding OSDs on a host would move (OSDs join by starting
    /// `stored osd --data DIR --host HOST`); needs --dry-run.
    Add {
        /// The CRUSH host of the new OSDs (new or existing).
        #[arg(long)]
        host: String,
        /// How many OSDs.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// CRUSH weight of each (1.0 = one TiB by convention).
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
        #[arg(long)]
        dry_run: bool,
    },
    /// Set a cluster flag (noout, norebalance, nodown, noup, norecover, nobackfill).
    Set { flag: Flag },
    /// Unset a cluster flag.
    Unset { flag: Flag },
}

#[derive(Subcommand)]
enum MonCmd {
    /// List monitors with quorum state.
    Ls,
    /// Add a monitor (start `stored mon --id NAME --addr ADDR` first, or right after).
    Add { name: String, addr: String },
    /// Remove a monitor.
    Rm { name: String },
}

#[derive(Subcommand)]
enum GatewayCmd {
    /// The NBD gateways store.conf lists ([nbd] nbd_gateways), and whether they answer.
    Ls,
}

#[derive(Subcommand)]
enum CrushCmd {
    /// Simulate a hierarchy and report utilisation and data movement (like crushtool --test).
    Test(crush::CrushTestArgs),
}

fn connect(cli: &Cli) -> anyhow::Result<Arc<MonClient>> {
    let conf = Config::load(cli.conf.as_deref())?;
    let addrs = conf.mons()?.into_iter().map(|m| m.addr).collect();
    Ok(MonClient::new(addrs, MonClientOptions::default()))
}

async fn command(cli: &Cli, cmd: MapCommand) -> anyhow::Result<()> {
    let out = connect(cli)?.command(cmd).await.map_err(err)?;
    print_outcome(cli.format, &out);
    Ok(())
}

pub(crate) fn print_outcome(format: Format, out: &CommandOutcome) {
    match format {
        Format::Json => output::print_json(&serde_json::json!({
            "message": out.message, "epoch": out.epoch, "changed": out.changed, "osd_id": out.osd_id,
        })),
        Format::Plain => println!("{}", out.message),
    }
}

/// Errors from the cluster carry their code and the operator hint.
pub(crate) fn err(e: StoreError) -> anyhow::Error {
    anyhow::anyhow!(e.with_hint())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Status { watch: true } => watch::run(cli.format, &*connect(&cli)?).await?,
        Cmd::Status { watch: false } => {
            let s = connect(&cli)?.status().await.map_err(err)?;
            output::status(cli.format, &s);
        }
        Cmd::Health { detail } => {
            let s = connect(&cli)?.status().await.map_err(err)?;
            output::health(cli.format, &s, detail.is_some());
        }
        Cmd::Map => {
            let map = connect(&cli)?.get_map().await.map_err(err)?;
            match cli.format {
                Format::Json => output::print_json(&serde_json::to_value(&map)?),
                Format::Plain => println!("{map:#?}"),
            }
        }
        Cmd::Pool(p) => pool(&cli, p).await?,
        Cmd::Osd(o) => osd(&cli, o).await?,
        Cmd::Mon(m) => mon(&cli, m).await?,
        Cmd::Crush(CrushCmd::Test(args)) => crush::test(cli.format, args)?,
        Cmd::Cluster(c) => cluster::run(cli.format, c).await?,
        Cmd::Obj(o) => obj::run(cli.format, connect(&cli)?, o).await?,
        Cmd::Bench(b) => obj::bench(cli.format, connect(&cli)?, b).await?,
        Cmd::Image(i) => image::run(cli.format, connect(&cli)?, i).await?,
        Cmd::Client(c) => client::run(cli.format, connect(&cli)?, c).await?,
        Cmd::Gateway(GatewayCmd::Ls) => {
            let conf = Config::load(cli.conf.as_deref())?;
            let gateways: Vec<(String, bool)> = cluster::gateway_addrs(&conf)
                .into_iter()
                .map(|addr| {
                    let up = addr.parse::<std::net::SocketAddr>().is_ok_and(|a| {
                        std::net::TcpStream::connect_timeout(
                            &a,
                            std::time::Duration::from_millis(500),
                        )
                        .is_ok()
                    });
                    (addr, up)
                })
                .collect();
            match cli.format {
                Format::Json => output::print_json(&serde_json::Value::Array(
                    gateways
                        .iter()
                        .map(|(a, up)| serde_json::json!({"addr": a, "reachable": up, "uri": format!("nbd://{a}/POOL/IMAGE")}))
                        .collect(),
                )),
                Format::Plain => {
                    for (a, up) in &gateways {
                        println!("{a}\t{}", if *up { "up" } else { "not answering" });
                    }
                }
            }
        }
    }
    Ok(())
}

async fn pool(cli: &Cli, p: &PoolCmd) -> anyhow::Result<()> {
    match p {
        PoolCmd::Create {
            name,
            size,
            min_size,
            pg_num,
            failure_domain,
        } => {
            if min_size > size {
                bail!("min_size {min_size} is larger than size {size}: need 1 <= min_size <= size");
            }
            let client = connect(cli)?;
            let out = client
                .command(MapCommand::PoolCreate {
                    name: name.clone(),
                    size: *size,
                    min_size: *min_size,
                    pg_num: *pg_num,
                    failure_domain: *failure_domain,
                })
                .await
                .map_err(err)?;
            print_outcome(cli.format, &out);
            // Accepted with a warning when the cluster has too few failure domains.
            if cli.format == Format::Plain {
                let map = client.get_map().await.map_err(err)?;
                if let Some(pool) = map.pool_by_name(name) {
                    let domains = map.failure_domains_available(pool.failure_domain);
                    if (pool.size as usize) > domains {
                        eprintln!(
                            "warning: size {} exceeds the {} {} failure domain(s) with OSDs in: PGs stay undersized (POOL_SIZE_EXCEEDS_DOMAINS)",
                            pool.size, domains, pool.failure_domain
                        );
                    }
                }
            }
        }
        PoolCmd::Ls => {
            let map = connect(cli)?.get_map().await.map_err(err)?;
            output::pools(cli.format, &map);
        }
        PoolCmd::Get { name, key } => {
            let map = connect(cli)?.get_map().await.map_err(err)?;
            let pool = map
                .pool_by_name(name)
                .with_context(|| format!("NOT_FOUND: pool '{name}' does not exist"))?;
            output::pool_get(cli.format, pool, key.as_deref())?;
        }
        PoolCmd::Set { name, key, value } => {
            command(
                cli,
                MapCommand::PoolSet {
                    name: name.clone(),
                    key: key.clone(),
                    value: value.clone(),
                },
            )
            .await?
        }
        PoolCmd::Rm { name, yes } => {
            if !yes {
                bail!(
                    "removing pool '{name}' destroys all its data: repeat with --yes-i-really-mean-it"
                );
            }
            command(cli, MapCommand::PoolRm { name: name.clone() }).await?
        }
    }
    Ok(())
}

async fn osd(cli: &Cli, o: &OsdCmd) -> anyhow::Result<()> {
    match o {
        OsdCmd::Tree => {
            let map = connect(cli)?.get_map().await.map_err(err)?;
            output::osd_tree(cli.format, &map);
        }
        OsdCmd::Df => {
            let mons = connect(cli)?;
            let map = mons.get_map().await.map_err(err)?;
            let status = mons.status().await.map_err(err)?;
            output::osd_df(cli.format, &map, &status);
        }
        OsdCmd::Out { ids, .. }
        | OsdCmd::In { ids, .. }
        | OsdCmd::OkToStop { ids }
        | OsdCmd::SafeToDestroy { ids }
            if ids.is_empty() =>
        {
            bail!("name at least one OSD id")
        }
        OsdCmd::Out { ids, dry_run } | OsdCmd::In { ids, dry_run } => {
            let cmd = if matches!(o, OsdCmd::Out { .. }) {
                MapCommand::OsdOut { ids: ids.clone() }
            } else {
                MapCommand::OsdIn { ids: ids.clone() }
            };
            maybe_dry_run(cli, cmd, *dry_run).await?
        }
        OsdCmd::Reweight {
            id,
            weight,
            dry_run,
        } => {
            if !weight.is_finite() || *weight < 0.0 || *weight > 65535.0 {
                bail!("weight {weight}: use 0 to 65535 (1.0 = one TiB)");
            }
            let cmd = MapCommand::OsdReweight {
                id: *id,
                weight: store_types::map::weight_from_f64(*weight),
            };
            maybe_dry_run(cli, cmd, *dry_run).await?
        }
        OsdCmd::OkToStop { ids } => {
            let map = connect(cli)?.get_map().await.map_err(err)?;
            let bad = osdops::ok_to_stop(&map, ids)?;
            osdops::verdict(cli.format, "ok-to-stop", ids, &bad)?
        }
        OsdCmd::SafeToDestroy { ids } => {
            let mons = connect(cli)?;
            let (map, status) = (
                mons.get_map().await.map_err(err)?,
                mons.status().await.map_err(err)?,
            );
            let reasons = osdops::safe_to_destroy(&map, &status, ids)?;
            osdops::verdict(cli.format, "safe-to-destroy", ids, &reasons)?
        }
        OsdCmd::Purge { id, yes } => {
            if !yes {
                bail!("purging osd.{id} removes it for good: pass --yes-i-really-mean-it");
            }
            let mons = connect(cli)?;
            let (map, status) = (
                mons.get_map().await.map_err(err)?,
                mons.status().await.map_err(err)?,
            );
            let reasons = osdops::safe_to_destroy(&map, &status, &[*id])?;
            osdops::verdict(Format::Plain, "safe-to-destroy", &[*id], &reasons)
                .map_err(|e| anyhow::anyhow!("refusing to purge: {e}"))?;
            command(cli, MapCommand::OsdPurge { id: *id }).await?
        }
        OsdCmd::Lost { id, yes } => {
            if !yes {
                bail!(
                    "declaring osd.{id} lost gives up whatever only it holds: pass --yes-i-really-mean-it"
                );
            }
            command(cli, MapCommand::OsdLost { id: *id }).await?
        }
        OsdCmd::Add {
            host,
            count,
            weight,
            dry_run,
        } => {
            if !dry_run {
                bail!(
                    "OSDs join by starting `stored osd --data DIR --host {host}` on the new storage; `storectl osd add --dry-run` says what they would move"
                );
            }
            if !weight.is_finite() || *weight <= 0.0 || *weight > 65535.0 {
                bail!("weight {weight}: use more than 0, up to 65535 (1.0 = one TiB)");
            }
            let mons = connect(cli)?;
            let map = mons.get_map().await.map_err(err)?;
            let status = mons.status().await.map_err(err)?;
            let after = osdops::simulate_add(
                &map,
                host,
                *count,
                store_types::map::weight_from_f64(*weight),
            )?;
            osdops::print_movement(cli.format, &map, &status, &after);
        }
        OsdCmd::Set { flag } => command(cli, MapCommand::SetFlag(*flag)).await?,
        OsdCmd::Unset { flag } => command(cli, MapCommand::UnsetFlag(*flag)).await?,
    }
    Ok(())
}

/// Runs a map change, or with `dry_run` only says what it would move.
async fn maybe_dry_run(cli: &Cli, cmd: MapCommand, dry_run: bool) -> anyhow::Result<()> {
    if !dry_run {
        return command(cli, cmd).await;
    }
    let mons = connect(cli)?;
    let map = mons.get_map().await.map_err(err)?;
    let status = mons.status().await.map_err(err)?;
    osdops::print_dry_run(cli.format, &map, &status, &cmd)
}

async fn mon(cli: &Cli, m: &MonCmd) -> anyhow::Result<()> {
    let client = connect(cli)?;
    let req = match m {
        MonCmd::Ls => {
            let s = client.status().await.map_err(err)?;
            output::mons(cli.format, &s);
            return Ok(());
        }
        MonCmd::Add { name, addr } => {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                bail!("'{addr}' is not an IP:PORT address");
            }
            MonMembership::Add {
                name: name.clone(),
                addr: addr.clone(),
            }
        }
        MonCmd::Rm { name } => MonMembership::Remove { name: name.clone() },
    };
    let timeout = std::time::Duration::from_secs(90);
    match client
        .request(&MonRequest::Membership(req), timeout)
        .await
        .map_err(err)?
    {
        MonResponse::Outcome(out) => print_outcome(cli.format, &out),
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`storectl status | head`) instead of failing on a broken pipe.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("storectl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
