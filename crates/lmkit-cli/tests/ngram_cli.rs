//! The `lmkit ngram` subcommands, run as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

fn lmkit(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        pipe.write_all(s.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = lmkit(args, stdin);
    assert!(
        out.status.success(),
        "lmkit {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = lmkit(args, None);
    assert_eq!(out.status.code(), Some(1), "lmkit {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CORPUS: &str =
    "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\nthe cat ate the fish\n";

#[test]
fn train_score_rank_ppl_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(corpus.join("a.txt"), CORPUS).unwrap();
    std::fs::write(
        corpus.join("ignored.md"),
        "not text for the model \u{1F600}\n",
    )
    .unwrap();
    let arpa = dir.path().join("m.arpa");
    let bin = dir.path().join("m.lmkb");
    ok(
        &[
            "ngram",
            "train",
            "--order",
            "3",
            "--input",
            s(&corpus),
            "--output",
            s(&arpa),
            // A tiny corpus: its discounts cannot be estimated from the counts.
            "--discount-fallback",
        ],
        None,
    );
    assert!(std::fs::read_to_string(&arpa)
        .unwrap()
        .starts_with("\\data\\\nngram 1="));
    ok(&["ngram", "convert", s(&arpa), s(&bin)], None);

    let from_arpa = ok(
        &["ngram", "score", "-m", s(&arpa)],
        Some("the cat sat\nzebra\n"),
    );
    let from_bin = ok(
        &["ngram", "score", "-m", s(&bin)],
        Some("the cat sat\nzebra\n"),
    );
    assert_eq!(from_arpa, from_bin);
    assert_eq!(from_arpa.lines().count(), 2);

    let verbose = ok(
        &["ngram", "score", "-m", s(&bin), "--verbose"],
        Some("the zebra\n"),
    );
    assert!(
        verbose.contains("\tzebra\t") && verbose.contains("OOV") && verbose.contains("</s>"),
        "{verbose}"
    );

    let ranked = ok(
        &[
            "ngram",
            "rank",
            "-m",
            s(&bin),
            "mat the on sat cat the",
            "the cat sat on the mat",
        ],
        None,
    );
    let first = ranked.lines().next().unwrap();
    assert!(
        first.starts_with("1\t") && first.ends_with("the cat sat on the mat"),
        "{ranked}"
    );

    let held = dir.path().join("held.txt");
    std::fs::write(&held, "the dog sat on the mat\nthe zebra ate\n").unwrap();
    let ppl = ok(&["ngram", "ppl", "-m", s(&bin), "--input", s(&held)], None);
    assert!(
        ppl.contains("Perplexity including OOVs:")
            && ppl.contains("OOVs:\t1")
            && ppl.contains("Tokens:\t11"),
        "{ppl}"
    );

    let info = ok(&["ngram", "info", s(&bin)], None);
    assert!(
        info.contains("order:\t3") && info.contains("3-grams:"),
        "{info}"
    );
}

#[test]
fn character_models_remember_their_tokenization() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("ko.txt");
    std::fs::write(
        &corpus,
        "나는 버스를 탔다\n나는 집에 갔다\n그는 버스를 탔다\n",
    )
    .unwrap();
    let bin = dir.path().join("ko.lmkb");
    ok(
        &[
            "ngram",
            "train",
            "--order",
            "4",
            "--chars",
            "--input",
            s(&corpus),
            "--output",
            s(&bin),
            "--discount-fallback",
        ],
        None,
    );
    let ranked = ok(
        &[
            "ngram",
            "rank",
            "-m",
            s(&bin),
            "나는 버스를 태운다",
            "나는 버스를 탔다",
        ],
        None,
    );
    assert!(
        ranked.lines().next().unwrap().ends_with("나는 버스를 탔다"),
        "{ranked}"
    );
    assert!(ok(&["ngram", "info", s(&bin)], None).contains("tokens:\tchars"));
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, CORPUS).unwrap();
    let out = dir.path().join("m.arpa");

    let e = fails(&[
        "ngram",
        "train",
        "--order",
        "0",
        "--input",
        s(&corpus),
        "--output",
        s(&out),
    ]);
    assert!(e.contains("order must be between 1 and 8"), "{e}");
    let e = fails(&[
        "ngram",
        "train",
        "--input",
        s(&corpus),
        "--output",
        "model.bin",
    ]);
    assert!(e.contains(".arpa") && e.contains(".lmkb"), "{e}");
    let e = fails(&[
        "ngram",
        "train",
        "--input",
        s(&dir.path().join("nope.txt")),
        "--output",
        s(&out),
    ]);
    assert!(e.contains("nope.txt"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = fails(&["ngram", "train", "--input", s(&empty), "--output", s(&out)]);
    assert!(e.contains("no input files"), "{e}");
    // Without --discount-fallback a corpus this small is refused (as lmplz refuses it), and
    // bad pruning thresholds are named.
    let e = fails(&["ngram", "train", "--input", s(&corpus), "--output", s(&out)]);
    assert!(
        e.contains("--discount-fallback") && e.contains("2-grams"),
        "{e}"
    );
    let e = fails(&[
        "ngram",
        "train",
        "--input",
        s(&corpus),
        "--output",
        s(&out),
        "--prune",
        "0",
        "2",
        "1",
    ]);
    assert!(e.contains("--prune") && e.contains("decrease"), "{e}");
    assert!(!out.exists());

    let junk = dir.path().join("junk.arpa");
    std::fs::write(&junk, "\\data\\\nngram 1=5\n\n\\1-grams:\n-1\t<s>\n").unwrap();
    let e = fails(&["ngram", "score", "-m", s(&junk)]);
    assert!(e.contains("junk.arpa:5") && e.contains("truncated"), "{e}");
    let bad_bin = dir.path().join("bad.lmkb");
    std::fs::write(&bad_bin, b"LMKB\x01\x00\x00\x00 short").unwrap();
    let e = fails(&["ngram", "info", s(&bad_bin)]);
    assert!(
        e.contains("bad.lmkb") && e.contains("not a valid lmkit binary model"),
        "{e}"
    );
    let e = fails(&["ngram", "rank", "-m", s(&bad_bin)]);
    assert!(e.contains("bad.lmkb"), "{e}");
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in ["train", "convert", "score", "ppl", "rank", "info"] {
        let help = ok(&["ngram", sub, "--help"], None);
        assert!(
            help.contains("lmkit ngram"),
            "`lmkit ngram {sub} --help` has no example:\n{help}"
        );
    }
}

#[test]
fn a_reader_that_leaves_ends_the_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, "a b c\nb c d\n".repeat(50)).unwrap();
    let model = dir.path().join("m.lmkb");
    ok(
        &[
            "ngram",
            "train",
            "--input",
            s(&corpus),
            "--output",
            s(&model),
            "--discount-fallback",
        ],
        None,
    );
    // stdout is a pipe whose reading end is already closed: the first write fails.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(["ngram", "info", s(&model)])
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}
