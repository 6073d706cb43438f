//! A team of threads that stays awake between the short parallel loops of a decoding step.
//!
//! A decoding step of a real model is a hundred or more products of one row against a weight,
//! each a few tens of microseconds of work split over the cores. On rayon's pool every product
//! wakes a sleeping thread (a futex wake, then a context switch) and the thread goes back to
//! sleep during the sequential work before the next product: measured on a 135M Llama, about a
//! sixth of the step's time was spent in the kernel's wake and sleep paths. llama.cpp keeps its
//! threads polling between operations instead; this team does the same: its helper threads
//! poll for work (yielding the core to any other runnable thread) and sleep only after
//! [`STAY_AWAKE`] without any, so handing them a loop costs a few atomic operations.
//!
//! One loop runs on the team at a time. A caller that finds it busy (another thread's loop, or a
//! loop started from inside a team task) runs its loop on rayon's pool as before, so the team
//! never blocks and never deadlocks. Tasks are claimed one at a time from a shared counter: a
//! helper that is slow to wake (or preempted) leaves its share to the others, and the caller
//! never waits for a helper that has no task in hand.

use rayon::prelude::*;
use std::any::Any;
use std::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper keeps polling after its last task before it sleeps (a decoding step's
/// gaps between products are microseconds; a server between requests sleeps).
pub const STAY_AWAKE: Duration = Duration::from_millis(4);

/// Polls with the CPU's pause hint before a helper (or a caller waiting for the last tasks)
/// starts yielding its core.
const SPINS: u32 = 256;

type Task = &'static (dyn Fn(usize) + Sync);

/// A helper thread: its handle (to wake it) and whether it sleeps.
struct Helper {
    thread: Thread,
    sleeping: AtomicBool,
}

struct Team {
    /// Held by the caller whose loop the team runs.
    busy: AtomicBool,
    /// The current loop's epoch (high 32 bits) and the next task index to claim (low 32 bits).
    ticket: AtomicU64,
    /// The current loop's epoch (high 32 bits) and its number of tasks (low 32 bits), written
    /// before the loop's ticket.
    limit: AtomicU64,
    /// The current loop's task function (a reference on the caller's stack, valid until every
    /// claimed task is done).
    task: AtomicPtr<Task>,
    /// Tasks of the current loop finished (run, or panicked).
    done: AtomicUsize,
    /// The first panic of one of the loop's tasks, re-raised on the caller's thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    helpers: OnceLock<Vec<Helper>>,
}

const fn epoch(word: u64) -> u64 {
    word >> 32
}

const fn low(word: u64) -> usize {
    (word & 0xFFFF_FFFF) as usize
}

/// Whether ticket `t` names a task of the loop `lim` describes that is still to be claimed
/// (false with no loop in flight, all its tasks claimed, or a loop being published).
const fn unclaimed(t: u64, lim: u64) -> bool {
    epoch(lim) == epoch(t) && low(t) < low(lim)
}

impl Team {
    /// Claims the next task of the current loop and runs it; false when there is none.
    fn work(&self) -> bool {
        loop {
            let t = self.ticket.load(Acquire);
            if !unclaimed(t, self.limit.load(Acquire)) {
                return false;
            }
            if self
                .ticket
                .compare_exchange_weak(t, t + 1, SeqCst, Relaxed)
                .is_err()
            {
                continue;
            }
            // The claimed index is below the loop's task count, so the loop (and its task
            // function) lasts until this task is counted done.
            let f = self.task.load(Acquire);
            // SAFETY: `f` points to the caller's `Task`, which outlives every claimed task (the
            // caller returns only once `done` counts all of them).
            let f = unsafe { *f };
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(low(t)))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
            self.done.fetch_add(1, SeqCst);
            return true;
        }
    }

    /// Whether a task is waiting to be claimed.
    fn pending(&self) -> bool {
        unclaimed(self.ticket.load(SeqCst), self.limit.load(SeqCst))
    }

    fn helper_loop(&'static self, me: usize) {
        let mut last = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.work() {
                last = Instant::now();
                spins = 0;
                continue;
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else if last.elapsed() < STAY_AWAKE {
                std::thread::yield_now();
            } else {
                let h = &self
                    .helpers
                    .get()
                    .expect("helpers are set before they start")[me];
                h.sleeping.store(true, SeqCst);
                if !self.pending() {
                    std::thread::park();
                }
                h.sleeping.store(false, SeqCst);
                last = Instant::now();
                spins = 0;
            }
        }
    }

    /// Runs `f(0..tasks)` on the calling thread and the helpers; the caller holds `busy`.
    fn run(&'static self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: the reference is only used through `self.task` by tasks claimed below, and
        // this function returns (or unwinds) only after all of them are done.
        let f: Task = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Task>(f) };
        let next = epoch(self.ticket.load(Relaxed)) + 1;
        self.done.store(0, Relaxed);
        self.task.store(&f as *const Task as *mut Task, SeqCst);
        self.limit.store(next << 32 | tasks as u64, SeqCst);
        self.ticket.store(next << 32, SeqCst);
        for h in self.helpers.get().into_iter().flatten() {
            if h.sleeping.load(SeqCst) {
                h.thread.unpark();
            }
        }
        while self.work() {}
        let mut spins = 0u32;
        while self.done.load(Acquire) < tasks {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.busy.store(false, SeqCst);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }
}

/// The team, started on first use with one helper fewer than rayon's pool has threads (the
/// caller is the last member); `None` with a pool of one thread.
fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let helpers = rayon::current_num_threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        let team: &'static Team = Box::leak(Box::new(Team {
            busy: AtomicBool::new(false),
            ticket: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            helpers: OnceLock::new(),
        }));
        let mut started = Vec::new();
        for me in 0..helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("lmkit-team-{me}"))
                .spawn(move || team.helper_loop(me));
            match spawned {
                Ok(h) => started.push(Helper {
                    thread: h.thread().clone(),
                    sleeping: AtomicBool::new(false),
                }),
                // No thread to be had: the caller does the work with those that started.
                Err(_) => break,
            }
        }
        // A helper that looks for its entry before this is set waits in `work` (which does
        // not need it) until the first loop; `helper_loop` reads it only to sleep.
        let _ = team.helpers.set(started);
        Some(team)
    })
}

/// Runs `f(i)` for every `i` in `0..tasks`, spread over the calling thread and the team (or
/// over rayon's pool when the team is busy or there is none). Returns when all have run; a
/// panic in one is re-raised here after the others finish.
pub fn for_each(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if tasks == 0 {
        return;
    }
    if let Some(team) = team().filter(|_| tasks <= u32::MAX as usize) {
        if team
            .busy
            .compare_exchange(false, true, SeqCst, Relaxed)
            .is_ok()
        {
            return team.run(tasks, f);
        }
    }
    (0..tasks).into_par_iter().for_each(f);
}

/// `f(i, chunk i of data)` for the consecutive `chunk`-long pieces of `data` (the last may be
/// shorter), run as [`for_each`] runs its tasks.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    /// The start of `data`, shared by the tasks (each takes its own piece).
    struct Base<T>(*mut T);
    // SAFETY: the tasks reach disjoint pieces only (see below); T: Send lets them be mutated
    // from another thread.
    unsafe impl<T: Send> Sync for Base<T> {}
    impl<T> Base<T> {
        fn at(&self, i: usize) -> *mut T {
            self.0.wrapping_add(i)
        }
    }
    let (len, chunk) = (data.len(), chunk.max(1));
    let base = Base(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        // SAFETY: `for_each` runs each index once, so piece i (inside `data`, which this call
        // borrows mutably throughout) is reached by this task alone.
        let piece =
            unsafe { std::slice::from_raw_parts_mut(base.at(start), chunk.min(len - start)) };
        f(i, piece)
    });
}

/// `f(i)` for every `i` in `0..tasks`, computed as [`for_each`] runs them, in index order.
pub fn map<R: Send>(tasks: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut slots: Vec<Option<R>> = (0..tasks).map(|_| None).collect();
    for_each_chunk_mut(&mut slots, 1, |i, slot| slot[0] = Some(f(i)));
    slots
        .into_iter()
        .map(|s| s.expect("for_each runs every task"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_once_in_order_of_its_index() {
        for tasks in [1, 2, 3, 17, 1000] {
            let out = map(tasks, |i| i * i);
            assert_eq!(out, (0..tasks).map(|i| i * i).collect::<Vec<_>>());
        }
        let count = AtomicUsize::new(0);
        for_each(0, &|_| {
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), 0);
    }

    #[test]
    fn loops_from_many_threads_and_inside_tasks_all_finish() {
        // Callers that find the team busy take rayon's pool; a loop inside a task too.
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for round in 0..200 {
                        let sums = map(8, |i| map(3, |j| i + j + t + round).iter().sum::<usize>());
                        let want: Vec<usize> = (0..8).map(|i| 3 * (i + t + round) + 3).collect();
                        assert_eq!(sums, want);
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_is_raised_to_the_caller_and_the_team_stays_usable() {
        let r = std::panic::catch_unwind(|| {
            for_each(64, &|i| {
                if i == 37 {
                    panic!("task 37 fails");
                }
            })
        });
        let err = r.expect_err("the panic reaches the caller");
        let msg = err
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| err.downcast_ref::<String>().map(|s| s.as_str()))
            .unwrap_or("");
        assert!(msg.contains("task 37"), "{msg}");
        assert_eq!(map(5, |i| i + 1), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_loop_after_the_helpers_slept_wakes_them() {
        assert_eq!(map(4, |i| i), vec![0, 1, 2, 3]);
        std::thread::sleep(STAY_AWAKE * 3);
        let seen = Mutex::new(std::collections::HashSet::new());
        for_each(256, &|_| {
            seen.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(Duration::from_micros(200));
        });
        // With a helper (a pool of two or more threads), it takes part once woken.
        if team().is_some_and(|t| !t.helpers.get().unwrap().is_empty()) {
            assert!(seen.lock().unwrap().len() >= 2);
        }
    }
}
