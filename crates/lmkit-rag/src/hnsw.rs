//! Hierarchical navigable small-world graphs (Malkov & Yashunin 2018, arXiv:1603.09320) over
//! unit vectors compared by inner product (cosine similarity).
//!
//! Our own rather than a crate's, because the index needs four things together that no
//! maintained Rust crate offered at once: a flat layout that is searched straight from a memory
//! map, insertion into a saved graph, deletion that repairs the graph instead of leaving
//! tombstones that slow every later search, and search under a filter that keeps recall (only
//! allowed nodes enter the result set while the walk goes on through all of them, as hnswlib
//! does; the index switches to exact search when a filter leaves few nodes).
//!
//! Insertion follows the paper's algorithm 1 with the neighbour-selection heuristic of its
//! algorithm 4 (as hnswlib's `getNeighborsByHeuristic2`): `m` links per node on upper layers,
//! `2·m` on layer 0. Nodes are inserted in parallel, each list behind its own lock.

use crate::words::Words;
use crate::{RagError, Result};
use lmkit_kernels::vector::dot;
use rayon::prelude::*;
use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Mutex;

/// An empty slot in a neighbour list.
pub const NONE: u32 = u32::MAX;
const MAGIC: u32 = u32::from_le_bytes(*b"LMKH");
const VERSION: u32 = 1;
const HEADER: usize = 8;
/// No node is given more layers than this (at m = 16, a level above 8 has odds 16⁻⁸).
const MAX_LEVEL: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HnswParams {
    /// Links per node on the upper layers (twice as many on layer 0).
    pub m: usize,
    /// Candidates kept while inserting a node.
    pub ef_construction: usize,
    /// Seed of the layer draw.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 200,
            seed: 0,
        }
    }
}

impl HnswParams {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(2..=128).contains(&self.m) {
            return Err(format!("hnsw m = {} (2 to 128)", self.m));
        }
        if self.ef_construction < self.m || self.ef_construction > 10_000 {
            return Err(format!(
                "hnsw ef_construction = {} (from m = {} to 10000)",
                self.ef_construction, self.m
            ));
        }
        Ok(())
    }
}

/// Vectors of `dim` values laid end to end.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl<'a> Rows<'a> {
    #[inline]
    pub fn row(&self, i: u32) -> &'a [f32] {
        let i = i as usize;
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    pub fn len(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Asks for the start of row `i` (the hardware prefetcher follows with the rest; asking for
    /// every line of a 384-dimension row measured slower).
    #[inline]
    fn prefetch(&self, i: u32) {
        lmkit_kernels::simd::prefetch(self.data.as_ptr().wrapping_add(i as usize * self.dim));
    }
}

/// A node and its distance (1 − cosine) to the query; ordered by distance, then id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Near {
    pub d: f32,
    pub id: u32,
}

impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Near {
    fn cmp(&self, o: &Self) -> Ordering {
        self.d.total_cmp(&o.d).then(self.id.cmp(&o.id))
    }
}

#[inline]
fn distance(a: &[f32], b: &[f32]) -> f32 {
    1.0 - dot(a, b)
}

/// What one walk needs besides the graph, kept between walks so that a search allocates
/// little: the nodes seen (a stamp per node, so that clearing is a counter increment), the two
/// queues and a neighbour buffer.
#[derive(Default)]
pub(crate) struct Visited {
    stamp: Vec<u32>,
    now: u32,
    candidates: BinaryHeap<Reverse<Near>>,
    results: BinaryHeap<Near>,
    buf: Vec<u32>,
    dists: Vec<f32>,
}

impl Visited {
    fn reset(&mut self, n: usize) {
        if self.stamp.len() < n {
            self.stamp.resize(n, 0);
        }
        self.now = self.now.wrapping_add(1);
        if self.now == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.now = 1;
        }
    }
    #[inline]
    fn insert(&mut self, i: u32) -> bool {
        let s = &mut self.stamp[i as usize];
        let new = *s != self.now;
        *s = self.now;
        new
    }
}

thread_local! {
    static VISITED: RefCell<Visited> = RefCell::new(Visited::default());
}

/// Read access to neighbour lists, frozen or being built.
trait Links: Sync {
    /// Asks for the start of node `i`'s list on `level` (the next to be walked).
    fn prefetch_links(&self, _i: u32, _level: usize) {}
    fn neighbors_into(&self, i: u32, level: usize, out: &mut Vec<u32>);
    /// The neighbours of `i` on `level` not yet in `visited`, now marked as seen.
    fn unvisited_into(&self, i: u32, level: usize, visited: &mut Visited, out: &mut Vec<u32>) {
        self.neighbors_into(i, level, out);
        out.retain(|&nb| visited.insert(nb));
    }
    fn nodes(&self) -> usize;
}

/// The layer-0 walk of the paper's algorithm 2 (and the upper-layer one during insertion):
/// the `ef` nearest nodes that `allow` admits, nearest first. The walk goes through nodes that
/// are not admitted too, so a filter narrows the results without cutting the graph.
#[allow(clippy::too_many_arguments)]
fn search_layer(
    links: &impl Links,
    rows: Rows,
    q: &[f32],
    entry: &[Near],
    ef: usize,
    level: usize,
    allow: Option<&(dyn Fn(u32) -> bool + Sync)>,
    visited: &mut Visited,
) -> Vec<Near> {
    visited.reset(links.nodes());
    let mut candidates = std::mem::take(&mut visited.candidates);
    let mut results = std::mem::take(&mut visited.results);
    let mut buf = std::mem::take(&mut visited.buf);
    let mut dists = std::mem::take(&mut visited.dists);
    candidates.clear();
    results.clear();
    let admit = |i: u32| allow.is_none_or(|f| f(i));
    for &e in entry {
        if visited.insert(e.id) {
            candidates.push(Reverse(e));
            if admit(e.id) {
                results.push(e);
            }
        }
    }
    while results.len() > ef {
        results.pop();
    }
    while let Some(Reverse(c)) = candidates.pop() {
        if results.len() >= ef && results.peek().is_some_and(|w| c.d > w.d) {
            break;
        }
        links.unvisited_into(c.id, level, visited, &mut buf);
        // Most neighbours were seen already: only the others' rows are fetched, all of them
        // asked for at once, and the list of the candidate walked next while they come.
        for &nb in buf.iter() {
            rows.prefetch(nb);
        }
        if let Some(Reverse(next)) = candidates.peek() {
            links.prefetch_links(next.id, level);
        }
        distances(rows, q, &buf, &mut dists);
        for (&nb, &d) in buf.iter().zip(&dists) {
            let worst = results.peek().map_or(f32::INFINITY, |w| w.d);
            if results.len() < ef || d < worst {
                let n = Near { d, id: nb };
                candidates.push(Reverse(n));
                if admit(nb) {
                    results.push(n);
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
    }
    let mut out: Vec<Near> = results.drain().collect();
    out.sort_unstable();
    visited.candidates = candidates;
    visited.results = results;
    visited.buf = buf;
    visited.dists = dists;
    out
}

/// The distances from `q` to rows `ids` into `out`: four rows at a time read side by side (their
/// loads overlap; one dot product after another waits on each row in turn: ~6–10% more queries
/// per second), the rest one by one.
fn distances(rows: Rows, q: &[f32], ids: &[u32], out: &mut Vec<f32>) {
    out.clear();
    let mut quads = ids.chunks_exact(4);
    for c in &mut quads {
        let r = |j: usize| rows.row(c[j]);
        let s = lmkit_kernels::vector::dot_rows4(q, [r(0), r(1), r(2), r(3)]);
        out.extend(s.map(|s| 1.0 - s));
    }
    out.extend(quads.remainder().iter().map(|&i| distance(q, rows.row(i))));
}

/// Greedy descent through one upper layer: the nearest node reachable from `cur`.
fn greedy(
    links: &impl Links,
    rows: Rows,
    q: &[f32],
    mut cur: Near,
    level: usize,
    buf: &mut Vec<u32>,
) -> Near {
    loop {
        let mut moved = false;
        links.neighbors_into(cur.id, level, buf);
        for &nb in buf.iter() {
            let d = distance(q, rows.row(nb));
            if d < cur.d {
                cur = Near { d, id: nb };
                moved = true;
            }
        }
        if !moved {
            return cur;
        }
    }
}

/// The paper's algorithm 4 without extension or kept pruned links: walking the candidates
/// nearest first, keep one only if it is nearer to the base than to every one kept so far.
fn select(rows: Rows, sorted: &[Near], m: usize) -> Vec<u32> {
    if sorted.len() <= m {
        return sorted.iter().map(|n| n.id).collect();
    }
    let mut out: Vec<Near> = Vec::with_capacity(m);
    for c in sorted {
        if out.len() >= m {
            break;
        }
        let v = rows.row(c.id);
        if out.iter().all(|r| distance(v, rows.row(r.id)) >= c.d) {
            out.push(*c);
        }
    }
    out.iter().map(|n| n.id).collect()
}

/// At most `m` of `ids` as the links of a node at `base`: nearest first, by [`select`].
fn prune(rows: Rows, base: &[f32], ids: impl Iterator<Item = u32>, m: usize) -> Vec<u32> {
    let mut c: Vec<Near> = ids
        .map(|x| Near {
            d: distance(base, rows.row(x)),
            id: x,
        })
        .collect();
    c.sort_unstable();
    select(rows, &c, m)
}

/// The layer a node tops out at: ⌊−ln(u)·mL⌋ with mL = 1/ln(m), u drawn from (seed, node).
fn draw_level(seed: u64, node: u64, m: usize) -> usize {
    let mut z = seed ^ node.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    ((-u.ln() / (m as f64).ln()) as usize).min(MAX_LEVEL)
}

/// A graph being built or changed: one locked list per node and layer.
pub struct Builder {
    m: usize,
    ef_construction: usize,
    seed: u64,
    levels: Vec<u8>,
    links: Vec<Vec<Mutex<Vec<u32>>>>,
    top: Mutex<(u32, usize)>,
}

fn lock(m: &Mutex<Vec<u32>>) -> std::sync::MutexGuard<'_, Vec<u32>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Links for Builder {
    fn neighbors_into(&self, i: u32, level: usize, out: &mut Vec<u32>) {
        out.clear();
        if let Some(l) = self.links[i as usize].get(level) {
            out.extend_from_slice(&lock(l));
        }
    }
    fn nodes(&self) -> usize {
        self.levels.len()
    }
}

impl Builder {
    pub fn new(params: HnswParams) -> Builder {
        Builder {
            m: params.m,
            ef_construction: params.ef_construction,
            seed: params.seed,
            levels: Vec::new(),
            links: Vec::new(),
            top: Mutex::new((NONE, 0)),
        }
    }

    /// A builder holding the nodes and links of `g`, to insert into or delete from.
    pub fn from_graph(g: &Graph, params: HnswParams) -> Builder {
        let mut b = Builder::new(params);
        b.m = g.m;
        let n = g.len();
        b.levels = (0..n as u32).map(|i| g.level(i) as u8).collect();
        b.links = (0..n as u32)
            .map(|i| {
                (0..=g.level(i))
                    .map(|l| Mutex::new(g.neighbors(i, l).to_vec()))
                    .collect()
            })
            .collect();
        b.top = Mutex::new((g.entry, g.max_level));
        b
    }

    fn m0(&self) -> usize {
        2 * self.m
    }

    /// Inserts nodes `len()..rows.len()` of `rows` (rows before them are already in the graph),
    /// on `threads` threads of the current pool; `progress` is told each inserted count.
    pub fn insert_all(&mut self, rows: Rows, progress: &(dyn Fn(usize) + Sync)) {
        let start = self.levels.len();
        let n = rows.len();
        for i in start..n {
            let l = draw_level(self.seed, i as u64, self.m);
            self.levels.push(l as u8);
            self.links
                .push((0..=l).map(|_| Mutex::new(Vec::new())).collect());
        }
        if start == n {
            return;
        }
        let mut first = start;
        if lock_top(&self.top).0 == NONE {
            *self.top.lock().unwrap_or_else(|p| p.into_inner()) =
                (start as u32, self.levels[start] as usize);
            first += 1;
        }
        // Every thread takes the next node in order (as hnswlib does): the graph grows as it
        // would one node at a time. Splitting the range into a part per thread, each inserted
        // from its start, measurably lowered recall.
        let next = AtomicUsize::new(first);
        let this = &*self;
        rayon::broadcast(|_| {
            let mut vis = Visited::default();
            loop {
                let i = next.fetch_add(1, AtomicOrdering::Relaxed);
                if i >= n {
                    break;
                }
                this.insert(rows, i as u32, &mut vis);
                let d = i + 1 - first;
                if d.is_multiple_of(1024) {
                    progress(d);
                }
            }
        });
        progress(n - first);
    }

    fn insert(&self, rows: Rows, i: u32, vis: &mut Visited) {
        let l = self.levels[i as usize] as usize;
        let q = rows.row(i);
        let (ep, top) = lock_top(&self.top);
        let mut cur = Near {
            d: distance(q, rows.row(ep)),
            id: ep,
        };
        for lc in (l + 1..=top).rev() {
            cur = greedy(self, rows, q, cur, lc, &mut vis.buf);
        }
        let mut entry = vec![cur];
        for lc in (0..=l.min(top)).rev() {
            let w = search_layer(self, rows, q, &entry, self.ef_construction, lc, None, vis);
            let max = if lc == 0 { self.m0() } else { self.m };
            let chosen = select(rows, &w, self.m);
            {
                // Another thread's node may have found this one on the layer above and linked
                // itself here already: its link is kept, not overwritten (the list is pruned as
                // a full one is).
                let mut own = lock(&self.links[i as usize][lc]);
                let mut all = chosen.clone();
                all.extend(own.iter().filter(|x| !chosen.contains(x)));
                if all.len() > max {
                    all = prune(rows, q, all.into_iter(), max);
                }
                *own = all;
            }
            for &s in &chosen {
                let mut list = lock(&self.links[s as usize][lc]);
                if list.contains(&i) {
                    continue;
                }
                if list.len() < max {
                    list.push(i);
                } else {
                    let all = list.iter().copied().chain([i]);
                    *list = prune(rows, rows.row(s), all, max);
                }
            }
            entry = w;
        }
        if l > top {
            let mut t = self.top.lock().unwrap_or_else(|p| p.into_inner());
            if l > t.1 {
                *t = (i, l);
            }
        }
    }

    /// Removes the nodes marked in `dead`, relinking each survivor that pointed at one with the
    /// best of its surviving links and the removed nodes' links (so no search passes through a
    /// removed node and none slows down); returns the graph renumbered over the survivors, in
    /// order, and the new number of each old node (`NONE` for removed ones).
    pub fn remove(self, rows: Rows, dead: &[bool]) -> (Graph, Vec<u32>) {
        let n = self.levels.len();
        let this = &self;
        for lc in 0..=MAX_LEVEL {
            (0..n as u32).into_par_iter().for_each(|u| {
                if dead[u as usize] || (this.levels[u as usize] as usize) < lc {
                    return;
                }
                let list = lock(&this.links[u as usize][lc]).clone();
                if !list.iter().any(|&x| dead[x as usize]) {
                    return;
                }
                let mut cand: Vec<u32> = Vec::new();
                let mut seen = rustc_hash::FxHashSet::default();
                let mut stack: Vec<(u32, usize)> = list.iter().map(|&x| (x, 0)).collect();
                while let Some((x, depth)) = stack.pop() {
                    if x == u || !seen.insert(x) {
                        continue;
                    }
                    if !dead[x as usize] {
                        cand.push(x);
                    } else if depth < 2 {
                        for &y in lock(&this.links[x as usize][lc]).iter() {
                            stack.push((y, depth + 1));
                        }
                    }
                }
                let max = if lc == 0 { this.m0() } else { this.m };
                *lock(&this.links[u as usize][lc]) =
                    prune(rows, rows.row(u), cand.iter().copied(), max);
            });
        }
        let mut remap = vec![NONE; n];
        let mut next = 0u32;
        for (i, r) in remap.iter_mut().enumerate() {
            if !dead[i] {
                *r = next;
                next += 1;
            }
        }
        let (entry, _) = lock_top(&self.top);
        let entry = if entry != NONE && !dead[entry as usize] {
            entry
        } else {
            // The survivor on the highest layer (the first of them).
            (0..n)
                .filter(|&i| !dead[i])
                .max_by_key(|&i| (self.levels[i], Reverse(i)))
                .map_or(NONE, |i| i as u32)
        };
        let g = self.freeze_with(&remap, entry);
        (g, remap)
    }

    /// The searchable graph.
    pub fn freeze(self) -> Graph {
        let remap: Vec<u32> = (0..self.levels.len() as u32).collect();
        let entry = lock_top(&self.top).0;
        self.freeze_with(&remap, entry)
    }

    fn freeze_with(self, remap: &[u32], entry: u32) -> Graph {
        let (m, m0) = (self.m, self.m0());
        let keep: Vec<usize> = (0..self.levels.len())
            .filter(|&i| remap[i] != NONE)
            .collect();
        let n = keep.len();
        let max_level = keep
            .iter()
            .map(|&i| self.levels[i] as usize)
            .max()
            .unwrap_or(0);
        let upper_len: usize = keep.iter().map(|&i| self.levels[i] as usize * m).sum();
        let mut w = vec![NONE; HEADER + 2 * n + n * m0 + upper_len];
        let entry = if entry == NONE {
            NONE
        } else {
            remap[entry as usize]
        };
        w[..HEADER].copy_from_slice(&[
            MAGIC,
            VERSION,
            n as u32,
            m as u32,
            m0 as u32,
            entry,
            max_level as u32,
            upper_len as u32,
        ]);
        let (lv, rest) = w[HEADER..].split_at_mut(n);
        let (starts, rest) = rest.split_at_mut(n);
        let (level0, upper) = rest.split_at_mut(n * m0);
        let mut at = 0usize;
        for (new, &old) in keep.iter().enumerate() {
            let l = self.levels[old] as usize;
            lv[new] = l as u32;
            starts[new] = at as u32;
            for (lc, list) in self.links[old].iter().enumerate() {
                let ids: Vec<u32> = lock(list)
                    .iter()
                    .map(|&x| remap[x as usize])
                    .filter(|&x| x != NONE)
                    .collect();
                let slot = if lc == 0 {
                    &mut level0[new * m0..(new + 1) * m0]
                } else {
                    &mut upper[at + (lc - 1) * m..at + lc * m]
                };
                let k = ids.len().min(slot.len());
                slot[..k].copy_from_slice(&ids[..k]);
            }
            at += l * m;
        }
        Graph::from_words(Words::Owned(w), Path::new("(in memory)"))
            .expect("a graph just built is well formed")
    }
}

fn lock_top(t: &Mutex<(u32, usize)>) -> (u32, usize) {
    *t.lock().unwrap_or_else(|p| p.into_inner())
}

/// A searchable graph: one array of u32 (header, levels, upper-list starts, layer-0 lists of
/// 2·m slots, upper lists of m slots; `NONE` fills empty slots), owned or memory-mapped.
pub struct Graph {
    words: Words,
    n: usize,
    m: usize,
    m0: usize,
    pub entry: u32,
    pub max_level: usize,
}

impl Links for Graph {
    fn prefetch_links(&self, i: u32, level: usize) {
        if level == 0 {
            let at = HEADER + 2 * self.n + i as usize * self.m0;
            lmkit_kernels::simd::prefetch(self.words.get().as_ptr().wrapping_add(at));
        }
    }
    fn unvisited_into(&self, i: u32, level: usize, visited: &mut Visited, out: &mut Vec<u32>) {
        out.clear();
        for &nb in self.list(i, level) {
            if nb == NONE {
                break;
            }
            if visited.insert(nb) {
                out.push(nb);
            }
        }
    }
    fn neighbors_into(&self, i: u32, level: usize, out: &mut Vec<u32>) {
        out.clear();
        out.extend_from_slice(self.neighbors(i, level));
    }
    fn nodes(&self) -> usize {
        self.n
    }
}

impl Graph {
    /// An empty graph.
    pub fn empty(m: usize) -> Graph {
        Builder::new(HnswParams {
            m,
            ..HnswParams::default()
        })
        .freeze()
    }

    /// Checks the layout of `words` (read from `path`) and every link in it.
    pub fn from_words(words: Words, path: &Path) -> Result<Graph> {
        let bad = |what: String| RagError::corrupt(path, what);
        let w = words.get();
        if w.len() < HEADER || w[0] != MAGIC {
            return Err(bad("not an lmkit HNSW graph".into()));
        }
        if w[1] != VERSION {
            return Err(bad(format!(
                "graph format version {} (this lmkit reads {VERSION})",
                w[1]
            )));
        }
        let (n, m, m0, entry, max_level, upper_len) = (
            w[2] as usize,
            w[3] as usize,
            w[4] as usize,
            w[5],
            w[6] as usize,
            w[7] as usize,
        );
        if m == 0 || m0 != 2 * m || max_level > MAX_LEVEL {
            return Err(bad(format!(
                "bad header (m {m}, m0 {m0}, max level {max_level})"
            )));
        }
        let want = (HEADER as u64) + 2 * n as u64 + (n as u64) * (m0 as u64) + upper_len as u64;
        if w.len() as u64 != want {
            return Err(bad(format!(
                "{} words where the header says {want}",
                w.len()
            )));
        }
        if (n == 0) != (entry == NONE) || (n > 0 && entry as usize >= n) {
            return Err(bad(format!("entry point {entry} of {n} nodes")));
        }
        let levels = &w[HEADER..HEADER + n];
        let starts = &w[HEADER + n..HEADER + 2 * n];
        for i in 0..n {
            let l = levels[i] as usize;
            if l > max_level || starts[i] as usize + l * m > upper_len {
                return Err(bad(format!(
                    "node {i}: level {l} or its lists out of range"
                )));
            }
        }
        if w[HEADER + 2 * n..]
            .iter()
            .any(|&x| x != NONE && x as usize >= n)
        {
            return Err(bad(format!("a link points past the {n} nodes")));
        }
        Ok(Graph {
            words,
            n,
            m,
            m0,
            entry,
            max_level,
        })
    }

    pub fn words(&self) -> &[u32] {
        self.words.get()
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn level(&self, i: u32) -> usize {
        self.words.get()[HEADER + i as usize] as usize
    }

    /// The links of node `i` on layer `level` (empty above its level).
    pub fn neighbors(&self, i: u32, level: usize) -> &[u32] {
        let list = self.list(i, level);
        let k = list.iter().position(|&x| x == NONE).unwrap_or(list.len());
        &list[..k]
    }

    /// The slots of node `i` on layer `level`, `NONE` after its last link.
    #[inline]
    fn list(&self, i: u32, level: usize) -> &[u32] {
        let w = self.words.get();
        let i = i as usize;
        if level == 0 {
            let at = HEADER + 2 * self.n + i * self.m0;
            &w[at..at + self.m0]
        } else {
            if level > w[HEADER + i] as usize {
                return &[];
            }
            let at = HEADER
                + 2 * self.n
                + self.n * self.m0
                + w[HEADER + self.n + i] as usize
                + (level - 1) * self.m;
            &w[at..at + self.m]
        }
    }

    /// The `k` nodes nearest to `q` among those `allow` admits, nearest first; `ef` (≥ k)
    /// candidates are kept on layer 0.
    pub fn search(
        &self,
        rows: Rows,
        q: &[f32],
        k: usize,
        ef: usize,
        allow: Option<&(dyn Fn(u32) -> bool + Sync)>,
    ) -> Vec<Near> {
        if self.n == 0 || k == 0 {
            return Vec::new();
        }
        let mut out = VISITED.with(|v| {
            let v = &mut *v.borrow_mut();
            let mut cur = Near {
                d: distance(q, rows.row(self.entry)),
                id: self.entry,
            };
            for lc in (1..=self.max_level).rev() {
                cur = greedy(self, rows, q, cur, lc, &mut v.buf);
            }
            search_layer(self, rows, q, &[cur], ef.max(k), 0, allow, v)
        });
        out.truncate(k);
        out
    }
}

/// The `k` rows nearest to `q` by brute force among those `allow` admits, nearest first.
pub fn exact(
    rows: Rows,
    q: &[f32],
    k: usize,
    allow: Option<&(dyn Fn(u32) -> bool + Sync)>,
) -> Vec<Near> {
    const BLOCK: usize = 4096;
    let n = rows.len();
    let mut heap: BinaryHeap<Near> = BinaryHeap::new();
    let mut sims = vec![0f32; BLOCK];
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let s = &mut sims[..end - start];
        lmkit_kernels::vector::dots(q, &rows.data[start * rows.dim..end * rows.dim], s);
        for (j, &sim) in s.iter().enumerate() {
            let id = (start + j) as u32;
            if allow.is_some_and(|f| !f(id)) {
                continue;
            }
            let c = Near { d: 1.0 - sim, id };
            if heap.len() < k {
                heap.push(c);
            } else if heap.peek().is_some_and(|w| c < *w) {
                heap.pop();
                heap.push(c);
            }
        }
    }
    heap.into_sorted_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn unit_rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(1);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut v: Vec<f32> = (0..n * dim).map(|_| next()).collect();
        for r in v.chunks_mut(dim) {
            let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    fn recall(g: &Graph, rows: Rows, queries: &[f32], k: usize, ef: usize) -> f64 {
        let mut hit = 0;
        let nq = queries.len() / rows.dim;
        for q in queries.chunks(rows.dim) {
            let want: Vec<u32> = exact(rows, q, k, None).iter().map(|n| n.id).collect();
            let got = g.search(rows, q, k, ef, None);
            hit += got.iter().filter(|n| want.contains(&n.id)).count();
        }
        hit as f64 / (nq * k) as f64
    }

    fn build(rows: Rows, params: HnswParams) -> Graph {
        let mut b = Builder::new(params);
        b.insert_all(rows, &|_| {});
        b.freeze()
    }

    #[test]
    fn finds_the_nearest_like_exact_search() {
        let dim = 24;
        let data = unit_rows(3000, dim, 1);
        let rows = Rows { data: &data, dim };
        let g = build(rows, HnswParams::default());
        let q = unit_rows(50, dim, 2);
        let r = recall(&g, rows, &q, 10, 64);
        assert!(r >= 0.97, "recall {r}");
        // The stored form reads back the same.
        let again = Graph::from_words(Words::Owned(g.words().to_vec()), Path::new("x")).unwrap();
        assert_eq!(again.entry, g.entry);
        assert_eq!(recall(&again, rows, &q, 10, 64), r);
    }

    #[test]
    fn insertion_into_a_saved_graph_and_removal_keep_recall() {
        let dim = 16;
        let data = unit_rows(4000, dim, 3);
        let params = HnswParams::default();
        let first = Rows {
            data: &data[..2000 * dim],
            dim,
        };
        let g = build(first, params);
        let all = Rows { data: &data, dim };
        let mut b = Builder::from_graph(&g, params);
        b.insert_all(all, &|_| {});
        let g = b.freeze();
        assert_eq!(g.len(), 4000);
        let q = unit_rows(50, dim, 4);
        assert!(recall(&g, all, &q, 10, 64) >= 0.95);
        // Remove every third node, the entry point among them.
        let mut dead: Vec<bool> = (0..4000).map(|i| i % 3 == 0).collect();
        dead[g.entry as usize] = true;
        let (g2, remap) = Builder::from_graph(&g, params).remove(all, &dead);
        let kept: Vec<f32> = (0..4000)
            .filter(|&i| !dead[i])
            .flat_map(|i| all.row(i as u32).to_vec())
            .collect();
        let rows2 = Rows { data: &kept, dim };
        assert_eq!(g2.len(), rows2.len());
        assert_eq!(remap.iter().filter(|&&r| r != NONE).count(), g2.len());
        let r = recall(&g2, rows2, &q, 10, 64);
        assert!(r >= 0.95, "recall after removal {r}");
    }

    #[test]
    fn filtered_search_returns_only_admitted_nodes() {
        let dim = 16;
        let data = unit_rows(2000, dim, 5);
        let rows = Rows { data: &data, dim };
        let g = build(rows, HnswParams::default());
        let allow = |i: u32| i % 10 == 3;
        let q = unit_rows(20, dim, 6);
        let mut hit = 0;
        for qv in q.chunks(dim) {
            let got = g.search(rows, qv, 10, 64, Some(&allow));
            assert!(got.iter().all(|n| allow(n.id)));
            let want: Vec<u32> = exact(rows, qv, 10, Some(&allow))
                .iter()
                .map(|n| n.id)
                .collect();
            hit += got.iter().filter(|n| want.contains(&n.id)).count();
        }
        assert!(
            hit as f64 / 200.0 >= 0.9,
            "filtered recall {}",
            hit as f64 / 200.0
        );
    }

    #[test]
    fn corrupt_graphs_are_refused() {
        let dim = 8;
        let data = unit_rows(100, dim, 7);
        let g = build(Rows { data: &data, dim }, HnswParams::default());
        let mut w = g.words().to_vec();
        let last = w.len() - 1;
        w[HEADER + 2 * 100] = 5000; // a link past the end
        let e = Graph::from_words(Words::Owned(w.clone()), Path::new("g"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("past the 100 nodes"), "{e}");
        w.truncate(last);
        assert!(Graph::from_words(Words::Owned(w), Path::new("g")).is_err());
    }
}
