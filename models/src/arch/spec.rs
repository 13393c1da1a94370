//! What an architecture is, as the rest of the code sees it: its names, its linear modules,
//! how it reads its config ([`ArchitectureSpec`], [`ArchConfig`]), and [`Architecture`], a
//! handle on one of them. The list of architectures is in [`super::registry`].

use std::fmt;
use std::path::Path;

use candle_core::{DType, Device};
use serde::{Serialize, Serializer};

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

/// One of the architectures the registry lists ([`super::ARCHITECTURES`]); serialised as
/// its name.
#[derive(Clone, Copy)]
pub struct Architecture(&'static ArchitectureSpec);

impl Architecture {
    /// The architecture `spec` describes (each architecture's file uses this for its own).
    pub const fn of(spec: &'static ArchitectureSpec) -> Self {
        Self(spec)
    }

    /// Its name (`llama`, `phi`).
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// `target_modules` entries.
    pub fn linear_module_names(self) -> &'static [&'static str] {
        self.0.linear_module_names
    }

    /// Reads the Hugging Face `config.json` at `path` as this architecture's config.
    pub fn read_hf_config(self, path: &Path) -> Result<Box<dyn ArchConfig>, LoadError> {
        (self.0.read_hf_config)(path)
    }

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
