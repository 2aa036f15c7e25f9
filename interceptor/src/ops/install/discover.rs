//! What `install` finds out about the PostgreSQL on this host: version, data directory, port,
//! socket directory and pg_hba.conf, from explicit flags, a running cluster's `postmaster.pid`,
//! or Debian's `pg_lsclusters`.

use std::path::{Path, PathBuf};

/// The cluster interceptor is installed in front of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cluster {
    pub version: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub hba: Option<PathBuf>,
    /// Where each value came from, for the generated config's header and the dry run.
    pub source: String,
    /// Set when the cluster was running (its postmaster.pid was current).
    pub running: bool,
    /// The running postmaster's pid.
    pub postmaster: Option<u32>,
    /// Debian's name of the cluster (version, name), when `pg_lsclusters` found it: it is then
    /// restarted with `pg_ctlcluster` (which goes through systemd).
    pub debian: Option<(String, String)>,
}

/// What the operator passed on the command line.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hints {
    pub data_dir: Option<PathBuf>,
    pub port: Option<u16>,
    pub socket_dir: Option<PathBuf>,
    pub hba: Option<PathBuf>,
}

/// The fields of postmaster.pid that matter here (PostgreSQL writes one per line: pid, data
/// directory, start time, port, first socket directory, listen address, shmem key, status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PostmasterPid {
    pub pid: u32,
    pub data_dir: PathBuf,
    pub port: u16,
    pub socket_dir: Option<PathBuf>,
}

pub(crate) fn parse_postmaster_pid(text: &str) -> Option<PostmasterPid> {
    let lines: Vec<&str> = text.lines().collect();
    let socket_dir = lines
        .get(4)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    Some(PostmasterPid {
        pid: lines.first()?.trim().parse().ok()?,
        data_dir: PathBuf::from(lines.get(1)?.trim()),
        port: lines.get(3)?.trim().parse().ok()?,
        socket_dir,
    })
}

/// One line of `pg_lsclusters --no-header`: version, name, port, status, owner, data dir, log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LsCluster {
    pub version: String,
    pub name: String,
    pub port: u16,
    pub online: bool,
    pub data_dir: PathBuf,
}

pub(crate) fn parse_lsclusters(text: &str) -> Vec<LsCluster> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(LsCluster {
                version: f.first()?.to_string(),
                name: f.get(1)?.to_string(),
                port: f.get(2)?.parse().ok()?,
                online: f.get(3)?.starts_with("online"),
                data_dir: PathBuf::from(f.get(5)?),
            })
        })
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn read_version(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join("PG_VERSION"))
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Finds the cluster: flags first, then the cluster `pg_lsclusters` lists as online (or the
/// first one), then PostgreSQL's defaults (said so in `source`).
pub(crate) fn discover(hints: &Hints) -> Cluster {
    let mut source = Vec::new();
    let mut version = None;
    let mut debian_conf = None;
    let mut debian = None;
    let mut data_dir = hints.data_dir.clone();
    let mut port = None;
    if data_dir.is_some() {
        source.push("--pg-data".to_owned());
    } else if let Some(c) = lsclusters() {
        source.push(format!("pg_lsclusters ({} {})", c.version, c.name));
        version = Some(c.version.clone());
        debian = Some((c.version.clone(), c.name.clone()));
        port = Some(c.port);
        debian_conf = Some(
            Path::new("/etc/postgresql")
                .join(&c.version)
                .join(&c.name)
                .join("pg_hba.conf"),
        );
        data_dir = Some(c.data_dir);
    }
    let mut socket_dir = None;
    let mut running = false;
    let mut postmaster = None;
    if let Some(dir) = &data_dir {
        version = read_version(dir).or(version);
        if let Some(pm) = std::fs::read_to_string(dir.join("postmaster.pid"))
            .ok()
            .as_deref()
            .and_then(parse_postmaster_pid)
            .filter(|pm| pid_alive(pm.pid))
        {
            running = true;
            postmaster = Some(pm.pid);
            source.push(format!("postmaster.pid (pid {})", pm.pid));
            port = Some(pm.port);
            socket_dir = pm.socket_dir;
        }
    }
    if hints.port.is_some() || hints.socket_dir.is_some() {
        source.push("flags".to_owned());
    }
    let port = hints.port.or(port).unwrap_or(5432);
    let socket_dir = hints
        .socket_dir
        .clone()
        .or(socket_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR));
    let hba = hints.hba.clone().or_else(|| {
        let in_data = data_dir.as_ref().map(|d| d.join("pg_hba.conf"));
        in_data.into_iter().chain(debian_conf).find(|p| p.is_file())
    });
    if source.is_empty() {
        source.push("PostgreSQL's defaults (no cluster found; pass --pg-data)".to_owned());
    }
    Cluster {
        version,
        data_dir,
        port,
        socket_dir,
        hba,
        source: source.join(", "),
        running,
        postmaster,
        debian,
    }
}

fn lsclusters() -> Option<LsCluster> {
    let out = std::process::Command::new("pg_lsclusters")
        .arg("--no-header")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let list = parse_lsclusters(&String::from_utf8_lossy(&out.stdout));
    let online = list.iter().find(|c| c.online).cloned();
    online.or_else(|| list.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postmaster_pid() {
        let text = "4242\n/var/lib/postgresql/15/main\n1700000000\n5433\n/var/run/postgresql\n*\n  5433001  32768\nready   \n";
        let pm = parse_postmaster_pid(text).unwrap();
        assert_eq!(pm.pid, 4242);
        assert_eq!(pm.port, 5433);
        assert_eq!(pm.data_dir, Path::new("/var/lib/postgresql/15/main"));
        assert_eq!(
            pm.socket_dir.as_deref(),
            Some(Path::new("/var/run/postgresql"))
        );
        assert_eq!(parse_postmaster_pid("garbage"), None);
        // unix_socket_directories = '' leaves the line empty.
        let no_sock = "1\n/d\n0\n5432\n\n";
        assert_eq!(parse_postmaster_pid(no_sock).unwrap().socket_dir, None);
    }

    #[test]
    fn lsclusters_lines() {
        let text = "15  main    5432 down   postgres /var/lib/postgresql/15/main /var/log/postgresql/postgresql-15-main.log\n\
                    16  other   5433 online postgres /srv/pg16 /var/log/x.log\nshort line\n";
        let l = parse_lsclusters(text);
        assert_eq!(l.len(), 2);
        assert!(!l[0].online);
        assert!(l[1].online);
        assert_eq!(l[1].port, 5433);
        assert_eq!(l[1].data_dir, Path::new("/srv/pg16"));
    }
}
