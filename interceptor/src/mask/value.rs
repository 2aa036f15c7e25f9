//! Masking one value, type-aware: the output stays decodable by a client that trusts the
//! column's type and format, or becomes SQL NULL (the documented safe fallback) when no
//! type-correct masked form exists.

use super::MaskError;
use super::detect::Span;
use super::rules::Inner;
use super::strategy::{Rendered, Shape, Strategy, StrategyKind, format_preserving_digits};
use super::summary::{MaskSummary, MaskTarget};
use super::wire::Format;

/// Redaction token of column rules.
pub(crate) const COLUMN_TOKEN: &str = "[REDACTED]";

/// How a value is represented on the wire, which decides how it may be rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repr {
    /// Text the client takes as a string: rewritten in place.
    Text,
    /// JSON text (json in either format, jsonb in text format).
    Json,
    /// Binary jsonb: a version byte (1) then JSON text.
    JsonbBinary,
    /// A number in text format: only digit-for-digit output keeps it a number.
    Number,
    /// A binary integer of this many bytes: detectors read its decimal form.
    BinaryInt(usize),
    /// Anything else (dates, uuids, binary arrays, bytea, unknown binary types): no masked form
    /// is type-correct, so a masked value becomes NULL.
    Opaque,
    /// bytea in text format (`\x` + hex): detectors read the decoded bytes.
    ByteaHex,
}

/// First OID of user-defined types (enums, domains, citext, ...).
const FIRST_USER_OID: u32 = 16384;

impl Repr {
    pub(crate) fn of(type_oid: u32, format: Format) -> Repr {
        match (format, type_oid) {
            // text, varchar, bpchar, name, unknown, xml, and 0 (type not known)
            (Format::Text, 0 | 25 | 1043 | 1042 | 19 | 705 | 142 | 18) => Repr::Text,
            // arrays of text-like types and records: tokens carry no array/record syntax
            (Format::Text, 1009 | 1015 | 1014 | 1003 | 2249 | 2287 | 199 | 3807) => Repr::Text,
            (Format::Text, 114 | 3802) => Repr::Json,
            (Format::Text, 20 | 21 | 23 | 26 | 700 | 701 | 1700 | 790) => Repr::Number,
            (Format::Text, oid) if oid >= FIRST_USER_OID => Repr::Text,
            (Format::Text, 17) => Repr::ByteaHex,
            (Format::Text, _) => Repr::Opaque,
            (Format::Binary, 25 | 1043 | 1042 | 19 | 705 | 142) => Repr::Text,
            (Format::Binary, 114) => Repr::Json,
            (Format::Binary, 3802) => Repr::JsonbBinary,
            (Format::Binary, 21) => Repr::BinaryInt(2),
            (Format::Binary, 23) => Repr::BinaryInt(4),
            (Format::Binary, 20) => Repr::BinaryInt(8),
            (Format::Binary, _) => Repr::Opaque,
        }
    }
}

/// The result of masking one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Unchanged,
    Null,
    Bytes(Vec<u8>),
}

const JSONB_VERSION: u8 = 1;

/// The shape of a whole value, inferred only for strategies that use it (per masked cell).
fn shape_for(strategy: &Strategy, value: &[u8]) -> Shape {
    if strategy.uses_shape() {
        Shape::infer(value)
    } else {
        Shape::Generic
    }
}

impl Inner {
    /// Apply a column rule's strategy to a whole value.
    pub(crate) fn mask_whole(
        &self,
        strategy: &Strategy,
        target: &MaskTarget,
        repr: Repr,
        value: &[u8],
        summary: &mut MaskSummary,
    ) -> Outcome {
        let key = self.key.as_ref();
        let (outcome, applied) = match repr {
            Repr::Text => {
                let r = strategy.render(value, shape_for(strategy, value), key, COLUMN_TOKEN, true);
                (rendered(r), strategy.kind())
            }
            Repr::Json => (self.whole_json(strategy, value), strategy.kind()),
            Repr::JsonbBinary => match value.split_first() {
                Some((&JSONB_VERSION, json)) => match self.whole_json(strategy, json) {
                    Outcome::Bytes(b) => {
                        let mut out = Vec::with_capacity(b.len() + 1);
                        out.push(JSONB_VERSION);
                        out.extend_from_slice(&b);
                        (Outcome::Bytes(out), strategy.kind())
                    }
                    other => (other, strategy.kind()),
                },
                _ => (Outcome::Null, StrategyKind::Null),
            },
            Repr::Number if strategy.kind() == StrategyKind::FormatPreserving => (
                Outcome::Bytes(format_preserving_digits(value, key)),
                StrategyKind::FormatPreserving,
            ),
            Repr::Number | Repr::BinaryInt(_) | Repr::Opaque | Repr::ByteaHex => {
                (Outcome::Null, StrategyKind::Null)
            }
        };
        summary.record(target, applied, 1);
        outcome
    }

    fn whole_json(&self, strategy: &Strategy, json: &[u8]) -> Outcome {
        let key = self.key.as_ref();
        if strategy.kind() == StrategyKind::FormatPreserving && is_json_number(json) {
            return Outcome::Bytes(format_preserving_digits(json, key));
        }
        // A simple JSON string is masked by its content; anything else as its text.
        let inner = match json {
            [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => inner,
            _ => json,
        };
        match strategy.render(inner, shape_for(strategy, inner), key, COLUMN_TOKEN, true) {
            Rendered::Null => Outcome::Null,
            Rendered::Bytes(b) => {
                let mut out = Vec::with_capacity(b.len() + 2);
                out.push(b'"');
                json_escape_into(&b, &mut out);
                out.push(b'"');
                Outcome::Bytes(out)
            }
        }
    }

    /// Run the content detectors over a value.
    pub(crate) fn scan_value(
        &self,
        repr: Repr,
        value: &[u8],
        summary: &mut MaskSummary,
    ) -> Result<Outcome, MaskError> {
        let Some(scanner) = &self.scanner else {
            return Ok(Outcome::Unchanged);
        };
        match repr {
            Repr::Text => Ok(match scanner.scan(value) {
                None => Outcome::Unchanged,
                Some(spans) => self.render_spans(value, &spans, false, true, summary),
            }),
            Repr::Json => Ok(match scanner.scan(value) {
                None => Outcome::Unchanged,
                Some(spans) => self.render_spans(value, &spans, true, true, summary),
            }),
            Repr::JsonbBinary => {
                let Some((&JSONB_VERSION, json)) = value.split_first() else {
                    return Err(MaskError::malformed("DataRow", "unknown jsonb version"));
                };
                Ok(match scanner.scan(json) {
                    None => Outcome::Unchanged,
                    Some(spans) => match self.render_spans(json, &spans, true, true, summary) {
                        Outcome::Bytes(b) => {
                            let mut out = Vec::with_capacity(b.len() + 1);
                            out.push(JSONB_VERSION);
                            out.extend_from_slice(&b);
                            Outcome::Bytes(out)
                        }
                        other => other,
                    },
                })
            }
            Repr::Number => Ok(match scanner.scan(value) {
                None => Outcome::Unchanged,
                Some(spans) => {
                    let all_fpe = spans.iter().all(|s| {
                        scanner.detectors[s.detector].strategy.kind()
                            == StrategyKind::FormatPreserving
                    });
                    if all_fpe {
                        self.render_spans(value, &spans, false, true, summary)
                    } else {
                        self.record_null(&spans, summary);
                        Outcome::Null
                    }
                }
            }),
            Repr::BinaryInt(width) => {
                let mut buf = [0u8; 24];
                let text = decimal(value, width, &mut buf)?;
                Ok(match scanner.scan(text) {
                    None => Outcome::Unchanged,
                    Some(spans) => {
                        self.record_null(&spans, summary);
                        Outcome::Null
                    }
                })
            }
            Repr::ByteaHex => {
                let decoded = match value.strip_prefix(b"\\x") {
                    Some(hex_digits) => hex::decode(hex_digits).map_err(|_| {
                        MaskError::malformed("DataRow", "bytea value is not valid hex")
                    })?,
                    // The legacy escape output format: its printable bytes are as they are.
                    None => value.to_vec(),
                };
                Ok(match scanner.scan(&decoded) {
                    None => Outcome::Unchanged,
                    Some(spans) => {
                        self.record_null(&spans, summary);
                        Outcome::Null
                    }
                })
            }
            Repr::Opaque => Ok(match scanner.scan(value) {
                None => Outcome::Unchanged,
                Some(spans) => {
                    self.record_null(&spans, summary);
                    Outcome::Null
                }
            }),
        }
    }

    fn record_null(&self, spans: &[Span], summary: &mut MaskSummary) {
        if let Some(scanner) = &self.scanner {
            for s in spans {
                summary.record(&scanner.detectors[s.detector].target, StrategyKind::Null, 1);
            }
        }
    }

    /// Replace detector hits inside a value. `json`: the value is JSON text, so replacements
    /// inside strings are escaped and those outside strings stay valid JSON values.
    /// `nullable`: a NULL strategy may turn the whole value into SQL NULL.
    pub(crate) fn render_spans(
        &self,
        value: &[u8],
        spans: &[Span],
        json: bool,
        nullable: bool,
        summary: &mut MaskSummary,
    ) -> Outcome {
        let Some(scanner) = &self.scanner else {
            return Outcome::Unchanged;
        };
        let key = self.key.as_ref();
        let mut out = Vec::with_capacity(value.len() + 16);
        let mut cursor = 0;
        let mut js = JsonState::default();
        for span in spans {
            let Some(det) = scanner.detectors.get(span.detector) else {
                continue;
            };
            let (s, e) = (span.start, span.end);
            let piece = &value[s..e];
            let nullable_here = nullable && !json;
            let r = det
                .strategy
                .render(piece, det.shape(piece), key, &det.token, nullable_here);
            summary.record(&det.target, det.strategy.kind(), 1);
            out.extend_from_slice(&value[cursor..s]);
            if json {
                js.advance(&value[cursor..s]);
            }
            match r {
                Rendered::Null => {
                    // Only reachable when the whole value may become NULL.
                    for rest in spans.iter().filter(|x| x.start > s) {
                        if let Some(d) = scanner.detectors.get(rest.detector) {
                            summary.record(&d.target, d.strategy.kind(), 1);
                        }
                    }
                    return Outcome::Null;
                }
                Rendered::Bytes(b) => {
                    if !json {
                        out.extend_from_slice(&b);
                    } else if js.in_string {
                        json_escape_into(&b, &mut out);
                    } else if det.strategy.kind() == StrategyKind::Null {
                        out.extend_from_slice(b"null");
                    } else if is_json_number(&b) {
                        out.extend_from_slice(&b);
                    } else {
                        out.push(b'"');
                        json_escape_into(&b, &mut out);
                        out.push(b'"');
                    }
                }
            }
            if json {
                js.advance(piece);
            }
            cursor = e;
        }
        out.extend_from_slice(&value[cursor..]);
        Outcome::Bytes(out)
    }
}

pub(crate) fn rendered(r: Rendered) -> Outcome {
    match r {
        Rendered::Null => Outcome::Null,
        Rendered::Bytes(b) => Outcome::Bytes(b),
    }
}

/// Whether a position of JSON text is inside a string literal.
#[derive(Default)]
struct JsonState {
    in_string: bool,
    escaped: bool,
}

impl JsonState {
    fn advance(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
            } else if b == b'"' {
                self.in_string = true;
            }
        }
    }
}

fn is_json_number(b: &[u8]) -> bool {
    !b.is_empty()
        && b.iter().any(u8::is_ascii_digit)
        && b.iter()
            .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'))
        && b.first().is_some_and(|c| c.is_ascii_digit() || *c == b'-')
}

pub(crate) fn json_escape_into(b: &[u8], out: &mut Vec<u8>) {
    for &c in b {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            c if c < 0x20 => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            c => out.push(c),
        }
    }
}

/// Decimal text of a big-endian binary integer, written into `buf`.
fn decimal<'b>(value: &[u8], width: usize, buf: &'b mut [u8; 24]) -> Result<&'b [u8], MaskError> {
    let n: i64 = match (width, value.len()) {
        (2, 2) => i64::from(i16::from_be_bytes([value[0], value[1]])),
        (4, 4) => i64::from(i32::from_be_bytes([value[0], value[1], value[2], value[3]])),
        (8, 8) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(value);
            i64::from_be_bytes(a)
        }
        _ => {
            return Err(MaskError::malformed(
                "DataRow",
                "binary integer of wrong size",
            ));
        }
    };
    let mut pos = buf.len();
    let mut m = n.unsigned_abs();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if n < 0 {
        pos -= 1;
        buf[pos] = b'-';
    }
    Ok(&buf[pos..])
}
