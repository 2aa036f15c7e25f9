//! Running external programs: every command is echoed before it runs, and a non-zero exit is an
//! error that names the command.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// The cargo that runs us (`cargo xtask` sets `CARGO`), so nested builds use the same toolchain.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    // interceptor's build script embeds the eBPF object, but cargo reruns it only when
    // something it watches changes; an object built after an earlier interceptor build (e.g.
    // `cargo xtask demo`, then `cargo xtask test`) would otherwise never be embedded. Naming the
    // object in the environment makes its appearance such a change.
    if std::env::var_os("INTERCEPTOR_EBPF_OBJ").is_none() {
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
            _ => workspace_root().join("target"),
        };
        let object = target.join("ebpf/bpfel-unknown-none/release/interceptor-ebpf");
        if object.is_file() {
            cmd.env("INTERCEPTOR_EBPF_OBJ", object);
        }
    }
    cmd
}

/// A shell-like rendering of a command for echoing (arguments with spaces are quoted).
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![quote(&cmd.get_program().to_string_lossy())];
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

/// Quotes one word for a POSIX shell when it needs it.
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs a command with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// True when we run as root (apt and `runuser` need it).
pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(quote("psql"), "psql");
        assert_eq!(quote("host=127.0.0.1"), "host=127.0.0.1");
        assert_eq!(quote("SELECT 1"), "'SELECT 1'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn display_renders_program_and_arguments() {
        let mut cmd = Command::new("psql");
        cmd.args(["-c", "SELECT 1"]);
        assert_eq!(display(&cmd), "psql -c 'SELECT 1'");
    }
}
