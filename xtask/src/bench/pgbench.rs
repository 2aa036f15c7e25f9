//! Reading pgbench's summary. Only the figures the benchmark needs are taken; a run that
//! reports failed transactions or lacks a figure is an error, never a zero.

use thiserror::Error;

/// The summary of one pgbench run.
#[derive(Debug, Clone, PartialEq)]
pub struct PgbenchSummary {
    /// Transactions per second, excluding connection time.
    pub tps: f64,
    /// Average latency of one transaction in milliseconds.
    pub latency_ms: f64,
    /// Transactions completed.
    pub transactions: u64,
}

#[derive(Debug, Error, PartialEq)]
pub enum PgbenchParseError {
    #[error("pgbench output has no `{0}` line")]
    Missing(&'static str),
    #[error("pgbench output has an unreadable `{0}` line")]
    Unreadable(&'static str),
    #[error("pgbench reported {0} failed transactions")]
    FailedTransactions(u64),
}

const TPS: &str = "tps = ";
const LATENCY: &str = "latency average = ";
const PROCESSED: &str = "number of transactions actually processed: ";
const FAILED: &str = "number of failed transactions: ";

/// Parses pgbench's (PostgreSQL 13+) end-of-run report from its stdout.
pub fn parse(stdout: &str) -> Result<PgbenchSummary, PgbenchParseError> {
    let value_after = |prefix: &'static str| -> Result<&str, PgbenchParseError> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .ok_or(PgbenchParseError::Missing(
                prefix.trim_end_matches([' ', '=', ':']),
            ))
    };
    let first_word = |prefix: &'static str| -> Result<&str, PgbenchParseError> {
        value_after(prefix)?
            .split_whitespace()
            .next()
            .ok_or(PgbenchParseError::Unreadable(
                prefix.trim_end_matches([' ', '=', ':']),
            ))
    };
    let number = |prefix: &'static str| -> Result<f64, PgbenchParseError> {
        first_word(prefix)?
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or(PgbenchParseError::Unreadable(
                prefix.trim_end_matches([' ', '=', ':']),
            ))
    };
    let count = |prefix: &'static str| -> Result<u64, PgbenchParseError> {
        first_word(prefix)?
            .parse::<u64>()
            .map_err(|_| PgbenchParseError::Unreadable(prefix.trim_end_matches([' ', '=', ':'])))
    };

    // Older pgbench has no failed-transactions line; when present it must say zero.
    if stdout.lines().any(|l| l.trim().starts_with(FAILED)) {
        let failed = count(FAILED)?;
        if failed > 0 {
            return Err(PgbenchParseError::FailedTransactions(failed));
        }
    }
    let latency_line = value_after(LATENCY)?;
    if !latency_line.trim_end().ends_with(" ms") {
        return Err(PgbenchParseError::Unreadable("latency average"));
    }
    Ok(PgbenchSummary {
        tps: number(TPS)?,
        latency_ms: number(LATENCY)?,
        transactions: count(PROCESSED)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verbatim output of pgbench 15.18 (select-only, prepared, 8 clients) on this machine.
    const PG15_SELECT_ONLY: &str = "pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: prepared
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 65919
number of failed transactions: 0 (0.000%)
latency average = 0.241 ms
initial connection time = 31.119 ms
tps = 33183.956280 (without initial connection time)
";

    #[test]
    fn reads_tps_latency_and_count_from_pg15_output() {
        let s = parse(PG15_SELECT_ONLY).unwrap();
        assert_eq!(s.transactions, 65919);
        assert!((s.tps - 33183.956280).abs() < 1e-6);
        assert!((s.latency_ms - 0.241).abs() < 1e-9);
    }

    #[test]
    fn failed_transactions_are_an_error() {
        let out = PG15_SELECT_ONLY.replace(
            "number of failed transactions: 0 (0.000%)",
            "number of failed transactions: 12 (0.018%)",
        );
        assert_eq!(parse(&out), Err(PgbenchParseError::FailedTransactions(12)));
    }

    #[test]
    fn a_missing_or_garbled_figure_is_an_error_not_zero() {
        let no_tps: String = PG15_SELECT_ONLY
            .lines()
            .filter(|l| !l.starts_with("tps"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse(&no_tps), Err(PgbenchParseError::Missing("tps")));
        let garbled = PG15_SELECT_ONLY.replace("tps = 33183.956280", "tps = fast");
        assert_eq!(parse(&garbled), Err(PgbenchParseError::Unreadable("tps")));
        let nan = PG15_SELECT_ONLY.replace("tps = 33183.956280", "tps = NaN");
        assert_eq!(parse(&nan), Err(PgbenchParseError::Unreadable("tps")));
        assert_eq!(
            parse("pgbench: error: connection to server failed\n"),
            Err(PgbenchParseError::Missing("latency average"))
        );
    }
}
