//! Who a tab's connection is from: the one place the client's address is
//! decided. Per-address limits, the log's `client` field and the
//! `X-Forwarded-For` sent upstream all read it from here.
//!
//! Today the client is the TCP peer. Behind a load balancer (PROTOCOL.md,
//! "Behind a load balancer") it will be the address a PROXY protocol header
//! or a trusted proxy's `X-Forwarded-For` reports; only this type changes.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// A connection's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The peer that connected to tabmux (appended to `X-Forwarded-For`).
    pub peer: SocketAddr,
}

impl Client {
    /// A client connected straight to tabmux.
    pub fn direct(peer: SocketAddr) -> Client {
        Client { peer }
    }

    /// The client's address, as logs show it.
    pub fn ip(&self) -> IpAddr {
        self.peer.ip()
    }

    /// What per-address limits count against: the IPv4 address, or the
    /// IPv6 /64 network (one subscriber's usual allocation: counting single
    /// IPv6 addresses would give every client 2^64 budgets).
    pub fn limit_key(&self) -> IpAddr {
        match self.peer.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let network = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(Ipv6Addr::from(network))
                }
            },
            v4 => v4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str) -> String {
        Client::direct(addr.parse().unwrap())
            .limit_key()
            .to_string()
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_network() {
        assert_eq!(key("10.1.2.3:5"), "10.1.2.3");
        assert_eq!(key("[2001:db8:1:2:aaaa::1]:5"), "2001:db8:1:2::");
        assert_eq!(key("[2001:db8:1:2:bbbb::9]:5"), "2001:db8:1:2::");
        assert_eq!(key("[::ffff:10.1.2.3]:5"), "10.1.2.3");
    }
}
