use super::*;

fn frame(payload: &[u8]) -> Frame {
    Frame {
        kind: FrameKind::Request,
        tag: 7,
        payload: Bytes::copy_from_slice(payload).into(),
    }
}

fn encoded(f: Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default().encode(f, &mut buf).unwrap();
    buf
}

#[test]
fn a_batch_is_the_frames_encoded_one_after_another() {
    let codec = FrameCodec::default();
    let frames: Vec<Frame> = [&b"a"[..], &[7u8; 100_000][..], b"", &[9u8; 20_000], b"tail"]
        .iter()
        .map(|p| frame(p))
        .collect();
    let mut want = BytesMut::new();
    for f in &frames {
        want.extend_from_slice(&encoded(f.clone()));
    }
    let mut batch = FrameBatch::default();
    for f in frames {
        assert!(batch.push(&codec, f).unwrap().is_none());
    }
    assert_eq!(batch.remaining(), want.len());
    // Drained in uneven steps, through chunk() and chunks_vectored() both.
    let mut got = Vec::new();
    let mut step = 1;
    while batch.has_remaining() {
        let mut slices = [std::io::IoSlice::new(&[]); 3];
        let n = batch.chunks_vectored(&mut slices);
        assert!(n >= 1);
        assert_eq!(&slices[0][..], batch.chunk());
        let take = step.min(batch.chunk().len());
        got.extend_from_slice(&batch.chunk()[..take]);
        batch.advance(take);
        step = step * 3 + 1;
    }
    assert_eq!(got, want);
    assert!(batch.is_empty());
}

#[test]
fn a_spliced_payload_goes_out_as_its_bytes_and_decodes() {
    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Msg {
        name: String,
        #[serde(with = "shared_bytes")]
        data: Bytes,
        after: u64,
    }
    let msg = Msg {
        name: "rbd_data.1".into(),
        data: Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>()),
        after: 77,
    };
    let payload = encode_payload(&msg).unwrap();
    assert_eq!(payload.parts().len(), 3, "head, the data itself, tail");
    assert_eq!(payload.len(), payload.clone().into_bytes().len());
    let f = Frame {
        kind: FrameKind::Reply,
        tag: 11,
        payload,
    };
    // Through a batch (vectored) and through the encoder (copied): the same bytes.
    let mut batch = FrameBatch::default();
    assert!(batch
        .push(&FrameCodec::default(), f.clone())
        .unwrap()
        .is_none());
    let sent = batch.copy_to_bytes(batch.remaining());
    assert_eq!(&sent[..], &encoded(f.clone())[..]);
    let got = FrameCodec::default()
        .decode(&mut BytesMut::from(&sent[..]))
        .unwrap()
        .unwrap();
    let back: Msg = decode_payload_shared(&got.payload.into_bytes()).unwrap();
    assert_eq!(back, msg);
    // A clone in a frame with another header.
    let again = Frame { tag: 12, ..f };
    let got = FrameCodec::default()
        .decode(&mut encoded(again.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(got, again);
}

#[test]
fn a_full_batch_gives_the_frame_back() {
    let codec = FrameCodec::default();
    let mut batch = FrameBatch::default();
    let mut pushed = 0;
    while batch
        .push(&codec, frame(&[1u8; SEND_IN_PLACE_BYTES]))
        .unwrap()
        .is_none()
    {
        pushed += 1;
    }
    assert_eq!(pushed, BATCH_MAX_CHUNKS / 2);
}

#[test]
fn shared_decoding_slices_the_payload_and_encodes_like_bytes() {
    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Msg {
        n: u32,
        #[serde(with = "shared_bytes")]
        data: Bytes,
    }
    let msg = Msg {
        n: 3,
        data: Bytes::from(vec![5u8; 65536]),
    };
    let encoded = encode_payload(&msg).unwrap();
    // The data is not copied: one part of the payload is the field's own buffer.
    assert!(encoded
        .parts()
        .iter()
        .any(|p| std::ptr::eq(p.as_ptr(), msg.data.as_ptr()) && p.len() == msg.data.len()));
    // The same bytes as a plain `Bytes` field would give.
    let payload = encoded.into_bytes();
    assert_eq!(
        payload,
        postcard::to_stdvec(&(3u32, Bytes::from(vec![5u8; 65536]))).unwrap()
    );
    let shared: Msg = decode_payload_shared(&payload).unwrap();
    assert_eq!(shared, msg);
    let at = shared.data.as_ptr() as usize - payload.as_ptr() as usize;
    assert!(at < payload.len(), "the data is a slice of the payload");
    let copied: Msg = decode_payload(&payload).unwrap();
    assert_eq!(copied, msg);
    assert!(!std::ptr::eq(copied.data.as_ptr(), shared.data.as_ptr()));
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
fn the_missing_hint_counts_down_to_a_whole_frame() {
    let hint = Arc::new(AtomicUsize::new(usize::MAX));
    let mut codec = FrameCodec::default().with_missing_hint(hint.clone());
    let buf = encoded(frame(&[7u8; 1000]));
    let mut part = BytesMut::from(&buf[..10]);
    assert!(codec.decode(&mut part).unwrap().is_none());
    assert_eq!(hint.load(Ordering::Relaxed), HEADER_LEN - 10);
    let mut part = BytesMut::from(&buf[..HEADER_LEN + 100]);
    assert!(codec.decode(&mut part).unwrap().is_none());
    assert_eq!(hint.load(Ordering::Relaxed), buf.len() - HEADER_LEN - 100);
    let mut full = buf.clone();
    assert!(codec.decode(&mut full).unwrap().is_some());
    assert_eq!(hint.load(Ordering::Relaxed), 0);
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

/// Flips `mask` in each of `bytes` of an encoded frame in turn: no flip may be
/// accepted (a flip in a length field may make the frame look incomplete: also not
/// accepted).
fn assert_flips_caught(clean: &BytesMut, bytes: impl Iterator<Item = usize>, mask: u8) {
    for byte in bytes {
        let mut buf = clean.clone();
        buf[byte] ^= mask;
        let res = FrameCodec::default().decode(&mut buf);
        assert!(
            !matches!(res, Ok(Some(_))),
            "flip at byte {byte} was accepted"
        );
    }
}

#[test]
fn flipped_bits_are_caught() {
    let clean = encoded(frame(b"payload bytes"));
    assert_flips_caught(&clean, 0..clean.len(), 0x10);
}

/// A frame whose payload has a data region (a spliced field), encoded.
fn frame_with_region() -> (Frame, BytesMut) {
    #[derive(Serialize)]
    struct Msg {
        #[serde(with = "shared_bytes")]
        data: Bytes,
        after: u32,
    }
    let data: Bytes = (0..5 * DATA_BLOCK_BYTES + 100)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let payload = encode_payload(&Msg { data, after: 5 }).unwrap();
    let f = Frame {
        kind: FrameKind::Request,
        tag: 3,
        payload,
    };
    let buf = encoded(f.clone());
    (f, buf)
}

#[test]
fn a_data_region_travels_with_its_block_crcs() {
    let (f, buf) = frame_with_region();
    let (off, len, crcs) = f.payload.region();
    assert_eq!((len, crcs.len()), (5 * DATA_BLOCK_BYTES + 100, 6));
    let payload = f.payload.clone().into_bytes();
    assert_eq!(crcs, &block_crcs(&payload[off..off + len])[..]);
    assert_eq!(buf.len(), HEADER_LEN + 6 * 4 + payload.len());
    let got = FrameCodec::default()
        .decode(&mut buf.clone())
        .unwrap()
        .unwrap();
    assert_eq!(got, f);
    assert_eq!(got.payload.region(), (off, len, crcs));
}

#[test]
fn flipped_bits_in_a_data_region_and_its_crcs_are_caught() {
    let (_, clean) = frame_with_region();
    // Every byte of the header and the crc list, and a spread of the payload's.
    let bytes = (0..HEADER_LEN + 24).chain((HEADER_LEN + 24..clean.len()).step_by(97));
    assert_flips_caught(&clean, bytes, 0x04);
    // A flip inside the region is reported as its block's.
    let mut buf = clean.clone();
    let at = buf.len() - 10;
    buf[at] ^= 1;
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(WireError::DataChecksum { block: 5, .. })
    ));
}

#[test]
fn a_large_data_region_arriving_in_pieces_lands_aligned() {
    #[derive(Serialize)]
    struct Msg {
        name: String,
        #[serde(with = "shared_bytes")]
        data: Bytes,
    }
    let data = Bytes::from(vec![0x5au8; 64 * DATA_BLOCK_BYTES]);
    let payload = encode_payload(&Msg {
        name: "odd-length name".into(),
        data: data.clone(),
    })
    .unwrap();
    let (off, len, _) = payload.region();
    let wire = encoded(Frame {
        kind: FrameKind::Request,
        tag: 1,
        payload,
    });
    // As a socket reader would: a first read of 1000 bytes, then the rest in pieces.
    for misalign in [0usize, 1, 7, 100] {
        let mut codec = FrameCodec::default();
        let mut src = BytesMut::with_capacity(1000 + misalign);
        src.extend_from_slice(&vec![0u8; misalign]);
        src.advance(misalign);
        src.extend_from_slice(&wire[..1000]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        let cap = src.capacity();
        let mut whole = false;
        for piece in wire[1000..].chunks(50_000) {
            let before = src.as_ptr();
            src.extend_from_slice(piece);
            assert_eq!(src.as_ptr(), before, "read in place");
            assert_eq!(src.capacity(), cap);
            if let Some(f) = codec.decode(&mut src).unwrap() {
                let bytes = f.payload.into_bytes();
                assert_eq!(&bytes[off..off + len], &data[..]);
                let at = bytes.as_ptr() as usize + off;
                assert_eq!(at % DATA_BLOCK_BYTES, 0, "region aligned");
                whole = true;
            }
        }
        assert!(whole, "the frame came out once all of it was there");
    }
}

#[test]
fn a_region_outside_the_payload_is_refused_before_allocation() {
    let mut buf = encoded(frame(b"abc"));
    for (off, len) in [(0u32, 4u32), (2, 2), (u32::MAX, 2), (1, u32::MAX)] {
        buf[20..24].copy_from_slice(&off.to_le_bytes());
        buf[24..28].copy_from_slice(&len.to_le_bytes());
        let cap_before = buf.capacity();
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, WireError::DataRegion { .. }), "{err}");
        assert_eq!(buf.capacity(), cap_before);
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
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n"[..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(WireError::Magic(_))
    ));
    // Shorter than a header: refused as soon as the magic, then the version, is there.
    for short in [&b"GET "[..], &b"STOR\x01\x00"[..]] {
        assert!(FrameCodec::default()
            .decode(&mut BytesMut::from(short))
            .is_err());
    }
    assert!(FrameCodec::default()
        .decode(&mut BytesMut::from(&b"STO"[..]))
        .unwrap()
        .is_none());
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
    let mut p = encode_payload(&42u32).unwrap().into_bytes().to_vec();
    assert_eq!(decode_payload::<u32>(&p).unwrap(), 42);
    p.push(1);
    assert!(decode_payload::<u32>(&p).is_err());
}
