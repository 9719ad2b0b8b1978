//! The configuration's parser, key by key and rule by rule.

use super::*;

#[test]
fn upstream_query_values_are_never_shown() {
    assert_eq!(
        redacted("wss://h:1/p?api_key=SECRET&v=2"),
        "wss://h:1/p?api_key=…&v=…"
    );
    assert_eq!(redacted("ws://h/p?SECRET"), "ws://h/p?…");
    assert_eq!(redacted("ws://h/p?a=1#SECRET"), "ws://h/p?a=…");
    assert_eq!(redacted("ws://h/p"), "ws://h/p");
    let url: Uri = "ws://h/p?token=SECRET".parse().unwrap();
    let u = UpstreamUrl {
        uri: url,
        tls: false,
        host: "h".into(),
        port: 80,
    };
    assert_eq!(u.to_string(), "ws://h/p?token=…");
    assert!(!format!("{u:?}").contains("SECRET"));
}

const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:9001/ws"
allowed_origins = ["http://localhost:8080"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, "proxy.toml", Path::new("."))
}

#[test]
fn minimal_config_gets_contract_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.server.max_tabs, 100_000);
    assert_eq!(c.server.max_sessions, 50_000);
    assert_eq!(
        c.server.per_ip,
        PerIp {
            tabs: 1000,
            sessions: 100,
            rate: TabRate::ADDRESS,
        }
    );
    assert_eq!(c.server.buffer_budget, 512 << 20);
    assert!(!c.admin.public);
    assert_eq!(c.admin.max_connections, 64);
    assert_eq!(c.server.shutdown_timeout, Duration::from_secs(10));
    let r = &c.routes[0];
    assert_eq!(r.session_cookie, "sessionid");
    assert_eq!(r.missing_cookie, MissingCookie::Reject);
    assert_eq!(r.envelope, Envelope::Json);
    assert_eq!(r.payload, Payload::Json);
    assert!(r.forward_query);
    assert_eq!(r.linger, Duration::from_secs(10));
    assert_eq!(r.max_tabs_per_session, 32);
    assert_eq!(r.max_message_size, 1 << 20);
    assert_eq!(r.tab_queue, 256);
    assert_eq!(r.tab_queue_bytes, 4 << 20);
    assert_eq!(r.reconnect_buffer, 1 << 20);
    assert_eq!(
        r.reconnect,
        Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            attempts: 8
        }
    );
    assert_eq!(r.dial_timeout, Duration::from_secs(5));
    assert_eq!(r.ping_interval, Duration::from_secs(30));
    assert_eq!(r.idle_timeout, Duration::from_secs(90));
    assert_eq!(r.upstream.port, 9001);
    assert!(!r.upstream.tls);
    assert_eq!(c.log.format, LogFormat::Pretty);
}

/// The one problem `text` has.
fn problem(text: &str) -> String {
    let err = parse(text).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    err.problems[0].to_string()
}

#[test]
fn what_would_only_fail_at_run_time_is_refused() {
    let same = MINIMAL.replace("127.0.0.1:9090", "127.0.0.1:8080");
    assert!(problem(&same).contains("overlaps server.listen"));
    let any = MINIMAL.replace("127.0.0.1:9090\"", "0.0.0.0:8080\"\npublic = true");
    assert!(problem(&any).contains("overlaps server.listen"));
    let port = MINIMAL.replace("127.0.0.1:9001/ws", "127.0.0.1:99999/ws");
    assert!(problem(&port).contains("port is out of range"));
    let creds = MINIMAL.replace("ws://127.0.0.1", "ws://user:hunter2@127.0.0.1");
    let p = problem(&creds);
    assert!(p.contains("credentials"), "{p}");
    assert!(
        !p.contains("hunter2"),
        "the message shows the password: {p}"
    );
    let level = format!("{MINIMAL}[log]\nlevel = \"nonsense\"\n");
    assert!(problem(&level).contains("does not end in a level"));
    let levels = format!("{MINIMAL}[log]\nlevel = \"tabmux=debug,hyper=WARN\"\n");
    assert!(parse(&levels).is_ok());
    let public = MINIMAL.replace("127.0.0.1:9090", "0.0.0.0:9090");
    assert!(problem(&public).contains("public = true"));
    let allowed = public.replace("[admin]", "[admin]\npublic = true");
    assert!(parse(&allowed).is_ok());
    for path in ["/wś", "/w\\u0000s", "/w\\ts"] {
        let text = MINIMAL.replace("path = \"/ws\"", &format!("path = \"{path}\""));
        assert!(problem(&text).contains("no request path can"), "{path}");
    }
    let cert = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\ntls = { cert = \"/dev/zero\", key = \"/dev/zero\" }",
    );
    assert!(problem(&cert).contains("/dev/zero is not a regular file"));
}

#[test]
fn load_balancer_keys() {
    let c = parse(MINIMAL).unwrap();
    assert!(!c.server.proxy_protocol);
    assert!(c.server.trusted_proxies.is_empty());
    let text = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]",
    );
    let c = parse(&text).unwrap();
    assert!(c.server.proxy_protocol);
    let nets: Vec<String> = c
        .server
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    let bad = text.replace("\"192.0.2.7\"", "\"10.0.0.0/33\"");
    assert!(problem(&bad).contains("is not a network"));
    let spread = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\ndrain_spread = \"20s\"",
    );
    assert!(problem(&spread).contains("at most shutdown_timeout"));
    let spread = spread.replace("20s", "5s");
    assert_eq!(
        parse(&spread).unwrap().server.drain_spread,
        Duration::from_secs(5)
    );
}

#[test]
fn limits_are_read_and_checked() {
    let text = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nmax_sessions = 7\nper_ip = { tabs = 3, sessions = 2 }\nbuffer_budget = \"64MiB\"",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.server.max_sessions, 7);
    assert_eq!(
        c.server.per_ip,
        PerIp {
            tabs: 3,
            sessions: 2,
            rate: TabRate::ADDRESS,
        }
    );
    assert_eq!(c.server.buffer_budget, 64 << 20);
    let bad = text.replace("sessions = 2", "session = 2");
    assert!(problem(&bad).contains("allowed keys: tabs, sessions"));
}

#[test]
fn unknown_key_names_key_place_and_allowed_keys() {
    let text = MINIMAL.replace("path = \"/ws\"", "path = \"/ws\"\nlingr = \"5s\"");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    let p = &err.problems[0];
    assert_eq!((p.line, p.column), (8, 1));
    assert!(p.message.contains("`lingr`"), "{p}");
    assert!(p.message.contains("allowed keys: path, upstream"), "{p}");
    assert!(p.to_string().starts_with("proxy.toml:8:1: "), "{p}");
    // The keys allowed are the keys the parser reads: all of them, each
    // once (read directly, as `ca` is, or through `optional`).
    let allowed = p.message.split("allowed keys: ").nth(1).unwrap_or("");
    let allowed: Vec<&str> = allowed.split(", ").collect();
    for key in [
        "ca",
        "tab_queue_bytes",
        "linger",
        "upstream_user_agent",
        "envelope",
    ] {
        assert_eq!(
            allowed.iter().filter(|k| **k == key).count(),
            1,
            "{key}: {p}"
        );
    }
    assert_eq!(allowed.len(), 28, "{allowed:?}");
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let text = r#"
[server]
listen = "nowhere"
max_tabs = 0
[admin]
listen = "127.0.0.1:9090"
extra = 1
[[route]]
path = "/ws"
upstream = "http://127.0.0.1:9001/ws"
allowed_origins = ["http://localhost:8080"]
linger = "soon"
max_message_size = "1 lightyear"
"#;
    let err = parse(text).unwrap_err();
    let lines: Vec<usize> = err.problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![3, 4, 7, 10, 12, 13], "{err}");
    assert!(err.to_string().contains("use ws:// or wss://"));
}

#[test]
fn required_keys_are_required() {
    let err = parse("[server]\n[admin]\nlisten = \"127.0.0.1:1\"\n[[route]]\npath = \"/x\"\n")
        .unwrap_err();
    let all = err.to_string();
    assert!(all.contains("missing required key `listen`"), "{all}");
    assert!(all.contains("missing required key `upstream`"), "{all}");
    assert!(
        all.contains("missing required key `allowed_origins`"),
        "{all}"
    );
}

#[test]
fn duplicate_paths_and_cross_field_rules() {
    let text = format!(
        "{MINIMAL}\n[[route]]\npath = \"/ws\"\nupstream = \"ws://h/\"\nallowed_origins = [\"*\"]\nreplay_first = 2\n"
    );
    let all = parse(&text).unwrap_err().to_string();
    assert!(all.contains("used by an earlier route"), "{all}");
    assert!(
        all.contains("replay_first` applies to envelope = \"none\" only"),
        "{all}"
    );
}

#[test]
fn idle_timeout_must_outlast_the_ping_interval() {
    let text = format!("{MINIMAL}ping_interval = \"30s\"\nidle_timeout = \"30s\"\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("idle_timeout (30s) must be longer than ping_interval"),
        "{err}"
    );
}

#[test]
fn worker_threads_is_optional_and_bounded() {
    assert_eq!(parse(MINIMAL).unwrap().server.worker_threads, None);
    let with = |n: &str| MINIMAL.replace("[admin]", &format!("worker_threads = {n}\n[admin]"));
    assert_eq!(parse(&with("1")).unwrap().server.worker_threads, Some(1));
    for bad in ["0", "5000", "\"two\""] {
        let err = parse(&with(bad)).unwrap_err().to_string();
        assert!(err.contains("proxy.toml:4:"), "{bad}: {err}");
    }
}

#[test]
fn origins_must_be_exact_origins() {
    let text = MINIMAL.replace("http://localhost:8080\"]", "http://localhost:8080/\"]");
    assert!(parse(&text)
        .unwrap_err()
        .to_string()
        .contains("no trailing slash"));
    let any = MINIMAL.replace("[\"http://localhost:8080\"]", "[\"*\"]");
    assert_eq!(parse(&any).unwrap().routes[0].allowed_origins, Origins::Any);
    let empty = MINIMAL.replace("[\"http://localhost:8080\"]", "[]");
    assert!(parse(&empty).is_err());
}

#[test]
fn syntax_errors_have_a_place() {
    let err = parse("[server\nlisten = 1").unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].line, 1);
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("10"), None);
    assert_eq!(parse_duration("s"), None);
    assert_eq!(parse_duration("-1s"), None);
    assert_eq!(parse_duration("99999999999999999999s"), None);
    assert_eq!(parse_size("64KiB"), Some(65536));
    assert_eq!(parse_size("1MiB"), Some(1 << 20));
    assert_eq!(parse_size("512"), Some(512));
    assert_eq!(parse_size("1MB"), None);
    assert_eq!(parse_size("99999999999GiB"), None);
}

#[test]
fn mqtt_routes_take_max_qos_and_init_timeout_and_other_routes_do_not() {
    let route = |keys: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\npath = \"/mqtt\"\nupstream = \"ws://h/mqtt\"\nallowed_origins = [\"*\"]\n{keys}"
        )
    };
    let config = parse(&route(
        "envelope = \"mqtt\"\nmax_qos = 1\ninit_timeout = \"2s\"\n",
    ))
    .unwrap();
    assert_eq!(config.routes[0].envelope, Envelope::Mqtt);
    assert_eq!(config.routes[0].max_qos, 1);
    assert_eq!(config.routes[0].init_timeout, Duration::from_secs(2));
    assert_eq!(
        parse(&route("envelope = \"mqtt\"\n")).unwrap().routes[0].max_qos,
        2
    );
    let all = parse(&route("envelope = \"mqtt\"\nmax_qos = 3\n"))
        .unwrap_err()
        .to_string();
    assert!(all.contains("max_qos must be 0, 1 or 2"), "{all}");
    let all = parse(&route("max_qos = 1\ninit_timeout = \"2s\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        all.contains("`max_qos` applies to envelope = \"mqtt\" only"),
        "{all}"
    );
    assert!(
        all.contains("`init_timeout` applies to envelope = \"graphql\" or \"mqtt\" only"),
        "{all}"
    );
}
