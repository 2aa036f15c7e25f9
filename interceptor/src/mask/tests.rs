//! Unit tests of the masking engine.
