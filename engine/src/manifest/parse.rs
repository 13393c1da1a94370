//! Phase 1, parse: TOML text into the `[experiment]` table, raw stage tables and `--set`
//! overrides (matrix overrides are applied here, to the raw tables, so expansion sees the
//! replaced values).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::{did_you_mean, ManifestError};
use super::matrix::MatrixFields;
use super::names::{valid_name, Selector};
use super::{Experiment, ManifestOptions};
use crate::slurm::{Launch, SlurmOptions};
use crate::stage::{DynStage, Registry};

/// Keys of a stage table that are not parameters of its kind.
const RESERVED: [&str; 5] = ["kind", "inputs", "matrix", "launch", "slurm"];

/// A manifest after parsing: what expansion starts from.
pub(super) struct Document<'s> {
    /// The `[experiment]` table, if it is valid.
    pub experiment: Option<Experiment>,
    /// Stage tables that parsed, in manifest order.
    pub stages: Vec<RawStage<'s>>,
    /// `--set STAGE.PARAM=VALUE` overrides (matrix overrides are already applied).
    pub overrides: Vec<Override<'s>>,
    /// Tables that failed to parse: references to them are not reported again.
    pub broken: BTreeSet<String>,
}

/// One `inputs` entry of a stage table, references not yet substituted.
pub(super) struct RawInput {
    /// Slot name.
    pub slot: String,
    /// Where the slot name is.
    pub slot_span: Range<usize>,
    /// References as written (they may contain `${key}`), with their places.
    pub refs: Vec<(String, Range<usize>)>,
}

/// A stage table before matrix expansion.
pub(super) struct RawStage<'s> {
    /// Table name.
    pub name: String,
    /// Where the table name is.
    pub span: Range<usize>,
    /// Its kind.
    pub kind: Arc<dyn DynStage>,
    /// Its `inputs`.
    pub inputs: Vec<RawInput>,
    /// Its matrix: keys in declaration order, each with its values.
    pub matrix: Vec<(String, Vec<String>)>,
    /// The fields of its table-valued matrix values (`matrix.data = [{name = "a", x = "1"}]`).
    pub matrix_fields: MatrixFields,
    /// Where it runs under a cluster executor, if the table says (`launch`).
    pub launch: Option<Launch>,
    /// Its cluster resources (`[STAGE.slurm]`).
    pub slurm: SlurmOptions,
    /// Everything else: the kind's parameters.
    pub params: Spanned<DeTable<'s>>,
}

/// One `--set STAGE.PARAM=VALUE`.
pub(super) struct Override<'s> {
    /// The table or instance it applies to.
    pub target: Selector,
    /// The parameter path (`["opt", "lr"]` for `opt.lr`).
    pub path: Vec<String>,
    /// The value (TOML, or a bare word as a string).
    pub value: Spanned<DeValue<'s>>,
    /// The override as given, for messages.
    pub raw: &'s str,
}

/// The byte range of the line that nests deepest: dots of a dotted key (outside quotes) plus
/// open brackets and braces, counted from the line's start (a rough measure, enough to point
/// at the line that hit the parser's limit).
fn deepest_line(source: &str) -> Range<usize> {
    let mut best = (0, 0..0);
    let mut start = 0;
    for line in source.split_inclusive('\n') {
        let (mut depth, mut deepest, mut quote) = (0usize, 0usize, None);
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '.' | '[' | '{') => depth += 1,
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            deepest = deepest.max(depth);
        }
        let end = start + line.trim_end().len();
        if deepest > best.0 {
            best = (deepest, start..end);
        }
        start += line.len();
    }
    best.1
}

/// Parses the manifest text and the overrides; `None` if the TOML itself is invalid.
pub(super) fn parse_document<'s>(
    source: &'s str,
    registry: &Registry,
    options: &'s ManifestOptions,
    errors: &mut Vec<ManifestError>,
) -> Option<Document<'s>> {
    let (root, syntax) = DeTable::parse_recoverable(source);
    if !syntax.is_empty() {
        for e in syntax {
            let mut err = ManifestError::new(
                "manifest::syntax",
                format!("TOML syntax error: {}", e.message().trim()),
            );
            match e.span() {
                Some(span) => err = err.at(span, "here"),
                // The parser's nesting limit comes without a place: name the deepest line.
                None if e.message().contains("recursion") => {
                    err = err
                        .at(deepest_line(source), "nested too deeply")
                        .help("flatten this key or value: TOML parsers stop at a few dozen levels");
                    errors.push(err);
                    continue;
                }
                None => {}
            }
            errors.push(err.help("fix the TOML syntax; see https://toml.io"));
        }
        return None;
    }
    let root = root.into_inner();
    let overrides = parse_overrides(options, errors);

    let mut experiment = None;
    let mut stages = Vec::new();
    let mut broken = BTreeSet::new();
    for (key, value) in root.iter() {
        let name = key.get_ref().to_string();
        let span = key.span();
        if name == "experiment" {
            experiment = parse_experiment(value, span, errors);
            continue;
        }
        match parse_stage(&name, span, value, registry, errors) {
            Some(raw) => stages.push(raw),
            None => {
                broken.insert(name);
            }
        }
    }
    if experiment.is_none() && !errors.iter().any(|e| e.code == "manifest::experiment") {
        errors.push(
            ManifestError::new(
                "manifest::experiment",
                "the manifest has no [experiment] table",
            )
            .at(0..0, "expected near the top")
            .help("add `[experiment]` with at least `name = \"...\"`"),
        );
    }
    check_override_targets(&overrides, &stages, &broken, errors);
    let (matrix_overrides, overrides): (Vec<_>, Vec<_>) =
        overrides.into_iter().partition(|o| o.path[0] == "matrix");
    for o in &matrix_overrides {
        apply_matrix_override(o, &mut stages, errors);
    }
    Some(Document {
        experiment,
        stages,
        overrides,
        broken,
    })
}

fn parse_overrides<'s>(
    options: &'s ManifestOptions,
    errors: &mut Vec<ManifestError>,
) -> Vec<Override<'s>> {
    let mut out = Vec::new();
    for raw in &options.overrides {
        let Some((lhs, rhs)) = raw.split_once('=') else {
            errors.push(ManifestError::new(
                "manifest::override",
                format!("--set {raw}: expected STAGE.PARAM=VALUE"),
            ));
            continue;
        };
        let Some((stage, path)) = lhs.trim().split_once('.') else {
            errors.push(ManifestError::new(
                "manifest::override",
                format!("--set {raw}: expected STAGE.PARAM=VALUE (no `.` in `{lhs}`)"),
            ));
            continue;
        };
        let path: Vec<String> = path.split('.').map(|p| p.trim().to_string()).collect();
        if path[0] == "matrix" && path.len() != 2 {
            errors.push(
                ManifestError::new(
                    "manifest::override",
                    format!("--set {raw}: a matrix override names one key"),
                )
                .help(
                    "write `--set STAGE.matrix.KEY=[values]`, e.g. `--set train.matrix.seed=[1]`",
                ),
            );
            continue;
        }
        if path[0] != "matrix" && RESERVED.contains(&path[0].as_str()) {
            errors.push(ManifestError::new(
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
            target: Selector::parse(stage.trim()),
            path,
            value: Spanned::new(0..0, value),
            raw,
        });
    }
    out
}

/// Every override must name an existing table (a broken one has been reported already).
fn check_override_targets(
    overrides: &[Override<'_>],
    stages: &[RawStage<'_>],
    broken: &BTreeSet<String>,
    errors: &mut Vec<ManifestError>,
) {
    for o in overrides {
        let base = &o.target.base;
        if !stages.iter().any(|s| s.name == *base) && !broken.contains(base) {
            let mut err = ManifestError::new(
                "manifest::override",
                format!("--set {}: there is no stage `{}`", o.raw, o.target),
            );
            if let Some(m) = did_you_mean(
                &o.target.to_string(),
                stages.iter().map(|s| s.name.as_str()),
            ) {
                err = err.help(format!("did you mean `{m}`?"));
            }
            errors.push(err);
        }
    }
}

fn parse_experiment(
    value: &Spanned<DeValue<'_>>,
    key_span: Range<usize>,
    errors: &mut Vec<ManifestError>,
) -> Option<Experiment> {
    let DeValue::Table(table) = value.get_ref() else {
        errors.push(
            ManifestError::new("manifest::experiment", "`experiment` must be a table")
                .at(key_span, "not a table"),
        );
        return None;
    };
    use serde::de::IntoDeserializer;
    match Experiment::deserialize(Spanned::new(value.span(), table.clone()).into_deserializer()) {
        // The name names files in the cache's index: it must be one path component.
        Ok(e) if !valid_experiment_name(&e.name) => {
            let span = table.get("name").map_or(key_span, |v| v.span());
            errors.push(
                ManifestError::new(
                    "manifest::experiment",
                    format!("invalid experiment name `{}`", e.name),
                )
                .at(span, "not usable as a name")
                .help("use letters, digits, `_`, `-` and `.` (not `.` or `..` alone, no `/`)"),
            );
            None
        }
        Ok(e) => match e.slurm.validate_experiment() {
            Ok(()) => Some(e),
            Err(problem) => {
                let span = table.get("slurm").map_or(key_span, |v| v.span());
                errors.push(
                    ManifestError::new("manifest::slurm", format!("[experiment.slurm]: {problem}"))
                        .at(span, "here"),
                );
                None
            }
        },
        Err(e) => {
            let span = e.span().unwrap_or(key_span);
            errors.push(
                ManifestError::new(
                    "manifest::experiment",
                    format!("invalid [experiment]: {}", e.message().trim()),
                )
                .at(span, "here")
                .help("[experiment] takes name (required), seed, cache, description, executor and a [experiment.slurm] table"),
            );
            None
        }
    }
}

/// Whether `name` is one harmless path component.
fn valid_experiment_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn parse_stage<'s>(
    name: &str,
    span: Range<usize>,
    value: &Spanned<DeValue<'s>>,
    registry: &Registry,
    errors: &mut Vec<ManifestError>,
) -> Option<RawStage<'s>> {
    let DeValue::Table(table) = value.get_ref() else {
        errors.push(
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
    if !valid_name(name) {
        errors.push(
            ManifestError::new("manifest::stage-name", format!("invalid stage name `{name}`"))
                .at(span.clone(), "invalid name")
                .help("stage names use letters, digits, `_` and `-` (`@` and `.` are reserved for variants and outputs)"),
        );
    }
    let mut params = table.clone();
    for r in RESERVED {
        params.remove(r);
    }
    let kind = parse_kind(name, &span, table, registry, errors);
    let inputs = parse_inputs(name, table, errors);
    let matrix = parse_matrix(name, table, errors);
    let launch = parse_reserved_table::<Option<Launch>>(name, table, "launch", errors);
    let slurm = parse_reserved_table::<SlurmOptions>(name, table, "slurm", errors).and_then(|o| {
        match o.validate_stage() {
            Ok(()) => Some(o),
            Err(e) => {
                let span = table.get("slurm").map_or(span.clone(), |v| v.span());
                errors.push(
                    ManifestError::new("manifest::slurm", format!("[{name}.slurm]: {e}"))
                        .at(span, "here"),
                );
                None
            }
        }
    });
    Some(RawStage {
        name: name.to_string(),
        span,
        kind: kind?,
        inputs: inputs?,
        matrix: matrix.as_ref()?.0.clone(),
        matrix_fields: matrix?.1,
        launch: launch?,
        slurm: slurm?,
        params: Spanned::new(value.span(), params),
    })
}

/// A reserved key read into `T` (its default when absent), or `None` after reporting why not.
fn parse_reserved_table<T: Default + for<'de> Deserialize<'de>>(
    stage: &str,
    table: &DeTable<'_>,
    key: &str,
    errors: &mut Vec<ManifestError>,
) -> Option<T> {
    use serde::de::IntoDeserializer;
    let Some(value) = table.get(key) else {
        return Some(T::default());
    };
    match T::deserialize(value.clone().into_deserializer()) {
        Ok(v) => Some(v),
        Err(e) => {
            let help = match key {
                "launch" => "write `launch = \"local\"` (on the coordinator) or `launch = \"slurm\"` (as a job)",
                _ => "[STAGE.slurm] takes partition, time, cpus, mem, gres, gpus, account, qos and sbatch (a list of raw options)",
            };
            errors.push(
                ManifestError::new(
                    "manifest::slurm",
                    format!("`{key}` of `{stage}`: {}", e.message().trim()),
                )
                .at(e.span().unwrap_or(value.span()), "here")
                .help(help),
            );
            None
        }
    }
}

fn parse_kind(
    name: &str,
    span: &Range<usize>,
    table: &DeTable<'_>,
    registry: &Registry,
    errors: &mut Vec<ManifestError>,
) -> Option<Arc<dyn DynStage>> {
    let known = || registry.kind_names().collect::<Vec<_>>().join(", ");
    match table.get("kind").map(|k| (k.get_ref(), k.span())) {
        None => {
            errors.push(
                ManifestError::new(
                    "manifest::missing-kind",
                    format!("stage `{name}` has no `kind`"),
                )
                .at(span.clone(), "this stage")
                .help(format!("add `kind = \"...\"`; known kinds: {}", known())),
            );
            None
        }
        Some((DeValue::String(k), kspan)) => match registry.get(k) {
            Some(kind) => Some(kind.clone()),
            None => {
                let help = match did_you_mean(k, registry.kind_names()) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("known kinds: {}", known()),
                };
                errors.push(
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
            errors.push(
                ManifestError::new(
                    "manifest::kind-type",
                    format!("`kind` must be a string, found {}", value_type(other)),
                )
                .at(kspan, "expected a string"),
            );
            None
        }
    }
}

fn parse_inputs(
    stage: &str,
    table: &DeTable<'_>,
    errors: &mut Vec<ManifestError>,
) -> Option<Vec<RawInput>> {
    let Some(inputs) = table.get("inputs") else {
        return Some(Vec::new());
    };
    let DeValue::Table(inputs) = inputs.get_ref() else {
        errors.push(
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
                            errors.push(
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
                errors.push(
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

/// A stage's matrix: keys with their values, and the fields of table-valued values.
type ParsedMatrix = (Vec<(String, Vec<String>)>, MatrixFields);

fn parse_matrix(
    stage: &str,
    table: &DeTable<'_>,
    errors: &mut Vec<ManifestError>,
) -> Option<ParsedMatrix> {
    let Some(matrix) = table.get("matrix") else {
        return Some((Vec::new(), Vec::new()));
    };
    let matrix_span = matrix.span();
    let DeValue::Table(matrix) = matrix.get_ref() else {
        errors.push(
            ManifestError::new(
                "manifest::matrix",
                format!("`matrix` of `{stage}` must be a table"),
            )
            .at(matrix.span(), "expected `matrix.key = [values]`"),
        );
        return None;
    };
    let mut out = Vec::new();
    let mut fields = Vec::new();
    for (key, values) in matrix.iter() {
        if !valid_name(key.get_ref()) {
            errors.push(
                ManifestError::new(
                    "manifest::matrix",
                    format!("matrix key `{}` is not a plain name", key.get_ref()),
                )
                .at(key.span(), "here")
                .help("use letters, digits, `_` and `-` (a `.` reaches a table value's field: `${key.field}`)"),
            );
            return None;
        }
        let DeValue::Array(items) = values.get_ref() else {
            errors.push(
                ManifestError::new(
                    "manifest::matrix",
                    format!("matrix `{}` must be an array", key.get_ref()),
                )
                .at(values.span(), "expected an array of values"),
            );
            return None;
        };
        match table_values(key.get_ref(), items) {
            Ok(None) => {}
            Ok(Some(tables)) => {
                fields.extend(tables);
            }
            Err((message, span)) => {
                errors.push(
                    ManifestError::new("manifest::matrix", message)
                        .at(span, "here")
                        .help("every value of a key is a table with a `name` (used in stage names) and the same other fields, e.g. `matrix.data = [{name = \"a\", records = \"x\"}, {name = \"b\", records = \"y\"}]`"),
                );
                return None;
            }
        }
        let vals = match matrix_values(items.iter()) {
            Ok(vals) => vals,
            Err(bad) => {
                let err = match bad {
                    BadValues::Value { message, span } => {
                        ManifestError::new("manifest::matrix", message)
                            .at(span, "unsupported value")
                    }
                    BadValues::Duplicate { value, span } => ManifestError::new(
                        "manifest::matrix",
                        format!("matrix value `{value}` is listed twice"),
                    )
                    .at(span, "duplicate"),
                    BadValues::Empty => ManifestError::new(
                        "manifest::matrix",
                        format!("matrix `{}` is empty", key.get_ref()),
                    )
                    .at(values.span(), "no values"),
                };
                errors.push(err);
                return None;
            }
        };
        out.push((key.get_ref().to_string(), vals));
    }
    // Checked before expansion: a product of a few keys can exhaust memory.
    let count = out
        .iter()
        .try_fold(1usize, |n, (_, values)| n.checked_mul(values.len()));
    match count {
        Some(n) if n <= MAX_INSTANCES => Some((out, fields)),
        _ => {
            let count = count.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
            errors.push(
                ManifestError::new(
                    "manifest::too-many-instances",
                    format!(
                        "the matrix of `{stage}` expands into {count} instances; a manifest may \
                         have at most {MAX_INSTANCES}"
                    ),
                )
                .at(matrix_span, "this matrix")
                .help("split the experiment into several manifests, or use fewer values"),
            );
            None
        }
    }
}

/// The most stage instances a manifest may expand into: far beyond any real experiment, far
/// below what exhausts memory while planning.
pub(super) const MAX_INSTANCES: usize = 10_000;

/// `--set STAGE.matrix.KEY=[values]`: replaces the values of one existing matrix key, so a
/// run can take a cut of an experiment (fewer seeds, one benchmark) without editing it.
fn apply_matrix_override(
    o: &Override<'_>,
    stages: &mut [RawStage<'_>],
    errors: &mut Vec<ManifestError>,
) {
    let key = &o.path[1];
    let fail = |message: String| ManifestError::new("manifest::override", message);
    if o.target.variant.is_some() {
        errors.push(
            fail(format!(
                "--set {}: a matrix belongs to a stage's base name",
                o.raw
            ))
            .help(format!(
                "write `--set {}.matrix.{key}=[...]`",
                o.target.base
            )),
        );
        return;
    }
    // A missing stage is reported with every other override's target.
    let Some(stage) = stages.iter_mut().find(|s| s.name == o.target.base) else {
        return;
    };
    let Some(slot) = stage.matrix.iter_mut().find(|(k, _)| k == key) else {
        let keys: Vec<&str> = stage.matrix.iter().map(|(k, _)| k.as_str()).collect();
        let help = if keys.is_empty() {
            format!(
                "`{}` has no matrix; a matrix override replaces existing values only",
                o.target
            )
        } else {
            format!("its matrix keys: {}", keys.join(", "))
        };
        errors.push(
            fail(format!(
                "--set {}: stage `{}` has no matrix key `{key}`",
                o.raw, o.target
            ))
            .help(help),
        );
        return;
    };
    let DeValue::Array(items) = o.value.get_ref() else {
        errors.push(
            fail(format!("--set {}: matrix values must be an array", o.raw))
                .help(format!("write `--set {}.matrix.{key}=[...]`", o.target)),
        );
        return;
    };
    let problem = match matrix_values(items.iter()) {
        Ok(values) => {
            let declared: Vec<&str> = stage
                .matrix_fields
                .iter()
                .filter(|(k, _, _)| k == key)
                .map(|(_, v, _)| v.as_str())
                .collect();
            let undeclared: Vec<&String> = values
                .iter()
                .filter(|v| !declared.is_empty() && !declared.contains(&v.as_str()))
                .collect();
            if undeclared.is_empty() {
                slot.1 = values;
                return;
            }
            format!(
                "{} not among the tables of matrix `{key}` ({}); an override picks from them by name",
                undeclared
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                declared.join(", ")
            )
        }
        Err(BadValues::Value { message, .. }) => message,
        Err(BadValues::Duplicate { value, .. }) => {
            format!("matrix value `{value}` is listed twice")
        }
        Err(BadValues::Empty) => "the matrix cannot be empty".to_string(),
    };
    errors.push(fail(format!("--set {}: {problem}", o.raw)));
}

/// Why a list of matrix values is not a valid matrix key's values.
enum BadValues {
    /// A value cannot be part of an instance name.
    Value { message: String, span: Range<usize> },
    /// A value is listed twice.
    Duplicate { value: String, span: Range<usize> },
    /// There are none.
    Empty,
}

/// The values of one matrix key (as written in the manifest or in `--set`): each usable in an
/// instance name, none twice, at least one.
fn matrix_values<'a, 's: 'a>(
    items: impl Iterator<Item = &'a Spanned<DeValue<'s>>>,
) -> Result<Vec<String>, BadValues> {
    let mut values = Vec::new();
    for item in items {
        let value = matrix_value(item.get_ref()).map_err(|message| BadValues::Value {
            message,
            span: item.span(),
        })?;
        if values.contains(&value) {
            return Err(BadValues::Duplicate {
                value,
                span: item.span(),
            });
        }
        values.push(value);
    }
    if values.is_empty() {
        return Err(BadValues::Empty);
    }
    Ok(values)
}

/// The fields of a key whose values are tables (`None` when they are plain values), or why
/// they are not usable: each needs a `name`, the same other fields, and scalar field values.
fn table_values(
    key: &str,
    items: &[Spanned<DeValue<'_>>],
) -> Result<Option<MatrixFields>, (String, Range<usize>)> {
    let tables = items.iter().filter(|i| i.get_ref().is_table()).count();
    if tables == 0 {
        return Ok(None);
    }
    let mut out: MatrixFields = Vec::new();
    let mut first_fields: Option<Vec<String>> = None;
    for item in items {
        let DeValue::Table(t) = item.get_ref() else {
            return Err((
                format!("matrix `{key}` mixes tables and plain values"),
                item.span(),
            ));
        };
        let Some(name) = t.get("name") else {
            return Err((
                format!("a table value of matrix `{key}` has no `name`"),
                item.span(),
            ));
        };
        let name = matrix_value(name.get_ref()).map_err(|m| (m, name.span()))?;
        let mut fs = Vec::new();
        for (field, value) in t.iter() {
            let field = field.get_ref().to_string();
            if field == "name" {
                continue;
            }
            let text = match value.get_ref() {
                DeValue::String(s) => s.to_string(),
                DeValue::Integer(i) => i.as_str().to_string(),
                DeValue::Float(f) => f.as_str().to_string(),
                DeValue::Boolean(b) => b.to_string(),
                other => {
                    return Err((
                        format!(
                            "field `{field}` of matrix value `{name}` must be a string, number or boolean, found {}",
                            value_type(other)
                        ),
                        value.span(),
                    ))
                }
            };
            fs.push((field, text));
        }
        let names: Vec<String> = fs.iter().map(|(f, _)| f.clone()).collect();
        match &first_fields {
            None => first_fields = Some(names),
            Some(first) if *first != names => {
                return Err((
                    format!(
                        "matrix value `{name}` of `{key}` has fields {names:?}, the first has {first:?}"
                    ),
                    item.span(),
                ))
            }
            Some(_) => {}
        }
        out.push((key.to_string(), name, fs));
    }
    Ok(Some(out))
}

/// A matrix value as it appears in stage names, or why it cannot be one.
fn matrix_value(value: &DeValue<'_>) -> Result<String, String> {
    let v = match value {
        // A table value is named by its `name` (its other fields are reached as `${key.field}`).
        DeValue::Table(t) => {
            return match t.get("name") {
                Some(name) => matrix_value(name.get_ref()),
                None => Err("a table matrix value needs a `name`".into()),
            }
        }
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
    if !valid_name(&v) {
        return Err(format!(
            "matrix value `{v}` cannot be part of a stage name (use letters, digits, `_` and `-`)"
        ));
    }
    Ok(v)
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
