//! Which architectures exist ([`ARCHITECTURES`]) and how one is found by name: in
//! `model.json`, a Hugging Face `config.json` (`model_type`, `architectures`) or a GGUF file's
//! `general.architecture`. A new architecture is one file under `arch/` plus one line in
//! [`ARCHITECTURES`].

use std::path::Path;

use serde::{Deserialize, Deserializer};

use super::spec::{Architecture, ArchitectureSpec};
use crate::weights::LoadError;

/// Every architecture this crate implements.
pub const ARCHITECTURES: &[&ArchitectureSpec] =
    &[&super::llama::ARCHITECTURE, &super::phi::ARCHITECTURE];

impl Architecture {
    /// The architecture called `name` (as in `model.json` or a HF `model_type`).
    pub fn named(name: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|spec| spec.name == name)
            .map(|spec| Self::of(spec))
    }

    /// The architecture of a Hugging Face class name (`LlamaForCausalLM`).
    pub fn of_hf_class(class: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|spec| spec.hf_classes.contains(&class))
            .map(|spec| Self::of(spec))
    }

    /// The architecture llama.cpp calls `name` (GGUF `general.architecture`).
    pub fn of_gguf(name: &str) -> Option<Self> {
        ARCHITECTURES
            .iter()
            .find(|spec| spec.gguf.is_some_and(|g| g.name == name))
            .map(|spec| Self::of(spec))
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

    /// The module names of every linear projection except the LM head, as PEFT
    /// Loads a GGUF file of this architecture: its weights (quantized ones stay quantized)
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
