//! The HTTP side: routes, bodies, JSON and event-stream responses, over `tiny_http`.
//!
//! Each request is handled on its own thread; generation itself is serialised by the model's
//! lock ([`ServedModel`]). A request never takes the server down: bad input is a 4xx in
//! OpenAI's error shape, and a failure (even a panic) while answering is a 500 (or an error
//! event, once a stream has begun).

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use serde::Serialize;
use tiny_http::{Header, Method, Request, Response};

use super::api::{self, ApiError};
use super::model::ServedModel;
use super::stream::{sse_event, SseWriter};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Answers requests on `server` with `model` until the listener fails.
pub fn serve_forever(server: tiny_http::Server, model: Arc<ServedModel>) -> std::io::Result<()> {
    loop {
        let request = server.recv()?;
        let model = Arc::clone(&model);
        let spawned = std::thread::Builder::new()
            .name("serve-request".into())
            .spawn(move || handle(&model, request));
        if let Err(e) = spawned {
            tracing::error!("cannot start a thread for a request: {e}");
        }
    }
}

/// The endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Models,
    Model(String),
    ChatCompletions,
    Completions,
    Health,
}

/// The route of `path` (query string ignored, a trailing slash too), and the method it takes.
fn route(path: &str) -> Option<(Route, Method)> {
    let path = path.split('?').next().unwrap_or("");
    let path = path.strip_suffix('/').unwrap_or(path);
    Some(match path {
        "/v1/models" => (Route::Models, Method::Get),
        "/v1/chat/completions" => (Route::ChatCompletions, Method::Post),
        "/v1/completions" => (Route::Completions, Method::Post),
        "/health" => (Route::Health, Method::Get),
        other => {
            let id = other.strip_prefix("/v1/models/")?;
            (Route::Model(percent_decode(id)), Method::Get)
        }
    })
}

/// `%XX` escapes of a path segment decoded (model ids such as `train@a,b` arrive escaped).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(model: &ServedModel, mut request: Request) {
    let method = request.method().clone();
    let url = request.url().to_string();
    tracing::info!("{method} {url}");
    let Some((route, allowed)) = route(&url) else {
        respond_error(request, &ApiError::unknown_route(method.as_str(), &url));
        return;
    };
    if method != allowed {
        let error = ApiError::wrong_method(method.as_str(), &url, allowed.as_str());
        let allow = header("Allow", allowed.as_str());
        respond(request, error.status, &error.body(), allow);
        return;
    }
    match route {
        Route::Models => {
            let list = api::model_list(model.id(), model.created());
            respond(request, 200, &list, None);
        }
        Route::Model(id) if id == model.id() => {
            let object = api::model_object(model.id(), model.created());
            respond(request, 200, &object, None);
        }
        Route::Model(id) => respond_error(request, &ApiError::unknown_model(&id, model.id())),
        Route::Health => respond(request, 200, &serde_json::json!({"status": "ok"}), None),
        Route::ChatCompletions | Route::Completions => {
            let body = match read_body(&mut request) {
                Ok(body) => body,
                Err(e) => return respond_error(request, &e),
            };
            if route == Route::ChatCompletions {
                chat(model, request, &body);
            } else {
                complete(model, request, &body);
            }
        }
    }
}

fn chat(model: &ServedModel, request: Request, body: &[u8]) {
    let parsed = match api::parse_chat_request(body) {
        Ok(parsed) => parsed,
        Err(e) => return respond_error(request, &e),
    };
    if parsed.sampling.stream {
        let mut sink = EventSink::Pending(Some(request));
        let result = guarded(|| model.chat_stream(&parsed, &mut |chunk| sink.send(chunk)));
        sink.end(result);
    } else {
        match guarded(|| model.chat(&parsed)) {
            Ok(done) => respond(request, 200, &done, None),
            Err(e) => respond_error(request, &e),
        }
    }
}

fn complete(model: &ServedModel, request: Request, body: &[u8]) {
    let parsed = match api::parse_completion_request(body) {
        Ok(parsed) => parsed,
        Err(e) => return respond_error(request, &e),
    };
    if parsed.sampling.stream {
        let mut sink = EventSink::Pending(Some(request));
        let result = guarded(|| model.complete_stream(&parsed, &mut |chunk| sink.send(chunk)));
        sink.end(result);
    } else {
        match guarded(|| model.complete(&parsed)) {
            Ok(done) => respond(request, 200, &done, None),
            Err(e) => respond_error(request, &e),
        }
    }
}

/// Runs `answer`, turning a panic into a 500.
fn guarded<T>(answer: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    std::panic::catch_unwind(AssertUnwindSafe(answer)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Err(ApiError::internal(format!(
            "the server failed while answering: {what}"
        )))
    })
}

/// Where a streamed answer goes: the request until the first event (so that an error before
/// it is an ordinary JSON error response), then the event stream.
enum EventSink {
    Pending(Option<Request>),
    Streaming(SseWriter<Box<dyn Write + Send>>),
    /// The client went away (or the stream could not start).
    Gone,
}

impl EventSink {
    fn send(&mut self, chunk: &impl Serialize) -> ControlFlow<()> {
        if let Self::Pending(request) = self {
            let Some(request) = request.take() else {
                *self = Self::Gone;
                return ControlFlow::Break(());
            };
            *self = match SseWriter::start(request.into_writer()) {
                Ok(writer) => Self::Streaming(writer),
                Err(_) => Self::Gone,
            };
        }
        let Self::Streaming(writer) = self else {
            return ControlFlow::Break(());
        };
        match writer.event(&sse_event(chunk)) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => {
                *self = Self::Gone;
                ControlFlow::Break(())
            }
        }
    }

    /// Ends the answer: `[DONE]` after the events (an error event first if it failed midway),
    /// or a plain error response if nothing was sent yet.
    fn end(self, result: Result<(), ApiError>) {
        match (self, result) {
            (Self::Pending(Some(request)), Err(e)) => respond_error(request, &e),
            (Self::Pending(Some(request)), Ok(())) => {
                // Nothing to stream (the client left before the first event was due).
                if let Ok(writer) = SseWriter::start(request.into_writer()) {
                    let _ = writer.finish();
                }
            }
            (Self::Streaming(mut writer), result) => {
                if let Err(e) = result {
                    let _ = writer.event(&sse_event(&e.body()));
                }
                let _ = writer.finish();
            }
            (Self::Pending(None) | Self::Gone, _) => {}
        }
    }
}

/// The body of `request`, at most [`MAX_BODY_BYTES`].
fn read_body(request: &mut Request) -> Result<Vec<u8>, ApiError> {
    if request.body_length().is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    Ok(body)
}

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn respond(request: Request, status: u16, body: &impl Serialize, extra: Option<Header>) {
    let text = serde_json::to_string(body).unwrap_or_else(|e| {
        ApiError::internal(format!("cannot serialise the response: {e}"))
            .body()
            .to_string()
    });
    let mut response = Response::from_string(text).with_status_code(status);
    for h in [header("Content-Type", "application/json"), extra]
        .into_iter()
        .flatten()
    {
        response.add_header(h);
    }
    if let Err(e) = request.respond(response) {
        tracing::debug!("cannot send a response: {e}");
    }
}

fn respond_error(request: Request, error: &ApiError) {
    if error.status >= 500 {
        tracing::error!("{error}");
    }
    respond(request, error.status, &error.body(), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_ignore_query_strings_and_trailing_slashes() {
        assert_eq!(route("/v1/models"), Some((Route::Models, Method::Get)));
        assert_eq!(route("/v1/models/?x=1"), Some((Route::Models, Method::Get)));
        assert_eq!(
            route("/v1/chat/completions"),
            Some((Route::ChatCompletions, Method::Post))
        );
        assert_eq!(
            route("/v1/completions/"),
            Some((Route::Completions, Method::Post))
        );
        assert_eq!(
            route("/v1/models/train%40a%2Cb"),
            Some((Route::Model("train@a,b".into()), Method::Get))
        );
        assert_eq!(route("/v1/embeddings"), None);
        assert_eq!(route("/"), None);
    }

    #[test]
    fn percent_decoding_leaves_broken_escapes_alone() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
