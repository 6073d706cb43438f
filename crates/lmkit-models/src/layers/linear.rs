//! The one linear layer every family uses: y = x·Wᵀ + b, whatever the layout its checkpoint
//! stores W in. Products go through [`lmkit_kernels::blas::linear`] (one fused BLAS node with the
//! bias on the CPU). Each layer knows its tensor path (`model.layers.0.self_attn.q_proj`), the key
//! under which adapters and quantized weights are looked up.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use lmkit_kernels::interleaved::Interleaved;
use std::sync::{Arc, OnceLock};

use super::lora::{self, Lora};

/// How the weight is stored.
#[derive(Clone, Debug)]
enum Weight {
    /// [out, in], as PyTorch's `nn.Linear` (and output layers tied to an embedding).
    Dense(Tensor),
    /// [in, out], as transformers' `Conv1D` (GPT-2): as stored while it is trained, otherwise
    /// a view of a copy stored [out, in] ([`rows_per_output`]).
    Transposed(Tensor),
    /// [out, in] in one of GGML's block-quantized types (a GGUF checkpoint): products quantize
    /// the activations and run the quantized dot products; the dense copy is made only when
    /// something asks for the weight itself.
    Quantized(QMatMul, Arc<OnceLock<Tensor>>),
    /// A block-quantized weight on a CPU with AVX2 or AVX-512 VNNI, its rows interleaved for
    /// decoding steps' and prompts' products (see `lmkit_kernels::interleaved`) in place of the blocks as stored; the
    /// dense copy as for `Quantized`.
    Interleaved(Arc<Interleaved>, Arc<OnceLock<Tensor>>),
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    path: String,
    /// A LoRA adapter added to the product (attached while the model is built with adapters).
    lora: Option<Lora>,
}

impl Linear {
    /// `nn.Linear` layout: `weight` [out, in] (and `bias` of `[out]`) under `vb`, created with
    /// candle-nn's initialisation.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let path = vb.prefix();
        let l = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
        let (weight, bias) = saved_or(&path, l.weight().clone(), l.bias().cloned())?;
        Ok(Linear {
            weight: Weight::Dense(weight),
            bias,
            lora: lora::attach(&path, in_dim, out_dim, false)?,
            path,
        })
    }

    /// transformers' `Conv1D` layout: `weight` [in, out] and `bias` of `[out]` under `vb` (a
    /// weight not being trained is kept [out, in] behind an [in, out] view, `rows_per_output`).
    pub fn conv1d(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let path = vb.prefix();
        let (weight, bias) = saved_or(
            &path,
            vb.get((in_dim, out_dim), "weight")?,
            Some(vb.get(out_dim, "bias")?),
        )?;
        Ok(Linear {
            weight: Weight::Transposed(rows_per_output(weight)?),
            bias,
            lora: lora::attach(&path, in_dim, out_dim, true)?,
            path,
        })
    }

    /// A layer over an existing [out, in] weight (an output layer tied to the token embeddings,
    /// or one stored under a name of its own), with an optional bias.
    pub fn from_weight(
        weight: Tensor,
        bias: Option<Tensor>,
        path: &str,
    ) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let (weight, bias) = saved_or(path, weight, bias)?;
        Ok(Linear {
            weight: Weight::Dense(weight),
            bias,
            path: path.to_string(),
            lora: lora::attach(path, in_dim, out_dim, false)?,
        })
    }

    /// A layer over a GGUF tensor [out, in]: block-quantized types stay quantized, float ones
    /// (f32, f16, bf16) become dense f32.
    pub fn quantized(
        weight: QTensor,
        bias: Option<Tensor>,
        path: &str,
    ) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.shape().dims2()?;
        let dense = || weight.dequantize(&weight.device());
        if let Some((w, bias)) = lora::saved_module(path, &dense, bias.as_ref())? {
            // A module trained whole: dense f32 from here on.
            return Ok(Linear {
                weight: Weight::Dense(w),
                bias,
                path: path.to_string(),
                lora: lora::attach(path, in_dim, out_dim, false)?,
            });
        }
        let weight = match QMatMul::from_qtensor(weight)? {
            QMatMul::Tensor(w) | QMatMul::TensorF16(w) => {
                Weight::Dense(w.to_dtype(candle_core::DType::F32)?)
            }
            QMatMul::QTensor(t) if t.device().is_cpu() => {
                match Interleaved::new(&t.data()?, t.dtype(), out_dim, in_dim) {
                    Some(w) => Weight::Interleaved(Arc::new(w), Arc::default()),
                    None => Weight::Quantized(QMatMul::QTensor(t), Arc::default()),
                }
            }
            q => Weight::Quantized(q, Arc::default()),
        };
        Ok(Linear {
            weight,
            bias,
            path: path.to_string(),
            lora: lora::attach(path, in_dim, out_dim, false)?,
        })
    }

    /// One layer computing the outputs of `parts` (which read the same input) side by side, and
    /// each part's output width, when they are all block-quantized in one of lmkit's own kernel
    /// types, or all interleaved alike: one product quantizes the input once and shares one pass
    /// of the thread pool (the query, key and value projections of a decoding step). `None` when
    /// they cannot be stacked.
    fn stacked(parts: &[Linear], path: &str) -> candle_core::Result<Option<(Linear, Vec<usize>)>> {
        let rows: Option<Vec<&Interleaved>> = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Interleaved(w, _) if p.lora.is_none() => Some(&**w),
                _ => None,
            })
            .collect();
        if let Some(rows) = rows {
            let Some(w) = Interleaved::stacked(&rows) else {
                return Ok(None);
            };
            let layer = Linear {
                weight: Weight::Interleaved(Arc::new(w), Arc::default()),
                bias: stacked_bias(parts)?,
                path: path.to_string(),
                lora: None,
            };
            return Ok(Some((layer, rows.iter().map(|w| w.dims().0).collect())));
        }
        let mut data = Vec::new();
        let mut widths = Vec::new();
        let (mut cols, mut dtype) = (None, None);
        for part in parts {
            if part.lora.is_some() {
                return Ok(None);
            }
            let Weight::Quantized(QMatMul::QTensor(t), _) = &part.weight else {
                return Ok(None);
            };
            if !t.device().is_cpu()
                || lmkit_kernels::quant::QType::of(t.dtype()).is_none()
                || dtype.is_some_and(|d| d != t.dtype())
            {
                return Ok(None);
            }
            let (n, k) = t.shape().dims2()?;
            if cols.is_some_and(|c| c != k) {
                return Ok(None);
            }
            data.extend_from_slice(&t.data()?);
            widths.push(n);
            cols = Some(k);
            dtype = Some(t.dtype());
        }
        let (Some(k), Some(dtype)) = (cols, dtype) else {
            return Ok(None);
        };
        let device = candle_core::Device::Cpu;
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(data),
            &device,
            dtype,
        )?;
        let rows = widths.iter().sum::<usize>();
        let layer = Linear {
            weight: Weight::Quantized(
                QMatMul::from_qtensor(QTensor::new(storage, (rows, k))?)?,
                Arc::default(),
            ),
            bias: stacked_bias(parts)?,
            path: path.to_string(),
            lora: None,
        };
        Ok(Some((layer, widths)))
    }

    /// The weight as stored ([out, in] dense, [in, out] for Conv1D); a quantized layer gives its
    /// dequantized copy (f32, made once, at the first call).
    pub fn weight(&self) -> &Tensor {
        match &self.weight {
            Weight::Dense(w) | Weight::Transposed(w) => w,
            Weight::Quantized(q, dense) => dense.get_or_init(|| {
                let QMatMul::QTensor(t) = q else {
                    unreachable!("float GGUF tensors are stored dense")
                };
                t.dequantize(&t.device())
                    .expect("a loaded GGUF tensor dequantizes")
            }),
            Weight::Interleaved(w, dense) => dense.get_or_init(|| {
                stored_blocks(w)
                    .and_then(|t| t.dequantize(&candle_core::Device::Cpu))
                    .expect("a loaded GGUF tensor dequantizes")
            }),
        }
    }

    /// The weight as [out, in], whatever the storage (a transposed view for Conv1D).
    pub fn weight_out_in(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Transposed(w) => w.t(),
            Weight::Quantized(..) | Weight::Interleaved(..) => Ok(self.weight().clone()),
        }
    }

    /// Whether the weight is block-quantized (a GGUF file's Q4_1, Q8_0, K-quants, ...) on the CPU.
    pub fn is_block_quantized(&self) -> bool {
        match &self.weight {
            Weight::Quantized(QMatMul::QTensor(t), _) => {
                t.device().is_cpu() && lmkit_kernels::quant::Dequantizer::of(t.dtype()).is_some()
            }
            Weight::Interleaved(..) => true,
            _ => false,
        }
    }

    /// (outputs, inputs), whatever the storage (nothing is dequantized).
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match &self.weight {
            Weight::Dense(w) => w.dims2(),
            Weight::Transposed(w) => w.dims2().map(|(i, o)| (o, i)),
            Weight::Quantized(QMatMul::QTensor(t), _) => t.shape().dims2(),
            Weight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w), _) => w.dims2(),
            Weight::Interleaved(w, _) => Ok(w.dims()),
        }
    }

    /// The weight [out, in] when it is stored so (not transposed, not quantized).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            _ => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The tensor path of the layer in its checkpoint.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The LoRA adapter added to this layer's product, if any.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// The dense weight as [in, out] (a transposed view of a [out, in] one); an error for a
    /// quantized weight, which has no such view.
    fn dense_in_out(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => w.t(),
            Weight::Transposed(w) => Ok(w.clone()),
            Weight::Quantized(..) | Weight::Interleaved(..) => {
                candle_core::bail!("{}: a quantized weight", self.path)
            }
        }
    }

    /// `r + self.forward(x)` (a residual connection after this layer); for inference on the
    /// CPU one product accumulates into the residual plus the bias (see
    /// `lmkit_kernels::blas::linear_add`), on a GPU cuBLASLt's epilogue adds the residual (and
    /// the bias) to the product (`lmkit_kernels::cuda::linear`).
    pub fn forward_add(&self, x: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
        let adapter_off = self.lora.as_ref().is_none_or(|l| !l.is_on());
        match (&self.weight, &self.bias) {
            (Weight::Dense(_) | Weight::Transposed(_), Some(b)) if adapter_off => {
                lmkit_kernels::blas::linear_add(x, &self.dense_in_out()?, b, r)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
            (Weight::Dense(_) | Weight::Transposed(_), None)
                if adapter_off && lmkit_kernels::cuda::layers_on(x) =>
            {
                match lmkit_kernels::cuda::linear(x, &self.dense_in_out()?, None, Some(r))? {
                    Some(y) => Ok(y),
                    None => self.forward(x)? + r,
                }
            }
            (Weight::Dense(_) | Weight::Transposed(_), None) if adapter_off => {
                // A half-type model on the CPU: the residual added before the one rounding.
                match lmkit_kernels::half_weights::product_add(x, &self.dense_in_out()?, r)? {
                    Some(y) => Ok(y),
                    None => self.forward(x)? + r,
                }
            }
            _ => self.forward(x)? + r,
        }
    }

    /// x·Wᵀ + b without the adapter.
    fn base_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(_) | Weight::Transposed(_) => {
                lmkit_kernels::blas::linear(x, &self.dense_in_out()?, self.bias.as_ref())
            }
            Weight::Quantized(q, _) => {
                // Q4_1 and Q8_0 on lmkit's kernels, every block type on AMX tiles from enough
                // rows, the other common ones on lmkit's 8-bit dot products below that (see
                // lmkit_kernels::quant::ggml_product), reading an f32 input's values in place.
                let cpu =
                    matches!(q, QMatMul::QTensor(t) if t.device().is_cpu()) && x.device().is_cpu();
                let own = match q {
                    QMatMul::QTensor(t) if cpu => {
                        lmkit_kernels::quant::QType::of(t.dtype()).map(|ty| (t, ty))
                    }
                    _ => None,
                };
                // Where a gradient must pass through the layer (adapters before it are
                // trained), the product is a node that gives its input one.
                let y = if x.track_op() {
                    x.contiguous()?
                        .apply_op1(FrozenQuant(Frozen::Stored(q.clone())))?
                } else if cpu && x.dtype() == candle_core::DType::F32 {
                    x.contiguous()?
                        .apply_op1_no_bwd(&FrozenQuant(Frozen::Stored(q.clone())))?
                } else if let Some((t, ty)) = own {
                    let (n, k) = t.shape().dims2()?;
                    lmkit_kernels::quant::quant_matmul(x, &t.data()?, ty, n, k)?
                } else {
                    q.forward(&x.contiguous()?)?
                };
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Weight::Interleaved(w, _) => {
                let op = FrozenQuant(Frozen::Interleaved(w.clone()));
                let y = if x.track_op() {
                    x.contiguous()?.apply_op1(op)?
                } else {
                    x.to_dtype(candle_core::DType::F32)?
                        .contiguous()?
                        .apply_op1_no_bwd(&op)?
                };
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// The parts' biases side by side (zeros for a part without one), or `None` when no part has
/// one.
fn stacked_bias(parts: &[Linear]) -> candle_core::Result<Option<Tensor>> {
    if parts.iter().all(|p| p.bias.is_none()) {
        return Ok(None);
    }
    let biases = parts
        .iter()
        .map(|p| match &p.bias {
            Some(b) => Ok(b.clone()),
            None => Tensor::zeros(
                p.dims()?.0,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            ),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(Tensor::cat(&biases, 0)?))
}

/// An interleaved weight's blocks as stored, as a tensor of its type (on the CPU).
fn stored_blocks(w: &Interleaved) -> candle_core::Result<QTensor> {
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(w.original()),
        &candle_core::Device::Cpu,
        w.dtype(),
    )?;
    QTensor::new(storage, w.dims())
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base_forward(x)?;
        match &self.lora {
            Some(l) if l.is_on() => y + l.forward(x)?,
            _ => Ok(y),
        }
    }
}

/// A Conv1D weight [in, out] as a transposed view of a copy stored [out, in], where it is a CPU
/// tensor that no training step changes (not a variable): every reader sees the same [in, out]
/// tensor, while products read each output's weights as one run of memory, as from an
/// `nn.Linear` weight. A decoding step's few rows then take `few_rows`' [out, in] kernels: at 8
/// rows a serving round's products from [in, out] weights took 57–62 ms against 35
/// (`cargo run --release -p lmkit-kernels --example few_rows_speed [-- --in-out]`). Weights being
/// trained keep their layout (the training passes read them as stored).
fn rows_per_output(w: Tensor) -> candle_core::Result<Tensor> {
    if w.is_variable() || !w.device().is_cpu() || w.rank() != 2 || w.is_fortran_contiguous() {
        // Trained, elsewhere, or kept per output already (the copy a shared source hands out).
        return Ok(w);
    }
    let t = transposed_copy(w.clone())?;
    // A shared source hands out the copy from now on, in place of the values it read: the next
    // variant's layer takes the copy as it is, and the values read are freed as soon as this
    // layer has its copy, not once all the variants are built.
    LOADED.with(|l| {
        if let Some(loaded) = l.borrow().as_ref() {
            let mut loaded = loaded.lock().unwrap_or_else(|p| p.into_inner());
            for v in loaded.values_mut().filter(|v| v.id() == w.id()) {
                *v = t.clone();
            }
        }
    });
    Ok(t)
}

/// The tensors a source that hands out one tensor per name has read, by name (the source of a
/// base model and its adapted variants, [`crate::CausalLm::load_variants`]).
pub(crate) type Loaded = Arc<std::sync::Mutex<std::collections::HashMap<String, Tensor>>>;

thread_local! {
    /// While [`keeping_copies_in`] runs: the shared source's tensors.
    static LOADED: std::cell::RefCell<Option<Loaded>> = const { std::cell::RefCell::new(None) };
}

/// Runs `build` with the [out, in] copies of Conv1D weights put in `loaded` in place of the
/// tensors they copy: models built from that source (a base and its adapted variants) then
/// share each copy, as they share the other weights, and the values read do not stay beside the
/// copies while the models are built.
pub(crate) fn keeping_copies_in<R>(loaded: &Loaded, build: impl FnOnce() -> R) -> R {
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            LOADED.with(|l| *l.borrow_mut() = None);
        }
    }
    LOADED.with(|l| *l.borrow_mut() = Some(loaded.clone()));
    let _forget = Forget;
    build()
}

/// `w` [in, out] as a transposed view of a contiguous copy (see [`rows_per_output`]).
fn transposed_copy(w: Tensor) -> candle_core::Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    let (k, n) = w.dims2()?;
    // The copy through lmkit's blocked transpose where the values lie in order (candle's copy of
    // a transposed view goes value by value: 0.28 s more to load a GPT-2-small checkpoint).
    fn copy<T: candle_core::WithDType>(
        v: &[T],
        (k, n): (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let t = lmkit_kernels::buffers::transposed(v, k, n);
        Tensor::from_vec(t, (n, k), &candle_core::Device::Cpu)
    }
    let out_in = {
        let (storage, layout) = w.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(copy(&v[a..b], (k, n))?),
            (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => Some(copy(&v[a..b], (k, n))?),
            (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => Some(copy(&v[a..b], (k, n))?),
            _ => None,
        }
    };
    match out_in {
        Some(t) => t.t(),
        None => w.t()?.contiguous()?.t(),
    }
}

/// `weight` and `bias`, or what the adapters being attached put in their place for the module at
/// `path` (see [`lora::saved_module`]).
fn saved_or(
    path: &str,
    weight: Tensor,
    bias: Option<Tensor>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let w = weight.clone();
    Ok(lora::saved_module(path, &|| Ok(w.clone()), bias.as_ref())?.unwrap_or((weight, bias)))
}

/// A frozen block-quantized product `x·Wᵀ` as a node of the graph: its input gets the gradient
/// `grad · W` (what a frozen quantized layer needs when adapters before it are trained).
struct FrozenQuant(Frozen);

/// The weight of a [`FrozenQuant`].
enum Frozen {
    /// As the checkpoint stores it.
    Stored(QMatMul),
    /// Interleaved (on the CPU).
    Interleaved(Arc<Interleaved>),
}

impl candle_core::CustomOp1 for FrozenQuant {
    fn name(&self) -> &'static str {
        "frozen-quantized-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (candle_core::CpuStorage::F32(all), Some((start, end))) =
            (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("frozen-quantized-linear: the input must be contiguous f32");
        };
        let xs = &all[start..end];
        let mut dims = layout.dims().to_vec();
        if let Frozen::Interleaved(w) = &self.0 {
            let (n, k) = w.dims();
            let y = match w.product(xs) {
                Some(y) if dims.last() == Some(&k) => y,
                _ => {
                    candle_core::bail!("frozen-quantized-linear: input {dims:?} against [{n}, {k}]")
                }
            };
            *dims.last_mut().expect("checked above") = n;
            return Ok((candle_core::CpuStorage::F32(y), dims.into()));
        }
        let Frozen::Stored(QMatMul::QTensor(t)) = &self.0 else {
            candle_core::bail!("frozen-quantized-linear: the weight is not block-quantized");
        };
        let (n, k) = t.shape().dims2()?;
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen-quantized-linear: input {dims:?} against [{n}, {k}]");
        }
        let y = match lmkit_kernels::quant::ggml_product(xs, &t.data()?, t.dtype(), n, k) {
            Some(y) => y,
            None => {
                let x = Tensor::from_slice(xs, dims.as_slice(), &candle_core::Device::Cpu)?;
                let Frozen::Stored(q) = &self.0 else {
                    unreachable!("interleaved weights return above")
                };
                q.forward(&x)?.flatten_all()?.to_vec1::<f32>()?
            }
        };
        *dims.last_mut().expect("checked above") = n;
        Ok((candle_core::CpuStorage::F32(y), dims.into()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        use lmkit_kernels::amx::QuantRows;
        // Every block type on AMX tiles from lmkit_kernels::quant::TILE_MIN_ROWS rows: grad and
        // the weight as packed rounded to bf16, f32 sums (as the forward product there); an
        // interleaved weight read in place, each task's blocks put back as stored as it packs.
        let on_tiles = |w: QuantRows, dtype, (n, k)| -> candle_core::Result<Option<Tensor>> {
            if grad.dtype() != candle_core::DType::F32 {
                return Ok(None);
            }
            let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            match lmkit_kernels::quant::ggml_product_nk(&g, w, dtype, n, k) {
                Some(dx) => Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?)),
                None => Ok(None),
            }
        };
        let stored;
        let t = match &self.0 {
            Frozen::Interleaved(w) => {
                if let Some(dx) = on_tiles(QuantRows::Interleaved(w), w.dtype(), w.dims())? {
                    return Ok(Some(dx));
                }
                stored = stored_blocks(w)?;
                &stored
            }
            Frozen::Stored(QMatMul::QTensor(t)) if t.device().is_cpu() => {
                let rows = QuantRows::Stored(&t.data()?);
                if let Some(dx) = on_tiles(rows, t.dtype(), t.shape().dims2()?)? {
                    return Ok(Some(dx));
                }
                t
            }
            Frozen::Stored(QMatMul::QTensor(t)) => {
                let w = t.dequantize(&t.device())?;
                return Ok(Some(grad.broadcast_matmul(&w)?));
            }
            Frozen::Stored(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                let w = w.to_dtype(candle_core::DType::F32)?;
                return Ok(Some(grad.broadcast_matmul(&w)?));
            }
        };
        let (n, k) = t.shape().dims2()?;
        let data = t.data()?;
        // grad [.., n] · W [n, k], W dequantized a block of rows at a time: a large layer (the
        // output layer over a whole vocabulary) is never held in f32 whole.
        let row_bytes = data.len() / n.max(1);
        let rows_per_block = ((8 << 20) / (4 * k.max(1))).max(1);
        let g = grad.reshape(((), n))?;
        let mut dx: Option<Tensor> = None;
        for start in (0..n).step_by(rows_per_block) {
            let len = rows_per_block.min(n - start);
            let bytes = &data[start * row_bytes..(start + len) * row_bytes];
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(bytes),
                &candle_core::Device::Cpu,
                t.dtype(),
            )?;
            let w = QTensor::new(storage, (len, k))?.dequantize(&candle_core::Device::Cpu)?;
            let part = lmkit_kernels::blas::matmul(&g.narrow(1, start, len)?, &w)?;
            dx = Some(match dx {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        let dx = dx.ok_or_else(|| candle_core::Error::Msg("empty quantized layer".into()))?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// A [`Linear`] in `nn.Linear` layout with or without bias.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    Linear::new(in_dim, out_dim, bias, vb)
}

/// A [`Linear`] in `nn.Linear` layout with bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Linear::new(in_dim, out_dim, true, vb)
}

/// Linear layers that read the same input (a layer's query, key and value projections; the gate
/// and up projections of a gated MLP). Block-quantized alike, they are stacked into one layer:
/// a decoding step then quantizes its input once and wakes the thread pool once for all of
/// them, instead of once per layer.
pub enum Fanout {
    Apart(Vec<Linear>),
    /// One layer whose output holds the parts' outputs side by side, with their widths.
    Stacked(Linear, Vec<usize>),
}

impl Fanout {
    /// Whether a part's weight is block-quantized (a GGUF file's) on the CPU.
    pub fn is_block_quantized(&self) -> bool {
        match self {
            Fanout::Apart(parts) => parts.iter().any(Linear::is_block_quantized),
            Fanout::Stacked(layer, _) => layer.is_block_quantized(),
        }
    }

    /// The parts, stacked when they can be (they are then kept only in the stacked layer).
    pub fn new(parts: Vec<Linear>, path: &str) -> candle_core::Result<Fanout> {
        Ok(match Linear::stacked(&parts, path)? {
            Some((layer, widths)) => Fanout::Stacked(layer, widths),
            None => Fanout::Apart(parts),
        })
    }

    /// Each part's output for `x`, in the order the parts were given.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let (layer, widths) = match self {
            Fanout::Apart(parts) => return parts.iter().map(|p| p.forward(x)).collect(),
            Fanout::Stacked(layer, widths) => (layer, widths),
        };
        let y = layer.forward(x)?;
        let last = y.rank() - 1;
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let part = y.narrow(last, start, w);
                start += w;
                part
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn both_layouts_compute_the_same_product() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let dense = Linear::new(3, 4, true, vb.pp("a")).unwrap();
        assert_eq!(dense.path(), "a");
        let w = lmkit_kernels::testing::randn(0f64, 1.0, (3, 4), &dev).unwrap();
        let b = lmkit_kernels::testing::randn(0f64, 1.0, 4, &dev).unwrap();
        let conv = Linear {
            weight: Weight::Transposed(w.clone()),
            bias: Some(b.clone()),
            path: "c".into(),
            lora: None,
        };
        let same = Linear::from_weight(w.t().unwrap().contiguous().unwrap(), Some(b), "d").unwrap();
        let x = lmkit_kernels::testing::randn(0f64, 1.0, (2, 5, 3), &dev).unwrap();
        let (y1, y2) = (conv.forward(&x).unwrap(), same.forward(&x).unwrap());
        let d = (y1 - y2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
        assert_eq!(conv.weight_out_in().unwrap().dims(), [4, 3]);
        assert_eq!(dense.forward(&x).unwrap().dims(), [2, 5, 4]);
    }

    /// A Conv1D weight read from a checkpoint is kept [out, in] behind an [in, out] view: the
    /// same values to its readers, the same products (a decoding step's few rows and a prompt's
    /// many); one being trained (a variable) stays as stored.
    #[test]
    fn loaded_conv1d_weights_are_kept_per_output() {
        let dev = Device::Cpu;
        let (k, n) = (256, 192);
        let w = lmkit_kernels::testing::randn(0f32, 1.0, (k, n), &dev).unwrap();
        let b = lmkit_kernels::testing::randn(0f32, 1.0, n, &dev).unwrap();
        let load = |dtype| {
            let tensors = [("c.weight", &w), ("c.bias", &b)]
                .into_iter()
                .map(|(name, t)| (name.to_string(), t.clone()))
                .collect();
            let vb = VarBuilder::from_tensors(tensors, dtype, &dev);
            Linear::conv1d(k, n, vb.pp("c")).unwrap()
        };
        let layer = load(DType::F32);
        assert_eq!(layer.weight().dims(), [k, n]);
        assert!(!layer.weight().is_contiguous(), "kept [in, out]");
        assert!(layer.weight_out_in().unwrap().is_contiguous());
        let values = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        assert_eq!(values(layer.weight()), values(&w));
        assert_eq!(layer.dims().unwrap(), (n, k));
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for rows in [1, 4, 100] {
            let x = lmkit_kernels::testing::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let want = to64(&x)
                .matmul(&to64(&w))
                .unwrap()
                .broadcast_add(&to64(&b))
                .unwrap();
            let got = to64(&layer.forward(&x).unwrap());
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f64>().unwrap() < 1e-3, "{rows} rows");
        }
        for dtype in [DType::BF16, DType::F16] {
            let half = load(dtype);
            assert!(!half.weight().is_contiguous(), "{dtype:?}");
            let wide = |t: &Tensor| values(&t.to_dtype(DType::F32).unwrap());
            assert_eq!(wide(half.weight()), wide(&w.to_dtype(dtype).unwrap()));
        }
        // Layers built from a source that keeps what it has read (a base and its adapted
        // variants) hold one copy, and the source holds the copy in place of the values read;
        // built apart, each makes its own.
        let loaded = Loaded::default();
        loaded
            .lock()
            .unwrap()
            .extend([("c.weight".to_string(), w.clone())]);
        let from_loaded = || {
            let w = loaded.lock().unwrap()["c.weight"].clone();
            let tensors = [
                ("c.weight".to_string(), w),
                ("c.bias".to_string(), b.clone()),
            ];
            let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
            Linear::conv1d(k, n, vb.pp("c")).unwrap()
        };
        let (one, two) = keeping_copies_in(&loaded, || (from_loaded(), from_loaded()));
        assert_eq!(one.weight().id(), two.weight().id());
        let kept = loaded.lock().unwrap()["c.weight"].clone();
        assert_eq!(kept.id(), one.weight().id(), "the source holds the copy");
        assert_eq!(values(&one.weight().clone()), values(&w));
        assert_ne!(
            load(DType::F32).weight().id(),
            load(DType::F32).weight().id()
        );
        let vm = VarMap::new();
        let trained = Linear::conv1d(k, n, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        assert!(trained.weight().is_variable() && trained.weight().is_contiguous());
    }

    #[test]
    fn gradients_pass_through_quantized_layers() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let w = lmkit_kernels::testing::randn(0f32, 1.0, (2100, 1024), &dev).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense = q.dequantize(&dev).unwrap();
            let layer = Linear::quantized(q, None, "q").unwrap();
            // 3 rows: W dequantized (in two blocks of rows, W being large enough); 40 rows on AMX
            // tiles: the gradient's rows (ones) and W rounded to bf16 (Q8_0 packed from its
            // blocks, Q4_K dequantized by candle's code as packed).
            for rows in [3, 40] {
                let tiles =
                    rows >= lmkit_kernels::quant::TILE_MIN_ROWS && lmkit_kernels::amx::available();
                let x0 = lmkit_kernels::testing::randn(0f32, 1.0, (rows, 1024), &dev).unwrap();
                let x = candle_core::Var::from_tensor(&x0).unwrap();
                let g = layer
                    .forward(x.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let got = g.get(x.as_tensor()).expect("a gradient for the input");
                assert_eq!(got.dims(), [rows, 1024]);
                // d(sum(x·Wᵀ))/dx = ones · W.
                let w = if tiles {
                    dense
                        .to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                } else {
                    dense.clone()
                };
                let want = Tensor::ones((rows, 2100), DType::F32, &dev)
                    .unwrap()
                    .matmul(&w)
                    .unwrap();
                let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    d.to_scalar::<f32>().unwrap() < 1e-3,
                    "{dtype:?} {rows} rows"
                );
            }
        }
    }

    /// A Q4_K layer: from TILE_MIN_ROWS rows on AMX tiles the product of x and the dequantized
    /// weight both rounded to bf16; fewer rows (or no tiles) lmkit's dot products against Q8_K
    /// activations, which give candle's product (the same activations, the same integer sums).
    #[test]
    fn k_quant_layers_multiply_on_the_tiles_from_enough_rows() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (n, k) = (70, 512);
        let w = lmkit_kernels::testing::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let dense = q.dequantize(&dev).unwrap();
        let candle = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap();
        let layer = Linear::quantized(q, None, "q").unwrap();
        let bf16 = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        for rows in [3, 40] {
            let x = lmkit_kernels::testing::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let got = layer.forward(&x).unwrap();
            let want =
                if rows >= lmkit_kernels::quant::TILE_MIN_ROWS && lmkit_kernels::amx::available() {
                    bf16(&x).matmul(&bf16(&dense).t().unwrap()).unwrap()
                } else {
                    candle.forward(&x).unwrap()
                };
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-3, "{rows} rows");
        }
    }
}
