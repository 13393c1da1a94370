//! Manifest diagnostics: every problem has a stable code, a message, a place and a help line.

use std::ops::Range;
use std::path::PathBuf;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};

/// One problem in a manifest.
#[derive(Debug, Clone)]
pub struct ManifestError {
    /// Stable code, e.g. `manifest::unknown-kind`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
    /// Byte range in the manifest, if the problem has a place.
    pub span: Option<Range<usize>>,
    /// Text shown at the span.
    pub label: String,
    /// What to do about it.
    pub help: Option<String>,
    /// Further places (e.g. every stage on a cycle).
    pub extra: Vec<(Range<usize>, String)>,
    pub(super) src: Option<NamedSource<String>>,
}

impl ManifestError {
    pub(super) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            span: None,
            label: String::new(),
            help: None,
            extra: Vec::new(),
            src: None,
        }
    }
    pub(super) fn at(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
        self.span = Some(span);
        self.label = label.into();
        self
    }
    pub(super) fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub(super) fn also(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
        self.extra.push((span, label.into()));
        self
    }
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ManifestError {}

impl Diagnostic for ManifestError {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.src.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let primary = self.span.clone().map(|s| {
            LabeledSpan::new_primary_with_span(Some(self.label.clone()), SourceSpan::from(s))
        });
        let extra = self
            .extra
            .iter()
            .map(|(s, l)| LabeledSpan::new_with_span(Some(l.clone()), SourceSpan::from(s.clone())));
        Some(Box::new(primary.into_iter().chain(extra)))
    }
}

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestLoadError {
    /// The file could not be read.
    #[error("cannot read manifest {}: {source}", path.display())]
    Io {
        /// The manifest path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The manifest has errors; nothing was run.
    #[error("{} has {} error{}", path.display(), errors.len(), if errors.len() == 1 { "" } else { "s" })]
    Invalid {
        /// The manifest path.
        path: PathBuf,
        /// Every problem found.
        errors: Vec<ManifestError>,
    },
}

impl Diagnostic for ManifestLoadError {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        match self {
            Self::Io { .. } => Some(Box::new("manifest::io")),
            Self::Invalid { .. } => Some(Box::new("manifest::invalid")),
        }
    }
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        match self {
            Self::Io { .. } => Some(Box::new(
                "give the path of a TOML manifest file (this project's are in manifests/)",
            )),
            Self::Invalid { .. } => None,
        }
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            Self::Io { .. } => None,
            Self::Invalid { errors, .. } => {
                Some(Box::new(errors.iter().map(|e| e as &dyn Diagnostic)))
            }
        }
    }
}

impl ManifestLoadError {
    /// The individual problems (empty for I/O errors).
    pub fn errors(&self) -> &[ManifestError] {
        match self {
            Self::Io { .. } => &[],
            Self::Invalid { errors, .. } => errors,
        }
    }
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
