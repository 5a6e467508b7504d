//! Renders suite runs as one self-contained HTML report (tables and inline SVG charts, no scripts or network
//! needed to view it), as JSON lines, and as the terminal's summary.

use std::time::{Duration, UNIX_EPOCH};

use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Serialize;

use super::model::{Metric, Run, ScenarioResult, Table};
use crate::report::chart::{self, Look};
use crate::report::{fmt_num, one_line, Text};

/// The whole report as one HTML document: overview, then one section per scenario; with two or more runs the
/// results of each scenario stand side by side, one column per run.
pub fn html(title: &str, runs: &[Run]) -> String {
    let keys = scenario_keys(runs);
    let page = html! {
        (DOCTYPE) "\n"
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (Text(title)) }
                style { (PreEscaped(CSS)) (PreEscaped(chart::CSS)) }
            } "\n"
            body { main {
                header {
                    h1 { (Text(title)) }
                    @if let Some(first) = runs.first() {
                        p.meta {
                            "Started " (fmt_utc(first.started_ms)) " · front end" @if runs.len() != 1 { "s" } ": "
                            @for (i, run) in runs.iter().enumerate() {
                                @if i > 0 { ", " }
                                (Text(&run.front_end))
                            }
                        }
                    } @else {
                        p.meta { "No runs were recorded." }
                    }
                } "\n"
                @if !runs.is_empty() {
                    (overview(runs, &keys))
                    @for (i, key) in keys.iter().enumerate() {
                        (scenario_section(runs, key, i))
                    }
                }
            } }
        }
    };
    let mut out = page.into_string();
    out.push('\n');
    out
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
    out.push_str(&format!("{passed} passed, {failed} failed\n"));
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

fn badge(passed: bool) -> Markup {
    html! {
        @if passed { span.badge.pass { "PASS" } } @else { span.badge.fail { "FAIL" } }
    }
}

fn overview(runs: &[Run], keys: &[Key]) -> Markup {
    html! {
        section {
            h2 { "Overview" } "\n"
            div.scroll { table.overview {
                thead { tr {
                    th scope="col" { "Scenario" }
                    @for run in runs {
                        th scope="col" {
                            (Text(&run.front_end))
                            span.sub { (Text(&run.front_address)) " · " (fmt_utc(run.started_ms)) }
                        }
                    }
                } } "\n"
                tbody {
                    @for (i, key) in keys.iter().enumerate() {
                        tr {
                            th scope="row" { a href={ "#" (key.anchor(i)) } { (Text(&key.label())) } }
                            @for run in runs {
                                @if let Some(r) = key.find(run) {
                                    td { (badge(r.passed)) " " span.sum { (Text(&r.summary)) } }
                                } @else {
                                    td.muted { "not run" }
                                }
                            }
                        } "\n"
                    }
                    tr.totals {
                        th scope="row" { "Total" }
                        @for run in runs {
                            @let passed = run.results.iter().filter(|r| r.passed).count();
                            td { (passed) " passed, " (run.results.len() - passed) " failed" }
                        }
                    } "\n"
                }
            } }
        } "\n"
    }
}

fn scenario_section(runs: &[Run], key: &Key, index: usize) -> Markup {
    let compared = runs.len() >= 2;
    html! {
        section.scenario id=(key.anchor(index)) {
            h2 {
                (Text(&key.label()))
                @if compared {
                    @for run in runs {
                        @if let Some(r) = key.find(run) {
                            " " span.hb { (Text(&run.front_end)) " " (badge(r.passed)) }
                        }
                    }
                }
            } "\n"
            @if compared {
                (metrics_comparison(runs, key))
                div.cmp style={ "--n:" (runs.len()) } {
                    @for run in runs {
                        div.col {
                            @if let Some(r) = key.find(run) {
                                (result(run, r))
                            } @else {
                                article.result {
                                    header.rhead { span.fe { (Text(&run.front_end)) } }
                                    p.muted { "Not run against this front end." }
                                }
                            }
                        } "\n"
                    }
                }
            } @else if let Some((run, r)) = runs.first().and_then(|run| key.find(run).map(|r| (run, r))) {
                (result(run, r))
            }
        } "\n"
    }
}

/// Rows are metric names (union over runs, first-seen order), columns are runs.
fn metrics_comparison(runs: &[Run], key: &Key) -> Markup {
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
        return html! {};
    }
    html! {
        div.scroll { table.cmpm {
            caption { "Metrics compared" }
            thead { tr {
                th scope="col" { "Metric" }
                @for run in runs { th.num scope="col" { (Text(&run.front_end)) } }
            } } "\n"
            tbody {
                @for name in names {
                    tr {
                        th scope="row" { code { (Text(name)) } }
                        @for r in &results {
                            @if let Some(m) = r.and_then(|r| r.metrics.iter().find(|m| m.name == name)) {
                                td.num { (Text(&fmt_metric(m))) }
                            } @else {
                                td.num.muted { "—" }
                            }
                        }
                    } "\n"
                }
            }
        } } "\n"
    }
}

fn result(run: &Run, r: &ScenarioResult) -> Markup {
    html! {
        article.result.pass[r.passed].fail[!r.passed] {
            header.rhead {
                span.fe { (Text(&run.front_end)) } " " (badge(r.passed)) " "
                span.muted { (fmt_duration(r.duration_ms)) }
            } "\n"
            @if !r.summary.is_empty() {
                p.summary { (Text(&r.summary)) } "\n"
            }
            @if !r.metrics.is_empty() {
                div.scroll { table.metrics {
                    thead { tr { th scope="col" { "Metric" } th.num scope="col" { "Value" } } } "\n"
                    tbody {
                        @for m in &r.metrics {
                            tr { th scope="row" { code { (Text(&m.name)) } } td.num { (Text(&fmt_metric(m))) } } "\n"
                        }
                    }
                } } "\n"
            }
            @for t in &r.tables {
                (data_table(t))
            }
            @if !r.notes.is_empty() {
                h4 { "Notes" } "\n"
                ul.notes {
                    @for n in &r.notes { li { (Text(n)) } "\n" }
                } "\n"
            }
            @for c in &r.charts {
                figure.chart { figcaption { (Text(&c.title)) } "\n" (chart::render(c, Look::Page)) "\n" } "\n"
            }
        } "\n"
    }
}

fn data_table(t: &Table) -> Markup {
    // Ragged rows are padded so every row has as many cells as the widest one.
    let ncols = t.rows.iter().map(Vec::len).max().unwrap_or(0).max(t.columns.len()).max(1);
    let cell = |row: &[String], i: usize| row.get(i).map_or("", String::as_str).to_owned();
    html! {
        div.scroll { table.data {
            @if !t.title.is_empty() { caption { (Text(&t.title)) } } "\n"
            @if !t.columns.is_empty() {
                thead { tr {
                    @for i in 0..ncols { th scope="col" { (Text(&cell(&t.columns, i))) } }
                } } "\n"
            }
            tbody {
                @if t.rows.is_empty() {
                    tr { td.muted colspan=(ncols) { "no rows" } } "\n"
                }
                @for row in &t.rows {
                    tr {
                        @for i in 0..ncols {
                            @let cell = cell(row, i);
                            // Numbers right-aligned so columns of them can be compared by eye.
                            td class=[cell.trim().parse::<f64>().is_ok().then_some("num")] { (Text(&cell)) }
                        }
                    } "\n"
                }
            }
        } } "\n"
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Text

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
    use std::fmt::Write as _;
    let mut rfc3339 = String::new();
    // humantime writes years up to 9999 and refuses later ones with an error, not a panic.
    let written = UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .map(|t| write!(rfc3339, "{}", humantime::format_rfc3339_seconds(t)));
    match written {
        // "2023-11-14T22:13:20Z"
        Some(Ok(())) => format!("{} UTC", rfc3339.trim_end_matches('Z').replacen('T', " ", 1)),
        _ => format!("{ms} ms after 1970-01-01 00:00:00 UTC"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Style (the page's own; the charts' rules are `chart::CSS`)

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
@media (max-width:900px){.cmp{grid-template-columns:minmax(0,1fr)}}
@media (max-width:600px){body{font-size:14px}main{padding:.75rem .5rem 2rem}.result{padding:.5rem .45rem;border-radius:.35rem}
table.overview td{min-width:12rem}}
"#;

#[cfg(test)]
mod tests {
    use super::super::model::{ChartKind, Run, ScenarioResult, Table};
    use super::*;
    use crate::report::chart::tests::{chart, series};

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
    fn utc_dates() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_utc(1_700_000_000_999), "2023-11-14 22:13:20 UTC");
        assert_eq!(fmt_utc(4_102_444_799_000), "2099-12-31 23:59:59 UTC");
        let _ = fmt_utc(u64::MAX);
    }
}
