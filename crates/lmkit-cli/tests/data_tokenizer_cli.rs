//! `lmkit data prepare` and `lmkit tokenizer ...` run as a user runs them.

use std::process::{Command, Stdio};

fn lmkit(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn prepare_then_train_encode_decode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = d.join("c.txt");
    let mut text: String = (0..200)
        .map(|i| {
            format!(
                "Sentence number {i} talks about the {} river and {} hills.\n",
                i * 7 % 13,
                i % 5
            )
        })
        .collect();
    text.push_str("Sentence number 3 talks about the 8 river and 3 hills.\n"); // exact duplicate of line 4
    text.push_str("대한민국은 민주공화국이다. 모든 국민은 법 앞에 평등하다.\n");
    std::fs::write(&corpus, text).unwrap();
    let prepared = d.join("prepared");
    let (ok, _, err) = lmkit(
        &[
            "data",
            "prepare",
            "--input",
            corpus.to_str().unwrap(),
            "--output",
            prepared.to_str().unwrap(),
            "--val-fraction",
            "0",
        ],
        "",
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("exact dups") && err.contains("report"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prepared.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["exact_duplicates"]["removed"]["docs"], 1);

    let tok = d.join("tok");
    let (ok, _, err) = lmkit(
        &[
            "tokenizer",
            "train",
            "--input",
            prepared.to_str().unwrap(),
            "--vocab-size",
            "300",
            "--output",
            tok.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{err}");
    let (ok, ids, err) = lmkit(
        &["tokenizer", "encode", "--tokenizer", tok.to_str().unwrap()],
        "모든 국민은 river\n",
    );
    assert!(ok, "{err}");
    let (ok, back, err) = lmkit(
        &["tokenizer", "decode", "--tokenizer", tok.to_str().unwrap()],
        &ids,
    );
    assert!(ok, "{err}");
    assert_eq!(back, "모든 국민은 river\n");

    let shards = d.join("shards");
    let (ok, _, err) = lmkit(
        &[
            "tokenizer",
            "encode",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--input",
            prepared.to_str().unwrap(),
            "--shards",
            shards.to_str().unwrap(),
        ],
        "",
    );
    let kept = report["train"]["docs"].as_u64().unwrap();
    assert!(
        ok && err.contains(&format!("tokens from {kept} documents")),
        "{err}"
    );
    assert!(shards.join("tokens-00000.bin").exists() && shards.join("tokens-00000.json").exists());

    let (ok, table, _) = lmkit(
        &[
            "tokenizer",
            "stats",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--input",
            corpus.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok && table.contains("tokens/byte"), "{table}");

    let (ok, _, err) = lmkit(
        &["tokenizer", "decode", "--tokenizer", tok.to_str().unwrap()],
        "1 2 x\n",
    );
    assert!(
        !ok && err.contains("<stdin>:1") && err.contains("`x`"),
        "{err}"
    );
    let (ok, _, err) = lmkit(
        &[
            "data",
            "prepare",
            "--input",
            d.join("nope").to_str().unwrap(),
            "--output",
            d.join("o").to_str().unwrap(),
        ],
        "",
    );
    assert!(!ok && err.contains("nope"), "{err}");
}

#[test]
fn model_stage_help_has_examples() {
    for sub in [
        &["train"][..],
        &["generate"],
        &["chat"],
        &["model", "info"],
        &["model", "logits"],
        &["serve"],
        &["moderation", "train"],
        &["moderation", "check"],
        &["data", "export-preferences"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let (ok, help, _) = lmkit(&args, "");
        assert!(
            ok && help.contains(&format!("lmkit {}", sub[0])),
            "{sub:?}: {help}"
        );
    }
}

#[test]
fn data_and_tokenizer_help_have_examples() {
    for sub in [
        &["data", "prepare"][..],
        &["tokenizer", "train"],
        &["tokenizer", "encode"],
        &["tokenizer", "decode"],
        &["tokenizer", "stats"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let (ok, help, _) = lmkit(&args, "");
        assert!(
            ok && help.contains(&format!("lmkit {}", sub[0])),
            "{sub:?}: {help}"
        );
    }
}

#[test]
fn export_preferences_names_a_missing_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("none.sqlite");
    let out = dir.path().join("prefs.jsonl");
    let (ok, _, err) = lmkit(
        &[
            "data",
            "export-preferences",
            "--db",
            db.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert!(
        !ok && err.contains("none.sqlite") && err.contains("no such database"),
        "{err}"
    );
    assert!(!out.exists());
    // A FIFO (or a device) is refused, not opened: SQLite said "disk I/O error" for a FIFO, and
    // made its journal file beside a device (`/dev/zero-journal`).
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (ok, _, err) = lmkit(
        &[
            "data",
            "export-ratings",
            "--db",
            fifo.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert!(!ok && err.contains("not a database file"), "{err}");
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["fifo"]);
}

/// Shards and prepared corpora are written as a whole: a new run leaves no stale files of an
/// earlier one, a failed run leaves the earlier outputs as they were, and a directory holding
/// anything else is refused.
#[test]
fn outputs_are_replaced_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let big = d.join("big.txt");
    let text: String = (0..400)
        .map(|i| format!("Document {i} mentions the {} lake.\n", i % 11))
        .collect();
    std::fs::write(&big, &text).unwrap();
    let small = d.join("small.txt");
    std::fs::write(&small, "A short one.\nAnother.\n").unwrap();
    let bad = d.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\nnot json\n",
    )
    .unwrap();
    let tok = d.join("tok");
    let (ok, _, err) = lmkit(
        &[
            "tokenizer",
            "train",
            "--input",
            &s(&big),
            "--vocab-size",
            "300",
            "--output",
            &s(&tok),
        ],
        "",
    );
    assert!(ok, "{err}");
    let shards = d.join("shards");
    // `tokenizer encode --input INPUT --shards OUT` with `extra` flags.
    let encode_into = |input: &std::path::Path, out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "tokenizer".to_string(),
            "encode".into(),
            "--tokenizer".into(),
            s(&tok),
            "--input".into(),
            s(input),
            "--shards".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        lmkit(&args.iter().map(String::as_str).collect::<Vec<_>>(), "")
    };
    let encode = |input: &std::path::Path| encode_into(input, &shards, &["--shard-tokens", "500"]);
    let names = |p: &std::path::Path| -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (ok, _, err) = encode(&big);
    assert!(ok, "{err}");
    assert!(names(&shards).len() > 4, "{:?}", names(&shards));
    let (ok, _, err) = encode(&small);
    assert!(ok, "{err}");
    assert_eq!(names(&shards), ["tokens-00000.bin", "tokens-00000.json"]);
    let before = std::fs::read(shards.join("tokens-00000.bin")).unwrap();
    let (ok, _, err) = encode(&bad);
    assert!(!ok && err.contains("bad.jsonl:3"), "{err}");
    assert_eq!(
        std::fs::read(shards.join("tokens-00000.bin")).unwrap(),
        before
    );
    assert_eq!(names(&shards).len(), 2);
    assert_eq!(
        names(d),
        ["bad.jsonl", "big.txt", "shards", "small.txt", "tok"]
    );
    // The error's suggestion exists: --skip-bad skips and counts; all-bad input still fails.
    let skip =
        |input: &std::path::Path, out: &std::path::Path| encode_into(input, out, &["--skip-bad"]);
    assert!(err.contains("--skip-bad"), "{err}");
    let (ok, _, err) = skip(&bad, &d.join("skipped"));
    assert!(ok && err.contains("skipped 1 bad record"), "{err}");
    let all_bad = d.join("all-bad.jsonl");
    std::fs::write(&all_bad, "nope\nnot json either\n").unwrap();
    let (ok, _, err) = skip(&all_bad, &d.join("none"));
    assert!(
        !ok && err.contains("every record of the input was bad"),
        "{err}"
    );
    assert!(!d.join("none").exists());
    let (ok, _, err) = lmkit(
        &[
            "data",
            "prepare",
            "--input",
            &s(&all_bad),
            "--output",
            &s(&d.join("p2")),
            "--skip-bad",
        ],
        "",
    );
    assert!(!ok, "{err}");
    std::fs::remove_dir_all(d.join("skipped")).unwrap();
    std::fs::remove_file(&all_bad).unwrap();
    std::fs::write(shards.join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = encode(&small);
    assert!(!ok && err.contains("notes.txt"), "{err}");
    assert!(shards.join("notes.txt").exists());

    let prepared = d.join("prepared");
    let prepare = |input: &std::path::Path| {
        lmkit(
            &[
                "data",
                "prepare",
                "--input",
                &s(input),
                "--output",
                &s(&prepared),
            ],
            "",
        )
    };
    let (ok, _, err) = prepare(&big);
    assert!(ok, "{err}");
    let (ok, _, err) = prepare(&bad);
    assert!(!ok && err.contains("bad.jsonl:3"), "{err}");
    let report = std::fs::read_to_string(prepared.join("report.json")).unwrap();
    assert!(
        report.contains("big.txt") && report.contains(&s(&prepared)),
        "{report}"
    );
}

/// `--input -` reads standard input: JSON Lines when it opens with `{`, else one document per line.
#[test]
fn prepare_reads_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    for (input, text_field_doc) in [
        (
            "{\"text\": \"The first document read from standard input is long enough.\"}\n{\"text\": \"A second one, also from the standard input stream, mails x@y.org.\"}\n",
            "The first document read from standard input is long enough.",
        ),
        (
            "The first document read from standard input is long enough.\nA second one, also from the standard input stream, mails x@y.org.\n",
            "The first document read from standard input is long enough.",
        ),
    ] {
        let out = dir.path().join(format!("out{}", input.len()));
        let o = out.to_str().unwrap();
        let (ok, _, err) = lmkit(
            &["data", "prepare", "--input", "-", "--output", o, "--val-fraction", "0", "--pii"],
            input,
        );
        assert!(ok, "{err}");
        assert!(err.contains("pii masked"), "{err}");
        let shard = std::fs::read_to_string(out.join("train-00000.jsonl")).unwrap();
        assert_eq!(shard.lines().count(), 2, "{shard}");
        assert!(shard.contains(text_field_doc) && shard.contains("\"source\":\"-:1\""), "{shard}");
        assert!(shard.contains("<EMAIL>") && !shard.contains("x@y.org"), "{shard}");
    }
}

/// Input files with near and exact copies across files (so deduplication spans tasks).
fn corpus_files(dir: &std::path::Path, files: usize, lines: usize) -> Vec<String> {
    let words = [
        "river", "hill", "road", "town", "field", "forest", "lake", "bridge", "market", "school",
        "church", "mill", "farm", "valley", "stream", "garden",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |k: usize| {
        // xorshift64*: a fixed sequence, so the corpus is the same every run.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % k
    };
    let mut originals: Vec<String> = Vec::new();
    let mut paths = Vec::new();
    for f in 0..files {
        let mut text = String::new();
        // Files get smaller one by one, so the tasks' shares are known (see below).
        for i in 0..lines - f * lines / 10 {
            let line = if !originals.is_empty() && next(100) < 30 {
                let o = &originals[next(originals.len())];
                if next(4) == 0 {
                    o.clone()
                } else {
                    let (from, to) = (words[next(words.len())], words[next(words.len())]);
                    o.replacen(from, to, 1)
                }
            } else {
                let w: Vec<&str> = (0..12 + next(16))
                    .map(|_| words[next(words.len())])
                    .collect();
                let line = format!("Entry {f}-{i}: {}.", w.join(" "));
                originals.push(line.clone());
                line
            };
            text.push_str(&line);
            text.push('\n');
            // Now and then a long line of numbers, which the quality filters drop.
            if i % 997 == 0 {
                let digits: Vec<String> = (0..60).map(|k| (k * 7919 + i).to_string()).collect();
                text.push_str(&digits.join(" "));
                text.push('\n');
            }
        }
        let p = dir.join(format!("in-{f}.txt"));
        std::fs::write(&p, text).unwrap();
        paths.push(p.to_str().unwrap().to_string());
    }
    paths
}

fn shard_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn sharded_runs_match_a_single_run_and_resume_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in");
    std::fs::create_dir(&input).unwrap();
    corpus_files(&input, 7, 15_000);
    let input = input.to_str().unwrap();
    let single = d.join("single");
    let (ok, _, err) = lmkit(
        &[
            "data",
            "prepare",
            "--input",
            input,
            "--output",
            single.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{err}");
    let want = shard_bytes(&single);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(single.join("report.json")).unwrap())
            .unwrap();
    assert!(
        report["near_duplicates"]["removed"]["docs"]
            .as_u64()
            .unwrap()
            > 1000
    );
    assert!(
        report["exact_duplicates"]["removed"]["docs"]
            .as_u64()
            .unwrap()
            > 1000
    );

    for tasks in [1usize, 2, 4] {
        let out = d.join(format!("out{tasks}"));
        let out_s = out.to_str().unwrap().to_string();
        let n = tasks.to_string();
        // Merging before the tasks ran is refused, naming what to do.
        let (ok, _, err) = lmkit(
            &[
                "data", "prepare", "--input", input, "--output", &out_s, "--tasks", &n, "--merge",
            ],
            "",
        );
        assert!(!ok && err.contains("no tasks were run"), "{err}");
        for t in 0..tasks {
            let i = t.to_string();
            let args = [
                "data", "prepare", "--input", input, "--output", &out_s, "--tasks", &n, "--task",
                &i,
            ];
            // Task 1 (task 0 with one task) is killed once its first input file is done, then run
            // again: with files largest first it has two or more of them (4 tasks: files 1, 6).
            if t == 1.min(tasks - 1) {
                let tasks_dir = d.join(format!("out{tasks}.tasks"));
                let parts = |dir: &std::path::Path| {
                    std::fs::read_dir(dir)
                        .map(|r| {
                            r.filter_map(|e| e.ok())
                                .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
                                .count()
                        })
                        .unwrap_or(0)
                };
                let before = parts(&tasks_dir);
                let mut child = Command::new(env!("CARGO_BIN_EXE_lmkit"))
                    .args(args)
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let t0 = std::time::Instant::now();
                while parts(&tasks_dir) == before && t0.elapsed().as_secs() < 60 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                child.kill().unwrap();
                child.wait().unwrap();
                let marker = tasks_dir.join(format!("task-{t:05}-of-{tasks:05}.done"));
                assert!(
                    !marker.exists(),
                    "task {t} of {tasks} finished before the kill"
                );
                // A merge now names the unfinished task.
                let (ok, _, err) = lmkit(
                    &[
                        "data", "prepare", "--input", input, "--output", &out_s, "--tasks", &n,
                        "--merge",
                    ],
                    "",
                );
                assert!(
                    !ok && err.contains(&format!("{t}")) && err.contains("not finished"),
                    "{err}"
                );
                let (ok, _, err) = lmkit(&args, "");
                assert!(ok, "{err}");
                assert!(err.contains("1 done before"), "{err}");
            } else {
                let (ok, _, err) = lmkit(&args, "");
                assert!(ok, "{err}");
            }
        }
        let (ok, _, err) = lmkit(
            &[
                "data", "prepare", "--input", input, "--output", &out_s, "--tasks", &n, "--merge",
            ],
            "",
        );
        assert!(ok, "{err}");
        assert_eq!(shard_bytes(&out), want, "{tasks} tasks");
        // The report too: counts, byte totals and samples (dropped documents travel through the
        // part files as their preview and length only).
        let merged: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let samples = report["filtered_samples"].as_object().unwrap();
        assert!(
            samples
                .values()
                .flat_map(|v| v.as_array().unwrap())
                .any(|s| s["text"].as_str().unwrap().ends_with('…')),
            "no long dropped document to check: {samples:?}"
        );
        for key in [
            "filtered",
            "filtered_samples",
            "exact_duplicates",
            "near_duplicates",
        ] {
            assert_eq!(merged[key], report[key], "{key}, {tasks} tasks");
        }
        assert!(!d.join(format!("out{tasks}.tasks")).exists());
    }
    // Tasks of another run are not mixed in: other options are refused.
    let out = d.join("other").to_str().unwrap().to_string();
    let (ok, _, err) = lmkit(
        &[
            "data", "prepare", "--input", input, "--output", &out, "--tasks", "2", "--task", "0",
        ],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = lmkit(
        &[
            "data",
            "prepare",
            "--input",
            input,
            "--output",
            &out,
            "--tasks",
            "2",
            "--task",
            "1",
            "--jaccard",
            "0.5",
        ],
        "",
    );
    assert!(!ok && err.contains("another run"), "{err}");
}

#[test]
fn one_large_file_is_split_over_tasks_in_byte_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in");
    std::fs::create_dir(&input).unwrap();
    let files = corpus_files(&input, 1, 12_000);
    let input = files[0].as_str();
    let size = std::fs::metadata(input).unwrap().len();
    let single = d.join("single");
    let s = single.to_str().unwrap();
    let (ok, _, err) = lmkit(
        &[
            "data",
            "prepare",
            "--input",
            input,
            "--output",
            s,
            "--clusters",
        ],
        "",
    );
    assert!(ok, "{err}");
    let want = shard_bytes(&single);
    assert!(want.iter().any(|(n, _)| n == "clusters.jsonl"));
    // Pieces of at most a sixth of the file: seven or so, over three tasks.
    let split = format!("{}", size as f64 / 6.0 / 1e6);
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let common = [
        "data",
        "prepare",
        "--input",
        input,
        "--output",
        o,
        "--clusters",
        "--tasks",
        "3",
        "--task-split-mb",
        &split,
    ];
    for t in ["0", "1", "2"] {
        let mut args = common.to_vec();
        args.extend(["--task", t]);
        let (ok, _, err) = lmkit(&args, "");
        assert!(ok, "{err}");
        // Every task has pieces of the one file.
        assert!(
            err.contains(" 2 piece(s) read") || err.contains(" 3 piece(s) read"),
            "{err}"
        );
    }
    // The merge must be told the same cut.
    let mut other = common.to_vec();
    let last = other.len() - 1;
    other[last] = "1000";
    other.push("--merge");
    let (ok, _, err) = lmkit(&other, "");
    assert!(!ok && err.contains("--task-split-mb"), "{err}");
    let mut args = common.to_vec();
    args.push("--merge");
    let (ok, _, err) = lmkit(&args, "");
    assert!(ok, "{err}");
    assert_eq!(shard_bytes(&out), want);
}
