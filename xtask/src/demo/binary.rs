//! Which interceptor binary the demo runs: `$INTERCEPTOR_BIN`; else an existing release build
//! when it is newer than every file it is built from (a fresh release build is minutes away,
//! a stale one would demonstrate old code); else a debug build made now.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Result;

use crate::{cmd, test};

/// The binary to run; a debug build is preceded by the eBPF object's, so that it embeds it.
pub fn interceptor() -> Result<PathBuf> {
    if std::env::var_os("INTERCEPTOR_BIN").is_some_and(|b| Path::new(&b).is_file()) {
        return test::interceptor_bin();
    }
    let root = cmd::workspace_root();
    let release = target_dir(&root).join("release/interceptor");
    if let Some(built) = modified(&release) {
        match newest_input(&root) {
            Some(newest) if newest > built => println!(
                "note: {} is older than its sources; building a debug binary instead \
                 (`cargo build --release -p interceptor` makes the release one current)",
                release.display()
            ),
            _ => {
                println!("   using the existing release build (newer than every source file)");
                return Ok(release);
            }
        }
    }
    super::kernel::prepare_object();
    test::build_interceptor()
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => root.join("target"),
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time among what the release binary is built from: the two crates'
/// sources and manifests, the lock file, and the eBPF object it embeds.
fn newest_input(root: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for dir in ["interceptor", "interceptor-common"] {
        walk(&root.join(dir), &mut newest);
    }
    for file in [
        root.join("Cargo.lock"),
        root.join("Cargo.toml"),
        target_dir(root).join("ebpf/bpfel-unknown-none/release/interceptor-ebpf"),
    ] {
        newest = newest.max(modified(&file));
    }
    newest
}

fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk(&path, newest);
        } else {
            *newest = (*newest).max(modified(&path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_input_sees_a_touched_source() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("interceptor/src/deep")).unwrap();
        std::fs::write(root.path().join("interceptor/src/lib.rs"), "").unwrap();
        let before = newest_input(root.path()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(root.path().join("interceptor/src/deep/new.rs"), "").unwrap();
        let after = newest_input(root.path()).unwrap();
        assert!(after > before);
    }
}
