//! Taking one measurement: a pgbench run or a timed 1M-row stream through psql.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor_tests::{ConnParams, PgCommand};

use super::pgbench;
use super::report::Measurements;
use super::scenario::{Masking, Scenario, Script, Target};

/// How clients reach each target, and the files their workloads need.
pub struct Endpoints {
    pub direct: ConnParams,
    /// Unless skipped.
    pub interceptor: Option<ProxyEndpoint>,
    /// The interceptor with its audit store on tmpfs (100-row cases), unless skipped.
    pub interceptor_tmpfs: Option<ProxyEndpoint>,
    /// The interceptor with `[audit] durability = "write"` (pgbench cases), unless skipped.
    pub interceptor_write: Option<ProxyEndpoint>,
    pub pgbouncer: Option<ConnParams>,
    /// pgbouncer's process id, for its CPU time.
    pub pgbouncer_pid: Option<u32>,
    /// The pgbench script of the 100-row cases.
    pub rows100_script: PathBuf,
    /// The audit directory of the fsync interceptor (on disk), where the disk's `fdatasync`
    /// latency is probed while each of its runs goes on.
    pub fsync_audit_dir: Option<PathBuf>,
}

/// interceptor's identities (one per [`Masking`]) and its process id.
pub struct ProxyEndpoint {
    pub unmasked: ConnParams,
    pub mask_column: ConnParams,
    pub mask_detectors: ConnParams,
    pub pid: u32,
}

impl ProxyEndpoint {
    pub fn params(&self, masking: Masking) -> &ConnParams {
        match masking {
            Masking::None => &self.unmasked,
            Masking::Column => &self.mask_column,
            Masking::Detectors => &self.mask_detectors,
        }
    }
}

impl Endpoints {
    pub fn params(&self, target: Target, masking: Masking) -> Option<&ConnParams> {
        match (target, masking) {
            (Target::Interceptor, m) => self.interceptor.as_ref().map(|p| p.params(m)),
            (Target::InterceptorTmpfs, m) => self.interceptor_tmpfs.as_ref().map(|p| p.params(m)),
            (Target::InterceptorWrite, m) => self.interceptor_write.as_ref().map(|p| p.params(m)),
            // Only interceptor masks: a masked case has no other target.
            (_, Masking::Column | Masking::Detectors) => None,
            (Target::Direct, Masking::None) => Some(&self.direct),
            (Target::Pgbouncer, Masking::None) => self.pgbouncer.as_ref(),
        }
    }

    /// Whether this run measures `scenario` against `target`.
    pub fn has(&self, scenario: Scenario, target: Target) -> bool {
        scenario.runs_on(target) && self.params(target, scenario.masking()).is_some()
    }
}

impl Endpoints {
    /// The process whose CPU time a run against `target` is charged to (not PostgreSQL's).
    pub fn proxy_pid(&self, target: Target) -> Option<u32> {
        match target {
            Target::Interceptor => self.interceptor.as_ref().map(|p| p.pid),
            Target::InterceptorTmpfs => self.interceptor_tmpfs.as_ref().map(|p| p.pid),
            Target::InterceptorWrite => self.interceptor_write.as_ref().map(|p| p.pid),
            Target::Pgbouncer => self.pgbouncer_pid,
            Target::Direct => None,
        }
    }
}

/// Runs `scenario` against `target` once and returns its figure in the scenario's unit.
/// A stream through interceptor also records interceptor's peak RSS in `m`; a pgbench run
/// through a proxy records the proxy's CPU time per transaction.
pub fn one(
    scenario: Scenario,
    target: Target,
    endpoints: &Endpoints,
    duration: Duration,
    m: &mut Measurements,
) -> Result<f64> {
    let params = endpoints
        .params(target, scenario.masking())
        .with_context(|| format!("{} is not part of this run", target.name()))?;
    if let Some(case) = scenario.pgbench() {
        let mut args = case.common_args(duration);
        match case.script {
            Script::TpcB => {}
            Script::SelectOnly => args.push("-S".to_string()),
            Script::Rows100 => {
                args.push("-f".to_string());
                args.push(endpoints.rows100_script.display().to_string());
            }
        }
        let pid = endpoints.proxy_pid(target);
        let cpu_before = pid.map(cpu_ticks).transpose()?;
        let probe = match (&endpoints.fsync_audit_dir, target) {
            (Some(dir), Target::Interceptor) => Some(SyncProbe::start(dir)?),
            _ => None,
        };
        let out = PgCommand::pgbench(params)
            .args(args)
            .timeout(duration + Duration::from_secs(60))
            .run();
        if let Some(probe) = probe {
            let times = probe.stop()?;
            if let Some(median) = super::stats::median(&times) {
                m.record_fdatasync_during(scenario, median);
            }
        }
        let out = out?.ok()?;
        let summary = pgbench::parse(&out.stdout)?;
        if let (Some(pid), Some(before)) = (pid, cpu_before) {
            let ticks = cpu_ticks(pid)?.saturating_sub(before);
            if summary.transactions > 0 {
                let us =
                    ticks as f64 * 1e6 / clock_ticks_per_second() / summary.transactions as f64;
                m.record_cpu(scenario, target, us);
            }
        }
        return Ok(match scenario.unit() {
            super::scenario::Unit::Ms => summary.latency_ms,
            _ => summary.tps,
        });
    }
    // The only non-pgbench scenarios: the streams.
    let pid = match target {
        Target::Pgbouncer => None,
        t => endpoints.proxy_pid(t),
    };
    if let Some(pid) = pid {
        reset_peak_rss(pid)?;
    }
    let seconds = stream(params)?.as_secs_f64();
    if let Some(pid) = pid {
        m.record_peak_rss(scenario, peak_rss_kib(pid)?);
    }
    Ok(seconds)
}

/// The pgbench script of the 100-row cases: a random window of 100 consecutive accounts
/// (`aid` is the primary key, so PostgreSQL's own cost stays small and constant).
pub fn rows100_script(scale: u32) -> String {
    let rows = u64::from(scale.max(1)) * 100_000;
    format!(
        "\\set aid random(1, {})\nSELECT * FROM pgbench_accounts WHERE aid BETWEEN :aid AND :aid + 99;\n",
        rows - 99
    )
}

/// `psql -At -c 'SELECT * FROM pgbench_accounts'` for `params`, with nothing from the
/// caller's environment but PATH.
fn stream_command(params: &ConnParams) -> Command {
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
        ]);
    psql
}

/// The bytes `psql -At` prints for the whole stream: every field's text plus one separator
/// or newline per field. Divided by a stream's seconds this gives the MB/s of streamed text.
pub fn stream_bytes(params: &ConnParams) -> Result<u64> {
    let mut psql = stream_command(params);
    psql.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = psql.spawn().context("run psql")?;
    let mut stdout = child.stdout.take().context("psql stdout")?;
    let bytes = std::io::copy(&mut stdout, &mut std::io::sink()).context("read psql output")?;
    let status = child.wait().context("wait for psql")?;
    if !status.success() {
        bail!("psql stream failed ({status})");
    }
    Ok(bytes)
}

/// Runs `sql` through `psql -At` and returns its output: the benchmark's check that an
/// identity's masking rules are really in force before their cost is measured.
pub fn psql_output(params: &ConnParams, sql: &str) -> Result<String> {
    let out = PgCommand::psql(params)
        .args(["-X", "-At", "-c", sql])
        .run()?
        .ok()?;
    Ok(out.stdout)
}

/// `psql -At -c 'SELECT * FROM pgbench_accounts' > /dev/null`, timed.
pub fn stream(params: &ConnParams) -> Result<Duration> {
    let mut psql = stream_command(params);
    psql.stdin(Stdio::null())
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

/// User + system CPU time of a process, all its threads, in clock ticks (`/proc/PID/stat`
/// fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("unreadable /proc/{pid}/stat"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The latency of one `fdatasync` after appending 4 KiB, as the audit writer does per group
/// commit, on the filesystem of `dir`: the median of `rounds`. With `durability = "fsync"`
/// and N closed-loop clients, N / this latency is the most statements per second an audit
/// trail that syncs before every statement can allow (the fsync ceiling).
pub fn fdatasync_latency(dir: &std::path::Path, rounds: usize) -> Result<Duration> {
    use std::io::Write;
    let path = dir.join(format!("bench-fdatasync-probe.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut times = Vec::with_capacity(rounds);
    let r = (|| -> Result<()> {
        for _ in 0..rounds.max(1) {
            let t = Instant::now();
            file.write_all(&block).context("write probe")?;
            file.sync_data().context("fdatasync probe")?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    r?;
    let median = super::stats::median(&times).context("no fdatasync timed")?;
    Ok(Duration::from_secs_f64(median))
}

/// Times `fdatasync` on the audit filesystem while a run goes on: the disk's latency as the
/// fsync interceptor met it, not as it was before or after (a shared disk's latency moves with
/// whatever else writes to it). One 4 KiB append and `fdatasync` every 20 ms, a load far below
/// the interceptor's own.
pub struct SyncProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<f64>>>,
}

impl SyncProbe {
    pub fn start(dir: &std::path::Path) -> Result<SyncProbe> {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let path = dir.join(format!("bench-fdatasync-during.{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("create {}", path.display()))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let block = [0x5au8; 4096];
            let mut times = Vec::new();
            let r = (|| -> Result<()> {
                while !flag.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    file.write_all(&block).context("write probe")?;
                    file.sync_data().context("fdatasync probe")?;
                    times.push(t.elapsed().as_secs_f64());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            })();
            let _ = std::fs::remove_file(&path);
            r.map(|()| times)
        });
        Ok(SyncProbe { stop, thread })
    }

    /// The latencies timed, seconds.
    pub fn stop(self) -> Result<Vec<f64>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("fdatasync probe thread panicked"))?
    }
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
    fn cpu_ticks_are_utime_plus_stime_even_with_spaces_in_the_name() {
        let stat = "4242 (tokio (w) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(267));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        // Our own process has spent some CPU by now, and the figure only grows.
        let me = std::process::id();
        let a = cpu_ticks(me).unwrap();
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_ticks(me).unwrap() >= a);
    }

    #[test]
    fn fdatasync_latency_is_measured_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = fdatasync_latency(dir.path(), 5).unwrap();
        assert!(d > Duration::ZERO && d < Duration::from_secs(5), "{d:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
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
