//! The `mqtt` scenario: a real broker (Debian's mosquitto, with a TCP
//! listener and a websockets one), browsers of 10 tabs each subscribed to
//! one topic (each tab with a client id of its own, as mqtt.js gives them),
//! and messages published from a TCP client at a fixed rate. Tabs connect
//! to the websockets listener directly, through nginx, or through tabmux's
//! `mqtt` route. Figures: what the broker holds and sends (its `$SYS`
//! counters), deliveries and their latency, the proxy's CPU per delivered
//! message.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::SinkExt;
use futures_util::StreamExt;
use http::HeaderValue;
use rumqttc::v5::mqttbytes::v5::{Connect, Filter, Packet, Publish, RetainForwardRule, Subscribe};
use rumqttc::v5::mqttbytes::QoS;
use tabmux::envelope::mqtt::codec::{self, Level, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::load::{Target, Ws};
use crate::procs::{self, Running};

const TOPIC: &str = "bench/ticks";

fn mosquitto() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Whether the broker can be run (the scenario is left out otherwise).
pub fn available() -> bool {
    mosquitto().is_some()
}

/// The running broker, pinned to `core`: its websockets listener is
/// `running.addr`, its TCP one `tcp`.
pub struct Broker {
    pub running: Running,
    pub tcp: SocketAddr,
    dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Broker {
    pub fn start(core: usize) -> anyhow::Result<Broker> {
        let (tcp, ws) = (procs::free_port(), procs::free_port());
        let dir = std::env::temp_dir().join(format!("tabmux-bench-mosquitto-{ws}"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings false\nallow_anonymous true\npersistence false\n\
                 sys_interval 1\nmax_queued_messages 100000\nlog_type error\n\
                 listener {tcp} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\n"
            ),
        )?;
        let exe = mosquitto().context("no mosquitto")?;
        let mut cmd = procs::command_pinned(core, &exe, &["-c".into(), conf.display().to_string()]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().context("cannot start mosquitto")?;
        let running = Running::new(child, SocketAddr::from(([127, 0, 0, 1], ws)))?;
        Ok(Broker {
            running,
            tcp: SocketAddr::from(([127, 0, 0, 1], tcp)),
            dir,
        })
    }

    /// A `$SYS` figure, fresh: read once the broker has published it again
    /// (every second: `sys_interval 1`).
    pub async fn stat(&self, name: &str) -> anyhow::Result<f64> {
        let mut c = TcpClient::connect(self.tcp, "bench-stats").await?;
        let topic = format!("$SYS/broker/{name}");
        c.send(&subscribe(1, &topic)).await?;
        let mut seen = 0;
        loop {
            match c.recv().await? {
                Packet::Publish(p) if p.topic == topic.as_bytes() => {
                    seen += 1;
                    // The first is the retained (maybe stale) value.
                    if seen == 2 {
                        let text = String::from_utf8_lossy(&p.payload);
                        return text.trim().parse().context("a number");
                    }
                }
                _ => {}
            }
        }
    }

    /// Waits (bounded) until the broker counts `n` clients connected.
    pub async fn wait_clients(&self, n: usize) -> anyhow::Result<f64> {
        for _ in 0..30 {
            // Its own stats client counts too.
            let connected = self.stat("clients/connected").await? - 1.0;
            if connected >= n as f64 {
                return Ok(connected);
            }
        }
        anyhow::bail!("the broker never counted {n} clients")
    }
}

fn subscribe(pkid: u16, filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        }],
        properties: None,
    })
}

fn connect(client_id: &str) -> Packet {
    Packet::Connect(
        Connect {
            keep_alive: 60,
            client_id: client_id.into(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    )
}

/// An MQTT 3.1.1 client over TCP (the publisher, and `$SYS` reads).
pub struct TcpClient {
    tcp: TcpStream,
    stream: Stream,
}

impl TcpClient {
    pub async fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<TcpClient> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut c = TcpClient {
            tcp,
            stream: Stream::default(),
        };
        c.send(&connect(id)).await?;
        anyhow::ensure!(matches!(c.recv().await?, Packet::ConnAck(_)), "no CONNACK");
        Ok(c)
    }

    pub async fn send(&mut self, p: &Packet) -> anyhow::Result<()> {
        self.tcp.write_all(&codec::write(Level::V4, p)).await?;
        Ok(())
    }

    pub async fn recv(&mut self) -> anyhow::Result<Packet> {
        let read = async {
            loop {
                if let Some(p) = self.stream.next(Level::V4, 1 << 20).ok().flatten() {
                    return Ok(p);
                }
                let mut buf = [0u8; 4096];
                let n = self.tcp.read(&mut buf).await?;
                anyhow::ensure!(n > 0, "the broker closed");
                self.stream.push(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .context("no packet from the broker")?
    }

    /// Publishes one message, stamped with the time.
    pub async fn publish(&mut self) -> anyhow::Result<()> {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: Bytes::from_static(TOPIC.as_bytes()),
            pkid: 0,
            payload: Bytes::from(format!("ts:{}", crate::unix_ns())),
            properties: None,
        });
        self.send(&p).await
    }
}

/// The route tabmux serves the scenario on.
pub fn route(broker: SocketAddr) -> String {
    format!(
        "[[route]]\npath = \"/mqtt\"\nupstream = \"ws://{broker}/mqtt\"\nsession_cookie = \"sid\"\n\
         allowed_origins = [\"http://bench.local\"]\nenvelope = \"mqtt\"\n"
    )
}

/// One tab of browser `session`: connected (3.1.1, a client id of its
/// own) and subscribed to the topic.
async fn tab(target: &Target, session: usize, n: usize) -> anyhow::Result<Ws> {
    let url = format!("ws://{}/mqtt", target.addr);
    let mut req = url.into_client_request()?;
    let headers = req.headers_mut();
    headers.insert("cookie", HeaderValue::from_str(&format!("sid=s{session}"))?);
    headers.insert("origin", HeaderValue::from_static("http://bench.local"));
    headers.insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    let tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn crate::load::Io> = Box::new(tcp);
    let (mut ws, _) = tokio_tungstenite::client_async(req, io).await?;
    let send = |p: &Packet| Message::Binary(codec::write(Level::V4, p));
    ws.send(send(&connect(&format!("tab-{session}-{n}"))))
        .await?;
    ws.send(send(&subscribe(1, TOPIC))).await?;
    // CONNACK, then SUBACK (each in a message of its own).
    let mut answered = 0;
    while answered < 2 {
        match ws.next().await {
            Some(Ok(Message::Binary(_))) => answered += 1,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed before SUBACK"),
        }
    }
    Ok(ws)
}

/// The stamp in a PUBLISH's payload (`ts:<unix ns>`).
pub fn stamp(text: &str) -> Option<u64> {
    crate::load::stamp_after(text, "ts:")
}

/// `sessions` browsers of `per_session` tabs, subscribed.
pub async fn tabs(target: &Target, sessions: usize, per_session: usize) -> anyhow::Result<Vec<Ws>> {
    crate::load::browsers(sessions, per_session, |session, n| tab(target, session, n)).await
}

/// Publishes at `rate` a second for `secs` from a TCP client; how many.
pub async fn publish_for(broker: &Broker, rate: u32, secs: u64) -> anyhow::Result<u64> {
    let publisher =
        tokio::sync::Mutex::new(TcpClient::connect(broker.tcp, "bench-publisher").await?);
    crate::load::at_rate(rate, secs, || async {
        publisher.lock().await.publish().await
    })
    .await
}
