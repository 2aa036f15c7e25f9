//! User-space side: `aya::Pod` and conversions to std's address types.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::string::String;

use crate::{ConnInfo, FlowKey};

// SAFETY: both are repr(C) with only integer fields, explicit padding and no implicit holes (the
// size assertions in lib.rs), so every bit pattern is valid.
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
    core::array::from_fn(|i| {
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
