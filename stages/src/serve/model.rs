//! The served model: loaded once, answering chat and completion requests with our own
//! generation loop ([`pipeline_models::generate`]), whole or streamed.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device};
use pipeline_models::artifact::{load_for_generation, LoadedModel};
use pipeline_models::generate::{
    generate_batch_streaming, GenerateConfig, GenerateError, GenerateRequest, NewToken,
    SamplingParams,
};
use pipeline_models::DecoderModel;
use tokenizers::Tokenizer;

use super::api::{
    ApiError, AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDelta,
    ChatRequest, CompletionRequest, FinishReason, Prompt, SamplingRequest, TextChoice, TextChunk,
    TextChunkChoice, TextCompletion, Usage,
};
use super::stream::TextStream;
use crate::artifacts::ModelArtifact;
use crate::chat::{render_chat, ChatTemplate};

/// Why a model could not be served.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ServeModelError {
    /// The weights (or the adapter) did not load.
    #[error("cannot load the model from {path}: {message}")]
    #[diagnostic(help(
        "check the artifact with `pipeline verify`, or rerun the stage that made it"
    ))]
    Load {
        /// Model directory.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// `tokenizer.json` did not load.
    #[error("cannot load the tokenizer {path}: {message}")]
    #[diagnostic(help("the model artifact needs a Hugging Face `tokenizer.json`"))]
    Tokenizer {
        /// tokenizer.json path.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// `model.json` names no end-of-sequence token, so no answer would ever end before its
    /// `max_tokens`.
    #[error("the model in {} has no end-of-sequence token (`eos_token_ids` of model.json is empty)", .0.display())]
    #[diagnostic(help(
        "rebuild the `model` stage with `extra_eos_tokens` naming the model's end token"
    ))]
    NoEos(PathBuf),
}

/// One generated choice.
#[derive(Debug, Clone, PartialEq)]
struct Generated {
    /// Its whole text, cut before any stop sequence.
    text: String,
    /// Its text not yet streamed (all of it when not streaming).
    rest: String,
    /// Why it ended.
    finish_reason: FinishReason,
    /// Tokens generated.
    tokens: usize,
}

/// A model loaded for serving: weights (with an adapter applied, if any), tokenizer, end
/// tokens and chat template, under the name clients ask for it by.
///
/// Requests are answered one at a time (the model sits behind a lock); the choices of one
/// request (`n`, several prompts) are decoded together in batches.
pub struct ServedModel {
    id: String,
    created: u64,
    model: Mutex<DecoderModel>,
    tokenizer: Tokenizer,
    eos_token_ids: Vec<u32>,
    pad_token_id: u32,
    chat_template: Option<ChatTemplate>,
    max_batch_rows: usize,
}

impl ServedModel {
    /// Loads the model artifact in `model_dir` (with the PEFT adapter in `adapter_dir` applied
    /// when given) on `device` in `dtype`, to be served as `id`. At most `max_batch_rows`
    /// choices are decoded together.
    pub fn load(
        id: &str,
        model_dir: &Path,
        adapter_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
        max_batch_rows: usize,
    ) -> miette::Result<Self> {
        let LoadedModel {
            model,
            info,
            tokenizer_path,
        } = load_for_generation(model_dir, adapter_dir, device, dtype).map_err(|e| {
            ServeModelError::Load {
                path: model_dir.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        if info.eos_token_ids.is_empty() {
            return Err(ServeModelError::NoEos(model_dir.to_path_buf()).into());
        }
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| ServeModelError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        let chat_template = ModelArtifact::chat_template(model_dir)?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Self {
            id: id.to_string(),
            created,
            model: Mutex::new(model),
            tokenizer,
            pad_token_id: info.pad_id(),
            eos_token_ids: info.eos_token_ids,
            chat_template,
            max_batch_rows: max_batch_rows.max(1),
        })
    }

    /// The name clients ask for the model by (the stage's name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the model was loaded, in Unix seconds (the model object's `created`).
    pub fn created(&self) -> u64 {
        self.created
    }

    /// Whether the model has a chat template (without one, only completions are answered).
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The token ids of a chat prompt: `messages` through the model's chat template with the
    /// assistant's turn opened, tokenized as Hugging Face's `apply_chat_template` does (no
    /// special tokens added: the template writes them).
    pub fn chat_prompt(&self, messages: &[crate::chat::Message]) -> Result<Vec<u32>, ApiError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "messages",
                format!(
                    "model `{}` has no chat template; use POST /v1/completions with a prompt",
                    self.id
                ),
            )
        })?;
        let text = render_chat(
            &template.template,
            messages,
            true,
            &template.bos_token,
            &template.eos_token,
        )
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        self.encode(&text, false, "messages")
    }

    /// `text` as token ids (with the tokenizer's special tokens when `special`).
    pub fn encode(&self, text: &str, special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
        let ids = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| ApiError::internal(format!("cannot tokenize the prompt: {e}")))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(ApiError::invalid(
                param,
                "the prompt has no tokens; give some text",
            ));
        }
        Ok(ids)
    }

    /// `ids` as text, special tokens skipped (as the `generate` kind decodes).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Answers a chat completion request (not streamed).
    pub fn chat(&self, request: &ChatRequest) -> Result<ChatCompletion, ApiError> {
        self.check_model(&request.model)?;
        let prompt = self.chat_prompt(&request.messages)?;
        let generated = self.generate(std::slice::from_ref(&prompt), &request.sampling, None)?;
        Ok(ChatCompletion {
            id: new_id("chatcmpl"),
            object: "chat.completion",
            created: now(),
            model: self.id.clone(),
            usage: usage(&[prompt.len()], &generated),
            choices: generated
                .into_iter()
                .enumerate()
                .map(|(index, g)| ChatChoice {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        content: g.text,
                    },
                    logprobs: None,
                    finish_reason: g.finish_reason,
                })
                .collect(),
        })
    }

    /// Answers a chat completion request as a stream of chunks handed to `send`, in order:
    /// each choice's opening chunk (its role), text as it is generated, each choice's last
    /// chunk (its finish reason), then the usage chunk if asked for. `send` returning
    /// [`ControlFlow::Break`] (the client went away) stops generating. Errors before the
    /// first chunk are returned; so are later ones, after chunks were sent.
    pub fn chat_stream(
        &self,
        request: &ChatRequest,
        send: &mut dyn FnMut(&ChatChunk) -> ControlFlow<()>,
    ) -> Result<(), ApiError> {
        self.check_model(&request.model)?;
        let prompt = self.chat_prompt(&request.messages)?;
        let id = new_id("chatcmpl");
        let usage_field = |u: Option<Usage>| request.sampling.include_usage.then_some(u);
        let mut send_chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>| {
            send(&ChatChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created: now(),
                model: self.id.clone(),
                choices,
                usage,
            })
        };
        let delta =
            |index: usize, role: Option<&'static str>, content: Option<String>| ChatChunkChoice {
                index,
                delta: ChatDelta { role, content },
                logprobs: None,
                finish_reason: None,
            };
        let opening = (0..request.sampling.n)
            .map(|i| delta(i, Some("assistant"), Some(String::new())))
            .collect();
        if send_chunk(opening, usage_field(None)).is_break() {
            return Ok(());
        }
        let mut on_delta = |index: usize, text: String| {
            send_chunk(vec![delta(index, None, Some(text))], usage_field(None))
        };
        let generated = match self.generate(
            std::slice::from_ref(&prompt),
            &request.sampling,
            Some(&mut on_delta),
        ) {
            Err(e) if is_stopped(&e) => return Ok(()),
            other => other?,
        };
        for (index, g) in generated.iter().enumerate() {
            let mut last = delta(index, None, (!g.rest.is_empty()).then(|| g.rest.clone()));
            last.finish_reason = Some(g.finish_reason);
            if send_chunk(vec![last], usage_field(None)).is_break() {
                return Ok(());
            }
        }
        if request.sampling.include_usage {
            let _ = send_chunk(Vec::new(), Some(Some(usage(&[prompt.len()], &generated))));
        }
        Ok(())
    }

    /// The token ids of the prompts of a completion request.
    pub fn completion_prompts(
        &self,
        request: &CompletionRequest,
    ) -> Result<Vec<Vec<u32>>, ApiError> {
        request
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Prompt::Text(text) => self.encode(text, true, &prompt_param(request, i)),
                Prompt::Tokens(ids) => Ok(ids.clone()),
            })
            .collect()
    }

    /// The text a choice of prompt `i` starts with when the request echoes its prompt.
    fn echo_of(&self, request: &CompletionRequest, prompts: &[Vec<u32>], i: usize) -> String {
        if !request.echo {
            return String::new();
        }
        match &request.prompts[i] {
            Prompt::Text(text) => text.clone(),
            Prompt::Tokens(_) => self.decode(&prompts[i]),
        }
    }

    /// Answers a completion request (not streamed).
    pub fn complete(&self, request: &CompletionRequest) -> Result<TextCompletion, ApiError> {
        self.check_model(&request.model)?;
        let prompts = self.completion_prompts(request)?;
        let generated = self.generate(&prompts, &request.sampling, None)?;
        let n = request.sampling.n;
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        Ok(TextCompletion {
            id: new_id("cmpl"),
            object: "text_completion",
            created: now(),
            model: self.id.clone(),
            usage: usage(&lengths, &generated),
            choices: generated
                .into_iter()
                .enumerate()
                .map(|(index, g)| TextChoice {
                    index,
                    text: format!("{}{}", self.echo_of(request, &prompts, index / n), g.text),
                    logprobs: None,
                    finish_reason: g.finish_reason,
                })
                .collect(),
        })
    }

    /// Answers a completion request as a stream of `text_completion` chunks handed to `send`
    /// (see [`ServedModel::chat_stream`]).
    pub fn complete_stream(
        &self,
        request: &CompletionRequest,
        send: &mut dyn FnMut(&TextChunk) -> ControlFlow<()>,
    ) -> Result<(), ApiError> {
        self.check_model(&request.model)?;
        let prompts = self.completion_prompts(request)?;
        let id = new_id("cmpl");
        let usage_field = |u: Option<Usage>| request.sampling.include_usage.then_some(u);
        let mut send_chunk = |choices: Vec<TextChunkChoice>, usage: Option<Option<Usage>>| {
            send(&TextChunk {
                id: id.clone(),
                object: "text_completion",
                created: now(),
                model: self.id.clone(),
                choices,
                usage,
            })
        };
        let piece =
            |index: usize, text: String, finish_reason: Option<FinishReason>| TextChunkChoice {
                index,
                text,
                logprobs: None,
                finish_reason,
            };
        let n = request.sampling.n;
        if request.echo {
            let echoes = (0..prompts.len() * n)
                .map(|index| piece(index, self.echo_of(request, &prompts, index / n), None))
                .collect();
            if send_chunk(echoes, usage_field(None)).is_break() {
                return Ok(());
            }
        }
        let mut on_delta = |index: usize, text: String| {
            send_chunk(vec![piece(index, text, None)], usage_field(None))
        };
        let generated = match self.generate(&prompts, &request.sampling, Some(&mut on_delta)) {
            Err(e) if is_stopped(&e) => return Ok(()),
            other => other?,
        };
        for (index, g) in generated.iter().enumerate() {
            let last = piece(index, g.rest.clone(), Some(g.finish_reason));
            if send_chunk(vec![last], usage_field(None)).is_break() {
                return Ok(());
            }
        }
        if request.sampling.include_usage {
            let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
            let _ = send_chunk(Vec::new(), Some(Some(usage(&lengths, &generated))));
        }
        Ok(())
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.id {
            Ok(())
        } else {
            Err(ApiError::unknown_model(model, &self.id))
        }
    }

    /// Generates `sampling.n` choices per prompt (choice `i * n + j` is sample `j` of prompt
    /// `i`). With `on_delta`, each choice's text is handed over as it becomes safe to send
    /// ([`TextStream`]), and [`Generated::rest`] is what is left to send at the end.
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        sampling: &SamplingRequest,
        on_delta: Option<&mut dyn FnMut(usize, String) -> ControlFlow<()>>,
    ) -> Result<Vec<Generated>, ApiError> {
        let seed = sampling.seed.unwrap_or_else(rand::random);
        let requests: Vec<GenerateRequest> = prompts
            .iter()
            .map(|ids| GenerateRequest {
                prompt_ids: ids.clone(),
                stop: sampling.stop.clone(),
                seed,
            })
            .collect();
        let params = if sampling.is_greedy() {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                temperature: sampling.temperature,
                top_k: None,
                top_p: (sampling.top_p < 1.0).then_some(sampling.top_p),
            }
        };
        let config = GenerateConfig {
            max_new_tokens: sampling.max_tokens,
            sampling: params,
            num_samples: sampling.n,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            max_batch_rows: self.max_batch_rows,
            ..GenerateConfig::default()
        };
        let n = sampling.n;
        let choices = prompts.len() * n;
        let mut streams = vec![TextStream::new(&sampling.stop); choices];
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); choices];
        let decode = |ids: &[u32]| self.decode(ids);
        // A panic in one request (a model bug) poisons the lock; the model itself is intact.
        let model = self.model.lock().unwrap_or_else(|p| p.into_inner());
        let output = match on_delta {
            None => generate_batch_streaming(
                &*model,
                &requests,
                &config,
                decode,
                |_, _, _| {},
                |_| ControlFlow::Continue(()),
            ),
            Some(on_delta) => generate_batch_streaming(
                &*model,
                &requests,
                &config,
                decode,
                |_, _, _| {},
                |step: &[NewToken]| {
                    for t in step {
                        let choice = t.request * n + t.sample;
                        tokens[choice].push(t.token);
                        let delta = streams[choice].advance(&self.decode(&tokens[choice]));
                        if !delta.is_empty() && on_delta(choice, delta).is_break() {
                            return ControlFlow::Break(());
                        }
                    }
                    ControlFlow::Continue(())
                },
            ),
        }
        .map_err(|e| generate_error(e, prompts))?;
        drop(model);
        let mut generated = Vec::with_capacity(choices);
        for (i, samples) in output.completions.into_iter().enumerate() {
            for (j, c) in samples.into_iter().enumerate() {
                let choice = i * n + j;
                let rest = streams[choice].finish(&c.text).unwrap_or_else(|| {
                    tracing::warn!(
                        "choice {choice}: the decoder rewrote text already streamed; the stream \
                         ends with what was sent"
                    );
                    String::new()
                });
                generated.push(Generated {
                    finish_reason: match c.finish_reason {
                        pipeline_models::generate::FinishReason::Length => FinishReason::Length,
                        _ => FinishReason::Stop,
                    },
                    tokens: c.token_ids.len(),
                    text: c.text,
                    rest,
                });
            }
        }
        Ok(generated)
    }
}

fn is_stopped(e: &ApiError) -> bool {
    e.code == Some(STOPPED)
}

/// The code of the error that stands for "the client went away" (never sent to anyone).
const STOPPED: &str = "client_gone";

fn generate_error(e: GenerateError, prompts: &[Vec<u32>]) -> ApiError {
    match e {
        GenerateError::Stopped => ApiError {
            code: Some(STOPPED),
            ..ApiError::internal("the client went away")
        },
        GenerateError::EmptyPrompt(i) => ApiError::invalid(
            if prompts.len() > 1 {
                "prompt"
            } else {
                "messages"
            },
            format!("prompt {i} has no tokens"),
        ),
        GenerateError::TokenOutOfVocab { token, vocab, .. } => ApiError::invalid(
            "prompt",
            format!("token id {token} is outside the model's vocabulary of {vocab}"),
        ),
        GenerateError::EmptyStopSequence(_) => {
            ApiError::invalid("stop", "a stop sequence must not be empty")
        }
        GenerateError::Sampler(e) => ApiError::invalid("temperature", e.to_string()),
        other => ApiError::internal(format!("generation failed: {other}")),
    }
}

fn prompt_param(request: &CompletionRequest, i: usize) -> String {
    if request.prompts.len() == 1 {
        "prompt".into()
    } else {
        format!("prompt[{i}]")
    }
}

fn usage(prompt_lengths: &[usize], generated: &[Generated]) -> Usage {
    Usage::new(
        prompt_lengths.iter().sum(),
        generated.iter().map(|g| g.tokens).sum(),
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh response id: `prefix-` and 24 hex digits.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}
