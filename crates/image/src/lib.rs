//! Images: block devices striped over objects of a pool (librbd is the model).
//!
//! An image is a header object `img_header.<name>` (a versioned record: id, size, object
//! size, features) and data objects `<id>.<object number, 16 hex digits>`. Images are thin:
//! a data object exists only once written, and never-written ranges read as zeros.
//! Discarding a range zeroes it in the objects, freeing every whole 4 KiB block.
//!
//! This crate knows objects and offsets; it must not know placement, OSDs or storage
//! engines (that is the client library's and the OSDs' business).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};
use store_client::ObjectClient;
use store_types::wire::{decode_record, encode_record};
use store_types::{ErrorCode, StoreError};

/// Default object size: 4 MiB, as in RBD.
pub const DEFAULT_OBJECT_SIZE: u64 = 4 << 20;
const HEADER_PREFIX: &str = "img_header.";
const HEADER_V: u16 = 1;
/// Largest image: 1 PiB.
pub const MAX_IMAGE_BYTES: u64 = 1 << 50;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Stable id; data objects are named after it, so a rename would not move data.
    pub id: String,
    pub size: u64,
    pub object_size: u64,
    /// Feature bits (none defined yet; reserved so the format need not change).
    pub features: u64,
}

/// An open image.
pub struct Image {
    client: Arc<ObjectClient>,
    pool: u32,
    name: String,
    header: Header,
}

fn header_object(name: &str) -> String {
    format!("{HEADER_PREFIX}{name}")
}

/// Image names: what an NBD export name (`pool/image`) and a log line carry safely.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "invalid image name '{name}': use 1-200 of [A-Za-z0-9._-]"
        )))
    }
}

fn check_size(size: u64) -> Result<(), StoreError> {
    if size == 0 || size > MAX_IMAGE_BYTES {
        return Err(StoreError::invalid(format!(
            "image size {size} is out of range (1 byte to 1 PiB)"
        )));
    }
    Ok(())
}

/// A piece of an image I/O that falls in one data object.
struct Extent {
    object_no: u64,
    offset_in_object: u64,
    len: u64,
    /// Where the piece starts in the caller's buffer.
    buf_offset: u64,
}

impl Image {
    fn data_object(&self, object_no: u64) -> String {
        format!("{}.{object_no:016x}", self.header.id)
    }

    async fn write_header(
        client: &ObjectClient,
        pool: u32,
        name: &str,
        h: &Header,
    ) -> Result<(), StoreError> {
        let obj = header_object(name);
        // Replace the header whole: remove, then write (a header is a few dozen bytes).
        client.delete(pool, &obj).await?;
        client
            .write(pool, &obj, 0, Bytes::from(encode_record(HEADER_V, h)))
            .await
            .map(|_| ())
    }

    /// Creates an image of `size` bytes.
    pub async fn create(
        client: Arc<ObjectClient>,
        pool: u32,
        name: &str,
        size: u64,
    ) -> Result<Image, StoreError> {
        validate_name(name)?;
        check_size(size)?;
        if client.stat(pool, &header_object(name)).await?.is_some() {
            return Err(StoreError::new(
                ErrorCode::AlreadyExists,
                format!("image '{name}' already exists"),
            ));
        }
        let header = Header {
            id: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
            size,
            object_size: DEFAULT_OBJECT_SIZE,
            features: 0,
        };
        Self::write_header(&client, pool, name, &header).await?;
        Ok(Image {
            client,
            pool,
            name: name.to_string(),
            header,
        })
    }

    /// Opens an existing image.
    pub async fn open(
        client: Arc<ObjectClient>,
        pool: u32,
        name: &str,
    ) -> Result<Image, StoreError> {
        validate_name(name)?;
        let obj = header_object(name);
        let not_found = || StoreError::not_found(format!("image '{name}' does not exist"));
        let st = client.stat(pool, &obj).await?.ok_or_else(not_found)?;
        let bytes = client.read(pool, &obj, 0, st.size as u32).await?;
        let header: Header = decode_record(HEADER_V, &bytes).map_err(|e| {
            StoreError::new(ErrorCode::Corrupt, format!("image '{name}' header: {e}"))
        })?;
        if header.object_size == 0 || !header.object_size.is_power_of_two() {
            return Err(StoreError::new(
                ErrorCode::Corrupt,
                format!(
                    "image '{name}' header has object size {}",
                    header.object_size
                ),
            ));
        }
        Ok(Image {
            client,
            pool,
            name: name.to_string(),
            header,
        })
    }

    /// Names of the pool's images.
    pub async fn list(client: &ObjectClient, pool: u32) -> Result<Vec<String>, StoreError> {
        Ok(client
            .list(pool)
            .await?
            .into_iter()
            .filter_map(|o| o.strip_prefix(HEADER_PREFIX).map(String::from))
            .collect())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn size(&self) -> u64 {
        self.header.size
    }

    fn num_objects(&self, size: u64) -> u64 {
        size.div_ceil(self.header.object_size)
    }

    /// Splits `offset..offset+len` into per-object extents, refusing ranges past the end.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StoreError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.header.size)
        {
            return Err(StoreError::invalid(format!(
                "range {offset}+{len} is beyond the end of image '{}' ({} bytes)",
                self.name, self.header.size
            )));
        }
        let os = self.header.object_size;
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let in_obj = at % os;
            let n = (os - in_obj).min(offset + len - at);
            out.push(Extent {
                object_no: at / os,
                offset_in_object: in_obj,
                len: n,
                buf_offset: at - offset,
            });
            at += n;
        }
        Ok(out)
    }

    /// Reads `len` bytes at `offset`; never-written ranges are zeros.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let extents = self.extents(offset, len)?;
        let reads = extents.iter().map(|e| async move {
            match self
                .client
                .read(
                    self.pool,
                    &self.data_object(e.object_no),
                    e.offset_in_object,
                    e.len as u32,
                )
                .await
            {
                Ok(b) => Ok(b),
                Err(err) if err.code == ErrorCode::NotFound => Ok(Bytes::new()),
                Err(err) => Err(err),
            }
        });
        let parts = try_join_all(reads).await?;
        let mut out = BytesMut::zeroed(len as usize);
        for (e, part) in extents.iter().zip(parts) {
            // A short read is the object's end: the rest stays zero.
            let at = e.buf_offset as usize;
            out[at..at + part.len()].copy_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// Which parts of `offset..offset+len` hold data: (length, allocated) runs in order. A
    /// data object that does not exist is a hole (reads as zeros); an existing one counts as
    /// data as a whole (its own holes are not reported).
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, StoreError> {
        let extents = self.extents(offset, len)?;
        let stats = try_join_all(extents.iter().map(|e| async move {
            self.client
                .stat(self.pool, &self.data_object(e.object_no))
                .await
                .map(|s| s.is_some())
        }))
        .await?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        for (e, allocated) in extents.iter().zip(stats) {
            match runs.last_mut() {
                Some((n, a)) if *a == allocated => *n += e.len,
                _ => runs.push((e.len, allocated)),
            }
        }
        Ok(runs)
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), StoreError> {
        let extents = self.extents(offset, data.len() as u64)?;
        let writes = extents.iter().map(|e| {
            let piece = data.slice(e.buf_offset as usize..(e.buf_offset + e.len) as usize);
            let obj = self.data_object(e.object_no);
            async move {
                self.client
                    .write(self.pool, &obj, e.offset_in_object, piece)
                    .await
            }
        });
        try_join_all(writes).await.map(|_| ())
    }

    /// Discards (zeroes) a range: whole objects are removed, parts are zeroed, and every
    /// whole 4 KiB block in the range is freed.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let extents = self.extents(offset, len)?;
        let os = self.header.object_size;
        let ops = extents.iter().map(|e| async move {
            let obj = self.data_object(e.object_no);
            if e.offset_in_object == 0 && e.len == os {
                self.client.delete(self.pool, &obj).await
            } else if self.client.stat(self.pool, &obj).await?.is_some() {
                self.client
                    .zero(self.pool, &obj, e.offset_in_object, e.len)
                    .await
                    .map(|_| ())
            } else {
                Ok(())
            }
        });
        try_join_all(ops).await.map(|_| ())
    }

    /// Grows, or (with `allow_shrink`) shrinks the image. Shrinking drops the data beyond
    /// the new end.
    pub async fn resize(&mut self, new_size: u64, allow_shrink: bool) -> Result<(), StoreError> {
        check_size(new_size)?;
        if new_size < self.header.size {
            if !allow_shrink {
                return Err(StoreError::new(
                    ErrorCode::NotPermitted,
                    format!(
                        "shrinking image '{}' from {} to {new_size} bytes destroys data: pass --allow-shrink",
                        self.name, self.header.size
                    ),
                ));
            }
            // Drop the tail first, then the header shrinks: a failure leaves a bigger image
            // with zeros, never a smaller one with stale data past its old end.
            self.discard(new_size, self.header.size - new_size).await?;
        }
        let mut h = self.header.clone();
        h.size = new_size;
        Self::write_header(&self.client, self.pool, &self.name, &h).await?;
        self.header = h;
        Ok(())
    }

    /// Removes the image and all its data.
    pub async fn remove(self) -> Result<(), StoreError> {
        let n = self.num_objects(self.header.size);
        let names: Vec<String> = (0..n).map(|i| self.data_object(i)).collect();
        for chunk in names.chunks(64) {
            try_join_all(chunk.iter().map(|o| self.client.delete(self.pool, o))).await?;
        }
        self.client
            .delete(self.pool, &header_object(&self.name))
            .await
    }
}
