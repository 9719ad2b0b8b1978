//! The PROXY protocol header (v1 text, v2 binary) a load balancer puts in
//! front of each connection (`server.proxy_protocol`): its source address
//! is the client's (docs/protocol.md, "Behind a load balancer").
//!
//! The header is framed here, so that not one byte past it is read (what
//! follows is the client's TLS or HTTP), and parsed and checked by the
//! `ppp` crate. A connection whose first bytes are not a valid header is
//! closed without an answer.

use std::net::SocketAddr;

use ppp::v1::Addresses as V1;
use ppp::v2::{Addresses as V2, Command};
use ppp::HeaderResult;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// The most address and TLV bytes taken after a v2 header's first 16
/// (haproxy sends well under this).
const V2_MAX_TAIL: usize = 4096;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("a PROXY protocol header longer than allowed")]
    TooLong,
    #[error("an invalid PROXY protocol header: {0}")]
    Invalid(String),
    #[error("the connection ended in its PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header at the start of `io`; the client's address, or None
/// for a header without one (v2 `LOCAL`, a load balancer's health check;
/// `UNKNOWN`; a UNIX socket): the connection's own peer is then the client.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
) -> Result<Option<SocketAddr>, HeaderError> {
    let mut header = vec![0u8; 12];
    io.read_exact(&mut header).await?;
    if header[..] == V2_SIGNATURE {
        header.resize(16, 0);
        io.read_exact(&mut header[12..]).await?;
        let tail = usize::from(u16::from_be_bytes([header[14], header[15]]));
        if tail > V2_MAX_TAIL {
            return Err(HeaderError::TooLong);
        }
        header.resize(16 + tail, 0);
        io.read_exact(&mut header[16..]).await?;
    } else if header.starts_with(b"PROXY ") {
        // Byte by byte: the header's end is its CRLF, and the request that
        // follows must not be read here.
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX {
                return Err(HeaderError::TooLong);
            }
            header.push(io.read_u8().await?);
        }
    } else {
        return Err(HeaderError::Missing);
    }
    source(&header)
}

/// The source address of a whole header.
fn source(header: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            V1::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            V1::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            V1::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) if h.command == Command::Local => Ok(None),
        HeaderResult::V2(Ok(h)) => Ok(match h.addresses {
            V2::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            V2::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            V2::Unspecified | V2::Unix(_) => None,
        }),
        HeaderResult::V1(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let mut io = bytes;
        let result = read_header(&mut io).await;
        (result, io.to_vec())
    }

    #[tokio::test]
    async fn v1_gives_the_source_and_leaves_the_request() {
        let (r, rest) = read(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\nGET / HTTP/1.1").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:5555".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1");
        let (r, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:5555".parse().unwrap()));
        let (r, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn v2_gives_the_source_and_local_gives_none() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12]); // PROXY, TCP over IPv4
        h.extend_from_slice(&[198, 51, 100, 9, 10, 0, 0, 1, 0x15, 0xb3, 0x01, 0xbb]);
        h.extend_from_slice(b"GET");
        let (r, rest) = read(&h).await;
        assert_eq!(r.unwrap(), Some("198.51.100.9:5555".parse().unwrap()));
        assert_eq!(rest, b"GET");
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        let (r, _) = read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(matches!(r, Err(HeaderError::Missing)));
        let (r, _) = read(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n").await;
        assert!(matches!(r, Err(HeaderError::Invalid(_))), "{r:?}");
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read(long.as_bytes()).await.0,
            Err(HeaderError::TooLong)
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(read(&huge).await.0, Err(HeaderError::TooLong)));
        assert!(matches!(read(b"PROXY TC").await.0, Err(HeaderError::Io(_))));
    }
}
