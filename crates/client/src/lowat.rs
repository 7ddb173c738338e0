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
/// A frame reader's buffer, and each new one once frames hold on to it: one `recv` takes
/// every frame waiting (~15 of 4 KiB writes) instead of one or two reads per frame with
/// tokio-util's 8 KiB. 64 KiB is also the most a buffer remembers as its size.
pub const READ_BUFFER_BYTES: usize = 64 << 10;

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
    FramedRead::with_capacity(
        LowWaterRead {
            inner: rd,
            missing_bytes,
            mark,
        },
        codec,
        READ_BUFFER_BYTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use futures::StreamExt;
    use store_types::wire::{Frame, FrameKind, DEFAULT_MAX_FRAME_BYTES};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    /// Frames sent in one burst fill the reader's buffer many times over and straddle its
    /// ends; each must come out whole, in order, with its own bytes.
    #[tokio::test]
    async fn a_burst_of_frames_is_read_whole_and_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Sizes around a 4 KiB write's frame, and some that are not, so that frame ends
        // fall everywhere in a 64 KiB buffer; then a frame larger than the buffer.
        let mut sizes: Vec<usize> = (0..200).map(|i| 4096 + (i * 37) % 900).collect();
        sizes.push(3 * READ_BUFFER_BYTES + 5);
        let payload = |i: usize, len: usize| -> Bytes {
            (0..len)
                .map(|j| (i * 31 + j) as u8)
                .collect::<Vec<u8>>()
                .into()
        };
        let mut wire = BytesMut::new();
        let mut codec = FrameCodec::default();
        for (i, len) in sizes.iter().enumerate() {
            let frame = Frame {
                kind: FrameKind::Request,
                tag: i as u64,
                payload: payload(i, *len).into(),
            };
            codec.encode(frame, &mut wire).unwrap();
        }
        let sender = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&wire).await.unwrap();
            s
        });
        let (socket, _) = listener.accept().await.unwrap();
        let (rd, _wr) = socket.into_split();
        let mut reader = frame_reader(rd, DEFAULT_MAX_FRAME_BYTES);
        for (i, len) in sizes.iter().enumerate() {
            let frame = reader.next().await.unwrap().unwrap();
            assert_eq!(frame.tag, i as u64);
            assert_eq!(frame.payload, payload(i, *len).into(), "frame {i}");
        }
        let _keep_open = sender.await.unwrap();
    }
}
