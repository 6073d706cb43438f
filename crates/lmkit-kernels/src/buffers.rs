//! Buffers for passes that write every element themselves: no zero fill first.

use num_traits::Float;
use rayon::prelude::*;

/// `bias` repeated for `rows` rows: the starting value of a product accumulated onto it.
pub fn rows_of<T: Float + Send + Sync>(bias: &[T], rows: usize) -> Vec<T> {
    let mut out = Box::<[T]>::new_uninit_slice(bias.len() * rows);
    out.par_chunks_mut(bias.len().max(1) * 64)
        .for_each(|block| {
            for row in block.chunks_mut(bias.len().max(1)) {
                for (o, &b) in row.iter_mut().zip(bias) {
                    o.write(b);
                }
            }
        });
    // SAFETY: every element was written just above (each row a copy of `bias`).
    unsafe { out.assume_init() }.into_vec()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_repeat_the_bias() {
        assert_eq!(
            super::rows_of(&[1.0f32, 2.0], 3),
            [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
        );
        assert!(super::rows_of::<f64>(&[], 5).is_empty());
    }
}
