//! Preference data: rows of a prompt with a chosen and a rejected completion, as TRL reads them
//! and `lmkit data export-preferences` writes them.
//!
//! - Standard: `{"prompt": "...", "chosen": "...", "rejected": "..."}`; each sequence is
//!   prompt + completion + the end-of-sequence token (unless the completion already ends with it).
//! - Conversational: `prompt` a list of messages and `chosen`/`rejected` lists of (assistant)
//!   messages, rendered through the base model's chat template; or, without `prompt`, two whole
//!   conversations whose shared leading messages are the prompt.
//!
//! Only completion tokens are scored: those after the prompt rendered with its generation prompt.
//! An optional numeric `margin` per row is kept (reward models can use it).

use crate::sft::{Example, Renderer};
use lmkit_tokenize::chat::Message;
use std::ops::Range;

/// One preference pair, each side tokenized with its completion tokens marked.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub chosen: Example,
    pub rejected: Example,
    /// How much better the chosen completion is (a rating difference), when the row says.
    pub margin: Option<f64>,
    /// Unpaired (KTO) rows: whether `chosen`'s completion is desirable; `rejected` is then the
    /// same prompt with another row's completion (what the KL estimate scores).
    pub label: Option<bool>,
}

impl Pair {
    /// Both sides have a completion token to score.
    pub fn scorable(&self) -> bool {
        self.chosen.targets() > 0 && self.rejected.targets() > 0
    }
}

/// An unpaired (KTO) row, tokenized.
pub struct Unpaired {
    pub example: Example,
    pub label: bool,
    prompt: Side,
    completion: Side,
}

enum Side {
    Text(String),
    Messages(Vec<Message>),
}

fn side(row: &serde_json::Map<String, serde_json::Value>, name: &str) -> Result<Side, String> {
    match row.get(name) {
        Some(serde_json::Value::String(s)) => Ok(Side::Text(s.clone())),
        Some(v @ serde_json::Value::Array(_)) => serde_json::from_value(v.clone())
            .map(Side::Messages)
            .map_err(|e| format!("`{name}` must be a string or a list of {{role, content}}: {e}")),
        Some(_) => Err(format!(
            "`{name}` must be a string or a list of {{role, content}} messages"
        )),
        None => Err(format!("`{name}` missing")),
    }
}

impl Renderer<'_> {
    /// One preference row as a pair, and whether either side was cut to `max_tokens`.
    pub fn pair(&self, row: &serde_json::Value) -> Result<(Pair, bool), String> {
        let obj = row.as_object().ok_or("a row must be a JSON object")?;
        let margin = match obj.get("margin") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .filter(|m| m.is_finite())
                    .ok_or("`margin` must be a number")?,
            ),
        };
        let chosen = side(obj, "chosen")?;
        let rejected = side(obj, "rejected")?;
        let prompt = match obj.get("prompt") {
            None | Some(serde_json::Value::Null) => None,
            Some(_) => Some(side(obj, "prompt")?),
        };
        let (c, r) = match (prompt, chosen, rejected) {
            (Some(Side::Text(p)), Side::Text(c), Side::Text(r)) => {
                (self.text_sequence(&p, &c)?, self.text_sequence(&p, &r)?)
            }
            (Some(Side::Messages(p)), Side::Messages(c), Side::Messages(r)) => (
                self.chat_sequence(&p, &c, "chosen")?,
                self.chat_sequence(&p, &r, "rejected")?,
            ),
            (None, Side::Messages(c), Side::Messages(r)) => {
                let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                if shared == 0 {
                    return Err(
                        "`chosen` and `rejected` share no leading messages to take as the prompt; give `prompt`"
                            .into(),
                    );
                }
                (
                    self.chat_sequence(&c[..shared], &c[shared..], "chosen")?,
                    self.chat_sequence(&r[..shared], &r[shared..], "rejected")?,
                )
            }
            (None, _, _) => {
                return Err("`prompt` missing (text completions need their prompt)".into())
            }
            _ => {
                return Err(
                    "`prompt`, `chosen` and `rejected` must all be strings or all be message lists"
                        .into(),
                )
            }
        };
        let ((chosen, cut_c), (rejected, cut_r)) = (c, r);
        Ok((
            Pair {
                chosen,
                rejected,
                margin,
                label: None,
            },
            cut_c || cut_r,
        ))
    }

    /// An unpaired row `{"prompt", "completion", "label": true|false}` (strings, or message
    /// lists), and whether it was cut.
    pub fn unpaired(&self, row: &serde_json::Value) -> Result<(Unpaired, bool), String> {
        let obj = row.as_object().ok_or("a row must be a JSON object")?;
        let label = obj
            .get("label")
            .and_then(|l| l.as_bool())
            .ok_or("`label` must be true (a desirable completion) or false")?;
        let prompt = side(obj, "prompt")?;
        let completion = side(obj, "completion")?;
        let (example, cut) = match (&prompt, &completion) {
            (Side::Text(p), Side::Text(c)) => self.text_sequence(p, c)?,
            (Side::Messages(p), Side::Messages(c)) => self.chat_sequence(p, c, "completion")?,
            _ => {
                return Err(
                    "`prompt` and `completion` must both be strings or both message lists".into(),
                )
            }
        };
        Ok((
            Unpaired {
                example,
                label,
                prompt,
                completion,
            },
            cut,
        ))
    }

    /// `prompt` followed by `completion`, the sequence a KL estimate scores.
    pub fn mismatched(&self, prompt: &Unpaired, completion: &Unpaired) -> Result<Example, String> {
        Ok(match (&prompt.prompt, &completion.completion) {
            (Side::Text(p), Side::Text(c)) => self.text_sequence(p, c)?.0,
            (Side::Messages(p), Side::Messages(c)) => self.chat_sequence(p, c, "completion")?.0,
            _ => return Err("rows mix strings and message lists".into()),
        })
    }

    fn text_sequence(&self, prompt: &str, completion: &str) -> Result<(Example, bool), String> {
        if completion.is_empty() {
            return Err("a completion is empty".into());
        }
        let eos = self.eos.as_deref().unwrap_or("");
        let tail = if completion.ends_with(eos) { "" } else { eos };
        let text = format!("{prompt}{completion}{tail}");
        let span: Range<usize> = prompt.len()..text.len();
        self.tokens(&text, std::slice::from_ref(&span))
    }

    fn chat_sequence(
        &self,
        prompt: &[Message],
        completion: &[Message],
        name: &str,
    ) -> Result<(Example, bool), String> {
        let template = self.template.ok_or(
            "the base model has no chat template (give prompt/chosen/rejected as strings, or a base with tokenizer_config.json's chat_template)",
        )?;
        if completion.is_empty() {
            return Err(format!("`{name}` has no message after the prompt"));
        }
        if let Some(m) = completion.iter().find(|m| m.role != "assistant") {
            return Err(format!(
                "`{name}`: the completion's messages must be the assistant's, not `{}`",
                m.role
            ));
        }
        let all: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
        let render = |m: &[Message], gen: bool| template.render(m, gen).map_err(|e| e.to_string());
        let before = render(prompt, true)?;
        let full = render(&all, false)?;
        if !full.starts_with(&before) {
            return Err(
                "the chat template renders the prompt differently once a reply follows it, so the completion cannot be found; give prompt/chosen/rejected as strings instead"
                    .into(),
            );
        }
        let span: Range<usize> = before.len()..full.trim_end().len().max(before.len());
        self.tokens(&full, std::slice::from_ref(&span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sft::{Format, TrainOn};
    use lmkit_tokenize::chat::ChatTemplate;

    fn tokenizer() -> lmkit_tokenize::Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.txt");
        std::fs::write(&file, "the cat sat on the mat yes no maybe\n".repeat(20)).unwrap();
        let opts = lmkit_tokenize::TrainOptions {
            vocab_size: 300,
            min_frequency: 1,
            special_tokens: vec!["<|end|>".into()],
            ..Default::default()
        };
        lmkit_tokenize::train(&[file], &opts).unwrap()
    }

    const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

    fn scored(tk: &lmkit_tokenize::Tokenizer, e: &Example) -> String {
        e.ids
            .iter()
            .zip(&e.train)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| tk.id_to_token(id).unwrap())
            .collect()
    }

    #[test]
    fn pairs_score_only_their_completions() {
        let tk = tokenizer();
        let template = ChatTemplate::new(TEMPLATE);
        let r = Renderer {
            tokenizer: &tk,
            template: Some(&template),
            eos: Some("<|end|>".into()),
            format: Format::Auto,
            train_on: TrainOn::Completion,
            max_tokens: 1000,
        };
        let (p, cut) = r
            .pair(&serde_json::json!({"prompt": "the cat", "chosen": " sat", "rejected": " no", "margin": 2}))
            .unwrap();
        assert!(!cut && p.scorable());
        assert_eq!(p.margin, Some(2.0));
        assert_eq!(scored(&tk, &p.chosen), "Ġsat<|end|>");
        assert_eq!(scored(&tk, &p.rejected), "Ġno<|end|>");
        // Conversations: the prompt is the shared leading messages.
        let user = serde_json::json!({"role": "user", "content": "the cat"});
        let (p, _) = r
            .pair(&serde_json::json!({
                "chosen": [user, {"role": "assistant", "content": "yes"}],
                "rejected": [user, {"role": "assistant", "content": "no"}]}))
            .unwrap();
        assert_eq!(scored(&tk, &p.chosen), "yes<|end|>");
        assert_eq!(scored(&tk, &p.rejected), "no<|end|>");
        for bad in [
            serde_json::json!({"prompt": "x", "chosen": "y"}),
            serde_json::json!({"prompt": "x", "chosen": "y", "rejected": ""}),
            serde_json::json!({"chosen": "y", "rejected": "z"}),
            serde_json::json!({"prompt": [user], "chosen": "y", "rejected": "z"}),
            serde_json::json!({"prompt": "x", "chosen": "y", "rejected": "z", "margin": "big"}),
        ] {
            assert!(r.pair(&bad).is_err(), "{bad}");
        }
    }
}
