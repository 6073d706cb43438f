//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json` (as transformers'
//! `apply_chat_template` uses it), rendered with minijinja.

use crate::error::{Result, TokenizeError};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The chat template of a tokenizer directory (its tokenizer_config.json), if it has one.
pub fn load_template(dir: &Path) -> Result<Option<String>> {
    let path = if dir.is_dir() {
        dir.join("tokenizer_config.json")
    } else {
        dir.with_file_name("tokenizer_config.json")
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TokenizeError::io(&path, e)),
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TokenizeError::Load {
        path: path.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    Ok(v.get("chat_template")
        .and_then(|t| t.as_str())
        .map(String::from))
}

/// Renders `messages` with `template`; `add_generation_prompt` appends the assistant's turn opener.
pub fn render(template: &str, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template)
        .map_err(|e| TokenizeError::Tokenizer(format!("chat_template does not parse: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| TokenizeError::Tokenizer(e.to_string()))?;
    tmpl.render(minijinja::context! { messages => messages, add_generation_prompt => add_generation_prompt })
        .map_err(|e| TokenizeError::Tokenizer(format!("chat_template failed to render: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpe::DEFAULT_CHAT_TEMPLATE;

    #[test]
    fn default_template_renders_roles_and_generation_prompt() {
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "안녕?"),
        ];
        assert_eq!(
            render(DEFAULT_CHAT_TEMPLATE, &msgs, true).unwrap(),
            "<|system|>Be brief.<|end|><|user|>안녕?<|end|><|assistant|>"
        );
        assert_eq!(
            render(DEFAULT_CHAT_TEMPLATE, &msgs, false).unwrap(),
            "<|system|>Be brief.<|end|><|user|>안녕?<|end|>"
        );
        assert!(render("{% for m in messages %}", &msgs, true)
            .unwrap_err()
            .to_string()
            .contains("does not parse"));
    }
}
