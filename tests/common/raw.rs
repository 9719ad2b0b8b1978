//! Tabs spoken by hand, byte by byte: raw handshakes (with a PROXY
//! protocol header in front, if wanted) and raw frames.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::guard;

/// Opens a tab by hand and returns the raw socket after the 101.
pub async fn raw_tab(addr: SocketAddr, session: &str) -> TcpStream {
    handshake(TcpStream::connect(addr).await.unwrap(), session).await
}

/// A tab's opening handshake on `s`, checked for its 101.
pub async fn handshake(mut s: TcpStream, session: &str) -> TcpStream {
    let head = opening(&mut s, b"", session, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Sends `prefix` (a PROXY protocol header, say), then a tab's opening
/// handshake with `headers` (whole lines, each ending in CRLF) added;
/// returns the answer's head, or "" if the connection closed without one.
pub async fn opening(s: &mut TcpStream, prefix: &[u8], session: &str, headers: &str) -> String {
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Cookie: sessionid={session}\r\n{headers}\r\n"
    );
    let mut out = prefix.to_vec();
    out.extend_from_slice(req.as_bytes());
    // The proxy may close before reading it all (a refused PROXY header).
    let _ = s.write_all(&out).await;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match guard("an answer", s.read_exact(&mut byte)).await {
            Ok(_) => head.push(byte[0]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A client frame: masked (unless `masked` is false), with the given opcode.
pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n < 65536 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads server frames until a close frame; returns its code.
pub async fn read_close(s: &mut TcpStream) -> u16 {
    let payload = read_until(s, 0x8, "a close frame").await;
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Reads server frames until a close frame, and returns its code; None if
/// the connection ends first (a proxy that gave up waiting for a tab that
/// does not read may reset the connection, and a reset discards what was
/// not read yet).
pub async fn close_or_reset(s: &mut TcpStream) -> Option<u16> {
    guard("a close frame or the end", async {
        loop {
            let (opcode, payload) = next_frame(s).await.ok()?;
            if opcode == 0x8 {
                return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
    })
    .await
}

/// Reads server frames until one with `opcode`; returns its payload.
pub async fn read_until(s: &mut TcpStream, opcode: u8, what: &str) -> Vec<u8> {
    guard(what, async {
        loop {
            let (op, payload) = next_frame(s)
                .await
                .expect("connection ended before the frame");
            if op == opcode {
                return payload;
            }
        }
    })
    .await
}

/// The next frame from the server (unmasked): its opcode and payload.
async fn next_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await?;
    let len = match h[1] & 0x7f {
        126 => u64::from(s.read_u16().await?),
        127 => s.read_u64().await?,
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await?;
    Ok((h[0] & 0x0f, payload))
}
