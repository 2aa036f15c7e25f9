//! The plan for the DataRows of one result: which columns a rule replaces, which are scanned by
//! detectors, which pass untouched.

use std::sync::Arc;

use super::MaskError;
use super::catalog::ColumnOrigin;
use super::rules::MaskRules;
use super::strategy::Strategy;
use super::summary::{MaskSummary, MaskTarget};
use super::value::{Outcome, Repr};
use super::wire::{FieldDescription, Format, Reader, parse_row_description, put_value};

/// What happens to one column's values.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    Keep,
    Rule(Strategy),
    Scan,
}

#[derive(Debug, Clone)]
pub(crate) struct ColumnPlan {
    pub target: MaskTarget,
    pub type_oid: u32,
    pub repr: Repr,
    pub action: Action,
}

impl ColumnPlan {
    /// Mask one non-NULL value.
    pub(crate) fn mask(
        &self,
        rules: &MaskRules,
        value: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Outcome, MaskError> {
        match &self.action {
            Action::Keep => Ok(Outcome::Unchanged),
            Action::Rule(s) => {
                Ok(rules
                    .inner
                    .mask_whole(s, &self.target, self.repr, value, summary))
            }
            Action::Scan => rules.inner.scan_value(self.repr, value, summary),
        }
    }
}

/// How the DataRows of one result are masked. Built by [`MaskRules::plan`].
#[derive(Debug, Clone)]
pub struct MaskPlan {
    rules: MaskRules,
    columns: Vec<ColumnPlan>,
    /// No RowDescription: any number of columns, every value scanned as opaque.
    blind: bool,
}

impl MaskRules {
    /// Column plans for described columns; errors when an origin is needed but unresolved.
    pub(crate) fn column_plans(
        &self,
        fields: &[FieldDescription],
        origins: &dyn Fn(u32, i16) -> Option<ColumnOrigin>,
    ) -> Result<Vec<ColumnPlan>, MaskError> {
        let needs_origins = self.needs_origins();
        let mut columns = Vec::with_capacity(fields.len());
        for f in fields {
            let origin = if needs_origins && f.table_oid != 0 && f.attnum > 0 {
                match origins(f.table_oid, f.attnum) {
                    Some(o) => Some(o),
                    None => {
                        return Err(MaskError::UnresolvedOrigin {
                            table_oid: f.table_oid,
                            attnum: f.attnum,
                        });
                    }
                }
            } else {
                None
            };
            let action = match self.inner.column_strategy(&f.name, origin.as_ref()) {
                Some(s) => Action::Rule(s.clone()),
                None if self.has_detectors() => Action::Scan,
                None => Action::Keep,
            };
            let label = match &origin {
                Some(o) => o.label(),
                None => f.name.clone(),
            };
            columns.push(ColumnPlan {
                target: MaskTarget::Column(Arc::from(label)),
                type_oid: f.type_oid,
                repr: Repr::of(f.type_oid, f.format),
                action,
            });
        }
        Ok(columns)
    }

    /// The plan for the DataRows that follow a RowDescription, given the resolved origins of
    /// its columns. `None` when no rule can touch this result: relay the rows untouched.
    pub fn plan(
        &self,
        row_description: &[u8],
        origins: &dyn Fn(u32, i16) -> Option<ColumnOrigin>,
    ) -> Result<Option<MaskPlan>, MaskError> {
        if self.is_empty() {
            return Ok(None);
        }
        self.plan_fields(&parse_row_description(row_description)?, origins)
    }

    /// [`MaskRules::plan`] of a RowDescription already decoded.
    pub(crate) fn plan_fields(
        &self,
        fields: &[FieldDescription],
        origins: &dyn Fn(u32, i16) -> Option<ColumnOrigin>,
    ) -> Result<Option<MaskPlan>, MaskError> {
        if self.is_empty() {
            return Ok(None);
        }
        let columns = self.column_plans(fields, origins)?;
        if columns.iter().all(|c| matches!(c.action, Action::Keep)) {
            return Ok(None);
        }
        Ok(Some(MaskPlan {
            rules: self.clone(),
            columns,
            blind: false,
        }))
    }

    /// The plan for DataRows that arrive without a RowDescription (an Execute whose client
    /// never sent Describe). Detectors still scan every value (a hit makes it NULL, as its type
    /// is unknown); with column rules this is an error, since the columns cannot be known.
    pub fn plan_without_description(&self) -> Result<Option<MaskPlan>, MaskError> {
        if self.needs_origins() {
            return Err(MaskError::ColumnsUnknown);
        }
        if !self.has_detectors() {
            return Ok(None);
        }
        Ok(Some(MaskPlan {
            rules: self.clone(),
            columns: Vec::new(),
            blind: true,
        }))
    }
}

impl MaskRules {
    /// Rewrite a FunctionCallResponse body (fast-path calls such as `lo_read`): its type and
    /// format are unknown, so detectors scan the raw bytes and a hit makes the result NULL.
    /// Column rules cannot be attributed to a function result; deny fast-path calls by policy
    /// where that matters. `Ok(None)` when unchanged.
    pub fn mask_function_result(
        &self,
        body: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        let mut r = Reader::new(body, "FunctionCallResponse");
        let value = r.value()?;
        r.finish()?;
        let Some(v) = value else { return Ok(None) };
        match self.inner.scan_value(Repr::Opaque, v, summary)? {
            Outcome::Unchanged => Ok(None),
            _ => Ok(Some((-1i32).to_be_bytes().to_vec())),
        }
    }
}

impl MaskPlan {
    /// Apply the result format codes of a Bind (0, 1 or one per column) when the
    /// RowDescription came from a Describe of the statement, whose format codes are all text.
    pub fn set_result_formats(&mut self, formats: &[i16]) -> Result<(), MaskError> {
        if self.blind {
            return Ok(());
        }
        let n = self.columns.len();
        let format_of = |i: usize| -> Result<Format, MaskError> {
            let code = match formats.len() {
                0 => 0,
                1 => formats[0],
                len if len == n => formats[i],
                _ => return Err(MaskError::malformed("Bind", "result format count mismatch")),
            };
            Format::from_code(code, "Bind")
        };
        for i in 0..n {
            let format = format_of(i)?;
            let c = &mut self.columns[i];
            c.repr = Repr::of(c.type_oid, format);
        }
        Ok(())
    }

    /// Rewrite one DataRow body. `Ok(None)` when nothing changed (nothing allocated);
    /// `Ok(Some(body))` is the new body (the relay re-frames it with a new length).
    pub fn mask_data_row(
        &self,
        body: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        self.rewrite_row(body, summary, false)
    }

    /// As [`MaskPlan::mask_data_row`], but a changed row comes back as a whole DataRow
    /// message (tag and length included), so the relay forwards it without framing it again.
    pub fn mask_data_row_message(
        &self,
        body: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        self.rewrite_row(body, summary, true)
    }

    /// The DataRow header that [`MaskPlan::mask_data_row_message`] writes before the body; its
    /// length is filled in once the body is complete.
    const HEADER: [u8; 5] = [b'D', 0, 0, 0, 0];

    fn rewrite_row(
        &self,
        body: &[u8],
        summary: &mut MaskSummary,
        framed: bool,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        let mut r = Reader::new(body, "DataRow");
        let count = r.i16()?;
        if count < 0 {
            return Err(MaskError::malformed("DataRow", "negative field count"));
        }
        let count = count as usize;
        if !self.blind && count != self.columns.len() {
            return Err(MaskError::ColumnCount {
                expected: self.columns.len(),
                got: count,
            });
        }
        let mut out: Option<Vec<u8>> = None;
        for i in 0..count {
            let start = r.pos();
            let value = r.value()?;
            let outcome = match value {
                None => Outcome::Unchanged,
                Some(v) => {
                    if self.blind {
                        self.rules.inner.scan_value(Repr::Opaque, v, summary)?
                    } else {
                        self.columns[i].mask(&self.rules, v, summary)?
                    }
                }
            };
            match outcome {
                Outcome::Unchanged => {
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(&body[start..r.pos()]);
                    }
                }
                changed => {
                    let o = out.get_or_insert_with(|| {
                        let mut o = Vec::with_capacity(Self::HEADER.len() + body.len() + 64);
                        if framed {
                            o.extend_from_slice(&Self::HEADER);
                        }
                        o.extend_from_slice(&body[..start]);
                        o
                    });
                    match changed {
                        Outcome::Bytes(b) => put_value(o, Some(&b))?,
                        _ => put_value(o, None)?,
                    }
                }
            }
        }
        r.finish()?;
        if framed && let Some(o) = out.as_mut() {
            let len = i32::try_from(o.len() - 1)
                .map_err(|_| MaskError::malformed("DataRow", "masked row too long"))?;
            o[1..5].copy_from_slice(&len.to_be_bytes());
        }
        Ok(out)
    }

    /// Number of columns (0 for a plan without RowDescription).
    pub fn column_count(&self) -> usize {
        self.columns.len()
    }
}
