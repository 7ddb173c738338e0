//! Fewer wake-ups while a large message arrives (`SO_RCVLOWAT`).
//!
//! Loopback and LAN TCP deliver a 1 MiB frame in segments of 64 KiB or less, and a reader
//! that waits on readiness is woken for each: ~16 wake-ups and context switches per MiB
//! per hop, which on a 2-core machine cost more CPU than copying the data. While a reader
//! knows that a large frame is still arriving, it raises the socket's receive low-water
//! mark to the bytes still missing, so the kernel wakes it once the frame is (nearly)
//! there; for anything small the mark is 1, so small frames are never delayed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::codec::FramedRead;

use store_types::wire::FrameCodec;

/// Below this many missing bytes the mark stays at 1: waking per segment costs little then.
pub const LOW_WATER_FROM_BYTES: usize = 128 << 10;
/// The kernel caps the mark at half the largest receive buffer anyway.
const LOW_WATER_MAX_BYTES: usize = 8 << 20;

/// A socket's receive low-water mark, set only when it changes.
#[derive(Debug)]
pub struct RecvLowWater {
    fd: RawFd,
    current_bytes: usize,
}

impl RecvLowWater {
    /// For a connected TCP socket whose mark is the default (1).
    pub fn new(socket: &impl AsRawFd) -> Self {
        RecvLowWater {
            fd: socket.as_raw_fd(),
            current_bytes: 1,
        }
    }

    /// The reader is waiting for `missing_bytes` more: wake it only once they are there if
    /// that is a lot, at the first byte otherwise.
    pub fn wake_at(&mut self, missing_bytes: usize) -> io::Result<()> {
        let want = if missing_bytes >= LOW_WATER_FROM_BYTES {
            missing_bytes.min(LOW_WATER_MAX_BYTES)
        } else {
            1
        };
        if want == self.current_bytes {
            return Ok(());
        }
        let value = want as libc::c_int;
        // SAFETY: `fd` is the open socket this value was made for (the read half that
        // owns it outlives this value), and the option value is a c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // A mark left high could stall small frames: the caller fails the connection.
            return Err(io::Error::last_os_error());
        }
        self.current_bytes = want;
        Ok(())
    }
}

/// A TCP read half whose low-water mark follows what its frame decoder still misses.
pub struct LowWaterRead {
    inner: OwnedReadHalf,
    missing_bytes: Arc<AtomicUsize>,
    mark: RecvLowWater,
}

impl AsyncRead for LowWaterRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this
            .mark
            .wake_at(this.missing_bytes.load(Ordering::Relaxed))
        {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// A frame reader over `rd` that sleeps through the segments of large frames.
pub fn frame_reader(
    rd: OwnedReadHalf,
    max_frame_bytes: usize,
) -> FramedRead<LowWaterRead, FrameCodec> {
    let missing_bytes = Arc::new(AtomicUsize::new(0));
    let codec = FrameCodec::new(max_frame_bytes).with_missing_hint(missing_bytes.clone());
    let mark = RecvLowWater::new(rd.as_ref());
    FramedRead::new(
        LowWaterRead {
            inner: rd,
            missing_bytes,
            mark,
        },
        codec,
    )
}
