//! The frame format every connection speaks, and versioned postcard envelopes.
//!
//! A frame is a fixed 32-byte header, the crc32c of each 4 KiB block of its data region,
//! then a postcard payload:
//!
//! ```text
//! 0      4        6      8       16     20         24         28     32
//! | magic | version | kind | tag   | len  | data_off | data_len | crc  | block crcs | payload
//! ```
//!
//! All integers little-endian. The payload may hold one *data region*
//! (`data_off..data_off + data_len`, a large data field of the message, see
//! [`shared_bytes`] and [`BlockData`](crate::blockdata::BlockData)): each 4 KiB block of it
//! (the last may be shorter) has its crc32c in the block crc list, 4 bytes each. `crc` is
//! crc32c over the first 28 header bytes, the block crc list and the payload outside the
//! data region, so a flipped bit anywhere is caught, in the region by its block's crc.
//! The block crcs are what an OSD stores with each 4 KiB block, and what a primary sends
//! on to its replicas, so a write's data is checksummed once where it enters the cluster
//! and verified once by each OSD, not on every hop and again for the disk.
//!
//! `len` is checked against the receiver's bound *before* anything is allocated, so a
//! frame that claims 4 GiB costs nothing. A frame of another `version` is refused with
//! [`WireError::Version`] so mixed releases fail cleanly.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_util::codec::{Decoder, Encoder};

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"STOR");
/// Version of the frame format and of every message carried in it.
pub const WIRE_VERSION: u16 = 5;
pub const HEADER_LEN: usize = 32;
/// The block a data region's crc32c list covers: an OSD's block.
pub const DATA_BLOCK_BYTES: usize = 4096;
/// Default bound for control-plane connections (monitors, admin).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;

/// What a frame is, from the sender's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    Request = 1,
    Reply = 2,
    /// Unsolicited message from a server (e.g. a new map for a subscriber).
    Push = 3,
}

impl FrameKind {
    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(FrameKind::Request),
            2 => Some(FrameKind::Reply),
            3 => Some(FrameKind::Push),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    /// Matches a reply to its request; 0 for pushes.
    pub tag: u64,
    pub payload: Payload,
}

/// A frame payload as the buffers it is made of, in order: a received payload is one
/// buffer; an encoded one ([`encode_payload`]) keeps the large data fields of its message
/// as the buffers they already were, between the encoded bytes around them, so they reach
/// the socket without being copied. Never holds an empty part. The first large data field
/// is the frame's data region, with the crc32c of each of its 4 KiB blocks.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    parts: Vec<Bytes>,
    data: Option<DataRegion>,
}

/// Where a payload's data region is, and its blocks' crc32c (verified, or computed from
/// the bytes themselves).
#[derive(Clone, Debug)]
struct DataRegion {
    offset: usize,
    len: usize,
    crcs: Arc<[u32]>,
}

/// Equal when the bytes are, however they are split into parts.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && (self.parts.iter().flat_map(|p| p.iter()))
                .eq(other.parts.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Payload {}

impl Payload {
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The buffers, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The payload as one buffer: free for a single part, a copy otherwise. The data
    /// region's block crcs are dropped: see [`decode_frame_payload`].
    pub fn into_bytes(self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.into_iter().next().unwrap_or_default(),
            _ => {
                let mut out = BytesMut::with_capacity(self.len());
                for p in &self.parts {
                    out.extend_from_slice(p);
                }
                out.freeze()
            }
        }
    }

    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.parts.push(part);
        }
    }

    /// The data region's block crcs, if the payload has one.
    #[cfg(test)]
    pub(crate) fn data_region_crcs(&self) -> Option<&Arc<[u32]>> {
        self.data.as_ref().map(|d| &d.crcs)
    }

    /// (offset, length, block crcs) of the data region; (0, 0, []) without one.
    fn region(&self) -> (usize, usize, &[u32]) {
        match &self.data {
            Some(d) => (d.offset, d.len, &d.crcs),
            None => (0, 0, &[]),
        }
    }

    /// crc32c of the payload's bytes outside its data region, appended to `crc`.
    fn crc_outside_region(&self, mut crc: u32) -> u32 {
        let (off, len, _) = self.region();
        let (skip_from, skip_to) = (off, off + len);
        let mut at = 0;
        for part in &self.parts {
            let (start, end) = (at, at + part.len());
            at = end;
            // The part's bytes before the region, then after it.
            for (a, b) in [(start, end.min(skip_from)), (start.max(skip_to), end)] {
                if a < b {
                    crc = crc32c::crc32c_append(crc, &part[a - start..b - start]);
                }
            }
        }
        crc
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        let mut p = Payload::default();
        p.push(b);
        p
    }
}

/// The crc32c of each [`DATA_BLOCK_BYTES`] block of `data` (the last may be shorter).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(DATA_BLOCK_BYTES).map(crc32c::crc32c).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}: not a store protocol peer")]
    Magic(u32),
    #[error("peer speaks wire version {peer}, this build speaks {ours}: run the same release everywhere")]
    Version { peer: u16, ours: u16 },
    #[error("unknown frame kind {0}")]
    Kind(u16),
    #[error("frame of {len} bytes exceeds the {max} byte bound")]
    TooLarge { len: usize, max: usize },
    #[error("frame checksum mismatch (crc32c {got:#010x}, expected {want:#010x})")]
    Checksum { got: u32, want: u32 },
    #[error("data block {block} of a frame fails its checksum (crc32c {got:#010x}, expected {want:#010x})")]
    DataChecksum { block: usize, got: u32, want: u32 },
    #[error("frame data region {offset}+{len} lies outside its {payload_len}-byte payload")]
    DataRegion {
        offset: usize,
        len: usize,
        payload_len: usize,
    },
    #[error("undecodable payload: {0}")]
    Payload(#[from] postcard::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The stable code for this error.
    pub fn code(&self) -> crate::error::ErrorCode {
        use crate::error::ErrorCode;
        match self {
            WireError::Version { .. } => ErrorCode::VersionMismatch,
            WireError::Io(_) => ErrorCode::Unreachable,
            _ => ErrorCode::Malformed,
        }
    }
}

/// tokio codec for [`Frame`]s with a per-connection size bound.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    max_frame_bytes: usize,
    /// Where the decoder publishes how many bytes the frame it is assembling still lacks
    /// (see [`FrameCodec::with_missing_hint`]).
    missing: Option<Arc<AtomicUsize>>,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec {
            max_frame_bytes,
            missing: None,
        }
    }

    /// After every decode, `hint` holds the number of bytes the current frame still lacks
    /// (0 when a frame was complete). A reader can use it to sleep until a large frame has
    /// arrived rather than wake for every segment of it.
    pub fn with_missing_hint(mut self, hint: Arc<AtomicUsize>) -> Self {
        self.missing = Some(hint);
        self
    }

    fn publish_missing(&self, bytes: usize) {
        if let Some(m) = &self.missing {
            m.store(bytes, Ordering::Relaxed);
        }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        // Magic and version first, as soon as their bytes are there: a peer that speaks
        // something else is refused at once, not once it has sent a whole header's worth.
        check_prefix(src)?;
        if src.len() < HEADER_LEN {
            self.publish_missing(HEADER_LEN - src.len());
            return Ok(None);
        }
        // Magic and version: checked above.
        let mut h = &src[6..HEADER_LEN];
        let kind = h.get_u16_le();
        let tag = h.get_u64_le();
        let len = h.get_u32_le() as usize;
        let data_off = h.get_u32_le() as usize;
        let data_len = h.get_u32_le() as usize;
        let want = h.get_u32_le();
        let kind = FrameKind::from_u16(kind).ok_or(WireError::Kind(kind))?;
        if len > self.max_frame_bytes {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        // Checked before the block crc list's size is trusted: the region lies in the
        // bounded payload, so the list is bounded too.
        if data_off.checked_add(data_len).is_none_or(|end| end > len) {
            return Err(WireError::DataRegion {
                offset: data_off,
                len: data_len,
                payload_len: len,
            });
        }
        let list_bytes = 4 * data_len.div_ceil(DATA_BLOCK_BYTES);
        let total = HEADER_LEN + list_bytes + len;
        if src.len() < total {
            if data_len >= ALIGN_DATA_FROM_BYTES {
                align_region(src, total, HEADER_LEN + list_bytes + data_off);
            } else {
                // Reserve only what the bounded frame needs.
                src.reserve(total - src.len());
            }
            self.publish_missing(total - src.len());
            return Ok(None);
        }
        let list = &src[HEADER_LEN..HEADER_LEN + list_bytes];
        let body = &src[HEADER_LEN + list_bytes..total];
        let mut crc = crc32c::crc32c(&src[..28]);
        if data_len == 0 {
            crc = crc32c::crc32c_append(crc, body);
        } else {
            crc = crc32c::crc32c_append(crc, list);
            crc = crc32c::crc32c_append(crc, &body[..data_off]);
            crc = crc32c::crc32c_append(crc, &body[data_off + data_len..]);
        }
        if crc != want {
            return Err(WireError::Checksum { got: crc, want });
        }
        let region = match data_len {
            0 => None,
            _ => Some(verify_region(list, &body[data_off..data_off + data_len])?),
        };
        self.publish_missing(0);
        src.advance(HEADER_LEN + list_bytes);
        let mut payload: Payload = src.split_to(len).freeze().into();
        payload.data = region.map(|crcs| DataRegion {
            offset: data_off,
            len: data_len,
            crcs,
        });
        Ok(Some(Frame { kind, tag, payload }))
    }
}

/// Checks each block of a data region against its crc in `list` (4 bytes LE each); the
/// crcs, once they all match.
fn verify_region(list: &[u8], region: &[u8]) -> Result<Arc<[u32]>, WireError> {
    let crcs: Arc<[u32]> = list
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for (block, (data, &want)) in region.chunks(DATA_BLOCK_BYTES).zip(crcs.iter()).enumerate() {
        let got = crc32c::crc32c(data);
        if got != want {
            return Err(WireError::DataChecksum { block, got, want });
        }
    }
    Ok(crcs)
}

/// Refuses the start of a frame whose magic or version (as far as it has arrived) is wrong.
fn check_prefix(src: &[u8]) -> Result<(), WireError> {
    if let Some(m) = src.get(..4) {
        let magic = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        if magic != FRAME_MAGIC {
            return Err(WireError::Magic(magic));
        }
    }
    if let Some(v) = src.get(4..6) {
        let version = u16::from_le_bytes([v[0], v[1]]);
        if version != WIRE_VERSION {
            return Err(WireError::Version {
                peer: version,
                ours: WIRE_VERSION,
            });
        }
    }
    Ok(())
}

/// Data regions from this size on are received at a block-aligned address (see
/// [`align_region`]), so that an OSD can hand them to the device (O_DIRECT) as they are
/// instead of copying them into an aligned buffer (7% of all CPU in 1 MiB writes).
pub const ALIGN_DATA_FROM_BYTES: usize = 64 << 10;

/// Gives the incomplete frame at the start of `src` a buffer with room for all its `total`
/// bytes in which its byte `region_at` lies on a [`DATA_BLOCK_BYTES`] boundary. Only the
/// bytes already received are copied (at most one read's worth, as a `reserve` would),
/// once per frame: the rest is read into place.
fn align_region(src: &mut BytesMut, total: usize, region_at: usize) {
    let aligned = (src.as_ptr() as usize + region_at).is_multiple_of(DATA_BLOCK_BYTES);
    if aligned && src.capacity() >= total {
        return;
    }
    let mut fresh = BytesMut::with_capacity(total + DATA_BLOCK_BYTES);
    let at = fresh.as_ptr() as usize + region_at;
    let pad = (DATA_BLOCK_BYTES - at % DATA_BLOCK_BYTES) % DATA_BLOCK_BYTES;
    fresh.resize(pad, 0);
    fresh.advance(pad);
    fresh.extend_from_slice(src);
    *src = fresh;
}

impl FrameCodec {
    /// Appends the header of `frame` and its block crc list to `dst` (the payload is the
    /// caller's to send).
    fn encode_header(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        let len = frame.payload.len();
        if len > self.max_frame_bytes {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        let (data_off, data_len, crcs) = frame.payload.region();
        dst.reserve(HEADER_LEN + 4 * crcs.len());
        let start = dst.len();
        dst.put_u32_le(FRAME_MAGIC);
        dst.put_u16_le(WIRE_VERSION);
        dst.put_u16_le(frame.kind as u16);
        dst.put_u64_le(frame.tag);
        dst.put_u32_le(len as u32);
        dst.put_u32_le(data_off as u32);
        dst.put_u32_le(data_len as u32);
        // The crc goes here, once the list behind it is written.
        dst.put_u32_le(0);
        for c in crcs {
            dst.put_u32_le(*c);
        }
        let crc = crc32c::crc32c(&dst[start..start + 28]);
        let crc = crc32c::crc32c_append(crc, &dst[start + HEADER_LEN..]);
        let crc = frame.payload.crc_outside_region(crc);
        dst[start + 28..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        dst.reserve(HEADER_LEN + frame.payload.len());
        self.encode_header(&frame, dst)?;
        for part in &frame.payload.parts {
            dst.extend_from_slice(part);
        }
        Ok(())
    }
}

/// Payloads from this size on are sent from their own buffers (a vectored write) rather
/// than copied behind their header.
pub const SEND_IN_PLACE_BYTES: usize = 16 << 10;
/// Chunks one [`FrameBatch`] holds at most (the iovec count of one write is bounded too).
const BATCH_MAX_CHUNKS: usize = 64;

/// Encoded frames waiting for one socket write: headers and small payloads copied into one
/// buffer, large payloads kept as the `Bytes` they are (no copy). A [`Buf`] whose
/// `chunks_vectored` lets `write_all_buf` send it all with vectored writes.
#[derive(Default)]
pub struct FrameBatch {
    /// Sealed chunks, in order; `open` follows them.
    chunks: std::collections::VecDeque<Bytes>,
    open: BytesMut,
}

impl FrameBatch {
    /// Adds a frame, or gives it back once the batch is full (an empty batch takes any).
    pub fn push(&mut self, codec: &FrameCodec, frame: Frame) -> Result<Option<Frame>, WireError> {
        // Each part may seal the open buffer and add itself: two chunks per part at most.
        let parts = frame.payload.parts.len();
        if !self.chunks.is_empty() && self.chunks.len() + 2 * parts > BATCH_MAX_CHUNKS {
            return Ok(Some(frame));
        }
        self.open.reserve(HEADER_LEN);
        codec.encode_header(&frame, &mut self.open)?;
        for part in frame.payload.parts {
            if part.len() < SEND_IN_PLACE_BYTES {
                self.open.extend_from_slice(&part);
            } else {
                if !self.open.is_empty() {
                    self.chunks.push_back(self.open.split().freeze());
                }
                self.chunks.push_back(part);
            }
        }
        Ok(None)
    }

    pub fn is_empty(&self) -> bool {
        !self.has_remaining()
    }
}

impl Buf for FrameBatch {
    fn remaining(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum::<usize>() + self.open.len()
    }

    fn chunk(&self) -> &[u8] {
        match self.chunks.iter().find(|c| !c.is_empty()) {
            Some(c) => c,
            None => &self.open,
        }
    }

    fn advance(&mut self, mut cnt: usize) {
        while let Some(front) = self.chunks.front_mut() {
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
        self.open.advance(cnt);
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for c in self
            .chunks
            .iter()
            .map(|c| &c[..])
            .chain(std::iter::once(&self.open[..]))
            .filter(|c| !c.is_empty())
        {
            if n == dst.len() {
                break;
            }
            dst[n] = std::io::IoSlice::new(c);
            n += 1;
        }
        n
    }
}

/// Encodes a message as a frame payload. Its data fields (see [`shared_bytes`] and
/// [`BlockData`](crate::blockdata::BlockData)) of at least [`SEND_IN_PLACE_BYTES`] are not
/// copied: the payload refers to their buffers. The first is the frame's data region, its
/// block crcs taken from the field when it has them, computed here otherwise. The bytes
/// are exactly postcard's encoding of the message.
pub fn encode_payload<T: Serialize>(msg: &T) -> Result<Payload, WireError> {
    Ok(postcard::serialize_with_flavor(
        msg,
        SpliceFlavor::default(),
    )?)
}

/// A data field being serialized, with its block crcs if known.
type SpliceSource = (Bytes, Option<Arc<[u32]>>);

thread_local! {
    /// The data field [`shared_bytes::serialize`] is serializing, for [`SpliceFlavor`] to
    /// refer to instead of copying.
    static SPLICE_SOURCE: std::cell::RefCell<Option<SpliceSource>> = const { std::cell::RefCell::new(None) };
}

/// Serializes `b` as postcard bytes, letting [`SpliceFlavor`] keep it as its own part
/// (and, if it is the first, the data region with `crcs`).
pub(crate) fn serialize_spliced<S: serde::Serializer>(
    b: &Bytes,
    crcs: Option<&Arc<[u32]>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    if b.len() < SEND_IN_PLACE_BYTES {
        return s.serialize_bytes(b);
    }
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            SPLICE_SOURCE.with(|s| s.borrow_mut().take());
        }
    }
    SPLICE_SOURCE.with(|s| *s.borrow_mut() = Some((b.clone(), crcs.cloned())));
    let _clear = Clear;
    s.serialize_bytes(b)
}

/// A postcard output that copies encoded bytes into a buffer, except a slice of the data
/// field being serialized ([`SPLICE_SOURCE`]), which it keeps as a part of its own.
#[derive(Default)]
struct SpliceFlavor {
    payload: Payload,
    open: BytesMut,
}

impl postcard::ser_flavors::Flavor for SpliceFlavor {
    type Output = Payload;

    fn try_push(&mut self, b: u8) -> postcard::Result<()> {
        self.open.put_u8(b);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let spliced = (data.len() >= SEND_IN_PLACE_BYTES)
            .then(|| {
                SPLICE_SOURCE.with(|s| match &*s.borrow() {
                    Some((src, crcs)) if shared_bytes::within(src, data) => {
                        // Known crcs describe the whole field; a slice of it gets its own.
                        let whole = data.len() == src.len();
                        Some((src.slice_ref(data), crcs.clone().filter(|_| whole)))
                    }
                    _ => None,
                })
            })
            .flatten();
        match spliced {
            Some((part, crcs)) => {
                let head = self.open.split().freeze();
                self.payload.push(head);
                if self.payload.data.is_none() {
                    let crcs = crcs.unwrap_or_else(|| block_crcs(&part).into());
                    self.payload.data = Some(DataRegion {
                        offset: self.payload.len(),
                        len: part.len(),
                        crcs,
                    });
                }
                self.payload.push(part);
            }
            None => self.open.extend_from_slice(data),
        }
        Ok(())
    }

    fn finalize(mut self) -> postcard::Result<Payload> {
        let tail = self.open.split().freeze();
        self.payload.push(tail);
        Ok(self.payload)
    }
}

/// Decodes a frame payload; trailing bytes are an error (they mean a framing bug or tampering).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(WireError::Payload(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

/// The payload being decoded by [`decode_frame_payload`]: its bytes, and where its data
/// region is in memory (address, length) with the region's block crcs.
struct SharedSource {
    bytes: Bytes,
    region: Option<(usize, usize, Arc<[u32]>)>,
}

thread_local! {
    /// The payload [`decode_payload_shared`] is decoding: byte fields marked
    /// `#[serde(with = "shared_bytes")]` become slices of it instead of copies.
    static SHARED_SOURCE: std::cell::RefCell<Option<SharedSource>> = const { std::cell::RefCell::new(None) };
}

/// Like [`decode_payload`], but the data fields of the message (see [`shared_bytes`]) share
/// the payload's memory: a 1 MiB write is not copied out of the frame it came in.
pub fn decode_payload_shared<T: DeserializeOwned>(payload: &Bytes) -> Result<T, WireError> {
    decode_with_source(SharedSource {
        bytes: payload.clone(),
        region: None,
    })
}

/// Like [`decode_payload_shared`], for a received frame's payload: the data field that is
/// the frame's data region comes with its verified block crcs
/// ([`BlockData::block_crcs`](crate::blockdata::BlockData::block_crcs)).
pub fn decode_frame_payload<T: DeserializeOwned>(payload: Payload) -> Result<T, WireError> {
    let data = payload.data.clone();
    let bytes = payload.into_bytes();
    let region = data.map(|d| (bytes.as_ptr() as usize + d.offset, d.len, d.crcs));
    decode_with_source(SharedSource { bytes, region })
}

fn decode_with_source<T: DeserializeOwned>(source: SharedSource) -> Result<T, WireError> {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            SHARED_SOURCE.with(|s| s.borrow_mut().take());
        }
    }
    let bytes = source.bytes.clone();
    SHARED_SOURCE.with(|s| *s.borrow_mut() = Some(source));
    let _clear = Clear;
    decode_payload(&bytes)
}

/// The bytes of a data field being decoded: a slice of the payload when large (see
/// [`shared_bytes`]), with the block crcs when it is exactly the frame's data region.
pub(crate) fn shared_field(v: &[u8]) -> (Bytes, Option<Arc<[u32]>>) {
    // Small fields are copied: a slice would pin the connection's whole read buffer for as
    // long as the data lives (a deferred write: until it is on the device), making the
    // reader allocate a new one for every frame.
    if v.len() < SEND_IN_PLACE_BYTES {
        return (Bytes::copy_from_slice(v), None);
    }
    SHARED_SOURCE.with(|s| match &*s.borrow() {
        Some(src) if shared_bytes::within(&src.bytes, v) => {
            let crcs = (src.region.as_ref())
                .filter(|(at, len, _)| *at == v.as_ptr() as usize && *len == v.len())
                .map(|(_, _, crcs)| crcs.clone());
            (src.bytes.slice_ref(v), crcs)
        }
        _ => (Bytes::copy_from_slice(v), None),
    })
}

/// Serde for a `Bytes` field that, decoded by [`decode_payload_shared`], slices the frame's
/// payload. The encoding is exactly `Bytes`'s own (a postcard byte string).
pub mod shared_bytes {
    use bytes::Bytes;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serializes the bytes; [`super::encode_payload`] then refers to `b` rather than
    /// copying it.
    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        super::serialize_spliced(b, None, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Ok(d.deserialize_bytes(SharedVisitor)?.0)
    }

    /// A shared field's bytes and, when they are the frame's data region, its block crcs.
    pub(crate) struct SharedVisitor;

    impl<'de> Visitor<'de> for SharedVisitor {
        type Value = (Bytes, Option<std::sync::Arc<[u32]>>);

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_borrowed_bytes<E: Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
            Ok(super::shared_field(v))
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok((Bytes::copy_from_slice(v), None))
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            Ok((Bytes::from(v), None))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok((Bytes::from(v), None))
        }
    }

    /// Whether `part` lies inside `whole`'s memory (`Bytes::slice_ref` panics otherwise).
    pub(super) fn within(whole: &Bytes, part: &[u8]) -> bool {
        let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
        !part.is_empty() && p >= w && p + part.len() <= w + whole.len()
    }
}

/// Errors of versioned on-disk records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record too short to hold a version tag")]
    Truncated,
    #[error("record has format version {found}, this build reads version {expected}")]
    Version { found: u16, expected: u16 },
    #[error("undecodable record: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encodes an on-disk record as `[version: u16 LE][postcard body]`.
pub fn encode_record<T: Serialize>(version: u16, value: &T) -> Vec<u8> {
    let mut out = version.to_le_bytes().to_vec();
    // Serializing our own plain data types into a Vec cannot fail.
    out.extend(postcard::to_stdvec(value).expect("postcard to Vec is infallible for our types"));
    out
}

/// Decodes a record written by [`encode_record`], refusing other versions.
pub fn decode_record<T: DeserializeOwned>(expected: u16, bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() < 2 {
        return Err(RecordError::Truncated);
    }
    let found = u16::from_le_bytes([bytes[0], bytes[1]]);
    if found != expected {
        return Err(RecordError::Version { found, expected });
    }
    let (value, rest) = postcard::take_from_bytes(&bytes[2..])?;
    if !rest.is_empty() {
        return Err(RecordError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(value)
}

#[cfg(test)]
mod tests;
