//! COPY TO STDOUT data in text, CSV and binary formats. CopyData messages carry arbitrary slices
//! of the stream, so a row may span messages: the masker keeps the incomplete tail and emits
//! whole rows only.

use std::sync::Arc;

use super::MaskError;
use super::catalog::ColumnOrigin;
use super::plan::{Action, ColumnPlan};
use super::rules::MaskRules;
use super::summary::{MaskSummary, MaskTarget};
use super::value::{Outcome, Repr};
use super::wire::{Format, Reader, put_value};

/// The COPY format, which the relay knows from the COPY statement (CopyOutResponse only says
/// text-or-binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// The options of the COPY statement that shape its output.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub format: CopyFormat,
    /// Field separator (text: tab, CSV: comma).
    pub delimiter: u8,
    /// NULL marker (text: `\N`, CSV: empty unquoted).
    pub null: Vec<u8>,
    /// CSV quote character.
    pub quote: u8,
    /// CSV escape character (defaults to the quote).
    pub escape: u8,
    /// The first row is a header (passed through unmasked: it holds column names).
    pub header: bool,
    /// Largest row buffered while waiting for its end.
    pub max_row_bytes: usize,
}

impl CopyOptions {
    const DEFAULT_MAX_ROW: usize = 64 << 20;

    pub fn text() -> Self {
        CopyOptions {
            format: CopyFormat::Text,
            delimiter: b'\t',
            null: b"\\N".to_vec(),
            quote: b'"',
            escape: b'"',
            header: false,
            max_row_bytes: Self::DEFAULT_MAX_ROW,
        }
    }

    pub fn csv() -> Self {
        CopyOptions {
            format: CopyFormat::Csv,
            delimiter: b',',
            null: Vec::new(),
            ..Self::text()
        }
    }

    pub fn binary() -> Self {
        CopyOptions {
            format: CopyFormat::Binary,
            ..Self::text()
        }
    }
}

/// One column of a COPY, as the relay knows it (for `COPY t (a, b) TO STDOUT` from the catalog;
/// for `COPY (SELECT ...)` from a Describe of the query).
#[derive(Debug, Clone)]
pub struct CopyColumn {
    pub name: String,
    pub origin: Option<ColumnOrigin>,
    /// 0 when unknown (text and CSV values are then treated as text).
    pub type_oid: u32,
}

impl CopyColumn {
    /// The columns of a COPY from the RowDescription of the same columns (e.g. the relay
    /// describes `SELECT a, b FROM t` on its own connection for `COPY t (a, b) TO STDOUT`),
    /// with origins resolved as for [`MaskRules::plan`].
    pub fn from_row_description(
        row_description: &[u8],
        origins: &dyn Fn(u32, i16) -> Option<ColumnOrigin>,
    ) -> Result<Vec<CopyColumn>, MaskError> {
        Ok(Self::from_fields(
            &super::wire::parse_row_description(row_description)?,
            origins,
        ))
    }

    /// [`CopyColumn::from_row_description`] of a RowDescription already decoded.
    pub(crate) fn from_fields(
        fields: &[super::wire::FieldDescription],
        origins: &dyn Fn(u32, i16) -> Option<ColumnOrigin>,
    ) -> Vec<CopyColumn> {
        fields
            .iter()
            .map(|f| CopyColumn {
                origin: (f.table_oid != 0 && f.attnum > 0)
                    .then(|| origins(f.table_oid, f.attnum))
                    .flatten(),
                name: f.name.clone(),
                type_oid: f.type_oid,
            })
            .collect()
    }
}

/// Masks one COPY OUT stream. Feed every CopyData payload, then call [`CopyMasker::finish`] at
/// CopyDone.
#[derive(Debug)]
pub struct CopyMasker {
    rules: MaskRules,
    /// `None`: columns unknown, every field is scanned by the detectors.
    columns: Option<Vec<ColumnPlan>>,
    options: CopyOptions,
    pending: Vec<u8>,
    /// Reused buffer for decoding escaped or quoted fields (no allocation per field).
    scratch: Vec<u8>,
    header_pending: bool,
    binary_header_done: bool,
    binary_done: bool,
}

impl MaskRules {
    /// The masker for a COPY OUT, from the CopyOutResponse body, the columns if the relay knows
    /// them, and the statement's options. `None` when nothing can be masked (relay the data
    /// untouched). With column rules and `columns: None` it is an error (fail closed).
    pub fn copy_plan(
        &self,
        copy_out_response: &[u8],
        columns: Option<&[CopyColumn]>,
        options: CopyOptions,
    ) -> Result<Option<CopyMasker>, MaskError> {
        const MSG: &str = "CopyOutResponse";
        let mut r = Reader::new(copy_out_response, MSG);
        let overall = r.u8()?;
        let n = r.i16()?;
        if n < 0 {
            return Err(MaskError::malformed(MSG, "negative column count"));
        }
        for _ in 0..n {
            Format::from_code(r.i16()?, MSG)?;
        }
        r.finish()?;
        match (overall, options.format) {
            (0, CopyFormat::Text | CopyFormat::Csv) | (1, CopyFormat::Binary) => {}
            (0 | 1, _) => return Err(MaskError::CopyFormat("options disagree with the server")),
            _ => return Err(MaskError::malformed(MSG, "unknown format")),
        }
        if options.format == CopyFormat::Csv && options.quote == options.delimiter {
            return Err(MaskError::CopyFormat("quote equals delimiter"));
        }
        if self.is_empty() {
            return Ok(None);
        }
        let format = if options.format == CopyFormat::Binary {
            Format::Binary
        } else {
            Format::Text
        };
        let plans = match columns {
            None if self.needs_origins() => return Err(MaskError::ColumnsUnknown),
            None => None,
            Some(cols) => {
                if cols.len() != n as usize {
                    return Err(MaskError::ColumnCount {
                        expected: n as usize,
                        got: cols.len(),
                    });
                }
                let plans: Vec<ColumnPlan> = cols
                    .iter()
                    .map(|c| {
                        let action = match self.inner.column_strategy(&c.name, c.origin.as_ref()) {
                            Some(s) => Action::Rule(s.clone()),
                            None if self.has_detectors() => Action::Scan,
                            None => Action::Keep,
                        };
                        let label = c
                            .origin
                            .as_ref()
                            .map_or_else(|| c.name.clone(), |o| o.label());
                        ColumnPlan {
                            target: MaskTarget::Column(Arc::from(label)),
                            type_oid: c.type_oid,
                            repr: Repr::of(c.type_oid, format),
                            action,
                        }
                    })
                    .collect();
                if plans.iter().all(|p| matches!(p.action, Action::Keep)) {
                    return Ok(None);
                }
                Some(plans)
            }
        };
        Ok(Some(CopyMasker {
            rules: self.clone(),
            columns: plans,
            header_pending: options.header && options.format != CopyFormat::Binary,
            options,
            pending: Vec::new(),
            scratch: Vec::new(),
            binary_header_done: false,
            binary_done: false,
        }))
    }
}

impl CopyMasker {
    /// Mask one CopyData payload. `Ok(None)`: forward `data` unchanged. `Ok(Some(bytes))`:
    /// forward `bytes` instead (possibly empty: send nothing now, the row is incomplete).
    pub fn feed(
        &mut self,
        data: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        if self.pending.is_empty() {
            let (consumed, out) = self.process(data, false, summary)?;
            if consumed == data.len() {
                return Ok(out);
            }
            self.keep_pending(&data[consumed..])?;
            return Ok(Some(out.unwrap_or_else(|| data[..consumed].to_vec())));
        }
        let mut work = std::mem::take(&mut self.pending);
        work.extend_from_slice(data);
        let (consumed, out) = self.process(&work, false, summary)?;
        let out = out.unwrap_or_else(|| work[..consumed].to_vec());
        self.keep_pending(&work[consumed..])?;
        Ok(Some(out))
    }

    /// At CopyDone: whatever is still buffered (a last text row without newline), masked.
    /// An incomplete binary tuple is an error.
    pub fn finish(&mut self, summary: &mut MaskSummary) -> Result<Option<Vec<u8>>, MaskError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let work = std::mem::take(&mut self.pending);
        let (consumed, out) = self.process(&work, true, summary)?;
        if consumed != work.len() {
            return Err(MaskError::malformed(
                "CopyData",
                "incomplete row at end of COPY",
            ));
        }
        Ok(Some(out.unwrap_or(work)))
    }

    fn keep_pending(&mut self, rest: &[u8]) -> Result<(), MaskError> {
        if rest.len() > self.options.max_row_bytes {
            return Err(MaskError::CopyRowTooLong {
                limit: self.options.max_row_bytes,
            });
        }
        self.pending = rest.to_vec();
        Ok(())
    }

    /// Process the complete rows at the start of `buf`: (bytes consumed, masked output if
    /// anything changed). `at_end`: the buffer's tail is a complete row even without newline.
    fn process(
        &mut self,
        buf: &[u8],
        at_end: bool,
        summary: &mut MaskSummary,
    ) -> Result<(usize, Option<Vec<u8>>), MaskError> {
        match self.options.format {
            CopyFormat::Binary => self.process_binary(buf, summary),
            CopyFormat::Text | CopyFormat::Csv => {
                let mut out: Option<Vec<u8>> = None;
                let mut pos = 0;
                while pos < buf.len() {
                    let (row_end, next) = match self.row_end(&buf[pos..]) {
                        Some(len) => (pos + len, pos + len + 1),
                        None if at_end => (buf.len(), buf.len()),
                        None => break,
                    };
                    let row = &buf[pos..row_end];
                    let masked = if self.header_pending {
                        self.header_pending = false;
                        None
                    } else {
                        let mut scratch = std::mem::take(&mut self.scratch);
                        let masked = if self.options.format == CopyFormat::Text {
                            self.mask_text_row(row, &mut scratch, summary)
                        } else {
                            self.mask_csv_row(row, &mut scratch, summary)
                        };
                        self.scratch = scratch;
                        masked?
                    };
                    match masked {
                        Some(new) => {
                            let o = out.get_or_insert_with(|| {
                                let mut o = Vec::with_capacity(buf.len() + 64);
                                o.extend_from_slice(&buf[..pos]);
                                o
                            });
                            o.extend_from_slice(&new);
                            o.extend_from_slice(&buf[row_end..next]);
                        }
                        None => {
                            if let Some(o) = out.as_mut() {
                                o.extend_from_slice(&buf[pos..next]);
                            }
                        }
                    }
                    pos = next;
                }
                Ok((pos, out))
            }
        }
    }

    /// Length of the first row of `buf` (without its newline), if complete.
    fn row_end(&self, buf: &[u8]) -> Option<usize> {
        if self.options.format == CopyFormat::Text {
            // Newlines inside values are escaped (`\n`), so a raw newline ends the row.
            return memchr::memchr(b'\n', buf);
        }
        let (quote, escape) = (self.options.quote, self.options.escape);
        let mut in_quotes = false;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            if in_quotes {
                if b == escape
                    && escape != quote
                    && buf.get(i + 1).is_some_and(|n| *n == quote || *n == escape)
                {
                    i += 1;
                } else if b == quote {
                    in_quotes = false;
                }
            } else if b == quote {
                in_quotes = true;
            } else if b == b'\n' {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    fn column(&self, i: usize) -> Result<Option<&ColumnPlan>, MaskError> {
        match &self.columns {
            None => Ok(None),
            Some(cols) => cols.get(i).map(Some).ok_or(MaskError::ColumnCount {
                expected: cols.len(),
                got: i + 1,
            }),
        }
    }

    fn check_count(&self, n: usize) -> Result<(), MaskError> {
        match &self.columns {
            Some(cols) if cols.len() != n => Err(MaskError::ColumnCount {
                expected: cols.len(),
                got: n,
            }),
            _ => Ok(()),
        }
    }

    fn mask_field(
        &self,
        i: usize,
        value: &[u8],
        default: Repr,
        summary: &mut MaskSummary,
    ) -> Result<Outcome, MaskError> {
        match self.column(i)? {
            Some(col) => col.mask(&self.rules, value, summary),
            None => self.rules.inner.scan_value(default, value, summary),
        }
    }

    fn mask_text_row(
        &self,
        row: &[u8],
        scratch: &mut Vec<u8>,
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        let fields = DelimitedFields::new(row, self.options.delimiter, None);
        self.mask_delimited_row(row, fields, scratch, summary)
    }

    fn mask_csv_row(
        &self,
        row: &[u8],
        scratch: &mut Vec<u8>,
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        let quoting = Some((self.options.quote, self.options.escape));
        let fields = DelimitedFields::new(row, self.options.delimiter, quoting);
        self.mask_delimited_row(row, fields, scratch, summary)
    }

    /// Mask the fields of one text or CSV row; `None` (and no allocation) when unchanged.
    fn mask_delimited_row(
        &self,
        row: &[u8],
        fields: DelimitedFields<'_>,
        scratch: &mut Vec<u8>,
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        let csv = self.options.format == CopyFormat::Csv;
        let (delim, quote, escape) = (
            self.options.delimiter,
            self.options.quote,
            self.options.escape,
        );
        let mut out: Option<Vec<u8>> = None;
        let mut count = 0;
        for field in fields {
            let (s, e, quoted) = field?;
            let idx = count;
            count += 1;
            let raw = &row[s..e];
            let outcome = if !quoted && raw == self.options.null.as_slice() {
                Outcome::Unchanged
            } else if quoted {
                csv_unquote(raw, quote, escape, scratch);
                self.mask_field(idx, scratch, Repr::Text, summary)?
            } else if !csv && raw.contains(&b'\\') {
                text_unescape(raw, scratch);
                self.mask_field(idx, scratch, Repr::Text, summary)?
            } else {
                self.mask_field(idx, raw, Repr::Text, summary)?
            };
            if let Outcome::Unchanged = outcome {
                if let Some(o) = out.as_mut() {
                    if idx > 0 {
                        o.push(delim);
                    }
                    o.extend_from_slice(raw);
                }
                continue;
            }
            // The first change copies the row up to this field (its delimiter included).
            match out.as_mut() {
                Some(o) if idx > 0 => o.push(delim),
                Some(_) => {}
                None => {
                    let mut o = Vec::with_capacity(row.len() + 32);
                    o.extend_from_slice(&row[..s]);
                    out = Some(o);
                }
            }
            let Some(o) = out.as_mut() else { continue };
            match outcome {
                Outcome::Bytes(b) if csv => {
                    o.push(quote);
                    for c in b {
                        if c == quote || (c == escape && escape != quote) {
                            o.push(escape);
                        }
                        o.push(c);
                    }
                    o.push(quote);
                }
                Outcome::Bytes(b) => text_escape_into(&b, delim, o),
                _ => o.extend_from_slice(&self.options.null),
            }
        }
        self.check_count(count)?;
        Ok(out)
    }

    fn process_binary(
        &mut self,
        buf: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<(usize, Option<Vec<u8>>), MaskError> {
        const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
        const MSG: &str = "binary COPY";
        let mut pos = 0;
        if !self.binary_header_done {
            if buf.len() < SIGNATURE.len() + 8 {
                return Ok((0, None));
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err(MaskError::malformed(MSG, "bad signature"));
            }
            let mut r = Reader::new(&buf[SIGNATURE.len()..], MSG);
            let flags = r.u32()?;
            let ext = r.u32()? as usize;
            if flags & (1 << 16) != 0 {
                return Err(MaskError::malformed(
                    MSG,
                    "OIDs in COPY data are not supported",
                ));
            }
            let header_len = SIGNATURE.len() + 8 + ext;
            if buf.len() < header_len {
                return Ok((0, None));
            }
            self.binary_header_done = true;
            pos = header_len;
        }
        let mut out: Option<Vec<u8>> = None;
        while pos < buf.len() {
            if self.binary_done {
                return Err(MaskError::malformed(MSG, "data after trailer"));
            }
            let mut r = Reader::new(&buf[pos..], MSG);
            let Ok(count) = r.i16() else { break };
            if count == -1 {
                self.binary_done = true;
                if let Some(o) = out.as_mut() {
                    o.extend_from_slice(&buf[pos..pos + 2]);
                }
                pos += 2;
                continue;
            }
            if count < 0 {
                return Err(MaskError::malformed(MSG, "negative field count"));
            }
            self.check_count(count as usize)?;
            // First make sure the whole tuple is here.
            let mut complete = true;
            let mut values = Vec::with_capacity(count as usize);
            for _ in 0..count {
                if r.remaining() < 4 {
                    complete = false;
                    break;
                }
                let len_pos = r.pos();
                let len = r.i32()?;
                if len >= 0 && r.remaining() < len as usize {
                    complete = false;
                    break;
                }
                let _ = len_pos;
                values.push(match len {
                    -1 => None,
                    n if n < 0 => return Err(MaskError::malformed(MSG, "negative field length")),
                    n => Some(r.take(n as usize)?),
                });
            }
            if !complete {
                break;
            }
            let tuple_end = pos + r.pos();
            let mut new_tuple: Option<Vec<u8>> = None;
            for (i, v) in values.iter().enumerate() {
                let outcome = match v {
                    None => Outcome::Unchanged,
                    Some(v) => self.mask_field(i, v, Repr::Opaque, summary)?,
                };
                if !matches!(outcome, Outcome::Unchanged) && new_tuple.is_none() {
                    let mut t = Vec::with_capacity(tuple_end - pos + 32);
                    t.extend_from_slice(&count.to_be_bytes());
                    for prev in &values[..i] {
                        put_value(&mut t, *prev)?;
                    }
                    new_tuple = Some(t);
                }
                if let Some(t) = new_tuple.as_mut() {
                    match outcome {
                        Outcome::Unchanged => put_value(t, *v)?,
                        Outcome::Null => put_value(t, None)?,
                        Outcome::Bytes(b) => put_value(t, Some(&b))?,
                    }
                }
            }
            match new_tuple {
                Some(t) => {
                    let o = out.get_or_insert_with(|| buf[..pos].to_vec());
                    o.extend_from_slice(&t);
                }
                None => {
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(&buf[pos..tuple_end]);
                    }
                }
            }
            pos = tuple_end;
        }
        Ok((pos, out))
    }
}

/// Decode COPY text escapes.
fn text_unescape(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 >= raw.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut n = 1;
                while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if i < raw.len() && raw[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
}

fn text_escape_into(value: &[u8], delim: u8, out: &mut Vec<u8>) {
    for &b in value {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            8 => out.extend_from_slice(b"\\b"),
            12 => out.extend_from_slice(b"\\f"),
            11 => out.extend_from_slice(b"\\v"),
            b if b == delim => {
                out.push(b'\\');
                out.push(b);
            }
            b => out.push(b),
        }
    }
}

fn csv_unquote(raw: &[u8], quote: u8, escape: u8, out: &mut Vec<u8>) {
    out.clear();
    let mut in_quotes = false;
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if in_quotes {
            if b == escape
                && raw.get(i + 1).is_some_and(|n| *n == quote || *n == escape)
                && (escape != quote || raw.get(i + 1) == Some(&quote))
            {
                out.push(raw[i + 1]);
                i += 2;
                continue;
            }
            if b == quote {
                in_quotes = false;
            } else {
                out.push(b);
            }
        } else if b == quote {
            in_quotes = true;
        } else {
            out.push(b);
        }
        i += 1;
    }
}

/// The fields of a text row (`quoting: None`, backslash escapes) or CSV row (quote and
/// escape characters): `(start, end, quoted)` ranges, without allocating.
struct DelimitedFields<'a> {
    row: &'a [u8],
    delim: u8,
    quoting: Option<(u8, u8)>,
    start: usize,
    done: bool,
}

impl<'a> DelimitedFields<'a> {
    fn new(row: &'a [u8], delim: u8, quoting: Option<(u8, u8)>) -> Self {
        DelimitedFields {
            row,
            delim,
            quoting,
            start: 0,
            done: false,
        }
    }
}

impl Iterator for DelimitedFields<'_> {
    type Item = Result<(usize, usize, bool), MaskError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let row = self.row;
        let start = self.start;
        let mut i = start;
        let mut quoted = false;
        let mut in_quotes = false;
        while i < row.len() {
            let b = row[i];
            match self.quoting {
                None if b == b'\\' => {
                    i += 2;
                    continue;
                }
                Some((quote, escape)) if in_quotes => {
                    let escaped_next = row.get(i + 1).is_some_and(|n| *n == quote || *n == escape);
                    if b == escape && escape != quote && escaped_next {
                        i += 1;
                    } else if b == quote {
                        in_quotes = false;
                    }
                }
                Some((quote, _)) if b == quote => {
                    in_quotes = true;
                    quoted = true;
                }
                _ if b == self.delim => break,
                _ => {}
            }
            i += 1;
        }
        if in_quotes {
            self.done = true;
            return Some(Err(MaskError::malformed(
                "CopyData",
                "unterminated CSV quote",
            )));
        }
        let end = i.min(row.len());
        if end >= row.len() {
            self.done = true;
        } else {
            self.start = end + 1;
        }
        Some(Ok((start, end, quoted)))
    }
}
