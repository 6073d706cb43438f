//! Documents streamed from a reader thread through a channel bounded in documents and in bytes,
//! so that training and encoding never hold the whole corpus in memory (nor many huge lines).

use crate::error::{Result, TokenizeError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Text read ahead of the consumer at most (beyond one document, which always goes through).
const READ_AHEAD_BYTES: usize = 64 << 20;

/// Bytes sent and not yet received, and whether the consumer has gone.
#[derive(Default)]
struct Budget {
    state: Mutex<(usize, bool)>,
    freed: Condvar,
}

impl Budget {
    /// Waits until `len` more bytes fit (or nothing is in flight); false when the consumer has gone.
    fn take(&self, len: usize) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.0 > 0 && s.0 + len > READ_AHEAD_BYTES && !s.1 {
            s = self.freed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.0 += len;
        !s.1
    }
    fn give(&self, len: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_sub(len);
        self.freed.notify_all();
    }
    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.freed.notify_all();
    }
}

pub struct DocStream {
    rx: Receiver<String>,
    reader: Option<JoinHandle<Result<()>>>,
    skipped: Arc<AtomicU64>,
    budget: Arc<Budget>,
    pub documents: u64,
    pub bytes: u64,
}

impl DocStream {
    /// Starts reading `inputs` (txt lines / JSONL records, plain or gzip) in the background.
    pub fn open(inputs: Vec<PathBuf>, ingest: lmkit_data::IngestOptions) -> DocStream {
        let (tx, rx) = sync_channel::<String>(8192);
        let skipped = Arc::new(AtomicU64::new(0));
        let counter = skipped.clone();
        let budget = Arc::new(Budget::default());
        let sender_budget = budget.clone();
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
                        if !stopped
                            && (!sender_budget.take(d.text.len()) || tx.send(d.text).is_err())
                        {
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
            budget,
            documents: 0,
            bytes: 0,
        }
    }

    /// The next documents, up to `n` of them or `max_bytes` of text (at least one document;
    /// empty at the end).
    pub fn next_chunk(&mut self, n: usize, max_bytes: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < n && (out.is_empty() || bytes < max_bytes) {
            match self.next() {
                Some(d) => {
                    bytes += d.len();
                    out.push(d);
                }
                None => break,
            }
        }
        out
    }

    /// Bad records skipped so far (with `skip_bad`).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Waits for the reader and returns its error, if reading failed part-way.
    pub fn finish(mut self) -> Result<()> {
        // Drain so that a reader blocked on a full channel can finish.
        while let Ok(d) = self.rx.recv() {
            self.budget.give(d.len());
        }
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
        self.budget.give(doc.len());
        self.documents += 1;
        self.bytes += doc.len() as u64;
        Some(doc)
    }
}

impl Drop for DocStream {
    /// A reader waiting for room stops once the consumer has gone.
    fn drop(&mut self) {
        self.budget.close();
    }
}
