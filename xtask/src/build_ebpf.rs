//! The eBPF toolchain and the build of `interceptor-ebpf` (see /work/shared/ebpf-toolchain.md).
//!
//! rustup's toolchains here ship no `rust-src`, so `-Z build-std=core` for `bpfel-unknown-none`
//! uses Debian's rustc (`rustc-web`, with its sources) linked into rustup as `bpf-debian`, and a
//! `bpf-linker` built against Debian's LLVM 22.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// rustup name under which Debian's compiler in /usr is linked.
const TOOLCHAIN: &str = "bpf-debian";
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Installs what building the eBPF crate needs; does nothing for the parts already present.
pub fn install_toolchain() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        println!("apt packages: present");
    } else {
        println!("apt packages missing: {}", missing.join(" "));
        // Shares setup's single `apt-get update` and its guard against service starts.
        crate::apt::install(&missing)?;
    }

    if toolchain_linked()? {
        println!("rustup toolchain {TOOLCHAIN}: present");
    } else {
        run(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    }

    if bpf_linker_present() {
        println!("bpf-linker: present");
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![PathBuf::from(LLVM_PREFIX).join("bin")];
        dirs.extend(std::env::split_paths(&path));
        // Without Debian's LLVM first on PATH and LLVM_PREFIX, bpf-linker finds no libLLVM.
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", std::env::join_paths(dirs)?)
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    Ok(())
}

/// Whether everything [`build`] needs is installed, so a caller can build the object without
/// installing anything (the demo does).
pub fn toolchain_present() -> bool {
    APT_PACKAGES.iter().all(|p| deb_installed(p))
        && toolchain_linked().unwrap_or(false)
        && bpf_linker_present()
}

/// Compiles `interceptor-ebpf` and returns the path of the eBPF object (an ELF file).
///
/// The object lands in `<target>/ebpf/bpfel-unknown-none/<profile>/interceptor-ebpf`, where
/// `<target>` is `$CARGO_TARGET_DIR` or the workspace's `target/`; `interceptor/build.rs` embeds
/// it from there (or from `$INTERCEPTOR_EBPF_OBJ`).
pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let crate_dir = root.join("interceptor-ebpf");
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => root.join("target"),
    }
    .join("ebpf");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build"]);
    if release {
        cmd.arg("--release");
    }
    cmd.args([
        "--target",
        BPF_TARGET,
        "-Z",
        "build-std=core",
        // aya-build 0.2 declares rust-version 1.98 but builds on Debian's 1.96.
        "--ignore-rust-version",
        "--target-dir",
    ])
    .arg(&target_dir)
    .current_dir(&crate_dir)
    // build-std needs nightly features from a stable compiler.
    .env("RUSTC_BOOTSTRAP", "1");
    // Settings meant for the host build must not leak into the eBPF one.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd).context("building interceptor-ebpf (run `cargo xtask setup` first?)")?;

    let profile = if release { "release" } else { "debug" };
    let object = target_dir
        .join(BPF_TARGET)
        .join(profile)
        .join("interceptor-ebpf");
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    println!("eBPF object: {}", object.display());
    Ok(object)
}

fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

fn toolchain_linked() -> anyhow::Result<bool> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(TOOLCHAIN)))
}

fn bpf_linker_present() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}
