//! `lmkit train` run as a user runs it: stopped by a signal, continued with --resume.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lmkit(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tokenizer and shards under `d`, and a run config training into `d/out` for many steps.
fn setup(d: &Path) -> std::path::PathBuf {
    let corpus = d.join("c.txt");
    let text: String = (0..300)
        .map(|i| {
            format!(
                "Line {i} is about the {} river and the {} hills.\n",
                i % 7,
                i % 5
            )
        })
        .collect();
    std::fs::write(&corpus, text).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ok, err) = lmkit(&[
        "tokenizer",
        "train",
        "--input",
        &s(&corpus),
        "--vocab-size",
        "300",
        "--output",
        &s(&d.join("tok")),
    ]);
    assert!(ok, "{err}");
    let (ok, err) = lmkit(&[
        "tokenizer",
        "encode",
        "--tokenizer",
        &s(&d.join("tok")),
        "--input",
        &s(&corpus),
        "--shards",
        &s(&d.join("shards")),
    ]);
    assert!(ok, "{err}");
    let cfg = d.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nmodel_type = \"gpt2\"\nn_positions = 32\nn_embd = 16\nn_layer = 1\nn_head = 2\n\
             [data]\ntrain = \"{d}/shards\"\ntokenizer = \"{d}/tok\"\n\
             [train]\nout_dir = \"{d}/out\"\nseq_len = 16\nbatch_size = 2\nmax_steps = 1000000\n\
             warmup_steps = 1\neval_every = 0\nsave_every = 0\nlog_every = 1\n",
            d = d.display()
        ),
    )
    .unwrap();
    cfg
}

#[cfg(unix)]
#[test]
fn a_signal_stops_training_with_a_checkpoint_that_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = setup(d);
    let cfg = cfg.to_str().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(["train", "--config", cfg])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few steps, then send SIGINT as Ctrl-C does.
    let metrics = d.join("out/metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("continue with --resume"), "{err}");
    let latest = std::fs::read_to_string(d.join("out/latest")).unwrap();
    let step: usize = latest
        .trim()
        .strip_prefix("ckpt-")
        .unwrap()
        .parse()
        .unwrap();
    assert!((3..1_000_000).contains(&step), "{latest}");
    assert!(d
        .join("out")
        .join(latest.trim())
        .join("model.safetensors")
        .exists());

    // The checkpoint continues, and a new run may not start over it.
    let (ok, err) = lmkit(&[
        "train",
        "--config",
        cfg,
        "--resume",
        "--max-steps",
        &(step + 2).to_string(),
    ]);
    assert!(ok && err.contains(&format!("at step {step}")), "{err}");
    let (ok, err) = lmkit(&["train", "--config", cfg, "--max-steps", "2"]);
    assert!(!ok && err.contains("holds another run"), "{err}");
}

/// `lmkit compare` trains its four models and reports finite held-out bits per byte; run again
/// into the same output, it replaces its own runs. `lmkit eval rank` puts a corpus sentence above
/// its scrambled words.
#[test]
fn compare_and_eval_rank_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text: String = (0..400)
        .map(|i| {
            format!(
                "the {} river runs past the {} hills.\n",
                ["red", "blue", "old"][i % 3],
                i % 7
            )
        })
        .collect();
    std::fs::create_dir(d.join("in")).unwrap();
    std::fs::write(d.join("in/c.txt"), text).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for seconds in ["1", "0.5"] {
        let (ok, err) = lmkit(&[
            "compare",
            "--input",
            &s(&d.join("in")),
            "--output",
            &s(&d.join("out")),
            "--seconds",
            seconds,
            "--vocab-size",
            "300",
            "--ngram-order",
            "4",
        ]);
        assert!(ok, "{err}");
    }
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/results.json")).unwrap())
            .unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in rows {
        let bpb = r["bits_per_byte"].as_f64().unwrap();
        assert!(bpb.is_finite() && bpb > 0.0 && bpb < 16.0, "{r}");
    }
    assert!(
        rows[0]["tokens_per_sec"].is_null(),
        "the n-gram row has no training speed"
    );
    assert!(rows[1..]
        .iter()
        .all(|r| r["tokens_per_sec"].as_f64().unwrap() > 0.0));

    let (ok, err) = lmkit(&[
        "ngram",
        "train",
        "--order",
        "3",
        "--input",
        &s(&d.join("in")),
        "--output",
        &s(&d.join("m.lmkb")),
        // A few lines of text: too few for estimated discounts.
        "--discount-fallback",
    ]);
    assert!(ok, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args([
            "eval",
            "rank",
            "--model",
            &s(&d.join("m.lmkb")),
            "hills the past runs river blue the",
            "the blue river runs past the hills",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = table.lines().next().unwrap_or_default();
    assert!(
        first.ends_with("the blue river runs past the hills"),
        "{table}"
    );
}

/// Two processes with 2 rows each train like one process with the 4 rows: the same losses and
/// the same model (up to the order of additions); only rank 0 writes the run.
#[test]
fn a_data_parallel_group_trains_like_one_process_with_the_whole_batch() {
    let d = tempfile::tempdir().unwrap();
    let cfg = setup(d.path());
    let cfg = cfg.to_str().unwrap();
    let run = |out: &str, extra: &[&str]| {
        let out_dir = format!("train.out_dir=\"{}\"", d.path().join(out).display());
        let mut args = vec!["train", "--config", cfg, "--set", &out_dir];
        args.extend(extra);
        let (ok, err) = lmkit(&args);
        assert!(ok, "{err}");
        err
    };
    // Both stop after 3 steps (max_steps 3: its own schedule) and go on to 6 with --resume,
    // the group's ranks from rank 0's checkpoint.
    // --gpus asks for GPUs this build or machine does not have: said before anything starts.
    if lmkit_models::cuda_device_count().unwrap_or(0) < 2 {
        let (ok, err) = lmkit(&["train", "--config", cfg, "--gpus", "2"]);
        assert!(!ok && err.contains("--gpus 2:"), "{err}");
        assert!(!err.contains("group of 2 processes"), "{err}");
    }
    let one = ["--set", "train.batch_size=4"];
    let group = ["--procs", "2", "--set", "train.batch_size=2"];
    for (out, how) in [("one", &one[..]), ("two", &group[..])] {
        let err = run(out, &[how, &["--max-steps", "3"]].concat());
        assert_eq!(err.contains("group of 2 processes"), out == "two", "{err}");
        // The group's members share this machine's cores (LOCAL_WORLD_SIZE) instead of each
        // starting a thread per core.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let shared = format!("worker threads: {} ", (cores / 2).max(1));
            assert_eq!(err.contains(&shared), out == "two", "{err}");
        }
        let err = run(out, &[how, &["--max-steps", "6", "--resume"]].concat());
        assert!(
            err.contains("resumed from") && err.contains("step 3"),
            "{err}"
        );
    }

    let losses = |out: &str| -> Vec<(u64, f64)> {
        std::fs::read_to_string(d.path().join(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r.get("loss").is_some_and(|v| !v.is_null()))
            .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
            .collect()
    };
    let (one, two) = (losses("one"), losses("two"));
    // The group logs the time rank 0 spent in each step's gradient exchange; one process none.
    let exchanges = |out: &str| -> Vec<f64> {
        std::fs::read_to_string(d.path().join(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["group_exchange_secs"]
                    .as_f64()
            })
            .collect()
    };
    assert!(exchanges("one").is_empty());
    let ex = exchanges("two");
    assert!(ex.len() == 6 && ex.iter().all(|&s| s > 0.0), "{ex:?}");
    assert_eq!(one.len(), 6, "{one:?}");
    assert_eq!(
        one.iter().map(|r| r.0).collect::<Vec<_>>(),
        two.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for ((s, a), (_, b)) in one.iter().zip(&two) {
        assert!(
            (a - b).abs() < 1e-4,
            "step {s}: loss {a} alone, {b} in the group"
        );
    }
    // The trained models give the same logits.
    let logits = |out: &str| -> Vec<f64> {
        let ckpt = d.path().join(out).join("ckpt-000006");
        let o = Command::new(env!("CARGO_BIN_EXE_lmkit"))
            .args([
                "model",
                "logits",
                "--model",
                ckpt.to_str().unwrap(),
                "--ids",
                "1,2,3",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Vec<Vec<f64>> = serde_json::from_slice(&o.stdout).unwrap();
        v.concat()
    };
    let (a, b) = (logits("one"), logits("two"));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(!a.is_empty() && worst < 1e-4, "logits differ by {worst}");
    // Weights that moved: the first step's logits are not the last's.
    assert!(one[0].1 - one[5].1 > 0.01, "{one:?}");
}
