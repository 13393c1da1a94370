//! LoRA adapters in Hugging Face PEFT's on-disk format, so adapters trained here load with
//! `PeftModel.from_pretrained` and adapters from PEFT load here.
//!
//! A PEFT adapter directory holds:
//! * `adapter_model.safetensors`: for each adapted module at path `P` of the base model,
//!   `base_model.model.P.lora_A.weight` `[r, in_features]` and
//!   `base_model.model.P.lora_B.weight` `[out_features, r]` (the adapter name `default` is not
//!   part of saved keys; metadata `format = pt`).
//! * `adapter_config.json`: the `LoraConfig` (`peft_type: "LORA"`, `r`, `lora_alpha`, …).
//!
//! The update applied to a base weight is `ΔW = (lora_alpha / r) · B · A`
//! (`lora_alpha / √r` with `use_rslora`).

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::lora::LoraConfig;

/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Prefix PEFT puts before module paths (`PeftModel.base_model` is a `LoraModel` whose `.model`
/// is the wrapped transformer).
pub const KEY_PREFIX: &str = "base_model.model.";

/// Errors reading or writing adapters.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// File system failure.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The adapter (on disk or in memory) is not a consistent LoRA adapter.
    #[error("invalid LoRA adapter{}: {reason}", path.as_ref().map(|p| format!(" `{}`", p.display())).unwrap_or_default())]
    Invalid {
        /// Adapter directory, when reading one.
        path: Option<PathBuf>,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The adapter does not fit the model it is loaded into.
    #[error("the adapter does not match the model: {0}")]
    Mismatch(String),
    /// JSON failure.
    #[error("adapter_config.json `{path}`: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// Tensor failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, PeftError>;

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PeftError {
    let path = path.to_path_buf();
    move |source| PeftError::Io {
        action,
        path,
        source,
    }
}

/// `adapter_config.json` as PEFT's `LoraConfig` writes it (fields of PEFT ≥ 0.10; unknown fields
/// from newer versions are ignored when reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// Always `"CAUSAL_LM"` here.
    pub task_type: Option<String>,
    /// Base model identifier (hub id or path) the adapter was trained on.
    pub base_model_name_or_path: Option<String>,
    /// Base model revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha (scaling numerator). Written as an integer when it is one: PEFT's
    /// `LoraConfig.lora_alpha` is an `int`.
    #[serde(serialize_with = "integer_if_whole")]
    pub lora_alpha: f64,
    /// Dropout on the adapter input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (last path component, e.g. `q_proj`) that carry adapters.
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// Bias training: `"none"` here.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Whether the base stores weights transposed (GPT-2 Conv1D); false for our layers.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weight-decomposed LoRA (not supported here; must be false).
    #[serde(default)]
    pub use_dora: bool,
    /// Whether the adapter is saved for inference.
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    /// How PEFT initialised the adapter (`true` = A Kaiming-uniform, B zero).
    #[serde(default = "default_init")]
    pub init_lora_weights: serde_json::Value,
    /// Extra fully-trained modules (none here).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Only these layer indices are adapted (`null` = all).
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Layer container name used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    /// Per-module rank overrides (must be empty here).
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alpha overrides (must be empty here).
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    /// PEFT internals, written as PEFT writes them.
    #[serde(default)]
    pub auto_mapping: Option<serde_json::Value>,
    /// PEFT internals, written as PEFT writes them.
    #[serde(default)]
    pub megatron_config: Option<serde_json::Value>,
    /// PEFT internals, written as PEFT writes them.
    #[serde(default = "default_megatron_core")]
    pub megatron_core: Option<String>,
    /// PEFT internals, written as PEFT writes them.
    #[serde(default)]
    pub loftq_config: serde_json::Map<String, serde_json::Value>,
    /// PEFT internals, written as PEFT writes them.
    #[serde(default)]
    pub layer_replication: Option<serde_json::Value>,
}

fn integer_if_whole<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 2f64.powi(53) {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn default_bias() -> String {
    "none".into()
}
fn default_true() -> bool {
    true
}
fn default_init() -> serde_json::Value {
    serde_json::Value::Bool(true)
}
fn default_megatron_core() -> Option<String> {
    Some("megatron.core".into())
}

impl PeftConfig {
    /// A causal-LM LoRA config with PEFT's defaults for everything else.
    pub fn lora(
        base_model: impl Into<String>,
        r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        target_modules: Vec<String>,
    ) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.into()),
            revision: None,
            r,
            lora_alpha,
            lora_dropout,
            target_modules: Some(target_modules),
            bias: default_bias(),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            inference_mode: true,
            init_lora_weights: default_init(),
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            auto_mapping: None,
            megatron_config: None,
            megatron_core: default_megatron_core(),
            loftq_config: Default::default(),
            layer_replication: None,
        }
    }

    /// The factor applied to `B · A`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn validate(&self, path: Option<&Path>) -> Result<()> {
        let bad = |reason: String| PeftError::Invalid {
            path: path.map(Path::to_path_buf),
            reason,
        };
        if self.peft_type != "LORA" {
            return Err(bad(format!(
                "peft_type is `{}`; only LORA adapters are supported",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(bad("r must be at least 1".into()));
        }
        if self.use_dora {
            return Err(bad("DoRA adapters (use_dora) are not supported".into()));
        }
        if self.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out adapters (GPT-2 Conv1D layouts) are not supported".into(),
            ));
        }
        if self.bias != "none" {
            return Err(bad(format!(
                "bias `{}` is not supported; use \"none\"",
                self.bias
            )));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(bad(
                "per-module rank_pattern / alpha_pattern are not supported".into(),
            ));
        }
        Ok(())
    }
}

/// The two matrices of one adapted module.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in_features]`.
    pub a: Tensor,
    /// `[out_features, r]`.
    pub b: Tensor,
}

impl LoraPair {
    /// `(in_features, out_features)`.
    pub fn features(&self) -> Result<(usize, usize)> {
        Ok((self.a.dim(1)?, self.b.dim(0)?))
    }
}

/// An adapter read from (or about to be written to) a PEFT directory.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// The configuration.
    pub config: PeftConfig,
    /// Adapted modules by path relative to the base model (e.g. `model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, LoraPair>,
}

/// Splits `<module>.lora_A.weight` / `<module>.lora_B.weight` into module path and matrix.
fn split_name(name: &str) -> Option<(&str, char)> {
    if let Some(m) = name.strip_suffix(".lora_A.weight") {
        Some((m, 'A'))
    } else {
        name.strip_suffix(".lora_B.weight").map(|m| (m, 'B'))
    }
}

impl PeftAdapter {
    /// Groups tensors named `<module path>.lora_A.weight` / `.lora_B.weight` (the names
    /// [`LinearLayer::trainable_vars`](crate::LinearLayer::trainable_vars) gives, prefixed by the
    /// module path) into an adapter, checking pairs, ranks and shapes.
    pub fn from_named(config: PeftConfig, tensors: &[(String, Tensor)]) -> Result<Self> {
        config.validate(None)?;
        let invalid = |reason: String| PeftError::Invalid { path: None, reason };
        let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, t) in tensors {
            let name = name.strip_prefix(KEY_PREFIX).unwrap_or(name);
            let (module, which) = split_name(name).ok_or_else(|| {
                invalid(format!(
                    "`{name}` is not a LoRA weight name (expected `<module>.lora_A.weight` or \
                     `<module>.lora_B.weight`)"
                ))
            })?;
            let slot = parts.entry(module.to_string()).or_default();
            let dst = if which == 'A' {
                &mut slot.0
            } else {
                &mut slot.1
            };
            if dst.replace(t.detach()).is_some() {
                return Err(invalid(format!("`{name}` appears twice")));
            }
        }
        let mut modules = BTreeMap::new();
        for (module, (a, b)) in parts {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(invalid(format!(
                        "module `{module}` has no {missing}.weight"
                    )));
                }
            };
            check_pair(&module, &a, &b, config.r).map_err(invalid)?;
            modules.insert(module, LoraPair { a, b });
        }
        if modules.is_empty() {
            return Err(invalid("no LoRA weights given".into()));
        }
        Ok(Self { config, modules })
    }

    /// Builds an adapter from trainable variables (as a [`Trainer`](crate::train::Trainer) holds them).
    pub fn from_vars(config: PeftConfig, vars: &[(String, Var)]) -> Result<Self> {
        let tensors: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        Self::from_named(config, &tensors)
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (created if
    /// needed), each via a temporary file and a rename. Weights are stored as f32.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io("create adapter directory", dir))?;
        let mut views = Vec::with_capacity(2 * self.modules.len());
        for (module, pair) in &self.modules {
            for (which, t) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
                views.push((
                    format!("{KEY_PREFIX}{module}.{which}.weight"),
                    F32View::new(t)?,
                ));
            }
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes =
            safetensors::tensor::serialize(views, Some(meta)).map_err(|e| PeftError::Invalid {
                path: Some(dir.to_path_buf()),
                reason: format!("cannot serialise adapter weights: {e}"),
            })?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        let cfg_path = dir.join(CONFIG_FILE);
        let json = serde_json::to_vec_pretty(&self.config).map_err(|source| PeftError::Json {
            path: cfg_path.clone(),
            source,
        })?;
        write_atomic(&cfg_path, &json)
    }

    /// Reads a PEFT adapter directory onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(io("read", &cfg_path))?;
        let config: PeftConfig = serde_json::from_str(&text).map_err(|source| PeftError::Json {
            path: cfg_path.clone(),
            source,
        })?;
        config.validate(Some(dir))?;
        let w_path = dir.join(WEIGHTS_FILE);
        if !w_path.is_file() {
            return Err(PeftError::Invalid {
                path: Some(dir.to_path_buf()),
                reason: format!(
                    "`{WEIGHTS_FILE}` is missing (only safetensors adapters are supported)"
                ),
            });
        }
        let tensors = candle_core::safetensors::load(&w_path, device)?;
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
        for (k, t) in tensors {
            let stripped = k
                .strip_prefix(KEY_PREFIX)
                .ok_or_else(|| PeftError::Invalid {
                    path: Some(dir.to_path_buf()),
                    reason: format!("key `{k}` does not start with `{KEY_PREFIX}`"),
                })?;
            // Multi-adapter saves keep the adapter name (`lora_A.<name>.weight`); accept `default`.
            let stripped = stripped.replace(".lora_A.default.weight", ".lora_A.weight");
            let stripped = stripped.replace(".lora_B.default.weight", ".lora_B.weight");
            named.push((stripped, t));
        }
        Self::from_named(config, &named).map_err(|e| match e {
            PeftError::Invalid { path: None, reason } => PeftError::Invalid {
                path: Some(dir.to_path_buf()),
                reason,
            },
            other => other,
        })
    }

    /// Copies the adapter into a model's trainable variables named `<module>.lora_A.weight` /
    /// `<module>.lora_B.weight`. Every variable must get a tensor of its shape and every adapter
    /// module must be used; errors name the first offender.
    pub fn assign_to(&self, vars: &[(String, Var)]) -> Result<()> {
        let mut used = std::collections::HashSet::new();
        for (name, var) in vars {
            let (module, which) = split_name(name).ok_or_else(|| {
                PeftError::Mismatch(format!("model variable `{name}` is not a LoRA weight"))
            })?;
            let pair = self.modules.get(module).ok_or_else(|| {
                PeftError::Mismatch(format!(
                    "the adapter has no weights for module `{module}` (it has {} modules, e.g. `{}`); \
                     was it trained with other target_modules?",
                    self.modules.len(),
                    self.modules.keys().next().map(String::as_str).unwrap_or("")
                ))
            })?;
            let t = if which == 'A' { &pair.a } else { &pair.b };
            if t.dims() != var.dims() {
                return Err(PeftError::Mismatch(format!(
                    "`{name}`: adapter shape {:?}, model expects {:?} (different rank or base model?)",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            used.insert(module);
        }
        if let Some(unused) = self.modules.keys().find(|m| !used.contains(m.as_str())) {
            return Err(PeftError::Mismatch(format!(
                "adapter module `{unused}` has no counterpart in the model"
            )));
        }
        Ok(())
    }
}

fn check_pair(module: &str, a: &Tensor, b: &Tensor, r: usize) -> std::result::Result<(), String> {
    match (a.dims(), b.dims()) {
        (&[ra, _in], &[_out, rb]) if ra == r && rb == r => Ok(()),
        (&[ra, _], &[_, rb]) => Err(format!(
            "module `{module}`: lora_A {:?} and lora_B {:?} must have rank r = {r} (found {ra} and {rb})",
            a.dims(),
            b.dims()
        )),
        _ => Err(format!(
            "module `{module}`: lora_A {:?} and lora_B {:?} must both be 2-D",
            a.dims(),
            b.dims()
        )),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::io::write_atomic(path, bytes).map_err(io("write", path))
}

/// The LoRA settings of the PEFT adapter in directory `dir` (its `adapter_config.json`).
/// Adapter variants whose forward differs from plain LoRA (rsLoRA scaling, DoRA, regex
/// `target_modules`, other PEFT types) are refused rather than misread.
pub fn lora_config_of(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let refuse = |reason: String| PeftError::Invalid {
        path: Some(path.clone()),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(io("cannot read", &path))?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.clone(),
        source,
    })?;
    if let Some(t) = raw.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(refuse(format!(
                "peft_type is {t:?}; only LORA adapters are supported"
            )));
        }
    }
    if let Some(serde_json::Value::String(s)) = raw.get("target_modules") {
        return Err(refuse(format!(
            "`target_modules` is the regular expression {s:?}; only a list of module names is supported"
        )));
    }
    if raw.get("use_dora").and_then(|b| b.as_bool()) == Some(true) {
        return Err(refuse("use_dora adapters are not supported".into()));
    }
    let config: PeftConfig = serde_json::from_value(raw).map_err(|source| PeftError::Json {
        path: path.clone(),
        source,
    })?;
    if config.use_rslora {
        return Err(refuse(
            "use_rslora adapters are not supported (their scaling is alpha/sqrt(r))".into(),
        ));
    }
    let target_modules = config.target_modules.unwrap_or_default();
    if target_modules.is_empty() {
        return Err(refuse("`target_modules` is missing or empty".into()));
    }
    Ok(LoraConfig {
        r: config.r,
        alpha: config.lora_alpha,
        dropout: config.lora_dropout,
        target_modules,
    })
}

/// Host f32 copy of a tensor, viewable by the safetensors serializer.
struct F32View {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl F32View {
    fn new(t: &Tensor) -> Result<Self> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            shape: t.dims().to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }
}

impl safetensors::View for F32View {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
