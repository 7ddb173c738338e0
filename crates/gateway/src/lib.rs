//! The NBD gateway: serves images as NBD exports named `pool/image`, over tokio.
//!
//! Implements the fixed newstyle handshake (NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
//! NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST/SET_META_CONTEXT
//! with `base:allocation`) and the transmission phase: READ, WRITE, FLUSH, TRIM,
//! WRITE_ZEROES (with FAST_ZERO), BLOCK_STATUS and DISC, many requests in flight per
//! connection, replies in completion order (structured for reads and block status when
//! negotiated, so clients can skip holes).
//!
//! There is no cache in the gateway: a write is acknowledged only when every OSD of its
//! PGs made it durable, so FLUSH and FUA have nothing left to do, and every gateway sees
//! every acknowledged write (multi-connection and cross-gateway coherent). The gateway must
//! not know how objects are stored or placed.
//! Reference: the NBD protocol document (NetworkBlockDevice/nbd, doc/proto.md).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;

use store_image::{Image, ImageContext};
use store_types::{ErrorCode, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn, Instrument};

pub mod proto;

use crate::proto::*;

pub struct Gateway {
    ctx: Arc<ImageContext>,
    /// Open exports and how many connections use each: connections to one image share one
    /// open (one session, one lock), so multi-connection clients never fight over the lock.
    /// The map's mutex is never held across an await: an image whose PG is unavailable
    /// stalls only the connections to that image, never the handshakes of the others.
    opens: std::sync::Mutex<HashMap<String, OpenExport>>,
}

/// One export's shared open: the image once opened, and the connections using it
/// (counted from before the open completes, so a failed open is undone by the last one).
struct OpenExport {
    image: Arc<tokio::sync::OnceCell<Arc<Image>>>,
    users: usize,
}

/// What the client negotiated before transmission.
#[derive(Clone, Copy, Default)]
struct Negotiated {
    structured: bool,
    base_allocation: bool,
}

enum Handshake {
    /// Transmission starts with this export.
    Go(String, Arc<Image>, Negotiated),
    /// The client ended the session politely (or an EXPORT_NAME was unknown).
    Done,
}

impl Gateway {
    pub fn new(ctx: Arc<ImageContext>) -> Arc<Self> {
        Arc::new(Gateway {
            ctx,
            opens: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Releases every image lock this gateway holds (on shutdown), so other gateways take
    /// them over at once instead of after the session grace.
    pub async fn close_all(&self) {
        let images: Vec<Arc<Image>> = self
            .lock_opens()
            .values()
            .filter_map(|o| o.image.get().cloned())
            .collect();
        for img in images {
            img.close().await;
        }
    }

    fn lock_opens(&self) -> std::sync::MutexGuard<'_, HashMap<String, OpenExport>> {
        // Nothing panics while holding it (and daemons abort on panic).
        self.opens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves NBD clients until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    let span = tracing::info_span!("nbd", %peer);
                    tokio::spawn(
                        async move {
                            if let Err(e) = me.session(stream).await {
                                debug!("session ended: {e}");
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn session(self: Arc<Self>, stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true).ok();
        let (rd, mut wr) = stream.into_split();
        // Requests waiting in the socket come in with one `recv` (see READ_BUFFER_BYTES).
        let mut rd = BufReader::with_capacity(store_client::lowat::READ_BUFFER_BYTES, rd);
        let mut hello = BytesMut::new();
        hello.put_u64(NBDMAGIC);
        hello.put_u64(IHAVEOPT);
        hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        wr.write_all(&hello).await?;
        let client_flags = rd.read_u32().await?;
        // The protocol: a server MUST drop a client that sets a flag it does not know.
        if let Some(unknown) = unknown_client_flags(client_flags) {
            warn!("client sent unknown handshake flags {unknown:#x}; closing");
            return Ok(());
        }
        if client_flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
            warn!("client does not speak fixed newstyle; closing");
            return Ok(());
        }
        let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
        let (export, image, neg) = match self.options(&mut rd, &mut wr, no_zeroes).await? {
            Handshake::Go(export, img, neg) => (export, img, neg),
            Handshake::Done => return Ok(()),
        };
        info!(
            export = %export,
            size = image.size(),
            structured = neg.structured,
            "transmission started"
        );
        let res = transmission(image, &export, neg, rd, wr).await;
        self.release(&export).await;
        res
    }

    /// The export's shared open, opening it for the first connection. Connections to the
    /// same export wait for that one open; others do not wait at all.
    async fn open(&self, export: &str) -> Result<Arc<Image>, StoreError> {
        let Some((pool, name)) = export.split_once('/') else {
            return Err(StoreError::invalid(format!(
                "export '{export}' is not POOL/IMAGE"
            )));
        };
        let cell = {
            let mut opens = self.lock_opens();
            let entry = opens
                .entry(export.to_string())
                .or_insert_with(|| OpenExport {
                    image: Arc::default(),
                    users: 0,
                });
            entry.users += 1;
            entry.image.clone()
        };
        let opened = cell
            .get_or_try_init(|| async {
                let pool = self.ctx.client().pool(pool)?;
                Ok::<_, StoreError>(Arc::new(Image::open(&self.ctx, pool.id, name).await?))
            })
            .await;
        match opened {
            Ok(img) => Ok(img.clone()),
            Err(e) => {
                self.release(export).await;
                Err(e)
            }
        }
    }

    /// A connection is done with an export; the last one releases its lock.
    async fn release(&self, export: &str) {
        let last = {
            let mut opens = self.lock_opens();
            match opens.get_mut(export) {
                Some(o) if o.users > 1 => {
                    o.users -= 1;
                    None
                }
                Some(_) => opens.remove(export).and_then(|o| o.image.get().cloned()),
                None => None,
            }
        };
        if let Some(img) = last {
            img.close().await;
        }
    }

    /// The option haggling phase.
    async fn options(
        &self,
        rd: &mut BufReader<OwnedReadHalf>,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
        no_zeroes: bool,
    ) -> std::io::Result<Handshake> {
        let mut neg = Negotiated::default();
        loop {
            let mut head = [0u8; 16];
            rd.read_exact(&mut head).await?;
            let Some((opt, len)) = parse_option_header(&head) else {
                warn!("bad option magic; closing");
                return Ok(Handshake::Done);
            };
            if len > MAX_OPTION_BYTES {
                warn!("option {opt} of {len} bytes is too large; closing");
                return Ok(Handshake::Done);
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    match self.open(&name).await {
                        Ok(img) => {
                            let mut b = BytesMut::new();
                            b.put_u64(img.size());
                            b.put_u16(transmission_flags());
                            if !no_zeroes {
                                b.put_bytes(0, 124);
                            }
                            if let Err(e) = wr.write_all(&b).await {
                                self.release(&name).await;
                                return Err(e);
                            }
                            return Ok(Handshake::Go(name, img, neg));
                        }
                        // EXPORT_NAME has no error reply: the spec says close.
                        Err(e) => {
                            warn!(export = %name, "unknown export: {e}");
                            return Ok(Handshake::Done);
                        }
                    }
                }
                OPT_ABORT => {
                    let _ = option_reply(wr, opt, REP_ACK, &[]).await;
                    return Ok(Handshake::Done);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        option_reply(wr, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                        continue;
                    }
                    for name in self.export_names().await {
                        let mut d = BytesMut::new();
                        d.put_u32(name.len() as u32);
                        d.put_slice(name.as_bytes());
                        option_reply(wr, opt, REP_SERVER, &d).await?;
                    }
                    option_reply(wr, opt, REP_ACK, &[]).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some(name) = parse_info_request(&data) else {
                        option_reply(wr, opt, REP_ERR_INVALID, b"malformed INFO/GO request")
                            .await?;
                        continue;
                    };
                    match self.open(&name).await {
                        Ok(img) => {
                            let sent = send_info(wr, opt, img.size()).await;
                            if opt == OPT_GO && sent.is_ok() {
                                return Ok(Handshake::Go(name, img, neg));
                            }
                            self.release(&name).await;
                            sent?;
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            option_reply(wr, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                        }
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        option_reply(wr, opt, REP_ERR_INVALID, b"takes no data").await?;
                        continue;
                    }
                    neg.structured = true;
                    option_reply(wr, opt, REP_ACK, &[]).await?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let Some(queries) = parse_meta_request(&data) else {
                        option_reply(wr, opt, REP_ERR_INVALID, b"malformed meta context request")
                            .await?;
                        continue;
                    };
                    if opt == OPT_SET_META_CONTEXT && !neg.structured {
                        option_reply(
                            wr,
                            opt,
                            REP_ERR_INVALID,
                            b"negotiate structured replies first",
                        )
                        .await?;
                        continue;
                    }
                    // LIST with no queries lists everything; "base:" matches our context.
                    let offer = if opt == OPT_LIST_META_CONTEXT && queries.is_empty() {
                        true
                    } else {
                        queries.iter().any(|q| {
                            q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && q == "base:")
                        })
                    };
                    if opt == OPT_SET_META_CONTEXT {
                        neg.base_allocation = offer;
                    }
                    if offer {
                        let mut d = BytesMut::new();
                        d.put_u32(BASE_ALLOCATION_ID);
                        d.put_slice(BASE_ALLOCATION.as_bytes());
                        option_reply(wr, opt, REP_META_CONTEXT, &d).await?;
                    }
                    option_reply(wr, opt, REP_ACK, &[]).await?;
                }
                other => {
                    debug!(option = other, "unsupported option");
                    option_reply(wr, other, REP_ERR_UNSUP, &[]).await?;
                }
            }
        }
    }

    /// Every `pool/image` the cluster has.
    async fn export_names(&self) -> Vec<String> {
        let map = self.ctx.client().map();
        let mut out = Vec::new();
        for pool in map.pools.values() {
            match Image::list(self.ctx.client(), pool.id).await {
                Ok(names) => out.extend(names.into_iter().map(|n| format!("{}/{n}", pool.name))),
                Err(e) => warn!(pool = %pool.name, "cannot list images: {e}"),
            }
        }
        out
    }
}

fn transmission_flags() -> u16 {
    TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_FAST_ZERO
        | TF_CAN_MULTI_CONN
}

/// The replies to a successful INFO or GO: export size and flags, block sizes, ACK.
async fn send_info(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    opt: u32,
    size: u64,
) -> std::io::Result<()> {
    let mut info = BytesMut::new();
    info.put_u16(INFO_EXPORT);
    info.put_u64(size);
    info.put_u16(transmission_flags());
    option_reply(wr, opt, REP_INFO, &info).await?;
    let mut bs = BytesMut::new();
    bs.put_u16(INFO_BLOCK_SIZE);
    bs.put_u32(1);
    bs.put_u32(4096);
    bs.put_u32(MAX_REQUEST_BYTES);
    option_reply(wr, opt, REP_INFO, &bs).await?;
    option_reply(wr, opt, REP_ACK, &[]).await
}

async fn option_reply(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(REPLY_MAGIC);
    b.put_u32(opt);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    wr.write_all(&b).await
}

/// NBD error number for a store error.
fn errno(e: &StoreError) -> u32 {
    match e.code {
        ErrorCode::InvalidArgument => EINVAL,
        ErrorCode::NoSpace => ENOSPC,
        // Fenced: the write is refused, never silently dropped.
        ErrorCode::Blocklisted => EPERM,
        _ => EIO,
    }
}

enum Reply {
    /// A simple reply (any command), with read data when `error` is 0.
    Simple {
        handle: u64,
        error: u32,
        data: Option<Bytes>,
    },
    /// Structured: the data of a whole read, in one chunk.
    Data {
        handle: u64,
        offset: u64,
        data: Bytes,
    },
    /// Structured: an error.
    Error {
        handle: u64,
        error: u32,
        message: String,
    },
    /// Structured: base:allocation extents as (length, flags).
    BlockStatus {
        handle: u64,
        extents: Vec<(u32, u32)>,
    },
}

fn chunk_header(b: &mut BytesMut, kind: u16, handle: u64, len: usize) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(REPLY_FLAG_DONE);
    b.put_u16(kind);
    b.put_u64(handle);
    b.put_u32(len as u32);
}

impl Reply {
    /// The bytes before any payload, and the payload.
    fn encode(self) -> (BytesMut, Option<Bytes>) {
        let mut b = BytesMut::with_capacity(32);
        match self {
            Reply::Simple {
                handle,
                error,
                data,
            } => {
                b.put_u32(SIMPLE_REPLY_MAGIC);
                b.put_u32(error);
                b.put_u64(handle);
                (b, data)
            }
            Reply::Data {
                handle,
                offset,
                data,
            } => {
                chunk_header(&mut b, REPLY_TYPE_OFFSET_DATA, handle, 8 + data.len());
                b.put_u64(offset);
                (b, Some(data))
            }
            Reply::Error {
                handle,
                error,
                message,
            } => {
                let msg = &message.as_bytes()[..message.len().min(4096)];
                chunk_header(&mut b, REPLY_TYPE_ERROR, handle, 6 + msg.len());
                b.put_u32(error);
                b.put_u16(msg.len() as u16);
                b.put_slice(msg);
                (b, None)
            }
            Reply::BlockStatus { handle, extents } => {
                chunk_header(
                    &mut b,
                    REPLY_TYPE_BLOCK_STATUS,
                    handle,
                    4 + 8 * extents.len(),
                );
                b.put_u32(BASE_ALLOCATION_ID);
                for (len, flags) in extents {
                    b.put_u32(len);
                    b.put_u32(flags);
                }
                (b, None)
            }
        }
    }
}

/// Writes every part, in order, with as few write calls as the socket allows.
async fn write_all_vectored(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    parts: &mut [bytes::Bytes],
) -> std::io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> = parts[first..]
            .iter()
            .take(64)
            .map(|p| std::io::IoSlice::new(p))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let p = &mut parts[first];
            let take = n.min(p.len());
            p.advance(take);
            n -= take;
            if p.is_empty() {
                first += 1;
            }
        }
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}

/// The transmission phase: requests are read in order, served concurrently (bounded), and
/// answered as they complete.
async fn transmission(
    image: Arc<Image>,
    export: &str,
    neg: Negotiated,
    mut rd: BufReader<OwnedReadHalf>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
) -> std::io::Result<()> {
    // Each reply travels with its share of the connection's data budget, released once
    // the reply is written, so unread replies count against the budget too.
    let (tx, mut rx) = mpsc::channel::<(Reply, OwnedSemaphorePermit)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        // Replies already waiting go out together: header and data of each, in order, in
        // one vectored write where the socket takes it.
        let mut parts: Vec<bytes::Bytes> = Vec::new();
        let mut held = Vec::new();
        'replies: while let Some(r) = rx.recv().await {
            // Let the other ready requests finish first (the runtime runs the task a
            // reply just woke before the rest), so their replies share this write.
            tokio::task::yield_now().await;
            parts.clear();
            held.clear();
            let mut next = Some(r);
            while let Some((r, permit)) = next.take() {
                held.push(permit);
                let (head, data) = r.encode();
                parts.push(head.freeze());
                parts.extend(data);
                if parts.len() < 64 {
                    next = rx.try_recv().ok();
                }
            }
            if write_all_vectored(&mut wr, &mut parts).await.is_err() {
                break 'replies;
            }
        }
        let _ = wr.shutdown().await;
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(
        (MAX_CONN_BUFFERED_BYTES / BUFFER_UNIT_BYTES) as usize,
    ));
    let mut mark = store_client::lowat::RecvLowWater::new(rd.get_ref().as_ref());
    loop {
        let mut head = [0u8; REQUEST_HEADER_BYTES];
        rd.read_exact(&mut head).await?;
        let Some(req) = parse_request(&head) else {
            warn!("bad request magic; closing");
            break;
        };
        if req.kind == CMD_DISC {
            debug!("client disconnected");
            break;
        }
        // Taken before the payload is read, so a client cannot make us buffer past it.
        let Ok(held) = budget.clone().acquire_many_owned(req.buffer_units()).await else {
            break;
        };
        let mut payload = None;
        if req.has_payload() {
            if req.len > MAX_REQUEST_BYTES {
                // The data cannot be skipped safely at this size: the stream is lost.
                warn!(
                    len = req.len,
                    "write larger than the advertised maximum; closing"
                );
                break;
            }
            // Read straight into spare capacity: no zeroing of what the socket fills.
            let mut buf = bytes::BytesMut::with_capacity(req.len as usize);
            while buf.len() < req.len as usize {
                // Sleep through the segments of a large payload (SO_RCVLOWAT).
                mark.wake_at(req.len as usize - buf.len())?;
                let mut limited = (&mut rd).take((req.len as usize - buf.len()) as u64);
                if limited.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            mark.wake_at(0)?;
            payload = Some(buf.freeze());
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let image = image.clone();
        let tx = tx.clone();
        let op = image.ops().start(describe(export, &req));
        tokio::spawn(async move {
            let _permit = permit;
            let _op = op;
            let reply = serve(&image, neg, req, payload).await;
            let _ = tx.send((reply, held)).await;
        });
    }
    drop(tx);
    // Outstanding requests finish and are answered before the connection closes.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    let _ = writer.await;
    Ok(())
}

/// A request as SLOW_OPS names it: `nbd write vm-pool/disk0 4096+512`.
fn describe(export: &str, req: &RequestHeader) -> String {
    let what = match req.kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        _ => "request",
    };
    format!("nbd {what} {export} {}+{}", req.offset, req.len)
}

async fn serve(
    image: &Image,
    neg: Negotiated,
    req: RequestHeader,
    payload: Option<Bytes>,
) -> Reply {
    let RequestHeader {
        kind,
        flags,
        handle,
        offset,
        len,
    } = req;
    // With structured replies, reads and block status must answer in chunks; other
    // commands may still use simple replies.
    let structured = neg.structured && matches!(kind, CMD_READ | CMD_BLOCK_STATUS);
    let fail = |error| {
        if structured {
            Reply::Error {
                handle,
                error,
                message: String::new(),
            }
        } else {
            Reply::Simple {
                handle,
                error,
                data: None,
            }
        }
    };
    let ok = |data: Option<Bytes>| match data {
        Some(data) if structured => Reply::Data {
            handle,
            offset,
            data,
        },
        data => Reply::Simple {
            handle,
            error: 0,
            data,
        },
    };
    if let Err(errno) = validate(&req, image.size(), neg.base_allocation) {
        return fail(errno);
    }
    match kind {
        CMD_READ => match image.read(offset, len as u64).await {
            Ok(d) => ok(Some(d)),
            Err(e) => {
                warn!(offset, len, "read failed: {e}");
                fail(errno(&e))
            }
        },
        CMD_WRITE => {
            // Acknowledged writes are durable on every OSD of the acting set: FUA holds.
            match image.write(offset, payload.unwrap_or_default()).await {
                Ok(()) => ok(None),
                Err(e) => {
                    warn!(offset, len, "write failed: {e}");
                    fail(errno(&e))
                }
            }
        }
        // Nothing is cached: every acknowledged write is already durable.
        CMD_FLUSH => ok(None),
        CMD_TRIM | CMD_WRITE_ZEROES => {
            let res = if kind == CMD_WRITE_ZEROES && flags & CMD_FLAG_NO_HOLE != 0 {
                // Allocated zeros were asked for: write them (from a shared zero page).
                image.write_zeroes(offset, u64::from(len)).await
            } else {
                image.discard(offset, len as u64).await
            };
            match res {
                Ok(()) => ok(None),
                Err(e) => {
                    warn!(offset, len, "zeroing failed: {e}");
                    fail(errno(&e))
                }
            }
        }
        // Answer a bounded prefix: the protocol lets a server describe less than asked.
        CMD_BLOCK_STATUS => match image
            .allocation(offset, u64::from(len).min(BLOCK_STATUS_MAX_BYTES))
            .await
        {
            Ok(runs) => {
                let mut extents: Vec<(u32, u32)> = runs
                    .into_iter()
                    .map(|(n, allocated)| {
                        (
                            n as u32,
                            if allocated {
                                0
                            } else {
                                STATE_HOLE | STATE_ZERO
                            },
                        )
                    })
                    .collect();
                if flags & CMD_FLAG_REQ_ONE != 0 {
                    extents.truncate(1);
                }
                extents.truncate(BLOCK_STATUS_MAX_EXTENTS);
                Reply::BlockStatus { handle, extents }
            }
            Err(e) => {
                warn!(offset, len, "block status failed: {e}");
                fail(errno(&e))
            }
        },
        _ => fail(ENOTSUP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_strictly() {
        let mut d = Vec::new();
        d.extend_from_slice(&5u32.to_be_bytes());
        d.extend_from_slice(b"p/img");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&d).as_deref(), Some("p/img"));
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn meta_context_requests_parse_strictly() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"p/i");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            parse_meta_request(&d),
            Some(vec![
                "base:allocation".to_string(),
                "qemu:dirty-bitmap:x".to_string()
            ])
        );
        assert_eq!(parse_meta_request(&d[..d.len() - 1]), None);
        let mut huge = d.clone();
        huge[7..11].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&huge), None);
    }

    #[test]
    fn structured_chunks_are_framed_as_the_protocol_says() {
        let (head, data) = Reply::BlockStatus {
            handle: 9,
            extents: vec![(4096, STATE_HOLE | STATE_ZERO)],
        }
        .encode();
        assert!(data.is_none());
        assert_eq!(&head[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&head[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&head[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&head[8..16], &9u64.to_be_bytes());
        assert_eq!(&head[16..20], &12u32.to_be_bytes());
        assert_eq!(&head[20..24], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(head.len(), 32);
        let (head, data) = Reply::Data {
            handle: 1,
            offset: 512,
            data: Bytes::from_static(b"abc"),
        }
        .encode();
        assert_eq!(&head[16..20], &11u32.to_be_bytes());
        assert_eq!(&head[20..28], &512u64.to_be_bytes());
        assert_eq!(data.as_deref(), Some(&b"abc"[..]));
    }
}
