//! Glob patterns for names in policy files: `*` matches any run of characters (including
//! none), `?` exactly one; everything else matches itself. Matching is case-sensitive, as
//! names are already folded the way PostgreSQL folds them.

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct Glob(String);

impl Glob {
    pub(crate) fn new(pattern: impl Into<String>) -> Result<Glob, String> {
        let pattern = pattern.into();
        if pattern.is_empty() {
            return Err("empty pattern".to_owned());
        }
        Ok(Glob(pattern))
    }

    /// True when the pattern has no wildcard and equals `other` (used by the linter).
    pub(crate) fn is_literal(&self) -> bool {
        !self.0.contains(['*', '?'])
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }

    /// Does this pattern match everything `other` matches? Conservative: only decides the
    /// easy cases (`*`, equal patterns, literal `other`), returns false otherwise.
    pub(crate) fn covers(&self, other: &Glob) -> bool {
        self.0 == "*" || self.0 == other.0 || (other.is_literal() && self.matches(&other.0))
    }
}

/// Iterative wildcard matching with single backtracking point (linear-ish, no recursion).
fn glob_match(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Glob::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn matching() {
        assert!(g("public.*").matches("public.users"));
        assert!(!g("public.*").matches("secret.users"));
        assert!(g("*").matches(""));
        assert!(g("a*b*c").matches("axxbyyc"));
        assert!(!g("a*b*c").matches("axxbyy"));
        assert!(g("svc-?").matches("svc-1"));
        assert!(!g("svc-?").matches("svc-12"));
        assert!(g("/usr/bin/python3*").matches("/usr/bin/python3.11"));
    }

    #[test]
    fn covering() {
        assert!(g("*").covers(&g("public.*")));
        assert!(g("public.*").covers(&g("public.users")));
        assert!(!g("public.users").covers(&g("public.*")));
        assert!(Glob::new("").is_err());
    }
}
