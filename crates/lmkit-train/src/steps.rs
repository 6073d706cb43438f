//! The optimisation loop every run shares (pretraining and fine-tuning): accumulation of micro
//! batches, clipping, the AdamW step on the schedule, metrics, validation, checkpoints, the
//! time limit and stopping on a signal. What a micro batch is, how validation is scored and what
//! a checkpoint holds are the caller's.

use crate::adamw::{clip_scale, grad_norm, lr_at, AdamW};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::group::Group;
use crate::metrics::{self, Extra};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};
use lmkit_core::{Progress, Unit};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Gradients of one step, summed over its micro batches, aligned with the optimizer's params.
pub(crate) struct Grads {
    sums: Vec<Option<Tensor>>,
    /// Whether each sum is a tensor made here (no one else holds it: it may be added to in
    /// place).
    owned: Vec<bool>,
    params: Vec<Tensor>,
    index: HashMap<TensorId, usize>,
}

impl Grads {
    fn new(opt: &AdamW) -> Self {
        Grads {
            sums: vec![None; opt.params.len()],
            owned: vec![false; opt.params.len()],
            params: opt
                .params
                .iter()
                .map(|p| p.var.as_tensor().clone())
                .collect(),
            index: opt
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.var.as_tensor().id(), i))
                .collect(),
        }
    }

    /// Adds `scale`·g to the sum of parameter `i`'s gradient: in place once the sum is a tensor
    /// of its own (a step of several passes then makes no full-size temporaries), as new
    /// tensors otherwise.
    fn accumulate(&mut self, i: usize, g: Tensor, scale: f64) -> Result<()> {
        let acc = &mut self.sums[i];
        let (sum, owned) = match acc.take() {
            None if scale == 1.0 => (g, false),
            None => ((g * scale)?, true),
            Some(a)
                if self.owned[i] && lmkit_kernels::adamw::add_scaled_in_place(&a, &g, scale)? =>
            {
                (a, true)
            }
            Some(a) if scale == 1.0 => ((a + g)?, true),
            Some(a) => ((a + (g * scale)?)?, true),
        };
        *acc = Some(sum);
        self.owned[i] = owned;
        Ok(())
    }

    /// Adds `g` to the gradient of the parameter whose tensor is `param` (others are ignored).
    pub(crate) fn add(&mut self, param: TensorId, g: Tensor) -> Result<()> {
        match self.index.get(&param) {
            Some(&i) => self.accumulate(i, g, 1.0),
            None => Ok(()),
        }
    }

    /// Adds `scale` times each (parameter, gradient) pair's gradient (see [`Grads::add`]).
    pub(crate) fn add_all(&mut self, g: Vec<(Tensor, Tensor)>, scale: f64) -> Result<()> {
        for (p, gi) in g {
            if let Some(&i) = self.index.get(&p.id()) {
                self.accumulate(i, gi, scale)?;
            }
        }
        Ok(())
    }

    /// Whether `param` is one of the trained parameters.
    pub(crate) fn trains(&self, param: &Tensor) -> bool {
        self.index.contains_key(&param.id())
    }

    /// Differentiates `loss` and adds every parameter's gradient.
    pub(crate) fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let g = self.gradients_of(loss)?;
        for (i, gi) in g.into_iter().enumerate() {
            if let Some(gi) = gi {
                self.accumulate(i, gi, 1.0)?;
            }
        }
        Ok(())
    }

    /// The gradients of `loss` by each parameter (none where it does not depend on one), kept
    /// apart from the step's sums.
    pub(crate) fn gradients_of(&self, loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g: GradStore = loss.backward()?;
        Ok(self
            .params
            .iter()
            .map(|p| g.get(p).map(|gi| gi.detach()))
            .collect())
    }

    /// Adds `scale` times gradients from [`Grads::gradients_of`] to the step's sums.
    pub(crate) fn add_scaled(&mut self, g: Vec<Option<Tensor>>, scale: f64) -> Result<()> {
        for (i, gi) in g.into_iter().enumerate() {
            if let Some(gi) = gi {
                self.accumulate(i, gi, scale)?;
            }
        }
        Ok(())
    }

    fn finish(self, opt: &AdamW) -> Result<Vec<Tensor>> {
        Ok(self
            .sums
            .into_iter()
            .zip(&opt.params)
            .map(|(g, p)| g.map_or_else(|| p.var.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?)
    }
}

/// Where a run stands: at its start (0, or what a resumed checkpoint recorded) and at its end.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Position {
    pub step: usize,
    pub tokens_seen: u64,
    /// Seconds trained before this process (a resumed run's earlier time).
    pub elapsed: f64,
}

/// One micro batch's share of its step's mean loss, and the tokens it trained on.
pub(crate) struct Micro {
    pub loss: f64,
    pub tokens: u64,
    /// Other quantities the run logs (each the micro batch's mean; the step logs their mean
    /// over its micro batches).
    pub extra: Extra,
}

impl Micro {
    pub(crate) fn new(loss: f64, tokens: u64) -> Micro {
        Micro {
            loss,
            tokens,
            extra: Extra::new(),
        }
    }
}

/// A validation: its loss and what else the run logs about it.
pub(crate) struct Validation {
    pub loss: f64,
    pub extra: Extra,
}

impl Validation {
    /// Its line in metrics.jsonl, after `step`.
    pub(crate) fn record(&self, step: usize) -> metrics::Record {
        metrics::Record {
            extra: self.extra.clone(),
            ..metrics::Record::validation(step, self.loss)
        }
    }
}

impl From<f64> for Validation {
    fn from(loss: f64) -> Self {
        Validation {
            loss,
            extra: Extra::new(),
        }
    }
}

/// What the loop calls.
pub(crate) struct Hooks<'a> {
    /// Runs micro batch `micro` of step `step` (0-based), adding its gradients: those of its
    /// share of the step's loss (its mean divided by the number of micro batches, say).
    pub micro: &'a mut dyn FnMut(usize, usize, &mut Grads) -> Result<Micro>,
    /// The validation loss, if the run has validation data.
    pub evaluate: &'a mut dyn FnMut() -> Result<Option<Validation>>,
    /// Writes a checkpoint after `step` and returns its directory.
    pub save: &'a mut dyn FnMut(&AdamW, Position) -> Result<PathBuf>,
}

pub(crate) struct End {
    pub at: Position,
    pub last_loss: f64,
    pub last_val: Option<f64>,
    pub checkpoint: PathBuf,
}

impl End {
    /// What the run reports, with its trained parameter count.
    pub(crate) fn summary(self, parameters: usize) -> crate::Summary {
        crate::Summary {
            steps: self.at.step,
            final_loss: self.last_loss,
            val_loss: self.last_val,
            checkpoint: self.checkpoint,
            tokens_per_sec: self.at.tokens_seen as f64 / self.at.elapsed.max(1e-9),
            parameters,
        }
    }
}

/// The group's mean of every member's gradients and loss (each member computed them on its
/// share of the batch), and whether any member reached the time limit or was asked to stop.
fn reduce(
    group: &mut Group,
    grads: Vec<Tensor>,
    loss: f64,
    flags: [bool; 2],
) -> Result<(Vec<Tensor>, f64, [bool; 2])> {
    let inv = 1.0 / group.world() as f64;
    // On GPUs with NCCL: the gradients' mean on the GPUs, the loss and flags over TCP.
    #[cfg(feature = "cuda")]
    if let Some(comm) = group.gpus() {
        let mean = comm.mean(&grads)?;
        let mut buf = [loss as f32, flags[0] as u8 as f32, flags[1] as u8 as f32];
        group.all_reduce_sum(&mut buf)?;
        return Ok((mean, buf[0] as f64 * inv, [buf[1] > 0.0, buf[2] > 0.0]));
    }
    let total: usize = grads.iter().map(Tensor::elem_count).sum();
    let mut buf = Vec::with_capacity(total + 3);
    for g in &grads {
        crate::safetensors_io::with_f32_values(g, |values| {
            buf.extend_from_slice(values);
            Ok(())
        })?;
    }
    buf.push(loss as f32);
    buf.extend(flags.map(|f| f as u8 as f32));
    group.all_reduce_sum(&mut buf)?;
    let flags = [buf[total + 1] > 0.0, buf[total + 2] > 0.0];
    let loss = buf[total] as f64 * inv;
    // The mean, scaled where it lies (one pass) and then copied into each gradient's tensor.
    let scale = inv as f32;
    buf[..total].iter_mut().for_each(|v| *v *= scale);
    let mut at = 0;
    let mut mean = Vec::with_capacity(grads.len());
    for g in &grads {
        let n = g.elem_count();
        let sum = Tensor::from_slice(&buf[at..at + n], g.shape(), g.device())?;
        mean.push(sum.to_dtype(g.dtype())?);
        at += n;
    }
    Ok((mean, loss, flags))
}

/// Refuses to save weights that are no longer finite — an update whose learning rate or weight
/// decay was far too large, or a gradient that overflowed —, which a checkpoint would keep and a
/// finished run would hide (the loss is measured before the update that broke them).
fn check_weights(opt: &AdamW, step: usize) -> Result<()> {
    for p in &opt.params {
        let w = p.var.as_tensor();
        // x − x is 0 for every finite x and NaN for ±inf and NaN: the sum says if any is not.
        let s = w
            .sub(w)?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        if !s.is_finite() {
            return Err(TrainError::Data(format!(
                "the weights of {} are no longer finite after step {step}; lower train.lr or \
                 train.weight_decay (no checkpoint written for this step)",
                p.name
            )));
        }
    }
    Ok(())
}

/// Trains from `from` to `t.max_steps` (or the time limit, or a stop request).
pub(crate) fn run(
    t: &TrainConfig,
    opt: &mut AdamW,
    from: Position,
    metrics_path: &Path,
    progress: &dyn Progress,
    group: &mut Group,
    hooks: Hooks,
) -> Result<End> {
    let Hooks {
        micro,
        evaluate,
        save,
    } = hooks;
    let mut at = from;
    progress.begin("training", t.max_steps as u64, Unit::Steps);
    progress.set_position(at.step as u64);
    let t0 = Instant::now();
    let now = |at: Position| Position {
        elapsed: from.elapsed + t0.elapsed().as_secs_f64(),
        ..at
    };
    let mut last_loss = f64::NAN;
    let mut last_val = None;
    let mut window_tokens = 0u64;
    let mut window_start = Instant::now();
    let mut tps = 0.0;
    let mut checkpoint_dir = None;
    // Only rank 0 of a group logs, validates and saves.
    let writer = group.is_root();
    // The time limit reached, a stop requested.
    let limits = || {
        [
            t.max_time.is_some_and(|m| t0.elapsed().as_secs_f64() >= m),
            lmkit_core::stop::requested(),
        ]
    };
    while at.step < t.max_steps {
        let lr = lr_at(at.step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
        let mut grads = Grads::new(opt);
        let (mut loss_sum, mut n_tok) = (0.0, 0u64);
        let mut extra = Extra::new();
        for m in 0..t.grad_accum {
            let r = micro(at.step, m, &mut grads)?;
            loss_sum += r.loss;
            n_tok += r.tokens;
            for (k, v) in r.extra {
                *extra.entry(k).or_default() += v / t.grad_accum as f64;
            }
        }
        let grads = grads.finish(opt)?;
        // Whether this step is the last (time limit, stop request): in a group, every member
        // stops if one does, so that none waits for the others' gradients.
        let [mut out_of_time, mut interrupted] = limits();
        let grads = if group.world() > 1 {
            let flags = [out_of_time, interrupted];
            let exchange = Instant::now();
            let (g, loss, flags) = reduce(group, grads, loss_sum, flags)?;
            // This member's time in the exchange: waiting for the others, and the sum through
            // the CPU (on GPUs, NCCL's all-reduce is queued on the GPU and not in this time).
            extra.insert(
                "group_exchange_secs".into(),
                exchange.elapsed().as_secs_f64(),
            );
            loss_sum = loss;
            n_tok *= group.world() as u64;
            [out_of_time, interrupted] = flags;
            g
        } else {
            grads
        };
        let norm = grad_norm(&grads)?;
        opt.step(&grads, lr, clip_scale(norm, t.grad_clip))?;
        at.step += 1;
        last_loss = loss_sum;
        if !last_loss.is_finite() {
            return Err(TrainError::Data(format!(
                "loss became {last_loss} at step {}; lower train.lr or check the data",
                at.step
            )));
        }
        at.tokens_seen += n_tok;
        window_tokens += n_tok;
        progress.set_position(at.step as u64);
        progress.status(&format!("loss {last_loss:.4}  {tps:.0} tok/s"));
        if writer && (at.step.is_multiple_of(t.log_every.max(1)) || at.step == t.max_steps) {
            tps = window_tokens as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
            window_tokens = 0;
            window_start = Instant::now();
            metrics::append(
                metrics_path,
                &metrics::Record {
                    step: at.step,
                    loss: Some(last_loss),
                    lr: Some(lr),
                    grad_norm: Some(norm),
                    tokens_per_sec: Some(tps),
                    tokens: Some(at.tokens_seen),
                    val_loss: None,
                    extra,
                },
            )?;
        }
        if writer
            && t.eval_every > 0
            && (at.step.is_multiple_of(t.eval_every) || at.step == t.max_steps)
        {
            let validation = evaluate()?;
            last_val = validation.as_ref().map(|v| v.loss);
            if let Some(v) = validation {
                metrics::append(metrics_path, &v.record(at.step))?;
                let v = v.loss;
                if !v.is_finite() {
                    // Weights still finite but so large that the logits overflow (or rows that
                    // give no loss).
                    return Err(TrainError::Data(format!(
                        "validation loss became {v} after step {}; lower train.lr or \
                         train.weight_decay, or check the validation data (no checkpoint \
                         written for this step)",
                        at.step
                    )));
                }
                progress.message(&format!(
                    "step {}: train loss {last_loss:.4}, validation loss {v:.4}",
                    at.step
                ));
            }
        }
        if group.world() == 1 {
            [out_of_time, interrupted] = limits();
        }
        if writer
            && ((t.save_every > 0 && at.step.is_multiple_of(t.save_every))
                || at.step == t.max_steps
                || out_of_time
                || interrupted)
        {
            check_weights(opt, at.step)?;
            checkpoint_dir = Some(save(opt, now(at))?);
        }
        if out_of_time {
            progress.message(&format!("train.max_time reached at step {}", at.step));
            break;
        }
        if interrupted {
            progress.message(&format!(
                "stopped at step {} with a checkpoint; continue with --resume",
                at.step
            ));
            break;
        }
    }
    progress.finish();
    let checkpoint = match checkpoint_dir {
        Some(d) => d,
        None if writer => {
            check_weights(opt, at.step)?;
            save(opt, now(at))?
        }
        // Other members: the run's directory (rank 0 wrote the checkpoint).
        None => metrics_path
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    Ok(End {
        at: now(at),
        last_loss,
        last_val,
        checkpoint,
    })
}

#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;

    /// The NCCL path of a step's reduction on the one GPU the tests get: a communicator of one
    /// member gives each gradient back (in new buffers), the loss and flags through TCP's path.
    #[test]
    fn gpu_group_reduces_gradients_with_nccl() {
        let Some(dev) = crate::passes::testing::gpu() else {
            return;
        };
        let mut group = Group::single_with_nccl(&dev).unwrap();
        assert!(group.gpus().is_some());
        let grads = vec![
            Tensor::arange(0f32, 12.0, &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
            Tensor::new(&[0.5f32, -2.0], &dev).unwrap(),
        ];
        let (mean, loss, flags) = reduce(&mut group, grads.clone(), 2.5, [false, true]).unwrap();
        assert_eq!((loss, flags), (2.5, [false, true]));
        for (g, m) in grads.iter().zip(&mean) {
            assert!(m.device().is_cuda());
            let (a, b) = (g.flatten_all().unwrap(), m.flatten_all().unwrap());
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
    }
}
