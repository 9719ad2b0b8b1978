//! What one `malloc_trim` costs on a large heap (BENCHMARKS.md, "Tenth
//! pass"): the trim after a burst runs on a blocking thread and takes the
//! allocator's locks while it walks the heap, so its time is a pause for
//! allocations on the arena it is walking.
//!
//! `cargo run --release --example trim_cost -- [MiB] [rounds]` (default
//! 1024 MiB, 5 rounds) fills the heap with 64 KiB blocks (tabmux's fixed
//! mmap threshold keeps them on the heap), then frees them in three shapes
//! and times the trim that follows each: all freed, every other block freed
//! (the worst case: every free page sits between two used ones), and
//! nothing freed (the trim finds nothing to give back). It also times one
//! look at the allocator's figures (`mallinfo2`), which the trimmer takes
//! once a second.

use std::time::{Duration, Instant};

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1 << 20) as f64
}

fn fill(mib: usize) -> Vec<Vec<u8>> {
    (0..mib * 16)
        .map(|i| {
            let mut b = vec![0u8; 64 * 1024];
            // Touch every page so the heap is resident.
            for p in (0..b.len()).step_by(4096) {
                b[p] = i as u8;
            }
            b
        })
        .collect()
}

fn timed_trim() -> Duration {
    let start = Instant::now();
    tabmux::memory::trim();
    start.elapsed()
}

fn timed_in_use() -> Duration {
    let start = Instant::now();
    std::hint::black_box(tabmux::memory::in_use());
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    tabmux::memory::configure();
    let (mut all, mut half, mut none) = (Vec::new(), Vec::new(), Vec::new());
    let (mut look_full, mut look_half) = (Vec::new(), Vec::new());
    let (mut all_rss, mut half_rss) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let blocks = fill(mib);
        look_full.push(timed_in_use());
        let before = rss_mib();
        drop(blocks);
        all.push(timed_trim());
        all_rss.push(before - rss_mib());

        let mut blocks = fill(mib);
        let before = rss_mib();
        let mut n = 0;
        blocks.retain(|_| {
            n += 1;
            n % 2 == 0
        });
        look_half.push(timed_in_use());
        half.push(timed_trim());
        half_rss.push(before - rss_mib());
        none.push(timed_trim());
        drop(blocks);
        tabmux::memory::trim();
    }
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("heap {mib} MiB of 64 KiB blocks, {rounds} rounds, medians:");
    println!(
        "  all freed:         trim {:?}, returned {:.0} MiB",
        median(all),
        mid(&mut all_rss)
    );
    println!(
        "  every other freed: trim {:?}, returned {:.0} MiB",
        median(half),
        mid(&mut half_rss)
    );
    println!("  nothing to free:   trim {:?}", median(none));
    println!(
        "  a look at the allocator's figures (mallinfo2): {:?} on the full heap, {:?} on the half-freed one",
        median(look_full),
        median(look_half)
    );
}
