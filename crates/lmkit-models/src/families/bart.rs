//! The encoder-decoder Transformer of "Attention is all you need" (Vaswani et al. 2017) in the
//! layout of transformers' `BartForConditionalGeneration`: a bidirectional encoder, a decoder with
//! masked self-attention and cross-attention, post-norm layers, learned positions (offset 2),
//! shared token embeddings tied to the output layer plus `final_logits_bias`.

use super::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use crate::error::Result;
use crate::layers::attention::{attention, padding_bias, Mask};
use crate::layers::linear::{linear, Linear};
use crate::layers::ops::LayerNorm;
use crate::layers::parts::{AttentionParts, LayerParts};
use crate::registry::ModelConfig;
use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn gelu() -> String {
    "gelu".into()
}

/// transformers' `BartConfig` (the fields this implementation reads).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BartConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    #[serde(default = "gelu")]
    pub activation_function: String,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

impl BartConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (heads, name) in [
            (self.encoder_attention_heads, "encoder_attention_heads"),
            (self.decoder_attention_heads, "decoder_attention_heads"),
        ] {
            if heads == 0 || !self.d_model.is_multiple_of(heads) {
                return Err(format!(
                    "d_model ({}) must be a multiple of {name} ({heads})",
                    self.d_model
                ));
            }
        }
        super::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("encoder_ffn_dim", self.encoder_ffn_dim),
            ("decoder_ffn_dim", self.decoder_ffn_dim),
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        crate::layers::ops::check_activation("activation_function", &self.activation_function)
    }

    pub fn load(path: &Path) -> Result<BartConfig> {
        crate::registry::load_family(path)
    }

    /// The first decoder input.
    pub fn start_token(&self) -> u32 {
        self.decoder_start_token_id
            .or(self.eos_token_id)
            .unwrap_or(2)
    }
}

impl FamilyConfig for BartConfig {
    const MODEL_TYPE: &'static str = "bart";
    const ARCHITECTURE: &'static str = "BartForConditionalGeneration";
    const KIND: Kind = Kind::Seq2seq;

    fn validate(&self) -> std::result::Result<(), String> {
        BartConfig::validate(self)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn width(&self) -> usize {
        self.d_model
    }
    fn num_layers(&self) -> usize {
        self.encoder_layers.max(self.decoder_layers)
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }
    fn token_id_fields(ids: SpecialIds) -> TokenIdFields {
        vec![
            ("pad_token_id", ids.pad),
            ("bos_token_id", ids.eot),
            ("eos_token_id", ids.eot),
            ("decoder_start_token_id", ids.eot),
        ]
    }
    fn num_parameters(&self) -> u64 {
        let (v, d, p) = (
            self.vocab_size as f64,
            self.d_model as f64,
            self.max_position_embeddings as f64 + 2.0,
        );
        let attn = 4.0 * (d * d + d);
        let ffn = |f: f64| d * f + f + f * d + d;
        let enc = attn + 2.0 * d + ffn(self.encoder_ffn_dim as f64) + 2.0 * d;
        let dec = 2.0 * (attn + 2.0 * d) + ffn(self.decoder_ffn_dim as f64) + 2.0 * d;
        let stacks = 2.0 * (p * d + 2.0 * d)
            + self.encoder_layers as f64 * enc
            + self.decoder_layers as f64 * dec;
        super::count(v * d + stacks + v)
    }
    fn param_role(&self, name: &str) -> ParamRole {
        if name.ends_with("bias") {
            ParamRole::Bias
        } else if name.contains("norm") {
            ParamRole::NormGain
        } else if name.contains("shared.") || name.contains("embed_") {
            ParamRole::Embedding
        } else {
            ParamRole::Weight
        }
    }
    fn into_model_config(self) -> ModelConfig {
        ModelConfig::Bart(self)
    }
}

use crate::layers::ops::activation as act;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Attention {
            q: linear(d, d, vb.pp("q_proj"))?,
            k: linear(d, d, vb.pp("k_proj"))?,
            v: linear(d, d, vb.pp("v_proj"))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// `y` [b, n, d] split into heads [b, heads, n, d / heads].
    fn split(&self, y: Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = y.dims3()?;
        y.reshape((b, n, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values [b, heads, s, d / heads] of `kv` [b, s, d].
    fn keys_values(&self, kv: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.split(self.k.forward(kv)?)?,
            self.split(self.v.forward(kv)?)?,
        ))
    }

    /// Queries from `x` [b, t, d], keys/values from `kv` [b, s, d], seen through `mask`.
    fn forward(&self, x: &Tensor, kv: &Tensor, mask: Mask) -> candle_core::Result<Tensor> {
        let (k, v) = self.keys_values(kv)?;
        self.attend(x, &k, &v, mask)
    }

    /// Queries from `x` [b, t, d] over keys and values already split into heads.
    fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Mask,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        // Queries scaled before the product, as transformers' BartAttention.
        let q = self.split((self.q.forward(x)? * (1.0 / (hd as f64).sqrt()))?)?;
        self.out.forward(
            &attention(&q, k, v, mask, 1.0)?
                .transpose(1, 2)?
                .reshape((b, t, d))?,
        )
    }
}

/// What decoding keeps between steps: each decoder layer's self-attention keys and values so
/// far and its cross-attention keys and values of the encoder states (computed once), plus the
/// encoder's padding bias.
pub struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    memory_bias: Option<Tensor>,
    /// Decoder positions read so far.
    pub len: usize,
}

impl DecoderCache {
    /// Keeps the rows `rows` (in that order; a row may be repeated): beam search follows the
    /// beams it continues.
    pub fn select(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        let Some((k0, _)) = self.cross_kv.first() else {
            return Ok(());
        };
        let idx = Tensor::new(rows, k0.device())?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        for (k, v) in &mut self.cross_kv {
            *k = pick(k)?;
            *v = pick(v)?;
        }
        for (k, v) in self.self_kv.iter_mut().flatten() {
            *k = pick(k)?;
            *v = pick(v)?;
        }
        if let Some(b) = &mut self.memory_bias {
            *b = pick(b)?;
        }
        Ok(())
    }
}

struct Layer {
    self_attn: Attention,
    self_norm: LayerNorm,
    cross: Option<(Attention, LayerNorm)>,
    fc1: Linear,
    fc2: Linear,
    final_norm: LayerNorm,
    act: String,
}

impl Layer {
    fn new(cfg: &BartConfig, decoder: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.d_model;
        let (heads, ffn) = if decoder {
            (cfg.decoder_attention_heads, cfg.decoder_ffn_dim)
        } else {
            (cfg.encoder_attention_heads, cfg.encoder_ffn_dim)
        };
        let cross = if decoder {
            Some((
                Attention::new(d, heads, vb.pp("encoder_attn"))?,
                LayerNorm::new(d, 1e-5, vb.pp("encoder_attn_layer_norm"))?,
            ))
        } else {
            None
        };
        Ok(Layer {
            self_attn: Attention::new(d, heads, vb.pp("self_attn"))?,
            self_norm: LayerNorm::new(d, 1e-5, vb.pp("self_attn_layer_norm"))?,
            cross,
            fc1: linear(d, ffn, vb.pp("fc1"))?,
            fc2: linear(ffn, d, vb.pp("fc2"))?,
            final_norm: LayerNorm::new(d, 1e-5, vb.pp("final_layer_norm"))?,
            act: cfg.activation_function.clone(),
        })
    }

    /// An encoder layer over `x` [b, s, d] (decoder layers run through [`Layer::forward_cached`]).
    fn forward(&self, x: &Tensor, mask: Mask) -> candle_core::Result<Tensor> {
        let x = self
            .self_norm
            .forward(&(x + self.self_attn.forward(x, x, mask)?)?)?;
        self.feed_forward(x)
    }

    fn feed_forward(&self, x: Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc2.forward(&act(&self.act, &self.fc1.forward(&x)?)?)?;
        self.final_norm.forward(&(x + h)?)
    }

    /// A decoder layer over new positions `x` [b, t, d], with the keys and values of earlier
    /// positions in `past` (extended here) and the encoder's in `cross`.
    fn forward_cached(
        &self,
        x: &Tensor,
        past: &mut Option<(Tensor, Tensor)>,
        cross: &(Tensor, Tensor),
        memory_bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (k, v) = self.self_attn.keys_values(x)?;
        let (k, v) = match past.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        let y = self.self_attn.attend(x, &k, &v, Mask::Causal)?;
        *past = Some((k, v));
        let x = self.self_norm.forward(&(x + y)?)?;
        let x = match &self.cross {
            Some((attn, norm)) => {
                let y = attn.attend(&x, &cross.0, &cross.1, Mask::Bias(memory_bias))?;
                norm.forward(&(&x + y)?)?
            }
            None => x,
        };
        self.feed_forward(x)
    }
}

struct Stack {
    positions: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Stack {
    fn new(cfg: &BartConfig, decoder: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let n = if decoder {
            cfg.decoder_layers
        } else {
            cfg.encoder_layers
        };
        Ok(Stack {
            positions: candle_nn::embedding(
                cfg.max_position_embeddings + 2,
                cfg.d_model,
                vb.pp("embed_positions"),
            )?,
            norm: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("layernorm_embedding"))?,
            layers: (0..n)
                .map(|i| Layer::new(cfg, decoder, vb.pp(format!("layers.{i}"))))
                .collect::<candle_core::Result<_>>()?,
        })
    }
}

impl Attention {
    fn parts(&self) -> AttentionParts<'_> {
        AttentionParts {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            heads: self.heads,
        }
    }
}

/// The encoder's or the decoder's parts: learned positions (row p + 2 for position p), the
/// embedding norm and the layers.
pub struct StackParts<'a> {
    pub positions: &'a Tensor,
    pub norm: &'a LayerNorm,
    pub layers: Vec<LayerParts<'a>>,
}

/// The model's parts as a training pass reads them (see [`Bart::parts`]).
pub struct Parts<'a> {
    /// Token embeddings [vocab, d_model], shared by both stacks and the output layer.
    pub shared: &'a Tensor,
    /// `final_logits_bias` [1, vocab], added to the output layer's logits.
    pub final_logits_bias: &'a Tensor,
    /// The factor on token embeddings (√d_model with `scale_embedding`, else 1).
    pub embed_scale: f64,
    pub activation: &'a str,
    pub encoder: StackParts<'a>,
    pub decoder: StackParts<'a>,
}

impl Stack {
    fn parts(&self) -> StackParts<'_> {
        StackParts {
            positions: self.positions.embeddings(),
            norm: &self.norm,
            layers: self
                .layers
                .iter()
                .map(|l| LayerParts {
                    self_attn: l.self_attn.parts(),
                    self_norm: &l.self_norm,
                    cross: l.cross.as_ref().map(|(a, n)| (a.parts(), n)),
                    fc1: &l.fc1,
                    fc2: &l.fc2,
                    final_norm: &l.final_norm,
                })
                .collect(),
        }
    }
}

pub struct Bart {
    shared: Embedding,
    final_logits_bias: Tensor,
    encoder: Stack,
    decoder: Stack,
    /// The output layer: the shared embeddings plus `final_logits_bias`.
    output: Linear,
    embed_scale: f64,
    pub cfg: BartConfig,
}

impl Bart {
    pub fn new(cfg: &BartConfig, vb: VarBuilder) -> candle_core::Result<Bart> {
        let m = vb.pp("model");
        let shared = if m.contains_tensor("shared.weight")
            || !m.contains_tensor("encoder.embed_tokens.weight")
        {
            candle_nn::embedding(cfg.vocab_size, cfg.d_model, m.pp("shared"))?
        } else {
            candle_nn::embedding(cfg.vocab_size, cfg.d_model, m.pp("encoder.embed_tokens"))?
        };
        let final_logits_bias = vb.get((1, cfg.vocab_size), "final_logits_bias")?;
        let output = Linear::from_weight(
            shared.embeddings().clone(),
            Some(final_logits_bias.reshape(cfg.vocab_size)?),
            "final_logits",
        )?;
        Ok(Bart {
            encoder: Stack::new(cfg, false, m.pp("encoder"))?,
            decoder: Stack::new(cfg, true, m.pp("decoder"))?,
            output,
            embed_scale: if cfg.scale_embedding {
                (cfg.d_model as f64).sqrt()
            } else {
                1.0
            },
            shared,
            final_logits_bias,
            cfg: cfg.clone(),
        })
    }

    /// The parts a hand-written training pass reads.
    pub fn parts(&self) -> Parts<'_> {
        Parts {
            shared: self.shared.embeddings(),
            final_logits_bias: &self.final_logits_bias,
            embed_scale: self.embed_scale,
            activation: &self.cfg.activation_function,
            encoder: self.encoder.parts(),
            decoder: self.decoder.parts(),
        }
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Bart> {
        let dir = crate::resolve_checkpoint(dir);
        let cfg = BartConfig::load(&dir.join("config.json"))?;
        let vb = crate::mmap_weights(&dir, device, None, candle_core::DType::F32)?;
        Bart::new(&cfg, vb).map_err(|e| crate::tensor_error(&dir, e))
    }

    /// Where the weights live.
    pub fn word_device(&self) -> &Device {
        self.shared.embeddings().device()
    }

    fn embed(&self, stack: &Stack, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_from(stack, ids, 0)
    }

    /// Embeddings of `ids` [b, t] at positions `past`.. (learned positions are offset by 2).
    fn embed_from(&self, stack: &Stack, ids: &Tensor, past: usize) -> candle_core::Result<Tensor> {
        let t = ids.dim(1)?;
        if past + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "{} tokens exceed max_position_embeddings ({})",
                past + t,
                self.cfg.max_position_embeddings
            );
        }
        let start = past as u32 + 2;
        let pos = Tensor::arange(start, start + t as u32, ids.device())?;
        let x = (self.shared.forward(ids)? * self.embed_scale)?
            .broadcast_add(&stack.positions.forward(&pos)?)?;
        stack.norm.forward(&x)
    }

    /// Encoder states [b, s, d] for `ids` [b, s] (`mask` 1 for tokens, 0 for padding).
    pub fn encode(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let bias = mask.map(padding_bias).transpose()?;
        let mut x = self.embed(&self.encoder, ids)?;
        for l in &self.encoder.layers {
            x = l.forward(&x, Mask::Bias(bias.as_ref()))?;
        }
        Ok(x)
    }

    /// A decoding cache for the encoder states `memory` [b, s, d] (`memory_mask` 1 for tokens,
    /// 0 for padding): every decoder layer's cross-attention keys and values, computed once.
    pub fn decoder_cache(
        &self,
        memory: &Tensor,
        memory_mask: Option<&Tensor>,
    ) -> candle_core::Result<DecoderCache> {
        let cross_kv = self
            .decoder
            .layers
            .iter()
            .map(|l| match &l.cross {
                Some((attn, _)) => attn.keys_values(memory),
                None => candle_core::bail!("a decoder layer without cross-attention"),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(DecoderCache {
            self_kv: vec![None; self.decoder.layers.len()],
            cross_kv,
            memory_bias: memory_mask.map(padding_bias).transpose()?,
            len: 0,
        })
    }

    /// Logits [b, t, vocab] for the next decoder inputs `ids` [b, t], continuing `cache` (the
    /// positions before them), which takes their keys and values: the same logits as
    /// [`Bart::decode`] over the whole sequence gives at those positions.
    pub fn decode_next(
        &self,
        ids: &Tensor,
        cache: &mut DecoderCache,
    ) -> candle_core::Result<Tensor> {
        let mut x = self.embed_from(&self.decoder, ids, cache.len)?;
        for (i, l) in self.decoder.layers.iter().enumerate() {
            x = l.forward_cached(
                &x,
                &mut cache.self_kv[i],
                &cache.cross_kv[i],
                cache.memory_bias.as_ref(),
            )?;
        }
        cache.len += ids.dim(1)?;
        self.output.forward(&x)
    }

    /// Logits [b, t, vocab] for decoder inputs `ids` [b, t] given encoder states.
    pub fn decode(
        &self,
        ids: &Tensor,
        memory: &Tensor,
        memory_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        // The whole sequence through a fresh cache: one decoder path for training and decoding.
        let mut cache = self.decoder_cache(memory, memory_mask)?;
        self.decode_next(ids, &mut cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, IndexOp};

    fn tiny() -> Bart {
        let cfg: BartConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 23, "d_model": 8, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 16,
            "decoder_ffn_dim": 16, "max_position_embeddings": 32, "scale_embedding": true
        }))
        .unwrap();
        let dev = Device::Cpu;
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let m = Bart::new(&cfg, vb).unwrap();
        // Seeded values for every weight (candle's own initialisation cannot be seeded).
        for (_, var) in lmkit_kernels::testing::vars_by_name(&map) {
            let t = lmkit_kernels::testing::randn(0f32, 0.5, var.shape(), &dev).unwrap();
            var.set(&t).unwrap();
        }
        m
    }

    /// Decoding a token at a time (and in uneven pieces) through the cache gives the logits of
    /// the whole sequence at once, with padding in the encoder input; reordering the cache's rows
    /// reorders the continuation.
    #[test]
    fn cached_decoding_equals_whole_sequence_decoding() {
        let m = tiny();
        let dev = Device::Cpu;
        let src = Tensor::new(&[[3u32, 4, 5, 6, 7], [8, 9, 10, 1, 1]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev).unwrap();
        let memory = m.encode(&src, Some(&mask)).unwrap();
        let tgt =
            Tensor::new(&[[2u32, 11, 12, 13, 14, 15], [2, 16, 17, 18, 19, 20]], &dev).unwrap();
        let whole = m.decode(&tgt, &memory, Some(&mask)).unwrap();
        for cuts in [vec![1, 1, 1, 1, 1, 1], vec![2, 3, 1]] {
            let mut cache = m.decoder_cache(&memory, Some(&mask)).unwrap();
            let mut at = 0;
            for n in cuts {
                let step = m
                    .decode_next(&tgt.narrow(1, at, n).unwrap(), &mut cache)
                    .unwrap();
                let want = whole.narrow(1, at, n).unwrap();
                let diff = lmkit_kernels::testing::max_diff(&step, &want);
                assert!(diff < 1e-5, "positions {at}..{}: {diff}", at + n);
                at += n;
            }
            assert_eq!(cache.len, 6);
        }
        // Swapping the rows of the cache: row 0 continues row 1's sequence.
        let mut cache = m.decoder_cache(&memory, Some(&mask)).unwrap();
        m.decode_next(&tgt.narrow(1, 0, 5).unwrap(), &mut cache)
            .unwrap();
        cache.select(&[1, 1]).unwrap();
        let next = m
            .decode_next(
                &tgt.i((.., 5..6))
                    .unwrap()
                    .i(1..2)
                    .unwrap()
                    .repeat((2, 1))
                    .unwrap(),
                &mut cache,
            )
            .unwrap();
        let want = whole.i((1..2, 5..6)).unwrap();
        assert!(lmkit_kernels::testing::max_diff(&next.i(0..1).unwrap(), &want) < 1e-5);
        assert!(lmkit_kernels::testing::max_diff(&next.i(1..2).unwrap(), &want) < 1e-5);
    }
}
