//! What `bench compare` writes: medians per load and front end, meshgate's ratios to the
//! others, the targets checked, a markdown section for docs/benchmarks.md, the JSON,
//! and four small SVG charts (throughput ratios, CPU time, latency percentiles, failover
//! timelines) drawn by the report kit ([`crate::report::chart`]). A `--coordination` run
//! (meshgate without and with `[coordination]`) gets the same table with on/off ratios, its
//! own JSON and CPU chart, and its own marked section of the same page.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use maud::Markup;

use super::compare::{CoordinationRun, FrontEnd, LoadKind, Results, Run};
use super::Report;
use crate::report::chart::{self, BarGroup, Chart, ChartKind, HBars, Look, Rule, RuleStyle, Scale, Series};

pub const BEGIN: &str = "<!-- bench-compare:begin (written by `meshgate bench compare`; edits inside are replaced) -->";
pub const END: &str = "<!-- bench-compare:end -->";
pub const COORDINATION_BEGIN: &str =
    "<!-- bench-coordination:begin (written by `meshgate bench compare --coordination`; edits inside are replaced) -->";
pub const COORDINATION_END: &str = "<!-- bench-coordination:end -->";

/// Where one kind of comparison writes: the four front ends, or coordination off vs on.
pub struct Files {
    pub json: &'static str,
    pub chart_prefix: &'static str,
    pub begin: &'static str,
    pub end: &'static str,
    /// Put before the section when the page does not have its markers yet.
    pub heading: &'static str,
}

impl Files {
    pub fn of(s: &super::compare::Settings) -> Files {
        if s.coordination {
            Files {
                json: "benchmarks-coordination.json",
                chart_prefix: "benchmarks-coordination-",
                begin: COORDINATION_BEGIN,
                end: COORDINATION_END,
                heading: "## Coordination through etcd: on vs off\n\n",
            }
        } else {
            Files { json: "benchmarks.json", chart_prefix: "benchmarks-", begin: BEGIN, end: END, heading: "" }
        }
    }
}

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
    pub failover_clients: usize,
    /// The latency load's offered rate, msg/s.
    pub latency_rate: Option<f64>,
    /// The front end whose ratios to the others are shown: meshgate, or in a coordination run
    /// meshgate with `[coordination]` (so the ratios read on / off).
    pub subject: FrontEnd,
    pub coordination: bool,
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
        let median_of = |load: LoadKind, fe: FrontEnd, f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> =
                results.runs.iter().filter(|r| r.load == load && r.front_end == fe).filter_map(f).collect();
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
        let in_round = |load: LoadKind, fe: FrontEnd, round: usize, f: &dyn Fn(&Run) -> Option<f64>| {
            results.runs.iter().find(|r| r.load == load && r.front_end == fe && r.round == round).and_then(f)
        };
        let rounds = results.runs.iter().map(|r| r.round).max().unwrap_or(0);
        let subject = if s.coordination { FrontEnd::MeshgateEtcd } else { FrontEnd::Meshgate };
        let mut rows = Vec::new();
        let mut row = |load: LoadKind, metric: String, higher: bool, unit: Unit, f: &dyn Fn(&Run) -> Option<f64>| {
            if !s.loads.contains(&load) {
                return;
            }
            let values = fes.iter().map(|&fe| (fe, median_of(load, fe, f))).collect();
            let mut spread = BTreeMap::new();
            for &fe in fes.iter().filter(|f| **f != subject) {
                let per_round: Vec<f64> = (0..=rounds)
                    .filter_map(|n| ratio(in_round(load, subject, n, f), in_round(load, fe, n, f)))
                    .collect();
                if per_round.len() > 1 {
                    let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    spread.insert(fe, (lo, hi));
                }
            }
            rows.push(Row { load, metric, higher_is_better: higher, values, unit, spread });
        };
        let msgs = |run: &Run| match run.report.as_ref()? {
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
                &move |run: &Run| match run.report.as_ref()? {
                    Report::Pubsub(p) if p.latency.samples > 0 => Some(pick(&p.latency)),
                    _ => None,
                },
            );
        }
        let connects = |run: &Run| match run.report.as_ref()? {
            Report::Connect(c) => Some(c.connects_per_sec),
            _ => None,
        };
        row(LoadKind::Connect, "connection setup (CONNECT→CONNACK/s)".into(), true, Unit::Rate, &connects);
        if s.coordination {
            // Where a claim could show on the client path: the handshake's latency.
            for (name, pick) in [("p50", picks[0].1), ("p99", picks[1].1)] {
                row(LoadKind::Connect, format!("CONNECT→CONNACK {name}"), false, Unit::Micros, &move |run: &Run| {
                    match run.report.as_ref()? {
                        Report::Connect(c) if c.latency.samples > 0 => Some(pick(&c.latency)),
                        _ => None,
                    }
                });
            }
        }
        // Over TCP through every front end, and through meshgate's TLS and WebSocket listeners.
        for (load, listener) in
            [(LoadKind::Idle, ""), (LoadKind::IdleTls, ", TLS listener"), (LoadKind::IdleWs, ", WebSocket listener")]
        {
            row(
                load,
                format!("memory per idle session{listener} ({} held)", group(s.idle_sessions as u64)),
                false,
                Unit::Bytes,
                &|run: &Run| match run.report.as_ref()? {
                    Report::Idle(i) => i.bytes_per_session,
                    _ => None,
                },
            );
        }
        row(
            LoadKind::Failover,
            format!("failover: all {} clients back after a hang", group(s.failover_clients as u64)),
            false,
            Unit::Seconds,
            &|run: &Run| match run.report.as_ref()? {
                Report::Failover(f) => Some(f.all_reconnected_s.unwrap_or(f64::INFINITY)),
                _ => None,
            },
        );
        // Where the CPU goes: the front end's own time and the broker's, per delivered message,
        // over each run's measurement window. Mosquitto alone shows only the broker's.
        let front = if s.coordination { "meshgate" } else { "front end" };
        for (load, what) in [
            (LoadKind::Qos0, "QoS 0, 1/1"),
            (LoadKind::Qos0x16, "QoS 0, 16/16"),
            (LoadKind::Qos1, "QoS 1, 1/1"),
            (LoadKind::Qos1x16, "QoS 1, 16/16"),
        ] {
            row(load, format!("{front} CPU per message, {what}"), false, Unit::CpuMicros, &|run: &Run| match run
                .report
                .as_ref()?
            {
                Report::Pubsub(p) => p.cpu_us_per_msg,
                _ => None,
            });
            row(load, format!("Mosquitto CPU per message, {what}"), false, Unit::CpuMicros, &|run: &Run| match run
                .report
                .as_ref()?
            {
                Report::Pubsub(p) => p.broker_cpu_us_per_msg,
                _ => None,
            });
            if s.coordination {
                row(load, format!("etcd CPU per message, {what}"), false, Unit::CpuMicros, &|run: &Run| match run
                    .report
                    .as_ref()?
                {
                    Report::Pubsub(p) => p.etcd_cpu_us_per_msg,
                    _ => None,
                });
            }
        }
        if !s.coordination {
            row(LoadKind::Connect, "front end CPU per CONNECT".into(), false, Unit::CpuMicros, &|run: &Run| match run
                .report
                .as_ref()?
            {
                Report::Connect(c) => c.cpu_us_per_connect,
                _ => None,
            });
            row(LoadKind::Connect, "Mosquitto CPU per CONNECT".into(), false, Unit::CpuMicros, &|run: &Run| match run
                .report
                .as_ref()?
            {
                Report::Connect(c) => c.broker_cpu_us_per_connect,
                _ => None,
            });
        }
        if s.coordination {
            // A claim is a CONNECT's cost, so per CONNECT is where it shows: meshgate queues and
            // batches it, etcd applies it (and its release at the disconnect). Counted until
            // the last claim was written, which can be after the last client left.
            type PerConnect = fn(&CoordinationRun) -> Option<u64>;
            let per_connect: [(&str, PerConnect); 3] = [
                ("meshgate", |c| c.meshgate_cpu_ns),
                ("Mosquitto", |c| c.mosquitto_cpu_ns),
                ("etcd", |c| c.etcd_cpu_ns),
            ];
            for (who, pick) in per_connect {
                row(LoadKind::Connect, format!("{who} CPU per CONNECT"), false, Unit::CpuMicros, &move |run: &Run| {
                    let c = run.coordination.as_ref()?;
                    c.per_connect(pick(c), run.report.as_ref()?)
                });
            }
        }
        let mut summary = Summary {
            front_ends: fes,
            rows,
            targets: Vec::new(),
            deadline_s: s.failover_deadline_s,
            failover_clients: s.failover_clients,
            latency_rate: s.latency_rate,
            subject,
            coordination: s.coordination,
        };
        // The targets are meshgate's against the other proxies; off vs on has none.
        if !s.coordination {
            summary.targets = summary.check_targets();
        }
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
        // The front end's own cost per delivered message, which pinning keeps apart from the
        // generator's and Mosquitto's (issue 22: at most 0.75× nginx's and HAProxy's).
        for load in [LoadKind::Qos0, LoadKind::Qos0x16, LoadKind::Qos1, LoadKind::Qos1x16] {
            let Some(row) =
                self.rows.iter().find(|r| r.load == load && r.metric.starts_with("front end CPU per message"))
            else {
                continue;
            };
            let v = |fe| row.value(fe);
            let (n, h) = (ratio(v(Meshgate), v(Nginx)), ratio(v(Meshgate), v(Haproxy)));
            t.push(Target {
                name: format!("{}: front-end CPU per message ≤ 0.75× nginx's and HAProxy's", load.label()),
                measured: format!(
                    "{} ({} nginx{}, {} HAProxy{})",
                    fmt_value(v(Meshgate), Unit::CpuMicros, 0.0),
                    fmt_ratio(n),
                    row.spread_to(Nginx),
                    fmt_ratio(h),
                    row.spread_to(Haproxy)
                ),
                met: match (n, h) {
                    (Some(n), Some(h)) => Some(n <= 0.75 && h <= 0.75),
                    _ => None,
                },
            });
        }
        if let (Some(m), Some(n)) =
            (self.get(LoadKind::Latency, "latency p99 ", Meshgate), self.get(LoadKind::Latency, "latency p99 ", Nginx))
        {
            t.push(Target {
                name: format!(
                    "p99 latency at {} msg/s ≤ nginx",
                    self.latency_rate.map(|r| group(r as u64)).unwrap_or_else(|| "?".into())
                ),
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
                name: "memory per idle session ≤ HAProxy's and ≤ 1,536 B".into(),
                measured: format!(
                    "{} vs HAProxy {}",
                    fmt_value(Some(m), Unit::Bytes, 0.0),
                    fmt_value(h, Unit::Bytes, 0.0)
                ),
                met: Some(m <= 1536.0 && h.is_none_or(|h| m <= h)),
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
                name: format!(
                    "failover under load: all {} clients back within 2 s",
                    group(self.failover_clients as u64)
                ),
                measured: fmt_value(Some(m), Unit::Seconds, self.deadline_s),
                met: Some(m <= 2.0),
            });
        }
        t
    }

    /// A column's name: the front end, or in a coordination run "coordination off" / "on".
    pub fn column(&self, fe: FrontEnd) -> &'static str {
        match (self.coordination, fe) {
            (true, FrontEnd::Meshgate) => "coordination off",
            (true, FrontEnd::MeshgateEtcd) => "coordination on",
            _ => fe.label(),
        }
    }

    /// The header of the subject's ratio to `fe`: "meshgate / nginx", or "on / off".
    fn ratio_column(&self, fe: FrontEnd, short: bool) -> String {
        match (self.coordination, short) {
            (true, _) => "on / off".into(),
            (false, false) => format!("meshgate / {}", fe.label()),
            (false, true) => format!("mg/{}", fe.label()),
        }
    }

    /// The results as a markdown table: medians, then meshgate's ratios (on / off in a
    /// coordination run).
    pub fn markdown_table(&self) -> String {
        let mut out = String::new();
        let subject = self.subject;
        let others: Vec<FrontEnd> = self.front_ends.iter().copied().filter(|f| *f != subject).collect();
        let has_mg = self.front_ends.contains(&subject);
        out.push_str("| load |");
        for fe in &self.front_ends {
            let _ = write!(out, " {} |", self.column(*fe));
        }
        if has_mg {
            for fe in &others {
                let _ = write!(out, " {} |", self.ratio_column(*fe, false));
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
                let m = r.value(subject);
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
        head.extend(self.front_ends.iter().map(|f| self.column(*f).to_string()));
        let subject = self.subject;
        let others: Vec<FrontEnd> = self.front_ends.iter().copied().filter(|f| *f != subject).collect();
        let has_mg = self.front_ends.contains(&subject);
        if has_mg {
            head.extend(others.iter().map(|f| self.ratio_column(*f, true)));
        }
        lines.push(head);
        for r in &self.rows {
            let mut l = vec![r.metric.clone()];
            l.extend(self.front_ends.iter().map(|fe| fmt_value(r.value(*fe), r.unit, self.deadline_s)));
            if has_mg {
                let m = r.value(subject);
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
            Report::Connect(c) => {
                c.connects > 0
                    && c.errors.total == 0
                    && (r.front_end == FrontEnd::Direct || c.cpu_us_per_connect.is_some())
            }
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
        if r.front_end == FrontEnd::MeshgateEtcd {
            // etcd's CPU time came out, and the claims of this run's clients reached etcd.
            let etcd_cpu = match rep {
                Report::Pubsub(p) => p.etcd_cpu_us_per_msg,
                _ => r.coordination.as_ref().and_then(|c| c.etcd_cpu_ns).map(|ns| ns as f64),
            };
            let puts = r.coordination.as_ref().and_then(|c| c.etcd_writes).map_or(0, |w| w.puts);
            anyhow::ensure!(
                etcd_cpu.is_some() && puts > 0,
                "{what}: no etcd CPU time ({etcd_cpu:?}) or no claim written to etcd ({puts} puts)"
            );
        }
    }
    Ok(())
}

const COLORS: [(FrontEnd, &str); 5] = [
    (FrontEnd::Direct, "#8c8c8c"),
    (FrontEnd::Nginx, "#2e8b57"),
    (FrontEnd::Haproxy, "#3b6fb6"),
    (FrontEnd::Meshgate, "#e8772e"),
    (FrontEnd::MeshgateEtcd, "#8e44ad"),
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

/// One bar per front end of `fes` in each group, named as `s`'s table names its columns.
fn bars_file(
    s: &Summary,
    title: &str,
    fes: &[FrontEnd],
    groups: Vec<BarGroup>,
    scale: Scale,
    rules: Vec<Rule>,
) -> String {
    let series = fes.iter().map(|fe| s.column(*fe).to_string()).collect();
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
    Some(bars_file(s, title, &fes, groups, Scale::Linear { max }, rules))
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
        .map(|r| {
            let label = r.metric.replace(" CPU per message", "").replace(" CPU per CONNECT", ", per CONNECT");
            bar_group(label, fes, |fe| r.value(fe), |v| format!("{v:.2}"))
        })
        .collect();
    let max = rows.iter().flat_map(|r| r.values.values().copied().flatten()).fold(1.0f64, f64::max);
    let title = if s.coordination {
        "CPU time per delivered message and per CONNECT, coordination off and on (median, µs)"
    } else {
        "CPU time per delivered message (median, µs)"
    };
    Some(bars_file(s, title, fes, groups, Scale::Linear { max }, Vec::new()))
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
    Some(bars_file(s, &title, fes, groups, scale, rules))
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
    let files = Files::of(s);
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", files.begin);
    let _ = writeln!(
        out,
        "Run {} ({:.0} s), {}.\n",
        results.started,
        results.elapsed_s,
        if s.smoke { "**smoke mode: numbers are not meaningful**" } else { "full mode" }
    );
    if s.coordination {
        return coordination_markdown(results, summary, charts, out);
    }
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
            0 => "one worker (event loop) per core".to_string(),
            1 => "one worker (`[proxy] workers = 1`: one event loop, as nginx's `worker_processes 1`)".to_string(),
            n => format!("{n} workers (event loops)"),
        }
    );
    let _ = writeln!(out, "{}\n", placement_line(s));
    let _ = writeln!(out, "`{}`\n", s.command);
    out.push_str(&summary.markdown_table());
    out.push('\n');
    out.push_str(&summary.targets_table());
    out.push('\n');
    for (file, alt) in charts {
        let _ = writeln!(out, "![{alt}]({file})\n");
    }
    errors_line(results, &mut out);
    let _ = writeln!(out, "{END}");
    out
}

/// Where the processes ran: pinned (`--pin on`), or wherever the scheduler put them.
fn placement_line(s: &super::compare::Settings) -> String {
    let mut line = match &s.placement {
        Some(p) => format!("**Placement:** pinned: {}.", p.describe()),
        None => "**Placement:** not pinned (`--pin off`): the front end, Mosquitto and the load generator share every core, so contention is in every figure.".to_string(),
    };
    if s.beside > 0 {
        let _ = write!(
            line,
            " {} idle sessions were held through the front end beside every throughput, latency and connection run (`--beside`).",
            group(s.beside as u64)
        );
    }
    line
}

fn errors_line(results: &Results, out: &mut String) {
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
        "Errors over all {} runs: {errs}. Every run's full report is in `{}`.\n",
        results.runs.len(),
        Files::of(&results.settings).json
    );
}

/// The coordination run's section: the same table with on / off ratios, what reached etcd.
fn coordination_markdown(results: &Results, summary: &Summary, charts: &[(&str, &str)], mut out: String) -> String {
    let (m, s) = (&results.machine, &results.settings);
    let _ = writeln!(
        out,
        "**Machine:** {} — {} cores, {:.1} GiB, {}, Linux {}. {}; {}; meshgate {}.\n",
        m.cpu,
        m.cores,
        m.memory_gib,
        m.os,
        m.kernel,
        m.mosquitto,
        m.etcd.as_deref().unwrap_or("etcd unknown"),
        m.meshgate
    );
    let _ = writeln!(
        out,
        "**Settings:** {} round(s), off and on alternating first each round; loads {:.0} s each ({:.1} s warm-up for the publish loads); {} B payloads; connection setup with {} handshakes in flight; meshgate with {} worker(s), both instances running side by side with the same config but `[coordination]` (etcd on {}, one member, data on the run's directory, `lease_ttl` 3 s). Medians over rounds; \"rounds\" is the lowest and highest on/off ratio within one round.\n",
        s.rounds,
        s.duration_s,
        s.warmup_s,
        s.payload,
        s.connect_concurrency,
        match s.meshgate_workers {
            0 => "one per core".to_string(),
            n => n.to_string(),
        },
        s.etcd.as_deref().unwrap_or("?"),
    );
    let _ = writeln!(out, "{}\n", placement_line(s));
    let _ = writeln!(out, "`{}`\n", s.command);
    out.push_str(&summary.markdown_table());
    out.push('\n');
    // The rounds' spread of the on/off ratio, for the rows where noise decides the reading.
    let spreads: Vec<String> = summary
        .rows
        .iter()
        .filter_map(|r| r.spread.get(&FrontEnd::Meshgate).map(|(lo, hi)| format!("{} {lo:.2}–{hi:.2}×", r.metric)))
        .collect();
    if !spreads.is_empty() {
        let _ = writeln!(out, "On/off within single rounds: {}.\n", spreads.join("; "));
    }
    let (mut connects, mut puts, mut deletes, mut drained) = (0u64, 0u64, 0u64, Vec::new());
    for r in results.runs.iter().filter(|r| r.front_end == FrontEnd::MeshgateEtcd && r.load == LoadKind::Connect) {
        if let (Some(Report::Connect(c)), Some(co)) = (&r.report, &r.coordination) {
            connects += c.connects;
            puts += co.etcd_writes.map_or(0, |w| w.puts);
            deletes += co.etcd_writes.map_or(0, |w| w.deletes);
            drained.extend(co.claims_drained_s);
        }
    }
    if connects > 0 {
        drained.sort_by(f64::total_cmp);
        let ms = |s: f64| format!("{:.0}", s * 1000.0);
        let _ = writeln!(
            out,
            "What reached etcd in the connection-setup runs with coordination on: {} CONNECTs, {} puts and {} deletes ({:.2} and {:.2} per CONNECT: the claim and its release). meshgate's claim queue was empty {}–{} ms after a run's last client (median {} ms); CPU per CONNECT counts up to then (without coordination, up to the generator's exit).\n",
            group(connects),
            group(puts),
            group(deletes),
            puts as f64 / connects as f64,
            deletes as f64 / connects as f64,
            ms(drained[0]),
            ms(drained[drained.len() - 1]),
            super::stats::median(&drained).map_or_else(|| "?".into(), ms),
        );
    }
    for (file, alt) in charts {
        let _ = writeln!(out, "![{alt}]({file})\n");
    }
    errors_line(results, &mut out);
    let _ = writeln!(out, "{}", Files::of(s).end);
    out
}

/// Writes benchmarks.json, the charts, and the generated section of benchmarks.md (the rest
/// of an existing file is kept).
pub fn write(results: &Results, summary: &Summary, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = Files::of(&results.settings);
    let json = dir.join(files.json);
    std::fs::write(&json, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let mut charts = Vec::new();
    let cpu_alt = if summary.coordination {
        "CPU time per message and per CONNECT, meshgate, Mosquitto and etcd, coordination off and on"
    } else {
        "CPU time per message, front end and Mosquitto"
    };
    for (name, alt, svg) in [
        ("throughput", "throughput relative to direct", throughput_svg(summary)),
        ("latency", "latency percentiles at half load", latency_svg(summary)),
        ("cpu", cpu_alt, cpu_svg(summary)),
        ("failover", "clients connected again after the hang", failover_svg(results)),
    ] {
        if let Some(svg) = svg {
            let file = format!("{}{name}.svg", files.chart_prefix);
            std::fs::write(dir.join(&file), svg).with_context(|| format!("writing {file}"))?;
            charts.push((file, alt));
        }
    }
    let charts: Vec<(&str, &str)> = charts.iter().map(|(f, a)| (f.as_str(), *a)).collect();
    let section = markdown(results, summary, &charts);
    let md = dir.join("benchmarks.md");
    let old = std::fs::read_to_string(&md).unwrap_or_default();
    let (begin, end) = (files.begin, files.end);
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], section.trim_end(), &old[e + end.len()..]),
        _ if old.is_empty() => format!("# meshgate benchmarks\n\n{}{section}", files.heading),
        _ => format!("{}\n\n{}{section}", old.trim_end(), files.heading),
    };
    std::fs::write(&md, new).with_context(|| format!("writing {}", md.display()))?;
    Ok(())
}
