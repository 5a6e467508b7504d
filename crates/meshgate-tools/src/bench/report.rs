//! What `bench compare` writes: medians per load and front end, meshgate's ratios to the
//! others, the targets checked, a markdown section for docs/benchmarks.md, the JSON,
//! and four small SVG charts (throughput ratios, CPU time, latency percentiles, failover
//! timelines) drawn by the report kit ([`crate::report::chart`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use maud::Markup;

use super::compare::{FrontEnd, LoadKind, Results};
use super::Report;
use crate::report::chart::{self, BarGroup, Chart, ChartKind, HBars, Look, Rule, RuleStyle, Scale, Series};

pub const BEGIN: &str = "<!-- bench-compare:begin (written by `meshgate bench compare`; edits inside are replaced) -->";
pub const END: &str = "<!-- bench-compare:end -->";

/// One row of the results table: a metric's median per front end.
#[derive(Debug, Clone)]
pub struct Row {
    pub load: LoadKind,
    pub metric: String,
    pub higher_is_better: bool,
    pub values: BTreeMap<FrontEnd, Option<f64>>,
    /// How a value prints.
    pub unit: Unit,
    /// meshgate's ratio to each other front end within each round (the runs next to each
    /// other in time), lowest and highest: how far the machine's noise reaches.
    pub spread: BTreeMap<FrontEnd, (f64, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Rate,
    Micros,
    Bytes,
    /// Seconds; infinity prints as "not within the deadline".
    Seconds,
    /// CPU time per message: small, so two decimals.
    CpuMicros,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub measured: String,
    pub met: Option<bool>,
}

pub struct Summary {
    pub front_ends: Vec<FrontEnd>,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    pub deadline_s: f64,
}

fn fmt_value(v: Option<f64>, unit: Unit, deadline: f64) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.is_infinite() => format!("> {deadline:.0} s"),
        Some(v) => match unit {
            Unit::Rate => group(v.round() as u64),
            Unit::Micros if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
            Unit::Micros => format!("{v:.0} µs"),
            Unit::Bytes => format!("{} B", group(v.round().max(0.0) as u64)),
            Unit::Seconds => format!("{v:.2} s"),
            Unit::CpuMicros => format!("{v:.2} µs"),
        },
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Row {
    /// The median of `fe`, if it has one.
    fn value(&self, fe: FrontEnd) -> Option<f64> {
        self.values.get(&fe).copied().flatten()
    }

    /// " (rounds 0.85–1.10×)", or nothing with fewer than two rounds.
    fn spread_to(&self, fe: FrontEnd) -> String {
        match self.spread.get(&fe) {
            Some((lo, hi)) => format!(" (rounds {lo:.2}–{hi:.2}×)"),
            None => String::new(),
        }
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "–".into())
}

impl Summary {
    pub fn of(results: &Results) -> Summary {
        let s = &results.settings;
        let fes = s.front_ends.clone();
        let median_of = |load: LoadKind, fe: FrontEnd, f: &dyn Fn(&Report) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = results
                .runs
                .iter()
                .filter(|r| r.load == load && r.front_end == fe)
                .filter_map(|r| r.report.as_ref().and_then(f))
                .collect();
            // Infinity (a failover that never completed) sorts last and counts as a value.
            let mut v = v;
            v.sort_by(|a, b| a.total_cmp(b));
            let m = v.len() / 2;
            match v.len() {
                0 => None,
                n if n % 2 == 1 => Some(v[m]),
                _ => Some((v[m - 1] + v[m]) / 2.0),
            }
        };
        let in_round = |load: LoadKind, fe: FrontEnd, round: usize, f: &dyn Fn(&Report) -> Option<f64>| {
            results
                .runs
                .iter()
                .find(|r| r.load == load && r.front_end == fe && r.round == round)
                .and_then(|r| r.report.as_ref())
                .and_then(f)
        };
        let rounds = results.runs.iter().map(|r| r.round).max().unwrap_or(0);
        let mut rows = Vec::new();
        let mut row = |load: LoadKind, metric: String, higher: bool, unit: Unit, f: &dyn Fn(&Report) -> Option<f64>| {
            if !s.loads.contains(&load) {
                return;
            }
            let values = fes.iter().map(|&fe| (fe, median_of(load, fe, f))).collect();
            let mut spread = BTreeMap::new();
            for &fe in fes.iter().filter(|f| **f != FrontEnd::Meshgate) {
                let per_round: Vec<f64> = (0..=rounds)
                    .filter_map(|n| ratio(in_round(load, FrontEnd::Meshgate, n, f), in_round(load, fe, n, f)))
                    .collect();
                if per_round.len() > 1 {
                    let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    spread.insert(fe, (lo, hi));
                }
            }
            rows.push(Row { load, metric, higher_is_better: higher, values, unit, spread });
        };
        let msgs = |r: &Report| match r {
            Report::Pubsub(p) => Some(p.msgs_per_sec),
            _ => None,
        };
        for (load, what) in [
            (LoadKind::Qos0, "QoS 0, 1 pub / 1 sub (msg/s)"),
            (LoadKind::Qos0x16, "QoS 0, 16 pub / 16 sub (msg/s)"),
            (LoadKind::Qos1, "QoS 1, 1 pub / 1 sub (msg/s)"),
            (LoadKind::Qos1x16, "QoS 1, 16 pub / 16 sub (msg/s)"),
        ] {
            row(load, what.into(), true, Unit::Rate, &msgs);
        }
        let rate = s.latency_rate.map(|r| group(r as u64)).unwrap_or_else(|| "?".into());
        type Pick = fn(&super::stats::Percentiles) -> f64;
        let picks: [(&str, Pick); 3] = [("p50", |p| p.p50_us), ("p99", |p| p.p99_us), ("p99.9", |p| p.p999_us)];
        for (name, pick) in picks {
            row(
                LoadKind::Latency,
                format!("latency {name} at {rate} msg/s"),
                false,
                Unit::Micros,
                &move |r: &Report| match r {
                    Report::Pubsub(p) if p.latency.samples > 0 => Some(pick(&p.latency)),
                    _ => None,
                },
            );
        }
        row(LoadKind::Connect, "connection setup (CONNECT→CONNACK/s)".into(), true, Unit::Rate, &|r: &Report| match r
        {
            Report::Connect(c) => Some(c.connects_per_sec),
            _ => None,
        });
        row(
            LoadKind::Idle,
            format!("memory per idle session ({} held)", group(s.idle_sessions as u64)),
            false,
            Unit::Bytes,
            &|r: &Report| match r {
                Report::Idle(i) => i.bytes_per_session,
                _ => None,
            },
        );
        row(
            LoadKind::Failover,
            format!("failover: all {} clients back after a hang", group(s.failover_clients as u64)),
            false,
            Unit::Seconds,
            &|r: &Report| match r {
                Report::Failover(f) => Some(f.all_reconnected_s.unwrap_or(f64::INFINITY)),
                _ => None,
            },
        );
        // Where the CPU goes: the front end's own time and the broker's, per delivered message,
        // over each run's measurement window. Mosquitto alone shows only the broker's.
        for (load, what) in [
            (LoadKind::Qos0, "QoS 0, 1/1"),
            (LoadKind::Qos0x16, "QoS 0, 16/16"),
            (LoadKind::Qos1, "QoS 1, 1/1"),
            (LoadKind::Qos1x16, "QoS 1, 16/16"),
        ] {
            row(load, format!("front end CPU per message, {what}"), false, Unit::CpuMicros, &|r: &Report| match r {
                Report::Pubsub(p) => p.cpu_us_per_msg,
                _ => None,
            });
            row(load, format!("Mosquitto CPU per message, {what}"), false, Unit::CpuMicros, &|r: &Report| match r {
                Report::Pubsub(p) => p.broker_cpu_us_per_msg,
                _ => None,
            });
        }
        let mut summary = Summary { front_ends: fes, rows, targets: Vec::new(), deadline_s: s.failover_deadline_s };
        summary.targets = summary.check_targets();
        summary
    }

    /// " (rounds 0.85–1.10×)": meshgate's lowest and highest ratio to `fe` within a round,
    /// from the row of `load` whose metric starts with `metric_prefix`.
    fn spread(&self, load: LoadKind, metric_prefix: &str, fe: FrontEnd) -> String {
        let row = self.rows.iter().find(|r| r.load == load && r.metric.starts_with(metric_prefix));
        row.map(|r| r.spread_to(fe)).unwrap_or_default()
    }

    fn get(&self, load: LoadKind, metric_prefix: &str, fe: FrontEnd) -> Option<f64> {
        self.rows.iter().find(|r| r.load == load && r.metric.starts_with(metric_prefix)).and_then(|r| r.value(fe))
    }

    fn check_targets(&self) -> Vec<Target> {
        use FrontEnd::*;
        let mut t = Vec::new();
        for load in [LoadKind::Qos0, LoadKind::Qos0x16, LoadKind::Qos1, LoadKind::Qos1x16] {
            let Some(row) = self.rows.iter().find(|r| r.load == load && r.unit == Unit::Rate) else { continue };
            let v = |fe| row.value(fe);
            let (n, h, d) =
                (ratio(v(Meshgate), v(Nginx)), ratio(v(Meshgate), v(Haproxy)), ratio(v(Meshgate), v(Direct)));
            let met = match (n, h) {
                (Some(n), Some(h)) => Some(n >= 1.0 && h >= 1.0),
                _ => None,
            };
            t.push(Target {
                name: format!("{}: ≥ 1.0× nginx and HAProxy (aim 0.9× direct)", load.label()),
                measured: format!(
                    "{} nginx{}, {} HAProxy{}, {} direct",
                    fmt_ratio(n),
                    row.spread_to(Nginx),
                    fmt_ratio(h),
                    row.spread_to(Haproxy),
                    fmt_ratio(d)
                ),
                met,
            });
        }
        if let (Some(m), Some(n)) =
            (self.get(LoadKind::Latency, "latency p99 ", Meshgate), self.get(LoadKind::Latency, "latency p99 ", Nginx))
        {
            t.push(Target {
                name: "p99 latency at half load ≤ nginx".into(),
                measured: format!(
                    "{} vs {}{}",
                    fmt_value(Some(m), Unit::Micros, 0.0),
                    fmt_value(Some(n), Unit::Micros, 0.0),
                    self.spread(LoadKind::Latency, "latency p99 ", Nginx)
                ),
                met: Some(m <= n),
            });
        }
        if let Some(m) = self.get(LoadKind::Idle, "memory", Meshgate) {
            let h = self.get(LoadKind::Idle, "memory", Haproxy);
            t.push(Target {
                name: "memory per idle session ≤ HAProxy's and ≤ 2 KiB".into(),
                measured: format!(
                    "{} vs HAProxy {}",
                    fmt_value(Some(m), Unit::Bytes, 0.0),
                    fmt_value(h, Unit::Bytes, 0.0)
                ),
                met: Some(m <= 2048.0 && h.is_none_or(|h| m <= h)),
            });
        }
        if let (Some(m), Some(h)) =
            (self.get(LoadKind::Connect, "connection", Meshgate), self.get(LoadKind::Connect, "connection", Haproxy))
        {
            t.push(Target {
                name: "connection setup rate ≥ HAProxy's".into(),
                measured: format!(
                    "{}{} ({})",
                    fmt_ratio(ratio(Some(m), Some(h))),
                    self.spread(LoadKind::Connect, "connection", Haproxy),
                    fmt_value(Some(m), Unit::Rate, 0.0)
                ),
                met: Some(m >= h),
            });
        }
        if let Some(m) = self.get(LoadKind::Failover, "failover", Meshgate) {
            t.push(Target {
                name: "failover under load: all clients back within 2 s".into(),
                measured: fmt_value(Some(m), Unit::Seconds, self.deadline_s),
                met: Some(m <= 2.0),
            });
        }
        t
    }

    /// The results as a markdown table: medians, then meshgate's ratios.
    pub fn markdown_table(&self) -> String {
        let mut out = String::new();
        let others: Vec<FrontEnd> = self.front_ends.iter().copied().filter(|f| *f != FrontEnd::Meshgate).collect();
        let has_mg = self.front_ends.contains(&FrontEnd::Meshgate);
        out.push_str("| load |");
        for fe in &self.front_ends {
            let _ = write!(out, " {} |", fe.label());
        }
        if has_mg {
            for fe in &others {
                let _ = write!(out, " meshgate / {} |", fe.label());
            }
        }
        out.push_str("\n|---|");
        for _ in &self.front_ends {
            out.push_str("---:|");
        }
        if has_mg {
            for _ in &others {
                out.push_str("---:|");
            }
        }
        out.push('\n');
        for r in &self.rows {
            let _ = write!(out, "| {} |", r.metric);
            for fe in &self.front_ends {
                let v = r.value(*fe);
                let shown = if r.load == LoadKind::Failover && *fe == FrontEnd::Direct {
                    "n/a".into()
                } else {
                    fmt_value(v, r.unit, self.deadline_s)
                };
                let _ = write!(out, " {shown} |");
            }
            if has_mg {
                let m = r.value(FrontEnd::Meshgate);
                for fe in &others {
                    let _ = write!(out, " {} |", fmt_ratio(ratio(m, r.value(*fe))));
                }
            }
            out.push('\n');
        }
        out
    }

    pub fn targets_table(&self) -> String {
        let mut out = String::from("| target | measured (meshgate) | met |\n|---|---|:---:|\n");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            let _ = writeln!(out, "| {} | {} | {met} |", t.name, t.measured);
        }
        out
    }

    /// For the terminal: the same table, plain.
    pub fn text_table(&self) -> String {
        let mut lines: Vec<Vec<String>> = Vec::new();
        let mut head = vec!["load".to_string()];
        head.extend(self.front_ends.iter().map(|f| f.label().to_string()));
        let others: Vec<FrontEnd> = self.front_ends.iter().copied().filter(|f| *f != FrontEnd::Meshgate).collect();
        let has_mg = self.front_ends.contains(&FrontEnd::Meshgate);
        if has_mg {
            head.extend(others.iter().map(|f| format!("mg/{}", f.label())));
        }
        lines.push(head);
        for r in &self.rows {
            let mut l = vec![r.metric.clone()];
            l.extend(self.front_ends.iter().map(|fe| fmt_value(r.value(*fe), r.unit, self.deadline_s)));
            if has_mg {
                let m = r.value(FrontEnd::Meshgate);
                l.extend(others.iter().map(|fe| fmt_ratio(ratio(m, r.value(*fe)))));
            }
            lines.push(l);
        }
        let cols = lines[0].len();
        let widths: Vec<usize> =
            (0..cols).map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for l in &lines {
            for (c, cell) in l.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c == 0 {
                    let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
                } else {
                    let _ = write!(out, "{}{cell}  ", " ".repeat(pad));
                }
            }
            out.push('\n');
        }
        out.push('\n');
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "met    ",
                Some(false) => "MISSED ",
                None => "-      ",
            };
            let _ = writeln!(out, "{met} {}: {}", t.name, t.measured);
        }
        out
    }
}

/// One line per run for the progress log.
pub fn one_line(r: &Report) -> String {
    let errors = |n: u64| if n > 0 { format!(", {n} errors") } else { String::new() };
    match r {
        Report::Pubsub(p) if p.rate_target.is_some() => format!(
            "{:.0} msg/s, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs{}",
            p.msgs_per_sec,
            p.latency.p50_us,
            p.latency.p99_us,
            p.latency.p999_us,
            errors(p.errors.total)
        ),
        Report::Pubsub(p) => {
            format!("{:.0} msg/s (p99 {:.0} µs){}", p.msgs_per_sec, p.latency.p99_us, errors(p.errors.total))
        }
        Report::Connect(c) => {
            format!("{:.0} connects/s (p99 {:.0} µs){}", c.connects_per_sec, c.latency.p99_us, errors(c.errors.total))
        }
        Report::Idle(i) => format!(
            "{} sessions ({} alive), {} per session{}",
            i.sessions_open,
            i.alive_at_end,
            i.bytes_per_session.map(|b| format!("{b:.0} B")).unwrap_or_else(|| "? B".into()),
            errors(i.errors.total)
        ),
        Report::Failover(f) => match f.all_reconnected_s {
            Some(s) => format!(
                "all {} back after {s:.2} s ({} without reconnecting){}",
                f.connected_before,
                f.kept_session,
                errors(f.errors.total)
            ),
            None => format!(
                "{} of {} back within {:.0} s{}",
                f.reconnected,
                f.connected_before,
                f.deadline_s,
                errors(f.errors.total)
            ),
        },
    }
}

/// The smoke check: every front end answered every load with numbers that make sense.
pub fn check_smoke(results: &Results) -> anyhow::Result<()> {
    for r in &results.runs {
        let what = format!("{} / {}", r.load.label(), r.front_end.label());
        let Some(rep) = &r.report else { anyhow::bail!("{what}: no report") };
        let ok = match rep {
            Report::Pubsub(p) => {
                p.messages > 0
                    && p.errors.total == 0
                    && p.latency.p50_us <= p.latency.p99_us
                    && p.latency.p99_us <= p.latency.p999_us
            }
            Report::Connect(c) => c.connects > 0 && c.errors.total == 0,
            Report::Idle(i) => {
                i.sessions_open == i.sessions_requested
                    && i.alive_at_end == i.sessions_open
                    && i.bytes_per_session.is_some()
            }
            Report::Failover(f) => {
                f.connected_before == f.clients && f.timeline.len() as f64 >= f.deadline_s * 10.0 - 1.0
            }
        };
        anyhow::ensure!(ok, "{what}: implausible result: {}", serde_json::to_string(rep).unwrap_or_default());
    }
    Ok(())
}

const COLORS: [(FrontEnd, &str); 4] = [
    (FrontEnd::Direct, "#8c8c8c"),
    (FrontEnd::Nginx, "#2e8b57"),
    (FrontEnd::Haproxy, "#3b6fb6"),
    (FrontEnd::Meshgate, "#e8772e"),
];

fn color(fe: FrontEnd) -> &'static str {
    COLORS.iter().find(|(f, _)| *f == fe).map(|(_, c)| *c).unwrap_or("#000")
}

/// A chart file whose series are `fes`, each front end in its own colour in every chart.
fn svg_file(fes: &[FrontEnd], draw: impl FnOnce(Look<'_>) -> Markup) -> String {
    let colors: Vec<&'static str> = fes.iter().map(|fe| color(*fe)).collect();
    let mut svg = draw(Look::File { colors: &colors }).into_string();
    svg.push('\n');
    svg
}

/// A group of bars, one per front end of `fes` that has a `value`, printed by `show`.
fn bar_group(
    label: String,
    fes: &[FrontEnd],
    value: impl Fn(FrontEnd) -> Option<f64>,
    show: impl Fn(f64) -> String,
) -> BarGroup {
    BarGroup { label, bars: fes.iter().map(|fe| value(*fe).map(|v| (v, show(v)))).collect() }
}

/// One bar per front end of `fes` in each group.
fn bars_file(title: &str, fes: &[FrontEnd], groups: Vec<BarGroup>, scale: Scale, rules: Vec<Rule>) -> String {
    let series = fes.iter().map(|fe| fe.label().to_string()).collect();
    let chart = HBars { title: title.to_string(), series, groups, scale, rules };
    svg_file(fes, |look| chart.render(look))
}

/// Throughput and connection rate of each front end relative to Mosquitto directly.
pub fn throughput_svg(s: &Summary) -> Option<String> {
    let loads: Vec<&Row> = s.rows.iter().filter(|r| r.unit == Unit::Rate).collect();
    if loads.is_empty() || !s.front_ends.contains(&FrontEnd::Direct) {
        return None;
    }
    let fes: Vec<FrontEnd> = s.front_ends.iter().copied().filter(|f| *f != FrontEnd::Direct).collect();
    let groups: Vec<BarGroup> = loads
        .iter()
        .map(|r| {
            // "QoS 0, 1 pub / 1 sub (msg/s)" -> "QoS 0, 1 pub / 1 sub".
            let label = r.metric.split(" (").next().unwrap_or(&r.metric).to_string();
            bar_group(label, &fes, |fe| ratio(r.value(fe), r.value(FrontEnd::Direct)), |q| format!("{q:.2}×"))
        })
        .collect();
    let max = groups.iter().flat_map(|g| g.bars.iter().flatten().map(|(q, _)| *q)).fold(1.2f64, f64::max);
    // 1.0x is Mosquitto directly; the dashed 0.9x line is the aim.
    let rules = vec![
        Rule { at: 1.0, label: "1.0× direct".into(), style: RuleStyle::Reference },
        Rule { at: 0.9, label: "0.9× direct".into(), style: RuleStyle::Aim },
    ];
    let title = "Throughput relative to Mosquitto directly (median)";
    Some(bars_file(title, &fes, groups, Scale::Linear { max }, rules))
}

/// CPU time per delivered message of each front end and of Mosquitto behind it, linear scale.
pub fn cpu_svg(s: &Summary) -> Option<String> {
    let rows: Vec<&Row> =
        s.rows.iter().filter(|r| r.unit == Unit::CpuMicros && r.values.values().any(Option::is_some)).collect();
    if rows.is_empty() {
        return None;
    }
    let fes = &s.front_ends;
    let groups: Vec<BarGroup> = rows
        .iter()
        .map(|r| bar_group(r.metric.replace(" CPU per message", ""), fes, |fe| r.value(fe), |v| format!("{v:.2}")))
        .collect();
    let max = rows.iter().flat_map(|r| r.values.values().copied().flatten()).fold(1.0f64, f64::max);
    let title = "CPU time per delivered message (median, µs)";
    Some(bars_file(title, fes, groups, Scale::Linear { max }, Vec::new()))
}

/// Latency percentiles at half load, log scale.
pub fn latency_svg(s: &Summary) -> Option<String> {
    let rows: Vec<&Row> = s.rows.iter().filter(|r| r.load == LoadKind::Latency).collect();
    let vals: Vec<f64> = rows.iter().flat_map(|r| r.values.values().copied().flatten()).filter(|v| *v > 0.0).collect();
    if vals.is_empty() {
        return None;
    }
    let fes = &s.front_ends;
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = vals.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    // Whole decades, each a grid line.
    let (lmin, lmax) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let rules = (lmin..=lmax)
        .map(|e| {
            let v = 10f64.powi(e);
            let label = if v >= 1000.0 { format!("{} ms", v / 1000.0) } else { format!("{v} µs") };
            Rule { at: v, label, style: RuleStyle::Grid }
        })
        .collect();
    let groups: Vec<BarGroup> = rows
        .iter()
        .map(|r| {
            let label = r.metric.split(" at ").next().unwrap_or(&r.metric).trim_start_matches("latency ");
            bar_group(label.to_string(), fes, |fe| r.value(fe), |v| fmt_value(Some(v), Unit::Micros, 0.0))
        })
        .collect();
    let title =
        format!("Publish-to-delivery latency, {} (log scale)", rows[0].metric.split(" at ").nth(1).unwrap_or(""));
    let scale = Scale::Log { min: 10f64.powi(lmin), max: 10f64.powi(lmax) };
    Some(bars_file(&title, fes, groups, scale, rules))
}

/// Clients connected again over time after the primary hung, one line per proxy (the run
/// with the median completion time).
pub fn failover_svg(results: &Results) -> Option<String> {
    let mut fes = Vec::new();
    let mut series = Vec::new();
    for &fe in &results.settings.front_ends {
        let mut runs: Vec<&super::conns::FailoverReport> = results
            .runs
            .iter()
            .filter(|r| r.load == LoadKind::Failover && r.front_end == fe)
            .filter_map(|r| match &r.report {
                Some(Report::Failover(f)) => Some(f),
                _ => None,
            })
            .collect();
        if runs.is_empty() {
            continue;
        }
        runs.sort_by(|a, b| {
            a.all_reconnected_s.unwrap_or(f64::INFINITY).total_cmp(&b.all_reconnected_s.unwrap_or(f64::INFINITY))
        });
        let f = runs[runs.len() / 2];
        let (n, bucket_s) = (f.connected_before.max(1) as f64, f.bucket_ms as f64 / 1000.0);
        let mut points = vec![(0.0, 0.0)];
        points.extend(f.timeline.iter().enumerate().map(|(i, c)| ((i + 1) as f64 * bucket_s, *c as f64 / n * 100.0)));
        series.push(Series { name: fe.label().to_string(), points });
        fes.push(fe);
    }
    if series.is_empty() {
        return None;
    }
    let chart = Chart {
        title: "Failover under load: clients connected again after the primary hangs".into(),
        kind: ChartKind::Timeline,
        x_label: "seconds after the hang".into(),
        y_label: "clients connected again (%)".into(),
        categories: Vec::new(),
        series,
        markers: vec![(2.0, "2 s target".into())],
    };
    Some(svg_file(&fes, |look| chart::render(&chart, look)))
}

/// The generated section of docs/benchmarks.md.
pub fn markdown(results: &Results, summary: &Summary, charts: &[(&str, &str)]) -> String {
    let m = &results.machine;
    let s = &results.settings;
    let mut out = String::new();
    let _ = writeln!(out, "{BEGIN}\n");
    let _ = writeln!(
        out,
        "Run {} ({:.0} s), {}.\n",
        results.started,
        results.elapsed_s,
        if s.smoke { "**smoke mode: numbers are not meaningful**" } else { "full mode" }
    );
    let _ = writeln!(
        out,
        "**Machine:** {} — {} cores, {:.1} GiB, {}, Linux {}, open files {}. {}; {}; {}; meshgate {}.\n",
        m.cpu, m.cores, m.memory_gib, m.os, m.kernel, m.open_files, m.mosquitto, m.nginx, m.haproxy, m.meshgate
    );
    let _ = writeln!(
        out,
        "**Settings:** {} round(s), front-end order rotating each round; throughput, latency and connection loads {:.0} s each after a {:.1} s warm-up; {} B payloads; idle load {} sessions; failover {} clients, deadline {:.0} s; meshgate with {}. Medians over rounds; a target's \"rounds\" range is meshgate's lowest and highest ratio within one round.\n",
        s.rounds,
        s.duration_s,
        s.warmup_s,
        s.payload,
        s.idle_sessions,
        s.failover_clients,
        s.failover_deadline_s,
        match s.meshgate_workers {
            0 => "one worker thread per core".to_string(),
            1 => "one worker thread (`[proxy] workers = 1`, as nginx's `worker_processes 1`)".to_string(),
            n => format!("{n} worker threads"),
        }
    );
    let _ = writeln!(out, "`{}`\n", s.command);
    out.push_str(&summary.markdown_table());
    out.push('\n');
    out.push_str(&summary.targets_table());
    out.push('\n');
    for (file, alt) in charts {
        let _ = writeln!(out, "![{alt}]({file})\n");
    }
    let errs: u64 = results
        .runs
        .iter()
        .map(|r| match &r.report {
            Some(Report::Pubsub(p)) => p.errors.total,
            Some(Report::Connect(c)) => c.errors.total,
            Some(Report::Idle(i)) => i.errors.total,
            Some(Report::Failover(f)) => f.errors.total,
            None => 1,
        })
        .sum();
    let _ = writeln!(
        out,
        "Errors over all {} runs: {errs}. Every run's full report is in `benchmarks.json`.\n",
        results.runs.len()
    );
    let _ = writeln!(out, "{END}");
    out
}

/// Writes benchmarks.json, the charts, and the generated section of benchmarks.md (the rest
/// of an existing file is kept).
pub fn write(results: &Results, summary: &Summary, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("benchmarks.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let mut charts = Vec::new();
    for (file, alt, svg) in [
        ("benchmarks-throughput.svg", "throughput relative to direct", throughput_svg(summary)),
        ("benchmarks-latency.svg", "latency percentiles at half load", latency_svg(summary)),
        ("benchmarks-cpu.svg", "CPU time per message, front end and Mosquitto", cpu_svg(summary)),
        ("benchmarks-failover.svg", "clients connected again after the hang", failover_svg(results)),
    ] {
        if let Some(svg) = svg {
            std::fs::write(dir.join(file), svg).with_context(|| format!("writing {file}"))?;
            charts.push((file, alt));
        }
    }
    let section = markdown(results, summary, &charts);
    let md = dir.join("benchmarks.md");
    let old = std::fs::read_to_string(&md).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], section.trim_end(), &old[e + END.len()..]),
        _ if old.is_empty() => format!("# meshgate benchmarks\n\n{section}"),
        _ => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::write(&md, new).with_context(|| format!("writing {}", md.display()))?;
    Ok(())
}
