//! The status page's chart data: tabs and upstream connections, sampled
//! every [`SAMPLE_EVERY`] over the last [`HISTORY`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the history is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How much history is kept.
pub const HISTORY: Duration = Duration::from_secs(10 * 60);
/// One point of the chart.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub unix_ms: u64,
    pub tabs: i64,
    pub upstreams: i64,
}

/// The chart's history. Its lock is held to push or copy, never across an
/// await.
#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Records the current totals of tabs and upstream connections.
    pub fn sample(&self, tabs: i64, upstreams: i64) {
        let point = Sample {
            unix_ms: unix_ms(),
            tabs,
            upstreams,
        };
        let keep = (HISTORY.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
        if let Ok(mut s) = self.samples.lock() {
            s.push_back(point);
            while s.len() > keep {
                s.pop_front();
            }
        }
    }

    /// The samples kept, oldest first.
    pub fn points(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
