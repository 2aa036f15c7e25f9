//! The map layouts, names and constants of the kernel programs, from `interceptor-common` (the
//! crate `interceptor-ebpf` builds against too), plus what only user space needs.

pub use interceptor_common::names::{
    CONNECTS, COUNTERS, EXEMPT_COOKIES, EXEMPT_FLOWS, FLOWS, PORTS, SOCKETS,
};
pub use interceptor_common::{
    CNT_DROPPED, CNT_EXEMPTED, CNT_IDENTIFIED, CNT_RECORDED, CNT_STEERED, ConnInfo, FlowKey,
    PORT_IDENTIFY, PORT_STEER, SLOT_V4, SLOT_V6, addr_words, words_addr,
};

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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

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
