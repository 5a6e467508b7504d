//! What the suite's HTML report and the benchmark comparison's charts share: the SVG chart kit
//! ([`chart`]) and text for people (numbers that read well, one-line labels, escaped text).
//!
//! Markup is written with maud, which escapes every value it inserts, so no report builds HTML
//! or SVG by pushing strings and none can forget to escape.

pub mod chart;

use maud::Render;

/// Text for a page or a chart. maud escapes `& < > "` in everything it inserts; `Text` also
/// writes `'` as `&#39;`, as the reports always have, so the text stays inert even inside a
/// single-quoted attribute.
#[derive(Clone, Copy)]
pub struct Text<'a>(pub &'a str);

impl Render for Text<'_> {
    fn render_to(&self, out: &mut String) {
        for (i, part) in self.0.split('\'').enumerate() {
            if i > 0 {
                out.push_str("&#39;");
            }
            part.render_to(out);
        }
    }
}

/// Control characters become spaces, so one value stays one line and cannot drive a terminal.
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// At most `max` characters, with an ellipsis when cut, so long labels cannot run over neighbouring ones.
pub fn trunc(s: &str, max: usize) -> String {
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
pub fn fmt_num(v: f64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_any_quoting() {
        let html = maud::html! { p title=(Text("it's \"x\"")) { (Text("<a href='x'>&</a>")) } }.into_string();
        assert_eq!(html, "<p title=\"it&#39;s &quot;x&quot;\">&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;</p>");
    }

    #[test]
    fn labels_stay_short_and_on_one_line() {
        assert_eq!(trunc("abcdef", 4), "abc…");
        assert_eq!(trunc("abc", 4), "abc");
        assert_eq!(one_line("a\nb\x1b[31m"), "a b [31m");
    }
}
