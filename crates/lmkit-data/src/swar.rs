//! Eight bytes at a time in a `u64` (little-endian loads): which bytes are zero, below a value,
//! or equal to one — each answer as the high bit of the bytes it holds for.

const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
pub(crate) const HIGH: u64 = 0x8080_8080_8080_8080;
pub(crate) const ONES: u64 = 0x0101_0101_0101_0101;

/// The eight bytes of `b` from `i` (there must be eight).
pub(crate) fn load(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default())
}

/// The zero bytes, exactly (no borrow between bytes).
pub(crate) fn zero(x: u64) -> u64 {
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// The bytes equal to `c`, exactly.
pub(crate) fn equal(x: u64, c: u8) -> u64 {
    zero(x ^ (ONES * u64::from(c)))
}

/// Nonzero when some byte is below `n` (`n` ≤ 0x80); which ones it marks is exact only up to the
/// first, so use it as a yes/no.
pub(crate) fn any_below(x: u64, n: u8) -> u64 {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH
}
