//! End-to-end corpus preparation: planted duplicates are removed, distinct texts kept, every
//! document is accounted for in the report, the output is deterministic, bad input is reported.

use lmkit_data::{prepare, DataError, NoProgress, NormalizeOptions, PrepareOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

fn distinct_sentences(n: usize) -> Vec<String> {
    // Sentences built from different word choices so that no two are near duplicates.
    let subjects = [
        "The farmer",
        "A sailor",
        "Our teacher",
        "The old king",
        "My sister",
        "The tax office",
        "A young poet",
    ];
    let verbs = [
        "carried",
        "painted",
        "examined",
        "forgot",
        "sold",
        "repaired",
        "described",
    ];
    let objects = [
        "a wooden boat",
        "the northern road",
        "seven red apples",
        "an ancient map",
        "the broken clock",
        "a quiet garden",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{} {} {} on day {} while {} waited near gate {}.",
                subjects[i % 7],
                verbs[(i / 7) % 7],
                objects[(i / 49) % 6],
                i * 37 % 1000,
                ["everyone", "nobody", "the crowd", "a child"][i % 4],
                i
            )
        })
        .collect()
}

fn lines(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
    {
        for l in std::fs::read_to_string(f).unwrap().lines() {
            out.push(serde_json::from_str(l).unwrap());
        }
    }
    out
}

#[test]
fn planted_duplicates_are_removed_and_everything_is_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = distinct_sentences(300);
    let originals = docs.clone();
    // Exact duplicates (also after normalization: extra spaces, full-width letters).
    docs.push(originals[5].clone());
    docs.push(format!("  {}  ", originals[6].replace(' ', "   ")));
    docs.push(originals[7].replace("The", "Ｔｈｅ"));
    // Near duplicates: one word changed in a long sentence.
    let long = "In the first year of the reign the council met in the great hall and decided that every village should keep a record of its harvest, its wells and its roads for the coming winter.";
    docs.push(long.to_string());
    docs.push(long.replace("coming winter", "coming winters"));
    docs.push(long.replace("great hall", "grand hall"));
    // Too short, too few letters.
    docs.push("ok".into());
    docs.push("12345 67890 12345 67890 !!!".into());
    let input = dir.path().join("in.txt");
    std::fs::write(&input, docs.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let opts = PrepareOptions {
        val_fraction: 0.1,
        ..Default::default()
    };
    let r = prepare(std::slice::from_ref(&input), &out, &opts, &NoProgress).unwrap();

    assert_eq!(r.read.docs, docs.len() as u64);
    assert_eq!(
        r.exact_duplicates.removed.docs, 3,
        "{:?}",
        r.exact_duplicates.samples
    );
    assert_eq!(
        r.near_duplicates.removed.docs, 2,
        "{:?}",
        r.near_duplicates.samples
    );
    assert!(r
        .near_duplicates
        .samples
        .iter()
        .all(|s| s.kept.ends_with(&format!(":{}", 304)) && s.jaccard >= 0.8));
    assert_eq!(r.filtered["too_short"].docs, 1);
    assert_eq!(r.filtered["few_letters"].docs, 1);
    let filtered: u64 = r.filtered.values().map(|t| t.docs).sum();
    assert_eq!(
        r.read.docs,
        filtered
            + r.exact_duplicates.removed.docs
            + r.near_duplicates.removed.docs
            + r.train.docs
            + r.validation.docs
    );
    // Every distinct sentence survives, in one split or the other.
    let kept: Vec<String> = lines(&out)
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    for s in &originals {
        assert!(kept.contains(s), "lost: {s}");
    }
    assert!(
        r.validation.docs > 10 && r.validation.docs < 60,
        "val = {}",
        r.validation.docs
    );
    assert!(out.join("report.json").exists());

    // Deterministic: a second run writes the same bytes.
    let out2 = dir.path().join("out2");
    prepare(&[input], &out2, &opts, &NoProgress).unwrap();
    for name in ["train-00000.jsonl", "val-00000.jsonl"] {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(out2.join(name)).unwrap()
        );
    }
}

#[test]
fn clusters_name_the_kept_document_each_duplicate_joins() {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = distinct_sentences(50);
    let long = "In the first year of the reign the council met in the great hall and decided that every village should keep a record of its harvest, its wells and its roads for the coming winter.";
    docs.push(long.to_string()); // line 51
    docs.push(docs[4].clone()); // 52: exact copy of line 5
    docs.push(long.replace("coming winter", "coming winters")); // 53: near copy of 51
    docs.push(long.replace("coming winter", "coming winters")); // 54: exact copy of 53
    docs.push(docs[9].replace("The", "Ｔｈｅ")); // 55: exact copy of 10 after NFKC
    let input = dir.path().join("in.txt");
    std::fs::write(&input, docs.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let opts = PrepareOptions {
        clusters: true,
        filters: None,
        ..Default::default()
    };
    let r = prepare(std::slice::from_ref(&input), &out, &opts, &NoProgress).unwrap();
    assert_eq!(r.exact_duplicates.removed.docs, 3);
    assert_eq!(r.near_duplicates.removed.docs, 1);
    let at = |line: usize| format!("{}:{line}", input.display());
    let got: Vec<lmkit_data::ClusterMember> =
        std::fs::read_to_string(out.join(lmkit_data::CLUSTERS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let want = [
        (52, 5, "exact"),
        (53, 51, "near"),
        (54, 51, "exact"),
        (55, 10, "exact"),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (m, (removed, kept, kind)) in got.iter().zip(want) {
        assert_eq!(
            (m.source.as_str(), m.cluster.as_str(), m.kind.as_str()),
            (at(removed).as_str(), at(kept).as_str(), kind)
        );
        assert!(m.jaccard >= 0.8 && m.jaccard <= 1.0, "{m:?}");
    }
    assert_eq!(got[0].jaccard, 1.0);
    // Every cluster is a kept document of the shards.
    let kept: Vec<String> = lines(&out)
        .iter()
        .map(|v| v["source"].as_str().unwrap().to_string())
        .collect();
    assert!(got.iter().all(|m| kept.contains(&m.cluster)));
    // The directory read as input again gives its shards, not the cluster list.
    let inputs = lmkit_data::collect_inputs(&out).unwrap();
    assert!(!inputs.is_empty());
    assert!(
        inputs.iter().all(|p| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("train-")),
        "{inputs:?}"
    );
    // Without near-duplicate removal there are no clusters to name.
    let e = prepare(
        &[input],
        &dir.path().join("o2"),
        &PrepareOptions {
            near_dedup: None,
            ..opts
        },
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("near-duplicate"), "{e}");
}

#[test]
fn jsonl_gzip_and_dates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    writeln!(
        gz,
        r#"{{"content": "이 법은 2024년 8월 26일부터 시행한다. 부칙은 따로 정한다.", "id": 1}}"#
    )
    .unwrap();
    writeln!(
        gz,
        r#"{{"content": "The act took effect on August 26, 2024 across the country.", "id": 2}}"#
    )
    .unwrap();
    gz.finish().unwrap();
    let opts = PrepareOptions {
        text_field: "content".into(),
        normalize: NormalizeOptions {
            nfkc: true,
            dates: true,
            fix_mojibake: false,
        },
        val_fraction: 0.0,
        ..Default::default()
    };
    let out = dir.path().join("out");
    let r = prepare(&[path], &out, &opts, &NoProgress).unwrap();
    assert_eq!(r.dates_rewritten, 2);
    let texts: Vec<String> = lines(&out)
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        texts[0],
        "이 법은 2024-08-26부터 시행한다. 부칙은 따로 정한다."
    );
    assert_eq!(
        texts[1],
        "The act took effect on 2024-08-26 across the country."
    );
    assert!(lines(&out)[0]["source"]
        .as_str()
        .unwrap()
        .ends_with("docs.jsonl.gz:1"));
}

#[test]
fn bad_records_fail_with_file_and_line_or_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        b"{\"text\": \"a perfectly fine first document here\"}\n{\"text\": broken\n{\"body\": \"no text field at all\"}\n{\"text\": 42}\n\xff\xfe\n{\"text\": \"another perfectly fine document here\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let e = prepare(
        std::slice::from_ref(&path),
        &out,
        &PrepareOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, DataError::BadRecord { line: 2, .. })
            && msg.contains("bad.jsonl:2")
            && msg.contains("malformed JSON"),
        "{msg}"
    );

    let opts = PrepareOptions {
        skip_bad: true,
        val_fraction: 0.0,
        ..Default::default()
    };
    let r = prepare(std::slice::from_ref(&path), &out, &opts, &NoProgress).unwrap();
    assert_eq!(r.skipped_bad, 4);
    assert_eq!(r.train.docs, 2);
    let reasons: Vec<&str> = r
        .skipped_samples
        .iter()
        .map(|s| s.reason.as_str())
        .collect();
    assert!(
        reasons[1].contains("missing field `text`")
            && reasons[2].contains("not a string")
            && reasons[3].contains("UTF-8"),
        "{reasons:?}"
    );

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n   \n").unwrap();
    let e = prepare(&[empty], &out, &PrepareOptions::default(), &NoProgress).unwrap_err();
    assert!(e.to_string().contains("no documents"), "{e}");

    let corrupt = dir.path().join("c.txt.gz");
    std::fs::write(&corrupt, b"\x1f\x8b\x08\x00garbage").unwrap();
    let e = prepare(&[corrupt], &out, &PrepareOptions::default(), &NoProgress).unwrap_err();
    assert!(
        e.to_string().contains("c.txt.gz") && e.to_string().contains("gzip"),
        "{e}"
    );

    let bad_opt = PrepareOptions {
        val_fraction: 1.5,
        ..Default::default()
    };
    assert!(matches!(
        prepare(&[path], &out, &bad_opt, &NoProgress),
        Err(DataError::BadOption { .. })
    ));
}

/// Planted personal data in English and Korean is masked and counted; documents in other
/// languages are dropped and counted under `language`.
#[test]
fn pii_is_masked_and_languages_filtered() {
    use lmkit_data::{lang, pii};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(
        &input,
        "Please email the signed form to anna.kim@example.org before Friday, or call 415-555-0100.\n\
         환불 문의는 고객센터 010-9876-5432 또는 support@shop.co.kr 으로 연락 주시기 바랍니다.\n\
         신청서에 주민등록번호 851203-2345678 을 적지 말고 생년월일만 적어 주십시오.\n\
         The payment from card 5500 0055 5555 5559 was refused for the order placed from 198.51.100.23.\n\
         Le conseil municipal a voté hier soir le nouveau budget de la ville pour l'année prochaine.\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let opts = PrepareOptions {
        language: Some(lang::LanguageOptions {
            keep: lang::parse_codes("en,ko").unwrap(),
            min_confidence: 0.0,
        }),
        pii: Some(pii::PiiOptions::default()),
        val_fraction: 0.0,
        ..Default::default()
    };
    let r = prepare(&[input], &out, &opts, &NoProgress).unwrap();
    let text = std::fs::read_to_string(out.join("train-00000.jsonl")).unwrap();
    for planted in [
        "anna.kim@example.org",
        "415-555-0100",
        "010-9876-5432",
        "support@shop.co.kr",
        "851203-2345678",
        "5500 0055 5555 5559",
        "198.51.100.23",
    ] {
        assert!(!text.contains(planted), "{planted} left in {text}");
    }
    assert_eq!(text.lines().count(), 4, "{text}");
    let count = |k: &str| r.pii_masked.get(k).copied().unwrap_or(0);
    assert_eq!(
        (
            count("email"),
            count("phone"),
            count("rrn"),
            count("card"),
            count("ip")
        ),
        (2, 2, 1, 1, 1)
    );
    assert_eq!(r.pii_docs, 4);
    assert_eq!(r.filtered["language"].docs, 1);
    assert_eq!(r.languages["fra"].docs, 1);
}

/// Zstandard input of several frames (as `zstd` writes when files are concatenated) reads as one
/// stream; a damaged one is an error naming the file.
#[test]
fn zstd_inputs_of_several_frames() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl.zst");
    let rows = distinct_sentences(40);
    let part = |r: &[String]| {
        let text: String = r
            .iter()
            .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
            .collect();
        ruzstd::encoding::compress_to_vec(
            text.as_bytes(),
            ruzstd::encoding::CompressionLevel::Fastest,
        )
    };
    let mut bytes = part(&rows[..25]);
    bytes.extend(part(&rows[25..]));
    std::fs::write(&input, &bytes).unwrap();
    let opts = PrepareOptions {
        val_fraction: 0.0,
        ..Default::default()
    };
    let r = prepare(
        std::slice::from_ref(&input),
        &dir.path().join("out"),
        &opts,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(r.read.docs, 40);
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&input, &bytes).unwrap();
    let e = prepare(&[input], &dir.path().join("out2"), &opts, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("docs.jsonl.zst"), "{e}");
}

/// `data stats` over a prepared directory: kept documents per source, lengths, languages, and
/// the removals of report.json, charted.
#[test]
fn stats_of_a_prepared_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mixed.txt");
    let mut lines = distinct_sentences(30);
    lines.push(lines[0].clone());
    lines.push("대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.".into());
    lines.push("hi".into());
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    prepare(&[input], &out, &PrepareOptions::default(), &NoProgress).unwrap();
    let st = lmkit_data::stats::stats(&out, true).unwrap();
    assert_eq!(st.kept, 31);
    let per_source: u64 = st
        .sources
        .values()
        .flat_map(|m| m.values())
        .map(|t| t.docs)
        .sum();
    assert_eq!(per_source, 31);
    assert_eq!(st.lengths.iter().map(|(_, n)| n).sum::<u64>(), 31);
    assert_eq!(st.languages.get("kor"), Some(&1));
    let removed: std::collections::BTreeMap<_, _> = st.removed.iter().cloned().collect();
    assert_eq!((removed["exact_duplicate"], removed["too_short"]), (1, 1));
    let svg = lmkit_data::stats::removal_svg(&st);
    assert!(svg.starts_with("<svg") && svg.contains("exact_duplicate") && svg.contains(">31<"));
    assert!(lmkit_data::stats::markdown(&st).contains("| (kept) | 31 |"));
}

/// Compressed shards (gzip, zstd) hold the same lines as plain ones, and rotate by size.
#[test]
fn compressed_shards_rotate_by_size() {
    use lmkit_data::shards::Compression;
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, distinct_sentences(300).join("\n")).unwrap();
    let run = |c: Compression, name: &str| {
        let out = dir.path().join(name);
        let opts = PrepareOptions {
            val_fraction: 0.0,
            shard_bytes: 8_000,
            compression: c,
            ..Default::default()
        };
        let r = prepare(std::slice::from_ref(&input), &out, &opts, &NoProgress).unwrap();
        let mut lines = Vec::new();
        for p in &r.train.shards {
            let text = match c {
                Compression::Gzip => {
                    let mut s = String::new();
                    flate2::read::MultiGzDecoder::new(std::fs::File::open(p).unwrap())
                        .read_to_string(&mut s)
                        .unwrap();
                    s
                }
                _ => lmkit_data::ingest::read_text(p).unwrap(),
            };
            assert!(p.to_string_lossy().ends_with(c.suffix()), "{p:?}");
            lines.extend(text.lines().map(str::to_string));
        }
        (r.train.shards.len(), lines)
    };
    let (n, plain) = run(Compression::None, "plain");
    assert!(n >= 3, "{n} shards");
    assert_eq!(plain.len(), 300);
    for (c, name) in [(Compression::Gzip, "gz"), (Compression::Zstd, "zst")] {
        let (m, lines) = run(c, name);
        assert_eq!((m, &lines), (n, &plain), "{name}");
    }
}

/// A corpus of `n` lines of which about a third are near copies (one word changed) of earlier
/// ones, and a few exact copies.
fn corpus_with_copies(n: usize, seed: u64) -> String {
    use lmkit_core::rng::{Random, SplitMix64};
    let words = [
        "river", "hill", "road", "town", "field", "forest", "lake", "bridge", "market", "school",
        "church", "mill", "farm", "valley", "stream", "garden", "tower", "castle", "harbor",
        "island",
    ];
    let mut rng = SplitMix64::new(seed);
    let mut pick = |k: usize| (rng.next_u64() % k as u64) as usize;
    let mut originals: Vec<Vec<String>> = Vec::new();
    let mut out = String::new();
    for i in 0..n {
        let line = if !originals.is_empty() && pick(100) < 35 {
            let mut copy = originals[pick(originals.len())].clone();
            if pick(10) > 0 {
                let at = pick(copy.len());
                copy[at] = words[pick(words.len())].to_string();
            }
            copy.join(" ")
        } else {
            let len = 12 + pick(20);
            let mut w = vec!["Record"];
            w.extend((0..len).map(|_| words[pick(words.len())]));
            let line = format!("{} {i}.", w.join(" "));
            originals.push(line.split(' ').map(str::to_string).collect());
            line
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn dedup_under_a_memory_cap_equals_the_in_memory_result() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, corpus_with_copies(120_000, 7)).unwrap();
    let inputs = [input];
    let free = dir.path().join("free");
    let opts = PrepareOptions {
        filters: None,
        clusters: true,
        ..Default::default()
    };
    let a = prepare(&inputs, &free, &opts, &NoProgress).unwrap();
    let capped = dir.path().join("capped");
    let b = prepare(
        &inputs,
        &capped,
        &PrepareOptions {
            memory: Some(64 << 20),
            ..opts.clone()
        },
        &NoProgress,
    )
    .unwrap();
    // The index outgrew the cap: it went to disk, more than once.
    assert_eq!(a.dedup_spills, 0);
    assert!(b.dedup_spills >= 2, "{}", b.dedup_spills);
    assert!(a.near_duplicates.removed.docs > 20_000);
    assert_eq!(
        a.near_duplicates.removed.docs,
        b.near_duplicates.removed.docs
    );
    assert_eq!(
        a.exact_duplicates.removed.docs,
        b.exact_duplicates.removed.docs
    );
    // The shards and clusters.jsonl: the same bytes.
    assert_eq!(outputs(&free), outputs(&capped));
    let clusters = std::fs::read_to_string(capped.join("clusters.jsonl")).unwrap();
    assert_eq!(
        clusters.lines().count() as u64,
        a.near_duplicates.removed.docs + a.exact_duplicates.removed.docs
    );
    // What was spilled is gone.
    assert!(!capped.join(".dedup").exists());
}
