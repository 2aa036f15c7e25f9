//! `interceptor install` / `interceptor uninstall`: put interceptor on a PostgreSQL host (system
//! user, private directories, a generated config, the systemd unit) and take it off again.
//!
//! Both are dry runs unless `--apply`: every change is printed first. `--root DIR` acts on a
//! directory tree instead of `/` (PostgreSQL is still looked for on this host). What `--apply`
//! changed is written to a manifest; `uninstall` undoes exactly that, and nothing it did not do.

mod config_text;
pub(crate) mod discover;
pub(crate) mod hba;
mod manifest;
pub(crate) mod pg_socket;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use manifest::{Change, Manifest};

pub(crate) const USER: &str = "interceptor";
const UNIT: &str = "interceptor.service";
const UNIT_TEMPLATE: &str = include_str!("../../../../deploy/interceptor.service");
const MANIFEST: &str = "/etc/interceptor/install-manifest.json";
const CONFIG: &str = "/etc/interceptor/interceptor.toml";
const SECRETS_TEMPLATE: &str = "# Upstream role passwords, read by interceptor only (mode 0600).\n\
     [roles]\n# app_ro = \"...\"\n";
/// Written by shadow-utils next to the account files; created by us only where they were absent.
const ACCOUNT_BACKUPS: [&str; 4] = [
    "/etc/passwd-",
    "/etc/group-",
    "/etc/shadow-",
    "/etc/gshadow-",
];

#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Make the changes (without it, only print them).
    #[arg(long)]
    pub apply: bool,
    /// Act on this directory tree instead of `/` (the systemd unit is then not enabled).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// PostgreSQL's data directory (default: the cluster `pg_lsclusters` shows online).
    #[arg(long)]
    pub pg_data: Option<PathBuf>,
    /// PostgreSQL's port (default: from the running cluster, else 5432).
    #[arg(long)]
    pub pg_port: Option<u16>,
    /// PostgreSQL's unix socket directory (default: from the running cluster).
    #[arg(long)]
    pub pg_socket_dir: Option<PathBuf>,
    /// The pg_hba.conf to check (default: the cluster's).
    #[arg(long)]
    pub pg_hba: Option<PathBuf>,
    /// Restart PostgreSQL so that its unix socket moves now (else the command is printed).
    #[arg(long)]
    pub restart_postgres: bool,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Make the changes (without it, only print them).
    #[arg(long)]
    pub apply: bool,
    /// The tree `install --root` acted on.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Also remove files changed since install (the config an operator edited). Directories
    /// that are not empty, such as an audit trail, are always kept.
    #[arg(long)]
    pub force: bool,
    /// Restart PostgreSQL so that its unix socket moves back now (else the command is printed).
    #[arg(long)]
    pub restart_postgres: bool,
}

/// Owner of a created path: root, or interceptor's user/group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Root,
    Service,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Root => "root",
            Who::Service => USER,
        }
    }
}

#[derive(Debug)]
enum Step {
    Group,
    User,
    Dir {
        path: PathBuf,
        mode: u32,
        owner: Who,
        group: Who,
    },
    File {
        path: PathBuf,
        mode: u32,
        owner: Who,
        group: Who,
        contents: Vec<u8>,
        what: &'static str,
    },
    Binary {
        from: PathBuf,
        path: PathBuf,
    },
    /// PostgreSQL's unix socket into `dir` (owned by the server account, group interceptor).
    PgSocket {
        dir: PathBuf,
        data_dir: PathBuf,
        server_uid: u32,
        restart: Option<Vec<String>>,
    },
    Enable,
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::Group => format!("create system group {USER}"),
            Step::User => format!(
                "create system user {USER} (group {USER}, no home, shell /usr/sbin/nologin)"
            ),
            Step::Dir {
                path,
                mode,
                owner,
                group,
            } => format!(
                "create directory {} ({mode:04o} {}:{})",
                path.display(),
                owner.name(),
                group.name()
            ),
            Step::File {
                path,
                mode,
                owner,
                group,
                what,
                ..
            } => format!(
                "write {} ({mode:04o} {}:{}): {what}",
                path.display(),
                owner.name(),
                group.name()
            ),
            Step::Binary { from, path } => {
                format!(
                    "copy {} to {} (0755 root:root)",
                    from.display(),
                    path.display()
                )
            }
            Step::PgSocket { dir, data_dir, .. } => format!(
                "move PostgreSQL's unix socket to {} (0750, group {USER}): append `{}` to {}; \
                 it moves when PostgreSQL restarts",
                dir.display(),
                pg_socket::setting_line(dir),
                pg_socket::auto_conf(data_dir).display()
            ),
            Step::Enable => format!("systemctl daemon-reload; systemctl enable {UNIT}"),
        }
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad --root {}", p.display()))
}

/// A path of the target system, inside `root`.
fn at(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// `name`'s entry in the tree's passwd or group file: (uid or gid, primary gid).
fn account_entry(root: &Path, file: &str, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(at(root, Path::new(file))).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.first() != Some(&name) {
            return None;
        }
        let id = f.get(2)?.parse().ok()?;
        let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
        Some((id, gid))
    })
}

/// Path, mode, owner, group, contents, what it is.
type FileSpec = (&'static str, u32, Who, Who, Vec<u8>, &'static str);

struct Plan {
    steps: Vec<Step>,
    kept: Vec<String>,
    config: String,
    cluster: discover::Cluster,
}

fn plan(args: &InstallArgs) -> anyhow::Result<Plan> {
    let root = &args.root;
    let cluster = discover::discover(&discover::Hints {
        data_dir: args.pg_data.clone(),
        port: args.pg_port,
        socket_dir: args.pg_socket_dir.clone(),
        hba: args.pg_hba.clone(),
    });
    let mut steps = Vec::new();
    let mut kept = Vec::new();
    // PostgreSQL runs on this host: its settings name the directory as this host sees it.
    let private = at(root, Path::new(pg_socket::PRIVATE_DIR));
    let server = cluster
        .data_dir
        .as_ref()
        .filter(|d| pg_socket::auto_conf(d).is_file())
        .and_then(|d| pg_socket::server_account(d).ok().map(|a| (d.clone(), a)));
    let moved = server.is_some() && cluster.socket_dir != private;
    let upstream_dir = if server.is_some() {
        private.clone()
    } else {
        cluster.socket_dir.clone()
    };
    let config = config_text::render(&cluster, &upstream_dir, server.is_some());
    if account_entry(root, "/etc/group", USER).is_some() {
        kept.push(format!("group {USER} exists"));
    } else {
        steps.push(Step::Group);
    }
    if account_entry(root, "/etc/passwd", USER).is_some() {
        kept.push(format!("user {USER} exists"));
    } else {
        steps.push(Step::User);
    }

    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let installed = ["/usr/bin/interceptor", "/usr/local/bin/interceptor"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| at(root, p).is_file());
    let bin = match installed {
        Some(p) => {
            kept.push(format!("{} exists (the unit runs it)", p.display()));
            p
        }
        None => PathBuf::from("/usr/local/bin/interceptor"),
    };
    let unit = UNIT_TEMPLATE.replace("/usr/local/bin/interceptor", &bin.display().to_string());

    let dirs: [(&str, u32, Who, Who); 5] = [
        ("/etc/interceptor", 0o750, Who::Root, Who::Service),
        ("/etc/interceptor/policies", 0o750, Who::Root, Who::Service),
        ("/var/lib/interceptor", 0o700, Who::Service, Who::Service),
        (
            "/var/lib/interceptor/audit",
            0o700,
            Who::Service,
            Who::Service,
        ),
        ("/run/interceptor", 0o755, Who::Service, Who::Service),
    ];
    let mut planned: Vec<PathBuf> = Vec::new();
    let mut add_dir = |steps: &mut Vec<Step>,
                       kept: &mut Vec<String>,
                       path: &Path,
                       mode: u32,
                       owner: Who,
                       group: Who| {
        // Missing parents (in a fresh --root tree) are created too, and removed again.
        let mut missing: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .filter(|a| *a != Path::new("/") && !at(root, a).exists())
            .collect();
        missing.reverse();
        for a in missing {
            if !planned.iter().any(|p| p == a) {
                planned.push(a.to_owned());
                steps.push(Step::Dir {
                    path: a.to_owned(),
                    mode: 0o755,
                    owner: Who::Root,
                    group: Who::Root,
                });
            }
        }
        if at(root, path).exists() {
            let mode_now = std::fs::metadata(at(root, path))
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0);
            let note = if mode_now & !mode != 0 {
                format!(" (mode {mode_now:04o} is looser than {mode:04o}: tighten it)")
            } else {
                String::new()
            };
            kept.push(format!("{} exists, kept{note}", path.display()));
        } else if !planned.iter().any(|p| p == path) {
            planned.push(path.to_owned());
            steps.push(Step::Dir {
                path: path.to_owned(),
                mode,
                owner,
                group,
            });
        }
    };
    for (p, mode, owner, group) in dirs {
        add_dir(&mut steps, &mut kept, Path::new(p), mode, owner, group);
    }
    let files: [FileSpec; 3] = [
        (
            CONFIG,
            0o640,
            Who::Root,
            Who::Service,
            config.clone().into_bytes(),
            "generated config (shown below)",
        ),
        (
            "/etc/interceptor/secrets.toml",
            0o600,
            Who::Service,
            Who::Service,
            SECRETS_TEMPLATE.as_bytes().to_vec(),
            "empty upstream secrets file",
        ),
        (
            "/etc/systemd/system/interceptor.service",
            0o644,
            Who::Root,
            Who::Root,
            unit.into_bytes(),
            "systemd unit (Type=notify, hardened)",
        ),
    ];
    for (p, mode, owner, group, contents, what) in files {
        let path = Path::new(p);
        if let Some(parent) = path.parent()
            && !at(root, parent).exists()
        {
            add_dir(&mut steps, &mut kept, parent, 0o755, Who::Root, Who::Root);
        }
        if at(root, path).exists() {
            kept.push(format!("{p} exists, kept (not overwritten)"));
        } else {
            steps.push(Step::File {
                path: path.to_owned(),
                mode,
                owner,
                group,
                contents,
                what,
            });
        }
    }
    match &server {
        Some((data_dir, (server_uid, _))) if moved => {
            if let Some(parent) = Path::new(pg_socket::PRIVATE_DIR).parent()
                && !at(root, parent).exists()
            {
                add_dir(&mut steps, &mut kept, parent, 0o755, Who::Root, Who::Root);
            }
            let account = pg_socket::user_name(*server_uid).unwrap_or_else(|| "postgres".into());
            let tmpfiles = Path::new(pg_socket::TMPFILES);
            if let Some(parent) = tmpfiles.parent()
                && !at(root, parent).exists()
            {
                add_dir(&mut steps, &mut kept, parent, 0o755, Who::Root, Who::Root);
            }
            if at(root, tmpfiles).exists() {
                kept.push(format!("{} exists, kept", tmpfiles.display()));
            } else {
                steps.push(Step::File {
                    path: tmpfiles.to_owned(),
                    mode: 0o644,
                    owner: Who::Root,
                    group: Who::Root,
                    contents: format!(
                        "# PostgreSQL's unix socket directory, private to interceptor (recreated at boot).\n\
                         d {} 0750 {account} {USER} -\n",
                        private.display()
                    )
                    .into_bytes(),
                    what: "recreates the private socket directory at boot",
                });
            }
            steps.push(Step::PgSocket {
                dir: private.clone(),
                data_dir: data_dir.clone(),
                server_uid: *server_uid,
                restart: pg_socket::restart_command(&cluster),
            });
        }
        Some(_) => kept.push(format!(
            "PostgreSQL's unix socket is already in {}",
            private.display()
        )),
        None => kept.push(
            "PostgreSQL's data directory was not found: its unix socket stays where it is \
             (pass --pg-data to move it into a directory only interceptor can enter)"
                .to_owned(),
        ),
    }
    if !at(root, &bin).exists() {
        if let Some(parent) = bin.parent()
            && !at(root, parent).exists()
        {
            add_dir(&mut steps, &mut kept, parent, 0o755, Who::Root, Who::Root);
        }
        steps.push(Step::Binary {
            from: exe,
            path: bin,
        });
    }
    if root == Path::new("/") {
        if Path::new("/run/systemd/system").is_dir() {
            steps.push(Step::Enable);
        } else {
            kept.push(format!(
                "systemd is not running here: enable the unit later with `systemctl enable {UNIT}`"
            ));
        }
    } else {
        kept.push(format!(
            "--root: the unit is not enabled (on the target: `systemctl enable {UNIT}`)"
        ));
    }
    Ok(Plan {
        steps,
        kept,
        config,
        cluster,
    })
}

/// `interceptor install`.
pub fn install(args: &InstallArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    // shadow-utils' --prefix wants an absolute path.
    let root = &absolute(&args.root)?;
    let manifest_path = at(root, Path::new(MANIFEST));
    if manifest_path.exists() {
        bail!(
            "interceptor is already installed here ({} exists); `interceptor uninstall` first",
            manifest_path.display()
        );
    }
    let args = &InstallArgs {
        root: root.clone(),
        ..args.clone()
    };
    let plan = plan(args)?;
    report_host(&plan.cluster, out)?;
    let verb = if args.apply {
        ""
    } else {
        " (dry run: nothing is changed; --apply to make these changes)"
    };
    writeln!(out, "\nChanges{verb}, under {}:", root.display())?;
    for s in &plan.steps {
        writeln!(out, "  + {}", s.describe())?;
    }
    for k in &plan.kept {
        writeln!(out, "  = {k}")?;
    }
    if !args.apply {
        writeln!(
            out,
            "\n--- {CONFIG} (as it would be written) ---\n{}",
            plan.config
        )?;
        return Ok(());
    }
    let mut manifest = Manifest::default();
    let result = apply(root, &plan.steps, args.restart_postgres, &mut manifest, out);
    // Written even after a failure, so that `uninstall` can undo what was done.
    if !manifest.changes.is_empty() || result.is_ok() {
        if let Some(dir) = manifest_path.parent()
            && !dir.exists()
        {
            // Only after a failure before /etc/interceptor was made: undone like the rest.
            std::fs::create_dir_all(dir)?;
            manifest.changes.insert(
                0,
                Change::Dir {
                    path: PathBuf::from("/etc/interceptor"),
                },
            );
        }
        manifest.save(&manifest_path)?;
        writeln!(out, "  + wrote {MANIFEST} (what uninstall undoes)")?;
    }
    result.context(
        "install stopped part way; `interceptor uninstall --apply` undoes what was done",
    )?;
    writeln!(
        out,
        "\nInstalled. Next: add identities and policies, put upstream role passwords in \
         /etc/interceptor/secrets.toml, change the pg_hba.conf lines above, then\n  \
         interceptor check-config -c {CONFIG}\n  interceptor doctor -c {CONFIG}\n  \
         systemctl start interceptor"
    )?;
    Ok(())
}

fn report_host(c: &discover::Cluster, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "PostgreSQL found through {}:", c.source)?;
    writeln!(
        out,
        "  version {}, data directory {}, port {}, unix socket directory {}{}",
        c.version.as_deref().unwrap_or("unknown"),
        c.data_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "not found".into()),
        c.port,
        c.socket_dir.display(),
        if c.running {
            " (running)"
        } else {
            " (not running)"
        }
    )?;
    match &c.hba {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => {
                let findings = hba::check(&text);
                if findings.is_empty() {
                    writeln!(
                        out,
                        "\n{}: no line lets a client skip interceptor",
                        path.display()
                    )?;
                } else {
                    writeln!(
                        out,
                        "\n{}: {} line(s) let clients skip interceptor; change them (then \
                         `SELECT pg_reload_conf();`):",
                        path.display(),
                        findings.len()
                    )?;
                    for f in &findings {
                        writeln!(out, "  {f}")?;
                    }
                }
            }
            Err(e) => writeln!(out, "\ncannot read {}: {e}", path.display())?,
        },
        None => writeln!(
            out,
            "\npg_hba.conf not found: pass --pg-hba FILE to have it checked"
        )?,
    }
    let existing = crate::ebpf::existing::find(&[c.port]);
    if existing.is_empty() {
        writeln!(
            out,
            "\nNo open connection to PostgreSQL would bypass interceptor."
        )?;
    } else {
        writeln!(
            out,
            "\n{} open connection(s) to PostgreSQL predate interceptor and keep bypassing it \
             until they reconnect:",
            existing.len()
        )?;
        for e in &existing {
            writeln!(out, "  {e}")?;
        }
        writeln!(
            out,
            "  to close them, as a PostgreSQL superuser: {}",
            crate::ebpf::existing::terminate_sql(&existing)
        )?;
    }
    Ok(())
}

fn ids(root: &Path) -> anyhow::Result<(u32, u32)> {
    let (uid, _) = account_entry(root, "/etc/passwd", USER)
        .with_context(|| format!("user {USER} not found in {}/etc/passwd", root.display()))?;
    let (gid, _) = account_entry(root, "/etc/group", USER)
        .with_context(|| format!("group {USER} not found in {}/etc/group", root.display()))?;
    Ok((uid, gid))
}

fn owner_ids(root: &Path, owner: Who, group: Who) -> anyhow::Result<(u32, u32)> {
    let service = if owner == Who::Service || group == Who::Service {
        Some(ids(root)?)
    } else {
        None
    };
    let pick = |w: Who, i: fn((u32, u32)) -> u32| match (w, service) {
        (Who::Service, Some(s)) => i(s),
        _ => 0,
    };
    Ok((pick(owner, |s| s.0), pick(group, |s| s.1)))
}

fn account_command(root: &Path, program: &str) -> Command {
    let mut c = Command::new(program);
    if root != Path::new("/") {
        c.arg("--prefix").arg(root);
    }
    c
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Restarts PostgreSQL when asked to (and it is known how), else prints what to run.
fn restart_or_say(
    restart: Option<&[String]>,
    now: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match (restart, now) {
        (Some(cmd), true) => {
            writeln!(out, "  restarting PostgreSQL: {}", cmd.join(" "))?;
            pg_socket::restart(cmd)?;
        }
        (Some(cmd), false) => writeln!(
            out,
            "  ! the socket moves when PostgreSQL restarts: {} (or --restart-postgres)",
            cmd.join(" ")
        )?,
        (None, _) => writeln!(
            out,
            "  ! the socket moves when PostgreSQL restarts (restart it the way it was started)"
        )?,
    }
    Ok(())
}

fn apply(
    root: &Path,
    steps: &[Step],
    restart_postgres: bool,
    manifest: &mut Manifest,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for step in steps {
        match step {
            Step::Group => {
                if root != Path::new("/") && !at(root, Path::new("/etc/group")).is_file() {
                    bail!(
                        "--root {}: no etc/group and etc/passwd there (a system tree is needed \
                         for the account)",
                        root.display()
                    );
                }
                for b in ACCOUNT_BACKUPS {
                    if !at(root, Path::new(b)).exists() {
                        manifest.changes.push(Change::Scratch { path: b.into() });
                    }
                }
                run(account_command(root, "groupadd").args(["--system", USER]))?;
                manifest.changes.push(Change::Group { name: USER.into() });
            }
            Step::User => {
                run(account_command(root, "useradd").args([
                    "--system",
                    "--gid",
                    USER,
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "interceptor PostgreSQL gateway",
                    USER,
                ]))?;
                manifest.changes.push(Change::User { name: USER.into() });
            }
            Step::Dir {
                path,
                mode,
                owner,
                group,
            } => {
                let p = at(root, path);
                std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
                manifest.changes.push(Change::Dir { path: path.clone() });
                let (u, g) = owner_ids(root, *owner, *group)?;
                std::os::unix::fs::chown(&p, Some(u), Some(g))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
            }
            Step::File {
                path,
                mode,
                owner,
                group,
                contents,
                ..
            } => {
                let p = at(root, path);
                // Created private, then handed over: never readable by others in between.
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode_private()
                    .open(&p)
                    .with_context(|| format!("create {}", p.display()))?;
                manifest.changes.push(Change::File {
                    path: path.clone(),
                    sha256: Some(manifest::sha256(contents)),
                    len: contents.len() as u64,
                });
                f.write_all(contents)?;
                f.sync_all()?;
                let (u, g) = owner_ids(root, *owner, *group)?;
                std::os::unix::fs::chown(&p, Some(u), Some(g))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
            }
            Step::Binary { from, path } => {
                let p = at(root, path);
                // A hard link where the tree is on the same file system (tests), else a copy.
                if std::fs::hard_link(from, &p).is_err() {
                    std::fs::copy(from, &p)
                        .with_context(|| format!("copy {} to {}", from.display(), p.display()))?;
                }
                let len = std::fs::metadata(&p)?.len();
                manifest.changes.push(Change::File {
                    path: path.clone(),
                    sha256: None,
                    len,
                });
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            }
            Step::PgSocket {
                dir,
                data_dir,
                server_uid,
                restart,
            } => {
                // An existing one (left by an uninstall before PostgreSQL restarted) is reused.
                if !dir.exists() {
                    std::fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
                    manifest.changes.push(Change::Dir {
                        path: PathBuf::from(pg_socket::PRIVATE_DIR),
                    });
                }
                let (_, gid) = ids(root)?;
                std::os::unix::fs::chown(dir, Some(*server_uid), Some(gid))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
                let file = pg_socket::auto_conf(data_dir);
                let line = pg_socket::setting_line(dir);
                let previous = pg_socket::add(&file, &line)?;
                manifest.changes.push(Change::PgConf {
                    file,
                    line,
                    previous,
                    restart: restart.clone(),
                });
                restart_or_say(restart.as_deref(), restart_postgres, out)?;
            }
            Step::Enable => {
                run(Command::new("systemctl").arg("daemon-reload"))?;
                run(Command::new("systemctl").args(["enable", UNIT]))?;
                manifest.changes.push(Change::Enabled { unit: UNIT.into() });
            }
        }
        writeln!(out, "  done: {}", step.describe())?;
    }
    Ok(())
}

trait PrivateOpen {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateOpen for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// `interceptor uninstall`.
pub fn uninstall(args: &UninstallArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let root = &absolute(&args.root)?;
    let manifest_path = at(root, Path::new(MANIFEST));
    let manifest = Manifest::load(&manifest_path).with_context(|| {
        format!(
            "nothing to undo: {} is missing or unreadable (only what `interceptor install \
             --apply` did can be undone; a package is removed with apt)",
            manifest_path.display()
        )
    })?;
    let verb = if args.apply {
        ""
    } else {
        " (dry run: nothing is changed; --apply to make these changes)"
    };
    writeln!(
        out,
        "Undoing `interceptor install`{verb}, under {}:",
        root.display()
    )?;
    writeln!(out, "  - remove {MANIFEST}")?;
    let mut manifest_gone = false;
    let mut kept = 0usize;
    for change in manifest.changes.iter().rev() {
        if args.apply
            && !manifest_gone
            && let Change::Dir { path } = change
            && Path::new(MANIFEST).starts_with(path)
        {
            std::fs::remove_file(&manifest_path)?;
            manifest_gone = true;
        }
        match undo(root, change, args, out)? {
            Undo::Done(what) => writeln!(out, "  - {what}")?,
            Undo::Kept(why) => {
                kept += 1;
                writeln!(out, "  = {why}")?
            }
        }
    }
    if args.apply && !manifest_gone && manifest_path.exists() {
        std::fs::remove_file(&manifest_path)?;
    }
    if kept > 0 {
        writeln!(out, "{kept} item(s) kept, listed above with `=`.")?;
    }
    Ok(())
}

enum Undo {
    Done(String),
    Kept(String),
}

fn undo(
    root: &Path,
    change: &Change,
    args: &UninstallArgs,
    out: &mut dyn Write,
) -> anyhow::Result<Undo> {
    let apply = args.apply;
    Ok(match change {
        Change::Enabled { unit } => {
            if apply {
                // The unit may already be stopped or gone: report, keep going.
                if let Err(e) = run(Command::new("systemctl").args(["disable", "--now", unit])) {
                    writeln!(out, "  ! {e}")?;
                }
            }
            Undo::Done(format!("systemctl disable --now {unit}"))
        }
        Change::File { path, sha256, len } => {
            let p = at(root, path);
            if !p.exists() {
                return Ok(Undo::Done(format!("{} (already gone)", path.display())));
            }
            let same = match sha256 {
                Some(h) => std::fs::read(&p).is_ok_and(|c| &manifest::sha256(&c) == h),
                None => std::fs::metadata(&p).is_ok_and(|m| m.len() == *len),
            };
            if !same && !args.force {
                return Ok(Undo::Kept(format!(
                    "{} changed since install, kept (--force removes it)",
                    path.display()
                )));
            }
            if apply {
                std::fs::remove_file(&p).with_context(|| format!("rm {}", p.display()))?;
            }
            if path.ends_with(UNIT) && apply && root == Path::new("/") {
                let _ = run(Command::new("systemctl").arg("daemon-reload"));
            }
            Undo::Done(format!("remove {}", path.display()))
        }
        Change::Dir { path } => {
            let p = at(root, path);
            if !p.exists() {
                return Ok(Undo::Done(format!("{} (already gone)", path.display())));
            }
            // In a dry run the files planned for removal are still there.
            let entries: Vec<PathBuf> =
                std::fs::read_dir(&p)?.flatten().map(|e| e.path()).collect();
            let pg_socket_only = !entries.is_empty()
                && entries.iter().all(|e| {
                    e.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".s.PGSQL."))
                });
            if apply && pg_socket_only {
                return Ok(Undo::Kept(format!(
                    "{} still holds PostgreSQL's socket, kept: restart PostgreSQL (its socket \
                     moves back), then remove the directory",
                    path.display()
                )));
            }
            if apply && !entries.is_empty() {
                return Ok(Undo::Kept(format!(
                    "{} is not empty ({} entries), kept: an audit trail is evidence, archive it \
                     and remove it by hand",
                    path.display(),
                    entries.len()
                )));
            }
            if apply {
                std::fs::remove_dir(&p).with_context(|| format!("rmdir {}", p.display()))?;
            }
            Undo::Done(format!("remove directory {} (if empty)", path.display()))
        }
        Change::User { name } => {
            if apply {
                run(account_command(root, "userdel").arg(name))?;
            }
            Undo::Done(format!("delete user {name}"))
        }
        Change::Group { name } => {
            if apply && account_entry(root, "/etc/group", name).is_some() {
                run(account_command(root, "groupdel").arg(name))?;
            }
            Undo::Done(format!("delete group {name}"))
        }
        Change::PgConf {
            file,
            line,
            previous,
            restart,
        } => {
            if apply {
                if pg_socket::remove(file, line, previous.as_deref())? {
                    restart_or_say(restart.as_deref(), args.restart_postgres, out)?;
                } else {
                    return Ok(Undo::Done(format!(
                        "`{line}` is no longer in {} (already undone)",
                        file.display()
                    )));
                }
            }
            Undo::Done(format!("remove `{line}` from {}", file.display()))
        }
        Change::Scratch { path } => {
            let p = at(root, path);
            if apply && p.exists() {
                std::fs::remove_file(&p)?;
            }
            Undo::Done(format!("remove {} (account-file backup)", path.display()))
        }
    })
}
