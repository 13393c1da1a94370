//! The `generate` kind on a tiny random Llama with a byte-level tokenizer: greedy output
//! equals a direct `generate_batch` call, sampling gives n samples per task, checkpoints are
//! resumed, and PEFT adapters are applied by name with shape checks.

mod kinds_eval_support;

use std::path::Path;

use candle_core::{DType, Device};
use kinds_eval_support::{
    read_jsonl, run_stage, write_problems, write_tiny_adapter, write_tiny_model, EOS,
};
use pipeline_models::arch::{DecoderModel, DenseFactory, Llama};
use pipeline_models::artifact::load_for_inference;
use pipeline_models::generate::{generate_batch, GenerateConfig, SamplingParams};
use pipeline_stages::evalsets::{
    generation_requests, replication_problems, DEFAULT_INSTRUCTION_TEMPLATE,
};
use pipeline_stages::kinds::generate::Generate;

fn fixtures(root: &Path, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = root.join("model");
    write_tiny_model(&model);
    let problems = root.join("problems");
    let set: Vec<_> = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE)
        .unwrap()
        .into_iter()
        .take(n)
        .collect();
    write_problems(&problems, &set);
    (model, problems)
}

#[test]
fn greedy_samples_match_a_direct_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, problems) = fixtures(tmp.path(), 3);
    let ran = run_stage::<Generate>(
        tmp.path(),
        "generate",
        serde_json::json!({"max_new_tokens": 12, "batch_size": 2, "checkpoint_every": 2}),
        &[
            ("model", &[model.as_path()]),
            ("problems", &[problems.as_path()]),
        ],
        7,
    )
    .unwrap();
    let out = &ran.outputs["samples"];
    let rows = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .any(|r| !r["completion"].as_str().unwrap().is_empty()),
        "{rows:?}"
    );

    // The same generation done by hand.
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let m = Llama::from_hf_dir(&model, &Device::Cpu, DType::F32, &mut DenseFactory).unwrap();
    let set: Vec<_> = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE)
        .unwrap()
        .into_iter()
        .take(3)
        .collect();
    let requests = generation_requests(&set, 7, |t| {
        tokenizer.encode(t, true).map(|e| e.get_ids().to_vec())
    })
    .unwrap();
    let config = GenerateConfig {
        max_new_tokens: 12,
        sampling: SamplingParams::greedy(),
        eos_token_ids: vec![EOS],
        ..Default::default()
    };
    let want = generate_batch(&m, &requests, &config, |ids| {
        tokenizer.decode(ids, true).unwrap()
    })
    .unwrap();
    for (i, row) in rows.iter().enumerate() {
        let c = &want.completions[i][0];
        assert_eq!(row["task_id"], set[i].task_id.as_str());
        assert_eq!(row["completion"], c.text.as_str(), "task {i}");
        assert_eq!(row["sample_index"], 0);
        assert_eq!(row["generated_tokens"], c.token_ids.len());
        assert_eq!(row["seed"], c.seed);
    }
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation.json")).unwrap())
            .unwrap();
    assert_eq!(gen["samples"], 3);
    assert_eq!(gen["problems"], 3);
    assert_eq!(gen["eos_token_ids"], serde_json::json!([EOS]));
    assert_eq!(gen["adapter"], false);
    let total: u64 = rows
        .iter()
        .map(|r| r["generated_tokens"].as_u64().unwrap())
        .sum();
    assert!(gen["generated_tokens"].as_u64().unwrap() >= total);
    assert_eq!(ran.metadata["samples"], 3);
}

/// `kv_cache_dtype = "f16"` reaches the generation (the stage's samples are a direct
/// generation's with an f16 cache), and left unset it is not part of the parameters the key
/// is made from, so stages cached before it existed stay cached.
#[test]
fn the_kv_cache_dtype_is_passed_on_and_unset_it_leaves_the_parameters_unchanged() {
    use pipeline_stages::kinds::generate::GenerateParams;
    let unset = serde_json::to_value(GenerateParams::default()).unwrap();
    assert!(unset.get("kv_cache_dtype").is_none(), "{unset}");
    let set: GenerateParams =
        serde_json::from_value(serde_json::json!({"kv_cache_dtype": "f16"})).unwrap();
    assert_eq!(serde_json::to_value(&set).unwrap()["kv_cache_dtype"], "f16");

    let tmp = tempfile::tempdir().unwrap();
    let (model, problems) = fixtures(tmp.path(), 2);
    let ran = run_stage::<Generate>(
        tmp.path(),
        "generate",
        serde_json::json!({"max_new_tokens": 12, "kv_cache_dtype": "f16"}),
        &[
            ("model", &[model.as_path()]),
            ("problems", &[problems.as_path()]),
        ],
        7,
    )
    .unwrap();
    let rows = read_jsonl(&ran.outputs["samples"].join("samples.jsonl"));
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let m = Llama::from_hf_dir(&model, &Device::Cpu, DType::F32, &mut DenseFactory).unwrap();
    let set: Vec<_> = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE)
        .unwrap()
        .into_iter()
        .take(2)
        .collect();
    let requests = generation_requests(&set, 7, |t| {
        tokenizer.encode(t, true).map(|e| e.get_ids().to_vec())
    })
    .unwrap();
    let config = GenerateConfig {
        max_new_tokens: 12,
        eos_token_ids: vec![EOS],
        kv_cache_dtype: Some(DType::F16),
        ..Default::default()
    };
    let want = generate_batch(&m, &requests, &config, |ids| {
        tokenizer.decode(ids, true).unwrap()
    })
    .unwrap();
    assert_eq!(rows.len(), 2);
    for (row, samples) in rows.iter().zip(&want.completions) {
        assert_eq!(row["completion"], samples[0].text.as_str());
    }
}

#[test]
fn sampling_gives_num_samples_per_task_and_depends_on_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, problems) = fixtures(tmp.path(), 2);
    let params = serde_json::json!({"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95, "num_samples": 3});
    let inputs: &[(&str, &[&Path])] = &[
        ("model", &[model.as_path()]),
        ("problems", &[problems.as_path()]),
    ];
    let a = run_stage::<Generate>(tmp.path(), "a", params.clone(), inputs, 1).unwrap();
    let b = run_stage::<Generate>(tmp.path(), "b", params.clone(), inputs, 1).unwrap();
    let c = run_stage::<Generate>(tmp.path(), "c", params, inputs, 2).unwrap();
    let rows =
        |r: &kinds_eval_support::Ran| read_jsonl(&r.outputs["samples"].join("samples.jsonl"));
    let (ra, rb, rc) = (rows(&a), rows(&b), rows(&c));
    assert_eq!(ra.len(), 6);
    let idx: Vec<u64> = ra
        .iter()
        .map(|r| r["sample_index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2, 0, 1, 2]);
    for r in &ra {
        assert!(["stop", "eos", "length"].contains(&r["finish_reason"].as_str().unwrap()));
    }
    assert_eq!(ra, rb, "same seed, same samples");
    let texts = |rows: &[serde_json::Value]| {
        rows.iter()
            .map(|r| r["completion"].clone())
            .collect::<Vec<_>>()
    };
    assert_ne!(
        texts(&ra),
        texts(&rc),
        "another experiment seed should give other samples"
    );
}

#[test]
fn an_interrupted_run_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, problems) = fixtures(tmp.path(), 3);
    let params = serde_json::json!({"max_new_tokens": 6, "checkpoint_every": 1});
    let inputs: &[(&str, &[&Path])] = &[
        ("model", &[model.as_path()]),
        ("problems", &[problems.as_path()]),
    ];
    let first = run_stage::<Generate>(tmp.path(), "g", params.clone(), inputs, 0).unwrap();
    let rows = read_jsonl(&first.outputs["samples"].join("samples.jsonl"));
    // Pretend an earlier attempt finished the second task only (with a marked text).
    let mut saved = rows[1].clone();
    saved["completion"] = "FROM CHECKPOINT".into();
    let ckpt = tmp.path().join("g2").join("checkpoint");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("samples.partial.jsonl"), format!("{saved}\n")).unwrap();
    let second = run_stage::<Generate>(tmp.path(), "g2", params, inputs, 0).unwrap();
    let rows2 = read_jsonl(&second.outputs["samples"].join("samples.jsonl"));
    assert_eq!(rows2.len(), 3);
    assert_eq!(rows2[0], rows[0]);
    assert_eq!(rows2[1]["completion"], "FROM CHECKPOINT");
    assert_eq!(rows2[2], rows[2]);
    assert_eq!(second.metadata["resumed_problems"], 1);
}

#[test]
fn adapter_tensors_are_copied_into_the_lora_vars() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, _) = fixtures(tmp.path(), 1);
    let adapter = tmp.path().join("adapter");
    let tensors = write_tiny_adapter(&adapter);
    let cfg = pipeline_models::peft::lora_config_of(&adapter).unwrap();
    assert_eq!((cfg.r, cfg.alpha, cfg.dropout), (2, 8.0, 0.05));
    let model = load_for_inference(&model_dir, Some(&adapter), &Device::Cpu, DType::F32)
        .map(|loaded| loaded.model)
        .unwrap();
    let vars = model.trainable_vars();
    assert_eq!(vars.len(), 8);
    for (name, var) in &vars {
        let want = &tensors[&format!("base_model.model.{name}")];
        let diff = (var.as_tensor() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
}

#[test]
fn adapter_changes_generation_and_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, problems) = fixtures(tmp.path(), 2);
    let adapter = tmp.path().join("adapter");
    write_tiny_adapter(&adapter);
    let params = serde_json::json!({"max_new_tokens": 16});
    let plain = run_stage::<Generate>(
        tmp.path(),
        "plain",
        params.clone(),
        &[
            ("model", &[model.as_path()]),
            ("problems", &[problems.as_path()]),
        ],
        0,
    )
    .unwrap();
    let tuned = run_stage::<Generate>(
        tmp.path(),
        "tuned",
        params,
        &[
            ("model", &[model.as_path()]),
            ("problems", &[problems.as_path()]),
            ("adapter", &[adapter.as_path()]),
        ],
        0,
    )
    .unwrap();
    let read =
        |r: &kinds_eval_support::Ran| read_jsonl(&r.outputs["samples"].join("samples.jsonl"));
    let (p, t) = (read(&plain), read(&tuned));
    let ids = |rows: &[serde_json::Value]| {
        rows.iter()
            .map(|r| r["task_id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&p), ids(&t));
    assert_ne!(p, t, "a non-zero adapter must change greedy output");
    let gen: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tuned.outputs["samples"].join("generation.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(gen["adapter"], true);
}

#[test]
fn adapter_mismatches_are_refused_with_the_tensor_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, _) = fixtures(tmp.path(), 1);
    let adapter = tmp.path().join("adapter");
    let mut tensors = write_tiny_adapter(&adapter);
    let path = adapter.join("adapter_model.safetensors");
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".to_string();
    let good = tensors[&key].clone();

    // Wrong shape.
    tensors.insert(
        key.clone(),
        kinds_eval_support::random_tensor(&[16, 2], 1.0, 5),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_for_inference(&model_dir, Some(&adapter), &Device::Cpu, DType::F32)
        .map(|loaded| loaded.model)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("layers.1.self_attn.v_proj.lora_B.weight") && err.contains("shape"),
        "{err}"
    );

    // Missing tensor.
    tensors.remove(&key);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_for_inference(&model_dir, Some(&adapter), &Device::Cpu, DType::F32)
        .map(|loaded| loaded.model)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("v_proj") && err.contains("no lora_B.weight"),
        "{err}"
    );

    // A tensor for a module the config does not target.
    tensors.insert(key, good);
    tensors.insert(
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
        kinds_eval_support::random_tensor(&[2, 16], 1.0, 6),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_for_inference(&model_dir, Some(&adapter), &Device::Cpu, DType::F32)
        .map(|loaded| loaded.model)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("up_proj"), "{err}");

    // Regex target_modules are refused rather than misread.
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 8, "target_modules": ".*q_proj"}"#,
    )
    .unwrap();
    let err = pipeline_models::peft::lora_config_of(&adapter)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("regular expression"), "{err}");

    // And applying an adapter to a model built without LoRA layers says which module is missing.
    std::fs::write(adapter.join("adapter_config.json"), r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj"]}"#).unwrap();
    let plain = DecoderModel::new(
        Llama::from_hf_dir(&model_dir, &Device::Cpu, DType::F32, &mut DenseFactory).unwrap(),
    );
    let err = pipeline_models::artifact::apply_adapter(&plain, &adapter)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("invalid LoRA adapter") && err.contains("proj"),
        "{err}"
    );
}

#[test]
fn missing_model_files_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, problems) = fixtures(tmp.path(), 1);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run_stage::<Generate>(
        tmp.path(),
        "g",
        serde_json::json!({}),
        &[
            ("model", &[empty.as_path()]),
            ("problems", &[problems.as_path()]),
        ],
        0,
    )
    .err()
    .unwrap();
    // The model artifact's `model.json` is read first: it says what the directory holds.
    assert!(format!("{err:?}").contains("model.json"), "{err:?}");
    std::fs::write(
        empty.join("tokenizer.json"),
        kinds_eval_support::tokenizer_json(),
    )
    .unwrap();
    let err = run_stage::<Generate>(
        tmp.path(),
        "g2",
        serde_json::json!({}),
        &[
            ("model", &[empty.as_path()]),
            ("problems", &[problems.as_path()]),
        ],
        0,
    )
    .err()
    .unwrap();
    assert!(format!("{err:?}").contains("model.json"), "{err:?}");
    // Greedy decoding with several samples is a manifest mistake.
    let p: pipeline_stages::kinds::generate::GenerateParams =
        serde_json::from_value(serde_json::json!({"num_samples": 4})).unwrap();
    assert!(<Generate as pipeline_engine::Stage>::validate(&p)
        .unwrap_err()
        .contains("temperature"));
}

/// `prompt_style = "instruct"` asks through the model's chat template and records programs
/// built from the opened fence; a model without a template is refused with what to do.
#[test]
fn instruct_prompts_go_through_the_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, problems) = fixtures(tmp.path(), 2);
    let params = serde_json::json!({"max_new_tokens": 6, "prompt_style": "instruct"});
    let inputs: &[(&str, &[&Path])] = &[
        ("model", &[model.as_path()]),
        ("problems", &[problems.as_path()]),
    ];
    let err = run_stage::<Generate>(tmp.path(), "no-template", params.clone(), inputs, 0)
        .err()
        .unwrap();
    assert!(format!("{err:?}").contains("chat template"), "{err:?}");

    let config_path = model.join("tokenizer_config.json");
    let mut config: serde_json::Value = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    config["chat_template"] = serde_json::json!(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let ran = run_stage::<Generate>(tmp.path(), "instruct", params, inputs, 0).unwrap();
    let out = &ran.outputs["samples"];
    let rows = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        // The graded program continues the opened fence: the answer's code, as written.
        let completion = row["completion"].as_str().unwrap();
        assert_eq!(row["program"].as_str().unwrap(), completion, "{row}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation.json")).unwrap())
            .unwrap();
    assert_eq!(summary["params"]["prompt_style"], "instruct");
}
