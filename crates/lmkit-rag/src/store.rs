//! Where an index lives: a local directory ([`Index`]) or a PostgreSQL table with pgvector
//! ([`PgIndex`]), chosen by the `--index` value (a `postgres://` URL or a path).

use crate::index::{Found, Index, Manifest, NewChunk, Selector};
use crate::pg::{is_url, PgIndex};
use crate::{Result, SearchOptions};
use std::path::Path;

pub enum Store {
    Local(Index),
    Pg(PgIndex),
}

impl Store {
    /// Opens the index at `spec` (a directory or a `postgres://` URL).
    pub fn open(spec: &Path) -> Result<Store> {
        match spec.to_str().filter(|s| is_url(s)) {
            Some(url) => Ok(Store::Pg(PgIndex::open(url)?)),
            None => Ok(Store::Local(Index::open(spec)?)),
        }
    }

    /// A new, empty index at `spec`; `overwrite` replaces one already there.
    pub fn create(spec: &Path, manifest: Manifest, overwrite: bool) -> Result<Store> {
        match spec.to_str().filter(|s| is_url(s)) {
            Some(url) => Ok(Store::Pg(PgIndex::create(url, manifest, overwrite)?)),
            None => {
                if spec.join("manifest.json").exists() && !overwrite {
                    return Err(crate::RagError::Invalid(format!(
                        "{}: already holds an index; add to it with `lmkit index add`, or pass --overwrite to replace it",
                        spec.display()
                    )));
                }
                let mut ix = Index::new(spec, manifest);
                if overwrite {
                    ix.replace_existing();
                }
                Ok(Store::Local(ix))
            }
        }
    }

    pub fn manifest(&self) -> &Manifest {
        match self {
            Store::Local(ix) => &ix.manifest,
            Store::Pg(ix) => &ix.manifest,
        }
    }

    /// Hybrid where BM25 is at hand (a local index), dense otherwise.
    pub fn default_mode(&self) -> crate::Mode {
        match self {
            Store::Local(_) => crate::Mode::Hybrid,
            Store::Pg(_) => crate::Mode::Dense,
        }
    }

    pub fn len(&mut self) -> Result<usize> {
        match self {
            Store::Local(ix) => Ok(ix.len()),
            Store::Pg(ix) => ix.len(),
        }
    }

    pub fn is_empty(&mut self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Searches by `vector` (needed unless the mode is BM25) and `text`.
    pub fn search(
        &mut self,
        vector: Option<&[f32]>,
        text: &str,
        o: &SearchOptions,
    ) -> Result<Vec<Found>> {
        match self {
            Store::Local(ix) => {
                let hits = ix.search(vector, text, o)?;
                ix.found(&hits)
            }
            Store::Pg(ix) => match vector {
                Some(v) => ix.search(v, o),
                None => Err(crate::RagError::Invalid(crate::pg::DENSE_ONLY.into())),
            },
        }
    }

    /// Adds chunks (`progress` gets graph insertion counts for a local index); returns their ids.
    pub fn add(
        &mut self,
        new: Vec<NewChunk>,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<u64>> {
        match self {
            Store::Local(ix) => ix.add(new, progress),
            Store::Pg(ix) => ix.add(new),
        }
    }

    pub fn delete(&mut self, sel: &Selector) -> Result<usize> {
        match self {
            Store::Local(ix) => ix.delete(|c| sel.matches(c)),
            Store::Pg(ix) => ix.delete(sel),
        }
    }

    /// Makes the changes durable (a local index is written as a whole; PostgreSQL has committed).
    pub fn save(&mut self) -> Result<()> {
        match self {
            Store::Local(ix) => ix.save(),
            Store::Pg(_) => Ok(()),
        }
    }

    /// How many distinct sources the chunks come from.
    pub fn sources(&mut self) -> Result<usize> {
        match self {
            Store::Local(ix) => {
                let mut s: Vec<&str> = ix.chunks().iter().map(|c| c.source.as_str()).collect();
                s.sort_unstable();
                s.dedup();
                Ok(s.len())
            }
            Store::Pg(ix) => ix.sources(),
        }
    }
}
