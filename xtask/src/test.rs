//! `cargo xtask test`: builds the eBPF object and the interceptor binary, runs every workspace
//! test against it, then the policy tests. All steps run even after a failure; any failure makes
//! the exit non-zero.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, cmd};

/// Builds `interceptor` (debug) and returns the path of its executable, as cargo reports it.
pub fn build_interceptor() -> Result<PathBuf> {
    build_interceptor_profile(false)
}

/// Builds `interceptor` in the debug or release profile and returns its executable's path.
pub fn build_interceptor_profile(release: bool) -> Result<PathBuf> {
    let mut build = cmd::cargo();
    build.args([
        "build",
        "-p",
        "interceptor",
        "--bin",
        "interceptor",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        build.arg("--release");
    }
    println!("$ {}", cmd::display(&build));
    // stdout carries cargo's JSON messages; diagnostics are rendered to stderr as usual.
    let out = build
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo build")?;
    if !out.status.success() {
        bail!("cargo build -p interceptor failed ({})", out.status);
    }
    executable_from_messages(&String::from_utf8_lossy(&out.stdout), "interceptor")
        .context("cargo build reported no `interceptor` executable")
}

/// Finds the executable of binary target `name` in cargo's `--message-format=json` output.
fn executable_from_messages(stdout: &str, name: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name)
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .next_back()
}

/// The interceptor binary to use: `INTERCEPTOR_BIN` if it names a file, else a fresh build.
pub fn interceptor_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("INTERCEPTOR_BIN").map(PathBuf::from)
        && bin.is_file()
    {
        // Absolute: the tests start it from other working directories.
        return Ok(std::path::absolute(&bin)?);
    }
    build_interceptor()
}

/// Whether this interceptor build has `policy test` (it arrives later). Its help must succeed
/// and name the `test` subcommand: the skeleton binary ignores arguments and prints nothing.
fn has_policy_subcommand(bin: &Path) -> bool {
    Command::new(bin)
        .args(["policy", "--help"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("test"))
}

/// Whether eBPF tests must run rather than skip (CI sets this).
fn bpf_required() -> bool {
    std::env::var("INTERCEPTOR_REQUIRE_BPF").is_ok_and(|v| v == "1")
}

pub fn run() -> Result<()> {
    let root = cmd::workspace_root();
    let mut failed: Vec<&str> = Vec::new();

    // On a fresh machine `cargo xtask test` is enough: setup installs only what is missing and
    // returns at once when everything is there.
    if let Err(e) = crate::setup::run() {
        eprintln!("error: cargo xtask setup: {e:#}");
        failed.push("cargo xtask setup");
    }

    // interceptor's build script embeds the eBPF object, so it must exist before the build.
    // Without it the binary works but its eBPF tests skip, which is only acceptable when they
    // are not required.
    // Release: the kernel verifier rejects the unoptimised object ("last insn is not an exit
    // or jmp"), and interceptor's build script prefers the release object anyway.
    if let Err(e) = build_ebpf::build(true) {
        eprintln!("error: {e:#}");
        if bpf_required() {
            failed.push("cargo xtask build-ebpf");
        } else {
            eprintln!("warning: continuing without eBPF support; its tests will be skipped");
        }
    }

    let bin = build_interceptor()?;
    println!("INTERCEPTOR_BIN={}", bin.display());
    let mut workspace = cmd::cargo();
    workspace
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("INTERCEPTOR_BIN", &bin);
    if let Err(e) = cmd::run(&mut workspace) {
        eprintln!("error: {e:#}");
        failed.push("cargo test --workspace");
    }

    if has_policy_subcommand(&bin) {
        let mut policy = Command::new(&bin);
        policy.args(["policy", "test"]).arg(root.join("policies"));
        policy.current_dir(&root);
        if let Err(e) = cmd::run(&mut policy) {
            eprintln!("error: {e:#}");
            failed.push("interceptor policy test policies/");
        }
    } else {
        println!("skipped: policy tests (this interceptor has no `policy` subcommand yet)");
    }

    if failed.is_empty() {
        println!("cargo xtask test: all steps passed");
        Ok(())
    } else {
        bail!("failed: {}", failed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_executable_among_cargo_messages() {
        // Shapes as cargo 1.95 prints them (trimmed): a library artifact without an executable,
        // the binary, another binary, and the final build-finished line.
        let stdout = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/interceptor#0.1.0","target":{"kind":["lib"],"name":"interceptor"},"filenames":["/t/debug/libinterceptor.rlib"],"executable":null,"fresh":true}
{"reason":"compiler-artifact","package_id":"path+file:///w/interceptor#0.1.0","target":{"kind":["bin"],"name":"interceptor"},"filenames":["/t/debug/interceptor"],"executable":"/t/debug/interceptor","fresh":false}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","target":{"kind":["bin"],"name":"xtask"},"filenames":["/t/debug/xtask"],"executable":"/t/debug/xtask","fresh":true}
not json at all
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(stdout, "interceptor"),
            Some(PathBuf::from("/t/debug/interceptor"))
        );
        assert_eq!(
            executable_from_messages(stdout, "xtask"),
            Some(PathBuf::from("/t/debug/xtask"))
        );
        assert_eq!(executable_from_messages(stdout, "absent"), None);
    }

    #[test]
    fn real_cargo_build_reports_our_own_binary() {
        // Ask the real cargo for metadata-free proof: build this crate's binary (already built,
        // so it is fresh and fast) and check the reported path exists.
        let out = cmd::cargo()
            .args([
                "build",
                "-p",
                "xtask",
                "--bin",
                "xtask",
                "--message-format=json",
            ])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success());
        let exe = executable_from_messages(&String::from_utf8_lossy(&out.stdout), "xtask").unwrap();
        assert!(exe.is_file(), "{} is not a file", exe.display());
    }
}
