//! Experiment manifests: TOML in, validated and matrix-expanded stage instances out.
//!
//! ```toml
//! [experiment]
//! name = "demo"
//! seed = 7
//!
//! [textbook]
//! kind = "download"
//! path = "data/textbook.jsonl"
//!
//! [tokenize]
//! kind = "tokenize"
//! matrix.data = ["textbook", "messy"]   # expands into tokenize@textbook, tokenize@messy
//! inputs = { records = "${data}" }      # ${key} substitutes the matrix value
//!
//! [train]
//! kind = "lora-train"
//! inputs = { tokens = "tokenize" }      # expands to match: train@textbook, train@messy
//! ```
//!
//! Every table except `[experiment]` is a stage. Reserved keys in a stage table are `kind`,
//! `inputs` (slot = "stage" or "stage.output", or an array for fan-in slots) and `matrix`; all
//! other keys are the kind's parameters, deserialised into its typed struct. Every problem found
//! is reported at once, as a diagnostic pointing into the manifest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::stage::{DynStage, ParamError, ParsedParams, Registry};

/// The `[experiment]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Experiment name; also names its records in the cache index.
    pub name: String,
    /// Seed handed to stages that use randomness.
    #[serde(default)]
    pub seed: u64,
    /// Cache root, relative to the manifest's directory; `--cache` and `PIPELINE_CACHE` win.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Free text shown in reports.
    #[serde(default)]
    pub description: String,
}

/// Options that change how a manifest is read.
#[derive(Debug, Clone, Default)]
pub struct ManifestOptions {
    /// `stage.param=value` overrides (`--set`); `stage` is a base name (all its variants) or an
    /// expanded instance name such as `train@messy`.
    pub overrides: Vec<String>,
}

/// A connection from a producer's output to a consumer's input slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    /// Producing stage instance.
    pub stage: String,
    /// Output name of the producer.
    pub output: String,
}

/// One stage after matrix expansion: what the executor runs.
pub struct StageInstance {
    /// Instance name, e.g. `train` or `train@messy`.
    pub name: String,
    /// The manifest table it came from, e.g. `train`.
    pub base: String,
    /// Matrix assignment of this instance, in declaration order.
    pub matrix: Vec<(String, String)>,
    /// Kind name.
    pub kind: &'static str,
    /// Kind implementation version.
    pub kind_version: &'static str,
    /// Typed, validated parameters.
    pub params: ParsedParams,
    /// Connected inputs per slot.
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    /// Output names, the default first.
    pub outputs: Vec<&'static str>,
    /// Whether it needs the (single) GPU.
    pub needs_gpu: bool,
    /// Whether the experiment seed goes into its key.
    pub uses_seed: bool,
    pub(crate) stage: Arc<dyn DynStage>,
}

impl std::fmt::Debug for StageInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageInstance")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("params", &self.params)
            .field("inputs", &self.inputs)
            .finish()
    }
}

/// A parsed, validated, expanded manifest.
#[derive(Debug)]
pub struct Manifest {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its text (reports embed it).
    pub source: String,
    /// The `[experiment]` table.
    pub experiment: Experiment,
    /// Stage instances in manifest order (expansions in matrix order).
    pub stages: Vec<StageInstance>,
}

impl Manifest {
    /// The instance called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageInstance> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Instances whose name or base name is `name` (so `train` selects every `train@…`).
    pub fn select(&self, name: &str) -> Vec<&StageInstance> {
        self.stages
            .iter()
            .filter(|s| s.name == name || s.base == name)
            .collect()
    }
}

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
    src: Option<NamedSource<String>>,
}

impl ManifestError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
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
    fn at(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
        self.span = Some(span);
        self.label = label.into();
        self
    }
    fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    fn also(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
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
            Self::Io { .. } => Some(Box::new("check the path; manifests live in manifests/")),
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

/// Reads, validates and expands the manifest at `path`.
pub fn load_manifest(
    path: &Path,
    registry: &Registry,
    options: &ManifestOptions,
) -> Result<Manifest, ManifestLoadError> {
    let source = std::fs::read_to_string(path).map_err(|source| ManifestLoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_manifest(path, source, registry, options)
}

/// Validates and expands a manifest given as text (`path` is used for messages and relative
/// paths only).
pub fn parse_manifest(
    path: &Path,
    source: String,
    registry: &Registry,
    options: &ManifestOptions,
) -> Result<Manifest, ManifestLoadError> {
    let mut errors = Vec::new();
    let parsed = Parser {
        registry,
        source: &source,
        errors: &mut errors,
        producer_kinds: HashMap::new(),
        broken: BTreeSet::new(),
    }
    .parse(options);
    if errors.is_empty() {
        if let Some((experiment, stages)) = parsed {
            return Ok(Manifest {
                path: path.to_path_buf(),
                source,
                experiment,
                stages,
            });
        }
    }
    // Parameter errors repeat once per matrix expansion; report each place once.
    let mut seen = BTreeSet::new();
    errors.retain(|e| seen.insert((e.message.clone(), e.span.clone().map(|s| (s.start, s.end)))));
    let named = NamedSource::new(path.display().to_string(), source.clone()).with_language("toml");
    for e in &mut errors {
        e.src = Some(named.clone());
    }
    Err(ManifestLoadError::Invalid {
        path: path.to_path_buf(),
        errors,
    })
}

const RESERVED: [&str; 3] = ["kind", "inputs", "matrix"];

/// Expanded instances of each manifest table: (matrix assignment, instance name).
type Variants = HashMap<String, Vec<(Vec<(String, String)>, String)>>;

struct RawInput {
    slot: String,
    slot_span: Range<usize>,
    refs: Vec<(String, Range<usize>)>,
}

struct RawStage<'i> {
    name: String,
    span: Range<usize>,
    kind: Arc<dyn DynStage>,
    inputs: Vec<RawInput>,
    matrix: Vec<(String, Vec<String>)>,
    params: Spanned<DeTable<'i>>,
}

struct Override<'o> {
    stage: String,
    path: Vec<String>,
    value: Spanned<DeValue<'o>>,
    raw: String,
}

struct Parser<'a> {
    registry: &'a Registry,
    source: &'a str,
    errors: &'a mut Vec<ManifestError>,
    /// Kind of each manifest table, for checking connections.
    producer_kinds: HashMap<String, Arc<dyn DynStage>>,
    /// Tables that already failed to parse: references to them are not reported again.
    broken: BTreeSet<String>,
}

fn did_you_mean<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn value_type(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn valid_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A matrix value as it appears in stage names, or why it cannot be one.
fn matrix_value(value: &DeValue<'_>) -> Result<String, String> {
    let v = match value {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.as_str().to_string(),
        DeValue::Boolean(b) => b.to_string(),
        other => {
            return Err(format!(
                "matrix values must be strings, integers or booleans, found {}",
                value_type(other)
            ))
        }
    };
    if !valid_stage_name(&v) {
        return Err(format!(
            "matrix value `{v}` cannot be part of a stage name (use letters, digits, `_` and `-`)"
        ));
    }
    Ok(v)
}

impl<'a> Parser<'a> {
    fn err(&mut self, e: ManifestError) {
        self.errors.push(e);
    }

    fn parse<'o>(mut self, options: &'o ManifestOptions) -> Option<(Experiment, Vec<StageInstance>)>
    where
        'a: 'o,
    {
        let (root, syntax) = DeTable::parse_recoverable(self.source);
        if !syntax.is_empty() {
            for e in syntax {
                let mut err = ManifestError::new(
                    "manifest::syntax",
                    format!("TOML syntax error: {}", e.message().trim()),
                );
                if let Some(span) = e.span() {
                    err = err.at(span, "here");
                }
                self.err(err.help("fix the TOML syntax; see https://toml.io"));
            }
            return None;
        }
        let root = root.into_inner();
        let overrides = self.parse_overrides(options);

        let mut experiment = None;
        let mut raw_stages = Vec::new();
        for (key, value) in root.iter() {
            let name = key.get_ref().to_string();
            let span = key.span();
            if name == "experiment" {
                experiment = self.parse_experiment(value, span);
                continue;
            }
            match self.parse_stage(&name, span, value) {
                Some(raw) => raw_stages.push(raw),
                None => {
                    self.broken.insert(name);
                }
            }
        }
        if experiment.is_none() && !self.errors.iter().any(|e| e.code == "manifest::experiment") {
            self.err(
                ManifestError::new(
                    "manifest::experiment",
                    "the manifest has no [experiment] table",
                )
                .at(0..0, "expected near the top")
                .help("add `[experiment]` with at least `name = \"...\"`"),
            );
        }
        for o in &overrides {
            let base = o.stage.split('@').next().unwrap_or_default();
            if !raw_stages.iter().any(|s| s.name == base) && !self.broken.contains(base) {
                let mut err = ManifestError::new(
                    "manifest::override",
                    format!("--set {}: there is no stage `{}`", o.raw, o.stage),
                );
                if let Some(m) = did_you_mean(&o.stage, raw_stages.iter().map(|s| s.name.as_str()))
                {
                    err = err.help(format!("did you mean `{m}`?"));
                }
                self.err(err);
            }
        }
        let (matrix_overrides, overrides): (Vec<_>, Vec<_>) =
            overrides.into_iter().partition(|o| o.path[0] == "matrix");
        for o in &matrix_overrides {
            self.apply_matrix_override(o, &mut raw_stages);
        }
        let stages = self.expand(raw_stages, &overrides)?;
        Some((experiment?, stages))
    }

    fn parse_overrides<'o>(&mut self, options: &'o ManifestOptions) -> Vec<Override<'o>> {
        let mut out = Vec::new();
        for raw in &options.overrides {
            let Some((lhs, rhs)) = raw.split_once('=') else {
                self.err(ManifestError::new(
                    "manifest::override",
                    format!("--set {raw}: expected STAGE.PARAM=VALUE"),
                ));
                continue;
            };
            let Some((stage, path)) = lhs.trim().split_once('.') else {
                self.err(ManifestError::new(
                    "manifest::override",
                    format!("--set {raw}: expected STAGE.PARAM=VALUE (no `.` in `{lhs}`)"),
                ));
                continue;
            };
            let path: Vec<String> = path.split('.').map(|p| p.trim().to_string()).collect();
            if path[0] == "matrix" && path.len() != 2 {
                self.err(
                    ManifestError::new(
                        "manifest::override",
                        format!("--set {raw}: a matrix override names one key"),
                    )
                    .help("write `--set STAGE.matrix.KEY=[values]`, e.g. `--set train.matrix.seed=[1]`"),
                );
                continue;
            }
            if path[0] != "matrix" && RESERVED.contains(&path[0].as_str()) {
                self.err(ManifestError::new(
                    "manifest::override",
                    format!(
                        "--set {raw}: `{}` is not a parameter and cannot be overridden",
                        path[0]
                    ),
                ));
                continue;
            }
            // A value that is not valid TOML is taken as a plain string (`--set a.b=hello`).
            let value = match DeValue::parse(rhs.trim()) {
                Ok(v) => v.into_inner(),
                Err(_) => DeValue::String(std::borrow::Cow::Borrowed(rhs.trim())),
            };
            out.push(Override {
                stage: stage.trim().to_string(),
                path,
                value: Spanned::new(0..0, value),
                raw: raw.clone(),
            });
        }
        out
    }

    fn parse_experiment(
        &mut self,
        value: &Spanned<DeValue<'_>>,
        key_span: Range<usize>,
    ) -> Option<Experiment> {
        let DeValue::Table(table) = value.get_ref() else {
            self.err(
                ManifestError::new("manifest::experiment", "`experiment` must be a table")
                    .at(key_span, "not a table"),
            );
            return None;
        };
        use serde::de::IntoDeserializer;
        match Experiment::deserialize(Spanned::new(value.span(), table.clone()).into_deserializer())
        {
            Ok(e) => Some(e),
            Err(e) => {
                let span = e.span().unwrap_or(key_span);
                self.err(
                    ManifestError::new(
                        "manifest::experiment",
                        format!("invalid [experiment]: {}", e.message().trim()),
                    )
                    .at(span, "here")
                    .help("[experiment] takes name (required), seed, cache and description"),
                );
                None
            }
        }
    }

    fn parse_stage<'i>(
        &mut self,
        name: &str,
        span: Range<usize>,
        value: &Spanned<DeValue<'i>>,
    ) -> Option<RawStage<'i>> {
        let DeValue::Table(table) = value.get_ref() else {
            self.err(
                ManifestError::new(
                    "manifest::not-a-table",
                    format!(
                        "`{name}` is {}, but top-level keys must be stage tables",
                        value_type(value.get_ref())
                    ),
                )
                .at(span, "expected a [table]")
                .help(format!(
                    "write `[{name}]` with `kind = \"...\"` and the kind's parameters"
                )),
            );
            return None;
        };
        if !valid_stage_name(name) {
            self.err(
                ManifestError::new("manifest::stage-name", format!("invalid stage name `{name}`"))
                    .at(span.clone(), "invalid name")
                    .help("stage names use letters, digits, `_` and `-` (`@` and `.` are reserved for variants and outputs)"),
            );
        }
        let mut params = table.clone();
        for r in RESERVED {
            params.remove(r);
        }
        let kind = match table.get("kind").map(|k| (k.get_ref(), k.span())) {
            None => {
                self.err(
                    ManifestError::new(
                        "manifest::missing-kind",
                        format!("stage `{name}` has no `kind`"),
                    )
                    .at(span.clone(), "this stage")
                    .help(format!(
                        "add `kind = \"...\"`; known kinds: {}",
                        self.registry.kind_names().collect::<Vec<_>>().join(", ")
                    )),
                );
                None
            }
            Some((DeValue::String(k), kspan)) => match self.registry.get(k) {
                Some(kind) => Some(kind.clone()),
                None => {
                    let help = match did_you_mean(k, self.registry.kind_names()) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => format!(
                            "known kinds: {}",
                            self.registry.kind_names().collect::<Vec<_>>().join(", ")
                        ),
                    };
                    self.err(
                        ManifestError::new(
                            "manifest::unknown-kind",
                            format!("unknown stage kind `{k}`"),
                        )
                        .at(kspan, "unknown kind")
                        .help(help),
                    );
                    None
                }
            },
            Some((other, kspan)) => {
                self.err(
                    ManifestError::new(
                        "manifest::kind-type",
                        format!("`kind` must be a string, found {}", value_type(other)),
                    )
                    .at(kspan, "expected a string"),
                );
                None
            }
        };
        let inputs = self.parse_inputs(name, table);
        let matrix = self.parse_matrix(name, table);
        Some(RawStage {
            name: name.to_string(),
            span,
            kind: kind?,
            inputs: inputs?,
            matrix: matrix?,
            params: Spanned::new(value.span(), params),
        })
    }

    fn parse_inputs(&mut self, stage: &str, table: &DeTable<'_>) -> Option<Vec<RawInput>> {
        let Some(inputs) = table.get("inputs") else {
            return Some(Vec::new());
        };
        let DeValue::Table(inputs) = inputs.get_ref() else {
            self.err(
                ManifestError::new(
                    "manifest::inputs",
                    format!("`inputs` of `{stage}` must be a table"),
                )
                .at(
                    inputs.span(),
                    format!("found {}", value_type(inputs.get_ref())),
                )
                .help("write `inputs = { slot = \"stage\" }`"),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (slot, value) in inputs.iter() {
            let refs = match value.get_ref() {
                DeValue::String(s) => vec![(s.to_string(), value.span())],
                DeValue::Array(items) => {
                    let mut refs = Vec::new();
                    for item in items.iter() {
                        match item.get_ref() {
                            DeValue::String(s) => refs.push((s.to_string(), item.span())),
                            other => {
                                ok = false;
                                self.err(
                                    ManifestError::new(
                                        "manifest::inputs",
                                        format!(
                                            "input references must be strings, found {}",
                                            value_type(other)
                                        ),
                                    )
                                    .at(item.span(), "expected \"stage\" or \"stage.output\""),
                                );
                            }
                        }
                    }
                    refs
                }
                other => {
                    ok = false;
                    self.err(
                        ManifestError::new(
                            "manifest::inputs",
                            format!(
                                "input `{}` must be a stage name or a list of them, found {}",
                                slot.get_ref(),
                                value_type(other)
                            ),
                        )
                        .at(value.span(), "expected \"stage\" or \"stage.output\""),
                    );
                    continue;
                }
            };
            out.push(RawInput {
                slot: slot.get_ref().to_string(),
                slot_span: slot.span(),
                refs,
            });
        }
        ok.then_some(out)
    }

    /// `--set STAGE.matrix.KEY=[values]`: replaces the values of one existing matrix key, so a
    /// run can take a cut of an experiment (fewer seeds, one benchmark) without editing it.
    fn apply_matrix_override(&mut self, o: &Override<'_>, raw_stages: &mut [RawStage<'_>]) {
        let key = &o.path[1];
        let fail = |message: String| ManifestError::new("manifest::override", message);
        if o.stage.contains('@') {
            self.err(
                fail(format!(
                    "--set {}: a matrix belongs to a stage's base name",
                    o.raw
                ))
                .help(format!(
                    "write `--set {}.matrix.{key}=[...]`",
                    o.stage.split('@').next().unwrap_or_default()
                )),
            );
            return;
        }
        // A missing stage is reported by the caller's check of every override.
        let Some(stage) = raw_stages.iter_mut().find(|s| s.name == o.stage) else {
            return;
        };
        let Some(slot) = stage.matrix.iter_mut().find(|(k, _)| k == key) else {
            let keys: Vec<&str> = stage.matrix.iter().map(|(k, _)| k.as_str()).collect();
            let help = if keys.is_empty() {
                format!(
                    "`{}` has no matrix; a matrix override replaces existing values only",
                    o.stage
                )
            } else {
                format!("its matrix keys: {}", keys.join(", "))
            };
            self.err(
                fail(format!(
                    "--set {}: stage `{}` has no matrix key `{key}`",
                    o.raw, o.stage
                ))
                .help(help),
            );
            return;
        };
        let DeValue::Array(items) = o.value.get_ref() else {
            self.err(
                fail(format!("--set {}: matrix values must be an array", o.raw))
                    .help(format!("write `--set {}.matrix.{key}=[...]`", o.stage)),
            );
            return;
        };
        let mut values = Vec::new();
        for item in items.iter() {
            match matrix_value(item.get_ref()) {
                Ok(v) if values.contains(&v) => {
                    self.err(fail(format!(
                        "--set {}: matrix value `{v}` is listed twice",
                        o.raw
                    )));
                    return;
                }
                Ok(v) => values.push(v),
                Err(message) => {
                    self.err(fail(format!("--set {}: {message}", o.raw)));
                    return;
                }
            }
        }
        if values.is_empty() {
            self.err(fail(format!("--set {}: the matrix cannot be empty", o.raw)));
            return;
        }
        slot.1 = values;
    }

    fn parse_matrix(
        &mut self,
        stage: &str,
        table: &DeTable<'_>,
    ) -> Option<Vec<(String, Vec<String>)>> {
        let Some(matrix) = table.get("matrix") else {
            return Some(Vec::new());
        };
        let DeValue::Table(matrix) = matrix.get_ref() else {
            self.err(
                ManifestError::new(
                    "manifest::matrix",
                    format!("`matrix` of `{stage}` must be a table"),
                )
                .at(matrix.span(), "expected `matrix.key = [values]`"),
            );
            return None;
        };
        let mut out = Vec::new();
        for (key, values) in matrix.iter() {
            let DeValue::Array(items) = values.get_ref() else {
                self.err(
                    ManifestError::new(
                        "manifest::matrix",
                        format!("matrix `{}` must be an array", key.get_ref()),
                    )
                    .at(values.span(), "expected an array of values"),
                );
                return None;
            };
            let mut vals = Vec::new();
            for item in items.iter() {
                let v = match matrix_value(item.get_ref()) {
                    Ok(v) => v,
                    Err(message) => {
                        self.err(
                            ManifestError::new("manifest::matrix", message)
                                .at(item.span(), "unsupported value"),
                        );
                        return None;
                    }
                };
                if vals.contains(&v) {
                    self.err(
                        ManifestError::new(
                            "manifest::matrix",
                            format!("matrix value `{v}` is listed twice"),
                        )
                        .at(item.span(), "duplicate"),
                    );
                    return None;
                }
                vals.push(v);
            }
            if vals.is_empty() {
                self.err(
                    ManifestError::new(
                        "manifest::matrix",
                        format!("matrix `{}` is empty", key.get_ref()),
                    )
                    .at(values.span(), "no values"),
                );
                return None;
            }
            out.push((key.get_ref().to_string(), vals));
        }
        Some(out)
    }

    /// Expands matrices, resolves references, parses parameters.
    fn expand(
        &mut self,
        raw: Vec<RawStage<'_>>,
        overrides: &[Override<'_>],
    ) -> Option<Vec<StageInstance>> {
        let by_name: HashMap<&str, usize> = raw
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        self.producer_kinds = raw
            .iter()
            .map(|s| (s.name.clone(), s.kind.clone()))
            .collect();
        // Global order of matrix keys: order of first declaration.
        let mut key_order: Vec<String> = Vec::new();
        for s in &raw {
            for (k, _) in &s.matrix {
                if !key_order.contains(k) {
                    key_order.push(k.clone());
                }
            }
        }

        // Dependencies between manifest tables, for ordering and cycle detection. A reference
        // may contain `${key}`: it then depends on every stage it can resolve to.
        let mut graph = petgraph::graph::DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..raw.len()).map(|i| graph.add_node(i)).collect();
        let mut ok = true;
        for (i, s) in raw.iter().enumerate() {
            for input in &s.inputs {
                for (reference, span) in &input.refs {
                    let mut targets = Vec::new();
                    for resolved in substitute_all(reference, &s.matrix) {
                        let base = split_ref(&resolved)
                            .0
                            .split('@')
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        match by_name.get(base.as_str()) {
                            Some(&j) => targets.push(j),
                            None if self.broken.contains(&base) => ok = false,
                            None => {
                                ok = false;
                                let mut err = ManifestError::new("manifest::missing-stage", format!("stage `{}` refers to `{resolved}`, but there is no stage `{base}`", s.name)).at(span.clone(), "unknown stage");
                                if let Some(m) =
                                    did_you_mean(&base, raw.iter().map(|r| r.name.as_str()))
                                {
                                    err = err.help(format!("did you mean `{m}`?"));
                                } else {
                                    err = err.help(
                                        "define the stage as its own [table], or fix the name",
                                    );
                                }
                                self.err(err);
                            }
                        }
                    }
                    for j in targets {
                        graph.add_edge(nodes[j], nodes[i], ());
                    }
                }
            }
        }
        for scc in petgraph::algo::tarjan_scc(&graph) {
            let cyclic = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
            if cyclic {
                ok = false;
                let mut names: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
                names.sort_unstable();
                let list = names
                    .iter()
                    .map(|&i| format!("`{}`", raw[i].name))
                    .collect::<Vec<_>>()
                    .join(" -> ");
                let mut err =
                    ManifestError::new("manifest::cycle", format!("stages form a cycle: {list}"))
                        .at(raw[names[0]].span.clone(), "on the cycle")
                        .help(
                            "a stage cannot depend on its own output; remove one of these inputs",
                        );
                for &i in &names[1..] {
                    err = err.also(raw[i].span.clone(), "on the cycle");
                }
                self.err(err);
            }
        }
        if !ok {
            // The graph is broken, but parameters can still be checked, so that one pass
            // reports every problem.
            for s in &raw {
                if let Some(combo) = cartesian(&s.matrix, &key_order).into_iter().next() {
                    let name = instance_name(&s.name, &combo);
                    let _ = self.instance_params(s, &name, &combo, overrides);
                }
            }
            return None;
        }
        let order = petgraph::algo::toposort(&graph, None).ok()?;

        // name -> (matrix assignment, index into `instances`)
        let mut variants: Variants = HashMap::new();
        let mut instances: Vec<(usize, StageInstance)> = Vec::new();
        for node in order {
            let i = graph[node];
            let s = &raw[i];
            let own = cartesian(&s.matrix, &key_order);
            let mut made = Vec::new();
            for combo in own {
                self.expand_combo(s, combo, &variants, &key_order, &mut made);
            }
            let mut list = Vec::new();
            for (combo, inputs) in made {
                let name = instance_name(&s.name, &combo);
                let params = self.instance_params(s, &name, &combo, overrides);
                if let (Some(params), Some(inputs)) = (params, inputs) {
                    let kind = s.kind.clone();
                    let needs_gpu = kind.needs_gpu(&params);
                    let uses_seed = kind.uses_seed(&params);
                    list.push((combo.clone(), name.clone()));
                    instances.push((
                        i,
                        StageInstance {
                            name,
                            base: s.name.clone(),
                            matrix: combo,
                            kind: kind.kind(),
                            kind_version: kind.version(),
                            params,
                            inputs,
                            outputs: kind.outputs().iter().map(|o| o.name).collect(),
                            needs_gpu,
                            uses_seed,
                            stage: kind,
                        },
                    ));
                } else {
                    list.push((combo, name));
                }
            }
            variants.insert(s.name.clone(), list);
        }
        if !self.errors.is_empty() {
            return None;
        }
        // Manifest order, expansions in matrix order.
        instances.sort_by_key(|(i, _)| *i);
        Some(instances.into_iter().map(|(_, s)| s).collect())
    }

    #[allow(clippy::type_complexity)]
    fn expand_combo(
        &mut self,
        s: &RawStage<'_>,
        own: Vec<(String, String)>,
        variants: &Variants,
        key_order: &[String],
        made: &mut Vec<(
            Vec<(String, String)>,
            Option<BTreeMap<String, Vec<InputRef>>>,
        )>,
    ) {
        let slots = s.kind.inputs();
        // Resolve `${key}` in references with this combination's own values.
        let mut resolved: Vec<(&RawInput, Vec<(String, Range<usize>)>)> = Vec::new();
        for input in &s.inputs {
            let mut refs = Vec::new();
            for (r, span) in &input.refs {
                match substitute(r, &own) {
                    Ok(r) => refs.push((r, span.clone())),
                    Err(key) => self.err(
                        ManifestError::new(
                            "manifest::matrix",
                            format!(
                                "`${{{key}}}` in `{r}` is not a matrix key of stage `{}`",
                                s.name
                            ),
                        )
                        .at(span.clone(), "unknown matrix key")
                        .help("declare it with `matrix.KEY = [...]` in this stage"),
                    ),
                }
            }
            resolved.push((input, refs));
        }
        // Inherit the matrix of expanded producers connected to single-artifact slots.
        let mut combos = vec![own];
        for (input, refs) in &resolved {
            let many = slots
                .iter()
                .find(|sl| sl.name == input.slot)
                .is_some_and(|sl| sl.many);
            if many {
                continue;
            }
            for (r, _) in refs {
                let (stage_part, _) = split_ref(r);
                if stage_part.contains('@') {
                    continue;
                }
                let Some(vs) = variants.get(stage_part) else {
                    continue;
                };
                let mut next = Vec::new();
                for c in &combos {
                    for (assign, _) in vs {
                        if compatible(c, assign) {
                            let merged = merge(c, assign, key_order);
                            if !next.contains(&merged) {
                                next.push(merged);
                            }
                        }
                    }
                }
                combos = next;
            }
        }
        for combo in combos {
            let mut inputs: BTreeMap<String, Vec<InputRef>> = BTreeMap::new();
            let mut ok = true;
            for (input, refs) in &resolved {
                let Some(slot) = slots.iter().find(|sl| sl.name == input.slot) else {
                    ok = false;
                    let names: Vec<_> = slots.iter().map(|sl| sl.name).collect();
                    let mut err = ManifestError::new(
                        "manifest::unknown-input",
                        format!("kind `{}` has no input `{}`", s.kind.kind(), input.slot),
                    )
                    .at(input.slot_span.clone(), "unknown input");
                    err = match did_you_mean(&input.slot, names.iter().copied()) {
                        Some(m) => err.help(format!("did you mean `{m}`?")),
                        None if names.is_empty() => {
                            err.help(format!("`{}` takes no inputs", s.kind.kind()))
                        }
                        None => err.help(format!(
                            "inputs of `{}`: {}",
                            s.kind.kind(),
                            names.join(", ")
                        )),
                    };
                    self.err(err);
                    continue;
                };
                if !slot.many && refs.len() > 1 {
                    ok = false;
                    self.err(
                        ManifestError::new(
                            "manifest::input-arity",
                            format!(
                                "input `{}` of kind `{}` takes one artifact, but {} are listed",
                                slot.name,
                                s.kind.kind(),
                                refs.len()
                            ),
                        )
                        .at(input.slot_span.clone(), "one artifact expected"),
                    );
                    continue;
                }
                let mut list = Vec::new();
                for (r, span) in refs {
                    let (stage_part, output) = split_ref(r);
                    let producers: Vec<String> = if stage_part.contains('@') {
                        let base = stage_part.split('@').next().unwrap_or_default();
                        let exists = variants
                            .get(base)
                            .is_some_and(|v| v.iter().any(|(_, n)| n == stage_part));
                        if !exists {
                            ok = false;
                            let names: Vec<&str> = variants
                                .get(base)
                                .map(|v| v.iter().map(|(_, n)| n.as_str()).collect())
                                .unwrap_or_default();
                            let mut err = ManifestError::new(
                                "manifest::missing-stage",
                                format!("there is no stage instance `{stage_part}`"),
                            )
                            .at(span.clone(), "unknown variant");
                            if !names.is_empty() {
                                err =
                                    err.help(format!("`{base}` expands to: {}", names.join(", ")));
                            }
                            self.err(err);
                            continue;
                        }
                        vec![stage_part.to_string()]
                    } else {
                        let Some(vs) = variants.get(stage_part) else {
                            ok = false;
                            continue;
                        };
                        let matching: Vec<String> = vs
                            .iter()
                            .filter(|(a, _)| {
                                if slot.many {
                                    compatible(&combo, a)
                                } else {
                                    subset(a, &combo)
                                }
                            })
                            .map(|(_, n)| n.clone())
                            .collect();
                        if matching.is_empty() {
                            ok = false;
                            continue;
                        }
                        matching
                    };
                    for producer in producers {
                        list.push((producer, output.map(str::to_string), span.clone()));
                    }
                }
                let mut refs_out = Vec::new();
                for (producer, output, span) in list {
                    match self.check_connection(s, slot, &producer, output.as_deref(), span) {
                        Some(out) => refs_out.push(InputRef {
                            stage: producer,
                            output: out,
                        }),
                        None => ok = false,
                    }
                }
                inputs.insert(slot.name.to_string(), refs_out);
            }
            for slot in slots.iter().filter(|sl| sl.required) {
                if !inputs.contains_key(slot.name) && !s.inputs.iter().any(|i| i.slot == slot.name)
                {
                    ok = false;
                    self.err(
                        ManifestError::new(
                            "manifest::missing-input",
                            format!(
                                "stage `{}` (kind `{}`) needs input `{}`: {}",
                                s.name,
                                s.kind.kind(),
                                slot.name,
                                slot.doc
                            ),
                        )
                        .at(s.span.clone(), "missing input")
                        .help(format!(
                            "add `inputs = {{ {} = \"<stage>\" }}` (accepts: {})",
                            slot.name,
                            slot.accepts.join(", ")
                        )),
                    );
                }
            }
            made.push((combo, ok.then_some(inputs)));
        }
    }

    /// Checks output name and artifact type; returns the output name used.
    fn check_connection(
        &mut self,
        s: &RawStage<'_>,
        slot: &crate::stage::InputSlot,
        producer: &str,
        output: Option<&str>,
        span: Range<usize>,
    ) -> Option<String> {
        let base = producer.split('@').next().unwrap_or_default();
        let kind = self.producer_kinds.get(base).cloned()?;
        let outputs = kind.outputs();
        let out = match output {
            None => outputs.first()?,
            Some(name) => match outputs.iter().find(|o| o.name == name) {
                Some(o) => o,
                None => {
                    let names: Vec<_> = outputs.iter().map(|o| o.name).collect();
                    self.err(
                        ManifestError::new(
                            "manifest::unknown-output",
                            format!(
                                "stage `{base}` (kind `{}`) has no output `{name}`",
                                kind.kind()
                            ),
                        )
                        .at(span, "unknown output")
                        .help(format!(
                            "outputs of `{}`: {}",
                            kind.kind(),
                            names.join(", ")
                        )),
                    );
                    return None;
                }
            },
        };
        if !slot.accepts.contains(&out.artifact) {
            self.err(
                ManifestError::new(
                    "manifest::artifact-type",
                    format!(
                        "input `{}` of `{}` expects {}, but `{producer}.{}` is a `{}` artifact",
                        slot.name,
                        s.name,
                        slot.accepts.join(" or "),
                        out.name,
                        out.artifact
                    ),
                )
                .at(span, format!("a `{}` artifact", out.artifact))
                .help(format!(
                    "connect a stage whose output is {}",
                    slot.accepts.join(" or ")
                )),
            );
            return None;
        }
        Some(out.name.to_string())
    }

    fn instance_params(
        &mut self,
        s: &RawStage<'_>,
        name: &str,
        combo: &[(String, String)],
        overrides: &[Override<'_>],
    ) -> Option<ParsedParams> {
        let mut table = s.params.clone();
        let mut ok = true;
        substitute_table(table.get_mut(), combo, &mut |key, span| {
            ok = false;
            self.errors.push(
                ManifestError::new(
                    "manifest::matrix",
                    format!("`${{{key}}}` is not a matrix key of stage `{}`", s.name),
                )
                .at(span, "unknown matrix key")
                .help("declare it with `matrix.KEY = [...]` in this stage"),
            );
        });
        let mut applied = Vec::new();
        for o in overrides
            .iter()
            .filter(|o| o.stage == s.name || o.stage == name)
        {
            let value = respan(o.value.clone(), s.span.clone());
            if set_path(table.get_mut(), &o.path, value, s.span.clone()) {
                applied.push(o.raw.as_str());
            } else {
                ok = false;
                self.err(
                    ManifestError::new(
                        "manifest::override",
                        format!("--set {}: `{}` is not a table", o.raw, o.path[0]),
                    )
                    .at(s.span.clone(), "this stage"),
                );
            }
        }
        if !ok {
            return None;
        }
        match s.kind.parse(table) {
            Ok(p) => Some(p),
            Err(ParamError::Deserialize { message, span }) => {
                let from_override =
                    span.as_ref().is_none_or(|sp| *sp == s.span) && !applied.is_empty();
                let mut err = ManifestError::new(
                    "manifest::param",
                    format!(
                        "invalid parameters for stage `{}` (kind `{}`): {}",
                        s.name,
                        s.kind.kind(),
                        message.trim()
                    ),
                )
                .at(span.unwrap_or_else(|| s.span.clone()), "here");
                err = if from_override {
                    err.help(format!(
                        "the value came from {}",
                        applied
                            .iter()
                            .map(|a| format!("--set {a}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                } else {
                    err.help(format!(
                        "see the parameters of `{}` with `pipeline kinds`",
                        s.kind.kind()
                    ))
                };
                self.err(err);
                None
            }
            Err(ParamError::Invalid(message)) => {
                self.err(
                    ManifestError::new(
                        "manifest::param",
                        format!(
                            "invalid parameters for stage `{}` (kind `{}`): {message}",
                            s.name,
                            s.kind.kind()
                        ),
                    )
                    .at(s.span.clone(), "this stage"),
                );
                None
            }
        }
    }
}

/// `stage`, `stage.output`, `stage@variant.output` -> (stage part, output).
fn split_ref(r: &str) -> (&str, Option<&str>) {
    match r.split_once('.') {
        Some((s, o)) => (s, Some(o)),
        None => (r, None),
    }
}

fn instance_name(base: &str, combo: &[(String, String)]) -> String {
    if combo.is_empty() {
        base.to_string()
    } else {
        format!(
            "{base}@{}",
            combo
                .iter()
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

fn cartesian(matrix: &[(String, Vec<String>)], key_order: &[String]) -> Vec<Vec<(String, String)>> {
    let mut combos = vec![Vec::new()];
    for (key, values) in matrix {
        let mut next = Vec::new();
        for c in &combos {
            for v in values {
                let mut c2: Vec<(String, String)> = c.clone();
                c2.push((key.clone(), v.clone()));
                next.push(c2);
            }
        }
        combos = next;
    }
    for c in &mut combos {
        c.sort_by_key(|(k, _)| key_order.iter().position(|o| o == k));
    }
    combos
}

fn compatible(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.iter()
        .all(|(k, v)| b.iter().all(|(k2, v2)| k != k2 || v == v2))
}

fn subset(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.iter().all(|kv| b.contains(kv))
}

fn merge(
    a: &[(String, String)],
    b: &[(String, String)],
    key_order: &[String],
) -> Vec<(String, String)> {
    let mut out = a.to_vec();
    for kv in b {
        if !out.iter().any(|(k, _)| *k == kv.0) {
            out.push(kv.clone());
        }
    }
    out.sort_by_key(|(k, _)| key_order.iter().position(|o| o == k));
    out
}

/// Replaces `${key}` with the combo's value; `Err(key)` for an unknown key.
fn substitute(text: &str, combo: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let key = &after[..end];
        match combo.iter().find(|(k, _)| k == key) {
            Some((_, v)) => out.push_str(v),
            None => return Err(key.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every resolution of `text` over the stage's own matrix (for dependency discovery).
fn substitute_all(text: &str, matrix: &[(String, Vec<String>)]) -> Vec<String> {
    let combos = cartesian(matrix, &[]);
    let mut out: Vec<String> = combos
        .iter()
        .filter_map(|c| substitute(text, c).ok())
        .collect();
    out.dedup();
    if out.is_empty() {
        out.push(text.to_string());
    }
    out
}

fn substitute_table(
    table: &mut DeTable<'_>,
    combo: &[(String, String)],
    on_error: &mut dyn FnMut(String, Range<usize>),
) {
    for (_, value) in table.iter_mut() {
        substitute_value(value, combo, on_error);
    }
}

fn substitute_value(
    value: &mut Spanned<DeValue<'_>>,
    combo: &[(String, String)],
    on_error: &mut dyn FnMut(String, Range<usize>),
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) if s.contains("${") => match substitute(s, combo) {
            Ok(new) => *s = std::borrow::Cow::Owned(new),
            Err(key) => on_error(key, span),
        },
        DeValue::Array(items) => {
            for item in items.iter_mut() {
                substitute_value(item, combo, on_error);
            }
        }
        DeValue::Table(t) => substitute_table(t, combo, on_error),
        _ => {}
    }
}

/// Gives a value (and everything in it) the span `span`, so that errors about an overridden
/// value point at the stage rather than into the `--set` text.
fn respan<'i>(value: Spanned<DeValue<'i>>, span: Range<usize>) -> Spanned<DeValue<'i>> {
    let inner = match value.into_inner() {
        DeValue::Array(mut items) => {
            for item in items.iter_mut() {
                let taken = std::mem::replace(item, Spanned::new(0..0, DeValue::Boolean(false)));
                *item = respan(taken, span.clone());
            }
            DeValue::Array(items)
        }
        DeValue::Table(t) => {
            let mut out = DeTable::new();
            for (k, v) in t.into_iter() {
                out.insert(
                    Spanned::new(span.clone(), k.into_inner()),
                    respan(v, span.clone()),
                );
            }
            DeValue::Table(out)
        }
        other => other,
    };
    Spanned::new(span, inner)
}

fn set_path<'i>(
    table: &mut DeTable<'i>,
    path: &[String],
    value: Spanned<DeValue<'i>>,
    span: Range<usize>,
) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        table.insert(
            Spanned::new(span, std::borrow::Cow::Owned(first.clone())),
            value,
        );
        return true;
    }
    if table.get(first.as_str()).is_none() {
        table.insert(
            Spanned::new(span.clone(), std::borrow::Cow::Owned(first.clone())),
            Spanned::new(span.clone(), DeValue::Table(DeTable::new())),
        );
    }
    match table.get_mut(first.as_str()).map(|v| v.get_mut()) {
        Some(DeValue::Table(inner)) => set_path(inner, rest, value, span),
        _ => false,
    }
}
