//! `lora-train`: trains LoRA adapters over a frozen (optionally quantized: QLoRA) base model
//! on tokenized data, with checkpoints that make an interrupted run resume exactly.
//!
//! Inputs: `model` (a `model` artifact), `tokens` (the tokenize stage's shards), optionally
//! `eval_tokens` (held-out shards, evaluated every `eval_every` steps and at the end).
//! Output (`adapter` artifact):
//!
//! * `adapter_config.json` + `adapter_model.safetensors`: the PEFT adapter;
//! * `metrics.jsonl`: one JSON object per optimizer step (`step`, `loss`, `lr`, `scale`,
//!   `grad_norm`) and per evaluation (`step`, `eval_loss`, `eval_tokens`); the per-step
//!   `tokens_per_s` stays in the checkpoint directory's copy, since it differs between runs;
//! * `loss_curve.svg`: training loss per step and, with `eval_tokens`, the held-out loss;
//! * `train.json`: [`TrainSummary`].
//!
//! Training state is checkpointed into the stage's checkpoint directory every
//! `checkpoint_every` steps and when the stage is cancelled; rerunning the same stage (same
//! key) continues from the newest checkpoint. A resumed CPU run ends with the same artifact,
//! byte for byte, as an uninterrupted one, dropout included: each step's dropout masks are
//! drawn from a stream the checkpointed trainer RNG picks.
//!
//! ```toml
//! [train]
//! kind = "lora-train"
//! inputs = { model = "base4", tokens = "tok", eval_tokens = "tok_eval" }
//! r = 16
//! alpha = 32
//! steps = 200
//! batch_size = 4
//! lr = 2e-4
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use miette::{miette, IntoDiagnostic};
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::arch::DecoderModel;
use pipeline_models::peft::{PeftAdapter, PeftConfig};
use pipeline_models::train::{
    head_logit_rows, AdamWConfig, ComputeDtype, GradScalerConfig, LossSum, LrSchedule,
    ScheduleKind, StepContext, TrainConfig, TrainModel, Trainer,
};
use pipeline_models::{CausalLm, LoraConfig};
use serde::{Deserialize, Serialize};

use super::model_artifact::{load_model, write_json, LoadedModel};
use crate::report::{svg, LossPoint};
use crate::tokenize::{pad_batch, Example, TokenShards};

/// The `lora-train` kind.
pub struct LoraTrainKind;

/// Where the stage computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The host.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with the `cuda` feature).
    Cuda,
}

impl DeviceKind {
    /// The candle device.
    pub fn device(self) -> miette::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => Device::new_cuda(0).map_err(|e| {
                miette!(help = "build with `--features cuda` on a machine with an NVIDIA GPU, or set device = \"cpu\"", "cannot open CUDA device 0: {e}")
            }),
        }
    }
}

fn d_r() -> usize {
    16
}
fn d_alpha() -> f64 {
    32.0
}
fn d_dropout() -> f64 {
    0.05
}
fn d_steps() -> u64 {
    100
}
fn d_batch() -> usize {
    4
}
fn d_lr() -> f64 {
    2e-4
}
fn d_schedule() -> ScheduleKind {
    ScheduleKind::Constant
}
fn d_one() -> usize {
    1
}
fn d_clip() -> Option<f64> {
    Some(0.3)
}
fn d_ckpt() -> u64 {
    50
}
fn d_max_len() -> usize {
    1024
}
fn d_true() -> bool {
    true
}

/// Parameters of [`LoraTrainKind`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTrainParams {
    /// LoRA rank.
    #[serde(default = "d_r")]
    pub r: usize,
    /// LoRA alpha (the update is scaled by `alpha / r`).
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Dropout on the adapters' input.
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Modules to adapt (PEFT matching). Default: every linear layer except `lm_head`.
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// Optimizer steps.
    #[serde(default = "d_steps")]
    pub steps: u64,
    /// Examples per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Schedule after warmup: constant, linear or cosine.
    #[serde(default = "d_schedule")]
    pub schedule: ScheduleKind,
    /// Warmup steps (default: 3% of `steps`, rounded up).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (QLoRA: 0.3); 0 disables clipping.
    #[serde(default = "d_clip")]
    pub clip: Option<f64>,
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Forward dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on CUDA).
    #[serde(default)]
    pub dtype: Option<ComputeDtype>,
    /// Dynamic loss scaling (for f16).
    #[serde(default)]
    pub loss_scaling: bool,
    /// Checkpoint every this many steps.
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: u64,
    /// Evaluate on `eval_tokens` every this many steps (always at the end).
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Reshuffle the micro-batches every epoch.
    #[serde(default = "d_true")]
    pub shuffle: bool,
    /// Truncate examples to this many tokens.
    #[serde(default = "d_max_len")]
    pub max_length: usize,
    /// cpu or cuda.
    #[serde(default)]
    pub device: DeviceKind,
    /// Training seed (LoRA init, data order, dropout); default: the experiment seed. Give
    /// several (`matrix.seed = [1, 2, 3]` with `seed = "${seed}"`) to measure seed variance;
    /// a numeric string is accepted for that reason.
    #[serde(default, deserialize_with = "seed_from_int_or_string")]
    pub seed: Option<u64>,
    /// Recompute each decoder layer's activations in the backward instead of keeping them
    /// (gradient checkpointing): far less memory (phi-1.5 at 2 x 512 on the CPU: 4.3 GiB instead
    /// of 22.6, `bench/phi15_memory.sh`) for one more forward pass per layer. Results are the
    /// same up to rounding.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl LoraTrainParams {
    /// The compute dtype: explicit, else f32 on CPU and bf16 on CUDA.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.dtype.unwrap_or(match self.device {
            DeviceKind::Cpu => ComputeDtype::F32,
            DeviceKind::Cuda => ComputeDtype::Bf16,
        })
    }

    /// The trainer configuration these parameters describe (`seed` is the experiment seed).
    pub fn train_config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            schedule: LrSchedule {
                kind: self.schedule,
                base_lr: self.lr,
                warmup_steps: self
                    .warmup_steps
                    .unwrap_or((self.steps as f64 * 0.03).ceil() as u64),
                total_steps: self.steps,
            },
            optimizer: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            grad_accum: self.grad_accum,
            max_grad_norm: self.clip.filter(|c| *c > 0.0),
            compute_dtype: self.compute_dtype(),
            grad_scaler: self.loss_scaling.then(GradScalerConfig::default),
            checkpoint_every: Some(self.checkpoint_every),
            keep_checkpoints: 2,
            eval_every: self.eval_every,
            seed,
            shuffle: self.shuffle,
        }
    }
}

/// `train.json`.
///
/// What varies between attempts (throughput, the step a resumed attempt started from) is kept
/// out of the file and recorded as stage metadata instead: an interrupted and resumed run
/// writes the same artifact, byte for byte, as an uninterrupted one, so stages downstream of a
/// rerun whose output did not change are not invalidated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimizer steps completed.
    pub steps: u64,
    /// Mean loss per target token of the last step.
    pub final_loss: f64,
    /// Mean training loss of the first step (of the whole run, from `metrics.jsonl`).
    pub first_loss: Option<f64>,
    /// Held-out loss at the end, when `eval_tokens` is connected.
    pub final_eval_loss: Option<f64>,
    /// Target tokens per second over the steps run in the final attempt (metadata only).
    #[serde(skip)]
    pub tokens_per_s: f64,
    /// Target (loss) tokens processed in the final attempt (metadata only).
    #[serde(skip)]
    pub train_tokens: u64,
    /// Training examples / micro-batches available.
    pub examples: usize,
    /// Micro-batches per epoch.
    pub batches: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Rough peak memory in bytes: base weights as stored + trainable parameters with their
    /// gradient and two AdamW moments (f32) + the logits the loss holds at once for the
    /// largest micro-batch (one 256-row block with the CPU's fused head, else every position;
    /// three copies: logits, log-softmax, gradient) + activations: about 38 hidden-size vectors
    /// per token per layer kept until the backward, in the compute dtype (with gradient
    /// checkpointing, two per layer plus one layer's 38). The 38 is fitted to measured peaks on
    /// the CPU (`bench/phi15_memory.sh`, which prints this estimate beside each): for phi-1.5
    /// at 2 x 256 and 2 x 512 the estimate is 4-7% above them without checkpointing and about
    /// a quarter below with it, where the process's fixed costs weigh more.
    pub peak_memory_estimate_bytes: u64,
    /// Step the final attempt started from, 0 unless resumed from a checkpoint (metadata only).
    #[serde(skip)]
    pub resumed_from_step: u64,
    /// Compute dtype.
    pub dtype: ComputeDtype,
    /// Device.
    pub device: DeviceKind,
}

/// One padded micro-batch on the training device.
pub struct LmBatch {
    ids: Tensor,
    attention: Tensor,
    loss_mask: Tensor,
    rows: usize,
    len: usize,
}

/// The LoRA-wrapped decoder as the trainer sees it.
pub struct LoraLm<'a> {
    /// The model; its LoRA variables are what gets trained.
    pub model: &'a DecoderModel,
    /// Target tokens seen in training (not evaluation) forwards, for throughput.
    pub train_tokens: std::cell::Cell<u64>,
}

impl TrainModel for LoraLm<'_> {
    type Batch = LmBatch;

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.model.trainable_vars()
    }

    fn loss(&self, batch: &LmBatch, ctx: &mut StepContext<'_>) -> candle_core::Result<LossSum> {
        self.model.set_training(ctx.train);
        if ctx.train {
            // Dropout masks from the trainer's checkpointed RNG: resumed runs stay bit-identical.
            self.model.set_dropout_stream(ctx.rng.next_u64_raw());
        }
        let (sum, tokens) =
            self.model
                .loss_sum(&batch.ids, &batch.attention, &batch.loss_mask, ctx.train)?;
        if ctx.train {
            self.train_tokens
                .set(self.train_tokens.get() + tokens as u64);
        }
        Ok(LossSum { sum, tokens })
    }
}

/// Opens a `tokens` artifact: the shard directory itself, or its only subdirectory holding an
/// `index.json`.
pub fn open_tokens(dir: &Path) -> miette::Result<TokenShards> {
    if dir.join("index.json").is_file() {
        return Ok(TokenShards::open(dir)?);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_diagnostic()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("index.json").is_file())
        .collect();
    match found.len() {
        1 => Ok(TokenShards::open(&found.remove(0))?),
        _ => Err(miette!(
            help = "connect the output of a `tokenize` stage",
            "`{}` is not a token-shard artifact (no index.json)",
            dir.display()
        )),
    }
}

/// Reads every example of `shards`, truncated to `max_length`, dropping those without loss
/// tokens, and cuts them into padded micro-batches of `batch_size` (in order; the trainer
/// shuffles micro-batches).
pub fn make_batches(
    shards: &TokenShards,
    batch_size: usize,
    max_length: usize,
    pad_id: u32,
    vocab_size: usize,
    device: &Device,
) -> miette::Result<(Vec<LmBatch>, usize)> {
    let mut examples: Vec<Example> = Vec::new();
    for ex in shards.iter() {
        let (mut ids, mut mask) = ex?;
        ids.truncate(max_length);
        mask.truncate(max_length);
        // Position 0 is never a target (nothing predicts it).
        if ids.len() < 2 || mask.iter().skip(1).all(|m| *m == 0) {
            continue;
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab_size) {
            return Err(miette!(
                help =
                    "tokenize with the model's own tokenizer (the model artifact's tokenizer.json)",
                "token id {bad} is outside the model's vocabulary of {vocab_size}"
            ));
        }
        examples.push((ids, mask));
    }
    let n = examples.len();
    let mut batches = Vec::new();
    for chunk in examples.chunks(batch_size.max(1)) {
        let (ids, mask, len) = pad_batch(chunk, pad_id);
        let rows = chunk.len();
        let attention: Vec<u8> = chunk
            .iter()
            .flat_map(|(i, _)| (0..len).map(move |p| u8::from(p < i.len())))
            .collect();
        batches.push(LmBatch {
            ids: Tensor::from_vec(ids, (rows, len), device).into_diagnostic()?,
            attention: Tensor::from_vec(attention, (rows, len), device).into_diagnostic()?,
            loss_mask: Tensor::from_vec(mask, (rows, len), device).into_diagnostic()?,
            rows,
            len,
        });
    }
    Ok((batches, n))
}

impl Stage for LoraTrainKind {
    type Params = LoraTrainParams;
    const KIND: &'static str = "lora-train";
    // 2: no timings in the artifact; the fused CPU kernels change the last bits of the numbers.
    // 4: LoRA projections and attention train as fused CPU ops (same maths, other rounding).
    // 5: the LM head and the cross-entropy fuse into one CPU op that scores only the target
    //    rows, in blocks (same maths, other rounding).
    // 6: the scaled loss is the first micro-batch's mean, as GradScaler scales it, not the sum
    //    (the same gradients after unscaling, other rounding; f16 skips far fewer steps).
    // 7: the artifact gains loss_curve.svg; train.json's memory estimate is recalibrated.
    const VERSION: &'static str = "7";
    const SUMMARY: &'static str =
        "train LoRA adapters (QLoRA over a quantized base) with resumable checkpoints";

    fn inputs() -> &'static [InputSlot] {
        &[
            InputSlot {
                name: "model",
                accepts: &["model"],
                required: true,
                many: false,
                doc: "the base model",
            },
            InputSlot {
                name: "tokens",
                accepts: &["tokens"],
                required: true,
                many: false,
                doc: "training token shards",
            },
            InputSlot {
                name: "eval_tokens",
                accepts: &["tokens"],
                required: false,
                many: false,
                doc: "held-out token shards for the evaluation loss",
            },
        ]
    }

    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "out",
            artifact: "adapter",
            doc: "PEFT adapter, metrics.jsonl, loss_curve.svg and train.json",
        }]
    }

    fn validate(p: &LoraTrainParams) -> Result<(), String> {
        if p.r == 0 {
            return Err("`r` must be at least 1".into());
        }
        if !(0.0..1.0).contains(&p.dropout) {
            return Err("`dropout` must be in [0, 1)".into());
        }
        if p.steps == 0 || p.batch_size == 0 || p.grad_accum == 0 || p.checkpoint_every == 0 {
            return Err(
                "`steps`, `batch_size`, `grad_accum` and `checkpoint_every` must be at least 1"
                    .into(),
            );
        }
        if p.eval_every == Some(0) {
            return Err("`eval_every` must be at least 1".into());
        }
        if !(p.lr.is_finite() && p.lr >= 0.0) {
            return Err("`lr` must be a finite number ≥ 0".into());
        }
        if p.max_length < 2 {
            return Err("`max_length` must be at least 2".into());
        }
        if p.target_modules.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "`target_modules` is empty; leave it out to adapt every linear layer".into(),
            );
        }
        Ok(())
    }

    fn needs_gpu(p: &LoraTrainParams) -> bool {
        p.device == DeviceKind::Cuda
    }

    fn uses_seed(p: &LoraTrainParams) -> bool {
        p.seed.is_none()
    }

    fn run(p: &LoraTrainParams, ctx: &mut StageContext) -> miette::Result<()> {
        train(p, ctx, &|_| false).map(|_| ())
    }
}

/// The whole stage: `stop_after(step)` is asked after every step and, when true, the run
/// checkpoints and stops with an "interrupted" error as if cancelled (tests use it to
/// interrupt at a chosen step; the stage itself passes `|_| false` and relies on
/// [`StageContext::is_cancelled`]).
pub fn train(
    p: &LoraTrainParams,
    ctx: &mut StageContext,
    stop_after: &dyn Fn(u64) -> bool,
) -> miette::Result<TrainSummary> {
    let device = p.device.device()?;
    let dtype = p.compute_dtype();
    let model_dir = ctx.input("model")?.to_path_buf();
    let info = super::model_artifact::ModelInfo::load(&model_dir)?;
    let target_modules: Vec<String> = match &p.target_modules {
        Some(t) => t.clone(),
        None => info
            .architecture
            .linear_module_names()
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let lora = LoraConfig {
        r: p.r,
        alpha: p.alpha,
        dropout: p.dropout,
        target_modules: target_modules.clone(),
    };
    let LoadedModel { model, info, .. } = load_model(
        &model_dir,
        &device,
        dtype.dtype(),
        Some((&lora, p.seed.unwrap_or(ctx.seed()))),
    )?;
    model.set_gradient_checkpointing(p.gradient_checkpointing);
    let vars = model.trainable_vars();
    if vars.is_empty() {
        return Err(miette!(
            help = "module names are e.g. q_proj, v_proj (Llama: also o_proj, gate_proj, up_proj, down_proj; Phi: dense, fc1, fc2)",
            "`target_modules` {target_modules:?} matches no layer of the model"
        ));
    }
    let trainable_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();

    let vocab = model.vocab_size();
    let pad = info.pad_id();
    let shards = open_tokens(ctx.input("tokens")?)?;
    let (train_batches, examples) =
        make_batches(&shards, p.batch_size, p.max_length, pad, vocab, &device)?;
    if train_batches.is_empty() {
        return Err(miette!(
            "the training tokens hold no example with loss tokens"
        ));
    }
    let eval_batches = match ctx.optional_input("eval_tokens") {
        Some(dir) => {
            make_batches(
                &open_tokens(dir)?,
                p.batch_size,
                p.max_length,
                pad,
                vocab,
                &device,
            )?
            .0
        }
        None => Vec::new(),
    };

    let lm = LoraLm {
        model: &model,
        train_tokens: std::cell::Cell::new(0),
    };
    let state_dir = ctx.checkpoint_dir().join("trainer");
    let mut trainer = Trainer::resume(
        &lm,
        p.train_config(p.seed.unwrap_or(ctx.seed())),
        &state_dir,
    )
    .into_diagnostic()?;
    let resumed_from = trainer.step();
    ctx.progress().start(p.steps, "steps");
    ctx.progress().set_position(resumed_from);
    let start = Instant::now();
    let mut last_loss = f64::NAN;
    // A resumed run starts exactly at a saved checkpoint; nothing needs saving before a step.
    let mut last_ckpt = Some(resumed_from);
    let mut last_eval = None;
    while trainer.step() < p.steps {
        if ctx.is_cancelled() {
            if last_ckpt != Some(trainer.step()) {
                trainer.save_checkpoint().into_diagnostic()?;
            }
            return Err(miette!(
                "stage `{}` was interrupted at step {}; rerun to resume",
                ctx.stage_name(),
                trainer.step()
            ));
        }
        let report = trainer.train_step(&train_batches).into_diagnostic()?;
        let step = trainer.step();
        last_loss = report.record.loss;
        if step.is_multiple_of(p.checkpoint_every) {
            trainer.save_checkpoint().into_diagnostic()?;
            last_ckpt = Some(step);
        }
        if !eval_batches.is_empty() && p.eval_every.is_some_and(|n| step.is_multiple_of(n)) {
            trainer.evaluate_and_log(&eval_batches).into_diagnostic()?;
            last_eval = Some(step);
        }
        ctx.progress().set_position(step);
        if stop_after(step) && step < p.steps {
            if last_ckpt != Some(step) {
                trainer.save_checkpoint().into_diagnostic()?;
            }
            return Err(miette!(
                "stage `{}` was interrupted at step {step}; rerun to resume",
                ctx.stage_name()
            ));
        }
    }
    let final_eval_loss = if eval_batches.is_empty() {
        None
    } else if last_eval == Some(trainer.step()) {
        Some(trainer.evaluate(&eval_batches).into_diagnostic()?.0)
    } else {
        Some(
            trainer
                .evaluate_and_log(&eval_batches)
                .into_diagnostic()?
                .eval_loss,
        )
    };
    let secs = start.elapsed().as_secs_f64().max(1e-9);

    let out = ctx.output_dir("out")?.to_path_buf();
    let peft = PeftConfig::lora(info.source.clone(), p.r, p.alpha, p.dropout, target_modules);
    PeftAdapter::from_vars(peft, trainer.vars())
        .into_diagnostic()?
        .save(&out)
        .into_diagnostic()?;
    let metrics_src = state_dir.join("metrics.jsonl");
    let metrics = std::fs::read_to_string(&metrics_src).into_diagnostic()?;
    std::fs::write(out.join("metrics.jsonl"), without_timings(&metrics)?).into_diagnostic()?;
    write_loss_curve(&out, &metrics)?;
    // The per-step throughput stays beside the checkpoints, out of the artifact (see
    // `TrainSummary`).
    let first_loss = first_step_loss(&metrics);
    let run_tokens = lm.train_tokens.get();
    if last_loss.is_nan() {
        // Resumed from a checkpoint at the final step: the last loss is in the metrics.
        last_loss = last_step_loss(&metrics).unwrap_or(f64::NAN);
    }
    let summary = TrainSummary {
        steps: trainer.step(),
        final_loss: last_loss,
        first_loss,
        final_eval_loss,
        tokens_per_s: run_tokens as f64 / secs,
        train_tokens: run_tokens,
        examples,
        batches: train_batches.len(),
        trainable_params,
        peak_memory_estimate_bytes: memory_estimate(
            &model_dir,
            &model,
            trainable_params,
            &train_batches,
            vocab,
        ),
        resumed_from_step: resumed_from,
        dtype: p.compute_dtype(),
        device: p.device,
    };
    write_json(&out.join("train.json"), &summary)?;
    ctx.set_metadata("final_loss", summary.final_loss);
    ctx.set_metadata("tokens_per_s", summary.tokens_per_s);
    ctx.set_metadata("train_tokens", summary.train_tokens);
    ctx.set_metadata("resumed_from_step", resumed_from);
    if let Some(e) = final_eval_loss {
        ctx.set_metadata("final_eval_loss", e);
    }
    Ok(summary)
}

/// `loss_curve.svg` in `out`, from the run's `metrics` (JSON Lines): training loss per step
/// and, when the stage evaluates, the held-out loss.
fn write_loss_curve(out: &Path, metrics: &str) -> miette::Result<()> {
    let curve = |field| -> Vec<LossPoint> {
        metric_records(metrics, field)
            .map(|(step, loss)| LossPoint { step, loss })
            .collect()
    };
    let (training, held_out) = (curve("loss"), curve("eval_loss"));
    let mut series: Vec<(&str, &[LossPoint])> = vec![("training", &training)];
    if !held_out.is_empty() {
        series.push(("held-out", &held_out));
    }
    if let Some(chart) = svg::loss_chart("loss per target token", &series) {
        std::fs::write(out.join("loss_curve.svg"), chart).into_diagnostic()?;
    }
    Ok(())
}

/// `metrics.jsonl` without the wall-clock fields (`tokens_per_s`), which differ between an
/// interrupted-and-resumed run and an uninterrupted one.
fn without_timings(metrics: &str) -> miette::Result<String> {
    let mut out = String::with_capacity(metrics.len());
    for line in metrics.lines().filter(|l| !l.trim().is_empty()) {
        let mut record: serde_json::Value = serde_json::from_str(line).into_diagnostic()?;
        if let Some(fields) = record.as_object_mut() {
            fields.remove("tokens_per_s");
        }
        out.push_str(&record.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// `(step, value)` of every record of `metrics` (JSON Lines) that has a numeric `field`:
/// `loss` for training steps, `eval_loss` for evaluations.
fn metric_records<'a>(metrics: &'a str, field: &'a str) -> impl Iterator<Item = (u64, f64)> + 'a {
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(move |v| Some((v.get("step")?.as_u64()?, v.get(field)?.as_f64()?)))
}

/// The loss of step 1 (the run's starting point, even when this attempt resumed).
fn first_step_loss(metrics: &str) -> Option<f64> {
    metric_records(metrics, "loss")
        .find(|(s, _)| *s == 1)
        .map(|(_, l)| l)
}

fn last_step_loss(metrics: &str) -> Option<f64> {
    metric_records(metrics, "loss").last().map(|(_, l)| l)
}

/// See [`TrainSummary::peak_memory_estimate_bytes`].
fn memory_estimate(
    model_dir: &Path,
    model: &DecoderModel,
    trainable: usize,
    batches: &[LmBatch],
    vocab: usize,
) -> u64 {
    let base: u64 = std::fs::read_dir(model_dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.ends_with(".gguf") || n.ends_with(".safetensors")
                })
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0);
    let (hidden, layers) = match model {
        DecoderModel::Llama(m) => (m.config().hidden_size, m.config().num_hidden_layers),
        DecoderModel::Phi(m) => (m.config().hidden_size, m.config().num_hidden_layers),
    };
    let positions = batches.iter().map(|b| b.rows * b.len).max().unwrap_or(0);
    let logit_rows = model
        .linears()
        .into_iter()
        .find(|(name, _)| name == "lm_head")
        .map_or(positions, |(_, head)| {
            head_logit_rows(head, model.device(), model.dtype(), positions)
        }) as u64;
    let act = model.dtype().size_in_bytes() as u64;
    // See `TrainSummary::peak_memory_estimate_bytes` for where the 38 comes from.
    const PER_LAYER: usize = 38;
    let vectors = if model.gradient_checkpointing() {
        2 * layers + PER_LAYER
    } else {
        PER_LAYER * layers
    };
    let activations = positions as u64 * (hidden * vectors) as u64 * act;
    base + 16 * trainable as u64 + logit_rows * vocab as u64 * 4 * 3 + activations
}

/// Accepts `seed = 3` and `seed = "3"` (matrix substitution produces strings).
fn seed_from_int_or_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(u64),
        Text(String),
    }
    match Option::<IntOrString>::deserialize(d)? {
        None => Ok(None),
        Some(IntOrString::Int(n)) => Ok(Some(n)),
        Some(IntOrString::Text(t)) => t.trim().parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("`seed` must be a non-negative integer, got {t:?}"))
        }),
    }
}
