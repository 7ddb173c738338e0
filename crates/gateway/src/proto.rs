//! The NBD wire format as pure functions: constants, request and option parsing, request
//! validation. No I/O here, so every byte a client can send is fuzzed without sockets
//! (`fuzz/` and the proptests below); the server in `lib.rs` only moves bytes.
//! Reference: the NBD protocol document (NetworkBlockDevice/nbd, doc/proto.md).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 2;
/// Every client flag this server knows.
pub const CLIENT_FLAGS_KNOWN: u32 = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

/// The client flags of a handshake that this server does not know, if any.
pub fn unknown_client_flags(flags: u32) -> Option<u32> {
    let unknown = flags & !CLIENT_FLAGS_KNOWN;
    (unknown != 0).then_some(unknown)
}

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// The one meta context this gateway offers, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// Largest option payload accepted during the handshake.
pub const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Largest read or write request (advertised as the maximum block size).
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;
/// Requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Data a connection's requests in flight may hold at once (write payloads and read
/// replies): with [`MAX_IN_FLIGHT`] alone a client could make one connection hold
/// 64 × 32 MiB. Requests beyond it wait (the client's later requests stay in its socket).
pub const MAX_CONN_BUFFERED_BYTES: u32 = 128 << 20;
/// The unit the per-connection data budget is counted in.
pub const BUFFER_UNIT_BYTES: u32 = 4096;

/// Largest range one BLOCK_STATUS reply describes (a prefix of what was asked).
pub const BLOCK_STATUS_MAX_BYTES: u64 = 256 << 20;
/// Most extents in one BLOCK_STATUS reply.
pub const BLOCK_STATUS_MAX_EXTENTS: usize = 4096;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_BYTES: usize = 28;

/// A transmission-phase request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Whether a payload of `len` bytes follows the header.
    pub fn has_payload(&self) -> bool {
        self.kind == CMD_WRITE
    }

    /// The data this request makes the gateway hold while it is served (its payload, or
    /// its reply's data), in [`BUFFER_UNIT_BYTES`] units; never more than
    /// [`MAX_REQUEST_BYTES`]' worth, since larger reads are refused and larger writes end
    /// the connection. Zeroing, trimming and block status hold no data of their length.
    pub fn buffer_units(&self) -> u32 {
        match self.kind {
            CMD_READ | CMD_WRITE => self.len.min(MAX_REQUEST_BYTES).div_ceil(BUFFER_UNIT_BYTES),
            _ => 0,
        }
    }
}

/// Parses a request header; None when the magic is wrong (the stream is lost).
pub fn parse_request(b: &[u8; REQUEST_HEADER_BYTES]) -> Option<RequestHeader> {
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    (u32_at(0) == REQUEST_MAGIC).then(|| RequestHeader {
        flags: u16_at(4),
        kind: u16_at(6),
        handle: u64_at(8),
        offset: u64_at(16),
        len: u32_at(24),
    })
}

/// Parses an option header (magic, option, length); None when the magic is wrong.
pub fn parse_option_header(b: &[u8; 16]) -> Option<(u32, u32)> {
    let magic = u64::from_be_bytes(b[..8].try_into().ok()?);
    let opt = u32::from_be_bytes(b[8..12].try_into().ok()?);
    let len = u32::from_be_bytes(b[12..16].try_into().ok()?);
    (magic == IHAVEOPT).then_some((opt, len))
}

/// Checks a request against the export before any I/O: the NBD error to answer, if any.
/// Zero-length data requests are refused (`EINVAL`): a structured read reply cannot
/// describe zero bytes, and no client needs them.
pub fn validate(h: &RequestHeader, export_size: u64, base_allocation: bool) -> Result<(), u32> {
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= export_size);
    match h.kind {
        CMD_FLUSH => Ok(()),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS if h.len == 0 => {
            Err(EINVAL)
        }
        CMD_READ if h.len > MAX_REQUEST_BYTES || !in_range => Err(EINVAL),
        CMD_WRITE if h.len > MAX_REQUEST_BYTES => Err(EINVAL),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Err(ENOSPC),
        CMD_TRIM if !in_range => Err(EINVAL),
        CMD_BLOCK_STATUS if !base_allocation || !in_range => Err(EINVAL),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => Ok(()),
        _ => Err(ENOTSUP),
    }
}

/// META_CONTEXT payload: u32 export name length, name, u32 count, count × (u32 length,
/// query). Returns the queries.
pub fn parse_meta_request(data: &[u8]) -> Option<Vec<String>> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let mut at = 4usize.checked_add(len)?;
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    let mut out = Vec::new();
    for _ in 0..n {
        let qlen = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        out.push(String::from_utf8(data.get(at..at.checked_add(qlen)?)?.to_vec()).ok()?);
        at += qlen;
    }
    (at == data.len()).then_some(out)
}

/// INFO/GO payload: u32 name length, name, u16 count, count × u16 info types.
pub fn parse_info_request(data: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    let n = u16::from_be_bytes(data.get(4 + len..6 + len)?.try_into().ok()?) as usize;
    if data.len() != 6 + len + 2 * n {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

/// Runs every parser over arbitrary bytes, as a client could send them: the fuzz target's
/// body. Panics only if a parser breaks its own contract.
pub fn fuzz_one(data: &[u8]) {
    let _ = parse_info_request(data);
    let _ = parse_meta_request(data);
    if let Some(head) = data.first_chunk::<16>() {
        let _ = parse_option_header(head);
    }
    if let Some(head) = data.first_chunk::<REQUEST_HEADER_BYTES>() {
        if let Some(h) = parse_request(head) {
            assert_eq!(&h.encode(), head, "request header round trip");
            let size = data.len() as u64 * 4096;
            if validate(&h, size, data.len().is_multiple_of(2)).is_ok() && h.kind != CMD_FLUSH {
                assert!(h.len > 0 && h.offset + u64::from(h.len) <= size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            fuzz_one(&data);
        }

        #[test]
        fn requests_round_trip_and_validate_in_bounds(
            flags in any::<u16>(), kind in 0u16..10, handle in any::<u64>(),
            offset in any::<u64>(), len in any::<u32>(), size in 0u64..(1 << 40),
        ) {
            let h = RequestHeader { flags, kind, handle, offset, len };
            prop_assert_eq!(parse_request(&h.encode()), Some(h));
            prop_assert!(h.buffer_units() * BUFFER_UNIT_BYTES <= MAX_REQUEST_BYTES);
            if validate(&h, size, true).is_ok() && kind != CMD_FLUSH {
                prop_assert!(len > 0 && offset.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                prop_assert!(kind == CMD_TRIM || kind == CMD_BLOCK_STATUS || kind == CMD_WRITE_ZEROES || len <= MAX_REQUEST_BYTES);
            }
        }
    }

    #[test]
    fn errors_are_the_ones_the_protocol_names() {
        let h = |kind, offset, len| RequestHeader {
            flags: 0,
            kind,
            handle: 1,
            offset,
            len,
        };
        assert_eq!(validate(&h(CMD_READ, 0, 0), 4096, true), Err(EINVAL));
        assert_eq!(validate(&h(CMD_READ, 4096, 1), 4096, true), Err(EINVAL));
        assert_eq!(validate(&h(CMD_WRITE, 4095, 2), 4096, true), Err(ENOSPC));
        assert_eq!(
            validate(&h(CMD_WRITE, u64::MAX, 2), 4096, true),
            Err(ENOSPC)
        );
        assert_eq!(
            validate(&h(CMD_READ, 0, MAX_REQUEST_BYTES + 1), u64::MAX, true),
            Err(EINVAL)
        );
        assert_eq!(
            validate(&h(CMD_BLOCK_STATUS, 0, 1), 4096, false),
            Err(EINVAL)
        );
        assert_eq!(validate(&h(99, 0, 1), 4096, true), Err(ENOTSUP));
        assert_eq!(validate(&h(CMD_FLUSH, 0, 0), 4096, true), Ok(()));
        assert_eq!(validate(&h(CMD_WRITE, 0, 4096), 4096, true), Ok(()));
        let mut bad = h(CMD_READ, 0, 1).encode();
        bad[0] ^= 1;
        assert_eq!(parse_request(&bad), None);
    }
}
