//! One line of a file as miette source code, numbered as in the file.
//!
//! Errors about one line of a large file (a malformed JSON Lines record, a line that is not
//! UTF-8) carry only that line, not the whole file; a plain `NamedSource` of the line would
//! be rendered as `file:1:COL` whatever line it came from.

use miette::{MietteError, MietteSpanContents, SourceCode, SourceSpan, SpanContents};

/// The text of line `line` (1-based) of the file `name`.
#[derive(Debug, Clone)]
pub struct LineSource {
    name: String,
    text: String,
    line: usize,
}

impl LineSource {
    /// Line `line` (1-based) of `name`, whose text is `text`.
    pub fn new(name: impl Into<String>, text: impl Into<String>, line: u64) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
            line: usize::try_from(line.max(1)).unwrap_or(usize::MAX),
        }
    }
}

impl SourceCode for LineSource {
    fn read_span<'a>(
        &'a self,
        span: &SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn SpanContents<'a> + 'a>, MietteError> {
        let inner = self
            .text
            .read_span(span, context_lines_before, context_lines_after)?;
        Ok(Box::new(MietteSpanContents::new_named(
            self.name.clone(),
            inner.data(),
            *inner.span(),
            inner.line().saturating_add(self.line - 1),
            inner.column(),
            inner.line_count(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snippet_header_names_the_line_in_the_file() {
        #[derive(Debug, thiserror::Error, miette::Diagnostic)]
        #[error("bad")]
        struct Bad {
            #[source_code]
            src: LineSource,
            #[label("here")]
            span: SourceSpan,
        }
        let report = miette::Report::new(Bad {
            src: LineSource::new("data.jsonl", "{\"a\": 1,, }", 26),
            span: (9, 0).into(),
        });
        let mut out = String::new();
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .render_report(&mut out, report.as_ref())
            .unwrap();
        assert!(out.contains("data.jsonl:26:10"), "{out}");
        assert!(out.contains("26 │"), "{out}");
    }
}
