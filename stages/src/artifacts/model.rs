//! The `model` artifact (layout and loader in [`pipeline_models::artifact`]) and how one is
//! made from downloaded weights: a llama.cpp `.gguf` file becomes `model.gguf` plus a
//! `tokenizer.json` rebuilt from its metadata; a Hugging Face directory (`config.json`,
//! `*.safetensors`, `tokenizer.json`) is copied as is. Both get `model.json`
//! ([`ModelInfo`]) and `tokenizer_config.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use miette::{miette, IntoDiagnostic};
use pipeline_models::arch::Architecture;
use pipeline_models::artifact::{
    link_or_copy, read_config, ModelInfo, CONFIG_JSON, GENERATION_CONFIG_JSON, GGUF_FILE,
    TOKENIZER_CONFIG_JSON, TOKENIZER_JSON,
};

use crate::chat::ChatTemplate;
use crate::json::{read_json, write_json};
use crate::tokenize::TextTokenizer;

/// The `model` artifact.
pub struct ModelArtifact;

impl ModelArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "model";

    /// Packages the weights at `source` (a `.gguf` file or a Hugging Face directory) into
    /// `out`. `link` hard-links files instead of copying (when `source` is itself in the
    /// store); `label` names the source in `model.json`; `extra_eos_tokens` (by text) also end
    /// a generation.
    pub fn write_from(
        source: &Path,
        out: &Path,
        link: bool,
        label: &str,
        extra_eos_tokens: &[String],
    ) -> miette::Result<ModelInfo> {
        if source.is_file() {
            package_gguf(source, out, link, label, extra_eos_tokens)
        } else {
            package_hf(source, out, link, label, extra_eos_tokens)
        }
    }

    /// Bytes the artifact's weight files (`.gguf`, `.safetensors`) take: the memory the base
    /// weights need as stored.
    pub fn weight_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.ends_with(".gguf") || name.ends_with(".safetensors")
                    })
                    .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The chat template of the artifact in `dir` and its BOS and EOS token texts (for the
    /// template's `bos_token`/`eos_token`), from `tokenizer_config.json`; `None` when the model
    /// has no template.
    pub fn chat_template(dir: &Path) -> miette::Result<Option<ChatTemplate>> {
        let path = dir.join(TOKENIZER_CONFIG_JSON);
        if !path.is_file() {
            return Ok(None);
        }
        let config: serde_json::Value = read_json(&path)?;
        // A token is a string, or an object whose `content` is (AddedToken).
        let token = |key: &str| {
            let v = config.get(key);
            v.and_then(|t| t.as_str())
                .or_else(|| v.and_then(|t| t.get("content")).and_then(|c| c.as_str()))
                .unwrap_or("")
                .to_string()
        };
        Ok(config
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(|template| ChatTemplate {
                template: template.to_string(),
                bos_token: token("bos_token"),
                eos_token: token("eos_token"),
            }))
    }

    /// `model.json` of the artifact in `dir`.
    pub fn info(dir: &Path) -> miette::Result<ModelInfo> {
        Ok(ModelInfo::load(dir)?)
    }
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
/// `tokenizer.json` finds the same EOS/BOS ids, with the model's chat template when it has one.
fn write_tokenizer_config(
    tok: &TextTokenizer,
    chat_template: Option<&str>,
    out: &Path,
) -> miette::Result<()> {
    let name = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let mut cfg = serde_json::json!({
        "eos_token": name(tok.eos_id),
        "bos_token": name(tok.bos_id),
    });
    if let (Some(template), Some(fields)) = (chat_template, cfg.as_object_mut()) {
        fields.insert("chat_template".into(), template.into());
    }
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
    let gguf_arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let architecture = Architecture::of_gguf(&gguf_arch).ok_or_else(|| {
        miette!(
            help = "use the Hugging Face safetensors checkpoint of the model instead",
            "GGUF architecture is `{gguf_arch}`; GGUF files of these architectures load: {}",
            supported_gguf()
        )
    })?;
    let pad = content
        .metadata
        .get("tokenizer.ggml.padding_token_id")
        .and_then(|v| v.to_u32().ok());
    let chat_template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let tok = TextTokenizer::from_gguf(src)?;
    let mut eos = Vec::new();
    push_unique(&mut eos, tok.eos_id);
    push_unique(&mut eos, token_ids(&tok, extra)?);
    link_or_copy(src, &out.join(GGUF_FILE), link)?;
    tok.tokenizer
        .save(out.join(TOKENIZER_JSON), false)
        .map_err(|e| miette!("cannot write tokenizer.json: {e}"))?;
    write_tokenizer_config(&tok, chat_template.as_deref(), out)?;
    let info = ModelInfo {
        architecture,
        eos_token_ids: eos,
        pad_token_id: pad,
        source: label.to_string(),
        hub_id: None,
        hub_revision: None,
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
    let arch = Architecture::from_hf_config(&config_path).into_diagnostic()?;
    // Check the weights against the config now, so a mismatch fails here rather than in every
    // stage that loads the model.
    let config = read_config(src, arch)?;
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
    let gen_cfg = src.join(GENERATION_CONFIG_JSON);
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
        GENERATION_CONFIG_JSON,
        "special_tokens_map.json",
    ] {
        if src.join(name).is_file() {
            link_or_copy(&src.join(name), &out.join(name), link)?;
        }
    }
    if !src.join(TOKENIZER_CONFIG_JSON).is_file() {
        write_tokenizer_config(&tok, None, out)?;
    }
    let info = ModelInfo {
        architecture: arch,
        eos_token_ids: eos,
        pad_token_id: pad,
        source: label.to_string(),
        hub_id: None,
        hub_revision: None,
    };
    info.save(out)?;
    Ok(info)
}

/// The llama.cpp names of the architectures whose GGUF files load.
fn supported_gguf() -> String {
    pipeline_models::arch::ARCHITECTURES
        .iter()
        .filter_map(|spec| spec.gguf.map(|g| g.name))
        .collect::<Vec<_>>()
        .join(", ")
}
