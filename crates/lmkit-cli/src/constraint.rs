//! Flags that constrain generated text to a JSON schema, any JSON object, a regular expression
//! or a Lark grammar (shared by `lmkit generate` and `lmkit chat`).

use anyhow::{bail, Context, Result};
use clap::Args;
use lmkit_infer::constrain::{ConstraintSpec, Grammar, Grammars};
use std::path::PathBuf;

#[derive(Args, Clone, Debug, Default)]
pub struct ConstraintArgs {
    /// The output is a JSON document valid against this JSON Schema file
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json_object", "regex", "grammar"])]
    pub json_schema: Option<PathBuf>,
    /// The output is a JSON object
    #[arg(long, conflicts_with_all = ["regex", "grammar"])]
    pub json_object: bool,
    /// The output matches this regular expression (Rust regex syntax)
    #[arg(long, conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// The output follows this Lark grammar file (llguidance's dialect)
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    /// Constrain only what follows this marker (e.g. '</think>': free reasoning, then the answer)
    #[arg(long, value_name = "TEXT")]
    pub constrain_after: Option<String>,
}

impl ConstraintArgs {
    /// The constraint the flags ask for, if any.
    pub fn spec(&self) -> Result<Option<ConstraintSpec>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))
        };
        let grammar = if let Some(p) = &self.json_schema {
            let v: serde_json::Value = serde_json::from_str(&read(p)?)
                .with_context(|| format!("{}: not valid JSON", p.display()))?;
            if !v.is_object() && !v.is_boolean() {
                bail!("{}: a JSON Schema is an object", p.display());
            }
            Grammar::JsonSchema(v)
        } else if self.json_object {
            Grammar::JsonObject
        } else if let Some(r) = &self.regex {
            Grammar::Regex(r.clone())
        } else if let Some(p) = &self.grammar {
            Grammar::Lark(read(p)?)
        } else {
            if self.constrain_after.is_some() {
                bail!("--constrain-after needs --json-schema, --json-object or --regex");
            }
            return Ok(None);
        };
        Ok(Some(ConstraintSpec {
            grammar,
            after: self.constrain_after.clone(),
        }))
    }
}

/// The grammar engine for a model's tokenizer (its whole vocabulary and stop ids).
pub fn engine(
    tokenizer: &lmkit_tokenize::Tokenizer,
    vocab_size: usize,
    stop_ids: &[u32],
) -> Result<Grammars> {
    Grammars::new(tokenizer, vocab_size, stop_ids)
        .map_err(|e| anyhow::anyhow!("constrained decoding: {e}"))
}

/// One sequence's constraint.
pub fn compile(g: &Grammars, spec: &ConstraintSpec) -> Result<lmkit_infer::constrain::Constraint> {
    g.compile(spec)
        .map_err(|e| anyhow::anyhow!("the constraint cannot be used: {e}"))
}
