//! `interceptor approvals …` and `interceptor access …`: the CLI talks to the running daemon
//! over the local admin socket, where the kernel tells the daemon who is calling.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use super::ApprovalError;
use super::model::Scope;

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Requests you may see (pending unless --all).
    List {
        /// Also closed requests (approved, denied, timed out, aborted).
        #[arg(long)]
        all: bool,
    },
    /// One request, with its full SQL.
    Show {
        /// The request's id (from `approvals list`).
        id: u64,
    },
    /// Approve a request (statement or grant).
    Approve {
        /// The request's id (from `approvals list`).
        id: u64,
        /// `session`: the same statement text runs without asking again in that session.
        #[arg(long, value_enum, default_value_t = Scope::Once)]
        scope: Scope,
        /// Why, for the audit trail and the requester.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a request; the reason is shown to the client.
    Deny {
        /// The request's id (from `approvals list`).
        id: u64,
        /// Why; the client is told.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Ask for extra groups (roles) or a policy for yourself, for a while.
    Request {
        /// A group to be added while the grant lasts (repeatable).
        #[arg(long = "role", alias = "group")]
        roles: Vec<String>,
        /// A policy to be given by name while the grant lasts.
        #[arg(long)]
        policy: Option<String>,
        /// How long, e.g. 30m, 2h.
        #[arg(long = "for")]
        duration: String,
        /// Why (the approvers see it; the audit trail keeps it).
        #[arg(long)]
        reason: String,
    },
    /// Grants you may see (active unless --all).
    List {
        /// Also revoked and expired grants.
        #[arg(long)]
        all: bool,
    },
    /// End a grant now.
    Revoke {
        /// The grant's id (from `access list`).
        id: u64,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// What an answer holds, for showing it to a person.
enum Shape {
    Requests,
    Request,
    Grants,
    Grant,
}

/// Runs an `approvals` subcommand; `json` prints the daemon's answer as it is.
pub fn run_approvals(
    cmd: ApprovalsCommand,
    socket: &Path,
    json: bool,
) -> Result<(), ApprovalError> {
    let shape = match cmd {
        ApprovalsCommand::List { .. } => Shape::Requests,
        _ => Shape::Request,
    };
    let out = match cmd {
        ApprovalsCommand::List { all } => {
            let path = if all {
                "/approvals?all=1"
            } else {
                "/approvals"
            };
            call(socket, "GET", path, None)?
        }
        ApprovalsCommand::Show { id } => call(socket, "GET", &format!("/approvals/{id}"), None)?,
        ApprovalsCommand::Approve { id, scope, reason } => call(
            socket,
            "POST",
            &format!("/approvals/{id}/approve"),
            Some(json!({"scope": scope, "reason": reason})),
        )?,
        ApprovalsCommand::Deny { id, reason } => call(
            socket,
            "POST",
            &format!("/approvals/{id}/deny"),
            Some(json!({"reason": reason})),
        )?,
    };
    show(&out, shape, json);
    Ok(())
}

/// Runs an `access` subcommand; `json` prints the daemon's answer as it is.
pub fn run_access(cmd: AccessCommand, socket: &Path, json: bool) -> Result<(), ApprovalError> {
    let shape = match cmd {
        AccessCommand::Request { .. } => Shape::Request,
        AccessCommand::List { .. } => Shape::Grants,
        AccessCommand::Revoke { .. } => Shape::Grant,
    };
    let out = match cmd {
        AccessCommand::Request {
            roles,
            policy,
            duration,
            reason,
        } => call(
            socket,
            "POST",
            "/grants",
            Some(
                json!({"groups": roles, "policy": policy, "duration": duration, "reason": reason}),
            ),
        )?,
        AccessCommand::List { all } => {
            let path = if all { "/grants?all=1" } else { "/grants" };
            call(socket, "GET", path, None)?
        }
        AccessCommand::Revoke { id, reason } => call(
            socket,
            "DELETE",
            &format!("/grants/{id}"),
            Some(json!({"reason": reason})),
        )?,
    };
    show(&out, shape, json);
    Ok(())
}

/// Prints an answer: as a table or block, or as JSON when asked (or when it does not have the
/// expected shape, so nothing is ever hidden).
fn show(v: &Value, shape: Shape, json: bool) {
    if !json {
        let mut out = std::io::stdout().lock();
        let now = super::now_ms();
        let shown = match shape {
            Shape::Requests => serde_json::from_value::<Vec<super::model::Request>>(v.clone())
                .map(|l| super::render::requests(&mut out, &l)),
            Shape::Request => serde_json::from_value::<super::model::Request>(v.clone())
                .map(|r| super::render::request(&mut out, &r)),
            Shape::Grants => serde_json::from_value::<Vec<super::grant::Grant>>(v.clone())
                .map(|l| super::render::grants(&mut out, &l, now)),
            Shape::Grant => serde_json::from_value::<super::grant::Grant>(v.clone())
                .map(|g| super::render::grant(&mut out, &g, now)),
        };
        if shown.is_ok() {
            return;
        }
    }
    print_json(v);
}

fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(_) => println!("{v}"),
    }
}

/// One request over the admin socket; non-2xx answers become [`ApprovalError::Remote`].
pub(crate) fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ApprovalError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        ApprovalError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot reach the daemon at {}: {e}", socket.display()),
        ))
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .take((super::http::MAX_BODY * 64) as u64)
        .read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Value, ApprovalError> {
    let bad = || ApprovalError::Remote {
        status: 0,
        message: "malformed answer from the daemon".into(),
    };
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(bad()),
    };
    let status = resp.code.ok_or_else(bad)?;
    let body: Value = serde_json::from_slice(&raw[head..]).map_err(|_| bad())?;
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        let message = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_owned();
        Err(ApprovalError::Remote { status, message })
    }
}
