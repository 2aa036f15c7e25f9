//! The harness crate (`interceptor-tests`) finds its programs through environment variables;
//! the demo and the benchmark set them from what they built and what setup found.

use std::path::Path;

use crate::setup;

/// Sets `INTERCEPTOR_BIN` to `interceptor` (when given), and `PG_BIN_DIR` (unless already set) to the newest
/// complete PostgreSQL installation. Call before starting any thread: it writes the environment.
pub fn point_at(interceptor: Option<&Path>) {
    if let Some(bin) = interceptor {
        // SAFETY: called from main before any other thread exists, so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("INTERCEPTOR_BIN", bin) };
    }
    if std::env::var_os("PG_BIN_DIR").is_none()
        && let Some(dir) = setup::postgres_bin_dir()
    {
        // SAFETY: as above.
        unsafe { std::env::set_var("PG_BIN_DIR", dir) };
    }
}
