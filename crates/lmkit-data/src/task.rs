//! Sharded runs: the per-document work of `prepare` split over independent tasks (array jobs of a
//! batch scheduler such as Slurm, or processes on one machine), then one merge.
//!
//! Every task reads the plan (`plan.json`: the inputs, their sizes, the pieces they are read in —
//! whole files, or byte ranges of plain .txt/.jsonl files larger than
//! [`PrepareOptions::task_split_bytes`] — which task reads which piece, and the options that
//! change the per-document work), takes its pieces, and writes one part file per piece
//! (`part-NNNNNN.bin`: each document after normalization, filters, language identification and
//! masking, with its content hash and MinHash signature). A part file appears only when its piece
//! is done, so a task that is killed or pre-empted resumes at the first piece without one; a
//! marker `task-IIIII-of-NNNNN.done` says the task is complete. The merge reads the
//! parts in input order and takes the decisions that depend on earlier documents (exact and
//! near-duplicate removal, the split) exactly as a single run does — the output is byte-identical
//! to `prepare` over the same inputs, whatever the number of tasks.

use crate::error::{DataError, Result};
use crate::{
    Analyzer, DropReason, FileNotes, PrepareOptions, Processed, Progress, Report, State, Unit,
};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"LMKPART2";
const TAG_DOC: u8 = 1;
const TAG_NOTES: u8 = 2;

/// Which task this process is, of how many, and where the tasks keep their parts.
#[derive(Clone, Debug)]
pub struct TaskSpec {
    pub task: usize,
    pub tasks: usize,
    pub dir: PathBuf,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Plan {
    tasks: usize,
    inputs: Vec<PlannedInput>,
    /// In input order: the pieces the inputs are read in, and by which task.
    pieces: Vec<Piece>,
    /// The options that change the per-document work (a merge or task with other ones is refused).
    analysis: serde_json::Value,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct PlannedInput {
    path: PathBuf,
    bytes: u64,
}

/// A part of the work: a whole input file, or the lines that start in a byte range of one.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Piece {
    input: usize,
    range: Option<(u64, u64)>,
    task: usize,
}

/// What one task did.
#[derive(Debug, Default, Serialize)]
pub struct TaskReport {
    pub task: usize,
    pub tasks: usize,
    /// Pieces (input files, or byte ranges of large ones) this task read now.
    pub pieces_done: usize,
    /// Pieces already done by an earlier, interrupted run of this task.
    pub pieces_resumed: usize,
    pub docs: u64,
    pub seconds: f64,
}

fn analysis_options(o: &PrepareOptions) -> serde_json::Value {
    serde_json::json!({
        "txt_unit": o.txt_unit,
        "text_field": o.text_field,
        "skip_bad": o.skip_bad,
        "normalize": o.normalize,
        "filters": o.filters,
        "language": o.language,
        "pii": o.pii,
        "c4": o.c4,
        "url_blocklist": o.url_blocklist,
        "url_field": o.url_field,
        "near_dedup": o.near_dedup,
        "report_samples": o.report_samples,
        "task_split_bytes": o.task_split_bytes,
    })
}

/// Inputs to pieces (a plain .txt/.jsonl file larger than `opts.task_split_bytes` is cut into
/// equal byte ranges no larger), and pieces to tasks: largest first, each to the task with the
/// fewest bytes so far (ties: lowest task), so tasks get similar work whatever the file sizes.
fn plan(inputs: &[PathBuf], tasks: usize, opts: &PrepareOptions) -> Result<Plan> {
    let mut sized = Vec::with_capacity(inputs.len());
    for p in inputs {
        if p.as_os_str() == "-" {
            return Err(DataError::BadOption {
                name: "input",
                value: "-".into(),
                msg: "standard input cannot be split over tasks; give files".into(),
            });
        }
        let bytes = std::fs::metadata(p).map_err(|e| DataError::io(p, e))?.len();
        sized.push(bytes);
    }
    let ingest = crate::ingest_options(opts);
    // Pieces of at least 64 KiB: a tiny --task-split-mb must not plan millions of them.
    let split = opts.task_split_bytes.max(64 << 10);
    let mut pieces = Vec::new();
    for (input, (p, &bytes)) in inputs.iter().zip(&sized).enumerate() {
        if bytes > split && crate::ingest::splittable(p, &ingest) {
            let n = bytes.div_ceil(split);
            pieces.extend((0..n).map(|k| Piece {
                input,
                range: Some((cut(bytes, k, n), cut(bytes, k + 1, n))),
                task: 0,
            }));
        } else {
            pieces.push(Piece {
                input,
                range: None,
                task: 0,
            });
        }
    }
    let size = |p: &Piece| p.range.map_or(sized[p.input], |(a, b)| b - a);
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(size(&pieces[i])), i));
    let mut load = vec![0u64; tasks];
    for i in order {
        let t = (0..tasks).min_by_key(|&t| (load[t], t)).unwrap_or(0);
        load[t] += size(&pieces[i]);
        pieces[i].task = t;
    }
    Ok(Plan {
        tasks,
        inputs: inputs
            .iter()
            .zip(sized)
            .map(|(p, bytes)| PlannedInput {
                path: p.clone(),
                bytes,
            })
            .collect(),
        pieces,
        analysis: analysis_options(opts),
    })
}

/// Where the `k`-th of `n` equal cuts of `bytes` falls.
fn cut(bytes: u64, k: u64, n: u64) -> u64 {
    (u128::from(bytes) * u128::from(k) / u128::from(n)) as u64
}

impl Plan {
    fn piece_bytes(&self, k: usize) -> u64 {
        let p = &self.pieces[k];
        p.range.map_or(self.inputs[p.input].bytes, |(a, b)| b - a)
    }
}

fn plan_path(dir: &Path) -> PathBuf {
    dir.join("plan.json")
}

fn part_path(dir: &Path, piece: usize) -> PathBuf {
    dir.join(format!("part-{piece:06}.bin"))
}

fn marker_path(dir: &Path, task: usize, tasks: usize) -> PathBuf {
    dir.join(format!("task-{task:05}-of-{tasks:05}.done"))
}

/// Writes the plan, or checks that the one there is the same run's.
fn settle_plan(dir: &Path, plan: &Plan) -> Result<()> {
    let path = plan_path(dir);
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let theirs: Plan = serde_json::from_str(&text).map_err(|e| DataError::BadFile {
            path: path.clone(),
            msg: format!("not a task plan ({e}); remove the directory or give another --tasks-dir"),
        })?;
        if &theirs != plan {
            let what = if theirs.tasks != plan.tasks {
                format!("{} tasks, not {}", theirs.tasks, plan.tasks)
            } else if theirs.inputs != plan.inputs {
                "other input files (or they changed size)".to_string()
            } else if theirs.pieces != plan.pieces {
                "another --task-split-mb".to_string()
            } else {
                "other options for the per-document steps".to_string()
            };
            return Err(DataError::BadFile {
                path,
                msg: format!(
                    "these tasks belong to another run ({what}); remove the directory to start \
                     over, or give another --tasks-dir"
                ),
            });
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let json = serde_json::to_vec_pretty(plan).map_err(|e| DataError::io(&path, e.into()))?;
    lmkit_core::write_atomic_bytes(&path, &json)?;
    Ok(())
}

fn check_spec(spec: &TaskSpec) -> Result<()> {
    if spec.tasks == 0 || spec.task >= spec.tasks {
        return Err(DataError::BadOption {
            name: "task",
            value: format!("{} of {}", spec.task, spec.tasks),
            msg: "the task index must be below the task count (0-based)".into(),
        });
    }
    Ok(())
}

/// Runs task `spec.task`: the per-document steps over its share of `inputs`, resuming after the
/// pieces an interrupted run of it finished.
pub fn run_task(
    inputs: &[PathBuf],
    spec: &TaskSpec,
    opts: &PrepareOptions,
    progress: &dyn Progress,
) -> Result<TaskReport> {
    crate::validate(opts)?;
    check_spec(spec)?;
    let t0 = std::time::Instant::now();
    let plan = plan(inputs, spec.tasks, opts)?;
    settle_plan(&spec.dir, &plan)?;
    // This task's unfinished part files (from a run that was killed) are thrown away.
    let scratch = spec.dir.join(format!(".task-{:05}", spec.task));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(|e| DataError::io(&scratch, e))?;
    }
    std::fs::create_dir_all(&scratch).map_err(|e| DataError::io(&scratch, e))?;
    let mine: Vec<usize> = (0..plan.pieces.len())
        .filter(|&k| plan.pieces[k].task == spec.task)
        .collect();
    let mut report = TaskReport {
        task: spec.task,
        tasks: spec.tasks,
        ..Default::default()
    };
    let todo: Vec<usize> = mine
        .iter()
        .copied()
        .filter(|&k| !part_path(&spec.dir, k).exists())
        .collect();
    report.pieces_resumed = mine.len() - todo.len();
    let total = todo.iter().map(|&k| plan.piece_bytes(k)).sum();
    let mut analyzer = Analyzer::new(opts);
    // The merge writes the shards; part files do not carry JSON lines.
    analyzer.json_lines = false;
    progress.begin(
        &format!("task {} of {}", spec.task, spec.tasks),
        total,
        Unit::Bytes,
    );
    for k in todo {
        let path = part_path(&spec.dir, k);
        let mut file = lmkit_core::AtomicFile::create_in(&scratch)?;
        let w = file.writer();
        w.write_all(MAGIC).map_err(|e| DataError::io(&path, e))?;
        let mut docs = 0u64;
        let piece = &plan.pieces[k];
        let range = piece.range.map(|(a, b)| a..b);
        let notes = analyzer.read_file(&inputs[piece.input], range, progress, &mut |batch| {
            docs += batch.len() as u64;
            for p in &batch {
                encode(w, p).map_err(|e| DataError::io(&path, e))?;
            }
            Ok(())
        })?;
        let notes = serde_json::to_vec(&notes).map_err(|e| DataError::io(&path, e.into()))?;
        w.write_all(&[TAG_NOTES])
            .and_then(|_| w.write_all(&(notes.len() as u64).to_le_bytes()))
            .and_then(|_| w.write_all(&notes))
            .map_err(|e| DataError::io(&path, e))?;
        file.commit(&path)?;
        report.pieces_done += 1;
        report.docs += docs;
    }
    progress.finish();
    let _ = std::fs::remove_dir_all(&scratch);
    report.seconds = t0.elapsed().as_secs_f64();
    let marker = marker_path(&spec.dir, spec.task, spec.tasks);
    let json = serde_json::to_vec_pretty(&report).map_err(|e| DataError::io(&marker, e.into()))?;
    lmkit_core::write_atomic_bytes(&marker, &json)?;
    Ok(report)
}

/// Merges the parts of every task of `dir` into `out_dir`: the same output as [`crate::prepare`]
/// over `inputs`. The tasks' directory is removed when the merge succeeds.
pub fn merge(
    inputs: &[PathBuf],
    dir: &Path,
    tasks: usize,
    out_dir: &Path,
    opts: &PrepareOptions,
    progress: &dyn Progress,
) -> Result<Report> {
    crate::validate(opts)?;
    let t0 = std::time::Instant::now();
    let plan = plan(inputs, tasks.max(1), opts)?;
    if !plan_path(dir).exists() {
        return Err(DataError::BadFile {
            path: dir.to_path_buf(),
            msg: "no tasks were run here (no plan.json): run the tasks first (--task I --tasks N)"
                .into(),
        });
    }
    settle_plan(dir, &plan)?;
    let missing: Vec<String> = (0..tasks)
        .filter(|&t| !marker_path(dir, t, tasks).exists())
        .map(|t| t.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(DataError::BadFile {
            path: dir.to_path_buf(),
            msg: format!(
                "task(s) {} of {tasks} have not finished (no task-…-of-….done marker): run them \
                 again — they resume where they stopped — then merge",
                missing.join(", ")
            ),
        });
    }
    let output = lmkit_core::OutputDir::create(
        out_dir,
        "an output of `lmkit data prepare`",
        crate::is_prepare_output,
    )?;
    let mut st = State::new(inputs, output.path(), opts)?;
    st.report.input_bytes = plan.inputs.iter().map(|i| i.bytes).sum();
    let parts_bytes = (0..plan.pieces.len())
        .filter_map(|k| std::fs::metadata(part_path(dir, k)).ok())
        .map(|m| m.len())
        .sum();
    progress.begin("merging", parts_bytes, Unit::Bytes);
    for k in 0..plan.pieces.len() {
        let path = part_path(dir, k);
        let notes = read_part(&path, progress, &mut |batch| st.decide(batch, opts))?;
        st.add_notes(notes, opts.report_samples);
    }
    progress.finish();
    let report = st.finish(output, inputs, t0)?;
    std::fs::remove_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    Ok(report)
}

fn put(w: &mut dyn Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u64).to_le_bytes())?;
    w.write_all(bytes)
}

fn encode(w: &mut dyn Write, p: &Processed) -> std::io::Result<()> {
    w.write_all(&[TAG_DOC])?;
    put(w, p.source.as_bytes())?;
    w.write_all(&p.read_bytes.to_le_bytes())?;
    // A dropped document keeps only what the report shows of it: its preview and its length.
    let text = match p.drop {
        Some(_) => match p.text.char_indices().nth(crate::PREVIEW_CHARS + 1) {
            Some((end, _)) => &p.text[..end],
            None => &p.text,
        },
        None => &p.text,
    };
    put(w, text.as_bytes())?;
    w.write_all(&(p.len() as u64).to_le_bytes())?;
    w.write_all(&p.c4_lines.to_le_bytes())?;
    w.write_all(&p.dates.to_le_bytes())?;
    w.write_all(&[u8::from(p.mojibake) | u8::from(p.changed) << 1])?;
    put(w, p.language.unwrap_or("").as_bytes())?;
    match p.pii {
        Some(c) => {
            w.write_all(&[1])?;
            for n in c {
                w.write_all(&n.to_le_bytes())?;
            }
        }
        None => w.write_all(&[0])?,
    }
    let drop = p.drop.map(DropReason::key).unwrap_or_default();
    put(w, drop.as_bytes())?;
    w.write_all(&p.exact.to_le_bytes())?;
    let sig = p.signature.as_deref().unwrap_or(&[]);
    w.write_all(&(sig.len() as u32).to_le_bytes())?;
    for v in sig {
        w.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

/// Reads a part file, passing its documents to `out` in batches; returns the file's notes.
fn read_part(
    path: &Path,
    progress: &dyn Progress,
    out: &mut dyn FnMut(Vec<Processed>) -> Result<()>,
) -> Result<FileNotes> {
    let corrupt = |msg: &str| DataError::BadFile {
        path: path.to_path_buf(),
        msg: format!(
            "corrupt part file ({msg}); delete it and run its task again (it redoes that file)"
        ),
    };
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| corrupt("no header"))?;
    if &magic != MAGIC {
        return Err(corrupt("not a part file"));
    }
    let mut batch = Vec::with_capacity(crate::BATCH);
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(|_| corrupt("ends early"))?;
        match tag[0] {
            TAG_DOC => {
                let (p, n) = decode(&mut r).map_err(|e| corrupt(&e))?;
                progress.advance(n);
                batch.push(p);
                if batch.len() >= crate::BATCH {
                    out(std::mem::take(&mut batch))?;
                }
            }
            TAG_NOTES => {
                let bytes = get(&mut r).map_err(|e| corrupt(&e))?;
                if !batch.is_empty() {
                    out(batch)?;
                }
                if r.fill_buf().map_err(|e| DataError::io(path, e))?.is_empty() {
                    return serde_json::from_slice(&bytes).map_err(|_| corrupt("bad notes"));
                }
                return Err(corrupt("bytes after the end"));
            }
            _ => return Err(corrupt("unknown record")),
        }
    }
}

/// Lengths read from a part file are checked against this before allocating.
const MAX_FIELD: u64 = 1 << 34;

fn get(r: &mut dyn Read) -> std::result::Result<Vec<u8>, String> {
    let n = u64_of(r)?;
    if n > MAX_FIELD {
        return Err(format!("a field of {n} bytes"));
    }
    let mut v = Vec::new();
    r.take(n).read_to_end(&mut v).map_err(|e| e.to_string())?;
    if v.len() as u64 != n {
        return Err("ends inside a field".into());
    }
    Ok(v)
}

fn u64_of(r: &mut dyn Read) -> std::result::Result<u64, String> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(|_| "ends early".to_string())?;
    Ok(u64::from_le_bytes(b))
}

fn u32_of(r: &mut dyn Read) -> std::result::Result<u32, String> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|_| "ends early".to_string())?;
    Ok(u32::from_le_bytes(b))
}

fn string_of(r: &mut dyn Read) -> std::result::Result<String, String> {
    String::from_utf8(get(r)?).map_err(|_| "text that is not UTF-8".to_string())
}

/// One document record (after its tag) and the bytes it took.
fn decode(r: &mut dyn Read) -> std::result::Result<(Processed, u64), String> {
    let source = string_of(r)?;
    let read_bytes = u64_of(r)?;
    let text = string_of(r)?;
    let full_len = u64_of(r)? as usize;
    if full_len < text.len() {
        return Err(format!(
            "a text of {} bytes said to have {full_len}",
            text.len()
        ));
    }
    let full_len = (full_len > text.len()).then_some(full_len);
    let c4_lines = u32_of(r)?;
    let dates = u32_of(r)?;
    let mut flags = [0u8; 1];
    r.read_exact(&mut flags).map_err(|_| "ends early")?;
    let language = string_of(r)?;
    let language = match language.as_str() {
        "" => None,
        "und" => Some("und"),
        code => Some(
            whatlang::Lang::from_code(code)
                .ok_or_else(|| format!("unknown language {code:?}"))?
                .code(),
        ),
    };
    let mut has = [0u8; 1];
    r.read_exact(&mut has).map_err(|_| "ends early")?;
    let pii = if has[0] == 1 {
        let mut c = [0u32; 5];
        for n in &mut c {
            *n = u32_of(r)?;
        }
        Some(c)
    } else {
        None
    };
    let drop = string_of(r)?;
    let drop = if drop.is_empty() {
        None
    } else {
        Some(
            serde_json::from_value(serde_json::Value::String(drop.clone()))
                .map_err(|_| format!("unknown filter {drop:?}"))?,
        )
    };
    let mut exact = [0u8; 16];
    r.read_exact(&mut exact).map_err(|_| "ends early")?;
    let n = u32_of(r)? as usize;
    if n > 1 << 16 {
        return Err(format!("a signature of {n} values"));
    }
    let signature = if n == 0 {
        None
    } else {
        Some(
            (0..n)
                .map(|_| u32_of(r))
                .collect::<std::result::Result<Vec<_>, _>>()?,
        )
    };
    let size = 8 * 4 + source.len() + text.len() + 4 * n + 64;
    Ok((
        Processed {
            source,
            read_bytes,
            text,
            full_len,
            c4_lines,
            dates,
            mojibake: flags[0] & 1 != 0,
            changed: flags[0] & 2 != 0,
            language,
            pii,
            drop,
            exact: u128::from_le_bytes(exact),
            signature,
            json: None,
        },
        size as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dropped document goes into a part file as its preview and length; a kept one whole.
    #[test]
    fn part_records_keep_what_the_report_needs() {
        let long: String = "ab가".repeat(4000);
        for (drop, text) in [
            (None, long.clone()),
            (Some(crate::DropReason::TooShort), long.clone()),
            (Some(crate::DropReason::TooShort), "short".to_string()),
        ] {
            let p = Processed {
                source: "f.txt:3".into(),
                read_bytes: 7,
                text: text.clone(),
                full_len: None,
                c4_lines: 1,
                mojibake: false,
                changed: true,
                language: Some("eng"),
                pii: None,
                dates: 0,
                drop,
                exact: 42,
                signature: None,
                json: None,
            };
            let mut buf = Vec::new();
            encode(&mut buf, &p).unwrap();
            let (q, _) = decode(&mut &buf[1..]).unwrap();
            assert_eq!(q.len(), text.len());
            assert_eq!(crate::preview(&q.text), crate::preview(&text));
            if drop.is_some() && text.len() > 1000 {
                assert!(
                    buf.len() < 600,
                    "{} bytes for a dropped document",
                    buf.len()
                );
            } else {
                assert_eq!(q.text, text);
            }
            assert_eq!((q.source, q.drop, q.exact), (p.source, p.drop, p.exact));
        }
    }
}
