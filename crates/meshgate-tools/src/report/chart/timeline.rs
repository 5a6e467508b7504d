//! Timelines: one line per series over x (seconds), broken where a value is missing, with labelled
//! vertical markers for events such as "broker1 killed".

use maud::{html, Markup};

use super::{
    axis, fill_class, frame, left_margin, legend, line_class, no_data, ok, tick_labels, title, tw, x_label, y_axis,
    Chart, Look, Range, Swatch, FS, MARKER_FS, N,
};
use crate::report::{one_line, trunc, Text};

/// Most rows of marker labels above the plot; past that, labels share the emptiest row.
const MAX_MARKER_ROWS: usize = 4;
const MROW: f64 = 15.0;

pub(super) fn draw(c: &Chart, look: Look<'_>) -> Markup {
    let cv = look.canvas();
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
        return no_data(look, title(c));
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
    let pw = cv.width - left - 18.0;
    let x = axis(xr.min, xr.max, ((pw / 90.0) as usize).clamp(2, 8));
    let xlabels = tick_labels(&x);
    let sx = |v: f64| left + (v - x.lo) / (x.hi - x.lo) * pw;

    let mut body = Vec::new();
    let mut top = cv.top;
    let names: Vec<&str> = c.series.iter().map(|s| s.name.as_str()).collect();
    let (lg, lg_h) = legend(&names, left, top, cv.width - left - 10.0, Swatch::Line);
    body.push(lg);
    top += lg_h;

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
        let x0 = if cx + 3.0 + width <= cv.width - 2.0 { cx + 3.0 } else { (cx - 3.0 - width).max(2.0) };
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
    let mtop = top;
    if !row_ends.is_empty() {
        top += row_ends.len() as f64 * MROW + 6.0;
    }
    let bottom = top + cv.plot_h;
    let sy = |v: f64| top + cv.plot_h - (v - y.lo) / (y.hi - y.lo) * cv.plot_h;

    body.push(y_axis(look, c, &y, &ylabels, left, top, pw));
    body.push(html! {
        @for (i, (t, l)) in x.ticks.iter().zip(&xlabels).enumerate() {
            @let px = sx(*t);
            @if i > 0 {
                line.grid x1=(N(px)) y1=(N(top)) x2=(N(px)) y2=(N(bottom)) {}
            }
            text.tk x=(N(px)) y=(N(bottom + 17.0)) text-anchor=(if px + tw(l, FS) / 2.0 > cv.width { "end" } else { "middle" }) {
                (Text(l))
            } "\n"
        }
        line.ax x1=(N(left)) y1=(N(bottom)) x2=(N(left + pw)) y2=(N(bottom)) {} "\n"
        g.mk {
            @for (cx, _, row, _) in &placed {
                line x1=(N(*cx)) y1=(N(mtop + *row as f64 * MROW + 2.0)) x2=(N(*cx)) y2=(N(bottom)) {}
            }
        } "\n"
    });

    for (i, s) in c.series.iter().enumerate() {
        let mut seg: Vec<(f64, f64)> = Vec::new();
        for &(px, py) in &s.points {
            if ok(px) && ok(py) {
                seg.push((sx(px), sy(py)));
            } else {
                body.extend(segment(&mut seg, i, look));
            }
        }
        body.extend(segment(&mut seg, i, look));
    }

    // Labels last, with a halo in the background color, so lines crossing them do not make them unreadable.
    body.push(html! {
        g.mk {
            @for (_, x0, row, label) in &placed {
                text x=(N(*x0)) y=(N(mtop + *row as f64 * MROW + 12.0)) { (Text(label)) }
            }
        } "\n"
    });

    let (xl, xl_h) = x_label(c, left, pw, bottom + 24.0);
    body.push(xl);
    frame(look, title(c), bottom + 24.0 + xl_h + 4.0, &body)
}

/// The points gathered since the last gap: a polyline, or a dot when a point stands alone between gaps.
fn segment(seg: &mut Vec<(f64, f64)>, series: usize, look: Look<'_>) -> Option<Markup> {
    let m = match seg.len() {
        0 => None,
        1 => Some(html! {
            circle class=(fill_class(series)) cx=(N(seg[0].0)) cy=(N(seg[0].1)) r="2.5" {} "\n"
        }),
        _ => {
            // In a file, out and back along the same points: a viewer that closes every line
            // (some do, even unfilled ones) then draws nothing extra.
            let back = match look {
                Look::Page => 0,
                Look::File { .. } => seg.len() - 1,
            };
            let pts: Vec<String> = seg
                .iter()
                .chain(seg.iter().rev().skip(1).take(back))
                .map(|(x, y)| html! { (N(*x)) "," (N(*y)) }.into_string())
                .collect();
            Some(html! { polyline class=(line_class(series)) fill="none" points=(pts.join(" ")) {} "\n" })
        }
    };
    seg.clear();
    m
}
