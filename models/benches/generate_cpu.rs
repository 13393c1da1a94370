//! CPU generation throughput of SmolLM2-135M-Instruct from its GGUF file, driven by
//! `bench/eval_bench.py` (which runs transformers' `generate` side by side).
//!
//! The model is loaded as the generate stage loads a GGUF model artifact
//! (`load_gguf_llama` + `LlamaConfig::from_gguf_meta`), with every projection either
//! dequantized to dense f32 at load (`--weights f32`, the comparison with transformers'
//! f32) or kept in its ggml block format as `QuantLinear` (`--weights quant`: dequantized in
//! every product, training's layer) or as `BlockLinear` (`--weights blocks`: products on the
//! packed 4/8-bit codes with f32 activations, what inference loads on the CPU), then frozen. Generation goes through
//! `generate_batch`, greedy, with no EOS or stop sequence, so every prompt gets exactly
//! `max_new_tokens` tokens. `--kv-cache f16` stores the KV cache as f16 (the default, `f32`,
//! is exact).
//!
//! Protocol (so the driver can alternate with the peer without reloading models): prompts
//! come as token ids from a JSON file (`[[ids...], ...]`, tokenized once by the driver so
//! both sides see the same ids); after loading, the program prints `{"ready": true}` and
//! then, for every line `{"batch": B, "max_new_tokens": N}` on stdin, generates all prompts
//! in batches of B and prints one JSON line `{"secs", "new_tokens", "prefill_secs",
//! "decode_secs", "tokens"}`.
//!
//! ```text
//! cargo bench -p pipeline-models --bench generate_cpu --no-run
//! RAYON_NUM_THREADS=2 target/release/deps/generate_cpu-* --gguf $PIPELINE_SMOLLM2_GGUF \
//!     --prompts prompts.json --weights f32
//! ```

use pipeline_models::Decoder;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use pipeline_models::arch::{DenseFactory, LinearFactory, LinearParts, Llama, LlamaConfig};
use pipeline_models::generate::{generate_batch, GenerateConfig, GenerateRequest};
use pipeline_models::layers::Dense;
use pipeline_models::linear::LinearLayer;
use pipeline_models::quant::{BlockLinear, GgmlQuantized, QuantLinear, QuantWeight};
use pipeline_models::weights::{load_gguf_llama, StoredTensor};

type BoxError = Box<dyn std::error::Error>;

/// ggml blocks as `QuantLinear` (dequantized in every product: training's layer), formats it
/// does not cover and dense tensors as `Dense`.
fn quant_layer(parts: LinearParts) -> candle_core::Result<Box<dyn LinearLayer>> {
    ggml_layer(parts, false)
}

/// ggml blocks as `BlockLinear` (products on the packed codes: the inference layer).
fn block_layer(parts: LinearParts) -> candle_core::Result<Box<dyn LinearLayer>> {
    ggml_layer(parts, true)
}

fn ggml_layer(parts: LinearParts, blocks: bool) -> candle_core::Result<Box<dyn LinearLayer>> {
    let quantized = match &parts.weight {
        StoredTensor::Quantized(q) => GgmlQuantized::from_qtensor(q.clone()).ok(),
        StoredTensor::Dense(_) => None,
    };
    let err = |e: pipeline_models::quant::QuantError| candle_core::Error::Msg(e.to_string());
    match quantized {
        Some(g) if blocks => match BlockLinear::new(&QuantWeight::Ggml(g), parts.bias.clone()) {
            Ok(layer) => Ok(Box::new(layer)),
            // No kernel for the format: decoded, as inference does.
            Err(_) => Ok(Box::new(Dense::new(
                parts.weight.to_dense(parts.dtype)?,
                parts.bias,
            )?)),
        },
        Some(g) => Ok(Box::new(
            QuantLinear::new(QuantWeight::Ggml(g), parts.bias).map_err(err)?,
        )),
        None => Ok(Box::new(Dense::new(
            parts.weight.to_dense(parts.dtype)?,
            parts.bias,
        )?)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Weights {
    F32,
    Quant,
    Blocks,
}

struct Args {
    gguf: PathBuf,
    prompts: PathBuf,
    weights: Weights,
    kv_cache_dtype: Option<DType>,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut gguf = std::env::var_os("PIPELINE_SMOLLM2_GGUF").map(PathBuf::from);
    let mut prompts = None;
    let mut weights = Weights::F32;
    let mut kv_cache_dtype = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--gguf" => gguf = it.next().map(PathBuf::from),
            "--prompts" => prompts = it.next().map(PathBuf::from),
            "--weights" => match it.next().as_deref() {
                Some("f32") => weights = Weights::F32,
                Some("quant") => weights = Weights::Quant,
                Some("blocks") => weights = Weights::Blocks,
                other => return Err(format!("--weights f32|quant|blocks, got {other:?}").into()),
            },
            "--kv-cache" => match it.next().as_deref() {
                Some("f32") => kv_cache_dtype = None,
                Some("f16") => kv_cache_dtype = Some(DType::F16),
                other => return Err(format!("--kv-cache f32|f16, got {other:?}").into()),
            },
            // `cargo bench` passes `--bench`; nothing else is expected.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(Args {
        gguf: gguf.ok_or("pass --gguf or set PIPELINE_SMOLLM2_GGUF")?,
        prompts: prompts.ok_or("pass --prompts FILE (a JSON list of token id lists)")?,
        weights,
        kv_cache_dtype,
    })
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&args.prompts)?)?;
    let device = Device::Cpu;
    let (weights, meta) = load_gguf_llama(&args.gguf, &device)?;
    let config = LlamaConfig::from_gguf_meta(&meta);
    let model = if args.weights == Weights::Quant {
        let mut factory = quant_layer;
        Llama::new(&config, &weights, DType::F32, &mut factory)?
    } else if args.weights == Weights::Blocks {
        let mut factory = block_layer;
        Llama::new(&config, &weights, DType::F32, &mut factory)?
    } else {
        let mut factory = DenseFactory;
        Llama::new(
            &config,
            &weights,
            DType::F32,
            &mut factory as &mut dyn LinearFactory,
        )?
    };
    drop(weights);
    model.freeze();
    let requests: Vec<GenerateRequest> = prompts
        .into_iter()
        .map(|prompt_ids| GenerateRequest {
            prompt_ids,
            stop: Vec::new(),
            seed: 0,
        })
        .collect();

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::json!({"ready": true}))?;
    stdout.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let cmd: serde_json::Value = serde_json::from_str(&line)?;
        let batch = cmd["batch"].as_u64().ok_or("command needs \"batch\"")? as usize;
        let max_new_tokens = cmd["max_new_tokens"]
            .as_u64()
            .ok_or("command needs \"max_new_tokens\"")? as usize;
        let config = GenerateConfig {
            max_new_tokens,
            // No EOS and no stop sequences: every prompt runs the full length, as with
            // transformers' min_new_tokens = max_new_tokens.
            eos_token_ids: Vec::new(),
            max_batch_rows: batch,
            kv_cache_dtype: args.kv_cache_dtype,
            ..GenerateConfig::default()
        };
        let start = Instant::now();
        let out = generate_batch(&model, &requests, &config, |_| String::new())?;
        let secs = start.elapsed().as_secs_f64();
        let tokens: Vec<&Vec<u32>> = out
            .completions
            .iter()
            .filter_map(|samples| samples.first().map(|c| &c.token_ids))
            .collect();
        let new_tokens: usize = tokens.iter().map(|t| t.len()).sum();
        writeln!(
            stdout,
            "{}",
            serde_json::json!({
                "secs": secs,
                "new_tokens": new_tokens,
                "prefill_secs": out.stats.prefill_secs,
                "decode_secs": out.stats.decode_secs,
                "tokens": tokens,
            })
        )?;
        stdout.flush()?;
    }
    Ok(())
}
