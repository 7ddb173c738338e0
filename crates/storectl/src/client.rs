//! `storectl client`: image sessions, who holds which image lock, and the blocklist.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Subcommand;
use comfy_table::Table;
use serde_json::json;
use store_client::MonClient;
use store_types::map::{parse_session, session_name, ClusterMap, SessionId};
use store_types::msg::{MapCommand, MonRequest, MonResponse, SessionReport};

use crate::output::print_json;
use crate::{err, print_outcome, Format};

#[derive(Subcommand)]
pub enum ClientCmd {
    /// Open image sessions (gateways, tools) and the image locks they hold.
    Ls,
    /// Fence sessions: OSDs refuse their writes, monitors refuse them locks.
    #[command(subcommand)]
    Blocklist(BlocklistCmd),
}

#[derive(Subcommand)]
pub enum BlocklistCmd {
    /// Blocklist a session (`client.<hex>` as `client ls` shows it).
    Add {
        id: String,
        #[arg(long, default_value = "added by the operator")]
        reason: String,
        /// Lift the entry after this many seconds (0: never); default: the monitors'
        /// `mon_blocklist_default_expire` (an hour). An entry whose session still holds an
        /// image lock is kept.
        #[arg(long)]
        expire_s: Option<u64>,
    },
    /// List blocklisted sessions.
    Ls,
    /// Lift a session's blocklisting.
    Rm { id: String },
}

fn parse_id(s: &str) -> anyhow::Result<SessionId> {
    match parse_session(s) {
        Some(id) => Ok(id),
        None => bail!("'{s}' is not a session id: expected client.<1-16 hex digits>, as `storectl client ls` shows"),
    }
}

async fn sessions(mons: &MonClient) -> anyhow::Result<Vec<SessionReport>> {
    match mons
        .request(&MonRequest::ClientList, std::time::Duration::from_secs(5))
        .await
        .map_err(err)?
    {
        MonResponse::Clients(c) => Ok(c),
        other => bail!("unexpected monitor answer: {other:?}"),
    }
}

/// One row per session the monitor heard from, plus lock holders it did not hear from.
fn rows(map: &ClusterMap, seen: &[SessionReport]) -> Vec<serde_json::Value> {
    let mut by_id: BTreeMap<SessionId, serde_json::Value> = BTreeMap::new();
    for s in seen {
        by_id.insert(
            s.info.id,
            json!({
                "id": session_name(s.info.id),
                "image": s.info.image,
                "addr": s.info.desc,
                "last_seen_ms_ago": s.last_seen_ms_ago,
                "lock": null,
                "blocklisted": map.blocklist.contains_key(&s.info.id),
            }),
        );
    }
    for l in map.image_locks.values() {
        let Some(h) = l.holder else { continue };
        let row = by_id.entry(h).or_insert_with(|| {
            json!({
                "id": session_name(h),
                "image": l.image,
                "addr": l.holder_desc,
                "last_seen_ms_ago": null,
                "blocklisted": map.blocklist.contains_key(&h),
            })
        });
        row["lock"] = json!({
            "image": l.image,
            "generation": l.generation,
            "requested_by": l.requested_by.map(session_name),
        });
    }
    by_id.into_values().collect()
}

pub async fn run(format: Format, mons: Arc<MonClient>, cmd: &ClientCmd) -> anyhow::Result<()> {
    match cmd {
        ClientCmd::Ls => {
            let map = mons.get_map().await.map_err(err)?;
            let rows = rows(&map, &sessions(&mons).await?);
            if format == Format::Json {
                print_json(&json!(rows));
                return Ok(());
            }
            let mut t = Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header(["SESSION", "IMAGE", "WHERE", "LOCK", "LAST SEEN", "STATE"]);
            for r in &rows {
                let lock = match &r["lock"] {
                    serde_json::Value::Null => "-".to_string(),
                    l => format!(
                        "holder, generation {}{}",
                        l["generation"],
                        l["requested_by"]
                            .as_str()
                            .map_or(String::new(), |w| format!(", wanted by {w}"))
                    ),
                };
                let seen = r["last_seen_ms_ago"]
                    .as_u64()
                    .map_or("never (vanished)".to_string(), |ms| format!("{ms} ms ago"));
                let state = if r["blocklisted"].as_bool() == Some(true) {
                    "BLOCKLISTED"
                } else {
                    "ok"
                };
                t.add_row([
                    r["id"].as_str().unwrap_or(""),
                    r["image"].as_str().unwrap_or(""),
                    r["addr"].as_str().unwrap_or(""),
                    &lock,
                    &seen,
                    state,
                ]);
            }
            println!("{t}");
        }
        ClientCmd::Blocklist(BlocklistCmd::Add {
            id,
            reason,
            expire_s,
        }) => {
            let session = parse_id(id)?;
            let out = mons
                .command(MapCommand::BlocklistAdd {
                    session,
                    reason: reason.clone(),
                    expire_s: *expire_s,
                })
                .await
                .map_err(err)
                .context("blocklisting")?;
            print_outcome(format, &out);
        }
        ClientCmd::Blocklist(BlocklistCmd::Rm { id }) => {
            let session = parse_id(id)?;
            let out = mons
                .command(MapCommand::BlocklistRm { session })
                .await
                .map_err(err)?;
            print_outcome(format, &out);
        }
        ClientCmd::Blocklist(BlocklistCmd::Ls) => {
            let map = mons.get_map().await.map_err(err)?;
            let list: Vec<_> = map
                .blocklist
                .iter()
                .map(|(id, b)| {
                    json!({"id": session_name(*id), "added_epoch": b.added_epoch, "reason": b.reason,
                           "expire_s": b.expire_s})
                })
                .collect();
            match format {
                Format::Json => print_json(&json!(list)),
                Format::Plain => {
                    for (id, b) in &map.blocklist {
                        let expiry = match b.expire_s {
                            Some(0) => "never expires".to_string(),
                            Some(s) => format!("expires {s} s after it was added"),
                            None => "default expiry".to_string(),
                        };
                        println!(
                            "{} since epoch {} ({expiry}): {}",
                            session_name(*id),
                            b.added_epoch,
                            b.reason
                        );
                    }
                    println!("listed {} entries", map.blocklist.len());
                }
            }
        }
    }
    Ok(())
}
