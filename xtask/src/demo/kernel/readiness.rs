//! Whether the kernel step can run here: root, and an interceptor binary with its eBPF object
//! embedded on a kernel that supports the program types (as `interceptor doctor` reports).

use std::path::Path;

use anyhow::{Result, bail};

use crate::demo::cli::InterceptorCli;
use crate::{build_ebpf, cmd};

/// Builds the eBPF object before interceptor is built, as `cargo xtask test` does, so that the
/// binary embeds it. Only where the step can run (root) and the toolchain is installed;
/// anything missing makes the step skip later, with the reason.
pub fn prepare_object() {
    let given = std::env::var_os("INTERCEPTOR_BIN").is_some_and(|b| Path::new(&b).is_file());
    if given || !cmd::is_root() {
        return;
    }
    if !build_ebpf::toolchain_present() {
        println!(
            "note: the eBPF toolchain is not installed (`cargo xtask setup` installs it); \
             interceptor is built without its kernel programs"
        );
        return;
    }
    println!("\n== building the eBPF programs, so that interceptor embeds them");
    if let Err(e) = build_ebpf::build(true) {
        println!("note: building the eBPF object failed ({e:#}); the kernel step will skip");
    }
}

/// Why the step cannot run here, if it cannot.
pub fn skip_reason(cli: &InterceptorCli) -> Result<Option<String>> {
    if !cmd::is_root() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        return Ok(Some(format!(
            "needs root (loading and attaching eBPF programs needs CAP_BPF and CAP_NET_ADMIN; \
             this demo runs as uid {euid})"
        )));
    }
    // doctor also reports how PostgreSQL could be bypassed on this host (the throwaway
    // cluster's TCP port is, until this step steers it); only the capabilities decide here.
    println!("$ {}   (its capability checks)", cli.line("doctor", &[]));
    let out = cli.output("doctor", &[])?;
    let capabilities = capability_lines(&out.stdout);
    // A missing capability skips the step; it is no failure of the demo.
    for line in &capabilities {
        println!("{}", as_skip(line));
    }
    if capabilities.len() != CAPABILITY_CHECKS.len() {
        bail!(
            "interceptor doctor did not report {CAPABILITY_CHECKS:?}:\n{}{}",
            out.stdout,
            out.stderr
        );
    }
    let failed: Vec<&str> = capabilities
        .into_iter()
        .filter(|l| !l.starts_with("[ok]"))
        .collect();
    if !failed.is_empty() {
        return Ok(Some(format!(
            "needs root and an interceptor binary with its eBPF object embedded on a kernel \
             that supports it (`cargo xtask setup`, then `cargo xtask build-ebpf --release` \
             before building interceptor); `interceptor doctor` reports: {}",
            failed.join("; ")
        )));
    }
    Ok(None)
}

/// The lines of `interceptor doctor`'s output (`[severity] check: message`) for the checks in
/// [`CAPABILITY_CHECKS`].
fn capability_lines(doctor: &str) -> Vec<&str> {
    doctor
        .lines()
        .filter(|l| {
            l.split_once("] ").is_some_and(|(_, rest)| {
                rest.split_once(": ")
                    .is_some_and(|(check, _)| CAPABILITY_CHECKS.contains(&check))
            })
        })
        .collect()
}

/// A capability line as the demo shows it: doctor's `[FAIL]` means the step skips here.
fn as_skip(line: &str) -> String {
    match line.strip_prefix("[FAIL]") {
        Some(rest) => format!("[SKIP]{rest}"),
        None => line.to_owned(),
    }
}

/// What `interceptor doctor` must report `[ok]` for before the step can run.
const CAPABILITY_CHECKS: [&str; 4] = ["ebpf object", "sk_lookup", "cgroup sock_addr", "sock_ops"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_capability_checks_decide() {
        let doctor = "[FAIL] ebpf object: eBPF support was not compiled in (cargo xtask build-ebpf before cargo build)\n\
                      [ok] btf: /sys/kernel/btf/vmlinux present\n\
                      [ok] sk_lookup: supported by the kernel\n\
                      [ok] cgroup sock_addr: supported by the kernel\n\
                      [FAIL] sock_ops: cannot probe: Operation not permitted\n\
                      [FAIL] postgresql tcp: bypass: listens on 127.0.0.1:5432, which is not steered\n";
        let lines = capability_lines(doctor);
        assert_eq!(lines.len(), CAPABILITY_CHECKS.len(), "{lines:?}");
        let failed: Vec<_> = lines.iter().filter(|l| !l.starts_with("[ok]")).collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed[0].contains("ebpf object") && failed[1].contains("sock_ops"));
        let shown: Vec<String> = lines.iter().map(|l| as_skip(l)).collect();
        assert!(shown.iter().all(|l| !l.contains("FAIL")), "{shown:?}");
        assert!(shown[0].starts_with("[SKIP] ebpf object:"), "{shown:?}");
    }
}
