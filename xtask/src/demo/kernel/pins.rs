//! The kernel programs' pins: a directory of the demo's own under bpffs, detached when the
//! step's [`PinGuard`] is dropped, and pins of killed demo runs removed by the next one.

use std::path::{Path, PathBuf};

use crate::demo::cli::InterceptorCli;

/// Pin directories of demo runs: `/sys/fs/bpf/interceptor-demo-<pid of the demo>`.
const BPFFS: &str = "/sys/fs/bpf";
const PIN_PREFIX: &str = "interceptor-demo-";

/// Detaches the programs pinned under its directory when dropped.
pub struct PinGuard {
    cli: InterceptorCli,
    pin_dir: PathBuf,
}

impl PinGuard {
    /// This run's pin directory; detached when the guard is dropped (arm it before interceptor
    /// starts, so that a start failing half way is cleaned up too).
    pub fn for_this_run(cli: &InterceptorCli) -> PinGuard {
        PinGuard {
            cli: cli.clone(),
            pin_dir: PathBuf::from(BPFFS).join(format!("{PIN_PREFIX}{}", std::process::id())),
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        println!("\n== detaching the kernel programs");
        let dir = self.pin_dir.to_string_lossy().into_owned();
        if let Err(e) = self.cli.shown("ebpf", &["detach", "--pin-dir", &dir]) {
            eprintln!("error: {e:#}");
        }
        if self.pin_dir.exists() {
            eprintln!(
                "error: {dir} still exists; remove it with `interceptor ebpf detach --pin-dir {dir}`"
            );
        } else {
            println!("   {dir} removed: none of the demo's programs stays attached");
        }
    }
}

/// Detaches pins of earlier demo runs whose process is gone (killed before it could clean up).
pub fn remove_stale_pins(cli: &InterceptorCli) {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PIN_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        println!("   removing the pins of an earlier demo run that did not finish:");
        let dir = entry.path().to_string_lossy().into_owned();
        if let Err(e) = cli.shown("ebpf", &["detach", "--pin-dir", &dir]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Every program's link is pinned and `port` is among the steered ports.
pub fn is_attached(status: &serde_json::Value, port: u16) -> bool {
    let links = status["links"].as_array();
    let all_pinned = links.is_some_and(|l| !l.is_empty() && l.iter().all(|l| l["pinned"] == true));
    let steered = status["steered_ports"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(port))));
    all_pinned && steered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attached_means_every_link_pinned_and_the_port_steered() {
        let status = |pinned: [bool; 2], ports: &[u16]| {
            serde_json::json!({
                "links": [
                    {"program": "ic_steer", "pinned": pinned[0]},
                    {"program": "ic_connect4", "pinned": pinned[1]},
                ],
                "steered_ports": ports,
            })
        };
        assert!(is_attached(&status([true, true], &[5432]), 5432));
        assert!(!is_attached(&status([true, false], &[5432]), 5432));
        assert!(!is_attached(&status([true, true], &[6432]), 5432));
        assert!(!is_attached(
            &serde_json::json!({"links": [], "steered_ports": [5432]}),
            5432
        ));
    }
}
