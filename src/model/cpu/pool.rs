//! The thread pool of the forward pass's parallel loops (products, attention).
//!
//! A decoding step runs about 160 short parallel loops (four products and an attention per
//! layer), each a few tens of microseconds. Rayon wakes its sleeping workers for each one, which
//! cost about 19 µs a loop on the 2-vCPU VMs we measure on (futex wake-ups and scheduler round
//! trips): a few milliseconds per token. Here the workers spin on a shared counter for a short
//! while after each loop (between the loops of one step they never sleep) and park only when no
//! work has come for `SPIN`, so a machine with other work loses little, and an idle one hands a
//! loop to its workers in well under a microsecond.
//!
//! Tasks are taken from a shared counter, so a worker that the OS has descheduled (another
//! process busy on its core) simply takes fewer of them.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// Where a parallel loop runs: on the pool, or on the calling thread alone (for measurements of
/// one core's speed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    Pool,
    Serial,
}

impl Exec {
    pub fn run(self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        match self {
            Exec::Pool => Pool::global().run(tasks, f),
            Exec::Serial => (0..tasks).for_each(f),
        }
    }

    pub fn threads(self) -> usize {
        match self {
            Exec::Pool => Pool::global().threads(),
            Exec::Serial => 1,
        }
    }

    /// Runs `f(i, &mut items[i])` for every item, each item in a task of its own (the rows of a
    /// step's small serial stages: each is independent of the others).
    pub fn for_each_mut<I: Send>(self, items: &mut [I], f: &(dyn Fn(usize, &mut I) + Sync)) {
        let base = Items(items.as_mut_ptr());
        let n = items.len();
        self.run(n, &|i| {
            assert!(i < n, "for_each_mut: task {i} of {n}");
            // SAFETY: `run` calls each index below `n` exactly once, so no two tasks hold the
            // same item, and `items` is borrowed mutably until every task has finished.
            f(i, unsafe { &mut *base.at(i) })
        });
    }
}

/// The items of `for_each_mut`, shared with the tasks (each takes its own).
struct Items<I>(*mut I);
// SAFETY: each item goes to one task only, so sharing the pointer hands each item to one thread,
// which `I: Send` allows.
unsafe impl<I: Send> Sync for Items<I> {}
impl<I> Items<I> {
    fn at(&self, i: usize) -> *mut I {
        self.0.wrapping_add(i)
    }
}

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

/// The type-erased loop body: `f(i)` for task `i`.
type Body = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Even: a job is published (or none); odd: the caller is writing a new one.
    epoch: AtomicUsize,
    /// Workers inside the current job.
    active: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    tasks: AtomicUsize,
    panicked: AtomicBool,
    body: UnsafeCell<Option<Body>>,
    parked: Vec<AtomicBool>,
    threads: OnceLock<Vec<Thread>>,
}

// SAFETY: `body` is only written while no worker is inside a job (see `Pool::run`), and read by
// workers only between their check of `epoch` and their exit, so reads never race writes.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    /// One caller at a time.
    caller: Mutex<()>,
    workers: usize,
}

impl Pool {
    /// The pool of this process: as many threads as rayon's (`--threads`), the caller included.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(rayon::current_num_threads().max(1)))
    }

    fn new(threads: usize) -> Pool {
        let workers = threads - 1;
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            body: UnsafeCell::new(None),
            parked: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            threads: OnceLock::new(),
        });
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name(format!("zagreus-{w}"))
                .spawn(move || worker(&s, w))
            {
                Ok(h) => handles.push(h.thread().clone()),
                // Without the thread the caller does all the work; nothing else changes.
                Err(_) => break,
            }
        }
        let workers = handles.len();
        let _ = shared.threads.set(handles);
        Pool {
            shared,
            caller: Mutex::new(()),
            workers,
        }
    }

    /// Threads that run a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(i)` for every `i` in `0..tasks` on the pool's threads and the calling one, and
    /// returns when all have finished. A panic in any task is re-raised here.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.workers == 0 || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _one = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // Close the previous job: workers that have not entered it yet will see the odd epoch
        // and stay out; wait for those inside to leave before the job's fields are rewritten.
        s.epoch.fetch_add(1, SeqCst);
        wait_until(|| s.active.load(SeqCst) == 0);
        // SAFETY: the lifetime is erased for the workers' sake; `run` does not return before
        // every task that calls `f` has finished (the `done` count below), and workers only
        // call it for task indices below `tasks`.
        let body: Body = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Body>(f) };
        // SAFETY: no worker is inside a job (active == 0 under an odd epoch).
        unsafe { *s.body.get() = Some(body) };
        s.tasks.store(tasks, SeqCst);
        s.next.store(0, SeqCst);
        s.done.store(0, SeqCst);
        s.panicked.store(false, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if let Some(threads) = s.threads.get() {
            for (p, t) in s.parked.iter().zip(threads) {
                if p.load(SeqCst) {
                    t.unpark();
                }
            }
        }
        // The caller's own tasks; a panic in one is held until the workers are done with `f`.
        let mut mine = 0;
        loop {
            let i = s.next.fetch_add(1, SeqCst);
            if i >= tasks {
                break;
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
                s.panicked.store(true, SeqCst);
            }
            mine += 1;
        }
        wait_until(|| s.done.load(SeqCst) + mine >= tasks);
        if s.panicked.load(SeqCst) {
            panic!("a parallel task panicked");
        }
    }
}

/// Spins until `cond` holds, yielding the core after a while (a worker that holds a task may
/// have been descheduled and needs it).
fn wait_until(cond: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !cond() {
        spins = spins.saturating_add(1);
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn worker(s: &Shared, me: usize) {
    let mut seen = 0usize;
    loop {
        // Wait for a published job newer than the last one seen: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        let e = loop {
            let e = s.epoch.load(SeqCst);
            if e != seen && e.is_multiple_of(2) {
                break e;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                s.parked[me].store(true, SeqCst);
                let e = s.epoch.load(SeqCst);
                if e == seen || e % 2 == 1 {
                    std::thread::park_timeout(Duration::from_millis(50));
                }
                s.parked[me].store(false, SeqCst);
            } else {
                std::hint::spin_loop();
            }
        };
        seen = e;
        s.active.fetch_add(1, SeqCst);
        if s.epoch.load(SeqCst) == e {
            // SAFETY: the epoch is unchanged since this worker entered, so the caller is not
            // writing the job and waits for `active` to fall to 0 before it does.
            if let Some(body) = unsafe { *s.body.get() } {
                // SAFETY: the caller keeps `body` alive until every task is done.
                let f = unsafe { &*body };
                loop {
                    let tasks = s.tasks.load(SeqCst);
                    let i = s.next.fetch_add(1, SeqCst);
                    if i >= tasks {
                        break;
                    }
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
                        s.panicked.store(true, SeqCst);
                    }
                    s.done.fetch_add(1, SeqCst);
                }
            }
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once_across_many_loops() {
        let pool = Pool::new(3);
        for n in [1usize, 2, 3, 7, 64, 1000] {
            for _ in 0..200 {
                let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n={n}");
            }
        }
    }

    #[test]
    fn for_each_mut_hands_every_item_to_one_task() {
        for exec in [Exec::Pool, Exec::Serial] {
            for n in [0usize, 1, 2, 5, 64] {
                let mut items: Vec<(usize, u32)> = (0..n).map(|i| (i, 0)).collect();
                exec.for_each_mut(&mut items, &|i, item| {
                    assert_eq!(item.0, i);
                    item.1 += 1;
                });
                assert!(items.iter().all(|&(_, hits)| hits == 1), "{exec:?} n={n}");
            }
        }
    }

    #[test]
    fn parked_workers_wake_up_for_the_next_loop() {
        let pool = Pool::new(2);
        let sum = AtomicU64::new(0);
        pool.run(4, &|i| {
            sum.fetch_add(i as u64, SeqCst);
        });
        std::thread::sleep(Duration::from_millis(5));
        pool.run(4, &|i| {
            sum.fetch_add(i as u64, SeqCst);
        });
        assert_eq!(sum.load(SeqCst), 12);
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(16, &|i| {
                if i == 9 {
                    panic!("task 9");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let n = AtomicU64::new(0);
        pool.run(8, &|_| {
            n.fetch_add(1, SeqCst);
        });
        assert_eq!(n.load(SeqCst), 8);
    }
}
