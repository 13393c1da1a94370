//! LoRA layer behaviour: PEFT-style initialisation, scaling, dropout, merge/unmerge, layers
//! and norms on their own.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::max_abs_diff;
use pipeline_models::layers::{Dense, LayerNorm, RmsNorm, Rotary};
use pipeline_models::{LinearLayer, LoraConfig, LoraLinear};

fn config(dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        target_modules: vec!["q_proj".into()],
    }
}

fn dense(out: usize, inp: usize, bias: bool) -> Dense {
    let w = Tensor::randn(0f32, 1f32, (out, inp), &Device::Cpu).unwrap();
    let b = bias.then(|| Tensor::randn(0f32, 1f32, out, &Device::Cpu).unwrap());
    Dense::new(w, b).unwrap()
}

#[test]
fn dense_computes_x_wt_plus_b() {
    let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
    let d = Dense::new(w, Some(b)).unwrap();
    let x = Tensor::new(&[[[1f32, 1.0], [2.0, -1.0]]], &Device::Cpu).unwrap();
    let y: Vec<Vec<f32>> = d
        .forward(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(y, vec![vec![3.5, 6.0, 13.0], vec![0.5, 1.0, 6.0]]);
    assert!(Dense::new(
        Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
        Some(Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())
    )
    .is_err());
}

#[test]
fn fresh_adapter_is_a_no_op_and_a_is_kaiming_uniform() {
    let base = dense(16, 64, true);
    let lora = LoraLinear::new(Box::new(base.clone()), &config(0.0), 1, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1f32, (3, 5, 64), &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&lora.forward(&x).unwrap(), &base.forward(&x).unwrap()),
        0.0
    );
    let a: Vec<f32> = lora.lora_a().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(lora.lora_a().dims(), &[4, 64]);
    assert_eq!(lora.lora_b().dims(), &[16, 4]);
    assert_eq!(lora.lora_a().dtype(), DType::F32);
    let bound = 1.0 / 8.0; // 1/√fan_in
    assert!(a.iter().all(|v| v.abs() <= bound));
    let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        max > 0.9 * bound,
        "A should fill U(-1/√in, 1/√in), max {max}"
    );
    let names: Vec<String> = lora.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["lora_A.weight", "lora_B.weight"]);
    // Same seed, same init; different seed, different init.
    let again = LoraLinear::new(Box::new(base.clone()), &config(0.0), 1, &Device::Cpu).unwrap();
    let other = LoraLinear::new(Box::new(base), &config(0.0), 2, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(again.lora_a(), lora.lora_a()), 0.0);
    assert!(max_abs_diff(other.lora_a(), lora.lora_a()) > 0.0);
}

#[test]
fn update_is_scaled_b_a_x() {
    let base = dense(6, 5, false);
    let lora = LoraLinear::new(Box::new(base.clone()), &config(0.0), 3, &Device::Cpu).unwrap();
    lora.lora_b()
        .set(&Tensor::randn(0f32, 1f32, (6, 4), &Device::Cpu).unwrap())
        .unwrap();
    let x = Tensor::randn(0f32, 1f32, (2, 5), &Device::Cpu).unwrap();
    let ba = lora.lora_b().matmul(lora.lora_a()).unwrap();
    let want =
        (base.forward(&x).unwrap() + (x.matmul(&ba.t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
    assert!(max_abs_diff(&lora.forward(&x).unwrap(), &want) < 1e-5);
    // Half-precision inputs: masters stay f32, the output follows the input dtype.
    let half = LoraLinear::new(
        Box::new(Dense::new(base.weight().to_dtype(DType::BF16).unwrap(), None).unwrap()),
        &config(0.0),
        3,
        &Device::Cpu,
    )
    .unwrap();
    half.lora_b().set(lora.lora_b().as_tensor()).unwrap();
    let y = half.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    assert!(max_abs_diff(&y, &want) < 0.1);
}

#[test]
fn dropout_is_seeded_and_off_in_eval() {
    let base = dense(8, 32, false);
    let make = || {
        let l = LoraLinear::new(Box::new(base.clone()), &config(0.5), 9, &Device::Cpu).unwrap();
        l.lora_b()
            .set(&Tensor::ones((8, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        l
    };
    let (l1, l2) = (make(), make());
    let x = Tensor::ones((4, 32), DType::F32, &Device::Cpu).unwrap();
    let (y1, y2) = (l1.forward(&x).unwrap(), l2.forward(&x).unwrap());
    assert_eq!(max_abs_diff(&y1, &y2), 0.0, "same seed, same masks");
    let y1b = l1.forward(&x).unwrap();
    assert!(max_abs_diff(&y1, &y1b) > 0.0, "masks change between calls");
    l1.set_training(false);
    assert!(!l1.is_training());
    let e1 = l1.forward(&x).unwrap();
    let e2 = l1.forward(&x).unwrap();
    assert_eq!(max_abs_diff(&e1, &e2), 0.0);
    // Eval output equals the un-dropped update.
    let base_out = l1.base().forward(&x).unwrap();
    let ba = l1.lora_b().matmul(l1.lora_a()).unwrap();
    let want = (base_out + (x.matmul(&ba.t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
    assert!(max_abs_diff(&e1, &want) < 1e-5);
}

#[test]
fn merge_and_unmerge_round_trip() {
    let base = dense(7, 9, true);
    let lora = LoraLinear::new(Box::new(base.clone()), &config(0.3), 4, &Device::Cpu).unwrap();
    lora.lora_b()
        .set(&Tensor::randn(0f32, 1f32, (7, 4), &Device::Cpu).unwrap())
        .unwrap();
    lora.set_training(false);
    let merged = lora.merge_to_dense(DType::F32).unwrap();
    let x = Tensor::randn(0f32, 1f32, (3, 9), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&merged.forward(&x).unwrap(), &lora.forward(&x).unwrap()) < 1e-5);
    let back = lora.unmerge_from_dense(&merged).unwrap();
    assert!(max_abs_diff(&back.weight(), &base.weight()) < 1e-5);
    // Merging over a base known only through `forward` (the default `dense_parts` probe).
    struct Opaque(Dense);
    impl LinearLayer for Opaque {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.0.forward(x)
        }
        fn in_features(&self) -> usize {
            self.0.in_features()
        }
        fn out_features(&self) -> usize {
            self.0.out_features()
        }
    }
    let opaque = LoraLinear::new(
        Box::new(Opaque(base.clone())),
        &config(0.0),
        4,
        &Device::Cpu,
    )
    .unwrap();
    opaque.lora_b().set(lora.lora_b().as_tensor()).unwrap();
    let merged2 = opaque.merge_to_dense(DType::F32).unwrap();
    assert!(max_abs_diff(&merged2.weight(), &merged.weight()) < 1e-5);
    assert!(max_abs_diff(merged2.bias().unwrap(), base.bias().unwrap()) < 1e-5);
}

#[test]
fn config_matching_and_validation() {
    let c = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        target_modules: vec!["q_proj".into(), "dense".into()],
    };
    assert!(c.matches("model.layers.3.self_attn.q_proj"));
    assert!(c.matches("model.layers.3.self_attn.dense"));
    assert!(!c.matches("model.layers.3.self_attn.xq_proj"));
    assert!(!c.matches("model.layers.3.mlp.fc1"));
    assert_eq!(c.scaling(), 2.0);
    let bad = LoraConfig { r: 0, ..c.clone() };
    assert!(LoraLinear::new(Box::new(dense(2, 2, false)), &bad, 0, &Device::Cpu).is_err());
    let bad = LoraConfig { dropout: 1.0, ..c };
    assert!(LoraLinear::new(Box::new(dense(2, 2, false)), &bad, 0, &Device::Cpu).is_err());
}

#[test]
fn norms_match_their_definitions() {
    let x = Tensor::randn(0f32, 2f32, (3, 10), &Device::Cpu).unwrap();
    let w = Tensor::randn(1f32, 0.1f32, 10, &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 0.1f32, 10, &Device::Cpu).unwrap();
    let ln = LayerNorm::new(w.clone(), b.clone(), 1e-5)
        .unwrap()
        .forward(&x)
        .unwrap();
    let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    assert!(max_abs_diff(&ln, &want) < 1e-5);
    let rms = RmsNorm::new(w.clone(), 1e-6).unwrap().forward(&x).unwrap();
    let want = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
    assert!(max_abs_diff(&rms, &want) < 1e-5);
    // Half-precision inputs come back in their dtype.
    let y = RmsNorm::new(w, 1e-6)
        .unwrap()
        .forward(&x.to_dtype(DType::F16).unwrap())
        .unwrap();
    assert_eq!(y.dtype(), DType::F16);
}

#[test]
fn rotary_matches_candle_rope_and_keeps_the_pass_through_part() {
    let (b, h, t, d) = (2, 3, 5, 8);
    let x = Tensor::randn(0f32, 1f32, (b, h, t, d), &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((b, 1))
        .unwrap();
    let full = Rotary::new(d, d, 10_000.0).unwrap();
    let (cos, sin) = full.cos_sin(&pos, DType::F32).unwrap();
    let got = full.apply(&x, &cos, &sin).unwrap();
    let c = cos
        .narrow(0, 0, 1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .narrow(D::Minus1, 0, d / 2)
        .unwrap();
    let s = sin
        .narrow(0, 0, 1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .narrow(D::Minus1, 0, d / 2)
        .unwrap();
    let want = candle_nn::rotary_emb::rope(
        &x.contiguous().unwrap(),
        &c.contiguous().unwrap(),
        &s.contiguous().unwrap(),
    )
    .unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-5);
    let partial = Rotary::new(d, d / 2, 10_000.0).unwrap();
    let (cos, sin) = partial.cos_sin(&pos, DType::F32).unwrap();
    let got = partial.apply(&x, &cos, &sin).unwrap();
    let tail = |t: &Tensor| t.narrow(D::Minus1, d / 2, d / 2).unwrap();
    assert_eq!(max_abs_diff(&tail(&got), &tail(&x)), 0.0);
    assert!(max_abs_diff(&got, &x) > 0.0);
    assert!(Rotary::new(8, 3, 10_000.0).is_err());
}

#[test]
fn dropout_drops_the_configured_fraction_and_keeps_the_mean() {
    let cfg = LoraConfig {
        r: 1,
        alpha: 1.0,
        dropout: 0.3,
        target_modules: vec![],
    };
    let n = 200_000;
    // Base zero, A = 1, B = 1, so the output is the sum of the dropped-out inputs.
    let base = Dense::new(
        Tensor::zeros((1, n), DType::F32, &Device::Cpu).unwrap(),
        None,
    )
    .unwrap();
    let l = LoraLinear::new(Box::new(base), &cfg, 5, &Device::Cpu).unwrap();
    l.lora_a()
        .set(&Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    l.lora_b()
        .set(&Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let x = Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap();
    let mean = l.forward(&x).unwrap().to_vec2::<f32>().unwrap()[0][0] as f64 / n as f64;
    assert!(
        (mean - 1.0).abs() < 0.01,
        "inverted dropout keeps the mean, got {mean}"
    );
    // The kept fraction, from the gradient wrt A (which is the scaled mask).
    let grads = l
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f32> = grads
        .get(l.lora_a())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let dropped = g.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
    assert!((dropped - 0.3).abs() < 0.01, "dropped fraction {dropped}");
}

#[test]
fn frozen_layers_record_no_backward_graph() {
    let base = dense(6, 5, false);
    let lora = LoraLinear::new(Box::new(base), &config(0.0), 3, &Device::Cpu).unwrap();
    let x = Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap();
    let live = lora.forward(&x).unwrap().sum_all().unwrap();
    assert!(
        live.backward()
            .unwrap()
            .get(lora.lora_a().as_tensor())
            .is_some(),
        "a live layer tracks A"
    );
    lora.freeze();
    assert!(!lora.is_training(), "frozen layers do not drop out");
    let frozen = lora.forward(&x).unwrap().sum_all().unwrap();
    assert!(
        frozen
            .backward()
            .unwrap()
            .get(lora.lora_a().as_tensor())
            .is_none(),
        "a frozen layer keeps no graph"
    );
}
