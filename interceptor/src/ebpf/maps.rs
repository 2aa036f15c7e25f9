//! User-space mirrors of the map layouts in `interceptor-ebpf/src/main.rs`, and their names.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Map names as declared in the eBPF object (also their pin file names).
pub const SOCKETS: &str = "IC_SOCKETS";
pub const PORTS: &str = "IC_PORTS";
pub const CONNECTS: &str = "IC_CONNECTS";
pub const FLOWS: &str = "IC_FLOWS";
pub const EXEMPT_COOKIES: &str = "IC_EXEMPT_CK";
pub const EXEMPT_FLOWS: &str = "IC_EXEMPT_FL";
pub const COUNTERS: &str = "IC_COUNTERS";
/// Maps pinned under `<pin_dir>/maps`, in a stable order.
pub const PINNED_MAPS: [&str; 7] = [
    SOCKETS,
    PORTS,
    CONNECTS,
    FLOWS,
    EXEMPT_COOKIES,
    EXEMPT_FLOWS,
    COUNTERS,
];

/// `IC_SOCKETS` slots.
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

/// A TCP connection seen from the client; see the eBPF side for the field conventions.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub netns: u64,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub pad: u32,
}

/// What the kernel recorded at connect() time.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub boot_ns: u64,
    pub dst: [u32; 4],
    pub dport: u16,
    pub family: u16,
    pub pad: u32,
    pub comm: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<FlowKey>() == 48);
const _: () = assert!(std::mem::size_of::<ConnInfo>() == 80);

// SAFETY: both are repr(C) with only integer fields, explicit padding and no implicit holes
// (the size assertions above match the eBPF side), so every bit pattern is valid.
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for ConnInfo {}

/// An address as the kernel programs store it: IPv6, with IPv4 as `::ffff:a.b.c.d`.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    // The programs keep network byte order; as native words that is the bytes as they are.
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub fn words_addr(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

impl FlowKey {
    /// The key of a connection from `client` to `server` (the accepting side's peer and local
    /// addresses), in network namespace `netns`.
    pub fn new(netns: u64, client: SocketAddr, server: SocketAddr) -> FlowKey {
        FlowKey {
            netns,
            src: addr_words(client.ip()),
            dst: addr_words(server.ip()),
            sport: client.port(),
            dport: server.port(),
            pad: 0,
        }
    }
}

impl ConnInfo {
    /// The task's command name (up to 15 bytes, NUL-terminated in the kernel).
    pub fn comm(&self) -> String {
        let end = self
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.comm.len());
        String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }

    pub fn destination(&self) -> SocketAddr {
        SocketAddr::new(words_addr(self.dst), self.dport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_mapped_v6_give_the_same_key() {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let s: SocketAddr = "127.0.0.2:5432".parse().unwrap();
        assert_eq!(FlowKey::new(7, a, s), FlowKey::new(7, b, s));
        assert_ne!(FlowKey::new(7, a, s), FlowKey::new(8, a, s));
    }

    #[test]
    fn words_are_network_order_in_memory() {
        let w = addr_words("10.1.2.3".parse().unwrap());
        assert_eq!(w[3].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(words_addr(w), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        assert_eq!(words_addr(addr_words(v6)), v6);
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut info: ConnInfo = unsafe { std::mem::zeroed() };
        info.comm[..4].copy_from_slice(b"psql");
        assert_eq!(info.comm(), "psql");
    }
}
