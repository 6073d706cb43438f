//! Metadata filters: `key=value`, `key!=value`, with `*` and `?` wildcards in the value. The key
//! `source` is the chunk's source path; other keys are the metadata given when the chunk was
//! added. A chunk passes when it passes every clause; a missing key fails `=` and passes `!=`.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
pub struct Clause {
    pub key: String,
    pub negate: bool,
    pub pattern: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub clauses: Vec<Clause>,
}

impl Filter {
    /// Parses clauses such as `lang=ko`, `source=docs/*.md`, `kind!=draft`.
    pub fn parse(specs: &[String]) -> Result<Filter, String> {
        let mut clauses = Vec::new();
        for s in specs {
            let (key, negate, pattern) = if let Some((k, v)) = s.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = s.split_once('=') {
                (k, false, v)
            } else {
                return Err(format!(
                    "filter `{s}`: expected key=value or key!=value (e.g. lang=ko, source=docs/*.md)"
                ));
            };
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("filter `{s}`: no key before `=`"));
            }
            clauses.push(Clause {
                key: key.to_string(),
                negate,
                pattern: pattern.to_string(),
            });
        }
        Ok(Filter { clauses })
    }

    pub fn is_empty(&self) -> bool {
        self.clauses.is_empty()
    }

    /// Whether a chunk from `source` with metadata `meta` passes.
    pub fn matches(&self, source: &str, meta: &serde_json::Map<String, Value>) -> bool {
        self.clauses.iter().all(|c| {
            let value = if c.key == "source" {
                Some(source.to_string())
            } else {
                meta.get(&c.key).map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            };
            let hit = value.is_some_and(|v| glob(&c.pattern, &v));
            hit != c.negate
        })
    }
}

/// Whether `text` matches `pattern`, where `*` is any run of characters and `?` any one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("docs/*.md", "docs/a/b.md"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*", ""));
        assert!(!glob("ko", "kor"));
    }

    #[test]
    fn clauses_all_apply() {
        let f = Filter::parse(&["lang=ko".into(), "source!=*draft*".into()]).unwrap();
        let meta: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"lang": "ko", "year": 2024}"#).unwrap();
        assert!(f.matches("laws/a.txt", &meta));
        assert!(!f.matches("laws/draft.txt", &meta));
        let y = Filter::parse(&["year=2024".into()]).unwrap();
        assert!(y.matches("x", &meta));
        assert!(!Filter::parse(&["missing=1".into()])
            .unwrap()
            .matches("x", &meta));
        assert!(Filter::parse(&["missing!=1".into()])
            .unwrap()
            .matches("x", &meta));
        assert!(Filter::parse(&["nokey".into()]).is_err());
    }
}
