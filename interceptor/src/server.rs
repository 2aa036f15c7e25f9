//! The daemon: listeners, shared state and the accept loop.
