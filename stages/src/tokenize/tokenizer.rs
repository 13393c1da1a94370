//! Text tokenizers: a `tokenizer.json`, or one rebuilt from a GGUF file's
//! `tokenizer.ggml.*` metadata (so a quantized model file is self-sufficient).

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::TokenizeError;

/// llama.cpp's token type for control tokens (`<|endoftext|>`, `<|im_start|>`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's token type for user-defined added tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama-3-style split regex llama.cpp uses for `llama-bpe` vocabularies.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens tried, in order, when a `tokenizer.json` user names no EOS token.
pub const EOS_CANDIDATES: [&str; 4] = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"];

/// A token's byte range `(start, end)` in the encoded text.
pub type Span = (usize, usize);

/// A tokenizer plus the special ids the tokenize stage needs.
pub struct TextTokenizer {
    /// The underlying Hugging Face tokenizer.
    pub tokenizer: Tokenizer,
    /// Beginning-of-sequence id, if the vocabulary has one.
    pub bos_id: Option<u32>,
    /// End-of-sequence id, if known.
    pub eos_id: Option<u32>,
    /// Where it was loaded from.
    pub source: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `path`: a `.gguf` file (tokenizer from its metadata) or a `tokenizer.json`.
    /// `eos_token` / `bos_token` override or supply the special tokens of a tokenizer.json.
    pub fn load(
        path: &Path,
        eos_token: Option<&str>,
        bos_token: Option<&str>,
    ) -> Result<Self, TokenizeError> {
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let mut t = if is_gguf {
            Self::from_gguf(path)?
        } else {
            Self::from_json(path)?
        };
        if let Some(tok) = eos_token {
            t.eos_id = Some(t.special_id(tok)?);
        }
        if let Some(tok) = bos_token {
            t.bos_id = Some(t.special_id(tok)?);
        }
        Ok(t)
    }

    fn special_id(&self, token: &str) -> Result<u32, TokenizeError> {
        self.tokenizer
            .token_to_id(token)
            .ok_or_else(|| TokenizeError::Tokenizer {
                path: self.source.clone(),
                message: format!("token `{token}` is not in the vocabulary"),
            })
    }

    /// Loads a Hugging Face `tokenizer.json`. Special tokens come from a
    /// `tokenizer_config.json` beside it (`eos_token` / `bos_token`, as HF writes them);
    /// without one, EOS is the first of [`EOS_CANDIDATES`] in the vocabulary and BOS is
    /// unset. [`TextTokenizer::load`]'s overrides win over both.
    pub fn from_json(path: &Path) -> Result<Self, TokenizeError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| TokenizeError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let config = path.with_file_name("tokenizer_config.json");
        let (cfg_eos, cfg_bos) = if config.is_file() {
            let text = std::fs::read_to_string(&config).map_err(|source| TokenizeError::Io {
                path: config.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| TokenizeError::Tokenizer {
                    path: config.clone(),
                    message: format!("invalid JSON: {e}"),
                })?;
            (
                special_from_config(&v, "eos_token"),
                special_from_config(&v, "bos_token"),
            )
        } else {
            (None, None)
        };
        let lookup = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| TokenizeError::Tokenizer {
                    path: config.clone(),
                    message: format!("special token `{name}` is not in {}", path.display()),
                })
        };
        let eos_id = match cfg_eos {
            Some(name) => Some(lookup(&name)?),
            None => EOS_CANDIDATES.iter().find_map(|t| tokenizer.token_to_id(t)),
        };
        let bos_id = cfg_bos.map(|name| lookup(&name)).transpose()?;
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            source: path.to_path_buf(),
        })
    }

    /// Rebuilds the tokenizer described by a GGUF file's metadata. Supports byte-level BPE
    /// vocabularies (`tokenizer.ggml.model = "gpt2"`, used by SmolLM2, Llama 3, Qwen 2 ...)
    /// with the pre-tokenizers `smollm`, `gpt2`/`default` and `llama-bpe`.
    pub fn from_gguf(path: &Path) -> Result<Self, TokenizeError> {
        let err = |message: String| TokenizeError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|source| TokenizeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| err(format!("not a GGUF file: {e}")))?;
        let md = &content.metadata;
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| err(format!("GGUF metadata has no `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| err(e.to_string()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model = \"{model}\" is not supported (only byte-level BPE \"gpt2\"); pass the model's tokenizer.json instead"
            )));
        }
        let pre = match md.get("tokenizer.ggml.pre") {
            Some(v) => v.to_string().map_err(|e| err(e.to_string()))?.clone(),
            None => "default".to_string(),
        };
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|e| err(e.to_string()))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("tokenizer.ggml.tokens: {e}")))?;
        let merges: Vec<(String, String)> = get("tokenizer.ggml.merges")?
            .to_vec()
            .map_err(|e| err(e.to_string()))?
            .iter()
            .map(|v| {
                let s = v.to_string().map_err(|e| e.to_string())?;
                s.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("merge `{s}` is not two tokens"))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("tokenizer.ggml.merges: {e}")))?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| err(e.to_string()))?
                .iter()
                .map(as_i64)
                .collect::<Option<_>>()
                .ok_or_else(|| err("tokenizer.ggml.token_type holds non-integers".into()))?,
            None => Vec::new(),
        };
        let id = |k: &str| {
            md.get(k)
                .and_then(as_i64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("cannot build BPE: {e}")))?;
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            // SmolLM2's tokenizer.json: every digit on its own, then GPT-2 byte-level
            // splitting (llama.cpp applies `\p{N}` then the GPT-2 regex, the same thing).
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            "llama-bpe" | "llama3" | "llama-v3" => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| err(e.to_string()))?
                .into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            other => {
                return Err(err(format!(
                    "pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, default, llama-bpe); pass the model's tokenizer.json instead"
                )))
            }
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens must match whole in the text, as llama.cpp
        // does, instead of being cut into byte-level pieces.
        let added = |ty: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(types.iter())
                .filter(|(_, t)| **t == ty)
                .map(|(tok, _)| AddedToken::from(tok.clone(), special).normalized(false))
                .collect()
        };
        tokenizer
            .add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
            .map_err(|e| err(format!("cannot add control tokens: {e}")))?;
        tokenizer
            .add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
            .map_err(|e| err(format!("cannot add user-defined tokens: {e}")))?;
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            source: path.to_path_buf(),
        })
    }

    /// Token ids of `text`, special tokens in the text recognised, none added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Token ids and their byte offsets in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>), TokenizeError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TokenizeError::Tokenizer {
                path: self.source.clone(),
                message: format!("encoding failed: {e}"),
            })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| TokenizeError::Tokenizer {
                path: self.source.clone(),
                message: format!("decoding failed: {e}"),
            })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// `eos_token` / `bos_token` of a tokenizer_config.json: a string, or an object with
/// `content` (older transformers), or null.
fn special_from_config(v: &serde_json::Value, key: &str) -> Option<String> {
    match v.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn as_i64(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => *x as i64,
        V::I8(x) => *x as i64,
        V::U16(x) => *x as i64,
        V::I16(x) => *x as i64,
        V::U32(x) => *x as i64,
        V::I32(x) => *x as i64,
        V::U64(x) => i64::try_from(*x).ok()?,
        V::I64(x) => *x,
        _ => return None,
    })
}
