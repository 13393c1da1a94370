//! `likelihood`: how likely a model (optionally with a LoRA adapter) finds every problem's
//! reference solution given the problem's prompt, exactly as generation puts the prompt.
//!
//! Pass@1 of a small model is a few percent, so a benchmark's few hundred tasks cannot tell
//! two fine-tunes apart by it; the likelihood of the reference solutions is a continuous score
//! of the same tasks. Per task: the summed negative log-likelihood of the solution's tokens,
//! their count, and bits per byte (`nll / ln 2 / UTF-8 bytes of the solution`), which does not
//! depend on the tokenizer.
//!
//! Inputs: `model` (a [`ModelArtifact`]), `problems` (a [`ProblemsArtifact`]; problems without
//! a reference solution are counted and skipped), `adapter` (optional, as for `generate`).
//!
//! What is scored: the prompt and the solution are tokenized in one piece, and the solution's
//! tokens are those that end past the prompt (the `tokenize` kind's rule, so a token that
//! straddles the boundary counts as solution). `prompt_style = "completion"`: the prompt as
//! generation gives it (HumanEval's without its trailing whitespace, which the solution gets
//! back in front), the solution its reference completion. `"instruct"`: the instruction
//! through the model's chat template, the solution the whole program after the opened fence.
//!
//! `template = { name = "instruction" }` (any `tokenize` template, [`TemplateSpec`]) replaces
//! the benchmark's prompt with a fine-tune's training format, so that a variant can be scored
//! in the format it was trained on as well as the benchmark's
//! ([`crate::evalsets::prompting::frame_in_template`]): the problem becomes a record whose
//! whole reference program (the problem's code, then the reference completion) is the
//! template's response, and the text is the template's rendering of it, exactly as `tokenize`
//! renders training records (without the end token it appends). Scored are still only the
//! tokens of the reference completion, the same text `"completion"` scores, so bits per byte
//! under every template and under `"completion"` divide by the same bytes; what differs is the
//! text before it:
//!
//! | framing | text before the scored completion (HumanEval) |
//! |---|---|
//! | `prompt_style = "completion"` | the signature and docstring |
//! | `template = { name = "code_snippet" }` | `### Code Snippet:\n`, the signature and docstring |
//! | `template = { name = "instruction" }` | `### Instruction:\n`, the signature and docstring, `\n\n### Response:\n`, the signature and docstring again |
//!
//! (The problem's code loses its leading blank lines under a template, as a training file's
//! first line follows the header directly.) The summary records the template, and the report
//! names the metric after it (`bits/byte (instruction template)`), so differently framed
//! scores are never pooled or compared. A `custom` template's response must end with `{solution}` (or `{output}` /
//! `{content}`, the whole program).
//!
//! Parameters: `prompt_style`, `template` (optional; with it, `prompt_style` must stay
//! `completion`), `device`, `dtype`, `batch_tokens` (most positions per forward).
//!
//! Output `scores`: a [`LikelihoodArtifact`].

use std::path::Path;

use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::artifact::{load_for_inference, LoadedModel};
use pipeline_models::device::DeviceChoice;
use pipeline_models::likelihood::{score_sequences, ScoreBatching};
use pipeline_models::train::{ComputeDtype, Example};
use serde::{Deserialize, Serialize};

use crate::artifacts::{
    AdapterArtifact, FilesArtifact, LikelihoodArtifact, LikelihoodSummary, ModelArtifact,
    ProblemsArtifact, TaskLikelihood,
};
use crate::evalsets::prompting::{frame_in_template, pose, PromptStyle};
use crate::evalsets::EvalProblem;
use crate::templates::{Template, TemplateSpec};
use crate::tokenize::{tokenize_example, TextTokenizer, TokenizeOptions};

/// Parameters of [`Likelihood`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LikelihoodParams {
    /// `completion` (the prompt as it is) or `instruct` (through the model's chat template).
    pub prompt_style: PromptStyle,
    /// A training template to frame every problem in instead of the benchmark's prompt (see the
    /// module docs). Left out of the canonical parameters when unset, so stages without it
    /// keep their keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateSpec>,
    /// `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// `f32`, `bf16` or `f16`.
    pub dtype: ComputeDtype,
    /// Most token positions (sequences x padded length) in one forward.
    pub batch_tokens: usize,
}

impl Default for LikelihoodParams {
    fn default() -> Self {
        Self {
            prompt_style: PromptStyle::Completion,
            template: None,
            device: DeviceChoice::Cpu,
            dtype: ComputeDtype::F32,
            batch_tokens: 4096,
        }
    }
}

/// The `likelihood` stage kind.
pub struct Likelihood;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "model",
        accepts: &[ModelArtifact::TYPE],
        required: true,
        many: false,
        doc: "model directory (weights, tokenizer.json, model.json)",
    },
    InputSlot {
        name: "problems",
        accepts: &[ProblemsArtifact::TYPE],
        required: true,
        many: false,
        doc: "problems.jsonl from an evalset stage; each problem's reference solution is scored",
    },
    InputSlot {
        name: "adapter",
        accepts: &[AdapterArtifact::TYPE, FilesArtifact::TYPE],
        required: false,
        many: false,
        doc: "a PEFT LoRA adapter to apply to the model (trained here, or downloaded)",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "scores",
    artifact: LikelihoodArtifact::TYPE,
    doc: "likelihood.jsonl (per task: nll, tokens, bytes, bits per byte) + summary.json",
}];

impl Stage for Likelihood {
    type Params = LikelihoodParams;
    const KIND: &'static str = "likelihood";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str =
        "score every problem's reference solution given its prompt: NLL and bits per byte";

    fn headline_metrics() -> &'static [&'static str] {
        &["mean_bits_per_byte"]
    }

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &LikelihoodParams) -> Result<(), String> {
        if p.batch_tokens == 0 {
            return Err("`batch_tokens` must be at least 1".into());
        }
        if let Some(spec) = &p.template {
            Template::from_spec(spec).map_err(|e| {
                let help = miette::Diagnostic::help(&e)
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                format!("`template`: {e}{help}")
            })?;
            if p.prompt_style != PromptStyle::Completion {
                return Err(format!(
                    "`template` replaces the benchmark's prompt, so `prompt_style = \"{}\"` \
                     has no effect with it; leave `prompt_style` out",
                    p.prompt_style.name()
                ));
            }
        }
        Ok(())
    }

    fn needs_gpu(p: &LikelihoodParams) -> bool {
        p.device == DeviceChoice::Cuda
    }

    fn run(p: &LikelihoodParams, ctx: &mut StageContext) -> miette::Result<()> {
        let model_dir = ctx.input("model")?.to_path_buf();
        let problems = ProblemsArtifact::read(ctx.input("problems")?)?;
        let adapter_dir = ctx.optional_input("adapter").map(Path::to_path_buf);
        let framed = frame(&problems, p, &model_dir)?;
        let device = p.device.open()?;
        ctx.progress().set_message("loading model");
        let LoadedModel {
            model,
            info,
            tokenizer_path,
        } = load_for_inference(&model_dir, adapter_dir.as_deref(), &device, p.dtype.dtype())
            .map_err(|e| {
                miette::miette!(
                    help = "the `model` input must be a model artifact, and `adapter` a PEFT \
                            LoRA adapter trained on it",
                    "cannot load the model from {}: {e}",
                    model_dir.display()
                )
            })?;
        let tokenizer = TextTokenizer::load(&tokenizer_path, None, None)?;

        let mut scored_tasks: Vec<ScoredTask> = Vec::new();
        let mut examples: Vec<Example> = Vec::new();
        let mut skipped = 0;
        for (problem, framed) in problems.iter().zip(framed) {
            let Some((context, solution)) = framed else {
                skipped += 1;
                continue;
            };
            let example = solution_example(&tokenizer, &context, &solution)?;
            scored_tasks.push(ScoredTask {
                task_id: problem.task_id.clone(),
                bytes: solution.len(),
                prompt_tokens: example.1.iter().filter(|&&m| m == 0).count(),
            });
            examples.push(example);
        }
        if examples.is_empty() {
            return Err(miette::miette!(
                help = "HumanEval and MBPP problems carry one; the replication prompts do not",
                "none of the {} problems has a reference solution to score",
                problems.len()
            ));
        }
        if let Some(task) = scored_tasks
            .iter()
            .zip(&examples)
            .find(|(_, (_, mask))| !mask.contains(&1))
            .map(|(t, _)| &t.task_id)
        {
            return Err(miette::miette!(
                "task {task}: its reference solution is empty, so there is nothing to score"
            ));
        }

        ctx.progress().start(examples.len() as u64, "tasks");
        ctx.progress().set_message("scoring");
        let progress = ctx.progress();
        let scores = score_sequences(
            &model,
            &examples,
            ScoreBatching {
                max_batch_tokens: p.batch_tokens,
                pad_id: info.pad_id(),
            },
            |n| progress.inc(n as u64),
        )
        .map_err(|e| miette::miette!("scoring failed: {e}"))?;
        ctx.check_cancelled()?;

        let rows: Vec<TaskLikelihood> = scored_tasks
            .into_iter()
            .zip(&scores)
            .map(|(task, s)| TaskLikelihood {
                task_id: task.task_id,
                nll: s.nll,
                tokens: s.tokens,
                bytes: task.bytes,
                bits_per_byte: bits_per_byte(s.nll, task.bytes),
                prompt_tokens: task.prompt_tokens,
            })
            .collect();
        if let Some(bad) = rows.iter().find(|r| !r.nll.is_finite()) {
            return Err(miette::miette!(
                help = "the model's weights or the adapter hold non-finite values; check the \
                        training stage's loss",
                "task {}: the negative log-likelihood is {}",
                bad.task_id,
                bad.nll
            ));
        }
        let total_nll: f64 = rows.iter().map(|r| r.nll).sum();
        let total_bytes: usize = rows.iter().map(|r| r.bytes).sum();
        let total_tokens: usize = rows.iter().map(|r| r.tokens).sum();
        let summary = LikelihoodSummary {
            prompt_style: match p.template {
                Some(_) => "template".to_string(),
                None => p.prompt_style.name().to_string(),
            },
            template: p.template.clone(),
            adapter: adapter_dir.is_some(),
            tasks: rows.len(),
            skipped_without_solution: skipped,
            mean_bits_per_byte: rows.iter().map(|r| r.bits_per_byte).sum::<f64>()
                / rows.len() as f64,
            pooled_bits_per_byte: bits_per_byte(total_nll, total_bytes),
            nats_per_token: total_nll / total_tokens.max(1) as f64,
            tokens: total_tokens,
        };
        LikelihoodArtifact::write(ctx.output_dir("scores")?, &rows, &summary)?;
        ctx.set_metadata("tasks", rows.len() as u64);
        ctx.set_metadata("skipped_without_solution", skipped as u64);
        ctx.set_metadata("mean_bits_per_byte", summary.mean_bits_per_byte);
        ctx.set_metadata("nats_per_token", summary.nats_per_token);
        ctx.set_metadata("tokens", total_tokens as u64);
        Ok(())
    }
}

/// A task whose reference solution is scored: its id, the solution's UTF-8 bytes and the
/// prompt's tokens.
struct ScoredTask {
    task_id: String,
    bytes: usize,
    prompt_tokens: usize,
}

/// Per problem, the text before its reference solution and the solution, framed by
/// `p.template` if set, else posed in `p.prompt_style`; `None` for a problem without a
/// reference solution.
fn frame(
    problems: &[EvalProblem],
    p: &LikelihoodParams,
    model_dir: &Path,
) -> miette::Result<Vec<Option<(String, String)>>> {
    if let Some(spec) = &p.template {
        let template = Template::from_spec(spec)?;
        return problems
            .iter()
            .map(|problem| {
                frame_in_template(&template, problem)
                    .map(|framed| framed.map(|f| (f.context, f.solution)))
            })
            .collect();
    }
    let posed = pose(problems, p.prompt_style, model_dir)?;
    Ok((0..problems.len())
        .map(|i| {
            posed
                .reference_answer(i)
                .map(|solution| (posed.asked[i].prompt.clone(), solution))
        })
        .collect())
}

/// `nll` nats over `bytes` bytes, in bits per byte.
fn bits_per_byte(nll: f64, bytes: usize) -> f64 {
    nll / std::f64::consts::LN_2 / bytes.max(1) as f64
}

/// The prompt and the solution tokenized in one piece by the `tokenize` kind's rule (mask 1
/// on the tokens that end past the prompt), without BOS, EOS or truncation.
fn solution_example(
    tokenizer: &TextTokenizer,
    prompt: &str,
    solution: &str,
) -> miette::Result<Example> {
    let opts = TokenizeOptions {
        add_bos: false,
        add_eos: false,
        max_length: usize::MAX,
        ..Default::default()
    };
    let example = tokenize_example(tokenizer, prompt, solution, &opts)?;
    Ok((example.ids, example.mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stage keys hash the parameters re-serialised: without a template they serialise as
    /// before the parameter existed, so existing likelihood stages keep their keys.
    #[test]
    fn an_unset_template_leaves_the_canonical_parameters_as_they_were() {
        let value = serde_json::to_value(LikelihoodParams::default()).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["batch_tokens", "device", "dtype", "prompt_style"]);
        let with: LikelihoodParams =
            serde_json::from_str(r#"{"template": {"name": "code_snippet"}}"#).unwrap();
        assert_eq!(
            serde_json::to_value(&with).unwrap()["template"]["name"],
            "code_snippet"
        );
    }
}
