//! Rotary position embeddings (Su et al. 2021) in the "rotate half" layout transformers uses:
//! how a config asks for them (`rope_theta` and `rope_scaling` of transformers 4.x, or
//! `rope_parameters` of 5.x) and the cos/sin tables applied to queries and keys, over the whole
//! head or (GPT-NeoX's `rotary_pct`) its first dimensions.

use std::sync::RwLock;

use candle_core::{DType, Device, Tensor, D};

/// How positions rotate queries and keys.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear(f64),
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// A config's `rope_parameters` object, when it has a non-null one.
pub fn parameters(rope_parameters: &Option<serde_json::Value>) -> Option<&serde_json::Value> {
    rope_parameters.as_ref().filter(|v| !v.is_null())
}

impl RopeSpec {
    /// The rotation a config asks for: `rope_parameters` (transformers 5.x: `rope_theta` and the
    /// scaling in one object) or `theta` and `rope_scaling` (4.x). Scaling types other than
    /// linear and llama3 are errors naming the field.
    pub fn from_config(
        theta: f64,
        rope_scaling: &Option<serde_json::Value>,
        rope_parameters: &Option<serde_json::Value>,
    ) -> Result<RopeSpec, String> {
        let params = parameters(rope_parameters);
        let theta = match params.and_then(|p| p.get("rope_theta")) {
            Some(t) => t
                .as_f64()
                .ok_or("rope_parameters.rope_theta must be a number")?,
            None => theta,
        };
        let legacy = rope_scaling.as_ref().filter(|v| !v.is_null());
        if let (Some(_), Some(_)) = (params, legacy) {
            // Both layouts at once (a 5.x config with a 4.x key added): read both, and refuse
            // them unless they ask for the same rotation.
            let new = RopeSpec::from_config(theta, &None, rope_parameters)?;
            let old = RopeSpec::from_config(theta, rope_scaling, &None)?;
            if new.scaling != old.scaling {
                return Err(format!(
                    "rope_parameters ({:?}) and rope_scaling ({:?}) disagree; keep one of them",
                    new.scaling, old.scaling
                ));
            }
            return Ok(new);
        }
        let (scaling, field) = match (params, legacy) {
            (Some(p), _) => (p, "rope_parameters"),
            (None, Some(s)) => (s, "rope_scaling"),
            (None, None) => {
                return Ok(RopeSpec {
                    theta,
                    scaling: RopeScaling::None,
                })
            }
        };
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let num = |k: &str| -> Result<f64, String> {
            scaling
                .get(k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| format!("{field}.{k} is missing or not a number ({kind} scaling)"))
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear(num("factor")?),
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            other => {
                return Err(format!(
                    "{field}: rope type `{other}` is not supported (default, linear, llama3)"
                ))
            }
        };
        Ok(RopeSpec { theta, scaling })
    }

    /// The inverse frequencies θ_i = theta^(-2i/dim) of `dim` rotated dimensions, scaled as the
    /// spec says.
    pub fn inv_freq(&self, dim: usize) -> Vec<f32> {
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
        let scaled: Vec<f64> = match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear(f) => base.iter().map(|v| v / f).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: old,
            } => base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / hi {
                        f
                    } else if wavelen > old / lo {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
        };
        scaled.into_iter().map(|v| v as f32).collect()
    }
}

/// Positions the tables first cover: they grow (doubling) as longer sequences come, up to
/// `max_positions`, so that a config declaring a context of a million positions or more does
/// not cost its whole table at load (1 GiB for a head of 128 at a million).
const FIRST_POSITIONS: usize = 4096;

/// cos/sin tables [positions, rotated/2] applied to the first `rotated` dimensions of each head
/// (all of them unless the model rotates part of the head), for the positions used so far.
pub struct Rope {
    inv_freq: Vec<f32>,
    max_positions: usize,
    dtype: DType,
    device: Device,
    rotated: usize,
    tables: RwLock<Tables>,
}

#[derive(Clone)]
struct Tables {
    positions: usize,
    cos: Tensor,
    sin: Tensor,
    /// [positions, rotated]: each position's cos values, then its sin values.
    table: Tensor,
}

impl Tables {
    /// Positions `0..positions`: each row is computed alone, so a longer table's first rows
    /// equal a shorter one's.
    fn new(
        inv_freq: &[f32],
        positions: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let half = inv_freq.len();
        if positions > u32::MAX as usize {
            candle_core::bail!(
                "rotary tables of {positions} positions (at most {})",
                u32::MAX
            );
        }
        let inv = Tensor::from_slice(inv_freq, (1, half), dev)?;
        let pos = Tensor::arange(0u32, positions as u32, dev)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&inv)?;
        let (cos, sin) = (freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?);
        // The kernels that take the table compute in f32 (f64 for f64 models); a half-precision
        // model's table stays f32, as transformers keeps its rotary frequencies.
        let table = match dtype {
            DType::BF16 | DType::F16 => Tensor::cat(&[&freqs.cos()?, &freqs.sin()?], 1)?,
            _ => Tensor::cat(&[&cos, &sin], 1)?,
        };
        Ok(Tables {
            positions,
            cos,
            sin,
            table,
        })
    }
}

impl Rope {
    pub fn new(
        inv_freq: Vec<f32>,
        max_positions: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let tables = Tables::new(&inv_freq, max_positions.min(FIRST_POSITIONS), dtype, dev)?;
        Ok(Rope {
            rotated: 2 * inv_freq.len(),
            inv_freq,
            max_positions,
            dtype,
            device: dev.clone(),
            tables: RwLock::new(tables),
        })
    }

    /// Tables that cover positions `0..positions` (at most `max_positions`).
    fn tables(&self, positions: usize) -> candle_core::Result<Tables> {
        let wanted = positions.min(self.max_positions);
        {
            let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
            if t.positions >= wanted {
                return Ok(t.clone());
            }
        }
        let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
        if t.positions < wanted {
            let grown = wanted.max(2 * t.positions).min(self.max_positions);
            *t = Tables::new(&self.inv_freq, grown, self.dtype, &self.device)?;
        }
        Ok(t.clone())
    }

    /// The table [at least `positions` (up to `max_positions`), rotated] (each position's cos
    /// values, then its sin values; f32 for a half-precision model) and how many leading values
    /// of a head it rotates.
    pub fn table(&self, positions: usize) -> candle_core::Result<(Tensor, usize)> {
        Ok((self.tables(positions)?.table, self.rotated))
    }

    /// `x` [b, h, t, d] at positions `start..start + t`, rotated.
    pub fn apply(&self, x: &Tensor, start: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        let tables = self.tables(start + t)?;
        let cos = tables.cos.narrow(0, start, t)?;
        let sin = tables.sin.narrow(0, start, t)?;
        let d = x.dim(D::Minus1)?;
        if self.rotated == 0 {
            return Ok(x.clone());
        }
        if self.rotated >= d {
            return crate::layers::ops::rope(x, &cos, &sin);
        }
        let turned = crate::layers::ops::rope(&x.narrow(D::Minus1, 0, self.rotated)?, &cos, &sin)?;
        let kept = x.narrow(D::Minus1, self.rotated, d - self.rotated)?;
        Tensor::cat(&[&turned, &kept], D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_rotation_turns_the_first_dimensions_only() {
        let dev = Device::Cpu;
        let x = lmkit_kernels::testing::randn(0f32, 1.0, &[1, 2, 5, 8], &dev).unwrap();
        let spec = RopeSpec::from_config(10_000.0, &None, &None).unwrap();
        let part = Rope::new(spec.inv_freq(4), 16, DType::F32, &dev).unwrap();
        let y = part.apply(&x, 3).unwrap();
        let whole = Rope::new(spec.inv_freq(4), 16, DType::F32, &dev).unwrap();
        let head = whole.apply(&x.narrow(3, 0, 4).unwrap(), 3).unwrap();
        assert!(lmkit_kernels::testing::max_diff(&y.narrow(3, 0, 4).unwrap(), &head) < 1e-6);
        assert!(
            lmkit_kernels::testing::max_diff(
                &y.narrow(3, 4, 4).unwrap(),
                &x.narrow(3, 4, 4).unwrap()
            ) == 0.0
        );
        // Position 0 is not rotated at all.
        let y0 = part.apply(&x.narrow(2, 0, 1).unwrap(), 0).unwrap();
        assert!(lmkit_kernels::testing::max_diff(&y0, &x.narrow(2, 0, 1).unwrap()) < 1e-7);
    }

    #[test]
    fn tables_grow_with_the_positions_used_and_equal_tables_built_whole() {
        let dev = Device::Cpu;
        let inv = RopeSpec::from_config(10_000.0, &None, &None)
            .unwrap()
            .inv_freq(8);
        // A context of 10^12 positions costs a table of the first ones at load.
        let rope = Rope::new(inv.clone(), 1 << 40, DType::F32, &dev).unwrap();
        let (first, rotated) = rope.table(10).unwrap();
        assert_eq!((first.dims2().unwrap(), rotated), ((FIRST_POSITIONS, 8), 8));
        let (grown, _) = rope.table(FIRST_POSITIONS + 1).unwrap();
        assert_eq!(grown.dim(0).unwrap(), 2 * FIRST_POSITIONS);
        let whole = Tables::new(&inv, 3 * FIRST_POSITIONS, DType::F32, &dev).unwrap();
        let head = |t: &Tensor, n: usize| t.narrow(0, 0, n).unwrap();
        assert_eq!(
            lmkit_kernels::testing::max_diff(&grown, &head(&whole.table, 2 * FIRST_POSITIONS)),
            0.0
        );
        // Rotating positions past the tables grows them; the result is the whole table's.
        let x = lmkit_kernels::testing::randn(0f32, 1.0, &[1, 2, 3, 8], &dev).unwrap();
        let start = 2 * FIRST_POSITIONS + 7;
        let y = rope.apply(&x, start).unwrap();
        let (cos, sin) = (
            whole.cos.narrow(0, start, 3).unwrap(),
            whole.sin.narrow(0, start, 3).unwrap(),
        );
        let want = crate::layers::ops::rope(&x, &cos, &sin).unwrap();
        assert_eq!(lmkit_kernels::testing::max_diff(&y, &want), 0.0);
        assert_eq!(
            rope.table(0).unwrap().0.dim(0).unwrap(),
            4 * FIRST_POSITIONS
        );
        // Never past the model's positions.
        let short = Rope::new(inv, 100, DType::F32, &dev).unwrap();
        assert_eq!(short.table(1_000).unwrap().0.dim(0).unwrap(), 100);
    }

    #[test]
    fn rope_parameters_take_precedence_and_unknown_types_are_refused() {
        let p =
            Some(serde_json::json!({"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0}));
        let spec = RopeSpec::from_config(10_000.0, &None, &p).unwrap();
        assert_eq!(spec.theta, 500.0);
        assert_eq!(spec.scaling, RopeScaling::Linear(2.0));
        let bad = Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
        let e = RopeSpec::from_config(10_000.0, &bad, &None).unwrap_err();
        assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
        // A 4.x key beside a 5.x object is read too: refused when unsupported or different,
        // accepted when it says the same.
        let default = Some(serde_json::json!({"rope_theta": 500.0, "rope_type": "default"}));
        let e = RopeSpec::from_config(10_000.0, &bad, &default).unwrap_err();
        assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
        let linear = Some(serde_json::json!({"rope_type": "linear", "factor": 2.0}));
        let e = RopeSpec::from_config(10_000.0, &linear, &default).unwrap_err();
        assert!(e.contains("disagree"), "{e}");
        let same = RopeSpec::from_config(10_000.0, &linear, &p).unwrap();
        assert_eq!(
            (same.theta, same.scaling),
            (500.0, RopeScaling::Linear(2.0))
        );
    }
}
