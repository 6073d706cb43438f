//! The index in PostgreSQL with pgvector, for collections that outgrow one machine: `--index
//! postgres://USER@HOST/DB?table=NAME` (or `host=/socket/dir` for a local socket; `table`
//! defaults to `lmkit_chunks`). Chunks live in table NAME (id, source, lines, metadata as
//! jsonb, text, `vector(dim)`) with an HNSW index over inner product (`vector_ip_ops`), the
//! manifest in NAME_manifest. Dense search only: BM25 and hybrid need a local index. Searches
//! with a filter scan exactly (pgvector filters after its HNSW walk, which loses results under a
//! selective filter).

use crate::filter::Filter;
use crate::index::{ChunkInfo, Found, Manifest, NewChunk, Selector};
use crate::{Mode, RagError, Result, SearchOptions};
use postgres::{Client, NoTls};
use serde_json::{Map, Value};

/// Why a PostgreSQL index refuses BM25 and hybrid search.
pub const DENSE_ONLY: &str = "a PostgreSQL index searches by embeddings only: use --mode dense (BM25 and hybrid need a local index)";

pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

fn db_err(e: postgres::Error) -> RagError {
    RagError::Invalid(format!("PostgreSQL: {e}"))
}

/// The connection URL without lmkit's `table` parameter, and the table name.
fn split_table(url: &str) -> Result<(String, String)> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut table = "lmkit_chunks".to_string();
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("table", t)) => table = t.to_string(),
            _ => rest.push(kv),
        }
    }
    let ok = table.len() <= 48
        && table
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(RagError::Invalid(format!(
            "table `{table}`: use letters, digits and _ (at most 48), starting with a letter"
        )));
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, table))
}

fn vector_literal(v: &[f32]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{x}")).collect();
    format!("[{}]", parts.join(","))
}

/// A LIKE pattern for a `*`/`?` wildcard pattern (with `\\` escaping LIKE's own `%`, `_`).
fn like(glob: &str) -> String {
    let mut s = String::new();
    for c in glob.chars() {
        match c {
            '*' => s.push('%'),
            '?' => s.push('_'),
            '%' | '_' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            c => s.push(c),
        }
    }
    s
}

pub struct PgIndex {
    client: Client,
    table: String,
    pub manifest: Manifest,
}

impl PgIndex {
    fn connect(url: &str) -> Result<(Client, String)> {
        let (url, table) = split_table(url)?;
        let client = Client::connect(&url, NoTls).map_err(db_err)?;
        Ok((client, table))
    }

    /// A new index in the database (`overwrite` drops one of the same table name first).
    pub fn create(url: &str, manifest: Manifest, overwrite: bool) -> Result<PgIndex> {
        let (mut client, table) = Self::connect(url)?;
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
            .map_err(db_err)?;
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .map_err(db_err)?
            .get(0);
        if exists && !overwrite {
            return Err(RagError::Invalid(format!(
                "table `{table}` already holds an index; add to it with `lmkit index add`, or pass --overwrite to replace it"
            )));
        }
        let dim = manifest.model.dim;
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_manifest;
                 CREATE TABLE {table} (id bigint PRIMARY KEY, source text NOT NULL,
                   first_line integer NOT NULL, last_line integer NOT NULL, meta jsonb NOT NULL,
                   text text NOT NULL, embedding vector({dim}) NOT NULL);
                 CREATE TABLE {table}_manifest (manifest jsonb NOT NULL);"
            ))
            .map_err(db_err)?;
        let mut ix = PgIndex {
            client,
            table,
            manifest,
        };
        ix.write_manifest()?;
        Ok(ix)
    }

    pub fn open(url: &str) -> Result<PgIndex> {
        let (mut client, table) = Self::connect(url)?;
        let rows = client
            .query(&format!("SELECT manifest::text FROM {table}_manifest"), &[])
            .map_err(|e| {
                RagError::Invalid(format!(
                    "PostgreSQL: no lmkit index in table `{table}` ({e}); build one with `lmkit index build --output postgres://…`"
                ))
            })?;
        let text: String = rows
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| RagError::Invalid(format!("table `{table}_manifest` is empty")))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| RagError::Invalid(format!("table `{table}_manifest`: {e}")))?;
        manifest
            .validate()
            .map_err(|e| RagError::Invalid(format!("table `{table}_manifest`: {e}")))?;
        Ok(PgIndex {
            client,
            table,
            manifest,
        })
    }

    fn write_manifest(&mut self) -> Result<()> {
        let text =
            serde_json::to_string(&self.manifest).map_err(|e| RagError::Invalid(e.to_string()))?;
        let t = &self.table;
        self.client
            .execute(&format!("DELETE FROM {t}_manifest"), &[])
            .map_err(db_err)?;
        self.client
            .execute(
                &format!("INSERT INTO {t}_manifest VALUES ($1::text::jsonb)"),
                &[&text],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn len(&mut self) -> Result<usize> {
        let n: i64 = self
            .client
            .query_one(&format!("SELECT count(*) FROM {}", self.table), &[])
            .map_err(db_err)?
            .get(0);
        Ok(n as usize)
    }

    pub fn is_empty(&mut self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Adds chunks in one transaction and (re)creates the HNSW index; returns their ids.
    pub fn add(&mut self, new: Vec<NewChunk>) -> Result<Vec<u64>> {
        let t = self.table.clone();
        let (m, efc) = (self.manifest.hnsw.m, self.manifest.hnsw.ef_construction);
        let mut ids = Vec::with_capacity(new.len());
        let mut tx = self.client.transaction().map_err(db_err)?;
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {t} VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7::text::vector)"
            ))
            .map_err(db_err)?;
        for c in new {
            let id = self.manifest.next_id;
            self.manifest.next_id += 1;
            let meta = Value::Object(c.meta).to_string();
            tx.execute(
                &insert,
                &[
                    &(id as i64),
                    &c.source,
                    &(c.lines[0] as i32),
                    &(c.lines[1] as i32),
                    &meta,
                    &c.text,
                    &vector_literal(&c.vector),
                ],
            )
            .map_err(db_err)?;
            ids.push(id);
        }
        tx.batch_execute(&format!(
            "CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding vector_ip_ops) WITH (m = {m}, ef_construction = {efc})"
        ))
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        self.manifest.count = self.len()?;
        self.manifest.generation += 1;
        self.write_manifest()?;
        Ok(ids)
    }

    /// Deletes the chunks `sel` picks; returns how many.
    pub fn delete(&mut self, sel: &Selector) -> Result<usize> {
        let t = self.table.clone();
        let rows = self
            .client
            .query(
                &format!("SELECT id, source, first_line, last_line, meta::text FROM {t}"),
                &[],
            )
            .map_err(db_err)?;
        let mut doomed: Vec<i64> = Vec::new();
        for r in rows {
            let meta: String = r.get(4);
            let c = ChunkInfo {
                id: r.get::<_, i64>(0) as u64,
                source: r.get(1),
                lines: [r.get::<_, i32>(2) as usize, r.get::<_, i32>(3) as usize],
                meta: serde_json::from_str(&meta).unwrap_or_default(),
            };
            if sel.matches(&c) {
                doomed.push(c.id as i64);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        self.client
            .execute(&format!("DELETE FROM {t} WHERE id = ANY($1)"), &[&doomed])
            .map_err(db_err)?;
        self.manifest.count = self.len()?;
        self.manifest.generation += 1;
        self.write_manifest()?;
        Ok(doomed.len())
    }

    /// The WHERE clause of `filter`, with its parameters.
    fn where_clause(filter: &Filter) -> (String, Vec<String>) {
        let mut parts = Vec::new();
        let mut params = Vec::new();
        for c in &filter.clauses {
            params.push(like(&c.pattern));
            let n = params.len() + 1; // $1 is the query vector
            let value = if c.key == "source" {
                "source".to_string()
            } else {
                params.push(c.key.clone());
                format!("(meta ->> ${})", n + 1)
            };
            let test = format!("{value} LIKE ${n} ESCAPE '\\'");
            parts.push(if c.negate {
                format!("({value} IS NULL OR NOT ({test}))")
            } else {
                format!("({value} IS NOT NULL AND {test})")
            });
        }
        if parts.is_empty() {
            (String::new(), params)
        } else {
            (format!("WHERE {}", parts.join(" AND ")), params)
        }
    }

    /// Dense search (`opts.mode` must be dense): the HNSW index, or an exact scan with `exact`
    /// or a filter.
    pub fn search(&mut self, v: &[f32], opts: &SearchOptions) -> Result<Vec<Found>> {
        if opts.mode != Mode::Dense {
            return Err(RagError::Invalid(DENSE_ONLY.into()));
        }
        if v.len() != self.manifest.model.dim {
            return Err(RagError::Invalid(format!(
                "a query vector of {} dimensions for an index of {}",
                v.len(),
                self.manifest.model.dim
            )));
        }
        let t = self.table.clone();
        let (clause, params) = Self::where_clause(&opts.filter);
        let exact = opts.exact || !opts.filter.is_empty();
        let ef = opts
            .ef
            .unwrap_or(self.manifest.ef_search)
            .max(opts.k)
            .min(1000);
        let k = opts.k.min(100_000) as i64;
        let q = vector_literal(v);
        let mut tx = self.client.transaction().map_err(db_err)?;
        if exact {
            tx.batch_execute("SET LOCAL enable_indexscan = off")
                .map_err(db_err)?;
        } else {
            tx.batch_execute(&format!("SET LOCAL hnsw.ef_search = {ef}"))
                .map_err(db_err)?;
        }
        let sql = format!(
            "SELECT id, source, first_line, last_line, meta::text, text, (-(embedding <#> $1::text::vector))::real
             FROM {t} {clause} ORDER BY embedding <#> $1::text::vector LIMIT {k}"
        );
        let mut args: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&q];
        for p in &params {
            args.push(p);
        }
        let rows = tx.query(&sql, &args).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let meta: String = r.get(4);
                let sim: f32 = r.get(6);
                Found {
                    id: r.get::<_, i64>(0) as u64,
                    source: r.get(1),
                    lines: [r.get::<_, i32>(2) as usize, r.get::<_, i32>(3) as usize],
                    meta: serde_json::from_str::<Map<String, Value>>(&meta).unwrap_or_default(),
                    text: r.get(5),
                    score: sim,
                    dense: Some((i + 1, sim)),
                    bm25: None,
                }
            })
            .collect())
    }

    /// How many chunks each source has (for `lmkit index info`).
    pub fn sources(&mut self) -> Result<usize> {
        let n: i64 = self
            .client
            .query_one(
                &format!("SELECT count(DISTINCT source) FROM {}", self.table),
                &[],
            )
            .map_err(db_err)?
            .get(0);
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_tables_and_patterns() {
        assert_eq!(
            split_table("postgres://u@/db?host=/tmp&table=docs").unwrap(),
            ("postgres://u@/db?host=/tmp".to_string(), "docs".to_string())
        );
        assert_eq!(split_table("postgres://h/db").unwrap().1, "lmkit_chunks");
        assert!(split_table("postgres://h/db?table=x;drop").is_err());
        assert_eq!(
            like("docs/*_a?.md"),
            "docs/%\\\\_a_.md".replace("\\\\", "\\")
        );
        assert_eq!(vector_literal(&[1.0, -0.5]), "[1,-0.5]");
    }
}
