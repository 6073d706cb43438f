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
