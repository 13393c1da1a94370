//! The trainer on a tiny LoRA-style language model: loss falls, accumulation equals a bigger
//! batch, overflow skips the step, and an interrupted run resumes bit-identically.

use candle_core::{DType, Device, Tensor, Var};
use pipeline_models::train::{
    accumulate_gradients, masked_cross_entropy_sum, AdamWConfig, ComputeDtype, GradScalerConfig,
    LossSum, LrSchedule, ScheduleKind, StepContext, StepRecord, TrainConfig, TrainModel, TrainRng,
    Trainer,
};
use std::cell::Cell;

const V: usize = 11;
const D: usize = 16;
const R: usize = 4;

fn det(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
    let mut rng = TrainRng::new(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| (rng.next_f32() - 0.5) * 2.0 * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Frozen embedding, frozen base projection with a LoRA adapter (with dropout on its input),
/// frozen output head.
struct TinyLm {
    emb: Tensor,
    w: Tensor,
    head: Tensor,
    a: Var,
    b: Var,
    dropout: f32,
    poison: Cell<bool>,
}

impl TinyLm {
    fn new(dropout: f32) -> Self {
        Self {
            emb: det((V, D), 1, 1.0),
            w: det((D, D), 2, 0.3),
            head: det((V, D), 3, 1.0),
            a: Var::from_tensor(&det((R, D), 4, 0.2)).unwrap(),
            b: Var::from_tensor(&det((D, R), 5, 0.2)).unwrap(),
            dropout,
            poison: Cell::new(false),
        }
    }
}

type Batch = (Tensor, Tensor);

impl TrainModel for TinyLm {
    type Batch = Batch;

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("layer.lora_A.weight".into(), self.a.clone()),
            ("layer.lora_B.weight".into(), self.b.clone()),
        ]
    }

    fn loss(&self, (ids, mask): &Batch, ctx: &mut StepContext<'_>) -> candle_core::Result<LossSum> {
        let dt = ctx.dtype;
        let (bsz, t) = ids.dims2()?;
        let x = self
            .emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((bsz, t, D))?
            .to_dtype(dt)?;
        let base = x.broadcast_matmul(&self.w.t()?.to_dtype(dt)?)?;
        let lin = if ctx.train && self.dropout > 0.0 {
            let m = ctx.rng.dropout_mask(bsz * t * D, self.dropout);
            (x.clone() * Tensor::from_vec(m, (bsz, t, D), x.device())?.to_dtype(dt)?)?
        } else {
            x.clone()
        };
        let a = self.a.as_tensor().to_dtype(dt)?;
        let b = self.b.as_tensor().to_dtype(dt)?;
        let delta = lin.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        let h = (base + delta)?.tanh()?;
        let logits = h.broadcast_matmul(&self.head.t()?.to_dtype(dt)?)?;
        let (mut sum, tokens) = masked_cross_entropy_sum(&logits, ids, mask)?;
        if self.poison.get() {
            sum = (sum * f64::NAN)?;
        }
        Ok(LossSum { sum, tokens })
    }
}

/// Sequences of a fixed cyclic pattern, with a few masked-out positions.
fn data(n: usize, rows: usize, t: usize, seed: u64) -> Vec<Batch> {
    let mut rng = TrainRng::new(seed);
    (0..n)
        .map(|_| {
            let mut ids = Vec::new();
            let mut mask = Vec::new();
            for _ in 0..rows {
                let start = rng.below(V);
                for j in 0..t {
                    ids.push(((start + 3 * j) % V) as u32);
                    mask.push(u8::from(j != 2));
                }
            }
            (
                Tensor::from_vec(ids, (rows, t), &Device::Cpu).unwrap(),
                Tensor::from_vec(mask, (rows, t), &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

fn config(total: u64) -> TrainConfig {
    TrainConfig {
        schedule: LrSchedule {
            kind: ScheduleKind::Cosine,
            base_lr: 3e-2,
            warmup_steps: 2,
            total_steps: total,
        },
        optimizer: AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        grad_accum: 2,
        max_grad_norm: Some(1.0),
        compute_dtype: ComputeDtype::F32,
        grad_scaler: None,
        checkpoint_every: Some(3),
        keep_checkpoints: 2,
        eval_every: Some(4),
        seed: 42,
        shuffle: true,
    }
}

fn weights(m: &TinyLm) -> Vec<Vec<f32>> {
    [&m.a, &m.b]
        .iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn records(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(step, loss, lr)` of every training-step record in `dir`'s metrics, in file order.
fn logged_steps(dir: &std::path::Path) -> Vec<(u64, String, String)> {
    records(dir)
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"].to_string(),
                r["lr"].to_string(),
            )
        })
        .collect()
}

/// The model after an uninterrupted run of `total` steps, and the directory it logged to.
fn uninterrupted(total: u64, train: &[Batch], eval: &[Batch]) -> (TinyLm, tempfile::TempDir) {
    let model = TinyLm::new(0.25);
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&model, config(total), Some(dir.path())).unwrap();
    t.run(train, eval, None, &|| false).unwrap();
    drop(t);
    (model, dir)
}

#[test]
fn loss_falls_on_a_tiny_problem_in_each_compute_dtype() {
    let train = data(8, 4, 8, 7);
    let eval = data(2, 4, 8, 8);
    for (dtype, scaler) in [
        (ComputeDtype::F32, None),
        (ComputeDtype::Bf16, None),
        (ComputeDtype::F16, Some(GradScalerConfig::default())),
    ] {
        let model = TinyLm::new(0.0);
        let mut cfg = config(40);
        cfg.compute_dtype = dtype;
        cfg.grad_scaler = scaler;
        let dir = tempfile::tempdir().unwrap();
        let mut tr = Trainer::new(&model, cfg, Some(dir.path())).unwrap();
        let (before, _) = tr.evaluate(&eval).unwrap();
        tr.run(&train, &eval, None, &|| false).unwrap();
        let (after, _) = tr.evaluate(&eval).unwrap();
        eprintln!("{dtype:?}: eval loss {before:.4} -> {after:.4}");
        assert!(
            after < 0.8 * before,
            "{dtype:?}: eval loss {before} -> {after}"
        );
        assert_eq!(model.a.dtype(), DType::F32, "master weights stay f32");
        let recs = records(dir.path());
        let steps: Vec<&serde_json::Value> =
            recs.iter().filter(|r| r.get("loss").is_some()).collect();
        assert_eq!(steps.len(), 40);
        let s: StepRecord = serde_json::from_value(steps[5].clone()).unwrap();
        assert_eq!(s.step, 6);
        assert!(s.tokens_per_s > 0.0 && s.grad_norm.is_some_and(|g| g > 0.0));
        let evals = recs.iter().filter(|r| r.get("eval_loss").is_some()).count();
        assert_eq!(evals, 10, "every 4 steps");
    }
}

#[test]
fn accumulation_equals_a_bigger_batch() {
    let model = TinyLm::new(0.0);
    let vars = model.trainable_vars();
    let small = data(2, 3, 6, 9);
    let cat = |i: usize| {
        Tensor::cat(
            &[
                &small[0].clone().into_tuple(i),
                &small[1].clone().into_tuple(i),
            ],
            0,
        )
        .unwrap()
    };
    let big: Batch = (cat(0), cat(1));
    let mut rng = TrainRng::new(0);
    let mut ctx = StepContext {
        dtype: DType::F32,
        rng: &mut rng,
        train: true,
    };
    let acc = accumulate_gradients(&model, &vars, &[&small[0], &small[1]], &mut ctx, 1.0).unwrap();
    let one = accumulate_gradients(&model, &vars, &[&big], &mut ctx, 1.0).unwrap();
    assert_eq!(acc.tokens, one.tokens);
    assert!((acc.loss_sum - one.loss_sum).abs() < 1e-4 * one.loss_sum.abs());
    // One micro-batch backpropagates its mean loss (what a loss scale is meant for); several,
    // their sums over the first one's token count.
    assert_eq!(one.normalizer, one.tokens);
    assert!(acc.normalizer > 0 && acc.normalizer < acc.tokens);
    // Per-token mean gradients: undo each side's normalisation.
    let mean = |g: &Tensor, n: usize| (g * (n as f64 / one.tokens as f64)).unwrap();
    for (a, b) in acc.grads.iter().zip(&one.grads) {
        let (a, b) = (&mean(a, acc.normalizer), &mean(b, one.normalizer));
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            m > 0.0 && d <= 1e-5 * m,
            "accumulated gradient differs by {d} (max {m})"
        );
    }
    // Scaled accumulation is the same gradient times the scale.
    let scaled =
        accumulate_gradients(&model, &vars, &[&small[0], &small[1]], &mut ctx, 1024.0).unwrap();
    let d = ((&scaled.grads[0] / 1024.0).unwrap() - &acc.grads[0])
        .unwrap()
        .abs()
        .unwrap();
    assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
}

/// With a loss scale and two micro-batches of different token counts, the step's gradient
/// (reported as its norm) is the gradient of the mean loss per target token: the scale and the
/// normalisation of the scaled loss are both undone.
#[test]
fn a_step_unscales_to_the_gradient_of_the_mean_loss() {
    let model = TinyLm::new(0.0);
    let vars = model.trainable_vars();
    let mut train = data(2, 3, 6, 9);
    // Mask more of the second micro-batch, so the two count different tokens.
    train[1].1 = Tensor::new(&[[1u8, 1, 0, 0, 1, 1]; 3], &Device::Cpu).unwrap();
    let mut rng = TrainRng::new(0);
    let mut ctx = StepContext {
        dtype: DType::F32,
        rng: &mut rng,
        train: false,
    };
    let (mut sum, mut tokens): (Option<Tensor>, usize) = (None, 0);
    for b in &train {
        let out = model.loss(b, &mut ctx).unwrap();
        tokens += out.tokens;
        sum = Some(match sum {
            None => out.sum,
            Some(s) => (s + out.sum).unwrap(),
        });
    }
    let mean = (sum.unwrap() / tokens as f64).unwrap();
    let grads = mean.backward().unwrap();
    let expected: f64 = vars
        .iter()
        .map(|(_, v)| {
            let g = grads.get(v).unwrap().to_dtype(DType::F64).unwrap();
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum::<f64>()
        .sqrt();

    let mut cfg = config(10);
    cfg.shuffle = false;
    cfg.max_grad_norm = None;
    cfg.grad_scaler = Some(GradScalerConfig::default());
    let mut trainer = Trainer::new(&model, cfg, None).unwrap();
    let report = trainer.train_step(&train).unwrap();
    assert!(!report.skipped);
    assert_eq!(report.record.scale, 65536.0);
    let norm = report
        .record
        .grad_norm
        .expect("a clean step has a gradient norm");
    assert!(
        (norm - expected).abs() <= 1e-4 * expected,
        "step gradient norm {norm}, gradient of the mean loss {expected}"
    );
}

trait IntoTuple {
    fn into_tuple(self, i: usize) -> Tensor;
}
impl IntoTuple for Batch {
    fn into_tuple(self, i: usize) -> Tensor {
        if i == 0 {
            self.0
        } else {
            self.1
        }
    }
}

#[test]
fn a_non_finite_step_without_loss_scaling_is_an_error_and_changes_nothing() {
    let model = TinyLm::new(0.0);
    let dir = tempfile::tempdir().unwrap();
    let train = data(4, 2, 6, 3);
    let mut tr = Trainer::new(&model, config(10), Some(dir.path())).unwrap();
    tr.train_step(&train).unwrap();
    let before = weights(&model);
    model.poison.set(true);
    let err = tr.train_step(&train).unwrap_err();
    assert!(
        matches!(
            err,
            pipeline_models::train::TrainError::Diverged { step: 2, .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("lower the learning rate"), "{err}");
    assert_eq!(weights(&model), before, "the diverged step is not applied");
    assert_eq!(tr.step(), 1);
    assert_eq!(logged_steps(dir.path()).len(), 1, "nor logged");
}

#[test]
fn overflowing_step_is_skipped_and_backs_off_the_scale() {
    let model = TinyLm::new(0.0);
    let mut cfg = config(10);
    cfg.grad_scaler = Some(GradScalerConfig {
        growth_interval: 2,
        ..Default::default()
    });
    let train = data(4, 2, 6, 3);
    let mut tr = Trainer::new(&model, cfg, None).unwrap();
    let r1 = tr.train_step(&train).unwrap();
    assert!(!r1.skipped);
    assert_eq!(r1.record.scale, 65536.0);
    let before = weights(&model);
    model.poison.set(true);
    let r2 = tr.train_step(&train).unwrap();
    assert!(r2.skipped && r2.record.grad_norm.is_none());
    assert_eq!(
        weights(&model),
        before,
        "skipped step leaves weights untouched"
    );
    assert_eq!(tr.scaler().scale(), 32768.0);
    assert_eq!(tr.step(), 2);
    model.poison.set(false);
    tr.train_step(&train).unwrap();
    assert_ne!(weights(&model), before);
    tr.train_step(&train).unwrap();
    assert_eq!(tr.scaler().scale(), 65536.0, "regrows after 2 clean steps");
}

#[test]
fn interrupted_run_resumes_bit_identically() {
    let train = data(5, 3, 8, 11);
    let eval = data(1, 3, 8, 12);
    let total = 10;

    let (full_model, full_dir) = uninterrupted(total, &train, &eval);

    // First attempt: runs to a checkpoint at step 3, takes two more steps, then "crashes".
    let dir = tempfile::tempdir().unwrap();
    {
        let model = TinyLm::new(0.25);
        let mut t = Trainer::new(&model, config(total), Some(dir.path())).unwrap();
        t.run(&train, &eval, Some(3), &|| false).unwrap();
        t.train_step(&train).unwrap();
        t.train_step(&train).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("latest")).unwrap(),
        "checkpoint-000000003"
    );
    // Second attempt: interrupted by a stop request after 3 more steps (checkpoints at 6).
    {
        let model = TinyLm::new(0.25);
        let mut t = Trainer::resume(&model, config(total), dir.path()).unwrap();
        assert_eq!(t.step(), 3);
        assert_eq!(t.data_position(), 6);
        let calls = Cell::new(0);
        let stop = || {
            calls.set(calls.get() + 1);
            calls.get() > 3
        };
        assert_eq!(t.run(&train, &eval, None, &stop).unwrap(), 6);
    }
    // Third attempt finishes.
    let model = TinyLm::new(0.25);
    let mut t = Trainer::resume(&model, config(total), dir.path()).unwrap();
    assert_eq!(t.step(), 6);
    t.run(&train, &eval, None, &|| false).unwrap();
    assert_eq!(t.step(), total);
    assert_eq!(
        weights(&model),
        weights(&full_model),
        "resumed weights differ"
    );

    // Metrics: one line per step, same losses and learning rates as the uninterrupted run.
    let (a, b) = (logged_steps(full_dir.path()), logged_steps(dir.path()));
    assert_eq!(a.len(), total as usize);
    assert_eq!(a, b);
    // Only the newest two checkpoints are kept, and no staging leftovers.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint"))
        .collect();
    names.sort();
    assert_eq!(names, vec!["checkpoint-000000009", "checkpoint-000000010"]);
}

#[test]
fn a_run_killed_before_its_first_checkpoint_logs_each_step_once() {
    let train = data(5, 3, 8, 11);
    let eval = data(1, 3, 8, 12);
    let total = 4;
    let (full_model, full_dir) = uninterrupted(total, &train, &eval);

    // The first attempt logs two steps and dies before any checkpoint is written.
    let dir = tempfile::tempdir().unwrap();
    {
        let model = TinyLm::new(0.25);
        let mut t = Trainer::new(&model, config(total), Some(dir.path())).unwrap();
        t.train_step(&train).unwrap();
        t.train_step(&train).unwrap();
    }
    assert!(!dir.path().join("latest").exists());
    let model = TinyLm::new(0.25);
    let mut t = Trainer::resume(&model, config(total), dir.path()).unwrap();
    assert_eq!(t.step(), 0);
    t.run(&train, &eval, None, &|| false).unwrap();
    let logged = logged_steps(dir.path());
    assert_eq!(logged.len(), total as usize, "{logged:?}");
    assert_eq!(logged, logged_steps(full_dir.path()));
    assert_eq!(weights(&model), weights(&full_model));
}

#[test]
fn resume_rejects_a_checkpoint_for_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let train = data(2, 2, 6, 1);
    let model = TinyLm::new(0.0);
    let mut t = Trainer::new(&model, config(4), Some(dir.path())).unwrap();
    t.run(&train, &[], Some(1), &|| false).unwrap();
    struct Other(Var, TinyLm);
    impl TrainModel for Other {
        type Batch = Batch;
        fn trainable_vars(&self) -> Vec<(String, Var)> {
            vec![
                ("layer.lora_A.weight".into(), self.0.clone()),
                ("layer.lora_B.weight".into(), self.1.b.clone()),
            ]
        }
        fn loss(&self, b: &Batch, c: &mut StepContext<'_>) -> candle_core::Result<LossSum> {
            self.1.loss(b, c)
        }
    }
    let other = Other(
        Var::zeros((8, D), DType::F32, &Device::Cpu).unwrap(),
        TinyLm::new(0.0),
    );
    let err = Trainer::resume(&other, config(4), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shape") && err.contains("lora_A"), "{err}");
    let mut bad = config(4);
    bad.grad_accum = 0;
    assert!(Trainer::new(&model, bad, None).is_err());
}

#[test]
fn half_written_checkpoints_are_ignored_and_dangling_pointers_reported() {
    let dir = tempfile::tempdir().unwrap();
    let train = data(2, 2, 6, 1);
    let model = TinyLm::new(0.0);
    let mut t = Trainer::new(&model, config(6), Some(dir.path())).unwrap();
    t.run(&train, &[], Some(3), &|| false).unwrap();
    // A crash while writing step 5 leaves only a staging directory and a temp file behind.
    let staging = dir.path().join(".staging-checkpoint-000000005");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("adapter.safetensors"), b"truncated").unwrap();
    std::fs::write(dir.path().join(".latest.tmp-1"), b"checkpoint-000000005").unwrap();
    let fresh = TinyLm::new(0.0);
    let r = Trainer::resume(&fresh, config(6), dir.path()).unwrap();
    assert_eq!(r.step(), 3);
    assert_eq!(weights(&fresh), weights(&model));
    // `latest` naming a checkpoint that is gone is an error that says what to do.
    std::fs::write(dir.path().join("latest"), "checkpoint-000000099").unwrap();
    let e = Trainer::resume(&TinyLm::new(0.0), config(6), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("checkpoint-000000099") && e.contains("latest"),
        "{e}"
    );
    // An empty directory starts fresh.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        Trainer::resume(&TinyLm::new(0.0), config(6), empty.path())
            .unwrap()
            .step(),
        0
    );
}
