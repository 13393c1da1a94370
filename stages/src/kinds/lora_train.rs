//! `lora-train`: trains LoRA adapters over a frozen (optionally quantized: QLoRA) base model
//! on tokenized data, with checkpoints that make an interrupted run resume exactly.
//!
//! Inputs: `model` (a [`ModelArtifact`]), `tokens` (a [`TokensArtifact`]), optionally
//! `eval_tokens` (held-out shards, evaluated every `eval_every` steps and at the end).
//! Output: an [`AdapterArtifact`] (the PEFT adapter, metrics, loss curve and [`TrainSummary`]).
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

use std::time::Instant;

use miette::{miette, IntoDiagnostic};
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::artifact::{load_model, Adapters, LoadedModel, QuantizedWeights};
use pipeline_models::device::DeviceChoice;
use pipeline_models::peft::{PeftAdapter, PeftConfig};
use pipeline_models::train::{
    make_batches, training_peak_estimate, AdamWConfig, Batches, ComputeDtype, GradScalerConfig,
    LoraLm, LrSchedule, Metrics, RunEnd, ScheduleKind, TrainConfig, Trainer,
};
use pipeline_models::{CausalLm, LoraConfig};
use serde::{Deserialize, Serialize};

use crate::artifacts::{AdapterArtifact, ModelArtifact, TokensArtifact, TrainSummary};

/// The `lora-train` kind.
pub struct LoraTrainKind;

/// Parameters of [`LoraTrainKind`].
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoraTrainParams {
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha (the update is scaled by `alpha / r`).
    pub alpha: f64,
    /// Dropout on the adapters' input.
    pub dropout: f64,
    /// Modules to adapt (PEFT matching). Default: every linear layer except `lm_head`.
    pub target_modules: Option<Vec<String>>,
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after warmup: constant, linear or cosine.
    pub schedule: ScheduleKind,
    /// Warmup steps (default: 3% of `steps`, rounded up).
    pub warmup_steps: Option<u64>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (QLoRA: 0.3); 0 disables clipping.
    pub clip: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Forward dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on CUDA).
    pub dtype: Option<ComputeDtype>,
    /// Dynamic loss scaling (for f16).
    pub loss_scaling: bool,
    /// Checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// Evaluate on `eval_tokens` every this many steps (always at the end).
    pub eval_every: Option<u64>,
    /// Reshuffle the micro-batches every epoch.
    pub shuffle: bool,
    /// Truncate examples to this many tokens.
    pub max_length: usize,
    /// cpu or cuda.
    pub device: DeviceChoice,
    /// Training seed (LoRA init, data order, dropout); default: the experiment seed. Give
    /// several (`matrix.seed = [1, 2, 3]` with `seed = "${seed}"`) to measure seed variance;
    /// a numeric string is accepted for that reason.
    #[serde(deserialize_with = "seed_from_int_or_string")]
    pub seed: Option<u64>,
    /// Recompute each decoder layer's activations in the backward instead of keeping them
    /// (gradient checkpointing): far less memory (phi-1.5 at 2 x 512 on the CPU: 4.3 GiB instead
    /// of 22.6, `bench/phi15_memory.sh`) for one more forward pass per layer. Results are the
    /// same up to rounding.
    pub gradient_checkpointing: bool,
}

impl Default for LoraTrainParams {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: None,
            steps: 100,
            batch_size: 4,
            lr: 2e-4,
            schedule: ScheduleKind::Constant,
            warmup_steps: None,
            grad_accum: 1,
            clip: Some(0.3),
            weight_decay: 0.0,
            dtype: None,
            loss_scaling: false,
            checkpoint_every: 50,
            eval_every: None,
            shuffle: true,
            max_length: 1024,
            device: DeviceChoice::Cpu,
            seed: None,
            gradient_checkpointing: false,
        }
    }
}

impl LoraTrainParams {
    /// The compute dtype: explicit, else f32 on CPU and bf16 on CUDA.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.dtype.unwrap_or(match self.device {
            DeviceChoice::Cpu => ComputeDtype::F32,
            DeviceChoice::Cuda => ComputeDtype::Bf16,
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
    // 8: adapter_config.json as PEFT loads it cleanly: `lora_alpha` an integer when whole,
    //    `base_model_name_or_path` the hub repository when the model knows it.
    const VERSION: &'static str = "8";
    const SUMMARY: &'static str =
        "train LoRA adapters (QLoRA over a quantized base) with resumable checkpoints";

    fn headline_metrics() -> &'static [&'static str] {
        &["final_loss", "final_eval_loss"]
    }

    fn inputs() -> &'static [InputSlot] {
        &[
            InputSlot {
                name: "model",
                accepts: &[ModelArtifact::TYPE],
                required: true,
                many: false,
                doc: "the base model",
            },
            InputSlot {
                name: "tokens",
                accepts: &[TokensArtifact::TYPE],
                required: true,
                many: false,
                doc: "training token shards",
            },
            InputSlot {
                name: "eval_tokens",
                accepts: &[TokensArtifact::TYPE],
                required: false,
                many: false,
                doc: "held-out token shards for the evaluation loss",
            },
        ]
    }

    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "out",
            artifact: AdapterArtifact::TYPE,
            doc: "PEFT adapter, metrics.jsonl, loss_curve.svg and train.json",
        }]
    }

    fn validate(p: &LoraTrainParams) -> Result<(), String> {
        const MAX_RANK: usize = 65_536;
        const MAX_LENGTH: usize = 1 << 20;
        const MAX_BATCH_TOKENS: usize = 1 << 24;
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
        if !(p.alpha.is_finite() && p.alpha > 0.0) {
            return Err(format!(
                "`alpha` must be a finite number > 0, got {}",
                p.alpha
            ));
        }
        if !(p.weight_decay.is_finite() && p.weight_decay >= 0.0) {
            return Err(format!(
                "`weight_decay` must be a finite number ≥ 0, got {}",
                p.weight_decay
            ));
        }
        if let Some(clip) = p.clip.filter(|c| !(c.is_finite() && *c >= 0.0)) {
            return Err(format!(
                "`clip` must be a finite number ≥ 0 (0 turns clipping off), got {clip}"
            ));
        }
        if p.max_length < 2 {
            return Err("`max_length` must be at least 2".into());
        }
        // Far beyond what any machine trains, far below what overflows a size computation.
        if p.r > MAX_RANK || p.max_length > MAX_LENGTH || p.batch_size > MAX_BATCH_TOKENS {
            return Err(format!(
                "`r` is at most {MAX_RANK}, `max_length` at most {MAX_LENGTH} and `batch_size` \
                 at most {MAX_BATCH_TOKENS}"
            ));
        }
        if p.batch_size.saturating_mul(p.max_length) > MAX_BATCH_TOKENS {
            return Err(format!(
                "`batch_size` x `max_length` = {} tokens per step; at most {MAX_BATCH_TOKENS} \
                 (use `grad_accum` for larger effective batches)",
                p.batch_size.saturating_mul(p.max_length)
            ));
        }
        if p.target_modules.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "`target_modules` is empty; leave it out to adapt every linear layer".into(),
            );
        }
        Ok(())
    }

    fn needs_gpu(p: &LoraTrainParams) -> bool {
        p.device == DeviceChoice::Cuda
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
    let device = p.device.open()?;
    let dtype = p.compute_dtype();
    let model_dir = ctx.input("model")?.to_path_buf();
    let info = ModelArtifact::info(&model_dir)?;
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
    let seed = p.seed.unwrap_or(ctx.seed());
    let LoadedModel { model, info, .. } = load_model(
        &model_dir,
        &device,
        dtype.dtype(),
        Adapters::Fresh(&lora, seed),
        QuantizedWeights::KeepQuantized,
    )?;
    model.set_gradient_checkpointing(p.gradient_checkpointing);
    let vars = model.trainable_vars();
    if vars.is_empty() {
        return Err(miette!(
            help = format!(
                "module names of this model: {}",
                info.architecture.linear_module_names().join(", ")
            ),
            "`target_modules` {target_modules:?} matches no layer of the model"
        ));
    }
    let trainable_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();

    let batches = |dir| -> miette::Result<Batches> {
        let examples = TokensArtifact::read_examples(dir)?;
        make_batches(
            examples,
            p.batch_size,
            p.max_length,
            info.pad_id(),
            model.vocab_size(),
            &device,
        )
        .map_err(|e| {
            miette!(
                help =
                    "tokenize with the model's own tokenizer (the model artifact's tokenizer.json)",
                "{e}"
            )
        })
    };
    let train = batches(ctx.input("tokens")?)?;
    if train.batches.is_empty() {
        return Err(miette!(
            "the training tokens hold no example with loss tokens"
        ));
    }
    let eval_batches = match ctx.optional_input("eval_tokens") {
        Some(dir) => {
            let held_out = batches(dir)?.batches;
            if held_out.is_empty() {
                return Err(miette!(
                    help = "set `held_out = N` on the tokenize stage whose `held_out` output \
                            feeds `eval_tokens`, or disconnect `eval_tokens`",
                    "the `eval_tokens` input ({}) holds no example with loss tokens",
                    dir.display()
                ));
            }
            held_out
        }
        None => Vec::new(),
    };
    let train_batches = train.batches;

    let lm = LoraLm::new(&model);
    let state_dir = ctx.checkpoint_dir().join("trainer");
    let mut trainer = Trainer::resume(&lm, p.train_config(seed), &state_dir).into_diagnostic()?;
    let resumed_from = trainer.step();
    ctx.progress().start(p.steps, "steps");
    ctx.progress().set_position(resumed_from);
    let start = Instant::now();
    let mut last_loss = f64::NAN;
    let end = trainer
        .train_until(
            &train_batches,
            &eval_batches,
            p.steps,
            &mut |step| ctx.is_cancelled() || (step > resumed_from && stop_after(step)),
            &mut |report| {
                last_loss = report.record.loss;
                ctx.progress().set_position(report.record.step);
            },
        )
        .into_diagnostic()?;
    let final_eval_loss = match end {
        RunEnd::Finished { final_eval_loss } => final_eval_loss,
        RunEnd::Stopped { step } => {
            return Err(miette!(
                "stage `{}` was interrupted at step {step}; rerun to resume",
                ctx.stage_name()
            ))
        }
    };
    let secs = start.elapsed().as_secs_f64().max(1e-9);

    // The trainer's own metrics file (with per-step throughput) stays beside the checkpoints;
    // the artifact keeps it without wall-clock fields.
    let metrics_path = state_dir.join(AdapterArtifact::METRICS_FILE);
    let metrics_text = std::fs::read_to_string(&metrics_path)
        .map_err(|e| miette!("cannot read {}: {e}", metrics_path.display()))?;
    let metrics =
        Metrics::parse(&metrics_text).map_err(|e| miette!("{}: {e}", metrics_path.display()))?;
    let losses = metrics.series("loss");
    if last_loss.is_nan() {
        // Resumed from a checkpoint at the final step: the last loss is in the metrics.
        last_loss = losses.last().map_or(f64::NAN, |(_, l)| *l);
    }
    let run_tokens = lm.train_tokens.get();
    let summary = TrainSummary {
        steps: trainer.step(),
        final_loss: last_loss,
        // Step 1's loss: the run's starting point, even when this attempt resumed.
        first_loss: losses.iter().find(|(s, _)| *s == 1).map(|(_, l)| *l),
        final_eval_loss,
        tokens_per_s: run_tokens as f64 / secs,
        train_tokens: run_tokens,
        examples: train.examples,
        batches: train_batches.len(),
        trainable_params,
        peak_memory_estimate_bytes: training_peak_estimate(
            &model,
            ModelArtifact::weight_bytes(&model_dir),
            trainable_params,
            &train_batches,
        ),
        resumed_from_step: resumed_from,
        dtype: p.compute_dtype(),
        device: p.device,
    };
    // The base as PEFT's AutoPeftModel resolves it: the hub repository when the model knows it.
    let base = info.hub_id.clone().unwrap_or_else(|| info.source.clone());
    let mut peft = PeftConfig::lora(base, p.r, p.alpha, p.dropout, target_modules);
    peft.revision = info.hub_revision.clone();
    let adapter = PeftAdapter::from_vars(peft, trainer.vars()).into_diagnostic()?;
    AdapterArtifact::write(ctx.output_dir("out")?, &adapter, &metrics, &summary)?;
    ctx.set_metadata("final_loss", summary.final_loss);
    ctx.set_metadata("tokens_per_s", summary.tokens_per_s);
    ctx.set_metadata("train_tokens", summary.train_tokens);
    ctx.set_metadata("resumed_from_step", resumed_from);
    if let Some(e) = final_eval_loss {
        ctx.set_metadata("final_eval_loss", e);
    }
    Ok(summary)
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
