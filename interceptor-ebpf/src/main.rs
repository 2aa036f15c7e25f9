//! Kernel programs of interceptor.
//!
//! * `ic_steer` (sk_lookup, one network namespace): every new TCP connection to a protected port is
//!   assigned to interceptor's listener from `IC_SOCKETS` (index 0 IPv4, 1 IPv6). No listener means
//!   the connection is dropped (the client sees a refusal): steering fails closed.
//! * `ic_connect4` / `ic_connect6` (cgroup sock_addr): record who connects (pid, uid, gid, comm,
//!   cgroup, netns, and the device and inode of the process's executable) under the socket
//!   cookie. The executable is read from `current->mm->exe_file` with member offsets user space
//!   took from the kernel's BTF (`IC_TASK_OFFSETS`): it is the program that called connect(),
//!   whatever the process execs or whoever holds the socket later.
//! * `ic_sock_ops` (cgroup sock_ops): when the client sends its SYN, re-key that record by the
//!   connection's 4-tuple so the accepting side can find it; remove it when the socket closes.
//!   (Not later, at ESTABLISHED: with TCP Fast Open the server may accept the connection as soon
//!   as the SYN arrives, before the client has processed the SYN-ACK.)
//!   It also turns interceptor's own upstream sockets (cookies user space put in `IC_EXEMPT_CK`)
//!   into 4-tuple exemptions for `ic_steer`.
//!
//! The map layouts and constants come from `interceptor-common`, which user space uses too.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_ktime_get_boot_ns,
        },
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use interceptor_common::{
    CNT_DROPPED, CNT_EXEMPTED, CNT_IDENTIFIED, CNT_RECORDED, CNT_SLOTS, CNT_STEERED, CONN_EXE,
    ConnInfo, FlowKey, OFF_FILE_INODE, OFF_INODE_INO, OFF_INODE_SB, OFF_MM_EXE_FILE, OFF_SB_DEV,
    OFF_SLOTS, OFF_TASK_COMM, OFF_TASK_GROUP_LEADER, OFF_TASK_MM, OFF_VALID, PORT_IDENTIFY,
    PORT_STEER, SLOT_V4, SLOT_V6,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
/// The loopback device has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const TCP_CLOSE: u32 = 7;

// Map names must match `interceptor_common::names` (user space opens them by name).
#[map(name = "IC_SOCKETS")]
static IC_SOCKETS: SockMap = SockMap::pinned(2, 0);

#[map(name = "IC_PORTS")]
static IC_PORTS: HashMap<u16, u8> = HashMap::pinned(64, 0);

#[map(name = "IC_CONNECTS")]
static IC_CONNECTS: LruHashMap<u64, ConnInfo> = LruHashMap::pinned(65536, 0);

#[map(name = "IC_FLOWS")]
static IC_FLOWS: LruHashMap<FlowKey, ConnInfo> = LruHashMap::pinned(65536, 0);

#[map(name = "IC_EXEMPT_CK")]
static IC_EXEMPT_CK: HashMap<u64, u8> = HashMap::pinned(4096, 0);

#[map(name = "IC_EXEMPT_FL")]
static IC_EXEMPT_FL: HashMap<FlowKey, u64> = HashMap::pinned(4096, 0);

#[map(name = "IC_COUNTERS")]
static IC_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(CNT_SLOTS, 0);

/// Kernel structure member offsets, set by user space at load time (see `OFF_*`). All zero: the
/// executable is not recorded.
#[unsafe(no_mangle)]
static IC_TASK_OFFSETS: [u32; OFF_SLOTS] = [0; OFF_SLOTS];

#[inline(always)]
fn offset(i: usize) -> usize {
    // Volatile: the value is patched into the object after compilation.
    unsafe { core::ptr::read_volatile(&IC_TASK_OFFSETS[i]) as usize }
}

#[inline(always)]
unsafe fn read_at<T>(base: *const u8, off: usize) -> Option<T> {
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off).cast::<T>()) }.ok()
}

/// The current process's executable (device, inode) and its thread group leader's comm.
#[inline(always)]
fn current_exe() -> Option<(u32, u64, [u8; 16])> {
    if offset(OFF_VALID) == 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    unsafe {
        let leader: *const u8 = read_at(task, offset(OFF_TASK_GROUP_LEADER))?;
        let comm: [u8; 16] = read_at(leader, offset(OFF_TASK_COMM))?;
        let mm: *const u8 = read_at(task, offset(OFF_TASK_MM))?;
        if mm.is_null() {
            return None;
        }
        let file: *const u8 = read_at(mm, offset(OFF_MM_EXE_FILE))?;
        if file.is_null() {
            return None;
        }
        let inode: *const u8 = read_at(file, offset(OFF_FILE_INODE))?;
        if inode.is_null() {
            return None;
        }
        let ino: u64 = read_at(inode, offset(OFF_INODE_INO))?;
        let sb: *const u8 = read_at(inode, offset(OFF_INODE_SB))?;
        if sb.is_null() {
            return None;
        }
        let dev: u32 = read_at(sb, offset(OFF_SB_DEV))?;
        Some((dev, ino, comm))
    }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = IC_COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn port_flags(port: u16) -> u8 {
    unsafe { IC_PORTS.get(&port) }.copied().unwrap_or(0)
}

/// `::ffff:a.b.c.d` for an IPv4 address in network byte order.
#[inline(always)]
fn mapped(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
}

// Context fields are read one u32 at a time: the verifier rejects wider loads of these arrays.
#[inline(always)]
unsafe fn read4(p: *const [u32; 4]) -> [u32; 4] {
    let p = p.cast::<u32>();
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Steering
// ---------------------------------------------------------------------------------------------

#[sk_lookup]
pub fn ic_steer(ctx: SkLookupContext) -> u32 {
    steer(&ctx)
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    let (protocol, family, local_port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port) };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let port = local_port as u16;
    if port_flags(port) & PORT_STEER == 0 {
        return SK_PASS;
    }
    let (src, dst) = unsafe {
        if family == AF_INET6 {
            (read4(&(*l).remote_ip6), read4(&(*l).local_ip6))
        } else {
            (mapped((*l).remote_ip4), mapped((*l).local_ip4))
        }
    };
    let key = FlowKey {
        netns: 0,
        src,
        dst,
        sport: u16::from_be(unsafe { (*l).remote_port }),
        dport: port,
        pad: 0,
    };
    // interceptor's own upstream connection: only ever over loopback, and only for a 4-tuple the
    // sock_ops program derived from a socket cookie that user space registered.
    let ifindex = unsafe { (*l).ingress_ifindex };
    if ifindex == LOOPBACK_IFINDEX && unsafe { IC_EXEMPT_FL.get(&key) }.is_some() {
        count(CNT_EXEMPTED);
        return SK_PASS;
    }
    let index = if family == AF_INET6 { SLOT_V6 } else { SLOT_V4 };
    match IC_SOCKETS.redirect_sk_lookup(ctx, index, 0) {
        Ok(()) => {
            count(CNT_STEERED);
            SK_PASS
        }
        Err(_) => {
            count(CNT_DROPPED);
            warn!(
                ctx,
                "no interceptor listener: dropped connection to port {}", port
            );
            SK_DROP
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Identity: connect()
// ---------------------------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn ic_connect4(ctx: SockAddrContext) -> i32 {
    record_connect(&ctx, false);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn ic_connect6(ctx: SockAddrContext) -> i32 {
    record_connect(&ctx, true);
    1
}

#[inline(always)]
fn record_connect(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    if unsafe { (*sa).protocol } != IPPROTO_TCP {
        return;
    }
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if port_flags(port) & (PORT_STEER | PORT_IDENTIFY) == 0 {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if unsafe { IC_EXEMPT_CK.get(&cookie) }.is_some() {
        return;
    }
    let dst = unsafe {
        if v6 {
            read4(&(*sa).user_ip6)
        } else {
            mapped((*sa).user_ip4)
        }
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let (flags, exe_dev, exe_ino, comm) = match current_exe() {
        Some((dev, ino, comm)) => (CONN_EXE, dev, ino, comm),
        None => (0, 0, 0, bpf_get_current_comm().unwrap_or([0u8; 16])),
    };
    let info = ConnInfo {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        dst,
        dport: port,
        family: if v6 { AF_INET6 as u16 } else { AF_INET as u16 },
        flags,
        comm,
        exe_ino,
        exe_dev,
        pad: 0,
    };
    if IC_CONNECTS.insert(&cookie, &info, 0).is_ok() {
        count(CNT_RECORDED);
    }
}

// ---------------------------------------------------------------------------------------------
// Identity and exemptions: TCP state
// ---------------------------------------------------------------------------------------------

#[sock_ops]
pub fn ic_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == TCP_CLOSE {
                on_close(&ctx);
            }
        }
        _ => {}
    }
    1
}

/// The connection's 4-tuple from the client side (this socket).
#[inline(always)]
fn client_tuple(ctx: &SockOpsContext, netns: u64) -> FlowKey {
    let o = ctx.ops;
    let (src, dst) = unsafe {
        if (*o).family == AF_INET6 {
            (read4(&(*o).local_ip6), read4(&(*o).remote_ip6))
        } else {
            (mapped((*o).local_ip4), mapped((*o).remote_ip4))
        }
    };
    FlowKey {
        netns,
        src,
        dst,
        sport: ctx.local_port() as u16,
        // remote_port holds the network-order port in its upper half on little endian.
        dport: u32::from_be(ctx.remote_port()) as u16,
        pad: 0,
    }
}

/// Runs in tcp_connect(), just before the SYN leaves: the source address and port are chosen by
/// now (tcp_connect runs after inet_hash_connect), so the 4-tuple is final.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let exempt = unsafe { IC_EXEMPT_CK.get(&cookie) }.is_some();
    let recorded = unsafe { IC_CONNECTS.get(&cookie) }.copied();
    if !exempt && recorded.is_none() {
        return;
    }
    if exempt {
        let key = client_tuple(ctx, 0);
        let _ = IC_EXEMPT_FL.insert(&key, &cookie, 0);
    }
    if let Some(info) = recorded {
        // Before the SYN is sent, so the record is there whenever the server accepts.
        let key = client_tuple(ctx, info.netns_cookie);
        if IC_FLOWS.insert(&key, &info, 0).is_ok() {
            count(CNT_IDENTIFIED);
        }
    }
    // Ask for state callbacks so the entries go away with the socket.
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(info) = (unsafe { IC_CONNECTS.get(&cookie) }).copied() {
        let key = client_tuple(ctx, info.netns_cookie);
        let _ = IC_FLOWS.remove(&key);
        let _ = IC_CONNECTS.remove(&cookie);
    }
    if unsafe { IC_EXEMPT_CK.get(&cookie) }.is_some() {
        let key = client_tuple(ctx, 0);
        let _ = IC_EXEMPT_FL.remove(&key);
        let _ = IC_EXEMPT_CK.remove(&cookie);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
