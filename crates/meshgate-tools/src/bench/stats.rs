//! Numbers the loads report: latency percentiles from raw samples, error tallies and medians.
//! (Memory and CPU time of the processes under test come from [`crate::procfs`].)

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
}
