//! Loading, attaching and reading the kernel programs of `interceptor-ebpf` (issue 5).
