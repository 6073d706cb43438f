//! Word ↔ id mapping used while counting. Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`.

use crate::tokenize::{BOS, EOS, UNK};
use rustc_hash::FxHashMap;

pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

#[derive(Debug, Clone)]
pub struct Vocab {
    words: Vec<String>,
    ids: FxHashMap<String, u32>,
}

impl Default for Vocab {
    fn default() -> Self {
        let mut v = Vocab {
            words: Vec::new(),
            ids: FxHashMap::default(),
        };
        for w in [UNK, BOS, EOS] {
            v.insert(w);
        }
        v
    }
}

impl Vocab {
    /// The id of `word`, adding it if new.
    pub fn insert(&mut self, word: &str) -> u32 {
        if let Some(&id) = self.ids.get(word) {
            return id;
        }
        let id = self.words.len() as u32;
        self.words.push(word.to_string());
        self.ids.insert(word.to_string(), id);
        id
    }

    pub fn get(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    pub fn word(&self, id: u32) -> &str {
        &self.words[id as usize]
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn into_words(self) -> Vec<String> {
        self.words
    }
}
