//! `cargo xtask package`: a Debian package of interceptor, built with `dpkg-deb --build` from a
//! staged tree. dpkg-deb is part of every Debian system; cargo-deb would be one more tool to
//! compile and install on each developer machine and in CI for what is a directory layout and
//! four small maintainer scripts.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, workspace_root};

#[derive(Debug, clap::Args)]
pub struct PackageArgs {
    /// Package this binary instead of building a release one (e.g. a debug build in tests).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Directory the .deb is written to.
    #[arg(long, default_value = "target/debian")]
    pub out: PathBuf,
    /// dpkg-deb's compression (`xz`, `gzip`, `zstd` or `none`; tests use `none` to save time).
    #[arg(long, default_value = "xz")]
    pub compression: String,
}

const POSTINST: &str = r#"#!/bin/sh
# interceptor: system user, private directories, unit known to systemd. The configuration
# /etc/interceptor/interceptor.toml is the administrator's: written from the example only when
# it does not exist, never changed afterwards (not even its mode), on install or upgrade.
set -e
if [ "$1" = configure ]; then
    if ! getent group interceptor >/dev/null; then
        addgroup --system interceptor >/dev/null
    fi
    if ! getent passwd interceptor >/dev/null; then
        adduser --system --ingroup interceptor --no-create-home --home /nonexistent \
            --shell /usr/sbin/nologin --gecos "interceptor PostgreSQL gateway" interceptor >/dev/null
    fi
    if [ ! -e /etc/interceptor ]; then
        install -d -m 0750 -o root -g interceptor /etc/interceptor
    fi
    if [ ! -e /etc/interceptor/interceptor.toml ]; then
        install -m 0640 -o root -g interceptor /usr/share/interceptor/interceptor.example.toml \
            /etc/interceptor/interceptor.toml
    else
        echo "interceptor: keeping the existing /etc/interceptor/interceptor.toml" \
            "(the new example is /usr/share/interceptor/interceptor.example.toml)"
    fi
    if [ ! -e /var/lib/interceptor ]; then
        install -d -m 0700 -o interceptor -g interceptor /var/lib/interceptor
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
    if [ -z "$2" ]; then
        echo "interceptor installed. Edit /etc/interceptor/interceptor.toml, run"
        echo "  interceptor doctor --config /etc/interceptor/interceptor.toml"
        echo "then: systemctl enable --now interceptor"
    elif [ -d /run/systemd/system ] && systemctl is-active --quiet interceptor; then
        systemctl try-restart interceptor || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop interceptor >/dev/null 2>&1 || true
    systemctl disable interceptor >/dev/null 2>&1 || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# purge removes the configuration and the empty directories postinst made. The audit trail in
# /var/lib/interceptor is evidence: never deleted, not even on purge (remove it by hand once it
# is archived). The system user and group stay, as Debian packages keep theirs: files they own
# may remain, and a reused id would inherit them.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = purge ]; then
    rm -f /etc/interceptor/interceptor.toml
    rmdir /etc/interceptor 2>/dev/null || true
    rmdir /var/lib/interceptor 2>/dev/null || true
    for d in /etc/interceptor /var/lib/interceptor; do
        if [ -e "$d" ]; then
            echo "interceptor purged; kept $d (not empty)"
        fi
    done
fi
exit 0
"#;

fn version() -> Result<String> {
    let text = std::fs::read_to_string(workspace_root().join("Cargo.toml"))?;
    let v: toml::Value = toml::from_str(&text)?;
    v.get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .context("no [workspace.package] version")
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let text = std::fs::read(from).with_context(|| format!("read {}", from.display()))?;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(to, text)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", cmd::display(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            cmd::display(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

pub fn run(args: &PackageArgs) -> Result<()> {
    let root = workspace_root();
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => {
            cmd::run(cmd::cargo().args([
                "build",
                "--release",
                "-p",
                "interceptor",
                "--bin",
                "interceptor",
            ]))?;
            root.join("target/release/interceptor")
        }
    };
    let version = version()?;
    let arch = String::from_utf8(output(Command::new("dpkg").arg("--print-architecture"))?)?
        .trim()
        .to_owned();
    let out_dir = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    std::fs::create_dir_all(&out_dir)?;
    let stage = tempfile::Builder::new()
        .prefix("interceptor-deb")
        .tempdir_in(&out_dir)?;
    let s = stage.path();

    copy(&binary, &s.join("usr/bin/interceptor"), 0o755)?;
    // Debug symbols stay out of the package (a debug build's are ~200 MB).
    output(
        Command::new("strip")
            .arg("--strip-debug")
            .arg(s.join("usr/bin/interceptor")),
    )?;
    let unit = std::fs::read_to_string(root.join("deploy/interceptor.service"))?
        .replace("/usr/local/bin/interceptor", "/usr/bin/interceptor");
    write(
        &s.join("lib/systemd/system/interceptor.service"),
        &unit,
        0o644,
    )?;
    let share = s.join("usr/share/interceptor");
    // Not a conffile: dpkg would stop at a prompt when the file already exists on a first
    // install (for example after `interceptor install`); postinst writes it only where absent.
    copy(
        &root.join("interceptor.example.toml"),
        &share.join("interceptor.example.toml"),
        0o644,
    )?;
    for entry in std::fs::read_dir(root.join("policies"))? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "toml") {
            let name = p.file_name().context("policy file name")?;
            copy(&p, &share.join("policies").join(name), 0o644)?;
        }
    }
    copy(
        &root.join("deploy/grafana-dashboard.json"),
        &share.join("grafana-dashboard.json"),
        0o644,
    )?;
    let doc = s.join("usr/share/doc/interceptor");
    copy(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    for entry in std::fs::read_dir(root.join("docs"))? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "md") {
            let name = p.file_name().context("doc file name")?;
            copy(&p, &doc.join(name), 0o644)?;
        }
    }
    write(
        &doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: interceptor\n\nFiles: *\nLicense: Apache-2.0\n \
         On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n",
        0o644,
    )?;
    // Man pages and completions come from the binary's own clap definitions.
    let man = s.join("usr/share/man/man1");
    output(Command::new(&binary).args(["man", "--dir"]).arg(&man))?;
    output(Command::new("gzip").args(["-9n", "-r"]).arg(&man))?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/interceptor"),
        ("zsh", "usr/share/zsh/vendor-completions/_interceptor"),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/interceptor.fish",
        ),
    ] {
        let script = output(Command::new(&binary).args(["completions", shell]))?;
        write(&s.join(path), &String::from_utf8(script)?, 0o644)?;
    }

    let size_kib = output(Command::new("du").args(["-sk"]).arg(s))?;
    let size_kib = String::from_utf8_lossy(&size_kib)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .to_owned();
    let control = format!(
        "Package: interceptor\nVersion: {version}\nArchitecture: {arch}\n\
         Maintainer: interceptor maintainers <root@localhost>\nInstalled-Size: {size_kib}\n\
         Depends: libc6, adduser\nRecommends: postgresql\nSection: database\nPriority: optional\n\
         Description: PostgreSQL gateway: identity, policy, masking and audit\n \
         interceptor sits in front of PostgreSQL and decides every statement by policy,\n \
         masks sensitive values inline and writes a tamper-evident audit trail.\n"
    );
    write(&s.join("DEBIAN/control"), &control, 0o644)?;
    write(&s.join("DEBIAN/postinst"), POSTINST, 0o755)?;
    write(&s.join("DEBIAN/prerm"), PRERM, 0o755)?;
    write(&s.join("DEBIAN/postrm"), POSTRM, 0o755)?;

    let deb = out_dir.join(format!("interceptor_{version}_{arch}.deb"));
    cmd::run(
        Command::new("dpkg-deb")
            .args([
                "--root-owner-group",
                &format!("-Z{}", args.compression),
                "--build",
            ])
            .arg(s)
            .arg(&deb),
    )?;
    println!("{}", deb.display());
    Ok(())
}
