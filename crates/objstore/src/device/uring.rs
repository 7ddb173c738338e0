//! io_uring backend: one ring thread per device, fed over a bounded channel.
//!
//! The thread owns the ring and every buffer in flight, so no buffer can be freed or moved
//! while the kernel uses it. Requests queue in the channel (bounded: callers wait when it is
//! full) and up to [`QUEUE_DEPTH`] run at once.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{check_range, open_direct, BlockDevice};
use crate::aligned::AlignedBuf;
use crate::BLOCK_SIZE;

/// Operations in flight in the ring at once.
pub const QUEUE_DEPTH: usize = 64;
/// Requests waiting for the ring thread.
const CHANNEL_DEPTH: usize = 256;

enum Kind {
    Read,
    /// `RWF_DSYNC`: durable on completion.
    Write,
    WriteLazy,
    Fsync,
}

struct Request {
    kind: Kind,
    start: u64,
    buf: AlignedBuf,
    reply: oneshot::Sender<io::Result<AlignedBuf>>,
}

pub struct UringDevice {
    tx: mpsc::Sender<Request>,
    blocks: u64,
}

impl UringDevice {
    pub fn open(path: &Path) -> io::Result<UringDevice> {
        let (file, blocks) = open_direct(path)?;
        let ring = IoUring::new(QUEUE_DEPTH as u32)?;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let name = format!(
            "uring-{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || ring_thread(ring, Arc::new(file), rx))?;
        Ok(UringDevice { tx, blocks })
    }

    async fn submit(&self, kind: Kind, start: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                kind,
                start,
                buf,
                reply,
            })
            .await
            .map_err(|_| io::Error::other("io_uring thread has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("io_uring thread dropped the request"))?
    }
}

impl BlockDevice for UringDevice {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    async fn read(&self, start: u64, blocks: usize) -> io::Result<AlignedBuf> {
        check_range(start, blocks, self.blocks)?;
        self.submit(Kind::Read, start, AlignedBuf::zeroed(blocks))
            .await
    }

    async fn write(&self, start: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        check_range(start, buf.blocks(), self.blocks)?;
        self.submit(Kind::Write, start, buf).await
    }

    async fn write_lazy(&self, start: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        check_range(start, buf.blocks(), self.blocks)?;
        self.submit(Kind::WriteLazy, start, buf).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.submit(Kind::Fsync, 0, AlignedBuf::zeroed(0))
            .await
            .map(|_| ())
    }
}

fn push(ring: &mut IoUring, file: &File, id: u64, req: &mut Request) -> io::Result<()> {
    let fd = types::Fd(file.as_raw_fd());
    let offset = req.start * BLOCK_SIZE as u64;
    let len = req.buf.len() as u32;
    let sqe = match req.kind {
        Kind::Read => opcode::Read::new(fd, req.buf.as_mut_ptr(), len)
            .offset(offset)
            .build(),
        Kind::Write => opcode::Write::new(fd, req.buf.as_ptr(), len)
            .offset(offset)
            .rw_flags(libc::RWF_DSYNC)
            .build(),
        Kind::WriteLazy => opcode::Write::new(fd, req.buf.as_ptr(), len)
            .offset(offset)
            .build(),
        Kind::Fsync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
    .user_data(id);
    // SAFETY: the buffer stays owned by `inflight` (in this thread) until its completion is
    // reaped, so the kernel never sees freed or moved memory.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))
}

fn ring_thread(mut ring: IoUring, file: Arc<File>, mut rx: mpsc::Receiver<Request>) {
    let mut inflight: HashMap<u64, Request> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        // Idle: block for work. Busy: take what is queued without waiting.
        if inflight.is_empty() {
            match rx.blocking_recv() {
                Some(req) => start(&mut ring, &file, &mut inflight, &mut next_id, req),
                None => return,
            }
        }
        while inflight.len() < QUEUE_DEPTH {
            match rx.try_recv() {
                Ok(req) => start(&mut ring, &file, &mut inflight, &mut next_id, req),
                Err(_) => break,
            }
        }
        if inflight.is_empty() {
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            warn!(
                "io_uring submit failed: {e}; failing {} requests",
                inflight.len()
            );
            for (_, req) in inflight.drain() {
                let _ = req.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
            }
            continue;
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in done {
            if let Some(req) = inflight.remove(&id) {
                complete(req, res);
            }
        }
    }
}

fn start(
    ring: &mut IoUring,
    file: &File,
    inflight: &mut HashMap<u64, Request>,
    next_id: &mut u64,
    mut req: Request,
) {
    let id = *next_id;
    *next_id += 1;
    match push(ring, file, id, &mut req) {
        Ok(()) => {
            inflight.insert(id, req);
        }
        Err(e) => {
            let _ = req.reply.send(Err(e));
        }
    }
}

fn complete(req: Request, res: i32) {
    let want = req.buf.len();
    let out = if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else if res as usize != want {
        // Whole-block I/O on a device inside its bounds is never short; treat it as an error
        // rather than retrying into unknown territory.
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "short device I/O: {res} of {want} bytes at block {}",
                req.start
            ),
        ))
    } else {
        Ok(req.buf)
    };
    let _ = req.reply.send(out);
}
