//! `lmkit train`: train a model from a TOML run config.

use crate::progress::Bar;
use anyhow::Result;
use clap::Args;
use lmkit_train::RunConfig;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit train --config configs/gpt-small.toml\n  \
    lmkit train --config configs/gpt-small.toml --set train.max_steps=2000 --set model.n_layer=6\n  \
    lmkit train --config configs/gpt-small.toml --resume        # continue after a crash or a stop\n  \
    lmkit train --config configs/gpt-small.toml --overwrite     # start again in the same OUT\n  \
    lmkit train --config configs/gpt-small.toml --gpus 4        # data-parallel, one process per GPU\n  \
    lmkit train --config configs/gpt-small.toml --set train.dtype=bf16   # bf16 products, f32 weights\n\n\
    train.dtype=bf16 runs the products on the bf16 tensor cores of a GPU, or on the AMX tiles of\n\
    an Intel Xeon from Sapphire Rapids on (refused on other CPUs); weights and optimizer stay f32.\n\n\
    Writes OUT/ckpt-NNNNNN/ (a Hugging Face model directory + trainer_state/), OUT/latest,\n\
    OUT/metrics.jsonl and OUT/loss.svg, where OUT is train.out_dir.\n\n\
    Data-parallel: --procs/--gpus N start N processes on this machine; each trains on its\n\
    train.batch_size rows of a batch of N x train.batch_size, and their gradients are averaged\n\
    before every step. On several machines, start one `lmkit train` per process with torchrun's\n\
    variables set: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (README.md, GPU).\n\
    A member that has not joined after 300 s, or is silent in an exchange for 1800 s, stops the\n\
    run with an error naming it; LMKIT_GROUP_TIMEOUT=SECONDS sets both waits (0: for ever).\n\
    Where LOCAL_WORLD_SIZE says N members share this machine (torchrun and --procs set it),\n\
    each takes cores/N worker threads unless RAYON_NUM_THREADS is set.\n\
    On GPUs the gradients are averaged by NCCL where every process loads it (libnccl.so.2 on\n\
    the library path, e.g. from PyTorch's wheel, or LMKIT_NCCL=/path/libnccl.so.2); otherwise,\n\
    and with LMKIT_NCCL=0, they are summed over TCP through the CPU."
)]
pub struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Data-parallel training with N processes on this machine (rank 0 writes the run)
    #[arg(long, value_name = "N")]
    procs: Option<usize>,
    /// One process per GPU on this machine: --procs N with train.device="cuda", process i on cuda:i
    #[arg(long, value_name = "N", conflicts_with = "procs")]
    gpus: Option<usize>,
}

/// The options of every training command: config, overrides, how to start, limits.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Run configuration (TOML)
    #[arg(long)]
    pub config: PathBuf,
    /// Override a field: section.field=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from OUT/latest with the same loss curve
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start a new run in an OUT that holds another run, removing that run's checkpoints,
    /// latest, metrics.jsonl and loss.svg first (without this, such an OUT is refused)
    #[arg(long)]
    overwrite: bool,
    /// Shorthand for --set train.max_steps=N
    #[arg(long)]
    max_steps: Option<usize>,
    /// Shorthand for --set train.max_time=SECONDS
    #[arg(long)]
    max_time: Option<f64>,
}

impl RunArgs {
    /// The `--set` overrides with the shorthands added.
    pub fn overrides(&self) -> Vec<String> {
        let mut overrides = self.overrides.clone();
        if let Some(n) = self.max_steps {
            overrides.push(format!("train.max_steps={n}"));
        }
        if let Some(s) = self.max_time {
            overrides.push(format!("train.max_time={s}"));
        }
        overrides
    }

    pub fn start(&self) -> lmkit_train::Start {
        if self.resume {
            lmkit_train::Start::Resume
        } else if self.overwrite {
            lmkit_train::Start::Overwrite
        } else {
            lmkit_train::Start::New
        }
    }
}

/// The options of the tuning commands, which read data rows: [`RunArgs`] and `--skip-bad`.
#[derive(Args)]
pub(crate) struct TuneArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Leave out (and count) rows that cannot be read, instead of stopping at the first
    #[arg(long)]
    pub skip_bad: bool,
}

impl TuneArgs {
    /// The overrides, `--skip-bad` among them.
    pub fn overrides(&self) -> Vec<String> {
        let mut overrides = self.run.overrides();
        if self.skip_bad {
            overrides.push("data.skip_bad=true".into());
        }
        overrides
    }
}

/// What a tuning command read: `read` ("12 training and 2 validation pairs"), each count in
/// `counts` that is not zero with what it counts, and the first bad rows.
pub(crate) fn report_data(read: &str, counts: &[(usize, &str)], bad_samples: &[String]) {
    let notes: String = counts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!(", {n} {what}"))
        .collect();
    eprintln!("data: {read}{notes}");
    for b in bad_samples {
        eprintln!("  bad row: {b}");
    }
}

/// What a finished run prints.
pub(crate) fn report(s: &lmkit_train::Summary, out: &std::path::Path) {
    eprintln!(
        "trained {} parameters for {} steps: train loss {:.4}{}, {:.0} tokens/s",
        s.parameters,
        s.steps,
        s.final_loss,
        s.val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
        s.tokens_per_sec
    );
    eprintln!("checkpoint {}", s.checkpoint.display());
    eprintln!("metrics   {}", out.join("metrics.jsonl").display());
    eprintln!("loss plot {}", out.join("loss.svg").display());
}

/// Ctrl-C or SIGTERM: the run stops after the current step with a checkpoint; a second one quits
/// at once (the last checkpoint stays whole: checkpoints are written atomically).
pub(crate) fn stop_on_signals() {
    let installed = ctrlc::set_handler(|| {
        if lmkit_core::stop::request() {
            eprintln!("\nstopping now");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step with a checkpoint (again to quit at once)");
    });
    if let Err(e) = installed {
        eprintln!("warning: Ctrl-C will not save a checkpoint: {e}");
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(&a.run.config, &a.run.overrides())?;
    stop_on_signals();
    if let Some(n) = a.procs.or(a.gpus) {
        if std::env::var_os("WORLD_SIZE").is_some() {
            anyhow::bail!("--procs/--gpus start a group themselves; WORLD_SIZE is already set");
        }
        if n == 0 {
            anyhow::bail!("--procs/--gpus: the number of processes must be at least 1");
        }
        if n > lmkit_train::group::MAX_WORLD {
            anyhow::bail!(
                "--procs/--gpus {n}: a group takes at most {} processes",
                lmkit_train::group::MAX_WORLD
            );
        }
        if a.gpus.is_some() {
            match lmkit_models::cuda_device_count() {
                None => anyhow::bail!(
                    "--gpus {n}: this lmkit was built without CUDA support (rebuild it with \
                     `cargo build --release --features cuda`); --procs {n} trains with {n} \
                     processes on the CPU"
                ),
                Some(count) if count < n => anyhow::bail!(
                    "--gpus {n}: this machine has {count} GPU(s) that CUDA can use \
                     (CUDA_VISIBLE_DEVICES, nvidia-smi); one process runs on each"
                ),
                Some(_) => {}
            }
        }
        return launch(n, a.gpus.is_some());
    }
    let s = lmkit_train::train(&cfg, a.run.start(), &Bar::default())?;
    report(&s, &cfg.train.out_dir);
    Ok(())
}

/// Starts `n` copies of this command as one data-parallel group on this machine (torchrun's
/// variables, rank 0's output shown, the others' kept and shown if they fail) and waits for all;
/// when one fails, the others are stopped.
fn launch(n: usize, gpus: bool) -> Result<()> {
    let mut args: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--procs" | "--gpus" => {
                it.next();
            }
            _ if a.starts_with("--procs=") || a.starts_with("--gpus=") => {}
            _ => args.push(a),
        }
    }
    if gpus {
        args.extend(["--set".to_string(), "train.device=\"cuda\"".to_string()]);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let logs = tempfile::tempdir()?;
    let mut children = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if rank > 0 {
            let log = std::fs::File::create(logs.path().join(format!("rank-{rank}.log")))?;
            cmd.stdout(std::process::Stdio::null()).stderr(log);
        }
        children.push(cmd.spawn()?);
    }
    eprintln!("data-parallel group of {n} processes (rank 0's output below)");
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut running: Vec<usize> = (0..n).collect();
    while !running.is_empty() {
        let mut still = Vec::with_capacity(running.len());
        for &rank in &running {
            match children[rank].try_wait()? {
                Some(status) if !status.success() => {
                    failed.get_or_insert((rank, status));
                }
                Some(_) => {}
                None => still.push(rank),
            }
        }
        running = still;
        if failed.is_some() {
            for &rank in &running {
                let _ = children[rank].kill();
                let _ = children[rank].wait();
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if let Some((rank, status)) = failed {
        if rank > 0 {
            let log = std::fs::read_to_string(logs.path().join(format!("rank-{rank}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            for line in tail.iter().rev() {
                eprintln!("[rank {rank}] {line}");
            }
        }
        anyhow::bail!(
            "rank {rank} of the training group failed ({status}); the others were stopped"
        );
    }
    Ok(())
}
