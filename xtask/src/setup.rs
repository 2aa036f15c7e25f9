//! `cargo xtask setup`: installs what building, testing, the demo and the benchmark need, and
//! nothing when everything is already present (no `apt-get update` then).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::{apt, build_ebpf};

/// Something the project needs from the machine, found by a file it installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// initdb, pg_ctl, postgres and pgbench of some PostgreSQL major version.
    PostgresServer,
    /// The psql client.
    Psql,
    /// pgbouncer, the benchmark's reference pooler.
    Pgbouncer,
    /// Chromium, the real browser the web console's tests drive (headless).
    Chromium,
    /// chromedriver, the WebDriver server for that Chromium (no browser download of its own).
    Chromedriver,
    /// libclang, for the bindings of PostgreSQL's parser (the pg_query crate's build script).
    Libclang,
    /// sqlsmith, the query generator of the policy differential test.
    Sqlsmith,
    /// python3 with venv: the client compatibility suite installs psycopg and asyncpg from PyPI.
    PythonVenv,
    /// node and npm: the client compatibility suite installs node-postgres from npm.
    Node,
}

impl Requirement {
    pub const ALL: [Requirement; 9] = [
        Requirement::PostgresServer,
        Requirement::Psql,
        Requirement::Pgbouncer,
        Requirement::Chromium,
        Requirement::Chromedriver,
        Requirement::Libclang,
        Requirement::Sqlsmith,
        Requirement::PythonVenv,
        Requirement::Node,
    ];

    fn describe(self) -> &'static str {
        match self {
            Requirement::PostgresServer => "PostgreSQL server binaries (initdb, pg_ctl, pgbench)",
            Requirement::Psql => "psql",
            Requirement::Pgbouncer => "pgbouncer",
            Requirement::Chromium => "chromium (console browser tests)",
            Requirement::Chromedriver => "chromedriver (console browser tests)",
            Requirement::Libclang => "libclang (for PostgreSQL's parser bindings)",
            Requirement::Sqlsmith => "sqlsmith",
            Requirement::PythonVenv => "python3 with venv (client compatibility suite)",
            Requirement::Node => "node and npm (client compatibility suite)",
        }
    }

    /// The Debian package that provides it.
    fn package(self) -> &'static str {
        match self {
            Requirement::PostgresServer => "postgresql",
            Requirement::Psql => "postgresql-client",
            Requirement::Pgbouncer => "pgbouncer",
            Requirement::Chromium => "chromium",
            Requirement::Chromedriver => "chromium-driver",
            Requirement::Libclang => "libclang-dev",
            Requirement::Sqlsmith => "sqlsmith",
            Requirement::PythonVenv => "python3-venv",
            Requirement::Node => "npm",
        }
    }

    /// Whether it is installed under `root` (`/` on a real machine; a directory in tests).
    pub fn is_present(self, root: &Path) -> bool {
        match self {
            Requirement::PostgresServer => postgres_bin_dir_under(root).is_some(),
            Requirement::Psql => {
                is_executable(&root.join("usr/bin/psql"))
                    || postgres_bin_dirs(root)
                        .iter()
                        .any(|d| is_executable(&d.join("psql")))
            }
            Requirement::Pgbouncer => is_executable(&root.join("usr/sbin/pgbouncer")),
            Requirement::Chromium => is_executable(&root.join("usr/bin/chromium")),
            Requirement::Chromedriver => is_executable(&root.join("usr/bin/chromedriver")),
            // bindgen looks for libclang.so in /usr/lib/llvm-<major>/lib.
            Requirement::Libclang => std::fs::read_dir(root.join("usr/lib"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
                .any(|e| e.path().join("lib/libclang.so").exists()),
            Requirement::Sqlsmith => is_executable(&root.join("usr/bin/sqlsmith")),
            // python3-venv ships ensurepip, which `python3 -m venv` needs.
            Requirement::PythonVenv => {
                is_executable(&root.join("usr/bin/python3"))
                    && std::fs::read_dir(root.join("usr/lib"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|e| {
                            e.file_name().to_string_lossy().starts_with("python3")
                                && e.path().join("ensurepip").is_dir()
                        })
            }
            Requirement::Node => {
                is_executable(&root.join("usr/bin/node"))
                    && is_executable(&root.join("usr/bin/npm"))
            }
        }
    }
}

/// The newest `/usr/lib/postgresql/<major>/bin` holding a complete server (initdb, pg_ctl,
/// postgres, pgbench).
pub fn postgres_bin_dir() -> Option<PathBuf> {
    postgres_bin_dir_under(Path::new("/"))
}

fn postgres_bin_dir_under(root: &Path) -> Option<PathBuf> {
    postgres_bin_dirs(root).into_iter().rev().find(|dir| {
        ["initdb", "pg_ctl", "postgres", "pgbench"]
            .iter()
            .all(|b| is_executable(&dir.join(b)))
    })
}

/// `<root>/usr/lib/postgresql/<major>/bin` directories, ordered by major version.
fn postgres_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root.join("usr/lib/postgresql")) else {
        return Vec::new();
    };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.into_iter().map(|(_, dir)| dir).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The requirements among `wanted` that are missing under `root`.
pub fn missing(root: &Path, wanted: &[Requirement]) -> Vec<Requirement> {
    wanted
        .iter()
        .copied()
        .filter(|r| !r.is_present(root))
        .collect()
}

/// Installs whichever of `wanted` is missing; does nothing (not even `apt-get update`) when all
/// are present. Checks afterwards that the install really provided them.
pub fn ensure(wanted: &[Requirement]) -> Result<()> {
    let root = Path::new("/");
    let todo = missing(root, wanted);
    for r in wanted {
        if !todo.contains(r) {
            println!("ok: {} already installed", r.describe());
        }
    }
    if todo.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = todo.iter().map(|r| r.package()).collect();
    packages.sort_unstable();
    packages.dedup();
    println!(
        "installing: {}",
        todo.iter()
            .map(|r| r.describe())
            .collect::<Vec<_>>()
            .join(", ")
    );
    apt::install(&packages)?;
    if todo.contains(&Requirement::Pgbouncer) {
        // The benchmark runs its own pgbouncer; the packaged one would hold port 6432.
        apt::disable_service("pgbouncer");
    }
    let still = missing(root, &todo);
    if !still.is_empty() {
        bail!(
            "still missing after apt-get install: {}",
            still
                .iter()
                .map(|r| r.describe())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// `cargo xtask setup`.
pub fn run() -> Result<()> {
    ensure(&Requirement::ALL)?;
    build_ebpf::install_toolchain()?;
    println!("setup complete");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn touch(root: &Path, rel: &str, mode: u32) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn empty_machine_misses_everything() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(missing(root.path(), &Requirement::ALL), Requirement::ALL);
    }

    #[test]
    fn complete_machine_misses_nothing_so_setup_is_a_no_op() {
        let root = tempfile::tempdir().unwrap();
        for b in ["initdb", "pg_ctl", "postgres", "pgbench", "psql"] {
            touch(
                root.path(),
                &format!("usr/lib/postgresql/15/bin/{b}"),
                0o755,
            );
        }
        touch(root.path(), "usr/sbin/pgbouncer", 0o755);
        touch(root.path(), "usr/bin/chromium", 0o755);
        touch(root.path(), "usr/bin/chromedriver", 0o755);
        touch(root.path(), "usr/lib/llvm-14/lib/libclang.so", 0o644);
        touch(root.path(), "usr/bin/sqlsmith", 0o755);
        for b in [
            "usr/bin/python3",
            "usr/lib/python3.11/ensurepip/__init__.py",
            "usr/bin/node",
            "usr/bin/npm",
        ] {
            touch(root.path(), b, 0o755);
        }
        assert!(missing(root.path(), &Requirement::ALL).is_empty());
    }

    #[test]
    fn incomplete_or_non_executable_server_counts_as_missing() {
        let root = tempfile::tempdir().unwrap();
        touch(root.path(), "usr/lib/postgresql/15/bin/initdb", 0o755);
        touch(root.path(), "usr/lib/postgresql/15/bin/pg_ctl", 0o755);
        touch(root.path(), "usr/lib/postgresql/15/bin/postgres", 0o755);
        touch(root.path(), "usr/lib/postgresql/15/bin/pgbench", 0o644);
        touch(root.path(), "usr/sbin/pgbouncer", 0o755);
        touch(root.path(), "usr/bin/chromium", 0o755);
        touch(root.path(), "usr/bin/chromedriver", 0o755);
        assert_eq!(
            missing(root.path(), &Requirement::ALL),
            vec![
                Requirement::PostgresServer,
                Requirement::Psql,
                Requirement::Libclang,
                Requirement::Sqlsmith,
                Requirement::PythonVenv,
                Requirement::Node
            ]
        );
    }

    #[test]
    fn newest_complete_major_version_wins() {
        let root = tempfile::tempdir().unwrap();
        for major in ["9", "15", "16"] {
            for b in ["initdb", "pg_ctl", "postgres", "pgbench"] {
                // 16 lacks pgbench, so 15 is the newest complete one; 9 < 15 numerically.
                if major == "16" && b == "pgbench" {
                    continue;
                }
                touch(
                    root.path(),
                    &format!("usr/lib/postgresql/{major}/bin/{b}"),
                    0o755,
                );
            }
        }
        assert_eq!(
            postgres_bin_dir_under(root.path()),
            Some(root.path().join("usr/lib/postgresql/15/bin"))
        );
    }
}
