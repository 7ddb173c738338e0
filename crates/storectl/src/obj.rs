//! `storectl obj put/get/rm/ls/stat` (like `rados put/get/rm/ls/stat`) and `storectl bench`
//! (like `rados bench`).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde_json::json;
use store_client::{MonClient, ObjectClient};

use crate::output::print_json;
use crate::Format;

/// Largest object `obj put` writes (the OSD object store's limit).
const MAX_PUT_BYTES: usize = 64 << 20;
/// Chunk size for `obj put/get`.
const CHUNK: usize = 4 << 20;

#[derive(clap::Subcommand)]
pub enum ObjCmd {
    /// Store FILE (or - for stdin) as object NAME.
    Put {
        #[arg(long)]
        pool: String,
        name: String,
        file: PathBuf,
    },
    /// Write object NAME to FILE (or - for stdout).
    Get {
        #[arg(long)]
        pool: String,
        name: String,
        file: PathBuf,
    },
    /// Remove object NAME.
    Rm {
        #[arg(long)]
        pool: String,
        name: String,
    },
    /// Size and version of object NAME.
    Stat {
        #[arg(long)]
        pool: String,
        name: String,
    },
    /// List the pool's objects.
    Ls {
        #[arg(long)]
        pool: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    Write,
    Read,
    Randwrite,
    Randread,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    mode: BenchMode,
    #[arg(long)]
    pool: String,
    /// I/O size, e.g. 4k, 64k, 4M.
    #[arg(long = "block-size", default_value = "4k", value_parser = parse_size)]
    block_size: u64,
    /// Operations in flight.
    #[arg(long, default_value_t = 16)]
    qd: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Objects the benchmark spreads over (each up to --object-size).
    #[arg(long, default_value_t = 64)]
    objects: u64,
    #[arg(long = "object-size", default_value = "4M", value_parser = parse_size)]
    object_size: u64,
}

/// Sizes like 4k, 64K, 4M, 1G (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4k, 4M)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("unknown size unit in '{s}': use k, M or G")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size '{s}' is out of range"))
}

async fn client(mons: Arc<MonClient>) -> anyhow::Result<Arc<ObjectClient>> {
    ObjectClient::connect(mons, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!(e.with_hint()))
}

fn e(err: store_types::StoreError) -> anyhow::Error {
    anyhow::anyhow!(err.with_hint())
}

pub async fn run(format: Format, mons: Arc<MonClient>, cmd: &ObjCmd) -> anyhow::Result<()> {
    let c = client(mons).await?;
    match cmd {
        ObjCmd::Put { pool, name, file } => {
            let pool = c.pool(pool).map_err(e)?;
            let mut data = Vec::new();
            let mut input: Box<dyn Read> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(
                    std::fs::File::open(file)
                        .with_context(|| format!("opening {}", file.display()))?,
                )
            };
            input
                .by_ref()
                .take(MAX_PUT_BYTES as u64 + 1)
                .read_to_end(&mut data)?;
            if data.len() > MAX_PUT_BYTES {
                bail!("objects are at most {} MiB", MAX_PUT_BYTES >> 20);
            }
            // Replace, as `rados put` does: remove the old object first.
            c.delete(pool.id, name).await.map_err(e)?;
            let data = Bytes::from(data);
            let mut version = None;
            for (i, chunk) in data.chunks(CHUNK).enumerate() {
                let off = (i * CHUNK) as u64;
                version = Some(
                    c.write(pool.id, name, off, data.slice_ref(chunk))
                        .await
                        .map_err(e)?,
                );
            }
            if data.is_empty() {
                version = Some(c.write(pool.id, name, 0, Bytes::new()).await.map_err(e)?);
            }
            match format {
                Format::Json => print_json(
                    &json!({"object": name, "bytes": data.len(), "version": version.map(|v| json!({"epoch": v.epoch, "seq": v.seq}))}),
                ),
                Format::Plain => println!("wrote {} bytes to {}/{}", data.len(), pool.name, name),
            }
        }
        ObjCmd::Get { pool, name, file } => {
            let pool = c.pool(pool).map_err(e)?;
            let st = c.stat(pool.id, name).await.map_err(e)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "NOT_FOUND: object '{name}' does not exist in pool '{}'",
                    pool.name
                )
            })?;
            let mut out: Box<dyn Write> = if file.as_os_str() == "-" {
                Box::new(std::io::stdout())
            } else {
                Box::new(
                    std::fs::File::create(file)
                        .with_context(|| format!("creating {}", file.display()))?,
                )
            };
            let mut off = 0u64;
            while off < st.size {
                let len = (st.size - off).min(CHUNK as u64) as u32;
                let d = c.read(pool.id, name, off, len).await.map_err(e)?;
                if d.is_empty() {
                    break;
                }
                out.write_all(&d)?;
                off += d.len() as u64;
            }
            out.flush()?;
            if format == Format::Json && file.as_os_str() != "-" {
                print_json(&json!({"object": name, "bytes": off}));
            }
        }
        ObjCmd::Rm { pool, name } => {
            let pool = c.pool(pool).map_err(e)?;
            if c.stat(pool.id, name).await.map_err(e)?.is_none() {
                bail!(
                    "NOT_FOUND: object '{name}' does not exist in pool '{}'",
                    pool.name
                );
            }
            c.delete(pool.id, name).await.map_err(e)?;
            if format == Format::Json {
                print_json(&json!({"removed": name}));
            }
        }
        ObjCmd::Stat { pool, name } => {
            let pool = c.pool(pool).map_err(e)?;
            let st = c.stat(pool.id, name).await.map_err(e)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "NOT_FOUND: object '{name}' does not exist in pool '{}'",
                    pool.name
                )
            })?;
            match format {
                Format::Json => print_json(
                    &json!({"object": name, "size": st.size, "version": {"epoch": st.version.epoch, "seq": st.version.seq}}),
                ),
                Format::Plain => println!(
                    "{}/{} size {} version {}.{}",
                    pool.name, name, st.size, st.version.epoch, st.version.seq
                ),
            }
        }
        ObjCmd::Ls { pool } => {
            let pool = c.pool(pool).map_err(e)?;
            let names = c.list(pool.id).await.map_err(e)?;
            match format {
                Format::Json => print_json(&json!(names)),
                Format::Plain => names.iter().for_each(|n| println!("{n}")),
            }
        }
    }
    Ok(())
}

/// Latency samples in microseconds → (mean, p50, p99).
fn latency_summary(mut us: Vec<u64>) -> (f64, u64, u64) {
    if us.is_empty() {
        return (0.0, 0, 0);
    }
    us.sort_unstable();
    let mean = us.iter().sum::<u64>() as f64 / us.len() as f64;
    let pct = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)];
    (mean, pct(0.50), pct(0.99))
}

pub async fn bench(format: Format, mons: Arc<MonClient>, a: &BenchArgs) -> anyhow::Result<()> {
    if a.qd == 0 || a.qd > 1024 {
        bail!("--qd {}: use 1 to 1024", a.qd);
    }
    if a.block_size > a.object_size || a.block_size > 16 << 20 {
        bail!("--block-size must be at most --object-size and 16M");
    }
    let c = client(mons).await?;
    let pool = c.pool(&a.pool).map_err(e)?;
    let slots = a.object_size / a.block_size;
    let names: Vec<String> = (0..a.objects).map(|i| format!("bench.{i}")).collect();
    let read = matches!(a.mode, BenchMode::Read | BenchMode::Randread);
    if read {
        // Reads need data: fill every block the benchmark may read, once.
        let data = Bytes::from(vec![0xa5u8; a.object_size as usize]);
        for n in &names {
            c.write(pool.id, n, 0, data.clone()).await.map_err(e)?;
        }
    }
    let random = matches!(a.mode, BenchMode::Randread | BenchMode::Randwrite);
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for w in 0..a.qd {
        let c = c.clone();
        let names = names.clone();
        let block = a.block_size;
        let qd = a.qd as u64;
        let mut x = (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        workers.push(tokio::spawn(async move {
            let data = Bytes::from(vec![w as u8; block as usize]);
            let mut lat = Vec::new();
            let mut seq = w as u64;
            while Instant::now() < deadline {
                // Sequential: workers stride through every block of every object in turn.
                let (obj, off) = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (
                        x % names.len() as u64,
                        (x / names.len() as u64 % slots) * block,
                    )
                } else {
                    let i = seq;
                    seq += qd;
                    ((i / slots) % names.len() as u64, (i % slots) * block)
                };
                let obj = &names[obj as usize];
                let t = Instant::now();
                let r = if read {
                    c.read(pool.id, obj, off, block as u32).await.map(|_| ())
                } else {
                    c.write(pool.id, obj, off, data.clone()).await.map(|_| ())
                };
                r?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, store_types::StoreError>(lat)
        }));
    }
    let mut all = Vec::new();
    for wk in workers {
        all.extend(wk.await.context("bench worker")?.map_err(e)?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let ops = all.len() as f64;
    let (mean, p50, p99) = latency_summary(all);
    let iops = ops / secs;
    let mbps = iops * a.block_size as f64 / (1 << 20) as f64;
    match format {
        Format::Json => print_json(&json!({
            "mode": format!("{:?}", a.mode).to_lowercase(), "block_size": a.block_size, "qd": a.qd,
            "seconds": secs, "ops": ops, "iops": iops, "mb_per_s": mbps,
            "latency_us": {"mean": mean, "p50": p50, "p99": p99},
        })),
        Format::Plain => {
            println!(
                "{:?} bs={} qd={} {:.1} s: {:.0} IOPS, {:.1} MB/s, latency mean {:.0} us, p50 {} us, p99 {} us",
                a.mode, a.block_size, a.qd, secs, iops, mbps, mean, p50, p99
            );
        }
    }
    Ok(())
}
