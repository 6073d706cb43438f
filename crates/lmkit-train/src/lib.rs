//! Training: the causal-LM objective on token shards with AdamW (no decay on norms, biases and
//! embeddings), linear warmup + cosine decay, gradient clipping and accumulation, deterministic
//! seeding (batch contents depend only on seed and step), periodic validation, atomic checkpoints
//! and an exact resume, `metrics.jsonl` and a loss plot.
#![forbid(unsafe_code)]

pub mod adamw;
pub mod checkpoint;
pub mod config;
mod data;
pub mod dpo;
pub mod error;
pub mod finetune;
pub mod group;
mod init;
pub mod merge;
pub mod metrics;
mod objective;
pub mod passes;
pub mod pref;
pub mod reward;
pub mod rl;
pub mod safetensors_io;
pub mod seq2seq;
pub mod sft;
mod steps;

pub use checkpoint::Start;
pub use config::{DataConfig, RunConfig, TrainConfig};
pub use dpo::{dpo, DpoConfig};
pub use error::{Result, TrainError};
pub use finetune::{finetune, FinetuneConfig};

use adamw::AdamW;
use candle_core::DType;
use candle_nn::{VarBuilder, VarMap};
use data::{Batches, Split};
use init::{hf_config, init_weights, params};
use lmkit_models::{Kind, KvCache, SpecialIds};
use lmkit_tokenize::TokenDataset;
use objective::{loss_with, pair_batch, pair_loss, stream_loss, Net};
use std::path::{Path, PathBuf};
use steps::{Grads, Micro};

use lmkit_core::rng::mix;
pub use lmkit_core::{NoProgress, Progress};

pub struct Summary {
    pub steps: usize,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub checkpoint: PathBuf,
    pub tokens_per_sec: f64,
    pub parameters: usize,
}

/// Sets the precision of the CPU's products from `train.dtype` (bf16: on AMX tiles, which
/// `validate_train` checked) and says which product runs: for `lmkit train` and the tuning
/// commands alike.
pub(crate) fn cpu_products(t: &config::TrainConfig, progress: &dyn Progress) {
    let bf16 = t.dtype == config::Precision::Bf16;
    lmkit_kernels::blas::set_bf16_products(bf16);
    let tiles = if bf16 {
        "; bf16 products on AMX tiles"
    } else {
        ""
    };
    progress.message(&format!(
        "CPU matmul: {}{tiles}",
        lmkit_kernels::blas::backend()
    ));
}

/// Trains per `cfg`: a new run, or (`Start::Resume`) the run in `out_dir` from its `latest`
/// checkpoint. A new run refuses a directory that holds another run unless `Start::Overwrite`.
pub fn train(cfg: &RunConfig, start: Start, progress: &dyn Progress) -> Result<Summary> {
    let resume = start == Start::Resume;
    let t = &cfg.train;
    // Before anything runs on the worker threads: one of several members on this machine takes
    // its share of the cores.
    if let Some(n) = group::share_cores()? {
        progress.message(&format!(
            "worker threads: {n} (this machine's cores shared by LOCAL_WORLD_SIZE processes; RAYON_NUM_THREADS sets them)"
        ));
    }
    let tk_path = &cfg.data.tokenizer;
    let tokenizer = lmkit_tokenize::load(tk_path)?;
    let tk_dir = if tk_path.is_dir() {
        tk_path.clone()
    } else {
        tk_path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let eot = tokenizer.token_to_id(lmkit_tokenize::ENDOFTEXT);
    let tk_vocab = tokenizer.get_vocab_size(true);
    let pad = tokenizer.token_to_id(lmkit_core::tokens::PAD);
    let (config_json, model_cfg) = hf_config(&cfg.model, tk_vocab, SpecialIds { eot, pad })?;
    let seq2seq = model_cfg.kind() == Kind::Seq2seq;
    if tk_vocab > model_cfg.vocab_size() {
        return Err(TrainError::Data(format!(
            "the tokenizer has {tk_vocab} tokens but [model] vocab_size is {}",
            model_cfg.vocab_size()
        )));
    }
    if !seq2seq && t.seq_len > model_cfg.max_positions() {
        return Err(TrainError::Data(format!(
            "train.seq_len ({}) exceeds the model's positions ({})",
            t.seq_len,
            model_cfg.max_positions()
        )));
    }

    let seq = if seq2seq {
        model_cfg.max_positions()
    } else {
        t.seq_len
    };
    init::check_memory(&model_cfg, t.batch_size, seq)?;
    let ds: TokenDataset;
    let val_ds: Option<TokenDataset>;
    let data = if seq2seq {
        let (train, val) = seq2seq::load_pairs(
            &cfg.data.train,
            cfg.data.val.as_deref(),
            cfg.data.val_fraction,
            &tokenizer,
            model_cfg.max_positions(),
        )?;
        Batches::Pairs { train, val }
    } else {
        ds = TokenDataset::open_dir(&cfg.data.train)?;
        if ds.vocab_size() > model_cfg.vocab_size() {
            return Err(TrainError::Data(format!(
                "{}: shards use a vocabulary of {} but the model has {}",
                cfg.data.train.display(),
                ds.vocab_size(),
                model_cfg.vocab_size()
            )));
        }
        val_ds = match &cfg.data.val {
            Some(p) => Some(TokenDataset::open_dir(p)?),
            None => None,
        };
        let need = t.seq_len as u64 + 2;
        let held = if val_ds.is_none() {
            (ds.len() as f64 * cfg.data.val_fraction) as u64
        } else {
            0
        };
        let train_split = Split {
            ds: &ds,
            start: 0,
            len: ds.len() - held,
        };
        let val_split = match &val_ds {
            Some(v) => Some(Split {
                ds: v,
                start: 0,
                len: v.len(),
            }),
            None if held >= need => Some(Split {
                ds: &ds,
                start: ds.len() - held,
                len: held,
            }),
            None => None,
        };
        if train_split.len < need || val_split.as_ref().is_some_and(|v| v.len < need) {
            return Err(TrainError::Data(format!(
                "{}: {} tokens is too few for train.seq_len {} (and the validation hold-out)",
                cfg.data.train.display(),
                ds.len(),
                t.seq_len
            )));
        }
        Batches::Stream {
            train: train_split,
            val: val_split,
        }
    };

    // Data-parallel training: this process's share of each batch (see `group`).
    let fingerprint =
        xxhash_rust::xxh3::xxh3_64(toml::to_string(cfg).unwrap_or_default().as_bytes());
    let mut group = group::Group::from_env(fingerprint)?;
    let device = match std::env::var("LOCAL_RANK") {
        Ok(local) if group.world() > 1 && t.device == "cuda" => format!("cuda:{}", local.trim()),
        _ => t.device.clone(),
    };
    let dev = lmkit_models::parse_device(&device)?;
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(t.tf32);
        lmkit_kernels::cuda::set_bf16_products(t.dtype == config::Precision::Bf16);
    }
    if dev.is_cpu() {
        cpu_products(t, progress);
    }
    if let Some(how) = group.join_gpus(&dev)? {
        if group.is_root() {
            progress.message(&format!("{} processes on GPUs: {how}", group.world()));
        }
    }
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let model = Net::build(&model_cfg, vb, &tokenizer, tk_path)?;
    let n_layer = model_cfg.num_layers();
    init_weights(&vm, &model_cfg, t.seed, &dev)?;
    let mut opt = AdamW::new(
        params(&vm, &model_cfg)?,
        t.beta1,
        t.beta2,
        t.eps,
        t.weight_decay,
    )?;
    let n_params: usize = opt.params.iter().map(|p| p.var.elem_count()).sum();
    let out = &t.out_dir;
    let writer = group.is_root();
    // Only rank 0 writes the run's files.
    let metrics_path = if writer {
        checkpoint::prepare(out, start)?
    } else {
        out.join("metrics.jsonl")
    };
    let mut run_id = checkpoint::new_run_id();

    // Recurrent models carry their state from one window of a stream to the next.
    let mut carried: Option<KvCache> = match &model {
        Net::Causal(m) if m.is_recurrent() => Some(m.new_cache()),
        _ => None,
    };
    if group.world() > 1 && (seq2seq || carried.is_some()) {
        return Err(TrainError::Group(
            "data-parallel training (WORLD_SIZE > 1) takes models trained on token shards \
             without carried state (GPT-2, Llama-style, BERT); train this one in one process"
                .into(),
        ));
    }
    let mut step = 0usize;
    let mut tokens_seen = 0u64;
    let mut elapsed_before = 0.0;
    if resume {
        let (dir, state, moments) =
            checkpoint::restore(out, &mut opt, "model.safetensors", &config_json, &dev)?;
        if let Some(cache) = &mut carried {
            for l in 0..n_layer {
                if let Some(h) = moments.get(&format!("carried.{l}.h")) {
                    cache.set_recurrent(
                        l,
                        h.clone(),
                        moments.get(&format!("carried.{l}.c")).cloned(),
                    );
                }
            }
        }
        if !state.run_id.is_empty() {
            run_id = state.run_id.clone();
        }
        step = state.step;
        tokens_seen = state.tokens_seen;
        elapsed_before = state.elapsed_seconds;
        if writer {
            metrics::truncate_after(&metrics_path, step)?;
        }
        progress.message(&format!("resumed from {} at step {step}", dir.display()));
    }
    let toml_text = toml::to_string_pretty(cfg).unwrap_or_default();
    if writer {
        lmkit_core::write_atomic_bytes(&out.join("run.toml"), toml_text.as_bytes())?;
    }

    let generation_config = serde_json::json!({ "bos_token_id": eot, "eos_token_id": eot, "do_sample": true, "temperature": 0.8, "top_p": 0.95 });
    let tk_files = checkpoint::tokenizer_files(&tk_dir);
    let save = |opt: &AdamW, carried: &Option<KvCache>, at: steps::Position| -> Result<PathBuf> {
        let (weights, mut moments) = checkpoint::optimizer_tensors(opt);
        if let Some(cache) = carried {
            for l in 0..n_layer {
                if let Some((h, c)) = cache.recurrent(l) {
                    moments.push((format!("carried.{l}.h"), h.clone()));
                    if let Some(c) = c {
                        moments.push((format!("carried.{l}.c"), c.clone()));
                    }
                }
            }
        }
        let state = checkpoint::TrainerState {
            step: at.step,
            seed: t.seed,
            tokens_seen: at.tokens_seen,
            elapsed_seconds: at.elapsed,
            model: config_json.clone(),
            run_id: run_id.clone(),
        };
        let files = checkpoint::CheckpointFiles {
            json: &[
                ("config.json", &config_json),
                ("generation_config.json", &generation_config),
            ],
            weights_file: "model.safetensors",
            weights: &weights,
            optimizer: &moments,
            state: &state,
            copy: &tk_files,
        };
        checkpoint::save(out, at.step, &files, t.keep_checkpoints)
    };

    let evaluate = |model: &Net| -> Result<Option<f64>> {
        model.set_training(false);
        if let (Net::Causal(m), Batches::Stream { val: Some(v), .. }) = (model, &data) {
            if m.is_recurrent() {
                let shape = (t.batch_size, t.seq_len);
                return Ok(Some(stream_loss(m, v, shape, t.eval_batches, &dev)?));
            }
        }
        let mut total = 0.0;
        for k in 0..t.eval_batches.max(1) {
            let seed = mix(t.seed ^ 0x5eed_e7a1 ^ mix(k as u64));
            let loss = match &data {
                Batches::Stream { val: Some(v), .. } => {
                    let (x, y) = v.batch(seed, t.batch_size, t.seq_len, &dev)?;
                    model.loss(&x, &y, mix(t.seed ^ 0x0a5c ^ mix(k as u64)))?
                }
                Batches::Pairs { val, .. } if !val.is_empty() => {
                    pair_loss(model, val, seed, t.batch_size)?.0
                }
                _ => return Ok(None),
            };
            total += loss.to_scalar::<f32>()? as f64;
        }
        Ok(Some(total / t.eval_batches.max(1) as f64))
    };

    let hand_pass = match &model {
        Net::Causal(m) => passes::for_model(m, t.backward),
        _ => None,
    };
    let carried = std::cell::RefCell::new(carried);
    let stream_tokens = (t.batch_size * t.seq_len) as u64;
    let (rank, world) = (group.rank(), group.world());
    let mut micro = |step: usize, micro: usize, grads: &mut Grads| -> Result<Micro> {
        model.set_training(true);
        let scale = 1.0 / t.grad_accum as f64;
        let seed = mix(t.seed ^ mix((step * 1024 + micro) as u64 + 1));
        let (loss, tokens) = match (&data, &mut *carried.borrow_mut()) {
            (Batches::Pairs { train, .. }, _) => {
                let (bart, b) = pair_batch(&model, train, seed, t.batch_size)?;
                if t.backward == passes::Backward::Auto {
                    if let Some(r) = passes::bart::loss_and_grads(bart, &b, scale)? {
                        return hand_micro(r, grads, scale, b.tokens as u64);
                    }
                }
                (seq2seq::loss(bart, &b)?, b.tokens as u64)
            }
            (Batches::Stream { train, .. }, Some(cache)) => {
                let Net::Causal(model) = &model else {
                    unreachable!("only recurrent decoders carry state")
                };
                let m = (step * t.grad_accum + micro) as u64;
                let (x, y, fresh) = train.stream_batch(m, t.batch_size, t.seq_len, &dev)?;
                if fresh {
                    cache.clear();
                }
                if let (lmkit_models::CausalLm::Rnn(rnn), passes::Backward::Auto) =
                    (model, t.backward)
                {
                    if let Some(r) = passes::rnn::loss_and_grads(rnn, &x, &y, cache, scale)? {
                        return hand_micro(r, grads, scale, stream_tokens);
                    }
                }
                (loss_with(model, &x, &y, cache)?, stream_tokens)
            }
            (Batches::Stream { train, .. }, None) => {
                let (x, y) = train.batch(seed, t.batch_size * world, t.seq_len, &dev)?;
                // Each member trains on its rows of the group's batch.
                let (x, y) = if world > 1 {
                    let r0 = rank * t.batch_size;
                    (
                        x.narrow(0, r0, t.batch_size)?,
                        y.narrow(0, r0, t.batch_size)?,
                    )
                } else {
                    (x, y)
                };
                let mask_seed = seed ^ 0x3a5c;
                let r = match (&model, &hand_pass) {
                    (_, Some(pass)) => pass.loss_and_grads(&x, &y, scale)?,
                    (
                        Net::Masked {
                            bert,
                            mask_id,
                            keep,
                        },
                        None,
                    ) if t.backward == passes::Backward::Auto => {
                        let mb = objective::mlm_batch(bert, &x, *mask_id, keep, mask_seed)?;
                        passes::bert::loss_and_grads(bert, &mb.masked(), scale)?
                    }
                    _ => None,
                };
                if let Some(r) = r {
                    return hand_micro(r, grads, scale, stream_tokens);
                }
                (model.loss(&x, &y, mask_seed)?, stream_tokens)
            }
        };
        let value = loss.to_scalar::<f32>()? as f64 * scale;
        grads.backward(&(loss * scale)?)?;
        Ok(Micro::new(value, tokens))
    };
    let from = steps::Position {
        step,
        tokens_seen,
        elapsed: elapsed_before,
    };
    let end = steps::run(
        t,
        &mut opt,
        from,
        &metrics_path,
        progress,
        &mut group,
        steps::Hooks {
            micro: &mut micro,
            evaluate: &mut || Ok(evaluate(&model)?.map(Into::into)),
            save: &mut |opt, at| save(opt, &carried.borrow(), at),
        },
    )?;
    Ok(end.summary(n_params))
}

/// A micro batch whose loss and gradients a hand-written pass computed: the gradients added to
/// the step's, the loss's share (times `scale`) and the tokens.
fn hand_micro(
    r: passes::LossAndGrads,
    grads: &mut Grads,
    scale: f64,
    tokens: u64,
) -> Result<Micro> {
    for (p, gi) in r.grads {
        grads.add(p.id(), gi)?;
    }
    Ok(Micro::new(r.loss * scale, tokens))
}
