//! `pipeline serve M STAGE`: an OpenAI-compatible HTTP server over a cached `model`,
//! `quantize` or `lora-train` stage (a trained adapter served over its base model), answered
//! by our own generation loop, so that a result can be tried by hand or by any OpenAI client.
//!
//! * [`api`]: requests parsed and checked (errors name the parameter), responses, chunks and
//!   errors in OpenAI's shapes.
//! * [`model`]: [`ServedModel`], loaded once; [`ServedModel::chat`] and
//!   [`ServedModel::complete`] answer a request, [`ServedModel::chat_stream`] and
//!   [`ServedModel::complete_stream`] stream it. Another command that wants to put requests to
//!   a stage's model uses these, with [`load_stage`].
//! * [`stream`]: what part of a growing text is safe to stream (stop sequences, incomplete
//!   UTF-8), and Server-Sent Events framing.
//! * [`http`]: routes and responses over `tiny_http`.
//!
//! The engine hands the command the cached stage ([`pipeline_engine::CachedStage`]); this
//! module knows which artifacts make a servable model.

pub mod api;
pub mod http;
pub mod model;
pub mod stream;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{CommandFactory, Parser, ValueEnum};
use miette::{miette, IntoDiagnostic};
use pipeline_engine::{CachedStage, Stage, StageCommand};
use pipeline_models::device::DeviceChoice;
use pipeline_models::train::ComputeDtype;

pub use model::{ServeModelError, ServedModel};

use crate::artifacts::{AdapterArtifact, ModelArtifact};
use crate::kinds::lora_train::LoraTrainKind;
use crate::kinds::model::ModelKind;
use crate::kinds::quantize::QuantizeKind;

const SERVE_ABOUT: &str =
    "Serve a cached model, quantize or lora-train stage over an OpenAI-compatible HTTP API";

/// The kinds whose stages can be served.
pub const SERVABLE_KINDS: &[&str] = &[ModelKind::KIND, QuantizeKind::KIND, LoraTrainKind::KIND];

/// `pipeline serve M STAGE`: the [`StageCommand`] registered in [`crate::registry`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ServeCommand;

/// The options of `pipeline serve M STAGE` (after the stage).
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(bin_name = "pipeline serve MANIFEST STAGE", about = SERVE_ABOUT)]
pub struct ServeOptions {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the line printed on start says which).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Where the model computes.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// The dtype the model computes in.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Most choices of one request (`n` times its prompts) decoded together.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The host.
    Cpu,
    /// The first CUDA GPU (a build with the `cuda` feature).
    Cuda,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// Full precision.
    F32,
    /// bfloat16.
    Bf16,
    /// Half precision.
    F16,
}

impl DeviceArg {
    /// As the models crate names it.
    pub fn choice(self) -> DeviceChoice {
        match self {
            Self::Cpu => DeviceChoice::Cpu,
            Self::Cuda => DeviceChoice::Cuda,
        }
    }
}

impl DtypeArg {
    /// As the models crate names it.
    pub fn compute(self) -> ComputeDtype {
        match self {
            Self::F32 => ComputeDtype::F32,
            Self::Bf16 => ComputeDtype::Bf16,
            Self::F16 => ComputeDtype::F16,
        }
    }
}

/// The model a cached stage serves: `(model directory, adapter directory)`. A `model` or
/// `quantize` stage serves its model output; a `lora-train` stage its adapter output over the
/// model it was trained on (its `model` input).
pub fn servable_dirs(stage: &CachedStage) -> miette::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(model) = stage.output_of_type(ModelArtifact::TYPE) {
        return Ok((model.path.clone(), None));
    }
    if let Some(adapter) = stage.output_of_type(AdapterArtifact::TYPE) {
        let base = stage.input("model")?;
        return Ok((base.to_path_buf(), Some(adapter.path.clone())));
    }
    Err(miette!(
        help = format!("serve a stage of kind {}", SERVABLE_KINDS.join(", ")),
        "stage `{}` (kind `{}`) has no model or adapter output to serve",
        stage.name,
        stage.kind
    ))
}

/// Loads the model a cached stage serves ([`servable_dirs`]) under the stage's name, with
/// `options`' device, dtype and batch size.
pub fn load_stage(stage: &CachedStage, options: &ServeOptions) -> miette::Result<ServedModel> {
    let (model_dir, adapter_dir) = servable_dirs(stage)?;
    let device = options.device.choice().open()?;
    ServedModel::load(
        &stage.name,
        &model_dir,
        adapter_dir.as_deref(),
        &device,
        options.dtype.compute().dtype(),
        usize::from(options.batch_size),
    )
}

/// The base URL clients use for a server listening on `addr`.
pub fn base_url(addr: &std::net::SocketAddr) -> String {
    format!("http://{addr}/v1")
}

/// Serves `stage` with `options` until the process is stopped: loads the model, listens,
/// prints `serving STAGE at http://HOST:PORT/v1` on stdout (one line, once ready), and answers.
pub fn serve(stage: &CachedStage, options: &ServeOptions) -> miette::Result<()> {
    eprintln!("loading `{}`...", stage.name);
    let model = load_stage(stage, options)?;
    let server = tiny_http::Server::http((options.host.as_str(), options.port)).map_err(|e| {
        miette!(
            help = "choose another --port (0 picks a free one) or --host",
            "cannot listen on {}:{}: {e}",
            options.host,
            options.port
        )
    })?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| miette!("the server is not listening on an IP address"))?;
    let url = base_url(&addr);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "serving {} at {url}", stage.name).into_diagnostic()?;
    stdout.flush().into_diagnostic()?;
    drop(stdout);
    if !model.has_chat_template() {
        eprintln!("note: the model has no chat template; only /v1/completions answers");
    }
    eprintln!(
        "try: curl {url}/chat/completions -H 'Content-Type: application/json' \
         -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        stage.name
    );
    http::serve_forever(server, Arc::new(model))
        .map_err(|e| miette!("the server stopped listening: {e}"))
}

impl StageCommand for ServeCommand {
    fn name(&self) -> &'static str {
        "serve"
    }

    fn about(&self) -> &'static str {
        SERVE_ABOUT
    }

    fn kinds(&self) -> &'static [&'static str] {
        SERVABLE_KINDS
    }

    fn options_help(&self) -> String {
        ServeOptions::command()
            .disable_help_flag(true)
            .help_template("{options}")
            .render_long_help()
            .to_string()
    }

    fn run(&self, stage: &CachedStage, args: Vec<OsString>) -> miette::Result<u8> {
        let argv = std::iter::once(OsString::from("pipeline serve")).chain(args);
        match ServeOptions::try_parse_from(argv) {
            Ok(options) => serve(stage, &options).map(|()| 0),
            // Help goes to stdout with exit code 0, usage errors to stderr with 2, as clap does.
            Err(e) => {
                e.print().into_diagnostic()?;
                Ok(u8::try_from(e.exit_code()).unwrap_or(2))
            }
        }
    }
}
