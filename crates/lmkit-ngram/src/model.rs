//! Querying a back-off model: word lookup, the back-off recursion, sentence scores and perplexity.
//!
//! log10 p(w | h) = prob(longest stored n-gram ending in w) + Σ back-off(h_j) over the stored
//! contexts h_j longer than that n-gram's context — the standard ARPA back-off rule, as KenLM applies it.

use crate::arpa::read_arpa;
use crate::binary::{
    build_image, extend_hash, nonzero, parse_header, start_hash, word_hash, Header, Slots, SLOT_LEN,
};
use crate::error::{NgramError, Result};
use crate::tables::NgramTables;
use crate::tokenize::{tokens, Tokenization};
use crate::trie::TrieView;
use lmkit_kernels::simd::prefetch;
use std::io::{BufReader, Read};
use std::ops::Deref;
use std::path::{Path, PathBuf};

enum Storage {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            Storage::Mapped(m) => m,
        }
    }
}

/// A loaded n-gram model (from ARPA, built in memory; or from `.lmkb`, memory-mapped).
pub struct Model {
    data: Storage,
    h: Header,
    /// The trie layout's sections (`None`: hash tables).
    trie: Option<Box<TrieView>>,
    path: PathBuf,
}

/// Where a walk over the n-grams ending in one word stands: the hash of the n-gram found last
/// (probing layout), or its entry's index in its order (trie layout).
#[derive(Clone, Copy)]
enum Cursor {
    Hash(u64),
    Node(u64),
}

/// The score of one predicted token (the sentence's words in order, then `</s>` when asked for).
#[derive(Clone, Debug, PartialEq)]
pub struct WordScore {
    pub log10_prob: f32,
    /// Length of the longest n-gram found for this word (1 = unigram).
    pub ngram_len: usize,
    pub oov: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SentenceScore {
    pub log10_prob: f32,
    pub words: Vec<WordScore>,
}

/// Perplexity over a text, counted as KenLM's `query` counts it: every word and `</s>` is a token;
/// OOVs are reported separately and excluded from the second figure.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Perplexity {
    pub sentences: u64,
    pub tokens: u64,
    pub oovs: u64,
    pub log10_prob: f64,
    pub log10_prob_oov: f64,
}

impl Perplexity {
    pub fn add(&mut self, s: &SentenceScore) {
        self.sentences += 1;
        s.words.iter().for_each(|w| self.add_word(w));
    }

    /// One predicted token's score.
    fn add_word(&mut self, w: &WordScore) {
        self.tokens += 1;
        self.log10_prob += f64::from(w.log10_prob);
        if w.oov {
            self.oovs += 1;
            self.log10_prob_oov += f64::from(w.log10_prob);
        }
    }

    /// Sums two partial counts (for scoring in parallel).
    pub fn merge(mut self, other: Perplexity) -> Perplexity {
        self.sentences += other.sentences;
        self.tokens += other.tokens;
        self.oovs += other.oovs;
        self.log10_prob += other.log10_prob;
        self.log10_prob_oov += other.log10_prob_oov;
        self
    }

    pub fn including_oovs(&self) -> f64 {
        10f64.powf(-self.log10_prob / self.tokens as f64)
    }

    pub fn excluding_oovs(&self) -> f64 {
        10f64.powf(-(self.log10_prob - self.log10_prob_oov) / (self.tokens - self.oovs) as f64)
    }
}

/// What scoring carries from one word to the next: the most recent words (most recent first,
/// at most order − 1) and, for the first `len` of them, the back-off weights of the stored
/// contexts they form.
#[derive(Clone, Copy, Default)]
struct State {
    words: [u32; crate::MAX_ORDER],
    words_len: usize,
    backoffs: [f32; crate::MAX_ORDER],
    len: usize,
}

impl Model {
    /// Opens an ARPA or `.lmkb` file (told apart by the file's first bytes, not its name).
    /// `tokenization` applies to ARPA files; a binary model carries its own.
    pub fn open(path: &Path, tokenization: Tokenization) -> Result<Model> {
        let file = std::fs::File::open(path).map_err(|e| NgramError::io(path, e))?;
        let mut magic = [0u8; 4];
        let n = (&file)
            .take(4)
            .read(&mut magic)
            .map_err(|e| NgramError::io(path, e))?;
        if n == 4 && &magic == crate::binary::MAGIC {
            let map = lmkit_core::mmap::map_readonly(path)?;
            Self::from_storage(Storage::Mapped(map), path)
        } else {
            let file = std::fs::File::open(path).map_err(|e| NgramError::io(path, e))?;
            let tables = read_arpa(BufReader::with_capacity(1 << 20, file), path, tokenization)?;
            Ok(Self::from_tables(&tables, path))
        }
    }

    /// Builds a queryable model from tables in memory.
    pub fn from_tables(tables: &NgramTables, path: &Path) -> Model {
        let img = build_image(tables);
        Self::from_storage(Storage::Owned(img), path).expect("a freshly built image is valid")
    }

    fn from_storage(data: Storage, path: &Path) -> Result<Model> {
        let h = parse_header(&data, path)?;
        crate::binary::check_body(&data, path)?;
        let trie = h.trie_bits.map(|bits| {
            Box::new(TrieView::new(
                &h.counts,
                h.vocab_size as u64,
                (bits, h.trie_pointer_bits),
                h.layout.quant,
                h.layout.order_tables.clone(),
                h.order_slots.clone(),
            ))
        });
        Ok(Model {
            data,
            h,
            trie,
            path: path.to_path_buf(),
        })
    }

    /// The layout of the model's n-grams.
    pub fn layout(&self) -> crate::BinaryLayout {
        match self.h.trie_bits {
            None => crate::BinaryLayout::Probing,
            Some(bits) => crate::BinaryLayout::Trie {
                bits,
                pointer_bits: self.h.trie_pointer_bits,
            },
        }
    }

    /// (log10 prob, log10 back-off) of the unigram `w`, and the cursor to extend it.
    #[inline(always)]
    fn first(&self, w: u32) -> Option<(f32, f32, Cursor)> {
        match &self.trie {
            None => {
                let h = start_hash(w);
                self.lookup(1, h).map(|(p, b)| (p, b, Cursor::Hash(h)))
            }
            Some(t) => {
                if w as usize >= self.h.vocab_size {
                    return None;
                }
                let (p, b) = t.values(&self.data, 0, u64::from(w));
                Some((p, b, Cursor::Node(u64::from(w))))
            }
        }
    }

    /// The n-gram of order `n` that puts `word` before the (n−1)-gram at `c`.
    #[inline(always)]
    fn extend(&self, n: usize, c: Cursor, word: u32) -> Option<(f32, f32, Cursor)> {
        match (c, &self.trie) {
            (Cursor::Hash(h), _) => {
                let h = extend_hash(h, word);
                self.lookup(n, h).map(|(p, b)| (p, b, Cursor::Hash(h)))
            }
            (Cursor::Node(r), Some(t)) => {
                let range = t.children(&self.data, n - 2, r);
                let i = t.find(&self.data, n - 1, range, word)?;
                let (p, b) = t.values(&self.data, n - 1, i);
                Some((p, b, Cursor::Node(i)))
            }
            (Cursor::Node(_), None) => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn order(&self) -> usize {
        self.h.order
    }

    pub fn tokenization(&self) -> Tokenization {
        self.h.tokenization
    }

    pub fn vocab_size(&self) -> usize {
        self.h.vocab_size
    }

    /// Number of n-grams of each order.
    pub fn counts(&self) -> &[u64] {
        &self.h.counts
    }

    fn r32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.data[at..at + 4].try_into().expect("4-byte slice"))
    }

    fn r64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.data[at..at + 8].try_into().expect("8-byte slice"))
    }

    /// The word with id `id` (`id < vocab_size`).
    pub fn word(&self, id: u32) -> &str {
        // Validated as UTF-8 when the model was opened.
        std::str::from_utf8(self.word_bytes(id)).unwrap_or("")
    }

    fn word_bytes(&self, id: u32) -> &[u8] {
        let base = self.h.layout.vocab_bytes;
        let a = self.r32(self.h.layout.vocab_offsets + 4 * id as usize) as usize;
        let b = self.r32(self.h.layout.vocab_offsets + 4 * id as usize + 4) as usize;
        &self.data[base + a..base + b]
    }

    pub fn word_id(&self, word: &str) -> Option<u32> {
        self.word_id_hashed(word_hash(word.as_bytes()), word)
    }

    fn vocab_slots(&self) -> Slots {
        Slots {
            count: self.h.vocab_slots,
            exact: self.h.exact_slots,
        }
    }

    /// Asks for the vocabulary slot where the word with hash `h` is looked for first.
    #[inline(always)]
    fn prefetch_word(&self, h: u64) {
        let at = self.h.layout.vocab_table + self.vocab_slots().home(h) * SLOT_LEN;
        prefetch(self.data.as_ptr().wrapping_add(at));
    }

    /// [`Model::word_id`] for a word whose [`word_hash`] is `h`.
    fn word_id_hashed(&self, h: u64, word: &str) -> Option<u32> {
        let slots = self.vocab_slots();
        let mut i = slots.home(h);
        loop {
            let at = self.h.layout.vocab_table + i * SLOT_LEN;
            match self.r64(at) {
                0 => return None,
                s if s == h => {
                    let id = self.r32(at + 8);
                    if (id as usize) < self.h.vocab_size && self.word_bytes(id) == word.as_bytes() {
                        return Some(id);
                    }
                }
                _ => {}
            }
            i = slots.next(i);
        }
    }

    /// (log10 prob, log10 back-off) of the n-gram of order `n` with hash `h`.
    #[inline(always)]
    fn lookup(&self, n: usize, h: u64) -> Option<(f32, f32)> {
        let h = nonzero(h);
        let base = self.h.layout.order_tables[n - 1];
        let slots = Slots {
            count: self.h.order_slots[n - 1],
            exact: self.h.exact_slots,
        };
        let mut i = slots.home(h);
        loop {
            let at = base + i * SLOT_LEN;
            match self.r64(at) {
                0 => return None,
                s if s == h => {
                    let p = f32::from_le_bytes(
                        self.data[at + 8..at + 12].try_into().expect("4-byte slice"),
                    );
                    let b = f32::from_le_bytes(
                        self.data[at + 12..at + 16]
                            .try_into()
                            .expect("4-byte slice"),
                    );
                    return Some((p, b));
                }
                _ => i = slots.next(i),
            }
        }
    }

    /// log10 p(w | history) and the length of the n-gram used; `history` is most recent first.
    pub fn score_id(&self, history: &[u32], w: u32) -> (f32, usize) {
        let max_ctx = history.len().min(self.h.order - 1);
        let (mut prob, mut len, mut c) = match self.first(w) {
            Some((p, _, c)) => (p, 1, c),
            None => return (self.first(self.h.unk).map_or(-100.0, |x| x.0), 1),
        };
        for (k, &ctx_word) in history.iter().take(max_ctx).enumerate() {
            match self.extend(k + 2, c, ctx_word) {
                Some((p, _, next)) => {
                    prob = p;
                    len = k + 2;
                    c = next;
                }
                None => break,
            }
        }
        // Back off from every stored context longer than the found n-gram's context.
        let mut ctx: Option<Cursor> = None;
        for (j, &ctx_word) in history.iter().take(max_ctx).enumerate() {
            let found = match ctx {
                None => self.first(ctx_word),
                Some(c) => self.extend(j + 1, c, ctx_word),
            };
            let Some((_, b, c)) = found else { break };
            ctx = Some(c);
            if j + 1 >= len {
                prob += b;
            }
        }
        (prob, len)
    }

    /// Asks for the home slots of every n-gram the walk from `w` back through `history` (most
    /// recent first) may probe in the hash layout, so that their cache misses overlap instead
    /// of coming one after another: each hash depends on the words only, not on the probe
    /// before it.
    #[inline(always)]
    fn prefetch_walk(&self, w: u32, history: impl Iterator<Item = u32>) {
        if self.trie.is_some() {
            return;
        }
        let slot = |n: usize, h: u64| {
            let slots = Slots {
                count: self.h.order_slots[n - 1],
                exact: self.h.exact_slots,
            };
            let at = self.h.layout.order_tables[n - 1] + slots.home(nonzero(h)) * SLOT_LEN;
            prefetch(self.data.as_ptr().wrapping_add(at));
        };
        let mut h = start_hash(w);
        slot(1, h);
        for (k, ctx) in history.take(self.h.order - 1).enumerate() {
            h = extend_hash(h, ctx);
            slot(k + 2, h);
        }
    }

    /// log10 p(w | state), the length of the n-gram used, and the state after `w`: the longest
    /// stored n-gram ending in `w` within the state's history, plus the back-off weights of the
    /// longer stored contexts (carried in the state). One probe per n-gram gives both the
    /// probability and the back-off the next word needs (KenLM's way).
    fn score_in_state(&self, state: &State, w: u32) -> (f32, usize, State) {
        let keep = self.h.order.saturating_sub(1);
        // The history: the most recent words, as many as the order keeps, stored or not.
        let mut next = State::default();
        if keep > 0 {
            next.words_len = (state.words_len + 1).min(keep);
            next.words[0] = w;
            next.words[1..next.words_len].copy_from_slice(&state.words[..next.words_len - 1]);
        }
        let Some((p1, b1, mut c)) = self.first(w) else {
            // Not even a unigram: `<unk>`'s probability, and no stored context ends in `w`.
            let p = self.first(self.h.unk).map_or(-100.0, |x| x.0);
            return (p, 1, next);
        };
        if keep > 0 {
            next.backoffs[0] = b1;
            next.len = 1;
        }
        let (mut prob, mut len) = (p1, 1);
        for k in 0..state.words_len {
            match self.extend(k + 2, c, state.words[k]) {
                Some((p, b, next_c)) => {
                    c = next_c;
                    prob = p;
                    len = k + 2;
                    if k + 2 <= keep {
                        next.backoffs[k + 1] = b;
                        next.len = k + 2;
                    }
                }
                None => break,
            }
        }
        for j in (len - 1)..state.len {
            prob += state.backoffs[j];
        }
        (prob, len, next)
    }

    /// The state a sentence starts in: after `<s>` when `bos`.
    fn start(&self, bos: bool) -> State {
        let state = State::default();
        if bos && self.h.order > 1 {
            return self.score_in_state(&state, self.h.bos).2;
        }
        state
    }

    /// Scores the word with id `id` (`None`: not in the vocabulary) and moves `state` past it.
    #[inline]
    fn step(&self, state: &mut State, id: Option<u32>) -> WordScore {
        let oov = id.is_none_or(|id| id == self.h.unk);
        let (p, len, next) = self.score_in_state(state, id.unwrap_or(self.h.unk));
        *state = next;
        WordScore {
            log10_prob: p,
            ngram_len: len,
            oov,
        }
    }

    /// The ids of `words` (`None`: not in the vocabulary), then `</s>`'s when `eos`. Every
    /// word's vocabulary slot is asked for before the first is looked up.
    fn ids<'a>(&self, words: impl Iterator<Item = &'a str>, eos: bool) -> Vec<Option<u32>> {
        let hashed: Vec<(u64, &str)> = words
            .map(|t| {
                let h = word_hash(t.as_bytes());
                self.prefetch_word(h);
                (h, t)
            })
            .collect();
        hashed
            .iter()
            .map(|&(h, t)| self.word_id_hashed(h, t))
            .chain(eos.then_some(Some(self.h.eos)))
            .collect()
    }

    /// Scores `ids` in order (after `<s>` when `bos`), handing each word's score to `f`. While
    /// one word is scored, the n-grams the next one will probe are asked for.
    fn score_ids(&self, ids: &[Option<u32>], bos: bool, mut f: impl FnMut(WordScore)) {
        let unk = self.h.unk;
        let mut state = self.start(bos);
        if let Some(&first) = ids.first() {
            let history = state.words[..state.words_len].iter().copied();
            self.prefetch_walk(first.unwrap_or(unk), history);
        }
        for (t, &id) in ids.iter().enumerate() {
            if let Some(&next) = ids.get(t + 1) {
                let history = std::iter::once(id.unwrap_or(unk))
                    .chain(state.words[..state.words_len].iter().copied());
                self.prefetch_walk(next.unwrap_or(unk), history);
            }
            f(self.step(&mut state, id));
        }
    }

    /// Scores a tokenized sentence, with `<s>` before it and `</s>` after it when asked.
    pub fn score_tokens(&self, words: &[&str], bos: bool, eos: bool) -> SentenceScore {
        let ids = self.ids(words.iter().copied(), eos);
        let mut out = SentenceScore {
            log10_prob: 0.0,
            words: Vec::with_capacity(ids.len()),
        };
        self.score_ids(&ids, bos, |w| {
            out.log10_prob += w.log10_prob;
            out.words.push(w);
        });
        out
    }

    /// Scores `line` as a sentence (as [`Model::score_line`]) into `ppl` (as
    /// [`Perplexity::add`]), without building the per-word scores.
    pub fn add_line(&self, line: &str, ppl: &mut Perplexity) {
        let ids = self.ids(tokens(line, self.h.tokenization).into_iter(), true);
        self.score_ids(&ids, true, |w| ppl.add_word(&w));
        ppl.sentences += 1;
    }

    /// Tokenizes `line` with the model's tokenization and scores it as a sentence.
    pub fn score_line(&self, line: &str) -> SentenceScore {
        self.score_tokens(&tokens(line, self.h.tokenization), true, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary::{build_image_version, BinaryLayout};

    #[test]
    fn version_1_files_with_power_of_two_tables_still_load_and_score_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.txt");
        let text: String = (0..300)
            .map(|i| format!("w{} x{} w{} y{}\n", i % 17, i % 5, i % 11, i % 3))
            .collect();
        std::fs::write(&corpus, text).unwrap();
        let opts = crate::TrainOptions {
            order: 4,
            estimation: crate::EstimateOptions {
                fallback: Some(crate::FALLBACK_DISCOUNTS),
                ..Default::default()
            },
            ..Default::default()
        };
        let t = crate::train(&[corpus], &opts, &crate::NoProgress)
            .unwrap()
            .tables;
        let v1 = build_image_version(&t, BinaryLayout::Probing, 1, Path::new("v1")).unwrap();
        let v2 = build_image_version(&t, BinaryLayout::Probing, 2, Path::new("v2")).unwrap();
        assert!(v2.len() < v1.len());
        let m1 = Model::from_storage(Storage::Owned(v1), Path::new("v1")).unwrap();
        let m2 = Model::from_storage(Storage::Owned(v2), Path::new("v2")).unwrap();
        assert!(!m1.h.exact_slots && m2.h.exact_slots);
        for s in ["w1 x1 w1 y1", "w3 x2 w5 y0 unknown", "y2 y2 y2"] {
            assert_eq!(m1.score_line(s), m2.score_line(s), "{s}");
        }
        assert_eq!(m1.word_id("x4"), m2.word_id("x4"));
    }
}
