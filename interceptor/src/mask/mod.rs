//! Inline masking of result values (issue 6).
