//! `interceptor sessions`: who is connected now, and ending a session.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::audit::admin::AdminClient;
use crate::session::live::SessionView;

#[derive(Debug, clap::Subcommand)]
pub enum SessionsCommand {
    /// End a session: its running statement is cancelled, then the client gets FATAL 57P01
    /// (the end is recorded in the audit trail with the reason).
    Kill { id: u64 },
}

fn client(config: &crate::config::Config) -> anyhow::Result<AdminClient> {
    let socket = config
        .admin
        .as_ref()
        .map(|a| a.socket.clone())
        .context("the config has no [admin] socket: live sessions are served over it")?;
    AdminClient::connect(&socket).with_context(|| {
        format!(
            "cannot reach the daemon's admin socket {} (is interceptor running, and are you root or its user?)",
            socket.display()
        )
    })
}

pub fn run(
    config: &Path,
    command: Option<SessionsCommand>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config)?;
    let mut c = client(&config)?;
    match command {
        Some(SessionsCommand::Kill { id }) => {
            let r = c
                .request_value(&serde_json::json!({"op": "kill_session", "id": id}))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                writeln!(out, "{r}")?;
            } else {
                writeln!(out, "session {id} is being ended")?;
            }
        }
        None => {
            let r = c
                .request_value(&serde_json::json!({"op": "live_sessions"}))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
                return Ok(());
            }
            let list: Vec<SessionView> = serde_json::from_value(r)?;
            print_table(&list, out)?;
        }
    }
    Ok(())
}

fn print_table(list: &[SessionView], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>6}  {:<16} {:<12} {:<12} {:<8} {:<20} {:>10} {:>10}  {:<28} STATEMENT",
        "ID", "IDENTITY", "ROLE", "DATABASE", "STATE", "SINCE", "BYTES_IN", "BYTES_OUT", "PROCESS"
    )?;
    for s in list {
        let stmt: String = s
            .statement
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(60)
            .collect();
        writeln!(
            out,
            "{:>6}  {:<16} {:<12} {:<12} {:<8} {:<20} {:>10} {:>10}  {:<28} {}",
            s.id,
            s.identity,
            s.role,
            s.database,
            s.state,
            s.since,
            s.bytes_from_client,
            s.bytes_to_client,
            s.process.as_deref().unwrap_or(&s.peer),
            stmt
        )?;
    }
    if list.is_empty() {
        writeln!(out, "(no open sessions)")?;
    }
    Ok(())
}
