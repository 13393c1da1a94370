//! End to end: LoRA adapters over NF4-quantized frozen layers (`QuantLinear`), trained with the
//! `Trainer` in bf16, saved as a PEFT adapter and loaded back into a fresh model.

use candle_core::{DType, Device, Tensor, Var};
use pipeline_models::peft::{PeftAdapter, PeftConfig};
use pipeline_models::quant::{nf4::Nf4Tensor, QuantLinear, QuantWeight};
use pipeline_models::train::{
    masked_cross_entropy_sum, ComputeDtype, LossSum, StepContext, TrainConfig, TrainModel,
    TrainRng, Trainer,
};
use pipeline_models::LinearLayer;
use std::sync::Arc;

const V: usize = 12;
const D: usize = 64;
const H: usize = 128;
const R: usize = 4;

fn rand(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
    let mut rng = TrainRng::new(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| (rng.next_f32() - 0.5) * 2.0 * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

struct Adapted {
    base: QuantLinear,
    a: Var,
    b: Var,
    scaling: f64,
}

impl Adapted {
    fn new(out: usize, inp: usize, seed: u64) -> Self {
        let w = rand((out, inp), seed, 1.0 / (inp as f32).sqrt());
        let base = QuantLinear::new(
            QuantWeight::Nf4(Arc::new(Nf4Tensor::quantize(&w, true).unwrap())),
            None,
        )
        .unwrap();
        // PEFT's initialisation: A random, B zero, so training starts from the base model.
        let a = Var::from_tensor(&rand((R, inp), seed + 100, 1.0 / (inp as f32).sqrt())).unwrap();
        let b = Var::zeros((out, R), DType::F32, &Device::Cpu).unwrap();
        Self {
            base,
            a,
            b,
            scaling: 8.0 / R as f64,
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let a = self.a.as_tensor().to_dtype(dt)?;
        let b = self.b.as_tensor().to_dtype(dt)?;
        let delta = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        self.base.forward(x)? + delta.affine(self.scaling, 0.0)?
    }
}

struct Mlp {
    emb: Tensor,
    up: Adapted,
    down: Adapted,
}

impl Mlp {
    fn new() -> Self {
        Self {
            emb: rand((V, D), 1, 1.0),
            up: Adapted::new(H, D, 2),
            down: Adapted::new(V, H, 3),
        }
    }
}

impl TrainModel for Mlp {
    type Batch = (Tensor, Tensor);

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (m, l) in [
            ("model.layers.0.mlp.up_proj", &self.up),
            ("model.layers.0.mlp.down_proj", &self.down),
        ] {
            v.push((format!("{m}.lora_A.weight"), l.a.clone()));
            v.push((format!("{m}.lora_B.weight"), l.b.clone()));
        }
        v
    }

    fn loss(
        &self,
        (ids, mask): &Self::Batch,
        ctx: &mut StepContext<'_>,
    ) -> candle_core::Result<LossSum> {
        let (b, t) = ids.dims2()?;
        let x = self
            .emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, D))?
            .to_dtype(ctx.dtype)?;
        let h = self.up.forward(&x)?.tanh()?;
        let logits = self.down.forward(&h)?;
        let (sum, tokens) = masked_cross_entropy_sum(&logits, ids, mask)?;
        Ok(LossSum { sum, tokens })
    }
}

fn batches(n: usize, seed: u64) -> Vec<(Tensor, Tensor)> {
    let mut rng = TrainRng::new(seed);
    (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..4)
                .flat_map(|_| {
                    let s = rng.below(V);
                    (0..10).map(move |j| ((s + 5 * j) % V) as u32)
                })
                .collect();
            (
                Tensor::from_vec(ids, (4, 10), &Device::Cpu).unwrap(),
                Tensor::ones((4, 10), DType::U8, &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

#[test]
fn qlora_training_lowers_loss_and_the_adapter_survives_a_peft_round_trip() {
    let model = Mlp::new();
    let mut cfg = TrainConfig::qlora(40);
    cfg.schedule.base_lr = 1e-2;
    cfg.grad_accum = 2;
    cfg.compute_dtype = ComputeDtype::Bf16;
    cfg.checkpoint_every = None;
    let (train, eval) = (batches(6, 1), batches(2, 2));
    let mut tr = Trainer::new(&model, cfg, None).unwrap();
    let (before, _) = tr.evaluate(&eval).unwrap();
    tr.run(&train, &eval, None, &|| false).unwrap();
    let (after, _) = tr.evaluate(&eval).unwrap();
    eprintln!("eval loss {before:.4} -> {after:.4}");
    assert!(after < 0.7 * before, "eval loss {before} -> {after}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = PeftConfig::lora(
        "test-mlp",
        R,
        8.0,
        0.0,
        vec!["up_proj".into(), "down_proj".into()],
    );
    PeftAdapter::from_vars(cfg, &model.trainable_vars())
        .unwrap()
        .save(dir.path())
        .unwrap();
    let fresh = Mlp::new();
    let adapter = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(adapter.config.scaling(), fresh.up.scaling);
    adapter.assign_to(&fresh.trainable_vars()).unwrap();
    let t2 = Trainer::new(&fresh, TrainConfig::qlora(40), None).unwrap();
    let (reloaded, _) = t2.evaluate(&eval).unwrap();
    assert_eq!(
        reloaded, after,
        "reloaded adapter gives the trained model's loss"
    );
}
