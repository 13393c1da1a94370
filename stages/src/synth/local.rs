//! The `local` generator: our own batched generation over a model artifact (and an optional
//! adapter), each chat rendered with the model's chat template: the code path of the `generate`
//! kind ([`pipeline_models::generate`]).

use std::path::{Path, PathBuf};

use candle_core::DType;
use pipeline_models::arch::DecoderModel;
use pipeline_models::artifact::{load_for_generation, LoadedModel};
use pipeline_models::device::DeviceChoice;
use pipeline_models::generate::{generate_batch, GenerateConfig, GenerateRequest, SamplingParams};
use tokenizers::Tokenizer;

use super::{ChatRequest, ChatResponse, Generator, OnResponse, Sampling};
use crate::artifacts::ModelArtifact;
use crate::chat::{render_chat, ChatTemplate};

/// Our own model as a [`Generator`].
pub struct LocalGenerator {
    model: DecoderModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    config: GenerateConfig,
    model_dir: PathBuf,
    adapter: bool,
}

impl LocalGenerator {
    /// Loads the model in `model_dir` (with the PEFT adapter in `adapter_dir`, if any) on
    /// `device` in `dtype`. The model must have a chat template; `batch_size` chats are decoded
    /// together.
    pub fn load(
        model_dir: &Path,
        adapter_dir: Option<&Path>,
        device: DeviceChoice,
        dtype: DType,
        sampling: Sampling,
        batch_size: usize,
    ) -> miette::Result<Self> {
        let template = ModelArtifact::chat_template(model_dir)?.ok_or_else(|| {
            miette::miette!(
                help = "use a model whose tokenizer_config.json (or GGUF metadata) has a \
                        chat_template (an instruction-tuned one), or the `openai` generator",
                "the local generator renders each prompt with the model's chat template, and {} \
                 has none",
                model_dir.display()
            )
        })?;
        let device = device.open()?;
        let LoadedModel {
            model,
            info,
            tokenizer_path,
        } = load_for_generation(model_dir, adapter_dir, &device, dtype).map_err(|e| {
            miette::miette!("cannot load the model from {}: {e}", model_dir.display())
        })?;
        if info.eos_token_ids.is_empty() {
            return Err(miette::miette!(
                help = "name the tokens that end a generation with `extra_eos_tokens` on the \
                        `model` stage",
                "no end-of-sequence token: `model.json` of {} lists no `eos_token_ids`",
                model_dir.display()
            ));
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| miette::miette!("tokenizer {}: {e}", tokenizer_path.display()))?;
        let config = GenerateConfig {
            max_new_tokens: sampling.max_new_tokens,
            sampling: SamplingParams {
                temperature: sampling.temperature,
                top_k: None,
                top_p: sampling.top_p,
            },
            num_samples: 1,
            eos_token_ids: info.eos_token_ids.clone(),
            pad_token_id: info.pad_id(),
            max_batch_rows: batch_size.max(1),
            prefill_chunk: 128,
            use_kv_cache: true,
            kv_cache_dtype: None,
        };
        Ok(Self {
            model,
            tokenizer,
            template,
            config,
            model_dir: model_dir.to_path_buf(),
            adapter: adapter_dir.is_some(),
        })
    }

    fn prompt_ids(&self, request: &ChatRequest) -> miette::Result<Vec<u32>> {
        let text = render_chat(
            &self.template.template,
            &request.messages,
            true,
            &self.template.bos_token,
            &self.template.eos_token,
        )?;
        // The rendered template already holds every special token the model expects (as
        // Hugging Face's apply_chat_template tokenizes it): adding them again would double a BOS.
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| miette::miette!("cannot encode prompt {}: {e}", request.id))
    }
}

impl Generator for LocalGenerator {
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "generator": "local",
            "model": self.model_dir.file_name().map(|n| n.to_string_lossy().to_string()),
            "adapter": self.adapter,
        })
    }

    fn generate(
        &self,
        requests: &[ChatRequest],
        on_response: &OnResponse<'_>,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> miette::Result<()> {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        // One batch between checks, so a cancel or a crash loses at most one batch.
        for (chunk_index, chunk) in requests.chunks(self.config.max_batch_rows).enumerate() {
            if cancelled() {
                return Err(miette::miette!("cancelled"));
            }
            let batch = chunk
                .iter()
                .map(|r| {
                    Ok(GenerateRequest {
                        prompt_ids: self.prompt_ids(r)?,
                        stop: Vec::new(),
                        seed: r.seed,
                    })
                })
                .collect::<miette::Result<Vec<_>>>()?;
            let out = generate_batch(&self.model, &batch, &self.config, decode)
                .map_err(|e| miette::miette!("generation failed: {e}"))?;
            for (i, samples) in out.completions.into_iter().enumerate() {
                let Some(c) = samples.into_iter().next() else {
                    continue;
                };
                on_response(
                    chunk_index * self.config.max_batch_rows + i,
                    ChatResponse {
                        text: c.text,
                        finish_reason: c.finish_reason.name().to_string(),
                        completion_tokens: Some(c.token_ids.len() as u64),
                    },
                )?;
            }
        }
        Ok(())
    }
}
