//! Renders suite runs as one self-contained HTML report: tables and inline SVG charts, no scripts or network needed to view it.

use std::fmt::Write as _;

use serde::Serialize;

use super::model::{Chart, ChartKind, Metric, Run, ScenarioResult, Table};

/// Appends formatted text. Writing into a `String` cannot fail, so the `fmt::Result` is dropped in this one place.
macro_rules! w {
    ($dst:expr, $($arg:tt)*) => {{
        let _ = write!($dst, $($arg)*);
    }};
}

/// The whole report as one HTML document: overview, then one section per scenario; with two or more runs the
/// results of each scenario stand side by side, one column per run.
pub fn html(title: &str, runs: &[Run]) -> String {
    let mut o = String::with_capacity(64 * 1024);
    o.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    o.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    o.push_str("<meta name=\"color-scheme\" content=\"light dark\">\n");
    w!(o, "<title>{}</title>\n<style>{}</style>\n</head>\n<body>\n<main>\n", esc(title), CSS);
    w!(o, "<header>\n<h1>{}</h1>\n", esc(title));
    match runs.first() {
        Some(first) => {
            let front_ends: Vec<String> = runs.iter().map(|r| esc(&r.front_end)).collect();
            w!(
                o,
                "<p class=\"meta\">Started {} · front end{}: {}</p>\n",
                fmt_utc(first.started_ms),
                if runs.len() == 1 { "" } else { "s" },
                front_ends.join(", ")
            );
        }
        None => o.push_str("<p class=\"meta\">No runs were recorded.</p>\n"),
    }
    o.push_str("</header>\n");
    if !runs.is_empty() {
        let keys = scenario_keys(runs);
        overview(&mut o, runs, &keys);
        for (i, key) in keys.iter().enumerate() {
            scenario_section(&mut o, runs, key, i);
        }
    }
    o.push_str("</main>\n</body>\n</html>\n");
    o
}

/// One JSON object per line: one line per scenario result, with front_end and started_ms added.
///
/// Every line, the last included, ends with `\n`. Non-finite numbers (NaN gaps in charts) are written as `null`.
pub fn json_lines(runs: &[Run]) -> String {
    #[derive(Serialize)]
    struct Line<'a> {
        front_end: &'a str,
        started_ms: u64,
        #[serde(flatten)]
        result: &'a ScenarioResult,
    }
    let mut out = String::new();
    for run in runs {
        for result in &run.results {
            let line = Line { front_end: &run.front_end, started_ms: run.started_ms, result };
            match serde_json::to_string(&line) {
                Ok(s) => out.push_str(&s),
                // Keeps the one-line-per-result promise even if serialization ever fails.
                Err(e) => out.push_str(&serde_json::json!({ "error": e.to_string() }).to_string()),
            }
            out.push('\n');
        }
    }
    out
}

/// The short terminal summary: one line per scenario per front end, "PASS"/"FAIL", the summary line; and a final "N passed, M failed" line (exactly that form: e.g. "5 passed, 1 failed").
///
/// Ends with `\n`, so print it with `print!`. Control characters in the data become spaces so that one result
/// stays one line and cannot drive the terminal.
pub fn terminal_summary(runs: &[Run]) -> String {
    let fe_w = runs.iter().map(|r| one_line(&r.front_end).chars().count()).max().unwrap_or(0).min(16);
    let sc_w =
        runs.iter().flat_map(|r| &r.results).map(|r| one_line(&r.scenario).chars().count()).max().unwrap_or(0).min(24);
    let (mut passed, mut failed) = (0usize, 0usize);
    let mut out = String::new();
    for run in runs {
        for r in &run.results {
            if r.passed {
                passed += 1;
            } else {
                failed += 1;
            }
            let line = format!(
                "{:<fe_w$}  {}  {:<sc_w$}  {}",
                one_line(&run.front_end),
                if r.passed { "PASS" } else { "FAIL" },
                one_line(&r.scenario),
                one_line(&r.summary)
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    w!(out, "{passed} passed, {failed} failed\n");
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Page structure

/// A scenario as matched across runs: its name and which occurrence of that name it is within a run, so a run
/// that repeats a scenario still lines up with the other runs instead of collapsing into one row.
#[derive(Clone, PartialEq)]
struct Key {
    name: String,
    nth: usize,
}

impl Key {
    fn label(&self) -> String {
        if self.nth == 0 {
            self.name.clone()
        } else {
            format!("{} #{}", self.name, self.nth + 1)
        }
    }

    fn anchor(&self, index: usize) -> String {
        let slug: String = self
            .name
            .chars()
            .take(40)
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
            .collect();
        format!("s{index}-{slug}")
    }

    fn find<'a>(&self, run: &'a Run) -> Option<&'a ScenarioResult> {
        run.results.iter().filter(|r| r.scenario == self.name).nth(self.nth)
    }
}

/// Scenarios in first-seen order over all runs.
fn scenario_keys(runs: &[Run]) -> Vec<Key> {
    let mut keys: Vec<Key> = Vec::new();
    for run in runs {
        for (i, r) in run.results.iter().enumerate() {
            let nth = run.results[..i].iter().filter(|p| p.scenario == r.scenario).count();
            let key = Key { name: r.scenario.clone(), nth };
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    keys
}

fn badge(passed: bool) -> &'static str {
    if passed {
        "<span class=\"badge pass\">PASS</span>"
    } else {
        "<span class=\"badge fail\">FAIL</span>"
    }
}

fn overview(o: &mut String, runs: &[Run], keys: &[Key]) {
    o.push_str("<section>\n<h2>Overview</h2>\n<div class=\"scroll\"><table class=\"overview\">\n");
    o.push_str("<thead><tr><th scope=\"col\">Scenario</th>");
    for run in runs {
        w!(
            o,
            "<th scope=\"col\">{}<span class=\"sub\">{} · {}</span></th>",
            esc(&run.front_end),
            esc(&run.front_address),
            fmt_utc(run.started_ms)
        );
    }
    o.push_str("</tr></thead>\n<tbody>\n");
    for (i, key) in keys.iter().enumerate() {
        w!(o, "<tr><th scope=\"row\"><a href=\"#{}\">{}</a></th>", esc(&key.anchor(i)), esc(&key.label()));
        for run in runs {
            match key.find(run) {
                Some(r) => w!(o, "<td>{} <span class=\"sum\">{}</span></td>", badge(r.passed), esc(&r.summary)),
                None => o.push_str("<td class=\"muted\">not run</td>"),
            }
        }
        o.push_str("</tr>\n");
    }
    o.push_str("<tr class=\"totals\"><th scope=\"row\">Total</th>");
    for run in runs {
        let passed = run.results.iter().filter(|r| r.passed).count();
        w!(o, "<td>{} passed, {} failed</td>", passed, run.results.len() - passed);
    }
    o.push_str("</tr>\n</tbody></table></div>\n</section>\n");
}

fn scenario_section(o: &mut String, runs: &[Run], key: &Key, index: usize) {
    w!(o, "<section class=\"scenario\" id=\"{}\">\n<h2>{}", esc(&key.anchor(index)), esc(&key.label()));
    if runs.len() >= 2 {
        for run in runs {
            if let Some(r) = key.find(run) {
                w!(o, " <span class=\"hb\">{} {}</span>", esc(&run.front_end), badge(r.passed));
            }
        }
    }
    o.push_str("</h2>\n");
    if runs.len() >= 2 {
        metrics_comparison(o, runs, key);
        w!(o, "<div class=\"cmp\" style=\"--n:{}\">\n", runs.len());
        for run in runs {
            o.push_str("<div class=\"col\">\n");
            match key.find(run) {
                Some(r) => result(o, run, r),
                None => w!(
                    o,
                    "<article class=\"result\"><header class=\"rhead\"><span class=\"fe\">{}</span></header>\
                     <p class=\"muted\">Not run against this front end.</p></article>\n",
                    esc(&run.front_end)
                ),
            }
            o.push_str("</div>\n");
        }
        o.push_str("</div>\n");
    } else if let Some(r) = runs.first().and_then(|run| key.find(run).map(|r| (run, r))) {
        result(o, r.0, r.1);
    }
    o.push_str("</section>\n");
}

/// Rows are metric names (union over runs, first-seen order), columns are runs.
fn metrics_comparison(o: &mut String, runs: &[Run], key: &Key) {
    let results: Vec<Option<&ScenarioResult>> = runs.iter().map(|r| key.find(r)).collect();
    let mut names: Vec<&str> = Vec::new();
    for r in results.iter().flatten() {
        for m in &r.metrics {
            if !names.contains(&m.name.as_str()) {
                names.push(&m.name);
            }
        }
    }
    if names.is_empty() {
        return;
    }
    o.push_str("<div class=\"scroll\"><table class=\"cmpm\"><caption>Metrics compared</caption>\n");
    o.push_str("<thead><tr><th scope=\"col\">Metric</th>");
    for run in runs {
        w!(o, "<th scope=\"col\" class=\"num\">{}</th>", esc(&run.front_end));
    }
    o.push_str("</tr></thead>\n<tbody>\n");
    for name in names {
        w!(o, "<tr><th scope=\"row\"><code>{}</code></th>", esc(name));
        for r in &results {
            match r.and_then(|r| r.metrics.iter().find(|m| m.name == name)) {
                Some(m) => w!(o, "<td class=\"num\">{}</td>", esc(&fmt_metric(m))),
                None => o.push_str("<td class=\"num muted\">—</td>"),
            }
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</tbody></table></div>\n");
}

fn result(o: &mut String, run: &Run, r: &ScenarioResult) {
    w!(
        o,
        "<article class=\"result {}\">\n<header class=\"rhead\"><span class=\"fe\">{}</span> {} \
         <span class=\"muted\">{}</span></header>\n",
        if r.passed { "pass" } else { "fail" },
        esc(&run.front_end),
        badge(r.passed),
        fmt_duration(r.duration_ms)
    );
    if !r.summary.is_empty() {
        w!(o, "<p class=\"summary\">{}</p>\n", esc(&r.summary));
    }
    if !r.metrics.is_empty() {
        o.push_str("<div class=\"scroll\"><table class=\"metrics\">\n<thead><tr><th scope=\"col\">Metric</th>");
        o.push_str("<th scope=\"col\" class=\"num\">Value</th></tr></thead>\n<tbody>\n");
        for m in &r.metrics {
            w!(
                o,
                "<tr><th scope=\"row\"><code>{}</code></th><td class=\"num\">{}</td></tr>\n",
                esc(&m.name),
                esc(&fmt_metric(m))
            );
        }
        o.push_str("</tbody></table></div>\n");
    }
    for t in &r.tables {
        data_table(o, t);
    }
    if !r.notes.is_empty() {
        o.push_str("<h4>Notes</h4>\n<ul class=\"notes\">\n");
        for n in &r.notes {
            w!(o, "<li>{}</li>\n", esc(n));
        }
        o.push_str("</ul>\n");
    }
    for c in &r.charts {
        w!(o, "<figure class=\"chart\"><figcaption>{}</figcaption>\n{}\n</figure>\n", esc(&c.title), chart_svg(c));
    }
    o.push_str("</article>\n");
}

fn data_table(o: &mut String, t: &Table) {
    // Ragged rows are padded so every row has as many cells as the widest one.
    let ncols = t.rows.iter().map(Vec::len).max().unwrap_or(0).max(t.columns.len()).max(1);
    o.push_str("<div class=\"scroll\"><table class=\"data\">");
    if !t.title.is_empty() {
        w!(o, "<caption>{}</caption>", esc(&t.title));
    }
    o.push('\n');
    if !t.columns.is_empty() {
        o.push_str("<thead><tr>");
        for i in 0..ncols {
            w!(o, "<th scope=\"col\">{}</th>", esc(t.columns.get(i).map_or("", String::as_str)));
        }
        o.push_str("</tr></thead>\n");
    }
    o.push_str("<tbody>\n");
    if t.rows.is_empty() {
        w!(o, "<tr><td colspan=\"{ncols}\" class=\"muted\">no rows</td></tr>\n");
    }
    for row in &t.rows {
        o.push_str("<tr>");
        for i in 0..ncols {
            let cell = row.get(i).map_or("", String::as_str);
            // Numbers right-aligned so columns of them can be compared by eye.
            let class = if cell.trim().parse::<f64>().is_ok() { " class=\"num\"" } else { "" };
            w!(o, "<td{}>{}</td>", class, esc(cell));
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</tbody></table></div>\n");
}

// ---------------------------------------------------------------------------------------------------------------
// Text helpers

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// At most `max` characters, with an ellipsis when cut, so long labels cannot run over neighbouring ones.
fn trunc(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// A number for people: integers without decimals, at most three decimals for |v| >= 1 and three significant
/// digits below 1, trailing zeros dropped, so measurement noise such as 1.0000001 shows as 1.
fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "∞".into() } else { "−∞".into() };
    }
    let a = v.abs();
    if a >= 1e15 || (a > 0.0 && a < 1e-6) {
        return format!("{v:.3e}");
    }
    if v == v.trunc() {
        return format!("{}", v as i64);
    }
    let decimals = if a >= 1.0 { 3 } else { (2 - a.log10().floor() as i32).clamp(3, 9) as usize };
    strip_zeros(format!("{v:.decimals$}"))
}

fn strip_zeros(mut s: String) -> String {
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" {
        s = "0".into();
    }
    s
}

fn fmt_metric(m: &Metric) -> String {
    let v = fmt_num(m.value);
    match m.unit.as_str() {
        "" => v,
        "%" => format!("{v}%"),
        unit => format!("{v} {unit}"),
    }
}

fn fmt_duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{} s", fmt_num(ms as f64 / 1000.0))
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// Milliseconds since the Unix epoch as "YYYY-MM-DD HH:MM:SS UTC".
fn fmt_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------------------------------
// Charts
//
// Every chart is one <svg> with a fixed viewBox width; CSS scales it to the column. Colors come from CSS
// variables so light and dark mode both work without touching the SVG.

/// Narrow enough that text stays legible when a chart is scaled down to a phone-width column.
const VW: f64 = 480.0;
/// Height of the data area in viewBox units.
const PH: f64 = 180.0;
const FS: f64 = 13.0;
/// Marker label and bar value label sizes; the CSS sets the same sizes.
const MARKER_FS: f64 = 12.0;
const VALUE_FS: f64 = 11.0;
/// Most categories or histogram buckets drawn; more would be hairlines anyway.
const MAX_SLOTS: usize = 400;
const MAX_MARKER_ROWS: usize = 4;
const PALETTE: usize = 10;

/// Values beyond this are treated like NaN: ranges built from them would overflow to infinity.
fn ok(v: f64) -> bool {
    v.is_finite() && v.abs() < 1e300
}

/// Approximate rendered width of text; SVG cannot measure, and an estimate is enough to avoid overlaps.
fn tw(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.6
}

/// A coordinate with one decimal, to keep the document small.
fn c1(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    let r = (v * 10.0).round() / 10.0;
    if r == r.trunc() {
        format!("{}", r as i64)
    } else {
        format!("{r:.1}")
    }
}

fn line_class(i: usize) -> String {
    // Past the palette, colors repeat; a dash pattern keeps those series apart.
    if i >= PALETTE {
        format!("s{} d", i % PALETTE)
    } else {
        format!("s{i}")
    }
}

fn fill_class(i: usize) -> String {
    if i >= PALETTE {
        format!("f{} h", i % PALETTE)
    } else {
        format!("f{i}")
    }
}

struct Range {
    min: f64,
    max: f64,
}

impl Range {
    fn new() -> Range {
        Range { min: f64::INFINITY, max: f64::NEG_INFINITY }
    }
    fn add(&mut self, v: f64) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }
    fn is_empty(&self) -> bool {
        self.min > self.max
    }
}

/// An axis whose bounds and ticks are round numbers.
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

/// Widens a zero or near-zero range so a single value still gets an axis around it.
fn pad(min: f64, max: f64) -> (f64, f64) {
    if max - min > max.abs().max(min.abs()) * 1e-9 {
        return (min, max);
    }
    let mid = min / 2.0 + max / 2.0;
    let d = if mid == 0.0 { 1.0 } else { mid.abs() * 0.1 };
    if d > 0.0 && mid + d > mid && mid - d < mid {
        (mid - d, mid + d)
    } else {
        (mid - 1.0, mid + 1.0)
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw > 0.0 && raw.is_finite()) {
        return 1.0;
    }
    let base = 10f64.powf(raw.log10().floor());
    let f = raw / base;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * base
}

fn axis(min: f64, max: f64, target: usize) -> Axis {
    let (min, max) = pad(min, max);
    let step = nice_step((max - min) / target.max(1) as f64);
    let lo = (min / step).floor() * step;
    let hi = (max / step).ceil() * step;
    let n = ((hi - lo) / step).round();
    if step > 0.0 && lo.is_finite() && hi.is_finite() && hi > lo && (1.0..=100.0).contains(&n) {
        let ticks = (0..=n as usize).map(|i| lo + i as f64 * step).collect();
        Axis { lo, hi, step, ticks }
    } else {
        // Precision ran out (tiny range at a huge magnitude): plain bounds still draw.
        Axis { lo: min, hi: max, step: max - min, ticks: vec![min, max] }
    }
}

/// Tick labels with as many decimals as the step needs, and k/M/G for large values so they stay short.
fn tick_labels(a: &Axis) -> Vec<String> {
    let max_abs = a.lo.abs().max(a.hi.abs());
    if max_abs >= 1e12 {
        return a.ticks.iter().map(|t| format!("{t:.1e}")).collect();
    }
    let (scale, suffix) = if max_abs >= 1e9 {
        (1e9, "G")
    } else if max_abs >= 1e6 {
        (1e6, "M")
    } else if max_abs >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let s = a.step / scale;
    let decimals = if s >= 1.0 || s <= 0.0 || s.is_nan() { 0 } else { ((-s.log10() - 1e-9).ceil() as usize).min(9) };
    a.ticks
        .iter()
        .map(|t| {
            let mut l = format!("{:.*}", decimals, t / scale);
            if l.starts_with('-') && l[1..].chars().all(|c| c == '0' || c == '.') {
                l.remove(0);
            }
            l.push_str(suffix);
            l
        })
        .collect()
}

fn chart_svg(c: &Chart) -> String {
    match c.kind {
        ChartKind::Timeline => timeline(c),
        ChartKind::Bars => bars(c),
        ChartKind::Histogram => histogram(c),
    }
}

fn svg_open(o: &mut String, c: &Chart, h: f64) {
    let title = if c.title.is_empty() {
        match c.kind {
            ChartKind::Timeline => "timeline",
            ChartKind::Bars => "bar chart",
            ChartKind::Histogram => "histogram",
        }
    } else {
        &c.title
    };
    let h = c1(h);
    w!(o, "<svg viewBox=\"0 0 {VW} {h}\" width=\"{VW}\" height=\"{h}\" role=\"img\"><title>{}</title>\n", esc(title));
}

fn no_data(c: &Chart) -> String {
    let mut o = String::new();
    svg_open(&mut o, c, 64.0);
    w!(o, "<rect class=\"nd\" x=\"1\" y=\"1\" width=\"{}\" height=\"62\" rx=\"6\"/>", VW - 2.0);
    w!(o, "<text class=\"ndt\" x=\"{}\" y=\"37\" text-anchor=\"middle\">no data</text>\n</svg>", VW / 2.0);
    o
}

/// Room left of the plot for tick labels and the rotated y label.
fn left_margin(labels: &[String], c: &Chart) -> f64 {
    let widest = labels.iter().map(|l| tw(l, FS)).fold(0.0, f64::max);
    (widest + 10.0 + if c.y_label.is_empty() { 4.0 } else { 20.0 }).clamp(28.0, 160.0)
}

/// Legend in rows that wrap at `width`; returns the height used (0 when no series has a name).
fn legend(o: &mut String, names: &[&str], x0: f64, y0: f64, width: f64, swatch_rect: bool) -> f64 {
    if names.iter().all(|n| n.is_empty()) {
        return 0.0;
    }
    const ROW: f64 = 18.0;
    let (mut x, mut y) = (x0, y0);
    o.push_str("<g class=\"lg\">");
    for (i, name) in names.iter().enumerate() {
        let label = trunc(name, 40);
        let item_w = 22.0 + tw(&label, FS) + 14.0;
        if x > x0 && x + item_w > x0 + width {
            x = x0;
            y += ROW;
        }
        if swatch_rect {
            w!(
                o,
                "<rect class=\"{}\" x=\"{}\" y=\"{}\" width=\"14\" height=\"10\"/>",
                fill_class(i),
                c1(x),
                c1(y + 4.0)
            );
        } else {
            let ly = c1(y + 9.0);
            w!(
                o,
                "<line class=\"{}\" x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\"/>",
                line_class(i),
                c1(x),
                c1(x + 16.0)
            );
        }
        w!(o, "<text x=\"{}\" y=\"{}\">{}</text>", c1(x + 22.0), c1(y + 13.0), esc(&label));
        x += item_w;
    }
    o.push_str("</g>\n");
    y - y0 + ROW + 6.0
}

/// Horizontal grid lines, y tick labels, the y axis line and the y axis label.
fn y_axis(o: &mut String, c: &Chart, y: &Axis, labels: &[String], left: f64, top: f64, pw: f64) {
    let sy = |v: f64| top + PH - (v - y.lo) / (y.hi - y.lo) * PH;
    for (t, l) in y.ticks.iter().zip(labels) {
        let py = c1(sy(*t));
        w!(o, "<line class=\"grid\" x1=\"{}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\"/>", c1(left), c1(left + pw));
        w!(
            o,
            "<text class=\"tk\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            c1(left - 6.0),
            c1(sy(*t) + 4.0),
            esc(l)
        );
    }
    w!(o, "<line class=\"ax\" x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>", c1(left), c1(top), c1(top + PH));
    if !c.y_label.is_empty() {
        let label = trunc(&c.y_label, (PH / (FS * 0.6)) as usize);
        w!(
            o,
            "<text class=\"al\" transform=\"translate(14,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
            c1(top + PH / 2.0),
            esc(&label)
        );
    }
}

fn x_label(o: &mut String, c: &Chart, left: f64, pw: f64, y: f64) -> f64 {
    if c.x_label.is_empty() {
        return 0.0;
    }
    let label = trunc(&c.x_label, (pw / (FS * 0.6)) as usize);
    w!(
        o,
        "<text class=\"al\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        c1(left + pw / 2.0),
        c1(y + 12.0),
        esc(&label)
    );
    18.0
}

fn timeline(c: &Chart) -> String {
    let (mut xr, mut yr) = (Range::new(), Range::new());
    for s in &c.series {
        for &(x, y) in &s.points {
            if ok(x) && ok(y) {
                xr.add(x);
                yr.add(y);
            }
        }
    }
    if yr.is_empty() {
        return no_data(c);
    }
    // Markers widen the x range so an event just before or after the data is still shown.
    for (mx, _) in &c.markers {
        if ok(*mx) {
            xr.add(*mx);
        }
    }
    let (mut ymin, mut ymax) = (yr.min, yr.max);
    // Anchor at zero when the data sit clearly on one side of it, so a rise reads as a rise and not a cliff.
    if ymin > 0.0 && ymin <= ymax * 0.5 {
        ymin = 0.0;
    }
    if ymax < 0.0 && ymax >= ymin * 0.5 {
        ymax = 0.0;
    }
    let y = axis(ymin, ymax, 5);
    let ylabels = tick_labels(&y);
    let left = left_margin(&ylabels, c);
    let pw = VW - left - 18.0;
    let x = axis(xr.min, xr.max, ((pw / 90.0) as usize).clamp(2, 8));
    let xlabels = tick_labels(&x);
    let sx = |v: f64| left + (v - x.lo) / (x.hi - x.lo) * pw;

    let mut body = String::new();
    let mut top = 10.0;
    let names: Vec<&str> = c.series.iter().map(|s| s.name.as_str()).collect();
    top += legend(&mut body, &names, left, top, VW - left - 10.0, false);

    // Marker labels go in rows above the plot, each starting just right of its line (left of it at the right
    // edge), in the first row where it does not overlap the previous label; past MAX_MARKER_ROWS rows, the row
    // that ends furthest left. Rows fill top-down in x order, so a line rising to its label passes left of the
    // labels in the rows below it instead of through them.
    let mut markers: Vec<(f64, String)> =
        c.markers.iter().filter(|(mx, _)| ok(*mx)).map(|(mx, l)| (*mx, trunc(&one_line(l), 36))).collect();
    markers.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut row_ends: Vec<f64> = Vec::new();
    let mut placed: Vec<(f64, f64, usize, String)> = Vec::new();
    for (mx, label) in markers {
        let width = tw(&label, MARKER_FS);
        let cx = sx(mx);
        let x0 = if cx + 3.0 + width <= VW - 2.0 { cx + 3.0 } else { (cx - 3.0 - width).max(2.0) };
        let row = match row_ends.iter().position(|&end| end + 8.0 <= x0) {
            Some(r) => r,
            None if row_ends.len() < MAX_MARKER_ROWS => {
                row_ends.push(f64::NEG_INFINITY);
                row_ends.len() - 1
            }
            None => row_ends.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i),
        };
        row_ends[row] = row_ends[row].max(x0 + width);
        placed.push((cx, x0, row, label));
    }
    const MROW: f64 = 15.0;
    let mtop = top;
    if !row_ends.is_empty() {
        top += row_ends.len() as f64 * MROW + 6.0;
    }
    let bottom = top + PH;
    let sy = |v: f64| top + PH - (v - y.lo) / (y.hi - y.lo) * PH;

    y_axis(&mut body, c, &y, &ylabels, left, top, pw);
    for (i, (t, l)) in x.ticks.iter().zip(&xlabels).enumerate() {
        let px = sx(*t);
        if i > 0 {
            w!(body, "<line class=\"grid\" x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>", c1(px), c1(top), c1(bottom));
        }
        let anchor = if px + tw(l, FS) / 2.0 > VW { "end" } else { "middle" };
        w!(
            body,
            "<text class=\"tk\" x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>\n",
            c1(px),
            c1(bottom + 17.0),
            esc(l)
        );
    }
    w!(body, "<line class=\"ax\" x1=\"{}\" y1=\"{2}\" x2=\"{}\" y2=\"{2}\"/>\n", c1(left), c1(left + pw), c1(bottom));

    body.push_str("<g class=\"mk\">");
    for (cx, _, row, _) in &placed {
        let y1 = mtop + *row as f64 * MROW + 2.0;
        w!(body, "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>", c1(*cx), c1(y1), c1(bottom));
    }
    body.push_str("</g>\n");

    for (i, s) in c.series.iter().enumerate() {
        let mut seg: Vec<(f64, f64)> = Vec::new();
        for &(px, py) in &s.points {
            if ok(px) && ok(py) {
                seg.push((sx(px), sy(py)));
            } else {
                flush_segment(&mut body, &mut seg, i);
            }
        }
        flush_segment(&mut body, &mut seg, i);
    }

    // Labels last, with a halo in the background color, so lines crossing them do not make them unreadable.
    body.push_str("<g class=\"mk\">");
    for (_, x0, row, label) in &placed {
        let ty = mtop + *row as f64 * MROW + 12.0;
        w!(body, "<text x=\"{}\" y=\"{}\">{}</text>", c1(*x0), c1(ty), esc(label));
    }
    body.push_str("</g>\n");

    let h = bottom + 24.0 + x_label(&mut body, c, left, pw, bottom + 24.0) + 4.0;
    let mut o = String::with_capacity(body.len() + 200);
    svg_open(&mut o, c, h);
    o.push_str(&body);
    o.push_str("</svg>");
    o
}

/// Draws the points gathered since the last gap: a polyline, or a dot when a point stands alone between gaps.
fn flush_segment(o: &mut String, seg: &mut Vec<(f64, f64)>, series: usize) {
    match seg.len() {
        0 => {}
        1 => w!(
            o,
            "<circle class=\"{}\" cx=\"{}\" cy=\"{}\" r=\"2.5\"/>\n",
            fill_class(series),
            c1(seg[0].0),
            c1(seg[0].1)
        ),
        _ => {
            let pts: Vec<String> = seg.iter().map(|(x, y)| format!("{},{}", c1(*x), c1(*y))).collect();
            w!(o, "<polyline class=\"{}\" points=\"{}\"/>\n", line_class(series), pts.join(" "));
        }
    }
    seg.clear();
}

/// Where the x labels of a slot chart go.
enum XLabels {
    /// One label under the middle of each slot (bar categories).
    Centered(Vec<String>),
    /// One label per slot boundary, `slots + 1` of them, empty ones skipped (histogram bucket bounds).
    Edges(Vec<String>),
}

/// A chart of equal-width slots along x with one bar per series in each slot: bars and histograms.
struct Slots<'a> {
    chart: &'a Chart,
    /// values[series][slot]
    values: Vec<Vec<Option<f64>>>,
    slots: usize,
    labels: XLabels,
    /// Adjacent bars with a hairline gap, as a histogram is drawn, instead of spaced groups.
    touching: bool,
}

fn bar_index(x: f64) -> Option<usize> {
    if x.is_finite() && x > -0.5 && x < MAX_SLOTS as f64 - 0.5 {
        Some(x.round() as usize)
    } else {
        None
    }
}

fn bars(c: &Chart) -> String {
    let mut slots = c.categories.len().min(MAX_SLOTS);
    for s in &c.series {
        for &(x, y) in &s.points {
            match bar_index(x) {
                Some(i) if ok(y) => slots = slots.max(i + 1),
                _ => {}
            }
        }
    }
    let values = c
        .series
        .iter()
        .map(|s| {
            let mut v = vec![None; slots];
            for &(x, y) in &s.points {
                match bar_index(x) {
                    Some(i) if ok(y) && i < slots => v[i] = Some(y),
                    _ => {}
                }
            }
            v
        })
        .collect();
    let labels = (0..slots).map(|i| c.categories.get(i).map_or_else(|| i.to_string(), |l| one_line(l))).collect();
    slot_chart(Slots { chart: c, values, slots, labels: XLabels::Centered(labels), touching: false })
}

fn histogram(c: &Chart) -> String {
    // +inf is a real bucket bound (the "everything above" bucket), so it is kept and drawn last.
    let bound_ok = |x: f64| ok(x) || x == f64::INFINITY;
    let mut bounds: Vec<f64> =
        c.series.iter().flat_map(|s| &s.points).filter(|(x, y)| bound_ok(*x) && ok(*y)).map(|(x, _)| *x).collect();
    bounds.sort_by(|a, b| a.total_cmp(b));
    bounds.dedup();
    bounds.truncate(MAX_SLOTS);
    let values = c
        .series
        .iter()
        .map(|s| {
            let mut v: Vec<Option<f64>> = vec![None; bounds.len()];
            for &(x, y) in &s.points {
                if !(bound_ok(x) && ok(y)) {
                    continue;
                }
                if let Ok(i) = bounds.binary_search_by(|b| b.total_cmp(&x)) {
                    v[i] = Some(v[i].unwrap_or(0.0) + y);
                }
            }
            v
        })
        .collect();
    let mut edges = vec![String::new()];
    edges.extend(bounds.iter().map(|b| if b.is_infinite() { "+∞".to_string() } else { fmt_num(*b) }));
    slot_chart(Slots { chart: c, values, slots: bounds.len(), labels: XLabels::Edges(edges), touching: true })
}

fn slot_chart(s: Slots) -> String {
    let c = s.chart;
    let n = s.slots;
    let ns = s.values.len();
    let mut yr = Range::new();
    let mut nbars = 0usize;
    for v in s.values.iter().flatten().flatten() {
        if ok(*v) {
            yr.add(*v);
            nbars += 1;
        }
    }
    if n == 0 || yr.is_empty() {
        return no_data(c);
    }
    // Bars grow from zero, so zero is always on the axis.
    let y = axis(yr.min.min(0.0), yr.max.max(0.0), 5);
    let ylabels = tick_labels(&y);

    let (label_list, edges) = match &s.labels {
        XLabels::Centered(l) => (l, false),
        XLabels::Edges(l) => (l, true),
    };
    let full_labels = label_list;
    let mut label_list: Vec<String> = full_labels.iter().map(|l| trunc(l, 18)).collect();
    let mut widest = label_list.iter().map(|l| tw(l, FS)).fold(0.0, f64::max);

    let mut left = left_margin(&ylabels, c);
    let mut sw = (VW - left - 18.0) / n as f64;
    // Labels that do not fit their slot are shortened while a useful part still fits (the full text stays in a
    // tooltip); only narrower slots get labels rotated 45°, which costs height and reads worse.
    let fit_chars = ((sw - 6.0) / (FS * 0.6)).floor().max(0.0) as usize;
    let rotate = widest + 6.0 > sw && fit_chars < 10;
    if widest + 6.0 > sw && !rotate {
        label_list = full_labels.iter().map(|l| trunc(l, fit_chars)).collect();
        widest = label_list.iter().map(|l| tw(l, FS)).fold(0.0, f64::max);
    }
    if rotate {
        // A label rotated 45° reaches left of its slot; the first one must not leave the picture.
        let need = widest * 0.71 - if edges { 0.0 } else { sw / 2.0 } + 4.0;
        left = left.max(need.min(140.0));
        sw = (VW - left - 18.0) / n as f64;
    }
    let pw = sw * n as f64;
    let every = if rotate { ((16.0 / sw).ceil() as usize).max(1) } else { 1 };
    let xlab_h = if rotate { widest * 0.71 + 14.0 } else { 18.0 };

    let (gap, inner) =
        if s.touching && ns == 1 { ((sw * 0.15).min(2.0), sw - (sw * 0.15).min(2.0)) } else { (sw * 0.2, sw * 0.8) };
    let bw = inner / ns.max(1) as f64;

    // Value labels only when few bars; rotated when wider than their bar. Room above (below for negative
    // values) is reserved so they stay inside the picture.
    let show_values = nbars < 30;
    let (mut head, mut foot) = (0.0f64, 0.0f64);
    if show_values {
        for v in s.values.iter().flatten().flatten().filter(|v| ok(**v)) {
            let lw = tw(&fmt_num(*v), VALUE_FS);
            let need = if lw > bw + 2.0 { lw + 6.0 } else { 14.0 };
            if *v >= 0.0 {
                head = head.max(need);
            } else {
                foot = foot.max(need);
            }
        }
    }

    let mut body = String::new();
    let mut top = 10.0;
    let names: Vec<&str> = c.series.iter().map(|s| s.name.as_str()).collect();
    top += legend(&mut body, &names, left, top, VW - left - 10.0, true);
    let ptop = top + head;
    let sy = |v: f64| ptop + PH - (v - y.lo) / (y.hi - y.lo) * PH;
    y_axis(&mut body, c, &y, &ylabels, left, ptop, pw);
    let zero = sy(0.0);
    w!(body, "<line class=\"ax\" x1=\"{}\" y1=\"{2}\" x2=\"{}\" y2=\"{2}\"/>\n", c1(left), c1(left + pw), c1(zero));

    let mut labels_svg = String::new();
    for (si, series) in s.values.iter().enumerate() {
        let class = fill_class(si);
        for (slot, v) in series.iter().enumerate() {
            let v = match v {
                Some(v) if ok(*v) => *v,
                _ => continue,
            };
            let bx = left + slot as f64 * sw + gap / 2.0 + si as f64 * bw;
            let vy = sy(v);
            let mut bh = (vy - zero).abs();
            if v != 0.0 && bh < 0.5 {
                bh = 0.5;
            }
            let by = if v >= 0.0 { zero - bh } else { zero };
            w!(
                body,
                "<rect class=\"{class}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/>\n",
                c1(bx),
                c1(by),
                c1(bw.max(0.3)),
                c1(bh)
            );
            if show_values {
                let text = fmt_num(v);
                let cx = bx + bw / 2.0;
                if tw(&text, VALUE_FS) > bw + 2.0 {
                    let (ty, anchor) = if v >= 0.0 { (by - 4.0, "start") } else { (by + bh + 4.0, "end") };
                    w!(
                        labels_svg,
                        "<text class=\"vl\" transform=\"translate({},{}) rotate(-90)\" text-anchor=\"{anchor}\">{text}</text>",
                        c1(cx + 3.5),
                        c1(ty)
                    );
                } else {
                    let ty = if v >= 0.0 { by - 4.0 } else { by + bh + 11.0 };
                    w!(
                        labels_svg,
                        "<text class=\"vl\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{text}</text>",
                        c1(cx),
                        c1(ty)
                    );
                }
            }
        }
    }
    body.push_str(&labels_svg);
    body.push('\n');

    let ly = ptop + PH + foot;
    for (i, l) in label_list.iter().enumerate() {
        if l.is_empty() || i % every != 0 {
            continue;
        }
        let full = full_labels.get(i).map_or("", String::as_str);
        let tip = if full == l { String::new() } else { format!("<title>{}</title>", esc(full)) };
        let px = if edges { left + i as f64 * sw } else { left + (i as f64 + 0.5) * sw };
        if edges {
            w!(body, "<line class=\"ax\" x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>", c1(px), c1(ly), c1(ly + 4.0));
        }
        if rotate {
            w!(
                body,
                "<text class=\"tk\" transform=\"translate({},{}) rotate(-45)\" text-anchor=\"end\">{}{tip}</text>\n",
                c1(px + 3.0),
                c1(ly + 10.0),
                esc(l)
            );
        } else {
            w!(
                body,
                "<text class=\"tk\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}{tip}</text>\n",
                c1(px),
                c1(ly + 17.0),
                esc(l)
            );
        }
    }
    let xl = ly + xlab_h + 6.0;
    let h = xl + x_label(&mut body, c, left, pw, xl) + 4.0;
    let mut o = String::with_capacity(body.len() + 200);
    svg_open(&mut o, c, h);
    o.push_str(&body);
    o.push_str("</svg>");
    o
}

// ---------------------------------------------------------------------------------------------------------------
// Style

const CSS: &str = r#"
:root{color-scheme:light dark;--bg:#fff;--fg:#1f2328;--muted:#59636e;--border:#d1d9e0;--card:#f6f8fa;--grid:#e8ebef;
--axis:#8c959f;--pass:#1a7f37;--fail:#cf222e;--on-badge:#fff;--link:#0969da;
--c0:#2f6fb7;--c1:#e07b00;--c2:#2e9e4f;--c3:#d1343b;--c4:#8a5cc2;--c5:#1b9aa0;--c6:#b8860b;--c7:#d45d9b;--c8:#7f6048;--c9:#6e7781}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9198a1;--border:#3d444d;--card:#151b23;
--grid:#262c36;--axis:#656c76;--pass:#3fb950;--fail:#f85149;--on-badge:#0d1117;--link:#4493f8;
--c0:#58a6ff;--c1:#ffa657;--c2:#56d364;--c3:#ff7b72;--c4:#bc8cff;--c5:#39c5cf;--c6:#e3b341;--c7:#f778ba;--c8:#c69c6d;--c9:#9198a1}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1440px;margin:0 auto;padding:1rem 1.25rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0 .25rem;overflow-wrap:anywhere}
h2{font-size:1.25rem;margin:2.25rem 0 .5rem;padding-bottom:.3rem;border-bottom:1px solid var(--border);overflow-wrap:anywhere}
h4{margin:1rem 0 .25rem;font-size:.95rem}
a{color:var(--link)}
code{font:.85em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.meta,.muted,.sub{color:var(--muted)}
.meta{margin:0}
.sub{display:block;font-weight:400;font-size:.78rem}
.scroll{overflow-x:auto;margin:.75rem 0;max-width:100%}
table{border-collapse:collapse;font-size:.9rem}
caption{text-align:left;font-weight:600;padding:0 0 .3rem}
th,td{padding:.35rem .65rem;border-bottom:1px solid var(--border);text-align:left;vertical-align:top}
thead th{background:var(--card);white-space:nowrap}
tbody th{font-weight:500;white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.overview td{min-width:16rem}
.totals th,.totals td{font-weight:600}
.badge{display:inline-block;padding:.05rem .4rem;border-radius:.3rem;font-size:.72rem;font-weight:700;letter-spacing:.04em;color:var(--on-badge);vertical-align:.08em}
.badge.pass{background:var(--pass)}
.badge.fail{background:var(--fail)}
.hb{font-size:.8rem;font-weight:500;color:var(--muted);margin-left:.6rem;white-space:nowrap}
.cmp{display:grid;grid-template-columns:repeat(var(--n,2),minmax(0,1fr));gap:1rem;align-items:start}
.col{min-width:0}
.result{border:1px solid var(--border);border-left-width:4px;border-radius:.5rem;padding:.75rem 1rem;margin:.75rem 0;min-width:0}
.result.pass{border-left-color:var(--pass)}
.result.fail{border-left-color:var(--fail)}
.rhead{display:flex;flex-wrap:wrap;gap:.5rem;align-items:baseline}
.fe{font-weight:700;font-size:1.05rem}
.summary{margin:.5rem 0}
.notes{margin:.25rem 0;padding-left:1.25rem}
.notes li{margin:.2rem 0}
figure.chart{margin:1.25rem 0 .5rem}
figcaption{font-weight:600;font-size:.9rem;margin-bottom:.25rem}
.chart svg{display:block;width:100%;height:auto;max-width:580px}
.chart text{fill:var(--fg);font-size:13px}
.chart .tk,.chart .vl{fill:var(--muted)}
.chart .vl{font-size:11px}
.chart .grid{stroke:var(--grid)}
.chart .ax{stroke:var(--axis)}
.chart polyline{fill:none;stroke-width:2;stroke-linejoin:round;stroke-linecap:round}
.chart .lg line{stroke-width:3}
.chart .d{stroke-dasharray:7 4}
.chart .h{fill-opacity:.55}
.chart .mk line{stroke:var(--muted);stroke-dasharray:4 3}
.chart .mk text{font-size:12px;paint-order:stroke;stroke:var(--bg);stroke-width:3px;stroke-linejoin:round}
.chart .nd{fill:none;stroke:var(--border);stroke-dasharray:5 4}
.chart .ndt{fill:var(--muted)}
.s0{stroke:var(--c0)}.s1{stroke:var(--c1)}.s2{stroke:var(--c2)}.s3{stroke:var(--c3)}.s4{stroke:var(--c4)}
.s5{stroke:var(--c5)}.s6{stroke:var(--c6)}.s7{stroke:var(--c7)}.s8{stroke:var(--c8)}.s9{stroke:var(--c9)}
.f0{fill:var(--c0)}.f1{fill:var(--c1)}.f2{fill:var(--c2)}.f3{fill:var(--c3)}.f4{fill:var(--c4)}
.f5{fill:var(--c5)}.f6{fill:var(--c6)}.f7{fill:var(--c7)}.f8{fill:var(--c8)}.f9{fill:var(--c9)}
@media (max-width:900px){.cmp{grid-template-columns:minmax(0,1fr)}}
@media (max-width:600px){body{font-size:14px}main{padding:.75rem .5rem 2rem}.result{padding:.5rem .45rem;border-radius:.35rem}
table.overview td{min-width:12rem}}
"#;

#[cfg(test)]
mod tests {
    use super::super::model::{Chart, ChartKind, Run, ScenarioResult, Series, Table};
    use super::*;

    fn chart(kind: ChartKind, title: &str, series: Vec<Series>) -> Chart {
        Chart {
            title: title.into(),
            kind,
            x_label: "seconds".into(),
            y_label: "value".into(),
            categories: Vec::new(),
            series,
            markers: Vec::new(),
        }
    }

    fn series(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points }
    }

    fn sample_run(front_end: &str) -> Run {
        let mut ok = ScenarioResult::new("connectivity");
        ok.passed = true;
        ok.summary = "10/10 clients connected, CONNACK p50 0.4 ms".into();
        ok.duration_ms = 1234;
        ok.metric("connack_p50_ms", 0.4000001, "ms");
        ok.metric("connected", 10.0, "clients");

        let mut bad = ScenarioResult::new("failover");
        bad.summary = "gap <3 s> & \"lost\" 'some'".into();
        bad.duration_ms = 61_500;
        bad.metric("gap_ms", 3210.5, "ms");
        bad.metric("lost", 12.0, "messages");
        bad.notes.push("broker <b>1</b> was killed & nobody noticed".into());
        bad.tables.push(Table {
            title: "Per broker".into(),
            columns: vec!["broker".into(), "messages".into()],
            rows: vec![vec!["b1".into(), "100".into()], vec!["<b2>".into()]],
        });
        let mut tl = chart(
            ChartKind::Timeline,
            "Delivered per second",
            vec![
                series("sent", (0..20).map(|i| (i as f64 * 0.5, (i * 3) as f64)).collect()),
                series(
                    "received",
                    (0..20)
                        .map(|i| (i as f64 * 0.5, if (6..9).contains(&i) { f64::NAN } else { (i * 2) as f64 }))
                        .collect(),
                ),
            ],
        );
        tl.markers = vec![(3.2, "broker1 killed".into()), (3.4, "reconnect <fast>".into()), (7.0, "recovered".into())];
        let mut bars = chart(
            ChartKind::Bars,
            "Messages per broker",
            vec![series("sent", vec![(0.0, 100.0), (1.0, 80.0), (2.0, 0.0)]), series("lost", vec![(1.0, 12.0)])],
        );
        bars.categories = vec!["broker1".into(), "broker2".into(), "broker3".into()];
        let hist = chart(
            ChartKind::Histogram,
            "Reconnect latency",
            vec![series("latency", vec![(1.0, 2.0), (2.0, 5.0), (5.0, 9.0), (10.0, 3.0), (f64::INFINITY, 1.0)])],
        );
        bad.charts = vec![tl, bars, hist];
        Run {
            front_end: front_end.into(),
            front_address: "127.0.0.1:1883".into(),
            started_ms: 1_700_000_000_000,
            results: vec![ok, bad],
        }
    }

    fn count(hay: &str, needle: &str) -> usize {
        hay.matches(needle).count()
    }

    #[test]
    fn one_run_renders_escaped_with_one_svg_per_chart() {
        let runs = [sample_run("meshgate")];
        let html = html("suite <one> & 'two'", &runs);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.ends_with("</html>\n"));
        assert!(html.contains("suite &lt;one&gt; &amp; &#39;two&#39;"));
        assert!(html.contains("gap &lt;3 s&gt; &amp; &quot;lost&quot; &#39;some&#39;"));
        assert!(html.contains("broker &lt;b&gt;1&lt;/b&gt; was killed &amp; nobody noticed"));
        assert!(html.contains("reconnect &lt;fast&gt;"));
        assert!(html.contains("&lt;b2&gt;"));
        assert!(!html.contains("<b>"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(html.contains("2023-11-14 22:13:20 UTC"));
        let charts: usize = runs.iter().flat_map(|r| &r.results).map(|r| r.charts.len()).sum();
        assert_eq!(count(&html, "<svg"), charts);
        assert_eq!(count(&html, "<svg"), 3);
        assert_eq!(count(&html, "<title>"), 1 + charts);
        assert!(html.contains("<title>Delivered per second</title>"));
        // A NaN gap splits the received line in two; the sent line is one.
        assert_eq!(count(&html, "<polyline"), 3);
        assert!(html.contains("0.4 ms"));
        assert!(html.contains("1 min 1 s"));
        assert!(html.contains("+∞"));
        assert!(!html.contains("NaN"));
        assert!(html.contains(">PASS<") && html.contains(">FAIL<"));
        assert!(html.contains("1 passed, 1 failed"));
    }

    #[test]
    fn two_runs_render_side_by_side() {
        let mut nginx = sample_run("nginx");
        nginx.results[1].metrics.push(Metric { name: "nginx_only".into(), value: 1.5, unit: "%".into() });
        let runs = [sample_run("meshgate"), nginx];
        let html = html("compare", &runs);
        assert_eq!(count(&html, "<svg"), 6);
        assert_eq!(count(&html, "class=\"cmp\""), 2);
        let start = html.find("<table class=\"cmpm\">").expect("comparison table");
        let table = &html[start..start + html[start..].find("</table>").unwrap()];
        assert!(table.contains("meshgate") && table.contains("nginx"));
        let failover = html.rfind("<table class=\"cmpm\">").unwrap();
        let table = &html[failover..failover + html[failover..].find("</table>").unwrap()];
        assert!(table.contains("<code>nginx_only</code>"));
        assert!(table.contains("1.5%"));
        assert!(table.contains("—"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn no_runs_still_render() {
        let html = html("empty", &[]);
        assert!(html.contains("No runs"));
        assert_eq!(terminal_summary(&[]), "0 passed, 0 failed\n");
        assert_eq!(json_lines(&[]), "");
    }

    #[test]
    fn terminal_summary_counts() {
        let runs = [sample_run("meshgate"), sample_run("nginx")];
        let s = terminal_summary(&runs);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines.last(), Some(&"2 passed, 2 failed"));
        assert!(lines[0].starts_with("meshgate  PASS  connectivity"));
        assert!(lines[3].starts_with("nginx     FAIL  failover"));
        assert!(s.ends_with('\n'));
        let mut one = sample_run("x");
        one.results[1].summary = "two\nlines\x1b[31m".into();
        let s = terminal_summary(&[one]);
        assert_eq!(s.lines().count(), 3);
        assert_eq!(s.lines().last(), Some("1 passed, 1 failed"));
    }

    #[test]
    fn json_lines_one_object_per_result() {
        let runs = [sample_run("meshgate"), sample_run("nginx")];
        let s = json_lines(&runs);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4);
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
            assert!(v.is_object());
            assert_eq!(v["front_end"], if i < 2 { "meshgate" } else { "nginx" });
            assert_eq!(v["started_ms"], 1_700_000_000_000u64);
            assert_eq!(v["scenario"], if i % 2 == 0 { "connectivity" } else { "failover" });
        }
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["passed"], false);
        assert_eq!(v["charts"][0]["kind"], "timeline");
        assert!(v["charts"][0]["series"][1]["points"][6][1].is_null());
    }

    /// Every kind of chart, fed hostile data, yields one well-formed-looking svg with no NaN or inf coordinates.
    #[test]
    fn degenerate_charts_do_not_panic() {
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![series("", vec![])],
            vec![series("only nan", vec![(nan, nan), (1.0, nan), (nan, 2.0)])],
            vec![series("one point", vec![(2.0, 5.0)])],
            vec![series("zero range", vec![(0.0, 0.0), (0.0, 0.0)])],
            vec![series("flat", vec![(1.0, 7.0), (2.0, 7.0), (3.0, 7.0)])],
            vec![series("unbounded", vec![(0.0, inf), (1.0, -inf), (2.0, 1.0), (inf, 3.0)])],
            vec![series("negative", vec![(-5.0, -3.0), (-1.0, -100.0), (0.0, -0.5)])],
            vec![series("huge", vec![(0.0, 1e299), (1.0, -1e299), (2.0, f64::MAX)])],
            vec![series("tiny", vec![(0.0, 1e-310), (1e-300, 2e-310)])],
            vec![series("magnitude", vec![(1e9, 1e9 + 1e-6), (1e9 + 1e-6, 1e9)])],
            vec![series("stray index", vec![(1e12, 1.0), (-3.0, 2.0), (0.4, 3.0)])],
            (0..25).map(|i| series(&format!("series {i}"), vec![(i as f64, i as f64)])).collect(),
            vec![series("many", (0..2000).map(|i| (i as f64, (i as f64).sin())).collect())],
        ];
        for kind in [ChartKind::Timeline, ChartKind::Bars, ChartKind::Histogram] {
            for s in &cases {
                let mut c = chart(kind.clone(), "t", s.clone());
                c.markers = vec![(nan, "nan marker".into()), (1.0, String::new()), (1.0, "same place".into())];
                let svg = chart_svg(&c);
                assert_eq!(count(&svg, "<svg"), 1, "{kind:?} {s:?}");
                assert!(svg.contains("<title>t</title>"));
                assert!(svg.ends_with("</svg>"));
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "{kind:?} {s:?}: {svg}");
            }
        }
        let c = chart(ChartKind::Timeline, "nan", vec![series("x", vec![(0.0, nan), (1.0, nan)])]);
        assert!(chart_svg(&c).contains("no data"));
        let c = chart(ChartKind::Timeline, "single", vec![series("x", vec![(3.0, 4.0)])]);
        let svg = chart_svg(&c);
        assert!(svg.contains("<circle") && !svg.contains("no data"));
    }

    #[test]
    fn bars_without_categories_and_many_bars() {
        let mut c = chart(ChartKind::Bars, "b", vec![series("v", (0..50).map(|i| (i as f64, i as f64)).collect())]);
        let svg = chart_svg(&c);
        assert_eq!(count(&svg, "<rect"), 50 + 1);
        assert!(!svg.contains("class=\"vl\""), "no value labels with 50 bars");
        c.series[0].points.truncate(5);
        assert_eq!(count(&chart_svg(&c), "class=\"vl\""), 5);
        // Long labels in wide slots are shortened, with the full text kept as a tooltip; in narrow ones, rotated.
        c.categories = (0..5).map(|i| format!("a rather long category name {i}")).collect();
        let svg = chart_svg(&c);
        assert!(svg.contains("…<title>a rather long category name 0</title>"));
        assert!(!svg.contains("rotate(-45)"));
        c.series[0].points = (0..20).map(|i| (i as f64, 1.0)).collect();
        assert!(chart_svg(&c).contains("rotate(-45)"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(1.0000001), "1");
        assert_eq!(fmt_num(0.1 + 0.2), "0.3");
        assert_eq!(fmt_num(12.34567), "12.346");
        assert_eq!(fmt_num(0.000123456), "0.000123");
        assert_eq!(fmt_num(-0.0), "0");
        assert_eq!(fmt_num(42.0), "42");
        assert_eq!(fmt_num(-3.5), "-3.5");
        assert_eq!(fmt_num(f64::NAN), "NaN");
        assert_eq!(fmt_num(2e20), "2.000e20");
        assert_eq!(fmt_duration(850), "850 ms");
        assert_eq!(fmt_duration(1500), "1.5 s");
    }

    #[test]
    fn ticks_are_round() {
        let a = axis(0.0, 9.3, 5);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 10.0, 2.0));
        assert_eq!(tick_labels(&a), ["0", "2", "4", "6", "8", "10"]);
        let a = axis(-0.13, 0.42, 6);
        assert_eq!(a.step, 0.1);
        assert_eq!(tick_labels(&a).first().map(String::as_str), Some("-0.2"));
        assert!(tick_labels(&a).contains(&"0.0".to_string()));
        let a = axis(0.0, 25_000.0, 5);
        assert_eq!(tick_labels(&a).last().map(String::as_str), Some("25k"));
        let a = axis(5.0, 5.0, 5);
        assert!(a.lo < 5.0 && a.hi > 5.0);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_utc(1_700_000_000_999), "2023-11-14 22:13:20 UTC");
        assert_eq!(fmt_utc(4_102_444_799_000), "2099-12-31 23:59:59 UTC");
        let _ = fmt_utc(u64::MAX);
    }
}
