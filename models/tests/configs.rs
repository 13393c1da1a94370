//! The configs of the real checkpoints the experiments use deserialize with the right values
//! (texts as published alongside the weights, nulls included).

use pipeline_models::arch::{LlamaConfig, PhiConfig};
use pipeline_models::layers::Activation;

const PHI_1_5: &str = r#"{
  "_name_or_path": "microsoft/phi-1_5", "architectures": ["PhiForCausalLM"],
  "attention_dropout": 0.0, "bos_token_id": null, "embd_pdrop": 0.0, "eos_token_id": null,
  "hidden_act": "gelu_new", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 8192, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
  "model_type": "phi", "num_attention_heads": 32, "num_hidden_layers": 24,
  "num_key_value_heads": null, "partial_rotary_factor": 0.5, "qk_layernorm": false,
  "resid_pdrop": 0.0, "rope_scaling": null, "rope_theta": 10000.0,
  "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.37.0",
  "use_cache": true, "vocab_size": 51200
}"#;

const SMOLLM2_135M: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
  "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": true,
  "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
  "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": false,
  "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": true,
  "vocab_size": 49152
}"#;

#[test]
fn phi_1_5_config() {
    let c: PhiConfig = serde_json::from_str(PHI_1_5).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.vocab_size
        ),
        (2048, 24, 32, 51200)
    );
    assert_eq!(c.head_dim(), 64);
    assert_eq!(c.hidden_act, Activation::GeluNew);
    assert_eq!(c.partial_rotary_factor, 0.5);
    assert_eq!(c.num_key_value_heads, None);
    let shapes = c.tensor_shapes();
    let params: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    // phi-1_5 has 1.42 B parameters.
    assert!((1_400_000_000..1_450_000_000).contains(&params), "{params}");
}

#[test]
fn smollm2_config() {
    let c: LlamaConfig = serde_json::from_str(SMOLLM2_135M).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (576, 30, 9, Some(3))
    );
    assert_eq!(c.head_dim(), 64);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    let params: usize = c
        .tensor_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    // SmolLM2-135M: 134.5 M parameters with tied embeddings.
    assert!((134_000_000..135_000_000).contains(&params), "{params}");
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    let mut v: serde_json::Value = serde_json::from_str(SMOLLM2_135M).unwrap();
    v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    let c: LlamaConfig = serde_json::from_value(v).unwrap();
    let w = pipeline_models::weights::Weights::from_tensors(
        Default::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let err = match pipeline_models::arch::Llama::new(
        &c,
        &w,
        candle_core::DType::F32,
        &mut pipeline_models::arch::DenseFactory,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("rope scaling is unsupported"),
    };
    assert!(err.contains("rope_scaling"), "{err}");
}
