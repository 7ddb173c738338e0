//! The server side of the frame protocol, shared by the monitor and the OSD: accepting
//! connections, reading request frames (a malformed one closes that connection only), and
//! a reply sink that writes replies and pushes in completion order.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use store_types::wire::{self, Frame, FrameCodec, FrameKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tracing::{warn, Instrument};

/// Accepts connections until the listener fails; each runs `handle` in its own task.
pub async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let span = tracing::debug_span!("conn", %peer);
                tokio::spawn(handle(stream).instrument(span));
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Where replies and pushes for one connection go. Cheap to clone.
#[derive(Clone)]
pub struct Replier {
    tx: mpsc::Sender<Frame>,
}

impl Replier {
    /// Sends a reply to request `tag`; false once the connection is gone.
    pub async fn reply<T: Serialize>(&self, tag: u64, msg: &T) -> bool {
        self.send(FrameKind::Reply, tag, msg).await
    }

    /// Sends a reply from code that cannot wait: queued at once when the connection's
    /// queue has room, else by a task that waits for room (order with other replies does
    /// not matter: each carries its tag). `hold` is released once it is queued.
    pub fn reply_now<T: Serialize, H: Send + 'static>(&self, tag: u64, msg: &T, hold: H) {
        let payload = match wire::encode_payload(msg) {
            Ok(p) => p,
            Err(e) => {
                warn!("cannot encode a reply: {e}");
                return;
            }
        };
        let frame = Frame {
            kind: FrameKind::Reply,
            tag,
            payload,
        };
        match self.tx.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => drop(hold),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(frame).await;
                    drop(hold);
                });
            }
        }
    }

    /// Sends an unsolicited message; false once the connection is gone.
    pub async fn push<T: Serialize>(&self, msg: &T) -> bool {
        self.send(FrameKind::Push, 0, msg).await
    }

    async fn send<T: Serialize>(&self, kind: FrameKind, tag: u64, msg: &T) -> bool {
        match wire::encode_payload(msg) {
            Ok(payload) => self.tx.send(Frame { kind, tag, payload }).await.is_ok(),
            Err(e) => {
                warn!("cannot encode a reply: {e}");
                false
            }
        }
    }

    /// Resolves when the connection's writer has stopped.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// One accepted connection: a request reader and a reply sink.
pub struct ServerConn {
    pub peer: String,
    reader: FramedRead<crate::lowat::LowWaterRead, FrameCodec>,
    replier: Replier,
    writer: JoinHandle<()>,
}

impl ServerConn {
    /// Splits the stream; at most `queue` replies wait for the socket.
    pub fn new(stream: TcpStream, max_frame_bytes: usize, queue: usize) -> ServerConn {
        stream.set_nodelay(true).ok();
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let (rd, wr) = stream.into_split();
        let codec = FrameCodec::new(max_frame_bytes);
        let (tx, mut rx) = mpsc::channel::<Frame>(queue);
        let writer = tokio::spawn(async move {
            let _ = crate::conn::write_frames(wr, codec, &mut rx).await;
        });
        ServerConn {
            peer,
            reader: crate::lowat::frame_reader(rd, max_frame_bytes),
            replier: Replier { tx },
            writer,
        }
    }

    pub fn replier(&self) -> Replier {
        self.replier.clone()
    }

    /// The next request and its tag; None when the peer hung up or sent something that is
    /// not a valid request (logged, and the connection is then closed).
    pub async fn next_request<Req: DeserializeOwned>(&mut self) -> Option<(u64, Req)> {
        let frame = match self.reader.next().await? {
            Ok(f) if f.kind == FrameKind::Request => f,
            Ok(f) => {
                warn!(peer = %self.peer, "closing connection: expected a request frame, got {:?}", f.kind);
                return None;
            }
            Err(e) => {
                warn!(peer = %self.peer, "closing connection: {e}");
                return None;
            }
        };
        // Data regions arrive with their verified block crcs, which the OSD keeps.
        match wire::decode_frame_payload(frame.payload) {
            Ok(req) => Some((frame.tag, req)),
            Err(e) => {
                warn!(peer = %self.peer, "closing connection: undecodable request: {e}");
                None
            }
        }
    }

    /// Lets queued replies drain (bounded), then closes.
    pub async fn finish(self) {
        drop(self.replier);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.writer).await;
    }
}
