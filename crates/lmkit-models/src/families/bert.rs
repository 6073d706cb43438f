//! BERT (Devlin et al. 2019): a bidirectional Transformer encoder with the masked-LM head, as
//! transformers' `BertForMaskedLM` lays it out (post-norm layers, learned positions, token types,
//! tied output embeddings), plus mean-pooled sentence embeddings.

use super::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use crate::error::Result;
use crate::layers::attention::{attention, padding_bias, Mask};
use crate::layers::linear::{linear, Linear};
use crate::layers::ops::LayerNorm;
use crate::registry::ModelConfig;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn gelu() -> String {
    "gelu".into()
}
fn eps() -> f64 {
    1e-12
}
fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}

/// transformers' `BertConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
}

impl BertConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            return Err(format!(
                "hidden_act `{}` is not supported (gelu, gelu_new, relu)",
                self.hidden_act
            ));
        }
        Ok(())
    }

    /// Reads and validates a `config.json` with `model_type` "bert".
    pub fn load(path: &Path) -> Result<BertConfig> {
        crate::registry::load_family(path)
    }
}

impl FamilyConfig for BertConfig {
    const MODEL_TYPE: &'static str = "bert";
    const ARCHITECTURE: &'static str = "BertForMaskedLM";
    const KIND: Kind = Kind::Masked;

    fn validate(&self) -> std::result::Result<(), String> {
        BertConfig::validate(self)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn width(&self) -> usize {
        self.hidden_size
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn eos_token_id(&self) -> Option<u32> {
        None
    }
    fn token_id_fields(ids: SpecialIds) -> TokenIdFields {
        vec![("pad_token_id", ids.pad)]
    }
    fn num_parameters(&self) -> u64 {
        let (v, h, i) = (
            self.vocab_size as u64,
            self.hidden_size as u64,
            self.intermediate_size as u64,
        );
        let embeddings =
            (v + self.max_position_embeddings as u64 + self.type_vocab_size as u64) * h + 2 * h;
        let layer = 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h);
        let head = (h * h + h) + 2 * h + v + if self.tie_word_embeddings { 0 } else { v * h };
        embeddings + self.num_hidden_layers as u64 * layer + head
    }
    fn param_role(&self, name: &str) -> ParamRole {
        if name.ends_with("bias") {
            ParamRole::Bias
        } else if name.contains("LayerNorm") {
            ParamRole::NormGain
        } else if name.contains("_embeddings.") {
            ParamRole::Embedding
        } else {
            ParamRole::Weight
        }
    }
    fn into_model_config(self) -> ModelConfig {
        ModelConfig::Bert(self)
    }
}

fn act(name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    match name {
        "relu" => x.relu(),
        "gelu_new" => crate::layers::ops::gelu_tanh(x),
        _ => x.gelu_erf(),
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: String,
}

impl Layer {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Layer> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let a = vb.pp("attention");
        Ok(Layer {
            query: linear(h, h, a.pp("self.query"))?,
            key: linear(h, h, a.pp("self.key"))?,
            value: linear(h, h, a.pp("self.value"))?,
            attn_out: linear(h, h, a.pp("output.dense"))?,
            attn_norm: LayerNorm::new(h, eps, a.pp("output.LayerNorm"))?,
            intermediate: linear(h, i, vb.pp("intermediate.dense"))?,
            output: linear(i, h, vb.pp("output.dense"))?,
            out_norm: LayerNorm::new(h, eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act.clone(),
        })
    }

    /// `bias`: additive attention bias [b, 1, 1, t] (0 for tokens, −∞ for padding), if any.
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(self.query.forward(x)?)? * (1.0 / (d as f64).sqrt()))?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        // Queries scaled before the product, as transformers' BertSelfAttention.
        let y = attention(&q, &k, &v, Mask::Bias(bias), 1.0)?
            .transpose(1, 2)?
            .reshape((b, t, h))?;
        let x = self.attn_norm.forward(&(x + self.attn_out.forward(&y)?)?)?;
        let m = self
            .output
            .forward(&act(&self.act, &self.intermediate.forward(&x)?)?)?;
        self.out_norm.forward(&(x + m)?)
    }
}

pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    head_dense: Linear,
    head_norm: LayerNorm,
    /// The masked-LM output layer (its weight tied to the word embeddings unless untied).
    decoder: Linear,
    pub cfg: BertConfig,
}

impl Bert {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Bert> {
        let h = cfg.hidden_size;
        let e = vb.pp("bert.embeddings");
        let word = embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("bert.encoder.layer.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let p = vb.pp("cls.predictions");
        let decoder = if cfg.tie_word_embeddings {
            word.embeddings().clone()
        } else {
            p.get((cfg.vocab_size, h), "decoder.weight")?
        };
        Ok(Bert {
            position: embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            emb_norm: LayerNorm::new(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?,
            word,
            layers,
            head_dense: linear(h, h, p.pp("transform.dense"))?,
            head_norm: LayerNorm::new(h, cfg.layer_norm_eps, p.pp("transform.LayerNorm"))?,
            decoder: Linear::from_weight(
                decoder,
                Some(p.get(cfg.vocab_size, "bias")?),
                "cls.predictions.decoder",
            ),
            cfg: cfg.clone(),
        })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (f32) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Bert> {
        let dir = crate::resolve_checkpoint(dir);
        let cfg = BertConfig::load(&dir.join("config.json"))?;
        let vb = crate::mmap_weights(&dir, device)?;
        Bert::new(&cfg, vb).map_err(|e| crate::tensor_error(&dir, e))
    }

    /// Last hidden states [b, t, h] for `ids` [b, t]; `mask` [b, t] is 1 for tokens, 0 for padding.
    pub fn hidden(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "{t} tokens exceed max_position_embeddings ({})",
                self.cfg.max_position_embeddings
            );
        }
        let pos = Tensor::arange(0u32, t as u32, ids.device())?;
        let types = Tensor::zeros((b, t), DType::U32, ids.device())?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&pos)?)?
            .add(&self.token_type.forward(&types)?)?;
        let mut x = self.emb_norm.forward(&x)?;
        let bias = mask.map(padding_bias).transpose()?;
        for l in &self.layers {
            x = l.forward(&x, bias.as_ref())?;
        }
        Ok(x)
    }

    /// Where the weights live.
    pub fn word_device(&self) -> &Device {
        self.word.embeddings().device()
    }

    /// Masked-LM logits [b, t, vocab] from hidden states.
    pub fn mlm_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let x = act(&self.cfg.hidden_act, &self.head_dense.forward(hidden)?)?;
        let x = self.head_norm.forward(&x)?;
        self.decoder.forward(&x)
    }

    /// Sentence embeddings [b, h]: the mean of the last hidden states over real tokens.
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.hidden(ids, Some(mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let sum = h.broadcast_mul(&m)?.sum(1)?;
        sum.broadcast_div(&m.sum(1)?.clamp(1e-9, f64::MAX)?)
    }
}

/// Picks positions for masked-LM training (Devlin et al.: 15% of tokens; of those 80% become the
/// mask token, 10% a random token, 10% stay). Returns the corrupted ids and, per position, the
/// id to predict or `None`. `rand` yields uniform numbers in [0, 1).
pub fn mask_tokens(
    ids: &[u32],
    mask_id: u32,
    vocab: u32,
    special: &[u32],
    rand: &mut dyn FnMut() -> f64,
) -> (Vec<u32>, Vec<Option<u32>>) {
    let mut out = ids.to_vec();
    let mut targets = vec![None; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if special.contains(&id) || rand() >= 0.15 {
            continue;
        }
        targets[i] = Some(id);
        let r = rand();
        if r < 0.8 {
            out[i] = mask_id;
        } else if r < 0.9 {
            out[i] = (rand() * vocab as f64) as u32 % vocab;
        }
    }
    (out, targets)
}

/// Last-dim index of the largest value.
pub fn argmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    x.argmax(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_follows_the_80_10_10_rule() {
        let ids: Vec<u32> = (0..200_000).map(|i| 5 + (i % 50)).collect();
        let mut s = 7u64;
        let mut rand = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let (out, t) = mask_tokens(&ids, 1, 60, &[5], &mut rand);
        let picked: Vec<usize> = (0..ids.len()).filter(|&i| t[i].is_some()).collect();
        let share = picked.len() as f64 / ids.len() as f64;
        assert!((share - 0.15 * 49.0 / 50.0).abs() < 0.005, "{share}");
        let masked = picked.iter().filter(|&&i| out[i] == 1).count() as f64 / picked.len() as f64;
        let kept =
            picked.iter().filter(|&&i| out[i] == ids[i]).count() as f64 / picked.len() as f64;
        assert!((masked - 0.8).abs() < 0.01, "{masked}");
        // Kept: 10%, plus random replacements that drew the same token.
        assert!((kept - 0.1).abs() < 0.01, "{kept}");
        assert!(
            ids.iter().zip(&t).all(|(&i, t)| i != 5 || t.is_none()),
            "special tokens are never picked"
        );
    }
}
