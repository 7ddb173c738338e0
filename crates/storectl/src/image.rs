//! `storectl image create/ls/info/resize/rm` (like `rbd`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use store_client::{MonClient, ObjectClient};
use store_image::{Image, ImageContext};

use crate::obj::parse_size;
use crate::output::{human_bytes, print_json};
use crate::Format;

#[derive(clap::Subcommand)]
pub enum ImageCmd {
    /// Create a thin-provisioned image: POOL/NAME --size 32G.
    Create {
        spec: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List a pool's images.
    Ls { pool: String },
    /// Show an image's size, object size and id.
    Info { spec: String },
    /// Grow an image (shrinking needs --allow-shrink and drops the data past the new end).
    Resize {
        spec: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long = "allow-shrink")]
        allow_shrink: bool,
    },
    /// Remove an image and all its data.
    Rm { spec: String },
    /// Copy a raw file into a new image (all-zero ranges are skipped: the image stays thin).
    Import { file: PathBuf, spec: String },
    /// Copy an image into a raw file (unwritten ranges become holes).
    Export { spec: String, file: PathBuf },
    /// Copy an image to a new image.
    Cp { src: String, dst: String },
}

/// Chunk of import/export/cp: one object.
const CHUNK: u64 = store_image::DEFAULT_OBJECT_SIZE;

fn progress(total: u64, format: Format) -> ProgressBar {
    if format == Format::Json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Copies `len` bytes from `read(offset, len)` into `dst`, skipping all-zero chunks.
async fn copy_into<R, F>(
    dst: &Image,
    total: u64,
    mut read: R,
    bar: &ProgressBar,
) -> anyhow::Result<u64>
where
    R: FnMut(u64, u64) -> F,
    F: std::future::Future<Output = anyhow::Result<Bytes>>,
{
    let mut written = 0;
    let mut at = 0;
    while at < total {
        let n = CHUNK.min(total - at);
        let data = read(at, n).await?;
        if data.iter().any(|b| *b != 0) {
            dst.write(at, data).await.map_err(e)?;
            written += n;
        }
        at += n;
        bar.set_position(at);
    }
    Ok(written)
}

/// `pool/image` → (pool, image).
fn split_spec(spec: &str) -> anyhow::Result<(&str, &str)> {
    match spec.split_once('/') {
        Some((p, i)) if !p.is_empty() && !i.is_empty() && !i.contains('/') => Ok((p, i)),
        _ => bail!("'{spec}' is not POOL/IMAGE"),
    }
}

fn e(err: store_types::StoreError) -> anyhow::Error {
    anyhow::anyhow!(err.with_hint())
}

pub async fn run(format: Format, mons: Arc<MonClient>, cmd: &ImageCmd) -> anyhow::Result<()> {
    let client = ObjectClient::connect(mons, Duration::from_secs(60))
        .await
        .map_err(e)?;
    let pool_id = |name: &str| -> anyhow::Result<u32> { Ok(client.pool(name).map_err(e)?.id) };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let ctx = ImageContext::new(
        client.clone(),
        format!("storectl pid {} on {}", std::process::id(), host.trim()),
        Duration::from_secs(60),
    );
    match cmd {
        ImageCmd::Create { spec, size } => {
            let (pool, name) = split_spec(spec)?;
            let img = Image::create(&ctx, pool_id(pool)?, name, *size)
                .await
                .map_err(e)?;
            match format {
                Format::Json => {
                    print_json(&json!({"image": spec, "size": size, "id": img.header().id}))
                }
                Format::Plain => println!("created {spec}: {} ({size} bytes)", human_bytes(*size)),
            }
        }
        ImageCmd::Ls { pool } => {
            let names = Image::list(&client, pool_id(pool)?).await.map_err(e)?;
            match format {
                Format::Json => print_json(&json!(names)),
                Format::Plain => names.iter().for_each(|n| println!("{n}")),
            }
        }
        ImageCmd::Info { spec } => {
            let (pool, name) = split_spec(spec)?;
            let img = Image::open(&ctx, pool_id(pool)?, name).await.map_err(e)?;
            let h = img.header();
            match format {
                Format::Json => print_json(&json!({
                    "image": spec, "id": h.id, "size": h.size, "object_size": h.object_size,
                    "objects": h.size.div_ceil(h.object_size), "features": h.features,
                })),
                Format::Plain => {
                    println!("image {spec}");
                    println!(
                        "  size {} ({} bytes) in {} objects of {}",
                        human_bytes(h.size),
                        h.size,
                        h.size.div_ceil(h.object_size),
                        human_bytes(h.object_size)
                    );
                    println!("  id {}", h.id);
                }
            }
        }
        ImageCmd::Resize {
            spec,
            size,
            allow_shrink,
        } => {
            let (pool, name) = split_spec(spec)?;
            let mut img = Image::open(&ctx, pool_id(pool)?, name).await.map_err(e)?;
            let resized = img.resize(*size, *allow_shrink).await.map_err(e);
            img.close().await;
            resized?;
            match format {
                Format::Json => print_json(&json!({"image": spec, "size": size})),
                Format::Plain => {
                    println!("resized {spec} to {} ({size} bytes)", human_bytes(*size))
                }
            }
        }
        ImageCmd::Import { file, spec } => {
            let (pool, name) = split_spec(spec)?;
            let mut f =
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            let size = f.metadata()?.len();
            if size == 0 {
                bail!("{} is empty: nothing to import", file.display());
            }
            let img = Image::create(&ctx, pool_id(pool)?, name, size)
                .await
                .map_err(e)?;
            let bar = progress(size, format);
            let written = copy_into(
                &img,
                size,
                |_, n| {
                    let mut buf = vec![0u8; n as usize];
                    let r = f.read_exact(&mut buf).map(|_| Bytes::from(buf));
                    async move { r.context("reading the input file") }
                },
                &bar,
            )
            .await?;
            img.close().await;
            bar.finish_and_clear();
            match format {
                Format::Json => {
                    print_json(&json!({"image": spec, "size": size, "bytes_written": written}))
                }
                Format::Plain => println!(
                    "imported {} into {spec}: {} ({} written, the rest left thin)",
                    file.display(),
                    human_bytes(size),
                    human_bytes(written)
                ),
            }
        }
        ImageCmd::Export { spec, file } => {
            let (pool, name) = split_spec(spec)?;
            let img = Image::open(&ctx, pool_id(pool)?, name).await.map_err(e)?;
            let mut f = std::fs::File::create(file)
                .with_context(|| format!("creating {}", file.display()))?;
            let size = img.size();
            let bar = progress(size, format);
            let mut at = 0;
            while at < size {
                let n = CHUNK.min(size - at);
                let data = img.read(at, n).await.map_err(e)?;
                if data.iter().any(|b| *b != 0) {
                    f.seek(SeekFrom::Start(at))?;
                    f.write_all(&data)?;
                }
                at += n;
                bar.set_position(at);
            }
            // Holes at the end still count: the file has the image's size.
            f.set_len(size)?;
            f.sync_all()?;
            bar.finish_and_clear();
            match format {
                Format::Json => print_json(&json!({"image": spec, "file": file, "size": size})),
                Format::Plain => println!(
                    "exported {spec} to {} ({})",
                    file.display(),
                    human_bytes(size)
                ),
            }
        }
        ImageCmd::Cp { src, dst } => {
            let (sp, sn) = split_spec(src)?;
            let (dp, dn) = split_spec(dst)?;
            let from = Image::open(&ctx, pool_id(sp)?, sn).await.map_err(e)?;
            let size = from.size();
            let to = Image::create(&ctx, pool_id(dp)?, dn, size)
                .await
                .map_err(e)?;
            let bar = progress(size, format);
            let from = &from;
            let written = copy_into(
                &to,
                size,
                |at, n| async move { from.read(at, n).await.map_err(e) },
                &bar,
            )
            .await?;
            to.close().await;
            bar.finish_and_clear();
            match format {
                Format::Json => print_json(
                    &json!({"src": src, "dst": dst, "size": size, "bytes_written": written}),
                ),
                Format::Plain => println!(
                    "copied {src} to {dst} ({}, {} written)",
                    human_bytes(size),
                    human_bytes(written)
                ),
            }
        }
        ImageCmd::Rm { spec } => {
            let (pool, name) = split_spec(spec)?;
            let img = Image::open(&ctx, pool_id(pool)?, name).await.map_err(e)?;
            img.remove()
                .await
                .map_err(e)
                .context("removing the image")?;
            match format {
                Format::Json => print_json(&json!({"removed": spec})),
                Format::Plain => println!("removed {spec}"),
            }
        }
    }
    Ok(())
}
