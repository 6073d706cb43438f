//! Constrained decoding: before each token is sampled, tokens that cannot continue a JSON schema,
//! any JSON object, a regular expression or a Lark grammar are masked out (the `llguidance`
//! engine, over a token trie built from the model's tokenizer). Optionally the constraint starts
//! only after a marker such as `</think>`, so a reasoning model thinks freely and then answers
//! in the required form.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON document valid against this schema.
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression (Rust `regex` syntax, whole output).
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `%json {...}` inline schemas, `stop=` rules).
    Lark(String),
}

/// A grammar, optionally applied only after the output contains `after`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstraintSpec {
    pub grammar: Grammar,
    pub after: Option<String>,
}

/// JSON is written compactly with single spaces after `,` and `:` (no free whitespace: a small
/// model given free whitespace can loop on newlines); a schema's own `x-guidance` options win.
pub fn compact(mut schema: Value) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
        });
    }
    schema
}

fn lark_regex(rx: &str) -> String {
    format!("/{}/", rx.replace('/', "\\/"))
}

impl ConstraintSpec {
    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        let schema = |g: &Grammar| match g {
            Grammar::JsonSchema(s) => Some(compact(s.clone())),
            Grammar::JsonObject => Some(compact(serde_json::json!({"type": "object"}))),
            _ => None,
        };
        let Some(after) = &self.after else {
            return Ok(match &self.grammar {
                Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
                Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
                g => TopLevelGrammar::from_json_schema(schema(g).unwrap()),
            });
        };
        let answer = match &self.grammar {
            Grammar::Regex(r) => lark_regex(r),
            Grammar::Lark(_) => {
                return Err(
                    "a Lark grammar cannot be combined with a start marker: write the free part into the grammar (a rule with stop=...)"
                        .into(),
                )
            }
            g => format!("%json {}", schema(g).unwrap()),
        };
        let stop = serde_json::to_string(after).map_err(|e| e.to_string())?;
        Ok(TopLevelGrammar::from_lark(format!(
            "start: free WS? answer\nfree[stop={stop}]: /(?s:.*)/\nWS: /[ \\t\\r\\n]+/\nanswer: {answer}\n"
        )))
    }
}

/// The bytes of every token, for the token trie.
struct TokenBytes {
    trie: TokTrie,
    tokenizer: lmkit_tokenize::Tokenizer,
}

impl TokenizerEnv for TokenBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// GPT-2's byte-to-character table, inverted.
fn byte_level_chars() -> HashMap<char, u8> {
    let mut map = HashMap::new();
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = b as char;
        if matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}') {
            map.insert(c, b);
        } else {
            map.insert(char::from_u32(next).unwrap(), b);
            next += 1;
        }
    }
    map
}

/// How the tokenizer's pieces become bytes.
enum Pieces {
    /// GPT-2 style: each character stands for a byte.
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece style: `<0xNN>` byte tokens, this character for a space.
    ByteFallback(char),
}

fn pieces(tk: &lmkit_tokenize::Tokenizer) -> Result<Pieces, String> {
    use tokenizers::DecoderWrapper as D;
    fn walk(d: &D, level: &mut bool, fallback: &mut bool, space: &mut char) {
        match d {
            D::ByteLevel(_) => *level = true,
            D::ByteFallback(_) => *fallback = true,
            D::Metaspace(m) => *space = m.get_replacement(),
            D::Replace(r) => {
                if let Ok(v) = serde_json::to_value(r) {
                    if v["content"] == " " {
                        if let Some(s) = v["pattern"]["String"].as_str() {
                            if let (Some(c), None) = (s.chars().next(), s.chars().nth(1)) {
                                *space = c;
                            }
                        }
                    }
                }
            }
            D::Sequence(s) => {
                for d in s.get_decoders() {
                    walk(d, level, fallback, space);
                }
            }
            _ => {}
        }
    }
    let (mut level, mut fallback, mut space) = (false, false, '\u{2581}');
    if let Some(d) = tk.get_decoder() {
        walk(d, &mut level, &mut fallback, &mut space);
    }
    if level {
        Ok(Pieces::ByteLevel(byte_level_chars()))
    } else if fallback {
        Ok(Pieces::ByteFallback(space))
    } else {
        Err("constrained decoding needs a byte-level (GPT-2 style) or byte-fallback (SentencePiece style) tokenizer".into())
    }
}

/// The grammar engine for one model: its token trie and parser factory, built once and shared
/// by every constrained request.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// `n_vocab` is the model's vocabulary (it may be larger than the tokenizer's); `eos` the
    /// ids that end generation (allowed only where the grammar is complete).
    pub fn new(
        tokenizer: &lmkit_tokenize::Tokenizer,
        n_vocab: usize,
        eos: &[u32],
    ) -> Result<Grammars, String> {
        let how = pieces(tokenizer)?;
        let n = n_vocab.max(tokenizer.get_vocab_size(true));
        let mut words: Vec<Vec<u8>> = vec![Vec::new(); n];
        let added = tokenizer.get_added_tokens_decoder();
        for (id, word) in words.iter_mut().enumerate() {
            let id = id as u32;
            if let Some(a) = added.get(&id) {
                if a.special {
                    *word = [&[TokTrie::SPECIAL_TOKEN_MARKER][..], a.content.as_bytes()].concat();
                } else {
                    *word = a.content.as_bytes().to_vec();
                }
                continue;
            }
            let Some(piece) = tokenizer.id_to_token(id) else {
                // Past the tokenizer: a padded row of the model that never decodes to text.
                *word = [
                    &[TokTrie::SPECIAL_TOKEN_MARKER][..],
                    format!("<[{id}]>").as_bytes(),
                ]
                .concat();
                continue;
            };
            *word = match &how {
                Pieces::ByteLevel(map) => {
                    match piece.chars().map(|c| map.get(&c).copied()).collect() {
                        Some(b) => b,
                        None => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], piece.as_bytes()].concat(),
                    }
                }
                Pieces::ByteFallback(space) => {
                    let b = piece.as_bytes();
                    if b.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
                        match u8::from_str_radix(&piece[3..5], 16) {
                            Ok(x) => vec![x],
                            Err(_) => piece.replace(*space, " ").into_bytes(),
                        }
                    } else {
                        piece.replace(*space, " ").into_bytes()
                    }
                }
            };
        }
        let eos: Vec<u32> = eos.iter().copied().filter(|&e| (e as usize) < n).collect();
        let first = eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(n as u32, first);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: TokEnv = Arc::new(TokenBytes {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Compiles a constraint for one sequence. Schemas using features the engine does not
    /// implement are refused with the features named.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, String> {
        if let Grammar::JsonSchema(s) = &spec.grammar {
            let refs = count_refs(s);
            if refs > MOST_REFS {
                return Err(format!(
                    "the schema has {refs} `$ref`s; at most {MOST_REFS} are read"
                ));
            }
        }
        let grammar = spec.top_level()?;
        // llguidance turns a schema into a grammar by recursion, a level for each `$ref` it
        // follows: a chain of 2,000 of them overflowed a 2 MiB stack (a server's worker thread),
        // which aborts the process. The compilation runs on a thread with room to spare.
        let compile = || -> Result<Matcher, String> {
            let parser = self
                .factory
                .create_parser(grammar)
                .map_err(|e| e.to_string())?;
            let mut matcher = Matcher::new(Ok(parser));
            if let Some(e) = matcher.get_error() {
                return Err(e);
            }
            // The first mask: a grammar too large for the parser's limits (an alternative of
            // 20,000 strings, `a{1000}{1000}`) fails here, as the request's error, rather
            // than at its first token.
            matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
            Ok(matcher)
        };
        let matcher = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("grammar".into())
                .stack_size(COMPILE_STACK)
                .spawn_scoped(s, compile)
                .map_err(|e| format!("cannot start the grammar compiler's thread: {e}"))?
                .join()
                .map_err(|_| "the grammar compiler failed".to_string())
        })??;
        Ok(Constraint { matcher })
    }
}

/// The stack of the thread that compiles a grammar (address space; pages are used as touched).
const COMPILE_STACK: usize = 256 << 20;

/// The most `$ref`s a schema may hold: real schemas hold tens; each one followed is a level of
/// the compiler's recursion (a chain of 4,096 takes a few MiB of [`COMPILE_STACK`]).
const MOST_REFS: usize = 4096;

/// `$ref` keys anywhere in `schema` (counted without recursion: its nesting is the client's).
fn count_refs(schema: &Value) -> usize {
    let mut n = 0;
    let mut todo = vec![schema];
    while let Some(v) = todo.pop() {
        match v {
            Value::Object(o) => {
                n += usize::from(o.contains_key("$ref"));
                todo.extend(o.values());
            }
            Value::Array(a) => todo.extend(a),
            _ => {}
        }
    }
    n
}

/// One sequence's constraint state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets every logit the grammar forbids here to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let n = allowed.len();
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= n || !allowed.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Records the sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output so far is a complete match.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}
