//! `cargo xtask fuzz --seconds N`: runs every libFuzzer target in `fuzz/` for N seconds each.
//!
//! cargo-fuzz needs a nightly toolchain (it builds with `-Zsanitizer=address` and libFuzzer's
//! coverage instrumentation); it is the harness the project's issue named and the standard one
//! for Rust. Each target starts from `fuzz/corpus/<target>` (committed seeds) and writes new
//! inputs to a scratch copy, so the committed corpus stays small. A crash leaves its input in
//! `fuzz/artifacts/<target>/` and fails the command: turn it into a regression test.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Only this target (default: all of them).
    #[arg(long)]
    pub target: Option<String>,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    let dir = cmd::workspace_root().join("fuzz");
    let targets = match &args.target {
        Some(t) => vec![t.clone()],
        None => list(&dir)?,
    };
    for t in &targets {
        let seeds = dir.join("corpus").join(t);
        let scratch = dir.join("target").join("corpus").join(t);
        std::fs::create_dir_all(&scratch).context("create scratch corpus")?;
        let mut c = Command::new("cargo");
        c.current_dir(&dir)
            .args(["+nightly", "fuzz", "run", t])
            .arg(&scratch);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-rss_limit_mb=1024");
        cmd::run(&mut c)
            .with_context(|| format!("fuzz target {t} found a crash (see fuzz/artifacts/{t}/)"))?;
    }
    Ok(())
}

fn list(dir: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .context("read fuzz/fuzz_targets")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(str::to_owned)
        })
        .collect();
    out.sort();
    if out.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(out)
}
