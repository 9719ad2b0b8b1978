//! Who a tab's connection is from: the one place the client's address is
//! decided (docs/protocol.md, "Behind a load balancer"). Per-address limits, the
//! log's `client` field and the `X-Forwarded-For` sent upstream all read it
//! from here.
//!
//! - The **peer** is the TCP peer, or, with `server.proxy_protocol`, the
//!   source address of the connection's PROXY header: the hop that is
//!   appended to `X-Forwarded-For` upstream, as every proxy does.
//! - The **client** is the peer, unless the peer is one of
//!   `server.trusted_proxies`: then it is the rightmost address of the
//!   request's `X-Forwarded-For` that is not itself trusted (a chain of
//!   trusted proxies is walked back; an entry that is not an address stops
//!   the walk, and the last trusted hop is the client).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// A connection's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The hop that connected to tabmux (appended to `X-Forwarded-For`).
    pub peer: SocketAddr,
    /// The client, as far as trusted proxies tell.
    ip: IpAddr,
}

impl Client {
    /// A client connected straight to tabmux (or through a PROXY header,
    /// whose source is `peer`).
    pub fn direct(peer: SocketAddr) -> Client {
        Client {
            peer,
            ip: peer.ip(),
        }
    }

    /// Whether the peer is one of `trusted`: then who the client is comes
    /// only with the request's `X-Forwarded-For`.
    pub fn peer_is_trusted(&self, trusted: &[IpNet]) -> bool {
        trusted
            .iter()
            .any(|net| net.contains(&canonical(self.peer.ip())))
    }

    /// The client behind `trusted` proxies, from the request's
    /// `X-Forwarded-For` (only when the peer is itself trusted).
    pub fn behind(self, trusted: &[IpNet], headers: &HeaderMap) -> Client {
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*ip)));
        if trusted.is_empty() || !is_trusted(&self.peer.ip()) {
            return self;
        }
        let mut ip = self.peer.ip();
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Some(hop) = parse_hop(hop) else { break };
            ip = hop;
            if !is_trusted(&hop) {
                break;
            }
        }
        Client {
            peer: self.peer,
            ip,
        }
    }

    /// The client's address, as logs show it.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// What per-address limits count against: the IPv4 address, or the
    /// IPv6 /64 network (one subscriber's usual allocation: counting single
    /// IPv6 addresses would give every client 2^64 budgets).
    pub fn limit_key(&self) -> IpAddr {
        match canonical(self.ip) {
            IpAddr::V6(v6) => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(network))
            }
            v4 => v4,
        }
    }
}

/// An IPv4 address mapped into IPv6 is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`192.0.2.1:5000`, `[2001:db8::1]:5000`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
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

    fn behind(peer: &str, trusted: &[&str], xff: &[&str]) -> String {
        let trusted: Vec<IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        let mut headers = HeaderMap::new();
        for v in xff {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        let client = Client::direct(peer.parse().unwrap()).behind(&trusted, &headers);
        assert_eq!(client.peer, peer.parse().unwrap(), "the peer stays");
        client.ip().to_string()
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let lb = ["10.0.0.0/8"];
        assert_eq!(behind("10.0.0.5:1", &lb, &["192.0.2.1"]), "192.0.2.1");
        // A chain of trusted hops is walked back.
        assert_eq!(
            behind("10.0.0.5:1", &lb, &["198.51.100.7, 192.0.2.1, 10.9.9.9"]),
            "192.0.2.1"
        );
        // Several headers are one list.
        assert_eq!(
            behind("10.0.0.5:1", &lb, &["203.0.113.1", "10.1.1.1"]),
            "203.0.113.1"
        );
        // An untrusted peer is not believed.
        assert_eq!(behind("192.0.2.99:1", &lb, &["203.0.113.1"]), "192.0.2.99");
        // No header, or only trusted hops: the last trusted hop.
        assert_eq!(behind("10.0.0.5:1", &lb, &[]), "10.0.0.5");
        assert_eq!(behind("10.0.0.5:1", &lb, &["10.2.2.2"]), "10.2.2.2");
        // Garbage stops the walk.
        assert_eq!(
            behind("10.0.0.5:1", &lb, &["203.0.113.1, junk"]),
            "10.0.0.5"
        );
        // Ports are allowed.
        assert_eq!(
            behind("10.0.0.5:1", &lb, &["[2001:db8::1]:443"]),
            "2001:db8::1"
        );
    }
}
