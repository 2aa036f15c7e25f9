//! Server-side SCRAM-SHA-256 (RFC 5802/7677) for client authentication.
