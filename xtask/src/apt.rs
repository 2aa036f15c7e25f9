//! Installing Debian packages: `apt-get update` at most once per process, and packaged services
//! are kept from starting while we install (they would occupy ports our tests and benchmark use).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::cmd;

static UPDATED: AtomicBool = AtomicBool::new(false);

/// Debian's hook that `invoke-rc.d` / `deb-systemd-invoke` consult before starting a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Installs `packages` (noninteractive), running `apt-get update` first if this process has not
/// yet. Other modules (e.g. `build_ebpf`) may call this too and share the single update.
pub fn install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "installing {} needs root (apt-get); run `cargo xtask setup` as root",
            packages.join(" ")
        );
    }
    if !UPDATED.swap(true, Ordering::SeqCst) {
        cmd::run(apt_get().arg("update"))?;
    }
    let _guard = NoServiceStarts::engage()?;
    cmd::run(
        apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
    )
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// While alive, a `policy-rc.d` that answers 101 ("action forbidden") makes package scripts skip
/// starting services. An existing policy file is left alone; ours is removed on drop.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn engage() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(NoServiceStarts { created: false });
        }
        std::fs::write(
            path,
            "#!/bin/sh\n# written by cargo xtask setup while installing\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {POLICY_RC_D} executable"))?;
        Ok(NoServiceStarts { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created
            && let Err(e) = std::fs::remove_file(POLICY_RC_D)
        {
            eprintln!("warning: cannot remove {POLICY_RC_D}: {e}");
        }
    }
}

/// Stops a packaged service and keeps it from starting at boot. Best effort: on machines without
/// a running init system these commands fail harmlessly, so failures are only reported.
pub fn disable_service(name: &str) {
    // `systemctl disable` works without a running systemd (it edits symlinks); stopping needs
    // the init system that runs, whichever it is.
    let attempts: [&[&str]; 4] = [
        &["systemctl", "disable", name],
        &["update-rc.d", name, "disable"],
        &["systemctl", "stop", name],
        &["service", name, "stop"],
    ];
    for argv in attempts {
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        match command.output() {
            Ok(out) if out.status.success() => println!("$ {} (ok)", cmd::display(&command)),
            Ok(_) | Err(_) => println!("$ {} (not applicable here)", cmd::display(&command)),
        }
    }
}
