//! Runs a manifest: keys, cache lookups, parallel execution, and plans (dry runs).
//!
//! Stages run in dependency order, up to `jobs` at a time; stages that need the GPU never run
//! at the same time. A stage's key is computed only when its producers have finished, from
//! their actual output trees, so an upstream stage that reruns but produces identical output
//! leaves its consumers cached. On a failure or an interrupt no new stage starts, running ones
//! finish (or notice the interrupt), and every finished result stays in the cache.
//!
//! Whether a stage is cached or runs, and why ([`Decision`]), is decided in one place for both
//! a run and a plan.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Serialize, Serializer};

use crate::decision::serialize_reason_lines;
pub use crate::decision::{Action, Decision, RunReason};
use crate::diagnostic::JsonDiagnostic;
use crate::fingerprint::{explain, Fingerprint, InputPart, KeyParts};
use crate::graph::StageGraph;
use crate::hashing::StatCache;
use crate::lease::{Lease, LeaseError};
use crate::manifest::{InputRef, InstanceName, Manifest, StageInstance};
use crate::progress::{ProgressMode, RunProgress, StageProgress};
use crate::slurm::{ExecutorKind, SlurmClient, SlurmLauncher, WorkerCommand};
use crate::stage::{CachedOutput, CachedStage, InputArtifact, StageContext};
use crate::store::{ActionRecord, LastRun, OutputRecord, Store};

/// How to run.
#[derive(Clone)]
pub struct RunOptions {
    /// Maximum stages running at once.
    pub jobs: usize,
    /// Run only these stages (names or base names) and what they need.
    pub only: Vec<String>,
    /// Recompute these stages even if cached.
    pub force: Vec<String>,
    /// Set to stop: no new stage starts and running stages are asked to stop.
    pub cancel: Arc<AtomicBool>,
    /// How progress is shown (bars on a terminal, lines in a log, nothing).
    pub progress: ProgressMode,
    /// Where stages run: here, or as Slurm jobs (see [`crate::slurm`]).
    pub executor: ExecutorKind,
    /// How a Slurm job runs a stage (the CLI's worker command line); needed when `executor`
    /// is Slurm and a stage launches on the cluster.
    pub worker_command: Option<Arc<dyn WorkerCommand>>,
    /// Set in a worker: the one stage it computes and the key the coordinator expects.
    pub worker: Option<WorkerTarget>,
    /// Report a failing stage as one JSON line ([`JsonDiagnostic`] plus `stage`) rather than
    /// as text (`--error-format json`).
    pub json_errors: bool,
}

/// What a worker was sent to compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerTarget {
    /// The stage instance.
    pub stage: String,
    /// The key the coordinator computed for it, if it could (a detached run submits stages
    /// before their producers ran); computing another is an error.
    pub key: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            only: Vec::new(),
            force: Vec::new(),
            cancel: Arc::new(AtomicBool::new(false)),
            progress: ProgressMode::Quiet,
            executor: ExecutorKind::Local,
            worker_command: None,
            worker: None,
            json_errors: false,
        }
    }
}

/// Why a stage failed: the text a person reads and the same diagnostic as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageFailure {
    /// The rendered report (miette's box, with the help).
    pub message: String,
    /// The diagnostic for `--error-format json` and `run --json` (boxed: results carry it).
    pub diagnostic: Box<JsonDiagnostic>,
}

impl StageFailure {
    /// A failure the engine itself describes in one message.
    pub fn plain(message: impl Into<String>) -> StageFailure {
        let message = message.into();
        StageFailure {
            diagnostic: Box::new(JsonDiagnostic {
                message: message.clone(),
                code: None,
                severity: "error",
                help: None,
                causes: Vec::new(),
                labels: Vec::new(),
                related: Vec::new(),
            }),
            message,
        }
    }

    /// A stage's own error report, with `hint` (what the engine adds) after its help.
    fn report(report: &miette::Report, hint: Option<String>) -> StageFailure {
        let mut diagnostic = Box::new(JsonDiagnostic::of(report.as_ref()));
        let mut message = format!("{report:?}");
        if let Some(hint) = hint {
            message.push_str(&hint);
            let hint = hint.trim().to_string();
            diagnostic.help = Some(match diagnostic.help.take() {
                Some(h) => format!("{h}\n{hint}"),
                None => hint,
            });
        }
        StageFailure {
            message,
            diagnostic,
        }
    }
}

impl From<String> for StageFailure {
    fn from(message: String) -> StageFailure {
        StageFailure::plain(message)
    }
}

impl std::fmt::Display for StageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What happened to one stage. In JSON every outcome has one shape:
/// `{"status": "cached" | "ran" | "failed" | "skipped" | "not_selected", "why": .., "error": ..}`,
/// `why` set for a skipped stage and `error` (a [`JsonDiagnostic`]) for a failed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    /// Result taken from the cache.
    Cached,
    /// Computed now.
    Ran,
    /// The stage failed; the failure says why.
    Failed(StageFailure),
    /// Not started (an upstream stage failed, or the run was interrupted).
    Skipped(String),
    /// Not selected by `--only`.
    NotSelected,
}

impl Serialize for StageOutcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (status, why, error) = match self {
            StageOutcome::Cached => ("cached", None, None),
            StageOutcome::Ran => ("ran", None, None),
            StageOutcome::Failed(f) => ("failed", None, Some(&f.diagnostic)),
            StageOutcome::Skipped(why) => ("skipped", Some(why), None),
            StageOutcome::NotSelected => ("not_selected", None, None),
        };
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("status", status)?;
        map.serialize_entry("why", &why)?;
        map.serialize_entry("error", &error)?;
        map.end()
    }
}

/// Result of one stage in a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageResult {
    /// Instance name.
    pub stage: String,
    /// What happened.
    pub outcome: StageOutcome,
    /// Its key, once known.
    pub key: Option<String>,
    /// Wall time spent on it in this run.
    pub wall_s: f64,
    /// Total size of its outputs.
    pub bytes: u64,
    /// Why it ran (`None` when cached, or when its key could not be computed); in JSON, the
    /// list `reasons` of its lines.
    #[serde(rename = "reasons", serialize_with = "serialize_reason_lines")]
    pub reason: Option<RunReason>,
}

/// Result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Per stage, in dependency order.
    pub stages: Vec<StageResult>,
    /// Whether the run was interrupted.
    pub cancelled: bool,
    /// Set when a stage was left alone because another process computes its key (its lock,
    /// which only a worker does not wait for, or its lease, held on another machine); the
    /// process exits with [`crate::slurm::EXIT_KEY_BUSY`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub key_busy: bool,
    /// Slurm commands called (`sbatch`, `squeue`, `scancel`, `scontrol`), when stages ran on
    /// Slurm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slurm_calls: Option<usize>,
}

impl RunReport {
    /// True if every selected stage is cached or ran.
    pub fn success(&self) -> bool {
        !self.cancelled
            && self.stages.iter().all(|s| {
                matches!(
                    s.outcome,
                    StageOutcome::Cached | StageOutcome::Ran | StageOutcome::NotSelected
                )
            })
    }

    /// Number of stages that ran (not cached).
    pub fn ran(&self) -> usize {
        self.stages
            .iter()
            .filter(|s| s.outcome == StageOutcome::Ran)
            .count()
    }
}

/// One line of a plan; in JSON `{"stage", "action", "reason", "key"}` (`reason` is empty when
/// cached, `key` absent when not computable yet).
#[derive(Debug, Clone)]
pub struct PlanEntry {
    /// Instance name.
    pub stage: String,
    /// Cached or run, and why.
    pub decision: Decision,
    /// Key, if computable now.
    pub key: Option<String>,
}

impl Serialize for PlanEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Line<'a> {
            stage: &'a str,
            action: Action,
            reason: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            key: Option<&'a str>,
        }
        Line {
            stage: &self.stage,
            action: self.decision.action(),
            reason: self
                .decision
                .reason()
                .map(RunReason::to_string)
                .unwrap_or_default(),
            key: self.key.as_deref(),
        }
        .serialize(serializer)
    }
}

/// Output trees of finished (or cached) stages: instance -> output name -> tree hash.
type Outputs = HashMap<InstanceName, BTreeMap<String, String>>;

/// A stage's decision with what it was made from.
enum Assessment {
    /// The result for its key is in the cache.
    Cached {
        parts: KeyParts,
        record: ActionRecord,
    },
    /// It runs; `parts` is `None` when the key cannot be computed yet.
    Run {
        reason: RunReason,
        parts: Option<KeyParts>,
    },
}

impl Assessment {
    fn decision(&self) -> Decision {
        match self {
            Self::Cached { .. } => Decision::Cached,
            Self::Run { reason, .. } => Decision::Run(reason.clone()),
        }
    }

    fn key(&self) -> Option<String> {
        match self {
            Self::Cached { parts, .. } => Some(parts.key()),
            Self::Run { parts, .. } => parts.as_ref().map(KeyParts::key),
        }
    }
}

/// The artifacts connected to one input slot, each with its tree hash.
type SlotTrees<'a> = (&'a String, Vec<(&'a InputRef, &'a String)>);

/// The tree of every artifact connected to `stage`, per slot, from its producers' outputs.
fn input_trees<'a>(
    stage: &'a StageInstance,
    upstream: &'a Outputs,
) -> Result<Vec<SlotTrees<'a>>, String> {
    stage
        .inputs
        .iter()
        .map(|(slot, refs)| {
            let trees = refs
                .iter()
                .map(|r| {
                    upstream
                        .get(&r.stage)
                        .and_then(|o| o.get(&r.output))
                        .map(|tree| (r, tree))
                        .ok_or_else(|| {
                            format!("internal: output `{}.{}` not available", r.stage, r.output)
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((slot, trees))
        })
        .collect()
}

/// Shared, read-mostly state of a run.
struct Env<'m> {
    manifest: &'m Manifest,
    store: &'m Store,
    base_dir: PathBuf,
    stat_cache: Mutex<StatCache>,
}

impl<'m> Env<'m> {
    fn new(manifest: &'m Manifest, store: &'m Store) -> Self {
        Self {
            manifest,
            store,
            base_dir: base_dir(manifest),
            stat_cache: Mutex::new(StatCache::load(&store.root().join("stat-cache.json"))),
        }
    }

    fn save_stat_cache(&self) {
        if let Ok(mut cache) = self.stat_cache.lock() {
            let _ = cache.save();
        }
    }

    /// The one decision, for a run and a plan alike: cached, or run and why. Producers missing
    /// from `upstream` have not produced their output yet (in a plan: they will run).
    fn assess(&self, stage: &StageInstance, upstream: &Outputs, forced: bool) -> Assessment {
        let waiting = stage
            .inputs
            .values()
            .flatten()
            .find(|r| !upstream.contains_key(&r.stage));
        if let Some(r) = waiting {
            return Assessment::Run {
                reason: RunReason::UpstreamWillRun {
                    producer: r.stage.to_string(),
                },
                parts: None,
            };
        }
        let parts = match self.parts(stage, upstream) {
            Ok(parts) => parts,
            Err(e) => {
                return Assessment::Run {
                    reason: RunReason::KeyNotComputable(Arc::new(e)),
                    parts: None,
                }
            }
        };
        match self.store.action(&parts.key()) {
            Some(record) if !forced => Assessment::Cached { parts, record },
            Some(_) => Assessment::Run {
                reason: RunReason::Forced,
                parts: Some(parts),
            },
            None => Assessment::Run {
                reason: self.why_not_cached(stage, &parts),
                parts: Some(parts),
            },
        }
    }

    fn parts(&self, stage: &StageInstance, upstream: &Outputs) -> miette::Result<KeyParts> {
        let inputs = input_trees(stage, upstream)
            .map_err(|e| miette::miette!("{e}"))?
            .into_iter()
            .map(|(slot, trees)| {
                let parts = trees
                    .into_iter()
                    .map(|(r, tree)| InputPart {
                        stage: r.stage.to_string(),
                        output: r.output.clone(),
                        tree: tree.clone(),
                        base: r.stage.base.clone(),
                        labels: r
                            .stage
                            .labels()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    })
                    .collect();
                (slot.clone(), parts)
            })
            .collect();
        let mut cache = self
            .stat_cache
            .lock()
            .map_err(|_| miette::miette!("stat cache lock poisoned"))?;
        let mut fp = Fingerprint::new(&self.base_dir, &mut cache);
        stage.stage.fingerprint(&stage.params, &mut fp)?;
        let extras = fp.extras;
        Ok(KeyParts {
            kind: stage.kind.to_string(),
            version: stage.kind_version.to_string(),
            params: stage.params.keyed.clone(),
            seed: stage.uses_seed.then_some(self.manifest.experiment.seed),
            inputs,
            extras,
            input_labels: stage.uses_input_labels,
        })
    }

    /// Why a key that is not in the cache is not: compared with the last run of the stage.
    fn why_not_cached(&self, stage: &StageInstance, parts: &KeyParts) -> RunReason {
        let last = self
            .store
            .last_run(&self.manifest.experiment.name, &stage.name.to_string());
        let Some(last) = last else {
            return RunReason::NeverRun;
        };
        match serde_json::from_value::<KeyParts>(last.parts) {
            Ok(old) if old.key() == parts.key() => RunReason::ResultMissing,
            Ok(old) => RunReason::Changed(explain(&old, parts)),
            Err(_) => RunReason::LastRecordUnreadable,
        }
    }

    fn record(&self, stage: &StageInstance, parts: &KeyParts) {
        let run = LastRun {
            key: parts.key(),
            parts: serde_json::to_value(parts).unwrap_or_default(),
        };
        let recorded = self.store.record_last_run(
            &self.manifest.experiment.name,
            &stage.name.to_string(),
            &run,
        );
        if let Err(e) = recorded {
            tracing::warn!("cannot record last run of {}: {e}", stage.name);
        }
    }

    /// The outcome of a stage whose result is in the cache.
    fn cached(
        &self,
        stage: &StageInstance,
        parts: &KeyParts,
        record: ActionRecord,
        started: Instant,
    ) -> Done {
        self.record(stage, parts);
        Done::Finished {
            outputs: outputs_of(&record),
            result: StageResult {
                stage: stage.name.to_string(),
                outcome: StageOutcome::Cached,
                key: Some(parts.key()),
                wall_s: started.elapsed().as_secs_f64(),
                bytes: record.outputs.values().map(|o| o.bytes).sum(),
                reason: None,
            },
        }
    }
}

fn selected(manifest: &Manifest, graph: &StageGraph, only: &[String]) -> Vec<bool> {
    if only.is_empty() {
        return vec![true; manifest.stages.len()];
    }
    let roots: Vec<usize> = manifest
        .stages
        .iter()
        .enumerate()
        .filter(|(_, s)| only.iter().any(|o| s.name.selected_by(o)))
        .map(|(i, _)| i)
        .collect();
    graph.upstream_closure(&roots)
}

fn is_forced(stage: &StageInstance, force: &[String]) -> bool {
    force.iter().any(|f| stage.name.selected_by(f))
}

/// The manifest's directory, against which relative paths resolve.
pub fn base_dir(manifest: &Manifest) -> PathBuf {
    manifest
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Says for each stage whether a run would take it from the cache, and why not.
pub fn plan(
    manifest: &Manifest,
    store: &Store,
    options: &RunOptions,
) -> miette::Result<Vec<PlanEntry>> {
    let env = Env::new(manifest, store);
    let graph = StageGraph::new(manifest);
    let selected = selected(manifest, &graph, &options.only);
    // Outputs of the stages that would be cached; a stage that would run has none yet.
    let mut outputs = Outputs::new();
    let mut plan = Vec::new();
    for i in graph.order().into_iter().filter(|&i| selected[i]) {
        let stage = &manifest.stages[i];
        let assessment = env.assess(stage, &outputs, is_forced(stage, &options.force));
        if let Assessment::Cached { record, .. } = &assessment {
            outputs.insert(stage.name.clone(), outputs_of(record));
        }
        plan.push(PlanEntry {
            stage: stage.name.to_string(),
            decision: assessment.decision(),
            key: assessment.key(),
        });
    }
    env.save_stat_cache();
    Ok(plan)
}

/// The result of the instance `name` in the cache, with the artifacts it was computed from
/// ([`CachedStage`], what a [`crate::StageCommand`] acts on); `Ok(Err(reason))` when a run
/// would compute it instead, with the reason `plan` would give. Only `name` and what it needs
/// are assessed; nothing runs.
pub fn cached_stage(
    manifest: &Manifest,
    store: &Store,
    name: &InstanceName,
) -> miette::Result<Result<CachedStage, RunReason>> {
    let target = manifest
        .stages
        .iter()
        .position(|s| &s.name == name)
        .ok_or_else(|| miette::miette!("the manifest has no stage `{name}`"))?;
    let env = Env::new(manifest, store);
    let graph = StageGraph::new(manifest);
    let needed = graph.upstream_closure(&[target]);
    let mut outputs = Outputs::new();
    let mut found = None;
    for i in graph.order().into_iter().filter(|&i| needed[i]) {
        let stage = &manifest.stages[i];
        match env.assess(stage, &outputs, false) {
            Assessment::Cached { record, .. } => {
                outputs.insert(stage.name.clone(), outputs_of(&record));
                if i == target {
                    found = Some(Ok(record));
                }
            }
            Assessment::Run { reason, .. } if i == target => found = Some(Err(reason)),
            Assessment::Run { .. } => {}
        }
    }
    env.save_stat_cache();
    let record = match found {
        Some(Ok(record)) => record,
        Some(Err(reason)) => return Ok(Err(reason)),
        None => return Err(miette::miette!("internal: stage `{name}` was not assessed")),
    };
    let stage = &manifest.stages[target];
    let view = |tree: &str| {
        store.view(tree).map_err(|e| {
            miette::miette!("cannot materialise artifact {tree} of stage `{name}`: {e}")
        })
    };
    let mut cached_outputs = BTreeMap::new();
    for slot in stage.stage.outputs() {
        if let Some(out) = record.outputs.get(slot.name) {
            cached_outputs.insert(
                slot.name.to_string(),
                CachedOutput {
                    artifact: slot.artifact,
                    path: view(&out.tree)?,
                    tree: out.tree.clone(),
                },
            );
        }
    }
    let mut inputs = BTreeMap::new();
    for (slot, trees) in input_trees(stage, &outputs).map_err(|e| miette::miette!("{e}"))? {
        let mut list = Vec::new();
        for (r, tree) in trees {
            list.push(InputArtifact {
                stage: r.stage.to_string(),
                output: r.output.clone(),
                path: view(tree)?,
                tree: tree.clone(),
                base: r.stage.base.clone(),
                labels: r
                    .stage
                    .labels()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            });
        }
        inputs.insert(slot.clone(), list);
    }
    Ok(Ok(CachedStage {
        name: stage.name.to_string(),
        kind: stage.kind,
        params: stage.params.canonical.clone(),
        key: record.key,
        outputs: cached_outputs,
        inputs,
        metadata: record.metadata,
    }))
}

enum Done {
    Finished {
        outputs: BTreeMap<String, String>,
        result: StageResult,
    },
    Failed {
        result: StageResult,
        /// A worker found its key locked by another process.
        key_busy: bool,
    },
}

/// How one stage is to be executed.
struct How<'a> {
    /// Recompute although cached.
    forced: bool,
    /// Set to stop.
    cancel: Arc<AtomicBool>,
    /// Run it as a Slurm job through this launcher.
    launcher: Option<&'a SlurmLauncher<'a>>,
    /// Other instances of its table became ready with it (they may share a job array).
    siblings: bool,
    /// This process is a worker sent to compute this target only.
    worker: Option<&'a WorkerTarget>,
}

/// Runs the manifest against the store.
pub fn run(manifest: &Manifest, store: &Store, options: &RunOptions) -> miette::Result<RunReport> {
    let _lock = store
        .lock(false)
        .map_err(|e| miette::miette!("cannot lock cache {}: {e}", store.root().display()))?;
    let env = Env::new(manifest, store);
    let graph = StageGraph::new(manifest);
    let order = graph.order();
    let selected = selected(manifest, &graph, &options.only);
    let progress = RunProgress::new(options.progress);
    let n = manifest.stages.len();
    let on_cluster: Vec<bool> = manifest
        .stages
        .iter()
        .map(|s| s.launches_on_cluster(options.executor))
        .collect();
    let client = SlurmClient::new();
    let launcher = cluster_launcher(manifest, store, options, &client, &selected, &on_cluster)?;
    // Without a launcher (a worker, or no selected stage on the cluster) everything runs here.
    let on_cluster = if launcher.is_some() {
        on_cluster
    } else {
        vec![false; n]
    };

    #[derive(Clone, PartialEq)]
    enum State {
        Waiting,
        Running,
        Done,
        Failed,
    }
    let mut state = vec![State::Waiting; n];
    let mut results: Vec<Option<StageResult>> = vec![None; n];
    let mut outputs = Outputs::new();
    let mut stop = false;
    let mut key_busy = false;
    let jobs = options.jobs.max(1);

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Done)>();
        // Stages running here count against `jobs`; cluster jobs are Slurm's to schedule (and
        // so is keeping two GPU stages apart).
        let mut running_here = 0usize;
        let mut running_on_cluster = 0usize;
        let mut gpu_busy = false;
        loop {
            if options.cancel.load(Ordering::Relaxed) {
                stop = true;
            }
            if !stop {
                let ready: Vec<usize> = order
                    .iter()
                    .copied()
                    .filter(|&i| {
                        selected[i]
                            && state[i] == State::Waiting
                            && graph.producers(i).iter().all(|&p| state[p] == State::Done)
                    })
                    .collect();
                // Cluster stages of one table ready together may share a job array.
                let mut ready_per_table: HashMap<&str, usize> = HashMap::new();
                for &i in ready.iter().filter(|&&i| on_cluster[i]) {
                    *ready_per_table
                        .entry(manifest.stages[i].name.base.as_str())
                        .or_default() += 1;
                }
                for i in ready {
                    let stage = &manifest.stages[i];
                    let cluster = on_cluster[i];
                    let siblings = ready_per_table
                        .get(stage.name.base.as_str())
                        .is_some_and(|n| *n > 1);
                    if !cluster && (running_here >= jobs || (stage.needs_gpu && gpu_busy)) {
                        continue;
                    }
                    state[i] = State::Running;
                    if cluster {
                        running_on_cluster += 1;
                    } else {
                        running_here += 1;
                        gpu_busy |= stage.needs_gpu;
                    }
                    let tx = tx.clone();
                    let env = &env;
                    let outputs = outputs.clone();
                    let progress = progress.clone();
                    let forced = is_forced(stage, &options.force);
                    let cancel = options.cancel.clone();
                    let launcher = launcher.as_ref().filter(|_| cluster);
                    let worker = options.worker.as_ref();
                    scope.spawn(move || {
                        let how = How {
                            forced,
                            cancel,
                            launcher,
                            siblings,
                            worker,
                        };
                        let done = execute(env, stage, &outputs, &how, &progress);
                        let _ = tx.send((i, done));
                    });
                }
            }
            if running_here + running_on_cluster == 0 {
                break;
            }
            let Ok((i, done)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            if on_cluster[i] {
                running_on_cluster -= 1;
            } else {
                running_here -= 1;
                if manifest.stages[i].needs_gpu {
                    gpu_busy = false;
                }
            }
            match done {
                Done::Finished {
                    outputs: outs,
                    result,
                } => {
                    outputs.insert(manifest.stages[i].name.clone(), outs);
                    if result.outcome == StageOutcome::Ran {
                        progress.finished(&result.stage, result.wall_s);
                    }
                    state[i] = State::Done;
                    results[i] = Some(result);
                }
                Done::Failed {
                    result,
                    key_busy: busy,
                } => {
                    key_busy |= busy;
                    state[i] = State::Failed;
                    stop = true;
                    if let StageOutcome::Failed(failure) = &result.outcome {
                        if options.json_errors {
                            progress.println(&stage_failure_line(&result.stage, failure));
                        } else {
                            progress.println(&format!(
                                "stage `{}` failed:\n{}",
                                result.stage, failure.message
                            ));
                        }
                    }
                    results[i] = Some(result);
                }
            }
        }
    });

    env.save_stat_cache();
    let cancelled = options.cancel.load(Ordering::Relaxed);
    let stages = order
        .iter()
        .map(|&i| {
            results[i].take().unwrap_or_else(|| {
                let stage = &manifest.stages[i];
                let outcome = if !selected[i] {
                    StageOutcome::NotSelected
                } else if cancelled {
                    StageOutcome::Skipped("interrupted before it started".into())
                } else {
                    StageOutcome::Skipped("an upstream or earlier stage failed".into())
                };
                StageResult {
                    stage: stage.name.to_string(),
                    outcome,
                    key: None,
                    wall_s: 0.0,
                    bytes: 0,
                    reason: None,
                }
            })
        })
        .collect();
    Ok(RunReport {
        stages,
        cancelled,
        key_busy,
        slurm_calls: launcher.is_some().then(|| client.calls()),
    })
}

/// The Slurm launcher, when the executor is Slurm and a selected stage launches there.
fn cluster_launcher<'a>(
    manifest: &Manifest,
    store: &'a Store,
    options: &RunOptions,
    client: &'a SlurmClient,
    selected: &[bool],
    on_cluster: &[bool],
) -> miette::Result<Option<SlurmLauncher<'a>>> {
    let needed = selected.iter().zip(on_cluster).any(|(s, c)| *s && *c);
    if !needed || options.worker.is_some() {
        return Ok(None);
    }
    let Some(worker) = options.worker_command.clone() else {
        return Err(miette::miette!(
            "internal: the Slurm executor needs the worker's command line"
        ));
    };
    let launcher = SlurmLauncher::new(
        store,
        &manifest.experiment.name,
        manifest.experiment.slurm.clone(),
        worker,
        client,
    );
    launcher.prepare().map_err(|e| {
        miette::miette!(
            "cannot create the Slurm directories of the cache {}: {e}",
            store.root().display()
        )
    })?;
    Ok(Some(launcher))
}

/// A failed stage as one JSON line: its diagnostic with the stage's name added.
fn stage_failure_line(stage: &str, failure: &StageFailure) -> String {
    let mut value = serde_json::to_value(&failure.diagnostic).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("stage".into(), serde_json::Value::String(stage.to_string()));
    }
    value.to_string()
}

fn failed(
    stage: &StageInstance,
    key: Option<String>,
    started: Instant,
    msg: impl Into<StageFailure>,
    reason: Option<RunReason>,
) -> Done {
    Done::Failed {
        result: failure(stage, key, started, msg, reason),
        key_busy: false,
    }
}

/// A stage left alone because another process computes its key.
fn busy(
    stage: &StageInstance,
    key: String,
    started: Instant,
    msg: String,
    reason: RunReason,
) -> Done {
    Done::Failed {
        result: failure(stage, Some(key), started, msg, Some(reason)),
        key_busy: true,
    }
}

fn failure(
    stage: &StageInstance,
    key: Option<String>,
    started: Instant,
    msg: impl Into<StageFailure>,
    reason: Option<RunReason>,
) -> StageResult {
    StageResult {
        stage: stage.name.to_string(),
        outcome: StageOutcome::Failed(msg.into()),
        key,
        wall_s: started.elapsed().as_secs_f64(),
        bytes: 0,
        reason,
    }
}

fn outputs_of(record: &ActionRecord) -> BTreeMap<String, String> {
    record
        .outputs
        .iter()
        .map(|(k, v)| (k.clone(), v.tree.clone()))
        .collect()
}

fn execute(
    env: &Env<'_>,
    stage: &StageInstance,
    upstream: &Outputs,
    how: &How<'_>,
    progress: &RunProgress,
) -> Done {
    let started = Instant::now();
    let forced = how.forced;
    let target = how.worker.filter(|w| stage.name == w.stage.as_str());
    let assessment = env.assess(stage, upstream, forced);
    // A worker computes its own stage only: every producer must be cached here already.
    if let (Some(_), None, Assessment::Run { reason, .. }) = (how.worker, target, &assessment) {
        return failed(
            stage,
            assessment.key(),
            started,
            format!(
                "this worker computes one stage, but its producer `{}` is not in the cache it \
                 sees ({reason}); the coordinator runs producers first, so the cache on this \
                 node differs from the coordinator's: is it on a filesystem every node shares?",
                stage.name
            ),
            None,
        );
    }
    let (reason, parts) = match assessment {
        Assessment::Cached { parts, record } => return env.cached(stage, &parts, record, started),
        Assessment::Run {
            reason: RunReason::KeyNotComputable(e),
            ..
        } => {
            return failed(
                stage,
                None,
                started,
                StageFailure::report(e.as_ref(), None),
                None,
            )
        }
        Assessment::Run {
            reason,
            parts: Some(parts),
        } => (reason, parts),
        // A stage starts only once its producers are done.
        Assessment::Run {
            reason,
            parts: None,
        } => return failed(stage, None, started, format!("internal: {reason}"), None),
    };
    let key = parts.key();
    if let Some(expected) = target.and_then(|t| t.key.as_ref()).filter(|k| **k != key) {
        return failed(
            stage,
            Some(key.clone()),
            started,
            format!(
                "this node computes key {key} for `{}`, but the coordinator expected {}: the \
                 `pipeline` binary, the manifest or an input file differs between the two \
                 machines (install the same build everywhere, keep inputs on the shared \
                 filesystem)",
                stage.name, expected
            ),
            Some(reason),
        );
    }
    if let Some(launcher) = how.launcher {
        return launch_on_cluster(env, stage, launcher, &parts, reason, how, progress, started);
    }
    // Another process may be computing the same key: wait for it, then take its result. A
    // worker does not wait: it says so, and the coordinator decides.
    let key_lock = if target.is_some() {
        env.store.try_lock_key(&key).and_then(|lock| {
            lock.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::WouldBlock, "busy"))
        })
    } else {
        env.store.lock_key(&key)
    };
    let _key_lock = match key_lock {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let msg = format!(
                "another process holds the lock of key {key}: it is computing `{}` already",
                stage.name
            );
            return busy(stage, key, started, msg, reason);
        }
        Err(e) => {
            return failed(
                stage,
                Some(key),
                started,
                format!("cannot lock key: {e}"),
                Some(reason),
            )
        }
    };
    if !forced {
        if let Some(record) = env.store.action(&key) {
            return env.cached(stage, &parts, record, started);
        }
    }
    // The lock above may be node-local on a shared filesystem: the lease is not.
    let _lease = match Lease::take(&env.store.lease_path(&key)) {
        Ok(lease) => lease,
        Err(LeaseError::Held(owner)) => {
            let msg = format!(
                "key {key} (`{}`) is leased by {owner}: it is computing it already",
                stage.name
            );
            return busy(stage, key, started, msg, reason);
        }
        Err(e) => {
            let msg = format!("cannot take the lease of key {key}: {e}");
            return failed(stage, Some(key), started, msg, Some(reason));
        }
    };
    let attempted = attempt(
        env,
        stage,
        &key,
        &parts,
        upstream,
        progress,
        how.cancel.clone(),
    );
    finish(env, stage, &parts, reason, attempted, started)
}

/// The outcome of a stage computed now (here or as a job).
fn finish(
    env: &Env<'_>,
    stage: &StageInstance,
    parts: &KeyParts,
    reason: RunReason,
    attempted: Result<ActionRecord, StageFailure>,
    started: Instant,
) -> Done {
    let key = parts.key();
    match attempted {
        Ok(record) => {
            env.record(stage, parts);
            Done::Finished {
                outputs: outputs_of(&record),
                result: StageResult {
                    stage: stage.name.to_string(),
                    outcome: StageOutcome::Ran,
                    key: Some(key),
                    wall_s: started.elapsed().as_secs_f64(),
                    bytes: record.outputs.values().map(|o| o.bytes).sum(),
                    reason: Some(reason),
                },
            }
        }
        Err(msg) => failed(stage, Some(key), started, msg, Some(reason)),
    }
}

/// Runs `stage` as a Slurm job. The coordinator takes no key lock (the worker does, on its
/// node); it is the only one that dispatches the key.
#[allow(clippy::too_many_arguments)]
fn launch_on_cluster(
    env: &Env<'_>,
    stage: &StageInstance,
    launcher: &SlurmLauncher<'_>,
    parts: &KeyParts,
    reason: RunReason,
    how: &How<'_>,
    progress: &RunProgress,
    started: Instant,
) -> Done {
    let key = parts.key();
    if !how.forced {
        if let Some(record) = env.store.action(&key) {
            return env.cached(stage, parts, record, started);
        }
    }
    let bar: StageProgress = progress.stage(&stage.name.to_string());
    let attempted = launcher
        .run_stage(stage, &key, how.forced, how.siblings, &how.cancel, &bar)
        .map_err(StageFailure::from);
    bar.finish();
    finish(env, stage, parts, reason, attempted, started)
}

fn attempt(
    env: &Env<'_>,
    stage: &StageInstance,
    key: &str,
    parts: &KeyParts,
    upstream: &Outputs,
    progress: &RunProgress,
    cancel: Arc<AtomicBool>,
) -> Result<ActionRecord, StageFailure> {
    let store = env.store;
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let dir = store
        .attempt_dir(&stage.name.file_stem())
        .map_err(|e| io("cannot create attempt directory", e))?;
    let mut outputs = BTreeMap::new();
    for name in &stage.outputs {
        let out = dir.path().join("out").join(name);
        std::fs::create_dir_all(&out).map_err(|e| io("cannot create output directory", e))?;
        outputs.insert(name.to_string(), out);
    }
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).map_err(|e| io("cannot create scratch directory", e))?;
    let mut inputs = BTreeMap::new();
    for (slot, trees) in input_trees(stage, upstream)? {
        let mut list = Vec::new();
        for (r, tree) in trees {
            let path = store
                .view(tree)
                .map_err(|e| io("cannot materialise input", e))?;
            list.push(InputArtifact {
                stage: r.stage.to_string(),
                output: r.output.clone(),
                path,
                tree: tree.clone(),
                base: r.stage.base.clone(),
                labels: r
                    .stage
                    .labels()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            });
        }
        inputs.insert(slot.clone(), list);
    }
    let checkpoint_dir = store
        .checkpoint_dir(key)
        .map_err(|e| io("cannot create checkpoint directory", e))?;
    let bar = progress.stage(&stage.name.to_string());
    let mut ctx = StageContext {
        stage_name: stage.name.to_string(),
        key: key.to_string(),
        seed: env.manifest.experiment.seed,
        base_dir: env.base_dir.clone(),
        inputs,
        outputs: outputs.clone(),
        checkpoint_dir,
        scratch_dir: scratch,
        cancel,
        progress: bar.clone(),
        metadata: serde_json::Map::new(),
    };
    let started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let started = Instant::now();
    tracing::info!(stage = %stage.name, key = &key[..12], "running");
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        stage.stage.run(&stage.params, &mut ctx)
    }));
    bar.finish();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(report)) => {
            let hint = storage_hint(&format!("{report:?}"), store.root());
            return Err(StageFailure::report(&report, hint));
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            return Err(StageFailure::plain(format!(
                "the stage panicked (a bug in kind `{}`): {msg}",
                stage.kind
            )));
        }
    }
    let duration_s = started.elapsed().as_secs_f64();
    let mut records = BTreeMap::new();
    for (name, path) in &outputs {
        let (tree, hash) = store
            .commit_dir(path)
            .map_err(|e| io("cannot store outputs", e))?;
        records.insert(
            name.clone(),
            OutputRecord {
                tree: hash,
                files: tree.files.len(),
                bytes: tree.bytes(),
            },
        );
    }
    let record = ActionRecord {
        key: key.to_string(),
        stage: stage.name.to_string(),
        kind: stage.kind.to_string(),
        parts: serde_json::to_value(parts).map_err(|e| e.to_string())?,
        outputs: records,
        metadata: ctx.metadata,
        started_unix,
        duration_s,
    };
    store
        .put_action(&record)
        .map_err(|e| io("cannot write action record", e))?;
    if let Err(e) = store.remove_checkpoint(key) {
        tracing::warn!("cannot remove checkpoint of {}: {e}", stage.name);
    }
    Ok(record)
}

/// What a stage's error says when a write failed for lack of space or a read-only file
/// system: the OS message names no path, and a stage writes only under the cache (its
/// outputs, scratch and checkpoints), so the hint names the cache.
fn storage_hint(message: &str, cache_root: &Path) -> Option<String> {
    let what = if message.contains("os error 28") || message.contains("No space left on device") {
        "is full"
    } else if message.contains("os error 30") || message.contains("Read-only file system") {
        "is read-only"
    } else {
        return None;
    };
    Some(format!(
        "\n(the stage writes its outputs, scratch files and checkpoints under the cache {}, \
         whose file system {what}: free space there or choose another cache with --cache)",
        cache_root.display()
    ))
}
