//! The lmkit side of `bench/ann_bench.py`: builds an HNSW graph over raw vectors and times
//! single-threaded queries at several `ef` (the fastest of three passes), printing one JSON line
//! per setting.
//!
//! ann_bench BASE.f32 QUERIES.f32 TRUTH.u32 DIM K M EF_CONSTRUCTION EF[,EF...]
//! (little-endian f32 rows; TRUTH holds the exact top-K ids of each query, K per row).
//! With `LMKIT_ANN_GRAPH=FILE` the graph is read from FILE when it exists (build_s is then 0)
//! and written there otherwise, so that the queries alone can be profiled. `LMKIT_ANN_SEED=N`
//! draws the nodes' levels from another seed (default 0), to see how recall varies between builds.

use lmkit_rag::hnsw::{Builder, Graph, HnswParams, Rows};
use lmkit_rag::words::Words;
use std::time::Instant;

fn read_words(path: &str) -> Vec<[u8; 4]> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    bytes
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 9 {
        eprintln!(
            "usage: ann_bench BASE.f32 QUERIES.f32 TRUTH.u32 DIM K M EF_CONSTRUCTION EF[,EF...]"
        );
        std::process::exit(2);
    }
    let num = |i: usize| {
        a[i].parse::<usize>()
            .unwrap_or_else(|_| panic!("{}: not a number", a[i]))
    };
    let (dim, k, m, efc) = (num(4), num(5), num(6), num(7));
    let efs: Vec<usize> = a[8].split(',').map(|s| s.parse().expect("ef")).collect();
    let base: Vec<f32> = read_words(&a[1])
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    let queries: Vec<f32> = read_words(&a[2])
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    let truth: Vec<u32> = read_words(&a[3])
        .into_iter()
        .map(u32::from_le_bytes)
        .collect();
    let rows = Rows { data: &base, dim };
    let cache = std::env::var("LMKIT_ANN_GRAPH").ok();
    let cached = cache.as_ref().filter(|p| std::path::Path::new(p).exists());
    let t = Instant::now();
    let (g, build_s) = if let Some(p) = cached {
        let words: Vec<u32> = read_words(p).into_iter().map(u32::from_le_bytes).collect();
        let g = Graph::from_words(Words::Owned(words), p.as_ref()).expect("cached graph");
        (g, 0.0)
    } else {
        let mut b = Builder::new(HnswParams {
            m,
            ef_construction: efc,
            seed: std::env::var("LMKIT_ANN_SEED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        });
        b.insert_all(rows, &|_| {});
        let g = b.freeze();
        let build_s = t.elapsed().as_secs_f64();
        if let Some(p) = &cache {
            let bytes: Vec<u8> = g.words().iter().flat_map(|w| w.to_le_bytes()).collect();
            std::fs::write(p, bytes).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        (g, build_s)
    };
    let nq = queries.len() / dim;
    for ef in efs {
        // The fastest of three passes over the queries (the machine's noise only slows).
        let mut s = f64::INFINITY;
        let mut found: Vec<Vec<u32>> = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            found = queries
                .chunks(dim)
                .map(|q| {
                    g.search(rows, q, k, ef, None)
                        .iter()
                        .map(|n| n.id)
                        .collect()
                })
                .collect();
            s = s.min(t.elapsed().as_secs_f64());
        }
        let hits: usize = found
            .iter()
            .zip(truth.chunks(k))
            .map(|(f, t)| f.iter().filter(|id| t.contains(id)).count())
            .sum();
        println!(
            "{{\"ef\": {ef}, \"build_s\": {build_s:.3}, \"qps\": {:.1}, \"recall\": {:.4}}}",
            nq as f64 / s,
            hits as f64 / (nq * k) as f64
        );
    }
}
