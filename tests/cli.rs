//! The `tabmux` binary: `check`, exit codes, start-up lines, `gen-cert`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn tabmux() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tabmux"))
}

/// `tabmux check --config PATH`.
fn check(path: &std::path::Path) -> std::process::Output {
    tabmux()
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tabmux-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:9/ws"
allowed_origins = ["http://localhost:8080"]
"#;

#[test]
fn check_accepts_a_valid_file() {
    let path = scratch("good.toml", GOOD);
    let out = check(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok (1 route(s))"), "{stdout}");
    // A summary of the effective configuration, defaults filled in.
    assert!(
        stdout.contains("route /ws -> ws://127.0.0.1:9/ws"),
        "{stdout}"
    );
    assert!(stdout.contains("32 tabs/session"), "{stdout}");
    assert!(
        stdout.contains("origins: http://localhost:8080"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_problem_with_its_place_and_exits_2() {
    let bad = GOOD
        .replace(
            "listen = \"127.0.0.1:0\"\n[admin]",
            "listen = \"localhost\"\ncolour = 1\n[admin]",
        )
        .replace("ws://127.0.0.1:9/ws", "http://127.0.0.1:9/ws");
    let path = scratch("bad.toml", &bad);
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = path.display().to_string();
    assert!(err.contains(&format!("{name}:3:10: ")), "{err}");
    assert!(
        err.contains(&format!(
            "{name}:4:1: unknown key `colour` in [server]; allowed keys: listen,"
        )),
        "{err}"
    );
    assert!(err.contains("use ws:// or wss://"), "{err}");
}

/// What can only fail at run time is refused by `check`, every problem in
/// one run, and promptly: a device named as a certificate is not read.
#[test]
fn check_refuses_what_would_fail_at_run_time() {
    let bad = r#"
[server]
listen = "127.0.0.1:8080"
tls = { cert = "/dev/zero", key = "/dev/zero" }
[admin]
listen = "127.0.0.1:8080"
[log]
level = "nonsense"
[[route]]
path = "/wś"
upstream = "ws://user:hunter2@127.0.0.1:99999/ws"
allowed_origins = ["http://localhost:8080"]
[[route]]
path = "/other"
upstream = "ws://127.0.0.1:99999/ws"
allowed_origins = ["http://localhost:8080"]
"#;
    let path = scratch("runtime.toml", bad);
    let started = std::time::Instant::now();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "/dev/zero is not a regular file",
        "overlaps server.listen",
        "does not end in a level",
        "no request path can",
        "holds credentials",
        "port is out of range",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }
    assert!(!err.contains("hunter2"), "the password is shown: {err}");
    // Not a timing assertion on the proxy: a guard that /dev/zero was not
    // read (it used to hang, growing 800 MB/s).
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // The configuration file itself is bounded too.
    let out = check(std::path::Path::new("/dev/zero"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
}

#[test]
fn a_missing_file_or_bad_flag_exits_2() {
    let out = tabmux()
        .args(["check", "--config", "/nonexistent/proxy.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/proxy.toml"));
    let out = tabmux().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_address_in_use_exits_1_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let text = GOOD.replacen("127.0.0.1:0", &addr.to_string(), 1);
    let path = scratch("busy.toml", &text);
    let out = tabmux().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&addr.to_string()) && err.contains("server.listen"),
        "{err}"
    );
}

#[test]
fn runs_logs_its_listeners_and_exits_0_on_sigterm() {
    let path = scratch("run.toml", GOOD);
    let mut child = tabmux()
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Read until both listener lines have appeared (the stream ends if the
    // process dies, failing the test).
    while !(seen
        .iter()
        .any(|l: &String| l.contains("tabs: listening on ws://"))
        && seen
            .iter()
            .any(|l| l.contains("admin: listening on http://")))
    {
        match lines.next() {
            Some(Ok(l)) => seen.push(l),
            _ => panic!("tabmux exited before listening: {seen:?}"),
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn gen_cert_writes_a_loadable_pair() {
    let dir = std::env::temp_dir().join(format!("tabmux-gencert-{}", std::process::id()));
    let out = tabmux()
        .args(["gen-cert", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    tabmux::tls::server_config(&dir.join("dev.crt"), &dir.join("dev.key")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    // `tabmux check | head -1`: the reader goes away early.
    let path = scratch("pipe.toml", GOOD);
    let mut child = tabmux()
        .args(["check", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
