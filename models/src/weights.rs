//! Loading model weights by Hugging Face tensor names: safetensors (memory-mapped) and GGUF
//! (llama.cpp; Llama architecture), keeping quantized tensors quantized until a layer asks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

/// Errors while reading weights or configs, each saying what to check.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}. Check that the file exists and is readable")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A config file is not valid JSON for this architecture.
    #[error("invalid model config {path}: {source}. Use the model's Hugging Face config.json")]
    Config {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A config value is unsupported or inconsistent.
    #[error("unsupported model config: {0}")]
    Unsupported(String),
    /// The weights lack a tensor the architecture needs.
    #[error("weights have no tensor `{name}`. The checkpoint does not match the architecture or config (expected HF names such as `model.layers.0.self_attn.q_proj.weight`)")]
    MissingTensor {
        /// The HF tensor name.
        name: String,
    },
    /// A tensor has the wrong shape for the config.
    #[error("tensor `{name}` has shape {got:?} but the config implies {want:?}. The config.json does not belong to these weights")]
    Shape {
        /// The HF tensor name.
        name: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape expected.
        want: Vec<usize>,
    },
    /// GGUF metadata is missing or of the wrong type.
    #[error("GGUF metadata `{key}` is missing or not {want}. Only llama-architecture GGUF files from llama.cpp are supported")]
    GgufMetadata {
        /// The metadata key.
        key: String,
        /// The expected type.
        want: &'static str,
    },
    /// A GGUF file's tensor data runs past its end (an interrupted download or copy).
    #[error("{path} is truncated or corrupt: tensor `{tensor}` ends at byte {end} but the file has {len} bytes. Download or copy the file again")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The first tensor that does not fit.
        tensor: String,
        /// Where that tensor's data ends.
        end: u64,
        /// The file's length.
        len: u64,
    },
    /// An error from candle while reading or converting tensors.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A stored tensor: dense, or still in a llama.cpp quantized format.
#[derive(Debug, Clone)]
pub enum StoredTensor {
    /// A dense tensor in its stored dtype.
    Dense(Tensor),
    /// A quantized tensor (from GGUF), shape in HF order (`[out, in]` for linear weights).
    Quantized(Arc<QTensor>),
}

impl StoredTensor {
    /// The tensor's shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Dense(t) => t.dims().to_vec(),
            Self::Quantized(q) => q.shape().dims().to_vec(),
        }
    }

    /// A dense copy in `dtype` (dequantizing if needed).
    pub fn to_dense(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(t) => t.to_dtype(dtype),
            Self::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }
}

enum Source {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Memory(HashMap<String, StoredTensor>),
    Gguf(std::sync::Mutex<GgufSource>),
}

/// A GGUF file whose tensors are read when asked for, so that a loader that repacks each one
/// (the packed CPU kernels) never holds the whole file and its repacked copy at once.
struct GgufSource {
    path: PathBuf,
    file: std::fs::File,
    content: gguf_file::Content,
    /// HF name -> GGUF name.
    names: HashMap<String, String>,
    num_attention_heads: usize,
    num_key_value_heads: usize,
}

impl GgufSource {
    /// Reads tensor `hf` (an HF name) onto `device`: q/k rows un-permuted, quantized kept
    /// quantized, rank-1 tensors (norm weights) dense.
    fn read(&mut self, hf: &str, device: &Device) -> Result<StoredTensor, LoadError> {
        let Some(name) = self.names.get(hf) else {
            return Err(LoadError::MissingTensor {
                name: hf.to_string(),
            });
        };
        let mut q = self
            .content
            .tensor(&mut self.file, name, device)
            .map_err(|e| {
                e.context(format!(
                    "reading tensor `{name}` of {}",
                    self.path.display()
                ))
            })?;
        if hf.ends_with("q_proj.weight") {
            q = unpermute_rows(&q, self.num_attention_heads)?;
        } else if hf.ends_with("k_proj.weight") {
            q = unpermute_rows(&q, self.num_key_value_heads)?;
        }
        Ok(if q.rank() == 1 {
            // Norm weights: always small and needed dense.
            StoredTensor::Dense(q.dequantize(device)?)
        } else {
            StoredTensor::Quantized(Arc::new(q))
        })
    }
}

/// A set of named weights on one device, looked up by Hugging Face tensor names.
pub struct Weights {
    source: Source,
    device: Device,
}

impl Weights {
    /// Memory-maps safetensors files (e.g. every `model-0000N-of-0000M.safetensors` of a
    /// checkpoint); tensors are read onto `device` when asked for.
    pub fn from_safetensors<P: AsRef<Path>>(
        paths: &[P],
        device: &Device,
    ) -> Result<Self, LoadError> {
        for p in paths {
            let p = p.as_ref();
            if let Err(source) = std::fs::metadata(p) {
                return Err(LoadError::Io {
                    path: p.to_path_buf(),
                    source,
                });
            }
        }
        // SAFETY: the mapping is read-only; model files are not modified while a model runs,
        // which is the caller's responsibility as with any memory-mapped checkpoint.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths)? };
        Ok(Self {
            source: Source::Safetensors(st),
            device: device.clone(),
        })
    }

    /// Weights from tensors already in memory (e.g. random weights in tests). Dense tensors
    /// are moved to `device`.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let mut map = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            map.insert(name, StoredTensor::Dense(t.to_device(device)?));
        }
        Ok(Self {
            source: Source::Memory(map),
            device: device.clone(),
        })
    }

    /// Weights from stored tensors (dense or quantized) already on `device`.
    pub fn from_stored(tensors: HashMap<String, StoredTensor>, device: &Device) -> Self {
        Self {
            source: Source::Memory(tensors),
            device: device.clone(),
        }
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors(st) => st.get(name).is_ok(),
            Source::Memory(m) => m.contains_key(name),
            Source::Gguf(g) => g
                .lock()
                .map(|g| g.names.contains_key(name))
                .unwrap_or(false),
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.source {
            Source::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Source::Memory(m) => m.keys().cloned().collect(),
            Source::Gguf(g) => g
                .lock()
                .map(|g| g.names.keys().cloned().collect())
                .unwrap_or_default(),
        };
        names.sort();
        names
    }

    /// The tensor `name` as stored (quantized tensors stay quantized).
    pub fn stored(&self, name: &str) -> Result<StoredTensor, LoadError> {
        match &self.source {
            Source::Safetensors(st) => {
                if st.get(name).is_err() {
                    return Err(LoadError::MissingTensor {
                        name: name.to_string(),
                    });
                }
                Ok(StoredTensor::Dense(st.load(name, &self.device)?))
            }
            Source::Memory(m) => m
                .get(name)
                .cloned()
                .ok_or_else(|| LoadError::MissingTensor {
                    name: name.to_string(),
                }),
            Source::Gguf(g) => g
                .lock()
                .map_err(|_| LoadError::Unsupported("a GGUF read panicked earlier".into()))?
                .read(name, &self.device),
        }
    }

    /// The tensor `name` as stored, checking its shape.
    pub fn stored_shaped(&self, name: &str, want: &[usize]) -> Result<StoredTensor, LoadError> {
        let t = self.stored(name)?;
        let got = t.dims();
        if got != want {
            return Err(LoadError::Shape {
                name: name.to_string(),
                got,
                want: want.to_vec(),
            });
        }
        Ok(t)
    }

    /// The tensor `name` as a dense tensor in `dtype`, checking its shape.
    pub fn dense(&self, name: &str, want: &[usize], dtype: DType) -> Result<Tensor, LoadError> {
        Ok(self.stored_shaped(name, want)?.to_dense(dtype)?)
    }
}

/// Metadata of a llama-architecture GGUF file, enough to build a Llama config.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLlamaMeta {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Whether the file has no separate `output.weight` (the LM head reuses the embedding).
    pub tie_word_embeddings: bool,
}

fn meta_u32(c: &gguf_file::Content, key: &str) -> Result<usize, LoadError> {
    c.metadata
        .get(key)
        .and_then(|v| {
            v.to_u32()
                .ok()
                .map(|x| x as usize)
                .or_else(|| v.to_u64().ok().map(|x| x as usize))
        })
        .ok_or_else(|| LoadError::GgufMetadata {
            key: key.to_string(),
            want: "an integer",
        })
}

fn meta_f32(c: &gguf_file::Content, key: &str) -> Result<f64, LoadError> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_f32().ok())
        // Via the shortest decimal form, so 1e-5 stored as f32 comes back as 1e-5 (as in the
        // HF config) rather than 9.99999974e-6.
        .map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
        .ok_or_else(|| LoadError::GgufMetadata {
            key: key.to_string(),
            want: "a float",
        })
}

/// Maps a llama.cpp tensor name to its Hugging Face name (`None` for tensors HF has no
/// counterpart for, such as precomputed `rope_freqs`).
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Reorders the rows of a `[out, in]` tensor so that HF's rotate-half rotary applies: llama.cpp
/// interleaves each head's two rotary halves (row `2i + j` of a head holds HF row
/// `j * head_dim / 2 + i`). Works on quantized data directly, since quantization blocks run
/// along rows.
fn unpermute_rows(q: &QTensor, n_heads: usize) -> Result<QTensor, LoadError> {
    let (rows, cols) = q.shape().dims2()?;
    if n_heads == 0 || !rows.is_multiple_of(n_heads) || !(rows / n_heads).is_multiple_of(2) {
        return Err(LoadError::Unsupported(format!(
            "cannot split {rows} rows into {n_heads} heads of even size"
        )));
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if data.len() != rows * row_bytes {
        return Err(LoadError::Unsupported(format!(
            "quantized tensor has {} bytes, expected {} for {rows}x{cols} {dtype:?}",
            data.len(),
            rows * row_bytes
        )));
    }
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + j * half + i;
                let gguf_row = h * head_dim + 2 * i + j;
                out[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                    .copy_from_slice(&data[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &q.device(), dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Checks that every tensor `content` (read from `path`) lists lies inside the file, so a
/// truncated file is reported as such, by name, before any tensor is read.
pub fn check_gguf_extents(content: &gguf_file::Content, path: &Path) -> Result<(), LoadError> {
    let len = std::fs::metadata(path)
        .map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut infos: Vec<(&String, &gguf_file::TensorInfo)> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    for (name, info) in infos {
        let dtype = info.ggml_dtype;
        let bytes = (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64;
        let end = content.tensor_data_offset + info.offset + bytes;
        if end > len {
            return Err(LoadError::Truncated {
                path: path.to_path_buf(),
                tensor: name.clone(),
                end,
                len,
            });
        }
    }
    Ok(())
}

/// Opens a llama-architecture GGUF file: its tensors under HF names (q/k rows un-permuted,
/// quantized tensors kept quantized), read from the file when asked for, and the metadata to
/// build a Llama config.
pub fn load_gguf_llama(
    path: &Path,
    device: &Device,
) -> Result<(Weights, GgufLlamaMeta), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let content = gguf_file::Content::read(&mut file)?;
    check_gguf_extents(&content, path)?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| LoadError::GgufMetadata {
            key: "general.architecture".into(),
            want: "a string",
        })?;
    if arch != "llama" {
        return Err(LoadError::Unsupported(format!(
            "GGUF architecture `{arch}`; only `llama` is supported"
        )));
    }
    let hidden_size = meta_u32(&content, "llama.embedding_length")?;
    let num_attention_heads = meta_u32(&content, "llama.attention.head_count")?;
    let num_key_value_heads =
        meta_u32(&content, "llama.attention.head_count_kv").unwrap_or(num_attention_heads);
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| LoadError::MissingTensor {
            name: "token_embd.weight".into(),
        })?;
    let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
    let meta = GgufLlamaMeta {
        vocab_size,
        hidden_size,
        intermediate_size: meta_u32(&content, "llama.feed_forward_length")?,
        num_hidden_layers: meta_u32(&content, "llama.block_count")?,
        num_attention_heads,
        num_key_value_heads,
        rms_norm_eps: meta_f32(&content, "llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: meta_f32(&content, "llama.rope.freq_base").unwrap_or(10_000.0),
        max_position_embeddings: meta_u32(&content, "llama.context_length").unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
    };
    let names = content
        .tensor_infos
        .keys()
        .filter_map(|name| Some((gguf_to_hf_name(name)?, name.clone())))
        .collect();
    let source = GgufSource {
        path: path.to_path_buf(),
        file,
        content,
        names,
        num_attention_heads: meta.num_attention_heads,
        num_key_value_heads: meta.num_key_value_heads,
    };
    let weights = Weights {
        source: Source::Gguf(std::sync::Mutex::new(source)),
        device: device.clone(),
    };
    Ok((weights, meta))
}

/// The `*.safetensors` files of a checkpoint directory, sorted (sharded checkpoints name their
/// shards so that this is their order).
pub fn safetensors_in_dir(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(LoadError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no *.safetensors files in this directory; expected a Hugging Face checkpoint",
            ),
        });
    }
    Ok(files)
}
