//! `cargo xtask bench --profile`: where a proxy's CPU goes during select-only, 8 clients,
//! simple protocol. `perf record -g` samples the proxy process while pgbench runs; the report
//! keeps the share of samples per thread and the top symbols, written beside the bench results.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use interceptor_tests::{ConnParams, PgCommand};

use super::scenario::{Scenario, Script};

/// Lines of each `perf report` section kept in the summary.
const TOP: usize = 25;

/// Profiles the process `pid` (a proxy) while `params` runs the select-only 8-client case for
/// `duration`; writes `target/bench/profile-<label>.txt` and returns its path.
pub fn run(label: &str, pid: u32, params: &ConnParams, duration: Duration) -> Result<PathBuf> {
    let out_dir = crate::cmd::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir).context("create target/bench")?;
    let data = out_dir.join(format!("perf-{label}.data"));
    let case = Scenario::SelectOnlySimple
        .pgbench()
        .context("select-only case has no pgbench arguments")?;
    debug_assert_eq!(case.script, Script::SelectOnly);

    let mut perf = Command::new("perf");
    perf.args(["record", "-g", "-F", "999", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string(), "--", "sleep"])
        .arg(duration.as_secs().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let recorder = perf
        .spawn()
        .context("cannot run `perf record` (install linux-perf)")?;
    let mut args = case.common_args(duration);
    args.push("-S".to_string());
    let bench = PgCommand::pgbench(params)
        .args(args)
        .timeout(duration + Duration::from_secs(60))
        .run()
        .and_then(|o| o.ok());
    let recorded = recorder.wait_with_output().context("perf record")?;
    bench.context("pgbench during the profile")?;
    if !recorded.status.success() {
        bail!(
            "perf record failed: {}",
            String::from_utf8_lossy(&recorded.stderr).trim()
        );
    }

    let mut text = format!(
        "perf record -g -F 999 -p <{label}> during pgbench -S -c 8 -j 2 -M simple -T {}\n",
        duration.as_secs()
    );
    for (title, sort) in [
        ("samples by thread", "comm"),
        ("top symbols (self)", "comm,dso,sym"),
    ] {
        text.push_str(&format!("\n== {title}\n"));
        text.push_str(&report(&data, sort)?);
    }
    let path = out_dir.join(format!("profile-{label}.txt"));
    std::fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
    let _ = std::fs::remove_file(&data);
    Ok(path)
}

/// The first [`TOP`] sample lines of `perf report --no-children --sort <sort>`.
fn report(data: &Path, sort: &str) -> Result<String> {
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
        ])
        .arg("--sort")
        .arg(sort)
        .arg("-i")
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("perf report")?;
    if !out.status.success() {
        bail!("perf report failed ({})", out.status);
    }
    Ok(top_lines(&String::from_utf8_lossy(&out.stdout), TOP))
}

/// The sample lines of a `perf report --stdio` listing (comments and blank lines dropped).
fn top_lines(report: &str, n: usize) -> String {
    let mut s = String::new();
    for line in report
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .take(n)
    {
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sample_lines_only() {
        let report = "# Samples: 1K\n#\n    40.00%  audit-writer\n\n    30.00%  tokio-runtime-w\n    \
                      10.00%  sled-io-1\n";
        assert_eq!(
            top_lines(report, 2),
            "    40.00%  audit-writer\n    30.00%  tokio-runtime-w\n"
        );
    }
}
