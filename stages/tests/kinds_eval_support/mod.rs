//! Fixtures shared by the `kinds_eval_*` tests: a tiny random Llama checkpoint, a byte-level
//! tokenizer, and a helper to run a stage kind standalone.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use pipeline_engine::{Stage, StageContext};
use pipeline_models::arch::LlamaConfig;

/// Vocabulary: the 256 byte-level symbols plus `<|endoftext|>` (id 256).
pub const VOCAB: usize = 257;
/// Id of `<|endoftext|>`.
pub const EOS: u32 = 256;

/// GPT-2's byte -> printable char table, as the ByteLevel pre-tokenizer uses it.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A byte-level BPE `tokenizer.json` without merges: one token per byte.
pub fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = bytes_to_unicode()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .chain([("<|endoftext|>".to_string(), serde_json::json!(EOS))])
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": EOS, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// Config of the tiny Llama.
pub fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    })
}

/// Deterministic uniform values in `[-scale, scale]` of `shape`.
pub fn random_tensor(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| (rng.random_range(-1.0..1.0) * scale) as f32)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Writes a tiny random Llama model artifact (config.json, model.safetensors,
/// tokenizer.json) into `dir`.
pub fn write_tiny_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = tiny_config();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let parsed: LlamaConfig = serde_json::from_value(config).unwrap();
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in parsed.tensor_shapes().into_iter().enumerate() {
        let t = if name.contains("norm") {
            (random_tensor(&shape, 0.2, i as u64) + 1.0).unwrap()
        } else {
            random_tensor(&shape, 0.5, i as u64)
        };
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    // The `model` artifact contract: `model.json` names the architecture and end tokens.
    let eos = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .unwrap()
        .token_to_id("<|endoftext|>")
        .unwrap();
    std::fs::write(dir.join("model.json"), serde_json::json!({"architecture": "llama", "eos_token_ids": [eos], "pad_token_id": null, "source": "tiny test model"}).to_string()).unwrap();
}

/// Writes a PEFT adapter for the tiny model: rank 2 on `q_proj` and `v_proj` of both layers,
/// with non-zero A and B (so it changes the model).
pub fn write_tiny_adapter(dir: &Path) -> HashMap<String, Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "lora_dropout": 0.05,
                           "target_modules": ["q_proj", "v_proj"], "bias": "none",
                           "task_type": "CAUSAL_LM"})
        .to_string(),
    )
    .unwrap();
    let mut tensors = HashMap::new();
    let mut seed = 1000;
    for l in 0..2 {
        // q_proj: 16 -> 16; v_proj: 16 -> 8 (one kv head of 8 channels).
        for (m, out) in [("q_proj", 16), ("v_proj", 8)] {
            let base = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            tensors.insert(
                format!("{base}.lora_A.weight"),
                random_tensor(&[2, 16], 1.0, seed),
            );
            tensors.insert(
                format!("{base}.lora_B.weight"),
                random_tensor(&[out, 2], 1.0, seed + 1),
            );
            seed += 2;
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    tensors
}

/// Output of a standalone stage run.
pub struct Ran {
    /// Output directories by name.
    pub outputs: BTreeMap<String, PathBuf>,
    /// Metadata the stage recorded.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Runs kind `S` with `params` (JSON) on `inputs`, outputs under `root/<stage>/<output>`.
pub fn run_stage<S: Stage>(
    root: &Path,
    stage: &str,
    params: serde_json::Value,
    inputs: &[(&str, &[&Path])],
    seed: u64,
) -> miette::Result<Ran> {
    let params: S::Params = serde_json::from_value(params).unwrap();
    S::validate(&params).map_err(|e| miette::miette!("{e}"))?;
    let mut outputs = BTreeMap::new();
    for o in S::outputs() {
        let dir = root.join(stage).join(o.name);
        std::fs::create_dir_all(&dir).unwrap();
        outputs.insert(o.name.to_string(), dir);
    }
    let inputs = inputs
        .iter()
        .map(|(slot, dirs)| {
            (
                slot.to_string(),
                dirs.iter().map(|d| d.to_path_buf()).collect(),
            )
        })
        .collect();
    let ckpt = root.join(stage).join("checkpoint");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut ctx = StageContext::standalone(stage, seed, inputs, outputs.clone(), ckpt);
    S::run(&params, &mut ctx)?;
    Ok(Ran {
        outputs,
        metadata: ctx.metadata().clone(),
    })
}

/// Reads a JSON Lines file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Writes a `problems` artifact holding `problems`.
pub fn write_problems(dir: &Path, problems: &[pipeline_stages::evalsets::EvalProblem]) {
    std::fs::create_dir_all(dir).unwrap();
    let text: String = problems
        .iter()
        .map(|p| serde_json::to_string(p).unwrap() + "\n")
        .collect();
    std::fs::write(dir.join("problems.jsonl"), text).unwrap();
}

/// The shared data directory, if present.
pub fn shared_data() -> Option<PathBuf> {
    pipeline_stages::evalsets::shared_data_dir()
}
