//! Masking in the data path: which rules apply to a session, how each backend message of a
//! result is masked, and the side connection that resolves column origins and COPY columns.
//!
//! Which result a backend message belongs to is read from the session's one queue of owed
//! answers ([`OwedQueue`]), which the relay advances; masking keeps no queue of its own. A
//! RowDescription that answers a Describe is kept in the statement or portal it describes (the
//! session's one [`Statements`](super::protocol::Statements)), so later Executes of its portals
//! find their plan even without a RowDescription; masking keeps no statement state either.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::protocol::{Action, CopySpec, Owed, OwedCopy, OwedQueue};
use super::upstream::{Upstream, UpstreamTarget};
use crate::mask::{
    CopyColumn, CopyMasker, CopyTarget, FieldDescription, MaskError, MaskPlan, MaskRules,
    MaskSummary, OriginCache, RelationCache, RowFields, catalog_query, parse_row_description,
    table_oids_of,
};
use crate::secrets::Secret;
use interceptor_sql::pgparse::Tree;
use interceptor_wire::message::{self, Cursor, PgError, sqlstate};

/// Why the side connection could not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SideError {
    #[error("masking side connection: {0}")]
    Upstream(#[from] super::upstream::UpstreamError),
    #[error("masking side connection: {0}")]
    Frame(#[from] interceptor_wire::frame::FrameError),
    #[error("masking side connection: PostgreSQL closed it")]
    Closed,
    #[error("masking side connection: {0}")]
    Refused(String),
    #[error("masking side connection: malformed catalog row")]
    Malformed,
}

/// How to open the side connection: the same upstream, role and database as the session.
#[derive(Clone)]
pub(crate) struct SideLogin {
    pub upstream: Arc<UpstreamTarget>,
    pub role: String,
    pub password: Option<Secret>,
    pub database: String,
}

/// The side connection (opened on first use). Resolved origins live apart from it, behind a
/// plain mutex, so the upstream → client side can plan without waiting for a query.
pub(super) struct Side {
    conn: Option<Upstream>,
}

/// The masking of one session, shared by both directions.
pub(crate) struct SessionMask {
    rules: MaskRules,
    side: tokio::sync::Mutex<Side>,
    origins: Mutex<OriginCache>,
    login: SideLogin,
    /// Relations and functions the statement rewrite looked up (column rules only).
    relations: tokio::sync::Mutex<RelationCache>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SessionMask {
    /// `None` when no rule applies to this identity: the relay then does no masking work.
    pub(crate) fn new(rules: MaskRules, login: SideLogin) -> Option<Arc<SessionMask>> {
        if rules.is_empty() {
            return None;
        }
        Some(Arc::new(SessionMask {
            rules,
            side: tokio::sync::Mutex::new(Side { conn: None }),
            origins: Mutex::new(OriginCache::default()),
            login,
            relations: tokio::sync::Mutex::new(RelationCache::default()),
        }))
    }

    /// The session's rules (after exemptions).
    pub(crate) fn rules(&self) -> &MaskRules {
        &self.rules
    }

    /// The statement as it must go upstream under column rules: every reference to a masked
    /// column that is not a plain output column replaced by its masking expression
    /// (`Ok(None)`: send it unchanged), or the refusal to send it. Sessions without column
    /// rules do no work here.
    /// `tree`: the statement's parse when the gate made one; otherwise it is parsed here.
    pub(crate) async fn rewrite(
        &self,
        sql: &str,
        tree: Option<&Tree>,
    ) -> Result<Option<String>, PgError> {
        if !self.rules.needs_origins() {
            return Ok(None);
        }
        if let Some(tree) = tree {
            return self.rewrite_parsed(sql, tree).await;
        }
        // What PostgreSQL's grammar rejects, the server rejects too: send it as it is.
        let Ok(parsed) = interceptor_sql::pgparse::parse_tree(sql, true) else {
            return Ok(None);
        };
        self.rewrite_parsed(sql, &parsed).await
    }

    /// [`SessionMask::rewrite`] for a statement already parsed by pg_query.
    pub(crate) async fn rewrite_parsed(
        &self,
        sql: &str,
        tree: &Tree,
    ) -> Result<Option<String>, PgError> {
        let refused = |m: String| PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, m);
        let needs = crate::mask::needs(tree);
        let mut cache = self.relations.lock().await;
        if let Some(lookup) = cache.query(&needs.relations, &needs.functions) {
            let rows = {
                let mut side = self.side.lock().await;
                side.rows(&self.login, &lookup.sql).await
            };
            let rows = rows.map_err(|e| {
                refused(format!(
                    "interceptor: statement refused: the catalog lookup that column masking \
                     needs failed ({e})"
                ))
            })?;
            cache.insert(lookup, &rows).map_err(|_| {
                refused("interceptor: statement refused: malformed catalog answer".into())
            })?;
        }
        let result = crate::mask::rewrite(sql, &needs, &self.rules, &cache)
            .map_err(|r| refused(r.0).with_hint("column masking applies to this session"));
        if needs.changes_catalog {
            cache.clear();
        }
        result
    }

    /// Each COPY TO STDOUT with its options and its columns, described now (just before it
    /// runs, so a table changed since the statement was prepared is described as it is).
    pub(crate) async fn copy_specs(&self, copies: &[CopyTarget]) -> VecDeque<OwedCopy> {
        let mut out = VecDeque::with_capacity(copies.len());
        for copy in copies {
            let spec = match copy {
                Ok(copy) => self
                    .copy_columns(&copy.columns_query)
                    .await
                    .map(|columns| CopySpec {
                        options: copy.options.clone(),
                        columns,
                    })
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            out.push_back(spec);
        }
        out
    }

    /// The columns a COPY produces: the RowDescription of `select` (a query with the same
    /// columns), described (not executed) on the side connection.
    async fn copy_columns(&self, select: &str) -> Result<Option<Vec<CopyColumn>>, SideError> {
        let mut side = self.side.lock().await;
        let Some(rd) = side.describe(&self.login, select).await? else {
            return Ok(None);
        };
        let fields = parse_row_description(&rd).map_err(|e| SideError::Refused(e.to_string()))?;
        side.resolve(&self.login, &self.origins, &table_oids_of(&fields))
            .await?;
        let origins = lock(&self.origins);
        Ok(Some(CopyColumn::from_fields(&fields, &|t, a| {
            crate::mask::CatalogResolver::origin(&*origins, t, a)
        })))
    }

    /// Resolves the origins of the RowDescriptions of a backend chunk, decoded (before the
    /// chunk is processed, so that processing needs no await).
    pub(crate) async fn prepare(&self, descriptions: &[RowFields]) -> Result<(), SideError> {
        if !self.rules.needs_origins() {
            return Ok(());
        }
        for fields in descriptions.iter().flatten() {
            let mut side = self.side.lock().await;
            side.resolve(&self.login, &self.origins, &table_oids_of(fields))
                .await?;
        }
        Ok(())
    }
}

impl Side {
    /// Not connected yet: the first request opens the connection.
    pub(super) fn new() -> Side {
        Side { conn: None }
    }

    async fn conn(&mut self, login: &SideLogin) -> Result<&mut Upstream, SideError> {
        if self.conn.is_none() {
            let conn = login
                .upstream
                .login(&login.role, login.password.as_ref(), &login.database, &[])
                .await?;
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or(SideError::Closed)
    }

    /// Sends `request` and collects the answer up to ReadyForQuery. A broken connection is
    /// dropped so the next request opens a new one.
    async fn exchange(
        &mut self,
        login: &SideLogin,
        request: &[u8],
    ) -> Result<Vec<(u8, Bytes)>, SideError> {
        let result = self.exchange_once(login, request).await;
        if matches!(result, Err(SideError::Frame(_) | SideError::Closed)) {
            self.conn = None;
        }
        result
    }

    async fn exchange_once(
        &mut self,
        login: &SideLogin,
        request: &[u8],
    ) -> Result<Vec<(u8, Bytes)>, SideError> {
        use tokio::io::AsyncWriteExt;
        let conn = self.conn(login).await?;
        conn.stream
            .write_all(request)
            .await
            .map_err(|e| SideError::Frame(interceptor_wire::frame::FrameError::Io(e)))?;
        let mut out = Vec::new();
        loop {
            let Some((tag, body)) = conn.reader.read_message(&mut conn.stream).await? else {
                return Err(SideError::Closed);
            };
            if tag == b'Z' {
                return Ok(out);
            }
            out.push((tag, body));
        }
    }

    /// Looks up the tables (of a RowDescription) that are not cached yet.
    async fn resolve(
        &mut self,
        login: &SideLogin,
        origins: &Mutex<OriginCache>,
        oids: &[u32],
    ) -> Result<(), SideError> {
        let missing = lock(origins).missing(oids);
        if missing.is_empty() {
            return Ok(());
        }
        let answer = self
            .exchange(login, &message::query(&catalog_query(&missing)))
            .await?;
        let mut rows = Vec::new();
        for (tag, body) in &answer {
            match *tag {
                b'D' => rows.push(catalog_row(body).ok_or(SideError::Malformed)?),
                b'E' => return Err(SideError::Refused(error_text(body))),
                _ => {}
            }
        }
        let mut origins = lock(origins);
        for (oid, attnum, origin) in rows {
            origins.insert(oid, attnum, origin);
        }
        for oid in missing {
            origins.insert_table(oid);
        }
        Ok(())
    }

    /// The rows (text fields, NULL as `None`) of a simple query on the side connection.
    pub(super) async fn rows(
        &mut self,
        login: &SideLogin,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SideError> {
        let answer = self.exchange(login, &message::query(sql)).await?;
        let mut out = Vec::new();
        for (tag, body) in &answer {
            match *tag {
                b'D' => out.push(text_row(body).ok_or(SideError::Malformed)?),
                b'E' => return Err(SideError::Refused(error_text(body))),
                _ => {}
            }
        }
        Ok(out)
    }

    /// The RowDescription of `sql` (Parse + Describe, nothing executed); `None` for NoData.
    async fn describe(&mut self, login: &SideLogin, sql: &str) -> Result<Option<Bytes>, SideError> {
        let mut req = Vec::new();
        req.extend_from_slice(&message::parse_unnamed(sql));
        req.extend_from_slice(&message::message(b'D', b"S\0"));
        req.extend_from_slice(&message::message(b'S', &[]));
        let answer = self.exchange(login, &req).await?;
        for (tag, body) in answer {
            match tag {
                b'T' => return Ok(Some(body)),
                b'E' => return Err(SideError::Refused(error_text(&body))),
                _ => {}
            }
        }
        Ok(None)
    }
}

fn error_text(body: &[u8]) -> String {
    message::error_code_and_message(body)
        .map(|(c, m)| format!("{c}: {m}"))
        .unwrap_or_else(|| "error".into())
}

/// Whether `sql` can hold a COPY: a cheap test before parsing a text only for its COPYs.
pub(crate) fn mentions_copy(sql: &str) -> bool {
    sql.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"copy"))
}

/// The Parse `view` with its SQL replaced: statement name and parameter types kept.
pub(crate) fn reparse(view: &message::ParseView<'_>, sql: &str) -> Bytes {
    let mut body =
        Vec::with_capacity(view.statement.len() + sql.len() + 4 + 4 * view.param_types.len());
    body.extend_from_slice(view.statement.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    body.extend_from_slice(&(view.param_types.len() as i16).to_be_bytes());
    for t in &view.param_types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    message::message(b'P', &body)
}

/// A DataRow's fields as UTF-8 text.
fn text_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut c = Cursor::new(body, "DataRow");
    let n = c.i16().ok()?;
    let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        let len = c.i32().ok()?;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = c.take(usize::try_from(len).ok()?).ok()?;
        out.push(Some(std::str::from_utf8(v).ok()?.to_owned()));
    }
    Some(out)
}

/// One row of [`catalog_query`]: oid, attnum, schema, table, column (text format).
fn catalog_row(body: &[u8]) -> Option<(u32, i16, crate::mask::ColumnOrigin)> {
    let mut c = Cursor::new(body, "DataRow");
    if c.i16().ok()? != 5 {
        return None;
    }
    let mut field = || -> Option<&str> {
        let len = c.i32().ok()?;
        let v = c.take(usize::try_from(len).ok()?).ok()?;
        std::str::from_utf8(v).ok()
    };
    let oid: u32 = field()?.parse().ok()?;
    let attnum: i16 = field()?.parse().ok()?;
    let (s, t, col) = (field()?, field()?, field()?);
    Some((oid, attnum, crate::mask::ColumnOrigin::new(s, t, col)))
}

/// The upstream → client side's masking state: how the result now arriving is masked. Which
/// statement or Describe a message answers is read from the session's owed queue.
pub(crate) struct MaskStream {
    mask: Arc<SessionMask>,
    /// The plan of the rows now arriving (`Some(None)`: decided, nothing to mask).
    active: Option<Option<MaskPlan>>,
    /// What a Describe of a portal the session does not know (a SQL cursor) answered, for the
    /// rows of an Execute of that name that comes next (`None` plan: nothing to mask). A
    /// portal the session knows keeps its plan itself, so no other portal's rows can be
    /// masked by it.
    described: Option<(Box<str>, Option<MaskPlan>)>,
    copy: Option<CopyMasker>,
    /// A masking failure withheld the rest of this result.
    discard: bool,
}

/// Where the masking of a message is summed up: the outcome of the statement it belongs to,
/// else a scratch summary nobody reads.
fn summary<'a>(owed: &'a mut OwedQueue, scratch: &'a mut MaskSummary) -> &'a mut MaskSummary {
    match owed.running_mut() {
        Some(run) => &mut run.outcome.masked,
        None => {
            scratch.clear();
            scratch
        }
    }
}

impl MaskStream {
    pub(crate) fn new(mask: Arc<SessionMask>) -> Self {
        MaskStream {
            mask,
            active: None,
            described: None,
            copy: None,
            discard: false,
        }
    }

    pub(crate) fn session(&self) -> &Arc<SessionMask> {
        &self.mask
    }

    /// Decides one backend message, before `owed` is advanced by it; what was masked is
    /// summed up in the outcome of the statement it belongs to. `fields`: a RowDescription's
    /// fields, as the relay decoded them (decoded here when absent).
    pub(crate) fn message(
        &mut self,
        tag: u8,
        body: &[u8],
        fields: Option<&RowFields>,
        owed: &mut OwedQueue,
        scratch: &mut MaskSummary,
    ) -> Action {
        match self.step(tag, body, fields, owed, scratch) {
            Ok(a) => a,
            Err(e) => self.fail(tag, e),
        }
    }

    /// A masking error: the client gets an ErrorResponse in place of the message and the rest
    /// of the result is withheld (fail closed).
    fn fail(&mut self, tag: u8, e: MaskError) -> Action {
        tracing::warn!(error = %e, "masking failed: result withheld");
        self.copy = None;
        self.active = None;
        self.described = None;
        // An ErrorResponse that cannot be masked ends its result itself; anything else starts
        // discarding up to the result's end.
        self.discard = !matches!(tag, b'E' | b'Z' | b'C' | b'I' | b's');
        if tag == b'E' {
            // PostgreSQL's own error, unmaskable: interceptor's error answers in its place.
            Action::Rewrite(withheld(&e))
        } else {
            Action::Refuse(withheld(&e))
        }
    }

    fn step(
        &mut self,
        tag: u8,
        body: &[u8],
        fields: Option<&RowFields>,
        owed: &mut OwedQueue,
        scratch: &mut MaskSummary,
    ) -> Result<Action, MaskError> {
        match tag {
            b'D' => {
                if self.discard {
                    return Ok(Action::Withhold);
                }
                if self.active.is_none() {
                    self.active = Some(self.plan_for_execute(owed)?);
                }
                let Some(Some(plan)) = &self.active else {
                    return Ok(Action::Forward);
                };
                // The masked row comes framed: one allocation per changed row, none otherwise.
                Ok(
                    match plan.mask_data_row_message(body, summary(owed, scratch))? {
                        None => Action::Forward,
                        Some(message) => Action::Rewrite(Bytes::from(message)),
                    },
                )
            }
            b'T' => {
                let plan = match fields {
                    Some(Ok(fields)) => self.plan(fields),
                    Some(Err(e)) => Err(e.clone()),
                    None => parse_row_description(body).and_then(|f| self.plan(&f)),
                };
                match owed.describing() {
                    Some(Owed::DescribeStatement(statement)) => {
                        if let Some(statement) = statement {
                            statement.described.set(plan.map_err(|e| e.to_string()));
                        }
                    }
                    Some(Owed::DescribePortal { name, portal }) => {
                        if let Some(p) = portal {
                            p.described.set(plan.clone().map_err(|e| e.to_string()));
                        }
                        // No safe plan: the description is refused, as its rows would be.
                        let plan = plan?;
                        if portal.is_none() {
                            self.described = Some((name.clone(), plan));
                        }
                    }
                    // A statement's result starts: its rows follow.
                    _ => self.active = Some(plan?),
                }
                Ok(Action::Forward)
            }
            b'n' => {
                match owed.describing() {
                    Some(Owed::DescribeStatement(Some(statement))) => {
                        statement.described.set(Ok(None))
                    }
                    Some(Owed::DescribePortal {
                        portal: Some(p), ..
                    }) => p.described.set(Ok(None)),
                    _ => {}
                }
                Ok(Action::Forward)
            }
            b'C' | b'I' | b's' => {
                let discarded = std::mem::take(&mut self.discard);
                self.active = None;
                self.copy = None;
                self.described = None;
                Ok(if discarded {
                    Action::Withhold
                } else {
                    Action::Forward
                })
            }
            b'H' => {
                if self.discard {
                    return Ok(Action::Withhold);
                }
                let spec = next_copy_spec(owed)?;
                self.copy = self.mask.rules.copy_plan(
                    body,
                    spec.columns.as_deref(),
                    spec.options.clone(),
                )?;
                Ok(Action::Forward)
            }
            b'd' => {
                if self.discard {
                    return Ok(Action::Withhold);
                }
                let Some(copy) = self.copy.as_mut() else {
                    return Ok(Action::Forward);
                };
                Ok(match copy.feed(body, summary(owed, scratch))? {
                    None => Action::Forward,
                    Some(b) if b.is_empty() => Action::Withhold,
                    Some(b) => Action::Rewrite(message::message(b'd', &b)),
                })
            }
            b'c' => {
                if self.discard {
                    return Ok(Action::Withhold);
                }
                let Some(copy) = self.copy.as_mut() else {
                    return Ok(Action::Forward);
                };
                Ok(match copy.finish(summary(owed, scratch))? {
                    None => Action::Forward,
                    Some(rest) => {
                        let mut both = bytes::BytesMut::new();
                        both.extend_from_slice(&message::message(b'd', &rest));
                        both.extend_from_slice(&message::message(b'c', &[]));
                        Action::Rewrite(both.freeze())
                    }
                })
            }
            b'E' => {
                self.end_result();
                Ok(replace(
                    b'E',
                    self.mask
                        .rules
                        .mask_error_fields(body, summary(owed, scratch))?,
                ))
            }
            b'N' => Ok(replace(
                b'N',
                self.mask
                    .rules
                    .mask_error_fields(body, summary(owed, scratch))?,
            )),
            b'A' => Ok(replace(
                b'A',
                self.mask
                    .rules
                    .mask_notification_body(body, summary(owed, scratch))?,
            )),
            b'V' => Ok(replace(
                b'V',
                self.mask
                    .rules
                    .mask_function_result(body, summary(owed, scratch))?,
            )),
            b'Z' => {
                self.end_result();
                Ok(Action::Forward)
            }
            _ => Ok(Action::Forward),
        }
    }

    fn plan(&self, fields: &[FieldDescription]) -> Result<Option<MaskPlan>, MaskError> {
        // `prepare` resolved this chunk's tables; a table it could not resolve fails the plan.
        let origins = lock(&self.mask.origins);
        self.mask.rules.plan_fields(fields, &|t, a| {
            crate::mask::CatalogResolver::origin(&*origins, t, a)
        })
    }

    /// The plan of rows that arrive without a RowDescription: the portal's or statement's
    /// described plan, else a blind scan (an error with column rules).
    fn plan_for_execute(&mut self, owed: &OwedQueue) -> Result<Option<MaskPlan>, MaskError> {
        match owed.producing() {
            Some(Owed::Execute {
                portal: Some(portal),
                ..
            }) => {
                if let Some(described) = portal.described.get() {
                    return described.map_err(|_| MaskError::ColumnsUnknown);
                }
                if let Some(described) = portal.statement.described.get() {
                    let mut plan = described.map_err(|_| MaskError::ColumnsUnknown)?;
                    if let Some(plan) = plan.as_mut() {
                        plan.set_result_formats(portal.result_formats.as_slice())?;
                    }
                    return Ok(plan);
                }
            }
            Some(Owed::Execute {
                name, portal: None, ..
            }) => {
                if let Some((_, plan)) = self.described.take_if(|(n, _)| n == name) {
                    return Ok(plan);
                }
            }
            _ => {}
        }
        self.mask.rules.plan_without_description()
    }

    /// An error, or the batch's end: the result being masked is over.
    fn end_result(&mut self) {
        self.active = None;
        self.copy = None;
        self.discard = false;
        self.described = None;
    }
}

/// The spec of the COPY TO STDOUT now starting: the next of its statement's.
fn next_copy_spec(owed: &OwedQueue) -> Result<&CopySpec, MaskError> {
    let copies = match owed.producing() {
        Some(Owed::Query { copies, .. } | Owed::Execute { copies, .. }) => copies,
        _ => return Err(MaskError::CopyFormat("COPY of an unknown statement")),
    };
    match copies.front() {
        Some(Ok(spec)) => Ok(spec),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "COPY columns could not be described");
            Err(MaskError::ColumnsUnknown)
        }
        None => Err(MaskError::CopyFormat("COPY options unknown")),
    }
}

fn replace(tag: u8, body: Option<Vec<u8>>) -> Action {
    match body {
        None => Action::Forward,
        Some(b) => Action::Rewrite(message::message(tag, &b)),
    }
}

/// The error a client gets instead of a result that could not be masked safely.
fn withheld(e: &MaskError) -> Bytes {
    PgError::error(
        sqlstate::INTERNAL_ERROR,
        "interceptor: result withheld because it could not be masked safely",
    )
    .with_detail(e.to_string())
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_rows_parse_and_reject_garbage() {
        let mut row = Vec::new();
        row.extend_from_slice(&5i16.to_be_bytes());
        for v in ["16384", "2", "public", "customers", "email"] {
            row.extend_from_slice(&(v.len() as i32).to_be_bytes());
            row.extend_from_slice(v.as_bytes());
        }
        let (oid, attnum, origin) = catalog_row(&row).unwrap();
        assert_eq!((oid, attnum), (16384, 2));
        assert_eq!(origin.label(), "public.customers.email");
        assert!(catalog_row(&row[..row.len() - 2]).is_none());
        let mut null = row.clone();
        null[2..6].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(catalog_row(&null).is_none());
    }
}
