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
    /// `CONN_*` bits.
    pub flags: u32,
    /// The thread group leader's command name (io_uring workers and other threads report their
    /// process's name, not their own).
    pub comm: [u8; 16],
    /// The executable of the connecting process (`current->mm->exe_file`): its inode number and
    /// its filesystem's device in the kernel's internal encoding (major << 20 | minor). Only
    /// meaningful with `CONN_EXE` set.
    pub exe_ino: u64,
    pub exe_dev: u32,
    pub pad: u32,
}

/// `ConnInfo::flags`: the kernel read the executable's device and inode.
pub const CONN_EXE: u32 = 1;

/// Indexes into the `IC_TASK_OFFSETS` global of the eBPF object: byte offsets of the kernel
/// structure members the connect programs follow from the current task to its executable. Rust
/// eBPF programs have no CO-RE relocations, so user space reads them from the kernel's BTF
/// (`/sys/kernel/btf/vmlinux`) and sets the global before loading; `OFF_VALID` = 0 (the default)
/// leaves the executable unrecorded.
pub const OFF_VALID: usize = 0;
/// `task_struct.mm`
pub const OFF_TASK_MM: usize = 1;
/// `task_struct.group_leader`
pub const OFF_TASK_GROUP_LEADER: usize = 2;
/// `task_struct.comm`
pub const OFF_TASK_COMM: usize = 3;
/// `mm_struct.exe_file`
pub const OFF_MM_EXE_FILE: usize = 4;
/// `file.f_inode`
pub const OFF_FILE_INODE: usize = 5;
/// `inode.i_ino`
pub const OFF_INODE_INO: usize = 6;
/// `inode.i_sb`
pub const OFF_INODE_SB: usize = 7;
/// `super_block.s_dev`
pub const OFF_SB_DEV: usize = 8;
/// Length of `IC_TASK_OFFSETS`.
pub const OFF_SLOTS: usize = 9;
/// The global's symbol name.
pub const TASK_OFFSETS_SYMBOL: &str = "IC_TASK_OFFSETS";

// No implicit padding on either side (the `pad` fields are explicit), so every bit pattern is
// valid and the kernel and user-space views agree.
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 96);
