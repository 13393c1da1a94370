//! The OpenAI API's shapes: requests parsed and checked field by field (so that an error names
//! the parameter at fault, as OpenAI's do), responses and stream chunks, and errors.
//!
//! Fields this server does not know are ignored, as OpenAI-compatible servers do (clients send
//! extras such as `user`); fields it knows but cannot honour (`logprobs`, tools, penalties)
//! are refused with a 400 naming them rather than silently ignored.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::chat::Message;

/// Most completions one request may ask for (`n` times the prompts).
pub const MAX_CHOICES: usize = 128;

/// `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its HTTP
/// status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong, for people.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `not_found_error`, `server_error`).
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`), if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about parameter `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// A 400 about the request as a whole (its body is not JSON, say).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// A 404 for a model this server does not serve.
    pub fn unknown_model(model: &str, served: &str) -> Self {
        Self {
            status: 404,
            message: format!(
                "The model `{model}` does not exist; this server serves `{served}` (GET /v1/models lists it)"
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// A 404 for a path this server has no route for.
    pub fn unknown_route(method: &str, path: &str) -> Self {
        Self {
            status: 404,
            message: format!(
                "no route {method} {path}; this server answers GET /v1/models, POST \
                 /v1/chat/completions and POST /v1/completions"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// A 405 for a known path asked with the wrong method.
    pub fn wrong_method(method: &str, path: &str, allowed: &str) -> Self {
        Self {
            status: 405,
            message: format!("{path} does not accept {method}; use {allowed}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// A 413 for a body over the size limit.
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: 413,
            message: format!("the request body is larger than {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// A 500: the server failed at something the request could not have prevented.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body: `{"error": {...}}`.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

/// How to sample, as both endpoints take it.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingRequest {
    /// Most tokens generated per choice (`max_tokens`, or chat's `max_completion_tokens`).
    pub max_tokens: usize,
    /// Softmax temperature, 0 to 2; 0 is greedy (OpenAI's default is 1).
    pub temperature: f32,
    /// Nucleus mass, in (0, 1]; 1 keeps every token (a `top_p` of 0 is greedy).
    pub top_p: f32,
    /// Seed of the choices' samplers; `None` draws one.
    pub seed: Option<u64>,
    /// Choices per prompt.
    pub n: usize,
    /// Stop sequences: each choice's text is cut before the earliest one.
    pub stop: Vec<String>,
    /// Whether to answer with Server-Sent Events.
    pub stream: bool,
    /// With `stream`: whether a last chunk carries the usage (`stream_options.include_usage`).
    pub include_usage: bool,
}

impl SamplingRequest {
    /// Whether these settings decode greedily.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_p == 0.0
    }
}

/// A prompt of `/v1/completions`: text, or token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text, tokenized with the model's tokenizer (special tokens added as it adds them).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A `POST /v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model asked for.
    pub model: String,
    /// The conversation (`developer` messages become `system` ones).
    pub messages: Vec<Message>,
    /// How to sample.
    pub sampling: SamplingRequest,
}

/// A `POST /v1/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The model asked for.
    pub model: String,
    /// The prompts; choice `i * n + j` is sample `j` of prompt `i`.
    pub prompts: Vec<Prompt>,
    /// Whether each choice's text starts with its prompt's text.
    pub echo: bool,
    /// How to sample.
    pub sampling: SamplingRequest,
}

/// The fields of one request body, taken out one by one.
struct Fields(Map<String, Value>);

impl Fields {
    fn of(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the request body is not valid JSON ({e}); send a JSON object"
            ))
        })?;
        match value {
            Value::Object(map) => Ok(Self(map)),
            other => Err(ApiError::bad_request(format!(
                "the request body must be a JSON object, not {}",
                type_name(&other)
            ))),
        }
    }

    /// The value of `key` unless absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "a boolean", other)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(key, format!("`{key}` is not a usable number"))),
            Some(other) => Err(wrong_type(key, "a number", other)),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                ApiError::invalid(
                    key,
                    format!("`{key}` must be a non-negative integer, not {n}"),
                )
            }),
            Some(other) => Err(wrong_type(key, "an integer", other)),
        }
    }

    /// The model, which every request must name.
    fn model(&self) -> Result<String, ApiError> {
        self.string("model")?.ok_or_else(|| {
            ApiError::invalid("model", "`model` is required (GET /v1/models lists it)")
        })
    }

    /// Refuses `key` unless it is absent or has a value that asks for nothing (`ok`).
    fn refuse_unless(
        &self,
        key: &str,
        ok: impl Fn(&Value) -> bool,
        why: &str,
    ) -> Result<(), ApiError> {
        match self.get(key) {
            Some(v) if !ok(v) => Err(ApiError::invalid(
                key,
                format!("`{key}` is not supported by this server: {why}"),
            )),
            _ => Ok(()),
        }
    }

    /// The sampling fields both endpoints share; `max_tokens_keys` in order of precedence.
    fn sampling(&self, max_tokens_keys: &[&str]) -> Result<SamplingRequest, ApiError> {
        let mut max_tokens = None;
        for key in max_tokens_keys {
            if let Some(m) = self.integer(key)? {
                if m == 0 {
                    return Err(ApiError::invalid(
                        key,
                        format!("`{key}` must be at least 1"),
                    ));
                }
                max_tokens = Some(usize::try_from(m).unwrap_or(usize::MAX));
                break;
            }
        }
        let temperature = self.number("temperature")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be between 0 and 2, not {temperature}"),
            ));
        }
        let top_p = self.number("top_p")?.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&top_p) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be between 0 and 1, not {top_p}"),
            ));
        }
        let seed = match self.get("seed") {
            None => None,
            // OpenAI takes any 64-bit integer; a negative one is used by its bits.
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Some(u),
                (None, Some(i)) => Some(i as u64),
                _ => {
                    return Err(ApiError::invalid(
                        "seed",
                        format!("`seed` must be an integer, not {n}"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("seed", "an integer", other)),
        };
        let n = self.integer("n")?.unwrap_or(1);
        if n == 0 || n > MAX_CHOICES as u64 {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be between 1 and {MAX_CHOICES}, not {n}"),
            ));
        }
        let stop = match self.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong_type("stop", "a string or a list of strings", other)),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(wrong_type("stop", "a string or a list of strings", other)),
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "a stop sequence must not be empty",
            ));
        }
        let stream = self.bool("stream")?.unwrap_or(false);
        let include_usage = match self.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(wrong_type(
                        "stream_options.include_usage",
                        "a boolean",
                        other,
                    ))
                }
            },
            Some(other) => return Err(wrong_type("stream_options", "an object", other)),
        };
        for key in ["frequency_penalty", "presence_penalty"] {
            self.refuse_unless(
                key,
                |v| v.as_f64() == Some(0.0),
                "penalties are not implemented; leave it 0",
            )?;
        }
        self.refuse_unless("logit_bias", is_empty_container, "leave it empty")?;
        Ok(SamplingRequest {
            max_tokens: max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
            n: n as usize,
            stop,
            stream,
            include_usage,
        })
    }
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(key: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        key,
        format!("`{key}` must be {want}, not {}", type_name(got)),
    )
}

/// Parses and checks a chat completion request body.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let fields = Fields::of(body)?;
    let model = fields.model()?;
    let messages = match fields.get("messages") {
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must not be empty",
            ))
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(wrong_type("messages", "a list of messages", other)),
    };
    fields.refuse_unless(
        "logprobs",
        |v| v == &Value::Bool(false),
        "log-probabilities are not computed",
    )?;
    fields.refuse_unless(
        "top_logprobs",
        |v| v.as_u64() == Some(0),
        "log-probabilities are not computed",
    )?;
    for key in ["tools", "functions"] {
        fields.refuse_unless(key, is_empty_container, "tool calls are not implemented")?;
    }
    fields.refuse_unless(
        "response_format",
        |v| v.get("type").and_then(Value::as_str) == Some("text"),
        "only {\"type\": \"text\"} is produced",
    )?;
    let sampling = fields.sampling(&["max_completion_tokens", "max_tokens"])?;
    Ok(ChatRequest {
        model,
        messages,
        sampling,
    })
}

/// One chat message: `role` and `content` (a string, or a list of text parts).
fn parse_message(i: usize, value: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(m) = value else {
        return Err(wrong_type(
            &param,
            "an object with `role` and `content`",
            value,
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.as_str(),
        Some(other) => return Err(wrong_type(&format!("{param}.role"), "a string", other)),
        None => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("`{param}.role` is required"),
            ))
        }
    };
    let role = match role {
        "system" | "user" | "assistant" => role,
        "developer" => "system",
        other => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!(
                    "role `{other}` is not supported; use system, developer, user or assistant"
                ),
            ))
        }
    };
    let content_param = format!("{param}.content");
    let content = match m.get("content") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                &content_param,
                format!("`{content_param}` is required"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let part_param = format!("{content_param}[{j}]");
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::invalid(
                            &part_param,
                            format!("content parts of type `{other}` are not supported; only text"),
                        ))
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &part_param,
                            "a content part must be {\"type\": \"text\", \"text\": \"...\"}",
                        ))
                    }
                }
            }
            text
        }
        Some(other) => {
            return Err(wrong_type(
                &content_param,
                "a string or a list of text parts",
                other,
            ))
        }
    };
    Ok(Message {
        role: role.to_string(),
        content,
    })
}

/// Parses and checks a (legacy) completion request body.
pub fn parse_completion_request(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let fields = Fields::of(body)?;
    let model = fields.model()?;
    let prompts = match fields.get("prompt") {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must not be an empty list",
            ))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![Prompt::Tokens(token_ids("prompt", items)?)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(ids) => Ok(Prompt::Tokens(token_ids(&format!("prompt[{i}]"), ids)?)),
                other => Err(wrong_type(
                    &format!("prompt[{i}]"),
                    "a string or a list of token ids",
                    other,
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(wrong_type(
                "prompt",
                "a string, a list of strings or a list of token ids",
                other,
            ))
        }
    };
    let echo = fields.bool("echo")?.unwrap_or(false);
    fields.refuse_unless(
        "logprobs",
        |v| v.as_u64() == Some(0),
        "log-probabilities are not computed",
    )?;
    fields.refuse_unless("best_of", |v| v.as_u64() == Some(1), "leave it 1 (use `n`)")?;
    fields.refuse_unless(
        "suffix",
        |v| v.as_str() == Some(""),
        "insertion is not implemented",
    )?;
    let sampling = fields.sampling(&["max_tokens"])?;
    if prompts.len() * sampling.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts times n = {} asks for more than {MAX_CHOICES} completions",
                prompts.len(),
                sampling.n
            ),
        ));
    }
    Ok(CompletionRequest {
        model,
        prompts,
        echo,
        sampling,
    })
}

fn token_ids(param: &str, items: &[Value]) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid(param, format!("`{param}` has no tokens")));
    }
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        param,
                        format!("`{param}` holds {v}, which is not a token id"),
                    )
                })
        })
        .collect()
}

/// Why a choice ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop sequence or the end-of-sequence token.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens of the prompts (each prompt once, whatever `n`).
    pub prompt_tokens: usize,
    /// Tokens generated over every choice (end-of-sequence tokens not counted).
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage of `prompt` prompt tokens and `completion` generated ones.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// An assistant message of a chat choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Its index.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// Always null (log-probabilities are not computed).
    pub logprobs: Option<()>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// A `chat.completion` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The choices, by index.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// One choice of a text completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextChoice {
    /// Its index (`prompt * n + sample`).
    pub index: usize,
    /// The generated text (after the prompt, when echoed).
    pub text: String,
    /// Always null (log-probabilities are not computed).
    pub logprobs: Option<()>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// A `text_completion` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextCompletion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The choices, by index.
    pub choices: Vec<TextChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// What a streamed chat chunk's choice adds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChatDelta {
    /// `assistant` on a choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a `chat.completion.chunk`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChunkChoice {
    /// Its index.
    pub index: usize,
    /// What it adds.
    pub delta: ChatDelta,
    /// Always null.
    pub logprobs: Option<()>,
    /// Set on its last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// A `chat.completion.chunk` object (one Server-Sent Event).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChunk {
    /// The completion's id, the same in every chunk.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model that answers.
    pub model: String,
    /// The choices this chunk adds to (none on the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Token counts, on the last chunk when `stream_options.include_usage` asked for them
    /// (then null on every other chunk, as OpenAI sends it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// A streamed `text_completion` chunk: its choices carry new text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextChunk {
    /// The completion's id, the same in every chunk.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model that answers.
    pub model: String,
    /// The choices this chunk adds to (none on the usage chunk).
    pub choices: Vec<TextChunkChoice>,
    /// As [`ChatChunk::usage`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice of a streamed text completion chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextChunkChoice {
    /// Its index.
    pub index: usize,
    /// New text.
    pub text: String,
    /// Always null.
    pub logprobs: Option<()>,
    /// Set on its last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// The `GET /v1/models` list: the one served model.
pub fn model_list(id: &str, created: u64) -> Value {
    serde_json::json!({
        "object": "list",
        "data": [model_object(id, created)],
    })
}

/// The model object of `GET /v1/models/{id}`.
pub fn model_object(id: &str, created: u64) -> Value {
    serde_json::json!({
        "id": id,
        "object": "model",
        "created": created,
        "owned_by": "pipeline",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        parse_chat_request(body.as_bytes())
    }

    fn completion(body: &str) -> Result<CompletionRequest, ApiError> {
        parse_completion_request(body.as_bytes())
    }

    fn param_of(e: ApiError) -> (u16, Option<String>) {
        (e.status, e.param)
    }

    #[test]
    fn a_minimal_chat_request_takes_openais_defaults() {
        let r = chat(r#"{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}"#).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.messages, vec![Message::user("Hi")]);
        assert_eq!(
            r.sampling,
            SamplingRequest {
                max_tokens: DEFAULT_MAX_TOKENS,
                temperature: 1.0,
                top_p: 1.0,
                seed: None,
                n: 1,
                stop: vec![],
                stream: false,
                include_usage: false,
            }
        );
        assert!(!r.sampling.is_greedy());
    }

    #[test]
    fn chat_fields_are_read_with_their_precedence_and_forms() {
        let r = chat(
            r#"{"model": "m", "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "content": "Hi"}],
               "max_tokens": 9, "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5,
               "seed": -1, "n": 2, "stop": "\n", "stream": true,
               "stream_options": {"include_usage": true}, "user": "ignored",
               "logprobs": false, "frequency_penalty": 0, "tools": []}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages[0].content, "Be brief.");
        let s = r.sampling;
        assert_eq!(
            s.max_tokens, 5,
            "max_completion_tokens wins over max_tokens"
        );
        assert!(s.is_greedy());
        assert_eq!(s.top_p, 0.5);
        assert_eq!(s.seed, Some(u64::MAX));
        assert_eq!(s.n, 2);
        assert_eq!(s.stop, vec!["\n".to_string()]);
        assert!(s.stream && s.include_usage);
    }

    #[test]
    fn bad_chat_requests_are_400s_naming_the_parameter() {
        let cases = [
            ("[1, 2]", None),
            ("{not json", None),
            (
                r#"{"messages": [{"role": "user", "content": "x"}]}"#,
                Some("model"),
            ),
            (r#"{"model": 3, "messages": []}"#, Some("model")),
            (r#"{"model": "m"}"#, Some("messages")),
            (r#"{"model": "m", "messages": []}"#, Some("messages")),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                Some("messages[0].content[0]"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1}"#,
                Some("temperature"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
                Some("temperature"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}"#,
                Some("top_p"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}"#,
                Some("n"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 1000}"#,
                Some("n"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}"#,
                Some("stop"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 3}"#,
                Some("stop"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#,
                Some("stream"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true}"#,
                Some("logprobs"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}"#,
                Some("presence_penalty"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#,
                Some("tools"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}"#,
                Some("response_format"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": "s"}"#,
                Some("seed"),
            ),
        ];
        for (body, param) in cases {
            let err = chat(body).expect_err(body);
            assert_eq!(
                param_of(err.clone()),
                (400, param.map(String::from)),
                "{body}: {err}"
            );
            let json = err.body();
            assert_eq!(json["error"]["type"], "invalid_request_error", "{body}");
            assert!(json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn completion_prompts_come_as_text_lists_or_token_ids() {
        let r =
            completion(r#"{"model": "m", "prompt": "def f():", "max_tokens": 3, "echo": true}"#)
                .unwrap();
        assert_eq!(r.prompts, vec![Prompt::Text("def f():".into())]);
        assert!(r.echo);
        assert_eq!(r.sampling.max_tokens, 3);
        let r = completion(r#"{"model": "m", "prompt": ["a", "b"], "n": 2}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
        let r = completion(r#"{"model": "m", "prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Tokens(vec![1, 2, 3])]);
        let r = completion(r#"{"model": "m", "prompt": [[1], "x"]}"#).unwrap();
        assert_eq!(
            r.prompts,
            vec![Prompt::Tokens(vec![1]), Prompt::Text("x".into())]
        );
        // The chat-only key is not read here.
        let r = completion(r#"{"model": "m", "prompt": "x", "max_completion_tokens": 3}"#).unwrap();
        assert_eq!(r.sampling.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn bad_completion_requests_are_400s_naming_the_parameter() {
        let cases = [
            (r#"{"model": "m"}"#, "prompt"),
            (r#"{"model": "m", "prompt": []}"#, "prompt"),
            (r#"{"model": "m", "prompt": 5}"#, "prompt"),
            (r#"{"model": "m", "prompt": [-1]}"#, "prompt"),
            (r#"{"model": "m", "prompt": ["a", {}]}"#, "prompt[1]"),
            (r#"{"model": "m", "prompt": ["a", []]}"#, "prompt[1]"),
            (
                r#"{"model": "m", "prompt": "x", "logprobs": 2}"#,
                "logprobs",
            ),
            (r#"{"model": "m", "prompt": "x", "best_of": 3}"#, "best_of"),
            (
                r#"{"model": "m", "prompt": "x", "suffix": "end"}"#,
                "suffix",
            ),
            (
                r#"{"model": "m", "prompt": ["a", "b", "c"], "n": 100}"#,
                "n",
            ),
        ];
        for (body, param) in cases {
            let err = completion(body).expect_err(body);
            assert_eq!(param_of(err), (400, Some(param.to_string())), "{body}");
        }
    }

    #[test]
    fn errors_have_openais_shape_and_status() {
        let e = ApiError::unknown_model("gpt-4", "train");
        assert_eq!(e.status, 404);
        assert_eq!(e.body()["error"]["code"], "model_not_found");
        assert_eq!(e.body()["error"]["param"], "model");
        assert!(e.message.contains("train"));
        let e = ApiError::bad_request("nope");
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"message": "nope", "type": "invalid_request_error", "param": null, "code": null}})
        );
        assert_eq!(
            ApiError::wrong_method("GET", "/v1/completions", "POST").status,
            405
        );
        assert_eq!(ApiError::unknown_route("GET", "/x").status, 404);
    }

    #[test]
    fn responses_serialise_as_openai_writes_them() {
        let chunk = ChatChunk {
            id: "chatcmpl-1".into(),
            object: "chat.completion.chunk",
            created: 7,
            model: "m".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&chunk).unwrap(),
            serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
        );
        let usage_chunk = ChatChunk {
            choices: vec![],
            usage: Some(Some(Usage::new(3, 4))),
            ..chunk
        };
        assert_eq!(
            serde_json::to_value(&usage_chunk).unwrap()["usage"],
            serde_json::json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );
        assert_eq!(
            serde_json::to_value(FinishReason::Length).unwrap(),
            "length"
        );
        assert_eq!(model_list("train", 1)["data"][0]["id"], "train");
    }
}
