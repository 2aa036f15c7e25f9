//! `interceptor install` / `uninstall` against a scratch tree (`--root`): the dry run changes
//! nothing, `--apply` creates what it listed with tight modes and a config pointing at a real
//! cluster that `check-config` accepts, and `uninstall --apply` leaves the tree as it was.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use interceptor_tests::PgCluster;
use interceptor_tests::proxy::interceptor_bin;

/// Every path under `root` with its mode, owner and (for files) contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let contents = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.strip_prefix(root).unwrap().to_owned(),
                (m.mode(), m.uid(), m.gid(), contents),
            );
        }
    }
    out
}

/// A minimal system tree: the account files shadow-utils edits with `--prefix`.
fn scratch_root() -> tempfile::TempDir {
    // Next to the binary, so `install` can hard-link it instead of copying 200 MB.
    let bin = interceptor_bin().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("install-root")
        .tempdir_in(bin.parent().unwrap())
        .unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\n").unwrap();
    std::fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::write(etc.join("gshadow"), "root:*::\n").unwrap();
    dir
}

fn interceptor(args: &[&str], root: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(interceptor_bin().unwrap())
        .args(args)
        .arg("--root")
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn host_has_user() -> bool {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("interceptor:"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn install_dry_run_apply_and_uninstall_in_a_scratch_root() {
    if !interceptor_tests::os::is_root() {
        eprintln!("SKIPPED: install needs root (chown, useradd --prefix)");
        return;
    }
    let pg = PgCluster::start().unwrap();
    let data = pg.data_dir().display().to_string();
    let root = scratch_root();
    let r = root.path();
    let before = snapshot(r);
    let host_user_before = host_has_user();
    let auto_conf = pg.data_dir().join("postgresql.auto.conf");
    let auto_before = std::fs::read(&auto_conf).unwrap();

    // Dry run: lists every change, makes none.
    let (ok, text) = interceptor(&["install"], r, &["--pg-data", &data]);
    assert!(ok, "{text}");
    assert!(text.contains("dry run"), "{text}");
    assert!(text.contains("create system user interceptor"), "{text}");
    assert!(
        text.contains("create directory /etc/interceptor (0750 root:interceptor)"),
        "{text}"
    );
    assert!(text.contains(&format!("port {}", pg.port())), "{text}");
    assert!(text.contains("pg_hba.conf"), "{text}");
    assert_eq!(snapshot(r), before, "the dry run changed the tree");

    // Apply: what was listed, with tight modes.
    let (ok, text) = interceptor(&["install", "--apply"], r, &["--pg-data", &data]);
    assert!(ok, "{text}");
    assert!(
        text.contains("the socket moves when PostgreSQL restarts"),
        "{text}"
    );
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("interceptor:"))
        .unwrap_or_else(|| panic!("no interceptor user in the tree:\n{passwd}"));
    let f: Vec<&str> = entry.split(':').collect();
    let (uid, gid): (u32, u32) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    let pg_uid = std::fs::metadata(pg.data_dir()).unwrap().uid();
    assert_eq!(f[6], "/usr/sbin/nologin");
    for (p, want_mode, want_uid, want_gid) in [
        ("etc/interceptor", 0o750, 0, gid),
        ("etc/interceptor/policies", 0o750, 0, gid),
        ("etc/interceptor/interceptor.toml", 0o640, 0, gid),
        ("etc/interceptor/secrets.toml", 0o600, uid, gid),
        ("etc/interceptor/install-manifest.json", 0o600, 0, 0),
        ("var/lib/interceptor", 0o700, uid, gid),
        ("var/lib/interceptor/audit", 0o700, uid, gid),
        ("run/interceptor", 0o755, uid, gid),
        ("etc/systemd/system/interceptor.service", 0o644, 0, 0),
        ("usr/local/bin/interceptor", 0o755, 0, 0),
        ("run/postgresql-private", 0o750, pg_uid, gid),
        ("etc/tmpfiles.d/interceptor-postgresql.conf", 0o644, 0, 0),
    ] {
        let m = std::fs::metadata(r.join(p)).unwrap_or_else(|e| panic!("{p}: {e}\n{text}"));
        assert_eq!(mode(&r.join(p)), want_mode, "{p}");
        assert_eq!((m.uid(), m.gid()), (want_uid, want_gid), "{p} owner");
    }
    assert_eq!(
        host_has_user(),
        host_user_before,
        "--root touched the host's /etc/passwd"
    );
    let unit = std::fs::read_to_string(r.join("etc/systemd/system/interceptor.service")).unwrap();
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/interceptor run --config /etc/interceptor/interceptor.toml"
    ));

    // The generated config points at the test cluster and is accepted.
    let config_path = r.join("etc/interceptor/interceptor.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let parsed: toml::Value = toml::from_str(&config).unwrap();
    // PostgreSQL's socket is to move to the private directory (at its next start).
    let private = r.join("run/postgresql-private");
    assert_eq!(
        parsed["upstream"]["host"].as_str(),
        Some(private.to_str().unwrap()),
        "{config}"
    );
    let auto = std::fs::read_to_string(pg.data_dir().join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.ends_with(&format!(
            "unix_socket_directories = '{}'\n",
            private.display()
        )),
        "{auto}"
    );
    assert_eq!(
        parsed["upstream"]["port"].as_integer(),
        Some(i64::from(pg.port()))
    );
    assert_eq!(
        parsed["ebpf"]["ports"][0].as_integer(),
        Some(i64::from(pg.port()))
    );
    let check = Command::new(interceptor_bin().unwrap())
        .args(["check-config", "-c"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check-config refused the generated config: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // A second install refuses: the manifest says it is installed.
    let (ok, text) = interceptor(&["install", "--apply"], r, &["--pg-data", &data]);
    assert!(!ok && text.contains("already installed"), "{text}");

    // Uninstall: dry run first (nothing changes), then the tree is as before.
    let installed = snapshot(r);
    let (ok, text) = interceptor(&["uninstall"], r, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("delete user interceptor"), "{text}");
    assert_eq!(
        snapshot(r),
        installed,
        "the uninstall dry run changed the tree"
    );
    let (ok, text) = interceptor(&["uninstall", "--apply"], r, &[]);
    assert!(ok, "{text}");
    assert_eq!(
        snapshot(r),
        before,
        "uninstall left something behind:\n{text}"
    );
    assert_eq!(
        std::fs::read(&auto_conf).unwrap(),
        auto_before,
        "postgresql.auto.conf not restored"
    );
    let (ok, text) = interceptor(&["uninstall", "--apply"], r, &[]);
    assert!(!ok && text.contains("nothing to undo"), "{text}");
}

#[test]
fn uninstall_keeps_an_edited_config_and_a_non_empty_audit_trail() {
    if !interceptor_tests::os::is_root() {
        eprintln!("SKIPPED: install needs root (chown, useradd --prefix)");
        return;
    }
    let root = scratch_root();
    let r = root.path();
    let (ok, text) = interceptor(&["install", "--apply"], r, &["--pg-port", "5999"]);
    assert!(ok, "{text}");
    let config = r.join("etc/interceptor/interceptor.toml");
    std::fs::write(&config, "# edited by the operator\n").unwrap();
    std::fs::write(r.join("var/lib/interceptor/audit/db"), "evidence").unwrap();
    let (ok, text) = interceptor(&["uninstall", "--apply"], r, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("changed since install, kept"), "{text}");
    assert!(text.contains("not empty"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "# edited by the operator\n"
    );
    assert!(r.join("var/lib/interceptor/audit/db").exists());
    // The account and everything else it created are gone.
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    assert!(!passwd.contains("interceptor:"), "{passwd}");
    assert!(!r.join("etc/systemd/system/interceptor.service").exists());
    assert!(!r.join("etc/interceptor/secrets.toml").exists());
}

/// Runs psql as `user` against the socket in `dir`; (success, stdout + stderr).
fn psql_as(user: &str, dir: &Path, port: u16, sql: &str) -> (bool, String) {
    let out = Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(interceptor_tests::os::pg_bin_dir().join("psql"))
        .args(["-X", "-At", "-h"])
        .arg(dir)
        .args([
            "-p",
            &port.to_string(),
            "-U",
            interceptor_tests::pg::SUPERUSER,
            "-d",
        ])
        .arg(interceptor_tests::pg::APP_DB)
        .args(["-c", sql])
        .env("PGPASSWORD", interceptor_tests::pg::SUPERUSER_PASSWORD)
        .current_dir("/")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn socket(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// A real cluster's socket moved into the private directory and back: `install --apply
/// --restart-postgres` writes the setting into the cluster's own postgresql.auto.conf and restarts
/// it; then PostgreSQL listens only there, interceptor's config points there, and another uid
/// cannot connect. `uninstall --apply --restart-postgres` puts the file back byte for byte, the
/// socket returns to its old directory and the tree is as before.
#[test]
fn install_moves_the_postgres_socket_and_uninstall_moves_it_back() {
    if !interceptor_tests::os::is_root() {
        eprintln!("SKIPPED: install needs root (chown, useradd --prefix)");
        return;
    }
    let pg = PgCluster::start().unwrap();
    let port = pg.port();
    let data = pg.data_dir().display().to_string();
    let old = pg.socket_dir().to_path_buf();
    let root = scratch_root();
    let r = root.path();
    // PostgreSQL's account must reach the private directory inside the tree.
    std::fs::set_permissions(r, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let before = snapshot(r);
    let auto_conf = pg.data_dir().join("postgresql.auto.conf");
    let auto_before = std::fs::read(&auto_conf).unwrap();
    assert!(socket(&old, port).exists());

    let (ok, text) = interceptor(
        &["install", "--apply"],
        r,
        &["--pg-data", &data, "--restart-postgres"],
    );
    assert!(ok, "{text}");
    assert!(text.contains("restarting PostgreSQL: runuser"), "{text}");
    let private = r.join("run/postgresql-private");
    assert!(
        socket(&private, port).exists(),
        "{text}\n{}",
        pg.server_log()
    );
    assert!(
        !socket(&old, port).exists(),
        "the old socket is still there"
    );
    let (ok, shown) = psql_as("postgres", &private, port, "SHOW unix_socket_directories");
    assert!(ok, "{shown}");
    assert_eq!(shown.trim(), private.display().to_string());
    // Another uid cannot enter the directory.
    let (ok, refused) = psql_as("nobody", &private, port, "SELECT 1");
    assert!(!ok && refused.contains("Permission denied"), "{refused}");
    let config = std::fs::read_to_string(r.join("etc/interceptor/interceptor.toml")).unwrap();
    let parsed: toml::Value = toml::from_str(&config).unwrap();
    assert_eq!(
        parsed["upstream"]["host"].as_str(),
        Some(private.to_str().unwrap())
    );

    let (ok, text) = interceptor(&["uninstall", "--apply"], r, &["--restart-postgres"]);
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(&auto_conf).unwrap(), auto_before);
    assert!(socket(&old, port).exists(), "{text}\n{}", pg.server_log());
    let (ok, shown) = psql_as("postgres", &old, port, "SHOW unix_socket_directories");
    assert!(ok, "{shown}");
    assert_eq!(shown.trim(), old.display().to_string());
    assert_eq!(
        snapshot(r),
        before,
        "uninstall left something behind:\n{text}"
    );
}
