//! Horizontal bar groups, the benchmark comparison's charts: one group per row (a load, a
//! percentile), one bar per series (a front end) with its value printed after it, on a linear
//! or logarithmic scale, with vertical rules for a grid or for reference values.

use maud::{html, Markup};

use super::{fill_class, frame, legend, ok, tw, Look, Swatch, FS, N};
use crate::report::Text;

pub struct HBars {
    pub title: String,
    /// Series names, in the legend and in each group's bar order.
    pub series: Vec<String>,
    pub groups: Vec<BarGroup>,
    pub scale: Scale,
    pub rules: Vec<Rule>,
}

pub struct BarGroup {
    pub label: String,
    /// Per series: the value and how it prints. `None` leaves the series' slot empty, so a
    /// series' bar sits at the same place in every group.
    pub bars: Vec<Option<(f64, String)>>,
}

/// How values map to bar lengths; bars start at the scale's low end.
#[derive(Debug, Clone, Copy)]
pub enum Scale {
    /// From 0 to `max`.
    Linear { max: f64 },
    /// From `min` to `max`, both positive, for values spanning decades (latencies).
    Log { min: f64, max: f64 },
}

impl Scale {
    /// Where `v` falls, 0 at the low end and 1 at the high end (clamped into that).
    fn fraction(self, v: f64) -> f64 {
        let f = match self {
            Scale::Linear { max } => v / max,
            Scale::Log { min, max } => (v.max(min).log10() - min.log10()) / (max.log10() - min.log10()),
        };
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// A vertical line across every group, at a value on the scale.
pub struct Rule {
    pub at: f64,
    pub label: String,
    pub style: RuleStyle,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RuleStyle {
    /// A grid line, labelled below the groups (a log scale's decades).
    Grid,
    /// A reference value, solid, labelled above the groups ("1.0× direct").
    Reference,
    /// A goal, dashed, labelled below the groups and ending at the line, so its label never
    /// meets a reference's.
    Aim,
}

fn widest<'a>(texts: impl Iterator<Item = &'a str>) -> f64 {
    texts.map(|t| tw(t, FS)).fold(0.0, f64::max)
}

const BAR_H: f64 = 16.0;
const BAR_STEP: f64 = 18.0;

impl HBars {
    pub fn render(&self, look: Look<'_>) -> Markup {
        let cv = look.canvas();
        let left = (widest(self.groups.iter().map(|g| g.label.as_str())) + 16.0).clamp(80.0, cv.width / 2.0);
        let values = self.groups.iter().flat_map(|g| g.bars.iter().flatten().map(|(_, t)| t.as_str()));
        let pw = cv.width - left - (widest(values) + 12.0).max(40.0);
        let x_of = |v: f64| left + self.scale.fraction(v) * pw;
        let above = self.rules.iter().any(|r| r.style == RuleStyle::Reference);
        let below = self.rules.iter().any(|r| r.style != RuleStyle::Reference);
        let top = cv.top + if above { 18.0 } else { 4.0 };
        let group_h = BAR_STEP * self.series.len() as f64 + 16.0;
        let base = top + group_h * self.groups.len() as f64;

        // Grid lines under the bars, reference lines over them.
        let rules = |grid: bool| {
            html! {
                @for rule in self.rules.iter().filter(|r| (r.style == RuleStyle::Grid) == grid) {
                    @let x = x_of(rule.at);
                    @match rule.style {
                        RuleStyle::Grid => {
                            line.grid x1=(N(x)) y1=(N(top)) x2=(N(x)) y2=(N(base)) {}
                            text.tk x=(N(x)) y=(N(base + 14.0)) text-anchor="middle" { (Text(&rule.label)) } "\n"
                        }
                        RuleStyle::Reference => {
                            line.ax x1=(N(x)) y1=(N(top)) x2=(N(x)) y2=(N(base)) {}
                            text x=(N(x)) y=(N(top - 6.0)) text-anchor="start" { (Text(&rule.label)) } "\n"
                        }
                        RuleStyle::Aim => {
                            line class="ax d" x1=(N(x)) y1=(N(top)) x2=(N(x)) y2=(N(base)) {}
                            text x=(N(x)) y=(N(base + 14.0)) text-anchor="end" { (Text(&rule.label)) } "\n"
                        }
                    }
                }
            }
        };
        let mut body = vec![rules(true)];
        for (i, g) in self.groups.iter().enumerate() {
            let gy = top + i as f64 * group_h;
            body.push(html! {
                text x=(N(left - 8.0)) y=(N(gy + group_h / 2.0 + 4.0)) text-anchor="end" { (Text(&g.label)) } "\n"
                @for (j, bar) in g.bars.iter().enumerate() {
                    @if let Some((v, shown)) = bar.as_ref().filter(|(v, _)| ok(*v)) {
                        @let y = gy + 4.0 + j as f64 * BAR_STEP;
                        rect class=(fill_class(j)) x=(N(left)) y=(N(y)) width=(N(x_of(*v) - left)) height=(N(BAR_H)) {}
                        text x=(N(x_of(*v) + 4.0)) y=(N(y + 12.0)) { (Text(shown)) } "\n"
                    }
                }
            });
        }
        body.push(rules(false));
        let names: Vec<&str> = self.series.iter().map(String::as_str).collect();
        let legend_y = base + if below { 24.0 } else { 8.0 };
        let (lg, lg_h) = legend(&names, left, legend_y, cv.width - left - 10.0, Swatch::Box);
        body.push(lg);
        frame(look, &self.title, legend_y + lg_h + 4.0, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(scale: Scale, rules: Vec<Rule>) -> String {
        let bars = HBars {
            title: "Throughput".into(),
            series: vec!["nginx".into(), "meshgate".into()],
            groups: vec![
                BarGroup {
                    label: "QoS 0".into(),
                    bars: vec![Some((0.9, "0.90×".into())), Some((1.1, "1.10×".into()))],
                },
                BarGroup { label: "QoS 1 <16>".into(), bars: vec![None, Some((f64::NAN, "?".into()))] },
            ],
            scale,
            rules,
        };
        bars.render(Look::File { colors: &["#2e8b57", "#e8772e"] }).into_string()
    }

    #[test]
    fn bars_and_rules_are_drawn_with_their_labels() {
        let rule = |at, label: &str, style| Rule { at, label: label.into(), style };
        let svg = chart(
            Scale::Linear { max: 1.2 },
            vec![rule(1.0, "1.0× direct", RuleStyle::Reference), rule(0.9, "0.9× direct", RuleStyle::Aim)],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        // Two bars, two legend swatches, the background; the missing and the NaN value draw nothing.
        assert_eq!(svg.matches("<rect").count(), 5, "{svg}");
        assert!(svg.contains("1.10×") && svg.contains("QoS 1 &lt;16&gt;") && svg.contains("0.9× direct"));
        assert!(svg.contains("class=\"ax d\""));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let svg = chart(Scale::Log { min: 1.0, max: 1e4 }, vec![rule(10.0, "10 µs", RuleStyle::Grid)]);
        assert!(svg.contains("class=\"grid\"") && svg.contains("10 µs"));
    }

    #[test]
    fn scales_place_values_between_their_ends() {
        assert_eq!(Scale::Linear { max: 2.0 }.fraction(1.0), 0.5);
        assert_eq!(Scale::Linear { max: 2.0 }.fraction(5.0), 1.0);
        assert_eq!(Scale::Log { min: 1.0, max: 100.0 }.fraction(10.0), 0.5);
        assert_eq!(Scale::Log { min: 1.0, max: 100.0 }.fraction(0.0), 0.0);
        assert_eq!(Scale::Linear { max: 0.0 }.fraction(1.0), 0.0);
    }
}
