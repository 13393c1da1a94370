//! The `report` artifact: `report.md`, `report.html`, `answer.txt` (the answer table as plain
//! text) and `report.json` (the [`ReportData`] all were rendered from).

use std::path::Path;

use crate::json::write_json;
use crate::report::answer::render_answer_text;
use crate::report::{render_html, render_markdown, ReportData};

/// The `report` artifact.
pub struct ReportArtifact;

impl ReportArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "report";
    /// The report as Markdown.
    pub const MARKDOWN_FILE: &'static str = "report.md";
    /// The report as a self-contained HTML page.
    pub const HTML_FILE: &'static str = "report.html";
    /// The data the report was rendered from.
    pub const DATA_FILE: &'static str = "report.json";
    /// The answer table and verdicts as plain text (what `pipeline run` prints at the end).
    pub const ANSWER_FILE: &'static str = "answer.txt";

    /// Renders `data` into `dir`.
    pub fn write(dir: &Path, data: &ReportData) -> miette::Result<()> {
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text)
                .map_err(|e| miette::miette!("cannot write {}: {e}", dir.join(name).display()))
        };
        write(Self::MARKDOWN_FILE, render_markdown(data))?;
        write(Self::HTML_FILE, render_html(data))?;
        write(Self::ANSWER_FILE, render_answer_text(&data.answer))?;
        write_json(&dir.join(Self::DATA_FILE), data)?;
        Ok(())
    }
}
