//! Logits parity with Hugging Face transformers on the same random weights (fixtures written by
//! `scripts/reference/models_parity.py`), and KV-cache consistency with full forwards.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load_io, max_abs_diff};
use pipeline_models::arch::{DenseFactory, Llama, LlamaConfig, Phi, PhiConfig};
use pipeline_models::weights::Weights;
use pipeline_models::CausalLm;
use pipeline_models::Decoder;

fn fixture_weights(dir: &str) -> Weights {
    Weights::from_safetensors(&[fixture(dir).join("model.safetensors")], &Device::Cpu).unwrap()
}

fn tiny_phi() -> Phi {
    let cfg = PhiConfig::from_json_file(&fixture("tiny_phi").join("config.json")).unwrap();
    Phi::new(
        &cfg,
        &fixture_weights("tiny_phi"),
        DType::F32,
        &mut DenseFactory,
    )
    .unwrap()
}

fn tiny_llama() -> Llama {
    let cfg = LlamaConfig::from_json_file(&fixture("tiny_llama").join("config.json")).unwrap();
    assert!(
        cfg.tie_word_embeddings,
        "the fixture exercises tied embeddings"
    );
    Llama::new(
        &cfg,
        &fixture_weights("tiny_llama"),
        DType::F32,
        &mut DenseFactory,
    )
    .unwrap()
}

#[test]
fn phi_logits_match_transformers() {
    let (ids, mask, want) = load_io("tiny_phi");
    let got = tiny_phi().forward(&ids, &mask).unwrap();
    assert_eq!(got.dims(), want.dims());
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "max |diff| {diff}");
}

#[test]
fn llama_logits_match_transformers() {
    let (ids, mask, want) = load_io("tiny_llama");
    let got = tiny_llama().forward(&ids, &mask).unwrap();
    assert_eq!(got.dims(), want.dims());
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "max |diff| {diff}");
}

#[test]
fn half_precision_forward_stays_close() {
    let (ids, mask, want) = load_io("tiny_llama");
    let cfg = LlamaConfig::from_json_file(&fixture("tiny_llama").join("config.json")).unwrap();
    let model = Llama::new(
        &cfg,
        &fixture_weights("tiny_llama"),
        DType::BF16,
        &mut DenseFactory,
    )
    .unwrap();
    let got = model.forward(&ids, &mask).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 0.5, "bf16 max |diff| {diff}");
}

/// Runs `model` over `ids` (one row, all real) in chunks with a cache and returns the logits.
fn chunked(model: &dyn CausalLm, ids: &Tensor, chunks: &[usize]) -> Tensor {
    let mut cache = model.new_cache();
    let mut start = 0;
    let mut outs = Vec::new();
    for &len in chunks {
        let chunk = ids.narrow(1, start, len).unwrap();
        let pos = Tensor::arange(start as u32, (start + len) as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mask = Tensor::ones((1, start + len), DType::U8, &Device::Cpu).unwrap();
        outs.push(
            model
                .forward_cached(&chunk, &pos, &mask, &mut cache)
                .unwrap(),
        );
        start += len;
        assert_eq!(cache.seq_len(), start);
    }
    Tensor::cat(&outs, 1).unwrap()
}

#[test]
fn kv_cache_matches_full_forward() {
    let (ids, _, want) = load_io("tiny_phi");
    let row = ids.narrow(0, 0, 1).unwrap();
    let want_row = want.narrow(0, 0, 1).unwrap();
    let phi = tiny_phi();
    let got = chunked(&phi, &row, &[3, 1, 1, 2]);
    assert!(max_abs_diff(&got, &want_row) < 1e-4);

    let (ids, _, want) = load_io("tiny_llama");
    let row = ids.narrow(0, 0, 1).unwrap();
    let want_row = want.narrow(0, 0, 1).unwrap();
    let llama = tiny_llama();
    let got = chunked(&llama, &row, &[4, 1, 2]);
    assert!(max_abs_diff(&got, &want_row) < 1e-4);
}

#[test]
fn left_padding_with_positions_matches_unpadded_row() {
    let (ids, _, want) = load_io("tiny_llama");
    let model = tiny_llama();
    let real = ids.narrow(0, 0, 1).unwrap().narrow(1, 0, 5).unwrap();
    // Row 0: 2 pad tokens (id 0) on the left, then the 5 real tokens; row 1: 7 real tokens.
    let pad = Tensor::zeros((1, 2), DType::U32, &Device::Cpu).unwrap();
    let row0 = Tensor::cat(&[&pad, &real], 1).unwrap();
    let row1 = ids.narrow(0, 0, 1).unwrap();
    let batch = Tensor::cat(&[&row0, &row1], 0).unwrap();
    let mask = Tensor::new(
        &[[0u8, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let pos = Tensor::new(
        &[[0u32, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]],
        &Device::Cpu,
    )
    .unwrap();
    let mut cache = model.new_cache();
    let got = model
        .forward_cached(&batch, &pos, &mask, &mut cache)
        .unwrap();
    assert!(got
        .to_vec3::<f32>()
        .unwrap()
        .iter()
        .flatten()
        .flatten()
        .all(|x| x.is_finite()));
    let want0 = want.narrow(0, 0, 1).unwrap().narrow(1, 0, 5).unwrap();
    let got0 = got.narrow(0, 0, 1).unwrap().narrow(1, 2, 5).unwrap();
    assert!(
        max_abs_diff(&got0, &want0) < 1e-4,
        "left-padded row differs"
    );
    let got1 = got.narrow(0, 1, 1).unwrap();
    assert!(max_abs_diff(&got1, &want.narrow(0, 0, 1).unwrap()) < 1e-4);

    // One more step for both rows through the cache.
    let next = Tensor::new(&[[3u32], [5u32]], &Device::Cpu).unwrap();
    let pos = Tensor::new(&[[5u32], [7u32]], &Device::Cpu).unwrap();
    let mask = Tensor::new(
        &[[0u8, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let step = model
        .forward_cached(&next, &pos, &mask, &mut cache)
        .unwrap();
    let full0 = Tensor::cat(&[&real, &next.narrow(0, 0, 1).unwrap()], 1).unwrap();
    let ref0 = model
        .forward(
            &full0,
            &Tensor::ones((1, 6), DType::U8, &Device::Cpu).unwrap(),
        )
        .unwrap();
    let diff = max_abs_diff(
        &step.narrow(0, 0, 1).unwrap(),
        &ref0.narrow(1, 5, 1).unwrap(),
    );
    assert!(
        diff < 1e-4,
        "cached step after left padding differs by {diff}"
    );
}

#[test]
fn checkpoint_directories_load_and_missing_ones_explain() {
    let phi = Phi::from_hf_dir(
        &fixture("tiny_phi"),
        &Device::Cpu,
        DType::F32,
        &mut DenseFactory,
    )
    .unwrap();
    let model = pipeline_models::arch::DecoderModel::new(phi);
    let (ids, mask, want) = load_io("tiny_phi");
    assert!(max_abs_diff(&model.forward(&ids, &mask).unwrap(), &want) < 1e-4);
    assert_eq!(model.vocab_size(), 64);
    assert_eq!(model.linears().len(), 2 * 6 + 1);
    let err = match Llama::from_hf_dir(
        &fixture("no_such_model"),
        &Device::Cpu,
        DType::F32,
        &mut DenseFactory,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing directory must fail"),
    };
    assert!(
        err.contains("no_such_model") && err.contains("config.json"),
        "{err}"
    );
    // A config that does not fit the weights names the tensor and both shapes.
    let mut cfg = PhiConfig::from_json_file(&fixture("tiny_phi").join("config.json")).unwrap();
    cfg.intermediate_size = 40;
    let err = match Phi::new(
        &cfg,
        &fixture_weights("tiny_phi"),
        DType::F32,
        &mut DenseFactory,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("mismatched config must fail"),
    };
    assert!(
        err.contains("model.layers.0.mlp.fc1.weight") && err.contains("[64, 32]"),
        "{err}"
    );
}

#[test]
fn last_position_logits_match_the_full_forward() {
    let check = |model: &dyn CausalLm, name: &str| {
        let (ids, mask, _) = load_io(name);
        let (b, t) = ids.dims2().unwrap();
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((b, t))
            .unwrap()
            .contiguous()
            .unwrap();
        let mut full_cache = model.new_cache();
        let full = model
            .forward_cached(&ids, &pos, &mask, &mut full_cache)
            .unwrap();
        let mut last_cache = model.new_cache();
        let last = model
            .forward_cached_last(&ids, &pos, &mask, &mut last_cache)
            .unwrap();
        assert_eq!(last.dims(), [b, model.vocab_size()], "{name}");
        assert_eq!(last_cache.seq_len(), full_cache.seq_len(), "{name}");
        let want = full.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
        let diff = max_abs_diff(&last, &want);
        assert!(diff < 1e-5, "{name}: max |diff| {diff}");
    };
    check(&tiny_llama(), "tiny_llama");
    check(&tiny_phi(), "tiny_phi");
}
