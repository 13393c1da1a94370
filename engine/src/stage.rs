//! The contract between the engine and a stage kind.
//!
//! A stage kind is a type implementing [`Stage`]: a name, a version that goes into every cache
//! key (bump it whenever the kind's output for the same inputs changes), a typed parameter
//! struct, declared input and output slots, and a `run` function. The engine parses and
//! validates parameters, computes keys, hands `run` a [`StageContext`] with read-only input
//! directories and empty output directories, and stores what it wrote. A stage never sees the
//! cache layout, other stages, or the schedule.

use std::any::Any;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fingerprint::Fingerprint;
use crate::progress::StageProgress;

/// An input a stage kind accepts.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct InputSlot {
    /// Name used in the manifest's `inputs` table.
    pub name: &'static str,
    /// Artifact types that may be connected (an output's [`OutputSlot::artifact`]).
    pub accepts: &'static [&'static str],
    /// Whether the manifest must connect it.
    pub required: bool,
    /// Whether it takes a list of artifacts (fan-in, e.g. a report over all variants).
    pub many: bool,
    /// One line for `pipeline` help and errors.
    pub doc: &'static str,
}

/// An output a stage kind produces: a directory of files.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct OutputSlot {
    /// Name used to reference it as `stage.output`; the first output is the default.
    pub name: &'static str,
    /// Artifact type, checked against consumers' [`InputSlot::accepts`].
    pub artifact: &'static str,
    /// One line for help and errors.
    pub doc: &'static str,
}

/// A stage kind.
///
/// Implement this for a unit type and register it with [`Registry::register`].
pub trait Stage: Send + Sync + 'static {
    /// Parameters as written in the manifest. Use `#[serde(deny_unknown_fields)]` and defaults:
    /// the canonical serialisation of the parsed struct goes into the cache key, so writing a
    /// default explicitly does not change the key. Derive `schemars::JsonSchema` too: the doc
    /// comments of its fields are what `pipeline kinds KIND` shows, and its schema lets a
    /// manifest's bad parameters be reported all at once, in words.
    type Params: DeserializeOwned + Serialize + schemars::JsonSchema + Send + Sync + 'static;

    /// Kind name used in manifests (`kind = "..."`).
    const KIND: &'static str;
    /// Implementation version; part of every key of this kind.
    const VERSION: &'static str;
    /// One line describing the kind.
    const SUMMARY: &'static str;

    /// Declared inputs.
    fn inputs() -> &'static [InputSlot];
    /// Declared outputs (at least one).
    fn outputs() -> &'static [OutputSlot];

    /// Semantic checks beyond what deserialisation does; the message is shown at the stage.
    fn validate(_params: &Self::Params) -> Result<(), String> {
        Ok(())
    }

    /// Whether this stage instance needs the GPU; such stages never run concurrently.
    fn needs_gpu(_params: &Self::Params) -> bool {
        false
    }

    /// Whether the experiment seed affects the output (then it is part of the key).
    fn uses_seed(_params: &Self::Params) -> bool {
        false
    }

    /// Whether, under a cluster executor, this stage runs on the coordinator rather than as a
    /// job: cheap stages (seconds, little memory), and stages that need the network (compute
    /// nodes often have none). A stage table's `launch` overrides it.
    fn runs_on_coordinator(_params: &Self::Params) -> bool {
        false
    }

    /// Whether the output depends on which instances produced the inputs (their base names
    /// and matrix labels, [`InputArtifact::base`] and [`InputArtifact::labels`]), e.g. a report
    /// naming its variants. Producer names are not otherwise part of the key (identical work
    /// is stored once); when this is true they are, so renaming a producer recomputes the
    /// stage instead of leaving a cached output with the old names.
    fn uses_input_labels(_params: &Self::Params) -> bool {
        false
    }

    /// Files of this kind's outputs that `pipeline run` points the user to when they exist
    /// (`report.html` of a report), by file name within an output directory.
    fn headline_files() -> &'static [&'static str] {
        &[]
    }

    /// A plain-text file of this kind's outputs that `pipeline run` prints when the run ends
    /// (a report's answer table), by file name within an output directory.
    fn summary_file() -> Option<&'static str> {
        None
    }

    /// Numeric metadata keys (set with [`StageContext::set_metadata`]) that measure the result
    /// rather than the work (`final_loss`, `mean_bits_per_byte`; a trailing `*` matches a
    /// prefix, `pass@*`): `pipeline runs` compares them across runs.
    fn headline_metrics() -> &'static [&'static str] {
        &[]
    }

    /// Parameters that tune how the work is done but not what it produces (dotted paths into
    /// the parameters, e.g. `openai.concurrency`): left out of the key, so changing them
    /// reuses the cached output, and a resumable stage's checkpoint.
    const NOT_IN_KEY: &'static [&'static str] = &[];

    /// Adds whatever else determines the output to the key: external files (hashed by the
    /// engine through its stat cache), resolved revisions, tool versions.
    fn fingerprint(_params: &Self::Params, _fp: &mut Fingerprint) -> miette::Result<()> {
        Ok(())
    }

    /// Produces the outputs. Must write only into `ctx.output_dir(..)`, `ctx.checkpoint_dir()`
    /// and temporary locations; inputs are read-only.
    fn run(params: &Self::Params, ctx: &mut StageContext) -> miette::Result<()>;
}

/// Parameters after parsing: the typed value and its canonical JSON form.
pub struct ParsedParams {
    /// Canonical JSON (object keys sorted) of the typed parameters.
    pub canonical: serde_json::Value,
    /// What of them goes into the key: `canonical` without the kind's [`Stage::NOT_IN_KEY`].
    pub keyed: serde_json::Value,
    pub(crate) value: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for ParsedParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.canonical)
    }
}

/// Removes the value at dotted `path` (`openai.concurrency`) from a JSON object, if present.
fn remove_dotted(value: &mut serde_json::Value, path: &str) {
    let mut parts = path.split('.').peekable();
    let mut at = value;
    while let Some(part) = parts.next() {
        let Some(object) = at.as_object_mut() else {
            return;
        };
        if parts.peek().is_none() {
            object.remove(part);
            return;
        }
        match object.get_mut(part) {
            Some(next) => at = next,
            None => return,
        }
    }
}

/// Object-safe view of a [`Stage`], stored in the registry.
pub(crate) trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> &'static str;
    fn summary(&self) -> &'static str;
    fn inputs(&self) -> &'static [InputSlot];
    fn outputs(&self) -> &'static [OutputSlot];
    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeTable<'_>>,
    ) -> Result<ParsedParams, ParamError>;
    fn needs_gpu(&self, params: &ParsedParams) -> bool;
    fn uses_seed(&self, params: &ParsedParams) -> bool;
    fn runs_on_coordinator(&self, params: &ParsedParams) -> bool;
    fn uses_input_labels(&self, params: &ParsedParams) -> bool;
    fn headline_files(&self) -> &'static [&'static str];
    fn summary_file(&self) -> Option<&'static str>;
    fn headline_metrics(&self) -> &'static [&'static str];
    fn params_schema(&self) -> serde_json::Value;
    fn fingerprint(&self, params: &ParsedParams, fp: &mut Fingerprint) -> miette::Result<()>;
    fn run(&self, params: &ParsedParams, ctx: &mut StageContext) -> miette::Result<()>;
}

/// Why parameters were rejected.
#[derive(Debug)]
pub(crate) enum ParamError {
    /// Deserialisation failed (unknown key, wrong type, missing field), with a span if known.
    Deserialize {
        message: String,
        span: Option<std::ops::Range<usize>>,
    },
    /// [`Stage::validate`] rejected the values.
    Invalid(String),
    /// The deserializer rejected the table and its schema names every problem.
    Problems(Vec<crate::params::ParamProblem>),
}

struct Kind<S>(PhantomData<fn() -> S>);

fn typed<S: Stage>(params: &ParsedParams) -> &S::Params {
    // The registry only ever pairs a kind with parameters it parsed itself.
    params
        .value
        .downcast_ref::<S::Params>()
        .unwrap_or_else(|| unreachable!("parameters of kind {} have a foreign type", S::KIND))
}

impl<S: Stage> DynStage for Kind<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> &'static str {
        S::VERSION
    }
    fn summary(&self) -> &'static str {
        S::SUMMARY
    }
    fn inputs(&self) -> &'static [InputSlot] {
        S::inputs()
    }
    fn outputs(&self) -> &'static [OutputSlot] {
        S::outputs()
    }
    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeTable<'_>>,
    ) -> Result<ParsedParams, ParamError> {
        use serde::de::IntoDeserializer;
        let kept = table.get_ref().clone();
        let value = <S::Params as serde::Deserialize>::deserialize(table.into_deserializer())
            .map_err(|e| {
                // Explain the rejection with every problem the schema can name, at once.
                let problems = crate::params::problems(&self.params_schema(), &kept, &[]);
                if problems.is_empty() {
                    ParamError::Deserialize {
                        message: e.message().to_string(),
                        span: e.span(),
                    }
                } else {
                    ParamError::Problems(problems)
                }
            })?;
        S::validate(&value).map_err(ParamError::Invalid)?;
        let canonical = serde_json::to_value(&value)
            .map_err(|e| ParamError::Invalid(format!("parameters cannot be serialised: {e}")))?;
        let mut keyed = canonical.clone();
        for path in S::NOT_IN_KEY {
            remove_dotted(&mut keyed, path);
        }
        Ok(ParsedParams {
            canonical,
            keyed,
            value: Box::new(value),
        })
    }
    fn needs_gpu(&self, params: &ParsedParams) -> bool {
        S::needs_gpu(typed::<S>(params))
    }
    fn uses_seed(&self, params: &ParsedParams) -> bool {
        S::uses_seed(typed::<S>(params))
    }
    fn runs_on_coordinator(&self, params: &ParsedParams) -> bool {
        S::runs_on_coordinator(typed::<S>(params))
    }
    fn uses_input_labels(&self, params: &ParsedParams) -> bool {
        S::uses_input_labels(typed::<S>(params))
    }
    fn headline_files(&self) -> &'static [&'static str] {
        S::headline_files()
    }
    fn summary_file(&self) -> Option<&'static str> {
        S::summary_file()
    }
    fn headline_metrics(&self) -> &'static [&'static str] {
        S::headline_metrics()
    }
    fn params_schema(&self) -> serde_json::Value {
        schemars::SchemaGenerator::new(schemars::generate::SchemaSettings::draft2020_12())
            .into_root_schema_for::<S::Params>()
            .to_value()
    }
    fn fingerprint(&self, params: &ParsedParams, fp: &mut Fingerprint) -> miette::Result<()> {
        S::fingerprint(typed::<S>(params), fp)
    }
    fn run(&self, params: &ParsedParams, ctx: &mut StageContext) -> miette::Result<()> {
        S::run(typed::<S>(params), ctx)
    }
}

/// A subcommand that belongs to a kind rather than to the engine (`pipeline grade`, a drop-in
/// for another tool's command line), registered with [`Registry::register_command`].
///
/// The CLI lists it in `--help` and hands it every argument after its name, unparsed: it
/// parses them itself (and prints its own `--help`). Errors it returns are printed like every
/// other error of the CLI (`--error-format` applies). A name the CLI's own commands use
/// (`run`, `help`, ...) is not offered.
pub trait Command: Send + Sync {
    /// The subcommand's name (`grade`).
    fn name(&self) -> &'static str;
    /// One line for the CLI's `--help`.
    fn about(&self) -> &'static str;
    /// Runs it with the arguments after its name; returns the process exit code.
    fn run(&self, args: Vec<std::ffi::OsString>) -> miette::Result<u8>;
}

/// A subcommand that acts on one *cached* stage of a manifest (`pipeline serve M STAGE`),
/// registered with [`Registry::register_stage_command`].
///
/// The CLI parses the manifest, its overrides and the stage name the way `pipeline show` does,
/// checks that the stage's kind is one of [`StageCommand::kinds`] and that its result is in the
/// cache (otherwise it tells the user to run it first), and hands [`StageCommand::run`] the
/// cached result ([`CachedStage`]) with every argument after the stage name, unparsed: the
/// command parses its own options. The engine says nothing about what the command does with
/// the artifacts; a kind's crate does.
pub trait StageCommand: Send + Sync {
    /// The subcommand's name (`serve`).
    fn name(&self) -> &'static str;
    /// One line for the CLI's `--help`.
    fn about(&self) -> &'static str;
    /// The kinds whose stages it acts on (`["model", "quantize", "lora-train"]`).
    fn kinds(&self) -> &'static [&'static str];
    /// The help of its own options (the arguments after the stage name), shown under the
    /// CLI's help of the subcommand.
    fn options_help(&self) -> String;
    /// Runs it on `stage` with the arguments after the stage name; returns the process exit
    /// code.
    fn run(&self, stage: &CachedStage, args: Vec<std::ffi::OsString>) -> miette::Result<u8>;
}

/// One output of a [`CachedStage`].
#[derive(Debug, Clone)]
pub struct CachedOutput {
    /// The output's artifact type ([`OutputSlot::artifact`]).
    pub artifact: &'static str,
    /// Read-only directory holding the artifact's files (its view in the cache).
    pub path: PathBuf,
    /// The artifact's tree hash.
    pub tree: String,
}

/// A stage instance whose result is in the cache: what a [`StageCommand`] acts on. Every path
/// is a read-only directory of the cache; writing into one corrupts it.
#[derive(Debug, Clone)]
pub struct CachedStage {
    /// The instance's name (`train@messy`).
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Its canonical parameters (the typed parameters re-serialised, defaults written out).
    pub params: serde_json::Value,
    /// The cache key of its result.
    pub key: String,
    /// Its outputs by slot name.
    pub outputs: BTreeMap<String, CachedOutput>,
    /// The artifacts its result was computed from, per input slot (as its run saw them).
    pub inputs: BTreeMap<String, Vec<InputArtifact>>,
    /// The metadata its run recorded.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl CachedStage {
    /// The directory of output `name`.
    pub fn output(&self, name: &str) -> miette::Result<&Path> {
        self.outputs
            .get(name)
            .map(|o| o.path.as_path())
            .ok_or_else(|| miette::miette!("stage `{}` has no output named `{name}`", self.name))
    }

    /// The first output whose artifact type is `artifact`, if any.
    pub fn output_of_type(&self, artifact: &str) -> Option<&CachedOutput> {
        self.outputs.values().find(|o| o.artifact == artifact)
    }

    /// The single artifact connected to input `slot`.
    pub fn input(&self, slot: &str) -> miette::Result<&Path> {
        match self.inputs.get(slot).map(Vec::as_slice) {
            Some([one]) => Ok(&one.path),
            Some([]) | None => Err(miette::miette!(
                "stage `{}` has no input `{slot}` connected",
                self.name
            )),
            Some(_) => Err(miette::miette!(
                "input `{slot}` of stage `{}` has several artifacts",
                self.name
            )),
        }
    }
}

/// A kind described for people and tools (`pipeline kinds KIND [--json]`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KindDoc {
    /// Its name in manifests.
    pub kind: &'static str,
    /// Its implementation version.
    pub version: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Its input slots.
    pub inputs: &'static [InputSlot],
    /// Its output slots.
    pub outputs: &'static [OutputSlot],
    /// Its parameters, from the params type's schema and docs.
    pub params: Vec<crate::params::ParamDoc>,
    /// The params type's JSON schema (draft 2020-12).
    pub schema: serde_json::Value,
}

/// All stage kinds (and kind-specific subcommands) a `pipeline` binary knows.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn DynStage>>,
    commands: Vec<Arc<dyn Command>>,
    stage_commands: Vec<Arc<dyn StageCommand>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind. A later registration of the same name replaces the earlier one.
    pub fn register<S: Stage>(&mut self) -> &mut Self {
        self.kinds.insert(S::KIND, Arc::new(Kind::<S>(PhantomData)));
        self
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Arc<dyn DynStage>> {
        self.kinds.get(kind)
    }

    /// Names of all registered kinds, sorted.
    pub fn kind_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    /// The one-line summary of a kind.
    pub fn summary(&self, kind: &str) -> Option<&'static str> {
        self.kinds.get(kind).map(|k| k.summary())
    }

    /// Everything `pipeline kinds KIND` shows about a kind.
    pub fn describe(&self, kind: &str) -> Option<KindDoc> {
        let k = self.kinds.get(kind)?;
        let schema = k.params_schema();
        Some(KindDoc {
            kind: k.kind(),
            version: k.version(),
            summary: k.summary(),
            inputs: k.inputs(),
            outputs: k.outputs(),
            params: crate::params::param_docs(&schema),
            schema,
        })
    }

    /// Adds a kind-specific subcommand. A later registration of the same name replaces the
    /// earlier one.
    pub fn register_command(&mut self, command: impl Command + 'static) -> &mut Self {
        self.commands.retain(|c| c.name() != command.name());
        self.commands.push(Arc::new(command));
        self
    }

    /// The registered subcommands, in registration order.
    pub fn commands(&self) -> impl Iterator<Item = &dyn Command> + '_ {
        self.commands.iter().map(|c| &**c)
    }

    /// Adds a subcommand that acts on a cached stage. A later registration of the same name
    /// replaces the earlier one.
    pub fn register_stage_command(&mut self, command: impl StageCommand + 'static) -> &mut Self {
        self.stage_commands.retain(|c| c.name() != command.name());
        self.stage_commands.push(Arc::new(command));
        self
    }

    /// The registered subcommands that act on a cached stage, in registration order.
    pub fn stage_commands(&self) -> impl Iterator<Item = &dyn StageCommand> + '_ {
        self.stage_commands.iter().map(|c| &**c)
    }
}

/// One artifact connected to an input slot.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    /// The producing stage instance (`grade@messy,1`), for messages.
    pub stage: String,
    /// The producing output's name.
    pub output: String,
    /// Read-only directory holding the artifact's files.
    pub path: PathBuf,
    /// The artifact's tree hash (its content address in the cache; empty when built by
    /// [`StageContext::standalone`]).
    pub tree: String,
    /// The producing instance's manifest table (`grade`).
    pub base: String,
    /// The producing instance's matrix assignment, (key, value) in declaration order
    /// (`[("data", "messy"), ("seed", "1")]`); empty without a matrix. A kind whose output
    /// uses these declares [`Stage::uses_input_labels`].
    pub labels: Vec<(String, String)>,
}

/// What a running stage may see and touch.
pub struct StageContext {
    pub(crate) stage_name: String,
    pub(crate) key: String,
    pub(crate) seed: u64,
    pub(crate) base_dir: PathBuf,
    pub(crate) inputs: BTreeMap<String, Vec<InputArtifact>>,
    pub(crate) outputs: BTreeMap<String, PathBuf>,
    pub(crate) checkpoint_dir: PathBuf,
    pub(crate) scratch_dir: PathBuf,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) progress: StageProgress,
    pub(crate) metadata: serde_json::Map<String, serde_json::Value>,
}

impl StageContext {
    /// Builds a context by hand, for exercising a stage kind outside the engine (unit tests of a
    /// kind). Inputs are given as `slot -> [directory]` (each artifact's producer is named
    /// after its slot, output `out`, no tree hash, no labels); outputs as `name -> directory`.
    pub fn standalone(
        stage_name: &str,
        seed: u64,
        inputs: BTreeMap<String, Vec<PathBuf>>,
        outputs: BTreeMap<String, PathBuf>,
        checkpoint_dir: PathBuf,
    ) -> Self {
        let inputs = inputs
            .into_iter()
            .map(|(slot, paths)| {
                let artifacts = paths
                    .into_iter()
                    .map(|path| InputArtifact {
                        stage: slot.clone(),
                        output: "out".into(),
                        path,
                        tree: String::new(),
                        base: slot.clone(),
                        labels: Vec::new(),
                    })
                    .collect();
                (slot, artifacts)
            })
            .collect();
        Self::standalone_with_artifacts(stage_name, seed, inputs, outputs, checkpoint_dir)
    }

    /// Like [`StageContext::standalone`], with every input artifact given in full (producer,
    /// tree hash, labels), for kinds that name or cite their inputs.
    pub fn standalone_with_artifacts(
        stage_name: &str,
        seed: u64,
        inputs: BTreeMap<String, Vec<InputArtifact>>,
        outputs: BTreeMap<String, PathBuf>,
        checkpoint_dir: PathBuf,
    ) -> Self {
        let scratch_dir = checkpoint_dir.join("scratch");
        Self {
            stage_name: stage_name.to_string(),
            key: String::new(),
            seed,
            base_dir: PathBuf::from("."),
            inputs,
            outputs,
            checkpoint_dir,
            scratch_dir,
            cancel: Arc::new(AtomicBool::new(false)),
            progress: StageProgress::hidden(),
            metadata: serde_json::Map::new(),
        }
    }

    /// The stage instance's name (e.g. `train@messy`), for messages.
    pub fn stage_name(&self) -> &str {
        &self.stage_name
    }

    /// The cache key of this run.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The experiment seed (only meaningful if the kind declares [`Stage::uses_seed`]).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Resolves a path written in the manifest (relative paths start at the manifest's
    /// directory).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// The single artifact connected to `slot`.
    pub fn input(&self, slot: &str) -> miette::Result<&Path> {
        match self.inputs.get(slot).map(Vec::as_slice) {
            Some([one]) => Ok(&one.path),
            Some([]) | None => Err(miette::miette!(
                "stage `{}` has no input `{slot}` connected",
                self.stage_name
            )),
            Some(_) => Err(miette::miette!(
                "input `{slot}` of stage `{}` has several artifacts",
                self.stage_name
            )),
        }
    }

    /// The artifact connected to an optional `slot`, if any.
    pub fn optional_input(&self, slot: &str) -> Option<&Path> {
        self.inputs
            .get(slot)
            .and_then(|v| v.first())
            .map(|a| a.path.as_path())
    }

    /// All artifacts connected to a `many` slot, in manifest order.
    pub fn inputs(&self, slot: &str) -> &[InputArtifact] {
        self.inputs.get(slot).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The empty directory to write output `name` into.
    pub fn output_dir(&self, name: &str) -> miette::Result<&Path> {
        self.outputs.get(name).map(PathBuf::as_path).ok_or_else(|| {
            miette::miette!("stage `{}` has no output named `{name}`", self.stage_name)
        })
    }

    /// A directory that survives failed and interrupted attempts of this same key (and only
    /// this key): write checkpoints here to resume. It is removed once the stage succeeds.
    pub fn checkpoint_dir(&self) -> &Path {
        &self.checkpoint_dir
    }

    /// A private temporary directory, removed after the attempt.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch_dir
    }

    /// Whether the user asked to stop (Ctrl-C, SIGTERM). Long stages check this regularly and
    /// return an error after saving a checkpoint.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Errors out if cancelled; convenient inside loops.
    pub fn check_cancelled(&self) -> miette::Result<()> {
        if self.is_cancelled() {
            Err(miette::miette!(
                "stage `{}` was interrupted",
                self.stage_name
            ))
        } else {
            Ok(())
        }
    }

    /// Progress reporting for this stage's bar.
    pub fn progress(&self) -> &StageProgress {
        &self.progress
    }

    /// Records a metadata value shown by `pipeline show` and stored in the action record
    /// (counts, skipped records, throughput).
    pub fn set_metadata(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.metadata.insert(key.to_string(), value.into());
    }

    /// Metadata recorded so far.
    pub fn metadata(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::remove_dotted;

    #[test]
    fn dotted_paths_remove_nested_values_and_ignore_missing_ones() {
        let mut v = serde_json::json!({"a": 1, "openai": {"concurrency": 4, "model": "m"}});
        remove_dotted(&mut v, "openai.concurrency");
        remove_dotted(&mut v, "openai.nothing.here");
        remove_dotted(&mut v, "absent");
        assert_eq!(v, serde_json::json!({"a": 1, "openai": {"model": "m"}}));
    }
}
