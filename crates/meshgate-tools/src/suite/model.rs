//! What a suite run records: scenario results with numbers, charts as data, and notes.

use serde::Serialize;

/// A result's charts, as data: [`crate::report::chart`] draws them (the benchmark's too).
pub use crate::report::chart::{Chart, ChartKind, Series};

/// One run of one or more scenarios against one front end.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `meshgate` or `nginx`.
    pub front_end: String,
    /// The MQTT address clients used.
    pub front_address: String,
    pub started_ms: u64,
    pub results: Vec<ScenarioResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// connectivity, replication, retained, failover, clients.
    pub scenario: String,
    pub passed: bool,
    /// One line saying what happened, with the key number.
    pub summary: String,
    pub duration_ms: u64,
    /// Named numbers, in display order, e.g. ("connack_p50_ms", 0.4).
    pub metrics: Vec<Metric>,
    /// Tables: a title, column names, rows of cells.
    pub tables: Vec<Table>,
    /// Charts to draw.
    pub charts: Vec<Chart>,
    /// Explanations: why it failed, what is known about this front end.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl ScenarioResult {
    pub fn new(scenario: &str) -> ScenarioResult {
        ScenarioResult {
            scenario: scenario.to_string(),
            passed: false,
            summary: String::new(),
            duration_ms: 0,
            metrics: Vec::new(),
            tables: Vec::new(),
            charts: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn metric(&mut self, name: &str, value: f64, unit: &str) {
        self.metrics.push(Metric { name: name.to_string(), value, unit: unit.to_string() });
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }
}
