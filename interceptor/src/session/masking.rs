//! Masking in the data path: which rules apply to a session, which result each backend message
//! belongs to, and the side connection that resolves column origins and COPY columns.
//!
//! The client → upstream side announces, in order, every request whose answer matters for
//! masking ([`Owed`]); the upstream → client side ([`MaskStream`]) consumes those entries as
//! the answers arrive, so a RowDescription that answers Describe(statement) is kept for that
//! statement and later Executes of its portals find their plan even without a RowDescription.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, Statement};

use super::protocol::{Action, Frontend, Owed, OwedQueue, Statements};
use super::upstream::{Upstream, UpstreamTarget};
use crate::mask::{
    CopyColumn, CopyMasker, CopyOptions, MaskError, MaskPlan, MaskRules, MaskSummary, OriginCache,
    RelationCache, catalog_query, table_oids,
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

/// One COPY TO STDOUT as the statement declares it.
#[derive(Debug)]
pub(crate) struct CopySpec {
    options: CopyOptions,
    columns: Option<Vec<CopyColumn>>,
}

/// What masking needs of each answer PostgreSQL owes: the COPY specs of a statement.
type Expect = Owed<Result<CopySpec, String>>;

/// The masking of one session, shared by both directions.
pub(crate) struct SessionMask {
    rules: MaskRules,
    side: tokio::sync::Mutex<Side>,
    origins: Mutex<OriginCache>,
    login: SideLogin,
    expect: Mutex<OwedQueue<Result<CopySpec, String>>>,
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
            expect: Mutex::new(OwedQueue::default()),
            relations: tokio::sync::Mutex::new(RelationCache::default()),
        }))
    }

    /// The session's rules (after exemptions).
    pub(crate) fn rules(&self) -> &MaskRules {
        &self.rules
    }

    fn push(&self, e: Expect) {
        lock(&self.expect).push(e);
    }

    /// A frontend message is about to be forwarded (refused ones too: their stand-in answers
    /// in the same shape). `statements` is the session's view of what the client prepared.
    pub(crate) async fn frontend(&self, message: &Frontend<'_>, statements: &Statements) {
        match message {
            Frontend::Query(sql) => {
                let copies = self.copy_specs(sql).await;
                self.push(Owed::Query { copies });
            }
            Frontend::Parse(p) => self.push(Owed::Parse(Arc::from(p.statement))),
            Frontend::Bind { view, .. } => self.push(Owed::Bind(view.portal.to_owned())),
            Frontend::Describe { kind, name } => self.push(if *kind == b'S' {
                Owed::DescribeStatement((*name).to_owned())
            } else {
                Owed::DescribePortal((*name).to_owned())
            }),
            Frontend::Execute { portal } => {
                let (statement, formats, copies) = match statements.portal(portal) {
                    Some(p) => (
                        p.statement.name.clone(),
                        p.result_formats.clone(),
                        self.copy_specs(&p.statement.sql).await,
                    ),
                    None => (Arc::from(""), Default::default(), VecDeque::new()),
                };
                self.push(Owed::Execute {
                    portal: (*portal).to_owned(),
                    statement,
                    formats,
                    copies,
                });
            }
            Frontend::Sync => self.push(Owed::Sync),
            Frontend::FunctionCall(_) => self.push(Owed::FunctionCall),
            Frontend::Close { .. } | Frontend::Terminate | Frontend::Passthrough => {}
        }
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
                    "interceptor: statement refused: the catalog lookup that column masking                      needs failed ({e})"
                ))
            })?;
            cache.insert(lookup, &rows).map_err(|_| {
                refused("interceptor: statement refused: malformed catalog answer".into())
            })?;
        }
        let result = crate::mask::rewrite(sql, tree, &self.rules, &cache)
            .map_err(|r| refused(r.0).with_hint("column masking applies to this session"));
        if needs.changes_catalog {
            cache.clear();
        }
        result
    }

    /// The COPY TO STDOUT statements of `sql`, in order, with their options and columns.
    async fn copy_specs(&self, sql: &str) -> VecDeque<Result<CopySpec, String>> {
        let mut out = VecDeque::new();
        // Cheap prefilter: almost no statement is a COPY.
        if !sql
            .as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"copy"))
        {
            return out;
        }
        let dialect = sqlparser::dialect::PostgreSqlDialect {};
        let Ok(statements) = sqlparser::parser::Parser::parse_sql(&dialect, sql) else {
            // The gate refuses what it cannot parse; a COPY here would find no spec and fail.
            return out;
        };
        for st in statements {
            let Statement::Copy {
                source,
                to: true,
                options,
                legacy_options,
                ..
            } = st
            else {
                continue;
            };
            let spec = match copy_options(&options, &legacy_options) {
                Ok(opts) => self
                    .copy_columns(&source)
                    .await
                    .map(|columns| CopySpec {
                        options: opts,
                        columns,
                    })
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            out.push_back(spec);
        }
        out
    }

    /// The columns a COPY produces, described (not executed) on the side connection.
    async fn copy_columns(
        &self,
        source: &CopySource,
    ) -> Result<Option<Vec<CopyColumn>>, SideError> {
        let select = match source {
            CopySource::Table {
                table_name,
                columns,
            } if columns.is_empty() => format!("SELECT * FROM {table_name}"),
            CopySource::Table {
                table_name,
                columns,
            } => {
                let cols: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
                format!("SELECT {} FROM {table_name}", cols.join(", "))
            }
            CopySource::Query(q) => q.to_string(),
        };
        let mut side = self.side.lock().await;
        let Some(rd) = side.describe(&self.login, &select).await? else {
            return Ok(None);
        };
        side.resolve(&self.login, &self.origins, &rd).await?;
        let origins = lock(&self.origins);
        CopyColumn::from_row_description(&rd, &|t, a| {
            crate::mask::CatalogResolver::origin(&*origins, t, a)
        })
        .map(Some)
        .map_err(|e| SideError::Refused(e.to_string()))
    }

    /// Resolves the origins of every RowDescription in a backend chunk (before the chunk is
    /// processed, so that processing needs no await).
    pub(crate) async fn prepare(&self, chunk: &[u8]) -> Result<(), SideError> {
        if !self.rules.needs_origins() {
            return Ok(());
        }
        for f in interceptor_wire::frame::frames(chunk) {
            if f.tag == b'T' {
                let mut side = self.side.lock().await;
                side.resolve(&self.login, &self.origins, f.body).await?;
            }
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

    /// Looks up the tables of a RowDescription that are not cached yet.
    async fn resolve(
        &mut self,
        login: &SideLogin,
        origins: &Mutex<OriginCache>,
        rd: &[u8],
    ) -> Result<(), SideError> {
        let oids = table_oids(rd).map_err(|e| SideError::Refused(e.to_string()))?;
        let missing = lock(origins).missing(&oids);
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

/// COPY options as the masker needs them.
fn copy_options(
    options: &[CopyOption],
    legacy: &[CopyLegacyOption],
) -> Result<CopyOptions, String> {
    let mut format = "text".to_owned();
    for o in options {
        if let CopyOption::Format(f) = o {
            format = f.value.to_ascii_lowercase();
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Binary => format = "binary".into(),
            CopyLegacyOption::Csv(_) => format = "csv".into(),
            _ => {}
        }
    }
    let mut opts = match format.as_str() {
        "text" => CopyOptions::text(),
        "csv" => CopyOptions::csv(),
        "binary" => CopyOptions::binary(),
        other => return Err(format!("unknown COPY format {other}")),
    };
    let byte = |c: char| -> Result<u8, String> {
        u8::try_from(u32::from(c))
            .ok()
            .filter(u8::is_ascii)
            .ok_or_else(|| "non-ASCII COPY option".to_owned())
    };
    for o in options {
        match o {
            CopyOption::Delimiter(c) => opts.delimiter = byte(*c)?,
            CopyOption::Null(s) => opts.null = s.as_bytes().to_vec(),
            CopyOption::Header(h) => opts.header = *h,
            CopyOption::Quote(c) => opts.quote = byte(*c)?,
            CopyOption::Escape(c) => opts.escape = byte(*c)?,
            _ => {}
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Delimiter(c) => opts.delimiter = byte(*c)?,
            CopyLegacyOption::Null(s) => opts.null = s.as_bytes().to_vec(),
            CopyLegacyOption::Csv(csv) => {
                for c in csv {
                    match c {
                        CopyLegacyCsvOption::Header => opts.header = true,
                        CopyLegacyCsvOption::Quote(q) => opts.quote = byte(*q)?,
                        CopyLegacyCsvOption::Escape(e) => opts.escape = byte(*e)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if opts.format == crate::mask::CopyFormat::Csv && !options_set_escape(options, legacy) {
        // CSV's escape defaults to its quote.
        opts.escape = opts.quote;
    }
    Ok(opts)
}

fn options_set_escape(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> bool {
    options.iter().any(|o| matches!(o, CopyOption::Escape(_)))
        || legacy.iter().any(|o| {
            matches!(o, CopyLegacyOption::Csv(c) if c.iter().any(|x| matches!(x, CopyLegacyCsvOption::Escape(_))))
        })
}

/// The upstream → client side's masking state.
pub(crate) struct MaskStream {
    mask: Arc<SessionMask>,
    /// The plan of the rows now arriving (`Some(None)`: decided, nothing to mask).
    active: Option<Option<MaskPlan>>,
    describing: Option<String>,
    statements: HashMap<String, Result<Option<MaskPlan>, String>>,
    portals: HashMap<String, Result<Option<MaskPlan>, String>>,
    copy: Option<CopyMasker>,
    /// A masking failure withheld the rest of this result.
    discard: bool,
}

impl MaskStream {
    pub(crate) fn new(mask: Arc<SessionMask>) -> Self {
        MaskStream {
            mask,
            active: None,
            describing: None,
            statements: HashMap::new(),
            portals: HashMap::new(),
            copy: None,
            discard: false,
        }
    }

    pub(crate) fn session(&self) -> &Arc<SessionMask> {
        &self.mask
    }

    /// Decides one backend message; `summary` collects what was masked.
    pub(crate) fn message(&mut self, tag: u8, body: &[u8], summary: &mut MaskSummary) -> Action {
        match self.step(tag, body, summary) {
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
        // An ErrorResponse that cannot be masked ends its result itself; anything else starts
        // discarding up to the result's end.
        self.discard = !matches!(tag, b'E' | b'Z' | b'C' | b'I' | b's');
        if matches!(tag, b'C' | b'I' | b's') {
            self.pop_execute();
        }
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
        summary: &mut MaskSummary,
    ) -> Result<Action, MaskError> {
        match tag {
            b'D' => {
                if self.discard {
                    return Ok(Action::Withhold);
                }
                if self.active.is_none() {
                    self.active = Some(self.plan_for_execute()?);
                }
                let Some(Some(plan)) = &self.active else {
                    return Ok(Action::Forward);
                };
                // The masked row comes framed: one allocation per changed row, none otherwise.
                Ok(match plan.mask_data_row_message(body, summary)? {
                    None => Action::Forward,
                    Some(message) => Action::Rewrite(Bytes::from(message)),
                })
            }
            b'T' => {
                let plan = self.plan(body);
                if let Some(name) = self.describing.take() {
                    self.statements
                        .insert(name, plan.map_err(|e| e.to_string()));
                    return Ok(Action::Forward);
                }
                // Describe(portal) + Execute in one batch: the rows follow directly, and a
                // later Execute of the same portal finds the plan.
                if let Some(Owed::DescribePortal(p)) =
                    self.pop_if(|e| matches!(e, Owed::DescribePortal(_)))
                {
                    self.portals.insert(
                        p,
                        plan.as_ref().map(Clone::clone).map_err(|e| e.to_string()),
                    );
                }
                self.active = Some(plan?);
                Ok(Action::Forward)
            }
            b'n' => {
                if let Some(name) = self.describing.take() {
                    self.statements.insert(name, Ok(None));
                } else if let Some(Owed::DescribePortal(p)) =
                    self.pop_if(|e| matches!(e, Owed::DescribePortal(_)))
                {
                    self.portals.insert(p, Ok(None));
                }
                Ok(Action::Forward)
            }
            b't' => {
                if let Some(Owed::DescribeStatement(name)) =
                    self.pop_if(|e| matches!(e, Owed::DescribeStatement(_)))
                {
                    self.describing = Some(name);
                }
                Ok(Action::Forward)
            }
            b'1' => {
                if let Some(Owed::Parse(name)) = self.pop_if(|e| matches!(e, Owed::Parse(_))) {
                    self.statements.remove(&*name);
                }
                Ok(Action::Forward)
            }
            b'2' => {
                if let Some(Owed::Bind(portal)) = self.pop_if(|e| matches!(e, Owed::Bind(_))) {
                    self.portals.remove(&portal);
                }
                Ok(Action::Forward)
            }
            b'C' | b'I' | b's' => {
                let discarded = std::mem::take(&mut self.discard);
                self.active = None;
                self.copy = None;
                self.pop_execute();
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
                let spec = self.next_copy_spec()?;
                self.copy =
                    self.mask
                        .rules
                        .copy_plan(body, spec.columns.as_deref(), spec.options)?;
                Ok(Action::Forward)
            }
            b'd' => {
                if self.discard {
                    return Ok(Action::Withhold);
                }
                let Some(copy) = self.copy.as_mut() else {
                    return Ok(Action::Forward);
                };
                Ok(match copy.feed(body, summary)? {
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
                Ok(match copy.finish(summary)? {
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
                self.end_error();
                Ok(replace(
                    b'E',
                    self.mask.rules.mask_error_fields(body, summary)?,
                ))
            }
            b'N' => Ok(replace(
                b'N',
                self.mask.rules.mask_error_fields(body, summary)?,
            )),
            b'A' => Ok(replace(
                b'A',
                self.mask.rules.mask_notification_body(body, summary)?,
            )),
            b'V' => Ok(replace(
                b'V',
                self.mask.rules.mask_function_result(body, summary)?,
            )),
            b'Z' => {
                self.end_batch();
                Ok(Action::Forward)
            }
            _ => Ok(Action::Forward),
        }
    }

    fn plan(&self, rd: &[u8]) -> Result<Option<MaskPlan>, MaskError> {
        // `prepare` resolved this chunk's tables; a table it could not resolve fails the plan.
        let origins = lock(&self.mask.origins);
        self.mask.rules.plan(rd, &|t, a| {
            crate::mask::CatalogResolver::origin(&*origins, t, a)
        })
    }

    /// The plan of rows that arrive without a RowDescription: the portal's or statement's
    /// described plan, else a blind scan (an error with column rules).
    fn plan_for_execute(&self) -> Result<Option<MaskPlan>, MaskError> {
        let expect = lock(&self.mask.expect);
        if let Some(Owed::Execute {
            portal,
            statement,
            formats,
            ..
        }) = expect.front()
        {
            if let Some(p) = self.portals.get(portal) {
                return p.clone().map_err(|_| MaskError::ColumnsUnknown);
            }
            if let Some(p) = self.statements.get(&**statement) {
                let mut plan = p.clone().map_err(|_| MaskError::ColumnsUnknown)?;
                if let Some(plan) = plan.as_mut() {
                    plan.set_result_formats(formats.as_slice())?;
                }
                return Ok(plan);
            }
        }
        self.mask.rules.plan_without_description()
    }

    fn next_copy_spec(&self) -> Result<CopySpec, MaskError> {
        let mut expect = lock(&self.mask.expect);
        let copies = match expect.front_mut() {
            Some(Owed::Query { copies } | Owed::Execute { copies, .. }) => copies,
            _ => return Err(MaskError::CopyFormat("COPY of an unknown statement")),
        };
        match copies.pop_front() {
            Some(Ok(spec)) => Ok(spec),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "COPY columns could not be described");
                Err(MaskError::ColumnsUnknown)
            }
            None => Err(MaskError::CopyFormat("COPY options unknown")),
        }
    }

    fn pop_if(&self, want: impl Fn(&Expect) -> bool) -> Option<Expect> {
        lock(&self.mask.expect).pop_if(want)
    }

    fn pop_execute(&self) {
        let _ = self.pop_if(|e| matches!(e, Owed::Execute { .. }));
    }

    /// An ErrorResponse: PostgreSQL skips the rest of an extended batch up to Sync.
    fn end_error(&mut self) {
        self.active = None;
        self.copy = None;
        self.discard = false;
        self.describing = None;
        let statements = &mut self.statements;
        lock(&self.mask.expect).skip_to_batch_end(|name| {
            statements.remove(name);
        });
    }

    fn end_batch(&mut self) {
        self.active = None;
        self.copy = None;
        self.discard = false;
        self.describing = None;
        lock(&self.mask.expect).end_batch();
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

    fn copy_opts(sql: &str) -> Result<CopyOptions, String> {
        let d = sqlparser::dialect::PostgreSqlDialect {};
        let st = sqlparser::parser::Parser::parse_sql(&d, sql).map_err(|e| e.to_string())?;
        match st.into_iter().next() {
            Some(Statement::Copy {
                options,
                legacy_options,
                ..
            }) => copy_options(&options, &legacy_options),
            _ => Err("not a COPY".into()),
        }
    }

    #[test]
    fn copy_options_follow_the_statement() {
        let t = copy_opts("COPY t TO STDOUT").unwrap();
        assert_eq!(t.format, crate::mask::CopyFormat::Text);
        assert_eq!(t.delimiter, b'\t');
        let c = copy_opts("COPY t TO STDOUT WITH (FORMAT csv, HEADER, DELIMITER ';', QUOTE '''')")
            .unwrap();
        assert_eq!(c.format, crate::mask::CopyFormat::Csv);
        assert!(c.header);
        assert_eq!((c.delimiter, c.quote, c.escape), (b';', b'\'', b'\''));
        let b = copy_opts("COPY t TO STDOUT (FORMAT binary)").unwrap();
        assert_eq!(b.format, crate::mask::CopyFormat::Binary);
        let legacy = copy_opts("COPY t TO STDOUT CSV HEADER").unwrap();
        assert_eq!(legacy.format, crate::mask::CopyFormat::Csv);
        assert!(legacy.header);
        assert!(copy_opts("COPY t TO STDOUT (FORMAT parquet)").is_err());
    }

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
