//! The approvals service: holds statements, records votes, keeps grants, reports every step.
//!
//! The store is the truth: a waiting statement is only woken by a channel, then reads its
//! request back (after a flush) before it may run. All transitions of a request happen under
//! one lock so a vote racing a timeout or an abort has exactly one winner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::grant::{Grant, GrantRequest, elevate, parse_duration};
use super::model::{
    ApprovalEvent, NewRequest, Request, RequestId, RequestKind, Resolution, Scope, Status, Vote,
    fingerprint, pending_notice,
};
use super::store::Store;
use super::webhook::Webhook;
use super::{ApprovalConfig, ApprovalError, now_ms};
use crate::identity::Identity;
use interceptor_wire::message::PgError;

/// Receives every [`ApprovalEvent`]; the lead connects it to the audit log.
pub(crate) type EventSink = Arc<dyn Fn(ApprovalEvent) + Send + Sync>;

/// Statements whose waiter vanished without closing them are aborted this long after their
/// deadline by the sweeper (normally the waiter or its Drop guard closes them).
const LOST_WAITER_GRACE_MS: u64 = 5_000;

/// Cheap to clone; one per gateway.
#[derive(Clone)]
pub(crate) struct ApprovalService {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ApprovalConfig,
    store: Store,
    state: Mutex<State>,
    events: EventSink,
    webhook: Option<Webhook>,
}

#[derive(Default)]
struct State {
    /// Wakes the waiter of a pending statement when its request is closed.
    waiters: HashMap<RequestId, watch::Sender<()>>,
    /// (session, fingerprint) approved for the rest of the session → (request, approvers).
    session_approvals: HashMap<(u64, String), (RequestId, Vec<String>)>,
    /// Grants not revoked and whose expiry was not yet reported.
    grants: HashMap<u64, Grant>,
    /// Bumped whenever `grants` changes, so sessions know when to recompute their identity.
    grants_generation: u64,
}

/// An identity with its active grants, and until when that holds (see
/// [`ApprovalService::elevation`]).
#[derive(Debug, Clone)]
pub(crate) struct Elevation {
    pub identity: Identity,
    /// [`ApprovalService::grants_generation`] when this was computed.
    pub generation: u64,
    /// Epoch ms at which the first of its grants expires (`u64::MAX`: none).
    pub valid_until_ms: u64,
}

impl Elevation {
    /// Still exact: no grant was added or revoked since, and none of its grants expired.
    pub(crate) fn is_current(&self, generation: u64, now_ms: u64) -> bool {
        self.generation == generation && now_ms < self.valid_until_ms
    }
}

impl ApprovalService {
    /// Opens the store. Statement requests left pending by a previous run are closed as
    /// aborted (their sessions died with that process); grant requests stay pending.
    pub(crate) fn open(
        cfg: ApprovalConfig,
        events: EventSink,
    ) -> Result<ApprovalService, ApprovalError> {
        cfg.validate()?;
        let store = Store::open(&cfg.dir)?;
        let webhook = cfg
            .webhook_url
            .as_deref()
            .map(|url| Webhook::new(url, Duration::from_secs(cfg.webhook_timeout_secs)))
            .transpose()?;
        let now = now_ms();
        let mut aborted = Vec::new();
        for mut r in store.requests()? {
            if r.status == Status::Pending && matches!(r.kind, RequestKind::Statement { .. }) {
                r.status = Status::Aborted;
                r.closed_note = Some("gateway restarted: the client session is gone".into());
                r.closed_at_ms = Some(now);
                store.put_request(&r)?;
                aborted.push(r.id);
            }
        }
        let mut state = State::default();
        for g in store.grants()? {
            if g.revoked_at_ms.is_none() && !g.expired_reported {
                state.grants.insert(g.id, g);
            }
        }
        store.flush_blocking()?;
        let service = ApprovalService {
            inner: Arc::new(Inner {
                cfg,
                store,
                state: Mutex::new(state),
                events,
                webhook,
            }),
        };
        for id in aborted {
            tracing::info!(request = id, "pending statement aborted at startup");
            service.emit(ApprovalEvent::Aborted {
                id,
                reason: "gateway restarted".into(),
            });
        }
        Ok(service)
    }

    pub(crate) fn config(&self) -> &ApprovalConfig {
        &self.inner.cfg
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps (every update is one insert
        // or remove), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: ApprovalEvent) {
        // The audit record first, so a "notified" record always follows what it notified of.
        (self.inner.events)(event.clone());
        if let Some(w) = &self.inner.webhook {
            // Approvers learn of a new request through the webhook: whether that worked is
            // part of the request's trail.
            let notified = match &event {
                ApprovalEvent::Requested { request } => Some(request.id),
                _ => None,
            };
            let events = self.inner.events.clone();
            w.send(&event, move |outcome| {
                if let Some(id) = notified {
                    events(ApprovalEvent::Notified {
                        id,
                        channel: "webhook".into(),
                        outcome,
                    });
                }
            });
        }
    }

    /// Records a held statement durably and returns the handle the gate waits on. A statement
    /// text already approved for this session with scope `session` resolves at once (and is
    /// recorded as its own, approved request).
    pub(crate) async fn hold(&self, req: NewRequest) -> Result<HeldRequest, ApprovalError> {
        if req.approver_groups.is_empty() {
            // Fail closed: nobody could ever approve it.
            return Err(ApprovalError::Config(format!(
                "rule {:?} needs approval but names no approver groups",
                req.rule
            )));
        }
        let timeout_secs = if req.timeout_secs == 0 {
            self.inner.cfg.default_timeout_secs
        } else {
            req.timeout_secs
        };
        let fp = fingerprint(&req.sql);
        let now = now_ms();
        let id = self.inner.store.next_id()?;
        let mut request = Request {
            id,
            kind: RequestKind::Statement {
                session_id: req.session_id,
                database: req.database,
                sql: req.sql,
                fingerprint: fp.clone(),
                risks: req.risks,
                policy: req.policy,
            },
            identity: req.identity,
            rule: req.rule,
            approver_groups: req.approver_groups,
            approvals_required: req.approvals_required.max(1),
            reason: None,
            created_at_ms: now,
            deadline_ms: now.saturating_add(timeout_secs.saturating_mul(1000)),
            status: Status::Pending,
            votes: Vec::new(),
            scope: Scope::Once,
            closed_note: None,
            closed_at_ms: None,
            grant_id: None,
        };
        let (tx, rx) = watch::channel(());
        let reused = {
            let mut st = self.state();
            let reused = st.session_approvals.get(&(req.session_id, fp)).cloned();
            if let Some((original, by)) = &reused {
                let note = format!("approved for the session by request {original}");
                request.status = Status::Approved;
                request.scope = Scope::Session;
                request.votes = by
                    .iter()
                    .map(|b| Vote {
                        by: b.clone(),
                        approve: true,
                        reason: Some(note.clone()),
                        at_ms: now,
                    })
                    .collect();
                request.closed_note = Some(note);
                request.closed_at_ms = Some(now);
            }
            self.inner.store.put_request(&request)?;
            if reused.is_none() {
                st.waiters.insert(id, tx);
            }
            reused
        };
        // From here on, dropping the hold future (client gone) aborts the request.
        let mut guard = AbortGuard {
            service: self.clone(),
            id,
            armed: reused.is_none(),
        };
        self.inner.store.flush().await?;
        let groups = request.approver_groups.clone();
        let resolved = request.resolution();
        self.emit(ApprovalEvent::Requested {
            request: Box::new(request),
        });
        if let Some(Resolution::Approved { by, scope }) = &resolved {
            guard.armed = false;
            self.emit(ApprovalEvent::Approved {
                id,
                by: by.clone(),
                scope: *scope,
                note: reused.map(|(original, _)| format!("session approval of request {original}")),
            });
        } else {
            tracing::info!(request = id, timeout_secs, "statement held for approval");
        }
        Ok(HeldRequest {
            id,
            timeout_secs,
            approver_groups: groups,
            deadline: tokio::time::Instant::now() + Duration::from_secs(timeout_secs),
            rx: Some(rx),
            guard,
            resolved,
        })
    }

    /// Applies `f` to a pending request under the lock and stores the result. Closing it
    /// hands back the waiter's sender: the caller drops it (waking the waiter) only after the
    /// events are out, so the audit log has "approved" before "executed".
    fn transition(
        &self,
        id: RequestId,
        f: impl FnOnce(&mut Request, &mut State) -> Result<(), ApprovalError>,
    ) -> Result<(Request, Option<watch::Sender<()>>), ApprovalError> {
        let mut st = self.state();
        let mut r = self
            .inner
            .store
            .request(id)?
            .ok_or(ApprovalError::NotFound(id))?;
        if r.status != Status::Pending {
            return Err(ApprovalError::Closed {
                id,
                status: r.status,
            });
        }
        f(&mut r, &mut st)?;
        if r.status != Status::Pending {
            r.closed_at_ms = Some(now_ms());
        }
        self.inner.store.put_request(&r)?;
        let waiter = if r.status != Status::Pending {
            st.waiters.remove(&id)
        } else {
            None
        };
        Ok((r, waiter))
    }

    /// One approver's vote. Enforces: the approver is in one of the request's approver
    /// groups, is not its requester, has not voted on it yet; a denial needs a reason. The
    /// request is approved once `approvals_required` distinct approvers said yes; any denial
    /// closes it. The vote is durable before this returns.
    pub(crate) async fn decide(
        &self,
        id: RequestId,
        approver: &Identity,
        approve: bool,
        reason: Option<String>,
        scope: Scope,
    ) -> Result<Request, ApprovalError> {
        let reason = reason
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        let now = now_ms();
        let mut new_grant = None;
        let (r, waiter) = self.transition(id, |r, st| {
            if now >= r.deadline_ms {
                return Err(ApprovalError::Closed {
                    id,
                    status: Status::TimedOut,
                });
            }
            if !r.approver_groups.iter().any(|g| approver.in_group(g)) {
                return Err(ApprovalError::Forbidden(format!(
                    "{} is not in an approver group of request {id} ({})",
                    approver.subject,
                    r.approver_groups.join(", ")
                )));
            }
            if approver.subject == r.identity.subject {
                return Err(ApprovalError::Forbidden(
                    "nobody may decide on their own request".into(),
                ));
            }
            if r.votes.iter().any(|v| v.by == approver.subject) {
                return Err(ApprovalError::Forbidden(format!(
                    "{} already decided on request {id}",
                    approver.subject
                )));
            }
            if !approve && reason.is_none() {
                return Err(ApprovalError::BadRequest("a denial needs a reason".into()));
            }
            r.votes.push(Vote {
                by: approver.subject.clone(),
                approve,
                reason: reason.clone(),
                at_ms: now,
            });
            if !approve {
                r.status = Status::Denied;
                return Ok(());
            }
            if (r.approvers().len() as u64) < u64::from(r.approvals_required.max(1)) {
                return Ok(());
            }
            r.status = Status::Approved;
            match &r.kind {
                RequestKind::Statement {
                    session_id,
                    fingerprint,
                    ..
                } => {
                    r.scope = scope;
                    if scope == Scope::Session {
                        st.session_approvals
                            .insert((*session_id, fingerprint.clone()), (id, r.approvers()));
                    }
                }
                RequestKind::Grant {
                    groups,
                    policy,
                    duration_secs,
                } => {
                    let grant = Grant {
                        id: self.inner.store.next_id()?,
                        subject: r.identity.subject.clone(),
                        groups: groups.clone(),
                        policy: policy.clone(),
                        reason: r.reason.clone().unwrap_or_default(),
                        request_id: id,
                        approved_by: r.approvers(),
                        starts_at_ms: now,
                        expires_at_ms: now.saturating_add(duration_secs.saturating_mul(1000)),
                        revoked_by: None,
                        revoked_at_ms: None,
                        expired_reported: false,
                    };
                    self.inner.store.put_grant(&grant)?;
                    st.grants.insert(grant.id, grant.clone());
                    st.grants_generation += 1;
                    r.grant_id = Some(grant.id);
                    new_grant = Some(grant);
                }
            }
            Ok(())
        })?;
        self.inner.store.flush().await?;
        tracing::info!(request = id, by = %approver.subject, approve, status = %r.status, "approval vote");
        self.emit(ApprovalEvent::Voted {
            id,
            by: approver.subject.clone(),
            approve,
            reason: reason.clone(),
        });
        match r.resolution() {
            Some(Resolution::Approved { by, scope }) => self.emit(ApprovalEvent::Approved {
                id,
                by,
                scope,
                note: None,
            }),
            Some(Resolution::Denied { by, reason }) => {
                self.emit(ApprovalEvent::Denied { id, by, reason })
            }
            _ => {}
        }
        if let Some(grant) = new_grant {
            self.emit(ApprovalEvent::GrantActive { grant });
        }
        drop(waiter);
        Ok(r)
    }

    /// Closes a pending request without a vote (timeout, abort); returns the final resolution
    /// (someone else's if the request was closed first).
    fn close(
        &self,
        id: RequestId,
        status: Status,
        note: &str,
    ) -> Result<Resolution, ApprovalError> {
        match self.transition(id, |r, _| {
            r.status = status;
            r.closed_note = Some(note.to_owned());
            Ok(())
        }) {
            Ok((r, waiter)) => {
                tracing::info!(request = id, %status, "approval request closed");
                self.emit(match status {
                    Status::TimedOut => ApprovalEvent::TimedOut { id },
                    _ => ApprovalEvent::Aborted {
                        id,
                        reason: note.to_owned(),
                    },
                });
                drop(waiter);
                Ok(r.resolution().unwrap_or(Resolution::Aborted))
            }
            Err(ApprovalError::Closed { .. }) => self
                .resolution_of(id)
                .map(|r| r.unwrap_or(Resolution::Aborted)),
            Err(e) => Err(e),
        }
    }

    fn resolution_of(&self, id: RequestId) -> Result<Option<Resolution>, ApprovalError> {
        Ok(self
            .inner
            .store
            .request(id)?
            .ok_or(ApprovalError::NotFound(id))?
            .resolution())
    }

    /// The gate forwarded an approved statement; `statement` is its audit record, which the
    /// statement's outcome is attached to.
    pub(crate) fn executed(&self, id: RequestId, session_id: u64, statement: Option<u64>) {
        self.emit(ApprovalEvent::Executed {
            id,
            session_id,
            statement,
        });
    }

    /// Forgets the session's `scope = session` approvals; call when a session ends.
    pub(crate) fn end_session(&self, session_id: u64) {
        self.state()
            .session_approvals
            .retain(|(s, _), _| *s != session_id);
    }

    /// Requests `caller` may see (their own and those they may decide on); pending only
    /// unless `all`. `caller = None`: every request (trusted local use only).
    pub(crate) fn list(
        &self,
        caller: Option<&Identity>,
        all: bool,
    ) -> Result<Vec<Request>, ApprovalError> {
        Ok(self
            .inner
            .store
            .requests()?
            .into_iter()
            .filter(|r| all || r.status == Status::Pending)
            .filter(|r| caller.is_none_or(|c| r.visible_to(c)))
            .collect())
    }

    /// One request; not found when `caller` may not see it (its existence is not revealed).
    pub(crate) fn show(
        &self,
        id: RequestId,
        caller: Option<&Identity>,
    ) -> Result<Request, ApprovalError> {
        self.inner
            .store
            .request(id)?
            .filter(|r| caller.is_none_or(|c| r.visible_to(c)))
            .ok_or(ApprovalError::NotFound(id))
    }

    /// Asks for a time-bound grant for `requester` itself; decided with [`Self::decide`] by
    /// members of `grant_approvers`.
    pub(crate) async fn request_grant(
        &self,
        requester: &Identity,
        req: GrantRequest,
    ) -> Result<Request, ApprovalError> {
        let cfg = &self.inner.cfg;
        let duration_secs = parse_duration(&req.duration)?;
        if duration_secs > cfg.max_grant_secs {
            return Err(ApprovalError::BadRequest(format!(
                "grants last at most {} s",
                cfg.max_grant_secs
            )));
        }
        let reason = req.reason.trim();
        if reason.is_empty() {
            return Err(ApprovalError::BadRequest(
                "a grant request needs a reason".into(),
            ));
        }
        let groups: Vec<String> = req
            .groups
            .iter()
            .map(|g| g.trim().to_owned())
            .filter(|g| !g.is_empty())
            .collect();
        if groups.is_empty() && req.policy.is_none() {
            return Err(ApprovalError::BadRequest(
                "name at least one group (--role) or a policy".into(),
            ));
        }
        if cfg.grant_approvers.is_empty() {
            return Err(ApprovalError::Forbidden(
                "no grant_approvers are configured: grants are disabled".into(),
            ));
        }
        let now = now_ms();
        let request = Request {
            id: self.inner.store.next_id()?,
            kind: RequestKind::Grant {
                groups,
                policy: req.policy,
                duration_secs,
            },
            identity: requester.clone(),
            rule: "grant".into(),
            approver_groups: cfg.grant_approvers.clone(),
            approvals_required: cfg.grant_approvals.max(1),
            reason: Some(reason.to_owned()),
            created_at_ms: now,
            deadline_ms: now.saturating_add(cfg.default_timeout_secs.saturating_mul(1000)),
            status: Status::Pending,
            votes: Vec::new(),
            scope: Scope::Once,
            closed_note: None,
            closed_at_ms: None,
            grant_id: None,
        };
        {
            let _st = self.state();
            self.inner.store.put_request(&request)?;
        }
        self.inner.store.flush().await?;
        self.emit(ApprovalEvent::Requested {
            request: Box::new(request.clone()),
        });
        Ok(request)
    }

    /// Active grants of this identity's subject (expiry by the clock, not by the sweeper).
    pub(crate) fn active_grants_for(&self, who: &Identity) -> Vec<Grant> {
        let now = now_ms();
        let mut grants: Vec<Grant> = self
            .state()
            .grants
            .values()
            .filter(|g| g.subject == who.subject && g.is_active(now))
            .cloned()
            .collect();
        grants.sort_by_key(|g| g.id);
        grants
    }

    /// `who` with the groups of its active grants added: decide policy with this.
    #[cfg(test)]
    pub(crate) fn elevated(&self, who: &Identity) -> Identity {
        elevate(who, &self.active_grants_for(who), now_ms())
    }

    /// Changes whenever a grant is approved, revoked or reported expired; cheap to read on
    /// every statement.
    pub(crate) fn grants_generation(&self) -> u64 {
        self.state().grants_generation
    }

    /// [`Self::elevated`], with what a session needs to cache it exactly: a grant takes effect
    /// at the next statement after its approval and ends at its expiry or revocation, with
    /// no lag.
    pub(crate) fn elevation(&self, who: &Identity) -> Elevation {
        // The generation is read first: a change racing this computation makes the result
        // look stale at the next statement rather than current.
        let generation = self.grants_generation();
        let now = now_ms();
        let grants = self.active_grants_for(who);
        let valid_until_ms = grants
            .iter()
            .map(|g| g.expires_at_ms)
            .min()
            .unwrap_or(u64::MAX);
        Elevation {
            identity: elevate(who, &grants, now),
            generation,
            valid_until_ms,
        }
    }

    /// Grants `caller` may see: their own, or all for grant approvers; active only unless `all`.
    pub(crate) fn grants(
        &self,
        caller: Option<&Identity>,
        all: bool,
    ) -> Result<Vec<Grant>, ApprovalError> {
        let now = now_ms();
        Ok(self
            .inner
            .store
            .grants()?
            .into_iter()
            .filter(|g| all || g.is_active(now))
            .filter(|g| caller.is_none_or(|c| self.may_manage_grant(c, g)))
            .collect())
    }

    fn may_manage_grant(&self, who: &Identity, g: &Grant) -> bool {
        who.subject == g.subject
            || self
                .inner
                .cfg
                .grant_approvers
                .iter()
                .any(|a| who.in_group(a))
    }

    /// Ends a grant now. Its holder or a grant approver may revoke it.
    pub(crate) async fn revoke(
        &self,
        id: u64,
        by: &Identity,
        reason: Option<String>,
    ) -> Result<Grant, ApprovalError> {
        let grant = {
            let mut st = self.state();
            let mut g = self
                .inner
                .store
                .grant(id)?
                .filter(|g| self.may_manage_grant(by, g))
                .ok_or(ApprovalError::NotFound(id))?;
            if g.revoked_at_ms.is_some() {
                return Err(ApprovalError::BadRequest(format!(
                    "grant {id} is already revoked"
                )));
            }
            g.revoked_by = Some(by.subject.clone());
            g.revoked_at_ms = Some(now_ms());
            self.inner.store.put_grant(&g)?;
            st.grants.remove(&id);
            st.grants_generation += 1;
            g
        };
        self.inner.store.flush().await?;
        tracing::info!(grant = id, by = %by.subject, "grant revoked");
        self.emit(ApprovalEvent::GrantRevoked {
            id,
            by: by.subject.clone(),
            reason,
        });
        Ok(grant)
    }

    /// Closes what time has ended: grant requests past their deadline, statements whose waiter
    /// is gone, grants past expiry (reported once). Run by [`Self::spawn_sweeper`].
    pub(crate) async fn sweep(&self) -> Result<(), ApprovalError> {
        let now = now_ms();
        for r in self.inner.store.requests()? {
            if r.status != Status::Pending {
                continue;
            }
            match r.kind {
                RequestKind::Grant { .. } if now >= r.deadline_ms => {
                    self.close(r.id, Status::TimedOut, "timed out")?;
                }
                RequestKind::Statement { .. }
                    if now >= r.deadline_ms.saturating_add(LOST_WAITER_GRACE_MS)
                        && !self.state().waiters.contains_key(&r.id) =>
                {
                    self.close(r.id, Status::Aborted, "the waiting session is gone")?;
                }
                _ => {}
            }
        }
        let expired: Vec<Grant> = {
            let mut st = self.state();
            let ids: Vec<u64> = st
                .grants
                .values()
                .filter(|g| now >= g.expires_at_ms)
                .map(|g| g.id)
                .collect();
            let mut out = Vec::new();
            for id in ids {
                if let Some(mut g) = st.grants.remove(&id) {
                    st.grants_generation += 1;
                    g.expired_reported = true;
                    self.inner.store.put_grant(&g)?;
                    out.push(g);
                }
            }
            out
        };
        self.inner.store.flush().await?;
        for g in expired {
            tracing::info!(grant = g.id, subject = %g.subject, "grant expired");
            self.emit(ApprovalEvent::GrantExpired {
                id: g.id,
                subject: g.subject,
            });
        }
        Ok(())
    }

    /// Runs [`Self::sweep`] every `period` until the handle is aborted.
    pub(crate) fn spawn_sweeper(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let service = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if let Err(e) = service.sweep().await {
                    tracing::error!(error = %e, "approvals sweep failed");
                }
            }
        })
    }
}

/// A statement waiting for approvers. Dropping it (or the [`HeldRequest::wait`] future) while
/// the request is pending closes the request as aborted.
pub(crate) struct HeldRequest {
    id: RequestId,
    timeout_secs: u64,
    approver_groups: Vec<String>,
    deadline: tokio::time::Instant,
    rx: Option<watch::Receiver<()>>,
    guard: AbortGuard,
    /// Already approved (session scope) at hold time.
    resolved: Option<Resolution>,
}

impl HeldRequest {
    pub(crate) fn id(&self) -> RequestId {
        self.id
    }

    /// The NoticeResponse to send before waiting (`None`: approved already, nothing to say).
    pub(crate) fn notice(&self) -> Option<PgError> {
        self.resolved
            .is_none()
            .then(|| pending_notice(self.id, self.timeout_secs, &self.approver_groups))
    }

    /// Waits for the decision or the timeout. Cancel-safe: drop the future to stop waiting
    /// (client cancel or disconnect); the request is then closed as aborted.
    pub(crate) async fn wait(mut self) -> Resolution {
        if let Some(r) = self.resolved.take() {
            self.guard.armed = false;
            return r;
        }
        let service = self.guard.service.clone();
        let id = self.id;
        loop {
            match service.resolution_of(id) {
                Ok(Some(resolution)) => {
                    self.guard.armed = false;
                    return service.durable(resolution).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(request = id, error = %e, "cannot read approval request");
                    return Resolution::Aborted; // the guard aborts it
                }
            }
            let woken = match self.rx.as_mut() {
                Some(rx) => tokio::time::timeout_at(self.deadline, rx.changed()).await,
                None => tokio::time::timeout_at(self.deadline, std::future::pending()).await,
            };
            match woken {
                Ok(Ok(())) => continue,
                // The sender went away: the request was closed (re-read it) and no more
                // wake-ups will come.
                Ok(Err(_)) => self.rx = None,
                Err(_elapsed) => {
                    let resolution = service
                        .close(id, Status::TimedOut, "timed out")
                        .unwrap_or(Resolution::Aborted);
                    self.guard.armed = false;
                    if resolution != Resolution::TimedOut
                        && let Some(rx) = self.rx.as_mut()
                    {
                        // A vote won the race against the deadline: let its events go out
                        // first (its sender is dropped after them).
                        let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
                    }
                    return service.durable(resolution).await;
                }
            }
        }
    }
}

impl ApprovalService {
    /// An approval only counts once it is on disk.
    async fn durable(&self, resolution: Resolution) -> Resolution {
        match self.inner.store.flush().await {
            Ok(()) => resolution,
            Err(e) => {
                tracing::error!(error = %e, "approvals store flush failed; refusing");
                match resolution {
                    Resolution::Approved { .. } => Resolution::Aborted,
                    other => other,
                }
            }
        }
    }
}

/// Aborts the request when the waiting side goes away first.
struct AbortGuard {
    service: ApprovalService,
    id: RequestId,
    armed: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let id = self.id;
        match self
            .service
            .close(id, Status::Aborted, "the client cancelled or disconnected")
        {
            Ok(_) => {}
            Err(e) => tracing::error!(request = id, error = %e, "cannot abort approval request"),
        }
        // Drop cannot await: flush in the background (sled's own flusher follows within 500 ms
        // otherwise).
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let service = self.service.clone();
            handle.spawn(async move {
                if let Err(e) = service.inner.store.flush().await {
                    tracing::error!(error = %e, "approvals store flush failed");
                }
            });
        }
    }
}

#[cfg(test)]
impl ApprovalService {
    /// The raw store, to simulate what a crashed process leaves behind.
    pub(crate) fn inner_store_for_tests(&self) -> &Store {
        &self.inner.store
    }
}
