//! Numbers the loads report: latency percentiles from raw samples, error tallies, and a
//! process tree's resident memory read from /proc.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub samples: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Percentiles {
    /// From nanosecond samples (sorted in place). Nearest-rank percentiles.
    pub fn from_ns(samples: &mut [u64]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1000.0
        };
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Percentiles {
            samples: samples.len() as u64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: *samples.last().unwrap() as f64 / 1000.0,
            mean_us: (sum / samples.len() as u128) as f64 / 1000.0,
        }
    }
}

/// Errors by label, with the first few messages kept for the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Errors {
    pub total: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub samples: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, kind: &str, message: impl std::fmt::Display) {
        self.total += 1;
        *self.by_kind.entry(kind.to_string()).or_default() += 1;
        if self.samples.len() < 5 {
            self.samples.push(format!("{kind}: {message}"));
        }
    }

    pub fn merge(&mut self, other: Errors) {
        self.total += other.total;
        for (k, v) in other.by_kind {
            *self.by_kind.entry(k).or_default() += v;
        }
        for s in other.samples {
            if self.samples.len() < 5 {
                self.samples.push(s);
            }
        }
    }
}

/// Resident memory of `pid` and all its descendants (nginx's master and workers), KiB.
pub fn tree_rss_kib(pid: u32) -> Option<u64> {
    tree_sum(pid, rss_kib)
}

/// Sum of `tree_rss_kib` over several pids; `None` when none is given or any is gone.
pub fn rss_of(pids: &[u32]) -> Option<u64> {
    sum_of(pids, tree_rss_kib)
}

/// CPU time (user and system) used so far by `pid` and all its descendants, ns: the sum of
/// every thread's `/proc/PID/task/TID/schedstat` run time, which counts in nanoseconds where
/// `/proc/PID/stat` counts 10 ms ticks. A thread that exits between two readings takes its
/// time with it; the proxies measured here keep their threads.
pub fn tree_cpu_ns(pid: u32) -> Option<u64> {
    tree_sum(pid, cpu_ns)
}

/// Sum of `tree_cpu_ns` over several pids; `None` when none is given or any is gone.
pub fn cpu_of(pids: &[u32]) -> Option<u64> {
    sum_of(pids, tree_cpu_ns)
}

/// `per_process` of `pid` (which must exist) plus that of each descendant still there.
fn tree_sum(pid: u32, per_process: fn(u32) -> Option<u64>) -> Option<u64> {
    let own = per_process(pid)?;
    Some(own + descendants(pid).into_iter().map(|c| per_process(c).unwrap_or(0)).sum::<u64>())
}

fn sum_of(pids: &[u32], per_tree: fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| per_tree(p)).sum()
}

fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(total)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // The command name may contain spaces and parentheses; fields after the last ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else { continue };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// The median of some numbers (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_ordered() {
        let mut s: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = Percentiles::from_ns(&mut s);
        assert_eq!((p.p50_us, p.p99_us, p.p999_us, p.max_us), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(Percentiles::from_ns(&mut []).samples, 0);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(tree_rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = cpu_of(&[std::process::id()]).unwrap();
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let used = cpu_of(&[std::process::id()]).unwrap() - before;
        // 20 ms of spinning on this thread: at least most of it is counted, in nanoseconds.
        assert!(used >= 15_000_000, "counted {used} ns for 20 ms of spinning");
        assert_eq!(cpu_of(&[]), None);
    }
}
