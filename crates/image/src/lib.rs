//! Images: block devices striped over objects of a pool (librbd is the model).
//!
//! An image is a header object `img_header.<name>` (a versioned record: id, size, object
//! size, features) and data objects `<id>.<object number, 16 hex digits>`. Images are thin:
//! a data object exists only once written, and never-written ranges read as zeros.
//! Discarding a range zeroes it in the objects, freeing every whole 4 KiB block.
//!
//! Writes go under the image's exclusive lock ([`lock`]): every write carries the lock
//! generation, and OSDs refuse stale ones. Each open image is a client session, reported to
//! the monitors by its process's [`ImageContext`].
//!
//! This crate knows objects and offsets; it must not know placement, OSDs or storage
//! engines (that is the client library's and the OSDs' business).

#[cfg(test)]
mod golden;
pub mod lock;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};
use store_client::optrack::OpTracker;
use store_client::{MonFanout, ObjectClient};
use store_types::map::{image_data_object, image_lock_key, session_name, SessionId};
use store_types::msg::{MonRequest, SessionInfo};
use store_types::osdmsg::Mutation;
use store_types::wire::{decode_record, encode_record};
use store_types::{ErrorCode, StoreError};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::lock::{LockHandle, LockIdentity};

/// How often open images are reported to the monitors.
const SESSION_HEARTBEAT: Duration = Duration::from_secs(1);

/// A process's images: its object client, how it is named to operators, and its open
/// images (sessions), which it reports to every monitor while they are open.
pub struct ImageContext {
    client: Arc<ObjectClient>,
    desc: String,
    instance: u64,
    lock_wait: Duration,
    sessions: Mutex<HashMap<SessionId, SessionInfo>>,
    report_now: Notify,
    /// The process's operations in hand (a gateway's NBD requests), reported with the
    /// sessions so the monitors raise SLOW_OPS for blocked ones.
    ops: Arc<OpTracker>,
}

impl ImageContext {
    /// `desc` names this process to operators (e.g. `gateway 127.0.0.1:10809 on node1`);
    /// `lock_wait` bounds how long a write waits for the image lock.
    pub fn new(client: Arc<ObjectClient>, desc: String, lock_wait: Duration) -> Arc<Self> {
        let complaint = store_client::optrack::DEFAULT_COMPLAINT;
        Self::with_complaint(client, desc, lock_wait, complaint)
    }

    /// As [`ImageContext::new`], with operations in hand longer than `complaint` reported
    /// as slow (`osd_op_complaint_time`).
    pub fn with_complaint(
        client: Arc<ObjectClient>,
        desc: String,
        lock_wait: Duration,
        complaint: Duration,
    ) -> Arc<Self> {
        let ctx = Arc::new(ImageContext {
            client,
            desc,
            instance: random_u64(),
            lock_wait,
            sessions: Mutex::new(HashMap::new()),
            report_now: Notify::new(),
            ops: OpTracker::new(complaint),
        });
        tokio::spawn(report_sessions(Arc::downgrade(&ctx)));
        ctx
    }

    pub fn client(&self) -> &Arc<ObjectClient> {
        &self.client
    }

    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// Where this process registers the operations it serves (for SLOW_OPS).
    pub fn ops(&self) -> &Arc<OpTracker> {
        &self.ops
    }

    fn register(&self, info: SessionInfo) {
        self.sessions
            .lock()
            .expect("sessions")
            .insert(info.id, info);
        self.report_now.notify_one();
    }

    fn unregister(&self, id: SessionId) {
        self.sessions.lock().expect("sessions").remove(&id);
    }
}

fn random_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Reports the context's open images to every monitor while the context lives (the task
/// holds the context at most one heartbeat interval longer).
async fn report_sessions(ctx: Weak<ImageContext>) {
    let mut fanout = match ctx.upgrade() {
        Some(c) => MonFanout::new(c.client.mons().addrs().to_vec(), SESSION_HEARTBEAT),
        None => return,
    };
    while let Some(c) = ctx.upgrade() {
        let sessions: Vec<SessionInfo> = c
            .sessions
            .lock()
            .expect("sessions")
            .values()
            .cloned()
            .collect();
        if !sessions.is_empty() {
            let map = c.client.map();
            let slow_ops = c.ops.slow_ops();
            if slow_ops.count > 0 {
                warn!(
                    "{}: {} slow ops, oldest {} in hand for {} ms",
                    c.desc, slow_ops.count, slow_ops.oldest, slow_ops.oldest_age_ms
                );
            }
            let req = MonRequest::ClientHeartbeat { sessions, slow_ops };
            fanout.send_all(Some(&map), &req).await;
        }
        let _ = tokio::time::timeout(SESSION_HEARTBEAT, c.report_now.notified()).await;
    }
}

/// The writes that put allocated zeros over `extents`: slices of [`ZEROS`], at most
/// 1 MiB each, so zeroing any length allocates nothing of that length.
fn zero_writes(extents: &[Extent], object: impl Fn(u64) -> String) -> Vec<(String, Mutation)> {
    let mut ops = Vec::new();
    for e in extents {
        let mut at = 0;
        while at < e.len {
            let n = (e.len - at).min(ZEROS.len() as u64);
            let data = Bytes::from_static(&ZEROS[..n as usize]);
            let offset = e.offset_in_object + at;
            ops.push((
                object(e.object_no),
                Mutation::Write {
                    offset,
                    data: data.into(),
                },
            ));
            at += n;
        }
    }
    ops
}

/// Default object size: 4 MiB, as in RBD.
pub const DEFAULT_OBJECT_SIZE: u64 = 4 << 20;

/// The shared source of written zeros (static: it costs no allocation per request).
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
/// Zero-writes of up to 1 MiB each in flight at once for one WRITE_ZEROES.
pub const ZERO_WRITES_IN_FLIGHT: usize = 8;
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

/// An open image: one client session, with its own lock handle.
pub struct Image {
    ctx: Arc<ImageContext>,
    client: Arc<ObjectClient>,
    pool: u32,
    name: String,
    header: Header,
    lock: Arc<LockHandle>,
}

impl Drop for Image {
    fn drop(&mut self) {
        self.ctx.unregister(self.lock.identity().session);
    }
}

/// A write in flight under the lock; tells the lock when it ends, however it ends.
struct WriteTicket<'a>(&'a Arc<LockHandle>);

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        self.0.end_write();
    }
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
        image_data_object(&self.header.id, object_no)
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

    /// Wraps a header as an open image: a new session of `ctx`.
    fn opened(ctx: &Arc<ImageContext>, pool: u32, name: &str, header: Header) -> Image {
        let pool_name = ctx
            .client
            .map()
            .pools
            .get(&pool)
            .map_or(pool.to_string(), |p| p.name.clone());
        let id = LockIdentity {
            session: random_u64(),
            lock_key: image_lock_key(pool, &header.id),
            image: format!("{pool_name}/{name}"),
            desc: ctx.desc.clone(),
            instance: ctx.instance,
        };
        ctx.register(SessionInfo {
            id: id.session,
            image: id.image.clone(),
            desc: ctx.desc.clone(),
            instance: ctx.instance,
        });
        let lock = LockHandle::new(id, ctx.client.clone(), ctx.lock_wait);
        Image {
            ctx: ctx.clone(),
            client: ctx.client.clone(),
            pool,
            name: name.to_string(),
            header,
            lock,
        }
    }

    /// This open's session id.
    pub fn session(&self) -> SessionId {
        self.lock.identity().session
    }

    pub fn lock_state(&self) -> lock::LockState {
        self.lock.state()
    }

    /// Releases the lock if held (the session itself ends when the image is dropped).
    pub async fn close(&self) {
        self.lock.close().await;
    }

    /// Creates an image of `size` bytes.
    pub async fn create(
        ctx: &Arc<ImageContext>,
        pool: u32,
        name: &str,
        size: u64,
    ) -> Result<Image, StoreError> {
        let client = ctx.client.clone();
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
        Ok(Self::opened(ctx, pool, name, header))
    }

    /// Opens an existing image.
    pub async fn open(ctx: &Arc<ImageContext>, pool: u32, name: &str) -> Result<Image, StoreError> {
        let client = &ctx.client;
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
        Ok(Self::opened(ctx, pool, name, header))
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

    /// The process's op tracker (the gateway registers each NBD request in it).
    pub fn ops(&self) -> &Arc<OpTracker> {
        self.ctx.ops()
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
        let read_one = |e: &Extent| {
            let name = self.data_object(e.object_no);
            let (at, n) = (e.offset_in_object, e.len as u32);
            async move {
                match self.client.read(self.pool, &name, at, n).await {
                    Ok(b) => Ok(b),
                    Err(err) if err.code == ErrorCode::NotFound => Ok(Bytes::new()),
                    Err(err) => Err(err),
                }
            }
        };
        if let [e] = extents.as_slice() {
            // Within one object (most reads): the OSD's bytes as they are, padded with
            // zeros only past the object's end.
            let part = read_one(e).await?;
            if part.len() as u64 == len {
                return Ok(part);
            }
            let mut out = BytesMut::zeroed(len as usize);
            out[..part.len()].copy_from_slice(&part);
            return Ok(out.freeze());
        }
        let reads = extents.iter().map(read_one);
        let parts = try_join_all(reads).await?;
        let mut out = BytesMut::zeroed(len as usize);
        for (e, part) in extents.iter().zip(parts) {
            // A short read is the object's end: the rest stays zero.
            let at = e.buf_offset as usize;
            out[at..at + part.len()].copy_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// Which parts of `offset..offset+len` hold data: (length, allocated) runs in order, at
    /// the OSDs' 4 KiB block granularity. Unallocated parts read as zeros.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, StoreError> {
        let extents = self.extents(offset, len)?;
        let maps = try_join_all(extents.iter().map(|e| async move {
            self.client
                .allocated(
                    self.pool,
                    &self.data_object(e.object_no),
                    e.offset_in_object,
                    e.len,
                )
                .await
        }))
        .await?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, allocated: bool| {
            if n == 0 {
                return;
            }
            match runs.last_mut() {
                Some((m, a)) if *a == allocated => *m += n,
                _ => runs.push((n, allocated)),
            }
        };
        for (e, ranges) in extents.iter().zip(maps) {
            let mut at = e.offset_in_object;
            for (o, l) in ranges.unwrap_or_default() {
                push(o.saturating_sub(at), false);
                push(l, true);
                at = o + l;
            }
            push(
                e.offset_in_object + e.len - at.min(e.offset_in_object + e.len),
                false,
            );
        }
        debug_assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), len);
        Ok(runs)
    }

    /// Applies mutations to data objects under the image lock: waits for the lock, sends
    /// each with the lock's generation, and if the lock moved meanwhile (LOCK_LOST), asks
    /// for it back and sends again (writes at offsets are idempotent).
    async fn mutate_locked(&self, ops: Vec<(String, Mutation)>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.ctx.lock_wait;
        loop {
            let guard = self.lock.begin_write().await?;
            let ticket = WriteTicket(&self.lock);
            let res = try_join_all(
                ops.iter()
                    .map(|(obj, m)| self.client.mutate(self.pool, obj, m.clone(), Some(&guard))),
            )
            .await;
            drop(ticket);
            match res {
                Err(e)
                    if e.code == ErrorCode::LockLost && tokio::time::Instant::now() < deadline =>
                {
                    debug!(image = %self.name, session = %session_name(guard.session), "lock moved under a write; asking back: {e}");
                }
                r => return r.map(|_| ()),
            }
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), StoreError> {
        let extents = self.extents(offset, data.len() as u64)?;
        let ops = extents
            .iter()
            .map(|e| {
                let piece = data.slice(e.buf_offset as usize..(e.buf_offset + e.len) as usize);
                (
                    self.data_object(e.object_no),
                    Mutation::Write {
                        offset: e.offset_in_object,
                        data: piece.into(),
                    },
                )
            })
            .collect();
        self.mutate_locked(ops).await
    }

    /// Writes allocated zeros over `offset..offset+len` (NBD's WRITE_ZEROES with NO_HOLE)
    /// without allocating the length: every piece is a slice of one shared zero buffer,
    /// and at most [`ZERO_WRITES_IN_FLIGHT`] pieces are in flight at once, so a 4 GiB
    /// request holds no more memory, here or at the OSDs, than a few MiB of writes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let extents = self.extents(offset, len)?;
        let ops = zero_writes(&extents, |no| self.data_object(no));
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let batch: Vec<_> = ops.by_ref().take(ZERO_WRITES_IN_FLIGHT).collect();
            self.mutate_locked(batch).await?;
        }
        Ok(())
    }

    /// Discards (zeroes) a range: whole objects are removed, parts are zeroed, and every
    /// whole 4 KiB block in the range is freed.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let extents = self.extents(offset, len)?;
        let os = self.header.object_size;
        // Partial objects are zeroed only where they exist (zeroing would create them).
        let plans = try_join_all(extents.iter().map(|e| async move {
            let obj = self.data_object(e.object_no);
            if e.offset_in_object == 0 && e.len == os {
                Ok::<_, StoreError>(Some((obj, Mutation::Delete)))
            } else if self.client.stat(self.pool, &obj).await?.is_some() {
                Ok(Some((
                    obj,
                    Mutation::Zero {
                        offset: e.offset_in_object,
                        len: e.len,
                    },
                )))
            } else {
                Ok(None)
            }
        }))
        .await?;
        self.mutate_locked(plans.into_iter().flatten().collect())
            .await
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

    /// Removes the image and all its data. Refused while another session holds its lock
    /// (a running VM), as `rbd rm` refuses an image with watchers.
    pub async fn remove(self) -> Result<(), StoreError> {
        let map = self.client.map();
        if let Some((h, l)) = map
            .image_locks
            .get(&self.lock.identity().lock_key)
            .and_then(|l| l.holder.map(|h| (h, l)))
            .filter(|(h, _)| *h != self.session() && !map.blocklist.contains_key(h))
        {
            return Err(StoreError::new(
                ErrorCode::NotPermitted,
                format!(
                    "image '{}' is in use: {} ({}) holds its lock; stop that client, or fence it with `storectl client blocklist add {}`",
                    self.name,
                    session_name(h),
                    l.holder_desc,
                    session_name(h)
                ),
            ));
        }
        // Under the image's lock, as `rbd rm` takes it: OSDs refuse unguarded writes to
        // the data objects of an image whose lock a live session holds.
        let n = self.num_objects(self.header.size);
        let names: Vec<String> = (0..n).map(|i| self.data_object(i)).collect();
        for chunk in names.chunks(64) {
            let ops = chunk
                .iter()
                .map(|o| (o.clone(), Mutation::Delete))
                .collect();
            self.mutate_locked(ops).await?;
        }
        self.client
            .delete(self.pool, &header_object(&self.name))
            .await?;
        self.client
            .mons()
            .command(store_types::msg::MapCommand::LockDrop {
                lock_key: self.lock.identity().lock_key.clone(),
                session: self.session(),
            })
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WRITE_ZEROES with NO_HOLE used to allocate the request's whole length (up to 4 GiB
    /// per request, 64 requests per connection); its writes now all point into one static
    /// zero buffer, 1 MiB at most each, and still cover exactly the range.
    #[test]
    fn zero_writes_cover_the_range_without_allocating_it() {
        let extents = [
            Extent {
                object_no: 3,
                offset_in_object: 4096,
                len: (4 << 20) - 4096,
                buf_offset: 0,
            },
            Extent {
                object_no: 4,
                offset_in_object: 0,
                len: 1234,
                buf_offset: (4 << 20) - 4096,
            },
        ];
        let ops = zero_writes(&extents, |no| format!("obj.{no}"));
        let zeros = ZEROS.as_ptr_range();
        let mut covered = Vec::new();
        for (object, m) in &ops {
            let Mutation::Write { offset, data } = m else {
                panic!("{m:?} is not a write");
            };
            let bytes = data.bytes();
            assert!(bytes.len() <= 1 << 20);
            assert!(zeros.contains(&bytes.as_ptr()), "a piece was allocated");
            covered.push((object.clone(), *offset, bytes.len() as u64));
        }
        assert_eq!(covered.len(), 4 + 1);
        assert_eq!(covered[0], ("obj.3".to_string(), 4096, 1 << 20));
        assert_eq!(
            covered[3],
            ("obj.3".to_string(), 4096 + (3 << 20), (1 << 20) - 4096)
        );
        assert_eq!(covered[4], ("obj.4".to_string(), 0, 1234));
    }
}
