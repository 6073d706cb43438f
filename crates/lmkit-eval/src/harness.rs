//! Tasks in lm-evaluation-harness's YAML format, a documented subset: local JSON/JSONL data
//! (`dataset_path: json` with `dataset_kwargs.data_files`), `doc_to_text` / `doc_to_target` /
//! `doc_to_choice` as a column name, a Jinja template or a list, `description`, `num_fewshot`
//! with `fewshot_config` (`sampler: default|first_n`, `split`, `samples`, per-field overrides,
//! delimiters), `output_type: generate_until|multiple_choice`, `generation_kwargs`, `filter_list`
//! (regex, take_first, remove_whitespace, lowercase, uppercase) and `metric_list`, `include`.
//! Prompts are rendered as the harness renders them (the same few-shot draw for the same seed).
//! Anything that would change the result and is not supported (`!function`, `process_docs`,
//! `gen_prefix`, unknown keys...) is refused with the field named.

use crate::metrics::{self, ExactMatch};
use crate::pyrandom::PyRandom;
use crate::{EvalError, Result};
use regex::Regex;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The harness's default few-shot seed.
pub const DEFAULT_FEWSHOT_SEED: u64 = 1234;
const DEFAULT_MAX_GEN_TOKS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputType {
    GenerateUntil,
    MultipleChoice,
}

/// How text is generated for a `generate_until` task.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub until: Vec<String>,
    pub max_gen_toks: usize,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
}

/// A `doc_to_*` field: a column name or a Jinja template (decided per task by the columns, as
/// the harness does), a fixed list, or a fixed index.
#[derive(Clone, Debug)]
enum Field {
    Text(String),
    List(Vec<Value>),
    Int(i64),
}

#[derive(Clone, Debug)]
enum Step {
    Regex {
        re: Regex,
        group_select: i64,
        fallback: String,
    },
    TakeFirst,
    Strip,
    Lower,
    Upper,
}

#[derive(Clone, Debug)]
pub struct Filter {
    pub name: String,
    steps: Vec<Step>,
}

#[derive(Clone, Debug)]
pub enum Metric {
    ExactMatch(ExactMatch),
    SquadF1,
    Rouge1,
    Rouge2,
    RougeL,
    Bleu,
    Chrf,
    ChrfPlusPlus,
    Acc,
    AccNorm,
}

impl Metric {
    pub fn name(&self) -> &'static str {
        match self {
            Metric::ExactMatch(_) => "exact_match",
            Metric::SquadF1 => "squad_f1",
            Metric::Rouge1 => "rouge1",
            Metric::Rouge2 => "rouge2",
            Metric::RougeL => "rougeL",
            Metric::Bleu => "bleu",
            Metric::Chrf => "chrf",
            Metric::ChrfPlusPlus => "chrf++",
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
        }
    }

    /// Corpus-level metrics have no per-example value.
    fn corpus(&self) -> bool {
        matches!(self, Metric::Bleu | Metric::Chrf | Metric::ChrfPlusPlus)
    }
}

const METRICS: &str = "exact_match, squad_f1, rouge1, rouge2, rougeL, bleu, chrf, chrf++ (generate_until); acc, acc_norm (multiple_choice)";

/// Few-shot settings after the harness's inheritance from the task's own fields.
#[derive(Clone, Debug)]
struct Fewshot {
    first_n: bool,
    split: Option<String>,
    samples: Option<Vec<Value>>,
    doc_to_text: Field,
    doc_to_target: Field,
    doc_to_choice: Option<Field>,
    target_delimiter: String,
    fewshot_delimiter: String,
}

/// A loaded task.
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub output_type: OutputType,
    pub num_fewshot: usize,
    pub generation: Generation,
    pub filters: Vec<Filter>,
    pub metrics: Vec<Metric>,
    description: Option<Field>,
    doc_to_text: Field,
    doc_to_target: Field,
    doc_to_choice: Option<Field>,
    target_delimiter: String,
    fewshot: Fewshot,
    test_split: Option<String>,
    training_split: Option<String>,
    validation_split: Option<String>,
    splits: Map<String, Value>,
    eval_split: String,
    features: BTreeSet<String>,
    env: minijinja::Environment<'static>,
}

/// One rendered example.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rendered {
    pub doc_index: usize,
    /// The plain-text prompt (description, few-shot examples, the question).
    pub prompt: String,
    /// The description alone and the rest, for rendering through a chat template.
    #[serde(skip)]
    pub system: String,
    #[serde(skip)]
    pub user: String,
    /// Reference answers (one or more); for multiple choice, the gold choice's text.
    pub targets: Vec<String>,
    /// Multiple choice: the choices and the gold index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gold: Option<usize>,
}

fn err(path: &Path, msg: impl Into<String>) -> EvalError {
    EvalError::Input {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn yaml_to_json(path: &Path, key: &str, v: serde_yaml_ng::Value) -> Result<Value> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(&n).map_err(|e| err(path, e.to_string()))?,
        Y::String(s) => Value::String(s),
        Y::Sequence(s) => Value::Array(
            s.into_iter()
                .map(|x| yaml_to_json(path, key, x))
                .collect::<Result<_>>()?,
        ),
        Y::Mapping(m) => {
            let mut o = Map::new();
            for (k, v) in m {
                let k = match k {
                    Y::String(s) => s,
                    other => serde_yaml_ng::to_string(&other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let sub = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                let v = yaml_to_json(path, &sub, v)?;
                o.insert(k, v);
            }
            Value::Object(o)
        }
        Y::Tagged(t) => {
            return Err(err(
                path,
                format!(
                    "`{key}` uses `{}` (a Python function): not supported; write it as a column name or a Jinja template",
                    t.tag
                ),
            ))
        }
    })
}

/// Reads a YAML file and the files it `include`s (relative to it), the including file winning.
fn read_config(path: &Path, depth: usize) -> Result<Map<String, Value>> {
    if depth > 8 {
        return Err(err(path, "`include` nests more than 8 files deep"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| err(path, format!("not valid YAML: {e}")))?;
    let Value::Object(mut cfg) = yaml_to_json(path, "", y)? else {
        return Err(err(path, "expected a mapping of task settings"));
    };
    if let Some(inc) = cfg.remove("include") {
        let Value::String(inc) = inc else {
            return Err(err(path, "`include` must be a file name"));
        };
        let base = path.parent().unwrap_or(Path::new(".")).join(inc);
        let mut merged = read_config(&base, depth + 1)?;
        merged.extend(cfg);
        cfg = merged;
    }
    Ok(cfg)
}

fn field(path: &Path, key: &str, v: &Value) -> Result<Field> {
    Ok(match v {
        Value::String(s) => Field::Text(s.clone()),
        Value::Array(a) => Field::List(a.clone()),
        Value::Number(n) if n.is_i64() => Field::Int(n.as_i64().unwrap()),
        Value::Object(o) => Field::List(o.values().cloned().collect()),
        _ => {
            return Err(err(
                path,
                format!("`{key}` must be a column name, a Jinja template or a list"),
            ))
        }
    })
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// Reads a JSON Lines file, or a JSON file holding a list of objects (or `{"data": [...]}`).
fn read_docs(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') || (trimmed.starts_with('{') && !text.trim().contains('\n')) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            let list = match v {
                Value::Array(a) => a,
                Value::Object(mut o) => match o.remove("data") {
                    Some(Value::Array(a)) => a,
                    _ => vec![Value::Object(o)],
                },
                _ => return Err(err(path, "expected objects")),
            };
            return Ok(list);
        }
    }
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l)
            .map_err(|e| err(path, format!("line {}: not valid JSON: {e}", i + 1)))?;
        if !v.is_object() {
            return Err(err(path, format!("line {}: expected a JSON object", i + 1)));
        }
        out.push(v);
    }
    Ok(out)
}

const KNOWN: &[&str] = &[
    "task",
    "task_alias",
    "tag",
    "group",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "description",
    "target_delimiter",
    "fewshot_delimiter",
    "fewshot_config",
    "num_fewshot",
    "metric_list",
    "output_type",
    "generation_kwargs",
    "repeats",
    "filter_list",
    "should_decontaminate",
    "doc_to_decontamination_query",
    "metadata",
    "unsafe_code",
];

static PY_GROUP_REF: std::sync::LazyLock<Regex> =
    std::sync::LazyLock::new(|| Regex::new(r"\\(\d+)").unwrap());

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    // A template that loops without end fails instead of hanging.
    env.set_fuel(Some(5_000_000));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter(
        "regex_replace",
        |s: String,
         pattern: String,
         repl: String|
         -> std::result::Result<String, minijinja::Error> {
            let re = Regex::new(&pattern).map_err(|e| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
            })?;
            // Python's \1 group references become $1.
            let repl = PY_GROUP_REF.replace_all(&repl, "$${$1}").into_owned();
            Ok(re.replace_all(&s, repl.as_str()).into_owned())
        },
    );
    env
}

impl Task {
    /// Loads a task file and its data.
    pub fn load(path: &Path) -> Result<Task> {
        let cfg = read_config(path, 0)?;
        for k in cfg.keys() {
            if !KNOWN.contains(&k.as_str()) {
                let why = match k.as_str() {
                    "process_docs" | "process_results" | "custom_dataset" => {
                        "Python functions are not supported"
                    }
                    "gen_prefix" => "not supported",
                    "use_prompt" => "promptsource prompts are not supported",
                    "doc_to_image" | "doc_to_audio" => "only text tasks are supported",
                    _ => "unknown setting",
                };
                return Err(err(path, format!("`{k}`: {why}")));
            }
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let name = cfg
            .get("task")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let output_type = match cfg
            .get("output_type")
            .and_then(Value::as_str)
            .unwrap_or("generate_until")
        {
            "generate_until" => OutputType::GenerateUntil,
            "multiple_choice" => OutputType::MultipleChoice,
            other => {
                return Err(err(
                    path,
                    format!(
                    "`output_type: {other}` is not supported (generate_until or multiple_choice)"
                ),
                ))
            }
        };
        if cfg.get("repeats").and_then(Value::as_u64).unwrap_or(1) != 1 {
            return Err(err(path, "`repeats` other than 1 is not supported"));
        }
        match cfg.get("dataset_path").and_then(Value::as_str) {
            Some("json") => {}
            other => {
                return Err(err(
                    path,
                    format!(
                        "`dataset_path: {}`: only local files are read (`dataset_path: json` with `dataset_kwargs: {{data_files: {{test: FILE.jsonl}}}}`)",
                        other.unwrap_or("(missing)")
                    ),
                ))
            }
        }
        if cfg.get("dataset_name").is_some_and(|v| !v.is_null()) {
            return Err(err(
                path,
                "`dataset_name` is not used by local JSON data: remove it",
            ));
        }
        let files = cfg
            .get("dataset_kwargs")
            .and_then(|k| k.get("data_files"))
            .ok_or_else(|| err(path, "`dataset_kwargs.data_files` is missing"))?;
        let files: Vec<(String, Vec<String>)> = match files {
            Value::Object(o) => o
                .iter()
                .map(|(s, f)| {
                    string_list(f).map(|f| (s.clone(), f)).ok_or_else(|| {
                        err(
                            path,
                            format!("`data_files.{s}` must be a file or a list of files"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            other => vec![(
                "train".to_string(),
                string_list(other).ok_or_else(|| err(path, "`data_files` must name files"))?,
            )],
        };
        let mut splits = Map::new();
        let mut features = BTreeSet::new();
        for (split, list) in files {
            let mut docs = Vec::new();
            for f in list {
                let p = dir.join(&f);
                docs.extend(read_docs(&p)?);
            }
            for d in &docs {
                if let Value::Object(o) = d {
                    features.extend(o.keys().cloned());
                }
            }
            splits.insert(split, Value::Array(docs));
        }
        let opt_str = |k: &str| cfg.get(k).and_then(Value::as_str).map(str::to_string);
        let test_split = opt_str("test_split");
        let eval_split = test_split
            .clone()
            .or_else(|| opt_str("validation_split"))
            .ok_or_else(|| {
                err(
                    path,
                    "set `test_split` (or `validation_split`): the split to evaluate",
                )
            })?;
        if !splits.contains_key(&eval_split) {
            return Err(err(
                path,
                format!("split `{eval_split}` is not in `dataset_kwargs.data_files`"),
            ));
        }
        let get_field = |k: &str| {
            cfg.get(k)
                .filter(|v| !v.is_null())
                .map(|v| field(path, k, v))
                .transpose()
        };
        let doc_to_text =
            get_field("doc_to_text")?.ok_or_else(|| err(path, "`doc_to_text` is missing"))?;
        let doc_to_target =
            get_field("doc_to_target")?.ok_or_else(|| err(path, "`doc_to_target` is missing"))?;
        let doc_to_choice = get_field("doc_to_choice")?;
        if output_type == OutputType::MultipleChoice && doc_to_choice.is_none() {
            return Err(err(path, "a multiple_choice task needs `doc_to_choice`"));
        }
        let description = get_field("description")?;
        let target_delimiter = opt_str("target_delimiter").unwrap_or_else(|| " ".into());
        let fewshot_delimiter = opt_str("fewshot_delimiter").unwrap_or_else(|| "\n\n".into());
        let fc = cfg
            .get("fewshot_config")
            .cloned()
            .unwrap_or(Value::Object(Map::new()));
        let Value::Object(fc) = fc else {
            return Err(err(path, "`fewshot_config` must be a mapping"));
        };
        for k in fc.keys() {
            if ![
                "sampler",
                "split",
                "samples",
                "doc_to_text",
                "doc_to_target",
                "doc_to_choice",
                "target_delimiter",
                "fewshot_delimiter",
            ]
            .contains(&k.as_str())
            {
                return Err(err(path, format!("`fewshot_config.{k}` is not supported")));
            }
        }
        let fs_field = |k: &str| -> Result<Option<Field>> {
            fc.get(k)
                .filter(|v| !v.is_null())
                .map(|v| field(path, &format!("fewshot_config.{k}"), v))
                .transpose()
        };
        let first_n = match fc
            .get("sampler")
            .and_then(Value::as_str)
            .unwrap_or("default")
        {
            "default" => false,
            "first_n" => true,
            other => {
                return Err(err(
                    path,
                    format!(
                        "`fewshot_config.sampler: {other}` is not supported (default or first_n)"
                    ),
                ))
            }
        };
        let samples = match fc.get("samples") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(a.clone()),
            Some(_) => {
                return Err(err(
                    path,
                    "`fewshot_config.samples` must be a list of examples",
                ))
            }
        };
        let fewshot = Fewshot {
            first_n,
            split: fc
                .get("split")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| opt_str("fewshot_split")),
            samples,
            doc_to_text: fs_field("doc_to_text")?.unwrap_or(doc_to_text.clone()),
            doc_to_target: fs_field("doc_to_target")?.unwrap_or(doc_to_target.clone()),
            doc_to_choice: fs_field("doc_to_choice")?.or(doc_to_choice.clone()),
            target_delimiter: fc
                .get("target_delimiter")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(target_delimiter.clone()),
            fewshot_delimiter: fc
                .get("fewshot_delimiter")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(fewshot_delimiter.clone()),
        };
        let generation = generation(path, cfg.get("generation_kwargs"), &fewshot_delimiter)?;
        let filters = filters(path, cfg.get("filter_list"))?;
        let metrics = metric_list(path, cfg.get("metric_list"), output_type)?;
        let task = Task {
            name,
            path: path.to_path_buf(),
            output_type,
            num_fewshot: cfg.get("num_fewshot").and_then(Value::as_u64).unwrap_or(0) as usize,
            generation,
            filters,
            metrics,
            description,
            doc_to_text,
            doc_to_target,
            doc_to_choice,
            target_delimiter,
            fewshot,
            test_split,
            training_split: opt_str("training_split"),
            validation_split: opt_str("validation_split"),
            splits,
            eval_split,
            features,
            env: environment(),
        };
        task.check_fewshot_source()?;
        Ok(task)
    }

    fn check_fewshot_source(&self) -> Result<()> {
        if let Some(s) = &self.fewshot.split {
            if !self.splits.contains_key(s) {
                return Err(err(
                    &self.path,
                    format!("the few-shot split `{s}` is not in `dataset_kwargs.data_files`"),
                ));
            }
        }
        Ok(())
    }

    /// The documents evaluated.
    pub fn docs(&self) -> &[Value] {
        self.splits[&self.eval_split]
            .as_array()
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// Where few-shot examples come from, as the harness decides: the few-shot split, inline
    /// samples, else the training, validation or test split.
    fn fewshot_pool(&self) -> &[Value] {
        let split = |s: &str| self.splits.get(s).and_then(Value::as_array);
        if let Some(s) = &self.fewshot.split {
            return split(s).map_or(&[], |v| v.as_slice());
        }
        if let Some(s) = &self.fewshot.samples {
            return s;
        }
        for s in [&self.training_split, &self.validation_split]
            .into_iter()
            .flatten()
        {
            if let Some(v) = split(s) {
                return v;
            }
        }
        self.docs()
    }

    fn render_template(&self, template: &str, doc: &Value) -> Result<String> {
        self.env
            .render_str(template, minijinja::Value::from_serialize(doc))
            .map_err(|e| err(&self.path, format!("template {template:?}: {e}")))
    }

    /// A template that is one `{{ expression }}` evaluates to a value (a list stays a list);
    /// other templates render to text.
    fn evaluate(&self, template: &str, doc: &Value) -> Result<Value> {
        let t = template.trim();
        if let Some(inner) = t.strip_prefix("{{").and_then(|s| s.strip_suffix("}}")) {
            if !inner.contains("{{") && !inner.contains("}}") {
                let expr = self
                    .env
                    .compile_expression(inner.trim())
                    .map_err(|e| err(&self.path, format!("template {template:?}: {e}")))?;
                let v = expr
                    .eval(minijinja::Value::from_serialize(doc))
                    .map_err(|e| err(&self.path, format!("template {template:?}: {e}")))?;
                if v.kind() == minijinja::value::ValueKind::Seq {
                    return serde_json::to_value(&v).map_err(|e| err(&self.path, e.to_string()));
                }
            }
        }
        Ok(Value::String(self.render_template(template, doc)?))
    }

    fn resolve_text(&self, f: &Field, doc: &Value, has_choices: bool) -> Result<Value> {
        Ok(match f {
            Field::Int(i) => Value::from(*i),
            Field::List(l) => Value::Array(l.clone()),
            Field::Text(s) if self.features.contains(s) => {
                doc.get(s).cloned().unwrap_or(Value::Null)
            }
            Field::Text(s) => {
                let v = self.evaluate(s, doc)?;
                match v {
                    Value::String(t)
                        if has_choices
                            && !t.is_empty()
                            && t.chars().all(|c| c.is_ascii_digit()) =>
                    {
                        Value::from(t.parse::<u64>().unwrap_or(0))
                    }
                    Value::String(t) if t.len() >= 2 && t.starts_with('[') && t.ends_with(']') => {
                        python_list(&t).unwrap_or(Value::String(t))
                    }
                    v => v,
                }
            }
        })
    }

    fn text(&self, f: &Field, doc: &Value) -> Result<String> {
        match f {
            Field::Text(s) if self.features.contains(s) => {
                Ok(as_text(doc.get(s).unwrap_or(&Value::Null)))
            }
            Field::Text(s) => self.render_template(s, doc),
            _ => Err(err(
                &self.path,
                "`doc_to_text` must give text (multiple-input tasks are not supported)",
            )),
        }
    }

    fn choices(&self, f: &Option<Field>, doc: &Value) -> Result<Option<Vec<String>>> {
        let Some(f) = f else { return Ok(None) };
        let v = match f {
            Field::Text(s) if self.features.contains(s) => {
                doc.get(s).cloned().unwrap_or(Value::Null)
            }
            Field::Text(s) => match self.evaluate(s, doc)? {
                Value::String(t) => python_list(&t).ok_or_else(|| {
                    err(
                        &self.path,
                        format!("`doc_to_choice` rendered {t:?}, not a list"),
                    )
                })?,
                v => v,
            },
            Field::List(l) => Value::Array(l.clone()),
            Field::Int(_) => Value::Null,
        };
        match v {
            Value::Array(a) => Ok(Some(a.iter().map(as_text).collect())),
            _ => Err(err(&self.path, "`doc_to_choice` must give a list")),
        }
    }

    /// The answer text of a few-shot example; None when it has no answer.
    fn answer(&self, a: &Value, choices: &Option<Vec<String>>) -> Result<Option<String>> {
        Ok(match a {
            Value::Null => None,
            Value::String(s) if s.is_empty() => None,
            Value::Number(n) if choices.is_some() => {
                let c = choices.as_ref().unwrap();
                let i = n.as_u64().unwrap_or(u64::MAX) as usize;
                Some(c.get(i).cloned().ok_or_else(|| {
                    err(
                        &self.path,
                        format!("target index {i} is outside the {} choices", c.len()),
                    )
                })?)
            }
            Value::Array(l) => l.first().map(as_text),
            v => Some(as_text(v)),
        })
    }

    /// Renders the prompts of the first `limit` documents, drawing few-shot examples as the
    /// harness does for `num_fewshot` and `seed`.
    pub fn render(
        &self,
        num_fewshot: usize,
        seed: u64,
        limit: Option<usize>,
    ) -> Result<Vec<Rendered>> {
        let docs = self.docs();
        let n = limit.unwrap_or(docs.len()).min(docs.len());
        let pool = if num_fewshot > 0 {
            self.fewshot_pool()
        } else {
            &[]
        };
        let exclude = self.fewshot.split == self.test_split;
        let mut rnd = PyRandom::new(seed);
        let mut out = Vec::with_capacity(n);
        for (i, doc) in docs.iter().take(n).enumerate() {
            let system = match &self.description {
                None => String::new(),
                Some(Field::Text(s)) if self.features.contains(s) => as_text(&doc[s.as_str()]),
                Some(Field::Text(s)) => self.render_template(s, doc)?,
                Some(_) => return Err(err(&self.path, "`description` must be text")),
            };
            let mut user = String::new();
            if num_fewshot > 0 {
                let shots = self.sample(pool, num_fewshot, exclude.then_some(doc), &mut rnd)?;
                for fs in shots {
                    let q = self.text(&self.fewshot.doc_to_text, fs)?;
                    let c = self.choices(&self.fewshot.doc_to_choice, fs)?;
                    let a = self.resolve_text(&self.fewshot.doc_to_target, fs, c.is_some())?;
                    user.push_str(&q);
                    if let Some(a) = self.answer(&a, &c)? {
                        user.push_str(&self.fewshot.target_delimiter);
                        user.push_str(&a);
                        user.push_str(&self.fewshot.fewshot_delimiter);
                    }
                }
            }
            user.push_str(&self.text(&self.doc_to_text, doc)?);
            let choices = self.choices(&self.doc_to_choice, doc)?;
            let target = self.resolve_text(&self.doc_to_target, doc, choices.is_some())?;
            let (targets, gold) = match (&choices, &target) {
                (Some(c), Value::Number(n)) => {
                    let g = n.as_u64().unwrap_or(u64::MAX) as usize;
                    let t = c.get(g).cloned().ok_or_else(|| {
                        err(
                            &self.path,
                            format!(
                                "document {i}: target index {g} is outside the {} choices",
                                c.len()
                            ),
                        )
                    })?;
                    (vec![t], Some(g))
                }
                (Some(c), Value::String(s)) if self.output_type == OutputType::MultipleChoice => {
                    let g = c.iter().position(|x| x == s).ok_or_else(|| {
                        err(
                            &self.path,
                            format!("document {i}: target {s:?} is not one of the choices"),
                        )
                    })?;
                    (vec![s.clone()], Some(g))
                }
                (_, Value::Array(l)) => (l.iter().map(as_text).collect(), None),
                (_, v) => (vec![as_text(v)], None),
            };
            if self.output_type == OutputType::MultipleChoice && gold.is_none() {
                return Err(err(
                    &self.path,
                    format!("document {i}: the target must be a choice or its index"),
                ));
            }
            out.push(Rendered {
                doc_index: i,
                prompt: format!("{system}{user}"),
                system,
                user,
                targets,
                choices: if self.output_type == OutputType::MultipleChoice {
                    choices
                } else {
                    None
                },
                gold,
            });
        }
        Ok(out)
    }

    /// The (context, continuation) pairs a multiple-choice example is scored on.
    pub fn choice_requests(&self, r: &Rendered, context: &str) -> Vec<(String, String)> {
        r.choices
            .iter()
            .flatten()
            .map(|c| (context.to_string(), format!("{}{c}", self.target_delimiter)))
            .collect()
    }

    fn sample<'a>(
        &self,
        pool: &'a [Value],
        n: usize,
        eval_doc: Option<&Value>,
        rnd: &mut PyRandom,
    ) -> Result<Vec<&'a Value>> {
        if pool.is_empty() {
            return Err(err(
                &self.path,
                "few-shot examples were asked for but there are none to draw from",
            ));
        }
        if self.fewshot.first_n {
            let cands: Vec<&Value> = pool.iter().filter(|d| Some(*d) != eval_doc).collect();
            if n > cands.len() {
                return Err(err(
                    &self.path,
                    format!("{n} few-shot examples asked for, {} available", cands.len()),
                ));
            }
            return Ok(cands[..n].to_vec());
        }
        let mut res: Vec<&Value> = match eval_doc {
            None => rnd
                .sample(pool.len(), n)
                .into_iter()
                .map(|i| &pool[i])
                .collect(),
            Some(d) => rnd
                .sample(pool.len(), n + 1)
                .into_iter()
                .map(|i| &pool[i])
                .filter(|x| *x != d)
                .take(n)
                .collect(),
        };
        if res.len() < n {
            let rest: Vec<&Value> = pool.iter().filter(|x| Some(*x) != eval_doc).collect();
            if rest.len() < n {
                return Err(err(
                    &self.path,
                    format!("{n} few-shot examples asked for, {} available", rest.len()),
                ));
            }
            res = rnd
                .sample(rest.len(), n)
                .into_iter()
                .map(|i| rest[i])
                .collect();
        }
        Ok(res)
    }
}

/// Python's `str()` of a JSON value (what the harness sees after loading the data).
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// A Python list literal of strings and numbers (`ast.literal_eval` for what templates render).
fn python_list(s: &str) -> Option<Value> {
    if let Ok(v @ Value::Array(_)) = serde_json::from_str::<Value>(s) {
        return Some(v);
    }
    let mut out = Vec::new();
    let mut it = s
        .trim()
        .strip_prefix('[')?
        .strip_suffix(']')?
        .chars()
        .peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        match it.peek().copied() {
            None => break,
            Some(q @ ('\'' | '"')) => {
                it.next();
                let mut t = String::new();
                loop {
                    match it.next()? {
                        '\\' => match it.next()? {
                            'n' => t.push('\n'),
                            't' => t.push('\t'),
                            c => t.push(c),
                        },
                        c if c == q => break,
                        c => t.push(c),
                    }
                }
                out.push(Value::String(t));
            }
            Some(_) => {
                let mut t = String::new();
                while it.peek().is_some_and(|&c| c != ',') {
                    t.push(it.next().unwrap());
                }
                out.push(serde_json::from_str(t.trim()).ok()?);
            }
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        match it.next() {
            None => break,
            Some(',') => {}
            Some(_) => return None,
        }
    }
    Some(Value::Array(out))
}

fn generation(path: &Path, v: Option<&Value>, fewshot_delimiter: &str) -> Result<Generation> {
    let mut g = Generation {
        until: vec![fewshot_delimiter.to_string()],
        max_gen_toks: DEFAULT_MAX_GEN_TOKS,
        do_sample: false,
        temperature: 0.0,
        top_p: None,
        top_k: None,
    };
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(g);
    };
    let Value::Object(o) = v else {
        return Err(err(path, "`generation_kwargs` must be a mapping"));
    };
    let num = |k: &str, x: &Value| {
        x.as_f64()
            .ok_or_else(|| err(path, format!("`generation_kwargs.{k}` must be a number")))
    };
    for (k, x) in o {
        match k.as_str() {
            "until" => {
                g.until = string_list(x)
                    .ok_or_else(|| err(path, "`generation_kwargs.until` must be a string or a list of strings"))?
            }
            "max_gen_toks" | "max_new_tokens" => g.max_gen_toks = num(k, x)? as usize,
            "do_sample" => {
                g.do_sample = x
                    .as_bool()
                    .ok_or_else(|| err(path, "`generation_kwargs.do_sample` must be true or false"))?
            }
            "temperature" => g.temperature = num(k, x)?,
            "top_p" => g.top_p = Some(num(k, x)?),
            "top_k" => g.top_k = Some(num(k, x)? as usize),
            other => {
                return Err(err(
                    path,
                    format!("`generation_kwargs.{other}` is not supported (until, max_gen_toks, do_sample, temperature, top_p, top_k)"),
                ))
            }
        }
    }
    Ok(g)
}

fn filters(path: &Path, v: Option<&Value>) -> Result<Vec<Filter>> {
    let Some(Value::Array(list)) = v.filter(|v| !v.is_null()) else {
        if v.is_some_and(|v| !v.is_null()) {
            return Err(err(path, "`filter_list` must be a list of {name, filter}"));
        }
        return Ok(vec![Filter {
            name: "none".into(),
            steps: vec![Step::TakeFirst],
        }]);
    };
    let mut out = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| err(path, format!("`filter_list[{i}].name` is missing")))?
            .to_string();
        let steps = f.get("filter").and_then(Value::as_array).ok_or_else(|| {
            err(
                path,
                format!("`filter_list[{i}].filter` must be a list of {{function: ...}}"),
            )
        })?;
        let mut parsed = Vec::new();
        for s in steps {
            let func = s.get("function").and_then(Value::as_str).unwrap_or("");
            parsed.push(match func {
                "regex" => {
                    let pat = s
                        .get("regex_pattern")
                        .and_then(Value::as_str)
                        .unwrap_or(r"#### (\-?[0-9\.\,]+)");
                    let re = Regex::new(pat).map_err(|e| {
                        err(path, format!("filter `{name}`: regex_pattern {pat:?}: {e}"))
                    })?;
                    Step::Regex {
                        re,
                        group_select: s.get("group_select").and_then(Value::as_i64).unwrap_or(0),
                        fallback: s
                            .get("fallback")
                            .and_then(Value::as_str)
                            .unwrap_or("[invalid]")
                            .to_string(),
                    }
                }
                "take_first" => Step::TakeFirst,
                "remove_whitespace" => Step::Strip,
                "lowercase" => Step::Lower,
                "uppercase" => Step::Upper,
                other => {
                    return Err(err(
                        path,
                        format!("filter `{name}`: function `{other}` is not supported (regex, take_first, remove_whitespace, lowercase, uppercase)"),
                    ))
                }
            });
        }
        out.push(Filter {
            name,
            steps: parsed,
        });
    }
    Ok(out)
}

fn metric_list(path: &Path, v: Option<&Value>, t: OutputType) -> Result<Vec<Metric>> {
    let Some(list) = v.filter(|v| !v.is_null()) else {
        return Ok(match t {
            OutputType::GenerateUntil => vec![Metric::ExactMatch(ExactMatch::default())],
            OutputType::MultipleChoice => vec![Metric::Acc, Metric::AccNorm],
        });
    };
    let list = list
        .as_array()
        .ok_or_else(|| err(path, "`metric_list` must be a list of {metric: ...}"))?;
    let mut out = Vec::new();
    for m in list {
        let name = m
            .get("metric")
            .and_then(Value::as_str)
            .ok_or_else(|| err(path, "every `metric_list` entry needs `metric: NAME`"))?;
        for k in m.as_object().into_iter().flat_map(|o| o.keys()) {
            let ok = matches!(k.as_str(), "metric" | "aggregation" | "higher_is_better")
                || (name == "exact_match"
                    && matches!(
                        k.as_str(),
                        "ignore_case"
                            | "ignore_punctuation"
                            | "ignore_numbers"
                            | "regexes_to_ignore"
                    ));
            if !ok {
                return Err(err(
                    path,
                    format!("metric `{name}`: option `{k}` is not supported"),
                ));
            }
        }
        let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
        let metric = match name {
            "exact_match" => Metric::ExactMatch(ExactMatch {
                regexes_to_ignore: m
                    .get("regexes_to_ignore")
                    .and_then(string_list)
                    .unwrap_or_default()
                    .iter()
                    .map(|p| {
                        Regex::new(p).map_err(|e| err(path, format!("regexes_to_ignore {p:?}: {e}")))
                    })
                    .collect::<Result<_>>()?,
                ignore_case: flag("ignore_case"),
                ignore_punctuation: flag("ignore_punctuation"),
                ignore_numbers: flag("ignore_numbers"),
            }),
            "squad_f1" => Metric::SquadF1,
            "rouge1" => Metric::Rouge1,
            "rouge2" => Metric::Rouge2,
            "rougeL" => Metric::RougeL,
            "bleu" => Metric::Bleu,
            "chrf" => Metric::Chrf,
            "chrf++" => Metric::ChrfPlusPlus,
            "acc" => Metric::Acc,
            "acc_norm" => Metric::AccNorm,
            "f1" => {
                return Err(err(
                    path,
                    "metric `f1` is the harness's scikit-learn classification F1, which lmkit does not compute; `squad_f1` is the token-overlap F1 of SQuAD",
                ))
            }
            other => return Err(err(path, format!("metric `{other}` is not supported ({METRICS})"))),
        };
        let fits = match t {
            OutputType::GenerateUntil => !matches!(metric, Metric::Acc | Metric::AccNorm),
            OutputType::MultipleChoice => matches!(metric, Metric::Acc | Metric::AccNorm),
        };
        if !fits {
            return Err(err(
                path,
                format!("metric `{name}` does not apply to {t:?} tasks ({METRICS})"),
            ));
        }
        out.push(metric);
    }
    Ok(out)
}

impl Filter {
    /// The filtered answer of one response.
    pub fn apply(&self, response: &str) -> String {
        let mut s = response.to_string();
        for step in &self.steps {
            s = match step {
                Step::TakeFirst => s,
                Step::Strip => s.trim().to_string(),
                Step::Lower => s.to_lowercase(),
                Step::Upper => s.to_uppercase(),
                Step::Regex {
                    re,
                    group_select,
                    fallback,
                } => {
                    // Python's re.findall: the whole match, the one group, or the first
                    // non-empty group of several.
                    let found: Vec<Option<String>> = re
                        .captures_iter(&s)
                        .map(|c| match c.len() {
                            1 => Some(c[0].to_string()),
                            2 => Some(c.get(1).map_or("", |m| m.as_str()).to_string()),
                            _ => c
                                .iter()
                                .skip(1)
                                .flatten()
                                .map(|m| m.as_str())
                                .find(|m| !m.is_empty())
                                .map(str::to_string),
                        })
                        .collect();
                    let n = found.len() as i64;
                    let i = if *group_select < 0 {
                        n + group_select
                    } else {
                        *group_select
                    };
                    match (0..n)
                        .contains(&i)
                        .then(|| found[i as usize].clone())
                        .flatten()
                    {
                        Some(m) => m.trim().to_string(),
                        None => fallback.clone(),
                    }
                }
            };
        }
        s
    }
}

/// One metric's value under one filter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Score {
    pub task: String,
    pub filter: String,
    pub metric: String,
    pub value: f64,
    pub examples: usize,
    pub num_fewshot: usize,
}

/// Scores generated responses; returns the scores and each example's details.
pub fn score_generations(
    task: &Task,
    num_fewshot: usize,
    rendered: &[Rendered],
    responses: &[String],
) -> (Vec<Score>, Vec<Value>) {
    let mut details: Vec<Map<String, Value>> = rendered
        .iter()
        .zip(responses)
        .map(|(r, resp)| {
            let mut d = Map::new();
            d.insert("task".into(), task.name.clone().into());
            d.insert("doc_index".into(), r.doc_index.into());
            d.insert("prompt".into(), r.prompt.clone().into());
            d.insert("targets".into(), r.targets.clone().into());
            d.insert("response".into(), resp.clone().into());
            d
        })
        .collect();
    let mut scores = Vec::new();
    for f in &task.filters {
        let answers: Vec<String> = responses.iter().map(|r| f.apply(r)).collect();
        for (d, a) in details.iter_mut().zip(&answers) {
            d.insert(format!("filtered,{}", f.name), a.clone().into());
        }
        for m in &task.metrics {
            let value = if m.corpus() {
                let refs: Vec<Vec<String>> = rendered.iter().map(|r| r.targets.clone()).collect();
                match m {
                    Metric::Bleu => metrics::corpus_bleu(&answers, &refs),
                    Metric::Chrf => metrics::corpus_chrf(&answers, &refs, 0),
                    _ => metrics::corpus_chrf(&answers, &refs, 2),
                }
            } else {
                let mut sum = 0.0;
                for ((r, a), d) in rendered.iter().zip(&answers).zip(details.iter_mut()) {
                    let v = match m {
                        Metric::ExactMatch(em) => em.score(a, &r.targets),
                        Metric::SquadF1 => metrics::squad_f1(a, &r.targets),
                        Metric::Rouge1 => {
                            metrics::best(a, &r.targets, |p, t| metrics::rouge_n(p, t, 1))
                        }
                        Metric::Rouge2 => {
                            metrics::best(a, &r.targets, |p, t| metrics::rouge_n(p, t, 2))
                        }
                        Metric::RougeL => metrics::best(a, &r.targets, metrics::rouge_l),
                        _ => 0.0,
                    };
                    d.insert(format!("{},{}", m.name(), f.name), v.into());
                    sum += v;
                }
                sum / rendered.len().max(1) as f64
            };
            scores.push(Score {
                task: task.name.clone(),
                filter: f.name.clone(),
                metric: m.name().into(),
                value,
                examples: rendered.len(),
                num_fewshot,
            });
        }
    }
    (scores, details.into_iter().map(Value::Object).collect())
}

/// Scores multiple-choice examples from each choice's log-likelihood: `acc` picks the highest,
/// `acc_norm` the highest per character of the choice (the harness's normalisation).
pub fn score_choices(
    task: &Task,
    num_fewshot: usize,
    rendered: &[Rendered],
    loglikelihoods: &[Vec<f64>],
) -> (Vec<Score>, Vec<Value>) {
    let argmax = |v: &mut dyn Iterator<Item = f64>| {
        v.enumerate()
            .fold(
                (0, f64::NEG_INFINITY),
                |b, (i, x)| if x > b.1 { (i, x) } else { b },
            )
            .0
    };
    let mut details = Vec::new();
    let (mut acc, mut acc_norm) = (0.0, 0.0);
    for (r, ll) in rendered.iter().zip(loglikelihoods) {
        let choices = r.choices.clone().unwrap_or_default();
        let pick = argmax(&mut ll.iter().copied());
        let pick_norm = argmax(
            &mut ll
                .iter()
                .zip(&choices)
                .map(|(l, c)| l / c.chars().count().max(1) as f64),
        );
        let gold = r.gold.unwrap_or(usize::MAX);
        acc += (pick == gold) as u8 as f64;
        acc_norm += (pick_norm == gold) as u8 as f64;
        details.push(serde_json::json!({"task": task.name, "doc_index": r.doc_index, "prompt": r.prompt,
            "choices": choices, "gold": gold, "loglikelihoods": ll, "pick": pick, "pick_norm": pick_norm}));
    }
    let n = rendered.len().max(1) as f64;
    let scores = task
        .metrics
        .iter()
        .map(|m| Score {
            task: task.name.clone(),
            filter: "none".into(),
            metric: m.name().into(),
            value: if matches!(m, Metric::AccNorm) {
                acc_norm / n
            } else {
                acc / n
            },
            examples: rendered.len(),
            num_fewshot,
        })
        .collect();
    (scores, details)
}

/// A Markdown table of scores.
pub fn markdown(scores: &[Score]) -> String {
    let mut s = String::from(
        "| task | filter | n-shot | metric | value | examples |\n|---|---|---|---|---|---|\n",
    );
    for r in scores {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} | {} |\n",
            r.task, r.filter, r.num_fewshot, r.metric, r.value, r.examples
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex(pattern: &str, group_select: i64) -> Filter {
        Filter {
            name: "f".into(),
            steps: vec![
                Step::Regex {
                    re: Regex::new(pattern).unwrap(),
                    group_select,
                    fallback: "[invalid]".into(),
                },
                Step::TakeFirst,
            ],
        }
    }

    #[test]
    fn regex_filter_follows_python_findall() {
        // gsm8k_cot's strict and flexible extraction.
        let strict = regex(r"The answer is (\-?[0-9\.\,]+).", 0);
        assert_eq!(strict.apply("So 3+4=7. The answer is 7."), "7");
        assert_eq!(strict.apply("I think 7"), "[invalid]");
        let flexible = regex(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1);
        assert_eq!(flexible.apply("We had 12 apples, ate 5, so 7"), "7");
        assert_eq!(flexible.apply("costs $1,200 total"), "$1,200");
        assert_eq!(regex(r"\d+", 1).apply("a 1 b 22"), "22");
        assert_eq!(regex(r"\d+", 5).apply("a 1"), "[invalid]");
    }

    #[test]
    fn python_list_literals() {
        assert_eq!(
            python_list("['a', \"b's\", 3]").unwrap(),
            serde_json::json!(["a", "b's", 3])
        );
        assert_eq!(python_list("[]").unwrap(), serde_json::json!([]));
        assert!(python_list("[a b]").is_none());
    }

    #[test]
    fn bad_tasks_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.yaml");
        std::fs::write(&p, "task: t\ndataset_path: hellaswag\n").unwrap();
        let e = Task::load(&p).err().unwrap().to_string();
        assert!(
            e.contains("t.yaml") && e.contains("dataset_path: hellaswag"),
            "{e}"
        );
        std::fs::write(dir.path().join("d.jsonl"), "{\"q\": \"x\", \"a\": \"y\"}\n").unwrap();
        let base = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\ndoc_to_text: q\ndoc_to_target: a\n";
        std::fs::write(&p, format!("{base}process_docs: !function u.f\n")).unwrap();
        let e = Task::load(&p).err().unwrap().to_string();
        assert!(e.contains("process_docs"), "{e}");
        std::fs::write(&p, format!("{base}doc_to_choice: !function u.f\n")).unwrap();
        let e = Task::load(&p).err().unwrap().to_string();
        assert!(
            e.contains("doc_to_choice") && e.contains("!function"),
            "{e}"
        );
        std::fs::write(&p, base).unwrap();
        let t = Task::load(&p).unwrap();
        let r = t.render(0, DEFAULT_FEWSHOT_SEED, None).unwrap();
        assert_eq!((r[0].prompt.as_str(), r[0].targets[0].as_str()), ("x", "y"));
    }
}
