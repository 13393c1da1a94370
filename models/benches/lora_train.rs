//! LoRA training throughput and peak memory, for `bench/train_bench.py` (CPU) and a lent GPU.
//!
//! Loads SmolLM2-135M from its GGUF file, builds the frozen base either dense or NF4 (double
//! quantized, block 64), wraps the projections named by `--targets` in LoRA adapters, and runs
//! optimizer steps (AdamW, f32 master weights) on fixed pseudo-random token batches. Prints one
//! JSON line: median step seconds, tokens/s and the process's peak resident memory.
//!
//! `--device cuda` (a `--features cuda` build) and `--dtype f16|bf16` select where and in what
//! the forward runs; f16 trains with dynamic loss scaling, as PyTorch's autocast + GradScaler.
//! Step times on CUDA are taken after a device synchronize.
//!
//! ```text
//! cargo bench -p pipeline-models --bench lora_train -- --gguf MODEL.gguf --base f32 \
//!     --batch 2 --seq 256 --steps 5 [--device cuda --dtype f16]
//! ```

use candle_core::{DType, Device, Tensor, Var};
use pipeline_models::arch::{DenseFactory, LinearFactory, LinearParts, Llama, LoraFactory};
use pipeline_models::quant::{nf4::Nf4Tensor, QuantLinear, QuantWeight};
use pipeline_models::train::{
    ComputeDtype, GradScalerConfig, LossSum, LrSchedule, ScheduleKind, StepContext, TrainConfig,
    TrainModel, TrainRng, Trainer,
};
use pipeline_models::Decoder;
use pipeline_models::{LinearLayer, LoraConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

struct Args {
    gguf: PathBuf,
    base: String,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    r: usize,
    alpha: f64,
    dropout: f64,
    targets: Vec<String>,
    device: String,
    dtype: ComputeDtype,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        gguf: std::env::var_os("PIPELINE_SMOLLM2_GGUF")
            .map(PathBuf::from)
            .unwrap_or_default(),
        base: "f32".into(),
        batch: 2,
        seq: 256,
        steps: 5,
        warmup: 1,
        r: 16,
        alpha: 16.0,
        dropout: 0.05,
        targets: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
        device: "cpu".into(),
        dtype: ComputeDtype::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench`; ignore it.
        if flag == "--bench" {
            continue;
        }
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--gguf" => a.gguf = PathBuf::from(value()?),
            "--base" => a.base = value()?,
            "--batch" => a.batch = num(value()?)? as usize,
            "--seq" => a.seq = num(value()?)? as usize,
            "--steps" => a.steps = num(value()?)? as usize,
            "--warmup" => a.warmup = num(value()?)? as usize,
            "--r" => a.r = num(value()?)? as usize,
            "--alpha" => a.alpha = num(value()?)?,
            "--dropout" => a.dropout = num(value()?)?,
            "--targets" => a.targets = value()?.split(',').map(String::from).collect(),
            "--device" => a.device = value()?,
            "--dtype" => {
                a.dtype = match value()?.as_str() {
                    "f32" => ComputeDtype::F32,
                    "f16" => ComputeDtype::F16,
                    "bf16" => ComputeDtype::Bf16,
                    other => return Err(format!("--dtype must be f32, f16 or bf16, not {other}")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.gguf.as_os_str().is_empty() {
        return Err("pass --gguf or set PIPELINE_SMOLLM2_GGUF".into());
    }
    Ok(a)
}

/// NF4 (double-quantized) frozen projections, as the `quantize` stage makes them.
struct Nf4Factory;

impl LinearFactory for Nf4Factory {
    fn build(&mut self, parts: LinearParts) -> candle_core::Result<Box<dyn LinearLayer>> {
        let w = parts.weight.to_dense(DType::F32)?;
        let q =
            Nf4Tensor::quantize(&w, true).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let layer = QuantLinear::new(QuantWeight::Nf4(Arc::new(q)), parts.bias)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Box::new(layer))
    }
}

struct Lm {
    model: Llama,
}

impl TrainModel for Lm {
    type Batch = (Tensor, Tensor);

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.model.trainable_vars()
    }

    fn loss(
        &self,
        (ids, mask): &(Tensor, Tensor),
        ctx: &mut StepContext<'_>,
    ) -> candle_core::Result<LossSum> {
        self.model.set_training(ctx.train);
        self.model.set_dropout_stream(ctx.rng.next_u64_raw());
        let (sum, tokens) = self.model.loss_sum(ids, mask, mask, ctx.train)?;
        Ok(LossSum { sum, tokens })
    }
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("--device must be cpu or cuda, not {other}").into()),
    };
    let dtype = args.dtype.dtype();
    let lora = LoraConfig {
        r: args.r,
        alpha: args.alpha,
        dropout: args.dropout,
        target_modules: args.targets.clone(),
    };
    let load_start = Instant::now();
    let model = match args.base.as_str() {
        "f32" => {
            let mut f = LoraFactory::new(DenseFactory, lora, 0);
            Llama::from_gguf(&args.gguf, &device, dtype, &mut f)?
        }
        "nf4" => {
            let mut f = LoraFactory::new(Nf4Factory, lora, 0);
            Llama::from_gguf(&args.gguf, &device, dtype, &mut f)?
        }
        other => return Err(format!("--base must be f32 or nf4, not {other}").into()),
    };
    let load_s = load_start.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size;
    let trainable: usize = model
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let lm = Lm { model };

    // Fixed pseudo-random tokens: throughput does not depend on the text.
    let mut rng = TrainRng::new(7);
    let n = args.batch * args.seq;
    let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.seq), &device)?;
    let mask = Tensor::ones((args.batch, args.seq), DType::U8, &device)?;
    let data = vec![(ids, mask)];

    let config = TrainConfig {
        schedule: LrSchedule {
            kind: ScheduleKind::Constant,
            base_lr: 2e-4,
            warmup_steps: 0,
            total_steps: (args.steps + args.warmup) as u64,
        },
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        compute_dtype: args.dtype,
        // f16 needs loss scaling against gradient underflow; bf16 and f32 do not.
        grad_scaler: (args.dtype == ComputeDtype::F16).then(GradScalerConfig::default),
        checkpoint_every: None,
        eval_every: None,
        shuffle: false,
        ..TrainConfig::qlora(1)
    };
    let mut trainer = Trainer::new(&lm, config, None)?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    // Loss scales and skipped steps (f16 skips its first steps while the scale drops from 2^16
    // to where gradients fit, as GradScaler does).
    let mut scales = Vec::new();
    let mut skipped = 0usize;
    for i in 0..args.steps + args.warmup {
        let t = Instant::now();
        let report = trainer.train_step(&data)?;
        device.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        losses.push(report.record.loss);
        scales.push(report.record.scale);
        skipped += usize::from(report.skipped);
        eprintln!(
            "step {i}: {secs:.3} s, loss {:.4}, loss scale {}{}",
            report.record.loss,
            report.record.scale,
            if report.skipped {
                " (skipped: inf/NaN gradients)"
            } else {
                ""
            }
        );
        if i >= args.warmup {
            times.push(secs);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // Tokens that get a loss: every position but the last of each row.
    let tokens = (args.batch * (args.seq - 1)) as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "ours",
            "base": args.base,
            "device": args.device,
            "dtype": format!("{:?}", args.dtype),
            "batch": args.batch,
            "seq": args.seq,
            "trainable_params": trainable,
            "load_s": load_s,
            "step_s_median": median,
            "step_s_all": times,
            "tokens_per_s": tokens / median,
            "peak_rss_bytes": peak_rss_bytes(),
            "losses": losses,
            "loss_scales": scales,
            "skipped_steps": skipped,
        })
    );
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
