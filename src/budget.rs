//! Budgets for running what a model's own files control: a chat template is a program (minijinja
//! gives it fuel, but a few steps that each double a string exhaust memory long before the fuel
//! runs out, and one `indent(10**12)` asks for a terabyte at once), and a tokenizer's
//! pre-tokenizer regex can backtrack for a long time or panic inside the regex engine.
//!
//! [`run`] executes such work on a worker thread under a memory and a time budget. The memory is
//! counted by this crate's global allocator for that thread only (one thread-local check per
//! allocation elsewhere). An allocation that would exceed the budget is never made: the worker
//! thread stops there for good, holding at most the budget, and the caller gets
//! [`Exceeded::Memory`]. A worker past its deadline is abandoned the same way. Panics become
//! errors ([`catch_panic`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How much a budgeted task may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes the task's thread may hold allocated at once.
    pub memory: usize,
    /// Wall-clock time.
    pub time: Duration,
}

/// Why a budgeted task was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exceeded {
    /// It tried to hold more than this many bytes.
    Memory(usize),
    /// It ran longer than this.
    Time(Duration),
    /// It panicked, with this message.
    Panic(String),
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Memory(n) => write!(f, "it needed more than {} MiB of memory", n >> 20),
            Exceeded::Time(t) => write!(f, "it ran for more than {} s", t.as_secs()),
            Exceeded::Panic(msg) => write!(f, "it failed: {msg}"),
        }
    }
}

const RUNNING: u8 = 0;
const OVER_MEMORY: u8 = 1;
const OVER_TIME: u8 = 2;

/// What the allocator and the waiting caller share about one task.
struct Account {
    used: AtomicUsize,
    limit: usize,
    deadline: Instant,
    state: AtomicU8,
    /// Set by the caller when it gave up waiting: the worker stops at its next allocation.
    abandoned: AtomicBool,
    caller: std::thread::Thread,
}

impl Account {
    /// Charges `size` bytes; false when the task must stop instead.
    fn charge(&self, size: usize) -> bool {
        let used = self.used.fetch_add(size, Ordering::Relaxed).saturating_add(size);
        if used > self.limit {
            self.stop(OVER_MEMORY);
            return false;
        }
        if self.abandoned.load(Ordering::Relaxed) {
            return false;
        }
        if Instant::now() > self.deadline {
            self.stop(OVER_TIME);
            return false;
        }
        true
    }

    fn credit(&self, size: usize) {
        // Memory allocated before the task began may be freed by it: never go below zero.
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(size)));
    }

    fn stop(&self, why: u8) {
        let _ = self
            .state
            .compare_exchange(RUNNING, why, Ordering::SeqCst, Ordering::SeqCst);
        self.caller.unpark();
    }
}

thread_local! {
    /// The account of the budgeted task running on this thread, if any.
    static ACCOUNT: Cell<*const Account> = const { Cell::new(std::ptr::null()) };
    /// Set while [`catch_panic`] runs: the panic hook stays quiet, the panic becomes an error.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

fn account() -> Option<&'static Account> {
    // A panicking thread is neither charged nor halted: the panic hook holds process-wide locks
    // (the panic output, the backtrace lock while it symbolizes) that a parked thread would keep
    // for good, and what the hook allocates is not the task's doing. The panic ends in
    // `catch_panic`; the next allocation past the budget halts.
    if std::thread::panicking() {
        return None;
    }
    let p = ACCOUNT.try_with(|a| a.get()).unwrap_or(std::ptr::null());
    // SAFETY: set only by `run`'s worker, which keeps the Arc alive for as long as it is set
    // (and forever once it stops inside the allocator).
    unsafe { p.as_ref() }
}

/// Whether an allocation of `size` bytes must halt the task.
fn must_halt(a: &Account, size: usize) -> bool {
    !a.charge(size)
}

/// Parks the worker thread for good: the only way to stop code that cannot be interrupted, without
/// making the allocation that would exceed its budget.
fn halt() -> ! {
    loop {
        #[cfg(unix)]
        // SAFETY: pause only waits for a signal.
        unsafe {
            libc::pause();
        }
        #[cfg(not(unix))]
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The system allocator with per-task accounting (see the module documentation).
pub struct Accounting;

// SAFETY: every call is forwarded to `System` unchanged; accounting only reads thread-locals and
// atomics and never allocates.
unsafe impl GlobalAlloc for Accounting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(a) = account() {
            if must_halt(a, layout.size()) {
                halt();
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(a) = account() {
            if must_halt(a, layout.size()) {
                halt();
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(a) = account() {
            a.credit(layout.size());
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let Some(a) = account() {
            if new_size > layout.size() {
                if must_halt(a, new_size - layout.size()) {
                    halt();
                }
            } else {
                a.credit(layout.size() - new_size);
            }
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Accounting = Accounting;

/// The worker threads' stack: deep but legal recursion (minijinja allows 500 nested calls) needs
/// more than a thread's default 2 MiB. Reserved, committed only as used.
const WORKER_STACK: usize = 64 << 20;

type Job = Box<dyn FnOnce() + Send>;

/// A thread that runs budgeted tasks one after another.
struct Worker {
    jobs: mpsc::Sender<Job>,
}

/// Workers waiting for a task: one is reused rather than a thread started per task (a template
/// is rendered and a prompt tokenized many times in a chat). A worker stopped by its budget never
/// comes back here.
static IDLE: Mutex<Vec<Worker>> = Mutex::new(Vec::new());

fn take_worker() -> std::io::Result<Worker> {
    if let Some(w) = IDLE.lock().ok().and_then(|mut idle| idle.pop()) {
        return Ok(w);
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("zagreus-budgeted".into())
        .stack_size(WORKER_STACK)
        .spawn(move || {
            for job in rx {
                job();
            }
        })?;
    Ok(Worker { jobs: tx })
}

/// Runs `task` on a worker thread under `limits`. Its result, or why it was stopped; a task
/// stopped for memory or time is abandoned (its thread waits forever, holding at most
/// `limits.memory`), so a caller should not run the same task again.
pub fn run<T, F>(limits: Limits, task: F) -> Result<T, Exceeded>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let account = Arc::new(Account {
        used: AtomicUsize::new(0),
        limit: limits.memory,
        deadline: Instant::now() + limits.time,
        state: AtomicU8::new(RUNNING),
        abandoned: AtomicBool::new(false),
        caller: std::thread::current(),
    });
    let slot: Arc<Mutex<Option<Result<T, String>>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let job: Job = {
        let (account, slot, done) = (account.clone(), slot.clone(), done.clone());
        Box::new(move || {
            ACCOUNT.with(|a| a.set(Arc::as_ptr(&account)));
            let out = catch_panic(task);
            ACCOUNT.with(|a| a.set(std::ptr::null()));
            if let Ok(mut s) = slot.lock() {
                *s = Some(out);
            }
            done.store(true, Ordering::SeqCst);
            account.caller.unpark();
        })
    };
    let worker = match take_worker() {
        Ok(w) => w,
        Err(e) => return Err(Exceeded::Panic(format!("cannot start a thread: {e}"))),
    };
    if worker.jobs.send(job).is_err() {
        return Err(Exceeded::Panic("the worker thread is gone".into()));
    }
    loop {
        if done.load(Ordering::SeqCst) {
            if let Ok(mut idle) = IDLE.lock() {
                idle.push(worker);
            }
            let out = slot.lock().ok().and_then(|mut s| s.take());
            return match out {
                Some(Ok(v)) => Ok(v),
                Some(Err(msg)) => Err(Exceeded::Panic(msg)),
                None => Err(Exceeded::Panic("the task ended without a result".into())),
            };
        }
        match account.state.load(Ordering::SeqCst) {
            OVER_MEMORY => return Err(Exceeded::Memory(limits.memory)),
            OVER_TIME => return Err(Exceeded::Time(limits.time)),
            _ => {}
        }
        let now = Instant::now();
        if now >= account.deadline {
            account.abandoned.store(true, Ordering::SeqCst);
            return Err(Exceeded::Time(limits.time));
        }
        std::thread::park_timeout((account.deadline - now).min(Duration::from_millis(100)));
    }
}

/// Runs `f`, turning a panic into an error carrying its message (and keeping the panic hook
/// quiet about it): for libraries that panic on input they should reject.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let before = CATCHING.with(|c| c.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(before));
    out.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

/// Whether this thread is inside [`catch_panic`] (the panic hook's question).
pub fn catching_panics() -> bool {
    CATCHING.try_with(|c| c.get()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        memory: 64 << 20,
        time: Duration::from_secs(20),
    };

    #[test]
    fn a_task_within_budget_returns_its_value() {
        assert_eq!(run(SMALL, || vec![1u8; 1 << 20].len()), Ok(1 << 20));
    }

    #[test]
    fn doubling_a_string_is_stopped_at_the_memory_budget() {
        let out = run(SMALL, || {
            let mut s = String::from("x");
            for _ in 0..40 {
                s = format!("{s}{s}");
            }
            s.len()
        });
        assert_eq!(out, Err(Exceeded::Memory(64 << 20)));
    }

    #[test]
    fn one_huge_allocation_is_never_made() {
        let out = run(SMALL, || vec![0u8; 1 << 40].len());
        assert_eq!(out, Err(Exceeded::Memory(64 << 20)));
    }

    #[test]
    fn a_task_past_its_deadline_is_abandoned() {
        let limits = Limits {
            memory: 64 << 20,
            time: Duration::from_millis(200),
        };
        let start = Instant::now();
        let out = run(limits, || loop {
            std::hint::black_box(vec![0u8; 16]);
        });
        assert_eq!(out, Err::<(), _>(Exceeded::Time(limits.time)));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn workers_are_reused_and_a_stopped_one_is_replaced() {
        // Tests run in parallel: other tasks may take the idle worker, so look for any reuse.
        let ids: Vec<_> = (0..20)
            .map(|_| run(SMALL, || std::thread::current().id()).unwrap())
            .collect();
        assert!(
            ids.iter().any(|id| ids.iter().filter(|j| *j == id).count() > 1),
            "{ids:?}"
        );
        assert_eq!(run(SMALL, || vec![0u8; 1 << 40].len()), Err(Exceeded::Memory(64 << 20)));
        assert_eq!(run(SMALL, || 7), Ok(7));
    }

    #[test]
    fn panics_become_errors() {
        let out = run(SMALL, || -> usize { panic!("regex backtracked") });
        assert_eq!(out, Err(Exceeded::Panic("regex backtracked".into())));
        assert_eq!(catch_panic(|| 3), Ok(3));
    }
}
