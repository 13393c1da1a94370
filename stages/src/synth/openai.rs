//! The `openai` generator: any OpenAI-compatible chat-completions server (vLLM, llama.cpp's
//! server, TGI, `pipeline serve`, a hosted API).
//!
//! Requests go out `concurrency` at a time. A 429, a 5xx or a transport failure (refused,
//! reset, timed out) is retried up to `retries` times with exponential backoff (1 s doubling
//! up to 60 s, or what the server's `Retry-After` asks); any other 4xx stops the stage at once
//! with the server's message, since asking again would get the same answer. The API key is read
//! from the environment variable the manifest names, at run time: it is never part of a
//! parameter, a cache key or an artifact.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ChatRequest, ChatResponse, Generator, OnResponse, Sampling};

/// Where and how to reach the server (the `openai` table of a `synthesize` stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAiParams {
    /// The API's base URL, up to and including the version (`http://127.0.0.1:8000/v1`,
    /// `https://api.example.com/v1`); `/chat/completions` is appended.
    pub base_url: String,
    /// The model name the server knows (part of the cache key, as the prompts are).
    pub model: String,
    /// The environment variable holding the API key, sent as a bearer token (None: no key).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Retries of a request after a 429, a 5xx or a transport failure.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Seconds to wait for one response.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
}

fn default_concurrency() -> usize {
    4
}
fn default_retries() -> u32 {
    5
}
fn default_timeout() -> f64 {
    300.0
}

impl OpenAiParams {
    /// Checks the values that can be checked before the run.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(format!(
                "openai.base_url `{}` must start with http:// or https://",
                self.base_url
            ));
        }
        if self.model.trim().is_empty() {
            return Err("openai.model must name the server's model".into());
        }
        if self.concurrency == 0 {
            return Err("openai.concurrency must be at least 1".into());
        }
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return Err("openai.timeout_s must be positive".into());
        }
        Ok(())
    }
}

/// Why a request failed for good.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum OpenAiError {
    /// The key's environment variable is not set.
    #[error("the API key variable `{0}` is not set (openai.api_key_env)")]
    #[diagnostic(help("export {0}=<your key> before `pipeline run`, or remove api_key_env for a server that needs no key"))]
    MissingKey(String),
    /// The server refused the request (a 4xx other than 429).
    #[error("{url} answered {status} to request {id}: {message}")]
    #[diagnostic(help("{hint}"))]
    Refused {
        /// The endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// The request's id.
        id: String,
        /// The server's message.
        message: String,
        /// What to check.
        hint: &'static str,
    },
    /// Retries ran out.
    #[error("{url}: request {id} failed {attempts} times; last: {last}")]
    #[diagnostic(help(
        "is the server up and reachable? Answers received so far are saved; `pipeline run` again resumes"
    ))]
    GaveUp {
        /// The endpoint.
        url: String,
        /// The request's id.
        id: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The server's answer is not a chat completion.
    #[error("{url} sent an answer to request {id} that is not a chat completion: {detail}")]
    #[diagnostic(help("is base_url an OpenAI-compatible API (ending in /v1)?"))]
    BadAnswer {
        /// The endpoint.
        url: String,
        /// The request's id.
        id: String,
        /// What is wrong.
        detail: String,
    },
}

/// An OpenAI-compatible server as a [`Generator`].
pub struct OpenAiGenerator {
    params: OpenAiParams,
    sampling: Sampling,
    key: Option<String>,
    agent: ureq::Agent,
    /// Base delay of the backoff (1 s; tests shorten it).
    backoff: Duration,
}

impl OpenAiGenerator {
    /// A client for `params`, reading the API key from its environment variable now.
    pub fn new(params: OpenAiParams, sampling: Sampling) -> Result<Self, OpenAiError> {
        let key = match &params.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                _ => return Err(OpenAiError::MissingKey(var.clone())),
            },
        };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs_f64(params.timeout_s))
            .build();
        Ok(Self {
            params,
            sampling,
            key,
            agent,
            backoff: Duration::from_secs(1),
        })
    }

    /// The same client with another base backoff delay (for tests).
    pub fn with_backoff(mut self, base: Duration) -> Self {
        self.backoff = base;
        self
    }

    fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.params.base_url.trim_end_matches('/')
        )
    }

    fn body(&self, request: &ChatRequest) -> String {
        let mut body = serde_json::json!({
            "model": self.params.model,
            "messages": request.messages,
            "max_tokens": self.sampling.max_new_tokens,
            "temperature": self.sampling.temperature,
            // Servers that honour it make answers reproducible; others ignore it.
            "seed": request.seed % (1 << 53),
            "n": 1,
        });
        if let (Some(top_p), Some(fields)) = (self.sampling.top_p, body.as_object_mut()) {
            fields.insert("top_p".into(), top_p.into());
        }
        body.to_string()
    }

    /// Asks for one answer, retrying what can be retried.
    pub fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, OpenAiError> {
        let url = self.url();
        let body = self.body(request);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut call = self
                .agent
                .post(&url)
                .set("Content-Type", "application/json");
            if let Some(key) = &self.key {
                call = call.set("Authorization", &format!("Bearer {key}"));
            }
            let (failure, retry_after) = match call.send_string(&body) {
                Ok(response) => {
                    let text = response.into_string().map_err(|e| OpenAiError::BadAnswer {
                        url: url.clone(),
                        id: request.id.clone(),
                        detail: e.to_string(),
                    })?;
                    return parse_completion(&text).map_err(|detail| OpenAiError::BadAnswer {
                        url: url.clone(),
                        id: request.id.clone(),
                        detail,
                    });
                }
                Err(ureq::Error::Status(status, response)) => {
                    let retry_after = response
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0);
                    let message = server_message(response.into_string().unwrap_or_default());
                    if status != 429 && status < 500 {
                        return Err(OpenAiError::Refused {
                            url,
                            status,
                            id: request.id.clone(),
                            message,
                            hint: hint_for(status),
                        });
                    }
                    (format!("HTTP {status}: {message}"), retry_after)
                }
                Err(ureq::Error::Transport(t)) => (t.to_string(), None),
            };
            if attempt > self.params.retries {
                return Err(OpenAiError::GaveUp {
                    url,
                    id: request.id.clone(),
                    attempts: attempt,
                    last: failure,
                });
            }
            let exponential = self.backoff * 2u32.saturating_pow(attempt - 1);
            let wait = retry_after
                .map(Duration::from_secs_f64)
                .unwrap_or(exponential)
                .min(Duration::from_secs(60));
            tracing::warn!(id = %request.id, attempt, wait_s = wait.as_secs_f64(), %failure, "retrying");
            std::thread::sleep(wait);
        }
    }
}

fn hint_for(status: u16) -> &'static str {
    match status {
        401 | 403 => "check the API key (openai.api_key_env names the variable that holds it)",
        404 => "check openai.base_url (it ends in /v1) and openai.model (the server's /v1/models lists them)",
        400 | 422 => "the server rejected the request's parameters: check max_new_tokens, temperature and top_p against what it allows",
        _ => "the server refused the request; its message says why",
    }
}

/// The `error.message` of an OpenAI-style error body, else the body itself (shortened).
fn server_message(body: String) -> String {
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.get("message").or(Some(e)))
                .and_then(|m| m.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| body.chars().take(300).collect())
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: AnswerMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct AnswerMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

fn parse_completion(text: &str) -> Result<ChatResponse, String> {
    let completion: Completion = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let choice = completion
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| "no choices".to_string())?;
    Ok(ChatResponse {
        text: choice.message.content.unwrap_or_default(),
        finish_reason: choice.finish_reason.unwrap_or_else(|| "unknown".into()),
        completion_tokens: completion.usage.and_then(|u| u.completion_tokens),
    })
}

impl Generator for OpenAiGenerator {
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "generator": "openai",
            "base_url": self.params.base_url,
            "model": self.params.model,
            "concurrency": self.params.concurrency,
        })
    }

    fn generate(
        &self,
        requests: &[ChatRequest],
        on_response: &OnResponse<'_>,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> miette::Result<()> {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let first_error: Mutex<Option<miette::Report>> = Mutex::new(None);
        let fail = |e: miette::Report| {
            stop.store(true, Ordering::SeqCst);
            if let Ok(mut slot) = first_error.lock() {
                slot.get_or_insert(e);
            }
        };
        std::thread::scope(|scope| {
            for _ in 0..self.params.concurrency.min(requests.len().max(1)) {
                scope.spawn(|| loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if cancelled() {
                        fail(miette::miette!("cancelled"));
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(request) = requests.get(i) else {
                        return;
                    };
                    match self.complete(request) {
                        Ok(response) => {
                            if let Err(e) = on_response(i, response) {
                                fail(e);
                                return;
                            }
                        }
                        Err(e) => {
                            fail(e.into());
                            return;
                        }
                    }
                });
            }
        });
        match first_error.into_inner() {
            Ok(Some(e)) => Err(e),
            Ok(None) => Ok(()),
            Err(_) => Err(miette::miette!("a request worker panicked")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_chat_completion_and_an_error_message() {
        let ok = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}"#;
        let r = parse_completion(ok).unwrap();
        assert_eq!(
            (r.text.as_str(), r.finish_reason.as_str()),
            ("hi", "length")
        );
        assert_eq!(r.completion_tokens, Some(7));
        assert!(parse_completion(r#"{"choices":[]}"#).is_err());
        assert_eq!(
            server_message(r#"{"error":{"message":"bad model","type":"x"}}"#.into()),
            "bad model"
        );
        assert_eq!(server_message("plain".into()), "plain");
    }

    #[test]
    fn parameters_are_checked_and_a_missing_key_is_named() {
        let mut p = OpenAiParams {
            base_url: "localhost:8000".into(),
            model: "m".into(),
            api_key_env: None,
            concurrency: 1,
            retries: 0,
            timeout_s: 1.0,
        };
        assert!(p.validate().unwrap_err().contains("http://"));
        p.base_url = "http://localhost:8000/v1".into();
        assert!(p.validate().is_ok());
        p.api_key_env = Some("PIPELINE_TEST_SURELY_UNSET_KEY".into());
        let sampling = Sampling {
            max_new_tokens: 8,
            temperature: 0.0,
            top_p: None,
        };
        let err = OpenAiGenerator::new(p, sampling).err().unwrap();
        assert!(err.to_string().contains("PIPELINE_TEST_SURELY_UNSET_KEY"));
    }
}
