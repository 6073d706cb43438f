//! Sentence vectors from an encoder's token states, as sentence-transformers computes them: the
//! `Pooling` module (mean, CLS, max or mean-sqrt-len over real tokens) and `Normalize`, read from
//! a model directory's `modules.json`.

use crate::error::Result;
use candle_core::Tensor;
use std::path::Path;

/// How token states become one sentence vector (sentence-transformers' Pooling and Normalize
/// modules).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PoolingMode {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pooling {
    pub mode: PoolingMode,
    /// L2-normalise the pooled vector.
    pub normalize: bool,
    /// Tokens read per text (longer texts are cut), when the model says.
    pub max_seq_length: Option<usize>,
}

impl Default for Pooling {
    fn default() -> Self {
        Pooling {
            mode: PoolingMode::Mean,
            normalize: false,
            max_seq_length: None,
        }
    }
}

impl Pooling {
    /// The pooling of a sentence-transformers directory (`modules.json`); mean pooling without
    /// normalisation for a plain encoder directory. Modules that would change the vectors and are
    /// not supported (Dense layers, other pooling modes) are errors naming the file.
    pub fn load(dir: &Path) -> Result<Pooling> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(Pooling::default());
        }
        let bad = |path: &Path, msg: String| crate::ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let modules = crate::registry::read_json(&modules_path)?;
        let list = modules
            .as_array()
            .ok_or_else(|| bad(&modules_path, "expected a list of modules".into()))?;
        let mut pooling = Pooling::default();
        for m in list {
            let kind = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
            let sub = dir.join(m.get("path").and_then(|p| p.as_str()).unwrap_or(""));
            match kind.rsplit('.').next().unwrap_or("") {
                "Transformer" => {
                    let cfg = sub.join("sentence_bert_config.json");
                    if cfg.exists() {
                        let v = crate::registry::read_json(&cfg)?;
                        pooling.max_seq_length = v
                            .get("max_seq_length")
                            .and_then(|n| n.as_u64())
                            .map(|n| n as usize);
                    }
                }
                "Pooling" => {
                    let cfg_path = sub.join("config.json");
                    let v = crate::registry::read_json(&cfg_path)?;
                    let on = |k: &str| v.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
                    let modes: Vec<PoolingMode> = [
                        ("pooling_mode_mean_tokens", PoolingMode::Mean),
                        ("pooling_mode_cls_token", PoolingMode::Cls),
                        ("pooling_mode_max_tokens", PoolingMode::Max),
                        (
                            "pooling_mode_mean_sqrt_len_tokens",
                            PoolingMode::MeanSqrtLen,
                        ),
                    ]
                    .into_iter()
                    .filter(|(k, _)| on(k))
                    .map(|(_, m)| m)
                    .collect();
                    for other in ["pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"] {
                        if on(other) {
                            return Err(bad(&cfg_path, format!("`{other}` is not supported")));
                        }
                    }
                    if v.get("include_prompt").and_then(|b| b.as_bool()) == Some(false) {
                        return Err(bad(
                            &cfg_path,
                            "`include_prompt: false` is not supported".into(),
                        ));
                    }
                    match modes.as_slice() {
                        [one] => pooling.mode = *one,
                        _ => {
                            return Err(bad(
                                &cfg_path,
                                format!(
                                    "exactly one pooling mode must be on (found {})",
                                    modes.len()
                                ),
                            ))
                        }
                    }
                }
                "Normalize" => pooling.normalize = true,
                _ => {
                    return Err(bad(
                        &modules_path,
                        format!(
                            "module `{kind}` is not supported (Transformer, Pooling, Normalize)"
                        ),
                    ))
                }
            }
        }
        Ok(pooling)
    }

    /// Sentence vectors [b, h] from token states [b, t, h] and `mask` [b, t] (1 = token).
    pub fn pool(&self, h: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let m = mask.to_dtype(h.dtype())?.unsqueeze(2)?;
        let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        let v = match self.mode {
            PoolingMode::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
            PoolingMode::Mean => h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&count)?,
            PoolingMode::MeanSqrtLen => {
                h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&count.sqrt()?)?
            }
            PoolingMode::Max => {
                // Padding gets a large negative value, as sentence-transformers does.
                let neg = ((m.ones_like()? - &m)? * -1e9)?;
                h.broadcast_add(&neg)?.max(1)?
            }
        };
        if !self.normalize {
            return Ok(v);
        }
        let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        v.broadcast_div(&norm)
    }
}
