//! The training loop: gradient accumulation over micro-batches, loss scaling, clipping, AdamW,
//! schedules, periodic checkpoints and evaluation, and exact resume.

use super::checkpoint::{self, TrainerState};
use super::{
    clip_grad_norm, AdamW, AdamWConfig, EvalRecord, GradScaler, GradScalerConfig, LrSchedule,
    MetricsWriter, Result, StepRecord, TrainError, TrainRng,
};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Dtype the forward pass runs in; trainable variables stay f32 regardless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    /// Full precision.
    F32,
    /// Half precision (use loss scaling).
    F16,
    /// bfloat16 (no loss scaling needed).
    Bf16,
}

impl ComputeDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::F16 => DType::F16,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

/// What a model's loss function gets besides the batch.
pub struct StepContext<'a> {
    /// Dtype to run the forward pass in (cast f32 variables to it).
    pub dtype: DType,
    /// Randomness for dropout; checkpointed, so resumed runs draw the same masks.
    pub rng: &'a mut TrainRng,
    /// `false` during evaluation (disable dropout).
    pub train: bool,
}

/// A summed loss and how many target tokens it sums over.
#[derive(Debug, Clone)]
pub struct LossSum {
    /// Scalar loss summed over target tokens (recording backward to the trainable variables).
    pub sum: Tensor,
    /// Number of target tokens in the sum.
    pub tokens: usize,
}

/// What the trainer needs from a model.
pub trait TrainModel {
    /// One micro-batch of training data.
    type Batch;

    /// Variables to train, named as they should be saved (PEFT names for LoRA adapters). Must be
    /// f32 and the same list, in the same order, on every call.
    fn trainable_vars(&self) -> Vec<(String, Var)>;

    /// The loss of `batch` summed over its target tokens (e.g. with
    /// [`masked_cross_entropy_sum`](super::masked_cross_entropy_sum)).
    fn loss(&self, batch: &Self::Batch, ctx: &mut StepContext<'_>) -> candle_core::Result<LossSum>;
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Learning-rate schedule; its `total_steps` is also where [`Trainer::run`] stops.
    pub schedule: LrSchedule,
    /// AdamW hyper-parameters.
    pub optimizer: AdamWConfig,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value (after unscaling).
    pub max_grad_norm: Option<f64>,
    /// Forward dtype.
    pub compute_dtype: ComputeDtype,
    /// Dynamic loss scaling; `None` disables it (f32/bf16).
    pub grad_scaler: Option<GradScalerConfig>,
    /// Save a checkpoint every this many steps (and at the end of [`Trainer::run`]).
    pub checkpoint_every: Option<u64>,
    /// Checkpoints to keep.
    pub keep_checkpoints: usize,
    /// Evaluate on the held-out batches every this many steps (and at the end).
    pub eval_every: Option<u64>,
    /// Seed for data order and dropout.
    pub seed: u64,
    /// Shuffle the micro-batches each epoch.
    pub shuffle: bool,
}

impl TrainConfig {
    /// The QLoRA paper's recipe for `total_steps` optimizer steps: constant learning rate 2e-4
    /// after a 3% warmup, AdamW without weight decay, gradient-norm clipping at 0.3, bf16
    /// compute, 4 micro-batches per step, checkpoints every 100 steps (2 kept), evaluation every
    /// 100 steps, seed 0, shuffled data.
    pub fn qlora(total_steps: u64) -> Self {
        Self {
            schedule: LrSchedule {
                kind: super::ScheduleKind::Constant,
                base_lr: 2e-4,
                warmup_steps: (total_steps as f64 * 0.03).ceil() as u64,
                total_steps,
            },
            optimizer: AdamWConfig::default(),
            grad_accum: 4,
            max_grad_norm: Some(0.3),
            compute_dtype: ComputeDtype::Bf16,
            grad_scaler: None,
            checkpoint_every: Some(100),
            keep_checkpoints: 2,
            eval_every: Some(100),
            seed: 0,
            shuffle: true,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.grad_accum == 0 {
            return Err(TrainError::Config("grad_accum must be at least 1".into()));
        }
        if !(self.schedule.base_lr.is_finite() && self.schedule.base_lr >= 0.0) {
            return Err(TrainError::Config(
                "the learning rate must be finite and ≥ 0".into(),
            ));
        }
        if self.checkpoint_every == Some(0) || self.eval_every == Some(0) {
            return Err(TrainError::Config(
                "checkpoint_every / eval_every must be ≥ 1".into(),
            ));
        }
        Ok(())
    }
}

/// Summed gradients of a group of micro-batches: the gradients of `Σ loss_sum · loss_scale /
/// normalizer`, so dividing them by `loss_scale · tokens / normalizer` gives the gradient of the
/// mean loss per target token.
///
/// The scaled loss is normalised by the first micro-batch's token count because a loss scale is
/// meant for a *mean* loss, as PyTorch's GradScaler multiplies it: scaling a sum over 500 tokens
/// by 2^16 would overflow f16 gradients that the mean keeps in range, and skip steps for it.
#[derive(Debug)]
pub struct AccumulatedGrads {
    /// One per trainable variable, f32 (zeros where a variable got no gradient).
    pub grads: Vec<Tensor>,
    /// Sum of the micro-batch losses (unscaled).
    pub loss_sum: f64,
    /// Target tokens across the micro-batches.
    pub tokens: usize,
    /// What each micro-batch's summed loss was divided by before backward: the first
    /// micro-batch's target tokens (at least 1).
    pub normalizer: usize,
}

/// Runs forward and backward on each batch and sums the gradients of `vars`. Each micro-batch's
/// graph is freed before the next, so memory is that of one micro-batch.
pub fn accumulate_gradients<M: TrainModel>(
    model: &M,
    vars: &[(String, Var)],
    batches: &[&M::Batch],
    ctx: &mut StepContext<'_>,
    loss_scale: f64,
) -> Result<AccumulatedGrads> {
    let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    let mut normalizer = None;
    for batch in batches {
        let out = model.loss(batch, ctx)?;
        let sum = out.sum.to_dtype(DType::F32)?;
        loss_sum += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        tokens += out.tokens;
        let normalizer = *normalizer.get_or_insert(out.tokens.max(1));
        // Gradients of checkpointed layers' variables arrive on the side (see
        // `crate::checkpoint`); drop any a failed backward left behind first.
        crate::checkpoint::take_side_gradients();
        let grads = sum
            .affine(loss_scale / normalizer as f64, 0.0)?
            .backward()?;
        let side = crate::checkpoint::take_side_gradients();
        for (slot, (_, var)) in acc.iter_mut().zip(vars) {
            if let Some(g) = crate::checkpoint::total_gradient(&grads, &side, var)? {
                let g = g.detach().to_dtype(DType::F32)?;
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
    }
    let grads = acc
        .into_iter()
        .zip(vars)
        .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(AccumulatedGrads {
        grads,
        loss_sum,
        tokens,
        normalizer: normalizer.unwrap_or(1),
    })
}

/// Result of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// What was logged.
    pub record: StepRecord,
    /// Whether the update was skipped because of inf/NaN gradients.
    pub skipped: bool,
}

/// How a [`Trainer::train_until`] run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunEnd {
    /// Every step ran; the held-out loss at the end, when there were held-out batches.
    Finished {
        /// Mean held-out loss per target token after the last step.
        final_eval_loss: Option<f64>,
    },
    /// Stopped before `step` ran; the state at `step` is checkpointed.
    Stopped {
        /// Steps completed.
        step: u64,
    },
}

/// Trains a [`TrainModel`].
pub struct Trainer<'m, M: TrainModel> {
    model: &'m M,
    config: TrainConfig,
    vars: Vec<(String, Var)>,
    optimizer: AdamW,
    scaler: GradScaler,
    rng: TrainRng,
    step: u64,
    data_position: u64,
    dir: Option<PathBuf>,
    metrics: Option<MetricsWriter>,
    order_cache: Option<(u64, Vec<usize>)>,
}

impl<'m, M: TrainModel> Trainer<'m, M> {
    /// A fresh run. With `dir`, checkpoints go to `dir` and metrics to `dir/metrics.jsonl`.
    pub fn new(model: &'m M, config: TrainConfig, dir: Option<&Path>) -> Result<Self> {
        config.validate()?;
        let vars = model.trainable_vars();
        if vars.is_empty() {
            return Err(TrainError::Config(
                "the model has no trainable variables".into(),
            ));
        }
        let optimizer = AdamW::new(vars.clone(), config.optimizer)?;
        let scaler = config
            .grad_scaler
            .map_or_else(GradScaler::disabled, GradScaler::new);
        let metrics = dir.map(|d| MetricsWriter::new(d.join("metrics.jsonl")));
        if let Some(d) = dir {
            std::fs::create_dir_all(d).map_err(super::io_err("create", d))?;
        }
        Ok(Self {
            model,
            rng: TrainRng::new(config.seed),
            config,
            vars,
            optimizer,
            scaler,
            step: 0,
            data_position: 0,
            dir: dir.map(Path::to_path_buf),
            metrics,
            order_cache: None,
        })
    }

    /// Continues from the newest checkpoint in `dir`, or starts fresh there if it has none.
    /// The model's trainable variables are overwritten with the checkpointed values.
    pub fn resume(model: &'m M, config: TrainConfig, dir: &Path) -> Result<Self> {
        let mut t = Self::new(model, config, Some(dir))?;
        if let Some(ckpt_dir) = checkpoint::latest(dir)? {
            let device = t.vars[0].1.device().clone();
            let ckpt = checkpoint::load(&ckpt_dir, &device)?;
            t.restore(ckpt)?;
        }
        // Records of steps after the checkpoint (all of them, without one) belong to an attempt
        // that died before saving: the steps run again and must not be logged twice.
        if let Some(m) = &t.metrics {
            m.truncate_after(t.step)?;
        }
        Ok(t)
    }

    fn restore(&mut self, ckpt: checkpoint::Checkpoint) -> Result<()> {
        let bad = |reason: String| TrainError::Checkpoint {
            path: ckpt.dir.clone(),
            reason,
        };
        if ckpt.weights.len() != self.vars.len() {
            return Err(bad(format!(
                "it holds {} trainable tensors, the model has {}; was it written for another \
                 model or LoRA configuration?",
                ckpt.weights.len(),
                self.vars.len()
            )));
        }
        for (name, var) in &self.vars {
            let t = ckpt
                .weights
                .get(name)
                .ok_or_else(|| bad(format!("no tensor `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        self.optimizer
            .load_state(&ckpt.optimizer, ckpt.state.optimizer_steps)
            .map_err(|e| bad(e.to_string()))?;
        self.scaler.set_state(ckpt.state.scaler);
        self.rng = TrainRng::from_state(ckpt.state.rng_state);
        self.step = ckpt.state.step;
        self.data_position = ckpt.state.data_position;
        self.order_cache = None;
        Ok(())
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Micro-batches consumed.
    pub fn data_position(&self) -> u64 {
        self.data_position
    }

    /// The loss scaler.
    pub fn scaler(&self) -> &GradScaler {
        &self.scaler
    }

    /// The trainable variables.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Index into `n` micro-batches of data position `pos`: epochs are independent permutations
    /// derived from the seed, so a position alone determines the batch.
    fn batch_index(&mut self, pos: u64, n: usize) -> usize {
        let epoch = pos / n as u64;
        let i = (pos % n as u64) as usize;
        if !self.config.shuffle {
            return i;
        }
        let stale = self
            .order_cache
            .as_ref()
            .is_none_or(|(e, o)| *e != epoch || o.len() != n);
        if stale {
            let seed = self.config.seed ^ epoch.wrapping_add(1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            self.order_cache = Some((epoch, TrainRng::new(seed).permutation(n)));
        }
        self.order_cache.as_ref().map_or(i, |(_, o)| o[i])
    }

    /// One optimizer step over the next `grad_accum` micro-batches of `data` (cycled).
    pub fn train_step(&mut self, data: &[M::Batch]) -> Result<StepReport> {
        if data.is_empty() {
            return Err(TrainError::Config("no training batches".into()));
        }
        let start = Instant::now();
        let idx: Vec<usize> = (0..self.config.grad_accum as u64)
            .map(|k| self.batch_index(self.data_position + k, data.len()))
            .collect();
        let batches: Vec<&M::Batch> = idx.iter().map(|&i| &data[i]).collect();
        let scale = self.scaler.scale();
        let mut ctx = StepContext {
            dtype: self.config.compute_dtype.dtype(),
            rng: &mut self.rng,
            train: true,
        };
        let acc = accumulate_gradients(self.model, &self.vars, &batches, &mut ctx, scale)?;
        self.data_position += batches.len() as u64;
        if acc.tokens == 0 {
            return Err(TrainError::Config(format!(
                "the micro-batches of step {} have no target tokens (check the loss mask)",
                self.step + 1
            )));
        }
        let mut grads = acc.grads;
        let found_inf = self
            .scaler
            .unscale(&mut grads, acc.tokens as f64 / acc.normalizer as f64)?;
        let lr = self.config.schedule.lr_at(self.step);
        let loss = acc.loss_sum / acc.tokens as f64;
        // Without loss scaling there is no scale to back off: a non-finite gradient means the
        // run diverged, and skipping every step from here on would store an untrained (or NaN)
        // adapter as if it were a result.
        if found_inf && !self.scaler.is_enabled() {
            return Err(TrainError::Diverged {
                step: self.step + 1,
                loss,
                grad_norm: f64::NAN,
            });
        }
        let grad_norm = if found_inf {
            None
        } else {
            let norm = match self.config.max_grad_norm {
                Some(max) => clip_grad_norm(&mut grads, max)?,
                None => super::global_grad_norm(&grads)?,
            };
            // Without loss scaling there is nothing to skip to: a non-finite loss or gradient
            // would turn every weight into NaN, and a NaN adapter must never be stored.
            if !(loss.is_finite() && norm.is_finite()) {
                return Err(TrainError::Diverged {
                    step: self.step + 1,
                    loss,
                    grad_norm: norm,
                });
            }
            self.optimizer.step(&grads, lr)?;
            Some(norm)
        };
        self.scaler.update(found_inf);
        self.step += 1;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let record = StepRecord {
            step: self.step,
            loss,
            lr,
            scale,
            grad_norm,
            tokens_per_s: acc.tokens as f64 / secs,
        };
        if let Some(m) = &self.metrics {
            m.append(&record)?;
        }
        Ok(StepReport {
            record,
            skipped: found_inf,
        })
    }

    /// Mean loss per target token over `data`, without gradients or dropout. Uses its own fixed
    /// random generator so evaluating does not change the training run.
    pub fn evaluate(&self, data: &[M::Batch]) -> Result<(f64, usize)> {
        let mut rng = TrainRng::new(self.config.seed ^ 0x5EED_E7A1);
        let mut ctx = StepContext {
            dtype: self.config.compute_dtype.dtype(),
            rng: &mut rng,
            train: false,
        };
        let (mut sum, mut tokens) = (0f64, 0usize);
        for b in data {
            let out = self.model.loss(b, &mut ctx)?;
            sum += out.sum.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
            tokens += out.tokens;
        }
        if tokens == 0 {
            return Err(TrainError::Config(
                "the evaluation batches have no target tokens".into(),
            ));
        }
        Ok((sum / tokens as f64, tokens))
    }

    /// Evaluates and appends an [`EvalRecord`] to the metrics.
    pub fn evaluate_and_log(&self, data: &[M::Batch]) -> Result<EvalRecord> {
        let (eval_loss, eval_tokens) = self.evaluate(data)?;
        let rec = EvalRecord {
            step: self.step,
            eval_loss,
            eval_tokens,
        };
        if let Some(m) = &self.metrics {
            m.append(&rec)?;
        }
        Ok(rec)
    }

    /// The current trainable weights by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Writes a checkpoint of the current state into the trainer's directory.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| TrainError::Config("this trainer has no checkpoint directory".into()))?;
        let state = TrainerState {
            version: 1,
            step: self.step,
            data_position: self.data_position,
            rng_state: self.rng.state(),
            optimizer_steps: self.optimizer.steps(),
            scaler: self.scaler.state(),
        };
        checkpoint::save(
            dir,
            &self.weights(),
            &self.optimizer.state_tensors(),
            &state,
            self.config.keep_checkpoints,
        )
    }

    /// Trains up to step `end` on `train`, with the configured checkpoint and evaluation
    /// cadence (checkpoints only with a directory, evaluation only with `eval` batches).
    /// `should_stop(step)` is asked before each step: a stop saves a checkpoint of the current
    /// step (unless one exists) and evaluates nothing, so a resumed run logs exactly what an
    /// uninterrupted one does. `on_step` sees each step's report. At the end the held-out loss
    /// is computed once more (logged unless that step was just evaluated).
    pub fn train_until(
        &mut self,
        train: &[M::Batch],
        eval: &[M::Batch],
        end: u64,
        should_stop: &mut dyn FnMut(u64) -> bool,
        on_step: &mut dyn FnMut(&StepReport),
    ) -> Result<RunEnd> {
        // A resumed trainer starts exactly at a saved checkpoint.
        let mut saved = Some(self.step);
        let mut evaluated = None;
        while self.step < end {
            if should_stop(self.step) {
                if saved != Some(self.step) && self.dir.is_some() {
                    self.save_checkpoint()?;
                }
                return Ok(RunEnd::Stopped { step: self.step });
            }
            let report = self.train_step(train)?;
            on_step(&report);
            let every = |n: Option<u64>| n.is_some_and(|n| self.step.is_multiple_of(n));
            if self.dir.is_some() && every(self.config.checkpoint_every) {
                self.save_checkpoint()?;
                saved = Some(self.step);
            }
            if !eval.is_empty() && every(self.config.eval_every) {
                self.evaluate_and_log(eval)?;
                evaluated = Some(self.step);
            }
        }
        let final_eval_loss = if eval.is_empty() {
            None
        } else if evaluated == Some(self.step) {
            Some(self.evaluate(eval)?.0)
        } else {
            Some(self.evaluate_and_log(eval)?.eval_loss)
        };
        Ok(RunEnd::Finished { final_eval_loss })
    }

    /// Trains until `schedule.total_steps` or until `stop_at` steps (whichever is first), or
    /// until `should_stop()` says so between steps. Checkpoints and evaluates on the configured
    /// cadence and once more when it stops (checkpoints only with a directory; evaluation only
    /// with held-out data). Returns the step reached.
    pub fn run(
        &mut self,
        train: &[M::Batch],
        eval: &[M::Batch],
        stop_at: Option<u64>,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<u64> {
        let end = stop_at.map_or(self.config.schedule.total_steps, |s| {
            s.min(self.config.schedule.total_steps)
        });
        let mut last_ckpt = None;
        let mut last_eval = None;
        while self.step < end && !should_stop() {
            let report = self.train_step(train)?;
            tracing::debug!(
                step = report.record.step,
                loss = report.record.loss,
                "train step"
            );
            if self.dir.is_some()
                && self
                    .config
                    .checkpoint_every
                    .is_some_and(|n| self.step.is_multiple_of(n))
            {
                self.save_checkpoint()?;
                last_ckpt = Some(self.step);
            }
            if !eval.is_empty()
                && self
                    .config
                    .eval_every
                    .is_some_and(|n| self.step.is_multiple_of(n))
            {
                self.evaluate_and_log(eval)?;
                last_eval = Some(self.step);
            }
        }
        if self.dir.is_some() && last_ckpt != Some(self.step) && self.step > 0 {
            self.save_checkpoint()?;
        }
        if !eval.is_empty() && last_eval != Some(self.step) {
            self.evaluate_and_log(eval)?;
        }
        Ok(self.step)
    }
}

/// Whether every variable is on `device` (a convenience for callers placing models).
pub fn vars_on(vars: &[(String, Var)], device: &Device) -> bool {
    vars.iter().all(|(_, v)| v.device().same_device(device))
}
