//! The frame format every connection speaks, and versioned postcard envelopes.
//!
//! A frame is a fixed 24-byte header followed by a postcard payload:
//!
//! ```text
//! 0      4        6       8            16       20       24
//! | magic | version | kind  |    tag     |  len   |  crc   | payload (len bytes)
//! ```
//!
//! All integers little-endian. `crc` is crc32c over the first 20 header bytes and the payload,
//! so a flipped bit anywhere is caught. `len` is checked against the receiver's bound *before*
//! anything is allocated, so a frame that claims 4 GiB costs nothing. A frame of another
//! `version` is refused with [`WireError::Version`] so mixed releases fail cleanly.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"STOR");
/// Version of the frame format and of every message carried in it.
pub const WIRE_VERSION: u16 = 2;
pub const HEADER_LEN: usize = 24;
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
    pub payload: Bytes,
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
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { max_frame_bytes }
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
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = &src[..HEADER_LEN];
        let magic = h.get_u32_le();
        let version = h.get_u16_le();
        let kind = h.get_u16_le();
        let tag = h.get_u64_le();
        let len = h.get_u32_le() as usize;
        let want = h.get_u32_le();
        if magic != FRAME_MAGIC {
            return Err(WireError::Magic(magic));
        }
        if version != WIRE_VERSION {
            return Err(WireError::Version {
                peer: version,
                ours: WIRE_VERSION,
            });
        }
        let kind = FrameKind::from_u16(kind).ok_or(WireError::Kind(kind))?;
        if len > self.max_frame_bytes {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if src.len() < HEADER_LEN + len {
            // Reserve only what the bounded frame needs.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        let mut crc = crc32c::crc32c(&src[..20]);
        crc = crc32c::crc32c_append(crc, &src[HEADER_LEN..HEADER_LEN + len]);
        if crc != want {
            return Err(WireError::Checksum { got: crc, want });
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len).freeze();
        Ok(Some(Frame { kind, tag, payload }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        let len = frame.payload.len();
        if len > self.max_frame_bytes {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        dst.reserve(HEADER_LEN + len);
        let start = dst.len();
        dst.put_u32_le(FRAME_MAGIC);
        dst.put_u16_le(WIRE_VERSION);
        dst.put_u16_le(frame.kind as u16);
        dst.put_u64_le(frame.tag);
        dst.put_u32_le(len as u32);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&dst[start..start + 20]), &frame.payload);
        dst.put_u32_le(crc);
        dst.extend_from_slice(&frame.payload);
        Ok(())
    }
}

/// Encodes a message as a frame payload.
pub fn encode_payload<T: Serialize>(msg: &T) -> Result<Bytes, WireError> {
    Ok(Bytes::from(postcard::to_stdvec(msg)?))
}

/// Decodes a frame payload; trailing bytes are an error (they mean a framing bug or tampering).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(WireError::Payload(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
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
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Frame {
        Frame {
            kind: FrameKind::Request,
            tag: 7,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn encoded(f: Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(f, &mut buf).unwrap();
        buf
    }

    #[test]
    fn roundtrip_and_partial_input() {
        let buf = encoded(frame(b"hello"));
        let mut codec = FrameCodec::default();
        let mut part = BytesMut::from(&buf[..10]);
        assert!(codec.decode(&mut part).unwrap().is_none());
        let mut full = buf.clone();
        assert_eq!(codec.decode(&mut full).unwrap().unwrap(), frame(b"hello"));
        assert!(full.is_empty());
    }

    #[test]
    fn huge_length_refused_before_allocation() {
        let mut buf = encoded(frame(b"x"));
        buf[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let cap_before = buf.capacity();
        let err = FrameCodec::new(1 << 20).decode(&mut buf).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        assert_eq!(buf.capacity(), cap_before);
    }

    #[test]
    fn flipped_bits_are_caught() {
        let clean = encoded(frame(b"payload bytes"));
        for byte in 0..clean.len() {
            let mut buf = clean.clone();
            buf[byte] ^= 0x10;
            let res = FrameCodec::default().decode(&mut buf);
            // A flip in the length field may make the frame look incomplete: also not accepted.
            assert!(
                !matches!(res, Ok(Some(_))),
                "flip at byte {byte} was accepted"
            );
        }
    }

    #[test]
    fn version_and_kind_checked() {
        let mut buf = encoded(frame(b"x"));
        buf[4..6].copy_from_slice(&9u16.to_le_bytes());
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(WireError::Version { peer: 9, .. })
        ));
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(WireError::Magic(_))
        ));
    }

    #[test]
    fn records_are_versioned() {
        let bytes = encode_record(3, &("a".to_string(), 5u32));
        let back: (String, u32) = decode_record(3, &bytes).unwrap();
        assert_eq!(back, ("a".to_string(), 5));
        assert!(matches!(
            decode_record::<(String, u32)>(4, &bytes),
            Err(RecordError::Version {
                found: 3,
                expected: 4
            })
        ));
        assert!(decode_record::<(String, u32)>(3, &bytes[..1]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_record::<(String, u32)>(3, &trailing).is_err());
    }

    #[test]
    fn payload_rejects_trailing_bytes() {
        let mut p = encode_payload(&42u32).unwrap().to_vec();
        assert_eq!(decode_payload::<u32>(&p).unwrap(), 42);
        p.push(1);
        assert!(decode_payload::<u32>(&p).is_err());
    }
}
