//! The numbers a run ends with: the statistics over rounds (medians,
//! percentiles, slopes) and the markdown report, a row per figure with the
//! median of each contender that ran and tabmux's ratio to the others.

use crate::procs::Contender;
use crate::{Results, RunArgs};

/// Least-squares slope of y over x.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let cov: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if var == 0.0 {
        f64::NAN
    } else {
        cov / var
    }
}

pub fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// The markdown report: per scenario, a row per figure with the median of
/// each contender that ran, and tabmux's ratio to the others.
pub fn report(results: &Results, args: &RunArgs, load: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tabmux-bench: {} round(s){}{}; load average at start {load:.2}; medians over rounds\n",
        args.rounds,
        if args.quick { ", quick sizes" } else { "" },
        if args.tls {
            ", proxies over wss:// (direct over ws://)"
        } else {
            ""
        }
    );
    // The contenders that ran, in the usual order; tabmux's ratios to the
    // others when it ran too.
    let columns: Vec<&str> = Contender::ALL
        .iter()
        .map(|c| c.name())
        .filter(|name| results.values().any(|by| by.contains_key(*name)))
        .collect();
    let ratio_to: &[&str] = match columns.split_first() {
        Some((&"tabmux", rest)) => rest,
        _ => &[],
    };
    for (scenario, by_contender) in results {
        let _ = writeln!(out, "### {scenario}\n");
        let _ = write!(out, "| figure |");
        for c in &columns {
            let _ = write!(out, " {c} |");
        }
        for c in ratio_to {
            let _ = write!(out, " tabmux / {c} |");
        }
        let _ = writeln!(
            out,
            "\n|---|{}",
            "---|".repeat(columns.len() + ratio_to.len())
        );
        let mut figures: Vec<&String> = by_contender.values().flat_map(|m| m.keys()).collect();
        figures.sort();
        figures.dedup();
        for fig in figures {
            let get = |c: &str| {
                by_contender
                    .get(c)
                    .and_then(|m| m.get(fig))
                    .map(|v| median(v))
            };
            let values: Vec<Option<f64>> = columns.iter().map(|c| get(c)).collect();
            let _ = write!(out, "| {fig} |");
            for v in &values {
                let _ = write!(out, " {} |", v.map_or("—".to_string(), fmt_num));
            }
            for other in &values[columns.len() - ratio_to.len()..] {
                let ratio = match (values[0], *other) {
                    (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                    _ => "—".into(),
                };
                let _ = write!(out, " {ratio} |");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
    }
    out
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::tests::run_args;

    fn results(rows: &[(&str, f64)]) -> Results {
        let mut by_contender = BTreeMap::new();
        for (contender, value) in rows {
            let figures = BTreeMap::from([("p50_us".to_string(), vec![*value])]);
            by_contender.insert(contender.to_string(), figures);
        }
        BTreeMap::from([("latency".to_string(), by_contender)])
    }

    #[test]
    fn the_report_has_columns_for_the_contenders_that_ran() {
        let args = run_args(&[]);
        let three = report(
            &results(&[("tabmux", 100.0), ("direct", 20.0), ("nginx", 125.0)]),
            &args,
            0.5,
        );
        assert!(three
            .contains("| figure | tabmux | direct | nginx | tabmux / direct | tabmux / nginx |"));
        assert!(
            three.contains("| p50_us | 100 | 20.00 | 125 | 5.00 | 0.80 |"),
            "{three}"
        );
        assert!(!three.contains("other"));

        let four = report(
            &results(&[("tabmux", 100.0), ("nginx", 125.0), ("other", 50.0)]),
            &args,
            0.5,
        );
        let header = "| figure | tabmux | nginx | other | tabmux / nginx | tabmux / other |";
        assert!(four.contains(header), "{four}");
        assert!(
            four.contains("| p50_us | 100 | 125 | 50.00 | 0.80 | 2.00 |"),
            "{four}"
        );

        let alone = report(&results(&[("nginx", 125.0)]), &args, 0.5);
        assert!(
            alone.contains("| figure | nginx |\n|---|---|\n| p50_us | 125 |"),
            "{alone}"
        );
    }
}
