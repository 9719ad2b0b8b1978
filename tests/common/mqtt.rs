//! A real MQTT broker for the tests (Debian's mosquitto, started by the test
//! on free loopback ports with a generated configuration: a plain TCP
//! listener, which mosquitto needs beside a websockets one, and the
//! websockets listener tabmux dials), an MQTT client over TCP for
//! publishing from outside, and MQTT tabs over WebSocket through tabmux.
//!
//! What the broker did is read from its own log (`log_type all`, on its
//! standard error, read as it comes): the connections it accepted and the
//! packets it sent and received, by client id.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, Filter, LastWill, Login, Packet, PubAck, Publish,
    RetainForwardRule, Subscribe, SubscribeProperties, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;
use tabmux::envelope::mqtt::codec::{self, Level, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::{guard, Tab, TabSpec, TestProxy};

/// A running mosquitto; dropping it stops it.
pub struct Broker {
    child: Child,
    dir: PathBuf,
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    /// Its log so far (its standard error, read by a thread), and a
    /// notice for each line.
    log: Arc<Mutex<String>>,
    line: Arc<Notify>,
}

/// How the broker is started.
#[derive(Default, Clone)]
pub struct BrokerSpec {
    /// Users and passwords (then anonymous clients are refused).
    pub users: Vec<(String, String)>,
    /// Extra configuration lines.
    pub extra: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    pub async fn start() -> Broker {
        Broker::start_with(BrokerSpec::default()).await
    }

    pub async fn start_with(spec: BrokerSpec) -> Broker {
        let dir = std::env::temp_dir().join(format!(
            "tabmux-mosquitto-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (tcp, ws) = (free_port(), free_port());
        let mut conf = format!(
            "user root\nper_listener_settings false\nlistener {tcp} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\n\
             log_dest stderr\nlog_type all\nconnection_messages true\npersistence false\n"
        );
        if spec.users.is_empty() {
            conf += "allow_anonymous true\n";
        } else {
            let passwd = dir.join("passwd");
            for (i, (user, pass)) in spec.users.iter().enumerate() {
                let mut cmd = Command::new("mosquitto_passwd");
                if i == 0 {
                    cmd.arg("-c");
                }
                let ok = cmd
                    .arg("-b")
                    .arg(&passwd)
                    .arg(user)
                    .arg(pass)
                    .status()
                    .expect("mosquitto_passwd (Debian's mosquitto)");
                assert!(ok.success());
            }
            conf += &format!(
                "allow_anonymous false\npassword_file {}\n",
                passwd.display()
            );
        }
        for line in &spec.extra {
            conf += line;
            conf += "\n";
        }
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            // Its log, unbuffered there.
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto (`.ci/run` installs Debian's mosquitto)");
        let (log, line) = (Arc::new(Mutex::new(String::new())), Arc::new(Notify::new()));
        let stderr = child.stderr.take().expect("its stderr");
        let (to, notify) = (log.clone(), line.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = to.lock().unwrap();
                log.push_str(&l);
                log.push('\n');
                notify.notify_waiters();
            }
        });
        let broker = Broker {
            child,
            dir,
            tcp: SocketAddr::from(([127, 0, 0, 1], tcp)),
            ws: SocketAddr::from(([127, 0, 0, 1], ws)),
            log,
            line,
        };
        // It logs this once both listeners are open.
        broker.wait_count(" running", 1).await;
        broker
    }

    /// `ws://…/mqtt`, the broker's websockets listener.
    pub fn url(&self) -> String {
        format!("ws://{}/mqtt", self.ws)
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Lines of the log that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the log holds `n` lines containing `needle`.
    pub async fn wait_count(&self, needle: &str, n: usize) {
        let what = format!("{n} broker log lines with {needle:?}");
        guard(&what, async {
            loop {
                // Asked for before looking, so no line is missed between.
                let next = self.line.notified();
                if self.count(needle) >= n {
                    return;
                }
                next.await;
            }
        })
        .await;
    }

    /// Connections the broker accepted so far.
    pub fn connections(&self) -> usize {
        self.count("New client connected")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CONNECT.
#[derive(Clone)]
pub struct Hello {
    pub level: Level,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean: bool,
    pub login: Option<(String, String)>,
    pub will: Option<LastWill>,
    pub properties: Option<ConnectProperties>,
}

impl Hello {
    pub fn new(level: Level, client_id: &str) -> Hello {
        Hello {
            level,
            client_id: client_id.into(),
            keep_alive: 60,
            clean: true,
            login: None,
            will: None,
            properties: None,
        }
    }

    pub fn login(mut self, user: &str, pass: &str) -> Hello {
        self.login = Some((user.into(), pass.into()));
        self
    }

    pub fn will(mut self, topic: &str, payload: &str, qos: QoS) -> Hello {
        self.will = Some(LastWill {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            message: Bytes::copy_from_slice(payload.as_bytes()),
            qos,
            retain: false,
            properties: None,
        });
        self
    }

    pub fn packet(&self) -> Packet {
        Packet::Connect(
            Connect {
                keep_alive: self.keep_alive,
                client_id: self.client_id.clone(),
                clean_start: self.clean,
                properties: self.properties.clone(),
            },
            self.will.clone(),
            self.login
                .clone()
                .map(|(username, password)| Login { username, password }),
        )
    }
}

/// A PUBLISH.
pub fn publish(topic: &str, payload: &str, qos: QoS, pkid: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        pkid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: None,
    })
}

/// A SUBSCRIBE of one filter.
pub fn subscribe(pkid: u16, filter: &str, qos: QoS) -> Packet {
    subscribe_with(pkid, filter, qos, RetainForwardRule::OnEverySubscribe, None)
}

pub fn subscribe_with(
    pkid: u16,
    filter: &str,
    qos: QoS,
    rule: RetainForwardRule,
    id: Option<usize>,
) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![Filter {
            path: filter.into(),
            qos,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: rule,
        }],
        properties: id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        }),
    })
}

pub fn unsubscribe(pkid: u16, filter: &str) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        pkid,
        filters: vec![filter.into()],
        properties: None,
    })
}

/// An MQTT client: over TCP to the broker, or a tab over WebSocket.
pub struct Client {
    pub level: Level,
    io: Io,
    stream: Stream,
}

enum Io {
    Tcp(TcpStream),
    Ws(Box<Tab>),
}

impl Client {
    /// A client of the broker's own, over TCP (the outside publisher).
    pub async fn tcp(broker: &Broker, hello: Hello) -> Client {
        let tcp = TcpStream::connect(broker.tcp).await.unwrap();
        let mut c = Client {
            level: hello.level,
            io: Io::Tcp(tcp),
            stream: Stream::default(),
        };
        c.send(&hello.packet()).await;
        match c.recv().await {
            Packet::ConnAck(a) => assert_eq!(
                a.code,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
            ),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    /// A tab's WebSocket through tabmux, before its CONNECT.
    pub async fn tab(proxy: &TestProxy, spec: &TabSpec, level: Level) -> Client {
        let spec = spec.clone().header("sec-websocket-protocol", "mqtt");
        let tab = spec.connect(proxy).await;
        assert_eq!(tab.protocol.as_deref(), Some("mqtt"));
        Client {
            level,
            io: Io::Ws(Box::new(tab)),
            stream: Stream::default(),
        }
    }

    /// A tab through tabmux, connected: its CONNACK.
    pub async fn connected(proxy: &TestProxy, spec: &TabSpec, hello: Hello) -> (Client, ConnAck) {
        let mut c = Client::tab(proxy, spec, hello.level).await;
        c.send(&hello.packet()).await;
        match c.recv().await {
            Packet::ConnAck(a) => (c, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, packet: &Packet) {
        let bytes = codec::write(self.level, packet);
        self.send_bytes(&bytes).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        match &mut self.io {
            Io::Tcp(t) => t.write_all(bytes).await.unwrap(),
            Io::Ws(tab) => tab.ws.send(Message::binary(bytes.to_vec())).await.unwrap(),
        }
    }

    /// The next packet; panics if the connection ends first.
    pub async fn recv(&mut self) -> Packet {
        match self.next().await {
            Ok(p) => p,
            Err(end) => panic!("connection ended before a packet: {end}"),
        }
    }

    /// The next PUBLISH, answering nothing.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The next packet, or how the connection ended (a WebSocket close
    /// `code reason`, or `eof`).
    pub async fn next(&mut self) -> Result<Packet, String> {
        guard("an MQTT packet", async {
            loop {
                match self.stream.next(self.level, 1 << 24) {
                    Ok(Some(p)) => return Ok(p),
                    Ok(None) => {}
                    Err(e) => panic!("bad packet: {e:?}"),
                }
                match &mut self.io {
                    Io::Tcp(t) => {
                        let mut buf = [0u8; 4096];
                        let n = t.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return Err("eof".to_string());
                        }
                        self.stream.push(&buf[..n]);
                    }
                    Io::Ws(tab) => match tab.ws.next().await {
                        Some(Ok(Message::Binary(b))) => self.stream.push(&b),
                        Some(Ok(Message::Close(f))) => {
                            return Err(f.map_or("1005".into(), |f| {
                                format!("{} {}", u16::from(f.code), f.reason)
                            }))
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return Err("eof".into()),
                    },
                }
            }
        })
        .await
    }

    /// Waits for the connection to end; how it ended.
    pub async fn ended(&mut self) -> String {
        loop {
            if let Err(end) = self.next().await {
                return end;
            }
        }
    }

    /// The packets up to and including the first that `stop` picks.
    pub async fn until(&mut self, stop: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        let mut seen = Vec::new();
        loop {
            let p = self.recv().await;
            let done = stop(&p);
            seen.push(p);
            if done {
                return seen;
            }
        }
    }

    /// Acknowledges a QoS 1 PUBLISH.
    pub async fn puback(&mut self, pkid: u16) {
        self.send(&Packet::PubAck(PubAck::new(pkid, None))).await;
    }

    /// Closes the WebSocket without a DISCONNECT (the tab vanishes).
    pub fn abort(self) {
        drop(self);
    }

    /// Closes the tab's WebSocket with a close frame (no DISCONNECT).
    pub async fn close(self) {
        if let Io::Ws(tab) = self.io {
            tab.close(1001).await;
        }
    }
}

/// A tab spec for an MQTT route at `/mqtt`.
pub fn mqtt_tab(session: &str) -> TabSpec {
    TabSpec::new(session).path("/mqtt")
}
