//! `QuantLinear`: forward matches the dense layer on the dequantized weight, and backward gives
//! the input gradient (checked in f64 against finite differences) and nothing for the weight.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::max_abs_diff;
use pipeline_models::quant::{
    ggml::{GgmlFormat, GgmlQuantized},
    nf4::Nf4Tensor,
    QuantLinear, QuantWeight,
};
use pipeline_models::LinearLayer;
use std::sync::Arc;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-normal data without a global RNG.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let mut acc = 0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (acc - 2.0) * 0.8
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn layers() -> Vec<(&'static str, QuantLinear, Tensor)> {
    let w = randn(&[24, 64], 7);
    let b = randn(&[24], 8);
    let w256 = randn(&[16, 256], 9);
    let nf4 = Arc::new(Nf4Tensor::quantize(&w, true).unwrap());
    let q4k = GgmlQuantized::quantize(&w256, GgmlFormat::Q4K).unwrap();
    let q8 = GgmlQuantized::quantize(&w, GgmlFormat::Q8_0).unwrap();
    vec![
        (
            "nf4",
            QuantLinear::new(QuantWeight::Nf4(nf4), Some(b.clone())).unwrap(),
            b.clone(),
        ),
        (
            "q4k",
            QuantLinear::new(QuantWeight::Ggml(q4k), None).unwrap(),
            Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "q8_0",
            QuantLinear::new(QuantWeight::Ggml(q8), Some(b.clone())).unwrap(),
            b,
        ),
    ]
}

#[test]
fn forward_matches_dense_on_dequantized_weight() {
    for (name, layer, bias) in layers() {
        let wd = layer.weight().dequantize(DType::F32, &Device::Cpu).unwrap();
        let x = randn(&[2, 3, layer.in_features()], 11);
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, layer.out_features()]);
        let dense = x
            .broadcast_matmul(&wd.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let diff = max_abs_diff(&y, &dense);
        assert!(diff < 1e-4, "{name}: forward differs by {diff}");
        // bf16 input gives bf16 output.
        let yb = layer.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
    }
}

#[test]
fn input_gradient_matches_finite_differences_and_dense_layer() {
    for (name, layer, _) in layers() {
        let (inf, outf) = (layer.in_features(), layer.out_features());
        let x0 = randn(&[2, inf], 21).to_dtype(DType::F64).unwrap();
        let c = randn(&[2, outf], 22).to_dtype(DType::F64).unwrap();
        let x = Var::from_tensor(&x0).unwrap();
        let loss = (layer.forward(x.as_tensor()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads.get(x.as_tensor()).expect("input gradient recorded");
        assert_eq!(gx.dtype(), DType::F64);
        if let Some(b) = layer.bias() {
            assert!(grads.get(b).is_none(), "{name}: frozen bias got a gradient");
        }
        // Dense reference: d/dx sum(c ⊙ x Wᵀ) = c W.
        let wd = layer.weight().dequantize(DType::F64, &Device::Cpu).unwrap();
        let reference = c.matmul(&wd).unwrap();
        let diff = max_abs_diff(gx, &reference);
        assert!(diff < 1e-10, "{name}: grad vs dense");
        // Central finite differences on a few coordinates.
        let gxv = gx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let f = |v: &[f64]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), (2, inf), &Device::Cpu).unwrap();
            (layer.forward(&t).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for i in [0, 5, inf - 1, inf + 3, 2 * inf - 1] {
            let eps = 1e-5;
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (f(&p) - f(&m)) / (2.0 * eps);
            assert!(
                (fd - gxv[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{name}[{i}]: fd {fd} vs {}",
                gxv[i]
            );
        }
    }
}

#[test]
fn lora_style_adapter_over_quantized_base_gets_dense_gradients() {
    let (_, layer, _) = layers().remove(0);
    let a = Var::from_tensor(&(randn(&[4, 64], 31) * 0.1).unwrap()).unwrap();
    let b = Var::from_tensor(&(randn(&[24, 4], 32) * 0.1).unwrap()).unwrap();
    let x = randn(&[5, 64], 33);
    let wd = layer.weight().dequantize(DType::F32, &Device::Cpu).unwrap();
    let lora = |x: &Tensor| {
        x.matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
    };
    // Two stacked layers so the base's input gradient matters for the first adapter.
    let h = (layer.forward(&x).unwrap() + lora(&x))
        .unwrap()
        .tanh()
        .unwrap();
    let h2 = h.narrow(1, 0, 24).unwrap();
    let y = layer
        .forward(&Tensor::cat(&[&h2, &h2, &h2.narrow(1, 0, 16).unwrap()], 1).unwrap())
        .unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    // Same computation with the dense dequantized weight.
    let dense = |x: &Tensor| {
        x.matmul(&wd.t().unwrap())
            .unwrap()
            .broadcast_add(layer.bias().unwrap())
            .unwrap()
    };
    let h = (dense(&x) + lora(&x)).unwrap().tanh().unwrap();
    let h2 = h.narrow(1, 0, 24).unwrap();
    let y = dense(&Tensor::cat(&[&h2, &h2, &h2.narrow(1, 0, 16).unwrap()], 1).unwrap());
    let gd = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&a, &b] {
        let (q, d) = (
            g.get(v.as_tensor()).unwrap(),
            gd.get(v.as_tensor()).unwrap(),
        );
        let diff = max_abs_diff(q, d);
        assert!(diff < 1e-4, "adapter gradient differs by {diff}");
    }
}

#[test]
fn rejects_bad_shapes() {
    let w = randn(&[4, 64], 1);
    let q = QuantWeight::Nf4(Arc::new(Nf4Tensor::quantize(&w, false).unwrap()));
    assert!(QuantLinear::new(q.clone(), Some(randn(&[3], 2))).is_err());
    let layer = QuantLinear::new(q, None).unwrap();
    assert!(layer.forward(&randn(&[2, 63], 3)).is_err());
    let w3 = randn(&[2, 2, 64], 1);
    let q3 = QuantWeight::Nf4(Arc::new(Nf4Tensor::quantize(&w3, false).unwrap()));
    assert!(QuantLinear::new(q3, None).is_err());
}
