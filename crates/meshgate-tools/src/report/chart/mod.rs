//! SVG charts for both reports, drawn by one kit: the suite's timelines, bar charts and histograms
//! (described as data by [`Chart`]) and the benchmark comparison's horizontal bar groups ([`HBars`]).
//!
//! A chart is drawn in one of two [`Look`]s. On the suite's page it is inline and coloured by the
//! page's stylesheet, which includes [`CSS`] with a light and a dark palette; as a file of its
//! own (docs/benchmarks-*.svg) it carries the same rules with fixed colours, a white background
//! and its title as a heading. Either way shapes carry classes, never colours, so the two looks
//! cannot drift apart.

mod hbars;
mod slots;
mod timeline;

use maud::{html, Markup, PreEscaped, Render};
use serde::Serialize;

use super::Text;
pub use hbars::{BarGroup, HBars, Rule, RuleStyle, Scale};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChartKind {
    /// x = seconds since the scenario started; one line per series.
    Timeline,
    /// x = category index (labels in `categories`), y = value; one bar group per category.
    Bars,
    /// Values as a distribution; `points` x = bucket upper bound, y = count.
    Histogram,
}

#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    pub title: String,
    pub kind: ChartKind,
    pub x_label: String,
    pub y_label: String,
    /// Category labels for Bars.
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    /// Vertical markers on a timeline: (x, label), e.g. (3.2, "broker1 killed").
    pub markers: Vec<(f64, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Where a chart is shown, which decides its size and where its colours come from.
#[derive(Debug, Clone, Copy)]
pub enum Look<'a> {
    /// Inline in the suite's HTML page, coloured by the page's stylesheet (light and dark).
    Page,
    /// An .svg file of its own: wider, on white, titled, with `colors[i]` for series `i`.
    File { colors: &'a [&'static str] },
}

/// The sizes a look gives a chart, in viewBox units.
struct Canvas {
    width: f64,
    /// Height of the data area.
    plot_h: f64,
    /// Where drawing starts: below the heading, in a file.
    top: f64,
}

impl Look<'_> {
    fn canvas(&self) -> Canvas {
        match self {
            // Narrow enough that text stays legible when a chart is scaled down to a phone-width column.
            Look::Page => Canvas { width: 480.0, plot_h: 180.0, top: 10.0 },
            Look::File { .. } => Canvas { width: 760.0, plot_h: 240.0, top: 10.0 + HEADING },
        }
    }
}

/// One of the suite's charts as SVG.
pub fn render(c: &Chart, look: Look<'_>) -> Markup {
    match c.kind {
        ChartKind::Timeline => timeline::draw(c, look),
        ChartKind::Bars => slots::bars(c, look),
        ChartKind::Histogram => slots::histogram(c, look),
    }
}

const FS: f64 = 13.0;
/// Marker label and bar value label sizes; the CSS sets the same sizes.
const MARKER_FS: f64 = 12.0;
const VALUE_FS: f64 = 11.0;
/// Height of a file's title line.
const HEADING: f64 = 28.0;
const PALETTE: usize = 10;

/// Values beyond this are treated like NaN: ranges built from them would overflow to infinity.
fn ok(v: f64) -> bool {
    v.is_finite() && v.abs() < 1e300
}

/// Approximate rendered width of text; SVG cannot measure, and an estimate is enough to avoid overlaps.
fn tw(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.6
}

/// A coordinate, written with one decimal to keep the document small (and as 0 if not finite,
/// so no NaN or inf ever reaches the SVG).
#[derive(Clone, Copy)]
struct N(f64);

impl Render for N {
    fn render_to(&self, out: &mut String) {
        let v = self.0;
        let r = if v.is_finite() { (v * 10.0).round() / 10.0 } else { 0.0 };
        if r == r.trunc() {
            out.push_str(&(r as i64).to_string());
        } else {
            out.push_str(&format!("{r:.1}"));
        }
    }
}

/// The class that strokes a line in series `i`'s colour. Past the palette, colours repeat; a
/// dash pattern keeps those series apart.
fn line_class(i: usize) -> String {
    if i >= PALETTE {
        format!("s{} d", i % PALETTE)
    } else {
        format!("s{i}")
    }
}

/// The class that fills a shape in series `i`'s colour (paler past the palette).
fn fill_class(i: usize) -> String {
    if i >= PALETTE {
        format!("f{} h", i % PALETTE)
    } else {
        format!("f{i}")
    }
}

/// The `<svg>` element around a chart's body, `height` tall.
fn frame(look: Look<'_>, title: &str, height: f64, body: &[Markup]) -> Markup {
    let cv = look.canvas();
    let (w, h) = (N(cv.width), N(height));
    match look {
        Look::Page => html! {
            svg viewBox={ "0 0 " (w) " " (h) } width=(w) height=(h) role="img" {
                title { (Text(title)) } "\n"
                @for part in body { (part) }
            }
        },
        Look::File { colors } => html! {
            svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox={ "0 0 " (w) " " (h) } width=(w) height=(h)
                role="img" {
                title { (Text(title)) } "\n"
                style { (PreEscaped(file_css(colors))) } "\n"
                // A fill attribute and not a class: without it a viewer that skips the
                // stylesheet would paint the whole picture black.
                rect width=(w) height=(h) fill="#fff" {}
                text.hd x=(N(cv.width / 2.0)) y="22" text-anchor="middle" { (Text(title)) } "\n"
                @for part in body { (part) }
            }
        },
    }
}

/// A frame saying "no data", for a chart with nothing finite to draw.
fn no_data(look: Look<'_>, title: &str) -> Markup {
    let cv = look.canvas();
    let body = html! {
        rect.nd x="1" y=(N(cv.top - 9.0)) width=(N(cv.width - 2.0)) height="62" rx="6" {}
        text.ndt x=(N(cv.width / 2.0)) y=(N(cv.top + 27.0)) text-anchor="middle" { "no data" } "\n"
    };
    frame(look, title, cv.top + 54.0, &[body])
}

/// How a legend shows a series' colour.
#[derive(Clone, Copy, PartialEq)]
enum Swatch {
    Line,
    Box,
}

/// Legend in rows that wrap at `width`; returns it and the height used (0 when no series has a name).
fn legend(names: &[&str], x0: f64, y0: f64, width: f64, swatch: Swatch) -> (Markup, f64) {
    if names.iter().all(|n| n.is_empty()) {
        return (html! {}, 0.0);
    }
    const ROW: f64 = 18.0;
    let (mut x, mut y) = (x0, y0);
    let mut items = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let label = super::trunc(name, 40);
        let item_w = 22.0 + tw(&label, FS) + 14.0;
        if x > x0 && x + item_w > x0 + width {
            x = x0;
            y += ROW;
        }
        items.push((i, x, y, label));
        x += item_w;
    }
    let markup = html! {
        g.lg {
            @for (i, x, y, label) in &items {
                @if swatch == Swatch::Box {
                    rect class=(fill_class(*i)) x=(N(*x)) y=(N(y + 4.0)) width="14" height="10" {}
                } @else {
                    line class=(line_class(*i)) x1=(N(*x)) y1=(N(y + 9.0)) x2=(N(x + 16.0)) y2=(N(y + 9.0)) {}
                }
                text x=(N(x + 22.0)) y=(N(y + 13.0)) { (Text(label)) }
            }
        } "\n"
    };
    (markup, y - y0 + ROW + 6.0)
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

/// Room left of the plot for tick labels and the rotated y label.
fn left_margin(labels: &[String], c: &Chart) -> f64 {
    let widest = labels.iter().map(|l| tw(l, FS)).fold(0.0, f64::max);
    (widest + 10.0 + if c.y_label.is_empty() { 4.0 } else { 20.0 }).clamp(28.0, 160.0)
}

/// The title a chart is announced by; one without a title is named by its kind.
fn title(c: &Chart) -> &str {
    if !c.title.is_empty() {
        return &c.title;
    }
    match c.kind {
        ChartKind::Timeline => "timeline",
        ChartKind::Bars => "bar chart",
        ChartKind::Histogram => "histogram",
    }
}

/// Horizontal grid lines, y tick labels, the y axis line and the y axis label, for a plot whose
/// data area starts at `top`.
fn y_axis(look: Look<'_>, c: &Chart, y: &Axis, labels: &[String], left: f64, top: f64, pw: f64) -> Markup {
    let ph = look.canvas().plot_h;
    let sy = |v: f64| top + ph - (v - y.lo) / (y.hi - y.lo) * ph;
    let label = trunc_to(&c.y_label, ph);
    html! {
        @for (t, l) in y.ticks.iter().zip(labels) {
            line.grid x1=(N(left)) y1=(N(sy(*t))) x2=(N(left + pw)) y2=(N(sy(*t))) {}
            text.tk x=(N(left - 6.0)) y=(N(sy(*t) + 4.0)) text-anchor="end" { (Text(l)) } "\n"
        }
        line.ax x1=(N(left)) y1=(N(top)) x2=(N(left)) y2=(N(top + ph)) {}
        @if !label.is_empty() {
            text.al transform={ "translate(14," (N(top + ph / 2.0)) ") rotate(-90)" } text-anchor="middle" {
                (Text(&label))
            } "\n"
        }
    }
}

/// The x axis label centred under the plot at `y`; returns it and the height it takes.
fn x_label(c: &Chart, left: f64, pw: f64, y: f64) -> (Markup, f64) {
    if c.x_label.is_empty() {
        return (html! {}, 0.0);
    }
    let label = trunc_to(&c.x_label, pw);
    let m = html! { text.al x=(N(left + pw / 2.0)) y=(N(y + 12.0)) text-anchor="middle" { (Text(&label)) } "\n" };
    (m, 18.0)
}

/// `s` shortened to what fits in `room` units of axis-label text.
fn trunc_to(s: &str, room: f64) -> String {
    super::trunc(s, (room / (FS * 0.6)) as usize)
}

/// The rules for what a chart draws, included by the suite's page (with its palettes) and, with
/// fixed colours, by every chart written as a file.
pub const CSS: &str = r#"
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
"#;

/// What only a file needs: a font, since no page gives one, and the heading.
const FILE_CSS: &str = r#".chart{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.chart .hd{font-size:15px;font-weight:700}"#;

/// The page's light colours, for a file that cannot look them up.
const FILE_COLORS: [(&str, &str); 6] = [
    ("--bg", "#fff"),
    ("--fg", "#1f2328"),
    ("--muted", "#59636e"),
    ("--border", "#d1d9e0"),
    ("--grid", "#e8ebef"),
    ("--axis", "#8c959f"),
];

/// [`CSS`] with every colour written out: a standalone SVG may be shown by viewers that know
/// stylesheets but not CSS variables.
fn file_css(series: &[&str]) -> String {
    let mut css = format!("{FILE_CSS}{CSS}");
    for (var, color) in FILE_COLORS {
        css = css.replace(&format!("var({var})"), color);
    }
    for i in 0..PALETTE {
        css = css.replace(&format!("var(--c{i})"), series.get(i).copied().unwrap_or("#6e7781"));
    }
    css
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A chart with axis labels and no categories or markers, for tests here and in the reports.
    pub(crate) fn chart(kind: ChartKind, title: &str, series: Vec<Series>) -> Chart {
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

    pub(crate) fn series(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points }
    }

    fn chart_svg(c: &Chart) -> String {
        render(c, Look::Page).into_string()
    }

    fn count(hay: &str, needle: &str) -> usize {
        hay.matches(needle).count()
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

    /// A file stands alone: its own namespace, background, heading and colours, no variables
    /// left for a page to fill in, and its series in the colours it was given.
    #[test]
    fn a_file_carries_its_own_style() {
        let mut c = chart(
            ChartKind::Timeline,
            "Clients <back>",
            vec![series("nginx", vec![(0.0, 0.0), (1.0, 50.0), (2.0, 100.0)]), series("meshgate", vec![(0.0, 100.0)])],
        );
        c.markers = vec![(1.5, "2 s target".into())];
        let svg = render(&c, Look::File { colors: &["#2e8b57", "#e8772e"] }).into_string();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
        assert!(svg.ends_with("</svg>"));
        assert!(!svg.contains("var("), "{svg}");
        assert!(svg.contains(".s0{stroke:#2e8b57}") && svg.contains(".f1{fill:#e8772e}"));
        assert_eq!(count(&svg, "Clients &lt;back&gt;"), 2, "title and heading");
        assert!(svg.contains("2 s target"));
        let page = render(&c, Look::Page).into_string();
        assert!(!page.contains("xmlns") && !page.contains("<style"));
    }

    #[test]
    fn coordinates_are_short_and_finite() {
        let s = |v: f64| html! { (N(v)) }.into_string();
        assert_eq!(
            (s(1.0), s(1.25), s(-0.04), s(f64::NAN), s(f64::INFINITY)),
            ("1".into(), "1.3".into(), "0".into(), "0".into(), "0".into())
        );
    }
}
