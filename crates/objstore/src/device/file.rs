//! pread/pwrite backend on tokio's blocking pool: the fallback, and the reference the
//! io_uring backend is compared with.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{check_range, open_direct, BlockDevice};
use crate::aligned::AlignedBuf;
use crate::BLOCK_SIZE;

pub struct FileDevice {
    file: Arc<File>,
    blocks: u64,
}

impl FileDevice {
    pub fn open(path: &Path) -> io::Result<FileDevice> {
        let (file, blocks) = open_direct(path)?;
        Ok(FileDevice {
            file: Arc::new(file),
            blocks,
        })
    }
}

fn joined<T>(r: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("I/O task failed: {e}")))?
}

impl BlockDevice for FileDevice {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    async fn read(&self, start: u64, blocks: usize) -> io::Result<AlignedBuf> {
        check_range(start, blocks, self.blocks)?;
        let file = self.file.clone();
        joined(
            tokio::task::spawn_blocking(move || {
                let mut buf = AlignedBuf::zeroed(blocks);
                file.read_exact_at(&mut buf, start * BLOCK_SIZE as u64)?;
                Ok(buf)
            })
            .await,
        )
    }

    async fn write(&self, start: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.pwrite(start, buf, libc::RWF_DSYNC).await
    }

    async fn write_lazy(&self, start: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.pwrite(start, buf, 0).await
    }

    async fn flush(&self) -> io::Result<()> {
        let file = self.file.clone();
        joined(tokio::task::spawn_blocking(move || file.sync_data()).await)
    }
}

impl FileDevice {
    /// pwritev2 with `flags` (RWF_DSYNC: durable on return), whole buffer.
    async fn pwrite(&self, start: u64, buf: AlignedBuf, flags: i32) -> io::Result<AlignedBuf> {
        check_range(start, buf.blocks(), self.blocks)?;
        let file = self.file.clone();
        joined(
            tokio::task::spawn_blocking(move || {
                let iov = libc::iovec {
                    iov_base: buf.as_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
                // SAFETY: `iov` points into `buf`, alive and unmoved for the whole call.
                let n = unsafe {
                    libc::pwritev2(
                        file.as_raw_fd(),
                        &iov,
                        1,
                        (start * BLOCK_SIZE as u64) as libc::off_t,
                        flags,
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                if n as usize != buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short device write: {n} of {} bytes", buf.len()),
                    ));
                }
                Ok(buf)
            })
            .await,
        )
    }
}
