//! psql as the demo runs it: shown as the command line a person would type, run either to
//! completion (its output collected) or as a live process (its pid, its stderr as it arrives).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use interceptor_tests::{CmdOutput, ConnParams, PgCommand};

use crate::cmd;

/// The command line a person would type for `sql` (the password comes from the environment).
pub fn command_line(params: &ConnParams, sql: &str) -> String {
    format!(
        "psql -h {} -p {} -U {} -d {} -c {}",
        cmd::quote(&params.host),
        params.port,
        cmd::quote(&params.user),
        cmd::quote(&params.dbname),
        cmd::quote(sql)
    )
}

/// The same with the password in front, for the instructions to repeat a step by hand.
pub fn command_line_with_password(params: &ConnParams, sql: &str) -> String {
    match &params.password {
        Some(pw) => format!(
            "PGPASSWORD={} {}",
            cmd::quote(pw),
            command_line(params, sql)
        ),
        None => command_line(params, sql),
    }
}

/// Shows the command, runs it (psql -X, ON_ERROR_STOP, verbose errors) and shows its output.
pub fn run_shown(params: &ConnParams, sql: &str) -> Result<CmdOutput> {
    println!("$ {}", command_line(params, sql));
    let out = PgCommand::psql(params)
        .args(["-v", "VERBOSITY=verbose", "-c", sql])
        .timeout(Duration::from_secs(30))
        .run()?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    Ok(out)
}

/// Like [`run_shown`], but psql must succeed.
pub fn run_shown_ok(params: &ConnParams, sql: &str) -> Result<CmdOutput> {
    let out = run_shown(params, sql)?;
    if !out.success() {
        bail!("psql failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out)
}

/// A psql process for `sql` with stdout and stderr piped, for steps that need the process
/// itself. Killed when dropped, so an error on the way cannot leave it behind.
pub fn spawn(params: &ConnParams, sql: &str) -> Result<LiveClient> {
    let mut command = Command::new("psql");
    // Only what the demo states: no PG* variables of the caller's shell.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(&key);
        }
    }
    command
        .envs(params.libpq_env())
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().context("cannot start psql")?;
    Ok(LiveClient { child })
}

/// A running psql; see [`spawn`].
pub struct LiveClient {
    pub child: Child,
}

impl LiveClient {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
