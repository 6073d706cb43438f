//! The model worker: one thread owns the model (and its adapted variants, which share its
//! weights) and advances every active sequence by one token per round, the sequences of one
//! variant past their prompt in one batched pass (continuous batching: a new request joins at
//! the next round instead of waiting for the others to finish); the prompts that arrive are read
//! in the same pass, a long one in pieces over several rounds.

use crate::prefix::PrefixCache;
use lmkit_infer::{Decoder, Finish, GenerateOptions, Step};
use lmkit_models::{CausalLm, KvCache};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// What the worker reports for one sequence.
#[derive(Debug)]
pub enum Event {
    /// The sequence starts with this many of its prompt's tokens already read (their keys and
    /// values from an earlier sequence's: [`crate::prefix::PrefixCache`]); sent before its first
    /// token, and only where there are some.
    Cached(usize),
    /// The log-probabilities of the prompt's tokens after the first, sent first where the job
    /// asked for them ([`Job::prompt_logprobs`]).
    Prompt(Vec<lmkit_infer::TokenLogprobs>),
    /// A token, with its log-probabilities where the job asked for them.
    Token(u32, Option<lmkit_infer::TokenLogprobs>),
    /// The sequence ended, with the log-probability of the stop token that ended it where
    /// log-probabilities were asked for ([`Finish::Eos`]).
    Done(Finish, Option<f32>),
    Error(String),
    /// The request's own constraint ended the sequence: its grammar failed past the first token
    /// (a limit of the grammar engine's reached mid-way): the client's to fix.
    Invalid(String),
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
    /// Each token's log-probability and this many of the most likely tokens' are sent with it.
    pub logprobs: Option<usize>,
    /// The prompt's log-probabilities (this many of the most likely tokens' at each position)
    /// are sent before the first token ([`Event::Prompt`]); its keys and values are then read
    /// in a scoring pass (with the prompts of other such jobs queued beside it), not taken from
    /// the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// Frequency and presence penalties and biases applied to the logits it samples from.
    pub adjust: lmkit_infer::LogitAdjust,
}

/// The submitting side of the worker, with the count of jobs queued or running.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    stats: Arc<Busy>,
    max_queue: usize,
    /// Bytes of the KV budget the active sequences hold.
    kv_reserved: Arc<AtomicU64>,
    prefix: Arc<PrefixStats>,
}

/// The prompts' tokens and how many of them came from the prefix cache; its bytes and entries.
#[derive(Default)]
pub struct PrefixStats {
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub bytes: AtomicU64,
    pub entries: AtomicU64,
}

/// The worker's rounds so far and the time they took (the model's passes over the round's
/// decoding steps and prompt pieces, and sampling their tokens).
#[derive(Default)]
struct Busy {
    rounds: AtomicU64,
    nanos: AtomicU64,
}

/// What the active sequences' KV caches may take together: each sequence reserves, when it
/// starts decoding, the room its cache can come to need (its prompt and the most tokens it may
/// generate, within the model's context: what [`lmkit_infer::Decoder`] reserves), and a job
/// whose room does not fit beside the others' waits for sequences to finish — instead of the
/// caches growing until an allocation fails mid-round (on a GPU, every sequence of the round
/// failing; on the CPU, the process aborting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBudget {
    /// Bytes the caches may reserve together.
    pub bytes: u64,
    /// Bytes a cache takes per position (all layers' keys and values).
    pub per_position: u64,
}

impl KvBudget {
    /// The bytes `job`'s cache can come to take.
    fn need(&self, job: &Job) -> u64 {
        let most = job
            .prompt
            .len()
            .saturating_add(job.opts.max_tokens)
            .min(job.opts.max_positions)
            .max(lmkit_models::layers::kv_cache::FIRST_CAPACITY);
        self.per_position.saturating_mul(most as u64)
    }

    /// Why `job` can never start within this budget: its cache alone can come to need more
    /// than all of it (`None`: it fits once enough other sequences are done).
    pub fn refusal(&self, job: &Job) -> Option<String> {
        let need = self.need(job);
        (need > self.bytes).then(|| {
            format!(
                "this request's KV cache can reach {} ({} prompt tokens and up to {} new ones), more than the server's --kv-memory allows all sequences together ({}); ask for fewer tokens",
                lmkit_core::memory::gib(need as f64),
                job.prompt.len(),
                job.opts.max_tokens,
                lmkit_core::memory::gib(self.bytes as f64),
            )
        })
    }
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
    /// Starts the worker thread, which decodes within `cap` (see [`Capacity`]).
    pub fn start(models: Vec<CausalLm>, cap: Capacity) -> Engine {
        let max_queue = cap.max_queue.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel(max_queue);
        let depth = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let kv_reserved = Arc::new(AtomicU64::new(0));
        let prefix = Arc::new(PrefixStats::default());
        let stats = Arc::new(Busy::default());
        let counts = Counts {
            depth: depth.clone(),
            active: active.clone(),
            kv_reserved: kv_reserved.clone(),
            prefix: prefix.clone(),
            busy: stats.clone(),
        };
        std::thread::Builder::new()
            .name("lmkit-engine".into())
            .spawn(move || worker(models, rx, counts, cap))
            .expect("spawning the model thread");
        Engine {
            tx,
            depth,
            active,
            kv_reserved,
            prefix,
            stats,
            max_queue,
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

    /// Bytes of the KV budget the decoding sequences hold (0 without a budget).
    pub fn kv_reserved(&self) -> u64 {
        self.kv_reserved.load(Ordering::SeqCst)
    }

    /// The prompts' tokens so far, those of them read from the prefix cache, and its bytes and
    /// entries now.
    pub fn prefix_stats(&self) -> &PrefixStats {
        &self.prefix
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
    kv_reserved: Arc<AtomicU64>,
    prefix: Arc<PrefixStats>,
    busy: Arc<Busy>,
}

/// What the worker may take on (see [`Engine::start`]).
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Sequences decoded at once.
    pub max_active: usize,
    /// Jobs accepted (active ones included) before [`Engine::submit`] answers `Busy`.
    pub max_queue: usize,
    /// Prompt tokens read per round beside the decoding steps ([`Decoder::step_many`]).
    pub prompt_tokens: usize,
    /// What the active sequences' caches (and the prefix cache's entries) may take together.
    pub kv: Option<KvBudget>,
    /// Bytes the prefix cache may keep (0: none kept; see [`PrefixCache`]).
    pub prefix_cache: u64,
    /// Bytes a sequence's KV cache takes per position (0: the model's state does not grow
    /// with the text, and no prefix cache is kept).
    pub kv_per_position: u64,
}

struct Running {
    index: usize,
    model: usize,
    decoder: Decoder,
    events: UnboundedSender<(usize, Event)>,
    cancel: Arc<AtomicBool>,
    /// The bytes of the KV budget this sequence holds.
    kv_bytes: u64,
}

/// The active sequences and what they hold of the KV budget (also kept in `gauge`, for
/// [`Engine::kv_reserved`]); the prefix cache, which the sequences fill as they finish reading
/// their prompts and as they end.
struct Active {
    running: Vec<Running>,
    kv_reserved: u64,
    /// The KV budget's bytes (`None`: no budget).
    kv_budget: Option<u64>,
    gauge: Arc<AtomicU64>,
    prefix: Option<PrefixCache>,
    stats: Arc<PrefixStats>,
}

impl Active {
    fn reserve(&mut self, bytes: u64) {
        self.kv_reserved += bytes;
        self.gauge.store(self.kv_reserved, Ordering::SeqCst);
    }

    fn release(&mut self, bytes: u64) {
        self.kv_reserved -= bytes;
        self.gauge.store(self.kv_reserved, Ordering::SeqCst);
    }

    /// Whether `need` more bytes fit beside those reserved within the budget `kv` (always,
    /// without one).
    fn fits(&self, kv: Option<KvBudget>, need: u64) -> bool {
        kv.is_none_or(|b| self.kv_reserved + need <= b.bytes)
    }

    /// Has the prefix cache's entries give way to `need` more bytes beside those reserved.
    fn make_room(&mut self, kv: Option<KvBudget>, need: u64) {
        let Some(b) = kv else {
            return;
        };
        let limit = b.bytes.saturating_sub(self.kv_reserved + need);
        if self.prefix_bytes() > limit {
            if let Some(p) = &mut self.prefix {
                p.shrink_to(limit);
            }
            self.publish_prefix();
        }
    }

    /// The bytes the prefix cache holds.
    fn prefix_bytes(&self) -> u64 {
        self.prefix.as_ref().map_or(0, PrefixCache::bytes)
    }

    /// The bytes the prefix cache may hold beside the decoding sequences' room in the budget.
    fn prefix_room(&self) -> u64 {
        self.kv_budget
            .map_or(u64::MAX, |b| b.saturating_sub(self.kv_reserved))
    }

    /// Keeps in the prefix cache the prompts that this round's steps finished reading (a
    /// sequence's first token): the requests that arrive while these sequences decode — many
    /// with one system prompt or document — start from them instead of waiting for their end.
    fn keep_prompts(&mut self, steps: &[Option<lmkit_infer::Result<Step>>]) {
        let room = self.prefix_room();
        let Some(p) = &mut self.prefix else {
            return;
        };
        for (r, step) in self.running.iter().zip(steps) {
            if matches!(step, Some(Ok(Step::Token(_)))) && r.decoder.generated().len() == 1 {
                if let Some((tokens, cache)) = r.decoder.cached() {
                    p.insert(r.model, tokens, cache, room);
                }
            }
        }
        self.publish_prefix();
    }

    fn publish_prefix(&self) {
        if let Some(p) = &self.prefix {
            self.stats.bytes.store(p.bytes(), Ordering::Relaxed);
            self.stats.entries.store(p.len() as u64, Ordering::Relaxed);
        }
    }

    /// Keeps the sequences `keep` says yes to, releasing the others' share of the budget and
    /// their place in the queue's count; what the others read goes into the prefix cache.
    /// Returns the others, in their order (dropping one closes its client's channel).
    fn retain(
        &mut self,
        depth: &AtomicUsize,
        mut keep: impl FnMut(&Running) -> bool,
    ) -> Vec<Running> {
        let (running, ended): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| keep(r));
        self.running = running;
        // The counts first: the caller then tells the clients.
        self.kv_reserved -= ended.iter().map(|r| r.kv_bytes).sum::<u64>();
        self.gauge.store(self.kv_reserved, Ordering::SeqCst);
        depth.fetch_sub(ended.len(), Ordering::SeqCst);
        let room = self.prefix_room();
        if let Some(p) = &mut self.prefix {
            for r in &ended {
                if let Some((tokens, cache)) = r.decoder.cached() {
                    p.insert(r.model, tokens, cache, room);
                }
            }
            self.publish_prefix();
        }
        ended
    }
}

/// Whether a job offered to the worker was taken (started, or answered with an error) or must
/// wait for room in the KV budget.
enum Offer {
    Taken,
    Wait(Box<Job>),
}

/// Starts `job` where its cache fits beside the active sequences' within `kv` (any job fits an
/// empty worker unless it needs more than the whole budget: an error then).
fn offer(
    models: &[CausalLm],
    job: Job,
    scored: Option<KvCache>,
    active: &mut Active,
    kv: Option<KvBudget>,
    depth: &AtomicUsize,
) -> Offer {
    let fail = |events: &UnboundedSender<(usize, Event)>, index: usize, msg: String| {
        let _ = events.send((index, Event::Error(msg)));
        depth.fetch_sub(1, Ordering::SeqCst);
        Offer::Taken
    };
    if job.cancel.load(Ordering::SeqCst) || job.events.is_closed() {
        depth.fetch_sub(1, Ordering::SeqCst);
        return Offer::Taken;
    }
    let need = kv.map_or(0, |b| b.need(&job));
    if let Some(b) = kv {
        if let Some(msg) = b.refusal(&job) {
            return fail(&job.events, job.index, msg);
        }
    }
    if !active.fits(kv, need) {
        return Offer::Wait(Box::new(job));
    }
    // The prefix cache's entries give way to decoding sequences.
    active.make_room(kv, need);
    let Some(model) = models.get(job.model) else {
        return fail(&job.events, job.index, "no such model".into());
    };
    // (A job that asks for its prompt's log-probabilities comes here scored, by `score_jobs`.)
    let (prefix, cached) = match scored {
        Some(cache) => (Some(cache), 0),
        None => {
            let prefix = active
                .prefix
                .as_mut()
                .and_then(|p| p.lookup(job.model, &job.prompt));
            let cached = prefix.as_ref().map_or(0, |c| c.len());
            (prefix, cached)
        }
    };
    let decoder = match prefix {
        Some(c) => Decoder::with_prefix(model, &job.prompt, job.opts, c),
        None => Decoder::new(model, &job.prompt, job.opts),
    };
    match decoder {
        Ok(mut decoder) => {
            let s = &active.stats;
            s.prompt_tokens
                .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
            s.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
            if cached > 0 {
                let _ = job.events.send((job.index, Event::Cached(cached)));
            }
            if let Some(c) = job.constraint {
                decoder.constrain(c);
            }
            if let Some(top) = job.logprobs {
                decoder.keep_logprobs(top);
            }
            decoder.adjust_logits(job.adjust);
            active.running.push(Running {
                decoder,
                index: job.index,
                model: job.model,
                events: job.events,
                cancel: job.cancel,
                kv_bytes: need,
            });
            active.reserve(need);
            Offer::Taken
        }
        Err(e) => fail(&job.events, job.index, e.to_string()),
    }
}

/// Reads the prompts of `jobs` (which ask for their prompts' log-probabilities) together, each
/// model variant's in one pass ([`lmkit_infer::score_prompts`]), and sends each job its scores:
/// the jobs, in order, then continue from their prompts' caches (where one was kept). A job whose
/// prompt failed gets the error and is dropped; one for a variant not served goes on unscored
/// (its start answers it with an error).
fn score_jobs(
    models: &[CausalLm],
    jobs: Vec<Job>,
    depth: &AtomicUsize,
) -> Vec<(Job, Option<KvCache>)> {
    let mut results: Vec<Option<lmkit_infer::Result<lmkit_infer::Scores>>> =
        jobs.iter().map(|_| None).collect();
    for (m, model) in models.iter().enumerate() {
        let mine: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].model == m).collect();
        let prompts: Vec<(&[u32], usize)> = mine
            .iter()
            .map(|&i| {
                (
                    jobs[i].prompt.as_slice(),
                    jobs[i].prompt_logprobs.unwrap_or(0),
                )
            })
            .collect();
        for (i, r) in mine
            .into_iter()
            .zip(lmkit_infer::score_prompts(model, &prompts))
        {
            results[i] = Some(r);
        }
    }
    let mut out = Vec::with_capacity(jobs.len());
    for (mut job, r) in jobs.into_iter().zip(results) {
        match r {
            Some(r) => out.extend(scored(job, r, depth)),
            None => {
                job.prompt_logprobs = None;
                out.push((job, None));
            }
        }
    }
    out
}

/// Sends a scored job its prompt's scores and gives it back to start from its prompt's cache
/// (where one was kept); a job whose prompt failed gets the error and is dropped (`None`).
fn scored(
    mut job: Job,
    r: lmkit_infer::Result<lmkit_infer::Scores>,
    depth: &AtomicUsize,
) -> Option<(Job, Option<KvCache>)> {
    match r {
        Ok((scores, cache)) => {
            let _ = job.events.send((job.index, Event::Prompt(scores)));
            job.prompt_logprobs = None;
            Some((job, Some(cache).filter(|c| !c.is_empty())))
        }
        Err(e) => {
            let _ = job.events.send((job.index, Event::Error(e.to_string())));
            depth.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }
}

/// A prompt too long for a round being scored a part a round, and the bytes of the KV budget it
/// holds meanwhile: the room its sequence's cache can come to need.
struct Partial {
    job: Job,
    scoring: lmkit_infer::PromptScoring,
    kv_bytes: u64,
}

/// Reads up to `positions` more of a long scored prompt: it comes back while some of it remains;
/// else the job, its scores sent, goes to the front of `next` (dropped, its error sent, where the
/// pass failed) and its share of the budget is let go (the job reserves it again as it starts).
fn score_part(
    mut part: Partial,
    model: &CausalLm,
    positions: usize,
    next: &mut VecDeque<(Job, Option<KvCache>)>,
    active: &mut Active,
    depth: &AtomicUsize,
) -> Option<Partial> {
    match part.scoring.advance(model, positions) {
        Ok(false) => return Some(part),
        Ok(true) => {
            if let Some(j) = scored(part.job, Ok(part.scoring.finish()), depth) {
                next.push_front(j);
            }
        }
        Err(e) => drop(scored(part.job, Err(e), depth)),
    }
    active.release(part.kv_bytes);
    None
}

fn worker(models: Vec<CausalLm>, rx: Receiver<Job>, counts: Counts, cap: Capacity) {
    let Counts {
        depth,
        active: active_count,
        kv_reserved,
        prefix,
        busy,
    } = counts;
    let Capacity {
        max_active,
        prompt_tokens,
        kv,
        prefix_cache,
        kv_per_position,
        ..
    } = cap;
    let max_active = max_active.max(1);
    let mut sequences = Active {
        running: Vec::new(),
        kv_reserved: 0,
        kv_budget: kv.map(|b| b.bytes),
        gauge: kv_reserved,
        prefix: (prefix_cache > 0 && kv_per_position > 0)
            .then(|| PrefixCache::new(prefix_cache, kv_per_position)),
        stats: prefix,
    };
    // The next jobs in arrival order, taken from the queue: one waiting for room in the KV
    // budget (the jobs behind it wait too: first come, first served), and jobs whose prompts
    // were scored together, each with its prompt's cache where it kept one.
    let mut next: VecDeque<(Job, Option<KvCache>)> = VecDeque::new();
    let mut open = true;
    let gone = |j: &Job| j.cancel.load(Ordering::SeqCst) || j.events.is_closed();
    // Positions of prompts scored a round while sequences decode.
    let budget = if prompt_tokens == 0 {
        usize::MAX
    } else {
        prompt_tokens
    };
    // A prompt longer than that being scored a part a round. Jobs that decode start meanwhile
    // (a slot is kept for its sequence, whose room it holds); scored prompts behind it wait.
    let mut partial: Option<Partial> = None;
    loop {
        if sequences.running.is_empty() && next.is_empty() && partial.is_none() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(job) => next.push_back((job, None)),
                Err(_) => return,
            }
        }
        // Prompts scored this round: one batch a round while sequences decode, so that their
        // tokens keep coming between batches.
        let mut scored_batch = false;
        if let Some(part) = partial.take() {
            scored_batch = true;
            if gone(&part.job) {
                depth.fetch_sub(1, Ordering::SeqCst);
                sequences.release(part.kv_bytes);
            } else {
                let more = if sequences.running.is_empty() {
                    usize::MAX
                } else {
                    budget
                };
                let model = &models[part.job.model];
                partial = score_part(part, model, more, &mut next, &mut sequences, &depth);
            }
        }
        while sequences.running.len() + usize::from(partial.is_some()) < max_active {
            let (job, cache) = match next.pop_front() {
                Some(j) => j,
                None if !open => break,
                None => match rx.try_recv() {
                    Ok(job) => (job, None),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                },
            };
            if partial.is_some() && job.prompt_logprobs.is_some() && cache.is_none() {
                // One scored prompt is read at a time.
                next.push_front((job, None));
                break;
            }
            // A prompt is scored once its sequence's cache fits the budget (its cache is then
            // held until the sequence starts); until then it waits as `offer` has it wait.
            let need = kv.map_or(0, |b| b.need(&job));
            if job.prompt_logprobs.is_some()
                && cache.is_none()
                && !gone(&job)
                && kv.is_none_or(|b| b.refusal(&job).is_none())
                && sequences.fits(kv, need)
            {
                if scored_batch && !sequences.running.is_empty() {
                    // The decoding sequences' round first.
                    next.push_front((job, None));
                    break;
                }
                scored_batch = true;
                if job.prompt.len() > budget
                    && !sequences.running.is_empty()
                    && job.model < models.len()
                {
                    // Too long for a round: a part a round, the decoding sequences' tokens
                    // between the parts.
                    let model = &models[job.model];
                    let top = job.prompt_logprobs.unwrap_or(0);
                    let scoring = lmkit_infer::PromptScoring::new(model, &job.prompt, top);
                    sequences.make_room(kv, need);
                    sequences.reserve(need);
                    let part = Partial {
                        job,
                        scoring,
                        kv_bytes: need,
                    };
                    partial = score_part(part, model, budget, &mut next, &mut sequences, &depth);
                    if partial.is_some() {
                        break;
                    }
                    continue;
                }
                // This job's prompt and those of the scoring jobs queued right behind it, read
                // together, up to `prompt_tokens` positions (the prompt reading a decoding round
                // takes; a longer prompt alone); they then start in order.
                let room = max_active - sequences.running.len();
                let mut positions = job.prompt.len();
                // The bytes of the budget the batch's sequences will reserve as they start.
                let mut batch_need = need;
                let left = kv.map_or(u64::MAX, |b| b.bytes.saturating_sub(sequences.kv_reserved));
                // A job's bytes of the budget, if it joins the batch.
                let fits = |j: &Job, positions: usize, batch_need: u64| {
                    let need = kv.map_or(0, |b| b.need(j));
                    (j.prompt_logprobs.is_some()
                        && positions + j.prompt.len() <= budget
                        && batch_need + need <= left)
                        .then_some(need)
                };
                let mut batch = vec![job];
                while batch.len() < room {
                    match next.front() {
                        Some((j, None)) => {
                            let Some(need) = fits(j, positions, batch_need) else {
                                break;
                            };
                            positions += j.prompt.len();
                            batch_need += need;
                            batch.extend(next.pop_front().map(|(j, _)| j));
                            continue;
                        }
                        Some(_) => break,
                        None if !open => break,
                        None => {}
                    }
                    match rx.try_recv() {
                        Ok(j) => match fits(&j, positions, batch_need) {
                            Some(need) => {
                                positions += j.prompt.len();
                                batch_need += need;
                                batch.push(j);
                            }
                            None => {
                                next.push_back((j, None));
                                break;
                            }
                        },
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                // The prefix cache's entries give way to the batch's caches.
                sequences.make_room(kv, batch_need);
                for scored in score_jobs(&models, batch, &depth).into_iter().rev() {
                    next.push_front(scored);
                }
                continue;
            }
            if let Offer::Wait(job) = offer(&models, job, cache, &mut sequences, kv, &depth) {
                // (A scored prompt's cache is let go: the job reads its prompt when it starts.)
                next.push_front((*job, None));
                break;
            }
        }
        // A job waiting for room whose client has gone no longer holds up the queue.
        while next.front().is_some_and(|(j, _)| gone(j)) {
            next.pop_front();
            depth.fetch_sub(1, Ordering::SeqCst);
        }
        if sequences.running.is_empty() {
            // Nothing started (every job taken so far was answered with an error).
            continue;
        }
        active_count.store(sequences.running.len(), Ordering::SeqCst);
        drop(sequences.retain(&depth, |r| {
            !(r.cancel.load(Ordering::SeqCst) || r.events.is_closed())
        }));
        let active = &mut sequences.running;
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
        // Before the tokens go out: a client that has its first token finds its prompt kept.
        sequences.keep_prompts(&results);
        let mut results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Ok(Step::Done(Finish::Length))));
        // The last events of the sequences that end (`None`: a client already gone), sent once
        // what they read is kept: a client that has its answer finds it in the prefix cache.
        let mut last = Vec::new();
        let ended = sequences.retain(&depth, |r| {
            let (event, more) = match results.next().unwrap_or(Ok(Step::Done(Finish::Length))) {
                Ok(Step::Token(t)) => (Event::Token(t, r.decoder.last_logprobs().cloned()), true),
                // Its prompt is still being read (a client gone meanwhile is dropped at the
                // next round's start).
                Ok(Step::Pending) => return true,
                Ok(Step::Done(_)) if r.decoder.constraint_error().is_some() => (
                    Event::Invalid(r.decoder.constraint_error().unwrap_or_default().to_string()),
                    false,
                ),
                Ok(Step::Done(why)) => (
                    Event::Done(why, r.decoder.last_logprobs().map(|l| l.logprob)),
                    false,
                ),
                Err(e) => (Event::Error(e.to_string()), false),
            };
            if !more {
                last.push(Some(event));
                return false;
            }
            let sent = r.events.send((r.index, event)).is_ok();
            if !sent {
                last.push(None);
            }
            sent
        });
        for (r, event) in ended.iter().zip(last) {
            if let Some(event) = event {
                let _ = r.events.send((r.index, event));
            }
        }
        drop(ended);
        active_count.store(sequences.running.len(), Ordering::SeqCst);
    }
}
