//! The process's log: a `tracing` subscriber (pretty or JSON lines) with the
//! configured filter, or `RUST_LOG`'s. The configured level can be changed
//! while running ([`LogHandle::set_level`], on SIGHUP).
//!
//! Whatever the filter, lines that would carry a session cookie never reach
//! the output (docs/protocol.md, "Guarantees"). tabmux's own lines name sessions
//! by their keyed hash; the one library line known to carry request headers
//! is tungstenite's trace of the upstream handshake request (the first tab's
//! `Cookie` header included), which is dropped here at every level of
//! `RUST_LOG`. `tests/operators.rs` runs the proxy at `trace` and looks for
//! the cookie in every line.

use tracing::Metadata;
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::Registry;
use tracing_subscriber::{reload, EnvFilter};

use crate::config::LogFormat;

type Output = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;

/// Changes the running log's level.
pub struct LogHandle {
    handle: reload::Handle<Output, Registry>,
    format: LogFormat,
}

impl LogHandle {
    /// Applies a new configured level, unless `RUST_LOG` overrides it.
    pub fn set_level(&self, level: &str) {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let (output, hint) = output(self.format, level);
        if self.handle.reload(output).is_ok() {
            log::set_max_level(as_log(hint));
        }
    }
}

/// Installs the process's subscriber. `level` is the configured filter;
/// a valid `RUST_LOG` overrides it.
pub fn init(format: LogFormat, level: &str) -> Option<LogHandle> {
    let (output, _) = output(format, level);
    let (layer, handle) = reload::Layer::new(output);
    tracing_subscriber::registry().with(layer).try_init().ok()?;
    Some(LogHandle { handle, format })
}

/// The formatting layer with its filters, and the most verbose level they
/// let through.
fn output(format: LogFormat, level: &str) -> (Output, LevelFilter) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
    };
    // The filter's own bound, passed on: without it the process would take
    // every level as wanted, and `log` records (tungstenite traces every
    // frame) would cross the subscriber, to be dropped, thousands of
    // instructions per message (measured with `bench/hotcode`).
    let hint = Filter::<Registry>::max_level_hint(&filter).unwrap_or(LevelFilter::TRACE);
    let redact = filter_fn(|m| !carries_headers(m)).with_max_level_hint(hint);
    (layer.with_filter(filter).with_filter(redact).boxed(), hint)
}

fn as_log(level: LevelFilter) -> log::LevelFilter {
    match level {
        LevelFilter::OFF => log::LevelFilter::Off,
        LevelFilter::ERROR => log::LevelFilter::Error,
        LevelFilter::WARN => log::LevelFilter::Warn,
        LevelFilter::INFO => log::LevelFilter::Info,
        LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Whether a line may carry request headers, and so a cookie: tungstenite
/// traces each handshake request and response whole.
pub fn carries_headers(meta: &Metadata<'_>) -> bool {
    meta.target().starts_with("tungstenite::handshake") && *meta.level() == tracing::Level::TRACE
}
