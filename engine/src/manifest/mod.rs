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
//! `inputs` (slot = "stage" or "stage.output", or an array for fan-in slots), `matrix`, and for
//! cluster runs `launch` and `slurm` (see [`crate::slurm`]); all other keys are the kind's
//! parameters, deserialised into its typed struct. Every problem found
//! is reported at once, as a diagnostic pointing into the manifest.
//!
//! Reading a manifest goes through four phases, one module each: parse (TOML into raw
//! tables, `[experiment]` and `--set` overrides), expand (matrices into instances, `${key}`),
//! resolve (references into producer instances and outputs; table order and cycles through
//! [`crate::dag::Dag`]) and type-check (slots, artifact types, typed parameters). This module
//! drives them per instance, producers first. Instances are named by [`InstanceName`];
//! references are parsed once into [`StageRef`]s.

pub(crate) mod error;
mod expand;
mod matrix;
mod names;
mod parse;
mod resolve;
mod typecheck;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::NamedSource;
use serde::Deserialize;

pub use error::{ManifestError, ManifestLoadError};
pub use names::{InstanceName, Selector, StageRef};

use expand::InstanceInput;
use matrix::Assignment;
use names::Variants;
use parse::{Document, Override, RawStage};

use crate::slurm::{ExecutorKind, Launch, SlurmOptions};
use crate::stage::{DynStage, InputSlot, ParsedParams, Registry};

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
    /// Where stages run (`local` or `slurm`); `pipeline run --executor` wins.
    #[serde(default)]
    pub executor: Option<ExecutorKind>,
    /// Cluster defaults for every stage and the scheduling knobs (`[experiment.slurm]`).
    #[serde(default)]
    pub slurm: SlurmOptions,
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
    pub stage: InstanceName,
    /// Output name of the producer.
    pub output: String,
}

/// One stage after matrix expansion: what the executor runs.
pub struct StageInstance {
    /// Instance name (`train`, `train@messy`): its table and matrix assignment.
    pub name: InstanceName,
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
    /// Whether its inputs' producer names and matrix labels go into its key.
    pub uses_input_labels: bool,
    /// Where it runs under a cluster executor, as its table says (`launch`); `None` leaves it
    /// to the kind ([`crate::Stage::runs_on_coordinator`]).
    pub launch: Option<Launch>,
    /// Whether its kind prefers the coordinator (cheap, or needs the network).
    pub runs_on_coordinator: bool,
    /// Its cluster resources as its table gives them (`[STAGE.slurm]`, without the defaults).
    pub slurm: SlurmOptions,
    pub(crate) stage: Arc<dyn DynStage>,
}

impl StageInstance {
    fn new(
        name: InstanceName,
        kind: Arc<dyn DynStage>,
        params: ParsedParams,
        inputs: BTreeMap<String, Vec<InputRef>>,
    ) -> Self {
        Self {
            name,
            kind: kind.kind(),
            kind_version: kind.version(),
            needs_gpu: kind.needs_gpu(&params),
            uses_seed: kind.uses_seed(&params),
            uses_input_labels: kind.uses_input_labels(&params),
            runs_on_coordinator: kind.runs_on_coordinator(&params),
            launch: None,
            slurm: SlurmOptions::default(),
            outputs: kind.outputs().iter().map(|o| o.name).collect(),
            params,
            inputs,
            stage: kind,
        }
    }

    /// Files of this kind's outputs that `pipeline run` points the user to (a report).
    pub fn headline_files(&self) -> &'static [&'static str] {
        self.stage.headline_files()
    }

    /// The plain-text file of this kind's outputs that `pipeline run` prints at the end.
    pub fn summary_file(&self) -> Option<&'static str> {
        self.stage.summary_file()
    }

    /// The metadata keys of its kind that measure results ([`crate::Stage::headline_metrics`]).
    pub fn headline_metrics(&self) -> &'static [&'static str] {
        self.stage.headline_metrics()
    }

    /// Whether it runs as a cluster job under `executor`: the table's `launch` if given, else
    /// as a job unless its kind prefers the coordinator.
    pub fn launches_on_cluster(&self, executor: ExecutorKind) -> bool {
        executor == ExecutorKind::Slurm
            && match self.launch {
                Some(Launch::Slurm) => true,
                Some(Launch::Local) => false,
                None => !self.runs_on_coordinator,
            }
    }
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
    /// The instance called `name` (e.g. `train@messy`).
    pub fn stage(&self, name: &str) -> Option<&StageInstance> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The instance or table name closest to `name`, when `name` names none and looks like a
    /// typo of one (for "did you mean").
    pub fn closest_name(&self, name: &str) -> Option<String> {
        let mut names: Vec<String> = self.stages.iter().map(|s| s.name.to_string()).collect();
        names.extend(self.stages.iter().map(|s| s.name.base.clone()));
        names.sort();
        names.dedup();
        error::did_you_mean(name, names.iter().map(String::as_str)).map(str::to_string)
    }

    /// Instances whose name or base name is `name` (so `train` selects every `train@…`).
    pub fn select(&self, name: &str) -> Vec<&StageInstance> {
        let selector = Selector::parse(name);
        self.stages
            .iter()
            .filter(|s| selector.matches(&s.name))
            .collect()
    }
}

/// Reads, validates and expands the manifest at `path`.
pub fn load_manifest(
    path: &Path,
    registry: &Registry,
    options: &ManifestOptions,
) -> Result<Manifest, ManifestLoadError> {
    let io = |source: std::io::Error| ManifestLoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A device or FIFO would be read forever, a huge file into memory: check first.
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes of TOML",
                meta.len()
            ),
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let source = String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {}): is it a TOML manifest?",
                e.utf8_error().valid_up_to()
            ),
        ))
    })?;
    parse_manifest(path, source, registry, options)
}

/// The largest manifest read (a real one is a few kilobytes).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Validates and expands a manifest given as text (`path` is used for messages and relative
/// paths only).
pub fn parse_manifest(
    path: &Path,
    source: String,
    registry: &Registry,
    options: &ManifestOptions,
) -> Result<Manifest, ManifestLoadError> {
    let mut errors = Vec::new();
    let parsed = parse::parse_document(&source, registry, options, &mut errors).and_then(|doc| {
        let stages = build_instances(&doc, &mut errors);
        Some((doc.experiment?, stages?))
    });
    if let (Some((experiment, stages)), true) = (parsed, errors.is_empty()) {
        return Ok(Manifest {
            path: path.to_path_buf(),
            source,
            experiment,
            stages,
        });
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

/// Expands every table into instances, producers first, connecting and type-checking each.
fn build_instances(
    doc: &Document<'_>,
    errors: &mut Vec<ManifestError>,
) -> Option<Vec<StageInstance>> {
    let conflicts = matrix::conflicting_fields(&doc.stages);
    for (key, value, first, other) in &conflicts {
        let span = doc
            .stages
            .iter()
            .find(|s| s.name == *other)
            .map_or(0..0, |s| s.span.clone());
        errors.push(
            ManifestError::new(
                "manifest::matrix",
                format!(
                    "matrix value `{value}` of `{key}` has other fields in `{other}` than in `{first}`"
                ),
            )
            .at(span, "here")
            .help("a value names one variant everywhere: give it the same fields in every table"),
        );
    }
    if !conflicts.is_empty() {
        return None;
    }
    let key_order = matrix::key_order(&doc.stages);
    let Some(order) = resolve::table_order(&doc.stages, &doc.broken, errors) else {
        // The graph is broken, but parameters can still be checked, so that one pass reports
        // every problem.
        for s in &doc.stages {
            if let Some(combo) = matrix::assignments(&s.matrix, &s.matrix_fields, &key_order)
                .into_iter()
                .next()
            {
                let _ = instance_params(
                    s,
                    &InstanceName::new(&s.name, combo),
                    &doc.overrides,
                    errors,
                );
            }
        }
        return None;
    };
    let tables: HashMap<&str, &RawStage<'_>> =
        doc.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut variants = Variants::default();
    let mut instances: Vec<(usize, StageInstance)> = Vec::new();
    let mut total = 0usize;
    for table in order {
        let s = &doc.stages[table];
        let mut made = Vec::new();
        for own in matrix::assignments(&s.matrix, &s.matrix_fields, &key_order) {
            let inputs = expand::substitute_refs(s, &own, errors);
            for combo in expand::inherit(own, &inputs, s.kind.inputs(), &variants, &key_order) {
                let connected = connect(s, &combo, &inputs, &tables, &variants, errors);
                made.push((InstanceName::new(&s.name, combo), connected));
            }
        }
        total += made.len();
        if total > parse::MAX_INSTANCES {
            errors.push(
                ManifestError::new(
                    "manifest::too-many-instances",
                    format!(
                        "the manifest expands into more than {} stage instances (at `{}`, \
                         which inherits its producers' variants)",
                        parse::MAX_INSTANCES,
                        s.name
                    ),
                )
                .at(s.span.clone(), "here")
                .help("split the experiment into several manifests, or use fewer values"),
            );
            return None;
        }
        let mut names = Vec::new();
        for (name, connected) in made {
            let params = instance_params(s, &name, &doc.overrides, errors);
            if let (Some(params), Some(inputs)) = (params, connected) {
                let mut instance = StageInstance::new(name.clone(), s.kind.clone(), params, inputs);
                instance.launch = s.launch;
                instance.slurm = s.slurm.clone();
                instances.push((table, instance));
            }
            names.push(name);
        }
        variants.insert(&s.name, names);
    }
    if !errors.is_empty() {
        return None;
    }
    // Manifest order, expansions in matrix order.
    instances.sort_by_key(|(table, _)| *table);
    Some(instances.into_iter().map(|(_, s)| s).collect())
}

/// The typed parameters of instance `name` of table `s`.
fn instance_params(
    s: &RawStage<'_>,
    name: &InstanceName,
    overrides: &[Override<'_>],
    errors: &mut Vec<ManifestError>,
) -> Option<ParsedParams> {
    let (table, applied) = expand::instance_table(s, name, overrides, errors)?;
    typecheck::params(s, table, &applied, errors)
}

/// The inputs of the instance of `s` with assignment `combo`, every slot checked; `None` if
/// any connection is wrong (each problem is reported).
fn connect(
    s: &RawStage<'_>,
    combo: &Assignment,
    inputs: &[InstanceInput<'_>],
    tables: &HashMap<&str, &RawStage<'_>>,
    variants: &Variants,
    errors: &mut Vec<ManifestError>,
) -> Option<BTreeMap<String, Vec<InputRef>>> {
    let mut connected = BTreeMap::new();
    let mut ok = true;
    for input in inputs {
        let Some(slot) = typecheck::slot(s, input.raw, errors) else {
            ok = false;
            continue;
        };
        if !typecheck::arity(s, slot, input.raw, input.refs.len(), errors) {
            ok = false;
            continue;
        }
        let (refs, slot_ok) = connect_slot(s, slot, combo, &input.refs, tables, variants, errors);
        ok &= slot_ok;
        connected.insert(slot.name.to_string(), refs);
    }
    ok &= typecheck::required_inputs(s, &connected, errors);
    ok.then_some(connected)
}

/// The producers and outputs connected to one slot, and whether all of them resolved.
fn connect_slot(
    s: &RawStage<'_>,
    slot: &InputSlot,
    combo: &Assignment,
    refs: &[(StageRef, Range<usize>)],
    tables: &HashMap<&str, &RawStage<'_>>,
    variants: &Variants,
    errors: &mut Vec<ManifestError>,
) -> (Vec<InputRef>, bool) {
    let mut ok = true;
    let mut producers = Vec::new();
    for (r, span) in refs {
        match resolve::producers(r, span, slot.many, combo, variants, errors) {
            Some(names) => producers.extend(names.into_iter().map(|n| (n, r, span))),
            None => ok = false,
        }
    }
    let mut connected = Vec::new();
    for (producer, r, span) in producers {
        let Some(table) = tables.get(producer.base.as_str()) else {
            ok = false;
            continue;
        };
        let out = resolve::output(&*table.kind, &producer, r.output.as_deref(), span, errors);
        match out {
            Some(out) if typecheck::artifact_type(s, slot, &producer, out, span, errors) => {
                connected.push(InputRef {
                    stage: producer,
                    output: out.name.to_string(),
                });
            }
            _ => ok = false,
        }
    }
    (connected, ok)
}
