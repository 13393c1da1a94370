//! The `samples` artifact: `samples.jsonl` (human-eval sample lines, grouped by task in problem
//! order) and `generation.json` (parameters, counts and finish reasons of the run).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::json::{write_json, write_jsonl, JsonError};

/// The `samples` artifact.
pub struct SamplesArtifact;

/// One line of `samples.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleLine {
    /// Task id of the problem.
    pub task_id: String,
    /// Generated text, cut before its stop sequence: the raw answer.
    pub completion: String,
    /// The program that is graded: the problem's code prefix and the completion, sanitized
    /// ([`crate::python::sanitize::sanitize`]: the fenced code, the entry point and what it
    /// needs, without test code or prints).
    #[serde(default)]
    pub program: String,
    /// Index of this sample among the task's samples.
    pub sample_index: usize,
    /// `stop`, `eos` or `length`.
    pub finish_reason: String,
    /// Seed of this sample's sampler.
    pub seed: u64,
    /// Tokens generated (stop sequence included, EOS excluded).
    pub generated_tokens: usize,
}

impl SamplesArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "samples";
    /// The samples, one human-eval sample line each.
    pub const SAMPLES_FILE: &'static str = "samples.jsonl";
    /// Parameters, counts and finish reasons of the generation run.
    pub const GENERATION_FILE: &'static str = "generation.json";

    /// The samples file of the artifact in `dir` (graders read it as any human-eval samples
    /// file, keeping fields they do not know).
    pub fn samples_path(dir: &Path) -> std::path::PathBuf {
        dir.join(Self::SAMPLES_FILE)
    }

    /// Writes `lines` and the run's `summary` into `dir`.
    pub fn write(
        dir: &Path,
        lines: &[SampleLine],
        summary: &impl Serialize,
    ) -> Result<(), JsonError> {
        write_jsonl(&Self::samples_path(dir), lines)?;
        write_json(&dir.join(Self::GENERATION_FILE), summary)
    }
}

/// The samples of completed tasks from earlier attempts of the same key, kept in the stage's
/// checkpoint directory so an interrupted generation resumes without regenerating them.
pub struct SamplesCheckpoint {
    path: std::path::PathBuf,
    num_samples: usize,
    lines: Vec<SampleLine>,
    done: std::collections::HashSet<String>,
    stats: pipeline_models::generate::GenerateStats,
}

impl SamplesCheckpoint {
    const FILE: &'static str = "samples.partial.jsonl";
    const STATS_FILE: &'static str = "samples.partial.stats.json";

    /// Reads what earlier attempts saved in `checkpoint_dir`; a task with fewer than
    /// `num_samples` lines, and anything unreadable, is ignored (regenerated).
    pub fn load(checkpoint_dir: &Path, num_samples: usize) -> Self {
        let path = checkpoint_dir.join(Self::FILE);
        let stats = std::fs::read_to_string(checkpoint_dir.join(Self::STATS_FILE))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let mut lines: Vec<SampleLine> = std::fs::read_to_string(&path)
            .map(|text| {
                text.lines()
                    .map_while(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut counts: std::collections::HashMap<String, usize> = Default::default();
        for l in &lines {
            *counts.entry(l.task_id.clone()).or_default() += 1;
        }
        let done: std::collections::HashSet<String> = counts
            .into_iter()
            .filter(|(_, n)| *n == num_samples)
            .map(|(t, _)| t)
            .collect();
        lines.retain(|l| done.contains(&l.task_id));
        Self {
            path,
            num_samples,
            lines,
            done,
            stats,
        }
    }

    /// Whether every sample of `task_id` is saved.
    pub fn is_done(&self, task_id: &str) -> bool {
        self.done.contains(task_id)
    }

    /// Tasks whose samples are saved.
    pub fn tasks_done(&self) -> usize {
        self.done.len()
    }

    /// The saved samples.
    pub fn lines(&self) -> &[SampleLine] {
        &self.lines
    }

    /// Generation statistics of the saved samples.
    pub fn stats(&self) -> &pipeline_models::generate::GenerateStats {
        &self.stats
    }

    /// The saved samples, taken.
    pub fn into_lines(self) -> Vec<SampleLine> {
        self.lines
    }

    /// Saves a finished chunk (every sample of its tasks) and the statistics so far. The file
    /// is rewritten atomically, so a torn write never leaves a half line before new ones.
    pub fn append(
        &mut self,
        lines: &[SampleLine],
        stats: &pipeline_models::generate::GenerateStats,
    ) -> miette::Result<()> {
        debug_assert!(lines.len().is_multiple_of(self.num_samples.max(1)));
        self.lines.extend_from_slice(lines);
        for l in lines {
            self.done.insert(l.task_id.clone());
        }
        let mut text = String::new();
        for l in &self.lines {
            text.push_str(&serde_json::to_string(l).map_err(|e| miette::miette!("{e}"))?);
            text.push('\n');
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| miette::miette!("cannot write {}: {e}", path.display())
        };
        pipeline_engine::atomic::write_atomic(&self.path, text.as_bytes(), false)
            .map_err(io(&self.path))?;
        self.stats = stats.clone();
        let stats_path = self.path.with_file_name(Self::STATS_FILE);
        let stats_text = serde_json::to_string(stats).map_err(|e| miette::miette!("{e}"))?;
        pipeline_engine::atomic::write_atomic(&stats_path, stats_text.as_bytes(), false)
            .map_err(io(&stats_path))
    }
}
