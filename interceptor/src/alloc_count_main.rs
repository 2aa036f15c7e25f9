//! `interceptor-alloc-count run --config FILE`: the daemon, as `interceptor run`, with a
//! counting global allocator. A measurement build only (`--features alloc-count`, built by
//! `cargo xtask bench`), never shipped: every allocation bumps one relaxed atomic, and with
//! `INTERCEPTOR_ALLOC_COUNT_FILE` set a thread writes the running count to that file every
//! 50 ms (one decimal number, replaced by rename), so the benchmark can divide a pgbench
//! run's allocations by its statements.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static ALLOC: Counting = Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the counter has no
// effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn start_reporter() {
    let Some(path) = std::env::var_os("INTERCEPTOR_ALLOC_COUNT_FILE").map(PathBuf::from) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    let spawned = std::thread::Builder::new()
        .name("alloc-count".into())
        .spawn(move || {
            loop {
                let n = ALLOCATIONS.load(Ordering::Relaxed);
                if std::fs::write(&tmp, n.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
    if let Err(e) = spawned {
        eprintln!("alloc-count: cannot start the reporting thread: {e}");
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.as_slice() {
        [run, flag, path] if run == "run" && (flag == "--config" || flag == "-c") => {
            PathBuf::from(path)
        }
        _ => bail!("usage: interceptor-alloc-count run --config FILE"),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("INTERCEPTOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    start_reporter();
    let config = interceptor::config::Config::load(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(interceptor::server::run(config))
}
