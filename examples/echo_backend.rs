//! A trivial WebSocket echo server: the upstream behind tabmux in the
//! Autobahn conformance run (`.ci/autobahn`).
//!
//! Usage: `cargo run --release --example echo_backend -- 127.0.0.1:9002`

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9002".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("echo backend on ws://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let config = WebSocketConfig::default()
                .max_message_size(Some(64 << 20))
                .max_frame_size(Some(64 << 20));
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                    break;
                }
            }
        });
    }
}
