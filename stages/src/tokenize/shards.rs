//! Token shards: the tokenize stage's output and the trainer's input.
//!
//! A directory holds `index.json` and `shard-NNNNN.bin` files. Each shard is
//! little-endian: magic `PTOK`, `u32` version (1), `u64` examples N, `u64` tokens T,
//! `u64` offsets[N + 1] (example i is tokens offsets[i]..offsets[i+1]), `u32` ids[T],
//! `u8` mask[T] (1 = the token is a loss target).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{TokenizeError, TokenizeStats};

pub use pipeline_models::train::Example;

const MAGIC: &[u8; 4] = b"PTOK";
const VERSION: u32 = 1;
/// `format` field of `index.json`.
pub const INDEX_FORMAT: &str = "pipeline-token-shards";

/// One shard's entry in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name within the directory.
    pub file: String,
    /// Examples in the shard.
    pub examples: u64,
    /// Tokens in the shard.
    pub tokens: u64,
    /// blake3 of the file, hex.
    pub blake3: String,
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    /// Always [`INDEX_FORMAT`].
    pub format: String,
    /// Shard format version.
    pub version: u32,
    /// Vocabulary size of the tokenizer used (ids are below it).
    pub vocab_size: u64,
    /// EOS id used, if any.
    pub eos_id: Option<u32>,
    /// BOS id used, if any.
    pub bos_id: Option<u32>,
    /// The maximum sequence length examples were truncated / packed to.
    pub max_length: u64,
    /// The shards, in order.
    pub shards: Vec<ShardInfo>,
    /// What the tokenize run did.
    pub stats: TokenizeStats,
}

/// Writes examples into size-bounded shards.
pub(crate) struct ShardWriter {
    dir: PathBuf,
    max_tokens: u64,
    offsets: Vec<u64>,
    ids: Vec<u32>,
    mask: Vec<u8>,
    pub(crate) shards: Vec<ShardInfo>,
}

impl ShardWriter {
    pub(crate) fn new(dir: &Path, max_tokens: u64) -> Result<Self, TokenizeError> {
        std::fs::create_dir_all(dir).map_err(|source| TokenizeError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max_tokens: max_tokens.max(1),
            offsets: vec![0],
            ids: Vec::new(),
            mask: Vec::new(),
            shards: Vec::new(),
        })
    }

    pub(crate) fn push(&mut self, ids: &[u32], mask: &[u8]) -> Result<(), TokenizeError> {
        if !self.ids.is_empty() && (self.ids.len() + ids.len()) as u64 > self.max_tokens {
            self.flush()?;
        }
        self.ids.extend_from_slice(ids);
        self.mask.extend_from_slice(mask);
        self.offsets.push(self.ids.len() as u64);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TokenizeError> {
        let n = self.offsets.len() as u64 - 1;
        if n == 0 {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(24 + self.offsets.len() * 8 + self.ids.len() * 5);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&n.to_le_bytes());
        buf.extend_from_slice(&(self.ids.len() as u64).to_le_bytes());
        for o in &self.offsets {
            buf.extend_from_slice(&o.to_le_bytes());
        }
        for id in &self.ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        buf.extend_from_slice(&self.mask);
        let file = format!("shard-{:05}.bin", self.shards.len());
        let path = self.dir.join(&file);
        let io = |source| TokenizeError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::create(&path).map_err(io)?;
        f.write_all(&buf).map_err(io)?;
        self.shards.push(ShardInfo {
            file,
            examples: n,
            tokens: self.ids.len() as u64,
            blake3: blake3::hash(&buf).to_hex().to_string(),
        });
        self.offsets = vec![0];
        self.ids.clear();
        self.mask.clear();
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<Vec<ShardInfo>, TokenizeError> {
        self.flush()?;
        Ok(self.shards)
    }
}

/// Reads a shard directory written by the tokenize stage.
#[derive(Debug, Clone)]
pub struct TokenShards {
    dir: PathBuf,
    /// The parsed `index.json`.
    pub index: ShardIndex,
}

fn corrupt(path: &Path, message: impl Into<String>) -> TokenizeError {
    TokenizeError::Shard {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl TokenShards {
    /// Opens `dir` (reads and checks `index.json`; shards are read lazily).
    pub fn open(dir: &Path) -> Result<Self, TokenizeError> {
        let path = dir.join("index.json");
        let text = std::fs::read_to_string(&path).map_err(|source| TokenizeError::Io {
            path: path.clone(),
            source,
        })?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
        if index.format != INDEX_FORMAT || index.version != VERSION {
            return Err(corrupt(
                &path,
                format!(
                    "format {} v{} is not {INDEX_FORMAT} v{VERSION}",
                    index.format, index.version
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
        })
    }

    /// Total number of examples.
    pub fn len(&self) -> u64 {
        self.index.shards.iter().map(|s| s.examples).sum()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads and verifies shard `i`, returning its examples.
    pub fn read_shard(&self, i: usize) -> Result<Vec<Example>, TokenizeError> {
        let info = self
            .index
            .shards
            .get(i)
            .ok_or_else(|| corrupt(&self.dir, format!("no shard {i}")))?;
        let path = self.dir.join(&info.file);
        let buf = std::fs::read(&path).map_err(|source| TokenizeError::Io {
            path: path.clone(),
            source,
        })?;
        if blake3::hash(&buf).to_hex().as_str() != info.blake3 {
            return Err(corrupt(&path, "content hash does not match index.json"));
        }
        parse_shard(&path, &buf)
    }

    /// All examples, shard by shard, as `(ids, mask)`.
    pub fn iter(&self) -> impl Iterator<Item = Result<Example, TokenizeError>> + '_ {
        (0..self.index.shards.len()).flat_map(move |i| {
            let items: Vec<Result<_, TokenizeError>> = match self.read_shard(i) {
                Ok(v) => v.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            items
        })
    }
}

fn parse_shard(path: &Path, buf: &[u8]) -> Result<Vec<Example>, TokenizeError> {
    let u64_at = |off: usize| -> Result<u64, TokenizeError> {
        buf.get(off..off + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| corrupt(path, "truncated header"))
    };
    if buf.get(0..4) != Some(MAGIC.as_slice()) {
        return Err(corrupt(path, "not a token shard (bad magic)"));
    }
    let version = buf
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if version != Some(VERSION) {
        return Err(corrupt(path, format!("unsupported version {version:?}")));
    }
    let n = usize::try_from(u64_at(8)?).map_err(|_| corrupt(path, "bad example count"))?;
    let t = usize::try_from(u64_at(16)?).map_err(|_| corrupt(path, "bad token count"))?;
    let off_start = 24usize;
    // Checked: the counts come from the file, and a corrupt header must not overflow.
    let layout = n
        .checked_add(1)
        .and_then(|k| k.checked_mul(8))
        .and_then(|k| k.checked_add(off_start))
        .and_then(|ids_start| {
            let mask_start = t.checked_mul(4)?.checked_add(ids_start)?;
            Some((ids_start, mask_start, mask_start.checked_add(t)?))
        });
    let Some((ids_start, mask_start, total)) = layout else {
        return Err(corrupt(path, "header counts overflow"));
    };
    if buf.len() != total {
        return Err(corrupt(path, "size does not match header"));
    }
    let offsets: Vec<usize> = (0..=n)
        .map(|i| u64_at(off_start + i * 8).map(|o| o as usize))
        .collect::<Result<_, _>>()?;
    if offsets.first() != Some(&0)
        || offsets.last() != Some(&t)
        || offsets.windows(2).any(|w| w[0] > w[1])
    {
        return Err(corrupt(path, "offsets are not monotonic"));
    }
    let ids: Vec<u32> = buf[ids_start..mask_start]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mask = &buf[mask_start..];
    Ok(offsets
        .windows(2)
        .map(|w| (ids[w[0]..w[1]].to_vec(), mask[w[0]..w[1]].to_vec()))
        .collect())
}
