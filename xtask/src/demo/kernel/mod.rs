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

mod config;
mod pins;
mod readiness;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor_tests::pg::{APP_DB, APP_RO};
use interceptor_tests::{ConnParams, Interceptor, InterceptorSetup, PgCluster};

use super::cli::InterceptorCli;
use super::{interrupted, masking, psql};
use crate::cmd;
use pins::PinGuard;
pub use readiness::prepare_object;

/// The policy for psql processes of this uid; a role the demo identity gets nowhere else, so the
/// session's role shows that the kernel-attested process chose the route.
const POLICY_NAME: &str = "demo-local-psql";
const ROUTED_ROLE: &str = APP_RO;
const SQL: &str = "SELECT current_user AS upstream_role";

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
    if let Some(reason) = readiness::skip_reason(&cli)? {
        println!("   [SKIP] {reason}");
        return Ok(None);
    }
    pins::remove_stale_pins(&cli);
    interrupted(stop)?;

    let pins = PinGuard::for_this_run(&cli);
    let pin_dir = pins.pin_dir().to_path_buf();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let ebpf = config::ebpf_toml(pg.port(), &pin_dir)?;
    let policy = config::policy_toml(uid);
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
    let pin_dir = demo.pin_dir().to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cli.json("ebpf", &["status", "--pin-dir", &pin_dir, "--json"])?;
        if pins::is_attached(&status, port) {
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
