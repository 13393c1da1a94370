//! A filter chain: a list of [`Step`]s run in the order written, each seeing only what the
//! earlier ones kept, each reporting separately. All indices returned refer to the original
//! input. This is what the `filter` stage kind runs; its steps are its manifest parameters.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::classifier::{LogisticRegression, TrainOptions, TrainReport};
use super::decontam::{
    decontaminate, decontaminate_by_ast, decontaminate_by_embedding, load_humaneval, load_mbpp,
    DecontamOptions, EvalItem,
};
use super::dedup::{exact_dedup, near_dedup, ExactDedupOptions, NearDedupOptions};
use super::embed::{EmbedOptions, MiniLmEmbedder};
use super::heuristic::{score_records, HeuristicOptions};
use super::learned::{learned_filter, train_quality_classifier};
use super::report::FilterReport;
use super::select::{keep_by_score, sample, KeepOptions, KeepRule, SampleOptions};
use super::{FilterError, Result};
use crate::records::FieldSelection;
use crate::similarity::ast::AstOptions;

/// How a scoring step keeps records: at most one of the three (default `threshold = 0.5`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HeuristicStep {
    /// Options of the parser-based scorer.
    pub scorer: HeuristicOptions,
    /// Keep records scoring at least this.
    pub threshold: Option<f64>,
    /// Keep the best `k` records.
    pub top_k: Option<usize>,
    /// Keep the best fraction in `(0, 1]`.
    pub top_fraction: Option<f64>,
}

/// The `learned` step: phi-1's MiniLM + logistic-regression scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LearnedStep {
    /// Keep records with P(high quality) at least this.
    pub threshold: Option<f64>,
    /// Keep the best `k` records.
    pub top_k: Option<usize>,
    /// Keep the best fraction in `(0, 1]`.
    pub top_fraction: Option<f64>,
    /// Classifier training (L2, iterations, held-out fraction, split seed).
    pub train: TrainOptions,
    /// MiniLM folder (or unpacked wheel root), when no `embedder` input is connected.
    pub model_dir: Option<PathBuf>,
    /// Tokens per text.
    pub max_len: usize,
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Field(s) of the `positive` / `negative` records to train on (default: `text_field`).
    pub label_text_field: Option<FieldSelection>,
}

impl Default for LearnedStep {
    fn default() -> Self {
        let e = EmbedOptions::default();
        Self {
            threshold: None,
            top_k: None,
            top_fraction: None,
            train: TrainOptions::default(),
            model_dir: None,
            max_len: e.max_len,
            batch_size: e.batch_size,
            label_text_field: None,
        }
    }
}

/// The `decontaminate_embedding` step: phi-1's embedding check, removing records whose MiniLM
/// embedding has cosine similarity at least `threshold` with an eval task's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingDecontamStep {
    /// Remove records with cosine at least this with some eval task.
    pub threshold: f64,
    /// MiniLM folder (or unpacked wheel root), when no `embedder` input is connected.
    pub model_dir: Option<PathBuf>,
    /// Tokens per text.
    pub max_len: usize,
    /// Texts per forward pass.
    pub batch_size: usize,
}

impl Default for EmbeddingDecontamStep {
    fn default() -> Self {
        let e = EmbedOptions::default();
        Self {
            threshold: 0.9,
            model_dir: None,
            max_len: e.max_len,
            batch_size: e.batch_size,
        }
    }
}

/// The `decontaminate_ast` step: removes records containing at least `threshold` of an eval
/// task's syntax subtrees, names and constants normalized
/// ([`crate::similarity::ast`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AstDecontamStep {
    /// Remove records whose AST match rate with some eval task is at least this.
    pub threshold: f64,
    /// Smallest subtree (named nodes) that counts.
    pub min_nodes: usize,
}

impl Default for AstDecontamStep {
    fn default() -> Self {
        Self {
            threshold: 0.8,
            min_nodes: AstOptions::default().min_nodes,
        }
    }
}

/// The `sample` step: `n` records drawn with the experiment seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleStep {
    /// How many records to keep (all when fewer).
    pub n: usize,
}

/// One filter step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Exact duplicates (blake3 of normalised text).
    ExactDedup(ExactDedupOptions),
    /// MinHash + LSH near duplicates.
    NearDedup(NearDedupOptions),
    /// n-gram overlap with the eval sets.
    Decontaminate(DecontamOptions),
    /// Embedding similarity to the eval sets.
    DecontaminateEmbedding(EmbeddingDecontamStep),
    /// Syntax-tree similarity to the eval sets.
    DecontaminateAst(AstDecontamStep),
    /// Parser-based quality score.
    Heuristic(HeuristicStep),
    /// Learned quality score.
    Learned(LearnedStep),
    /// Seeded uniform sample.
    Sample(SampleStep),
}

impl Step {
    /// The step's name as the manifest writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ExactDedup(_) => "exact_dedup",
            Self::NearDedup(_) => "near_dedup",
            Self::Decontaminate(_) => "decontaminate",
            Self::DecontaminateEmbedding(_) => "decontaminate_embedding",
            Self::DecontaminateAst(_) => "decontaminate_ast",
            Self::Heuristic(_) => "heuristic",
            Self::Learned(_) => "learned",
            Self::Sample(_) => "sample",
        }
    }

    /// Whether the step compares records with the eval sets.
    pub fn needs_eval(&self) -> bool {
        matches!(
            self,
            Self::Decontaminate(_) | Self::DecontaminateEmbedding(_) | Self::DecontaminateAst(_)
        )
    }

    /// Whether the step embeds texts with MiniLM, and the step's own model folder if it names
    /// one.
    pub fn embedder(&self) -> Option<Option<&Path>> {
        match self {
            Self::Learned(l) => Some(l.model_dir.as_deref()),
            Self::DecontaminateEmbedding(e) => Some(e.model_dir.as_deref()),
            _ => None,
        }
    }
}

/// The rule of a scoring step from its three optional settings (default `threshold = 0.5`).
pub fn keep_rule(
    threshold: Option<f64>,
    top_k: Option<usize>,
    top_fraction: Option<f64>,
) -> std::result::Result<KeepRule, String> {
    match (threshold, top_k, top_fraction) {
        (None, None, None) => Ok(KeepRule::Threshold(0.5)),
        (Some(t), None, None) => Ok(KeepRule::Threshold(t)),
        (None, Some(k), None) => Ok(KeepRule::TopK(k)),
        (None, None, Some(f)) if f > 0.0 && f <= 1.0 => Ok(KeepRule::TopFraction(f)),
        (None, None, Some(f)) => Err(format!("top_fraction must be in (0, 1], got {f}")),
        _ => Err("give at most one of `threshold`, `top_k`, `top_fraction`".into()),
    }
}

/// What the `learned` step trains on.
pub struct LearnedInputs {
    /// High-quality example texts.
    pub positives: Vec<String>,
    /// Low-quality example texts.
    pub negatives: Vec<String>,
}

/// The MiniLM model of the steps that embed (`learned`, `decontaminate_embedding`).
pub struct EmbedderSource {
    /// The MiniLM model folder.
    pub dir: PathBuf,
    /// Where to embed.
    pub device: candle_core::Device,
}

/// What a chain needs besides the records: the eval sets (`decontaminate`), the seed
/// (`sample`), the learned step's data, and a callback told the name of each step as it
/// starts (progress; returning an error stops the chain, e.g. on cancellation).
pub struct ChainInputs<'a> {
    /// Eval tasks to decontaminate against.
    pub eval: &'a [EvalItem],
    /// Seed of the `sample` step.
    pub seed: u64,
    /// Data of the `learned` step, loaded by the caller when the chain has one.
    pub learned: Option<LearnedInputs>,
    /// The embedding model, when a step embeds.
    pub embedder: Option<EmbedderSource>,
    /// Called before each step with a short description.
    pub on_step: &'a mut dyn FnMut(&str) -> Result<()>,
}

/// What a chain produced.
pub struct ChainOutcome {
    /// Indices into the original input of the records that survived every step, ascending.
    pub kept: Vec<usize>,
    /// One report per step, in order.
    pub reports: Vec<FilterReport>,
    /// The classifier a `learned` step trained, with its training report.
    pub classifier: Option<(LogisticRegression, TrainReport)>,
}

/// Runs `steps` over `records` (`(id, text)` pairs).
pub fn run_steps(
    records: &[(String, String)],
    steps: &[Step],
    inputs: &mut ChainInputs<'_>,
) -> Result<ChainOutcome> {
    let mut alive: Vec<usize> = (0..records.len()).collect();
    let mut reports = Vec::with_capacity(steps.len());
    let mut classifier = None;
    for step in steps {
        (inputs.on_step)(step.name())?;
        let view: Vec<&(String, String)> = alive.iter().map(|&i| &records[i]).collect();
        let (local, report) = match step {
            Step::ExactDedup(o) => exact_dedup(&view, o),
            Step::NearDedup(o) => near_dedup(&view, o)?,
            Step::Decontaminate(_)
            | Step::DecontaminateEmbedding(_)
            | Step::DecontaminateAst(_)
                if inputs.eval.is_empty() =>
            {
                return Err(FilterError::InvalidOptions(format!(
                    "the `{}` step has no eval sets",
                    step.name()
                )));
            }
            Step::Decontaminate(o) => decontaminate(&view, inputs.eval, o)?,
            Step::DecontaminateAst(a) => decontaminate_by_ast(
                &view,
                inputs.eval,
                a.threshold,
                &AstOptions {
                    min_nodes: a.min_nodes,
                },
            )?,
            Step::DecontaminateEmbedding(e) => {
                let source = inputs.embedder.as_ref().ok_or_else(no_embedder)?;
                (inputs.on_step)("loading MiniLM")?;
                let embedder = load_embedder(source, e.max_len, e.batch_size)?;
                (inputs.on_step)("embedding")?;
                let texts: Vec<&str> = view.iter().map(|r| r.1.as_str()).collect();
                let record_emb = embedder.embed(&texts)?;
                let eval_texts: Vec<&str> = inputs.eval.iter().map(|e| e.text.as_str()).collect();
                let eval_emb = embedder.embed(&eval_texts)?;
                decontaminate_by_embedding(
                    &view,
                    &record_emb,
                    inputs.eval,
                    &eval_emb,
                    e.threshold as f32,
                )?
            }
            Step::Heuristic(h) => {
                let scores: Vec<f64> = score_records(&view, &h.scorer)?
                    .iter()
                    .map(|s| s.score)
                    .collect();
                let keep = KeepOptions {
                    rule: keep_rule(h.threshold, h.top_k, h.top_fraction)
                        .map_err(FilterError::InvalidOptions)?,
                    histogram_bins: h.scorer.histogram_bins.max(1),
                    ..KeepOptions::default()
                };
                let (kept, mut report) = keep_by_score(&view, &scores, &keep)?;
                report.filter = "heuristic_score".into();
                let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
                report.extra.insert("mean_score".into(), mean);
                (kept, report)
            }
            Step::Learned(l) => {
                let data = inputs.learned.as_ref().ok_or_else(|| {
                    FilterError::InvalidOptions(
                        "the `learned` step has no labelled examples".into(),
                    )
                })?;
                let source = inputs.embedder.as_ref().ok_or_else(no_embedder)?;
                let (kept, report, trained) = run_learned(l, data, source, &view, inputs.on_step)?;
                classifier = Some(trained);
                (kept, report)
            }
            Step::Sample(s) => sample(
                &view,
                &SampleOptions {
                    n: s.n,
                    seed: inputs.seed,
                },
            ),
        };
        alive = local.into_iter().map(|j| alive[j]).collect();
        reports.push(report);
    }
    Ok(ChainOutcome {
        kept: alive,
        reports,
        classifier,
    })
}

fn no_embedder() -> FilterError {
    FilterError::Model("a step embeds texts but the chain has no embedding model".into())
}

fn load_embedder(
    source: &EmbedderSource,
    max_len: usize,
    batch_size: usize,
) -> Result<MiniLmEmbedder> {
    MiniLmEmbedder::load(
        &EmbedOptions {
            model_dir: Some(source.dir.clone()),
            max_len,
            batch_size,
        },
        &source.device,
    )
}

/// phi-1's learned scorer: train the classifier on the labelled examples, score the view,
/// keep by the step's rule. The report gains the classifier's accuracies.
fn run_learned(
    l: &LearnedStep,
    data: &LearnedInputs,
    source: &EmbedderSource,
    view: &[&(String, String)],
    on_step: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<(Vec<usize>, FilterReport, (LogisticRegression, TrainReport))> {
    on_step("loading MiniLM")?;
    let embedder = load_embedder(source, l.max_len, l.batch_size)?;
    on_step("training classifier")?;
    let pos: Vec<&str> = data.positives.iter().map(String::as_str).collect();
    let neg: Vec<&str> = data.negatives.iter().map(String::as_str).collect();
    let (classifier, train) = train_quality_classifier(&embedder, &pos, &neg, &l.train)?;
    on_step("scoring")?;
    let keep = KeepOptions {
        rule: keep_rule(l.threshold, l.top_k, l.top_fraction)
            .map_err(FilterError::InvalidOptions)?,
        ..KeepOptions::default()
    };
    let (kept, _scores, mut report) = learned_filter(&embedder, &classifier, view, &keep)?;
    for (k, v) in [
        ("test_accuracy", train.test_accuracy),
        ("train_accuracy", train.train_accuracy),
        ("test_majority_baseline", train.test_majority_baseline),
        ("train_n", train.train_n as f64),
        ("test_n", train.test_n as f64),
    ] {
        report.extra.insert(k.into(), v);
    }
    Ok((kept, report, (classifier, train)))
}

/// Loads the standard eval sets from a shared data folder: HumanEval
/// (`humaneval/HumanEval.jsonl.gz`) and all of MBPP (`mbpp/mbpp.jsonl`), 164 + 974 tasks.
pub fn load_eval_sets(data_dir: &Path) -> Result<Vec<EvalItem>> {
    let mut items = load_humaneval(&data_dir.join("humaneval/HumanEval.jsonl.gz"))?;
    items.extend(load_mbpp(&data_dir.join("mbpp/mbpp.jsonl"))?);
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\"\"\"Math helpers.\"\"\"\n\n\ndef square(x):\n    \"\"\"Return x squared.\"\"\"\n    # Multiplication is exact for ints.\n    return x * x\n\n\ndef cube(x):\n    \"\"\"Return x cubed.\"\"\"\n    return x * x * x\n";

    fn steps(json: serde_json::Value) -> Vec<Step> {
        serde_json::from_value(json).unwrap()
    }

    fn run(recs: &[(String, String)], eval: &[EvalItem], steps: &[Step]) -> ChainOutcome {
        let mut started = Vec::new();
        let mut on_step = |name: &str| {
            started.push(name.to_string());
            Ok(())
        };
        let out = run_steps(
            recs,
            steps,
            &mut ChainInputs {
                eval,
                seed: 3,
                learned: None,
                embedder: None,
                on_step: &mut on_step,
            },
        )
        .unwrap();
        assert_eq!(started.len(), steps.len());
        out
    }

    #[test]
    fn chain_maps_indices_back_and_reports_each_step() {
        let leak = "def add_numbers(first, second):\n    \"\"\"Add the first and the second number together and return their sum.\"\"\"\n    return first + second\n";
        let eval = vec![EvalItem {
            task_id: "T/1".into(),
            text: leak.into(),
        }];
        let recs: Vec<(String, String)> = vec![
            ("bad".into(), "x = = 1".into()),
            ("good".into(), GOOD.into()),
            ("dup".into(), GOOD.replace('\n', "\r\n")),
            ("leak".into(), format!("{GOOD}\n{leak}")),
            ("good2".into(), GOOD.replace("square", "sq").replace("cube", "cb") + "\n\ndef other(y):\n    \"\"\"Something else entirely, with different words.\"\"\"\n    return [y, y + 1, y + 2]\n"),
        ];
        let all = steps(serde_json::json!([
            {"step": "exact_dedup"},
            {"step": "near_dedup"},
            {"step": "decontaminate"},
            {"step": "heuristic"},
        ]));
        let out = run(&recs, &eval, &all);
        let names: Vec<&str> = out.reports.iter().map(|r| r.filter.as_str()).collect();
        assert_eq!(
            names,
            [
                "exact_dedup",
                "near_dedup",
                "decontaminate",
                "heuristic_score"
            ]
        );
        assert_eq!(out.reports[0].removed[0].id, "dup");
        assert_eq!(out.reports[2].removed[0].id, "leak");
        assert_eq!(out.reports[3].removed[0].id, "bad");
        let histogram = out.reports[3].histogram.as_ref().unwrap();
        assert_eq!(histogram.counts.iter().sum::<usize>(), 3);
        assert_eq!(out.kept, vec![1, 4], "{:#?}", out.reports);
        let some = steps(serde_json::json!([
            {"step": "exact_dedup"},
            {"step": "heuristic"},
            {"step": "sample", "n": 1},
        ]));
        let out = run(&recs, &[], &some);
        assert_eq!(out.reports.len(), 3);
        assert_eq!(out.kept.len(), 1);
    }

    #[test]
    fn decontamination_without_eval_sets_is_an_error() {
        let recs = vec![("a".to_string(), GOOD.to_string())];
        let err = run_steps(
            &recs,
            &steps(serde_json::json!([{"step": "decontaminate"}])),
            &mut ChainInputs {
                eval: &[],
                seed: 0,
                learned: None,
                embedder: None,
                on_step: &mut |_| Ok(()),
            },
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("no eval sets"), "{err}");
    }
}
