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

/// The bytes below `n` (`n` ≤ 0x80): the lowest mark is exact, later ones may not be (a borrow
/// runs on from a marked byte).
pub(crate) fn any_below(x: u64, n: u8) -> u64 {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH
}

/// The first index from `i` whose byte `hit` marks, found eight bytes at a time by `mask`
/// (which marks the same bytes, the lowest mark exactly); `b.len()` when there is none.
pub(crate) fn find(
    b: &[u8],
    mut i: usize,
    mask: impl Fn(u64) -> u64,
    hit: impl Fn(u8) -> bool,
) -> usize {
    while i + 8 <= b.len() {
        let m = mask(load(b, i));
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    b[i..]
        .iter()
        .position(|&c| hit(c))
        .map_or(b.len(), |k| i + k)
}

/// The bytes a JSON string must escape (controls, quotes, backslashes).
pub(crate) fn json_special(w: u64) -> u64 {
    any_below(w, 0x20) | equal(w, b'"') | equal(w, b'\\')
}

/// [`json_special`] for one byte.
pub(crate) fn is_json_special(c: u8) -> bool {
    c < 0x20 || c == b'"' || c == b'\\'
}
