//! `cargo xtask fuzz --seconds N`: builds every libFuzzer target in `fuzz/` once, then runs each
//! for N seconds.
//!
//! cargo-fuzz (libFuzzer, coverage-guided) is the standard harness for Rust; it needs the
//! nightly toolchain (it passes `-Z` flags). Both are installed on first use (rustup, `cargo
//! install cargo-fuzz --locked`). The targets are built without a sanitizer by default: the code
//! under test is safe Rust (a panic is what libFuzzer reports), and the only C on those paths,
//! PostgreSQL's parser in pg_query, is built by `cc` and would not be instrumented anyway;
//! `--sanitizer address` builds with ASan for a deeper local run.
//!
//! Each target starts from `fuzz/corpus/<target>` (committed seeds, captured from real psql,
//! pgbench and tokio-postgres sessions and a real write-ahead segment) and writes new inputs to
//! a scratch copy under `fuzz/target`, so the committed corpus stays small. A crash leaves its
//! input in `fuzz/artifacts/<target>/` and fails the command: copy it into
//! `fuzz/corpus/<target>/` and it becomes a regression test (the interceptor crate's unit test
//! `fuzzing::tests::committed_fuzz_inputs_pass` replays every committed input in every
//! `cargo test`).

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
    /// `none` or `address` (ASan; slower to build and run).
    #[arg(long, default_value = "none")]
    pub sanitizer: String,
}

const TOOLCHAIN: &str = "nightly";

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn has_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args([&format!("+{TOOLCHAIN}"), "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the nightly toolchain and cargo-fuzz if they are missing (not part of `cargo xtask
/// setup`, which every `cargo xtask test` runs: only fuzzing needs them).
fn install_toolchain() -> Result<()> {
    if has_nightly() {
        println!("rustup toolchain {TOOLCHAIN}: present");
    } else {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    if has_cargo_fuzz() {
        println!("cargo-fuzz: present");
    } else {
        cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    install_toolchain().context(
        "cargo xtask fuzz needs the nightly toolchain and cargo-fuzz (`rustup toolchain install \
         nightly --profile minimal && cargo install cargo-fuzz --locked`)",
    )?;
    if !matches!(args.sanitizer.as_str(), "none" | "address") {
        bail!("--sanitizer must be none or address");
    }
    let dir = cmd::workspace_root().join("fuzz");
    let targets = match &args.target {
        Some(t) => vec![t.clone()],
        None => list(&dir)?,
    };
    let fuzz = |sub: &str| {
        let mut c = Command::new("cargo");
        c.current_dir(&dir)
            .args([&format!("+{TOOLCHAIN}"), "fuzz", sub])
            .args(["--sanitizer", &args.sanitizer]);
        c
    };
    // One build for every target (each `fuzz run` below then finds it up to date).
    let mut build = fuzz("build");
    if let Some(t) = &args.target {
        build.arg(t);
    }
    cmd::run(&mut build).context("cargo fuzz build")?;
    let mut failed = Vec::new();
    for t in &targets {
        let seeds = dir.join("corpus").join(t);
        let scratch = dir.join("target").join("corpus").join(t);
        std::fs::create_dir_all(&scratch).context("create scratch corpus")?;
        let mut c = fuzz("run");
        c.arg(t).arg(&scratch);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1");
        if let Err(e) = cmd::run(&mut c) {
            eprintln!("fuzz target {t} failed: {e:#} (its input is in fuzz/artifacts/{t}/)");
            failed.push(t.clone());
        }
    }
    println!(
        "fuzz: {} passed, {} failed ({} s per target)",
        targets.len() - failed.len(),
        failed.len(),
        args.seconds
    );
    if !failed.is_empty() {
        bail!(
            "fuzz targets that found a crash: {} (copy the input from fuzz/artifacts/<target>/ \
             into fuzz/corpus/<target>/ to keep it as a regression test)",
            failed.join(", ")
        );
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
