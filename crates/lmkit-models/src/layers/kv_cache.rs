//! Key/value cache for incremental decoding: per layer, keys and values of all earlier positions
//! ([batch, kv_heads, seq, head_dim]) in buffers allocated ahead (capacity doubling, up to the
//! length the sequence can reach where that is known: [`KvCache::reserve`]), so that a decoding
//! step writes its own position instead of copying the whole history.

use candle_core::Tensor;

/// Positions a layer's buffers hold at least once decoding continues a first pass.
pub const FIRST_CAPACITY: usize = 64;

/// One layer's keys and values.
enum Slot {
    /// As the first pass gave them ([batch, kv_heads, len, head_dim]): kept without a copy, so
    /// that a pass that is never continued (training, scoring) costs nothing.
    First(Tensor, Tensor),
    /// Buffers of [batch, kv_heads, capacity, head_dim], the first `len` positions used.
    Buffered(Tensor, Tensor),
}

/// Buffers of `capacity` positions (shaped like `k` otherwise) holding `k`, `v` at position 0.
fn buffers(k: &Tensor, v: &Tensor, capacity: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let mut dims = k.dims().to_vec();
    dims[2] = capacity;
    let bk = Tensor::zeros(dims.as_slice(), k.dtype(), k.device())?;
    let bv = bk.zeros_like()?;
    bk.slice_set(&k.contiguous()?, 2, 0)?;
    bv.slice_set(&v.contiguous()?, 2, 0)?;
    Ok((bk, bv))
}

/// The room to allocate for `end` positions where doubling asks for `doubled`, for a sequence
/// of at most `most` positions (0: not known). With `whole`, a known length is allocated at
/// once: on a GPU, where a buffer comes from the memory pool without being touched, a cache then
/// never grows (no new buffers and copies of the cache in the middle of decoding), and holds
/// what a server's KV budget counted for it; on the CPU the buffers grow as the sequence does
/// (zeroing room that a sequence stopping early never uses costs time and memory there).
fn capacity(end: usize, doubled: usize, most: usize, whole: bool) -> usize {
    let want = end.max(doubled).max(FIRST_CAPACITY);
    if most >= end && (whole || want >= most || 2 * end >= most) {
        most
    } else {
        want
    }
}

/// Not `Clone`: decoding writes the key/value buffers in place, so two copies would share them.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<Slot>>,
    /// Recurrent models keep, per layer, the last hidden state (and LSTM cell state) instead.
    pub(crate) recurrent: Vec<Option<(Tensor, Option<Tensor>)>>,
    len: usize,
    /// Keys and values are not needed after this pass (training, scoring whole windows): layers
    /// may skip storing them and use attention kernels that never materialise them.
    discard_kv: bool,
    /// Rows packed with several sequences (see [`KvCache::packed`]).
    segments: Option<Vec<Vec<usize>>>,
    /// Positions this cache's sequence brings to a pass that continues several caches' sequences
    /// packed into one row (see [`KvCache::queue`]); 0 outside such a pass.
    queued: usize,
    /// The most positions the sequence can reach ([`KvCache::reserve`]); 0: not known.
    reserved: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            recurrent: vec![None; num_layers],
            len: 0,
            discard_kv: false,
            segments: None,
            queued: 0,
            reserved: 0,
        }
    }

    /// Says that this cache's sequence will hold at most `positions` positions (its prompt and
    /// the most tokens it may generate): the buffers then grow to exactly that room as soon as
    /// doubling would reach it within one more growth, instead of past it (a 4,000-token prompt
    /// followed by 128 tokens gets room for 4,128 positions, where doubling allocated 8,000),
    /// and a buffer first allocated for a whole prompt gets room past it (twice the prompt, at
    /// most the reserved length) instead of exactly the prompt's.
    pub fn reserve(&mut self, positions: usize) {
        self.reserved = positions;
    }

    /// A single pass over rows that each hold several sequences one after another:
    /// `segments[r]` are row r's sequence lengths (summing to the row's length). Each sequence
    /// attends only to itself and its positions start at 0, so its outputs are those of a pass
    /// over it alone (packing short examples into full rows wastes no compute on padding).
    pub fn packed(num_layers: usize, segments: Vec<Vec<usize>>) -> Self {
        KvCache {
            segments: Some(segments),
            ..KvCache::single_pass(num_layers)
        }
    }

    /// The rows' sequence lengths of a packed pass.
    pub fn segments(&self) -> Option<&[Vec<usize>]> {
        self.segments.as_deref()
    }

    /// Position ids [rows × t] of a packed pass: each sequence counts from 0.
    pub fn packed_positions(&self) -> Option<Vec<u32>> {
        let segs = self.segments.as_ref()?;
        Some(
            segs.iter()
                .flat_map(|row| row.iter().flat_map(|&n| 0..n as u32))
                .collect(),
        )
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
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

    /// The next pass over one row with several caches continues each cache's sequence by its
    /// `n` queued positions, the sequences one after another in the row in the caches' order
    /// (a packed continuation: [`crate::CausalLm::forward_packed_last`], which sets them back
    /// to 0 after the pass).
    pub(crate) fn queue(&mut self, n: usize) {
        self.queued = n;
    }

    /// Positions queued for a packed continuation (0: none).
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// The positions this cache's sequence takes in a pass of `t` positions a row: its queued
    /// ones in a packed continuation, else the row's `t`, after the cached ones.
    pub fn pass_positions(&self, t: usize) -> std::ops::Range<usize> {
        let n = if self.queued > 0 { self.queued } else { t };
        self.len..self.len + n
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds this step's keys/values for `layer` and returns the full ones. The cached length grows
    /// once the last layer has been appended. The first pass gets its own tensors back (so that
    /// gradients flow through a whole-sequence pass, and nothing is copied); the next one moves
    /// them into buffers with room to grow, and later ones get views of those buffers.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!("KV cache: layer {layer} of {}", self.layers.len());
        };
        if self.len == 0 && slot.is_none() {
            *slot = Some(Slot::First(k.clone(), v.clone()));
            if layer + 1 == self.layers.len() {
                self.len = k.dim(2)?;
            }
            return Ok((k.clone(), v.clone()));
        }
        let (bk, bv, start) = self.extend_in_place(layer, k)?;
        bk.slice_set(&k.contiguous()?, 2, start)?;
        bv.slice_set(&v.contiguous()?, 2, start)?;
        let end = start + k.dim(2)?;
        Ok((bk.narrow(2, 0, end)?, bv.narrow(2, 0, end)?))
    }

    /// For a kernel that writes the keys and values of `layer`'s next n positions itself (n:
    /// `like`'s positions, `like` [batch, kv_heads, n, head_dim]): the layer's buffers ([batch,
    /// kv_heads, capacity, head_dim], of `like`'s dtype and device) with room for them after
    /// the `start` positions cached, and `start`. The cache counts the positions as
    /// [`KvCache::append`] does (its length grows with the last layer): the caller must write
    /// them before the buffers are read again.
    pub fn extend_in_place(
        &mut self,
        layer: usize,
        like: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, usize)> {
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!("KV cache: layer {layer} of {}", self.layers.len());
        };
        let (start, most) = (self.len, self.reserved);
        let end = start + like.dim(2)?;
        let (bk, bv) = match slot.take() {
            None if start == 0 => {
                let mut dims = like.dims().to_vec();
                // Room for the tokens after a prompt where more are known to follow.
                let doubled = if most > end { 2 * end } else { 0 };
                dims[2] = capacity(end, doubled, most, !like.device().is_cpu());
                let bk = Tensor::zeros(dims.as_slice(), like.dtype(), like.device())?;
                let bv = bk.zeros_like()?;
                (bk, bv)
            }
            None => {
                candle_core::bail!("KV cache: layer {layer} has no keys for its {start} positions")
            }
            Some(Slot::Buffered(bk, bv)) if end <= bk.dim(2)? => (bk, bv),
            Some(Slot::Buffered(bk, bv)) => {
                let cap = capacity(end, 2 * bk.dim(2)?, most, !bk.device().is_cpu());
                buffers(&bk.narrow(2, 0, start)?, &bv.narrow(2, 0, start)?, cap)?
            }
            Some(Slot::First(fk, fv)) => {
                let whole = !fk.device().is_cpu();
                buffers(&fk, &fv, capacity(end, 2 * start, most, whole))?
            }
        };
        *slot = Some(Slot::Buffered(bk.clone(), bv.clone()));
        if layer + 1 == self.layers.len() {
            self.len = end;
        }
        Ok((bk, bv, start))
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
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// A cache of this one's first `n` positions (`n` at most [`KvCache::len`]) to start a
    /// sequence whose tokens begin with the `n` this one read (a server's prefix cache): a
    /// continuation takes them as a first pass's keys and values, and copies them into buffers
    /// of its own before it writes. With `copy` they are copied now, into tensors of exactly `n`
    /// positions (what a store of finished sequences keeps: not their buffers' spare room);
    /// else they are views of this cache's, which stay valid while it decodes on (a cache never
    /// writes the positions it holds again). `None` where this cache cannot be cut so: a
    /// recurrent model's (its state is that of all its positions), a packed pass's, or `n` of
    /// 0 or past its length.
    pub fn prefix(&self, n: usize, copy: bool) -> candle_core::Result<Option<KvCache>> {
        if n == 0
            || n > self.len
            || self.segments.is_some()
            || self.recurrent.iter().any(Option::is_some)
            || self.layers.iter().any(Option::is_none)
        {
            return Ok(None);
        }
        let layers = self
            .layers
            .iter()
            .flatten()
            .map(|slot| {
                let (Slot::First(k, v) | Slot::Buffered(k, v)) = slot;
                let (k, v) = (k.narrow(2, 0, n)?, v.narrow(2, 0, n)?);
                let (k, v) = if copy { buffers(&k, &v, n)? } else { (k, v) };
                Ok(Some(Slot::First(k, v)))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Some(KvCache {
            layers,
            recurrent: self.recurrent.clone(),
            len: n,
            discard_kv: false,
            segments: None,
            queued: 0,
            reserved: 0,
        }))
    }

    /// An independent copy: buffers that decoding writes in place are copied; the first pass's
    /// keys and values (never written in place) are shared. Several continuations of one
    /// prompt can then start from one pass over it.
    pub fn fork(&self) -> candle_core::Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|slot| {
                Ok(match slot {
                    None => None,
                    Some(Slot::First(k, v)) => Some(Slot::First(k.clone(), v.clone())),
                    Some(Slot::Buffered(k, v)) => Some(Slot::Buffered(k.copy()?, v.copy()?)),
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache {
            layers,
            recurrent: self.recurrent.clone(),
            len: self.len,
            discard_kv: self.discard_kv,
            segments: self.segments.clone(),
            queued: 0,
            reserved: self.reserved,
        })
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.recurrent.iter_mut().for_each(|l| *l = None);
        self.len = 0;
        self.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn appends_equal_concatenation_across_growth() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(2);
        let mut all: Vec<Tensor> = Vec::new();
        // A first pass of 5 positions, then single steps past the first capacity.
        for (i, t) in std::iter::once(5)
            .chain(std::iter::repeat_n(1, 70))
            .enumerate()
        {
            let k = lmkit_kernels::testing::randn(0f32, 1.0, (2, 3, t, 4), &dev).unwrap();
            let v = (&k * 2.0).unwrap();
            let mut got = None;
            for layer in 0..2 {
                got = Some(cache.append(layer, &k, &v).unwrap());
            }
            all.push(k);
            let (gk, gv) = got.unwrap();
            let want = Tensor::cat(&all, 2).unwrap();
            assert_eq!(gk.dims(), want.dims(), "step {i}");
            let d = (gk - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            let d = (gv - (want * 2.0).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            assert_eq!(cache.len(), 5 + i);
        }
        cache.clear();
        assert!(cache.is_empty());
        let k = Tensor::zeros((1, 1, 2, 4), DType::F32, &dev).unwrap();
        assert_eq!(cache.append(0, &k, &k).unwrap().0.dims(), [1, 1, 2, 4]);
        assert!(cache.append(5, &k, &k).is_err());
    }

    /// The positions `layer`'s buffers have room for (0 before they exist).
    fn room(cache: &KvCache, layer: usize) -> usize {
        match &cache.layers[layer] {
            Some(Slot::Buffered(k, _)) => k.dim(2).unwrap(),
            _ => 0,
        }
    }

    #[test]
    fn reserved_caches_grow_to_their_sequence_length_and_no_further() {
        let dev = Device::Cpu;
        let kv = |t: usize, seed: f32| {
            let k = (Tensor::arange(0f32, (6 * t) as f32, &dev).unwrap() + seed as f64)
                .unwrap()
                .reshape((1, 2, t, 3))
                .unwrap();
            let v = (&k * -1.0).unwrap();
            (k, v)
        };
        // The rooms a cache reserved for `most` positions has, in turn, over a first pass of
        // `first` positions and `steps` single steps (its contents checked at each).
        let rooms = |most: usize, first: usize, steps: usize| {
            let mut cache = KvCache::new(1);
            cache.reserve(most);
            let mut all = Vec::new();
            let mut seen = Vec::new();
            for (i, t) in std::iter::once(first)
                .chain(std::iter::repeat_n(1, steps))
                .enumerate()
            {
                let (k, v) = kv(t, i as f32 * 1000.0);
                let (gk, gv) = cache.append(0, &k, &v).unwrap();
                all.push(k);
                let want = Tensor::cat(&all, 2).unwrap();
                let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(
                    flat(&gk),
                    flat(&want),
                    "keys after {} positions",
                    cache.len()
                );
                assert_eq!(flat(&gv), flat(&(want * -1.0).unwrap()));
                if seen.last() != Some(&room(&cache, 0)) {
                    seen.push(room(&cache, 0));
                }
            }
            seen
        };
        // Without a reservation: doubling, from 64 positions (0 while the first pass's own
        // tensors are kept).
        assert_eq!(rooms(0, 10, 70), [0, 64, 128]);
        // A prompt of 10 and up to 11 tokens: room for 21 at the first step, 64 past it.
        assert_eq!(rooms(21, 10, 11), [0, 21]);
        assert_eq!(rooms(21, 10, 12), [0, 21, 64]);
        // A long prompt: exactly its length and the tokens after it, not twice the prompt.
        assert_eq!(rooms(4128, 4000, 3), [0, 4128]);
        // Far from the end: doubling, then the reserved length once doubling would pass it.
        assert_eq!(rooms(300, 100, 210), [0, 200, 300, 600]);
        // On a GPU the reserved length at once; past it (or without one) doubling again.
        assert_eq!(capacity(110, 200, 300, true), 300);
        assert_eq!(capacity(110, 200, 300, false), 200);
        assert_eq!(capacity(10, 20, 21, true), 21);
        assert_eq!(capacity(301, 600, 300, true), 600);
        assert_eq!(capacity(10, 20, 0, true), 64);

        // Buffers a kernel writes in place from the first pass on.
        let mut cache = KvCache::new(1);
        cache.reserve(300);
        let (k, _) = kv(100, 0.0);
        assert_eq!(cache.extend_in_place(0, &k).unwrap().2, 0);
        assert_eq!(room(&cache, 0), 200);
        let (k, _) = kv(120, 0.0);
        assert_eq!(cache.extend_in_place(0, &k).unwrap().2, 100);
        assert_eq!(room(&cache, 0), 300);
        let mut cache = KvCache::new(1);
        let (k, _) = kv(100, 0.0);
        cache.extend_in_place(0, &k).unwrap();
        assert_eq!(room(&cache, 0), 100, "no reservation: the prompt's length");
        // A copy keeps the reservation.
        let mut cache = KvCache::new(1);
        cache.reserve(150);
        cache.extend_in_place(0, &k).unwrap();
        let mut copy = cache.fork().unwrap();
        copy.extend_in_place(0, &kv(1, 0.0).0).unwrap();
        assert_eq!((room(&cache, 0), room(&copy, 0)), (150, 150));
    }
}
