//! The approvals and grants pages (maud templates: compiled, and every interpolation is
//! HTML-escaped).

use maud::{DOCTYPE, Markup, html};

use crate::approval::model::{Request, RequestKind, Status};
use crate::approval::{Grant, now_ms};
use crate::identity::{Identity, Proof};

use super::Console;
use super::auth::Caller;
use super::reply::{Form, Reply};
use super::session::Session;

/// The frame of every page; `session` = None on pages shown before sign-in.
pub(super) fn layout(session: Option<&Session>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · interceptor" }
                link rel="stylesheet" href="/console/static/console.css";
                script src="/console/static/console.js" defer {}
            }
            body {
                header {
                    span.brand { "interceptor" }
                    @if let Some(s) = session {
                        nav {
                            a href="/console/approvals" { "Approvals" }
                            a href="/console/grants" { "Grants" }
                            a href="/console/audit" { "Audit" }
                        }
                        form.signout method="post" action="/console/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            span.who { (s.identity.display_name) " (" (proof(&s.identity.proof)) ")" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

pub(super) fn sign_in(issuer: Option<&str>, certificates: bool) -> Markup {
    layout(
        None,
        "Sign in",
        html! {
            @if let Some(issuer) = issuer {
                p { a.button #sign-in href="/console/login" { "Sign in with " (issuer) } }
            }
            @if certificates {
                p.muted { "Or present a client certificate issued by the configured CA." }
            }
        },
    )
}

/// Shown after a successful sign-in; moves on by itself (see `finish_login`).
pub(super) fn signed_in() -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="0; url=/console/approvals";
                title { "Signed in · interceptor" }
            }
            body { p { "Signed in. " a href="/console/approvals" { "Continue" } } }
        }
    }
}

pub(super) fn message(session: Option<&Session>, title: &str, text: &str) -> Markup {
    layout(
        session,
        title,
        html! {
            p.message #message { (text) }
            p { a href="/console/approvals" { "Back to the approvals" } }
        },
    )
}

pub(super) fn proof(p: &Proof) -> String {
    match p {
        Proof::ScramSha256 => "SCRAM-SHA-256".into(),
        Proof::ScramSha256Plus => "SCRAM-SHA-256-PLUS (channel bound)".into(),
        Proof::PasswordOverTls => "password over TLS".into(),
        Proof::Oidc { issuer } => format!("OIDC {issuer}"),
        Proof::ClientCertificate { subject, .. } => format!("client certificate {subject}"),
        Proof::Kernel => "kernel (local uid)".into(),
    }
}

/// `95 s`, `4 min 10 s`, `2 h 5 min`.
pub(super) fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

pub(super) fn time(ms: u64) -> String {
    crate::audit::record::Timestamp::from_unix_micros(ms.saturating_mul(1000)).to_string()
}

fn identity(i: &Identity) -> Markup {
    html! {
        dl.identity {
            dt { "identity" } dd.subject { (i.subject) @if i.display_name != i.subject { " (" (i.display_name) ")" } }
            dt { "proof" } dd { (proof(&i.proof)) }
            dt { "groups" } dd { (i.groups.join(", ")) }
            @if let Some(p) = &i.process {
                dt { "process" }
                dd.process {
                    "pid " (p.pid) ", uid " (p.uid) ", gid " (p.gid)
                    @if !p.comm.is_empty() { ", " (p.comm) }
                    @if let Some(exe) = &p.exe { ", " (exe) }
                    @if let Some(cg) = &p.cgroup_path { ", cgroup " (cg) }
                }
            }
        }
    }
}

const WITHHELD: &str =
    "[withheld: the statement mentions a password; its redacted text is in the audit trail]";

/// The statement as the audit trail recorded it (passwords redacted, parameters as recorded).
pub(super) struct Recorded {
    pub sql: String,
    pub parameters: Vec<Option<String>>,
}

fn request_card(r: &Request, recorded: Option<&Recorded>, csrf: &str, me: &Identity) -> Markup {
    let now = now_ms();
    let approvals = r.votes.iter().filter(|v| v.approve).count() as u32;
    let needed = r.approvals_required.saturating_sub(approvals);
    let pending = r.status == Status::Pending;
    html! {
        article.request id={ "request-" (r.id) } data-id=(r.id) data-status=(r.status) {
            h2 {
                "Request " (r.id) " "
                span class={ "status " (format!("{:?}", r.status).to_lowercase()) } { (r.status) }
            }
            @match &r.kind {
                RequestKind::Statement { session_id, database, sql, risks, policy, .. } => {
                    @let (text, params) = match recorded {
                        Some(rec) => (rec.sql.as_str(), rec.parameters.as_slice()),
                        // Not (yet) found in the trail: never show what the trail would redact.
                        None if sql.to_ascii_lowercase().contains("password") => {
                            (WITHHELD, &[][..])
                        }
                        None => (sql.as_str(), &[][..]),
                    };
                    pre.sql { (text) }
                    @if !params.is_empty() {
                        p.params { "parameters: "
                            @for (i, p) in params.iter().enumerate() {
                                code { "$" (i + 1) " = " (p.as_deref().unwrap_or("NULL")) } " "
                            }
                        }
                    }
                    dl {
                        dt { "database" } dd.database { (database) }
                        dt { "session" } dd { (session_id) }
                        dt { "policy" } dd { (policy.as_deref().unwrap_or("-")) }
                        dt { "rule" } dd.rule { (r.rule) }
                        @if !risks.is_empty() { dt { "risks" } dd { (risks.join(", ")) } }
                    }
                }
                RequestKind::Grant { groups, policy, duration_secs } => {
                    p.grant { "Grant of groups " strong { (groups.join(", ")) }
                        @if let Some(p) = policy { " (policy " (p) ")" }
                        " for " (duration(duration_secs.saturating_mul(1000))) }
                    @if let Some(reason) = &r.reason { p { "reason: " (reason) } }
                }
            }
            (identity(&r.identity))
            dl {
                dt { "approvers" } dd { (r.approver_groups.join(", ")) }
                @if pending {
                    dt { "waiting" } dd.waited data-since=(r.created_at_ms) { (duration(now.saturating_sub(r.created_at_ms))) }
                    dt { "times out in" } dd { (duration(r.deadline_ms.saturating_sub(now))) }
                    dt { "still needed" } dd.needed { (needed) " of " (r.approvals_required) " approvals" }
                } @else {
                    dt { "closed" } dd { (r.closed_at_ms.map(time).unwrap_or_default()) }
                    @if let Some(n) = &r.closed_note { dt { "note" } dd { (n) } }
                }
            }
            @if !r.votes.is_empty() {
                ul.votes {
                    @for v in &r.votes {
                        li { (if v.approve { "approved by " } else { "denied by " }) strong { (v.by) }
                            @if let Some(reason) = &v.reason { ": " (reason) } " at " (time(v.at_ms)) }
                    }
                }
            }
            @if pending && r.identity.subject != me.subject {
                form.decide method="post" action={ "/console/approvals/" (r.id) "/decide" } {
                    input type="hidden" name="csrf" value=(csrf);
                    label { "Reason " input type="text" name="reason" maxlength="500" placeholder="why (required to deny)"; }
                    @if matches!(r.kind, RequestKind::Statement { .. }) {
                        label { "Scope "
                            select name="scope" {
                                option value="once" selected { "this execution" }
                                option value="session" { "this statement for the session" }
                            }
                        }
                    }
                    button.approve type="submit" name="action" value="approve" { "Approve" }
                    button.deny type="submit" name="action" value="deny" { "Deny" }
                }
            } @else if pending {
                p.muted { "Your own request: somebody else decides." }
            }
        }
    }
}

impl Console {
    /// The statement record the gate wrote for request `id` (it holds the bound parameters).
    async fn recorded(&self, r: &Request) -> Option<Recorded> {
        let RequestKind::Statement { session_id, .. } = &r.kind else {
            return None;
        };
        let audit = self.audit.clone();
        let session = crate::audit::record::SessionId(*session_id);
        let key = r.id.to_string();
        if audit.sync_index().await.is_err() {
            return None;
        }
        tokio::task::spawn_blocking(move || {
            let store = audit.store();
            // The held statement is among the session's latest records.
            let seqs = store.session_seqs(session).ok()?;
            for seq in seqs.iter().rev().take(256) {
                if let Ok(Some(rec)) = store.record(*seq)
                    && let crate::audit::record::AuditEvent::Statement(st) = rec.event
                    && st.approval.as_deref() == Some(key.as_str())
                {
                    return Some(Recorded {
                        sql: st.sql,
                        parameters: st.parameters,
                    });
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    async fn cards(&self, c: &Caller, list: &[Request]) -> Markup {
        let mut out = Vec::new();
        for r in list {
            let rec = if r.status == Status::Pending {
                self.recorded(r).await
            } else {
                None
            };
            out.push(request_card(
                r,
                rec.as_ref(),
                &c.session.csrf,
                &c.session.identity,
            ));
        }
        html! { @for m in out { (m) } }
    }

    async fn pending_section(&self, c: &Caller) -> Markup {
        let list = self
            .service
            .list(Some(&c.session.identity), false)
            .unwrap_or_default();
        let ids: Vec<String> = list.iter().map(|r| r.id.to_string()).collect();
        let cards = self.cards(c, &list).await;
        html! {
            section #pending data-src="/console/approvals/pending" data-ids=(ids.join(",")) {
                @if list.is_empty() { p.muted #no-pending { "Nothing is waiting for a decision." } }
                (cards)
            }
        }
    }

    pub(super) async fn approvals_page(&self, c: &Caller, query: &Form) -> Reply {
        let decided = match query.get("decided").and_then(|d| d.parse::<u64>().ok()) {
            Some(id) => self.service.show(id, Some(&c.session.identity)).ok(),
            None => None,
        };
        let pending = self.pending_section(c).await;
        let mut recent = self
            .service
            .list(Some(&c.session.identity), true)
            .unwrap_or_default();
        recent.retain(|r| r.status != Status::Pending);
        recent.sort_by_key(|r| std::cmp::Reverse(r.id));
        recent.truncate(20);
        let recent_cards = self.cards(c, &recent).await;
        let body = html! {
            @if let Some(r) = decided {
                p.message #message { "Request " (r.id) ": " (r.status)
                    @if r.status == Status::Pending {
                        " (" (r.approvals_required.saturating_sub(r.approvers().len() as u32)) " more approval(s) needed)"
                    } }
            }
            h2 { "Pending" }
            (pending)
            h2 { "Recently closed" }
            section #recent { (recent_cards) }
        };
        Reply::html(200, layout(Some(&c.session), "Approvals", body))
    }

    /// The pending list alone, polled by console.js.
    pub(super) async fn pending_fragment(&self, c: &Caller) -> Reply {
        Reply::html(200, self.pending_section(c).await)
    }

    pub(super) fn grants_page(&self, c: &Caller) -> Reply {
        let who = &c.session.identity;
        let grants = self.service.grants(Some(who), false).unwrap_or_default();
        let now = now_ms();
        let body = html! {
            h2 { "Active grants" }
            @if grants.is_empty() { p.muted #no-grants { "No active grants you can see." } }
            table #grants {
                thead { tr { th { "grant" } th { "for" } th { "groups" } th { "reason" } th { "approved by" } th { "time left" } th {} } }
                tbody {
                    @for g in &grants { (grant_row(g, now, &c.session.csrf)) }
                }
            }
            h2 { "Ask for a grant" }
            form.grant-request method="post" action="/console/grants" {
                input type="hidden" name="csrf" value=(c.session.csrf);
                label { "Groups " input type="text" name="groups" required placeholder="writers"; }
                label { "Duration " input type="text" name="duration" required placeholder="30m"; }
                label { "Reason " input type="text" name="reason" required maxlength="500"; }
                button type="submit" { "Request" }
            }
            p.muted { "Grant requests are decided on the Approvals page by the grant approvers." }
        };
        Reply::html(200, layout(Some(&c.session), "Grants", body))
    }
}

fn grant_row(g: &Grant, now: u64, csrf: &str) -> Markup {
    html! {
        tr data-grant=(g.id) {
            td { (g.id) }
            td { (g.subject) }
            td { (g.groups.join(", ")) }
            td { (g.reason) }
            td { (g.approved_by.join(", ")) }
            td.left { (duration(g.expires_at_ms.saturating_sub(now))) }
            td {
                form method="post" action={ "/console/grants/" (g.id) "/revoke" } {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="text" name="reason" placeholder="reason";
                    button type="submit" { "Revoke" }
                }
            }
        }
    }
}
