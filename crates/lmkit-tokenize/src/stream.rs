//! Documents streamed from a reader thread through a bounded channel, so that training and
//! encoding never hold the whole corpus in memory.

use crate::error::{Result, TokenizeError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct DocStream {
    rx: Receiver<String>,
    reader: Option<JoinHandle<Result<()>>>,
    skipped: Arc<AtomicU64>,
    pub documents: u64,
    pub bytes: u64,
}

impl DocStream {
    /// Starts reading `inputs` (txt lines / JSONL records, plain or gzip) in the background.
    pub fn open(inputs: Vec<PathBuf>, ingest: lmkit_data::IngestOptions) -> DocStream {
        let (tx, rx) = sync_channel::<String>(8192);
        let skipped = Arc::new(AtomicU64::new(0));
        let counter = skipped.clone();
        let reader = std::thread::spawn(move || -> Result<()> {
            let mut count_skip = |s: lmkit_data::ingest::Skipped| {
                if s.is_bad() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            };
            for path in &inputs {
                let mut stopped = false;
                lmkit_data::ingest::read_docs(
                    path,
                    &ingest,
                    &mut |_| {},
                    &mut count_skip,
                    &mut |d| {
                        if !stopped && tx.send(d.text).is_err() {
                            stopped = true; // the consumer has gone: stop quietly
                        }
                        Ok(())
                    },
                )?;
                if stopped {
                    break;
                }
            }
            Ok(())
        });
        DocStream {
            rx,
            reader: Some(reader),
            skipped,
            documents: 0,
            bytes: 0,
        }
    }

    /// Up to `n` next documents (empty at the end).
    pub fn next_chunk(&mut self, n: usize) -> Vec<String> {
        self.by_ref().take(n).collect()
    }

    /// Bad records skipped so far (with `skip_bad`).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Waits for the reader and returns its error, if reading failed part-way.
    pub fn finish(mut self) -> Result<()> {
        // Drain so that a reader blocked on a full channel can finish.
        while self.rx.recv().is_ok() {}
        match self.reader.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(TokenizeError::Tokenizer(
                "the input reader thread panicked".into(),
            )),
            None => Ok(()),
        }
    }
}

impl Iterator for DocStream {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        let doc = self.rx.recv().ok()?;
        self.documents += 1;
        self.bytes += doc.len() as u64;
        Some(doc)
    }
}
