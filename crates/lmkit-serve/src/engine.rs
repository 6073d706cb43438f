//! The model worker: one thread owns the model (and its adapted variants, which share its
//! weights) and advances every active sequence by one token per round, the sequences of one
//! variant past their prompt in one batched pass (continuous batching: a new request joins at
//! the next round instead of waiting for the others to finish); the prompts that arrive are read
//! in the same pass, a long one in pieces over several rounds.

use lmkit_infer::{Decoder, Finish, GenerateOptions, Step};
use lmkit_models::CausalLm;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// What the worker reports for one sequence.
#[derive(Debug)]
pub enum Event {
    Token(u32),
    Done(Finish),
    Error(String),
}

/// One sequence to decode. Events go to `events` tagged with `index`; the worker drops the job
/// when `cancel` is set or the receiving side is gone (a client that disconnected).
pub struct Job {
    pub index: usize,
    /// Which model variant decodes it (0: the base; then one per adapter).
    pub model: usize,
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub events: UnboundedSender<(usize, Event)>,
    pub cancel: Arc<AtomicBool>,
    /// A grammar the output must follow.
    pub constraint: Option<lmkit_infer::constrain::Constraint>,
}

/// The submitting side of the worker, with the count of jobs queued or running.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    stats: Arc<Busy>,
    max_queue: usize,
}

/// The worker's rounds so far and the time they took (the model's passes over the round's
/// decoding steps and prompt pieces, and sampling their tokens).
#[derive(Default)]
struct Busy {
    rounds: AtomicU64,
    nanos: AtomicU64,
}

/// Why a job was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The queue is full: try again later.
    Busy,
    /// The worker has stopped.
    Closed,
}

impl Engine {
    /// Starts the worker thread. At most `max_active` sequences decode at once; up to
    /// `max_queue` jobs (active ones included) are accepted before `submit` answers `Busy`;
    /// each round reads up to `prompt_tokens` prompt tokens beside the decoding steps
    /// ([`Decoder::step_many`]).
    pub fn start(
        models: Vec<CausalLm>,
        max_active: usize,
        max_queue: usize,
        prompt_tokens: usize,
    ) -> Engine {
        let (tx, rx) = std::sync::mpsc::sync_channel(max_queue.max(1));
        let depth = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Busy::default());
        let counts = Counts {
            depth: depth.clone(),
            active: active.clone(),
            busy: stats.clone(),
        };
        std::thread::Builder::new()
            .name("lmkit-engine".into())
            .spawn(move || worker(models, rx, counts, max_active.max(1), prompt_tokens))
            .expect("spawning the model thread");
        Engine {
            tx,
            depth,
            active,
            stats,
            max_queue: max_queue.max(1),
        }
    }

    /// Queues all `jobs` or none of them.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), Rejected> {
        let n = jobs.len();
        let before = self.depth.fetch_add(n, Ordering::SeqCst);
        if before + n > self.max_queue {
            self.depth.fetch_sub(n, Ordering::SeqCst);
            return Err(Rejected::Busy);
        }
        for (k, job) in jobs.into_iter().enumerate() {
            match self.tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    // Cannot happen while depth bounds the channel; keep the job rather than lose it.
                    if self.tx.send(job).is_err() {
                        self.depth.fetch_sub(n - k, Ordering::SeqCst);
                        return Err(Rejected::Closed);
                    }
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.depth.fetch_sub(n - k, Ordering::SeqCst);
                    return Err(Rejected::Closed);
                }
            }
        }
        Ok(())
    }

    /// Jobs queued or decoding.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Jobs decoding now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// The worker's rounds so far and the seconds they took: the model's own time, without
    /// HTTP, templates, tokenization or waiting for work.
    pub fn busy(&self) -> (u64, f64) {
        (
            self.stats.rounds.load(Ordering::Relaxed),
            self.stats.nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

/// What the worker keeps count of for the submitting side.
struct Counts {
    depth: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    busy: Arc<Busy>,
}

struct Running {
    index: usize,
    model: usize,
    decoder: Decoder,
    events: UnboundedSender<(usize, Event)>,
    cancel: Arc<AtomicBool>,
}

fn admit(models: &[CausalLm], job: Job, active: &mut Vec<Running>, depth: &AtomicUsize) {
    let Some(model) = models.get(job.model) else {
        let _ = job
            .events
            .send((job.index, Event::Error("no such model".into())));
        depth.fetch_sub(1, Ordering::SeqCst);
        return;
    };
    match Decoder::new(model, &job.prompt, job.opts) {
        Ok(mut decoder) => active.push(Running {
            decoder: {
                if let Some(c) = job.constraint {
                    decoder.constrain(c);
                }
                decoder
            },
            index: job.index,
            model: job.model,
            events: job.events,
            cancel: job.cancel,
        }),
        Err(e) => {
            let _ = job.events.send((job.index, Event::Error(e.to_string())));
            depth.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn worker(
    models: Vec<CausalLm>,
    rx: Receiver<Job>,
    counts: Counts,
    max_active: usize,
    prompt_tokens: usize,
) {
    let Counts {
        depth,
        active: active_count,
        busy,
    } = counts;
    let mut active: Vec<Running> = Vec::new();
    let mut open = true;
    loop {
        if active.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(job) => admit(&models, job, &mut active, &depth),
                Err(_) => return,
            }
        }
        while open && active.len() < max_active {
            match rx.try_recv() {
                Ok(job) => admit(&models, job, &mut active, &depth),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        active_count.store(active.len(), Ordering::SeqCst);
        active.retain(|r| {
            let gone = r.cancel.load(Ordering::SeqCst) || r.events.is_closed();
            if gone {
                depth.fetch_sub(1, Ordering::SeqCst);
            }
            !gone
        });
        // One step for every active sequence; those of one variant share one pass (with the
        // prompts' pieces that fit this round).
        let round = std::time::Instant::now();
        let mut results: Vec<Option<lmkit_infer::Result<Step>>> =
            (0..active.len()).map(|_| None).collect();
        for (m, model) in models.iter().enumerate() {
            let (slots, mut decoders): (Vec<usize>, Vec<&mut Decoder>) = active
                .iter_mut()
                .enumerate()
                .filter(|(_, r)| r.model == m)
                .map(|(i, r)| (i, &mut r.decoder))
                .unzip();
            if slots.is_empty() {
                continue;
            }
            for (slot, res) in
                slots
                    .into_iter()
                    .zip(Decoder::step_many(model, &mut decoders, prompt_tokens))
            {
                results[slot] = Some(res);
            }
        }
        let nanos = round.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        busy.nanos.fetch_add(nanos, Ordering::Relaxed);
        busy.rounds.fetch_add(1, Ordering::Relaxed);
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Ok(Step::Done(Finish::Length))));
        let keep: Vec<bool> = active
            .iter()
            .zip(results)
            .map(|(r, res)| {
                let (event, more) = match res {
                    Ok(Step::Token(t)) => (Event::Token(t), true),
                    // Its prompt is still being read (a client gone meanwhile is dropped at
                    // the next round's start).
                    Ok(Step::Pending) => return true,
                    Ok(Step::Done(_)) if r.decoder.constraint_error().is_some() => (
                        Event::Error(format!(
                            "constrained decoding: {}",
                            r.decoder.constraint_error().unwrap_or_default()
                        )),
                        false,
                    ),
                    Ok(Step::Done(why)) => (Event::Done(why), false),
                    Err(e) => (Event::Error(e.to_string()), false),
                };
                let keep = r.events.send((r.index, event)).is_ok() && more;
                if !keep {
                    depth.fetch_sub(1, Ordering::SeqCst);
                }
                keep
            })
            .collect();
        let mut keep = keep.into_iter();
        active.retain(|_| keep.next().unwrap_or(false));
        active_count.store(active.len(), Ordering::SeqCst);
    }
}
