//! Moving PostgreSQL's own unix socket into a directory only interceptor's group can enter.
//!
//! The setting goes into the cluster's `postgresql.auto.conf`: PostgreSQL reads it after
//! `postgresql.conf` (and any include) on every layout, initdb's and Debian's alike, so it wins
//! without editing the administrator's files; `ALTER SYSTEM` keeps it. `unix_socket_directories`
//! only changes at a server start: install and uninstall restart PostgreSQL when asked
//! (`--restart-postgres`), else print the command.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::discover::Cluster;

/// The private socket directory on the target system (kept across reboots by a tmpfiles.d
/// entry, as /run is emptied at boot).
pub(crate) const PRIVATE_DIR: &str = "/run/postgresql-private";
pub(crate) const TMPFILES: &str = "/etc/tmpfiles.d/interceptor-postgresql.conf";
const AUTO_CONF: &str = "postgresql.auto.conf";
const SETTING: &str = "unix_socket_directories";
pub(crate) const COMMENT: &str =
    "# interceptor install: PostgreSQL's socket only interceptor's group can reach";

/// The line install adds for `dir`.
pub(crate) fn setting_line(dir: &Path) -> String {
    let quoted = dir.display().to_string().replace('\'', "''");
    format!("{SETTING} = '{quoted}'")
}

fn is_setting(line: &str) -> bool {
    line.trim_start()
        .strip_prefix(SETTING)
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

/// The cluster's `postgresql.auto.conf`.
pub(crate) fn auto_conf(data_dir: &Path) -> PathBuf {
    data_dir.join(AUTO_CONF)
}

/// The data directory's owner (the PostgreSQL server account): uid, gid.
pub(crate) fn server_account(data_dir: &Path) -> anyhow::Result<(u32, u32)> {
    let m = std::fs::metadata(data_dir)
        .with_context(|| format!("PostgreSQL data directory {}", data_dir.display()))?;
    Ok((m.uid(), m.gid()))
}

/// The account name of `uid` on this host.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == uid).then(|| f[0].to_owned())
    })
}

/// Replaces `path` with `text`, keeping its owner and mode (written beside it, then renamed).
fn rewrite(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let tmp = path.with_extension("conf.interceptor-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))?;
    Ok(())
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// Appends `line` to the cluster's auto.conf. Returns the setting it overrides, if any (the last
/// active one), for uninstall.
pub(crate) fn add(file: &Path, line: &str) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let previous = text.lines().rfind(|l| is_setting(l)).map(str::to_owned);
    let mut new = text.clone();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&format!("{COMMENT}\n{line}\n"));
    rewrite(file, &new)?;
    Ok(previous)
}

/// Takes `line` (and its comment) out of auto.conf again. If `ALTER SYSTEM` has since folded an
/// earlier setting into ours, that earlier one is put back.
pub(crate) fn remove(file: &Path, line: &str, previous: Option<&str>) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    if !text.lines().any(|l| l.trim() == line) {
        return Ok(false);
    }
    let mut kept: Vec<&str> = text
        .lines()
        .filter(|l| l.trim() != line && l.trim() != COMMENT)
        .collect();
    if let Some(p) = previous
        && !kept.iter().any(|l| is_setting(l))
    {
        kept.push(p);
    }
    let mut new = kept.join("\n");
    if !new.is_empty() {
        new.push('\n');
    }
    rewrite(file, &new)?;
    Ok(true)
}

/// How to restart the cluster so that the socket moves: `pg_ctlcluster` for a Debian cluster
/// (through systemd), else `pg_ctl restart` as the server account with the running server's
/// own binaries.
pub(crate) fn restart_command(c: &Cluster) -> Option<Vec<String>> {
    if let Some((version, name)) = &c.debian {
        return Some(vec![
            "pg_ctlcluster".into(),
            version.clone(),
            name.clone(),
            "restart".into(),
        ]);
    }
    let data = c.data_dir.as_ref()?;
    let (uid, _) = server_account(data).ok()?;
    let user = user_name(uid)?;
    let bin_dir = c
        .postmaster
        .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .or_else(|| {
            c.version
                .as_ref()
                .map(|v| Path::new("/usr/lib/postgresql").join(v).join("bin"))
        })?;
    Some(vec![
        "runuser".into(),
        "-u".into(),
        user,
        "--".into(),
        bin_dir.join("pg_ctl").display().to_string(),
        "restart".into(),
        "-D".into(),
        data.display().to_string(),
        "-m".into(),
        "fast".into(),
        "-w".into(),
        "-t".into(),
        "120".into(),
    ])
}

/// Runs a restart command. Its output is discarded: the restarted server inherits pg_ctl's
/// stdout and stderr and would hold a pipe open for as long as it runs.
pub(crate) fn restart(argv: &[String]) -> anyhow::Result<()> {
    let Some((program, args)) = argv.split_first() else {
        bail!("no restart command");
    };
    let status = Command::new(program)
        .args(args)
        // The server account may not be allowed into the caller's directory.
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!(
            "restarting PostgreSQL failed ({status}); run it by hand: {}",
            argv.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_remove_restore_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(AUTO_CONF);
        let original = "# Do not edit this file manually!\n\
                        # It will be overwritten by the ALTER SYSTEM command.\n\
                        work_mem = '8MB'\n";
        std::fs::write(&f, original).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let line = setting_line(Path::new("/run/postgresql-private"));
        assert_eq!(line, "unix_socket_directories = '/run/postgresql-private'");
        assert_eq!(add(&f, &line).unwrap(), None);
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.starts_with(original) && text.ends_with(&format!("{line}\n")));
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(remove(&f, &line, None).unwrap());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), original);
        assert!(!remove(&f, &line, None).unwrap());
    }

    #[test]
    fn an_earlier_setting_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(AUTO_CONF);
        std::fs::write(&f, "unix_socket_directories = '/tmp'\n").unwrap();
        let line = setting_line(Path::new("/run/p"));
        assert_eq!(
            add(&f, &line).unwrap().as_deref(),
            Some("unix_socket_directories = '/tmp'")
        );
        // ALTER SYSTEM rewrote the file since: one setting, ours, no comment.
        std::fs::write(&f, format!("{line}\n")).unwrap();
        remove(&f, &line, Some("unix_socket_directories = '/tmp'")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "unix_socket_directories = '/tmp'\n"
        );
        assert!(is_setting("  unix_socket_directories='x'"));
        assert!(!is_setting("unix_socket_directories_x = 1"));
        assert!(!is_setting("# unix_socket_directories = 'x'"));
    }
}
