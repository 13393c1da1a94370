//! `quantize`: stores a model's linear projections in a low-bit format (the frozen base of
//! QLoRA), reporting how far each dequantized weight is from the original.
//!
//! Input: a `model` artifact (HF safetensors or GGUF; a GGUF weight is dequantized first, so
//! its error is measured against the GGUF values). Output: a `model` artifact in the quantized
//! layout (see [`model_artifact`](super::model_artifact)): `config.json`,
//! `quantized.safetensors`, `quantization.json` ([`QuantizationReport`]), `tokenizer.json`,
//! `tokenizer_config.json`, `model.json`.
//!
//! ```toml
//! [base4]
//! kind = "quantize"
//! inputs = { model = "base" }
//! format = "nf4"          # or q4_0 | q4_1 | q8_0 | q4k
//! double_quant = true     # NF4 only
//! modules = ["q_proj", "v_proj"]   # default: every linear layer except lm_head
//! ```

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use miette::{miette, IntoDiagnostic};
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::quant::{nf4, reconstruction_error, GgmlFormat, GgmlQuantized, Nf4Tensor};
use pipeline_models::weights::{StoredTensor, Weights};
use serde::{Deserialize, Serialize};

use super::model_artifact::{
    link_or_copy, write_json, ArchConfig, ModelInfo, ModelLayout, QuantizationReport,
    QuantizedLayer, CONFIG_JSON, GGML_DATA_SUFFIX, GGML_SHAPE_SUFFIX, GGUF_FILE, MODEL_JSON,
    QUANTIZATION_JSON, QUANTIZED_FILE, TOKENIZER_CONFIG_JSON, TOKENIZER_JSON,
};

/// The `quantize` kind.
pub struct QuantizeKind;

/// Target storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    /// 4-bit NormalFloat, blocks of 64 (QLoRA).
    Nf4,
    /// ggml q4_0 (blocks of 32).
    Q4_0,
    /// ggml q4_1 (blocks of 32).
    Q4_1,
    /// ggml q8_0 (blocks of 32).
    Q8_0,
    /// ggml q4k (super-blocks of 256).
    Q4k,
}

impl QuantFormat {
    fn ggml(self) -> Option<GgmlFormat> {
        match self {
            Self::Nf4 => None,
            Self::Q4_0 => Some(GgmlFormat::Q4_0),
            Self::Q4_1 => Some(GgmlFormat::Q4_1),
            Self::Q8_0 => Some(GgmlFormat::Q8_0),
            Self::Q4k => Some(GgmlFormat::Q4K),
        }
    }

    fn name(self) -> &'static str {
        self.ggml().map_or("nf4", GgmlFormat::name)
    }

    fn block_size(self) -> usize {
        self.ggml().map_or(nf4::BLOCK_SIZE, GgmlFormat::block_size)
    }
}

fn default_true() -> bool {
    true
}

/// Parameters of [`QuantizeKind`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeParams {
    /// The format.
    pub format: QuantFormat,
    /// NF4: quantize the block scales too (QLoRA's double quantization).
    #[serde(default = "default_true")]
    pub double_quant: bool,
    /// Modules to quantize, matched like PEFT `target_modules` (`q_proj` matches
    /// `model.layers.3.self_attn.q_proj`). Default: every linear layer except `lm_head`.
    #[serde(default)]
    pub modules: Option<Vec<String>>,
}

impl Stage for QuantizeKind {
    type Params = QuantizeParams;
    const KIND: &'static str = "quantize";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "quantize a model's linear layers (nf4, q4_0, q4_1, q8_0, q4k)";

    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "model",
            accepts: &["model"],
            required: true,
            many: false,
            doc: "the model to quantize",
        }]
    }

    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "out",
            artifact: "model",
            doc: "the quantized model and quantization.json",
        }]
    }

    fn validate(p: &QuantizeParams) -> Result<(), String> {
        if p.modules.as_ref().is_some_and(Vec::is_empty) {
            return Err("`modules` is empty; leave it out to quantize every linear layer".into());
        }
        Ok(())
    }

    fn run(p: &QuantizeParams, ctx: &mut StageContext) -> miette::Result<()> {
        let input = ctx.input("model")?.to_path_buf();
        let out = ctx.output_dir("out")?.to_path_buf();
        let mut info = ModelInfo::load(&input)?;
        let cpu = Device::Cpu;
        let (weights, config, config_json) = match ModelLayout::detect(&input)? {
            ModelLayout::Quantized => {
                return Err(miette!(
                    help = "connect the unquantized model (the `model` stage's output) instead",
                    "the input model is already quantized"
                ))
            }
            ModelLayout::HfSafetensors => {
                let files =
                    pipeline_models::weights::safetensors_in_dir(&input).into_diagnostic()?;
                let config = ArchConfig::read(&input, info.architecture)?;
                let text = std::fs::read_to_string(input.join(CONFIG_JSON)).into_diagnostic()?;
                (
                    Weights::from_safetensors(&files, &cpu).into_diagnostic()?,
                    config,
                    text,
                )
            }
            ModelLayout::Gguf => {
                let (w, meta) =
                    pipeline_models::weights::load_gguf_llama(&input.join(GGUF_FILE), &cpu)
                        .into_diagnostic()?;
                let mut cfg =
                    serde_json::to_value(pipeline_models::arch::LlamaConfig::from_gguf_meta(&meta))
                        .into_diagnostic()?;
                if let Some(obj) = cfg.as_object_mut() {
                    obj.insert("model_type".into(), "llama".into());
                    obj.insert(
                        "architectures".into(),
                        serde_json::json!(["LlamaForCausalLM"]),
                    );
                }
                let text = serde_json::to_string_pretty(&cfg).into_diagnostic()?;
                (
                    w,
                    ArchConfig::Llama(pipeline_models::arch::LlamaConfig::from_gguf_meta(&meta)),
                    text,
                )
            }
        };
        let targets: Vec<String> = config
            .linear_modules()
            .into_iter()
            .filter(|m| match &p.modules {
                Some(list) => list.iter().any(|t| {
                    m == t || m.strip_suffix(t.as_str()).is_some_and(|x| x.ends_with('.'))
                }),
                None => m != "lm_head",
            })
            .collect();
        if targets.is_empty() {
            return Err(miette!(
                help = "module names are e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (Llama) or dense, fc1, fc2 (Phi)",
                "`modules` matches no linear layer of this model"
            ));
        }
        ctx.progress().start(targets.len() as u64, "layers");
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut layers = Vec::with_capacity(targets.len());
        for (i, module) in targets.iter().enumerate() {
            ctx.check_cancelled()?;
            let name = format!("{module}.weight");
            let stored = weights.stored(&name).into_diagnostic()?;
            let original_bytes = stored_bytes(&stored);
            let w = stored.to_dense(DType::F32).into_diagnostic()?;
            let (deq, quantized_bytes) = match p.format.ggml() {
                None => {
                    let q = Nf4Tensor::quantize(&w, p.double_quant)
                        .map_err(|e| miette!("`{name}`: {e}"))?;
                    tensors.extend(q.to_tensors(&name).into_diagnostic()?);
                    (
                        q.dequantize(DType::F32, &cpu).into_diagnostic()?,
                        q.size_bytes(),
                    )
                }
                Some(f) => {
                    let q = GgmlQuantized::quantize(&w, f).map_err(|e| {
                        miette!(help = "restrict `modules` or pick a format with smaller blocks (q4_0, q8_0, nf4)", "`{name}`: {e}")
                    })?;
                    let data = q.qtensor().data().into_diagnostic()?.into_owned();
                    let shape: Vec<u32> = q.shape().iter().map(|&d| d as u32).collect();
                    tensors.push((
                        format!("{name}.{GGML_DATA_SUFFIX}"),
                        Tensor::new(data.as_slice(), &cpu).into_diagnostic()?,
                    ));
                    tensors.push((
                        format!("{name}.{GGML_SHAPE_SUFFIX}"),
                        Tensor::new(shape.as_slice(), &cpu).into_diagnostic()?,
                    ));
                    (
                        q.dequantize(DType::F32, &cpu).into_diagnostic()?,
                        q.size_bytes(),
                    )
                }
            };
            let error = reconstruction_error(&w, &deq).into_diagnostic()?;
            layers.push(QuantizedLayer {
                module: module.clone(),
                shape: w.dims().to_vec(),
                format: p.format.name().into(),
                original_bytes,
                quantized_bytes: quantized_bytes as u64,
                error,
            });
            ctx.progress().set_position(i as u64 + 1);
        }
        // Everything else (embeddings, norms, biases, unquantized layers) stays dense, in its
        // stored dtype (GGUF-quantized ones are dequantized to f32).
        let quantized: std::collections::HashSet<String> =
            targets.iter().map(|m| format!("{m}.weight")).collect();
        let mut dense_bytes = 0u64;
        for (name, _) in config.tensor_shapes() {
            if quantized.contains(&name) {
                continue;
            }
            let stored = weights.stored(&name).into_diagnostic()?;
            let t = match &stored {
                StoredTensor::Dense(t) => t.clone(),
                StoredTensor::Quantized(_) => stored.to_dense(DType::F32).into_diagnostic()?,
            };
            dense_bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            tensors.push((name, t));
        }
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, out.join(QUANTIZED_FILE)).into_diagnostic()?;
        std::fs::write(out.join(CONFIG_JSON), config_json).into_diagnostic()?;
        let rel: Vec<f64> = layers.iter().map(|l| l.error.relative).collect();
        let report = QuantizationReport {
            format: p.format.name().into(),
            double_quant: p.format == QuantFormat::Nf4 && p.double_quant,
            block_size: p.format.block_size(),
            original_bytes: layers.iter().map(|l| l.original_bytes).sum(),
            quantized_bytes: layers.iter().map(|l| l.quantized_bytes).sum(),
            dense_bytes,
            max_relative_error: rel.iter().copied().fold(0.0, f64::max),
            mean_relative_error: rel.iter().sum::<f64>() / rel.len().max(1) as f64,
            layers,
        };
        write_json(&out.join(QUANTIZATION_JSON), &report)?;
        for name in [TOKENIZER_JSON, TOKENIZER_CONFIG_JSON] {
            if input.join(name).is_file() {
                link_or_copy(&input.join(name), &out.join(name), true)?;
            }
        }
        info.source = format!("{} ({})", info.source, p.format.name());
        write_json(&out.join(MODEL_JSON), &info)?;
        ctx.set_metadata("layers", report.layers.len() as u64);
        ctx.set_metadata("quantized_bytes", report.quantized_bytes);
        ctx.set_metadata("original_bytes", report.original_bytes);
        ctx.set_metadata("max_relative_error", report.max_relative_error);
        Ok(())
    }
}

fn stored_bytes(t: &StoredTensor) -> u64 {
    match t {
        StoredTensor::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        StoredTensor::Quantized(q) => q.storage_size_in_bytes() as u64,
    }
}
