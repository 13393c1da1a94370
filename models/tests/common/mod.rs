//! Helpers shared by the model tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pipeline_models::weights::Weights;

/// `models/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// Input ids (u32), attention mask (u8) and reference logits (f32) of a parity fixture.
pub fn load_io(dir: &str) -> (Tensor, Tensor, Tensor) {
    let io =
        candle_core::safetensors::load(fixture(dir).join("io.safetensors"), &Device::Cpu).unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = io["attention_mask"].to_dtype(DType::U8).unwrap();
    (ids, mask, io["logits"].clone())
}

/// Random weights for the given HF tensor shapes: norm weights near 1, everything else
/// `N(0, scale²)`, in `dtype`. Deterministic for a given seed.
pub fn random_weights(
    shapes: &[(String, Vec<usize>)],
    dtype: DType,
    seed: u64,
) -> HashMap<String, Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let is_norm_weight = name.contains("norm") && name.ends_with("weight");
        let data: Vec<f64> = (0..n)
            .map(|_| {
                let u: f64 = rng.random_range(-1.0..1.0);
                if is_norm_weight {
                    1.0 + 0.2 * u
                } else {
                    0.5 * u
                }
            })
            .collect();
        let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        out.insert(name.clone(), t);
    }
    out
}

/// Weights from a map of tensors, on the CPU.
pub fn weights(tensors: HashMap<String, Tensor>) -> Weights {
    Weights::from_tensors(tensors, &Device::Cpu).unwrap()
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Mean next-token cross-entropy of `logits` `[b, t, v]` on `ids` `[b, t]`, over positions
/// whose target is a real token.
pub fn lm_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let (b, t, v) = logits.dims3().unwrap();
    let pred = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let target = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let keep = mask
        .narrow(1, 1, t - 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(pred.dtype())
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&pred, 1).unwrap();
    let picked = logp
        .gather(&target.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let total = (picked * &keep).unwrap().sum_all().unwrap();
    (total.neg().unwrap() / keep.sum_all().unwrap().to_scalar::<f64>().unwrap_or(1.0)).unwrap()
}
