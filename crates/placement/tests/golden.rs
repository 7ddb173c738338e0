//! Frozen vectors. Placement is a protocol: every client, OSD and monitor must compute the
//! same answer forever. These literals were computed once and frozen; if any of these
//! tests fails, the hash, its input encoding, the fixed-point log or the ranking changed,
//! and with it the location of existing data. Do not "update the numbers" — fix the code.

mod common;

use store_placement::{
    log2_fixed, object_hash, object_to_pg, placement_hash, pool_mappings, straw2_draw, PgId,
    PLACEMENT_HASH_SEED,
};
use store_types::map::{FailureDomain, OsdId};
use xxhash_rust::xxh64::xxh64;

#[test]
fn xxh64_itself_is_pinned() {
    // Published reference values of XXH64 (seed 0), independent of this crate.
    assert_eq!(xxh64(b"", 0), 0xef46_db37_51d8_e999);
    assert_eq!(xxh64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
    // And with the placement seed.
    assert_eq!(PLACEMENT_HASH_SEED, 0x6372_7573_685f_7632);
    assert_eq!(
        xxh64(b"store-placement golden", PLACEMENT_HASH_SEED),
        0x8e6f_5e44_2c1d_9465
    );
    assert_eq!(xxh64(b"store-placement golden", 0), 0xbe7f_691c_e2a4_ebb1);
}

#[test]
fn log2_fixed_values() {
    let cases: [(u64, i64); 8] = [
        (0x1, 0),
        (0x3, 6807362106),
        (0xa, 14267572527),
        (0x3e8, 42802717582),
        (0x75bcd15, 115446276782),
        (0xffffffffffff, 206158430207),
        (0x800000003039, 201863462912),
        (0xdeadbeefcafe, 205294367478),
    ];
    for (x, expected) in cases {
        assert_eq!(log2_fixed(x), expected, "log2_fixed({x:#x})");
    }
}

#[test]
fn placement_hash_values() {
    let cases: [((u32, u32, OsdId), u64); 3] = [
        ((0x0, 0x0, 0), 0x99599ad8eb2b92d9),
        ((0x1, 0x2, 3), 0x15d123523c6a957b),
        ((0xdeadbeef, 0x1f, 42), 0xc90f009286fcaae8),
    ];
    for ((pool, seed, osd), expected) in cases {
        assert_eq!(placement_hash(pool, seed, osd), expected);
        // The documented encoding: 12 little-endian bytes, hashed by plain xxh64.
        let mut bytes = [0u8; 12];
        bytes[0..4].copy_from_slice(&pool.to_le_bytes());
        bytes[4..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..12].copy_from_slice(&osd.to_le_bytes());
        assert_eq!(xxh64(&bytes, PLACEMENT_HASH_SEED), expected);
    }
}

#[test]
fn straw2_draw_values() {
    let cases: [((u32, u32, OsdId, u32), i128); 4] = [
        ((3, 5, 9, 0x40000), -104025945597670292717568),
        ((1, 0, 0, 0x10000), -2745477426228504184225792),
        ((7, 31, 42, 0x8000), -2722772772745920636780544),
        ((2, 2748, 1000, 0x18000), -465671790891941603391240),
    ];
    for ((pool, seed, osd, weight), expected) in cases {
        assert_eq!(straw2_draw(pool, seed, osd, weight), expected);
    }
}

#[test]
fn object_hashes() {
    let cases = [
        ("", 0x51d8e999u32),
        ("a", 0xa98c6e5b),
        ("rbd_data.1", 0xae597d71),
        ("hello world", 0xb21e6968),
    ];
    for (name, expected) in cases {
        assert_eq!(object_hash(name), expected, "{name:?}");
    }
}

#[test]
fn object_to_pg_values() {
    let pool = common::pool(3, 3, 20, FailureDomain::Host);
    let long = "x".repeat(100);
    let cases = [
        ("", 9),
        ("a", 11),
        ("rbd_data.1", 17),
        ("rbd_header.abc", 14),
        ("obj-0", 6),
        ("obj-1", 1),
        ("hello world", 8),
        ("rbd_data.5f2a.0000000000000001", 13),
        ("ü", 13),
        (long.as_str(), 4),
    ];
    for (name, seed) in cases {
        assert_eq!(object_to_pg(&pool, name), PgId::new(3, seed), "{name:?}");
    }
}

/// Golden map: see `common::golden_map` (osd.4 out, osd.7 down, osd.10 weight 0).
const HOST_DOMAIN_RAW: [&[OsdId]; 20] = [
    &[6, 1, 9],
    &[8, 9, 2],
    &[9, 2, 8],
    &[5, 2, 11],
    &[5, 6, 0],
    &[8, 9, 2],
    &[3, 9, 6],
    &[7, 9, 2],
    &[5, 2, 6],
    &[0, 9, 5],
    &[3, 11, 8],
    &[5, 9, 6],
    &[2, 9, 5],
    &[0, 9, 5],
    &[0, 9, 6],
    &[9, 2, 6],
    &[9, 0, 3],
    &[1, 9, 5],
    &[2, 5, 9],
    &[1, 5, 9],
];

const OSD_DOMAIN_RAW: [&[OsdId]; 20] = [
    &[9, 3, 0],
    &[7, 5, 6],
    &[6, 5, 8],
    &[11, 0, 2],
    &[2, 5, 1],
    &[6, 8, 7],
    &[6, 5, 9],
    &[5, 3, 9],
    &[2, 11, 3],
    &[3, 5, 11],
    &[9, 5, 7],
    &[8, 3, 5],
    &[5, 3, 2],
    &[9, 2, 5],
    &[0, 9, 1],
    &[5, 9, 3],
    &[5, 7, 2],
    &[6, 0, 9],
    &[5, 0, 9],
    &[2, 5, 6],
];

fn check_golden(pool_id: u32, failure_domain: FailureDomain, expected: &[&[OsdId]; 20]) {
    let map = common::golden_map();
    let pool = common::pool(pool_id, 3, 20, failure_domain);
    let mappings = pool_mappings(&map, &pool);
    for (seed, (mapping, raw)) in mappings.iter().zip(expected).enumerate() {
        assert_eq!(
            &mapping.raw, raw,
            "{failure_domain} pool, PG {pool_id}.{seed:x}"
        );
        // osd.7 is down: a hole in up, and never primary.
        let up: Vec<OsdId> = raw.iter().copied().filter(|&id| id != 7).collect();
        assert_eq!(mapping.up, up);
        assert_eq!(mapping.primary, up.first().copied());
    }
}

#[test]
fn golden_pg_mappings_host_domain() {
    check_golden(3, FailureDomain::Host, &HOST_DOMAIN_RAW);
}

#[test]
fn golden_pg_mappings_osd_domain() {
    check_golden(4, FailureDomain::Osd, &OSD_DOMAIN_RAW);
}
