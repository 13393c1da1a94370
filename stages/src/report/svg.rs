//! Inline SVG charts (well-formed XML, all text escaped, no scripts or external refs).

use std::fmt::Write;

use super::{escape, FilterStats, Histogram, LossPoint, VariantReport};

/// Colours per variant (colour-blind friendly Tableau 10).
pub const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
];

/// The colour of the `i`-th variant.
pub fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

const W: f64 = 640.0;
const H: f64 = 300.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 44.0;

/// "Nice" tick positions covering [lo, hi] (1-2-5 steps).
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let mut ticks = Vec::new();
    let mut t = start;
    while t <= hi + step * 0.5 && ticks.len() < 50 {
        ticks.push(t);
        t += step;
    }
    ticks
}

/// Compact number label.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

fn open(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}" font-family="system-ui, sans-serif" font-size="12"><title>{t}</title>"#,
        t = escape(title)
    );
}

/// Axes with horizontal grid lines; returns the y mapping.
fn y_axis(
    out: &mut String,
    lo: f64,
    hi: f64,
    label: &str,
    as_percent: bool,
) -> impl Fn(f64) -> f64 {
    let map = move |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (v - lo) / (hi - lo));
    for t in nice_ticks(lo, hi, 5) {
        if t < lo - 1e-12 || t > hi + 1e-12 {
            continue;
        }
        let y = map(t);
        let text = if as_percent {
            format!("{}%", fmt_num(100.0 * t))
        } else {
            fmt_num(t)
        };
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end" fill="#555">{text}</text>"##,
            x2 = W - RIGHT,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            text = escape(&text)
        );
    }
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{yb}" stroke="#888"/><line x1="{LEFT}" x2="{xr}" y1="{yb}" y2="{yb}" stroke="#888"/><text x="14" y="{ym:.1}" transform="rotate(-90 14 {ym:.1})" text-anchor="middle" fill="#333">{l}</text>"##,
        yb = H - BOTTOM,
        xr = W - RIGHT,
        ym = (TOP + H - BOTTOM) / 2.0,
        l = escape(label)
    );
    map
}

fn legend(out: &mut String, names: &[&str]) {
    let mut x = LEFT;
    for (i, name) in names.iter().enumerate() {
        let _ = write!(
            out,
            r##"<rect x="{x:.1}" y="8" width="12" height="12" fill="{c}"/><text x="{tx:.1}" y="18" fill="#333">{n}</text>"##,
            c = color(i),
            tx = x + 16.0,
            n = escape(name)
        );
        x += 28.0 + 7.0 * name.chars().count().min(30) as f64;
    }
}

/// Grouped bars of pass@k per variant (groups = k), with CI error bars.
pub fn pass_at_k_chart(variants: &[VariantReport]) -> String {
    let mut ks: Vec<u64> = variants
        .iter()
        .flat_map(|v| v.pass_at_k.iter().map(|p| p.k))
        .collect();
    ks.sort_unstable();
    ks.dedup();
    let mut out = String::new();
    open(&mut out, "pass@k per variant");
    let top = variants
        .iter()
        .flat_map(|v| {
            v.pass_at_k
                .iter()
                .map(|p| p.ci_high.unwrap_or(p.value).max(p.value))
        })
        .fold(0.0f64, f64::max);
    // Zoom in when scores are small, but keep the axis anchored at 0.
    let hi = nice_ticks(0.0, (top * 1.15).clamp(0.05, 1.0), 5)
        .last()
        .copied()
        .unwrap_or(1.0)
        .clamp(0.05, 1.0);
    let y = y_axis(&mut out, 0.0, hi, "pass@k", true);
    let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    legend(&mut out, &names);
    let plot_w = W - LEFT - RIGHT;
    let group_w = plot_w / ks.len().max(1) as f64;
    let bar_w = (group_w * 0.8 / variants.len().max(1) as f64).min(60.0);
    for (gi, k) in ks.iter().enumerate() {
        let gx = LEFT + gi as f64 * group_w;
        let inner = bar_w * variants.len() as f64;
        let x0 = gx + (group_w - inner) / 2.0;
        for (vi, v) in variants.iter().enumerate() {
            let Some(p) = v.pass_at_k.iter().find(|p| p.k == *k) else {
                continue;
            };
            let x = x0 + vi as f64 * bar_w;
            let yv = y(p.value.min(hi));
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="{yv:.1}" width="{w:.1}" height="{h:.1}" fill="{c}"><title>{t}</title></rect>"#,
                w = bar_w * 0.92,
                h = (H - BOTTOM - yv).max(0.0),
                c = color(vi),
                t = escape(&format!("{} pass@{k} = {:.4}", v.name, p.value))
            );
            if let (Some(lo), Some(up)) = (p.ci_low, p.ci_high) {
                let cx = x + bar_w * 0.46;
                let (y1, y2) = (y(lo.min(hi)), y(up.min(hi)));
                let _ = write!(
                    out,
                    r##"<path d="M{cx:.1} {y1:.1}V{y2:.1}M{a:.1} {y1:.1}H{b:.1}M{a:.1} {y2:.1}H{b:.1}" stroke="#222" stroke-width="1.5" fill="none"/>"##,
                    a = cx - 5.0,
                    b = cx + 5.0
                );
            }
            let _ = write!(
                out,
                r##"<text x="{tx:.1}" y="{ty:.1}" text-anchor="middle" font-size="10" fill="#222">{l}</text>"##,
                tx = x + bar_w * 0.46,
                // Above the whisker when there is one, so the two never overlap.
                ty = (y(p.ci_high.unwrap_or(p.value).max(p.value).min(hi)) - 4.0).max(TOP + 8.0),
                l = escape(&format!("{:.1}", 100.0 * p.value))
            );
        }
        let _ = write!(
            out,
            r##"<text x="{tx:.1}" y="{ty}" text-anchor="middle" fill="#333">pass@{k}</text>"##,
            tx = gx + group_w / 2.0,
            ty = H - BOTTOM + 18.0
        );
    }
    out.push_str("</svg>");
    out
}

/// Loss against step, one line per named series (in palette order), under `title`; `None`
/// if every series is empty. Points of sparse series (held-out evaluations every few hundred
/// steps, or just the last) are also marked, so a one-point series still shows.
pub fn loss_chart(title: &str, series: &[(&str, &[LossPoint])]) -> Option<String> {
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, curve)| curve.iter().map(|p| (p.step as f64, p.loss)))
        .collect();
    if points.is_empty() {
        return None;
    }
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in &points {
        x_lo = x_lo.min(*x);
        x_hi = x_hi.max(*x);
        y_lo = y_lo.min(*y);
        y_hi = y_hi.max(*y);
    }
    if x_hi <= x_lo {
        x_hi = x_lo + 1.0;
    }
    let pad = ((y_hi - y_lo) * 0.05).max(1e-3);
    let yt = nice_ticks(y_lo - pad, y_hi + pad, 5);
    let (y_lo, y_hi) = (
        yt.first().copied().unwrap_or(y_lo - pad),
        yt.last().copied().unwrap_or(y_hi + pad).max(y_hi + pad),
    );
    let mut out = String::new();
    open(&mut out, title);
    let y = y_axis(&mut out, y_lo, y_hi, "loss", false);
    let x = |v: f64| LEFT + (W - LEFT - RIGHT) * (v - x_lo) / (x_hi - x_lo);
    for t in nice_ticks(x_lo, x_hi, 6) {
        if t < x_lo || t > x_hi {
            continue;
        }
        let _ = write!(
            out,
            r##"<text x="{tx:.1}" y="{ty}" text-anchor="middle" fill="#555">{l}</text>"##,
            tx = x(t),
            ty = H - BOTTOM + 16.0,
            l = escape(&fmt_num(t))
        );
    }
    let _ = write!(
        out,
        r##"<text x="{tx:.1}" y="{ty}" text-anchor="middle" fill="#333">step</text>"##,
        tx = LEFT + (W - LEFT - RIGHT) / 2.0,
        ty = H - 6.0
    );
    let names: Vec<&str> = series.iter().map(|(name, _)| *name).collect();
    legend(&mut out, &names);
    for (i, (name, curve)) in series.iter().enumerate() {
        if curve.is_empty() {
            continue;
        }
        let d: String = curve
            .iter()
            .enumerate()
            .map(|(j, p)| {
                format!(
                    "{}{:.1} {:.1}",
                    if j == 0 { "M" } else { "L" },
                    x(p.step as f64),
                    y(p.loss)
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        let _ = write!(
            out,
            r#"<path d="{d}" stroke="{c}" stroke-width="2" fill="none"><title>{t}</title></path>"#,
            c = color(i),
            t = escape(name)
        );
        if curve.len() <= SPARSE_POINTS {
            for p in curve.iter() {
                let _ = write!(
                    out,
                    r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3" fill="{c}"><title>{t}: step {s}, {l}</title></circle>"#,
                    cx = x(p.step as f64),
                    cy = y(p.loss),
                    c = color(i),
                    t = escape(name),
                    s = p.step,
                    l = escape(&fmt_num(p.loss))
                );
            }
        }
    }
    out.push_str("</svg>");
    Some(out)
}

/// Series with at most this many points get a marker on each.
const SPARSE_POINTS: usize = 24;

/// A histogram with an optional threshold marker.
pub fn histogram_chart(h: &Histogram) -> String {
    let mut out = String::new();
    open(&mut out, &h.title);
    let valid = h.edges.len() == h.counts.len() + 1 && !h.counts.is_empty();
    if !valid {
        let _ = write!(
            out,
            r##"<text x="{LEFT}" y="{TOP}" fill="#a00">invalid histogram: {} edges for {} bins</text></svg>"##,
            h.edges.len(),
            h.counts.len()
        );
        return out;
    }
    let max = h.counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let hi = nice_ticks(0.0, max, 5)
        .last()
        .copied()
        .unwrap_or(max)
        .max(max);
    let y = y_axis(&mut out, 0.0, hi, "rows", false);
    let (x_lo, x_hi) = (h.edges[0], h.edges[h.edges.len() - 1]);
    let span = if x_hi > x_lo { x_hi - x_lo } else { 1.0 };
    let x = |v: f64| LEFT + (W - LEFT - RIGHT) * (v - x_lo) / span;
    for (i, c) in h.counts.iter().enumerate() {
        let (a, b) = (x(h.edges[i]), x(h.edges[i + 1]));
        let yv = y(*c as f64);
        let _ = write!(
            out,
            r#"<rect x="{a:.1}" y="{yv:.1}" width="{w:.1}" height="{hh:.1}" fill="{col}"><title>{t}</title></rect>"#,
            w = (b - a - 1.0).max(0.5),
            hh = (H - BOTTOM - yv).max(0.0),
            col = color(0),
            t = escape(&format!(
                "[{}, {}): {c}",
                fmt_num(h.edges[i]),
                fmt_num(h.edges[i + 1])
            ))
        );
    }
    for t in nice_ticks(x_lo, x_hi, 6) {
        if t < x_lo - 1e-12 || t > x_hi + 1e-12 {
            continue;
        }
        let _ = write!(
            out,
            r##"<text x="{tx:.1}" y="{ty}" text-anchor="middle" fill="#555">{l}</text>"##,
            tx = x(t),
            ty = H - BOTTOM + 16.0,
            l = escape(&fmt_num(t))
        );
    }
    let _ = write!(
        out,
        r##"<text x="{tx:.1}" y="{ty}" text-anchor="middle" fill="#333">{l}</text>"##,
        tx = LEFT + (W - LEFT - RIGHT) / 2.0,
        ty = H - 6.0,
        l = escape(&h.title)
    );
    if let Some(t) = h.threshold.filter(|t| *t >= x_lo && *t <= x_hi) {
        let _ = write!(
            out,
            r##"<line x1="{tx:.1}" x2="{tx:.1}" y1="{TOP}" y2="{yb}" stroke="#e15759" stroke-width="2" stroke-dasharray="5 3"/><text x="{lx:.1}" y="{ly}" fill="#e15759">threshold {l}</text>"##,
            tx = x(t),
            yb = H - BOTTOM,
            lx = x(t) + 4.0,
            ly = TOP + 12.0,
            l = escape(&fmt_num(t))
        );
    }
    out.push_str("</svg>");
    out
}

/// At most `max` characters, with an ellipsis when cut.
fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// Horizontal bars: rows kept and dropped per reason.
pub fn reasons_chart(f: &FilterStats) -> String {
    let mut rows: Vec<(String, u64, &str)> = vec![("kept".to_string(), f.kept, "#59a14f")];
    rows.extend(
        f.reasons
            .iter()
            .map(|r| (r.reason.clone(), r.count, "#e15759")),
    );
    let row_h = 22.0;
    let h = TOP + row_h * rows.len() as f64 + 12.0;
    let label_w = 170.0;
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="{t}" font-family="system-ui, sans-serif" font-size="12"><title>{t}</title>"#,
        t = escape(&format!("{}: rows kept and dropped", f.dataset))
    );
    for (i, (name, count, col)) in rows.iter().enumerate() {
        let y = TOP + i as f64 * row_h;
        let w = (W - label_w - 90.0) * *count as f64 / max;
        let _ = write!(
            out,
            r##"<text x="{lx}" y="{ty:.1}" text-anchor="end" fill="#333"><title>{full}</title>{n}</text><rect x="{label_w}" y="{y:.1}" width="{w:.1}" height="{bh}" fill="{col}"/><text x="{cx:.1}" y="{ty:.1}" fill="#222">{c}</text>"##,
            lx = label_w - 8.0,
            ty = y + 14.0,
            n = escape(&short(name, 26)),
            full = escape(name),
            bh = row_h - 6.0,
            cx = label_w + w + 6.0,
            c = count
        );
    }
    out.push_str("</svg>");
    out
}
