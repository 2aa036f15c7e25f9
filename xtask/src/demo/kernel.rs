//! Demo step for kernel interception (issue #5): a second interceptor with `[ebpf] enabled`
//! steers every new TCP connection to the throwaway PostgreSQL's own port into itself, and its
//! cgroup programs tell it which process connected. A plain `psql -h 127.0.0.1 -p <PostgreSQL's
//! port>` therefore lands in interceptor, is routed by a policy that matches the kernel-attested
//! process, and its session in the audit trail carries pid, uid and executable.
//!
//! Needs root and an interceptor binary with the eBPF object embedded; otherwise the step is
//! skipped with the reason. The programs are pinned under a directory of their own and detached
//! on the way out ([`PinGuard`]), also after an error or Ctrl-C; pins left by a demo that was
//! killed outright are removed by the next run.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor_tests::pg::{APP_DB, APP_RO};
use interceptor_tests::{ConnParams, Interceptor, InterceptorSetup, PgCluster};

use super::cli::InterceptorCli;
use super::{interrupted, masking, psql};
use crate::{build_ebpf, cmd};

/// Pin directories of demo runs: `/sys/fs/bpf/interceptor-demo-<pid of the demo>`.
const BPFFS: &str = "/sys/fs/bpf";
const PIN_PREFIX: &str = "interceptor-demo-";
/// The policy for psql processes of this uid; a role the demo identity gets nowhere else, so the
/// session's role shows that the kernel-attested process chose the route.
const POLICY_NAME: &str = "demo-local-psql";
const ROUTED_ROLE: &str = APP_RO;
const SQL: &str = "SELECT current_user AS upstream_role";

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
fn skip_reason(cli: &InterceptorCli) -> Result<Option<String>> {
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
    for line in &capabilities {
        println!("{line}");
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

/// What `interceptor doctor` must report `[ok]` for before the step can run.
const CAPABILITY_CHECKS: [&str; 4] = ["ebpf object", "sk_lookup", "cgroup sock_addr", "sock_ops"];

/// Detaches the programs pinned under its directory when dropped.
pub struct PinGuard {
    cli: InterceptorCli,
    pin_dir: PathBuf,
}

impl PinGuard {
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
            println!("   {dir} removed: the host is as it was before the demo");
        }
    }
}

/// The kernel step's interceptor, running until dropped: first interceptor stops, then its
/// programs are detached (fields drop in declaration order).
pub struct KernelDemo {
    proxy: Interceptor,
    pins: PinGuard,
    params: ConnParams,
}

impl KernelDemo {
    /// How a person reaches it by hand: psql at PostgreSQL's own port.
    pub fn connect_line(&self) -> String {
        let p = &self.params;
        format!(
            "PGPASSWORD={} psql {}",
            cmd::quote(p.password.as_deref().unwrap_or_default()),
            cmd::quote(&format!(
                "host={} port={} user={} dbname={} sslmode=disable",
                p.host, p.port, p.user, p.dbname
            ))
        )
    }

    pub fn pin_dir(&self) -> &Path {
        self.pins.pin_dir()
    }
}

/// The policy that routes the demo identity by its process: psql run by `uid`.
fn policy_toml(uid: u32) -> String {
    format!(
        "[policy]\n\
         name = \"{POLICY_NAME}\"\n\
         description = \"cargo xtask demo: the demo identity from a psql process of uid {uid}, \
         as the kernel attests it\"\n\
         \n\
         [identities]\n\
         subjects = [\"{agent}\"]\n\
         [identities.process]\n\
         uids = [{uid}]\n\
         exes = [\"*/bin/psql\"]\n\
         \n\
         [login]\n\
         upstream_role = \"{ROUTED_ROLE}\"\n\
         databases = [\"{APP_DB}\"]\n\
         \n\
         [[rule]]\n\
         name = \"read-only\"\n\
         decision = \"allow\"\n\
         kinds = [\"read\"]\n\
         functions = [\"pg_catalog.*\"]\n",
        agent = masking::AGENT,
    )
}

/// `[ebpf]`: steer `port` (PostgreSQL's) into interceptor, pins under `pin_dir`.
fn ebpf_toml(port: u16, pin_dir: &Path) -> Result<String> {
    use toml::{Table, Value};
    let mut ebpf = Table::new();
    ebpf.insert("enabled".into(), Value::Boolean(true));
    ebpf.insert(
        "ports".into(),
        Value::Array(vec![Value::Integer(i64::from(port))]),
    );
    ebpf.insert(
        "pin_dir".into(),
        Value::String(pin_dir.to_string_lossy().into_owned()),
    );
    let mut root = Table::new();
    root.insert("ebpf".into(), Value::Table(ebpf));
    toml::to_string(&root).context("serialize [ebpf]")
}

/// Detaches pins of earlier demo runs whose process is gone (killed before it could clean up).
fn remove_stale_pins(cli: &InterceptorCli) {
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

/// Runs the step; `Ok(None)` when it was skipped (the reason is printed).
pub fn run(
    n: usize,
    bin: &Path,
    pg: &PgCluster,
    password: &str,
    stop: &AtomicBool,
) -> Result<Option<KernelDemo>> {
    println!(
        "\n-- {n}. Kernel interception: psql aimed at PostgreSQL's own port lands in interceptor"
    );
    println!(
        "   A second interceptor with `[ebpf] enabled = true` and `ports = [{}]` (PostgreSQL's \
         TCP port) attaches an sk_lookup program that hands every new connection to that port \
         to interceptor, and cgroup programs that record which process connected.",
        pg.port()
    );
    let cli = InterceptorCli::new(bin);
    if let Some(reason) = skip_reason(&cli)? {
        println!("   skipped: {reason}");
        return Ok(None);
    }
    remove_stale_pins(&cli);
    interrupted(stop)?;

    let pin_dir = PathBuf::from(BPFFS).join(format!("{PIN_PREFIX}{}", std::process::id()));
    // Armed before interceptor starts: a start that fails half way is cleaned up too.
    let pins = PinGuard {
        cli: cli.clone(),
        pin_dir: pin_dir.clone(),
    };
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let ebpf = ebpf_toml(pg.port(), &pin_dir)?;
    let policy = policy_toml(uid);
    println!("   its config adds:\n{}", indent(&ebpf));
    println!(
        "   and policy `{POLICY_NAME}` selects the demo identity only from psql run by uid \
         {uid}, as the kernel attests it:\n{}",
        indent(&policy)
    );
    let proxy = Interceptor::start(
        InterceptorSetup::new(pg)
            .identity(masking::AGENT, password, &["demo"], None)
            .policy_file(POLICY_NAME, &policy)
            .with_audit()
            .extra_toml(&ebpf),
    )?;
    let params =
        ConnParams::new("127.0.0.1", pg.port(), masking::AGENT, Some(password)).dbname(APP_DB);
    let mut demo = KernelDemo {
        proxy,
        pins,
        params,
    };
    wait_attached(&cli, &mut demo, pg.port(), stop)
        .and_then(|()| exercise(&demo, &cli, pg.port(), uid, stop))
        .with_context(|| format!("the kernel step's interceptor log:\n{}", demo.proxy.logs()))?;
    Ok(Some(demo))
}

/// interceptor accepts connections on its own port before it attaches the programs: poll the
/// pins until every program is attached and `port` is steered.
fn wait_attached(
    cli: &InterceptorCli,
    demo: &mut KernelDemo,
    port: u16,
    stop: &AtomicBool,
) -> Result<()> {
    let pin_dir = demo.pins.pin_dir.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cli.json("ebpf", &["status", "--pin-dir", &pin_dir, "--json"])?;
        if is_attached(&status, port) {
            return Ok(());
        }
        if !demo.proxy.is_running() {
            bail!("interceptor exited before attaching its kernel programs");
        }
        interrupted(stop)?;
        if Instant::now() >= deadline {
            bail!("the kernel programs were not attached within 20 s: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every program's link is pinned and `port` is among the steered ports.
fn is_attached(status: &serde_json::Value, port: u16) -> bool {
    let links = status["links"].as_array();
    let all_pinned = links.is_some_and(|l| !l.is_empty() && l.iter().all(|l| l["pinned"] == true));
    let steered = status["steered_ports"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(port))));
    all_pinned && steered
}

/// Shows the attached programs, runs psql at PostgreSQL's port and checks where it landed.
fn exercise(
    demo: &KernelDemo,
    cli: &InterceptorCli,
    pg_port: u16,
    uid: u32,
    stop: &AtomicBool,
) -> Result<()> {
    println!(
        "   interceptor listens on 127.0.0.1:{}; PostgreSQL still listens on 127.0.0.1:{pg_port}",
        demo.proxy.port(),
    );
    let pin_text = demo.pin_dir().to_string_lossy().into_owned();
    cli.shown("ebpf", &["status", "--pin-dir", &pin_text])?;
    interrupted(stop)?;

    println!("   psql aimed at PostgreSQL itself:");
    let pid = direct_psql(&demo.params)?;
    let audit = cli.with_config(demo.proxy.config_path());
    check_audit(&audit, pid, uid)?;
    let status = cli.json("ebpf", &["status", "--pin-dir", &pin_text, "--json"])?;
    let counter = |name: &str| status["counters"][name].as_u64().unwrap_or(0);
    println!(
        "   kernel counters: {} connection(s) steered, {} identified",
        counter("steered"),
        counter("identified")
    );
    if counter("steered") == 0 || counter("identified") == 0 {
        bail!("the kernel counters show no steered and identified connection: {status}");
    }
    Ok(())
}

/// Runs psql against PostgreSQL's port; it must succeed and show the role the kernel policy
/// routes to. Returns psql's pid (the pg_wrapper script execs psql, so the pid stays).
fn direct_psql(params: &ConnParams) -> Result<u32> {
    println!("$ {}", psql::command_line(params, SQL));
    let mut client = psql::spawn(params, SQL)?;
    let pid = client.pid();
    let status =
        interceptor_tests::os::wait_with_deadline(&mut client.child, Duration::from_secs(30))?
            .context("psql did not finish within 30 s")?;
    // psql has exited: its pipes hold everything it wrote.
    let drain = |pipe: Option<&mut dyn std::io::Read>| -> Result<String> {
        let mut text = String::new();
        if let Some(p) = pipe {
            p.read_to_string(&mut text).context("read psql output")?;
        }
        Ok(text)
    };
    let stdout = drain(client.child.stdout.as_mut().map(|p| p as _))?;
    let stderr = drain(client.child.stderr.as_mut().map(|p| p as _))?;
    print!("{stdout}");
    eprint!("{stderr}");
    if !status.success() {
        bail!("psql failed ({status}): {}", stderr.trim());
    }
    if !stdout.contains(ROUTED_ROLE) {
        bail!(
            "expected upstream role {ROUTED_ROLE} (policy {POLICY_NAME}): the connection did not \
             land in interceptor with its kernel identity"
        );
    }
    Ok(pid)
}

/// The session in the audit trail carries the process the kernel saw: psql's pid, our uid.
fn check_audit(audit: &InterceptorCli, pid: u32, uid: u32) -> Result<()> {
    println!("   the audit trail of that interceptor:");
    audit.shown("audit", &["sessions"])?;
    let sessions = audit.json("audit", &["sessions", "--json"])?;
    let session = sessions
        .as_array()
        .and_then(|list| {
            list.iter()
                .filter(|s| s["subject"] == masking::AGENT)
                .filter_map(|s| s["session"].as_u64())
                .next_back()
        })
        .context("no session of the demo identity in the audit trail")?;
    let session = session.to_string();
    audit.shown("audit", &["show", &session])?;
    let detail = audit.json("audit", &["show", &session, "--json"])?;
    let process = &detail["start"]["identity"]["process"];
    let exe = process["exe"].as_str().unwrap_or_default();
    let ok = process["pid"].as_u64() == Some(u64::from(pid))
        && process["uid"].as_u64() == Some(u64::from(uid))
        && exe.ends_with("/psql");
    if !ok {
        bail!(
            "expected the session's kernel identity to be psql (pid {pid}, uid {uid}), got {process}"
        );
    }
    println!(
        "   checked: session {session} carries the kernel identity of psql pid {pid}, uid {uid}, {exe}"
    );
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("     {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_section_names_the_port_and_pin_dir() {
        let text = ebpf_toml(54321, Path::new("/sys/fs/bpf/interceptor-demo-1")).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["ebpf"]["enabled"].as_bool(), Some(true));
        assert_eq!(v["ebpf"]["ports"][0].as_integer(), Some(54321));
        assert_eq!(
            v["ebpf"]["pin_dir"].as_str(),
            Some("/sys/fs/bpf/interceptor-demo-1")
        );
    }

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
    }

    #[test]
    fn policy_requires_the_attested_process() {
        let v: toml::Value = toml::from_str(&policy_toml(1000)).unwrap();
        assert_eq!(
            v["identities"]["process"]["uids"][0].as_integer(),
            Some(1000)
        );
        assert_eq!(
            v["identities"]["process"]["exes"][0].as_str(),
            Some("*/bin/psql")
        );
        assert_eq!(v["login"]["upstream_role"].as_str(), Some(ROUTED_ROLE));
    }
}
