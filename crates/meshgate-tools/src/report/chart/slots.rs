//! Vertical bar charts and histograms: equal-width slots along x with one bar per series in
//! each slot, labelled under the slot (categories) or at its edges (bucket bounds).

use maud::{html, Markup};

use super::{
    axis, fill_class, frame, left_margin, legend, no_data, ok, tick_labels, title, tw, x_label, y_axis, Chart, Look,
    Range, Swatch, FS, N, VALUE_FS,
};
use crate::report::{fmt_num, one_line, trunc, Text};

/// Most categories or histogram buckets drawn; more would be hairlines anyway.
const MAX_SLOTS: usize = 400;

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

pub(super) fn bars(c: &Chart, look: Look<'_>) -> Markup {
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
    draw(Slots { chart: c, values, slots, labels: XLabels::Centered(labels), touching: false }, look)
}

pub(super) fn histogram(c: &Chart, look: Look<'_>) -> Markup {
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
    draw(Slots { chart: c, values, slots: bounds.len(), labels: XLabels::Edges(edges), touching: true }, look)
}

fn draw(s: Slots, look: Look<'_>) -> Markup {
    let cv = look.canvas();
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
        return no_data(look, title(c));
    }
    // Bars grow from zero, so zero is always on the axis.
    let y = axis(yr.min.min(0.0), yr.max.max(0.0), 5);
    let ylabels = tick_labels(&y);

    let (full_labels, edges) = match &s.labels {
        XLabels::Centered(l) => (l, false),
        XLabels::Edges(l) => (l, true),
    };
    let mut label_list: Vec<String> = full_labels.iter().map(|l| trunc(l, 18)).collect();
    let mut widest = label_list.iter().map(|l| tw(l, FS)).fold(0.0, f64::max);

    let mut left = left_margin(&ylabels, c);
    let mut sw = (cv.width - left - 18.0) / n as f64;
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
        sw = (cv.width - left - 18.0) / n as f64;
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

    let mut body = Vec::new();
    let names: Vec<&str> = c.series.iter().map(|s| s.name.as_str()).collect();
    let (lg, lg_h) = legend(&names, left, cv.top, cv.width - left - 10.0, Swatch::Box);
    body.push(lg);
    let ptop = cv.top + lg_h + head;
    let sy = |v: f64| ptop + cv.plot_h - (v - y.lo) / (y.hi - y.lo) * cv.plot_h;
    body.push(y_axis(look, c, &y, &ylabels, left, ptop, pw));
    let zero = sy(0.0);
    body.push(html! { line.ax x1=(N(left)) y1=(N(zero)) x2=(N(left + pw)) y2=(N(zero)) {} "\n" });

    // Bars first, their value labels after all of them, so no bar covers a neighbour's label.
    let mut bars = Vec::new();
    let mut values = Vec::new();
    for (si, series) in s.values.iter().enumerate() {
        for (slot, v) in series.iter().enumerate() {
            let v = match v {
                Some(v) if ok(*v) => *v,
                _ => continue,
            };
            let bx = left + slot as f64 * sw + gap / 2.0 + si as f64 * bw;
            let mut bh = (sy(v) - zero).abs();
            if v != 0.0 && bh < 0.5 {
                bh = 0.5;
            }
            let by = if v >= 0.0 { zero - bh } else { zero };
            bars.push(html! {
                rect class=(fill_class(si)) x=(N(bx)) y=(N(by)) width=(N(bw.max(0.3))) height=(N(bh)) {} "\n"
            });
            if show_values {
                let text = fmt_num(v);
                let cx = bx + bw / 2.0;
                values.push(if tw(&text, VALUE_FS) > bw + 2.0 {
                    let (ty, anchor) = if v >= 0.0 { (by - 4.0, "start") } else { (by + bh + 4.0, "end") };
                    html! {
                        text.vl transform={ "translate(" (N(cx + 3.5)) "," (N(ty)) ") rotate(-90)" } text-anchor=(anchor) {
                            (text)
                        }
                    }
                } else {
                    let ty = if v >= 0.0 { by - 4.0 } else { by + bh + 11.0 };
                    html! { text.vl x=(N(cx)) y=(N(ty)) text-anchor="middle" { (text) } }
                });
            }
        }
    }
    body.extend(bars);
    body.extend(values);
    body.push(html! { "\n" });

    let ly = ptop + cv.plot_h + foot;
    body.push(html! {
        @for (i, l) in label_list.iter().enumerate() {
            @if !l.is_empty() && i % every == 0 {
                @let full = full_labels.get(i).map_or("", String::as_str);
                @let px = if edges { left + i as f64 * sw } else { left + (i as f64 + 0.5) * sw };
                @if edges {
                    line.ax x1=(N(px)) y1=(N(ly)) x2=(N(px)) y2=(N(ly + 4.0)) {}
                }
                @if rotate {
                    text.tk transform={ "translate(" (N(px + 3.0)) "," (N(ly + 10.0)) ") rotate(-45)" } text-anchor="end" {
                        (Text(l)) @if full != l { title { (Text(full)) } }
                    } "\n"
                } @else {
                    text.tk x=(N(px)) y=(N(ly + 17.0)) text-anchor="middle" {
                        (Text(l)) @if full != l { title { (Text(full)) } }
                    } "\n"
                }
            }
        }
    });
    let xl = ly + xlab_h + 6.0;
    let (xlm, xl_h) = x_label(c, left, pw, xl);
    body.push(xlm);
    frame(look, title(c), xl + xl_h + 4.0, &body)
}
