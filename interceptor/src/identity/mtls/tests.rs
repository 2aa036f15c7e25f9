//! mTLS tests.
