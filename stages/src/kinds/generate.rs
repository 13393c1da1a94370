//! `generate`: sample completions for every problem from a model (optionally with a LoRA
//! adapter applied).
//!
//! Inputs:
//! * `model` (a [`ModelArtifact`]): the weights, `tokenizer.json`, and `model.json`, whose
//!   `eos_token_ids` end a sample and whose padding id pads batches.
//! * `problems` (a [`ProblemsArtifact`]).
//! * `adapter` (an [`AdapterArtifact`], or a [`FilesArtifact`] from a `download` of an adapter
//!   trained elsewhere; optional): a PEFT LoRA directory (`adapter_config.json` with `r`,
//!   `lora_alpha` and `target_modules` as a list, and `adapter_model.safetensors`) at its root.
//!
//! Parameters: `max_new_tokens`, `temperature` (0 = greedy), `top_p`, `top_k`,
//! `num_samples`, `batch_size` (most sequences decoded together), `prefill_chunk`,
//! `checkpoint_every` (problems per resumable chunk), `device` (`cpu` | `cuda`), `dtype`
//! (`f32` | `bf16` | `f16`), `kv_cache_dtype` (unset: `dtype`; `f16` halves the cache's
//! memory, inexactly), `prompt_style` (`completion`: the prompt as it is; `instruct`: an
//! instruction through the model's chat template, see [`PromptStyle`]). Sample `j` of task `t` is seeded from the experiment seed, `t`
//! and `j`, so results do not depend on batching or on resuming.
//!
//! Output `samples`: a [`SamplesArtifact`] (human-eval sample lines grouped by task in problem
//! order, and `generation.json` with parameters, counts and finish reasons).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::artifact::{load_for_generation, LoadedModel};
use pipeline_models::device::DeviceChoice;
use pipeline_models::generate::{
    generate_batch_with_progress, GenerateConfig, GenerateStats, SamplingParams,
};
use pipeline_models::train::ComputeDtype;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::artifacts::samples::SamplesCheckpoint;
use crate::artifacts::{
    AdapterArtifact, FilesArtifact, ModelArtifact, ProblemsArtifact, SampleLine, SamplesArtifact,
};
use crate::evalsets::generation_requests;
use crate::evalsets::prompting::{pose, Posed, PromptStyle};
use crate::python::sanitize::sanitize;

/// Parameters of [`Generate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateParams {
    /// Most tokens generated per sample.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass (None keeps all tokens).
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (None keeps all).
    pub top_k: Option<usize>,
    /// Samples per problem (pass@k needs at least k).
    pub num_samples: usize,
    /// Most sequences (problem x sample rows) decoded together.
    pub batch_size: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Problems generated between checkpoints (and cancellation checks).
    pub checkpoint_every: usize,
    /// `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// `f32`, `bf16` or `f16`.
    pub dtype: ComputeDtype,
    /// `completion` (the prompt as it is) or `instruct` (through the model's chat template).
    pub prompt_style: PromptStyle,
    /// The dtype of the KV cache: unset keeps `dtype` (exact); `f16` halves the cache, which
    /// at large batches is most of generation's memory, rounding keys and values to 11
    /// significant bits (as llama.cpp's default cache does; logits move by about 1e-3 of the
    /// largest, measured on SmolLM2). Unset is left out of the stage's key, so stages from
    /// before this parameter stay cached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<ComputeDtype>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            num_samples: 1,
            batch_size: 16,
            prefill_chunk: 128,
            checkpoint_every: 16,
            device: DeviceChoice::Cpu,
            dtype: ComputeDtype::F32,
            prompt_style: PromptStyle::Completion,
            kv_cache_dtype: None,
        }
    }
}

impl GenerateParams {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// Errors of the `generate` kind.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum GenerateKindError {
    /// Loading the model failed.
    #[error("cannot load the model from {path}: {message}")]
    Load {
        /// Model directory.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer {path}: {message}")]
    #[diagnostic(help("the model artifact needs a Hugging Face `tokenizer.json`"))]
    Tokenizer {
        /// tokenizer.json path.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// No end-of-sequence token is known.
    #[error("no end-of-sequence token: `model.json` of {} lists no `eos_token_ids`", .0.display())]
    #[diagnostic(help(
        "name the tokens that end a generation with `extra_eos_tokens` on the `model` stage"
    ))]
    NoEos(PathBuf),
    /// A problem with the adapter.
    #[error("adapter {path}: {message}")]
    #[diagnostic(help("the adapter must be a PEFT LoRA directory trained on this base model"))]
    Adapter {
        /// Adapter directory or file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// Generation failed.
    #[error("generation failed: {0}")]
    Generate(String),
}

/// The `generate` stage kind.
pub struct Generate;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "model",
        accepts: &[ModelArtifact::TYPE],
        required: true,
        many: false,
        doc: "model directory (model.gguf or config.json + safetensors, tokenizer.json)",
    },
    InputSlot {
        name: "problems",
        accepts: &[ProblemsArtifact::TYPE],
        required: true,
        many: false,
        doc: "problems.jsonl from an evalset stage",
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
    name: "samples",
    artifact: SamplesArtifact::TYPE,
    doc: "samples.jsonl (human-eval samples) + generation.json (stats)",
}];

impl Stage for Generate {
    type Params = GenerateParams;
    const KIND: &'static str = "generate";
    // 2: no timings in the artifact; the fused CPU kernels change the last bits of the numbers.
    // 4: end-of-sequence and padding ids come from the model artifact's `model.json` (so the
    //    `model` stage's `extra_eos_tokens` apply), not from a hard-coded list of end tokens.
    // 5: every sample carries the sanitized program that is graded beside its raw completion;
    //    `prompt_style` (completion | instruct) is a parameter.
    // 6: on the CPU in f32, quantized weights multiply through the packed kernels (the same
    //    values, added in another order: the last bits of the logits change).
    // 7: on the CPU, attention over the KV cache is one fused pass (`fused::cached_attention`;
    //    the same arithmetic in another order) and the packed kernels sum blocks in two
    //    accumulators: the last bits of the logits change again.
    const VERSION: &'static str = "7";
    const SUMMARY: &'static str =
        "sample completions of every problem from a model (+ optional LoRA adapter)";

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &GenerateParams) -> Result<(), String> {
        p.sampling().validate().map_err(|e| e.to_string())?;
        for (name, v) in [
            ("max_new_tokens", p.max_new_tokens),
            ("num_samples", p.num_samples),
            ("batch_size", p.batch_size),
            ("prefill_chunk", p.prefill_chunk),
            ("checkpoint_every", p.checkpoint_every),
        ] {
            if v == 0 {
                return Err(format!("`{name}` must be at least 1"));
            }
        }
        if p.num_samples > 1 && p.sampling().is_greedy() {
            return Err(format!(
                "num_samples = {} with greedy decoding gives identical samples; set `temperature` > 0",
                p.num_samples
            ));
        }
        Ok(())
    }

    fn needs_gpu(p: &GenerateParams) -> bool {
        p.device == DeviceChoice::Cuda
    }

    fn uses_seed(_: &GenerateParams) -> bool {
        true
    }

    fn run(p: &GenerateParams, ctx: &mut StageContext) -> miette::Result<()> {
        let model_dir = ctx.input("model")?.to_path_buf();
        let problems = ProblemsArtifact::read(ctx.input("problems")?)?;
        let adapter_dir = ctx.optional_input("adapter").map(Path::to_path_buf);
        if let Some(dir) = &adapter_dir {
            // A downloaded `files` artifact can hold anything; say what is missing before
            // loading the model.
            if !dir.join(pipeline_models::peft::CONFIG_FILE).is_file() {
                return Err(GenerateKindError::Adapter {
                    path: dir.clone(),
                    message: "no adapter_config.json at the root of the `adapter` input (a \
                              download must fetch the adapter's adapter_config.json and \
                              adapter_model.safetensors)"
                        .into(),
                }
                .into());
            }
        }
        let device = p.device.open()?;
        ctx.progress().set_message("loading model");
        let LoadedModel {
            model,
            info,
            tokenizer_path,
        } = load_for_generation(&model_dir, adapter_dir.as_deref(), &device, p.dtype.dtype())
            .map_err(|e| GenerateKindError::Load {
                path: model_dir.clone(),
                message: e.to_string(),
            })?;
        if info.eos_token_ids.is_empty() {
            return Err(GenerateKindError::NoEos(model_dir).into());
        }
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| GenerateKindError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;

        // What the model is asked, and the code its answer continues (the prompt's signature
        // in completion style, the opened fence in instruct style).
        let Posed {
            asked,
            answer_prefixes,
            ..
        } = pose(&problems, p.prompt_style, &model_dir)?;
        let seed = ctx.seed();
        let requests = generation_requests(&asked, seed, |text| {
            tokenizer
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| GenerateKindError::Tokenizer {
                    path: tokenizer_path.clone(),
                    message: format!("cannot encode a prompt: {e}"),
                })
        })?;
        let config = GenerateConfig {
            max_new_tokens: p.max_new_tokens,
            sampling: p.sampling(),
            num_samples: p.num_samples,
            eos_token_ids: info.eos_token_ids.clone(),
            pad_token_id: info.pad_id(),
            max_batch_rows: p.batch_size,
            prefill_chunk: p.prefill_chunk,
            use_kv_cache: true,
            kv_cache_dtype: p.kv_cache_dtype.map(ComputeDtype::dtype),
        };
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();

        // Completed chunks survive interruption in the checkpoint dir (same key = same
        // params, inputs and seed, and samples are seeded per task, so reuse is exact).
        let mut checkpoint = SamplesCheckpoint::load(ctx.checkpoint_dir(), p.num_samples);
        let resumed = checkpoint.tasks_done();
        ctx.progress()
            .start((problems.len() * p.num_samples) as u64, "samples");
        ctx.progress().set_position(checkpoint.lines().len() as u64);
        ctx.progress().set_message("generating");
        let mut stats: GenerateStats = checkpoint.stats().clone();
        let todo: Vec<usize> = (0..problems.len())
            .filter(|&i| !checkpoint.is_done(&problems[i].task_id))
            .collect();
        for chunk in todo.chunks(p.checkpoint_every) {
            ctx.check_cancelled()?;
            let reqs: Vec<_> = chunk.iter().map(|&i| requests[i].clone()).collect();
            let progress = ctx.progress();
            let out = generate_batch_with_progress(&model, &reqs, &config, decode, |_, _, _| {
                progress.inc(1)
            })
            .map_err(|e| GenerateKindError::Generate(e.to_string()))?;
            let mut lines = Vec::with_capacity(chunk.len() * p.num_samples);
            for (&i, samples) in chunk.iter().zip(&out.completions) {
                for (j, c) in samples.iter().enumerate() {
                    let problem = &problems[i];
                    lines.push(SampleLine {
                        task_id: problem.task_id.clone(),
                        program: sanitize(
                            &format!("{}{}", answer_prefixes[i], c.text),
                            &problem.entry_point,
                            &problem.test,
                        ),
                        completion: c.text.clone(),
                        sample_index: j,
                        finish_reason: c.finish_reason.name().to_string(),
                        seed: c.seed,
                        generated_tokens: c.token_ids.len(),
                    });
                }
            }
            stats.add(&out.stats);
            checkpoint.append(&lines, &stats)?;
        }
        ctx.check_cancelled()?;

        // Final order is problem order whatever order the chunks finished in.
        let order: HashMap<&str, usize> = problems
            .iter()
            .enumerate()
            .map(|(i, p)| (p.task_id.as_str(), i))
            .collect();
        let mut lines = checkpoint.into_lines();
        lines.sort_by_key(|l| {
            (
                order.get(l.task_id.as_str()).copied().unwrap_or(usize::MAX),
                l.sample_index,
            )
        });
        let mut finish: BTreeMap<String, u64> = BTreeMap::new();
        for l in &lines {
            *finish.entry(l.finish_reason.clone()).or_default() += 1;
        }
        // Timings, and how much a resumed attempt had left, vary between attempts: they are
        // metadata, not part of the artifact, so a rerun that generates the same samples
        // writes the same bytes.
        let summary = serde_json::json!({
            "params": p,
            "seed": seed,
            "adapter": adapter_dir.is_some(),
            "model_format": if model_dir.join(pipeline_models::artifact::GGUF_FILE).is_file() { "gguf" } else { "safetensors" },
            "eos_token_ids": info.eos_token_ids,
            "problems": problems.len(),
            "samples": lines.len(),
            "finish_reasons": finish,
            "generated_tokens": lines.iter().map(|l| l.generated_tokens as u64).sum::<u64>(),
        });
        SamplesArtifact::write(ctx.output_dir("samples")?, &lines, &summary)?;
        ctx.set_metadata("samples", lines.len() as u64);
        ctx.set_metadata("problems", problems.len() as u64);
        ctx.set_metadata("generated_tokens", stats.generated_tokens as u64);
        ctx.set_metadata("decode_tokens_per_sec", stats.decode_tokens_per_second());
        ctx.set_metadata("prefill_secs", stats.prefill_secs);
        ctx.set_metadata("decode_secs", stats.decode_secs);
        ctx.set_metadata("prompt_tokens", stats.prompt_tokens as u64);
        if resumed > 0 {
            ctx.set_metadata("resumed_problems", resumed as u64);
        }
        Ok(())
    }
}
