//! Who a tab's connection is from: the one place the client's address is
//! decided. Per-address limits, the log's `client` field and the
//! `X-Forwarded-For` sent upstream all read it from here.
//!
//! Today the client is the TCP peer. Behind a load balancer (PROTOCOL.md,
//! "Behind a load balancer") it will be the address a PROXY protocol header
//! or a trusted proxy's `X-Forwarded-For` reports; only this type changes.

use std::net::{IpAddr, SocketAddr};

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

    /// The address per-address limits count against.
    pub fn ip(&self) -> IpAddr {
        self.peer.ip()
    }
}
