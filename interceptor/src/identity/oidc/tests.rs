//! OIDC verifier tests.
