//! Demo step for just-in-time approval (issue #7): the agent's DELETE is held by the policy
//! until an approver, "in a second terminal", approves it with `interceptor approvals`. The
//! approvals socket maps the demo's own uid (SO_PEERCRED) to the approver, a different subject
//! than the agent, since nobody may approve their own request.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor_tests::Interceptor;
use interceptor_tests::pg::APP_DB;

use super::cli::InterceptorCli;
use super::{interrupted, masking, psql};

/// Who the demo's uid is on the approvals socket.
pub const APPROVER: &str = "dba-on-call";
pub const APPROVER_GROUP: &str = "dba";
/// A row of the fixture that the earlier steps leave alone.
const DELETE_SQL: &str = "DELETE FROM accounts WHERE id = 7";
const REASON: &str = "demo: checked with the account owner";
/// How long to wait for the NOTICE, and for psql to finish once approved.
const WAIT: Duration = Duration::from_secs(30);

/// The `[approvals]` section: `uid` is the approver. Its store and socket sit beside the config
/// (relative paths are resolved against the config file's directory), in interceptor's own temp
/// dir, which the harness removes, even after a demo that was killed.
pub fn config_toml(uid: u32) -> Result<String> {
    use toml::{Table, Value};
    let mut approver = Table::new();
    approver.insert("subject".into(), APPROVER.into());
    approver.insert(
        "groups".into(),
        Value::Array(vec![Value::from(APPROVER_GROUP)]),
    );
    let mut local = Table::new();
    local.insert(uid.to_string(), Value::Table(approver));
    let mut approvals = Table::new();
    approvals.insert("dir".into(), "approvals".into());
    approvals.insert("socket".into(), "approvals.sock".into());
    approvals.insert("local_approvers".into(), Value::Table(local));
    let mut root = Table::new();
    root.insert("approvals".into(), Value::Table(approvals));
    toml::to_string(&root).context("serialize [approvals]")
}

/// The request id in the NOTICE interceptor sends when it holds a statement
/// (`... statement held for approval, request 12; waiting up to 120 s`).
pub fn request_id(line: &str) -> Option<u64> {
    let rest = line.split("held for approval, request ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub fn run(n: usize, bin: &Path, proxy: &Interceptor, stop: &AtomicBool) -> Result<()> {
    println!("\n-- {n}. Approval: a DELETE held until a DBA approves it from a second terminal");
    println!(
        "   Rule `account-changes-need-a-dba` holds every change to `accounts` until a member \
         of group `{APPROVER_GROUP}` approves it. The agent's psql waits; on this host, uid {} \
         is the approver `{APPROVER}` ([approvals.local_approvers] in interceptor's config).",
        uid()
    );
    let params = proxy.params(masking::AGENT).dbname(APP_DB);
    let cli = InterceptorCli::new(bin).with_config(proxy.config_path());

    println!("   terminal 1 (the agent), left running:");
    println!("$ {}", psql::command_line(&params, DELETE_SQL));
    let mut client = psql::spawn(&params, DELETE_SQL)?;
    let (lines, stdout) = stream_output(&mut client.child)?;

    let deadline = Instant::now() + WAIT;
    let id = loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                println!("{line}");
                if let Some(id) = request_id(&line) {
                    break id;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                interrupted(stop)?;
                if Instant::now() >= deadline {
                    bail!("psql showed no `held for approval` NOTICE within {WAIT:?}");
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("psql ended before its DELETE was held for approval")
            }
        }
    };

    // The rest of the NOTICE (DETAIL, HINT) follows in the same write; show it before
    // switching terminals.
    let hint_deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hint_deadline {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                println!("{line}");
                if line.starts_with("HINT:") {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }

    println!("   terminal 2 (the approver):");
    cli.shown("approvals", &["list"])?;
    let pending = cli.json("approvals", &["list", "--json"])?;
    let listed = pending.as_array().is_some_and(|list| {
        list.iter()
            .any(|r| r["id"].as_u64() == Some(id) && r["status"] == "pending")
    });
    if !listed {
        bail!("request {id} is not listed as pending: {pending}");
    }
    let id_text = id.to_string();
    cli.shown("approvals", &["approve", &id_text, "--reason", REASON])?;

    println!("   terminal 1 again: the DELETE ran once approved");
    let deadline = Instant::now() + WAIT;
    loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => println!("{line}"),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                interrupted(stop)?;
                if Instant::now() >= deadline {
                    bail!("psql did not finish within {WAIT:?} of the approval");
                }
            }
        }
    }
    let status = interceptor_tests::os::wait_with_deadline(&mut client.child, WAIT)?
        .context("psql did not exit after its stderr closed")?;
    let stdout = stdout
        .join()
        .map_err(|_| anyhow::anyhow!("psql stdout reader panicked"))??;
    print!("{stdout}");
    if !status.success() || !stdout.contains("DELETE 1") {
        bail!("expected psql to succeed with DELETE 1, got {status}: {stdout}");
    }

    println!("   the row is gone (35 of the 36 accounts left):");
    let count = psql::run_shown_ok(&params, "SELECT count(*) AS accounts FROM accounts")?;
    if !count.stdout.contains("35") {
        bail!("expected 35 accounts after the approved DELETE");
    }

    println!("   to repeat this by hand, in two terminals:");
    println!(
        "     terminal 1$ {}",
        psql::command_line_with_password(&params, "DELETE FROM accounts WHERE id = 8")
    );
    println!("     terminal 2$ {}", cli.line("approvals", &["list"]));
    println!(
        "     terminal 2$ {}",
        cli.line("approvals", &["approve", "ID", "--reason", "why"])
    );
    println!(
        "     (or `{}`: the agent gets the reason as its error)",
        cli.line("approvals", &["deny", "ID", "--reason", "why"])
    );
    Ok(())
}

type StdoutReader = std::thread::JoinHandle<Result<String>>;

/// psql's stderr line by line as it arrives (the NOTICE comes while the DELETE waits), and a
/// reader collecting its stdout.
fn stream_output(
    child: &mut std::process::Child,
) -> Result<(mpsc::Receiver<String>, StdoutReader)> {
    let stderr = child.stderr.take().context("psql stderr not piped")?;
    let mut out = child.stdout.take().context("psql stdout not piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stdout = std::thread::spawn(move || -> Result<String> {
        let mut text = String::new();
        out.read_to_string(&mut text).context("read psql stdout")?;
        Ok(text)
    });
    Ok((rx, stdout))
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_from_the_notice_psql_prints() {
        assert_eq!(
            request_id(
                "NOTICE:  interceptor: statement held for approval, request 12; waiting up to 120 s"
            ),
            Some(12)
        );
        assert_eq!(
            request_id("DETAIL:  approvers: dba; `interceptor approvals show 12`"),
            None
        );
        assert_eq!(request_id("NOTICE:  held for approval, request ; x"), None);
    }

    #[test]
    fn approvals_section_maps_the_uid_to_the_approver() {
        let text = config_toml(1234).unwrap();
        let value: toml::Value = toml::from_str(&text).unwrap();
        let a = &value["approvals"];
        assert_eq!(a["dir"].as_str(), Some("approvals"));
        assert_eq!(a["socket"].as_str(), Some("approvals.sock"));
        let who = &a["local_approvers"]["1234"];
        assert_eq!(who["subject"].as_str(), Some(APPROVER));
        assert_eq!(who["groups"][0].as_str(), Some(APPROVER_GROUP));
    }
}
