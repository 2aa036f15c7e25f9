//! One client connection: startup, authentication, upstream login and the relay loop.
