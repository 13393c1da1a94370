//! CPU scoring throughput of SmolLM2-135M-Instruct from its GGUF file (dequantized to dense f32
//! at load, as the `likelihood` kind loads a GGUF model artifact), driven by
//! `bench/likelihood_bench.py`, which runs transformers on the same token ids side by side.
//!
//! Input: a JSON file in the format of `models/tests/fixtures/smollm2_likelihood.json` (tasks
//! with `ids` and `target_start`). Each round scores every task with
//! [`score_sequences`](pipeline_models::likelihood::score_sequences) and prints one JSON line
//! `{"secs", "target_tokens", "positions", "nll": [...]}`.
//!
//! ```text
//! cargo bench -p pipeline-models --bench likelihood_cpu --no-run
//! RAYON_NUM_THREADS=2 target/release/deps/likelihood_cpu-* --gguf $PIPELINE_SMOLLM2_GGUF \
//!     --input tasks.json --rounds 3 [--batch-tokens 4096]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use pipeline_models::arch::{DenseFactory, LinearFactory, Llama, LlamaConfig};
use pipeline_models::likelihood::{score_sequences, ScoreBatching};
use pipeline_models::weights::load_gguf_llama;
use pipeline_models::{Decoder, DecoderModel};

type BoxError = Box<dyn std::error::Error>;

#[derive(serde::Deserialize)]
struct Input {
    tasks: Vec<Task>,
}

#[derive(serde::Deserialize)]
struct Task {
    ids: Vec<u32>,
    target_start: usize,
}

fn main() -> Result<(), BoxError> {
    let mut gguf = std::env::var_os("PIPELINE_SMOLLM2_GGUF").map(PathBuf::from);
    let mut input = None;
    let mut rounds = 3usize;
    let mut batch_tokens = 4096usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--gguf" => gguf = it.next().map(PathBuf::from),
            "--input" => input = it.next().map(PathBuf::from),
            "--rounds" => rounds = it.next().ok_or("--rounds N")?.parse()?,
            "--batch-tokens" => batch_tokens = it.next().ok_or("--batch-tokens N")?.parse()?,
            // `cargo bench` passes `--bench`; nothing else is expected.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let gguf = gguf.ok_or("pass --gguf or set PIPELINE_SMOLLM2_GGUF")?;
    let input: Input = serde_json::from_str(&std::fs::read_to_string(
        input.ok_or("pass --input FILE (tasks with ids and target_start)")?,
    )?)?;
    let examples: Vec<(Vec<u32>, Vec<u8>)> = input
        .tasks
        .iter()
        .map(|t| {
            let mask = (0..t.ids.len())
                .map(|i| u8::from(i >= t.target_start))
                .collect();
            (t.ids.clone(), mask)
        })
        .collect();
    let device = Device::Cpu;
    let (weights, meta) = load_gguf_llama(&gguf, &device)?;
    let config = LlamaConfig::from_gguf_meta(&meta);
    let mut factory = DenseFactory;
    let model = Llama::new(
        &config,
        &weights,
        DType::F32,
        &mut factory as &mut dyn LinearFactory,
    )?;
    drop(weights);
    model.freeze();
    let model = DecoderModel::new(model);
    let positions: usize = examples.iter().map(|(ids, _)| ids.len()).sum();
    let batching = ScoreBatching {
        max_batch_tokens: batch_tokens,
        pad_id: 0,
    };
    for _ in 0..rounds {
        let start = Instant::now();
        let scores = score_sequences(&model, &examples, batching, |_| {})?;
        let secs = start.elapsed().as_secs_f64();
        let target_tokens: usize = scores.iter().map(|s| s.tokens).sum();
        let nll: Vec<f64> = scores.iter().map(|s| s.nll).collect();
        println!(
            "{}",
            serde_json::json!({
                "secs": secs,
                "target_tokens": target_tokens,
                "positions": positions,
                "nll": nll,
            })
        );
    }
    Ok(())
}
