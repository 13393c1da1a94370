//! Small ML-free stage kinds for the engine's own tests, and helpers to load manifests.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::manifest::{parse_manifest, ManifestError, ManifestOptions};
use pipeline_engine::{InputSlot, Manifest, OutputSlot, Registry, Stage, StageContext};
use serde::{Deserialize, Serialize};

const TEXT: &[OutputSlot] = &[OutputSlot {
    name: "out",
    artifact: "text",
    doc: "file `data`",
}];

fn write_data(ctx: &StageContext, text: &str) -> miette::Result<()> {
    let mut file = std::fs::File::create(ctx.output_dir("out")?.join("data")).into_diagnostic()?;
    file.write_all(text.as_bytes()).into_diagnostic()
}

fn read_inputs(ctx: &StageContext, slot: &str) -> miette::Result<String> {
    let mut text = String::new();
    for input in ctx.inputs(slot) {
        text.push_str(&std::fs::read_to_string(input.path.join("data")).into_diagnostic()?);
    }
    Ok(text)
}

/// Writes `text`; `second` is a second output (of another artifact type).
pub struct Emit;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmitParams {
    pub text: String,
    #[serde(default)]
    pub count: u64,
}

impl Stage for Emit {
    type Params = EmitParams;
    const KIND: &'static str = "emit";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "write `text`";
    fn inputs() -> &'static [InputSlot] {
        &[]
    }
    fn outputs() -> &'static [OutputSlot] {
        &[
            OutputSlot {
                name: "out",
                artifact: "text",
                doc: "file `data`",
            },
            OutputSlot {
                name: "size",
                artifact: "number",
                doc: "the length of `text`",
            },
        ]
    }
    fn run(p: &EmitParams, ctx: &mut StageContext) -> miette::Result<()> {
        write_data(ctx, &p.text)?;
        std::fs::write(
            ctx.output_dir("size")?.join("data"),
            p.text.len().to_string(),
        )
        .into_diagnostic()
    }
}

/// Joins every input of its fan-in slot `parts`; can be told to fail.
pub struct Join;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinParams {
    #[serde(default)]
    pub fail: bool,
    #[serde(default)]
    pub sep: String,
}

impl Stage for Join {
    type Params = JoinParams;
    const KIND: &'static str = "join";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "join text artifacts";
    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "parts",
            accepts: &["text"],
            required: true,
            many: true,
            doc: "text to join",
        }]
    }
    fn outputs() -> &'static [OutputSlot] {
        TEXT
    }
    fn run(p: &JoinParams, ctx: &mut StageContext) -> miette::Result<()> {
        if p.fail {
            return Err(miette!("told to fail"));
        }
        let parts: Vec<String> = ctx
            .inputs("parts")
            .iter()
            .map(|a| std::fs::read_to_string(a.path.join("data")).into_diagnostic())
            .collect::<miette::Result<_>>()?;
        write_data(ctx, &parts.join(&p.sep))
    }
}

/// Upper-cases its single input `src`, optionally mixing in the seed.
pub struct Upper;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpperParams {
    #[serde(default)]
    pub seeded: bool,
}

impl Stage for Upper {
    type Params = UpperParams;
    const KIND: &'static str = "upper";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "upper-case one text artifact";
    fn inputs() -> &'static [InputSlot] {
        &[
            InputSlot {
                name: "src",
                accepts: &["text"],
                required: true,
                many: false,
                doc: "the text",
            },
            InputSlot {
                name: "extra",
                accepts: &["text"],
                required: false,
                many: false,
                doc: "appended",
            },
        ]
    }
    fn outputs() -> &'static [OutputSlot] {
        TEXT
    }
    fn uses_seed(p: &UpperParams) -> bool {
        p.seeded
    }
    fn run(p: &UpperParams, ctx: &mut StageContext) -> miette::Result<()> {
        let mut text = read_inputs(ctx, "src")?.to_uppercase() + &read_inputs(ctx, "extra")?;
        if p.seeded {
            text.push_str(&ctx.seed().to_string());
        }
        write_data(ctx, &text)
    }
}

/// Writes what it knows of its inputs (producer table, labels, tree): a kind whose output
/// depends on its producers' names, so it declares `uses_input_labels`.
pub struct Labels;

impl Stage for Labels {
    type Params = EmptyParams;
    const KIND: &'static str = "labels";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "name the variants of its inputs";
    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "parts",
            accepts: &["text"],
            required: true,
            many: true,
            doc: "the variants",
        }]
    }
    fn outputs() -> &'static [OutputSlot] {
        TEXT
    }
    fn uses_input_labels(_: &EmptyParams) -> bool {
        true
    }
    fn run(_: &EmptyParams, ctx: &mut StageContext) -> miette::Result<()> {
        let lines: Vec<String> = ctx
            .inputs("parts")
            .iter()
            .map(|a| {
                let labels: Vec<String> =
                    a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{} {} {} {}", a.stage, a.base, labels.join(","), a.tree)
            })
            .collect();
        write_data(ctx, &lines.join("\n"))
    }
}

#[derive(Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyParams {}

/// Copies an external file (keyed by its content).
pub struct Source;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceParams {
    pub path: std::path::PathBuf,
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
        TEXT
    }
    fn fingerprint(p: &SourceParams, fp: &mut Fingerprint) -> miette::Result<()> {
        fp.file("path", &p.path)
    }
    fn run(p: &SourceParams, ctx: &mut StageContext) -> miette::Result<()> {
        std::fs::copy(ctx.resolve(&p.path), ctx.output_dir("out")?.join("data"))
            .into_diagnostic()?;
        Ok(())
    }
}

/// When each run of a `sleep` stage started and ended, by `tag`.
pub fn spans(tag: &str) -> Vec<(Instant, Instant)> {
    spans_map()
        .lock()
        .map(|m| m.get(tag).cloned().unwrap_or_default())
        .unwrap_or_default()
}

/// Start and end of each run, by tag.
type Spans = HashMap<String, Vec<(Instant, Instant)>>;

fn spans_map() -> &'static Mutex<Spans> {
    static SPANS: OnceLock<Mutex<Spans>> = OnceLock::new();
    SPANS.get_or_init(Default::default)
}

/// Sleeps `ms` and records when (under `tag`); with `until_cancelled` it instead waits for
/// the run to be cancelled, then fails as an interrupted stage does.
pub struct Sleep;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SleepParams {
    pub tag: String,
    #[serde(default)]
    pub ms: u64,
    #[serde(default)]
    pub until_cancelled: bool,
    #[serde(default)]
    pub gpu: bool,
    /// Makes otherwise identical stages distinct keys.
    #[serde(default)]
    pub id: u64,
}

impl Stage for Sleep {
    type Params = SleepParams;
    const KIND: &'static str = "sleep";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "take some time";
    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "after",
            accepts: &["text"],
            required: false,
            many: true,
            doc: "stages to wait for",
        }]
    }
    fn outputs() -> &'static [OutputSlot] {
        TEXT
    }
    fn needs_gpu(p: &SleepParams) -> bool {
        p.gpu
    }
    fn run(p: &SleepParams, ctx: &mut StageContext) -> miette::Result<()> {
        let start = Instant::now();
        started()
            .lock()
            .map_err(|_| miette!("poisoned"))?
            .insert(p.tag.clone());
        if p.until_cancelled {
            while !ctx.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            ctx.check_cancelled()?;
        }
        std::thread::sleep(Duration::from_millis(p.ms));
        let end = Instant::now();
        spans_map()
            .lock()
            .map_err(|_| miette!("poisoned"))?
            .entry(p.tag.clone())
            .or_default()
            .push((start, end));
        write_data(ctx, &format!("{} {}", p.tag, p.id))
    }
}

fn started() -> &'static Mutex<BTreeSet<String>> {
    static STARTED: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    STARTED.get_or_init(Default::default)
}

/// Whether a `sleep` stage with this tag has started.
pub fn has_started(tag: &str) -> bool {
    started().lock().map(|s| s.contains(tag)).unwrap_or(false)
}

/// Every test kind.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register::<Emit>()
        .register::<Join>()
        .register::<Upper>()
        .register::<Labels>()
        .register::<Source>()
        .register::<Sleep>();
    registry
}

/// Loads `text` (with `[experiment]` prepended) with `overrides`, as if at `dir/m.toml`.
pub fn load_in(dir: &Path, text: &str, overrides: &[&str]) -> Result<Manifest, Vec<ManifestError>> {
    let source = format!("[experiment]\nname = \"test\"\nseed = 5\n\n{text}");
    let options = ManifestOptions {
        overrides: overrides.iter().map(|o| o.to_string()).collect(),
    };
    parse_manifest(&dir.join("m.toml"), source, &registry(), &options)
        .map_err(|e| e.errors().to_vec())
}

/// Loads `text` (with `[experiment]` prepended) with `overrides`.
pub fn load(text: &str, overrides: &[&str]) -> Result<Manifest, Vec<ManifestError>> {
    load_in(Path::new("."), text, overrides)
}

/// Loads a manifest that must be valid.
pub fn valid(text: &str) -> Manifest {
    load(text, &[]).unwrap_or_else(|errors| panic!("invalid manifest: {errors:#?}"))
}

/// Loads a manifest that must be invalid; its errors as `(code, message)`.
pub fn invalid(text: &str, overrides: &[&str]) -> Vec<(&'static str, String)> {
    match load(text, overrides) {
        Ok(m) => panic!("expected errors, got {:?}", names(&m)),
        Err(errors) => errors.into_iter().map(|e| (e.code, e.message)).collect(),
    }
}

/// Instance names in manifest order.
pub fn names(manifest: &Manifest) -> Vec<String> {
    manifest.stages.iter().map(|s| s.name.to_string()).collect()
}

/// Producers of `stage`'s `slot`, as `instance.output`.
pub fn inputs_of(manifest: &Manifest, stage: &str, slot: &str) -> Vec<String> {
    let instance = manifest
        .stage(stage)
        .unwrap_or_else(|| panic!("no stage {stage} in {:?}", names(manifest)));
    instance
        .inputs
        .get(slot)
        .map(|refs| {
            refs.iter()
                .map(|r| format!("{}.{}", r.stage, r.output))
                .collect()
        })
        .unwrap_or_default()
}
