//! The SQLite store (WAL mode) of every completion, people's ratings of them, and preference
//! pairs ("A is better than B") for later preference tuning.

use rusqlite::types::FromSql;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {msg}")]
    Db { path: PathBuf, msg: String },
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Io(#[from] lmkit_core::PathError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One stored completion (one choice of a request).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Completion {
    pub id: String,
    pub request_id: String,
    pub created: i64,
    pub endpoint: String,
    pub model: String,
    /// The prompt text the model saw (for chat: the rendered chat template).
    pub prompt: String,
    /// Chat messages as JSON, for chat requests.
    pub messages: Option<String>,
    pub output: String,
    /// Sampling parameters as JSON.
    pub params: String,
    /// The moderation result as JSON.
    pub moderation: String,
    pub prompt_tokens: i64,
    /// Of the prompt tokens, those whose keys and values came from the prefix cache.
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: f64,
    pub finish_reason: String,
    pub rating: Option<i64>,
    /// The rater's note.
    pub comment: Option<String>,
    /// The answer the rater wrote instead (exported as supervised fine-tuning data).
    pub correction: Option<String>,
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    created INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    messages TEXT,
    output TEXT NOT NULL,
    params TEXT NOT NULL,
    moderation TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    finish_reason TEXT NOT NULL,
    rating INTEGER,
    rated_at INTEGER,
    comment TEXT,
    correction TEXT,
    cached_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS completions_created ON completions(created);
CREATE INDEX IF NOT EXISTS completions_prompt ON completions(prompt);
CREATE TABLE IF NOT EXISTS preferences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created INTEGER NOT NULL,
    chosen_id TEXT NOT NULL REFERENCES completions(id),
    rejected_id TEXT NOT NULL REFERENCES completions(id)
);
";

/// Which completions [`Store::recent`] lists.
#[derive(Clone, Debug, Default)]
pub struct RecentFilter {
    /// Only rated (`Some(true)`) or only unrated (`Some(false)`) ones.
    pub rated: Option<bool>,
    /// Only this model's (the request's `model`: base or adapter name).
    pub model: Option<String>,
    /// Only those created at or after / before these times (seconds since the Unix epoch).
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Only those whose prompt or completion moderation flagged (`Some(true)`), or neither.
    pub flagged: Option<bool>,
}

/// The columns a completion is stored with.
macro_rules! columns {
    () => {
        "id, request_id, created, endpoint, model, prompt, messages, output, params, \
         moderation, prompt_tokens, completion_tokens, latency_ms, finish_reason, rating, \
         cached_tokens"
    };
}
const COLUMNS: &str = columns!();
/// What reading a completion takes: its columns and the rater's comment and correction.
const READ_COLUMNS: &str = concat!(columns!(), ", comment, correction");

fn row(r: &rusqlite::Row) -> rusqlite::Result<Completion> {
    Ok(Completion {
        id: r.get(0)?,
        request_id: r.get(1)?,
        created: r.get(2)?,
        endpoint: r.get(3)?,
        model: r.get(4)?,
        prompt: r.get(5)?,
        messages: r.get(6)?,
        output: r.get(7)?,
        params: r.get(8)?,
        moderation: r.get(9)?,
        prompt_tokens: r.get(10)?,
        completion_tokens: r.get(11)?,
        latency_ms: r.get(12)?,
        finish_reason: r.get(13)?,
        rating: r.get(14)?,
        cached_tokens: r.get(15)?,
        comment: r.get(16)?,
        correction: r.get(17)?,
    })
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Io(lmkit_core::PathError::new(dir.to_path_buf(), e)))?;
        }
        let db = |e: rusqlite::Error| StoreError::Db {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        // A device, FIFO or directory is refused before SQLite opens it (it made its journal
        // file beside a device: `/dev/zero-journal`).
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(StoreError::Db {
                path: path.to_path_buf(),
                msg: "not a database file (a device, FIFO or directory)".into(),
            });
        }
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(db)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Db {
                path: path.to_path_buf(),
                msg: format!("could not switch to WAL mode (got `{mode}`)"),
            });
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(|e| StoreError::Db {
            path: path.to_path_buf(),
            msg: format!("{e} (is this an lmkit completions database?)"),
        })?;
        // Databases written before raters could comment or correct, or before the prefix
        // cache's share of a prompt was kept, get the columns.
        let mut have = std::collections::BTreeSet::new();
        {
            let mut st = conn.prepare("PRAGMA table_info(completions)").map_err(db)?;
            let names = st.query_map([], |r| r.get::<_, String>(1)).map_err(db)?;
            for n in names {
                have.insert(n.map_err(db)?);
            }
        }
        for (col, ty) in [
            ("comment", "TEXT"),
            ("correction", "TEXT"),
            ("cached_tokens", "INTEGER NOT NULL DEFAULT 0"),
        ] {
            if !have.contains(col) {
                conn.execute_batch(&format!("ALTER TABLE completions ADD COLUMN {col} {ty}"))
                    .map_err(db)?;
            }
        }
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|e| StoreError::Db {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    /// Every row of a three-column query (the exports read their rows so).
    fn triples<A: FromSql, B: FromSql, C: FromSql>(&self, sql: &str) -> Result<Vec<(A, B, C)>> {
        self.with(|conn| {
            let mut st = conn.prepare(sql)?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    pub fn insert(&self, c: &Completion) -> Result<()> {
        self.with(|conn| {
            conn.execute(
                &format!(
                    "INSERT INTO completions ({COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                ),
                params![
                    c.id,
                    c.request_id,
                    c.created,
                    c.endpoint,
                    c.model,
                    c.prompt,
                    c.messages,
                    c.output,
                    c.params,
                    c.moderation,
                    c.prompt_tokens,
                    c.completion_tokens,
                    c.latency_ms,
                    c.finish_reason,
                    c.rating,
                    c.cached_tokens
                ],
            )
            .map(|_| ())
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<Completion>> {
        self.with(|conn| {
            conn.query_row(
                &format!("SELECT {READ_COLUMNS} FROM completions WHERE id = ?1"),
                [id],
                row,
            )
            .optional()
        })
    }

    /// The newest completions that pass `f`, at most `limit`.
    pub fn recent(&self, limit: usize, f: &RecentFilter) -> Result<Vec<Completion>> {
        let mut conditions: Vec<String> = Vec::new();
        let mut args: Vec<rusqlite::types::Value> = vec![(limit as i64).into()];
        match f.rated {
            Some(false) => conditions.push("rating IS NULL".into()),
            Some(true) => conditions.push("rating IS NOT NULL".into()),
            None => {}
        }
        if let Some(m) = &f.model {
            args.push(m.clone().into());
            conditions.push(format!("model = ?{}", args.len()));
        }
        if let Some(t) = f.since {
            args.push(t.into());
            conditions.push(format!("created >= ?{}", args.len()));
        }
        if let Some(t) = f.until {
            args.push(t.into());
            conditions.push(format!("created < ?{}", args.len()));
        }
        let flagged = "(COALESCE(json_extract(moderation, '$.prompt.flagged'), 0) = 1 \
                       OR COALESCE(json_extract(moderation, '$.completion.flagged'), 0) = 1)";
        match f.flagged {
            Some(true) => conditions.push(flagged.into()),
            Some(false) => conditions.push(format!("NOT {flagged}")),
            None => {}
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        self.with(|conn| {
            let mut st = conn.prepare(&format!(
                "SELECT {READ_COLUMNS} FROM completions {filter} ORDER BY created DESC, rowid DESC LIMIT ?1"
            ))?;
            let rows = st.query_map(rusqlite::params_from_iter(args), row)?;
            rows.collect()
        })
    }

    /// How far review has come: completions, rated ones, preference pairs, and the models seen.
    pub fn stats(&self) -> Result<serde_json::Value> {
        self.with(|conn| {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM completions", [], |r| r.get(0))?;
            let rated: i64 = conn.query_row(
                "SELECT COUNT(*) FROM completions WHERE rating IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            let pairs: i64 =
                conn.query_row("SELECT COUNT(*) FROM preferences", [], |r| r.get(0))?;
            let mut st = conn.prepare("SELECT DISTINCT model FROM completions ORDER BY model")?;
            let models = st
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(serde_json::json!({
                "completions": n, "rated": rated, "unrated": n - rated,
                "preferences": pairs, "models": models,
            }))
        })
    }

    pub fn count(&self) -> Result<i64> {
        self.with(|conn| conn.query_row("SELECT COUNT(*) FROM completions", [], |r| r.get(0)))
    }

    /// Records a person's rating (e.g. -1, 0, 1 or 1..5) of a completion, with an optional
    /// comment and an optional corrected answer.
    pub fn rate(
        &self,
        id: &str,
        rating: i64,
        comment: Option<&str>,
        correction: Option<&str>,
    ) -> Result<()> {
        let n = self.with(|conn| {
            conn.execute(
                "UPDATE completions SET rating = ?1, rated_at = ?2, comment = ?3, correction = ?4 \
                 WHERE id = ?5",
                params![rating, now(), comment, correction, id],
            )
        })?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "no completion with id `{id}`"
            )));
        }
        Ok(())
    }

    /// Writes every corrected answer as supervised fine-tuning data, one JSONL line each: a chat
    /// completion as `{"messages": [...the request's messages, the correction as the
    /// assistant's]}`, any other as `{"prompt", "completion"}`; returns how many.
    pub fn export_corrections(&self, out: &mut dyn Write) -> Result<usize> {
        let rows: Vec<(String, Option<String>, String)> = self.triples(
            "SELECT prompt, messages, correction FROM completions \
                 WHERE correction IS NOT NULL AND correction != '' ORDER BY created, id",
        )?;
        self.write_lines(
            out,
            rows.iter().map(|(prompt, messages, correction)| {
                let chat: Option<Vec<serde_json::Value>> = messages
                    .as_deref()
                    .and_then(|m| serde_json::from_str(m).ok());
                match chat {
                    Some(mut msgs) if !msgs.is_empty() => {
                        msgs.push(serde_json::json!({"role": "assistant", "content": correction}));
                        serde_json::json!({ "messages": msgs })
                    }
                    _ => serde_json::json!({ "prompt": prompt, "completion": correction }),
                }
            }),
        )
    }

    /// Two different completions of one prompt, for a person to pick the better one.
    pub fn pair(&self) -> Result<Option<(Completion, Completion)>> {
        let rows = self.with(|conn| {
            let prompt: Option<String> = conn
                .query_row(
                    "SELECT prompt FROM completions GROUP BY prompt \
                     HAVING COUNT(DISTINCT output) >= 2 ORDER BY RANDOM() LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(prompt) = prompt else {
                return Ok(Vec::new());
            };
            let mut st = conn.prepare(&format!(
                "SELECT {READ_COLUMNS} FROM completions WHERE prompt = ?1 ORDER BY RANDOM()"
            ))?;
            let rows = st.query_map([prompt], row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let Some(a) = rows.first().cloned() else {
            return Ok(None);
        };
        Ok(rows
            .into_iter()
            .find(|b| b.output != a.output)
            .map(|b| (a, b)))
    }

    /// Stores "`chosen` is better than `rejected`"; both must be completions of the same prompt.
    pub fn prefer(&self, chosen: &str, rejected: &str) -> Result<i64> {
        let a = self
            .get(chosen)?
            .ok_or_else(|| StoreError::NotFound(format!("no completion with id `{chosen}`")))?;
        let b = self
            .get(rejected)?
            .ok_or_else(|| StoreError::NotFound(format!("no completion with id `{rejected}`")))?;
        if a.prompt != b.prompt || chosen == rejected {
            return Err(StoreError::NotFound(
                "a preference pair needs two different completions of the same prompt".into(),
            ));
        }
        self.with(|conn| {
            conn.execute(
                "INSERT INTO preferences (created, chosen_id, rejected_id) VALUES (?1, ?2, ?3)",
                params![now(), chosen, rejected],
            )?;
            Ok(conn.last_insert_rowid())
        })
    }

    /// Writes `lines` to `out` as JSONL; returns how many.
    fn write_lines(
        &self,
        out: &mut dyn Write,
        lines: impl Iterator<Item = serde_json::Value>,
    ) -> Result<usize> {
        let mut n = 0;
        for line in lines {
            writeln!(out, "{line}")
                .map_err(|e| StoreError::Io(lmkit_core::PathError::new(self.path.clone(), e)))?;
            n += 1;
        }
        Ok(n)
    }

    /// Writes every rated completion as a JSONL line `{"prompt", "completion", "label"}` (label:
    /// rated above 0), the unpaired rows KTO reads; returns how many.
    pub fn export_ratings(&self, out: &mut dyn Write) -> Result<usize> {
        let rows: Vec<(String, String, i64)> = self.triples(
            "SELECT prompt, output, rating FROM completions \
                 WHERE rating IS NOT NULL AND rating != 0 ORDER BY created, id",
        )?;
        self.write_lines(
            out,
            rows.iter().map(|(prompt, completion, rating)| {
                serde_json::json!({ "prompt": prompt, "completion": completion, "label": *rating > 0 })
            }),
        )
    }

    /// Writes every preference pair as a JSONL line `{"prompt", "chosen", "rejected"}`; returns
    /// how many were written.
    pub fn export_preferences(&self, out: &mut dyn Write) -> Result<usize> {
        let rows: Vec<(String, String, String)> = self.triples(
            "SELECT c.prompt, c.output, r.output FROM preferences p \
                 JOIN completions c ON c.id = p.chosen_id \
                 JOIN completions r ON r.id = p.rejected_id ORDER BY p.id",
        )?;
        self.write_lines(
            out,
            rows.iter().map(|(prompt, chosen, rejected)| {
                serde_json::json!({ "prompt": prompt, "chosen": chosen, "rejected": rejected })
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(id: &str, prompt: &str, output: &str) -> Completion {
        Completion {
            id: id.into(),
            request_id: id.into(),
            created: now(),
            endpoint: "completions".into(),
            model: "m".into(),
            prompt: prompt.into(),
            messages: None,
            output: output.into(),
            params: "{}".into(),
            moderation: "{}".into(),
            prompt_tokens: 3,
            cached_tokens: 0,
            completion_tokens: 2,
            latency_ms: 1.5,
            finish_reason: "stop".into(),
            rating: None,
            comment: None,
            correction: None,
        }
    }

    /// A directory or FIFO given as the database is refused before SQLite opens it, and nothing
    /// is made beside it (SQLite made its journal beside a device).
    #[test]
    fn a_path_that_is_not_a_file_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        for p in [&sub, &fifo] {
            let e = Store::open(p).err().expect("refused").to_string();
            assert!(e.contains("not a database file"), "{e}");
        }
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["fifo", "sub"]);
    }

    /// The review list's filters: creation time, moderation flags (prompt or completion), model,
    /// rated, combined.
    #[test]
    fn recent_completions_filter_by_time_flags_and_model() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("log.sqlite")).unwrap();
        let flagged = r#"{"prompt": {"flagged": false, "categories": []},
            "completion": {"flagged": true, "categories": ["x"]}, "policy": "flag"}"#;
        for (id, created, moderation, model) in [
            ("old", 1_000, "{}", "m"),
            ("flagged", 2_000, flagged, "m"),
            (
                "clean",
                3_000,
                r#"{"prompt": {"flagged": false}, "completion": null}"#,
                "n",
            ),
        ] {
            let mut c = completion(id, "Q?", "A");
            c.created = created;
            c.moderation = moderation.into();
            c.model = model.into();
            s.insert(&c).unwrap();
        }
        let ids = |f: RecentFilter| -> Vec<String> {
            s.recent(10, &f)
                .unwrap()
                .into_iter()
                .map(|c| c.id)
                .collect()
        };
        assert_eq!(ids(RecentFilter::default()), ["clean", "flagged", "old"]);
        let f = |since, until, flagged| RecentFilter {
            since,
            until,
            flagged,
            ..Default::default()
        };
        assert_eq!(ids(f(Some(2_000), None, None)), ["clean", "flagged"]);
        assert_eq!(ids(f(None, Some(2_000), None)), ["old"]);
        assert_eq!(ids(f(Some(1_500), Some(2_500), None)), ["flagged"]);
        assert_eq!(ids(f(None, None, Some(true))), ["flagged"]);
        assert_eq!(ids(f(None, None, Some(false))), ["clean", "old"]);
        let model_n = RecentFilter {
            model: Some("n".into()),
            flagged: Some(false),
            ..Default::default()
        };
        assert_eq!(ids(model_n), ["clean"]);
        s.rate("old", 1, None, None).unwrap();
        let rated_clean = RecentFilter {
            rated: Some(true),
            flagged: Some(false),
            ..Default::default()
        };
        assert_eq!(ids(rated_clean), ["old"]);
    }

    #[test]
    fn stores_rates_pairs_and_exports() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("sub/log.sqlite")).unwrap();
        s.insert(&completion("a", "Q?", "yes")).unwrap();
        s.insert(&completion("b", "Q?", "no")).unwrap();
        s.insert(&completion("c", "other", "x")).unwrap();
        assert_eq!(s.count().unwrap(), 3);
        assert_eq!(s.get("a").unwrap().unwrap().output, "yes");
        s.rate("a", 1, None, None).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().rating, Some(1));
        assert!(s.rate("zzz", 1, None, None).is_err());
        let unrated = RecentFilter {
            rated: Some(false),
            ..Default::default()
        };
        assert_eq!(s.recent(10, &unrated).unwrap().len(), 2);
        let (x, y) = s.pair().unwrap().unwrap();
        assert_eq!(x.prompt, "Q?");
        assert_ne!(x.output, y.output);
        s.prefer("a", "b").unwrap();
        assert!(s.prefer("a", "c").is_err(), "different prompts");
        let mut out = Vec::new();
        assert_eq!(s.export_preferences(&mut out).unwrap(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
        );
        // Reopening sees the same rows, and a duplicate id is refused rather than overwritten.
        drop(s);
        let s = Store::open(&dir.path().join("sub/log.sqlite")).unwrap();
        assert_eq!(s.count().unwrap(), 3);
        assert!(s.insert(&completion("a", "Q?", "again")).is_err());
    }

    #[test]
    fn older_databases_get_comments_corrections_and_cached_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.sqlite");
        // A database from before comments, corrections and the prefix cache's share, with a
        // row written then.
        let old = SCHEMA
            .replace(
                ",\n    comment TEXT,\n    correction TEXT,\n    cached_tokens INTEGER NOT NULL DEFAULT 0",
                "",
            )
            .replace("rated_at INTEGER,", "rated_at INTEGER");
        assert!(!old.contains("correction") && !old.contains("cached_tokens"));
        let conn = Connection::open(&p).unwrap();
        conn.execute_batch(&old).unwrap();
        conn.execute_batch(
            "INSERT INTO completions (id, request_id, created, endpoint, model, prompt, output, \
             params, moderation, prompt_tokens, completion_tokens, latency_ms, finish_reason) \
             VALUES ('before', 'before', 1, 'completions', 'm', 'Q', 'A', '{}', '{}', 4, 1, \
             2.0, 'stop')",
        )
        .unwrap();
        drop(conn);
        let s = Store::open(&p).unwrap();
        let before = s.get("before").unwrap().unwrap();
        assert_eq!((before.prompt_tokens, before.cached_tokens), (4, 0));
        let mut cached = completion("c", "Q?", "A");
        cached.cached_tokens = 2;
        s.insert(&cached).unwrap();
        assert_eq!(s.get("c").unwrap().unwrap().cached_tokens, 2);
        s.insert(&completion("a", "Q?", "no idea")).unwrap();
        let mut chat = completion("b", "<|user|>hi", "hm");
        chat.messages = Some(r#"[{"role": "user", "content": "hi"}]"#.into());
        s.insert(&chat).unwrap();
        s.rate("a", -1, Some("wrong"), Some("yes")).unwrap();
        s.rate("b", -1, None, Some("hello!")).unwrap();
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(
            (a.comment.as_deref(), a.correction.as_deref()),
            (Some("wrong"), Some("yes"))
        );
        let mut out = Vec::new();
        assert_eq!(s.export_corrections(&mut out).unwrap(), 2);
        let rows: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(rows.contains(&serde_json::json!({"prompt": "Q?", "completion": "yes"})));
        assert!(rows.contains(&serde_json::json!({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]})));
        let mut out = Vec::new();
        assert_eq!(s.export_ratings(&mut out).unwrap(), 2);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.sqlite");
        std::fs::write(
            &p,
            b"this is not sqlite at all, just text, long enough to matter....",
        )
        .unwrap();
        let e = Store::open(&p).err().unwrap().to_string();
        assert!(e.contains("x.sqlite"), "{e}");
    }
}
