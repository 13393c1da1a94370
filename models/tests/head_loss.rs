//! `loss_sum` (the LM head fused with the cross-entropy on the CPU) against the loss of the
//! materialised logits, `masked_cross_entropy_sum(forward(..))`: same value and same gradient
//! for every trainable variable, in f64 on both architectures (Phi's head has a bias, Llama's is
//! tied to the embeddings), with prompt positions and padding masked out; plus a
//! finite-difference check of `loss_sum` itself and the fallback for an adapted head.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs_diff, random_weights, weights};
use pipeline_models::arch::{
    DecoderModel, DenseFactory, Llama, LlamaConfig, LoraFactory, Phi, PhiConfig,
};
use pipeline_models::train::masked_cross_entropy_sum;
use pipeline_models::LoraConfig;
use rand::{Rng, SeedableRng};

fn phi(targets: &[&str]) -> DecoderModel {
    let config: PhiConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 2, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
        "layer_norm_eps": 1e-5
    }))
    .unwrap();
    let tensors = random_weights(&config.tensor_shapes(), DType::F64, 1);
    let model = Phi::new(
        &config,
        &weights(tensors),
        DType::F64,
        &mut lora_factory(targets),
    )
    .unwrap();
    DecoderModel::new(model)
}

fn llama(targets: &[&str]) -> DecoderModel {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": true
    }))
    .unwrap();
    let tensors = random_weights(&config.tensor_shapes(), DType::F64, 2);
    let model = Llama::new(
        &config,
        &weights(tensors),
        DType::F64,
        &mut lora_factory(targets),
    )
    .unwrap();
    DecoderModel::new(model)
}

fn lora_factory(targets: &[&str]) -> LoraFactory<DenseFactory> {
    let config = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    };
    let mut factory = LoraFactory::new(DenseFactory, config, 7);
    factory.master_dtype = DType::F64;
    factory
}

/// Ids, attention mask (row 1 right-padded) and a loss mask that also leaves out a prompt.
fn batch() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::new(&[[1u32, 4, 7, 2, 9, 3], [3, 10, 0, 5, 6, 0]], &Device::Cpu).unwrap();
    let attention = Tensor::new(&[[1u8, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let loss_mask = Tensor::new(&[[0u8, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    (ids, attention, loss_mask)
}

/// Gives every `lora_B` random values, so that every adapter's gradient is non-zero.
fn randomize_b(vars: &[(String, Var)]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for (name, var) in vars {
        if name.ends_with("lora_B.weight") {
            let data: Vec<f64> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.5..0.5))
                .collect();
            var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

fn gradients(loss: &Tensor, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    let grads = loss.backward().unwrap();
    vars.iter()
        .map(|(name, var)| {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            (name.clone(), g.clone())
        })
        .collect()
}

fn check_against_materialised_logits(model: &DecoderModel) {
    let vars = model.trainable_vars();
    assert!(!vars.is_empty());
    randomize_b(&vars);
    let (ids, attention, loss_mask) = batch();

    let (fused, fused_count) = model.loss_sum(&ids, &attention, &loss_mask, true).unwrap();
    let logits = model.forward(&ids, &attention).unwrap();
    let (composite, count) = masked_cross_entropy_sum(&logits, &ids, &loss_mask).unwrap();
    assert_eq!(fused_count, count);
    assert_eq!(count, 7);
    let diff = max_abs_diff(&fused, &composite);
    assert!(diff < 1e-10, "loss differs by {diff}");

    // Evaluation's loss: the same value, detached from everything before the head.
    let (detached, _) = model.loss_sum(&ids, &attention, &loss_mask, false).unwrap();
    assert_eq!(max_abs_diff(&detached, &fused), 0.0);
    let grads = detached.backward().unwrap();
    for (name, var) in vars.iter().filter(|(n, _)| !n.starts_with("lm_head")) {
        assert!(
            grads.get(var).is_none(),
            "{name} got a gradient in evaluation"
        );
    }

    let fused_grads = gradients(&fused, &vars);
    let composite_grads = gradients(&composite, &vars);
    for (name, _) in &vars {
        let (a, b) = (&fused_grads[name], &composite_grads[name]);
        let diff = max_abs_diff(a, b);
        assert!(diff < 1e-10, "{name}: gradients differ by {diff}");
        let norm = a
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient {norm}");
    }
}

#[test]
fn phi_loss_sum_matches_the_loss_of_its_logits() {
    check_against_materialised_logits(&phi(&["q_proj", "fc2"]));
}

#[test]
fn llama_loss_sum_matches_the_loss_of_its_logits() {
    check_against_materialised_logits(&llama(&["v_proj", "down_proj"]));
}

/// An adapted head has no frozen parts to fuse; `loss_sum` then scores the head's logits.
#[test]
fn an_adapted_head_falls_back_to_its_logits() {
    check_against_materialised_logits(&llama(&["lm_head"]));
}

/// `loss_sum`'s gradient against central differences of `loss_sum` itself.
#[test]
fn loss_sum_gradients_match_finite_differences() {
    for model in [phi(&["fc1"]), llama(&["o_proj"])] {
        let vars = model.trainable_vars();
        randomize_b(&vars);
        let (ids, attention, loss_mask) = batch();
        let loss = |m: &DecoderModel| {
            m.loss_sum(&ids, &attention, &loss_mask, true)
                .unwrap()
                .0
                .to_scalar::<f64>()
                .unwrap()
        };
        let (sum, _) = model.loss_sum(&ids, &attention, &loss_mask, true).unwrap();
        let grads = gradients(&sum, &vars);
        let eps = 1e-6;
        for (name, var) in &vars {
            let analytic: Vec<f64> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            for i in [0, base.len() / 2, base.len() - 1] {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&model)
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let tol = 1e-6 * (1.0 + analytic[i].abs().max(numeric.abs()));
                assert!(
                    (analytic[i] - numeric).abs() < tol,
                    "{name}[{i}]: analytic {} vs numeric {numeric}",
                    analytic[i]
                );
            }
        }
    }
}
