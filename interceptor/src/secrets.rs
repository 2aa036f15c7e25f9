//! Upstream role passwords, read from a private file or the environment.
