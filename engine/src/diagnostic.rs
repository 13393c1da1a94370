//! Diagnostics as data: one JSON shape for every error the CLI reports, whether the manifest
//! was wrong or a stage failed at run time (`--error-format json`, `run --json`).
//!
//! miette's own JSON handler gives spans as byte offsets; editors and CI annotations want lines
//! and columns, so each label here carries both (1-based, columns in characters), read from
//! the diagnostic's own source.

use miette::{Diagnostic, SourceSpan};
use serde::Serialize;

/// One place a diagnostic points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JsonLabel {
    /// What the label says about the place (`here`, `this stage`).
    pub label: Option<String>,
    /// The source's name, usually the manifest's path.
    pub file: Option<String>,
    /// 1-based line of the span's start.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the span's start.
    pub column: Option<usize>,
    /// Byte offset of the span's start in the source.
    pub offset: usize,
    /// Length of the span in bytes.
    pub length: usize,
}

/// A diagnostic as JSON: what `--error-format json` prints, one object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JsonDiagnostic {
    /// The error's one-line message.
    pub message: String,
    /// Its stable code (`pipeline::manifest::unknown_kind`), if any.
    pub code: Option<String>,
    /// `error`, `warning` or `advice`.
    pub severity: &'static str,
    /// What to do about it.
    pub help: Option<String>,
    /// The chain of underlying causes, outermost first.
    pub causes: Vec<String>,
    /// The places it points at.
    pub labels: Vec<JsonLabel>,
    /// Further diagnostics reported with it (every problem of a manifest at once).
    pub related: Vec<JsonDiagnostic>,
}

impl JsonDiagnostic {
    /// Converts `diag`, reading lines and columns from its source code.
    pub fn of(diag: &dyn Diagnostic) -> JsonDiagnostic {
        Self::with_source(diag, diag.source_code())
    }

    fn with_source(
        diag: &dyn Diagnostic,
        inherited: Option<&dyn miette::SourceCode>,
    ) -> JsonDiagnostic {
        let source = diag.source_code().or(inherited);
        let labels = diag
            .labels()
            .map(|labels| {
                labels
                    .map(|l| label_json(l.label(), *l.inner(), source))
                    .collect()
            })
            .unwrap_or_default();
        let mut causes = Vec::new();
        let mut next = diag.source();
        while let Some(cause) = next {
            causes.push(cause.to_string());
            next = cause.source();
        }
        let related = diag
            .related()
            .map(|r| r.map(|d| Self::with_source(d, source)).collect())
            .unwrap_or_default();
        JsonDiagnostic {
            message: diag.to_string(),
            code: diag.code().map(|c| c.to_string()),
            severity: match diag.severity() {
                Some(miette::Severity::Warning) => "warning",
                Some(miette::Severity::Advice) => "advice",
                _ => "error",
            },
            help: diag.help().map(|h| h.to_string()),
            causes,
            labels,
            related,
        }
    }

    /// The compact one-line JSON text.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            // Serialising plain strings and numbers cannot fail; keep a valid line regardless.
            format!("{{\"message\": {:?}}}", self.message)
        })
    }
}

fn label_json(
    label: Option<&str>,
    span: SourceSpan,
    source: Option<&dyn miette::SourceCode>,
) -> JsonLabel {
    let contents = source.and_then(|s| s.read_span(&span, 0, 0).ok());
    JsonLabel {
        label: label.map(str::to_string),
        file: contents.as_ref().and_then(|c| c.name().map(str::to_string)),
        line: contents.as_ref().map(|c| c.line() + 1),
        column: contents.as_ref().map(|c| c.column() + 1),
        offset: span.offset(),
        length: span.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error, Diagnostic)]
    #[error("bad value")]
    #[diagnostic(code(test::bad), help("fix it"))]
    struct Bad {
        #[source_code]
        src: miette::NamedSource<String>,
        #[label("here")]
        at: SourceSpan,
        #[source]
        cause: std::io::Error,
    }

    #[test]
    fn labels_carry_lines_and_columns() {
        let text = "[a]\nkind = \"x\"\nsteps = \"many\"\n".to_string();
        let offset = text.find("\"many\"").unwrap_or(0);
        let bad = Bad {
            src: miette::NamedSource::new("m.toml", text),
            at: (offset, 6).into(),
            cause: std::io::Error::other("underneath"),
        };
        let json = JsonDiagnostic::of(&bad);
        assert_eq!(json.message, "bad value");
        assert_eq!(json.code.as_deref(), Some("test::bad"));
        assert_eq!(json.help.as_deref(), Some("fix it"));
        assert_eq!(json.causes, ["underneath"]);
        let label = &json.labels[0];
        assert_eq!(label.file.as_deref(), Some("m.toml"));
        assert_eq!((label.line, label.column), (Some(3), Some(9)));
        assert_eq!((label.offset, label.length), (offset, 6));
        assert!(json.to_line().starts_with("{\"message\":\"bad value\""));
    }
}
