//! Self-contained HTML rendering of a [`ReportData`].
//!
//! The page is also well-formed XML (XHTML syntax: every element closed, every
//! attribute quoted, all text escaped), which the tests check with an XML parser.

use std::fmt::Write;

use super::answer::{estimate_text, metric_header};
use super::markdown::score_text;
use super::svg;
use super::{escape, pct, LossPoint, ReportData};

const CSS: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #222; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 28px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin-top: 36px; border-bottom: 2px solid #e3e6ea; padding-bottom: 4px; }
h3 { font-size: 16px; margin-top: 24px; }
p.summary { color: #444; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { border: 1px solid #dde1e6; padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 8px 12px; margin: 6px 0; border-left: 4px solid #888; background: #f7f7f7; }
.verdict.sig { border-color: #59a14f; background: #f0f8ef; }
.verdict.noise { border-color: #edc948; background: #fdf9ea; }
.grid { display: grid; gap: 10px; }
.cell { min-width: 0; }
.cell h4 { margin: 4px 0; font-size: 13px; }
pre { background: #f4f5f7; border: 1px solid #e1e4e8; border-radius: 4px; padding: 8px; overflow-x: auto; font-size: 12px; line-height: 1.4; margin: 0; white-space: pre; }
.pass { color: #2e7d32; font-weight: 600; }
.fail { color: #c62828; font-weight: 600; }
.chart { margin: 8px 0 16px; }
.chart svg { max-width: 100%; height: auto; }
code.key { font-size: 12px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; }
";

/// Renders the report as one self-contained HTML page.
pub fn render_html(data: &ReportData) -> String {
    let mut out = String::new();
    let title = if data.title.is_empty() {
        "Experiment report"
    } else {
        &data.title
    };
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\"><head><meta charset=\"utf-8\"/><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/><title>{t}</title><style>{CSS}</style></head><body><main><h1>{t}</h1>",
        t = escape(title)
    );
    if !data.summary.is_empty() {
        let _ = write!(out, "<p class=\"summary\">{}</p>", escape(&data.summary));
    }

    for table in &data.answer.benchmarks {
        let title = &table.benchmark;
        let _ = write!(
            out,
            "<section><h2>The answer: {}</h2><p>Pooled over training seeds; 95% bootstrap confidence intervals over tasks and seeds in brackets.</p><table><thead><tr><th>variant</th><th>seeds</th>",
            escape(title)
        );
        for j in 0..table.metrics.len() {
            let _ = write!(out, "<th>{}</th>", escape(&metric_header(table, j)));
        }
        out.push_str("</tr></thead><tbody>");
        for row in &table.rows {
            let seeds = row.seeds();
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"num\">{seeds}</td>",
                escape(&row.variant)
            );
            for (c, m) in row.cells.iter().zip(&table.metrics) {
                let text = c
                    .as_ref()
                    .map(|e| estimate_text(e, m.unit))
                    .unwrap_or_else(|| "–".into());
                let _ = write!(out, "<td class=\"num\">{}</td>", escape(&text));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table><ul>");
        for c in &table.comparisons {
            let _ = write!(out, "<li>{}</li>", escape(&c.sentence));
        }
        out.push_str("</ul></section>");
    }
    for note in &data.answer.notes {
        let _ = write!(out, "<p class=\"note\">Note: {}</p>", escape(note));
    }

    if !data.variants.is_empty() {
        out.push_str("<section><h2>pass@k</h2><div class=\"chart\">");
        out.push_str(&svg::pass_at_k_chart(&data.variants));
        out.push_str("</div><p>Error bars: 95% bootstrap confidence intervals over tasks.</p>");
        let mut ks: Vec<u64> = data
            .variants
            .iter()
            .flat_map(|v| v.pass_at_k.iter().map(|p| p.k))
            .collect();
        ks.sort_unstable();
        ks.dedup();
        out.push_str(
            "<table><thead><tr><th>variant</th><th>benchmark</th><th>tasks</th><th>samples</th>",
        );
        for k in &ks {
            let _ = write!(out, "<th>pass@{k}</th>");
        }
        out.push_str("</tr></thead><tbody>");
        for (i, v) in data.variants.iter().enumerate() {
            let _ = write!(
                out,
                "<tr><td><span class=\"swatch\" style=\"background:{}\"></span>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
                svg::color(i),
                escape(&v.name),
                escape(&v.benchmark),
                v.tasks,
                v.samples
            );
            for k in &ks {
                let text = v
                    .pass_at_k
                    .iter()
                    .find(|p| p.k == *k)
                    .map(score_text)
                    .unwrap_or_else(|| "–".to_string());
                let _ = write!(out, "<td class=\"num\">{}</td>", escape(&text));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table></section>");
    }

    if !data.comparisons.is_empty() {
        out.push_str("<section><h2>Paired comparisons</h2><table><thead><tr><th>B vs A</th><th>tasks</th><th>pass@1 A</th><th>pass@1 B</th><th>B − A</th><th>95% CI</th><th>p</th><th>test</th></tr></thead><tbody>");
        for c in &data.comparisons {
            let test = c.test.to_string();
            let _ = write!(
                out,
                "<tr><td>{} vs {}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:+.1} pp</td><td class=\"num\">[{:+.1}, {:+.1}]</td><td class=\"num\">{}</td><td>{}</td></tr>",
                escape(&c.b),
                escape(&c.a),
                c.tasks,
                pct(c.pass1_a),
                pct(c.pass1_b),
                100.0 * c.diff,
                100.0 * c.ci_low,
                100.0 * c.ci_high,
                escape(crate::grade::stats::format_p(c.p_value).trim_start_matches("= ")),
                escape(&test)
            );
        }
        out.push_str("</tbody></table>");
        for c in &data.comparisons {
            let class = if c.verdict.contains("within noise") {
                "noise"
            } else {
                "sig"
            };
            let _ = write!(
                out,
                "<div class=\"verdict {class}\">{}</div>",
                escape(&c.verdict)
            );
        }
        out.push_str("</section>");
    }

    let loss_series: Vec<(&str, &[LossPoint])> = data
        .variants
        .iter()
        .map(|v| (v.name.as_str(), v.loss.as_slice()))
        .collect();
    if let Some(chart) = svg::loss_chart("training loss", &loss_series) {
        out.push_str("<section><h2>Training loss</h2><div class=\"chart\">");
        out.push_str(&chart);
        out.push_str("</div><table><thead><tr><th>variant</th><th>steps</th><th>first</th><th>last</th><th>min</th><th>held-out (end)</th></tr></thead><tbody>");
        for v in data.variants.iter().filter(|v| !v.loss.is_empty()) {
            let first = v.loss.first().map(|p| p.loss).unwrap_or(f64::NAN);
            let last = v.loss.last().map(|p| p.loss).unwrap_or(f64::NAN);
            let min = v.loss.iter().map(|p| p.loss).fold(f64::INFINITY, f64::min);
            let steps = v.loss.last().map(|p| p.step).unwrap_or(0);
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"num\">{steps}</td><td class=\"num\">{first:.4}</td><td class=\"num\">{last:.4}</td><td class=\"num\">{min:.4}</td><td class=\"num\">{}</td></tr>",
                escape(&v.name),
                v.held_out_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "–".into())
            );
        }
        out.push_str("</tbody></table></section>");
    }

    if !data.contamination.is_empty() || !data.nearest.is_empty() {
        out.push_str(&contamination_html(data));
    }

    if !data.data.is_empty() {
        out.push_str("<section><h2>The data</h2><p>Each variant's records as its training template renders them. distinct-n: distinct word n-grams over all; compression: raw over gzip'd bytes (higher repeats more); near duplicates: what the near-dedup step would remove; spread: mean pairwise cosine distance of MiniLM embeddings and clusters at cosine 0.9 on a sample (with an embedder).</p><table><thead><tr><th>variant</th><th>records</th><th>tokens p50 / p90 / max</th><th>words p50</th><th>distinct-1</th><th>distinct-2</th><th>distinct-4</th><th>compression</th><th>exact dup</th><th>near dup</th><th>spread (clusters / sample)</th></tr></thead><tbody>");
        for r in &data.data {
            let s = &r.stats.stats;
            let tokens = s.tokens.as_ref().map_or_else(
                || "–".to_string(),
                |t| format!("{:.0} / {:.0} / {:.0}", t.p50, t.p90, t.max),
            );
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{tokens}</td><td>{:.0}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&r.variant),
                s.records,
                s.words.p50,
                s.distinct_n[0],
                s.distinct_n[1],
                s.distinct_n[3],
                s.compression_ratio,
                pct(s.exact_duplicate_rate),
                pct(s.near_duplicate_rate),
            super::spread_text(s),
            );
        }
        out.push_str("</tbody></table>");
        let coverage = super::coverage_rows(&data.data);
        if !coverage.is_empty() {
            let _ = write!(
                out,
                "<p>{}</p><table><thead><tr>",
                escape(super::COVERAGE_INTRO)
            );
            for c in super::COVERAGE_COLUMNS {
                let _ = write!(out, "<th>{c}</th>");
            }
            out.push_str("</tr></thead><tbody>");
            for row in coverage {
                out.push_str("<tr>");
                for c in &row {
                    let _ = write!(out, "<td>{}</td>", escape(c));
                }
                out.push_str("</tr>");
            }
            out.push_str("</tbody></table>");
        }
        out.push_str("</section>");
    }

    if !data.filters.is_empty() {
        out.push_str("<section><h2>Data filters</h2>");
        for f in &data.filters {
            let share = if f.total > 0 {
                f.kept as f64 / f.total as f64
            } else {
                0.0
            };
            let _ = write!(
                out,
                "<h3>{}</h3><p>{} of {} rows kept ({}).</p><div class=\"chart\">{}</div>",
                escape(&f.dataset),
                f.kept,
                f.total,
                pct(share),
                svg::reasons_chart(f)
            );
            for h in &f.histograms {
                let _ = write!(
                    out,
                    "<div class=\"chart\">{}</div>",
                    svg::histogram_chart(h)
                );
            }
        }
        out.push_str("</section>");
    }

    if !data.completions.is_empty() {
        out.push_str("<section><h2>Completions</h2>");
        if !data.completions_note.is_empty() {
            let _ = write!(out, "<p>{}</p>", escape(&data.completions_note));
        }
        for row in &data.completions {
            let cols = row.completions.len().max(1);
            let _ = write!(
                out,
                "<h3>{}</h3><pre>{}</pre><div class=\"grid\" style=\"grid-template-columns: repeat({cols}, minmax(0, 1fr)); margin-top: 8px\">",
                escape(&row.task_id),
                escape(&row.prompt)
            );
            for c in &row.completions {
                let mark = match c.passed {
                    Some(true) => "<span class=\"pass\">✓ passed</span>".to_string(),
                    Some(false) if !c.outcome.is_empty() => format!(
                        "<span class=\"fail\">✗ failed: {}</span>",
                        escape(&c.outcome)
                    ),
                    Some(false) => "<span class=\"fail\">✗ failed</span>".to_string(),
                    None => String::new(),
                };
                let _ = write!(
                    out,
                    "<div class=\"cell\"><h4>{} {mark}</h4><pre>{}</pre></div>",
                    escape(&c.variant),
                    escape(&c.completion)
                );
            }
            out.push_str("</div>");
        }
        out.push_str("</section>");
    }

    if !data.manifest.is_empty() || !data.cache_keys.is_empty() {
        out.push_str("<section><h2>Provenance</h2>");
        if !data.cache_keys.is_empty() {
            out.push_str("<table><thead><tr><th>stage</th><th>cache key</th></tr></thead><tbody>");
            for k in &data.cache_keys {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td><code class=\"key\">{}</code></td></tr>",
                    escape(&k.stage),
                    escape(&k.key)
                );
            }
            out.push_str("</tbody></table>");
        }
        if !data.manifest.is_empty() {
            let _ = write!(
                out,
                "<h3>Manifest</h3><pre>{}</pre>",
                escape(&data.manifest)
            );
        }
        out.push_str("</section>");
    }
    out.push_str("</main></body></html>\n");
    out
}

/// The contamination tables and the most resembled eval tasks, with the nearest records'
/// excerpts.
fn contamination_html(data: &ReportData) -> String {
    use super::contamination::{
        caption, cells, nearest_cells, COLUMNS, HEADING, INTRO, NEAREST_COLUMNS,
    };
    let head = |cols: &[&str]| {
        let th: String = cols
            .iter()
            .map(|c| format!("<th>{}</th>", escape(c)))
            .collect();
        format!("<table><thead><tr>{th}</tr></thead><tbody>")
    };
    let mut out = format!(
        "<section><h2>{}</h2><p>{}</p>",
        escape(HEADING),
        escape(INTRO)
    );
    for table in &data.contamination {
        let _ = write!(out, "<h3>{}</h3>", escape(&caption(table)));
        out.push_str(&head(&COLUMNS));
        for row in &table.rows {
            out.push_str("<tr>");
            for c in cells(row) {
                let _ = write!(out, "<td>{}</td>", escape(&c));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table>");
    }
    if !data.nearest.is_empty() {
        out.push_str("<h3>The most resembled eval tasks</h3>");
        let mut cols = NEAREST_COLUMNS.to_vec();
        cols.push("excerpt");
        out.push_str(&head(&cols));
        for e in &data.nearest {
            out.push_str("<tr>");
            for c in nearest_cells(e) {
                let _ = write!(out, "<td>{}</td>", escape(&c));
            }
            let _ = write!(out, "<td><pre>{}</pre></td></tr>", escape(&e.excerpt));
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");
    out
}
