//! A multiplexed request/reply connection over the frame protocol.
//!
//! Many requests may be in flight on one connection; replies are matched by tag and may come
//! back in any order. Unsolicited `Push` frames go to a bounded channel. When the connection
//! breaks, every pending request fails at once with the cause.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use store_types::wire::{self, Frame, FrameBatch, FrameCodec, FrameKind, Payload};
use store_types::{ErrorCode, StoreError};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::codec::FramedRead;
use tracing::debug;

/// Requests in flight per connection; more wait for a slot.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Pushes buffered before the reader waits for the consumer.
pub const PUSH_QUEUE: usize = 64;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, StoreError>>>>>;

/// One connection. Cheap to clone; all clones share the socket.
#[derive(Clone)]
pub struct RpcConn {
    addr: String,
    max_frame_bytes: usize,
    out: mpsc::Sender<Frame>,
    pending: Pending,
    next_tag: Arc<AtomicU64>,
    slots: Arc<Semaphore>,
    closed: Arc<Mutex<Option<StoreError>>>,
}

fn unreachable(addr: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::new(ErrorCode::Unreachable, format!("{addr}: {what}"))
}

/// Writes queued frames until the queue closes: every frame already waiting is batched
/// behind the first and the batch goes out in vectored writes, so a burst of small frames
/// costs one write call rather than one each, and large payloads are sent from their own
/// buffers, not copied.
pub(crate) async fn write_frames<W>(
    mut writer: W,
    codec: FrameCodec,
    rx: &mut mpsc::Receiver<Frame>,
) -> Result<(), store_types::wire::WireError>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut batch = FrameBatch::default();
    let mut held: Option<Frame> = None;
    loop {
        let first = match held.take() {
            Some(f) => f,
            None => match rx.recv().await {
                Some(f) => f,
                None => return Ok(()),
            },
        };
        held = batch.push(&codec, first)?;
        // Let the other ready tasks queue their frames first: the runtime runs a task it
        // just woke before the rest (its LIFO slot), so without this the writer would wake
        // for each sender's frame and send them one write call each.
        tokio::task::yield_now().await;
        while held.is_none() {
            match rx.try_recv() {
                Ok(frame) => held = batch.push(&codec, frame)?,
                Err(_) => break,
            }
        }
        writer.write_all_buf(&mut batch).await?;
        writer.flush().await?;
    }
}

impl RpcConn {
    /// Connects with a bounded wait. Returns the connection and its push stream.
    pub async fn connect(
        addr: &str,
        timeout: Duration,
        max_frame_bytes: usize,
    ) -> Result<(RpcConn, mpsc::Receiver<Bytes>), StoreError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                unreachable(
                    addr,
                    format!("connect timed out after {} ms", timeout.as_millis()),
                )
            })?
            .map_err(|e| unreachable(addr, e))?;
        stream.set_nodelay(true).ok();
        let (rd, wr) = stream.into_split();
        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(MAX_IN_FLIGHT);
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let conn = RpcConn {
            addr: addr.to_string(),
            max_frame_bytes,
            out: out_tx,
            pending: Arc::default(),
            next_tag: Arc::new(AtomicU64::new(1)),
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            closed: Arc::default(),
        };
        let codec = FrameCodec::new(max_frame_bytes);
        let on_write_error = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = write_frames(wr, codec, &mut out_rx).await {
                // Everything queued behind the failed frame fails now, not at its timeout.
                let cause = StoreError::new(e.code(), format!("{}: {e}", on_write_error.addr));
                on_write_error.fail_all(cause);
            }
        });
        let reader = crate::lowat::frame_reader(rd, max_frame_bytes);
        tokio::spawn(conn.clone().read_loop(reader, push_tx));
        Ok((conn, push_rx))
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the connection has failed.
    pub fn is_closed(&self) -> bool {
        self.closed.lock().map(|c| c.is_some()).unwrap_or(true) || self.out.is_closed()
    }

    async fn read_loop(
        self,
        mut reader: FramedRead<crate::lowat::LowWaterRead, FrameCodec>,
        push_tx: mpsc::Sender<Bytes>,
    ) {
        let cause = loop {
            match reader.next().await {
                None => break unreachable(&self.addr, "connection closed by peer"),
                Some(Err(e)) => break StoreError::new(e.code(), format!("{}: {e}", self.addr)),
                Some(Ok(frame)) => match frame.kind {
                    FrameKind::Reply => {
                        let waiter = self
                            .pending
                            .lock()
                            .ok()
                            .and_then(|mut p| p.remove(&frame.tag));
                        if let Some(w) = waiter {
                            let _ = w.send(Ok(frame.payload.into_bytes()));
                        }
                    }
                    FrameKind::Push => {
                        if push_tx.send(frame.payload.into_bytes()).await.is_err() {
                            debug!(addr = %self.addr, "push dropped: nobody listens");
                        }
                    }
                    FrameKind::Request => {
                        break StoreError::new(
                            ErrorCode::Malformed,
                            format!("{}: server sent a request frame", self.addr),
                        )
                    }
                },
            }
        };
        self.fail_all(cause);
    }

    fn fail_all(&self, cause: StoreError) {
        if let Ok(mut c) = self.closed.lock() {
            c.get_or_insert(cause.clone());
        }
        let waiters: Vec<_> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => Vec::new(),
        };
        for (_, w) in waiters {
            let _ = w.send(Err(cause.clone()));
        }
    }

    /// Sends a request and waits for its reply, at most `timeout`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, StoreError> {
        let payload = wire::encode_payload(req)
            .map_err(|e| StoreError::internal(format!("encoding request: {e}")))?;
        let bytes = self.call_raw(payload, timeout).await?;
        wire::decode_payload_shared(&bytes).map_err(|e| {
            StoreError::new(e.code(), format!("{}: undecodable reply: {e}", self.addr))
        })
    }

    /// Sends raw payload bytes and waits for the reply's payload.
    pub async fn call_raw(
        &self,
        payload: impl Into<Payload>,
        timeout: Duration,
    ) -> Result<Bytes, StoreError> {
        self.send_raw(payload).await?.wait(timeout).await
    }

    /// Queues a request and returns its pending reply. Requests queued by one task go out
    /// in the order of these calls, so a caller can pipeline ordered requests.
    pub async fn send_raw(&self, payload: impl Into<Payload>) -> Result<PendingReply, StoreError> {
        let payload = payload.into();
        if let Some(cause) = self.closed.lock().ok().and_then(|c| c.clone()) {
            return Err(cause);
        }
        if payload.len() > self.max_frame_bytes {
            return Err(StoreError::invalid(format!(
                "{}: a request of {} bytes exceeds the {} byte frame bound",
                self.addr,
                payload.len(),
                self.max_frame_bytes
            )));
        }
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| unreachable(&self.addr, "connection closed"))?;
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(tag, tx);
        }
        let frame = Frame {
            kind: FrameKind::Request,
            tag,
            payload,
        };
        if self.out.send(frame).await.is_err() {
            self.forget(tag);
            return Err(unreachable(&self.addr, "connection closed"));
        }
        Ok(PendingReply {
            conn: self.clone(),
            tag,
            rx,
            _slot: slot,
        })
    }

    fn forget(&self, tag: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&tag);
        }
    }
}

/// A request on the wire, waiting for its reply.
pub struct PendingReply {
    conn: RpcConn,
    tag: u64,
    rx: oneshot::Receiver<Result<Bytes, StoreError>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl PendingReply {
    /// Waits at most `timeout` for the reply payload.
    pub async fn wait(self, timeout: Duration) -> Result<Bytes, StoreError> {
        match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(unreachable(&self.conn.addr, "connection closed")),
            Err(_) => {
                self.conn.forget(self.tag);
                Err(StoreError::new(
                    ErrorCode::Timeout,
                    format!(
                        "{}: no reply within {} ms",
                        self.conn.addr,
                        timeout.as_millis()
                    ),
                ))
            }
        }
    }

    /// Waits and decodes the reply.
    pub async fn wait_decoded<Resp: DeserializeOwned>(
        self,
        timeout: Duration,
    ) -> Result<Resp, StoreError> {
        let addr = self.conn.addr.clone();
        let bytes = self.wait(timeout).await?;
        wire::decode_payload_shared(&bytes)
            .map_err(|e| StoreError::new(e.code(), format!("{addr}: undecodable reply: {e}")))
    }
}
