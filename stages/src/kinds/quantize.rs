//! `quantize`: stores a model's linear projections in a low-bit format (the frozen base of
//! QLoRA), reporting how far each dequantized weight is from the original.
//!
//! Input: a `model` artifact (HF safetensors or GGUF; a GGUF weight is dequantized first, so
//! its error is measured against the GGUF values). Output: a `model` artifact in the quantized
//! layout ([`pipeline_models::artifact::quantized`], which writes it): `config.json`,
//! `quantized.safetensors`, `quantization.json`
//! ([`QuantizationReport`](pipeline_models::artifact::quantized::QuantizationReport)),
//! `tokenizer.json`, `tokenizer_config.json`, `model.json`.
//!
//! ```toml
//! [base4]
//! kind = "quantize"
//! inputs = { model = "base" }
//! format = "nf4"          # or q4_0 | q4_1 | q8_0 | q4k
//! double_quant = true     # NF4 only
//! modules = ["q_proj", "v_proj"]   # default: every linear layer except lm_head
//! ```

use miette::{miette, IntoDiagnostic};
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::artifact::quantized::{QuantFormat, QuantizedWriter};
use pipeline_models::artifact::{
    link_or_copy, read_weights, ModelInfo, ModelLayout, CONFIG_JSON, TOKENIZER_CONFIG_JSON,
    TOKENIZER_JSON,
};
use serde::{Deserialize, Serialize};

use crate::artifacts::ModelArtifact;

/// The `quantize` kind.
pub struct QuantizeKind;

fn default_true() -> bool {
    true
}

/// Parameters of [`QuantizeKind`].
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
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
            accepts: &[ModelArtifact::TYPE],
            required: true,
            many: false,
            doc: "the model to quantize",
        }]
    }

    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "out",
            artifact: ModelArtifact::TYPE,
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
        let config_json = match ModelLayout::detect(&input)? {
            ModelLayout::Quantized => {
                return Err(miette!(
                    help = "connect the unquantized model (the `model` stage's output) instead",
                    "the input model is already quantized"
                ))
            }
            // The checkpoint's own config, byte for byte.
            ModelLayout::HfSafetensors => {
                std::fs::read_to_string(input.join(CONFIG_JSON)).into_diagnostic()?
            }
            ModelLayout::Gguf => String::new(),
        };
        let stored = read_weights(&input, &info, &candle_core::Device::Cpu)?;
        let (weights, config) = (stored.weights, stored.config);
        // A GGUF file's config comes from its metadata.
        let config_json = if config_json.is_empty() {
            serde_json::to_string_pretty(&config.to_hf_json()).into_diagnostic()?
        } else {
            config_json
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
                help = format!(
                    "module names of this model: {}",
                    info.architecture.linear_module_names().join(", ")
                ),
                "`modules` matches no linear layer of this model"
            ));
        }
        ctx.progress().start(targets.len() as u64, "layers");
        let mut writer = QuantizedWriter::new(p.format, p.double_quant);
        for (i, module) in targets.iter().enumerate() {
            ctx.check_cancelled()?;
            let stored = weights
                .stored(&format!("{module}.weight"))
                .into_diagnostic()?;
            writer.quantize(module, &stored)?;
            ctx.progress().set_position(i as u64 + 1);
        }
        // Everything else (embeddings, norms, biases, unquantized layers) stays dense, in its
        // stored dtype (GGUF-quantized ones are dequantized to f32).
        let quantized: std::collections::HashSet<String> =
            targets.iter().map(|m| format!("{m}.weight")).collect();
        for (name, _) in config.tensor_shapes() {
            if !quantized.contains(&name) {
                writer.keep_dense(&name, &weights.stored(&name).into_diagnostic()?)?;
            }
        }
        let report = writer.finish(&out, &config_json)?;
        for name in [TOKENIZER_JSON, TOKENIZER_CONFIG_JSON] {
            if input.join(name).is_file() {
                link_or_copy(&input.join(name), &out.join(name), true)?;
            }
        }
        info.source = format!("{} ({})", info.source, p.format.name());
        info.save(&out)?;
        ctx.set_metadata("layers", report.layers.len() as u64);
        ctx.set_metadata("quantized_bytes", report.quantized_bytes);
        ctx.set_metadata("original_bytes", report.original_bytes);
        ctx.set_metadata("max_relative_error", report.max_relative_error);
        Ok(())
    }
}
