//! Write data with the crc32c of each of its 4 KiB blocks, when they are known.
//!
//! A write's data is checksummed once, where it enters the cluster: the frame that carries
//! it holds its block crcs ([`crate::wire`]), the receiving OSD verifies them as the frame
//! arrives, stores them with the blocks and sends them on to its replicas. Without this,
//! a 1 MiB write cost nine crc32c passes over its data (one per frame sent, one per frame
//! received, one per OSD for its blocks); with it, four.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::wire;

/// Bytes, and the crc32c of each [`wire::DATA_BLOCK_BYTES`] block of them from their start (the
/// last block may be shorter) when known. The crcs are right for the bytes by
/// construction: computed from them ([`BlockData::checksummed`]) or verified against them
/// as the frame arrived. Equality and the encoding are the bytes'.
#[derive(Clone, Debug, Default)]
pub struct BlockData {
    bytes: Bytes,
    crcs: Option<Arc<[u32]>>,
}

impl BlockData {
    /// The bytes with their block crcs computed (one pass over them).
    pub fn checksummed(bytes: Bytes) -> Self {
        let crcs = wire::block_crcs(&bytes).into();
        BlockData {
            bytes,
            crcs: Some(crcs),
        }
    }

    /// The bytes with block crcs their caller vouches for, such as a store's for blocks
    /// it has just verified against them (debug builds check them). Crcs of the wrong
    /// count are dropped: they would be computed again where needed.
    pub fn with_block_crcs(bytes: Bytes, crcs: Vec<u32>) -> Self {
        if crcs.len() != bytes.len().div_ceil(wire::DATA_BLOCK_BYTES) {
            debug_assert!(false, "{} crcs for {} bytes", crcs.len(), bytes.len());
            return bytes.into();
        }
        debug_assert_eq!(crcs, wire::block_crcs(&bytes));
        BlockData {
            bytes,
            crcs: Some(crcs.into()),
        }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The crc32c of each block from the start, if known.
    pub fn block_crcs(&self) -> Option<&[u32]> {
        self.crcs.as_deref()
    }
}

impl From<Bytes> for BlockData {
    /// Bytes whose block crcs are not known yet.
    fn from(bytes: Bytes) -> Self {
        BlockData { bytes, crcs: None }
    }
}

impl PartialEq for BlockData {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for BlockData {}

impl std::ops::Deref for BlockData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Encoded as a postcard byte string, like `Bytes`; a large one becomes the frame's data
/// region (see [`wire::encode_payload`]), with these crcs when known.
impl Serialize for BlockData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        wire::serialize_spliced(&self.bytes, self.crcs.as_ref(), s)
    }
}

/// Decoded by [`wire::decode_frame_payload`], a large one is a slice of the frame and, if
/// it was the frame's data region, has the crcs the frame's blocks were verified against.
impl<'de> Deserialize<'de> for BlockData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (bytes, crcs) = d.deserialize_bytes(wire::shared_bytes::SharedVisitor)?;
        debug_assert!(crcs
            .as_deref()
            .is_none_or(|c| c == wire::block_crcs(&bytes)));
        Ok(BlockData { bytes, crcs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        decode_frame_payload, encode_payload, Frame, FrameCodec, FrameKind, DATA_BLOCK_BYTES,
    };
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Msg {
        name: String,
        data: BlockData,
        after: u64,
    }

    fn through_a_frame(msg: &Msg) -> Msg {
        let payload = encode_payload(msg).unwrap();
        let mut wire = BytesMut::new();
        FrameCodec::default()
            .encode(
                Frame {
                    kind: FrameKind::Request,
                    tag: 1,
                    payload,
                },
                &mut wire,
            )
            .unwrap();
        let frame = FrameCodec::default().decode(&mut wire).unwrap().unwrap();
        decode_frame_payload(frame.payload).unwrap()
    }

    #[test]
    fn large_data_arrives_with_its_block_crcs() {
        // Not a whole number of blocks: the last block's crc is over its own bytes.
        let bytes: Bytes = (0..300_000u32)
            .map(|i| (i * 7) as u8)
            .collect::<Vec<_>>()
            .into();
        let sent = Msg {
            name: "rbd_data.1.0".into(),
            data: bytes.clone().into(),
            after: 9,
        };
        let got = through_a_frame(&sent);
        assert_eq!(got, sent);
        assert_eq!(got.data.block_crcs(), Some(&wire::block_crcs(&bytes)[..]));
        // Sent on again with the crcs it came with: the same frame contents.
        assert_eq!(through_a_frame(&got), sent);
    }

    #[test]
    fn small_data_is_inline_and_has_no_crcs() {
        let sent = Msg {
            name: "x".into(),
            data: Bytes::from_static(&[1, 2, 3]).into(),
            after: 0,
        };
        let got = through_a_frame(&sent);
        assert_eq!(got, sent);
        assert_eq!(got.data.block_crcs(), None);
    }

    #[test]
    fn known_crcs_are_sent_as_they_are() {
        let bytes = Bytes::from(vec![3u8; 5 * DATA_BLOCK_BYTES]);
        let data = BlockData::checksummed(bytes);
        let payload = encode_payload(&Msg {
            name: "y".into(),
            data: data.clone(),
            after: 1,
        })
        .unwrap();
        let region = payload.data_region_crcs().unwrap();
        assert!(std::ptr::eq(
            region.as_ptr(),
            data.block_crcs().unwrap().as_ptr()
        ));
    }
}
