//! Structured output for chat and completion requests: `response_format` (`json_object`,
//! `json_schema`) and, for chat, OpenAI-style `tools` / `tool_choice`. The output is constrained
//! token by token (llguidance); a schema using features the engine does not implement is refused
//! with a 400 naming them. lmkit extensions: `response_format` `{"type": "regex", "regex": ...}`
//! and `{"type": "lark", "lark": ...}`; `"constrain_after": "</think>"` constrains only what
//! follows the marker.

use super::*;
use lmkit_infer::constrain::{Constraint, ConstraintSpec, Grammar, Grammars};

/// The functions a chat request offers and how the model may use them.
#[derive(Clone, Debug)]
pub(super) struct Tools {
    /// Each function's name, description and parameter schema.
    pub(super) functions: Vec<(String, String, Value)>,
    /// true: the reply must be a call (`required` or a named function).
    pub(super) required: bool,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Structured {
    pub(super) spec: Option<ConstraintSpec>,
    pub(super) tools: Option<Tools>,
}

fn bad(field: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(field, msg.into())
}

fn response_format(v: Value) -> Result<Option<Grammar>, ApiError> {
    let field = "response_format";
    let Value::Object(mut o) = v else {
        return Err(bad(
            field,
            "`response_format` must be an object with a `type`",
        ));
    };
    let kind = o
        .remove("type")
        .and_then(|t| t.as_str().map(str::to_string));
    let g = match kind.as_deref() {
        Some("text") => None,
        Some("json_object") => Some(Grammar::JsonObject),
        Some("json_schema") => {
            let Some(Value::Object(mut js)) = o.remove("json_schema") else {
                return Err(bad(
                    "response_format.json_schema",
                    "`response_format.json_schema` must be an object {name, schema, strict}",
                ));
            };
            for k in js.keys() {
                if !matches!(k.as_str(), "name" | "schema" | "strict" | "description") {
                    return Err(bad(
                        "response_format.json_schema",
                        format!("`response_format.json_schema.{k}` is not a known field"),
                    ));
                }
            }
            let schema = js.remove("schema").unwrap_or_else(|| json!({}));
            if !schema.is_object() {
                return Err(bad(
                    "response_format.json_schema.schema",
                    "`response_format.json_schema.schema` must be a JSON Schema object",
                ));
            }
            Some(Grammar::JsonSchema(schema))
        }
        Some("regex") => Some(Grammar::Regex(
            o.remove("regex")
                .and_then(|r| r.as_str().map(str::to_string))
                .ok_or_else(|| bad("response_format.regex", "`response_format.regex` must be a string"))?,
        )),
        Some("lark") => Some(Grammar::Lark(
            o.remove("lark")
                .and_then(|r| r.as_str().map(str::to_string))
                .ok_or_else(|| bad("response_format.lark", "`response_format.lark` must be a string"))?,
        )),
        other => {
            return Err(bad(
                "response_format.type",
                format!(
                    "`response_format.type` must be text, json_object, json_schema, regex or lark, not {}",
                    other.unwrap_or("(missing)")
                ),
            ))
        }
    };
    if let Some(k) = o.keys().next() {
        return Err(bad(
            field,
            format!("`response_format.{k}` is not a known field"),
        ));
    }
    Ok(g)
}

fn tools(list: Value, choice: Option<Value>) -> Result<Option<Tools>, ApiError> {
    let Value::Array(list) = list else {
        return Err(bad(
            "tools",
            "`tools` must be a list of {type: function, function: {...}}",
        ));
    };
    let mut functions = Vec::new();
    for (i, t) in list.into_iter().enumerate() {
        let f = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(&f, format!("`{f}.type` must be function")));
        }
        let func = t
            .get("function")
            .ok_or_else(|| bad(&f, format!("`{f}.function` is missing")))?;
        let name = func
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad(&f, format!("`{f}.function.name` is missing")))?;
        let params = func
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if !params.is_object() {
            return Err(bad(
                &f,
                format!("`{f}.function.parameters` must be a JSON Schema object"),
            ));
        }
        let desc = func
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default();
        functions.push((name.to_string(), desc.to_string(), params));
    }
    if functions.is_empty() {
        return Ok(None);
    }
    let required = match choice {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => false,
            "required" => true,
            "none" => return Ok(None),
            _ => return Err(bad(
                "tool_choice",
                "`tool_choice` must be none, auto, required or {type: function, function: {name}}",
            )),
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice", "`tool_choice` must be none, auto, required or {type: function, function: {name}}"))?;
            let Some(pos) = functions.iter().position(|f| f.0 == name) else {
                return Err(bad(
                    "tool_choice",
                    format!("`tool_choice` names `{name}`, which is not in `tools`"),
                ));
            };
            functions = vec![functions.swap_remove(pos)];
            true
        }
    };
    Ok(Some(Tools {
        functions,
        required,
    }))
}

/// Reads (and removes) `response_format`, `tools`, `tool_choice`, `parallel_tool_calls` and
/// `constrain_after` from a request body.
pub(super) fn options(v: &mut Value, chat: bool) -> Result<Structured, ApiError> {
    let Some(o) = v.as_object_mut() else {
        return Ok(Structured::default());
    };
    let format = o.remove("response_format");
    let tool_list = o.remove("tools");
    let choice = o.remove("tool_choice");
    if let Some(p) = o.remove("parallel_tool_calls") {
        if !p.is_boolean() {
            return Err(bad(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be true or false",
            ));
        }
    }
    let after = match o.remove("constrain_after") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(_) => {
            return Err(bad(
                "constrain_after",
                "`constrain_after` must be a non-empty string",
            ))
        }
    };
    if !chat && (tool_list.is_some() || choice.is_some()) {
        return Err(bad("tools", "`tools` are for /v1/chat/completions"));
    }
    let grammar = format.map(response_format).transpose()?.flatten();
    let tools = match tool_list {
        Some(Value::Null) | None => {
            if choice.as_ref().is_some_and(|c| !c.is_null() && c != "none") {
                return Err(bad("tool_choice", "`tool_choice` needs `tools`"));
            }
            None
        }
        Some(t) => tools(t, choice)?,
    };
    if grammar.is_some() && tools.is_some() {
        return Err(bad(
            "response_format",
            "give either `response_format` or `tools`, not both",
        ));
    }
    let grammar = match (&tools, grammar) {
        (Some(t), _) => Some(tool_grammar(t)),
        (None, g) => g,
    };
    if after.is_some() && grammar.is_none() {
        return Err(bad(
            "constrain_after",
            "`constrain_after` needs `response_format` or `tools`",
        ));
    }
    Ok(Structured {
        spec: grammar.map(|grammar| ConstraintSpec { grammar, after }),
        tools,
    })
}

/// The JSON of one call: `{"name": ..., "arguments": {...}}`, for any of the functions.
fn call_schema(t: &Tools) -> Value {
    let one = |(name, _, params): &(String, String, Value)| {
        json!({"type": "object", "properties": {"name": {"const": name}, "arguments": params},
               "required": ["name", "arguments"], "additionalProperties": false})
    };
    if t.functions.len() == 1 {
        one(&t.functions[0])
    } else {
        json!({"anyOf": t.functions.iter().map(one).collect::<Vec<_>>()})
    }
}

fn tool_grammar(t: &Tools) -> Grammar {
    let schema = call_schema(t);
    if t.required {
        return Grammar::JsonSchema(schema);
    }
    // A plain answer (not starting with `{`) or a call.
    let s = lmkit_infer::constrain::compact(schema);
    Grammar::Lark(format!(
        "start: TEXT | call\nTEXT: /[^{{](.|\\n)*/\ncall: %json {s}\n"
    ))
}

/// The text that tells the model which functions it may call (a system message).
pub(super) fn tools_prompt(t: &Tools) -> String {
    let list: Vec<Value> = t
        .functions
        .iter()
        .map(|(n, d, p)| json!({"name": n, "description": d, "parameters": p}))
        .collect();
    format!(
        "You can call these functions:\n{}\nTo call a function, reply with only a JSON object {{\"name\": FUNCTION NAME, \"arguments\": {{...}}}}.{}",
        serde_json::to_string_pretty(&list).unwrap_or_default(),
        if t.required { "" } else { " Otherwise answer in plain text." }
    )
}

/// The output as OpenAI `tool_calls`, when it is a call.
pub(super) fn tool_calls(text: &str) -> Option<Vec<Value>> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    let args = v.get("arguments")?;
    Some(vec![json!({
        "id": format!("call_{:016x}", lmkit_core::rng::fresh_id()),
        "type": "function",
        "function": {"name": name, "arguments": args.to_string()},
    })])
}

/// Compiles a constraint for one choice; the model's grammar engine is built on first use.
pub(super) fn compile(
    state: &AppState,
    spec: &ConstraintSpec,
    field: &str,
) -> Result<Constraint, ApiError> {
    let g = state
        .grammars
        .get_or_init(|| {
            let mut eos: Vec<u32> = state.chat_end.iter().chain(&state.eos).copied().collect();
            eos.dedup();
            Grammars::new(&state.tokenizer, state.vocab_size, &eos).map(Arc::new)
        })
        .clone()
        .map_err(|e| {
            bad(
                field,
                format!("constrained decoding is not available for this model: {e}"),
            )
        })?;
    g.compile(spec).map_err(|e| {
        let e = e.lines().next().unwrap_or_default().to_string();
        bad(field, format!("the schema or grammar cannot be used: {e}"))
    })
}
