//! Which architectures exist, by name, and how each reads its config.
//!
//! An architecture is one file under `arch/` that defines its config (a type implementing
//! [`ArchConfig`]) and one [`ArchitectureSpec`]; [`ARCHITECTURES`] lists the specs. Everything
//! that picks an architecture at run time (a model artifact's `model.json`, a Hugging Face
//! `config.json`, a GGUF file's `general.architecture`) goes through [`Architecture`], so a new
//! architecture is one new file plus one line in [`ARCHITECTURES`].

use std::fmt;
use std::path::Path;

use candle_core::{DType, Device};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{DecoderModel, LinearFactory};
use crate::weights::{LoadError, Weights};

/// Weights and config read from a llama.cpp GGUF file.
pub type GgufModel = (Weights, Box<dyn ArchConfig>);

/// Everything the rest of the code needs to know about one architecture.
pub struct ArchitectureSpec {
    /// Name in `model.json`, and the Hugging Face `model_type` (`llama`).
    pub name: &'static str,
    /// Hugging Face class names (`config.json`'s `architectures`), e.g. `LlamaForCausalLM`.
    pub hf_classes: &'static [&'static str],
    /// The module names of every linear projection except the LM head (QLoRA's "all linear
    /// layers"), as PEFT `target_modules` entries.
    pub linear_module_names: &'static [&'static str],
    /// Reads a Hugging Face `config.json`.
    pub read_hf_config: fn(&Path) -> Result<Box<dyn ArchConfig>, LoadError>,
    /// How llama.cpp GGUF files of this architecture load, if they do.
    pub gguf: Option<GgufSupport>,
}

/// GGUF support of an architecture.
#[derive(Clone, Copy)]
pub struct GgufSupport {
    /// llama.cpp's name for the architecture (GGUF `general.architecture`).
    pub name: &'static str,
    /// Reads the file's weights (quantized ones stay quantized) and the config its metadata
    /// implies.
    pub load: fn(&Path, &Device) -> Result<GgufModel, LoadError>,
}

/// Every architecture this crate implements.
pub const ARCHITECTURES: &[&ArchitectureSpec] =
    &[&super::llama::ARCHITECTURE, &super::phi::ARCHITECTURE];

/// One of [`ARCHITECTURES`]; serialised as its name.
#[derive(Clone, Copy)]
pub struct Architecture(&'static ArchitectureSpec);

impl Architecture {
    /// The architecture `spec` describes (each architecture's file uses this for its own).
    pub const fn of(spec: &'static ArchitectureSpec) -> Self {
        Self(spec)
    }

    /// The architecture called `name` (as in `model.json` or a HF `model_type`).
    pub fn named(name: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|spec| spec.name == name)
            .map(|spec| Self(spec))
    }

    /// The architecture of a Hugging Face class name (`LlamaForCausalLM`).
    pub fn of_hf_class(class: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|spec| spec.hf_classes.contains(&class))
            .map(|spec| Self(spec))
    }

    /// The architecture llama.cpp calls `name` (GGUF `general.architecture`).
    pub fn of_gguf(name: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|spec| spec.gguf.is_some_and(|g| g.name == name))
            .map(|spec| Self(spec))
    }

    /// Reads the architecture of a Hugging Face `config.json` (`model_type`, else
    /// `architectures[0]`).
    pub fn from_hf_config(path: &Path) -> Result<Self, LoadError> {
        let v: serde_json::Value = super::read_json_config(path)?;
        let model_type = v.get("model_type").and_then(|t| t.as_str());
        let class = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str());
        match (model_type, class) {
            (Some(name), _) => Self::named(name).ok_or_else(|| unsupported(name)),
            (None, Some(class)) => Self::of_hf_class(class).ok_or_else(|| unsupported(class)),
            (None, None) => Err(LoadError::Unsupported(format!(
                "{}: neither `model_type` nor `architectures` is set",
                path.display()
            ))),
        }
    }

    /// Its name (`llama`, `phi`).
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The module names of every linear projection except the LM head, as PEFT
    /// `target_modules` entries.
    pub fn linear_module_names(self) -> &'static [&'static str] {
        self.0.linear_module_names
    }

    /// Reads the Hugging Face `config.json` at `path` as this architecture's config.
    pub fn read_hf_config(self, path: &Path) -> Result<Box<dyn ArchConfig>, LoadError> {
        (self.0.read_hf_config)(path)
    }

    /// Loads a GGUF file of this architecture: its weights (quantized ones stay quantized)
    /// and the config its metadata implies.
    pub fn load_gguf(self, path: &Path, device: &Device) -> Result<GgufModel, LoadError> {
        match self.0.gguf {
            Some(gguf) => (gguf.load)(path, device),
            None => Err(LoadError::Unsupported(format!(
                "GGUF files of architecture `{}`",
                self.name()
            ))),
        }
    }

    /// The names of all architectures, for messages.
    pub fn known_names() -> String {
        ARCHITECTURES
            .iter()
            .map(|spec| spec.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn unsupported(name: &str) -> LoadError {
    LoadError::Unsupported(format!(
        "architecture `{name}` (supported: {})",
        Architecture::known_names()
    ))
}

impl PartialEq for Architecture {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Architecture {}

impl fmt::Debug for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Architecture {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Architecture {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::named(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown architecture `{name}` (known: {})",
                Self::known_names()
            ))
        })
    }
}

/// A parsed architecture config: what a checkpoint holds and how to build the model.
pub trait ArchConfig: fmt::Debug + Send + Sync {
    /// Which architecture this configures.
    fn architecture(&self) -> Architecture;

    /// Every tensor a checkpoint with this config holds, with its shape (HF names).
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)>;

    /// The config as a Hugging Face `config.json` (with `model_type` and `architectures`), for
    /// writing a checkpoint whose config came from elsewhere (GGUF metadata).
    fn to_hf_json(&self) -> serde_json::Value;

    /// Builds the model from HF-named `weights`, computing in `dtype`; `factory` builds every
    /// projection.
    fn build(
        &self,
        weights: &Weights,
        dtype: DType,
        factory: &mut dyn LinearFactory,
    ) -> Result<DecoderModel, LoadError>;

    /// The HF module paths of the linear projections whose weight is stored under their own
    /// name (`<module>.weight`), including an untied `lm_head`.
    fn linear_modules(&self) -> Vec<String> {
        self.tensor_shapes()
            .into_iter()
            .filter(|(name, shape)| shape.len() == 2 && name != "model.embed_tokens.weight")
            .filter_map(|(name, _)| name.strip_suffix(".weight").map(str::to_string))
            .collect()
    }
}

/// `config` as a HF `config.json` of `architecture`: its serialised fields plus `model_type`
/// and `architectures`.
pub(crate) fn hf_json<C: Serialize>(config: &C, spec: &ArchitectureSpec) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.insert("model_type".into(), spec.name.into());
        fields.insert(
            "architectures".into(),
            serde_json::json!(spec
                .hf_classes
                .first()
                .copied()
                .into_iter()
                .collect::<Vec<_>>()),
        );
    }
    value
}
