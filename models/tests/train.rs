//! A tiny model with LoRA adapters memorises a few sequences: the loss must fall.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::{lm_loss, random_weights, weights};
use pipeline_models::arch::{DenseFactory, Llama, LlamaConfig, LoraFactory, Phi, PhiConfig};
use pipeline_models::Decoder;
use pipeline_models::LoraConfig;

fn lora(targets: &[&str]) -> LoraFactory<DenseFactory> {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    };
    LoraFactory::new(DenseFactory, config, 1)
}

fn data() -> (Tensor, Tensor) {
    let ids = Tensor::new(
        &[
            [1u32, 5, 9, 13, 17, 21, 25, 29],
            [2, 30, 3, 28, 4, 26, 0, 0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(
        &[[1u8, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    (ids, mask)
}

fn train(forward: &dyn Fn(&Tensor, &Tensor) -> Tensor, vars: Vec<(String, Var)>) -> (f64, f64) {
    let (ids, mask) = data();
    let params = ParamsAdamW {
        lr: 2e-2,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars.into_iter().map(|(_, v)| v).collect(), params).unwrap();
    let first = lm_loss(&forward(&ids, &mask), &ids, &mask)
        .to_scalar::<f32>()
        .unwrap() as f64;
    let mut last = first;
    for _ in 0..40 {
        let loss = lm_loss(&forward(&ids, &mask), &ids, &mask);
        last = loss.to_scalar::<f32>().unwrap() as f64;
        opt.backward_step(&loss).unwrap();
    }
    eprintln!("loss {first:.3} -> {last:.3}");
    (first, last)
}

#[test]
fn llama_with_lora_memorises_sequences() {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true
    }))
    .unwrap();
    let w = weights(random_weights(&cfg.tensor_shapes(), DType::F32, 1));
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let model = Llama::new(&cfg, &w, DType::F32, &mut lora(&targets)).unwrap();
    let (first, last) = train(&|i, m| model.forward(i, m).unwrap(), model.trainable_vars());
    assert!(last < 0.3 * first && last < 1.0, "loss {first} -> {last}");
}

#[test]
fn phi_with_lora_memorises_sequences() {
    let cfg: PhiConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4
    }))
    .unwrap();
    let w = weights(random_weights(&cfg.tensor_shapes(), DType::F32, 2));
    let model = Phi::new(
        &cfg,
        &w,
        DType::F32,
        &mut lora(&["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]),
    )
    .unwrap();
    let (first, last) = train(&|i, m| model.forward(i, m).unwrap(), model.trainable_vars());
    assert!(last < 0.3 * first && last < 1.0, "loss {first} -> {last}");
}
