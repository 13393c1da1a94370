//! PEFT adapter format: keys, config fields, round trip, and clear errors on mismatch.

use candle_core::{DType, Device, Tensor, Var};
use pipeline_models::peft::{PeftAdapter, PeftConfig, PeftError, CONFIG_FILE, WEIGHTS_FILE};

fn t(shape: (usize, usize), seed: f32) -> Tensor {
    let n = shape.0 * shape.1;
    Tensor::from_vec(
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin())
            .collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

fn vars() -> Vec<(String, Var)> {
    let mut v = Vec::new();
    for layer in 0..2 {
        for (proj, out) in [("q_proj", 8usize), ("v_proj", 4)] {
            let m = format!("model.layers.{layer}.self_attn.{proj}");
            v.push((
                format!("{m}.lora_A.weight"),
                Var::from_tensor(&t((2, 8), layer as f32)).unwrap(),
            ));
            v.push((
                format!("{m}.lora_B.weight"),
                Var::from_tensor(&t((out, 2), 1.0 + layer as f32)).unwrap(),
            ));
        }
    }
    v
}

fn config() -> PeftConfig {
    PeftConfig::lora(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        2,
        16.0,
        0.05,
        vec!["q_proj".into(), "v_proj".into()],
    )
}

#[test]
fn saves_peft_keys_metadata_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = PeftAdapter::from_vars(config(), &vars()).unwrap();
    adapter.save(dir.path()).unwrap();
    // Parse the safetensors header by hand: keys, shapes, dtype and `format: pt` metadata.
    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let obj = header.as_object().unwrap();
    assert_eq!(obj["__metadata__"]["format"], "pt");
    let mut keys: Vec<&String> = obj.keys().filter(|k| *k != "__metadata__").collect();
    keys.sort();
    assert_eq!(keys.len(), 8);
    assert_eq!(
        keys[0],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    let b = &obj["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"];
    assert_eq!(b["dtype"], "F32");
    assert_eq!(b["shape"], serde_json::json!([4, 2]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
            .unwrap();
    for (k, v) in [
        ("peft_type", serde_json::json!("LORA")),
        ("task_type", serde_json::json!("CAUSAL_LM")),
        ("r", serde_json::json!(2)),
        ("lora_alpha", serde_json::json!(16)),
        ("lora_dropout", serde_json::json!(0.05)),
        ("bias", serde_json::json!("none")),
        ("fan_in_fan_out", serde_json::json!(false)),
        ("target_modules", serde_json::json!(["q_proj", "v_proj"])),
        (
            "base_model_name_or_path",
            serde_json::json!("HuggingFaceTB/SmolLM2-135M-Instruct"),
        ),
        ("use_rslora", serde_json::json!(false)),
        ("use_dora", serde_json::json!(false)),
        ("modules_to_save", serde_json::Value::Null),
    ] {
        assert_eq!(cfg[k], v, "adapter_config.json field {k}");
    }
    assert_eq!(config().scaling(), 8.0);
}

#[test]
fn round_trips_into_model_vars() {
    let dir = tempfile::tempdir().unwrap();
    let src = vars();
    PeftAdapter::from_vars(config(), &src)
        .unwrap()
        .save(dir.path())
        .unwrap();
    let loaded = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.config, config());
    assert_eq!(loaded.modules.len(), 4);
    let (inf, outf) = loaded.modules["model.layers.0.self_attn.v_proj"]
        .features()
        .unwrap();
    assert_eq!((inf, outf), (8, 4));
    let dst: Vec<(String, Var)> = src
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::zeros(v.dims(), DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    loaded.assign_to(&dst).unwrap();
    for ((_, a), (_, b)) in src.iter().zip(&dst) {
        assert_eq!(
            a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

#[test]
fn mismatches_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    PeftAdapter::from_vars(config(), &vars())
        .unwrap()
        .save(dir.path())
        .unwrap();
    let loaded = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    // Wrong rank in the model.
    let mut wrong = vars();
    wrong[0].1 = Var::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    let e = loaded.assign_to(&wrong).unwrap_err().to_string();
    assert!(
        e.contains("q_proj.lora_A.weight") && e.contains("[2, 8]") && e.contains("[4, 8]"),
        "{e}"
    );
    // Model adapts a module the adapter lacks.
    let mut extra = vars();
    extra.push((
        "model.layers.0.mlp.up_proj.lora_A.weight".into(),
        Var::zeros((2, 8), DType::F32, &Device::Cpu).unwrap(),
    ));
    let e = loaded.assign_to(&extra).unwrap_err().to_string();
    assert!(e.contains("up_proj") && e.contains("target_modules"), "{e}");
    // Adapter has a module the model lacks.
    let e = loaded.assign_to(&vars()[..4]).unwrap_err().to_string();
    assert!(
        e.contains("layers.1") && e.contains("no counterpart"),
        "{e}"
    );
    // Unpaired and wrongly ranked tensors are refused when building.
    let v = vars();
    let e = PeftAdapter::from_vars(config(), &v[..1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_B"), "{e}");
    let mut cfg = config();
    cfg.r = 3;
    assert!(PeftAdapter::from_vars(cfg, &v)
        .unwrap_err()
        .to_string()
        .contains("r = 3"));
    let e = PeftAdapter::from_vars(config(), &[("model.q_proj.weight".into(), v[0].1.clone())])
        .unwrap_err();
    assert!(matches!(e, PeftError::Invalid { .. }));
    // Non-LoRA configs and missing files.
    let mut cfg = config();
    cfg.peft_type = "IA3".into();
    assert!(PeftAdapter::from_vars(cfg, &v)
        .unwrap_err()
        .to_string()
        .contains("LORA"));
    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
    let e = PeftAdapter::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains(WEIGHTS_FILE), "{e}");
}

#[test]
fn reads_configs_written_by_newer_peft_with_extra_fields() {
    let dir = tempfile::tempdir().unwrap();
    PeftAdapter::from_vars(config(), &vars())
        .unwrap()
        .save(dir.path())
        .unwrap();
    let p = dir.path().join(CONFIG_FILE);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["peft_version"] = "0.17.1".into();
    cfg["exclude_modules"] = serde_json::Value::Null;
    cfg["lora_bias"] = false.into();
    cfg["target_modules"] = serde_json::json!(["v_proj", "q_proj"]);
    std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
    let a = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(a.config.r, 2);
}

/// PEFT's own sources (the `peft` wheel, unpacked by scripts/fetch-test-assets.sh), located by
/// PIPELINE_PEFT_SRC. PEFT itself cannot be imported here (it needs torch), so the test reads
/// the `LoraConfig` dataclass the way Python would build it: its annotated fields.
fn peft_src() -> Option<std::path::PathBuf> {
    match std::env::var_os("PIPELINE_PEFT_SRC").map(std::path::PathBuf::from) {
        Some(p) if p.join("peft/tuners/lora/config.py").is_file() => Some(p),
        other => {
            eprintln!(
                "skipping: PEFT sources not found ({other:?}); run scripts/fetch-test-assets.sh"
            );
            None
        }
    }
}

/// Every key we write is a field of PEFT's `LoraConfig` (an unknown one makes
/// `PeftConfig.from_pretrained` warn "Unexpected keyword arguments ... ignored"), with the
/// JSON type its annotation asks for (`lora_alpha: int`, which `16.0` was not).
#[test]
fn adapter_config_holds_only_fields_peft_declares_with_their_types() {
    let Some(src) = peft_src() else { return };
    let script = r#"
import ast, json, sys
root = sys.argv[1]
def fields(path, name):
    tree = ast.parse(open(f"{root}/{path}").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {s.target.id: ast.unparse(s.annotation) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise SystemExit(f"{name} not found in {path}")
out = {}
for path, name in [("peft/config.py", "PeftConfigMixin"), ("peft/config.py", "PeftConfig"),
                   ("peft/tuners/lora/config.py", "LoraConfig")]:
    out.update(fields(path, name))
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let declared: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        declared.contains_key("lora_alpha") && declared.len() > 20,
        "{declared:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    PeftAdapter::from_vars(config(), &vars())
        .unwrap()
        .save(dir.path())
        .unwrap();
    let written: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
            .unwrap();
    for (key, value) in &written {
        let Some(annotation) = declared.get(key).and_then(|a| a.as_str()) else {
            panic!("`{key}` is not a field of PEFT's LoraConfig: PEFT would warn and ignore it");
        };
        let ok = match annotation {
            "int" => value.is_i64() || value.is_u64(),
            "float" => value.is_number(),
            "bool" => value.is_boolean(),
            // Optional[...], unions, literals: any JSON value PEFT's dataclass takes as is.
            _ => true,
        };
        assert!(ok, "`{key}` = {value} does not fit PEFT's `{annotation}`");
    }
    assert_eq!(written["lora_alpha"], serde_json::json!(16));
    // A fractional alpha stays a number PEFT accepts (its dataclass does not enforce int).
    let mut frac = config();
    frac.lora_alpha = 0.5;
    assert_eq!(
        serde_json::to_value(&frac).unwrap()["lora_alpha"],
        serde_json::json!(0.5)
    );
}
