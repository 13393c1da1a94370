//! Gradient checkpointing gives the gradients of the plain forward: same loss, same gradient for
//! every adapter variable (f64, so only summation order may differ), with adapter dropout on, so
//! a recomputation that drew other dropout masks than the forward would fail.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{lm_loss, random_weights, weights};
use pipeline_models::arch::{DecoderModel, DenseFactory, Llama, LlamaConfig, LoraFactory, Phi};
use pipeline_models::checkpoint::{take_side_gradients, total_gradient};
use pipeline_models::LoraConfig;

fn lora() -> LoraFactory<DenseFactory> {
    let config = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.3,
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "dense",
            "fc1",
            "fc2",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
    };
    let mut f = LoraFactory::new(DenseFactory, config, 7);
    f.master_dtype = DType::F64;
    f
}

fn models() -> Vec<(&'static str, DecoderModel)> {
    let phi: pipeline_models::arch::PhiConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 3,
        "num_attention_heads": 2, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
        "layer_norm_eps": 1e-5
    }))
    .unwrap();
    let llama: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": true
    }))
    .unwrap();
    let phi_w = weights(random_weights(&phi.tensor_shapes(), DType::F64, 1));
    let llama_w = weights(random_weights(&llama.tensor_shapes(), DType::F64, 2));
    vec![
        (
            "phi",
            DecoderModel::new(Phi::new(&phi, &phi_w, DType::F64, &mut lora()).unwrap()),
        ),
        (
            "llama",
            DecoderModel::new(Llama::new(&llama, &llama_w, DType::F64, &mut lora()).unwrap()),
        ),
    ]
}

/// Non-zero `lora_B` values, so that every adapter variable has a non-trivial gradient.
fn randomize_b(vars: &[(String, Var)]) {
    for (i, (name, var)) in vars.iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            let data: Vec<f64> = (0..n)
                .map(|j| ((i * 31 + j * 17) % 13) as f64 / 13.0 - 0.5)
                .collect();
            var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

/// Loss and the gradient of every variable, with dropout drawn from stream 42.
fn loss_and_grads(model: &DecoderModel) -> (f64, HashMap<String, Tensor>, usize) {
    let ids = Tensor::new(&[[1u32, 4, 7, 2, 9, 3], [3, 10, 0, 5, 6, 8]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    model.set_dropout_stream(42);
    let logits = model.forward(&ids, &mask).unwrap();
    let loss = lm_loss(&logits, &ids, &mask);
    take_side_gradients();
    let grads = loss.backward().unwrap();
    let side = take_side_gradients();
    let by_name = model
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = total_gradient(&grads, &side, &var)
                .unwrap()
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            (name, g)
        })
        .collect();
    (loss.to_scalar::<f64>().unwrap(), by_name, side.len())
}

#[test]
fn checkpointed_layers_give_the_plain_gradients_with_the_same_dropout() {
    for (arch, model) in models() {
        model.set_training(true);
        randomize_b(&model.trainable_vars());
        let (plain_loss, plain, no_side) = loss_and_grads(&model);
        assert_eq!(no_side, 0, "{arch}: side gradients without checkpointing");
        model.set_gradient_checkpointing(true);
        let (loss, grads, side) = loss_and_grads(&model);
        // Layers 1 and 2 are checkpointed (layer 0's input, the embedding, records no
        // backward): 2 layers x 2 variables x their adapted projections.
        let per_layer = if arch == "phi" { 6 } else { 7 };
        assert_eq!(side, 2 * 2 * per_layer, "{arch}");
        assert!(
            (loss - plain_loss).abs() < 1e-12,
            "{arch}: {loss} vs {plain_loss}"
        );
        for (name, g) in &grads {
            let reference = &plain[name];
            let diff = common::max_abs_diff(g, reference);
            let scale = common::max_abs_diff(reference, &reference.zeros_like().unwrap());
            assert!(scale > 0.0, "{arch}: {name} has an all-zero gradient");
            assert!(
                diff <= 1e-10 * (1.0 + scale),
                "{arch}: {name} differs by {diff} (scale {scale})"
            );
        }
        // Checkpointing changes no state: a plain pass afterwards matches the first.
        model.set_gradient_checkpointing(false);
        let (again, _, _) = loss_and_grads(&model);
        assert_eq!(again, plain_loss, "{arch}");
    }
}
