//! Errors from loading policy files. Display is `file:line:col: message` so editors and CI
//! logs point at the offending spot.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl PolicyError {
    /// An error at byte `offset` of `text` (the file's contents).
    pub fn at(path: &Path, text: &str, offset: usize, message: impl Into<String>) -> PolicyError {
        let (line, column) = line_col(text, offset);
        PolicyError::Invalid {
            path: path.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> PolicyError {
        PolicyError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// The toml parser's error, positioned.
    pub fn from_toml(path: &Path, text: &str, err: &toml::de::Error) -> PolicyError {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        // The message's first line is enough; toml's Display repeats the source snippet.
        PolicyError::at(path, text, offset, err.message().trim())
    }
}

/// 1-based line and column (in characters) of byte `offset`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("abc\ndef", 5), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
    }
}
