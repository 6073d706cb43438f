//! ARPA and binary files: round trips, identical scores, and clear errors on damaged files.

use lmkit_ngram::arpa::{read_arpa, write_arpa};
use lmkit_ngram::{
    convert, save, save_as, train, BinaryLayout, Model, NgramError, NoProgress, Perplexity,
    Tokenization, TrainOptions,
};
use std::path::{Path, PathBuf};

const TEXT: &str =
    "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\nthe cat ate the fish\n";

/// Options for small corpora: lmplz's fallback discounts where the estimate fails.
fn fallback(order: usize) -> TrainOptions {
    TrainOptions {
        order,
        estimation: lmkit_ngram::EstimateOptions {
            fallback: Some(lmkit_ngram::FALLBACK_DISCOUNTS),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn trained(dir: &Path, order: usize) -> lmkit_ngram::NgramTables {
    let p = dir.join("c.txt");
    std::fs::write(&p, TEXT).unwrap();
    train(&[p], &fallback(order), &NoProgress).unwrap().tables
}

#[test]
fn arpa_round_trip_keeps_every_value() {
    let dir = tempfile::tempdir().unwrap();
    let t = trained(dir.path(), 3);
    let mut buf = Vec::new();
    write_arpa(&t, &mut buf).unwrap();
    let back = read_arpa(&buf[..], Path::new("x.arpa"), Tokenization::Words).unwrap();
    // Ids may be renumbered; compare the models' scores and sizes instead of raw tables.
    assert_eq!(
        back.orders.iter().map(|o| o.len()).collect::<Vec<_>>(),
        t.orders.iter().map(|o| o.len()).collect::<Vec<_>>()
    );
    let a = Model::from_tables(&t, Path::new("a"));
    let b = Model::from_tables(&back, Path::new("b"));
    for s in [
        "the cat sat",
        "a dog and a cat ate",
        "unknown words here",
        "the",
    ] {
        assert_eq!(a.score_line(s), b.score_line(s), "{s}");
    }
}

#[test]
fn binary_and_arpa_give_identical_scores() {
    let dir = tempfile::tempdir().unwrap();
    let t = trained(dir.path(), 4);
    let arpa = dir.path().join("m.arpa");
    let bin = dir.path().join("m.lmkb");
    save(&t, &arpa).unwrap();
    convert(&arpa, &bin, Tokenization::Words, BinaryLayout::Probing).unwrap();
    let a = Model::open(&arpa, Tokenization::Words).unwrap();
    let b = Model::open(&bin, Tokenization::Words).unwrap();
    assert_eq!(a.counts(), b.counts());
    for s in ["the cat sat on the log", "a a a", "dog", "zebra cat"] {
        assert_eq!(a.score_line(s), b.score_line(s), "{s}");
    }
}

/// A corpus big enough for every order to have many contexts: sentences over 40 words drawn by
/// a fixed linear congruential sequence.
fn varied_text() -> String {
    let mut x: u64 = 7;
    let mut out = String::new();
    for _ in 0..400 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 3 + (x >> 60) as usize;
        for k in 0..len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Skewed: low word numbers are frequent.
            let w = ((x >> 33) % 40).min((x >> 45) % 40);
            out.push_str(&format!("{}w{w}", if k > 0 { " " } else { "" }));
        }
        out.push('\n');
    }
    out
}

#[test]
fn perplexity_by_line_equals_the_sum_of_sentence_scores() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, varied_text()).unwrap();
    let t = train(std::slice::from_ref(&corpus), &fallback(4), &NoProgress)
        .unwrap()
        .tables;
    let mut lines: Vec<String> = varied_text().lines().take(50).map(String::from).collect();
    lines.extend(["", "  ", "w1 unknown w2", "<unk> w3\tw4"].map(String::from));
    for layout in [
        BinaryLayout::Probing,
        BinaryLayout::Trie {
            bits: 8,
            pointer_bits: 0,
        },
    ] {
        let p = dir.path().join("m.lmkb");
        save_as(&t, &p, layout).unwrap();
        let m = Model::open(&p, Tokenization::Words).unwrap();
        let (mut by_sentence, mut by_line) = (Perplexity::default(), Perplexity::default());
        for l in &lines {
            by_sentence.add(&m.score_line(l));
            m.add_line(l, &mut by_line);
        }
        assert_eq!(by_sentence, by_line, "{layout:?}");
        assert!(by_line.oovs >= 2 && by_line.sentences == lines.len() as u64);
    }
}

#[test]
fn trie_models_score_as_the_hash_tables_do() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, varied_text()).unwrap();
    let probes: Vec<String> = varied_text()
        .lines()
        .take(60)
        .map(|l| l.replace("w3 ", "w3 unknown "))
        .collect();
    for order in 1..=5 {
        let opts = fallback(order);
        let t = train(std::slice::from_ref(&corpus), &opts, &NoProgress)
            .unwrap()
            .tables;
        let open = |name: &str, layout| {
            let p = dir.path().join(name);
            save_as(&t, &p, layout).unwrap();
            Model::open(&p, Tokenization::Words).unwrap()
        };
        let hash = open("h.lmkb", BinaryLayout::Probing);
        let trie = open(
            "t.lmkb",
            BinaryLayout::Trie {
                bits: 0,
                pointer_bits: 0,
            },
        );
        let q8 = open(
            "q.lmkb",
            BinaryLayout::Trie {
                bits: 8,
                pointer_bits: 0,
            },
        );
        assert_eq!(
            trie.layout(),
            BinaryLayout::Trie {
                bits: 0,
                pointer_bits: 0
            }
        );
        let (mut sum_h, mut sum_q) = (0.0f64, 0.0f64);
        for s in &probes {
            let (a, b, q) = (hash.score_line(s), trie.score_line(s), q8.score_line(s));
            assert_eq!(a, b, "order {order}: {s}");
            for (x, y) in a.words.iter().zip(&q.words) {
                assert_eq!(x.ngram_len, y.ngram_len);
                assert!(
                    (x.log10_prob - y.log10_prob).abs() < 0.15,
                    "order {order}: {s}"
                );
            }
            sum_h += a.log10_prob as f64;
            sum_q += q.log10_prob as f64;
        }
        assert!(
            (sum_h - sum_q).abs() < 0.01 * sum_h.abs(),
            "{sum_h} vs {sum_q}"
        );
        // The lower-level query too, with histories that are not all stored.
        for h in [vec![], vec![5], vec![5, 9, 2], vec![1, 1, 1, 1, 1]] {
            for w in [0u32, 3, 7, 20, 41] {
                assert_eq!(hash.score_id(&h, w), trie.score_id(&h, w), "{h:?} {w}");
            }
        }
        // Compressed pointers (tables of at most 1, 3 or 22 bits) change the file, not a score.
        let size = |n: &str| std::fs::metadata(dir.path().join(n)).unwrap().len();
        for (bits, plain, name) in [(0, &trie, "t.lmkb"), (8, &q8, "q.lmkb")] {
            for pointer_bits in [1, 3, 22] {
                let layout = BinaryLayout::Trie { bits, pointer_bits };
                let packed = open("p.lmkb", layout);
                assert_eq!(packed.layout(), layout);
                for s in &probes {
                    assert_eq!(
                        plain.score_line(s),
                        packed.score_line(s),
                        "order {order}: {s}"
                    );
                }
                for h in [vec![], vec![5], vec![5, 9, 2], vec![1, 1, 1, 1, 1]] {
                    for w in [0u32, 3, 7, 20, 41] {
                        assert_eq!(plain.score_id(&h, w), packed.score_id(&h, w), "{h:?} {w}");
                    }
                }
                // (Smaller by the bits chopped, less the table and the sections' alignment.)
                let (p, full) = (size("p.lmkb"), size(name));
                assert!(p <= full, "order {order}, {layout:?}: {p} > {full}");
                if order >= 3 {
                    assert!(p < full, "order {order}, {layout:?}: {p} vs {full}");
                }
            }
        }
        if order > 1 {
            assert!(size("q.lmkb") < size("t.lmkb"), "order {order}");
        }
        // Trained tables keep each n-gram as its first word and a link to its suffix, in trie
        // order already; read from ARPA, keys are whole and the trie builder sorts them. Both
        // must give the same file.
        let arpa = dir.path().join("m.arpa");
        save(&t, &arpa).unwrap();
        for (bits, pointer_bits) in [(0, 0), (8, 0), (8, 22)] {
            let layout = BinaryLayout::Trie { bits, pointer_bits };
            let from_arpa = dir.path().join("a.lmkb");
            convert(&arpa, &from_arpa, Tokenization::Words, layout).unwrap();
            let direct = dir.path().join("d.lmkb");
            save_as(&t, &direct, layout).unwrap();
            assert!(
                std::fs::read(&direct).unwrap() == std::fs::read(&from_arpa).unwrap(),
                "order {order}, {layout:?}"
            );
        }
    }
}

#[test]
fn a_trie_needs_every_suffix_and_survives_damage() {
    let dir = tempfile::tempdir().unwrap();
    // "<s> a b" is stored but its suffix "a b" is not.
    let arpa = "\\data\\\nngram 1=5\nngram 2=2\nngram 3=1\n\n\\1-grams:\n-1\t<unk>\n-99\t<s>\t-0.5\n-1\ta\t-0.3\n-1\tb\n-1\t</s>\n\n\\2-grams:\n-0.5\t<s> a\t-0.2\n-0.5\tb </s>\n\n\\3-grams:\n-0.1\t<s> a b\n\n\\end\\\n";
    let t = read_arpa(arpa.as_bytes(), Path::new("x.arpa"), Tokenization::Words).unwrap();
    let p = dir.path().join("t.lmkb");
    let e = save_as(
        &t,
        &p,
        BinaryLayout::Trie {
            bits: 0,
            pointer_bits: 0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("t.lmkb") && e.contains("\"<s> a b\"") && e.contains("\"a b\""),
        "{e}"
    );
    assert!(!p.exists());
    // The hash tables take it.
    save_as(&t, &p, BinaryLayout::Probing).unwrap();

    // Random damage to a trie's sections (with the body checksum cleared, so it loads): scoring
    // gives some numbers, never a panic or an endless search.
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, varied_text()).unwrap();
    let t = train(&[corpus], &fallback(4), &NoProgress).unwrap().tables;
    let p = dir.path().join("q.lmkb");
    let mut x: u64 = 3;
    for pointer_bits in [0, 3].repeat(10) {
        save_as(
            &t,
            &p,
            BinaryLayout::Trie {
                bits: 6,
                pointer_bits,
            },
        )
        .unwrap();
        let good = std::fs::read(&p).unwrap();
        let mut bad = good.clone();
        bad[184..192].copy_from_slice(&[0; 8]);
        for _ in 0..200 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let at = 192 + (x >> 20) as usize % (bad.len() - 192);
            bad[at] ^= (x >> 8) as u8 | 1;
        }
        std::fs::write(&p, &bad).unwrap();
        if let Ok(m) = Model::open(&p, Tokenization::Words) {
            for s in varied_text().lines().take(20) {
                let _ = m.score_line(s);
            }
        }
    }
}

fn arpa_err(text: &str) -> String {
    match read_arpa(text.as_bytes(), Path::new("bad.arpa"), Tokenization::Words) {
        Err(e @ NgramError::Arpa { .. }) => e.to_string(),
        other => panic!("expected an ARPA error, got {other:?}"),
    }
}

#[test]
fn damaged_arpa_files_are_reported_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut good = Vec::new();
    write_arpa(&trained(dir.path(), 2), &mut good).unwrap();
    let good = String::from_utf8(good).unwrap();
    // Truncated in the middle of the bigrams.
    let cut = &good[..good.find("\\2-grams:").unwrap() + 40];
    let e = arpa_err(cut);
    assert!(e.contains("bad.arpa:") && e.contains("truncated"), "{e}");
    // Missing \end\.
    let e = arpa_err(good.trim_end().trim_end_matches("\\end\\"));
    assert!(e.contains("end of file"), "{e}");
    // A non-numeric probability.
    let e = arpa_err(&good.replacen("-99\t<s>", "abc\t<s>", 1));
    assert!(e.contains("bad probability `abc`"), "{e}");
    // Not an ARPA file at all.
    assert!(arpa_err("hello\nworld\n").contains("no `\\data\\` header"));
    // A bigram over an unknown word.
    let e = arpa_err("\\data\\\nngram 1=2\nngram 2=1\n\n\\1-grams:\n-1\t<s>\n-1\t</s>\n\n\\2-grams:\n-1\t<s> x\n\n\\end\\\n");
    assert!(
        e.contains("bad.arpa:10") && e.contains("`x` is not among the unigrams"),
        "{e}"
    );
}

fn binary_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p: PathBuf = dir.path().join("bad.lmkb");
    std::fs::write(&p, bytes).unwrap();
    match Model::open(&p, Tokenization::Words) {
        Err(e @ NgramError::Binary { .. }) => e.to_string(),
        Err(e) => panic!("expected a binary-format error, got {e}"),
        Ok(_) => panic!("a damaged file loaded"),
    }
}

#[test]
fn damaged_binary_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.lmkb");
    save(&trained(dir.path(), 3), &p).unwrap();
    let good = std::fs::read(&p).unwrap();
    assert!(binary_err(&good[..good.len() - 7]).contains("truncated"));
    assert!(binary_err(&good[..100]).contains("truncated"));
    let mut flipped = good.clone();
    flipped[9] ^= 0x40; // order field
    assert!(binary_err(&flipped).contains("checksum"));
    let mut vocab = good.clone();
    vocab[192 + 4] = 0xff; // second vocab offset, past the header checksum
    assert!(binary_err(&vocab).contains("vocabulary"));
    // A probability in the last order's table (the file's end): found by the body checksum, where
    // it used to load and score.
    let mut prob = good.clone();
    let last = (0..good.len() - 16)
        .rev()
        .step_by(16)
        .find(|&at| good[at..at + 8] != [0; 8])
        .expect("a filled slot");
    prob[last + 10] ^= 0x01;
    assert!(binary_err(&prob).contains("body checksum mismatch"));
    // Files written before the body checksum existed (0 there) still load.
    let mut old = good.clone();
    old[184..192].copy_from_slice(&[0; 8]);
    std::fs::write(dir.path().join("old.lmkb"), &old).unwrap();
    assert!(Model::open(&dir.path().join("old.lmkb"), Tokenization::Words).is_ok());
    let mut magic = good;
    magic[0..4].copy_from_slice(b"LMKB");
    magic[4] = 9;
    assert!(binary_err(&magic).contains("version"));
}

#[test]
fn bad_corpora_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.txt");
    let opts = TrainOptions::default();

    std::fs::write(&p, "\n  \n\n").unwrap();
    let e = train(std::slice::from_ref(&p), &opts, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("corpus is empty") && e.contains("c.txt"), "{e}");

    std::fs::write(&p, b"good line\nbad \xff\xfe line\n").unwrap();
    let e = train(std::slice::from_ref(&p), &opts, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("c.txt:2") && e.contains("UTF-8"), "{e}");

    std::fs::write(&p, "a b\nc </s> d\n").unwrap();
    let e = train(std::slice::from_ref(&p), &opts, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("c.txt:2") && e.contains("</s>"), "{e}");

    let e = train(
        std::slice::from_ref(&p),
        &TrainOptions {
            order: 0,
            ..Default::default()
        },
        &NoProgress,
    )
    .err()
    .unwrap();
    assert!(matches!(e, NgramError::BadOrder { order: 0, .. }));

    let e = train(&[dir.path().join("missing.txt")], &opts, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.txt"), "{e}");
}
