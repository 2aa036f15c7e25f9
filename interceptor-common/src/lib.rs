//! The eBPF map layouts and constants of interceptor, shared by the kernel programs
//! (`interceptor-ebpf`, `no_std`) and user space (`interceptor`, feature `user`), so that the two
//! sides cannot drift apart.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::{addr_words, words_addr};

/// Map names as declared in the eBPF object (also their pin file names). The kernel side has to
/// spell them as literals in `#[map(name = ...)]`; loading fails if they differ.
pub mod names {
    pub const SOCKETS: &str = "IC_SOCKETS";
    pub const PORTS: &str = "IC_PORTS";
    pub const CONNECTS: &str = "IC_CONNECTS";
    pub const FLOWS: &str = "IC_FLOWS";
    pub const EXEMPT_COOKIES: &str = "IC_EXEMPT_CK";
    pub const EXEMPT_FLOWS: &str = "IC_EXEMPT_FL";
    pub const COUNTERS: &str = "IC_COUNTERS";
}

/// `IC_SOCKETS` slots: interceptor's IPv4 and IPv6 listeners.
pub const SLOT_V4: u32 = 0;
pub const SLOT_V6: u32 = 1;

/// `IC_PORTS` value bits: steer the port to interceptor (sk_lookup) / record who connects to it.
pub const PORT_STEER: u8 = 1;
pub const PORT_IDENTIFY: u8 = 2;

/// `IC_COUNTERS` slots.
pub const CNT_STEERED: u32 = 0;
pub const CNT_DROPPED: u32 = 1;
pub const CNT_EXEMPTED: u32 = 2;
pub const CNT_RECORDED: u32 = 3;
pub const CNT_IDENTIFIED: u32 = 4;
/// Size of `IC_COUNTERS`.
pub const CNT_SLOTS: u32 = 8;

/// A TCP connection seen from the client: addresses are IPv6 or IPv4-mapped IPv6, in network byte
/// order; ports in host byte order. `netns` is the client's network namespace cookie (0 in
/// exemption keys).
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(Debug, PartialEq, Eq))]
pub struct FlowKey {
    pub netns: u64,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub pad: u32,
}

/// What the kernel knew about the connecting task at connect() time.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(Debug, PartialEq, Eq))]
pub struct ConnInfo {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// CLOCK_BOOTTIME of the connect(), to detect pid reuse against /proc/<pid>/stat.
    pub boot_ns: u64,
    pub dst: [u32; 4],
    pub dport: u16,
    pub family: u16,
    pub pad: u32,
    pub comm: [u8; 16],
}

// No implicit padding on either side (the `pad` fields are explicit), so every bit pattern is
// valid and the kernel and user-space views agree.
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 80);
