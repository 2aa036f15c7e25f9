//! Content detectors: find sensitive substrings in text values (and in derived expressions such
//! as `lower(email)`, `row_to_json(t)`, `t::text`, `string_agg`, which no column rule sees).
//!
//! Speed: one `RegexSet` over every detector's pattern is the prefilter; a value it does not
//! match costs one DFA pass and no allocation. Only the patterns that matched run again to
//! locate spans, which validators (Luhn, mod-97, SSN ranges, IPv6 parsing) then confirm.

use std::sync::Arc;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::Deserialize;

use super::MaskError;
use super::strategy::{Shape, Strategy, iban_remainder, luhn_valid};
use super::summary::MaskTarget;

/// The built-in detectors (`custom` is a named regex from the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// Payment card numbers: 13-19 digits, optional single space/dash separators, Luhn-valid.
    Card,
    Email,
    /// International `+CC ...` numbers (8-15 digits) and separated North American numbers.
    Phone,
    /// US social security numbers `AAA-GG-SSSS` with valid ranges.
    Ssn,
    /// IBANs (upper case, optional spaces) with a valid mod-97 checksum.
    Iban,
    /// IPv4 and IPv6 addresses.
    Ip,
    /// AWS access key ids and `aws_secret_access_key = ...` assignments.
    AwsKey,
    /// JSON Web Tokens (`eyJ...`.`eyJ...`.sig).
    Jwt,
    /// PEM private-key blocks, up to their END line (or the end of the value if truncated).
    PrivateKey,
    /// The token after `Bearer `.
    BearerToken,
    Custom,
}

impl DetectorKind {
    pub(crate) const BUILTIN: [DetectorKind; 10] = [
        DetectorKind::Card,
        DetectorKind::Email,
        DetectorKind::Phone,
        DetectorKind::Ssn,
        DetectorKind::Iban,
        DetectorKind::Ip,
        DetectorKind::AwsKey,
        DetectorKind::Jwt,
        DetectorKind::PrivateKey,
        DetectorKind::BearerToken,
    ];
    pub(crate) const SECRETS: [DetectorKind; 4] = [
        DetectorKind::AwsKey,
        DetectorKind::Jwt,
        DetectorKind::PrivateKey,
        DetectorKind::BearerToken,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            DetectorKind::Card => "card",
            DetectorKind::Email => "email",
            DetectorKind::Phone => "phone",
            DetectorKind::Ssn => "ssn",
            DetectorKind::Iban => "iban",
            DetectorKind::Ip => "ip",
            DetectorKind::AwsKey => "aws_key",
            DetectorKind::Jwt => "jwt",
            DetectorKind::PrivateKey => "private_key",
            DetectorKind::BearerToken => "bearer_token",
            DetectorKind::Custom => "custom",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<DetectorKind> {
        DetectorKind::BUILTIN.into_iter().find(|k| k.name() == name)
    }

    fn shape(self) -> Shape {
        match self {
            DetectorKind::Card => Shape::Card,
            DetectorKind::Email => Shape::Email,
            DetectorKind::Iban => Shape::Iban,
            _ => Shape::Generic,
        }
    }
}

/// One active detector with its strategy.
#[derive(Debug)]
pub(crate) struct Detector {
    pub kind: DetectorKind,
    pub target: MaskTarget,
    pub strategy: Strategy,
    /// Redaction token, `[REDACTED:<name>]`.
    pub token: Arc<str>,
    /// The pattern of a custom detector.
    pub custom: Option<String>,
}

impl Detector {
    pub(crate) fn shape(&self, span: &[u8]) -> Shape {
        match self.kind {
            DetectorKind::Ip if !span.contains(&b':') => Shape::Ipv4,
            DetectorKind::Custom => Shape::infer(span),
            kind => kind.shape(),
        }
    }
}

/// How a pattern's matches become spans.
#[derive(Debug, Clone, Copy)]
enum Finder {
    Card,
    Email,
    PhoneIntl,
    PhoneNanp,
    Ssn,
    Iban,
    Ipv4,
    Ipv6,
    AwsKeyId,
    /// The value is capture group 1 (`aws_secret_access_key = X`, `Bearer X`).
    Group1,
    Jwt,
    PemBlock,
    Custom,
}

fn builtin_patterns(kind: DetectorKind) -> &'static [(&'static str, Finder)] {
    match kind {
        // Card networks start with 2-6; excluding 0, 1 and 7-9 keeps epoch-millisecond
        // timestamps and most numeric ids out.
        DetectorKind::Card => &[(r"(?-u)[0-9](?:[ -]?[0-9]){12,18}", Finder::Card)],
        DetectorKind::Email => &[(
            r"(?-u)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
            Finder::Email,
        )],
        DetectorKind::Phone => &[
            (
                r"(?-u)\+[0-9](?:[ .()-]{0,2}[0-9]){6,14}",
                Finder::PhoneIntl,
            ),
            (
                r"(?-u)(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .-])[0-9]{3}[ .-][0-9]{4}",
                Finder::PhoneNanp,
            ),
        ],
        DetectorKind::Ssn => &[(r"(?-u)\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", Finder::Ssn)],
        DetectorKind::Iban => &[(
            r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}",
            Finder::Iban,
        )],
        DetectorKind::Ip => &[
            (
                r"(?-u)\b(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\b",
                Finder::Ipv4,
            ),
            // Full form, or compressed with groups around `::` (so `x::text` casts and
            // times like 12:30:45 do not even pass the prefilter).
            (
                r"(?-u)(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5}|(?:[0-9A-Fa-f]{1,4}:){2,7}:|::[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){1,6}",
                Finder::Ipv6,
            ),
        ],
        DetectorKind::AwsKey => &[
            (
                r"(?-u)\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b",
                Finder::AwsKeyId,
            ),
            (
                r#"(?-u)(?i:aws_?secret_?access_?key)["']?\s*[:=]\s*["']?([A-Za-z0-9/+=]{40})"#,
                Finder::Group1,
            ),
        ],
        DetectorKind::Jwt => &[(
            r"(?-u)\beyJ[A-Za-z0-9_-]{2,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*",
            Finder::Jwt,
        )],
        DetectorKind::PrivateKey => &[(
            r"(?-u)-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----",
            Finder::PemBlock,
        )],
        DetectorKind::BearerToken => &[(
            r"(?-u)(?i:\bbearer)[ \t]+([A-Za-z0-9._~+/-]{8,}=*)",
            Finder::Group1,
        )],
        DetectorKind::Custom => &[],
    }
}

/// A located hit: bytes `start..end` of the value, found by detector `detector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: usize,
    pub end: usize,
    pub detector: usize,
}

struct Entry {
    regex: Regex,
    finder: Finder,
    detector: usize,
}

/// All active detectors behind one prefilter.
pub(crate) struct Scanner {
    set: RegexSet,
    entries: Vec<Entry>,
    pub detectors: Vec<Arc<Detector>>,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("detectors", &self.detectors)
            .finish_non_exhaustive()
    }
}

/// Bounds compiled regex size: rules come from files, and a huge pattern must not eat memory.
const REGEX_SIZE_LIMIT: usize = 8 << 20;

pub(crate) fn compile(pattern: &str) -> Result<Regex, MaskError> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| MaskError::Config(format!("invalid regex `{pattern}`: {e}")))
}

impl Scanner {
    /// `None` when there are no detectors.
    pub(crate) fn new(detectors: Vec<Arc<Detector>>) -> Result<Option<Scanner>, MaskError> {
        if detectors.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::new();
        let mut patterns = Vec::new();
        for (i, d) in detectors.iter().enumerate() {
            if let Some(p) = &d.custom {
                entries.push(Entry {
                    regex: compile(p)?,
                    finder: Finder::Custom,
                    detector: i,
                });
                patterns.push(p.clone());
            } else {
                for (p, finder) in builtin_patterns(d.kind) {
                    entries.push(Entry {
                        regex: compile(p)?,
                        finder: *finder,
                        detector: i,
                    });
                    patterns.push((*p).to_string());
                }
            }
        }
        let set = RegexSetBuilder::new(&patterns)
            .size_limit(REGEX_SIZE_LIMIT * 4)
            .build()
            .map_err(|e| MaskError::Config(format!("detectors do not compile together: {e}")))?;
        Ok(Some(Scanner {
            set,
            entries,
            detectors,
        }))
    }

    /// Non-overlapping hits in `hay`, sorted; `None` (and no allocation) when there are none.
    pub(crate) fn scan(&self, hay: &[u8]) -> Option<Vec<Span>> {
        if !self.set.is_match(hay) {
            return None;
        }
        let mut spans = Vec::new();
        for idx in self.set.matches(hay).iter() {
            let Some(entry) = self.entries.get(idx) else {
                continue;
            };
            find(entry, hay, &mut spans);
        }
        if spans.is_empty() {
            return None;
        }
        // Earliest first, longest first at equal start; drop what overlaps a kept span.
        spans.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        let mut kept: Vec<Span> = Vec::with_capacity(spans.len());
        for s in spans {
            if kept.last().is_none_or(|k| s.start >= k.end) {
                kept.push(s);
            }
        }
        Some(kept)
    }
}

fn find(entry: &Entry, hay: &[u8], spans: &mut Vec<Span>) {
    let d = entry.detector;
    let mut push = |start: usize, end: usize| {
        if start < end {
            spans.push(Span {
                start,
                end,
                detector: d,
            });
        }
    };
    if let Finder::Group1 = entry.finder {
        for caps in entry.regex.captures_iter(hay) {
            if let Some(g) = caps.get(1) {
                push(g.start(), g.end());
            }
        }
        return;
    }
    for m in entry.regex.find_iter(hay) {
        let (s, e) = (m.start(), m.end());
        match entry.finder {
            Finder::Card => card_windows(hay, s, e, &mut push),
            Finder::Email | Finder::AwsKeyId | Finder::Jwt | Finder::Custom => push(s, e),
            Finder::PhoneIntl => {
                let digits = hay[s..e].iter().filter(|b| b.is_ascii_digit()).count();
                if (8..=15).contains(&digits) && !digit_at(hay, e) {
                    push(s, e);
                }
            }
            Finder::PhoneNanp => {
                let before_ok = s == 0 || !hay[s - 1].is_ascii_alphanumeric();
                if before_ok && !digit_at(hay, e) {
                    push(s, e);
                }
            }
            Finder::Ssn => {
                if ssn_valid(&hay[s..e]) {
                    push(s, e);
                }
            }
            Finder::Iban => {
                if let Some(end) = iban_window(hay, s, e) {
                    push(s, end);
                }
            }
            Finder::Ipv4 => {
                let dotted_before = s > 0 && hay[s - 1] == b'.';
                let dotted_after = hay.get(e) == Some(&b'.') && digit_at(hay, e + 1);
                if !dotted_before && !dotted_after {
                    push(s, e);
                }
            }
            Finder::Ipv6 => {
                if ipv6_valid(hay, s, e) {
                    push(s, e);
                }
            }
            Finder::PemBlock => push(s, pem_end(hay, e)),
            Finder::Group1 => {}
        }
    }
}

fn digit_at(hay: &[u8], i: usize) -> bool {
    hay.get(i).is_some_and(u8::is_ascii_digit)
}

/// The candidate `s..e` is digits with optional single separators. Cards are searched among
/// windows that start and end on digit-group boundaries (so `CVV 123 4111 1111 1111 1111` and a
/// trailing `... 1111 123` still yield the card), never splitting a run of digits.
fn card_windows(hay: &[u8], s: usize, e: usize, push: &mut impl FnMut(usize, usize)) {
    // Digit groups: (start, end, digit count).
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut i = s;
    while i < e {
        if hay[i].is_ascii_digit() {
            let gs = i;
            while i < e && hay[i].is_ascii_digit() {
                i += 1;
            }
            groups.push((gs, i));
        } else {
            i += 1;
        }
    }
    // A group cut by the match bounds belongs to a longer number: not a card boundary.
    let first = usize::from(s > 0 && hay[s - 1].is_ascii_digit());
    let last = if digit_at(hay, e) {
        groups.len().saturating_sub(1)
    } else {
        groups.len()
    };
    let mut g = first;
    let mut digits: Vec<u8> = Vec::with_capacity(19);
    while g < last {
        let mut found = None;
        for end in (g..last).rev() {
            digits.clear();
            for &(a, b) in &groups[g..=end] {
                digits.extend(hay[a..b].iter().map(|d| d - b'0'));
            }
            let network = digits.first().is_some_and(|d| (2..=6).contains(d));
            if network && (13..=19).contains(&digits.len()) && luhn_valid(&digits) {
                found = Some(end);
                break;
            }
        }
        match found {
            Some(end) => {
                push(groups[g].0, groups[end].1);
                g = end + 1;
            }
            None => g += 1,
        }
    }
}

fn ssn_valid(v: &[u8]) -> bool {
    let (area, group, serial) = (&v[0..3], &v[4..6], &v[7..11]);
    area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000"
}

/// The longest prefix of `s..e` that is a mod-97 valid IBAN ending at a token boundary.
fn iban_window(hay: &[u8], s: usize, e: usize) -> Option<usize> {
    let positions: Vec<usize> = (s..e).filter(|i| hay[*i] != b' ').collect();
    let mut compact: Vec<u8> = positions.iter().map(|&i| hay[i]).collect();
    while compact.len() >= 15 {
        let end = positions[compact.len() - 1] + 1;
        let boundary = hay.get(end).is_none_or(|b| !b.is_ascii_alphanumeric());
        if compact.len() <= 34 && boundary && iban_remainder(&compact) == 1 {
            return Some(end);
        }
        compact.pop();
    }
    None
}

fn ipv6_valid(hay: &[u8], s: usize, e: usize) -> bool {
    let before_ok = s == 0
        || !matches!(hay[s - 1], b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' | b'_' | b':' | b'.');
    let after_ok = hay
        .get(e)
        .is_none_or(|b| !matches!(b, b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' | b'_' | b':'));
    let text = &hay[s..e];
    let groups = text.split(|b| *b == b':').filter(|g| !g.is_empty()).count();
    before_ok
        && after_ok
        && groups >= 3
        && std::str::from_utf8(text).is_ok_and(|t| t.parse::<std::net::Ipv6Addr>().is_ok())
}

/// End of a PEM block starting before `from`: after its END line, else before the first `"`
/// (a JSON string holding a truncated key), else the end of the value.
fn pem_end(hay: &[u8], from: usize) -> usize {
    let rest = &hay[from..];
    if let Some(pos) = memchr::memmem::find(rest, b"-----END ") {
        let after = from + pos + 9;
        if let Some(close) = memchr::memmem::find(&hay[after..], b"-----") {
            return after + close + 5;
        }
    }
    match memchr::memchr(b'"', rest) {
        Some(q) => from + q,
        None => hay.len(),
    }
}
