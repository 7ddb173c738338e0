//! `storectl image create/ls/info/resize/rm` (like `rbd`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use store_client::{MonClient, ObjectClient};
use store_image::Image;

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
    match cmd {
        ImageCmd::Create { spec, size } => {
            let (pool, name) = split_spec(spec)?;
            let img = Image::create(client.clone(), pool_id(pool)?, name, *size)
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
            let img = Image::open(client.clone(), pool_id(pool)?, name)
                .await
                .map_err(e)?;
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
            let mut img = Image::open(client.clone(), pool_id(pool)?, name)
                .await
                .map_err(e)?;
            img.resize(*size, *allow_shrink).await.map_err(e)?;
            match format {
                Format::Json => print_json(&json!({"image": spec, "size": size})),
                Format::Plain => {
                    println!("resized {spec} to {} ({size} bytes)", human_bytes(*size))
                }
            }
        }
        ImageCmd::Rm { spec } => {
            let (pool, name) = split_spec(spec)?;
            let img = Image::open(client.clone(), pool_id(pool)?, name)
                .await
                .map_err(e)?;
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
