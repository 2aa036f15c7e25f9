//! Taking one measurement: a pgbench run or a timed 1M-row stream through psql.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor_tests::{ConnParams, PgCommand};

use super::pgbench;
use super::report::Measurements;
use super::scenario::{Scenario, Target};

/// How clients reach each target.
pub struct Endpoints {
    pub direct: ConnParams,
    /// Connection parameters and process id, unless skipped.
    pub interceptor: Option<(ConnParams, u32)>,
    pub pgbouncer: Option<ConnParams>,
}

impl Endpoints {
    fn params(&self, target: Target) -> Option<&ConnParams> {
        match target {
            Target::Direct => Some(&self.direct),
            Target::Interceptor => self.interceptor.as_ref().map(|(p, _)| p),
            Target::Pgbouncer => self.pgbouncer.as_ref(),
        }
    }

    /// Whether this run measures `target`.
    pub fn has(&self, target: Target) -> bool {
        self.params(target).is_some()
    }
}

/// Runs `scenario` against `target` once and returns its figure in the scenario's unit.
/// The stream through interceptor also records interceptor's peak RSS in `m`.
pub fn one(
    scenario: Scenario,
    target: Target,
    endpoints: &Endpoints,
    duration: Duration,
    m: &mut Measurements,
) -> Result<f64> {
    let params = endpoints
        .params(target)
        .with_context(|| format!("{} is not part of this run", target.name()))?;
    if let Some(case) = scenario.pgbench() {
        let mut args = vec![
            "-n".to_string(),
            "-T".to_string(),
            duration.as_secs().to_string(),
            "-c".to_string(),
            case.clients.to_string(),
            "-j".to_string(),
            case.threads.to_string(),
            "-M".to_string(),
            case.mode.to_string(),
        ];
        if case.select_only {
            args.push("-S".to_string());
        }
        let out = PgCommand::pgbench(params)
            .args(args)
            .timeout(duration + Duration::from_secs(60))
            .run()?
            .ok()?;
        let summary = pgbench::parse(&out.stdout)?;
        return Ok(match scenario.unit() {
            super::scenario::Unit::Ms => summary.latency_ms,
            _ => summary.tps,
        });
    }
    // The only non-pgbench scenario: the stream.
    let pid = match (target, &endpoints.interceptor) {
        (Target::Interceptor, Some((_, pid))) => Some(*pid),
        _ => None,
    };
    if let Some(pid) = pid {
        reset_peak_rss(pid)?;
    }
    let seconds = stream(params)?.as_secs_f64();
    if let Some(pid) = pid {
        m.interceptor_stream_peak_rss_kib.push(peak_rss_kib(pid)?);
    }
    Ok(seconds)
}

/// `psql -At -c 'SELECT * FROM pgbench_accounts' > /dev/null`, timed.
pub fn stream(params: &ConnParams) -> Result<Duration> {
    let mut psql = Command::new("psql");
    psql.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(params.libpq_env())
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            "SELECT * FROM pgbench_accounts",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let out = psql.output().context("run psql")?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!(
            "psql stream failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(elapsed)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (`clear_refs` value 5).
fn reset_peak_rss(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("reset peak RSS of pid {pid}"))
}

/// VmHWM of a process in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    parse_vm_hwm(&status).context("no VmHWM line in /proc/PID/status")
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let mut words = value.split_whitespace();
    let kib = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_peak_rss_and_its_reset() {
        let pid = std::process::id();
        let before = peak_rss_kib(pid).unwrap();
        assert!(before > 0);
        // Touch 64 MiB so the peak must rise by at least that much.
        let big = vec![1u8; 64 << 20];
        assert!(big.iter().step_by(4096).all(|b| *b == 1));
        let high = peak_rss_kib(pid).unwrap();
        assert!(high >= 64 * 1024, "VmHWM {high} kB after touching 64 MiB");
        drop(big);
        reset_peak_rss(pid).unwrap();
        let after = peak_rss_kib(pid).unwrap();
        assert!(
            after < high,
            "reset did not lower VmHWM ({after} >= {high})"
        );
    }

    #[test]
    fn vm_hwm_parsing_requires_kb_units() {
        assert_eq!(
            parse_vm_hwm("Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t 1 kB\n"),
            Some(12345)
        );
        assert_eq!(parse_vm_hwm("VmRSS:\t 1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t 12 MB\n"), None);
    }
}
