//! Supervised fine-tuning data: rows of chat JSONL (`messages`), Alpaca (`instruction`,
//! `input`, `output`), `prompt`/`completion` or plain text, each tokenized with a mark on every
//! token the loss is taken on.
//!
//! A conversation is rendered through the base model's chat template; the tokens trained on are
//! the assistant turns as the template renders them, found by rendering the conversation up to
//! each assistant turn with and without it (so no `{% generation %}` markers are needed): the
//! turn's text from after the assistant opener through its end-of-turn token (trailing
//! whitespace left out). A model that never sees its end-of-turn token never learns to stop.

use crate::error::{Result, TrainError};
use lmkit_core::rng::{mix, MixChain, Random};
use lmkit_tokenize::chat::{ChatTemplate, Message};
use lmkit_tokenize::Tokenizer;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What the rows of a data file are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Each row by its fields: `messages`, `instruction`, `prompt`+`completion` or `text`.
    #[default]
    Auto,
    Chat,
    Alpaca,
    PromptCompletion,
    Text,
}

/// Which tokens the loss is taken on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// The answers only: assistant turns, completions, Alpaca outputs (and all of plain text).
    #[default]
    Completion,
    /// Every token, prompts included.
    Prompt,
}

/// One tokenized example: `train[i]` says whether token `i` is predicted in the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
}

impl Example {
    /// Tokens predicted in the loss (the first token never is: nothing precedes it).
    pub fn targets(&self) -> usize {
        self.train.iter().skip(1).filter(|&&t| t).count()
    }
}

/// How rows become token ids: the base model's tokenizer and chat template.
pub struct Renderer<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    /// Appended to prompt/completion, Alpaca (without a template) and text rows.
    pub eos: Option<String>,
    pub format: Format,
    pub train_on: TrainOn,
    /// Examples are cut to this many tokens.
    pub max_tokens: usize,
}

/// What reading a file gave.
#[derive(Debug)]
pub struct Read<T = Example> {
    pub examples: Vec<T>,
    /// Rows refused (with `skip_bad`), the first few errors kept.
    pub bad: usize,
    pub bad_samples: Vec<String>,
    /// Rows left with no token to train on once cut to `max_tokens`.
    pub empty: usize,
    /// Rows longer than `max_tokens` (cut).
    pub truncated: usize,
}

/// The rows of `path` (JSONL, a JSON array, or `.txt` lines as `{"text"}` rows) with their line
/// (or array position) numbers, and what a position is called in messages ("line" or "row").
pub(crate) type Rows = Vec<(usize, std::result::Result<serde_json::Value, String>)>;

pub(crate) fn read_rows(path: &Path) -> Result<(Rows, &'static str)> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let is_txt = path.extension().is_some_and(|e| e == "txt");
    if is_txt {
        let rows = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, Ok(serde_json::json!({ "text": l }))))
            .collect();
        return Ok((rows, "line"));
    }
    if text.trim_start().starts_with('[') {
        let all: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
            TrainError::Data(format!("{}: not a JSON array of rows: {e}", path.display()))
        })?;
        let rows = all
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, Ok(v)))
            .collect();
        return Ok((rows, "row"));
    }
    let rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, serde_json::from_str(l).map_err(|e| e.to_string())))
        .collect();
    Ok((rows, "line"))
}

/// Reads the rows of `path`, each made into an item by `parse` (which also says whether it was
/// cut); a row that fails is an error naming file and line or (with `skip_bad`) counted, and
/// an item `useful` rejects (nothing left to train on) is counted as empty.
pub(crate) fn read_with<T>(
    path: &Path,
    skip_bad: bool,
    parse: impl Fn(&serde_json::Value) -> std::result::Result<(T, bool), String>,
    useful: impl Fn(&T) -> bool,
) -> Result<Read<T>> {
    let (rows, what) = read_rows(path)?;
    let mut out = Read {
        examples: Vec::new(),
        bad: 0,
        bad_samples: Vec::new(),
        empty: 0,
        truncated: 0,
    };
    for (line, row) in rows {
        match row.and_then(|v| parse(&v)) {
            Ok((item, cut)) => {
                out.truncated += cut as usize;
                if useful(&item) {
                    out.examples.push(item);
                } else {
                    out.empty += 1;
                }
            }
            Err(msg) => {
                let msg = format!("{}:{what} {line}: {msg}", path.display());
                if !skip_bad {
                    return Err(TrainError::Data(format!(
                        "{msg} (fix the row, or pass --skip-bad to leave bad rows out)"
                    )));
                }
                out.bad += 1;
                if out.bad_samples.len() < 5 {
                    out.bad_samples.push(msg);
                }
            }
        }
    }
    Ok(out)
}

/// A run's training and validation items, and what reading them counted (both files).
pub(crate) struct Sets<T> {
    pub train: Vec<T>,
    pub val: Vec<T>,
    pub bad: usize,
    pub bad_samples: Vec<String>,
    pub empty: usize,
    pub truncated: usize,
}

/// Reads `train` and `val` with `read`; without `val`, a seeded `fraction` of the training
/// items is held out.
pub(crate) fn read_sets<T>(
    train: &Path,
    val: Option<&Path>,
    fraction: f64,
    seed: u64,
    progress: &dyn lmkit_core::Progress,
    read: impl Fn(&Path) -> Result<Read<T>>,
) -> Result<Sets<T>> {
    progress.message(&format!("reading {}", train.display()));
    let r = read(train)?;
    let mut sets = Sets {
        train: Vec::new(),
        val: Vec::new(),
        bad: r.bad,
        bad_samples: r.bad_samples,
        empty: r.empty,
        truncated: r.truncated,
    };
    (sets.train, sets.val) = match val {
        Some(p) => {
            let v = read(p)?;
            sets.bad += v.bad;
            sets.empty += v.empty;
            sets.truncated += v.truncated;
            (r.examples, v.examples)
        }
        None => split(r.examples, fraction, seed),
    };
    Ok(sets)
}

const ALPACA_PROMPT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

impl Renderer<'_> {
    /// Reads `path`: JSONL (one row per line), a JSON array of rows, or a `.txt` file (each
    /// non-empty line one text row). A bad row is an error naming file and line, or (with
    /// `skip_bad`) counted.
    pub fn read(&self, path: &Path, skip_bad: bool) -> Result<Read> {
        read_with(path, skip_bad, |v| self.example(v), |e| e.targets() > 0)
    }

    /// One row as an example, and whether it was cut.
    pub fn example(&self, row: &serde_json::Value) -> std::result::Result<(Example, bool), String> {
        let obj = row.as_object().ok_or("a row must be a JSON object")?;
        let field = |name: &str| -> std::result::Result<Option<&str>, String> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(format!("`{name}` must be a string")),
            }
        };
        let format = match self.format {
            Format::Auto if obj.contains_key("messages") => Format::Chat,
            Format::Auto if obj.contains_key("instruction") => Format::Alpaca,
            Format::Auto if obj.contains_key("prompt") || obj.contains_key("completion") => {
                Format::PromptCompletion
            }
            Format::Auto if obj.contains_key("text") => Format::Text,
            Format::Auto => {
                return Err(
                    "no `messages`, `instruction`, `prompt`/`completion` or `text` field".into(),
                )
            }
            f => f,
        };
        let eos = self.eos.as_deref().unwrap_or("");
        let (text, spans) = match format {
            Format::Chat => {
                let messages: Vec<Message> =
                    serde_json::from_value(obj.get("messages").cloned().unwrap_or_default())
                        .map_err(|e| {
                            format!("`messages` must be a list of {{role, content}} strings: {e}")
                        })?;
                self.chat(&messages)?
            }
            Format::Alpaca => {
                let instruction = field("instruction")?.ok_or("`instruction` missing")?;
                let input = field("input")?.unwrap_or("");
                let output = field("output")?.ok_or("`output` missing")?;
                if self.template.is_some() {
                    let user = if input.is_empty() {
                        instruction.to_string()
                    } else {
                        format!("{instruction}\n\n{input}")
                    };
                    self.chat(&[
                        Message::new("user", &user),
                        Message::new("assistant", output),
                    ])?
                } else {
                    let prompt = if input.is_empty() {
                        format!("{ALPACA_PROMPT}### Instruction:\n{instruction}\n\n### Response:\n")
                    } else {
                        format!("{ALPACA_PROMPT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
                    };
                    let text = format!("{prompt}{output}{eos}");
                    let span = prompt.len()..text.len();
                    (text, Vec::from([span]))
                }
            }
            Format::PromptCompletion => {
                let prompt = field("prompt")?.ok_or("`prompt` missing")?;
                let completion = field("completion")?.ok_or("`completion` missing")?;
                let text = format!("{prompt}{completion}{eos}");
                let span = prompt.len()..text.len();
                (text, Vec::from([span]))
            }
            Format::Text => {
                let t = field("text")?.ok_or("`text` missing")?;
                let text = format!("{t}{eos}");
                let span = 0..text.len();
                (text, Vec::from([span]))
            }
            Format::Auto => unreachable!("resolved above"),
        };
        self.tokens(&text, &spans)
    }

    /// `text` tokenized, the tokens starting inside `spans` trained on (all, with
    /// `TrainOn::Prompt`), cut to `max_tokens`; and whether it was cut.
    pub(crate) fn tokens(
        &self,
        text: &str,
        spans: &[Range<usize>],
    ) -> std::result::Result<(Example, bool), String> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        let mut train: Vec<bool> = match self.train_on {
            TrainOn::Prompt => vec![true; ids.len()],
            TrainOn::Completion => enc
                .get_offsets()
                .iter()
                .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
                .collect(),
        };
        let cut = ids.len() > self.max_tokens;
        ids.truncate(self.max_tokens);
        train.truncate(self.max_tokens);
        Ok((Example { ids, train }, cut))
    }

    /// A conversation rendered through the chat template, with the byte ranges of its assistant
    /// turns.
    pub(crate) fn chat(
        &self,
        messages: &[Message],
    ) -> std::result::Result<(String, Vec<Range<usize>>), String> {
        let template = self.template.ok_or(
            "the base model has no chat template (give prompt/completion rows, or a base with tokenizer_config.json's chat_template)",
        )?;
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        for m in messages {
            if !["system", "user", "assistant", "tool", "developer"].contains(&m.role.as_str()) {
                return Err(format!(
                    "role `{}`: use system, user, assistant or tool",
                    m.role
                ));
            }
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("no assistant message to learn from".into());
        }
        let render =
            |msgs: &[Message], gen: bool| template.render(msgs, gen).map_err(|e| e.to_string());
        let full = render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = render(&messages[..i], true)?;
            let through = render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(format!(
                    "the chat template does not render this conversation turn by turn (message {i} changes what comes before it), so its assistant turns cannot be found; give prompt/completion rows instead"
                ));
            }
            let end = through.trim_end().len().max(before.len());
            spans.push(before.len()..end);
        }
        Ok((full, spans))
    }
}

/// Splits examples into training and validation sets: all of them train and `val` validates
/// when given; otherwise a seeded `fraction` is held out (at least one example when the
/// fraction is above 0 and there are two or more).
pub fn split<T>(mut examples: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 || examples.len() < 2 {
        return (examples, Vec::new());
    }
    shuffle(&mut examples, mix(seed ^ 0x5911));
    let held = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let val = examples.split_off(examples.len() - held);
    (examples, val)
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = MixChain::new(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The order of `n` examples in `epoch`: a fresh seeded shuffle per epoch.
pub fn epoch_order(n: usize, epoch: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, mix(seed ^ mix(epoch as u64 + 0x5f7)));
    order
}

/// The examples of micro batch `k` (counting from 0 over the whole run): consecutive slices of
/// the epochs' orders, so a batch depends only on seed and `k`.
pub fn batch_indices(n: usize, batch: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut order_epoch = usize::MAX;
    let mut order: Vec<usize> = Vec::new();
    for pos in k * batch..(k + 1) * batch {
        let (epoch, i) = (pos / n, pos % n);
        if epoch != order_epoch {
            order = epoch_order(n, epoch, seed);
            order_epoch = epoch;
        }
        out.push(order[i]);
    }
    out
}

/// Packs examples, in `order`, into rows of at most `capacity` input positions (an example of n
/// tokens takes n − 1: its inputs), each row holding consecutive examples.
pub fn pack(order: &[usize], examples: &[Example], capacity: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = usize::MAX;
    for &i in order {
        let n = examples[i].ids.len().saturating_sub(1);
        if used.saturating_add(n) > capacity {
            rows.push(Vec::new());
            used = 0;
        }
        if let Some(row) = rows.last_mut() {
            row.push(i);
        }
        used += n;
    }
    rows
}

/// The data files of a fine-tuning run, with their paths for messages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SftDataConfig {
    /// Training rows (JSONL, a JSON array, or `.txt` lines).
    pub train: PathBuf,
    /// Validation rows; by default `val_fraction` of the training rows are held out.
    #[serde(default)]
    pub val: Option<PathBuf>,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    #[serde(default)]
    pub format: Format,
    #[serde(default)]
    pub train_on: TrainOn,
    /// Leave out (and count) rows that cannot be read instead of stopping.
    #[serde(default)]
    pub skip_bad: bool,
    /// Pack several examples into each sequence of `train.seq_len` (no attention across them,
    /// positions restarting): fewer padding positions, the same loss.
    #[serde(default)]
    pub pack: bool,
}

pub(crate) fn default_val_fraction() -> f64 {
    0.05
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.txt");
        std::fs::write(&file, "hello world how are you fine thanks\n".repeat(20)).unwrap();
        let opts = lmkit_tokenize::TrainOptions {
            vocab_size: 300,
            min_frequency: 1,
            special_tokens: vec!["<|im_start|>".into(), "<|im_end|>".into()],
            ..Default::default()
        };
        lmkit_tokenize::train(&[file], &opts).unwrap()
    }

    const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn assistant_turns_and_end_of_turn_are_trained() {
        let tk = tokenizer();
        let template = ChatTemplate::new(TEMPLATE);
        let r = Renderer {
            tokenizer: &tk,
            template: Some(&template),
            eos: None,
            format: Format::Auto,
            train_on: TrainOn::Completion,
            max_tokens: 1000,
        };
        let row = serde_json::json!({"messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "fine thanks"},
            {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "fine"}]});
        let (ex, cut) = r.example(&row).unwrap();
        assert!(!cut);
        let trained: String = ex
            .ids
            .iter()
            .zip(&ex.train)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| tk.id_to_token(id).unwrap())
            .collect::<Vec<_>>()
            .join("|");
        // Each answer with its end-of-turn token; the newline after it and the prompts are not.
        assert!(trained.contains("<|im_end|>"), "{trained}");
        assert_eq!(trained.matches("<|im_end|>").count(), 2, "{trained}");
        assert!(!trained.contains("user"));
        let all = Renderer {
            train_on: TrainOn::Prompt,
            ..r
        };
        assert!(all.example(&row).unwrap().0.train.iter().all(|&t| t));
    }

    #[test]
    fn prompt_completion_rows_train_on_the_completion_and_eos() {
        let tk = tokenizer();
        let r = Renderer {
            tokenizer: &tk,
            template: None,
            eos: Some("<|im_end|>".into()),
            format: Format::Auto,
            train_on: TrainOn::Completion,
            max_tokens: 1000,
        };
        let (ex, _) = r
            .example(&serde_json::json!({"prompt": "hello world", "completion": " fine"}))
            .unwrap();
        assert!(!ex.train[0]);
        assert!(ex.train[ex.train.len() - 1]);
        assert_eq!(
            tk.id_to_token(*ex.ids.last().unwrap()).unwrap(),
            "<|im_end|>"
        );
        assert!(r.example(&serde_json::json!({"messages": []})).is_err());
        assert!(r.example(&serde_json::json!({"foo": 1})).is_err());
    }

    #[test]
    fn batches_cover_every_example_once_per_epoch() {
        let n = 10;
        let mut seen: Vec<usize> = (0..5).flat_map(|k| batch_indices(n, 2, k, 7)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(batch_indices(n, 3, 4, 7), batch_indices(n, 3, 4, 7));
    }
}
