//! Values echoed outside result rows: ErrorResponse/NoticeResponse fields (a unique violation's
//! `Key (email)=(...)`, a check violation's `Failing row contains (...)`, a cast error quoting
//! its input) and NotificationResponse payloads.

use super::MaskError;
use super::rules::{ColumnMatcher, MaskRules};
use super::summary::MaskSummary;
use super::value::{COLUMN_TOKEN, Outcome};
use super::wire::Reader;

/// Fields that never carry values: severity, code, position, source location, identifiers.
const NO_VALUES: &[u8] = b"SVCPpFLRstcdn";

impl MaskRules {
    /// Rewrite an ErrorResponse or NoticeResponse body. `Ok(None)` when nothing changed.
    pub fn mask_error_fields(
        &self,
        body: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        const MSG: &str = "ErrorResponse";
        if self.is_empty() {
            return Ok(None);
        }
        let mut r = Reader::new(body, MSG);
        let mut fields: Vec<(u8, &[u8])> = Vec::new();
        loop {
            let code = r.u8()?;
            if code == 0 {
                break;
            }
            fields.push((code, r.cstr()?));
        }
        r.finish()?;
        let field = |c: u8| {
            fields
                .iter()
                .find(|(code, _)| *code == c)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let (schema, table) = (field(b's'), field(b't'));
        let mut changed = false;
        let mut out_fields: Vec<(u8, Vec<u8>)> = Vec::with_capacity(fields.len());
        for (code, value) in &fields {
            let mut current: Option<Vec<u8>> = match code {
                b'D' => self.mask_detail(value, schema.as_deref(), table.as_deref(), summary),
                b'M' => self.mask_message(value, summary),
                _ => None,
            };
            if !NO_VALUES.contains(code) {
                let text = current.as_deref().unwrap_or(value);
                if let Some(new) = self.scan_text(text, summary) {
                    current = Some(new);
                }
            }
            changed |= current.is_some();
            out_fields.push((*code, current.unwrap_or_else(|| value.to_vec())));
        }
        if !changed {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(body.len() + 32);
        for (code, value) in out_fields {
            out.push(code);
            // Replacements never contain NUL, but a stray one would end the field early.
            out.extend(value.into_iter().filter(|b| *b != 0));
            out.push(0);
        }
        out.push(0);
        Ok(Some(out))
    }

    /// Detectors over a payload. `None` when nothing matched.
    pub fn mask_notification(&self, payload: &str) -> Option<String> {
        let mut summary = MaskSummary::new();
        let out = self.scan_text(payload.as_bytes(), &mut summary)?;
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    /// Rewrite a NotificationResponse body (pid, channel, payload). `Ok(None)` when unchanged.
    pub fn mask_notification_body(
        &self,
        body: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        let mut r = Reader::new(body, "NotificationResponse");
        let pid = r.i32()?;
        let channel = r.cstr()?;
        let payload = r.cstr()?;
        r.finish()?;
        let Some(masked) = self.scan_text(payload, summary) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(body.len() + 16);
        out.extend_from_slice(&pid.to_be_bytes());
        out.extend_from_slice(channel);
        out.push(0);
        out.extend(masked.into_iter().filter(|b| *b != 0));
        out.push(0);
        Ok(Some(out))
    }

    /// Detectors over text that cannot be NULL.
    pub(crate) fn scan_text(&self, text: &[u8], summary: &mut MaskSummary) -> Option<Vec<u8>> {
        let spans = self.inner.scanner.as_ref()?.scan(text)?;
        match self.inner.render_spans(text, &spans, false, false, summary) {
            Outcome::Bytes(b) => Some(b),
            Outcome::Null => Some(COLUMN_TOKEN.as_bytes().to_vec()),
            Outcome::Unchanged => None,
        }
    }

    /// Whether a constraint's key columns (as PostgreSQL prints them) fall under column rules.
    fn key_columns_sensitive(&self, schema: Option<&str>, table: Option<&str>, cols: &str) -> bool {
        cols.split(", ").map(str::trim).any(|col| {
            // Expression index keys (`lower(email)`) are not plain names.
            let plain = col
                .trim_matches('"')
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
            self.inner.columns.iter().any(|r| match &r.matcher {
                ColumnMatcher::Name(re) => re.is_match(col) || re.is_match(col.trim_matches('"')),
                ColumnMatcher::Origin(p) => {
                    p.matches_parts(schema, table, col.trim_matches('"'))
                        || (!plain && p.matches_table(schema, table))
                }
            })
        })
    }

    /// Whether any column rule could cover a table's row (name rules always could).
    fn table_sensitive(&self, schema: Option<&str>, table: Option<&str>) -> bool {
        self.inner.columns.iter().any(|r| match &r.matcher {
            ColumnMatcher::Name(_) => true,
            ColumnMatcher::Origin(p) => p.matches_table(schema, table),
        })
    }

    fn mask_detail(
        &self,
        detail: &[u8],
        schema: Option<&str>,
        table: Option<&str>,
        summary: &mut MaskSummary,
    ) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(detail).ok();
        let d = match text {
            Some(d) => d,
            // Not UTF-8: cannot be parsed, so fail closed when column rules exist.
            None if self.needs_origins() => return Some(COLUMN_TOKEN.as_bytes().to_vec()),
            None => return None,
        };
        let target = super::MaskTarget::Column(std::sync::Arc::from("error detail"));
        if let Some(rest) = d.strip_prefix("Key (")
            && let Some(eq) = rest.find(")=(")
        {
            let cols = &rest[..eq];
            if !self.key_columns_sensitive(schema, table, cols) {
                return None;
            }
            let tail = &rest[eq + 3..];
            let suffix = [
                ") already exists.",
                ") is duplicated.",
                ") is not present in table ",
                ") is still referenced from table ",
            ]
            .iter()
            .filter_map(|s| tail.rfind(s).map(|i| &tail[i..]))
            .next()
            .unwrap_or(")");
            summary.record(&target, super::StrategyKind::Redact, 1);
            return Some(format!("Key ({cols})=({COLUMN_TOKEN}{suffix}").into_bytes());
        }
        // JSON and array parse errors quote the offending token of the input.
        if self.needs_origins()
            && let Some(rest) = d.strip_prefix("Token \"")
            && let Some(close) = rest.rfind("\" is invalid.")
        {
            summary.record(&target, super::StrategyKind::Redact, 1);
            return Some(format!("Token \"{COLUMN_TOKEN}{}", &rest[close..]).into_bytes());
        }
        if d.starts_with("Failing row contains (") && self.table_sensitive(schema, table) {
            summary.record(&target, super::StrategyKind::Redact, 1);
            return Some(format!("Failing row contains ({COLUMN_TOKEN}).").into_bytes());
        }
        None
    }

    /// Cast and range errors quote the offending input, which came from a value the client
    /// may not see. Their column is unknown, so with column rules they are always redacted:
    /// PostgreSQL's `<what>: "<input>"` shape (invalid input syntax/value, malformed array or
    /// record literal, date/time field out of range, ...) and `[value ]"<input>" is out of
    /// range for type ...`. Redacting an identifier quoted the same way costs nothing.
    fn mask_message(&self, message: &[u8], summary: &mut MaskSummary) -> Option<Vec<u8>> {
        if !self.needs_origins() {
            return None;
        }
        let m = std::str::from_utf8(message).ok()?;
        let target = super::MaskTarget::Column(std::sync::Arc::from("error message"));
        if m.ends_with('"')
            && let Some(open) = m.find(": \"")
        {
            summary.record(&target, super::StrategyKind::Redact, 1);
            return Some(format!("{}: \"{COLUMN_TOKEN}\"", &m[..open]).into_bytes());
        }
        let (prefix, rest) = match m.strip_prefix("value \"") {
            Some(rest) => ("value \"", rest),
            None => ("\"", m.strip_prefix('"')?),
        };
        let close = rest.rfind("\" is out of range for type ")?;
        summary.record(&target, super::StrategyKind::Redact, 1);
        Some(format!("{prefix}{COLUMN_TOKEN}{}", &rest[close..]).into_bytes())
    }
}
