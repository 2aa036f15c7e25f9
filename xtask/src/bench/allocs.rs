//! Allocations per statement: a pgbench run through interceptor's allocation-counting build
//! (`interceptor-alloc-count`, `--features alloc-count`; the release binary the other cases
//! measure has no counter). The build writes its running count to a file every 50 ms.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use interceptor_tests::{ConnParams, PgCommand};

use super::pgbench;
use super::scenario::{Scenario, Script};
use crate::cmd;

/// Environment variable naming the count file (read by `interceptor-alloc-count`).
pub const COUNT_FILE_ENV: &str = "INTERCEPTOR_ALLOC_COUNT_FILE";

/// The scenarios measured for allocations (one run each).
pub const SCENARIOS: [Scenario; 4] = [
    Scenario::SelectOnlySimple,
    Scenario::SelectOnlyExtended,
    Scenario::SelectOnlyPrepared,
    Scenario::TpcB,
];

/// Builds `interceptor-alloc-count` (release profile, feature `alloc-count`).
pub fn build() -> Result<PathBuf> {
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "interceptor",
        "--bin",
        "interceptor-alloc-count",
        "--features",
        "alloc-count",
        "--message-format=json-render-diagnostics",
    ]);
    println!("$ {}", cmd::display(&build));
    let out = build
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo build")?;
    if !out.status.success() {
        bail!(
            "cargo build of interceptor-alloc-count failed ({})",
            out.status
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "interceptor-alloc-count")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo build reported no `interceptor-alloc-count` executable")
}

/// The count the build last wrote.
fn read_count(file: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("unreadable allocation count {text:?}"))
}

/// Allocations per transaction over one pgbench run of `scenario` against `params` (the
/// counting build), `count_file` being the file it reports to.
pub fn per_transaction(
    scenario: Scenario,
    params: &ConnParams,
    count_file: &Path,
    duration: Duration,
) -> Result<f64> {
    let case = scenario
        .pgbench()
        .with_context(|| format!("{} is not a pgbench case", scenario.name()))?;
    let mut args = case.common_args(duration);
    match case.script {
        Script::TpcB => {}
        Script::SelectOnly => args.push("-S".to_string()),
        Script::Rows100 => bail!("the 100-row script is not measured for allocations"),
    }
    // Two reporting periods: the file holds a count from after everything before.
    std::thread::sleep(Duration::from_millis(120));
    let before = read_count(count_file)?;
    let out = PgCommand::pgbench(params)
        .args(args)
        .timeout(duration + Duration::from_secs(60))
        .run()?
        .ok()?;
    std::thread::sleep(Duration::from_millis(120));
    let after = read_count(count_file)?;
    let summary = pgbench::parse(&out.stdout)?;
    if summary.transactions == 0 {
        bail!("pgbench did no transaction");
    }
    Ok(after.saturating_sub(before) as f64 / summary.transactions as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_file_must_hold_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("allocs");
        assert!(read_count(&f).is_err());
        std::fs::write(&f, "12345\n").unwrap();
        assert_eq!(read_count(&f).unwrap(), 12345);
        std::fs::write(&f, "x").unwrap();
        assert!(read_count(&f).is_err());
    }
}
