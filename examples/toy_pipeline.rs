//! The `pipeline` CLI over small, ML-free stage kinds.
//!
//! The engine's integration tests drive this binary: it exercises caching, resumption, crash
//! safety and the CLI without any model code. Try it:
//!
//! ```text
//! cargo run --example toy_pipeline -- run examples/toy.toml --cache /tmp/toy-cache
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use miette::{miette, IntoDiagnostic};
use pipeline_engine::{InputSlot, OutputSlot, Registry, Stage, StageContext};
use serde::{Deserialize, Serialize};

const TEXT_OUT: &[OutputSlot] = &[OutputSlot {
    name: "out",
    artifact: "text",
    doc: "a text file `data`",
}];
const NUMBER_OUT: &[OutputSlot] = &[OutputSlot {
    name: "out",
    artifact: "number",
    doc: "a number in file `data`",
}];

/// Writes `text` repeated, in chunks, slowly enough to be interrupted mid-write.
struct Write_;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    text: String,
    #[serde(default = "one")]
    repeat: u64,
    #[serde(default)]
    delay_ms: u64,
    /// Pretend to need the GPU (such stages must never overlap).
    #[serde(default)]
    gpu: bool,
}

fn one() -> u64 {
    1
}

impl Stage for Write_ {
    type Params = WriteParams;
    const KIND: &'static str = "write";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "write `text` `repeat` times";
    fn inputs() -> &'static [InputSlot] {
        &[]
    }
    fn outputs() -> &'static [OutputSlot] {
        TEXT_OUT
    }
    fn validate(p: &WriteParams) -> Result<(), String> {
        if p.repeat == 0 {
            return Err("`repeat` must be at least 1".into());
        }
        Ok(())
    }
    fn needs_gpu(p: &WriteParams) -> bool {
        p.gpu
    }
    fn run(p: &WriteParams, ctx: &mut StageContext) -> miette::Result<()> {
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        };
        ctx.set_metadata("start", now());
        // Which (fake) GPU a Slurm job was given: the cluster tests check two never share one.
        // With device isolation every job sees its GPU as device 0; SLURM_JOB_GPUS is the
        // node's index.
        for (var, field) in [
            ("CUDA_VISIBLE_DEVICES", "cuda_visible_devices"),
            ("SLURM_JOB_GPUS", "slurm_job_gpus"),
        ] {
            if let Ok(value) = std::env::var(var) {
                ctx.set_metadata(field, value);
            }
        }
        let mut file =
            std::fs::File::create(ctx.output_dir("out")?.join("data")).into_diagnostic()?;
        for _ in 0..p.repeat {
            ctx.check_cancelled()?;
            file.write_all(p.text.as_bytes()).into_diagnostic()?;
            file.flush().into_diagnostic()?;
            std::thread::sleep(Duration::from_millis(p.delay_ms));
        }
        ctx.set_metadata("end", now());
        Ok(())
    }
}

/// Reads an external file (keyed by its content).
struct Source;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SourceParams {
    path: PathBuf,
}

impl Stage for Source {
    type Params = SourceParams;
    const KIND: &'static str = "source";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "copy an external file";
    fn inputs() -> &'static [InputSlot] {
        &[]
    }
    fn outputs() -> &'static [OutputSlot] {
        TEXT_OUT
    }
    fn fingerprint(
        p: &SourceParams,
        fp: &mut pipeline_engine::fingerprint::Fingerprint,
    ) -> miette::Result<()> {
        fp.file("path", &p.path)
    }
    fn run(p: &SourceParams, ctx: &mut StageContext) -> miette::Result<()> {
        std::fs::copy(ctx.resolve(&p.path), ctx.output_dir("out")?.join("data"))
            .into_diagnostic()?;
        Ok(())
    }
}

/// Concatenates its inputs, upper-cased if asked; can be told to fail. `pipeline run` points
/// to its output file (as it does to a report).
struct Concat;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConcatParams {
    #[serde(default)]
    upper: bool,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    delay_ms: u64,
}

impl Stage for Concat {
    type Params = ConcatParams;
    const KIND: &'static str = "concat";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "concatenate text artifacts";
    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "parts",
            accepts: &["text"],
            required: true,
            many: true,
            doc: "text artifacts to join",
        }]
    }
    fn outputs() -> &'static [OutputSlot] {
        TEXT_OUT
    }
    fn headline_files() -> &'static [&'static str] {
        &["data"]
    }
    fn run(p: &ConcatParams, ctx: &mut StageContext) -> miette::Result<()> {
        if p.fail {
            return Err(miette!("told to fail"));
        }
        let mut text = String::new();
        for part in ctx.inputs("parts") {
            text.push_str(&std::fs::read_to_string(part.path.join("data")).into_diagnostic()?);
        }
        if p.upper {
            text = text.to_uppercase();
        }
        let mut file =
            std::fs::File::create(ctx.output_dir("out")?.join("data")).into_diagnostic()?;
        for chunk in text.as_bytes().chunks(4096) {
            file.write_all(chunk).into_diagnostic()?;
            std::thread::sleep(Duration::from_millis(p.delay_ms));
        }
        ctx.set_metadata("bytes", text.len() as u64);
        Ok(())
    }
}

/// Counts to `steps`, one step per `delay_ms`, checkpointing every step: a killed run resumes
/// where it stopped and ends with the same output as an uninterrupted one.
struct Count;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CountParams {
    steps: u64,
    #[serde(default)]
    delay_ms: u64,
}

impl Stage for Count {
    type Params = CountParams;
    const KIND: &'static str = "count";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "a resumable loop over the input";
    fn headline_metrics() -> &'static [&'static str] {
        &["last_digits"]
    }
    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "seed",
            accepts: &["text"],
            required: false,
            many: false,
            doc: "text mixed into every step",
        }]
    }
    fn outputs() -> &'static [OutputSlot] {
        NUMBER_OUT
    }
    fn uses_seed(_: &CountParams) -> bool {
        true
    }
    fn run(p: &CountParams, ctx: &mut StageContext) -> miette::Result<()> {
        let seed_text = match ctx.optional_input("seed") {
            Some(dir) => std::fs::read_to_string(dir.join("data")).into_diagnostic()?,
            None => String::new(),
        };
        let ckpt = ctx.checkpoint_dir().join("state");
        let (mut step, mut acc): (u64, u64) = match std::fs::read_to_string(&ckpt) {
            Ok(s) => {
                let mut it = s.split_whitespace().map(|x| x.parse::<u64>());
                match (it.next(), it.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => (a, b),
                    _ => (0, ctx.seed()),
                }
            }
            Err(_) => (0, ctx.seed()),
        };
        let resumed_from = step;
        ctx.progress().start(p.steps, "steps");
        while step < p.steps {
            ctx.check_cancelled()?;
            acc = acc
                .wrapping_mul(6364136223846793005)
                .wrapping_add(step + seed_text.len() as u64);
            step += 1;
            let tmp = ckpt.with_extension("tmp");
            std::fs::write(&tmp, format!("{step} {acc}")).into_diagnostic()?;
            std::fs::rename(&tmp, &ckpt).into_diagnostic()?;
            ctx.progress().set_position(step);
            std::thread::sleep(Duration::from_millis(p.delay_ms));
        }
        std::fs::write(ctx.output_dir("out")?.join("data"), format!("{acc}\n"))
            .into_diagnostic()?;
        ctx.set_metadata("resumed_from_step", resumed_from);
        ctx.set_metadata("last_digits", acc % 1000);
        Ok(())
    }
}

/// A registered subcommand: prints its arguments, exits with 3 without any, fails on `--fail`.
struct Echo;

impl pipeline_engine::Command for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn about(&self) -> &'static str {
        "Print the arguments (a command registered by the binary, not the CLI)"
    }
    fn run(&self, args: Vec<std::ffi::OsString>) -> miette::Result<u8> {
        let words: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if words.iter().any(|w| w == "--help") {
            println!("usage: toy_pipeline echo [--fail] [WORDS]...");
            return Ok(0);
        }
        if words.iter().any(|w| w == "--fail") {
            return Err(miette!(help = "leave out --fail", "echo was told to fail"));
        }
        println!("{}", words.join(" "));
        Ok(if words.is_empty() { 3 } else { 0 })
    }
}

fn main() -> std::process::ExitCode {
    let mut registry = Registry::new();
    registry
        .register::<Write_>()
        .register::<Source>()
        .register::<Concat>()
        .register::<Count>()
        .register_command(Echo);
    pipeline::main_with(registry)
}
