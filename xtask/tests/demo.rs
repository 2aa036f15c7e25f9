//! `cargo xtask demo --no-wait` end to end: the real binary, a real cluster, the real proxy, the
//! real approvals CLI and, as root with eBPF support, the real kernel programs. As root it also
//! runs the demo as an unprivileged user, whose kernel step must skip with its reason.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use interceptor_tests::fixtures;

/// The demos run one after the other: each may build interceptor and starts two clusters' worth
/// of processes, and the kernel step must not meet another demo's.
static SERIAL: Mutex<()> = Mutex::new(());

/// The account the unprivileged run uses.
const UNPRIVILEGED: &str = "nobody";

/// The port in a line like `   interceptor listens on 127.0.0.1:PORT; ...`.
fn port_after(stdout: &str, marker: &str) -> u16 {
    let rest = stdout
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no {marker:?} in demo output:\n{stdout}"));
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no port after {marker:?}:\n{stdout}"))
}

/// The rest of the line after `marker`.
fn line_after<'a>(stdout: &'a str, marker: &str) -> Option<&'a str> {
    stdout
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .map(str::trim)
}

/// The text of demo section `-- N. <title>` up to the next section.
fn section<'a>(stdout: &'a str, title: &str) -> &'a str {
    let start = stdout
        .find(title)
        .unwrap_or_else(|| panic!("no section {title:?} in demo output:\n{stdout}"));
    let rest = &stdout[start..];
    let end = rest[title.len()..]
        .find("\n-- ")
        .or_else(|| rest[title.len()..].find("\n== "))
        .map_or(rest.len(), |e| e + title.len());
    &rest[..end]
}

/// Whether the interceptor binary the demo would use can already proxy (`interceptor run
/// --config FILE`). The skeleton binary ignores its arguments and prints nothing; the demo
/// cannot work with it.
fn proxy_exists() -> bool {
    match interceptor_tests::proxy::interceptor_bin() {
        Ok(bin) => Command::new(bin)
            .args(["run", "--help"])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--config")
            }),
        // Not built yet: the demo builds it itself, so let it run.
        Err(_) => true,
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn bpf_required() -> bool {
    std::env::var("INTERCEPTOR_REQUIRE_BPF").is_ok_and(|v| v == "1")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Both servers are gone once the demo exited.
fn assert_servers_stopped(stdout: &str) {
    for marker in [
        "PostgreSQL listens on 127.0.0.1:",
        "interceptor listens on 127.0.0.1:",
    ] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port_after(stdout, marker)));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
            "{addr} still accepts connections after the demo exited"
        );
    }
}

/// The steps every run shows: policy decisions, masking, approval, the audit trail.
fn assert_common_steps(stdout: &str) {
    // Every step is echoed with its command and output; step 1 shows the upstream role.
    assert!(stdout.contains("-- 1. Who am I?"), "{stdout}");
    assert!(stdout.contains("$ psql -h 127.0.0.1 -p "), "{stdout}");
    assert!(stdout.contains(" app_rw "), "{stdout}");
    assert!(stdout.contains("(5 rows)"), "{stdout}");

    // Masking: the raw values of row 1 appear once, in the exempt auditor's result; the
    // agent's result shows their masked forms.
    let masking = section(stdout, "Masking: the same query");
    let first = &fixtures::accounts()[0];
    for raw in [&first.email, &first.card_number] {
        assert_eq!(
            masking.matches(raw.as_str()).count(),
            1,
            "{raw} should appear exactly once (for the auditor):\n{masking}"
        );
    }
    let last4 = &first.card_number[first.card_number.len() - 4..];
    assert!(masking.contains(&format!("*{last4}")), "{masking}");
    let domain = first.email.split_once('@').map(|(_, d)| d).unwrap();
    assert!(masking.contains(&format!("***@{domain}")), "{masking}");
    assert!(masking.contains("-U auditor "), "{masking}");

    // Approval: the NOTICE with the request id, the CLI approval, the DELETE that then ran.
    let approval = section(stdout, "Approval: a DELETE held");
    assert!(
        approval.contains("statement held for approval, request "),
        "{approval}"
    );
    assert!(
        approval.contains("$ interceptor approvals -c ") && approval.contains(" approve "),
        "{approval}"
    );
    assert!(approval.contains("status       approved"), "{approval}");
    assert!(approval.contains("DELETE 1"), "{approval}");
    assert!(approval.contains("       35\n"), "{approval}");

    assert!(stdout.contains("\nOK: "), "audit verify: {stdout}");
    // The connection instructions carry the passwords.
    assert!(stdout.contains("PGPASSWORD="), "{stdout}");
    assert!(stdout.contains("user=demo dbname=app"), "{stdout}");
    assert!(stdout.contains("user=auditor dbname=app"), "{stdout}");
}

#[test]
fn demo_runs_its_script_through_interceptor_and_cleans_up() {
    if !proxy_exists() {
        eprintln!("skipped: this interceptor build has no `run` subcommand yet");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "--no-wait"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "demo failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_common_steps(&stdout);

    let kernel = section(&stdout, "Kernel interception:");
    if kernel.contains("   [SKIP] ") {
        assert!(
            !bpf_required(),
            "INTERCEPTOR_REQUIRE_BPF=1 but the kernel step was skipped:\n{kernel}"
        );
        if !is_root() {
            assert!(kernel.contains("[SKIP] needs root"), "{kernel}");
        }
        // Straight to fd 2: libtest captures eprintln! of passing tests, and a skip must show.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("\nnote: the demo skipped its kernel step:\n{kernel}\n").as_bytes(),
        );
    } else {
        // psql at PostgreSQL's own port got the role only the kernel-matched policy gives, and
        // the session carries psql's process.
        let direct = format!(
            "-p {} -U demo",
            port_after(&stdout, "PostgreSQL listens on 127.0.0.1:")
        );
        assert!(kernel.contains(&direct), "{kernel}");
        assert!(kernel.contains(" app_ro\n"), "{kernel}");
        assert!(kernel.contains("checked: session "), "{kernel}");
        assert!(kernel.contains("comm psql exe /"), "{kernel}");
        // Detached on the way out: the pin dir is gone.
        let pins = line_after(&stdout, "programs pinned under ")
            .and_then(|l| l.strip_suffix("):"))
            .unwrap_or_else(|| panic!("no pin dir in demo output:\n{stdout}"));
        assert!(pins.starts_with("/sys/fs/bpf/"), "{pins}");
        assert!(
            !Path::new(pins).exists(),
            "{pins} still exists after the demo"
        );
        assert!(
            stdout.contains("removed: none of the demo's programs stays attached"),
            "{stdout}"
        );
    }

    // --no-wait tears both servers down before exiting.
    assert_servers_stopped(&stdout);
}

/// Whether `user` can run `program` (every directory on its path must let it through).
fn can_run_as(user: &str, program: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", user, "--", "test", "-x"])
        .arg(program)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn demo_as_an_unprivileged_user_skips_only_the_kernel_step() {
    if !is_root() || !proxy_exists() {
        eprintln!("skipped: needs root to run the demo as another user");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // `nobody` cannot run cargo in this checkout: hand it the binary the e2e tests use.
    let bin: PathBuf = match interceptor_tests::proxy::interceptor_bin() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipped: no interceptor binary to hand to the unprivileged demo: {e:#}");
            return;
        }
    };
    let xtask = Path::new(env!("CARGO_BIN_EXE_xtask"));
    if !can_run_as(UNPRIVILEGED, xtask) || !can_run_as(UNPRIVILEGED, &bin) {
        eprintln!(
            "skipped: {UNPRIVILEGED} cannot execute {} or {} (a private checkout)",
            xtask.display(),
            bin.display()
        );
        return;
    }
    let out = Command::new("runuser")
        .args(["-u", UNPRIVILEGED, "--"])
        .arg(xtask)
        .args(["demo", "--no-wait"])
        .env("INTERCEPTOR_BIN", &bin)
        .env("HOME", std::env::temp_dir())
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "unprivileged demo failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_common_steps(&stdout);
    let kernel = section(&stdout, "Kernel interception:");
    assert!(
        kernel.contains("   [SKIP] needs root"),
        "the kernel step should skip with its reason:\n{kernel}"
    );
    assert!(!stdout.contains("programs pinned under "), "{stdout}");
    assert!(
        !kernel.contains("FAIL"),
        "a skipped step says SKIP, not FAIL:\n{kernel}"
    );
    assert_servers_stopped(&stdout);
}
