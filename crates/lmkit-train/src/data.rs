//! Where batches come from: windows of a token stream (sampled by seed and step, or read in
//! order for recurrent models), or source/target pairs.

use crate::error::{Result, TrainError};
use crate::seq2seq;
use candle_core::{Device, Tensor};
use lmkit_core::rng::{MixChain, Random};
use lmkit_tokenize::TokenDataset;

/// Where batches come from: windows of a token stream, or source/target pairs.
pub(crate) enum Batches<'a> {
    Stream {
        train: Split<'a>,
        val: Option<Split<'a>>,
    },
    Pairs {
        train: Vec<seq2seq::Pair>,
        val: Vec<seq2seq::Pair>,
    },
}

/// Token windows for training or evaluation: a range of the stream, sampled by (seed, step).
pub(crate) struct Split<'a> {
    pub(crate) ds: &'a TokenDataset,
    pub(crate) start: u64,
    pub(crate) len: u64,
}

impl Split<'_> {
    pub(crate) fn batch(
        &self,
        seed: u64,
        batch: usize,
        seq: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let mut rng = MixChain::new(seed);
        let span = self.len - seq as u64 - 1;
        let mut x = Vec::with_capacity(batch * seq);
        let mut y = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let s = self.start + rng.next_u64() % (span + 1);
            let w = self.ds.window(s, seq + 1);
            x.extend_from_slice(&w[..seq]);
            y.extend_from_slice(&w[1..]);
        }
        Ok((
            Tensor::from_vec(x, (batch, seq), dev)?,
            Tensor::from_vec(y, (batch, seq), dev)?,
        ))
    }
}

impl Split<'_> {
    /// Truncated backpropagation through time: row r of every batch reads its own contiguous
    /// stretch of the split, window after window (micro-step `m`), so that the recurrent state
    /// carried from one window continues into the next. `true` when the streams start over.
    pub(crate) fn stream_batch(
        &self,
        m: u64,
        batch: usize,
        seq: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor, bool)> {
        let seg = self.len / batch as u64;
        let per = seg.saturating_sub(1) / seq as u64;
        if per == 0 {
            return Err(TrainError::Data(format!(
                "{} training tokens are too few for {batch} streams of windows of {seq} tokens",
                self.len
            )));
        }
        let k = m % per;
        let mut x = Vec::with_capacity(batch * seq);
        let mut y = Vec::with_capacity(batch * seq);
        for r in 0..batch as u64 {
            let w = self
                .ds
                .window(self.start + r * seg + k * seq as u64, seq + 1);
            x.extend_from_slice(&w[..seq]);
            y.extend_from_slice(&w[1..]);
        }
        Ok((
            Tensor::from_vec(x, (batch, seq), dev)?,
            Tensor::from_vec(y, (batch, seq), dev)?,
            k == 0,
        ))
    }
}
