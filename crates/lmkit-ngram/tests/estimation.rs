//! Modified Kneser-Ney estimates on tiny corpora, checked against values worked out by hand from
//! Chen & Goodman (1998) eqs. 17 and 26 with KenLM's conventions (see src/kneser_ney.rs).

use lmkit_ngram::adjust::Adjuster;
use lmkit_ngram::count::{count_ngrams, CountOptions};
use lmkit_ngram::{train, Model, NoProgress, Tokenization, TrainOptions};
use std::path::{Path, PathBuf};

fn corpus(dir: &Path, text: &str) -> Vec<PathBuf> {
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    vec![p]
}

fn opts(order: usize) -> TrainOptions {
    TrainOptions {
        order,
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
    let t = train(&corpus(dir.path(), "a b\nb\n"), &opts(2), &NoProgress).unwrap();
    assert!(t.discounts.iter().all(|d| d.fallback));
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
    let mut adj = Adjuster::new(3);
    let (vocab, _) = count_ngrams(
        &corpus(dir.path(), "a b\na b\nc b\n"),
        &CountOptions {
            order: 3,
            ..Default::default()
        },
        &NoProgress,
        &mut |r, c| adj.push(r, c),
    )
    .unwrap();
    let tables = adj.finish();
    let get = |words: &str| {
        let key: Vec<u32> = words.split(' ').map(|w| vocab.get(w).unwrap()).collect();
        let t = &tables[key.len() - 1];
        (0..t.len())
            .find(|&i| t.key(i) == key.as_slice())
            .map(|i| t.counts[i])
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
    assert_eq!(get("<s>"), None);
}

/// Σ_w p(w | h) = 1 over the whole vocabulary (without <s>) for every context tried: the estimate is
/// a proper distribution at every order, whatever the discounts.
#[test]
fn conditional_distributions_sum_to_one() {
    let text =
        "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\nthe cat ate the fish\n\
                the dog ate the bone\non the mat the cat sat\nthe fish sat\na log and a mat\n"
            .repeat(3);
    let dir = tempfile::tempdir().unwrap();
    for order in 1..=4 {
        let t = train(&corpus(dir.path(), &text), &opts(order), &NoProgress).unwrap();
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
                "order {order}, context {ctx:?}: Σp = {total}"
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
            order: 3,
            tokenization: Tokenization::Chars,
            ..Default::default()
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
