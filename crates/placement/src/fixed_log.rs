//! A deterministic fixed-point base-2 logarithm for the straw2 draw.
//!
//! Placement must give the same answer on every machine and every build forever, so it
//! cannot call `f64::ln`: libm implementations differ in the last bit across platforms and
//! versions, and one flipped comparison moves a PG. Everything here is integer arithmetic.
//!
//! Method: `log2(x) = e + log2(m)` with `e = floor(log2 x)` and the mantissa `m` in `[1, 2)`.
//! `log2(m)` comes from a `2^12 + 1`-entry table (built at compile time with the exact
//! bit-by-bit squaring algorithm) and linear interpolation between neighbouring entries.
//! Interpolation error is at most `2^-24 / (8 ln 2) ≈ 1.1e-8` (≈ 46 units of the Q32
//! result), far below anything that could skew the weighted distribution measurably.

/// Fractional bits of every fixed-point log: values are `log2(x) * 2^32`.
pub const LOG2_FRAC_BITS: u32 = 32;
/// 1.0 in the fixed-point log format.
pub const LOG2_ONE: i64 = 1 << LOG2_FRAC_BITS;

/// log2 of the table size: a 32 KiB table keeps the hot lookup in L1/L2 cache.
const TABLE_BITS: u32 = 12;
const TABLE_LEN: usize = (1 << TABLE_BITS) + 1;

/// Fixed point of the mantissa used while building the table (`1.0 = 2^62`), so that a
/// squared value below 4.0 still fits in a u128.
const MANTISSA_FRAC_BITS: u32 = 62;

/// `LOG2_TABLE[i] = round(log2(1 + i / 2^TABLE_BITS) * 2^32)`; the last entry is exactly 1.0.
static LOG2_TABLE: [u64; TABLE_LEN] = build_table();

const fn build_table() -> [u64; TABLE_LEN] {
    let mut table = [0u64; TABLE_LEN];
    let mut i = 0;
    while i < TABLE_LEN {
        let mantissa =
            (1u128 << MANTISSA_FRAC_BITS) + ((i as u128) << (MANTISSA_FRAC_BITS - TABLE_BITS));
        table[i] = log2_mantissa_bitwise(mantissa);
        i += 1;
    }
    table
}

/// Exact-to-the-last-bit log2 of a mantissa in `[1, 2]` (fixed point, 62 fractional bits),
/// returned with 32 fractional bits, by repeated squaring: squaring `m` doubles its log, so
/// whether `m^2 >= 2` is the next bit of `log2(m)`. Too slow for the hot path (40 u128
/// multiplies), which is why it only builds the table.
const fn log2_mantissa_bitwise(mantissa_q62: u128) -> u64 {
    // Extra bits computed below the result's precision, then rounded away.
    const GUARD_BITS: u32 = 8;
    let two = 2u128 << MANTISSA_FRAC_BITS;
    if mantissa_q62 >= two {
        return 1 << LOG2_FRAC_BITS;
    }
    let mut m = mantissa_q62;
    let mut bits: u64 = 0;
    let mut n = 0;
    while n < LOG2_FRAC_BITS + GUARD_BITS {
        m = (m * m) >> MANTISSA_FRAC_BITS;
        bits <<= 1;
        if m >= two {
            bits |= 1;
            m >>= 1;
        }
        n += 1;
    }
    (bits + (1 << (GUARD_BITS - 1))) >> GUARD_BITS
}

/// `log2(x) * 2^32`, deterministically and without floating point.
///
/// `x = 0` has no logarithm; it is treated as 1 (result 0). The straw2 draw never passes 0.
pub fn log2_fixed(x: u64) -> i64 {
    let x = x.max(1);
    let int_part = 63 - x.leading_zeros();
    // Normalise so the leading one is bit 63; the 63 bits below it are the mantissa fraction.
    let fraction = (x << (63 - int_part)) & !(1u64 << 63);
    let index = (fraction >> (63 - TABLE_BITS)) as usize;
    // The next 32 fraction bits: position between table entries `index` and `index + 1`.
    let between = (fraction >> (63 - TABLE_BITS - 32)) & 0xffff_ffff;
    let low = LOG2_TABLE[index];
    let high = LOG2_TABLE[index + 1];
    // high - low < 2^22 and between < 2^32: the product fits in u64.
    let interpolated = low + (((high - low) * between) >> 32);
    ((int_part as i64) << LOG2_FRAC_BITS) + interpolated as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Max error allowed against f64 (tests may use floats; the mapping may not):
    /// interpolation error bound (≈46 units) plus rounding, in Q32 units.
    const TOLERANCE_Q32: f64 = 64.0;

    fn reference(x: u64) -> f64 {
        (x as f64).log2() * LOG2_ONE as f64
    }

    #[test]
    fn exact_at_powers_of_two() {
        for e in 0..64u32 {
            assert_eq!(log2_fixed(1u64 << e), (e as i64) << 32, "2^{e}");
        }
    }

    #[test]
    fn table_matches_float_reference() {
        for (i, &entry) in LOG2_TABLE.iter().enumerate() {
            let expected = (1.0 + i as f64 / (1u64 << TABLE_BITS) as f64).log2() * LOG2_ONE as f64;
            assert!(
                (entry as f64 - expected).abs() <= 1.0,
                "entry {i}: {entry} vs {expected}"
            );
        }
    }

    #[test]
    fn close_to_float_reference_over_the_straw2_range() {
        // A deterministic spread of 48-bit values, plus the extremes the draw can produce.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut worst = 0.0f64;
        for _ in 0..200_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (x >> 16) + 1;
            worst = worst.max((log2_fixed(u) as f64 - reference(u)).abs());
        }
        for u in [1u64, 2, 3, (1 << 48) - 1, 1 << 48, (1 << 47) + 1] {
            worst = worst.max((log2_fixed(u) as f64 - reference(u)).abs());
        }
        assert!(worst <= TOLERANCE_Q32, "worst error {worst} Q32 units");
    }

    #[test]
    fn monotone_non_decreasing() {
        let mut previous = log2_fixed(1);
        // Dense near the top of the 48-bit range, where the straw2 winners are decided.
        for u in ((1u64 << 48) - 100_000)..=(1u64 << 48) {
            let value = log2_fixed(u);
            assert!(value >= previous, "log2_fixed({u}) decreased");
            previous = value;
        }
    }

    #[test]
    fn zero_is_treated_as_one() {
        assert_eq!(log2_fixed(0), 0);
    }
}
