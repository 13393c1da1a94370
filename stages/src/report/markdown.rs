//! Markdown rendering of a [`ReportData`].

use std::fmt::Write;

use super::answer::{estimate_text, metric_header};
use super::{escape, pct, ReportData, ScorePoint};

/// Escapes text for a markdown table cell: HTML-escaped (markdown passes HTML through), pipes
/// escaped, newlines folded.
fn cell(s: &str) -> String {
    escape(s).replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// A fenced code block whose fence is longer than any backtick run inside.
fn code_block(out: &mut String, lang: &str, text: &str) {
    let mut longest = 0;
    let mut run = 0;
    for ch in text.chars() {
        if ch == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let fence = "`".repeat((longest + 1).max(3));
    let _ = writeln!(
        out,
        "{fence}{lang}\n{}\n{fence}\n",
        text.trim_end_matches('\n')
    );
}

/// Score with its CI, e.g. `31.2% [27.0%, 35.5%]`.
pub(crate) fn score_text(p: &ScorePoint) -> String {
    match (p.ci_low, p.ci_high) {
        (Some(lo), Some(hi)) => format!("{} [{}, {}]", pct(p.value), pct(lo), pct(hi)),
        _ => pct(p.value),
    }
}

/// Renders the report as GitHub-flavoured markdown.
pub fn render_markdown(data: &ReportData) -> String {
    let mut out = String::new();
    let title = if data.title.is_empty() {
        "Experiment report"
    } else {
        &data.title
    };
    let _ = writeln!(out, "# {}\n", cell(title));
    if !data.summary.is_empty() {
        let _ = writeln!(out, "{}\n", escape(&data.summary));
    }

    for table in &data.answer.benchmarks {
        let title = &table.benchmark;
        let _ = writeln!(
            out,
            "## The answer: {}\n\nPooled over training seeds; 95% bootstrap confidence intervals over tasks and seeds in brackets.\n",
            cell(title)
        );
        out.push_str("| variant | seeds |");
        for j in 0..table.metrics.len() {
            let _ = write!(out, " {} |", cell(&metric_header(table, j)));
        }
        out.push_str("\n|---|---:|");
        for _ in &table.metrics {
            out.push_str("---|");
        }
        out.push('\n');
        for row in &table.rows {
            let seeds = row.seeds();
            let _ = write!(out, "| {} | {seeds} |", cell(&row.variant));
            for (c, m) in row.cells.iter().zip(&table.metrics) {
                match c {
                    Some(e) => {
                        let _ = write!(out, " {} |", estimate_text(e, m.unit));
                    }
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        out.push('\n');
        for c in &table.comparisons {
            let _ = writeln!(out, "- {}", escape(&c.sentence));
        }
        out.push('\n');
    }
    for note in &data.answer.notes {
        let _ = writeln!(out, "Note: {}\n", escape(note));
    }

    if !data.variants.is_empty() {
        let mut ks: Vec<u64> = data
            .variants
            .iter()
            .flat_map(|v| v.pass_at_k.iter().map(|p| p.k))
            .collect();
        ks.sort_unstable();
        ks.dedup();
        out.push_str("## pass@k\n\n95% bootstrap confidence intervals over tasks in brackets.\n\n");
        out.push_str("| variant | benchmark | tasks | samples |");
        for k in &ks {
            let _ = write!(out, " pass@{k} |");
        }
        out.push_str("\n|---|---|---:|---:|");
        for _ in &ks {
            out.push_str("---:|");
        }
        out.push('\n');
        for v in &data.variants {
            let _ = write!(
                out,
                "| {} | {} | {} | {} |",
                cell(&v.name),
                cell(&v.benchmark),
                v.tasks,
                v.samples
            );
            for k in &ks {
                match v.pass_at_k.iter().find(|p| p.k == *k) {
                    Some(p) => {
                        let _ = write!(out, " {} |", score_text(p));
                    }
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        out.push('\n');
    }

    if !data.comparisons.is_empty() {
        out.push_str("## Paired comparisons\n\n");
        out.push_str("| B vs A | tasks | pass@1 A | pass@1 B | B − A | CI | p | test |\n");
        out.push_str("|---|---:|---:|---:|---:|---|---:|---|\n");
        for c in &data.comparisons {
            let _ = writeln!(
                out,
                "| {} vs {} | {} | {} | {} | {:+.1} pp | [{:+.1}, {:+.1}] | {} | {} |",
                cell(&c.b),
                cell(&c.a),
                c.tasks,
                pct(c.pass1_a),
                pct(c.pass1_b),
                100.0 * c.diff,
                100.0 * c.ci_low,
                100.0 * c.ci_high,
                cell(crate::grade::stats::format_p(c.p_value).trim_start_matches("= ")),
                c.test
            );
        }
        out.push('\n');
        for c in &data.comparisons {
            let _ = writeln!(out, "- {}", escape(&c.verdict));
        }
        out.push('\n');
    }

    if data.variants.iter().any(|v| !v.loss.is_empty()) {
        out.push_str("## Training loss\n\nHeld-out: the loss at the end on records the training stage held out of its own data.\n\n| variant | steps | first | last | min | held-out |\n|---|---:|---:|---:|---:|---:|\n");
        for v in data.variants.iter().filter(|v| !v.loss.is_empty()) {
            let first = v.loss.first().map(|p| p.loss).unwrap_or(f64::NAN);
            let last = v.loss.last().map(|p| p.loss).unwrap_or(f64::NAN);
            let min = v.loss.iter().map(|p| p.loss).fold(f64::INFINITY, f64::min);
            let steps = v.loss.last().map(|p| p.step).unwrap_or(0);
            let _ = writeln!(
                out,
                "| {} | {steps} | {first:.4} | {last:.4} | {min:.4} | {} |",
                cell(&v.name),
                v.held_out_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "–".into())
            );
        }
        out.push('\n');
    }

    if !data.data.is_empty() {
        out.push_str(&data_table_markdown(&data.data));
    }

    if !data.contamination.is_empty() || !data.nearest.is_empty() {
        out.push_str(&contamination_markdown(data));
    }

    if !data.filters.is_empty() {
        out.push_str("## Data filters\n\n");
        for f in &data.filters {
            let _ = writeln!(
                out,
                "### {}\n\n{} of {} rows kept ({}).\n\n| reason | dropped |\n|---|---:|",
                cell(&f.dataset),
                f.kept,
                f.total,
                pct(if f.total > 0 {
                    f.kept as f64 / f.total as f64
                } else {
                    0.0
                })
            );
            for r in &f.reasons {
                let _ = writeln!(out, "| {} | {} |", cell(&r.reason), r.count);
            }
            out.push('\n');
            for h in &f.histograms {
                let _ = writeln!(out, "Histogram **{}**:\n", cell(&h.title));
                out.push_str("| bin | rows |\n|---|---:|\n");
                for (i, c) in h.counts.iter().enumerate() {
                    if let (Some(a), Some(b)) = (h.edges.get(i), h.edges.get(i + 1)) {
                        let _ = writeln!(out, "| [{a}, {b}) | {c} |");
                    }
                }
                if let Some(t) = h.threshold {
                    let _ = writeln!(out, "\nThreshold: {t}");
                }
                out.push('\n');
            }
        }
    }

    if !data.completions.is_empty() {
        out.push_str("## Completions\n\n");
        if !data.completions_note.is_empty() {
            let _ = writeln!(out, "{}\n", escape(&data.completions_note));
        }
        for row in &data.completions {
            let _ = writeln!(out, "### {}\n", cell(&row.task_id));
            code_block(&mut out, "python", &row.prompt);
            for c in &row.completions {
                let mark = match c.passed {
                    Some(true) => " — passed".to_string(),
                    Some(false) if !c.outcome.is_empty() => {
                        format!(" — failed: {}", cell(&c.outcome))
                    }
                    Some(false) => " — failed".to_string(),
                    None => String::new(),
                };
                let _ = writeln!(out, "**{}**{mark}\n", cell(&c.variant));
                code_block(&mut out, "python", &c.completion);
            }
        }
    }

    if !data.manifest.is_empty() || !data.cache_keys.is_empty() {
        out.push_str("## Provenance\n\n");
        if !data.cache_keys.is_empty() {
            out.push_str("| stage | cache key |\n|---|---|\n");
            for k in &data.cache_keys {
                let _ = writeln!(
                    out,
                    "| {} | `{}` |",
                    cell(&k.stage),
                    cell(&k.key).replace('`', "'")
                );
            }
            out.push('\n');
        }
        if !data.manifest.is_empty() {
            out.push_str("Manifest:\n\n");
            code_block(&mut out, "toml", &data.manifest);
        }
    }
    out
}

/// The contamination tables and the most resembled eval tasks.
fn contamination_markdown(data: &ReportData) -> String {
    use super::contamination::{
        caption, cells, nearest_cells, COLUMNS, HEADING, INTRO, NEAREST_COLUMNS,
    };
    // INTRO is our own text, not data: no escaping (markdown would show `&#39;`).
    let mut out = format!("## {HEADING}\n\n{INTRO}\n\n");
    let header =
        |cols: &[&str]| format!("| {} |\n|{}\n", cols.join(" | "), "---|".repeat(cols.len()));
    for table in &data.contamination {
        let _ = writeln!(out, "### {}\n", cell(&caption(table)));
        out.push_str(&header(&COLUMNS));
        for row in &table.rows {
            let c = cells(row).map(|c| cell(&c));
            let _ = writeln!(out, "| {} |", c.join(" | "));
        }
        out.push('\n');
    }
    if !data.nearest.is_empty() {
        out.push_str("### The most resembled eval tasks\n\n");
        out.push_str(&header(&NEAREST_COLUMNS));
        for e in &data.nearest {
            let c = nearest_cells(e).map(|c| cell(&c));
            let _ = writeln!(out, "| {} |", c.join(" | "));
        }
        out.push('\n');
    }
    out
}

/// The data variants side by side.
fn data_table_markdown(rows: &[super::DataRow]) -> String {
    let mut out = String::from(
        "## The data\n\nEach variant's records as its training template renders them. distinct-n: \
         distinct word n-grams over all; compression: raw over gzip'd bytes (higher repeats more); \
         near duplicates: what the near-dedup step would remove; spread: mean pairwise cosine distance of MiniLM embeddings and clusters at cosine 0.9 on a sample (with an embedder).\n\n\
         | variant | records | tokens p50 / p90 / max | words p50 | distinct-1 | distinct-2 | distinct-4 | compression | exact dup | near dup | spread (clusters / sample) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let s = &r.stats.stats;
        let tokens = s.tokens.as_ref().map_or_else(
            || "–".to_string(),
            |t| format!("{:.0} / {:.0} / {:.0}", t.p50, t.p90, t.max),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {tokens} | {:.0} | {:.3} | {:.3} | {:.3} | {:.2} | {} | {} | {} |",
            cell(&r.variant),
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
    out.push('\n');
    let coverage = super::coverage_rows(rows);
    if !coverage.is_empty() {
        let _ = writeln!(out, "{}\n", super::COVERAGE_INTRO);
        let _ = writeln!(out, "| {} |", super::COVERAGE_COLUMNS.join(" | "));
        out.push_str("|---|---|---:|---:|---:|\n");
        for row in coverage {
            let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out.push('\n');
    }
    out
}
