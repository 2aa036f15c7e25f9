//! How `interceptor approvals` and `interceptor access` show the daemon's answers to a person:
//! tables and blocks with times in the local time zone. `--json` prints the daemon's JSON as it
//! is, for scripts.

use std::io::Write;

use super::grant::Grant;
use super::model::{Request, RequestKind, Status};

/// `2026-12-05 21:03:11 CET`: epoch milliseconds in the system's time zone.
pub(crate) fn local_time(ms: u64) -> String {
    let Ok(ts) = i64::try_from(ms)
        .map_err(|_| ())
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).map_err(|_| ()))
    else {
        return format!("{ms} ms");
    };
    ts.to_zoned(jiff::tz::TimeZone::system())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// One line of text at most `max` characters long (SQL in a table cell).
fn cell(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// What a request asks for, in one line.
fn what(r: &Request) -> String {
    match &r.kind {
        RequestKind::Statement { database, sql, .. } => format!("{database}: {}", cell(sql, 60)),
        RequestKind::Grant {
            groups,
            policy,
            duration_secs,
        } => {
            let mut s = format!(
                "grant {} for {}",
                groups.join(", "),
                humantime::format_duration(std::time::Duration::from_secs(*duration_secs))
            );
            if let Some(p) = policy {
                s.push_str(&format!(" (policy {p})"));
            }
            s
        }
    }
}

fn kind(r: &Request) -> &'static str {
    match r.kind {
        RequestKind::Statement { .. } => "statement",
        RequestKind::Grant { .. } => "grant",
    }
}

fn votes(r: &Request) -> String {
    format!(
        "{}/{}",
        r.votes.iter().filter(|v| v.approve).count(),
        r.approvals_required
    )
}

pub(crate) fn requests(out: &mut dyn Write, list: &[Request]) -> std::io::Result<()> {
    if list.is_empty() {
        return writeln!(out, "no requests");
    }
    writeln!(
        out,
        "{:>6}  {:<9}  {:<9}  {:<16}  {:<23}  {:<23}  {:>5}  WHAT",
        "ID", "STATUS", "KIND", "REQUESTER", "CREATED", "DEADLINE", "VOTES"
    )?;
    for r in list {
        writeln!(
            out,
            "{:>6}  {:<9}  {:<9}  {:<16}  {:<23}  {:<23}  {:>5}  {}",
            r.id.to_string(),
            r.status.to_string(),
            kind(r),
            cell(&r.identity.subject, 16),
            local_time(r.created_at_ms),
            local_time(r.deadline_ms),
            votes(r),
            what(r)
        )?;
    }
    Ok(())
}

pub(crate) fn request(out: &mut dyn Write, r: &Request) -> std::io::Result<()> {
    writeln!(out, "request      {} ({})", r.id, kind(r))?;
    writeln!(out, "status       {}", r.status)?;
    writeln!(
        out,
        "requester    {} ({})",
        r.identity.subject, r.identity.display_name
    )?;
    writeln!(out, "rule         {}", r.rule)?;
    writeln!(
        out,
        "approvers    {} ({} needed)",
        r.approver_groups.join(" or "),
        r.approvals_required
    )?;
    writeln!(out, "created      {}", local_time(r.created_at_ms))?;
    if r.status == Status::Pending {
        writeln!(out, "deadline     {}", local_time(r.deadline_ms))?;
    }
    if let Some(at) = r.closed_at_ms {
        writeln!(out, "closed       {}", local_time(at))?;
    }
    if let Some(reason) = &r.reason {
        writeln!(out, "reason       {reason}")?;
    }
    match &r.kind {
        RequestKind::Statement {
            session_id,
            database,
            sql,
            risks,
            ..
        } => {
            writeln!(out, "session      {session_id}, database {database}")?;
            if !risks.is_empty() {
                writeln!(out, "risks        {}", risks.join(", "))?;
            }
            writeln!(out, "sql")?;
            for line in sql.lines() {
                writeln!(out, "    {line}")?;
            }
        }
        RequestKind::Grant { .. } => writeln!(out, "asks for     {}", what(r))?,
    }
    for v in &r.votes {
        writeln!(
            out,
            "vote         {} by {} at {}{}",
            if v.approve { "approve" } else { "deny" },
            v.by,
            local_time(v.at_ms),
            v.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )?;
    }
    if let Some(note) = &r.closed_note {
        writeln!(out, "note         {note}")?;
    }
    if let Some(g) = r.grant_id {
        writeln!(out, "grant        {g}")?;
    }
    Ok(())
}

fn grant_state(g: &Grant, now_ms: u64) -> &'static str {
    if g.revoked_at_ms.is_some() {
        "revoked"
    } else if g.is_active(now_ms) {
        "active"
    } else if now_ms >= g.expires_at_ms {
        "expired"
    } else {
        "scheduled"
    }
}

pub(crate) fn grants(out: &mut dyn Write, list: &[Grant], now_ms: u64) -> std::io::Result<()> {
    if list.is_empty() {
        return writeln!(out, "no grants");
    }
    writeln!(
        out,
        "{:>6}  {:<9}  {:<16}  {:<20}  {:<23}  {:<23}  REASON",
        "ID", "STATE", "SUBJECT", "GROUPS", "STARTS", "EXPIRES"
    )?;
    for g in list {
        writeln!(
            out,
            "{:>6}  {:<9}  {:<16}  {:<20}  {:<23}  {:<23}  {}",
            g.id.to_string(),
            grant_state(g, now_ms),
            cell(&g.subject, 16),
            cell(&g.groups.join(","), 20),
            local_time(g.starts_at_ms),
            local_time(g.expires_at_ms),
            cell(&g.reason, 40)
        )?;
    }
    Ok(())
}

pub(crate) fn grant(out: &mut dyn Write, g: &Grant, now_ms: u64) -> std::io::Result<()> {
    writeln!(out, "grant        {} ({})", g.id, grant_state(g, now_ms))?;
    writeln!(out, "subject      {}", g.subject)?;
    writeln!(out, "groups       {}", g.groups.join(", "))?;
    if let Some(p) = &g.policy {
        writeln!(out, "policy       {p}")?;
    }
    writeln!(out, "reason       {}", g.reason)?;
    writeln!(
        out,
        "approved by  {} (request {})",
        g.approved_by.join(", "),
        g.request_id
    )?;
    writeln!(out, "starts       {}", local_time(g.starts_at_ms))?;
    writeln!(out, "expires      {}", local_time(g.expires_at_ms))?;
    if let (Some(by), Some(at)) = (&g.revoked_by, g.revoked_at_ms) {
        writeln!(out, "revoked      by {by} at {}", local_time(at))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_time_is_readable_and_survives_nonsense() {
        let t = local_time(1_700_000_000_000);
        assert!(t.starts_with("2023-11-1"), "{t}");
        // Date, time and the zone's name.
        assert_eq!(t.split(' ').filter(|p| !p.is_empty()).count(), 3, "{t}");
        assert_eq!(local_time(u64::MAX), format!("{} ms", u64::MAX));
    }

    #[test]
    fn cells_are_one_line_and_bounded() {
        assert_eq!(
            cell("DELETE FROM t\n  WHERE id = 1", 60),
            "DELETE FROM t WHERE id = 1"
        );
        let c = cell(&"x".repeat(100), 10);
        assert_eq!(c.chars().count(), 10);
        assert!(c.ends_with('…'));
    }
}
