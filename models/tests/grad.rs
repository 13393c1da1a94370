//! Finite-difference gradient checks (f64, tiny configs) for LoRA A and B on every projection of
//! both architectures, and gradient coverage: every trainable var gets a finite non-zero
//! gradient, frozen weights get none.

mod common;

use pipeline_models::Decoder;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{random_weights, weights};
use pipeline_models::arch::{
    DenseFactory, LinearFactory, Llama, LlamaConfig, LoraFactory, Phi, PhiConfig,
};
use pipeline_models::layers::Activation;
use pipeline_models::LoraConfig;
use rand::{Rng, SeedableRng};

fn tiny_phi_config() -> PhiConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 2, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
        "layer_norm_eps": 1e-5
    }))
    .unwrap()
}

fn tiny_llama_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": true
    }))
    .unwrap()
}

fn lora_factory(targets: &[&str]) -> LoraFactory<DenseFactory> {
    let config = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.1,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    };
    let mut f = LoraFactory::new(DenseFactory, config, 7);
    f.master_dtype = DType::F64;
    f
}

/// Logits for `(input_ids, attention_mask)`.
type ForwardFn = Box<dyn Fn(&Tensor, &Tensor) -> Tensor>;

/// The model under test behind a uniform interface.
struct Subject {
    forward: ForwardFn,
    vars: Vec<(String, Var)>,
    set_training: Box<dyn Fn(bool)>,
}

fn phi_subject(tensors: HashMap<String, Tensor>, factory: &mut dyn LinearFactory) -> Subject {
    let model = std::rc::Rc::new(
        Phi::new(&tiny_phi_config(), &weights(tensors), DType::F64, factory).unwrap(),
    );
    let (m1, m2) = (model.clone(), model.clone());
    Subject {
        vars: model.trainable_vars(),
        forward: Box::new(move |i, m| m1.forward(i, m).unwrap()),
        set_training: Box::new(move |t| m2.set_training(t)),
    }
}

fn llama_subject(tensors: HashMap<String, Tensor>, factory: &mut dyn LinearFactory) -> Subject {
    let model = std::rc::Rc::new(
        Llama::new(&tiny_llama_config(), &weights(tensors), DType::F64, factory).unwrap(),
    );
    let (m1, m2) = (model.clone(), model.clone());
    Subject {
        vars: model.trainable_vars(),
        forward: Box::new(move |i, m| m1.forward(i, m).unwrap()),
        set_training: Box::new(move |t| m2.set_training(t)),
    }
}

fn inputs() -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[1u32, 4, 7, 2, 9], [3, 10, 0, 5, 6]], &Device::Cpu).unwrap();
    // Right padding on row 1 so that masking is on the differentiated path.
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    (ids, mask)
}

/// A scalar loss that weighs every logit differently, so that no gradient cancels by symmetry.
fn loss(logits: &Tensor, probe: &Tensor) -> Tensor {
    (logits * probe).unwrap().sum_all().unwrap()
}

/// Gives every `lora_B` random values (it starts at zero, which would zero `lora_A`'s gradient).
fn randomize_b(vars: &[(String, Var)], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, var) in vars {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            let data: Vec<f64> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
            var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

fn check_finite_differences(subject: &Subject, expected_modules: &[&str]) {
    (subject.set_training)(false);
    randomize_b(&subject.vars, 11);
    for m in expected_modules {
        for ab in ["lora_A.weight", "lora_B.weight"] {
            let name = format!("{m}.{ab}");
            assert!(
                subject.vars.iter().any(|(n, _)| *n == name),
                "missing var {name}"
            );
        }
    }
    let (ids, mask) = inputs();
    let logits = (subject.forward)(&ids, &mask);
    // A fixed probe: the check must not depend on the run.
    let mut probe_rng = rand::rngs::StdRng::seed_from_u64(3);
    let probe: Vec<f64> = (0..logits.elem_count())
        .map(|_| probe_rng.random_range(-1.0..1.0))
        .collect();
    let probe = Tensor::from_vec(probe, logits.shape(), &Device::Cpu).unwrap();
    let grads = loss(&logits, &probe).backward().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let eps = 1e-6;
    for (name, var) in &subject.vars {
        let analytic = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let analytic: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..3 {
            let i = rng.random_range(0..base.len());
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&(subject.forward)(&ids, &mask), &probe)
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let a = analytic[i];
            let tol = 1e-6 * (1.0 + a.abs().max(numeric.abs()));
            assert!(
                (a - numeric).abs() < tol,
                "{name}[{i}]: analytic {a} vs numeric {numeric}"
            );
        }
    }
}

const PHI_TARGETS: [&str; 7] = [
    "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head",
];
const LLAMA_TARGETS: [&str; 8] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

fn expected(layers: usize, per_layer: &[&str], top: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = (0..layers)
        .flat_map(|l| {
            per_layer
                .iter()
                .map(move |m| format!("model.layers.{l}.{m}"))
        })
        .collect();
    out.extend(top.iter().map(|s| s.to_string()));
    out
}

#[test]
fn phi_lora_gradients_match_finite_differences() {
    let tensors = random_weights(&tiny_phi_config().tensor_shapes(), DType::F64, 1);
    let subject = phi_subject(tensors, &mut lora_factory(&PHI_TARGETS));
    let per = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.dense",
        "mlp.fc1",
        "mlp.fc2",
    ];
    let modules = expected(2, &per, &["lm_head"]);
    assert_eq!(subject.vars.len(), 2 * modules.len());
    check_finite_differences(
        &subject,
        &modules.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn llama_lora_gradients_match_finite_differences() {
    let tensors = random_weights(&tiny_llama_config().tensor_shapes(), DType::F64, 2);
    let subject = llama_subject(tensors, &mut lora_factory(&LLAMA_TARGETS));
    let per = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    let modules = expected(2, &per, &["lm_head"]);
    assert_eq!(subject.vars.len(), 2 * modules.len());
    check_finite_differences(
        &subject,
        &modules.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// Fresh adapters (B = 0) in training mode, cross-entropy loss: every var gets a finite gradient,
/// and B's are non-zero right away (A's are zero at step 0 because B is, as in PEFT). Frozen
/// weights get none.
fn check_coverage(subject: &Subject, tensors: &HashMap<String, Tensor>) {
    (subject.set_training)(true);
    let (ids, mask) = inputs();
    let logits = (subject.forward)(&ids, &mask);
    let l = common::lm_loss(&logits, &ids, &mask);
    let grads = l.backward().unwrap();
    for (name, var) in &subject.vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let v: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} has a non-finite gradient"
        );
        if name.ends_with("lora_B.weight") {
            assert!(
                v.iter().any(|x| *x != 0.0),
                "{name} has an all-zero gradient"
            );
        }
    }
    for (name, t) in tensors {
        assert!(grads.get(t).is_none(), "frozen {name} got a gradient");
    }
    // After one step on B, A's gradients become non-zero too.
    randomize_b(&subject.vars, 3);
    let logits = (subject.forward)(&ids, &mask);
    let grads = common::lm_loss(&logits, &ids, &mask).backward().unwrap();
    for (name, var) in &subject.vars {
        let v: Vec<f64> = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            v.iter().any(|x| *x != 0.0) && v.iter().all(|x| x.is_finite()),
            "{name}: zero or non-finite gradient"
        );
    }
}

#[test]
fn every_trainable_var_gets_a_gradient_and_frozen_weights_none() {
    let tensors = random_weights(&tiny_phi_config().tensor_shapes(), DType::F64, 4);
    let subject = phi_subject(tensors.clone(), &mut lora_factory(&PHI_TARGETS));
    check_coverage(&subject, &tensors);
    let tensors = random_weights(&tiny_llama_config().tensor_shapes(), DType::F64, 5);
    let subject = llama_subject(tensors.clone(), &mut lora_factory(&LLAMA_TARGETS));
    check_coverage(&subject, &tensors);
}

#[test]
fn targets_select_modules_and_untargeted_models_have_no_vars() {
    let tensors = random_weights(&tiny_llama_config().tensor_shapes(), DType::F64, 6);
    let subject = llama_subject(tensors.clone(), &mut lora_factory(&["q_proj", "v_proj"]));
    let names: Vec<&str> = subject.vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 2 * 2 * 2);
    assert!(names.contains(&"model.layers.1.self_attn.v_proj.lora_A.weight"));
    assert!(names
        .iter()
        .all(|n| n.contains("q_proj") || n.contains("v_proj")));
    let plain = llama_subject(tensors, &mut DenseFactory);
    assert!(plain.vars.is_empty());
}

#[test]
fn activation_names_follow_hf() {
    let act: Activation = serde_json::from_value(serde_json::json!("gelu_new")).unwrap();
    assert_eq!(act, Activation::GeluNew);
    let x = Tensor::new(&[-1.0f64, 0.5, 2.0], &Device::Cpu).unwrap();
    // gelu_new(x) = 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
    let want: Vec<f64> = [-1.0f64, 0.5, 2.0]
        .iter()
        .map(|&x| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        })
        .collect();
    let got: Vec<f64> = act.forward(&x).unwrap().to_vec1().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
}
