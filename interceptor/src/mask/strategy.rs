//! What a masked value becomes. Strategies work on bytes (values arrive in the client encoding;
//! masking assumes an ASCII-compatible one such as UTF-8) and never echo more of the original
//! than the strategy promises.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::MaskError;

/// The kind of a strategy, as configured and as reported in a [`super::MaskSummary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    Redact,
    Partial,
    Pseudonym,
    Null,
    FormatPreserving,
}

impl StrategyKind {
    /// The configured name (`redact`, `partial`, `pseudonym`, `null`, `format_preserving`).
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::Redact => "redact",
            StrategyKind::Partial => "partial",
            StrategyKind::Pseudonym => "pseudonym",
            StrategyKind::Null => "null",
            StrategyKind::FormatPreserving => "format_preserving",
        }
    }

    /// How little of the original survives; when several rules hit one value, the strongest
    /// wins so that adding a rule never reveals more.
    pub(crate) fn strength(self) -> u8 {
        match self {
            StrategyKind::Null => 5,
            StrategyKind::Redact => 4,
            StrategyKind::Pseudonym => 3,
            StrategyKind::FormatPreserving => 2,
            StrategyKind::Partial => 1,
        }
    }
}

/// A configured strategy with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Replace with a fixed token (`[REDACTED]` unless configured).
    Redact { replacement: Option<Arc<str>> },
    /// Keep the first/last N alphanumeric characters (or the email domain); the rest become `*`.
    Partial {
        keep_first: usize,
        keep_last: usize,
        keep_domain: bool,
    },
    /// `p_` + 16 hex digits of HMAC-SHA256(key, value): joinable, not reversible without the key.
    Pseudonym,
    /// SQL NULL where the context allows it, else the redaction token.
    Null,
    /// Same shape (character classes, separators, card length and Luhn validity, email `x@y`).
    FormatPreserving,
}

impl Strategy {
    /// Whether [`Strategy::render`] looks at the value's [`Shape`] (others need not infer it).
    pub(crate) fn uses_shape(&self) -> bool {
        matches!(self, Strategy::Pseudonym | Strategy::FormatPreserving)
    }

    pub(crate) fn kind(&self) -> StrategyKind {
        match self {
            Strategy::Redact { .. } => StrategyKind::Redact,
            Strategy::Partial { .. } => StrategyKind::Partial,
            Strategy::Pseudonym => StrategyKind::Pseudonym,
            Strategy::Null => StrategyKind::Null,
            Strategy::FormatPreserving => StrategyKind::FormatPreserving,
        }
    }
}

/// The HMAC key behind pseudonyms and keyed format-preserving output.
#[derive(Clone)]
pub(crate) struct MaskKey {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MaskKey(<redacted>)")
    }
}

impl MaskKey {
    pub(crate) const MIN_LEN: usize = 16;

    pub(crate) fn new(key: &[u8]) -> Result<MaskKey, MaskError> {
        if key.len() < Self::MIN_LEN {
            return Err(MaskError::Config(format!(
                "the masking key must be at least {} bytes",
                Self::MIN_LEN
            )));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key)
            .map_err(|_| MaskError::Config("unusable masking key".into()))?;
        Ok(MaskKey { mac })
    }

    /// HMAC over a length-prefixed domain label and the value, so outputs of different uses
    /// of the key never coincide.
    fn tag(&self, domain: &[u8], counter: u32, value: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(&(domain.len() as u32).to_be_bytes());
        mac.update(domain);
        mac.update(&counter.to_be_bytes());
        mac.update(value);
        mac.finalize().into_bytes().into()
    }
}

/// The shape of a value, which format-preserving and pseudonym output keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Card,
    Email,
    Ipv4,
    Iban,
    Generic,
}

impl Shape {
    /// Guess the shape of a whole column value.
    pub(crate) fn infer(value: &[u8]) -> Shape {
        if looks_like_email(value) {
            Shape::Email
        } else if looks_like_card(value) {
            Shape::Card
        } else {
            Shape::Generic
        }
    }
}

// Both checks run on every cell of a column rule that uses shapes: each starts with the
// test that rejects most values cheaply (memchr for `@`, the first byte for cards).
fn looks_like_email(v: &[u8]) -> bool {
    match memchr::memrchr(b'@', v) {
        Some(at) => {
            at > 0
                && memchr::memchr(b'.', &v[at + 1..]).is_some()
                && memchr::memchr(b' ', v).is_none()
        }
        None => false,
    }
}

fn looks_like_card(v: &[u8]) -> bool {
    if v.len() < 13 || !v.first().is_some_and(u8::is_ascii_digit) {
        return false;
    }
    let digits = v.iter().filter(|b| b.is_ascii_digit()).count();
    (13..=19).contains(&digits)
        && v.iter()
            .all(|b| b.is_ascii_digit() || *b == b' ' || *b == b'-')
}

/// A masked value: SQL NULL or new bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rendered {
    Null,
    Bytes(Vec<u8>),
}

impl Strategy {
    /// Render the masked form of `value`. `token` is the redaction token of the rule (used by
    /// `Redact` without replacement and wherever NULL is not possible); `nullable` says whether
    /// the context can carry SQL NULL.
    pub(crate) fn render(
        &self,
        value: &[u8],
        shape: Shape,
        key: Option<&MaskKey>,
        token: &str,
        nullable: bool,
    ) -> Rendered {
        match self {
            Strategy::Null if nullable => Rendered::Null,
            Strategy::Null => Rendered::Bytes(token.as_bytes().to_vec()),
            Strategy::Redact { replacement } => {
                Rendered::Bytes(replacement.as_deref().unwrap_or(token).as_bytes().to_vec())
            }
            Strategy::Partial {
                keep_first,
                keep_last,
                keep_domain,
            } => Rendered::Bytes(partial(value, *keep_first, *keep_last, *keep_domain)),
            Strategy::Pseudonym => match key {
                Some(key) => Rendered::Bytes(pseudonym(key, value, shape)),
                // Rules refuse to load without a key; keep failing closed regardless.
                None => Rendered::Bytes(token.as_bytes().to_vec()),
            },
            Strategy::FormatPreserving => Rendered::Bytes(format_preserving(value, shape, key)),
        }
    }
}

pub(crate) fn partial(value: &[u8], keep_first: usize, keep_last: usize, domain: bool) -> Vec<u8> {
    if domain && let Some(at) = value.iter().rposition(|b| *b == b'@') {
        let mut out = b"***".to_vec();
        out.extend_from_slice(&value[at..]);
        return out;
    }
    let text = String::from_utf8_lossy(value);
    let total = text.chars().filter(|c| c.is_alphanumeric()).count();
    // Keeping everything would reveal the value: then nothing is kept.
    let (first, last) = if keep_first.saturating_add(keep_last) >= total {
        (0, 0)
    } else {
        (keep_first, keep_last)
    };
    let mut out = String::with_capacity(value.len());
    let mut seen = 0;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if seen < first || seen >= total - last {
                out.push(c);
            } else {
                out.push('*');
            }
            seen += 1;
        } else {
            out.push(c);
        }
    }
    out.into_bytes()
}

const EMAIL_PSEUDONYM_DOMAIN: &[u8] = b"@pseudonym.invalid";

fn pseudonym(key: &MaskKey, value: &[u8], shape: Shape) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let tag = key.tag(b"pseudonym", 0, value);
    // Built in place: this runs once per masked cell.
    let mut out = Vec::with_capacity(2 + 16 + EMAIL_PSEUDONYM_DOMAIN.len());
    out.extend_from_slice(b"p_");
    for b in &tag[..8] {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0x0f)]);
    }
    if shape == Shape::Email {
        out.extend_from_slice(EMAIL_PSEUDONYM_DOMAIN);
    }
    out
}

/// Pseudo-random bytes derived from the key and the value (all zero without a key, so unkeyed
/// output is a constant pattern that carries nothing of the original).
struct Keystream<'a> {
    key: Option<&'a MaskKey>,
    value: &'a [u8],
    block: [u8; 32],
    used: usize,
    counter: u32,
}

impl<'a> Keystream<'a> {
    fn new(key: Option<&'a MaskKey>, value: &'a [u8]) -> Self {
        Keystream {
            key,
            value,
            block: [0; 32],
            used: 32,
            counter: 0,
        }
    }

    fn next(&mut self) -> u8 {
        let Some(key) = self.key else { return 0 };
        if self.used == self.block.len() {
            self.block = key.tag(b"format-preserving", self.counter, self.value);
            self.counter = self.counter.wrapping_add(1);
            self.used = 0;
        }
        let b = self.block[self.used];
        self.used += 1;
        b
    }

    fn digit(&mut self) -> u8 {
        b'0' + self.next() % 10
    }

    /// Same character class: digit, lower, upper; other ASCII is kept; anything else is `x`.
    fn same_class(&mut self, b: u8) -> u8 {
        match b {
            b'0'..=b'9' => self.digit(),
            b'a'..=b'z' => b'a' + self.next() % 26,
            b'A'..=b'Z' => b'A' + self.next() % 26,
            _ => b,
        }
    }
}

pub(crate) fn format_preserving(value: &[u8], shape: Shape, key: Option<&MaskKey>) -> Vec<u8> {
    let mut ks = Keystream::new(key, value);
    match shape {
        Shape::Card if looks_like_card(value) => fpe_card(value, &mut ks),
        Shape::Email if looks_like_email(value) => fpe_email(value, &mut ks),
        Shape::Ipv4 => {
            if key.is_some() {
                format!("{}.{}.{}.{}", ks.next(), ks.next(), ks.next(), ks.next()).into_bytes()
            } else {
                // TEST-NET-1: valid, and obviously not a real peer.
                b"192.0.2.0".to_vec()
            }
        }
        Shape::Iban => fpe_iban(value, &mut ks),
        _ => fpe_generic(value, &mut ks),
    }
}

fn fpe_generic(value: &[u8], ks: &mut Keystream<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for chunk in value.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_ascii() {
                out.push(ks.same_class(c as u8));
            } else {
                out.push(b'x');
            }
        }
        out.extend(std::iter::repeat_n(b'x', chunk.invalid().len()));
    }
    out
}

/// Digits only (signs, points and exponents kept): a number stays a number.
pub(crate) fn format_preserving_digits(value: &[u8], key: Option<&MaskKey>) -> Vec<u8> {
    let mut ks = Keystream::new(key, value);
    value
        .iter()
        .map(|b| if b.is_ascii_digit() { ks.digit() } else { *b })
        .collect()
}

/// Same length and separators, first digit (the card network) kept, Luhn-valid.
fn fpe_card(value: &[u8], ks: &mut Keystream<'_>) -> Vec<u8> {
    let mut out = value.to_vec();
    let positions: Vec<usize> = (0..out.len())
        .filter(|i| out[*i].is_ascii_digit())
        .collect();
    let Some((&last, middle)) = positions.split_last() else {
        return out;
    };
    for &i in middle.iter().skip(1) {
        out[i] = ks.digit();
    }
    let payload: Vec<u8> = middle.iter().map(|&i| out[i] - b'0').collect();
    out[last] = b'0' + luhn_check_digit(&payload);
    out
}

fn fpe_email(value: &[u8], ks: &mut Keystream<'_>) -> Vec<u8> {
    let Some(at) = value.iter().rposition(|b| *b == b'@') else {
        return fpe_generic(value, ks);
    };
    let mut out = fpe_generic(&value[..at], ks);
    out.push(b'@');
    let domain = &value[at + 1..];
    // The top-level domain is kept so the output still looks like a routable address.
    let tld_start = domain.iter().rposition(|b| *b == b'.').unwrap_or(0);
    out.extend(fpe_generic(&domain[..tld_start], ks));
    out.extend_from_slice(&domain[tld_start..]);
    out
}

/// Country kept, BBAN replaced class by class, check digits recomputed (mod-97 valid).
fn fpe_iban(value: &[u8], ks: &mut Keystream<'_>) -> Vec<u8> {
    let mut out = value.to_vec();
    let positions: Vec<usize> = (0..out.len())
        .filter(|i| out[*i].is_ascii_alphanumeric())
        .collect();
    if positions.len() < 5 {
        return fpe_generic(value, ks);
    }
    for &i in &positions[4..] {
        out[i] = ks.same_class(out[i].to_ascii_uppercase());
    }
    out[positions[2]] = b'0';
    out[positions[3]] = b'0';
    let compact: Vec<u8> = positions.iter().map(|&i| out[i]).collect();
    let rem = iban_remainder(&compact);
    let check = 98u32.saturating_sub(rem) % 100;
    out[positions[2]] = b'0' + (check / 10) as u8;
    out[positions[3]] = b'0' + (check % 10) as u8;
    out
}

/// Luhn validity of a digit sequence (values 0-9).
pub(crate) fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn luhn_check_digit(payload: &[u8]) -> u8 {
    let mut sum = 0u32;
    for (i, d) in payload.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    ((10 - sum % 10) % 10) as u8
}

/// ISO 13616 remainder of a compact IBAN (alphanumeric, any case): valid when it is 1.
pub(crate) fn iban_remainder(compact: &[u8]) -> u32 {
    let mut rem = 0u32;
    let rotated = compact.iter().skip(4).chain(compact.iter().take(4));
    for b in rotated {
        let b = b.to_ascii_uppercase();
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return u32::MAX,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem
}
