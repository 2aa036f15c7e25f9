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
pub(crate) enum DetectorKind {
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
            r"(?-u)[A-Za-z0-9._%+_-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
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
        DetectorKind::Ssn => &[(r"(?-u)[0-9]{3}-[0-9]{2}-[0-9]{4}", Finder::Ssn)],
        DetectorKind::Iban => &[(r"(?-u)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}", Finder::Iban)],
        DetectorKind::Ip => &[
            (
                r"(?-u)(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])",
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
                r"(?-u)(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}",
                Finder::AwsKeyId,
            ),
            (
                r#"(?-u)(?i:aws_?secret_?access_?key)["']?\s*[:=]\s*["']?([A-Za-z0-9/+=]{40})"#,
                Finder::Group1,
            ),
        ],
        DetectorKind::Jwt => &[(
            r"(?-u)eyJ[A-Za-z0-9_-]{2,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*",
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

    fn strength(&self, detector: usize) -> u8 {
        self.detectors
            .get(detector)
            .map_or(0, |d| d.strategy.kind().strength())
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
        // Overlapping hits merge into one span (nothing of either survives), masked by the
        // detector with the stronger strategy.
        spans.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        let mut kept: Vec<Span> = Vec::with_capacity(spans.len());
        for s in spans {
            match kept.last_mut() {
                Some(k) if s.start < k.end => {
                    k.end = k.end.max(s.end);
                    if self.strength(s.detector) > self.strength(k.detector) {
                        k.detector = s.detector;
                    }
                }
                _ => kept.push(s),
            }
        }
        Some(kept)
    }
}

fn find(entry: &Entry, hay: &[u8], spans: &mut Vec<Span>) {
    let d = entry.detector;
    let push = |spans: &mut Vec<Span>, start: usize, end: usize| {
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
                push(spans, g.start(), g.end());
            }
        }
        return;
    }
    if let Finder::Card = entry.finder {
        // The regex only finds where a run starts; the whole run of digit groups is searched
        // for cards, so a failed first window cannot hide a card later in the same run.
        let mut pos = 0;
        while let Some(m) = entry.regex.find_at(hay, pos) {
            let end = digit_run_end(hay, m.start()).max(m.end());
            card_windows(hay, m.start(), end, &mut |a, b| push(spans, a, b));
            pos = end;
        }
        return;
    }
    // A rejected candidate may overlap a real one: the search resumes right after its start.
    let mut pos = 0;
    while let Some(m) = entry.regex.find_at(hay, pos) {
        let (s, e) = (m.start(), m.end());
        let found_before = spans.len();
        match entry.finder {
            Finder::Card => {}
            Finder::Email | Finder::Jwt | Finder::Custom => push(spans, s, e),
            // Boundaries are checked here rather than with `\b`, which would miss values
            // glued to `_` or letters (`key_AKIA...`, `id123-45-6789`, `host10.0.0.1`).
            Finder::AwsKeyId => {
                if !upper_or_digit_at(hay, s.wrapping_sub(1)) && !upper_or_digit_at(hay, e) {
                    push(spans, s, e);
                }
            }
            Finder::PhoneIntl => {
                // The greedy match may run into a following number: back off to the last
                // digit-group end that leaves a plausible length.
                let mut digits = 0;
                let mut best = None;
                for i in s..e {
                    if hay[i].is_ascii_digit() {
                        digits += 1;
                        if !digit_at(hay, i + 1) && (8..=15).contains(&digits) {
                            best = Some(i + 1);
                        }
                    }
                }
                if let Some(end) = best {
                    push(spans, s, end);
                }
            }
            Finder::PhoneNanp => {
                let before_ok = !digit_at(hay, s.wrapping_sub(1));
                if before_ok && !digit_at(hay, e) {
                    push(spans, s, e);
                }
            }
            Finder::Ssn => {
                let glued = |i: usize| digit_at(hay, i) || hay.get(i) == Some(&b'-');
                if !glued(s.wrapping_sub(1)) && !glued(e) && ssn_valid(&hay[s..e]) {
                    push(spans, s, e);
                }
            }
            Finder::Iban => {
                if !upper_or_digit_at(hay, s.wrapping_sub(1))
                    && let Some(end) = iban_window(hay, s, e)
                {
                    push(spans, s, end);
                }
            }
            Finder::Ipv4 => {
                let before = s > 0 && (hay[s - 1] == b'.' || hay[s - 1].is_ascii_digit());
                let after = digit_at(hay, e) || (hay.get(e) == Some(&b'.') && digit_at(hay, e + 1));
                if !before && !after {
                    push(spans, s, e);
                }
            }
            Finder::Ipv6 => {
                if ipv6_valid(hay, s, e) {
                    push(spans, s, e);
                }
            }
            Finder::PemBlock => push(spans, s, pem_end(hay, e)),
            Finder::Group1 => {}
        }
        pos = match spans.last() {
            Some(last) if spans.len() > found_before => last.end.max(s + 1),
            _ => s + 1,
        };
    }
}

/// `i` may be `usize::MAX` (before the start): then false.
fn digit_at(hay: &[u8], i: usize) -> bool {
    hay.get(i).is_some_and(u8::is_ascii_digit)
}

fn upper_or_digit_at(hay: &[u8], i: usize) -> bool {
    hay.get(i)
        .is_some_and(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// End of the run of digit groups (joined by single spaces or dashes) starting at `s`.
fn digit_run_end(hay: &[u8], s: usize) -> usize {
    let mut i = s;
    loop {
        while digit_at(hay, i) {
            i += 1;
        }
        if matches!(hay.get(i), Some(b' ' | b'-')) && digit_at(hay, i + 1) {
            i += 1;
        } else {
            return i;
        }
    }
}

/// `s..e` is a run of digit groups. Cards are searched among windows that start and end on
/// group boundaries (so `cvv 123 4111 1111 1111 1111` and `4111 1111 1111 1111 12/29` still
/// yield the card), never splitting a group of digits.
fn card_windows(hay: &[u8], s: usize, e: usize, push: &mut impl FnMut(usize, usize)) {
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
    // A group cut by the bounds belongs to a longer number: not a card boundary.
    let first = usize::from(s > 0 && hay[s - 1].is_ascii_digit());
    let last = if digit_at(hay, e) {
        groups.len().saturating_sub(1)
    } else {
        groups.len()
    };
    let mut g = first;
    let mut digits: Vec<u8> = Vec::with_capacity(19);
    while g < last {
        // Window ends with 13-19 digits, longest first.
        let mut ends: Vec<usize> = Vec::new();
        let mut count = 0;
        for (end, &(a, b)) in groups.iter().enumerate().take(last).skip(g) {
            // Printed cards group digits by 3-6; runs of 1-2 digit groups are lists, not cards.
            if b - a < 3 {
                break;
            }
            count += b - a;
            if count > 19 {
                break;
            }
            if count >= 13 {
                ends.push(end);
            }
        }
        let found = ends.into_iter().rev().find(|&end| {
            digits.clear();
            for &(a, b) in &groups[g..=end] {
                digits.extend(hay[a..b].iter().map(|d| d - b'0'));
            }
            let network = digits.first().is_some_and(|d| (2..=6).contains(d));
            network && luhn_valid(&digits)
        });
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
        let boundary = !upper_or_digit_at(hay, end);
        if compact.len() <= 34 && boundary && iban_remainder(&compact) == 1 {
            return Some(end);
        }
        compact.pop();
    }
    None
}

fn ipv6_valid(hay: &[u8], s: usize, e: usize) -> bool {
    let hex_at = |i: usize| hay.get(i).is_some_and(u8::is_ascii_hexdigit);
    // The candidate must not be cut out of a longer hex token; a colon next to it is
    // punctuation unless more hex groups follow it.
    let colon_group = |colon: usize, beyond: usize| hay.get(colon) == Some(&b':') && hex_at(beyond);
    let before_ok =
        s == 0 || !(hex_at(s - 1) || hay[s - 1] == b'.' || colon_group(s - 1, s.wrapping_sub(2)));
    let after_ok = !(hex_at(e) || colon_group(e, e + 1));
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
