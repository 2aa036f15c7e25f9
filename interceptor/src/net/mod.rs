//! Listeners, TLS and PostgreSQL wire framing.
