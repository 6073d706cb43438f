//! `lmkit index`: build, grow, shrink and search a vector index of documents.

use crate::progress::Bar;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use lmkit_core::{Progress, Unit};
use lmkit_rag::chunk::ChunkOptions;
use lmkit_rag::embed::Embedder;
use lmkit_rag::filter::Filter;
use lmkit_rag::hnsw::HnswParams;
use lmkit_rag::index::{Manifest, NewChunk};
use lmkit_rag::{Mode, SearchOptions};
use lmkit_rag::{Selector, Store};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Chunk, embed and index documents into a new index directory
    Build(BuildArgs),
    /// Add documents to an index (a source already there is replaced)
    Add(AddArgs),
    /// Delete chunks from an index by source, id or filter
    Delete(DeleteArgs),
    /// Search an index: dense, BM25 or both fused
    Search(SearchArgs),
    /// What an index holds
    Info(InfoArgs),
}

#[derive(Args)]
pub struct Ingest {
    /// Files or directories (.txt, .md, .rst, .jsonl, plain or .gz)
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// The text field of JSONL rows (their other fields become metadata)
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Metadata for every chunk added, KEY=VALUE (repeatable), for search filters
    #[arg(long = "meta")]
    meta: Vec<String>,
    /// Texts per embedding forward pass
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    lmkit index build --embedding-model all-MiniLM-L6-v2/ --input docs/ notes.md --output docs.index\n  \
    lmkit index build --embedding-model all-MiniLM-L6-v2/ --input data/ko --meta lang=ko --max-tokens 128 --output ko.index\n\n\
    Documents are cut into chunks of at most --max-tokens tokens (as the embedding model counts them)\n\
    that end at sentence or paragraph ends, --overlap tokens of whole sentences repeated between\n\
    neighbours; each chunk keeps its source file and line range. The index directory holds the\n\
    vectors, an HNSW graph, the texts and a BM25 index; it is written as a whole. With\n\
    --output postgres://USER@HOST/DB?table=NAME the chunks go into a PostgreSQL table with a\n\
    pgvector HNSW index instead (dense search only).")]
pub struct BuildArgs {
    /// A BERT-family sentence encoder directory (e.g. sentence-transformers' all-MiniLM-L6-v2)
    #[arg(long)]
    embedding_model: PathBuf,
    #[command(flatten)]
    ingest: Ingest,
    /// The index to create: a directory, or postgres://USER@HOST/DB?table=NAME (pgvector)
    #[arg(long)]
    output: PathBuf,
    /// Tokens per chunk at most (default: 200, or less when the model reads fewer)
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Tokens of whole sentences shared by neighbouring chunks
    #[arg(long, default_value_t = 40)]
    overlap: usize,
    /// HNSW links per node (2·m on the bottom layer)
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW candidates kept while inserting
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    /// Default candidates kept while searching (at least k)
    #[arg(long, default_value_t = 64)]
    ef_search: usize,
    /// Collections of at most this many chunks are searched exactly
    #[arg(long, default_value_t = 2000)]
    exact_below: usize,
    /// Replace an index already at --output
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
#[command(
    after_help = "Example:\n  lmkit index add docs.index --input docs/new-chapter.md\n\n\
    Chunks of a source file already in the index are replaced by the file's new chunks."
)]
pub struct AddArgs {
    /// The index: a directory, or postgres://USER@HOST/DB?table=NAME (pgvector)
    index: PathBuf,
    #[command(flatten)]
    ingest: Ingest,
    /// The embedding model, when it has moved since the index was built
    #[arg(long)]
    embedding_model: Option<PathBuf>,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit index delete docs.index --source docs/old.md\n  \
    lmkit index delete docs.index --filter lang=ko\n  lmkit index delete docs.index --id 17 --id 18\n\n\
    Deleted chunks are removed for good: their vectors, texts and graph nodes (the graph is\n\
    relinked around them), so later searches neither return nor walk through them."
)]
pub struct DeleteArgs {
    /// The index: a directory, or postgres://USER@HOST/DB?table=NAME (pgvector)
    index: PathBuf,
    /// Source paths (wildcards * and ?) whose chunks to delete
    #[arg(long)]
    source: Vec<String>,
    /// Chunk ids to delete
    #[arg(long)]
    id: Vec<u64>,
    /// Delete the chunks that match all these KEY=VALUE / KEY!=VALUE filters
    #[arg(long)]
    filter: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Hybrid,
    Dense,
    Bm25,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Hybrid => Mode::Hybrid,
            ModeArg::Dense => Mode::Dense,
            ModeArg::Bm25 => Mode::Bm25,
        }
    }
}

/// How to search, shared by `index search` and `rag ask`.
#[derive(Args)]
pub struct Retrieval {
    /// Results to return (default: 10 for `index search`, 4 for `rag ask`)
    #[arg(short = 'k', long = "top-k")]
    pub k: Option<usize>,
    /// dense (embeddings), bm25 (keywords) or hybrid (both, fused by reciprocal rank); default:
    /// hybrid for a local index, dense for PostgreSQL (which has no BM25)
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Only chunks matching KEY=VALUE or KEY!=VALUE (repeatable; `source` is the file path;
    /// wildcards * and ?)
    #[arg(long)]
    pub filter: Vec<String>,
    /// HNSW candidates kept (recall against speed; default: the index's ef_search)
    #[arg(long)]
    pub ef: Option<usize>,
    /// Search every vector instead of the graph
    #[arg(long)]
    pub exact: bool,
    /// The embedding model, when it has moved since the index was built
    #[arg(long)]
    pub embedding_model: Option<PathBuf>,
}

impl Retrieval {
    pub fn options(&self, default_k: usize, ix: &Store) -> Result<SearchOptions> {
        let k = self.k.unwrap_or(default_k);
        if k == 0 {
            bail!("--top-k must be at least 1");
        }
        Ok(SearchOptions {
            k,
            mode: self.mode.map_or(ix.default_mode(), Mode::from),
            ef: self.ef,
            exact: self.exact,
            filter: Filter::parse(&self.filter).map_err(anyhow::Error::msg)?,
        })
    }

    /// The query's embedder (none for BM25 alone).
    pub fn embedder(&self, ix: &Store) -> Result<Option<Embedder>> {
        if matches!(self.mode, Some(ModeArg::Bm25)) {
            return Ok(None);
        }
        Ok(Some(Embedder::for_index(
            ix.manifest(),
            self.embedding_model.as_deref(),
        )?))
    }
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit index search docs.index \"how do I resume training\" -k 5\n  \
    lmkit index search ko.index \"납세의무\" --mode bm25 --filter source=*tax*\n  \
    lmkit index search docs.index \"rope scaling\" --json\n\n\
    Prints rank, score, source:lines, chunk id and the start of the text (--json: one JSON\n\
    object per hit with the whole text and the rank in each list)."
)]
pub struct SearchArgs {
    /// The index: a directory, or postgres://USER@HOST/DB?table=NAME (pgvector)
    index: PathBuf,
    query: String,
    #[command(flatten)]
    retrieval: Retrieval,
    /// One JSON object per hit
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_help = "Example:\n  lmkit index info docs.index")]
pub struct InfoArgs {
    /// The index: a directory, or postgres://USER@HOST/DB?table=NAME (pgvector)
    index: PathBuf,
}

pub fn run(cmd: IndexCommand) -> Result<()> {
    match cmd {
        IndexCommand::Build(a) => build(a),
        IndexCommand::Add(a) => add(a),
        IndexCommand::Delete(a) => delete(a),
        IndexCommand::Search(a) => search(a),
        IndexCommand::Info(a) => info(a),
    }
}

fn parse_meta(specs: &[String]) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for s in specs {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--meta `{s}`: expected KEY=VALUE (e.g. lang=ko)"))?;
        if k.trim().is_empty() || k.trim() == "source" {
            bail!("--meta `{s}`: the key must be a name other than `source`");
        }
        m.insert(k.trim().to_string(), Value::String(v.to_string()));
    }
    Ok(m)
}

/// Reads, chunks and embeds the inputs; returns the chunks and the sources they came from.
fn prepare(e: &Embedder, ing: &Ingest, opts: ChunkOptions) -> Result<(Vec<NewChunk>, Vec<String>)> {
    let extra = parse_meta(&ing.meta)?;
    let files = lmkit_rag::sources::collect(&ing.input)?;
    let mut docs = Vec::new();
    for f in &files {
        docs.extend(lmkit_rag::sources::read(f, &ing.text_field)?);
    }
    let sources: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let t = Instant::now();
    let mut chunks = lmkit_rag::ingest::cut(e, &docs, opts, &extra);
    eprintln!(
        "{} files, {} documents → {} chunks ({:.1} s)",
        files.len(),
        docs.len(),
        chunks.len(),
        t.elapsed().as_secs_f64()
    );
    let bar = Bar::default();
    bar.begin("embedding", chunks.len() as u64, Unit::Items);
    let t = Instant::now();
    lmkit_rag::ingest::embed(e, &mut chunks, ing.batch_size, &|n| {
        bar.set_position(n as u64)
    })?;
    bar.finish();
    let s = t.elapsed().as_secs_f64();
    eprintln!(
        "embedded {} chunks in {s:.1} s ({:.0} chunks/s)",
        chunks.len(),
        chunks.len() as f64 / s.max(1e-9)
    );
    Ok((chunks, sources))
}

fn insert(ix: &mut Store, chunks: Vec<NewChunk>) -> Result<Vec<u64>> {
    let n = chunks.len();
    let bar = Bar::default();
    bar.begin("graph", n as u64, Unit::Items);
    let t = Instant::now();
    let ids = ix.add(chunks, &|k| bar.set_position(k as u64))?;
    bar.finish();
    eprintln!("indexed {n} chunks in {:.1} s", t.elapsed().as_secs_f64());
    Ok(ids)
}

fn build(a: BuildArgs) -> Result<()> {
    let e = Embedder::load(&a.embedding_model)?;
    let chunking = ChunkOptions {
        max_tokens: a.max_tokens.unwrap_or(200).min(e.max_tokens),
        overlap: a.overlap,
    };
    if a.max_tokens.is_some_and(|m| m > e.max_tokens) {
        eprintln!(
            "note: {} reads {} tokens per text; chunks are cut at that",
            e.dir.display(),
            e.max_tokens
        );
    }
    chunking.validate().map_err(anyhow::Error::msg)?;
    let hnsw = HnswParams {
        m: a.m,
        ef_construction: a.ef_construction,
        seed: 0,
    };
    hnsw.validate().map_err(anyhow::Error::msg)?;
    if a.ef_search == 0 {
        bail!("--ef-search must be at least 1");
    }
    let mut m = Manifest::new(e.info(), chunking, hnsw);
    m.ef_search = a.ef_search;
    m.exact_below = a.exact_below;
    if !lmkit_rag::pg::is_url(&a.output.to_string_lossy())
        && a.output.join("manifest.json").exists()
        && !a.overwrite
    {
        bail!(
            "{}: already holds an index; add to it with `lmkit index add`, or pass --overwrite to replace it",
            a.output.display()
        );
    }
    let (chunks, _) = prepare(&e, &a.ingest, chunking)?;
    let mut ix = Store::create(&a.output, m, a.overwrite)?;
    insert(&mut ix, chunks)?;
    ix.save()?;
    println!("{}: {} chunks", a.output.display(), ix.len()?);
    Ok(())
}

fn add(a: AddArgs) -> Result<()> {
    let mut ix = Store::open(&a.index)?;
    let e = Embedder::for_index(ix.manifest(), a.embedding_model.as_deref())?;
    let (chunks, sources) = prepare(&e, &a.ingest, ix.manifest().chunking)?;
    // The same files again: their old chunks go.
    let replaced = ix.delete(&Selector {
        paths: sources,
        ..Selector::default()
    })?;
    let ids = insert(&mut ix, chunks)?;
    ix.save()?;
    println!(
        "{}: added {} chunks{}; {} in all",
        a.index.display(),
        ids.len(),
        if replaced > 0 {
            format!(" (replacing {replaced} of the same sources)")
        } else {
            String::new()
        },
        ix.len()?
    );
    Ok(())
}

fn delete(a: DeleteArgs) -> Result<()> {
    let sel = Selector {
        sources: a.source.clone(),
        paths: Vec::new(),
        ids: a.id.clone(),
        filter: Filter::parse(&a.filter).map_err(anyhow::Error::msg)?,
    };
    if sel.is_empty() {
        bail!("say what to delete: --source PATH, --id N or --filter KEY=VALUE");
    }
    let mut ix = Store::open(&a.index)?;
    let n = ix.delete(&sel)?;
    if n > 0 {
        ix.save()?;
    }
    println!(
        "{}: deleted {n} chunks; {} left",
        a.index.display(),
        ix.len()?
    );
    Ok(())
}

fn search(a: SearchArgs) -> Result<()> {
    let mut ix = Store::open(&a.index)?;
    let opts = a.retrieval.options(10, &ix)?;
    let e = a.retrieval.embedder(&ix)?;
    let v = e.as_ref().map(|e| e.query(&a.query)).transpose()?;
    let found = ix.search(v.as_deref(), &a.query, &opts)?;
    for (i, f) in found.iter().enumerate() {
        if a.json {
            let line = serde_json::json!({
                "rank": i + 1,
                "score": f.score,
                "id": f.id,
                "source": f.source,
                "lines": f.lines,
                "meta": f.meta,
                "dense": f.dense.map(|(r, s)| serde_json::json!({"rank": r, "similarity": s})),
                "bm25": f.bm25.map(|(r, s)| serde_json::json!({"rank": r, "score": s})),
                "text": f.text,
            });
            println!("{line}");
        } else {
            let preview: String = f
                .text
                .chars()
                .take(160)
                .collect::<String>()
                .replace('\n', " ");
            println!(
                "{:>3}. {:.4}  {}:{}-{}  #{}\n     {}{}",
                i + 1,
                f.score,
                f.source,
                f.lines[0],
                f.lines[1],
                f.id,
                preview,
                if f.text.chars().count() > 160 {
                    "…"
                } else {
                    ""
                }
            );
        }
    }
    if found.is_empty() && !a.json {
        println!("(no results)");
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let mut ix = Store::open(&a.index)?;
    let (n, sources) = (ix.len()?, ix.sources()?);
    let m = ix.manifest();
    println!("index         {}", a.index.display());
    println!("chunks        {n} from {sources} sources");
    println!(
        "model         {} ({} dims, fingerprint {})",
        m.model.path, m.model.dim, m.model.fingerprint
    );
    println!(
        "chunking      at most {} tokens, {} overlapping",
        m.chunking.max_tokens, m.chunking.overlap
    );
    println!(
        "hnsw          m {}, ef_construction {}, ef_search {}; exact search up to {} chunks",
        m.hnsw.m, m.hnsw.ef_construction, m.ef_search, m.exact_below
    );
    println!("generation    {}", m.generation);
    Ok(())
}

/// `lmkit eval retrieval`.
pub fn eval_retrieval(
    index: &std::path::Path,
    questions: &std::path::Path,
    k: usize,
    modes: Option<&str>,
    embedding_model: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    use lmkit_rag::eval::{first_relevant, read_questions, score};
    if k == 0 {
        bail!("--top-k must be at least 1");
    }
    let mut ix = Store::open(index)?;
    let modes = modes.unwrap_or(match ix.default_mode() {
        Mode::Dense => "dense",
        _ => "dense,bm25,hybrid",
    });
    let modes: Vec<(String, Mode)> = modes
        .split(',')
        .map(|m| match m.trim() {
            "dense" => Ok(("dense".to_string(), Mode::Dense)),
            "bm25" => Ok(("bm25".to_string(), Mode::Bm25)),
            "hybrid" => Ok(("hybrid".to_string(), Mode::Hybrid)),
            other => bail!("--modes: `{other}` is not dense, bm25 or hybrid"),
        })
        .collect::<Result<_>>()?;
    let qs = read_questions(questions)?;
    let needs_vectors = modes.iter().any(|(_, m)| *m != Mode::Bm25);
    let vectors = if needs_vectors {
        let e = Embedder::for_index(ix.manifest(), embedding_model)?;
        let texts: Vec<String> = qs.iter().map(|q| q.question.clone()).collect();
        let bar = Bar::default();
        bar.begin("questions", texts.len() as u64, Unit::Items);
        let v = e.embed(&texts, 32, &|n| bar.set_position(n as u64))?;
        bar.finish();
        Some(v)
    } else {
        None
    };
    // Groups: all questions, then each language the questions name.
    let mut langs: Vec<String> = qs.iter().filter_map(|q| q.lang.clone()).collect();
    langs.sort();
    langs.dedup();
    let mut report = serde_json::Map::new();
    let mut rows = Vec::new();
    for (name, mode) in &modes {
        let opts = SearchOptions {
            k,
            mode: *mode,
            ..SearchOptions::default()
        };
        let mut ranks = Vec::with_capacity(qs.len());
        for (i, q) in qs.iter().enumerate() {
            let v = vectors.as_ref().map(|v| v[i].as_slice());
            let found = ix.search(v, &q.question, &opts)?;
            ranks.push(first_relevant(&found, q));
        }
        let mut groups = vec![("all".to_string(), score(&ranks, k))];
        for l in &langs {
            let r: Vec<Option<usize>> = qs
                .iter()
                .zip(&ranks)
                .filter(|(q, _)| q.lang.as_deref() == Some(l))
                .map(|(_, r)| *r)
                .collect();
            groups.push((l.clone(), score(&r, k)));
        }
        let mut m = serde_json::Map::new();
        for (g, s) in groups {
            rows.push(format!(
                "| {name} | {g} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                s.questions, s.hit_at_1, s.hit_at_5, s.hit_at_k, s.mrr
            ));
            m.insert(g, serde_json::to_value(s)?);
        }
        report.insert(name.clone(), Value::Object(m));
    }
    if json {
        println!("{}", Value::Object(report));
    } else {
        println!("| mode | questions | n | hit@1 | hit@5 | hit@{k} | MRR@{k} |");
        println!("|---|---|---|---|---|---|---|");
        for r in rows {
            println!("{r}");
        }
    }
    Ok(())
}
