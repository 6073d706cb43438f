//! BPE training, exact round trips in English and Korean, token shards, and bad input.

use lmkit_tokenize::{
    decode, encode_batch, load, save, train, ShardWriter, TokenDataset, TokenShard, TokenizeError,
    TrainOptions,
};
use std::path::{Path, PathBuf};

const CORPUS: &str = "In the beginning, God created the heavens and the earth.\n\
The earth was formless and empty.\n\
대한민국은 민주공화국이다.\n\
대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.\n\
모든 국민은 법 앞에 평등하다.\n";

fn corpus(dir: &Path) -> Vec<PathBuf> {
    let p = dir.join("c.txt");
    std::fs::write(&p, CORPUS.repeat(20)).unwrap();
    vec![p]
}

fn small() -> TrainOptions {
    TrainOptions {
        vocab_size: 400,
        ..Default::default()
    }
}

#[test]
fn round_trips_are_exact_in_english_and_korean() {
    let dir = tempfile::tempdir().unwrap();
    let tk = train(&corpus(dir.path()), &small()).unwrap();
    assert_eq!(tk.get_vocab_size(true), 400);
    let texts: Vec<String> = [
        "In the beginning, God created the heavens and the earth.",
        "모든 국민은 법 앞에 평등하다.",
        "  leading and   multiple spaces\tand tabs\nand newlines  ",
        "unseen words: 헌법재판소, quixotic, 🙂 emoji, ①, café, naïve",
        "",
        "<|endoftext|> literal special token text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ids = encode_batch(&tk, &texts).unwrap();
    for (t, i) in texts.iter().zip(&ids) {
        assert_eq!(&decode(&tk, i).unwrap(), t);
    }
    // Frequent words become single tokens; special tokens have their own ids.
    let eot = tk.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(eot, 0);
    assert!(ids[5].contains(&eot));
    assert!(ids[0].len() < texts[0].len() / 2, "{:?}", ids[0]);
}

#[test]
fn saved_tokenizer_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small();
    let tk = train(&corpus(dir.path()), &opts).unwrap();
    let out = dir.path().join("tok");
    save(&tk, &out, &opts.special_tokens).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["eos_token"], "<|endoftext|>");
    assert!(config["chat_template"]
        .as_str()
        .unwrap()
        .contains("add_generation_prompt"));
    let back = load(&out).unwrap();
    let t = vec![CORPUS.to_string()];
    assert_eq!(
        encode_batch(&tk, &t).unwrap(),
        encode_batch(&back, &t).unwrap()
    );
}

#[test]
fn shards_hold_documents_and_read_back_across_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let tk = train(&corpus(dir.path()), &small()).unwrap();
    let texts: Vec<String> = CORPUS.lines().map(String::from).collect();
    let ids = encode_batch(&tk, &texts).unwrap();
    let eot = tk.token_to_id("<|endoftext|>");
    let sd = dir.path().join("shards");
    let mut w = ShardWriter::new(&sd, tk.get_vocab_size(true), eot, 16).unwrap();
    for i in &ids {
        w.write_document(i).unwrap();
    }
    w.finish().unwrap();
    assert!(w.paths.len() > 1);
    let mut expected: Vec<u32> = Vec::new();
    for i in &ids {
        expected.extend(i);
        expected.push(eot.unwrap());
    }
    let ds = TokenDataset::open_dir(&sd).unwrap();
    assert_eq!(ds.len(), expected.len() as u64);
    assert_eq!(ds.window(0, expected.len()), expected);
    assert_eq!(ds.window(10, 25), expected[10..35].to_vec());
    assert_eq!(
        ds.window(expected.len() as u64 - 3, 10),
        expected[expected.len() - 3..].to_vec()
    );
    assert_eq!(ds.shards[0].header.dtype, lmkit_tokenize::Dtype::U16);
    assert_eq!(
        std::fs::metadata(&w.paths[0]).unwrap().len(),
        2 * ds.shards[0].header.count
    );

    // A shard holding an id outside its vocabulary is refused with its path.
    let bin = &w.paths[0];
    let bytes = std::fs::read(bin).unwrap();
    let mut bad = bytes.clone();
    bad[2..4].copy_from_slice(&u16::MAX.to_le_bytes());
    std::fs::write(bin, &bad).unwrap();
    let e = TokenShard::open(bin).err().unwrap().to_string();
    assert!(
        e.contains("tokens-00000.bin") && e.contains("token 1 is id 65535"),
        "{e}"
    );

    // A truncated shard is refused with its path.
    std::fs::write(bin, &bytes[..bytes.len() - 2]).unwrap();
    let e = TokenShard::open(bin).err().unwrap().to_string();
    assert!(
        e.contains("tokens-00000.bin") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(bin.with_extension("json"), "{ not json").unwrap();
    let e = TokenShard::open(bin).err().unwrap().to_string();
    assert!(
        e.contains("tokens-00000.json") && e.contains("bad shard header"),
        "{e}"
    );
}

#[test]
fn bad_input_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let e = train(
        &corpus(dir.path()),
        &TrainOptions {
            vocab_size: 100,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            TokenizeError::BadOption {
                name: "vocab_size",
                ..
            }
        ),
        "{e}"
    );

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n \n").unwrap();
    assert!(matches!(
        train(&[empty], &small()),
        Err(TokenizeError::Empty { .. })
    ));

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"fine\n\xff\xfe\n").unwrap();
    let e = train(&[bad], &small()).unwrap_err().to_string();
    assert!(e.contains("bad.txt:2") && e.contains("UTF-8"), "{e}");

    let junk = dir.path().join("tokenizer.json");
    std::fs::write(&junk, "{\"model\": 3}").unwrap();
    let e = load(&junk).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("cannot load tokenizer"),
        "{e}"
    );
    assert!(load(&dir.path().join("missing")).is_err());

    let tk = train(&corpus(dir.path()), &small()).unwrap();
    let e = decode(&tk, &[1, 2, 99999]).unwrap_err().to_string();
    assert!(e.contains("99999") && e.contains("out of range"), "{e}");
}

/// Texts longer than a piece are encoded a piece at a time: the same tokens where the text has
/// spaces, exact round trips always, and bounded memory for one huge word.
#[test]
fn long_texts_encode_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let tk = lmkit_tokenize::train(&corpus(dir.path()), &small()).unwrap();
    let words: String = (0..40_000)
        .map(|i| format!("word{} and  more, ", i % 97))
        .collect();
    assert!(words.len() > 3 * lmkit_tokenize::MAX_PIECE_BYTES);
    let ps = lmkit_tokenize::pieces(&words, lmkit_tokenize::MAX_PIECE_BYTES);
    assert!(
        ps.len() > 3
            && ps
                .iter()
                .all(|p| p.len() <= lmkit_tokenize::MAX_PIECE_BYTES)
    );
    assert_eq!(ps.concat(), words);
    let whole = tk.encode(words.as_str(), false).unwrap().get_ids().to_vec();
    let pieced = encode_batch(&tk, std::slice::from_ref(&words))
        .unwrap()
        .remove(0);
    assert_eq!(pieced, whole, "cutting at spaces changed the tokens");
    // One 300 KB "word" (no spaces; multi-byte characters): cut at character boundaries.
    let huge: String = "가나다ab".repeat(30_000);
    let ids = encode_batch(&tk, std::slice::from_ref(&huge))
        .unwrap()
        .remove(0);
    assert_eq!(lmkit_tokenize::decode(&tk, &ids).unwrap(), huge);
}

/// Training cuts runs of non-space characters to their first `MAX_TRAIN_RUN` bytes: shorter text
/// is untouched, a long run loses only its tail (at a character boundary), and the trainer never
/// sees what lies past it.
#[test]
fn training_cuts_overlong_words() {
    use lmkit_tokenize::bpe::{cap_runs, MAX_TRAIN_RUN};
    let normal = "short words,  spaces\tand 한국어 text";
    assert!(matches!(
        cap_runs(normal, 12),
        std::borrow::Cow::Borrowed(_)
    ));
    assert_eq!(cap_runs("abcdefghij klm nopqrstuvw", 4), "abcd klm nopq");
    // Multi-byte characters: only whole characters within the cap are kept.
    assert_eq!(cap_runs("가나다라 ab", 7), "가나 ab");
    assert_eq!(cap_runs(" x\u{3000}yyyyyy ", 3), " x\u{3000}yyy ");

    // A corpus whose only long word holds, past its first MAX_TRAIN_RUN bytes, a pair repeated
    // thousands of times: without the cut it would be the first merge.
    let dir = tempfile::tempdir().unwrap();
    let head: String = "abcdefghij".repeat(MAX_TRAIN_RUN / 10 + 1);
    let long = format!("{}{}", head, "qz".repeat(5_000));
    let p = dir.path().join("c.txt");
    std::fs::write(&p, format!("{}\n{long}\n", CORPUS.repeat(5))).unwrap();
    let tk = train(&[p], &small()).unwrap();
    assert!(tk.token_to_id("qz").is_none(), "learned from past the cut");
    assert_eq!(tk.get_vocab_size(true), 400);
    let ids = encode_batch(&tk, std::slice::from_ref(&long))
        .unwrap()
        .remove(0);
    assert_eq!(
        decode(&tk, &ids).unwrap(),
        long,
        "encoding keeps every byte"
    );
}

/// `encode_each` hands a text over `BATCH_BYTES` on a batch of pieces at a time, in order: the
/// ids of each text's calls joined are `encode_batch`'s, each text ends with one `last` call,
/// and a shard written in parts holds what one written whole does.
#[test]
fn huge_texts_are_encoded_and_written_a_part_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let tk = train(&corpus(dir.path()), &small()).unwrap();
    let long: String = CORPUS
        .replace('\n', " ")
        .repeat(2 * lmkit_tokenize::BATCH_BYTES / CORPUS.len() + 10);
    assert!(long.len() > 2 * lmkit_tokenize::BATCH_BYTES);
    let texts = vec![
        "the earth".to_string(),
        long.clone(),
        String::new(),
        long[..CORPUS.len()].to_string(),
        long,
    ];
    let whole = encode_batch(&tk, &texts).unwrap();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); texts.len()];
    let (mut calls, mut ended) = (vec![0; texts.len()], Vec::new());
    let sd = dir.path().join("parts");
    let eot = tk.token_to_id("<|endoftext|>");
    let mut w = ShardWriter::new(&sd, tk.get_vocab_size(true), eot, 1 << 40).unwrap();
    lmkit_tokenize::encode_each::<TokenizeError>(&tk, &texts, |i, ids, last| {
        assert!(ended.len() == i, "text {i} after {ended:?} ended");
        got[i].extend_from_slice(ids);
        calls[i] += 1;
        w.write_ids(ids)?;
        if last {
            ended.push(i);
            w.end_document()?;
        }
        Ok(())
    })
    .unwrap();
    w.finish().unwrap();
    assert_eq!(got, whole);
    assert_eq!(ended, [0, 1, 2, 3, 4]);
    assert_eq!(calls[0], 1);
    assert!(calls[1] > 3, "{calls:?}");
    let sd2 = dir.path().join("whole");
    let mut w2 = ShardWriter::new(&sd2, tk.get_vocab_size(true), eot, 1 << 40).unwrap();
    for ids in &whole {
        w2.write_document(ids).unwrap();
    }
    w2.finish().unwrap();
    assert_eq!((w.tokens, w.documents), (w2.tokens, w2.documents));
    let (a, b) = (
        TokenDataset::open_dir(&sd).unwrap(),
        TokenDataset::open_dir(&sd2).unwrap(),
    );
    assert_eq!(a.window(0, a.len() as usize), b.window(0, b.len() as usize));
}

/// The special tokens a post-processor puts around every text (Llama's BOS, BERT's CLS and
/// SEP) are found, to be written around ids that come in parts; the same as
/// `add_special_tokens` gives.
#[test]
fn special_affixes_are_what_the_post_processor_adds() {
    let dir = tempfile::tempdir().unwrap();
    let trained = train(&corpus(dir.path()), &small()).unwrap();
    let ids = encode_batch(&trained, &["the earth was".to_string()])
        .unwrap()
        .remove(0);
    assert_eq!(
        lmkit_tokenize::special_affixes(&trained).unwrap(),
        Some((vec![], vec![]))
    );
    let mut json: serde_json::Value =
        serde_json::from_str(&trained.to_string(false).unwrap()).unwrap();
    let (s, e) = (trained.token_to_id("<|endoftext|>").unwrap(), 0u32);
    let template = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [s], "tokens": ["<|endoftext|>"]}},
    });
    let bert =
        serde_json::json!({"type": "BertProcessing", "sep": ["x", e], "cls": ["<|endoftext|>", s]});
    for (pp, head, tail) in [(template, vec![s], vec![]), (bert, vec![s], vec![e])] {
        json["post_processor"] = pp;
        let tk: tokenizers::Tokenizer = json.to_string().parse().unwrap();
        let (h, t) = lmkit_tokenize::special_affixes(&tk).unwrap().unwrap();
        assert_eq!((&h, &t), (&head, &tail));
        assert_eq!(
            lmkit_tokenize::add_special_tokens(&tk, ids.clone()).unwrap(),
            [&h[..], &ids[..], &t[..]].concat()
        );
    }
}
