//! Data devices: a block device or a preallocated file, read and written in whole blocks
//! with O_DIRECT. [`BlockDevice::write`] is durable when it completes (`RWF_DSYNC`), which
//! the store relies on to commit metadata only after the data it points to is on disk;
//! [`BlockDevice::write_lazy`] is not, until a later [`BlockDevice::flush`] (the store's
//! deferred writes, whose data is already durable in the metadata log).
//!
//! Two backends share one trait: [`uring::UringDevice`] (one io_uring thread per device,
//! fed over a bounded channel) for production, and [`file::FileDevice`] (pread/pwrite on
//! the blocking pool) for fallback and simulation. The conformance suite runs on both.

pub mod file;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::aligned::AlignedBuf;
use crate::BLOCK_SIZE;

/// Whole-block I/O on a data device. Offsets are in blocks.
pub trait BlockDevice: Send + Sync + 'static {
    /// Number of blocks on the device.
    fn blocks(&self) -> u64;
    /// Reads `blocks` blocks starting at block `start`.
    fn read(
        &self,
        start: u64,
        blocks: usize,
    ) -> impl Future<Output = io::Result<AlignedBuf>> + Send;
    /// Writes the buffer at block `start`; durable when this returns Ok.
    fn write(
        &self,
        start: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = io::Result<AlignedBuf>> + Send;
    /// Writes the buffer at block `start`: readable when this returns Ok, durable only
    /// after a later [`Self::flush`] returns.
    fn write_lazy(
        &self,
        start: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = io::Result<AlignedBuf>> + Send;
    /// Makes every write that completed before this call durable (fdatasync).
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uring,
    File,
}

/// How a new file-backed device gets its space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileFill {
    /// `fallocate`: instant, but the filesystem keeps the space as unwritten extents and
    /// converts them (a metadata update, synced with the data) on each first write.
    #[default]
    Reserve,
    /// Zeros written over the whole file: slower to create, then every write lands on
    /// initialized space as it would on a block device (what benchmarks want).
    Zeros,
}

/// Creates a file-backed device of `size_bytes` (rounded down to whole blocks) if `path`
/// does not exist. Space is allocated up front so a full filesystem shows now, not later.
pub fn create_file_device(path: &Path, size_bytes: u64, fill: FileFill) -> io::Result<()> {
    let blocks = size_bytes / BLOCK_SIZE as u64;
    if blocks < 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device size {size_bytes} bytes is too small (at least 64 KiB)"),
        ));
    }
    let f = OpenOptions::new().write(true).create_new(true).open(path)?;
    let len = blocks * BLOCK_SIZE as u64;
    // SAFETY: fallocate on an open fd with valid offsets.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    if fill == FileFill::Zeros {
        if let Err(e) = write_zeros(&f, len) {
            drop(f);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    f.sync_all()
}

/// Overwrites `len` bytes of `f` with zeros, in large sequential writes.
fn write_zeros(f: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK_BYTES: u64 = 8 << 20;
    let zeros = vec![0u8; CHUNK_BYTES as usize];
    let mut at = 0;
    while at < len {
        let n = CHUNK_BYTES.min(len - at) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Opens a device (block device or regular file) for O_DIRECT | O_DSYNC I/O and returns it
/// with its size in blocks.
pub fn open_direct(path: &Path) -> io::Result<(File, u64)> {
    let meta = std::fs::metadata(path)?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is neither a block device nor a regular file",
                path.display()
            ),
        ));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let bytes = {
        use std::io::Seek;
        let mut g = &f;
        g.seek(io::SeekFrom::End(0))?
    };
    Ok((f, bytes / BLOCK_SIZE as u64))
}

fn check_range(start: u64, blocks: usize, total: u64) -> io::Result<()> {
    if blocks == 0
        || start
            .checked_add(blocks as u64)
            .is_none_or(|end| end > total)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("block range {start}+{blocks} outside the device ({total} blocks)"),
        ));
    }
    Ok(())
}

/// Either backend, chosen at run time (`osd_io_backend`).
pub enum AnyDevice {
    Uring(uring::UringDevice),
    File(file::FileDevice),
}

impl AnyDevice {
    pub fn open(path: &Path, backend: Backend) -> io::Result<AnyDevice> {
        Ok(match backend {
            Backend::Uring => AnyDevice::Uring(uring::UringDevice::open(path)?),
            Backend::File => AnyDevice::File(file::FileDevice::open(path)?),
        })
    }
}

impl BlockDevice for AnyDevice {
    fn blocks(&self) -> u64 {
        match self {
            AnyDevice::Uring(d) => d.blocks(),
            AnyDevice::File(d) => d.blocks(),
        }
    }

    async fn read(&self, start: u64, blocks: usize) -> io::Result<AlignedBuf> {
        match self {
            AnyDevice::Uring(d) => d.read(start, blocks).await,
            AnyDevice::File(d) => d.read(start, blocks).await,
        }
    }

    async fn write(&self, start: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        match self {
            AnyDevice::Uring(d) => d.write(start, buf).await,
            AnyDevice::File(d) => d.write(start, buf).await,
        }
    }

    async fn write_lazy(&self, start: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        match self {
            AnyDevice::Uring(d) => d.write_lazy(start, buf).await,
            AnyDevice::File(d) => d.write_lazy(start, buf).await,
        }
    }

    async fn flush(&self) -> io::Result<()> {
        match self {
            AnyDevice::Uring(d) => d.flush().await,
            AnyDevice::File(d) => d.flush().await,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(Backend::Uring),
            "file" | "pread" => Ok(Backend::File),
            other => Err(format!(
                "unknown I/O backend '{other}': expected uring or file"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The extent flags `filefrag -v` prints for a file, or None where it cannot tell
    /// (tool missing, or a filesystem without FIEMAP).
    fn extent_flags(path: &Path) -> Option<String> {
        let out = std::process::Command::new("filefrag")
            .arg("-v")
            .arg(path)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("ext:")).then_some(text)
    }

    #[test]
    fn zero_fill_leaves_no_unwritten_extents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reserved = dir.path().join("reserved");
        let zeroed = dir.path().join("zeroed");
        create_file_device(&reserved, 8 << 20, FileFill::Reserve).expect("reserve");
        create_file_device(&zeroed, 8 << 20, FileFill::Zeros).expect("zeros");
        for p in [&reserved, &zeroed] {
            assert_eq!(std::fs::metadata(p).expect("stat").len(), 8 << 20);
        }
        let data = std::fs::read(&zeroed).expect("read");
        assert!(data.iter().all(|b| *b == 0));
        let (Some(r), Some(z)) = (extent_flags(&reserved), extent_flags(&zeroed)) else {
            eprintln!("filefrag cannot show extents here: flags not checked");
            return;
        };
        if r.contains("unwritten") {
            assert!(
                !z.contains("unwritten"),
                "zero-filled file still has unwritten extents:\n{z}"
            );
        }
        // An existing path is never overwritten.
        assert!(create_file_device(&zeroed, 8 << 20, FileFill::Zeros).is_err());
    }
}
