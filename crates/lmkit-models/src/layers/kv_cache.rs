//! Key/value cache for incremental decoding: per layer, keys and values of all earlier positions
//! ([batch, kv_heads, seq, head_dim]), extended along the sequence axis.

use candle_core::Tensor;

#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Recurrent models keep, per layer, the last hidden state (and LSTM cell state) instead.
    pub(crate) recurrent: Vec<Option<(Tensor, Option<Tensor>)>>,
    len: usize,
    /// Keys and values are not needed after this pass (training, scoring whole windows): layers
    /// may skip storing them and use attention kernels that never materialise them.
    discard_kv: bool,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            recurrent: vec![None; num_layers],
            len: 0,
            discard_kv: false,
        }
    }

    /// A cache for one pass whose keys and values are not reused (see [`KvCache::discards_kv`]).
    pub fn single_pass(num_layers: usize) -> Self {
        KvCache {
            discard_kv: true,
            ..KvCache::new(num_layers)
        }
    }

    /// Whether this pass's keys and values may be dropped: a fresh [`KvCache::single_pass`] cache.
    pub fn discards_kv(&self) -> bool {
        self.discard_kv && self.len == 0
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds this step's keys/values for `layer` and returns the full ones. The cached length grows
    /// once the last layer has been appended.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            None => (k.clone(), v.clone()),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        if layer + 1 == self.layers.len() {
            self.len = k.dim(2)?;
        }
        Ok((k, v))
    }

    /// Recurrent models: the saved state of `layer` (hidden, and cell for an LSTM), if any.
    pub fn recurrent(&self, layer: usize) -> Option<&(Tensor, Option<Tensor>)> {
        self.recurrent.get(layer).and_then(|s| s.as_ref())
    }

    /// Recurrent models: replaces the saved state of `layer`.
    pub fn set_recurrent(&mut self, layer: usize, h: Tensor, c: Option<Tensor>) {
        if let Some(s) = self.recurrent.get_mut(layer) {
            *s = Some((h, c));
        }
    }

    /// Recurrent models: `n` more positions were read.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.recurrent.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}
