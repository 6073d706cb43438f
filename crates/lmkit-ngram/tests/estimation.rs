//! Modified Kneser-Ney estimates on tiny corpora, checked against values worked out by hand from
//! Chen & Goodman (1998) eqs. 17 and 26 with KenLM's conventions (see src/kneser_ney.rs).

use lmkit_ngram::adjust::Adjuster;
use lmkit_ngram::count::{count_ngrams, CountOptions};
use lmkit_ngram::{
    train, DiscountSource, EstimateOptions, Model, NoProgress, Tokenization, TrainOptions,
    FALLBACK_DISCOUNTS,
};
use std::path::{Path, PathBuf};

fn corpus(dir: &Path, text: &str) -> Vec<PathBuf> {
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    vec![p]
}

/// These corpora are tiny: where the discounts cannot be estimated, lmplz's fallback ones apply.
fn opts(order: usize) -> TrainOptions {
    TrainOptions {
        order,
        estimation: EstimateOptions {
            fallback: Some(FALLBACK_DISCOUNTS),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-5
}

#[test]
fn bigram_model_matches_hand_computation() {
    // Sentences: <s> a b </s>, <s> b </s>.
    // Bigram counts: <s> a:1, a b:1, b </s>:2, <s> b:1  → t1=3, t2=1, t3=0: fallback D = .5, 1, 1.5.
    // Unigram adjusted counts (distinct left words): a:1 {<s>}, b:2 {a,<s>}, </s>:1 {b}; Σ=4, t3=0: fallback.
    // γ(ε) = (.5 + 1 + .5)/4 = .5; |V| = 4 (a b </s> <unk>), uniform = .25.
    let (p_a, p_b, p_eos, p_unk) = (
        0.5 / 4.0 + 0.125,
        1.0 / 4.0 + 0.125,
        0.5 / 4.0 + 0.125,
        0.125,
    );
    // Context <s>: a:1, b:1, Σ=2, γ=(.5+.5)/2=.5.  Context a: b:1, γ=.5.  Context b: </s>:2, γ=1/2=.5.
    let p_a_bos = 0.5 / 2.0 + 0.5 * p_a;
    let p_b_bos = 0.5 / 2.0 + 0.5 * p_b;
    let p_b_a = 0.5 / 1.0 + 0.5 * p_b;
    let p_eos_b = 1.0 / 2.0 + 0.5 * p_eos;

    let dir = tempfile::tempdir().unwrap();
    let files = corpus(dir.path(), "a b\nb\n");
    // Without a fallback the corpus is refused, naming the order whose estimate fails.
    let err = train(
        &files,
        &TrainOptions {
            order: 2,
            ..Default::default()
        },
        &NoProgress,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("1-grams") && err.contains("--discount-fallback"),
        "{err}"
    );
    let t = train(&files, &opts(2), &NoProgress).unwrap();
    assert!(t
        .discounts
        .iter()
        .all(|d| d.source == DiscountSource::Fallback));
    let m = Model::from_tables(&t.tables, Path::new("mem"));
    let uni = |w: &str| 10f64.powf(m.score_id(&[], m.word_id(w).unwrap()).0 as f64);
    assert!(
        close(uni("a"), p_a)
            && close(uni("b"), p_b)
            && close(uni("</s>"), p_eos)
            && close(uni("<unk>"), p_unk)
    );
    assert!(close(p_a + p_b + p_eos + p_unk, 1.0));

    let s = m.score_tokens(&["a", "b"], true, true);
    let want = [p_a_bos, p_b_a, p_eos_b];
    for (w, p) in s.words.iter().zip(want) {
        assert!(close(10f64.powf(w.log10_prob as f64), p), "{w:?} vs {p}");
        assert_eq!(w.ngram_len, 2);
    }
    // Unseen bigrams back off: p(a|b) = γ(b)·p(a), p(</s>|a) = γ(a)·p(</s>).
    let s = m.score_tokens(&["b", "a"], true, true);
    let want = [p_b_bos, 0.5 * p_a, 0.5 * p_eos];
    for (w, p) in s.words.iter().zip(want) {
        assert!(close(10f64.powf(w.log10_prob as f64), p), "{w:?} vs {p}");
    }
    assert_eq!(s.words[1].ngram_len, 1);
    // An unknown word gets p(<unk>) and is flagged.
    let s = m.score_tokens(&["zebra"], true, true);
    assert!(s.words[0].oov && close(10f64.powf(s.words[0].log10_prob as f64), 0.5 * p_unk));
}

#[test]
fn adjusted_counts_use_raw_counts_only_where_no_left_word_exists() {
    let dir = tempfile::tempdir().unwrap();
    let mut adj = Adjuster::new(3, false);
    let (vocab, _) = count_ngrams(
        &corpus(dir.path(), "a b\na b\nc b\n"),
        &CountOptions {
            order: 3,
            ..Default::default()
        },
        &NoProgress,
        &mut adj,
    )
    .unwrap();
    let tables = adj.finish();
    let get = |words: &str| {
        let key: Vec<u32> = words.split(' ').map(|w| vocab.get(w).unwrap()).collect();
        let t = &tables[key.len() - 1];
        (0..t.len())
            .find(|&i| *lmkit_ngram::adjust::key(&tables, key.len(), i) == *key)
            .map(|i| t.counts.get(i))
    };
    // Highest order: raw counts.
    assert_eq!(get("<s> a b"), Some(2));
    assert_eq!(get("a b </s>"), Some(2));
    assert_eq!(get("c b </s>"), Some(1));
    // Middle order: "<s> a" cannot be extended left → raw 2; "b </s>" has left words {a, c} → 2;
    // "a b" has only <s> to its left → 1.
    assert_eq!(get("<s> a"), Some(2));
    assert_eq!(get("b </s>"), Some(2));
    assert_eq!(get("a b"), Some(1));
    // Unigrams: continuation counts.
    assert_eq!(get("b"), Some(2));
    assert_eq!(get("a"), Some(1));
    assert_eq!(get("</s>"), Some(1));
    assert_eq!(get("<s>"), Some(0)); // listed (it is a unigram of the model), never predicted
}

/// Σ_w p(w | h) = 1 over the whole vocabulary (without <s>) for every context tried: the estimate is
/// a proper distribution at every order, whatever the discounts, and with pruning too (a pruned
/// n-gram's mass goes to its context's back-off).
#[test]
fn conditional_distributions_sum_to_one() {
    // The text is repeated 3 times: n-grams seen 3 times are pruned, those seen 6+ times kept.
    for prune in [vec![], vec![0, 3], vec![0, 3, 3]] {
        sums_to_one(prune);
    }
}

fn sums_to_one(prune: Vec<u64>) {
    let text =
        "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\nthe cat ate the fish\n\
                the dog ate the bone\non the mat the cat sat\nthe fish sat\na log and a mat\n"
            .repeat(3);
    let dir = tempfile::tempdir().unwrap();
    for order in 1..=4 {
        let mut o = opts(order);
        o.estimation.prune = prune.iter().copied().take(order).collect();
        let t = train(&corpus(dir.path(), &text), &o, &NoProgress).unwrap();
        if order > 1 && prune.len() > 1 {
            let unpruned = train(&corpus(dir.path(), &text), &opts(order), &NoProgress).unwrap();
            assert!(t.tables.orders[1].len() < unpruned.tables.orders[1].len());
        }
        let m = Model::from_tables(&t.tables, Path::new("mem"));
        let id = |w: &str| m.word_id(w).unwrap();
        let contexts: Vec<Vec<u32>> = vec![
            vec![],
            vec![id("the")],
            vec![id("<s>")],
            vec![id("cat"), id("the")],
            vec![id("fish"), id("cat")],
            vec![id("sat"), id("cat"), id("the")],
        ];
        let bos = id("<s>");
        for ctx in contexts {
            let total: f64 = (0..m.vocab_size() as u32)
                .filter(|&w| w != bos)
                .map(|w| 10f64.powf(m.score_id(&ctx, w).0 as f64))
                .sum();
            assert!(
                (total - 1.0).abs() < 1e-4,
                "order {order}, prune {prune:?}, context {ctx:?}: Σp = {total}"
            );
        }
    }
}

#[test]
fn counting_on_disk_gives_the_same_model_as_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..3000)
        .map(|i| format!("w{} x{} w{} y{}\n", i % 17, i % 5, i % 11, i % 3))
        .collect();
    let files = corpus(dir.path(), &text);
    for order in [1, 3, 5] {
        let mem = train(&files, &opts(order), &NoProgress).unwrap();
        let disk_opts = TrainOptions {
            memory_bytes: 1,
            temp_dir: Some(dir.path().to_path_buf()),
            ..opts(order)
        };
        let disk = train(&files, &disk_opts, &NoProgress).unwrap();
        assert_eq!(mem.stats.runs_on_disk, 0);
        assert!(
            disk.stats.runs_on_disk > 3,
            "expected several runs, got {}",
            disk.stats.runs_on_disk
        );
        assert_eq!(mem.tables, disk.tables, "order {order}");
    }
}

#[test]
fn character_models_mark_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let t = train(
        &corpus(dir.path(), "나는 버스를 탔다\n나는 집에 갔다\n"),
        &TrainOptions {
            tokenization: Tokenization::Chars,
            ..opts(3)
        },
        &NoProgress,
    )
    .unwrap();
    assert!(t.tables.vocab.iter().any(|w| w == "\u{2581}"));
    assert!(t.tables.vocab.iter().any(|w| w == "버"));
    let m = Model::from_tables(&t.tables, Path::new("mem"));
    assert_eq!(m.tokenization(), Tokenization::Chars);
    assert!(
        m.score_line("나는 버스를 탔다").log10_prob > m.score_line("나는 버스를 태운다").log10_prob
    );
}

#[test]
fn every_line_is_a_sentence_and_words_split_as_lmplz_splits_them() {
    let dir = tempfile::tempdir().unwrap();
    // A blank line and a line of spaces are empty sentences; a vertical tab or a no-break space
    // stays inside its word; \r and tabs separate words.
    let files = corpus(dir.path(), "a b\n\n  \t \na\u{b}b c\u{a0}d\r\te\n");
    let t = train(&files, &opts(2), &NoProgress).unwrap();
    assert_eq!(
        (t.stats.lines, t.stats.blank_lines, t.stats.sentences),
        (4, 2, 4)
    );
    let m = Model::from_tables(&t.tables, Path::new("mem"));
    for w in ["a\u{b}b", "c\u{a0}d", "e"] {
        assert!(m.word_id(w).is_some(), "{w:?}");
    }
    let bigrams = &t.tables.orders[1];
    let (bos, eos) = (m.word_id("<s>").unwrap(), m.word_id("</s>").unwrap());
    assert!((0..bigrams.len()).any(|i| *t.tables.key(2, i) == [bos, eos]));

    // The model's own symbols in the text: refused, or dropped when asked.
    let files = corpus(dir.path(), "a b\nc <unk> d\n");
    let err = train(&files, &opts(2), &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("corpus.txt:2") && err.contains("<unk>") && err.contains("--skip-symbols"),
        "{err}"
    );
    let skip = TrainOptions {
        skip_symbols: true,
        ..opts(2)
    };
    let t = train(&files, &skip, &NoProgress).unwrap();
    assert_eq!((t.stats.tokens, t.stats.skipped_symbols), (4, 1));
}

#[test]
fn limited_vocabulary_drops_other_words_and_renumbers() {
    let dir = tempfile::tempdir().unwrap();
    let files = corpus(
        dir.path(),
        &"the cat sat\nthe dog sat\na cat ran\n".repeat(3),
    );
    let mut o = opts(3);
    o.estimation.limit_vocab = Some(vec!["the".into(), "cat".into(), "sat".into()]);
    let t = train(&files, &o, &NoProgress).unwrap();
    let mut words = t.tables.vocab.clone();
    words.sort();
    assert_eq!(words, ["</s>", "<s>", "<unk>", "cat", "sat", "the"]);
    // Every key is a valid id and every n-gram holds allowed words only.
    for ord in &t.tables.orders {
        assert!((0..ord.len()).all(|i| t
            .tables
            .key(ord.n, i)
            .iter()
            .all(|&w| (w as usize) < t.tables.vocab.len())));
    }
    let m = Model::from_tables(&t.tables, Path::new("mem"));
    // The unigrams are a distribution over the words kept.
    let bos = m.word_id("<s>").unwrap();
    let total: f64 = (0..m.vocab_size() as u32)
        .filter(|&w| w != bos)
        .map(|w| 10f64.powf(m.score_id(&[], w).0 as f64))
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "Σp = {total}");
    assert!(m.score_line("the cat sat").words.iter().all(|w| !w.oov));
    assert!(m.score_line("the dog sat").words[1].oov);
}

/// The first `lines` lines of a bundled corpus, as a file in `dir`.
fn bundled_head(dir: &Path, file: &str, lines: usize) -> Vec<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let head: String = text.lines().take(lines).flat_map(|l| [l, "\n"]).collect();
    let p = dir.join(file.replace('/', "_"));
    std::fs::write(&p, head).unwrap();
    vec![p]
}

/// A model estimated through sorted files on disk (counting did not fit in the memory budget) is
/// the in-memory estimate's ARPA file byte for byte: words and characters, with pruning, a
/// limited vocabulary and given discounts, under budgets that give from a few to over a hundred
/// sorted runs per order (more than one merge takes at once).
#[test]
fn estimates_on_disk_write_the_in_memory_arpa_file() {
    let dir = tempfile::tempdir().unwrap();
    let en = bundled_head(dir.path(), "en/web_bible.txt", 3000);
    let ko = bundled_head(dir.path(), "ko/tax_rulings.txt", 300);
    let vocab: Vec<String> = ["the", "of", "and", "to", "in", "LORD", "said", "unto"]
        .map(String::from)
        .to_vec();
    let cases: Vec<(&str, &[PathBuf], TrainOptions)> = vec![
        ("words, order 5", &en, opts(5)),
        (
            "words, order 3, pruned",
            &en,
            TrainOptions {
                estimation: EstimateOptions {
                    prune: vec![0, 1, 2],
                    ..opts(3).estimation
                },
                ..opts(3)
            },
        ),
        (
            "words, order 4, limited vocabulary, given discounts",
            &en,
            TrainOptions {
                estimation: EstimateOptions {
                    limit_vocab: Some(vocab),
                    given: vec![None, Some([0.4, 0.9, 1.2])],
                    ..opts(4).estimation
                },
                ..opts(4)
            },
        ),
        ("words, order 2", &en, opts(2)),
        (
            "characters, order 6",
            &ko,
            TrainOptions {
                tokenization: Tokenization::Chars,
                ..opts(6)
            },
        ),
    ];
    for (what, files, o) in cases {
        let in_memory = dir.path().join("memory.arpa");
        let t = lmkit_ngram::train_arpa(files, &o, &in_memory, &NoProgress).unwrap();
        assert!(!t.on_disk, "{what}");
        let want = std::fs::read(&in_memory).unwrap();
        // The ARPA file the tables give, too.
        let tables = train(files, &o, &NoProgress).unwrap().tables;
        let mut written = Vec::new();
        lmkit_ngram::arpa::write_arpa(&tables, &mut written).unwrap();
        assert!(written == want, "{what}: train + write_arpa");
        for memory in [16 << 10, 256 << 10] {
            let o = TrainOptions {
                memory_bytes: memory,
                temp_dir: Some(dir.path().to_path_buf()),
                ..o.clone()
            };
            let on_disk = dir.path().join("disk.arpa");
            let t2 = lmkit_ngram::train_arpa(files, &o, &on_disk, &NoProgress).unwrap();
            assert!(t2.on_disk && t2.stats.runs_on_disk > 0, "{what}");
            assert_eq!(t2.counts, t.counts, "{what}");
            assert_eq!(t2.discounts, t.discounts, "{what}");
            let got = std::fs::read(&on_disk).unwrap();
            if got != want {
                let (g, w) = (
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                );
                let diff = g.lines().zip(w.lines()).find(|(a, b)| a != b);
                panic!("{what}, {memory} bytes: the files differ, first at {diff:?}");
            }
            // Nothing is left in the temporary directory.
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| {
                    !n.to_string_lossy().ends_with(".arpa")
                        && !n.to_string_lossy().ends_with(".txt")
                })
                .collect();
            assert!(left.is_empty(), "{what}: {left:?}");
        }
    }
}
