//! Golden bytes of the image header record (`img_header.<name>`): a changed field or field
//! order would make every existing image unreadable. If this fails, the format changed:
//! bump `HEADER_V` (and read the old version) or undo the change.

use super::*;

/// Bytes from hex digits; whitespace is ignored.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    (digits.chunks(2))
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn golden_image_header_record() {
    assert_eq!(HEADER_V, 1);
    assert_eq!(header_object("vm-1"), "img_header.vm-1");
    let header = Header {
        id: "0123456789abcdef".into(),
        size: 10 << 30,
        object_size: DEFAULT_OBJECT_SIZE,
        features: 5,
    };
    // [HEADER_V u16 LE][id][size][object_size][features], postcard.
    let want = "
        01 00
        10 30 31 32 33 34 35 36 37 38 39 61 62 63 64 65 66
        80 80 80 80 28
        80 80 80 02
        05
    ";
    let got = encode_record(HEADER_V, &header);
    assert_eq!(to_hex(&got), to_hex(&hex(want)));
    assert_eq!(
        decode_record::<Header>(HEADER_V, &hex(want)).unwrap(),
        header
    );
}
