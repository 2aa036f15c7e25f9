//! Kernel-side `aya-log` records, forwarded to `tracing` by a small polling thread.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use aya::Ebpf;
use aya_log::EbpfLogger;

const TARGET: &str = "interceptor::ebpf::kernel";

/// Forwards `log` records from aya-log to `tracing`, whatever `log` backend the process has.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{msg}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{msg}"),
            log::Level::Info => tracing::info!(target: TARGET, "{msg}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{msg}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Owns the log ring buffer (its fd must outlive program loading) and the thread draining it.
pub(super) struct KernelLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KernelLog {
    /// Must be called after loading the object and before loading the programs.
    pub(super) fn start(ebpf: &mut Ebpf) -> Option<KernelLog> {
        let mut logger = match EbpfLogger::init_with_logger(ebpf, TracingLog) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("kernel program logs unavailable: {e}");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ebpf-log".into())
            .spawn(move || {
                let fd = logger.as_raw_fd();
                while !stop2.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; the fd stays open while `logger` lives.
                    let n = unsafe { libc::poll(&mut pfd, 1, 500) };
                    if n > 0 {
                        logger.flush();
                    }
                }
            });
        match thread {
            Ok(t) => Some(KernelLog {
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                tracing::warn!("cannot start the kernel log thread: {e}");
                None
            }
        }
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
