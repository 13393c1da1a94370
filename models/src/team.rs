//! A small team of threads for inference's CPU kernels (the quantized products of
//! `quant::kernels`, the cached attention of `fused::cached_attention`): the calling thread and
//! `threads − 1` helpers that wait for work by spinning (yielding) for a moment, then sleeping.
//!
//! Why not rayon: a decoding step is a few hundred products of tens of microseconds each, called
//! from a thread outside rayon's pool. Handing each one to rayon's workers parks the caller and
//! wakes a worker through the kernel every time; measured on SmolLM2-135M, those context switches
//! took more time than the products. Here the caller works on its own product and the helpers are
//! usually still awake from the previous one, as in llama.cpp's thread pool.
//!
//! One job runs at a time; a second caller arriving meanwhile (another thread generating) runs
//! its job alone rather than waiting.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// How many times an idle helper polls with a pause instruction before it starts yielding its
/// core (a few microseconds: the gap between two products of one decoding step).
const SPINS_BEFORE_YIELD: u32 = 2_000;
/// How many times it then yields before it goes to sleep (about 0.1-1 ms).
const SPINS_BEFORE_SLEEP: u32 = 4_000;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// `epoch << 1 | open`: a job is open while its low bit is set.
    state: AtomicU64,
    /// The open job (valid while `state` is open and for helpers counted in `active`).
    job: UnsafeCell<Option<&'static Job>>,
    tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Helpers that have entered the current job.
    active: AtomicUsize,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `Team::running` while no job is open and
// no helper is active, and read by helpers only inside an open job (see `Team::run`).
unsafe impl Sync for Shared {}

/// The kernels' threads (see the module docs).
pub(crate) struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    running: Mutex<()>,
}

impl Team {
    /// The process-wide team, sized like rayon's pool (`RAYON_NUM_THREADS`, else the cores).
    pub(crate) fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads().max(1)))
    }

    fn new(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut helpers = 0;
        for i in 1..threads {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kernel-{i}"))
                .spawn(move || helper(&s));
            // A helper that cannot be started only means less parallelism.
            if spawned.is_ok() {
                helpers += 1;
            }
        }
        Team {
            shared,
            helpers,
            running: Mutex::new(()),
        }
    }

    /// Threads that work on a job (the caller included).
    pub(crate) fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Calls `f(i)` for every `i` in `0..tasks`, spread over the team; returns when all are done.
    pub(crate) fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.running.try_lock() {
            Ok(g) if self.helpers > 0 && tasks > 1 => g,
            _ => {
                (0..tasks).for_each(f);
                return;
            }
        };
        let s = &*self.shared;
        // SAFETY: no job is open and no helper is active (the previous `run` waited for both),
        // so nobody reads `job` now. The lifetime is erased because helpers only call it before
        // this function returns (the wait for `active == 0` below).
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f));
        }
        s.tasks.store(tasks, SeqCst);
        s.next.store(0, SeqCst);
        s.done.store(0, SeqCst);
        let epoch = (s.state.load(SeqCst) >> 1) + 1;
        s.state.store(epoch << 1 | 1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _lock = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(s, f);
        while s.done.load(SeqCst) < tasks {
            std::hint::spin_loop();
        }
        s.state.store(epoch << 1, SeqCst);
        while s.active.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        drop(guard);
    }
}

/// Takes tasks of the open job until none is left.
fn work(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let tasks = s.tasks.load(SeqCst);
    loop {
        let i = s.next.fetch_add(1, SeqCst);
        if i >= tasks {
            return;
        }
        f(i);
        s.done.fetch_add(1, SeqCst);
    }
}

fn helper(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a job newer than the last one seen.
        let mut spins = 0;
        let state = loop {
            let state = s.state.load(SeqCst);
            if state & 1 == 1 && state != seen {
                break state;
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if spins < SPINS_BEFORE_SLEEP {
                spins += 1;
                std::thread::yield_now();
                continue;
            }
            let lock = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            let state = s.state.load(SeqCst);
            if !(state & 1 == 1 && state != seen) {
                let _unused = s.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
            spins = 0;
        };
        seen = state;
        s.active.fetch_add(1, SeqCst);
        // The job may have closed between the load above and the increment; then it is not ours
        // to touch (its caller may already have returned).
        if s.state.load(SeqCst) == state {
            // SAFETY: the job is open and we are counted in `active`, so `run` has not returned
            // and `job` holds its closure.
            if let Some(f) = unsafe { *s.job.get() } {
                work(s, f);
            }
        }
        s.active.fetch_sub(1, SeqCst);
    }
}
