//! Inference on packed codes (`BlockLinear`, `quant::kernels`) against the decoded weights: per
//! format and instruction set on random weights, and on SmolLM2-135M-Instruct (Q4_1 GGUF):
//! logits and likelihoods within the stated tolerance of the dense path, greedy generations
//! token-identical unless two candidates tie; inputs that record a graph (training) take the
//! decoded product; concurrent callers get the same results. Also generation's f16 KV cache
//! against its f32 cache on the same model (stated logit tolerance, greedy agreement).

use candle_core::{DType, Device, Tensor, Var};
use pipeline_models::arch::{DenseFactory, LinearParts, Llama, LlamaConfig};
use pipeline_models::generate::{generate_batch, GenerateConfig, GenerateRequest};
use pipeline_models::layers::Dense;
use pipeline_models::linear::LinearLayer;
use pipeline_models::quant::kernels::{self, Isa};
use pipeline_models::quant::{
    BlockLinear, GgmlFormat, GgmlQuantized, Nf4Tensor, QuantLinear, QuantWeight,
};
use pipeline_models::weights::{load_gguf_llama, StoredTensor};
use pipeline_models::{CausalLm, Decoder};
use std::sync::Arc;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every format with a kernel, as the layers a loader builds: ggml blocks and NF4 (with double
/// quantization, the QLoRA base).
fn weights(w: &Tensor) -> Vec<(&'static str, QuantWeight)> {
    let mut out: Vec<(&'static str, QuantWeight)> = [
        GgmlFormat::Q4_0,
        GgmlFormat::Q4_1,
        GgmlFormat::Q8_0,
        GgmlFormat::Q4K,
    ]
    .into_iter()
    .map(|f| {
        (
            f.name(),
            QuantWeight::Ggml(GgmlQuantized::quantize(w, f).unwrap()),
        )
    })
    .collect();
    out.push((
        "nf4",
        QuantWeight::Nf4(Arc::new(Nf4Tensor::quantize(w, true).unwrap())),
    ));
    out
}

/// The packed kernels against the product with the decoded weight, on every instruction set this
/// CPU has, for every format, at row counts that cover whole tiles and remainders: equal up to
/// the order of the additions.
#[test]
fn packed_products_equal_the_decoded_weights_product_on_every_instruction_set() {
    // Rows of two q4k super-blocks (and 16 of the other formats' blocks).
    let (out, inp) = (72, 512);
    let w = random(&[out, inp], 1);
    let isas = Isa::available();
    eprintln!("instruction sets: {isas:?}");
    for (name, q) in weights(&w) {
        let layer = BlockLinear::new(&q, None).unwrap();
        let decoded = q.dequantize(DType::F32, &Device::Cpu).unwrap();
        for m in [1, 3, 8, 13, 300] {
            let x = random(&[m, inp], 2 + m as u64);
            let want = x.matmul(&decoded.t().unwrap()).unwrap();
            let got = layer.forward(&x).unwrap();
            assert_eq!(got.dims(), [m, out]);
            let rel = max_abs(&(&got - &want).unwrap()) / max_abs(&want);
            assert!(rel < 1e-5, "{name}, m = {m}: relative error {rel}");
            // Each instruction set on its own, same tolerance.
            let packed = packed_of(&q);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for &isa in isas {
                let y = kernels::matmul_on(isa, &packed, &xs, m);
                let y = Tensor::from_vec(y, (m, out), &Device::Cpu).unwrap();
                let rel = max_abs(&(&y - &want).unwrap()) / max_abs(&want);
                assert!(
                    rel < 1e-5,
                    "{name} on {isa:?}, m = {m}: relative error {rel}"
                );
            }
        }
        // The packed codes decode to exactly the format's own values.
        let mine = packed_of(&q).dequantize();
        let theirs = decoded.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            mine, theirs,
            "{name}: packed values differ from the format's decoding"
        );
    }
}

/// The packed weight of `q`, as [`BlockLinear`] builds it.
fn packed_of(q: &QuantWeight) -> kernels::PackedWeight {
    BlockLinear::new(q, None).unwrap().packed().clone()
}

/// Rows that are not whole blocks of the format are refused with the reason, not misread.
#[test]
fn ragged_rows_are_refused_with_a_reason() {
    let ragged = kernels::PackedWeight::from_ggml(kernels::GgmlBlocks::Q4K, 2, 288, &[0; 2 * 162]);
    let err = ragged.unwrap_err().to_string();
    assert!(err.contains("288") && err.contains("256"), "{err}");
    let short = kernels::PackedWeight::from_ggml(kernels::GgmlBlocks::Q4_1, 2, 64, &[0; 79]);
    let err = short.unwrap_err().to_string();
    assert!(err.contains("80") && err.contains("79"), "{err}");
}

#[test]
fn inputs_that_record_a_graph_take_the_decoded_product_and_get_gradients() {
    let w = random(&[32, 64], 4);
    let q = QuantWeight::Ggml(GgmlQuantized::quantize(&w, GgmlFormat::Q4_1).unwrap());
    let blocks = BlockLinear::new(&q, None).unwrap();
    let exact = QuantLinear::new(q, None).unwrap();
    let x = Var::from_tensor(&random(&[4, 64], 5)).unwrap();
    let y = blocks.forward(x.as_tensor()).unwrap();
    let want = exact.forward(x.as_tensor()).unwrap();
    assert!(max_abs(&(&y - &want).unwrap()) < 1e-5);
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(x.as_tensor()).is_some(),
        "the input gradient flows"
    );
}

fn smollm2() -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(std::env::var_os("PIPELINE_SMOLLM2_GGUF")?);
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipping: PIPELINE_SMOLLM2_GGUF={} does not exist",
            path.display()
        );
        None
    }
}

fn block_factory(parts: LinearParts) -> candle_core::Result<Box<dyn LinearLayer>> {
    if let StoredTensor::Quantized(q) = &parts.weight {
        if let Ok(g) = GgmlQuantized::from_qtensor(q.clone()) {
            if let Ok(layer) = BlockLinear::new(&QuantWeight::Ggml(g), parts.bias.clone()) {
                return Ok(Box::new(layer));
            }
        }
    }
    Ok(Box::new(Dense::new(
        parts.weight.to_dense(parts.dtype)?,
        parts.bias,
    )?))
}

/// Prompts written for this test, as SmolLM2's tokenizer encodes them (llama.cpp's tokenizer on
/// the same GGUF gives the same ids): three code prompts and a chat.
const PROMPTS: &[(&str, &[u32])] = &[
    (
        "def is_palindrome(s: str) -> bool:\n    \"\"\"Return True if s reads the same backwards.\"\"\"",
        &[
            1604, 314, 79, 22162, 526, 4522, 24, 99, 42, 871, 25, 4722, 10537, 42, 472, 1620,
            14362, 3635, 585, 262, 12927, 260, 1142, 22271, 7996,
        ],
    ),
    (
        "def count_vowels(text):\n    \"\"\"Count the vowels in text.\n    >>> count_vowels('hello')\n    2\n    \"\"\"",
        &[
            1604, 985, 79, 102, 323, 1025, 24, 2692, 727, 472, 1620, 9825, 260, 27763, 281, 1694,
            30, 472, 10949, 985, 79, 102, 323, 1025, 1305, 28120, 1465, 2367, 34, 472, 1620,
        ],
    ),
    (
        "from typing import List\n\n\ndef running_max(xs: List[int]) -> List[int]:\n    \"\"\"The largest value seen so far at each position.\"\"\"",
        &[
            1455, 11146, 752, 5516, 1116, 198, 1604, 4108, 79, 3831, 24, 28345, 42, 5516, 75, 591,
            2255, 4722, 5516, 75, 591, 7036, 472, 1620, 504, 3995, 1685, 2269, 588, 1869, 418, 971,
            2548, 7996,
        ],
    ),
    (
        "<|im_start|>user\nWrite a Python function that reverses a list.<|im_end|>\n<|im_start|>assistant\n",
        &[
            1, 4093, 198, 19161, 253, 5905, 1517, 338, 10557, 266, 253, 1398, 30, 2, 198, 1, 520,
            9531, 198,
        ],
    ),
];

/// Requests for every prompt of [`PROMPTS`], and a greedy configuration of 32 new tokens with
/// no end token (so every generation has its full length).
fn greedy_32_tokens_of_each_prompt() -> (Vec<GenerateRequest>, GenerateConfig) {
    let requests = PROMPTS
        .iter()
        .map(|(_, ids)| GenerateRequest {
            prompt_ids: ids.to_vec(),
            stop: Vec::new(),
            seed: 0,
        })
        .collect();
    let config = GenerateConfig {
        max_new_tokens: 32,
        eos_token_ids: Vec::new(),
        ..GenerateConfig::default()
    };
    (requests, config)
}

fn logits(model: &Llama, ids: &[u32]) -> Tensor {
    let ids = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask = Tensor::ones(ids.dims(), DType::U8, &Device::Cpu).unwrap();
    model.forward(&ids, &mask).unwrap().squeeze(0).unwrap()
}

/// Mean log-likelihood (nats per token) of `ids[1..]` under `logits` (`[len, vocab]`).
fn mean_log_likelihood(logits: &Tensor, ids: &[u32]) -> f32 {
    let n = ids.len() - 1;
    let lp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, n).unwrap(), 1).unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let picked = lp.gather(&targets, 1).unwrap();
    picked.sum_all().unwrap().to_scalar::<f32>().unwrap() / n as f32
}

#[test]
fn smollm2_on_blocks_stays_within_the_stated_tolerance_of_the_f32_path() {
    let Some(path) = smollm2() else {
        eprintln!("skipping: set PIPELINE_SMOLLM2_GGUF (scripts/fetch-test-assets.sh)");
        return;
    };
    let (weights, meta) = load_gguf_llama(&path, &Device::Cpu).unwrap();
    let cfg = LlamaConfig::from_gguf_meta(&meta);
    let dense = Llama::new(&cfg, &weights, DType::F32, &mut DenseFactory).unwrap();
    let mut factory = block_factory;
    let blocks = Llama::new(&cfg, &weights, DType::F32, &mut factory).unwrap();
    dense.freeze();
    blocks.freeze();

    // Logits and likelihoods on each prompt.
    for (text, ids) in PROMPTS {
        let (want, got) = (logits(&dense, ids), logits(&blocks, ids));
        let diff = max_abs(&(&got - &want).unwrap());
        let scale = max_abs(&want);
        let (ll_want, ll_got) = (
            mean_log_likelihood(&want, ids),
            mean_log_likelihood(&got, ids),
        );
        eprintln!(
            "{:?}: logits max |diff| {diff:.2e} of max |logit| {scale:.1}; mean log-likelihood \
             {ll_want:.6} (f32) vs {ll_got:.6} (blocks) nats/token",
            &text[..20]
        );
        assert!(diff / scale < LOGIT_TOLERANCE, "{text:?}: {diff} / {scale}");
        assert!(
            (ll_want - ll_got).abs() < LIKELIHOOD_TOLERANCE,
            "{text:?}: {ll_want} vs {ll_got}"
        );
    }

    // Greedy generations: identical, or parting only where the f32 model's two candidates are
    // closer than the rounding can move them.
    let (requests, config) = greedy_32_tokens_of_each_prompt();
    let a = generate_batch(&dense, &requests, &config, |_| String::new()).unwrap();
    let b = generate_batch(&blocks, &requests, &config, |_| String::new()).unwrap();
    let mut identical = 0;
    for ((x, y), (text, ids)) in a.completions.iter().zip(&b.completions).zip(PROMPTS) {
        let (x, y) = (&x[0].token_ids, &y[0].token_ids);
        let k = x.iter().zip(y).take_while(|(p, q)| p == q).count();
        if k == x.len() {
            identical += 1;
            continue;
        }
        let mut context = ids.to_vec();
        context.extend_from_slice(&x[..k]);
        let step = logits(&dense, &context);
        let last = step.get(context.len() - 1).unwrap();
        let (mine, theirs) = (
            last.get(x[k] as usize).unwrap().to_scalar::<f32>().unwrap(),
            last.get(y[k] as usize).unwrap().to_scalar::<f32>().unwrap(),
        );
        eprintln!(
            "{:?}: parts after {k} tokens, where the f32 logits of the two choices are {mine:.3} \
             and {theirs:.3}",
            &text[..20]
        );
        assert!(
            mine - theirs < NEAR_TIE,
            "{text:?}: the block path left the f32 path after {k} tokens at a margin of {}",
            mine - theirs
        );
    }
    eprintln!(
        "greedy: {identical} of {} identical over 32 tokens",
        PROMPTS.len()
    );
}

/// Generation's model (packed weights) with its KV cache stored as f16 against the same model
/// with an f32 cache: teacher-forced on each prompt plus 32 greedy tokens, every step's logits
/// stay within [`F16_CACHE_LOGIT_TOLERANCE`] of the largest logit, and greedy generations agree
/// unless the f32 cache's two candidates are within twice that distance.
#[test]
fn smollm2_with_an_f16_kv_cache_stays_within_its_stated_tolerance() {
    let Some(path) = smollm2() else {
        eprintln!("skipping: set PIPELINE_SMOLLM2_GGUF (scripts/fetch-test-assets.sh)");
        return;
    };
    let (weights, meta) = load_gguf_llama(&path, &Device::Cpu).unwrap();
    let cfg = LlamaConfig::from_gguf_meta(&meta);
    let mut factory = block_factory;
    let model = Llama::new(&cfg, &weights, DType::F32, &mut factory).unwrap();
    model.freeze();
    let (requests, exact) = greedy_32_tokens_of_each_prompt();
    let half = GenerateConfig {
        kv_cache_dtype: Some(DType::F16),
        ..exact.clone()
    };
    let a = generate_batch(&model, &requests, &exact, |_| String::new()).unwrap();
    let b = generate_batch(&model, &requests, &half, |_| String::new()).unwrap();

    let mut worst = 0f32;
    let mut identical = 0;
    for ((x, y), (text, ids)) in a.completions.iter().zip(&b.completions).zip(PROMPTS) {
        let (x, y) = (&x[0].token_ids, &y[0].token_ids);
        // Teacher-forced along the f32 cache's tokens: the logits of every step, both caches.
        let steps_exact = cached_step_logits(&model, ids, x, None);
        let steps_half = cached_step_logits(&model, ids, x, Some(DType::F16));
        for (step, (want, got)) in steps_exact.iter().zip(&steps_half).enumerate() {
            let relative = max_abs(&(got - want).unwrap()) / max_abs(want);
            assert!(
                relative < F16_CACHE_LOGIT_TOLERANCE,
                "{text:?}, step {step}: logits moved by {relative:.2e} of the largest"
            );
            worst = worst.max(relative);
        }
        let k = x.iter().zip(y).take_while(|(p, q)| p == q).count();
        if k == x.len() {
            identical += 1;
            continue;
        }
        let last = &steps_exact[k];
        let (mine, theirs) = (
            last.get(x[k] as usize).unwrap().to_scalar::<f32>().unwrap(),
            last.get(y[k] as usize).unwrap().to_scalar::<f32>().unwrap(),
        );
        eprintln!(
            "{:?}: parts after {k} tokens, where the f32 cache's logits of the two choices are \
             {mine:.3} and {theirs:.3}",
            &text[..20]
        );
        assert!(
            mine - theirs < 2.0 * F16_CACHE_LOGIT_TOLERANCE * max_abs(last),
            "{text:?}: the f16 cache left the f32 cache's path after {k} tokens at a margin of {}",
            mine - theirs
        );
    }
    assert!(
        worst > 0.0,
        "the f16 cache changed no logit: was it stored as f16?"
    );
    eprintln!(
        "f16 KV cache: logits within {worst:.2e} of the largest; greedy {identical} of {} \
         identical over 32 tokens",
        PROMPTS.len()
    );
}

/// Last-position logits (`[vocab]`) after the prompt and after each of `continuation`'s tokens
/// but the last, decoded one token at a time with a KV cache stored as `storage`.
fn cached_step_logits(
    model: &Llama,
    prompt: &[u32],
    continuation: &[u32],
    storage: Option<DType>,
) -> Vec<Tensor> {
    let dev = Device::Cpu;
    let mut cache = model.new_cache();
    if let Some(dtype) = storage {
        cache.store_as(dtype).unwrap();
    }
    let step = |cache: &mut pipeline_models::KvCache, ids: &[u32], from: usize| {
        let n = ids.len();
        let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        let positions: Vec<u32> = (from as u32..(from + n) as u32).collect();
        let positions = Tensor::new(positions, &dev).unwrap().unsqueeze(0).unwrap();
        let mask = Tensor::ones((1, from + n), DType::U8, &dev).unwrap();
        model
            .forward_cached_last(&input, &positions, &mask, cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
    };
    let mut out = vec![step(&mut cache, prompt, 0)];
    for (i, &token) in continuation[..continuation.len().saturating_sub(1)]
        .iter()
        .enumerate()
    {
        out.push(step(&mut cache, &[token], prompt.len() + i));
    }
    out
}

/// How far an f16 KV cache may move generation's logits, as a fraction of the largest logit
/// (measured: 7e-4 to 1e-3 over these prompts).
const F16_CACHE_LOGIT_TOLERANCE: f32 = 5e-3;

/// How far the packed path's logits may be from the dense path's, as a fraction of the largest
/// logit: the same values added in another order through 30 layers (measured: about 4e-6).
const LOGIT_TOLERANCE: f32 = 1e-4;
/// Allowed change of a prompt's mean log-likelihood, in nats per token (measured: about 3e-6).
const LIKELIHOOD_TOLERANCE: f32 = 1e-4;
/// The largest f32 logit margin at which greedy paths may part (an exact tie up to rounding).
const NEAR_TIE: f32 = 1e-3;

/// Products called from several threads at once (the kernels' thread team takes one job at a
/// time; the others run theirs alone) equal the same products called one by one.
#[test]
fn concurrent_products_equal_serial_ones() {
    let w = random(&[256, 576], 7);
    let q = QuantWeight::Ggml(GgmlQuantized::quantize(&w, GgmlFormat::Q4_1).unwrap());
    let packed = packed_of(&q);
    let inputs: Vec<Vec<f32>> = (0..6)
        .map(|i| {
            random(&[1 + i % 3, 576], 100 + i as u64)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    let serial: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| kernels::matmul(&packed, x, x.len() / 576))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|x| {
                let packed = &packed;
                s.spawn(move || {
                    (0..50)
                        .map(|_| kernels::matmul(packed, x, x.len() / 576))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (h, want) in handles.into_iter().zip(&serial) {
            for got in h.join().unwrap() {
                assert_eq!(&got, want);
            }
        }
    });
}

/// SmolLM2's q8_0 embedding table kept packed (CPU, f32) looks up exactly the rows of the
/// dense table, and an id past the vocabulary is an error, not a panic.
#[test]
fn a_packed_embedding_table_looks_up_the_dense_tables_rows() {
    use pipeline_models::layers::Embedding;
    let Some(path) = smollm2() else {
        eprintln!("skipping: set PIPELINE_SMOLLM2_GGUF (scripts/fetch-test-assets.sh)");
        return;
    };
    let (weights, meta) = load_gguf_llama(&path, &Device::Cpu).unwrap();
    let cfg = LlamaConfig::from_gguf_meta(&meta);
    let name = "model.embed_tokens.weight";
    let stored = weights.stored(name).unwrap();
    assert!(
        matches!(stored, StoredTensor::Quantized(_)),
        "the test GGUF stores its embedding table quantized"
    );
    let shape = [cfg.vocab_size, cfg.hidden_size];
    let packed = Embedding::from_weights(&weights, name, shape, DType::F32).unwrap();
    let dense = Embedding::new(stored.to_dense(DType::F32).unwrap()).unwrap();
    let last = cfg.vocab_size as u32 - 1;
    let ids = Tensor::new(&[[0u32, 7, 49_000.min(last)], [last, 1, 1]], &Device::Cpu).unwrap();
    let (got, want) = (packed.forward(&ids).unwrap(), dense.forward(&ids).unwrap());
    assert_eq!(got.dims(), want.dims());
    assert_eq!(
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let past = Tensor::new(&[cfg.vocab_size as u32], &Device::Cpu).unwrap();
    let err = packed.forward(&past).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
}
