//! The Debian package from `cargo xtask package`, installed with the real dpkg into a throwaway
//! copy of this machine: an overlay whose lower layer is `/` and whose upper layer is a tmpfs,
//! mounted in a private mount namespace (a holder process keeps it alive; killing it unmounts
//! everything). dpkg runs with `--root` on that copy (its maintainer scripts chrooted into it),
//! so the package's user, files and dpkg database go to the tmpfs and the host is untouched.
//!
//! Checked: an existing config (and account) is left exactly as it was; a fresh install writes
//! the example config with tight modes; the packaged binary runs `doctor` inside the copy;
//! remove keeps the config, purge leaves nothing but the system account (kept on purge, as
//! Debian packages do) and dpkg's own records.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Instant;

use interceptor_tests::proxy::interceptor_bin;

/// The mounts of the copy: set up by a shell in a new mount namespace, which then sleeps.
const HOLDER: &str = r#"set -e
d="$1"
mount -t tmpfs -o mode=0755 tmpfs "$d"
mkdir "$d/upper" "$d/work" "$d/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" "$d/root"
for m in proc sys dev; do mount --rbind "/$m" "$d/root/$m"; done
echo ready
exec sleep 600
"#;

/// A copy-on-write copy of `/`, visible only to the holder's mount namespace.
struct Scratch {
    holder: Child,
    /// The (empty, on the host) directory the tmpfs is mounted on inside the namespace.
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("deb-scratch")
            .tempdir()
            .unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            HOLDER,
            "sh",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe; the holder dies with the test thread.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let mut holder = cmd.spawn().unwrap();
        let mut stdout = holder.stdout.take().unwrap();
        let mut ready = [0u8; 6];
        std::io::Read::read_exact(&mut stdout, &mut ready).expect("the mount holder failed");
        assert_eq!(&ready, b"ready\n");
        Scratch { holder, dir }
    }

    /// The copy's root as the holder's namespace sees it.
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A path of the copy, readable from this process (through the holder's mount namespace).
    fn path(&self, p: &str) -> PathBuf {
        let inside = self.root().join(p.trim_start_matches('/'));
        Path::new(&format!("/proc/{}/root", self.holder.id()))
            .join(inside.strip_prefix("/").unwrap())
    }

    /// The tmpfs upper layer: everything the copy changed.
    fn upper(&self) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.holder.id()))
            .join(self.dir.path().strip_prefix("/").unwrap())
            .join("upper")
    }

    /// Runs `args` in the holder's mount namespace (not chrooted).
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg("--")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!(
            "$ {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `args` chrooted into the copy.
    fn chroot(&self, args: &[&str]) -> Output {
        let root = self.root().display().to_string();
        let mut all = vec!["chroot", root.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    fn dpkg(&self, args: &[&str]) -> Output {
        let root = self.root().display().to_string();
        let mut all = vec!["dpkg", "--root", root.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn ok(out: &Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The .deb: `INTERCEPTOR_DEB`, else `cargo xtask package` of the binary under test (not
/// compressed: xz of a debug build would take longer than the rest of the test).
fn deb(out_dir: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("INTERCEPTOR_DEB") {
        return PathBuf::from(p);
    }
    let bin = interceptor_bin().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let out = Command::new(cargo)
        .args(["run", "--quiet", "--package", "xtask", "--", "package"])
        .arg("--binary")
        .arg(&bin)
        .arg("--out")
        .arg(out_dir)
        .args(["--compression", "none"])
        .current_dir(interceptor_tests::workspace_root())
        .output()
        .unwrap();
    let stdout = ok(&out, "cargo xtask package");
    eprintln!("packaged in {:?}", started.elapsed());
    // The last line is the package's path (commands are echoed before it with `$ `).
    stdout
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| l.ends_with(".deb") && !l.starts_with('$'))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no .deb path in:\n{stdout}"))
}

fn account(s: &Scratch, file: &str, name: &str) -> Option<(u32, u32)> {
    std::fs::read_to_string(s.path(file))
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap_or(0)))
        })
}

fn host_has_account() -> bool {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("interceptor:"))
}

/// What the copy changed, as paths relative to `/`: files, symlinks, whiteouts, and directories
/// the host does not have (a directory copied up only because something inside it changed
/// exists on the host too).
fn changes(s: &Scratch) -> BTreeSet<String> {
    let upper = s.upper();
    let mut out = BTreeSet::new();
    let mut stack = vec![upper.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(&upper).unwrap().to_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
                if Path::new("/").join(&rel).is_dir() {
                    continue;
                }
            }
            out.insert(format!("/{}", rel.display()));
        }
    }
    out
}

/// Changes a package may leave after purge: the kept system account (with the backups and lock
/// the account tools write), dpkg's database and log, and the man-db index its trigger updates.
fn allowed_after_purge(path: &str) -> bool {
    [
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/passwd-",
        "/etc/group-",
        "/etc/shadow-",
        "/etc/gshadow-",
        "/etc/.pwd.lock",
        // adduser's lock file (on a tmpfs /run on a real host).
        "/run/adduser",
        "/var/log/dpkg.log",
    ]
    .contains(&path)
        || path.starts_with("/var/lib/dpkg/")
        || path.starts_with("/var/cache/man/")
        || path.starts_with("/var/cache/debconf/")
}

#[test]
fn package_installs_keeps_an_existing_config_runs_doctor_and_purges_clean() {
    if !interceptor_tests::os::is_root() {
        eprintln!("SKIPPED: installing a package into a scratch root needs root (mount, chroot)");
        return;
    }
    let started = Instant::now();
    let out_dir = tempfile::tempdir().unwrap();
    let deb = deb(out_dir.path());
    let deb = deb.display().to_string();
    let host_account = host_has_account();
    let s = Scratch::new();
    let config = "/etc/interceptor/interceptor.toml";

    // An administrator's config from before the package (e.g. `interceptor install`), with its
    // own mode and owner.
    let example = std::fs::read_to_string(
        interceptor_tests::workspace_root().join("interceptor.example.toml"),
    )
    .unwrap();
    let admin_config = format!("# edited by the administrator\n{example}");
    std::fs::create_dir(s.path("/etc/interceptor")).unwrap();
    std::fs::write(s.path(config), &admin_config).unwrap();
    std::fs::set_permissions(
        s.path(config),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();

    let text = ok(&s.dpkg(&["-i", &deb]), "dpkg -i (config present)");
    assert!(text.contains("keeping the existing"), "{text}");
    assert_eq!(
        std::fs::read_to_string(s.path(config)).unwrap(),
        admin_config
    );
    let m = std::fs::metadata(s.path(config)).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), m.gid()),
        (0o600, 0, 0),
        "config touched"
    );
    let (uid, gid) = account(&s, "/etc/passwd", "interceptor").expect("no interceptor user");
    assert_eq!(account(&s, "/etc/group", "interceptor").unwrap().0, gid);
    assert!(uid > 0 && uid < 1000, "not a system uid: {uid}");
    let state = std::fs::metadata(s.path("/var/lib/interceptor")).unwrap();
    assert_eq!(
        (state.mode() & 0o7777, state.uid(), state.gid()),
        (0o700, uid, gid)
    );
    assert!(s.path("/lib/systemd/system/interceptor.service").is_file());
    assert!(s.path("/usr/share/man/man1/interceptor.1.gz").is_file());

    // Again (an upgrade or reinstall): account and config as they were.
    ok(&s.dpkg(&["-i", &deb]), "dpkg -i (reinstall)");
    assert_eq!(account(&s, "/etc/passwd", "interceptor"), Some((uid, gid)));
    assert_eq!(
        std::fs::read_to_string(s.path(config)).unwrap(),
        admin_config
    );

    // The packaged binary, inside the copy.
    let doctor = s.chroot(&["/usr/bin/interceptor", "doctor", "--config", config]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        doctor.status.code() == Some(0) || doctor.status.code() == Some(1),
        "doctor crashed ({}):\n{report}{}",
        doctor.status,
        String::from_utf8_lossy(&doctor.stderr)
    );
    for check in ["ebpf object", "sk_lookup", "cgroup sock_addr", "bypass"] {
        assert!(
            report.contains(&format!("] {check}: ")),
            "no {check} check:\n{report}"
        );
    }
    assert!(!doctor.stderr.windows(5).any(|w| w == b"panic"));

    // remove: the program goes, the config stays; purge: the config and the empty directories go.
    ok(&s.dpkg(&["-r", "interceptor"]), "dpkg -r");
    assert!(!s.path("/usr/bin/interceptor").exists());
    assert_eq!(
        std::fs::read_to_string(s.path(config)).unwrap(),
        admin_config
    );
    ok(&s.dpkg(&["-P", "interceptor"]), "dpkg -P");
    let left: Vec<String> = changes(&s)
        .into_iter()
        .filter(|p| !allowed_after_purge(p))
        .collect();
    assert!(left.is_empty(), "purge left {left:#?}");

    // A fresh install (account kept from before): the example config, readable by the service.
    ok(&s.dpkg(&["-i", &deb]), "dpkg -i (fresh)");
    assert_eq!(std::fs::read_to_string(s.path(config)).unwrap(), example);
    let m = std::fs::metadata(s.path(config)).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 0, gid));
    let d = std::fs::metadata(s.path("/etc/interceptor")).unwrap();
    assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o750, 0, gid));
    assert_eq!(account(&s, "/etc/passwd", "interceptor"), Some((uid, gid)));
    ok(&s.dpkg(&["-P", "interceptor"]), "dpkg -P (fresh)");
    let left: Vec<String> = changes(&s)
        .into_iter()
        .filter(|p| !allowed_after_purge(p))
        .collect();
    assert!(left.is_empty(), "purge left {left:#?}");
    let status = s.dpkg(&["-s", "interceptor"]);
    assert!(!status.status.success(), "dpkg still knows the package");

    // The host itself: no package, no account.
    drop(s);
    assert_eq!(
        host_has_account(),
        host_account,
        "the host's accounts changed"
    );
    let host = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "interceptor"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&host.stdout).contains("installed"),
        "the package reached the host's dpkg database"
    );
    eprintln!("package test done in {:?}", started.elapsed());
}
