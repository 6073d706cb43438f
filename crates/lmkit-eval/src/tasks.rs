//! Log-likelihood tasks (lm-evaluation-harness style): each example is a context and choices;
//! the model's answer is the choice with the highest log-likelihood (`acc`) or the highest
//! log-likelihood per byte of the choice (`acc_norm`). Besides the generic multiple-choice shape,
//! the input formats of the GPT paper's tasks are turned into prompts: classification,
//! entailment (premise/hypothesis), similarity (both sentence orders, log-likelihoods summed).

use crate::{EvalError, Progress, Result, Scorer};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One JSONL line of a task file.
#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    MultipleChoice {
        context: String,
        choices: Vec<String>,
        answer: usize,
    },
    Entailment {
        premise: String,
        hypothesis: String,
        /// entailment, neutral or contradiction
        label: String,
    },
    Similarity {
        sentence1: String,
        sentence2: String,
        /// true (or 1) when the sentences mean the same
        label: serde_json::Value,
    },
    Classification {
        text: String,
        labels: Vec<String>,
        label: serde_json::Value,
    },
}

/// An example ready to score: one or more contexts (scores summed over them) and the choices.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub contexts: Vec<String>,
    pub choices: Vec<String>,
    pub answer: usize,
}

fn truthy(v: &serde_json::Value) -> Option<bool> {
    match v {
        serde_json::Value::Bool(b) => Some(*b),
        serde_json::Value::Number(n) => n.as_u64().map(|n| n != 0),
        serde_json::Value::String(s) => match s.as_str() {
            "1" | "true" | "yes" | "paraphrase" | "similar" => Some(true),
            "0" | "false" | "no" | "different" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn example(line: Line) -> std::result::Result<Example, String> {
    Ok(match line {
        Line::MultipleChoice {
            context,
            choices,
            answer,
        } => {
            if choices.len() < 2 || answer >= choices.len() {
                return Err(format!(
                    "`choices` needs at least 2 entries and `answer` ({answer}) must index one of them"
                ));
            }
            Example {
                contexts: vec![context],
                choices,
                answer,
            }
        }
        Line::Entailment {
            premise,
            hypothesis,
            label,
        } => {
            let answer = match label.as_str() {
                "entailment" => 0,
                "neutral" => 1,
                "contradiction" => 2,
                _ => {
                    return Err(format!(
                        "`label` must be entailment, neutral or contradiction, not `{label}`"
                    ))
                }
            };
            Example {
                contexts: vec![format!(
                    "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:"
                )],
                choices: vec![" True".into(), " Neither".into(), " False".into()],
                answer,
            }
        }
        Line::Similarity {
            sentence1,
            sentence2,
            label,
        } => {
            let same = truthy(&label).ok_or("`label` must be true/false or 1/0")?;
            let prompt = |a: &str, b: &str| {
                format!("Sentence 1: {a}\nSentence 2: {b}\nQuestion: Do both sentences mean the same thing?\nAnswer:")
            };
            Example {
                contexts: vec![
                    prompt(&sentence1, &sentence2),
                    prompt(&sentence2, &sentence1),
                ],
                choices: vec![" no".into(), " yes".into()],
                answer: same as usize,
            }
        }
        Line::Classification {
            text,
            labels,
            label,
        } => {
            let answer = match &label {
                serde_json::Value::Number(n) => n.as_u64().map(|n| n as usize),
                serde_json::Value::String(s) => labels.iter().position(|l| l == s),
                _ => None,
            }
            .filter(|&a| a < labels.len())
            .ok_or("`label` must be one of `labels` or its index")?;
            Example {
                contexts: vec![format!("{text}\nLabel:")],
                choices: labels.iter().map(|l| format!(" {l}")).collect(),
                answer,
            }
        }
    })
}

/// Reads a task file (JSONL), naming the line of any bad example.
pub fn load(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read(path).map_err(|e| EvalError::Input {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let text = String::from_utf8(text).map_err(|e| EvalError::Input {
        path: path.to_path_buf(),
        msg: format!("not valid UTF-8 ({e})"),
    })?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| EvalError::Input {
            path: path.to_path_buf(),
            msg: format!("line {}: {msg}", i + 1),
        };
        let line: Line = serde_json::from_str(l).map_err(|e| {
            bad(if e.is_data() {
                "expected {context, choices, answer}, {premise, hypothesis, label}, {sentence1, sentence2, label} or {text, labels, label}".into()
            } else {
                format!("not valid JSON: {e}")
            })
        })?;
        out.push(example(line).map_err(bad)?);
    }
    if out.is_empty() {
        return Err(EvalError::Input {
            path: path.to_path_buf(),
            msg: "no examples".into(),
        });
    }
    Ok(out)
}

/// Log-likelihoods of every choice of one example, and the model's picks.
#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    pub loglikelihoods: Vec<f64>,
    pub answer: usize,
    pub pick: usize,
    pub pick_norm: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub examples: usize,
    pub acc: f64,
    pub acc_norm: f64,
    /// Accuracy of always answering the most frequent gold answer index.
    pub majority: f64,
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    v.enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

pub fn score(scorer: &Scorer, ex: &Example) -> Result<Scored> {
    let mut ll = vec![0.0; ex.choices.len()];
    for ctx in &ex.contexts {
        for (i, c) in ex.choices.iter().enumerate() {
            ll[i] += scorer.loglikelihood(ctx, c)?;
        }
    }
    let pick = argmax(ll.iter().copied());
    let pick_norm = argmax(
        ll.iter()
            .zip(&ex.choices)
            .map(|(l, c)| l / c.len().max(1) as f64),
    );
    Ok(Scored {
        loglikelihoods: ll,
        answer: ex.answer,
        pick,
        pick_norm,
    })
}

/// Scores every example of a task.
pub fn run(
    scorer: &Scorer,
    name: &str,
    examples: &[Example],
    progress: &dyn Progress,
) -> Result<(TaskResult, Vec<Scored>)> {
    progress.begin(name, examples.len() as u64, crate::Unit::Items);
    let mut scored = Vec::with_capacity(examples.len());
    for ex in examples {
        scored.push(score(scorer, ex)?);
        progress.advance(1);
    }
    progress.finish();
    let n = scored.len().max(1) as f64;
    let mut freq = std::collections::HashMap::new();
    for s in &scored {
        *freq.entry(s.answer).or_insert(0usize) += 1;
    }
    let result = TaskResult {
        task: name.to_string(),
        examples: scored.len(),
        acc: scored.iter().filter(|s| s.pick == s.answer).count() as f64 / n,
        acc_norm: scored.iter().filter(|s| s.pick_norm == s.answer).count() as f64 / n,
        majority: freq.values().max().copied().unwrap_or(0) as f64 / n,
    };
    Ok((result, scored))
}

/// A Markdown table of results.
pub fn markdown(results: &[TaskResult]) -> String {
    let mut s =
        String::from("| task | examples | acc | acc_norm | majority |\n|---|---|---|---|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.4} |\n",
            r.task, r.examples, r.acc, r.acc_norm, r.majority
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_become_prompts_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(
            &p,
            r#"{"context": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0}
{"premise": "A cat sleeps.", "hypothesis": "An animal sleeps.", "label": "entailment"}
{"sentence1": "It rains.", "sentence2": "Rain falls.", "label": 1}
{"text": "Great film!", "labels": ["negative", "positive"], "label": "positive"}
"#,
        )
        .unwrap();
        let ex = load(&p).unwrap();
        assert_eq!(ex.len(), 4);
        assert_eq!(ex[1].choices, vec![" True", " Neither", " False"]);
        assert_eq!(ex[2].contexts.len(), 2);
        assert_eq!(ex[2].answer, 1);
        assert_eq!(ex[3].answer, 1);
        assert_eq!(ex[3].contexts[0], "Great film!\nLabel:");
        std::fs::write(
            &p,
            "{\"context\": \"x\", \"choices\": [\"a\"], \"answer\": 0}\n",
        )
        .unwrap();
        let e = load(&p).err().unwrap().to_string();
        assert!(
            e.contains("t.jsonl: line 1") && e.contains("at least 2"),
            "{e}"
        );
        std::fs::write(&p, "\n{\"question\": 1}\n").unwrap();
        let e = load(&p).err().unwrap().to_string();
        assert!(e.contains("line 2: expected"), "{e}");
        std::fs::write(&p, "{oops\n").unwrap();
        assert!(load(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("not valid JSON"));
    }
}
