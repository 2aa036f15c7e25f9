//! Log output: human-readable lines (coloured only on a terminal) or JSON lines (with
//! `--log-format json`, and by default under systemd, whose journal keeps the fields).

use std::io::IsTerminal;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON under systemd (stderr is the journal stream), text otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

impl LogFormat {
    /// The format `Auto` stands for in this process.
    pub(crate) fn resolve(self) -> LogFormat {
        match self {
            LogFormat::Auto if stderr_is_journal() => LogFormat::Json,
            LogFormat::Auto => LogFormat::Text,
            other => other,
        }
    }
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` for a service whose stderr is the journal; the
/// variable is inherited by children whose stderr may be elsewhere, so the device and inode of
/// stderr are compared with it, as systemd's documentation asks.
pub(crate) fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    // stat() through the magic link describes the open file itself, sockets included.
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    meta.dev() == dev && meta.ino() == ino
}

/// Colours only when a person reads the output: stderr is a terminal and `NO_COLOR` is unset.
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. The filter comes from `INTERCEPTOR_LOG` (default `info`).
/// Every line logged inside a session carries the session span's fields (peer, user,
/// database, session id, identity): text lines prefix them, JSON lines list them in `spans`.
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("INTERCEPTOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.resolve() {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
        _ => builder.with_ansi(colours()).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_formats_are_kept() {
        assert_eq!(LogFormat::Json.resolve(), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(), LogFormat::Text);
    }
}
