//! The n-gram moderation classifier learns from examples, generalizes to unseen ones, reports its
//! cross-validated quality, reloads from disk, and plugs into the moderator.

use lmkit_serve::classifier::{train, Classifier};
use lmkit_serve::moderation::{Moderator, Policy};

fn examples(verbs: &[&str], objects: &[&str], skip: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (i, v) in verbs.iter().enumerate() {
        for (j, o) in objects.iter().enumerate() {
            if (i + j) % 5 != skip {
                out.push(format!("I am going to {v} {o} tonight"));
            }
        }
    }
    out
}

#[test]
fn learns_flags_unseen_examples_and_reloads() {
    let bad = ["hurt", "attack", "beat up", "destroy", "threaten", "injure"];
    let good = ["help", "visit", "call", "thank", "cook for", "meet"];
    let objects = [
        "you",
        "your brother",
        "the neighbours",
        "my boss",
        "them all",
        "that guy",
    ];
    let dir = tempfile::tempdir().unwrap();
    let (f, a) = (
        dir.path().join("flagged.txt"),
        dir.path().join("allowed.txt"),
    );
    // Training data leaves out one combination in five; those are the unseen test cases.
    std::fs::write(&f, examples(&bad, &objects, 0).join("\n")).unwrap();
    std::fs::write(&a, examples(&good, &objects, 0).join("\n")).unwrap();
    let out = dir.path().join("clf");
    let info = train(&f, &a, &out, 4, "violence", 4).unwrap();
    assert!(info.accuracy >= 0.9, "{info:?}");
    assert!(info.precision > 0.8 && info.recall > 0.8, "{info:?}");
    let c = Classifier::load(&out).unwrap();
    assert_eq!(c.info, info);
    let unseen_bad: Vec<String> = examples(&bad, &objects, 5)
        .into_iter()
        .filter(|s| !examples(&bad, &objects, 0).contains(s))
        .collect();
    let unseen_good: Vec<String> = examples(&good, &objects, 5)
        .into_iter()
        .filter(|s| !examples(&good, &objects, 0).contains(s))
        .collect();
    assert!(!unseen_bad.is_empty());
    let hits = unseen_bad.iter().filter(|t| c.flags(t)).count();
    let false_alarms = unseen_good.iter().filter(|t| c.flags(t)).count();
    assert!(
        hits * 10 >= unseen_bad.len() * 8,
        "{hits}/{}",
        unseen_bad.len()
    );
    assert!(
        false_alarms * 10 <= unseen_good.len() * 2,
        "{false_alarms}/{}",
        unseen_good.len()
    );

    let m = Moderator::parse("spam: buy now", "rules", Policy::Refuse)
        .unwrap()
        .with_classifier(c);
    let v = m.check(&unseen_bad[0]);
    assert_eq!(v.categories, vec!["violence"]);
    assert!(!m.check(&unseen_good[0]).flagged || false_alarms > 0);

    // Too few examples, invalid UTF-8, a missing directory: clear errors naming the file.
    std::fs::write(&f, "just one line\n").unwrap();
    let e = train(&f, &a, &out, 4, "x", 4).err().unwrap().to_string();
    assert!(e.contains("flagged.txt") && e.contains("at least 4"), "{e}");
    std::fs::write(&f, b"\xff\xfe bad\nx\ny\nz\n").unwrap();
    let e = train(&f, &a, &out, 4, "x", 4).err().unwrap().to_string();
    assert!(e.contains("UTF-8"), "{e}");
    let e = Classifier::load(&dir.path().join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("classifier.json") && e.contains("lmkit moderation train"),
        "{e}"
    );
}

#[test]
fn the_example_rule_file_parses_and_flags() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/moderation-rules.txt");
    let m = Moderator::load(&path, Policy::Refuse).unwrap();
    assert_eq!(m.check("I will KILL them").categories, vec!["violence"]);
    assert!(m.check("폭탄 만드는 법 알려줘").flagged);
    assert!(!m.check("The cat sat on the mat.").flagged);
}
