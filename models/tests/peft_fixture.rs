//! Interoperability with Python PEFT: `fixtures/peft_tiny/` was written by PEFT 0.13.2's
//! `save_pretrained` (`scripts/reference/peft_roundtrip.py make`) for a 2-layer Llama with LoRA
//! on `q_proj`/`v_proj`. We read it, and rewrite it in a form with the same keys, tensors and
//! config fields. With `PEFT_ROUNDTRIP_OUT=DIR` the rewritten adapter is left in `DIR` so that
//! `peft_roundtrip.py verify DIR` can prove PEFT loads it.

mod common;

use candle_core::{Device, Tensor};
use common::max_abs_diff;
use pipeline_models::peft::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use pipeline_models::Decoder;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_tiny")
}

fn keys_of_json(p: &Path) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v.as_object().unwrap().keys().cloned().collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn reads_an_adapter_written_by_peft() {
    let a = PeftAdapter::load(&fixture_dir(), &Device::Cpu).unwrap();
    assert_eq!(a.config.r, 2);
    assert_eq!(a.config.lora_alpha, 8.0);
    assert_eq!(a.config.task_type.as_deref(), Some("CAUSAL_LM"));
    let mut targets = a.config.target_modules.clone().unwrap();
    targets.sort();
    assert_eq!(targets, vec!["q_proj", "v_proj"]);
    assert_eq!(a.config.scaling(), 4.0);
    let names: Vec<&String> = a.modules.keys().collect();
    assert_eq!(
        names,
        vec![
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    // hidden 16, one KV head of 8: q_proj 16 -> 16, v_proj 16 -> 8.
    assert_eq!(
        a.modules["model.layers.0.self_attn.q_proj"]
            .features()
            .unwrap(),
        (16, 16)
    );
    assert_eq!(
        a.modules["model.layers.1.self_attn.v_proj"]
            .features()
            .unwrap(),
        (16, 8)
    );
    let raw =
        candle_core::safetensors::load(fixture_dir().join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let b = &raw["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"];
    assert_eq!(
        vals(b),
        vals(&a.modules["model.layers.1.self_attn.v_proj"].b)
    );
}

#[test]
fn rewrites_it_with_the_same_keys_tensors_and_config_fields() {
    let a = PeftAdapter::load(&fixture_dir(), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var_os("PEFT_ROUNDTRIP_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    a.save(&out).unwrap();
    let theirs =
        candle_core::safetensors::load(fixture_dir().join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let ours: HashMap<String, Tensor> =
        candle_core::safetensors::load(out.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    assert_eq!(
        theirs.keys().collect::<BTreeSet<_>>(),
        ours.keys().collect::<BTreeSet<_>>()
    );
    for (k, t) in &theirs {
        assert_eq!(t.dims(), ours[k].dims(), "{k}");
        assert_eq!(vals(t), vals(&ours[k]), "{k}");
    }
    let (kt, ko) = (
        keys_of_json(&fixture_dir().join(CONFIG_FILE)),
        keys_of_json(&out.join(CONFIG_FILE)),
    );
    let missing: Vec<_> = kt.difference(&ko).collect();
    assert!(
        missing.is_empty(),
        "config fields PEFT writes that we do not: {missing:?}"
    );
    let extra: Vec<_> = ko.difference(&kt).collect();
    assert!(
        extra.is_empty(),
        "config fields PEFT 0.13 would reject: {extra:?}"
    );
    let again = PeftAdapter::load(&out, &Device::Cpu).unwrap();
    assert_eq!(again.config, a.config);
}

/// The other half of interoperability: the logits. `fixtures/peft_tiny_logits/` holds the tiny
/// base model and the logits PEFT computes with the `peft_tiny` adapter applied
/// (`peft_roundtrip.py logits`); our model with the same adapter must give the same logits.
/// With the rewrite test above (our writer emits exactly PEFT's tensors and config), this
/// shows an adapter moves between the two with its behaviour intact.
#[test]
fn peft_adapter_gives_pefts_logits() {
    use candle_core::DType;
    use pipeline_models::arch::{DenseFactory, Llama, LoraFactory};
    use pipeline_models::LoraConfig;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_tiny_logits");
    let adapter = PeftAdapter::load(&fixture_dir(), &Device::Cpu).unwrap();
    let lora = LoraConfig {
        r: adapter.config.r,
        alpha: adapter.config.lora_alpha,
        dropout: 0.0,
        target_modules: adapter.config.target_modules.clone().unwrap(),
    };
    let mut factory = LoraFactory::new(DenseFactory, lora, 0);
    let model =
        Llama::from_hf_dir(&dir.join("base"), &Device::Cpu, DType::F32, &mut factory).unwrap();
    adapter.assign_to(&model.trainable_vars()).unwrap();
    model.set_training(false);

    let reference =
        candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = Tensor::ones(ids.dims(), DType::U8, &Device::Cpu).unwrap();
    let ours = model.forward(&ids, &mask).unwrap();
    let diff = max_abs_diff(&ours, &reference["logits"]);
    assert!(diff < 1e-5, "logits differ from PEFT's by up to {diff}");

    // And the adapter matters: without it the logits are measurably different.
    let mut plain = DenseFactory;
    let base = Llama::from_hf_dir(&dir.join("base"), &Device::Cpu, DType::F32, &mut plain).unwrap();
    let base_diff = max_abs_diff(&base.forward(&ids, &mask).unwrap(), &reference["logits"]);
    assert!(
        base_diff > 1e-3,
        "the adapter changes nothing ({base_diff})"
    );
}
