//! The keys and values of sequences' prompts (kept once read) and of finished sequences, kept
//! for the requests that begin with the same tokens — a chat's next turn (which sends the whole
//! conversation again), many requests with one system prompt or one long document, also while
//! the first of them still decodes: such a request reads only the rest of its prompt (what vLLM
//! calls automatic prefix caching, llama.cpp's server `cache_prompt`). Entries are exact copies
//! of the positions a sequence read, at most `cap` bytes together, the least recently used
//! dropped first; they also give way to the decoding sequences' room in the KV budget
//! ([`PrefixCache::shrink_to`], and the room given to [`PrefixCache::insert`]).

use lmkit_models::KvCache;

/// Entries kept at most (each lookup compares the prompt with every entry).
const MAX_ENTRIES: usize = 256;

struct Entry {
    /// The model variant whose passes made the keys and values.
    model: usize,
    tokens: Vec<u32>,
    cache: KvCache,
    /// When the entry was last stored or used (a count of those events).
    used: u64,
}

/// See the module's documentation.
pub struct PrefixCache {
    entries: Vec<Entry>,
    /// The entries' bytes together: their positions × `per_position`.
    bytes: u64,
    cap: u64,
    per_position: u64,
    clock: u64,
}

impl PrefixCache {
    /// A store of at most `cap` bytes for caches of `per_position` bytes a position.
    pub fn new(cap: u64, per_position: u64) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            bytes: 0,
            cap,
            per_position: per_position.max(1),
            clock: 0,
        }
    }

    /// The bytes the entries hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The entries' count.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A cache of the longest start of `prompt` that an entry of variant `model` holds, all of
    /// the prompt but its last token at most (whose pass gives the first token's logits); views
    /// of the entry's keys and values ([`KvCache::prefix`]). `None` where no entry shares the
    /// prompt's first token.
    pub fn lookup(&mut self, model: usize, prompt: &[u32]) -> Option<KvCache> {
        let most = prompt.len().saturating_sub(1);
        let (at, n) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.model == model)
            .map(|(i, e)| (i, common_start(&e.tokens, prompt).min(most)))
            .max_by_key(|&(i, n)| (n, self.entries[i].used))?;
        if n == 0 {
            return None;
        }
        let cache = self.entries[at].cache.prefix(n, false).ok().flatten()?;
        self.entries[at].used = self.tick();
        Some(cache)
    }

    /// Keeps a copy of the keys and values `cache` holds for `tokens` (a sequence's prompt once
    /// read, or its prompt and output when it ends) for variant `model`, the entries then
    /// holding at most `room` bytes (and the cap) together: the least recently used others
    /// give way, and nothing is kept where the copy alone would not fit. An entry that `tokens`
    /// extends is replaced; where an entry already holds all of `tokens` nothing is copied.
    pub fn insert(&mut self, model: usize, tokens: &[u32], cache: &KvCache, room: u64) {
        let n = tokens.len();
        let bytes = self.per_position.saturating_mul(n as u64);
        let limit = room.min(self.cap);
        if n < 2 || n != cache.len() || bytes > limit {
            return;
        }
        let now = self.tick();
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.model == model && e.tokens.starts_with(tokens))
        {
            e.used = now;
            return;
        }
        let Ok(Some(copy)) = cache.prefix(n, true) else {
            return;
        };
        let per_position = self.per_position;
        let mut freed = 0;
        self.entries.retain(|e| {
            let keep = e.model != model || !tokens.starts_with(&e.tokens);
            if !keep {
                freed += per_position * e.tokens.len() as u64;
            }
            keep
        });
        self.bytes -= freed;
        self.entries.push(Entry {
            model,
            tokens: tokens.to_vec(),
            cache: copy,
            used: now,
        });
        self.bytes += bytes;
        self.shrink_to(limit);
        while self.entries.len() > MAX_ENTRIES {
            self.drop_oldest();
        }
    }

    /// Drops the least recently used entries until they hold at most `limit` bytes.
    pub fn shrink_to(&mut self, limit: u64) {
        while self.bytes > limit && !self.entries.is_empty() {
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        if let Some((i, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used) {
            let e = self.entries.swap_remove(i);
            self.bytes -= self.per_position * e.tokens.len() as u64;
        }
    }
}

/// How many tokens `a` and `b` begin with in common.
fn common_start(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_models::{Device, Tensor};

    /// A one-layer cache whose position p holds the value `tokens[p]` everywhere.
    fn cache_of(tokens: &[u32]) -> KvCache {
        let mut c = KvCache::new(1);
        let values: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| [t as f32; 4])
            .collect::<Vec<_>>();
        let k = Tensor::from_vec(values, (1, 1, tokens.len(), 4), &Device::Cpu).unwrap();
        c.append(0, &k, &k).unwrap();
        c
    }

    /// The values a cache holds at each position.
    fn held(c: &KvCache) -> Vec<u32> {
        let mut probe = c.prefix(c.len(), true).unwrap().unwrap();
        let one = Tensor::zeros((1, 1, 1, 4), lmkit_models::DType::F32, &Device::Cpu).unwrap();
        let (k, _) = probe.append(0, &one, &one).unwrap();
        let k = k.narrow(2, 0, c.len()).unwrap().flatten_all().unwrap();
        k.to_vec1::<f32>()
            .unwrap()
            .chunks(4)
            .map(|c| c[0] as u32)
            .collect()
    }

    #[test]
    fn lookups_find_the_longest_start_short_of_the_last_token() {
        let mut p = PrefixCache::new(1 << 20, 32);
        p.insert(0, &[1, 2, 3, 4, 5], &cache_of(&[1, 2, 3, 4, 5]), u64::MAX);
        p.insert(0, &[1, 2, 9, 9], &cache_of(&[1, 2, 9, 9]), u64::MAX);
        assert_eq!(p.len(), 2);
        assert_eq!(p.bytes(), 9 * 32);
        // The longer match wins; the prompt's last token is always left to read.
        let c = p.lookup(0, &[1, 2, 3, 4, 7, 8]).unwrap();
        assert_eq!(held(&c), [1, 2, 3, 4]);
        let c = p.lookup(0, &[1, 2, 3]).unwrap();
        assert_eq!(held(&c), [1, 2]);
        assert_eq!(held(&p.lookup(0, &[1, 2, 9, 9, 9]).unwrap()), [1, 2, 9, 9]);
        // Another variant's entries, or no shared first token: nothing.
        assert!(p.lookup(1, &[1, 2, 3, 4]).is_none());
        assert!(p.lookup(0, &[7, 1, 2]).is_none());
        assert!(p.lookup(0, &[1]).is_none());
    }

    #[test]
    fn a_longer_sequence_replaces_its_start_and_the_oldest_give_way() {
        let mut p = PrefixCache::new(10 * 8, 8);
        p.insert(0, &[1, 2, 3], &cache_of(&[1, 2, 3]), u64::MAX);
        // A chat's next turn extends the first: one entry, of the longer tokens.
        p.insert(
            0,
            &[1, 2, 3, 4, 5, 6],
            &cache_of(&[1, 2, 3, 4, 5, 6]),
            u64::MAX,
        );
        assert_eq!((p.len(), p.bytes()), (1, 6 * 8));
        // A start of an entry adds nothing.
        p.insert(0, &[1, 2, 3, 4], &cache_of(&[1, 2, 3, 4]), u64::MAX);
        assert_eq!((p.len(), p.bytes()), (1, 6 * 8));
        // Over the cap: the least recently used goes.
        p.insert(0, &[5, 6, 7], &cache_of(&[5, 6, 7]), u64::MAX);
        assert_eq!(
            held(&p.lookup(0, &[1, 2, 3, 4, 5, 6, 7]).unwrap()),
            [1, 2, 3, 4, 5, 6]
        );
        p.insert(0, &[8, 9, 10], &cache_of(&[8, 9, 10]), u64::MAX);
        assert_eq!((p.len(), p.bytes()), (2, 9 * 8));
        assert!(p.lookup(0, &[5, 6, 7, 8]).is_none());
        assert!(p.lookup(0, &[1, 2, 3, 4]).is_some());
        // Room for decoding sequences: entries dropped, oldest first.
        p.shrink_to(6 * 8);
        assert_eq!((p.len(), p.bytes()), (1, 6 * 8));
        p.shrink_to(0);
        assert!(p.is_empty() && p.bytes() == 0);
        // Too large for the cap, or a cache that does not hold the tokens: not kept.
        p.insert(0, &[1; 11], &cache_of(&[1; 11]), u64::MAX);
        p.insert(0, &[1, 2, 3], &cache_of(&[1, 2]), u64::MAX);
        assert!(p.is_empty());
        // Within the room the decoding sequences leave: older entries give way to the new one,
        // which is not kept where it alone would not fit.
        p.insert(0, &[1, 2, 3], &cache_of(&[1, 2, 3]), u64::MAX);
        p.insert(0, &[4, 5, 6], &cache_of(&[4, 5, 6]), u64::MAX);
        p.insert(0, &[7, 8, 9, 10], &cache_of(&[7, 8, 9, 10]), 6 * 8);
        assert_eq!((p.len(), p.bytes()), (1, 4 * 8));
        assert!(p.lookup(0, &[7, 8, 9, 10, 11]).is_some());
        p.insert(0, &[5, 5, 5], &cache_of(&[5, 5, 5]), 2 * 8);
        assert_eq!((p.len(), p.bytes()), (1, 4 * 8));
        assert!(p.lookup(0, &[5, 5, 5, 5]).is_none());
    }

    /// The copy an entry keeps is its own: the sequence's buffers written on afterwards (past
    /// the positions copied) change nothing in it.
    #[test]
    fn entries_keep_copies_of_the_positions_read() {
        let mut p = PrefixCache::new(1 << 20, 8);
        let mut c = cache_of(&[1, 2, 3]);
        let x = Tensor::full(7f32, (1, 1, 1, 4), &Device::Cpu).unwrap();
        c.append(0, &x, &x).unwrap();
        p.insert(0, &[1, 2, 3, 7], &c, u64::MAX);
        c.append(0, &x, &x).unwrap();
        c.clear();
        assert_eq!(held(&p.lookup(0, &[1, 2, 3, 7, 7]).unwrap()), [1, 2, 3, 7]);
    }
}
